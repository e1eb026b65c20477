//! Volumes whose data is (partly) still in the object store: created from a remote snapshot,
//! or rolled back to a released one. Such a map carries a [`Remote`]: the snapshot its
//! not-yet-local clusters come from, and the set of clusters already loaded (hydrated from the
//! store, overwritten, or found to be holes). A cluster is *pending* while it is in neither.
//! Pending clusters have no map entry; reading one fetches it first, never serving zeros.
//!
//! The engine does not talk to the store itself: the daemon installs a [`ClusterSource`]
//! (the store's hydration service) that fetches clusters by priority.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use roaring::RoaringTreemap;

use super::error::Result;

/// A snapshot in an object-store region: where pending clusters are fetched from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemoteSource {
    pub region: String,
    pub snapshot: u64,
}

impl std::fmt::Display for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} in region '{}'", super::snapshot_id(self.snapshot), self.region)
    }
}

/// The not-yet-local part of a map. Shared (`Arc`) between a head and its snapshots until one
/// of them loads more (copy on write).
#[derive(Clone)]
pub(crate) struct Remote {
    pub(crate) source: RemoteSource,
    /// Clusters loaded since the map was attached to `source`.
    pub(crate) loaded: Arc<RoaringTreemap>,
}

impl Remote {
    pub(crate) fn new(source: RemoteSource) -> Remote {
        Remote { source, loaded: Arc::new(RoaringTreemap::new()) }
    }

    pub(crate) fn is_pending(&self, cluster: u64) -> bool {
        !self.loaded.contains(cluster)
    }
}

/// Whether a map still has pending clusters (`None`: fully local).
pub(crate) fn pending(remote: &Option<Remote>, cluster: u64) -> bool {
    remote.as_ref().is_some_and(|r| r.is_pending(cluster))
}

/// Who is waiting for a fetch. Foreground requests go first; background hydration yields to
/// both others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A client read or partial write is waiting for it.
    Foreground,
    /// Prefetch after sequential reads (or an NBD CACHE request).
    ReadAhead,
}

/// The store side of hydration, as the engine sees it.
pub trait ClusterSource: Send + Sync {
    /// The plaintext of `cluster` of `source` (verified), or `None` when the snapshot has no
    /// data there (a hole). Concurrent calls for one cluster share one fetch. Fails after the
    /// configured bound when the store keeps failing.
    fn fetch(
        &self,
        source: &RemoteSource,
        cluster: u64,
        priority: Priority,
    ) -> BoxFuture<'static, Result<Option<Bytes>>>;
    /// Runs of clusters `start..end` of `source` with and without data, `(first, end,
    /// has_data)`, in order from `start` (a prefix of the range may be answered). By default
    /// everything may hold data; the store answers from the snapshot's map pages.
    fn data_runs(
        &self,
        source: &RemoteSource,
        start: u64,
        end: u64,
    ) -> BoxFuture<'static, Result<Vec<(u64, u64, bool)>>> {
        let _ = source;
        Box::pin(futures::future::ready(Ok(vec![(start, end, true)])))
    }
    /// Bytes to prefetch after a sequential read (0: no read-ahead).
    fn readahead_bytes(&self) -> u64;
    /// The runtime fetches run on (for callers on threads outside it, e.g. ublk queues).
    fn runtime(&self) -> tokio::runtime::Handle;
}
