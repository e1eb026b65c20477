//! What an operator reads: `--json` output, exit codes, API errors and the route list,
//! progress that follows the work, and the words of messages (issue 25). Real binary, real
//! clients.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::store::{configure, fill, rand_u64, regions, tools, wait_upload, MIB};
use common::{control_http, run, text, Daemon, BIN};
use serde_json::Value;

/// Runs `snapblk --json ARGS`; (exit code, stdout parsed as exactly one JSON document, stderr).
fn json_run(d: &Daemon, args: &[&str]) -> (i32, Value, String) {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = d.cli(&a);
    let stdout = text(&out.stdout);
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("snapblk {a:?}: stdout is not one JSON document ({e}):\n{stdout}"));
    (out.status.code().unwrap_or(-1), v, text(&out.stderr))
}

fn json_ok(d: &Daemon, args: &[&str]) -> Value {
    let (code, v, err) = json_run(d, args);
    assert_eq!(code, 0, "snapblk {args:?}: {err}");
    v
}

/// Asserts a failure's exit code and its JSON error object's code.
fn json_err(d: &Daemon, args: &[&str], exit: i32, code: &str) -> String {
    let (got, v, err) = json_run(d, args);
    assert_eq!(got, exit, "snapblk {args:?}: {v} {err}");
    assert_eq!(v["error"]["code"], code, "snapblk {args:?}: {v}");
    let message = v["error"]["message"].as_str().expect("a message").to_string();
    assert!(!message.is_empty() && !message.contains('\n'), "{message}");
    message
}

/// A region whose S3 endpoint refuses connections (port 1 on loopback), besides `local`.
fn write_config_with_dead_region(dir: &Path, upload: &str) {
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    let key = run_ok_text(Command::new(BIN).args(["key", "generate"]));
    std::fs::write(dir.join("keys/dead.key"), key).unwrap();
    std::fs::write(dir.join("keys/dead.secret"), "secret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in ["keys/dead.key", "keys/dead.secret"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(
        dir.join("snapblk.toml"),
        format!(
            "[upload]\n{upload}\n[regions.local]\nkind = \"fs\"\npath = \"store\"\n\n[regions.dead]\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:1\"\nbucket = \"b\"\nregion = \"garage\"\naccess_key_id = \"GK1\"\nsecret_access_key_file = \"keys/dead.secret\"\nkey_file = \"keys/dead.key\"\nrequest_timeout = \"2s\"\nretries = 1\n"
        ),
    )
    .unwrap();
}

fn run_ok_text(cmd: &mut Command) -> String {
    let out = run(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn every_json_command_prints_exactly_one_json_document() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    write_config_with_dead_region(&dir, "");
    let d = Daemon::start(&dir);
    json_ok(&d, &["volume", "create", "vol", "--size", "16M"]);
    json_ok(&d, &["volume", "list"]);
    json_ok(&d, &["volume", "show", "vol"]);
    json_ok(&d, &["volume", "quota", "vol"]);
    // Progress goes to stderr: stdout is the snapshot alone.
    let s = json_ok(&d, &["snapshot", "create", "vol", "--name", "s1", "--wait"]);
    assert_eq!(s["upload"]["state"], "available", "{s}");
    json_ok(&d, &["snapshot", "create", "vol", "--name", "s2", "--durable"]);
    json_ok(&d, &["snapshot", "list"]);
    json_ok(&d, &["snapshot", "list", "--region", "local"]);
    json_ok(&d, &["snapshot", "show", "vol@s1"]);
    json_ok(&d, &["snapshot", "upload", "vol@s1", "--wait"]);
    let report = json_ok(&d, &["snapshot", "verify", "vol@s1"]);
    assert!(report["problems"].as_array().unwrap().is_empty(), "{report}");
    let out = tmp.path().join("s1.raw");
    let e = json_ok(&d, &["snapshot", "export", "vol@s1", "--output", out.to_str().unwrap()]);
    assert_eq!(e["exported"], "vol@s1");
    assert!(out.exists());
    json_ok(&d, &["snapshot", "hold", "vol@s1", "--reason", "audit"]);
    json_ok(&d, &["snapshot", "release-hold", "vol@s1"]);
    json_ok(&d, &["volume", "clone", "vol@s1", "c1"]);
    json_ok(&d, &["policy", "create", "p", "--every", "1h", "--keep-last", "2"]);
    json_ok(&d, &["policy", "list"]);
    json_ok(&d, &["policy", "show", "p"]);
    assert_eq!(json_ok(&d, &["policy", "delete", "p"])["deleted"], "p");
    json_ok(&d, &["recycle-bin", "list"]);
    json_ok(&d, &["events", "--limit", "5"]);
    json_ok(&d, &["region", "list"]);
    json_ok(&d, &["region", "show", "local"]);
    json_ok(&d, &["gc", "--region", "local"]);
    assert!(json_ok(&d, &["key", "generate"])["content"].as_str().unwrap().contains("snapblk"));
    assert_eq!(json_ok(&d, &["key", "export", "local"])["region"], "local");
    let st = json_ok(&d, &["status"]);
    assert_eq!(st["upload"], true, "{st}");
    assert_eq!(json_ok(&d, &["snapshot", "delete", "vol@s2"])["deleted"], "vol@s2");
    assert_eq!(json_ok(&d, &["volume", "delete", "c1"])["deleted"], "c1");
}

#[test]
fn errors_are_json_objects_with_an_exit_code_per_class() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    write_config_with_dead_region(&dir, "");
    let d = Daemon::start(&dir);
    json_ok(&d, &["volume", "create", "vol", "--size", "16M"]);
    json_ok(&d, &["snapshot", "create", "vol", "--name", "s1"]);
    // usage (2): what the CLI parses, and what the daemon finds invalid
    json_err(&d, &["volume", "frobnicate"], 2, "usage");
    json_err(&d, &["volume", "create", "x", "--size", "12Q"], 2, "usage");
    let m = json_err(&d, &["volume", "create", "x", "--size", "65T"], 2, "usage");
    assert!(m.contains("--size 65T is too large") && m.contains("64.0 TiB"), "{m}");
    json_err(&d, &["volume", "create", "bad/name", "--size", "1G"], 2, "invalid");
    // not found (4)
    json_err(&d, &["snapshot", "show", "vol@nope"], 4, "not_found");
    json_err(&d, &["volume", "show", "nope"], 4, "not_found");
    // refused (5): a conflict, a busy volume
    json_err(&d, &["volume", "create", "vol", "--size", "1G"], 5, "already_exists");
    json_err(&d, &["volume", "delete", "vol"], 5, "busy");
    // the store is unreachable (6), and the message names the root cause once
    let m = json_err(&d, &["snapshot", "list", "--region", "dead"], 6, "store_unavailable");
    assert!(m.to_lowercase().contains("connection refused"), "{m}");
    // no daemon (3)
    let empty = tempfile::tempdir().unwrap();
    let out = run(
        Command::new(BIN).arg("--json").arg("--dir").arg(empty.path()).args(["volume", "list"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(3));
    let v: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(v["error"]["code"], "no_daemon");
    // Without --json: the sentence on stderr, nothing on stdout, the same codes.
    let out = d.cli(&["snapshot", "show", "vol@nope"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(out.stdout.is_empty() && text(&out.stderr).starts_with("error: "), "{}", text(&out.stderr));
}

#[test]
fn the_api_answers_every_error_with_json_and_publishes_its_routes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(&tmp.path().join("d"), &["--default-volume", "vol:16M"]);
    // A method the route does not serve: 405, JSON, and which methods it does serve.
    let (status, headers, body) = control_http(&d.dir, "GET", "/v1/volumes/vol/attach", "");
    assert!(status.contains(" 405 "), "{status}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert!(v["error"].as_str().unwrap().contains("POST"), "{v}");
    assert_eq!(v["kind"], "invalid");
    assert!(headers.iter().any(|(k, v)| k == "allow" && v.contains("POST")), "{headers:?}");
    let (status, _, body) = control_http(&d.dir, "DELETE", "/v1/status", "");
    assert!(status.contains(" 405 ") && serde_json::from_str::<Value>(&body).is_ok(), "{status} {body}");
    // An unknown route: 404, JSON, and where the routes are listed.
    let (status, _, body) = control_http(&d.dir, "GET", "/v1/nope", "");
    assert!(status.contains(" 404 "), "{status}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("/v1/openapi.json"), "{v}");
    // The served document is the published one, and lists every route the CLI uses.
    let (status, _, body) = control_http(&d.dir, "GET", "/v1/openapi.json", "");
    assert!(status.contains(" 200 "), "{status}");
    let served: Value = serde_json::from_str(&body).unwrap();
    let published: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(served, published);
    assert_eq!(served["openapi"], "3.0.3");
    for (path, method) in [
        ("/v1/volumes", "post"),
        ("/v1/volumes/{r}/snapshots", "post"),
        ("/v1/snapshots/{r}", "delete"),
        ("/v1/jobs/{id}", "get"),
    ] {
        let op = &served["paths"][path][method];
        assert!(op["summary"].is_string(), "{path} {method}: {op}");
    }
    // Every GET route without parameters answers 200 with JSON: the document is not fiction.
    for (path, ops) in served["paths"].as_object().unwrap() {
        if path.contains('{') || ops.get("get").is_none() {
            continue;
        }
        let (status, _, body) = control_http(&d.dir, "GET", path, "");
        assert!(status.contains(" 200 "), "GET {path}: {status} {body}");
        serde_json::from_str::<Value>(&body).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    }
}

#[test]
fn upload_progress_follows_the_bytes_the_store_acknowledges_and_prints_each_line_once() {
    if !tools() {
        return;
    }
    let region = &regions()[0];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    // 8 MiB/s over all uploads; 24 MiB of random data take about 3 s to send.
    configure(&dir, region, "bandwidth_limit = \"8M\"\n", "");
    let d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "vol", "--size", "64M", "--region", "local"]);
    fill(&d, "vol", 0, 24 * MIB, rand_u64());
    let started = Instant::now();
    let s = d.cli_json(&["snapshot", "create", "vol", "--name", "s1"]);
    let name = "vol@s1";
    let mut samples = Vec::new();
    loop {
        let v = d.cli_json(&["snapshot", "show", name]);
        let u = &v["upload"];
        let elapsed = started.elapsed().as_secs_f64();
        if u["state"] != "uploading" {
            assert_eq!(u["state"], "available", "{v}");
            break;
        }
        samples.push((elapsed, u["bytes_done"].as_u64().unwrap(), u["bytes_total"].as_u64().unwrap()));
        assert!(elapsed < 60.0, "upload of {name} did not end: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed().as_secs_f64();
    assert!(took > 2.0, "24 MiB at 8 MiB/s took {took:.1}s: the limit did not apply");
    // Never ahead of what the limit lets through (plus one pack per PUT in flight and the
    // limiter's first second), and it does not sit at 100% while the PUTs still run.
    for &(t, done, total) in &samples {
        let allowed = (8.0 * MIB as f64 * (t + 1.0)) as u64 + 5 * MIB;
        assert!(done <= allowed, "at {t:.1}s: {done} bytes done, the limit allows {allowed}: {samples:?}");
        if t < took - 1.0 {
            assert!(done < total || total == 0, "at {t:.1}s of {took:.1}s: 100% already: {samples:?}");
        }
    }
    assert!(samples.windows(2).all(|w| w[0].1 <= w[1].1), "progress went back: {samples:?}");
    let _ = s;

    // --wait off a terminal: a line per change, never the same line twice.
    fill(&d, "vol", 32 * MIB, 24 * MIB, rand_u64());
    let out = d.cli(&["snapshot", "create", "vol", "--name", "s2", "--wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("uploading vol@s2")).collect();
    assert!(!lines.is_empty(), "no progress lines: {err}");
    let unique: std::collections::HashSet<&&str> = lines.iter().collect();
    assert_eq!(unique.len(), lines.len(), "repeated progress lines:\n{err}");
    assert!(!err.contains('\r'), "terminal rewriting off a terminal:\n{err:?}");
    // About a line per 5 s plus the first and last, for a ~3 s upload.
    assert!(lines.len() <= 4, "too many progress lines for a short upload:\n{err}");
}

#[test]
fn upload_off_is_said_and_loading_totals_are_the_snapshot_data() {
    if !tools() {
        return;
    }
    let region = &regions()[0];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    configure(&dir, region, "enabled = false\ninstant_access_retention = \"0s\"\n[hydrate]\nbackground = false\n", "");
    let d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "big", "--size", "100G", "--region", "local"]);
    fill(&d, "big", 0, 4 * MIB, rand_u64());
    let out = d.cli(&["snapshot", "create", "big", "--name", "s1", "--wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("automatic upload is off") && err.contains("snapblk snapshot upload big@s1"), "{err}");
    assert_eq!(d.cli_json(&["status"])["upload"], false);
    d.cli_ok(&["snapshot", "upload", "big@s1", "--wait"]);
    let id = wait_upload(&d, "big@s1", Duration::from_secs(60))["id"].as_str().unwrap().to_string();
    // Released (instant_access_retention = 0s): a volume made from it loads from the store.
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.cli_json(&["snapshot", "show", "big@s1"])["local"] != false {
        assert!(Instant::now() < deadline, "big@s1 was not released");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A volume from the snapshot in the store: what it has to load is 4 MiB, not 100 GiB.
    let v = d.cli_json(&["volume", "create", "restored", "--from-snapshot", &id, "--region", "local"]);
    let h = &v["hydration"];
    assert_eq!(h["state"], "on_demand", "{v}");
    assert_eq!(h["bytes_total"], 4 * MIB, "{v}");
    assert_eq!(h["bytes_loaded"], 0, "{v}");
    let shown = d.cli_ok(&["volume", "show", "restored"]);
    assert!(shown.contains("0 B of 4.0 MiB") && shown.contains("volume hydrate"), "{shown}");
    // Messages say names: the snapshot's parent, and plural words.
    d.cli_ok(&["snapshot", "create", "big", "--name", "s2"]);
    let shown = d.cli_ok(&["snapshot", "show", "big@s2"]);
    assert!(shown.contains("clusters since s1\n"), "{shown}");
    let verified = d.cli_ok(&["snapshot", "verify", "big@s1"]);
    // 4 MiB at the start of the volume: one map page, words in the singular where they are.
    assert!(verified.contains("in region local: 1 page, ") && verified.contains(" blobs, "), "{verified}");
    // A snapshot id the region does not have: its manifest is reported missing, in a region
    // that has a name.
    let out = d.cli(&["snapshot", "verify", "s-0123456789abcdef", "--region", "local"]);
    assert_eq!(out.status.code(), Some(1));
    let said = text(&out.stdout);
    assert!(said.contains("in region local:") && said.contains("missing"), "{said}");
}

#[test]
fn a_node_without_the_volume_resolves_volume_at_snapshot_in_the_region() {
    if !tools() {
        return;
    }
    let region = &regions()[0];
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    configure(&a, region, "", "");
    let da = Daemon::start(&a);
    da.cli_ok(&["volume", "create", "dbl", "--size", "8M", "--region", "local"]);
    fill(&da, "dbl", 0, MIB, rand_u64());
    da.cli_ok(&["snapshot", "create", "dbl", "--name", "nightly", "--wait"]);
    // Node B shares the region (the same store folder and key).
    std::fs::create_dir_all(&b).unwrap();
    let text_a = std::fs::read_to_string(a.join("snapblk.toml")).unwrap();
    let store = a.join("store");
    std::fs::write(
        b.join("snapblk.toml"),
        text_a.replace("path = \"store\"", &format!("path = \"{}\"", store.display())),
    )
    .unwrap();
    std::fs::create_dir_all(b.join("keys")).unwrap();
    for entry in std::fs::read_dir(a.join("keys")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), b.join("keys").join(entry.file_name())).unwrap();
    }
    let db = Daemon::start(&b);
    let v = db.cli_json(&["volume", "create", "web3", "--from-snapshot", "dbl@nightly", "--region", "local"]);
    assert_eq!(v["name"], "web3");
    let (code, err) = db.cli_err(&["volume", "create", "web4", "--from-snapshot", "dbl@nope", "--region", "local"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no snapshot 'dbl@nope'") && err.contains("snapshot list --region"), "{err}");
}

#[test]
fn with_the_store_down_snapshots_and_volumes_delete_at_once_and_the_store_deletes_wait_in_status() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    write_config_with_dead_region(&dir, "");
    let mut d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "v", "--size", "16M", "--region", "dead"]);
    d.cli_ok(&["snapshot", "create", "v", "--name", "s1"]);
    // Its upload fails (connection refused): nothing is in the store.
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.cli_json(&["snapshot", "show", "v@s1"])["upload"]["state"] == "uploading" {
        assert!(Instant::now() < deadline, "the upload to a dead region did not fail");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    d.cli_ok(&["snapshot", "delete", "v@s1"]);
    d.cli_ok(&["volume", "delete", "v"]);
    assert!(t.elapsed() < Duration::from_secs(2), "deletes waited for the store: {:?}", t.elapsed());
    // What the store may still hold is queued, visible, and kept over a restart.
    let st = d.cli_json(&["status"]);
    assert_eq!(st["store_deletes_pending"]["dead"], 1, "{st}");
    assert!(d.cli_ok(&["status"]).contains("still to delete from region dead"));
    assert!(d.terminate());
    let d = Daemon::start(&dir);
    assert_eq!(d.cli_json(&["status"])["store_deletes_pending"]["dead"], 1);
}
