//! Opening volumes and snapshots for a front end's data path (NBD exports): the operation
//! resolves the name and checks the caller; the front end then does I/O on the engine handle
//! it got, without coming back here.

use super::{Access, Caller, Error, Result, Service};
use crate::engine::{parse_snapshot_id, ErrorKind, SnapshotHandle, VolumeHandle};

/// An opened export: `VOLUME` (read-write) or `VOLUME@SNAPSHOT` (read-only; a released
/// snapshot reads from the region it went to, through the same handle). Ids work as names:
/// `v-…`, `VOLUME@s-…`, and `s-…` alone for the snapshot.
pub enum ExportHandle {
    Volume(VolumeHandle),
    Snapshot(SnapshotHandle),
}

impl Service {
    /// Every export's name and description: volumes and their snapshots.
    pub fn export_names(&self, caller: &Caller) -> Result<Vec<(String, String)>> {
        caller.may(Access::Read)?;
        let hidden = self.hidden_exports();
        Ok(self
            .engine
            .export_names()
            .into_iter()
            .filter(|(name, _)| !hidden.contains(name) && caller.sees(name.split('@').next().unwrap_or(name)))
            // A staging volume of the EBS direct API is no export (its completed snapshot is).
            .filter(|(name, _)| !super::is_staging_name(name))
            .collect())
    }

    /// Opens export `name`; the empty name is the only volume, when there is exactly one.
    pub fn open_export(&self, caller: &Caller, name: &str) -> Result<ExportHandle> {
        let name = if name.is_empty() {
            let deleted = self.hidden_exports();
            let volumes: Vec<_> = self
                .engine
                .list_volumes()
                .into_iter()
                .filter(|v| !deleted.contains(&v.name) && caller.sees(&v.name) && !super::is_staging_name(&v.name))
                .collect();
            match volumes.as_slice() {
                [only] => only.name.clone(),
                _ => {
                    return Err(Error::Invalid(
                        "no default export: name a volume (or VOLUME@SNAPSHOT); list them with nbdinfo --list".into(),
                    ))
                }
            }
        } else {
            name.to_string()
        };
        if name.contains('@') || parse_snapshot_id(&name).is_some() {
            caller.may(Access::Read)?;
            let name = self.live_snapshot(caller, &name)?.id;
            // Released after upload (now, or any moment): read from the region it went to.
            // Once more if the release sweep released it between the two looks (as in
            // `released_or_not`, which is async).
            let mut again = true;
            loop {
                let region = self.store.region_if_released(&self.engine.snapshot(&name)?)?;
                match self.engine.open_snapshot(&name, region.as_deref()) {
                    Err(e) if e.kind() == ErrorKind::NotLocal && region.is_none() && again => again = false,
                    opened => return Ok(ExportHandle::Snapshot(opened?)),
                }
            }
        } else {
            caller.may(Access::Write)?;
            let id = self.live_volume(caller, &name)?.id;
            Ok(ExportHandle::Volume(self.engine.open_volume(&id)?))
        }
    }
}
