//! The commit protocol (FLUSH, FUA, control operations), the checkpoint, and the write-back
//! thread. See docs/ARCHITECTURE.md, "FLUSH, FUA and crash safety", for the steps and the
//! invariant `commit_begin` enforces.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLockWriteGuard};

use super::checkpoint;
use super::error::{EngineError, Result};
use super::journal::{Journal, Record};
use super::registry::{Dropped, Registry, Snapshot, Volume};
use super::slots::{Frees, SlotFile};
use super::Engine;

/// Rotate the journal into a new checkpoint once it is this large.
const CHECKPOINT_AFTER: u64 = 64 << 20;
/// How often dirty slot data is pushed towards the disk in the background.
const WRITEBACK_INTERVAL: Duration = Duration::from_millis(50);
/// How long the write-back thread lets a new snapshot seal before committing anyway.
const SEAL_WAIT_IN_WRITEBACK: Duration = Duration::from_millis(100);
/// Uncommitted journal records held in memory before the background thread commits them.
const PENDING_COMMIT_BYTES: usize = 4 << 20;

/// A snapshot waiting for its seal, with its volume and the ticket of its record.
pub(super) struct Unsealed {
    pub(super) snap: Arc<Snapshot>,
    pub(super) vol: Arc<Volume>,
    pub(super) ticket: u64,
}

/// A slot only one head still references after a map was dropped: that head owns it again
/// (may write it in place) once the record that dropped the map is durable. Until then a
/// crash could bring the dropped map (a snapshot) back, and an in-place write would have
/// changed it.
pub(super) struct Regain {
    pub(super) vol: Arc<Volume>,
    pub(super) cluster: u64,
    pub(super) entry: u64,
    /// The head's `seal` when found: a snapshot taken since shares the slot again.
    pub(super) seal: u64,
}

impl Regain {
    pub(super) fn apply(self) {
        let mut st = self.vol.state.write();
        // The data path may have redirected the cluster meanwhile (the old slot then stays
        // allocated until the start-up sweep; rare, and never unsafe).
        if st.seal == self.seal && st.head.get(self.cluster) == self.entry {
            st.owned.insert(self.cluster);
        }
    }
}

/// `Snapshot::durable_ticket` while no commit has started since the seal.
pub(super) const UNSEALED: u64 = u64::MAX;

/// The end of the journal: records staged for the next commit, and the journal file they go
/// to. Held briefly (never across a sync), so a snapshot create never waits behind a commit.
pub(super) struct Tail {
    pub(super) journal: Journal,
    pub(super) staged: Vec<u8>,
    /// Commits that have written the staged records so far: records staged or written now are
    /// covered by the commit numbered `taken + 1`.
    pub(super) taken: u64,
}

/// A commit between its journal write and its syncs (see `Engine::commit_begin`).
struct Commit {
    frees: Vec<Frees>,
    sealed: Vec<Unsealed>,
    /// The journal offset its records end at, and its number.
    through: u64,
    number: u64,
    journal: Arc<fs::File>,
    /// The slot files whose frees it took (and which it syncs).
    slot_files: Vec<Arc<SlotFile>>,
}

/// A checkpoint between its image and its installation (see `Engine::checkpoint`).
pub(super) struct CheckpointImage<'a> {
    _committer: parking_lot::MutexGuard<'a, ()>,
    dir: PathBuf,
    generation: u64,
    bytes: Vec<u8>,
}

/// Wakes the write-back thread for a commit now (a snapshot create staged a record).
#[derive(Default)]
pub(super) struct CommitWanted {
    pub(super) wanted: Mutex<bool>,
    pub(super) wake: parking_lot::Condvar,
}

impl Engine {
    /// Every `WRITEBACK_INTERVAL`, starts write-back of the slot files written since, so dirty
    /// data does not pile up between flushes (which would make a FLUSH wait for all of it),
    /// and commits when uncommitted records pass `PENDING_COMMIT_BYTES` or a snapshot create
    /// asks for it (`request_commit`), or a snapshot waits for a commit after its seal. Also
    /// frees slots whose last requests have ended. Ends when the engine is dropped or shut
    /// down.
    pub(super) fn spawn_writeback(
        engine: std::sync::Weak<Engine>,
        wanted: Arc<CommitWanted>,
    ) -> Option<std::thread::JoinHandle<()>> {
        let spawned = std::thread::Builder::new().name("snapblk-writeback".into()).spawn(move || loop {
            let requested = {
                let mut w = wanted.wanted.lock();
                if !*w {
                    wanted.wake.wait_for(&mut w, WRITEBACK_INTERVAL);
                }
                std::mem::take(&mut *w)
            };
            let Some(e) = engine.upgrade() else { return };
            if e.shutting_down.load(Ordering::Acquire) {
                return;
            }
            let (files, pending) = {
                let reg = e.registry.read();
                let pending: usize = reg.volumes.values().map(|v| v.pending.lock().len()).sum();
                (reg.slot_files.values().cloned().collect::<Vec<_>>(), pending)
            };
            // A snapshot create asked for this commit: let it seal first (writes in flight
            // when it was taken end within milliseconds), so this commit makes it durable.
            let unsealed: Vec<_> = e.unsealed.lock().iter().map(|u| (u.snap.seal(), u.vol.slots.clone())).collect();
            for (seal, slots) in &unsealed {
                slots.gate.wait(*seal, SEAL_WAIT_IN_WRITEBACK);
            }
            // Map changes not yet committed are held in memory; past a bound, commit them
            // (committing early is always safe, and it keeps replay after a crash short).
            if requested || pending > PENDING_COMMIT_BYTES || !unsealed.is_empty() {
                if let Err(err) = e.commit() {
                    tracing::warn!(error = %err, "background commit failed");
                }
            }
            drop(e);
            for f in files {
                f.start_writeback();
                // Frees left waiting for requests that were still running at their commit.
                if let Err(err) = f.reclaim() {
                    tracing::warn!(error = %err, "cannot free slots");
                }
            }
        });
        spawned
            .inspect_err(
                |err| tracing::warn!(error = %err, "cannot start the write-back thread; flushes may take longer"),
            )
            .ok()
    }

    /// Test support: stops the write-back thread and waits for it, so a test can open
    /// another engine on this directory (as a restarted daemon would, the old process gone)
    /// without this one committing or freeing slots under it.
    #[cfg(test)]
    pub(crate) fn stop_background(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.request_commit();
        if let Some(h) = self.writeback.lock().take() {
            let _ = h.join();
        }
    }

    /// Makes every acknowledged write and every map change durable: slot data first, then the
    /// journal records that point at it. FLUSH and FUA end here; it covers all volumes (one
    /// cache for all connections, which is what makes multi-conn safe).
    pub fn commit(&self) -> Result<()> {
        self.check_writable()?;
        self.commit_all()?;
        if self.tail.lock().journal.len > CHECKPOINT_AFTER {
            self.checkpoint()?;
        }
        Ok(())
    }

    pub(super) fn commit_all(&self) -> Result<()> {
        let _c = self.committer.lock();
        self.commit_locked()
    }

    /// One commit (the caller holds `committer`): writes the staged records and every
    /// volume's data-path records, syncs the slot files, marks the records synced and syncs
    /// the journal. Records written meanwhile (a snapshot create) wait for the next commit.
    fn commit_locked(&self) -> Result<()> {
        let commit = {
            let reg = self.registry.read();
            self.commit_begin(&reg)?
        };
        self.commit_end(commit)
    }

    /// A commit's first half (memory and one journal `pwrite`, under the tail lock): takes the
    /// frees and the sealed snapshots it will settle, and writes the staged records followed by
    /// every volume's data-path records.
    ///
    /// **The one rule that keeps flushed data safe**: a slot is punched (and may be reused)
    /// only by the commit that took it here, and this commit writes every record that was
    /// staged or pending when it took it — whatever operation asked for the commit. Every
    /// path that drops a slot from a map pushes or stages the record first and releases the
    /// slot after (`VolumeHandle::install`, `Registry::release_dropped`), so the record that
    /// stops referencing a slot is always durable before the slot is freed.
    fn commit_begin(&self, reg: &Registry) -> Result<Commit> {
        let slot_files: Vec<_> = reg.slot_files.values().cloned().collect();
        // Frees first: a slot released after this point may have its record drained after
        // the drain below, so it waits for the next commit.
        let frees: Vec<_> = slot_files.iter().map(|f| f.take_pending()).collect();
        // Snapshots sealed by now: the slot sync below covers every write they include.
        let sealed: Vec<_> = {
            let mut u = self.unsealed.lock();
            let (sealed, waiting) = std::mem::take(&mut *u).into_iter().partition(|u| u.snap.is_sealed(&u.vol));
            *u = waiting;
            sealed
        };
        let written = (|| {
            let mut t = self.tail.lock();
            // Every volume, not only those a caller has in mind: records of one volume may
            // be what makes another operation's frees safe (issue 18).
            for v in reg.volumes.values() {
                let mut p = v.pending.lock();
                t.staged.extend_from_slice(&p);
                p.clear();
            }
            t.taken += 1;
            let Tail { journal, staged, taken } = &mut *t;
            let through = journal.write(staged)?;
            staged.clear();
            Ok((through, *taken, journal.file()))
        })();
        match written {
            Ok((through, number, journal)) => Ok(Commit { frees, sealed, through, number, journal, slot_files }),
            Err(e) => Err(self.commit_failed(frees, sealed, &slot_files, e)),
        }
    }

    /// The second half: syncs the slot files, marks the records written by the first half as
    /// synced and syncs the journal; then settles the frees and sealed snapshots.
    fn commit_end(&self, commit: Commit) -> Result<()> {
        let slot_files = &commit.slot_files;
        let synced = (|| {
            // Every record written by `commit_begin` points at data written before it was staged.
            for f in slot_files {
                f.sync()?;
            }
            self.tail.lock().journal.mark_synced(commit.through)?;
            commit.journal.sync_data().map_err(EngineError::io("syncing the journal"))
        })();
        if let Err(e) = synced {
            return Err(self.commit_failed(commit.frees, commit.sealed, slot_files, e));
        }
        for u in commit.sealed {
            u.snap.durable_ticket.store(u.ticket.max(commit.number), Ordering::Release);
        }
        self.durable_through.fetch_max(commit.number, Ordering::AcqRel);
        for (f, slots) in slot_files.iter().zip(commit.frees) {
            f.free_committed(slots)?;
        }
        Ok(())
    }

    /// In-memory state may now be ahead of the disk: no more changes are accepted.
    fn commit_failed(
        &self,
        frees: Vec<Frees>,
        sealed: Vec<Unsealed>,
        slot_files: &[Arc<SlotFile>],
        e: EngineError,
    ) -> EngineError {
        self.unsealed.lock().extend(sealed);
        for (f, slots) in slot_files.iter().zip(frees) {
            f.restore_pending(slots);
        }
        self.failed.store(true, Ordering::Release);
        tracing::error!(error = %e, "commit failed; refusing further changes");
        e
    }

    /// Writes a new checkpoint of the whole state and starts a fresh journal.
    pub(super) fn checkpoint(&self) -> Result<()> {
        let image = self.image_for_checkpoint()?;
        self.install_checkpoint(image)
    }

    /// The first half of a checkpoint: the image of the state, with the next generation's
    /// journal attached to the tail (frames written from now on go to both journals).
    pub(super) fn image_for_checkpoint(&self) -> Result<CheckpointImage<'_>> {
        // A commit first, without holding any lock the data path or a snapshot create needs,
        // so the one under those locks below has next to nothing left to sync.
        self.commit_all()?;
        // Held to the end: no commit (and no other checkpoint) runs meanwhile.
        let committer = self.committer.lock();
        let (dir, generation, boot) = {
            let t = self.tail.lock();
            (t.journal.dir().to_path_buf(), t.journal.generation, t.journal.boot())
        };
        let next = Journal::create_next(&dir, generation, boot)?;
        let reg = self.registry.read();
        let volumes: Vec<_> = reg.volumes.values().cloned().collect();
        // Hold every volume's state lock while draining its records and imaging it, so the
        // image is exactly "all records so far"; records written after it (a snapshot create
        // may write one as soon as the registry is free) go to the next journal too.
        // (Volume state before the tail here: no one stages meanwhile, they need the registry
        // exclusively.)
        let guards: Vec<_> = volumes.iter().map(|v| v.state.read()).collect();
        let commit = self.commit_begin(&reg)?;
        if let Err(e) = self.tail.lock().journal.attach_next(next) {
            drop((guards, reg));
            self.commit_end(commit)?;
            return Err(e);
        }
        let image = reg.image(generation + 1, &volumes, &guards);
        // The image shares the maps (O(1) clones): encoding it, and syncing what it points
        // at, need none of the locks.
        drop((guards, reg));
        self.commit_end(commit)?;
        Ok(CheckpointImage {
            _committer: committer,
            dir,
            generation: generation + 1,
            bytes: checkpoint::encode(&image),
        })
    }

    /// The second half, with no lock but the committer's (snapshot creates go on meanwhile):
    /// writes and installs the checkpoint file, then switches to the next journal.
    pub(super) fn install_checkpoint(&self, image: CheckpointImage<'_>) -> Result<()> {
        Journal::install_checkpoint(&image.dir, &image.bytes)
            .inspect_err(|_| self.failed.store(true, Ordering::Release))?;
        self.tail.lock().journal.switch_to_next();
        tracing::debug!(generation = image.generation, bytes = image.bytes.len(), "checkpoint written");
        Ok(())
    }

    /// Runs a control operation: applies `recs` under the registry lock (after the earlier
    /// data-path records of the volumes they concern) and lets `then` read the result; then
    /// lets the lock go and commits, so other operations (a snapshot create above all) never
    /// wait for this one's disk sync.
    pub(super) fn run<T>(
        &self,
        mut reg: RwLockWriteGuard<'_, Registry>,
        recs: &[Record],
        then: impl FnOnce(&Registry) -> T,
    ) -> Result<T> {
        let (ticket, dropped) = self.stage(&mut reg, recs, false)?;
        // Under the same registry lock as the records, so no other operation can drop (and
        // free) a slot these maps hold in between.
        let regained: Vec<Regain> = dropped.iter().flat_map(|d| reg.release_dropped(d)).collect();
        let out = then(&reg);
        drop(reg);
        self.commit_through(ticket)?;
        regained.into_iter().for_each(Regain::apply);
        Ok(out)
    }

    /// Applies `recs` and stages them (after the earlier data-path records of the volumes
    /// they concern) for the next commit, without waiting for it; with `write`, also writes
    /// everything staged to the journal now (crash-safe once written, power-safe once
    /// committed). Returns the commit number that makes them durable, and the maps they
    /// dropped.
    pub(super) fn stage(&self, reg: &mut Registry, recs: &[Record], write: bool) -> Result<(u64, Vec<Dropped>)> {
        self.check_writable()?;
        let mut t = self.tail.lock();
        let mut dropped = Vec::new();
        for rec in recs {
            dropped.extend(reg.apply_all(rec, &self.data_dir, Some(&mut t.staged))?);
            rec.encode(&mut t.staged);
        }
        if write {
            let Tail { journal, staged, .. } = &mut *t;
            if let Err(e) = journal.write(staged) {
                self.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "journal write failed; refusing further changes");
                return Err(e);
            }
            staged.clear();
        }
        Ok((t.taken + 1, dropped))
    }

    /// Returns once the commit numbered `ticket` (or a later one) has completed, running one
    /// if need be. Other volumes' data-path records wait for their own commit.
    pub(super) fn commit_through(&self, ticket: u64) -> Result<()> {
        if self.durable_through.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        let _c = self.committer.lock();
        if self.durable_through.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        self.check_writable()?;
        self.commit_locked()
    }

    /// Asks the write-back thread for a commit now.
    pub(super) fn request_commit(&self) {
        *self.commit_wanted.wanted.lock() = true;
        self.commit_wanted.wake.notify_one();
    }

    /// Returns once the snapshot is durable (sealed, and its record and data committed),
    /// committing if need be.
    pub fn make_durable(&self, r: &str) -> Result<()> {
        let (s, v) = {
            let reg = self.registry.read();
            let s = reg.find_snapshot(r)?.clone();
            let v = reg.volume_of(&s, r)?;
            (s, v)
        };
        s.wait_sealed(&v)?;
        loop {
            match s.durable_ticket.load(Ordering::Acquire) {
                // Sealed: the next commit to start gives it a ticket.
                UNSEALED => self.commit_all()?,
                ticket => return self.commit_through(ticket),
            }
        }
    }
}
