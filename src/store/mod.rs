//! The remote snapshot store: regions (object stores named in `snapblk.toml`), background
//! upload of snapshots, reading them back (verify, export, read-only NBD after release),
//! deletion and GC. Format: docs/FORMAT.md ("Object store"); flow: docs/ARCHITECTURE.md.
//!
//! [`StoreService`] is the control handle the daemon and API use. Uploads run one snapshot at
//! a time in creation order (so each later snapshot finds its predecessor uploaded and sends
//! only its changed set), each with parallel PUTs.

pub mod accounting;
pub mod config;
pub mod copies;
pub mod copy;
pub mod crypto;
pub mod error;
pub mod format;
mod gc;
pub mod hydrate;
pub mod index;
pub mod objects;
mod ops;
pub mod region;
pub mod s3;
pub mod shared;
pub mod shares;
pub mod state;
pub mod thaw;
pub mod upload;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub use accounting::{Accounting, SnapshotBytes, VolumeBytes};
pub use config::{Config, OnLimit, Quotas, RecycleBinConfig};
pub use error::{Result, StoreError};
pub use gc::GcReport;
pub use hydrate::HydrationView;
pub use ops::{ExportFormat, RegionInfo, RegionSnapshot, VerifyReport};
pub use state::UploadState;
pub use thaw::ThawReport;

use crate::engine::{Anchor, Engine, SnapshotInfo};
use hydrate::Hydration;
use objects::RateLimiter;
use region::Region;
use state::{RemoteKey, RemoteState, SnapshotRecord, StateFile};
use upload::{Base, Progress};

/// How often local copies due for release are looked at.
const RETENTION_SWEEP: Duration = Duration::from_secs(1);
/// How often a deleted snapshot's manifest that other nodes hold is looked at again.
const HELD_RECHECK: Duration = Duration::from_secs(5);

/// A snapshot's store-side status, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RemoteStatus {
    pub region: String,
    pub state: UploadState,
    #[serde(default)]
    pub reason: Option<String>,
    /// Logical bytes scanned / to scan (while uploading).
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Sealed bytes PUT so far (while uploading).
    pub bytes_sent: u64,
    /// Scan rate, bytes per second (while uploading).
    pub rate: u64,
    /// Bytes this snapshot added to the store.
    pub added_bytes: u64,
    pub uploaded_at: Option<u64>,
    /// The uploaded snapshot this one was sent incrementally against.
    pub base: Option<String>,
}

pub struct StoreService {
    dir: PathBuf,
    engine: Arc<Engine>,
    pub config: Config,
    limiter: Option<Arc<RateLimiter>>,
    /// Repositories by name (`REGION` is the default account's, `ACCOUNT/REGION` another
    /// account's: see [`RegionConfig::for_account`]), each opened on first use.
    repos: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Arc<Region>>>>>,
    state: Mutex<RemoteState>,
    state_file: StateFile,
    saving: Mutex<()>,
    queue: tokio::sync::mpsc::UnboundedSender<String>,
    queue_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    /// Progress of queued and running uploads.
    uploads: Mutex<HashMap<String, Arc<Progress>>>,
    /// Held while a manifest is published or deleted, so a deleted snapshot's upload can
    /// never publish after the delete.
    publish: tokio::sync::Mutex<()>,
    /// Loads volumes created from (or rolled back to) snapshots in the store.
    pub hydration: Arc<Hydration>,
    self_ref: std::sync::Weak<StoreService>,
    /// Told of each failed upload (snapshot id, error), for the event log.
    upload_failed: std::sync::OnceLock<UploadFailedHook>,
    /// This daemon as other nodes of a region see it (holds, the GC lease).
    pub node: shared::Node,
    /// Holds this node has put: (region, snapshot id) → expiry.
    held: Mutex<HashMap<(String, String), u64>>,
    /// Deleted snapshots whose manifest waits for other nodes' holds: when to look again.
    held_elsewhere: Mutex<HashMap<String, Instant>>,
    /// When each region's blob index was last checked against the region's pack list.
    index_checked: Mutex<HashMap<String, u64>>,
    /// Copies to other regions (`snapshot copy`, `snapshot archive`).
    copies: copies::Copies,
    /// Storage accounting by repository (see [`accounting`]).
    accounting: Mutex<HashMap<String, Arc<accounting::AccountingCache>>>,
}

type UploadFailedHook = Box<dyn Fn(&str, &str) + Send + Sync>;

impl StoreService {
    /// Loads the configuration (writing the default one if missing) and the remote state, and
    /// becomes the engine's source of clusters still in the store. Regions are opened on first
    /// use, so a store that is down does not stop the daemon. Runs inside the tokio runtime.
    pub fn open(dir: &Path, engine: Arc<Engine>) -> Result<Arc<StoreService>> {
        let config = Config::load_or_create(dir)?;
        // Key files are read when a region is first used: refuse to start with one that any
        // user can read rather than serve for hours and fail then.
        for r in config.regions.values() {
            crypto::check_key_file(&r.key_file, r.key_file_configured, &r.name)?;
            // Fault injection is a test harness, not a setting: a stray table in a production
            // config must not make the store fail on purpose.
            if r.faults.any() && std::env::var("SNAPBLK_TEST_FAULTS").as_deref() != Ok("1") {
                return Err(StoreError::Config(format!(
                    "region '{}' has a [regions.{}.faults] table, which injects store failures for tests; remove it (the daemon accepts it only with SNAPBLK_TEST_FAULTS=1 in its environment)",
                    r.name, r.name
                )));
            }
        }
        let node = shared::Node::load_or_create(dir)?;
        let copies = copies::Copies::load(dir)?;
        let (state_file, mut state) = StateFile::open(dir)?;
        // Records of snapshots and volumes that no longer exist locally are dropped.
        let snaps: std::collections::HashSet<String> = engine.list_snapshots(None)?.into_iter().map(|s| s.id).collect();
        let vols: std::collections::HashSet<String> = engine.list_volumes().into_iter().map(|v| v.id).collect();
        state.snapshots.retain(|id, _| snaps.contains(id));
        state.volumes.retain(|id, _| vols.contains(id));
        // A delete interrupted before its local delete was durable: the snapshot is still
        // here, so its manifest must stay (the user may delete it again).
        state.deferred_deletes.retain(|id, _| !snaps.contains(id));
        let (queue, queue_rx) = tokio::sync::mpsc::unbounded_channel();
        let (engine_for_hydration, hydrate_config) = (engine.clone(), config.hydrate.clone());
        let svc = Arc::new_cyclic(|self_ref| StoreService {
            dir: dir.to_path_buf(),
            engine,
            limiter: RateLimiter::new(config.bandwidth_limit),
            config,
            repos: Mutex::default(),
            state: Mutex::new(state),
            state_file,
            saving: Mutex::new(()),
            queue,
            queue_rx: Mutex::new(Some(queue_rx)),
            uploads: Mutex::new(HashMap::new()),
            publish: tokio::sync::Mutex::new(()),
            hydration: Hydration::new(
                self_ref.clone(),
                engine_for_hydration,
                tokio::runtime::Handle::current(),
                hydrate_config,
            ),
            self_ref: self_ref.clone(),
            upload_failed: std::sync::OnceLock::new(),
            node,
            held: Mutex::new(HashMap::new()),
            held_elsewhere: Mutex::new(HashMap::new()),
            index_checked: Mutex::new(HashMap::new()),
            copies,
            accounting: Mutex::new(HashMap::new()),
        });
        svc.engine.set_cluster_source(svc.hydration.clone());
        // What the start dropped, and the log, folded into a new remote.json.
        let whole = svc.state.lock().clone();
        svc.state_file.compact(&whole)?;
        Ok(svc)
    }

    /// Starts the store's own background work: the upload worker (resuming unfinished
    /// uploads), volumes' loading, and the sweep that releases local copies due for release
    /// and deletes manifests whose delete waited. (Periodic GC is an operation: see `service`.)
    pub fn start(self: &Arc<Self>) {
        let pending: Vec<String> = {
            let st = self.state.lock();
            let mut v: Vec<_> = st
                .snapshots
                .iter()
                .filter(|(_, r)| r.state == UploadState::Uploading)
                .map(|(id, _)| id.clone())
                .collect();
            // Creation order, so incrementals find their bases.
            let order: HashMap<String, u64> =
                self.engine.list_snapshots(None).unwrap_or_default().into_iter().map(|s| (s.id, s.created)).collect();
            v.sort_by_key(|id| (order.get(id).copied().unwrap_or(0), id.clone()));
            v
        };
        for id in pending {
            tracing::info!(snapshot = %id, "resuming upload");
            self.enqueue(id);
        }
        if let Some(rx) = self.queue_rx.lock().take() {
            tokio::spawn(Arc::clone(self).upload_worker(rx));
        }
        self.hydration.resume_all();
        let svc = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RETENTION_SWEEP).await;
                let Some(s) = svc.upgrade() else { return };
                s.release_due();
                s.sweep_deferred_deletes().await;
            }
        });
        let svc = Arc::downgrade(self);
        let period = self.config.hydrate.hold / 3;
        tokio::spawn(async move {
            loop {
                let Some(s) = svc.upgrade() else { return };
                s.renew_holds().await;
                drop(s);
                tokio::time::sleep(period).await;
            }
        });
    }

    /// Writes the state file. Serialized, and the state is copied under the same lock, so a
    /// older copy never overwrites a newer one.
    fn save(&self) -> Result<()> {
        self.save_with(true)
    }

    /// Removes a record (marked changed); whether it was there.
    fn forget(&self, key: RemoteKey) -> bool {
        let mut st = self.state.lock();
        let gone = match &key {
            RemoteKey::Volume(id) => st.volumes.remove(id).is_some(),
            RemoteKey::Snapshot(id) => st.snapshots.remove(id).is_some(),
            RemoteKey::DeferredDelete(id) => st.deferred_deletes.remove(id).is_some(),
        };
        st.touch(key);
        gone
    }

    /// Writes what changed in the state (the records marked with `touch`). Saves run one at a
    /// time, each taking the changes made before it, so the log's lines are in order.
    fn save_with(&self, sync: bool) -> Result<()> {
        let _saving = self.saving.lock();
        let changes = self.state.lock().changes();
        self.state_file.save(&changes, sync, || self.state.lock().clone())
    }

    /// Whether `name` names a configured region, or an account's repository in one
    /// (`ACCOUNT/REGION`).
    pub fn check_region(&self, name: &str) -> Result<()> {
        let region = crate::engine::bare_name(name);
        let account = crate::engine::owner_of(name);
        if self.config.regions.contains_key(region) && crate::engine::validate_name("account", account).is_ok() {
            return Ok(());
        }
        let names: Vec<_> = self.config.regions.keys().cloned().collect();
        Err(StoreError::NotFound(format!(
            "no region named '{region}' (configured: {}); add it to {}",
            names.join(", "),
            self.dir.join(config::CONFIG_FILE).display()
        )))
    }

    /// The daemon's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn region_names(&self) -> Vec<String> {
        self.config.regions.keys().cloned().collect()
    }

    /// The repositories opened so far (used since the daemon started).
    pub fn opened_regions(&self) -> Vec<String> {
        let mut out: Vec<String> =
            self.repos.lock().iter().filter(|(_, c)| c.initialized()).map(|(n, _)| n.clone()).collect();
        out.sort();
        out
    }

    /// Every configured region's request counters since the daemon started (zeros for one
    /// not used yet: opening it here would reach out to its store), and those of every
    /// account's repository opened.
    pub fn region_metrics(&self) -> Vec<(String, objects::MetricsView)> {
        let repos = self.repos.lock();
        let mut out: Vec<_> =
            self.config
                .regions
                .keys()
                .filter(|name| !repos.contains_key(*name))
                .map(|name| (name.clone(), objects::MetricsView::default()))
                .chain(repos.iter().map(|(name, cell)| {
                    (name.clone(), cell.get().map(|r| r.objects.metrics.view()).unwrap_or_default())
                }))
                .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The opened repository `name` — a region (the default account's repository) or
    /// `ACCOUNT/REGION` — opening it on first use (a failure is retried on the next call).
    pub async fn region(&self, name: &str) -> Result<Arc<Region>> {
        self.check_region(name)?;
        let cell = self.repos.lock().entry(name.to_string()).or_default().clone();
        let cfg =
            self.config.regions[crate::engine::bare_name(name)].for_account(crate::engine::owner_of(name), &self.dir);
        cell.get_or_try_init(|| async { Region::open(&cfg, &self.dir, self.limiter.clone()).await.map(Arc::new) })
            .await
            .cloned()
    }

    /// Whether account `name`'s repository exists in its region (without creating it).
    pub async fn repository_exists(&self, name: &str) -> Result<bool> {
        self.check_region(name)?;
        if self.repos.lock().get(name).is_some_and(|c| c.initialized()) {
            return Ok(true);
        }
        let cfg =
            self.config.regions[crate::engine::bare_name(name)].for_account(crate::engine::owner_of(name), &self.dir);
        match objects::Objects::open(&cfg, None)?.get(format::REPO_KEY_OBJECT).await {
            Ok(_) => Ok(true),
            Err(StoreError::Missing(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The repository a volume's snapshots go to: its owner's in its home region.
    pub fn repository_of(&self, volume_id: &str, volume_name: &str) -> String {
        crate::engine::owned_name(crate::engine::owner_of(volume_name), &self.volume_region(volume_id))
    }

    /// A manifest this daemon has read already (without I/O: for views).
    pub fn cached_manifest(&self, region: &str, snapshot_id: &str) -> Option<Arc<format::Manifest>> {
        self.repos.lock().get(region)?.get()?.cached_manifest(snapshot_id)
    }

    pub fn volume_region(&self, volume_id: &str) -> String {
        self.state.lock().volumes.get(volume_id).cloned().unwrap_or_else(|| "local".into())
    }

    pub fn set_volume_region(&self, volume_id: &str, region: &str) -> Result<()> {
        self.check_region(region)?;
        let mut st = self.state.lock();
        st.volumes.insert(volume_id.to_string(), region.to_string());
        st.touch(RemoteKey::Volume(volume_id.to_string()));
        drop(st);
        self.save()
    }

    pub fn volume_deleted(&self, volume_id: &str) -> Result<()> {
        self.forget(RemoteKey::Volume(volume_id.to_string()));
        self.save()
    }

    /// Queues the upload of a snapshot just created, unless automatic upload is off.
    /// New snapshots (a group snapshot's members together): their uploads start, when
    /// automatic upload is on.
    pub fn snapshots_created(&self, snaps: &[SnapshotInfo]) -> Result<()> {
        if self.config.upload_enabled {
            self.start_uploads(snaps)?;
        }
        Ok(())
    }

    /// Queues uploads (their status is `uploading` from now on, persistently, so a restart
    /// resumes them), with one save for all.
    fn start_uploads(&self, snaps: &[SnapshotInfo]) -> Result<()> {
        let regions: Vec<String> = snaps.iter().map(|s| self.repository_of(&s.volume_id, &s.volume)).collect();
        let mut st = self.state.lock();
        for (snap, region) in snaps.iter().zip(regions) {
            st.snapshots.insert(
                snap.id.clone(),
                SnapshotRecord {
                    region,
                    state: UploadState::Uploading,
                    reason: None,
                    uploaded_at: None,
                    added_bytes: 0,
                    base: None,
                },
            );
            st.touch(RemoteKey::Snapshot(snap.id.clone()));
        }
        drop(st);
        // Not synced here (a snapshot create answers at once): the upload syncs it before it
        // starts, once the snapshot itself is durable; until then a kill keeps both.
        self.save_with(false)?;
        snaps.iter().for_each(|snap| self.enqueue(snap.id.clone()));
        Ok(())
    }

    /// `snapblk snapshot upload`: uploads a snapshot never uploaded (automatic upload off, or
    /// taken before), or queues a failed upload again. Nothing to do when uploaded or running.
    pub fn upload(&self, snap: &SnapshotInfo) -> Result<()> {
        let region = {
            let mut st = self.state.lock();
            let Some(rec) = st.snapshots.get_mut(&snap.id) else {
                drop(st);
                return self.start_uploads(std::slice::from_ref(snap));
            };
            match rec.state {
                UploadState::Available => return Ok(()),
                UploadState::Uploading => return Ok(()),
                UploadState::Failed => {
                    rec.state = UploadState::Uploading;
                    rec.reason = None;
                }
            }
            let region = rec.region.clone();
            st.touch(RemoteKey::Snapshot(snap.id.clone()));
            region
        };
        tracing::info!(snapshot = %snap.id, region, "upload queued again");
        self.save()?;
        self.enqueue(snap.id.clone());
        Ok(())
    }

    fn enqueue(&self, id: String) {
        self.uploads.lock().insert(id.clone(), Progress::new());
        let _ = self.queue.send(id);
    }

    pub fn status(&self, snapshot_id: &str) -> Option<RemoteStatus> {
        let rec = self.state.lock().snapshots.get(snapshot_id).cloned()?;
        let progress = self.uploads.lock().get(snapshot_id).cloned();
        let (done, total, sent, rate) = match (&progress, rec.state) {
            (Some(p), UploadState::Uploading) => {
                let done = p.done.load(Ordering::Relaxed);
                let secs = p.started.elapsed().as_secs_f64().max(0.001);
                (done, p.total.load(Ordering::Relaxed), p.sent.load(Ordering::Relaxed), (done as f64 / secs) as u64)
            }
            _ => (0, 0, 0, 0),
        };
        Some(RemoteStatus {
            region: rec.region,
            state: rec.state,
            reason: rec.reason,
            bytes_done: done,
            bytes_total: total,
            bytes_sent: sent,
            rate,
            added_bytes: rec.added_bytes,
            uploaded_at: rec.uploaded_at,
            base: rec.base,
        })
    }

    /// Ids of the snapshots whose upload is queued or running.
    pub fn uploads_in_flight(&self) -> Vec<String> {
        self.uploads.lock().keys().cloned().collect()
    }

    async fn upload_worker(self: Arc<Self>, mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) {
        while let Some(id) = rx.recv().await {
            let Some(progress) = self.uploads.lock().get(&id).cloned() else { continue };
            let still_wanted = self.state.lock().snapshots.get(&id).is_some_and(|r| r.state == UploadState::Uploading);
            if still_wanted && !progress.cancelled.load(Ordering::Acquire) {
                let result = self.upload_one(&id, progress.clone()).await;
                self.finish_upload(&id, &progress, result);
            }
            self.uploads.lock().remove(&id);
        }
    }

    /// Uploads a snapshot; again (up to `CONDEMNED_ATTEMPTS` times) when GC on another node
    /// condemned a pack the upload reused while it ran.
    async fn upload_one(&self, id: &str, progress: Arc<Progress>) -> Result<Option<String>> {
        let mut attempt = 1;
        loop {
            match self.upload_attempt(id, progress.clone()).await? {
                Some(base) => return Ok(base),
                None if attempt < shared::CONDEMNED_ATTEMPTS => {
                    attempt += 1;
                    progress.done.store(0, Ordering::Relaxed);
                    progress.total.store(0, Ordering::Relaxed);
                }
                None => {
                    return Err(StoreError::Unavailable(format!(
                        "GC on another node kept deleting packs this upload reused ({attempt} attempts); retry with: snapblk snapshot upload {id}"
                    )))
                }
            }
        }
    }

    /// One attempt; `Ok(None)` when it must be made again (see [`Self::upload_one`]).
    async fn upload_attempt(&self, id: &str, progress: Arc<Progress>) -> Result<Option<Option<String>>> {
        // Only a durable snapshot goes to the store: one a crash could still undo must never
        // exist there. Usually the commit started by the create is done by now.
        let engine = self.engine.clone();
        let r = id.to_string();
        let svc = self.self_ref.upgrade().ok_or_else(|| StoreError::Unavailable("the daemon is stopping".into()))?;
        tokio::task::spawn_blocking(move || {
            engine.make_durable(&r).map_err(StoreError::from).and_then(|()| svc.save())
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        let snap = self.engine.snapshot(id)?;
        let region_name =
            self.state.lock().snapshots.get(id).map(|r| r.region.clone()).unwrap_or_else(|| "local".into());
        let region = self.region(&region_name).await?;
        let _uploading = region.gc_lock.read().await;
        let condemned_since = self.drop_condemned_from_index(&region).await?;
        // The base: the newest ancestor uploaded to this region whose manifest is readable,
        // read afresh (`base_manifest`): the upload reuses its blob references.
        let lineage = self.engine.snapshot_lineage(id)?;
        let mut changed = roaring::RoaringTreemap::new();
        let mut base = None;
        for (i, (sid, ch)) in lineage.iter().enumerate() {
            let sid = crate::engine::snapshot_id(*sid);
            if i > 0 && self.uploaded_to(&sid, &region_name) {
                match base_manifest(&region, &sid).await {
                    Ok(m) => {
                        base = Some(Base { snapshot_id: sid, manifest: m, changed: std::mem::take(&mut changed) });
                        break;
                    }
                    Err(e) => tracing::warn!(snapshot = %sid, error = %e, "cannot use as upload base"),
                }
            }
            changed |= ch;
        }
        // The lineage's first snapshot is relative to the snapshot the volume was created
        // from (in the store, or cloned locally): with it as base, clusters never loaded from
        // the store need not be read to upload.
        if base.is_none() {
            let anchor = match self.engine.lineage_anchor(id)? {
                Some(Anchor::Remote(src)) if src.region == region_name => {
                    Some(crate::engine::snapshot_id(src.snapshot))
                }
                Some(Anchor::Origin(o)) => {
                    Some(crate::engine::snapshot_id(o)).filter(|sid| self.uploaded_to(sid, &region_name))
                }
                _ => None,
            };
            if let Some(sid) = anchor {
                match base_manifest(&region, &sid).await {
                    Ok(m) => base = Some(Base { snapshot_id: sid, manifest: m, changed: std::mem::take(&mut changed) }),
                    Err(e) => tracing::warn!(snapshot = %sid, error = %e, "cannot use as upload base"),
                }
            }
        }
        let base_id = base.as_ref().map(|b| b.snapshot_id.clone());
        tracing::info!(snapshot = %id, region = %region_name, base = ?base_id, "upload started");
        let started = Instant::now();
        let on_stored: upload::OnStored = {
            let svc = self.self_ref.clone();
            let id = id.to_string();
            Arc::new(move |len| {
                if let Some(svc) = svc.upgrade() {
                    svc.add_bytes(&id, len);
                }
            })
        };
        let mut manifest = upload::upload(
            self.engine.clone(),
            region.clone(),
            snap,
            base,
            self.config.pack_size,
            self.config.upload_concurrency,
            progress.clone(),
            on_stored,
        )
        .await?;
        let _publishing = self.publish.lock().await;
        progress.check(id)?;
        if self.reuses_condemned(&region, &manifest, condemned_since).await? {
            return Ok(None);
        }
        // Bytes added over every attempt (an upload resumed after a crash counts its first part).
        manifest.added_bytes = self.state.lock().snapshots.get(id).map_or(0, |r| r.added_bytes);
        let manifest_bytes = region.put_manifest(manifest).await?;
        self.accounting_changed(&region.name);
        self.add_bytes(id, manifest_bytes);
        let added = self.state.lock().snapshots.get(id).map_or(0, |r| r.added_bytes);
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            snapshot = %id,
            region = %region_name,
            added_bytes = added,
            scanned = progress.total.load(Ordering::Relaxed),
            secs,
            "upload done"
        );
        Ok(Some(base_id))
    }

    /// Whether a snapshot of this node is stored (complete) in `region`.
    fn uploaded_to(&self, snapshot_id: &str, region: &str) -> bool {
        let st = self.state.lock();
        st.snapshots.get(snapshot_id).is_some_and(|r| r.state == UploadState::Available && r.region == region)
    }

    /// Counts (persistently) bytes a snapshot's upload stored.
    fn add_bytes(&self, id: &str, len: u64) {
        let mut st = self.state.lock();
        if let Some(rec) = st.snapshots.get_mut(id) {
            rec.added_bytes += len;
            st.touch(RemoteKey::Snapshot(id.to_string()));
        }
        drop(st);
        if let Err(e) = self.save() {
            tracing::warn!(error = %e, "cannot record upload progress");
        }
    }

    /// Sets what is told of each failed upload (once).
    pub fn on_upload_failed(&self, hook: UploadFailedHook) {
        let _ = self.upload_failed.set(hook);
    }

    fn finish_upload(&self, id: &str, progress: &Progress, result: Result<Option<String>>) {
        let mut failed = None;
        {
            let mut st = self.state.lock();
            let Some(rec) = st.snapshots.get_mut(id) else { return };
            match result {
                Ok(base) => {
                    rec.state = UploadState::Available;
                    rec.uploaded_at = Some(self.engine.clock().now());
                    rec.base = base;
                    rec.reason = None;
                }
                Err(_) if progress.cancelled.load(Ordering::Acquire) => return,
                // The daemon is stopping (it revoked the snapshot's handle): the upload stays
                // `uploading` and the next start resumes it.
                Err(_) if self.engine.is_shutting_down() => return,
                Err(e) => {
                    tracing::warn!(snapshot = %id, error = %e, "upload failed; retry with: snapblk snapshot upload");
                    rec.state = UploadState::Failed;
                    rec.reason = Some(e.to_string());
                    failed = rec.reason.clone();
                }
            }
            st.touch(RemoteKey::Snapshot(id.to_string()));
        }
        if let Err(e) = self.save() {
            tracing::error!(error = %e, "cannot record the upload status");
        }
        // (Not for a snapshot deleted meanwhile: its upload failing is no news.)
        if let (Some(error), Some(hook)) = (failed, self.upload_failed.get()) {
            if self.engine.snapshot(id).is_ok() {
                hook(id, &error);
            }
        }
        self.release_due();
    }

    /// Releases the local data of uploaded snapshots past the retention period.
    fn release_due(&self) {
        let retention = self.config.instant_access_retention.as_secs();
        let due: Vec<String> = self
            .state
            .lock()
            .snapshots
            .iter()
            .filter(|(_, r)| {
                r.state == UploadState::Available
                    && r.uploaded_at.is_some_and(|t| t + retention <= self.engine.clock().now())
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if !matches!(self.engine.snapshot_is_local(&id), Ok(true)) {
                continue;
            }
            if let Err(e) = self.engine.release_snapshot(&id) {
                tracing::warn!(snapshot = %id, error = %e, "cannot release local snapshot data");
            }
        }
    }

    /// The first step of a snapshot delete (the operations layer runs it): when a configured
    /// region holds the snapshot's copy (or its upload has started), the intent to delete that
    /// copy is recorded — synced — before anything is deleted, so neither a crash nor an
    /// unreachable store leaves the copy behind: [`Self::snapshot_deleted`] and the sweep finish
    /// it. Returns whether there is a store copy (kept until the local delete is durable).
    pub fn delete_intent(&self, snap: &SnapshotInfo) -> Result<bool> {
        let rec = self.state.lock().snapshots.get(&snap.id).cloned();
        // A region removed from the configuration can no longer be reached: delete locally.
        let region = rec.map(|rec| rec.region).filter(|region| {
            let configured = self.check_region(region).is_ok();
            if !configured {
                tracing::warn!(snapshot = %snap.id, %region, "region no longer configured; deleting the snapshot locally only");
            }
            configured
        });
        let Some(region) = region else { return Ok(false) };
        let mut st = self.state.lock();
        st.deferred_deletes.insert(snap.id.clone(), region);
        st.touch(RemoteKey::DeferredDelete(snap.id.clone()));
        drop(st);
        self.save()?;
        Ok(true)
    }

    /// The local delete was refused (or the snapshot went meanwhile): a snapshot still here
    /// keeps its store copy.
    pub fn delete_refused(&self, id: &str) -> Result<()> {
        if self.engine.snapshot(id).is_ok() && self.forget(RemoteKey::DeferredDelete(id.to_string())) {
            self.save()?;
        }
        Ok(())
    }

    /// The local delete is done: its upload stops, its record goes, and its manifest is
    /// deleted now — unless volumes still load from the store copy (clones of it after its
    /// release), which keep it until they have loaded everything, or the store cannot be
    /// reached; the sweep retries then.
    pub async fn snapshot_deleted(&self, id: &str) -> Result<()> {
        if let Some(p) = self.uploads.lock().get(id) {
            p.cancelled.store(true, Ordering::Release);
        }
        self.forget(RemoteKey::Snapshot(id.to_string()));
        self.save()?;
        let waiting = self.engine.store_dependents(id);
        if !waiting.is_empty() {
            tracing::info!(snapshot = %id, waiting = %waiting.join(", "), "snapshot deleted; its copy in the store stays until these have loaded their data");
        } else if let Err(e) = self.delete_deferred(id).await {
            tracing::warn!(snapshot = %id, error = %e, "snapshot deleted; deleting its manifest from the store failed and will be retried");
        }
        Ok(())
    }

    /// Deletes the manifest of a snapshot deleted here, unless something still loads from it
    /// (then `Ok(false)`).
    async fn delete_deferred(&self, id: &str) -> Result<bool> {
        let Some(region_name) = self.state.lock().deferred_deletes.get(id).cloned() else { return Ok(true) };
        // Still here locally (its delete is running): only a completed local delete lets the
        // manifest go. Or still needed by volumes loading from it.
        if self.engine.snapshot(id).is_ok() || !self.engine.store_dependents(id).is_empty() {
            return Ok(false);
        }
        if self.check_region(&region_name).is_ok() {
            if self.held_elsewhere.lock().get(id).is_some_and(|next| *next > Instant::now()) {
                return Ok(false);
            }
            // Under the publish lock: an upload of the snapshot still running cannot publish
            // its manifest after this.
            let _publishing = self.publish.lock().await;
            let region = self.region(&region_name).await?;
            if !self.delete_manifest_unless_held(&region, id).await? {
                // Another node loads from it: look again in a while.
                self.held_elsewhere.lock().insert(id.to_string(), Instant::now() + HELD_RECHECK);
                return Ok(false);
            }
            self.held_elsewhere.lock().remove(id);
        }
        self.forget(RemoteKey::DeferredDelete(id.to_string()));
        self.save()?;
        tracing::info!(snapshot = %id, region = %region_name, "snapshot's manifest deleted from the store");
        Ok(true)
    }

    /// Deletes the manifests whose deletion waited (for volumes still loading from them, or
    /// for the store to be reachable). Runs every second with the retention sweep.
    async fn sweep_deferred_deletes(&self) {
        let ids: Vec<String> = self.state.lock().deferred_deletes.keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.delete_deferred(&id).await {
                tracing::debug!(snapshot = %id, error = %e, "deleting a deleted snapshot's manifest failed; will retry");
            }
        }
    }

    /// Deletes the manifest of a snapshot stored only in `region` (a copy) unless another
    /// node holds it (then `Ok(false)`).
    pub async fn delete_stored_manifest(&self, region: &Region, id: &str) -> Result<bool> {
        let _publishing = self.publish.lock().await;
        let deleted = self.delete_manifest_unless_held(region, id).await?;
        self.accounting_changed(&region.name);
        Ok(deleted)
    }

    /// Whether snapshots are uploaded when taken.
    pub fn uploads_enabled(&self) -> bool {
        self.config.upload_enabled
    }

    /// Store copies of deleted snapshots not deleted yet, counted by region.
    pub fn pending_deletes(&self) -> std::collections::BTreeMap<String, u64> {
        let mut by_region = std::collections::BTreeMap::new();
        for region in self.state.lock().deferred_deletes.values() {
            *by_region.entry(region.clone()).or_default() += 1;
        }
        by_region
    }

    /// The repositories to look in: `repository` (a region for the default account, or
    /// `ACCOUNT/REGION`), or `account`'s in every configured region.
    pub fn repositories(&self, account: &str, repository: Option<&str>) -> Vec<String> {
        match repository {
            Some(r) => vec![r.to_string()],
            None => self.region_names().iter().map(|r| crate::engine::owned_name(account, r)).collect(),
        }
    }

    /// A snapshot id in the store: in `repository`, or the first of `account`'s repositories
    /// holding it.
    pub async fn find_remote(
        &self,
        id: &str,
        account: &str,
        repository: Option<&str>,
    ) -> Result<(Arc<Region>, Arc<format::Manifest>)> {
        let names = self.repositories(account, repository);
        let mut problems = Vec::new();
        for name in &names {
            let found = async { self.region(name).await?.manifest(id).await.map(|m| (name, m)) }.await;
            match found {
                Ok((name, m)) => return Ok((self.region(name).await?, m)),
                Err(StoreError::Missing(_)) => {}
                Err(e) => problems.push(format!("region '{name}': {e}")),
            }
        }
        let mut msg = format!(
            "no snapshot {id} in region(s) {}; list them with: snapblk snapshot list --region REGION",
            names.join(", ")
        );
        if !problems.is_empty() {
            msg = format!("{msg} (could not look in: {})", problems.join("; "));
            return Err(StoreError::Unavailable(msg));
        }
        Err(StoreError::NotFound(msg))
    }

    /// Where to load a snapshot's data from should it be released: its upload region once its
    /// upload is complete — even while its data is still local, since the release sweep may
    /// drop that any moment (the engine uses the region only if it did). `None` for a local
    /// snapshot not uploaded yet (it cannot be released before); an error for a released one
    /// whose region is unknown.
    pub fn region_if_released(&self, snap: &SnapshotInfo) -> Result<Option<String>> {
        match self.uploaded_region(snap) {
            Ok(region) => Ok(Some(region)),
            Err(_) if snap.local => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The region holding a local snapshot's uploaded copy, or an error saying why there is none.
    pub fn uploaded_region(&self, snap: &SnapshotInfo) -> Result<String> {
        match self.state.lock().snapshots.get(&snap.id) {
            Some(r) if r.state == UploadState::Available => Ok(r.region.clone()),
            Some(r) if r.state == UploadState::Uploading => Err(StoreError::Busy(format!(
                "snapshot {}@{} is still uploading; wait with: snapblk snapshot show {}@{} (or snapshot create --wait)",
                snap.volume, snap.name, snap.volume, snap.name
            ))),
            Some(r) => Err(StoreError::Invalid(format!(
                "the upload of snapshot {}@{} failed ({}); retry with: snapblk snapshot upload {}@{}",
                snap.volume,
                snap.name,
                r.reason.as_deref().unwrap_or("unknown reason"),
                snap.volume,
                snap.name
            ))),
            None => Err(StoreError::NotFound(format!("snapshot {}@{} was never uploaded", snap.volume, snap.name))),
        }
    }
}

/// The manifest of an upload's base, read from the store rather than the cache: GC on
/// another node may have repacked the base since this node cached it, rewriting its manifest
/// and condemning the packs the cached copy points into — reusing those would publish a
/// snapshot whose blobs are about to be deleted (every attempt would find that and fail).
async fn base_manifest(region: &Region, snapshot_id: &str) -> Result<Arc<format::Manifest>> {
    region.forget_manifest(snapshot_id);
    region.manifest(snapshot_id).await
}
