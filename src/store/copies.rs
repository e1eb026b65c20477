//! Copies as this node runs them (`snapshot copy`, `snapshot archive`): their records
//! (`meta/copies.json`), the task running each one with retries, resuming after a restart,
//! cancelling, and progress. The copying itself is in [`super::copy`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::copy::{Attempted, CopyProgress, CopyTask, LocalData, PairsLog};
use super::error::{Result, StoreError};
use super::state::UploadState;
use super::StoreService;

const COPIES_FILE: &str = "copies.json";
/// Finished copies kept for `copy list`.
const KEPT_FINISHED: usize = 200;
/// Attempts of a copy whose store kept failing (after each request's own retries).
const ATTEMPTS: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyKind {
    Copy,
    Archive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// Waiting for the source snapshot's upload to end.
    Waiting,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl CopyState {
    pub fn finished(self) -> bool {
        matches!(self, CopyState::Done | CopyState::Failed | CopyState::Cancelled)
    }
}

/// One copy, as recorded (and shown by `copy list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRecord {
    /// `c-` and 16 hex digits.
    pub id: String,
    pub kind: CopyKind,
    /// The account that started it (only its callers see it).
    pub account: String,
    /// The source snapshot: id, repository, and `VOLUME@SNAPSHOT` as its manifest names it.
    pub source_id: String,
    pub source_region: String,
    pub source: String,
    /// The source's volume id (its copies count against the volume's task limit).
    pub volume_id: String,
    pub dest_region: String,
    /// The new snapshot's id and name in the destination.
    pub dest_id: String,
    pub name: String,
    /// Bytes per second; 0 = unlimited.
    #[serde(default)]
    pub bandwidth_limit: u64,
    /// Archive: deleting the archived copy before this time needs force.
    #[serde(default)]
    pub retain_until: Option<u64>,
    /// Archive: keep the standard copy (else it is deleted once the archive is complete).
    #[serde(default)]
    pub keep_standard: bool,
    pub state: CopyState,
    #[serde(default)]
    pub error: Option<String>,
    /// What happened after the copy (an archive's standard copy deleted, or why it was kept).
    #[serde(default)]
    pub note: Option<String>,
    pub created: u64,
    #[serde(default)]
    pub finished: Option<u64>,
    /// Logical bytes of the snapshot's data, how many are copied (or found in the
    /// destination), sealed bytes read from the source region and PUT into the destination.
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_read: u64,
    #[serde(default)]
    pub bytes_sent: u64,
}

/// A copy with its live rate and time left.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyView {
    #[serde(flatten)]
    pub record: CopyRecord,
    /// Logical bytes per second since the copy (re)started.
    pub rate: u64,
    pub eta_secs: Option<u64>,
}

/// Told of each copy once it is published, before it is marked done; returns a note to
/// record (what an archive did with the standard copy).
pub type CopyDoneHook = Box<dyn Fn(CopyRecord) -> futures::future::BoxFuture<'static, Option<String>> + Send + Sync>;

/// The node's copies: records, and the progress of those running.
#[derive(Default)]
pub struct Copies {
    records: parking_lot::Mutex<BTreeMap<String, CopyRecord>>,
    running: parking_lot::Mutex<BTreeMap<String, Arc<CopyProgress>>>,
    saving: parking_lot::Mutex<()>,
    pub(super) done_hook: std::sync::OnceLock<CopyDoneHook>,
}

impl Copies {
    pub fn load(dir: &std::path::Path) -> Result<Copies> {
        let path = file(dir);
        let records = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                StoreError::Config(format!("{} is not a copies file ({e}); move it away to start", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(StoreError::io(format!("reading {}", path.display()))(e)),
        };
        Ok(Copies { records: parking_lot::Mutex::new(records), ..Default::default() })
    }
}

fn file(dir: &std::path::Path) -> PathBuf {
    dir.join("meta").join(COPIES_FILE)
}

fn new_copy_id() -> String {
    format!("c-{:016x}", rand::random::<u64>() | 1)
}

impl StoreService {
    fn save_copies(&self) -> Result<()> {
        let _saving = self.copies.saving.lock();
        let bytes = {
            let mut records = self.copies.records.lock();
            // Only the newest finished ones stay.
            let mut finished: Vec<(u64, String)> =
                records.values().filter(|r| r.state.finished()).map(|r| (r.created, r.id.clone())).collect();
            if finished.len() > KEPT_FINISHED {
                finished.sort();
                for (_, id) in &finished[..finished.len() - KEPT_FINISHED] {
                    records.remove(id);
                }
            }
            serde_json::to_vec_pretty(&*records).unwrap_or_default()
        };
        let path = file(self.dir());
        crate::fsutil::replace_file(&path, &bytes, true).map_err(StoreError::io(format!("writing {}", path.display())))
    }

    fn update_copy(&self, id: &str, f: impl FnOnce(&mut CopyRecord)) -> Result<()> {
        if let Some(r) = self.copies.records.lock().get_mut(id) {
            f(r);
        }
        self.save_copies()
    }

    /// Sets what is told of each published copy (once).
    pub fn on_copy_done(&self, hook: CopyDoneHook) {
        let _ = self.copies.done_hook.set(hook);
    }

    /// Records a copy (its id and the new snapshot's id are chosen here) and starts it.
    pub fn start_copy(self: &Arc<Self>, mut rec: CopyRecord) -> Result<CopyView> {
        rec.id = new_copy_id();
        rec.dest_id = crate::engine::snapshot_id(rand::random::<u64>() | 1);
        rec.state = CopyState::Running;
        rec.created = self.engine.clock().now();
        let id = rec.id.clone();
        self.copies.records.lock().insert(id.clone(), rec);
        self.save_copies()?;
        self.spawn_copy(&id);
        self.copy_view(&id).ok_or_else(|| StoreError::NotFound(format!("no copy {id}")))
    }

    fn spawn_copy(self: &Arc<Self>, id: &str) {
        let progress = CopyProgress::new();
        if let Some(r) = self.copies.records.lock().get(id) {
            // A resumed copy goes on counting what it sent before.
            progress.sent.store(r.bytes_sent, Ordering::Relaxed);
            progress.read.store(r.bytes_read, Ordering::Relaxed);
        }
        self.copies.running.lock().insert(id.to_string(), progress.clone());
        let (svc, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            let result = svc.run_copy(&id, &progress).await;
            svc.finish_copy(&id, &progress, result).await;
        });
    }

    /// Resumes the copies a stop (or a crash) interrupted (once the operations layer has set
    /// its hook, so a resumed archive still deletes its standard copy).
    pub fn resume_copies(self: &Arc<Self>) {
        let ids: Vec<String> =
            self.copies.records.lock().values().filter(|r| !r.state.finished()).map(|r| r.id.clone()).collect();
        for id in ids {
            tracing::info!(copy = %id, "resuming copy");
            self.spawn_copy(&id);
        }
    }

    async fn run_copy(&self, id: &str, progress: &Arc<CopyProgress>) -> Result<()> {
        let Some(rec) = self.copies.records.lock().get(id).cloned() else { return Ok(()) };
        self.wait_uploaded(&rec, progress).await?;
        self.update_copy(id, |r| r.state = CopyState::Running)?;
        let task = CopyTask {
            id: rec.id.clone(),
            source_repo: rec.source_region.clone(),
            source_id: rec.source_id.clone(),
            dest_repo: rec.dest_region.clone(),
            dest_id: rec.dest_id.clone(),
            name: rec.name.clone(),
            retain_until: rec.retain_until,
            bandwidth_limit: rec.bandwidth_limit,
        };
        let mut attempt = 1;
        loop {
            // This node's data of the snapshot, while it has it: nothing to GET.
            let local = match self.engine.snapshot_is_local(&rec.source_id) {
                Ok(true) => self.engine.open_snapshot(&rec.source_id, None).ok().and_then(|handle| {
                    let info = self.engine.snapshot(&rec.source_id).ok()?;
                    Some(Arc::new(LocalData { handle, size: info.size, cluster_size: u64::from(info.cluster_size) }))
                }),
                _ => None,
            };
            match self.copy_attempt(&task, local, progress).await {
                Ok(Attempted::Published) => return Ok(()),
                Ok(Attempted::Again) if attempt < super::shared::CONDEMNED_ATTEMPTS => {}
                Ok(Attempted::Again) => {
                    return Err(StoreError::Unavailable(format!(
                        "GC on another node kept deleting packs this copy reused ({attempt} attempts)"
                    )))
                }
                Err(e @ StoreError::Unavailable(_))
                    if attempt < ATTEMPTS && !progress.cancelled.load(Ordering::Acquire) =>
                {
                    let wait = Duration::from_secs(2u64.pow(attempt));
                    tracing::warn!(copy = %id, error = %e, attempt, "copy attempt failed; retrying in {}s", wait.as_secs());
                    tokio::time::sleep(wait).await;
                }
                // (A source archived in a class that needs a thaw: the sentence names it.)
                Err(e) => return Err(e.reading(&rec.source_id)),
            }
            attempt += 1;
        }
    }

    /// A copy of this node's snapshot starts once its upload is complete.
    async fn wait_uploaded(&self, rec: &CopyRecord, progress: &CopyProgress) -> Result<()> {
        let mut marked = false;
        loop {
            let state = self.state.lock().snapshots.get(&rec.source_id).map(|r| (r.state, r.reason.clone()));
            match state {
                Some((UploadState::Uploading, _)) => {
                    if !marked {
                        self.update_copy(&rec.id, |r| r.state = CopyState::Waiting)?;
                        marked = true;
                    }
                    if progress.cancelled.load(Ordering::Acquire) {
                        return Err(StoreError::Busy("the copy was cancelled".into()));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Some((UploadState::Failed, reason)) => {
                    return Err(StoreError::Invalid(format!(
                        "the upload of {} failed ({}); retry it with: snapblk snapshot upload {}, then copy again",
                        rec.source,
                        reason.unwrap_or_default(),
                        rec.source
                    )))
                }
                _ => return Ok(()),
            }
        }
    }

    async fn finish_copy(&self, id: &str, progress: &Arc<CopyProgress>, result: Result<()>) {
        let cancelled = progress.cancelled.load(Ordering::Acquire);
        let rec = self.copies.records.lock().get(id).cloned();
        let note = match (&result, self.copies.done_hook.get(), rec) {
            (Ok(()), Some(hook), Some(rec)) => hook(rec).await,
            _ => None,
        };
        let now = self.engine.clock().now();
        let saved = self.update_copy(id, |r| {
            r.bytes_total = progress.total.load(Ordering::Relaxed);
            r.bytes_done = progress.done.load(Ordering::Relaxed);
            r.bytes_read = progress.read.load(Ordering::Relaxed);
            r.bytes_sent = progress.sent.load(Ordering::Relaxed);
            r.finished = Some(now);
            r.note = note;
            match &result {
                Ok(()) => {
                    r.state = CopyState::Done;
                    r.bytes_done = r.bytes_total;
                }
                Err(_) if cancelled => r.state = CopyState::Cancelled,
                Err(e) => {
                    r.state = CopyState::Failed;
                    r.error = Some(e.to_string());
                }
            }
        });
        match (&result, cancelled) {
            (Ok(()), _) => tracing::info!(copy = %id, "copy done"),
            (Err(_), true) => tracing::info!(copy = %id, "copy cancelled"),
            // The daemon is stopping: the copy stays running and resumes at the next start.
            (Err(_), false) if self.engine.is_shutting_down() => return,
            (Err(e), false) => tracing::warn!(copy = %id, error = %e, "copy failed"),
        }
        if let Err(e) = saved {
            tracing::error!(copy = %id, error = %e, "cannot record the copy's end");
        }
        self.copies.running.lock().remove(id);
        PairsLog::new(self.dir(), id).remove();
    }

    /// Cancels a running copy: it stops at its next step; what it stored is left to GC.
    pub fn cancel_copy(&self, id: &str) -> Result<CopyView> {
        let progress = self.copies.running.lock().get(id).cloned();
        match progress {
            Some(p) => p.cancelled.store(true, Ordering::Release),
            None => {
                let state = self.copies.records.lock().get(id).map(|r| r.state);
                match state {
                    None => {
                        return Err(StoreError::NotFound(format!("no copy {id}; list them with: snapblk copy list")))
                    }
                    Some(s) => {
                        return Err(StoreError::Invalid(format!(
                            "copy {id} is {} already: nothing to cancel",
                            serde_json::to_value(s).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
                        )))
                    }
                }
            }
        }
        self.copy_view(id).ok_or_else(|| StoreError::NotFound(format!("no copy {id}")))
    }

    pub fn copy_view(&self, id: &str) -> Option<CopyView> {
        let mut record = self.copies.records.lock().get(id).cloned()?;
        let progress = self.copies.running.lock().get(id).cloned();
        let (mut rate, mut eta) = (0, None);
        if let Some(p) = progress.filter(|_| !record.state.finished()) {
            record.bytes_total = p.total.load(Ordering::Relaxed);
            record.bytes_done = p.done.load(Ordering::Relaxed);
            record.bytes_read = p.read.load(Ordering::Relaxed);
            record.bytes_sent = p.sent.load(Ordering::Relaxed);
            let secs = p.started.elapsed().as_secs_f64().max(0.001);
            rate = (record.bytes_done as f64 / secs) as u64;
            eta = (rate > 0).then(|| record.bytes_total.saturating_sub(record.bytes_done) / rate);
        }
        Some(CopyView { record, rate, eta_secs: eta })
    }

    /// Every copy recorded here, oldest first.
    pub fn copy_views(&self) -> Vec<CopyView> {
        let mut ids: Vec<(u64, String)> =
            self.copies.records.lock().values().map(|r| (r.created, r.id.clone())).collect();
        ids.sort();
        ids.iter().filter_map(|(_, id)| self.copy_view(id)).collect()
    }

    /// Copies of the volume's snapshots not finished (they count against its task limit).
    pub fn copies_in_flight(&self, volume_id: &str) -> u32 {
        self.copies.records.lock().values().filter(|r| r.volume_id == volume_id && !r.state.finished()).count() as u32
    }
}
