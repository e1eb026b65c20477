//! What the server needs from storage. The server knows nothing of snapshots, stores or files:
//! a front-end glue crate implements [`ExportCatalog`] and [`Export`] for its own handles.

use std::future::Future;

use crate::tls::Peer;

/// Errors an export reports for one request; the server maps them to NBD error codes in one place
/// (`conn::errno`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("I/O error")]
    Io,
    #[error("operation not permitted (read-only export)")]
    ReadOnly,
    #[error("invalid argument")]
    Invalid,
    #[error("no space left (write past the end of the export)")]
    NoSpace,
    #[error("operation not supported")]
    NotSupported,
    #[error("out of memory")]
    NoMemory,
    /// The export can not zero this range quickly (answer to FAST_ZERO).
    #[error("cannot zero quickly")]
    NotFast,
    /// The export was revoked (deleted, rolled back with --force, daemon shutting down): the
    /// server replies with an error and then closes the connection.
    #[error("export is gone")]
    Gone,
}

/// Static facts about an export, sent during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    /// Minimum / preferred / maximum block sizes (NBD_INFO_BLOCK_SIZE).
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    /// Every meta context the export can answer BLOCK_STATUS for, e.g. `base:allocation`,
    /// `qemu:dirty-bitmap:dirty`. The server does the query matching.
    pub meta_contexts: Vec<String>,
}

/// One extent of a BLOCK_STATUS reply: `length` bytes with NBD status `flags`
/// (for `base:allocation`: bit 0 = hole, bit 1 = zero; for dirty bitmaps: bit 0 = dirty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    pub flags: u32,
}

/// What a read found, so the server can send `NBD_REPLY_TYPE_OFFSET_HOLE` instead of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    /// The buffer holds data (which may still contain zeros).
    Data,
    /// The whole range is unallocated and reads as zeros (the buffer was zero-filled).
    Hole,
}

/// Write-zeroes request flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    pub fua: bool,
    /// NBD_CMD_FLAG_NO_HOLE: the client wants the range allocated, not punched.
    pub no_hole: bool,
    /// NBD_CMD_FLAG_FAST_ZERO: fail with `NotFast` instead of writing zeros slowly.
    pub fast: bool,
}

/// The kind of a transmission request, for [`Export::run_on_own_task`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write { fua: bool },
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
}

/// One open export (one per connection; cheap to clone/share between the connection's tasks).
/// All offsets and lengths are already checked against `info().size` by the server.
pub trait Export: Send + Sync + 'static {
    fn info(&self) -> &ExportInfo;
    /// Fills all of `buf` (holes with zeros): the server hands in reused buffers that still
    /// hold earlier replies.
    fn read(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = Result<ReadKind, ExportError>> + Send;
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> impl Future<Output = Result<(), ExportError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send;
    fn trim(&self, offset: u64, length: u64, fua: bool) -> impl Future<Output = Result<(), ExportError>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;
    /// NBD_CMD_CACHE: prefetch; exports that are always local may simply return Ok.
    fn cache(&self, offset: u64, length: u64) -> impl Future<Output = Result<(), ExportError>> + Send;
    /// BLOCK_STATUS for `info().meta_contexts[context]`. Must return at least one extent covering
    /// a prefix of the range (the server trims to `length` and to one extent for REQ_ONE); may
    /// cover less than `length`.
    fn block_status(
        &self,
        context: usize,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = Result<Vec<Extent>, ExportError>> + Send;
    /// Whether the server should run this request (of `length` bytes) on a task of its own,
    /// so the connection goes on reading (and answering) later requests while it waits, or
    /// runs several large copies on several cores: replies then come out of order. Requests
    /// that complete at once are cheaper inline. By default FLUSH and FUA writes (which wait
    /// for the disk) get their own task.
    fn run_on_own_task(&self, kind: RequestKind, length: u32) -> bool {
        let _ = length;
        matches!(kind, RequestKind::Flush | RequestKind::Write { fua: true })
    }
    /// Resolves when the export is revoked: the server then stops reading requests, finishes
    /// the ones in flight and closes the connection.
    fn revoked(&self) -> impl Future<Output = ()> + Send;
}

/// Lookup of exports by name, for NBD_OPT_LIST / INFO / GO / EXPORT_NAME.
pub trait ExportCatalog: Send + Sync + 'static {
    type Export: Export;
    /// Names and descriptions of the exports `peer` may see.
    fn list(&self, peer: &Peer) -> Vec<(String, String)>;
    /// Open an export by name for `peer` (the empty name is the default export, if any).
    /// `Err` carries a human-readable message sent with NBD_REP_ERR_UNKNOWN (an export the
    /// peer may not open should read as unknown too).
    fn open(&self, peer: &Peer, name: &str) -> Result<Self::Export, String>;
}
