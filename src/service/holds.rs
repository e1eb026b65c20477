//! Holds: a held snapshot cannot be deleted — by hand, by retention or by anything else that
//! deletes through [`Service::delete_snapshot`] — until the hold is released.

use serde::{Deserialize, Serialize};

use super::lifecycle::{Hold, Key};
use super::{Access, Caller, Error, Result, Service, SnapshotView};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HoldRequest {
    #[serde(default)]
    pub reason: String,
}

impl Service {
    /// Puts a hold on a snapshot (again: the reason is replaced).
    pub fn hold_snapshot(&self, caller: &Caller, r: &str, req: HoldRequest) -> Result<SnapshotView> {
        caller.may(Access::Manage)?;
        let snap = self.live_snapshot(caller, r)?;
        {
            let mut st = self.lifecycle.lock();
            st.holds.insert(snap.id.clone(), Hold { since: self.engine.clock().now(), reason: req.reason });
            st.touch(Key::Hold(snap.id.clone()));
            self.save_lifecycle(&mut st)?;
        }
        tracing::info!(snapshot = %snap.id, by = %caller, "snapshot held");
        self.snapshot(caller, &snap.id)
    }

    /// Releases a snapshot's hold (nothing to do if it has none).
    pub fn release_hold(&self, caller: &Caller, r: &str) -> Result<SnapshotView> {
        caller.may(Access::Manage)?;
        let snap = self.live_snapshot(caller, r)?;
        {
            let mut st = self.lifecycle.lock();
            if st.holds.remove(&snap.id).is_some() {
                st.touch(Key::Hold(snap.id.clone()));
                self.save_lifecycle(&mut st)?;
                tracing::info!(snapshot = %snap.id, by = %caller, "snapshot hold released");
            }
        }
        self.snapshot(caller, &snap.id)
    }

    /// Refuses to delete a held, shared or image-pinned snapshot, saying how to release it.
    pub(super) fn check_not_held(&self, id: &str, name: &str) -> Result<()> {
        self.check_not_shared(id, name)?;
        let images = self.images_pinning(id);
        if !images.is_empty() {
            return Err(Error::Held(format!(
                "snapshot {name} is a disk of image(s) {}; delete the image first: snapblk image delete {}",
                images.join(", "),
                images[0]
            )));
        }
        match self.lifecycle.lock().holds.get(id) {
            None => Ok(()),
            Some(h) => Err(Error::Held(format!(
                "snapshot {name} is held{} since {}; release the hold first: snapblk snapshot release-hold {name}",
                if h.reason.is_empty() { String::new() } else { format!(" ({})", h.reason) },
                crate::units::utc(h.since)
            ))),
        }
    }
}

impl Service {
    /// A snapshot deleted for good leaves the policies' books and the recycle bin (a hold
    /// cannot be on it: it was refused).
    pub(super) fn forget_snapshot(&self, id: &str, volume_id: &str) {
        let mut st = self.lifecycle.lock();
        let binned = st.bin.remove(id).is_some();
        if binned {
            st.touch(Key::Bin(id.to_string()));
        }
        let changed = st.unbook(id, volume_id) || binned;
        if changed {
            if let Err(e) = self.save_lifecycle(&mut st) {
                tracing::warn!(snapshot = id, error = %e, "cannot record a deleted snapshot in the policies' books; fixed at the next start");
            }
        }
    }

    /// A deleted volume leaves every policy.
    pub(super) fn forget_volume(&self, id: &str) {
        let mut st = self.lifecycle.lock();
        st.drop_volume(id);
        if let Err(e) = self.save_lifecycle(&mut st) {
            tracing::warn!(volume = id, error = %e, "cannot record a deleted volume in the policies; fixed at the next start");
        }
    }
}
