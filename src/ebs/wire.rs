//! The EBS direct API's wire format (REST-JSON, API version 2019-11-02): the JSON bodies, the
//! block and page tokens, and the checksums' base64.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::error::EbsError;
use crate::service::BlockSnapshot;

/// How long the block tokens a list answers are said to be valid (they stay valid while the
/// snapshot exists; clients only compare the time).
pub const TOKEN_LIFETIME: u64 = 7 * 24 * 3600;
/// MaxResults' bounds and default.
pub const MIN_RESULTS: usize = 100;
pub const MAX_RESULTS: usize = 10000;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StartSnapshotRequest {
    pub volume_size: Option<i64>,
    pub parent_snapshot_id: Option<String>,
    #[serde(default)]
    pub tags: Vec<Tag>,
    pub description: Option<String>,
    pub client_token: Option<String>,
    pub encrypted: Option<bool>,
    pub kms_key_arn: Option<String>,
    pub timeout: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Tag {
    pub key: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct StartSnapshotResponse {
    pub description: String,
    pub snapshot_id: String,
    pub owner_id: String,
    pub status: &'static str,
    pub start_time: u64,
    pub volume_size: u64,
    pub block_size: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<Tag>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_snapshot_id: Option<String>,
    pub sse_type: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Block {
    pub block_index: u64,
    pub block_token: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListSnapshotBlocksResponse {
    pub blocks: Vec<Block>,
    pub expiry_time: u64,
    pub volume_size: u64,
    pub block_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ChangedBlock {
    pub block_index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_block_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second_block_token: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListChangedBlocksResponse {
    pub changed_blocks: Vec<ChangedBlock>,
    pub expiry_time: u64,
    pub volume_size: u64,
    pub block_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CompleteSnapshotResponse {
    pub status: &'static str,
}

/// The token of block `index` of `snap`: base64 of a SHA-256 over the snapshot's id, creation
/// time and the index, so a token of another block or another snapshot (even one with the same
/// name, taken again) is refused. Not a secret: every request is authorized by its signature.
pub fn block_token(snap: &BlockSnapshot, index: u64) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"snapblk block token 1\0");
    ctx.update(snap.id.as_bytes());
    ctx.update(&snap.created.to_le_bytes());
    ctx.update(&index.to_le_bytes());
    B64.encode(&ctx.finish().as_ref()[..24])
}

/// A page token: where the next page starts (a block index).
pub fn page_token(next: u64) -> String {
    next.to_string()
}

pub fn parse_page_token(t: &str) -> Result<u64, EbsError> {
    t.parse::<u64>()
        .map_err(|_| EbsError::validation("INVALID_PAGE_TOKEN", format!("NextToken '{t}' is not one this API gave")))
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// A base64 SHA-256 (a checksum header).
pub fn parse_checksum(what: &str, value: &str) -> Result<[u8; 32], EbsError> {
    let bytes = B64
        .decode(value.trim())
        .map_err(|_| EbsError::validation("INVALID_PARAMETER_VALUE", format!("{what} '{value}' is not base64")))?;
    bytes.try_into().map_err(|_| {
        EbsError::validation("INVALID_PARAMETER_VALUE", format!("{what} is not a SHA-256 (32 bytes in base64)"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_tokens_bind_the_snapshot_its_creation_and_the_index() {
        let s = BlockSnapshot { id: "s-0000000000000001".into(), size: 1 << 30, created: 5 };
        let t = block_token(&s, 3);
        assert_eq!(t, block_token(&s, 3));
        assert_ne!(t, block_token(&s, 4));
        assert_ne!(t, block_token(&BlockSnapshot { created: 6, ..s.clone() }, 3));
        assert!(t.len() <= 256 && t.chars().all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c)));
    }

    #[test]
    fn checksums_are_base64_sha256() {
        let sum = ring::digest::digest(&ring::digest::SHA256, b"x");
        assert_eq!(parse_checksum("x-amz-Checksum", &b64(sum.as_ref())).unwrap().as_slice(), sum.as_ref());
        assert!(parse_checksum("x-amz-Checksum", "!!").is_err());
        assert!(parse_checksum("x-amz-Checksum", &b64(b"short")).is_err());
    }
}
