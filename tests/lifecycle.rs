//! Snapshot policies, retention, holds, the recycle bin, quotas and events, on the real
//! binary: policies fire on their own (`--every 1s`), retention keeps what it says and touches
//! no manual snapshot, a hold stops every delete, a failed upload stops pruning, kill -9 in the
//! middle of ticks loses no snapshot from a policy's books, a snapshot restored from the bin
//! (after GC ran) has its content, quotas answer 409 / 429 with Retry-After, and the event log
//! lists and follows what happened.

mod common;

use std::time::{Duration, Instant};

use common::store::{compare, fill, nbd_to_file, tools, wait_available, MIB};
use common::{assert_one_sentence, control_http, Daemon, Guard, BIN};

/// The snapshots of `volume` as (name, policies).
fn snapshots(d: &Daemon, volume: &str) -> Vec<(String, Vec<String>)> {
    let list = d.cli_json(&["snapshot", "list", volume]);
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let policies = s["policies"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
            (s["name"].as_str().unwrap().to_string(), policies)
        })
        .collect()
}

fn auto(d: &Daemon, volume: &str) -> Vec<String> {
    snapshots(d, volume).into_iter().filter(|(n, _)| n.starts_with("auto-")).map(|(n, _)| n).collect()
}

/// Waits until `policy` has recorded at least `n` ticks on `volume`.
fn wait_ticks(d: &Daemon, policy: &str, volume: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = d.cli_json(&["policy", "history", policy, volume]);
        if h.as_array().unwrap().len() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "policy {policy} made fewer than {n} ticks on {volume} in 30 s: {h}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_every_second_policy_keeps_the_last_three_of_each_volume_and_no_manual_snapshot_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"));
    for v in ["a", "b"] {
        d.cli_ok(&["volume", "create", v, "--size", "16M"]);
        d.cli_ok(&["snapshot", "create", v, "--name", "manual"]);
    }
    d.cli_ok(&["policy", "create", "often", "--every", "1s", "--keep-last", "3"]);
    d.cli_ok(&["policy", "apply", "often", "a", "b"]);
    wait_ticks(&d, "often", "a", 6);
    wait_ticks(&d, "often", "b", 6);
    // Stop the ticks, and let one still running finish its prune.
    d.cli_ok(&["policy", "remove", "often", "a", "b"]);
    std::thread::sleep(Duration::from_millis(1500));
    for v in ["a", "b"] {
        let snaps = snapshots(&d, v);
        assert!(snaps.iter().any(|(n, p)| n == "manual" && p.is_empty()), "{v}: {snaps:?}");
        assert_eq!(auto(&d, v).len(), 3, "{v}: {snaps:?}");
    }
    let history = d.cli_json(&["policy", "history", "often", "a"]);
    assert!(
        history.as_array().unwrap().iter().any(|e| !e["removed"].as_array().unwrap().is_empty()),
        "retention removed something: {history}"
    );
    // The policy and its history survive a restart.
    drop(d);
    let d = Daemon::start(&tmp.path().join("d"));
    let shown = d.cli_json(&["policy", "show", "often"]);
    assert_eq!(shown["retention"]["keep_last"], 3);
    assert!(d.cli_json(&["policy", "history", "often"]).as_array().unwrap().len() >= 12);
}

#[test]
fn a_hold_stops_deletes_by_hand_and_by_retention_until_released() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"));
    d.cli_ok(&["volume", "create", "v", "--size", "16M"]);
    // Fires hourly: only run-now ticks here.
    d.cli_ok(&["policy", "create", "p", "--every", "1h", "--keep-last", "1"]);
    d.cli_ok(&["policy", "apply", "p", "v"]);
    d.cli_ok(&["policy", "run-now", "p"]);
    let first = auto(&d, "v").pop().unwrap();
    let first_ref = format!("v@{first}");
    d.cli_ok(&["snapshot", "hold", &first_ref, "--reason", "legal case 7"]);
    std::thread::sleep(Duration::from_millis(1100));
    d.cli_ok(&["policy", "run-now", "p"]);
    std::thread::sleep(Duration::from_millis(1100));
    d.cli_ok(&["policy", "run-now", "p"]);
    let names = auto(&d, "v");
    assert_eq!(names.len(), 2, "keep-last 1 plus the held one: {names:?}");
    assert!(names.contains(&first));
    let (code, err) = d.cli_err(&["snapshot", "delete", &first_ref]);
    assert_ne!(code, 0);
    assert_one_sentence(&err);
    assert!(err.contains("held (legal case 7)") && err.contains("snapblk snapshot release-hold"), "{err}");
    assert_eq!(d.cli_json(&["snapshot", "show", &first_ref])["hold"]["reason"], "legal case 7");
    d.cli_ok(&["snapshot", "release-hold", &first_ref]);
    // Released: retention takes it at the next tick.
    std::thread::sleep(Duration::from_millis(1100));
    d.cli_ok(&["policy", "run-now", "p"]);
    assert!(!auto(&d, "v").contains(&first));
    // A hold on a manual snapshot stops its delete too, and a release lets it go.
    d.cli_ok(&["snapshot", "create", "v", "--name", "keep"]);
    d.cli_ok(&["snapshot", "hold", "v@keep"]);
    let (_, err) = d.cli_err(&["snapshot", "delete", "v@keep"]);
    assert!(err.contains("is held since"), "{err}");
    d.cli_ok(&["snapshot", "release-hold", "v@keep"]);
    d.cli_ok(&["snapshot", "delete", "v@keep"]);
}

#[test]
fn a_failed_upload_stops_pruning() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    drop(Daemon::start(&dir)); // writes the default configuration
    let config = std::fs::read_to_string(dir.join("snapblk.toml")).unwrap();
    std::fs::write(dir.join("snapblk.toml"), format!("{config}\n[regions.local.faults]\nerror_rate = 1.0\n")).unwrap();
    let d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "v", "--size", "16M"]);
    d.cli_ok(&["policy", "create", "p", "--every", "1h", "--keep-last", "1", "--after-upload"]);
    d.cli_ok(&["policy", "apply", "p", "v"]);
    for _ in 0..2 {
        let ticks = d.cli_json(&["policy", "run-now", "p"]);
        let tick = &ticks[0];
        assert_eq!(tick["outcome"], "failed", "{ticks}");
        assert!(tick["reason"].as_str().unwrap().contains("upload failed"), "{ticks}");
        std::thread::sleep(Duration::from_millis(1100));
    }
    // Without --after-upload too: the earlier snapshots' failed uploads keep them all.
    d.cli_ok(&["policy", "delete", "p"]);
    d.cli_ok(&["policy", "create", "q", "--every", "1h", "--keep-last", "1"]);
    d.cli_ok(&["policy", "apply", "q", "v"]);
    d.cli_ok(&["policy", "run-now", "q"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.cli_json(&["snapshot", "list", "v"])[2]["upload"]["state"] != "failed" {
        assert!(Instant::now() < deadline, "the upload did not fail in 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1100));
    let ticks = d.cli_json(&["policy", "run-now", "q"]);
    assert_eq!(ticks[0]["outcome"], "taken");
    assert!(ticks[0]["reason"].as_str().unwrap().contains("nothing pruned"), "{ticks}");
    assert_eq!(auto(&d, "v").len(), 4, "nothing was pruned");
}

#[test]
fn kill_9_during_ticks_loses_no_snapshot_from_the_books_and_duplicates_none() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let mut d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "v", "--size", "16M"]);
    d.cli_ok(&["policy", "create", "p", "--every", "1s", "--keep-last", "2"]);
    d.cli_ok(&["policy", "apply", "p", "v"]);
    // Kills at moments spread over a tick's steps.
    for pause in [1300u64, 1570, 1810, 2090, 1150, 1730] {
        std::thread::sleep(Duration::from_millis(pause));
        d.kill9();
        d = Daemon::start(&dir);
    }
    // The policy keeps ticking: a snapshot its tick has just created may not be booked for a
    // few milliseconds, so look until a list shows every snapshot booked (one lost from the
    // books never would be) with keep-last applied.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snaps = snapshots(&d, "v");
        let booked = !snaps.is_empty() && snaps.iter().all(|(_, p)| p == &["p"]);
        if booked && snaps.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "snapshots missing from the policy's books, or not pruned: {snaps:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let history = d.cli_json(&["policy", "history", "p", "v"]);
    let names: Vec<&str> = history.as_array().unwrap().iter().filter_map(|e| e["snapshot"].as_str()).collect();
    let mut unique = names.clone();
    unique.dedup();
    assert_eq!(names, unique, "no snapshot is booked twice");
}

#[test]
fn bad_policies_are_refused_with_a_sentence() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"));
    for (args, says) in [
        (vec!["policy", "create", "p", "--cron", "0 0 31 feb *"], "never fires"),
        (vec!["policy", "create", "p", "--at", "25:00"], "HH:MM"),
        (vec!["policy", "create", "p", "--at", "02:00", "--tz", "Mars/Base"], "IANA"),
        (vec!["policy", "show", "nope"], "no policy named 'nope'"),
    ] {
        let (code, err) = d.cli_err(&args);
        // Usage (2), but a policy that does not exist is not found (4).
        assert_eq!(code, if args[1] == "show" { 4 } else { 2 }, "{args:?}");
        assert_one_sentence(&err);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// A daemon on a fresh directory whose snapblk.toml is `config` (every other setting has its
/// default, and the `local` region is always there).
fn start_configured(dir: &std::path::Path, config: &str) -> Daemon {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("snapblk.toml"), config).unwrap();
    Daemon::start(dir)
}

#[test]
fn a_snapshot_restored_from_the_bin_has_its_content_after_gc_and_a_restart() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let d = start_configured(&dir, "[recycle_bin]\nretention = \"1h\"\n[gc]\ninterval = \"0s\"\ngrace = \"0s\"");
    d.cli_ok(&["volume", "create", "v", "--size", "8M"]);
    fill(&d, "v", 0, 4 * MIB, 7);
    d.cli_ok(&["snapshot", "create", "v", "--name", "s1"]);
    let id = wait_available(&d, "v@s1")["id"].as_str().unwrap().to_string();
    let before = tmp.path().join("s1.raw");
    nbd_to_file(&d, "v@s1", &before);
    fill(&d, "v", 0, 8 * MIB, 8);

    d.cli_ok(&["snapshot", "delete", "v@s1"]);
    assert!(snapshots(&d, "v").is_empty(), "a deleted snapshot is not listed");
    let (code, err) = d.cli_err(&["snapshot", "show", "v@s1"]);
    assert_eq!(code, 4);
    assert!(err.contains("recycle bin") && err.contains(&id), "{err}");
    let bin = d.cli_json(&["recycle-bin", "list"]);
    assert_eq!(bin["snapshots"][0]["id"], id.as_str(), "{bin}");
    assert_eq!(bin["retention"], 3600);
    // GC keeps what the bin holds; the bin survives a restart.
    d.cli_ok(&["gc", "--grace", "0s"]);
    drop(d);
    let d = Daemon::start(&dir);
    d.cli_ok(&["snapshot", "restore-deleted", &id]);
    let after = tmp.path().join("s1-again.raw");
    nbd_to_file(&d, "v@s1", &after);
    compare(&before, &after);
    d.cli_ok(&["snapshot", "verify", "v@s1"]);

    // Purged, it is gone for good, from here and from the store.
    d.cli_ok(&["snapshot", "delete", "v@s1"]);
    d.cli_ok(&["recycle-bin", "purge", &id]);
    assert!(d.cli_json(&["recycle-bin", "list"])["snapshots"].as_array().unwrap().is_empty());
    let stored = d.cli_json(&["snapshot", "list", "--region", "local"]);
    assert!(!stored.to_string().contains(&id), "{stored}");
    let (code, err) = d.cli_err(&["snapshot", "restore-deleted", &id]);
    assert_eq!(code, 4);
    assert_one_sentence(&err);
}

#[test]
fn quotas_answer_409_or_429_with_retry_after_and_say_which_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[quotas]\nmax_snapshots_manual = 1\n[quotas.volumes.slow]\nmin_snapshot_interval = \"1h\"";
    let d = start_configured(&tmp.path().join("d"), config);
    for v in ["v", "slow"] {
        d.cli_ok(&["volume", "create", v, "--size", "4M"]);
        d.cli_ok(&["snapshot", "create", v, "--name", "first"]);
    }
    let (code, err) = d.cli_err(&["snapshot", "create", "v", "--name", "second"]);
    assert_eq!(code, 5);
    assert!(err.contains("max_snapshots_manual"), "{err}");
    assert_one_sentence(&err);
    let (status, _, body) = control_http(&d.dir, "POST", "/v1/volumes/v/snapshots", r#"{"name":"second"}"#);
    assert!(status.contains(" 409 "), "{status}: {body}");
    assert!(body.contains(r#""kind":"quota""#), "{body}");

    let (status, headers, body) = control_http(&d.dir, "POST", "/v1/volumes/slow/snapshots", r#"{"name":"second"}"#);
    assert!(status.contains(" 429 "), "{status}: {body}");
    assert!(body.contains("min_snapshot_interval") && body.contains(r#""kind":"throttled""#), "{body}");
    let retry: u64 = headers.iter().find(|(k, _)| k == "retry-after").expect("Retry-After").1.parse().unwrap();
    assert!((3590..=3600).contains(&retry), "Retry-After: {retry}");

    let q = d.cli_json(&["volume", "quota", "v"]);
    assert_eq!((q["manual_snapshots"].as_u64(), q["quotas"]["max_snapshots_manual"].as_u64()), (Some(1), Some(1)));
    let hits = d.cli_json(&["events"]);
    assert_eq!(hits.as_array().unwrap().iter().filter(|e| e["type"] == "quota_hit").count(), 3, "{hits}");
}

#[test]
fn events_are_listed_persisted_and_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "v", "--size", "4M"]);
    d.cli_ok(&["snapshot", "create", "v", "--name", "a"]);
    d.cli_ok(&["snapshot", "delete", "v@a"]);
    drop(d);
    let d = Daemon::start(&dir);
    let events = d.cli_json(&["events"]);
    let kinds: Vec<&str> = events.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["snapshot_taken", "snapshot_deleted"], "{events}\n{}", d.log());
    assert_eq!(events[1]["to_bin"], false);
    assert!(d.cli_ok(&["events"]).contains("snapshot deleted: "), "text form");

    // --follow: the events that come, as JSON lines.
    let child = std::process::Command::new(BIN)
        .args(["--dir", dir.to_str().unwrap(), "--json", "events", "--follow", "--limit", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut follow = Guard(child);
    let lines = std::io::BufRead::lines(std::io::BufReader::new(follow.0.stdout.take().unwrap()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first: serde_json::Value = serde_json::from_str(&rx.recv_timeout(Duration::from_secs(10)).unwrap()).unwrap();
    assert_eq!(first["type"], "snapshot_deleted", "the newest first: {first}");
    d.cli_ok(&["snapshot", "create", "v", "--name", "b"]);
    let next: serde_json::Value = serde_json::from_str(&rx.recv_timeout(Duration::from_secs(10)).unwrap()).unwrap();
    assert_eq!((next["type"].as_str(), next["snapshot"].as_str()), (Some("snapshot_taken"), Some("b")), "{next}");
}

#[test]
fn skip_if_unchanged_skips_a_tick_when_nothing_was_written() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"));
    d.cli_ok(&["volume", "create", "v", "--size", "4M"]);
    d.cli_ok(&["policy", "create", "p", "--every", "1h", "--keep-last", "5", "--skip-if-unchanged"]);
    d.cli_ok(&["policy", "apply", "p", "v"]);
    let tick = |want: &str| {
        std::thread::sleep(Duration::from_millis(1100)); // a new second: a new snapshot name
        let t = d.cli_json(&["policy", "run-now", "p"]);
        assert_eq!(t[0]["outcome"], want, "{t}");
        t
    };
    tick("taken");
    let skipped = tick("skipped");
    assert!(skipped[0]["reason"].as_str().unwrap().contains("nothing was written"), "{skipped}");
    common::qemu_io(&d.nbd_uri("v"), &["write -P 0x5a 0 64k"]);
    tick("taken");
    assert_eq!(auto(&d, "v").len(), 2);
}
