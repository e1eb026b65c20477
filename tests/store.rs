//! The remote store suite: every test runs against the local filesystem region and, when
//! scripts/test has started one (`SNAPBLK_GARAGE_REGION` names its region block), against a
//! real Garage S3 server on loopback. With `SNAPBLK_REQUIRE_GARAGE=1` a missing Garage fails.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::store::*;
use common::{control_http, ok, Daemon};
use serde_json::Value;

#[test]
fn incremental_upload_sends_only_the_changed_clusters() {
    if !tools() {
        return;
    }
    for region in regions() {
        let (_tmp, _dir, d) = start_with_volume(&region, "", "1G");
        fill(&d, "vol", 0, 64 * MIB, 1);
        snapshot(&d, "vol", "s1");
        let s1 = wait_available(&d, "vol@s1");
        let full = s1["upload"]["added_bytes"].as_u64().unwrap();
        // Random data does not compress: the first upload sends all 64 MiB (plus a little).
        assert!((64 * MIB..66 * MIB).contains(&full), "{}: first upload added {full} bytes", region.name);
        let before = region_show(&d, region.name);

        let n = 40;
        scatter(&d, "vol", n, 2);
        // `--wait --json`: JSON progress lines, then the snapshot once its upload ended.
        let out = d.cli_ok(&["--json", "snapshot", "create", "vol", "--name", "s2", "--wait"]);
        let (progress, last) = out.split_at(out.find("\n{\n").map_or(0, |i| i + 1));
        assert!(
            progress.lines().all(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["progress"].is_string())),
            "{out}"
        );
        let last: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(last["upload"]["state"], "available", "{out}");
        let s2 = wait_available(&d, "vol@s2");
        let after = region_show(&d, region.name);
        let added = s2["upload"]["added_bytes"].as_u64().unwrap();
        let put = after["metrics"]["put_bytes"].as_u64().unwrap() - before["metrics"]["put_bytes"].as_u64().unwrap();
        let stored = after["stored_bytes"].as_u64().unwrap() - before["stored_bytes"].as_u64().unwrap();
        let data = n * CLUSTER;
        eprintln!(
            "{}: {n} changed clusters = {data} bytes; upload added {added}, PUT {put}, store grew {stored}",
            region.name
        );
        // About N clusters (each sealed: +41 bytes), plus the rewritten map pages (<= 4 pages
        // of at most 4096 * 64 bytes) and the manifest: nowhere near the 1 GiB volume.
        for (what, v) in [("added", added), ("PUT", put), ("store growth", stored)] {
            assert!(v >= data, "{}: {what} {v} < {data}", region.name);
            assert!(v < data + 1200 * 1024, "{}: {what} {v} is far more than {n} clusters", region.name);
        }
        assert_eq!(s2["upload"]["base"], s1["id"], "s2 is incremental to s1");
        verify_ok(&d, "vol@s2");
    }
}

#[test]
fn identical_clusters_in_one_snapshot_are_stored_once_and_read_back() {
    if !tools() {
        return;
    }
    for region in regions() {
        let (tmp, _dir, d) = start_with_volume(&region, "", "1G");
        // One random cluster 24 times: side by side (sealed in the same job) and spread out
        // (other jobs, another map page); 64 distinct random clusters; a compressible
        // pattern 32 times; zeros written over data.
        for i in 0..12 {
            fill(&d, "vol", i * CLUSTER, CLUSTER, 5);
            fill(&d, "vol", 300 * MIB + i * 7 * CLUSTER, CLUSTER, 5);
        }
        fill(&d, "vol", 64 * MIB, 4 * MIB, 6);
        fill(&d, "vol", 130 * MIB, MIB, 7);
        common::qemu_io(&d.nbd_uri("vol"), &["write -P 0x5a 128M 2M", "write -z 130M 1M"]);
        snapshot(&d, "vol", "s1");
        let local = tmp.path().join("s1.nbd");
        nbd_to_file(&d, "vol@s1", &local);
        let s1 = wait_available(&d, "vol@s1");
        let added = s1["upload"]["added_bytes"].as_u64().unwrap();
        // 65 distinct random clusters (+41 bytes each sealed), one small compressed blob, two
        // map pages (< 100 entries each) and the pack index: one more copy of a random
        // cluster would not fit.
        let unique = 65 * (CLUSTER + 41);
        assert!((unique..unique + 48 * 1024).contains(&added), "{}: upload added {added} bytes", region.name);
        verify_ok(&d, "vol@s1");
        let out = tmp.path().join("s1.export");
        export(&d, "vol@s1", &out);
        compare(&local, &out);
    }
}

#[test]
fn exports_from_the_store_equal_the_instant_access_exports_over_a_chain_of_five() {
    if !tools() {
        return;
    }
    for region in regions() {
        let (tmp, _dir, d) = start_with_volume(&region, "", "256M");
        let mut local = Vec::new();
        for i in 0..5u64 {
            fill(&d, "vol", i * 7 * MIB, 8 * MIB, 10 + i);
            scatter(&d, "vol", 8, 20 + i);
            if i == 3 {
                // A trim in the chain: the next snapshots must read zeros there.
                common::qemu_io(&d.nbd_uri("vol"), &["discard 0 4M"]);
            }
            let name = format!("s{i}");
            snapshot(&d, "vol", &name);
            // Instant access: read the snapshot over NBD right away (from local data).
            let path = tmp.path().join(format!("{name}.nbd"));
            nbd_to_file(&d, &format!("vol@{name}"), &path);
            local.push((name, path));
        }
        for (name, nbd) in &local {
            let snap = format!("vol@{name}");
            wait_available(&d, &snap);
            verify_ok(&d, &snap);
            let out = tmp.path().join(format!("{name}.export"));
            export(&d, &snap, &out);
            compare(nbd, &out);
            // Released after upload, the NBD export now reads from the store: still equal.
            wait_released(&d, &snap);
            let again = tmp.path().join(format!("{name}.remote"));
            nbd_to_file(&d, &snap, &again);
            compare(nbd, &again);
        }
        // qcow2 export through qemu-img.
        let q = tmp.path().join("s4.qcow2");
        d.cli_ok(&["snapshot", "export", "vol@s4", "--output", &q.display().to_string(), "--format", "qcow2"]);
        let info = ok("qemu-img", &["info", "--output=json", &q.display().to_string()]);
        assert!(info.contains("\"qcow2\""), "{info}");
        ok(
            "qemu-img",
            &["compare", "-q", "-f", "raw", "-F", "qcow2", &local[4].1.display().to_string(), &q.display().to_string()],
        );
    }
}

#[test]
fn uploads_complete_and_verify_through_injected_errors_timeouts_and_truncated_reads() {
    if !tools() {
        return;
    }
    for region in regions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let faults = format!(
            "request_timeout = \"1s\"\n[regions.{}.faults]\nerror_rate = 0.1\ntimeout_rate = 0.1\ntruncate_rate = 0.1\n",
            region.name
        );
        configure(&dir, &region, "", "");
        // The region block ends with request_timeout = "5s"; faults need a short one.
        let text = std::fs::read_to_string(dir.join("snapblk.toml")).unwrap().replace("request_timeout = \"5s\"\n", "");
        std::fs::write(dir.join("snapblk.toml"), format!("{text}{faults}")).unwrap();
        let d = Daemon::start(&dir);
        d.cli_ok(&["volume", "create", "vol", "--size", "1G", "--region", region.name]);
        fill(&d, "vol", 0, 16 * MIB, 3);
        let nbd = tmp.path().join("s1.nbd");
        snapshot(&d, "vol", "s1");
        nbd_to_file(&d, "vol@s1", &nbd);
        wait_available(&d, "vol@s1");
        scatter(&d, "vol", 20, 4);
        snapshot(&d, "vol", "s2");
        wait_available(&d, "vol@s2");
        verify_ok(&d, "vol@s1");
        verify_ok(&d, "vol@s2");
        let out = tmp.path().join("s1.export");
        export(&d, "vol@s1", &out);
        compare(&nbd, &out);
        let m = region_show(&d, region.name);
        let retries = m["metrics"]["retries"].as_u64().unwrap();
        eprintln!(
            "{}: {} retries over {} PUT and {} GET",
            region.name, retries, m["metrics"]["put_ops"], m["metrics"]["get_ops"]
        );
        assert!(retries > 0, "faults at 10% must have caused retries: {m}");
    }
}

#[test]
fn an_upload_killed_mid_way_resumes_without_resending_stored_packs() {
    if !tools() {
        return;
    }
    for region in regions() {
        // 48 MiB at 8 MiB/s: about 6 s, killed once a third of it is stored.
        let (tmp, dir, mut d) = start_with_volume(&region, "bandwidth_limit = \"8M\"", "1G");
        fill(&d, "vol", 0, 48 * MIB, 5);
        let nbd = tmp.path().join("s1.nbd");
        snapshot(&d, "vol", "s1");
        nbd_to_file(&d, "vol@s1", &nbd);
        let deadline = Instant::now() + Duration::from_secs(60);
        let sent_before = loop {
            let v = d.cli_json(&["snapshot", "show", "vol@s1"]);
            let sent = v["upload"]["bytes_sent"].as_u64().unwrap_or(0);
            if sent >= 16 * MIB {
                break sent;
            }
            assert_eq!(v["upload"]["state"], "uploading", "finished before the kill: {v}");
            assert!(Instant::now() < deadline, "upload made no progress: {v}");
            std::thread::sleep(Duration::from_millis(20));
        };
        d.kill9();
        let d = Daemon::start(&dir);
        assert!(d.log().contains("resuming upload"), "no resume in the log");
        let v = wait_available(&d, "vol@s1");
        let resent = region_show(&d, region.name)["metrics"]["put_bytes"].as_u64().unwrap();
        let total = v["upload"]["added_bytes"].as_u64().unwrap();
        eprintln!("{}: {sent_before} bytes stored before kill -9; {resent} PUT after the restart", region.name);
        // The restart sends what was missing, plus at most the packs in flight at the kill
        // (concurrency 4 x 1 MiB packs, one being built) and the map page and manifest.
        assert!(
            resent <= total - sent_before.min(total) + 6 * MIB,
            "the resumed upload re-sent stored packs: {resent} bytes after the restart, {sent_before} stored before, {total} in all"
        );
        verify_ok(&d, "vol@s1");
        let out = tmp.path().join("s1.export");
        export(&d, "vol@s1", &out);
        compare(&nbd, &out);
    }
}

/// A store that fails every request part-way through an upload: the upload ends `failed`
/// (not stuck `uploading`) naming the region, its manifest is not written, and a retry once
/// the store is back completes it without sending the stored packs again.
#[test]
fn an_upload_whose_store_fails_mid_way_is_marked_failed_and_a_retry_completes_it() {
    if !tools() {
        return;
    }
    for region in regions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let outage = tmp.path().join("outage");
        let faults = format!("retries = 2\n[regions.{}.faults]\noutage_file = \"{}\"", region.name, outage.display());
        configure(&dir, &region, "bandwidth_limit = \"8M\"", &faults);
        let d = Daemon::start(&dir);
        d.cli_ok(&["volume", "create", "vol", "--size", "1G", "--region", region.name]);
        fill(&d, "vol", 0, 32 * MIB, 8);
        let id = snapshot(&d, "vol", "s1")["id"].as_str().unwrap().to_string();
        let nbd = tmp.path().join("s1.nbd");
        nbd_to_file(&d, "vol@s1", &nbd);
        let deadline = Instant::now() + Duration::from_secs(60);
        let stored = loop {
            let v = d.cli_json(&["snapshot", "show", "vol@s1"]);
            let sent = v["upload"]["bytes_sent"].as_u64().unwrap_or(0);
            if sent >= 4 * MIB {
                break sent;
            }
            assert_eq!(v["upload"]["state"], "uploading", "finished before the outage: {v}");
            assert!(Instant::now() < deadline, "upload made no progress: {v}");
            std::thread::sleep(Duration::from_millis(20));
        };
        std::fs::write(&outage, "").unwrap();
        let v = wait_upload(&d, "vol@s1", Duration::from_secs(60));
        assert_eq!(v["upload"]["state"], "failed", "{}: {v}", region.name);
        let reason = v["upload"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(&format!("region '{}'", region.name)), "{}: {reason}", region.name);

        std::fs::remove_file(&outage).unwrap();
        let listed = d.cli_json(&["snapshot", "list", "--region", region.name]);
        assert!(!listed.as_array().unwrap().iter().any(|s| s["id"] == id.as_str()), "published: {listed}");
        let before = region_show(&d, region.name)["metrics"]["put_bytes"].as_u64().unwrap();
        d.cli_ok(&["snapshot", "upload", "vol@s1"]);
        wait_available(&d, "vol@s1");
        let put = region_show(&d, region.name)["metrics"]["put_bytes"].as_u64().unwrap() - before;
        eprintln!("{}: {stored} bytes stored before the outage; the retry PUT {put}", region.name);
        assert!(put < 33 * MIB - stored, "{}: the retry sent stored packs again ({put} bytes)", region.name);
        verify_ok(&d, "vol@s1");
        let out = tmp.path().join("s1.export");
        export(&d, "vol@s1", &out);
        compare(&nbd, &out);
    }
}

/// The region's objects, through snapblk's own object layer (same config as the daemon).
fn objects(dir: &Path, region: &str) -> (tokio::runtime::Runtime, snapblk::store::objects::Objects) {
    let text = std::fs::read_to_string(dir.join("snapblk.toml")).unwrap();
    let cfg = snapblk::store::Config::parse(&text, dir).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let o = snapblk::store::objects::Objects::open(&cfg.regions[region], None).unwrap();
    (rt, o)
}

#[test]
fn a_flipped_byte_fails_verify_naming_the_object_and_export_fails_loudly() {
    if !tools() {
        return;
    }
    for region in regions() {
        let (tmp, dir, d) = start_with_volume(&region, "", "64M");
        fill(&d, "vol", 0, 4 * MIB, 6);
        snapshot(&d, "vol", "s1");
        wait_available(&d, "vol@s1");
        wait_released(&d, "vol@s1");
        verify_ok(&d, "vol@s1");
        let (rt, o) = objects(&dir, region.name);
        let packs = rt.block_on(o.list("packs")).unwrap();
        // The largest pack holds data blobs; flip one byte in the middle of it.
        let victim = packs.iter().max_by_key(|p| p.size).unwrap().key.clone();
        let mut bytes = rt.block_on(o.get(&victim)).unwrap().to_vec();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        rt.block_on(o.put(&victim, bytes)).unwrap();

        let (code, err) = d.cli_err(&["snapshot", "verify", "vol@s1"]);
        let out = String::from_utf8_lossy(&d.cli(&["snapshot", "verify", "vol@s1"]).stdout).into_owned();
        assert_eq!(code, 1);
        assert!(out.contains(&victim), "verify must name {victim}:\n{out}\n{err}");
        assert!(err.contains("problem"), "{err}");
        let target = tmp.path().join("s1.export");
        let (code, err) = d.cli_err(&["snapshot", "export", "vol@s1", "--output", &target.display().to_string()]);
        assert_eq!(code, 1);
        assert!(err.contains(&victim) && err.contains("corrupt"), "export must fail naming {victim}: {err}");
        assert!(!target.exists(), "a failed export must not leave a file behind");
        // Issue 18 §3: a failed export leaves an existing file as it was, writes nothing
        // through a symlink, and removes only the temporary files it created.
        let existing = tmp.path().join("existing.raw");
        std::fs::write(&existing, b"keep me").unwrap();
        let (code, _) = d.cli_err(&["snapshot", "export", "vol@s1", "--output", &existing.display().to_string()]);
        assert_eq!(code, 1);
        assert_eq!(std::fs::read(&existing).unwrap(), b"keep me", "a failed export changed the existing target");
        let link = tmp.path().join("link.raw");
        std::os::unix::fs::symlink(&existing, &link).unwrap();
        let (code, err) = d.cli_err(&["snapshot", "export", "vol@s1", "--output", &link.display().to_string()]);
        assert_eq!(code, 2, "refused: needs --force");
        assert!(err.contains("symbolic link") && err.contains("--force"), "{err}");
        let (code, _) =
            d.cli_err(&["snapshot", "export", "vol@s1", "--output", &link.display().to_string(), "--force"]);
        assert_eq!(code, 1);
        assert_eq!(std::fs::read(&existing).unwrap(), b"keep me", "an export wrote through a symlink");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        let (code, err) = d.cli_err(&["snapshot", "export", "vol@s1", "--output", "/dev/null"]);
        assert_eq!(code, 2, "refused: needs --force");
        assert!(err.contains("device node"), "{err}");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("snapblk-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
        // Reading the released snapshot over NBD gives an I/O error, not wrong bytes.
        let out = common::run(
            std::process::Command::new("nbdcopy")
                .args([&d.nbd_uri("vol@s1"), &tmp.path().join("x").display().to_string()]),
            Duration::from_secs(60),
        );
        assert!(!out.status.success(), "reading a corrupt snapshot over NBD must fail");
        // A missing pack is named too.
        rt.block_on(o.delete(&victim)).unwrap();
        d.cli_err(&["snapshot", "verify", "vol@s1"]);
        let out = String::from_utf8_lossy(&d.cli(&["snapshot", "verify", "vol@s1"]).stdout).into_owned();
        assert!(out.contains(&victim) && out.contains("missing"), "{out}");
    }
}

#[test]
fn gc_keeps_every_live_snapshot_whole_and_removes_deleted_data() {
    if !tools() {
        return;
    }
    for region in regions() {
        let (tmp, _dir, d) = start_with_volume(&region, "", "128M");
        let mut rng = rand_u64();
        eprintln!("{}: gc test seed {rng}", region.name);
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut live: HashMap<String, PathBuf> = HashMap::new();
        for step in 0..10 {
            let r = next();
            if live.is_empty() || r % 3 != 0 {
                fill(&d, "vol", (r % 120) * MIB, 2 * MIB, r);
                scatter(&d, "vol", 4, r + 1);
                let name = format!("s{step}");
                snapshot(&d, "vol", &name);
                let path = tmp.path().join(format!("{name}.nbd"));
                nbd_to_file(&d, &format!("vol@{name}"), &path);
                wait_available(&d, &format!("vol@{name}"));
                live.insert(name, path);
            } else {
                let mut names: Vec<_> = live.keys().cloned().collect();
                names.sort();
                let victim = names[(r as usize / 3) % names.len()].clone();
                d.cli_ok(&["snapshot", "delete", &format!("vol@{victim}")]);
                live.remove(&victim);
            }
            if step % 3 == 2 {
                let report = d.cli_json(&["gc", "--region", region.name]);
                let r = &report[0];
                assert_eq!(r["packs_young"], 0, "{r}");
                assert_eq!(r["manifests"].as_u64().unwrap(), live.len() as u64, "{r}");
                for (name, path) in &live {
                    let snap = format!("vol@{name}");
                    verify_ok(&d, &snap);
                    let out = tmp.path().join(format!("{name}.export"));
                    export(&d, &snap, &out);
                    compare(path, &out);
                    std::fs::remove_file(&out).unwrap();
                }
            }
        }
        // Delete everything: after GC nothing is left but the repository key.
        for name in live.keys() {
            d.cli_ok(&["snapshot", "delete", &format!("vol@{name}")]);
        }
        let report = d.cli_json(&["gc", "--region", region.name]);
        assert!(report[0]["packs_deleted"].as_u64().unwrap() > 0, "{report}");
        let info = region_show(&d, region.name);
        assert_eq!(info["packs"], 0, "deleted-only data must be gone: {info}");
        assert_eq!(info["snapshots"], 0, "{info}");
    }
}

#[test]
fn a_wrong_key_file_is_a_clear_error_and_a_second_daemon_can_read_the_region() {
    if !tools() {
        return;
    }
    for region in regions() {
        let tmp = tempfile::tempdir().unwrap();
        let (a_dir, b_dir, c_dir) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
        configure(&a_dir, &region, "", "");
        let a = Daemon::start(&a_dir);
        a.cli_ok(&["volume", "create", "vol", "--size", "64M", "--region", region.name]);
        fill(&a, "vol", MIB, 3 * MIB, 7);
        let snap = snapshot(&a, "vol", "s1");
        let id = snap["id"].as_str().unwrap().to_string();
        let nbd = tmp.path().join("s1.nbd");
        nbd_to_file(&a, "vol@s1", &nbd);
        wait_available(&a, "vol@s1");
        let key = a.cli_ok(&["key", "export", region.name]);

        // B shares the region and the key file: it lists and exports A's snapshot.
        let shared = |dir: &Path| {
            let text = std::fs::read_to_string(a_dir.join("snapblk.toml")).unwrap();
            std::fs::create_dir_all(dir).unwrap();
            let store = a_dir.join("store").display().to_string();
            std::fs::write(dir.join("snapblk.toml"), text.replace("path = \"store\"", &format!("path = \"{store}\"")))
                .unwrap();
        };
        shared(&b_dir);
        std::fs::create_dir_all(b_dir.join("keys")).unwrap();
        write_key_file(&b_dir.join("keys").join(format!("{}.key", region.name)), &key);
        let b = Daemon::start(&b_dir);
        let listed = b.cli_json(&["snapshot", "list", "--region", region.name]);
        assert!(listed.as_array().unwrap().iter().any(|s| s["id"] == id.as_str()), "{listed}");
        let out = tmp.path().join("b.export");
        b.cli_ok(&["snapshot", "export", &id, "--region", region.name, "--output", &out.display().to_string()]);
        compare(&nbd, &out);

        // C has another key (from `key generate`): a clear error, never garbage.
        shared(&c_dir);
        let generated = ok(common::BIN, &["key", "generate"]);
        assert!(generated.contains("snapblk-key-v1 ") && generated != key, "{generated}");
        std::fs::create_dir_all(c_dir.join("keys")).unwrap();
        write_key_file(&c_dir.join("keys").join(format!("{}.key", region.name)), generated);
        let c = Daemon::start(&c_dir);
        let (code, err) = c.cli_err(&["snapshot", "list", "--region", region.name]);
        assert_eq!(code, 1);
        assert!(err.contains("does not open region") && err.contains("key_file"), "{err}");
    }
}

#[test]
fn a_snapshot_is_usable_at_once_while_its_upload_runs() {
    if !tools() {
        return;
    }
    for region in regions() {
        // Slow uploads (2 MiB/s for 16 MiB): everything below happens while uploading.
        let (tmp, _dir, d) = start_with_volume(&region, "bandwidth_limit = \"2M\"", "64M");
        fill(&d, "vol", 0, 16 * MIB, 8);
        let before = tmp.path().join("before");
        nbd_to_file(&d, "vol", &before);
        snapshot(&d, "vol", "s1");
        let v = d.cli_json(&["snapshot", "show", "vol@s1"]);
        assert_eq!(v["upload"]["state"], "uploading", "{v}");
        // NBD read-only export, clone and rollback, all before the upload ends.
        let snap = tmp.path().join("snap");
        nbd_to_file(&d, "vol@s1", &snap);
        compare(&before, &snap);
        d.cli_ok(&["volume", "clone", "vol@s1", "copy"]);
        let copy = tmp.path().join("copy");
        nbd_to_file(&d, "copy", &copy);
        compare(&before, &copy);
        fill(&d, "vol", 0, MIB, 9);
        d.cli_ok(&["snapshot", "rollback", "vol@s1"]);
        let rolled = tmp.path().join("rolled");
        nbd_to_file(&d, "vol", &rolled);
        compare(&before, &rolled);
        let v = d.cli_json(&["snapshot", "show", "vol@s1"]);
        assert_eq!(v["upload"]["state"], "uploading", "the checks above must run during the upload: {v}");
        assert!(v["upload"]["bytes_total"].as_u64().unwrap() > 0, "{v}");
        wait_available(&d, "vol@s1");
        verify_ok(&d, "vol@s1");
    }
}

#[test]
fn gc_repacks_mostly_dead_packs_and_every_snapshot_still_restores() {
    if !tools() {
        return;
    }
    for region in regions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        configure(&dir, &region, "", "");
        let d = Daemon::start(&dir);
        // 8 MiB = 128 clusters in eight 1 MiB packs; then three quarters of the clusters are
        // rewritten and the first snapshot deleted: each old pack is about a quarter live.
        d.cli_ok(&["volume", "create", "vol", "--size", "8M", "--region", region.name]);
        fill(&d, "vol", 0, 8 * MIB, 11);
        snapshot(&d, "vol", "s1");
        wait_available(&d, "vol@s1");
        scatter(&d, "vol", 96, 12);
        snapshot(&d, "vol", "s2");
        let s2 = tmp.path().join("s2.nbd");
        nbd_to_file(&d, "vol@s2", &s2);
        wait_available(&d, "vol@s2");
        wait_released(&d, "vol@s2");
        let before = region_show(&d, region.name)["stored_bytes"].as_u64().unwrap();
        d.cli_ok(&["snapshot", "delete", "vol@s1"]);
        let report = &d.cli_json(&["gc", "--region", region.name])[0];
        eprintln!("{}: {report}", region.name);
        assert!(report["packs_repacked"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["manifests_rewritten"], 1, "{report}");
        let after = region_show(&d, region.name)["stored_bytes"].as_u64().unwrap();
        assert!(after < before * 2 / 3, "repacking must shrink the store: {before} -> {after}");
        // The next GC collects the map pages the repack replaced; then nothing is left to do.
        d.cli_json(&["gc", "--region", region.name]);
        let again = &d.cli_json(&["gc", "--region", region.name])[0];
        assert_eq!((&again["packs_deleted"], &again["packs_repacked"]), (&Value::from(0), &Value::from(0)), "{again}");
        verify_ok(&d, "vol@s2");
        let out = tmp.path().join("s2.export");
        export(&d, "vol@s2", &out);
        compare(&s2, &out);
        let remote = tmp.path().join("s2.remote");
        nbd_to_file(&d, "vol@s2", &remote);
        compare(&s2, &remote);
    }
}

#[test]
fn instant_access_retention_keeps_uploaded_snapshots_local_and_release_frees_their_data() {
    if !tools() {
        return;
    }
    for region in regions() {
        let tmp = tempfile::tempdir().unwrap();
        let (keep_dir, drop_dir) = (tmp.path().join("keep"), tmp.path().join("drop"));
        configure(&keep_dir, &region, "instant_access_retention = \"1h\"", "");
        configure(&drop_dir, &region, "", "");
        for (dir, kept) in [(&keep_dir, true), (&drop_dir, false)] {
            let d = Daemon::start(dir);
            d.cli_ok(&["volume", "create", "vol", "--size", "64M", "--region", region.name]);
            fill(&d, "vol", 0, 16 * MIB, 13);
            snapshot(&d, "vol", "s1");
            // Overwrite everything: only the snapshot still needs the first 16 MiB.
            fill(&d, "vol", 0, 16 * MIB, 14);
            wait_available(&d, "vol@s1");
            if kept {
                std::thread::sleep(Duration::from_millis(1500)); // two sweeps of the retention check
                assert_eq!(d.cli_json(&["snapshot", "show", "vol@s1"])["local"], true, "retention 1h keeps it local");
            } else {
                wait_released(&d, "vol@s1");
                // Freed slots are punched at the next commit (here: a flush).
                common::qemu_io(&d.nbd_uri("vol"), &["flush"]);
                // Its 16 MiB of slots were freed (punched): the slot file holds about the
                // volume's own 16 MiB.
                let used = ok("du", &["-sk", &dir.join("data").display().to_string()]);
                let kib: u64 = used.split_whitespace().next().unwrap().parse().unwrap();
                assert!(kib < 24 * 1024, "{}: released data still uses {kib} KiB locally", region.name);
            }
        }
    }
}

#[test]
fn background_gc_reclaims_a_deleted_snapshot_by_itself() {
    if !tools() {
        return;
    }
    for region in regions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        configure(&dir, &region, "", "");
        let text = std::fs::read_to_string(dir.join("snapblk.toml"))
            .unwrap()
            .replace("interval = \"0s\"", "interval = \"1s\"");
        std::fs::write(dir.join("snapblk.toml"), text).unwrap();
        let d = Daemon::start(&dir);
        d.cli_ok(&["volume", "create", "vol", "--size", "64M", "--region", region.name]);
        fill(&d, "vol", 0, 4 * MIB, 15);
        snapshot(&d, "vol", "s1");
        wait_available(&d, "vol@s1");
        assert!(region_show(&d, region.name)["packs"].as_u64().unwrap() > 0);
        d.cli_ok(&["snapshot", "delete", "vol@s1"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while region_show(&d, region.name)["packs"] != 0 {
            assert!(
                Instant::now() < deadline,
                "background GC did not reclaim the packs: {}",
                region_show(&d, region.name)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn a_snapshot_of_a_region_removed_from_the_config_can_still_be_deleted() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let with_other = "[regions.other]\nkind = \"fs\"\npath = \"other-store\"\n";
    std::fs::write(dir.join("snapblk.toml"), with_other).unwrap();
    let mut d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "vol", "--size", "16M", "--region", "other"]);
    fill(&d, "vol", 0, MIB, 16);
    snapshot(&d, "vol", "s1");
    wait_available(&d, "vol@s1");
    assert!(d.terminate());
    std::fs::write(dir.join("snapblk.toml"), "").unwrap();
    let d = Daemon::start(&dir);
    // New snapshots of the volume fail to upload, saying why; deleting old ones works.
    snapshot(&d, "vol", "s2");
    let v = wait_upload(&d, "vol@s2", Duration::from_secs(30));
    assert_eq!(v["upload"]["state"], "failed", "{v}");
    assert!(v["upload"]["reason"].as_str().unwrap().contains("no region named 'other'"), "{v}");
    d.cli_ok(&["snapshot", "delete", "vol@s1"]);
    d.cli_ok(&["snapshot", "delete", "vol@s2"]);
}

/// `tests/fixtures/store-v1` is a local region written by snapblk at commit 4b3ef73 (store
/// format 1: XChaCha20-Poly1305) with its key file: snapshot `v@s1` of a 1 MiB volume holding
/// 64 KiB of `data.py fill` seed 5 at 0 and 128 KiB of 0xab at 512 KiB (one stored blob, one
/// compressed blob referenced twice). It must keep restoring, and what is added to it must
/// stay format 1; a new region gets the configured cipher (format 2 by default here).
#[test]
fn format_1_regions_keep_restoring_and_new_regions_take_the_configured_cipher() {
    if !tools() {
        return;
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let store = tmp.path().join("old-store");
    copy_tree(&fixture.join("store"), &store);
    // A daemon directory with the old region (and its key file) and, optionally, a new one.
    let configure_old = |dir: &Path, fresh: &str| {
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        write_key_file(&dir.join("keys/old.key"), std::fs::read(fixture.join("old.key")).unwrap());
        let old = format!("[regions.old]\nkind = \"fs\"\npath = \"{}\"\n", store.display());
        std::fs::write(dir.join("snapblk.toml"), format!("[gc]\ninterval = \"0s\"\n\n{old}\n{fresh}")).unwrap();
    };
    configure_old(
        &dir,
        "[regions.fresh]\nkind = \"fs\"\npath = \"fresh\"\n\n\
         [regions.chacha]\nkind = \"fs\"\npath = \"chacha\"\ncipher = \"xchacha20-poly1305\"\n",
    );
    let d = Daemon::start(&dir);
    let format = |region: &str| {
        let r = region_show(&d, region);
        (r["format"].as_u64().unwrap(), r["cipher"].as_str().unwrap().to_string())
    };
    assert_eq!(format("old"), (1, "xchacha20-poly1305".to_string()));
    // New repositories: the configured cipher, else AES-256-GCM where the CPU has AES.
    let auto = snapblk::store::crypto::Cipher::for_this_cpu();
    assert_eq!(format("fresh"), (auto.version() as u64, auto.name().to_string()));
    assert_eq!(format("chacha"), (1, "xchacha20-poly1305".to_string()));

    // What v@s1 holds, written again into a local volume.
    d.cli_ok(&["volume", "create", "expect", "--size", "1M"]);
    fill(&d, "expect", 0, 64 << 10, 5);
    ok("qemu-io", &["-f", "raw", &d.nbd_uri("expect"), "-c", "write -P 0xab 512K 128K"]);
    let expect = tmp.path().join("expect.raw");
    nbd_to_file(&d, "expect", &expect);

    let id = export_from_region(&d, "old", ("name", "s1"), &tmp.path().join("s1.export"));
    compare(&expect, &tmp.path().join("s1.export"));
    d.cli_ok(&["volume", "create", "restored", "--from-snapshot", &id, "--region", "old"]);
    let restored = tmp.path().join("restored.raw");
    nbd_to_file(&d, "restored", &restored);
    compare(&expect, &restored);

    // A new snapshot into the old region: sealed in format 1, readable from its own manifest.
    d.cli_ok(&["volume", "create", "n", "--size", "4M", "--region", "old"]);
    fill(&d, "n", 0, 4 * MIB, 6);
    snapshot(&d, "n", "s");
    wait_available(&d, "n@s");
    verify_ok(&d, "n@s");
    let (live, stored) = (tmp.path().join("n.raw"), tmp.path().join("n.export"));
    nbd_to_file(&d, "n", &live);
    export(&d, "n@s", &stored);
    compare(&live, &stored);
    assert_eq!(format("old").0, 1);
    drop(d);
    // A second daemon with only the region and its key reads the new snapshot too.
    let dir2 = tmp.path().join("d2");
    configure_old(&dir2, "");
    let d2 = Daemon::start(&dir2);
    export_from_region(&d2, "old", ("volume", "n"), &tmp.path().join("n.export2"));
    compare(&live, &tmp.path().join("n.export2"));
}

/// Exports the snapshot of `region` whose `field` (of `snapshot list --region`) has the given
/// value to `out`; returns its id.
fn export_from_region(d: &Daemon, region: &str, (field, value): (&str, &str), out: &Path) -> String {
    let listed = d.cli_json(&["snapshot", "list", "--region", region]);
    let found = listed.as_array().unwrap().iter().find(|s| s[field] == value);
    let id = found.unwrap_or_else(|| panic!("no snapshot with {field} {value}: {listed}"))["id"].as_str().unwrap();
    d.cli_ok(&["snapshot", "export", id, "--region", region, "--output", &out.display().to_string()]);
    id.to_string()
}

/// Issue 18 §3: a region that holds snapblk objects but no `keys/repository` (a lost key
/// object, a wrong prefix, a transient 404) is an error naming what to do — never a new
/// repository that would make the stored snapshots unreadable.
#[test]
fn a_region_with_objects_but_no_repository_key_is_refused_not_reinitialized() {
    if !tools() {
        return;
    }
    for region in regions() {
        let (_tmp, dir, mut d) = start_with_volume(&region, "", "16M");
        fill(&d, "vol", 0, MIB, 41);
        snapshot(&d, "vol", "s1");
        wait_available(&d, "vol@s1");
        assert!(d.terminate());
        let (rt, o) = objects(&dir, region.name);
        let key = rt.block_on(o.get("keys/repository")).unwrap();
        rt.block_on(o.delete("keys/repository")).unwrap();
        let d = Daemon::start(&dir);
        let (code, err) = d.cli_err(&["region", "show", region.name]);
        assert_eq!(code, 2, "a configuration error: {err}");
        assert!(err.contains("no repository key") && err.contains("refusing"), "{err}");
        assert!(
            matches!(rt.block_on(o.get("keys/repository")), Err(snapblk::store::error::StoreError::Missing(_))),
            "a new repository key was written over a region with data"
        );
        // With the key object back, the region opens and the snapshot reads back.
        rt.block_on(o.put("keys/repository", key)).unwrap();
        verify_ok(&d, "vol@s1");
    }
}

/// Issue 18 §4: block status of a released snapshot is answered from its map pages,
/// O(extents): a 64 TiB snapshot with a few written clusters maps in moments (walking every
/// cluster took minutes).
#[test]
fn block_status_of_a_released_64_tib_snapshot_is_answered_from_its_extents() {
    if !tools() {
        return;
    }
    let region = &regions()[0];
    let (_tmp, _dir, d) = start_with_volume(region, "", "64T");
    fill(&d, "vol", 0, MIB, 51);
    fill(&d, "vol", 40 << 40, MIB, 52);
    snapshot(&d, "vol", "s1");
    wait_available(&d, "vol@s1");
    wait_released(&d, "vol@s1");
    let started = Instant::now();
    let map = common::nbd_map(&d.nbd_uri("vol@s1"), None);
    assert_eq!(common::ranges_with(&map, 0), vec![(0, MIB), (40 << 40, MIB)], "{map:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "block status took {:?}", started.elapsed());
}

/// Issue 19 §3: a snapshot offers `qemu:dirty-bitmap:<earlier snapshot>` after its local
/// data was released (default settings: seconds after it is taken), and the live volume one
/// per snapshot (changed since it) besides `dirty` — what backup tools read to copy changes.
#[test]
fn released_snapshots_keep_their_dirty_bitmaps_and_the_volume_offers_one_per_snapshot() {
    if !tools() {
        return;
    }
    let region = &regions()[0];
    let (_tmp, _dir, d) = start_with_volume(region, "", "16M");
    let uri = d.nbd_uri("vol");
    common::qemu_io(&uri, &["write -P 1 0 64k"]);
    snapshot(&d, "vol", "s1");
    common::qemu_io(&uri, &["write -P 2 2M 64k", "write -P 2 7M 64k"]);
    snapshot(&d, "vol", "s2");
    common::qemu_io(&uri, &["write -P 3 9M 4k"]);
    snapshot(&d, "vol", "s3");
    for s in ["vol@s1", "vol@s2", "vol@s3"] {
        wait_available(&d, s);
        wait_released(&d, s);
    }
    let s3 = d.nbd_uri("vol@s3");
    let changed = |uri: &str, base: &str| {
        common::ranges_with(&common::nbd_map(uri, Some(&format!("qemu:dirty-bitmap:{base}"))), 1)
    };
    assert_eq!(changed(&s3, "s1"), vec![(2 * MIB, 64 << 10), (7 * MIB, 64 << 10), (9 * MIB, 64 << 10)]);
    assert_eq!(changed(&s3, "s2"), vec![(9 * MIB, 64 << 10)]);
    // base:allocation of the released snapshot, from the store's map pages.
    let data = common::ranges_with(&common::nbd_map(&s3, None), 0);
    assert_eq!(data, vec![(0, 64 << 10), (2 * MIB, 64 << 10), (7 * MIB, 64 << 10), (9 * MIB, 64 << 10)]);
    // qemu-img map reads the bitmap too (x-dirty-bitmap: changed clusters show as not data).
    let sock = d.dir.join("nbd.sock").display().to_string();
    let opts =
        format!("driver=nbd,server.type=unix,server.path={sock},export=vol@s3,x-dirty-bitmap=qemu:dirty-bitmap:s2");
    let out = ok("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let entries: Value = serde_json::from_str(&out).unwrap();
    let dirty: Vec<(u64, u64)> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(dirty, vec![(9 * MIB, 64 << 10)], "{out}");
    // The live volume: changed since each snapshot.
    common::qemu_io(&uri, &["write -P 4 12M 4k"]);
    assert_eq!(changed(&uri, "dirty"), vec![(12 * MIB, 64 << 10)]);
    assert_eq!(changed(&uri, "s2"), vec![(9 * MIB, 64 << 10), (12 * MIB, 64 << 10)]);
    assert_eq!(
        changed(&uri, "s1"),
        vec![(2 * MIB, 64 << 10), (7 * MIB, 64 << 10), (9 * MIB, 64 << 10), (12 * MIB, 64 << 10)]
    );
}

/// A `snapshot delete` killed after it recorded its intent to delete the manifest but before
/// its local delete was durable (found by scripts/soak): the snapshot is still there after the
/// restart, so its manifest must stay — the interrupted delete is forgotten, not finished.
#[test]
fn an_interrupted_snapshot_delete_never_deletes_the_manifest_of_a_snapshot_that_is_still_there() {
    if !tools() {
        return;
    }
    let region = &regions()[0];
    let (_tmp, dir, mut d) = start_with_volume(region, "", "16M");
    fill(&d, "vol", 0, MIB, 61);
    let id = snapshot(&d, "vol", "s1")["id"].as_str().unwrap().to_string();
    wait_available(&d, "vol@s1");
    wait_released(&d, "vol@s1");
    d.kill9();
    // What the delete leaves when killed right after recording its intent.
    let state_path = dir.join("meta").join("remote.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    state["deferred_deletes"] = serde_json::json!({ id.clone(): region.name });
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    let d = Daemon::start(&dir);
    std::thread::sleep(Duration::from_millis(2500)); // the sweep runs every second
    verify_ok(&d, "vol@s1");
    let listed = d.cli_json(&["snapshot", "list", "--region", region.name]);
    assert!(listed.as_array().unwrap().iter().any(|s| s["id"] == id.as_str()), "{listed}");
}

#[test]
fn verify_progress_counts_the_bytes_it_reads() {
    if !tools() {
        return;
    }
    let region = &regions()[0]; // local
    let (_tmp, dir, d) = start_with_volume(region, "", "16M");
    fill(&d, "vol", 0, 8 * MIB, 3);
    snapshot(&d, "vol", "s1");
    wait_available(&d, "vol@s1");
    let (status, _, body) = control_http(&dir, "POST", "/v1/snapshots/vol@s1/verify", "");
    assert!(status.contains(" 20"), "{status}: {body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let (_, _, body) = control_http(&dir, "GET", &format!("/v1/jobs/{id}"), "");
        let job: Value = serde_json::from_str(&body).unwrap();
        if job["state"] != "running" {
            break job;
        }
        assert!(Instant::now() < deadline, "verify still running: {job}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(job["state"], "done", "{job}");
    let (done, total) = (job["done"].as_u64().unwrap(), job["total"].as_u64().unwrap());
    assert_eq!(done, total, "{job}");
    // 8 MiB of random data is about 8 MiB stored (it does not compress), 128 blobs of 64 KiB:
    // a count of blobs would be 128.
    assert!((7 * MIB..=9 * MIB).contains(&total), "verify's total is not its bytes: {job}");
}

/// Issue 23: snapshots created and deleted concurrently (deletes landing before, during and
/// after their uploads) while GC runs leave the region listing exactly the snapshots that
/// are still there — no stale entry, nothing missing.
#[test]
fn concurrent_creates_deletes_and_gc_leave_the_region_list_exact() {
    if !tools() {
        return;
    }
    for region in regions() {
        let (_tmp, _dir, d) = start_with_volume(&region, "", "16M");
        fill(&d, "vol", 0, 2 * MIB, 90);
        let seed = rand_u64();
        eprintln!("seed {seed}");
        std::thread::scope(|s| {
            let d = &d;
            s.spawn(move || {
                for i in 0..24u64 {
                    fill(d, "vol", (i % 8) * MIB, 256 << 10, seed ^ i);
                    // A slow store can keep max_concurrent_tasks uploads in flight; a
                    // create refused for that (exit 5) is retried, as a client would.
                    let name = format!("c{i}");
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let out = d.cli(&["snapshot", "create", "vol", "--name", &name]);
                        if out.status.success() {
                            break;
                        }
                        assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
                        assert!(Instant::now() < deadline, "vol@{name}: create refused for 60 s");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            });
            s.spawn(move || {
                for i in 0..24u64 {
                    // Right after its create, or a little later (during or after its upload).
                    std::thread::sleep(Duration::from_millis((seed >> (i % 32)) % 300));
                    if i % 3 != 2 {
                        let deadline = Instant::now() + Duration::from_secs(120);
                        while !d.cli(&["snapshot", "delete", &format!("vol@c{i}")]).status.success() {
                            assert!(Instant::now() < deadline, "vol@c{i} never deletable");
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            });
            s.spawn(move || {
                for _ in 0..6 {
                    d.cli_ok(&["gc", "--region", region.name]);
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        });
        let kept: Vec<String> = (0..24).filter(|i| i % 3 == 2).map(|i| format!("vol@c{i}")).collect();
        let mut want: Vec<String> =
            kept.iter().map(|s| wait_available(&d, s)["id"].as_str().unwrap().to_string()).collect();
        // Deletes of store copies drain (retried every second).
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.cli_json(&["status"])["store_deletes_pending"].as_object().is_some_and(|m| !m.is_empty()) {
            assert!(Instant::now() < deadline, "store deletes still pending");
            std::thread::sleep(Duration::from_millis(200));
        }
        let listed = d.cli_json(&["snapshot", "list", "--region", region.name]);
        let mut got: Vec<String> =
            listed.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{}: the region lists exactly the snapshots left", region.name);
        for s in &kept {
            verify_ok(&d, s);
        }
    }
}
