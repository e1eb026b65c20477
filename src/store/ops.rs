//! Operations that read a region back: verify, export, GC, and what a region holds.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::config::Backend;
use super::error::{Result, StoreError};
use super::format::{manifest_key, pack_key, BlobRef, Manifest};
use super::objects::MetricsView;
use super::region::Region;
use super::StoreService;
use crate::jobs::Job;

/// GETs in flight for verify and export.
const READ_CONCURRENCY: usize = 16;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub snapshot: String,
    pub region: String,
    pub pages: u64,
    pub blobs: u64,
    pub bytes: u64,
    /// Every missing or corrupt object, with what is wrong with it. Empty: all good.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportReport {
    pub snapshot: String,
    pub output: PathBuf,
    pub format: ExportFormat,
    pub size: u64,
    pub blobs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionInfo {
    pub name: String,
    pub kind: String,
    /// Path, or endpoint/bucket/prefix (never credentials).
    pub location: String,
    /// `standard` or `archive` (the region's `tier`), and an S3 storage class of its packs.
    #[serde(default)]
    pub tier: crate::store::config::Tier,
    #[serde(default)]
    pub storage_class: Option<String>,
    /// The repository's store format version and the cipher it implies (fixed at creation).
    #[serde(default)]
    pub format: u32,
    #[serde(default)]
    pub cipher: String,
    pub snapshots: u64,
    pub packs: u64,
    pub stored_bytes: u64,
    /// Sealed bytes of the blobs some snapshot references (each once; `stored_bytes` less
    /// this is pack headers and indexes, and what GC will free or is keeping in packs it
    /// does not rewrite).
    #[serde(default)]
    pub referenced_bytes: u64,
    /// What each volume's snapshots take (storage accounting: see README, "Storage accounting").
    #[serde(default)]
    pub volumes: Vec<super::VolumeBytes>,
    /// Why the accounting (`referenced_bytes`, `volumes`) could not be made, if it could not.
    #[serde(default)]
    pub accounting_error: Option<String>,
    pub indexed_blobs: u64,
    /// Requests and bytes since the daemon started.
    pub metrics: MetricsView,
    /// Whether the store enforces conditional writes (probed when the region was opened):
    /// the GC lease is taken with them where it does.
    pub conditional_writes: super::shared::ConditionalWrites,
    /// The GC lease, if a node holds one.
    #[serde(default)]
    pub gc_lease: Option<super::shared::Lease>,
    /// Packs GC found unreferenced, waiting for `gc.delete_delay` before a GC deletes them.
    #[serde(default)]
    pub packs_condemned: u64,
    /// This node, as holds and leases name it.
    pub node: String,
}

/// A snapshot stored in a region (from its manifest), possibly made by another node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionSnapshot {
    pub id: String,
    pub name: String,
    pub volume: String,
    pub volume_id: String,
    pub description: String,
    pub created: u64,
    pub uploaded: u64,
    pub size: u64,
    pub cluster_size: u32,
    pub added_bytes: u64,
    /// A copy's source snapshot id and repository (`snapshot copy`, `snapshot archive`).
    #[serde(default)]
    pub source_id: Option<String>,
    #[serde(default)]
    pub source_region: Option<String>,
    /// An archived snapshot's minimum retention (deleting it sooner needs --force).
    #[serde(default)]
    pub retain_until: Option<u64>,
    /// Clusters holding data × cluster size.
    #[serde(default)]
    pub allocated_bytes: u64,
    /// Sealed bytes of the distinct blobs it references, and of those no other snapshot in
    /// the repository references (storage accounting; 0 when not computed).
    #[serde(default)]
    pub referenced_bytes: u64,
    #[serde(default)]
    pub exclusive_bytes: u64,
}

/// Every data blob of a manifest, with the clusters it fills (equal clusters share a blob).
async fn data_blobs(region: &Region, m: &Manifest, problems: &mut Vec<String>) -> Result<HashMap<BlobRef, Vec<u64>>> {
    let object = manifest_key(&m.snapshot_id);
    let mut blobs: HashMap<BlobRef, Vec<u64>> = HashMap::new();
    let mut pages = Vec::new();
    for p in &m.pages {
        pages.push((p.index, p.blob.to_ref(&object)?));
    }
    let results = futures::future::join_all(pages.iter().map(|(i, r)| region.read_page(m, *i, r))).await;
    for ((index, _), page) in pages.iter().zip(results) {
        match page {
            Ok(page) => {
                for (slot, b) in page.entries {
                    blobs.entry(b).or_default().push(index * super::format::PAGE_CLUSTERS + slot as u64);
                }
            }
            Err(e) => problems.push(format!("map page {index}: {}", e.reading(&m.snapshot_id))),
        }
    }
    Ok(blobs)
}

impl StoreService {
    /// The region and manifest of a snapshot: a local snapshot's uploaded copy, or (with
    /// `region`) any snapshot id stored there.
    pub async fn locate(&self, r: &str, region: Option<&str>) -> Result<(Arc<Region>, Arc<Manifest>)> {
        let (region_name, id) = match self.engine.snapshot(r) {
            Ok(snap) => (self.uploaded_region(&snap)?, snap.id),
            Err(e) => match region {
                Some(reg) if r.starts_with("s-") => (reg.to_string(), r.to_string()),
                _ => return Err(e.into()),
            },
        };
        let region = self.region(&region_name).await?;
        let m = region.manifest(&id).await?;
        Ok((region, m))
    }

    /// Re-reads every object the snapshot needs, checking tags and hashes.
    pub async fn verify(&self, r: &str, region: Option<&str>, job: &Job) -> Result<VerifyReport> {
        let (region, located) = match self.locate(r, region).await {
            Ok(x) => x,
            Err(e @ (StoreError::Corrupt { .. } | StoreError::Missing(_))) => {
                let region = region.unwrap_or_default().into();
                return Ok(VerifyReport {
                    snapshot: r.into(),
                    region,
                    problems: vec![e.to_string()],
                    ..Default::default()
                });
            }
            Err(e) => return Err(e),
        };
        let id = located.snapshot_id.clone();
        // GC (which may move blobs) waits until this is done.
        let _reading = region.gc_lock.read().await;
        // Really re-read the manifest, not the cached copy.
        region.forget_manifest(&id);
        let mut report = VerifyReport { snapshot: id.clone(), region: region.name.clone(), ..Default::default() };
        let m = match region.manifest(&id).await {
            Ok(m) => m,
            Err(e @ (StoreError::Corrupt { .. } | StoreError::Missing(_))) => {
                report.problems.push(e.to_string());
                return Ok(report);
            }
            Err(e) => return Err(e),
        };
        report.pages = m.pages.len() as u64;
        let blobs = data_blobs(&region, &m, &mut report.problems).await?;
        // Progress in stored bytes (what is read), as every job counts it: the CLI shows bytes.
        job.total.store(blobs.keys().map(|b| u64::from(b.len)).sum(), Ordering::Relaxed);
        let mut bad_objects: HashMap<String, u64> = HashMap::new();
        let mut other = Vec::new();
        region
            .fetch_blobs(blobs.into_keys().map(|b| (b, ())).collect(), READ_CONCURRENCY, |(), b, res| {
                job.done.fetch_add(u64::from(b.len), Ordering::Relaxed);
                report.blobs += 1;
                match res {
                    Ok(plain) => report.bytes += plain.len() as u64,
                    Err(StoreError::Missing(k)) => *bad_objects.entry(format!("{k}: missing")).or_default() += 1,
                    Err(StoreError::Corrupt { object, reason }) => other.push(format!("{object}: {reason}")),
                    Err(e) => other.push(format!("{}: {}", pack_key(&b.pack), e.reading(&id))),
                }
            })
            .await;
        let mut missing: Vec<_> = bad_objects.into_iter().map(|(k, n)| format!("{k} ({n} blobs)")).collect();
        missing.sort();
        report.problems.extend(missing);
        report.problems.extend(other);
        Ok(report)
    }

    /// Writes the snapshot's content to `output`, reading only from the store. The content
    /// goes to a new temporary file beside `output`, renamed over it only once complete: on
    /// any error (which names the object) `output` is untouched and only files this export
    /// created are removed. An existing `output` that is not a regular file (a symlink, a
    /// device node, a directory) is refused unless `force`.
    pub async fn export(
        &self,
        r: &str,
        region: Option<&str>,
        output: &Path,
        format: ExportFormat,
        force: bool,
        job: &Job,
    ) -> Result<ExportReport> {
        check_export_target(output, force)?;
        let (region, _) = self.locate(r, region).await?;
        // GC (which may move blobs) waits until this is done; re-read the manifest under it.
        let _reading = region.gc_lock.read().await;
        let (region, m) = self.locate(r, Some(&region.name)).await?;
        let raw = TempFile::beside(output, "raw")?;
        let blobs =
            export_raw(&region, &m, raw.file()?, raw.path(), job).await.map_err(|e| e.reading(&m.snapshot_id))?;
        let done = match format {
            ExportFormat::Raw => raw,
            ExportFormat::Qcow2 => {
                let qcow2 = TempFile::beside(output, "qcow2")?;
                let status = tokio::process::Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "qcow2"])
                    .arg(raw.path())
                    .arg(qcow2.path())
                    .status()
                    .await;
                match status {
                    Ok(s) if s.success() => qcow2,
                    Ok(s) => return Err(StoreError::Invalid(format!("qemu-img convert to qcow2 failed ({s})"))),
                    Err(e) => {
                        return Err(StoreError::Invalid(format!(
                        "cannot run qemu-img for the qcow2 conversion ({e}); install qemu-utils or export --format raw"
                    )))
                    }
                }
            }
        };
        done.persist(output)?;
        Ok(ExportReport { snapshot: m.snapshot_id.clone(), output: output.to_path_buf(), format, size: m.size, blobs })
    }

    pub async fn region_info(&self, name: &str) -> Result<RegionInfo> {
        let region = self.region(name).await?;
        let cfg = &self.config.regions[crate::engine::bare_name(name)];
        let (kind, location) = match &cfg.backend {
            Backend::Fs { path } => ("fs", path.display().to_string()),
            Backend::S3 { endpoint, bucket, prefix, .. } => {
                ("s3", format!("{} bucket {bucket} prefix '{prefix}'", endpoint.as_deref().unwrap_or("AWS")))
            }
        };
        let packs = region.objects.list("packs").await?;
        let snapshots = region.snapshot_ids().await?.len() as u64;
        let (referenced_bytes, volumes, accounting_error) = match self.accounting(name).await {
            Ok(a) => (a.referenced_bytes, a.volumes.clone(), None),
            Err(e) => {
                tracing::warn!(region = name, error = %e, "cannot count what the repository's snapshots take");
                (0, Vec::new(), Some(e.to_string()))
            }
        };
        Ok(RegionInfo {
            name: name.into(),
            kind: kind.into(),
            location,
            tier: cfg.tier,
            storage_class: cfg.storage_class.clone(),
            format: region.keys.cipher().version(),
            cipher: region.keys.cipher().name().into(),
            snapshots,
            packs: packs.len() as u64,
            stored_bytes: packs.iter().map(|p| p.size).sum(),
            referenced_bytes,
            volumes,
            accounting_error,
            indexed_blobs: region.index.blob_count() as u64,
            metrics: region.objects.metrics.view(),
            conditional_writes: region.conditional,
            gc_lease: region.lease().await?.map(|(l, _)| l).filter(|l| l.expires > self.engine.clock().now()),
            packs_condemned: region.condemned().await?.packs.len() as u64,
            node: self.node.id.clone(),
        })
    }

    /// Every snapshot stored in the region, whichever node uploaded it.
    pub async fn region_snapshots(&self, name: &str) -> Result<Vec<RegionSnapshot>> {
        let region = self.region(name).await?;
        let mut out = Vec::new();
        for id in region.snapshot_ids().await? {
            match region.manifest(&id).await {
                Ok(m) => out.push(RegionSnapshot {
                    id: m.snapshot_id.clone(),
                    name: m.snapshot_name.clone(),
                    volume: m.volume_name.clone(),
                    volume_id: m.volume_id.clone(),
                    description: m.description.clone(),
                    created: m.created,
                    uploaded: m.uploaded,
                    size: m.size,
                    cluster_size: m.cluster_size,
                    added_bytes: m.added_bytes,
                    source_id: m.source.as_ref().map(|s| s.id.clone()),
                    source_region: m.source.as_ref().map(|s| s.region.clone()),
                    retain_until: m.retain_until,
                    allocated_bytes: m.allocated_clusters * u64::from(m.cluster_size),
                    referenced_bytes: 0,
                    exclusive_bytes: 0,
                }),
                Err(StoreError::Missing(_)) => {}
                Err(e) => tracing::warn!(snapshot = %id, error = %e, "unreadable manifest"),
            }
        }
        out.sort_by_key(|s| (s.volume.clone(), s.created, s.name.clone()));
        Ok(out)
    }
}

impl StoreService {
    /// [`Self::region_snapshots`] with each snapshot's referenced and exclusive bytes
    /// (storage accounting).
    pub async fn region_snapshots_accounted(&self, name: &str) -> Result<Vec<RegionSnapshot>> {
        let mut all = self.region_snapshots(name).await?;
        let acc = match self.accounting(name).await {
            Ok(acc) => acc,
            Err(e) => {
                tracing::warn!(region = name, error = %e, "cannot count what the repository's snapshots take");
                return Ok(all);
            }
        };
        for s in &mut all {
            if let Some(b) = acc.snapshots.get(&s.id) {
                s.referenced_bytes = b.referenced_bytes;
                s.exclusive_bytes = b.exclusive_bytes;
            }
        }
        Ok(all)
    }

    /// The id of snapshot `VOLUME@SNAPSHOT` as stored in `region` (or any configured region)
    /// by whichever node: what a node that does not have the volume resolves names with.
    pub async fn find_remote_by_name(&self, r: &str, region: Option<&str>) -> Result<String> {
        let Some((volume, snapshot)) = r.split_once('@') else {
            return Err(StoreError::NotFound(format!("no snapshot '{r}' here or in the store")));
        };
        // The volume's owner's repositories (the name says who owns it).
        let names = self.repositories(crate::engine::owner_of(volume), region);
        let mut found: Vec<(String, String)> = Vec::new();
        for name in &names {
            for s in self.region_snapshots(name).await? {
                if (s.volume == volume || s.volume_id == volume) && s.name == snapshot {
                    found.push((s.id, name.clone()));
                }
            }
        }
        match found.as_slice() {
            [(id, _)] => Ok(id.clone()),
            [] => Err(StoreError::NotFound(format!(
                "no snapshot '{r}' on this node or in region(s) {}; list them with: snapblk snapshot list --region REGION",
                names.join(", ")
            ))),
            many => Err(StoreError::Invalid(format!(
                "'{r}' names {} snapshots in the store (volumes of the same name on different nodes): use one of their ids ({})",
                many.len(),
                many.iter().map(|(id, region)| format!("{id} in {region}")).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// Refuses an export target that exists and is not a regular file, unless `force`.
fn check_export_target(output: &Path, force: bool) -> Result<()> {
    let kind = match std::fs::symlink_metadata(output) {
        Ok(md) if md.file_type().is_file() => return Ok(()),
        Ok(md) if md.file_type().is_symlink() => "a symbolic link",
        Ok(md) if md.is_dir() => "a directory",
        Ok(_) => "not a regular file (a device node, socket or pipe)",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io(format!("checking {}", output.display()))(e)),
    };
    if force && !output.is_dir() {
        return Ok(());
    }
    Err(StoreError::Invalid(format!(
        "{} exists and is {kind}; export writes regular files only: choose another --output{}",
        output.display(),
        if kind == "a directory" { "" } else { ", or pass --force to replace it (nothing is written through it)" }
    )))
}

/// A file this process created (exclusively, mode 0600) beside a target, removed on drop
/// unless renamed over the target.
struct TempFile {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl TempFile {
    fn beside(target: &Path, what: &str) -> Result<TempFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let path = target.with_file_name(format!(".{name}.snapblk-{what}-{:08x}", rand::random::<u32>()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(StoreError::io(format!("creating {}", path.display())))?;
        Ok(TempFile { path, file: Some(file) })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self) -> Result<&std::fs::File> {
        self.file.as_ref().ok_or_else(|| StoreError::Invalid(format!("{} is closed", self.path.display())))
    }

    /// Syncs the file and renames it over `target`.
    fn persist(mut self, target: &Path) -> Result<()> {
        let io = |what: &str| StoreError::io(format!("{what} {}", target.display()));
        if let Some(f) = self.file.take() {
            f.sync_all().map_err(io("syncing the export for"))?;
        }
        std::fs::rename(&self.path, target).map_err(io("renaming the export to"))?;
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn export_raw(region: &Region, m: &Manifest, file: &std::fs::File, path: &Path, job: &Job) -> Result<u64> {
    let io = |what: &str| StoreError::io(format!("{what} {}", path.display()));
    file.set_len(m.size).map_err(io("sizing"))?;
    let mut problems = Vec::new();
    let blobs = data_blobs(region, m, &mut problems).await?;
    if let Some(p) = problems.into_iter().next() {
        return Err(StoreError::Invalid(format!("export of {} failed: {p}", m.snapshot_id)));
    }
    job.total.store(m.size, Ordering::Relaxed);
    let cs = m.cluster_size as u64;
    let count = blobs.len() as u64;
    let mut failure: Option<StoreError> = None;
    region
        .fetch_blobs(blobs.into_iter().collect(), READ_CONCURRENCY, |clusters, _, res| {
            if failure.is_some() {
                return;
            }
            match res {
                Ok(plain) => {
                    for c in clusters {
                        let off = c * cs;
                        let want = cs.min(m.size.saturating_sub(off)) as usize;
                        if plain.len() != want {
                            failure = Some(StoreError::corrupt(
                                manifest_key(&m.snapshot_id),
                                format!("cluster {c} has {} bytes, expected {want}", plain.len()),
                            ));
                            return;
                        }
                        if let Err(e) = file.write_all_at(&plain, off) {
                            failure = Some(io("writing")(e));
                            return;
                        }
                        job.done.fetch_add(want as u64, Ordering::Relaxed);
                    }
                }
                Err(e) => failure = Some(e),
            }
        })
        .await;
    if let Some(e) = failure {
        return Err(e);
    }
    file.sync_all().map_err(io("syncing"))?;
    job.done.store(m.size, Ordering::Relaxed);
    Ok(count)
}
