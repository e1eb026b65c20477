//! The engine's one error type. Every message is a sentence that says what failed, on which
//! object, and what to do; the control API maps [`ErrorKind`] to HTTP status and the NBD glue
//! maps it to NBD error codes, each in one place.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    Invalid,
    Busy,
    ReadOnly,
    NoSpace,
    Io,
    Corrupt,
    Gone,
    /// The object store kept failing (after retries); try again later.
    Unavailable,
    /// The snapshot's data is only in the object store.
    NotLocal,
    /// Over a quota that waiting does not lift (delete something or raise the quota).
    Quota,
    /// Over a task limit or rate that waiting lifts (the error says how long).
    Throttled,
    /// The caller's role lacks the permission the operation needs (see `service::Access`).
    Forbidden,
    /// The caller did not prove who it is (no token, or an expired or revoked one).
    Unauthenticated,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    ReadOnly(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    NotLocal(String),
    #[error("{0}")]
    Unavailable(String),
}

impl EngineError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::NotFound(_) => ErrorKind::NotFound,
            EngineError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            EngineError::Invalid(_) => ErrorKind::Invalid,
            EngineError::Busy(_) => ErrorKind::Busy,
            EngineError::ReadOnly(_) => ErrorKind::ReadOnly,
            EngineError::NoSpace(_) => ErrorKind::NoSpace,
            EngineError::Io { .. } => ErrorKind::Io,
            EngineError::Corrupt(_) => ErrorKind::Corrupt,
            EngineError::Gone(_) => ErrorKind::Gone,
            EngineError::NotLocal(_) => ErrorKind::NotLocal,
            EngineError::Unavailable(_) => ErrorKind::Unavailable,
        }
    }

    /// Wraps an I/O error with what was being done, e.g. `io("writing the journal")`.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
        let context = context.into();
        move |source| EngineError::Io { context, source }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
