//! The registry: every volume and snapshot in memory, and `Registry::apply`, the one state
//! transition for journal records — run live (under the registry lock, by `Engine::stage`)
//! and at recovery (replaying the journal over the checkpoint). Also what a dropped map frees
//! (`release_dropped`), start-up ownership, and the checkpoint image.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use roaring::RoaringTreemap;
use smallvec::SmallVec;

use super::checkpoint::{SnapshotImage, State, VolumeImage};
use super::commit::Regain;
use super::error::{EngineError, Result};
use super::ids::{check_geometry, parse_id, snapshot_id, volume_id};
use super::iostats::IoStats;
use super::journal::Record;
use super::map::ClusterMap;
use super::remote::{self, Remote, RemoteSource};
use super::revoke::Revoker;
use super::slots::SlotFile;
use super::types::{GroupTag, HydrationInfo, SnapshotInfo, VolumeInfo};
use super::volume;

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
    /// Requests of the front ends, counted on the data path (see `iostats.rs`).
    pub(crate) io: IoStats,
}

/// What a volume is, fixed when it is created (a journal record or a checkpoint entry).
pub(crate) struct VolumeMeta {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) cluster_size: u32,
    pub(crate) created: u64,
    pub(crate) origin: Option<u64>,
}

impl Volume {
    /// A volume with this head state, no writers and no pending records.
    pub(crate) fn new(meta: VolumeMeta, slots: Arc<SlotFile>, state: VolumeState) -> Volume {
        let VolumeMeta { id, name, size, cluster_size, created, origin } = meta;
        Volume {
            id,
            name,
            size,
            cluster_size,
            created,
            origin,
            slots,
            state: RwLock::new(state),
            pending: Mutex::new(Vec::new()),
            writers: AtomicU64::new(0),
            revoker: Revoker::new(),
            io: IoStats::default(),
        }
    }
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
    /// A head with this map: nothing dirty or owned yet (ownership is recomputed at start-up),
    /// no parent, not anchored.
    pub(crate) fn new(head: ClusterMap, clusters: u64, allocated: u64, remote: Option<Remote>) -> VolumeState {
        VolumeState {
            head,
            dirty: RoaringTreemap::new(),
            owned: RoaringTreemap::new(),
            parent: None,
            allocated,
            clusters,
            remote,
            anchor: None,
            seal: 0,
        }
    }

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
    /// The group snapshot it was cut in, if any.
    pub(crate) group: Option<GroupTag>,
    /// Parent and changed set: rewritten when the parent is deleted (its changes fold in).
    pub(crate) lineage: Mutex<Lineage>,
    pub(crate) revoker: Revoker,
    pub(crate) data: SnapshotData,
    /// The commit that makes its record and data durable (0: loaded from disk, durable
    /// already; `UNSEALED` until a commit starts after the seal).
    pub(crate) durable_ticket: AtomicU64,
}

/// What a snapshot is, fixed when it is taken.
pub(crate) struct SnapshotMeta {
    pub(crate) id: u64,
    pub(crate) volume: u64,
    pub(crate) seq: u64,
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) created: u64,
    pub(crate) size: u64,
    pub(crate) cluster_size: u32,
    pub(crate) allocated: u64,
    pub(crate) group: Option<GroupTag>,
}

/// Where a snapshot's data is.
pub(crate) enum SnapshotData {
    Local {
        map: ClusterMap,
        /// Clusters still in the store when it was taken of a volume loading from there.
        remote: Option<Remote>,
        /// The gate epoch of its volume's slot file after which it is *sealed*: writes that
        /// were in flight when it was taken, and may still land in slots it shares, have
        /// ended. Its data is read only once sealed (see `gate.rs`). 0: sealed from the start.
        seal: u64,
    },
    /// Released after its upload: only in the store (reads and restores go there).
    Released,
}

impl Snapshot {
    /// A snapshot durable already, unless the caller sets its ticket (see `durable_ticket`).
    pub(crate) fn new(meta: SnapshotMeta, lineage: Lineage, data: SnapshotData) -> Snapshot {
        let SnapshotMeta { id, volume, seq, name, description, created, size, cluster_size, allocated, group } = meta;
        Snapshot {
            id,
            volume,
            seq,
            name,
            description,
            created,
            size,
            cluster_size,
            allocated,
            group,
            lineage: Mutex::new(lineage),
            revoker: Revoker::new(),
            data,
            durable_ticket: AtomicU64::new(0),
        }
    }

    /// Its local map; `None` once released.
    pub(crate) fn map(&self) -> Option<&ClusterMap> {
        match &self.data {
            SnapshotData::Local { map, .. } => Some(map),
            SnapshotData::Released => None,
        }
    }

    pub(crate) fn is_released(&self) -> bool {
        matches!(self.data, SnapshotData::Released)
    }

    /// Clusters it took while its volume was still loading them from the store.
    pub(crate) fn remote(&self) -> Option<&Remote> {
        match &self.data {
            SnapshotData::Local { remote, .. } => remote.as_ref(),
            SnapshotData::Released => None,
        }
    }

    pub(crate) fn seal(&self) -> u64 {
        match self.data {
            SnapshotData::Local { seal, .. } => seal,
            SnapshotData::Released => 0,
        }
    }

    pub(crate) fn is_sealed(&self, vol: &Volume) -> bool {
        vol.slots.gate.passed(self.seal())
    }

    pub(crate) fn wait_sealed(&self, vol: &Volume) -> Result<()> {
        volume::wait_for_seal(vol, self.seal())
    }

    pub(crate) async fn wait_sealed_async(&self, vol: &Volume) {
        vol.slots.gate.wait_async(self.seal()).await
    }

    /// The same snapshot with its data released (a new value: handles on the local one are
    /// revoked, and keep what they hold until they go).
    fn released(&self) -> Snapshot {
        let l = self.lineage.lock();
        let meta = SnapshotMeta {
            id: self.id,
            volume: self.volume,
            seq: self.seq,
            name: self.name.clone(),
            description: self.description.clone(),
            created: self.created,
            size: self.size,
            cluster_size: self.cluster_size,
            allocated: self.allocated,
            group: self.group.clone(),
        };
        let lineage = Lineage { parent: l.parent, changed: l.changed.clone(), anchor: l.anchor.clone() };
        Snapshot::new(meta, lineage, SnapshotData::Released)
    }
}

/// What a dirty bitmap compares a base snapshot with (see `Registry::changed_between`).
#[derive(Clone, Copy)]
pub(crate) enum Target {
    Snapshot(u64),
    /// The live head of this volume.
    Head(u64),
}

pub(crate) struct Lineage {
    pub(crate) parent: Option<u64>,
    pub(crate) changed: RoaringTreemap,
    /// The remote snapshot the root of this lineage is relative to (see `VolumeState`).
    pub(crate) anchor: Option<RemoteSource>,
}

/// A node whose lineage parent is a snapshot (see `Registry::children`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) enum Child {
    Snapshot(u64),
    /// The head of this volume.
    Head(u64),
}

/// A map a record dropped, for `Registry::release_dropped`: the other maps that may still
/// hold its slots are those of `family`; `near` are the snapshots next to it in the lineage,
/// which hold most of what it shares.
pub(super) struct Dropped {
    pub(super) map: ClusterMap,
    pub(super) cluster_size: u32,
    pub(super) family: u64,
    pub(super) near: Vec<u64>,
}

/// A volume's snapshots, by sequence number and by name (ids).
#[derive(Default)]
struct VolumeSnapshots {
    by_seq: BTreeMap<u64, u64>,
    by_name: HashMap<String, u64>,
}

#[derive(Default)]
pub(super) struct Registry {
    pub(super) volumes: HashMap<u64, Arc<Volume>>,
    pub(super) snapshots: HashMap<u64, Arc<Snapshot>>,
    /// Volume → its snapshots' ids by sequence number and by name: a volume's snapshots
    /// without a scan of every snapshot (200 volumes × 1,000 snapshots), and a create's name
    /// check (16 of them in a group's cut, under the registry lock) without a scan of the
    /// volume's. Kept with `snapshots` by [`Registry::add_snapshot`] and the delete.
    by_volume: HashMap<u64, VolumeSnapshots>,
    /// Snapshot → the snapshots and heads whose lineage parent it is: a delete re-parents
    /// them without a scan of every snapshot. Kept by `link` and `unlink` wherever a parent
    /// is set.
    /// (Most snapshots have one child: a small vector each, not a set, at 200,000 of them.)
    children: HashMap<u64, SmallVec<[Child; 2]>>,
    /// Store snapshot → the local snapshots taken of a volume while it was loading from it
    /// (their unloaded clusters come from it): `store_dependents` without a scan of every
    /// snapshot under a delete's registry lock.
    by_store_source: HashMap<u64, BTreeSet<u64>>,
    /// Volume → its family; family → its volumes. Maps of different families never share a
    /// slot, so what a dropped map frees is decided by its family's maps alone, not by every
    /// snapshot's (docs/ARCHITECTURE.md, "Rollback, clone, delete"): sharing starts only
    /// within a volume (snapshot, rollback) or with a clone, which joins its origin's
    /// family; every other map change installs a fresh slot. Families only grow while the
    /// daemon runs (a volume leaves when deleted); start-up recomputes them from what the
    /// maps share (`recompute_families`).
    family_of: HashMap<u64, u64>,
    families: HashMap<u64, BTreeSet<u64>>,
    next_family: u64,
    pub(super) slot_files: HashMap<u32, Arc<SlotFile>>,
    pub(super) next_seq: u64,
}

pub(super) fn slot_file_path(data_dir: &Path, cluster_size: u32) -> PathBuf {
    data_dir.join(format!("slots-{cluster_size}.dat"))
}

impl Registry {
    pub(super) fn slot_file(&mut self, data_dir: &Path, cluster_size: u32) -> Result<Arc<SlotFile>> {
        if let Some(f) = self.slot_files.get(&cluster_size) {
            return Ok(f.clone());
        }
        let f = Arc::new(SlotFile::open(&slot_file_path(data_dir, cluster_size), cluster_size)?);
        self.slot_files.insert(cluster_size, f.clone());
        Ok(f)
    }

    pub(super) fn check_name_free(&self, name: &str) -> Result<()> {
        if self.volumes.values().any(|v| v.name == name) {
            return Err(EngineError::AlreadyExists(format!("a volume named '{name}' already exists")));
        }
        Ok(())
    }

    pub(super) fn find_volume(&self, r: &str) -> Result<&Arc<Volume>> {
        let found = match parse_id(r, "v-") {
            Some(id) => self.volumes.get(&id),
            None => self.volumes.values().find(|v| v.name == r),
        };
        found.ok_or_else(|| {
            EngineError::NotFound(format!("no volume named '{r}'; list volumes with: snapblk volume list"))
        })
    }

    pub(super) fn find_snapshot(&self, r: &str) -> Result<&Arc<Snapshot>> {
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
        // `VOLUME@s-…`: names cannot be shaped like ids, so this is the id, of this volume only.
        if let Some(id) = parse_id(snap, "s-") {
            return self.snapshots.get(&id).filter(|s| s.volume == volume.id).ok_or_else(|| {
                EngineError::NotFound(format!(
                    "volume '{}' has no snapshot with id {snap}; list them with: snapblk snapshot list {}",
                    volume.name, volume.name
                ))
            });
        }
        self.snapshot_named(volume.id, snap).ok_or_else(|| {
            EngineError::NotFound(format!(
                "volume '{}' has no snapshot named '{snap}'; list them with: snapblk snapshot list {}",
                volume.name, volume.name
            ))
        })
    }

    /// The volume a snapshot was taken of (`r`: how the caller named the snapshot).
    pub(super) fn volume_of(&self, s: &Snapshot, r: &str) -> Result<Arc<Volume>> {
        self.volumes
            .get(&s.volume)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("the volume of snapshot '{r}' no longer exists")))
    }

    /// A volume's snapshots, oldest first.
    pub(super) fn snapshots_of(&self, volume: u64) -> Vec<Arc<Snapshot>> {
        self.snapshots_iter(volume).cloned().collect()
    }

    /// A volume's snapshot named `name`.
    pub(super) fn snapshot_named(&self, volume: u64, name: &str) -> Option<&Arc<Snapshot>> {
        self.by_volume.get(&volume)?.by_name.get(name).and_then(|id| self.snapshots.get(id))
    }

    pub(super) fn newest_snapshot(&self, volume: u64) -> Option<&Arc<Snapshot>> {
        self.by_volume.get(&volume)?.by_seq.values().next_back().and_then(|id| self.snapshots.get(id))
    }

    pub(super) fn snapshot_count(&self, volume: u64) -> u64 {
        self.by_volume.get(&volume).map_or(0, |of| of.by_seq.len() as u64)
    }

    /// A volume's snapshots, oldest first, without building a list.
    fn snapshots_iter(&self, volume: u64) -> impl Iterator<Item = &Arc<Snapshot>> + '_ {
        self.by_volume
            .get(&volume)
            .into_iter()
            .flat_map(|of| of.by_seq.values())
            .filter_map(|id| self.snapshots.get(id))
    }

    fn add_snapshot(&mut self, snap: Snapshot) {
        let of = self.by_volume.entry(snap.volume).or_default();
        of.by_seq.insert(snap.seq, snap.id);
        of.by_name.insert(snap.name.clone(), snap.id);
        let parent = snap.lineage.lock().parent;
        self.link(parent, Child::Snapshot(snap.id));
        if let Some(r) = snap.remote() {
            self.by_store_source.entry(r.source.snapshot).or_default().insert(snap.id);
        }
        self.snapshots.insert(snap.id, Arc::new(snap));
    }

    /// Drops a snapshot that is deleted or released from `by_store_source`.
    fn forget_store_source(&mut self, s: &Snapshot) {
        let Some(source) = s.remote().map(|r| r.source.snapshot) else { return };
        if let Some(of) = self.by_store_source.get_mut(&source) {
            of.remove(&s.id);
            if of.is_empty() {
                self.by_store_source.remove(&source);
            }
        }
    }

    fn link(&mut self, parent: Option<u64>, child: Child) {
        if let Some(p) = parent {
            let of = self.children.entry(p).or_default();
            if !of.contains(&child) {
                of.push(child);
            }
        }
    }

    fn unlink(&mut self, parent: Option<u64>, child: Child) {
        let Some(p) = parent else { return };
        if let Some(of) = self.children.get_mut(&p) {
            of.retain(|c| *c != child);
            if of.is_empty() {
                self.children.remove(&p);
            }
        }
    }

    /// Puts a volume in `family`, or in a new one of its own.
    fn join_family(&mut self, volume: u64, family: Option<u64>) {
        let f = family.unwrap_or_else(|| {
            self.next_family += 1;
            self.next_family
        });
        self.family_of.insert(volume, f);
        self.families.entry(f).or_default().insert(volume);
    }

    fn leave_family(&mut self, volume: u64) {
        let Some(f) = self.family_of.remove(&volume) else { return };
        if let Some(members) = self.families.get_mut(&f) {
            members.remove(&volume);
            if members.is_empty() {
                self.families.remove(&f);
            }
        }
    }

    fn family(&self, volume: u64) -> Result<u64> {
        self.family_of.get(&volume).copied().ok_or_else(|| {
            EngineError::Corrupt(format!(
                "volume {volume:016x} belongs to no family; the metadata is damaged, restore the daemon directory from a backup"
            ))
        })
    }

    /// Volumes loading clusters from the store copy of snapshot `id`, and snapshots taken
    /// of them while they did (their unloaded clusters come from it too).
    pub(super) fn store_dependents(&self, id: u64) -> Vec<String> {
        let from = |r: Option<&Remote>| r.is_some_and(|rm| rm.source.snapshot == id);
        let mut out: Vec<String> = self
            .volumes
            .values()
            .filter(|v| from(v.state.read().remote.as_ref()))
            .map(|v| format!("volume {}", v.name))
            .collect();
        let snaps = self.by_store_source.get(&id).into_iter().flatten().filter_map(|s| self.snapshots.get(s));
        out.extend(snaps.map(|s| {
            let vol = self.volumes.get(&s.volume).map_or("?", |v| v.name.as_str());
            format!("snapshot {vol}@{}", s.name)
        }));
        out.sort();
        out
    }

    /// Every snapshot in the store that volumes or snapshots here still load data from, with
    /// what depends on it.
    pub(super) fn store_sources(&self) -> BTreeMap<(String, u64), Vec<String>> {
        let mut out: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
        for v in self.volumes.values() {
            if let Some(rm) = v.state.read().remote.as_ref() {
                out.entry((rm.source.region.clone(), rm.source.snapshot))
                    .or_default()
                    .push(format!("volume {}", v.name));
            }
        }
        for s in self.by_store_source.values().flatten().filter_map(|s| self.snapshots.get(s)) {
            if let Some(r) = s.remote() {
                let vol = self.volumes.get(&s.volume).map_or("?", |v| v.name.as_str());
                out.entry((r.source.region.clone(), r.source.snapshot))
                    .or_default()
                    .push(format!("snapshot {vol}@{}", s.name));
            }
        }
        out
    }

    /// Clusters that may differ between snapshot `base` and `target` (a snapshot id, or a
    /// volume's head with `Some(volume)`): the changed sets along both lineages back to their
    /// newest common snapshot, plus the head's dirty set. A superset of the clusters whose
    /// content differs, as a dirty bitmap is; it needs no map, so it works for released
    /// snapshots too. `None` when the lineages share no snapshot (everything may differ).
    pub(super) fn changed_between(&self, base: u64, target: Target) -> Option<RoaringTreemap> {
        // Snapshots from `start` towards the root; sets are read only for the two prefixes.
        let chain = |start: Option<u64>| {
            let mut out: Vec<&Arc<Snapshot>> = Vec::new();
            let mut cur = start.and_then(|id| self.snapshots.get(&id));
            while let Some(s) = cur {
                out.push(s);
                cur = s.lineage.lock().parent.and_then(|p| self.snapshots.get(&p));
            }
            out
        };
        let (mut changed, target_chain) = match target {
            Target::Snapshot(id) => (RoaringTreemap::new(), chain(Some(id))),
            Target::Head(volume) => {
                let st = self.volumes.get(&volume)?.state.read();
                (st.dirty.clone(), chain(st.parent))
            }
        };
        let base_chain = chain(Some(base));
        let (bi, ti) = base_chain
            .iter()
            .enumerate()
            .find_map(|(bi, b)| target_chain.iter().position(|t| t.id == b.id).map(|ti| (bi, ti)))?;
        for s in base_chain[..bi].iter().chain(&target_chain[..ti]) {
            changed |= &s.lineage.lock().changed;
        }
        Some(changed)
    }

    pub(super) fn new_id(&self) -> u64 {
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
    /// Applies a record — a batch's records in turn — and returns the maps it dropped.
    /// Callers check beforehand that every record of a batch applies (under the registry
    /// lock they hold), so none fails halfway.
    pub(super) fn apply_all(
        &mut self,
        rec: &Record,
        data_dir: &Path,
        mut staged: Option<&mut Vec<u8>>,
    ) -> Result<Vec<Dropped>> {
        match rec {
            Record::Batch(records) => {
                let mut dropped = Vec::new();
                for r in records {
                    dropped.extend(self.apply(r, data_dir, staged.as_deref_mut())?);
                }
                Ok(dropped)
            }
            _ => Ok(self.apply(rec, data_dir, staged)?.into_iter().collect()),
        }
    }

    pub(super) fn apply(
        &mut self,
        rec: &Record,
        data_dir: &Path,
        mut staged: Option<&mut Vec<u8>>,
    ) -> Result<Option<Dropped>> {
        let mut drain = |v: &Volume| {
            if let Some(out) = staged.as_deref_mut() {
                let mut p = v.pending.lock();
                out.extend_from_slice(&p);
                p.clear();
            }
        };
        // Records name clusters of their volume only: one past its end is damaged metadata.
        let within = |volume: &str, start: u64, count: u64, clusters: u64| -> Result<()> {
            if start.checked_add(count).is_some_and(|end| end <= clusters) {
                return Ok(());
            }
            Err(EngineError::Corrupt(format!(
                "journal refers to clusters {start}..+{count} of volume '{volume}', which has {clusters}; the metadata is damaged, restore the daemon directory from a backup"
            )))
        };
        let missing = |what: &str, id: u64| {
            EngineError::Corrupt(format!(
                "journal refers to unknown {what} {id:016x}; the metadata is damaged, restore the daemon directory from a backup"
            ))
        };
        // A snapshot numbered past the last sequence number cannot have been written.
        let seq_end = |seq: u64, count: usize| {
            seq.checked_add(count as u64).ok_or_else(|| {
                EngineError::Corrupt(format!(
                    "journal numbers a snapshot {seq}, past the last sequence number; the metadata is damaged, restore the daemon directory from a backup"
                ))
            })
        };
        match rec {
            Record::MapSet { volume, cluster, entry } => {
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?;
                let mut st = v.state.write();
                within(&v.name, *cluster, 1, st.clusters)?;
                st.set_entry(*cluster, *entry);
                Ok(None)
            }
            Record::DirtyRange { volume, start, end } => {
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?;
                let mut st = v.state.write();
                within(&v.name, *start, end.saturating_sub(*start), st.clusters)?;
                st.dirty.insert_range(*start..*end);
                Ok(None)
            }
            Record::VolumeCreate { volume, name, size, cluster_size, created, origin } => {
                // Checked when the volume was made; a record that fails it is damaged.
                check_geometry(*size, *cluster_size).map_err(|why| {
                    EngineError::Corrupt(format!(
                        "journal creates volume {volume:016x} with {why}; the metadata is damaged, restore the daemon directory from a backup"
                    ))
                })?;
                let slots = self.slot_file(data_dir, *cluster_size)?;
                let clusters = size.div_ceil(*cluster_size as u64);
                // A clone shares its origin's slots: it joins the origin volume's family.
                let (head, allocated, remote, family) = match origin {
                    Some(s) => match &**self.snapshots.get(s).ok_or_else(|| missing("snapshot", *s))? {
                        Snapshot { data: SnapshotData::Local { map, remote, .. }, allocated, volume, .. } => {
                            (map.clone(), *allocated, remote.clone(), Some(self.family(*volume)?))
                        }
                        // A clone of a released snapshot: its head comes with `RemoteHead`.
                        Snapshot { data: SnapshotData::Released, .. } => (ClusterMap::new(clusters), 0, None, None),
                    },
                    None => (ClusterMap::new(clusters), 0, None, None),
                };
                let meta = VolumeMeta {
                    id: *volume,
                    name: name.clone(),
                    size: *size,
                    cluster_size: *cluster_size,
                    created: *created,
                    origin: *origin,
                };
                let state = VolumeState::new(head, clusters, allocated, remote);
                self.volumes.insert(*volume, Arc::new(Volume::new(meta, slots, state)));
                self.join_family(*volume, family);
                Ok(None)
            }
            Record::VolumeDelete { volume } => {
                let family = self.family(*volume)?;
                let v = self.volumes.remove(volume).ok_or_else(|| missing("volume", *volume))?;
                v.revoker.revoke();
                let st = v.state.write();
                drain(&v);
                let (map, parent) = (st.head.clone(), st.parent);
                drop(st);
                self.unlink(parent, Child::Head(*volume));
                self.leave_family(*volume);
                Ok(Some(Dropped { map, cluster_size: v.cluster_size, family, near: parent.into_iter().collect() }))
            }
            Record::SnapshotCreate { volume, snapshot, seq, name, description, created } => {
                let end = seq_end(*seq, 1)?;
                if self.snapshots.contains_key(snapshot) || volume == snapshot {
                    return Err(EngineError::Corrupt(format!(
                        "journal creates snapshot {snapshot:016x} twice; the metadata is damaged, restore the daemon directory from a backup"
                    )));
                }
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
                let (snap, old_parent) =
                    cut(v, &mut st, Taken { id: *snapshot, seq: *seq, name, description, created: *created, group: None }, seal);
                drop(st);
                self.next_seq = self.next_seq.max(end);
                self.unlink(old_parent, Child::Head(*volume));
                self.link(Some(*snapshot), Child::Head(*volume));
                self.add_snapshot(snap);
                Ok(None)
            }
            Record::GroupSnapshot { members, seq, name, description, created, group } => {
                let end = seq_end(*seq, members.len())?;
                // A volume named twice would be locked twice below (a hang, not an error), and
                // a snapshot id taken twice would replace a snapshot: neither is ever written.
                let mut seen = HashSet::new();
                for (v, id) in members {
                    if !seen.insert(*v) || !seen.insert(*id) || self.snapshots.contains_key(id) {
                        return Err(EngineError::Corrupt(format!(
                            "journal's group snapshot names volume {v:016x} or snapshot {id:016x} twice; the metadata is damaged, restore the daemon directory from a backup"
                        )));
                    }
                }
                let vols = members
                    .iter()
                    .map(|(v, _)| self.volumes.get(v).cloned().ok_or_else(|| missing("volume", *v)))
                    .collect::<Result<Vec<_>>>()?;
                // Every member's state lock, taken in volume-id order, is held across all the
                // cuts: no write is looked up (hence acknowledged) on any member between two
                // members' cuts, so the group is write-order consistent.
                let mut order: Vec<usize> = (0..vols.len()).collect();
                order.sort_by_key(|&i| vols[i].id);
                let mut guards: Vec<_> = order.iter().map(|&i| (i, vols[i].state.write())).collect();
                guards.sort_by_key(|(i, _)| *i);
                // Seal points first: a member with writes stuck refuses the group before any
                // member changes.
                let seals = vols
                    .iter()
                    .map(|v| {
                        v.slots.gate.advance().ok_or_else(|| {
                            EngineError::Busy(format!(
                                "writes to volume '{}' have been in flight for too long (is the disk under the data directory hung?); try again",
                                v.name
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut snaps = Vec::with_capacity(vols.len());
                for (k, ((v, (_, st)), seal)) in vols.iter().zip(guards.iter_mut()).zip(seals).enumerate() {
                    drain(v);
                    let id = members[k].1;
                    let taken = Taken { id, seq: seq + k as u64, name, description, created: *created, group: group.as_ref() };
                    snaps.push((v.id, cut(v, st, taken, seal)));
                }
                drop(guards);
                self.next_seq = self.next_seq.max(end);
                for (volume, (snap, old_parent)) in snaps {
                    self.unlink(old_parent, Child::Head(volume));
                    self.link(Some(snap.id), Child::Head(volume));
                    self.add_snapshot(snap);
                }
                Ok(None)
            }
            Record::Batch(_) => Err(EngineError::Corrupt(
                "journal nests a batch of records in another; the metadata is damaged, restore the daemon directory from a backup".into(),
            )),
            Record::SnapshotDelete { snapshot } => {
                let s = self.snapshots.get(snapshot).ok_or_else(|| missing("snapshot", *snapshot))?;
                let family = self.family(s.volume)?;
                let s = self.snapshots.remove(snapshot).ok_or_else(|| missing("snapshot", *snapshot))?;
                self.forget_store_source(&s);
                if let Some(of) = self.by_volume.get_mut(&s.volume) {
                    of.by_seq.remove(&s.seq);
                    if of.by_name.get(&s.name) == Some(&s.id) {
                        of.by_name.remove(&s.name);
                    }
                    if of.by_seq.is_empty() {
                        self.by_volume.remove(&s.volume);
                    }
                }
                s.revoker.revoke();
                let (parent, changed) = {
                    let l = s.lineage.lock();
                    (l.parent, l.changed.clone())
                };
                // Whatever was relative to the deleted snapshot is now relative to its parent.
                self.unlink(parent, Child::Snapshot(*snapshot));
                let children = self.children.remove(snapshot).unwrap_or_default();
                #[cfg(test)]
                assert_eq!(
                    children.iter().copied().collect::<HashSet<_>>(),
                    self.children_by_scan(*snapshot),
                    "the child index differs from a scan"
                );
                for child in &children {
                    match child {
                        Child::Snapshot(id) => {
                            if let Some(other) = self.snapshots.get(id) {
                                let mut l = other.lineage.lock();
                                l.parent = parent;
                                l.changed |= &changed;
                            }
                        }
                        Child::Head(id) => {
                            if let Some(v) = self.volumes.get(id) {
                                let mut st = v.state.write();
                                st.parent = parent;
                                st.dirty |= &changed;
                            }
                        }
                    }
                }
                let mut near: Vec<u64> = parent.into_iter().collect();
                for c in children {
                    if let Child::Snapshot(id) = c {
                        near.push(id);
                    }
                    self.link(parent, c);
                }
                Ok(s.map().map(|m| Dropped { map: m.clone(), cluster_size: s.cluster_size, family, near }))
            }
            Record::SnapshotRelease { snapshot } => {
                let s = self.snapshots.get(snapshot).ok_or_else(|| missing("snapshot", *snapshot))?;
                let family = self.family(s.volume)?;
                let mut near: Vec<u64> = s.lineage.lock().parent.into_iter().collect();
                near.extend(self.children.get(snapshot).into_iter().flatten().filter_map(|c| match c {
                    Child::Snapshot(id) => Some(*id),
                    Child::Head(_) => None,
                }));
                s.revoker.revoke();
                let released = Arc::new(s.released());
                let old = self.snapshots.insert(*snapshot, released);
                if let Some(o) = &old {
                    self.forget_store_source(o);
                }
                Ok(old.and_then(|o| {
                    o.map().map(|m| Dropped { map: m.clone(), cluster_size: o.cluster_size, family, near })
                }))
            }
            Record::Rollback { volume, snapshot } => {
                let s = self.snapshots.get(snapshot).ok_or_else(|| missing("snapshot", *snapshot))?;
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?.clone();
                let family = self.family(*volume)?;
                // (A rollback to a released snapshot is a `RemoteHead` record.)
                let SnapshotData::Local { map, remote, .. } = &s.data else {
                    return Err(EngineError::Corrupt(format!(
                        "journal rolls volume {volume:016x} back to released snapshot {snapshot:016x}; the metadata is damaged, restore the daemon directory from a backup"
                    )));
                };
                let mut st = v.state.write();
                drain(&v);
                let old = std::mem::replace(&mut st.head, map.clone());
                st.dirty.clear();
                st.owned.clear();
                let old_parent = st.parent.replace(*snapshot);
                st.allocated = s.allocated;
                st.remote = remote.clone();
                st.anchor = s.lineage.lock().anchor.clone();
                drop(st);
                self.unlink(old_parent, Child::Head(*volume));
                self.link(Some(*snapshot), Child::Head(*volume));
                let near = old_parent.into_iter().chain([*snapshot]).collect();
                Ok(Some(Dropped { map: old, cluster_size: v.cluster_size, family, near }))
            }
            Record::RemoteHead { volume, parent, region, snapshot } => {
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?.clone();
                let family = self.family(*volume)?;
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
                drain(&v);
                let fresh = ClusterMap::new(st.clusters);
                let old = std::mem::replace(&mut st.head, fresh);
                st.dirty.clear();
                st.owned.clear();
                let old_parent = std::mem::replace(&mut st.parent, *parent);
                st.allocated = 0;
                st.remote = Some(Remote::new(source));
                st.anchor = anchor;
                drop(st);
                self.unlink(old_parent, Child::Head(*volume));
                self.link(*parent, Child::Head(*volume));
                Ok(Some(Dropped {
                    map: old,
                    cluster_size: v.cluster_size,
                    family,
                    near: old_parent.into_iter().collect(),
                }))
            }
            Record::Hydrate { volume, cluster, entry } => {
                let v = self.volumes.get(volume).ok_or_else(|| missing("volume", *volume))?;
                let mut st = v.state.write();
                within(&v.name, *cluster, 1, st.clusters)?;
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

    /// Heads of all volumes of this cluster size (O(1) clones taken under each read lock).
    fn heads(&self, cluster_size: u32) -> Vec<(Arc<Volume>, ClusterMap)> {
        let of_size = self.volumes.values().filter(|v| v.cluster_size == cluster_size);
        of_size.map(|v| (v.clone(), v.state.read().head.clone())).collect()
    }

    /// After a map was dropped (snapshot delete, release, rollback, volume delete), under the
    /// registry lock that applied the record dropping it (and after that record was staged):
    /// releases the slots no map references any more. They are punched and reused only after
    /// the commit that takes them, and every commit writes every record staged or pending
    /// before it takes its frees (`Engine::commit_begin`), so the record is durable first.
    ///
    /// A slot stays while a snapshot map holds it; else it is freed if no head holds it,
    /// regained if exactly one does. Slots keep their cluster in every map that shares them
    /// (maps share slots only by being copies), so "holds" means "at the same cluster".
    /// The cost is the dropped map's pages that its lineage neighbours do not share, plus,
    /// for the entries none of them holds, their pages in the maps of its family — the only
    /// maps that can hold its slots (see `family_of`) — not every snapshot's whole map.
    ///
    /// Returns the slots a single head is now the only holder of: the head may write them in
    /// place again, but only once the record is durable (see `Regain`).
    pub(super) fn release_dropped(&self, dropped: &Dropped) -> Vec<Regain> {
        let Some(slots) = self.slot_files.get(&dropped.cluster_size) else { return Vec::new() };
        // Writers change heads meanwhile (only ever dropping a shared slot, never taking one):
        // the check against the full walk needs both to see the same heads.
        #[cfg(test)]
        let heads: HashMap<u64, ClusterMap> =
            self.volumes.values().map(|v| (v.id, v.state.read().head.clone())).collect();
        #[cfg(test)]
        let head_of = |v: &Volume| heads[&v.id].clone();
        #[cfg(not(test))]
        let head_of = |v: &Volume| v.state.read().head.clone();
        let (freed, regained) = self.fate(dropped, head_of);
        #[cfg(test)]
        self.assert_fate_matches_full_walk(dropped, head_of, &freed, &regained);
        freed.into_iter().for_each(|slot| slots.release(slot));
        regained
    }

    /// The decision of `release_dropped`, with each head's map from `head_of`.
    fn fate(&self, dropped: &Dropped, head_of: impl Fn(&Volume) -> ClusterMap) -> (Vec<u64>, Vec<Regain>) {
        let near: Vec<&ClusterMap> = dropped.near.iter().filter_map(|id| self.snapshots.get(id)?.map()).collect();
        let mut candidates = Vec::new();
        dropped.map.for_each_unshared(&near, |cluster, entry| candidates.push((cluster, entry)));
        if candidates.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let members: Vec<&Arc<Volume>> =
            self.families.get(&dropped.family).into_iter().flatten().filter_map(|v| self.volumes.get(v)).collect();
        let clusters: Vec<u64> = candidates.iter().map(|&(c, _)| c).collect();
        let mut in_snapshot = vec![false; candidates.len()];
        let mut seen = HashSet::new();
        for map in members.iter().flat_map(|v| self.snapshots_iter(v.id)).filter_map(|s| s.map()) {
            map.probe_distinct(&clusters, &mut seen, |i, e| in_snapshot[i] |= e == candidates[i].1);
        }
        let unheld = candidates.into_iter().zip(in_snapshot).filter(|(_, held)| !held).map(|(c, _)| c);
        let heads: Vec<_> = members.into_iter().map(|v| (v.clone(), head_of(v))).collect();
        settle(unheld, &heads)
    }

    /// Startup: families from what the maps share now. (The journal and the checkpoint do
    /// not say which volumes a deleted origin snapshot joined; volumes that share nothing any
    /// more may part.) Volumes sharing a slot, directly or through others, form one family.
    pub(super) fn recompute_families(&mut self) {
        self.family_of.clear();
        self.families.clear();
        let mut by_size: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for v in self.volumes.values() {
            by_size.entry(v.cluster_size).or_default().push(v.id);
        }
        for mut ids in by_size.into_values() {
            ids.sort_unstable();
            // Families so far with the union of their slots, and the union of all of those.
            let mut groups: Vec<(Vec<u64>, RoaringTreemap)> = Vec::new();
            let mut all = RoaringTreemap::new();
            for id in ids {
                let mut mine = self.volume_slots(id);
                let mut members = vec![id];
                let shares = !mine.is_disjoint(&all);
                all |= &mine;
                if shares {
                    let mut i = 0;
                    while i < groups.len() {
                        if groups[i].1.is_disjoint(&mine) {
                            i += 1;
                        } else {
                            let (m, slots) = groups.swap_remove(i);
                            members.extend(m);
                            mine |= slots;
                        }
                    }
                }
                groups.push((members, mine));
            }
            for (members, _) in groups {
                self.next_family += 1;
                for &v in &members {
                    self.family_of.insert(v, self.next_family);
                }
                self.families.insert(self.next_family, members.into_iter().collect());
            }
        }
    }

    /// Slots a volume's head and local snapshots reference.
    fn volume_slots(&self, volume: u64) -> RoaringTreemap {
        let mut out = slots_in(self.snapshots_iter(volume));
        if let Some(v) = self.volumes.get(&volume) {
            v.state.read().head.for_each_nonzero(|_, e| {
                out.insert(e - 1);
            });
        }
        out
    }

    /// Startup: exact ownership for every head and the free list of every slot file.
    pub(super) fn recompute_ownership_and_free_slots(&self) -> Result<()> {
        for (&cluster_size, slots) in &self.slot_files {
            let mut live = slots_in(self.snapshots.values().filter(|s| s.cluster_size == cluster_size));
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
    pub(super) fn image(
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
                    map: s.map().cloned().unwrap_or_else(|| ClusterMap::new(s.size.div_ceil(s.cluster_size as u64))),
                    parent: l.parent,
                    changed: l.changed.clone(),
                    released: s.is_released(),
                    remote: s.remote().cloned(),
                    anchor: l.anchor.clone(),
                    group: s.group.clone(),
                }
            })
            .collect();
        State { generation, next_seq: self.next_seq, volumes, snapshots }
    }

    pub(super) fn from_image(state: State, data_dir: &Path) -> Result<Registry> {
        let mut reg = Registry { next_seq: state.next_seq, ..Default::default() };
        // Volumes first: a snapshot's size and cluster size are its volume's. (A cloned
        // volume has its own head in a checkpoint; only replay builds one from its origin.)
        for v in state.volumes {
            let slots = reg.slot_file(data_dir, v.cluster_size)?;
            let mut st = VolumeState::new(v.head, v.size.div_ceil(v.cluster_size as u64), v.allocated, v.remote);
            (st.dirty, st.parent, st.anchor) = (v.dirty, v.parent, v.anchor);
            let meta = VolumeMeta {
                id: v.id,
                name: v.name,
                size: v.size,
                cluster_size: v.cluster_size,
                created: v.created,
                origin: v.origin,
            };
            let (id, parent) = (meta.id, st.parent);
            reg.volumes.insert(id, Arc::new(Volume::new(meta, slots, st)));
            reg.link(parent, Child::Head(id));
            // One family each until start-up recomputes them (`recompute_families`).
            reg.join_family(id, None);
        }
        for s in state.snapshots {
            let v = reg.volumes.get(&s.volume).ok_or_else(|| {
                EngineError::Corrupt(format!(
                    "checkpoint has snapshot {} of a missing volume; restore the daemon directory from a backup",
                    snapshot_id(s.id)
                ))
            })?;
            let data = if s.released {
                SnapshotData::Released
            } else {
                SnapshotData::Local { map: s.map, remote: s.remote, seal: 0 }
            };
            let meta = SnapshotMeta {
                id: s.id,
                volume: s.volume,
                seq: s.seq,
                name: s.name,
                description: s.description,
                created: s.created,
                size: v.size,
                cluster_size: v.cluster_size,
                allocated: s.allocated,
                group: s.group,
            };
            let lineage = Lineage { parent: s.parent, changed: s.changed, anchor: s.anchor };
            reg.add_snapshot(Snapshot::new(meta, lineage, data));
        }
        Ok(reg)
    }
}

/// The full walks the indexes replace, kept as oracles: every engine test checks each delete's
/// re-parenting and each dropped map's frees against them.
#[cfg(test)]
impl Registry {
    /// Children of snapshot `id` by a scan of every snapshot and head.
    pub(super) fn children_by_scan(&self, id: u64) -> HashSet<Child> {
        let snaps =
            self.snapshots.values().filter(|s| s.lineage.lock().parent == Some(id)).map(|s| Child::Snapshot(s.id));
        let heads = self.volumes.values().filter(|v| v.state.read().parent == Some(id)).map(|v| Child::Head(v.id));
        snaps.chain(heads).collect()
    }

    /// What a dropped map frees and regains, decided against every map of its cluster size.
    fn assert_fate_matches_full_walk(
        &self,
        dropped: &Dropped,
        head_of: impl Fn(&Volume) -> ClusterMap,
        freed: &[u64],
        regained: &[Regain],
    ) {
        let cs = dropped.cluster_size;
        let in_snapshots = slots_in(self.snapshots.values().filter(|s| s.cluster_size == cs));
        let mut entries = Vec::new();
        dropped.map.for_each_nonzero(|c, e| {
            if !in_snapshots.contains(e - 1) {
                entries.push((c, e));
            }
        });
        let heads: Vec<_> =
            self.volumes.values().filter(|v| v.cluster_size == cs).map(|v| (v.clone(), head_of(v))).collect();
        let (want_freed, want_regained) = settle(entries.into_iter(), &heads);
        let key = |r: &[Regain]| {
            let mut k: Vec<_> = r.iter().map(|g| (g.vol.id, g.cluster, g.entry)).collect();
            k.sort_unstable();
            k
        };
        let sorted = |f: &[u64]| {
            let mut f = f.to_vec();
            f.sort_unstable();
            f
        };
        assert_eq!(sorted(freed), sorted(&want_freed), "slots freed differ from the full walk's");
        assert_eq!(key(regained), key(&want_regained), "slots regained differ from the full walk's");
    }

    /// The child index equals a scan, every volume is in exactly one family, and volumes of
    /// different families share no slot.
    pub(super) fn check_indexes(&self) {
        let mut scanned: HashMap<u64, HashSet<Child>> = HashMap::new();
        for s in self.snapshots.values() {
            if let Some(p) = s.lineage.lock().parent {
                scanned.entry(p).or_default().insert(Child::Snapshot(s.id));
            }
        }
        for v in self.volumes.values() {
            if let Some(p) = v.state.read().parent {
                scanned.entry(p).or_default().insert(Child::Head(v.id));
            }
        }
        let indexed: HashMap<u64, HashSet<Child>> =
            self.children.iter().map(|(p, of)| (*p, of.iter().copied().collect())).collect();
        assert_eq!(indexed, scanned, "the child index differs from a scan");
        assert!(self.children.values().all(|of| of.len() == of.iter().collect::<HashSet<_>>().len()));
        let mut loading: HashMap<u64, BTreeSet<u64>> = HashMap::new();
        for s in self.snapshots.values() {
            if let Some(r) = s.remote() {
                loading.entry(r.source.snapshot).or_default().insert(s.id);
            }
        }
        assert_eq!(self.by_store_source, loading, "the store-source index differs from a scan");
        let ids: BTreeSet<u64> = self.volumes.keys().copied().collect();
        assert_eq!(self.family_of.keys().copied().collect::<BTreeSet<_>>(), ids, "volumes without a family");
        for (f, members) in &self.families {
            assert!(!members.is_empty(), "empty family {f}");
            assert!(members.iter().all(|v| self.family_of.get(v) == Some(f)), "family {f} lists a volume of another");
        }
        let slots: Vec<(u64, u32, RoaringTreemap)> =
            self.volumes.values().map(|v| (v.id, v.cluster_size, self.volume_slots(v.id))).collect();
        for (i, (a, cs_a, sa)) in slots.iter().enumerate() {
            for (b, cs_b, sb) in &slots[i + 1..] {
                if cs_a == cs_b && self.family_of[a] != self.family_of[b] {
                    assert!(sa.is_disjoint(sb), "volumes {a:016x} and {b:016x} share slots across families");
                }
            }
        }
    }
}

pub(super) fn volume_info(reg: &Registry, v: &Volume) -> VolumeInfo {
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
        snapshots: reg.snapshot_count(v.id),
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

/// What a snapshot record names: its id, sequence number and words.
struct Taken<'a> {
    id: u64,
    seq: u64,
    name: &'a str,
    description: &'a str,
    created: u64,
    group: Option<&'a GroupTag>,
}

/// A snapshot of volume `v` as it is now (its state locked by the caller, its pending records
/// drained): the head's map shared (O(1)), the changes since the previous snapshot taken as
/// its changed set; the head owns nothing any more (its next writes redirect).
/// Returns it with the head's previous parent.
fn cut(v: &Volume, st: &mut VolumeState, t: Taken<'_>, seal: u64) -> (Snapshot, Option<u64>) {
    let id = t.id;
    let meta = SnapshotMeta {
        id,
        volume: v.id,
        seq: t.seq,
        name: t.name.to_string(),
        description: t.description.to_string(),
        created: t.created,
        size: v.size,
        cluster_size: v.cluster_size,
        allocated: st.allocated,
        group: t.group.cloned(),
    };
    let lineage = Lineage { parent: st.parent, changed: std::mem::take(&mut st.dirty), anchor: st.anchor.clone() };
    let data = SnapshotData::Local { map: st.head.clone(), remote: st.remote.clone(), seal };
    let snap = Snapshot::new(meta, lineage, data);
    st.owned.clear();
    st.seal = seal;
    let old_parent = st.parent.replace(id);
    (snap, old_parent)
}

pub(super) fn snapshot_info(reg: &Registry, s: &Snapshot, durable: bool) -> SnapshotInfo {
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
        parent_name: l.parent.and_then(|p| reg.snapshots.get(&p)).map(|p| p.name.clone()),
        clones,
        allocated_bytes: s.allocated * s.cluster_size as u64,
        local: !s.is_released(),
        durable,
    }
}

/// Slots referenced by these snapshots' maps (shared nodes visited once).
fn slots_in<'a>(snapshots: impl Iterator<Item = &'a Arc<Snapshot>>) -> RoaringTreemap {
    let mut live = RoaringTreemap::new();
    let mut seen = HashSet::new();
    for s in snapshots {
        let Some(map) = s.map() else { continue };
        map.for_each_distinct_leaf(&mut seen, |_, e| {
            live.insert(e - 1);
        });
    }
    live
}

/// Of dropped entries `(cluster, entry)` no snapshot holds: the slots to free (no head holds
/// them either) and the regained ones (exactly one head does).
fn settle(entries: impl Iterator<Item = (u64, u64)>, heads: &[(Arc<Volume>, ClusterMap)]) -> (Vec<u64>, Vec<Regain>) {
    let (mut freed, mut regained) = (Vec::new(), Vec::new());
    for (cluster, entry) in entries {
        let mut holders = heads.iter().filter(|(_, h)| h.get(cluster) == entry);
        match (holders.next(), holders.next()) {
            (None, _) => freed.push(entry - 1),
            (Some((vol, _)), None) => {
                regained.push(Regain { vol: vol.clone(), cluster, entry, seal: vol.state.read().seal })
            }
            _ => {}
        }
    }
    (freed, regained)
}
