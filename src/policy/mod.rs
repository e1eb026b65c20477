//! Automatic snapshot policies: what a policy is ([`Policy`]), when it fires ([`schedule`])
//! and which of its snapshots it keeps ([`retention`]). Pure; the operations layer stores
//! policies and runs them (`service/policies.rs`).

pub mod retention;
pub mod schedule;

use serde::{Deserialize, Serialize};

pub use retention::{Candidate, Retention, Verdict};

pub use schedule::{Compiled, Schedule};

/// Most policies one volume may carry.
pub const MAX_POLICIES_PER_VOLUME: usize = 10;

/// What a policy is, as `policy create` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub name: String,
    pub schedule: Schedule,
    /// IANA time zone of the schedule and of retention's periods.
    #[serde(default = "utc")]
    pub tz: String,
    #[serde(default)]
    pub retention: Retention,
    #[serde(default)]
    pub overlap: Overlap,
    #[serde(default)]
    pub missed: Missed,
    /// Skip a tick when nothing was written since the volume's last snapshot.
    #[serde(default)]
    pub skip_if_unchanged: bool,
    /// A tick waits for its snapshot's upload before it prunes.
    #[serde(default)]
    pub after_upload: bool,
    /// What happens to the snapshots it took of a volume when the volume is deleted.
    #[serde(default)]
    pub on_volume_delete: OnVolumeDelete,
    /// Copy each snapshot it takes to this region once uploaded (`snapshot copy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_to: Option<String>,
    /// Archive the snapshots it took once this old (seconds) into `archive_to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_to: Option<String>,
}

fn utc() -> String {
    "UTC".into()
}

/// A policy: its spec, its id, and the volumes it is applied to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// `p-` and 16 hex digits; retention is keyed by it, never by the name.
    pub id: String,
    #[serde(flatten)]
    pub spec: PolicySpec,
    /// Volume ids.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Consistency groups (names): each tick takes a group snapshot of the group, and
    /// retention keeps or deletes group snapshots whole.
    #[serde(default)]
    pub groups: Vec<String>,
    pub created: u64,
}

/// A policy reads as its spec (`p.name`, `p.retention`).
impl std::ops::Deref for Policy {
    type Target = PolicySpec;
    fn deref(&self) -> &PolicySpec {
        &self.spec
    }
}

/// What a volume's delete does to the snapshots a policy took of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnVolumeDelete {
    /// They stay (listed under the deleted volume) until deleted by hand, like manual ones.
    #[default]
    Keep,
    /// They are deleted with the volume (into the recycle bin, when it is on).
    Apply,
}

/// A tick that comes while the previous one for that volume still runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Overlap {
    /// It is skipped (and the skip recorded in the history).
    #[default]
    Skip,
    /// It waits for the running one (at most one waits).
    Queue,
}

/// Ticks that came while the daemon was down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// Skipped; the policy goes on from the next firing.
    #[default]
    Skip,
    /// One catch-up tick at start, however many were missed.
    RunOnce,
}

impl Policy {
    /// The name of the snapshot a tick at `t` takes: `auto-<policy>-<UTC time>`.
    pub fn snapshot_name(&self, t: u64) -> String {
        let ts = jiff::Timestamp::from_second(t as i64).unwrap_or_default();
        // The name without its account prefix (`acme/daily` takes `auto-daily-…`).
        let bare = self.name.rsplit('/').next().unwrap_or(&self.name);
        format!("auto-{bare}-{}", ts.strftime("%Y%m%dT%H%M%SZ"))
    }

    pub fn compile(&self) -> Result<Compiled, String> {
        self.schedule.compile(&self.tz, self.created)
    }
}
