//! The CLI's side of the control API: HTTP/1 over the daemon's unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
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
                Some(ErrorKind::Forbidden | ErrorKind::Unauthenticated) => 7,
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
                Some(ErrorKind::Forbidden) => "forbidden",
                Some(ErrorKind::Unauthenticated) => "unauthenticated",
                None => "failed",
            },
        }
    }

    /// A failure the daemon reported, classified by its kind.
    pub fn refused(kind: Option<ErrorKind>, message: String) -> ClientError {
        ClientError::Refused { kind, message }
    }
}

/// Where the daemon's API is: its control socket, or its HTTPS listener with a token.
enum Endpoint {
    Socket { socket: PathBuf, dir: String },
    Https { host: String, port: u16, token: String, tls: tokio_rustls::TlsConnector },
}

pub struct Client {
    endpoint: Endpoint,
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
    /// The daemon of `dir`, through its control socket.
    pub fn new(dir: &Path) -> Client {
        Client { endpoint: Endpoint::Socket { socket: dir.join("control.sock"), dir: dir.display().to_string() } }
    }

    /// A daemon's HTTPS API (`https://HOST:PORT`), as the account of the token in
    /// `token_file`; the server's certificate is checked against `ca` (PEM), or against the
    /// system's roots when none is given.
    pub fn https(url: &str, token_file: &Path, ca: Option<&Path>) -> Result<Client, ClientError> {
        use rustls_pki_types::pem::PemObject;
        let usage = |m: String| ClientError::Usage(m);
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            usage(format!("--api takes https://HOST:PORT (got '{url}'): the API is served over TLS only"))
        })?;
        let authority = rest.trim_end_matches('/');
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => {
                (h, p.parse::<u16>().map_err(|_| usage(format!("bad port in --api '{url}'")))?)
            }
            _ => (authority, 443),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let token = std::fs::read_to_string(token_file)
            .map_err(|e| usage(format!("cannot read the token file {}: {e}", token_file.display())))?
            .trim()
            .to_string();
        if token.is_empty() {
            return Err(usage(format!("the token file {} is empty", token_file.display())));
        }
        let roots = match ca {
            Some(ca) => {
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| usage(format!("cannot read CA certificates from {}: {e}", ca.display())))?;
                let mut roots = rustls::RootCertStore::empty();
                for c in certs {
                    roots.add(c).map_err(|e| usage(format!("a certificate in {} is not usable: {e}", ca.display())))?;
                }
                roots
            }
            None => crate::http1::native_roots(),
        };
        let tls = crate::http1::tls_connector(roots).map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(Client { endpoint: Endpoint::Https { host, port, token, tls } })
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
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| transport(&e))?,
            None => Vec::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| transport(&e))?;
        let resp = match &self.endpoint {
            Endpoint::Socket { socket, dir } => {
                let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| match e.kind() {
                    // The daemon runs, but this user may not talk to it: saying "no daemon" would
                    // send them to start a second one.
                    std::io::ErrorKind::PermissionDenied => ClientError::Denied(format!(
                        "permission denied on {}: the daemon's sockets are its user's (or its --socket-group's); run as that user or join the group",
                        socket.display()
                    )),
                    _ => ClientError::NoDaemon(dir.clone()),
                })?;
                req.headers_mut().insert("host", hyper::header::HeaderValue::from_static("snapblk"));
                send(stream, req).await?
            }
            Endpoint::Https { host, port, token, tls } => {
                let unreachable = |e: &dyn std::fmt::Display| {
                    ClientError::Transport(format!("cannot reach the snapblk API at https://{host}:{port}: {e}"))
                };
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await.map_err(|e| unreachable(&e))?;
                let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| unreachable(&e))?;
                let stream = tls.connect(name, tcp).await.map_err(|e| unreachable(&e))?;
                let headers = req.headers_mut();
                headers.insert("host", hyper::header::HeaderValue::from_str(host).map_err(|e| transport(&e))?);
                let bearer = format!("Bearer {token}");
                headers
                    .insert("authorization", hyper::header::HeaderValue::from_str(&bearer).map_err(|e| transport(&e))?);
                send(stream, req).await?
            }
        };
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

/// One HTTP/1 request on a fresh connection.
async fn send<S>(stream: S, req: Request<Full<Bytes>>) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    crate::http1::send(stream, req).await.map_err(|e| ClientError::Transport(e.to_string()))
}
