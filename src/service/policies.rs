//! Automatic snapshot policies: create, list, show, delete, apply to and remove from volumes,
//! run now, history, prune; and the scheduler that ticks them. A tick takes its snapshot
//! through [`Service::create_snapshot`] and prunes through [`Service::delete_snapshot`], so
//! holds and every other rule of a delete apply to retention too.
//!
//! A tick, for one volume: record the snapshot it is about to create (synced), create it,
//! book it; with `after_upload`, wait for its upload; then prune — only after a successful
//! create, only while none of the policy's snapshots of the volume has a failed upload, never
//! below `min_count`, never a held snapshot, and only snapshots this policy took.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::events::Event;
use super::lifecycle::{Book, HistoryEntry, Key, Outcome};
use super::quotas::Taker;
use super::{Access, Caller, CreateSnapshot, Error, Result, Service};
use crate::engine::{ErrorKind, SnapshotInfo};
use crate::policy::{Candidate, Missed, Overlap, Policy, PolicySpec, Verdict, MAX_POLICIES_PER_VOLUME};
use crate::store::UploadState;

/// The longest policy name: its snapshots' names (`auto-NAME-YYYYMMDDTHHMMSSZ`) fit in 64.
const MAX_POLICY_NAME: usize = 40;
/// A tick later than this after its time was missed (the daemon was down, or stalled).
const MISSED_AFTER: u64 = 60;
/// How often the scheduler looks for due policies, and a waiting tick at its upload.
const POLL: Duration = Duration::from_millis(500);

/// `policy create`: the policy's spec.
pub type CreatePolicy = PolicySpec;

/// Volumes (names or ids) and consistency groups to apply a policy to, or remove it from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyVolumes {
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The book key of a policy's group snapshots of group `name` (volumes are keyed by id).
pub(super) fn group_book(name: &str) -> String {
    format!("group:{name}")
}

/// `policy run-now` / `policy prune`: one volume, or every volume of the policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyTarget {
    #[serde(default)]
    pub volume: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// A policy, with where it stands on each of its volumes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyView {
    #[serde(flatten)]
    pub policy: Policy,
    pub schedule_text: String,
    pub next_due: Option<u64>,
    pub on: Vec<PolicyVolumeView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyVolumeView {
    pub volume: String,
    pub volume_id: String,
    pub last_attempt: Option<u64>,
    pub last_success: Option<u64>,
    /// Snapshots this policy took of the volume (and still has).
    pub snapshots: usize,
}

/// What retention decides (or decided) for one snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneView {
    pub volume: String,
    pub snapshot: String,
    pub id: String,
    pub created: u64,
    pub verdict: Verdict,
}

/// Ticks running, per (policy id, volume id), and whether another waits.
#[derive(Default)]
pub(super) struct Running(parking_lot::Mutex<HashMap<(String, String), bool>>);

/// One lock per volume id, held by a tick while it finds or takes its snapshot.
#[derive(Default)]
pub(super) struct TickLocks(parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl TickLocks {
    fn of(&self, volume: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.0.lock().entry(volume.to_string()).or_default().clone()
    }
}

impl Service {
    fn policy_view(&self, p: &Policy) -> PolicyView {
        let st = self.lifecycle.lock();
        let on = p
            .volumes
            .iter()
            .map(|v| {
                let book = st.books.get(&p.id).and_then(|b| b.get(v)).cloned().unwrap_or_default();
                PolicyVolumeView {
                    volume: self.engine.volume(v).map(|i| i.name).unwrap_or_else(|_| v.clone()),
                    volume_id: v.clone(),
                    last_attempt: book.last_attempt,
                    last_success: book.last_success,
                    snapshots: book.snapshots.len(),
                }
            })
            .chain(p.groups.iter().map(|g| {
                let key = group_book(g);
                let book = st.books.get(&p.id).and_then(|b| b.get(&key)).cloned().unwrap_or_default();
                PolicyVolumeView {
                    volume: format!("group {g}"),
                    volume_id: key,
                    last_attempt: book.last_attempt,
                    last_success: book.last_success,
                    snapshots: book.snapshots.len(),
                }
            }))
            .collect();
        PolicyView {
            schedule_text: p.schedule.describe(&p.tz),
            next_due: st.next_due.get(&p.id).copied(),
            on,
            policy: p.clone(),
        }
    }

    /// A policy by name or id.
    fn find_policy(&self, caller: &Caller, r: &str) -> Result<Policy> {
        let name = caller.qualify(r);
        let st = self.lifecycle.lock();
        st.policies
            .values()
            .find(|p| (p.id == r || p.name == name) && caller.sees(&p.name))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no policy named '{r}'; list them with: snapblk policy list")))
    }

    pub fn create_policy(&self, caller: &Caller, mut req: CreatePolicy) -> Result<PolicyView> {
        caller.may(Access::Manage)?;
        req.name = self.new_name(caller, "policy", &req.name)?;
        if req.name.rsplit('/').next().unwrap_or_default().len() > MAX_POLICY_NAME {
            // Its snapshots are named auto-<policy>-<time>, and a name has at most 64 bytes.
            return Err(Error::Invalid(format!("a policy name has at most {MAX_POLICY_NAME} characters")));
        }
        self.check_policy_regions(&req)?;
        let now = self.engine.clock().now();
        let policy = Policy {
            id: format!("p-{:016x}", rand::random::<u64>()),
            spec: req,
            volumes: Vec::new(),
            groups: Vec::new(),
            created: now,
        };
        let next = policy.compile().map_err(Error::Invalid)?.next_after(now as i64).map(|t| t as u64);
        {
            let mut st = self.lifecycle.lock();
            if st.policies.values().any(|p| p.name == policy.name) {
                return Err(Error::Engine(crate::engine::EngineError::AlreadyExists(format!(
                    "a policy named '{}' exists; pick another name or delete it first",
                    policy.name
                ))));
            }
            st.policies.insert(policy.id.clone(), policy.clone());
            if let Some(t) = next {
                st.next_due.insert(policy.id.clone(), t);
            }
            st.touch(Key::Policy(policy.id.clone()));
            st.touch(Key::NextDue(policy.id.clone()));
            self.save_lifecycle(&mut st)?;
        }
        tracing::info!(policy = %policy.name, id = %policy.id, by = %caller, "policy created");
        Ok(self.policy_view(&policy))
    }

    pub fn list_policies(&self, caller: &Caller) -> Result<Vec<PolicyView>> {
        caller.may(Access::Read)?;
        let policies: Vec<Policy> =
            self.lifecycle.lock().policies.values().filter(|p| caller.sees(&p.name)).cloned().collect();
        Ok(policies.iter().map(|p| self.policy_view(p)).collect())
    }

    pub fn policy(&self, caller: &Caller, r: &str) -> Result<PolicyView> {
        caller.may(Access::Read)?;
        Ok(self.policy_view(&self.find_policy(caller, r)?))
    }

    /// Deletes a policy; the snapshots it took stay (as manual snapshots would).
    pub fn delete_policy(&self, caller: &Caller, r: &str) -> Result<()> {
        caller.may(Access::Manage)?;
        let p = self.find_policy(caller, r)?;
        let mut st = self.lifecycle.lock();
        st.policies.remove(&p.id);
        st.books.remove(&p.id);
        st.next_due.remove(&p.id);
        st.history.remove(&p.id);
        for key in [
            Key::Policy(p.id.clone()),
            Key::Books(p.id.clone()),
            Key::NextDue(p.id.clone()),
            Key::History(p.id.clone()),
        ] {
            st.touch(key);
        }
        self.save_lifecycle(&mut st)?;
        tracing::info!(policy = %p.name, by = %caller, "policy deleted; the snapshots it took stay");
        Ok(())
    }

    /// Applies a policy to volumes (at most [`MAX_POLICIES_PER_VOLUME`] per volume).
    pub fn apply_policy(&self, caller: &Caller, r: &str, mut req: PolicyVolumes) -> Result<PolicyView> {
        caller.may(Access::Manage)?;
        req.groups = req.groups.iter().map(|g| caller.qualify(g)).collect();
        let p = self.find_policy(caller, r)?;
        let ids = req.volumes.iter().map(|v| Ok(self.live_volume(caller, v)?.id)).collect::<Result<Vec<_>>>()?;
        let mut st = self.lifecycle.lock();
        for (id, name) in ids.iter().zip(&req.volumes) {
            let carried = st.policies.values().filter(|q| q.volumes.contains(id)).count();
            let has = st.policies[&p.id].volumes.contains(id);
            if !has && carried >= MAX_POLICIES_PER_VOLUME {
                return Err(Error::Engine(crate::engine::EngineError::Busy(format!(
                    "volume '{name}' carries {carried} policies, the most one volume may; remove one first"
                ))));
            }
            if let Some(q) = st.policies.get_mut(&p.id).filter(|_| !has) {
                q.volumes.push(id.clone());
            }
            st.touch(Key::Policy(p.id.clone()));
        }
        for g in &req.groups {
            if !st.groups.contains_key(g) || !caller.sees(g) {
                return Err(Error::NotFound(format!("no group named '{g}' (list them with: snapblk group list)")));
            }
            if let Some(q) = st.policies.get_mut(&p.id).filter(|q| !q.groups.contains(g)) {
                q.groups.push(g.clone());
            }
            st.touch(Key::Policy(p.id.clone()));
        }
        self.save_lifecycle(&mut st)?;
        let p = st.policies[&p.id].clone();
        drop(st);
        Ok(self.policy_view(&p))
    }

    /// Removes a policy from volumes; the snapshots it took of them stay, kept from then on
    /// by no policy.
    pub fn remove_policy(&self, caller: &Caller, r: &str, mut req: PolicyVolumes) -> Result<PolicyView> {
        caller.may(Access::Manage)?;
        req.groups = req.groups.iter().map(|g| caller.qualify(g)).collect();
        let p = self.find_policy(caller, r)?;
        let ids = req.volumes.iter().map(|v| Ok(self.live_volume(caller, v)?.id)).collect::<Result<Vec<_>>>()?;
        let mut st = self.lifecycle.lock();
        let keys: Vec<String> = ids.iter().cloned().chain(req.groups.iter().map(|g| group_book(g))).collect();
        if let Some(q) = st.policies.get_mut(&p.id) {
            q.volumes.retain(|v| !ids.contains(v));
            q.groups.retain(|g| !req.groups.contains(g));
        }
        st.touch(Key::Policy(p.id.clone()));
        st.touch(Key::Books(p.id.clone()));
        if let Some(books) = st.books.get_mut(&p.id) {
            books.retain(|v, _| !keys.contains(v));
        }
        self.save_lifecycle(&mut st)?;
        let p = st.policies[&p.id].clone();
        drop(st);
        Ok(self.policy_view(&p))
    }

    pub fn policy_history(&self, caller: &Caller, r: &str, volume: Option<&str>) -> Result<Vec<HistoryEntry>> {
        caller.may(Access::Read)?;
        let p = self.find_policy(caller, r)?;
        let volume = volume.map(|v| self.live_volume(caller, v).map(|i| i.name)).transpose()?;
        let st = self.lifecycle.lock();
        let all = st.history.get(&p.id).map(|h| h.iter().cloned().collect::<Vec<_>>()).unwrap_or_default();
        Ok(all.into_iter().filter(|e| volume.as_ref().is_none_or(|v| &e.volume == v)).collect())
    }

    /// The volumes a request names (one, which must carry the policy), or all of the policy's.
    fn policy_volumes(&self, caller: &Caller, p: &Policy, volume: Option<&str>) -> Result<Vec<String>> {
        match volume {
            None => Ok(p.volumes.clone()),
            Some(v) => {
                let info = self.live_volume(caller, v)?;
                if !p.volumes.contains(&info.id) {
                    return Err(Error::Invalid(format!(
                        "policy '{}' is not applied to volume '{}'; apply it with: snapblk policy apply {} {}",
                        p.name, info.name, p.name, info.name
                    )));
                }
                Ok(vec![info.id])
            }
        }
    }

    /// `policy run-now`: one tick now on each volume (create, then prune); the history
    /// entries it made.
    pub async fn run_policy_now(
        self: &Arc<Self>,
        caller: &Caller,
        r: &str,
        req: PolicyTarget,
    ) -> Result<Vec<HistoryEntry>> {
        caller.may(Access::Snapshot)?;
        let p = self.find_policy(caller, r)?;
        let mut done = Vec::new();
        for v in self.policy_volumes(caller, &p, req.volume.as_deref())? {
            if !self.running.begin(&p.id, &v, false) {
                return Err(Error::Engine(crate::engine::EngineError::Busy(format!(
                    "a tick of policy '{}' is running on this volume; see: snapblk policy history {}",
                    p.name, p.name
                ))));
            }
            let entry = self.tick(&p, &v).await;
            self.running.end(&p.id, &v);
            done.push(entry);
        }
        Ok(done)
    }

    /// `policy prune`: what retention keeps and removes of the policy's snapshots now; with
    /// `dry_run` nothing is deleted.
    pub async fn prune_policy(&self, caller: &Caller, r: &str, req: PolicyTarget) -> Result<Vec<PruneView>> {
        caller.may(if req.dry_run { Access::Read } else { Access::Delete })?;
        let p = self.find_policy(caller, r)?;
        let mut out = Vec::new();
        for v in self.policy_volumes(caller, &p, req.volume.as_deref())? {
            let (verdicts, _) = self.retention_verdicts(&p, &v)?;
            if !req.dry_run {
                self.prune(&p, &v).await?;
            }
            out.extend(verdicts);
        }
        // (Retention's deletes are saved by the caller: here.)
        self.save_lifecycle(&mut self.lifecycle.lock())?;
        Ok(out)
    }

    pub(super) fn save_lifecycle(&self, st: &mut super::lifecycle::LifecycleState) -> Result<()> {
        self.lifecycle_file.save(st)
    }

    /// Runs the policies that are due; the scheduler calls it every [`POLL`], tests with
    /// a manual clock call it directly. Returns once every tick it started has ended.
    pub async fn run_due_policies(self: &Arc<Self>) {
        let now = self.engine.clock().now();
        let due: Vec<(Policy, u64)> = {
            let mut st = self.lifecycle.lock();
            let due: Vec<(Policy, u64)> = st
                .policies
                .values()
                .filter_map(|p| st.next_due.get(&p.id).filter(|t| **t <= now).map(|t| (p.clone(), *t)))
                .collect();
            for (p, _) in &due {
                match p.compile().ok().and_then(|c| c.next_after(now as i64)) {
                    Some(t) => st.next_due.insert(p.id.clone(), t as u64),
                    None => st.next_due.remove(&p.id),
                };
                st.touch(Key::NextDue(p.id.clone()));
            }
            if !due.is_empty() {
                if let Err(e) = self.save_lifecycle(&mut st) {
                    tracing::error!(error = %e, "cannot record when policies fire next; not ticking them");
                    return;
                }
            }
            due
        };
        let mut ticks = tokio::task::JoinSet::new();
        for (p, at) in due {
            let late = now.saturating_sub(at);
            if late > MISSED_AFTER && p.missed == Missed::Skip {
                let mut st = self.lifecycle.lock();
                for v in &p.volumes {
                    let volume = self.engine.volume(v).map(|i| i.name).unwrap_or_else(|_| v.clone());
                    let reason = format!("missed: due at {} while the daemon was down", crate::units::utc(at));
                    st.record(&p.id, skipped(now, volume, reason));
                }
                let _ = self.save_lifecycle(&mut st);
                continue;
            }
            for v in p.volumes.clone() {
                let queue = p.overlap == Overlap::Queue;
                if !self.running.begin(&p.id, &v, queue) {
                    if !queue {
                        let volume = self.engine.volume(&v).map(|i| i.name).unwrap_or_else(|_| v.clone());
                        let mut st = self.lifecycle.lock();
                        st.record(&p.id, skipped(now, volume, "the previous tick is still running".into()));
                        let _ = self.save_lifecycle(&mut st);
                    }
                    continue;
                }
                let (svc, p) = (self.clone(), p.clone());
                ticks.spawn(async move {
                    loop {
                        svc.tick(&p, &v).await;
                        // A tick queued meanwhile runs now.
                        if !svc.running.end(&p.id, &v) {
                            break;
                        }
                    }
                });
            }
            for g in p.groups.clone() {
                let key = group_book(&g);
                if !self.running.begin(&p.id, &key, false) {
                    continue;
                }
                let (svc, p) = (self.clone(), p.clone());
                ticks.spawn(async move {
                    svc.tick_group(&p, &g).await;
                    svc.running.end(&p.id, &key);
                });
            }
        }
        while ticks.join_next().await.is_some() {}
    }

    /// The scheduler: one task, looking for due policies (and what the recycle bin has held
    /// long enough) every [`POLL`].
    pub(super) fn start_scheduler(self: &Arc<Self>) {
        let svc = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                let Some(s) = svc.upgrade() else { return };
                s.sweep_bin().await;
                s.sweep_group_manifests().await;
                // Ticks run on their own; the next look does not wait for them.
                tokio::spawn(async move { s.run_due_policies().await });
            }
        });
    }

    /// One tick of policy `p` on volume `v` (an id); recorded in the history and returned.
    async fn tick(&self, p: &Policy, v: &str) -> HistoryEntry {
        let now = self.engine.clock().now();
        let entry = self.tick_steps(p, v, now).await;
        self.record_tick(p, v, now, &entry);
        let (policy, volume, reason) = (p.name.clone(), entry.volume.clone(), entry.reason.clone().unwrap_or_default());
        match entry.outcome {
            Outcome::Skipped => self.event(Event::PolicySkipped { policy, volume, reason }),
            Outcome::Failed => self.event(Event::PolicyFailed { policy, volume, error: reason }),
            Outcome::Taken => {}
        }
        match entry.outcome {
            Outcome::Failed => {
                tracing::warn!(policy = %p.name, volume = %entry.volume, reason = ?entry.reason, "policy tick failed")
            }
            _ => {
                tracing::info!(policy = %p.name, volume = %entry.volume, outcome = ?entry.outcome, snapshot = ?entry.snapshot, removed = entry.removed.len(), "policy tick")
            }
        }
        entry
    }

    async fn tick_steps(&self, p: &Policy, v: &str, now: u64) -> HistoryEntry {
        let info = match self.engine.volume(v) {
            Ok(i) => i,
            Err(e) => return failed(now, v.to_string(), None, e.to_string()),
        };
        let volume = info.name.clone();
        let (snap, shared) = {
            let tick_lock = self.tick_locks.of(v);
            let _one_at_a_time = tick_lock.lock().await;
            match self.shared_snapshot(p, v, now) {
                Some(found) => found,
                None if p.skip_if_unchanged && info.dirty_clusters == 0 && info.snapshots > 0 => {
                    return skipped(now, volume, "nothing was written since the volume's last snapshot".into());
                }
                None => match self.take_policy_snapshot(p, v, now).await {
                    Ok(s) => (s, None),
                    Err(e) => return failed(now, volume, None, format!("{e}; nothing was pruned")),
                },
            }
        };
        let name = snap.name.clone();
        if p.after_upload {
            loop {
                match self.store.status(&snap.id).map(|s| (s.state, s.reason)) {
                    Some((UploadState::Uploading, _)) => tokio::time::sleep(POLL).await,
                    Some((UploadState::Failed, reason)) => {
                        let why = reason.unwrap_or_default();
                        return failed(
                            now,
                            volume,
                            Some(name),
                            format!("its upload failed ({why}); nothing was pruned"),
                        );
                    }
                    // Uploaded, or uploads are off (nothing to wait for).
                    _ => break,
                }
            }
        }
        let mut entry = HistoryEntry {
            at: now,
            volume,
            outcome: Outcome::Taken,
            snapshot: Some(name),
            reason: shared.map(|other| format!("shared with policy {other}, which took it this minute")),
            removed: Vec::new(),
        };
        match self.prune(p, v).await {
            Ok(removed) => entry.removed = removed,
            Err(e) => entry.reason = Some(format!("nothing pruned: {e}")),
        }
        let problems = self.policy_copies(p, v, &snap.id).await;
        if !problems.is_empty() {
            let text = problems.join("; ");
            entry.reason = Some(entry.reason.take().map_or(text.clone(), |r| format!("{r}; {text}")));
        }
        entry
    }

    /// Takes a tick's snapshot and books it: its name is recorded first (synced), so a kill -9
    /// between the create and the booking is settled at start, never a duplicate or a loss.
    async fn take_policy_snapshot(&self, p: &Policy, v: &str, now: u64) -> Result<SnapshotInfo> {
        let name = p.snapshot_name(now);
        {
            let mut st = self.lifecycle.lock();
            st.book(&p.id, v).creating = Some(name.clone());
            self.save_lifecycle(&mut st)?;
        }
        let req = CreateSnapshot {
            name: name.clone(),
            description: format!("taken by policy {} ({})", p.name, p.id),
            durable: false,
        };
        let created = self.take_snapshot(&Caller::Daemon("policy"), v, req, Taker::Policy).await;
        // Saved when the tick ends: a crash before leaves `creating`, settled at start.
        let mut st = self.lifecycle.lock();
        let book = st.book(&p.id, v);
        book.creating = None;
        if let Ok(s) = &created {
            book.snapshots.push(s.info.id.clone());
        }
        Ok(created?.info)
    }

    /// A snapshot another policy took of volume `v` in the same minute as `now`: policy `p`
    /// books it too (kept until the last policy keeping it lets it go) and does not take its
    /// own. With the name of the policy that took it.
    fn shared_snapshot(&self, p: &Policy, v: &str, now: u64) -> Option<(SnapshotInfo, Option<String>)> {
        let mut st = self.lifecycle.lock();
        let binned = &st.bin;
        let (other, snap) = st.books.iter().filter(|(q, _)| *q != &p.id).find_map(|(q, books)| {
            let id = books.get(v)?.snapshots.last()?;
            let s = self.engine.snapshot(id).ok()?;
            (s.created / 60 == now / 60 && !binned.contains_key(&s.id)).then(|| (q.clone(), s))
        })?;
        let other = st.policies.get(&other).map_or(other.clone(), |q| q.name.clone());
        // Saved when the tick ends (a crash before: the next tick takes its own).
        st.book(&p.id, v).snapshots.push(snap.id.clone());
        Some((snap, Some(other)))
    }

    /// Retention's verdicts on the snapshots policy `p` took of volume `v`, and whether one of
    /// them has a failed upload (then nothing may be pruned).
    fn retention_verdicts(&self, p: &Policy, v: &str) -> Result<(Vec<PruneView>, Option<String>)> {
        let compiled = p.compile().map_err(Error::Invalid)?;
        // Held, shared and image disks are kept whatever retention says.
        let (ids, held) = {
            let st = self.lifecycle.lock();
            let book: Book = st.books.get(&p.id).and_then(|b| b.get(v)).cloned().unwrap_or_default();
            let held: std::collections::HashSet<String> = st
                .holds
                .keys()
                .cloned()
                .chain(
                    st.shares
                        .iter()
                        .filter(|(_, m)| m.values().any(|s| s.revoked_at.is_none()))
                        .map(|(id, _)| id.clone()),
                )
                .chain(st.images.values().flat_map(|r| r.disks.iter().map(|d| d.snapshot_id.clone())))
                .collect();
            (book.snapshots, held)
        };
        let volume = self.engine.volume(v)?.name;
        let mut of_volume: HashMap<String, (String, u64)> =
            self.engine.snapshot_times(v)?.into_iter().map(|(id, name, created)| (id, (name, created))).collect();
        let mut infos = HashMap::new();
        let mut failed_upload = None;
        for id in &ids {
            let Some((name, created)) = of_volume.remove(id) else { continue };
            if let Some(status) = self.store.status(id).filter(|r| r.state == UploadState::Failed) {
                failed_upload = Some(format!(
                    "the upload of {volume}@{name} failed ({}); retry it with: snapblk snapshot upload {volume}@{name}",
                    status.reason.unwrap_or_default(),
                ));
            }
            infos.insert(id.clone(), (name, created));
        }
        let candidates: Vec<Candidate> = infos
            .iter()
            .map(|(id, (_, created))| Candidate { id: id.clone(), created: *created as i64, held: held.contains(id) })
            .collect();
        let now = self.engine.clock().now() as i64;
        let verdicts = p
            .retention
            .select(&candidates, now, |t| compiled.local(t))
            .into_iter()
            .map(|(c, verdict)| {
                let (name, created) = &infos[&c.id];
                PruneView {
                    volume: volume.clone(),
                    snapshot: name.clone(),
                    id: c.id.clone(),
                    created: *created,
                    verdict,
                }
            })
            .collect();
        Ok((verdicts, failed_upload))
    }

    /// Deletes what retention removes of the snapshots policy `p` took of volume `v`; their
    /// names. Refused while one of them has a failed upload.
    async fn prune(&self, p: &Policy, v: &str) -> Result<Vec<String>> {
        let (verdicts, failed_upload) = self.retention_verdicts(p, v)?;
        if let Some(why) = failed_upload {
            return Err(Error::Engine(crate::engine::EngineError::Busy(why)));
        }
        let mut removed = Vec::new();
        for s in verdicts.into_iter().filter(|s| !s.verdict.keeps()) {
            if self.let_go_if_shared(p, v, &s.id) {
                removed.push(format!("{} (still kept by another policy)", s.snapshot));
                continue;
            }
            match self.delete_snapshot(&Caller::Daemon("retention"), &s.id).await {
                Ok(()) => removed.push(s.snapshot),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(policy = %p.name, snapshot = %s.snapshot, error = %e, "retention could not delete a snapshot; it stays")
                }
            }
        }
        Ok(removed)
    }
}

impl Service {
    /// When another policy also keeps snapshot `id` of volume `v`, policy `p` only lets go of
    /// it (drops it from its book); true then.
    fn let_go_if_shared(&self, p: &Policy, v: &str, id: &str) -> bool {
        let mut st = self.lifecycle.lock();
        let shared = st
            .books
            .iter()
            .any(|(q, books)| q != &p.id && books.get(v).is_some_and(|b| b.snapshots.iter().any(|s| s == id)));
        if shared {
            // Saved by the caller (the tick, or `policy prune`) when it ends.
            st.book(&p.id, v).snapshots.retain(|s| s != id);
        }
        shared
    }
}

impl Running {
    /// Marks a tick of (policy, volume) running; false if one runs already (then, with
    /// `queue`, one more is queued behind it).
    fn begin(&self, policy: &str, volume: &str, queue: bool) -> bool {
        let mut r = self.0.lock();
        match r.get_mut(&(policy.to_string(), volume.to_string())) {
            Some(queued) => {
                *queued |= queue;
                false
            }
            None => {
                r.insert((policy.to_string(), volume.to_string()), false);
                true
            }
        }
    }

    /// Ends a tick; true (and it stays running) if another was queued behind it.
    fn end(&self, policy: &str, volume: &str) -> bool {
        let mut r = self.0.lock();
        let key = (policy.to_string(), volume.to_string());
        match r.get_mut(&key) {
            Some(queued) if *queued => {
                *queued = false;
                true
            }
            _ => {
                r.remove(&key);
                false
            }
        }
    }
}

fn skipped(at: u64, volume: String, reason: String) -> HistoryEntry {
    HistoryEntry { at, volume, outcome: Outcome::Skipped, snapshot: None, reason: Some(reason), removed: Vec::new() }
}

fn failed(at: u64, volume: String, snapshot: Option<String>, reason: String) -> HistoryEntry {
    HistoryEntry { at, volume, outcome: Outcome::Failed, snapshot, reason: Some(reason), removed: Vec::new() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::policy::{Retention, Schedule};

    use crate::service::testing::{policy, service, ts};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_policy_on_a_group_takes_group_snapshots_and_retention_deletes_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(ts("2026-11-01T00:00:00Z"));
        let svc = service(dir.path(), clock.clone(), "");
        let me = Caller::Local;
        for v in ["a", "b"] {
            crate::service::testing::volume(&svc, v).await;
        }
        let group = crate::service::CreateGroup { name: "g".into(), volumes: vec!["a".into(), "b".into()] };
        svc.create_group(&me, group).unwrap();
        svc.create_policy(&me, crate::service::testing::hourly("hourly", 3)).unwrap();
        svc.apply_policy(&me, "hourly", PolicyVolumes { volumes: vec![], groups: vec!["g".into()] }).unwrap();
        // A group with a policy on it cannot be deleted.
        assert!(svc.delete_group(&me, "g").is_err());
        for _ in 0..6 {
            clock.advance(3600);
            svc.run_due_policies().await;
        }
        // Three group snapshots, each whole: both members, same name; nothing else left.
        let kept = svc.list_group_snapshots(&me, "g").unwrap();
        assert_eq!(kept.len(), 3, "{kept:?}");
        for g in &kept {
            assert!(g.members.iter().all(|m| m.present), "{g:?}");
            assert!(g.name.starts_with("auto-hourly-"), "{g:?}");
        }
        let binned = svc.recycle_bin(&me).unwrap();
        let live: Vec<_> = svc.list_snapshots(&me, None).unwrap();
        assert_eq!(live.len(), 6, "members of deleted group snapshots must be gone: {live:?} {binned:?}");
        let history = svc.policy_history(&me, "hourly", None).unwrap();
        assert_eq!(history.len(), 6);
        assert!(history.iter().all(|e| e.volume == "group g" && e.outcome == Outcome::Taken), "{history:?}");
        // The books survive a restart with their group snapshots.
        let view = svc.policy(&me, "hourly").unwrap();
        assert!(view.on.iter().any(|o| o.volume == "group g" && o.snapshots == 3), "{:?}", view.on);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_month_of_hourly_ticks_keeps_what_retention_says_and_no_manual_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(ts("2026-11-01T00:00:00Z"));
        let svc = service(dir.path(), clock.clone(), "");
        let me = Caller::Local;
        svc.create_volume(
            &me,
            crate::service::CreateVolume {
                name: "v".into(),
                size: Some(1 << 20),
                cluster_size: None,
                region: None,
                from_snapshot: None,
            },
        )
        .await
        .unwrap();
        let manual = CreateSnapshot { name: "manual".into(), description: String::new(), durable: false };
        svc.create_snapshot(&me, "v", manual).await.unwrap();
        let retention =
            Retention { keep_last: Some(5), keep_daily: Some(7), keep_weekly: Some(3), ..Default::default() };
        let every_hour = Schedule::At { times: (0..24).map(|h| format!("{h:02}:00")).collect(), weekdays: vec![] };
        svc.create_policy(&me, policy("hourly", every_hour, retention.clone())).unwrap();
        svc.apply_policy(&me, "hourly", PolicyVolumes { volumes: vec!["v".into()], groups: vec![] }).unwrap();

        // The model: retention applied after every tick to the series so far.
        let mut model: Vec<Candidate> = Vec::new();
        for hour in 0..30 * 24 {
            clock.advance(3600);
            svc.run_due_policies().await;
            let t = ts("2026-11-01T01:00:00Z") as i64 + hour * 3600;
            model.push(Candidate { id: t.to_string(), created: t, held: false });
            let utc = |t: i64| jiff::tz::TimeZone::UTC.to_datetime(jiff::Timestamp::from_second(t).unwrap());
            model = retention.select(&model, t, utc).into_iter().filter(|(_, v)| v.keeps()).map(|(c, _)| c).collect();
        }
        let mut kept: Vec<u64> = svc
            .list_snapshots(&me, Some("v"))
            .unwrap()
            .into_iter()
            .filter(|s| s.policies == ["hourly"])
            .map(|s| s.info.created)
            .collect();
        kept.sort_unstable();
        let mut want: Vec<u64> = model.iter().map(|c| c.created as u64).collect();
        want.sort_unstable();
        assert_eq!(kept, want, "the snapshots kept are the ones retention keeps");
        assert!(kept.len() <= 5 + 7 + 3);
        assert!(svc.snapshot(&me, "v@manual").is_ok(), "a manual snapshot is never pruned");
        let history = svc.policy_history(&me, "hourly", None).unwrap();
        assert_eq!(history.len(), HISTORY_KEPT_FOR_TEST);
        assert!(history.iter().all(|e| e.outcome == Outcome::Taken), "{history:?}");
        let view = svc.policy(&me, "hourly").unwrap();
        assert_eq!(view.on[0].last_success, Some(clock_now(&svc)));
        svc.engine.stop_background();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missed_ticks_are_skipped_or_run_once_and_a_failure_never_counts_as_success() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(ts("2026-11-01T00:00:00Z"));
        let svc = service(dir.path(), clock.clone(), "");
        let me = Caller::Local;
        let every = |s| Schedule::Every { every: s, start: "00:00".into() };
        let mut skip = policy("skip", every(600), Retention { keep_last: Some(100), ..Default::default() });
        skip.missed = Missed::Skip;
        let mut once = policy("once", every(600), Retention { keep_last: Some(100), ..Default::default() });
        once.missed = Missed::RunOnce;
        svc.create_policy(&me, skip).unwrap();
        svc.create_policy(&me, once).unwrap();
        let vol = |name: &str| crate::service::CreateVolume {
            name: name.into(),
            size: Some(1 << 20),
            cluster_size: None,
            region: None,
            from_snapshot: None,
        };
        svc.create_volume(&me, vol("v")).await.unwrap();
        for p in ["skip", "once"] {
            svc.apply_policy(&me, p, PolicyVolumes { volumes: vec!["v".into()], groups: vec![] }).unwrap();
        }
        // Ten intervals pass with no tick (the daemon was down).
        clock.advance(6000);
        svc.run_due_policies().await;
        let outcomes =
            |p: &str| svc.policy_history(&me, p, None).unwrap().into_iter().map(|e| e.outcome).collect::<Vec<_>>();
        assert_eq!(outcomes("skip"), [Outcome::Skipped]);
        assert_eq!(outcomes("once"), [Outcome::Taken], "one catch-up run, not ten");
        // The next due is after now: nothing more until it comes.
        svc.run_due_policies().await;
        assert_eq!(outcomes("once").len(), 1);
        // A tick that fails (its snapshot name is taken) does not advance last_success. (Alone:
        // "once", firing in the same minute, would take a snapshot "skip" then shares.)
        svc.remove_policy(&me, "once", PolicyVolumes { volumes: vec!["v".into()], groups: vec![] }).unwrap();
        let before = svc.policy(&me, "skip").unwrap().on[0].last_success;
        clock.advance(600);
        let name = svc.find_policy(&Caller::Local, "skip").unwrap().snapshot_name(clock_now(&svc));
        let taken = CreateSnapshot { name, description: String::new(), durable: false };
        svc.create_snapshot(&me, "v", taken).await.unwrap();
        svc.run_due_policies().await;
        assert_eq!(outcomes("skip").last(), Some(&Outcome::Failed));
        assert_eq!(svc.policy(&me, "skip").unwrap().on[0].last_success, before);
        svc.engine.stop_background();
    }

    const HISTORY_KEPT_FOR_TEST: usize = super::super::lifecycle::HISTORY_KEPT;

    fn clock_now(svc: &Service) -> u64 {
        svc.engine.clock().now()
    }
}

#[cfg(test)]
mod shared_tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::service::testing::{hourly, service, ts, volume};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn policies_firing_in_the_same_minute_share_one_snapshot_kept_until_the_last_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(ts("2026-12-01T00:00:00Z"));
        let svc = service(dir.path(), clock.clone(), "");
        let me = Caller::Local;
        volume(&svc, "v").await;
        // "short" keeps 1, "long" keeps 3: after three hours, "long" keeps all three, and the
        // two "short" let go of stay for it.
        for (p, keep) in [("short", 1), ("long", 3)] {
            svc.create_policy(&me, hourly(p, keep)).unwrap();
            svc.apply_policy(&me, p, PolicyVolumes { volumes: vec!["v".into()], groups: vec![] }).unwrap();
        }
        for _ in 0..3 {
            clock.advance(3600);
            svc.run_due_policies().await;
        }
        let snaps = svc.list_snapshots(&me, Some("v")).unwrap();
        assert_eq!(snaps.len(), 3, "one snapshot per tick, not one per policy: {snaps:?}");
        let kept_by = |p: &str| snaps.iter().filter(|s| s.policies.iter().any(|q| q == p)).count();
        assert_eq!((kept_by("short"), kept_by("long")), (1, 3));
        let short = svc.policy_history(&me, "short", None).unwrap();
        assert!(short.iter().all(|e| e.outcome == Outcome::Taken));
        assert!(short.last().unwrap().removed.iter().all(|r| r.contains("still kept by another policy")));
        // "long" removed from the volume: the two only it kept are nobody's now and stay
        // (retention only removes what a policy keeps); the third, shared, is short's alone,
        // and its next tick replaces it.
        svc.remove_policy(&me, "long", PolicyVolumes { volumes: vec!["v".into()], groups: vec![] }).unwrap();
        clock.advance(3600);
        svc.run_due_policies().await;
        let snaps = svc.list_snapshots(&me, Some("v")).unwrap();
        assert_eq!(snaps.len(), 3, "{snaps:?}");
        assert_eq!(snaps.iter().filter(|s| s.policies.is_empty()).count(), 2);
        svc.engine.stop_background();
    }
}

impl Service {
    /// Records a tick's outcome in the book of `target` (a volume id or a group's book key)
    /// and the history. Not synced (one sync per tick, the intent's): a power loss that loses
    /// this line leaves the intent, which books the snapshot at start (`settle`,
    /// `settle_groups`); retention decides again at the next tick.
    fn record_tick(&self, p: &Policy, target: &str, now: u64, entry: &HistoryEntry) {
        let mut st = self.lifecycle.lock();
        let book = st.book(&p.id, target);
        book.last_attempt = Some(now);
        if entry.outcome != Outcome::Failed {
            book.last_success = Some(now);
        }
        st.record(&p.id, entry.clone());
        if let Err(e) = self.lifecycle_file.save_unsynced(&mut st) {
            tracing::error!(policy = %p.name, error = %e, "cannot record a policy tick");
        }
    }

    /// One tick of policy `p` on consistency group `group`: a group snapshot (its name
    /// recorded first, synced, as a volume tick's), then retention over the policy's group
    /// snapshots of the group, each kept or deleted whole.
    pub(super) async fn tick_group(&self, p: &Policy, group: &str) -> HistoryEntry {
        let now = self.engine.clock().now();
        let key = group_book(group);
        let label = format!("group {group}");
        let name = p.snapshot_name(now);
        let taken = async {
            {
                let mut st = self.lifecycle.lock();
                st.book(&p.id, &key).creating = Some(name.clone());
                self.save_lifecycle(&mut st)?;
            }
            let req = super::CreateGroupSnapshot {
                name: name.clone(),
                description: format!("taken by policy {} ({})", p.name, p.id),
                consistency: None,
                durable: false,
            };
            let created = self.take_group_snapshot(&Caller::Daemon("policy"), group, req, Taker::Policy).await;
            let mut st = self.lifecycle.lock();
            let book = st.book(&p.id, &key);
            book.creating = None;
            if let Ok(g) = &created {
                book.snapshots.push(g.id.clone());
            }
            created
        }
        .await;
        let mut entry = match taken {
            Ok(_) => HistoryEntry {
                at: now,
                volume: label,
                outcome: Outcome::Taken,
                snapshot: Some(name),
                reason: None,
                removed: Vec::new(),
            },
            Err(e) => failed(now, label, None, format!("{e}; nothing was pruned")),
        };
        if entry.outcome == Outcome::Taken {
            match self.prune_group(p, group).await {
                Ok(removed) => entry.removed = removed,
                Err(e) => entry.reason = Some(format!("nothing pruned: {e}")),
            }
        }
        self.record_tick(p, &key, now, &entry);
        tracing::info!(policy = %p.name, group, outcome = ?entry.outcome, removed = entry.removed.len(), "policy tick");
        entry
    }

    /// Retention over the policy's group snapshots of `group`: a group snapshot with a held
    /// member is held; one retention lets go is deleted whole (`delete_group_snapshot`).
    async fn prune_group(&self, p: &Policy, group: &str) -> Result<Vec<String>> {
        let compiled = p.compile().map_err(Error::Invalid)?;
        let key = group_book(group);
        let (candidates, mut names) = {
            let st = self.lifecycle.lock();
            let ids = st.books.get(&p.id).and_then(|b| b.get(&key)).map(|b| b.snapshots.clone()).unwrap_or_default();
            let mut candidates = Vec::new();
            let mut names = HashMap::new();
            for id in ids {
                let Some(g) = st.group_snapshots.get(&id).filter(|g| !g.pending && !g.deleting) else { continue };
                let held = g.members.iter().any(|(_, s)| st.holds.contains_key(s));
                candidates.push(Candidate { id: id.clone(), created: g.created as i64, held });
                names.insert(id, g.name.clone());
            }
            (candidates, names)
        };
        let now = self.engine.clock().now() as i64;
        let mut removed = Vec::new();
        for (c, verdict) in p.retention.select(&candidates, now, |t| compiled.local(t)) {
            if verdict.keeps() {
                continue;
            }
            match self.delete_group_snapshot(&Caller::Daemon("retention"), &c.id).await {
                Ok(()) => {
                    let mut st = self.lifecycle.lock();
                    st.book(&p.id, &key).snapshots.retain(|s| s != &c.id);
                    removed.push(names.remove(&c.id).unwrap_or(c.id));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(policy = %p.name, group_snapshot = %c.id, error = %e, "retention could not delete a group snapshot; it stays")
                }
            }
        }
        Ok(removed)
    }
}
