//! Slot files: where cluster data lives. One sparse file per cluster size
//! (`DIR/data/slots-<size>.dat`); slot `n` is the byte range `n * size .. (n + 1) * size`.
//! Volumes of one cluster size share a file, which is what lets clones and snapshots of
//! different volumes reference the same slots.
//!
//! Freed slots are not reusable at once: a slot dropped from a map is first *pending*, and only
//! after the journal commit that makes the drop durable is its range punched out and reused.
//! Otherwise a crash could leave a committed map pointing at a slot that meanwhile holds
//! another cluster's data. And not before every request that may have looked the slot up has
//! ended (data-path I/O runs without the volume lock; see `gate.rs`).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use parking_lot::Mutex;
use roaring::RoaringTreemap;

use super::error::{EngineError, Result};
use super::gate::IoGate;

pub struct SlotFile {
    file: File,
    cluster_size: u32,
    shift: u32,
    alloc: Mutex<Allocator>,
    /// Set after a write, cleared by `sync`: FLUSH skips the fdatasync of idle files.
    unsynced: AtomicBool,
    /// Set after a write, cleared by `start_writeback`.
    unwritten: AtomicBool,
    /// Requests using this file's slots (of any volume) without holding a lock.
    pub gate: IoGate,
}

/// Frees taken for a commit: reusable once it succeeded and the gate passed `epoch`.
#[derive(Default)]
pub struct Frees {
    slots: Vec<u64>,
    epoch: u64,
}

#[derive(Default)]
struct Allocator {
    /// First never-allocated slot (the file's end, in slots).
    next: u64,
    /// Reusable now (their range is a hole, so they read as zeros).
    free: Vec<u64>,
    /// Dropped from maps, reusable after the next journal commit.
    pending: Vec<u64>,
    /// Committed frees waiting for requests that may still use them.
    draining: Vec<Frees>,
}

impl SlotFile {
    pub fn open(path: &Path, cluster_size: u32) -> Result<SlotFile> {
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(EngineError::io(format!("opening slot file {}", path.display())))?;
        if created {
            // Syncing the file's data later does not make its directory entry durable.
            crate::fsutil::sync_parent(path)
                .map_err(EngineError::io(format!("syncing the directory of {}", path.display())))?;
        }
        let len = file.metadata().map_err(EngineError::io(format!("reading size of {}", path.display())))?.len();
        let next = len.div_ceil(cluster_size as u64);
        Ok(SlotFile {
            file,
            cluster_size,
            shift: cluster_size.trailing_zeros(),
            alloc: Mutex::new(Allocator { next, ..Default::default() }),
            unsynced: AtomicBool::new(false),
            unwritten: AtomicBool::new(false),
            gate: IoGate::default(),
        })
    }

    pub fn cluster_size(&self) -> u32 {
        self.cluster_size
    }

    /// Startup sweep: every slot below the end of the file that no map references becomes
    /// free, and its range is punched (it may hold data of writes that were never committed).
    pub fn reset_free(&self, live: &RoaringTreemap) -> Result<u64> {
        let mut a = self.alloc.lock();
        a.free.clear();
        a.pending.clear();
        a.draining.clear();
        // Trim the end of the file down to the last live slot, so `next` stays tight.
        let next = live.max().map_or(0, |m| m + 1);
        if next < a.next {
            self.file.set_len(next << self.shift).map_err(EngineError::io("truncating a slot file"))?;
            a.next = next;
        }
        let mut run_start = None;
        for slot in 0..a.next {
            if live.contains(slot) {
                if let Some(start) = run_start.take() {
                    self.punch(start, slot - start)?;
                }
            } else {
                a.free.push(slot);
                run_start.get_or_insert(slot);
            }
        }
        if let Some(start) = run_start {
            self.punch(start, a.next - start)?;
        }
        // Pop from the end = lowest slot first, so fresh volumes get sequential slots.
        a.free.reverse();
        Ok(a.free.len() as u64)
    }

    /// A slot that reads as zeros, for the caller's exclusive use.
    pub fn allocate(&self) -> u64 {
        let mut a = self.alloc.lock();
        match a.free.pop() {
            Some(slot) => slot,
            None => {
                a.next += 1;
                a.next - 1
            }
        }
    }

    /// Drops a slot that no map references any more; reusable after the next commit.
    pub fn release(&self, slot: u64) {
        self.alloc.lock().pending.push(slot);
    }

    /// Takes the pending frees; call before draining journal records (see `Engine::commit`).
    /// Starts a gate epoch for them (left pending if the gate refuses one).
    pub fn take_pending(&self) -> Frees {
        let mut a = self.alloc.lock();
        if a.pending.is_empty() {
            return Frees::default();
        }
        match self.gate.advance() {
            Some(epoch) => Frees { slots: std::mem::take(&mut a.pending), epoch },
            None => Frees::default(),
        }
    }

    /// Gives back pending frees taken before a commit that failed.
    pub fn restore_pending(&self, mut frees: Frees) {
        self.alloc.lock().pending.append(&mut frees.slots);
    }

    /// After a successful commit: the slots become reusable once no request can still be
    /// using them (now, usually); see `reclaim`.
    pub fn free_committed(&self, frees: Frees) -> Result<()> {
        if !frees.slots.is_empty() {
            self.alloc.lock().draining.push(frees);
        }
        self.reclaim()
    }

    /// Punches and makes allocatable the committed frees whose requests have all ended.
    pub fn reclaim(&self) -> Result<()> {
        let mut slots: Vec<u64> = {
            let mut a = self.alloc.lock();
            if a.draining.is_empty() {
                return Ok(());
            }
            let (ready, waiting): (Vec<Frees>, Vec<Frees>) =
                std::mem::take(&mut a.draining).into_iter().partition(|f| self.gate.passed(f.epoch));
            a.draining = waiting;
            ready.into_iter().flat_map(|f| f.slots).collect()
        };
        // One punch per run of adjacent slots (a deleted volume frees long runs), not per slot:
        // each punch is a filesystem transaction, and a discard on filesystems mounted so.
        slots.sort_unstable();
        let mut i = 0;
        while i < slots.len() {
            let mut n = 1;
            while i + n < slots.len() && slots[i + n] == slots[i] + n as u64 {
                n += 1;
            }
            self.punch(slots[i], n as u64)?;
            i += n;
        }
        // The lowest of these are handed out first (`allocate` pops from the end).
        let mut a = self.alloc.lock();
        a.free.extend(slots.into_iter().rev());
        Ok(())
    }

    #[cfg(test)]
    pub fn stats(&self) -> (u64, u64) {
        let a = self.alloc.lock();
        let draining: usize = a.draining.iter().map(|f| f.slots.len()).sum();
        (a.next, (a.free.len() + a.pending.len() + draining) as u64)
    }

    fn offset(&self, slot: u64, within: u64) -> u64 {
        (slot << self.shift) + within
    }

    /// Reads `buf.len()` bytes at `within` inside `slot` (possibly spanning following slots).
    /// Bytes past the end of the file read as zeros.
    pub fn read(&self, slot: u64, within: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        let start = self.offset(slot, within);
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], start + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(EngineError::io(format!("reading slot {slot}"))(e)),
            }
        }
        Ok(())
    }

    /// Writes `data` at `within` inside `slot` (possibly spanning following slots).
    pub fn write(&self, slot: u64, within: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, self.offset(slot, within))
            .map_err(EngineError::io(format!("writing slot {slot}")))?;
        self.unsynced.store(true, Ordering::Release);
        self.unwritten.store(true, Ordering::Release);
        Ok(())
    }

    /// Starts (does not wait for) write-back of the file's dirty pages, so that the next
    /// `sync` — a FLUSH or a snapshot — finds little left to write. Durability still comes
    /// only from `sync`.
    pub fn start_writeback(&self) {
        if self.unwritten.swap(false, Ordering::AcqRel) {
            if let Err(error) = snapblk_ublk::sys::start_writeback(self.file.as_fd()) {
                tracing::debug!(%error, "background write-back failed");
            }
        }
    }

    /// Makes durable whatever was written to the file, by this process or an earlier one.
    pub fn sync_all_written(&self) -> Result<()> {
        self.unsynced.store(true, Ordering::Release);
        self.sync()
    }

    /// Makes every completed write durable.
    pub fn sync(&self) -> Result<()> {
        if self.unsynced.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.file.sync_data() {
                self.unsynced.store(true, Ordering::Release);
                return Err(EngineError::io("syncing a slot file")(e));
            }
        }
        Ok(())
    }

    fn punch(&self, slot: u64, count: u64) -> Result<()> {
        let (off, len) = (self.offset(slot, 0), count << self.shift);
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let range = i64::try_from(off).and_then(|off| Ok((off, i64::try_from(len)?)));
        let Ok((off, len)) = range else {
            return Err(EngineError::Corrupt(format!("slots {slot}..+{count} lie past the largest file offset")));
        };
        match fallocate(self.file.as_raw_fd(), punch, off, len) {
            Ok(()) => Ok(()),
            // Without hole punching a freed slot can't be trusted to read as zeros: zero it.
            Err(Errno::EOPNOTSUPP) => self.write(slot, 0, &vec![0u8; len as usize]),
            Err(e) => Err(EngineError::io(format!("punching slots {slot}..+{count}"))(e.into())),
        }
    }
}
