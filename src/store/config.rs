//! `DIR/snapblk.toml`: regions (named object stores) and upload / GC settings.
//!
//! Created with defaults (one region, `local`, on the filesystem) by `serve` when missing.
//! Credentials are read here and never logged: [`RegionConfig`]'s `Debug` leaves them out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::crypto::Cipher;
use super::error::{Result, StoreError};
use crate::units::{parse_duration, parse_size};

pub const CONFIG_FILE: &str = "snapblk.toml";

pub(crate) const DEFAULT_CONFIG: &str = r#"# snapblk daemon configuration (created by `snapblk serve`; edit and restart to change).
# Paths are relative to the daemon directory.

[upload]
enabled = true                   # upload every snapshot when it is taken (false: only `snapblk snapshot upload`)
concurrency = 4                  # parallel PUTs per upload
bandwidth_limit = "0"            # bytes per second over all uploads, e.g. "100M"; "0" = unlimited
pack_size = "32M"                # target size of one pack object
instant_access_retention = "0s"  # keep snapshot data locally this long after upload (e.g. "24h")

[hydrate]                        # volumes created from (or rolled back to) a snapshot in the store
background = true                # load all their data in the background (false: only what is read, and `volume hydrate`)
concurrency = 4                  # parallel background GETs
bandwidth_limit = "0"            # bytes per second for background loading; "0" = unlimited
read_timeout = "20s"             # a read that needs the store fails (EIO) after this long without it (below the kernel NBD timeout, 30s)
readahead = "1M"                 # prefetched after sequential reads; "0" = none
hold = "15m"                     # while it loads from a snapshot in a region, this node holds it there (renewed every third of this): its owner cannot delete it meanwhile

[gc]
interval = "1h"                  # background GC period per region; "0s" = only `snapblk gc`
grace = "1h"                     # never delete unreferenced packs younger than this
delete_delay = "1h"              # a pack found unreferenced is deleted by a later GC, this long after (other nodes' dedup indexes let go of it meanwhile)
lease = "10m"                    # GC runs on one node of a region at a time: it holds the region's lease this long, renewed while it runs

[recycle_bin]                    # deleted snapshots (by hand or by retention) wait here, restorable
retention = "0s"                 # how long; "0s" = off (a delete is final), e.g. "7d"
lock = false                     # true: the bin cannot be purged or shortened until `recycle-bin unlock` + unlock_delay
unlock_delay = "7d"

[quotas]                         # per volume; override one volume with [quotas.volumes.NAME]
max_snapshots_manual = 256       # snapshots taken by hand
max_snapshots_auto = 1000        # snapshots taken by policies
on_limit = "delete-oldest-auto"  # a policy at max_snapshots_auto: "delete-oldest-auto" or "reject"
max_concurrent_tasks = 10        # snapshot creates and uploads in flight
min_snapshot_interval = "0s"     # between two snapshots of a volume

[regions.local]
kind = "fs"
path = "store"
# key_file = "keys/local.key"    # generated when missing: back it up (`snapblk key export`)
# cipher = "auto"                # of a new repository: "aes-256-gcm" (auto: where the CPU has AES
                                 # instructions) or "xchacha20-poly1305"; an existing one keeps its own

# The EBS direct API facade (`serve --ebs-listen`): SigV4 access keys, each acting for an account
# (default: "default") with a role (default: "operator"); secret files mode 0600.
# [ebs_api]
# keys = [{ access_key_id = "AKIDBACKUP1", secret_file = "keys/ebs-backup.secret" }]

# An S3-compatible region (AWS S3, Alibaba OSS, MinIO, Garage, Ceph RGW):
# [regions.garage]
# kind = "s3"
# endpoint = "http://127.0.0.1:3900"
# bucket = "snapblk"
# prefix = "prod/"
# region = "garage"
# access_key_id = "GK..."                       # or AWS_ACCESS_KEY_ID
# secret_access_key_file = "keys/garage.secret" # or AWS_SECRET_ACCESS_KEY
# key_file = "keys/garage.key"

# An archive region (`snapblk snapshot archive`): archived snapshots of a volume deduplicate
# against each other; deleting one before its minimum retention needs --force.
# [regions.archive]
# kind = "s3"                                   # (or "fs")
# tier = "archive"
# storage_class = "GLACIER_IR"                  # S3 only: the class of its packs (OSS: "Archive"); one that
                                                # needs a thaw ("DEEP_ARCHIVE"): `snapblk snapshot restore-archive` first
# min_age = "14d"                               # snapshots younger than this are not archived
# min_retention = "90d"                         # default for --min-retention
# ...endpoint, bucket, credentials and key_file as above
"#;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    upload: RawUpload,
    #[serde(default)]
    hydrate: RawHydrate,
    #[serde(default)]
    gc: RawGc,
    #[serde(default)]
    recycle_bin: RawRecycleBin,
    #[serde(default)]
    quotas: RawQuotas,
    #[serde(default)]
    regions: BTreeMap<String, RawRegion>,
    #[serde(default)]
    ebs_api: RawEbsApi,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEbsApi {
    #[serde(default)]
    keys: Vec<RawEbsKey>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEbsKey {
    access_key_id: String,
    secret_file: String,
    account: Option<String>,
    role: Option<String>,
}

/// `[ebs_api]`: the access keys of the EBS direct API facade (`serve --ebs-listen`).
#[derive(Debug, Clone, Default)]
pub struct EbsApiConfig {
    pub keys: Vec<EbsKey>,
}

/// One access key: requests signed (SigV4) with its secret act for `account` with `role`.
#[derive(Clone)]
pub struct EbsKey {
    pub access_key_id: String,
    pub secret: String,
    pub account: String,
    /// A role name (`service::Role`), checked by the facade when the daemon starts.
    pub role: String,
}

impl std::fmt::Debug for EbsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbsKey")
            .field("access_key_id", &self.access_key_id)
            .field("account", &self.account)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// The keys of `[ebs_api]`, each secret read from its file, which no one but the daemon's
/// user may read (mode 0600 or stricter).
fn ebs_keys(raw: &RawEbsApi, dir: &Path) -> std::result::Result<Vec<EbsKey>, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut keys: Vec<EbsKey> = Vec::new();
    for k in &raw.keys {
        let id = k.access_key_id.trim();
        if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!("ebs_api.keys: access_key_id '{id}' must be 1-128 letters and digits"));
        }
        if keys.iter().any(|o| o.access_key_id == id) {
            return Err(format!("ebs_api.keys: access_key_id '{id}' is listed twice"));
        }
        let path = if Path::new(&k.secret_file).is_absolute() {
            PathBuf::from(&k.secret_file)
        } else {
            dir.join(&k.secret_file)
        };
        let meta = std::fs::metadata(&path)
            .map_err(|e| format!("ebs_api.keys: cannot read the secret_file {} of key {id}: {e}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "ebs_api.keys: the secret_file {} of key {id} can be read by other users (mode {mode:03o}); restrict it with: chmod 600 {}",
                path.display(),
                path.display()
            ));
        }
        let secret = std::fs::read_to_string(&path)
            .map_err(|e| format!("ebs_api.keys: cannot read the secret_file {} of key {id}: {e}", path.display()))?
            .trim()
            .to_string();
        if secret.is_empty() {
            return Err(format!("ebs_api.keys: the secret_file {} of key {id} is empty", path.display()));
        }
        keys.push(EbsKey {
            access_key_id: id.to_string(),
            secret,
            account: k.account.clone().unwrap_or_else(|| "default".into()),
            role: k.role.clone().unwrap_or_else(|| "operator".into()),
        });
    }
    Ok(keys)
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecycleBin {
    retention: Option<String>,
    lock: Option<bool>,
    unlock_delay: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotas {
    max_snapshots_manual: Option<u32>,
    max_snapshots_auto: Option<u32>,
    on_limit: Option<String>,
    max_concurrent_tasks: Option<u32>,
    min_snapshot_interval: Option<String>,
    #[serde(default)]
    volumes: BTreeMap<String, RawQuota>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    max_snapshots_manual: Option<u32>,
    max_snapshots_auto: Option<u32>,
    on_limit: Option<String>,
    max_concurrent_tasks: Option<u32>,
    min_snapshot_interval: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHydrate {
    background: Option<bool>,
    concurrency: Option<usize>,
    bandwidth_limit: Option<String>,
    read_timeout: Option<String>,
    readahead: Option<String>,
    hold: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpload {
    enabled: Option<bool>,
    concurrency: Option<usize>,
    bandwidth_limit: Option<String>,
    pack_size: Option<String>,
    instant_access_retention: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGc {
    interval: Option<String>,
    grace: Option<String>,
    delete_delay: Option<String>,
    lease: Option<String>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    kind: String,
    path: Option<String>,
    endpoint: Option<String>,
    bucket: Option<String>,
    #[serde(default)]
    prefix: String,
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    secret_access_key_file: Option<String>,
    key_file: Option<String>,
    cipher: Option<String>,
    request_timeout: Option<String>,
    retries: Option<u32>,
    tier: Option<String>,
    storage_class: Option<String>,
    min_age: Option<String>,
    min_retention: Option<String>,
    #[serde(default)]
    faults: Faults,
}

impl std::fmt::Debug for RawRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRegion").field("kind", &self.kind).finish_non_exhaustive()
    }
}

/// Fault injection, for tests of the retry and verification paths: a fraction of requests fail,
/// hang past the request timeout, or (GETs) return truncated bodies; every GET can be delayed.
/// Off unless configured (`[regions.NAME.faults]`), and refused by the daemon unless its
/// environment has `SNAPBLK_TEST_FAULTS=1` (the test harness sets it).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    #[serde(default)]
    pub error_rate: f64,
    #[serde(default)]
    pub timeout_rate: f64,
    #[serde(default)]
    pub truncate_rate: f64,
    #[serde(default)]
    pub get_latency_ms: u64,
    /// While this file exists, every request fails (a store outage a test can switch).
    #[serde(default)]
    pub outage_file: Option<PathBuf>,
    /// Emulates an archive class that needs a thaw around the real store: a GET of a pack
    /// fails as S3 answers one in DEEP_ARCHIVE until its restore was requested (`snapshot
    /// restore-archive`) and this many seconds passed (see `objects::ThawEmulation`).
    #[serde(default)]
    pub thaw_seconds: Option<u64>,
}

impl Faults {
    pub fn any(&self) -> bool {
        self.error_rate > 0.0
            || self.timeout_rate > 0.0
            || self.truncate_rate > 0.0
            || self.get_latency_ms > 0
            || self.outage_file.is_some()
            || self.thaw_seconds.is_some()
    }
}

#[derive(Clone)]
pub enum Backend {
    Fs {
        path: PathBuf,
    },
    S3 {
        endpoint: Option<String>,
        bucket: String,
        prefix: String,
        region: String,
        access_key_id: String,
        secret_access_key: String,
    },
}

#[derive(Clone)]
pub struct RegionConfig {
    pub name: String,
    pub backend: Backend,
    pub key_file: PathBuf,
    /// Whether `key_file` was named in the config (else it is generated on first use).
    pub key_file_configured: bool,
    /// The cipher of the repository if this node creates it (an existing one keeps its own).
    pub new_repository_cipher: Cipher,
    pub request_timeout: Duration,
    pub retries: u32,
    pub faults: Faults,
    /// `standard`, or `archive`: the region keeps archived snapshots (`snapshot archive`).
    pub tier: Tier,
    /// The S3 storage class of its packs (e.g. `GLACIER_IR`, `DEEP_ARCHIVE`, OSS `Archive`);
    /// `None`: the bucket's default. Ignored by the fs kind.
    pub storage_class: Option<String>,
    /// Archive tier: a snapshot must be at least this old to be archived here.
    pub min_age: Duration,
    /// Archive tier: the minimum retention of an archived snapshot unless the archive
    /// names its own (deleting it sooner needs `--force`).
    pub min_retention: Duration,
}

/// A region's storage tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    #[default]
    Standard,
    Archive,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Standard => "standard",
            Tier::Archive => "archive",
        }
    }
}

impl RegionConfig {
    /// The repository of `account` in this region (docs/FORMAT.md, "Accounts' repositories"):
    /// its objects under `accounts/ACCOUNT/` of the region, its repository key wrapped by the
    /// account's key file, its own blob index — its own key and dedup domain. The default
    /// account's repository is the region itself.
    pub fn for_account(&self, account: &str, dir: &Path) -> RegionConfig {
        if account == crate::engine::DEFAULT_ACCOUNT {
            return self.clone();
        }
        let mut cfg = self.clone();
        cfg.name = crate::engine::owned_name(account, &self.name);
        cfg.backend = match &self.backend {
            Backend::Fs { path } => Backend::Fs { path: path.join("accounts").join(account) },
            Backend::S3 { endpoint, bucket, prefix, region, access_key_id, secret_access_key } => Backend::S3 {
                endpoint: endpoint.clone(),
                bucket: bucket.clone(),
                prefix: match prefix.trim_matches('/') {
                    "" => format!("accounts/{account}"),
                    p => format!("{p}/accounts/{account}"),
                },
                region: region.clone(),
                access_key_id: access_key_id.clone(),
                secret_access_key: secret_access_key.clone(),
            },
        };
        cfg.key_file = account_key_file(dir, account);
        cfg.key_file_configured = false;
        cfg
    }
}

/// An account's key file, which wraps its repository keys in every region (generated on
/// its first upload; `snapblk key export --account ACCOUNT` shows it for a backup).
pub fn account_key_file(dir: &Path, account: &str) -> PathBuf {
    dir.join("keys").join("accounts").join(format!("{account}.key"))
}

impl std::fmt::Debug for RegionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionConfig")
            .field("name", &self.name)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Upload each snapshot when it is created.
    pub upload_enabled: bool,
    pub upload_concurrency: usize,
    /// Bytes per second over all uploads; 0 = unlimited.
    pub bandwidth_limit: u64,
    pub pack_size: u64,
    pub instant_access_retention: Duration,
    pub hydrate: HydrateConfig,
    /// 0 = no background GC.
    pub gc_interval: Duration,
    pub gc_grace: Duration,
    /// Between a GC condemning an unreferenced pack and a later one deleting it.
    pub gc_delete_delay: Duration,
    /// How long the GC lease lasts unless renewed.
    pub gc_lease: Duration,
    pub recycle_bin: RecycleBinConfig,
    /// The quotas of volumes not named in `quota_overrides`.
    pub quotas: Quotas,
    /// Volume name → its quotas (the defaults, with what `[quotas.volumes.NAME]` sets).
    pub quota_overrides: BTreeMap<String, Quotas>,
    pub regions: BTreeMap<String, RegionConfig>,
    /// The EBS direct API facade's access keys.
    pub ebs_api: EbsApiConfig,
}

/// `[recycle_bin]`: where deleted snapshots wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecycleBinConfig {
    /// Zero: the bin is off and deletes are final.
    pub retention: Duration,
    /// Lock the bin at start (see `service::bin`).
    pub lock: bool,
    pub unlock_delay: Duration,
}

/// What a policy does at `max_snapshots_auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnLimit {
    /// Delete the volume's oldest automatic snapshot that is not held, then take the new one.
    DeleteOldestAuto,
    /// Fail the tick.
    Reject,
}

/// One volume's quotas and task limits (`[quotas]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quotas {
    pub max_snapshots_manual: u32,
    pub max_snapshots_auto: u32,
    pub on_limit: OnLimit,
    pub max_concurrent_tasks: u32,
    /// Seconds.
    pub min_snapshot_interval: u64,
}

impl Quotas {
    /// These quotas with what one `[quotas]` table sets; `key` names it in errors.
    fn with(&self, raw: &RawQuota, key: &str) -> std::result::Result<Quotas, String> {
        let on_limit = match raw.on_limit.as_deref() {
            None => self.on_limit,
            Some("delete-oldest-auto") => OnLimit::DeleteOldestAuto,
            Some("reject") => OnLimit::Reject,
            Some(other) => return Err(format!("{key}.on_limit '{other}': use \"delete-oldest-auto\" or \"reject\"")),
        };
        let min_snapshot_interval = match &raw.min_snapshot_interval {
            None => self.min_snapshot_interval,
            Some(d) => parse_duration(d).map_err(|e| format!("{key}.min_snapshot_interval: {e}"))?.as_secs(),
        };
        let q = Quotas {
            max_snapshots_manual: raw.max_snapshots_manual.unwrap_or(self.max_snapshots_manual),
            max_snapshots_auto: raw.max_snapshots_auto.unwrap_or(self.max_snapshots_auto),
            on_limit,
            max_concurrent_tasks: raw.max_concurrent_tasks.unwrap_or(self.max_concurrent_tasks),
            min_snapshot_interval,
        };
        if q.max_concurrent_tasks == 0 {
            return Err(format!("{key}.max_concurrent_tasks must be at least 1"));
        }
        Ok(q)
    }
}

impl Default for Quotas {
    fn default() -> Quotas {
        Quotas {
            max_snapshots_manual: 256,
            max_snapshots_auto: 1000,
            on_limit: OnLimit::DeleteOldestAuto,
            max_concurrent_tasks: 10,
            min_snapshot_interval: 0,
        }
    }
}

/// Loading volumes' data from the store (`[hydrate]`).
#[derive(Debug, Clone)]
pub struct HydrateConfig {
    /// Load everything in the background (else only what is read, and `volume hydrate`).
    pub background: bool,
    pub concurrency: usize,
    /// Bytes per second for background loading; 0 = unlimited.
    pub bandwidth_limit: u64,
    /// How long a read waits for the store before failing.
    pub read_timeout: Duration,
    pub readahead: u64,
    /// How long a hold on a snapshot this node loads from lasts unless renewed.
    pub hold: Duration,
}

fn bytes_or_zero(s: &str) -> std::result::Result<u64, String> {
    if s.trim() == "0" {
        Ok(0)
    } else {
        parse_size(s)
    }
}

impl Config {
    /// Loads `DIR/snapblk.toml`, writing the default one first when there is none.
    pub fn load_or_create(dir: &Path) -> Result<Config> {
        let path = dir.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(&path, DEFAULT_CONFIG).map_err(StoreError::io(format!("writing {}", path.display())))?;
                DEFAULT_CONFIG.to_string()
            }
            Err(e) => return Err(StoreError::io(format!("reading {}", path.display()))(e)),
        };
        Config::parse(&text, dir).map_err(|m| StoreError::Config(format!("{}: {m}", path.display())))
    }

    pub fn parse(text: &str, dir: &Path) -> std::result::Result<Config, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let dur = |v: &Option<String>, key: &str, default: &str| -> std::result::Result<Duration, String> {
            parse_duration(v.as_deref().unwrap_or(default)).map_err(|e| format!("{key}: {e}"))
        };
        let upload_concurrency = raw.upload.concurrency.unwrap_or(4);
        if !(1..=256).contains(&upload_concurrency) {
            return Err("upload.concurrency must be between 1 and 256".into());
        }
        let bandwidth_limit = bytes_or_zero(raw.upload.bandwidth_limit.as_deref().unwrap_or("0"))
            .map_err(|e| format!("upload.bandwidth_limit: {e}"))?;
        let pack_size = parse_size(raw.upload.pack_size.as_deref().unwrap_or("32M"))
            .map_err(|e| format!("upload.pack_size: {e}"))?;
        if !((1 << 20)..=(1 << 30)).contains(&pack_size) {
            return Err("upload.pack_size must be between 1M and 1G".into());
        }
        let hydrate = HydrateConfig {
            background: raw.hydrate.background.unwrap_or(true),
            concurrency: raw.hydrate.concurrency.unwrap_or(4),
            bandwidth_limit: bytes_or_zero(raw.hydrate.bandwidth_limit.as_deref().unwrap_or("0"))
                .map_err(|e| format!("hydrate.bandwidth_limit: {e}"))?,
            read_timeout: dur(&raw.hydrate.read_timeout, "hydrate.read_timeout", "20s")?,
            readahead: bytes_or_zero(raw.hydrate.readahead.as_deref().unwrap_or("1M"))
                .map_err(|e| format!("hydrate.readahead: {e}"))?,
            hold: dur(&raw.hydrate.hold, "hydrate.hold", "15m")?,
        };
        if hydrate.hold < Duration::from_secs(3) {
            return Err("hydrate.hold must be at least 3s (it is renewed every third of it)".into());
        }
        if !(1..=256).contains(&hydrate.concurrency) {
            return Err("hydrate.concurrency must be between 1 and 256".into());
        }
        if hydrate.read_timeout.is_zero() {
            return Err("hydrate.read_timeout must be greater than zero".into());
        }
        if hydrate.readahead > 64 << 20 {
            return Err("hydrate.readahead must be at most 64M".into());
        }
        let mut regions = BTreeMap::new();
        let mut raw_regions = raw.regions;
        raw_regions.entry("local".into()).or_insert_with(|| RawRegion {
            kind: "fs".into(),
            path: Some("store".into()),
            endpoint: None,
            bucket: None,
            prefix: String::new(),
            region: None,
            access_key_id: None,
            secret_access_key: None,
            secret_access_key_file: None,
            key_file: None,
            cipher: None,
            request_timeout: None,
            retries: None,
            tier: None,
            storage_class: None,
            min_age: None,
            min_retention: None,
            faults: Faults::default(),
        });
        for (name, r) in raw_regions {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)) {
                return Err(format!("region name '{name}': use letters, digits, '-' and '_'"));
            }
            regions.insert(name.clone(), region(&name, r, dir)?);
        }
        let recycle_bin = RecycleBinConfig {
            retention: dur(&raw.recycle_bin.retention, "recycle_bin.retention", "0s")?,
            lock: raw.recycle_bin.lock.unwrap_or(false),
            unlock_delay: dur(&raw.recycle_bin.unlock_delay, "recycle_bin.unlock_delay", "7d")?,
        };
        if recycle_bin.lock && recycle_bin.retention.is_zero() {
            return Err("recycle_bin.lock needs a recycle_bin.retention (the bin is off at 0s)".into());
        }
        let q = &raw.quotas;
        let defaults = RawQuota {
            max_snapshots_manual: q.max_snapshots_manual,
            max_snapshots_auto: q.max_snapshots_auto,
            on_limit: q.on_limit.clone(),
            max_concurrent_tasks: q.max_concurrent_tasks,
            min_snapshot_interval: q.min_snapshot_interval.clone(),
        };
        let quotas = Quotas::default().with(&defaults, "quotas")?;
        let mut quota_overrides = BTreeMap::new();
        for (name, q) in &raw.quotas.volumes {
            quota_overrides.insert(name.clone(), quotas.with(q, &format!("quotas.volumes.{name}"))?);
        }
        Ok(Config {
            upload_enabled: raw.upload.enabled.unwrap_or(true),
            upload_concurrency,
            bandwidth_limit,
            pack_size,
            instant_access_retention: dur(
                &raw.upload.instant_access_retention,
                "upload.instant_access_retention",
                "0s",
            )?,
            hydrate,
            gc_interval: dur(&raw.gc.interval, "gc.interval", "1h")?,
            gc_grace: dur(&raw.gc.grace, "gc.grace", "1h")?,
            gc_delete_delay: dur(&raw.gc.delete_delay, "gc.delete_delay", "1h")?,
            gc_lease: dur(&raw.gc.lease, "gc.lease", "10m")?,
            recycle_bin,
            quotas,
            quota_overrides,
            regions,
            ebs_api: EbsApiConfig { keys: ebs_keys(&raw.ebs_api, dir)? },
        })
    }
}

fn region(name: &str, r: RawRegion, dir: &Path) -> std::result::Result<RegionConfig, String> {
    let ctx = |m: String| format!("region '{name}': {m}");
    let rel = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    };
    let backend = match r.kind.as_str() {
        "fs" => Backend::Fs { path: rel(r.path.as_deref().unwrap_or("store")) },
        "s3" => {
            let bucket = r.bucket.clone().ok_or_else(|| ctx("an s3 region needs `bucket`".into()))?;
            let access_key_id = r
                .access_key_id
                .clone()
                .or_else(|| std::env::var("AWS_ACCESS_KEY_ID").ok())
                .ok_or_else(|| ctx("no access key: set `access_key_id` or AWS_ACCESS_KEY_ID".into()))?;
            let secret_access_key = match (&r.secret_access_key, &r.secret_access_key_file) {
                (Some(s), _) => s.clone(),
                (None, Some(f)) => super::crypto::check_private(&rel(f))
                    .map_err(|e| ctx(e.to_string()))
                    .and_then(|()| {
                        std::fs::read_to_string(rel(f))
                            .map_err(|e| ctx(format!("cannot read secret_access_key_file {f}: {e}")))
                    })?
                    .trim()
                    .to_string(),
                (None, None) => std::env::var("AWS_SECRET_ACCESS_KEY")
                    .map_err(|_| ctx("no secret key: set `secret_access_key_file` or AWS_SECRET_ACCESS_KEY".into()))?,
            };
            let mut prefix = r.prefix.trim_matches('/').to_string();
            if !prefix.is_empty() {
                prefix.push('/');
            }
            Backend::S3 {
                endpoint: r.endpoint.clone(),
                bucket,
                prefix,
                region: r.region.clone().unwrap_or_else(|| "us-east-1".into()),
                access_key_id,
                secret_access_key,
            }
        }
        other => return Err(ctx(format!("unknown kind '{other}': use \"fs\" or \"s3\""))),
    };
    for (rate, what) in [
        (r.faults.error_rate, "error_rate"),
        (r.faults.timeout_rate, "timeout_rate"),
        (r.faults.truncate_rate, "truncate_rate"),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            return Err(ctx(format!("faults.{what} must be between 0 and 1")));
        }
    }
    let new_repository_cipher = match r.cipher.as_deref().unwrap_or("auto") {
        "auto" => Cipher::for_this_cpu(),
        other => Cipher::from_name(other)
            .ok_or_else(|| ctx(format!("cipher '{other}': use \"auto\", \"aes-256-gcm\" or \"xchacha20-poly1305\"")))?,
    };
    let request_timeout = parse_duration(r.request_timeout.as_deref().unwrap_or("60s")).map_err(ctx)?;
    if request_timeout.is_zero() {
        return Err(ctx("request_timeout must be greater than zero".into()));
    }
    let tier = match r.tier.as_deref().unwrap_or("standard") {
        "standard" => Tier::Standard,
        "archive" => Tier::Archive,
        other => return Err(ctx(format!("tier '{other}': use \"standard\" or \"archive\""))),
    };
    if tier == Tier::Standard && (r.min_age.is_some() || r.min_retention.is_some()) {
        return Err(ctx("min_age and min_retention apply to archive regions only: add tier = \"archive\"".into()));
    }
    if let Some(class) = &r.storage_class {
        if class.is_empty() || !class.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ctx(format!(
                "storage_class '{class}': use the store's class name, e.g. \"GLACIER_IR\", \"DEEP_ARCHIVE\" or \"Archive\""
            )));
        }
    }
    let min_age = parse_duration(r.min_age.as_deref().unwrap_or("0s")).map_err(|e| ctx(format!("min_age: {e}")))?;
    let min_retention =
        parse_duration(r.min_retention.as_deref().unwrap_or("0s")).map_err(|e| ctx(format!("min_retention: {e}")))?;
    Ok(RegionConfig {
        name: name.to_string(),
        backend,
        key_file: rel(r.key_file.as_deref().unwrap_or(&format!("keys/{name}.key"))),
        key_file_configured: r.key_file.is_some(),
        new_repository_cipher,
        request_timeout,
        retries: r.retries.unwrap_or(8),
        faults: r.faults,
        tier,
        storage_class: r.storage_class,
        min_age,
        min_retention,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses_and_has_the_local_region() {
        let c = Config::parse(DEFAULT_CONFIG, Path::new("/d")).unwrap();
        assert_eq!(c.upload_concurrency, 4);
        assert_eq!(c.pack_size, 32 << 20);
        assert_eq!(c.instant_access_retention, Duration::ZERO);
        let local = &c.regions["local"];
        assert!(matches!(&local.backend, Backend::Fs { path } if path == Path::new("/d/store")));
        assert_eq!(local.key_file, Path::new("/d/keys/local.key"));
        assert_eq!(local.new_repository_cipher, Cipher::for_this_cpu());
        let chosen = |c: &str| {
            let text = format!("[regions.local]\nkind = \"fs\"\ncipher = \"{c}\"");
            Config::parse(&text, Path::new("/d")).unwrap().regions["local"].new_repository_cipher
        };
        assert_eq!(chosen("xchacha20-poly1305"), Cipher::XChaCha20Poly1305);
        assert_eq!(chosen("aes-256-gcm"), Cipher::Aes256GcmSubkey);
        assert_eq!(chosen("auto"), Cipher::for_this_cpu());
    }

    #[test]
    fn s3_region_from_the_documented_form() {
        let text = r#"
            [regions.garage]
            kind = "s3"
            endpoint = "http://127.0.0.1:3900"
            bucket = "snapblk"
            prefix = "prod/"
            region = "garage"
            access_key_id = "GKabc"
            secret_access_key = "s3cr3t"
            key_file = "keys/garage.key"
        "#;
        let c = Config::parse(text, Path::new("/d")).unwrap();
        let g = &c.regions["garage"];
        match &g.backend {
            Backend::S3 { bucket, prefix, region, secret_access_key, .. } => {
                assert_eq!((bucket.as_str(), prefix.as_str(), region.as_str()), ("snapblk", "prod/", "garage"));
                assert_eq!(secret_access_key, "s3cr3t");
            }
            Backend::Fs { .. } => panic!("expected s3"),
        }
        assert!(!format!("{g:?}").contains("s3cr3t"), "credentials must never be printed");
        assert!(c.regions.contains_key("local"), "local is always there");
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        let cases = [
            ("[upload]\nconcurrency = 0", "upload.concurrency"),
            ("[upload]\ninstant_access_retention = \"soon\"", "instant_access_retention"),
            ("[regions.x]\nkind = \"ftp\"", "unknown kind"),
            ("[regions.x]\nkind = \"s3\"", "bucket"),
            ("[bogus]\na = 1", "unknown field"),
            ("[regions.local]\nkind = \"fs\"\ncipher = \"rot13\"", "cipher 'rot13'"),
            ("[recycle_bin]\nlock = true", "recycle_bin.lock"),
            ("[quotas]\non_limit = \"panic\"", "quotas.on_limit 'panic'"),
            ("[quotas.volumes.db]\nmax_concurrent_tasks = 0", "quotas.volumes.db.max_concurrent_tasks"),
            ("[quotas]\nmin_snapshot_interval = \"often\"", "quotas.min_snapshot_interval"),
        ];
        for (text, needle) in cases {
            let err = Config::parse(text, Path::new("/d")).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn quotas_default_then_per_volume_overrides() {
        let c = Config::parse(DEFAULT_CONFIG, Path::new("/d")).unwrap();
        assert_eq!(c.quotas, Quotas::default());
        assert_eq!(c.recycle_bin.retention, Duration::ZERO);
        let text = "[quotas]\nmax_snapshots_manual = 5\n[quotas.volumes.db]\non_limit = \"reject\"\nmin_snapshot_interval = \"1m\"\n\
                    [recycle_bin]\nretention = \"7d\"\nlock = true";
        let c = Config::parse(text, Path::new("/d")).unwrap();
        assert_eq!(c.quotas.max_snapshots_manual, 5);
        let db = &c.quota_overrides["db"];
        assert_eq!((db.max_snapshots_manual, db.on_limit, db.min_snapshot_interval), (5, OnLimit::Reject, 60));
        assert_eq!(
            c.recycle_bin,
            RecycleBinConfig {
                retention: Duration::from_secs(7 * 86_400),
                lock: true,
                unlock_delay: Duration::from_secs(7 * 86_400)
            }
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
