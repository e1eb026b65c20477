//! NBD_OPT_STARTTLS: the three server modes, the upgrade with a real rustls client, and the
//! peer names the catalog sees. Certificates are made with the `openssl` command (the test
//! skips, saying so, when it is not installed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, server::WebPkiClientVerifier, RootCertStore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{catalog, go_request, test_config, Catalog, MemExport};
use crate::tls::certificate_names;
use crate::wire::*;
use crate::*;

/// A catalog that records the peer of every list/open.
struct Recording {
    inner: Arc<Catalog>,
    peers: Mutex<Vec<Peer>>,
}

impl ExportCatalog for Recording {
    type Export = MemExport;
    fn list(&self, peer: &Peer) -> Vec<(String, String)> {
        self.peers.lock().unwrap().push(peer.clone());
        self.inner.list(peer)
    }
    fn open(&self, peer: &Peer, name: &str) -> Result<MemExport, String> {
        self.peers.lock().unwrap().push(peer.clone());
        self.inner.open(peer, name)
    }
}

/// A CA, a server certificate for localhost, a client certificate of "alice" signed by the
/// CA, and one of "mallory" signed by another CA; in a fresh directory.
struct Certs {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Certs {
    fn make() -> Option<Certs> {
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("SKIP: openssl is not installed");
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "snapblk-nbd-tls-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let (key, cert, subject) =
                (format!("{ca}-key.pem"), format!("{ca}-cert.pem"), format!("/CN=snapblk test {ca}"));
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &cert, "-days", "2", "-subj", &subject]);
            openssl(&dir, &args);
        }
        let leaf = |name: &str, ca: &str, subject: &str, ext: &str| {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            let (key, csr, cert) = (format!("{name}-key.pem"), format!("{name}.csr"), format!("{name}-cert.pem"));
            let mut args = vec!["req", "-new"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
            openssl(&dir, &args);
            let (ca_cert, ca_key, ext_file) =
                (format!("{ca}-cert.pem"), format!("{ca}-key.pem"), format!("{name}.ext"));
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &ca_cert,
                    "-CAkey",
                    &ca_key,
                    "-CAcreateserial",
                    "-out",
                    &cert,
                    "-days",
                    "2",
                    "-extfile",
                    &ext_file,
                ],
            );
        };
        leaf(
            "server",
            "ca",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        leaf(
            "alice",
            "ca",
            "/O=snapblk tests/CN=alice",
            "subjectAltName=DNS:alice.example,email:alice@example.com\nextendedKeyUsage=clientAuth\n",
        );
        leaf("mallory", "other-ca", "/CN=mallory", "extendedKeyUsage=clientAuth\n");
        Some(Certs { dir })
    }

    fn certs(&self, name: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(self.dir.join(format!("{name}-cert.pem"))).unwrap().map(|c| c.unwrap()).collect()
    }

    fn key(&self, name: &str) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_file(self.dir.join(format!("{name}-key.pem"))).unwrap()
    }

    fn roots(&self, ca: &str) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for c in self.certs(ca) {
            roots.add(c).unwrap();
        }
        Arc::new(roots)
    }

    /// The server side: client certificates optional, but verified against the CA.
    fn acceptor(&self) -> TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots("ca"), provider.clone())
            .clear_root_hint_subjects()
            .allow_unauthenticated()
            .build()
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs("server"), self.key("server"))
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }

    /// A client trusting the CA, presenting `client`'s certificate if given.
    fn connector(&self, client: Option<&str>) -> TlsConnector {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots("ca"));
        let config = match client {
            Some(name) => builder.with_client_auth_cert(self.certs(name), self.key(name)).unwrap(),
            None => builder.with_no_client_auth(),
        };
        TlsConnector::from(Arc::new(config))
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, opt: u32, data: &[u8]) {
    s.write_u64(IHAVEOPT).await.unwrap();
    s.write_u32(opt).await.unwrap();
    s.write_u32(data.len() as u32).await.unwrap();
    s.write_all(data).await.unwrap();
    s.flush().await.unwrap();
}

/// Option replies up to and including ACK or the first error: (type, data) each.
async fn replies<S: AsyncRead + Unpin>(s: &mut S, opt: u32) -> Vec<(u32, Vec<u8>)> {
    let mut out = vec![];
    loop {
        assert_eq!(s.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
        assert_eq!(s.read_u32().await.unwrap(), opt);
        let kind = s.read_u32().await.unwrap();
        let mut data = vec![0; s.read_u32().await.unwrap() as usize];
        s.read_exact(&mut data).await.unwrap();
        out.push((kind, data));
        if kind == REP_ACK || kind & (1 << 31) != 0 {
            return out;
        }
    }
}

async fn last_reply<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, opt: u32, data: &[u8]) -> u32 {
    send_option(s, opt, data).await;
    replies(s, opt).await.last().unwrap().0
}

/// A server on one end of a pipe; the other end, past the greeting (fixed newstyle, no zeroes).
async fn start(
    tls: Tls,
    cat: Arc<Recording>,
) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<Result<(), NbdError>>) {
    let config = ServerConfig { tls, ..test_config() };
    let (mut a, b) = tokio::io::duplex(4 << 20);
    let server = tokio::spawn(async move { serve_connection(b, cat, &config).await });
    assert_eq!(a.read_u64().await.unwrap(), NBDMAGIC);
    assert_eq!(a.read_u64().await.unwrap(), IHAVEOPT);
    a.read_u16().await.unwrap();
    a.write_u32(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await.unwrap();
    (a, server)
}

fn recording() -> Arc<Recording> {
    Arc::new(Recording { inner: catalog(), peers: Mutex::new(Vec::new()) })
}

#[tokio::test]
async fn without_tls_starttls_is_refused_by_policy_and_plaintext_works() {
    let cat = recording();
    let (mut c, _server) = start(Tls::Off, cat.clone()).await;
    assert_eq!(last_reply(&mut c, OPT_STARTTLS, &[]).await, REP_ERR_POLICY);
    assert_eq!(last_reply(&mut c, OPT_LIST, &[]).await, REP_ACK);
    assert_eq!(last_reply(&mut c, OPT_INFO, &go_request("rw", &[])).await, REP_ACK);
    assert!(cat.peers.lock().unwrap().iter().all(|p| *p == Peer::default()));
}

#[tokio::test]
async fn require_refuses_every_option_before_tls_then_serves_over_it_with_the_client_names() {
    let Some(certs) = Certs::make() else { return };
    let cat = recording();
    let (mut c, server) = start(Tls::Require(certs.acceptor()), cat.clone()).await;
    for (opt, data) in [
        (OPT_LIST, vec![]),
        (OPT_INFO, go_request("rw", &[])),
        (OPT_GO, go_request("rw", &[])),
        (OPT_STRUCTURED_REPLY, vec![]),
        (99, vec![1, 2, 3]),
    ] {
        assert_eq!(last_reply(&mut c, opt, &data).await, REP_ERR_TLS_REQD, "option {opt}");
    }
    assert!(cat.peers.lock().unwrap().is_empty(), "the catalog was asked before TLS");
    assert_eq!(last_reply(&mut c, OPT_STARTTLS, &[1]).await, REP_ERR_INVALID, "STARTTLS with data");
    assert_eq!(last_reply(&mut c, OPT_STARTTLS, &[]).await, REP_ACK);
    let name = ServerName::try_from("localhost").unwrap();
    let mut t = certs.connector(Some("alice")).connect(name, c).await.expect("TLS handshake");
    assert_eq!(last_reply(&mut t, OPT_STARTTLS, &[]).await, REP_ERR_INVALID, "STARTTLS twice");
    let listed = {
        send_option(&mut t, OPT_LIST, &[]).await;
        replies(&mut t, OPT_LIST).await
    };
    assert_eq!(listed.iter().filter(|(k, _)| *k == REP_SERVER).count(), 2);
    // GO, then a write and a read over TLS.
    assert_eq!(last_reply(&mut t, OPT_GO, &go_request("rw", &[])).await, REP_ACK);
    let data = vec![0x5a; 64 << 10];
    let w =
        wire::Request { flags: 0, command: wire::Command::Write, cookie: 1, offset: 4096, length: data.len() as u32 };
    t.write_all(&w.encode()).await.unwrap();
    t.write_all(&data).await.unwrap();
    let r =
        wire::Request { flags: 0, command: wire::Command::Read, cookie: 2, offset: 4096, length: data.len() as u32 };
    t.write_all(&r.encode()).await.unwrap();
    t.flush().await.unwrap();
    for cookie in [1u64, 2] {
        assert_eq!(t.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        assert_eq!((t.read_u32().await.unwrap(), t.read_u64().await.unwrap()), (0, cookie));
    }
    let mut back = vec![0; data.len()];
    t.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
    let d = wire::Request { flags: 0, command: wire::Command::Disc, cookie: 3, offset: 0, length: 0 };
    t.write_all(&d.encode()).await.unwrap();
    t.flush().await.unwrap();
    server.await.unwrap().unwrap();
    let peers = cat.peers.lock().unwrap();
    assert!(!peers.is_empty());
    let want =
        Peer { tls: true, client_names: vec!["alice".into(), "alice.example".into(), "alice@example.com".into()] };
    assert!(peers.iter().all(|p| *p == want), "{peers:?}");
}

#[tokio::test]
async fn require_closes_on_export_name_before_tls() {
    let Some(certs) = Certs::make() else { return };
    let (mut c, server) = start(Tls::Require(certs.acceptor()), recording()).await;
    send_option(&mut c, OPT_EXPORT_NAME, b"rw").await;
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).await.unwrap(), 0, "the server must close, not answer");
    assert!(matches!(server.await.unwrap(), Err(NbdError::TlsRequired)));
}

#[tokio::test]
async fn on_serves_plaintext_and_tls_without_a_client_certificate() {
    let Some(certs) = Certs::make() else { return };
    let cat = recording();
    let (mut c, _server) = start(Tls::On(certs.acceptor()), cat.clone()).await;
    assert_eq!(last_reply(&mut c, OPT_INFO, &go_request("rw", &[])).await, REP_ACK);
    assert_eq!(cat.peers.lock().unwrap().pop(), Some(Peer::default()));
    // Negotiation state does not survive the upgrade; the peer is now TLS, with no names.
    assert_eq!(last_reply(&mut c, OPT_STARTTLS, &[]).await, REP_ACK);
    let name = ServerName::try_from("localhost").unwrap();
    let mut t = certs.connector(None).connect(name, c).await.expect("TLS handshake");
    assert_eq!(last_reply(&mut t, OPT_INFO, &go_request("rw", &[])).await, REP_ACK);
    assert_eq!(cat.peers.lock().unwrap().pop(), Some(Peer { tls: true, client_names: vec![] }));
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_fails_the_handshake() {
    let Some(certs) = Certs::make() else { return };
    let cat = recording();
    let (mut c, server) = start(Tls::Require(certs.acceptor()), cat.clone()).await;
    assert_eq!(last_reply(&mut c, OPT_STARTTLS, &[]).await, REP_ACK);
    let name = ServerName::try_from("localhost").unwrap();
    // (TLS 1.3: the client may only learn of the refusal on its first read.)
    if let Ok(mut t) = certs.connector(Some("mallory")).connect(name, c).await {
        send_option(&mut t, OPT_LIST, &[]).await;
        let mut b = [0u8; 1];
        assert!(!matches!(t.read(&mut b).await, Ok(n) if n > 0), "the server answered a refused client");
    }
    assert!(matches!(server.await.unwrap(), Err(NbdError::TlsHandshake(_))));
    assert!(cat.peers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_tls_handshake_counts_against_the_handshake_timeout() {
    let Some(certs) = Certs::make() else { return };
    let config = ServerConfig {
        tls: Tls::Require(certs.acceptor()),
        handshake_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let (mut a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move { serve_connection(b, recording(), &config).await });
    let mut greeting = [0u8; 18];
    a.read_exact(&mut greeting).await.unwrap();
    a.write_u32(CLIENT_FIXED_NEWSTYLE).await.unwrap();
    assert_eq!(last_reply(&mut a, OPT_STARTTLS, &[]).await, REP_ACK);
    // ... and never starts the TLS handshake.
    let r = tokio::time::timeout(Duration::from_secs(5), server).await.expect("the server gave up");
    assert!(matches!(r.unwrap(), Err(NbdError::HandshakeTimeout(_))));
}

#[tokio::test]
async fn bytes_sent_right_after_starttls_close_the_connection() {
    let Some(certs) = Certs::make() else { return };
    let (mut c, server) = start(Tls::Require(certs.acceptor()), recording()).await;
    // STARTTLS and, in the same write, an option that must not be taken as sent over TLS.
    let mut both = Vec::new();
    for opt in [OPT_STARTTLS, OPT_LIST] {
        both.extend_from_slice(&IHAVEOPT.to_be_bytes());
        both.extend_from_slice(&opt.to_be_bytes());
        both.extend_from_slice(&0u32.to_be_bytes());
    }
    c.write_all(&both).await.unwrap();
    assert!(matches!(server.await.unwrap(), Err(NbdError::DataAfterStartTls)));
}

#[test]
fn certificate_names_are_read_and_garbage_gives_none() {
    let Some(certs) = Certs::make() else { return };
    let alice = certs.certs("alice").remove(0);
    assert_eq!(certificate_names(&alice), ["alice", "alice.example", "alice@example.com"]);
    assert_eq!(certificate_names(&certs.certs("server")[0]), ["localhost", "localhost"]);
    // Every truncation and a few corruptions: no panic, and never a name that is not there.
    let der: &[u8] = alice.as_ref();
    for n in 0..der.len() {
        let names = certificate_names(&der[..n]);
        assert!(names.is_empty(), "{n}: {names:?}");
    }
    for i in 0..der.len() {
        let mut bad = der.to_vec();
        bad[i] ^= 0xff;
        let _ = certificate_names(&bad);
    }
    assert!(certificate_names(&[]).is_empty());
}
