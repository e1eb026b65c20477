//! The EBS direct API facade (`serve --ebs-listen`) with AWS's own clients, unchanged but for
//! the endpoint: `coldsnap` (download and upload, incremental with a parent) and the AWS CLI
//! (`aws ebs list-changed-blocks`, `list-snapshot-blocks`, `get-snapshot-block`,
//! `start-snapshot`, `put-snapshot-block`, `complete-snapshot`), each answer compared with the
//! NBD export of the same snapshot; and the AWS errors: bad signature, unknown snapshot, bad
//! block checksum, block index out of range, wrong aggregated checksum, another account's
//! snapshot, ClientToken reuse — with nothing half-created left visible.
//!
//! The tools are installed by `scripts/ebs-tools install` (scripts/test runs it) into the
//! cache; their paths come from SNAPBLK_COLDSNAP and SNAPBLK_AWS, else the cache's.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::store::{wait_available, wait_released};
use common::*;
use serde_json::Value;

const KEY_ID: &str = "AKIDSNAPBLKTEST";
const SECRET: &str = "c2VjcmV0LW9mLXRoZS1lYnMtdGVzdA";
const ACME_KEY_ID: &str = "AKIDACMETEST";
const ACME_SECRET: &str = "YWNtZS1zZWNyZXQ";
const BLOCK: u64 = 512 * 1024;
const GIB: u64 = 1 << 30;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

fn cache() -> PathBuf {
    std::env::var_os("SNAPBLK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/snapblk"))
}

fn tool(var: &str, cached: &str) -> Option<PathBuf> {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| cache().join(cached));
    p.is_file().then_some(p)
}

/// coldsnap and aws, when installed (scripts/ebs-tools); with SNAPBLK_REQUIRE_TOOLS=1 a
/// missing one fails the test.
fn clients() -> Option<(PathBuf, PathBuf)> {
    let coldsnap = tool("SNAPBLK_COLDSNAP", "coldsnap-0.12.0/bin/coldsnap");
    let aws = tool("SNAPBLK_AWS", "awscli-1.46.3/bin/aws");
    let need = std::env::var("SNAPBLK_REQUIRE_TOOLS").as_deref() == Ok("1");
    match (coldsnap, aws) {
        (Some(c), Some(a)) if require_tool("nbdcopy") && require_tool("qemu-io") => Some((c, a)),
        _ if need => panic!("coldsnap or aws not installed and SNAPBLK_REQUIRE_TOOLS=1: run scripts/ebs-tools install"),
        _ => {
            eprintln!("SKIP: {}: coldsnap/aws not installed (scripts/ebs-tools install)", test_name());
            None
        }
    }
}

fn write_secret(path: &Path, secret: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, secret).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A daemon serving the EBS API on a loopback port, with key KEY_ID for the default account
/// and ACME_KEY_ID for account acme; `upload`: snapshots go to the store (and their local data
/// is released right after), else they stay local.
struct Ebs {
    d: Daemon,
    url: String,
    coldsnap: PathBuf,
    aws: PathBuf,
    home: PathBuf,
    /// The CA of an HTTPS facade.
    ca: Option<PathBuf>,
}

impl Ebs {
    fn start(tmp: &Path, upload: bool) -> Option<Ebs> {
        Ebs::start_with(tmp, upload, &[], None)
    }

    fn start_with(tmp: &Path, upload: bool, extra: &[String], ca: Option<PathBuf>) -> Option<Ebs> {
        let (coldsnap, aws) = clients()?;
        let dir = tmp.join("d");
        std::fs::create_dir_all(&dir).unwrap();
        write_secret(&dir.join("ebs.secret"), SECRET, 0o600);
        write_secret(&dir.join("acme.secret"), ACME_SECRET, 0o600);
        let upload = if upload { "" } else { "enabled = false\n" };
        std::fs::write(
            dir.join("snapblk.toml"),
            format!(
                "[upload]\n{upload}\n[ebs_api]\nkeys = [\n  {{ access_key_id = \"{KEY_ID}\", secret_file = \"ebs.secret\" }},\n  {{ access_key_id = \"{ACME_KEY_ID}\", secret_file = \"acme.secret\", account = \"acme\", role = \"owner\" }},\n]\n"
            ),
        )
        .unwrap();
        // The acme account must exist before the daemon serves its key: made by a first start.
        let mut first = Daemon::start(&dir);
        first.cli_ok(&["account", "create", "acme"]);
        assert!(first.terminate());
        let mut args = vec!["--ebs-listen", "127.0.0.1:0"];
        args.extend(extra.iter().map(String::as_str));
        let d = Daemon::start_with(&dir, &args);
        let log = d.log();
        let url = log
            .lines()
            .rev()
            .find_map(|l| l.split("ebs: ").nth(1))
            .map(|rest| rest.trim_end_matches(')').to_string())
            .unwrap_or_else(|| panic!("no ebs address in the ready line:\n{log}"));
        let home = tmp.join("home");
        std::fs::create_dir_all(&home).unwrap();
        Some(Ebs { d, url, coldsnap, aws, home, ca })
    }

    fn env<'a>(&self, cmd: &'a mut Command, key: (&str, &str)) -> &'a mut Command {
        cmd.env("AWS_ACCESS_KEY_ID", key.0)
            .env("AWS_SECRET_ACCESS_KEY", key.1)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", self.home.join("config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", self.home.join("credentials"))
            .env("HOME", &self.home)
    }

    fn coldsnap(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(&self.coldsnap);
        cmd.args(["--endpoint", &self.url, "--region", "us-east-1"]).args(args);
        let desc = format!("coldsnap {args:?}");
        let out = run(self.env(&mut cmd, (KEY_ID, SECRET)), CLIENT_TIMEOUT);
        assert!(
            out.status.success(),
            "{desc} failed:\n{}\n{}\ndaemon:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            self.d.log()
        );
        text(&out.stdout)
    }

    fn aws_with(&self, key: (&str, &str), args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.aws);
        cmd.args(["--endpoint-url", &self.url, "--output", "json"]);
        if let Some(ca) = &self.ca {
            cmd.arg("--ca-bundle").arg(ca);
        }
        cmd.arg("ebs").args(args);
        run(self.env(&mut cmd, key), CLIENT_TIMEOUT)
    }

    fn aws(&self, args: &[&str]) -> Value {
        let out = self.aws_with((KEY_ID, SECRET), args);
        assert!(out.status.success(), "aws ebs {args:?} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Every page of a list call (MaxResults 100, following NextToken): the `field` arrays
    /// joined, and how many pages there were.
    fn aws_pages(&self, args: &[&str], field: &str) -> (Vec<Value>, usize) {
        let (mut all, mut pages, mut token) = (Vec::new(), 0, None::<String>);
        loop {
            let mut a: Vec<&str> = args.to_vec();
            a.extend(["--max-results", "100"]);
            if let Some(t) = &token {
                a.extend(["--next-token", t]);
            }
            let page = self.aws(&a);
            pages += 1;
            all.extend(page[field].as_array().cloned().unwrap_or_default());
            match page["NextToken"].as_str() {
                Some(t) => token = Some(t.to_string()),
                None => return (all, pages),
            }
        }
    }

    /// The AWS error code an `aws ebs` call failed with ("An error occurred (CODE) ...").
    fn aws_error(&self, key: (&str, &str), args: &[&str]) -> String {
        let out = self.aws_with(key, args);
        assert!(!out.status.success(), "aws ebs {args:?} should have failed:\n{}", text(&out.stdout));
        let err = text(&out.stderr);
        err.split("An error occurred (")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .unwrap_or_else(|| panic!("no AWS error in: {err}"))
            .to_string()
    }

    fn snapshot_ids(&self) -> BTreeSet<String> {
        let list = self.d.cli_json(&["snapshot", "list"]);
        list.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
    }

    fn volume_names(&self) -> BTreeSet<String> {
        let list = self.d.cli_json(&["volume", "list"]);
        list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect()
    }
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for GiBs.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse image of `size` with random data in `regions` (offset, length).
fn image(path: &Path, size: u64, regions: &[(u64, u64)], seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in regions.iter().enumerate() {
        f.write_all_at(&random_bytes(seed + i as u64, len as usize), off).unwrap();
    }
}

fn cmp(a: &Path, b: &Path) {
    let out = run(Command::new("cmp").arg(a).arg(b), Duration::from_secs(120));
    assert!(out.status.success(), "{} and {} differ: {}", a.display(), b.display(), text(&out.stdout));
}

fn nbd_to_file(d: &Daemon, export: &str, path: &Path) {
    ok("nbdcopy", &[&d.nbd_uri(export), &path.display().to_string()]);
}

fn file_to_nbd(d: &Daemon, path: &Path, export: &str) {
    ok("nbdcopy", &[&path.display().to_string(), &d.nbd_uri(export)]);
}

/// Random data in a third of a 1 GiB volume (ranges of 64 KiB to 8 MiB, some unaligned),
/// the rest never written.
const REGIONS: [(u64, u64); 8] = [
    (0, 4 << 20),
    (20 << 20, 8 << 20),
    (100 << 20, 65536),
    ((300 << 20) + 4096, 3 << 20),
    (512 << 20, 64 << 20),
    (700 << 20, 128 << 20),
    ((900 << 20) + 12345, 1 << 20),
    (GIB - (2 << 20), 2 << 20),
];

#[test]
fn coldsnap_download_of_a_snapshot_equals_its_nbd_export_local_and_released() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(e) = Ebs::start(tmp.path(), true) else { return };
    let img = tmp.path().join("img");
    image(&img, GIB, &REGIONS, 11);
    e.d.cli_ok(&["volume", "create", "vm", "--size", "1G"]);
    file_to_nbd(&e.d, &img, "vm");
    let snap = e.d.cli_json(&["snapshot", "create", "vm", "--name", "s1"]);
    let id = snap["id"].as_str().unwrap().to_string();
    let export = tmp.path().join("export");
    nbd_to_file(&e.d, "vm@s1", &export);

    // The snapshot is local (its upload may be running): by id and by VOLUME@SNAPSHOT.
    let local = tmp.path().join("local");
    e.coldsnap(&["download", &id, &local.display().to_string(), "--no-progress"]);
    cmp(&local, &export);
    cmp(&local, &img);
    let by_name = tmp.path().join("by-name");
    e.coldsnap(&["download", "vm@s1", &by_name.display().to_string(), "--no-progress"]);
    cmp(&by_name, &export);

    // Released after upload: every block is read from the store, verified.
    wait_available(&e.d, &id);
    wait_released(&e.d, &id);
    let released = tmp.path().join("released");
    e.coldsnap(&["download", &id, &released.display().to_string(), "--no-progress"]);
    cmp(&released, &export);
    // The allocated blocks are listed, from the store's map pages.
    let listed = e.aws(&["list-snapshot-blocks", "--snapshot-id", &id]);
    let n = listed["Blocks"].as_array().unwrap().len() as u64;
    let expected: BTreeSet<u64> =
        REGIONS.iter().flat_map(|&(off, len)| (off / BLOCK)..(off + len).div_ceil(BLOCK)).collect();
    assert_eq!(n, expected.len() as u64, "{listed}");
}

#[test]
fn aws_ebs_lists_exactly_the_blocks_rewritten_between_two_snapshots_and_reads_them() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(e) = Ebs::start(tmp.path(), false) else { return };
    e.d.cli_ok(&["volume", "create", "db", "--size", "1G"]);
    let uri = e.d.nbd_uri("db");
    qemu_io(&uri, &["write -P 0x11 0 64M", "write -P 0x22 600M 16M"]);
    let first = e.d.cli_json(&["snapshot", "create", "db", "--name", "a"])["id"].as_str().unwrap().to_string();
    // Rewritten: 4 KiB inside block 3, the last 4 KiB of block 99, 1 MiB across blocks
    // 200..=202 (unaligned), one whole block (1500), and a zeroed block (1210, in the 600M area).
    qemu_io(
        &uri,
        &[
            "write -P 0x33 1576960 4096",
            "write -P 0x44 52424704 4096",
            "write -P 0x55 105119744 1048576",
            "write -P 0x66 786432000 524288",
            "write -z -u 634388480 524288",
        ],
    );
    let second = e.d.cli_json(&["snapshot", "create", "db", "--name", "b"])["id"].as_str().unwrap().to_string();
    let rewritten: BTreeSet<u64> = [3, 99, 200, 201, 202, 1500, 1210].into_iter().collect();
    assert_eq!(1576960 / BLOCK, 3);
    assert_eq!((52424704 + 4095) / BLOCK, 99);
    assert_eq!((105119744 / BLOCK, (105119744 + 1048575) / BLOCK), (200, 202));

    // By id and by VOLUME@SNAPSHOT: the exact set (one page: fewer than 100).
    for (a, b) in [(first.as_str(), second.as_str()), ("db@a", "db@b")] {
        let (changed, _) =
            e.aws_pages(&["list-changed-blocks", "--first-snapshot-id", a, "--second-snapshot-id", b], "ChangedBlocks");
        let got: BTreeSet<u64> = changed.iter().map(|b| b["BlockIndex"].as_u64().unwrap()).collect();
        assert_eq!(got, rewritten, "{changed:?}");
        let zeroed = changed.iter().find(|b| b["BlockIndex"] == 1210).unwrap();
        assert!(zeroed.get("SecondBlockToken").is_none() && zeroed.get("FirstBlockToken").is_some(), "{zeroed}");
        let grown = changed.iter().find(|b| b["BlockIndex"] == 1500).unwrap();
        assert!(grown.get("FirstBlockToken").is_none() && grown.get("SecondBlockToken").is_some(), "{grown}");
    }
    // Starting at a block index.
    let from = e.aws(&[
        "list-changed-blocks",
        "--first-snapshot-id",
        &first,
        "--second-snapshot-id",
        &second,
        "--starting-block-index",
        "201",
    ]);
    let got: BTreeSet<u64> =
        from["ChangedBlocks"].as_array().unwrap().iter().map(|b| b["BlockIndex"].as_u64().unwrap()).collect();
    assert_eq!(got, rewritten.iter().copied().filter(|&b| b >= 201).collect());

    // Every allocated block of the second, and the data of one of them equals the NBD export's.
    let listed = e.aws(&["list-snapshot-blocks", "--snapshot-id", &second]);
    assert_eq!(listed["VolumeSize"], 1);
    assert_eq!(listed["BlockSize"], 524288);
    let (blocks, pages) = e.aws_pages(&["list-snapshot-blocks", "--snapshot-id", &second], "Blocks");
    assert_eq!(blocks.len() as u64, 128 + 3 + 32 - 1 + 1, "64M, blocks 200-202, 16M (one zeroed), block 1500");
    assert_eq!(pages, 2, "163 blocks in pages of 100");
    assert_eq!(listed["Blocks"].as_array().unwrap().len(), blocks.len(), "one page of up to 10000 by default");
    let b200 = blocks.iter().find(|b| b["BlockIndex"] == 200).unwrap();
    let out = tmp.path().join("block200");
    let got = e.aws(&[
        "get-snapshot-block",
        "--snapshot-id",
        &second,
        "--block-index",
        "200",
        "--block-token",
        b200["BlockToken"].as_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!((got["DataLength"].as_u64(), got["ChecksumAlgorithm"].as_str()), (Some(524288), Some("SHA256")));
    let exported = tmp.path().join("export");
    nbd_to_file(&e.d, "db@b", &exported);
    let all = std::fs::read(&exported).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), &all[200 * BLOCK as usize..201 * BLOCK as usize]);
    // A token of another block is refused.
    let wrong = e.aws_error(
        (KEY_ID, SECRET),
        &[
            "get-snapshot-block",
            "--snapshot-id",
            &second,
            "--block-index",
            "201",
            "--block-token",
            b200["BlockToken"].as_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(wrong, "ValidationException");
}

#[test]
fn coldsnap_upload_makes_an_ordinary_snapshot_whose_export_equals_the_image_and_a_parent_makes_an_increment() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(e) = Ebs::start(tmp.path(), true) else { return };
    let img = tmp.path().join("img");
    image(&img, GIB, &REGIONS, 23);
    let before = e.snapshot_ids();
    let id = e.coldsnap(&["upload", img.to_str().unwrap(), "--no-progress", "--description", "from coldsnap"]);
    let id = id.trim().to_string();
    assert!(id.starts_with("s-"), "coldsnap printed {id}");
    let show = e.d.cli_json(&["snapshot", "show", &id]);
    assert_eq!(show["description"], "from coldsnap");
    assert_eq!(show["size"], GIB);
    assert!(e.volume_names().is_empty(), "the staging volume is not listed: {:?}", e.volume_names());
    assert_eq!(e.snapshot_ids().len(), before.len() + 1);
    let export = tmp.path().join("export");
    nbd_to_file(&e.d, &id, &export);
    cmp(&export, &img);
    // An ordinary snapshot: uploaded (then released), cloned into a volume equal to the image.
    wait_available(&e.d, &id);
    e.d.cli_ok(&["volume", "clone", &id, "restored"]);
    let restored = tmp.path().join("restored");
    nbd_to_file(&e.d, "restored", &restored);
    cmp(&restored, &img);

    // Incremental: a second image differing in a few blocks, uploaded with the first as parent
    // (only changed blocks would need sending; coldsnap sends all, the result is the same).
    let img2 = tmp.path().join("img2");
    std::fs::copy(&img, &img2).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img2).unwrap();
        f.write_all_at(&random_bytes(99, 3 << 20), 40 << 20).unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 0).unwrap();
    }
    let id2 = e.coldsnap(&["upload", img2.to_str().unwrap(), "--no-progress", "--parent-snapshot-id", &id]);
    let id2 = id2.trim().to_string();
    let export2 = tmp.path().join("export2");
    nbd_to_file(&e.d, &id2, &export2);
    cmp(&export2, &img2);
    assert_eq!(e.d.cli_json(&["snapshot", "show", &id2])["size"], GIB);
}

#[test]
fn errors_are_the_aws_shapes_and_leave_nothing_half_created() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(e) = Ebs::start(tmp.path(), false) else { return };
    e.d.cli_ok(&["volume", "create", "db", "--size", "64M"]);
    qemu_io(&e.d.nbd_uri("db"), &["write -P 0x11 0 1M"]);
    let snap = e.d.cli_json(&["snapshot", "create", "db", "--name", "a"])["id"].as_str().unwrap().to_string();
    let me = (KEY_ID, SECRET);

    // Bad signature (another secret), unknown key: AccessDenied, and the log says so without
    // the secret.
    let bad = e.aws_error((KEY_ID, "not-the-secret"), &["list-snapshot-blocks", "--snapshot-id", &snap]);
    assert_eq!(bad, "AccessDeniedException");
    let unknown = e.aws_error(("AKIDNOBODY", SECRET), &["list-snapshot-blocks", "--snapshot-id", &snap]);
    assert_eq!(unknown, "AccessDeniedException");
    let log = e.d.log();
    assert!(log.contains("EBS API: request denied") && !log.contains(SECRET), "{log}");
    // Unknown snapshot, and another account's: ResourceNotFound.
    let missing = e.aws_error(me, &["list-snapshot-blocks", "--snapshot-id", "s-0000000000000001"]);
    assert_eq!(missing, "ResourceNotFoundException");
    let other = e.aws_error((ACME_KEY_ID, ACME_SECRET), &["list-snapshot-blocks", "--snapshot-id", &snap]);
    assert_eq!(other, "ResourceNotFoundException");
    let other = e.aws_error((ACME_KEY_ID, ACME_SECRET), &["list-snapshot-blocks", "--snapshot-id", "db@a"]);
    assert_eq!(other, "ResourceNotFoundException");

    let (snaps, vols) = (e.snapshot_ids(), e.volume_names());
    // ClientToken: the same request answers the same snapshot; another request conflicts.
    let started = e.aws(&["start-snapshot", "--volume-size", "1", "--timeout", "10", "--client-token", "tok-1"]);
    let pending = started["SnapshotId"].as_str().unwrap().to_string();
    assert_eq!(started["Status"], "pending");
    assert_eq!(started["BlockSize"], 524288);
    let again = e.aws(&["start-snapshot", "--volume-size", "1", "--timeout", "10", "--client-token", "tok-1"]);
    assert_eq!(again["SnapshotId"], started["SnapshotId"]);
    let conflict =
        e.aws_error(me, &["start-snapshot", "--volume-size", "2", "--timeout", "10", "--client-token", "tok-1"]);
    assert_eq!(conflict, "ConflictException");

    let data = random_bytes(5, BLOCK as usize);
    let block = tmp.path().join("block");
    std::fs::write(&block, &data).unwrap();
    let sum = {
        use base64::Engine as _;
        let d = ring_sha256(&data);
        (base64::engine::general_purpose::STANDARD.encode(d), d)
    };
    let put = |index: &str, checksum: &str| {
        vec![
            "put-snapshot-block".to_string(),
            "--snapshot-id".into(),
            pending.clone(),
            "--block-index".into(),
            index.into(),
            "--block-data".into(),
            block.display().to_string(),
            "--data-length".into(),
            "524288".into(),
            "--checksum".into(),
            checksum.into(),
            "--checksum-algorithm".into(),
            "SHA256".into(),
        ]
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let ok_put = put("7", &sum.0);
    e.aws(&args(&ok_put));
    // Bad checksum, index past the end (1 GiB = 2048 blocks): ValidationException.
    let wrong_sum = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([0u8; 32])
    };
    assert_eq!(e.aws_error(me, &args(&put("8", &wrong_sum))), "ValidationException");
    assert_eq!(e.aws_error(me, &args(&put("2048", &sum.0))), "ValidationException");
    // Another account cannot write it.
    assert_eq!(e.aws_error((ACME_KEY_ID, ACME_SECRET), &args(&ok_put)), "ResourceNotFoundException");
    // Pending: not listed anywhere, not readable.
    assert_eq!((e.snapshot_ids(), e.volume_names()), (snaps.clone(), vols.clone()));
    assert_eq!(e.aws_error(me, &["list-snapshot-blocks", "--snapshot-id", &pending]), "ValidationException");
    // A wrong aggregated checksum: refused, and the snapshot is gone (nothing half-made).
    let complete = |checksum: &str| {
        e.aws_error(
            me,
            &[
                "complete-snapshot",
                "--snapshot-id",
                &pending,
                "--changed-blocks-count",
                "1",
                "--checksum",
                checksum,
                "--checksum-algorithm",
                "SHA256",
                "--checksum-aggregation-method",
                "LINEAR",
            ],
        )
    };
    assert_eq!(complete(&wrong_sum), "ValidationException");
    assert_eq!((e.snapshot_ids(), e.volume_names()), (snaps.clone(), vols.clone()));
    assert!(
        e.d.cli_json(&["volume", "list"])
            .as_array()
            .unwrap()
            .iter()
            .all(|v| !v["name"].as_str().unwrap().starts_with("ebs-")),
        "no staging volume left"
    );
    assert_eq!(complete(&sum.0), "ResourceNotFoundException", "the refused snapshot is gone");

    // The same, completed rightly: an ordinary snapshot with that block.
    let started = e.aws(&["start-snapshot", "--volume-size", "1", "--timeout", "10"]);
    let id = started["SnapshotId"].as_str().unwrap().to_string();
    let mut p = put("7", &sum.0);
    p[2] = id.clone();
    e.aws(&args(&p));
    let agg = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(ring_sha256(&sum.1))
    };
    let done = e.aws(&[
        "complete-snapshot",
        "--snapshot-id",
        &id,
        "--changed-blocks-count",
        "1",
        "--checksum",
        &agg,
        "--checksum-algorithm",
        "SHA256",
        "--checksum-aggregation-method",
        "LINEAR",
    ]);
    assert_eq!(done["Status"], "completed");
    assert!(e.snapshot_ids().contains(&id));
    let exported = tmp.path().join("export");
    nbd_to_file(&e.d, &id, &exported);
    let all = std::fs::read(&exported).unwrap();
    assert_eq!(&all[7 * BLOCK as usize..8 * BLOCK as usize], &data[..]);
    assert!(all[..7 * BLOCK as usize].iter().all(|&b| b == 0));
    // Completed: it takes no more blocks.
    assert_eq!(e.aws_error(me, &args(&p)), "ValidationException");

    // Incremental, as a backup agent writes one: a parent, and only the blocks that changed.
    let started = e.aws(&["start-snapshot", "--volume-size", "1", "--timeout", "10", "--parent-snapshot-id", "db@a"]);
    let inc = started["SnapshotId"].as_str().unwrap().to_string();
    assert_eq!(started["ParentSnapshotId"].as_str(), Some(snap.as_str()));
    for index in ["5", "1"] {
        let mut p = put(index, &sum.0);
        p[2] = inc.clone();
        e.aws(&args(&p));
    }
    let agg2 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(ring_sha256(&[sum.1, sum.1].concat()))
    };
    e.aws(&["complete-snapshot", "--snapshot-id", &inc, "--changed-blocks-count", "2", "--checksum", &agg2]);
    let changed = e.aws(&["list-changed-blocks", "--first-snapshot-id", "db@a", "--second-snapshot-id", &inc]);
    let got: Vec<u64> =
        changed["ChangedBlocks"].as_array().unwrap().iter().map(|b| b["BlockIndex"].as_u64().unwrap()).collect();
    assert_eq!(got, vec![1, 5], "exactly the blocks written on top of the parent: {changed}");
    let (parent, child) = (tmp.path().join("parent"), tmp.path().join("child"));
    nbd_to_file(&e.d, "db@a", &parent);
    nbd_to_file(&e.d, &inc, &child);
    let (mut want, got) = (std::fs::read(&parent).unwrap(), std::fs::read(&child).unwrap());
    for b in [1usize, 5] {
        want[b * BLOCK as usize..(b + 1) * BLOCK as usize].copy_from_slice(&data);
    }
    assert!(want == got, "the child is the parent with blocks 1 and 5 written");
}

fn ring_sha256(data: &[u8]) -> [u8; 32] {
    let mut sum = [0u8; 32];
    sum.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    sum
}

#[test]
fn the_daemon_refuses_a_readable_secret_file_and_a_plaintext_non_loopback_listener() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    write_secret(&dir.join("ebs.secret"), SECRET, 0o644);
    std::fs::write(
        dir.join("snapblk.toml"),
        format!("[ebs_api]\nkeys = [{{ access_key_id = \"{KEY_ID}\", secret_file = \"ebs.secret\" }}]\n"),
    )
    .unwrap();
    let e = Daemon::try_start(&dir, &["--ebs-listen", "127.0.0.1:0"]).err().expect("refused");
    let secret = dir.join("ebs.secret").display().to_string();
    assert!(e.contains(&secret) && e.contains("chmod 600"), "{e}");
    assert!(!e.contains(SECRET));
    write_secret(&dir.join("ebs.secret"), SECRET, 0o600);
    let e = Daemon::try_start(&dir, &["--ebs-listen", "0.0.0.0:0"]).err().expect("refused");
    assert!(e.contains("refusing --ebs-listen 0.0.0.0:0") && e.contains("--tls-cert"), "{e}");
    // A key for an account that does not exist.
    std::fs::write(
        dir.join("snapblk.toml"),
        format!("[ebs_api]\nkeys = [{{ access_key_id = \"{KEY_ID}\", secret_file = \"ebs.secret\", account = \"nobody\" }}]\n"),
    )
    .unwrap();
    let e = Daemon::try_start(&dir, &["--ebs-listen", "127.0.0.1:0"]).err().expect("refused");
    assert!(e.contains("account 'nobody'"), "{e}");
}

#[test]
fn the_facade_serves_https_with_the_daemons_certificate() {
    if !require_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let certs = common::tls::Certs::make(&tmp.path().join("pki"));
    let args = vec![
        "--tls-cert".to_string(),
        certs.server_cert().display().to_string(),
        "--tls-key".to_string(),
        certs.server_key().display().to_string(),
        "--nbd-tls".to_string(),
        "off".to_string(),
    ];
    let Some(e) = Ebs::start_with(tmp.path(), false, &args, Some(certs.ca())) else { return };
    assert!(e.url.starts_with("https://127.0.0.1:"), "{}", e.url);
    e.d.cli_ok(&["volume", "create", "db", "--size", "64M"]);
    qemu_io(&e.d.nbd_uri("db"), &["write -P 0x11 1M 1M"]);
    e.d.cli_ok(&["snapshot", "create", "db", "--name", "a"]);
    let listed = e.aws(&["list-snapshot-blocks", "--snapshot-id", "db@a"]);
    let got: Vec<u64> =
        listed["Blocks"].as_array().unwrap().iter().map(|b| b["BlockIndex"].as_u64().unwrap()).collect();
    assert_eq!(got, vec![2, 3]);
}
