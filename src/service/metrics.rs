//! Counters for the metrics endpoint (`crate::metrics`) that no other view carries: the data
//! path's per-volume I/O counters and the object store's request counters per region. The
//! endpoint takes everything else (volumes, snapshots, uploads, policies) from the ordinary
//! list operations.

use super::{Access, Caller, Result, Service};
use crate::engine::IoView;
use crate::store::objects::MetricsView;

impl Service {
    /// Every volume's I/O counters (requests of the NBD, kernel NBD and ublk front ends), by
    /// volume id.
    pub fn volume_io(&self, caller: &Caller) -> Result<Vec<(String, IoView)>> {
        caller.may(Access::Read)?;
        Ok(self.engine.volume_io())
    }

    /// Object-store requests, bytes, retries and failures per configured region.
    pub fn store_metrics(&self, caller: &Caller) -> Result<Vec<(String, MetricsView)>> {
        caller.may(Access::Read)?;
        Ok(self.store.region_metrics())
    }
}
