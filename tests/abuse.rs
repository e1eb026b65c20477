//! Protocol abuse (tests/py/abuse.py): bad requests get the right error codes, broken
//! connections are dropped, and the daemon keeps serving a well-behaved client throughout.
//! And the limits that keep abusive clients from taking the daemon down (tests/py/limits.py):
//! bounded memory per connection, a cap on connections, a handshake timeout, and NBD served
//! on the unix socket (and loopback TCP on request) only.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn bad_requests_get_the_right_errors_and_other_clients_keep_being_served() {
    if !require_libnbd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&tmp.path().join("d"));
    d.cli_ok(&["volume", "create", "vol", "--size", "64M"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    let out = run(Command::new(PYTHON).args([&py("abuse.py"), &d.socket(), "vol", "vol@s1"]), Duration::from_secs(120));
    assert!(
        out.status.success(),
        "abuse.py failed:\n{}{}\ndaemon log:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        d.log()
    );
    assert!(text(&out.stdout).contains("all abuse cases handled"));
    assert!(d.is_running(), "the daemon died");
    assert!(!d.log().contains("panicked"), "the daemon panicked:\n{}", d.log());
    // And it still serves new clients.
    d.cli_ok(&["volume", "show", "vol"]);
}

/// The resident set of a process in KiB (`VmRSS` in /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// How much the daemon may grow while clients flood it with reads they never read the replies
/// of. Each connection holds at most 64 MiB of replies (plus as much in reusable buffers); with
/// no bound, two such clients grew the daemon to 12.7 GiB.
const FLOOD_GROWTH_LIMIT_KIB: u64 = 300 << 10;

#[test]
fn clients_that_never_read_their_replies_cannot_grow_the_daemon_and_others_are_still_served() {
    if !require_libnbd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&tmp.path().join("d"));
    d.cli_ok(&["volume", "create", "vol", "--size", "1G"]);
    let pid = d.pid();
    let baseline = rss_kib(pid);
    // Two connections, 400 reads of 32 MiB each (25 GiB of replies), not a byte read back;
    // a libnbd client writes and reads meanwhile for 5 s.
    let size = (32u64 << 20).to_string();
    let mut flood = Guard(
        Command::new(PYTHON)
            .args([&py("limits.py"), "flood", &d.socket(), "vol", "2", "400", &size, "5"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run limits.py"),
    );
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(flood.0.stdout.take().unwrap()));
    let stderr = drain(Box::new(flood.0.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut peak = baseline;
    let status = loop {
        let rss = rss_kib(pid);
        peak = peak.max(rss);
        // Stop at once past the limit: without one, the daemon would take the machine's memory.
        assert!(
            rss <= baseline + FLOOD_GROWTH_LIMIT_KIB,
            "the daemon grew from {} MiB to {} MiB while two clients pipelined reads without reading replies",
            baseline >> 10,
            rss >> 10
        );
        if let Some(status) = flood.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "limits.py flood did not finish within 120 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(status.success(), "limits.py flood failed ({status}):\n{stdout}{stderr}\ndaemon log:\n{}", d.log());
    assert!(stdout.contains("good client served"), "{stdout}");
    println!(
        "daemon RSS: {} MiB before, peak {} MiB (+{} MiB) while 2 clients pipelined 400 reads of 32 MiB each \
         without reading a reply\n{stdout}",
        baseline >> 10,
        peak >> 10,
        (peak - baseline) >> 10
    );
    assert!(d.is_running(), "the daemon died");
    d.cli_ok(&["volume", "show", "vol"]);
}

#[test]
fn connections_over_max_connections_are_closed_at_once_while_the_control_api_and_other_clients_work() {
    if !require_libnbd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_with(&tmp.path().join("d"), &["--max-connections", "8"]);
    d.cli_ok(&["volume", "create", "vol", "--size", "64M"]);
    let dir = d.dir.display().to_string();
    let out = python_ok("limits.py", &["cap", &d.socket(), "vol", "8", BIN, &dir], TOOL_TIMEOUT);
    assert!(out.contains("all limits cases handled"), "{out}");
    println!("{out}");
    // Five refusals within 10 s: one warning, rate-limited.
    let log = d.log();
    let warnings = log.lines().filter(|l| l.contains("NBD connection(s)") && l.contains("--max-connections")).count();
    assert_eq!(warnings, 1, "refusals should be warned about once per 10 s:\n{log}");
    assert!(d.is_running(), "the daemon died");
}

#[test]
fn a_connection_that_does_not_finish_its_handshake_is_dropped_after_the_handshake_timeout() {
    if !require_libnbd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_with(&tmp.path().join("d"), &["--handshake-timeout", "1s"]);
    d.cli_ok(&["volume", "create", "vol", "--size", "64M"]);
    let out = python_ok("limits.py", &["silent", &d.socket(), "vol", "1"], TOOL_TIMEOUT);
    assert!(out.contains("all limits cases handled"), "{out}");
    println!("{out}");
    assert!(d.log().contains("did not finish the handshake within 1s"), "{}", d.log());
    assert!(d.is_running(), "the daemon died");
}

#[test]
fn serve_refuses_a_non_loopback_nbd_listen_address_in_one_sentence() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    for addr in ["0.0.0.0:10809", "[::]:10809", "192.0.2.1:10809"] {
        let out = run(
            Command::new(BIN).args(["serve", "--dir"]).arg(&dir).args(["--nbd-listen", addr]).env_remove("SNAPBLK_DIR"),
            Duration::from_secs(30),
        );
        assert!(!out.status.success(), "serve --nbd-listen {addr} started");
        let err = text(&out.stderr);
        assert_one_sentence(&err);
        assert!(err.contains(addr) && err.contains("TLS") && err.contains("nbd.sock"), "{err}");
        assert!(!dir.exists(), "serve --nbd-listen {addr} created its directory before refusing");
    }
}

#[test]
fn serve_listens_on_the_unix_socket_only_unless_given_a_loopback_tcp_address() {
    let tmp = tempfile::tempdir().unwrap();
    // No --nbd-listen at all (the harness would add "none"): started by hand.
    let dir = tmp.path().join("default");
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let _daemon = Guard(
        Command::new(BIN)
            .args(["serve", "--dir"])
            .arg(&dir)
            .env_remove("SNAPBLK_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn snapblk"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = run(
            Command::new(BIN).arg("--dir").arg(&dir).args(["--json", "status"]).env_remove("SNAPBLK_DIR"),
            Duration::from_secs(30),
        );
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("status --json");
        }
        assert!(Instant::now() < deadline, "the daemon did not answer within 20 s: {}", text(&out.stderr));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status["nbd_tcp"].is_null(), "NBD over TCP without --nbd-listen: {status}");
    assert!(dir.join("nbd.sock").exists());

    let d = Daemon::start_with(&tmp.path().join("tcp"), &["--nbd-listen", "127.0.0.1:0"]);
    let status = d.cli_json(&["status"]);
    let tcp = status["nbd_tcp"].as_str().unwrap_or_else(|| panic!("no TCP listener: {status}"));
    assert!(tcp.starts_with("127.0.0.1:"), "{tcp}");
    std::net::TcpStream::connect(tcp).expect("connect to the loopback NBD listener");
}
