//! Crash safety: a client writes and flushes (and takes snapshots) while the daemon is killed
//! with SIGKILL at a random moment, again and again on the same directory. After every
//! restart, every flushed write and every snapshot must read back exactly (tests/py/crash.py).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const ITERATIONS: u64 = 20;

#[test]
fn flushed_writes_and_snapshots_survive_repeated_kill_9() {
    if !require_libnbd("crash_test") {
        return;
    }
    let seed: u64 = std::env::var("SNAPBLK_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("crash test seed: {seed} (rerun with SNAPBLK_CRASH_SEED={seed})");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let log = tmp.path().join("writes.log");
    let mut d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "vol", "--size", "64M", "--cluster-size", "16K"]);
    let uri_base = format!("nbd+unix:///VOLUME?socket={}", d.socket());
    let mut next_index = 0u64;
    let mut all_snapshots: Vec<String> = Vec::new();
    let started = Instant::now();
    for iter in 0..ITERATIONS {
        let iter_seed = seed.wrapping_mul(31).wrapping_add(iter);
        let mut writer = Command::new(PYTHON)
            .args([
                &py("crash.py"),
                "write",
                &d.uri("vol"),
                log.to_str().unwrap(),
                &iter_seed.to_string(),
                &next_index.to_string(),
                BIN,
            ])
            .arg(&dir)
            .arg("vol")
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Kill at a pseudo-random moment 100..1300 ms in.
        std::thread::sleep(Duration::from_millis(100 + (iter_seed % 1200)));
        d.kill9();
        let status = writer.wait().unwrap();
        assert!(status.success(), "iteration {iter}: the writer failed unexpectedly (seed {seed})");
        d = Daemon::start(&dir);
        // Snapshots made in this and the previous iteration are checked each time; all of
        // them at the end.
        let log_text = std::fs::read_to_string(&log).unwrap();
        let snaps: Vec<String> = log_text
            .lines()
            .filter_map(|l| l.strip_prefix("S "))
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect();
        let fresh: Vec<String> = snaps.iter().filter(|s| !all_snapshots.contains(s)).cloned().collect();
        let check: Vec<String> = if iter + 1 == ITERATIONS { snaps.clone() } else { fresh.clone() };
        all_snapshots.extend(fresh);
        let mut args = vec![py("crash.py"), "verify".into(), uri_base.clone(), log.display().to_string(), "vol".into()];
        args.extend(check);
        let out = run(Command::new(PYTHON).args(&args), Duration::from_secs(300));
        assert!(
            out.status.success(),
            "iteration {iter} (seed {seed}): verification failed: {}{}\ndaemon log:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            d.log()
        );
        eprintln!("iteration {iter}: {}", text(&out.stdout).trim());
        next_index = log_text.lines().filter(|l| l.starts_with("W ")).count() as u64 + 1_000_000 * (iter + 1);
    }
    eprintln!("{ITERATIONS} kill -9 iterations in {:?}", started.elapsed());
}
