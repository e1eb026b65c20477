//! `snapblk_nbd::ExportCatalog` over the engine: export `VOLUME` is the writable volume,
//! `VOLUME@SNAPSHOT` a read-only snapshot.
//!
//! Engine calls run on the connection's task: page-cache `pread`/`pwrite`s of at most one
//! request, cheaper than a hop to a blocking pool. FLUSH and FUA do `fdatasync`, which can take
//! milliseconds; they block one runtime worker meanwhile. On a volume still loading from the
//! object store, a request awaits the clusters it needs (the `_async` calls).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use snapblk_nbd::{Export, ExportCatalog, ExportError, ExportInfo, Extent, Peer, ReadKind, RequestKind, ZeroFlags};

use super::{block_error, BlockError};
use crate::engine::{self, EngineError, IoOp, IoStats, Priority, SnapshotHandle, VolumeHandle, ZeroMode};
use crate::service::{ExportHandle, Service};

/// Largest request we accept (NBD_INFO_BLOCK_SIZE maximum).
const MAX_REQUEST: u32 = 32 << 20;
/// Send buffer asked for on unix-socket NBD connections. The default (`wmem_default`, 208
/// KiB) holds a fifth of a 1 MiB read reply, so every large reply went out in several rounds
/// of send, wait for the client to drain, wake up; with room for a few replies it goes in one
/// (1 MiB sequential reads: +10–20 %). The kernel caps it at `net.core.wmem_max`.
const UNIX_SEND_BUFFER: usize = 4 << 20;
const BASE_ALLOCATION: &str = "base:allocation";
const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// Widens a unix-socket NBD connection's send buffer ([`UNIX_SEND_BUFFER`]); a refusal only
/// costs speed, so it is logged, not returned. (TCP sockets keep the kernel's auto-tuning,
/// which a fixed size would turn off.)
pub fn widen_send_buffer(socket: std::os::fd::BorrowedFd<'_>) {
    if let Err(e) = socket2::SockRef::from(&socket).set_send_buffer_size(UNIX_SEND_BUFFER) {
        tracing::debug!(error = %e, "NBD socket keeps its default send buffer");
    }
}

/// The NBD exports: opened through the operations layer, which resolves the name and checks
/// the caller; I/O then goes straight to the engine handle.
pub struct NbdCatalog {
    service: Arc<Service>,
    /// Serves the TCP listener (else the unix socket, whose mode already decided who).
    network: bool,
}

impl NbdCatalog {
    pub fn new(service: Arc<Service>, network: bool) -> NbdCatalog {
        NbdCatalog { service, network }
    }
}

/// Engine errors as NBD errors (classified in `super::block_error`).
fn nbd_error(e: EngineError) -> ExportError {
    match block_error(&e) {
        BlockError::Invalid => ExportError::Invalid,
        BlockError::NoSpace => ExportError::NoSpace,
        BlockError::ReadOnly => ExportError::ReadOnly,
        BlockError::Gone => ExportError::Gone,
        BlockError::Io => ExportError::Io,
    }
}

/// Runs one request, counting it in its volume's I/O counters (`engine::IoStats`: a few
/// relaxed atomic adds) with its latency. (A future does nothing until polled, so the clock
/// starts with the request.)
async fn counted<T>(
    io: &IoStats,
    op: IoOp,
    bytes: u64,
    request: impl Future<Output = Result<T, EngineError>>,
) -> Result<T, ExportError> {
    let started = Instant::now();
    let r = request.await;
    io.record(op, bytes, started, r.is_ok());
    r.map_err(nbd_error)
}

fn extents(v: Vec<engine::Extent>) -> Vec<Extent> {
    // Requests are at most u32 long, so every extent fits.
    v.into_iter().map(|e| Extent { length: e.length as u32, flags: e.flags }).collect()
}

enum Handle {
    /// The volume, with the snapshot ids behind its `qemu:dirty-bitmap:<snapshot>` contexts
    /// (context `2 + i` is `bases[i]`; 0 is `base:allocation`, 1 the live `dirty` bitmap).
    Volume(VolumeHandle, Vec<u64>),
    /// A snapshot, local or released (then read from the store, through the same handle).
    Snapshot(SnapshotHandle),
}

pub struct NbdExport {
    handle: Handle,
    info: ExportInfo,
}

impl ExportCatalog for NbdCatalog {
    type Export = NbdExport;

    fn list(&self, peer: &Peer) -> Vec<(String, String)> {
        self.service.export_names(&self.service.nbd_caller(&peer.client_names, self.network)).unwrap_or_default()
    }

    fn open(&self, peer: &Peer, name: &str) -> Result<NbdExport, String> {
        let block = |cluster_size: u32| (1, 4096.min(cluster_size), MAX_REQUEST);
        let caller = self.service.nbd_caller(&peer.client_names, self.network);
        match self.service.open_export(&caller, name).map_err(|e| e.to_string())? {
            ExportHandle::Snapshot(h) => {
                let mut meta_contexts = vec![BASE_ALLOCATION.to_string()];
                meta_contexts.extend(h.base_names().map(|b| format!("{DIRTY_BITMAP_PREFIX}{b}")));
                let (min_block, preferred_block, max_block) = block(h.cluster_size());
                let info = ExportInfo {
                    name: h.name(),
                    description: h.description().to_string(),
                    size: h.size(),
                    read_only: true,
                    min_block,
                    preferred_block,
                    max_block,
                    meta_contexts,
                };
                Ok(NbdExport { handle: Handle::Snapshot(h), info })
            }
            ExportHandle::Volume(h) => {
                let (min_block, preferred_block, max_block) = block(h.cluster_size());
                let mut meta_contexts = vec![BASE_ALLOCATION.to_string(), format!("{DIRTY_BITMAP_PREFIX}dirty")];
                // Changed since each snapshot; one named "dirty" is left out (the name means the
                // live bitmap, changed since the newest snapshot).
                let bases: Vec<(u64, String)> = h.snapshots().into_iter().filter(|(_, n)| n != "dirty").collect();
                meta_contexts.extend(bases.iter().map(|(_, n)| format!("{DIRTY_BITMAP_PREFIX}{n}")));
                let info = ExportInfo {
                    name: h.name().to_string(),
                    description: format!("snapblk volume {}", h.name()),
                    size: h.size(),
                    read_only: false,
                    min_block,
                    preferred_block,
                    max_block,
                    meta_contexts,
                };
                Ok(NbdExport { handle: Handle::Volume(h, bases.into_iter().map(|(id, _)| id).collect()), info })
            }
        }
    }
}

impl NbdExport {
    /// A read-write export of `handle`, for a socket handed to the kernel NBD driver.
    pub fn for_volume(handle: VolumeHandle) -> NbdExport {
        let info = ExportInfo {
            name: handle.name().to_string(),
            description: format!("snapblk volume {}", handle.name()),
            size: handle.size(),
            read_only: false,
            min_block: 1,
            preferred_block: 4096.min(handle.cluster_size()),
            max_block: MAX_REQUEST,
            meta_contexts: Vec::new(),
        };
        NbdExport { handle: Handle::Volume(handle, Vec::new()), info }
    }

    fn volume(&self) -> Result<&VolumeHandle, ExportError> {
        match &self.handle {
            Handle::Volume(v, _) => Ok(v),
            Handle::Snapshot(_) => Err(ExportError::ReadOnly),
        }
    }
}

/// Reads and writes at least this large run on tasks of their own: their copies (page cache
/// to buffer, or buffer to page cache) then run on every core while the connection reads the
/// next request; smaller ones are cheaper inline.
const OWN_TASK_FROM: u32 = 256 << 10;

impl Export for NbdExport {
    fn info(&self) -> &ExportInfo {
        &self.info
    }

    fn run_on_own_task(&self, kind: RequestKind, length: u32) -> bool {
        match kind {
            RequestKind::Flush | RequestKind::Write { fua: true } => true,
            RequestKind::Read | RequestKind::Write { fua: false } => length >= OWN_TASK_FROM,
            _ => false,
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadKind, ExportError> {
        let len = buf.len() as u64;
        let hole = match &self.handle {
            Handle::Volume(v, _) => counted(v.io(), IoOp::Read, len, v.read_async(offset, buf)).await?,
            Handle::Snapshot(s) => counted(s.io(), IoOp::SnapshotRead, len, s.read_async(offset, buf)).await?,
        };
        Ok(if hole { ReadKind::Hole } else { ReadKind::Data })
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        let v = self.volume()?;
        counted(v.io(), IoOp::Write, data.len() as u64, v.write_async(offset, data, fua)).await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        match &self.handle {
            Handle::Volume(v, _) => counted(v.io(), IoOp::Flush, 0, v.flush_async()).await,
            Handle::Snapshot(_) => Ok(()), // nothing to make durable
        }
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        let v = self.volume()?;
        counted(v.io(), IoOp::Trim, length, v.zero_async(offset, length, ZeroMode::Unmap, fua)).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<(), ExportError> {
        let v = self.volume()?;
        let mode = if flags.no_hole { ZeroMode::Allocate } else { ZeroMode::Unmap };
        // Unmapping is a metadata change (fast); writing zeros is not.
        if flags.fast && mode == ZeroMode::Allocate {
            return Err(ExportError::NotFast);
        }
        counted(v.io(), IoOp::Trim, length, v.zero_async(offset, length, mode, flags.fua)).await
    }

    /// Loads the range from the store if it is not local yet (nothing to do otherwise).
    async fn cache(&self, offset: u64, length: u64) -> Result<(), ExportError> {
        match &self.handle {
            Handle::Volume(v, _) => v.load(offset, length, false, Priority::ReadAhead).await.map_err(nbd_error),
            Handle::Snapshot(_) => Ok(()),
        }
    }

    async fn block_status(&self, context: usize, offset: u64, length: u32) -> Result<Vec<Extent>, ExportError> {
        let len = length as u64;
        let result = match (&self.handle, context) {
            (Handle::Volume(v, _), 0) => v.allocation_async(offset, len).await,
            (Handle::Volume(v, _), 1) => v.dirty(offset, len),
            (Handle::Volume(v, bases), n) => match bases.get(n - 2) {
                Some(&base) => v.changed_since_snapshot(base, offset, len),
                None => return Err(ExportError::Invalid),
            },
            (Handle::Snapshot(s), 0) => s.allocation_async(offset, len).await,
            (Handle::Snapshot(s), n) => s.changed_since(n - 1, offset, len),
        };
        result.map(extents).map_err(nbd_error)
    }

    async fn revoked(&self) {
        match &self.handle {
            Handle::Volume(v, _) => v.revoked().await,
            Handle::Snapshot(s) => s.revoked().await,
        }
    }
}
