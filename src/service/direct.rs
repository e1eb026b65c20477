//! Snapshots read and written block by block, in 512 KiB blocks: the operations behind the EBS
//! direct API facade (`src/ebs/`), which only parses, authenticates and maps errors.
//!
//! Reading: the allocated blocks of a snapshot (from its map, no data read), the blocks that
//! changed between two snapshots (from the changed sets of their lineage, no data read), one
//! block's data (through the snapshot's engine handle: local, released or still loading, verified
//! like every read).
//!
//! Writing: a snapshot started here is written into a hidden *staging volume*, named
//! `ebs-<the snapshot id's 16 hex digits>` (in the caller's account), which no list shows and no
//! user may create. Blocks land in it in any order, in parallel; each block's SHA-256 is checked
//! and kept. Completion checks the count and the linear aggregated checksum, takes the snapshot
//! of the staging volume *with the id StartSnapshot answered* (`Engine::create_snapshot_as`),
//! durably, and deletes the volume for its users (the snapshot outlives it, as any snapshot of a
//! deleted volume does: listed, exported, uploaded, cloned). A refused completion, an expired
//! snapshot (no block and no completion for `Timeout` minutes) and one abandoned by a daemon
//! restart delete the staging volume: nothing half-written is ever a snapshot. A ParentSnapshotId
//! makes the staging volume a clone of the parent, so unwritten blocks are the parent's.
//!
//! Pending snapshots live in memory: a restart drops them (their staging volumes are deleted at
//! start, unless the crash came after the snapshot was taken, which then completes).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use roaring::RoaringTreemap;

use super::{blocking, Access, Caller, Error, Result, Service};
use crate::engine::{
    parse_snapshot_id, snapshot_id, Anchor, EngineError, ErrorKind, SnapshotHandle, SnapshotInfo, Target, VolumeHandle,
    ZeroMode, STATE_HOLE,
};

/// Bytes in a block.
pub const BLOCK_SIZE: u64 = 512 * 1024;
const GIB: u64 = 1 << 30;
/// The snapshot of a staging volume, once completed, is `ebs-<hex>@snap`.
const STAGED_SNAPSHOT_NAME: &str = "snap";
/// How long a ClientToken is remembered after its snapshot completed or went.
const CLIENT_TOKEN_MEMORY: u64 = 8 * 3600;
/// Most snapshots started and not completed at once (each holds a volume and its checksums).
const MAX_PENDING: usize = 256;

/// Whether `stored` (a volume name as stored, `ACCOUNT/NAME` or `NAME`) is a staging volume's:
/// `ebs-` and 16 lower-case hex digits. Such names are reserved.
pub fn is_staging_name(stored: &str) -> bool {
    let bare = stored.rsplit_once('/').map_or(stored, |(_, b)| b);
    bare.strip_prefix("ebs-")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
}

/// StartSnapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartDirect {
    /// GiB.
    pub volume_size: u64,
    pub parent: Option<String>,
    pub description: String,
    /// Minutes without a block or a completion after which the snapshot is dropped.
    pub timeout_minutes: u64,
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectStatus {
    Pending,
    Completed,
}

impl DirectStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DirectStatus::Pending => "pending",
            DirectStatus::Completed => "completed",
        }
    }
}

/// A snapshot started through the block API.
#[derive(Debug, Clone)]
pub struct StartedView {
    pub id: String,
    pub status: DirectStatus,
    /// GiB.
    pub volume_size: u64,
    /// Seconds since the Unix epoch.
    pub started: u64,
    pub description: String,
    pub parent: Option<String>,
    /// The owning account.
    pub owner: String,
}

/// A snapshot as the block API describes it.
#[derive(Debug, Clone)]
pub struct BlockSnapshot {
    pub id: String,
    /// Bytes.
    pub size: u64,
    pub created: u64,
}

impl BlockSnapshot {
    /// Whole GiB, rounded up (the API's VolumeSize).
    pub fn volume_size_gib(&self) -> u64 {
        self.size.div_ceil(GIB).max(1)
    }

    fn of(info: &SnapshotInfo) -> BlockSnapshot {
        BlockSnapshot { id: info.id.clone(), size: info.size, created: info.created }
    }
}

/// One page of block indexes; `next` is where the next page starts.
#[derive(Debug, Clone)]
pub struct BlockPage {
    pub snapshot: BlockSnapshot,
    pub blocks: Vec<u64>,
    pub next: Option<u64>,
}

/// A changed block and whether each snapshot holds data there (else it reads as zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedBlock {
    pub index: u64,
    pub in_first: bool,
    pub in_second: bool,
}

#[derive(Debug, Clone)]
pub struct ChangedPage {
    pub first: Option<BlockSnapshot>,
    pub second: BlockSnapshot,
    pub blocks: Vec<ChangedBlock>,
    pub next: Option<u64>,
}

/// The snapshots started and not completed, and the ClientTokens seen.
#[derive(Default)]
pub(super) struct DirectState {
    pending: parking_lot::Mutex<HashMap<u64, Arc<Staged>>>,
    /// (account, ClientToken) → the snapshot it started, the request, and when it was forgotten
    /// from `pending` (completed or dropped), for the memory's expiry.
    tokens: parking_lot::Mutex<HashMap<(String, String), Token>>,
    /// StartSnapshot one at a time: two requests with one ClientToken make one snapshot.
    starting: tokio::sync::Mutex<()>,
}

struct Token {
    id: u64,
    request: StartDirect,
    done_at: Option<u64>,
    status: DirectStatus,
}

struct Staged {
    id: u64,
    volume_id: String,
    volume_name: String,
    account: String,
    size: u64,
    started: u64,
    description: String,
    parent: Option<String>,
    timeout: u64,
    /// Last block written (or the start), seconds since the epoch.
    touched: AtomicU64,
    /// Each written block's SHA-256.
    checksums: parking_lot::Mutex<BTreeMap<u64, [u8; 32]>>,
    /// The staging volume's handle while blocks may be written; `None` once completion or
    /// expiry has begun (they take it exclusively, so no write is in flight after).
    writer: tokio::sync::RwLock<Option<VolumeHandle>>,
}

impl Staged {
    fn view(&self, status: DirectStatus) -> StartedView {
        StartedView {
            id: snapshot_id(self.id),
            status,
            volume_size: self.size.div_ceil(GIB),
            started: self.started,
            description: self.description.clone(),
            parent: self.parent.clone(),
            owner: self.account.clone(),
        }
    }
}

fn rule(reason: &'static str, message: impl Into<String>) -> Error {
    Error::Rule { reason, message: message.into() }
}

/// The account a caller acts for (administrators and local callers: `default`).
fn account_of(caller: &Caller) -> String {
    match caller {
        Caller::Account { account, .. } => account.clone(),
        Caller::Local | Caller::Daemon(_) => super::DEFAULT_ACCOUNT.to_string(),
    }
}

/// The 512 KiB blocks covering `clusters` (of `cluster_size`) within a snapshot of `size`,
/// from block `start` on, at most `max` (and whether more follow: the next one).
fn blocks_of(
    clusters: &RoaringTreemap,
    cluster_size: u64,
    size: u64,
    start: u64,
    max: usize,
) -> (Vec<u64>, Option<u64>) {
    let total = size.div_ceil(BLOCK_SIZE);
    let mut out: Vec<u64> = Vec::new();
    let first_cluster = start.saturating_mul(BLOCK_SIZE) / cluster_size;
    let mut iter = clusters.iter().skip_while(|&c| c < first_cluster);
    for c in iter.by_ref() {
        let (from, to) = ((c * cluster_size) / BLOCK_SIZE, ((c + 1) * cluster_size).div_ceil(BLOCK_SIZE).min(total));
        for b in from.max(start)..to {
            if out.last().is_some_and(|&l| l >= b) {
                continue;
            }
            if out.len() == max {
                return (out, Some(b));
            }
            out.push(b);
        }
    }
    (out, None)
}

impl Service {
    /// The daemon's time (its injected clock), seconds since the Unix epoch.
    pub fn now(&self) -> u64 {
        self.engine.clock().now()
    }

    /// Opens a snapshot for reading (released ones read from their region).
    fn open_for_blocks(&self, caller: &Caller, r: &str) -> Result<(SnapshotInfo, SnapshotHandle)> {
        caller.may(Access::Read)?;
        if let Some(staged) = parse_snapshot_id(r).and_then(|id| self.direct.pending.lock().get(&id).cloned()) {
            if caller.sees_account(&staged.account) {
                return Err(rule(
                    "INVALID_SNAPSHOT_ID",
                    format!("snapshot {r} is pending: complete it (CompleteSnapshot) before reading it"),
                ));
            }
        }
        let info = self.live_snapshot(caller, r)?;
        let mut again = true;
        loop {
            let region = self.store.region_if_released(&self.engine.snapshot(&info.id)?)?;
            match self.engine.open_snapshot(&info.id, region.as_deref()) {
                Err(e) if e.kind() == ErrorKind::NotLocal && region.is_none() && again => again = false,
                opened => return Ok((info, opened?)),
            }
        }
    }

    /// Clusters of the snapshot that hold data (or may: still in the store). Local data from
    /// the map; a released snapshot's from its map pages in the store (O(extents)).
    async fn data_clusters(info: &SnapshotInfo, h: &SnapshotHandle) -> Result<RoaringTreemap> {
        if info.local {
            return Ok(h.allocated_clusters());
        }
        let cs = info.cluster_size as u64;
        let mut set = RoaringTreemap::new();
        let mut offset = 0u64;
        while offset < info.size {
            let extents = h.allocation_async(offset, info.size - offset).await?;
            if extents.is_empty() {
                break;
            }
            for e in extents {
                if e.flags & STATE_HOLE == 0 {
                    set.insert_range(offset / cs..(offset + e.length).div_ceil(cs));
                }
                offset += e.length;
            }
        }
        Ok(set)
    }

    /// ListSnapshotBlocks: the blocks of snapshot `r` that hold data, from block `start`.
    pub async fn list_blocks(&self, caller: &Caller, r: &str, start: u64, max: usize) -> Result<BlockPage> {
        let (info, h) = self.open_for_blocks(caller, r)?;
        let clusters = Self::data_clusters(&info, &h).await?;
        let (blocks, next) = blocks_of(&clusters, info.cluster_size as u64, info.size, start, max);
        Ok(BlockPage { snapshot: BlockSnapshot::of(&info), blocks, next })
    }

    /// ListChangedBlocks: the blocks that may differ between `first` and `second` (every block
    /// whose content differs is listed; one rewritten with the same bytes may be), from the
    /// changed sets of their lineage. Without `first`, every block of `second` holding data.
    /// A snapshot of a clone (one written with a ParentSnapshotId) is compared with its origin's
    /// lineage through the clone's changed sets; snapshots whose lineages meet nowhere (of
    /// unrelated volumes) are compared by what either holds.
    pub async fn changed_blocks(
        &self,
        caller: &Caller,
        first: Option<&str>,
        second: &str,
        start: u64,
        max: usize,
    ) -> Result<ChangedPage> {
        let (info2, h2) = self.open_for_blocks(caller, second)?;
        let opened1 = first.map(|f| self.open_for_blocks(caller, f)).transpose()?;
        let clusters = match &opened1 {
            None => Self::data_clusters(&info2, &h2).await?,
            Some((info1, h1)) => {
                if info1.size != info2.size || info1.cluster_size != info2.cluster_size {
                    return Err(rule(
                        "UNRELATED_SNAPSHOTS",
                        format!(
                            "snapshots {} and {} differ in size or cluster size: they are not of one lineage",
                            info1.id, info2.id
                        ),
                    ));
                }
                let (a, b) = (parse_snapshot_id(&info1.id).unwrap_or(0), parse_snapshot_id(&info2.id).unwrap_or(0));
                let across =
                    || self.changed_across_clone(a, &info2.id).or_else(|| self.changed_across_clone(b, &info1.id));
                match self.engine.changed_between(a, Target::Snapshot(b)).or_else(across) {
                    Some(set) => set,
                    None => Self::data_clusters(info1, h1).await? | Self::data_clusters(&info2, &h2).await?,
                }
            }
        };
        let (indexes, next) = blocks_of(&clusters, info2.cluster_size as u64, info2.size, start, max);
        let holds = |h: &SnapshotHandle, size: u64, b: u64| -> Result<bool> {
            let offset = b * BLOCK_SIZE;
            let len = BLOCK_SIZE.min(size - offset);
            Ok(h.allocation(offset, len)?.iter().any(|e| e.flags & STATE_HOLE == 0))
        };
        let mut blocks = Vec::with_capacity(indexes.len());
        for index in indexes {
            let in_first = match &opened1 {
                Some((i1, h1)) => holds(h1, i1.size, index)?,
                None => false,
            };
            blocks.push(ChangedBlock { index, in_first, in_second: holds(&h2, info2.size, index)? });
        }
        Ok(ChangedPage {
            first: opened1.as_ref().map(|(i, _)| BlockSnapshot::of(i)),
            second: BlockSnapshot::of(&info2),
            blocks,
            next,
        })
    }

    /// What may differ between snapshot `base` and `target`, a snapshot of a clone (a snapshot
    /// written with a ParentSnapshotId is one): the clone's first changed set is relative to
    /// the snapshot it was cloned from (its origin, which the upload of the clone's first
    /// snapshot relies on too), so it is the origin's changes since `base` plus every changed
    /// set of `target`'s lineage. `None` when `target`'s volume is no clone, or its origin and
    /// `base` share no lineage.
    fn changed_across_clone(&self, base: u64, target: &str) -> Option<RoaringTreemap> {
        let Ok(Some(Anchor::Origin(origin))) = self.engine.lineage_anchor(target) else { return None };
        let mut set = match origin == base {
            true => RoaringTreemap::new(),
            false => self.engine.changed_between(base, Target::Snapshot(origin))?,
        };
        for (_, changed) in self.engine.snapshot_lineage(target).ok()? {
            set |= &changed;
        }
        Some(set)
    }

    /// GetSnapshotBlock: block `index` of snapshot `r`, 512 KiB (past the snapshot's end: zeros).
    pub async fn read_block(&self, caller: &Caller, r: &str, index: u64) -> Result<(BlockSnapshot, Vec<u8>)> {
        let (info, h) = self.open_for_blocks(caller, r)?;
        let offset = index.checked_mul(BLOCK_SIZE).filter(|&o| o < info.size).ok_or_else(|| {
            rule(
                "INVALID_BLOCK",
                format!(
                    "block index {index} is past the end of snapshot {} ({} blocks)",
                    info.id,
                    info.size.div_ceil(BLOCK_SIZE)
                ),
            )
        })?;
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        let len = BLOCK_SIZE.min(info.size - offset) as usize;
        h.read_async(offset, &mut buf[..len]).await?;
        Ok((BlockSnapshot::of(&info), buf))
    }

    /// StartSnapshot: a pending snapshot, written with [`Service::write_block`] and made with
    /// [`Service::complete_direct`]. The same ClientToken with the same request answers the
    /// same snapshot; with another request it is a conflict.
    pub async fn start_direct(&self, caller: &Caller, req: StartDirect) -> Result<StartedView> {
        caller.may(Access::Snapshot)?;
        let account = account_of(caller);
        let _one_at_a_time = self.direct.starting.lock().await;
        let now = self.engine.clock().now();
        if let Some(token) = &req.client_token {
            let mut tokens = self.direct.tokens.lock();
            tokens.retain(|_, t| t.done_at.is_none_or(|d| now < d + CLIENT_TOKEN_MEMORY));
            if let Some(t) = tokens.get(&(account.clone(), token.clone())) {
                if t.request != req {
                    return Err(Error::Engine(EngineError::AlreadyExists(format!(
                        "ClientToken '{token}' was used for another StartSnapshot request (snapshot {})",
                        snapshot_id(t.id)
                    ))));
                }
                if let Some(staged) = self.direct.pending.lock().get(&t.id) {
                    return Ok(staged.view(DirectStatus::Pending));
                }
                let status = t.status;
                let id = t.id;
                drop(tokens);
                // Completed (its snapshot describes it) or dropped.
                return match self.engine.snapshot(&snapshot_id(id)) {
                    Ok(info) if status == DirectStatus::Completed => Ok(StartedView {
                        id: info.id.clone(),
                        status,
                        volume_size: info.size.div_ceil(GIB),
                        started: info.created,
                        description: info.description.clone(),
                        parent: req.parent.clone(),
                        owner: account,
                    }),
                    _ => Err(Error::NotFound(format!(
                        "the snapshot ClientToken '{token}' started ({}) expired or failed; start again with another token",
                        snapshot_id(id)
                    ))),
                };
            }
        }
        if req.volume_size == 0 || req.volume_size > 65536 {
            return Err(rule("INVALID_VOLUME_SIZE", format!("VolumeSize {} GiB: use 1 to 65536", req.volume_size)));
        }
        if !(10..=4320).contains(&req.timeout_minutes) {
            return Err(rule(
                "INVALID_PARAMETER_VALUE",
                format!("Timeout {} minutes: use 10 to 4320", req.timeout_minutes),
            ));
        }
        if req.description.len() > 255 {
            return Err(rule("INVALID_PARAMETER_VALUE", "Description is longer than 255 characters"));
        }
        if self.direct.pending.lock().len() >= MAX_PENDING {
            return Err(Error::Limit {
                message: format!("{MAX_PENDING} snapshots are pending already: complete some first"),
                retry_after: Some(10),
            });
        }
        let id = self.engine.unused_id();
        let name = super::accounts::owned_name(&account, &format!("ebs-{id:016x}"));
        // The staging volume: empty, or a clone of the parent.
        let (info, parent, region) = match &req.parent {
            None => {
                let (e, n) = (self.engine.clone(), name.clone());
                let info = blocking(move || e.create_volume(&n, req.volume_size * GIB, None)).await?;
                (info, None, "local".to_string())
            }
            Some(p) => {
                caller.may(Access::Restore)?;
                let snap = self.live_snapshot(caller, p)?;
                if snap.size.div_ceil(GIB) != req.volume_size {
                    return Err(rule(
                        "INVALID_VOLUME_SIZE",
                        format!(
                            "VolumeSize {} GiB differs from the parent snapshot's ({} GiB)",
                            req.volume_size,
                            snap.size.div_ceil(GIB)
                        ),
                    ));
                }
                let home = self.store.volume_region(&snap.volume_id);
                let info = self
                    .released_or_not(&snap.id, |region| {
                        let (e, r2, n2) = (self.engine.clone(), snap.id.clone(), name.clone());
                        blocking(move || e.clone_snapshot(&r2, &n2, region.as_deref()))
                    })
                    .await?;
                self.volume_loading(&info);
                (info, Some(snap.id), home)
            }
        };
        let handle = match self.engine.open_volume(&info.id) {
            Ok(h) => h,
            Err(e) => {
                self.drop_staging(&info.id).await;
                return Err(e.into());
            }
        };
        self.store.set_volume_region(&info.id, &region)?;
        let staged = Arc::new(Staged {
            id,
            volume_id: info.id.clone(),
            volume_name: name,
            account: account.clone(),
            size: info.size,
            started: now,
            description: req.description.clone(),
            parent,
            timeout: req.timeout_minutes * 60,
            touched: AtomicU64::new(now),
            checksums: parking_lot::Mutex::new(BTreeMap::new()),
            writer: tokio::sync::RwLock::new(Some(handle)),
        });
        self.direct.pending.lock().insert(id, staged.clone());
        if let Some(token) = &req.client_token {
            self.direct.tokens.lock().insert(
                (account, token.clone()),
                Token { id, request: req.clone(), done_at: None, status: DirectStatus::Pending },
            );
        }
        tracing::info!(snapshot = %snapshot_id(id), volume = %staged.volume_name, by = %caller, "EBS snapshot started");
        Ok(staged.view(DirectStatus::Pending))
    }

    /// The pending snapshot `r` of the caller's account.
    fn staged(&self, caller: &Caller, r: &str) -> Result<Arc<Staged>> {
        let found = parse_snapshot_id(r).and_then(|id| self.direct.pending.lock().get(&id).cloned());
        match found {
            Some(s) if caller.sees_account(&s.account) => Ok(s),
            _ => {
                // A completed one exists, but takes no more blocks.
                if self.live_snapshot(caller, r).is_ok() {
                    return Err(rule(
                        "INVALID_SNAPSHOT_ID",
                        format!("snapshot {r} is completed: it takes no more blocks"),
                    ));
                }
                Err(Error::NotFound(format!("no pending snapshot {r} (it was never started, completed, or expired)")))
            }
        }
    }

    /// PutSnapshotBlock: writes block `index` of pending snapshot `r` after checking `data`
    /// against `checksum` (SHA-256, base64).
    pub async fn write_block(
        &self,
        caller: &Caller,
        r: &str,
        index: u64,
        data: bytes::Bytes,
        checksum: [u8; 32],
    ) -> Result<()> {
        caller.may(Access::Snapshot)?;
        let staged = self.staged(caller, r)?;
        if data.len() as u64 != BLOCK_SIZE {
            return Err(rule("INVALID_PARAMETER_VALUE", format!("a block is {BLOCK_SIZE} bytes, not {}", data.len())));
        }
        let offset = index.checked_mul(BLOCK_SIZE).filter(|&o| o < staged.size).ok_or_else(|| {
            rule(
                "INVALID_BLOCK",
                format!(
                    "block index {index} is past the end of snapshot {r} ({} blocks of 512 KiB)",
                    staged.size.div_ceil(BLOCK_SIZE)
                ),
            )
        })?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &data);
        if digest.as_ref() != checksum {
            return Err(rule(
                "INVALID_BLOCK",
                format!("the checksum of block {index} does not match its data (x-amz-Checksum is the base64 SHA-256 of the 524288 bytes)"),
            ));
        }
        let guard = staged.writer.read().await;
        let Some(h) = guard.as_ref() else {
            return Err(rule(
                "INVALID_SNAPSHOT_ID",
                format!("snapshot {r} is being completed or expired: it takes no more blocks"),
            ));
        };
        let len = BLOCK_SIZE.min(staged.size - offset) as usize;
        let part = &data[..len];
        if part.iter().all(|&b| b == 0) {
            h.zero_async(offset, len as u64, ZeroMode::Unmap, false).await?;
        } else {
            h.write_async(offset, part, false).await?;
        }
        let mut sum = [0u8; 32];
        sum.copy_from_slice(digest.as_ref());
        staged.checksums.lock().insert(index, sum);
        staged.touched.store(self.engine.clock().now(), Ordering::Release);
        Ok(())
    }

    /// CompleteSnapshot: checks the number of blocks written and, when given, the linear
    /// aggregated checksum (SHA-256 of the blocks' SHA-256s in block order), then takes the
    /// snapshot. Refused: the pending snapshot is dropped (nothing of it stays).
    pub async fn complete_direct(
        &self,
        caller: &Caller,
        r: &str,
        changed_blocks: u64,
        aggregated: Option<[u8; 32]>,
    ) -> Result<StartedView> {
        caller.may(Access::Snapshot)?;
        let staged = self.staged(caller, r)?;
        let handle = {
            let mut w = staged.writer.write().await;
            match w.take() {
                Some(h) => h,
                None => return Err(rule("INVALID_SNAPSHOT_ID", format!("snapshot {r} is being completed already"))),
            }
        };
        let check = {
            let sums = staged.checksums.lock();
            let mut all = Vec::with_capacity(sums.len() * 32);
            for s in sums.values() {
                all.extend_from_slice(s);
            }
            let agg = ring::digest::digest(&ring::digest::SHA256, &all);
            if sums.len() as u64 != changed_blocks {
                Err(rule(
                    "INVALID_PARAMETER_VALUE",
                    format!("ChangedBlocksCount is {changed_blocks} but {} blocks were written", sums.len()),
                ))
            } else if aggregated.is_some_and(|a| a != agg.as_ref()) {
                Err(rule(
                    "INVALID_PARAMETER_VALUE",
                    "the aggregated checksum does not match the blocks written (LINEAR: SHA-256 over the blocks' SHA-256s in block index order); the snapshot is dropped",
                ))
            } else {
                Ok(())
            }
        };
        let flushed = match check {
            Ok(()) => handle.flush_async().await.map_err(Error::from),
            Err(e) => Err(e),
        };
        drop(handle);
        if let Err(e) = flushed {
            self.forget_staged(&staged, DirectStatus::Pending);
            self.drop_staging(&staged.volume_id).await;
            tracing::info!(snapshot = %snapshot_id(staged.id), error = %e, "EBS snapshot completion refused; dropped");
            return Err(e);
        }
        let (e, v, d, id) = (self.engine.clone(), staged.volume_id.clone(), staged.description.clone(), staged.id);
        let taken = blocking(move || {
            let s = e.create_snapshot_as(&v, STAGED_SNAPSHOT_NAME, &d, Some(id))?;
            e.make_durable(&s.id)?;
            e.snapshot(&s.id)
        })
        .await;
        let snap = match taken {
            Ok(s) => s,
            Err(err) => {
                self.forget_staged(&staged, DirectStatus::Pending);
                self.drop_staging(&staged.volume_id).await;
                return Err(err);
            }
        };
        // The snapshot is durable: from here on it is completed, whatever fails after (a crash
        // here is settled at start by `settle_direct`).
        self.forget_staged(&staged, DirectStatus::Completed);
        if let Ok(vol) = self.engine.volume(&staged.volume_id) {
            self.mark_volume_deleted(&vol)?;
        }
        self.store.snapshots_created(std::slice::from_ref(&snap))?;
        self.event(super::events::Event::SnapshotTaken {
            volume: snap.volume.clone(),
            snapshot: snap.name.clone(),
            id: snap.id.clone(),
            by: caller.to_string(),
        });
        tracing::info!(snapshot = %snap.id, by = %caller, "EBS snapshot completed");
        Ok(staged.view(DirectStatus::Completed))
    }

    fn forget_staged(&self, staged: &Staged, status: DirectStatus) {
        self.direct.pending.lock().remove(&staged.id);
        let now = self.engine.clock().now();
        for t in self.direct.tokens.lock().values_mut().filter(|t| t.id == staged.id) {
            t.done_at = Some(now);
            t.status = status;
        }
    }

    /// Deletes a staging volume (no snapshot of it exists, no handle is open).
    async fn drop_staging(&self, volume_id: &str) {
        let (e, id) = (self.engine.clone(), volume_id.to_string());
        match blocking(move || e.delete_volume(&id)).await {
            Ok(()) => {
                if let Err(e) = self.store.volume_deleted(volume_id) {
                    tracing::warn!(volume = %volume_id, error = %e, "cannot forget a staging volume's region");
                }
            }
            Err(e) => tracing::warn!(volume = %volume_id, error = %e, "cannot delete a staging volume"),
        }
    }

    /// Drops the pending snapshots whose time is up (no block and no completion for their
    /// `Timeout`); returns how many.
    pub async fn expire_direct(&self) -> usize {
        let now = self.engine.clock().now();
        let due: Vec<Arc<Staged>> = self
            .direct
            .pending
            .lock()
            .values()
            .filter(|s| now >= s.touched.load(Ordering::Acquire) + s.timeout)
            .cloned()
            .collect();
        let mut n = 0;
        for s in due {
            let Some(h) = s.writer.write().await.take() else { continue };
            drop(h);
            self.forget_staged(&s, DirectStatus::Pending);
            self.drop_staging(&s.volume_id).await;
            tracing::info!(snapshot = %snapshot_id(s.id), "EBS snapshot expired (not completed within its Timeout); dropped");
            n += 1;
        }
        n
    }

    /// At start: staging volumes a previous daemon left. One whose snapshot was taken (the
    /// crash came after) is completed: deleted for its users; any other is deleted.
    pub(super) fn settle_direct(&self) -> Result<()> {
        let deleted: std::collections::HashSet<String> =
            self.lifecycle.lock().deleted_volumes.keys().cloned().collect();
        for v in self.engine.list_volumes().into_iter().filter(|v| is_staging_name(&v.name) && !deleted.contains(&v.id))
        {
            if v.snapshots > 0 {
                self.mark_volume_deleted(&v)?;
                tracing::info!(volume = %v.name, "EBS snapshot completed before the restart: staging volume deleted");
            } else {
                self.engine.delete_volume(&v.id)?;
                self.store.volume_deleted(&v.id)?;
                tracing::info!(volume = %v.name, "EBS snapshot left pending by the previous daemon: dropped");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::service::testing::{service, ts};

    fn block(fill: u8) -> (bytes::Bytes, [u8; 32]) {
        let data = vec![fill; BLOCK_SIZE as usize];
        let mut sum = [0u8; 32];
        sum.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &data).as_ref());
        (data.into(), sum)
    }

    fn start(token: Option<&str>) -> StartDirect {
        StartDirect {
            volume_size: 1,
            parent: None,
            description: "t".into(),
            timeout_minutes: 10,
            client_token: token.map(str::to_string),
        }
    }

    #[test]
    fn staging_names_are_ebs_and_sixteen_hex_digits() {
        assert!(is_staging_name("ebs-0123456789abcdef"));
        assert!(is_staging_name("acme/ebs-0123456789abcdef"));
        assert!(!is_staging_name("ebs-0123456789ABCDEF"));
        assert!(!is_staging_name("ebs-0123"));
        assert!(!is_staging_name("web-0123456789abcdef"));
    }

    #[test]
    fn blocks_of_clusters_round_to_512k_blocks_and_page() {
        let mut set = RoaringTreemap::new();
        // 64 KiB clusters: 0 and 7 are block 0, 8 is block 1, 80 is block 10.
        set.extend([0u64, 7, 8, 80]);
        assert_eq!(blocks_of(&set, 65536, 1 << 30, 0, 100), (vec![0, 1, 10], None));
        assert_eq!(blocks_of(&set, 65536, 1 << 30, 0, 2), (vec![0, 1], Some(10)));
        assert_eq!(blocks_of(&set, 65536, 1 << 30, 10, 2), (vec![10], None));
        // 1 MiB clusters: each is two blocks.
        let one: RoaringTreemap = [3u64].into_iter().collect();
        assert_eq!(blocks_of(&one, 1 << 20, 1 << 30, 0, 10), (vec![6, 7], None));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_snapshot_expires_after_its_timeout_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(ts("2026-12-01T00:00:00Z"));
        let svc = service(dir.path(), clock.clone(), "");
        let me = Caller::Local;
        let s = svc.start_direct(&me, start(None)).await.unwrap();
        let (data, sum) = block(7);
        svc.write_block(&me, &s.id, 3, data.clone(), sum).await.unwrap();
        clock.advance(9 * 60);
        assert_eq!(svc.expire_direct().await, 0, "not idle for its 10 minutes yet");
        svc.write_block(&me, &s.id, 4, data.clone(), sum).await.unwrap();
        clock.advance(9 * 60);
        assert_eq!(svc.expire_direct().await, 0, "a block written restarts the timeout");
        clock.advance(60);
        assert_eq!(svc.expire_direct().await, 1);
        let e = svc.write_block(&me, &s.id, 5, data, sum).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(svc.engine.list_volumes().is_empty(), "the staging volume is gone");
        assert!(svc.engine.list_snapshots(None).unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_token_answers_the_same_snapshot_and_conflicts_with_another_request() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(ts("2026-12-01T00:00:00Z"));
        let svc = service(dir.path(), clock, "");
        let me = Caller::Local;
        // At once, as a client retrying a request it thinks lost would.
        let (a, b) = tokio::join!(svc.start_direct(&me, start(Some("tok"))), svc.start_direct(&me, start(Some("tok"))));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.id, b.id);
        assert_eq!(svc.engine.list_volumes().len(), 1, "one staging volume");
        let mut other = start(Some("tok"));
        other.volume_size = 2;
        let e = svc.start_direct(&me, other).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        // Completed: the same token still answers it, now completed.
        let (data, sum) = block(1);
        svc.write_block(&me, &a.id, 0, data, sum).await.unwrap();
        svc.complete_direct(&me, &a.id, 1, None).await.unwrap();
        let c = svc.start_direct(&me, start(Some("tok"))).await.unwrap();
        assert_eq!((c.id.as_str(), c.status), (a.id.as_str(), DirectStatus::Completed));
        assert_eq!(svc.engine.list_snapshots(None).unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_completion_with_a_wrong_checksum_leaves_nothing_and_a_right_one_makes_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(ts("2026-12-01T00:00:00Z"));
        let svc = service(dir.path(), clock, "");
        let me = Caller::Local;
        let s = svc.start_direct(&me, start(None)).await.unwrap();
        let (data, sum) = block(9);
        svc.write_block(&me, &s.id, 1, data.clone(), sum).await.unwrap();
        let e = svc.complete_direct(&me, &s.id, 1, Some([0u8; 32])).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(svc.engine.list_volumes().is_empty() && svc.engine.list_snapshots(None).unwrap().is_empty());

        let s = svc.start_direct(&me, start(None)).await.unwrap();
        svc.write_block(&me, &s.id, 1, data, sum).await.unwrap();
        let agg = ring::digest::digest(&ring::digest::SHA256, &sum);
        let mut a = [0u8; 32];
        a.copy_from_slice(agg.as_ref());
        let done = svc.complete_direct(&me, &s.id, 1, Some(a)).await.unwrap();
        assert_eq!(done.status, DirectStatus::Completed);
        let snap = svc.snapshot(&me, &s.id).unwrap();
        assert_eq!((snap.info.id.as_str(), snap.volume_deleted), (s.id.as_str(), true));
        assert!(svc.list_volumes(&me).unwrap().is_empty(), "the staging volume is not listed");
        let page = svc.list_blocks(&me, &s.id, 0, 100).await.unwrap();
        assert_eq!(page.blocks, vec![1]);
        let (_, got) = svc.read_block(&me, &s.id, 1).await.unwrap();
        assert!(got.iter().all(|&b| b == 9));
        let (_, zeros) = svc.read_block(&me, &s.id, 0).await.unwrap();
        assert!(zeros.iter().all(|&b| b == 0));
    }
}
