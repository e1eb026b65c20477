//! Consistency groups: named sets of volumes whose snapshots are taken at one instant — every
//! member's snapshot holds every write acknowledged before the cut and none acknowledged
//! after it (the engine takes them in one journal record, under every member's lock).
//!
//! The engine's cut is the durable truth of a group snapshot: its one journal record gives
//! every member the group snapshot's tag (id, group, consistency), kept with each member in
//! checkpoints too. The lifecycle state's record of it is written after the cut, unsynced —
//! durable with a later synced save or the kernel's write-back, as a single create is with
//! the engine's next commit — so nothing on the create's path waits for a disk. At start
//! ([`LifecycleState::settle_groups`]) the state is reconciled with the engine: a group
//! snapshot the engine has and the state lacks (a crash took the unsynced record) is rebuilt
//! from its members' tags, and a record none of whose members the engine has (a power loss
//! undid the cut) is dropped.

use serde::{Deserialize, Serialize};

use super::lifecycle::{GroupRecord, GroupSnapshotRecord, Key, LifecycleState};
use super::quotas::Taker;
use super::{Access, Caller, Error, Result, Service};
use crate::engine::{group_snapshot_id, validate_name, Engine, GroupTag, MAX_GROUP_MEMBERS};

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateGroup {
    pub name: String,
    pub volumes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GroupMemberRequest {
    pub volume: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CreateGroupSnapshot {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `application` when the caller quiesced the members (a hook froze their filesystems
    /// around the cut); `crash` (the default) otherwise.
    #[serde(default)]
    pub consistency: Option<String>,
    /// Answer only once every member's snapshot is durable (by default the group snapshot is
    /// taken and answered at once, durable when the commit started with it ends).
    #[serde(default)]
    pub durable: bool,
}

/// A member volume, by name and id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberView {
    pub volume: String,
    pub volume_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupView {
    pub name: String,
    pub created: u64,
    pub members: Vec<MemberView>,
    /// Names of its group snapshots, oldest first.
    pub snapshots: Vec<String>,
}

/// One member's snapshot of a group snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupSnapshotMember {
    pub volume: String,
    pub volume_id: String,
    pub snapshot_id: String,
    /// `false` once it was deleted on its own (`snapshot delete --force`).
    pub present: bool,
    pub size: u64,
    /// Its upload: `uploading`, `available`, `failed`, or none.
    pub upload: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupSnapshotView {
    pub id: String,
    pub group: String,
    pub name: String,
    pub description: String,
    pub created: u64,
    /// `crash`: taken without a quiesce hook (what a power cut at that instant would leave on
    /// every member at once); `application`: with the members quiesced by a hook.
    pub consistency: String,
    /// A member's snapshot was deleted on its own: the group snapshot is no longer whole.
    pub degraded: bool,
    pub members: Vec<GroupSnapshotMember>,
}

impl Service {
    /// A group's name as stored, for a caller: qualified with its account; another account's
    /// group is missing, as far as the caller can tell.
    fn group_name(caller: &Caller, name: &str) -> Result<String> {
        let q = caller.qualify(name);
        match caller.sees(&q) {
            true => Ok(q),
            false => Err(Error::NotFound(format!("no group named '{name}' (list them with: snapblk group list)"))),
        }
    }

    /// The group `name`, or an error naming the command that lists them.
    fn group_record(st: &LifecycleState, name: &str) -> Result<GroupRecord> {
        st.groups
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no group named '{name}' (list them with: snapblk group list)")))
    }

    /// Member volumes by id, checked to exist, distinct, and at most [`MAX_GROUP_MEMBERS`].
    fn member_ids(&self, caller: &Caller, volumes: &[String]) -> Result<Vec<String>> {
        let mut ids: Vec<String> = Vec::with_capacity(volumes.len());
        for r in volumes {
            let v = self.live_volume(caller, r)?;
            if ids.contains(&v.id) {
                return Err(Error::Invalid(format!("volume '{}' is named twice", v.name)));
            }
            ids.push(v.id);
        }
        if ids.is_empty() || ids.len() > MAX_GROUP_MEMBERS {
            return Err(Error::Invalid(format!("a group has 1 to {MAX_GROUP_MEMBERS} volumes, not {}", ids.len())));
        }
        Ok(ids)
    }

    fn group_view(&self, name: &str, g: &GroupRecord, st: &LifecycleState) -> GroupView {
        let mut snapshots: Vec<&GroupSnapshotRecord> =
            st.group_snapshots.values().filter(|s| s.group == name && s.listed()).collect();
        snapshots.sort_by_key(|s| s.created);
        GroupView {
            name: name.to_string(),
            created: g.created,
            members: g.members.iter().map(|id| self.member_view(id)).collect(),
            snapshots: snapshots.into_iter().map(|s| s.name.clone()).collect(),
        }
    }

    fn member_view(&self, volume_id: &str) -> MemberView {
        let volume = self.engine.volume(volume_id).map(|v| v.name).unwrap_or_else(|_| "(deleted)".into());
        MemberView { volume, volume_id: volume_id.to_string() }
    }

    pub fn create_group(&self, caller: &Caller, mut req: CreateGroup) -> Result<GroupView> {
        caller.may(Access::Manage)?;
        req.name = self.new_name(caller, "group", &req.name)?;
        let members = self.member_ids(caller, &req.volumes)?;
        let mut st = self.lifecycle.lock();
        if st.groups.contains_key(&req.name) {
            return Err(Error::Engine(crate::engine::EngineError::AlreadyExists(format!(
                "a group named '{}' exists already",
                req.name
            ))));
        }
        let g = GroupRecord { members, created: self.engine.clock().now() };
        st.groups.insert(req.name.clone(), g.clone());
        st.touch(Key::Group(req.name.clone()));
        self.save_lifecycle(&mut st)?;
        tracing::info!(group = %req.name, by = %caller, "group created");
        Ok(self.group_view(&req.name, &g, &st))
    }

    pub fn list_groups(&self, caller: &Caller) -> Result<Vec<GroupView>> {
        caller.may(Access::Read)?;
        let st = self.lifecycle.lock();
        Ok(st.groups.iter().filter(|(n, _)| caller.sees(n)).map(|(n, g)| self.group_view(n, g, &st)).collect())
    }

    pub fn group(&self, caller: &Caller, name: &str) -> Result<GroupView> {
        caller.may(Access::Read)?;
        let name = &Self::group_name(caller, name)?;
        let st = self.lifecycle.lock();
        let g = Self::group_record(&st, name)?;
        Ok(self.group_view(name, &g, &st))
    }

    /// Adds (`add`) or removes a member; its group snapshots keep the members they were taken of.
    pub fn change_group_member(&self, caller: &Caller, name: &str, volume: &str, add: bool) -> Result<GroupView> {
        caller.may(Access::Manage)?;
        let name = &Self::group_name(caller, name)?;
        let id = match (add, self.live_volume(caller, volume)) {
            (_, Ok(v)) => v.id,
            // A deleted member can still be taken out.
            (false, Err(_)) => volume.to_string(),
            (true, Err(e)) => return Err(e),
        };
        let mut st = self.lifecycle.lock();
        let mut g = Self::group_record(&st, name)?;
        let present = g.members.contains(&id);
        match (add, present) {
            (true, true) => return Err(Error::Invalid(format!("volume '{volume}' is in group '{name}' already"))),
            (false, false) => return Err(Error::NotFound(format!("volume '{volume}' is not in group '{name}'"))),
            (true, false) if g.members.len() >= MAX_GROUP_MEMBERS => {
                return Err(Error::Invalid(format!(
                    "group '{name}' has {MAX_GROUP_MEMBERS} volumes, the most a group can have"
                )));
            }
            (false, true) if g.members.len() == 1 => {
                return Err(Error::Invalid(format!(
                    "volume '{volume}' is the last member of group '{name}'; delete the group instead (snapblk group delete {name})"
                )));
            }
            (true, false) => g.members.push(id),
            (false, true) => g.members.retain(|m| *m != id),
        }
        st.groups.insert(name.to_string(), g.clone());
        st.touch(Key::Group(name.to_string()));
        self.save_lifecycle(&mut st)?;
        Ok(self.group_view(name, &g, &st))
    }

    /// Deletes the group object; its volumes stay. Refused while it has group snapshots.
    pub fn delete_group(&self, caller: &Caller, name: &str) -> Result<()> {
        caller.may(Access::Manage)?;
        let name = &Self::group_name(caller, name)?;
        let mut st = self.lifecycle.lock();
        Self::group_record(&st, name)?;
        if let Some(p) = st.policies.values().find(|p| p.groups.iter().any(|g| g == name)) {
            return Err(Error::Engine(crate::engine::EngineError::Busy(format!(
                "policy '{}' is applied to group '{name}'; remove it first (snapblk policy remove {} --group {name})",
                p.name, p.name
            ))));
        }
        if let Some(s) = st.group_snapshots.values().find(|s| s.group == *name) {
            return Err(Error::Engine(crate::engine::EngineError::Busy(format!(
                "group '{name}' still has group snapshots (e.g. {name}@{}); delete them first with: snapblk group snapshot delete {name}@SNAPSHOT",
                s.name
            ))));
        }
        st.groups.remove(name);
        st.touch(Key::Group(name.to_string()));
        self.save_lifecycle(&mut st)?;
        tracing::info!(group = name, by = %caller, "group deleted (its volumes stay)");
        Ok(())
    }

    /// One snapshot of every member, taken at one instant (see the module's comment).
    pub async fn create_group_snapshot(
        &self,
        caller: &Caller,
        group: &str,
        req: CreateGroupSnapshot,
    ) -> Result<GroupSnapshotView> {
        caller.may(Access::Snapshot)?;
        let group = &Self::group_name(caller, group)?;
        self.take_group_snapshot(caller, group, req, Taker::Hand).await
    }

    /// A group snapshot by hand or by a policy (`taker`: whose quotas it counts toward).
    pub(super) async fn take_group_snapshot(
        &self,
        caller: &Caller,
        group: &str,
        req: CreateGroupSnapshot,
        taker: Taker,
    ) -> Result<GroupSnapshotView> {
        validate_name("snapshot", &req.name)?;
        let consistency = match req.consistency.as_deref() {
            None | Some("crash") => "crash",
            Some("application") => "application",
            Some(other) => {
                return Err(Error::Invalid(format!("consistency '{other}' is neither 'crash' nor 'application'")))
            }
        };
        let members = {
            let st = self.lifecycle.lock();
            let g = Self::group_record(&st, group)?;
            if st.group_snapshots.values().any(|s| s.group == group && s.name == req.name) {
                return Err(Error::Engine(crate::engine::EngineError::AlreadyExists(format!(
                    "group '{group}' already has a snapshot named '{}'",
                    req.name
                ))));
            }
            g.members
        };
        // Each member's snapshot counts toward its volume's quotas and task limits.
        let mut slots = Vec::with_capacity(members.len());
        for m in &members {
            let info = self.live_volume(caller, m)?;
            slots.push(self.snapshot_allowed(&info, taker).await?);
        }
        let tag = GroupTag {
            id: rand::random::<u64>().max(1),
            group: group.to_string(),
            application: consistency == "application",
        };
        let id = group_snapshot_id(tag.id);
        // No intent is recorded first: the cut's record carries the tag, and a crash after it
        // is settled at start from the engine (`settle_groups`).
        let (vols, name, description) = (members.clone(), req.name.clone(), req.description.clone());
        let cut = if req.durable {
            let e = self.engine.clone();
            super::blocking(move || -> crate::engine::Result<Vec<crate::engine::SnapshotInfo>> {
                let snaps = e.create_group_snapshot(&vols, &name, &description, &tag)?;
                snaps.iter().map(|s| e.make_durable(&s.id).and_then(|()| e.snapshot(&s.id))).collect()
            })
            .await
        } else {
            // Right here, as a single create: it waits for no disk sync, and a hop to a
            // blocking thread and back costs more than the cut on a loaded machine.
            self.engine.create_group_snapshot(&vols, &name, &description, &tag).map_err(Error::from)
        };
        drop(slots);
        let snaps: Vec<crate::engine::SnapshotInfo> = cut?;
        let record = GroupSnapshotRecord {
            group: group.to_string(),
            name: req.name.clone(),
            description: req.description.clone(),
            created: snaps.first().map_or_else(|| self.engine.clock().now(), |s| s.created),
            members: snaps.iter().map(|s| (s.volume_id.clone(), s.id.clone())).collect(),
            consistency: consistency.into(),
            degraded: false,
            pending: false,
            published: None,
            deleting: false,
        };
        {
            let mut st = self.lifecycle.lock();
            st.group_snapshots.insert(id.clone(), record.clone());
            st.touch(Key::GroupSnapshot(id.clone()));
            // Not synced: a crash that takes this line is settled at start from the engine's
            // tags (`settle_groups`).
            self.lifecycle_file.save_unsynced(&mut st)?;
        }
        self.store.snapshots_created(&snaps)?;
        self.events_all(snaps.iter().map(|s| super::Event::SnapshotTaken {
            volume: s.volume.clone(),
            snapshot: s.name.clone(),
            id: s.id.clone(),
            by: format!("{caller} (group {group})"),
        }));
        tracing::info!(group, name = %req.name, id = %id, members = snaps.len(), by = %caller, "group snapshot taken");
        Ok(self.group_snapshot_view(&id, &record))
    }

    fn group_snapshot_view(&self, id: &str, r: &GroupSnapshotRecord) -> GroupSnapshotView {
        let members = r
            .members
            .iter()
            .map(|(volume_id, snapshot_id)| {
                let snap = self.engine.snapshot(snapshot_id).ok();
                GroupSnapshotMember {
                    volume: self.member_view(volume_id).volume,
                    volume_id: volume_id.clone(),
                    snapshot_id: snapshot_id.clone(),
                    present: snap.is_some(),
                    size: snap.as_ref().map_or(0, |s| s.size),
                    upload: self
                        .store
                        .status(snapshot_id)
                        .and_then(|u| serde_json::to_value(u.state).ok())
                        .and_then(|v| v.as_str().map(String::from)),
                }
            })
            .collect();
        GroupSnapshotView {
            id: id.to_string(),
            group: r.group.clone(),
            name: r.name.clone(),
            description: r.description.clone(),
            created: r.created,
            consistency: r.consistency.clone(),
            degraded: r.degraded,
            members,
        }
    }

    /// A group snapshot by `GROUP@SNAPSHOT` or id (`g-…`).
    fn find_group_snapshot(st: &LifecycleState, caller: &Caller, r: &str) -> Result<(String, GroupSnapshotRecord)> {
        let found = match r.split_once('@') {
            Some((g, s)) => {
                let g = caller.qualify(g);
                st.group_snapshots.iter().find(|(_, x)| x.group == g && x.name == s && x.listed())
            }
            None => st.group_snapshots.get_key_value(r).filter(|(_, x)| x.listed()),
        }
        .filter(|(_, x)| caller.sees(&x.group));
        found.map(|(id, x)| (id.clone(), x.clone())).ok_or_else(|| {
            Error::NotFound(format!("no group snapshot '{r}' (list them with: snapblk group snapshot list GROUP)"))
        })
    }

    pub fn list_group_snapshots(&self, caller: &Caller, group: &str) -> Result<Vec<GroupSnapshotView>> {
        caller.may(Access::Read)?;
        let group = &Self::group_name(caller, group)?;
        let st = self.lifecycle.lock();
        Self::group_record(&st, group)?;
        let mut out: Vec<GroupSnapshotView> = st
            .group_snapshots
            .iter()
            .filter(|(_, s)| s.group == *group && s.listed())
            .map(|(id, s)| self.group_snapshot_view(id, s))
            .collect();
        out.sort_by_key(|s| s.created);
        Ok(out)
    }

    pub fn group_snapshot(&self, caller: &Caller, r: &str) -> Result<GroupSnapshotView> {
        caller.may(Access::Read)?;
        let (id, s) = Self::find_group_snapshot(&self.lifecycle.lock(), caller, r)?;
        Ok(self.group_snapshot_view(&id, &s))
    }

    /// Deletes every member's snapshot (each as `snapshot delete` would: to the recycle bin
    /// when it is on), then the group snapshot.
    pub async fn delete_group_snapshot(&self, caller: &Caller, r: &str) -> Result<()> {
        caller.may(Access::Delete)?;
        let (id, s) = Self::find_group_snapshot(&self.lifecycle.lock(), caller, r)?;
        // Holds first: a held member refuses the whole delete before anything goes.
        for (_, snapshot_id) in &s.members {
            if let Ok(snap) = self.live_snapshot(caller, snapshot_id) {
                self.check_not_held(&snap.id, &format!("{}@{}", snap.volume, snap.name))?;
            }
        }
        for (_, snapshot_id) in &s.members {
            if self.live_snapshot(caller, snapshot_id).is_ok() {
                self.delete_member_snapshot(caller, snapshot_id).await?;
            }
        }
        {
            let mut st = self.lifecycle.lock();
            // A published one leaves the region in the background (see `sweep_group_manifests`).
            if s.published.is_some() {
                if let Some(g) = st.group_snapshots.get_mut(&id) {
                    g.deleting = true;
                }
                st.touch(Key::GroupSnapshot(id.clone()));
            } else {
                st.remove_group_snapshot(&id);
            }
            self.save_lifecycle(&mut st)?;
        }
        tracing::info!(group_snapshot = r, id = %id, by = %caller, "group snapshot deleted");
        self.sweep_group_manifests().await;
        Ok(())
    }

    /// Rolls every member back to its snapshot of group snapshot `r`, all or none. Refused
    /// when the group's members are not the snapshot's (saying which differ), when a member's
    /// snapshot was deleted (degraded), and while a member has a writer or is attached,
    /// unless `force` (which disconnects and detaches them first).
    pub async fn rollback_group(&self, caller: &Caller, r: &str, force: bool) -> Result<Vec<super::VolumeView>> {
        caller.may(Access::Delete)?;
        let (g, members) = {
            let st = self.lifecycle.lock();
            let (_, s) = Self::find_group_snapshot(&st, caller, r)?;
            (Self::group_record(&st, &s.group)?, s)
        };
        if members.degraded {
            return Err(Error::Invalid(format!(
                "group snapshot {r} is degraded (a member's snapshot was deleted on its own): roll the remaining members back one by one (snapblk snapshot rollback VOLUME@{})",
                members.name
            )));
        }
        let taken: Vec<&String> = members.members.iter().map(|(v, _)| v).collect();
        let added: Vec<String> =
            g.members.iter().filter(|v| !taken.contains(v)).map(|v| self.member_view(v).volume).collect();
        let removed: Vec<String> =
            taken.iter().filter(|v| !g.members.contains(v)).map(|v| self.member_view(v).volume).collect();
        if !added.is_empty() || !removed.is_empty() {
            let mut diff = Vec::new();
            if !added.is_empty() {
                diff.push(format!("added since: {}", added.join(", ")));
            }
            if !removed.is_empty() {
                diff.push(format!("removed since: {}", removed.join(", ")));
            }
            return Err(Error::Invalid(format!(
                "group '{}' has other members than when {r} was taken ({}); make them the same (snapblk group add/remove) or roll members back one by one",
                members.group,
                diff.join("; ")
            )));
        }
        // Attached members: all refused before any is detached (or, with force, all detached).
        let mut targets = Vec::with_capacity(members.members.len());
        for (volume_id, snapshot_id) in &members.members {
            self.live_volume(caller, volume_id)?;
            let snap = self.live_snapshot(caller, snapshot_id)?;
            if !force {
                if let Some(a) = self.attachments.of_volume(volume_id) {
                    return Err(Error::Engine(crate::engine::EngineError::Busy(format!(
                        "volume '{}' is attached to {}; unmount it and detach it first, or pass --force",
                        a.volume,
                        a.device.display()
                    ))));
                }
            }
            targets.push((snapshot_id.clone(), self.store.region_if_released(&snap)?));
        }
        for (volume_id, _) in &members.members {
            let (a, v) = (self.attachments.clone(), volume_id.clone());
            if let Some(gone) = super::blocking(move || a.before_rollback(&v, force)).await? {
                tracing::warn!(volume = gone.volume, device = %gone.device.display(), "detached for a forced group rollback");
            }
        }
        let infos = self.engine.rollback_group(&targets, force).await?;
        tracing::info!(group_snapshot = r, volumes = infos.len(), by = %caller, "group rolled back");
        Ok(infos
            .into_iter()
            .map(|info| {
                self.volume_loading(&info);
                self.volume_view(info)
            })
            .collect())
    }

    /// The group snapshot snapshot `snapshot_id` is a member of, if any: (id, `GROUP@NAME`).
    pub(super) fn group_of_snapshot(&self, snapshot_id: &str) -> Option<(String, String)> {
        let st = self.lifecycle.lock();
        st.group_snapshots
            .iter()
            .find(|(_, g)| g.listed() && g.members.iter().any(|(_, s)| s == snapshot_id))
            .map(|(id, g)| (id.clone(), format!("{}@{}", g.group, g.name)))
    }

    /// A member's snapshot was deleted on its own (with `--force`): its group snapshot is
    /// degraded from now on.
    pub(super) fn mark_degraded(&self, group_snapshot: &str) -> Result<()> {
        let mut st = self.lifecycle.lock();
        if let Some(g) = st.group_snapshots.get_mut(group_snapshot) {
            g.degraded = true;
            st.touch(Key::GroupSnapshot(group_snapshot.to_string()));
            self.save_lifecycle(&mut st)?;
        }
        Ok(())
    }
}

impl GroupSnapshotRecord {
    /// Shown and usable: its cut happened and it is not being deleted.
    fn listed(&self) -> bool {
        !self.pending && !self.deleting
    }
}

/// Where to restore a group snapshot: volumes named PREFIX + each member volume's name.
#[derive(Debug, Serialize, Deserialize)]
pub struct RestoreGroup {
    pub prefix: String,
    /// Where to find a group snapshot this node does not have (default: every region).
    #[serde(default)]
    pub region: Option<String>,
}

impl Service {
    /// Publishes the group manifest of each group snapshot whose members have all been
    /// uploaded (to one region), and deletes those of deleted group snapshots. Runs with the
    /// scheduler's look; a failure is retried at the next.
    pub(super) async fn sweep_group_manifests(&self) {
        let work: Vec<(String, GroupSnapshotRecord)> = self
            .lifecycle
            .lock()
            .group_snapshots
            .iter()
            .filter(|(_, g)| !g.pending && (g.deleting || (g.published.is_none() && !g.degraded)))
            .map(|(id, g)| (id.clone(), g.clone()))
            .collect();
        for (id, g) in work {
            let done = if g.deleting { self.unpublish(&id, &g).await } else { self.publish(&id, &g).await };
            match done {
                Ok(true) => {
                    let region = self.store.status(&g.members[0].1).map(|u| u.region);
                    let deleted_meanwhile = {
                        let mut st = self.lifecycle.lock();
                        let gone = match (g.deleting, st.group_snapshots.get_mut(&id)) {
                            (true, _) => {
                                st.remove_group_snapshot(&id);
                                false
                            }
                            (false, Some(r)) => {
                                r.published = region.clone();
                                st.touch(Key::GroupSnapshot(id.clone()));
                                false
                            }
                            (false, None) => true,
                        };
                        if let Err(e) = self.save_lifecycle(&mut st) {
                            tracing::warn!(group_snapshot = %id, error = %e, "cannot record a group manifest's state; retried");
                        }
                        gone
                    };
                    // Deleted while its manifest was being written: it goes again at once.
                    if deleted_meanwhile {
                        let gone = GroupSnapshotRecord { published: region, ..g };
                        if let Err(e) = self.unpublish(&id, &gone).await {
                            tracing::warn!(group_snapshot = %id, error = %e, "cannot delete the group manifest of a deleted group snapshot");
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(group_snapshot = %id, error = %e, "group manifest not written yet; retried"),
            }
        }
    }

    /// Writes the group manifest once every member is stored in one region (`Ok(false)`: not yet).
    async fn publish(&self, id: &str, g: &GroupSnapshotRecord) -> Result<bool> {
        let mut region = None;
        let mut members = Vec::with_capacity(g.members.len());
        for (volume_id, snapshot_id) in &g.members {
            let Some(u) = self.store.status(snapshot_id) else { return Ok(false) };
            if u.state != crate::store::UploadState::Available || region.get_or_insert(u.region.clone()) != &u.region {
                return Ok(false);
            }
            let snap = self.engine.snapshot(snapshot_id)?;
            members.push(crate::store::format::GroupMemberJson {
                volume_id: volume_id.clone(),
                volume_name: snap.volume,
                snapshot_id: snapshot_id.clone(),
            });
        }
        let Some(region) = region else { return Ok(false) };
        let manifest = crate::store::format::GroupManifest {
            format: crate::store::format::FORMAT_VERSION,
            id: id.to_string(),
            group: g.group.clone(),
            name: g.name.clone(),
            description: g.description.clone(),
            created: g.created,
            consistency: g.consistency.clone(),
            members,
        };
        self.store.region(&region).await?.put_group_manifest(&manifest).await?;
        tracing::info!(group_snapshot = %id, %region, "group snapshot published in the store");
        Ok(true)
    }

    async fn unpublish(&self, id: &str, g: &GroupSnapshotRecord) -> Result<bool> {
        if let Some(region) = &g.published {
            if self.store.check_region(region).is_ok() {
                self.store.region(region).await?.delete_group_manifest(id).await?;
            }
        }
        Ok(true)
    }

    /// Group snapshots published in a region, by any node.
    pub async fn region_group_snapshots(
        &self,
        caller: &Caller,
        region: &str,
    ) -> Result<Vec<crate::store::format::GroupManifest>> {
        caller.may(Access::Read)?;
        let mut all = self.store.region(&caller.repository(region)?).await?.group_manifests().await?;
        all.retain(|g| caller.sees(&g.group));
        Ok(all)
    }

    /// One volume per member of group snapshot `r` (`GROUP@SNAPSHOT` or `g-…`), named
    /// `prefix` + the member volume's name, each usable at once and loading as
    /// `volume create --from-snapshot` does. A group snapshot this node does not have is
    /// looked up in `region` (or every region). All or none: names are checked first, and
    /// volumes made before a failure are deleted.
    pub async fn restore_group(&self, caller: &Caller, r: &str, req: RestoreGroup) -> Result<Vec<super::VolumeView>> {
        caller.may(Access::Restore)?;
        let local = Self::find_group_snapshot(&self.lifecycle.lock(), caller, r);
        let (members, region): (Vec<(String, String)>, Option<String>) = match local {
            Ok((_, g)) => {
                let mut out = Vec::new();
                for (_, snapshot_id) in &g.members {
                    let snap = self.live_snapshot(caller, snapshot_id)?;
                    out.push((snap.volume, snapshot_id.clone()));
                }
                (out, req.region.clone())
            }
            Err(_) => {
                let repository = req.region.as_deref().map(|reg| caller.repository(reg)).transpose()?;
                let names = self.store.repositories(caller.account(), repository.as_deref());
                let mut found = None;
                for name in names {
                    let gs = self.store.region(&name).await?.group_manifests().await?;
                    let named = caller.qualify_ref(r);
                    let found_here = gs
                        .into_iter()
                        .find(|g| (g.id == r || format!("{}@{}", g.group, g.name) == named) && caller.sees(&g.group));
                    if let Some(g) = found_here {
                        found = Some((g, name));
                        break;
                    }
                }
                let Some((g, name)) = found else {
                    return Err(Error::NotFound(format!(
                        "no group snapshot '{r}' here or in the store (list them with: snapblk group snapshot list --region REGION)"
                    )));
                };
                (g.members.into_iter().map(|m| (m.volume_name, m.snapshot_id)).collect(), Some(name))
            }
        };
        // `PREFIX` + the member's name, in the member's account.
        let restored_name = |volume: &str| {
            let bare = volume.rsplit('/').next().unwrap_or(volume);
            super::accounts::owned_name(super::owner_of(volume), &format!("{}{bare}", req.prefix))
        };
        for (volume, _) in &members {
            let name = restored_name(volume);
            crate::engine::validate_owned_name("volume", &name)?;
            if self.engine.volume(&name).is_ok() {
                return Err(Error::Engine(crate::engine::EngineError::AlreadyExists(format!(
                    "volume '{name}' exists already; choose another --prefix"
                ))));
            }
        }
        let mut made: Vec<super::VolumeView> = Vec::new();
        for (volume, snapshot_id) in &members {
            let name = restored_name(volume);
            match self.create_from_snapshot(caller, &name, snapshot_id, region.as_deref()).await {
                Ok(v) => made.push(v),
                Err(e) => {
                    for v in &made {
                        if let Err(e) = self.delete_volume(&Caller::Daemon("group restore"), &v.info.id).await {
                            tracing::warn!(volume = %v.info.name, error = %e, "cannot delete a volume of a failed group restore");
                        }
                    }
                    return Err(e);
                }
            }
        }
        tracing::info!(group_snapshot = r, prefix = %req.prefix, volumes = made.len(), by = %caller, "group snapshot restored");
        Ok(made)
    }
}

impl LifecycleState {
    /// After a start, reconciles the group snapshots with the engine, whose cut records are
    /// the truth (all members or none, each carrying the group snapshot's tag):
    /// - one the engine has and this state lacks (the unsynced record was lost) is rebuilt
    ///   from its members' tags, unless it was deleted here (members in the recycle bin);
    /// - a record none of whose members the engine has (a power loss undid its cut, or every
    ///   member was deleted on its own) is dropped — or, published, left to the sweep to
    ///   delete from the region;
    /// - an intent of a daemon before journal version 7 (`pending`) gets its members' ids if
    ///   its cut happened and is dropped if not.
    pub fn settle_groups(&mut self, engine: &Engine) {
        let tagged = engine.group_snapshots();
        let snapshots: std::collections::HashSet<String> =
            engine.list_snapshots(None).unwrap_or_default().into_iter().map(|s| s.id).collect();
        let carried: std::collections::HashSet<String> = tagged.iter().map(|g| group_snapshot_id(g.tag.id)).collect();
        for g in tagged {
            let id = group_snapshot_id(g.tag.id);
            if self.group_snapshots.contains_key(&id) || self.deleted_group_snapshots.contains(&id) {
                continue;
            }
            tracing::info!(group_snapshot = %id, group = %g.tag.group, name = %g.name, "a group snapshot taken just before the daemon stopped is recorded from the engine");
            let record = GroupSnapshotRecord {
                group: g.tag.group,
                name: g.name,
                description: g.description,
                created: g.created,
                members: g.members,
                consistency: if g.tag.application { "application" } else { "crash" }.into(),
                degraded: false,
                pending: false,
                published: None,
                deleting: false,
            };
            self.group_snapshots.insert(id.clone(), record);
            self.touch(Key::GroupSnapshot(id));
        }
        let forgotten: Vec<String> =
            self.deleted_group_snapshots.iter().filter(|id| !carried.contains(*id)).cloned().collect();
        for id in forgotten {
            self.deleted_group_snapshots.remove(&id);
            self.touch(Key::DeletedGroupSnapshot(id));
        }
        let undone: Vec<String> = self
            .group_snapshots
            .iter()
            .filter(|(_, g)| !g.pending && !g.deleting && !g.members.iter().any(|(_, s)| snapshots.contains(s)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in undone {
            if let Some(g) = self.group_snapshots.get_mut(&id) {
                if g.published.is_some() {
                    g.deleting = true;
                } else {
                    self.group_snapshots.remove(&id);
                }
            }
            tracing::info!(group_snapshot = %id, "a group snapshot none of whose members exist is dropped");
            self.touch(Key::GroupSnapshot(id));
        }
        let pending: Vec<String> =
            self.group_snapshots.iter().filter(|(_, g)| g.pending).map(|(id, _)| id.clone()).collect();
        for id in pending {
            let Some(g) = self.group_snapshots.get_mut(&id) else { continue };
            let found: Option<Vec<String>> =
                g.members.iter().map(|(v, _)| engine.snapshot(&format!("{v}@{}", g.name)).ok().map(|s| s.id)).collect();
            match found {
                Some(ids) => {
                    for ((_, s), found) in g.members.iter_mut().zip(ids) {
                        *s = found;
                    }
                    g.pending = false;
                    tracing::info!(group_snapshot = %id, "a group snapshot interrupted after its cut is complete");
                }
                None => {
                    self.group_snapshots.remove(&id);
                    tracing::info!(group_snapshot = %id, "a group snapshot interrupted before its cut was dropped");
                }
            }
            self.touch(Key::GroupSnapshot(id));
        }
        // Policies' books of groups: a group snapshot a tick was creating is booked if its
        // cut happened; ids of group snapshots that are gone are dropped.
        // (Saved whole by the compaction that follows at start.)
        let LifecycleState { books, group_snapshots, groups, policies, .. } = self;
        for p in policies.values_mut() {
            p.groups.retain(|g| groups.contains_key(g));
        }
        for books in books.values_mut() {
            books.retain(|key, _| key.strip_prefix("group:").is_none_or(|g| groups.contains_key(g)));
            for (key, book) in books.iter_mut() {
                let Some(group) = key.strip_prefix("group:") else { continue };
                if let Some(name) = book.creating.take() {
                    let found = group_snapshots.iter().find(|(_, g)| g.group == group && g.name == name && !g.pending);
                    if let Some((id, _)) = found.filter(|(id, _)| !book.snapshots.contains(id)) {
                        book.snapshots.push(id.clone());
                    }
                }
                book.snapshots.retain(|id| group_snapshots.contains_key(id));
            }
        }
    }
}
