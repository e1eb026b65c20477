//! Regions (the object stores of `snapblk.toml`): what they hold, GC, their key files.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Access, Caller, Error, Result, Service};
use crate::jobs::JobView;
use crate::store::{GcReport, RegionInfo, RegionSnapshot, StoreError};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct GcRequest {
    /// Override the configured grace period (e.g. "0s").
    #[serde(default)]
    pub grace: Option<String>,
}

/// The key file of a region (`snapblk key export`).
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyFile {
    pub region: String,
    pub path: PathBuf,
    pub content: String,
}

impl Service {
    pub fn list_regions(&self, caller: &Caller) -> Result<Vec<String>> {
        caller.may(Access::Read)?;
        Ok(self.store.region_names())
    }

    /// A region as the caller's account sees it: its repository there (`ACCOUNT/REGION`
    /// for an administrator looking at another account's).
    pub async fn region(&self, caller: &Caller, name: &str) -> Result<RegionInfo> {
        caller.may(Access::Read)?;
        let mut info = self.store.region_info(&caller.repository(name)?).await?;
        info.volumes.retain(|v| caller.sees(&v.volume));
        Ok(info)
    }

    /// The snapshots stored in the caller's repository of a region, by any node.
    pub async fn region_snapshots(&self, caller: &Caller, name: &str) -> Result<Vec<RegionSnapshot>> {
        caller.may(Access::Read)?;
        let mut all = self.store.region_snapshots_accounted(&caller.repository(name)?).await?;
        all.retain(|s| caller.sees(&s.volume));
        Ok(all)
    }

    /// Every repository of region `name` that exists: the default account's and those of
    /// the accounts with snapshots there (`name` alone: `ACCOUNT/REGION` is that one only).
    async fn repositories_of(&self, name: &str) -> Result<Vec<String>> {
        self.store.check_region(name)?;
        if name.contains('/') {
            return Ok(vec![name.to_string()]);
        }
        let mut out = vec![name.to_string()];
        for account in self.accounts.names() {
            let repo = super::accounts::owned_name(&account, name);
            if repo != name && self.store.repository_exists(&repo).await? {
                out.push(repo);
            }
        }
        Ok(out)
    }

    /// Deletes the packs no snapshot references (older than the grace period) in every
    /// repository of the region (or in one account's, `ACCOUNT/REGION`).
    pub async fn gc_region(&self, caller: &Caller, name: &str, grace: Option<std::time::Duration>) -> Result<GcReport> {
        caller.may(Access::Admin)?;
        let mut total: Option<GcReport> = None;
        for repo in self.repositories_of(name).await? {
            let report = self.store.gc(&repo, grace).await?;
            total = Some(match total {
                None => report,
                Some(t) => t.merged(report),
            });
        }
        Ok(total.expect("a region has its default repository"))
    }

    /// [`Self::gc_region`] as a job.
    pub fn start_gc(self: &std::sync::Arc<Self>, caller: &Caller, name: &str, req: GcRequest) -> Result<JobView> {
        caller.may(Access::Admin)?;
        self.store.check_region(name)?;
        let grace = req.grace.as_deref().map(crate::units::parse_duration).transpose().map_err(Error::Invalid)?;
        let (svc, name2, by) = (self.clone(), name.to_string(), caller.clone());
        Ok(self.jobs.spawn(
            "gc",
            name,
            caller.account(),
            move |_| async move { svc.gc_region(&by, &name2, grace).await },
        ))
    }

    /// A region's key file, to back it up (created on the region's first use); with
    /// `ACCOUNT/REGION`, the account's key file (which wraps its repositories' keys).
    pub async fn region_key(&self, caller: &Caller, name: &str) -> Result<KeyFile> {
        caller.may(Access::Admin)?;
        self.store.check_region(name)?;
        let region = self.store.region(name).await?;
        let path = self.store.config.regions[crate::engine::bare_name(name)]
            .for_account(super::owner_of(&region.name), self.store.dir())
            .key_file;
        let content = std::fs::read_to_string(&path).map_err(StoreError::io(format!("reading {}", path.display())))?;
        Ok(KeyFile { region: name.to_string(), path, content })
    }
}
