//! What this node knows about the store side of its volumes and snapshots: each volume's home
//! region and each snapshot's upload status. `meta/remote.json` plus a log of changes
//! (`remote.log`: a save appends only the records it changed, see [`crate::statelog`]; synced,
//! except for the queue entry a snapshot create adds, which its upload syncs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{Result, StoreError};
use crate::statelog::StateLog;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadState {
    Uploading,
    Available,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub region: String,
    pub state: UploadState,
    #[serde(default)]
    pub reason: Option<String>,
    /// When the manifest was written (seconds since the epoch).
    #[serde(default)]
    pub uploaded_at: Option<u64>,
    /// Bytes this snapshot's upload added to the store.
    #[serde(default)]
    pub added_bytes: u64,
    #[serde(default)]
    pub base: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteState {
    /// Volume id → home region.
    #[serde(default)]
    pub volumes: BTreeMap<String, String>,
    /// Snapshot id → upload record.
    #[serde(default)]
    pub snapshots: BTreeMap<String, SnapshotRecord>,
    /// Snapshot id → region: snapshots deleted here whose manifest is still to be deleted
    /// from the store — once no volume loads from it any more, retried until the delete
    /// succeeds (a crash or an unreachable store never leaves a manifest behind).
    #[serde(default)]
    pub deferred_deletes: BTreeMap<String, String>,
    /// What changed since the last save.
    #[serde(skip)]
    touched: BTreeSet<RemoteKey>,
}

/// What changed in a [`RemoteState`]: the new value of one record (`None`: gone), a line of
/// `meta/remote.log` (see [`crate::statelog`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RemoteChange {
    Volume { id: String, region: Option<String> },
    Snapshot { id: String, record: Option<SnapshotRecord> },
    DeferredDelete { id: String, region: Option<String> },
}

/// A record of [`RemoteState`] that changed since the last save.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RemoteKey {
    Volume(String),
    Snapshot(String),
    DeferredDelete(String),
}

impl RemoteState {
    /// Marks a record changed: the next save writes it.
    pub fn touch(&mut self, key: RemoteKey) {
        self.touched.insert(key);
    }

    /// What changed since the last save, with the current values; forgets the marks.
    pub fn changes(&mut self) -> Vec<RemoteChange> {
        std::mem::take(&mut self.touched)
            .into_iter()
            .map(|k| match k {
                RemoteKey::Volume(id) => RemoteChange::Volume { region: self.volumes.get(&id).cloned(), id },
                RemoteKey::Snapshot(id) => RemoteChange::Snapshot { record: self.snapshots.get(&id).cloned(), id },
                RemoteKey::DeferredDelete(id) => {
                    RemoteChange::DeferredDelete { region: self.deferred_deletes.get(&id).cloned(), id }
                }
            })
            .collect()
    }

    pub fn apply(&mut self, c: RemoteChange) {
        fn put<V>(map: &mut BTreeMap<String, V>, key: String, value: Option<V>) {
            match value {
                Some(v) => map.insert(key, v),
                None => map.remove(&key),
            };
        }
        match c {
            RemoteChange::Volume { id, region } => put(&mut self.volumes, id, region),
            RemoteChange::Snapshot { id, record } => put(&mut self.snapshots, id, record),
            RemoteChange::DeferredDelete { id, region } => put(&mut self.deferred_deletes, id, region),
        }
    }
}

/// `meta/remote.json` and its log of changes.
pub struct StateFile {
    log: StateLog<RemoteChange>,
}

impl StateFile {
    /// Opens the files and reads the state.
    pub fn open(dir: &Path) -> Result<(StateFile, RemoteState)> {
        let (log, state) = StateLog::open(dir, "remote", RemoteState::apply).map_err(|e| {
            StoreError::Config(format!(
                "{e}; restore meta/remote.json and remote.log from a backup or remove both (snapshots then show no upload status and upload again)"
            ))
        })?;
        Ok((StateFile { log }, state))
    }

    /// Appends what changed (synced with `sync`: without, it survives the process but maybe
    /// not a power loss); `snapshot` gives the whole state when the log is due to be folded
    /// into a new `remote.json`.
    pub fn save(&self, changes: &[RemoteChange], sync: bool, snapshot: impl FnOnce() -> RemoteState) -> Result<()> {
        let fail = |e: String| StoreError::io(e)(std::io::Error::other("state file"));
        if self.log.append(changes, sync).map_err(fail)? {
            self.log.compact(&snapshot()).map_err(fail)?;
        }
        Ok(())
    }

    /// Writes the whole state as a new `remote.json` and empties the log.
    pub fn compact(&self, state: &RemoteState) -> Result<()> {
        self.log.compact(state).map_err(|e| StoreError::io(e)(std::io::Error::other("state file")))
    }
}
