//! Copying a stored snapshot into another repository (`snapshot copy`, `snapshot archive`).
//!
//! The source manifest's pages are read (verified) from the source repository; each data blob
//! the destination does not hold yet is read — from the local slots when the snapshot's data
//! is still on this node (checked against the blob's keyed hash), else from the source region —
//! then hashed and sealed under the destination repository's keys, deduplicated against the
//! destination's blob index, packed and PUT. Pages are rebuilt with the destination's blob
//! references. The manifest is written last, under a new snapshot id.
//!
//! What makes copies incremental is the *copy map*: for each pair of repositories, which
//! destination blob holds the content of which source blob (their ids differ: each is a keyed
//! hash under its own repository's key). Every copy stores the pairs it learned in the
//! destination (`copies/TAG/DEST_ID`, sealed under the destination's keys; TAG is a keyed hash
//! of the source repository's key object, so the destination does not reveal which source it
//! copies from). A later copy from the same source — of a later snapshot, an earlier one, a
//! clone's — reads no source blob whose pair is known and still stored, and no source page
//! either when the page itself was copied before. A copy killed mid-way resumes from the
//! pairs of the packs it had stored (`meta/copies/ID.pairs`), sending nothing twice.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use object_store::PutPayload;
use tokio::task::JoinSet;

use super::crypto::{hex, BlobId, Plaintext, RepoKeys};
use super::error::{Result, StoreError};
use super::format::{
    manifest_key, pack_key, BlobKind, BlobRef, CopySource, Manifest, PackBuilder, PackEntry, PackId, Page, PageRefJson,
    RefJson, FORMAT_VERSION, PAGE_CLUSTERS, REPO_KEY_OBJECT,
};
use super::objects::RateLimiter;
use super::region::Region;
use super::StoreService;
use crate::codec::{Put, Reader};
use crate::engine::SnapshotHandle;

/// Sealed bytes of source blobs read per batch (sealed on every core while the next is read).
const BATCH_BYTES: u64 = 8 << 20;
/// Source pages read at once.
const PAGE_READS: usize = 8;
/// GETs in flight for the source's blobs.
const READ_CONCURRENCY: usize = 16;
const COPY_MAP_MAGIC: &[u8; 8] = b"SBLKCMAP";
/// Bytes a pack's index spends per blob (id, offset, length, kind), for estimates.
const INDEX_ENTRY: u64 = 45;
/// Bytes a copy map spends per pair (two ids and a count).
const PAIR_LEN: usize = 68;

/// One copy to make: from a snapshot in one repository to a new snapshot in another.
#[derive(Debug, Clone)]
pub struct CopyTask {
    /// The copy's id (`c-…`): names its resume file.
    pub id: String,
    pub source_repo: String,
    pub source_id: String,
    pub dest_repo: String,
    /// The new snapshot's id, fixed when the copy starts so a resumed copy publishes the same.
    pub dest_id: String,
    /// The new snapshot's name.
    pub name: String,
    /// Archive copies: deleting the copy before this time needs force.
    pub retain_until: Option<u64>,
    /// Bytes per second for this copy's PUTs; 0 = unlimited (the region's limit still applies).
    pub bandwidth_limit: u64,
}

/// Live progress of one copy.
pub struct CopyProgress {
    pub started: Instant,
    /// Logical bytes of the snapshot's data clusters, and how many were copied or found in the
    /// destination already.
    pub total: AtomicU64,
    pub done: AtomicU64,
    /// Sealed bytes read from the source region (zero for clusters read locally).
    pub read: AtomicU64,
    /// Bytes PUT into the destination.
    pub sent: AtomicU64,
    pub cancelled: AtomicBool,
}

impl CopyProgress {
    pub fn new() -> Arc<CopyProgress> {
        Arc::new(CopyProgress {
            started: Instant::now(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            read: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
        })
    }

    fn check(&self) -> Result<()> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(StoreError::Busy("the copy was cancelled".into()));
        }
        Ok(())
    }
}

/// What [`StoreService::copy_attempt`] did.
pub enum Attempted {
    /// Published (or found published by an earlier attempt).
    Published,
    /// GC on another node condemned a pack the copy reuses: run it again.
    Again,
}

/// Source blob id → (destination blob id, clusters the page holds: zero for a data blob).
type Pairs = HashMap<BlobId, (BlobId, u32)>;

/// The tag naming a source repository in the destination's copy maps.
async fn source_tag(src: &Region, dst: &Region) -> Result<String> {
    let key_object = src.objects.get(REPO_KEY_OBJECT).await?;
    Ok(hex(&dst.keys.blob_id(&key_object).0[..16]))
}

fn copy_map_key(tag: &str, dest_id: &str) -> String {
    format!("copies/{tag}/{dest_id}")
}

fn copy_map_aad(key: &str) -> Vec<u8> {
    format!("snapblk copy map {key}").into_bytes()
}

fn encode_pairs(pairs: &[(BlobId, BlobId, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + pairs.len() * PAIR_LEN);
    out.put_u32(pairs.len() as u32);
    for (s, d, n) in pairs {
        out.extend_from_slice(&s.0);
        out.extend_from_slice(&d.0);
        out.put_u32(*n);
    }
    out
}

/// Decodes pairs; `None` for bytes that are not a whole list of them.
fn decode_pairs(bytes: &[u8]) -> Option<Vec<(BlobId, BlobId, u32)>> {
    let mut r = Reader::new(bytes);
    let n = r.u32().ok()? as usize;
    if r.remaining() != n.checked_mul(PAIR_LEN)? {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let s = BlobId(r.bytes(32).ok()?.try_into().ok()?);
        let d = BlobId(r.bytes(32).ok()?.try_into().ok()?);
        out.push((s, d, r.u32().ok()?));
    }
    Some(out)
}

/// Seals a copy map: `magic | version | AEAD(pairs)`, the AAD naming the object.
pub fn seal_copy_map(keys: &RepoKeys, key: &str, pairs: &[(BlobId, BlobId, u32)]) -> Vec<u8> {
    let mut out = COPY_MAP_MAGIC.to_vec();
    out.put_u32(FORMAT_VERSION);
    out.extend_from_slice(&keys.seal_meta(&copy_map_aad(key), &encode_pairs(pairs)));
    out
}

pub fn open_copy_map(keys: &RepoKeys, key: &str, bytes: &[u8]) -> Result<Vec<(BlobId, BlobId, u32)>> {
    let body =
        bytes.strip_prefix(COPY_MAP_MAGIC.as_slice()).ok_or_else(|| StoreError::corrupt(key, "not a copy map"))?;
    let (version, sealed) = body.split_at_checked(4).ok_or_else(|| StoreError::corrupt(key, "truncated"))?;
    if version != FORMAT_VERSION.to_le_bytes() {
        return Err(StoreError::corrupt(key, "unsupported copy map version; upgrade snapblk"));
    }
    let plain = keys.open_meta(&copy_map_aad(key), sealed, key)?;
    decode_pairs(&plain).ok_or_else(|| StoreError::corrupt(key, "bad copy map"))
}

/// Every pair the destination's copy maps for this source hold.
async fn stored_pairs(dst: &Region, tag: &str) -> Result<Pairs> {
    let mut pairs = Pairs::new();
    for o in dst.objects.list(&format!("copies/{tag}")).await? {
        let bytes = match dst.objects.get(&o.key).await {
            Ok(b) => b,
            Err(StoreError::Missing(_)) => continue,
            Err(e) => return Err(e),
        };
        for (s, d, n) in open_copy_map(&dst.keys, &o.key, &bytes)? {
            pairs.insert(s, (d, n));
        }
    }
    Ok(pairs)
}

/// The local log of a running copy's pairs whose destination blobs are stored: frames
/// `len u32 | crc32c u32 | pairs`, appended and synced after each pack's PUT; a torn tail is
/// ignored.
pub struct PairsLog {
    path: PathBuf,
}

impl PairsLog {
    pub fn new(dir: &Path, copy_id: &str) -> PairsLog {
        PairsLog { path: dir.join("meta").join("copies").join(format!("{copy_id}.pairs")) }
    }

    fn read(&self) -> Result<Vec<(BlobId, BlobId, u32)>> {
        let mut buf = Vec::new();
        match std::fs::File::open(&self.path) {
            Ok(mut f) => {
                f.read_to_end(&mut buf).map_err(StoreError::io(format!("reading {}", self.path.display())))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io(format!("reading {}", self.path.display()))(e)),
        }
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(h) = buf.get(pos..pos + 8) {
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            let Some(payload) = buf.get(pos + 8..pos + 8 + len) else { break };
            let Some(pairs) = (crc32c::crc32c(payload) == crc).then(|| decode_pairs(payload)).flatten() else {
                break;
            };
            out.extend(pairs);
            pos += 8 + len;
        }
        Ok(out)
    }

    fn append(&self, pairs: &[(BlobId, BlobId, u32)]) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let io = || StoreError::io(format!("appending to {}", self.path.display()));
        if let Some(dir) = self.path.parent() {
            crate::fsutil::create_dir_all_durable(dir)
                .map_err(StoreError::io(format!("creating {}", dir.display())))?;
        }
        let payload = encode_pairs(pairs);
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.put_u32(payload.len() as u32);
        frame.put_u32(crc32c::crc32c(&payload));
        frame.extend_from_slice(&payload);
        let created = !self.path.exists();
        let mut f = crate::fsutil::open_append(&self.path).map_err(io())?;
        f.write_all(&frame).and_then(|()| f.sync_data()).map_err(io())?;
        if created {
            crate::fsutil::sync_parent(&self.path).map_err(io())?;
        }
        Ok(())
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A sealed pack and the pairs whose destination blobs it completes.
type FinishedPack = ((PackId, Vec<Bytes>, Vec<PackEntry>), Vec<(BlobId, BlobId, u32)>);

/// The copy's writing side: the pack being filled, blobs placed but not yet stored, and the
/// PUTs in flight.
struct Writer<'a> {
    dst: &'a Arc<Region>,
    pack: PackBuilder,
    /// Destination blobs in packs not yet stored.
    pending: HashMap<BlobId, BlobRef>,
    /// Pairs learned since the last pack went out.
    pack_pairs: Vec<(BlobId, BlobId, u32)>,
    pack_size: u64,
    puts: JoinSet<Result<u64>>,
    permits: Arc<tokio::sync::Semaphore>,
    limiter: Option<Arc<RateLimiter>>,
    log: Arc<PairsLog>,
    progress: Arc<CopyProgress>,
}

impl Writer<'_> {
    /// Where a destination blob is: stored, or placed in a pack of this copy.
    fn find(&self, id: &BlobId) -> Option<BlobRef> {
        self.dst.index.get(id).or_else(|| self.pending.get(id).copied())
    }

    fn learned(&mut self, src: BlobId, dst: BlobId, clusters: u32) {
        self.pack_pairs.push((src, dst, clusters));
    }

    /// Sends the pack when full (or `force`d and not empty), once a PUT slot is free.
    async fn send(&mut self, force: bool) -> Result<()> {
        if self.pack.is_empty() || (!force && self.pack.len() < self.pack_size) {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.pack, PackBuilder::new(1 << 20));
        let (pack, parts, entries) = full.finish(&self.dst.keys);
        let pairs = std::mem::take(&mut self.pack_pairs);
        let permit =
            self.permits.clone().acquire_owned().await.map_err(|_| StoreError::Unavailable("copy stopped".into()))?;
        while let Some(done) = self.puts.try_join_next() {
            flatten(done)?;
        }
        let (dst, limiter, log, progress) =
            (self.dst.clone(), self.limiter.clone(), self.log.clone(), self.progress.clone());
        let finished: FinishedPack = ((pack, parts, entries), pairs);
        self.puts.spawn(async move {
            let ((pack, parts, entries), pairs) = finished;
            let len = parts.iter().map(|p| p.len() as u64).sum::<u64>();
            if let Some(l) = &limiter {
                l.acquire(len).await;
            }
            dst.objects.put(&pack_key(&pack), PutPayload::from_iter(parts)).await?;
            tokio::task::spawn_blocking(move || {
                let blobs: Vec<_> = entries.iter().map(|(id, off, len, _)| (*id, *off, *len)).collect();
                dst.index.add_pack(pack, &blobs)?;
                log.append(&pairs)?;
                progress.sent.fetch_add(len, Ordering::Relaxed);
                drop(permit);
                Ok(len)
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("copy task failed: {e}")))?
        });
        Ok(())
    }

    /// Waits for every PUT; the pairs learned after the last pack (of blobs stored before).
    async fn finish(mut self) -> Result<Vec<(BlobId, BlobId, u32)>> {
        self.send(true).await?;
        let mut failure = None;
        while let Some(done) = self.puts.join_next().await {
            if let Err(e) = flatten(done) {
                failure = failure.or(Some(e));
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(self.pack_pairs),
        }
    }
}

fn flatten(r: std::result::Result<Result<u64>, tokio::task::JoinError>) -> Result<u64> {
    r.map_err(|e| StoreError::Unavailable(format!("copy task failed: {e}")))?
}

/// A source page to rebuild: its index, its blob in the source, its entries.
type SourcePage = (u64, BlobRef, Page);

/// The snapshot's data on this node, to read instead of the source region.
pub struct LocalData {
    pub handle: SnapshotHandle,
    pub size: u64,
    pub cluster_size: u64,
}

impl StoreService {
    /// One attempt at a copy (see the module doc). Reads under the source's and the
    /// destination's GC locks (taken in name order, so two copies in opposite directions and
    /// GC cannot wait on each other in a cycle).
    pub async fn copy_attempt(
        &self,
        task: &CopyTask,
        local: Option<Arc<LocalData>>,
        progress: &Arc<CopyProgress>,
    ) -> Result<Attempted> {
        let src = self.region(&task.source_repo).await?;
        let dst = self.region(&task.dest_repo).await?;
        let (first, second) = if src.name < dst.name { (&src, &dst) } else { (&dst, &src) };
        let _first = first.gc_lock.read().await;
        let _second = second.gc_lock.read().await;
        // Published by an attempt a crash interrupted right after.
        match dst.objects.get(&manifest_key(&task.dest_id)).await {
            Ok(_) => return Ok(Attempted::Published),
            Err(StoreError::Missing(_)) => {}
            Err(e) => return Err(e),
        }
        let condemned_since = self.drop_condemned_from_index(&dst).await?;
        src.forget_manifest(&task.source_id);
        let m = src.manifest(&task.source_id).await?;
        let cs = u64::from(m.cluster_size);
        progress.total.store(m.allocated_clusters * cs, Ordering::Relaxed);
        progress.done.store(0, Ordering::Relaxed);
        let tag = source_tag(&src, &dst).await?;
        let mut pairs = stored_pairs(&dst, &tag).await?;
        // Source blobs the destination's maps pair already: this copy's map leaves them out.
        let earlier: std::collections::HashSet<BlobId> = pairs.keys().copied().collect();
        let log = Arc::new(PairsLog::new(self.dir(), &task.id));
        // What an interrupted attempt learned and stored: part of this copy's map.
        for (s, d, n) in log.read()? {
            pairs.insert(s, (d, n));
        }
        let mut w = Writer {
            dst: &dst,
            pack: PackBuilder::new(1 << 20),
            pending: HashMap::new(),
            pack_pairs: Vec::new(),
            pack_size: self.config.pack_size,
            puts: JoinSet::new(),
            permits: Arc::new(tokio::sync::Semaphore::new(self.config.upload_concurrency)),
            limiter: RateLimiter::new(task.bandwidth_limit),
            log: log.clone(),
            progress: progress.clone(),
        };
        let object = manifest_key(&m.snapshot_id);
        let mut out_pages: Vec<PageRefJson> = Vec::with_capacity(m.pages.len());
        let mut batch: Vec<SourcePage> = Vec::new();
        let mut wanted: HashMap<BlobId, (BlobRef, u64)> = HashMap::new();
        let mut wanted_bytes = 0u64;
        // A batch being read (in a task of its own) and the pages waiting for it.
        type Reading = tokio::task::JoinHandle<Result<Vec<(BlobId, Plaintext)>>>;
        let mut in_flight: Option<(Reading, Vec<SourcePage>)> = None;
        let refs: Vec<(u64, BlobRef)> =
            m.pages.iter().map(|p| p.blob.to_ref(&object).map(|r| (p.index, r))).collect::<Result<_>>()?;
        for chunk in refs.chunks(PAGE_READS) {
            progress.check()?;
            // Pages copied before (the same source page, so the same content) are not read.
            let mut to_read = Vec::new();
            for (index, r) in chunk {
                match pairs.get(&r.id).and_then(|(d, n)| w.find(d).map(|dr| (dr, *n))) {
                    Some((dr, n)) => {
                        out_pages.push(PageRefJson { index: *index, blob: RefJson::from(&dr) });
                        progress.done.fetch_add(u64::from(n) * cs, Ordering::Relaxed);
                    }
                    None => to_read.push((*index, *r)),
                }
            }
            let read = futures::future::join_all(to_read.iter().map(|(i, r)| src.read_page(&m, *i, r))).await;
            for ((index, r), page) in to_read.into_iter().zip(read) {
                let page = page?;
                for (slot, b) in &page.entries {
                    let known = pairs.get(&b.id).is_some_and(|(d, _)| w.find(d).is_some());
                    if !known && !wanted.contains_key(&b.id) {
                        wanted.insert(b.id, (*b, index * PAGE_CLUSTERS + u64::from(*slot)));
                        wanted_bytes += u64::from(b.len);
                    }
                }
                batch.push((index, r, page));
            }
            if wanted_bytes >= BATCH_BYTES {
                // Read this batch while the previous one is sealed and placed.
                let blobs = std::mem::take(&mut wanted);
                let reading = tokio::spawn(read_batch(src.clone(), m.clone(), blobs, local.clone(), progress.clone()));
                if let Some((read, pages)) = in_flight.replace((reading, std::mem::take(&mut batch))) {
                    self.place_batch(&mut w, &mut pairs, joined(read.await)?).await?;
                    self.rebuild_pages(&mut w, &mut pairs, pages, &mut out_pages, cs, progress).await?;
                }
                wanted_bytes = 0;
            }
        }
        if let Some((read, pages)) = in_flight.take() {
            self.place_batch(&mut w, &mut pairs, joined(read.await)?).await?;
            self.rebuild_pages(&mut w, &mut pairs, pages, &mut out_pages, cs, progress).await?;
        }
        let last = read_batch(src.clone(), m.clone(), wanted, local.clone(), progress.clone()).await?;
        self.place_batch(&mut w, &mut pairs, last).await?;
        self.rebuild_pages(&mut w, &mut pairs, batch, &mut out_pages, cs, progress).await?;
        progress.check()?;
        let unlogged = w.finish().await?;
        // Every pair this copy's packs completed (logged as each was stored, by this attempt
        // and any interrupted one), and those learned after the last pack.
        let mut new_pairs = log.read()?;
        new_pairs.extend(unlogged);
        // Every pair this copy learned (the resumed part included); those it used but knew
        // already are in earlier maps.
        let learned: Vec<_> = {
            let mut seen = std::collections::HashSet::new();
            new_pairs.into_iter().filter(|(s, _, _)| !earlier.contains(s) && seen.insert(*s)).collect()
        };
        if !learned.is_empty() {
            let key = copy_map_key(&tag, &task.dest_id);
            let sealed = Bytes::from(seal_copy_map(&dst.keys, &key, &learned));
            let n = sealed.len() as u64;
            dst.objects.put(&key, sealed).await?;
            progress.sent.fetch_add(n, Ordering::Relaxed);
        }
        out_pages.sort_by_key(|p| p.index);
        let manifest = Manifest {
            format: FORMAT_VERSION,
            snapshot_id: task.dest_id.clone(),
            snapshot_name: task.name.clone(),
            volume_id: m.volume_id.clone(),
            volume_name: m.volume_name.clone(),
            description: m.description.clone(),
            created: m.created,
            uploaded: self.engine.clock().now(),
            size: m.size,
            cluster_size: m.cluster_size,
            base: None,
            allocated_clusters: m.allocated_clusters,
            // Bytes PUT by this copy (since its last start: a copy resumed after a restart
            // counts what it sent before from its record).
            added_bytes: progress.sent.load(Ordering::Relaxed),
            pages: out_pages,
            source: Some(CopySource { id: m.snapshot_id.clone(), region: task.source_repo.clone() }),
            retain_until: task.retain_until,
        };
        if self.reuses_condemned(&dst, &manifest, condemned_since).await? {
            return Ok(Attempted::Again);
        }
        let n = dst.put_manifest(manifest).await?;
        self.accounting_changed(&dst.name);
        progress.sent.fetch_add(n, Ordering::Relaxed);
        Ok(Attempted::Published)
    }

    /// Seals what a batch read under the destination's keys on every core, and places the
    /// new blobs into packs.
    async fn place_batch(&self, w: &mut Writer<'_>, pairs: &mut Pairs, plain: Vec<(BlobId, Plaintext)>) -> Result<()> {
        if plain.is_empty() {
            return Ok(());
        }
        w.progress.check()?;
        let keys_region = w.dst.clone();
        let sealed = tokio::task::spawn_blocking(move || seal_all(&keys_region, plain))
            .await
            .map_err(|e| StoreError::Unavailable(format!("copy task failed: {e}")))?;
        for (src_id, dst_id, part) in sealed {
            if w.find(&dst_id).is_none() {
                if let Some(part) = part {
                    let len = part.len() as u32;
                    let placed = &mut w.pending;
                    w.pack.add_sealed_part(part, [(dst_id, 0, len)], BlobKind::Data, |r| {
                        placed.insert(r.id, r);
                    });
                }
            }
            pairs.insert(src_id, (dst_id, 0));
            w.learned(src_id, dst_id, 0);
            w.send(false).await?;
        }
        Ok(())
    }

    /// Rebuilds source pages with destination references (every blob they name is placed by
    /// now) and places the new pages.
    async fn rebuild_pages(
        &self,
        w: &mut Writer<'_>,
        pairs: &mut Pairs,
        pages: Vec<SourcePage>,
        out: &mut Vec<PageRefJson>,
        cs: u64,
        progress: &Arc<CopyProgress>,
    ) -> Result<()> {
        for (index, src_ref, page) in pages {
            let mut entries = Vec::with_capacity(page.entries.len());
            for (slot, b) in &page.entries {
                let r = pairs.get(&b.id).and_then(|(d, _)| w.find(d)).ok_or_else(|| {
                    StoreError::Unavailable(format!("copy: blob {} of page {index} was not placed", hex(&b.id.0)))
                })?;
                entries.push((*slot, r));
            }
            let n = entries.len() as u32;
            let plain = Page { entries }.encode(index);
            let id = w.dst.keys.blob_id(&plain);
            let r = match w.find(&id) {
                Some(r) => r,
                None => {
                    let r = w.pack.add(&w.dst.keys, id, &plain, BlobKind::Page);
                    w.pending.insert(id, r);
                    r
                }
            };
            pairs.insert(src_ref.id, (id, n));
            w.learned(src_ref.id, id, n);
            out.push(PageRefJson { index, blob: RefJson::from(&r) });
            progress.done.fetch_add(u64::from(n) * cs, Ordering::Relaxed);
            w.send(false).await?;
        }
        Ok(())
    }
}

/// Reads a batch of source blobs (source id → (reference, a cluster it fills)): from the
/// snapshot's local data where this node has it, else from the source region; each verified.
async fn read_batch(
    src: Arc<Region>,
    m: Arc<Manifest>,
    blobs: HashMap<BlobId, (BlobRef, u64)>,
    local: Option<Arc<LocalData>>,
    progress: Arc<CopyProgress>,
) -> Result<Vec<(BlobId, Plaintext)>> {
    let mut plain: Vec<(BlobId, Plaintext)> = Vec::with_capacity(blobs.len());
    let mut from_store: Vec<(BlobRef, ())> = Vec::new();
    match local {
        Some(local) if !blobs.is_empty() => {
            let keys_region = src.clone();
            let list: Vec<(BlobRef, u64)> = blobs.values().copied().collect();
            let (found, missed) = tokio::task::spawn_blocking(move || read_local(&local, &keys_region.keys, list))
                .await
                .map_err(|e| StoreError::Unavailable(format!("copy task failed: {e}")))?;
            plain.extend(found);
            from_store.extend(missed.into_iter().map(|r| (r, ())));
        }
        _ => from_store.extend(blobs.values().map(|(r, _)| (*r, ()))),
    }
    let mut failure = None;
    src.fetch_blobs(from_store, READ_CONCURRENCY, |(), r, res| match res {
        Ok(p) => {
            progress.read.fetch_add(u64::from(r.len), Ordering::Relaxed);
            plain.push((r.id, p));
        }
        Err(e) => {
            failure.get_or_insert_with(|| match e {
                e @ (StoreError::Corrupt { .. } | StoreError::Missing(_)) => e,
                e => {
                    StoreError::Unavailable(format!("reading {} of snapshot {}: {e}", pack_key(&r.pack), m.snapshot_id))
                }
            });
        }
    })
    .await;
    match failure {
        Some(e) => Err(e),
        None => Ok(plain),
    }
}

fn joined<T>(r: std::result::Result<Result<T>, tokio::task::JoinError>) -> Result<T> {
    r.map_err(|e| StoreError::Unavailable(format!("copy task failed: {e}")))?
}

/// Reads blobs from the snapshot's local data, each checked against its id (the keyed hash
/// under the source's keys); those that cannot be read or do not match are left to the store.
fn read_local(
    local: &LocalData,
    keys: &RepoKeys,
    blobs: Vec<(BlobRef, u64)>,
) -> (Vec<(BlobId, Plaintext)>, Vec<BlobRef>) {
    let (mut found, mut missed) = (Vec::new(), Vec::new());
    for (r, cluster) in blobs {
        let offset = cluster * local.cluster_size;
        let len = local.cluster_size.min(local.size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        match local.handle.read(offset, &mut buf) {
            Ok(false) if keys.blob_id(&buf) == r.id => found.push((r.id, Plaintext::from_vec(buf))),
            _ => missed.push(r),
        }
    }
    (found, missed)
}

/// Hashes and seals blobs under the destination's keys, on every core. Returns (source id,
/// destination id, the sealed blob unless the destination's index has it).
fn seal_all(dst: &Region, mut plain: Vec<(BlobId, Plaintext)>) -> Vec<(BlobId, BlobId, Option<Bytes>)> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(plain.len().max(1));
    let chunk = plain.len().div_ceil(workers).max(1);
    let mut parts = Vec::new();
    while !plain.is_empty() {
        let rest = plain.split_off(chunk.min(plain.len()));
        parts.push(std::mem::replace(&mut plain, rest));
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    part.into_iter()
                        .map(|(s, p)| {
                            let id = dst.keys.blob_id(&p);
                            let sealed = dst.index.get(&id).is_none().then(|| Bytes::from(p.seal_as(&dst.keys, &id)));
                            (s, id, sealed)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    })
}

impl StoreService {
    /// The bytes a copy of `source_id` into `dest_repo` would add now: the sealed sizes of the
    /// source blobs and pages the destination does not hold (sealing under another key keeps
    /// a blob's size), their index entries and copy-map pairs, and the manifest. Reads the
    /// source's manifest and the pages not copied before; no data.
    pub async fn copy_estimate(&self, source_repo: &str, source_id: &str, dest_repo: &str) -> Result<u64> {
        let src = self.region(source_repo).await?;
        let dst = self.region(dest_repo).await?;
        let m = src.manifest(source_id).await?;
        let manifest_len = src.objects.get(&manifest_key(source_id)).await?.len() as u64;
        let pairs = stored_pairs(&dst, &source_tag(&src, &dst).await?).await?;
        let held = |id: &BlobId| pairs.get(id).is_some_and(|(d, _)| dst.index.get(d).is_some());
        let object = manifest_key(&m.snapshot_id);
        let mut counted = std::collections::HashSet::new();
        let mut bytes = manifest_len;
        for chunk in m.pages.chunks(PAGE_READS) {
            let mut to_read = Vec::new();
            for p in chunk {
                let r = p.blob.to_ref(&object)?;
                if !held(&r.id) {
                    bytes += u64::from(r.len) + INDEX_ENTRY + PAIR_LEN as u64;
                    to_read.push((p.index, r));
                }
            }
            let read = futures::future::join_all(to_read.iter().map(|(i, r)| src.read_page(&m, *i, r))).await;
            for page in read {
                for (_, b) in page?.entries {
                    if !held(&b.id) && counted.insert(b.id) {
                        bytes += u64::from(b.len) + INDEX_ENTRY + PAIR_LEN as u64;
                    }
                }
            }
        }
        Ok(bytes)
    }
}
