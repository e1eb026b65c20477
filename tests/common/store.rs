//! Helpers of the object-store suites (tests/store.rs, tests/hydrate.rs): the regions under
//! test (the local filesystem and, from scripts/test, a real Garage server), daemon
//! configuration, data generation and comparisons.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{ok, python_ok, require_libnbd, require_tool, Daemon};

pub const MIB: u64 = 1 << 20;
pub const CLUSTER: u64 = 64 << 10;

/// A region under test: its name in snapblk.toml and its block (without a prefix).
pub struct TestRegion {
    pub name: &'static str,
    pub block: String,
}

pub fn regions() -> Vec<TestRegion> {
    let mut v = vec![TestRegion { name: "local", block: "[regions.local]\nkind = \"fs\"\npath = \"store\"\n".into() }];
    match std::env::var("SNAPBLK_GARAGE_REGION") {
        Ok(path) => {
            let block = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
            v.push(TestRegion { name: "garage", block });
        }
        Err(_) if std::env::var("SNAPBLK_REQUIRE_GARAGE").as_deref() == Ok("1") => {
            panic!("SNAPBLK_REQUIRE_GARAGE=1 but SNAPBLK_GARAGE_REGION is not set (run scripts/test)")
        }
        Err(_) => {
            eprintln!("SKIP: {}: no Garage (SNAPBLK_GARAGE_REGION unset): local region only", super::test_name())
        }
    }
    v
}

/// Writes `DIR/snapblk.toml` for `region`: small packs (many objects), no background GC, a
/// fresh prefix in the shared bucket, and `extra` lines (upload settings, faults).
pub fn configure(dir: &Path, region: &TestRegion, upload: &str, region_extra: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let prefix = format!("t-{:016x}/", rand_u64());
    let prefix_line = if region.name == "local" { String::new() } else { format!("prefix = \"{prefix}\"\n") };
    let text = format!(
        "[upload]\nconcurrency = 4\npack_size = \"1M\"\n{upload}\n[gc]\ninterval = \"0s\"\ngrace = \"0s\"\ndelete_delay = \"0s\"\n\n{}\n{prefix_line}request_timeout = \"5s\"\n{region_extra}\n",
        region.block.trim_end()
    );
    std::fs::write(dir.join("snapblk.toml"), text).unwrap();
}

/// The usual start of a store test: a fresh directory `TMP/d` configured for `region` (with
/// `upload` lines, see `configure`), its daemon, and a volume `vol` of `size` homed in the
/// region.
pub fn start_with_volume(region: &TestRegion, upload: &str, size: &str) -> (tempfile::TempDir, PathBuf, Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    configure(&dir, region, upload, "");
    let d = Daemon::start(&dir);
    d.cli_ok(&["volume", "create", "vol", "--size", size, "--region", region.name]);
    (tmp, dir, d)
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    h.finish()
}

pub fn tools() -> bool {
    require_libnbd() && require_tool("qemu-img") && require_tool("nbdcopy")
}

pub fn fill(d: &Daemon, export: &str, offset: u64, len: u64, seed: u64) {
    python_ok(
        "data.py",
        &["fill", &d.nbd_uri(export), &offset.to_string(), &len.to_string(), &seed.to_string()],
        Duration::from_secs(120),
    );
}

pub fn scatter(d: &Daemon, export: &str, n: u64, seed: u64) {
    python_ok(
        "data.py",
        &["scatter", &d.nbd_uri(export), &CLUSTER.to_string(), &n.to_string(), &seed.to_string()],
        Duration::from_secs(120),
    );
}

/// Copies an NBD export to a file.
pub fn nbd_to_file(d: &Daemon, export: &str, path: &Path) {
    ok("nbdcopy", &[&d.nbd_uri(export), &path.display().to_string()]);
}

pub fn compare(a: &Path, b: &Path) {
    ok("qemu-img", &["compare", "-q", "-f", "raw", "-F", "raw", &a.display().to_string(), &b.display().to_string()]);
}

pub fn snapshot(d: &Daemon, volume: &str, name: &str) -> Value {
    d.cli_json(&["snapshot", "create", volume, "--name", name])
}

/// Waits until the snapshot's upload is no longer running; returns its final view.
pub fn wait_upload(d: &Daemon, snap: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = d.cli_json(&["snapshot", "show", snap]);
        let state = v["upload"]["state"].as_str().unwrap_or("").to_string();
        if state != "uploading" {
            return v;
        }
        assert!(Instant::now() < deadline, "upload of {snap} still running after {timeout:?}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn wait_available(d: &Daemon, snap: &str) -> Value {
    let v = wait_upload(d, snap, Duration::from_secs(180));
    assert_eq!(v["upload"]["state"], "available", "upload of {snap}: {v}\n{}", d.log());
    v
}

/// Waits until the snapshot's local data is released (done right after its upload).
pub fn wait_released(d: &Daemon, snap: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = d.cli_json(&["snapshot", "show", snap]);
        if v["local"] == false {
            return;
        }
        assert!(Instant::now() < deadline, "{snap} still local 10 s after its upload: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A volume's hydration (`volume show`): an object while it loads from the store, else null.
pub fn hydration(d: &Daemon, vol: &str) -> Value {
    d.cli_json(&["volume", "show", vol])["hydration"].clone()
}

/// Loads the rest of a volume (`volume hydrate --wait`) and checks it is done.
pub fn hydrate_wait(d: &Daemon, vol: &str) {
    d.cli_ok(&["volume", "hydrate", vol, "--wait"]);
    let h = hydration(d, vol);
    assert!(h.is_null(), "{vol} still loading after hydrate --wait: {h}");
}

pub fn region_show(d: &Daemon, region: &str) -> Value {
    d.cli_json(&["region", "show", region])
}

pub fn verify_ok(d: &Daemon, snap: &str) {
    let out = d.cli_ok(&["snapshot", "verify", snap]);
    assert!(out.contains("ok: every object"), "verify {snap}:\n{out}");
}

pub fn export(d: &Daemon, snap: &str, out: &Path) {
    d.cli_ok(&["snapshot", "export", snap, "--output", &out.display().to_string()]);
}

/// Writes a region key file as an operator would: readable by its owner only (the daemon
/// refuses key files any user can read).
pub fn write_key_file(path: &Path, text: impl AsRef<[u8]>) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).unwrap();
    std::io::Write::write_all(&mut f, text.as_ref()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Copies a directory tree (a fixture) as the daemon keeps its files: directories 0700, files
/// 0600 (a checkout has them world-readable, which the daemon refuses for key files).
pub fn copy_tree(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

/// Bytes of random data node A writes (the rest of the 64 MiB volume stays a hole).
pub const DATA: u64 = 40 * MIB;

/// Node A and the snapshot it uploaded: `vol@s1`, whose export is in `expected`.
pub struct Origin {
    pub tmp: tempfile::TempDir,
    pub a: Daemon,
    pub id: String,
    /// Bytes the snapshot's upload stored (what a full hydration fetches, about).
    pub stored: u64,
    pub expected: PathBuf,
    pub key: String,
}

pub fn origin(region: &TestRegion) -> Origin {
    let tmp = tempfile::tempdir().unwrap();
    let a_dir = tmp.path().join("a");
    configure(&a_dir, region, "", "");
    let a = Daemon::start(&a_dir);
    a.cli_ok(&["volume", "create", "vol", "--size", "64M", "--region", region.name]);
    fill(&a, "vol", 0, DATA, 11);
    let id = snapshot(&a, "vol", "s1")["id"].as_str().unwrap().to_string();
    let s1 = wait_available(&a, "vol@s1");
    let expected = tmp.path().join("expected.raw");
    export(&a, "vol@s1", &expected);
    let key = a.cli_ok(&["key", "export", region.name]);
    Origin { stored: s1["upload"]["added_bytes"].as_u64().unwrap(), tmp, a, id, expected, key }
}

/// Starts node `name`, which shares A's region (same store, same key) with its own DIR:
/// `hydrate` is its `[hydrate]` table, `faults` lines of the region's `faults` table.
pub fn node(o: &Origin, region: &TestRegion, name: &str, hydrate: &str, faults: &str) -> Daemon {
    let dir = o.tmp.path().join(name);
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    let a_text = std::fs::read_to_string(o.a.dir.join("snapblk.toml")).unwrap();
    let store = o.a.dir.join("store").display().to_string();
    let mut text =
        format!("[hydrate]\n{hydrate}\n{}", a_text.replace("path = \"store\"", &format!("path = \"{store}\"")));
    if !faults.is_empty() {
        text.push_str(&format!("\n[regions.{}.faults]\n{faults}\n", region.name));
    }
    std::fs::write(dir.join("snapblk.toml"), text).unwrap();
    write_key_file(&dir.join("keys").join(format!("{}.key", region.name)), &o.key);
    Daemon::start(&dir)
}
