//! `snapblk_ublk::BlockTarget` over a volume handle: one handle per ublk queue (each counts
//! as a writer, so rollback and delete see the device as a connected client).
//!
//! Calls run on the queue's own thread, synchronously: page-cache `pread`/`pwrite` for most
//! requests, `fdatasync` for FLUSH and FUA (which holds up only that queue).

use snapblk_ublk::{BlockTarget, TargetError};

use super::{block_error, BlockError};
use crate::engine::{EngineError, VolumeHandle, ZeroMode};

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

impl BlockTarget for UblkTarget {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        self.handle.read(offset, buf).map(|_hole| ()).map_err(ublk_error)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), TargetError> {
        self.handle.write(offset, data, fua).map_err(ublk_error)
    }

    fn flush(&self) -> Result<(), TargetError> {
        self.handle.flush().map_err(ublk_error)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        self.handle.zero(offset, len, ZeroMode::Unmap, false).map_err(ublk_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, fua: bool) -> Result<(), TargetError> {
        let mode = if unmap { ZeroMode::Unmap } else { ZeroMode::Allocate };
        self.handle.zero(offset, len, mode, fua).map_err(ublk_error)
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
    }
}
