//! Volumes loading from the store: what is still pending, and installing what the store side
//! (`ClusterSource`, src/store/hydrate.rs) fetched.

use std::sync::Arc;

use super::error::{EngineError, Result};
use super::journal::Record;
use super::registry::Volume;
use super::remote::{ClusterSource, Priority, RemoteSource};
use super::Engine;

/// Clusters one request (or read-ahead) fetches from the store at a time.
const LOAD_CONCURRENCY: usize = 64;

pub(crate) fn no_store() -> EngineError {
    EngineError::Unavailable("the object store service is not running (the daemon is starting or stopping)".into())
}

impl Engine {
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
}
