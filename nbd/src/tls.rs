//! NBD over TLS (NBD_OPT_STARTTLS): the server's TLS mode, and who the peer is.
//!
//! The server never builds TLS configurations itself: the caller hands in a
//! [`TlsAcceptor`] (certificate, key, client verification) and the crate only decides when
//! to use it. After a successful handshake the verified client certificate, if any, is read
//! for its names (subject CN, DNS and e-mail SANs): they reach the [`ExportCatalog`]
//! (`crate::ExportCatalog`) in a [`Peer`], which maps them to whatever it calls an account.

use std::fmt;

pub use tokio_rustls::rustls;
pub use tokio_rustls::TlsAcceptor;

/// How the server treats TLS (the NBD protocol's server modes).
#[derive(Clone, Default)]
pub enum Tls {
    /// No TLS ("NOTLS"): NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY.
    #[default]
    Off,
    /// TLS when the client asks for it, plaintext otherwise ("SELECTIVETLS" with no TLS-only
    /// export).
    On(TlsAcceptor),
    /// TLS or nothing ("FORCEDTLS"): before NBD_OPT_STARTTLS every option but ABORT gets
    /// NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME (which cannot fail) closes the connection.
    Require(TlsAcceptor),
}

impl Tls {
    /// The acceptor, unless TLS is off.
    pub fn acceptor(&self) -> Option<&TlsAcceptor> {
        match self {
            Tls::Off => None,
            Tls::On(a) | Tls::Require(a) => Some(a),
        }
    }

    /// Whether a client must start TLS before anything else.
    pub fn required(&self) -> bool {
        matches!(self, Tls::Require(_))
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tls::Off => "Off",
            Tls::On(_) => "On",
            Tls::Require(_) => "Require",
        })
    }
}

/// Who is at the other end of a connection, as far as the transport knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The connection runs over TLS (NBD_OPT_STARTTLS succeeded).
    pub tls: bool,
    /// The verified client certificate's names: its subject common name (CN), then its DNS
    /// and e-mail subject alternative names, in certificate order. Empty without a client
    /// certificate (the server's acceptor only accepts certificates it verified).
    pub client_names: Vec<String>,
}

impl Peer {
    /// A peer over TLS, with the names of its certificate (`der`: the end-entity certificate
    /// it presented, if any). A certificate whose names cannot be read gives no names.
    pub fn over_tls(der: Option<&[u8]>) -> Peer {
        Peer { tls: true, client_names: der.map(certificate_names).unwrap_or_default() }
    }
}

/// Names in an X.509 certificate (DER): the subject's common names, then the DNS names and
/// e-mail addresses of its subjectAltName extension. Anything malformed ends the walk
/// (keeping what was found so far); never panics.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let _ = walk_certificate(der, &mut names);
    names
}

/// DER tags used below.
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const T61_STRING: u8 = 0x14;
const IA5_STRING: u8 = 0x16;
const BMP_STRING: u8 = 0x1e;
/// `[0] EXPLICIT` version, `[3] EXPLICIT` extensions (constructed, context-specific).
const VERSION_TAG: u8 = 0xa0;
const EXTENSIONS_TAG: u8 = 0xa3;
/// GeneralName `[1] rfc822Name` and `[2] dNSName` (primitive, context-specific, IMPLICIT).
const RFC822_NAME: u8 = 0x81;
const DNS_NAME: u8 = 0x82;
/// 2.5.4.3 (id-at-commonName) and 2.5.29.17 (id-ce-subjectAltName), encoded.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// One DER element at a time from a byte slice.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Der<'a> {
        Der { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The tag of the next element, without taking it.
    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// The next element: its tag and contents. Only single-byte tags and definite lengths of
    /// up to four bytes (DER needs nothing else in a certificate).
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, after) = self.rest.split_first()?;
        if tag & 0x1f == 0x1f {
            return None;
        }
        let (&first, mut after) = after.split_first()?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || after.len() < n {
                return None;
            }
            let len = after[..n].iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
            after = &after[n..];
            len
        };
        if after.len() < len {
            return None;
        }
        let (contents, rest) = after.split_at(len);
        self.rest = rest;
        Some((tag, contents))
    }

    /// The next element's contents if it has tag `tag`.
    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.next()? {
            (t, contents) if t == tag => Some(contents),
            _ => None,
        }
    }
}

fn walk_certificate(der: &[u8], names: &mut Vec<String>) -> Option<()> {
    let certificate = Der::new(der).expect(SEQUENCE)?;
    let mut tbs = Der::new(Der::new(certificate).expect(SEQUENCE)?);
    if tbs.peek() == Some(VERSION_TAG) {
        tbs.next()?;
    }
    tbs.next()?; // serialNumber
    tbs.expect(SEQUENCE)?; // signature algorithm
    tbs.expect(SEQUENCE)?; // issuer
    tbs.expect(SEQUENCE)?; // validity
    let subject = tbs.expect(SEQUENCE)?;
    tbs.expect(SEQUENCE)?; // subjectPublicKeyInfo
    common_names(subject, names);
    while !tbs.is_empty() {
        let (tag, contents) = tbs.next()?;
        if tag == EXTENSIONS_TAG {
            return alt_names(contents, names);
        }
    }
    Some(())
}

/// Every CN attribute of a Name (SEQUENCE OF SET OF AttributeTypeAndValue).
fn common_names(name: &[u8], names: &mut Vec<String>) -> Option<()> {
    let mut rdns = Der::new(name);
    while !rdns.is_empty() {
        let mut attributes = Der::new(rdns.expect(SET)?);
        while !attributes.is_empty() {
            let mut attribute = Der::new(attributes.expect(SEQUENCE)?);
            if attribute.expect(OID)? == OID_COMMON_NAME {
                let (tag, value) = attribute.next()?;
                if let Some(s) = directory_string(tag, value) {
                    names.push(s);
                }
            }
        }
    }
    Some(())
}

/// A DirectoryString's text (BMPString is UTF-16; T61String is taken when it is ASCII).
fn directory_string(tag: u8, value: &[u8]) -> Option<String> {
    match tag {
        UTF8_STRING | PRINTABLE_STRING | IA5_STRING => std::str::from_utf8(value).ok().map(str::to_string),
        T61_STRING if value.is_ascii() => std::str::from_utf8(value).ok().map(str::to_string),
        BMP_STRING if value.len().is_multiple_of(2) => {
            let units = value.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units).collect::<Result<String, _>>().ok()
        }
        _ => None,
    }
}

/// The DNS names and e-mail addresses of the subjectAltName extension, if there is one.
fn alt_names(explicit: &[u8], names: &mut Vec<String>) -> Option<()> {
    let mut extensions = Der::new(Der::new(explicit).expect(SEQUENCE)?);
    while !extensions.is_empty() {
        let mut extension = Der::new(extensions.expect(SEQUENCE)?);
        let id = extension.expect(OID)?;
        if extension.peek() == Some(BOOLEAN) {
            extension.next()?; // critical
        }
        let value = extension.expect(OCTET_STRING)?;
        if id != OID_SUBJECT_ALT_NAME {
            continue;
        }
        let mut general_names = Der::new(Der::new(value).expect(SEQUENCE)?);
        while !general_names.is_empty() {
            let (tag, contents) = general_names.next()?;
            if tag == DNS_NAME || tag == RFC822_NAME {
                if let Ok(s) = std::str::from_utf8(contents) {
                    names.push(s.to_string());
                }
            }
        }
    }
    Some(())
}
