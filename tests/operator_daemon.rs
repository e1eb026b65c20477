//! Operator experience of the daemon (issue 25): export names take ids, a rollback right after
//! a client disconnects, start-up failures that leave nothing behind, host names for the
//! listeners, logs that name volumes, and `scripts/garage` without registry access. Each test
//! drives the real binary (and real NBD clients).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::store::{configure, regions, wait_available, wait_released};
use common::*;

const MIB: u64 = 1 << 20;

/// A daemon in `TMP/d` whose snapshots stay local, with a 16 MiB volume `vol`.
fn local_daemon(tmp: &Path) -> Daemon {
    let dir = tmp.join("d");
    keep_snapshots_local(&dir);
    let d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "vol", "--size", "16M"]);
    d
}

/// `nbdinfo --json` of one export: (size, read-only).
fn export_info(uri: &str) -> (u64, bool) {
    let v: serde_json::Value = serde_json::from_str(&ok("nbdinfo", &["--json", uri])).expect("nbdinfo JSON");
    let e = &v["exports"][0];
    (e["export-size"].as_u64().unwrap(), e["is_read_only"].as_bool().unwrap())
}

/// Every way of naming snapshot `vol@s1` (ids included) is a read-only export with its
/// content; a snapshot id after another volume's name is refused.
fn check_snapshot_exports(d: &Daemon, tmp: &Path) {
    let snap = d.cli_json(&["snapshot", "show", "vol@s1"]);
    let (sid, vid) = (snap["id"].as_str().unwrap(), snap["volume_id"].as_str().unwrap());
    let by_name = tmp.join("by-name.raw");
    ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &d.nbd_uri("vol@s1"), &by_name.display().to_string()]);
    for export in [format!("vol@{sid}"), format!("{vid}@{sid}"), sid.to_string()] {
        let uri = d.nbd_uri(&export);
        assert_eq!(export_info(&uri), (16 * MIB, true), "{export}");
        let out = ok("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0xab 0 1M", "-c", "read -P 0 1M 1M", &uri]);
        assert!(!out.contains("fail"), "{export}: {out}");
        ok("qemu-img", &["compare", "-q", "-f", "raw", "-F", "raw", &uri, &by_name.display().to_string()]);
    }
    let other = run(Command::new("nbdinfo").arg(d.nbd_uri(&format!("other@{sid}"))), TOOL_TIMEOUT);
    assert!(!other.status.success(), "other@{sid} was served: {}", text(&other.stdout));
    let (_, err) = d.cli_err(&["snapshot", "show", &format!("other@{sid}")]);
    assert!(err.contains("volume 'other' has no snapshot with id"), "{err}");
}

#[test]
fn snapshot_exports_accept_the_snapshot_id_after_the_volume_and_alone() {
    if !require_tool("nbdinfo") || !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = local_daemon(tmp.path());
    d.cli_ok(&["volume", "create", "other", "--size", "16M"]);
    qemu_io(&d.nbd_uri("vol"), &["write -P 0xab 0 1M"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    // Written after the snapshot: the snapshot exports must not show it.
    qemu_io(&d.nbd_uri("vol"), &["write -P 0xcd 1M 1M"]);
    check_snapshot_exports(&d, tmp.path());
}

#[test]
fn snapshot_exports_accept_the_snapshot_id_once_the_snapshot_is_released() {
    if !require_tool("nbdinfo") || !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    // The default upload settings: released right after its upload.
    configure(&dir, &regions()[0], "", "");
    let d = Daemon::start(&dir);
    for v in ["vol", "other"] {
        d.cli_ok(&["volume", "create", v, "--size", "16M", "--region", "local"]);
    }
    qemu_io(&d.nbd_uri("vol"), &["write -P 0xab 0 1M"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    qemu_io(&d.nbd_uri("vol"), &["write -P 0xcd 1M 1M"]);
    wait_available(&d, "vol@s1");
    wait_released(&d, "vol@s1");
    check_snapshot_exports(&d, tmp.path());
}

#[test]
fn rollback_right_after_a_writer_disconnects_succeeds_every_time() {
    if !require_tool("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = local_daemon(tmp.path());
    let uri = d.nbd_uri("vol");
    qemu_io(&uri, &["write -P 0x11 0 64k"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    let mut refused = Vec::new();
    for i in 0..50 {
        // qemu-io sends NBD_CMD_DISC and exits without waiting for the server to close.
        qemu_io(&uri, &[&format!("write -P {} 0 64k", 0x20 + i)]);
        let out = d.cli(&["snapshot", "rollback", "vol@s1"]);
        if !out.status.success() {
            refused.push(format!("iteration {i}: {}", text(&out.stderr).trim()));
        }
    }
    assert!(refused.is_empty(), "{} of 50 rollbacks refused:\n{}", refused.len(), refused.join("\n"));
    qemu_io(&uri, &["read -P 0x11 0 64k"]);
}

#[test]
fn rollback_still_refuses_a_writer_that_stays_connected() {
    if !require_libnbd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = local_daemon(tmp.path());
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    let mut holder = std::process::Command::new(PYTHON)
        .args([&py("hold.py"), &d.nbd_uri("vol"), "60"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run hold.py");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.take().unwrap()), &mut line).unwrap();
    let _holder = Guard(holder);
    assert_eq!(line.trim(), "connected");
    let started = Instant::now();
    let (_, err) = d.cli_err(&["snapshot", "rollback", "vol@s1"]);
    assert!(err.contains("has 1 writable client(s) connected"), "{err}");
    // The grace for disconnecting clients is short: a connected one is refused within it.
    assert!(started.elapsed() < Duration::from_secs(5), "refused after {:?}", started.elapsed());
}

/// `snapblk serve` with `args`, which must fail at start; returns its stderr.
fn serve_fails(dir: &Path, args: &[&str]) -> String {
    let out = run(
        Command::new(BIN).args(["serve", "--dir"]).arg(dir).args(args).env_remove("SNAPBLK_DIR"),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "serve {args:?} started");
    text(&out.stderr)
}

#[test]
fn a_busy_tcp_port_fails_the_start_naming_the_address_and_leaves_the_directory_untouched() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    for flag in ["--nbd-listen", "--metrics-listen"] {
        let fresh = tmp.path().join(format!("fresh{flag}"));
        let err = serve_fails(&fresh, &[flag, &addr, "--default-volume", "d:1M"]);
        assert_one_sentence(&err);
        assert!(err.contains(&format!("cannot listen on {addr} ({flag})")) && err.contains("in use"), "{err}");
        assert!(!fresh.exists(), "{flag}: the directory was created");

        let empty = tmp.path().join(format!("empty{flag}"));
        std::fs::create_dir(&empty).unwrap();
        serve_fails(&empty, &[flag, &addr, "--default-volume", "d:1M"]);
        let left: Vec<_> = std::fs::read_dir(&empty).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{flag}: files were created: {left:?}");
    }
}

#[test]
fn a_directory_path_too_long_for_the_sockets_fails_before_anything_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("x".repeat(120));
    let err = serve_fails(&dir, &["--nbd-listen", "none", "--default-volume", "d:1M"]);
    assert_one_sentence(&err);
    assert!(err.contains("too long for its sockets") && err.contains("shorter --dir"), "{err}");
    assert!(!dir.exists());
}

#[test]
fn a_second_daemon_on_the_same_directory_is_refused_and_the_first_keeps_serving() {
    if !require_tool("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = local_daemon(tmp.path());
    qemu_io(&d.nbd_uri("vol"), &["write -P 0x5a 0 64k"]);
    let files = |dir: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "snapblk-test.log")
            .collect();
        v.sort();
        v
    };
    let before = files(&d.dir);
    let err = serve_fails(&d.dir, &["--nbd-listen", "none", "--default-volume", "second:1M"]);
    assert_one_sentence(&err);
    assert!(err.contains("another snapblk daemon already owns") && err.contains(&d.pid().to_string()), "{err}");
    assert_eq!(files(&d.dir), before);
    let volumes = d.cli_json(&["volume", "list"]).to_string();
    assert!(volumes.contains("\"vol\"") && !volumes.contains("second"), "{volumes}");
    qemu_io(&d.nbd_uri("vol"), &["read -P 0x5a 0 64k"]);
}

#[test]
fn listeners_accept_a_host_name_that_resolves_to_loopback_only() {
    if !require_tool("nbdinfo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let d = Daemon::start_with(&dir, &["--nbd-listen", "localhost:0", "--metrics-listen", "localhost:0"]);
    d.cli_ok(&["volume", "create", "vol", "--size", "1M"]);
    let status = d.cli_json(&["status"]);
    let tcp = status["nbd_tcp"].as_str().unwrap_or_else(|| panic!("no TCP listener: {status}"));
    let ip: std::net::SocketAddr = tcp.parse().unwrap();
    assert!(ip.ip().is_loopback(), "{tcp}");
    assert_eq!(export_info(&format!("nbd://{tcp}/vol")), (MIB, false));
    assert!(d.log().contains("metrics: http://127.0.0.1:") || d.log().contains("metrics: http://[::1]:"));

    let err = serve_fails(&tmp.path().join("e"), &["--nbd-listen", "no-such-host.invalid:10809"]);
    assert_one_sentence(&err);
    assert!(err.contains("cannot resolve 'no-such-host.invalid'"), "{err}");
}

#[test]
fn hydration_log_lines_name_the_volume_not_its_number() {
    if !require_tool("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let outage = tmp.path().join("outage");
    let extra = format!("retries = 1\n\n[regions.local.faults]\noutage_file = \"{}\"\n", outage.display());
    configure(&dir, &regions()[0], "", &extra);
    let d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "vol", "--size", "16M", "--region", "local"]);
    qemu_io(&d.nbd_uri("vol"), &["write -P 0xab 0 1M"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    wait_available(&d, "vol@s1");
    wait_released(&d, "vol@s1");
    // The store is out before the hydration starts: its first step (the manifest) fails.
    std::fs::write(&outage, "").unwrap();
    let restored = d.cli_json(&["volume", "create", "restored", "--from-snapshot", "vol@s1"]);
    let id = restored["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = loop {
        if let Some(line) = d.log().lines().find(|l| l.contains("background hydration failed")) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no hydration failure logged during the outage:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(failed.contains("volume=restored") && failed.contains(&format!("id={id}")), "{failed}");
    std::fs::remove_file(&outage).unwrap();
    for line in d.log().lines() {
        for key in ["volume=", "snapshot="] {
            let raw = line.split(key).skip(1).any(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
            assert!(!raw, "a raw number where a name belongs: {line}");
        }
    }
}

#[test]
fn garage_start_without_registry_access_fails_in_seconds_and_caches_nothing() {
    // A registry that accepts connections and never answers: the hang to time out.
    let registry = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = registry.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = registry.incoming().collect();
        drop(held);
    });
    let tmp = tempfile::tempdir().unwrap();
    let cargo_home = tmp.path().join("cargo-home");
    std::fs::create_dir(&cargo_home).unwrap();
    std::fs::write(
        cargo_home.join("config.toml"),
        format!(
            "[source.crates-io]\nreplace-with = \"unreachable\"\n[source.unreachable]\nregistry = \"sparse+http://127.0.0.1:{port}/index/\"\n"
        ),
    )
    .unwrap();
    let cache = tmp.path().join("cache");
    let garage_dir = tmp.path().join("garage");
    let started = Instant::now();
    let out = run(
        Command::new(format!("{}/scripts/garage", env!("CARGO_MANIFEST_DIR")))
            .arg("start")
            .arg(&garage_dir)
            .env("SNAPBLK_CACHE", &cache)
            .env("CARGO_HOME", &cargo_home)
            .env("GARAGE_NET_TIMEOUT", "2")
            .env("GARAGE_NET_RETRY", "0"),
        Duration::from_secs(120),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    assert!(stdout.contains("garage: downloading garage"), "no step line:\n{stdout}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.contains("downloading garage from crates.io failed") && last.contains("nothing was cached"),
        "the last line should say what failed and what to do:\n{stderr}"
    );
    assert!(!cache.exists(), "a cache folder was left: {:?}", std::fs::read_dir(&cache).map(|d| d.count()));
    assert!(!garage_dir.exists(), "the garage directory was created");
}
