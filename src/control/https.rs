//! The control API over HTTPS (`serve --api-listen`): the same routes as the control socket,
//! for callers elsewhere, who prove an account with a bearer token. TLS is not optional here:
//! a token sent in clear is a token given away.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::api::OverHttps;

/// A client gets this long for its TLS handshake; then the connection is closed.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most HTTPS connections at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 256;

/// Serves `app` on `listener` over TLS until the task is dropped. Every request is marked
/// [`OverHttps`], so its caller is authenticated by token.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: axum::Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = app.layer(axum::Extension(OverHttps));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "HTTPS API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "HTTPS API: TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "HTTPS API: TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(TLS_HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "HTTPS API connection ended with an error");
            }
        });
    }
}
