//! Storage accounting of a repository: what each snapshot and each volume takes in the store,
//! counted from the manifests and their map pages (metadata only: no data blob is read).
//!
//! Every blob is keyed by where it is stored (pack, offset), as GC's mark keys it, with its
//! sealed length. A snapshot *references* the distinct blobs its manifest reaches (its map
//! pages and their entries); a blob is *exclusive* to it when no other manifest of the
//! repository reaches it: deleting the snapshot (and running GC) frees those bytes, within
//! the slack of packs GC keeps because other blobs in them are still live.
//!
//! The result is cached per repository while the listing of `snapshots/` (ids, sizes,
//! modification times) stays the same — a repack by GC rewrites manifests, which changes it —
//! and decoded map pages are cached by their location (a page never changes where it is).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::error::{Result, StoreError};
use super::format::{manifest_key, pack_id_of_key, BlobRef, Manifest, PackId};
use super::region::Region;
use super::StoreService;

/// Map pages read at once while walking.
const PAGE_READS: usize = 16;
/// Blob references the page cache keeps at most (32 bytes each): beyond this, pages are read
/// again at the next computation rather than kept.
const PAGE_CACHE_ENTRIES: usize = 4 << 20;

/// What one snapshot takes in its repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBytes {
    /// The snapshot's size (the volume's size when it was taken).
    pub logical_bytes: u64,
    /// Clusters holding data × cluster size.
    pub allocated_bytes: u64,
    /// Sealed bytes its upload stored (new packs): what it added when uploaded.
    pub added_bytes: u64,
    /// Sealed bytes of the distinct blobs (data and map pages) its manifest reaches.
    pub referenced_bytes: u64,
    /// Of those, the bytes of blobs no other snapshot of the repository references: what
    /// deleting it would free now (GC frees them, within one pack's slack per pack).
    pub exclusive_bytes: u64,
}

/// What one volume's snapshots take in a repository (by the volume named in the manifests).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeBytes {
    pub volume: String,
    pub volume_id: String,
    /// Its snapshots stored in the repository.
    pub snapshots: u64,
    /// Sealed bytes of the distinct blobs any of its snapshots references.
    pub referenced_bytes: u64,
    /// Of those, the bytes of blobs no snapshot of another volume references: what deleting
    /// all its snapshots would free.
    pub exclusive_bytes: u64,
    /// Sum of its snapshots' `added_bytes`.
    pub added_bytes: u64,
}

/// A repository's accounting: per snapshot, per volume, and in total.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounting {
    pub repository: String,
    /// When the counts were made (unix seconds).
    pub computed_at: u64,
    /// By snapshot id.
    pub snapshots: BTreeMap<String, SnapshotBytes>,
    /// By volume name, then id.
    pub volumes: Vec<VolumeBytes>,
    /// Packs listed, and the sum of their sizes.
    pub packs: u64,
    pub stored_bytes: u64,
    /// Sealed bytes of every blob some snapshot references (each counted once).
    pub referenced_bytes: u64,
}

/// A blob, as accounting knows it: where it is stored.
type BlobKey = (PackId, u64);

/// The blobs one map page references: (pack, offset, sealed length).
type PageBlobs = Arc<Vec<(PackId, u64, u32)>>;

/// What the snapshot listing looked like: id → (size, modified).
type Listing = BTreeMap<String, (u64, SystemTime)>;

/// One repository's cache.
#[derive(Default)]
pub struct AccountingCache {
    /// One computation at a time (a second caller then finds the first's result).
    computing: tokio::sync::Mutex<()>,
    /// The last result and the listing it was computed from.
    result: Mutex<Option<(Listing, Arc<Accounting>)>>,
    /// The listing the last walk read the manifests of (kept when the result is dropped:
    /// manifests whose entry did not change since are read from the region's cache).
    walked: Mutex<Listing>,
    /// Bumped when this node changes the repository: a count that started before is not
    /// kept (it may have listed the snapshots before the change).
    generation: std::sync::atomic::AtomicU64,
    /// Decoded map pages by location.
    pages: Mutex<HashMap<BlobKey, PageBlobs>>,
}

impl AccountingCache {
    /// Keeps a result, unless the repository changed since its count started.
    fn keep(&self, generation: u64, listing: Listing, acc: Arc<Accounting>) {
        let mut result = self.result.lock();
        if self.generation.load(Ordering::Acquire) == generation {
            *result = Some((listing, acc));
        }
    }
}

/// How a blob is used, while counting.
struct BlobUse {
    len: u32,
    /// Manifests referencing it.
    refs: u32,
    /// The last manifest (index in walking order) that counted it.
    last: u32,
    /// The volume (index) of the last manifest that counted it.
    volume: u32,
    /// Manifests of more than one volume reference it.
    mixed: bool,
}

/// The counting, apart from any I/O: manifests come in grouped by volume, each followed by
/// the blobs it reaches (repeats allowed).
#[derive(Default)]
struct Tally {
    blobs: HashMap<BlobKey, BlobUse>,
    snapshots: Vec<(String, SnapshotBytes)>,
    volumes: Vec<VolumeBytes>,
    /// The volume id of each entry of `volumes`, to group by.
    volume_index: HashMap<String, u32>,
    /// The volume of the manifest being counted.
    current_volume: u32,
}

impl Tally {
    /// Starts a manifest; its blobs follow through [`Tally::blob`].
    fn manifest(&mut self, m: &Manifest) {
        let next = self.volumes.len() as u32;
        let v = *self.volume_index.entry(m.volume_id.clone()).or_insert(next);
        if v == next {
            self.volumes.push(VolumeBytes {
                volume: m.volume_name.clone(),
                volume_id: m.volume_id.clone(),
                ..Default::default()
            });
        }
        debug_assert!(v == next || v == self.current_volume, "manifests come grouped by volume");
        self.current_volume = v;
        let vol = &mut self.volumes[v as usize];
        vol.snapshots += 1;
        vol.added_bytes += m.added_bytes;
        self.snapshots.push((
            m.snapshot_id.clone(),
            SnapshotBytes {
                logical_bytes: m.size,
                allocated_bytes: m.allocated_clusters * u64::from(m.cluster_size),
                added_bytes: m.added_bytes,
                ..Default::default()
            },
        ));
    }

    /// A blob the current manifest reaches.
    fn blob(&mut self, pack: PackId, offset: u64, len: u32) {
        let Some(current) = self.snapshots.len().checked_sub(1) else { return };
        let current = current as u32;
        let snapshot_volume = self.current_volume;
        let u = self.blobs.entry((pack, offset)).or_insert(BlobUse {
            len,
            refs: 0,
            last: u32::MAX,
            volume: snapshot_volume,
            mixed: false,
        });
        if u.last == current {
            return; // counted for this manifest already
        }
        // Manifests come grouped by volume: a volume meets a blob first when the last
        // manifest that counted it was another volume's (or none did).
        let first_in_volume = u.refs == 0 || u.volume != snapshot_volume;
        u.mixed |= u.refs > 0 && u.volume != snapshot_volume;
        u.last = current;
        u.refs += 1;
        u.volume = snapshot_volume;
        let len = u64::from(u.len);
        self.snapshots[current as usize].1.referenced_bytes += len;
        if first_in_volume {
            self.volumes[snapshot_volume as usize].referenced_bytes += len;
        }
    }

    fn finish(mut self) -> (BTreeMap<String, SnapshotBytes>, Vec<VolumeBytes>, u64) {
        let mut referenced = 0;
        for u in self.blobs.values() {
            let len = u64::from(u.len);
            referenced += len;
            if u.refs == 1 {
                self.snapshots[u.last as usize].1.exclusive_bytes += len;
            }
            if !u.mixed {
                self.volumes[u.volume as usize].exclusive_bytes += len;
            }
        }
        self.volumes.sort_by(|a, b| (&a.volume, &a.volume_id).cmp(&(&b.volume, &b.volume_id)));
        (self.snapshots.into_iter().collect(), self.volumes, referenced)
    }
}

impl StoreService {
    /// The accounting of repository `repo` (`REGION` or `ACCOUNT/REGION`): reused while its
    /// listing of snapshots is unchanged (pack totals are listed afresh), else computed from
    /// the manifests and map pages, with the repository's GC lock held shared (GC never runs
    /// in the middle of it).
    pub async fn accounting(&self, repo: &str) -> Result<Arc<Accounting>> {
        let region = self.region(repo).await?;
        let cache = self.accounting_cache(repo);
        let _computing = cache.computing.lock().await;
        let _reading = region.gc_lock.read().await;
        let generation = cache.generation.load(Ordering::Acquire);
        let listing: Listing = region
            .objects
            .list("snapshots")
            .await?
            .into_iter()
            .filter_map(|o| Some((o.key.strip_prefix("snapshots/")?.to_string(), (o.size, o.modified))))
            .collect();
        let (packs, stored_bytes) = region
            .objects
            .list("packs")
            .await?
            .iter()
            .filter(|o| pack_id_of_key(&o.key).is_some())
            .fold((0, 0), |(n, bytes), o| (n + 1, bytes + o.size));
        let previous = cache.result.lock().clone();
        if let Some((seen, acc)) = &previous {
            if *seen == listing {
                if acc.packs == packs && acc.stored_bytes == stored_bytes {
                    return Ok(acc.clone());
                }
                let acc = Arc::new(Accounting { packs, stored_bytes, ..(**acc).clone() });
                cache.keep(generation, listing, acc.clone());
                return Ok(acc);
            }
        }
        let seen = cache.walked.lock().clone();
        let walked = walk(&region, &cache, &listing, &seen).await;
        *cache.walked.lock() = if walked.is_ok() { listing.clone() } else { Listing::new() };
        let (snapshots, volumes, referenced_bytes) = walked?;
        let acc = Arc::new(Accounting {
            repository: repo.to_string(),
            computed_at: self.engine.clock().now(),
            snapshots,
            volumes,
            packs,
            stored_bytes,
            referenced_bytes,
        });
        cache.keep(generation, listing, acc.clone());
        Ok(acc)
    }

    /// [`Self::accounting`], waiting at most `wait` for it (a store that is slow or down must
    /// not hold up a view): the computation goes on in the background and fills the cache,
    /// and meanwhile this answers with [`Self::cached_accounting`].
    pub async fn accounting_within(&self, repo: &str, wait: std::time::Duration) -> Result<Option<Arc<Accounting>>> {
        let Some(svc) = self.self_ref.upgrade() else { return Ok(self.cached_accounting(repo)) };
        let name = repo.to_string();
        let task = tokio::spawn(async move { svc.accounting(&name).await });
        match tokio::time::timeout(wait, task).await {
            Ok(Ok(result)) => result.map(Some),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("the accounting of '{repo}' stopped: {e}"))),
            Err(_) => {
                tracing::debug!(region = repo, "accounting takes longer than {wait:?}: answering with the cached one");
                Ok(self.cached_accounting(repo))
            }
        }
    }

    /// The last accounting computed for `repo`, without any I/O (for views); `None` if none
    /// was, or this node changed the repository since (an upload, a delete, a GC).
    pub fn cached_accounting(&self, repo: &str) -> Option<Arc<Accounting>> {
        let cache = self.accounting.lock().get(repo).cloned()?;
        let result = cache.result.lock();
        result.as_ref().map(|(_, acc)| acc.clone())
    }

    /// Drops `repo`'s cached result (its decoded pages stay): this node changed what it holds.
    pub(super) fn accounting_changed(&self, repo: &str) {
        if let Some(cache) = self.accounting.lock().get(repo) {
            let mut result = cache.result.lock();
            cache.generation.fetch_add(1, Ordering::AcqRel);
            *result = None;
        }
    }

    fn accounting_cache(&self, repo: &str) -> Arc<AccountingCache> {
        self.accounting.lock().entry(repo.to_string()).or_default().clone()
    }
}

/// Reads every manifest in `listing` (afresh when it changed since `seen`), then their map
/// pages (from the cache when there), and counts.
async fn walk(
    region: &Region,
    cache: &AccountingCache,
    listing: &Listing,
    seen: &Listing,
) -> Result<(BTreeMap<String, SnapshotBytes>, Vec<VolumeBytes>, u64)> {
    let unreadable =
        |id: &str, e: StoreError| StoreError::Invalid(format!("cannot count the store space of snapshot {id}: {e}"));
    let mut manifests = Vec::with_capacity(listing.len());
    for (id, meta) in listing {
        if seen.get(id) != Some(meta) {
            // New, or rewritten (by a repack, possibly on another node): read it again.
            region.forget_manifest(id);
        }
        match region.manifest(id).await {
            Ok(m) => manifests.push(m),
            Err(StoreError::Missing(_)) => {} // deleted since the listing
            Err(e) => return Err(unreadable(id, e)),
        }
    }
    manifests.sort_by(|a, b| (&a.volume_id, &a.snapshot_id).cmp(&(&b.volume_id, &b.snapshot_id)));
    let old_pages = std::mem::take(&mut *cache.pages.lock());
    let mut pages: HashMap<BlobKey, PageBlobs> = HashMap::new();
    let mut tally = Tally::default();
    for m in &manifests {
        let object = manifest_key(&m.snapshot_id);
        let mut refs = Vec::with_capacity(m.pages.len());
        for p in &m.pages {
            refs.push((p.index, p.blob.to_ref(&object)?));
        }
        let missing: Vec<(u64, BlobRef)> = refs
            .iter()
            .filter(|(_, r)| {
                let key = (r.pack, r.offset);
                if pages.contains_key(&key) {
                    return false;
                }
                match old_pages.get(&key) {
                    Some(p) => {
                        pages.insert(key, p.clone());
                        false
                    }
                    None => true,
                }
            })
            .copied()
            .collect();
        let read: Vec<(BlobKey, Result<PageBlobs>)> = futures::stream::iter(missing)
            .map(|(index, r)| async move {
                let page = region.read_page(m, index, &r).await;
                let blobs = page.map(|p| Arc::new(p.entries.iter().map(|(_, b)| (b.pack, b.offset, b.len)).collect()));
                ((r.pack, r.offset), blobs)
            })
            .buffer_unordered(PAGE_READS)
            .collect()
            .await;
        for (key, blobs) in read {
            pages.insert(key, blobs.map_err(|e| unreadable(&m.snapshot_id, e))?);
        }
        tally.manifest(m);
        for (_, r) in &refs {
            tally.blob(r.pack, r.offset, r.len);
            for &(pack, offset, len) in pages[&(r.pack, r.offset)].iter() {
                tally.blob(pack, offset, len);
            }
        }
    }
    // Only the pages of the manifests there now, and not too many.
    if pages.values().map(|p| p.len()).sum::<usize>() <= PAGE_CACHE_ENTRIES {
        *cache.pages.lock() = pages;
    }
    Ok(tally.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::format::FORMAT_VERSION;

    fn manifest(id: &str, volume: &str) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            snapshot_id: id.into(),
            snapshot_name: id.into(),
            volume_id: format!("v-{volume}"),
            volume_name: volume.into(),
            description: String::new(),
            created: 1,
            uploaded: 2,
            size: 1 << 30,
            cluster_size: 65536,
            base: None,
            allocated_clusters: 3,
            added_bytes: 1000,
            pages: vec![],
            source: None,
            retain_until: None,
        }
    }

    /// Blob `n` of pack `p`, `len` bytes.
    fn b(t: &mut Tally, p: u8, n: u64, len: u32) {
        t.blob([p; 16], n * 100_000, len);
    }

    #[test]
    fn shared_blobs_are_referenced_but_not_exclusive() {
        let mut t = Tally::default();
        // vol: s1 = page 1 + blobs 1, 2, 3 (blob 3 twice: equal clusters); s2 = page 2 + 2, 3, 4.
        t.manifest(&manifest("s1", "vol"));
        for (n, len) in [(0, 50), (1, 1000), (2, 2000), (3, 3000), (3, 3000)] {
            b(&mut t, 1, n, len);
        }
        t.manifest(&manifest("s2", "vol"));
        for (n, len) in [(9, 60), (2, 2000), (3, 3000), (4, 4000)] {
            b(&mut t, 1, n, len);
        }
        // other: t1 = page 3 + blob 4 (shared with vol@s2) + blob 5 (pack 2).
        t.manifest(&manifest("t1", "other"));
        b(&mut t, 2, 0, 70);
        b(&mut t, 1, 4, 4000);
        b(&mut t, 2, 5, 5000);
        // t2 = page 3 (the same page as t1's) + blob 4 again.
        t.manifest(&manifest("t2", "other"));
        b(&mut t, 2, 0, 70);
        b(&mut t, 1, 4, 4000);
        let (snaps, vols, referenced) = t.finish();
        let s1 = &snaps["s1"];
        assert_eq!((s1.referenced_bytes, s1.exclusive_bytes), (6050, 1050));
        assert_eq!((s1.logical_bytes, s1.allocated_bytes, s1.added_bytes), (1 << 30, 3 * 65536, 1000));
        let s2 = &snaps["s2"];
        assert_eq!((s2.referenced_bytes, s2.exclusive_bytes), (9060, 60), "blob 4 is shared with t1");
        let t1 = &snaps["t1"];
        assert_eq!((t1.referenced_bytes, t1.exclusive_bytes), (9070, 5000), "its page is t2's too");
        let t2 = &snaps["t2"];
        assert_eq!((t2.referenced_bytes, t2.exclusive_bytes), (4070, 0));
        assert_eq!(referenced, 50 + 1000 + 2000 + 3000 + 60 + 4000 + 70 + 5000);
        assert_eq!(vols.len(), 2);
        let (other, vol) = (&vols[0], &vols[1]);
        assert_eq!((vol.volume.as_str(), vol.snapshots, vol.added_bytes), ("vol", 2, 2000));
        assert_eq!((vol.referenced_bytes, vol.exclusive_bytes), (10110, 6110));
        assert_eq!((other.volume.as_str(), other.snapshots), ("other", 2));
        assert_eq!((other.referenced_bytes, other.exclusive_bytes), (9070, 5070), "blob 4 counted once");
    }

    #[test]
    fn deleting_a_snapshot_frees_its_exclusive_bytes() {
        // The bytes a snapshot holds exclusively are what the referenced total loses without it.
        let blobs: Vec<Vec<(u8, u64, u32)>> = vec![
            vec![(1, 0, 10), (1, 1, 100), (1, 2, 200)],
            vec![(1, 3, 10), (1, 1, 100), (2, 0, 300)],
            vec![(2, 1, 10), (2, 0, 300), (2, 2, 400), (1, 2, 200)],
        ];
        let count = |skip: Option<usize>| {
            let mut t = Tally::default();
            for (i, bs) in blobs.iter().enumerate().filter(|(i, _)| Some(*i) != skip) {
                t.manifest(&manifest(&format!("s{i}"), "vol"));
                for &(p, n, len) in bs {
                    b(&mut t, p, n, len);
                }
            }
            t.finish()
        };
        let (all, vols, total) = count(None);
        assert_eq!(vols[0].exclusive_bytes, total, "one volume holds everything exclusively");
        for i in 0..blobs.len() {
            let (_, _, without) = count(Some(i));
            assert_eq!(total - without, all[&format!("s{i}")].exclusive_bytes, "s{i}");
        }
    }
}
