//! Consistency groups with real clients: one cut across volumes is write-order consistent
//! (a libnbd client writing sequence numbers to two volumes in turn), a kill -9 during a group
//! snapshot leaves every member's snapshot or none, and membership and member deletes behave.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{py, require_libnbd, run, text, Daemon, Guard, BIN, PYTHON};

/// The sequence number at offset 0 of an export (`VOLUME@SNAPSHOT`).
fn seq(d: &Daemon, export: &str) -> u64 {
    let script =
        "import nbd,struct,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); print(struct.unpack('<Q', h.pread(8, 0))[0])";
    let out = run(Command::new(PYTHON).args(["-c", script, &d.nbd_uri(export)]), Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().parse().unwrap()
}

/// Runs the writer on volumes a and b while `cut(i)` takes snapshot `i` 50 times; returns the
/// (seq(a), seq(b)) of each snapshot.
fn under_load(d: &Daemon, dir: &Path, cut: impl Fn(usize)) -> Vec<(u64, u64)> {
    let stop = dir.join("stop");
    let mut writer = Guard(
        Command::new(PYTHON)
            .arg(py("seqwriter.py"))
            .args([&d.nbd_uri("a"), &d.nbd_uri("b"), &stop.display().to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..50 {
        cut(i);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(&stop, b"").unwrap();
    let mut written = String::new();
    std::io::Read::read_to_string(&mut writer.0.stdout.take().unwrap(), &mut written).unwrap();
    assert!(writer.0.wait().unwrap().success(), "the writer failed");
    assert!(written.trim().parse::<u64>().unwrap() > 50, "the writer barely ran: {written}");
    (0..50).map(|i| (seq(d, &format!("a@c{i}")), seq(d, &format!("b@c{i}")))).collect()
}

#[test]
fn a_group_snapshot_is_write_order_consistent_and_separate_snapshots_are_not() {
    if !require_libnbd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    // 100 snapshots a volume in seconds: no uploads (their task limit is not under test).
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("snapblk.toml"), "[upload]\nenabled = false\n").unwrap();
    let d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "a", "--size", "16M"]);
    d.cli_ok(&["volume", "create", "b", "--size", "16M"]);
    d.cli_ok(&["group", "create", "g", "a", "b"]);
    let seqs = under_load(&d, tmp.path(), |i| {
        d.cli_ok(&["group", "snapshot", "g", "--name", &format!("c{i}")]);
    });
    for (i, &(a, b)) in seqs.iter().enumerate() {
        // B's write n follows A's write n's acknowledgement, and A's n+1 follows B's n's.
        assert!(b <= a && a <= b + 1, "group snapshot c{i}: seq(a) = {a}, seq(b) = {b}: not one instant");
    }
    assert!(seqs.last().unwrap().0 > seqs[0].0, "the writes did not progress during the cuts: {seqs:?}");

    // The same check catches snapshots taken one volume after the other.
    let _ = std::fs::remove_file(tmp.path().join("stop"));
    for v in ["a", "b"] {
        for i in 0..50 {
            d.cli_ok(&["snapshot", "delete", &format!("{v}@c{i}"), "--force"]);
        }
    }
    let seqs = under_load(&d, tmp.path(), |i| {
        d.cli_ok(&["snapshot", "create", "a", "--name", &format!("c{i}")]);
        std::thread::sleep(Duration::from_millis(20));
        d.cli_ok(&["snapshot", "create", "b", "--name", &format!("c{i}")]);
    });
    let bad = seqs.iter().filter(|&&(a, b)| !(b <= a && a <= b + 1)).count();
    assert!(bad > 0, "separate snapshots passed the check every time: it cannot tell a bad cut: {seqs:?}");
}

const VOLS: [&str; 4] = ["v0", "v1", "v2", "v3"];

/// A daemon with volumes `VOLS` in group `g`.
fn group_of_four() -> (tempfile::TempDir, std::path::PathBuf, Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    common::keep_snapshots_local(&dir);
    let d = Daemon::start(&dir);
    for v in VOLS {
        d.cli_ok(&["volume", "create", v, "--size", "8M"]);
    }
    let mut args = vec!["group", "create", "g"];
    args.extend(VOLS);
    d.cli_ok(&args);
    (tmp, dir, d)
}

/// Drops the lines of `DIR/meta/lifecycle.log` that mention `what`: as if a crash had taken
/// those unsynced saves (a kill -9 right after the engine's cut, before the record's save).
fn lose_lifecycle_lines(dir: &Path, what: &str) -> usize {
    let log = dir.join("meta/lifecycle.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let kept: Vec<&str> = text.lines().filter(|l| !l.contains(what)).collect();
    let lost = text.lines().count() - kept.len();
    std::fs::write(&log, kept.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    lost
}

#[test]
fn kill_9_during_group_snapshots_leaves_every_member_or_none() {
    let (_tmp, dir, mut d) = group_of_four();
    let mut rebuilt = 0;
    for i in 0..20u64 {
        // A burst of group snapshots, killed at a moment that moves through them.
        let mut cli: Vec<Guard> = (0..4)
            .map(|k| {
                Guard(
                    Command::new(BIN)
                        .arg("--dir")
                        .arg(&dir)
                        .args(["group", "snapshot", "g", "--name", &format!("k{i}-{k}")])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap(),
                )
            })
            .collect();
        std::thread::sleep(Duration::from_millis(2 + (i * 7) % 40));
        d.kill9();
        cli.clear();
        // Every other time, the service's records of this burst are lost too, as when the kill
        // falls between a cut and its (unsynced) record: the engine's cut alone must bring
        // each group snapshot back whole.
        if i % 2 == 0 {
            rebuilt += lose_lifecycle_lines(&dir, "\"group_snapshot\"");
        }
        d = Daemon::start(&dir);
        let listed: Vec<String> = d
            .cli_json(&["group", "snapshot", "list", "g"])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        for k in 0..4 {
            let name = format!("k{i}-{k}");
            let present =
                VOLS.iter().filter(|v| d.cli(&["snapshot", "show", &format!("{v}@{name}")]).status.success()).count();
            assert!(present == 0 || present == VOLS.len(), "{name}: {present} of {} members after kill -9", VOLS.len());
            assert_eq!(present == VOLS.len(), listed.contains(&name), "{name}: members {present}, listed {listed:?}");
            if present > 0 {
                // The group snapshot's members are the snapshots of its name, which say so.
                let g = d.cli_json(&["group", "snapshot", "show", &format!("g@{name}")]);
                let members: Vec<&str> =
                    g["members"].as_array().unwrap().iter().map(|m| m["snapshot_id"].as_str().unwrap()).collect();
                for (v, id) in VOLS.iter().zip(&members) {
                    let m = d.cli_json(&["snapshot", "show", &format!("{v}@{name}")]);
                    assert_eq!(m["id"].as_str(), Some(*id), "{name}: {g}");
                    assert_eq!(m["group_snapshot"]["id"], g["id"], "{name}: {m}");
                }
            }
        }
    }
    assert!(rebuilt > 0, "no group snapshot record was ever lost: the rebuild from the engine went untested");
}

#[test]
fn a_group_snapshot_whose_record_a_crash_took_is_rebuilt_from_the_engine_and_a_deleted_one_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("snapblk.toml"),
        "[upload]\ninstant_access_retention = \"1h\"\n[recycle_bin]\nretention = \"1h\"\n",
    )
    .unwrap();
    let mut d = Daemon::start(&dir);
    for v in ["a", "b"] {
        d.cli_ok(&["volume", "create", v, "--size", "8M"]);
    }
    d.cli_ok(&["group", "create", "g", "a", "b"]);
    let (ok_hook, _) = hook(tmp.path(), "ok");
    let taken = d.cli_json(&[
        "group",
        "snapshot",
        "g",
        "--name",
        "app",
        "--description",
        "before the upgrade",
        "--quiesce-hook",
        &ok_hook,
        "--durable",
    ]);
    for m in taken["members"].as_array().unwrap() {
        let s = d.cli_json(&["snapshot", "show", m["snapshot_id"].as_str().unwrap()]);
        assert_eq!(s["durable"], true, "--durable answered before a member was durable: {s}");
    }
    // Deleted into the recycle bin: its members stay in the engine, with their group tag.
    d.cli_ok(&["group", "snapshot", "g", "--name", "gone"]);
    d.cli_ok(&["group", "snapshot", "delete", "g@gone"]);
    d.kill9();
    let id = taken["id"].as_str().unwrap();
    // (Its creation, and its publication in the region if that came before the kill.)
    assert!(lose_lifecycle_lines(&dir, id) >= 1, "no line of the log recorded {id}");
    for round in 0..2 {
        d = Daemon::start(&dir);
        let g = d.cli_json(&["group", "snapshot", "show", "g@app"]);
        assert_eq!(g["id"], taken["id"], "round {round}: {g}");
        assert_eq!(g["consistency"], "application", "round {round}: {g}");
        assert_eq!(g["description"], "before the upgrade", "round {round}: {g}");
        assert_eq!(g["created"], taken["created"], "round {round}: {g}");
        let ids = |g: &serde_json::Value| -> Vec<String> {
            g["members"].as_array().unwrap().iter().map(|m| m["snapshot_id"].as_str().unwrap().to_string()).collect()
        };
        assert_eq!(ids(&g), ids(&taken), "round {round}");
        let listed = d.cli_json(&["group", "snapshot", "list", "g"]);
        assert_eq!(
            listed.as_array().unwrap().len(),
            1,
            "round {round}: the deleted group snapshot came back: {listed}"
        );
        assert_eq!(d.cli(&["group", "snapshot", "show", "g@gone"]).status.code(), Some(4));
        d.kill9();
    }
}

#[test]
fn membership_changes_member_deletes_and_refusals_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    common::keep_snapshots_local(&dir);
    let d = Daemon::start(&dir);
    for v in ["a", "b", "c"] {
        d.cli_ok(&["volume", "create", v, "--size", "8M"]);
    }
    d.cli_ok(&["group", "create", "g", "a", "b"]);
    let (code, err) = d.cli_err(&["group", "create", "g2", "a", "a"]);
    assert_eq!(code, 2, "{err}");
    let (code, _) = d.cli_err(&["group", "create", "g", "c"]);
    assert_eq!(code, 5);
    d.cli_ok(&["group", "add", "g", "c"]);
    let s = d.cli_json(&["group", "snapshot", "g", "--name", "s1", "--description", "three"]);
    assert_eq!(s["members"].as_array().unwrap().len(), 3, "{s}");
    assert_eq!(s["consistency"], "crash");
    // Member snapshots are ordinary snapshots named like the group snapshot, and say so.
    for v in ["a", "b", "c"] {
        let m = d.cli_json(&["snapshot", "show", &format!("{v}@s1")]);
        assert_eq!(m["description"], "three");
        assert_eq!(m["group_snapshot"]["id"], s["id"], "{m}");
        assert_eq!(m["group_snapshot"]["name"], "g@s1", "{m}");
    }
    d.cli_ok(&["group", "remove", "g", "c"]);
    assert_eq!(d.cli_json(&["group", "show", "g"])["members"].as_array().unwrap().len(), 2);
    // The group snapshot keeps the members it was taken of.
    assert_eq!(d.cli_json(&["group", "snapshot", "show", "g@s1"])["members"].as_array().unwrap().len(), 3);
    // A member alone: refused, then with --force, and the group snapshot is degraded.
    let (code, err) = d.cli_err(&["snapshot", "delete", "a@s1"]);
    assert_eq!(code, 5);
    assert!(err.contains("group snapshot delete g@s1") && err.contains("--force"), "{err}");
    d.cli_ok(&["snapshot", "delete", "a@s1", "--force"]);
    let s = d.cli_json(&["group", "snapshot", "show", "g@s1"]);
    assert_eq!(s["degraded"], true, "{s}");
    // A policy on the group: shown, and the group cannot go while it is applied.
    d.cli_ok(&["policy", "create", "p", "--every", "1h", "--keep-last", "3"]);
    d.cli_ok(&["policy", "apply", "p", "--group", "g"]);
    assert_eq!(d.cli_json(&["policy", "show", "p"])["groups"][0], "g");
    let (code, err) = d.cli_err(&["group", "delete", "g"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("policy remove p --group g"), "{err}");
    d.cli_ok(&["policy", "remove", "p", "--group", "g"]);
    // The group object cannot go while it has group snapshots; then it can, and volumes stay.
    let (code, err) = d.cli_err(&["group", "delete", "g"]);
    assert_eq!(code, 5, "{err}");
    d.cli_ok(&["group", "snapshot", "delete", "g@s1"]);
    for v in ["b", "c"] {
        assert_eq!(d.cli(&["snapshot", "show", &format!("{v}@s1")]).status.code(), Some(4));
    }
    d.cli_ok(&["group", "delete", "g"]);
    assert_eq!(d.cli_json(&["volume", "list"]).as_array().unwrap().len(), 3);
    let (code, _) = d.cli_err(&["group", "show", "g"]);
    assert_eq!(code, 4);
}

/// Writes sequence number `n` at offset 0 of each export, flushed.
fn write_seq(d: &Daemon, exports: &[&str], n: u64) {
    for e in exports {
        let script = "import nbd,struct,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); h.pwrite(struct.pack('<Q', int(sys.argv[2])) + bytes(4088), 0); h.flush(); h.shutdown()";
        let out =
            run(Command::new(PYTHON).args(["-c", script, &d.nbd_uri(e), &n.to_string()]), Duration::from_secs(30));
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
}

#[test]
fn group_rollback_is_all_or_none_and_refuses_changed_members_and_writers() {
    if !require_libnbd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    common::keep_snapshots_local(&dir);
    let d = Daemon::start(&dir);
    for v in ["a", "b", "c"] {
        d.cli_ok(&["volume", "create", v, "--size", "8M"]);
    }
    d.cli_ok(&["group", "create", "g", "a", "b"]);
    write_seq(&d, &["a", "b"], 1);
    d.cli_ok(&["group", "snapshot", "g", "--name", "s1"]);
    write_seq(&d, &["a", "b"], 2);
    // A writer on one member: refused, and neither member changed.
    let mut holder = Guard(
        Command::new(PYTHON).args([&py("hold.py"), &d.nbd_uri("b"), "30"]).stdout(Stdio::piped()).spawn().unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.0.stdout.as_mut().unwrap()), &mut line).unwrap();
    let (code, err) = d.cli_err(&["group", "rollback", "g@s1"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("'b'") && err.contains("--force"), "{err}");
    assert_eq!((seq(&d, "a"), seq(&d, "b")), (2, 2));
    // --force disconnects it, and both go back.
    let vs = d.cli_json(&["group", "rollback", "g@s1", "--force"]);
    assert_eq!(vs.as_array().unwrap().len(), 2);
    assert!(holder.0.wait().unwrap().success(), "the writer was not disconnected");
    assert_eq!((seq(&d, "a"), seq(&d, "b")), (1, 1));
    // Other members than the snapshot's: refused, naming the difference.
    d.cli_ok(&["group", "add", "g", "c"]);
    let (code, err) = d.cli_err(&["group", "rollback", "g@s1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("added since: c"), "{err}");
    d.cli_ok(&["group", "remove", "g", "c"]);
    d.cli_ok(&["group", "rollback", "g@s1"]);
}

#[test]
fn kill_9_during_group_rollbacks_never_leaves_a_mix() {
    if !require_libnbd() {
        return;
    }
    let (_tmp, dir, mut d) = group_of_four();
    d.cli_ok(&["group", "snapshot", "g", "--name", "base"]);
    for i in 1..=20u64 {
        write_seq(&d, &VOLS, i);
        let cli = Guard(
            Command::new(BIN)
                .arg("--dir")
                .arg(&dir)
                .args(["group", "rollback", "g@base"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(1 + (i * 5) % 30));
        d.kill9();
        drop(cli);
        d = Daemon::start(&dir);
        let seqs: Vec<u64> = VOLS.iter().map(|v| seq(&d, v)).collect();
        assert!(seqs.iter().all(|&s| s == seqs[0]), "iteration {i}: members differ after kill -9: {seqs:?}");
        assert!(seqs[0] == 0 || seqs[0] == i, "iteration {i}: {seqs:?}");
    }
}

/// A quiesce hook that logs its calls to LOG and behaves as MODE says (ok, fail, hang).
fn hook(dir: &Path, mode: &str) -> (String, std::path::PathBuf) {
    let log = dir.join(format!("hook-{mode}.log"));
    let path = dir.join(format!("hook-{mode}.sh"));
    let body = match mode {
        "fail" => "[ \"$1\" = freeze ] && exit 3",
        "hang" => "[ \"$1\" = freeze ] && sleep 30",
        _ => "true",
    };
    std::fs::write(&path, format!("#!/bin/sh\necho \"$@\" >> {}\n{body}\nexit 0\n", log.display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    (path.display().to_string(), log)
}

#[test]
fn the_quiesce_hook_freezes_and_thaws_around_the_cut_and_its_failure_or_timeout_aborts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    common::keep_snapshots_local(&dir);
    let d = Daemon::start(&dir);
    for v in ["a", "b"] {
        d.cli_ok(&["volume", "create", v, "--size", "8M"]);
    }
    d.cli_ok(&["group", "create", "g", "a", "b"]);
    let (ok_hook, ok_log) = hook(tmp.path(), "ok");
    let s = d.cli_json(&["group", "snapshot", "g", "--name", "app", "--quiesce-hook", &ok_hook]);
    assert_eq!(s["consistency"], "application", "{s}");
    assert_eq!(std::fs::read_to_string(&ok_log).unwrap(), "freeze a b\nthaw a b\n");
    // A failing freeze: no group snapshot, exit 1, and what froze is thawed.
    let (fail_hook, fail_log) = hook(tmp.path(), "fail");
    let (code, err) = d.cli_err(&["group", "snapshot", "g", "--name", "f", "--quiesce-hook", &fail_hook]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("freeze failed") && err.contains("--ignore-hook-errors"), "{err}");
    assert_eq!(std::fs::read_to_string(&fail_log).unwrap(), "freeze a b\nthaw a b\n");
    assert_eq!(d.cli(&["snapshot", "show", "a@f"]).status.code(), Some(4));
    // ... unless told to go on: then crash-consistent.
    let s =
        d.cli_json(&["group", "snapshot", "g", "--name", "f", "--quiesce-hook", &fail_hook, "--ignore-hook-errors"]);
    assert_eq!(s["consistency"], "crash", "{s}");
    // A freeze that hangs: aborted at the timeout.
    let (hang_hook, _) = hook(tmp.path(), "hang");
    let t = std::time::Instant::now();
    let (code, err) = d.cli_err(&[
        "group",
        "snapshot",
        "g",
        "--name",
        "h",
        "--quiesce-hook",
        &hang_hook,
        "--freeze-timeout",
        "500ms",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("did not finish within"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "the hook's timeout did not apply: {:?}", t.elapsed());
    assert_eq!(d.cli(&["snapshot", "show", "b@h"]).status.code(), Some(4));
}

/// The group snapshots a region lists, as `GROUP@NAME`.
fn region_groups(d: &Daemon, region: &str) -> Vec<String> {
    d.cli_json(&["group", "snapshot", "list", "--region", region])
        .as_array()
        .unwrap()
        .iter()
        .map(|g| format!("{}@{}", g["group"].as_str().unwrap(), g["name"].as_str().unwrap()))
        .collect()
}

#[test]
fn a_group_snapshot_is_published_whole_and_restored_on_another_node() {
    use common::store::{compare, configure, fill, nbd_to_file, rand_u64, regions, tools, write_key_file, MIB};
    if !tools() {
        return;
    }
    for region in regions() {
        let tmp = tempfile::tempdir().unwrap();
        let a_dir = tmp.path().join("a");
        // Slow uploads (4 MiB at 2 MiB/s per member): the cut is long published after it is taken.
        configure(&a_dir, &region, "bandwidth_limit = \"2M\"\ninstant_access_retention = \"1h\"\n", "");
        let a = Daemon::start(&a_dir);
        for v in ["data", "log"] {
            a.cli_ok(&["volume", "create", v, "--size", "16M", "--region", region.name]);
            fill(&a, v, 0, 4 * MIB, rand_u64());
        }
        a.cli_ok(&["group", "create", "db", "data", "log"]);
        a.cli_ok(&["group", "snapshot", "db", "--name", "s1"]);
        // Not listed while a member is still uploading.
        assert!(region_groups(&a, region.name).is_empty(), "{}: listed before its members were stored", region.name);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while region_groups(&a, region.name).is_empty() {
            let members = a.cli_json(&["group", "snapshot", "show", "db@s1"]);
            assert!(
                std::time::Instant::now() < deadline,
                "{}: the group snapshot was not published: {members}",
                region.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // Node B shares the region: it lists the group snapshot and restores it.
        let b_dir = tmp.path().join("b");
        std::fs::create_dir_all(&b_dir).unwrap();
        let a_text = std::fs::read_to_string(a_dir.join("snapblk.toml")).unwrap();
        let store = a_dir.join("store").display().to_string();
        std::fs::write(b_dir.join("snapblk.toml"), a_text.replace("path = \"store\"", &format!("path = \"{store}\"")))
            .unwrap();
        let key = std::fs::read(a_dir.join("keys").join(format!("{}.key", region.name))).unwrap();
        write_key_file(&b_dir.join("keys").join(format!("{}.key", region.name)), key);
        let b = Daemon::start(&b_dir);
        assert_eq!(region_groups(&b, region.name), ["db@s1"]);
        let vs = b.cli_json(&["group", "restore", "db@s1", "--prefix", "r-", "--region", region.name]);
        assert_eq!(vs.as_array().unwrap().len(), 2, "{vs}");
        for v in ["data", "log"] {
            let restored = format!("r-{v}");
            b.cli_ok(&["volume", "hydrate", &restored, "--wait"]);
            let (x, y) = (tmp.path().join(format!("{v}.src")), tmp.path().join(format!("{v}.dst")));
            nbd_to_file(&a, &format!("{v}@s1"), &x);
            nbd_to_file(&b, &restored, &y);
            compare(&x, &y);
        }
        // A prefix that collides: refused before anything is made.
        let (code, err) = b.cli_err(&["group", "restore", "db@s1", "--prefix", "r-", "--region", region.name]);
        assert_eq!(code, 5, "{err}");
        // Deleted on A: the region stops listing it.
        a.cli_ok(&["group", "snapshot", "delete", "db@s1"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !region_groups(&b, region.name).is_empty() {
            assert!(std::time::Instant::now() < deadline, "{}: still listed after its delete", region.name);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
