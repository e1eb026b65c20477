//! Per-volume I/O counters: requests, bytes, errors and a latency histogram per kind of
//! request. The front ends (NBD, kernel NBD, ublk) bump them around each engine call; the
//! metrics endpoint reads them at scrape time ([`IoStats::view`]).
//!
//! What a request pays, since this is on the data path: the counters live in the volume
//! (`Arc<Volume>`), which every handle holds already, so there is no lookup, lock or
//! allocation — two clock reads (vDSO, tens of nanoseconds together) and three relaxed
//! `fetch_add`s (latency bucket, latency sum, bytes), against the microseconds a request takes
//! anyway. The number of requests is not a counter of its own: it is the sum of the buckets.
//! Each kind of request has its own cache lines, so reads and writes on different cores do
//! not bounce one line between them; requests of one kind to one volume from several cores
//! do share theirs, at most a cache-line transfer each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Upper bounds of the latency buckets, in nanoseconds (Prometheus `le`: a request lands in
/// the first bucket whose bound it does not exceed; slower than the last, in the overflow
/// bucket). From a page-cache read (microseconds) to a FLUSH on a slow disk (a second).
pub const LATENCY_BOUNDS_NS: [u64; 16] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// The buckets, the overflow one included.
pub const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// The kinds of request counted, as the metrics name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// A read of the volume.
    Read,
    Write,
    /// TRIM, and WRITE_ZEROES (both go to `VolumeHandle::zero`).
    Trim,
    Flush,
    /// A read of one of the volume's snapshots (a `VOLUME@SNAPSHOT` export).
    SnapshotRead,
}

impl IoOp {
    pub const ALL: [IoOp; 5] = [IoOp::Read, IoOp::Write, IoOp::Trim, IoOp::Flush, IoOp::SnapshotRead];

    pub fn name(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Trim => "trim",
            IoOp::Flush => "flush",
            IoOp::SnapshotRead => "snapshot_read",
        }
    }
}

/// One kind of request's counters, on cache lines of their own.
#[derive(Default)]
#[repr(align(64))]
struct OpStats {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// A volume's I/O counters since the daemon started (or the volume was created).
#[derive(Default)]
pub struct IoStats {
    ops: [OpStats; IoOp::ALL.len()],
}

impl IoStats {
    /// Counts one request of `bytes` that started at `started`. Bytes are counted only when it
    /// succeeded; its latency either way.
    #[inline]
    pub fn record(&self, op: IoOp, bytes: u64, started: Instant, ok: bool) {
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let s = &self.ops[op as usize];
        let bucket = LATENCY_BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(BUCKETS - 1);
        s.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        s.sum_ns.fetch_add(ns, Ordering::Relaxed);
        if ok {
            s.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters now. Each is read once, relaxed: a request that lands meanwhile may be
    /// in one counter and not yet in another; the next scrape sees it whole.
    pub fn view(&self) -> IoView {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoView {
            ops: IoOp::ALL.map(|op| {
                let s = &self.ops[op as usize];
                OpView {
                    op,
                    buckets: std::array::from_fn(|i| l(&s.buckets[i])),
                    sum_ns: l(&s.sum_ns),
                    bytes: l(&s.bytes),
                    errors: l(&s.errors),
                }
            }),
        }
    }
}

/// A copy of [`IoStats`], one entry per [`IoOp`] in [`IoOp::ALL`] order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoView {
    pub ops: [OpView; IoOp::ALL.len()],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpView {
    pub op: IoOp,
    /// Requests per latency bucket (not cumulative); the last is the overflow bucket.
    pub buckets: [u64; BUCKETS],
    pub sum_ns: u64,
    pub bytes: u64,
    pub errors: u64,
}

impl Default for OpView {
    fn default() -> OpView {
        OpView { op: IoOp::Read, buckets: [0; BUCKETS], sum_ns: 0, bytes: 0, errors: 0 }
    }
}

impl OpView {
    /// Requests counted (each is in exactly one bucket).
    pub fn requests(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn requests_land_in_their_bucket_and_failed_ones_count_no_bytes() {
        let io = IoStats::default();
        io.record(IoOp::Write, 4096, Instant::now(), true);
        io.record(IoOp::Write, 4096, Instant::now(), false);
        io.record(IoOp::Flush, 0, Instant::now() - Duration::from_secs(2), true);
        let v = io.view();
        let write = &v.ops[IoOp::Write as usize];
        assert_eq!((write.op, write.requests(), write.bytes, write.errors), (IoOp::Write, 2, 4096, 1));
        let flush = &v.ops[IoOp::Flush as usize];
        assert_eq!(flush.buckets[BUCKETS - 1], 1, "slower than the last bound: overflow");
        assert!(flush.sum_ns >= 2_000_000_000);
        assert_eq!(v.ops[IoOp::Read as usize].requests(), 0);
        for (i, op) in IoOp::ALL.iter().enumerate() {
            assert_eq!(v.ops[i].op, *op);
        }
    }
}
