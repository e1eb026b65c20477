//! Read-only access to a snapshot whose data lives only in the store (released after upload):
//! what the NBD export `VOLUME@SNAPSHOT` serves then. Reads go through the hydration
//! scheduler as foreground fetches — the same verified reads, shared page cache, sharing of
//! concurrent fetches and `hydrate.read_timeout` bound as a volume loading from the store —
//! but nothing is stored locally (the data stays released).

use std::sync::Arc;

use super::hydrate::Hydration;
use crate::engine::{EngineError, RemoteSource, Result};

pub struct RemoteSnapshot {
    hydration: Arc<Hydration>,
    source: RemoteSource,
    size: u64,
    cluster_size: u64,
}

impl RemoteSnapshot {
    pub fn new(hydration: Arc<Hydration>, source: RemoteSource, size: u64, cluster_size: u32) -> RemoteSnapshot {
        RemoteSnapshot { hydration, source, size, cluster_size: cluster_size as u64 }
    }

    /// Fills `buf` from `offset`; returns true when the whole range is a hole.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let cs = self.cluster_size;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| EngineError::Invalid(format!("read past the end of snapshot {}", self.source)))?;
        let mut hole = true;
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            let within = (pos % cs) as usize;
            let n = ((cs - within as u64).min(end - pos)) as usize;
            let out = &mut buf[(pos - offset) as usize..(pos - offset) as usize + n];
            match self.hydration.fetch_foreground(self.source.clone(), c).await? {
                Some(plain) => {
                    let src = plain
                        .get(within..within + n)
                        .ok_or_else(|| EngineError::Corrupt(format!("cluster {c} of {} is short", self.source)))?;
                    out.copy_from_slice(src);
                    hole = false;
                }
                None => out.fill(0),
            }
            pos += n as u64;
        }
        Ok(hole)
    }

    /// Whether each cluster of the range holds data: `(length, is_hole)` runs, from the map
    /// pages (O(extents), never a walk of every cluster); at most about 1024 runs.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let cs = self.cluster_size;
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let runs = self.hydration.data_runs(&self.source, offset / cs, end.div_ceil(cs)).await?;
        Ok(runs
            .into_iter()
            .map(|(first, last, data)| {
                let (from, to) = ((first * cs).max(offset), (last * cs).min(end));
                (to.saturating_sub(from), !data)
            })
            .filter(|(n, _)| *n > 0)
            .collect())
    }
}
