//! Garbage collection of a region: mark, sweep, repack.
//!
//! Runs with the region's GC lock held exclusively, so no upload is in flight and nothing an
//! upload will reference can go. Mark re-reads every manifest and map page; any unreadable one
//! stops GC before it deletes anything. Sweep deletes packs nothing references (older than the
//! grace period). Repack copies the live blobs of packs less than half live (sealed, as they
//! are) into new packs, rewrites the map pages and manifests that point at them, and only then
//! deletes the old packs: a crash at any point leaves every manifest readable.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::crypto::{hex, unhex};
use super::error::{Result, StoreError};
use super::format::{
    manifest_key, pack_id_of_key, pack_key, BlobKind, BlobRef, Manifest, PackBuilder, PackId, Page, PageRefJson,
    RefJson,
};
use super::region::Region;
use super::shared::{Condemned, Lease};
use super::StoreService;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcReport {
    pub region: String,
    pub manifests: u64,
    pub packs: u64,
    pub packs_deleted: u64,
    pub bytes_deleted: u64,
    /// Unreferenced packs kept because they are younger than the grace period.
    pub packs_young: u64,
    /// Packs found unreferenced (or repacked) by this GC: deleted by a GC after
    /// `gc.delete_delay`, if still unreferenced then.
    #[serde(default)]
    pub packs_condemned: u64,
    /// Condemned packs whose delay has not passed yet.
    #[serde(default)]
    pub packs_waiting: u64,
    pub live_bytes: u64,
    pub stored_bytes: u64,
    /// Packs less than half live that were rewritten, the live bytes copied, and the
    /// manifests updated to point at the copies.
    pub packs_repacked: u64,
    pub bytes_repacked: u64,
    pub manifests_rewritten: u64,
}

impl GcReport {
    /// Two repositories' reports as one (a region's: every account's repository in it).
    pub fn merged(self, o: GcReport) -> GcReport {
        GcReport {
            region: crate::engine::bare_name(&self.region).to_string(),
            manifests: self.manifests + o.manifests,
            packs: self.packs + o.packs,
            packs_deleted: self.packs_deleted + o.packs_deleted,
            bytes_deleted: self.bytes_deleted + o.bytes_deleted,
            packs_young: self.packs_young + o.packs_young,
            packs_condemned: self.packs_condemned + o.packs_condemned,
            packs_waiting: self.packs_waiting + o.packs_waiting,
            live_bytes: self.live_bytes + o.live_bytes,
            stored_bytes: self.stored_bytes + o.stored_bytes,
            packs_repacked: self.packs_repacked + o.packs_repacked,
            bytes_repacked: self.bytes_repacked + o.bytes_repacked,
            manifests_rewritten: self.manifests_rewritten + o.manifests_rewritten,
        }
    }
}

/// A map page of a manifest: its index, where it is stored, and its content.
type MarkedPage = (u64, BlobRef, Page);
/// A pack's blobs, as the index records them: id, offset, sealed length.
type IndexedBlobs = Vec<(super::crypto::BlobId, u64, u32)>;

/// What mark found: every manifest with its pages, and the live blobs of each pack.
struct Marked {
    manifests: Vec<(Arc<Manifest>, Vec<MarkedPage>)>,
    live: HashMap<PackId, HashMap<u64, BlobRef>>,
}

async fn mark(region: &Region, report: &mut GcReport) -> Result<Marked> {
    let stop = |e: String| StoreError::Invalid(format!("GC stopped without deleting anything: {e}"));
    let mut marked = Marked { manifests: Vec::new(), live: HashMap::new() };
    for id in region.snapshot_ids().await? {
        region.forget_manifest(&id);
        let m = match region.manifest(&id).await {
            Ok(m) => m,
            Err(StoreError::Missing(_)) => continue, // deleted since the LIST
            Err(e) => {
                return Err(stop(format!(
                    "manifest of {id} is unreadable ({e}); verify it with: snapblk snapshot verify {id} --region {}",
                    region.name
                )))
            }
        };
        report.manifests += 1;
        let object = manifest_key(&id);
        let mut pages = Vec::with_capacity(m.pages.len());
        for p in &m.pages {
            let r = p.blob.to_ref(&object)?;
            let page = region.read_page(&m, p.index, &r).await.map_err(|e| stop(e.to_string()))?;
            for b in std::iter::once(&r).chain(page.entries.iter().map(|(_, b)| b)) {
                marked.live.entry(b.pack).or_default().insert(b.offset, *b);
            }
            pages.push((p.index, r, page));
        }
        marked.manifests.push((m, pages));
    }
    Ok(marked)
}

impl StoreService {
    /// Mark, sweep and repack one region (see the module doc), under the region's GC lease.
    /// `grace` overrides both `gc.grace` and `gc.delete_delay` (e.g. "0s": delete now).
    pub async fn gc(&self, region_name: &str, grace: Option<Duration>) -> Result<GcReport> {
        let delay = grace.unwrap_or(self.config.gc_delete_delay).as_secs();
        let grace = grace.unwrap_or(self.config.gc_grace);
        let region = self.region(region_name).await?;
        let _exclusive = region.gc_lock.write().await;
        let lease = self.acquire_gc_lease(&region).await?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let renewing = self.renew_gc_lease(&region, lease.clone(), stopped);
        let run = self.gc_leased(&region, grace, delay, &lease);
        let report = tokio::select! {
            r = run => r,
            () = renewing => Err(StoreError::Busy(format!("GC of region '{region_name}' lost its lease; stopped"))),
        };
        let _ = stop.send(true);
        self.accounting_changed(region_name);
        if let Err(e) = self.release_gc_lease(&region, &lease).await {
            tracing::warn!(region = region_name, error = %e, "cannot release the GC lease; it expires by itself");
        }
        let report = report?;
        tracing::info!(
            region = region_name,
            deleted = report.packs_deleted,
            condemned = report.packs_condemned,
            repacked = report.packs_repacked,
            bytes = report.bytes_deleted,
            "GC done"
        );
        Ok(report)
    }

    async fn gc_leased(&self, region: &Region, grace: Duration, delay: u64, lease: &Lease) -> Result<GcReport> {
        let mut report = GcReport { region: region.name.clone(), ..Default::default() };
        let marked = mark(region, &mut report).await?;
        let now = SystemTime::now();
        let now_secs = self.engine.clock().now();
        let mut condemned = region.condemned().await?;
        let before = condemned.clone();
        let mut listed = HashSet::new();
        let mut sparse = Vec::new();
        let mut doomed = Vec::new();
        for obj in region.objects.list("packs").await? {
            let Some(pack) = pack_id_of_key(&obj.key) else { continue };
            listed.insert(hex(&pack));
            let old_enough = now.duration_since(obj.modified).unwrap_or_default() >= grace;
            report.packs += 1;
            report.stored_bytes += obj.size;
            match marked.live.get(&pack) {
                Some(blobs) => {
                    // Referenced again (by a node that deduplicated against it meanwhile).
                    condemned.packs.remove(&hex(&pack));
                    let live: u64 = blobs.values().map(|b| b.len as u64).sum();
                    report.live_bytes += live;
                    if live * 2 < obj.size && old_enough {
                        sparse.push((pack, obj.size));
                    }
                }
                None if !old_enough => report.packs_young += 1,
                None => {
                    let since = *condemned.packs.entry(hex(&pack)).or_insert_with(|| {
                        report.packs_condemned += 1;
                        now_secs
                    });
                    if region.index.has_pack(&pack) {
                        // Uploads here deduplicate against the index: it lets go at once.
                        region.index.delete_pack(pack)?;
                    }
                    if since + delay <= now_secs {
                        doomed.push((pack, obj));
                    } else {
                        report.packs_waiting += 1;
                    }
                }
            }
        }
        // Packs gone meanwhile (another node's GC) leave the list.
        let gone: Vec<PackId> =
            condemned.packs.keys().filter(|p| !listed.contains(*p)).filter_map(|p| unhex::<16>(p)).collect();
        for pack in gone {
            condemned.deleted(&pack, now_secs);
        }
        // The list first: a crash after the deletes leaves entries of gone packs, dropped above.
        if condemned != before {
            region.put_condemned(&condemned).await?;
        }
        if !doomed.is_empty() {
            self.check_gc_lease(region, lease).await?;
        }
        for (pack, obj) in doomed {
            region.objects.delete(&obj.key).await?;
            condemned.deleted(&pack, now_secs);
            report.packs_deleted += 1;
            report.bytes_deleted += obj.size;
            report.stored_bytes -= obj.size;
        }
        if !sparse.is_empty() {
            self.check_gc_lease(region, lease).await?;
            self.repack(region, &marked, &sparse, delay, &mut condemned, &mut report).await?;
        }
        if report.packs_deleted > 0 || report.packs_repacked > 0 {
            region.put_condemned(&condemned).await?;
        }
        Ok(report)
    }

    async fn repack(
        &self,
        region: &Region,
        marked: &Marked,
        sparse: &[(PackId, u64)],
        delay: u64,
        condemned: &mut Condemned,
        report: &mut GcReport,
    ) -> Result<()> {
        let keys = &region.keys;
        let capacity = self.config.pack_size as usize + (2 << 20);
        let mut moved: HashMap<(PackId, u64), BlobRef> = HashMap::new();
        let mut pack = PackBuilder::new(capacity);
        let mut stored: Vec<(PackId, IndexedBlobs)> = Vec::new();
        let store_pack = |pack: PackBuilder| async {
            let (id, parts, entries) = pack.finish(keys);
            let len = parts.iter().map(|p| p.len() as u64).sum::<u64>();
            region.objects.put(&pack_key(&id), object_store::PutPayload::from_iter(parts)).await?;
            let blobs: Vec<_> = entries.iter().map(|(i, o, l, _)| (*i, *o, *l)).collect();
            region.index.add_pack(id, &blobs)?;
            Ok::<_, StoreError>((id, blobs, len))
        };
        // 1. Copy the live blobs, sealed as they are (map pages are rebuilt below instead).
        let pages: HashSet<(PackId, u64)> =
            marked.manifests.iter().flat_map(|(_, ps)| ps.iter().map(|(_, r, _)| (r.pack, r.offset))).collect();
        for (old, _) in sparse {
            let key = pack_key(old);
            let bytes = region.objects.get(&key).await?;
            let mut blobs: Vec<&BlobRef> = marked.live[old].values().collect();
            blobs.sort_by_key(|b| b.offset);
            for b in blobs {
                if pages.contains(&(b.pack, b.offset)) {
                    continue;
                }
                let sealed = bytes
                    .get(b.offset as usize..b.offset as usize + b.len as usize)
                    .ok_or_else(|| StoreError::corrupt(&key, "a referenced blob lies past the end of the pack"))?;
                // Never copy a blob that does not verify (it would hide the damage).
                keys.open_blob(&b.id, sealed, &key)?;
                let r = pack.add_sealed(b.id, sealed, BlobKind::Data);
                moved.insert((b.pack, b.offset), r);
                report.bytes_repacked += b.len as u64;
            }
            if pack.len() >= self.config.pack_size {
                let full = std::mem::replace(&mut pack, PackBuilder::new(capacity));
                let (id, blobs, _) = store_pack(full).await?;
                stored.push((id, blobs));
            }
        }
        // 2. Rebuild the pages that live in, or point into, a sparse pack.
        let sparse_set: HashSet<PackId> = sparse.iter().map(|(p, _)| *p).collect();
        let mut new_pages: HashMap<(PackId, u64), BlobRef> = HashMap::new();
        let mut rewritten = Vec::new();
        for (m, pages) in &marked.manifests {
            let mut changed = false;
            let mut refs = Vec::with_capacity(pages.len());
            for (index, r, page) in pages {
                let touched =
                    sparse_set.contains(&r.pack) || page.entries.iter().any(|(_, b)| sparse_set.contains(&b.pack));
                if !touched {
                    refs.push(PageRefJson { index: *index, blob: RefJson::from(r) });
                    continue;
                }
                changed = true;
                let nr = match new_pages.get(&(r.pack, r.offset)) {
                    Some(nr) => *nr,
                    None => {
                        let entries = page
                            .entries
                            .iter()
                            .map(|(i, b)| (*i, moved.get(&(b.pack, b.offset)).copied().unwrap_or(*b)))
                            .collect();
                        let plain = Page { entries }.encode(*index);
                        let nr = pack.add(keys, keys.blob_id(&plain), &plain, BlobKind::Page);
                        new_pages.insert((r.pack, r.offset), nr);
                        nr
                    }
                };
                refs.push(PageRefJson { index: *index, blob: RefJson::from(&nr) });
            }
            if changed {
                rewritten.push(Manifest { pages: refs, ..(**m).clone() });
            }
        }
        if !pack.is_empty() {
            let (id, blobs, _) = store_pack(pack).await?;
            stored.push((id, blobs));
        }
        // 3. Manifests (overwritten in place: same snapshot, same content, new locations),
        //    then the old packs. Each under the publish lock, and only while the manifest is
        //    still there: a snapshot this node deleted since mark (its manifest is deleted
        //    under that lock) must not come back. (Its old packs may then go: nothing else
        //    references them — and a deleted snapshot's blobs the copies hold are left to the
        //    next GC.)
        for m in rewritten {
            let _publishing = self.publish.lock().await;
            match region.objects.get(&manifest_key(&m.snapshot_id)).await {
                Err(StoreError::Missing(_)) => {
                    region.forget_manifest(&m.snapshot_id);
                    continue;
                }
                other => other?,
            };
            region.put_manifest(m).await?;
            report.manifests_rewritten += 1;
        }
        // The old packs: condemned like unreferenced ones — other nodes' indexes may still
        // name their blobs — and deleted by a later GC; at once only with no delay ("0s":
        // nothing else uses the region).
        let now_secs = self.engine.clock().now();
        for (old, size) in sparse {
            region.index.delete_pack(*old)?;
            report.packs_repacked += 1;
            if delay == 0 {
                region.objects.delete(&pack_key(old)).await?;
                condemned.deleted(old, now_secs);
                report.bytes_deleted += size;
                report.stored_bytes -= size;
            } else {
                condemned.packs.entry(hex(old)).or_insert(now_secs);
                report.packs_condemned += 1;
            }
        }
        // The copies take over in the index from the blobs the old packs held.
        for (id, blobs) in stored {
            region.index.add_pack(id, &blobs)?;
            report.stored_bytes += blobs.iter().map(|b| b.2 as u64).sum::<u64>();
        }
        Ok(())
    }
}
