//! The local blob index of one region: which blobs this node knows to be stored, and where.
//! It makes uploads incremental across restarts (a resumed upload finds the packs it already
//! sent and does not send them again) and deduplicates identical clusters.
//!
//! It is a cache, never the truth: manifests carry every location they need. Persisted as an
//! append-only log (`meta/store/<region>.index`) of frames `len u32 | crc32c u32 | payload`,
//! payload `1 | pack id | count u32 | (blob id, offset u64, len u32)*` when a pack is stored
//! and `2 | pack id` when one is deleted; a torn tail is ignored.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::crypto::BlobId;
use super::error::{Result, StoreError};
use super::format::{BlobRef, PackId};
use crate::codec::{Put, Reader};

const ADD: u8 = 1;
const DELETE: u8 = 2;

struct Inner {
    blobs: HashMap<BlobId, BlobRef>,
    packs: HashMap<PackId, Vec<BlobId>>,
}

struct Log {
    file: File,
    path: PathBuf,
}

/// Lookups take only `inner`; appends hold `log` across the write, the sync and the
/// update of `inner`, so lookups (an upload's sealing threads) never wait for a sync.
pub struct BlobIndex {
    inner: Mutex<Inner>,
    log: Mutex<Log>,
}

impl BlobIndex {
    pub fn open(path: &Path) -> Result<BlobIndex> {
        if let Some(p) = path.parent() {
            crate::fsutil::create_dir_all_durable(p).map_err(StoreError::io(format!("creating {}", p.display())))?;
        }
        let io = |what: &str| StoreError::io(format!("{what} {}", path.display()));
        let created = !path.exists();
        let mut log = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io("opening"))?;
        if created {
            // Appends are synced with sync_data, which does not make a new file's entry durable.
            crate::fsutil::sync_parent(path).map_err(io("syncing the directory of"))?;
        }
        let mut buf = Vec::new();
        log.read_to_end(&mut buf).map_err(io("reading"))?;
        let (inner, pos) = Inner::replay(&buf);
        if pos < buf.len() {
            tracing::warn!(file = %path.display(), dropped = buf.len() - pos, "blob index has a torn tail; ignoring it");
            log.set_len(pos as u64).map_err(io("truncating"))?;
        }
        Ok(BlobIndex { inner: Mutex::new(inner), log: Mutex::new(Log { file: log, path: path.to_path_buf() }) })
    }

    pub fn get(&self, id: &BlobId) -> Option<BlobRef> {
        self.inner.lock().blobs.get(id).copied()
    }

    pub fn packs(&self) -> Vec<PackId> {
        self.inner.lock().packs.keys().copied().collect()
    }

    /// Every blob id the index knows.
    pub fn blob_ids(&self) -> Vec<BlobId> {
        self.inner.lock().blobs.keys().copied().collect()
    }

    pub fn blob_count(&self) -> usize {
        self.inner.lock().blobs.len()
    }

    /// Records a pack that is now durable in the store (after its PUT succeeded).
    pub fn add_pack(&self, pack: PackId, blobs: &[(BlobId, u64, u32)]) -> Result<()> {
        let mut payload = Vec::with_capacity(21 + blobs.len() * 44);
        payload.put_u8(ADD);
        payload.extend_from_slice(&pack);
        payload.put_u32(blobs.len() as u32);
        for (id, offset, len) in blobs {
            payload.extend_from_slice(&id.0);
            payload.put_u64(*offset);
            payload.put_u32(*len);
        }
        self.append(&payload)
    }

    pub fn has_pack(&self, pack: &PackId) -> bool {
        self.inner.lock().packs.contains_key(pack)
    }

    /// Forgets a pack (deleted, or condemned, by GC).
    pub fn delete_pack(&self, pack: PackId) -> Result<()> {
        let mut payload = vec![DELETE];
        payload.extend_from_slice(&pack);
        self.append(&payload)
    }

    fn append(&self, payload: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.put_u32(payload.len() as u32);
        frame.put_u32(crc32c::crc32c(payload));
        frame.extend_from_slice(payload);
        let mut log = self.log.lock();
        let Log { file, path } = &mut *log;
        file.write_all(&frame)
            .and_then(|()| file.sync_data())
            .map_err(StoreError::io(format!("appending to {}", path.display())))?;
        self.inner.lock().apply(payload);
        Ok(())
    }
}

/// Replays an index log's bytes: how many blobs it knows and where its valid frames end.
pub(crate) fn replay_log(log: &[u8]) -> (usize, usize) {
    let (inner, valid) = Inner::replay(log);
    (inner.blobs.len(), valid)
}

impl Inner {
    /// The index a log's frames describe, and where the valid frames end (a torn or corrupt
    /// frame ends the log).
    fn replay(log: &[u8]) -> (Inner, usize) {
        let mut inner = Inner { blobs: HashMap::new(), packs: HashMap::new() };
        let mut pos = 0;
        while let Some(h) = log.get(pos..pos + 8) {
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            let Some(payload) = log.get(pos + 8..pos + 8 + len) else { break };
            if crc32c::crc32c(payload) != crc || inner.apply(payload).is_none() {
                break;
            }
            pos += 8 + len;
        }
        (inner, pos)
    }

    fn apply(&mut self, payload: &[u8]) -> Option<()> {
        let mut r = Reader::new(payload);
        let kind = r.u8().ok()?;
        let pack: PackId = r.bytes(16).ok()?.try_into().ok()?;
        match kind {
            ADD => {
                let n = r.u32().ok()?;
                // No more ids than the bytes can hold (32 + 8 + 4 each), whatever `n` says.
                let mut ids = Vec::with_capacity((n as usize).min(r.remaining() / 44));
                for _ in 0..n {
                    let id = BlobId(r.bytes(32).ok()?.try_into().ok()?);
                    let offset = r.u64().ok()?;
                    let len = r.u32().ok()?;
                    // The first known location wins; a later copy is only a GC leftover.
                    self.blobs.entry(id).or_insert(BlobRef { pack, offset, len, id });
                    ids.push(id);
                }
                self.packs.insert(pack, ids);
            }
            DELETE => {
                for id in self.packs.remove(&pack).unwrap_or_default() {
                    if self.blobs.get(&id).is_some_and(|b| b.pack == pack) {
                        self.blobs.remove(&id);
                    }
                }
            }
            _ => return None,
        }
        (r.remaining() == 0).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.index");
        let (a, b) = (BlobId([1; 32]), BlobId([2; 32]));
        {
            let idx = BlobIndex::open(&path).unwrap();
            idx.add_pack([7; 16], &[(a, 28, 100), (b, 128, 50)]).unwrap();
            idx.add_pack([8; 16], &[(b, 28, 50)]).unwrap();
            idx.delete_pack([8; 16]).unwrap();
        }
        // A torn frame at the end (a crash mid-append) is dropped.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&[9, 0, 0, 0, 1]).unwrap();
        let idx = BlobIndex::open(&path).unwrap();
        assert_eq!(idx.get(&a).unwrap().offset, 28);
        assert_eq!(idx.get(&b).map(|r| r.pack), Some([7; 16]), "deleting pack 8 keeps b's entry in pack 7");
        assert_eq!(idx.packs(), vec![[7; 16]]);
        idx.add_pack([9; 16], &[]).unwrap();
        assert_eq!(BlobIndex::open(&path).unwrap().packs().len(), 2);
    }
}
