//! The I/O gate of a slot file: lets data-path requests do their `pread`/`pwrite` without
//! holding their volume's lock, and tells when every request that started before some point
//! has ended.
//!
//! A request takes a [`Pass`] right after taking its volume's state lock (before it looks up
//! a map entry) and keeps it until its I/O is done. Passes are counted per *epoch*. Moving to
//! a new epoch ([`IoGate::advance`]) returns a number `E`; once [`IoGate::passed`]`(E)`, no
//! request that may have seen the maps as they were before the call is still running. Two
//! things wait for that:
//! - reuse of a freed slot: a request may still read or write a slot it looked up before the
//!   slot was dropped from every map (see `SlotFile::free_committed`);
//! - a new snapshot: a write to a cluster the head owned may still be landing in a slot the
//!   snapshot now shares. The snapshot is *sealed* — its readers, clones, rollbacks and
//!   uploads may use it — once those writes have ended (see `Snapshot::seal`).
//!
//! Passes are two atomic operations on a counter; nothing on the data path waits here.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// Epochs that can have requests in flight at once. A request still running after this many
/// newer epochs began makes `advance` refuse (see there): a hung disk, not a busy one.
const EPOCHS: u64 = 1024;

pub struct IoGate {
    /// The epoch new passes join.
    epoch: AtomicU64,
    /// Passes in flight per epoch, indexed by `epoch % EPOCHS`.
    inflight: Box<[AtomicU64]>,
    /// Every epoch below this has no pass in flight (and can get no new one).
    passed: AtomicU64,
    /// Serializes updates of `passed` and `epoch`; waiters sleep on `moved`.
    lock: Mutex<()>,
    moved: Condvar,
    moved_async: tokio::sync::Notify,
}

/// A request in flight; ends on drop.
pub struct Pass<'a> {
    gate: &'a IoGate,
    epoch: u64,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.gate.leave(self.epoch);
    }
}

impl Default for IoGate {
    fn default() -> IoGate {
        IoGate {
            epoch: AtomicU64::new(1),
            inflight: (0..EPOCHS).map(|_| AtomicU64::new(0)).collect(),
            passed: AtomicU64::new(1),
            lock: Mutex::new(()),
            moved: Condvar::new(),
            moved_async: tokio::sync::Notify::new(),
        }
    }
}

impl IoGate {
    /// Joins the current epoch. Call before looking up the slots the request will use.
    pub fn enter(&self) -> Pass<'_> {
        loop {
            let epoch = self.epoch.load(SeqCst);
            self.inflight[(epoch % EPOCHS) as usize].fetch_add(1, SeqCst);
            // Re-read: if `advance` moved on between the two steps, it may already have found
            // this epoch empty; join the new one instead. (All SeqCst: either `advance` sees
            // the count above, or this load sees its new epoch.)
            if self.epoch.load(SeqCst) == epoch {
                return Pass { gate: self, epoch };
            }
            self.leave(epoch);
        }
    }

    fn leave(&self, epoch: u64) {
        let last = self.inflight[(epoch % EPOCHS) as usize].fetch_sub(1, SeqCst) == 1;
        // The current epoch is looked at by `advance` when it ends; only older ones need this.
        if last && epoch < self.epoch.load(SeqCst) {
            self.catch_up();
        }
    }

    /// Moves `passed` over every ended epoch.
    fn catch_up(&self) {
        let _g = self.lock.lock();
        let current = self.epoch.load(SeqCst);
        let mut passed = self.passed.load(SeqCst);
        let before = passed;
        while passed < current && self.inflight[(passed % EPOCHS) as usize].load(SeqCst) == 0 {
            passed += 1;
        }
        if passed != before {
            self.passed.store(passed, SeqCst);
            self.moved.notify_all();
            self.moved_async.notify_waiters();
        }
    }

    /// Starts a new epoch and returns the number that `passed` must reach for every pass
    /// taken before this call to have ended. `None` when `EPOCHS` older epochs still have
    /// requests in flight (a request stuck in the kernel for that long); never blocks.
    pub fn advance(&self) -> Option<u64> {
        let next = {
            let _g = self.lock.lock();
            let current = self.epoch.load(SeqCst);
            // The new epoch's counter was last used by epoch `current + 1 - EPOCHS`.
            if current + 1 - self.passed.load(SeqCst) >= EPOCHS {
                return None;
            }
            self.epoch.store(current + 1, SeqCst);
            current + 1
        };
        self.catch_up();
        Some(next)
    }

    /// Whether every pass taken before the `advance` that returned `epoch` has ended.
    pub fn passed(&self, epoch: u64) -> bool {
        self.passed.load(SeqCst) >= epoch
    }

    /// Blocks until `passed(epoch)`, or `timeout`; returns whether it did.
    pub fn wait(&self, epoch: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.lock.lock();
        while !self.passed(epoch) {
            if self.moved.wait_until(&mut g, deadline).timed_out() {
                return self.passed(epoch);
            }
        }
        true
    }

    /// Resolves once `passed(epoch)`.
    pub async fn wait_async(&self, epoch: u64) {
        loop {
            // Registered before the check, so a `notify_waiters` in between is not lost.
            let moved = self.moved_async.notified();
            if self.passed(epoch) {
                return;
            }
            moved.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_has_passed_once_every_earlier_pass_has_ended() {
        let gate = IoGate::default();
        let idle = gate.advance().unwrap();
        assert!(gate.passed(idle), "no request in flight: passed at once");

        let a = gate.enter();
        let after_a = gate.advance().unwrap();
        let b = gate.enter();
        let after_b = gate.advance().unwrap();
        assert!(!gate.passed(after_a) && !gate.passed(after_b));
        drop(b);
        assert!(!gate.passed(after_a), "a is older than b and still running");
        assert!(!gate.passed(after_b));
        drop(a);
        assert!(gate.passed(after_a) && gate.passed(after_b));
        let c = gate.enter();
        assert!(gate.passed(after_b), "a pass taken later does not hold back an earlier epoch");
        drop(c);
    }

    #[test]
    fn advance_refuses_rather_than_reusing_a_busy_epoch() {
        let gate = IoGate::default();
        let stuck = gate.enter();
        let mut last = 0;
        while let Some(e) = gate.advance() {
            last = e;
        }
        assert_eq!(last, EPOCHS, "refuses once the ring is full");
        assert!(!gate.passed(last));
        drop(stuck);
        assert!(gate.passed(last));
        assert!(gate.advance().is_some());
    }

    #[test]
    fn waiters_wake_when_the_last_older_pass_ends() {
        let gate = std::sync::Arc::new(IoGate::default());
        let pass_epoch = {
            let p = gate.enter();
            let e = gate.advance().unwrap();
            let g2 = gate.clone();
            let waiter = std::thread::spawn(move || g2.wait(e, Duration::from_secs(10)));
            std::thread::sleep(Duration::from_millis(20));
            drop(p);
            assert!(waiter.join().unwrap());
            e
        };
        assert!(gate.wait(pass_epoch, Duration::ZERO));
        let p = gate.enter();
        let e = gate.advance().unwrap();
        assert!(!gate.wait(e, Duration::from_millis(10)), "times out while the pass is held");
        drop(p);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(gate.wait_async(e));
    }

    #[test]
    fn concurrent_passes_never_let_an_epoch_pass_early() {
        use std::sync::atomic::AtomicBool;
        let gate = std::sync::Arc::new(IoGate::default());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        // Each worker marks itself busy between enter and leave; whenever an epoch has passed,
        // no worker that entered before its advance may still be busy.
        let busy: std::sync::Arc<Vec<AtomicU64>> = std::sync::Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
        let workers: Vec<_> = (0..4)
            .map(|i| {
                let (gate, stop, busy) = (gate.clone(), stop.clone(), busy.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(SeqCst) {
                        n += 1;
                        let p = gate.enter();
                        busy[i].store(n, SeqCst);
                        std::hint::spin_loop();
                        busy[i].store(0, SeqCst);
                        drop(p);
                    }
                })
            })
            .collect();
        for _ in 0..20_000 {
            let seen: Vec<u64> = busy.iter().map(|b| b.load(SeqCst)).collect();
            let Some(e) = gate.advance() else { continue };
            while !gate.passed(e) {
                std::hint::spin_loop();
            }
            for (i, &s) in seen.iter().enumerate() {
                if s != 0 {
                    assert_ne!(busy[i].load(SeqCst), s, "worker {i} still in the request it was in before advance");
                }
            }
        }
        stop.store(true, SeqCst);
        for w in workers {
            w.join().unwrap();
        }
    }
}
