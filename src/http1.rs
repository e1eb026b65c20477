//! One HTTP/1 request on a fresh connection, plain or over TLS: the CLI's client of the
//! daemon's API (`control::client`) and the store's own S3 requests that the object store
//! client has no call for (`store::s3`: restore from an archive class, its state).

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Sends `req` on `stream` (a new connection) and returns the answer's head; its body is read
/// by the caller.
pub async fn send<S>(stream: S, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    sender.send_request(req).await
}

/// The system's trusted roots (those that fail to load are left out).
pub fn native_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    roots
}

/// A TLS client that trusts `roots` (no client certificate).
pub fn tls_connector(roots: rustls::RootCertStore) -> Result<tokio_rustls::TlsConnector, rustls::Error> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
