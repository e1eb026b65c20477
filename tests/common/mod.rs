//! Harness for integration tests: starts the real `snapblk` binary in a temporary directory
//! and runs real clients against it, each with a timeout so a hang fails instead of blocking.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod store;
pub mod tls;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_snapblk");

/// Debian's Python, which has the libnbd binding (python3-libnbd); a pyenv `python3` earlier
/// on PATH would not see it.
pub const PYTHON: &str = "/usr/bin/python3";

/// How long one external command may take before the test fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the daemon may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The name of the running test (libtest names each test's thread after the test).
pub fn test_name() -> String {
    std::thread::current().name().unwrap_or("unknown test").to_string()
}

fn tools_required() -> bool {
    std::env::var("SNAPBLK_REQUIRE_TOOLS").as_deref() == Ok("1")
}

/// Whether an external tool is installed. With `SNAPBLK_REQUIRE_TOOLS=1` (scripts/test sets
/// it) a missing tool fails the test; otherwise the test prints that it skips and returns.
pub fn require_tool(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| is_executable(&p.join(tool))));
    skip_unless(found, tool)
}

/// Whether python3-libnbd is usable from [`PYTHON`] (same skip/fail rule as [`require_tool`]).
pub fn require_libnbd() -> bool {
    let found = Command::new(PYTHON)
        .args(["-c", "import nbd; nbd.NBD()"])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    skip_unless(found, "python3-libnbd")
}

fn skip_unless(found: bool, tool: &str) -> bool {
    if !found {
        let test = test_name();
        if tools_required() {
            panic!("{test}: {tool} is not installed and SNAPBLK_REQUIRE_TOOLS=1 (run scripts/test to install it)");
        }
        eprintln!("SKIP: {test}: {tool} not installed");
    }
    found
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command to completion within `timeout`; kills it and panics on timeout. Output is
/// drained by threads while waiting, so a chatty tool cannot block on a full pipe.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut child = child.unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (out.join().unwrap(), err.join().unwrap());
            panic!("timed out after {timeout:?}: {desc}\nstdout: {}\nstderr: {}", text(&o), text(&e));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // A grandchild that inherited the pipes could keep them open; the tools used here do not.
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// Runs a command with a timeout and asserts it succeeded; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd, TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "{desc} failed ({})\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs a program with a timeout and asserts success; returns stdout.
pub fn ok(program: &str, args: &[&str]) -> String {
    run_ok(Command::new(program).args(args))
}

/// Runs a helper script from tests/py with [`PYTHON`], asserting success; returns stdout.
/// Its output is part of the failure message.
pub fn python_ok(script: &str, args: &[&str], timeout: Duration) -> String {
    let out = run(Command::new(PYTHON).arg(py(script)).args(args), timeout);
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// qemu-io with each `cmds` entry as a `-c` command. qemu-io can exit 0 when a pattern check
/// fails, so its output is checked too.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    // Snapshot exports are read-only; qemu refuses to open them read-write.
    let mut args = if uri.contains('@') || uri.contains("%40") { vec!["-r", "-f", "raw"] } else { vec!["-f", "raw"] };
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = ok("qemu-io", &args);
    let lower = out.to_lowercase();
    assert!(!lower.contains("fail") && !lower.contains("error"), "qemu-io {uri} {cmds:?}:\n{out}");
    out
}

/// Path of a helper script in tests/py.
pub fn py(script: &str) -> String {
    format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"))
}

/// A child process killed (SIGKILL, by its own pid) when dropped, e.g. when a test panics.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Writes a `snapblk.toml` that keeps uploaded snapshots local for an hour: for tests about
/// local snapshot behaviour (rollback, clone, dirty bitmaps between snapshots), which the
/// default (release right after upload) would otherwise race. The store suite covers release.
pub fn keep_snapshots_local(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("snapblk.toml"), "[upload]\ninstant_access_retention = \"1h\"\n").unwrap();
}

/// A `snapblk serve` process on a directory of its own, serving NBD on `DIR/nbd.sock` only.
pub struct Daemon {
    pub dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, &[])
    }

    /// Starts with extra `serve` arguments; `--nbd-listen none` unless `extra` sets it.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::try_start(dir, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the daemon and waits until it is ready; Err (with its log) if it exits first or
    /// is not ready within 20 s (then it is killed).
    pub fn try_start(dir: &Path, extra: &[&str]) -> Result<Daemon, String> {
        std::fs::create_dir_all(dir).unwrap();
        // stderr goes to a log file in DIR, appended across restarts of the same directory.
        let log = dir.join("snapblk-test.log");
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let log_start = log_file.metadata().unwrap().len() as usize;
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--dir"]).arg(dir);
        if !extra.contains(&"--nbd-listen") {
            cmd.args(["--nbd-listen", "none"]);
        }
        let child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            // Test daemons may inject store faults (`[regions.NAME.faults]`).
            .env("SNAPBLK_TEST_FAULTS", "1")
            .env_remove("SNAPBLK_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn snapblk");
        let mut d = Daemon { dir: dir.to_path_buf(), child: Some(child), log };
        d.wait_ready(log_start)?;
        Ok(d)
    }

    /// Ready = the ready line appeared in this run's part of the log and both sockets exist.
    fn wait_ready(&mut self, log_start: usize) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let log = self.log();
            let printed = log.get(log_start..).is_some_and(|new| new.contains("snapblk: serving"));
            if printed && self.dir.join("control.sock").exists() && self.dir.join("nbd.sock").exists() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                return Err(format!("snapblk serve exited ({status}) before it was ready:\n{log}"));
            }
            if Instant::now() > deadline {
                self.kill9();
                return Err(format!("snapblk serve not ready after {READY_TIMEOUT:?}:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGKILL (by the recorded child pid), as a crash would; waits for the process to go.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            c.wait().unwrap();
        }
    }

    /// SIGTERM (by the recorded pid) and wait up to 30 s; returns whether it exited with 0.
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
                let _ = c.wait();
                panic!("snapblk did not stop within 30 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn socket(&self) -> String {
        self.dir.join("nbd.sock").display().to_string()
    }

    /// The URI of an export on the unix socket (`VOLUME` or `VOLUME@SNAPSHOT`).
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket())
    }

    /// Runs the CLI with `--dir DIR` (60 s timeout).
    pub fn cli(&self, args: &[&str]) -> Output {
        run(Command::new(BIN).arg("--dir").arg(&self.dir).args(args).env_remove("SNAPBLK_DIR"), Duration::from_secs(60))
    }

    /// Runs a CLI command, asserting success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "snapblk {args:?} failed ({}): {}{}",
            out.status,
            text(&out.stderr),
            text(&out.stdout)
        );
        text(&out.stdout)
    }

    /// Runs a CLI command with `--json`, asserting success; returns the parsed output.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.cli_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("snapblk {a:?}: output is not JSON ({e}):\n{out}"))
    }

    /// Runs a CLI command that must fail; returns (exit code, stderr).
    pub fn cli_err(&self, args: &[&str]) -> (i32, String) {
        let out = self.cli(args);
        assert!(!out.status.success(), "snapblk {args:?} succeeded but should fail: {}", text(&out.stdout));
        (out.status.code().unwrap_or(-1), text(&out.stderr))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let was_running = self.child.is_some();
        self.kill9();
        if std::thread::panicking() && was_running {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of the snapblk log ({}) ---\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// Asserts the one-sentence error style of the CLI: a non-empty message on one line.
pub fn assert_one_sentence(stderr: &str) {
    let msg = stderr.trim();
    assert!(!msg.is_empty(), "the error message is empty");
    assert_eq!(msg.lines().count(), 1, "the error should be one line:\n{msg}");
}

/// `nbdinfo --map[=CONTEXT] --json` as (offset, length, type) triples.
pub fn nbd_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u64)> {
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
pub fn ranges_with(map: &[(u64, u64, u64)], flags: u64) -> Vec<(u64, u64)> {
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

/// One HTTP/1.1 request on `DIR/control.sock`, as any client would send it: (status line,
/// headers in lower case, body). Panics (instead of hanging) if the daemon does not answer
/// within 30 s.
pub fn control_http(
    dir: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
) -> (String, Vec<(String, String)>, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("control.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: snapblk\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a complete HTTP answer");
    let mut lines = head.lines();
    let status = lines.next().unwrap().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}
