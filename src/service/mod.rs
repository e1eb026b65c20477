//! The operations layer: every user-visible operation, once. The HTTP API, the NBD catalog and
//! background work (periodic GC; later policies and copies) call it; the CLI calls it through
//! the API. An operation takes the [`Caller`] asking and a typed request, does the engine and
//! store orchestration, and returns a view; its errors are [`Error`], which each interface
//! maps in one place (HTTP status in `control::api`, NBD errors in `frontend`).
//!
//! One file per resource: a new resource is a new file here, one in `control/api/` and one in
//! `control/cli/`.

mod accounts;
mod bin;
mod copies;
mod direct;
mod events;
mod exports;
mod groups;
mod holds;
mod images;
mod lifecycle;
mod metrics;
mod policies;
mod quotas;
mod regions;
mod shares;
mod snapshots;
#[cfg(test)]
mod testing;
mod volumes;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use accounts::{owner_of, AccountView, CreateAccount, CreateToken, NewToken, Role, TokenView, DEFAULT_ACCOUNT};
pub use bin::{BinView, BinnedView, PurgeRequest};
pub use copies::{ArchiveAnswer, ArchiveEstimate, ArchiveRequest, CopyRequest, RestoreArchiveRequest};
pub use direct::{
    is_staging_name, BlockPage, BlockSnapshot, ChangedBlock, ChangedPage, DirectStatus, StartDirect, StartedView,
    BLOCK_SIZE,
};
pub use events::{Event, EventQuery, EventRecord};
pub use exports::ExportHandle;
pub use groups::{CreateGroup, CreateGroupSnapshot, GroupMemberRequest, GroupSnapshotView, GroupView, RestoreGroup};
pub use holds::HoldRequest;
pub use images::{CreateImage, DeployImage, ExportImage, ExportManifest, ImageFormat, ImageView, ImportImage};
pub use lifecycle::{BinLock, Binned, HistoryEntry, Hold, Outcome};
pub use policies::{CreatePolicy, PolicyTarget, PolicyView, PolicyVolumeView, PolicyVolumes, PruneView};
pub use quotas::QuotaView;
pub use regions::{GcRequest, KeyFile};
pub use shares::{ShareRequest, ShareView, SharedQuery, UnshareRequest};
pub use snapshots::{CloneSnapshot, CreateSnapshot, ExportRequest, MemberOf, Rollback, SnapshotView};
pub use volumes::{CreateVolume, VolumeView};

use crate::attach::Attachments;
use crate::engine::{Engine, EngineError, ErrorKind};
use crate::jobs::{JobView, Jobs};
use crate::store::{StoreError, StoreService};

/// Who asks for an operation: [`Caller::may`] checks its role, [`Caller::sees`] which
/// account's resources it may touch (see [`accounts`] for how names carry their owner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A client of the control socket or the NBD socket: the daemon's user or its
    /// `--socket-group`, an administrator.
    Local,
    /// The daemon's own background work (e.g. `gc`).
    Daemon(&'static str),
    /// A client of the HTTPS API, by its bearer token.
    Account { account: String, role: Role, token: String },
}

/// What an operation does with what it touches: the permission it needs (each role's set is
/// [`Role::allows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Looks (lists, shows, reads data, verifies).
    Read,
    /// Takes snapshots and uploads them.
    Snapshot,
    /// Makes new volumes from snapshots (restore, clone) and loads them.
    Restore,
    /// Creates volumes and writes to them (read-write exports).
    Write,
    /// Deletes, rolls back, restores from the recycle bin: what can destroy data.
    Delete,
    /// Changes what runs by itself or protects data: policies, groups, holds, tokens.
    Manage,
    /// Touches the daemon itself or every account (regions' keys, GC, accounts, the bin's lock,
    /// kernel devices, files of the daemon's machine).
    Admin,
}

impl Access {
    fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Snapshot => "snapshot",
            Access::Restore => "restore",
            Access::Write => "write",
            Access::Delete => "delete",
            Access::Manage => "manage",
            Access::Admin => "admin",
        }
    }
}

impl Caller {
    pub fn may(&self, access: Access) -> Result<()> {
        match self {
            Caller::Local | Caller::Daemon(_) => Ok(()),
            Caller::Account { role, .. } if role.allows(access) => Ok(()),
            Caller::Account { role, .. } => {
                let roles: Vec<&str> = Role::ALL.iter().filter(|r| r.allows(access)).map(|r| r.name()).collect();
                Err(Error::Forbidden(format!(
                    "role {role} lacks the '{}' permission this needs (roles with it: {})",
                    access.name(),
                    roles.join(", ")
                )))
            }
        }
    }

    /// Whether the caller may touch account `account`'s resources (administrators: all).
    pub fn sees_account(&self, account: &str) -> bool {
        match self {
            Caller::Account { account: own, role, .. } => *role == Role::Admin || own == account,
            Caller::Local | Caller::Daemon(_) => true,
        }
    }

    /// The account the caller acts for (administrators of the socket: `default`).
    pub fn account(&self) -> &str {
        match self {
            Caller::Account { account, .. } => account,
            Caller::Local | Caller::Daemon(_) => accounts::DEFAULT_ACCOUNT,
        }
    }

    /// A region as the caller names it, as the repository it means (`local` → the caller's
    /// account's repository in region `local`; `ACCOUNT/REGION` another account's, for
    /// administrators); another account's is refused as missing.
    pub fn repository(&self, region: &str) -> Result<String> {
        let repo = self.qualify(region);
        if self.sees(&repo) {
            Ok(repo)
        } else {
            Err(Error::NotFound(format!("no region named '{region}'")))
        }
    }

    /// Whether the caller may touch the resource stored under `name`.
    pub fn sees(&self, name: &str) -> bool {
        self.sees_account(accounts::owner_of(name))
    }

    /// A name as the caller typed it, as stored: a bare name of an account's caller gets its
    /// account's prefix; administrators name other accounts' resources `ACCOUNT/NAME`.
    pub fn qualify(&self, name: &str) -> String {
        // `default/NAME` is how an account's caller names the default account's `NAME`.
        if let Some(bare) = name.strip_prefix("default/") {
            return bare.to_string();
        }
        match self {
            Caller::Account { account, .. } if !name.contains('/') => accounts::owned_name(account, name),
            _ => name.to_string(),
        }
    }

    /// A volume or snapshot reference as stored: `NAME`, `NAME@SNAPSHOT`, ids as they are.
    pub fn qualify_ref(&self, r: &str) -> String {
        if crate::engine::parse_volume_id(r).is_some() || crate::engine::parse_snapshot_id(r).is_some() {
            return r.to_string();
        }
        match r.split_once('@') {
            Some((volume, snapshot)) => format!("{}@{snapshot}", self.qualify(volume)),
            None => self.qualify(r),
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Local => f.write_str("local client"),
            Caller::Daemon(what) => write!(f, "daemon ({what})"),
            Caller::Account { account, role, token } => write!(f, "account {account} ({role}, token {token})"),
        }
    }
}

/// The operations layer's one error type: the layers' errors as they are, plus refusals of
/// the requests themselves. [`Error::kind`] is what interfaces map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request itself is wrong (a missing or contradictory field).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The snapshot is held.
    #[error("{0}")]
    Held(String),
    /// Over a quota or a task limit; `retry_after` (seconds) when waiting lifts it.
    #[error("{message}")]
    Limit { message: String, retry_after: Option<u64> },
    /// A background task failed to finish (it panicked or the daemon is stopping).
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller's role lacks the permission the operation needs.
    #[error("{0}")]
    Forbidden(String),
    /// The caller did not prove who it is.
    #[error("{0}")]
    Unauthenticated(String),
    /// A block-level request (the EBS direct API's) breaks one of its rules; `reason` names
    /// the rule as that API does (`INVALID_BLOCK`, `INVALID_SNAPSHOT_ID`, ...).
    #[error("{message}")]
    Rule { reason: &'static str, message: String },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Engine(e) => e.kind(),
            Error::Store(e) => e.kind(),
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Held(_) => ErrorKind::Busy,
            Error::Limit { retry_after: None, .. } => ErrorKind::Quota,
            Error::Limit { retry_after: Some(_), .. } => ErrorKind::Throttled,
            Error::Internal(_) => ErrorKind::Io,
            Error::Forbidden(_) => ErrorKind::Forbidden,
            Error::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Error::Rule { .. } => ErrorKind::Invalid,
        }
    }

    /// How long to wait before trying again, when waiting helps.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Error::Limit { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl crate::jobs::HasKind for Error {
    fn kind(&self) -> ErrorKind {
        Error::kind(self)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the daemon is: fixed when it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub dir: PathBuf,
    pub pid: u32,
    pub nbd_socket: PathBuf,
    pub nbd_tcp: Option<String>,
    /// The HTTPS control API's address (`serve --api-listen`), if served.
    #[serde(default)]
    pub api: Option<String>,
}

/// What `GET /v1/status` reports: the daemon, and the state of its work with the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    #[serde(flatten)]
    pub daemon: Status,
    /// Snapshots are uploaded when taken (`[upload] enabled`).
    pub upload: bool,
    /// Store copies of deleted snapshots still to be deleted (retried every second while their
    /// region is unreachable or volumes still load from them), by region.
    pub store_deletes_pending: std::collections::BTreeMap<String, u64>,
}

/// The control handle of the daemon's operations.
pub struct Service {
    engine: Arc<Engine>,
    store: Arc<StoreService>,
    attachments: Arc<Attachments>,
    jobs: Jobs,
    status: Status,
    /// Policies, their books and history, holds (`DIR/meta/lifecycle.json`).
    lifecycle: parking_lot::Mutex<lifecycle::LifecycleState>,
    lifecycle_file: lifecycle::StateFile,
    running: policies::Running,
    /// Serializes policy ticks' creates per volume, so policies firing together share one
    /// snapshot.
    tick_locks: policies::TickLocks,
    creating: quotas::Creating,
    events: events::EventLog,
    accounts: accounts::Accounts,
    /// Snapshots being written block by block (the EBS direct API).
    direct: direct::DirectState,
}

impl Service {
    /// Runs inside the daemon's main runtime (jobs run there). Loads the lifecycle state and
    /// settles what a tick was doing when the daemon stopped.
    pub fn new(
        engine: Arc<Engine>,
        store: Arc<StoreService>,
        attachments: Arc<Attachments>,
        status: Status,
    ) -> Result<Arc<Service>> {
        let jobs = Jobs::new(tokio::runtime::Handle::current());
        let (lifecycle_file, mut state) = lifecycle::StateFile::open(engine.dir())?;
        state.settle(&engine);
        state.settle_groups(&engine);
        if state.lock_bin_at_start(&store.config.recycle_bin, engine.clock().now()) {
            tracing::info!("recycle bin locked (lock = true)");
        }
        lifecycle_file.compact(&mut state)?;
        let events = events::EventLog::open(engine.dir());
        let accounts = accounts::Accounts::open(engine.dir())?;
        let svc = Arc::new(Service {
            engine,
            store,
            attachments,
            jobs,
            status,
            lifecycle: parking_lot::Mutex::new(state),
            lifecycle_file,
            running: policies::Running::default(),
            tick_locks: policies::TickLocks::default(),
            creating: quotas::Creating::default(),
            events,
            accounts,
            direct: direct::DirectState::default(),
        });
        svc.settle_direct()?;
        let weak = Arc::downgrade(&svc);
        svc.store.on_upload_failed(Box::new(move |id, error| {
            if let Some(s) = weak.upgrade() {
                s.upload_failed(id, error);
            }
        }));
        let weak = Arc::downgrade(&svc);
        svc.store.on_copy_done(Box::new(move |rec| {
            let weak = weak.clone();
            Box::pin(async move {
                match weak.upgrade() {
                    Some(s) => s.copy_done(rec).await,
                    None => None,
                }
            })
        }));
        Ok(svc)
    }

    /// Starts the operations the daemon runs by itself: the policy scheduler (which also
    /// sweeps the recycle bin), and periodic GC (`gc_interval`).
    pub fn start(self: &Arc<Self>) {
        self.start_scheduler();
        self.store.resume_copies();
        // Snapshots started through the EBS direct API and abandoned expire.
        let direct = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                let Some(s) = direct.upgrade() else { return };
                s.expire_direct().await;
            }
        });
        let every = self.store.config.gc_interval;
        if every.is_zero() {
            return;
        }
        let svc = Arc::downgrade(self);
        tokio::spawn(async move {
            let caller = Caller::Daemon("gc");
            loop {
                tokio::time::sleep(every).await;
                let Some(s) = svc.upgrade() else { return };
                // Each region once: its GC covers every account's repository there.
                let mut regions: Vec<String> =
                    s.store.opened_regions().iter().map(|r| crate::engine::bare_name(r).to_string()).collect();
                regions.sort();
                regions.dedup();
                for name in regions {
                    match s.gc_region(&caller, &name, None).await {
                        Ok(r) => tracing::info!(region = %name, deleted = r.packs_deleted, "background GC done"),
                        Err(e) => tracing::warn!(region = %name, error = %e, "background GC failed"),
                    }
                }
            }
        });
    }

    pub fn status(&self, caller: &Caller) -> Result<StatusView> {
        caller.may(Access::Read)?;
        Ok(StatusView {
            daemon: self.status.clone(),
            upload: self.store.uploads_enabled(),
            store_deletes_pending: self.store.pending_deletes(),
        })
    }

    pub fn job(&self, caller: &Caller, id: u64) -> Result<JobView> {
        caller.may(Access::Read)?;
        self.jobs
            .get(id)
            .filter(|j| caller.sees_account(&j.account))
            .ok_or_else(|| Error::NotFound(format!("no job {id} (jobs are kept until the daemon restarts)")))
    }
}

/// Runs a (short, possibly fsyncing) engine call off the async workers, so NBD connections
/// sharing the runtime are not held up by it.
async fn blocking<T: Send + 'static, E: Into<Error> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(Error::Internal(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_the_kind_of_the_layer_that_refused() {
        let e: Error = EngineError::NotFound("no volume named 'x'".into()).into();
        assert_eq!((e.kind(), e.to_string().as_str()), (ErrorKind::NotFound, "no volume named 'x'"));
        let e: Error = StoreError::Busy("still uploading".into()).into();
        assert_eq!(e.kind(), ErrorKind::Busy);
        assert_eq!(Error::Invalid("no size".into()).kind(), ErrorKind::Invalid);
    }
}
