//! Front-end glue: adapts engine handles to the protocol crates. The protocol crates know
//! nothing of the engine; this is the only place the two meet.

mod nbd;
mod ublk;

pub use nbd::{widen_send_buffer, NbdCatalog, NbdExport};
pub use ublk::UblkTarget;

use crate::engine::{EngineError, ErrorKind};

/// What an engine error means to a block-device client, for both front ends (each maps these
/// five to its wire: NBD error codes, ublk errnos). The one place engine errors are classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockError {
    /// EINVAL: a bad request (or an object that is not there).
    Invalid,
    /// ENOSPC: past the end of the device.
    NoSpace,
    /// EPERM: a write to a read-only export.
    ReadOnly,
    /// The handle was revoked (deleted, forced rollback, shutdown).
    Gone,
    /// EIO: everything else; logged, since the client only sees the errno.
    Io,
}

pub(crate) fn block_error(e: &EngineError) -> BlockError {
    match e.kind() {
        ErrorKind::Invalid
        | ErrorKind::NotFound
        | ErrorKind::NotLocal
        | ErrorKind::Forbidden
        | ErrorKind::Unauthenticated => {
            tracing::debug!(error = %e, "request refused");
            BlockError::Invalid
        }
        ErrorKind::NoSpace => BlockError::NoSpace,
        ErrorKind::ReadOnly => BlockError::ReadOnly,
        ErrorKind::Gone => BlockError::Gone,
        ErrorKind::AlreadyExists
        | ErrorKind::Busy
        | ErrorKind::Io
        | ErrorKind::Corrupt
        | ErrorKind::Unavailable
        | ErrorKind::Quota
        | ErrorKind::Throttled => {
            tracing::warn!(error = %e, "I/O request failed");
            BlockError::Io
        }
    }
}
