//! The EBS direct API facade (`serve --ebs-listen`): the six operations of the AWS EBS direct
//! APIs (ListSnapshotBlocks, ListChangedBlocks, GetSnapshotBlock, StartSnapshot,
//! PutSnapshotBlock, CompleteSnapshot) with their REST-JSON wire format, so `coldsnap`, the
//! `aws ebs` CLI and the SDKs read and write snapblk snapshots with an endpoint override.
//!
//! A request is authenticated ([`auth`]: SigV4 against `[ebs_api]`'s access keys, each acting
//! for an account with a role), parsed here ([`wire`]), and handed to the operations layer
//! (`service::direct`), whose errors become AWS error shapes in one place ([`error`]). Snapshot
//! ids are snapblk's: `s-…`, or `VOLUME@SNAPSHOT`.

pub mod auth;
pub mod error;
pub mod wire;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use self::error::{Code, EbsError};
use crate::service::{Caller, Role, Service, StartDirect, BLOCK_SIZE};
use crate::store::config::EbsApiConfig;

/// A client gets this long for its TLS handshake and for a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 256;
/// The largest body a request may have (a block is 512 KiB; StartSnapshot's JSON is small).
const MAX_BODY: usize = 1 << 20;

/// The facade: the operations layer and the access keys.
pub struct EbsApi {
    service: Arc<Service>,
    keys: auth::Keys,
}

impl EbsApi {
    /// Checked when the daemon starts: at least one key, each with a known role and an
    /// existing account.
    pub fn new(service: Arc<Service>, config: &EbsApiConfig) -> Result<EbsApi, String> {
        if config.keys.is_empty() {
            return Err("--ebs-listen needs access keys: add to snapblk.toml [ebs_api] keys = [{ access_key_id = \"...\", secret_file = \"...\", account = \"default\" }] (the secret file mode 0600)".into());
        }
        let mut keys = auth::Keys::default();
        for k in &config.keys {
            let role: Role = k.role.parse().map_err(|e| format!("ebs_api.keys: key {}: {e}", k.access_key_id))?;
            service.account(&Caller::Local, &k.account).map_err(|_| {
                format!(
                    "ebs_api.keys: key {} acts for account '{}', which does not exist (create it: snapblk account create {})",
                    k.access_key_id, k.account, k.account
                )
            })?;
            let caller =
                Caller::Account { account: k.account.clone(), role, token: format!("ebs key {}", k.access_key_id) };
            keys.0.insert(k.access_key_id.clone(), auth::Key { secret: k.secret.clone(), caller });
        }
        Ok(EbsApi { service, keys })
    }
}

/// Serves the facade on `listener` (over TLS with `tls`) until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, api: Arc<EbsApi>) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "EBS API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, api) = (acceptor.clone(), api.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match acceptor {
                None => connection(TokioIo::new(tcp), api, peer.to_string()).await,
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => connection(TokioIo::new(tls), api, peer.to_string()).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "EBS API: TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "EBS API: TLS handshake timed out"),
                },
            }
        });
    }
}

async fn connection<I>(io: I, api: Arc<EbsApi>, peer: String)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer2 = peer.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let (api, peer) = (api.clone(), peer2.clone());
        async move { Ok::<_, Infallible>(api.handle(req, &peer).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(io, service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "EBS API connection ended with an error");
    }
}

type Answer = Result<Response<Full<Bytes>>, EbsError>;

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Answer {
    let body = serde_json::to_vec(body).map_err(|e| EbsError::new(Code::Internal, None, e.to_string()))?;
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| EbsError::new(Code::Internal, None, e.to_string()))
}

fn header<'a>(req: &'a hyper::http::request::Parts, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

fn number(what: &str, value: &str) -> Result<u64, EbsError> {
    value.trim().parse::<u64>().map_err(|_| {
        EbsError::validation("INVALID_PARAMETER_VALUE", format!("{what} '{value}' is not a whole number ≥ 0"))
    })
}

/// `maxResults` (100 to 10,000; default 10,000) and where the page starts (`pageToken`, else
/// `startingBlockIndex`, else 0).
fn paging(query: &HashMap<String, String>) -> Result<(u64, usize), EbsError> {
    let max = match query.get("maxResults") {
        Some(v) => {
            let n = number("MaxResults", v)? as usize;
            if !(wire::MIN_RESULTS..=wire::MAX_RESULTS).contains(&n) {
                return Err(EbsError::validation(
                    "INVALID_PARAMETER_VALUE",
                    "MaxResults must be between 100 and 10000",
                ));
            }
            n
        }
        None => wire::MAX_RESULTS,
    };
    let start = match (query.get("pageToken"), query.get("startingBlockIndex")) {
        (Some(t), _) => wire::parse_page_token(t)?,
        (None, Some(i)) => number("StartingBlockIndex", i)?,
        (None, None) => 0,
    };
    Ok((start, max))
}

impl EbsApi {
    async fn handle(&self, req: Request<hyper::body::Incoming>, peer: &str) -> Response<Full<Bytes>> {
        let request_id = format!("{:032x}", rand::random::<u128>());
        let (parts, body) = req.into_parts();
        let answer = match Limited::new(body, MAX_BODY).collect().await {
            Ok(body) => self.answer(&parts, body.to_bytes(), peer).await,
            Err(_) => Err(EbsError::validation(
                "INVALID_PARAMETER_VALUE",
                format!("the request body is larger than {MAX_BODY} bytes, or was cut short"),
            )),
        };
        match answer {
            Ok(mut r) => {
                if let Ok(v) = request_id.parse() {
                    r.headers_mut().insert("x-amzn-RequestId", v);
                }
                r
            }
            Err(e) => {
                tracing::debug!(%peer, method = %parts.method, path = %parts.uri.path(), error = %e.message, code = e.code.name(), "EBS API request refused");
                e.response(&request_id)
            }
        }
    }

    async fn answer(&self, req: &hyper::http::request::Parts, body: Bytes, peer: &str) -> Answer {
        let path_and_query = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let key = self
            .keys
            .verify(req.method.as_str(), path_and_query, &req.headers, &body, self.service.now())
            .inspect_err(|e| {
                // Who and what, never a secret or a signature.
                tracing::warn!(%peer, method = %req.method, path = %req.uri.path(), reason = %e.message, "EBS API: request denied");
            })?;
        let caller = &key.caller;
        let query: HashMap<String, String> =
            form_urlencoded::parse(req.uri.query().unwrap_or("").as_bytes()).into_owned().collect();
        let segments: Vec<String> = req
            .uri
            .path()
            .split('/')
            .skip(1)
            .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned())
            .collect();
        let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
        match (&req.method, seg.as_slice()) {
            (&Method::POST, ["snapshots"]) => self.start(caller, &body).await,
            (&Method::POST, ["snapshots", "completion", id]) => self.complete(caller, req, id).await,
            (&Method::GET, ["snapshots", id, "blocks"]) => self.list(caller, id, &query).await,
            (&Method::GET, ["snapshots", id, "changedblocks"]) => self.changed(caller, id, &query).await,
            (&Method::GET, ["snapshots", id, "blocks", index]) => self.get(caller, id, index, &query).await,
            (&Method::PUT, ["snapshots", id, "blocks", index]) => self.put(caller, req, id, index, body).await,
            _ => Err(EbsError::new(
                Code::Validation,
                Some("INVALID_PARAMETER_VALUE"),
                format!("no EBS direct API operation is {} {}", req.method, req.uri.path()),
            )),
        }
    }

    /// StartSnapshot.
    async fn start(&self, caller: &Caller, body: &[u8]) -> Answer {
        let r: wire::StartSnapshotRequest = if body.iter().all(u8::is_ascii_whitespace) {
            serde_json::from_str("{}")
        } else {
            serde_json::from_slice(body)
        }
        .map_err(|e| EbsError::validation("INVALID_PARAMETER_VALUE", format!("bad StartSnapshot body: {e}")))?;
        if r.kms_key_arn.is_some() {
            return Err(EbsError::validation(
                "INVALID_CUSTOMER_KEY",
                "KmsKeyArn is not supported: snapblk encrypts every snapshot in the store with its repository's key",
            ));
        }
        let volume_size =
            r.volume_size.ok_or_else(|| EbsError::validation("INVALID_VOLUME_SIZE", "VolumeSize (GiB) is required"))?;
        let timeout = r.timeout.unwrap_or(60);
        let req = StartDirect {
            volume_size: u64::try_from(volume_size)
                .map_err(|_| EbsError::validation("INVALID_VOLUME_SIZE", "VolumeSize must be positive"))?,
            parent: r.parent_snapshot_id.clone(),
            description: r.description.clone().unwrap_or_default(),
            timeout_minutes: u64::try_from(timeout).unwrap_or(0),
            client_token: r.client_token.clone(),
        };
        let v = self.service.start_direct(caller, req).await?;
        json(
            StatusCode::CREATED,
            &wire::StartSnapshotResponse {
                description: v.description,
                snapshot_id: v.id,
                owner_id: v.owner,
                status: v.status.as_str(),
                start_time: v.started,
                volume_size: v.volume_size,
                block_size: BLOCK_SIZE,
                tags: r.tags,
                parent_snapshot_id: v.parent,
                sse_type: "none",
            },
        )
    }

    /// PutSnapshotBlock.
    async fn put(
        &self,
        caller: &Caller,
        req: &hyper::http::request::Parts,
        id: &str,
        index: &str,
        body: Bytes,
    ) -> Answer {
        let index = number("BlockIndex", index)?;
        let length = header(req, "x-amz-Data-Length")
            .ok_or_else(|| EbsError::validation("INVALID_PARAMETER_VALUE", "x-amz-Data-Length is required"))?;
        if number("x-amz-Data-Length", length)? != BLOCK_SIZE || body.len() as u64 != BLOCK_SIZE {
            return Err(EbsError::validation(
                "INVALID_PARAMETER_VALUE",
                format!("a block is 524288 bytes (x-amz-Data-Length {length}, body {} bytes)", body.len()),
            ));
        }
        match header(req, "x-amz-Checksum-Algorithm") {
            Some("SHA256") => {}
            other => {
                return Err(EbsError::validation(
                    "INVALID_PARAMETER_VALUE",
                    format!("x-amz-Checksum-Algorithm must be SHA256 (got {})", other.unwrap_or("none")),
                ))
            }
        }
        let given = header(req, "x-amz-Checksum")
            .ok_or_else(|| EbsError::validation("INVALID_PARAMETER_VALUE", "x-amz-Checksum is required"))?;
        let checksum = wire::parse_checksum("x-amz-Checksum", given)?;
        self.service.write_block(caller, id, index, body, checksum).await?;
        Response::builder()
            .status(StatusCode::CREATED)
            .header("x-amz-Checksum", wire::b64(&checksum))
            .header("x-amz-Checksum-Algorithm", "SHA256")
            .body(Full::new(Bytes::new()))
            .map_err(|e| EbsError::new(Code::Internal, None, e.to_string()))
    }

    /// CompleteSnapshot.
    async fn complete(&self, caller: &Caller, req: &hyper::http::request::Parts, id: &str) -> Answer {
        let count = header(req, "x-amz-ChangedBlocksCount")
            .ok_or_else(|| EbsError::validation("INVALID_PARAMETER_VALUE", "x-amz-ChangedBlocksCount is required"))?;
        let count = number("x-amz-ChangedBlocksCount", count)?;
        let aggregated = match header(req, "x-amz-Checksum") {
            None => None,
            Some(sum) => {
                if header(req, "x-amz-Checksum-Algorithm").is_some_and(|a| a != "SHA256") {
                    return Err(EbsError::validation(
                        "INVALID_PARAMETER_VALUE",
                        "x-amz-Checksum-Algorithm must be SHA256",
                    ));
                }
                if header(req, "x-amz-Checksum-Aggregation-Method").is_some_and(|a| a != "LINEAR") {
                    return Err(EbsError::validation(
                        "INVALID_PARAMETER_VALUE",
                        "x-amz-Checksum-Aggregation-Method must be LINEAR",
                    ));
                }
                Some(wire::parse_checksum("x-amz-Checksum", sum)?)
            }
        };
        let v = self.service.complete_direct(caller, id, count, aggregated).await?;
        json(StatusCode::ACCEPTED, &wire::CompleteSnapshotResponse { status: v.status.as_str() })
    }

    /// ListSnapshotBlocks.
    async fn list(&self, caller: &Caller, id: &str, query: &HashMap<String, String>) -> Answer {
        let (start, max) = paging(query)?;
        let page = self.service.list_blocks(caller, id, start, max).await?;
        let blocks = page
            .blocks
            .iter()
            .map(|&b| wire::Block { block_index: b, block_token: wire::block_token(&page.snapshot, b) })
            .collect();
        json(
            StatusCode::OK,
            &wire::ListSnapshotBlocksResponse {
                blocks,
                expiry_time: self.service.now() + wire::TOKEN_LIFETIME,
                volume_size: page.snapshot.volume_size_gib(),
                block_size: BLOCK_SIZE,
                next_token: page.next.map(wire::page_token),
            },
        )
    }

    /// ListChangedBlocks.
    async fn changed(&self, caller: &Caller, second: &str, query: &HashMap<String, String>) -> Answer {
        let (start, max) = paging(query)?;
        let first = query.get("firstSnapshotId").map(String::as_str);
        let page = self.service.changed_blocks(caller, first, second, start, max).await?;
        let changed_blocks = page
            .blocks
            .iter()
            .map(|b| wire::ChangedBlock {
                block_index: b.index,
                first_block_token: page.first.as_ref().filter(|_| b.in_first).map(|f| wire::block_token(f, b.index)),
                second_block_token: b.in_second.then(|| wire::block_token(&page.second, b.index)),
            })
            .collect();
        json(
            StatusCode::OK,
            &wire::ListChangedBlocksResponse {
                changed_blocks,
                expiry_time: self.service.now() + wire::TOKEN_LIFETIME,
                volume_size: page.second.volume_size_gib(),
                block_size: BLOCK_SIZE,
                next_token: page.next.map(wire::page_token),
            },
        )
    }

    /// GetSnapshotBlock.
    async fn get(&self, caller: &Caller, id: &str, index: &str, query: &HashMap<String, String>) -> Answer {
        let index = number("BlockIndex", index)?;
        let token = query
            .get("blockToken")
            .ok_or_else(|| EbsError::validation("INVALID_BLOCK_TOKEN", "blockToken is required"))?;
        let (snap, data) = self.service.read_block(caller, id, index).await?;
        if *token != wire::block_token(&snap, index) {
            return Err(EbsError::validation(
                "INVALID_BLOCK_TOKEN",
                format!("blockToken is not the token of block {index} of snapshot {id}: list the blocks again"),
            ));
        }
        let sum = ring::digest::digest(&ring::digest::SHA256, &data);
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .header("x-amz-Data-Length", data.len().to_string())
            .header("x-amz-Checksum", wire::b64(sum.as_ref()))
            .header("x-amz-Checksum-Algorithm", "SHA256")
            .body(Full::new(Bytes::from(data)))
            .map_err(|e| EbsError::new(Code::Internal, None, e.to_string()))
    }
}
