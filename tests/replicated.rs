//! The store losing nodes: snapblk against a real 3-node Garage cluster with replication
//! factor 3 (`scripts/garage start-cluster DIR`; `SNAPBLK_GARAGE_CLUSTER=DIR` names it, and
//! scripts/test starts one). Garage needs 2 of the 3 nodes for every write and metadata read:
//! with one node stopped everything must go on, with two stopped requests must fail within
//! the configured bounds, nothing may be published half-written, and all must resume once
//! the nodes return. The tests stop and start nodes with `scripts/garage stop-node/start-node`
//! and run one at a time (they share the cluster).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::store::*;
use common::{qemu_io, run, text, Daemon};
use serde_json::Value;

/// The node the region's endpoint points at: never stopped here (with it gone no request
/// reaches the cluster at all, which the single-node outage tests already cover).
const ENDPOINT_NODE: u32 = 1;

/// Serializes the tests of this file: each stops nodes of the one cluster.
static CLUSTER_LOCK: Mutex<()> = Mutex::new(());

/// The cluster under test, held by one test; nodes it stopped are started again when it is
/// dropped, also when the test fails.
struct Cluster {
    dir: PathBuf,
    stopped: Vec<u32>,
    _lock: MutexGuard<'static, ()>,
}

/// The cluster named by `SNAPBLK_GARAGE_CLUSTER`; `None` (after a SKIP line) without one,
/// unless `SNAPBLK_REQUIRE_GARAGE=1`, which makes a missing cluster fail.
fn cluster() -> Option<Cluster> {
    if !tools() {
        return None;
    }
    match std::env::var("SNAPBLK_GARAGE_CLUSTER") {
        Ok(dir) => {
            let lock = CLUSTER_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            Some(Cluster { dir: PathBuf::from(dir), stopped: Vec::new(), _lock: lock })
        }
        Err(_) if std::env::var("SNAPBLK_REQUIRE_GARAGE").as_deref() == Ok("1") => {
            panic!("SNAPBLK_REQUIRE_GARAGE=1 but SNAPBLK_GARAGE_CLUSTER is not set (run scripts/test)")
        }
        Err(_) => {
            eprintln!("SKIP: {}: no Garage cluster (SNAPBLK_GARAGE_CLUSTER unset)", common::test_name());
            None
        }
    }
}

impl Cluster {
    fn region(&self) -> TestRegion {
        let path = self.dir.join("region.toml");
        let block = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        TestRegion { name: "garage", block }
    }

    fn garage(&self, action: &str, node: u32) -> Result<(), String> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/garage");
        let out = run(Command::new(script).arg(action).arg(&self.dir).arg(node.to_string()), Duration::from_secs(60));
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("scripts/garage {action} {node} failed: {}{}", text(&out.stdout), text(&out.stderr)))
        }
    }

    fn stop_node(&mut self, node: u32) {
        assert_ne!(node, ENDPOINT_NODE, "the tests keep the endpoint's node running");
        self.garage("stop-node", node).unwrap_or_else(|e| panic!("{e}"));
        self.stopped.push(node);
        eprintln!("garage node {node} stopped");
    }

    fn start_nodes(&mut self) {
        for node in std::mem::take(&mut self.stopped) {
            self.garage("start-node", node).unwrap_or_else(|e| panic!("{e}"));
            eprintln!("garage node {node} started again");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in std::mem::take(&mut self.stopped) {
            if let Err(e) = self.garage("start-node", node) {
                eprintln!("{e}");
            }
        }
    }
}

/// Writes `DIR/snapblk.toml` for the cluster's region with `request_timeout` and `retries`
/// of its own (the usual test configuration has 5 s and the default 8) and a `[hydrate]`
/// table.
fn configure_cluster(dir: &Path, region: &TestRegion, upload: &str, request: &str, hydrate: &str) {
    configure(dir, region, upload, "");
    let path = dir.join("snapblk.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = if request.is_empty() { text } else { text.replace("request_timeout = \"5s\"\n", request) };
    std::fs::write(&path, format!("[hydrate]\n{hydrate}\n{text}")).unwrap();
}

/// A second node sharing `a`'s region (same configuration, prefix and repository key), with a
/// fresh directory `dir`.
fn second_node(a: &Daemon, region: &TestRegion, dir: &Path) -> Daemon {
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::copy(a.dir.join("snapblk.toml"), dir.join("snapblk.toml")).unwrap();
    let key = a.cli_ok(&["key", "export", region.name]);
    write_key_file(&dir.join("keys").join(format!("{}.key", region.name)), key);
    Daemon::start(dir)
}

/// Waits until `f` holds, checking every 100 ms; panics with `what` after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

/// Whether `snapshot list --region` (the store's manifests) holds snapshot `id`.
fn published(d: &Daemon, region: &TestRegion, id: &str) -> bool {
    let listed = d.cli_json(&["snapshot", "list", "--region", region.name]);
    listed.as_array().unwrap().iter().any(|s| s["id"] == id)
}

#[test]
fn an_upload_that_loses_one_store_node_completes_verifies_and_restores_equal_data() {
    let Some(mut cluster) = cluster() else { return };
    let region = cluster.region();
    let tmp = tempfile::tempdir().unwrap();
    // 32 MiB at 4 MiB/s: about 8 s of upload, a node stopped an eighth of the way in.
    configure_cluster(&tmp.path().join("a"), &region, "bandwidth_limit = \"4M\"", "", "");
    let a = Daemon::start(&tmp.path().join("a"));
    a.cli_ok(&["volume", "create", "vol", "--size", "64M", "--region", region.name]);
    fill(&a, "vol", 0, 32 * MIB, 41);
    let id = id_of(&snapshot(&a, "vol", "s1"));
    let expected = tmp.path().join("expected.raw");
    nbd_to_file(&a, "vol@s1", &expected);

    wait_for("4 MiB of the upload sent", Duration::from_secs(60), || {
        a.cli_json(&["snapshot", "show", "vol@s1"])["upload"]["bytes_sent"].as_u64().unwrap_or(0) >= 4 * MIB
    });
    cluster.stop_node(2);
    let lost_at = Instant::now();
    let v = a.cli_json(&["snapshot", "show", "vol@s1"]);
    assert_eq!(v["upload"]["state"], "uploading", "the upload ended before the node was stopped: {v}");
    wait_available(&a, "vol@s1");
    let took = lost_at.elapsed();
    let retries = region_show(&a, region.name)["metrics"]["retries"].clone();
    eprintln!("upload finished {took:?} after node 2 was stopped ({retries} requests retried)");
    // About 7 s of upload were left at 4 MiB/s; a stall behind the lost node would show.
    assert!(took < Duration::from_secs(60), "the upload took {took:?} after a node was lost");
    verify_ok(&a, "vol@s1");

    // A fresh node restores it, still with node 2 down: a second copy serves every read.
    let b = second_node(&a, &region, &tmp.path().join("b"));
    b.cli_ok(&["volume", "create", "r", "--from-snapshot", &id, "--region", region.name]);
    let restored = tmp.path().join("restored.raw");
    nbd_to_file(&b, "r", &restored);
    compare(&expected, &restored);
    cluster.start_nodes();
}

#[test]
fn a_hydration_that_loses_one_store_node_completes_with_equal_data() {
    let Some(mut cluster) = cluster() else { return };
    let region = cluster.region();
    let tmp = tempfile::tempdir().unwrap();
    // Node B loads at 4 MiB/s: 32 MiB take about 8 s, so most is still in the store when a
    // node goes.
    configure_cluster(&tmp.path().join("a"), &region, "", "", "bandwidth_limit = \"4M\"");
    let a = Daemon::start(&tmp.path().join("a"));
    a.cli_ok(&["volume", "create", "vol", "--size", "64M", "--region", region.name]);
    fill(&a, "vol", 0, 32 * MIB, 42);
    let id = id_of(&snapshot(&a, "vol", "s1"));
    let expected = tmp.path().join("expected.raw");
    nbd_to_file(&a, "vol@s1", &expected);
    wait_available(&a, "vol@s1");

    let b = second_node(&a, &region, &tmp.path().join("b"));
    b.cli_ok(&["volume", "create", "r", "--from-snapshot", &id, "--region", region.name]);
    wait_for("2 MiB loaded in the background", Duration::from_secs(60), || {
        hydration(&b, "r")["bytes_fetched"].as_u64().unwrap_or(0) >= 2 * MIB
    });
    cluster.stop_node(3);
    assert!(hydration(&b, "r").is_object(), "the hydration ended before the node was stopped");
    // Foreground reads of everything, most of it not loaded yet, with node 3 down.
    let t = Instant::now();
    let got = tmp.path().join("r.raw");
    nbd_to_file(&b, "r", &got);
    compare(&expected, &got);
    let took = t.elapsed();
    eprintln!("read the whole volume while loading, node 3 down, in {took:?}");
    assert!(took < Duration::from_secs(30), "reading 64 MiB took {took:?} with a node lost");
    let t = Instant::now();
    hydrate_wait(&b, "r");
    let retries = region_show(&b, region.name)["metrics"]["retries"].clone();
    eprintln!("hydration finished {:?} later, node 3 still down ({retries} requests retried)", t.elapsed());
    nbd_to_file(&b, "r", &got);
    compare(&expected, &got);
    cluster.start_nodes();
}

#[test]
fn with_two_store_nodes_lost_uploads_and_reads_fail_in_bounded_time_publish_nothing_and_resume() {
    let Some(mut cluster) = cluster() else { return };
    let region = cluster.region();
    let tmp = tempfile::tempdir().unwrap();
    // Each request: 2 s, 3 attempts; a read needing the store: 3 s. Uploads at 4 MiB/s, so
    // the nodes go in the middle of one; background loading at 512 KiB/s, so the clone
    // below has loaded little when they go.
    const REQUEST: Duration = Duration::from_secs(2);
    const RETRIES: u32 = 2;
    const READ_TIMEOUT: Duration = Duration::from_secs(3);
    const NEW: u64 = 32 * MIB;
    let dir = tmp.path().join("a");
    configure_cluster(
        &dir,
        &region,
        "bandwidth_limit = \"4M\"",
        &format!("request_timeout = \"{}s\"\nretries = {RETRIES}\n", REQUEST.as_secs()),
        &format!("read_timeout = \"{}s\"\nbandwidth_limit = \"512K\"", READ_TIMEOUT.as_secs()),
    );
    let d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "vol", "--size", "64M", "--region", region.name]);
    fill(&d, "vol", 0, 16 * MIB, 43);
    let s0 = id_of(&snapshot(&d, "vol", "s0"));
    let expected0 = tmp.path().join("s0.raw");
    nbd_to_file(&d, "vol@s0", &expected0);
    wait_available(&d, "vol@s0");
    wait_released(&d, "vol@s0");
    // A clone of the released snapshot loads it from the store.
    d.cli_ok(&["volume", "clone", "vol@s0", "c"]);
    assert!(hydration(&d, "c").is_object(), "the clone of a released snapshot loads from the store");

    // s1 adds 32 MiB (8 s of upload); two nodes go once 4 MiB of it are stored.
    fill(&d, "vol", 16 * MIB, NEW, 44);
    let s1 = id_of(&snapshot(&d, "vol", "s1"));
    let expected1 = tmp.path().join("s1.raw");
    nbd_to_file(&d, "vol@s1", &expected1);
    let mut stored_before = 0;
    wait_for("4 MiB of s1's upload stored", Duration::from_secs(60), || {
        stored_before = d.cli_json(&["snapshot", "show", "vol@s1"])["upload"]["bytes_sent"].as_u64().unwrap_or(0);
        stored_before >= 4 * MIB
    });
    cluster.stop_node(2);
    let v = d.cli_json(&["snapshot", "show", "vol@s1"]);
    assert_eq!(v["upload"]["state"], "uploading", "s1's upload ended before the second node was stopped: {v}");
    // The clock starts before the second node goes (stopping it takes a moment).
    let t = Instant::now();
    cluster.stop_node(3);

    // The upload fails once its requests have used their attempts, saying which store.
    let v = wait_upload(&d, "vol@s1", Duration::from_secs(120));
    let upload_took = t.elapsed();
    eprintln!(
        "upload with two nodes down ({stored_before} of {NEW} bytes stored) failed after {upload_took:?}: {}",
        v["upload"]["reason"]
    );
    assert_eq!(v["upload"]["state"], "failed", "{v}");
    let reason = v["upload"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("object store") && reason.contains("region 'garage'"), "unclear reason: {reason}");
    // A request in flight when the nodes went waits at most its attempts, each cut at
    // request_timeout, plus backoff (50, 100 ms, up to half again as jitter); then the
    // upload stops. Slack for stopping the node and a loaded machine; a hang would take
    // minutes.
    let per_request = REQUEST * (RETRIES + 1) + Duration::from_millis(300);
    let bound = per_request * 2 + Duration::from_secs(10);
    assert!(upload_took < bound, "upload failed after {upload_took:?}, bound {bound:?}");
    let show = d.cli_ok(&["snapshot", "show", "vol@s1"]);
    assert!(show.contains("failed: the object store failed"), "snapshot show:\n{show}");

    // A foreground read of a cluster not loaded yet (the background is still near the start)
    // fails with EIO after read_timeout, not later and not with zeros.
    let r = Instant::now();
    let read =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "read 15M 4k", &d.nbd_uri("c")]), Duration::from_secs(60));
    let read_took = r.elapsed();
    let said = format!("{}{}", text(&read.stdout), text(&read.stderr));
    eprintln!("foreground read with two nodes down: failed after {read_took:?}: {}", said.trim());
    assert!(said.contains("Input/output error"), "a read with two of three nodes down: {said}");
    assert!(
        read_took >= READ_TIMEOUT - Duration::from_millis(500) && read_took < READ_TIMEOUT + Duration::from_secs(5),
        "read_timeout is {READ_TIMEOUT:?}, the read failed after {read_took:?}"
    );
    // The background loading says it is retrying (once its rate limit lets it try).
    wait_for("the clone's hydration showing the outage", Duration::from_secs(30), || {
        let h = hydration(&d, "c");
        h["state"] == "retrying" && h["last_error"].as_str().is_some_and(|e| e.contains("region 'garage'"))
    });

    // The daemon answers everything that does not need the store, and what does fails with
    // a sentence naming the store.
    d.cli_ok(&["status"]);
    d.cli_ok(&["volume", "list"]);
    qemu_io(&d.nbd_uri("vol"), &["write -P 0x77 56M 1M", "flush", "read -P 0x77 56M 1M"]);
    let l = Instant::now();
    let (code, err) = d.cli_err(&["snapshot", "list", "--region", region.name]);
    eprintln!("snapshot list --region with two nodes down: exit {code} after {:?}: {}", l.elapsed(), err.trim());
    common::assert_one_sentence(&err);
    assert_eq!(code, 6, "the store is unavailable: {err}");
    assert!(err.contains("region 'garage'"), "{err}");

    cluster.start_nodes();
    // Nothing of s1 was published: the store lists s0 only.
    assert!(published(&d, &region, &s0));
    assert!(!published(&d, &region, &s1), "a failed upload is listed in the region");
    // The retry sends only what was not stored before the nodes went.
    let put_before = region_show(&d, region.name)["metrics"]["put_bytes"].as_u64().unwrap();
    d.cli_ok(&["snapshot", "upload", "vol@s1"]);
    wait_available(&d, "vol@s1");
    let put = region_show(&d, region.name)["metrics"]["put_bytes"].as_u64().unwrap() - put_before;
    eprintln!("the retry PUT {put} bytes ({stored_before} were stored before the nodes went)");
    assert!(put < NEW + MIB - stored_before, "the retry PUT {put} bytes: it sent stored packs again");
    verify_ok(&d, "vol@s1");
    verify_ok(&d, "vol@s0");
    assert!(published(&d, &region, &s1));
    let got = tmp.path().join("got.raw");
    export(&d, "vol@s1", &got);
    compare(&expected1, &got);
    hydrate_wait(&d, "c");
    nbd_to_file(&d, "c", &got);
    compare(&expected0, &got);
}
