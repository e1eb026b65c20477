//! Snapshot shares as the store keeps them: one grant object per recipient and snapshot,
//! `shares/<recipient>/<snapshot id>` in the region's default repository, sealed with that
//! repository's keys — so every node serving the region (each has its key file) sees every
//! grant, whichever node made it (docs/FORMAT.md, "Share grants"). The grant names the
//! owner's repository, where the snapshot's data stays: a recipient's volume loads from there.

use serde::{Deserialize, Serialize};

use super::error::{Result, StoreError};
use super::format::{open_json, seal_json};
use super::StoreService;

const SHARE_MAGIC: &[u8; 8] = b"SNAPBLKS";

fn share_key(recipient: &str, snapshot_id: &str) -> String {
    format!("shares/{recipient}/{snapshot_id}")
}

fn share_aad(recipient: &str, snapshot_id: &str) -> Vec<u8> {
    format!("snapblk share {recipient} {snapshot_id}").into_bytes()
}

/// A grant of one snapshot to one account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShareGrant {
    pub snapshot_id: String,
    /// The owner's repository holding the snapshot (`ACCOUNT/REGION`, or `REGION` for the
    /// default account).
    pub repository: String,
    /// `VOLUME@SNAPSHOT` as the owner names it.
    pub volume: String,
    pub snapshot: String,
    pub owner: String,
    pub recipient: String,
    pub granted_at: u64,
    /// The grant ends by itself then (seconds since the epoch), as an unshare would.
    #[serde(default)]
    pub expires: Option<u64>,
    /// Set by unshare: no new volume from then on.
    #[serde(default)]
    pub revoked_at: Option<u64>,
    /// Volumes created before the revocation load until then; afterwards, reads of data
    /// they have not loaded fail naming the revoked share.
    #[serde(default)]
    pub grace_until: Option<u64>,
}

/// What a grant allows at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareState {
    /// New volumes may be created from the snapshot.
    Active,
    /// Revoked (or expired): volumes created before keep loading until the grace ends.
    Grace,
    /// Revoked and the grace period over: nothing more may be read through it.
    Ended,
}

impl ShareGrant {
    /// When an expired grant (never revoked) stops feeding volumes: a day after, as an
    /// unshare's default grace.
    pub const EXPIRY_GRACE: u64 = 24 * 3600;

    pub fn state(&self, now: u64) -> ShareState {
        let ended_at = match (self.revoked_at, self.expires) {
            (Some(_), _) => self.grace_until.unwrap_or(0),
            (None, Some(e)) if now >= e => e + Self::EXPIRY_GRACE,
            _ => return ShareState::Active,
        };
        if now < ended_at {
            ShareState::Grace
        } else {
            ShareState::Ended
        }
    }

    /// The sentence for a read refused because the share ended.
    pub fn ended_message(&self) -> String {
        format!(
            "the share of snapshot {} ({}@{}) by account {} with account {} ended ({}); data not loaded before then cannot be read: ask {} to share it again (snapblk snapshot share), or delete the volume",
            self.snapshot_id,
            self.volume,
            self.snapshot,
            self.owner,
            self.recipient,
            match (self.revoked_at, self.grace_until, self.expires) {
                (Some(r), Some(g), _) => format!("revoked {}, grace period until {}", crate::units::utc(r), crate::units::utc(g)),
                (_, _, Some(e)) => format!("expired {}", crate::units::utc(e)),
                _ => "revoked".into(),
            },
            self.owner
        )
    }
}

impl StoreService {
    /// Writes (or replaces) a grant in `region` (a configured region's name).
    pub async fn put_share(&self, region: &str, grant: &ShareGrant) -> Result<()> {
        let repo = self.region(region).await?;
        let sealed = seal_json(&repo.keys, SHARE_MAGIC, &share_aad(&grant.recipient, &grant.snapshot_id), grant);
        repo.objects.put(&share_key(&grant.recipient, &grant.snapshot_id), bytes::Bytes::from(sealed)).await
    }

    /// The grant of `snapshot_id` to `recipient` in `region`, read afresh; `None` if there is
    /// none.
    pub async fn share(&self, region: &str, recipient: &str, snapshot_id: &str) -> Result<Option<ShareGrant>> {
        let repo = self.region(region).await?;
        let key = share_key(recipient, snapshot_id);
        let bytes = match repo.objects.get(&key).await {
            Ok(b) => b,
            Err(StoreError::Missing(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let g: ShareGrant =
            open_json(&repo.keys, SHARE_MAGIC, &share_aad(recipient, snapshot_id), &bytes, &key, "share grant")?;
        if g.recipient != recipient || g.snapshot_id != snapshot_id {
            return Err(StoreError::corrupt(&key, "share grant does not describe this share"));
        }
        Ok(Some(g))
    }

    /// Every grant to `recipient` in `region` (LIST: for `shared-with-me`).
    pub async fn shares_to(&self, region: &str, recipient: &str) -> Result<Vec<ShareGrant>> {
        let repo = self.region(region).await?;
        let prefix = format!("shares/{recipient}");
        let mut out = Vec::new();
        for o in repo.objects.list(&prefix).await? {
            let Some(id) = o.key.strip_prefix(&format!("{prefix}/")) else { continue };
            if let Some(g) = self.share(region, recipient, id).await? {
                out.push(g);
            }
        }
        Ok(out)
    }

    pub async fn delete_share(&self, region: &str, recipient: &str, snapshot_id: &str) -> Result<()> {
        self.region(region).await?.objects.delete(&share_key(recipient, snapshot_id)).await
    }
}

const IMAGE_SHARE_MAGIC: &[u8; 8] = b"SNAPBLKI";

fn image_share_key(recipient: &str, image: &str) -> String {
    // An image's name is `OWNER/NAME` (or a bare name: the default account's).
    format!("image-shares/{recipient}/{}/{}", crate::engine::owner_of(image), crate::engine::bare_name(image))
}

/// A grant of an image to one account: its disks, each a snapshot shared by its own grant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageGrant {
    pub image: String,
    pub owner: String,
    pub recipient: String,
    pub description: String,
    /// (disk name, snapshot id), root first.
    pub disks: Vec<(String, String)>,
    pub granted_at: u64,
    #[serde(default)]
    pub revoked_at: Option<u64>,
}

impl StoreService {
    pub async fn put_image_share(&self, region: &str, grant: &ImageGrant) -> Result<()> {
        let repo = self.region(region).await?;
        let key = image_share_key(&grant.recipient, &grant.image);
        let sealed = seal_json(&repo.keys, IMAGE_SHARE_MAGIC, key.as_bytes(), grant);
        repo.objects.put(&key, bytes::Bytes::from(sealed)).await
    }

    /// The grant of image `image` to `recipient` in `region`, if any.
    pub async fn image_share(&self, region: &str, recipient: &str, image: &str) -> Result<Option<ImageGrant>> {
        let repo = self.region(region).await?;
        let key = image_share_key(recipient, image);
        let bytes = match repo.objects.get(&key).await {
            Ok(b) => b,
            Err(StoreError::Missing(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let g: ImageGrant =
            open_json(&repo.keys, IMAGE_SHARE_MAGIC, key.as_bytes(), &bytes, &key, "image share grant")?;
        if g.recipient != recipient || g.image != image {
            return Err(StoreError::corrupt(&key, "image share grant does not describe this share"));
        }
        Ok(Some(g))
    }

    /// Every image granted to `recipient` in `region` (LIST).
    pub async fn image_shares_to(&self, region: &str, recipient: &str) -> Result<Vec<ImageGrant>> {
        let repo = self.region(region).await?;
        let prefix = format!("image-shares/{recipient}");
        let mut out = Vec::new();
        for o in repo.objects.list(&prefix).await? {
            let Some((owner, name)) = o.key.strip_prefix(&format!("{prefix}/")).and_then(|r| r.split_once('/')) else {
                continue;
            };
            let image = crate::engine::owned_name(owner, name);
            if let Some(g) = self.image_share(region, recipient, &image).await? {
                out.push(g);
            }
        }
        Ok(out)
    }
}
