//! The S3 requests the object store client has no call for: restoring an object of an
//! archive class (`POST /KEY?restore`, RestoreObject) and reading its thaw state (`HEAD`:
//! `x-amz-storage-class`, `x-amz-restore`). Signed with AWS Signature Version 4 by the
//! `aws-sigv4` crate (as the facade in `ebs::auth` verifies), sent with hyper on a fresh
//! connection (`crate::http1`), with the region's endpoint, bucket, prefix and credentials —
//! the same settings its object store client is built from (path-style, like it).
//!
//! Answers are read by small pure functions, tested on the shapes AWS documents.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use serde::{Deserialize, Serialize};

/// An object's thaw state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Thaw {
    /// Readable as it is: a class that needs no thaw (standard, `GLACIER_IR`), or a store
    /// without classes (the fs kind, Garage).
    NotNeeded,
    /// In an archive class and not restored: a GET fails until a restore is requested and done.
    Frozen,
    /// A restore was requested and is running.
    InProgress,
    /// Restored: readable until `expires` (seconds since the epoch, when the store says).
    Readable { expires: Option<u64> },
}

impl Thaw {
    /// Whether a GET of the object succeeds now.
    pub fn readable(self) -> bool {
        matches!(self, Thaw::NotNeeded | Thaw::Readable { .. })
    }
}

/// How fast (and dear) a restore is: S3's `GlacierJobParameters/Tier`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ThawTier {
    #[default]
    Standard,
    Bulk,
    Expedited,
}

impl ThawTier {
    pub fn name(self) -> &'static str {
        match self {
            ThawTier::Standard => "Standard",
            ThawTier::Bulk => "Bulk",
            ThawTier::Expedited => "Expedited",
        }
    }
}

/// Classes whose objects must be restored before a GET (AWS S3 Glacier Flexible Retrieval and
/// Deep Archive; Alibaba OSS Archive, Cold Archive, Deep Cold Archive).
const THAW_CLASSES: &[&str] = &["GLACIER", "DEEP_ARCHIVE", "Archive", "ColdArchive", "DeepColdArchive"];

/// The thaw state a HEAD's headers describe: `x-amz-storage-class` (absent for STANDARD),
/// `x-amz-restore` (`ongoing-request="true"`, or `ongoing-request="false",
/// expiry-date="Fri, 21 Dec 2012 00:00:00 GMT"`), and `x-amz-archive-status` (an
/// INTELLIGENT_TIERING object in one of its archive tiers).
pub fn thaw_of_head(storage_class: Option<&str>, restore: Option<&str>, archive_status: Option<&str>) -> Thaw {
    if let Some(r) = restore {
        let ongoing = restore_field(r, "ongoing-request");
        return match ongoing.as_deref() {
            Some("true") => Thaw::InProgress,
            _ => Thaw::Readable { expires: restore_field(r, "expiry-date").and_then(|d| http_date(&d)) },
        };
    }
    let frozen_class = storage_class.is_some_and(|c| THAW_CLASSES.contains(&c.trim()));
    let archived_tier = archive_status.is_some_and(|s| s.contains("ARCHIVE_ACCESS"));
    if frozen_class || archived_tier {
        Thaw::Frozen
    } else {
        Thaw::NotNeeded
    }
}

/// `name="value"` of an `x-amz-restore` header.
fn restore_field(header: &str, name: &str) -> Option<String> {
    let at = header.find(&format!("{name}="))? + name.len() + 1;
    let rest = header[at..].trim_start();
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split_once('"').map(|(v, _)| v.to_string()),
        None => Some(rest.split(',').next().unwrap_or("").trim().to_string()),
    }
}

/// An HTTP date (`Fri, 21 Dec 2012 00:00:00 GMT`) as seconds since the epoch.
pub fn http_date(s: &str) -> Option<u64> {
    static PARSER: jiff::fmt::rfc2822::DateTimeParser = jiff::fmt::rfc2822::DateTimeParser::new();
    PARSER.parse_timestamp(s.trim()).ok().and_then(|t| u64::try_from(t.as_second()).ok())
}

/// The body of a RestoreObject request.
pub fn restore_request_body(days: u32, tier: ThawTier) -> String {
    format!(
        "<RestoreRequest xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Days>{days}</Days><GlacierJobParameters><Tier>{}</Tier></GlacierJobParameters></RestoreRequest>",
        tier.name()
    )
}

/// The text of element `name` in an S3 XML answer (`<Code>`, `<StorageClass>`, ...).
pub fn xml_field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&format!("</{name}>"))?;
    Some(body[start..start + len].trim())
}

/// What a RestoreObject request's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreAnswer {
    /// 202: the restore starts.
    Started,
    /// 409 RestoreAlreadyInProgress.
    InProgress,
    /// 200: already restored (its expiry is set again from the request's days).
    Restored,
    /// 403 InvalidObjectState on a restore: the object's class needs none.
    NotNeeded,
    /// The store has no restore: 501 NotImplemented (Garage), or another answer saying so.
    NoThaw(String),
    /// Worth trying again later (5xx, throttling).
    Transient(String),
    /// Refused: access denied, a bad request, an Expedited restore without capacity.
    Refused(String),
}

pub fn restore_answer(status: u16, body: &str) -> RestoreAnswer {
    let code = xml_field(body, "Code").unwrap_or("");
    let message = xml_field(body, "Message").unwrap_or("");
    let said = || {
        let what = [code, message].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(": ");
        if what.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status} {what}")
        }
    };
    match (status, code) {
        (202, _) => RestoreAnswer::Started,
        (200, _) => RestoreAnswer::Restored,
        (409, "RestoreAlreadyInProgress") => RestoreAnswer::InProgress,
        (403, "InvalidObjectState") => RestoreAnswer::NotNeeded,
        (501, _) | (_, "NotImplemented") => RestoreAnswer::NoThaw(said()),
        (503, "GlacierExpeditedRetrievalNotAvailable") => RestoreAnswer::Refused(format!(
            "{}: no capacity for Expedited restores now; use --tier Standard (or Bulk)",
            said()
        )),
        (429 | 500..=599, _) | (_, "SlowDown" | "InternalError" | "ServiceUnavailable") => {
            RestoreAnswer::Transient(said())
        }
        _ => RestoreAnswer::Refused(said()),
    }
}

/// A GET refused because the object is in an archive class and not restored (403
/// InvalidObjectState): its class when the answer names it, else `""`.
pub fn frozen_read(message: &str) -> Option<String> {
    message.contains("InvalidObjectState").then(|| xml_field(message, "StorageClass").unwrap_or("").to_string())
}

/// Encodes an object key for a URL path (every byte but unreserved ones and `/`).
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One answer: status, headers, body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Where and as whom a region's raw S3 requests go.
pub struct S3Requests {
    https: bool,
    /// `host[:port]`, as the Host header.
    authority: String,
    host: String,
    port: u16,
    /// The bucket's path: `/BUCKET` (behind the endpoint's own path, if any).
    bucket_path: String,
    /// The region's prefix (`prod/`, `accounts/A/`), before every key.
    prefix: String,
    region: String,
    access_key_id: String,
    secret_access_key: String,
    tls: OnceLock<Result<tokio_rustls::TlsConnector, String>>,
}

impl std::fmt::Debug for S3Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Requests").field("authority", &self.authority).finish_non_exhaustive()
    }
}

impl S3Requests {
    /// As `object_store`'s builder does: `ENDPOINT/BUCKET`, or (no endpoint) AWS's
    /// `https://s3.REGION.amazonaws.com/BUCKET`.
    pub fn new(
        endpoint: Option<&str>,
        bucket: &str,
        prefix: &str,
        region: &str,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Result<S3Requests, String> {
        let base = match endpoint {
            Some(e) => format!("{}/{bucket}", e.trim_end_matches('/')),
            None => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let uri: hyper::Uri = base.parse().map_err(|e| format!("endpoint '{base}': {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("endpoint '{base}' must start with http:// or https://")),
        };
        let authority = uri.authority().ok_or_else(|| format!("endpoint '{base}' has no host"))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let prefix = match prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        Ok(S3Requests {
            https,
            authority: authority.as_str().to_string(),
            host,
            port,
            bucket_path: uri.path().trim_end_matches('/').to_string(),
            prefix,
            region: region.to_string(),
            access_key_id: access_key_id.to_string(),
            secret_access_key: secret_access_key.to_string(),
            tls: OnceLock::new(),
        })
    }

    /// The path of `key` (under the region's prefix).
    fn path(&self, key: &str) -> String {
        format!("{}/{}", self.bucket_path, encode_key(&format!("{}{key}", self.prefix)))
    }

    /// The headers that sign a request (`authorization`, `x-amz-date`, `x-amz-content-sha256`).
    fn signature(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        time: SystemTime,
    ) -> Result<Vec<(String, String)>, String> {
        let mut settings = SigningSettings::default();
        // S3 signs the path as sent, encoded once and not normalized.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let creds = aws_credential_types::Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            None,
            None,
            "snapblk-region",
        );
        let identity = creds.into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| format!("cannot sign: {e}"))?
            .into();
        let signable = SignableRequest::new(method, url, headers.iter().copied(), SignableBody::Bytes(body))
            .map_err(|e| format!("cannot sign: {e}"))?;
        let (instructions, _) = sign(signable, &params).map_err(|e| format!("cannot sign: {e}"))?.into_parts();
        Ok(instructions.into_parts().0.into_iter().map(|h| (h.name().to_string(), h.value().to_string())).collect())
    }

    /// Sends one signed request about `key` (`query`: `""` or `?restore`); an error is a
    /// transport failure (worth retrying).
    pub async fn send(&self, method: Method, key: &str, query: &str, body: Bytes) -> Result<Answer, String> {
        let path_and_query = format!("{}{query}", self.path(key));
        let url = format!("{}://{}{path_and_query}", if self.https { "https" } else { "http" }, self.authority);
        let signed = self.signature(method.as_str(), &url, &[("host", &self.authority)], &body, SystemTime::now())?;
        let mut req = Request::builder().method(method).uri(&path_and_query).header("host", &self.authority);
        for (name, value) in &signed {
            req = req.header(name.as_str(), value.as_str());
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.authority))?;
        let resp = if self.https {
            let tls = self
                .tls
                .get_or_init(|| crate::http1::tls_connector(crate::http1::native_roots()).map_err(|e| e.to_string()))
                .clone()?;
            let name = rustls_pki_types::ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
            let stream = tls.connect(name, tcp).await.map_err(|e| format!("TLS with {}: {e}", self.authority))?;
            crate::http1::send(stream, req).await
        } else {
            crate::http1::send(tcp, req).await
        }
        .map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer { status: parts.status, headers: parts.headers, body })
    }
}

/// The time now, in seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_answers_as_aws_documents_them() {
        // A STANDARD object: no class header at all.
        assert_eq!(thaw_of_head(None, None, None), Thaw::NotNeeded);
        assert_eq!(thaw_of_head(Some("STANDARD_IA"), None, None), Thaw::NotNeeded);
        assert_eq!(thaw_of_head(Some("GLACIER_IR"), None, None), Thaw::NotNeeded);
        // Archived, never restored.
        assert_eq!(thaw_of_head(Some("DEEP_ARCHIVE"), None, None), Thaw::Frozen);
        assert_eq!(thaw_of_head(Some("GLACIER"), None, None), Thaw::Frozen);
        assert_eq!(thaw_of_head(Some("ColdArchive"), None, None), Thaw::Frozen);
        // Restoring.
        assert_eq!(thaw_of_head(Some("GLACIER"), Some("ongoing-request=\"true\""), None), Thaw::InProgress);
        // Restored, the example of the HeadObject documentation.
        let done = "ongoing-request=\"false\", expiry-date=\"Fri, 21 Dec 2012 00:00:00 GMT\"";
        assert_eq!(thaw_of_head(Some("DEEP_ARCHIVE"), Some(done), None), Thaw::Readable { expires: Some(1356048000) });
        // INTELLIGENT_TIERING in its archive tiers.
        assert_eq!(thaw_of_head(Some("INTELLIGENT_TIERING"), None, Some("DEEP_ARCHIVE_ACCESS")), Thaw::Frozen);
        assert_eq!(thaw_of_head(Some("INTELLIGENT_TIERING"), None, None), Thaw::NotNeeded);
        // A restore header with a date that does not parse is still readable.
        assert_eq!(
            thaw_of_head(Some("GLACIER"), Some("ongoing-request=\"false\", expiry-date=\"soon\""), None),
            Thaw::Readable { expires: None }
        );
    }

    #[test]
    fn restore_answers_as_aws_documents_them() {
        assert_eq!(restore_answer(202, ""), RestoreAnswer::Started);
        assert_eq!(restore_answer(200, ""), RestoreAnswer::Restored);
        let in_progress = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>RestoreAlreadyInProgress</Code><Message>Object restore is already in progress</Message><RequestId>4442587FB7D0A2F9</RequestId><HostId>abc=</HostId></Error>";
        assert_eq!(restore_answer(409, in_progress), RestoreAnswer::InProgress);
        let standard = "<Error><Code>InvalidObjectState</Code><Message>Restore is not allowed for the object's current storage class</Message></Error>";
        assert_eq!(restore_answer(403, standard), RestoreAnswer::NotNeeded);
        let garage = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NotImplemented</Code><Message>Not implemented: RestoreObject</Message><Resource>/b/k</Resource><Region>garage</Region></Error>";
        assert!(matches!(restore_answer(501, garage), RestoreAnswer::NoThaw(m) if m.contains("NotImplemented")));
        let expedited = "<Error><Code>GlacierExpeditedRetrievalNotAvailable</Code><Message>Glacier expedited retrievals are currently not available, please try again later</Message></Error>";
        assert!(matches!(restore_answer(503, expedited), RestoreAnswer::Refused(m) if m.contains("--tier Standard")));
        assert!(matches!(restore_answer(503, "<Error><Code>SlowDown</Code></Error>"), RestoreAnswer::Transient(_)));
        let denied = "<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";
        assert!(
            matches!(restore_answer(403, denied), RestoreAnswer::Refused(m) if m == "HTTP 403 AccessDenied: Access Denied")
        );
        assert!(matches!(restore_answer(400, ""), RestoreAnswer::Refused(m) if m == "HTTP 400"));
    }

    #[test]
    fn a_frozen_get_is_recognized_with_its_class() {
        let body = "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InvalidObjectState</Code><Message>The operation is not valid for the object's storage class</Message><StorageClass>DEEP_ARCHIVE</StorageClass><RequestId>9FEFFF118E15B86F</RequestId></Error>";
        assert_eq!(frozen_read(body).as_deref(), Some("DEEP_ARCHIVE"));
        assert_eq!(frozen_read("403 Forbidden: <Error><Code>InvalidObjectState</Code></Error>").as_deref(), Some(""));
        assert_eq!(frozen_read("403 Forbidden: <Error><Code>AccessDenied</Code></Error>"), None);
    }

    #[test]
    fn the_restore_request_body() {
        assert_eq!(
            restore_request_body(3, ThawTier::Bulk),
            "<RestoreRequest xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Days>3</Days><GlacierJobParameters><Tier>Bulk</Tier></GlacierJobParameters></RestoreRequest>"
        );
    }

    #[test]
    fn urls_follow_the_object_store_client() {
        let s =
            S3Requests::new(Some("http://127.0.0.1:3900/"), "snapblk", "prod/accounts/a", "garage", "k", "s").unwrap();
        assert_eq!((s.https, s.authority.as_str(), s.port), (false, "127.0.0.1:3900", 3900));
        assert_eq!(s.path("packs/00ff"), "/snapblk/prod/accounts/a/packs/00ff");
        let aws = S3Requests::new(None, "b", "", "eu-west-1", "k", "s").unwrap();
        assert_eq!((aws.https, aws.authority.as_str(), aws.port), (true, "s3.eu-west-1.amazonaws.com", 443));
        assert_eq!(aws.path("a b+c"), "/b/a%20b%2Bc");
        assert!(S3Requests::new(Some("ftp://x"), "b", "", "r", "k", "s").is_err());
    }

    #[test]
    fn signing_matches_the_aws_documentation_example() {
        // "Example: GET Object" of the S3 Signature Version 4 documentation (header-based
        // authentication): virtual-hosted examplebucket, GET /test.txt with Range: bytes=0-9.
        let s = S3Requests::new(
            Some("https://examplebucket.s3.amazonaws.com"),
            "",
            "",
            "us-east-1",
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        )
        .unwrap();
        let time = UNIX_EPOCH + std::time::Duration::from_secs(1369353600); // 20130524T000000Z
        let headers = [("host", "examplebucket.s3.amazonaws.com"), ("range", "bytes=0-9")];
        let signed =
            s.signature("GET", "https://examplebucket.s3.amazonaws.com/test.txt", &headers, b"", time).unwrap();
        let auth = signed.iter().find(|(n, _)| n == "authorization").map(|(_, v)| v.as_str()).unwrap();
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }
}
