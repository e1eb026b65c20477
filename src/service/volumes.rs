//! Volumes: create (empty, or from a snapshot here or in a region), list, show, delete, load
//! from the store, attach to and detach from the kernel.

use serde::{Deserialize, Serialize};

use super::events::Event;
use super::{blocking, owner_of, Access, Caller, Error, Result, Service, SnapshotView};
use crate::attach::{AttachRequest, Attachment};
use crate::engine::{parse_snapshot_id, parse_volume_id, EngineError, ErrorKind, RemoteSource, VolumeInfo};
use crate::policy::{OnVolumeDelete, Policy};
use crate::store::HydrationView;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CreateVolume {
    pub name: String,
    /// Required unless `from_snapshot` is given (the size is then the snapshot's).
    #[serde(default)]
    pub size: Option<u64>,
    pub cluster_size: Option<u32>,
    /// Home region of the volume's snapshots (default `local`); with `from_snapshot`, the
    /// region to find the snapshot in.
    #[serde(default)]
    pub region: Option<String>,
    /// `VOLUME@SNAPSHOT` or a snapshot id (of this node, or in a region).
    #[serde(default)]
    pub from_snapshot: Option<String>,
}

/// A volume plus its home region and its kernel attachment, if any.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeView {
    #[serde(flatten)]
    pub info: VolumeInfo,
    pub region: String,
    /// The kernel device the volume is attached to (`volume attach`), if any.
    #[serde(default)]
    pub attachment: Option<Attachment>,
    /// Set while some of its data is still loading from the object store.
    #[serde(default)]
    pub hydration: Option<HydrationView>,
}

impl Service {
    /// A new resource's name as stored: validated, and prefixed with the caller's account
    /// (administrators may name another existing account's, `ACCOUNT/NAME`).
    pub(super) fn new_name(&self, caller: &Caller, what: &str, name: &str) -> Result<String> {
        match name.split_once('/') {
            Some((account, _)) => {
                crate::engine::validate_owned_name(what, name)?;
                if !caller.sees_account(account) {
                    return Err(Error::Invalid(format!(
                        "invalid {what} name '{name}': leave the account prefix out (your account's is added), or use your own"
                    )));
                }
                if !self.accounts.exists(account) {
                    return Err(Error::Invalid(format!(
                        "invalid {what} name '{name}': there is no account '{account}' (create it first: snapblk account create {account}); names without an account have no '/'"
                    )));
                }
                Ok(caller.qualify(name))
            }
            None => {
                crate::engine::validate_name(what, name)?;
                Ok(caller.qualify(name))
            }
        }
        .and_then(|stored| match what == "volume" && super::is_staging_name(&stored) {
            true => Err(Error::Invalid(format!(
                "invalid volume name '{name}': names 'ebs-' and 16 hex digits are reserved for snapshots written through the EBS direct API"
            ))),
            false => Ok(stored),
        })
    }

    pub(super) fn volume_view(&self, mut info: VolumeInfo) -> VolumeView {
        // Snapshots in the recycle bin are not the volume's any more, for its users.
        let binned = self.lifecycle.lock().bin.values().filter(|b| b.volume_id == info.id).count() as u64;
        info.snapshots = info.snapshots.saturating_sub(binned);
        VolumeView {
            region: self.store.volume_region(&info.id),
            attachment: self.attachments.of_volume(&info.id),
            hydration: self.store.hydration.view_of(&info),
            info,
        }
    }

    pub fn list_volumes(&self, caller: &Caller) -> Result<Vec<VolumeView>> {
        caller.may(Access::Read)?;
        let deleted: std::collections::HashSet<String> =
            self.lifecycle.lock().deleted_volumes.keys().cloned().collect();
        Ok(self
            .engine
            .list_volumes()
            .into_iter()
            .filter(|v| !deleted.contains(&v.id) && caller.sees(&v.name) && !super::is_staging_name(&v.name))
            .map(|v| self.volume_view(v))
            .collect())
    }

    pub fn volume(&self, caller: &Caller, r: &str) -> Result<VolumeView> {
        caller.may(Access::Read)?;
        Ok(self.volume_view(self.live_volume(caller, r)?))
    }

    /// An empty volume of `size`, or (with `from_snapshot`) one with a snapshot's content.
    pub async fn create_volume(&self, caller: &Caller, mut req: CreateVolume) -> Result<VolumeView> {
        req.name = self.new_name(caller, "volume", &req.name)?;
        if let Some(from) = &req.from_snapshot {
            caller.may(Access::Restore)?;
            if req.size.is_some() || req.cluster_size.is_some() {
                return Err(Error::Invalid(
                    "a volume created from a snapshot has the snapshot's size and cluster size: leave them out".into(),
                ));
            }
            return self.create_from_snapshot(caller, &req.name, from, req.region.as_deref()).await;
        }
        caller.may(Access::Write)?;
        let Some(size) = req.size else {
            return Err(Error::Invalid("a new volume needs a size (or --from-snapshot)".into()));
        };
        let region = req.region.unwrap_or_else(|| "local".into());
        self.store.check_region(&region)?;
        let e = self.engine.clone();
        let info = blocking(move || e.create_volume(&req.name, size, req.cluster_size)).await?;
        self.store.set_volume_region(&info.id, &region)?;
        Ok(self.volume_view(info))
    }

    /// A new volume with snapshot `r`'s content: a local snapshot is cloned (sharing its
    /// data, or loading it from the store once released); a snapshot id that is not local is
    /// looked up in `region` (or every configured region) and the volume loads from there.
    /// Usable at once; data loads on demand and (unless disabled) in the background.
    pub(super) async fn create_from_snapshot(
        &self,
        caller: &Caller,
        name: &str,
        r: &str,
        region: Option<&str>,
    ) -> Result<VolumeView> {
        // The new volume's account's repository in `region` (an administrator may name
        // another account's: `ACCOUNT/REGION`).
        let owner = owner_of(name);
        let repository = region
            .map(|reg| match reg.contains('/') {
                true => caller.repository(reg),
                false => Ok(super::accounts::owned_name(owner, reg)),
            })
            .transpose()?;
        if let Some(reg) = &repository {
            self.store.check_region(reg)?;
        }
        let region = repository.as_deref();
        let (info, home) = match self.live_snapshot(caller, r) {
            Ok(snap) => {
                // A clone keeps its origin volume's home region.
                let home = self.store.volume_region(&snap.volume_id);
                let info = self
                    .released_or_not(&snap.id, |region| {
                        let (e, r2, n2) = (self.engine.clone(), snap.id.clone(), name.to_string());
                        blocking(move || e.clone_snapshot(&r2, &n2, region.as_deref()))
                    })
                    .await?;
                (info, home)
            }
            // Not on this node (one in the recycle bin is: its error stands): an id, or
            // VOLUME@SNAPSHOT as another node uploaded it.
            Err(Error::Engine(e))
                if e.kind() == ErrorKind::NotFound
                    && (parse_snapshot_id(r).is_some()
                        || r.split_once('@').is_some_and(|(v, _)| self.engine.volume(&caller.qualify(v)).is_err())) =>
            {
                let id = match parse_snapshot_id(r) {
                    Some(_) => r.to_string(),
                    None => self.store.find_remote_by_name(&caller.qualify_ref(r), region).await?,
                };
                // The new volume's account's repositories, else a snapshot another account
                // shared with it (by id only: names of other accounts' volumes stay unseen).
                let recipient = owner;
                let (region, m, shared) = match self.store.find_remote(&id, recipient, region).await {
                    Ok((region, m)) => (region, m, None),
                    Err(e) if e.kind() == ErrorKind::NotFound && parse_snapshot_id(r).is_some() => {
                        let g = self.share_for_new_volume(recipient, &id, region).await?;
                        let (region, m) = self.store.find_remote(&id, recipient, Some(&g.repository)).await?;
                        (region, m, Some(g))
                    }
                    Err(e) => return Err(e.into()),
                };
                // A snapshot of another account in the caller's own repository is missing
                // for it (an administrator's restore of one names the repository).
                if shared.is_none() && !caller.sees(&m.volume_name) {
                    let names = region.name.clone();
                    return Err(Error::Store(crate::store::StoreError::NotFound(format!(
                        "no snapshot {id} in region(s) {names}; list them with: snapblk snapshot list --region REGION"
                    ))));
                }
                // Held in the region before the volume exists: its owner cannot delete it now.
                let m = self.store.hold_for_load(&region.name, &id, &format!("volume {name} loads from it")).await?;
                let source =
                    RemoteSource { region: region.name.clone(), snapshot: parse_snapshot_id(&id).unwrap_or_default() };
                let (e, n2) = (self.engine.clone(), name.to_string());
                match blocking(move || e.create_volume_from_remote(&n2, m.size, m.cluster_size, &source)).await {
                    // The volume's home is the region; its snapshots go to its owner's
                    // repository there.
                    Ok(info) => {
                        if let Some(g) = shared {
                            self.event(super::Event::SharedVolumeCreated {
                                volume: info.name.clone(),
                                from: format!("{} ({}@{})", g.snapshot_id, g.volume, g.snapshot),
                                owner: g.owner,
                                by: caller.to_string(),
                            });
                        }
                        (info, crate::engine::bare_name(&region.name).to_string())
                    }
                    Err(e) => {
                        self.store.renew_holds().await;
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        };
        self.store.set_volume_region(&info.id, &home)?;
        self.volume_loading(&info);
        Ok(self.volume_view(info))
    }

    /// After a volume was created from, or rolled back to, data in the store: it loads in
    /// the background (unless `[hydrate] background = false`).
    pub(super) fn volume_loading(&self, info: &VolumeInfo) {
        if info.hydration.is_some() && self.store.hydration.config.background {
            if let Some(id) = parse_volume_id(&info.id) {
                self.store.hydration.start(id);
            }
        }
    }

    /// Deletes a volume: refused while it has clients, a kernel device or snapshots taken by
    /// hand. The snapshots policies took of it are deleted with it, or kept, as each policy's
    /// `on_volume_delete` says (kept if any policy keeping it says keep, or if it is held). A
    /// volume that still has snapshots (kept, or in the recycle bin) is deleted for its users
    /// at once and for good once its last snapshot goes (see `bin.rs`).
    pub async fn delete_volume(&self, caller: &Caller, r: &str) -> Result<()> {
        caller.may(Access::Delete)?;
        let info = self.live_volume(caller, r)?;
        self.attachments.before_delete(&info.id)?;
        if info.writers > 0 {
            return Err(Error::Engine(EngineError::Busy(format!(
                "volume '{}' has {} client(s) connected; disconnect them first",
                info.name, info.writers
            ))));
        }
        let (with_it, manual): (Vec<SnapshotView>, Vec<SnapshotView>) = {
            let snaps = self.list_snapshots(caller, Some(&info.id))?;
            let st = self.lifecycle.lock();
            let mut with_it = Vec::new();
            let mut manual = Vec::new();
            for s in snaps {
                let owners: Vec<&Policy> = st
                    .books
                    .iter()
                    .filter(|(_, b)| b.get(&info.id).is_some_and(|b| b.snapshots.contains(&s.info.id)))
                    .filter_map(|(p, _)| st.policies.get(p))
                    .collect();
                if owners.is_empty() {
                    manual.push(s);
                } else if s.hold.is_none() && owners.iter().all(|p| p.on_volume_delete == OnVolumeDelete::Apply) {
                    with_it.push(s);
                }
            }
            (with_it, manual)
        };
        if !manual.is_empty() {
            let names: Vec<String> = manual.iter().map(|s| format!("{}@{}", s.info.volume, s.info.name)).collect();
            return Err(Error::Engine(EngineError::Busy(format!(
                "volume '{}' still has snapshots taken by hand ({}); delete them first with: snapblk snapshot delete VOLUME@SNAPSHOT",
                info.name,
                names.join(", ")
            ))));
        }
        for s in &with_it {
            self.delete_snapshot(caller, &s.info.id).await?;
        }
        let left = self.engine.list_snapshots(Some(&info.id))?.len();
        if left == 0 {
            let (e, id) = (self.engine.clone(), info.id.clone());
            blocking(move || e.delete_volume(&id)).await?;
            self.forget_volume(&info.id);
            self.store.volume_deleted(&info.id)?;
        } else {
            self.mark_volume_deleted(&info)?;
        }
        tracing::info!(volume = %info.name, snapshots_left = left, by = %caller, "volume deleted");
        self.event(Event::VolumeDeleted {
            volume: info.name,
            id: info.id,
            snapshots_left: left,
            by: caller.to_string(),
        });
        Ok(())
    }

    /// Starts (or resumes) loading all of a volume's data from the store.
    pub fn hydrate_volume(&self, caller: &Caller, r: &str) -> Result<VolumeView> {
        caller.may(Access::Restore)?;
        let info = self.live_volume(caller, r)?;
        if let Some(id) = parse_volume_id(&info.id) {
            self.store.hydration.start(id);
        }
        Ok(self.volume_view(info))
    }

    /// Kernel devices are the daemon machine's: administrators only.
    pub async fn attach(&self, caller: &Caller, r: &str, req: AttachRequest) -> Result<Attachment> {
        caller.may(Access::Admin)?;
        self.live_volume(caller, r)?;
        let (a, r) = (self.attachments.clone(), r.to_string());
        blocking(move || a.attach(&r, &req)).await
    }

    pub async fn detach(&self, caller: &Caller, r: &str) -> Result<Attachment> {
        caller.may(Access::Admin)?;
        let (a, r) = (self.attachments.clone(), r.to_string());
        blocking(move || a.detach(&r)).await
    }

    pub fn attachments(&self, caller: &Caller) -> Result<Vec<Attachment>> {
        caller.may(Access::Admin)?;
        Ok(self.attachments.list())
    }
}
