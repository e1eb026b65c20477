//! One region's object store, wrapped in the layers every request goes through:
//! fault injection (tests) → per-request timeout → retry with backoff → metrics, plus an
//! optional bandwidth limit on PUTs. Everything above this module sees five operations
//! (put, get, get_range, delete, list) that either succeed or fail after retries, and two for
//! archive classes that need a thaw (`thaw_state`, `restore`: see [`super::s3`]).
//!
//! A GET of an object in such a class that is not restored fails at once (no retry) with
//! [`StoreError::Frozen`]; `faults.thaw_seconds` emulates such a class around the real store.
//!
//! A truncated body is never returned: GETs check the length they received against the length
//! asked for (or the object size the store reported) and retry on a mismatch.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{GetOptions, ObjectStore, PutPayload};
use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;

use super::config::{Backend, Faults, RegionConfig};
use super::error::{Result, StoreError};
use super::s3::{RestoreAnswer, S3Requests, Thaw, ThawTier};

/// Counters of what really went over the wire (successful attempts only), per region.
#[derive(Default)]
pub struct Metrics {
    pub put_ops: AtomicU64,
    pub put_bytes: AtomicU64,
    pub get_ops: AtomicU64,
    pub get_bytes: AtomicU64,
    pub delete_ops: AtomicU64,
    pub list_ops: AtomicU64,
    /// Thaw states read (HEAD) and restores requested.
    pub head_ops: AtomicU64,
    pub restore_ops: AtomicU64,
    /// Attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Operations that failed after all retries.
    pub failures: AtomicU64,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct MetricsView {
    pub put_ops: u64,
    pub put_bytes: u64,
    pub get_ops: u64,
    pub get_bytes: u64,
    pub delete_ops: u64,
    pub list_ops: u64,
    #[serde(default)]
    pub head_ops: u64,
    #[serde(default)]
    pub restore_ops: u64,
    pub retries: u64,
    pub failures: u64,
}

impl Metrics {
    pub fn view(&self) -> MetricsView {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsView {
            put_ops: l(&self.put_ops),
            put_bytes: l(&self.put_bytes),
            get_ops: l(&self.get_ops),
            get_bytes: l(&self.get_bytes),
            delete_ops: l(&self.delete_ops),
            list_ops: l(&self.list_ops),
            head_ops: l(&self.head_ops),
            restore_ops: l(&self.restore_ops),
            retries: l(&self.retries),
            failures: l(&self.failures),
        }
    }
}

/// A shared bandwidth limit: each caller reserves its bytes on a virtual timeline and sleeps
/// until its turn, so concurrent uploads together stay under `bytes_per_sec`.
pub struct RateLimiter {
    bytes_per_sec: u64,
    next_free: Mutex<tokio::time::Instant>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> Option<Arc<RateLimiter>> {
        (bytes_per_sec > 0)
            .then(|| Arc::new(RateLimiter { bytes_per_sec, next_free: Mutex::new(tokio::time::Instant::now()) }))
    }

    pub async fn acquire(&self, bytes: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let start = {
            let mut next = self.next_free.lock();
            let now = tokio::time::Instant::now();
            let start = (*next).max(now);
            *next = start + cost;
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// What a conditional PUT requires of the object it replaces.
#[derive(Debug, Clone)]
pub enum Condition {
    /// That there is none.
    Absent,
    /// That it is still the version with this e-tag.
    Version(String),
}

/// One listed object.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// Why one attempt failed.
enum Attempt {
    /// Worth retrying: network trouble, 5xx, timeout, short body, injected fault.
    Transient(String),
    NotFound,
    /// Not worth retrying (e.g. access denied, bad request).
    Fatal(String),
    /// In an archive class and not restored (S3: 403 InvalidObjectState); its class, if the
    /// store named it.
    Frozen(String),
}

impl From<object_store::Error> for Attempt {
    fn from(e: object_store::Error) -> Attempt {
        if let object_store::Error::PermissionDenied { .. } = &e {
            // The store's answer is in the error's text (its body), at some depth.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&s.to_string());
                source = s.source();
            }
            if let Some(class) = super::s3::frozen_read(&text) {
                return Attempt::Frozen(class);
            }
        }
        match e {
            object_store::Error::NotFound { .. } => Attempt::NotFound,
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented => Attempt::Fatal(with_root_cause(&e)),
            other => Attempt::Transient(with_root_cause(&other)),
        }
    }
}

/// An error's message with its root cause (e.g. "Connection refused (os error 111)"), which
/// the object store client's top-level message ("error sending request") leaves out; each
/// sentence once.
fn with_root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    // The client nests its sources' messages in its own ("X: X"): each part once.
    let mut parts: Vec<&str> = Vec::new();
    let full = e.to_string();
    for part in full.split(": ") {
        if !parts.contains(&part) {
            parts.push(part);
        }
    }
    let top = parts.join(": ");
    let mut root = e.source();
    while let Some(next) = root.and_then(|r| r.source()) {
        root = Some(next);
    }
    match root.map(|r| r.to_string()) {
        Some(cause) if !cause.is_empty() && !top.contains(&cause) => format!("{top} (cause: {cause})"),
        _ => top,
    }
}

/// `faults.thaw_seconds`: pack objects behave as in an archive class that needs a thaw — a
/// GET fails as S3's does (InvalidObjectState) until a restore was requested and this long
/// passed; then they are readable for the restore's days. Kept in memory (a restart forgets
/// the restores requested).
struct ThawEmulation {
    after: Duration,
    /// Key → when its restore was requested, and for how many days.
    requested: Mutex<HashMap<String, (SystemTime, u32)>>,
}

impl ThawEmulation {
    fn applies(key: &str) -> bool {
        key.starts_with("packs/")
    }

    fn state(&self, key: &str) -> Thaw {
        let mut requested = self.requested.lock();
        let Some(&(at, days)) = requested.get(key) else { return Thaw::Frozen };
        let ready = at + self.after;
        let expires = ready + Duration::from_secs(u64::from(days) * 86_400);
        let now = SystemTime::now();
        if now < ready {
            Thaw::InProgress
        } else if now < expires {
            Thaw::Readable { expires: expires.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs()) }
        } else {
            requested.remove(key);
            Thaw::Frozen
        }
    }

    /// As S3: a frozen object starts its restore; a restored one gets its days again.
    fn request(&self, key: &str, days: u32) -> Thaw {
        match self.state(key) {
            Thaw::Frozen => {
                self.requested.lock().insert(key.to_string(), (SystemTime::now(), days));
            }
            Thaw::Readable { .. } => {
                let mut requested = self.requested.lock();
                if let Some(r) = requested.get_mut(key) {
                    // Readable from now for `days` (the ready time stays behind us).
                    r.0 = SystemTime::now() - self.after;
                    r.1 = days;
                }
            }
            Thaw::InProgress | Thaw::NotNeeded => {}
        }
        self.state(key)
    }
}

pub struct Objects {
    region: String,
    inner: Arc<dyn ObjectStore>,
    /// S3 regions: the requests the client above has no call for (restore, thaw state).
    s3: Option<S3Requests>,
    thaw: Option<ThawEmulation>,
    /// The archive class named in messages about frozen objects the store did not name.
    class: String,
    /// For the filesystem backend: its root, to fsync what was put.
    fs_root: Option<PathBuf>,
    /// Directories under `fs_root` whose own entries (up to the root) are known durable.
    synced_dirs: Mutex<HashSet<PathBuf>>,
    timeout: Duration,
    retries: u32,
    faults: Faults,
    limiter: Option<Arc<RateLimiter>>,
    /// The S3 storage class packs are written with (`storage_class`: an archive region's).
    pack_class: Option<String>,
    pub metrics: Metrics,
}

impl Objects {
    pub fn open(cfg: &RegionConfig, limiter: Option<Arc<RateLimiter>>) -> Result<Objects> {
        let config_err = |e: object_store::Error| StoreError::Config(format!("region '{}': {e}", cfg.name));
        let (inner, fs_root, s3): (Arc<dyn ObjectStore>, _, _) = match &cfg.backend {
            Backend::Fs { path } => {
                crate::fsutil::create_dir_all_durable(path)
                    .map_err(StoreError::io(format!("creating {}", path.display())))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(path).map_err(config_err)?;
                (Arc::new(fs), Some(path.clone()), None)
            }
            Backend::S3 { endpoint, bucket, prefix, region, access_key_id, secret_access_key } => {
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_access_key_id(access_key_id)
                    .with_secret_access_key(secret_access_key)
                    // Our own retry layer (below) governs; the client's would multiply it.
                    .with_retry(object_store::RetryConfig { max_retries: 0, ..Default::default() });
                if let Some(ep) = endpoint {
                    b = b.with_endpoint(ep).with_allow_http(ep.starts_with("http://"));
                }
                let client = b.build().map_err(config_err)?;
                let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    Arc::new(client)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(client, prefix.trim_end_matches('/')))
                };
                let raw =
                    S3Requests::new(endpoint.as_deref(), bucket, prefix, region, access_key_id, secret_access_key)
                        .map_err(|e| StoreError::Config(format!("region '{}': {e}", cfg.name)))?;
                (store, None, Some(raw))
            }
        };
        // The fs kind has no classes; on S3 only packs get one, so manifests, keys, holds and
        // leases stay readable at once (listing and accounting need no thaw).
        let pack_class = cfg.storage_class.clone().filter(|_| matches!(cfg.backend, Backend::S3 { .. }));
        Ok(Objects {
            region: cfg.name.clone(),
            inner,
            s3,
            thaw: cfg
                .faults
                .thaw_seconds
                .map(|s| ThawEmulation { after: Duration::from_secs(s), requested: Mutex::default() }),
            class: cfg.storage_class.clone().unwrap_or_else(|| "an archive class".into()),
            fs_root,
            synced_dirs: Mutex::default(),
            timeout: cfg.request_timeout,
            retries: cfg.retries,
            faults: cfg.faults.clone(),
            limiter,
            pack_class,
            metrics: Metrics::default(),
        })
    }

    /// Injected faults for one attempt; `Err` to fail it. May sleep (latency, or a hang that
    /// the request timeout cuts short).
    async fn inject(&self, is_get: bool) -> std::result::Result<bool, Attempt> {
        if !self.faults.any() {
            return Ok(false);
        }
        if self.faults.outage_file.as_ref().is_some_and(|f| f.exists()) {
            return Err(Attempt::Transient("injected outage".into()));
        }
        if is_get && self.faults.get_latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.faults.get_latency_ms)).await;
        }
        let (e, t, tr): (f64, f64, f64) = {
            let mut rng = rand::thread_rng();
            (rng.gen(), rng.gen(), rng.gen())
        };
        if e < self.faults.error_rate {
            return Err(Attempt::Transient("injected error".into()));
        }
        if t < self.faults.timeout_rate {
            tokio::time::sleep(self.timeout + Duration::from_millis(100)).await;
        }
        Ok(is_get && tr < self.faults.truncate_rate)
    }

    /// Runs `op` with the timeout, retrying transient failures with exponential backoff.
    async fn retry<T, F, Fut>(&self, what: &str, key: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Attempt>>,
    {
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 0;
        loop {
            let outcome = match tokio::time::timeout(self.timeout, op()).await {
                Ok(r) => r,
                Err(_) => Err(Attempt::Transient(format!("no answer within {:?}", self.timeout))),
            };
            let message = match outcome {
                Ok(v) => return Ok(v),
                Err(Attempt::NotFound) => return Err(StoreError::Missing(key.to_string())),
                Err(Attempt::Frozen(class)) => {
                    return Err(StoreError::Frozen {
                        object: key.to_string(),
                        region: crate::engine::bare_name(&self.region).to_string(),
                        class: if class.is_empty() { self.class.clone() } else { class },
                        snapshot: None,
                    })
                }
                Err(Attempt::Fatal(m)) => {
                    self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                    return Err(StoreError::Unavailable(format!("{what} {key} in region '{}': {m}", self.region)));
                }
                Err(Attempt::Transient(m)) => m,
            };
            attempt += 1;
            if attempt > self.retries {
                self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::Unavailable(format!(
                    "{what} {key} in region '{}' failed {attempt} times, last: {message}",
                    self.region
                )));
            }
            self.metrics.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(region = %self.region, what, key, attempt, error = %message, "retrying");
            let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
            tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// PUTs `data` (one buffer, or parts sent back to back: see `PutPayload`).
    pub async fn put(&self, key: &str, data: impl Into<PutPayload>) -> Result<()> {
        let data: PutPayload = data.into();
        let len = data.content_length() as u64;
        if let Some(l) = &self.limiter {
            l.acquire(len).await;
        }
        let path = ObjPath::from(key);
        self.retry("PUT", key, || {
            let (path, payload) = (path.clone(), data.clone());
            async move {
                self.inject(false).await?;
                match self.pack_class.as_ref().filter(|_| key.starts_with("packs/")) {
                    Some(class) => {
                        let mut attributes = object_store::Attributes::new();
                        attributes.insert(object_store::Attribute::StorageClass, class.clone().into());
                        let opts = object_store::PutOptions { attributes, ..Default::default() };
                        self.inner.put_opts(&path, payload, opts).await?;
                    }
                    None => {
                        self.inner.put(&path, payload).await?;
                    }
                }
                Ok(())
            }
        })
        .await?;
        // The data is written: let its buffers go back (an upload reuses them) during the sync.
        drop(data);
        self.sync_fs_object(key).await?;
        self.metrics.put_ops.fetch_add(1, Ordering::Relaxed);
        self.metrics.put_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// On the filesystem backend, makes an object just put durable: LocalFileSystem renames
    /// into place but does not fsync, and whatever references the object is written next.
    async fn sync_fs_object(&self, key: &str) -> Result<()> {
        if let Some(root) = &self.fs_root {
            let file = root.join(key);
            // The put may have made the object's directory (`packs/`, ...): the first time
            // each is seen, its entry is synced too, up to the root.
            let new_dir = file
                .parent()
                .filter(|dir| *dir != root.as_path() && !self.synced_dirs.lock().contains(*dir))
                .map(Path::to_path_buf);
            let root = root.clone();
            let dir = tokio::task::spawn_blocking(move || {
                sync_path(&file)?;
                if let Some(dir) = &new_dir {
                    for d in dir.ancestors().skip(1) {
                        std::fs::File::open(d)?.sync_all()?;
                        if d == root {
                            break;
                        }
                    }
                }
                Ok::<_, std::io::Error>(new_dir)
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .map_err(StoreError::io(format!("syncing object {key}")))?;
            if let Some(dir) = dir {
                self.synced_dirs.lock().insert(dir);
            }
        }
        Ok(())
    }

    /// PUTs `data` only if `key` does not exist yet (create-only), where the store supports
    /// it (the filesystem, AWS S3); elsewhere a plain PUT. Returns false when the object
    /// already existed (it is left as it was).
    pub async fn put_new(&self, key: &str, data: Bytes) -> Result<bool> {
        let path = ObjPath::from(key);
        let created = self
            .retry("PUT (create-only)", key, || {
                let (path, payload) = (path.clone(), PutPayload::from(data.clone()));
                async move {
                    self.inject(false).await?;
                    let opts = object_store::PutOptions { mode: object_store::PutMode::Create, ..Default::default() };
                    match self.inner.put_opts(&path, payload.clone(), opts).await {
                        Ok(_) => Ok(true),
                        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                        Err(object_store::Error::NotImplemented | object_store::Error::NotSupported { .. }) => {
                            self.inner.put(&path, payload).await?;
                            Ok(true)
                        }
                        Err(e) => Err(e.into()),
                    }
                }
            })
            .await?;
        if created {
            self.sync_fs_object(key).await?;
        }
        self.metrics.put_ops.fetch_add(1, Ordering::Relaxed);
        Ok(created)
    }

    /// A conditional PUT: create-only, or replace only the version read before (its e-tag).
    /// `Ok(Some(true))` written, `Ok(Some(false))` refused by the store (the object exists, or
    /// changed since), `Ok(None)` the store does not do conditional writes (nothing written).
    pub async fn put_if(&self, key: &str, data: Bytes, condition: Condition) -> Result<Option<bool>> {
        let path = ObjPath::from(key);
        let outcome = self
            .retry("PUT (conditional)", key, || {
                let (path, payload) = (path.clone(), PutPayload::from(data.clone()));
                let mode = match &condition {
                    Condition::Absent => object_store::PutMode::Create,
                    Condition::Version(e_tag) => object_store::PutMode::Update(object_store::UpdateVersion {
                        e_tag: Some(e_tag.clone()),
                        version: None,
                    }),
                };
                async move {
                    self.inject(false).await?;
                    let opts = object_store::PutOptions { mode, ..Default::default() };
                    match self.inner.put_opts(&path, payload, opts).await {
                        Ok(_) => Ok(Some(true)),
                        Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                            Ok(Some(false))
                        }
                        Err(object_store::Error::NotImplemented | object_store::Error::NotSupported { .. }) => Ok(None),
                        Err(e) => Err(e.into()),
                    }
                }
            })
            .await?;
        if outcome == Some(true) {
            self.sync_fs_object(key).await?;
            self.metrics.put_ops.fetch_add(1, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    /// A whole object and its e-tag (for a later [`Condition::Version`]), if the store gives one.
    pub async fn get_versioned(&self, key: &str) -> Result<(Bytes, Option<String>)> {
        let path = ObjPath::from(key);
        let (body, e_tag) = self
            .retry("GET", key, || {
                let path = path.clone();
                async move {
                    self.inject(true).await?;
                    self.emulated_frozen(key)?;
                    let r = self.inner.get_opts(&path, GetOptions::default()).await?;
                    let (size, e_tag) = (r.meta.size, r.meta.e_tag.clone());
                    let body = r.bytes().await?;
                    if body.len() as u64 != size {
                        return Err(Attempt::Transient(format!("short body: {} of {size} bytes", body.len())));
                    }
                    Ok((body, e_tag))
                }
            })
            .await?;
        self.count_get(body.len());
        Ok((body, e_tag))
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        self.fetch(key, None).await
    }

    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.fetch(key, Some(range)).await
    }

    /// A GET of the whole object or of `range`; a body shorter than asked (or than the object
    /// size the store reported) is retried, never returned.
    async fn fetch(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        let path = ObjPath::from(key);
        let body = self
            .retry("GET", key, || {
                let (path, range) = (path.clone(), range.clone());
                async move {
                    let truncate = self.inject(true).await?;
                    self.emulated_frozen(key)?;
                    let options = GetOptions { range: range.clone().map(Into::into), ..Default::default() };
                    let r = self.inner.get_opts(&path, options).await?;
                    let want = range.map_or(r.meta.size, |r| r.end - r.start);
                    let mut body = r.bytes().await?;
                    if truncate {
                        body.truncate(body.len() / 2);
                    }
                    if body.len() as u64 != want {
                        return Err(Attempt::Transient(format!("short body: {} of {want} bytes", body.len())));
                    }
                    Ok(body)
                }
            })
            .await?;
        self.count_get(body.len());
        Ok(body)
    }

    fn count_get(&self, n: usize) {
        self.metrics.get_ops.fetch_add(1, Ordering::Relaxed);
        self.metrics.get_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Deletes an object; one that is already gone is fine.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = ObjPath::from(key);
        let r = self
            .retry("DELETE", key, || {
                let path = path.clone();
                async move {
                    self.inject(false).await?;
                    self.inner.delete(&path).await?;
                    Ok(())
                }
            })
            .await;
        match r {
            Ok(()) | Err(StoreError::Missing(_)) => {
                self.metrics.delete_ops.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Every object under `prefix` (used to find snapshots and garbage, never for correctness).
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let path = ObjPath::from(prefix);
        let out = self
            .retry("LIST", prefix, || {
                let path = path.clone();
                async move {
                    self.inject(false).await?;
                    let metas: Vec<_> = self.inner.list(Some(&path)).try_collect().await?;
                    Ok(metas
                        .into_iter()
                        .map(|m| Listed {
                            key: m.location.to_string(),
                            size: m.size,
                            modified: SystemTime::from(m.last_modified),
                        })
                        .collect::<Vec<_>>())
                }
            })
            .await;
        self.metrics.list_ops.fetch_add(1, Ordering::Relaxed);
        match out {
            Err(StoreError::Missing(_)) => Ok(Vec::new()),
            other => other,
        }
    }
}

impl Objects {
    /// With thaw emulation: a GET of a pack not restored fails as S3's would.
    fn emulated_frozen(&self, key: &str) -> std::result::Result<(), Attempt> {
        match &self.thaw {
            Some(t) if ThawEmulation::applies(key) && !t.state(key).readable() => Err(Attempt::Frozen(String::new())),
            _ => Ok(()),
        }
    }

    /// Whether `key` is readable now, or how its thaw stands (S3: a HEAD; the fs kind has no
    /// classes). A missing object is [`StoreError::Missing`].
    pub async fn thaw_state(&self, key: &str) -> Result<Thaw> {
        let path = ObjPath::from(key);
        let state = self
            .retry("HEAD", key, || {
                let path = path.clone();
                async move {
                    self.inject(false).await?;
                    match (&self.thaw, &self.s3) {
                        (Some(t), _) if ThawEmulation::applies(key) => {
                            self.inner.head(&path).await?;
                            Ok(t.state(key))
                        }
                        (_, Some(s3)) => {
                            let a = s3
                                .send(hyper::Method::HEAD, key, "", Bytes::new())
                                .await
                                .map_err(Attempt::Transient)?;
                            let header = |name: &str| a.headers.get(name).and_then(|v| v.to_str().ok());
                            match a.status.as_u16() {
                                200..=299 => Ok(super::s3::thaw_of_head(
                                    header("x-amz-storage-class"),
                                    header("x-amz-restore"),
                                    header("x-amz-archive-status"),
                                )),
                                404 => Err(Attempt::NotFound),
                                429 | 500..=599 => Err(Attempt::Transient(format!("HTTP {}", a.status))),
                                _ => Err(Attempt::Fatal(format!("HTTP {}", a.status))),
                            }
                        }
                        _ => {
                            self.inner.head(&path).await?;
                            Ok(Thaw::NotNeeded)
                        }
                    }
                }
            })
            .await?;
        self.metrics.head_ops.fetch_add(1, Ordering::Relaxed);
        Ok(state)
    }

    /// Requests a restore of `key` (readable for `days` once done) and returns its state
    /// after the request. Only for an object [`Objects::thaw_state`] found frozen: a store
    /// without a restore (Garage: 501 NotImplemented) is an error saying so.
    pub async fn restore(&self, key: &str, days: u32, tier: ThawTier) -> Result<Thaw> {
        let body = Bytes::from(super::s3::restore_request_body(days, tier));
        let answer = self
            .retry("RESTORE", key, || {
                let body = body.clone();
                async move {
                    self.inject(false).await?;
                    match (&self.thaw, &self.s3) {
                        (Some(t), _) if ThawEmulation::applies(key) => Ok(Some(t.request(key, days))),
                        (_, Some(s3)) => {
                            let a = s3.send(hyper::Method::POST, key, "?restore", body).await.map_err(Attempt::Transient)?;
                            match super::s3::restore_answer(a.status.as_u16(), &String::from_utf8_lossy(&a.body)) {
                                RestoreAnswer::Started | RestoreAnswer::InProgress => Ok(Some(Thaw::InProgress)),
                                RestoreAnswer::NotNeeded => Ok(Some(Thaw::NotNeeded)),
                                // Its expiry is in the next HEAD.
                                RestoreAnswer::Restored => Ok(None),
                                RestoreAnswer::NoThaw(m) => Err(Attempt::Fatal(format!(
                                    "the store has no restore request ({m}): it keeps no object in a class that needs a thaw, so its objects are readable as they are"
                                ))),
                                RestoreAnswer::Transient(m) => Err(Attempt::Transient(m)),
                                RestoreAnswer::Refused(m) => Err(Attempt::Fatal(m)),
                            }
                        }
                        _ => Ok(Some(Thaw::NotNeeded)),
                    }
                }
            })
            .await?;
        self.metrics.restore_ops.fetch_add(1, Ordering::Relaxed);
        match answer {
            Some(state) => Ok(state),
            None => self.thaw_state(key).await,
        }
    }
}

fn sync_path(file: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(file)?.sync_all()?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Nested(&'static str, Option<Box<Nested>>);
    impl std::fmt::Display for Nested {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Nested {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|n| n as _)
        }
    }

    #[test]
    fn a_store_error_says_each_part_once_and_its_root_cause() {
        let root = Nested("Connection refused (os error 111)", None);
        let e = Nested("DELETE x failed: error sending request: error sending request", Some(Box::new(root)));
        assert_eq!(
            super::with_root_cause(&e),
            "DELETE x failed: error sending request (cause: Connection refused (os error 111))"
        );
    }
}
