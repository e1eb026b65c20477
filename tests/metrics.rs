//! The Prometheus endpoint on the real binary: `serve --metrics-listen` on loopback, scraped
//! with a plain HTTP/1.1 client after NBD I/O, snapshots by hand and by a policy, and uploads;
//! a non-loopback address is refused.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_one_sentence, qemu_io, require_tool, run, text, Daemon, BIN};

/// `GET path` on `addr`: (status code, Content-Type, body).
fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP response: {raw}"));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status: {head}"));
    let content_type = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

type Labels = BTreeMap<String, String>;

/// The samples of a text-format body: (name, labels, value). Label values here never hold
/// quotes or commas (volume, snapshot, policy and region names cannot).
fn parse(body: &str) -> Vec<(String, Labels, f64)> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value: {l}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("bad labels: {l}"));
                    let labels = inner
                        .split(',')
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("bad label: {l}"));
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, Labels::new()),
            };
            (name.to_string(), labels, value)
        })
        .collect()
}

struct Metrics(Vec<(String, Labels, f64)>);

impl Metrics {
    /// The value of the one sample of `name` with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: Labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.0.iter().find(|(n, l, _)| n == name && *l == want).map(|(_, _, v)| *v)
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _, _)| n == name)
    }
}

/// The metrics address from the daemon's ready line (`metrics: http://ADDR/metrics`).
fn metrics_addr(d: &Daemon) -> String {
    let log = d.log();
    let at = log.find("metrics: http://").unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"));
    let rest = &log[at + "metrics: http://".len()..];
    rest[..rest.find("/metrics").expect("/metrics")].to_string()
}

fn scrape(addr: &str) -> Metrics {
    let (status, content_type, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    Metrics(parse(&body))
}

/// Scrapes until `ok` holds (30 s at most).
fn scrape_until(addr: &str, what: &str, ok: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = scrape(addr);
        if ok(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "no scrape showed {what} in 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_endpoint_counts_nbd_io_snapshots_uploads_and_policies() {
    if !require_tool("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Port 0: the daemon picks a free port and names it in its ready line.
    let d = Daemon::start_with(&tmp.path().join("d"), &["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_addr(&d);
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{addr}");

    // Before any volume: the families are there, with no volume in them.
    let m = scrape(&addr);
    assert_eq!(m.get("snapblk_uploads_in_flight", &[]), Some(0.0));
    assert!(!m.has("snapblk_volume_requests_total"));

    d.cli_ok(&["volume", "create", "v", "--size", "16M"]);
    qemu_io(&d.nbd_uri("v"), &["write -P 0xab 0 1M", "read -P 0xab 0 1M", "discard 1M 64k", "flush"]);
    d.cli_ok(&["snapshot", "create", "v", "--name", "s1"]);
    d.cli_ok(&["snapshot", "create", "v", "--name", "s2"]);
    qemu_io(&d.nbd_uri("v@s1"), &["read -P 0xab 0 64k"]);

    let m = scrape(&addr);
    let v = |op: &'static str| [("volume", "v"), ("op", op)];
    let requests = |op| m.get("snapblk_volume_requests_total", &v(op)).unwrap_or_else(|| panic!("no {op} requests"));
    let bytes = |op| m.get("snapblk_volume_request_bytes_total", &v(op)).unwrap_or_else(|| panic!("no {op} bytes"));
    for op in ["write", "read", "trim", "flush", "snapshot_read"] {
        assert!(requests(op) >= 1.0, "{op}: {}", requests(op));
        assert_eq!(m.get("snapblk_volume_request_errors_total", &v(op)), Some(0.0), "{op}");
        // The histogram counts the same requests.
        assert_eq!(m.get("snapblk_volume_request_duration_seconds_count", &v(op)), Some(requests(op)), "{op}");
        let inf = [("volume", "v"), ("op", op), ("le", "+Inf")];
        assert_eq!(m.get("snapblk_volume_request_duration_seconds_bucket", &inf), Some(requests(op)), "{op}");
    }
    assert!(bytes("write") >= 1048576.0 && bytes("read") >= 1048576.0, "{} {}", bytes("write"), bytes("read"));
    assert!(bytes("trim") >= 65536.0 && bytes("snapshot_read") >= 65536.0);
    assert_eq!(m.get("snapblk_volume_snapshots", &[("volume", "v"), ("kind", "manual")]), Some(2.0));
    assert_eq!(m.get("snapblk_volume_snapshots", &[("volume", "v"), ("kind", "auto")]), Some(0.0));
    assert_eq!(m.get("snapblk_volume_dirty_clusters", &[("volume", "v")]), Some(0.0), "clean after a snapshot");
    assert_eq!(m.get("snapblk_volume_size_bytes", &[("volume", "v")]), Some(16.0 * 1048576.0));

    // The snapshots upload to the local region (the default): the store's counters move.
    let m = scrape_until(&addr, "the uploads done", |m| {
        m.get("snapblk_volume_snapshot_uploads", &[("volume", "v"), ("state", "available")]) == Some(2.0)
    });
    assert!(m.get("snapblk_store_requests_total", &[("region", "local"), ("op", "put")]).unwrap() >= 1.0);
    // (Compressed: 1 MiB of one byte value stores as about a kilobyte.)
    assert!(m.get("snapblk_store_bytes_total", &[("region", "local"), ("op", "put")]).unwrap() > 0.0);
    assert_eq!(m.get("snapblk_store_failures_total", &[("region", "local")]), Some(0.0));

    // A policy's snapshots count as auto, and its success shows with its interval.
    d.cli_ok(&["volume", "create", "w", "--size", "4M"]);
    d.cli_ok(&["policy", "create", "often", "--every", "1s", "--keep-last", "3"]);
    d.cli_ok(&["policy", "apply", "often", "w"]);
    let m = scrape_until(&addr, "a policy snapshot", |m| {
        m.get("snapblk_volume_snapshots", &[("volume", "w"), ("kind", "auto")]).unwrap_or(0.0) >= 1.0
            && m.has("snapblk_policy_last_success_age_seconds")
    });
    let pw = [("policy", "often"), ("volume", "w")];
    assert_eq!(m.get("snapblk_policy_interval_seconds", &[("policy", "often")]), Some(1.0));
    assert!(m.get("snapblk_policy_last_success_age_seconds", &pw).unwrap() < 60.0);
    assert!(m.get("snapblk_policy_last_success_timestamp_seconds", &pw).unwrap() > 1.7e9);
    assert!(m.get("snapblk_policy_next_due_timestamp_seconds", &[("policy", "often")]).is_some());
    assert_eq!(m.get("snapblk_volume_snapshots", &[("volume", "w"), ("kind", "manual")]), Some(0.0));
    d.cli_ok(&["policy", "remove", "often", "w"]);

    // Nothing but /metrics.
    let (status, _, _) = http_get(&addr, "/");
    assert_eq!(status, 404);
    let (status, _, _) = http_get(&addr, "/metrics/extra");
    assert_eq!(status, 404);
}

#[test]
fn a_metrics_listener_off_loopback_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for addr in ["0.0.0.0:9100", "[::]:9100"] {
        let out = run(
            Command::new(BIN)
                .args(["serve", "--nbd-listen", "none", "--metrics-listen", addr, "--dir"])
                .arg(tmp.path().join("d"))
                .env_remove("SNAPBLK_DIR"),
            Duration::from_secs(30),
        );
        assert_ne!(out.status.code(), Some(0), "{addr}: serve started");
        let err = text(&out.stderr);
        assert_one_sentence(&err);
        assert!(err.contains(&format!("refusing --metrics-listen {addr}")) && err.contains("loopback"), "{err}");
    }
}
