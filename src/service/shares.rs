//! Sharing snapshots between accounts (README "Sharing snapshots"): the owner grants one of
//! its uploaded snapshots to another account, which can then create volumes from it on any
//! node serving both accounts — they load from the owner's repository, and are written and
//! snapshotted into the recipient's own. Grants live in the store ([`crate::store::shares`]),
//! so every node sees them; the owner's node also keeps its grants in `lifecycle.json` to
//! refuse the snapshot's delete while it is shared.

use serde::{Deserialize, Serialize};

use super::lifecycle::{Key, LocalShare};
use super::{owner_of, Access, Caller, Error, Event, Result, Service};
use crate::engine::{bare_name, validate_name, SnapshotInfo};
use crate::store::shares::{ShareGrant, ShareState};

/// Most accounts one snapshot is shared with at a time.
pub const MAX_SHARES_PER_SNAPSHOT: usize = 64;
/// How long volumes created from a snapshot keep loading after an unshare, by default.
const DEFAULT_GRACE: u64 = 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareRequest {
    /// The account to share with.
    pub with: String,
    /// The share ends by itself after this long (e.g. "30d").
    #[serde(default)]
    pub expires: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnshareRequest {
    pub with: String,
    /// How long volumes created from it before keep loading (default "24h").
    #[serde(default)]
    pub grace: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SharedQuery {
    /// Whose shares (an administrator's question; default: the caller's account).
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
}

/// A share, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShareView {
    pub snapshot_id: String,
    pub volume: String,
    pub snapshot: String,
    pub owner: String,
    pub recipient: String,
    /// The owner's repository the data is read from.
    pub repository: String,
    pub granted_at: u64,
    pub expires: Option<u64>,
    /// `active` (volumes may be created from it), `grace` (revoked or expired; volumes
    /// created before still load) or `ended`.
    pub state: String,
    pub grace_until: Option<u64>,
}

impl SharedQuery {
    /// The account whose shares are asked for: the caller's, or (an administrator's
    /// question) `account`; another account's is "not found" for anyone else.
    pub(super) fn recipient(&self, caller: &Caller) -> Result<String> {
        match &self.account {
            Some(a) if caller.sees_account(a) => Ok(a.clone()),
            Some(a) => Err(Error::NotFound(format!("no account '{a}'"))),
            None => Ok(caller.account().to_string()),
        }
    }
}

impl ShareView {
    fn of(g: &ShareGrant, now: u64) -> ShareView {
        ShareView {
            snapshot_id: g.snapshot_id.clone(),
            volume: g.volume.clone(),
            snapshot: g.snapshot.clone(),
            owner: g.owner.clone(),
            recipient: g.recipient.clone(),
            repository: g.repository.clone(),
            granted_at: g.granted_at,
            expires: g.expires,
            state: match g.state(now) {
                ShareState::Active => "active",
                ShareState::Grace => "grace",
                ShareState::Ended => "ended",
            }
            .into(),
            grace_until: g.grace_until,
        }
    }
}

fn seconds(what: &str, text: Option<&str>) -> Result<Option<u64>> {
    text.map(|t| {
        crate::units::parse_duration(t).map(|d| d.as_secs()).map_err(|e| Error::Invalid(format!("{what}: {e}")))
    })
    .transpose()
}

impl Service {
    /// Shares an uploaded snapshot with another account (again: the expiry is replaced).
    pub async fn share_snapshot(&self, caller: &Caller, r: &str, req: ShareRequest) -> Result<ShareView> {
        caller.may(Access::Manage)?;
        let snap = self.live_snapshot(caller, r)?;
        let name = format!("{}@{}", snap.volume, snap.name);
        let owner = owner_of(&snap.volume).to_string();
        validate_name("account", &req.with)?;
        if req.with == owner {
            return Err(Error::Invalid(format!("snapshot {name} is account {owner}'s already")));
        }
        if !self.accounts.exists(&req.with) {
            return Err(Error::NotFound(format!(
                "no account '{}' on this node (list them with: snapblk account list)",
                req.with
            )));
        }
        let now = self.engine.clock().now();
        let expires = seconds("--expires", req.expires.as_deref())?.map(|d| now + d);
        // Recipients load from the store: only an uploaded snapshot can be shared.
        let repository = self
            .store
            .uploaded_region(&snap)
            .map_err(|e| Error::Invalid(format!("snapshot {name} cannot be shared before it is in the store: {e}")))?;
        {
            let st = self.lifecycle.lock();
            let active = st.shares.get(&snap.id).map_or(0, |m| m.values().filter(|s| s.revoked_at.is_none()).count());
            let again =
                st.shares.get(&snap.id).is_some_and(|m| m.get(&req.with).is_some_and(|s| s.revoked_at.is_none()));
            if active >= MAX_SHARES_PER_SNAPSHOT && !again {
                return Err(Error::Limit {
                    message: format!(
                        "snapshot {name} is shared with {MAX_SHARES_PER_SNAPSHOT} accounts already, the most there can be; unshare it from one first"
                    ),
                    retry_after: None,
                });
            }
        }
        let grant = ShareGrant {
            snapshot_id: snap.id.clone(),
            repository: repository.clone(),
            volume: snap.volume.clone(),
            snapshot: snap.name.clone(),
            owner,
            recipient: req.with.clone(),
            granted_at: now,
            expires,
            revoked_at: None,
            grace_until: None,
        };
        self.store.put_share(bare_name(&repository), &grant).await?;
        self.record_share(&snap.id, &req.with, Some(LocalShare::of(&grant)))?;
        self.event(Event::SnapshotShared {
            volume: snap.volume.clone(),
            snapshot: snap.name.clone(),
            id: snap.id.clone(),
            with: req.with.clone(),
            by: caller.to_string(),
        });
        tracing::info!(snapshot = %snap.id, with = %req.with, by = %caller, "snapshot shared");
        Ok(ShareView::of(&grant, now))
    }

    /// Ends a share: no new volume from now on; volumes created from it before keep loading
    /// for the grace period, then reads of what they have not loaded fail naming the share.
    pub async fn unshare_snapshot(&self, caller: &Caller, r: &str, req: UnshareRequest) -> Result<ShareView> {
        caller.may(Access::Manage)?;
        let snap = self.live_snapshot(caller, r)?;
        let name = format!("{}@{}", snap.volume, snap.name);
        let local = self.lifecycle.lock().shares.get(&snap.id).and_then(|m| m.get(&req.with)).cloned();
        let Some(local) = local.filter(|s| s.revoked_at.is_none()) else {
            return Err(Error::NotFound(format!("snapshot {name} is not shared with account '{}'", req.with)));
        };
        let now = self.engine.clock().now();
        let grace = seconds("--grace", req.grace.as_deref())?.unwrap_or(DEFAULT_GRACE);
        let region = bare_name(&local.repository).to_string();
        let mut grant = match self.store.share(&region, &req.with, &snap.id).await? {
            Some(g) => g,
            None => local.grant(&snap, &req.with),
        };
        grant.revoked_at = Some(now);
        grant.grace_until = Some(now + grace);
        self.store.put_share(&region, &grant).await?;
        self.record_share(&snap.id, &req.with, Some(LocalShare::of(&grant)))?;
        self.event(Event::SnapshotUnshared {
            volume: snap.volume.clone(),
            snapshot: snap.name.clone(),
            id: snap.id.clone(),
            with: req.with.clone(),
            grace_until: now + grace,
            by: caller.to_string(),
        });
        tracing::info!(snapshot = %snap.id, with = %req.with, grace, by = %caller, "snapshot unshared");
        Ok(ShareView::of(&grant, now))
    }

    /// The shares of a snapshot this node made (its owner's view).
    pub fn snapshot_shares(&self, caller: &Caller, r: &str) -> Result<Vec<ShareView>> {
        caller.may(Access::Read)?;
        let snap = self.live_snapshot(caller, r)?;
        let now = self.engine.clock().now();
        let st = self.lifecycle.lock();
        Ok(st
            .shares
            .get(&snap.id)
            .into_iter()
            .flatten()
            .map(|(with, s)| ShareView::of(&s.grant(&snap, with), now))
            .collect())
    }

    /// The snapshots other accounts share with the caller's account (or, for an
    /// administrator, with `q.account`), in one region or all, whichever node shared them.
    pub async fn shared_with_me(&self, caller: &Caller, q: SharedQuery) -> Result<Vec<ShareView>> {
        caller.may(Access::Read)?;
        let account = q.recipient(caller)?;
        let regions = match q.region {
            Some(r) => vec![bare_name(&r).to_string()],
            None => self.store.region_names(),
        };
        let now = self.engine.clock().now();
        let mut out = Vec::new();
        for region in regions {
            out.extend(self.store.shares_to(&region, &account).await?.iter().map(|g| ShareView::of(g, now)));
        }
        out.sort_by(|a, b| (a.owner.as_str(), a.granted_at).cmp(&(b.owner.as_str(), b.granted_at)));
        Ok(out)
    }

    /// The active grant letting account `recipient` create a volume from snapshot `id` of
    /// another account, looked up in `region` (a region or repository name) or every region.
    /// A revoked or expired one is refused with the sentence saying so; none at all is
    /// "not found", as for any snapshot the account cannot see.
    pub(super) async fn share_for_new_volume(
        &self,
        recipient: &str,
        id: &str,
        region: Option<&str>,
    ) -> Result<ShareGrant> {
        let regions = match region {
            Some(r) => vec![bare_name(r).to_string()],
            None => self.store.region_names(),
        };
        let now = self.engine.clock().now();
        for region in &regions {
            if let Some(g) = self.store.share(region, recipient, id).await? {
                return match g.state(now) {
                    ShareState::Active => Ok(g),
                    _ => Err(Error::Forbidden(format!(
                        "the share of snapshot {id} by account {} with account {recipient} has ended; no new volumes can be made from it (ask {} to share it again)",
                        g.owner, g.owner
                    ))),
                };
            }
        }
        Err(Error::NotFound(format!(
            "no snapshot {id} in region(s) {}; list them with: snapblk snapshot list --region REGION (or snapblk snapshot shared-with-me)",
            regions.join(", ")
        )))
    }

    /// Refuses to delete a snapshot shared with other accounts, naming them.
    pub(super) fn check_not_shared(&self, id: &str, name: &str) -> Result<()> {
        let now = self.engine.clock().now();
        let st = self.lifecycle.lock();
        let with: Vec<&str> = st
            .shares
            .get(id)
            .into_iter()
            .flatten()
            .filter(|(_, s)| s.revoked_at.is_none() && s.expires.is_none_or(|e| now < e))
            .map(|(a, _)| a.as_str())
            .collect();
        if with.is_empty() {
            return Ok(());
        }
        Err(Error::Held(format!(
            "snapshot {name} is shared with account(s) {}; unshare it first: snapblk snapshot unshare {name} --with ACCOUNT",
            with.join(", ")
        )))
    }

    /// A snapshot deleted for good: its grants leave the store (best effort: a grant naming
    /// a deleted snapshot only finds nothing to load).
    pub(super) async fn forget_shares(&self, snap: &SnapshotInfo) {
        let shares = self.lifecycle.lock().shares.get(&snap.id).cloned().unwrap_or_default();
        for (with, s) in shares {
            if let Err(e) = self.store.delete_share(bare_name(&s.repository), &with, &snap.id).await {
                tracing::warn!(snapshot = %snap.id, with, error = %e, "cannot delete a share grant from the store");
            }
            if let Err(e) = self.record_share(&snap.id, &with, None) {
                tracing::warn!(snapshot = %snap.id, with, error = %e, "cannot forget a share");
            }
        }
    }

    fn record_share(&self, id: &str, with: &str, value: Option<LocalShare>) -> Result<()> {
        let mut st = self.lifecycle.lock();
        match value {
            Some(v) => {
                st.shares.entry(id.to_string()).or_default().insert(with.to_string(), v);
            }
            None => {
                if let Some(m) = st.shares.get_mut(id) {
                    m.remove(with);
                    if m.is_empty() {
                        st.shares.remove(id);
                    }
                }
            }
        }
        st.touch(Key::Share(id.to_string()));
        self.save_lifecycle(&mut st)
    }
}
