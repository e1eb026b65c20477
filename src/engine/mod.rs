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

//!
//! Files, one job each: `registry.rs` (volumes, snapshots, and `apply`, the state transition
//! of every journal record), `commit.rs` (the commit protocol, checkpoints, the write-back
//! thread), `hydration.rs` (volumes loading from the store), `volume.rs` (the data path),
//! `journal.rs`, `checkpoint.rs`, `map.rs`, `slots.rs`, `gate.rs` (what is on disk and how
//! slots are shared), `ids.rs`, `revoke.rs`. This file: the control operations.

pub(crate) mod checkpoint;
mod commit;
pub mod error;
mod gate;
mod hydration;
mod ids;
mod iostats;
pub(crate) mod journal;
pub(crate) mod map;
mod registry;
pub mod remote;
mod revoke;
pub(crate) mod slots;
#[cfg(test)]
mod tests;
pub mod types;
mod volume;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::clock::Clock;

use parking_lot::{Mutex, RwLock};
use roaring::RoaringTreemap;

pub use error::{EngineError, ErrorKind, Result};
pub(crate) use hydration::no_store;
pub use ids::{
    bare_name, group_snapshot_id, owned_name, owner_of, parse_snapshot_id, parse_volume_id, snapshot_id, validate_name,
    validate_owned_name, volume_id, DEFAULT_ACCOUNT,
};
pub use iostats::{IoOp, IoStats, IoView, OpView, BUCKETS, LATENCY_BOUNDS_NS};
pub use journal::MAX_GROUP_MEMBERS;
pub use remote::{ClusterSource, Priority, RemoteSource};
pub use types::{GroupSnapshotInfo, GroupTag, HydrationInfo, SnapshotInfo, VolumeInfo};
pub use volume::{Extent, SnapshotHandle, VolumeHandle, ZeroMode, STATE_HOLE, STATE_ZERO};

use checkpoint::State;
use commit::{CommitWanted, Tail, Unsealed, UNSEALED};
use ids::check_geometry;
use journal::{Journal, Record};
pub(crate) use registry::Target;
pub(crate) use registry::VolumeState;
use registry::{snapshot_info, volume_info, Registry, Snapshot, Volume};
use remote::Remote;
pub(crate) use revoke::Ticket;

pub const MIN_CLUSTER_SIZE: u32 = 4096;
pub const MAX_CLUSTER_SIZE: u32 = 1 << 20;
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 << 10;
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// How long `rollback --force` waits for disconnected clients to go away.
const FORCE_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a rollback without `--force` waits for writable clients that are disconnecting.
const CLOSING_GRACE: Duration = Duration::from_secs(1);

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
    /// Creation times of volumes and snapshots.
    clock: Arc<dyn Clock>,
    /// The write-back thread (see `Engine::spawn_writeback`).
    writeback: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What the first snapshot of a lineage is relative to, for incremental uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anchor {
    /// A snapshot in the store the volume was created from or rolled back to.
    Remote(RemoteSource),
    /// The local snapshot the volume was cloned from.
    Origin(u64),
}

impl Engine {
    /// Opens (or initializes) the engine in `dir`: loads the checkpoint, replays the journal,
    /// sweeps unreferenced slots, and compacts the journal into a fresh checkpoint.
    pub fn open(dir: &Path) -> Result<Arc<Engine>> {
        Engine::open_with(dir, journal::boot_id(), crate::clock::system())
    }

    /// `open` with the time taken from `clock` (tests run hours of it in milliseconds).
    pub fn open_with_clock(dir: &Path, clock: Arc<dyn Clock>) -> Result<Arc<Engine>> {
        Engine::open_with(dir, journal::boot_id(), clock)
    }

    /// `open` as if the machine's boot id were `boot` (tests simulate a power loss with
    /// another one).
    #[cfg(test)]
    pub(crate) fn open_as(dir: &Path, boot: journal::BootId) -> Result<Arc<Engine>> {
        Engine::open_with(dir, boot, crate::clock::system())
    }

    fn open_with(dir: &Path, boot: journal::BootId, clock: Arc<dyn Clock>) -> Result<Arc<Engine>> {
        let meta = dir.join("meta");
        let data_dir = dir.join("data");
        for d in [&meta, &data_dir] {
            crate::fsutil::create_dir_all_durable(d).map_err(EngineError::io(format!("creating {}", d.display())))?;
        }
        let ckpt_path = meta.join("checkpoint");
        let (state, earlier) = match fs::read(&ckpt_path) {
            Ok(bytes) => match checkpoint::decode(&bytes, &ckpt_path) {
                Ok(state) => (state, None),
                Err(damaged) => Engine::from_previous_checkpoint(&meta, boot, damaged)?,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (State { generation: 0, next_seq: 1, volumes: vec![], snapshots: vec![] }, None)
            }
            Err(e) => return Err(EngineError::io(format!("reading {}", ckpt_path.display()))(e)),
        };
        let generation = state.generation;
        journal::remove_stale_journals(&meta, generation);
        let (journal, mut records) = Journal::open(&meta, generation, boot)?;
        // Recovered from the previous checkpoint: its journal's records first.
        let recovered = earlier.is_some();
        if let Some(mut earlier) = earlier {
            earlier.append(&mut records);
            records = earlier;
        }
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
            reg.apply_all(rec, &data_dir, None)?;
        }
        reg.recompute_families();
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
            clock,
            writeback: Mutex::new(None),
        };
        if replayed > 0 || recovered {
            engine.checkpoint()?;
        }
        let engine = Arc::new(engine);
        *engine.writeback.lock() = Engine::spawn_writeback(Arc::downgrade(&engine), engine.commit_wanted.clone());
        Ok(engine)
    }

    /// The checkpoint is unreadable (`damaged`): its state is rebuilt from the previous
    /// checkpoint (`checkpoint.prev`, kept by each rotation) and that one's journal, replayed
    /// up to where the damaged checkpoint's image ended (the next journal's `Base` frame); the
    /// caller then replays the current journal as usual. Returns that state (with the damaged
    /// one's generation) and the earlier journal's records; `damaged` itself when there is no
    /// way back.
    fn from_previous_checkpoint(
        meta: &Path,
        boot: journal::BootId,
        damaged: EngineError,
    ) -> Result<(State, Option<Vec<Record>>)> {
        let prev_path = meta.join("checkpoint.prev");
        let Some(mut prev) = fs::read(&prev_path).ok().and_then(|b| checkpoint::decode(&b, &prev_path).ok()) else {
            return Err(damaged);
        };
        let Some(older) = Journal::read_trusted(meta, prev.generation, boot)? else { return Err(damaged) };
        // Without a readable `Base` frame the current journal has no valid frame either: the
        // whole earlier journal is then the history.
        let base = Journal::read_trusted(meta, prev.generation + 1, boot)?.and_then(|t| t.base);
        let records: Vec<Record> =
            older.records.into_iter().filter(|(_, end)| base.is_none_or(|b| *end <= b)).map(|(r, _)| r).collect();
        tracing::warn!(
            error = %damaged,
            replayed = records.len(),
            "the checkpoint is damaged; its state was rebuilt from checkpoint.prev and the journals"
        );
        prev.generation += 1;
        Ok((prev, Some(records)))
    }

    /// The clock the engine (and the store service beside it) takes time from.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
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

    pub fn create_volume(&self, name: &str, size: u64, cluster_size: Option<u32>) -> Result<VolumeInfo> {
        validate_owned_name("volume", name)?;
        let cluster_size = cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
        check_geometry(size, cluster_size).map_err(EngineError::Invalid)?;
        let reg = self.registry.write();
        reg.check_name_free(name)?;
        let id = reg.new_id();
        let rec = self.new_volume(id, name, size, cluster_size);
        let info = self.run(reg, &[rec], |reg| volume_info(reg, &reg.volumes[&id]))?;
        tracing::info!(name, size, cluster_size, id = %volume_id(id), "volume created");
        Ok(info)
    }

    /// The record of a new, empty volume created now.
    fn new_volume(&self, id: u64, name: &str, size: u64, cluster_size: u32) -> Record {
        Record::VolumeCreate {
            volume: id,
            name: name.into(),
            size,
            cluster_size,
            created: self.clock.now(),
            origin: None,
        }
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let reg = self.registry.read();
        let mut v: Vec<_> = reg.volumes.values().map(|v| volume_info(&reg, v)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Every volume's I/O counters, by volume id (`v-…`; for the metrics endpoint).
    pub fn volume_io(&self) -> Vec<(String, IoView)> {
        let reg = self.registry.read();
        reg.volumes.values().map(|v| (volume_id(v.id), v.io.view())).collect()
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
        tracing::info!(name = %v.name, id = %volume_id(v.id), "volume deleted");
        Ok(())
    }

    pub fn create_snapshot(&self, volume: &str, name: &str, description: &str) -> Result<SnapshotInfo> {
        self.create_snapshot_as(volume, name, description, None)
    }

    /// A number for a snapshot id (`s-…`) no volume or snapshot has now, for a snapshot that
    /// will be created later with it ([`Engine::create_snapshot_as`]): what the EBS facade
    /// answers StartSnapshot with before the snapshot's data is written.
    pub fn unused_id(&self) -> u64 {
        self.registry.read().new_id()
    }

    /// [`Engine::create_snapshot`], with the id given (`Some`: one from [`Engine::unused_id`];
    /// refused if something took it since).
    pub fn create_snapshot_as(
        &self,
        volume: &str,
        name: &str,
        description: &str,
        id: Option<u64>,
    ) -> Result<SnapshotInfo> {
        validate_name("snapshot", name)?;
        if description.len() > 4096 {
            return Err(EngineError::Invalid("snapshot description is longer than 4096 bytes".into()));
        }
        let mut reg = self.registry.write();
        let v = reg.find_volume(volume)?.clone();
        if reg.snapshot_named(v.id, name).is_some() {
            return Err(EngineError::AlreadyExists(format!(
                "volume '{}' already has a snapshot named '{name}'",
                v.name
            )));
        }
        let id = match id {
            Some(id) if id == 0 || reg.volumes.contains_key(&id) || reg.snapshots.contains_key(&id) => {
                return Err(EngineError::AlreadyExists(format!("id {} is taken", snapshot_id(id))));
            }
            Some(id) => id,
            None => reg.new_id(),
        };
        let rec = Record::SnapshotCreate {
            volume: v.id,
            snapshot: id,
            seq: reg.next_seq,
            name: name.into(),
            description: description.into(),
            created: self.clock.now(),
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

    /// One snapshot named `name` of each volume in `volumes`, all taken at one instant (a
    /// consistency group's cut): every write acknowledged before the call is in its volume's
    /// snapshot, none acknowledged after is in any, and a crash leaves all of them or none
    /// (one journal frame). In `volumes`' order. Each member carries `group`, so the group
    /// snapshot is known from the engine alone after any crash ([`Engine::group_snapshots`]).
    pub fn create_group_snapshot(
        &self,
        volumes: &[String],
        name: &str,
        description: &str,
        group: &GroupTag,
    ) -> Result<Vec<SnapshotInfo>> {
        validate_name("snapshot", name)?;
        if description.len() > 4096 {
            return Err(EngineError::Invalid("snapshot description is longer than 4096 bytes".into()));
        }
        if volumes.is_empty() || volumes.len() > journal::MAX_GROUP_MEMBERS {
            return Err(EngineError::Invalid(format!(
                "a group snapshot takes 1 to {} volumes, not {}",
                journal::MAX_GROUP_MEMBERS,
                volumes.len()
            )));
        }
        let mut reg = self.registry.write();
        let mut vols: Vec<Arc<Volume>> = Vec::with_capacity(volumes.len());
        for r in volumes {
            let v = reg.find_volume(r)?.clone();
            if vols.iter().any(|o| o.id == v.id) {
                return Err(EngineError::Invalid(format!("volume '{}' is named twice", v.name)));
            }
            if reg.snapshot_named(v.id, name).is_some() {
                return Err(EngineError::AlreadyExists(format!(
                    "volume '{}' already has a snapshot named '{name}'",
                    v.name
                )));
            }
            vols.push(v);
        }
        let members: Vec<(u64, u64)> = vols.iter().map(|v| (v.id, reg.new_id())).collect();
        let rec = Record::GroupSnapshot {
            members: members.clone(),
            seq: reg.next_seq,
            name: name.into(),
            description: description.into(),
            created: self.clock.now(),
            group: Some(group.clone()),
        };
        // As `create_snapshot`: taken now, durable with the commit started at once.
        let (ticket, _) = self.stage(&mut reg, &[rec], true)?;
        let mut infos = Vec::with_capacity(vols.len());
        for (v, (_, id)) in vols.iter().zip(&members) {
            let snap = &reg.snapshots[id];
            if snap.is_sealed(v) {
                snap.durable_ticket.store(ticket, Ordering::Release);
            } else {
                snap.durable_ticket.store(UNSEALED, Ordering::Release);
                self.unsealed.lock().push(Unsealed { snap: snap.clone(), vol: v.clone(), ticket });
            }
            infos.push(self.snapshot_info(&reg, snap));
        }
        self.request_commit();
        drop(reg);
        tracing::info!(name, volumes = %volumes.join(", "), "group snapshot created");
        Ok(infos)
    }

    /// Every group snapshot whose members carry a tag (taken by version 7 or later), with
    /// the members still there, in the order they were cut. A scan of every snapshot: for
    /// start-up, not for the data or control paths.
    pub fn group_snapshots(&self) -> Vec<GroupSnapshotInfo> {
        let reg = self.registry.read();
        let mut tagged: Vec<(&GroupTag, &Arc<Snapshot>)> =
            reg.snapshots.values().filter_map(|s| s.group.as_ref().map(|g| (g, s))).collect();
        tagged.sort_by_key(|(g, s)| (g.id, s.seq));
        let mut out: Vec<GroupSnapshotInfo> = Vec::new();
        for (tag, s) in tagged {
            let member = (volume_id(s.volume), snapshot_id(s.id));
            match out.last_mut() {
                Some(g) if g.tag.id == tag.id => g.members.push(member),
                _ => out.push(GroupSnapshotInfo {
                    tag: tag.clone(),
                    name: s.name.clone(),
                    description: s.description.clone(),
                    created: s.created,
                    members: vec![member],
                }),
            }
        }
        out
    }

    fn snapshot_info(&self, reg: &Registry, s: &Snapshot) -> SnapshotInfo {
        let durable = s.durable_ticket.load(Ordering::Acquire) <= self.durable_through.load(Ordering::Acquire);
        snapshot_info(reg, s, durable)
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

    /// The ids, names and creation times of a volume's snapshots, oldest first: what counting
    /// them or applying retention needs, without building a [`SnapshotInfo`] each (whose
    /// list of clones costs a look at every volume).
    pub fn snapshot_times(&self, volume: &str) -> Result<Vec<(String, String, u64)>> {
        let reg = self.registry.read();
        let of = reg.snapshots_of(reg.find_volume(volume)?.id);
        Ok(of.iter().map(|s| (snapshot_id(s.id), s.name.clone(), s.created)).collect())
    }

    /// How many snapshots a volume has, and when its newest was taken.
    pub fn snapshot_count_and_newest(&self, volume: &str) -> Result<(u64, Option<u64>)> {
        let reg = self.registry.read();
        let v = reg.find_volume(volume)?.id;
        Ok((reg.snapshot_count(v), reg.newest_snapshot(v).map(|s| s.created)))
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

    /// Every snapshot in the store this node's volumes and snapshots still load data from
    /// (`s-…` id and region), with what depends on it.
    pub fn store_sources(&self) -> Vec<(RemoteSource, Vec<String>)> {
        let sources = self.registry.read().store_sources();
        sources.into_iter().map(|((region, snapshot), of)| (RemoteSource { region, snapshot }, of)).collect()
    }

    /// A new volume with the snapshot's content, sharing its data (copy on write). A released
    /// snapshot needs `released_region` (where it was uploaded): the clone then loads its data
    /// from there.
    pub fn clone_snapshot(&self, snap: &str, new_volume: &str, released_region: Option<&str>) -> Result<VolumeInfo> {
        validate_owned_name("volume", new_volume)?;
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
            created: self.clock.now(),
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
        validate_owned_name("volume", name)?;
        check_geometry(size, cluster_size)
            .map_err(|e| EngineError::Invalid(format!("snapshot {source} cannot be served by this snapblk: {e}")))?;
        let reg = self.registry.write();
        reg.check_name_free(name)?;
        let id = reg.new_id();
        let recs = [
            self.new_volume(id, name, size, cluster_size),
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
        let target = [(snap.to_string(), released_region.map(String::from))];
        Ok(self.rollback_all(&target, force).await?.remove(0))
    }

    /// Rolls several volumes back, each to one of its snapshots (`(snapshot, released_region)`
    /// as for [`Engine::rollback`]), all or none: one journal frame, applied once every volume
    /// is free of writers (a consistency group's rollback).
    pub async fn rollback_group(&self, targets: &[(String, Option<String>)], force: bool) -> Result<Vec<VolumeInfo>> {
        if targets.is_empty() || targets.len() > journal::MAX_GROUP_MEMBERS {
            return Err(EngineError::Invalid(format!(
                "a group rollback takes 1 to {} snapshots, not {}",
                journal::MAX_GROUP_MEMBERS,
                targets.len()
            )));
        }
        self.rollback_all(targets, force).await
    }

    async fn rollback_all(&self, targets: &[(String, Option<String>)], force: bool) -> Result<Vec<VolumeInfo>> {
        let mut found = Vec::with_capacity(targets.len());
        {
            let reg = self.registry.read();
            for (snap, region) in targets {
                let s = reg.find_snapshot(snap)?.clone();
                let v = reg.volume_of(&s, snap)?;
                if found.iter().any(|(o, _, _, _): &(Arc<Volume>, _, _, _)| o.id == v.id) {
                    return Err(EngineError::Invalid(format!("volume '{}' is rolled back twice", v.name)));
                }
                let remote = remote_of_released(&s, snap, region.as_deref())?;
                found.push((v, s, remote, snap.clone()));
            }
        }
        for (v, s, _, _) in &found {
            // The head will share the snapshot's slots: writes still landing there end first.
            tokio::time::timeout(volume::SEAL_TIMEOUT, s.wait_sealed_async(v))
                .await
                .map_err(|_| volume::seal_timeout(&v.name))?;
        }
        // A client that has just disconnected may not be accounted yet (qemu-io sends its
        // DISC and exits without waiting for the server): connections closing get a moment.
        // Every volume is checked before any client is disconnected: all or none.
        if !force {
            for (v, _, _, _) in &found {
                let writers = writers_left(v, CLOSING_GRACE).await;
                if writers > 0 {
                    return Err(EngineError::Busy(format!(
                        "volume '{}' has {writers} writable client(s) connected; disconnect them or pass --force",
                        v.name
                    )));
                }
            }
        } else {
            for (v, _, _, _) in &found {
                if v.writers.load(Ordering::Acquire) > 0 {
                    v.revoker.revoke();
                }
            }
            for (v, _, _, _) in &found {
                if writers_left(v, FORCE_DISCONNECT_TIMEOUT).await > 0 {
                    return Err(EngineError::Busy(format!(
                        "clients of volume '{}' did not disconnect within {}s; try again",
                        v.name,
                        FORCE_DISCONNECT_TIMEOUT.as_secs()
                    )));
                }
            }
        }
        let reg = self.registry.write();
        let mut recs = Vec::with_capacity(found.len());
        for (v, s, remote, snap) in &found {
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
            recs.push(match remote {
                Some(src) => {
                    Record::RemoteHead { volume: v.id, parent: Some(s.id), region: src.region.clone(), snapshot: s.id }
                }
                None => Record::Rollback { volume: v.id, snapshot: s.id },
            });
        }
        let rec = if recs.len() == 1 { recs.remove(0) } else { Record::Batch(recs) };
        let infos =
            self.run(reg, &[rec], |reg| found.iter().map(|(v, _, _, _)| volume_info(reg, v)).collect::<Vec<_>>())?;
        for (v, s, _, _) in &found {
            tracing::info!(volume = %v.name, snapshot = %s.name, id = %snapshot_id(s.id), "volume rolled back");
        }
        Ok(infos)
    }

    /// Opens a volume for reading and writing (one per NBD connection).
    pub fn open_volume(self: &Arc<Self>, r: &str) -> Result<VolumeHandle> {
        self.check_writable()?;
        // Counted as a writer before the registry lock is released (see `rollback`).
        let reg = self.registry.read();
        let v = reg.find_volume(r)?.clone();
        Ok(VolumeHandle::new(self.clone(), v))
    }

    /// Opens a snapshot read-only (`VOLUME@SNAP` or an id). A snapshot whose data was
    /// released after upload needs `released_region` (where it was uploaded): the handle then
    /// reads it from there — every cluster pending, fetched on read and never stored locally —
    /// through the same calls as a local one.
    pub fn open_snapshot(self: &Arc<Self>, r: &str, released_region: Option<&str>) -> Result<SnapshotHandle> {
        let reg = self.registry.read();
        let s = reg.find_snapshot(r)?.clone();
        let remote = match remote_of_released(&s, r, released_region)? {
            Some(source) => Some(Remote::new(source)),
            None => s.remote().cloned(),
        };
        let v = reg.volume_of(&s, r)?;
        let bases = reg.snapshots_of(s.volume).into_iter().filter(|b| b.seq < s.seq).collect();
        Ok(SnapshotHandle::new(self.clone(), v, s, remote, bases))
    }

    /// Clusters that may differ between snapshot `base` and `target` (see
    /// `Registry::changed_between`); `None`: anything may.
    pub(crate) fn changed_between(&self, base: u64, target: Target) -> Option<RoaringTreemap> {
        self.registry.read().changed_between(base, target)
    }

    /// The snapshots of volume `volume` (id), oldest first: `(id, name)`.
    pub(crate) fn snapshots_of(&self, volume: u64) -> Vec<(u64, String)> {
        self.registry.read().snapshots_of(volume).iter().map(|s| (s.id, s.name.clone())).collect()
    }

    /// Whether the snapshot's data is local (false once released after upload).
    pub fn snapshot_is_local(&self, r: &str) -> Result<bool> {
        Ok(!self.registry.read().find_snapshot(r)?.is_released())
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
        if s.is_released() || Arc::strong_count(&s) > 2 {
            return Ok(false);
        }
        let (id, shown) = (s.id, format!("{}@{}", reg.volumes.get(&s.volume).map_or("?", |v| v.name.as_str()), s.name));
        drop(s);
        self.run(reg, &[Record::SnapshotRelease { snapshot: id }], |_| ())?;
        tracing::info!(snapshot = %shown, id = %snapshot_id(id), "snapshot data released (now only in the object store)");
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
    /// Whether [`Engine::shutdown`] has begun: handles are being revoked, so their errors
    /// mean "stopping", not "deleted".
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

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

/// Waits until the volume has no writable client, for at most `within`; how many are left.
async fn writers_left(v: &Volume, within: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let writers = v.writers.load(Ordering::Acquire);
        if writers == 0 || tokio::time::Instant::now() >= deadline {
            return writers;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// For a released snapshot, where its data is loaded from (its upload region must be known).
fn remote_of_released(s: &Snapshot, r: &str, region: Option<&str>) -> Result<Option<RemoteSource>> {
    match (s.is_released(), region) {
        (false, _) => Ok(None),
        (true, Some(region)) => Ok(Some(RemoteSource { region: region.to_string(), snapshot: s.id })),
        (true, None) => Err(EngineError::NotLocal(format!(
            "the data of snapshot '{r}' is only in the object store, and its region is unknown"
        ))),
    }
}
