//! The volume engine: volumes, redirect-on-write snapshots, dirty bitmaps, local durability.
//!
//! [`Engine`] is the control handle (create, snapshot, rollback, clone, delete); the data path
//! runs on per-connection handles ([`VolumeHandle`], [`SnapshotHandle`], in `volume.rs`) that
//! touch only their own volume's lock. See docs/ARCHITECTURE.md for the flow of each
//! operation and docs/FORMAT.md for the files.
//!
//! Lock order (never taken the other way round): committer → registry → journal tail →
//! volume state → volume pending records. The data path takes only the last two; nobody
//! waits for the committer while holding the registry. (The checkpoint takes volume states
//! before the tail: it holds the registry, so nobody stages meanwhile.)

mod checkpoint;
pub mod error;
mod gate;
pub mod journal;
pub mod map;
pub mod remote;
pub mod slots;
#[cfg(test)]
mod tests;
pub mod types;
mod volume;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use roaring::RoaringTreemap;

pub use error::{EngineError, ErrorKind, Result};
pub use remote::{ClusterSource, Priority, RemoteSource};
pub use types::{HydrationInfo, SnapshotInfo, VolumeInfo};
pub use volume::{Extent, SnapshotHandle, VolumeHandle, ZeroMode, STATE_HOLE, STATE_ZERO};

use checkpoint::{SnapshotImage, State, VolumeImage};
use journal::{Journal, Record};
use map::ClusterMap;
use remote::Remote;
use slots::{Frees, SlotFile};

pub const MIN_CLUSTER_SIZE: u32 = 4096;
pub const MAX_CLUSTER_SIZE: u32 = 1 << 20;
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 << 10;
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// Rotate the journal into a new checkpoint once it is this large.
const CHECKPOINT_AFTER: u64 = 64 << 20;
/// How often dirty slot data is pushed towards the disk in the background.
const WRITEBACK_INTERVAL: Duration = Duration::from_millis(50);
/// How long the write-back thread lets a new snapshot seal before committing anyway.
const SEAL_WAIT_IN_WRITEBACK: Duration = Duration::from_millis(100);
/// Uncommitted journal records held in memory before the background thread commits them.
const PENDING_COMMIT_BYTES: usize = 4 << 20;
/// Clusters one request (or read-ahead) fetches from the store at a time.
const LOAD_CONCURRENCY: usize = 64;
/// How long `rollback --force` waits for disconnected clients to go away.
const FORCE_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Revocation of open handles: a generation bumped on revoke. The data path checks it with
/// one atomic load; the NBD server awaits it to close the connection.
pub(crate) struct Revoker {
    generation: Arc<AtomicU64>,
    wake: tokio::sync::watch::Sender<u64>,
}

#[derive(Clone)]
pub(crate) struct Ticket {
    generation: Arc<AtomicU64>,
    issued: u64,
    wake: tokio::sync::watch::Receiver<u64>,
}

impl Revoker {
    fn new() -> Revoker {
        Revoker { generation: Arc::new(AtomicU64::new(0)), wake: tokio::sync::watch::Sender::new(0) }
    }
    fn ticket(&self) -> Ticket {
        Ticket {
            generation: self.generation.clone(),
            issued: self.generation.load(Ordering::Acquire),
            wake: self.wake.subscribe(),
        }
    }
    fn revoke(&self) {
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.wake.send_replace(g);
    }
}

impl Ticket {
    pub(crate) fn is_revoked(&self) -> bool {
        self.generation.load(Ordering::Acquire) != self.issued
    }
    pub(crate) async fn revoked(&self) {
        let mut rx = self.wake.clone();
        let issued = self.issued;
        // The watch carries the same generation; an Err means the engine is gone: revoked too.
        let _ = rx.wait_for(|g| *g != issued).await;
    }
}

pub(crate) struct Volume {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) cluster_size: u32,
    pub(crate) created: u64,
    pub(crate) origin: Option<u64>,
    pub(crate) slots: Arc<SlotFile>,
    pub(crate) state: RwLock<VolumeState>,
    /// Encoded journal records of data-path map changes, drained at commit. Pushed under the
    /// state write lock, so they are in the order the changes were made.
    pub(crate) pending: Mutex<Vec<u8>>,
    pub(crate) writers: AtomicU64,
    pub(crate) revoker: Revoker,
}

pub(crate) struct VolumeState {
    pub(crate) head: ClusterMap,
    /// Clusters written, trimmed or zeroed since the last snapshot.
    pub(crate) dirty: RoaringTreemap,
    /// Clusters whose slot only the head references: written in place. Everything else is
    /// redirected to a fresh slot on its first write. Recomputed exactly at startup.
    pub(crate) owned: RoaringTreemap,
    /// The snapshot the dirty bitmap is relative to.
    pub(crate) parent: Option<u64>,
    /// Non-zero entries in `head`.
    pub(crate) allocated: u64,
    /// Clusters in the volume.
    pub(crate) clusters: u64,
    /// The head's clusters still in the object store (see `remote.rs`); `None` when all local.
    pub(crate) remote: Option<Remote>,
    /// The remote snapshot the root of this lineage is relative to (set when the volume was
    /// created from, or rolled back to, a snapshot in the store): an upload base.
    pub(crate) anchor: Option<RemoteSource>,
    /// `Snapshot::seal` of the newest snapshot taken of this head: a write that copies a
    /// cluster waits for it (an in-place write from before may still be landing there).
    pub(crate) seal: u64,
}

impl VolumeState {
    /// Applies a map change; the cluster becomes dirty (and is no longer pending). Returns
    /// the previous entry.
    pub(crate) fn set_entry(&mut self, cluster: u64, entry: u64) -> u64 {
        let old = self.set_clean(cluster, entry);
        self.dirty.insert(cluster);
        old
    }

    /// Applies a map change that does not change the content (a hydrated cluster).
    pub(crate) fn set_clean(&mut self, cluster: u64, entry: u64) -> u64 {
        let old = self.head.set(cluster, entry);
        match (old != 0, entry != 0) {
            (false, true) => self.allocated += 1,
            (true, false) => self.allocated -= 1,
            _ => {}
        }
        self.mark_loaded(cluster..cluster + 1);
        old
    }

    /// Clusters of `range` are no longer pending; the remote part goes once nothing is.
    pub(crate) fn mark_loaded(&mut self, range: std::ops::Range<u64>) {
        let Some(r) = self.remote.as_mut() else { return };
        let end = range.end.min(self.clusters);
        if range.start >= end {
            return;
        }
        let loaded = Arc::make_mut(&mut r.loaded);
        if end - range.start == 1 {
            loaded.insert(range.start);
        } else {
            loaded.insert_range(range.start..end);
        }
        if loaded.len() >= self.clusters {
            self.remote = None;
        }
    }

    pub(crate) fn is_pending(&self, cluster: u64) -> bool {
        remote::pending(&self.remote, cluster)
    }
}

pub(crate) struct Snapshot {
    pub(crate) id: u64,
    pub(crate) volume: u64,
    pub(crate) seq: u64,
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) created: u64,
    pub(crate) size: u64,
    pub(crate) cluster_size: u32,
    pub(crate) allocated: u64,
    pub(crate) map: ClusterMap,
    /// Parent and changed set: rewritten when the parent is deleted (its changes fold in).
    pub(crate) lineage: Mutex<Lineage>,
    pub(crate) revoker: Revoker,
    /// The data was released after upload: `map` is empty and reads must go to the store.
    pub(crate) released: bool,
    /// Clusters still in the store when the snapshot was taken of a hydrating volume.
    pub(crate) remote: Option<Remote>,
    /// The commit that makes its record and data durable (0: loaded from disk, durable
    /// already; `UNSEALED` until a commit starts after the seal).
    pub(crate) durable_ticket: AtomicU64,
    /// The gate epoch of its volume's slot file after which it is *sealed*: writes that were
    /// in flight when it was taken, and may still land in slots it shares, have ended. Its
    /// data is read only once sealed (see `gate.rs`). 0: sealed from the start.
    pub(crate) seal: u64,
}

/// A snapshot waiting for its seal, with its volume and the ticket of its record.
struct Unsealed {
    snap: Arc<Snapshot>,
    vol: Arc<Volume>,
    ticket: u64,
}

/// A slot only one head still references after a map was dropped: that head owns it again
/// (may write it in place) once the record that dropped the map is durable. Until then a
/// crash could bring the dropped map (a snapshot) back, and an in-place write would have
/// changed it.
struct Regain {
    vol: Arc<Volume>,
    cluster: u64,
    entry: u64,
    /// The head's `seal` when found: a snapshot taken since shares the slot again.
    seal: u64,
}

impl Regain {
    fn apply(self) {
        let mut st = self.vol.state.write();
        // The data path may have redirected the cluster meanwhile (the old slot then stays
        // allocated until the start-up sweep; rare, and never unsafe).
        if st.seal == self.seal && st.head.get(self.cluster) == self.entry {
            st.owned.insert(self.cluster);
        }
    }
}

/// `Snapshot::durable_ticket` while no commit has started since the seal.
const UNSEALED: u64 = u64::MAX;

impl Snapshot {
    pub(crate) fn is_sealed(&self, vol: &Volume) -> bool {
        vol.slots.gate.passed(self.seal)
    }

    pub(crate) fn wait_sealed(&self, vol: &Volume) -> Result<()> {
        volume::wait_for_seal(vol, self.seal)
    }

    pub(crate) async fn wait_sealed_async(&self, vol: &Volume) {
        vol.slots.gate.wait_async(self.seal).await
    }
}

pub(crate) struct Lineage {
    pub(crate) parent: Option<u64>,
    pub(crate) changed: RoaringTreemap,
    /// The remote snapshot the root of this lineage is relative to (see `VolumeState`).
    pub(crate) anchor: Option<RemoteSource>,
}

#[derive(Default)]
struct Registry {
    volumes: HashMap<u64, Arc<Volume>>,
    snapshots: HashMap<u64, Arc<Snapshot>>,
    slot_files: HashMap<u32, Arc<SlotFile>>,
    next_seq: u64,
}

/// The end of the journal: records staged for the next commit, and the journal file they go
/// to. Held briefly (never across a sync), so a snapshot create never waits behind a commit.
struct Tail {
    journal: Journal,
    staged: Vec<u8>,
    /// Commits that have written the staged records so far: records staged or written now are
    /// covered by the commit numbered `taken + 1`.
    taken: u64,
}

/// A commit between its journal write and its syncs (see `Engine::commit_begin`).
struct Commit {
    frees: Vec<Frees>,
    sealed: Vec<Unsealed>,
    /// The journal offset its records end at, and its number.
    through: u64,
    number: u64,
    journal: Arc<fs::File>,
    /// The slot files whose frees it took (and which it syncs).
    slot_files: Vec<Arc<SlotFile>>,
}

/// A checkpoint between its image and its installation (see `Engine::checkpoint`).
struct CheckpointImage<'a> {
    _committer: parking_lot::MutexGuard<'a, ()>,
    dir: PathBuf,
    generation: u64,
    bytes: Vec<u8>,
}

/// Wakes the write-back thread for a commit now (a snapshot create staged a record).
#[derive(Default)]
struct CommitWanted {
    wanted: Mutex<bool>,
    wake: parking_lot::Condvar,
}

pub struct Engine {
    dir: PathBuf,
    data_dir: PathBuf,
    registry: RwLock<Registry>,
    /// Held for the whole of a commit: commits run one at a time, in order.
    committer: Mutex<()>,
    tail: Mutex<Tail>,
    /// The number of the last commit that completed: records with a ticket up to this are
    /// durable.
    durable_through: AtomicU64,
    commit_wanted: Arc<CommitWanted>,
    /// Snapshots not sealed yet when taken: the first commit that starts once one is sealed
    /// makes it durable.
    unsealed: Mutex<Vec<Unsealed>>,
    /// Set when a commit failed: in-memory state may be ahead of disk, so no more writes.
    failed: AtomicBool,
    shutting_down: AtomicBool,
    /// Fetches clusters of volumes still loading from the object store (set by the daemon).
    cluster_source: OnceLock<Arc<dyn ClusterSource>>,
}

/// What the first snapshot of a lineage is relative to, for incremental uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anchor {
    /// A snapshot in the store the volume was created from or rolled back to.
    Remote(RemoteSource),
    /// The local snapshot the volume was cloned from.
    Origin(u64),
}

pub(crate) fn no_store() -> EngineError {
    EngineError::Unavailable("the object store service is not running (the daemon is starting or stopping)".into())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn volume_id(id: u64) -> String {
    format!("v-{id:016x}")
}

pub fn snapshot_id(id: u64) -> String {
    format!("s-{id:016x}")
}

/// The number in a `v-…` volume id.
pub fn parse_volume_id(r: &str) -> Option<u64> {
    parse_id(r, "v-")
}

/// The number in an `s-…` snapshot id.
pub fn parse_snapshot_id(r: &str) -> Option<u64> {
    parse_id(r, "s-")
}

fn parse_id(r: &str, prefix: &str) -> Option<u64> {
    let hex = r.strip_prefix(prefix)?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !name.starts_with(['.', '-'])
        && parse_id(name, "v-").is_none()
        && parse_id(name, "s-").is_none();
    if ok {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "invalid {what} name '{name}': use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-' and not shaped like an id"
        )))
    }
}

/// Whether a volume of this size and cluster size can exist; the reason when not.
fn check_geometry(size: u64, cluster_size: u32) -> std::result::Result<(), String> {
    if !cluster_size.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size) {
        return Err(format!("invalid cluster size {cluster_size}: use a power of two from 4K to 1M (default 64K)"));
    }
    if size == 0 || size % 4096 != 0 || size > MAX_VOLUME_SIZE {
        return Err(format!("invalid volume size {size}: use a non-zero multiple of 4 KiB up to 64 TiB"));
    }
    Ok(())
}

fn slot_file_path(data_dir: &Path, cluster_size: u32) -> PathBuf {
    data_dir.join(format!("slots-{cluster_size}.dat"))
}

impl Registry {
    fn slot_file(&mut self, data_dir: &Path, cluster_size: u32) -> Result<Arc<SlotFile>> {
        if let Some(f) = self.slot_files.get(&cluster_size) {
            return Ok(f.clone());
        }
        let f = Arc::new(SlotFile::open(&slot_file_path(data_dir, cluster_size), cluster_size)?);
        self.slot_files.insert(cluster_size, f.clone());
        Ok(f)
    }

    fn check_name_free(&self, name: &str) -> Result<()> {
        if self.volumes.values().any(|v| v.name == name) {
            return Err(EngineError::AlreadyExists(format!("a volume named '{name}' already exists")));
        }
        Ok(())
    }

    fn find_volume(&self, r: &str) -> Result<&Arc<Volume>> {
        let found = match parse_id(r, "v-") {
            Some(id) => self.volumes.get(&id),
            None => self.volumes.values().find(|v| v.name == r),
        };
        found.ok_or_else(|| {
            EngineError::NotFound(format!("no volume named '{r}'; list volumes with: snapblk volume list"))
        })
    }

    fn find_snapshot(&self, r: &str) -> Result<&Arc<Snapshot>> {
        if let Some(id) = parse_id(r, "s-") {
            return self.snapshots.get(&id).ok_or_else(|| {
                EngineError::NotFound(format!("no snapshot with id {r}; list them with: snapblk snapshot list"))
            });
        }
        let Some((vol, snap)) = r.split_once('@') else {
            return Err(EngineError::Invalid(format!(
                "'{r}' is not a snapshot reference: use VOLUME@SNAPSHOT or a snapshot id (s-...)"
            )));
        };
        let volume = self.find_volume(vol)?;
        self.snapshots.values().find(|s| s.volume == volume.id && s.name == snap).ok_or_else(|| {
            EngineError::NotFound(format!(
                "volume '{}' has no snapshot named '{snap}'; list them with: snapblk snapshot list {}",
                volume.name, volume.name
            ))
        })
    }

    /// The volume a snapshot was taken of (`r`: how the caller named the snapshot).
    fn volume_of(&self, s: &Snapshot, r: &str) -> Result<Arc<Volume>> {
        self.volumes
            .get(&s.volume)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("the volume of snapshot '{r}' no longer exists")))
    }

    /// Snapshots of a volume, oldest first.
    fn snapshots_of(&self, volume: u64) -> Vec<Arc<Snapshot>> {
        let mut v: Vec<_> = self.snapshots.values().filter(|s| s.volume == volume).cloned().collect();
        v.sort_by_key(|s| s.seq);
        v
    }

    /// Volumes loading clusters from the store copy of snapshot `id`, and snapshots taken
    /// of them while they did (their unloaded clusters come from it too).
    fn store_dependents(&self, id: u64) -> Vec<String> {
        let from = |r: &Option<Remote>| r.as_ref().is_some_and(|rm| rm.source.snapshot == id);
        let mut out: Vec<String> = self
            .volumes
            .values()
            .filter(|v| from(&v.state.read().remote))
            .map(|v| format!("volume {}", v.name))
            .collect();
        out.extend(self.snapshots.values().filter(|s| from(&s.remote)).map(|s| {
            let vol = self.volumes.get(&s.volume).map_or("?", |v| v.name.as_str());
            format!("snapshot {vol}@{}", s.name)
        }));
        out.sort();
        out
    }

    fn new_id(&self) -> u64 {
        loop {
            let id: u64 = rand::random();
            if id != 0 && !self.volumes.contains_key(&id) && !self.snapshots.contains_key(&id) {
                return id;
            }
        }
    }

    /// Applies a record (live or during replay). Returns the map this dropped, if any, so live
    /// callers can release its slots. Live callers pass `staged`: the volume's earlier
    /// data-path records are moved there under the same state lock that applies `rec`, so in
    /// the journal they precede it exactly as they did in memory.
    fn apply(
        &mut self,
        rec: &Record,
        data_dir: &Path,
        mut staged: Option<&mut Vec<u8>>,
    ) -> Result<Option<(ClusterMap, u32)>> {
        let mut drain = |v: &Volume| {
            if let Some(out) = staged.as_deref_mut() {
                let mut p = v.pending.lock();
                out.extend_from_slice(&p);
                p.clear();
            }
        };
        let missing = |what: &str, id: u64| {
            EngineError::Corrupt(format!(
                "journal refers to unknown {what} {id:016x}; the metadata is damaged, restore the daemon directory from a backup"
            ))
        };
        match rec {
            Record::MapSet { volume, cluster, entry } => {
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?;
                v.state.write().set_entry(*cluster, *entry);
                Ok(None)
            }
            Record::DirtyRange { volume, start, end } => {
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?;
                v.state.write().dirty.insert_range(*start..*end);
                Ok(None)
            }
            Record::VolumeCreate { volume, name, size, cluster_size, created, origin } => {
                let slots = self.slot_file(data_dir, *cluster_size)?;
                let clusters = size.div_ceil(*cluster_size as u64);
                let (head, allocated, remote) = match origin {
                    Some(s) => {
                        let snap = self.snapshots.get(s).ok_or_else(|| missing("snapshot", *s))?;
                        (snap.map.clone(), snap.allocated, snap.remote.clone())
                    }
                    None => (ClusterMap::new(clusters), 0, None),
                };
                let vol = Volume {
                    id: *volume,
                    name: name.clone(),
                    size: *size,
                    cluster_size: *cluster_size,
                    created: *created,
                    origin: *origin,
                    slots,
                    state: RwLock::new(VolumeState {
                        head,
                        dirty: RoaringTreemap::new(),
                        owned: RoaringTreemap::new(),
                        parent: None,
                        allocated,
                        clusters,
                        remote,
                        anchor: None,
                        seal: 0,
                    }),
                    pending: Mutex::new(Vec::new()),
                    writers: AtomicU64::new(0),
                    revoker: Revoker::new(),
                };
                self.volumes.insert(*volume, Arc::new(vol));
                Ok(None)
            }
            Record::VolumeDelete { volume } => {
                let v = self.volumes.remove(volume).ok_or_else(|| missing("volume", *volume))?;
                v.revoker.revoke();
                let st = v.state.write();
                drain(&v);
                let head = st.head.clone();
                Ok(Some((head, v.cluster_size)))
            }
            Record::SnapshotCreate { volume, snapshot, seq, name, description, created } => {
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?;
                let mut st = v.state.write();
                // Writes looked up before this point may still be landing in slots the
                // snapshot shares: it is sealed once they have ended.
                let seal = v.slots.gate.advance().ok_or_else(|| {
                    EngineError::Busy(format!(
                        "writes to volume '{}' have been in flight for too long (is the disk under the data directory hung?); try again",
                        v.name
                    ))
                })?;
                drain(v);
                let snap = Snapshot {
                    id: *snapshot,
                    volume: *volume,
                    seq: *seq,
                    name: name.clone(),
                    description: description.clone(),
                    created: *created,
                    size: v.size,
                    cluster_size: v.cluster_size,
                    allocated: st.allocated,
                    map: st.head.clone(),
                    lineage: Mutex::new(Lineage {
                        parent: st.parent,
                        changed: std::mem::take(&mut st.dirty),
                        anchor: st.anchor.clone(),
                    }),
                    revoker: Revoker::new(),
                    released: false,
                    remote: st.remote.clone(),
                    durable_ticket: AtomicU64::new(0),
                    seal,
                };
                st.owned.clear();
                st.seal = seal;
                st.parent = Some(*snapshot);
                drop(st);
                self.next_seq = self.next_seq.max(seq + 1);
                self.snapshots.insert(*snapshot, Arc::new(snap));
                Ok(None)
            }
            Record::SnapshotDelete { snapshot } => {
                let s = self.snapshots.remove(snapshot).ok_or_else(|| missing("snapshot", *snapshot))?;
                s.revoker.revoke();
                let (parent, changed) = {
                    let l = s.lineage.lock();
                    (l.parent, l.changed.clone())
                };
                // Whatever was relative to the deleted snapshot is now relative to its parent.
                for other in self.snapshots.values() {
                    let mut l = other.lineage.lock();
                    if l.parent == Some(*snapshot) {
                        l.parent = parent;
                        l.changed |= &changed;
                    }
                }
                for v in self.volumes.values() {
                    let mut st = v.state.write();
                    if st.parent == Some(*snapshot) {
                        st.parent = parent;
                        st.dirty |= &changed;
                    }
                }
                Ok(Some((s.map.clone(), s.cluster_size)))
            }
            Record::SnapshotRelease { snapshot } => {
                let s = self.snapshots.get(snapshot).ok_or_else(|| missing("snapshot", *snapshot))?;
                s.revoker.revoke();
                let lineage = {
                    let l = s.lineage.lock();
                    Lineage { parent: l.parent, changed: l.changed.clone(), anchor: l.anchor.clone() }
                };
                let released = Snapshot {
                    id: s.id,
                    volume: s.volume,
                    seq: s.seq,
                    name: s.name.clone(),
                    description: s.description.clone(),
                    created: s.created,
                    size: s.size,
                    cluster_size: s.cluster_size,
                    allocated: s.allocated,
                    map: ClusterMap::new(s.size.div_ceil(s.cluster_size.max(1) as u64)),
                    lineage: Mutex::new(lineage),
                    revoker: Revoker::new(),
                    released: true,
                    remote: None,
                    durable_ticket: AtomicU64::new(0),
                    seal: 0,
                };
                let old = self.snapshots.insert(*snapshot, Arc::new(released));
                Ok(old.map(|o| (o.map.clone(), o.cluster_size)))
            }
            Record::Rollback { volume, snapshot } => {
                let s = self.snapshots.get(snapshot).ok_or_else(|| missing("snapshot", *snapshot))?;
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?;
                let mut st = v.state.write();
                drain(v);
                let old = std::mem::replace(&mut st.head, s.map.clone());
                st.dirty.clear();
                st.owned.clear();
                st.parent = Some(*snapshot);
                st.allocated = s.allocated;
                st.remote = s.remote.clone();
                st.anchor = s.lineage.lock().anchor.clone();
                Ok(Some((old, v.cluster_size)))
            }
            Record::RemoteHead { volume, parent, region, snapshot } => {
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?;
                let source = RemoteSource { region: region.clone(), snapshot: *snapshot };
                // Rolling back to a released snapshot keeps its lineage's anchor; a volume
                // created from a remote snapshot is anchored at it.
                let anchor = match parent {
                    Some(p) => {
                        self.snapshots.get(p).ok_or_else(|| missing("snapshot", *p))?.lineage.lock().anchor.clone()
                    }
                    None => Some(source.clone()),
                };
                let mut st = v.state.write();
                drain(v);
                let fresh = ClusterMap::new(st.clusters);
                let old = std::mem::replace(&mut st.head, fresh);
                st.dirty.clear();
                st.owned.clear();
                st.parent = *parent;
                st.allocated = 0;
                st.remote = Some(Remote::new(source));
                st.anchor = anchor;
                Ok(Some((old, v.cluster_size)))
            }
            Record::Hydrate { volume, cluster, entry } => {
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?;
                let mut st = v.state.write();
                st.set_clean(*cluster, *entry);
                if *entry != 0 {
                    st.owned.insert(*cluster);
                }
                Ok(None)
            }
            Record::LoadedRange { volume, start, end } => {
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?;
                v.state.write().mark_loaded(*start..*end);
                Ok(None)
            }
        }
    }

    /// Slots referenced by any snapshot map of this cluster size (shared nodes visited once).
    fn snapshot_slots(&self, cluster_size: u32) -> RoaringTreemap {
        let mut live = RoaringTreemap::new();
        let mut seen = std::collections::HashSet::new();
        for s in self.snapshots.values().filter(|s| s.cluster_size == cluster_size) {
            s.map.for_each_distinct_leaf(&mut seen, |_, e| {
                live.insert(e - 1);
            });
        }
        live
    }

    /// Heads of all volumes of this cluster size (O(1) clones taken under each read lock).
    fn heads(&self, cluster_size: u32) -> Vec<(Arc<Volume>, ClusterMap)> {
        self.volumes
            .values()
            .filter(|v| v.cluster_size == cluster_size)
            .map(|v| (v.clone(), v.state.read().head.clone()))
            .collect()
    }

    /// After a map was dropped (snapshot delete, release, rollback, volume delete), under the
    /// registry lock that applied the record dropping it (and after that record was staged):
    /// releases the slots no map references any more. They are punched and reused only after
    /// the commit that takes them, and every commit writes every record staged or pending
    /// before it takes its frees (`Engine::commit_begin`), so the record is durable first.
    ///
    /// Returns the slots a single head is now the only holder of: the head may write them in
    /// place again, but only once the record is durable (see `Regain`).
    fn release_dropped(&self, dropped: &ClusterMap, cluster_size: u32) -> Vec<Regain> {
        let Some(slots) = self.slot_files.get(&cluster_size) else { return Vec::new() };
        let in_snapshots = self.snapshot_slots(cluster_size);
        let heads = self.heads(cluster_size);
        let mut regained = Vec::new();
        dropped.for_each_nonzero(|cluster, entry| {
            if in_snapshots.contains(entry - 1) {
                return;
            }
            let mut holders = heads.iter().filter(|(_, h)| h.get(cluster) == entry);
            match (holders.next(), holders.next()) {
                (None, _) => slots.release(entry - 1),
                (Some((vol, _)), None) => {
                    regained.push(Regain { vol: vol.clone(), cluster, entry, seal: vol.state.read().seal })
                }
                _ => {}
            }
        });
        regained
    }

    /// Startup: exact ownership for every head and the free list of every slot file.
    fn recompute_ownership_and_free_slots(&self) -> Result<()> {
        for (&cluster_size, slots) in &self.slot_files {
            let mut live = self.snapshot_slots(cluster_size);
            let heads = self.heads(cluster_size);
            let (mut in_heads, mut shared) = (RoaringTreemap::new(), RoaringTreemap::new());
            for (_, head) in &heads {
                head.for_each_nonzero(|_, e| {
                    if !in_heads.insert(e - 1) {
                        shared.insert(e - 1);
                    }
                });
            }
            for (vol, head) in &heads {
                let mut st = vol.state.write();
                st.owned.clear();
                head.for_each_nonzero(|c, e| {
                    if !live.contains(e - 1) && !shared.contains(e - 1) {
                        st.owned.insert(c);
                    }
                });
            }
            live |= in_heads;
            let free = slots.reset_free(&live)?;
            tracing::debug!(cluster_size, live = live.len(), free, "slot file swept");
        }
        Ok(())
    }

    /// The state as a checkpoint image; `guards` are the read locks of `volumes`, in order.
    fn image(
        &self,
        generation: u64,
        volumes: &[Arc<Volume>],
        guards: &[parking_lot::RwLockReadGuard<'_, VolumeState>],
    ) -> State {
        let volumes = volumes
            .iter()
            .zip(guards)
            .map(|(v, st)| VolumeImage {
                id: v.id,
                name: v.name.clone(),
                size: v.size,
                cluster_size: v.cluster_size,
                created: v.created,
                origin: v.origin,
                head: st.head.clone(),
                dirty: st.dirty.clone(),
                parent: st.parent,
                allocated: st.allocated,
                remote: st.remote.clone(),
                anchor: st.anchor.clone(),
            })
            .collect();
        let snapshots = self
            .snapshots
            .values()
            .map(|s| {
                let l = s.lineage.lock();
                SnapshotImage {
                    id: s.id,
                    volume: s.volume,
                    seq: s.seq,
                    name: s.name.clone(),
                    description: s.description.clone(),
                    created: s.created,
                    allocated: s.allocated,
                    map: s.map.clone(),
                    parent: l.parent,
                    changed: l.changed.clone(),
                    released: s.released,
                    remote: s.remote.clone(),
                    anchor: l.anchor.clone(),
                }
            })
            .collect();
        State { generation, next_seq: self.next_seq, volumes, snapshots }
    }

    fn from_image(state: State, data_dir: &Path) -> Result<Registry> {
        let mut reg = Registry { next_seq: state.next_seq, ..Default::default() };
        // Snapshots first: a cloned volume is created from its origin's map in replay, but
        // from a checkpoint it has its own head, so order only matters for lookups.
        for s in state.snapshots {
            reg.snapshots.insert(
                s.id,
                Arc::new(Snapshot {
                    id: s.id,
                    volume: s.volume,
                    seq: s.seq,
                    name: s.name,
                    description: s.description,
                    created: s.created,
                    size: 0,
                    cluster_size: 0,
                    allocated: s.allocated,
                    map: s.map,
                    lineage: Mutex::new(Lineage { parent: s.parent, changed: s.changed, anchor: s.anchor }),
                    revoker: Revoker::new(),
                    released: s.released,
                    remote: s.remote,
                    durable_ticket: AtomicU64::new(0),
                    seal: 0,
                }),
            );
        }
        for v in state.volumes {
            let slots = reg.slot_file(data_dir, v.cluster_size)?;
            reg.volumes.insert(
                v.id,
                Arc::new(Volume {
                    id: v.id,
                    name: v.name,
                    size: v.size,
                    cluster_size: v.cluster_size,
                    created: v.created,
                    origin: v.origin,
                    slots,
                    state: RwLock::new(VolumeState {
                        head: v.head,
                        dirty: v.dirty,
                        owned: RoaringTreemap::new(),
                        parent: v.parent,
                        allocated: v.allocated,
                        clusters: v.size.div_ceil(v.cluster_size as u64),
                        remote: v.remote,
                        anchor: v.anchor,
                        seal: 0,
                    }),
                    pending: Mutex::new(Vec::new()),
                    writers: AtomicU64::new(0),
                    revoker: Revoker::new(),
                }),
            );
        }
        // Snapshot size and cluster size come from their volume.
        let snapshots = std::mem::take(&mut reg.snapshots);
        for (id, s) in snapshots {
            let v = reg.volumes.get(&s.volume).ok_or_else(|| {
                EngineError::Corrupt(format!(
                    "checkpoint has snapshot {} of a missing volume; restore the daemon directory from a backup",
                    snapshot_id(id)
                ))
            })?;
            let mut s =
                Arc::into_inner(s).ok_or_else(|| EngineError::Corrupt("snapshot shared while loading".into()))?;
            s.size = v.size;
            s.cluster_size = v.cluster_size;
            reg.snapshots.insert(id, Arc::new(s));
        }
        Ok(reg)
    }
}

impl Engine {
    /// Opens (or initializes) the engine in `dir`: loads the checkpoint, replays the journal,
    /// sweeps unreferenced slots, and compacts the journal into a fresh checkpoint.
    pub fn open(dir: &Path) -> Result<Arc<Engine>> {
        Engine::open_as(dir, journal::boot_id())
    }

    /// `open` as if the machine's boot id were `boot` (tests simulate a power loss with
    /// another one).
    pub(crate) fn open_as(dir: &Path, boot: journal::BootId) -> Result<Arc<Engine>> {
        let meta = dir.join("meta");
        let data_dir = dir.join("data");
        for d in [&meta, &data_dir] {
            fs::create_dir_all(d).map_err(EngineError::io(format!("creating {}", d.display())))?;
        }
        let ckpt_path = meta.join("checkpoint");
        let state = match fs::read(&ckpt_path) {
            Ok(bytes) => checkpoint::decode(&bytes, &ckpt_path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                State { generation: 0, next_seq: 1, volumes: vec![], snapshots: vec![] }
            }
            Err(e) => return Err(EngineError::io(format!("reading {}", ckpt_path.display()))(e)),
        };
        let generation = state.generation;
        journal::remove_stale_journals(&meta, generation);
        let (journal, records) = Journal::open(&meta, generation, boot)?;
        let mut reg = Registry::from_image(state, &data_dir)?;
        // Slot files of cluster sizes no volume uses any more are swept (emptied) too.
        if let Ok(entries) = fs::read_dir(&data_dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let size = name.to_str().and_then(|n| n.strip_prefix("slots-")?.strip_suffix(".dat")?.parse().ok());
                if let Some(cs) = size {
                    reg.slot_file(&data_dir, cs)?;
                }
            }
        }
        let replayed = records.len();
        for rec in &records {
            reg.apply(rec, &data_dir, None)?;
        }
        reg.recompute_ownership_and_free_slots()?;
        // Records kept from a killed process may point at data it never synced: sync it
        // before the checkpoint below makes those records final.
        for f in reg.slot_files.values() {
            f.sync_all_written()?;
        }
        tracing::info!(
            volumes = reg.volumes.len(),
            snapshots = reg.snapshots.len(),
            replayed,
            generation,
            "engine opened"
        );
        let engine = Engine {
            dir: dir.to_path_buf(),
            data_dir,
            registry: RwLock::new(reg),
            committer: Mutex::new(()),
            tail: Mutex::new(Tail { journal, staged: Vec::new(), taken: 0 }),
            durable_through: AtomicU64::new(0),
            commit_wanted: Arc::default(),
            unsealed: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            cluster_source: OnceLock::new(),
        };
        if replayed > 0 {
            engine.checkpoint()?;
        }
        let engine = Arc::new(engine);
        Engine::spawn_writeback(Arc::downgrade(&engine), engine.commit_wanted.clone());
        Ok(engine)
    }

    /// Every `WRITEBACK_INTERVAL`, starts write-back of the slot files written since, so dirty
    /// data does not pile up between flushes (which would make a FLUSH wait for all of it),
    /// and commits when uncommitted records pass `PENDING_COMMIT_BYTES` or a snapshot create
    /// asks for it (`request_commit`), or a snapshot waits for a commit after its seal. Also
    /// frees slots whose last requests have ended. Ends when the engine is dropped or shut
    /// down.
    fn spawn_writeback(engine: std::sync::Weak<Engine>, wanted: Arc<CommitWanted>) {
        let spawned = std::thread::Builder::new().name("snapblk-writeback".into()).spawn(move || loop {
            let requested = {
                let mut w = wanted.wanted.lock();
                if !*w {
                    wanted.wake.wait_for(&mut w, WRITEBACK_INTERVAL);
                }
                std::mem::take(&mut *w)
            };
            let Some(e) = engine.upgrade() else { return };
            if e.shutting_down.load(Ordering::Acquire) {
                return;
            }
            let (files, pending) = {
                let reg = e.registry.read();
                let pending: usize = reg.volumes.values().map(|v| v.pending.lock().len()).sum();
                (reg.slot_files.values().cloned().collect::<Vec<_>>(), pending)
            };
            // A snapshot create asked for this commit: let it seal first (writes in flight
            // when it was taken end within milliseconds), so this commit makes it durable.
            let unsealed: Vec<_> = e.unsealed.lock().iter().map(|u| (u.snap.seal, u.vol.slots.clone())).collect();
            for (seal, slots) in &unsealed {
                slots.gate.wait(*seal, SEAL_WAIT_IN_WRITEBACK);
            }
            // Map changes not yet committed are held in memory; past a bound, commit them
            // (committing early is always safe, and it keeps replay after a crash short).
            if requested || pending > PENDING_COMMIT_BYTES || !unsealed.is_empty() {
                if let Err(err) = e.commit() {
                    tracing::warn!(error = %err, "background commit failed");
                }
            }
            drop(e);
            for f in files {
                f.start_writeback();
                // Frees left waiting for requests that were still running at their commit.
                if let Err(err) = f.reclaim() {
                    tracing::warn!(error = %err, "cannot free slots");
                }
            }
        });
        if let Err(err) = spawned {
            tracing::warn!(error = %err, "cannot start the write-back thread; flushes may take longer");
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_writable(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(EngineError::Io {
                context: "snapblk stopped accepting changes after a metadata write failed; check the disk and restart the daemon".into(),
                source: std::io::Error::other("earlier commit failed"),
            });
        }
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(EngineError::Gone("the daemon is shutting down".into()));
        }
        Ok(())
    }

    /// Makes every acknowledged write and every map change durable: slot data first, then the
    /// journal records that point at it. FLUSH and FUA end here; it covers all volumes (one
    /// cache for all connections, which is what makes multi-conn safe).
    pub fn commit(&self) -> Result<()> {
        self.check_writable()?;
        self.commit_all()?;
        if self.tail.lock().journal.len > CHECKPOINT_AFTER {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn commit_all(&self) -> Result<()> {
        let _c = self.committer.lock();
        self.commit_locked()
    }

    /// One commit (the caller holds `committer`): writes the staged records and every
    /// volume's data-path records, syncs the slot files, marks the records synced and syncs
    /// the journal. Records written meanwhile (a snapshot create) wait for the next commit.
    fn commit_locked(&self) -> Result<()> {
        let commit = {
            let reg = self.registry.read();
            self.commit_begin(&reg)?
        };
        self.commit_end(commit)
    }

    /// A commit's first half (memory and one journal `pwrite`, under the tail lock): takes the
    /// frees and the sealed snapshots it will settle, and writes the staged records followed by
    /// every volume's data-path records.
    ///
    /// **The one rule that keeps flushed data safe**: a slot is punched (and may be reused)
    /// only by the commit that took it here, and this commit writes every record that was
    /// staged or pending when it took it — whatever operation asked for the commit. Every
    /// path that drops a slot from a map pushes or stages the record first and releases the
    /// slot after (`VolumeHandle::install`, `Registry::release_dropped`), so the record that
    /// stops referencing a slot is always durable before the slot is freed.
    fn commit_begin(&self, reg: &Registry) -> Result<Commit> {
        let slot_files: Vec<_> = reg.slot_files.values().cloned().collect();
        // Frees first: a slot released after this point may have its record drained after
        // the drain below, so it waits for the next commit.
        let frees: Vec<_> = slot_files.iter().map(|f| f.take_pending()).collect();
        // Snapshots sealed by now: the slot sync below covers every write they include.
        let sealed: Vec<_> = {
            let mut u = self.unsealed.lock();
            let (sealed, waiting) = std::mem::take(&mut *u).into_iter().partition(|u| u.snap.is_sealed(&u.vol));
            *u = waiting;
            sealed
        };
        let written = (|| {
            let mut t = self.tail.lock();
            // Every volume, not only those a caller has in mind: records of one volume may
            // be what makes another operation's frees safe (issue 18).
            for v in reg.volumes.values() {
                let mut p = v.pending.lock();
                t.staged.extend_from_slice(&p);
                p.clear();
            }
            t.taken += 1;
            let Tail { journal, staged, taken } = &mut *t;
            let through = journal.write(staged)?;
            staged.clear();
            Ok((through, *taken, journal.file()))
        })();
        match written {
            Ok((through, number, journal)) => Ok(Commit { frees, sealed, through, number, journal, slot_files }),
            Err(e) => Err(self.commit_failed(frees, sealed, &slot_files, e)),
        }
    }

    /// The second half: syncs the slot files, marks the records written by the first half as
    /// synced and syncs the journal; then settles the frees and sealed snapshots.
    fn commit_end(&self, commit: Commit) -> Result<()> {
        let slot_files = &commit.slot_files;
        let synced = (|| {
            // Every record written by `commit_begin` points at data written before it was staged.
            for f in slot_files {
                f.sync()?;
            }
            self.tail.lock().journal.mark_synced(commit.through)?;
            commit.journal.sync_data().map_err(EngineError::io("syncing the journal"))
        })();
        if let Err(e) = synced {
            return Err(self.commit_failed(commit.frees, commit.sealed, slot_files, e));
        }
        for u in commit.sealed {
            u.snap.durable_ticket.store(u.ticket.max(commit.number), Ordering::Release);
        }
        self.durable_through.fetch_max(commit.number, Ordering::AcqRel);
        for (f, slots) in slot_files.iter().zip(commit.frees) {
            f.free_committed(slots)?;
        }
        Ok(())
    }

    /// In-memory state may now be ahead of the disk: no more changes are accepted.
    fn commit_failed(
        &self,
        frees: Vec<Frees>,
        sealed: Vec<Unsealed>,
        slot_files: &[Arc<SlotFile>],
        e: EngineError,
    ) -> EngineError {
        self.unsealed.lock().extend(sealed);
        for (f, slots) in slot_files.iter().zip(frees) {
            f.restore_pending(slots);
        }
        self.failed.store(true, Ordering::Release);
        tracing::error!(error = %e, "commit failed; refusing further changes");
        e
    }

    /// Writes a new checkpoint of the whole state and starts a fresh journal.
    fn checkpoint(&self) -> Result<()> {
        let image = self.image_for_checkpoint()?;
        self.install_checkpoint(image)
    }

    /// The first half of a checkpoint: the image of the state, with the next generation's
    /// journal attached to the tail (frames written from now on go to both journals).
    fn image_for_checkpoint(&self) -> Result<CheckpointImage<'_>> {
        // A commit first, without holding any lock the data path or a snapshot create needs,
        // so the one under those locks below has next to nothing left to sync.
        self.commit_all()?;
        // Held to the end: no commit (and no other checkpoint) runs meanwhile.
        let committer = self.committer.lock();
        let (dir, generation, boot) = {
            let t = self.tail.lock();
            (t.journal.dir().to_path_buf(), t.journal.generation, t.journal.boot())
        };
        let next = Journal::create_next(&dir, generation, boot)?;
        let reg = self.registry.read();
        let volumes: Vec<_> = reg.volumes.values().cloned().collect();
        // Hold every volume's state lock while draining its records and imaging it, so the
        // image is exactly "all records so far"; records written after it (a snapshot create
        // may write one as soon as the registry is free) go to the next journal too.
        // (Volume state before the tail here: no one stages meanwhile, they need the registry
        // exclusively.)
        let guards: Vec<_> = volumes.iter().map(|v| v.state.read()).collect();
        let commit = self.commit_begin(&reg)?;
        self.tail.lock().journal.attach_next(next);
        let image = reg.image(generation + 1, &volumes, &guards);
        // The image shares the maps (O(1) clones): encoding it, and syncing what it points
        // at, need none of the locks.
        drop((guards, reg));
        self.commit_end(commit)?;
        Ok(CheckpointImage {
            _committer: committer,
            dir,
            generation: generation + 1,
            bytes: checkpoint::encode(&image),
        })
    }

    /// The second half, with no lock but the committer's (snapshot creates go on meanwhile):
    /// writes and installs the checkpoint file, then switches to the next journal.
    fn install_checkpoint(&self, image: CheckpointImage<'_>) -> Result<()> {
        Journal::install_checkpoint(&image.dir, &image.bytes)
            .inspect_err(|_| self.failed.store(true, Ordering::Release))?;
        self.tail.lock().journal.switch_to_next();
        tracing::debug!(generation = image.generation, bytes = image.bytes.len(), "checkpoint written");
        Ok(())
    }

    /// Runs a control operation: applies `recs` under the registry lock (after the earlier
    /// data-path records of the volumes they concern) and lets `then` read the result; then
    /// lets the lock go and commits, so other operations (a snapshot create above all) never
    /// wait for this one's disk sync.
    fn run<T>(
        &self,
        mut reg: RwLockWriteGuard<'_, Registry>,
        recs: &[Record],
        then: impl FnOnce(&Registry) -> T,
    ) -> Result<T> {
        let (ticket, dropped) = self.stage(&mut reg, recs, false)?;
        // Under the same registry lock as the records, so no other operation can drop (and
        // free) a slot these maps hold in between.
        let regained: Vec<Regain> =
            dropped.iter().flat_map(|(map, cluster_size)| reg.release_dropped(map, *cluster_size)).collect();
        let out = then(&reg);
        drop(reg);
        self.commit_through(ticket)?;
        regained.into_iter().for_each(Regain::apply);
        Ok(out)
    }

    /// Applies `recs` and stages them (after the earlier data-path records of the volumes
    /// they concern) for the next commit, without waiting for it; with `write`, also writes
    /// everything staged to the journal now (crash-safe once written, power-safe once
    /// committed). Returns the commit number that makes them durable, and the maps they
    /// dropped.
    fn stage(&self, reg: &mut Registry, recs: &[Record], write: bool) -> Result<(u64, Vec<(ClusterMap, u32)>)> {
        self.check_writable()?;
        let mut t = self.tail.lock();
        let mut dropped = Vec::new();
        for rec in recs {
            dropped.extend(reg.apply(rec, &self.data_dir, Some(&mut t.staged))?);
            rec.encode(&mut t.staged);
        }
        if write {
            let Tail { journal, staged, .. } = &mut *t;
            if let Err(e) = journal.write(staged) {
                self.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "journal write failed; refusing further changes");
                return Err(e);
            }
            staged.clear();
        }
        Ok((t.taken + 1, dropped))
    }

    /// Returns once the commit numbered `ticket` (or a later one) has completed, running one
    /// if need be. Other volumes' data-path records wait for their own commit.
    fn commit_through(&self, ticket: u64) -> Result<()> {
        if self.durable_through.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        let _c = self.committer.lock();
        if self.durable_through.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        self.check_writable()?;
        self.commit_locked()
    }

    /// Asks the write-back thread for a commit now.
    fn request_commit(&self) {
        *self.commit_wanted.wanted.lock() = true;
        self.commit_wanted.wake.notify_one();
    }

    pub fn create_volume(&self, name: &str, size: u64, cluster_size: Option<u32>) -> Result<VolumeInfo> {
        validate_name("volume", name)?;
        let cluster_size = cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
        check_geometry(size, cluster_size).map_err(EngineError::Invalid)?;
        let reg = self.registry.write();
        reg.check_name_free(name)?;
        let id = reg.new_id();
        let rec =
            Record::VolumeCreate { volume: id, name: name.into(), size, cluster_size, created: now(), origin: None };
        let info = self.run(reg, &[rec], |reg| volume_info(reg, &reg.volumes[&id]))?;
        tracing::info!(name, size, cluster_size, id = %volume_id(id), "volume created");
        Ok(info)
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let reg = self.registry.read();
        let mut v: Vec<_> = reg.volumes.values().map(|v| volume_info(&reg, v)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn volume(&self, r: &str) -> Result<VolumeInfo> {
        let reg = self.registry.read();
        Ok(volume_info(&reg, reg.find_volume(r)?))
    }

    pub fn delete_volume(&self, r: &str) -> Result<()> {
        let reg = self.registry.write();
        let v = reg.find_volume(r)?.clone();
        let snaps = reg.snapshots_of(v.id);
        if !snaps.is_empty() {
            let names: Vec<_> = snaps.iter().map(|s| format!("{}@{}", v.name, s.name)).collect();
            return Err(EngineError::Busy(format!(
                "volume '{}' still has snapshots ({}); delete them first with: snapblk snapshot delete VOLUME@SNAPSHOT",
                v.name,
                names.join(", ")
            )));
        }
        let writers = v.writers.load(Ordering::Acquire);
        if writers > 0 {
            return Err(EngineError::Busy(format!(
                "volume '{}' has {writers} client(s) connected; disconnect them first",
                v.name
            )));
        }
        self.run(reg, &[Record::VolumeDelete { volume: v.id }], |_| ())?;
        tracing::info!(name = %v.name, "volume deleted");
        Ok(())
    }

    pub fn create_snapshot(&self, volume: &str, name: &str, description: &str) -> Result<SnapshotInfo> {
        validate_name("snapshot", name)?;
        if description.len() > 4096 {
            return Err(EngineError::Invalid("snapshot description is longer than 4096 bytes".into()));
        }
        let mut reg = self.registry.write();
        let v = reg.find_volume(volume)?.clone();
        if reg.snapshots.values().any(|s| s.volume == v.id && s.name == name) {
            return Err(EngineError::AlreadyExists(format!(
                "volume '{}' already has a snapshot named '{name}'",
                v.name
            )));
        }
        let id = reg.new_id();
        let rec = Record::SnapshotCreate {
            volume: v.id,
            snapshot: id,
            seq: reg.next_seq,
            name: name.into(),
            description: description.into(),
            created: now(),
        };
        // Taken now: the point in time is fixed, the snapshot readable, and its record (with
        // the volume's records before it) written to the journal, so it survives the process
        // being killed. It survives a power loss once the next commit, which the write-back
        // thread starts at once, has synced the data. Waiting for that here would make the
        // caller wait for every byte written since the last flush to reach the disk.
        // Writes still in flight into its slots end first ("sealed", usually within
        // milliseconds): its data is read, and made durable, only after that.
        let (ticket, _) = self.stage(&mut reg, &[rec], true)?;
        let snap = &reg.snapshots[&id];
        if snap.is_sealed(&v) {
            snap.durable_ticket.store(ticket, Ordering::Release);
        } else {
            snap.durable_ticket.store(UNSEALED, Ordering::Release);
            self.unsealed.lock().push(Unsealed { snap: snap.clone(), vol: v.clone(), ticket });
        }
        self.request_commit();
        let info = self.snapshot_info(&reg, snap);
        drop(reg);
        tracing::info!(volume = %v.name, name, id = %snapshot_id(id), "snapshot created");
        Ok(info)
    }

    fn snapshot_info(&self, reg: &Registry, s: &Snapshot) -> SnapshotInfo {
        let durable = s.durable_ticket.load(Ordering::Acquire) <= self.durable_through.load(Ordering::Acquire);
        snapshot_info(reg, s, durable)
    }

    /// Returns once the snapshot is durable (sealed, and its record and data committed),
    /// committing if need be.
    pub fn make_durable(&self, r: &str) -> Result<()> {
        let (s, v) = {
            let reg = self.registry.read();
            let s = reg.find_snapshot(r)?.clone();
            let v = reg.volume_of(&s, r)?;
            (s, v)
        };
        s.wait_sealed(&v)?;
        loop {
            match s.durable_ticket.load(Ordering::Acquire) {
                // Sealed: the next commit to start gives it a ticket.
                UNSEALED => self.commit_all()?,
                ticket => return self.commit_through(ticket),
            }
        }
    }

    pub fn list_snapshots(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let reg = self.registry.read();
        let mut snaps: Vec<_> = match volume {
            Some(r) => reg.snapshots_of(reg.find_volume(r)?.id),
            None => reg.snapshots.values().cloned().collect(),
        };
        snaps.sort_by_key(|s| s.seq);
        Ok(snaps.iter().map(|s| self.snapshot_info(&reg, s)).collect())
    }

    pub fn snapshot(&self, r: &str) -> Result<SnapshotInfo> {
        let reg = self.registry.read();
        Ok(self.snapshot_info(&reg, reg.find_snapshot(r)?))
    }

    /// Deletes a snapshot. Volumes (and snapshots of them) that still load clusters from
    /// its copy in the store need that copy, not the local snapshot: the delete is refused
    /// while they exist unless `store_copy_kept` — the caller then keeps the copy in the store
    /// until [`Engine::store_dependents`] is empty.
    pub fn delete_snapshot(&self, r: &str, store_copy_kept: bool) -> Result<()> {
        let reg = self.registry.write();
        let s = reg.find_snapshot(r)?.clone();
        if !store_copy_kept {
            let dependents = reg.store_dependents(s.id);
            if !dependents.is_empty() {
                return Err(EngineError::Busy(format!(
                    "{} still load data from snapshot '{r}'; wait for them (snapblk volume hydrate NAME --wait) or delete them first",
                    dependents.join(", ")
                )));
            }
        }
        // Reads of the snapshot still in flight keep its slots from reuse with their gate pass.
        self.run(reg, &[Record::SnapshotDelete { snapshot: s.id }], |_| ())?;
        tracing::info!(name = %s.name, id = %snapshot_id(s.id), "snapshot deleted");
        Ok(())
    }

    /// What still reads clusters from the store copy of snapshot `id` (`s-…`): volumes
    /// loading from it and snapshots taken of them meanwhile, by name.
    pub fn store_dependents(&self, id: &str) -> Vec<String> {
        match parse_snapshot_id(id) {
            Some(id) => self.registry.read().store_dependents(id),
            None => Vec::new(),
        }
    }

    /// A new volume with the snapshot's content, sharing its data (copy on write). A released
    /// snapshot needs `released_region` (where it was uploaded): the clone then loads its data
    /// from there.
    pub fn clone_snapshot(&self, snap: &str, new_volume: &str, released_region: Option<&str>) -> Result<VolumeInfo> {
        validate_name("volume", new_volume)?;
        // The clone will share the snapshot's slots: writes still landing there end first.
        {
            let reg = self.registry.read();
            let s = reg.find_snapshot(snap)?.clone();
            let v = reg.volume_of(&s, snap)?;
            drop(reg);
            s.wait_sealed(&v)?;
        }
        let reg = self.registry.write();
        let s = reg.find_snapshot(snap)?.clone();
        let remote = remote_of_released(&s, snap, released_region)?;
        reg.check_name_free(new_volume)?;
        let id = reg.new_id();
        let mut recs = vec![Record::VolumeCreate {
            volume: id,
            name: new_volume.into(),
            size: s.size,
            cluster_size: s.cluster_size,
            created: now(),
            origin: Some(s.id),
        }];
        if let Some(source) = remote {
            recs.push(Record::RemoteHead {
                volume: id,
                parent: None,
                region: source.region,
                snapshot: source.snapshot,
            });
        }
        let info = self.run(reg, &recs, |reg| volume_info(reg, &reg.volumes[&id]))?;
        tracing::info!(from = %snapshot_id(s.id), name = new_volume, "volume cloned");
        Ok(info)
    }

    /// A new volume with the content of a snapshot in the object store (uploaded by any node):
    /// usable at once, its data loaded on demand and in the background.
    pub fn create_volume_from_remote(
        &self,
        name: &str,
        size: u64,
        cluster_size: u32,
        source: &RemoteSource,
    ) -> Result<VolumeInfo> {
        validate_name("volume", name)?;
        check_geometry(size, cluster_size)
            .map_err(|e| EngineError::Invalid(format!("snapshot {source} cannot be served by this snapblk: {e}")))?;
        let reg = self.registry.write();
        reg.check_name_free(name)?;
        let id = reg.new_id();
        let recs = [
            Record::VolumeCreate { volume: id, name: name.into(), size, cluster_size, created: now(), origin: None },
            Record::RemoteHead { volume: id, parent: None, region: source.region.clone(), snapshot: source.snapshot },
        ];
        let info = self.run(reg, &recs, |reg| volume_info(reg, &reg.volumes[&id]))?;
        tracing::info!(name, from = %source, id = %volume_id(id), "volume created from a snapshot in the store");
        Ok(info)
    }

    /// Points the volume at a copy-on-write view of one of its snapshots (O(1)). Refused while
    /// writable clients are connected, unless `force`, which disconnects them first.
    /// A released snapshot needs `released_region` (where it was uploaded): the volume then
    /// loads its data from there, usable at once.
    pub async fn rollback(&self, snap: &str, force: bool, released_region: Option<&str>) -> Result<VolumeInfo> {
        let (v, s, remote) = {
            let reg = self.registry.read();
            let s = reg.find_snapshot(snap)?.clone();
            let v = reg.volume_of(&s, snap)?;
            let remote = remote_of_released(&s, snap, released_region)?;
            (v, s, remote)
        };
        // The head will share the snapshot's slots: writes still landing there end first.
        tokio::time::timeout(volume::SEAL_TIMEOUT, s.wait_sealed_async(&v))
            .await
            .map_err(|_| volume::seal_timeout(&v.name))?;
        let writers = v.writers.load(Ordering::Acquire);
        if writers > 0 {
            if !force {
                return Err(EngineError::Busy(format!(
                    "volume '{}' has {writers} writable client(s) connected; disconnect them or pass --force",
                    v.name
                )));
            }
            v.revoker.revoke();
            let deadline = tokio::time::Instant::now() + FORCE_DISCONNECT_TIMEOUT;
            while v.writers.load(Ordering::Acquire) > 0 {
                if tokio::time::Instant::now() > deadline {
                    return Err(EngineError::Busy(format!(
                        "clients of volume '{}' did not disconnect within {}s; try again",
                        v.name,
                        FORCE_DISCONNECT_TIMEOUT.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let reg = self.registry.write();
        if !reg.snapshots.contains_key(&s.id) || !reg.volumes.contains_key(&v.id) {
            return Err(EngineError::NotFound(format!("snapshot '{snap}' was deleted meanwhile")));
        }
        // Handles are opened under the registry read lock, so this count is now stable.
        if v.writers.load(Ordering::Acquire) > 0 {
            return Err(EngineError::Busy(format!(
                "a client connected to volume '{}' while it was being rolled back; try again",
                v.name
            )));
        }
        let rec = match remote {
            Some(src) => Record::RemoteHead { volume: v.id, parent: Some(s.id), region: src.region, snapshot: s.id },
            None => Record::Rollback { volume: v.id, snapshot: s.id },
        };
        let info = self.run(reg, &[rec], |reg| volume_info(reg, &v))?;
        tracing::info!(volume = %v.name, snapshot = %s.name, "volume rolled back");
        Ok(info)
    }

    /// Opens a volume for reading and writing (one per NBD connection).
    pub fn open_volume(self: &Arc<Self>, r: &str) -> Result<VolumeHandle> {
        self.check_writable()?;
        // Counted as a writer before the registry lock is released (see `rollback`).
        let reg = self.registry.read();
        let v = reg.find_volume(r)?.clone();
        Ok(VolumeHandle::new(self.clone(), v))
    }

    /// Opens a snapshot read-only (`VOLUME@SNAP` or an id).
    pub fn open_snapshot(self: &Arc<Self>, r: &str) -> Result<SnapshotHandle> {
        let reg = self.registry.read();
        let s = reg.find_snapshot(r)?.clone();
        check_local(&s, r)?;
        let v = reg.volume_of(&s, r)?;
        // A released base has no local map to compare with.
        let bases = reg.snapshots_of(s.volume).into_iter().filter(|b| b.seq < s.seq && !b.released).collect();
        Ok(SnapshotHandle::new(self.clone(), v, s, bases))
    }

    /// Whether the snapshot's data is local (false once released after upload).
    pub fn snapshot_is_local(&self, r: &str) -> Result<bool> {
        Ok(!self.registry.read().find_snapshot(r)?.released)
    }

    /// The snapshot's changed sets back to the first snapshot of its lineage, newest first:
    /// `(snapshot id, clusters changed relative to the next entry)`. The union of a prefix is
    /// what changed since the snapshot after that prefix.
    pub fn snapshot_lineage(&self, r: &str) -> Result<Vec<(u64, RoaringTreemap)>> {
        let reg = self.registry.read();
        let mut out = Vec::new();
        let mut cur = Some(reg.find_snapshot(r)?.clone());
        while let Some(s) = cur {
            let l = s.lineage.lock();
            out.push((s.id, l.changed.clone()));
            cur = l.parent.and_then(|p| reg.snapshots.get(&p).cloned());
        }
        Ok(out)
    }

    /// Drops the local copy of a snapshot's data (its map; slots nothing else references are
    /// freed). For snapshots whose upload is complete. Returns false, doing nothing, while the
    /// snapshot is in use (an open export or upload holds it, or a newer snapshot's export
    /// lists it as a base): the caller tries again later.
    pub fn release_snapshot(&self, r: &str) -> Result<bool> {
        let reg = self.registry.write();
        let s = reg.find_snapshot(r)?.clone();
        // The registry's reference plus ours; any other is a handle (opened under this lock).
        if s.released || Arc::strong_count(&s) > 2 {
            return Ok(false);
        }
        let id = s.id;
        drop(s);
        self.run(reg, &[Record::SnapshotRelease { snapshot: id }], |_| ())?;
        tracing::info!(snapshot = r, "snapshot data released (now only in the object store)");
        Ok(true)
    }

    /// Names of every export: `VOLUME` and `VOLUME@SNAPSHOT`, with descriptions.
    pub fn export_names(&self) -> Vec<(String, String)> {
        let reg = self.registry.read();
        let mut out = Vec::new();
        let mut vols: Vec<_> = reg.volumes.values().collect();
        vols.sort_by(|a, b| a.name.cmp(&b.name));
        for v in vols {
            out.push((v.name.clone(), format!("volume {} ({})", v.name, volume_id(v.id))));
            for s in reg.snapshots_of(v.id) {
                let desc = if s.description.is_empty() {
                    format!("snapshot {}", snapshot_id(s.id))
                } else {
                    s.description.clone()
                };
                out.push((format!("{}@{}", v.name, s.name), desc));
            }
        }
        out
    }

    /// Installs the store side of hydration (once, at daemon start).
    pub fn set_cluster_source(&self, src: Arc<dyn ClusterSource>) {
        let _ = self.cluster_source.set(src);
    }

    pub(crate) fn cluster_source(&self) -> Option<&Arc<dyn ClusterSource>> {
        self.cluster_source.get()
    }

    /// Runs `f` to completion from synchronous code (a ublk queue thread, or a runtime worker
    /// of a multi-thread runtime, which hands its other tasks to another worker meanwhile).
    pub(crate) fn block_on<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let rt = self.cluster_source().ok_or_else(no_store)?.runtime();
        match tokio::runtime::Handle::try_current() {
            Err(_) => rt.block_on(f),
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| rt.block_on(f))
            }
            Ok(_) => Err(EngineError::Unavailable("cannot wait for the object store on this thread".into())),
        }
    }

    /// Volumes with clusters still in the store: `(volume id, name, source)`.
    pub fn hydrating_volumes(&self) -> Vec<(u64, String, RemoteSource)> {
        let reg = self.registry.read();
        reg.volumes
            .values()
            .filter_map(|v| v.state.read().remote.as_ref().map(|r| (v.id, v.name.clone(), r.source.clone())))
            .collect()
    }

    fn loading_volume(&self, volume: u64, source: &RemoteSource) -> Option<Arc<Volume>> {
        let v = self.registry.read().volumes.get(&volume).cloned()?;
        let loading = v.state.read().remote.as_ref().is_some_and(|r| r.source == *source);
        loading.then_some(v)
    }

    /// The clusters of `range` (about a map page: each is looked up) still pending on a volume
    /// loading from `source`; `None` when the volume is gone or no longer loads from it
    /// (deleted, rolled back, or done).
    pub fn pending_clusters(
        &self,
        volume: u64,
        source: &RemoteSource,
        range: std::ops::Range<u64>,
    ) -> Option<Vec<u64>> {
        let v = self.loading_volume(volume, source)?;
        let st = v.state.read();
        let r = st.remote.as_ref()?;
        Some((range.start..range.end.min(st.clusters)).filter(|&c| r.is_pending(c)).collect())
    }

    /// How many clusters of a volume loading from `source` are still pending (`None` as above).
    pub fn pending_count(&self, volume: u64, source: &RemoteSource) -> Option<u64> {
        let v = self.loading_volume(volume, source)?;
        let st = v.state.read();
        st.remote.as_ref().map(|r| st.clusters - r.loaded.len())
    }

    /// Loads clusters of `source` (fetched by the caller) into a volume; `None` data is a hole.
    /// Clusters no longer pending (written meanwhile, loaded by another request) are skipped.
    /// Returns how many were installed.
    pub fn install_clusters(
        &self,
        volume: u64,
        source: &RemoteSource,
        items: &[(u64, Option<&[u8]>)],
    ) -> Result<usize> {
        match self.loading_volume(volume, source) {
            Some(v) => self.install(&v, source, items),
            None => Ok(0),
        }
    }

    /// Marks holes of the source (clusters it has no data for) as loaded.
    pub fn install_holes(&self, volume: u64, source: &RemoteSource, ranges: &[std::ops::Range<u64>]) -> Result<()> {
        self.check_writable()?;
        let Some(v) = self.loading_volume(volume, source) else { return Ok(()) };
        let mut st = v.state.write();
        if st.remote.as_ref().is_none_or(|r| r.source != *source) {
            return Ok(());
        }
        let mut p = v.pending.lock();
        for r in ranges {
            Record::LoadedRange { volume, start: r.start, end: r.end }.encode(&mut p);
            st.mark_loaded(r.clone());
        }
        Ok(())
    }

    fn install(&self, vol: &Volume, source: &RemoteSource, items: &[(u64, Option<&[u8]>)]) -> Result<usize> {
        self.check_writable()?;
        let cs = vol.cluster_size as u64;
        let still_pending: Vec<&(u64, Option<&[u8]>)> = {
            let st = vol.state.read();
            let same = st.remote.as_ref().is_some_and(|r| r.source == *source);
            items.iter().filter(|(c, _)| same && st.is_pending(*c)).collect()
        };
        // Data goes to fresh slots before the lock is taken; only the map update is under it.
        let mut staged = Vec::with_capacity(still_pending.len());
        for &&(c, data) in &still_pending {
            let Some(data) = data else {
                staged.push((c, 0));
                continue;
            };
            let want = cs.min(vol.size - c * cs);
            if data.len() as u64 != want {
                for &(_, e) in &staged {
                    if e != 0 {
                        vol.slots.release(e - 1);
                    }
                }
                return Err(EngineError::Corrupt(format!(
                    "cluster {c} of {source} has {} bytes, expected {want}",
                    data.len()
                )));
            }
            let slot = vol.slots.allocate();
            if let Err(e) = vol.slots.write(slot, 0, data) {
                vol.slots.release(slot);
                return Err(e);
            }
            staged.push((c, slot + 1));
        }
        let mut installed = 0;
        let mut st = vol.state.write();
        let same = st.remote.as_ref().is_some_and(|r| r.source == *source);
        let mut p = vol.pending.lock();
        for (c, entry) in staged {
            if same && st.is_pending(c) {
                Record::Hydrate { volume: vol.id, cluster: c, entry }.encode(&mut p);
                st.set_clean(c, entry);
                if entry != 0 {
                    st.owned.insert(c);
                }
                installed += 1;
            } else if entry != 0 {
                vol.slots.release(entry - 1);
            }
        }
        Ok(installed)
    }

    /// Fetches clusters of `source` (all at once, sharing fetches with other requests) and
    /// installs each as it arrives.
    pub(crate) async fn load_clusters(
        &self,
        vol: &Volume,
        source: &RemoteSource,
        clusters: Vec<u64>,
        priority: Priority,
    ) -> Result<()> {
        use futures::stream::StreamExt;
        if clusters.is_empty() {
            return Ok(());
        }
        let src = self.cluster_source().ok_or_else(no_store)?;
        let mut fetches = futures::stream::iter(clusters)
            .map(|c| {
                let f = src.fetch(source, c, priority);
                async move { (c, f.await) }
            })
            .buffer_unordered(LOAD_CONCURRENCY);
        while let Some((c, data)) = fetches.next().await {
            let data = data?;
            self.install(vol, source, &[(c, data.as_deref())])?;
        }
        Ok(())
    }

    /// What the first snapshot in `r`'s lineage is relative to, if anything (see [`Anchor`]).
    pub fn lineage_anchor(&self, r: &str) -> Result<Option<Anchor>> {
        let reg = self.registry.read();
        let s = reg.find_snapshot(r)?;
        if let Some(a) = s.lineage.lock().anchor.clone() {
            return Ok(Some(Anchor::Remote(a)));
        }
        Ok(reg.volumes.get(&s.volume).and_then(|v| v.origin).map(Anchor::Origin))
    }

    /// Flushes, writes a final checkpoint and revokes every open handle (connections close).
    pub fn shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let reg = self.registry.read();
            for v in reg.volumes.values() {
                v.revoker.revoke();
            }
            for s in reg.snapshots.values() {
                s.revoker.revoke();
            }
        }
        if !self.failed.load(Ordering::Acquire) {
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "final checkpoint failed; the journal will be replayed at the next start");
            }
        }
    }
}

fn check_local(s: &Snapshot, r: &str) -> Result<()> {
    if s.released {
        return Err(EngineError::NotLocal(format!(
            "the data of snapshot '{r}' was released after its upload; read it over NBD as VOLUME@SNAPSHOT, or restore it with: snapblk volume create NAME --from-snapshot {r}"
        )));
    }
    Ok(())
}

/// For a released snapshot, where its data is loaded from (its upload region must be known).
fn remote_of_released(s: &Snapshot, r: &str, region: Option<&str>) -> Result<Option<RemoteSource>> {
    match (s.released, region) {
        (false, _) => Ok(None),
        (true, Some(region)) => Ok(Some(RemoteSource { region: region.to_string(), snapshot: s.id })),
        (true, None) => Err(EngineError::NotLocal(format!(
            "the data of snapshot '{r}' is only in the object store, and its region is unknown"
        ))),
    }
}

fn volume_info(reg: &Registry, v: &Volume) -> VolumeInfo {
    let st = v.state.read();
    let origin = v.origin.map(|o| match reg.snapshots.get(&o) {
        Some(s) => {
            let vol = reg.volumes.get(&s.volume).map_or("?", |v| v.name.as_str());
            format!("{vol}@{}", s.name)
        }
        None => format!("{} (deleted)", snapshot_id(o)),
    });
    VolumeInfo {
        id: volume_id(v.id),
        name: v.name.clone(),
        size: v.size,
        cluster_size: v.cluster_size,
        created: v.created,
        allocated_bytes: st.allocated * v.cluster_size as u64,
        dirty_clusters: st.dirty.len(),
        dirty_bitmap_bytes: st.dirty.serialized_size() as u64,
        snapshots: reg.snapshots.values().filter(|s| s.volume == v.id).count() as u64,
        origin,
        writers: v.writers.load(Ordering::Acquire),
        hydration: st.remote.as_ref().map(|r| HydrationInfo {
            source: snapshot_id(r.source.snapshot),
            region: r.source.region.clone(),
            clusters_total: st.clusters,
            clusters_loaded: r.loaded.len(),
        }),
    }
}

fn snapshot_info(reg: &Registry, s: &Snapshot, durable: bool) -> SnapshotInfo {
    let l = s.lineage.lock();
    let volume = reg.volumes.get(&s.volume).map_or_else(String::new, |v| v.name.clone());
    let mut clones: Vec<_> = reg.volumes.values().filter(|v| v.origin == Some(s.id)).map(|v| v.name.clone()).collect();
    clones.sort();
    SnapshotInfo {
        id: snapshot_id(s.id),
        name: s.name.clone(),
        volume,
        volume_id: volume_id(s.volume),
        description: s.description.clone(),
        created: s.created,
        size: s.size,
        cluster_size: s.cluster_size,
        changed_clusters: l.changed.len(),
        parent: l.parent.map(snapshot_id),
        clones,
        allocated_bytes: s.allocated * s.cluster_size as u64,
        local: !s.released,
        durable,
    }
}
