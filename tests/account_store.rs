//! Accounts in the object store: each account's snapshots go to a repository of its own in
//! each region (own prefix, own data key wrapped by the account's key file, own dedup
//! domain), on the local filesystem and (from scripts/test) on Garage.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::store::*;
use common::Daemon;

/// `name` as account `account` owns it (bare for the default account).
fn owned(account: &str, name: &str) -> String {
    if account == "default" {
        name.to_string()
    } else {
        format!("{account}/{name}")
    }
}

/// Equal data in three accounts is stored three times, once in each account's repository
/// (no dedup across accounts: no fingerprint oracle), each repository lists its account's
/// snapshot only, a restore reads from the owner's repository, and one account's key file
/// does not unwrap another's repository key.
#[test]
fn each_account_uploads_into_a_repository_of_its_own() {
    if !tools() {
        return;
    }
    const ACCOUNTS: [&str; 3] = ["default", "acme", "umbrella"];
    for region in regions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        configure(&dir, &region, "", "");
        let d = Daemon::start(&dir);
        let mut ids = HashMap::new();
        for account in ACCOUNTS {
            if account != "default" {
                d.cli_ok(&["account", "create", account]);
            }
            let vol = owned(account, "db");
            d.cli_ok(&["volume", "create", &vol, "--size", "8M", "--region", region.name]);
            // The same seed: equal bytes in every account.
            fill(&d, &vol, 0, 4 * MIB, 7);
            snapshot(&d, &vol, "s1");
            let v = wait_available(&d, &format!("{vol}@s1"));
            assert_eq!(v["upload"]["region"], owned(account, region.name), "{account}'s upload: {v}");
            // Nothing of another account's equal data is reused.
            let added = v["upload"]["added_bytes"].as_u64().unwrap();
            assert!(added >= 4 * MIB, "{account}'s upload added {added} bytes: deduplicated across accounts?");
            ids.insert(account, v["id"].as_str().unwrap().to_string());
        }
        for account in ACCOUNTS {
            let repo = owned(account, region.name);
            let info = region_show(&d, &repo);
            assert!(info["stored_bytes"].as_u64().unwrap() >= 4 * MIB, "{repo}: {info}");
            let listed = d.cli_json(&["snapshot", "list", "--region", &repo]);
            let volumes: Vec<&str> = listed.as_array().unwrap().iter().map(|s| s["volume"].as_str().unwrap()).collect();
            assert_eq!(volumes, [owned(account, "db")], "{repo} lists {listed}");
        }
        // Node B shares the region, with its key file and acme's (what `key export` shows):
        // a restore by id there reads from acme's repository; the id is in no other.
        let acme_repo = owned("acme", region.name);
        let b = node_b(tmp.path(), &d, &region, "");
        b.cli_ok(&["account", "create", "acme"]);
        let expected = tmp.path().join("acme.raw");
        nbd_to_file(&d, "acme/db", &expected);
        b.cli_ok(&["volume", "create", "acme/restored", "--from-snapshot", &ids["acme"], "--region", &acme_repo]);
        b.cli_ok(&["volume", "hydrate", "acme/restored", "--wait"]);
        let got = tmp.path().join("restored.raw");
        nbd_to_file(&b, "acme/restored", &got);
        compare(&expected, &got);
        let (code, err) =
            b.cli_err(&["volume", "create", "stray", "--from-snapshot", &ids["acme"], "--region", region.name]);
        assert_eq!(code, 4, "acme's snapshot found in the default account's repository: {err}");
        drop(b);

        if region.name == "local" {
            // The direct attempt: each repository key unwraps with its own key file only.
            let store = dir.join("store");
            let wrapped = |account: &str| {
                let path = match account {
                    "default" => store.join("keys/repository"),
                    a => store.join(format!("accounts/{a}/keys/repository")),
                };
                std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            };
            let kek = |account: &str| {
                let path = match account {
                    "default" => dir.join("keys/local.key"),
                    a => dir.join(format!("keys/accounts/{a}.key")),
                };
                snapblk::store::crypto::load_or_create_kek(&path).unwrap().0
            };
            for owner in ACCOUNTS {
                for reader in ACCOUNTS {
                    let opened =
                        snapblk::store::crypto::unwrap_master(&kek(reader), &wrapped(owner), "local", Path::new("k"));
                    assert_eq!(opened.is_ok(), owner == reader, "{reader}'s key on {owner}'s repository key");
                }
            }
        }
    }
}

/// `tests/fixtures/accounts-v0/d` is a daemon directory with its local region (`store/`)
/// written by snapblk at commit 2643b0e, before accounts had repositories of their own
/// (its README says how). Upgraded, it comes up with nothing lost: the default account's
/// volume and snapshots, account `acme` and its volume and snapshot — whose copy stays in
/// the default repository, where it was uploaded, and is read back from there — and new
/// uploads go on: the default account's incrementally in its repository, acme's into its own.
#[test]
fn a_directory_from_before_account_repositories_comes_up_with_nothing_lost() {
    if !tools() {
        return;
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/accounts-v0/d");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    copy_tree(&fixture, &dir);
    let d = Daemon::start(&dir);
    let accounts = d.cli_json(&["account", "list"]);
    assert!(accounts.as_array().unwrap().iter().any(|a| a["name"] == "acme"), "{accounts}");

    // What the fixture's volumes held, written again (the same seeds).
    let expected = |name: &str, writes: &[(u64, u64, u64)]| {
        d.cli_ok(&["volume", "create", name, "--size", "1M", "--cluster-size", "4K"]);
        for &(offset, len, seed) in writes {
            fill(&d, name, offset, len, seed);
        }
        let path = tmp.path().join(format!("{name}.raw"));
        nbd_to_file(&d, name, &path);
        path
    };
    let vol_s1 = expected("expect-s1", &[(0, 16 << 10, 21)]);
    let vol_s2 = expected("expect-s2", &[(0, 16 << 10, 21), (512 << 10, 8 << 10, 23)]);
    let acme = expected("expect-acme", &[(64 << 10, 16 << 10, 22)]);
    for (export, want) in
        [("vol", &vol_s2), ("vol@s1", &vol_s1), ("vol@s2", &vol_s2), ("acme/db", &acme), ("acme/db@s1", &acme)]
    {
        let got = tmp.path().join("got.raw");
        nbd_to_file(&d, export, &got);
        compare(want, &got);
    }
    // The old copies are where they were uploaded, and read back from there.
    for snap in ["vol@s1", "vol@s2", "acme/db@s1"] {
        let v = d.cli_json(&["snapshot", "show", snap]);
        assert_eq!((&v["upload"]["state"], &v["upload"]["region"]), (&"available".into(), &"local".into()), "{v}");
        verify_ok(&d, snap);
    }
    let exported = tmp.path().join("acme-s1.export");
    export(&d, "acme/db@s1", &exported);
    compare(&acme, &exported);

    // New uploads: the default account's incremental on s2 in its repository ...
    fill(&d, "vol", 256 << 10, 4 << 10, 24);
    snapshot(&d, "vol", "s3");
    let v = wait_available(&d, "vol@s3");
    let s2 = d.cli_json(&["snapshot", "show", "vol@s2"])["id"].clone();
    assert_eq!((&v["upload"]["region"], &v["upload"]["base"]), (&"local".into(), &s2), "{v}");
    let added = v["upload"]["added_bytes"].as_u64().unwrap();
    assert!(added < 64 << 10, "vol@s3 added {added} bytes: not incremental on vol@s2");
    // ... and acme's into acme's own, complete there.
    snapshot(&d, "acme/db", "s2");
    let v = wait_available(&d, "acme/db@s2");
    assert_eq!(v["upload"]["region"], "acme/local", "{v}");
    verify_ok(&d, "acme/db@s2");
}

/// Node A of a region, with accounts acme and umbrella.
fn node_a(tmp: &Path, region: &TestRegion) -> Daemon {
    let dir = tmp.join("a");
    configure(&dir, region, "", "");
    let a = Daemon::start(&dir);
    for account in ["acme", "umbrella"] {
        a.cli_ok(&["account", "create", account]);
    }
    a
}

/// Node B of A's region: the region's key and acme's account key (as `key export` gives
/// them), `extra` lines before A's configuration.
fn node_b(tmp: &Path, a: &Daemon, region: &TestRegion, extra: &str) -> Daemon {
    let b_dir = tmp.join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let a_text = std::fs::read_to_string(a.dir.join("snapblk.toml")).unwrap();
    let store = a.dir.join("store").display().to_string();
    let b_text = a_text.replace("path = \"store\"", &format!("path = \"{store}\""));
    std::fs::write(b_dir.join("snapblk.toml"), format!("{extra}{b_text}")).unwrap();
    write_key_file(&b_dir.join(format!("keys/{}.key", region.name)), a.cli_ok(&["key", "export", region.name]));
    let acme_repo = owned("acme", region.name);
    write_key_file(&b_dir.join("keys/accounts/acme.key"), a.cli_ok(&["key", "export", &acme_repo]));
    Daemon::start(&b_dir)
}

fn wait_until(what: &str, timeout: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Sharing across two nodes of one region. Account acme (node A) shares a snapshot with
/// umbrella. On node B — which holds the region's key and acme's account key, as a cloud's
/// service holds every account's — umbrella finds it in `shared-with-me` and creates a volume
/// from it that reads equal data: its own volume, whose snapshots go to umbrella's
/// repository. acme cannot delete the snapshot while shared. Unshare stops new volumes at
/// once; a volume made before keeps loading during the grace period, after which reads of
/// what it has not loaded fail with the sentence naming the share; then acme's delete goes.
/// Every step is in the event logs with both accounts.
#[test]
fn a_snapshot_shared_across_accounts_and_nodes_then_unshared() {
    if !tools() {
        return;
    }
    for region in regions() {
        let tmp = tempfile::tempdir().unwrap();
        let a = node_a(tmp.path(), &region);
        // 64 KiB at the start of each of 8 map pages (4,096 clusters of 4 KiB): a volume
        // loading it in the background with 16 KiB/s loads a page every 4 s.
        a.cli_ok(&["volume", "create", "acme/db", "--size", "128M", "--cluster-size", "4K", "--region", region.name]);
        for page in 0..8 {
            fill(&a, "acme/db", page * 16 * MIB, 64 << 10, 31 + page);
        }
        let id = snapshot(&a, "acme/db", "s1")["id"].as_str().unwrap().to_string();
        wait_available(&a, "acme/db@s1");
        let expected = tmp.path().join("expected.raw");
        nbd_to_file(&a, "acme/db", &expected);

        // Shared; not with an account this node does not know (a typo), not deletable.
        let (code, err) = a.cli_err(&["snapshot", "share", "acme/db@s1", "--with", "umbrela"]);
        assert_eq!(code, 4, "{err}");
        let shared = a.cli_json(&["snapshot", "share", "acme/db@s1", "--with", "umbrella"]);
        assert_eq!(shared[0]["state"], "active", "{shared}");
        let (code, err) = a.cli_err(&["snapshot", "delete", "acme/db@s1"]);
        assert_eq!(code, 5, "{err}");
        assert!(err.contains("shared with account(s) umbrella") && err.contains("unshare"), "{err}");

        // Node B: the region's key and acme's; background loading slow enough that a volume
        // made from the share is still loading when the grace period ends.
        let b = node_b(
            tmp.path(),
            &a,
            &region,
            "[hydrate]\nbackground = false\nhold = \"4s\"\nbandwidth_limit = \"16K\"\nreadahead = \"0\"\n",
        );
        b.cli_ok(&["account", "create", "umbrella"]);
        let mine = b.cli_json(&["snapshot", "shared-with-me", "--account", "umbrella"]);
        assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
        assert_eq!((&mine[0]["snapshot_id"], &mine[0]["owner"]), (&id.clone().into(), &"acme".into()), "{mine}");

        // umbrella's volumes from it: equal data; their snapshots go to umbrella's repository.
        b.cli_ok(&["volume", "create", "umbrella/copy", "--from-snapshot", &id]);
        b.cli_ok(&["volume", "create", "umbrella/partial", "--from-snapshot", &id]);
        let got = tmp.path().join("copy.raw");
        nbd_to_file(&b, "umbrella/copy", &got);
        compare(&expected, &got);
        // (Read in full: what is left to load is holes, no fetch.)
        b.cli_ok(&["volume", "hydrate", "umbrella/copy", "--wait"]);
        snapshot(&b, "umbrella/copy", "mine");
        let v = wait_available(&b, "umbrella/copy@mine");
        assert_eq!(v["upload"]["region"], owned("umbrella", region.name), "{v}");

        // Unshared with a short grace: no new volume at once.
        let grace = 8;
        let unshared =
            a.cli_json(&["snapshot", "unshare", "acme/db@s1", "--with", "umbrella", "--grace", &format!("{grace}s")]);
        assert_eq!(unshared[0]["state"], "grace", "{unshared}");
        let (code, err) = b.cli_err(&["volume", "create", "umbrella/late", "--from-snapshot", &id]);
        assert_eq!(code, 7, "{err}");
        assert!(err.contains("has ended"), "{err}");
        // In the grace period the volume made before still reads, and loads in the
        // background (whatever `[hydrate] background` says), page after page.
        common::qemu_io(&b.nbd_uri("umbrella/partial"), &["read 0 64k"]);
        // After it: what is not loaded yet (the last page's data) cannot be read.
        std::thread::sleep(std::time::Duration::from_secs(grace + 6));
        let out = common::run(
            std::process::Command::new("qemu-io").args([
                "-f",
                "raw",
                "-c",
                "read 112M 64k",
                &b.nbd_uri("umbrella/partial"),
            ]),
            std::time::Duration::from_secs(120),
        );
        let said = format!("{}{}", common::text(&out.stdout), common::text(&out.stderr)).to_lowercase();
        assert!(
            said.contains("failed"),
            "umbrella/partial's last page read after the share's grace period ended: {said}\n{}",
            b.log()
        );
        wait_until("the ended share named in B's log", std::time::Duration::from_secs(30), || {
            b.log().contains(&format!("the share of snapshot {id}")) && b.log().contains("ended")
        });

        // B lets go of the snapshot (its hold expires), and acme deletes it.
        wait_until("acme's delete accepted", std::time::Duration::from_secs(60), || {
            a.cli(&["snapshot", "delete", "acme/db@s1"]).status.success()
        });
        let events = |d: &Daemon| d.cli_json(&["events", "--limit", "1000"]).to_string();
        let a_events = events(&a);
        for kind in ["snapshot_shared", "snapshot_unshared"] {
            assert!(a_events.contains(kind) && a_events.contains("\"with\":\"umbrella\""), "{kind}: {a_events}");
        }
        let b_events = events(&b);
        assert!(b_events.contains("shared_volume_created") && b_events.contains("\"owner\":\"acme\""), "{b_events}");
    }
}

/// An image shared with another account: on node B that account finds it, deploys it (its
/// disk equal to the owner's snapshot); the owner cannot delete the image while it is
/// shared; after an unshare, B cannot deploy it any more.
#[test]
fn an_image_shared_with_another_account_deploys_on_another_node() {
    if !tools() {
        return;
    }
    for region in regions() {
        let tmp = tempfile::tempdir().unwrap();
        let a = node_a(tmp.path(), &region);
        a.cli_ok(&["volume", "create", "acme/root", "--size", "8M", "--region", region.name]);
        fill(&a, "acme/root", 0, MIB, 41);
        snapshot(&a, "acme/root", "s1");
        wait_available(&a, "acme/root@s1");
        let expected = tmp.path().join("root.raw");
        nbd_to_file(&a, "acme/root@s1", &expected);
        a.cli_ok(&["image", "create", "acme/web", "--root", "acme/root@s1"]);
        a.cli_ok(&["image", "share", "acme/web", "--with", "umbrella"]);
        let (code, err) = a.cli_err(&["image", "delete", "acme/web"]);
        assert_eq!(code, 5, "{err}");
        assert!(err.contains("shared with account(s) umbrella"), "{err}");

        let b = node_b(tmp.path(), &a, &region, "");
        b.cli_ok(&["account", "create", "umbrella"]);
        let mine = b.cli_json(&["image", "shared-with-me", "--account", "umbrella"]);
        assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
        assert_eq!(mine[0]["image"], "acme/web", "{mine}");
        b.cli_ok(&["volume", "create-from-image", "acme/web", "--prefix", "umbrella/w1-"]);
        let got = tmp.path().join("w1.raw");
        nbd_to_file(&b, "umbrella/w1-root", &got);
        compare(&expected, &got);

        a.cli_ok(&["image", "unshare", "acme/web", "--with", "umbrella", "--grace", "1s"]);
        let (code, err) = b.cli_err(&["volume", "create-from-image", "acme/web", "--prefix", "umbrella/w2-"]);
        assert_eq!(code, 7, "{err}");
        assert!(err.contains("has ended"), "{err}");
        // Unshared: the image can go.
        a.cli_ok(&["image", "delete", "acme/web"]);
    }
}
