//! The store's one error type. Like the engine's, every message says what failed, on which
//! object, and what to do; [`StoreError::kind`] gives the class the API maps to HTTP status.

use crate::engine::{EngineError, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Busy(String),
    #[error("configuration error: {0}")]
    Config(String),
    /// An object's bytes fail verification (AEAD tag, keyed hash, framing).
    #[error("object {object} is corrupt: {reason}")]
    Corrupt { object: String, reason: String },
    /// An object a manifest references does not exist.
    #[error("object {0} is missing from the store")]
    Missing(String),
    #[error("{0}")]
    WrongKey(String),
    /// Another account's snapshot whose share with this one has ended.
    #[error("{0}")]
    ShareEnded(String),
    /// An object in an archive class that needs a thaw (S3 Glacier Flexible Retrieval, Deep
    /// Archive, ...) and is not restored; `snapshot` is the one being read, when known.
    #[error("{}", frozen_message(object, region, class, snapshot.as_deref()))]
    Frozen { object: String, region: String, class: String, snapshot: Option<String> },
    /// The store kept failing after retries.
    #[error("the object store failed: {0}")]
    Unavailable(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::NotFound(_) => ErrorKind::NotFound,
            StoreError::Invalid(_) | StoreError::Config(_) => ErrorKind::Invalid,
            // Not readable now: a restore makes it so (409, exit 5).
            StoreError::Busy(_) | StoreError::Frozen { .. } => ErrorKind::Busy,
            StoreError::ShareEnded(_) => ErrorKind::Forbidden,
            StoreError::Corrupt { .. } | StoreError::Missing(_) | StoreError::WrongKey(_) => ErrorKind::Corrupt,
            StoreError::Unavailable(_) => ErrorKind::Unavailable,
            StoreError::Io { .. } => ErrorKind::Io,
            StoreError::Engine(e) => e.kind(),
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }

    /// This error with the snapshot being read named (a frozen object's message then says
    /// which snapshot to restore).
    pub fn reading(self, snapshot_id: &str) -> StoreError {
        match self {
            StoreError::Frozen { object, region, class, snapshot: None } => {
                StoreError::Frozen { object, region, class, snapshot: Some(snapshot_id.to_string()) }
            }
            other => other,
        }
    }

    pub fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt { object: object.into(), reason: reason.into() }
    }
}

impl crate::jobs::HasKind for StoreError {
    fn kind(&self) -> ErrorKind {
        StoreError::kind(self)
    }
}

fn frozen_message(object: &str, region: &str, class: &str, snapshot: Option<&str>) -> String {
    match snapshot {
        Some(id) => format!(
            "snapshot {id} is archived in {class} and not restored: run `snapblk snapshot restore-archive {id} --region {region}` (reads work once it reports every object readable)"
        ),
        None => format!(
            "object {object} in region '{region}' is archived in {class} and not restored: run `snapblk snapshot restore-archive ID --region {region}` for the snapshot that reads it"
        ),
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
