//! Nodes sharing a region (issue 23): holds keep a snapshot another node loads from, the GC
//! lease keeps GC on one node at a time, and a pack GC found unreferenced is deleted only
//! after `gc.delete_delay`, so another node's dedup index cannot make a new snapshot point
//! into a deleted pack. Two real daemons with their own directories on one region (the local
//! filesystem and, from scripts/test, Garage).

mod common;

use std::time::{Duration, Instant};

use common::store::*;
use common::Daemon;
use serde_json::Value;

fn in_region(d: &Daemon, region: &TestRegion, id: &str) -> bool {
    let listed = d.cli_json(&["snapshot", "list", "--region", region.name]);
    listed.as_array().unwrap().iter().any(|s| s["id"] == id)
}

fn node_id(d: &Daemon, region: &TestRegion) -> String {
    region_show(d, region.name)["node"].as_str().unwrap().to_string()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A snapshot of node A that node B loads from: A's delete is refused (naming B) until B has
/// loaded everything; one B stopped loading from (killed) is deletable once B's hold
/// expires; a forced delete goes at once on A while its store copy stays for B, then goes.
#[test]
fn a_snapshot_another_node_loads_from_is_not_deleted_under_it() {
    if !tools() {
        return;
    }
    for region in regions() {
        let o = origin(&region);
        // Short holds so expiry fits in a test (renewed every 2 s).
        let mut b = node(&o, &region, "b", "background = false\nhold = \"6s\"", "");
        let b_id = node_id(&b, &region);
        b.cli_ok(&["volume", "create", "b1", "--from-snapshot", &o.id, "--region", region.name]);

        // 1. Refused while B loads, with a sentence naming B and what loads.
        let (code, err) = o.a.cli_err(&["snapshot", "delete", "vol@s1"]);
        assert_eq!(code, 5, "refused (exit 5): {err}");
        assert!(err.contains(&b_id) && err.contains("volume b1"), "names the holder and its volume: {err}");
        assert!(err.contains("--force"), "says what to do: {err}");
        common::assert_one_sentence(&err);
        assert!(in_region(&o.a, &region, &o.id));

        // 2. B finishes loading: its hold goes, and A's delete succeeds.
        b.cli_ok(&["volume", "hydrate", "b1", "--wait"]);
        let got = o.tmp.path().join("b1.raw");
        nbd_to_file(&b, "b1", &got);
        compare(&o.expected, &got);
        wait_until("A's delete accepted once B has loaded", Duration::from_secs(30), || {
            o.a.cli(&["snapshot", "delete", "vol@s1"]).status.success()
        });
        assert!(!in_region(&o.a, &region, &o.id), "deleted from the region");

        // 3. A hold whose node stopped renewing it expires.
        fill(&o.a, "vol", 0, 4 * MIB, 12);
        let s2 = snapshot(&o.a, "vol", "s2")["id"].as_str().unwrap().to_string();
        wait_available(&o.a, "vol@s2");
        b.cli_ok(&["volume", "create", "b2", "--from-snapshot", &s2, "--region", region.name]);
        let (code, _) = o.a.cli_err(&["snapshot", "delete", "vol@s2"]);
        assert_eq!(code, 5);
        b.kill9();
        let killed = Instant::now();
        wait_until("A's delete accepted once B's hold expired", Duration::from_secs(30), || {
            o.a.cli(&["snapshot", "delete", "vol@s2"]).status.success()
        });
        assert!(killed.elapsed() >= Duration::from_secs(2), "the hold lasted until its expiry");

        // 4. --force: gone from A at once, its store copy stays while B loads, then goes.
        let mut b = Daemon::try_start(&b.dir, &[]).unwrap();
        fill(&o.a, "vol", 8 * MIB, 4 * MIB, 13);
        let s3 = snapshot(&o.a, "vol", "s3")["id"].as_str().unwrap().to_string();
        wait_available(&o.a, "vol@s3");
        let expected3 = o.tmp.path().join("s3.raw");
        export(&o.a, "vol@s3", &expected3);
        b.cli_ok(&["volume", "create", "b3", "--from-snapshot", &s3, "--region", region.name]);
        o.a.cli_ok(&["snapshot", "delete", "vol@s3", "--force"]);
        assert!(o.a.cli_err(&["snapshot", "show", "vol@s3"]).0 == 4, "gone from A");
        std::thread::sleep(Duration::from_secs(6));
        assert!(in_region(&o.a, &region, &s3), "the store copy stays while B holds it");
        let got3 = o.tmp.path().join("b3.raw");
        nbd_to_file(&b, "b3", &got3);
        compare(&expected3, &got3);
        b.cli_ok(&["volume", "hydrate", "b3", "--wait"]);
        wait_until("the forced delete's store copy goes once B let go", Duration::from_secs(40), || {
            !in_region(&o.a, &region, &s3)
        });
        b.terminate();
    }
}

/// Sets `[gc]` keys in a daemon's snapblk.toml (configure() writes single-node values).
fn gc_config(d: &Daemon, delete_delay: &str, grace: &str) {
    let path = d.dir.join("snapblk.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text
        .replace("delete_delay = \"0s\"", &format!("delete_delay = \"{delete_delay}\""))
        .replace("grace = \"0s\"", &format!("grace = \"{grace}\""));
    std::fs::write(&path, text).unwrap();
}

/// The dedup hazard of shared regions: node B's index names the packs of a snapshot B
/// deleted, and GC on node A deletes them. B then uploads the same data again: it must not
/// reference the deleted packs. And a pack condemned by A while B's new snapshot reuses it is
/// saved (or not reused): every snapshot verifies and restores after A's later GC.
#[test]
fn a_pack_condemned_by_another_node_is_not_reused_by_this_nodes_dedup_index() {
    if !tools() {
        return;
    }
    for region in regions() {
        let mut o = origin(&region);
        let mut b = node(&o, &region, "b", "", "");
        for d in [&mut o.a, &mut b] {
            d.terminate();
            gc_config(d, "3s", "0s");
            *d = Daemon::try_start(&d.dir, &[]).unwrap();
        }
        let gc = |d: &Daemon| {
            let r = d.cli_json(&["gc", "--region", region.name]);
            if r.is_array() {
                r[0].clone()
            } else {
                r
            }
        };
        b.cli_ok(&["volume", "create", "bv", "--size", "16M", "--region", region.name]);
        fill(&b, "bv", 0, 8 * MIB, 77);
        snapshot(&b, "bv", "x1");
        wait_available(&b, "bv@x1");
        b.cli_ok(&["snapshot", "delete", "bv@x1"]);

        // 1. A condemns x1's packs (unreferenced now) and deletes nothing yet; after the
        //    delay, it deletes them. B's index still names them.
        let r1 = gc(&o.a);
        assert!(r1["packs_condemned"].as_u64().unwrap() > 0, "x1's packs condemned: {r1}");
        assert_eq!(r1["packs_deleted"], 0, "nothing deleted before the delay: {r1}");
        std::thread::sleep(Duration::from_secs(4));
        let r2 = gc(&o.a);
        assert!(r2["packs_deleted"].as_u64().unwrap() > 0, "the condemned packs go after the delay: {r2}");
        // B uploads the same data again.
        snapshot(&b, "bv", "x2");
        wait_available(&b, "bv@x2");
        verify_ok(&b, "bv@x2");

        // 2. x2's packs condemned by A (x2 deleted), and B takes x3 of the same data at once:
        //    after the delay, A's GC deletes nothing x3 needs.
        b.cli_ok(&["snapshot", "delete", "bv@x2"]);
        let r3 = gc(&o.a);
        assert!(r3["packs_condemned"].as_u64().unwrap() > 0, "x2's packs condemned: {r3}");
        snapshot(&b, "bv", "x3");
        wait_available(&b, "bv@x3");
        std::thread::sleep(Duration::from_secs(4));
        gc(&o.a);
        verify_ok(&b, "bv@x3");
        let (want, got) = (o.tmp.path().join("x3-want.raw"), o.tmp.path().join("x3-got.raw"));
        nbd_to_file(&b, "bv", &want);
        o.a.cli_ok(&["volume", "create", "bv3", "--from-snapshot", &snap_id(&b, "bv@x3"), "--region", region.name]);
        o.a.cli_ok(&["volume", "hydrate", "bv3", "--wait"]);
        nbd_to_file(&o.a, "bv3", &got);
        compare(&want, &got);
    }
}

fn snap_id(d: &Daemon, snap: &str) -> String {
    d.cli_json(&["snapshot", "show", snap])["id"].as_str().unwrap().to_string()
}

/// GC from two nodes at once, with uploads and deletes on both, in random interleavings:
/// one node's GC at a time (the other is refused with a sentence naming the holder), and no
/// live pack is ever deleted: every snapshot left verifies and restores equal.
#[test]
fn gc_from_two_nodes_at_once_never_deletes_a_live_pack() {
    if !tools() {
        return;
    }
    for region in regions() {
        let mut o = origin(&region);
        let mut b = node(&o, &region, "b", "", "");
        for d in [&mut o.a, &mut b] {
            d.terminate();
            // A grace longer than an upload here: with none, a mark listing the region between
            // an upload's pack PUT and its manifest condemns the new pack, and the next upload
            // based on that snapshot finds it condemned on every attempt (the default is 1 h).
            gc_config(d, "1s", "3s");
            *d = Daemon::try_start(&d.dir, &[]).unwrap();
        }
        b.cli_ok(&["volume", "create", "vol", "--size", "16M", "--region", region.name]);
        let seed = rand_u64();
        eprintln!("seed {seed}");
        let nodes = [&o.a, &b];
        let refused = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for (n, d) in nodes.iter().enumerate() {
                let refused = &refused;
                s.spawn(move || {
                    let mut rng = seed ^ (n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    let mut next = || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng
                    };
                    for i in 0..8 {
                        // Data shared by both nodes (dedup across them) and data of its own.
                        fill(d, "vol", (next() % 8) * MIB, MIB, next() % 3);
                        fill(d, "vol", 8 * MIB + (next() % 8) * MIB, MIB, next());
                        let name = format!("g{i}");
                        snapshot(d, "vol", &name);
                        wait_available(d, &format!("vol@{name}"));
                        if i >= 2 && next() % 2 == 0 {
                            let old = format!("vol@g{}", i - 2);
                            let _ = d.cli(&["snapshot", "delete", &old]);
                        }
                        let out = d.cli(&["--json", "gc", "--region", region.name]);
                        if !out.status.success() {
                            let err = common::text(&out.stderr);
                            assert!(err.contains("GC of region"), "only a lease refusal is expected: {err}");
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(next() % 1500));
                    }
                });
            }
        });
        eprintln!("{} GC runs refused (the other node held the lease)", refused.into_inner());
        // Past the delay, a last GC on each, then every snapshot left verifies and restores.
        std::thread::sleep(Duration::from_secs(2));
        for d in nodes {
            d.cli_ok(&["gc", "--region", region.name]);
        }
        for d in nodes {
            let snaps: Value = d.cli_json(&["snapshot", "list", "vol"]);
            let snaps = snaps.as_array().unwrap();
            assert!(!snaps.is_empty());
            for s in snaps {
                let name = format!("vol@{}", s["name"].as_str().unwrap());
                verify_ok(d, &name);
            }
            let last = snaps.last().unwrap()["id"].as_str().unwrap();
            let restored = format!("r-{}", &last[2..8]);
            let other = if std::ptr::eq(d, &o.a) { &b } else { &o.a };
            other.cli_ok(&["volume", "create", &restored, "--from-snapshot", last, "--region", region.name]);
            other.cli_ok(&["volume", "hydrate", &restored, "--wait"]);
            let (want, got) = (o.tmp.path().join("want.raw"), o.tmp.path().join("got.raw"));
            common::ok(
                "nbdcopy",
                &[
                    &d.nbd_uri(&format!("vol@{}", snaps.last().unwrap()["name"].as_str().unwrap())),
                    &want.display().to_string(),
                ],
            );
            nbd_to_file(other, &restored, &got);
            compare(&want, &got);
        }
    }
}

/// The lease: while node A's GC runs, node B's is refused with a sentence naming A.
#[test]
fn gc_runs_on_one_node_of_a_region_at_a_time() {
    if !tools() {
        return;
    }
    for region in regions() {
        let mut o = origin(&region);
        let b = node(&o, &region, "b", "", "");
        // A's GC made slow: every GET of its store waits 300 ms.
        o.a.terminate();
        let path = o.a.dir.join("snapblk.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}\n[regions.{}.faults]\nget_latency_ms = 300\n", region.name)).unwrap();
        o.a = Daemon::try_start(&o.a.dir, &[]).unwrap();
        let a_id = node_id(&o.a, &region);
        std::thread::scope(|s| {
            let a = &o.a;
            let run = s.spawn(move || a.cli(&["gc", "--region", region.name]));
            // Until A holds the lease (region show on B names it).
            wait_until("A's GC holds the lease", Duration::from_secs(20), || {
                region_show(&b, region.name)["gc_lease"]["node"] == a_id.as_str()
            });
            let (code, err) = b.cli_err(&["gc", "--region", region.name]);
            assert_eq!(code, 5, "{err}");
            // (The job's progress line first, then the error.)
            let last = err.trim().lines().last().unwrap_or_default();
            assert!(last.contains(&a_id) && last.contains("try again later"), "{err}");
            assert!(run.join().unwrap().status.success(), "A's GC completes");
        });
        assert!(region_show(&b, region.name)["gc_lease"].is_null(), "released at the end");
        b.cli_ok(&["gc", "--region", region.name]);
        let info = region_show(&b, region.name);
        let expect = if region.name == "local" { "enforced" } else { "not-enforced" };
        assert_eq!(info["conditional_writes"], expect, "probed at open: {info}");
    }
}
