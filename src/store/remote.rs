//! Read-only access to a snapshot whose data lives only in the store (released after upload):
//! what the NBD export `VOLUME@SNAPSHOT` serves then. Each read fetches the clusters it covers
//! (verified like every read from the store); map pages are cached once fetched. When GC has
//! moved blobs meanwhile (a cached location is gone), the manifest is read again, once.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::error::{Result, StoreError};
use super::format::{manifest_key, Manifest, Page, PAGE_CLUSTERS};
use super::region::Region;
use super::StoreService;

pub struct RemoteSnapshot {
    svc: Arc<StoreService>,
    snapshot_id: String,
    opened: Mutex<Option<(Arc<Region>, Arc<Manifest>)>>,
    pages: Mutex<HashMap<u64, Arc<Page>>>,
}

impl RemoteSnapshot {
    pub fn new(svc: Arc<StoreService>, snapshot_id: String) -> RemoteSnapshot {
        RemoteSnapshot { svc, snapshot_id, opened: Mutex::new(None), pages: Mutex::new(HashMap::new()) }
    }

    async fn opened(&self) -> Result<(Arc<Region>, Arc<Manifest>)> {
        if let Some(o) = self.opened.lock().clone() {
            return Ok(o);
        }
        let o = self.svc.locate(&self.snapshot_id, None).await?;
        *self.opened.lock() = Some(o.clone());
        Ok(o)
    }

    /// Drops the cached manifest and pages (after GC moved blobs).
    fn refresh(&self) {
        *self.opened.lock() = None;
        self.pages.lock().clear();
    }

    async fn page(&self, index: u64) -> Result<Option<Arc<Page>>> {
        if let Some(p) = self.pages.lock().get(&index) {
            return Ok(Some(p.clone()));
        }
        let (region, m) = self.opened().await?;
        let Some(pref) = m.pages.iter().find(|p| p.index == index) else { return Ok(None) };
        let r = pref.blob.to_ref(&manifest_key(&m.snapshot_id))?;
        let page = Arc::new(region.read_page(&m, index, &r).await?);
        self.pages.lock().insert(index, page.clone());
        Ok(Some(page))
    }

    /// Fills `buf` from `offset`; returns true when the whole range is a hole.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        match self.read_once(offset, buf).await {
            Err(StoreError::Missing(_)) => {
                self.refresh();
                self.read_once(offset, buf).await
            }
            r => r,
        }
    }

    async fn read_once(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let (region, m) = self.opened().await?;
        let cs = m.cluster_size as u64;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= m.size)
            .ok_or_else(|| StoreError::Invalid(format!("read past the end of snapshot {}", m.snapshot_id)))?;
        let mut hole = true;
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            let within = (pos % cs) as usize;
            let n = ((cs - within as u64).min(end - pos)) as usize;
            let out = &mut buf[(pos - offset) as usize..(pos - offset) as usize + n];
            let blob = match self.page(c / PAGE_CLUSTERS).await? {
                Some(p) => {
                    let slot = (c % PAGE_CLUSTERS) as u32;
                    p.entries.binary_search_by_key(&slot, |(i, _)| *i).ok().map(|i| p.entries[i].1)
                }
                None => None,
            };
            match blob {
                Some(b) => {
                    let plain = region.read_blob(&b).await?;
                    let src = plain.get(within..within + n).ok_or_else(|| {
                        StoreError::corrupt(manifest_key(&m.snapshot_id), format!("cluster {c} is short"))
                    })?;
                    out.copy_from_slice(src);
                    hole = false;
                }
                None => out.fill(0),
            }
            pos += n as u64;
        }
        Ok(hole)
    }

    /// Whether each cluster of the range holds data: `(length, is_hole)` runs.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let (_, m) = self.opened().await?;
        let cs = m.cluster_size as u64;
        let end = (offset + len).min(m.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            let n = (cs - pos % cs).min(end - pos);
            let data = match self.page(c / PAGE_CLUSTERS).await? {
                Some(p) => p.entries.binary_search_by_key(&((c % PAGE_CLUSTERS) as u32), |(i, _)| *i).is_ok(),
                None => false,
            };
            match out.last_mut() {
                Some((l, h)) if *h != data => *l += n,
                _ => out.push((n, !data)),
            }
            pos += n;
            if out.len() >= 1024 {
                break;
            }
        }
        Ok(out)
    }
}
