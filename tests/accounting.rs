//! Storage accounting (issue 24): what each snapshot and volume takes in its repository,
//! counted from manifests and map pages, checked against what a delete and GC really free.
//! Every test runs on the local region and, with `SNAPBLK_GARAGE_REGION`, on Garage.

mod common;

use std::time::{Duration, Instant};

use common::store::*;
use common::Daemon;
use serde_json::Value;

/// `upload.pack_size` of the test configuration (`common::store::configure`): the slack a
/// GC may leave of freed bytes (blobs in packs that stay because others in them are live).
const PACK: u64 = MIB;
/// A margin for sealing overhead (40 bytes per 64 KiB cluster) and map pages.
const META: u64 = 64 << 10;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Asserts `lo <= x < lo + META`.
fn about(what: &str, x: u64, lo: u64) {
    assert!((lo..lo + META).contains(&x), "{what}: {x} bytes, expected {lo} and up to {META} more");
}

/// A snapshot's `storage`, counted by `snapshot show`.
fn storage(d: &Daemon, snap: &str) -> Value {
    let v = d.cli_json(&["snapshot", "show", snap]);
    assert!(v["storage"].is_object(), "{snap} has no storage counted: {v}");
    v["storage"].clone()
}

fn volume<'a>(info: &'a Value, name: &str) -> &'a Value {
    info["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["volume"] == name)
        .unwrap_or_else(|| panic!("no volume {name} in {info}"))
}

fn gc(d: &Daemon, region: &str) -> Value {
    let report = d.cli_json(&["gc", "--region", region, "--grace", "0s"]);
    report[0].clone()
}

#[test]
fn exclusive_bytes_are_what_a_delete_and_gc_free() {
    if !common::require_libnbd() {
        return;
    }
    for region in regions() {
        let name = region.name;
        let (_tmp, _dir, d) = start_with_volume(&region, "", "64M");
        // vol@s1 = A (0-8 MiB) + B (8-16 MiB); vol@s2 = C + B; vol2@t1 = the first half of C.
        // Random data: nothing compresses, and equal data is one blob (dedup in a repository).
        fill(&d, "vol", 0, 8 * MIB, 1);
        fill(&d, "vol", 8 * MIB, 8 * MIB, 2);
        snapshot(&d, "vol", "s1");
        let s1_view = wait_available(&d, "vol@s1");
        fill(&d, "vol", 0, 8 * MIB, 3);
        snapshot(&d, "vol", "s2");
        wait_available(&d, "vol@s2");
        d.cli_ok(&["volume", "create", "vol2", "--size", "64M", "--region", name]);
        fill(&d, "vol2", 0, 4 * MIB, 3);
        snapshot(&d, "vol2", "t1");
        wait_available(&d, "vol2@t1");

        let s1 = storage(&d, "vol@s1");
        assert_eq!(u(&s1["logical_bytes"]), 64 * MIB, "{s1}");
        assert_eq!(u(&s1["allocated_bytes"]), 16 * MIB, "{s1}");
        // The packs its upload stored, as its manifest records them; the upload's status also
        // counts the manifest itself.
        let (added, status_added) = (u(&s1["added_bytes"]), u(&s1_view["upload"]["added_bytes"]));
        assert!(added <= status_added && status_added - added < 16 << 10, "{s1}: upload said {status_added}");
        about("s1 added (A + B + its page, sealed)", added, 16 * MIB);
        about("s1 referenced (A + B + its page)", u(&s1["referenced_bytes"]), 16 * MIB);
        about("s1 exclusive (A + its page: B is s2's too)", u(&s1["exclusive_bytes"]), 8 * MIB);
        let s2 = storage(&d, "vol@s2");
        about("s2 referenced", u(&s2["referenced_bytes"]), 16 * MIB);
        about("s2 exclusive (the second half of C + its page)", u(&s2["exclusive_bytes"]), 4 * MIB);
        let t1 = storage(&d, "vol2@t1");
        about("t1 referenced", u(&t1["referenced_bytes"]), 4 * MIB);
        about("t1 exclusive (its page alone: its data is s2's)", u(&t1["exclusive_bytes"]), 1);
        for s in [&s1, &s2, &t1] {
            assert!(u(&s["exclusive_bytes"]) < u(&s["referenced_bytes"]), "shared blobs are not exclusive: {s}");
        }
        let t1_added = u(&t1["added_bytes"]);
        assert!(t1_added < 512 << 10, "t1's upload stored its page only (dedup): {t1_added}");

        // The region: the union, by volume.
        let info = region_show(&d, name);
        assert!(info["accounting_error"].is_null(), "{info}");
        about("referenced in the region (A + B + C + pages)", u(&info["referenced_bytes"]), 24 * MIB);
        assert!(u(&info["stored_bytes"]) >= u(&info["referenced_bytes"]), "{info}");
        let (vol, vol2) = (volume(&info, "vol"), volume(&info, "vol2"));
        assert_eq!(vol["snapshots"], 2, "{vol}");
        about("vol referenced", u(&vol["referenced_bytes"]), 24 * MIB);
        about("vol exclusive (all but the half of C vol2 has)", u(&vol["exclusive_bytes"]), 20 * MIB);
        assert_eq!(vol2["snapshots"], 1, "{vol2}");
        assert_eq!(vol2["referenced_bytes"], t1["referenced_bytes"], "{vol2}");
        assert_eq!(vol2["exclusive_bytes"], t1["exclusive_bytes"], "{vol2}");
        let text = d.cli_ok(&["region", "show", name]);
        assert!(text.contains("referenced:") && text.contains("by volume") && text.contains("vol2"), "{text}");

        // The same counts in every view: the region's list, the local list from the cache
        // (no --bytes: counted by the shows above) and counted again (--bytes).
        let listed = d.cli_json(&["snapshot", "list", "--region", name]);
        let s1_id = s1_view["id"].as_str().unwrap();
        let in_region = listed.as_array().unwrap().iter().find(|s| s["id"] == s1_id).unwrap();
        assert_eq!(in_region["exclusive_bytes"], s1["exclusive_bytes"], "{in_region}");
        assert_eq!(in_region["referenced_bytes"], s1["referenced_bytes"], "{in_region}");
        assert_eq!(in_region["allocated_bytes"], s1["allocated_bytes"], "{in_region}");
        for args in [&["snapshot", "list"][..], &["snapshot", "list", "--bytes"][..]] {
            let local = d.cli_json(args);
            let found = local.as_array().unwrap().iter().find(|s| s["id"] == s1_id).unwrap();
            assert_eq!(found["storage"], s1, "{args:?}: {found}");
        }
        let text = d.cli_ok(&["snapshot", "list", "--region", name]);
        assert!(text.contains("EXCLUSIVE"), "{text}");
        let text = d.cli_ok(&["snapshot", "show", "vol@s1"]);
        assert!(text.contains("exclusive (what deleting it would free)"), "{text}");

        // Delete s1, GC: the region's stored bytes drop by s1's exclusive bytes, within a
        // pack (a GC first, so that nothing else is left to free).
        let baseline = gc(&d, name);
        assert_eq!(baseline["packs_deleted"], 0, "nothing was garbage yet: {baseline}");
        let before = u(&region_show(&d, name)["stored_bytes"]);
        d.cli_ok(&["snapshot", "delete", "vol@s1"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while region_show(&d, name)["snapshots"] != 2 {
            assert!(Instant::now() < deadline, "s1's manifest is still in the region");
            std::thread::sleep(Duration::from_millis(100));
        }
        let report = gc(&d, name);
        let after_info = region_show(&d, name);
        let after = u(&after_info["stored_bytes"]);
        let freed = before.saturating_sub(after);
        let exclusive = u(&s1["exclusive_bytes"]);
        eprintln!("{name}: s1 exclusive {exclusive} bytes, GC freed {freed} ({report})");
        assert!(freed.abs_diff(exclusive) <= PACK, "GC freed {freed} bytes, s1 had {exclusive} exclusive: {report}");

        // After GC, counted again: B is s2's alone now.
        let s2 = storage(&d, "vol@s2");
        about("s2 exclusive after s1 went (B + half of C + its page)", u(&s2["exclusive_bytes"]), 12 * MIB);
        assert_eq!(storage(&d, "vol2@t1"), t1, "t1 did not change");
        about("referenced after GC (B + C + pages)", u(&after_info["referenced_bytes"]), 16 * MIB);
        let vol = volume(&after_info, "vol");
        assert_eq!(vol["snapshots"], 1, "{vol}");
        assert_eq!(vol["exclusive_bytes"], s2["exclusive_bytes"], "vol has s2 alone: {vol}");
        // GC's own count of live bytes (its mark) agrees with the accounting's, and so does
        // a second accounting (from the cache).
        let again = gc(&d, name);
        assert_eq!(again["packs_deleted"], 0, "{again}");
        let info = region_show(&d, name);
        assert_eq!(info["referenced_bytes"], again["live_bytes"], "accounting and GC's mark: {again}\n{info}");
        assert_eq!(info["stored_bytes"], again["stored_bytes"], "{again}\n{info}");
        assert_eq!(region_show(&d, name)["volumes"], info["volumes"]);
    }
}
