//! Quotas and task limits, per volume (`[quotas]` in snapblk.toml, `[quotas.volumes.NAME]`
//! for one volume): how many snapshots it may have, taken by hand and by policies; how many
//! snapshot creates and uploads of it may be in flight; how soon one snapshot may follow
//! another. Over a limit, a create is refused with [`Error::Limit`]: with a `retry_after` when
//! waiting lifts it (HTTP 429), without when it does not (409).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::events::Event;
use super::{Access, Caller, Error, Result, Service};
use crate::engine::VolumeInfo;
use crate::store::{OnLimit, Quotas};
use crate::units::duration_text;

/// Who takes a snapshot: the count it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taker {
    Hand,
    Policy,
}

/// A volume's quotas and where it stands (`volume quota VOLUME`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuotaView {
    pub volume: String,
    pub quotas: Quotas,
    pub manual_snapshots: u32,
    pub auto_snapshots: u32,
    /// Snapshot creates and uploads in flight.
    pub tasks: u32,
}

/// Snapshot creates in flight, per volume id (uploads are counted from the store).
#[derive(Default)]
pub(super) struct Creating(parking_lot::Mutex<HashMap<String, u32>>);

/// Holds one create's place in [`Creating`] until dropped.
pub(super) struct CreateSlot<'a> {
    creating: &'a Creating,
    volume: String,
}

impl Drop for CreateSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.creating.0.lock();
        if let Some(n) = m.get_mut(&self.volume) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.volume);
            }
        }
    }
}

/// A volume's live snapshots counted by taker (not those in the recycle bin), and when its
/// newest was taken (in the bin or not).
struct Counted {
    manual: usize,
    auto: usize,
    newest: Option<u64>,
}

impl Service {
    pub(super) fn quotas_of(&self, volume: &str) -> &Quotas {
        let c = &self.store.config;
        c.quota_overrides.get(volume).unwrap_or(&c.quotas)
    }

    /// Counts without listing the volume's snapshots (a volume may have thousands): the
    /// engine's count, the policies' books of the volume, its entries in the bin.
    fn counted(&self, info: &VolumeInfo) -> Counted {
        let (total, newest) = self.engine.snapshot_count_and_newest(&info.id).unwrap_or((0, None));
        let st = self.lifecycle.lock();
        let auto: HashSet<&String> =
            st.books.values().filter_map(|b| b.get(&info.id)).flat_map(|b| &b.snapshots).collect();
        let binned = st.bin.values().filter(|b| b.volume_id == info.id).count();
        let manual = (total as usize).saturating_sub(binned + auto.len());
        Counted { manual, auto: auto.len(), newest }
    }

    /// The volume's automatic snapshots, oldest first (at `max_snapshots_auto`, to delete).
    fn oldest_auto(&self, info: &VolumeInfo) -> Vec<String> {
        let ids: HashSet<String> = {
            let st = self.lifecycle.lock();
            st.books.values().filter_map(|b| b.get(&info.id)).flat_map(|b| b.snapshots.iter().cloned()).collect()
        };
        let mut auto: Vec<(u64, String)> = self
            .engine
            .snapshot_times(&info.id)
            .unwrap_or_default()
            .into_iter()
            .filter(|(id, _, _)| ids.contains(id))
            .map(|(id, _, created)| (created, id))
            .collect();
        auto.sort();
        auto.into_iter().map(|(_, id)| id).collect()
    }

    /// Uploads of the volume's snapshots in flight (queued or running: few, while a volume
    /// may have thousands of snapshots).
    fn uploads_in_flight(&self, info: &VolumeInfo) -> u32 {
        let of_volume = |id: &String| self.engine.snapshot(id).is_ok_and(|s| s.volume_id == info.id);
        self.store.uploads_in_flight().iter().filter(|id| of_volume(id)).count() as u32
    }

    /// The volume's tasks in flight besides snapshot creates: uploads and copies.
    pub(super) fn tasks_in_flight(&self, info: &VolumeInfo) -> u32 {
        self.uploads_in_flight(info) + self.store.copies_in_flight(&info.id)
    }

    pub fn volume_quota(&self, caller: &Caller, r: &str) -> Result<QuotaView> {
        caller.may(Access::Read)?;
        let info = self.live_volume(caller, r)?;
        let counted = self.counted(&info);
        let creating = self.creating.0.lock().get(&info.id).copied().unwrap_or(0);
        Ok(QuotaView {
            volume: info.name.clone(),
            quotas: self.quotas_of(&info.name).clone(),
            manual_snapshots: counted.manual as u32,
            auto_snapshots: counted.auto as u32,
            tasks: creating + self.tasks_in_flight(&info),
        })
    }

    /// Checks that `taker` may take a snapshot of the volume now, and books the create as a
    /// task until the slot is dropped. A policy at `max_snapshots_auto` with `on_limit =
    /// delete-oldest-auto` first deletes the volume's oldest automatic snapshot that is not
    /// held (through the delete operation: into the recycle bin, when it is on).
    pub(super) async fn snapshot_allowed(&self, info: &VolumeInfo, taker: Taker) -> Result<CreateSlot<'_>> {
        let q = self.quotas_of(&info.name).clone();
        let counted = self.counted(info);
        let how = |key: &str| {
            format!(
                "raise {key} in snapblk.toml ([quotas], or [quotas.volumes.{}] for this volume) and restart",
                info.name
            )
        };
        let refused = |message: String, retry_after: Option<u64>| {
            self.event(Event::QuotaHit { volume: info.name.clone(), message: message.clone() });
            Err(Error::Limit { message, retry_after })
        };
        if q.min_snapshot_interval > 0 {
            let newest = counted.newest;
            let now = self.engine.clock().now();
            if let Some(wait) = newest.map(|t| (t + q.min_snapshot_interval).saturating_sub(now)).filter(|w| *w > 0) {
                return refused(
                    format!(
                        "volume '{}' had a snapshot less than min_snapshot_interval ({}) ago; try again in {}, or {}",
                        info.name,
                        duration_text(q.min_snapshot_interval),
                        duration_text(wait),
                        how("min_snapshot_interval")
                    ),
                    Some(wait),
                );
            }
        }
        let slot = {
            let mut creating = self.creating.0.lock();
            let tasks = creating.get(&info.id).copied().unwrap_or(0) + self.tasks_in_flight(info);
            if tasks >= q.max_concurrent_tasks {
                drop(creating);
                return refused(
                    format!(
                        "volume '{}' has {tasks} snapshot creates, uploads and copies in flight, its max_concurrent_tasks; try again when one ends, or {}",
                        info.name,
                        how("max_concurrent_tasks")
                    ),
                    Some(5),
                );
            }
            *creating.entry(info.id.clone()).or_default() += 1;
            CreateSlot { creating: &self.creating, volume: info.id.clone() }
        };
        match taker {
            Taker::Hand if counted.manual as u32 >= q.max_snapshots_manual => refused(
                format!(
                    "volume '{}' has {} snapshots taken by hand, its max_snapshots_manual; delete some first, or {}",
                    info.name,
                    counted.manual,
                    how("max_snapshots_manual")
                ),
                None,
            ),
            Taker::Policy if counted.auto as u32 >= q.max_snapshots_auto => {
                let at_limit = format!(
                    "volume '{}' has {} snapshots taken by policies, its max_snapshots_auto",
                    info.name, counted.auto
                );
                if q.on_limit == OnLimit::Reject {
                    return refused(
                        format!(
                            "{at_limit}; lower the policies' retention, delete some, or {}",
                            how("max_snapshots_auto")
                        ),
                        None,
                    );
                }
                let over = counted.auto + 1 - q.max_snapshots_auto as usize;
                let mut deleted = 0;
                for id in &self.oldest_auto(info) {
                    if deleted == over {
                        break;
                    }
                    if self.delete_snapshot(&Caller::Daemon("quota"), id).await.is_ok() {
                        deleted += 1;
                    }
                }
                if deleted < over {
                    return refused(
                        format!(
                            "{at_limit}, and the oldest ones are held; release a hold, or {}",
                            how("max_snapshots_auto")
                        ),
                        None,
                    );
                }
                tracing::info!(volume = %info.name, deleted, "max_snapshots_auto reached: deleted the oldest automatic snapshots");
                Ok(slot)
            }
            _ => Ok(slot),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::engine::ErrorKind;
    use crate::service::testing::{hourly, service, ts, volume};
    use crate::service::{CreateSnapshot, Outcome, PolicyVolumes};

    fn snap(name: &str) -> CreateSnapshot {
        CreateSnapshot { name: name.into(), description: String::new(), durable: false }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn manual_and_auto_quotas_and_the_minimum_interval() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(ts("2026-12-01T00:00:00Z"));
        let config = "[quotas]\nmax_snapshots_manual = 2\nmax_snapshots_auto = 2\n\
                      [quotas.volumes.strict]\non_limit = \"reject\"\n[quotas.volumes.slow]\nmin_snapshot_interval = \"1m\"\n";
        let svc = service(dir.path(), clock.clone(), config);
        let me = Caller::Local;
        volume(&svc, "v").await;
        volume(&svc, "strict").await;

        // By hand: two, then a refusal that says which quota and how to raise it (409).
        svc.create_snapshot(&me, "v", snap("a")).await.unwrap();
        svc.create_snapshot(&me, "v", snap("b")).await.unwrap();
        let err = svc.create_snapshot(&me, "v", snap("c")).await.unwrap_err();
        assert_eq!((err.kind(), err.retry_after()), (ErrorKind::Quota, None));
        assert!(err.to_string().contains("max_snapshots_manual") && err.to_string().contains("[quotas"), "{err}");

        // Policies: their own count; at the limit the oldest automatic one goes (delete-oldest-auto).
        let policy = hourly("p", 100);
        svc.create_policy(&me, policy).unwrap();
        svc.apply_policy(&me, "p", PolicyVolumes { volumes: vec!["v".into(), "strict".into()], groups: vec![] })
            .unwrap();
        for _ in 0..3 {
            clock.advance(3600);
            svc.run_due_policies().await;
        }
        let auto: Vec<u64> = svc
            .list_snapshots(&me, Some("v"))
            .unwrap()
            .into_iter()
            .filter(|s| !s.policies.is_empty())
            .map(|s| s.info.created)
            .collect();
        assert_eq!(auto, [ts("2026-12-01T02:00:00Z"), ts("2026-12-01T03:00:00Z")], "the oldest went");
        let q = svc.volume_quota(&me, "v").unwrap();
        assert_eq!((q.manual_snapshots, q.auto_snapshots), (2, 2));

        // on_limit = reject: the third tick fails, and says why.
        let history = svc.policy_history(&me, "p", Some("strict")).unwrap();
        let outcomes: Vec<_> = history.iter().map(|e| e.outcome.clone()).collect();
        assert_eq!(outcomes, [Outcome::Taken, Outcome::Taken, Outcome::Failed]);
        assert!(history[2].reason.as_deref().unwrap_or_default().contains("max_snapshots_auto"));

        // min_snapshot_interval: too soon is a 429 with how long to wait.
        volume(&svc, "slow").await;
        svc.create_snapshot(&me, "slow", snap("x")).await.unwrap();
        clock.advance(20);
        let err = svc.create_snapshot(&me, "slow", snap("y")).await.unwrap_err();
        assert_eq!((err.kind(), err.retry_after()), (ErrorKind::Throttled, Some(40)));
        assert!(err.to_string().contains("try again in 40s"), "{err}");
        clock.advance(40);
        svc.create_snapshot(&me, "slow", snap("y")).await.unwrap();
        svc.engine.stop_background();
    }
}
