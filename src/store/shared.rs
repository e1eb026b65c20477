//! Nodes sharing a region (docs/ARCHITECTURE.md, "Nodes sharing a region"). Three kinds of
//! small sealed objects let daemons that never talk to each other use one region safely:
//!
//! - **holds** (`holds/<snapshot id>/<node id>`): a node loading a volume from a snapshot (or
//!   exporting one) keeps a hold on it, renewed while it needs the snapshot. Deleting the
//!   snapshot on its owner node is refused while another node's hold is live, and a forced
//!   delete leaves the store copy until the holds end.
//! - **the GC lease** (`leases/gc`): GC and repack run on one node at a time: the owner and an
//!   expiry, taken with a conditional write where the store supports them.
//! - **condemned packs** (`gc/condemned`): GC does not delete a pack when it first finds it
//!   unreferenced; it records it here, and a later GC deletes it once `gc.delete_delay` has
//!   passed and it is still unreferenced. Every node's dedup index is a cache that may name
//!   such a pack: an upload drops condemned packs from its index when it starts, and before it
//!   publishes checks that nothing it references was condemned while it ran.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::crypto::hex;
use super::error::{Result, StoreError};
use super::format::{open_json, seal_json, PackId};
use super::objects::Condition;
use super::region::Region;
use super::StoreService;

const HOLD_MAGIC: &[u8; 8] = b"SNAPBLKH";
const LEASE_MAGIC: &[u8; 8] = b"SNAPBLKL";
const CONDEMNED_MAGIC: &[u8; 8] = b"SNAPBLKC";
pub const LEASE_OBJECT: &str = "leases/gc";
pub const CONDEMNED_OBJECT: &str = "gc/condemned";
const PROBE_PREFIX: &str = "leases/probe-";

/// This daemon, as other nodes see it in holds and leases.
#[derive(Debug, Clone)]
pub struct Node {
    /// Random, made once per daemon directory (`meta/node-id`).
    pub id: String,
    pub host: String,
}

impl Node {
    pub fn load_or_create(dir: &Path) -> Result<Node> {
        let path = dir.join("meta").join("node-id");
        let id = match std::fs::read_to_string(&path) {
            Ok(s) if is_node_id(s.trim()) => s.trim().to_string(),
            Ok(_) => {
                return Err(StoreError::Config(format!(
                    "{} does not hold a node id (16 hex digits); remove it to get a new one",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = format!("n-{}", hex(&rand::random::<[u8; 7]>()));
                let write = |p: &Path| {
                    std::fs::create_dir_all(dir.join("meta"))?;
                    crate::fsutil::replace_file(p, format!("{id}\n").as_bytes(), true)
                };
                write(&path).map_err(StoreError::io(format!("writing {}", path.display())))?;
                id
            }
            Err(e) => return Err(StoreError::io(format!("reading {}", path.display()))(e)),
        };
        let host =
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        Ok(Node { id, host })
    }
}

fn is_node_id(s: &str) -> bool {
    s.strip_prefix("n-").is_some_and(|h| h.len() == 14 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A node's hold on a snapshot: while it is live, the snapshot's owner does not delete it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hold {
    pub node: String,
    pub host: String,
    /// Unix seconds; the hold is void after this (its node stopped renewing it).
    pub expires: u64,
    /// What the node uses the snapshot for (e.g. "volumes web1, web2 load from it").
    pub reason: String,
}

impl Hold {
    pub fn describe(&self) -> String {
        let host = if self.host.is_empty() { String::new() } else { format!(" on {}", self.host) };
        format!("node {}{host} ({}) until {}", self.node, self.reason, crate::units::utc(self.expires))
    }
}

/// The GC lease: who runs GC in the region, until when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    pub node: String,
    pub host: String,
    pub expires: u64,
    /// Random per acquisition: a node recognises its own write when it reads the lease back.
    pub token: String,
}

/// Packs GC found unreferenced, with the time it first did (unix seconds), and tombstones of
/// those it deleted since (kept [`TOMBSTONE_DAYS`], for uploads that ran meanwhile).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Condemned {
    pub packs: BTreeMap<String, u64>,
    /// Deleted packs: hex id → (condemned, deleted).
    #[serde(default)]
    pub deleted: BTreeMap<String, (u64, u64)>,
}

/// How long the condemned list remembers a deleted pack.
pub const TOMBSTONE_DAYS: u64 = 7;

impl Condemned {
    /// Packs condemned at or after `since`, deleted or not.
    pub fn since(&self, since: u64) -> Vec<PackId> {
        let waiting = self.packs.iter().filter(|(_, t)| **t >= since);
        let deleted = self.deleted.iter().filter(|(_, (t, _))| *t >= since).map(|(p, (t, _))| (p, t));
        waiting.chain(deleted).filter_map(|(p, _)| super::crypto::unhex::<16>(p)).collect()
    }

    /// Every pack condemned or deleted: none may be deduplicated against.
    pub fn all(&self) -> Vec<PackId> {
        self.packs.keys().chain(self.deleted.keys()).filter_map(|p| super::crypto::unhex::<16>(p)).collect()
    }

    /// A pack was deleted: it becomes a tombstone; tombstones older than the limit go.
    pub fn deleted(&mut self, pack: &PackId, now: u64) {
        let key = hex(pack);
        let since = self.packs.remove(&key).unwrap_or(now);
        self.deleted.insert(key, (since, now));
        self.deleted.retain(|_, (_, at)| *at + TOMBSTONE_DAYS * 86_400 > now);
    }
}

pub fn hold_key(snapshot_id: &str, node: &str) -> String {
    format!("holds/{snapshot_id}/{node}")
}

fn aad(object: &str) -> Vec<u8> {
    format!("snapblk {object}").into_bytes()
}

/// Whether the store enforces conditional writes (create-only and replace-if-unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConditionalWrites {
    /// Checked at region open: a second create-only PUT of one object was refused.
    Enforced,
    /// The store accepted it (Garage ignores `If-None-Match`) or has no such request.
    NotEnforced,
}

impl Region {
    /// Probes conditional writes: create-only PUT of a fresh object twice; a store that
    /// enforces them refuses the second.
    pub async fn probe_conditional_writes(&self) -> Result<ConditionalWrites> {
        let key = format!("{PROBE_PREFIX}{}", hex(&rand::random::<[u8; 8]>()));
        let first = self.objects.put_if(&key, Bytes::from_static(b"probe"), Condition::Absent).await?;
        let second = match first {
            Some(true) => self.objects.put_if(&key, Bytes::from_static(b"probe"), Condition::Absent).await?,
            _ => None,
        };
        self.objects.delete(&key).await?;
        Ok(match second {
            Some(false) => ConditionalWrites::Enforced,
            _ => ConditionalWrites::NotEnforced,
        })
    }

    pub async fn put_hold(&self, snapshot_id: &str, hold: &Hold) -> Result<()> {
        let key = hold_key(snapshot_id, &hold.node);
        self.objects.put(&key, Bytes::from(seal_json(&self.keys, HOLD_MAGIC, &aad(&key), hold))).await
    }

    pub async fn delete_hold(&self, snapshot_id: &str, node: &str) -> Result<()> {
        self.objects.delete(&hold_key(snapshot_id, node)).await
    }

    /// Every hold on a snapshot, live or expired. One that cannot be read counts as a live
    /// hold of an unknown node (never as none): its owner's node would find it unreadable too.
    pub async fn holds(&self, snapshot_id: &str) -> Result<Vec<Hold>> {
        let mut out = Vec::new();
        for o in self.objects.list(&format!("holds/{snapshot_id}")).await? {
            let node = o.key.rsplit('/').next().unwrap_or_default().to_string();
            match self.objects.get(&o.key).await {
                Ok(bytes) => match open_json::<Hold>(&self.keys, HOLD_MAGIC, &aad(&o.key), &bytes, &o.key, "hold") {
                    Ok(h) => out.push(h),
                    Err(e) => out.push(Hold { node, host: String::new(), expires: u64::MAX, reason: e.to_string() }),
                },
                Err(StoreError::Missing(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The lease as stored, with its e-tag; `None` if there is none.
    pub async fn lease(&self) -> Result<Option<(Lease, Option<String>)>> {
        match self.objects.get_versioned(LEASE_OBJECT).await {
            Ok((bytes, e_tag)) => {
                let l = open_json(&self.keys, LEASE_MAGIC, &aad(LEASE_OBJECT), &bytes, LEASE_OBJECT, "GC lease")?;
                Ok(Some((l, e_tag)))
            }
            Err(StoreError::Missing(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the lease: conditionally where the store enforces it (`replacing`: `None` when
    /// there was no lease, else the e-tag of the one read), else plainly.
    pub async fn put_lease(&self, lease: &Lease, replacing: Option<Option<String>>) -> Result<LeaseWrite> {
        let body = Bytes::from(seal_json(&self.keys, LEASE_MAGIC, &aad(LEASE_OBJECT), lease));
        let condition = match replacing {
            None => Some(Condition::Absent),
            Some(Some(e_tag)) => Some(Condition::Version(e_tag)),
            Some(None) => None,
        };
        if let (Some(c), ConditionalWrites::Enforced) = (condition, self.conditional) {
            match self.objects.put_if(LEASE_OBJECT, body.clone(), c).await? {
                Some(true) => return Ok(LeaseWrite::Atomic),
                Some(false) => return Ok(LeaseWrite::Refused),
                None => {}
            }
        }
        self.objects.put(LEASE_OBJECT, body).await?;
        Ok(LeaseWrite::Plain)
    }

    pub async fn delete_lease(&self) -> Result<()> {
        self.objects.delete(LEASE_OBJECT).await
    }

    pub async fn condemned(&self) -> Result<Condemned> {
        match self.objects.get(CONDEMNED_OBJECT).await {
            Ok(bytes) => open_json(
                &self.keys,
                CONDEMNED_MAGIC,
                &aad(CONDEMNED_OBJECT),
                &bytes,
                CONDEMNED_OBJECT,
                "list of condemned packs",
            ),
            Err(StoreError::Missing(_)) => Ok(Condemned::default()),
            Err(e) => Err(e),
        }
    }

    pub async fn put_condemned(&self, c: &Condemned) -> Result<()> {
        let body = seal_json(&self.keys, CONDEMNED_MAGIC, &aad(CONDEMNED_OBJECT), c);
        self.objects.put(CONDEMNED_OBJECT, Bytes::from(body)).await
    }
}

/// How a lease write went.
pub enum LeaseWrite {
    /// The store refused it (someone else wrote the lease since it was read).
    Refused,
    /// Written with a condition the store enforces: the lease is ours.
    Atomic,
    /// Written plainly (no conditional writes here): ours only if it reads back as ours.
    Plain,
}

/// Slack for clocks of different nodes when comparing condemnation times.
const CLOCK_SKEW: u64 = 600;

impl StoreService {
    fn now(&self) -> u64 {
        self.engine.clock().now()
    }

    /// Holds every snapshot of another node that volumes or snapshots here still load from,
    /// and lets go of those no longer needed. Runs every third of `hydrate.hold`.
    pub async fn renew_holds(&self) {
        let mut wanted: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for (source, of) in self.engine.store_sources() {
            let id = crate::engine::snapshot_id(source.snapshot);
            // This node's own snapshots: its delete already waits for what loads from them.
            if self.engine.snapshot(&id).is_ok() || self.check_region(&source.region).is_err() {
                continue;
            }
            // Nothing more can load from a snapshot whose share ended: its owner may delete it.
            if self.hydration.share_ended(&source).await.is_some() {
                continue;
            }
            wanted.entry((source.region, id)).or_default().extend(of);
        }
        for ((region, id), of) in &wanted {
            let verb = if of.len() == 1 { "loads" } else { "load" };
            if let Err(e) = self.put_hold(region, id, &format!("{} {verb} from it", of.join(", "))).await {
                tracing::warn!(snapshot = %id, %region, error = %e, "cannot renew this node's hold on a snapshot it loads from");
            }
        }
        // (Not one put in the last minute: a volume about to load from it may not exist yet.)
        let recent = self.now() + self.config.hydrate.hold.as_secs().saturating_sub(60);
        let stale: Vec<(String, String)> = self
            .held
            .lock()
            .iter()
            .filter(|(k, expires)| !wanted.contains_key(*k) && **expires <= recent)
            .map(|(k, _)| k.clone())
            .collect();
        for (region, id) in stale {
            match self.release_hold(&region, &id).await {
                Ok(()) => {
                    tracing::info!(snapshot = %id, %region, "released this node's hold (nothing here loads from it any more)")
                }
                Err(e) => {
                    tracing::warn!(snapshot = %id, %region, error = %e, "cannot release a hold; it expires by itself")
                }
            }
        }
    }

    async fn put_hold(&self, region: &str, snapshot_id: &str, reason: &str) -> Result<()> {
        let expires = self.now() + self.config.hydrate.hold.as_secs();
        let hold = Hold { node: self.node.id.clone(), host: self.node.host.clone(), expires, reason: reason.into() };
        self.region(region).await?.put_hold(snapshot_id, &hold).await?;
        self.held.lock().insert((region.to_string(), snapshot_id.to_string()), expires);
        Ok(())
    }

    async fn release_hold(&self, region: &str, snapshot_id: &str) -> Result<()> {
        self.region(region).await?.delete_hold(snapshot_id, &self.node.id).await?;
        self.held.lock().remove(&(region.to_string(), snapshot_id.to_string()));
        Ok(())
    }

    /// Before a volume here starts loading from another node's snapshot: the hold first, then
    /// a fresh read of its manifest. An owner deleting the snapshot meanwhile looks for holds
    /// after deleting the manifest and puts it back if one appeared, so either this read
    /// fails (nothing was created) or the snapshot stays while it is held.
    pub async fn hold_for_load(
        &self,
        region: &str,
        snapshot_id: &str,
        reason: &str,
    ) -> Result<Arc<super::format::Manifest>> {
        self.put_hold(region, snapshot_id, reason).await?;
        let r = self.region(region).await?;
        r.forget_manifest(snapshot_id);
        match r.manifest(snapshot_id).await {
            Ok(m) => Ok(m),
            Err(e) => {
                let _ = self.release_hold(region, snapshot_id).await;
                Err(e)
            }
        }
    }

    /// Live holds of other nodes on a snapshot in `region`.
    pub async fn foreign_holds(&self, region: &str, snapshot_id: &str) -> Result<Vec<Hold>> {
        let now = self.now();
        let holds = self.region(region).await?.holds(snapshot_id).await?;
        Ok(holds.into_iter().filter(|h| h.node != self.node.id && h.expires > now).collect())
    }

    /// Refuses to delete a snapshot of this node that other nodes hold (load from).
    pub async fn check_not_held_elsewhere(&self, snap: &crate::engine::SnapshotInfo) -> Result<()> {
        let Some(region) = self.state.lock().snapshots.get(&snap.id).map(|r| r.region.clone()) else { return Ok(()) };
        if self.check_region(&region).is_err() {
            return Ok(());
        }
        let holds = self.foreign_holds(&region, &snap.id).await?;
        if holds.is_empty() {
            return Ok(());
        }
        let who: Vec<String> = holds.iter().map(Hold::describe).collect();
        Err(StoreError::Busy(format!(
            "snapshot {}@{} is in use in region '{region}' by {}: let it finish loading (snapblk volume hydrate --wait there), or delete with --force (deleted here at once; its copy in the store stays until no node holds it)",
            snap.volume,
            snap.name,
            who.join("; ")
        )))
    }

    /// Deletes a manifest unless another node holds the snapshot: `Ok(false)` when held
    /// (before or during the delete: a hold that appeared meanwhile gets the manifest back).
    pub(super) async fn delete_manifest_unless_held(&self, region: &Region, id: &str) -> Result<bool> {
        if !self.foreign_holds(&region.name, id).await?.is_empty() {
            return Ok(false);
        }
        let key = super::format::manifest_key(id);
        let body = match region.objects.get(&key).await {
            Ok(b) => b,
            Err(StoreError::Missing(_)) => return Ok(true),
            Err(e) => return Err(e),
        };
        region.objects.delete(&key).await?;
        region.forget_manifest(id);
        self.accounting_changed(&region.name);
        if self.foreign_holds(&region.name, id).await?.is_empty() {
            return Ok(true);
        }
        // A node put its hold between the two looks: it may have read the manifest.
        region.objects.put(&key, body).await?;
        tracing::info!(snapshot = %id, region = %region.name, "another node started loading the snapshot while its manifest was deleted: put it back until it lets go");
        Ok(false)
    }

    /// Takes the region's GC lease, or says who has it.
    pub(super) async fn acquire_gc_lease(&self, region: &Region) -> Result<Lease> {
        let now = self.now();
        let busy = |l: &Lease| {
            StoreError::Busy(format!(
                "GC of region '{}' is running on node {}{} (lease until {}); try again later",
                region.name,
                l.node,
                if l.host.is_empty() { String::new() } else { format!(" on {}", l.host) },
                crate::units::utc(l.expires)
            ))
        };
        let current = region.lease().await?;
        if let Some((l, _)) = &current {
            if l.expires > now && l.node != self.node.id {
                return Err(busy(l));
            }
        }
        let mine = Lease {
            node: self.node.id.clone(),
            host: self.node.host.clone(),
            expires: now + self.config.gc_lease.as_secs(),
            token: hex(&rand::random::<[u8; 8]>()),
        };
        let replacing = current.map(|(_, e_tag)| e_tag);
        match region.put_lease(&mine, replacing).await? {
            LeaseWrite::Atomic => return Ok(mine),
            LeaseWrite::Refused => {}
            LeaseWrite::Plain => {
                // The last writer wins: read back after a moment; a node that finds another
                // node's token gives up.
                tokio::time::sleep(LEASE_SETTLE).await;
                if let Some((l, _)) = region.lease().await? {
                    if l.token == mine.token {
                        return Ok(mine);
                    }
                }
            }
        }
        match region.lease().await? {
            // A create retried after a lost answer finds its own lease.
            Some((l, _)) if l.token == mine.token => Ok(mine),
            Some((l, _)) => Err(busy(&l)),
            None => Err(StoreError::Busy(format!(
                "another node took the GC lease of region '{}' just now; try again later",
                region.name
            ))),
        }
    }

    /// Whether the lease is still this GC's (checked before every step that deletes).
    pub(super) async fn check_gc_lease(&self, region: &Region, lease: &Lease) -> Result<()> {
        match region.lease().await? {
            Some((l, _)) if l.token == lease.token && l.expires > self.now() => Ok(()),
            _ => Err(StoreError::Busy(format!(
                "GC of region '{}' lost its lease (it ran past gc.lease without renewing, or another node took it); stopped before deleting anything more",
                region.name
            ))),
        }
    }

    /// Lets the lease go, if it is still this GC's.
    pub(super) async fn release_gc_lease(&self, region: &Region, lease: &Lease) -> Result<()> {
        match region.lease().await? {
            Some((l, _)) if l.token == lease.token => region.delete_lease().await,
            _ => Ok(()),
        }
    }

    /// Renews the lease (same token) until `stop`; a renewal that finds another token stops.
    pub(super) async fn renew_gc_lease(
        &self,
        region: &Region,
        mut lease: Lease,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let period = (self.config.gc_lease / 3).max(std::time::Duration::from_secs(1));
        let mut stop = stop;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.changed() => return,
            }
            match region.lease().await {
                Ok(Some((l, e_tag))) if l.token == lease.token => {
                    lease.expires = self.now() + self.config.gc_lease.as_secs();
                    if let Err(e) = region.put_lease(&lease, Some(e_tag)).await {
                        tracing::warn!(region = %region.name, error = %e, "cannot renew the GC lease");
                    }
                }
                Ok(_) => return,
                Err(e) => tracing::warn!(region = %region.name, error = %e, "cannot read the GC lease to renew it"),
            }
        }
    }

    /// At the start of an upload: forgets condemned and deleted packs (they must not be
    /// deduplicated against) and, when this node has not looked for `gc.delete_delay` / 2
    /// (or since it started), every pack the region no longer lists: a pack is condemned at
    /// least that delay before it is deleted, so a node that looks more often sees it
    /// condemned first. Returns the time to compare later condemnations with.
    pub(super) async fn drop_condemned_from_index(&self, region: &Region) -> Result<u64> {
        let started = self.now();
        for pack in region.condemned().await?.all() {
            if region.index.has_pack(&pack) {
                region.index.delete_pack(pack)?;
            }
        }
        let delay = self.config.gc_delete_delay.as_secs();
        let last = self.index_checked.lock().get(&region.name).copied();
        if delay > 0 && last.is_none_or(|t| started.saturating_sub(t) * 2 >= delay) {
            let listed: std::collections::HashSet<PackId> = region
                .objects
                .list("packs")
                .await?
                .iter()
                .filter_map(|o| super::format::pack_id_of_key(&o.key))
                .collect();
            for pack in region.index.packs() {
                if !listed.contains(&pack) {
                    region.index.delete_pack(pack)?;
                }
            }
        }
        self.index_checked.lock().insert(region.name.clone(), started);
        Ok(started)
    }

    /// Before publishing: whether a pack the manifest references was condemned since the
    /// upload started (by GC on another node). Such packs leave the index; the caller uploads
    /// again. Reads the manifest's pages only when something was condemned meanwhile.
    pub(super) async fn reuses_condemned(
        &self,
        region: &Region,
        m: &super::format::Manifest,
        started: u64,
    ) -> Result<bool> {
        let fresh: std::collections::HashSet<PackId> =
            region.condemned().await?.since(started.saturating_sub(CLOCK_SKEW)).into_iter().collect();
        if fresh.is_empty() {
            return Ok(false);
        }
        let object = super::format::manifest_key(&m.snapshot_id);
        let mut hit = std::collections::HashSet::new();
        for p in &m.pages {
            let r = p.blob.to_ref(&object)?;
            if fresh.contains(&r.pack) {
                hit.insert(r.pack);
            }
            let page = region.read_page(m, p.index, &r).await?;
            hit.extend(page.entries.iter().map(|(_, b)| b.pack).filter(|p| fresh.contains(p)));
        }
        for pack in &hit {
            if region.index.has_pack(pack) {
                region.index.delete_pack(*pack)?;
            }
        }
        if !hit.is_empty() {
            tracing::info!(snapshot = %m.snapshot_id, region = %region.name, packs = hit.len(), "GC on another node condemned packs this upload reuses; uploading them again");
        }
        Ok(!hit.is_empty())
    }
}

/// Upload attempts made when GC on another node condemned a pack they reuse.
pub(super) const CONDEMNED_ATTEMPTS: u32 = 3;
/// Where the store has no conditional writes, how long a node waits before reading its lease
/// back (two nodes writing within this of each other: the later one wins, the other sees it).
const LEASE_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_checked() {
        assert!(is_node_id("n-0123456789abcd"));
        assert!(!is_node_id("n-0123"));
        assert!(!is_node_id("0123456789abcdef"));
        let dir = tempfile::tempdir().unwrap();
        let a = Node::load_or_create(dir.path()).unwrap();
        let b = Node::load_or_create(dir.path()).unwrap();
        assert_eq!(a.id, b.id, "the node id is made once per directory");
        std::fs::write(dir.path().join("meta/node-id"), "junk").unwrap();
        assert!(Node::load_or_create(dir.path()).is_err());
    }

    #[test]
    fn condemned_packs_since_a_time_deleted_or_not() {
        let mut c = Condemned::default();
        c.packs.insert(hex(&[1; 16]), 100);
        c.packs.insert(hex(&[2; 16]), 200);
        c.packs.insert(hex(&[3; 16]), 300);
        c.deleted(&[3; 16], 400);
        assert_eq!(c.since(150), vec![[2; 16], [3; 16]]);
        assert_eq!(c.all().len(), 3);
        // A tombstone goes after the limit.
        c.deleted(&[1; 16], 400 + TOMBSTONE_DAYS * 86_400);
        assert_eq!(c.deleted.len(), 1, "{c:?}");
        assert_eq!(c.all().len(), 2);
    }
}
