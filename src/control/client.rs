//! The CLI's side of the control API: HTTP/1 over the daemon's unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::ErrorBody;
use crate::engine::ErrorKind;

/// What went wrong with a CLI command; each class has its own exit code
/// ([`ClientError::exit_code`], README "Exit codes").
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no snapblk daemon is running on {0} (start one with: snapblk serve --dir {0})")]
    NoDaemon(String),
    /// The daemon's socket exists but this user may not use it.
    #[error("{0}")]
    Denied(String),
    /// The command as typed cannot be run (a bad value, a missing option).
    #[error("{0}")]
    Usage(String),
    /// The daemon refused or failed the request; the message is its sentence.
    #[error("{message}")]
    Refused { kind: Option<ErrorKind>, message: String },
    /// The command ran and its outcome is a failure (e.g. a verify that found problems).
    #[error("{0}")]
    Failed(String),
    #[error("talking to the daemon failed: {0}")]
    Transport(String),
}

impl ClientError {
    /// The exit code of each class: 1 failed, 2 usage, 3 no daemon, 4 not found, 5 refused
    /// (conflict, busy, quota, locked), 6 object store unavailable, 7 permission denied.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Failed(_) | ClientError::Transport(_) => 1,
            ClientError::Usage(_) => 2,
            ClientError::NoDaemon(_) => 3,
            ClientError::Denied(_) => 7,
            ClientError::Refused { kind, .. } => match kind {
                Some(ErrorKind::Invalid) => 2,
                Some(ErrorKind::NotFound | ErrorKind::Gone) => 4,
                Some(
                    ErrorKind::AlreadyExists
                    | ErrorKind::Busy
                    | ErrorKind::NotLocal
                    | ErrorKind::Quota
                    | ErrorKind::Throttled
                    | ErrorKind::ReadOnly,
                ) => 5,
                Some(ErrorKind::Unavailable) => 6,
                Some(ErrorKind::NoSpace | ErrorKind::Io | ErrorKind::Corrupt) | None => 1,
            },
        }
    }

    /// The class as a word, for `--json` error objects.
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::NoDaemon(_) => "no_daemon",
            ClientError::Denied(_) => "permission_denied",
            ClientError::Usage(_) => "usage",
            ClientError::Failed(_) => "failed",
            ClientError::Transport(_) => "transport",
            ClientError::Refused { kind, .. } => match kind {
                Some(ErrorKind::NotFound) => "not_found",
                Some(ErrorKind::AlreadyExists) => "already_exists",
                Some(ErrorKind::Invalid) => "invalid",
                Some(ErrorKind::Busy) => "busy",
                Some(ErrorKind::ReadOnly) => "read_only",
                Some(ErrorKind::NoSpace) => "no_space",
                Some(ErrorKind::Io) => "io",
                Some(ErrorKind::Corrupt) => "corrupt",
                Some(ErrorKind::Gone) => "gone",
                Some(ErrorKind::Unavailable) => "store_unavailable",
                Some(ErrorKind::NotLocal) => "not_local",
                Some(ErrorKind::Quota) => "quota",
                Some(ErrorKind::Throttled) => "throttled",
                None => "failed",
            },
        }
    }

    /// A failure the daemon reported, classified by its kind.
    pub fn refused(kind: Option<ErrorKind>, message: String) -> ClientError {
        ClientError::Refused { kind, message }
    }
}

pub struct Client {
    socket: PathBuf,
    dir: String,
}

/// Percent-encodes a path segment (references are validated names, but a user may type anything).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    pub fn new(dir: &Path) -> Client {
        Client { socket: dir.join("control.sock"), dir: dir.display().to_string() }
    }

    pub fn path(parts: &[&str]) -> String {
        let mut p = String::from("/v1");
        for part in parts {
            p.push('/');
            p.push_str(&segment(part));
        }
        p
    }

    /// Sends a request; decodes the JSON answer (`None` for 204 No Content).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Option<T>, ClientError> {
        let transport = |e: &dyn std::fmt::Display| ClientError::Transport(e.to_string());
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|e| match e.kind() {
            // The daemon runs, but this user may not talk to it: saying "no daemon" would send
            // them to start a second one.
            std::io::ErrorKind::PermissionDenied => ClientError::Denied(format!(
                "permission denied on {}: the daemon's sockets are its user's (or its --socket-group's); run as that user or join the group",
                self.socket.display()
            )),
            _ => ClientError::NoDaemon(self.dir.clone()),
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| transport(&e))?;
        tokio::spawn(conn);
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| transport(&e))?,
            None => Vec::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "snapblk")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| transport(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| transport(&e))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| transport(&e))?.to_bytes();
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => ClientError::refused(serde_json::from_value(serde_json::Value::String(e.kind)).ok(), e.error),
                Err(_) => ClientError::refused(None, format!("the daemon answered {status}")),
            });
        }
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        serde_json::from_slice(&body).map(Some).map_err(|e| transport(&e))
    }
}
