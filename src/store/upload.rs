//! Uploading one snapshot.
//!
//! A producer thread walks the clusters to send in order, page by page: only the changed set
//! since the last uploaded ancestor (the union of the sealed dirty bitmaps in between), or
//! every allocated cluster for a first upload. Each cluster is read from the local slots,
//! hashed (keyed), and — unless the blob index already knows that id — compressed, sealed and
//! appended to the current pack. Touched pages are rebuilt from the base's page plus the
//! changes; untouched pages are referenced as they are. Full packs go to `concurrency` PUT
//! tasks; each pack enters the index only once its PUT succeeded. The manifest is written last,
//! after every pack it references is durable.
//!
//! Resuming after a crash is the same upload run again: packs already stored are in the index,
//! so their blobs deduplicate and are not sent twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use object_store::PutPayload;
use roaring::RoaringTreemap;
use tokio::task::JoinSet;

use super::crypto::{sealed_room, BlobId, BLOB_PLAIN_AT};
use super::error::{Result, StoreError};
use super::format::{
    pack_key, BlobKind, BlobRef, Manifest, PackBuilder, PackEntry, PackId, Page, PageRefJson, RefJson, FORMAT_VERSION,
    PAGE_CLUSTERS,
};
use super::region::Region;
use crate::engine::{Engine, SnapshotHandle, SnapshotInfo};

/// Live progress of one upload (shown by `snapshot show` and `--wait`).
pub struct Progress {
    pub started: Instant,
    /// Logical bytes to upload, and how many of them are in the store: a cluster counts once
    /// the pack holding it (or, for zeros and blobs the store had, the pack being filled when
    /// it was scanned) is acknowledged — not when it is read, which with a bandwidth limit
    /// runs far ahead of the PUTs.
    pub total: AtomicU64,
    pub done: AtomicU64,
    /// Bytes PUT so far (sealed packs).
    pub sent: AtomicU64,
    /// The snapshot was deleted: the upload ends and is not recorded as failed.
    pub cancelled: AtomicBool,
    /// A PUT failed for good: the producer stops early and the upload fails with that error.
    pub stopped: AtomicBool,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress {
            started: Instant::now(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        })
    }

    pub fn check(&self, snapshot: &str) -> Result<()> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(StoreError::NotFound(format!("snapshot {snapshot} was deleted during its upload")));
        }
        if self.stopped.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the upload stopped (a PUT failed)".into()));
        }
        Ok(())
    }
}

/// What the upload is incremental to.
pub struct Base {
    pub snapshot_id: String,
    pub manifest: Arc<Manifest>,
    /// Clusters changed since that snapshot.
    pub changed: RoaringTreemap,
}

/// A sealed pack, and the logical bytes it completes (see [`Progress::done`]).
type FinishedPack = ((PackId, Vec<Bytes>, Vec<PackEntry>), u64);

/// Called with the size of each pack once it is stored (to persist the bytes added).
pub type OnStored = Arc<dyn Fn(u64) + Send + Sync>;

/// Uploads `snap` to `region` and returns the manifest to publish (not yet written).
#[allow(clippy::too_many_arguments)]
pub async fn upload(
    engine: Arc<Engine>,
    region: Arc<Region>,
    snap: SnapshotInfo,
    base: Option<Base>,
    pack_size: u64,
    concurrency: usize,
    progress: Arc<Progress>,
    on_stored: OnStored,
) -> Result<Manifest> {
    let base_id = base.as_ref().map(|b| b.snapshot_id.clone());
    let clock = engine.clock().clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<FinishedPack>(1);
    let rt = tokio::runtime::Handle::current();
    let producer = {
        let (region, progress, snap) = (region.clone(), progress.clone(), snap.clone());
        let base_pages: BTreeMap<u64, RefJson> = base
            .as_ref()
            .map(|b| b.manifest.pages.iter().map(|p| (p.index, p.blob.clone())).collect())
            .unwrap_or_default();
        let base_manifest = base.as_ref().map(|b| b.manifest.clone());
        let changed = base.map(|b| b.changed);
        tokio::task::spawn_blocking(move || {
            produce(
                &rt,
                &engine,
                &region,
                &snap,
                base_manifest.as_deref(),
                base_pages,
                changed,
                pack_size,
                concurrency,
                &progress,
                tx,
            )
        })
    };

    // Consumer: PUT packs, `concurrency` at a time; a pack enters the index once stored.
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut puts: JoinSet<Result<u64>> = JoinSet::new();
    let mut failure: Option<StoreError> = None;
    let mut added = 0u64;
    while let Some(((pack, parts, entries), scanned)) = rx.recv().await {
        let Ok(permit) = sem.clone().acquire_owned().await else { break };
        let (region, sent, on_stored) = (region.clone(), progress.clone(), on_stored.clone());
        puts.spawn(async move {
            let len = parts.iter().map(|p| p.len() as u64).sum::<u64>();
            region.objects.put(&pack_key(&pack), PutPayload::from_iter(parts)).await?;
            // Both sync a file: off the runtime's threads, which carry the other PUTs.
            tokio::task::spawn_blocking(move || {
                let blobs: Vec<_> = entries.iter().map(|(id, off, len, _)| (*id, *off, *len)).collect();
                region.index.add_pack(pack, &blobs)?;
                sent.sent.fetch_add(len, Ordering::Relaxed);
                sent.done.fetch_add(scanned, Ordering::Relaxed);
                on_stored(len);
                drop(permit);
                Ok(len)
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("upload task failed: {e}")))?
        });
        while let Some(done) = puts.try_join_next() {
            match flatten(done) {
                Ok(n) => added += n,
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        if failure.is_some() {
            // Stops the producer (at its next check, or its next send fails). Not
            // `cancelled`, which would make the failure look like a deletion and leave the
            // snapshot `uploading` with nothing uploading it.
            progress.stopped.store(true, Ordering::Release);
            break;
        }
    }
    drop(rx);
    while let Some(done) = puts.join_next().await {
        match flatten(done) {
            Ok(n) => added += n,
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    let produced = producer.await.map_err(|e| StoreError::Unavailable(format!("upload task failed: {e}")))?;
    if let Some(e) = failure {
        return Err(e);
    }
    let (pages, allocated_clusters) = produced?;
    // Scanned after the last pack was sent (all zeros, or all in the store already).
    progress.done.store(progress.total.load(Ordering::Relaxed), Ordering::Relaxed);
    Ok(Manifest {
        format: FORMAT_VERSION,
        snapshot_id: snap.id.clone(),
        snapshot_name: snap.name.clone(),
        volume_id: snap.volume_id.clone(),
        volume_name: snap.volume.clone(),
        description: snap.description.clone(),
        created: snap.created,
        uploaded: clock.now(),
        size: snap.size,
        cluster_size: snap.cluster_size,
        base: base_id,
        allocated_clusters,
        // The caller sets the total over every attempt (it persists it per pack).
        added_bytes: added,
        pages: pages.into_iter().map(|(index, blob)| PageRefJson { index, blob }).collect(),
        source: None,
        retain_until: None,
    })
}

/// About how many bytes of clusters one job covers.
const JOB_BYTES: u64 = 1 << 20;

/// Clusters of one map page for a sealing worker: read, hashed, looked up in the index and,
/// when new, sealed back to back into one buffer.
struct Job {
    seq: u64,
    page: u64,
    clusters: Vec<u64>,
}

enum Outcome {
    /// Holds zeros (or is a hole): no blob.
    Zero,
    /// Already in the store.
    Known(BlobRef),
    /// Sealed at `at..at + len` in the job's buffer.
    New { id: BlobId, at: u32, len: u32 },
}

struct Sealed {
    seq: u64,
    page: u64,
    /// (index within the page, what became of the cluster), in cluster order.
    slots: Vec<(u32, Outcome)>,
    buf: Bytes,
    /// Logical bytes scanned.
    scanned: u64,
}

/// Buffers for sealed blobs, reused across jobs: a buffer goes back to the pool when the
/// last part of a pack referencing it is dropped (after its PUT), so a long upload stops
/// paying page faults on fresh memory once the pipeline is full.
struct Pool {
    free: parking_lot::Mutex<Vec<Vec<u8>>>,
    size: usize,
    keep: usize,
}

impl Pool {
    fn take(&self) -> Vec<u8> {
        self.free.lock().pop().unwrap_or_else(|| vec![0; self.size])
    }
}

/// A pooled buffer lent to `Bytes` (see `Bytes::from_owner`).
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<Pool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.free.lock();
        if free.len() < self.pool.keep {
            free.push(buf);
        }
    }
}

/// A worker's part of the upload: reads, hashes and seals the clusters of `job` (the
/// expensive part, so every core runs one of these).
fn seal_job(
    job: Job,
    handle: &SnapshotHandle,
    region: &Region,
    snap: &SnapshotInfo,
    pool: &Arc<Pool>,
    scratch: &mut Vec<u8>,
) -> Result<Sealed> {
    let cs = snap.cluster_size as u64;
    let keys = &region.keys;
    let mut buf = pool.take();
    let mut at = 0usize;
    let mut slots = Vec::with_capacity(job.clusters.len());
    let mut scanned = 0;
    for &c in &job.clusters {
        let len = cs.min(snap.size - c * cs) as usize;
        scanned += len as u64;
        let room = buf
            .get_mut(at..at + sealed_room(len))
            .ok_or_else(|| StoreError::Unavailable("upload: a job outgrew its buffer".into()))?;
        let data = &mut room[BLOB_PLAIN_AT..BLOB_PLAIN_AT + len];
        let hole = handle.read(c * cs, data)?;
        let slot = (c % PAGE_CLUSTERS) as u32;
        if hole || data.iter().all(|&b| b == 0) {
            slots.push((slot, Outcome::Zero));
            continue;
        }
        let id = keys.blob_id(data);
        if let Some(r) = region.index.get(&id) {
            slots.push((slot, Outcome::Known(r)));
            continue;
        }
        let n = keys.seal_blob_in_place(&id, room, len, scratch);
        slots.push((slot, Outcome::New { id, at: at as u32, len: n as u32 }));
        at += n;
    }
    let buf = Bytes::from_owner(Pooled { buf, pool: pool.clone() });
    Ok(Sealed { seq: job.seq, page: job.page, slots, buf: buf.slice(..at), scanned })
}

/// Puts a sealed job into `pack` in order: new blobs enter as parts of the job's buffer,
/// without copying (a blob another cluster of this upload already sealed is left out).
fn place_job(
    sealed: Sealed,
    pack: &mut PackBuilder,
    pending: &mut HashMap<BlobId, BlobRef>,
    entries: &mut BTreeMap<u32, BlobRef>,
) {
    // Runs of blobs to keep that lie back to back in the buffer: (start, end, blobs).
    type Run = (u32, u32, Vec<(BlobId, u32, u32)>);
    let mut runs: Vec<Run> = Vec::new();
    let mut kept: HashSet<BlobId> = HashSet::new();
    for (_, o) in &sealed.slots {
        let &Outcome::New { id, at, len } = o else { continue };
        if pending.contains_key(&id) || !kept.insert(id) {
            continue;
        }
        match runs.last_mut() {
            Some((_, end, blobs)) if *end == at => {
                *end = at + len;
                blobs.push((id, at, len));
            }
            _ => runs.push((at, at + len, vec![(id, at, len)])),
        }
    }
    for (start, end, blobs) in runs {
        let part = sealed.buf.slice(start as usize..end as usize);
        let blobs = blobs.into_iter().map(|(id, at, len)| (id, at - start, len));
        pack.add_sealed_part(part, blobs, BlobKind::Data, |r| {
            pending.insert(r.id, r);
        });
    }
    for (slot, o) in sealed.slots {
        match o {
            Outcome::Zero => {
                entries.remove(&slot);
            }
            Outcome::Known(r) => {
                entries.insert(slot, r);
            }
            Outcome::New { id, .. } => {
                if let Some(r) = pending.get(&id) {
                    entries.insert(slot, *r);
                }
            }
        }
    }
}

fn flatten(r: std::result::Result<Result<u64>, tokio::task::JoinError>) -> Result<u64> {
    r.map_err(|e| StoreError::Unavailable(format!("upload task failed: {e}")))?
}

/// The producer (a blocking thread): hands the clusters to sealing workers in page-sized
/// jobs, places what they sealed into packs in cluster order, rebuilds the pages, and sends
/// full packs to the PUT tasks. Returns the manifest's pages and the count of data clusters.
#[allow(clippy::too_many_arguments)]
fn produce(
    rt: &tokio::runtime::Handle,
    engine: &Arc<Engine>,
    region: &Region,
    snap: &SnapshotInfo,
    base: Option<&Manifest>,
    mut pages: BTreeMap<u64, RefJson>,
    changed: Option<RoaringTreemap>,
    pack_size: u64,
    concurrency: usize,
    progress: &Progress,
    tx: tokio::sync::mpsc::Sender<FinishedPack>,
) -> Result<(BTreeMap<u64, RefJson>, u64)> {
    let handle = engine.open_snapshot(&snap.id, None)?;
    let cs = snap.cluster_size as u64;
    let clusters_total = snap.size.div_ceil(cs);
    let mut todo = match changed {
        Some(c) => c,
        None => handle.allocated_clusters(),
    };
    todo.remove_range(clusters_total..);
    progress.total.store(todo.len() * cs, Ordering::Relaxed);
    let keys = &region.keys;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let in_flight = 4 * workers + 2;
    let job_clusters = (JOB_BYTES / cs).max(1);
    let pool = Arc::new(Pool {
        free: parking_lot::Mutex::new(Vec::new()),
        size: job_clusters as usize * sealed_room(cs as usize),
        // Enough for every pack that can be in memory at once, and the jobs in flight.
        keep: (concurrency + 2) * (pack_size.div_ceil(JOB_BYTES) as usize + 1) + in_flight,
    });
    // Page blobs and the index go to the pack's own (small) part.
    let capacity = 1 << 20;
    let mut pack = PackBuilder::new(capacity);
    let mut pending: HashMap<BlobId, BlobRef> = HashMap::new();
    // Logical bytes scanned since the last pack went out: they are done when the next is stored.
    let scanned = std::cell::Cell::new(0u64);
    let send = |pack: &mut PackBuilder, force: bool| -> Result<()> {
        if pack.is_empty() || (!force && pack.len() < pack_size) {
            return Ok(());
        }
        let full = std::mem::replace(pack, PackBuilder::new(capacity));
        tx.blocking_send((full.finish(keys), scanned.take()))
            .map_err(|_| StoreError::Unavailable("the upload stopped (a PUT failed)".into()))
    };
    let finish_page = |current: Option<(u64, BTreeMap<u32, BlobRef>)>,
                       pack: &mut PackBuilder,
                       pending: &mut HashMap<BlobId, BlobRef>,
                       pages: &mut BTreeMap<u64, RefJson>|
     -> Result<()> {
        let Some((index, entries)) = current else { return Ok(()) };
        if entries.is_empty() {
            pages.remove(&index);
            return Ok(());
        }
        let plain = Page { entries: entries.into_iter().collect() }.encode(index);
        let id = keys.blob_id(&plain);
        let r = match region.index.get(&id).or_else(|| pending.get(&id).copied()) {
            Some(r) => r,
            None => {
                let r = pack.add(keys, id, &plain, BlobKind::Page);
                pending.insert(id, r);
                r
            }
        };
        pages.insert(index, RefJson::from(&r));
        Ok(())
    };
    // (page index, index within page → blob) of the page being rebuilt.
    let mut current: Option<(u64, BTreeMap<u32, BlobRef>)> = None;
    let place = |sealed: Sealed,
                 current: &mut Option<(u64, BTreeMap<u32, BlobRef>)>,
                 pack: &mut PackBuilder,
                 pending: &mut HashMap<BlobId, BlobRef>,
                 pages: &mut BTreeMap<u64, RefJson>|
     -> Result<()> {
        progress.check(&snap.id)?;
        if current.as_ref().is_none_or(|(i, _)| *i != sealed.page) {
            finish_page(current.take(), pack, pending, pages)?;
            send(pack, false)?;
            let mut entries = BTreeMap::new();
            if let (Some(m), Some(r)) = (base, pages.get(&sealed.page)) {
                let r = r.to_ref(&format!("snapshots/{}", m.snapshot_id))?;
                let page = rt.block_on(region.read_page(m, sealed.page, &r))?;
                entries.extend(page.entries);
            }
            *current = Some((sealed.page, entries));
        }
        let Some((_, entries)) = current.as_mut() else { return Ok(()) };
        scanned.set(scanned.get() + sealed.scanned);
        place_job(sealed, pack, pending, entries);
        send(pack, false)
    };

    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<Sealed>>();
    let job_rx = parking_lot::Mutex::new(job_rx);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (job_rx, done_tx, handle, pool) = (&job_rx, done_tx.clone(), &handle, &pool);
            scope.spawn(move || {
                let mut scratch = Vec::new();
                loop {
                    let next = job_rx.lock().recv();
                    let Ok(job) = next else { break };
                    let sealed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        seal_job(job, handle, region, snap, pool, &mut scratch)
                    }))
                    .unwrap_or_else(|_| Err(StoreError::Unavailable("a sealing thread failed".into())));
                    if done_tx.send(sealed).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        // Jobs go out in order; results come back in any order and are placed in order.
        let mut waiting: BTreeMap<u64, Sealed> = BTreeMap::new();
        let (mut sent, mut placed) = (0u64, 0u64);
        let receive = |waiting: &mut BTreeMap<u64, Sealed>| -> Result<()> {
            let sealed =
                done_rx.recv().map_err(|_| StoreError::Unavailable("the sealing threads stopped".into()))??;
            waiting.insert(sealed.seq, sealed);
            Ok(())
        };
        let mut job = Job { seq: 0, page: 0, clusters: Vec::new() };
        let mut clusters = todo.iter().peekable();
        let job_tx = job_tx;
        loop {
            let next = clusters.next();
            if let Some(c) = next {
                job.page = c / PAGE_CLUSTERS;
                job.clusters.push(c);
            }
            let full = job.clusters.len() as u64 >= job_clusters
                || clusters.peek().is_none_or(|n| n / PAGE_CLUSTERS != job.page);
            if full && !job.clusters.is_empty() {
                let ready = std::mem::replace(&mut job, Job { seq: sent + 1, page: 0, clusters: Vec::new() });
                job_tx.send(ready).map_err(|_| StoreError::Unavailable("the sealing threads stopped".into()))?;
                sent += 1;
            }
            // Place what is ready, in order; wait when enough is in flight (or at the end).
            while placed < sent {
                if let Some(sealed) = waiting.remove(&placed) {
                    place(sealed, &mut current, &mut pack, &mut pending, &mut pages)?;
                    placed += 1;
                } else if sent - placed >= in_flight as u64 || next.is_none() {
                    receive(&mut waiting)?;
                } else {
                    break;
                }
            }
            if next.is_none() {
                break;
            }
        }
        drop(job_tx);
        finish_page(current.take(), &mut pack, &mut pending, &mut pages)?;
        send(&mut pack, true)
    })?;
    drop(handle);
    // Clusters mapped to data locally (some may hold zeros and have no blob).
    Ok((pages, snap.allocated_bytes / cs))
}
