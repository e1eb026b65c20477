//! The data path: per-connection handles on one volume (read-write) or one snapshot
//! (read-only). A request looks up its slots under its volume's state lock — shared for reads
//! and for writes to clusters the head owns (written in place), exclusive to install the
//! first write to a cluster after a snapshot (redirect to a fresh slot) and for trims — and
//! does its `pread`/`pwrite` after letting the lock go, so a snapshot create never waits for
//! the disk. A gate pass taken under the lock (`gate.rs`) keeps the slots it looked up from
//! being reused until it ends, and a snapshot from being read until the in-place writes that
//! may still land in its slots have ended ("sealed").
//!
//! A redirect copies (the rest of the old cluster plus the new data) into a fresh slot
//! without the lock, then installs it under the exclusive lock if the cluster did not change
//! meanwhile; otherwise it starts over (and then usually writes in place). Requests that mix
//! owned and not owned clusters, and trims, do their I/O under the exclusive lock.
//!
//! On a volume still loading from the object store (see `remote.rs`), a request that needs a
//! pending cluster — any read of it, a partial write or zero — first waits for it to be loaded
//! (at foreground priority; concurrent requests share one fetch), then runs as above. A
//! whole-cluster write needs no fetch. The `_async` methods await the load; the plain ones
//! block their thread meanwhile (ublk queue threads).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use smallvec::SmallVec;

use super::error::{EngineError, Result};
use super::iostats::IoStats;
use super::journal::Record;
use super::map::{ClusterMap, ZERO};
use super::remote::{self, Priority, Remote};
use super::slots::SlotFile;
use super::{Engine, Snapshot, Target, Ticket, Volume, VolumeState, MAX_CLUSTER_SIZE};

/// Attempts at a request whose clusters keep becoming pending again (a rollback in between).
const LOAD_ATTEMPTS: usize = 4;

/// `base:allocation` flags (NBD_STATE_HOLE, NBD_STATE_ZERO) and the dirty-bitmap flag.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
pub const STATE_DIRTY: u32 = 1;
/// One block-status answer covers at most this many clusters (the client asks for the rest).
const STATUS_MAX_CLUSTERS: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// How to zero a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Drop whole clusters from the map (they read as zeros and use no space).
    Unmap,
    /// Keep the range allocated, writing zeros (NBD's NO_HOLE).
    Allocate,
}

fn zeros() -> &'static [u8] {
    static ZEROS: OnceLock<Box<[u8]>> = OnceLock::new();
    ZEROS.get_or_init(|| vec![0u8; MAX_CLUSTER_SIZE as usize].into_boxed_slice())
}

/// Splits `[offset, offset + len)` into per-cluster pieces:
/// `(cluster, offset within the cluster, position in the request, length)`.
fn pieces(offset: u64, len: u64, shift: u32) -> impl Iterator<Item = (u64, u64, u64, u64)> {
    let cluster_size = 1u64 << shift;
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let abs = offset + pos;
        let within = abs & (cluster_size - 1);
        let n = (cluster_size - within).min(len - pos);
        let piece = (abs >> shift, within, pos, n);
        pos += n;
        Some(piece)
    })
}

fn shift_of(slots: &SlotFile) -> u32 {
    slots.cluster_size().trailing_zeros()
}

/// Pieces that are contiguous both in the request and in the slot file are merged into one
/// `pread`/`pwrite` (sequential writes to a fresh volume get sequential slots).
#[derive(Clone, Copy)]
struct Run {
    slot: u64,
    within: u64,
    pos: usize,
    len: usize,
}

/// The slot runs of one request, looked up under the volume lock and used after it is let
/// go. Inline up to four (every request within a cluster; larger ones on contiguous slots).
type Runs = SmallVec<[Run; 4]>;

fn push_run(runs: &mut Runs, shift: u32, slot: u64, within: u64, pos: usize, n: usize) {
    if let Some(r) = runs.last_mut() {
        if (r.slot << shift) + r.within + r.len as u64 == (slot << shift) + within && r.pos + r.len == pos {
            r.len += n;
            return;
        }
    }
    runs.push(Run { slot, within, pos, len: n });
}

/// Looks up a read through `map`: fills its unallocated pieces with zeros and returns the
/// runs left to read, and whether the whole range is unallocated (a hole).
fn plan_read(shift: u32, map: &ClusterMap, offset: u64, buf: &mut [u8]) -> (Runs, bool) {
    let mut runs = Runs::new();
    for (cluster, within, pos, n) in pieces(offset, buf.len() as u64, shift) {
        let (pos, n) = (pos as usize, n as usize);
        match map.get(cluster) {
            ZERO => buf[pos..pos + n].fill(0),
            entry => push_run(&mut runs, shift, entry - 1, within, pos, n),
        }
    }
    let hole = runs.is_empty();
    (runs, hole)
}

fn read_runs(slots: &SlotFile, runs: &[Run], buf: &mut [u8]) -> Result<()> {
    runs.iter().try_for_each(|r| slots.read(r.slot, r.within, &mut buf[r.pos..r.pos + r.len]))
}

fn write_runs(slots: &SlotFile, runs: &[Run], data: &[u8]) -> Result<()> {
    runs.iter().try_for_each(|r| slots.write(r.slot, r.within, &data[r.pos..r.pos + r.len]))
}

/// Reads through `map`; returns true when the whole range is unallocated (a hole).
#[cfg(test)]
pub(crate) fn read_map(slots: &SlotFile, map: &ClusterMap, offset: u64, buf: &mut [u8]) -> Result<bool> {
    let (runs, hole) = plan_read(shift_of(slots), map, offset, buf);
    read_runs(slots, &runs, buf).map(|()| hole)
}

/// One cluster of a write redirected to a fresh slot (see `VolumeHandle::plan_redirect`).
struct Redirect {
    cluster: u64,
    /// The entry the cluster had when the write was planned.
    old: u64,
    slot: u64,
    within: u64,
    pos: usize,
    len: usize,
    /// Partial write over existing data: the rest of the old cluster is copied too.
    copy: bool,
}

/// What a write or zero must wait for before it is tried again.
enum Wait {
    /// Partly covered clusters still in the object store.
    Load,
    /// The volume's newest snapshot to be sealed (a gate epoch): in-place writes from before
    /// it may still be landing in the clusters this request copies.
    Seal(u64),
    /// Nothing: a cluster changed while the request copied it; try again at once.
    Again,
}

/// Extents over `[offset, offset + len)` with `flags(cluster)`, merged, covering at most
/// `STATUS_MAX_CLUSTERS` clusters.
fn status(offset: u64, len: u64, shift: u32, mut flags: impl FnMut(u64) -> u32) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for (i, (cluster, _, _, n)) in pieces(offset, len, shift).enumerate() {
        if i as u64 >= STATUS_MAX_CLUSTERS {
            break;
        }
        let f = flags(cluster);
        match out.last_mut() {
            Some(last) if last.flags == f => last.length += n,
            _ => out.push(Extent { length: n, flags: f }),
        }
    }
    out
}

fn allocation_flags(entry: u64) -> u32 {
    if entry == ZERO {
        STATE_HOLE | STATE_ZERO
    } else {
        0
    }
}

fn check_range(size: u64, offset: u64, len: u64, write: bool) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ if write => Err(EngineError::NoSpace(format!(
            "request at offset {offset} length {len} ends past the end of the volume ({size} bytes)"
        ))),
        _ => Err(EngineError::Invalid(format!(
            "request at offset {offset} length {len} ends past the end of the volume ({size} bytes)"
        ))),
    }
}

/// Pending clusters of `remote` in `[offset, offset + len)`: every one (`edges_only` false),
/// or only those the range covers partly (what a write must load first).
fn pending_in(remote: &Option<Remote>, offset: u64, len: u64, shift: u32, size: u64, edges_only: bool) -> Vec<u64> {
    let Some(r) = remote else { return Vec::new() };
    if len == 0 {
        return Vec::new();
    }
    let cs = 1u64 << shift;
    let partial = |c: u64| {
        let start = c * cs;
        let end = (start + cs).min(size);
        offset > start || offset + len < end
    };
    if edges_only {
        // Only the first and the last cluster can be covered partly (a trim can be huge).
        let (first, last) = (offset >> shift, (offset + len - 1) >> shift);
        let mut v: Vec<u64> = [first, last].into_iter().filter(|&c| partial(c) && r.is_pending(c)).collect();
        v.dedup();
        return v;
    }
    pieces(offset, len, shift).map(|(c, ..)| c).filter(|&c| r.is_pending(c)).collect()
}

fn not_loaded(what: &str) -> EngineError {
    EngineError::Unavailable(format!("{what}: its data kept changing while it was loaded from the store; try again"))
}

/// How long a request waits for a snapshot to be sealed (for writes in flight to end).
pub(crate) const SEAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Blocks until the slot file's gate has passed `epoch` (a snapshot's seal); fails after
/// `SEAL_TIMEOUT`.
pub(crate) fn wait_for_seal(vol: &Volume, epoch: u64) -> Result<()> {
    if vol.slots.gate.wait(epoch, SEAL_TIMEOUT) {
        return Ok(());
    }
    Err(seal_timeout(&vol.name))
}

pub(crate) fn seal_timeout(volume: &str) -> EngineError {
    EngineError::Unavailable(format!(
        "writes to volume '{volume}' that were in flight when its newest snapshot was taken have not ended after {}s (is the disk under the data directory hung?); try again",
        SEAL_TIMEOUT.as_secs()
    ))
}

/// The runs of a write the head takes in place (every cluster owned and dirty already), or
/// `None`.
fn plan_in_place(st: &VolumeState, shift: u32, offset: u64, len: u64) -> Option<Runs> {
    let mut runs = Runs::new();
    for (cluster, within, pos, n) in pieces(offset, len, shift) {
        let entry = st.head.get(cluster);
        if entry == ZERO || !st.owned.contains(cluster) || !st.dirty.contains(cluster) {
            return None;
        }
        push_run(&mut runs, shift, entry - 1, within, pos as usize, n as usize);
    }
    Some(runs)
}

/// A read-write handle on a volume. Counts as a writable client while it exists.
pub struct VolumeHandle {
    engine: Arc<Engine>,
    vol: Arc<Volume>,
    ticket: Ticket,
    /// Where the next sequential read would start (read-ahead on hydrating volumes).
    next_read: AtomicU64,
}

impl Drop for VolumeHandle {
    fn drop(&mut self) {
        self.vol.writers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl VolumeHandle {
    pub(crate) fn new(engine: Arc<Engine>, vol: Arc<Volume>) -> VolumeHandle {
        vol.writers.fetch_add(1, Ordering::AcqRel);
        let ticket = vol.revoker.ticket();
        VolumeHandle { engine, vol, ticket, next_read: AtomicU64::new(u64::MAX) }
    }

    pub fn name(&self) -> &str {
        &self.vol.name
    }

    pub fn size(&self) -> u64 {
        self.vol.size
    }

    pub fn cluster_size(&self) -> u32 {
        self.vol.cluster_size
    }

    /// The volume's I/O counters, for the front ends to count requests in.
    pub fn io(&self) -> &IoStats {
        &self.vol.io
    }

    /// Resolves when this handle is revoked (volume deleted, forced rollback, shutdown).
    pub async fn revoked(&self) {
        self.ticket.revoked().await
    }

    /// Checked under the state lock: after a revoke followed by taking the write lock, no old
    /// handle changes the map. (I/O looked up before may still end, into slots the gate keeps
    /// from reuse meanwhile.)
    fn live(&self) -> Result<()> {
        if self.ticket.is_revoked() {
            return Err(EngineError::Gone(format!(
                "volume '{}' was disconnected (rolled back, deleted or shut down)",
                self.vol.name
            )));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`; returns true when the range is a hole. Blocks
    /// while clusters still in the store are loaded.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        if let Some((hole, _)) = self.try_read(offset, buf)? {
            return Ok(hole);
        }
        self.engine.block_on(self.read_async(offset, buf))
    }

    /// `read`, awaiting the load of pending clusters instead of blocking.
    pub async fn read_async(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let len = buf.len() as u64;
        for _ in 0..LOAD_ATTEMPTS {
            if let Some((hole, loading)) = self.try_read(offset, buf)? {
                if loading {
                    self.readahead(offset, len);
                }
                return Ok(hole);
            }
            self.load(offset, len, false, Priority::Foreground).await?;
        }
        Err(not_loaded(&format!("reading volume '{}'", self.vol.name)))
    }

    /// Reads, or returns `None` (having read nothing) when the range has pending clusters.
    /// Returns whether the range was a hole, and whether the volume is still loading.
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<Option<(bool, bool)>> {
        check_range(self.vol.size, offset, buf.len() as u64, false)?;
        let (runs, hole, loading, _pass) = {
            let st = self.vol.state.read();
            let pass = self.vol.slots.gate.enter();
            self.live()?;
            let loading = st.remote.is_some();
            if loading && !self.pending(&st, offset, buf.len() as u64, false).is_empty() {
                return Ok(None);
            }
            let (runs, hole) = plan_read(shift_of(&self.vol.slots), &st.head, offset, buf);
            (runs, hole, loading, pass)
        };
        read_runs(&self.vol.slots, &runs, buf)?;
        Ok(Some((hole, loading)))
    }

    fn pending(&self, st: &VolumeState, offset: u64, len: u64, edges_only: bool) -> Vec<u64> {
        pending_in(&st.remote, offset, len, shift_of(&self.vol.slots), self.vol.size, edges_only)
    }

    /// Loads the pending clusters of a range from the store (for a write: only those it
    /// covers partly). Nothing to do on a volume that is all local.
    pub async fn load(&self, offset: u64, len: u64, write: bool, priority: Priority) -> Result<()> {
        check_range(self.vol.size, offset, len, false)?;
        let (source, clusters) = {
            let st = self.vol.state.read();
            let Some(r) = &st.remote else { return Ok(()) };
            (r.source.clone(), self.pending(&st, offset, len, write))
        };
        self.engine.load_clusters(&self.vol, &source, clusters, priority).await
    }

    /// After a sequential read of a hydrating volume, prefetches what follows it.
    fn readahead(&self, offset: u64, len: u64) {
        let end = offset + len;
        let sequential = self.next_read.swap(end, Ordering::Relaxed) == offset;
        if !sequential || end >= self.vol.size {
            return;
        }
        let Some(src) = self.engine.cluster_source() else { return };
        let ahead = src.readahead_bytes().min(self.vol.size - end);
        let (source, clusters) = {
            let st = self.vol.state.read();
            let Some(r) = &st.remote else { return };
            (r.source.clone(), self.pending(&st, end, ahead, false))
        };
        if clusters.is_empty() {
            return;
        }
        let (engine, vol) = (self.engine.clone(), self.vol.clone());
        src.runtime().spawn(async move {
            if let Err(e) = engine.load_clusters(&vol, &source, clusters, Priority::ReadAhead).await {
                tracing::debug!(volume = %vol.name, error = %e, "read-ahead failed");
            }
        });
    }

    /// Writes `data` at `offset`. Blocks while partly covered clusters still in the store are
    /// loaded.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.retry(fua, || self.try_write(offset, data), || self.write_async(offset, data, fua))
    }

    /// `write`, awaiting the load of partly covered pending clusters instead of blocking.
    pub async fn write_async(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let what = || format!("writing volume '{}'", self.vol.name);
        self.retry_async(fua, offset, data.len() as u64, what, || self.try_write(offset, data)).await
    }

    /// Runs `attempt` until done, waiting for what it asks for; a load runs `load` instead
    /// (the async variant, blocked on).
    fn retry<F: std::future::Future<Output = Result<()>>>(
        &self,
        fua: bool,
        mut attempt: impl FnMut() -> Result<Option<Wait>>,
        load: impl FnOnce() -> F,
    ) -> Result<()> {
        loop {
            match attempt()? {
                None => return if fua { self.engine.commit() } else { Ok(()) },
                Some(Wait::Seal(epoch)) => wait_for_seal(&self.vol, epoch)?,
                Some(Wait::Again) => {}
                Some(Wait::Load) => return self.engine.block_on(load()),
            }
        }
    }

    async fn retry_async(
        &self,
        fua: bool,
        offset: u64,
        len: u64,
        what: impl Fn() -> String,
        mut attempt: impl FnMut() -> Result<Option<Wait>>,
    ) -> Result<()> {
        let mut loads = 0;
        loop {
            match attempt()? {
                None => return if fua { self.commit_async().await } else { Ok(()) },
                Some(Wait::Seal(epoch)) => self.vol.slots.gate.wait_async(epoch).await,
                Some(Wait::Again) => {}
                Some(Wait::Load) if loads == LOAD_ATTEMPTS => return Err(not_loaded(&what())),
                Some(Wait::Load) => {
                    loads += 1;
                    self.load(offset, len, true, Priority::Foreground).await?;
                }
            }
        }
    }

    /// Writes, or returns what to wait for first (having written nothing).
    fn try_write(&self, offset: u64, data: &[u8]) -> Result<Option<Wait>> {
        check_range(self.vol.size, offset, data.len() as u64, true)?;
        self.engine.check_writable()?;
        let shift = shift_of(&self.vol.slots);
        let (plan, seal, _pass) = {
            let st = self.vol.state.read();
            let pass = self.vol.slots.gate.enter();
            self.live()?;
            // Fast path: the head owns every cluster and they are dirty already.
            if let Some(runs) = plan_in_place(&st, shift, offset, data.len() as u64) {
                drop(st);
                write_runs(&self.vol.slots, &runs, data)?;
                return Ok(None);
            }
            if st.remote.is_some() && !self.pending(&st, offset, data.len() as u64, true).is_empty() {
                return Ok(Some(Wait::Load));
            }
            match self.plan_redirect(&st, offset, data.len() as u64) {
                Ok(Some(plan)) => (plan, st.seal, pass),
                Ok(None) => {
                    // Some clusters owned, some not: all under the exclusive lock.
                    drop((st, pass));
                    return self.write_exclusive(offset, data);
                }
                Err(wait) => return Ok(Some(wait)),
            }
        };
        self.redirect(plan, seal, data)
    }

    /// Plans a write in which no cluster is owned-and-dirty: a fresh slot for each. `None`
    /// when some are (they must be written in place); `Err` when a copy must wait for a seal.
    fn plan_redirect(
        &self,
        st: &VolumeState,
        offset: u64,
        len: u64,
    ) -> std::result::Result<Option<SmallVec<[Redirect; 2]>>, Wait> {
        let slots = &self.vol.slots;
        let mut plan: SmallVec<[Redirect; 2]> = SmallVec::new();
        for (cluster, within, pos, n) in pieces(offset, len, shift_of(slots)) {
            let old = st.head.get(cluster);
            if old != ZERO && st.owned.contains(cluster) && st.dirty.contains(cluster) {
                self.abandon(&plan);
                return Ok(None);
            }
            let copy = old != ZERO && n < self.cluster_len(cluster);
            if copy && !slots.gate.passed(st.seal) {
                self.abandon(&plan);
                return Err(Wait::Seal(st.seal));
            }
            plan.push(Redirect {
                cluster,
                old,
                slot: slots.allocate(),
                within,
                pos: pos as usize,
                len: n as usize,
                copy,
            });
        }
        Ok(Some(plan))
    }

    /// Writes a planned redirect into its fresh slots without the lock, then installs it
    /// under the exclusive lock if no cluster changed meanwhile.
    fn redirect(&self, plan: SmallVec<[Redirect; 2]>, seal: u64, data: &[u8]) -> Result<Option<Wait>> {
        if let Err(e) = self.redirect_fill(&plan, data) {
            self.abandon(&plan);
            return Err(e);
        }
        self.redirect_install(plan, seal)
    }

    fn redirect_fill(&self, plan: &[Redirect], data: &[u8]) -> Result<()> {
        plan.iter().try_for_each(|r| self.fill(r, &data[r.pos..r.pos + r.len]))
    }

    /// The fresh slots of a redirect that is not installed go back (never referenced).
    fn abandon(&self, plan: &[Redirect]) {
        plan.iter().for_each(|r| self.vol.slots.release(r.slot));
    }

    /// Installs a filled redirect, or drops it and asks to be tried again when a cluster
    /// changed since it was planned.
    fn redirect_install(&self, plan: SmallVec<[Redirect; 2]>, seal: u64) -> Result<Option<Wait>> {
        let mut st = self.vol.state.write();
        if let Err(e) = self.live() {
            self.abandon(&plan);
            return Err(e);
        }
        // Changed meanwhile: another write installed its own copy, a trim or load changed the
        // entry, a snapshot was taken, or the head regained ownership (and then may have been
        // written in place, which this copy would undo).
        let changed = st.seal != seal
            || plan.iter().any(|r| {
                st.head.get(r.cluster) != r.old
                    || (st.owned.contains(r.cluster) && st.dirty.contains(r.cluster))
                    || (r.copy && st.is_pending(r.cluster))
            });
        if changed {
            self.abandon(&plan);
            return Ok(Some(Wait::Again));
        }
        for r in &plan {
            self.install(&mut st, r.cluster, r.old, r.slot);
        }
        Ok(None)
    }

    /// Writes `piece` into a redirect's fresh slot; with `copy`, merged into the old cluster.
    fn fill(&self, r: &Redirect, piece: &[u8]) -> Result<()> {
        let slots = &self.vol.slots;
        if !r.copy {
            // A fresh slot reads as zeros, so the rest of a new cluster needs no writing.
            return slots.write(r.slot, r.within, piece);
        }
        // One buffer per thread, reused: every 4 KiB write after a snapshot comes here.
        thread_local!(static MERGED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
        MERGED.with_borrow_mut(|merged| {
            let len = self.cluster_len(r.cluster) as usize;
            merged.resize(len, 0);
            let merged = &mut merged[..len];
            slots.read(r.old - 1, 0, merged)?;
            merged[r.within as usize..r.within as usize + piece.len()].copy_from_slice(piece);
            slots.write(r.slot, 0, merged)
        })
    }

    /// Points `cluster` (entry `old`) at its new `slot`; frees the old slot if the head owned it.
    fn install(&self, st: &mut VolumeState, cluster: u64, old: u64, slot: u64) {
        let owned = old != ZERO && st.owned.contains(cluster);
        self.set_entry(st, cluster, slot + 1);
        st.owned.insert(cluster);
        // After the record: a commit that frees the old slot has drained the record.
        if owned {
            self.vol.slots.release(old - 1);
        }
    }

    /// A write that mixes clusters to write in place with clusters to redirect, whole under
    /// the exclusive lock (rare: the edges of a large write over partly rewritten data).
    fn write_exclusive(&self, offset: u64, data: &[u8]) -> Result<Option<Wait>> {
        let mut st = self.vol.state.write();
        self.live()?;
        if st.remote.is_some() && !self.pending(&st, offset, data.len() as u64, true).is_empty() {
            return Ok(Some(Wait::Load));
        }
        if !self.vol.slots.gate.passed(st.seal) {
            return Ok(Some(Wait::Seal(st.seal)));
        }
        self.write_locked(&mut st, offset, data)?;
        Ok(None)
    }

    /// Bytes of `cluster` inside the volume (the last cluster may be short).
    fn cluster_len(&self, cluster: u64) -> u64 {
        let cs = self.vol.cluster_size as u64;
        cs.min(self.vol.size - cluster * cs)
    }

    /// Writes under the exclusive lock, the volume's newest snapshot sealed: owned-and-dirty
    /// clusters in place, the others redirected to a fresh slot (a partial write first copies
    /// the rest of the old cluster).
    ///
    /// A cluster the head owns but that is clean (ownership regained when a snapshot was
    /// deleted or released, or recomputed at startup) is redirected too, and its old slot
    /// freed: writing it in place would change data the durable dirty bitmap says is
    /// unchanged, and after a crash an incremental upload would miss it.
    fn write_locked(&self, st: &mut VolumeState, offset: u64, data: &[u8]) -> Result<()> {
        let slots = &self.vol.slots;
        for (cluster, within, pos, n) in pieces(offset, data.len() as u64, shift_of(slots)) {
            let piece = &data[pos as usize..(pos + n) as usize];
            let old = st.head.get(cluster);
            if old != ZERO && st.owned.contains(cluster) && st.dirty.contains(cluster) {
                slots.write(old - 1, within, piece)?;
                continue;
            }
            let copy = old != ZERO && n < self.cluster_len(cluster);
            let r = Redirect { cluster, old, slot: slots.allocate(), within, pos: pos as usize, len: n as usize, copy };
            if let Err(e) = self.fill(&r, piece) {
                slots.release(r.slot);
                return Err(e);
            }
            self.install(st, cluster, old, r.slot);
        }
        Ok(())
    }

    /// Records a map change for the journal (pushed under the exclusive state lock, so in
    /// order), then applies it.
    fn set_entry(&self, st: &mut VolumeState, cluster: u64, entry: u64) -> u64 {
        Record::MapSet { volume: self.vol.id, cluster, entry }.encode(&mut self.vol.pending.lock());
        st.set_entry(cluster, entry)
    }

    /// TRIM and WRITE_ZEROES. Whole clusters are unmapped (`Unmap`) or overwritten with zeros
    /// (`Allocate`); partial clusters get zeros written unless already unmapped. Every cluster
    /// the request touches becomes dirty (one range record, however large the range).
    pub fn zero(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        self.retry(fua, || self.try_zero(offset, len, mode), || self.zero_async(offset, len, mode, fua))
    }

    /// `zero`, awaiting the load of partly covered pending clusters instead of blocking.
    pub async fn zero_async(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        let what = || format!("zeroing part of volume '{}'", self.vol.name);
        self.retry_async(fua, offset, len, what, || self.try_zero(offset, len, mode)).await
    }

    /// Zeroes, or returns what to wait for first (having changed nothing). All under the
    /// exclusive lock.
    fn try_zero(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<Option<Wait>> {
        check_range(self.vol.size, offset, len, true)?;
        self.engine.check_writable()?;
        {
            let mut st = self.vol.state.write();
            self.live()?;
            if st.remote.is_some() && !self.pending(&st, offset, len, true).is_empty() {
                return Ok(Some(Wait::Load));
            }
            // The partial clusters may be copied (`write_locked`).
            if !self.vol.slots.gate.passed(st.seal) {
                return Ok(Some(Wait::Seal(st.seal)));
            }
            let slots = &self.vol.slots;
            let shift = shift_of(slots);
            let end = offset + len;
            // Whole clusters [first, last): the volume's short last cluster counts as whole.
            let first = offset.div_ceil(1 << shift);
            let last = if end == self.vol.size { end.div_ceil(1 << shift) } else { end >> shift };
            let whole = if mode == ZeroMode::Unmap && first < last { (first, last) } else { (0, 0) };
            let touched = (offset >> shift, (end - 1) >> shift);
            Record::DirtyRange { volume: self.vol.id, start: touched.0, end: touched.1 + 1 }
                .encode(&mut self.vol.pending.lock());
            // Everything else gets zeros written: partial clusters at either end (unless they
            // are unmapped already), or the whole range with `Allocate`.
            let edges = if whole.0 < whole.1 {
                [(offset, (first << shift) - offset), (last << shift, end.saturating_sub(last << shift))]
            } else {
                [(offset, len), (end, 0)]
            };
            for (start, n) in edges {
                for (cluster, _, pos, n) in pieces(start, n, shift) {
                    if mode == ZeroMode::Unmap && st.head.get(cluster) == ZERO {
                        continue;
                    }
                    self.write_locked(&mut st, start + pos, &zeros()[..n as usize])?;
                }
            }
            // Whole clusters are unmapped; walking only the mapped ones keeps a discard of a
            // huge, mostly empty range cheap.
            if whole.0 < whole.1 {
                // Whole clusters still in the store need no loading: they are zeros now.
                if st.remote.is_some() {
                    Record::LoadedRange { volume: self.vol.id, start: whole.0, end: whole.1 }
                        .encode(&mut self.vol.pending.lock());
                    st.mark_loaded(whole.0..whole.1);
                }
                let mut mapped = Vec::new();
                st.head.for_each_nonzero_in(whole.0, whole.1, |c, e| mapped.push((c, e)));
                for (cluster, entry) in mapped {
                    let owned = st.owned.remove(cluster);
                    self.set_entry(&mut st, cluster, ZERO);
                    // After the record: a commit that frees the slot has drained the record.
                    if owned {
                        slots.release(entry - 1);
                    }
                }
            }
            // Only now: the edges above must see clean clusters as clean (see `write_locked`).
            st.dirty.insert_range(touched.0..=touched.1);
        }
        Ok(None)
    }

    /// FLUSH: every acknowledged write (of every volume) becomes durable.
    pub fn flush(&self) -> Result<()> {
        self.live()?;
        self.engine.commit()
    }

    /// `flush` for async callers.
    pub async fn flush_async(&self) -> Result<()> {
        self.live()?;
        self.commit_async().await
    }

    /// A commit from async code (FLUSH, FUA). It waits for the disk, so on a multi-threaded
    /// runtime the worker hands its other tasks (other connections) to another thread
    /// meanwhile instead of stalling them.
    async fn commit_async(&self) -> Result<()> {
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| self.engine.commit()),
            _ => self.engine.commit(),
        }
    }

    /// `base:allocation` extents from `offset` (a prefix of the range may be returned).
    /// Clusters still in the store count as data: they may hold some.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.vol.size, offset, len, false)?;
        let st = self.vol.state.read();
        Ok(status(offset, len, shift_of(&self.vol.slots), |c| {
            if st.is_pending(c) {
                0
            } else {
                allocation_flags(st.head.get(c))
            }
        }))
    }

    /// `allocation`, with clusters still in the store described by the store (from the
    /// source snapshot's map pages): a volume still loading reports the source's holes as
    /// holes, not as data.
    pub async fn allocation_async(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.vol.size, offset, len, false)?;
        let shift = shift_of(&self.vol.slots);
        let (first, end) = (offset >> shift, (offset + len).div_ceil(1 << shift));
        let source = {
            let st = self.vol.state.read();
            match st.remote.as_ref() {
                Some(r) if count_in(&r.loaded, first, end) < end - first => r.source.clone(),
                _ => return self.allocation(offset, len),
            }
        };
        let src = self.engine.cluster_source().ok_or_else(super::no_store)?;
        let runs = src.data_runs(&source, first, end).await?;
        let Some(known_end) = runs.last().map(|r| r.1.min(end)) else { return self.allocation(offset, len) };
        let len = ((known_end << shift).min(offset + len) - offset).max(1);
        let in_store = |c: u64| {
            let i = runs.partition_point(|r| r.1 <= c);
            runs.get(i).is_none_or(|r| r.2)
        };
        // Loaded meanwhile or not, each cluster is answered from what the volume says now.
        let st = self.vol.state.read();
        Ok(status(offset, len, shift, |c| match st.is_pending(c) {
            true if in_store(c) => 0,
            true => STATE_HOLE | STATE_ZERO,
            false => allocation_flags(st.head.get(c)),
        }))
    }

    /// The live dirty bitmap: clusters written, trimmed or zeroed since the last snapshot.
    pub fn dirty(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.vol.size, offset, len, false)?;
        let st = self.vol.state.read();
        Ok(status(offset, len, shift_of(&self.vol.slots), |c| if st.dirty.contains(c) { STATE_DIRTY } else { 0 }))
    }

    /// The volume's snapshots, oldest first: `(id, name)` (each a dirty bitmap to compare
    /// the live volume with, `changed_since_snapshot`).
    pub fn snapshots(&self) -> Vec<(u64, String)> {
        self.engine.snapshots_of(self.vol.id)
    }

    /// Clusters that may have changed since snapshot `base` (an id from `snapshots`), live.
    pub fn changed_since_snapshot(&self, base: u64, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.vol.size, offset, len, false)?;
        let changed = self.engine.changed_between(base, Target::Head(self.vol.id));
        Ok(status(offset, len, shift_of(&self.vol.slots), |c| dirty_flag(&changed, c)))
    }
}

/// A read-only handle on a snapshot.
pub struct SnapshotHandle {
    engine: Arc<Engine>,
    vol: Arc<Volume>,
    snap: Arc<Snapshot>,
    /// Its local map (empty once released).
    map: ClusterMap,
    /// Its clusters still in the store: those it took while its volume was loading, or all of
    /// them once its local data was released after upload.
    remote: Option<Remote>,
    /// Older snapshots of the same volume, oldest first: one dirty bitmap each.
    bases: Vec<Arc<Snapshot>>,
    ticket: Ticket,
}

impl SnapshotHandle {
    pub(crate) fn new(
        engine: Arc<Engine>,
        vol: Arc<Volume>,
        snap: Arc<Snapshot>,
        remote: Option<Remote>,
        bases: Vec<Arc<Snapshot>>,
    ) -> SnapshotHandle {
        let ticket = snap.revoker.ticket();
        let map = snap.map().cloned().unwrap_or_else(|| ClusterMap::new(snap.size.div_ceil(snap.cluster_size as u64)));
        SnapshotHandle { engine, vol, snap, map, remote, bases, ticket }
    }

    pub fn name(&self) -> String {
        format!("{}@{}", self.vol.name, self.snap.name)
    }

    pub fn description(&self) -> &str {
        &self.snap.description
    }

    pub fn size(&self) -> u64 {
        self.snap.size
    }

    pub fn cluster_size(&self) -> u32 {
        self.snap.cluster_size
    }

    /// The I/O counters of the snapshot's volume (reads of snapshots count there).
    pub fn io(&self) -> &IoStats {
        &self.vol.io
    }

    /// Names of the older snapshots this one can be compared with (`qemu:dirty-bitmap:NAME`).
    pub fn base_names(&self) -> impl Iterator<Item = &str> {
        self.bases.iter().map(|b| b.name.as_str())
    }

    pub async fn revoked(&self) {
        self.ticket.revoked().await
    }

    /// Reads local data; fails (never zeros) on clusters still in the store — see
    /// `read_async`, which fetches them. Blocks while the snapshot is not sealed yet.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        check_range(self.snap.size, offset, buf.len() as u64, false)?;
        if !self.pending(offset, buf.len() as u64).is_empty() {
            return Err(EngineError::Unavailable(format!(
                "snapshot '{}' has data that is not loaded from the object store yet",
                self.name()
            )));
        }
        self.snap.wait_sealed(&self.vol)?;
        self.read_local(offset, buf)
    }

    /// Reads the snapshot's own map (the caller made sure it is sealed). No volume lock: the
    /// map never changes, and the pass keeps its slots from being reused if the snapshot is
    /// deleted meanwhile.
    fn read_local(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let _pass = self.vol.slots.gate.enter();
        if self.ticket.is_revoked() {
            return Err(EngineError::Gone(format!("snapshot '{}' was deleted", self.name())));
        }
        let (runs, hole) = plan_read(shift_of(&self.vol.slots), &self.map, offset, buf);
        read_runs(&self.vol.slots, &runs, buf).map(|()| hole)
    }

    fn pending(&self, offset: u64, len: u64) -> Vec<u64> {
        pending_in(&self.remote, offset, len, shift_of(&self.vol.slots), self.snap.size, false)
    }

    /// Reads; clusters the snapshot took while still in the store are fetched from it (a
    /// snapshot never changes, so they are not stored locally).
    pub async fn read_async(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        check_range(self.snap.size, offset, buf.len() as u64, false)?;
        self.snap.wait_sealed_async(&self.vol).await;
        let pending = self.pending(offset, buf.len() as u64);
        let Some(remote) = self.remote.as_ref().filter(|_| !pending.is_empty()) else {
            return self.read_local(offset, buf);
        };
        let src = self.engine.cluster_source().ok_or_else(super::no_store)?;
        let shift = shift_of(&self.vol.slots);
        let fetched =
            futures::future::try_join_all(pending.iter().map(|&c| src.fetch(&remote.source, c, Priority::Foreground)))
                .await?;
        let mut hole = true;
        let mut fetched = pending.iter().zip(fetched).peekable();
        for (cluster, within, pos, n) in pieces(offset, buf.len() as u64, shift) {
            let out = &mut buf[pos as usize..(pos + n) as usize];
            match fetched.next_if(|(c, _)| **c == cluster) {
                Some((_, Some(data))) => {
                    let src = data.get(within as usize..(within + n) as usize).ok_or_else(|| {
                        EngineError::Corrupt(format!("cluster {cluster} from {} is short", remote.source))
                    })?;
                    out.copy_from_slice(src);
                    hole = false;
                }
                Some((_, None)) => out.fill(0),
                None => hole &= self.read_local(offset + pos, out)?,
            }
        }
        Ok(hole)
    }

    /// Clusters still in the store count as data: they may hold some (see
    /// `allocation_async`, which asks the store).
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.snap.size, offset, len, false)?;
        Ok(status(offset, len, shift_of(&self.vol.slots), |c| {
            if remote::pending(&self.remote, c) {
                0
            } else {
                allocation_flags(self.map.get(c))
            }
        }))
    }

    /// `allocation`, with clusters still in the store described by the store (from the
    /// snapshot's map pages: O(extents) for a released snapshot, however large).
    pub async fn allocation_async(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.snap.size, offset, len, false)?;
        let shift = shift_of(&self.vol.slots);
        let (first, end) = (offset >> shift, (offset + len).div_ceil(1 << shift));
        let Some(remote) = self.remote.as_ref().filter(|r| count_in(&r.loaded, first, end) < end - first) else {
            return self.allocation(offset, len);
        };
        let src = self.engine.cluster_source().ok_or_else(super::no_store)?;
        let runs = src.data_runs(&remote.source, first, end).await?;
        let hole = STATE_HOLE | STATE_ZERO;
        let Some(known_end) = runs.last().map(|r| r.1.min(end)) else { return self.allocation(offset, len) };
        // A prefix of the range, when the store answered for a prefix.
        let len = ((known_end << shift).min(offset + len) - offset).max(1);
        if count_in(&remote.loaded, first, known_end) == 0 {
            // All in the store (a released snapshot): the runs are the answer.
            let mut out = Vec::with_capacity(runs.len());
            for (from, to, data) in runs {
                let (a, b) = ((from << shift).max(offset), (to << shift).min(offset + len));
                if a < b {
                    out.push(Extent { length: b - a, flags: if data { 0 } else { hole } });
                }
            }
            return Ok(out);
        }
        let in_store = |c: u64| {
            let i = runs.partition_point(|r| r.1 <= c);
            runs.get(i).is_none_or(|r| r.2)
        };
        Ok(status(offset, len, shift, |c| {
            if remote.is_pending(c) {
                if in_store(c) {
                    0
                } else {
                    hole
                }
            } else {
                allocation_flags(self.map.get(c))
            }
        }))
    }

    /// Every cluster of the snapshot that maps to stored data, or may (still in the store).
    pub fn allocated_clusters(&self) -> roaring::RoaringTreemap {
        let mut set = roaring::RoaringTreemap::new();
        if let Some(r) = &self.remote {
            set.insert_range(0..self.snap.size.div_ceil(self.snap.cluster_size as u64));
            set -= &*r.loaded;
        }
        self.map.for_each_nonzero(|c, _| {
            set.insert(c);
        });
        set
    }

    /// Clusters that may differ between base snapshot `base` (index into `base_names`) and
    /// this one: the changed sets of their lineages (a dirty bitmap; local or released alike).
    pub fn changed_since(&self, base: usize, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.snap.size, offset, len, false)?;
        let base = self.bases.get(base).ok_or_else(|| EngineError::Invalid("no such base snapshot".into()))?;
        let changed = self.engine.changed_between(base.id, Target::Snapshot(self.snap.id));
        Ok(status(offset, len, shift_of(&self.vol.slots), |c| dirty_flag(&changed, c)))
    }
}

/// Members of `set` in `start..end` (`end > start`).
fn count_in(set: &roaring::RoaringTreemap, start: u64, end: u64) -> u64 {
    set.rank(end - 1) - if start > 0 { set.rank(start - 1) } else { 0 }
}

/// `STATE_DIRTY` when `c` is in `changed` (`None`: everything may have changed).
fn dirty_flag(changed: &Option<roaring::RoaringTreemap>, c: u64) -> u32 {
    if changed.as_ref().is_none_or(|s| s.contains(c)) {
        STATE_DIRTY
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redirect planned while the head shared the cluster, installed after a snapshot delete
    /// gave the head the cluster back and another write changed it in place, must start over
    /// instead of installing its (older) copy of the cluster.
    #[test]
    fn a_redirect_copy_is_dropped_when_the_cluster_was_written_in_place_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        engine.create_volume("v", 1 << 20, Some(65536)).unwrap();
        let h = engine.open_volume("v").unwrap();
        h.write(0, &[1u8; 65536], false).unwrap();
        engine.create_snapshot("v", "s", "").unwrap();

        let (plan, seal) = {
            let st = h.vol.state.read();
            let plan = h.plan_redirect(&st, 0, 4096).ok().flatten().expect("a redirect with a copy");
            (plan, st.seal)
        };
        assert!(plan[0].copy);
        h.redirect_fill(&plan, &[3u8; 4096]).unwrap();
        engine.delete_snapshot("v@s", false).unwrap();
        h.write(8192, &[2u8; 4096], false).unwrap(); // in place: the head owns it again
        assert!(
            matches!(h.redirect_install(plan, seal), Ok(Some(Wait::Again))),
            "the stale copy must not be installed"
        );
        h.write(0, &[3u8; 4096], false).unwrap();

        let mut buf = vec![0u8; 65536];
        h.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 3));
        assert!(buf[4096..8192].iter().all(|&b| b == 1));
        assert!(buf[8192..12288].iter().all(|&b| b == 2), "the in-place write was lost");
        assert!(buf[12288..].iter().all(|&b| b == 1));
    }
}
