//! Public value types of the engine: what the control API serializes.

use serde::{Deserialize, Serialize};

/// A volume as the API and CLI show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Unique id, `v-` followed by 16 hex digits.
    pub id: String,
    pub name: String,
    /// Size in bytes (multiple of 4 KiB).
    pub size: u64,
    /// Cluster size in bytes (power of two, 4 KiB..1 MiB).
    pub cluster_size: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Bytes of clusters the volume's current content maps to stored data (not zeros).
    pub allocated_bytes: u64,
    /// Clusters written, trimmed or zeroed since the last snapshot (the live dirty bitmap).
    pub dirty_clusters: u64,
    /// Size of the live dirty bitmap, serialized (what it costs to keep and persist).
    pub dirty_bitmap_bytes: u64,
    /// Number of snapshots of this volume.
    pub snapshots: u64,
    /// `VOLUME@SNAPSHOT` this volume was cloned from, if any.
    pub origin: Option<String>,
    /// Number of writable clients (NBD connections) currently attached.
    pub writers: u64,
    /// Set while some of the volume's data is still only in the object store (the API shows
    /// the store's fuller view instead).
    #[serde(skip)]
    pub hydration: Option<HydrationInfo>,
}

/// How far a volume created from (or rolled back to) a snapshot in the store has loaded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HydrationInfo {
    /// The snapshot the data comes from (`s-…`) and its region.
    pub source: String,
    pub region: String,
    pub clusters_total: u64,
    /// Clusters local now: loaded from the store, found to be holes, or overwritten.
    pub clusters_loaded: u64,
}

/// A snapshot as the API and CLI show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id, `s-` followed by 16 hex digits.
    pub id: String,
    pub name: String,
    pub volume: String,
    pub volume_id: String,
    pub description: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    pub size: u64,
    pub cluster_size: u32,
    /// Clusters changed relative to the parent snapshot (the sealed dirty bitmap).
    pub changed_clusters: u64,
    /// Id of the snapshot this one's changed set is relative to (none for the first one).
    pub parent: Option<String>,
    /// Its name (in the same volume, or the snapshot a clone was made from).
    #[serde(default)]
    pub parent_name: Option<String>,
    /// Names of volumes cloned from this snapshot.
    pub clones: Vec<String>,
    /// Bytes of clusters holding data (not zeros) in this snapshot.
    pub allocated_bytes: u64,
    /// Whether the data is on this node (false once released after upload).
    pub local: bool,
    /// Whether the snapshot survives a crash: false for the moment between its create (which
    /// returns at once) and the commit the daemon starts right away.
    pub durable: bool,
}

/// The group snapshot a member snapshot belongs to, kept by the engine with the member (in its
/// cut's journal record and in checkpoints): what the operations layer needs to rebuild its
/// record of the group snapshot after a crash at any point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupTag {
    /// The group snapshot's id (`g-…`, see [`super::group_snapshot_id`]).
    pub id: u64,
    /// The consistency group's name.
    pub group: String,
    /// Taken with the members quiesced by a hook (application-consistent), else crash-consistent.
    pub application: bool,
}

/// A group snapshot as the engine has it: the tag its members carry, and the members still
/// there (`(volume id, snapshot id)`), in the order they were cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshotInfo {
    pub tag: GroupTag,
    pub name: String,
    pub description: String,
    pub created: u64,
    pub members: Vec<(String, String)>,
}
