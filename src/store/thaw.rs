//! Restoring an archived snapshot whose packs are in a class that needs a thaw (`snapshot
//! restore-archive`): a restore request for each pack object it reads that is frozen, and
//! the state of them all.
//!
//! Manifests are in the standard class; map pages are blobs in packs, like data. So the packs
//! holding the snapshot's map pages (named by its manifest) are restored first; once they are
//! readable, the pages name the data packs, which are restored next. A store that takes hours
//! per thaw takes two: `--wait` (or running the command again) goes on to the second.

use std::collections::BTreeSet;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::error::Result;
use super::format::{manifest_key, pack_key, PackId};
use super::region::Region;
use super::s3::{Thaw, ThawTier};
use super::StoreService;

/// Requests (HEAD, restore, page reads) in flight at once.
const CONCURRENCY: usize = 16;

/// The thaw state of a snapshot's pack objects, as `snapshot restore-archive` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThawReport {
    pub snapshot: String,
    pub region: String,
    /// The region's configured class for packs (None: the bucket's default, or the fs kind).
    pub storage_class: Option<String>,
    /// Pack objects the snapshot reads (those known so far: see `complete`).
    pub objects: u64,
    /// Of them: readable without a thaw (their class needs none, or the store has none).
    pub not_needed: u64,
    /// Frozen, with no restore requested (a request was refused or failed).
    pub frozen: u64,
    pub in_progress: u64,
    /// Restored and readable (until `earliest_expiry` at least).
    pub readable: u64,
    /// Restores this request started.
    pub requested: u64,
    /// The earliest time (seconds since the epoch) a restored object becomes unreadable again.
    pub earliest_expiry: Option<u64>,
    /// Whether `objects` counts every pack the snapshot reads: its data packs are known only
    /// once the packs holding its map pages are readable.
    pub complete: bool,
    /// Every object the snapshot reads is readable: restores and reads work now.
    pub ready: bool,
}

impl ThawReport {
    fn count(&mut self, state: Thaw) {
        self.objects += 1;
        match state {
            Thaw::NotNeeded => self.not_needed += 1,
            Thaw::Frozen => self.frozen += 1,
            Thaw::InProgress => self.in_progress += 1,
            Thaw::Readable { expires } => {
                self.readable += 1;
                if let Some(e) = expires {
                    self.earliest_expiry = Some(self.earliest_expiry.map_or(e, |x| x.min(e)));
                }
            }
        }
    }
}

/// Each pack's state, with a restore requested for those frozen; whether all are readable.
async fn thaw_packs(
    region: &Region,
    packs: &BTreeSet<PackId>,
    days: u32,
    tier: ThawTier,
    report: &mut ThawReport,
) -> Result<bool> {
    let mut states = futures::stream::iter(packs.iter().copied())
        .map(|pack| async move {
            let key = pack_key(&pack);
            let state = region.objects.thaw_state(&key).await?;
            if state != Thaw::Frozen {
                return Ok::<_, super::error::StoreError>((state, false));
            }
            Ok((region.objects.restore(&key, days, tier).await?, true))
        })
        .buffer_unordered(CONCURRENCY);
    let mut all = true;
    while let Some(r) = states.next().await {
        let (state, requested): (Thaw, bool) = r?;
        report.requested += u64::from(requested);
        report.count(state);
        all &= state.readable();
    }
    Ok(all)
}

impl StoreService {
    /// Requests a restore (readable for `days`) of every pack object snapshot `id` of
    /// repository `repo` reads that is frozen, and reports the state of them all.
    pub async fn restore_archive(&self, repo: &str, id: &str, days: u32, tier: ThawTier) -> Result<ThawReport> {
        let region = self.region(repo).await?;
        let m = region.manifest(id).await?;
        let object = manifest_key(id);
        let pages = m.pages.iter().map(|p| p.blob.to_ref(&object).map(|r| (p.index, r))).collect::<Result<Vec<_>>>()?;
        let page_packs: BTreeSet<PackId> = pages.iter().map(|(_, r)| r.pack).collect();
        let bare = crate::engine::bare_name(repo);
        let mut report = ThawReport {
            snapshot: id.to_string(),
            region: bare.to_string(),
            storage_class: self.config.regions.get(bare).and_then(|c| c.storage_class.clone()),
            ..ThawReport::default()
        };
        if thaw_packs(&region, &page_packs, days, tier, &mut report).await? {
            let (region, m) = (&region, &m);
            let mut reads = futures::stream::iter(pages.iter().copied())
                .map(|(index, r)| async move { region.read_page(m, index, &r).await })
                .buffered(CONCURRENCY);
            let mut data_packs = BTreeSet::new();
            while let Some(page) = reads.next().await {
                for (_, b) in page.map_err(|e| e.reading(id))?.entries {
                    if !page_packs.contains(&b.pack) {
                        data_packs.insert(b.pack);
                    }
                }
            }
            thaw_packs(region, &data_packs, days, tier, &mut report).await?;
            report.complete = true;
        }
        report.ready = report.complete && report.frozen == 0 && report.in_progress == 0;
        Ok(report)
    }
}
