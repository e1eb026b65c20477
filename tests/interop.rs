//! Interoperability: the real daemon driven by real NBD clients (qemu-io, qemu-img, nbdinfo,
//! nbdcopy, fio, python3-libnbd) and by its own CLI.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn daemon_with_volume(size: &str) -> (tempfile::TempDir, Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"));
    d.cli_ok(&["volume", "create", "vol", "--size", size]);
    (tmp, d)
}

/// `nbdinfo --map[=CONTEXT] --json` as (offset, length, type) triples.
fn map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u64)> {
    let ctx = context.map(|c| format!("--map={c}")).unwrap_or_else(|| "--map".into());
    let out = ok("nbdinfo", &["--json", &ctx, uri]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect()
}

/// The ranges of a map whose type has all bits of `flags` (merged, as (offset, length)).
fn ranges_with(map: &[(u64, u64, u64)], flags: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len, ty) in map {
        if ty & flags == flags && flags != 0 || flags == 0 && ty == 0 {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => out.push((off, len)),
            }
        }
    }
    out
}

#[test]
fn qemu_io_patterns_round_trip_including_unaligned_and_cross_cluster_writes() {
    if !require("qemu-io", "qemu_io_patterns") {
        return;
    }
    let (_t, d) = daemon_with_volume("64M");
    let uri = d.uri("vol");
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
    if !require("qemu-img", "snapshot_export_equals_reference") {
        return;
    }
    let (t, mut d) = daemon_with_volume("32M");
    let reference = t.path().join("ref.raw");
    let reference = reference.to_str().unwrap();
    ok("qemu-img", &["create", "-q", "-f", "raw", reference, "32M"]);
    let writes = ["write -P 0x11 0 3M", "write -P 0x22 5000 70000", "write -P 0x33 20M 1M", "write -z 1M 64k"];
    qemu_io(&d.uri("vol"), &writes);
    qemu_io(reference, &writes);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    let compare = |d: &Daemon, export: &str| {
        run(
            Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", reference, &d.uri(export)]),
            Duration::from_secs(120),
        )
    };
    assert!(compare(&d, "vol@s1").status.success(), "snapshot differs from the reference");
    qemu_io(&d.uri("vol"), &["write -P 0x44 0 8M", "discard 20M 1M"]);
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
    if !require("nbdinfo", "nbdinfo_reports") {
        return;
    }
    let (_t, d) = daemon_with_volume("1G");
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1", "--description", "first one"]);
    for (export, read_only) in [("vol", false), ("vol@s1", true)] {
        let v: serde_json::Value = serde_json::from_str(&ok("nbdinfo", &["--json", &d.uri(export)])).unwrap();
        let e = &v["exports"][0];
        assert_eq!(e["export-size"], 1u64 << 30);
        assert_eq!(e["is_read_only"], read_only);
        assert_eq!(e["can_multi_conn"], true);
        assert_eq!(e["can_flush"], true);
        assert_eq!(e["can_trim"], true);
        assert_eq!(e["block_size_minimum"], 1);
        assert_eq!(e["block_size_preferred"], 4096);
        assert_eq!(e["block_size_maximum"], 32 << 20);
        assert_eq!(v["structured"], true);
    }
    let list = ok("nbdinfo", &["--list", &format!("nbd+unix:///?socket={}", d.socket())]);
    assert!(list.contains("export=\"vol\"") || list.contains("vol\n") || list.contains("vol"), "{list}");
    assert!(list.contains("vol@s1") && list.contains("first one"), "{list}");
}

#[test]
fn base_allocation_map_shows_holes_data_and_unmapped_ranges() {
    if !require("nbdinfo", "base_allocation_map") {
        return;
    }
    let (_t, d) = daemon_with_volume("16M");
    let uri = d.uri("vol");
    assert_eq!(map(&uri, None), vec![(0, 16 * MIB, 3)], "a new volume is one hole");
    qemu_io(
        &uri,
        &["write -P 1 0 128k", "write -P 2 1M 64k", "write -P 3 4M 64k", "discard 0 64k", "write -z -u 1M 64k"],
    );
    let m = map(&uri, None);
    assert_eq!(ranges_with(&m, 0), vec![(64 << 10, 64 << 10), (4 * MIB, 64 << 10)], "data ranges: {m:?}");
    assert_eq!(m.iter().map(|e| e.1).sum::<u64>(), 16 * MIB);
}

#[test]
fn dirty_bitmap_shows_exactly_the_clusters_changed_since_the_last_snapshot() {
    if !require("nbdinfo", "dirty_bitmap") {
        return;
    }
    let (_t, d) = daemon_with_volume("16M");
    let uri = d.uri("vol");
    let dirty = |uri: &str| ranges_with(&map(uri, Some("qemu:dirty-bitmap:dirty")), 1);
    assert_eq!(dirty(&uri), vec![]);
    qemu_io(&uri, &["write -P 1 0 4k", "write -P 1 327680 70000"]);
    // 64 KiB clusters: cluster 0, and clusters 5 and 6 (327680..397680).
    assert_eq!(dirty(&uri), vec![(0, 64 << 10), (5 << 16, 2 << 16)]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    assert_eq!(dirty(&uri), vec![], "a snapshot seals the dirty bitmap");
    qemu_io(&uri, &["write -P 2 3M 1", "discard 327680 65536"]);
    assert_eq!(dirty(&uri), vec![(5 << 16, 1 << 16), (3 * MIB, 1 << 16)]);
    assert_eq!(d.cli_json(&["volume", "show", "vol"])["dirty_clusters"], 2);
}

#[test]
fn snapshot_bitmaps_show_the_clusters_changed_between_two_snapshots() {
    if !require("nbdinfo", "snapshot_bitmaps") {
        return;
    }
    let (_t, d) = daemon_with_volume("16M");
    let uri = d.uri("vol");
    qemu_io(&uri, &["write -P 1 0 64k"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    qemu_io(&uri, &["write -P 2 2M 64k", "write -P 2 7M 64k"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s2"]);
    qemu_io(&uri, &["write -P 3 9M 4k"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s3"]);
    let s3 = d.uri("vol@s3");
    let changed = |base: &str| ranges_with(&map(&s3, Some(&format!("qemu:dirty-bitmap:{base}"))), 1);
    assert_eq!(changed("s1"), vec![(2 * MIB, 64 << 10), (7 * MIB, 64 << 10), (9 * MIB, 64 << 10)]);
    assert_eq!(changed("s2"), vec![(9 * MIB, 64 << 10)]);
    // The first snapshot has no older one to compare with.
    let contexts = ok("nbdinfo", &["--json", &d.uri("vol@s1")]);
    assert!(!contexts.contains("qemu:dirty-bitmap:"), "{contexts}");
}

#[test]
fn nbdcopy_with_four_connections_round_trips_a_random_image() {
    if !require("nbdcopy", "nbdcopy_round_trip") {
        return;
    }
    let (t, d) = daemon_with_volume("32M");
    let src = t.path().join("src.raw");
    let back = t.path().join("back.raw");
    let data: Vec<u8> = (0..32 * MIB as usize).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    ok("nbdcopy", &["--connections=4", "--flush", src.to_str().unwrap(), &d.uri("vol")]);
    ok("nbdcopy", &["--connections=4", &d.uri("vol"), back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == data, "nbdcopy round trip differs");
}

#[test]
fn fio_random_writes_verify_with_crc32c_through_the_nbd_engine() {
    if !require("fio", "fio_verify") {
        return;
    }
    let (_t, d) = daemon_with_volume("128M");
    for (rw, bs) in [("randwrite", "4k"), ("write", "256k"), ("randrw", "16k")] {
        let out = ok(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={}", d.uri("vol")),
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
}

#[test]
fn clone_and_origin_never_see_each_others_writes() {
    if !require("qemu-io", "clone_isolation") {
        return;
    }
    let (_t, d) = daemon_with_volume("8M");
    qemu_io(&d.uri("vol"), &["write -P 0xa1 0 256k"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "base"]);
    let clone = d.cli_json(&["volume", "clone", "vol@base", "copy"]);
    assert_eq!(clone["origin"], "vol@base");
    qemu_io(&d.uri("copy"), &["write -P 0xb2 0 4k"]);
    qemu_io(&d.uri("vol"), &["write -P 0xc3 65536 4k"]);
    qemu_io(&d.uri("copy"), &["read -P 0xb2 0 4k", "read -P 0xa1 4k 252k"]);
    qemu_io(&d.uri("vol"), &["read -P 0xa1 0 64k", "read -P 0xc3 64k 4k", "read -P 0xa1 69632 188k"]);
    qemu_io(&d.uri("vol@base"), &["read -P 0xa1 0 256k"]);
    let (code, err) = d.cli_err(&["volume", "delete", "vol"]);
    assert_eq!(code, 1);
    assert!(err.contains("vol@base"), "the refusal names the snapshot: {err}");
}

#[test]
fn rollback_is_refused_while_a_writer_is_connected_and_forced_rollback_disconnects_it() {
    if !require_libnbd("rollback_writer") {
        return;
    }
    let (_t, d) = daemon_with_volume("8M");
    qemu_io(&d.uri("vol"), &["write -P 0x55 0 1M"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "good"]);
    qemu_io(&d.uri("vol"), &["write -P 0x66 0 1M"]);
    // A client that stays connected until the server closes the connection.
    let mut holder = Command::new(PYTHON)
        .args([&py("hold.py"), &d.uri("vol")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    assert_eq!(d.cli_json(&["volume", "show", "vol"])["writers"], 1);
    let (code, err) = d.cli_err(&["snapshot", "rollback", "vol@good"]);
    assert_eq!(code, 1);
    assert!(err.contains("--force"), "{err}");
    d.cli_ok(&["snapshot", "rollback", "vol@good", "--force"]);
    let status = holder.wait().unwrap();
    assert!(status.success(), "the held connection should have been closed by the server");
    qemu_io(&d.uri("vol"), &["read -P 0x55 0 1M"]);
    assert_eq!(d.cli_json(&["volume", "show", "vol"])["dirty_clusters"], 0);
}

#[test]
fn cli_errors_are_one_clear_sentence_with_a_nonzero_exit() {
    let (_t, d) = daemon_with_volume("8M");
    let (code, err) = d.cli_err(&["volume", "show", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no volume named 'nope'"), "{err}");
    let (_, err) = d.cli_err(&["volume", "create", "x", "--size", "12Q"]);
    assert!(err.contains("invalid size '12Q'"), "{err}");
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
    // No daemon at all: exit code 2 and what to do.
    let empty = tempfile::tempdir().unwrap();
    let out = run(Command::new(BIN).arg("--dir").arg(empty.path()).args(["volume", "list"]), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("snapblk serve --dir"), "{}", text(&out.stderr));
}

#[test]
fn sigterm_flushes_and_a_restart_serves_the_same_data_and_default_volume() {
    if !require("qemu-io", "sigterm_restart") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let mut d = Daemon::start_with(&dir, &["--default-volume", "disk0:64M"]);
    assert_eq!(d.cli_json(&["volume", "show", "disk0"])["size"], 64 * MIB);
    qemu_io(&d.uri("disk0"), &["write -P 0x77 0 2M"]);
    d.cli_ok(&["snapshot", "create", "disk0", "--name", "s"]);
    assert!(d.terminate(), "SIGTERM should exit 0");
    assert!(!dir.join("control.sock").exists() && !dir.join("nbd.sock").exists());
    // The default volume is kept as is when it exists (even if asked with another size).
    let d = Daemon::start_with(&dir, &["--default-volume", "disk0:128M"]);
    assert_eq!(d.cli_json(&["volume", "show", "disk0"])["size"], 64 * MIB);
    qemu_io(&d.uri("disk0"), &["read -P 0x77 0 2M"]);
    qemu_io(&d.uri("disk0@s"), &["read -P 0x77 0 2M"]);
}

#[test]
fn volumes_are_served_over_tcp_on_loopback_too() {
    if !require("qemu-io", "tcp") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d =
        Daemon::start_with(&tmp.path().join("d"), &["--nbd-listen", "127.0.0.1:0", "--default-volume", "disk0:16M"]);
    let addr = d.cli_json(&["status"])["nbd_tcp"].as_str().expect("a TCP address").to_string();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{addr}");
    let uri = format!("nbd://{addr}/disk0");
    qemu_io(&uri, &["write -P 0x5a 0 1M"]);
    qemu_io(&d.uri("disk0"), &["read -P 0x5a 0 1M"]);
}
