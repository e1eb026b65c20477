//! Every file and directory the daemon creates (or renames into place) is synced into its
//! directory afterwards, so a power loss cannot take away a file whose content was synced.
//!
//! The power-loss soak (`scripts/soak --power-loss`) cannot see a missing directory sync: on
//! ext4 any later fsync commits the journal's earlier directory changes too. Other
//! filesystems do not, so this test reads the daemon's system calls instead: the real daemon
//! runs under `strace`, makes a volume with a new cluster size (a new slot file), a durable
//! snapshot uploaded to the local region (the store's directories, the key file, the blob
//! index) and stops; then every entry created in its directory must be followed by an
//! `fsync` of the directory holding it.

mod common;

use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One traced system call: its start time, name, arguments and result.
struct Call {
    at: f64,
    name: String,
    args: String,
    ret: i64,
}

/// The calls of every thread (`strace -ff` writes one file per thread), in time order.
fn read_trace(dir: &Path) -> Vec<Call> {
    let mut calls = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            // "1701934057.123456 openat(AT_FDCWD, \"/d/x\", O_RDWR|O_CREAT, 0666) = 5"
            let Some((at, rest)) = line.split_once(' ') else { continue };
            let (Ok(at), Some((name, rest))) = (at.parse::<f64>(), rest.split_once('(')) else { continue };
            // (strace pads the result: "fsync(5)        = 0"; a failure reads "= -1 ENOENT (...)")
            let Some((args, ret)) = rest.rsplit_once(" = ") else { continue };
            let Some(args) = args.trim_end().strip_suffix(')') else { continue };
            let ret = ret.split_whitespace().next().and_then(|r| r.parse().ok()).unwrap_or(-1);
            calls.push(Call { at, name: name.to_string(), args: args.to_string(), ret });
        }
    }
    calls.sort_by(|a, b| a.at.total_cmp(&b.at));
    calls
}

/// The quoted strings of a call's arguments (paths).
fn paths(args: &str) -> Vec<PathBuf> {
    args.split('"').skip(1).step_by(2).map(PathBuf::from).collect()
}

#[test]
fn every_file_and_directory_the_daemon_creates_is_synced_into_its_directory() {
    if !require_tool("strace") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d"); // created by the daemon: its entry in tmp counts too
    let trace = tmp.path().join("trace");
    std::fs::create_dir(&trace).unwrap();
    let mut strace = Command::new("strace")
        .args(["-f", "-ff", "-ttt", "-qq", "-o"])
        .arg(trace.join("t"))
        .args(["-e", "trace=openat,mkdir,mkdirat,rename,renameat,renameat2,link,linkat,fsync,fdatasync"])
        .args([BIN, "serve", "--nbd-listen", "none", "--dir"])
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .env_remove("SNAPBLK_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn strace");
    let cli = |args: &[&str]| -> String {
        run_ok(Command::new(BIN).arg("--dir").arg(&dir).args(args).env_remove("SNAPBLK_DIR"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(dir.join("control.sock").exists() && dir.join("nbd.sock").exists()) {
        assert!(Instant::now() < deadline, "snapblk serve under strace was not ready within 30 s");
        assert!(strace.try_wait().unwrap().is_none(), "strace exited before the daemon was ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    cli(&["volume", "create", "a", "--size", "16M", "--cluster-size", "16K"]);
    let uri = format!("nbd+unix:///a?socket={}", dir.join("nbd.sock").display());
    if require_tool("qemu-io") {
        qemu_io(&uri, &["write -P 0xab 0 1M", "flush"]);
    }
    cli(&["snapshot", "create", "a", "--name", "s1", "--durable", "--wait"]);
    // The daemon is strace's child: SIGTERM to it (strace itself would detach and leave it).
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", strace.id())).unwrap();
    let daemon = children.split_whitespace().next().expect("the daemon runs under strace").to_string();
    ok("kill", &["-TERM", &daemon]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while strace.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the daemon did not stop within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Replay: which fd names which path, when each entry was created, when each directory
    // was synced.
    let mut fds: HashMap<i64, PathBuf> = HashMap::new();
    let mut created: Vec<(f64, PathBuf, String)> = Vec::new();
    let mut synced: HashMap<PathBuf, f64> = HashMap::new();
    for c in read_trace(&trace) {
        let p = paths(&c.args);
        match c.name.as_str() {
            "openat" if c.ret >= 0 && !p.is_empty() => {
                if c.args.contains("O_CREAT") && !created.iter().any(|(_, q, _)| *q == p[0]) {
                    created.push((c.at, p[0].clone(), "created".into()));
                }
                fds.insert(c.ret, p[0].clone());
            }
            "mkdir" | "mkdirat" if c.ret == 0 && !p.is_empty() => created.push((c.at, p[0].clone(), "made".into())),
            "rename" | "renameat" | "renameat2" | "link" | "linkat" if c.ret == 0 && p.len() == 2 => {
                created.push((c.at, p[1].clone(), format!("{} from {}", c.name, p[0].display())))
            }
            "fsync" | "fdatasync" if c.ret == 0 => {
                if let Some(path) = c.args.trim().parse().ok().and_then(|fd: i64| fds.get(&fd)) {
                    synced.insert(path.clone(), c.at);
                }
            }
            _ => {}
        }
    }
    assert!(
        created.iter().any(|(_, p, _)| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("slots-"))),
        "the trace shows no slot file created: is the trace complete?"
    );
    let mut unsynced = Vec::new();
    for (at, path, how) in &created {
        // Entries gone by the end (temporary files renamed into place, removed files) need no
        // sync. The lock file holds nothing; snapblk.toml is written with the defaults again
        // if it is lost.
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !path.starts_with(tmp.path()) || !path.exists() || name == "snapblk.lock" || name == "snapblk.toml" {
            continue;
        }
        let parent = path.parent().unwrap();
        if !synced.get(parent).is_some_and(|t| t > at) {
            unsynced.push(format!("{} ({how}): {} not synced afterwards", path.display(), parent.display()));
        }
    }
    assert!(unsynced.is_empty(), "entries a power loss could take away:\n  {}", unsynced.join("\n  "));
}
