//! What a ublk queue needs from storage, and the mapping of ublk I/O descriptors to it.

/// Errors a target reports for one request. Each becomes a negative errno for the kernel,
/// except [`TargetError::Gone`], which holds the request (see [`BlockTarget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("I/O error")]
    Io,
    #[error("invalid argument")]
    Invalid,
    #[error("no space left")]
    NoSpace,
    #[error("read-only")]
    ReadOnly,
    #[error("operation not supported")]
    NotSupported,
    /// The target was taken away while the device stays (the daemon is shutting down): the
    /// request is left pending, so the kernel re-issues it to the next daemon through user
    /// recovery instead of failing it to the filesystem.
    #[error("target is gone")]
    Gone,
}

impl TargetError {
    /// The (positive) errno the kernel gets, or `None` for [`TargetError::Gone`].
    pub fn errno(self) -> Option<i32> {
        match self {
            TargetError::Io => Some(libc::EIO),
            TargetError::Invalid => Some(libc::EINVAL),
            TargetError::NoSpace => Some(libc::ENOSPC),
            TargetError::ReadOnly => Some(libc::EROFS),
            TargetError::NotSupported => Some(libc::EOPNOTSUPP),
            TargetError::Gone => None,
        }
    }
}

/// One queue's view of the storage. Each hardware queue gets its own target, used only by
/// that queue's thread, one request at a time. Calls are synchronous: they run on the queue
/// thread (no hop), so a slow call (FLUSH's `fdatasync`) holds up only its own queue.
pub trait BlockTarget: Send + 'static {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError>;
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), TargetError>;
    fn flush(&self) -> Result<(), TargetError>;
    fn discard(&self, offset: u64, len: u64) -> Result<(), TargetError>;
    /// `unmap`: the range may be deallocated (REQ_NOUNMAP was not set).
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, fua: bool) -> Result<(), TargetError>;
}

/// A decoded ublk request operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write { fua: bool },
    Flush,
    Discard,
    WriteZeroes { unmap: bool, fua: bool },
    Unsupported(u32),
}

// ublk's uapi: the low 8 bits of `op_flags` are the operation, the rest are flags.
const OP_READ: u32 = 0;
const OP_WRITE: u32 = 1;
const OP_FLUSH: u32 = 2;
const OP_DISCARD: u32 = 3;
const OP_WRITE_ZEROES: u32 = 5;
const F_FUA: u32 = 1 << 13;
const F_NOUNMAP: u32 = 1 << 15;

/// Decodes `ublksrv_io_desc.op_flags`.
pub fn decode(op_flags: u32) -> Op {
    let fua = op_flags & F_FUA != 0;
    match op_flags & 0xff {
        OP_READ => Op::Read,
        OP_WRITE => Op::Write { fua },
        OP_FLUSH => Op::Flush,
        OP_DISCARD => Op::Discard,
        OP_WRITE_ZEROES => Op::WriteZeroes { unmap: op_flags & F_NOUNMAP == 0, fua },
        other => Op::Unsupported(other),
    }
}

/// Runs one request against `target`. `buf` is the tag's I/O buffer. Returns the result for
/// the kernel (bytes transferred, 0, or a negative errno), or `None` to hold the request.
pub(crate) fn execute<T: BlockTarget>(
    target: &T,
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &mut [u8],
) -> Option<i32> {
    // FLUSH carries no position (the kernel sends sector -1): the offset is checked only for
    // operations that use it.
    let offset = || start_sector.checked_mul(512).ok_or(TargetError::Invalid);
    let len = u64::from(nr_sectors) * 512;
    let data_len = |len: u64| -> Result<usize, TargetError> {
        usize::try_from(len).ok().filter(|&n| n <= buf.len()).ok_or_else(|| {
            tracing::warn!(len, buffer = buf.len(), "ublk request larger than its buffer");
            TargetError::Invalid
        })
    };
    let result = match decode(op_flags) {
        Op::Read => data_len(len).and_then(|n| target.read(offset()?, &mut buf[..n]).map(|()| n as i32)),
        Op::Write { fua } => data_len(len).and_then(|n| target.write(offset()?, &buf[..n], fua).map(|()| n as i32)),
        Op::Flush => target.flush().map(|()| 0),
        Op::Discard => offset().and_then(|o| target.discard(o, len)).map(|()| 0),
        Op::WriteZeroes { unmap, fua } => offset().and_then(|o| target.write_zeroes(o, len, unmap, fua)).map(|()| 0),
        Op::Unsupported(op) => {
            tracing::warn!(op, "unsupported ublk operation");
            Err(TargetError::NotSupported)
        }
    };
    match result {
        Ok(n) => Some(n),
        Err(e) => e.errno().map(|errno| -errno),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn decode_maps_every_operation_and_its_flags() {
        assert_eq!(decode(0), Op::Read);
        assert_eq!(decode(1), Op::Write { fua: false });
        assert_eq!(decode(1 | F_FUA), Op::Write { fua: true });
        assert_eq!(decode(2), Op::Flush);
        assert_eq!(decode(3), Op::Discard);
        assert_eq!(decode(5), Op::WriteZeroes { unmap: true, fua: false });
        assert_eq!(decode(5 | F_NOUNMAP | F_FUA), Op::WriteZeroes { unmap: false, fua: true });
        assert_eq!(decode(4), Op::Unsupported(4));
        assert_eq!(decode(0x22), Op::Unsupported(0x22));
    }

    #[test]
    fn the_uapi_constants_match_libublk() {
        use libublk::sys;
        assert_eq!(OP_READ, sys::UBLK_IO_OP_READ);
        assert_eq!(OP_WRITE, sys::UBLK_IO_OP_WRITE);
        assert_eq!(OP_FLUSH, sys::UBLK_IO_OP_FLUSH);
        assert_eq!(OP_DISCARD, sys::UBLK_IO_OP_DISCARD);
        assert_eq!(OP_WRITE_ZEROES, sys::UBLK_IO_OP_WRITE_ZEROES);
        assert_eq!(F_FUA, sys::UBLK_IO_F_FUA);
        assert_eq!(F_NOUNMAP, sys::UBLK_IO_F_NOUNMAP);
    }

    /// Records calls; fails with `fail` when set.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        fail: Option<TargetError>,
    }

    impl Recorder {
        fn done(&self, call: String) -> Result<(), TargetError> {
            self.calls.lock().unwrap().push(call);
            self.fail.map_or(Ok(()), Err)
        }
    }

    impl BlockTarget for Recorder {
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError> {
            buf.fill(0xab);
            self.done(format!("read {offset} {}", buf.len()))
        }
        fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), TargetError> {
            self.done(format!("write {offset} {} {fua}", data.len()))
        }
        fn flush(&self) -> Result<(), TargetError> {
            self.done("flush".into())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), TargetError> {
            self.done(format!("discard {offset} {len}"))
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, fua: bool) -> Result<(), TargetError> {
            self.done(format!("zeroes {offset} {len} {unmap} {fua}"))
        }
    }

    #[test]
    fn requests_reach_the_target_with_byte_offsets_and_return_bytes_done() {
        let t = Recorder::default();
        let mut buf = vec![0u8; 64 << 10];
        assert_eq!(execute(&t, 0, 8, 8, &mut buf), Some(4096));
        assert!(buf[..4096].iter().all(|&b| b == 0xab) && buf[4096] == 0);
        assert_eq!(execute(&t, 1 | F_FUA, 16, 16, &mut buf), Some(8192));
        // the kernel sends FLUSH with sector -1
        assert_eq!(execute(&t, 2, u64::MAX, 0, &mut buf), Some(0));
        assert_eq!(execute(&t, 3, 2048, 1 << 20, &mut buf), Some(0));
        assert_eq!(execute(&t, 5 | F_NOUNMAP, 8, 8, &mut buf), Some(0));
        assert_eq!(
            *t.calls.lock().unwrap(),
            [
                "read 4096 4096",
                "write 8192 8192 true",
                "flush",
                "discard 1048576 536870912",
                "zeroes 4096 4096 false false"
            ]
        );
    }

    #[test]
    fn a_data_request_larger_than_the_buffer_fails_without_reaching_the_target() {
        let t = Recorder::default();
        let mut buf = vec![0u8; 4096];
        assert_eq!(execute(&t, 0, 0, 16, &mut buf), Some(-libc::EINVAL));
        assert_eq!(execute(&t, 1, 0, 16, &mut buf), Some(-libc::EINVAL));
        assert_eq!(execute(&t, 0, u64::MAX / 256, 8, &mut buf), Some(-libc::EINVAL));
        assert!(t.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn target_errors_become_negative_errnos_and_gone_holds_the_request() {
        let mut buf = vec![0u8; 4096];
        let io = Recorder { fail: Some(TargetError::Io), ..Default::default() };
        assert_eq!(execute(&io, 0, 0, 8, &mut buf), Some(-libc::EIO));
        let nospace = Recorder { fail: Some(TargetError::NoSpace), ..Default::default() };
        assert_eq!(execute(&nospace, 1, 0, 8, &mut buf), Some(-libc::ENOSPC));
        let gone = Recorder { fail: Some(TargetError::Gone), ..Default::default() };
        assert_eq!(execute(&gone, 1, 0, 8, &mut buf), None);
        let t = Recorder::default();
        assert_eq!(execute(&t, 0x22, 0, 8, &mut buf), Some(-libc::EOPNOTSUPP));
    }
}
