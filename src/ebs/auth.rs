//! AWS Signature Version 4 on the facade's requests: the signature is computed again, with
//! the `aws-sigv4` crate (the signer of the AWS SDKs), over the request's method, path, query,
//! the headers its `SignedHeaders` names and its payload hash, with the secret of the access key
//! its `Credential` names and the time of its `x-amz-date`; then compared with the one sent, in
//! constant time. Nothing is logged of a secret or a signature.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SessionTokenMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use hyper::HeaderMap;

use super::error::EbsError;
use crate::service::Caller;

/// How far a request's `x-amz-date` may be from the daemon's clock (as AWS allows).
pub const MAX_SKEW: u64 = 15 * 60;
const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// An access key: its secret and who it acts as.
pub struct Key {
    pub secret: String,
    pub caller: Caller,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("caller", &self.caller).finish_non_exhaustive()
    }
}

/// The access keys, by id.
#[derive(Default)]
pub struct Keys(pub HashMap<String, Key>);

/// The parts of an `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`.
#[derive(Debug, PartialEq, Eq)]
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Option<Authorization<'_>> {
    let rest = value.strip_prefix("AWS4-HMAC-SHA256")?.trim_start();
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => signature = Some(v),
            _ => return None,
        }
    }
    let mut scope = credential?.split('/');
    let (access_key_id, date, region, service, terminal) =
        (scope.next()?, scope.next()?, scope.next()?, scope.next()?, scope.next()?);
    if terminal != "aws4_request" || scope.next().is_some() {
        return None;
    }
    let signed_headers: Vec<&str> = signed?.split(';').collect();
    Some(Authorization { access_key_id, date, region, service, signed_headers, signature: signature? })
}

/// `YYYYMMDDTHHMMSSZ` as seconds since the epoch.
fn parse_amz_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u64>().ok();
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60
    {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146097 + doe).checked_sub(719468)?;
    Some(days * 86400 + hh * 3600 + mm * 60 + ss)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Keys {
    /// The caller a request is signed for; AccessDeniedException (with a reason that names no
    /// secret) when it is not signed, or not rightly, or too far from `now`.
    pub fn verify(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
        now: u64,
    ) -> Result<&Key, EbsError> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let auth = header("authorization").ok_or_else(|| {
            EbsError::denied(
                "the request is not signed: sign it with AWS Signature Version 4 and an access key of [ebs_api]",
            )
        })?;
        let auth = parse_authorization(auth)
            .ok_or_else(|| EbsError::denied("the Authorization header is not an AWS4-HMAC-SHA256 signature"))?;
        let key = self
            .0
            .get(auth.access_key_id)
            .ok_or_else(|| EbsError::denied(format!("unknown access key '{}'", auth.access_key_id)))?;
        let amz_date = header("x-amz-date").ok_or_else(|| EbsError::denied("the request has no x-amz-date header"))?;
        let when = parse_amz_date(amz_date)
            .ok_or_else(|| EbsError::denied(format!("x-amz-date '{amz_date}' is not a time like 20261207T120000Z")))?;
        if when.abs_diff(now) > MAX_SKEW {
            return Err(EbsError::denied(format!(
                "x-amz-date {amz_date} is more than 15 minutes from the server's time: check the client's clock"
            )));
        }
        if !amz_date.starts_with(auth.date) || auth.date.len() != 8 {
            return Err(EbsError::denied("the signature's credential scope date is not the x-amz-date's"));
        }
        for pair in auth.signed_headers.windows(2) {
            if pair[0] >= pair[1] {
                return Err(EbsError::denied("SignedHeaders must be lower-case names in sorted order"));
            }
        }
        if !auth.signed_headers.contains(&"host") || headers.get("host").is_none() {
            return Err(EbsError::denied("the signature must cover the host header"));
        }
        // The headers the client signed, as sent; the signer adds the date, the payload hash and
        // the session token itself.
        let mut values: Vec<(&str, String)> = Vec::new();
        let mut session_token = None;
        for &name in &auth.signed_headers {
            if name.bytes().any(|c| c.is_ascii_uppercase()) {
                return Err(EbsError::denied("SignedHeaders must be lower-case names in sorted order"));
            }
            let joined = headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().map(str::to_string))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| EbsError::denied(format!("signed header {name} is not text")))?
                .join(",");
            if headers.get(name).is_none() {
                return Err(EbsError::denied(format!("signed header {name} is missing from the request")));
            }
            match name {
                "x-amz-date" | "x-amz-content-sha256" => {}
                "x-amz-security-token" => session_token = Some(joined),
                _ => values.push((name, joined)),
            }
        }
        let content_sha = header("x-amz-content-sha256");
        let body_hash = crate::store::crypto::hex(ring::digest::digest(&ring::digest::SHA256, body).as_ref());
        if content_sha.is_some_and(|h| h != UNSIGNED_PAYLOAD && !h.eq_ignore_ascii_case(&body_hash)) {
            return Err(EbsError::denied("x-amz-content-sha256 is not the SHA-256 of the body"));
        }
        let signature = |payload: SignableBody<'_>| -> Result<String, EbsError> {
            let mut settings = SigningSettings::default();
            settings.percent_encoding_mode = PercentEncodingMode::Double;
            settings.uri_path_normalization_mode = UriPathNormalizationMode::Enabled;
            settings.excluded_headers = Some(Vec::new());
            settings.payload_checksum_kind = if auth.signed_headers.contains(&"x-amz-content-sha256") {
                PayloadChecksumKind::XAmzSha256
            } else {
                PayloadChecksumKind::NoHeader
            };
            settings.session_token_mode =
                if session_token.is_some() { SessionTokenMode::Include } else { SessionTokenMode::Exclude };
            let creds = aws_credential_types::Credentials::new(
                auth.access_key_id,
                key.secret.clone(),
                session_token.clone(),
                None,
                "snapblk-ebs-api",
            );
            let identity = creds.into();
            let params = v4::SigningParams::builder()
                .identity(&identity)
                .region(auth.region)
                .name(auth.service)
                .time(UNIX_EPOCH + Duration::from_secs(when))
                .settings(settings)
                .build()
                .map_err(|_| EbsError::denied("the signature's parameters are incomplete"))?
                .into();
            let cannot = |_| EbsError::denied("the request cannot be signed (a header or the path is not valid)");
            let signable =
                SignableRequest::new(method, path_and_query, values.iter().map(|(n, v)| (*n, v.as_str())), payload)
                    .map_err(cannot)?;
            Ok(sign(signable, &params).map_err(cannot)?.into_parts().1)
        };
        let matches = |expected: String| constant_time_eq(expected.as_bytes(), auth.signature.as_bytes());
        let ok = match content_sha {
            Some(UNSIGNED_PAYLOAD) => matches(signature(SignableBody::UnsignedPayload)?),
            Some(_) => matches(signature(SignableBody::Precomputed(body_hash.clone()))?),
            // Operations whose body the model leaves unsigned (PutSnapshotBlock: its checksum
            // header is signed instead) are signed with UNSIGNED-PAYLOAD without saying so.
            None => {
                matches(signature(SignableBody::Precomputed(body_hash.clone()))?)
                    || matches(signature(SignableBody::UnsignedPayload)?)
            }
        };
        if !ok {
            return Err(EbsError::denied(
                "the signature does not match: check the access key's secret (and that nothing rewrote the request)",
            ));
        }
        Ok(key)
    }
}

/// The time now, for tests of signing.
pub fn system_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Signs like an SDK would (the same crate), so the verification is checked against it.
    fn signed(secret: &str, date: u64, path: &str, body: &[u8], tamper: bool) -> HeaderMap {
        let creds = aws_credential_types::Credentials::new("AKIDTEST", secret, None, None, "test");
        let identity = creds.into();
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("ebs")
            .time(UNIX_EPOCH + Duration::from_secs(date))
            .settings(settings)
            .build()
            .unwrap()
            .into();
        let headers = [("host", "127.0.0.1:9000"), ("content-type", "application/json")];
        let signable = SignableRequest::new(
            "POST",
            format!("http://127.0.0.1:9000{path}"),
            headers.iter().copied(),
            SignableBody::Bytes(body),
        )
        .unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        let mut map = HeaderMap::new();
        for (k, v) in headers.iter().copied().chain(instructions.headers()) {
            map.insert(hyper::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        if tamper {
            map.insert("content-type", "text/plain".parse().unwrap());
        }
        map
    }

    fn keys() -> Keys {
        let mut k = Keys::default();
        k.0.insert("AKIDTEST".into(), Key { secret: "s3cret".into(), caller: Caller::Local });
        k
    }

    #[test]
    fn a_request_signed_with_the_key_verifies_and_any_change_is_denied() {
        let now = 1_796_000_000;
        let body = br#"{"VolumeSize":1}"#;
        let h = signed("s3cret", now, "/snapshots?x=1", body, false);
        assert!(keys().verify("POST", "/snapshots?x=1", &h, body, now + 60).is_ok());
        // Another secret, another body, another path, a changed signed header, a stale date.
        let bad = signed("other", now, "/snapshots?x=1", body, false);
        assert!(keys().verify("POST", "/snapshots?x=1", &bad, body, now).is_err());
        assert!(keys().verify("POST", "/snapshots?x=1", &h, br#"{"VolumeSize":2}"#, now).is_err());
        assert!(keys().verify("POST", "/snapshots?x=2", &h, body, now).is_err());
        let tampered = signed("s3cret", now, "/snapshots?x=1", body, true);
        assert!(keys().verify("POST", "/snapshots?x=1", &tampered, body, now).is_err());
        let e = keys().verify("POST", "/snapshots?x=1", &h, body, now + 16 * 60).unwrap_err();
        assert!(e.message.contains("15 minutes"), "{}", e.message);
        let e = keys().verify("POST", "/snapshots?x=1", &HeaderMap::new(), body, now).unwrap_err();
        assert_eq!(e.code.name(), "AccessDeniedException");
    }

    proptest::proptest! {
        /// Whatever a client sends as Authorization, x-amz-date and body: an answer (almost
        /// always a refusal), never a panic.
        #[test]
        fn any_authorization_header_is_refused_or_accepted_without_panicking(
            auth in "(AWS4-HMAC-SHA256 )?(Credential=[A-Za-z0-9/_]{0,60})?(, ?SignedHeaders=[a-z;-]{0,40})?(, ?Signature=[0-9a-f]{0,70})?",
            date in "[0-9TZ]{0,20}",
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut h = HeaderMap::new();
            if let Ok(v) = auth.parse() {
                h.insert("authorization", v);
            }
            if let Ok(v) = date.parse() {
                h.insert("x-amz-date", v);
            }
            h.insert("host", "127.0.0.1:9000".parse().unwrap());
            let _ = parse_amz_date(&date);
            let _ = keys().verify("GET", "/snapshots/s-1/blocks?maxResults=100", &h, &body, 1_796_000_000);
        }
    }

    #[test]
    fn amz_dates_parse_as_utc() {
        assert_eq!(parse_amz_date("19700101T000100Z"), Some(60));
        assert_eq!(parse_amz_date("20261207T120000Z"), Some(1_796_644_800));
        assert_eq!(parse_amz_date("20000301T000000Z"), Some(951_868_800));
        assert_eq!(parse_amz_date("20261207T120000"), None);
        assert_eq!(parse_amz_date("2026-12-07T12:00:00Z"), None);
    }
}
