//! Harness for integration tests: starts the real `snapblk` binary in a temporary directory
//! and runs real clients against it, each with a timeout so a hang fails instead of blocking.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_snapblk");

/// Whether an external tool is installed. With `SNAPBLK_REQUIRE_TOOLS=1` (set by
/// scripts/test) a missing tool fails the test; otherwise the test says it skips.
pub fn require(tool: &str, test: &str) -> bool {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("SNAPBLK_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{test}: required tool '{tool}' is not installed (run scripts/test to install it)");
        }
        eprintln!("SKIP: {test}: {tool} not installed");
    }
    found
}

/// Runs a command to completion within `timeout`; kills it and panics on timeout.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut child = child.unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("timed out after {timeout:?}: {desc}\nstdout: {}\nstderr: {}", text(&out.stdout), text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a program and asserts success; returns stdout.
pub fn ok(program: &str, args: &[&str]) -> String {
    let out = run(Command::new(program).args(args), Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{program} {args:?} failed\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// qemu-io exits 0 even when a pattern check fails, so its output is checked too.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    // Snapshot exports are read-only; qemu refuses to open them read-write.
    let mut args = if uri.contains('@') { vec!["-r", "-f", "raw"] } else { vec!["-f", "raw"] };
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = ok("qemu-io", &args);
    assert!(!out.contains("fail") && !out.contains("error"), "qemu-io {cmds:?}: {out}");
    out
}

pub struct Daemon {
    pub dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, &[])
    }

    pub fn start_with(dir: &Path, extra: &[&str]) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        // Only what this process writes counts: the log is shared across restarts.
        let log_start = log_file.metadata().unwrap().len() as usize;
        let child = Command::new(BIN)
            .args(["serve", "--dir"])
            .arg(dir)
            .args(["--nbd-listen", "none"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn snapblk");
        let mut d = Daemon { dir: dir.to_path_buf(), child: Some(child), log };
        d.wait_ready(log_start);
        d
    }

    /// The daemon prints its ready line after binding every socket.
    fn wait_ready(&mut self, log_start: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.get(log_start..).is_some_and(|new| new.contains("snapblk: serving")) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("snapblk exited ({status}) before it was ready:\n{log}");
            }
            assert!(Instant::now() < deadline, "snapblk not ready after 30 s:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGKILL, as a power cut would (for the process).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait; returns whether it exited with status 0.
    pub fn terminate(&mut self) -> bool {
        let mut c = self.child.take().expect("running");
        ok("kill", &["-TERM", &c.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("snapblk did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn socket(&self) -> String {
        self.dir.join("nbd.sock").display().to_string()
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket())
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        run(Command::new(BIN).arg("--dir").arg(&self.dir).args(args), Duration::from_secs(60))
    }

    /// Runs a CLI command, asserting success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "snapblk {args:?} failed: {}", text(&out.stderr));
        text(&out.stdout)
    }

    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.cli_ok(&a)).expect("JSON output")
    }

    /// Runs a CLI command that must fail; returns (exit code, stderr).
    pub fn cli_err(&self, args: &[&str]) -> (i32, String) {
        let out = self.cli(args);
        assert!(!out.status.success(), "snapblk {args:?} succeeded but should fail");
        (out.status.code().unwrap_or(-1), text(&out.stderr))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Debian's Python, which has the libnbd binding (python3-libnbd); a pyenv `python3` earlier
/// on PATH would not see it.
pub const PYTHON: &str = "/usr/bin/python3";

/// Whether python3-libnbd is usable (same skip/fail rule as [`require`]).
pub fn require_libnbd(test: &str) -> bool {
    let found = Command::new(PYTHON).args(["-c", "import nbd; nbd.NBD"]).output().is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("SNAPBLK_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{test}: python3-libnbd is not installed (run scripts/test to install it)");
        }
        eprintln!("SKIP: {test}: python3-libnbd not installed");
    }
    found
}

/// Path of a helper script in tests/py.
pub fn py(script: &str) -> String {
    format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"))
}
