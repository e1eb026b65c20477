//! Instant restore: volumes created on a second node from a snapshot another node uploaded,
//! loading their data lazily (foreground first) and in the background. Every test runs on
//! the local filesystem region and, from scripts/test, on a real Garage S3 server.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::store::*;
use common::{python_ok, qemu_io, Daemon};
use serde_json::Value;

fn create_from(d: &Daemon, name: &str, o: &Origin, region: &TestRegion) -> Duration {
    let t = Instant::now();
    let v = d.cli_json(&["volume", "create", name, "--from-snapshot", &o.id, "--region", region.name]);
    let took = t.elapsed();
    assert_eq!(v["size"], 64 * MIB, "{v}");
    assert!(v["hydration"].is_object(), "a new volume from the store is loading: {v}");
    took
}

fn metric(d: &Daemon, region: &TestRegion, name: &str) -> u64 {
    region_show(d, region.name)["metrics"][name].as_u64().unwrap()
}

/// `expected` with `patch` applied at `offset`, written to a new file.
fn patched(o: &Origin, name: &str, edits: &[(u64, Vec<u8>)]) -> PathBuf {
    let mut data = std::fs::read(&o.expected).unwrap();
    for (offset, bytes) in edits {
        data[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes);
    }
    let p = o.tmp.path().join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Every extent `qemu-img map` reports as zero reads as zeros in `expected`: block status of
/// a volume still loading never calls data a hole. Returns the bytes reported as zero.
fn check_map(d: &Daemon, vol: &str, expected: &Path) -> u64 {
    let map = common::ok("qemu-img", &["map", "--output=json", "-f", "raw", &d.nbd_uri(vol)]);
    let extents: Value = serde_json::from_str(&map).unwrap();
    let data = std::fs::read(expected).unwrap();
    let mut zero = 0;
    for e in extents.as_array().unwrap() {
        if e["zero"] == true {
            let (start, len) = (e["start"].as_u64().unwrap() as usize, e["length"].as_u64().unwrap() as usize);
            assert!(data[start..start + len].iter().all(|&b| b == 0), "{vol}: {e} is reported zero but holds data");
            zero += len as u64;
        }
    }
    zero
}

#[test]
fn three_volumes_on_a_second_node_restore_one_snapshot_byte_for_byte_before_and_after_hydration() {
    if !tools() {
        return;
    }
    for region in regions() {
        let o = origin(&region);
        let mut b = node(&o, &region, "b", "bandwidth_limit = \"8M\"", "");
        let listed = b.cli_json(&["snapshot", "list", "--region", region.name]);
        assert!(listed.as_array().unwrap().iter().any(|s| s["id"] == o.id.as_str()), "{listed}");

        let mut took = Vec::new();
        for name in ["b1", "b2", "b3"] {
            took.push(create_from(&b, name, &o, &region));
        }
        // Whatever the size: a 1 TiB volume with a little data restores as fast.
        o.a.cli_ok(&["volume", "create", "big", "--size", "1T", "--region", region.name]);
        qemu_io(&o.a.nbd_uri("big"), &["write -P 0x42 512G 1M", "flush"]);
        let big = snapshot(&o.a, "big", "s")["id"].as_str().unwrap().to_string();
        wait_available(&o.a, "big@s");
        let t = Instant::now();
        b.cli_ok(&["volume", "create", "big1", "--from-snapshot", &big, "--region", region.name]);
        qemu_io(&b.nbd_uri("big1"), &["read -P 0x42 512G 1M", "read -P 0 511G 1M"]);
        let big_took = t.elapsed();
        eprintln!("{}: 1 TiB volume from the store, created and 2 MiB read in {big_took:?}", region.name);
        assert!(big_took < Duration::from_secs(3), "{}: {big_took:?}", region.name);

        // Time to first byte: a 4 KiB read of data right after the create returned.
        let t = Instant::now();
        qemu_io(&b.nbd_uri("b1"), &["read -v 32M 4k"]);
        let first_byte = t.elapsed();
        eprintln!("{}: volume create --from-snapshot took {took:?}; first 4 KiB read {first_byte:?}", region.name);
        for t in &took {
            assert!(*t < Duration::from_secs(2), "{}: create took {t:?}", region.name);
        }

        // While loading: block status is truthful, and every volume exports the snapshot.
        assert!(hydration(&b, "b3").is_object(), "b3 finished loading too early for this test");
        check_map(&b, "b3", &o.expected);
        for name in ["b1", "b2", "b3"] {
            let out = o.tmp.path().join(format!("{name}-loading.raw"));
            nbd_to_file(&b, name, &out);
            compare(&o.expected, &out);
        }

        // A snapshot of a volume still loading uploads only what changed (never the data
        // still in the store), and a volume created from it (a clone of a clone) is whole.
        let b2 = hydration(&b, "b2");
        assert!(b2.is_object() || b2.is_null());
        qemu_io(&b.nbd_uri("b2"), &["write -P 0x6b 1M 64k", "flush"]);
        snapshot(&b, "b2", "x");
        let x = wait_available(&b, "b2@x");
        let added = x["upload"]["added_bytes"].as_u64().unwrap();
        assert!(added < MIB, "{}: the snapshot of a loading volume added {added} bytes", region.name);
        assert_eq!(x["upload"]["base"], o.id.as_str(), "{x}");
        let with_x = patched(&o, "x.raw", &[(MIB, vec![0x6b; 64 << 10])]);
        create_from_local(&b, "c1", "b2@x");
        let c1 = o.tmp.path().join("c1.raw");
        nbd_to_file(&b, "c1", &c1);
        compare(&with_x, &c1);

        for name in ["b1", "b2", "b3", "c1", "big1"] {
            hydrate_wait(&b, name);
        }
        qemu_io(&b.nbd_uri("big1"), &["read -P 0x42 512G 1M"]);
        let zero = check_map(&b, "b3", &o.expected);
        assert!(zero >= 64 * MIB - DATA, "{}: only {zero} bytes reported as holes after hydration", region.name);
        assert!(b.terminate(), "clean shutdown");
        b = Daemon::start(&b.dir);
        for (name, want) in [("b1", &o.expected), ("b2", &with_x), ("b3", &o.expected), ("c1", &with_x)] {
            let out = o.tmp.path().join(format!("{name}-done.raw"));
            nbd_to_file(&b, name, &out);
            compare(want, &out);
        }
        assert!(hydration(&b, "b1").is_null());

        // On node A, rolling back to the released snapshot loads it back the same way.
        qemu_io(&o.a.nbd_uri("vol"), &["write -P 0x13 0 8M", "flush"]);
        let v = o.a.cli_json(&["snapshot", "rollback", "vol@s1"]);
        assert!(v["hydration"].is_object(), "{v}");
        let rolled = o.tmp.path().join("rolled.raw");
        nbd_to_file(&o.a, "vol", &rolled);
        compare(&o.expected, &rolled);
        hydrate_wait(&o.a, "vol");
        nbd_to_file(&o.a, "vol", &rolled);
        compare(&o.expected, &rolled);
    }
}

fn create_from_local(d: &Daemon, name: &str, snap: &str) {
    d.cli_ok(&["volume", "create", name, "--from-snapshot", snap]);
}

#[test]
fn a_foreground_read_during_background_hydration_takes_about_two_get_latencies() {
    if !tools() {
        return;
    }
    const LATENCY_MS: f64 = 20.0;
    for region in regions() {
        let o = origin(&region);
        let b = node(&o, &region, "b", "bandwidth_limit = \"2M\"\nconcurrency = 4", "get_latency_ms = 20");
        create_from(&b, "b1", &o, &region);
        std::thread::sleep(Duration::from_secs(1)); // background loading is under way
                                                    // Clusters from the end of the data backwards: far from where the background is.
        let offsets: Vec<String> =
            (0..60u64).map(|i| ((DATA / CLUSTER - 1 - 2 * i) * CLUSTER + 4096 * (i % 16)).to_string()).collect();
        let mut args = vec!["latency".to_string(), b.nbd_uri("b1")];
        args.extend(offsets);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = python_ok("reads.py", &args, Duration::from_secs(120));
        let mut ms: Vec<f64> = serde_json::from_str(&out).unwrap();
        assert!(hydration(&b, "b1").is_object(), "hydration ended before the reads; the test measured nothing");
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (p50, p99, max) = (ms[ms.len() / 2], ms[ms.len() * 99 / 100], ms[ms.len() - 1]);
        eprintln!(
            "{}: foreground 4 KiB reads during hydration with {LATENCY_MS} ms per GET: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
            region.name
        );
        // One GET (the map page is cached) or two: 20-40 ms, plus scheduling on a busy
        // machine. Stuck behind the background work, it would take seconds.
        assert!(p50 < 4.0 * LATENCY_MS + 40.0, "{}: p50 {p50:.1} ms", region.name);
        assert!(max < 1000.0, "{}: max {max:.1} ms", region.name);
    }
}

#[test]
fn a_partial_write_loads_its_cluster_first_and_a_whole_cluster_write_or_trim_loads_nothing() {
    if !tools() {
        return;
    }
    for region in regions() {
        let o = origin(&region);
        // No background loading: every GET here is one a request caused.
        let mut b = node(&o, &region, "b", "background = false", "get_latency_ms = 200");
        create_from(&b, "b1", &o, &region);
        let uri = b.nbd_uri("b1");
        let gets = || metric(&b, &region, "get_ops");
        let g0 = gets();
        qemu_io(&uri, &["write -P 0x11 640k 64k", "discard 1M 64k", "flush"]);
        assert_eq!(gets(), g0, "{}: a whole-cluster write and trim fetched something", region.name);

        qemu_io(&uri, &["write -P 0x22 1288k 4k", "flush"]); // inside cluster 20
        let g1 = gets();
        assert!((g0 + 1..=g0 + 2).contains(&g1), "{}: a partial write took {} GETs", region.name, g1 - g0);

        // Eight readers of one cluster at once share one fetch (the page is cached now).
        let same =
            python_ok("reads.py", &["same", &uri, &(30 * CLUSTER + 512).to_string(), "8"], Duration::from_secs(60));
        assert_eq!(same.trim(), "8");
        assert_eq!(gets(), g1 + 1, "{}: 8 concurrent reads of one cluster", region.name);

        // Sequential reads prefetch what follows (1 MiB by default).
        let loaded = || hydration(&b, "b1")["clusters_loaded"].as_u64().unwrap();
        let before = loaded();
        qemu_io(&uri, &["read 5M 64k", "read 5184k 64k"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while loaded() < before + 2 + 16 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(loaded() >= before + 2 + 16, "{}: no read-ahead ({} -> {})", region.name, before, loaded());

        let want = patched(
            &o,
            "want.raw",
            &[(640 << 10, vec![0x11; 64 << 10]), (MIB, vec![0; 64 << 10]), (1288 << 10, vec![0x22; 4096])],
        );
        let out = o.tmp.path().join("b1.raw");
        nbd_to_file(&b, "b1", &out);
        compare(&want, &out);
        hydrate_wait(&b, "b1");
        b.kill9();
        let b = Daemon::start(&b.dir);
        nbd_to_file(&b, "b1", &out);
        compare(&want, &out);
    }
}

#[test]
fn hydration_killed_mid_way_resumes_without_refetching_and_keeps_acknowledged_writes() {
    if !tools() {
        return;
    }
    for region in regions() {
        let o = origin(&region);
        let mut b = node(&o, &region, "b", "bandwidth_limit = \"4M\"", "");
        create_from(&b, "b1", &o, &region);
        let deadline = Instant::now() + Duration::from_secs(60);
        let fetched_before = loop {
            let h = hydration(&b, "b1");
            let f = h["bytes_fetched"].as_u64().unwrap_or(0);
            if f >= 12 * MIB {
                break f;
            }
            assert!(h.is_object() && Instant::now() < deadline, "{}: hydration: {h}", region.name);
            std::thread::sleep(Duration::from_millis(100));
        };
        qemu_io(&b.nbd_uri("b1"), &["write -P 0x5a 30M 100k", "flush"]);
        b.kill9();
        let b = Daemon::start(&b.dir);
        hydrate_wait(&b, "b1");
        let after = metric(&b, &region, "get_bytes");
        eprintln!("{}: {} stored; fetched {fetched_before} before kill -9, {after} after", region.name, o.stored);
        // What was committed before the kill is not fetched again: at most what was in
        // flight, and up to a second of loading at 4 MiB/s, are.
        assert!(
            after + fetched_before <= o.stored + 8 * MIB,
            "{}: refetched: {fetched_before} + {after} > {} + 8 MiB",
            region.name,
            o.stored
        );
        let want = patched(&o, "want.raw", &[(30 * MIB, vec![0x5a; 100 << 10])]);
        let out = o.tmp.path().join("b1.raw");
        nbd_to_file(&b, "b1", &out);
        compare(&want, &out);
    }
}

#[test]
fn a_store_outage_fails_reads_within_the_bound_and_hydration_completes_when_it_ends() {
    if !tools() {
        return;
    }
    for region in regions() {
        let o = origin(&region);
        let outage = o.tmp.path().join("outage");
        let b = node(
            &o,
            &region,
            "b",
            "bandwidth_limit = \"4M\"\nread_timeout = \"2s\"",
            &format!("outage_file = \"{}\"", outage.display()),
        );
        create_from(&b, "b1", &o, &region);
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::write(&outage, "").unwrap();
        let t = Instant::now();
        let out = b.cli(&["volume", "show", "b1"]);
        assert!(out.status.success());
        let read = common::run(
            std::process::Command::new("qemu-io").args(["-f", "raw", "-c", "read 39M 4k", &b.nbd_uri("b1")]),
            Duration::from_secs(60),
        );
        let took = t.elapsed();
        let said = format!("{}{}", common::text(&read.stdout), common::text(&read.stderr));
        eprintln!("{}: read during the outage failed after {took:?}: {}", region.name, said.trim());
        assert!(said.contains("Input/output error"), "{}: read during an outage: {said}", region.name);
        assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(8), "{}: {took:?}", region.name);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let h = hydration(&b, "b1");
            if h["state"] == "retrying" && h["last_error"].is_string() {
                break;
            }
            assert!(Instant::now() < deadline, "{}: the outage does not show: {h}", region.name);
            std::thread::sleep(Duration::from_millis(200));
        }

        std::fs::remove_file(&outage).unwrap();
        hydrate_wait(&b, "b1");
        let out = o.tmp.path().join("b1.raw");
        nbd_to_file(&b, "b1", &out);
        compare(&o.expected, &out);
    }
}

/// Whether `snapshot list --region` (the store's view, from manifests) has snapshot `id`.
fn in_region(d: &Daemon, region: &TestRegion, id: &str) -> bool {
    let listed = d.cli_json(&["snapshot", "list", "--region", region.name]);
    listed.as_array().unwrap().iter().any(|s| s["id"] == id)
}

/// Issue 18 §3: deleting a released snapshot that a clone still loads from is accepted and
/// the snapshot leaves every list at once; the clone goes on loading from the copy in the
/// store — across a kill -9 — and that copy is deleted once the clone has loaded everything.
#[test]
fn a_snapshot_deleted_while_a_clone_loads_from_it_goes_from_the_store_once_the_clone_has_loaded() {
    if !tools() {
        return;
    }
    for region in regions() {
        // No background loading: the clone loads only what is read.
        let (tmp, dir, mut d) = start_with_volume(&region, "\n[hydrate]\nbackground = false", "16M");
        fill(&d, "vol", 0, 6 * MIB, 31);
        let id = snapshot(&d, "vol", "a")["id"].as_str().unwrap().to_string();
        wait_available(&d, "vol@a");
        wait_released(&d, "vol@a");
        let expected = tmp.path().join("a.raw");
        export(&d, "vol@a", &expected);
        d.cli_ok(&["volume", "clone", "vol@a", "c"]);
        assert!(hydration(&d, "c").is_object(), "the clone of a released snapshot loads from the store");

        d.cli_ok(&["snapshot", "delete", "vol@a"]);
        let listed = d.cli_json(&["snapshot", "list", "vol"]);
        assert_eq!(listed.as_array().unwrap().len(), 0, "deleted snapshot still listed: {listed}");
        assert!(in_region(&d, &region, &id), "the store copy went while the clone still loads from it");

        d.kill9();
        d = Daemon::try_start(&dir, &[]).unwrap();
        assert_eq!(d.cli_json(&["snapshot", "list", "vol"]).as_array().unwrap().len(), 0);
        assert!(in_region(&d, &region, &id), "the store copy went while the clone still loads from it");
        let got = tmp.path().join("c.raw");
        nbd_to_file(&d, "c", &got);
        compare(&expected, &got);
        hydrate_wait(&d, "c");
        let deadline = Instant::now() + Duration::from_secs(20);
        while in_region(&d, &region, &id) {
            assert!(Instant::now() < deadline, "the deleted snapshot's manifest is still in the store\n{}", d.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        // The clone needs nothing from it any more.
        nbd_to_file(&d, "c", &got);
        compare(&expected, &got);
    }
}

/// Issue 23: block status of a volume still loading answers from the source's map pages:
/// the snapshot's hole (everything past `DATA`) is a hole before anything is loaded, and the
/// data is data — exactly, per cluster.
#[test]
fn block_status_of_a_loading_volume_reports_the_sources_holes_at_once() {
    if !tools() {
        return;
    }
    for region in regions() {
        let o = origin(&region);
        let b = node(&o, &region, "b", "background = false", "");
        create_from(&b, "b1", &o, &region);
        let map = common::nbd_map(&b.nbd_uri("b1"), None);
        assert_eq!(common::ranges_with(&map, 0), vec![(0, DATA)], "{}: {map:?}", region.name);
        assert_eq!(common::ranges_with(&map, 3), vec![(DATA, 64 * MIB - DATA)], "{}: {map:?}", region.name);
        assert!(hydration(&b, "b1").is_object(), "still loading: nothing was fetched for the answer");
        check_map(&b, "b1", &o.expected);
    }
}
