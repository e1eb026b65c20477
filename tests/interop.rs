//! Interoperability: the real daemon driven by real NBD clients (qemu-io, qemu-img, nbdinfo,
//! nbdcopy, fio, python3-libnbd) and by its own CLI.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn daemon_with_volume(size: &str) -> (tempfile::TempDir, Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    keep_snapshots_local(&tmp.path().join("d"));
    let d = Daemon::start(&tmp.path().join("d"));
    d.cli_ok(&["volume", "create", "vol", "--size", size]);
    (tmp, d)
}

#[test]
fn qemu_io_patterns_round_trip_including_unaligned_and_cross_cluster_writes() {
    if !require_tool("qemu-io") {
        return;
    }
    let (_t, d) = daemon_with_volume("64M");
    let uri = d.nbd_uri("vol");
    qemu_io(&uri, &["write -P 0xab 0 1M", "write -P 0xcd 70000 5000", "write -P 0xef 131071 65538", "flush"]);
    qemu_io(
        &uri,
        &[
            "read -P 0xab 0 69999",
            "read -P 0xcd 70000 5000",
            "read -P 0xab 75000 56071",
            "read -P 0xef 131071 65538",
            "read -P 0xab 196609 851967",
            "read -P 0 1M 1M",
        ],
    );
}

#[test]
fn snapshot_export_equals_a_reference_image_and_never_changes() {
    if !require_tool("qemu-img") {
        return;
    }
    let (t, mut d) = daemon_with_volume("32M");
    let reference = t.path().join("ref.raw");
    let reference = reference.to_str().unwrap();
    ok("qemu-img", &["create", "-q", "-f", "raw", reference, "32M"]);
    let writes = ["write -P 0x11 0 3M", "write -P 0x22 5000 70000", "write -P 0x33 20M 1M", "write -z 1M 64k"];
    qemu_io(&d.nbd_uri("vol"), &writes);
    qemu_io(reference, &writes);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    let compare = |d: &Daemon, export: &str| {
        run(
            Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", reference, &d.nbd_uri(export)]),
            Duration::from_secs(120),
        )
    };
    assert!(compare(&d, "vol@s1").status.success(), "snapshot differs from the reference");
    qemu_io(&d.nbd_uri("vol"), &["write -P 0x44 0 8M", "discard 20M 1M"]);
    assert!(compare(&d, "vol@s1").status.success(), "snapshot changed after writes to the volume");
    assert_eq!(compare(&d, "vol").status.code(), Some(1), "the volume should now differ");
    d.kill9();
    let d = Daemon::start(&d.dir.clone());
    let out = compare(&d, "vol@s1");
    assert!(
        out.status.success(),
        "snapshot changed across kill -9: {} {}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        d.log()
    );
}

#[test]
fn nbdinfo_reports_size_read_only_multi_conn_and_block_sizes() {
    if !require_tool("nbdinfo") {
        return;
    }
    let (_t, d) = daemon_with_volume("1G");
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1", "--description", "first one"]);
    for (export, read_only) in [("vol", false), ("vol@s1", true)] {
        let v: serde_json::Value = serde_json::from_str(&ok("nbdinfo", &["--json", &d.nbd_uri(export)])).unwrap();
        let e = &v["exports"][0];
        assert_eq!(e["export-size"], 1u64 << 30);
        assert_eq!(e["is_read_only"], read_only);
        assert_eq!(e["can_multi_conn"], true);
        assert_eq!(e["can_flush"], true);
        assert_eq!(e["can_trim"], !read_only, "write-side features only on writable exports");
        assert_eq!(e["can_fua"], !read_only);
        assert_eq!(e["block_size_minimum"], 1);
        assert_eq!(e["block_size_preferred"], 4096);
        assert_eq!(e["block_size_maximum"], 32 << 20);
        assert_eq!(v["structured"], true);
    }
    // The '@' may also be percent-encoded in URIs.
    let v: serde_json::Value = serde_json::from_str(&ok("nbdinfo", &["--json", &d.nbd_uri("vol%40s1")])).unwrap();
    assert_eq!(v["exports"][0]["export-name"], "vol@s1");
    assert_eq!(v["exports"][0]["is_read_only"], true);
    // --list shows every volume and snapshot, with the snapshot's description.
    qemu_io(&d.nbd_uri("vol"), &["write -P 7 0 4k"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s2"]);
    d.cli_ok(&["volume", "create", "other", "--size", "8M"]);
    let list = ok("nbdinfo", &["--list", "--json", &format!("nbd+unix:///?socket={}", d.socket())]);
    let v: serde_json::Value = serde_json::from_str(&list).expect("nbdinfo --list JSON");
    let mut names: Vec<&str> =
        v["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["other", "vol", "vol@s1", "vol@s2"], "{list}");
    let s1 = v["exports"].as_array().unwrap().iter().find(|e| e["export-name"] == "vol@s1").unwrap();
    assert_eq!(s1["description"], "first one", "{list}");
    assert_eq!(s1["is_read_only"], true, "{list}");
}

#[test]
fn base_allocation_map_shows_holes_data_and_unmapped_ranges() {
    if !require_tool("nbdinfo") {
        return;
    }
    let (_t, d) = daemon_with_volume("16M");
    let uri = d.nbd_uri("vol");
    assert_eq!(nbd_map(&uri, None), vec![(0, 16 * MIB, 3)], "a new volume is one hole");
    qemu_io(
        &uri,
        &["write -P 1 0 128k", "write -P 2 1M 64k", "write -P 3 4M 64k", "discard 0 64k", "write -z -u 1M 64k"],
    );
    let m = nbd_map(&uri, None);
    assert_eq!(ranges_with(&m, 0), vec![(64 << 10, 64 << 10), (4 * MIB, 64 << 10)], "data ranges: {m:?}");
    assert_eq!(m.iter().map(|e| e.1).sum::<u64>(), 16 * MIB);
    // Everything else, including the trimmed cluster and the zeroed (may-unmap) one, is a
    // hole that reads as zeros.
    for &(off, len, ty) in &m {
        assert!(ty == 0 || ty == 3, "unexpected type {ty} at {off}+{len}: {m:?}");
    }
    assert!(ranges_with(&m, 3).iter().any(|r| r.0 == 0), "the trimmed cluster is a hole: {m:?}");
    qemu_io(&uri, &["read -P 0 0 64k", "read -P 0 1M 64k", "read -P 1 64k 64k"]);
    // Zeroing without may-unmap (NBD_CMD_FLAG_NO_HOLE) keeps the cluster allocated.
    qemu_io(&uri, &["write -z 8M 64k"]);
    let m = nbd_map(&uri, None);
    assert_eq!(
        ranges_with(&m, 0),
        vec![(64 << 10, 64 << 10), (4 * MIB, 64 << 10), (8 * MIB, 64 << 10)],
        "data ranges after write-zeroes with NO_HOLE: {m:?}"
    );
    qemu_io(&uri, &["read -P 0 8M 64k"]);
    // A snapshot export has its own (frozen) map.
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    qemu_io(&uri, &["discard 4M 64k", "write -P 4 12M 4k"]);
    let snap = nbd_map(&d.nbd_uri("vol@s1"), None);
    assert_eq!(ranges_with(&snap, 0), vec![(64 << 10, 64 << 10), (4 * MIB, 64 << 10), (8 * MIB, 64 << 10)], "{snap:?}");
    let now = nbd_map(&uri, None);
    assert_eq!(ranges_with(&now, 0), vec![(64 << 10, 64 << 10), (8 * MIB, 64 << 10), (12 * MIB, 64 << 10)], "{now:?}");
}

#[test]
fn dirty_bitmap_shows_exactly_the_clusters_changed_since_the_last_snapshot() {
    if !require_tool("nbdinfo") {
        return;
    }
    let (_t, d) = daemon_with_volume("16M");
    let uri = d.nbd_uri("vol");
    let dirty = |uri: &str| ranges_with(&nbd_map(uri, Some("qemu:dirty-bitmap:dirty")), 1);
    assert_eq!(dirty(&uri), vec![]);
    qemu_io(&uri, &["write -P 1 0 4k", "write -P 1 327680 70000"]);
    // 64 KiB clusters: cluster 0, and clusters 5 and 6 (327680..397680).
    assert_eq!(dirty(&uri), vec![(0, 64 << 10), (5 << 16, 2 << 16)]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    assert_eq!(dirty(&uri), vec![], "a snapshot seals the dirty bitmap");
    qemu_io(&uri, &["write -P 2 3M 1", "discard 327680 65536"]);
    assert_eq!(dirty(&uri), vec![(5 << 16, 1 << 16), (3 * MIB, 1 << 16)]);
    assert_eq!(d.cli_json(&["volume", "show", "vol"])["dirty_clusters"], 2);
    // Write-zeroes of a cluster that holds data is a change too; flushed, the bitmap survives
    // a kill -9.
    // Trimming or zeroing a cluster that was never written marks it too: "written, trimmed or
    // zeroed" is the bitmap's contract.
    qemu_io(&uri, &["write -z -u 0 64k", "discard 10M 64k", "flush"]);
    let mut d = d;
    d.kill9();
    let d = Daemon::start(&d.dir.clone());
    let uri = d.nbd_uri("vol");
    let want = vec![(0, 1 << 16), (5 << 16, 1 << 16), (3 * MIB, 1 << 16), (10 * MIB, 1 << 16)];
    assert_eq!(dirty(&uri), want, "after kill -9");
    assert_eq!(d.cli_json(&["volume", "show", "vol"])["dirty_clusters"], 4);
}

#[test]
fn snapshot_bitmaps_show_the_clusters_changed_between_two_snapshots() {
    if !require_tool("nbdinfo") {
        return;
    }
    let (_t, d) = daemon_with_volume("16M");
    let uri = d.nbd_uri("vol");
    qemu_io(&uri, &["write -P 1 0 64k"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    qemu_io(&uri, &["write -P 2 2M 64k", "write -P 2 7M 64k"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s2"]);
    qemu_io(&uri, &["write -P 3 9M 4k"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s3"]);
    let s3 = d.nbd_uri("vol@s3");
    let changed = |base: &str| ranges_with(&nbd_map(&s3, Some(&format!("qemu:dirty-bitmap:{base}"))), 1);
    assert_eq!(changed("s1"), vec![(2 * MIB, 64 << 10), (7 * MIB, 64 << 10), (9 * MIB, 64 << 10)]);
    assert_eq!(changed("s2"), vec![(9 * MIB, 64 << 10)]);
    // The first snapshot has no older one to compare with.
    let contexts = ok("nbdinfo", &["--json", &d.nbd_uri("vol@s1")]);
    assert!(!contexts.contains("qemu:dirty-bitmap:"), "{contexts}");
    // The newest snapshot offers exactly one bitmap per older snapshot, and no "dirty".
    let info: serde_json::Value = serde_json::from_str(&ok("nbdinfo", &["--json", &s3])).unwrap();
    let mut ctx: Vec<&str> =
        info["exports"][0]["contexts"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    ctx.sort();
    assert_eq!(ctx, ["base:allocation", "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"]);
    // The changed-cluster counts agree with the bitmaps.
    assert_eq!(d.cli_json(&["snapshot", "show", "vol@s2"])["changed_clusters"], 2);
    assert_eq!(d.cli_json(&["snapshot", "show", "vol@s3"])["changed_clusters"], 1);
    // Snapshot bitmaps survive a restart unchanged.
    let mut d = d;
    d.terminate();
    let d = Daemon::start(&d.dir.clone());
    let s3 = d.nbd_uri("vol@s3");
    let changed = |base: &str| ranges_with(&nbd_map(&s3, Some(&format!("qemu:dirty-bitmap:{base}"))), 1);
    assert_eq!(changed("s1"), vec![(2 * MIB, 64 << 10), (7 * MIB, 64 << 10), (9 * MIB, 64 << 10)]);
    assert_eq!(changed("s2"), vec![(9 * MIB, 64 << 10)]);
}

#[test]
fn nbdcopy_with_four_connections_round_trips_a_random_image() {
    if !require_tool("nbdcopy") {
        return;
    }
    let (t, d) = daemon_with_volume("32M");
    let src = t.path().join("src.raw");
    let back = t.path().join("back.raw");
    let data: Vec<u8> = (0..32 * MIB as usize).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    ok("nbdcopy", &["--connections=4", "--flush", src.to_str().unwrap(), &d.nbd_uri("vol")]);
    ok("nbdcopy", &["--connections=4", &d.nbd_uri("vol"), back.to_str().unwrap()]);
    ok("cmp", &[src.to_str().unwrap(), back.to_str().unwrap()]);
    // A snapshot copied out over four connections while the volume is overwritten.
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s"]);
    qemu_io(&d.nbd_uri("vol"), &["write -P 0xee 0 32M"]);
    let snap = t.path().join("snap.raw");
    ok("nbdcopy", &["--connections=4", &d.nbd_uri("vol@s"), snap.to_str().unwrap()]);
    ok("cmp", &[src.to_str().unwrap(), snap.to_str().unwrap()]);
    qemu_io(&d.nbd_uri("vol"), &["read -P 0xee 0 32M"]);
}

#[test]
fn fio_random_writes_verify_with_crc32c_through_the_nbd_engine() {
    if !require_tool("fio") {
        return;
    }
    let (_t, d) = daemon_with_volume("128M");
    for (rw, bs) in [("randwrite", "4k"), ("write", "256k"), ("randrw", "16k")] {
        let out = ok(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={}", d.nbd_uri("vol")),
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                "--iodepth=16",
                "--size=64M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=json",
            ],
        );
        let json = &out[out.find('{').expect("fio JSON")..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["jobs"][0]["error"], 0, "fio {rw} reported an error: {out}");
    }
    // Four jobs = four connections at once, each verifying its own 16 MiB region.
    let out = ok(
        "fio",
        &[
            "--name=multi",
            "--ioengine=nbd",
            &format!("--uri={}", d.nbd_uri("vol")),
            "--rw=randrw",
            "--rwmixread=30",
            "--bs=4k",
            "--iodepth=8",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let json = &out[out.find('{').expect("fio JSON")..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4, "{out}");
    for j in jobs {
        assert_eq!(j["error"], 0, "fio multi-connection job reported an error: {out}");
        assert!(j["write"]["io_bytes"].as_u64().unwrap() > 0, "a job wrote nothing: {out}");
    }
}

#[test]
fn clone_and_origin_never_see_each_others_writes() {
    if !require_tool("qemu-io") {
        return;
    }
    let (_t, d) = daemon_with_volume("8M");
    qemu_io(&d.nbd_uri("vol"), &["write -P 0xa1 0 256k"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "base"]);
    let clone = d.cli_json(&["volume", "clone", "vol@base", "copy"]);
    assert_eq!(clone["origin"], "vol@base");
    qemu_io(&d.nbd_uri("copy"), &["write -P 0xb2 0 4k"]);
    qemu_io(&d.nbd_uri("vol"), &["write -P 0xc3 65536 4k"]);
    qemu_io(&d.nbd_uri("copy"), &["read -P 0xb2 0 4k", "read -P 0xa1 4k 252k"]);
    qemu_io(&d.nbd_uri("vol"), &["read -P 0xa1 0 64k", "read -P 0xc3 64k 4k", "read -P 0xa1 69632 188k"]);
    qemu_io(&d.nbd_uri("vol@base"), &["read -P 0xa1 0 256k"]);
    let (code, err) = d.cli_err(&["volume", "delete", "vol"]);
    assert_eq!(code, 5);
    assert!(err.contains("vol@base"), "the refusal names the snapshot: {err}");
    // Deleting the origin volume's data does not touch the clone: drop the clone first, then
    // the snapshot, and the volume can go; the clone kept its data until it was deleted.
    let clones = d.cli_json(&["snapshot", "show", "vol@base"])["clones"].to_string();
    assert!(clones.contains("copy"), "the snapshot lists its clone: {clones}");
    d.cli_ok(&["volume", "delete", "copy"]);
    d.cli_ok(&["snapshot", "delete", "vol@base"]);
    d.cli_ok(&["volume", "delete", "vol"]);
    let (_, err) = d.cli_err(&["volume", "show", "vol"]);
    assert!(err.contains("'vol'"), "{err}");
}

#[test]
fn rollback_is_refused_while_a_writer_is_connected_and_forced_rollback_disconnects_it() {
    if !require_libnbd() {
        return;
    }
    let (_t, d) = daemon_with_volume("8M");
    qemu_io(&d.nbd_uri("vol"), &["write -P 0x55 0 1M"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "good"]);
    qemu_io(&d.nbd_uri("vol"), &["write -P 0x66 0 1M"]);
    // Clients that stay connected until the server closes the connection (or 60 s pass).
    let hold = |export: &str| {
        let mut child = Command::new(PYTHON)
            .args([&py("hold.py"), &d.nbd_uri(export), "60"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        let guard = Guard(child);
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        assert_eq!(line.trim(), "connected", "hold.py on {export} did not connect");
        guard
    };
    let mut writer = hold("vol");
    // A reader of the snapshot itself does not block a rollback.
    let mut reader = hold("vol@good");
    assert_eq!(d.cli_json(&["volume", "show", "vol"])["writers"], 1);
    let (code, err) = d.cli_err(&["snapshot", "rollback", "vol@good"]);
    assert_eq!(code, 5);
    assert!(err.contains("--force"), "{err}");
    assert_one_sentence(&err);
    assert!(writer.0.try_wait().unwrap().is_none(), "a refused rollback must not disconnect the writer");
    // Refused means nothing changed.
    qemu_io(&d.nbd_uri("vol"), &["read -P 0x66 0 1M"]);
    d.cli_ok(&["snapshot", "rollback", "vol@good", "--force"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = writer.0.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "forced rollback left the writer connected");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "the writer's connection should have been closed by the server ({status})");
    assert!(reader.0.try_wait().unwrap().is_none(), "the snapshot reader was disconnected by the rollback");
    qemu_io(&d.nbd_uri("vol"), &["read -P 0x55 0 1M", "read -P 0 1M 7M"]);
    assert_eq!(d.cli_json(&["volume", "show", "vol"])["dirty_clusters"], 0);
    assert_eq!(d.cli_json(&["volume", "show", "vol"])["writers"], 0);
    // No writer now: a plain rollback works.
    qemu_io(&d.nbd_uri("vol"), &["write -P 0x77 0 64k"]);
    d.cli_ok(&["snapshot", "rollback", "vol@good"]);
    qemu_io(&d.nbd_uri("vol"), &["read -P 0x55 0 1M"]);
}

#[test]
fn cli_errors_are_one_clear_sentence_with_a_nonzero_exit() {
    let (_t, d) = daemon_with_volume("8M");
    let (code, err) = d.cli_err(&["volume", "show", "nope"]);
    assert_eq!(code, 4);
    assert!(err.contains("no volume named 'nope'"), "{err}");
    assert_one_sentence(&err);
    let (_, err) = d.cli_err(&["snapshot", "create", "nope", "--name", "s"]);
    assert!(err.contains("'nope'"), "{err}");
    // A volume with snapshots cannot be deleted; the refusal names them.
    d.cli_ok(&["snapshot", "create", "vol", "--name", "keep1"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "keep2"]);
    let (_, err) = d.cli_err(&["volume", "delete", "vol"]);
    assert!(err.contains("vol@keep1") && err.contains("vol@keep2"), "{err}");
    assert_one_sentence(&err);
    let snaps = &d.cli_json(&["volume", "show", "vol"])["snapshots"];
    // A count, or a list of them.
    assert_eq!(snaps.as_u64().or_else(|| snaps.as_array().map(|a| a.len() as u64)), Some(2), "{snaps}");
    let (_, err) = d.cli_err(&["volume", "create", "x", "--size", "12Q"]);
    assert!(err.contains("invalid size '12Q'"), "{err}");
    assert_one_sentence(&err);
    let (_, err) = d.cli_err(&["volume", "create", "x", "--size", "1G", "--cluster-size", "3K"]);
    assert!(err.contains("cluster size"), "{err}");
    let (_, err) = d.cli_err(&["volume", "create", "vol", "--size", "1G"]);
    assert!(err.contains("already exists"), "{err}");
    let (_, err) = d.cli_err(&["snapshot", "show", "vol@missing"]);
    assert!(err.contains("no snapshot named 'missing'"), "{err}");
    let (_, err) = d.cli_err(&["volume", "create", "bad/name", "--size", "1G"]);
    assert!(err.contains("invalid volume name"), "{err}");
    // Ids work wherever names do.
    let id = d.cli_json(&["volume", "show", "vol"])["id"].as_str().unwrap().to_string();
    assert_eq!(d.cli_json(&["volume", "show", &id])["name"], "vol");
    // A second daemon on the same directory is refused.
    let out = run(
        Command::new(BIN).args(["serve", "--dir"]).arg(&d.dir).args(["--nbd-listen", "none"]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("another snapblk daemon already owns"), "{}", text(&out.stderr));
    // No daemon at all: exit code 3 and what to do.
    let empty = tempfile::tempdir().unwrap();
    let out = run(Command::new(BIN).arg("--dir").arg(empty.path()).args(["volume", "list"]), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("snapblk serve --dir"), "{}", text(&out.stderr));
}

#[test]
fn sigterm_flushes_and_a_restart_serves_the_same_data_and_default_volume() {
    if !require_tool("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let mut d = Daemon::start_with(&dir, &["--default-volume", "disk0:64M"]);
    assert_eq!(d.cli_json(&["volume", "show", "disk0"])["size"], 64 * MIB);
    qemu_io(&d.nbd_uri("disk0"), &["write -P 0x77 0 2M"]);
    d.cli_ok(&["snapshot", "create", "disk0", "--name", "s"]);
    assert!(d.terminate(), "SIGTERM should exit 0");
    assert!(!dir.join("control.sock").exists() && !dir.join("nbd.sock").exists());
    // The default volume is kept as is when it exists (even if asked with another size).
    let d = Daemon::start_with(&dir, &["--default-volume", "disk0:128M"]);
    assert_eq!(d.cli_json(&["volume", "show", "disk0"])["size"], 64 * MIB);
    qemu_io(&d.nbd_uri("disk0"), &["read -P 0x77 0 2M"]);
    qemu_io(&d.nbd_uri("disk0@s"), &["read -P 0x77 0 2M"]);
}

#[test]
fn volumes_are_served_over_tcp_on_loopback_too() {
    if !require_tool("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d =
        Daemon::start_with(&tmp.path().join("d"), &["--nbd-listen", "127.0.0.1:0", "--default-volume", "disk0:16M"]);
    let addr = d.cli_json(&["status"])["nbd_tcp"].as_str().expect("a TCP address").to_string();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{addr}");
    let uri = format!("nbd://{addr}/disk0");
    qemu_io(&uri, &["write -P 0x5a 0 1M"]);
    qemu_io(&d.nbd_uri("disk0"), &["read -P 0x5a 0 1M"]);
}

#[test]
fn json_output_has_the_documented_fields_and_global_flags_go_anywhere() {
    let (_t, d) = daemon_with_volume("10G");
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
        k.sort();
        k
    };
    // --json before the subcommand, after it, and the directory from SNAPBLK_DIR.
    let before = d.cli_json(&["volume", "show", "vol"]);
    let after: serde_json::Value = serde_json::from_str(&d.cli_ok(&["volume", "show", "vol", "--json"])).unwrap();
    assert_eq!(before, after);
    let env = run_ok(Command::new(BIN).env("SNAPBLK_DIR", &d.dir).args(["volume", "show", "vol", "--json"]));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&env).unwrap(), before);
    let dir_after = run_ok(Command::new(BIN).args(["volume", "show", "vol", "--json", "--dir"]).arg(&d.dir));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&dir_after).unwrap(), before);
    for k in [
        "id",
        "name",
        "size",
        "cluster_size",
        "created",
        "allocated_bytes",
        "dirty_clusters",
        "snapshots",
        "origin",
        "writers",
    ] {
        assert!(keys(&before).contains(&k.to_string()), "VolumeInfo lacks {k}: {before}");
    }
    assert_eq!(before["name"], "vol");
    assert_eq!(before["size"], 10u64 << 30);
    assert_eq!(before["cluster_size"], 64 << 10);
    assert_eq!(before["allocated_bytes"], 0);
    assert_eq!(before["writers"], 0);
    assert!(before["origin"].is_null(), "{before}");
    assert!(before["id"].as_str().unwrap().starts_with("v-"), "{before}");

    let small = d.cli_json(&["volume", "create", "small", "--size", "1M", "--cluster-size", "4K"]);
    assert_eq!(small["cluster_size"], 4096);
    assert_eq!(small["size"], 1 << 20);
    let s = d.cli_json(&["snapshot", "create", "vol", "--name", "s1", "--description", "the first"]);
    for k in [
        "id",
        "name",
        "volume",
        "volume_id",
        "description",
        "created",
        "size",
        "cluster_size",
        "changed_clusters",
        "parent",
        "clones",
    ] {
        assert!(keys(&s).contains(&k.to_string()), "SnapshotInfo lacks {k}: {s}");
    }
    assert_eq!(s["name"], "s1");
    assert_eq!(s["volume"], "vol");
    assert_eq!(s["volume_id"], before["id"]);
    assert_eq!(s["description"], "the first");
    assert!(s["id"].as_str().unwrap().starts_with("s-"), "{s}");
    assert!(s["parent"].is_null(), "the first snapshot has no parent: {s}");
    let s2 = d.cli_json(&["snapshot", "create", "vol", "--name", "s2"]);
    assert!(s2["parent"].to_string().contains("s1") || s2["parent"] == s["id"], "parent of s2: {s2}");
    // Lists, and show by id.
    let vols = d.cli_json(&["volume", "list"]);
    let mut names: Vec<&str> = vols.as_array().expect("a list").iter().map(|v| v["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["small", "vol"]);
    assert_eq!(d.cli_json(&["snapshot", "list", "vol"]).as_array().expect("a list").len(), 2);
    assert_eq!(d.cli_json(&["snapshot", "list"]).as_array().expect("a list").len(), 2);
    assert_eq!(d.cli_json(&["snapshot", "show", s["id"].as_str().unwrap()])["name"], "s1");
    assert_eq!(d.cli_json(&["volume", "show", "vol"])["snapshots"], 2);
    // Deletes, then they are gone.
    d.cli_ok(&["snapshot", "delete", "vol@s1"]);
    d.cli_ok(&["volume", "delete", "small"]);
    assert_eq!(d.cli_json(&["snapshot", "list", "vol"]).as_array().unwrap().len(), 1);
    let (_, err) = d.cli_err(&["snapshot", "show", "vol@s1"]);
    assert!(err.contains("s1"), "{err}");
    let status = d.cli_json(&["status"]);
    assert_eq!(status["pid"], d.pid());
}

#[test]
fn every_api_answer_says_how_long_the_daemon_took_in_server_timing() {
    let (_t, d) = daemon_with_volume("1G");
    let timing = |headers: &[(String, String)]| -> f64 {
        let v =
            headers.iter().find(|(k, _)| k == "server-timing").map(|(_, v)| v.clone()).expect("a Server-Timing header");
        let ms = v.strip_prefix("handler;dur=").unwrap_or_else(|| panic!("unexpected Server-Timing: {v}"));
        ms.parse().unwrap()
    };
    let (status, headers, body) = control_http(&d.dir, "POST", "/v1/volumes/vol/snapshots", r#"{"name":"s1"}"#);
    assert!(status.contains(" 201 "), "{status}: {body}");
    let ms = timing(&headers);
    assert!((0.0..10_000.0).contains(&ms), "{ms}");
    // Errors carry it too.
    let (status, headers, _) = control_http(&d.dir, "GET", "/v1/volumes/nope", "");
    assert!(status.contains(" 404 "), "{status}");
    timing(&headers);
}

#[test]
fn a_daemon_whose_stderr_nobody_reads_keeps_answering_and_stops() {
    // Its log goes to a pipe that is never read. Once the pipe is full, a daemon that wrote
    // its log on the thread answering a request (holding an engine lock, too) would hang
    // there; the log thread drops lines instead.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("snapblk.toml"), "[upload]\nenabled = false\n[quotas]\nmax_snapshots_manual = 2000\n")
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--dir"])
        .arg(&dir)
        .args(["--nbd-listen", "none"])
        .env("RUST_LOG", "info")
        .env_remove("SNAPBLK_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _unread = child.stderr.take(); // held open, never read
                                       // Killed (by its pid) if an assertion below fails, so a failed run leaves no daemon.
    let mut child = Guard(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !dir.join("control.sock").exists() {
        assert!(std::time::Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, _, body) = control_http(&dir, "POST", "/v1/volumes", r#"{"name":"vol","size":1048576}"#);
    assert!(status.contains(" 201 "), "{status}: {body}");
    // A "snapshot created" line is about 120 bytes: 1500 of them are three pipes full.
    for i in 0..1500 {
        let (status, _, body) =
            control_http(&dir, "POST", "/v1/volumes/vol/snapshots", &format!(r#"{{"name":"s{i}"}}"#));
        assert!(status.contains(" 201 "), "create {i}: {status}: {body}");
    }
    ok("kill", &["-TERM", &child.0.id().to_string()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            panic!("the daemon did not stop within 30 s of SIGTERM with its stderr blocked");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn every_route_with_a_body_refuses_a_malformed_one_with_400_and_a_sentence() {
    let (_t, d) = daemon_with_volume("16M");
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    d.cli_ok(&["policy", "create", "p", "--every", "1h", "--keep-last", "1"]);
    let routes = [
        "/v1/volumes",
        "/v1/volumes/vol/snapshots",
        "/v1/volumes/vol/attach",
        "/v1/snapshots/vol@s1/clone",
        "/v1/snapshots/vol@s1/rollback",
        "/v1/snapshots/vol@s1/export",
        "/v1/snapshots/vol@s1/hold",
        "/v1/policies",
        "/v1/policies/p/apply",
        "/v1/policies/p/remove",
        "/v1/policies/p/run",
        "/v1/policies/p/prune",
        "/v1/regions/local/gc",
        "/v1/recycle-bin/purge",
    ];
    for route in routes {
        for body in ["[]", "3", "\"x\"", "null", "{not json", "[{}]"] {
            let (status, _, answer) = control_http(&d.dir, "POST", route, body);
            assert!(status.contains(" 400 "), "POST {route} {body}: {status} {answer}");
            let v: serde_json::Value =
                serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{route}: {e}: {answer}"));
            assert!(v["error"].as_str().unwrap().starts_with("bad request body"), "{route} {body}: {answer}");
            assert_eq!(v["kind"], "invalid");
        }
    }
    let (status, _, answer) = control_http(&d.dir, "POST", "/v1/snapshots/vol@s1/rollback", r#"{"force": "yes"}"#);
    assert!(status.contains(" 400 ") && answer.contains("bad request body"), "{status} {answer}");
    // Nothing happened: the snapshot is still there, not rolled back, not held.
    let s = d.cli_json(&["snapshot", "show", "vol@s1"]);
    assert!(s["hold"].is_null(), "{s}");
}
