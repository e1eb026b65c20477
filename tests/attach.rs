//! `volume attach`/`detach` on a host without the kernel's ublk and nbd drivers (this
//! machine's kernel has neither; scripts/vm-test covers the kernel paths in a VM): refused
//! with a sentence naming the missing module, exit code 1, and nothing left attached.

mod common;

use common::*;

fn host_has(path: &str) -> bool {
    std::path::Path::new(path).exists()
}

#[test]
fn attach_with_ublk_on_a_host_without_the_driver_names_the_module_and_fails() {
    if host_has("/dev/ublk-control") {
        eprintln!("SKIP: this host has ublk; the VM test covers attach");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"));
    d.cli_ok(&["volume", "create", "vol", "--size", "64M"]);
    let (code, err) = d.cli_err(&["volume", "attach", "vol", "--ublk"]);
    assert_eq!(code, 2, "{err}");
    assert_one_sentence(&err);
    assert!(err.contains("ublk_drv"), "the error should name the module: {err}");
    let v = d.cli_json(&["volume", "show", "vol"]);
    assert!(v["attachment"].is_null(), "{v}");
    assert_eq!(v["writers"], 0, "no handle may stay open after a failed attach: {v}");
    // The volume is not held: it can still be rolled back and deleted.
    d.cli_ok(&["volume", "delete", "vol"]);
}

#[test]
fn attach_with_kernel_nbd_on_a_host_without_the_driver_names_the_module_and_fails() {
    if host_has("/sys/module/nbd") {
        eprintln!("SKIP: this host has the nbd driver; the VM test covers attach");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"));
    d.cli_ok(&["volume", "create", "vol", "--size", "64M"]);
    for args in [&["volume", "attach", "vol", "--nbd"][..], &["volume", "attach", "vol", "--nbd", "/dev/nbd3"]] {
        let (code, err) = d.cli_err(args);
        assert_eq!(code, 2, "{err}");
        assert_one_sentence(&err);
        assert!(err.contains("modprobe nbd"), "the error should name the module: {err}");
    }
    assert_eq!(d.cli_json(&["volume", "show", "vol"])["writers"], 0);
}

#[test]
fn attach_arguments_are_checked_before_anything_is_attached() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"));
    d.cli_ok(&["volume", "create", "vol", "--size", "64M"]);
    // clap: one of --ublk / --nbd is required, not both
    let (code, _) = d.cli_err(&["volume", "attach", "vol"]);
    assert_eq!(code, 2);
    let (code, _) = d.cli_err(&["volume", "attach", "vol", "--ublk", "--nbd"]);
    assert_eq!(code, 2);
    // (exit codes: 2 usage, 4 not found, 5 refused)
    let cases: [(&[&str], &str, i32); 5] = [
        (&["volume", "attach", "nosuch", "--ublk"], "nosuch", 4),
        (&["volume", "attach", "vol", "--ublk", "--logical-block-size", "8K"], "logical block size", 2),
        (&["volume", "attach", "vol", "--nbd", "/dev/sda"], "not an NBD device", 2),
        (&["volume", "attach", "vol", "--nbd", "--depth", "8"], "ublk only", 2),
        (&["volume", "detach", "vol"], "not attached", 4),
    ];
    for (args, says, expected) in cases {
        let (code, err) = d.cli_err(args);
        assert_eq!(code, expected, "{args:?}: {err}");
        assert_one_sentence(&err);
        assert!(err.contains(says), "{args:?}: expected '{says}' in: {err}");
    }
    let list = d.cli_json(&["volume", "list"]);
    assert!(list[0]["attachment"].is_null(), "{list}");
}

#[test]
fn a_daemon_restarted_where_its_attached_devices_cannot_come_back_starts_and_says_why() {
    if host_has("/dev/ublk-control") || host_has("/sys/module/nbd") {
        eprintln!("SKIP: this host has ublk or nbd; the VM test covers restarts");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let mut d = Daemon::start(&dir);
    let id = d.cli_json(&["volume", "create", "vol", "--size", "64M"])["id"].as_str().unwrap().to_string();
    assert!(d.terminate());
    // What a daemon on a kernel with ublk and nbd would have left behind.
    let saved = serde_json::json!([
        {"volume": "vol", "volume_id": id, "kind": "ublk", "device": "/dev/ublkb0", "index": 0,
         "queues": 2, "depth": 64, "logical_block_size": 4096},
        {"volume": "gone", "volume_id": "v-00000000000000ff", "kind": "nbd", "device": "/dev/nbd0",
         "index": 0, "queues": 1, "depth": 0, "logical_block_size": 4096}
    ]);
    std::fs::write(dir.join("attachments.json"), saved.to_string()).unwrap();
    let d = Daemon::start(&dir);
    let v = d.cli_json(&["volume", "show", "vol"]);
    assert!(v["attachment"].is_null(), "{v}");
    assert_eq!(v["writers"], 0, "{v}");
    let log = d.log();
    assert!(log.contains("cannot take back an attached device") && log.contains("ublk_drv"), "{log}");
    let left: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("attachments.json")).unwrap()).unwrap();
    assert_eq!(left, serde_json::json!([]), "dropped attachments are forgotten");
    d.cli_ok(&["volume", "delete", "vol"]);
}
