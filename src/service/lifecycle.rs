//! The lifecycle's state: policies, their books (which snapshots each took of each volume),
//! when each fires next, their history, holds, the recycle bin and deleted volumes.
//!
//! Kept as `DIR/meta/lifecycle.json` plus a log of changes (`lifecycle.log`, one synced line
//! per save holding only what that save changed: [`crate::statelog`]), so a save costs what it
//! changed, not the size of the state (200 volumes with 1,000 snapshots each make a 5 MB
//! state). A kill -9 or a power loss leaves the state before or after a save; what a tick was
//! doing when it stopped is settled at start ([`LifecycleState::settle`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::engine::Engine;
use crate::policy::Policy;
use crate::statelog::StateLog;

/// History entries kept per policy (the oldest go first).
pub const HISTORY_KEPT: usize = 200;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LifecycleState {
    #[serde(default)]
    pub policies: BTreeMap<String, Policy>,
    /// Policy id → volume id → its book.
    #[serde(default)]
    pub books: BTreeMap<String, BTreeMap<String, Book>>,
    /// Policy id → when it fires next (seconds since the epoch).
    #[serde(default)]
    pub next_due: BTreeMap<String, u64>,
    /// Policy id → its latest ticks, oldest first.
    #[serde(default)]
    pub history: BTreeMap<String, VecDeque<HistoryEntry>>,
    /// Snapshot id → its hold.
    #[serde(default)]
    pub holds: BTreeMap<String, Hold>,
    /// Snapshot id → its place in the recycle bin (see `bin.rs`).
    #[serde(default)]
    pub bin: BTreeMap<String, Binned>,
    /// Volume id → a volume deleted while snapshots of it remain (in the bin, or kept).
    #[serde(default)]
    pub deleted_volumes: BTreeMap<String, DeletedVolume>,
    #[serde(default)]
    pub bin_lock: Option<BinLock>,
    /// Consistency groups by name, and their group snapshots by id (`g-…`).
    #[serde(default)]
    pub groups: BTreeMap<String, GroupRecord>,
    #[serde(default)]
    pub group_snapshots: BTreeMap<String, GroupSnapshotRecord>,
    /// Ids of group snapshots deleted here: never rebuilt at start from the group tags their
    /// members keep in the engine (members deleted into the recycle bin, or restored from it,
    /// still carry it). Forgotten at start once no snapshot carries the id.
    #[serde(default)]
    pub deleted_group_snapshots: BTreeSet<String>,
    /// Snapshot id → account → this node's share of it with that account (see `shares.rs`).
    #[serde(default)]
    pub shares: BTreeMap<String, BTreeMap<String, LocalShare>>,
    /// Images by name (see `images.rs`).
    #[serde(default)]
    pub images: BTreeMap<String, super::images::ImageRecord>,
    /// What changed since the last save.
    #[serde(skip)]
    touched: BTreeSet<Key>,
    #[serde(skip)]
    appended: Vec<(String, HistoryEntry)>,
}

/// A deleted snapshot waiting in the recycle bin: still complete locally and in the store,
/// hidden from everything but the bin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Binned {
    pub volume_id: String,
    pub volume: String,
    pub name: String,
    pub deleted_at: u64,
    /// Deleted for good at this time (unless restored).
    pub expires_at: u64,
    /// Who deleted it (a client, or retention).
    pub by: String,
    /// Not in the bin, only waiting for the sweep to delete it for good (a delete by
    /// retention with the bin off): hidden, not restorable.
    #[serde(default)]
    pub deleting: bool,
}

fn crash() -> String {
    "crash".into()
}

/// A consistency group: its member volumes (ids), in the order they were added.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupRecord {
    pub members: Vec<String>,
    pub created: u64,
}

/// A group snapshot: `(volume id, snapshot id)` per member. (`pending`, with member snapshot
/// ids empty, is an intent recorded before the cut by daemons before journal version 7; see
/// `service::groups`.)
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupSnapshotRecord {
    pub group: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub created: u64,
    pub members: Vec<(String, String)>,
    #[serde(default = "crash")]
    pub consistency: String,
    #[serde(default)]
    pub degraded: bool,
    #[serde(default)]
    pub pending: bool,
    /// The region its group manifest was published in (every member uploaded there).
    #[serde(default)]
    pub published: Option<String>,
    /// Deleted: its members are gone, its group manifest is still to delete.
    #[serde(default)]
    pub deleting: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeletedVolume {
    pub name: String,
    pub deleted_at: u64,
}

/// The recycle bin's lock: while it holds, nothing leaves the bin before its time and the
/// retention in force is never shorter than `retention`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BinLock {
    pub since: u64,
    /// Seconds: the retention when it was locked.
    pub retention: u64,
    /// When an unlock was requested, the time it takes effect.
    #[serde(default)]
    pub unlock_at: Option<u64>,
}

/// What one policy did to one volume.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Book {
    #[serde(default)]
    pub last_attempt: Option<u64>,
    /// Only a tick that took (or rightly skipped) its snapshot advances it.
    #[serde(default)]
    pub last_success: Option<u64>,
    /// The snapshot a tick was creating: if the daemon stopped meanwhile, found (or not) by
    /// its name at start.
    #[serde(default)]
    pub creating: Option<String>,
    /// Ids of the snapshots this policy took of the volume, oldest first.
    #[serde(default)]
    pub snapshots: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Taken,
    Skipped,
    Failed,
}

/// One tick of a policy on a volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: u64,
    pub volume: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Why it was skipped or failed, or why nothing was pruned.
    #[serde(default)]
    pub reason: Option<String>,
    /// Snapshots retention deleted after it.
    #[serde(default)]
    pub removed: Vec<String>,
}

/// A share this node made, as the owner's node keeps it (the store's grant is the one other
/// nodes read).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalShare {
    pub repository: String,
    pub granted_at: u64,
    #[serde(default)]
    pub expires: Option<u64>,
    #[serde(default)]
    pub revoked_at: Option<u64>,
    #[serde(default)]
    pub grace_until: Option<u64>,
}

impl LocalShare {
    pub fn of(g: &crate::store::shares::ShareGrant) -> LocalShare {
        LocalShare {
            repository: g.repository.clone(),
            granted_at: g.granted_at,
            expires: g.expires,
            revoked_at: g.revoked_at,
            grace_until: g.grace_until,
        }
    }

    /// The grant this record stands for, of snapshot `snap` to `with`.
    pub fn grant(&self, snap: &crate::engine::SnapshotInfo, with: &str) -> crate::store::shares::ShareGrant {
        crate::store::shares::ShareGrant {
            snapshot_id: snap.id.clone(),
            repository: self.repository.clone(),
            volume: snap.volume.clone(),
            snapshot: snap.name.clone(),
            owner: crate::engine::owner_of(&snap.volume).to_string(),
            recipient: with.to_string(),
            granted_at: self.granted_at,
            expires: self.expires,
            revoked_at: self.revoked_at,
            grace_until: self.grace_until,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hold {
    pub since: u64,
    #[serde(default)]
    pub reason: String,
}

/// A part of the state a change touched: the next save writes its current value (or its
/// removal). Mutations mark what they touch ([`LifecycleState::touch`]); tests check after
/// every save that the files read back equal the state, so a missed mark fails them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Policy(String),
    Book(String, String),
    /// Every book of a policy.
    Books(String),
    NextDue(String),
    /// A policy's whole history (appends are recorded by [`LifecycleState::record`]).
    History(String),
    Hold(String),
    Bin(String),
    DeletedVolume(String),
    BinLock,
    Group(String),
    GroupSnapshot(String),
    DeletedGroupSnapshot(String),
    /// Every share of a snapshot.
    Share(String),
    Image(String),
}

/// One entry of `meta/lifecycle.log`: the new value of a part of the state (`None`: gone), or
/// a history entry appended.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Change {
    Policy { id: String, value: Option<Policy> },
    Book { policy: String, volume: String, value: Option<Book> },
    Books { policy: String, value: Option<BTreeMap<String, Book>> },
    NextDue { policy: String, value: Option<u64> },
    History { policy: String, value: Option<VecDeque<HistoryEntry>> },
    HistoryEntry { policy: String, entry: HistoryEntry },
    Hold { snapshot: String, value: Option<Hold> },
    Bin { snapshot: String, value: Option<Binned> },
    DeletedVolume { volume: String, value: Option<DeletedVolume> },
    BinLock { value: Option<BinLock> },
    Group { name: String, value: Option<GroupRecord> },
    GroupSnapshot { id: String, value: Option<GroupSnapshotRecord> },
    DeletedGroupSnapshot { id: String, deleted: bool },
    Share { snapshot: String, value: Option<BTreeMap<String, LocalShare>> },
    Image { name: String, value: Option<super::images::ImageRecord> },
}

impl LifecycleState {
    /// Marks a part of the state changed: the next save writes it.
    pub fn touch(&mut self, key: Key) {
        self.touched.insert(key);
    }

    pub fn record(&mut self, policy: &str, entry: HistoryEntry) {
        self.appended.push((policy.to_string(), entry.clone()));
        push_history(self.history.entry(policy.to_string()).or_default(), entry);
    }

    /// The book of `policy` on `volume` (created empty), marked changed.
    pub fn book(&mut self, policy: &str, volume: &str) -> &mut Book {
        self.touch(Key::Book(policy.to_string(), volume.to_string()));
        self.books.entry(policy.to_string()).or_default().entry(volume.to_string()).or_default()
    }

    /// Removes group snapshot `id` for good (its members are deleted or binned), remembering
    /// that it was deleted (`deleted_group_snapshots`).
    pub fn remove_group_snapshot(&mut self, id: &str) {
        self.group_snapshots.remove(id);
        self.deleted_group_snapshots.insert(id.to_string());
        self.touch(Key::GroupSnapshot(id.to_string()));
        self.touch(Key::DeletedGroupSnapshot(id.to_string()));
    }

    /// Removes snapshot `id` of volume `volume` from every book; whether it was in one.
    pub fn unbook(&mut self, id: &str, volume: &str) -> bool {
        let mut touched = Vec::new();
        for (p, books) in self.books.iter_mut() {
            if let Some(book) = books.get_mut(volume) {
                let before = book.snapshots.len();
                book.snapshots.retain(|s| s != id);
                if book.snapshots.len() != before {
                    touched.push(Key::Book(p.clone(), volume.to_string()));
                }
            }
        }
        let any = !touched.is_empty();
        self.touched.extend(touched);
        any
    }

    /// Takes volume `id` out of every policy and drops its books.
    pub fn drop_volume(&mut self, id: &str) {
        let mut touched = Vec::new();
        for p in self.policies.values_mut() {
            if p.volumes.iter().any(|v| v == id) {
                p.volumes.retain(|v| v != id);
                touched.push(Key::Policy(p.id.clone()));
            }
        }
        for (p, books) in self.books.iter_mut() {
            if books.remove(id).is_some() {
                touched.push(Key::Book(p.clone(), id.to_string()));
            }
        }
        // As a replay leaves it: no empty map for a policy without books.
        self.books.retain(|_, b| !b.is_empty());
        self.touched.extend(touched);
    }

    /// What changed since the last save, with the current values; forgets the marks.
    fn changes(&mut self) -> Vec<Change> {
        let mut out: Vec<Change> = std::mem::take(&mut self.touched)
            .into_iter()
            .map(|k| match k {
                Key::Policy(id) => Change::Policy { value: self.policies.get(&id).cloned(), id },
                Key::Book(policy, volume) => Change::Book {
                    value: self.books.get(&policy).and_then(|b| b.get(&volume)).cloned(),
                    policy,
                    volume,
                },
                Key::Books(policy) => Change::Books { value: self.books.get(&policy).cloned(), policy },
                Key::NextDue(policy) => Change::NextDue { value: self.next_due.get(&policy).copied(), policy },
                Key::History(policy) => Change::History { value: self.history.get(&policy).cloned(), policy },
                Key::Hold(snapshot) => Change::Hold { value: self.holds.get(&snapshot).cloned(), snapshot },
                Key::Bin(snapshot) => Change::Bin { value: self.bin.get(&snapshot).cloned(), snapshot },
                Key::DeletedVolume(volume) => {
                    Change::DeletedVolume { value: self.deleted_volumes.get(&volume).cloned(), volume }
                }
                Key::BinLock => Change::BinLock { value: self.bin_lock.clone() },
                Key::Group(name) => Change::Group { value: self.groups.get(&name).cloned(), name },
                Key::GroupSnapshot(id) => Change::GroupSnapshot { value: self.group_snapshots.get(&id).cloned(), id },
                Key::DeletedGroupSnapshot(id) => {
                    Change::DeletedGroupSnapshot { deleted: self.deleted_group_snapshots.contains(&id), id }
                }
                Key::Share(snapshot) => Change::Share { value: self.shares.get(&snapshot).cloned(), snapshot },
                Key::Image(name) => Change::Image { value: self.images.get(&name).cloned(), name },
            })
            .collect();
        // Appends after the whole-history puts: a put carries the entries appended before it
        // already, so an append is only kept when no put of that history comes with it.
        let put: BTreeSet<String> = out
            .iter()
            .filter_map(|c| match c {
                Change::History { policy, .. } => Some(policy.clone()),
                _ => None,
            })
            .collect();
        out.extend(
            std::mem::take(&mut self.appended)
                .into_iter()
                .filter(|(p, _)| !put.contains(p))
                .map(|(policy, entry)| Change::HistoryEntry { policy, entry }),
        );
        out
    }

    fn apply(&mut self, c: Change) {
        fn put<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
            match value {
                Some(v) => map.insert(key, v),
                None => map.remove(&key),
            };
        }
        match c {
            Change::Policy { id, value } => put(&mut self.policies, id, value),
            Change::Book { policy, volume, value } => {
                let books = self.books.entry(policy.clone()).or_default();
                put(books, volume, value);
                if books.is_empty() {
                    self.books.remove(&policy);
                }
            }
            Change::Books { policy, value } => put(&mut self.books, policy, value),
            Change::NextDue { policy, value } => put(&mut self.next_due, policy, value),
            Change::History { policy, value } => put(&mut self.history, policy, value),
            Change::HistoryEntry { policy, entry } => push_history(self.history.entry(policy).or_default(), entry),
            Change::Hold { snapshot, value } => put(&mut self.holds, snapshot, value),
            Change::Bin { snapshot, value } => put(&mut self.bin, snapshot, value),
            Change::DeletedVolume { volume, value } => put(&mut self.deleted_volumes, volume, value),
            Change::BinLock { value } => self.bin_lock = value,
            Change::Group { name, value } => put(&mut self.groups, name, value),
            Change::GroupSnapshot { id, value } => put(&mut self.group_snapshots, id, value),
            Change::DeletedGroupSnapshot { id, deleted } => {
                if deleted {
                    self.deleted_group_snapshots.insert(id);
                } else {
                    self.deleted_group_snapshots.remove(&id);
                }
            }
            Change::Share { snapshot, value } => put(&mut self.shares, snapshot, value),
            Change::Image { name, value } => put(&mut self.images, name, value),
        }
    }

    /// After a start: a snapshot a tick was creating joins its book if it exists; books,
    /// holds and policies forget snapshots and volumes that no longer exist (a power loss
    /// can undo a snapshot whose id was recorded).
    pub fn settle(&mut self, engine: &Engine) {
        let snapshots: std::collections::HashSet<String> =
            engine.list_snapshots(None).unwrap_or_default().into_iter().map(|s| s.id).collect();
        let volumes: std::collections::HashSet<String> = engine.list_volumes().into_iter().map(|v| v.id).collect();
        for p in self.policies.values_mut() {
            p.volumes.retain(|v| volumes.contains(v));
        }
        let mut recovered = Vec::new();
        for (policy, books) in self.books.iter_mut() {
            // Books of groups are settled with the groups (`settle_groups`).
            books.retain(|v, _| volumes.contains(v) || v.starts_with("group:"));
            for (volume, book) in books.iter_mut().filter(|(v, _)| !v.starts_with("group:")) {
                if let Some(name) = book.creating.take() {
                    if let Ok(s) = engine.snapshot(&format!("{volume}@{name}")) {
                        if !book.snapshots.contains(&s.id) {
                            book.snapshots.push(s.id.clone());
                        }
                        book.last_success = Some(s.created);
                        recovered.push((policy.clone(), s.volume, s.name, s.created));
                    }
                }
                book.snapshots.retain(|s| snapshots.contains(s));
            }
        }
        for (policy, volume, name, at) in recovered {
            let reason =
                Some("recorded after a restart (the daemon stopped during the tick; nothing was pruned)".into());
            let entry =
                HistoryEntry { at, volume, outcome: Outcome::Taken, snapshot: Some(name), reason, removed: Vec::new() };
            self.record(&policy, entry);
        }
        self.books.retain(|p, _| self.policies.contains_key(p));
        self.holds.retain(|s, _| snapshots.contains(s));
        self.bin.retain(|s, _| snapshots.contains(s));
        self.deleted_volumes.retain(|v, _| volumes.contains(v));
    }
}

fn push_history(h: &mut VecDeque<HistoryEntry>, entry: HistoryEntry) {
    if h.len() >= HISTORY_KEPT {
        h.pop_front();
    }
    h.push_back(entry);
}

/// The lifecycle state's files (`meta/lifecycle.json` and `meta/lifecycle.log`; see
/// [`crate::statelog`]).
pub struct StateFile {
    log: StateLog<Change>,
    #[cfg(test)]
    dir: PathBuf,
}

impl StateFile {
    /// Opens the files and reads the state.
    pub fn open(dir: &Path) -> Result<(StateFile, LifecycleState)> {
        let (log, st) = StateLog::open(dir, "lifecycle", LifecycleState::apply).map_err(|e| {
            Error::Internal(format!(
                "{e}; restore meta/lifecycle.json and lifecycle.log from a backup, or remove both to start without policies and holds"
            ))
        })?;
        Ok((
            StateFile {
                log,
                #[cfg(test)]
                dir: dir.to_path_buf(),
            },
            st,
        ))
    }

    /// Writes what changed since the last save: one log line, synced.
    pub fn save(&self, st: &mut LifecycleState) -> Result<()> {
        self.save_with(st, true)
    }

    /// Saves without waiting for the disk: the line survives a kill -9 (it is in the page
    /// cache) and is made durable by the next synced save or the kernel's writeback; a power
    /// loss before may lose it. For what a restart can settle without it.
    pub fn save_unsynced(&self, st: &mut LifecycleState) -> Result<()> {
        self.save_with(st, false)
    }

    fn save_with(&self, st: &mut LifecycleState, sync: bool) -> Result<()> {
        let changes = st.changes();
        if self.log.append(&changes, sync).map_err(Error::Internal)? {
            self.compact(st)?;
        }
        #[cfg(test)]
        self.check_reads_back(st);
        Ok(())
    }

    /// Writes the whole state as a new snapshot and empties the log.
    pub fn compact(&self, st: &mut LifecycleState) -> Result<()> {
        st.touched.clear();
        st.appended.clear();
        self.log.compact(&*st).map_err(Error::Internal)
    }

    /// Tests: what the files say is the state in memory (a mutation whose part was not
    /// marked changed fails here).
    #[cfg(test)]
    fn check_reads_back(&self, st: &LifecycleState) {
        let (_, read) = StateFile::open(&self.dir).unwrap();
        assert_eq!(
            serde_json::to_value(&read).unwrap(),
            serde_json::to_value(st).unwrap(),
            "the lifecycle files do not read back as the state: a change was not marked"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> HistoryEntry {
        HistoryEntry {
            at: n,
            volume: "v".into(),
            outcome: Outcome::Taken,
            snapshot: Some(format!("s{n}")),
            reason: None,
            removed: Vec::new(),
        }
    }

    #[test]
    fn a_save_appends_what_changed_and_a_compaction_replays_no_history_twice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("meta")).unwrap();
        let (file, mut st) = StateFile::open(dir.path()).unwrap();
        for n in 0..300 {
            st.book("p", "v").snapshots.push(format!("s{n}"));
            st.record("p", entry(n));
            file.save(&mut st).unwrap(); // (reads back and compares, in tests)
        }
        let log = std::fs::read_to_string(dir.path().join("meta/lifecycle.log")).unwrap();
        assert_eq!(log.lines().count(), 300, "one line per save");
        assert!(log.lines().last().unwrap().len() < 16 << 10, "a line holds what changed, not the state");
        let (_, read) = StateFile::open(dir.path()).unwrap();
        assert_eq!(read.history["p"].len(), HISTORY_KEPT);
        // Changes pending at a compaction are in the snapshot, and not appended again.
        st.record("p", entry(300));
        file.compact(&mut st).unwrap();
        file.save(&mut st).unwrap();
        let (_, read) = StateFile::open(dir.path()).unwrap();
        assert_eq!(read.history["p"].back().unwrap().at, 300);
        assert_eq!(read.history["p"].iter().filter(|e| e.at == 300).count(), 1);
    }
}
