//! Revocation of open handles (forced rollback, delete, shutdown).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Revocation of open handles: a generation bumped on revoke. The data path checks it with
/// one atomic load; the NBD server awaits it to close the connection.
pub(crate) struct Revoker {
    generation: Arc<AtomicU64>,
    wake: tokio::sync::watch::Sender<u64>,
}

#[derive(Clone)]
pub(crate) struct Ticket {
    generation: Arc<AtomicU64>,
    issued: u64,
    wake: tokio::sync::watch::Receiver<u64>,
}

impl Revoker {
    pub(crate) fn new() -> Revoker {
        Revoker { generation: Arc::new(AtomicU64::new(0)), wake: tokio::sync::watch::Sender::new(0) }
    }
    pub(crate) fn ticket(&self) -> Ticket {
        Ticket {
            generation: self.generation.clone(),
            issued: self.generation.load(Ordering::Acquire),
            wake: self.wake.subscribe(),
        }
    }
    pub(crate) fn revoke(&self) {
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.wake.send_replace(g);
    }
}

impl Ticket {
    pub(crate) fn is_revoked(&self) -> bool {
        self.generation.load(Ordering::Acquire) != self.issued
    }
    pub(crate) async fn revoked(&self) {
        let mut rx = self.wake.clone();
        let issued = self.issued;
        // The watch carries the same generation; an Err means the engine is gone: revoked too.
        let _ = rx.wait_for(|g| *g != issued).await;
    }
}
