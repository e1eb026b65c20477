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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use roaring::RoaringTreemap;
use tokio::task::JoinSet;

use super::crypto::BlobId;
use super::error::{Result, StoreError};
use super::format::{
    pack_key, BlobKind, BlobRef, Manifest, PackBuilder, PackEntry, PackId, Page, PageRefJson, RefJson, FORMAT_VERSION,
    PAGE_CLUSTERS,
};
use super::region::Region;
use crate::engine::{Engine, SnapshotInfo};

/// Live progress of one upload (shown by `snapshot show` and `--wait`).
pub struct Progress {
    pub started: Instant,
    /// Logical bytes to scan, and scanned so far.
    pub total: AtomicU64,
    pub done: AtomicU64,
    /// Bytes PUT so far (sealed packs).
    pub sent: AtomicU64,
    pub cancelled: AtomicBool,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress {
            started: Instant::now(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
        })
    }

    pub fn check(&self, snapshot: &str) -> Result<()> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(StoreError::NotFound(format!("snapshot {snapshot} was deleted during its upload")));
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

type FinishedPack = (PackId, Vec<u8>, Vec<PackEntry>);

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
    while let Some((pack, bytes, entries)) = rx.recv().await {
        let Ok(permit) = sem.clone().acquire_owned().await else { break };
        let (region, sent, on_stored) = (region.clone(), progress.clone(), on_stored.clone());
        puts.spawn(async move {
            let len = bytes.len() as u64;
            region.objects.put(&pack_key(&pack), Bytes::from(bytes)).await?;
            let blobs: Vec<_> = entries.iter().map(|(id, off, len, _)| (*id, *off, *len)).collect();
            region.index.add_pack(pack, &blobs)?;
            sent.sent.fetch_add(len, Ordering::Relaxed);
            on_stored(len);
            drop(permit);
            Ok(len)
        });
        while let Some(done) = puts.try_join_next() {
            match flatten(done) {
                Ok(n) => added += n,
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        if failure.is_some() {
            // Stops the producer (its next send fails).
            progress.cancelled.store(true, Ordering::Release);
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
    Ok(Manifest {
        format: FORMAT_VERSION,
        snapshot_id: snap.id.clone(),
        snapshot_name: snap.name.clone(),
        volume_id: snap.volume_id.clone(),
        volume_name: snap.volume.clone(),
        description: snap.description.clone(),
        created: snap.created,
        uploaded: crate::store::now(),
        size: snap.size,
        cluster_size: snap.cluster_size,
        base: base_id,
        allocated_clusters,
        // The caller sets the total over every attempt (it persists it per pack).
        added_bytes: added,
        pages: pages.into_iter().map(|(index, blob)| PageRefJson { index, blob }).collect(),
    })
}

/// New data blobs waiting to be sealed: compression and encryption are the expensive part of
/// an upload, and clusters are independent, so they are sealed on all cores at once, a batch
/// at a time, before entering the pack in order.
#[derive(Default)]
struct Batch {
    blobs: Vec<(BlobId, Vec<u8>)>,
    bytes: usize,
    /// Where each blob goes: (slot within the page, index into `blobs`).
    slots: Vec<(u32, usize)>,
    index: HashMap<BlobId, usize>,
}

/// A batch is sealed once it holds this many bytes (or at the end of a page).
const BATCH_BYTES: usize = 4 << 20;

impl Batch {
    fn push(&mut self, slot: u32, id: BlobId, data: &[u8]) {
        let i = *self.index.entry(id).or_insert_with(|| {
            self.blobs.push((id, data.to_vec()));
            self.bytes += data.len();
            self.blobs.len() - 1
        });
        self.slots.push((slot, i));
    }

    /// Seals the batch in parallel, appends it to `pack` in order, and fills in the page
    /// entries that wait for it.
    fn flush(
        &mut self,
        keys: &super::crypto::RepoKeys,
        pack: &mut PackBuilder,
        pending: &mut HashMap<BlobId, BlobRef>,
        entries: &mut BTreeMap<u32, BlobRef>,
    ) -> Result<()> {
        if self.blobs.is_empty() {
            return Ok(());
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(self.blobs.len());
        let per_thread = self.blobs.len().div_ceil(threads);
        let sealed: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .blobs
                .chunks(per_thread)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|(id, data)| {
                                let mut out = Vec::with_capacity(data.len() + 64);
                                keys.seal_blob(id, data, &mut out);
                                out
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect::<std::result::Result<Vec<_>, _>>()
        })
        .map_err(|_| StoreError::Unavailable("a sealing thread failed".into()))?
        .into_iter()
        .flatten()
        .collect();
        let refs: Vec<BlobRef> = self
            .blobs
            .iter()
            .zip(&sealed)
            .map(|((id, _), s)| {
                let r = pack.add_sealed(*id, s, BlobKind::Data);
                pending.insert(*id, r);
                r
            })
            .collect();
        for (slot, i) in self.slots.drain(..) {
            entries.insert(slot, refs[i]);
        }
        self.blobs.clear();
        self.index.clear();
        self.bytes = 0;
        Ok(())
    }
}

fn flatten(r: std::result::Result<Result<u64>, tokio::task::JoinError>) -> Result<u64> {
    r.map_err(|e| StoreError::Unavailable(format!("upload task failed: {e}")))?
}

/// The producer (a blocking thread): returns the manifest's pages and the count of data
/// clusters.
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
    progress: &Progress,
    tx: tokio::sync::mpsc::Sender<FinishedPack>,
) -> Result<(BTreeMap<u64, RefJson>, u64)> {
    let handle = engine.open_snapshot(&snap.id)?;
    let cs = snap.cluster_size as u64;
    let clusters_total = snap.size.div_ceil(cs);
    let mut todo = match changed {
        Some(c) => c,
        None => handle.allocated_clusters(),
    };
    todo.remove_range(clusters_total..);
    progress.total.store(todo.len() * cs, Ordering::Relaxed);
    let keys = &region.keys;
    let capacity = pack_size as usize + (2 << 20);
    let mut pack = PackBuilder::new(capacity);
    let mut pending: HashMap<BlobId, BlobRef> = HashMap::new();
    let mut buf = vec![0u8; cs as usize];
    let send = |pack: &mut PackBuilder, force: bool| -> Result<()> {
        if pack.is_empty() || (!force && (pack.bytes.len() as u64) < pack_size) {
            return Ok(());
        }
        let full = std::mem::replace(pack, PackBuilder::new(capacity));
        tx.blocking_send(full.finish(keys))
            .map_err(|_| StoreError::Unavailable("the upload stopped (a PUT failed)".into()))
    };
    // (index within page, blob) of the page being rebuilt.
    let mut current: Option<(u64, BTreeMap<u32, BlobRef>)> = None;
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
    let mut batch = Batch::default();
    for c in todo.iter() {
        let page_index = c / PAGE_CLUSTERS;
        if current.as_ref().is_none_or(|(i, _)| *i != page_index) {
            progress.check(&snap.id)?;
            if let Some((_, entries)) = current.as_mut() {
                batch.flush(keys, &mut pack, &mut pending, entries)?;
            }
            finish_page(current.take(), &mut pack, &mut pending, &mut pages)?;
            send(&mut pack, false)?;
            let mut entries = BTreeMap::new();
            if let (Some(m), Some(r)) = (base, pages.get(&page_index)) {
                let r = r.to_ref(&format!("snapshots/{}", m.snapshot_id))?;
                let page = rt.block_on(region.read_page(m, page_index, &r))?;
                entries.extend(page.entries);
            }
            current = Some((page_index, entries));
        }
        let Some((_, entries)) = current.as_mut() else { continue };
        let len = cs.min(snap.size - c * cs) as usize;
        let data = &mut buf[..len];
        let hole = handle.read(c * cs, data)?;
        let slot = (c % PAGE_CLUSTERS) as u32;
        if hole || data.iter().all(|&b| b == 0) {
            entries.remove(&slot);
        } else {
            let id = keys.blob_id(data);
            match region.index.get(&id).or_else(|| pending.get(&id).copied()) {
                Some(r) => {
                    entries.insert(slot, r);
                }
                None => batch.push(slot, id, data),
            }
        }
        progress.done.fetch_add(len as u64, Ordering::Relaxed);
        if batch.bytes >= BATCH_BYTES {
            batch.flush(keys, &mut pack, &mut pending, entries)?;
            send(&mut pack, false)?;
        }
    }
    if let Some((_, entries)) = current.as_mut() {
        batch.flush(keys, &mut pack, &mut pending, entries)?;
    }
    finish_page(current.take(), &mut pack, &mut pending, &mut pages)?;
    send(&mut pack, true)?;
    drop(handle);
    // Clusters mapped to data locally (some may hold zeros and have no blob).
    Ok((pages, snap.allocated_bytes / cs))
}
