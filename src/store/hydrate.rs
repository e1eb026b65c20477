//! Hydration: loading volumes created from (or rolled back to) a snapshot in the store.
//!
//! One scheduler for every such volume. Foreground fetches (a client read or partial write is
//! waiting) and read-ahead go out at once, one ranged GET per cluster, with no queue in front
//! of them; concurrent requests for one cluster share one fetch. Background hydration walks
//! each volume's map page by page; each page's pending clusters become ranged GETs of runs of
//! nearby blobs in one pack (large, sequential reads of each pack), issued in volume order,
//! `concurrency` at a time under its own bandwidth limit. Before every GET it waits until no
//! foreground fetch is in flight: it only uses the store when clients do not. Every blob is
//! verified (AEAD tag, keyed hash) before it is installed; the engine journals each installed
//! cluster, and background work commits at least every second, so a restart resumes where it
//! was.
//!
//! A snapshot archived in a class that needs a thaw and not restored: reads fail at once with
//! [`StoreError::Frozen`] (its sentence says to run `snapshot restore-archive`), and the
//! background load stops its pass at the first frozen object and tries again after its
//! backoff — it goes on by itself once the objects are readable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OnceCell};
use tokio::task::JoinSet;

use super::config::HydrateConfig;
use super::error::{Result, StoreError};
use super::format::{manifest_key, pack_key, BlobRef, Manifest, Page, PAGE_CLUSTERS};
use super::objects::RateLimiter;
use super::region::{coalesce, Region, RESTORE_RUN};
use super::shares::ShareState;
use super::StoreService;
use crate::engine::{self, ClusterSource, EngineError, Priority, RemoteSource};

/// Backoff between background attempts while the store fails.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Background loading commits at least this often, so a crash loses at most this much of it.
const COMMIT_EVERY: Duration = Duration::from_secs(1);
/// Map pages kept per source snapshot (a full page is 256 KiB): the background walks them in
/// order, so older ones are rarely needed again.
const CACHED_PAGES: usize = 64;

/// A value fetched once and shared by everyone who asks while it is in flight (`None`: a hole,
/// or no page).
type Shared<T> = Arc<OnceCell<Option<T>>>;

/// A source snapshot, opened: its region, manifest and the map pages fetched so far.
struct SourceView {
    region: Arc<Region>,
    /// Held while a run's clusters are written: concurrent buffered writes to one slot file
    /// only spin on the file's lock in the kernel, so runs decrypt in parallel and write in
    /// turn.
    writing: Mutex<()>,
    manifest: Arc<Manifest>,
    pages: Mutex<PageCache>,
}

/// Cached pages, and their indexes oldest first (evicted beyond `CACHED_PAGES`).
#[derive(Default)]
struct PageCache {
    pages: HashMap<u64, Shared<Arc<Page>>>,
    order: std::collections::VecDeque<u64>,
}

impl SourceView {
    /// Map page `index` (fetched once, shared); `None` when the snapshot has no data there.
    async fn page(&self, index: u64) -> Result<Option<Arc<Page>>> {
        let cell = {
            let mut cache = self.pages.lock();
            match cache.pages.get(&index) {
                Some(c) => c.clone(),
                None => {
                    if cache.order.len() >= CACHED_PAGES {
                        if let Some(old) = cache.order.pop_front() {
                            cache.pages.remove(&old);
                        }
                    }
                    cache.order.push_back(index);
                    cache.pages.entry(index).or_default().clone()
                }
            }
        };
        cell.get_or_try_init(|| async {
            let Some(p) = self.manifest.pages.iter().find(|p| p.index == index) else { return Ok(None) };
            let r = p.blob.to_ref(&manifest_key(&self.manifest.snapshot_id))?;
            Ok(Some(Arc::new(self.region.read_page(&self.manifest, index, &r).await?)))
        })
        .await
        .cloned()
    }

    /// Where cluster `c`'s data is; `None` for a hole.
    /// Runs of clusters with and without data in `start..end`: `(first, end, has_data)`.
    /// O(map pages with data in the range + their entries): pages the manifest does not list
    /// are skipped whole, so a sparse 64 TiB snapshot is answered at once.
    async fn data_runs(&self, start: u64, end: u64) -> Result<Vec<(u64, u64, bool)>> {
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        fn push(runs: &mut Vec<(u64, u64, bool)>, from: u64, to: u64, data: bool) {
            if from >= to {
                return;
            }
            match runs.last_mut() {
                Some(last) if last.1 == from && last.2 == data => last.1 = to,
                _ => runs.push((from, to, data)),
            }
        }
        let mut indexes: Vec<u64> = self.manifest.pages.iter().map(|p| p.index).collect();
        indexes.sort_unstable();
        let first_page = indexes.partition_point(|&i| i < start / PAGE_CLUSTERS);
        let mut pos = start;
        for &index in indexes[first_page..].iter().take_while(|&&i| i * PAGE_CLUSTERS < end) {
            let base = index * PAGE_CLUSTERS;
            push(&mut runs, pos, base.max(pos), false);
            pos = pos.max(base);
            let page_end = (base + PAGE_CLUSTERS).min(end);
            if let Some(page) = self.page(index).await? {
                for &(slot, _) in &page.entries {
                    let c = base + slot as u64;
                    if c < pos || c >= page_end {
                        continue;
                    }
                    push(&mut runs, pos, c, false);
                    push(&mut runs, c, c + 1, true);
                    pos = c + 1;
                }
            }
            push(&mut runs, pos, page_end, false);
            pos = page_end;
            if runs.len() > 1024 {
                // A prefix of the range is an answer; the rest was not looked at.
                return Ok(runs);
            }
        }
        push(&mut runs, pos, end, false);
        Ok(runs)
    }

    async fn locate(&self, c: u64) -> Result<Option<BlobRef>> {
        let Some(page) = self.page(c / PAGE_CLUSTERS).await? else { return Ok(None) };
        let slot = (c % PAGE_CLUSTERS) as u32;
        Ok(page.entries.binary_search_by_key(&slot, |(i, _)| *i).ok().map(|i| page.entries[i].1))
    }
}

/// Background hydration of one volume, as `volume show` reports it.
pub struct VolumeProgress {
    source: RemoteSource,
    started: Instant,
    /// Bytes fetched from the store by this run (sealed, as transferred).
    fetched: AtomicU64,
    last_error: Mutex<Option<String>>,
    done: std::sync::atomic::AtomicBool,
}

/// Hydration state of a volume, for the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HydrationView {
    /// The snapshot the data comes from, and its region.
    pub source: String,
    pub region: String,
    /// `loading` (background running), `on_demand` (only what is read is loaded; start
    /// the rest with `volume hydrate`), or `retrying` (the store is failing).
    pub state: String,
    pub clusters_total: u64,
    pub clusters_loaded: u64,
    /// The snapshot's data (once its manifest is read; the volume's size before), and how
    /// much of it is loaded.
    pub bytes_total: u64,
    pub bytes_loaded: u64,
    /// Bytes per second fetched from the store by this run.
    pub rate: u64,
    pub eta_secs: Option<u64>,
    /// Bytes transferred from the store by this run.
    pub bytes_fetched: u64,
    pub last_error: Option<String>,
}

pub struct Hydration {
    svc: Weak<StoreService>,
    engine: Arc<engine::Engine>,
    runtime: tokio::runtime::Handle,
    pub config: HydrateConfig,
    limiter: Option<Arc<RateLimiter>>,
    sources: Mutex<HashMap<RemoteSource, Arc<OnceCell<Arc<SourceView>>>>>,
    inflight: Mutex<HashMap<(RemoteSource, u64), Shared<Bytes>>>,
    /// Foreground and read-ahead fetches in flight; background work waits for zero.
    foreground: AtomicUsize,
    idle: Notify,
    volumes: Mutex<HashMap<u64, Arc<VolumeProgress>>>,
    /// Sources whose share with the accounts loading from them has ended (with why), and
    /// those still readable (`None`), with when that was found (`share_ended`).
    share_checks: Mutex<HashMap<RemoteSource, (Instant, Option<String>)>>,
    self_ref: Weak<Hydration>,
}

/// How long a share grant read from the store is trusted before it is read again: an
/// unshare's grace period ends within this of its time on every node.
const SHARE_RECHECK: Duration = Duration::from_secs(5);

/// Counts a foreground fetch while it is in flight.
struct ForegroundGuard<'a>(&'a Hydration);

impl Drop for ForegroundGuard<'_> {
    fn drop(&mut self) {
        if self.0.foreground.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn engine_error(e: StoreError) -> EngineError {
    match e {
        StoreError::Corrupt { .. } | StoreError::Missing(_) => EngineError::Corrupt(e.to_string()),
        other => EngineError::Unavailable(other.to_string()),
    }
}

impl Hydration {
    pub fn new(
        svc: Weak<StoreService>,
        engine: Arc<engine::Engine>,
        runtime: tokio::runtime::Handle,
        config: HydrateConfig,
    ) -> Arc<Hydration> {
        Arc::new_cyclic(|self_ref| Hydration {
            svc,
            engine,
            runtime,
            limiter: RateLimiter::new(config.bandwidth_limit),
            config,
            sources: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            foreground: AtomicUsize::new(0),
            idle: Notify::new(),
            volumes: Mutex::new(HashMap::new()),
            share_checks: Mutex::new(HashMap::new()),
            self_ref: self_ref.clone(),
        })
    }

    async fn view(&self, source: &RemoteSource) -> Result<Arc<SourceView>> {
        let cell = self.sources.lock().entry(source.clone()).or_default().clone();
        cell.get_or_try_init(|| async {
            let svc = self.svc.upgrade().ok_or_else(|| StoreError::Unavailable("the daemon is stopping".into()))?;
            let region = svc.region(&source.region).await?;
            let manifest = region.manifest(&engine::snapshot_id(source.snapshot)).await?;
            Ok(Arc::new(SourceView { region, manifest, writing: Mutex::new(()), pages: Mutex::default() }))
        })
        .await
        .cloned()
    }

    /// Drops a source's cached manifest and pages: GC moved blobs (a location is gone).
    fn forget(&self, source: &RemoteSource) {
        if let Some(cell) = self.sources.lock().remove(source) {
            if let Some(v) = cell.get() {
                v.region.forget_manifest(&engine::snapshot_id(source.snapshot));
            }
        }
    }

    /// Why `source` may no longer be read, if so: it is another account's snapshot, shared
    /// with the accounts whose volumes load from it, and the share has ended (revoked or
    /// expired, then its grace period over). A snapshot with no grant at all (the owner's
    /// own, or one an administrator restored across accounts) stays readable. The answer is
    /// kept for `SHARE_RECHECK`: a fetch costs one lookup.
    pub async fn share_ended(&self, source: &RemoteSource) -> Option<String> {
        if let Some((at, why)) = self.share_checks.lock().get(source) {
            if at.elapsed() < SHARE_RECHECK {
                return why.clone();
            }
        }
        let why = self.check_share(source).await;
        self.share_checks.lock().insert(source.clone(), (Instant::now(), why.clone()));
        why
    }

    async fn check_share(&self, source: &RemoteSource) -> Option<String> {
        let owner = engine::owner_of(&source.region);
        let loading = self.engine.hydrating_volumes();
        let recipients: std::collections::BTreeSet<&str> =
            loading.iter().filter(|(_, _, of)| of == source).map(|(_, name, _)| engine::owner_of(name)).collect();
        if recipients.contains(owner) {
            return None;
        }
        let svc = self.svc.upgrade()?;
        let (region, id) = (engine::bare_name(&source.region), engine::snapshot_id(source.snapshot));
        let now = self.engine.clock().now();
        for recipient in recipients {
            // Unreadable now: the last answer stands (none: readable).
            let grant = match svc.share(region, recipient, &id).await {
                Ok(g) => g,
                Err(_) => return self.share_checks.lock().get(source).and_then(|(_, why)| why.clone()),
            };
            match grant.as_ref().map(|g| g.state(now)) {
                Some(ShareState::Ended) => return grant.map(|g| g.ended_message()),
                // Revoked, in its grace period: what loads from it loads now, in the
                // background, before the grace ends.
                Some(ShareState::Grace) => self.load_dependents(source),
                _ => {}
            }
        }
        None
    }

    /// Starts the background load of every volume loading from `source` (not running yet).
    fn load_dependents(&self, source: &RemoteSource) {
        for (volume, _, of) in self.engine.hydrating_volumes() {
            if of == *source {
                self.start(volume);
            }
        }
    }

    /// One cluster, read from the store; a location gone after GC is looked up again once.
    async fn fetch_cluster(&self, source: &RemoteSource, c: u64) -> Result<Option<Bytes>> {
        if let Some(why) = self.share_ended(source).await {
            return Err(StoreError::ShareEnded(why));
        }
        let mut again = true;
        loop {
            let view = self.view(source).await?;
            let r = match view.locate(c).await {
                Ok(None) => return Ok(None),
                Ok(Some(b)) => view.region.read_blob(&b).await.map(|p| Some(p.into_bytes())),
                Err(e) => Err(e),
            };
            match r {
                Err(StoreError::Missing(_)) if again => {
                    again = false;
                    self.forget(source);
                }
                r => return r,
            }
        }
    }

    /// A foreground fetch: shared with concurrent requests for the cluster, retried while the
    /// store fails, given up after `read_timeout`.
    pub async fn fetch_foreground(&self, source: RemoteSource, c: u64) -> engine::Result<Option<Bytes>> {
        self.foreground.fetch_add(1, Ordering::AcqRel);
        let _guard = ForegroundGuard(self);
        let key = (source.clone(), c);
        let cell = self.inflight.lock().entry(key.clone()).or_default().clone();
        let last_error = Mutex::new(None::<String>);
        let attempt = cell.get_or_try_init(|| async {
            let mut backoff = Duration::from_millis(50);
            loop {
                match self.fetch_cluster(&source, c).await {
                    Ok(v) => return Ok(v),
                    Err(
                        e @ (StoreError::Corrupt { .. }
                        | StoreError::Missing(_)
                        | StoreError::Config(_)
                        | StoreError::ShareEnded(_)
                        | StoreError::Frozen { .. }),
                    ) => return Err(e.reading(&engine::snapshot_id(source.snapshot))),
                    Err(e) => {
                        *last_error.lock() = Some(e.to_string());
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            }
        });
        let outcome = tokio::time::timeout(self.config.read_timeout, attempt).await;
        {
            let mut inflight = self.inflight.lock();
            if inflight.get(&key).is_some_and(|x| Arc::ptr_eq(x, &cell)) {
                inflight.remove(&key);
            }
        }
        match outcome {
            Ok(Ok(v)) => Ok(v.clone()),
            Ok(Err(e)) => {
                tracing::warn!(source = %source, cluster = c, error = %e, "cannot load a cluster from the store");
                Err(engine_error(e))
            }
            Err(_) => {
                let last = last_error.lock().take().unwrap_or_else(|| "no answer".into());
                tracing::warn!(source = %source, cluster = c, error = %last, "gave up loading a cluster");
                Err(EngineError::Unavailable(format!(
                    "cluster {c} of {source} could not be loaded within {:?} ({last}); the store is unreachable, retry when it is back",
                    self.config.read_timeout
                )))
            }
        }
    }

    /// Runs of clusters of `start..end` with and without data (see `SourceView::data_runs`).
    async fn data_runs_of(&self, source: &RemoteSource, start: u64, end: u64) -> engine::Result<Vec<(u64, u64, bool)>> {
        let mut again = true;
        loop {
            let found = match self.view(source).await {
                Ok(view) => view.data_runs(start, end).await,
                Err(e) => Err(e),
            };
            match found {
                Err(StoreError::Missing(_)) if again => {
                    again = false;
                    self.forget(source);
                }
                r => return r.map_err(|e| engine_error(e.reading(&engine::snapshot_id(source.snapshot)))),
            }
        }
    }

    /// Waits until no foreground fetch is in flight (background work yields to them).
    async fn foreground_idle(&self) {
        while self.foreground.load(Ordering::Acquire) > 0 {
            let notified = self.idle.notified();
            if self.foreground.load(Ordering::Acquire) == 0 {
                break;
            }
            // The timeout covers a wake-up between the check and the registration.
            let _ = tokio::time::timeout(Duration::from_millis(20), notified).await;
        }
    }

    /// Starts background hydration of every volume still loading (at daemon start).
    pub fn resume_all(&self) {
        if !self.config.background {
            return;
        }
        for (id, name, _) in self.engine.hydrating_volumes() {
            tracing::info!(volume = %name, id = %engine::volume_id(id), "resuming hydration");
            self.start(id);
        }
    }

    /// Starts background hydration of a volume (nothing to do when it runs or is complete).
    pub fn start(&self, volume: u64) {
        let Some((_, name, source)) = self.engine.hydrating_volumes().into_iter().find(|(id, ..)| *id == volume) else {
            return;
        };
        let progress = {
            let mut vols = self.volumes.lock();
            if vols.get(&volume).is_some_and(|p| p.source == source && !p.done.load(Ordering::Acquire)) {
                return;
            }
            let p = Arc::new(VolumeProgress {
                source: source.clone(),
                started: Instant::now(),
                fetched: AtomicU64::new(0),
                last_error: Mutex::new(None),
                done: std::sync::atomic::AtomicBool::new(false),
            });
            vols.insert(volume, p.clone());
            p
        };
        let Some(this) = self.self_ref.upgrade() else { return };
        self.runtime.spawn(async move {
            tracing::info!(volume = %name, id = %engine::volume_id(volume), source = %source, "hydration started");
            this.run_volume(volume, &name, &source, &progress).await;
            progress.done.store(true, Ordering::Release);
            {
                let mut vols = this.volumes.lock();
                if vols.get(&volume).is_some_and(|p| Arc::ptr_eq(p, &progress)) {
                    vols.remove(&volume);
                }
            }
            // The source's manifest and pages are dropped once no volume loads from it.
            if !this.engine.hydrating_volumes().iter().any(|(.., s)| *s == source) {
                this.sources.lock().remove(&source);
            }
            let finished = this.engine.volume(&engine::volume_id(volume)).is_ok_and(|v| v.hydration.is_none());
            if finished {
                tracing::info!(
                    volume = %name,
                    id = %engine::volume_id(volume),
                    secs = progress.started.elapsed().as_secs_f64(),
                    fetched = progress.fetched.load(Ordering::Relaxed),
                    "hydration complete"
                );
            }
        });
    }

    /// Loads every pending cluster of the volume, page by page, until none is left or the
    /// volume stops loading from `source` (deleted, rolled back).
    async fn run_volume(&self, volume: u64, name: &str, source: &RemoteSource, progress: &Arc<VolumeProgress>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let failed = match self.pass(volume, source, progress).await {
                Ok(more) => more,
                Err(e) => {
                    if matches!(e, StoreError::Missing(_)) {
                        self.forget(source);
                    }
                    let e = e.reading(&engine::snapshot_id(source.snapshot)).to_string();
                    // A thaw takes hours: said once, not at every attempt.
                    if progress.last_error.lock().as_ref() != Some(&e) {
                        tracing::warn!(volume = %name, id = %engine::volume_id(volume), source = %source, error = %e, "background hydration failed; retrying");
                    }
                    *progress.last_error.lock() = Some(e);
                    true
                }
            };
            let Some(left) = self.engine.pending_count(volume, source) else { return };
            if left == 0 {
                let _ = self.commit().await;
                return;
            }
            if failed {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            } else {
                backoff = BACKOFF_MIN;
            }
        }
    }

    async fn commit(&self) -> engine::Result<()> {
        let e = self.engine.clone();
        tokio::task::spawn_blocking(move || e.commit())
            .await
            .map_err(|e| EngineError::Unavailable(format!("commit task failed: {e}")))?
    }

    /// One walk over the volume's pages. Returns whether some runs failed (to retry later).
    async fn pass(&self, volume: u64, source: &RemoteSource, progress: &Arc<VolumeProgress>) -> Result<bool> {
        let view = self.view(source).await?;
        let clusters = view.manifest.size.div_ceil(view.manifest.cluster_size as u64);
        let mut failed = false;
        let mut committed = Instant::now();
        let mut committing: Option<tokio::task::JoinHandle<Result<()>>> = None;
        // Runs in flight, each its own task: GET, then verify and install on a blocking
        // thread, so several runs decrypt in parallel and the runtime stays free for clients.
        let mut tasks: JoinSet<Result<usize>> = JoinSet::new();
        let reap = |r: std::result::Result<Result<usize>, tokio::task::JoinError>, failed: &mut bool| match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(StoreError::Missing(m))) => Err(StoreError::Missing(m)),
            // Not restored: the rest of the pass would fail alike.
            Ok(Err(e @ StoreError::Frozen { .. })) => Err(e),
            Ok(Err(e)) => {
                *progress.last_error.lock() = Some(e.to_string());
                *failed = true;
                Ok(())
            }
            Err(e) => Err(StoreError::Unavailable(format!("a hydration task failed: {e}"))),
        };
        for index in 0..clusters.div_ceil(PAGE_CLUSTERS) {
            // A share ending stops the load between pages, not only at the next pass.
            if let Some(why) = self.share_ended(source).await {
                return Err(StoreError::ShareEnded(why));
            }
            let start = index * PAGE_CLUSTERS;
            let Some(pending) = self.engine.pending_clusters(volume, source, start..start + PAGE_CLUSTERS) else {
                return Ok(false);
            };
            if pending.is_empty() {
                continue;
            }
            self.foreground_idle().await;
            let page = view.page(index).await?;
            // Clusters the page has no data for are holes: loaded without a fetch.
            let mut blobs = Vec::new();
            let mut holes: Vec<std::ops::Range<u64>> = Vec::new();
            for c in pending {
                let slot = (c % PAGE_CLUSTERS) as u32;
                let blob = page
                    .as_ref()
                    .and_then(|p| p.entries.binary_search_by_key(&slot, |(i, _)| *i).ok().map(|i| p.entries[i].1));
                match blob {
                    Some(b) => blobs.push((b, c)),
                    None => match holes.last_mut() {
                        Some(r) if r.end == c => r.end = c + 1,
                        _ => holes.push(c..c + 1),
                    },
                }
            }
            self.engine.install_holes(volume, source, &holes).map_err(|e| StoreError::Unavailable(e.to_string()))?;
            // Each run is one ranged GET of one pack; runs go in volume order, so what a
            // client is likely to read next (the start of a disk, sequential data) comes first.
            let mut runs = coalesce(blobs, RESTORE_RUN);
            runs.sort_by_key(|run| run.iter().map(|(_, c)| *c).min());
            for run in runs {
                while tasks.len() >= self.config.concurrency {
                    if let Some(r) = tasks.join_next().await {
                        reap(r, &mut failed)?;
                    }
                }
                // Commit in the background (one at a time): the flush of what was loaded
                // must not stall the next GETs.
                if committing.as_ref().is_none_or(|c| c.is_finished()) && committed.elapsed() >= COMMIT_EVERY {
                    if let Some(c) = committing.take() {
                        c.await.map_err(|e| StoreError::Unavailable(e.to_string()))??;
                    }
                    let e = self.engine.clone();
                    committing = Some(tokio::task::spawn_blocking(move || {
                        e.commit().map_err(|e| StoreError::Unavailable(e.to_string()))
                    }));
                    committed = Instant::now();
                }
                let bytes = run.iter().map(|(r, _)| r.len as u64).sum::<u64>();
                self.foreground_idle().await;
                if let Some(l) = &self.limiter {
                    l.acquire(bytes).await;
                }
                let task = (self.engine.clone(), view.clone(), source.clone(), progress.clone());
                tasks.spawn(load_run(task.0, task.1, volume, task.2, run, task.3));
            }
        }
        while let Some(r) = tasks.join_next().await {
            reap(r, &mut failed)?;
        }
        if let Some(c) = committing {
            c.await.map_err(|e| StoreError::Unavailable(e.to_string()))??;
        }
        // What this pass loaded survives a crash from here on.
        self.commit().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        if !failed {
            *progress.last_error.lock() = None;
        }
        Ok(failed)
    }

    /// The hydration state of a volume loading from the store, for `volume show`.
    pub fn view_of(&self, info: &engine::VolumeInfo) -> Option<HydrationView> {
        let h = info.hydration.as_ref()?;
        let cs = info.cluster_size as u64;
        let progress = self.volumes.lock().get(&engine::parse_volume_id(&info.id)?).cloned();
        let running = progress.as_ref().filter(|p| {
            !p.done.load(Ordering::Acquire)
                && engine::snapshot_id(p.source.snapshot) == h.source
                && p.source.region == h.region
        });
        let (rate, fetched, last_error) = match running {
            Some(p) => {
                let secs = p.started.elapsed().as_secs_f64().max(0.001);
                let fetched = p.fetched.load(Ordering::Relaxed);
                ((fetched as f64 / secs) as u64, fetched, p.last_error.lock().clone())
            }
            None => (0, 0, None),
        };
        let state = match (&running, &last_error) {
            (None, _) => "on_demand",
            (Some(_), Some(_)) => "retrying",
            (Some(_), None) => "loading",
        };
        // Holes are found (and loaded) as pages are read, so what remains is mostly data.
        let remaining = (h.clusters_total - h.clusters_loaded) * cs;
        // What has to be loaded is the snapshot's data, not the volume's size (a 256 MiB
        // snapshot of a 100 GiB volume loads 256 MiB): known once its manifest is read.
        let data = self
            .svc
            .upgrade()
            .and_then(|svc| svc.cached_manifest(&h.region, &h.source))
            .map(|m| (m.allocated_clusters * cs).min(info.size));
        let (bytes_total, bytes_loaded) = match data {
            Some(total) => (total, total - remaining.min(total)),
            None => (info.size, (h.clusters_loaded * cs).min(info.size)),
        };
        Some(HydrationView {
            source: h.source.clone(),
            region: h.region.clone(),
            state: state.into(),
            clusters_total: h.clusters_total,
            clusters_loaded: h.clusters_loaded,
            bytes_total,
            bytes_loaded,
            rate,
            eta_secs: (rate > 0).then(|| remaining / rate),
            bytes_fetched: fetched,
            last_error,
        })
    }
}

/// One coalesced ranged GET of a pack; then, on a blocking thread, each blob is verified and
/// installed into the volume. Returns how many clusters were installed.
async fn load_run(
    engine: Arc<engine::Engine>,
    view: Arc<SourceView>,
    volume: u64,
    source: RemoteSource,
    run: Vec<(BlobRef, u64)>,
    progress: Arc<VolumeProgress>,
) -> Result<usize> {
    let start = run[0].0.offset;
    let last = &run[run.len() - 1].0;
    let end = last.offset + last.len as u64;
    let key = pack_key(&run[0].0.pack);
    let bytes = view.region.objects.get_range(&key, start..end).await?;
    progress.fetched.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || {
        // Blobs are decrypted in the GET's buffer itself (it is ours alone; else one copy).
        let mut buf = bytes.try_into_mut().unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
        let mut rest: &mut [u8] = &mut buf;
        let mut at = start;
        let mut plain = Vec::with_capacity(run.len());
        for (r, c) in &run {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((r.offset - at) as usize);
            let (sealed, tail) = tail.split_at_mut(r.len as usize);
            rest = tail;
            at = r.offset + r.len as u64;
            plain.push((*c, view.region.keys.open_blob_in_place(&r.id, sealed, &key)?));
        }
        let items: Vec<(u64, Option<&[u8]>)> = plain.iter().map(|(c, p)| (*c, Some(&p[..]))).collect();
        let _writing = view.writing.lock();
        engine.install_clusters(volume, &source, &items).map_err(|e| StoreError::Unavailable(e.to_string()))
    })
    .await
    .map_err(|e| StoreError::Unavailable(format!("a hydration task failed: {e}")))?
}

impl ClusterSource for Hydration {
    fn fetch(
        &self,
        source: &RemoteSource,
        cluster: u64,
        _priority: Priority,
    ) -> BoxFuture<'static, engine::Result<Option<Bytes>>> {
        let Some(this) = self.self_ref.upgrade() else {
            return futures::future::ready(Err(EngineError::Unavailable("the daemon is stopping".into()))).boxed();
        };
        let source = source.clone();
        async move { this.fetch_foreground(source, cluster).await }.boxed()
    }

    fn data_runs(
        &self,
        source: &RemoteSource,
        start: u64,
        end: u64,
    ) -> BoxFuture<'static, engine::Result<Vec<(u64, u64, bool)>>> {
        let Some(this) = self.self_ref.upgrade() else {
            return futures::future::ready(Err(EngineError::Unavailable("the daemon is stopping".into()))).boxed();
        };
        let source = source.clone();
        async move { this.data_runs_of(&source, start, end).await }.boxed()
    }

    fn readahead_bytes(&self) -> u64 {
        self.config.readahead
    }

    fn runtime(&self) -> tokio::runtime::Handle {
        self.runtime.clone()
    }
}
