//! Cross-region copies and the archive tier, with the real daemon and real clients, on the
//! local region and (from scripts/test) a Garage one as the source: incremental copy chains
//! restored by a node that has only the destination, per-repository keys, kill -9 and
//! cancel, injected faults and a corrupt source, and archives (dedup, minimum retention,
//! estimate, restore).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::store::*;
use common::Daemon;
use serde_json::Value;

/// A daemon whose volume `vol` is homed in `region`, with two more fs regions: `dr` and the
/// archive region `arch` (minimum retention 1h).
fn start(region: &TestRegion, upload: &str, extra: &str) -> (tempfile::TempDir, PathBuf, Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let more = format!(
        "{extra}\n[regions.dr]\nkind = \"fs\"\npath = \"store-dr\"\n[regions.arch]\nkind = \"fs\"\npath = \"store-arch\"\ntier = \"archive\"\nmin_retention = \"1h\"\n[regions.arch2]\nkind = \"fs\"\npath = \"store-arch2\"\ntier = \"archive\"\nmin_age = \"1h\"\n"
    );
    configure(&dir, region, upload, &more);
    let d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "vol", "--size", "256M", "--region", region.name]);
    (tmp, dir, d)
}

/// Starts a copy (`snapshot copy` or `archive` with `args`); its id.
fn start_copy(d: &Daemon, args: &[&str]) -> String {
    let v = d.cli_json(args);
    let v = if v["copy"].is_object() { v["copy"].clone() } else { v };
    v["id"].as_str().unwrap_or_else(|| panic!("no copy id: {v}")).to_string()
}

/// Waits until a copy ends; its final view.
fn wait_copy(d: &Daemon, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let v = d.cli_json(&["copy", "show", id]);
        if ["done", "failed", "cancelled"].contains(&v["state"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(Instant::now() < deadline, "copy {id} still running: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn copy_done(d: &Daemon, args: &[&str]) -> Value {
    let id = start_copy(d, args);
    let v = wait_copy(d, &id);
    assert_eq!(v["state"], "done", "copy {args:?}: {v}\n{}", d.log());
    v
}

fn export_from(d: &Daemon, id: &str, region: &str, out: &Path) {
    d.cli_ok(&["snapshot", "export", id, "--region", region, "--output", &out.display().to_string()]);
}

fn verify_in(d: &Daemon, id: &str, region: &str) {
    let out = d.cli_ok(&["snapshot", "verify", id, "--region", region]);
    assert!(out.contains("ok: every object"), "verify {id} in {region}:\n{out}");
}

/// Bytes of the packs under an fs region's directory.
fn pack_bytes(store: &Path) -> u64 {
    match std::fs::read_dir(store.join("packs")) {
        Ok(entries) => entries.map(|e| e.unwrap().metadata().unwrap().len()).sum(),
        Err(_) => 0,
    }
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn a_chain_of_five_copies_sends_only_changes_and_restores_on_a_node_with_only_the_destination() {
    if !tools() {
        return;
    }
    for region in regions() {
        let (tmp, dir, d) = start(&region, "", "");
        fill(&d, "vol", 0, 16 * MIB, 1);
        let mut copies = Vec::new();
        for i in 1..=5u64 {
            if i > 1 {
                scatter(&d, "vol", 32, 100 + i);
            }
            let name = format!("s{i}");
            snapshot(&d, "vol", &name);
            let snap = format!("vol@{name}");
            let expected = tmp.path().join(format!("{name}.raw"));
            nbd_to_file(&d, &snap, &expected);
            wait_available(&d, &snap);
            let v = copy_done(&d, &["snapshot", "copy", &snap, "--to-region", "dr"]);
            let sent = u(&v, "bytes_sent");
            let changed = if i == 1 { 16 * MIB } else { 32 * CLUSTER };
            eprintln!("{}: copy of {snap}: {sent} bytes stored for {changed} changed", region.name);
            // Each later copy sends its changed clusters (random, incompressible) and a few
            // map pages, copy-map pairs and the manifest; never the unchanged data.
            assert!(sent >= changed, "copy of {snap} stored {sent} bytes, less than its {changed} changed: {v}");
            assert!(sent <= changed + 256 * 1024, "copy of {snap} stored {sent} bytes for {changed} changed: {v}");
            // Nor does it read the unchanged data from the source: the copy map knows it.
            let read = u(&v, "bytes_read");
            assert!(read <= changed + 256 * 1024, "copy of {snap} read {read} bytes for {changed} changed: {v}");
            let id = v["dest_id"].as_str().unwrap().to_string();
            let out = tmp.path().join(format!("{name}.copy"));
            export_from(&d, &id, "dr", &out);
            compare(&expected, &out);
            copies.push((id, expected));
        }
        let listed = d.cli_json(&["snapshot", "list", "--region", "dr"]);
        let (last_id, last_expected) = copies.last().unwrap();
        let row = listed.as_array().unwrap().iter().find(|s| s["id"] == last_id.as_str()).unwrap().clone();
        assert_eq!(row["name"], "s5");
        assert_eq!(row["source_region"], region.name, "{row}");
        verify_in(&d, last_id, "dr");

        // A snapshot of a clone: its first copy finds the data in the destination already.
        d.cli_ok(&["volume", "clone", "vol@s5", "c"]);
        scatter(&d, "c", 4, 7);
        snapshot(&d, "c", "x");
        wait_available(&d, "c@x");
        let v = copy_done(&d, &["snapshot", "copy", "c@x", "--to-region", "dr", "--name", "x-dr"]);
        assert!(u(&v, "bytes_sent") <= 4 * CLUSTER + 256 * 1024, "the clone's first copy re-sent shared data: {v}");

        // A node with only the destination region (and its key file) restores the copy.
        let key = d.cli_ok(&["key", "export", "dr"]);
        let b_dir = tmp.path().join("b");
        std::fs::create_dir_all(&b_dir).unwrap();
        write_key_file(&b_dir.join("keys/dr.key"), key);
        std::fs::write(
            b_dir.join("snapblk.toml"),
            format!("[regions.dr]\nkind = \"fs\"\npath = \"{}\"\n", dir.join("store-dr").display()),
        )
        .unwrap();
        let b = Daemon::start(&b_dir);
        b.cli_ok(&["volume", "create", "r5", "--from-snapshot", last_id, "--region", "dr"]);
        hydrate_wait(&b, "r5");
        let restored = tmp.path().join("r5.raw");
        nbd_to_file(&b, "r5", &restored);
        compare(last_expected, &restored);
    }
}

#[test]
fn copies_are_sealed_under_the_destination_key_share_no_blob_ids_and_read_local_data() {
    if !tools() {
        return;
    }
    let region = &regions()[0];
    // Snapshots keep their local data an hour: the copy reads it there, not from the store.
    let (tmp, dir, d) = start(region, "instant_access_retention = \"1h\"", "");
    fill(&d, "vol", 0, 8 * MIB, 3);
    snapshot(&d, "vol", "s1");
    let expected = tmp.path().join("s1.raw");
    nbd_to_file(&d, "vol@s1", &expected);
    wait_available(&d, "vol@s1");
    let v = copy_done(&d, &["snapshot", "copy", "vol@s1", "--to-region", "dr", "--bandwidth-limit", "64M"]);
    assert_eq!(u(&v, "bytes_read"), 0, "a snapshot with local data was read from the store: {v}");
    let id = v["dest_id"].as_str().unwrap().to_string();
    let out = tmp.path().join("s1.copy");
    export_from(&d, &id, "dr", &out);
    compare(&expected, &out);
    drop(d);

    use snapblk::store::crypto;
    let open = |name: &str, path: &str| {
        let (kek, _) = crypto::load_or_create_kek(&dir.join(format!("keys/{name}.key"))).unwrap();
        let wrapped = std::fs::read(dir.join(path).join("keys/repository")).unwrap();
        (kek, wrapped)
    };
    let (src_kek, src_wrapped) = open("local", "store");
    let (dst_kek, dst_wrapped) = open("dr", "store-dr");
    let key_file = dir.join("keys/x.key");
    assert!(
        crypto::unwrap_master(&src_kek, &dst_wrapped, "dr", &key_file).is_err(),
        "source key opens the destination"
    );
    assert!(
        crypto::unwrap_master(&dst_kek, &src_wrapped, "local", &key_file).is_err(),
        "destination key opens the source"
    );
    let (src_master, src_cipher) = crypto::unwrap_master(&src_kek, &src_wrapped, "local", &key_file).unwrap();
    let src_keys = crypto::RepoKeys::new(&src_master, src_cipher);
    let sealed = std::fs::read(dir.join("store-dr/snapshots").join(&id)).unwrap();
    assert!(
        snapblk::store::format::Manifest::open(&src_keys, &sealed, &id).is_err(),
        "the copy's manifest opens with the source repository's keys"
    );
    // The same data has different blob ids in the two repositories.
    let index = |name: &str| -> std::collections::HashSet<_> {
        let idx = snapblk::store::index::BlobIndex::open(&dir.join(format!("meta/store/{name}.index"))).unwrap();
        idx.blob_ids().into_iter().collect()
    };
    let (src_ids, dst_ids) = (index("local"), index("dr"));
    assert!(src_ids.len() >= 128 && dst_ids.len() >= 128, "{} and {} blobs indexed", src_ids.len(), dst_ids.len());
    assert!(src_ids.is_disjoint(&dst_ids), "a blob id is shared between the two repositories");
}

#[test]
fn a_copy_killed_mid_way_resumes_without_resending_and_a_cancelled_one_publishes_nothing() {
    if !tools() {
        return;
    }
    for region in regions() {
        let (tmp, dir, mut d) = start(&region, "", "");
        fill(&d, "vol", 0, 24 * MIB, 5);
        snapshot(&d, "vol", "s1");
        let expected = tmp.path().join("s1.raw");
        nbd_to_file(&d, "vol@s1", &expected);
        wait_available(&d, "vol@s1");
        // 24 MiB at 4 MiB/s: killed once a third is stored.
        let id = start_copy(&d, &["snapshot", "copy", "vol@s1", "--to-region", "dr", "--bandwidth-limit", "4M"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = d.cli_json(&["copy", "show", &id]);
            assert_eq!(v["state"], "running", "finished before the kill: {v}");
            if u(&v, "bytes_sent") >= 8 * MIB {
                break;
            }
            assert!(Instant::now() < deadline, "copy made no progress: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let stored_before = pack_bytes(&dir.join("store-dr"));
        d.kill9();
        let d2 = Daemon::start(&dir);
        assert!(d2.log().contains("resuming copy"), "no resume in the log");
        let v = wait_copy(&d2, &id);
        assert_eq!(v["state"], "done", "{v}");
        let stored = pack_bytes(&dir.join("store-dr"));
        eprintln!("{}: {stored_before} bytes of packs before kill -9, {stored} after the resume", region.name);
        // Resent at most the packs in flight at the kill (4 x 1 MiB) and the one being filled.
        assert!(stored <= 24 * MIB + 6 * MIB, "the resumed copy re-sent stored packs: {stored} bytes of packs");
        let dest = v["dest_id"].as_str().unwrap().to_string();
        verify_in(&d2, &dest, "dr");
        let out = tmp.path().join("s1.copy");
        export_from(&d2, &dest, "dr", &out);
        compare(&expected, &out);

        // A cancelled copy stops and publishes nothing.
        fill(&d2, "vol", 32 * MIB, 16 * MIB, 6);
        snapshot(&d2, "vol", "s2");
        wait_available(&d2, "vol@s2");
        let id = start_copy(&d2, &["snapshot", "copy", "vol@s2", "--to-region", "dr", "--bandwidth-limit", "2M"]);
        std::thread::sleep(Duration::from_millis(1500));
        d2.cli_ok(&["copy", "cancel", &id]);
        let v = wait_copy(&d2, &id);
        assert_eq!(v["state"], "cancelled", "{v}");
        let listed = d2.cli_json(&["snapshot", "list", "--region", "dr"]);
        assert!(
            !listed.as_array().unwrap().iter().any(|s| s["name"] == "s2"),
            "a cancelled copy was published: {listed}"
        );
        let (code, err) = d2.cli_err(&["copy", "cancel", &id]);
        assert_ne!(code, 0);
        assert!(err.contains("cancelled already"), "{err}");
    }
}

#[test]
fn copies_complete_through_injected_faults_and_a_corrupt_source_fails_naming_the_object() {
    if !tools() {
        return;
    }
    for region in regions() {
        let faults = |name: &str| format!("[regions.{name}.faults]\nerror_rate = 0.1\ntruncate_rate = 0.1\n");
        let (tmp, dir, d) = start(&region, "", "");
        drop(d);
        // 10 % of requests fail (or come back short) on both sides.
        let text = std::fs::read_to_string(dir.join("snapblk.toml")).unwrap();
        std::fs::write(dir.join("snapblk.toml"), format!("{text}\n{}\n{}", faults(region.name), faults("dr"))).unwrap();
        let d = Daemon::start(&dir);
        fill(&d, "vol", 0, 8 * MIB, 9);
        snapshot(&d, "vol", "s1");
        let expected = tmp.path().join("s1.raw");
        nbd_to_file(&d, "vol@s1", &expected);
        wait_available(&d, "vol@s1");
        let v = copy_done(&d, &["snapshot", "copy", "vol@s1", "--to-region", "dr"]);
        let dest = v["dest_id"].as_str().unwrap().to_string();
        verify_in(&d, &dest, "dr");
        let out = tmp.path().join("s1.copy");
        export_from(&d, &dest, "dr", &out);
        compare(&expected, &out);
        let retries = region_show(&d, "dr")["metrics"]["retries"].as_u64().unwrap();
        assert!(retries > 0, "faults at 10% caused no retries in dr");
    }

    // A flipped byte in a source pack: the copy fails naming it; nothing is published.
    let region = &regions()[0];
    let (_tmp, dir, d) = start(region, "", "");
    fill(&d, "vol", 0, 2 * MIB, 12);
    snapshot(&d, "vol", "s1");
    wait_available(&d, "vol@s1");
    for pack in std::fs::read_dir(dir.join("store/packs")).unwrap() {
        let path = pack.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 3;
        bytes[at] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
    }
    let id = start_copy(&d, &["snapshot", "copy", "vol@s1", "--to-region", "dr"]);
    let v = wait_copy(&d, &id);
    assert_eq!(v["state"], "failed", "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("packs/") && error.contains("corrupt"), "the error does not name the object: {error}");
    let listed = d.cli_json(&["snapshot", "list", "--region", "dr"]);
    assert!(listed.as_array().unwrap().is_empty(), "a copy of a corrupt source was published: {listed}");
}

#[test]
fn archives_deduplicate_keep_their_minimum_retention_match_their_estimate_and_restore() {
    if !tools() {
        return;
    }
    for region in regions() {
        let (tmp, dir, d) = start(&region, "", "");
        fill(&d, "vol", 0, 16 * MIB, 21);
        let mut archived = Vec::new();
        for i in 1..=4u64 {
            if i > 1 {
                scatter(&d, "vol", 16, 200 + i);
            }
            let name = format!("s{i}");
            let snap = format!("vol@{name}");
            snapshot(&d, "vol", &name);
            let expected = tmp.path().join(format!("{name}.raw"));
            nbd_to_file(&d, &snap, &expected);
            wait_available(&d, &snap);
            let est = d.cli_json(&["snapshot", "archive", &snap, "--to-region", "arch", "--estimate"]);
            let estimate = u(&est, "archive_bytes_added");
            let freed = u(&est, "standard_bytes_freed");
            let before = pack_bytes(&dir.join("store-arch"));
            let v = copy_done(&d, &["snapshot", "archive", &snap, "--to-region", "arch"]);
            let sent = u(&v, "bytes_sent");
            let added = pack_bytes(&dir.join("store-arch")) - before;
            eprintln!("{}: archive of {snap}: estimate {estimate}, sent {sent}, packs +{added}, standard freed (estimate) {freed}", region.name);
            let off = (estimate as f64 - sent as f64).abs() / sent as f64;
            assert!(off <= 0.05, "estimate {estimate} vs actual {sent} for {snap}: {:.1}% off", off * 100.0);
            assert!(freed > 0, "archiving {snap} would free nothing: {est}");
            assert!(v["note"].as_str().unwrap_or("").contains("standard copy deleted"), "{v}");
            archived.push((v["dest_id"].as_str().unwrap().to_string(), expected));
        }
        // Incremental-forever: the first archive's data once, then only each one's changes.
        let stored = pack_bytes(&dir.join("store-arch"));
        let info = region_show(&d, "arch");
        assert_eq!((info["tier"].as_str(), info["stored_bytes"].as_u64()), (Some("archive"), Some(stored)), "{info}");
        assert_eq!(region_show(&d, "dr")["tier"], "standard");
        assert!(stored <= 16 * MIB + 3 * 16 * CLUSTER + 2 * MIB, "4 archives of a 16 MiB disk store {stored} bytes");
        // The standard copies are gone.
        let local = d.cli_json(&["snapshot", "list", "vol"]);
        assert!(local.as_array().unwrap().is_empty(), "archived snapshots still listed here: {local}");

        // Minimum retention: refused, then forced (and the event says so).
        let (first, _) = &archived[0];
        let (code, err) = d.cli_err(&["snapshot", "delete", first, "--region", "arch"]);
        assert_eq!(code, 5, "{err}");
        assert!(err.contains("minimum retention"), "{err}");
        d.cli_ok(&["snapshot", "delete", first, "--region", "arch", "--force"]);
        let events = d.cli_ok(&["events"]);
        assert!(events.contains("stored snapshot deleted") && events.contains("before_retention"), "{events}");

        // Restore from the archive, and a copy of an archived snapshot to another region.
        let (last, expected) = archived.last().unwrap();
        d.cli_ok(&["volume", "create", "back", "--from-snapshot", last, "--region", "arch"]);
        hydrate_wait(&d, "back");
        let restored = tmp.path().join("back.raw");
        nbd_to_file(&d, "back", &restored);
        compare(expected, &restored);
        let v = copy_done(&d, &["snapshot", "copy", last, "--from-region", "arch", "--to-region", "dr"]);
        let out = tmp.path().join("dr.raw");
        export_from(&d, v["dest_id"].as_str().unwrap(), "dr", &out);
        compare(expected, &out);

        // A region with min_age refuses young snapshots; a standard region refuses archives.
        snapshot(&d, "vol", "young");
        wait_available(&d, "vol@young");
        let (_, err) = d.cli_err(&["snapshot", "archive", "vol@young", "--to-region", "arch2"]);
        assert!(err.contains("min_age"), "{err}");
        let (_, err) = d.cli_err(&["snapshot", "archive", "vol@young", "--to-region", "dr"]);
        assert!(err.contains("not an archive region"), "{err}");
    }
}

#[test]
fn a_policy_copies_each_snapshot_and_archives_its_old_ones() {
    if !tools() {
        return;
    }
    let region = &regions()[0];
    let (_tmp, _dir, d) = start(region, "", "");
    fill(&d, "vol", 0, 4 * MIB, 31);
    let (code, err) = d.cli_err(&["policy", "create", "bad", "--every", "1s", "--keep-last", "5", "--copy-to", "arch"]);
    assert_ne!(code, 0);
    assert!(err.contains("archive region"), "{err}");
    d.cli_ok(&[
        "policy",
        "create",
        "p",
        "--every",
        "1s",
        "--keep-last",
        "50",
        "--copy-to",
        "dr",
        "--archive-after",
        "4s",
        "--archive-to",
        "arch",
    ]);
    d.cli_ok(&["policy", "apply", "p", "vol"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (copied, archived) = loop {
        let copies = d.cli_json(&["copy", "list"]);
        let done = |kind: &str| {
            copies.as_array().unwrap().iter().filter(|c| c["kind"] == kind && c["state"] == "done").count()
        };
        if done("copy") >= 3 && done("archive") >= 2 {
            break (done("copy"), done("archive"));
        }
        assert!(Instant::now() < deadline, "the policy's copies did not happen: {copies}");
        std::thread::sleep(Duration::from_millis(250));
    };
    d.cli_ok(&["policy", "delete", "p"]);
    eprintln!("{copied} copies and {archived} archives by the policy");
    let in_dr = d.cli_json(&["snapshot", "list", "--region", "dr"]);
    assert!(in_dr.as_array().unwrap().len() >= 3, "{in_dr}");
    // Archived snapshots left this node (their standard copies were deleted).
    let arch = d.cli_json(&["snapshot", "list", "--region", "arch"]);
    let local = d.cli_json(&["snapshot", "list", "vol"]);
    for a in arch.as_array().unwrap() {
        assert!(
            !local.as_array().unwrap().iter().any(|s| s["id"] == a["source_id"]),
            "archived {} still here: {local}",
            a["source_id"]
        );
    }
}

/// `[regions.cold]`: an archive region of the kind under test (the fs kind, or Garage under
/// a prefix of its own) with `region_extra` lines.
fn cold_region(region: &TestRegion, region_extra: &str) -> String {
    let block = match region.name {
        "local" => "[regions.cold]\nkind = \"fs\"\npath = \"store-cold\"\n".to_string(),
        _ => format!(
            "{}\nprefix = \"c-{:016x}/\"\n",
            region.block.trim_end().replace("[regions.garage]", "[regions.cold]"),
            rand_u64()
        ),
    };
    format!("{block}tier = \"archive\"\n{region_extra}\n")
}

/// Archives `vol@s1` (8 MiB of data) into `cold`: its id there and the expected content.
fn archive_one(d: &Daemon, tmp: &Path) -> (String, PathBuf) {
    fill(d, "vol", 0, 8 * MIB, 41);
    snapshot(d, "vol", "s1");
    let expected = tmp.join("s1.raw");
    nbd_to_file(d, "vol@s1", &expected);
    wait_available(d, "vol@s1");
    let v = copy_done(d, &["snapshot", "archive", "vol@s1", "--to-region", "cold"]);
    (v["dest_id"].as_str().unwrap().to_string(), expected)
}

#[test]
fn a_snapshot_archived_in_a_class_that_needs_a_thaw_loads_once_restore_archive_made_it_readable() {
    if !tools() {
        return;
    }
    for region in regions() {
        // Packs of `cold` behave as S3 DEEP_ARCHIVE ones: unreadable until a restore was
        // requested and 2 s passed (a fault layer around the real store).
        let cold = cold_region(&region, "storage_class = \"DEEP_ARCHIVE\"\n[regions.cold.faults]\nthaw_seconds = 2");
        let (tmp, _dir, d) = start(&region, "", &cold);
        let (id, expected) = archive_one(&d, tmp.path());

        // A volume from it is created at once; its reads fail saying what to do, and its
        // background load keeps trying.
        d.cli_ok(&["volume", "create", "back", "--from-snapshot", &id, "--region", "cold"]);
        let read = common::run(
            std::process::Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 64k", &d.nbd_uri("back")]),
            Duration::from_secs(60),
        );
        let said = format!("{}{}", common::text(&read.stdout), common::text(&read.stderr));
        assert!(said.contains("Input/output error"), "a read of a frozen snapshot: {said}");
        let sentence = format!("snapshot {id} is archived in DEEP_ARCHIVE and not restored: run `snapblk snapshot restore-archive {id} --region cold`");
        assert!(d.log().contains(&sentence), "no restore-archive sentence in the log:\n{}", d.log());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let h = hydration(&d, "back");
            if h["last_error"].as_str().is_some_and(|e| e.contains(&sentence)) {
                assert_eq!(h["state"], "retrying", "{h}");
                break;
            }
            assert!(Instant::now() < deadline, "hydration does not say what to do: {h}");
            std::thread::sleep(Duration::from_millis(200));
        }

        // Listing needs no thaw (manifests are standard); the region's accounting reads map
        // pages, which are in packs: it says why it is missing.
        let listed = d.cli_json(&["snapshot", "list", "--region", "cold"]);
        assert!(listed.as_array().unwrap().iter().any(|s| s["id"] == id.as_str()), "{listed}");
        let info = region_show(&d, "cold");
        assert!(info["stored_bytes"].as_u64().unwrap() > 8 * MIB, "{info}");
        assert!(info["accounting_error"].as_str().unwrap_or("").contains("restore-archive"), "{info}");

        // An export (and a copy) fails with the same sentence.
        let out = tmp.path().join("frozen.raw").display().to_string();
        let (_, err) = d.cli_err(&["snapshot", "export", &id, "--region", "cold", "--output", &out]);
        assert!(err.contains(&format!("snapshot {id} is archived in DEEP_ARCHIVE and not restored")), "{err}");
        let v =
            wait_copy(&d, &start_copy(&d, &["snapshot", "copy", &id, "--from-region", "cold", "--to-region", "dr"]));
        assert_eq!(v["state"], "failed", "{v}");
        assert!(v["error"].as_str().unwrap_or("").contains(&sentence), "{v}");

        // A standard region is refused with a sentence.
        let (code, err) = d.cli_err(&["snapshot", "restore-archive", &id, "--region", "dr"]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("not an archive region"), "{err}");

        // The first request thaws the packs of its map pages (the data packs are known once
        // those are readable); asking again while they thaw requests nothing more.
        let started = Instant::now();
        let r = d.cli_json(&["snapshot", "restore-archive", &id, "--region", "cold", "--days", "1"]);
        eprintln!("{}: first restore-archive: {r}", region.name);
        assert_eq!((r["ready"].as_bool(), r["complete"].as_bool()), (Some(false), Some(false)), "{r}");
        assert!(u(&r, "in_progress") >= 1 && u(&r, "requested") == u(&r, "in_progress"), "{r}");
        assert_eq!((u(&r, "frozen"), u(&r, "readable"), r["storage_class"].as_str()), (0, 0, Some("DEEP_ARCHIVE")));
        let again = d.cli_json(&["snapshot", "restore-archive", &id, "--region", "cold", "--days", "1"]);
        assert_eq!(u(&again, "requested"), 0, "{again}");
        let text = d.cli_ok(&["snapshot", "restore-archive", &id, "--region", "cold"]);
        assert!(text.contains("not ready") && text.contains("in progress"), "{text}");

        // --wait goes on to the data packs and returns once all are readable.
        let r = d.cli_json(&["snapshot", "restore-archive", &id, "--region", "cold", "--days", "1", "--wait"]);
        let took = started.elapsed();
        eprintln!("{}: restore-archive --wait: {r} ({took:?} after the first request)", region.name);
        assert_eq!((r["ready"].as_bool(), r["complete"].as_bool()), (Some(true), Some(true)), "{r}");
        assert_eq!(u(&r, "readable"), u(&r, "objects"), "{r}");
        assert!(u(&r, "objects") >= 8, "8 MiB in 1 MiB packs: {r}");
        assert!(u(&r, "requested") >= 1, "the data packs were requested by --wait: {r}");
        let expiry = u(&r, "earliest_expiry");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(expiry > now + 86_000 && expiry <= now + 86_400 + 60, "readable for a day: {expiry} (now {now})");

        // The volume loads by itself now, and holds the archived data.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !hydration(&d, "back").is_null() {
            assert!(Instant::now() < deadline, "still loading: {}", hydration(&d, "back"));
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("{}: loaded {:?} after the first restore request", region.name, started.elapsed());
        let restored = tmp.path().join("back.raw");
        nbd_to_file(&d, "back", &restored);
        compare(&expected, &restored);
    }
}

#[test]
fn restore_archive_on_a_store_without_a_thaw_says_its_objects_are_readable() {
    if !tools() {
        return;
    }
    for region in regions() {
        // The fs kind, or Garage: a real S3 HEAD of each pack (no class header), no emulation.
        let (tmp, _dir, d) = start(&region, "", &cold_region(&region, ""));
        let (id, _) = archive_one(&d, tmp.path());
        let r = d.cli_json(&["snapshot", "restore-archive", &id, "--region", "cold"]);
        eprintln!("{}: {r}", region.name);
        assert_eq!((r["ready"].as_bool(), r["complete"].as_bool()), (Some(true), Some(true)), "{r}");
        assert_eq!((u(&r, "not_needed"), u(&r, "requested")), (u(&r, "objects"), 0), "{r}");
        assert!(u(&r, "objects") >= 8, "{r}");
        let text = d.cli_ok(&["snapshot", "restore-archive", &id, "--region", "cold"]);
        assert!(text.contains("no object needs a thaw"), "{text}");
        let (code, err) = d.cli_err(&["snapshot", "restore-archive", "s-0123456789abcdef", "--region", "cold"]);
        assert_eq!(code, 4, "{err}");
    }
}

/// What a real S3 server without archive classes answers to the thaw requests: Garage's HEAD
/// has no `x-amz-storage-class` (readable, no thaw needed), and its answer to a restore
/// request (RestoreObject) is an error saying the store has none.
#[test]
fn garage_answers_the_thaw_requests_as_a_store_without_archive_classes() {
    let Some(garage) = regions().into_iter().find(|r| r.name == "garage") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let text = format!("{}\nprefix = \"t-{:016x}/\"\nretries = 1\n", garage.block.trim_end(), rand_u64());
    let config = snapblk::store::Config::parse(&text, tmp.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let objects = snapblk::store::objects::Objects::open(&config.regions["garage"], None).unwrap();
        let key = "packs/00112233445566778899aabbccddeeff";
        objects.put(key, bytes::Bytes::from_static(b"a pack")).await.unwrap();
        let state = objects.thaw_state(key).await.unwrap();
        assert_eq!(state, snapblk::store::s3::Thaw::NotNeeded);
        let missing = objects.thaw_state("packs/ffffffffffffffffffffffffffffffff").await;
        assert!(matches!(missing, Err(snapblk::store::StoreError::Missing(_))), "{missing:?}");
        let restore = objects.restore(key, 1, snapblk::store::s3::ThawTier::Standard).await;
        eprintln!("garage: HEAD: {state:?}; restore request: {restore:?}");
        let err = restore.expect_err("Garage has no RestoreObject").to_string();
        assert!(err.contains("the store has no restore request"), "{err}");
        objects.delete(key).await.unwrap();
    });
}
