//! The recycle bin, and volumes deleted while snapshots of them remain.
//!
//! With `[recycle_bin] retention` above zero, [`Service::delete_snapshot`] (by hand or by
//! retention) moves a snapshot to the bin instead of deleting it: it stays complete in the
//! engine and in the store — so GC keeps its data — and is hidden from lists, exports and
//! every operation but `restore-deleted` and `recycle-bin purge`; the sweep deletes it for good
//! when its time is up. A volume deleted while snapshots of it remain (in the bin, or policy
//! snapshots kept by `on_volume_delete = keep`) is hidden the same way until its last
//! snapshot goes; restoring one of its snapshots from the bin brings it back as it was.
//!
//! A locked bin (`lock = true`) cannot be purged, and its retention cannot be shortened,
//! until `unlock_delay` after an unlock request: a stolen credential cannot empty it at once.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::events::Event;
use super::lifecycle::{BinLock, Binned, DeletedVolume, Key, LifecycleState};
use super::{blocking, Access, Caller, Error, Result, Service, SnapshotView};
use crate::engine::EngineError;
use crate::engine::{SnapshotInfo, VolumeInfo};
use crate::store::RecycleBinConfig;
use crate::units::{duration_text, utc};

/// A snapshot in the bin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BinnedView {
    pub id: String,
    #[serde(flatten)]
    pub entry: Binned,
}

/// `recycle-bin list`: what the bin holds and how it is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BinView {
    /// Seconds a deleted snapshot is kept; 0: the bin is off.
    pub retention: u64,
    pub lock: Option<BinLock>,
    pub snapshots: Vec<BinnedView>,
}

/// `recycle-bin purge [SNAPSHOT]`: one snapshot, or everything in the bin.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PurgeRequest {
    #[serde(default)]
    pub snapshot: Option<String>,
}

impl LifecycleState {
    /// At start: `lock = true` locks the bin unless it is locked already. Whether it changed.
    pub fn lock_bin_at_start(&mut self, config: &RecycleBinConfig, now: u64) -> bool {
        if let Some(l) = &self.bin_lock {
            if config.retention.as_secs() < l.retention {
                tracing::warn!(
                    configured = %duration_text(config.retention.as_secs()),
                    locked = %duration_text(l.retention),
                    "the recycle bin is locked: its retention stays at the locked one until it is unlocked"
                );
            }
            return false;
        }
        if !config.lock {
            return false;
        }
        self.bin_lock = Some(BinLock { since: now, retention: config.retention.as_secs(), unlock_at: None });
        self.touch(Key::BinLock);
        true
    }
}

impl Service {
    /// The bin's retention in force, in seconds (0: off). A lock keeps it from shrinking.
    fn bin_retention(&self, st: &LifecycleState) -> u64 {
        let configured = self.store.config.recycle_bin.retention.as_secs();
        st.bin_lock.as_ref().map_or(configured, |l| configured.max(l.retention))
    }

    /// A volume that exists for its users: not deleted.
    pub(super) fn live_volume(&self, caller: &Caller, r: &str) -> Result<VolumeInfo> {
        let info = self.own_volume(caller, r)?;
        // A snapshot being written through the EBS direct API: its staging volume is no one's.
        if super::is_staging_name(&info.name) {
            return Err(Error::NotFound(format!("no volume named '{r}'; list volumes with: snapblk volume list")));
        }
        match self.lifecycle.lock().deleted_volumes.get(&info.id) {
            None => Ok(info),
            Some(_) => Err(Error::NotFound(format!("no volume named '{r}' (it was deleted)"))),
        }
    }

    /// A volume of the caller's account (one deleted for its users included).
    pub(super) fn own_volume(&self, caller: &Caller, r: &str) -> Result<VolumeInfo> {
        let info = self.engine.volume(&caller.qualify_ref(r))?;
        // Another account's volume is missing, as far as its caller can tell.
        if !caller.sees(&info.name) {
            return Err(Error::Engine(EngineError::NotFound(format!(
                "no volume named '{r}'; list volumes with: snapblk volume list"
            ))));
        }
        Ok(info)
    }

    /// A snapshot that exists for its users: not in the bin. One in the bin is reported with
    /// how to get it back.
    pub(super) fn live_snapshot(&self, caller: &Caller, r: &str) -> Result<SnapshotInfo> {
        let q = caller.qualify_ref(r);
        let hidden = || {
            Error::Engine(EngineError::NotFound(match r.split_once('@') {
                Some((volume, _)) => format!("no volume named '{volume}'; list volumes with: snapblk volume list"),
                None => format!("no snapshot with id {r}; list them with: snapblk snapshot list"),
            }))
        };
        // Looked up only in the caller's volumes: the engine's "no snapshot named ..." of
        // another account's volume would tell that the volume exists.
        if q.split_once('@').is_some_and(|(volume, _)| !caller.sees(volume)) {
            return Err(hidden());
        }
        let info = self.engine.snapshot(&q)?;
        if !caller.sees(&info.volume) {
            return Err(hidden());
        }
        match self.lifecycle.lock().bin.get(&info.id) {
            None => Ok(info),
            Some(b) if b.deleting => {
                Err(Error::NotFound(format!("snapshot {}@{} was deleted (by {})", b.volume, b.name, b.by)))
            }
            Some(b) => Err(Error::NotFound(format!(
                "snapshot {}@{} is in the recycle bin (deleted {}); restore it with: snapblk snapshot restore-deleted {}",
                b.volume,
                b.name,
                utc(b.deleted_at),
                info.id
            ))),
        }
    }

    /// Export names (`VOLUME`, `VOLUME@SNAPSHOT`) of deleted volumes and binned snapshots.
    pub(super) fn hidden_exports(&self) -> HashSet<String> {
        let st = self.lifecycle.lock();
        let mut hidden: HashSet<String> = st.deleted_volumes.values().map(|v| v.name.clone()).collect();
        hidden.extend(st.bin.values().map(|b| format!("{}@{}", b.volume, b.name)));
        hidden
    }

    /// Moves a snapshot to the bin if the bin is on; false if it is off (delete it for good).
    ///
    /// `later` (retention's deletes): with the bin off too, the snapshot is hidden at once and
    /// deleted for good by the next sweep, off the tick — a delete costs the engine a walk of
    /// every snapshot's map (to free the slots none references any more). And the state is
    /// not saved here: the tick saves it when it ends (a crash before undoes the delete, which
    /// the next tick's retention does again).
    pub(super) fn to_bin(&self, caller: &Caller, snap: &SnapshotInfo, later: bool) -> Result<bool> {
        let now = self.engine.clock().now();
        {
            let mut st = self.lifecycle.lock();
            let retention = self.bin_retention(&st);
            if retention == 0 && !later {
                return Ok(false);
            }
            let entry = Binned {
                volume_id: snap.volume_id.clone(),
                volume: snap.volume.clone(),
                name: snap.name.clone(),
                deleted_at: now,
                expires_at: now + retention,
                by: caller.to_string(),
                deleting: retention == 0,
            };
            st.bin.insert(snap.id.clone(), entry);
            st.touch(Key::Bin(snap.id.clone()));
            // It leaves the policies' books: a restored snapshot is nobody's to prune.
            st.unbook(&snap.id, &snap.volume_id);
            if !later {
                self.save_lifecycle(&mut st)?;
            }
            if retention == 0 {
                return Ok(false);
            }
        }
        tracing::info!(snapshot = %snap.id, volume = %snap.volume, name = %snap.name, by = %caller, "snapshot moved to the recycle bin");
        Ok(true)
    }

    pub fn recycle_bin(&self, caller: &Caller) -> Result<BinView> {
        caller.may(Access::Read)?;
        let st = self.lifecycle.lock();
        Ok(BinView {
            retention: self.bin_retention(&st),
            lock: st.bin_lock.clone(),
            snapshots: st
                .bin
                .iter()
                .filter(|(_, e)| !e.deleting && caller.sees(&e.volume))
                .map(|(id, e)| BinnedView { id: id.clone(), entry: e.clone() })
                .collect(),
        })
    }

    /// Takes a snapshot out of the bin, as it was (with its volume, if that was deleted).
    pub fn restore_deleted(&self, caller: &Caller, r: &str) -> Result<SnapshotView> {
        caller.may(Access::Manage)?;
        let snap = self
            .engine
            .snapshot(&caller.qualify_ref(r))
            .ok()
            .filter(|s| caller.sees(&s.volume))
            .ok_or_else(|| self.not_in_bin(r))?;
        {
            let mut st = self.lifecycle.lock();
            if st.bin.get(&snap.id).is_none_or(|b| b.deleting) {
                return Err(self.not_in_bin(r));
            }
            st.bin.remove(&snap.id);
            st.deleted_volumes.remove(&snap.volume_id);
            st.touch(Key::Bin(snap.id.clone()));
            st.touch(Key::DeletedVolume(snap.volume_id.clone()));
            self.save_lifecycle(&mut st)?;
        }
        tracing::info!(snapshot = %snap.id, volume = %snap.volume, name = %snap.name, by = %caller, "snapshot restored from the recycle bin");
        self.event(Event::SnapshotRestored {
            volume: snap.volume.clone(),
            snapshot: snap.name.clone(),
            id: snap.id.clone(),
            by: caller.to_string(),
        });
        self.snapshot(caller, &snap.id)
    }

    fn not_in_bin(&self, r: &str) -> Error {
        Error::NotFound(format!("snapshot '{r}' is not in the recycle bin; list it with: snapblk recycle-bin list"))
    }

    /// Deletes snapshots in the bin for good: one, or all. Refused while the bin is locked.
    pub async fn purge_bin(&self, caller: &Caller, req: PurgeRequest) -> Result<Vec<String>> {
        caller.may(Access::Admin)?;
        let ids: Vec<String> = {
            let st = self.lifecycle.lock();
            if let Some(l) = &st.bin_lock {
                let unlock = match l.unlock_at {
                    Some(t) => format!("it unlocks at {}", utc(t)),
                    None => {
                        "request an unlock with: snapblk recycle-bin unlock (it takes effect after unlock_delay)".into()
                    }
                };
                return Err(Error::Held(format!(
                    "the recycle bin is locked (since {}): nothing leaves it before its time; {unlock}",
                    utc(l.since)
                )));
            }
            match &req.snapshot {
                None => st.bin.iter().filter(|(_, b)| !b.deleting).map(|(id, _)| id.clone()).collect(),
                Some(r) => {
                    let id = self.engine.snapshot(r).map_err(|_| self.not_in_bin(r))?.id;
                    if st.bin.get(&id).is_none_or(|b| b.deleting) {
                        return Err(self.not_in_bin(r));
                    }
                    vec![id]
                }
            }
        };
        let mut purged = Vec::new();
        for id in ids {
            let Ok(snap) = self.engine.snapshot(&id) else { continue };
            self.delete_for_good(caller, &snap).await?;
            let by = caller.to_string();
            self.event(Event::SnapshotPurged { volume: snap.volume, snapshot: snap.name, id: id.clone(), by });
            purged.push(id);
        }
        Ok(purged)
    }

    /// Locks the bin now (with the retention in force).
    pub fn lock_bin(&self, caller: &Caller) -> Result<BinView> {
        caller.may(Access::Admin)?;
        {
            let mut st = self.lifecycle.lock();
            let retention = self.bin_retention(&st);
            if retention == 0 {
                return Err(Error::Invalid(
                    "the recycle bin is off: set [recycle_bin] retention in snapblk.toml and restart first".into(),
                ));
            }
            match &mut st.bin_lock {
                Some(l) => l.unlock_at = None,
                None => st.bin_lock = Some(BinLock { since: self.engine.clock().now(), retention, unlock_at: None }),
            }
            st.touch(Key::BinLock);
            self.save_lifecycle(&mut st)?;
        }
        tracing::info!(by = %caller, "recycle bin locked");
        self.recycle_bin(caller)
    }

    /// Requests an unlock: it takes effect `unlock_delay` from now (from the first request).
    pub fn unlock_bin(&self, caller: &Caller) -> Result<BinView> {
        caller.may(Access::Admin)?;
        {
            let mut st = self.lifecycle.lock();
            let at = self.engine.clock().now() + self.store.config.recycle_bin.unlock_delay.as_secs();
            match &mut st.bin_lock {
                None => return Err(Error::Invalid("the recycle bin is not locked".into())),
                Some(l) if l.unlock_at.is_some() => {}
                Some(l) => {
                    l.unlock_at = Some(at);
                    st.touch(Key::BinLock);
                    self.save_lifecycle(&mut st)?;
                    tracing::warn!(by = %caller, at = %utc(at), "recycle bin unlock requested");
                }
            }
        }
        self.recycle_bin(caller)
    }

    /// Deletes for good what the bin held long enough, lifts a lock whose unlock came due,
    /// and deletes volumes whose last snapshot went. The scheduler calls it.
    pub(super) async fn sweep_bin(&self) {
        let now = self.engine.clock().now();
        let (expired, volumes) = {
            let mut st = self.lifecycle.lock();
            if st.bin_lock.as_ref().and_then(|l| l.unlock_at).is_some_and(|t| t <= now) {
                st.bin_lock = None;
                st.touch(Key::BinLock);
                if let Err(e) = self.save_lifecycle(&mut st) {
                    tracing::error!(error = %e, "cannot record the recycle bin's unlock");
                } else {
                    tracing::warn!("recycle bin unlocked");
                }
            }
            let expired: Vec<(String, bool)> =
                st.bin.iter().filter(|(_, b)| b.expires_at <= now).map(|(id, b)| (id.clone(), b.deleting)).collect();
            (expired, st.deleted_volumes.keys().cloned().collect::<Vec<_>>())
        };
        let caller = Caller::Daemon("recycle bin");
        for (id, deleting) in expired {
            let Ok(snap) = self.engine.snapshot(&id) else { continue };
            match self.delete_for_good(&caller, &snap).await {
                // (Retention's deletes were told when retention decided them.)
                Ok(()) if deleting => {}
                Ok(()) => self.event(Event::SnapshotExpired {
                    volume: snap.volume,
                    snapshot: snap.name,
                    id,
                    by: caller.to_string(),
                    to_bin: false,
                }),
                Err(e) => {
                    tracing::warn!(snapshot = %id, error = %e, "cannot delete an expired snapshot of the recycle bin yet; will retry")
                }
            }
        }
        for v in volumes {
            self.volume_gone_if_empty(&v).await;
        }
    }

    /// Deletes a deleted volume for good once no snapshot of it remains.
    pub(super) async fn volume_gone_if_empty(&self, volume_id: &str) {
        if !self.lifecycle.lock().deleted_volumes.contains_key(volume_id) {
            return;
        }
        if !self.engine.list_snapshots(Some(volume_id)).is_ok_and(|s| s.is_empty()) {
            return;
        }
        let (e, v) = (self.engine.clone(), volume_id.to_string());
        if let Err(err) = blocking(move || e.delete_volume(&v)).await {
            tracing::warn!(volume = %volume_id, error = %err, "cannot delete a deleted volume's remains yet; will retry");
            return;
        }
        {
            let mut st = self.lifecycle.lock();
            st.deleted_volumes.remove(volume_id);
            st.touch(Key::DeletedVolume(volume_id.to_string()));
        }
        self.forget_volume(volume_id);
        if let Err(e) = self.store.volume_deleted(volume_id) {
            tracing::warn!(volume = %volume_id, error = %e, "cannot record a deleted volume in the store's books");
        }
    }

    /// Hides a volume that still has snapshots, as deleted (see the module's comment).
    pub(super) fn mark_volume_deleted(&self, info: &VolumeInfo) -> Result<()> {
        let mut st = self.lifecycle.lock();
        st.deleted_volumes
            .insert(info.id.clone(), DeletedVolume { name: info.name.clone(), deleted_at: self.engine.clock().now() });
        st.touch(Key::DeletedVolume(info.id.clone()));
        st.drop_volume(&info.id);
        self.save_lifecycle(&mut st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::engine::ErrorKind;
    use crate::policy::OnVolumeDelete;
    use crate::service::testing::{hourly, service, ts, volume};
    use crate::service::{CreatePolicy, CreateSnapshot, PolicyTarget, PolicyVolumes};

    fn snap(name: &str) -> CreateSnapshot {
        CreateSnapshot { name: name.into(), description: String::new(), durable: false }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_snapshot_waits_hidden_in_the_bin_until_restored_or_its_time_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(ts("2026-12-01T00:00:00Z"));
        let svc = service(dir.path(), clock.clone(), "[recycle_bin]\nretention = \"7d\"\n");
        let me = Caller::Local;
        volume(&svc, "v").await;
        let s1 = svc.create_snapshot(&me, "v", snap("s1")).await.unwrap().info;
        svc.create_snapshot(&me, "v", snap("s2")).await.unwrap();
        svc.delete_snapshot(&me, "v@s1").await.unwrap();

        // Gone for its users: lists, show, exports, a second delete.
        assert_eq!(svc.list_snapshots(&me, Some("v")).unwrap().len(), 1);
        let err = svc.snapshot(&me, "v@s1").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.to_string().contains("restore-deleted"), "{err}");
        assert!(!svc.export_names(&me).unwrap().iter().any(|(n, _)| n == "v@s1"));
        assert!(svc.open_export(&me, "v@s1").is_err());
        assert_eq!(svc.delete_snapshot(&me, "v@s1").await.unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(svc.volume(&me, "v").unwrap().info.snapshots, 1);
        // Its name stays taken, and the refusal says why.
        let err = svc.create_snapshot(&me, "v", snap("s1")).await.unwrap_err();
        assert!(err.to_string().contains("recycle bin"), "{err}");
        // But it is all there, and comes back as it was.
        let bin = svc.recycle_bin(&me).unwrap();
        assert_eq!((bin.retention, bin.snapshots.len()), (7 * 86_400, 1));
        assert_eq!(bin.snapshots[0].entry.expires_at, ts("2026-12-08T00:00:00Z"));
        let back = svc.restore_deleted(&me, &s1.id).unwrap();
        assert_eq!((back.info.id, back.info.name), (s1.id.clone(), "s1".to_string()));
        assert!(svc.recycle_bin(&me).unwrap().snapshots.is_empty());

        // Deleted again, it goes for good once its time is up (not a second before).
        svc.delete_snapshot(&me, "v@s1").await.unwrap();
        clock.advance(7 * 86_400 - 1);
        svc.sweep_bin().await;
        assert!(svc.engine.snapshot(&s1.id).is_ok());
        clock.advance(1);
        svc.sweep_bin().await;
        assert!(svc.engine.snapshot(&s1.id).is_err(), "expired: deleted for good");
        assert!(svc.recycle_bin(&me).unwrap().snapshots.is_empty());
        assert!(svc.restore_deleted(&me, &s1.id).is_err());
        let kinds: Vec<String> = svc
            .events(&me, Default::default())
            .await
            .unwrap()
            .iter()
            .map(|e| serde_json::to_value(&e.event).unwrap()["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "snapshot_taken",
                "snapshot_taken",
                "snapshot_deleted",
                "snapshot_restored",
                "snapshot_deleted",
                "snapshot_expired"
            ]
        );
        svc.engine.stop_background();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_locked_bin_is_not_purged_until_unlock_delay_after_an_unlock_request() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(ts("2026-12-01T00:00:00Z"));
        let config = "[recycle_bin]\nretention = \"30d\"\nlock = true\nunlock_delay = \"2d\"\n";
        let svc = service(dir.path(), clock.clone(), config);
        let me = Caller::Local;
        volume(&svc, "v").await;
        let s = svc.create_snapshot(&me, "v", snap("s")).await.unwrap().info;
        svc.delete_snapshot(&me, "v@s").await.unwrap();
        let all = PurgeRequest { snapshot: None };
        let err = svc.purge_bin(&me, all.clone()).await.unwrap_err();
        assert!(err.to_string().contains("locked"), "{err}");
        svc.unlock_bin(&me).unwrap();
        clock.advance(2 * 86_400 - 1);
        svc.sweep_bin().await;
        assert!(svc.purge_bin(&me, all.clone()).await.is_err(), "still locked a second before");
        // A second request does not move the unlock later (or earlier).
        assert_eq!(svc.unlock_bin(&me).unwrap().lock.unwrap().unlock_at, Some(ts("2026-12-03T00:00:00Z")));
        clock.advance(1);
        svc.sweep_bin().await;
        assert_eq!(svc.purge_bin(&me, all).await.unwrap(), vec![s.id.clone()]);
        assert!(svc.engine.snapshot(&s.id).is_err());
        svc.engine.stop_background();

        // A restart with a shorter retention in the config keeps the locked one.
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path(), clock.clone(), config);
        svc.engine.stop_background();
        drop(svc);
        let svc = service(dir.path(), clock.clone(), "[recycle_bin]\nretention = \"1d\"\n");
        assert_eq!(svc.recycle_bin(&me).unwrap().retention, 30 * 86_400);
        svc.engine.stop_background();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_volume_keeps_or_drops_its_policy_snapshots_as_each_policy_says() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(ts("2026-12-01T00:00:00Z"));
        let svc = service(dir.path(), clock.clone(), "[recycle_bin]\nretention = \"1d\"\n");
        let me = Caller::Local;
        let policy = |name: &str, on_volume_delete| CreatePolicy { on_volume_delete, ..hourly(name, 10) };
        svc.create_policy(&me, policy("keep", OnVolumeDelete::Keep)).unwrap();
        svc.create_policy(&me, policy("apply", OnVolumeDelete::Apply)).unwrap();
        for (v, p) in [("a", "keep"), ("b", "apply")] {
            volume(&svc, v).await;
            svc.apply_policy(&me, p, PolicyVolumes { volumes: vec![v.into()], groups: vec![] }).unwrap();
            svc.run_policy_now(&me, p, PolicyTarget::default()).await.unwrap();
        }
        // A snapshot taken by hand blocks the delete, as before.
        svc.create_snapshot(&me, "a", snap("by-hand")).await.unwrap();
        let err = svc.delete_volume(&me, "a").await.unwrap_err();
        assert!(err.to_string().contains("by hand"), "{err}");
        svc.delete_snapshot(&me, "a@by-hand").await.unwrap();

        // keep: the volume is gone for its users, its policy snapshot stays listed.
        svc.delete_volume(&me, "a").await.unwrap();
        assert!(svc.volume(&me, "a").is_err());
        assert!(!svc.list_volumes(&me).unwrap().iter().any(|v| v.info.name == "a"));
        let left = svc.list_snapshots(&me, Some("a")).unwrap();
        assert_eq!(left.len(), 1);
        assert!(left[0].volume_deleted);
        assert!(svc.open_export(&me, "a").is_err());
        assert!(svc.open_export(&me, &format!("a@{}", left[0].info.name)).is_ok(), "a kept snapshot stays readable");
        assert!(svc.rollback(&me, &left[0].info.id, Default::default()).await.is_err());
        // ... until it goes too (here by hand, into the bin and out at its time).
        svc.delete_snapshot(&me, &left[0].info.id).await.unwrap();
        clock.advance(86_400);
        svc.sweep_bin().await;
        assert!(svc.engine.volume("a").is_err(), "the volume is deleted for good with its last snapshot");

        // apply: the policy's snapshots go with the volume (into the bin); restoring one brings
        // the volume back.
        svc.delete_volume(&me, "b").await.unwrap();
        assert!(svc.volume(&me, "b").is_err());
        let binned = svc.recycle_bin(&me).unwrap().snapshots;
        assert_eq!(binned.len(), 1);
        svc.restore_deleted(&me, &binned[0].id).unwrap();
        assert_eq!(svc.volume(&me, "b").unwrap().info.snapshots, 1);
        svc.engine.stop_background();
    }
}
