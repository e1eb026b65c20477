//! The CLI's side of the control API: HTTP/1 over the daemon's unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no snapblk daemon is running on {0} (start one with: snapblk serve --dir {0})")]
    NoDaemon(String),
    /// The daemon refused the request; the message is its sentence.
    #[error("{0}")]
    Api(String),
    #[error("talking to the daemon failed: {0}")]
    Transport(String),
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
            std::io::ErrorKind::PermissionDenied => ClientError::Api(format!(
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
            let msg = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("the daemon answered {status}"));
            return Err(ClientError::Api(msg));
        }
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        serde_json::from_slice(&body).map(Some).map_err(|e| transport(&e))
    }
}
