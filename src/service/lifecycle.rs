//! The lifecycle's state, kept in `DIR/meta/lifecycle.json`: policies, their books (which
//! snapshots each took of each volume), when each fires next, their history, and holds.
//! Replaced atomically and synced at every change, so a kill -9 or a power loss leaves the
//! state before or after it; what a tick was doing when it stopped is settled at start
//! ([`LifecycleState::settle`]).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::engine::Engine;
use crate::policy::Policy;

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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hold {
    pub since: u64,
    #[serde(default)]
    pub reason: String,
}

impl LifecycleState {
    pub fn record(&mut self, policy: &str, entry: HistoryEntry) {
        let h = self.history.entry(policy.to_string()).or_default();
        if h.len() >= HISTORY_KEPT {
            h.pop_front();
        }
        h.push_back(entry);
    }

    pub fn book(&mut self, policy: &str, volume: &str) -> &mut Book {
        self.books.entry(policy.to_string()).or_default().entry(volume.to_string()).or_default()
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
            books.retain(|v, _| volumes.contains(v));
            for (volume, book) in books.iter_mut() {
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

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> StateFile {
        StateFile { path: dir.join("meta").join("lifecycle.json") }
    }

    pub fn load(&self) -> Result<LifecycleState> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::Internal(format!(
                    "{} is damaged ({e}); restore it from a backup, or remove it to start without policies and holds",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LifecycleState::default()),
            Err(e) => Err(Error::Internal(format!("cannot read {}: {e}", self.path.display()))),
        }
    }

    /// Replaces the file atomically and durably.
    pub fn save(&self, state: &LifecycleState) -> Result<()> {
        let bytes = serde_json::to_vec(state).map_err(|e| Error::Internal(e.to_string()))?;
        crate::fsutil::replace_file(&self.path, &bytes, true)
            .map_err(|e| Error::Internal(format!("cannot write {}: {e}", self.path.display())))
    }
}
