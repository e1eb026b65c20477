//! Crash safety: a client writes (with flushes, FUA writes and snapshots) over two connections
//! while the daemon is killed with SIGKILL at a random moment, again and again on the same
//! directory. After every restart, every durable write and every snapshot must read back
//! exactly as tests/py/crash.py models it.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const ITERATIONS: u64 = 20;

/// splitmix64: a tiny deterministic generator, so a seed replays the same kill times.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn flushed_writes_and_snapshots_survive_repeated_kill_9() {
    if !require_libnbd() {
        return;
    }
    let seed: u64 = match std::env::var("SNAPBLK_CRASH_SEED") {
        Ok(s) => s.parse().expect("SNAPBLK_CRASH_SEED must be a number"),
        Err(_) => rand::random::<u32>() as u64,
    };
    eprintln!("crash test seed: {seed} (replay with SNAPBLK_CRASH_SEED={seed})");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let log = tmp.path().join("writes.log");
    let log_s = log.display().to_string();
    let mut d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "vol", "--size", "64M", "--cluster-size", "16K"]);
    let template = format!("nbd+unix:///EXPORT?socket={}", d.socket());
    let mut all_snapshots: Vec<String> = Vec::new();
    let started = Instant::now();
    for iter in 0..ITERATIONS {
        let iter_seed = mix(seed ^ (iter << 40));
        // Write indexes are unique across sessions and grow: session `iter` starts at iter·10⁷.
        let first = iter * 10_000_000;
        let writer = Command::new(PYTHON)
            .arg(py("crash.py"))
            .args(["write", &d.nbd_uri("vol"), &log_s, &iter_seed.to_string(), &first.to_string(), BIN])
            .arg(&dir)
            .arg("vol")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut writer = Guard(writer);
        let mut line = String::new();
        std::io::BufReader::new(writer.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
        if line.trim() != "connected" {
            let out = writer.0.wait_with_output_lossy();
            panic!("iteration {iter} (seed {seed}): the writer did not connect: {line}{out}");
        }
        // Kill at a pseudo-random moment 20..1000 ms after the writer connected.
        std::thread::sleep(Duration::from_millis(20 + mix(iter_seed) % 980));
        d.kill9();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = writer.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "iteration {iter} (seed {seed}): the writer hangs after the kill");
            std::thread::sleep(Duration::from_millis(10));
        };
        if !status.success() {
            let out = writer.0.wait_with_output_lossy();
            panic!("iteration {iter} (seed {seed}): the writer failed ({status}): {out}");
        }
        d = Daemon::try_start(&dir, &[])
            .unwrap_or_else(|e| panic!("iteration {iter} (seed {seed}): restart after kill -9 failed: {e}"));
        // The snapshots of this session now, all of them again after the last crash.
        let log_text = std::fs::read_to_string(&log).unwrap();
        let snaps: Vec<String> = log_text
            .lines()
            .filter_map(|l| l.strip_prefix("S "))
            .filter_map(|l| l.split(' ').next().map(str::to_string))
            .collect();
        let fresh: Vec<String> = snaps.iter().filter(|s| !all_snapshots.contains(s)).cloned().collect();
        all_snapshots.extend(fresh.iter().cloned());
        let check = if iter + 1 == ITERATIONS { &all_snapshots } else { &fresh };
        let mut args: Vec<&str> = vec!["verify", &template, &log_s, "vol"];
        args.extend(check.iter().map(String::as_str));
        let out = run(Command::new(PYTHON).arg(py("crash.py")).args(&args), Duration::from_secs(300));
        assert!(
            out.status.success(),
            "iteration {iter} (seed {seed}, replay with SNAPBLK_CRASH_SEED={seed}): verification failed:\n{}{}\ndaemon log:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            d.log()
        );
        eprintln!("iteration {iter}: {}", text(&out.stdout).trim());
    }
    let log_text = std::fs::read_to_string(&log).unwrap();
    let flushes = log_text.lines().filter(|l| l.starts_with("F ")).count();
    eprintln!(
        "{ITERATIONS} kill -9 iterations in {:?}: {flushes} flushes, {} snapshots verified",
        started.elapsed(),
        all_snapshots.len()
    );
    // The test must have exercised something.
    assert!(flushes >= 50, "only {flushes} flushes in {ITERATIONS} sessions (seed {seed})");
    assert!(!all_snapshots.is_empty(), "no snapshot was taken in {ITERATIONS} sessions (seed {seed})");
    // Snapshots are all still listed.
    let listed = d.cli_json(&["snapshot", "list", "vol"]).to_string();
    for s in &all_snapshots {
        assert!(listed.contains(&format!("\"{s}\"")), "snapshot {s} is missing from the list: {listed}");
    }
    assert!(!d.log().contains("panicked"), "the daemon panicked (seed {seed}):\n{}", d.log());
    assert!(d.terminate(), "SIGTERM after the crash test should exit 0:\n{}", d.log());
}

trait OutputLossy {
    fn wait_with_output_lossy(&mut self) -> String;
}

impl OutputLossy for std::process::Child {
    /// What the writer printed (stderr included), after it exits (or is killed).
    fn wait_with_output_lossy(&mut self) -> String {
        use std::io::Read;
        if self.try_wait().ok().flatten().is_none() {
            let _ = self.kill();
        }
        let _ = self.wait();
        let mut s = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}
