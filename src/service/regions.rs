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

    pub async fn region(&self, caller: &Caller, name: &str) -> Result<RegionInfo> {
        caller.may(Access::Read)?;
        Ok(self.store.region_info(name).await?)
    }

    /// The snapshots stored in a region, by any node.
    pub async fn region_snapshots(&self, caller: &Caller, name: &str) -> Result<Vec<RegionSnapshot>> {
        caller.may(Access::Read)?;
        let mut all = self.store.region_snapshots(name).await?;
        all.retain(|s| caller.sees(&s.volume));
        Ok(all)
    }

    /// Deletes the packs no snapshot in the region references (older than the grace period).
    pub async fn gc_region(&self, caller: &Caller, name: &str, grace: Option<std::time::Duration>) -> Result<GcReport> {
        caller.may(Access::Admin)?;
        Ok(self.store.gc(name, grace).await?)
    }

    /// [`Self::gc_region`] as a job.
    pub fn start_gc(&self, caller: &Caller, name: &str, req: GcRequest) -> Result<JobView> {
        caller.may(Access::Admin)?;
        self.store.check_region(name)?;
        let grace = req.grace.as_deref().map(crate::units::parse_duration).transpose().map_err(Error::Invalid)?;
        let (store, name2) = (self.store.clone(), name.to_string());
        Ok(self.jobs.spawn("gc", name, move |_| async move { store.gc(&name2, grace).await }))
    }

    /// A region's key file, to back it up (created on the region's first use).
    pub async fn region_key(&self, caller: &Caller, name: &str) -> Result<KeyFile> {
        caller.may(Access::Admin)?;
        self.store.check_region(name)?;
        self.store.region(name).await?;
        let path = self.store.config.regions[name].key_file.clone();
        let content = std::fs::read_to_string(&path).map_err(StoreError::io(format!("reading {}", path.display())))?;
        Ok(KeyFile { region: name.to_string(), path, content })
    }
}
