//! Images (README "Images"): a named set of snapshots — a root disk and data disks — that
//! the image pins (their delete and retention are refused while it uses them), deployed as
//! volumes many times over (`volume create-from-image`), and exported to or imported from
//! image files (raw, qcow2, vmdk, vhdx) by qemu-img over the daemon's own NBD socket, so
//! holes are skipped by the NBD allocation map, never found by reading zeros.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::lifecycle::Key;
use super::shares::{ShareRequest, SharedQuery, UnshareRequest};
use super::{owner_of, Access, Caller, Error, Result, Service, VolumeView};
use crate::jobs::{Job, JobView};
use crate::store::shares::ImageGrant;

/// Most disks an image has (a root and data disks).
pub const MAX_IMAGE_DISKS: usize = 16;

/// An image as `lifecycle.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    #[serde(default)]
    pub description: String,
    pub created: u64,
    /// `root` first, then `data1`, `data2`, …
    pub disks: Vec<ImageDisk>,
    /// Accounts it is shared with → the region holding the grant.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub shared_with: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageDisk {
    pub name: String,
    pub snapshot_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateImage {
    pub name: String,
    /// The root disk's snapshot (`VOLUME@SNAPSHOT` or id).
    #[serde(default)]
    pub root: Option<String>,
    /// Data disks' snapshots, in order.
    #[serde(default)]
    pub data: Vec<String>,
    /// Instead of root and data: a group snapshot's members (`GROUP@SNAPSHOT`), the first
    /// member the root.
    #[serde(default)]
    pub from_group: Option<String>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageDiskView {
    pub name: String,
    pub snapshot_id: String,
    /// `VOLUME@SNAPSHOT`.
    pub snapshot: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageView {
    pub name: String,
    pub description: String,
    pub created: u64,
    pub disks: Vec<ImageDiskView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployImage {
    /// Volume names are PREFIX + the disk's name (`web1-root`, `web1-data1`).
    pub prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
}

impl ImageFormat {
    fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhdx => "vhdx",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportImage {
    /// A directory of the daemon's machine (created if missing): one file per disk
    /// (`DISK.FORMAT`) and `manifest.json`.
    pub output: PathBuf,
    pub format: ImageFormat,
    /// Replace files of an earlier export there.
    #[serde(default)]
    pub force: bool,
}

/// `manifest.json` of an export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportManifest {
    pub image: String,
    pub format: ImageFormat,
    pub disks: Vec<ExportedDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportedDisk {
    pub disk: String,
    pub file: String,
    /// The disk's size (bytes of the snapshot).
    pub size: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportImage {
    pub name: String,
    /// Image files of the daemon's machine.
    pub root: PathBuf,
    #[serde(default)]
    pub data: Vec<PathBuf>,
    /// `raw`, `qcow2`, `vmdk`, `vhdx`, or none: qemu-img's detection.
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub description: String,
}

fn disk_name(i: usize) -> String {
    if i == 0 {
        "root".into()
    } else {
        format!("data{i}")
    }
}

/// qemu-img's name for an export of this daemon's NBD socket (a JSON filename: export names
/// carry `/` and `@`, which an NBD URI would take apart).
fn nbd_source(socket: &Path, export: &str) -> String {
    let spec = serde_json::json!({
        "driver": "raw",
        "file": { "driver": "nbd", "server": { "type": "unix", "path": socket }, "export": export }
    });
    format!("json:{spec}")
}

async fn qemu_img(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Error::Invalid(format!("cannot run qemu-img ({e}); install qemu-utils")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Invalid(format!("qemu-img {} failed: {}", args[0], err.trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let io = |e: std::io::Error| Error::Internal(format!("reading {}: {e}", path.display()));
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(crate::store::crypto::hex(ctx.finish().as_ref()))
}

impl Service {
    fn image_view(&self, name: &str, r: &ImageRecord) -> ImageView {
        ImageView {
            name: name.to_string(),
            description: r.description.clone(),
            created: r.created,
            disks: r
                .disks
                .iter()
                .map(|d| {
                    let snap = self.engine.snapshot(&d.snapshot_id).ok();
                    ImageDiskView {
                        name: d.name.clone(),
                        snapshot_id: d.snapshot_id.clone(),
                        snapshot: snap.as_ref().map_or_else(String::new, |s| format!("{}@{}", s.volume, s.name)),
                        size: snap.map_or(0, |s| s.size),
                    }
                })
                .collect(),
        }
    }

    fn find_image(&self, caller: &Caller, name: &str) -> Result<(String, ImageRecord)> {
        let name = caller.qualify(name);
        let st = self.lifecycle.lock();
        st.images
            .get(&name)
            .filter(|_| caller.sees(&name))
            .map(|r| (name.clone(), r.clone()))
            .ok_or_else(|| Error::NotFound(format!("no image '{name}' (list them with: snapblk image list)")))
    }

    /// Names a set of snapshots as an image and pins them.
    pub fn create_image(&self, caller: &Caller, req: CreateImage) -> Result<ImageView> {
        caller.may(Access::Manage)?;
        let name = self.new_name(caller, "image", &req.name)?;
        let refs: Vec<String> = match (&req.from_group, &req.root) {
            (Some(g), None) if req.data.is_empty() => {
                self.group_snapshot(caller, g)?.members.into_iter().map(|m| m.snapshot_id).collect()
            }
            (None, Some(root)) => std::iter::once(root.clone()).chain(req.data.iter().cloned()).collect(),
            _ => {
                return Err(Error::Invalid(
                    "an image needs --root SNAPSHOT (and --data SNAPSHOT for each data disk), or --from-group GROUP@SNAPSHOT alone".into(),
                ))
            }
        };
        if refs.len() > MAX_IMAGE_DISKS {
            return Err(Error::Invalid(format!("an image has at most {MAX_IMAGE_DISKS} disks, not {}", refs.len())));
        }
        let mut disks = Vec::with_capacity(refs.len());
        for (i, r) in refs.iter().enumerate() {
            let snap = self.live_snapshot(caller, r)?;
            if owner_of(&snap.volume) != owner_of(&name) {
                return Err(Error::Invalid(format!(
                    "snapshot {}@{} is another account's than image '{name}': an image pins its own account's snapshots",
                    snap.volume, snap.name
                )));
            }
            disks.push(ImageDisk { name: disk_name(i), snapshot_id: snap.id });
        }
        let record = ImageRecord {
            description: req.description,
            created: self.engine.clock().now(),
            disks,
            shared_with: Default::default(),
        };
        {
            let mut st = self.lifecycle.lock();
            if st.images.contains_key(&name) {
                return Err(Error::Engine(crate::engine::EngineError::AlreadyExists(format!(
                    "image '{name}' already exists"
                ))));
            }
            st.images.insert(name.clone(), record.clone());
            st.touch(Key::Image(name.clone()));
            self.save_lifecycle(&mut st)?;
        }
        tracing::info!(image = %name, disks = record.disks.len(), by = %caller, "image created");
        Ok(self.image_view(&name, &record))
    }

    pub fn list_images(&self, caller: &Caller) -> Result<Vec<ImageView>> {
        caller.may(Access::Read)?;
        let images: Vec<(String, ImageRecord)> = {
            let st = self.lifecycle.lock();
            st.images.iter().filter(|(n, _)| caller.sees(n)).map(|(n, r)| (n.clone(), r.clone())).collect()
        };
        Ok(images.iter().map(|(n, r)| self.image_view(n, r)).collect())
    }

    pub fn image(&self, caller: &Caller, name: &str) -> Result<ImageView> {
        caller.may(Access::Read)?;
        let (name, r) = self.find_image(caller, name)?;
        Ok(self.image_view(&name, &r))
    }

    /// Deletes the image (its snapshots stay, no longer pinned by it).
    pub fn delete_image(&self, caller: &Caller, name: &str) -> Result<()> {
        caller.may(Access::Delete)?;
        let (name, r) = self.find_image(caller, name)?;
        if !r.shared_with.is_empty() {
            let with: Vec<&str> = r.shared_with.keys().map(String::as_str).collect();
            return Err(Error::Held(format!(
                "image {name} is shared with account(s) {}; unshare it first: snapblk image unshare {name} --with ACCOUNT",
                with.join(", ")
            )));
        }
        let mut st = self.lifecycle.lock();
        st.images.remove(&name);
        st.touch(Key::Image(name.clone()));
        self.save_lifecycle(&mut st)?;
        tracing::info!(image = %name, by = %caller, "image deleted");
        Ok(())
    }

    /// The images pinning snapshot `id`.
    pub(super) fn images_pinning(&self, id: &str) -> Vec<String> {
        let st = self.lifecycle.lock();
        st.images.iter().filter(|(_, r)| r.disks.iter().any(|d| d.snapshot_id == id)).map(|(n, _)| n.clone()).collect()
    }

    /// One volume per disk of the image, named PREFIX + the disk's name, each usable at once
    /// (a clone of a local snapshot, or loading from the store). All or none.
    pub async fn create_volumes_from_image(
        &self,
        caller: &Caller,
        name: &str,
        req: DeployImage,
    ) -> Result<Vec<VolumeView>> {
        caller.may(Access::Restore)?;
        // The caller's image, or another account's shared with the volumes' account.
        let (name, disks, names) = match self.find_image(caller, name) {
            Ok((name, r)) => {
                let names = r
                    .disks
                    .iter()
                    .map(|d| super::accounts::owned_name(owner_of(&name), &format!("{}{}", req.prefix, d.name)))
                    .collect();
                (name, r.disks, names)
            }
            Err(e) => {
                let recipient = owner_of(&caller.qualify(&format!("{}x", req.prefix))).to_string();
                let g = self.image_shared_with(&recipient, name).await?.ok_or(e)?;
                let names: Vec<String> =
                    g.disks.iter().map(|(d, _)| caller.qualify(&format!("{}{d}", req.prefix))).collect();
                let disks = g.disks.into_iter().map(|(name, snapshot_id)| ImageDisk { name, snapshot_id }).collect();
                (g.image, disks, names)
            }
        };
        for n in &names {
            crate::engine::validate_owned_name("volume", n)?;
            if self.engine.volume(n).is_ok() {
                return Err(Error::Engine(crate::engine::EngineError::AlreadyExists(format!(
                    "volume '{n}' exists already; choose another --prefix"
                ))));
            }
        }
        let mut made: Vec<VolumeView> = Vec::new();
        for (d, n) in disks.iter().zip(&names) {
            match self.create_from_snapshot(caller, n, &d.snapshot_id, None).await {
                Ok(v) => made.push(v),
                Err(e) => {
                    for v in &made {
                        if let Err(e) = self.delete_volume(&Caller::Daemon("image deploy"), &v.info.id).await {
                            tracing::warn!(volume = %v.info.name, error = %e, "cannot delete a volume of a failed image deploy");
                        }
                    }
                    return Err(e);
                }
            }
        }
        tracing::info!(image = %name, volumes = %names.join(", "), by = %caller, "volumes created from an image");
        Ok(made)
    }

    /// Writes one file per disk and `manifest.json` into a directory of the daemon's machine,
    /// as a job (administrators: files of the daemon's machine).
    pub fn export_image(&self, caller: &Caller, name: &str, req: ExportImage) -> Result<JobView> {
        caller.may(Access::Admin)?;
        let (name, r) = self.find_image(caller, name)?;
        if !req.output.is_absolute() {
            return Err(Error::Invalid(format!("export output '{}' must be an absolute path", req.output.display())));
        }
        let view = self.image_view(&name, &r);
        let socket = self.status.nbd_socket.clone();
        Ok(self.jobs.spawn("image-export", &name, caller.account(), move |job| async move {
            export_files(&view, &socket, &req, &job).await
        }))
    }

    /// Creates one volume per file (`NAME-root`, `NAME-data1`, …) of the file's virtual size,
    /// writes the file into it with qemu-img, snapshots it (`NAME@image`) and makes the image
    /// of the snapshots — as a job (administrators: files of the daemon's machine).
    pub fn import_image(self: &std::sync::Arc<Self>, caller: &Caller, req: ImportImage) -> Result<JobView> {
        caller.may(Access::Admin)?;
        let name = self.new_name(caller, "image", &req.name)?;
        if let Some(f) = req.format.as_deref().filter(|f| !["raw", "qcow2", "vmdk", "vhdx"].contains(f)) {
            return Err(Error::Invalid(format!(
                "unknown image format '{f}': use raw, qcow2, vmdk or vhdx (or leave it out)"
            )));
        }
        let files: Vec<PathBuf> = std::iter::once(req.root.clone()).chain(req.data.iter().cloned()).collect();
        if files.len() > MAX_IMAGE_DISKS {
            return Err(Error::Invalid(format!("an image has at most {MAX_IMAGE_DISKS} disks, not {}", files.len())));
        }
        for f in &files {
            if !f.is_absolute() || !f.is_file() {
                return Err(Error::Invalid(format!(
                    "'{}' is not an image file of the daemon's machine (an absolute path)",
                    f.display()
                )));
            }
        }
        if self.lifecycle.lock().images.contains_key(&name) {
            return Err(Error::Engine(crate::engine::EngineError::AlreadyExists(format!(
                "image '{name}' already exists"
            ))));
        }
        let (svc, caller2, name2) = (self.clone(), caller.clone(), name.clone());
        Ok(self.jobs.spawn("image-import", &name, caller.account(), move |job| async move {
            svc.import_files(&caller2, &name2, &files, req.format.as_deref(), req.description, &job).await
        }))
    }

    async fn import_files(
        &self,
        caller: &Caller,
        name: &str,
        files: &[PathBuf],
        format: Option<&str>,
        description: String,
        job: &Job,
    ) -> Result<ImageView> {
        let mut sizes = Vec::new();
        for f in files {
            let mut args = vec!["info", "--output=json"];
            if let Some(fmt) = format {
                args.extend(["-f", fmt]);
            }
            let path = f.display().to_string();
            args.push(&path);
            let info: serde_json::Value = serde_json::from_str(&qemu_img(&args).await?)
                .map_err(|e| Error::Invalid(format!("qemu-img info {path}: {e}")))?;
            let size = info["virtual-size"]
                .as_u64()
                .ok_or_else(|| Error::Invalid(format!("qemu-img info {path}: no virtual size")))?;
            let fmt = info["format"].as_str().unwrap_or("raw").to_string();
            sizes.push((size.div_ceil(4096) * 4096, fmt));
        }
        job.total.store(sizes.iter().map(|(s, _)| s).sum(), std::sync::atomic::Ordering::Relaxed);
        let mut snaps = Vec::new();
        for (i, (f, (size, fmt))) in files.iter().zip(&sizes).enumerate() {
            let volume = super::accounts::owned_name(
                owner_of(name),
                &format!("{}-{}", crate::engine::bare_name(name), disk_name(i)),
            );
            let req = super::CreateVolume { name: volume.clone(), size: Some(*size), ..Default::default() };
            let v = self.create_volume(caller, req).await?;
            let target = nbd_source(&self.status.nbd_socket, &v.info.name);
            let path = f.display().to_string();
            // -n: the volume exists; zeros become NBD write-zeroes, not data.
            qemu_img(&["convert", "-n", "-f", fmt, "-O", "raw", &path, &target]).await?;
            let snap = self
                .create_snapshot(
                    caller,
                    &v.info.name,
                    super::CreateSnapshot {
                        name: "image".into(),
                        description: format!("imported from {path}"),
                        durable: true,
                    },
                )
                .await?;
            snaps.push(snap.info.id);
            job.done.fetch_add(*size, std::sync::atomic::Ordering::Relaxed);
        }
        let mut data = snaps.split_off(1);
        let req = CreateImage {
            name: name.to_string(),
            root: snaps.pop(),
            data: std::mem::take(&mut data),
            from_group: None,
            description,
        };
        self.create_image(caller, req)
    }
}

async fn export_files(view: &ImageView, socket: &Path, req: &ExportImage, job: &Job) -> Result<ExportManifest> {
    crate::fsutil::create_dir_all_durable(&req.output)
        .map_err(|e| Error::Internal(format!("creating {}: {e}", req.output.display())))?;
    job.total.store(view.disks.iter().map(|d| d.size).sum(), std::sync::atomic::Ordering::Relaxed);
    let mut disks = Vec::new();
    for d in &view.disks {
        let file = format!("{}.{}", d.name, req.format.name());
        let path = req.output.join(&file);
        if path.exists() && !req.force {
            return Err(Error::Invalid(format!("{} exists already; remove it or pass --force", path.display())));
        }
        let _ = std::fs::remove_file(&path);
        let source = nbd_source(socket, &d.snapshot);
        let target = path.display().to_string();
        qemu_img(&["convert", "-f", "raw", "-O", req.format.name(), &source, &target]).await?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        let p2 = path.clone();
        let sha256 = tokio::task::spawn_blocking(move || sha256_file(&p2))
            .await
            .map_err(|e| Error::Internal(format!("hashing {file}: {e}")))??;
        disks.push(ExportedDisk { disk: d.name.clone(), file, size: d.size, sha256 });
        job.done.fetch_add(d.size, std::sync::atomic::Ordering::Relaxed);
    }
    let manifest = ExportManifest { image: view.name.clone(), format: req.format, disks };
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
    crate::fsutil::replace_file(&req.output.join("manifest.json"), &bytes, true)
        .map_err(|e| Error::Internal(format!("writing manifest.json: {e}")))?;
    Ok(manifest)
}

impl Service {
    /// Shares an image with another account: each disk's snapshot (as `snapshot share`), and
    /// a grant naming the disks, so the account can deploy it on any node serving both.
    pub async fn share_image(&self, caller: &Caller, name: &str, req: ShareRequest) -> Result<ImageView> {
        caller.may(Access::Manage)?;
        let (name, r) = self.find_image(caller, name)?;
        let mut region = String::new();
        for d in &r.disks {
            let v = self.share_snapshot(caller, &d.snapshot_id, req.clone()).await?;
            region = crate::engine::bare_name(&v.repository).to_string();
        }
        let grant = ImageGrant {
            image: name.clone(),
            owner: owner_of(&name).to_string(),
            recipient: req.with.clone(),
            description: r.description.clone(),
            disks: r.disks.iter().map(|d| (d.name.clone(), d.snapshot_id.clone())).collect(),
            granted_at: self.engine.clock().now(),
            revoked_at: None,
        };
        self.store.put_image_share(&region, &grant).await?;
        let record = self.image_shared(&name, &req.with, Some(region))?;
        tracing::info!(image = %name, with = %req.with, by = %caller, "image shared");
        Ok(self.image_view(&name, &record))
    }

    /// Ends an image's share: its grant and each disk's (volumes deployed from it before keep
    /// loading for the grace period, as after `snapshot unshare`).
    pub async fn unshare_image(&self, caller: &Caller, name: &str, req: UnshareRequest) -> Result<ImageView> {
        caller.may(Access::Manage)?;
        let (name, r) = self.find_image(caller, name)?;
        let Some(region) = r.shared_with.get(&req.with).cloned() else {
            return Err(Error::NotFound(format!("image {name} is not shared with account '{}'", req.with)));
        };
        for d in &r.disks {
            match self.unshare_snapshot(caller, &d.snapshot_id, req.clone()).await {
                Err(Error::NotFound(_)) | Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(mut g) = self.store.image_share(&region, &req.with, &name).await? {
            g.revoked_at = Some(self.engine.clock().now());
            self.store.put_image_share(&region, &g).await?;
        }
        let record = self.image_shared(&name, &req.with, None)?;
        tracing::info!(image = %name, with = %req.with, by = %caller, "image unshared");
        Ok(self.image_view(&name, &record))
    }

    /// Records (or forgets) that image `name` is shared with `with`.
    fn image_shared(&self, name: &str, with: &str, region: Option<String>) -> Result<ImageRecord> {
        let mut st = self.lifecycle.lock();
        let Some(rec) = st.images.get_mut(name) else {
            return Err(Error::NotFound(format!("no image '{name}'")));
        };
        match region {
            Some(r) => rec.shared_with.insert(with.to_string(), r),
            None => rec.shared_with.remove(with),
        };
        let rec = rec.clone();
        st.touch(Key::Image(name.to_string()));
        self.save_lifecycle(&mut st)?;
        Ok(rec)
    }

    /// Images other accounts share with the caller's account (or `q.account`'s, for an
    /// administrator), whichever node shared them.
    pub async fn images_shared_with_me(&self, caller: &Caller, q: SharedQuery) -> Result<Vec<ImageGrant>> {
        caller.may(Access::Read)?;
        let account = q.recipient(caller)?;
        let mut out = Vec::new();
        for region in q.region.map_or_else(|| self.store.region_names(), |r| vec![r]) {
            out.extend(
                self.store.image_shares_to(&region, &account).await?.into_iter().filter(|g| g.revoked_at.is_none()),
            );
        }
        Ok(out)
    }

    /// The grant of image `image` (the owner's full name) to `recipient`, in any region; an
    /// ended one is refused with the sentence saying so.
    async fn image_shared_with(&self, recipient: &str, image: &str) -> Result<Option<ImageGrant>> {
        for region in self.store.region_names() {
            if let Some(g) = self.store.image_share(&region, recipient, image).await? {
                if g.revoked_at.is_some() {
                    return Err(Error::Forbidden(format!(
                        "the share of image {image} by account {} with account {recipient} has ended; no new volumes can be made from it",
                        g.owner
                    )));
                }
                return Ok(Some(g));
            }
        }
        Ok(None)
    }
}
