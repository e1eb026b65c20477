//! Snapshots: create, list, show, delete, roll back to, clone, upload, verify, export.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::events::Event;
use super::quotas::Taker;
use super::{blocking, Access, Caller, Error, Hold, Result, Service, VolumeView};
use crate::engine::{ErrorKind, SnapshotInfo};
use crate::jobs::JobView;
use crate::store::{ExportFormat, RemoteStatus, SnapshotBytes, StoreError, UploadState};

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateSnapshot {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Answer only once the snapshot is durable (by default it is taken, readable and
    /// answered at once, and durable when the commit started with it ends).
    #[serde(default)]
    pub durable: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CloneSnapshot {
    pub name: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Rollback {
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ExportRequest {
    pub output: PathBuf,
    pub format: ExportFormat,
    #[serde(default)]
    pub region: Option<String>,
    /// Replace an existing target that is not a regular file (a symlink, a device node).
    #[serde(default)]
    pub force: bool,
}

/// A snapshot plus its store-side status (none for snapshots never uploaded), its hold and
/// the policies that took it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotView {
    #[serde(flatten)]
    pub info: SnapshotInfo,
    pub upload: Option<RemoteStatus>,
    #[serde(default)]
    pub hold: Option<Hold>,
    /// Names of the policies whose retention keeps it.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Its volume was deleted (the snapshot stays until deleted itself).
    #[serde(default)]
    pub volume_deleted: bool,
    /// The group snapshot it is a member of.
    #[serde(default)]
    pub group_snapshot: Option<MemberOf>,
    /// What it takes in its upload repository (storage accounting): none when it is not
    /// uploaded, or not counted (a list shows what was counted before; `snapshot show` and
    /// `snapshot list --bytes` count).
    #[serde(default)]
    pub storage: Option<SnapshotBytes>,
}

/// How long `snapshot show` waits for its repository's storage accounting (then it shows the
/// last one counted, and the count goes on in the background).
const SHOW_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A group snapshot, by id (`g-…`) and `GROUP@NAME`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberOf {
    pub id: String,
    pub name: String,
}

/// Holds, policy books, the recycle bin and deleted volumes, looked up once for a list of
/// snapshots (of one volume: only its part, so a volume's list does not cost every volume's
/// books).
struct Marks {
    holds: HashMap<String, Hold>,
    taken_by: HashMap<String, Vec<String>>,
    binned: std::collections::HashSet<String>,
    deleted_volumes: std::collections::HashSet<String>,
    groups: HashMap<String, MemberOf>,
}

impl Service {
    /// The marks of the snapshots of volume `volume_id`, or of every volume.
    fn marks(&self, volume_id: Option<&str>) -> Marks {
        let st = self.lifecycle.lock();
        let mut taken_by: HashMap<String, Vec<String>> = HashMap::new();
        for (policy, books) in &st.books {
            let name = st.policies.get(policy).map_or(policy.as_str(), |p| p.name.as_str());
            let of_volume = |v: &&String| volume_id.is_none_or(|id| id == v.as_str());
            for id in books.iter().filter(|(v, _)| of_volume(v)).flat_map(|(_, b)| &b.snapshots) {
                taken_by.entry(id.clone()).or_default().push(name.to_string());
            }
        }
        let binned = st.bin.iter().filter(|(_, b)| volume_id.is_none_or(|id| id == b.volume_id));
        let mut groups = HashMap::new();
        for (id, g) in st.group_snapshots.iter().filter(|(_, g)| !g.pending && !g.deleting) {
            for (_, s) in g.members.iter().filter(|(v, _)| volume_id.is_none_or(|id| id == v)) {
                groups.insert(s.clone(), MemberOf { id: id.clone(), name: format!("{}@{}", g.group, g.name) });
            }
        }
        Marks {
            holds: st.holds.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            taken_by,
            binned: binned.map(|(id, _)| id.clone()).collect(),
            deleted_volumes: st.deleted_volumes.keys().cloned().collect(),
            groups,
        }
    }

    fn snapshot_view_with(&self, info: SnapshotInfo, marks: &Marks) -> SnapshotView {
        let upload = self.store.status(&info.id);
        let storage = upload
            .as_ref()
            .filter(|u| u.state == UploadState::Available)
            .and_then(|u| self.store.cached_accounting(&u.region))
            .and_then(|acc| acc.snapshots.get(&info.id).cloned());
        SnapshotView {
            upload,
            storage,
            hold: marks.holds.get(&info.id).cloned(),
            policies: marks.taken_by.get(&info.id).cloned().unwrap_or_default(),
            volume_deleted: marks.deleted_volumes.contains(&info.volume_id),
            group_snapshot: marks.groups.get(&info.id).cloned(),
            info,
        }
    }

    fn snapshot_view(&self, info: SnapshotInfo) -> SnapshotView {
        let marks = self.marks(Some(&info.volume_id));
        self.snapshot_view_with(info, &marks)
    }

    /// Takes a snapshot of volume `r` by hand; its upload starts in the background.
    pub async fn create_snapshot(&self, caller: &Caller, r: &str, req: CreateSnapshot) -> Result<SnapshotView> {
        caller.may(Access::Snapshot)?;
        self.take_snapshot(caller, r, req, Taker::Hand).await
    }

    /// Takes a snapshot, within the volume's quotas and task limits.
    pub(super) async fn take_snapshot(
        &self,
        caller: &Caller,
        r: &str,
        req: CreateSnapshot,
        taker: Taker,
    ) -> Result<SnapshotView> {
        let volume = self.live_volume(caller, r)?;
        let _task = self.snapshot_allowed(&volume, taker).await?;
        let name = req.name.clone();
        let created = if req.durable {
            let (e, r) = (self.engine.clone(), volume.id.clone());
            blocking(move || {
                let s = e.create_snapshot(&r, &req.name, &req.description)?;
                e.make_durable(&s.id)?;
                e.snapshot(&s.id)
            })
            .await
        } else {
            // Right here: it waits for no disk sync (see `Engine::create_snapshot`), and a hop to
            // a blocking thread and back costs more than the create on a loaded machine.
            self.engine.create_snapshot(&volume.id, &req.name, &req.description).map_err(Error::from)
        };
        let snap = match created {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(self.name_in_bin(&volume.name, &name).unwrap_or(e));
            }
            other => other?,
        };
        // The snapshot exists (and is usable) now; its upload starts in the background.
        self.store.snapshots_created(std::slice::from_ref(&snap))?;
        self.event(Event::SnapshotTaken {
            volume: snap.volume.clone(),
            snapshot: snap.name.clone(),
            id: snap.id.clone(),
            by: caller.to_string(),
        });
        Ok(self.snapshot_view(snap))
    }

    /// A name taken by a snapshot in the recycle bin: said so, with the ways out.
    fn name_in_bin(&self, volume: &str, name: &str) -> Option<Error> {
        let st = self.lifecycle.lock();
        let (id, b) = st.bin.iter().find(|(_, b)| b.volume == volume && b.name == name)?;
        Some(Error::Engine(crate::engine::EngineError::AlreadyExists(format!(
            "snapshot {volume}@{name} is in the recycle bin (until {}): restore it (snapblk snapshot restore-deleted {id}), purge it (snapblk recycle-bin purge {id}), or pick another name",
            crate::units::utc(b.expires_at)
        ))))
    }

    /// The snapshots of volume `volume`, or of every volume (not those in the recycle bin).
    pub fn list_snapshots(&self, caller: &Caller, volume: Option<&str>) -> Result<Vec<SnapshotView>> {
        caller.may(Access::Read)?;
        let volume_id = volume.map(|v| self.own_volume(caller, v).map(|i| i.id)).transpose()?;
        let marks = self.marks(volume_id.as_deref());
        Ok(self
            .engine
            .list_snapshots(volume_id.as_deref())?
            .into_iter()
            .filter(|s| !marks.binned.contains(&s.id) && caller.sees(&s.volume))
            .map(|s| self.snapshot_view_with(s, &marks))
            .collect())
    }

    pub fn snapshot(&self, caller: &Caller, r: &str) -> Result<SnapshotView> {
        caller.may(Access::Read)?;
        Ok(self.snapshot_view(self.live_snapshot(caller, r)?))
    }

    /// [`Self::snapshot`] with what it takes in the store counted (`snapshot show`): the
    /// accounting of its upload repository, computed unless cached and still current.
    pub async fn show_snapshot(&self, caller: &Caller, r: &str) -> Result<SnapshotView> {
        let mut view = self.snapshot(caller, r)?;
        self.count_storage(std::slice::from_mut(&mut view), Some(SHOW_WAIT)).await;
        Ok(view)
    }

    /// [`Self::list_snapshots`]; with `bytes`, what each uploaded snapshot takes in the store
    /// is counted (each upload repository's accounting, computed unless cached and current).
    pub async fn list_snapshots_counted(
        &self,
        caller: &Caller,
        volume: Option<&str>,
        bytes: bool,
    ) -> Result<Vec<SnapshotView>> {
        let mut views = self.list_snapshots(caller, volume)?;
        if bytes {
            self.count_storage(&mut views, None).await;
        }
        Ok(views)
    }

    /// Fills `storage` of the uploaded snapshots among `views`, one accounting per upload
    /// repository. A repository that cannot be counted (its store down, a manifest
    /// unreadable) leaves its snapshots' `storage` as it was, and is logged. With `wait`,
    /// a count taking longer goes on in the background and the cached one answers.
    async fn count_storage(&self, views: &mut [SnapshotView], wait: Option<std::time::Duration>) {
        let mut repos: Vec<String> = views
            .iter()
            .filter_map(|v| v.upload.as_ref().filter(|u| u.state == UploadState::Available))
            .map(|u| u.region.clone())
            .collect();
        repos.sort();
        repos.dedup();
        for repo in repos {
            let counted = match wait {
                Some(wait) => self.store.accounting_within(&repo, wait).await,
                None => self.store.accounting(&repo).await.map(Some),
            };
            match counted {
                Ok(None) => {}
                Ok(Some(acc)) => {
                    for v in views.iter_mut() {
                        if v.upload.as_ref().is_some_and(|u| u.region == repo && u.state == UploadState::Available) {
                            v.storage = acc.snapshots.get(&v.info.id).cloned();
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(region = %repo, error = %e, "cannot count what the snapshots take in the store")
                }
            }
        }
    }

    /// Deletes a snapshot — every delete, by hand or by retention, comes here. A held one is
    /// refused. With the recycle bin on, it goes there; else it is deleted for good.
    pub async fn delete_snapshot(&self, caller: &Caller, r: &str) -> Result<()> {
        self.delete_snapshot_forced(caller, r, false).await
    }

    /// Deletes a snapshot; a member of a group snapshot only with `force`, which leaves the
    /// group snapshot degraded.
    pub async fn delete_snapshot_forced(&self, caller: &Caller, r: &str, force: bool) -> Result<()> {
        caller.may(Access::Delete)?;
        let snap = self.live_snapshot(caller, r)?;
        // Refused up front while other nodes load from it, so the user hears of it; when the
        // store cannot be asked now, the delete goes on (its store copy waits for holds anyway).
        // Retention and quotas delete on: their store copies wait the same way.
        if !force && !matches!(caller, Caller::Daemon(_)) {
            match self.store.check_not_held_elsewhere(&snap).await {
                Err(e @ StoreError::Busy(_)) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(snapshot = %snap.id, error = %e, "cannot look for other nodes' holds; deleting (the store copy waits for them)")
                }
                Ok(()) => {}
            }
        }
        if let Some((group_snapshot, name)) = self.group_of_snapshot(&snap.id) {
            if !force {
                return Err(Error::Engine(crate::engine::EngineError::Busy(format!(
                    "snapshot {}@{} is a member of group snapshot {name}: delete the whole group snapshot (snapblk group snapshot delete {name}), or this member alone with --force (the group snapshot is then degraded)",
                    snap.volume, snap.name
                ))));
            }
            self.delete_member_snapshot(caller, &snap.id).await?;
            return self.mark_degraded(&group_snapshot);
        }
        self.delete_member_snapshot(caller, &snap.id).await
    }

    /// Deletes a snapshot, whatever group snapshot it belongs to (the caller sees to that).
    pub(super) async fn delete_member_snapshot(&self, caller: &Caller, r: &str) -> Result<()> {
        let snap = self.live_snapshot(caller, r)?;
        self.check_not_held(&snap.id, &format!("{}@{}", snap.volume, snap.name))?;
        let by_retention = matches!(caller, Caller::Daemon("retention" | "quota"));
        let to_bin = self.to_bin(caller, &snap, by_retention)?;
        if !to_bin && !by_retention {
            self.delete_for_good(caller, &snap).await?;
        }
        let (volume, snapshot, id, by) = (snap.volume, snap.name, snap.id, caller.to_string());
        self.event(match by_retention {
            true => Event::SnapshotExpired { volume, snapshot, id, by, to_bin },
            false => Event::SnapshotDeleted { volume, snapshot, id, by, to_bin },
        });
        Ok(())
    }

    /// Deletes a snapshot for good. The intent to delete its store copy is recorded first,
    /// then the local delete (the step that can be refused), then the store copy — once
    /// nothing can refuse it any more (see `StoreService::delete_intent`). A deleted volume
    /// whose last snapshot this was goes too.
    pub(super) async fn delete_for_good(&self, caller: &Caller, snap: &SnapshotInfo) -> Result<()> {
        let kept = self.store.delete_intent(snap)?;
        let (e, id) = (self.engine.clone(), snap.id.clone());
        if let Err(refused) = blocking(move || e.delete_snapshot(&id, kept)).await {
            if kept {
                self.store.delete_refused(&snap.id)?;
            }
            return Err(refused);
        }
        self.forget_snapshot(&snap.id, &snap.volume_id);
        self.forget_shares(snap).await;
        tracing::debug!(snapshot = %snap.id, by = %caller, "snapshot deleted for good");
        self.store.snapshot_deleted(&snap.id).await?;
        self.volume_gone_if_empty(&snap.volume_id).await;
        Ok(())
    }

    /// Rolls a volume back to one of its snapshots; to a released one, the volume then loads
    /// the snapshot's data from the store (usable at once). A volume attached to the kernel is
    /// refused, or with `force` detached first, so the kernel's page cache of the old content
    /// goes away with the device.
    pub async fn rollback(&self, caller: &Caller, r: &str, req: Rollback) -> Result<VolumeView> {
        caller.may(Access::Delete)?;
        let snap = self.live_snapshot(caller, r)?;
        let volume_id = snap.volume_id;
        self.live_volume(caller, &volume_id).map_err(|_| {
            Error::Invalid(format!("the volume of snapshot '{r}' was deleted: clone the snapshot to a new volume instead (snapblk volume clone {r} NAME)"))
        })?;
        let (a, force) = (self.attachments.clone(), req.force);
        if let Some(gone) = blocking(move || a.before_rollback(&volume_id, force)).await? {
            tracing::warn!(volume = gone.volume, device = %gone.device.display(), "detached for a forced rollback");
        }
        let info = self
            .released_or_not(&snap.id, |region| {
                let id = &snap.id;
                async move { self.engine.rollback(id, force, region.as_deref()).await.map_err(Error::from) }
            })
            .await?;
        self.volume_loading(&info);
        Ok(self.volume_view(info))
    }

    /// A new volume with the snapshot's content (`volume clone`).
    pub async fn clone_snapshot(&self, caller: &Caller, r: &str, req: CloneSnapshot) -> Result<VolumeView> {
        caller.may(Access::Restore)?;
        let name = self.new_name(caller, "volume", &req.name)?;
        let snap = self.live_snapshot(caller, r)?;
        self.create_from_snapshot(caller, &name, &snap.id, None).await
    }

    /// Uploads a snapshot never uploaded (automatic upload off, or taken before), or queues a
    /// failed upload again. Nothing to do when uploaded or uploading.
    pub fn upload_snapshot(&self, caller: &Caller, r: &str) -> Result<SnapshotView> {
        caller.may(Access::Snapshot)?;
        let snap = self.live_snapshot(caller, r)?;
        self.store.upload(&snap)?;
        Ok(self.snapshot_view(snap))
    }

    /// Re-reads everything the snapshot needs from the store and checks it, as a job.
    pub async fn verify_snapshot(&self, caller: &Caller, r: &str, region: Option<String>) -> Result<JobView> {
        caller.may(Access::Read)?;
        let region = region.map(|reg| caller.repository(&reg)).transpose()?;
        let r2 = self.store_ref(caller, r, region.as_deref()).await?;
        let store = self.store.clone();
        Ok(self.jobs.spawn("verify", r, caller.account(), move |job| async move {
            store.verify(&r2, region.as_deref(), &job).await
        }))
    }

    /// Writes the snapshot's content to a file of this machine, reading only from the store,
    /// as a job. (Files of the daemon's machine: administrators only.)
    pub async fn export_snapshot(&self, caller: &Caller, r: &str, mut req: ExportRequest) -> Result<JobView> {
        caller.may(Access::Admin)?;
        req.region = req.region.map(|reg| caller.repository(&reg)).transpose()?;
        let r = &self.store_ref(caller, r, req.region.as_deref()).await?;
        if !req.output.is_absolute() {
            return Err(Error::Invalid(format!("export output '{}' must be an absolute path", req.output.display())));
        }
        let (store, r2) = (self.store.clone(), r.to_string());
        Ok(self.jobs.spawn("export", r, caller.account(), move |job| async move {
            store.export(&r2, req.region.as_deref(), &req.output, req.format, req.force, &job).await
        }))
    }

    /// A snapshot reference for the store's lookups: a snapshot of this node is the caller's
    /// and not in the recycle bin (its id is returned); one only in a region, named by id,
    /// is the caller's account's (by the volume its manifest names); `VOLUME@SNAPSHOT` names
    /// only the caller's volumes.
    async fn store_ref(&self, caller: &Caller, r: &str, region: Option<&str>) -> Result<String> {
        let q = caller.qualify_ref(r);
        if self.engine.snapshot(&q).is_ok() {
            return Ok(self.live_snapshot(caller, r)?.id);
        }
        if crate::engine::parse_snapshot_id(r).is_some() && !matches!(caller, Caller::Local | Caller::Daemon(_)) {
            let (_, m) = self.store.find_remote(r, caller.account(), region).await?;
            if !caller.sees(&m.volume_name) {
                return Err(Error::NotFound(format!(
                    "no snapshot {r} in the configured regions; list them with: snapblk snapshot list --region REGION"
                )));
            }
        }
        Ok(q)
    }

    /// Runs an operation on snapshot `r` with the region it loads from if released. Once more
    /// if the release sweep released it between the two (the engine refuses with `NotLocal`
    /// when it finds a released snapshot without a region, before changing anything).
    pub(super) async fn released_or_not<T, F, Fut>(&self, r: &str, op: F) -> Result<T>
    where
        F: Fn(Option<String>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut again = true;
        loop {
            let region = self.store.region_if_released(&self.engine.snapshot(r)?)?;
            match op(region.clone()).await {
                Err(e) if e.kind() == ErrorKind::NotLocal && region.is_none() && again => again = false,
                result => return result,
            }
        }
    }
}
