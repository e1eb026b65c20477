//! `snapblk_ublk::BlockTarget` over a volume handle: one handle per ublk queue (each counts
//! as a writer, so rollback and delete see the device as a connected client).
//!
//! Calls run on the queue's own thread, synchronously: page-cache `pread`/`pwrite` for most
//! requests, `fdatasync` for FLUSH and FUA (which holds up only that queue).

use std::time::Instant;

use snapblk_ublk::{BlockTarget, TargetError};

use super::{block_error, BlockError};
use crate::engine::{EngineError, IoOp, VolumeHandle, ZeroMode};

pub struct UblkTarget {
    handle: VolumeHandle,
}

impl UblkTarget {
    pub fn new(handle: VolumeHandle) -> UblkTarget {
        UblkTarget { handle }
    }
}

/// Engine errors as ublk errors (classified in `super::block_error`). A revoked handle
/// (daemon shutting down) holds the request for the next daemon instead of failing it.
fn ublk_error(e: EngineError) -> TargetError {
    match block_error(&e) {
        BlockError::Invalid => TargetError::Invalid,
        BlockError::NoSpace => TargetError::NoSpace,
        BlockError::ReadOnly => TargetError::ReadOnly,
        BlockError::Gone => TargetError::Gone,
        BlockError::Io => TargetError::Io,
    }
}

impl UblkTarget {
    /// Runs one request, counting it in the volume's I/O counters (`engine::IoStats`: a few
    /// relaxed atomic adds) with its latency.
    fn counted<T>(&self, op: IoOp, bytes: u64, f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, TargetError> {
        let started = Instant::now();
        let r = f();
        self.handle.io().record(op, bytes, started, r.is_ok());
        r.map_err(ublk_error)
    }
}

impl BlockTarget for UblkTarget {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        let len = buf.len() as u64;
        self.counted(IoOp::Read, len, || self.handle.read(offset, buf)).map(|_hole| ())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), TargetError> {
        self.counted(IoOp::Write, data.len() as u64, || self.handle.write(offset, data, fua))
    }

    fn flush(&self) -> Result<(), TargetError> {
        self.counted(IoOp::Flush, 0, || self.handle.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        self.counted(IoOp::Trim, len, || self.handle.zero(offset, len, ZeroMode::Unmap, false))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, fua: bool) -> Result<(), TargetError> {
        let mode = if unmap { ZeroMode::Unmap } else { ZeroMode::Allocate };
        self.counted(IoOp::Trim, len, || self.handle.zero(offset, len, mode, fua))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_errnos_and_revocation_holds_requests() {
        assert_eq!(ublk_error(EngineError::NoSpace("x".into())), TargetError::NoSpace);
        assert_eq!(ublk_error(EngineError::Invalid("x".into())), TargetError::Invalid);
        assert_eq!(ublk_error(EngineError::Gone("x".into())), TargetError::Gone);
        assert_eq!(ublk_error(EngineError::Corrupt("x".into())), TargetError::Io);
        assert_eq!(TargetError::Gone.errno(), None);
    }

    #[test]
    fn a_queue_target_reads_back_what_it_wrote_and_zeroes_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::engine::Engine::open(dir.path()).unwrap();
        engine.create_volume("v", 1 << 20, Some(4096)).unwrap();
        let t = UblkTarget::new(engine.open_volume("v").unwrap());
        let data = vec![0x5au8; 8192];
        t.write(4096, &data, true).unwrap();
        let mut buf = vec![0u8; 8192];
        t.read(4096, &mut buf).unwrap();
        assert_eq!(buf, data);
        t.discard(4096, 4096).unwrap();
        t.write_zeroes(8192, 4096, false, false).unwrap();
        t.read(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        t.flush().unwrap();
        assert_eq!(t.write(1 << 20, &data, false), Err(TargetError::NoSpace));
        assert_eq!(t.read(u64::MAX - 10, &mut buf), Err(TargetError::Invalid));
        // Every request is counted in the volume's I/O counters; failed ones move no bytes.
        let id = engine.volume("v").unwrap().id;
        let io = engine.volume_io();
        let ops = &io.iter().find(|(v, _)| *v == id).unwrap().1.ops;
        let count = |op: IoOp| {
            let o = &ops[op as usize];
            (o.requests(), o.bytes, o.errors)
        };
        assert_eq!(count(IoOp::Write), (2, 8192, 1));
        assert_eq!(count(IoOp::Read), (3, 16384, 1));
        assert_eq!(count(IoOp::Trim), (2, 8192, 0));
        assert_eq!(count(IoOp::Flush), (1, 0, 0));
    }
}
