//! TLS for the daemon's listeners: the server certificate and key (`--tls-cert`, `--tls-key`),
//! the CA that signs client certificates (`--tls-ca`), and the NBD TLS mode (`--nbd-tls`).
//! Files are PEM; every failure names the file and says what was wrong with it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use snapblk_nbd::tls::rustls::{self, pki_types, server::WebPkiClientVerifier, RootCertStore};
use snapblk_nbd::tls::TlsAcceptor;
use snapblk_nbd::Tls;

use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer};

/// `--nbd-tls`: whether NBD clients may, or must, start TLS (NBD_OPT_STARTTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NbdTlsMode {
    /// No TLS: clients asking for it are refused (plaintext only).
    Off,
    /// TLS for clients that ask for it; plaintext clients are served too.
    On,
    /// TLS only: a client must start TLS before anything else.
    Require,
}

/// The files of `--tls-cert`, `--tls-key` and `--tls-ca`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsFiles<'a> {
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub ca: Option<&'a Path>,
}

/// The NBD TLS mode asked for (`--nbd-tls`, by default `require` with a certificate and `off`
/// without), checked against the files given; flags that do not fit together are an error.
pub fn nbd_tls_mode(asked: Option<NbdTlsMode>, files: &TlsFiles<'_>) -> anyhow::Result<NbdTlsMode> {
    match (files.cert, files.key) {
        (Some(_), None) => bail!("--tls-cert needs --tls-key FILE too (the certificate's private key, PEM)"),
        (None, Some(_)) => bail!("--tls-key needs --tls-cert FILE too (the server certificate, PEM)"),
        (None, None) if files.ca.is_some() => {
            bail!("--tls-ca needs a server certificate too: add --tls-cert FILE --tls-key FILE (PEM)")
        }
        _ => {}
    }
    let have_cert = files.cert.is_some();
    match asked {
        None if have_cert => Ok(NbdTlsMode::Require),
        None => Ok(NbdTlsMode::Off),
        Some(mode @ (NbdTlsMode::On | NbdTlsMode::Require)) if !have_cert => {
            let name = if mode == NbdTlsMode::On { "on" } else { "require" };
            bail!(
                "--nbd-tls {name} needs a server certificate: add --tls-cert FILE --tls-key FILE (PEM), and \
                 --tls-ca FILE to verify client certificates"
            )
        }
        Some(mode) => Ok(mode),
    }
}

/// The NBD server's TLS setting: the mode with an acceptor built from the files (read and
/// checked here, at startup, whatever the mode).
pub fn nbd_tls(mode: NbdTlsMode, files: &TlsFiles<'_>) -> anyhow::Result<Tls> {
    let acceptor = || -> anyhow::Result<TlsAcceptor> {
        match (files.cert, files.key) {
            (Some(cert), Some(key)) => Ok(TlsAcceptor::from(server_config(cert, key, files.ca)?)),
            _ => Err(anyhow!("NBD TLS needs --tls-cert FILE --tls-key FILE")),
        }
    };
    Ok(match mode {
        // Files given are checked all the same: a bad one fails the start, not a later use.
        NbdTlsMode::Off if files.cert.is_some() => {
            acceptor()?;
            Tls::Off
        }
        NbdTlsMode::Off => Tls::Off,
        NbdTlsMode::On => Tls::On(acceptor()?),
        NbdTlsMode::Require => Tls::Require(acceptor()?),
    })
}

/// A rustls server configuration (ring provider, TLS 1.2 and 1.3): the certificate chain and
/// its key; with a CA, client certificates are asked for and must be signed by it, but a
/// client may present none (what it may then do is the catalog's business).
pub fn server_config(cert: &Path, key: &Path, ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = certificates("--tls-cert", cert)?;
    let private_key = private_key(key)?;
    warn_if_readable_by_others(key);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("the TLS library refused its default protocol versions")?;
    let builder = match ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates("--tls-ca", ca)? {
                roots.add(c).map_err(|e| {
                    anyhow!("--tls-ca {}: a certificate in it is not usable as a CA ({e})", ca.display())
                })?;
            }
            // No CA names in the certificate request: clients (GnuTLS's: QEMU, libnbd) then
            // send the certificate they have even when another CA signed it, and the handshake
            // fails, instead of leaving it out and going on as a client without one.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .clear_root_hint_subjects()
                .allow_unauthenticated()
                .build()
                .map_err(|e| anyhow!("--tls-ca {}: cannot verify client certificates with it ({e})", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, private_key).map_err(|e| {
        anyhow!(
            "--tls-key {} does not fit --tls-cert {} ({e}); give the private key of that certificate",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Arc::new(config))
}

fn read(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow!("{flag} {}: cannot read it ({e})", path.display()))
}

/// Every certificate in a PEM file (at least one).
fn certificates(flag: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{flag} {}: not a valid PEM certificate file ({e})", path.display()))?;
    if certs.is_empty() {
        bail!("{flag} {}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)", path.display());
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
fn private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = read("--tls-key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        anyhow!(
            "--tls-key {}: no usable private key in it ({e}; expected PEM: -----BEGIN PRIVATE KEY-----)",
            path.display()
        )
    })
}

/// The key is a secret: say so if other users can read it (the daemon still starts).
fn warn_if_readable_by_others(key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                key = %key.display(),
                mode = format!("{mode:03o}"),
                "the TLS private key is readable by other users; restrict it (chmod 600)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_defaults_to_require_with_a_certificate_and_off_without() {
        let p = Path::new("/x");
        let none = TlsFiles::default();
        let cert = TlsFiles { cert: Some(p), key: Some(p), ca: None };
        assert_eq!(nbd_tls_mode(None, &none).unwrap(), NbdTlsMode::Off);
        assert_eq!(nbd_tls_mode(None, &cert).unwrap(), NbdTlsMode::Require);
        assert_eq!(nbd_tls_mode(Some(NbdTlsMode::On), &cert).unwrap(), NbdTlsMode::On);
        assert_eq!(nbd_tls_mode(Some(NbdTlsMode::Off), &cert).unwrap(), NbdTlsMode::Off);
        for (mode, name) in [(NbdTlsMode::On, "on"), (NbdTlsMode::Require, "require")] {
            let e = nbd_tls_mode(Some(mode), &none).unwrap_err().to_string();
            assert!(e.contains(&format!("--nbd-tls {name}")) && e.contains("--tls-cert FILE --tls-key FILE"), "{e}");
        }
        let e = nbd_tls_mode(None, &TlsFiles { cert: Some(p), key: None, ca: None }).unwrap_err().to_string();
        assert!(e.contains("--tls-key"), "{e}");
        let e = nbd_tls_mode(None, &TlsFiles { cert: None, key: Some(p), ca: None }).unwrap_err().to_string();
        assert!(e.contains("--tls-cert"), "{e}");
        let e = nbd_tls_mode(None, &TlsFiles { cert: None, key: None, ca: Some(p) }).unwrap_err().to_string();
        assert!(e.contains("--tls-ca needs"), "{e}");
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = server_config(&missing, &missing, None).unwrap_err().to_string();
        assert!(e.contains("--tls-cert") && e.contains("missing.pem") && e.contains("cannot read"), "{e}");
        let e = server_config(&junk, &junk, None).unwrap_err().to_string();
        assert!(e.contains("--tls-cert") && e.contains("junk.pem") && e.contains("no certificate"), "{e}");
        // Checked with NBD TLS off too.
        let files = TlsFiles { cert: Some(&junk), key: Some(&junk), ca: None };
        let e = nbd_tls(NbdTlsMode::Off, &files).unwrap_err().to_string();
        assert!(e.contains("junk.pem"), "{e}");
    }
}
