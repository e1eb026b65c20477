//! Closed by default (issue 18 §4): whatever the umask it is started with, the daemon keeps
//! its directory and every file in it to its own user, and opens its sockets to its group
//! only; other local users cannot reach the disks.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Every file and directory under `dir`, with its mode (the test's own log file excepted).
fn modes(dir: &Path, out: &mut Vec<(String, u32, bool)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        if e.file_name() == "snapblk-test.log" {
            continue;
        }
        out.push((e.path().display().to_string(), md.permissions().mode() & 0o777, md.file_type().is_socket()));
        if md.is_dir() {
            modes(&e.path(), out);
        }
    }
}

#[test]
fn files_are_private_and_sockets_group_only_whatever_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    // Others may walk up to the daemon's directory: what keeps them out must be its own modes.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("d");
    // umask 000: without the daemon's own, everything would be created world-writable.
    let daemon = serve(Command::new("sh").args(["-c", "umask 000 && exec \"$0\" \"$@\"", BIN, "serve"]), &dir);
    let cli = |args: &[&str]| {
        let out =
            run(Command::new(BIN).arg("--dir").arg(&dir).args(args).env_remove("SNAPBLK_DIR"), Duration::from_secs(60));
        assert!(out.status.success(), "snapblk {args:?}: {}", text(&out.stderr));
    };
    cli(&["volume", "create", "v", "--size", "16M"]);
    let ok = run(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            &format!("nbd+unix:///v?socket={}", dir.join("nbd.sock").display()),
            "-c",
            "write -P 0xab 0 1M",
        ]),
        Duration::from_secs(60),
    );
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    cli(&["snapshot", "create", "v", "--name", "s1", "--wait"]);

    let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "the daemon directory");
    let mut all = Vec::new();
    modes(&dir, &mut all);
    assert!(all.iter().any(|(p, ..)| p.contains("slots-")), "no slot file found: {all:?}");
    assert!(all.iter().any(|(p, ..)| p.ends_with(".key")), "no key file found: {all:?}");
    for (path, mode, socket) in &all {
        if *socket {
            assert_eq!(*mode, 0o660, "socket {path}");
        } else {
            assert_eq!(mode & 0o077, 0, "{path} has mode {mode:03o}");
        }
    }

    // Another local user can reach neither the disks nor the control API.
    if is_root() && require_tool("setpriv") {
        let other = |program: &str, args: &[&str]| {
            run(
                Command::new("setpriv")
                    .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", program])
                    .args(args),
                Duration::from_secs(30),
            )
        };
        let nbd = format!("nbd+unix:///v?socket={}", dir.join("nbd.sock").display());
        assert!(!other("nbdinfo", &[&nbd]).status.success(), "user nobody read volume v over NBD");
        let out = other(BIN, &["--dir", &dir.display().to_string(), "volume", "list"]);
        assert!(!out.status.success(), "user nobody used the control API");
        // ... and is told why, not that no daemon runs (which would send them to start one).
        assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("permission denied on"), "{}", text(&out.stderr));

        // `--socket-group`: that group's members may use the sockets, and only the sockets.
        drop(daemon);
        // (Killed: its sockets are left; the next daemon replaces them.)
        std::fs::remove_file(dir.join("nbd.sock")).unwrap();
        std::fs::remove_file(dir.join("control.sock")).unwrap();
        let _daemon = serve(Command::new(BIN).args(["serve", "--socket-group", "65534"]), &dir);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o710);
        let out = other("nbdinfo", &[&nbd]);
        assert!(out.status.success(), "a member of the socket group cannot use NBD: {}", text(&out.stderr));
        let key = dir.join("keys").join("local.key");
        assert!(std::fs::read(&key).is_ok());
        let out = other("cat", &[&key.display().to_string()]);
        assert!(!out.status.success(), "a member of the socket group read the key file");
    } else {
        eprintln!("SKIP: the other-user part of {} needs root and setpriv", test_name());
    }
}

/// Starts `cmd --dir DIR` (a `snapblk serve`) and waits for its sockets.
fn serve(cmd: &mut Command, dir: &Path) -> Guard {
    let child = cmd
        .arg("--dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Guard(child);
    wait_for_sockets(dir, &mut daemon);
    daemon
}

fn wait_for_sockets(dir: &Path, daemon: &mut Guard) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(dir.join("control.sock").exists() && dir.join("nbd.sock").exists()) {
        assert!(Instant::now() < deadline, "the daemon did not start");
        assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon exited");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the test runs as root (reading /proc, no `unsafe` getuid call).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Store fault injection is a test harness: a daemon refuses a config with a `faults` table
/// unless its environment says it is under test.
#[test]
fn a_daemon_refuses_store_fault_injection_outside_tests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("snapblk.toml"),
        "[regions.local]\nkind = \"fs\"\npath = \"store\"\n\n[regions.local.faults]\nerror_rate = 0.5\n",
    )
    .unwrap();
    let out = run(
        Command::new(BIN).args(["serve", "--dir"]).arg(&dir).env_remove("SNAPBLK_TEST_FAULTS").stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "the daemon started with fault injection");
    let err = text(&out.stderr);
    assert!(err.contains("faults") && err.contains("SNAPBLK_TEST_FAULTS"), "{err}");
}

#[test]
fn a_bad_key_file_stops_the_daemon_at_start_with_a_sentence() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(dir.join("snapblk.toml"), "[regions.local]\nkind = \"fs\"\nkey_file = \"keys/local.key\"\n")
        .unwrap();
    let err = common::Daemon::try_start(&dir, &[]).err().expect("started without its key file");
    assert!(err.contains("key_file") && err.contains("does not exist"), "{err}");
    let key = dir.join("keys/local.key");
    std::fs::write(&key, "not a key\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = common::Daemon::try_start(&dir, &[]).err().expect("started with a file that is no key");
    assert!(err.contains("is not a snapblk key file"), "{err}");
}
