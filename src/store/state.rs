//! What this node knows about the store side of its volumes and snapshots: each volume's home
//! region and each snapshot's upload status. Small and rarely changed, so it is one JSON file
//! (`meta/remote.json`) replaced atomically (`fsutil::replace_file`; synced, except for the
//! queue entry a snapshot create adds, which its upload syncs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{Result, StoreError};

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
}

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> StateFile {
        StateFile { path: dir.join("meta").join("remote.json") }
    }

    pub fn load(&self) -> Result<RemoteState> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                StoreError::Config(format!(
                    "{} is damaged ({e}); restore it from a backup or remove it (snapshots then show no upload status and upload again)",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RemoteState::default()),
            Err(e) => Err(StoreError::io(format!("reading {}", self.path.display()))(e)),
        }
    }

    /// Replaces the file atomically. With `sync`, durably (fsync of the file and the
    /// directory); without, it survives the process but maybe not a power loss.
    pub fn save(&self, state: &RemoteState, sync: bool) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Invalid(e.to_string()))?;
        crate::fsutil::replace_file(&self.path, &bytes, sync)
            .map_err(StoreError::io(format!("writing {}", self.path.display())))
    }
}
