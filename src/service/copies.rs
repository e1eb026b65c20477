//! Cross-region copies and the archive tier: `snapshot copy`, `snapshot archive` (with
//! `--estimate`), `snapshot restore-archive` (thawing an archived snapshot), `copy
//! list|show|cancel`, and deleting a snapshot stored only in a region (a copy, an archived
//! snapshot). The copying runs in the store (`store::copies`), the thaw in `store::thaw`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::events::Event;
use super::{Access, Caller, Error, Result, Service};
use crate::store::config::Tier;
use crate::store::copies::{CopyKind, CopyRecord, CopyState, CopyView};
use crate::store::s3::ThawTier;
use crate::store::{ThawReport, UploadState};
use crate::units::{parse_duration, parse_size, utc};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyRequest {
    pub to_region: String,
    /// The region to read the snapshot from, for one not of this node.
    #[serde(default)]
    pub from_region: Option<String>,
    /// The copy's name (default: the source snapshot's).
    #[serde(default)]
    pub name: Option<String>,
    /// e.g. "100M" (bytes per second); none: unlimited.
    #[serde(default)]
    pub bandwidth_limit: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveRequest {
    pub to_region: String,
    #[serde(default)]
    pub from_region: Option<String>,
    /// e.g. "60d" (default: the archive region's `min_retention`).
    #[serde(default)]
    pub min_retention: Option<String>,
    /// Keep the standard copy (by default it is deleted once the archive is complete).
    #[serde(default)]
    pub keep_standard: bool,
    /// Only say what the archive would add and free.
    #[serde(default)]
    pub estimate: bool,
    #[serde(default)]
    pub bandwidth_limit: Option<String>,
}

/// What `snapshot archive --estimate` says, before anything is done.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveEstimate {
    pub snapshot: String,
    pub to_region: String,
    /// Bytes the archive would add to the archive region (blobs it does not hold yet).
    pub archive_bytes_added: u64,
    /// Bytes deleting the standard copy would free in its region now (its exclusive bytes);
    /// zero with `keep_standard`.
    pub standard_bytes_freed: u64,
    /// The snapshot's logical size.
    pub logical_bytes: u64,
}

/// `snapshot restore-archive`: thaw an archived snapshot whose class needs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreArchiveRequest {
    /// The archive region holding the snapshot.
    pub region: String,
    /// How long restored objects stay readable, in days (default 7).
    #[serde(default)]
    pub days: Option<u32>,
    /// `Standard` (the default), `Bulk` or `Expedited`: how fast (and dear) the store thaws.
    #[serde(default)]
    pub tier: ThawTier,
}

/// Restored objects stay readable this many days unless the request says.
const DEFAULT_THAW_DAYS: u32 = 7;

/// The answer of `POST /v1/snapshots/{r}/archive`: the copy started, or the estimate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveAnswer {
    #[serde(default)]
    pub copy: Option<CopyView>,
    #[serde(default)]
    pub estimate: Option<ArchiveEstimate>,
}

/// A snapshot to copy, resolved.
struct Source {
    id: String,
    repo: String,
    /// `VOLUME@SNAPSHOT`.
    display: String,
    volume_id: String,
    name: String,
    created: u64,
    size: u64,
}

impl Service {
    /// Resolves a snapshot to copy: one of this node's (its upload's repository; a copy
    /// waits for the upload to end), or one stored in a region (`s-ID`, or `VOLUME@SNAPSHOT`
    /// of a volume not here).
    async fn copy_source(&self, caller: &Caller, r: &str, from: Option<&str>) -> Result<Source> {
        let from = from.map(|f| caller.repository(f)).transpose()?;
        let q = caller.qualify_ref(r);
        if self.engine.snapshot(&q).is_ok() {
            let snap = self.live_snapshot(caller, r)?;
            let display = format!("{}@{}", snap.volume, snap.name);
            let status = self.store.status(&snap.id).ok_or_else(|| {
                Error::Invalid(format!(
                    "snapshot {display} was never uploaded; upload it first: snapblk snapshot upload {display} --wait"
                ))
            })?;
            if status.state == UploadState::Failed {
                return Err(Error::Invalid(format!(
                    "the upload of {display} failed ({}); retry it with: snapblk snapshot upload {display} --wait",
                    status.reason.unwrap_or_default()
                )));
            }
            if let Some(f) = from.filter(|f| *f != status.region) {
                return Err(Error::Invalid(format!(
                    "snapshot {display} is stored in region '{}', not '{f}': leave out --from-region",
                    status.region
                )));
            }
            return Ok(Source {
                id: snap.id,
                repo: status.region,
                display,
                volume_id: snap.volume_id,
                name: snap.name,
                created: snap.created,
                size: snap.size,
            });
        }
        let id = match crate::engine::parse_snapshot_id(r) {
            Some(_) => r.to_string(),
            None => self.store.find_remote_by_name(&q, from.as_deref()).await?,
        };
        let (region, m) = self.store.find_remote(&id, caller.account(), from.as_deref()).await?;
        if !caller.sees(&m.volume_name) {
            return Err(Error::NotFound(format!(
                "no snapshot {r} in the configured regions; list them with: snapblk snapshot list --region REGION"
            )));
        }
        Ok(Source {
            id: m.snapshot_id.clone(),
            repo: region.name.clone(),
            display: format!("{}@{}", m.volume_name, m.snapshot_name),
            volume_id: m.volume_id.clone(),
            name: m.snapshot_name.clone(),
            created: m.created,
            size: m.size,
        })
    }

    /// The destination repository for the caller, checked against the source: always in the
    /// snapshot's account (the daemon's own copies, for policies, go to the owner's).
    fn copy_destination(&self, caller: &Caller, to: &str, src: &Source) -> Result<String> {
        let owner = crate::engine::owner_of(&src.repo);
        let repo = match caller {
            Caller::Daemon(_) => crate::engine::owned_name(owner, crate::engine::bare_name(to)),
            _ => caller.repository(to)?,
        };
        self.store.check_region(&repo)?;
        if crate::engine::owner_of(&repo) != owner {
            return Err(Error::Invalid(format!(
                "snapshot {} belongs to account '{owner}': copies stay in its account's repositories (--to-region {})",
                src.display,
                crate::engine::bare_name(to)
            )));
        }
        if repo == src.repo {
            return Err(Error::Invalid(format!(
                "snapshot {} is stored in region '{to}' already: copy it to another region",
                src.display
            )));
        }
        Ok(repo)
    }

    /// A copy counts against its volume's `max_concurrent_tasks` (a volume of this node).
    fn copy_allowed(&self, src: &Source) -> Result<()> {
        let Ok(volume) = self.engine.volume(&src.volume_id) else { return Ok(()) };
        let max = self.quotas_of(&volume.name).max_concurrent_tasks;
        let tasks = self.tasks_in_flight(&volume);
        if tasks >= max {
            return Err(Error::Limit {
                message: format!(
                    "volume '{}' has {tasks} snapshot creates, uploads and copies in flight, its max_concurrent_tasks; try again when one ends",
                    volume.name
                ),
                retry_after: Some(5),
            });
        }
        Ok(())
    }

    fn bandwidth(limit: Option<&str>) -> Result<u64> {
        match limit {
            None | Some("0") => Ok(0),
            Some(l) => parse_size(l).map_err(|e| Error::Invalid(format!("bandwidth limit '{l}': {e}"))),
        }
    }

    /// Starts copying a snapshot to another region (`snapshot copy`).
    pub async fn copy_snapshot(&self, caller: &Caller, r: &str, req: CopyRequest) -> Result<CopyView> {
        caller.may(Access::Snapshot)?;
        let src = self.copy_source(caller, r, req.from_region.as_deref()).await?;
        let dest = self.copy_destination(caller, &req.to_region, &src)?;
        if self.store.config.regions[crate::engine::bare_name(&dest)].tier == Tier::Archive {
            return Err(Error::Invalid(format!(
                "region '{}' is an archive region: archive into it with: snapblk snapshot archive {} --to-region {}",
                req.to_region, src.display, req.to_region
            )));
        }
        let name = req.name.clone().unwrap_or_else(|| src.name.clone());
        crate::engine::validate_name("snapshot", &name)?;
        self.copy_allowed(&src)?;
        let rec = self.copy_record(&src, dest, name, CopyKind::Copy, Self::bandwidth(req.bandwidth_limit.as_deref())?);
        Ok(self.store.start_copy(rec)?)
    }

    fn copy_record(
        &self,
        src: &Source,
        dest: String,
        name: String,
        kind: CopyKind,
        bandwidth_limit: u64,
    ) -> CopyRecord {
        CopyRecord {
            id: String::new(),
            kind,
            // (The snapshot's account, whoever started it: an administrator, a policy.)
            account: crate::engine::owner_of(&src.repo).to_string(),
            source_id: src.id.clone(),
            source_region: src.repo.clone(),
            source: src.display.clone(),
            volume_id: src.volume_id.clone(),
            dest_region: dest,
            dest_id: String::new(),
            name,
            bandwidth_limit,
            retain_until: None,
            keep_standard: false,
            state: CopyState::Running,
            error: None,
            note: None,
            created: 0,
            finished: None,
            bytes_total: 0,
            bytes_done: 0,
            bytes_read: 0,
            bytes_sent: 0,
        }
    }

    /// Thaws an archived snapshot (`snapshot restore-archive`): requests a restore of each
    /// of its pack objects that is frozen, and reports the state of them all (idempotent: a
    /// restore running or done is not requested again). Needs what creating a volume from
    /// it needs.
    pub async fn restore_archive(&self, caller: &Caller, r: &str, req: RestoreArchiveRequest) -> Result<ThawReport> {
        caller.may(Access::Restore)?;
        let repo = caller.repository(&req.region)?;
        self.store.check_region(&repo)?;
        let cfg = &self.store.config.regions[crate::engine::bare_name(&repo)];
        if cfg.tier != Tier::Archive {
            return Err(Error::Invalid(format!(
                "region '{}' is not an archive region (tier = \"archive\"): its snapshots are readable as they are; create a volume from it with: snapblk volume create NAME --from-snapshot {r} --region {}",
                req.region, req.region
            )));
        }
        let days = req.days.unwrap_or(DEFAULT_THAW_DAYS);
        if !(1..=36_500).contains(&days) {
            return Err(Error::Invalid(format!("--days {days}: restored objects stay readable 1 to 36500 days")));
        }
        let src = self.copy_source(caller, r, Some(&req.region)).await?;
        Ok(self.store.restore_archive(&src.repo, &src.id, days, req.tier).await?)
    }

    /// Archives a snapshot (`snapshot archive`): a copy into an archive region, then the
    /// standard copy is deleted (unless kept). With `estimate`, only says what it would add
    /// and free.
    pub async fn archive_snapshot(&self, caller: &Caller, r: &str, req: ArchiveRequest) -> Result<ArchiveAnswer> {
        caller.may(Access::Snapshot)?;
        if !req.keep_standard {
            caller.may(Access::Delete)?;
        }
        let src = self.copy_source(caller, r, req.from_region.as_deref()).await?;
        let dest = self.copy_destination(caller, &req.to_region, &src)?;
        let cfg = &self.store.config.regions[crate::engine::bare_name(&dest)];
        if cfg.tier != Tier::Archive {
            return Err(Error::Invalid(format!(
                "region '{}' is not an archive region (tier = \"archive\" in its [regions.{}] table): copy into it with snapblk snapshot copy",
                req.to_region, cfg.name
            )));
        }
        let now = self.engine.clock().now();
        let age = now.saturating_sub(src.created);
        if age < cfg.min_age.as_secs() {
            return Err(Error::Invalid(format!(
                "snapshot {} is {} old; region '{}' archives snapshots at least {} old (its min_age): archive it after {}",
                src.display,
                crate::units::duration_text(age),
                req.to_region,
                crate::units::duration_text(cfg.min_age.as_secs()),
                utc(src.created + cfg.min_age.as_secs())
            )));
        }
        let min_retention = match &req.min_retention {
            Some(d) => parse_duration(d).map_err(|e| Error::Invalid(format!("min_retention '{d}': {e}")))?,
            None => cfg.min_retention,
        };
        if req.estimate {
            let added = self.store.copy_estimate(&src.repo, &src.id, &dest).await?;
            let freed = match req.keep_standard {
                true => 0,
                false => {
                    self.store.accounting(&src.repo).await?.snapshots.get(&src.id).map_or(0, |b| b.exclusive_bytes)
                }
            };
            let estimate = ArchiveEstimate {
                snapshot: src.display.clone(),
                to_region: req.to_region.clone(),
                archive_bytes_added: added,
                standard_bytes_freed: freed,
                logical_bytes: src.size,
            };
            return Ok(ArchiveAnswer { copy: None, estimate: Some(estimate) });
        }
        self.copy_allowed(&src)?;
        let bandwidth = Self::bandwidth(req.bandwidth_limit.as_deref())?;
        let mut rec = self.copy_record(&src, dest, src.name.clone(), CopyKind::Archive, bandwidth);
        rec.retain_until = (!min_retention.is_zero()).then(|| now + min_retention.as_secs());
        rec.keep_standard = req.keep_standard;
        Ok(ArchiveAnswer { copy: Some(self.store.start_copy(rec)?), estimate: None })
    }

    /// A policy's regions: `copy_to` a standard region, `archive_to` an archive one, and
    /// `archive_after` only with `archive_to`.
    pub(super) fn check_policy_regions(&self, spec: &crate::policy::PolicySpec) -> Result<()> {
        let tier = |r: &str| -> Result<Tier> {
            self.store.check_region(r)?;
            Ok(self.store.config.regions[crate::engine::bare_name(r)].tier)
        };
        if let Some(r) = &spec.copy_to {
            if tier(r)? == Tier::Archive {
                return Err(Error::Invalid(format!(
                    "copy_to region '{r}' is an archive region: use --archive-after with --archive-to {r}"
                )));
            }
        }
        match (&spec.archive_to, spec.archive_after) {
            (Some(r), Some(_)) if tier(r)? != Tier::Archive => Err(Error::Invalid(format!(
                "archive_to region '{r}' is not an archive region (tier = \"archive\" in its [regions.{r}] table)"
            ))),
            (Some(_), None) | (None, Some(_)) => {
                Err(Error::Invalid("archive_after and archive_to go together: give both or neither".into()))
            }
            _ => Ok(()),
        }
    }

    /// A policy tick's copies: the new snapshot to `copy_to`, and the policy's snapshots of
    /// the volume older than `archive_after` into `archive_to` (each once). What could not
    /// be started, for the tick's history.
    pub(super) async fn policy_copies(&self, p: &crate::policy::Policy, volume_id: &str, new: &str) -> Vec<String> {
        let policy = Caller::Daemon("policy");
        let mut problems = Vec::new();
        // Copies already made (or running) of a snapshot into a region.
        let started = |id: &str, kind: CopyKind| {
            self.store.copy_views().iter().any(|c| {
                c.record.source_id == id
                    && c.record.kind == kind
                    && !matches!(c.record.state, CopyState::Failed | CopyState::Cancelled)
            })
        };
        if let Some(to) = &p.copy_to {
            if !started(new, CopyKind::Copy) {
                let req = CopyRequest { to_region: to.clone(), from_region: None, name: None, bandwidth_limit: None };
                if let Err(e) = self.copy_snapshot(&policy, new, req).await {
                    problems.push(format!("copy to {to} not started: {e}"));
                }
            }
        }
        if let (Some(after), Some(to)) = (p.archive_after, &p.archive_to) {
            let now = self.engine.clock().now();
            let book: Vec<String> = self
                .lifecycle
                .lock()
                .books
                .get(&p.id)
                .and_then(|b| b.get(volume_id))
                .map(|b| b.snapshots.clone())
                .unwrap_or_default();
            for id in book {
                let Ok(s) = self.engine.snapshot(&id) else { continue };
                if s.created + after > now || started(&id, CopyKind::Archive) {
                    continue;
                }
                let req = ArchiveRequest {
                    to_region: to.clone(),
                    from_region: None,
                    min_retention: None,
                    keep_standard: false,
                    estimate: false,
                    bandwidth_limit: None,
                };
                if let Err(e) = self.archive_snapshot(&policy, &id, req).await {
                    problems.push(format!("archive of {}@{} not started: {e}", s.volume, s.name));
                }
            }
        }
        problems
    }

    /// The copies the caller's account started (an administrator: every one).
    pub fn copies(&self, caller: &Caller) -> Result<Vec<CopyView>> {
        caller.may(Access::Read)?;
        Ok(self.store.copy_views().into_iter().filter(|c| caller.sees_account(&c.record.account)).collect())
    }

    pub fn copy(&self, caller: &Caller, id: &str) -> Result<CopyView> {
        caller.may(Access::Read)?;
        self.store
            .copy_view(id)
            .filter(|c| caller.sees_account(&c.record.account))
            .ok_or_else(|| Error::NotFound(format!("no copy {id}; list them with: snapblk copy list")))
    }

    pub fn cancel_copy(&self, caller: &Caller, id: &str) -> Result<CopyView> {
        caller.may(Access::Snapshot)?;
        self.copy(caller, id)?;
        Ok(self.store.cancel_copy(id)?)
    }

    /// Once a copy is published: the event, and for an archive the standard copy's delete
    /// (through the delete operation: holds, shares and group snapshots keep it, said in
    /// the note). An upload of another node is its own to delete.
    pub(super) async fn copy_done(self: Arc<Self>, rec: CopyRecord) -> Option<String> {
        let note = match rec.kind {
            CopyKind::Archive if !rec.keep_standard => Some(self.delete_standard(&rec).await),
            _ => None,
        };
        self.event(Event::SnapshotCopied {
            volume: rec.source.split_once('@').map_or(rec.source.clone(), |(v, _)| v.to_string()),
            snapshot: rec.name.clone(),
            id: rec.source_id.clone(),
            to_region: rec.dest_region.clone(),
            copy_id: rec.dest_id.clone(),
            archived: rec.kind == CopyKind::Archive,
            note: note.clone(),
        });
        note
    }

    async fn delete_standard(&self, rec: &CopyRecord) -> String {
        let archiver = Caller::Daemon("archive");
        if self.engine.snapshot(&rec.source_id).is_ok() {
            return match self.delete_snapshot(&archiver, &rec.source_id).await {
                Ok(()) => format!("standard copy deleted ({} in region {})", rec.source, rec.source_region),
                Err(e) => format!("standard copy kept: {e}"),
            };
        }
        match self.delete_stored(&archiver, &rec.source_id, &rec.source_region, false).await {
            Ok(()) => format!("standard copy deleted ({} in region {})", rec.source, rec.source_region),
            Err(e) => format!("standard copy kept: {e}"),
        }
    }

    /// Deletes a snapshot stored only in a region — a copy, or an archived snapshot — by id.
    /// Refused before an archived snapshot's minimum retention unless `force` (the event says
    /// so), while another node loads from it, and for another node's upload unless `force`
    /// (that node deletes its own snapshots; deleting only its store copy would break it once
    /// its local data is released).
    pub async fn delete_stored_snapshot(&self, caller: &Caller, id: &str, region: &str, force: bool) -> Result<()> {
        caller.may(Access::Delete)?;
        let repo = caller.repository(region)?;
        self.delete_stored(caller, id, &repo, force).await
    }

    async fn delete_stored(&self, caller: &Caller, id: &str, repo: &str, force: bool) -> Result<()> {
        let region = self.store.region(repo).await?;
        region.forget_manifest(id);
        let m = region.manifest(id).await.map_err(|e| match e {
            crate::store::StoreError::Missing(_) => Error::NotFound(format!(
                "no snapshot {id} in region '{repo}'; list them with: snapblk snapshot list --region {repo}"
            )),
            e => e.into(),
        })?;
        if !caller.sees(&m.volume_name) {
            return Err(Error::NotFound(format!("no snapshot {id} in region '{repo}'")));
        }
        if self.engine.snapshot(id).is_ok() {
            return Err(Error::Invalid(format!(
                "{id} is a snapshot of this node: delete it with snapblk snapshot delete {}@{}",
                m.volume_name, m.snapshot_name
            )));
        }
        if m.source.is_none() && !force {
            return Err(Error::Invalid(format!(
                "{id} in region '{repo}' is the upload of {}@{} by the node that has that volume: delete it there (deleting only its store copy breaks that node's snapshot once its local data is released), or pass --force",
                m.volume_name, m.snapshot_name
            )));
        }
        let now = self.engine.clock().now();
        let early = m.retain_until.filter(|until| *until > now);
        if let (Some(until), false) = (early, force) {
            return Err(Error::Held(format!(
                "archived snapshot {id} ({}@{}) is under its minimum retention until {}; deleting it sooner needs --force",
                m.volume_name,
                m.snapshot_name,
                utc(until)
            )));
        }
        if !self.store.delete_stored_manifest(&region, id).await? {
            let holders: Vec<String> = self.store.foreign_holds(repo, id).await?.into_iter().map(|h| h.node).collect();
            return Err(Error::Engine(crate::engine::EngineError::Busy(format!(
                "snapshot {id} in region '{repo}' is held by node(s) {} loading from it; try again when they are done",
                holders.join(", ")
            ))));
        }
        self.event(Event::StoredSnapshotDeleted {
            volume: m.volume_name.clone(),
            snapshot: m.snapshot_name.clone(),
            id: id.to_string(),
            region: repo.to_string(),
            by: caller.to_string(),
            before_retention: early,
        });
        Ok(())
    }
}
