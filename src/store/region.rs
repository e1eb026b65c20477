//! One region, opened: its object store (with layers), repository keys, blob index and a cache
//! of manifests. Reading anything back goes through here, and every byte read is verified
//! (AEAD tag, then the keyed hash against the blob id) before it is used.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;

use super::config::RegionConfig;
use super::crypto::{self, Plaintext, RepoKeys};
use super::error::{Result, StoreError};
use super::format::{group_key, manifest_key, pack_key, BlobRef, GroupManifest, Manifest, Page, REPO_KEY_OBJECT};
use super::index::BlobIndex;
use super::objects::{Objects, RateLimiter};

/// Coalesced ranged GETs of verify and export (16 in flight) are at most this large.
const FETCH_RUN: u64 = 8 << 20;
/// Those of a background restore: a whole pack of the default size. Fewer, larger GETs
/// restore faster from S3 stores (Garage, 3 runs each: 313–359 MiB/s with 8 MiB, 354–416 with
/// 32 MiB); the price is `[hydrate] concurrency` buffers of up to this size while a volume
/// loads.
pub const RESTORE_RUN: u64 = 32 << 20;
/// Blobs closer than this in one pack are fetched by one GET (the gap is read and dropped).
/// A few clusters: an incremental snapshot supersedes scattered clusters of the packs below
/// it, and a request to an object store costs about as much as reading a few hundred KiB.
const MAX_GAP: u64 = 320 << 10;

pub struct Region {
    pub name: String,
    pub objects: Objects,
    pub keys: RepoKeys,
    pub index: BlobIndex,
    /// Uploads hold it shared, GC exclusively: GC never runs while an upload may reference a
    /// blob it is about to delete.
    pub gc_lock: tokio::sync::RwLock<()>,
    /// Whether the store enforces conditional writes (probed at open; `region show`).
    pub conditional: super::shared::ConditionalWrites,
    manifests: Mutex<HashMap<String, Arc<Manifest>>>,
}

/// Whether a key names an object snapblk writes (packs, snapshots, keys).
fn is_snapblk_object(key: &str) -> bool {
    ["packs/", "snapshots/", "keys/", "groups/", "holds/", "gc/", "shares/", "image-shares/"]
        .iter()
        .any(|p| key.starts_with(p))
}

impl Region {
    /// Opens a region: loads (or creates) the key file, then loads (or creates) the repository
    /// key in the store.
    pub async fn open(cfg: &RegionConfig, dir: &Path, limiter: Option<Arc<RateLimiter>>) -> Result<Region> {
        let objects = Objects::open(cfg, limiter)?;
        let (kek, created) = crypto::load_or_create_kek(&cfg.key_file)?;
        if created {
            tracing::warn!(
                region = %cfg.name,
                key_file = %cfg.key_file.display(),
                "generated a new key file for this region: back it up (snapblk key export {}); without it the region's snapshots cannot be read",
                cfg.name
            );
        }
        let wrapped = match objects.get(REPO_KEY_OBJECT).await {
            Ok(b) => b,
            Err(StoreError::Missing(_)) => {
                // No key: a new repository only if the region is provably empty. A region
                // with snapblk objects but no key (a transient 404, a wrong prefix, a lost key
                // object) must never get a new key: its objects would become unreadable.
                let found = objects.list("").await?;
                if let Some(o) = found.iter().find(|o| is_snapblk_object(&o.key)) {
                    return Err(StoreError::Config(format!(
                        "region '{}' holds snapblk objects (e.g. {}) but no repository key ({REPO_KEY_OBJECT}); refusing to create a new repository, which would make them unreadable: check the region's bucket and prefix, or restore {REPO_KEY_OBJECT} from a backup",
                        cfg.name, o.key
                    )));
                }
                // Create-only where the store supports it; two daemons initializing at once
                // then converge on the first key. (Garage ignores If-None-Match: start the
                // first daemon of a region alone.) Read back either way.
                let master = crypto::new_master();
                let wrapped = Bytes::from(crypto::wrap_master(&kek, &master, cfg.new_repository_cipher));
                if objects.put_new(REPO_KEY_OBJECT, wrapped).await? {
                    tracing::info!(region = %cfg.name, cipher = cfg.new_repository_cipher.name(), "initialized a new repository");
                }
                objects.get(REPO_KEY_OBJECT).await?
            }
            Err(e) => return Err(e),
        };
        let (master, repo_cipher) = crypto::unwrap_master(&kek, &wrapped, &cfg.name, &cfg.key_file)?;
        let index = BlobIndex::open(&dir.join("meta").join("store").join(format!("{}.index", cfg.name)))?;
        let mut region = Region {
            name: cfg.name.clone(),
            objects,
            keys: RepoKeys::new(&master, repo_cipher),
            index,
            gc_lock: tokio::sync::RwLock::new(()),
            conditional: super::shared::ConditionalWrites::NotEnforced,
            manifests: Mutex::new(HashMap::new()),
        };
        region.conditional = region.probe_conditional_writes().await?;
        Ok(region)
    }

    /// A snapshot's manifest (cached: manifests never change, except for their locations after
    /// a repack, which drops them from the cache).
    pub async fn manifest(&self, snapshot_id: &str) -> Result<Arc<Manifest>> {
        if let Some(m) = self.manifests.lock().get(snapshot_id) {
            return Ok(m.clone());
        }
        let bytes = self.objects.get(&manifest_key(snapshot_id)).await?;
        let m = Arc::new(Manifest::open(&self.keys, &bytes, snapshot_id)?);
        self.manifests.lock().insert(snapshot_id.to_string(), m.clone());
        Ok(m)
    }

    pub fn cached_manifest(&self, snapshot_id: &str) -> Option<Arc<Manifest>> {
        self.manifests.lock().get(snapshot_id).cloned()
    }

    pub fn forget_manifest(&self, snapshot_id: &str) {
        self.manifests.lock().remove(snapshot_id);
    }

    pub async fn put_manifest(&self, m: Manifest) -> Result<u64> {
        let sealed = Bytes::from(m.seal(&self.keys));
        let n = sealed.len() as u64;
        self.objects.put(&manifest_key(&m.snapshot_id), sealed).await?;
        self.manifests.lock().insert(m.snapshot_id.clone(), Arc::new(m));
        Ok(n)
    }

    /// Publishes a group snapshot (its members' manifests are already there).
    pub async fn put_group_manifest(&self, g: &GroupManifest) -> Result<()> {
        self.objects.put(&group_key(&g.id), Bytes::from(g.seal(&self.keys))).await
    }

    /// Every group snapshot published in the region, whichever node took it.
    pub async fn group_manifests(&self) -> Result<Vec<GroupManifest>> {
        let mut out = Vec::new();
        for o in self.objects.list("groups").await? {
            let Some(id) = o.key.strip_prefix("groups/") else { continue };
            match self.objects.get(&o.key).await {
                Ok(bytes) => out.push(GroupManifest::open(&self.keys, &bytes, id)?),
                // Deleted since the listing.
                Err(StoreError::Missing(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| (a.group.as_str(), a.created).cmp(&(b.group.as_str(), b.created)));
        Ok(out)
    }

    pub async fn delete_group_manifest(&self, id: &str) -> Result<()> {
        self.objects.delete(&group_key(id)).await
    }

    /// Ids of every snapshot stored in the region (LIST: for discovery only).
    pub async fn snapshot_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .objects
            .list("snapshots")
            .await?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix("snapshots/").map(String::from))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Reads and verifies one blob.
    pub async fn read_blob(&self, r: &BlobRef) -> Result<Plaintext> {
        let key = pack_key(&r.pack);
        let sealed = self.objects.get_range(&key, r.offset..r.offset + r.len as u64).await?;
        self.keys.open_blob(&r.id, &sealed, &key)
    }

    pub async fn read_page(&self, manifest: &Manifest, index: u64, r: &BlobRef) -> Result<Page> {
        let plain = self.read_blob(r).await?;
        Page::decode(&plain, index, &format!("{} (page {index})", manifest_key(&manifest.snapshot_id)))
    }

    /// Fetches many blobs with coalesced ranged GETs, `concurrency` at a time, and hands each
    /// verified plaintext (or the error for it) to `sink` with its tag. Blobs are grouped by
    /// pack and offset; runs of nearby blobs become one GET.
    pub async fn fetch_blobs<T: Send + 'static>(
        &self,
        blobs: Vec<(BlobRef, T)>,
        concurrency: usize,
        mut sink: impl FnMut(T, &BlobRef, Result<Plaintext>),
    ) {
        let runs = coalesce(blobs, FETCH_RUN);
        let mut results = futures::stream::iter(runs)
            .map(|run| async move {
                let start = run[0].0.offset;
                let last = &run[run.len() - 1].0;
                let key = pack_key(&run[0].0.pack);
                match self.objects.get_range(&key, start..last.offset + last.len as u64).await {
                    // Opening is inline: a cluster decrypts, decompresses and hashes in tens
                    // of microseconds, less than a hop to a blocking thread would cost.
                    Ok(bytes) => run
                        .into_iter()
                        .map(|(r, t)| {
                            let at = (r.offset - start) as usize;
                            let plain = self.keys.open_blob(&r.id, &bytes[at..at + r.len as usize], &key);
                            (t, r, plain)
                        })
                        .collect::<Vec<_>>(),
                    Err(e) => {
                        let msg = e.to_string();
                        run.into_iter()
                            .map(|(r, t)| {
                                let err = match &e {
                                    StoreError::Missing(_) => StoreError::Missing(key.clone()),
                                    StoreError::Frozen { object, region, class, snapshot } => StoreError::Frozen {
                                        object: object.clone(),
                                        region: region.clone(),
                                        class: class.clone(),
                                        snapshot: snapshot.clone(),
                                    },
                                    _ => StoreError::Unavailable(msg.clone()),
                                };
                                (t, r, Err(err))
                            })
                            .collect()
                    }
                }
            })
            .buffer_unordered(concurrency);
        while let Some(batch) = results.next().await {
            for (t, r, plain) in batch {
                sink(t, &r, plain);
            }
        }
    }
}

/// Groups blobs into ranged GETs: sorted by pack and offset, runs of nearby blobs (gaps up to
/// `MAX_GAP`, at most `max_run` long) in one GET.
pub fn coalesce<T>(mut blobs: Vec<(BlobRef, T)>, max_run: u64) -> Vec<Vec<(BlobRef, T)>> {
    blobs.sort_by_key(|(r, _)| (r.pack, r.offset));
    let mut runs: Vec<Vec<(BlobRef, T)>> = Vec::new();
    for (r, t) in blobs {
        if let Some(run) = runs.last_mut() {
            let (first, last) = (&run[0].0, &run[run.len() - 1].0);
            let end = last.offset + last.len as u64;
            if first.pack == r.pack
                && r.offset >= end
                && r.offset - end <= MAX_GAP
                && r.offset + r.len as u64 - first.offset <= max_run
            {
                run.push((r, t));
                continue;
            }
        }
        runs.push(vec![(r, t)]);
    }
    runs
}
