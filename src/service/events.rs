//! The daemon's event log: what happened to snapshots, volumes, policies, quotas and uploads
//! (`snapblk events [--follow]`). Kept in `DIR/meta/events.jsonl`, one JSON object per line,
//! appended as events happen (written, not synced: an event log is not worth a disk flush on
//! every snapshot; a kill -9 loses nothing, a power loss the last seconds). Bounded: the
//! newest [`KEPT`] are kept; the file is rewritten when it reaches twice that.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Access, Caller, Result, Service};

/// Events kept (in memory and in the file).
pub const KEPT: usize = 10_000;
/// Longest a `wait` for new events lasts.
const MAX_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    SnapshotTaken {
        volume: String,
        snapshot: String,
        id: String,
        by: String,
    },
    /// Deleted by a client (into the recycle bin, or for good).
    SnapshotDeleted {
        volume: String,
        snapshot: String,
        id: String,
        by: String,
        to_bin: bool,
    },
    /// Removed by a policy's retention (`by` names it), or by the recycle bin when its time
    /// was up.
    SnapshotExpired {
        volume: String,
        snapshot: String,
        id: String,
        by: String,
        to_bin: bool,
    },
    SnapshotRestored {
        volume: String,
        snapshot: String,
        id: String,
        by: String,
    },
    /// Deleted for good from the recycle bin before its time.
    SnapshotPurged {
        volume: String,
        snapshot: String,
        id: String,
        by: String,
    },
    /// Shared with account `with` (`snapshot share`).
    SnapshotShared {
        volume: String,
        snapshot: String,
        id: String,
        with: String,
        by: String,
    },
    /// A share ended (`snapshot unshare`): volumes made from it load until `grace_until`.
    SnapshotUnshared {
        volume: String,
        snapshot: String,
        id: String,
        with: String,
        grace_until: u64,
        by: String,
    },
    /// A volume of one account made from a snapshot another account shared with it.
    SharedVolumeCreated {
        volume: String,
        from: String,
        owner: String,
        by: String,
    },
    VolumeDeleted {
        volume: String,
        id: String,
        /// Snapshots of it that remain (kept policy snapshots, or in the bin).
        snapshots_left: usize,
        by: String,
    },
    PolicySkipped {
        policy: String,
        volume: String,
        reason: String,
    },
    PolicyFailed {
        policy: String,
        volume: String,
        error: String,
    },
    QuotaHit {
        volume: String,
        message: String,
    },
    UploadFailed {
        volume: String,
        snapshot: String,
        id: String,
        error: String,
    },
    /// A copy (`snapshot copy`) or an archive (`snapshot archive`) of snapshot `id` was
    /// published in `to_region` as `copy_id`; `note` says what became of the standard copy.
    SnapshotCopied {
        volume: String,
        snapshot: String,
        id: String,
        to_region: String,
        copy_id: String,
        archived: bool,
        #[serde(default)]
        note: Option<String>,
    },
    /// A snapshot stored only in a region (a copy, an archived one) deleted;
    /// `before_retention`: forced before its minimum retention (until then).
    StoredSnapshotDeleted {
        volume: String,
        snapshot: String,
        id: String,
        region: String,
        by: String,
        #[serde(default)]
        before_retention: Option<u64>,
    },
    AccountCreated {
        account: String,
        by: String,
    },
    AccountDeleted {
        account: String,
        by: String,
    },
    TokenCreated {
        account: String,
        token: String,
        role: String,
        by: String,
    },
    TokenRevoked {
        account: String,
        token: String,
        by: String,
    },
}

impl Event {
    /// Whether the event concerns `account`: its owner's, or the other side of a share.
    pub fn concerns(&self, sees: impl Fn(&str) -> bool) -> bool {
        let other = match self {
            Event::SnapshotShared { with, .. } | Event::SnapshotUnshared { with, .. } => Some(with.as_str()),
            Event::SharedVolumeCreated { owner, .. } => Some(owner.as_str()),
            _ => None,
        };
        sees(self.account()) || other.is_some_and(sees)
    }

    /// The account the event is about: only its callers (and administrators) see it.
    pub fn account(&self) -> &str {
        use super::accounts::owner_of;
        match self {
            Event::SnapshotTaken { volume, .. }
            | Event::SnapshotDeleted { volume, .. }
            | Event::SnapshotExpired { volume, .. }
            | Event::SnapshotRestored { volume, .. }
            | Event::SnapshotPurged { volume, .. }
            | Event::SnapshotShared { volume, .. }
            | Event::SnapshotUnshared { volume, .. }
            | Event::SharedVolumeCreated { volume, .. }
            | Event::VolumeDeleted { volume, .. }
            | Event::QuotaHit { volume, .. }
            | Event::UploadFailed { volume, .. }
            | Event::SnapshotCopied { volume, .. }
            | Event::StoredSnapshotDeleted { volume, .. } => owner_of(volume),
            Event::PolicySkipped { policy, .. } | Event::PolicyFailed { policy, .. } => owner_of(policy),
            Event::AccountCreated { account, .. }
            | Event::AccountDeleted { account, .. }
            | Event::TokenCreated { account, .. }
            | Event::TokenRevoked { account, .. } => account,
        }
    }
}

/// One event, numbered (`seq` grows by one per event, across restarts).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    pub at: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// `GET /v1/events`: the newest `limit` events after `after`; with `wait`, waits (up to a
/// minute) for one when there is none yet.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventQuery {
    #[serde(default)]
    pub after: Option<u64>,
    #[serde(default)]
    pub limit: Option<usize>,
    /// Seconds.
    #[serde(default)]
    pub wait: Option<u64>,
}

pub(super) struct EventLog {
    path: PathBuf,
    inner: parking_lot::Mutex<Inner>,
    /// Bumped (to the newest seq) at every event, for waiters.
    newest: tokio::sync::watch::Sender<u64>,
}

struct Inner {
    recent: VecDeque<EventRecord>,
    /// Lines in the file (rewritten from `recent` at 2 × KEPT).
    lines: usize,
    file: Option<std::fs::File>,
}

impl EventLog {
    /// Opens the log; a damaged line (a torn last write) is skipped.
    pub fn open(dir: &Path) -> EventLog {
        let path = dir.join("meta").join("events.jsonl");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut recent: VecDeque<EventRecord> = VecDeque::new();
        let mut lines = 0;
        for line in text.lines() {
            lines += 1;
            if let Ok(r) = serde_json::from_str::<EventRecord>(line) {
                if recent.len() == KEPT {
                    recent.pop_front();
                }
                recent.push_back(r);
            }
        }
        let newest = recent.back().map_or(0, |r| r.seq);
        let log = EventLog {
            path,
            inner: parking_lot::Mutex::new(Inner { recent, lines, file: None }),
            newest: tokio::sync::watch::channel(newest).0,
        };
        log.rewrite_if_long(&mut log.inner.lock());
        log
    }

    pub fn append(&self, at: u64, event: Event) {
        self.append_all(at, [event]);
    }

    /// Appends events in one write (a group snapshot's, one per member).
    pub fn append_all(&self, at: u64, events: impl IntoIterator<Item = Event>) {
        let mut inner = self.inner.lock();
        let mut seq = inner.recent.back().map_or(0, |r| r.seq);
        let mut lines = Vec::new();
        for event in events {
            seq += 1;
            let record = EventRecord { seq, at, event };
            if serde_json::to_writer(&mut lines, &record).is_ok() {
                lines.push(b'\n');
                inner.lines += 1;
            }
            if inner.recent.len() == KEPT {
                inner.recent.pop_front();
            }
            inner.recent.push_back(record);
        }
        if inner.file.is_none() {
            inner.file = crate::fsutil::open_append(&self.path)
                .map_err(|e| tracing::warn!(path = %self.path.display(), error = %e, "cannot open the event log"))
                .ok();
        }
        if let Some(f) = &mut inner.file {
            if let Err(e) = f.write_all(&lines) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write the event log");
            }
        }
        self.rewrite_if_long(&mut inner);
        drop(inner);
        self.newest.send_replace(seq);
    }

    fn rewrite_if_long(&self, inner: &mut Inner) {
        if inner.lines < 2 * KEPT {
            return;
        }
        let mut bytes = Vec::new();
        for r in &inner.recent {
            if serde_json::to_writer(&mut bytes, r).is_ok() {
                bytes.push(b'\n');
            }
        }
        match crate::fsutil::replace_file(&self.path, &bytes, false) {
            Ok(()) => {
                inner.lines = inner.recent.len();
                inner.file = None;
            }
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot shorten the event log"),
        }
    }

    fn after(&self, after: u64, limit: usize, seen: impl Fn(&Event) -> bool) -> Vec<EventRecord> {
        let inner = self.inner.lock();
        let newer: Vec<&EventRecord> = inner.recent.iter().filter(|r| r.seq > after && seen(&r.event)).collect();
        newer[newer.len().saturating_sub(limit)..].iter().map(|r| (*r).clone()).collect()
    }
}

impl Service {
    /// Records an event (and logs nothing more: the operation logged it).
    pub(super) fn event(&self, event: Event) {
        self.events.append(self.engine.clock().now(), event);
    }

    /// Several events, written at once.
    pub(super) fn events_all(&self, events: impl IntoIterator<Item = Event>) {
        self.events.append_all(self.engine.clock().now(), events);
    }

    /// A failed upload, told by the store.
    pub(super) fn upload_failed(&self, id: &str, error: &str) {
        let (volume, snapshot) = match self.engine.snapshot(id) {
            Ok(s) => (s.volume, s.name),
            Err(_) => (String::new(), String::new()),
        };
        self.event(Event::UploadFailed { volume, snapshot, id: id.to_string(), error: error.to_string() });
    }

    /// The newest events (100 by default) after `after`; with `wait`, the call waits for the
    /// next one when there is none yet.
    pub async fn events(&self, caller: &Caller, q: EventQuery) -> Result<Vec<EventRecord>> {
        caller.may(Access::Read)?;
        let after = q.after.unwrap_or(0);
        let limit = q.limit.unwrap_or(100).clamp(1, KEPT);
        let mut newest = self.events.newest.subscribe();
        let seen = |e: &Event| e.concerns(|a| caller.sees_account(a));
        let found = self.events.after(after, limit, seen);
        let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(MAX_WAIT);
        if !found.is_empty() || wait.is_zero() {
            return Ok(found);
        }
        let _ = tokio::time::timeout(wait, newest.wait_for(|seq| *seq > after)).await;
        Ok(self.events.after(after, limit, seen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(n: usize) -> Event {
        Event::QuotaHit { volume: "v".into(), message: format!("m{n}") }
    }

    #[test]
    fn events_survive_a_reopen_are_numbered_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("meta")).unwrap();
        let log = EventLog::open(dir.path());
        for n in 0..3 {
            log.append(100 + n as u64, quota(n));
        }
        drop(log);
        let log = EventLog::open(dir.path());
        let all = log.after(0, 10, |_| true);
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all[2].event, quota(2));
        assert_eq!(log.after(1, 1, |_| true).iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3], "the newest after 1");
        // A torn last line is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("meta/events.jsonl"))
            .unwrap()
            .write_all(b"{\"seq\":4,\"at\"")
            .unwrap();
        drop(log);
        let log = EventLog::open(dir.path());
        assert_eq!(log.after(0, 10, |_| true).len(), 3);
        for n in 0..2 * KEPT {
            log.append(200, quota(n));
        }
        let kept = log.after(0, usize::MAX, |_| true);
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept.last().unwrap().seq, 3 + 2 * KEPT as u64);
        let lines = std::fs::read_to_string(dir.path().join("meta/events.jsonl")).unwrap().lines().count();
        assert!(lines <= 2 * KEPT, "the file is bounded: {lines} lines");
        drop(log);
        let log = EventLog::open(dir.path());
        assert_eq!(log.after(0, usize::MAX, |_| true).last().unwrap().seq, 3 + 2 * KEPT as u64, "numbering goes on");
    }
}
