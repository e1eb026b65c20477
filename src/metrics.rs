//! Prometheus metrics: `GET /metrics` on `--metrics-listen` (loopback only), in the Prometheus
//! text format (0.0.4). docs/METRICS.md lists every metric.
//!
//! Nothing is kept here between scrapes. The per-volume I/O counters are atomics in each
//! volume, bumped by the front ends on the data path (`engine::IoStats`); everything else
//! (volumes, snapshots, uploads, hydration, store requests, policies) is asked of the
//! operations layer at scrape time, as `Caller::Daemon("metrics")`, on a blocking thread.
//! [`gather`] takes those views into a [`Scrape`]; [`render`] writes it out with
//! `prometheus-client`'s encoder (a [`Collector`] over the scrape).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text::{self, CONTENT_TYPE};
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::clock::{Clock, SystemClock};
use crate::engine::{IoView, OpView, LATENCY_BOUNDS_NS};
use crate::policy::Policy;
use crate::service::{Caller, Service};
use crate::store::objects::MetricsView;
use crate::store::UploadState;

/// What one scrape shows: plain values taken from the operations layer.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Seconds since the epoch, when it was taken (for the ages of policy successes).
    pub now: u64,
    pub volumes: Vec<VolumeSample>,
    /// Snapshots being uploaded now.
    pub uploads: Vec<UploadSample>,
    /// Object-store counters per region.
    pub regions: Vec<(String, MetricsView)>,
    pub policies: Vec<PolicySample>,
    /// Snapshots in the recycle bin, and its retention in seconds (0: off).
    pub bin_snapshots: u64,
    pub bin_retention: u64,
}

#[derive(Debug, Default)]
pub struct VolumeSample {
    /// `v-…`: what snapshots and I/O counters are matched by.
    pub id: String,
    pub name: String,
    pub size: u64,
    pub allocated_bytes: u64,
    pub dirty_clusters: u64,
    /// Snapshots taken by hand, and by policies (those a policy's retention keeps).
    pub manual_snapshots: u64,
    pub auto_snapshots: u64,
    /// Snapshots per upload state, in [`UPLOAD_STATES`] order.
    pub uploads: [u64; 3],
    pub io: IoView,
    /// `max_snapshots_manual`, `max_snapshots_auto`; snapshot creates and uploads in flight and
    /// `max_concurrent_tasks`.
    pub manual_limit: u64,
    pub auto_limit: u64,
    pub tasks: u64,
    pub tasks_limit: u64,
    /// Set while the volume is loading from the object store.
    pub hydration: Option<HydrationSample>,
}

#[derive(Debug, Default)]
pub struct HydrationSample {
    pub loaded_bytes: u64,
    pub size_bytes: u64,
    /// The store is failing and the load is being retried.
    pub retrying: bool,
}

#[derive(Debug, Default)]
pub struct UploadSample {
    pub volume: String,
    pub snapshot: String,
    pub region: String,
    pub scanned_bytes: u64,
    pub size_bytes: u64,
    pub sent_bytes: u64,
}

#[derive(Debug, Default)]
pub struct PolicySample {
    pub name: String,
    /// See [`policy_interval`].
    pub interval: Option<u64>,
    pub next_due: Option<u64>,
    pub volumes: Vec<PolicyVolumeSample>,
}

#[derive(Debug, Default)]
pub struct PolicyVolumeSample {
    pub volume: String,
    pub last_success: Option<u64>,
    pub last_attempt: Option<u64>,
}

const UPLOAD_STATES: [(UploadState, &str); 3] =
    [(UploadState::Uploading, "uploading"), (UploadState::Available, "available"), (UploadState::Failed, "failed")];

/// Takes a scrape from the operations layer. A part that fails is logged and left out; the
/// rest is still shown.
pub fn gather(service: &Service, now: u64) -> Scrape {
    let caller = Caller::Daemon("metrics");
    fn part<T>(what: &str, r: crate::service::Result<Vec<T>>) -> Vec<T> {
        r.unwrap_or_else(|e| {
            tracing::warn!(part = what, error = %e, "metrics: cannot collect a part of the scrape");
            Vec::new()
        })
    }
    let mut io: HashMap<String, IoView> = part("volume I/O", service.volume_io(&caller)).into_iter().collect();
    let mut volumes: Vec<VolumeSample> = part("volumes", service.list_volumes(&caller))
        .into_iter()
        .map(|v| VolumeSample {
            io: io.remove(&v.info.id).unwrap_or_default(),
            hydration: v.hydration.map(|h| HydrationSample {
                loaded_bytes: h.bytes_loaded,
                size_bytes: h.bytes_total,
                retrying: h.state == "retrying",
            }),
            id: v.info.id,
            name: v.info.name,
            size: v.info.size,
            allocated_bytes: v.info.allocated_bytes,
            dirty_clusters: v.info.dirty_clusters,
            ..VolumeSample::default()
        })
        .collect();
    // By id: a deleted volume's snapshots may stay, and its name go to a new volume.
    let index: HashMap<String, usize> = volumes.iter().enumerate().map(|(i, v)| (v.id.clone(), i)).collect();
    for v in &mut volumes {
        match service.volume_quota(&caller, &v.id) {
            Ok(q) => {
                v.manual_limit = q.quotas.max_snapshots_manual.into();
                v.auto_limit = q.quotas.max_snapshots_auto.into();
                v.tasks = q.tasks.into();
                v.tasks_limit = q.quotas.max_concurrent_tasks.into();
            }
            Err(e) => tracing::warn!(volume = %v.name, error = %e, "metrics: cannot collect a volume's quotas"),
        }
    }
    let mut uploads = Vec::new();
    for s in part("snapshots", service.list_snapshots(&caller, None)) {
        // An upload in flight counts even when its volume is gone (deleted, its snapshots kept).
        if let Some(u) = s.upload.as_ref().filter(|u| u.state == UploadState::Uploading) {
            uploads.push(UploadSample {
                volume: s.info.volume.clone(),
                snapshot: s.info.name.clone(),
                region: u.region.clone(),
                scanned_bytes: u.bytes_done,
                size_bytes: u.bytes_total,
                sent_bytes: u.bytes_sent,
            });
        }
        let Some(v) = index.get(&s.info.volume_id).map(|&i| &mut volumes[i]) else { continue };
        if s.policies.is_empty() {
            v.manual_snapshots += 1;
        } else {
            v.auto_snapshots += 1;
        }
        if let Some(i) = s.upload.and_then(|u| UPLOAD_STATES.iter().position(|(st, _)| *st == u.state)) {
            v.uploads[i] += 1;
        }
    }
    let policies = part("policies", service.list_policies(&caller))
        .into_iter()
        .map(|p| PolicySample {
            interval: policy_interval(&p.policy, now),
            next_due: p.next_due,
            volumes: p
                .on
                .into_iter()
                .map(|o| PolicyVolumeSample {
                    volume: o.volume,
                    last_success: o.last_success,
                    last_attempt: o.last_attempt,
                })
                .collect(),
            name: p.policy.spec.name,
        })
        .collect();
    let (bin_snapshots, bin_retention) = match service.recycle_bin(&caller) {
        Ok(b) => (b.snapshots.len() as u64, b.retention),
        Err(_) => (0, 0),
    };
    Scrape {
        now,
        volumes,
        uploads,
        regions: part("store", service.store_metrics(&caller)),
        policies,
        bin_snapshots,
        bin_retention,
    }
}

/// How many coming firings [`policy_interval`] looks at.
const INTERVAL_FIRINGS: usize = 16;

/// A policy's interval in seconds, for alerts such as "no success for two intervals": the
/// longest gap between consecutive firings among the next [`INTERVAL_FIRINGS`] — the period
/// of `--every`, a day for a daily time, three days for a weekday time (over the weekend).
pub fn policy_interval(p: &Policy, now: u64) -> Option<u64> {
    let schedule = p.compile().ok()?;
    let mut t = schedule.next_after(i64::try_from(now).ok()?)?;
    let mut longest = 0;
    for _ in 0..INTERVAL_FIRINGS {
        let next = schedule.next_after(t)?;
        longest = longest.max(next - t);
        t = next;
    }
    u64::try_from(longest).ok()
}

/// The scrape in the Prometheus text format.
pub fn render(scrape: Scrape) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// One gauge family: a descriptor, then a sample per label set.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// One counter family (`name` gets its `_total`).
fn counters<L: EncodeLabelSet, V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?.encode_counter::<NoLabelSet, V, u64>(&v, None)?;
    }
    Ok(())
}

impl Scrape {
    /// `(volume, op, its counters)` for every volume and kind of request.
    fn ops(&self) -> impl Iterator<Item = ([(&str, &str); 2], &OpView)> {
        self.volumes
            .iter()
            .flat_map(|v| v.io.ops.iter().map(move |o| ([("volume", v.name.as_str()), ("op", o.op.name())], o)))
    }

    fn volume_gauge(&self, f: impl Fn(&VolumeSample) -> u64) -> impl Iterator<Item = ([(&str, &str); 1], u64)> {
        self.volumes.iter().map(move |v| ([("volume", v.name.as_str())], f(v)))
    }

    fn hydrating(&self) -> impl Iterator<Item = (&str, &HydrationSample)> {
        self.volumes.iter().filter_map(|v| v.hydration.as_ref().map(|h| (v.name.as_str(), h)))
    }

    fn upload_gauge(&self, f: impl Fn(&UploadSample) -> u64) -> impl Iterator<Item = ([(&str, &str); 3], u64)> {
        self.uploads.iter().map(move |u| {
            ([("volume", u.volume.as_str()), ("snapshot", u.snapshot.as_str()), ("region", u.region.as_str())], f(u))
        })
    }

    fn region_counter(&self, f: impl Fn(&MetricsView) -> u64) -> impl Iterator<Item = ([(&str, &str); 1], u64)> {
        self.regions.iter().map(move |(r, m)| ([("region", r.as_str())], f(m)))
    }

    /// `(policy, volume, value)` for each volume of each policy where `f` has a value.
    fn policy_volume_gauge(&self, f: impl Fn(&PolicyVolumeSample) -> Option<u64>) -> Vec<([(&str, &str); 2], u64)> {
        let mut rows = Vec::new();
        for p in &self.policies {
            for o in &p.volumes {
                if let Some(v) = f(o) {
                    rows.push(([("policy", p.name.as_str()), ("volume", o.volume.as_str())], v));
                }
            }
        }
        rows
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let e = &mut enc;
        // Data path (per volume and kind of request).
        counters(
            e,
            "snapblk_volume_requests",
            "Requests served on the volume's exports (NBD, kernel NBD, ublk), by kind: read, write, trim (TRIM and \
             WRITE_ZEROES), flush, snapshot_read (reads of its snapshots' exports).",
            self.ops().map(|(l, o)| (l, o.requests())),
        )?;
        counters(
            e,
            "snapblk_volume_request_bytes",
            "Bytes of the requests that succeeded (for trim: the length of the range).",
            self.ops().map(|(l, o)| (l, o.bytes)),
        )?;
        counters(e, "snapblk_volume_request_errors", "Requests that failed.", self.ops().map(|(l, o)| (l, o.errors)))?;
        {
            let mut m = e.encode_descriptor(
                "snapblk_volume_request_duration_seconds",
                "Time from handing a request to the engine to its result: a FLUSH or FUA includes the disk sync, a \
                 read of data still in the object store its fetch; the time on the socket or in the queue does not.",
                None,
                MetricType::Histogram,
            )?;
            for (labels, o) in self.ops() {
                let buckets: Vec<(f64, u64)> =
                    LATENCY_BOUNDS_NS.iter().zip(&o.buckets).map(|(&b, &n)| (b as f64 / 1e9, n)).collect();
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    o.sum_ns as f64 / 1e9,
                    o.requests(),
                    &buckets,
                    None,
                )?;
            }
        }
        // Volumes and snapshots.
        gauges(e, "snapblk_volume_size_bytes", "Size of the volume.", self.volume_gauge(|v| v.size))?;
        gauges(
            e,
            "snapblk_volume_allocated_bytes",
            "Bytes of clusters the volume maps to stored data (not zeros).",
            self.volume_gauge(|v| v.allocated_bytes),
        )?;
        gauges(
            e,
            "snapblk_volume_dirty_clusters",
            "Clusters written, trimmed or zeroed since the volume's last snapshot.",
            self.volume_gauge(|v| v.dirty_clusters),
        )?;
        gauges(
            e,
            "snapblk_volume_snapshots",
            "Snapshots of the volume: kind=auto those a policy took (and its retention keeps), kind=manual the rest.",
            self.volumes.iter().flat_map(|v| {
                [("manual", v.manual_snapshots), ("auto", v.auto_snapshots)]
                    .map(|(kind, n)| ([("volume", v.name.as_str()), ("kind", kind)], n))
            }),
        )?;
        gauges(
            e,
            "snapblk_volume_snapshot_uploads",
            "Snapshots of the volume by upload state (uploading, available in the store, failed); snapshots never \
             uploaded are not counted.",
            self.volumes.iter().flat_map(|v| {
                let name = v.name.as_str();
                UPLOAD_STATES
                    .iter()
                    .zip(v.uploads)
                    .map(move |((_, state), n)| ([("volume", name), ("state", *state)], n))
            }),
        )?;
        gauges(
            e,
            "snapblk_volume_snapshot_limit",
            "The volume's quota of snapshots by kind (max_snapshots_manual, max_snapshots_auto).",
            self.volumes.iter().flat_map(|v| {
                [("manual", v.manual_limit), ("auto", v.auto_limit)]
                    .map(|(kind, n)| ([("volume", v.name.as_str()), ("kind", kind)], n))
            }),
        )?;
        gauges(
            e,
            "snapblk_volume_tasks",
            "Snapshot creates and uploads of the volume in flight.",
            self.volume_gauge(|v| v.tasks),
        )?;
        gauges(
            e,
            "snapblk_volume_tasks_limit",
            "The volume's max_concurrent_tasks.",
            self.volume_gauge(|v| v.tasks_limit),
        )?;
        e.encode_descriptor(
            "snapblk_recycle_bin_snapshots",
            "Deleted snapshots waiting in the recycle bin.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&self.bin_snapshots)?;
        e.encode_descriptor(
            "snapblk_recycle_bin_retention_seconds",
            "How long the recycle bin keeps a deleted snapshot (0: the bin is off).",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&self.bin_retention)?;
        // Uploads and hydration.
        e.encode_descriptor(
            "snapblk_uploads_in_flight",
            "Snapshot uploads running or queued.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&(self.uploads.len() as u64))?;
        gauges(
            e,
            "snapblk_upload_scanned_bytes",
            "Bytes of the snapshot scanned so far by its upload.",
            self.upload_gauge(|u| u.scanned_bytes),
        )?;
        gauges(
            e,
            "snapblk_upload_size_bytes",
            "Bytes of the snapshot its upload scans.",
            self.upload_gauge(|u| u.size_bytes),
        )?;
        gauges(
            e,
            "snapblk_upload_sent_bytes",
            "Bytes (compressed and sealed) its upload has stored so far.",
            self.upload_gauge(|u| u.sent_bytes),
        )?;
        gauges(
            e,
            "snapblk_hydration_loaded_bytes",
            "Bytes of a volume loading from the object store that are local now.",
            self.hydrating().map(|(v, h)| ([("volume", v)], h.loaded_bytes)),
        )?;
        gauges(
            e,
            "snapblk_hydration_size_bytes",
            "Bytes of a volume loading from the object store, in all.",
            self.hydrating().map(|(v, h)| ([("volume", v)], h.size_bytes)),
        )?;
        gauges(
            e,
            "snapblk_hydration_retrying",
            "1 while the load of the volume is retrying after store errors, else 0.",
            self.hydrating().map(|(v, h)| ([("volume", v)], u64::from(h.retrying))),
        )?;
        // The object store, per region.
        counters(
            e,
            "snapblk_store_requests",
            "Object-store operations done, by kind (put, get, delete, list; head and restore: thaw states \
             read and restores requested from archive classes); one counts once however many attempts it \
             took (see snapblk_store_retries_total).",
            self.regions.iter().flat_map(|(r, m)| {
                [
                    ("put", m.put_ops),
                    ("get", m.get_ops),
                    ("delete", m.delete_ops),
                    ("list", m.list_ops),
                    ("head", m.head_ops),
                    ("restore", m.restore_ops),
                ]
                .map(|(op, n)| ([("region", r.as_str()), ("op", op)], n))
            }),
        )?;
        counters(
            e,
            "snapblk_store_bytes",
            "Bytes sent to (op=put) and received from (op=get) the object store.",
            self.regions.iter().flat_map(|(r, m)| {
                [("put", m.put_bytes), ("get", m.get_bytes)].map(|(op, n)| ([("region", r.as_str()), ("op", op)], n))
            }),
        )?;
        counters(
            e,
            "snapblk_store_retries",
            "Object-store request attempts that failed and were retried.",
            self.region_counter(|m| m.retries),
        )?;
        counters(
            e,
            "snapblk_store_failures",
            "Object-store requests that failed after all retries.",
            self.region_counter(|m| m.failures),
        )?;
        // Policies.
        gauges(
            e,
            "snapblk_policy_interval_seconds",
            "The policy's interval: the longest gap between its next firings (for alerts on missed successes).",
            self.policies.iter().filter_map(|p| p.interval.map(|i| ([("policy", p.name.as_str())], i))),
        )?;
        gauges(
            e,
            "snapblk_policy_next_due_timestamp_seconds",
            "When the policy fires next (seconds since the epoch).",
            self.policies.iter().filter_map(|p| p.next_due.map(|t| ([("policy", p.name.as_str())], t))),
        )?;
        gauges(
            e,
            "snapblk_policy_last_success_timestamp_seconds",
            "When the policy's last tick on the volume that did not fail ran (skipped ticks count; absent if none).",
            self.policy_volume_gauge(|o| o.last_success),
        )?;
        gauges(
            e,
            "snapblk_policy_last_success_age_seconds",
            "Seconds since the policy's last tick on the volume that did not fail (absent if none).",
            self.policy_volume_gauge(|o| o.last_success.map(|t| self.now.saturating_sub(t))),
        )?;
        gauges(
            e,
            "snapblk_policy_last_attempt_timestamp_seconds",
            "When the policy's last tick on the volume ran, whatever its outcome.",
            self.policy_volume_gauge(|o| o.last_attempt),
        )?;
        Ok(())
    }
}

/// Serves `GET /metrics` (any other path: 404) until the task is dropped.
pub async fn serve(listener: TcpListener, service: Arc<Service>) {
    let app = Router::new().route("/metrics", get(scrape)).with_state(service);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics endpoint stopped");
    }
}

async fn scrape(State(service): State<Arc<Service>>) -> Response {
    let now = SystemClock.now();
    // The operations take locks the data path and the scheduler take too: off the async workers.
    match tokio::task::spawn_blocking(move || render(gather(&service, now))).await {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Ok(Err(fmt::Error)) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot collect the metrics: {e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{IoOp, IoStats, BUCKETS};
    use crate::policy::{Missed, OnVolumeDelete, Overlap, PolicySpec, Retention, Schedule};

    fn policy(schedule: Schedule) -> Policy {
        let spec = PolicySpec {
            copy_to: None,
            archive_after: None,
            archive_to: None,
            name: "p".into(),
            schedule,
            tz: "UTC".into(),
            retention: Retention::default(),
            overlap: Overlap::Skip,
            missed: Missed::Skip,
            skip_if_unchanged: false,
            after_upload: false,
            on_volume_delete: OnVolumeDelete::Keep,
        };
        // Created 2026-01-01T00:00:00Z, a Thursday.
        Policy {
            id: "p-0000000000000001".into(),
            spec,
            volumes: Vec::new(),
            groups: Vec::new(),
            created: 1_767_225_600,
        }
    }

    #[test]
    fn a_policy_interval_is_the_longest_gap_between_its_next_firings() {
        let now = 1_767_225_600 + 3600;
        let every = Schedule::Every { every: 4 * 3600, start: "00:30".into() };
        assert_eq!(policy_interval(&policy(every), now), Some(4 * 3600));
        let daily = Schedule::At { times: vec!["02:00".into()], weekdays: vec![] };
        assert_eq!(policy_interval(&policy(daily), now), Some(86_400));
        let weekdays = Schedule::At { times: vec!["02:00".into(), "14:00".into()], weekdays: vec!["mon-fri".into()] };
        assert_eq!(
            policy_interval(&policy(weekdays), now),
            Some(86_400 * 2 + 12 * 3600),
            "Friday 14:00 to Monday 02:00"
        );
        let cron = Schedule::Cron { expr: "*/15 * * * *".into() };
        assert_eq!(policy_interval(&policy(cron), now), Some(900));
    }

    /// A scrape with one of everything.
    fn scrape() -> Scrape {
        let io = IoStats::default();
        let started = std::time::Instant::now();
        io.record(IoOp::Write, 65536, started, true);
        io.record(IoOp::Write, 4096, started, false);
        io.record(IoOp::Read, 4096, started, true);
        Scrape {
            now: 10_000,
            volumes: vec![VolumeSample {
                id: "v-0000000000000001".into(),
                name: "db".into(),
                size: 1 << 30,
                allocated_bytes: 65536,
                dirty_clusters: 1,
                manual_snapshots: 2,
                auto_snapshots: 3,
                uploads: [1, 4, 0],
                io: io.view(),
                manual_limit: 256,
                auto_limit: 1000,
                tasks: 1,
                tasks_limit: 10,
                hydration: Some(HydrationSample { loaded_bytes: 100, size_bytes: 1 << 30, retrying: true }),
            }],
            uploads: vec![UploadSample {
                volume: "db".into(),
                snapshot: "s1".into(),
                region: "local".into(),
                scanned_bytes: 50,
                size_bytes: 200,
                sent_bytes: 20,
            }],
            regions: vec![(
                "local".into(),
                MetricsView { put_ops: 7, put_bytes: 7000, get_ops: 1, retries: 2, failures: 1, ..Default::default() },
            )],
            policies: vec![PolicySample {
                name: "hourly".into(),
                interval: Some(3600),
                next_due: Some(12_000),
                volumes: vec![
                    PolicyVolumeSample { volume: "db".into(), last_success: Some(9_000), last_attempt: Some(9_500) },
                    PolicyVolumeSample { volume: "new".into(), last_success: None, last_attempt: None },
                ],
            }],
            bin_snapshots: 2,
            bin_retention: 604_800,
        }
    }

    #[test]
    fn the_text_format_has_every_family_typed_and_the_values_of_the_scrape() {
        let text = render(scrape()).unwrap();
        for line in [
            "# TYPE snapblk_volume_requests_total counter",
            "snapblk_volume_requests_total{volume=\"db\",op=\"write\"} 2",
            "snapblk_volume_requests_total{volume=\"db\",op=\"snapshot_read\"} 0",
            "snapblk_volume_request_bytes_total{volume=\"db\",op=\"write\"} 65536",
            "snapblk_volume_request_errors_total{volume=\"db\",op=\"write\"} 1",
            "# TYPE snapblk_volume_request_duration_seconds histogram",
            "snapblk_volume_request_duration_seconds_bucket{volume=\"db\",op=\"write\",le=\"+Inf\"} 2",
            "snapblk_volume_request_duration_seconds_count{volume=\"db\",op=\"read\"} 1",
            "snapblk_volume_dirty_clusters{volume=\"db\"} 1",
            "snapblk_volume_snapshots{volume=\"db\",kind=\"manual\"} 2",
            "snapblk_volume_snapshots{volume=\"db\",kind=\"auto\"} 3",
            "snapblk_volume_snapshot_uploads{volume=\"db\",state=\"available\"} 4",
            "snapblk_volume_snapshot_limit{volume=\"db\",kind=\"auto\"} 1000",
            "snapblk_volume_tasks{volume=\"db\"} 1",
            "snapblk_volume_tasks_limit{volume=\"db\"} 10",
            "snapblk_recycle_bin_snapshots 2",
            "snapblk_recycle_bin_retention_seconds 604800",
            "snapblk_uploads_in_flight 1",
            "snapblk_upload_scanned_bytes{volume=\"db\",snapshot=\"s1\",region=\"local\"} 50",
            "snapblk_upload_size_bytes{volume=\"db\",snapshot=\"s1\",region=\"local\"} 200",
            "snapblk_hydration_loaded_bytes{volume=\"db\"} 100",
            "snapblk_hydration_retrying{volume=\"db\"} 1",
            "snapblk_store_requests_total{region=\"local\",op=\"put\"} 7",
            "snapblk_store_bytes_total{region=\"local\",op=\"put\"} 7000",
            "snapblk_store_retries_total{region=\"local\"} 2",
            "snapblk_store_failures_total{region=\"local\"} 1",
            "snapblk_policy_interval_seconds{policy=\"hourly\"} 3600",
            "snapblk_policy_next_due_timestamp_seconds{policy=\"hourly\"} 12000",
            "snapblk_policy_last_success_timestamp_seconds{policy=\"hourly\",volume=\"db\"} 9000",
            "snapblk_policy_last_success_age_seconds{policy=\"hourly\",volume=\"db\"} 1000",
            "snapblk_policy_last_attempt_timestamp_seconds{policy=\"hourly\",volume=\"db\"} 9500",
        ] {
            assert!(text.lines().any(|l| l == line), "missing line: {line}\n{text}");
        }
        // A volume a policy never succeeded on has no age (rather than a made-up one).
        assert!(!text.contains("volume=\"new\"} "), "{text}");
        // Buckets are cumulative and end at the count.
        let buckets: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with("snapblk_volume_request_duration_seconds_bucket{volume=\"db\",op=\"write\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), BUCKETS);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]) && buckets[BUCKETS - 1] == 2, "{buckets:?}");
        // Every sample belongs to a family announced with HELP and TYPE, and is `name{labels} value`.
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with("# HELP snapblk_") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "{line}: no TYPE line before it");
        }
    }

    #[test]
    fn an_empty_daemon_renders_every_family_with_no_samples() {
        let text = render(Scrape::default()).unwrap();
        assert!(text.contains("# TYPE snapblk_volume_requests_total counter"));
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "snapblk_recycle_bin_snapshots 0",
                "snapblk_recycle_bin_retention_seconds 0",
                "snapblk_uploads_in_flight 0"
            ],
            "only the daemon-wide gauges have a sample"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrape_of_a_real_service_has_its_io_snapshots_by_kind_and_policy_successes() {
        use crate::clock::ManualClock;
        use crate::service::{CreatePolicy, CreateSnapshot, CreateVolume, ExportHandle, PolicyVolumes, Status};
        use snapblk_ublk::BlockTarget;

        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        std::fs::write(dir.join("snapblk.toml"), "[upload]\nenabled = false\n").unwrap();
        let clock = ManualClock::new(1_767_225_600);
        let engine = crate::engine::Engine::open_with_clock(dir, clock.clone()).unwrap();
        let store = crate::store::StoreService::open(dir, engine.clone()).unwrap();
        let config = Arc::new(snapblk_nbd::ServerConfig::default());
        let attachments =
            Arc::new(crate::attach::Attachments::new(engine.clone(), tokio::runtime::Handle::current(), config));
        let status = Status {
            version: String::new(),
            dir: dir.into(),
            pid: 0,
            nbd_socket: dir.join("nbd.sock"),
            nbd_tcp: None,
            api: None,
        };
        let svc = Service::new(engine, store, attachments, status).unwrap();
        let me = Caller::Local;
        let volume = CreateVolume {
            name: "v".into(),
            size: Some(1 << 20),
            cluster_size: None,
            region: None,
            from_snapshot: None,
        };
        svc.create_volume(&me, volume).await.unwrap();
        // I/O through a front end (the ublk target; NBD's is the same call).
        let ExportHandle::Volume(h) = svc.open_export(&me, "v").unwrap() else { panic!("not a volume export") };
        let target = crate::frontend::UblkTarget::new(h);
        target.write(0, &[7u8; 8192], false).unwrap();
        target.flush().unwrap();
        let manual = CreateSnapshot { name: "manual".into(), description: String::new(), durable: false };
        svc.create_snapshot(&me, "v", manual).await.unwrap();
        let hourly = CreatePolicy {
            copy_to: None,
            archive_after: None,
            archive_to: None,
            name: "hourly".into(),
            schedule: Schedule::Every { every: 3600, start: "00:00".into() },
            tz: "UTC".into(),
            retention: Retention { keep_last: Some(5), ..Default::default() },
            overlap: Overlap::Skip,
            missed: Missed::Skip,
            skip_if_unchanged: false,
            after_upload: false,
            on_volume_delete: OnVolumeDelete::Keep,
        };
        svc.create_policy(&me, hourly).unwrap();
        svc.apply_policy(&me, "hourly", PolicyVolumes { volumes: vec!["v".into()], groups: vec![] }).unwrap();
        clock.advance(3600);
        svc.run_due_policies().await;

        let s = gather(&svc, clock.now() + 60);
        let v = &s.volumes[0];
        assert_eq!((v.name.as_str(), v.manual_snapshots, v.auto_snapshots), ("v", 1, 1));
        let write = &v.io.ops[IoOp::Write as usize];
        assert_eq!((write.requests(), write.bytes), (1, 8192));
        assert_eq!(v.io.ops[IoOp::Flush as usize].requests(), 1);
        assert!(s.uploads.is_empty());
        assert!(s.regions.iter().any(|(r, m)| r == "local" && m.put_ops == 0), "{:?}", s.regions);
        let p = &s.policies[0];
        assert_eq!((p.name.as_str(), p.interval), ("hourly", Some(3600)));
        assert_eq!(p.volumes[0].last_success, Some(clock.now()));
        let text = render(s).unwrap();
        assert!(text.contains("snapblk_policy_last_success_age_seconds{policy=\"hourly\",volume=\"v\"} 60"), "{text}");
    }
}
