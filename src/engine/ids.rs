//! Object ids (`v-…`, `s-…`, `g-…`) and the rules for names and geometry.

use super::error::{EngineError, Result};
use super::{MAX_CLUSTER_SIZE, MAX_VOLUME_SIZE, MIN_CLUSTER_SIZE};

pub fn volume_id(id: u64) -> String {
    format!("v-{id:016x}")
}

pub fn snapshot_id(id: u64) -> String {
    format!("s-{id:016x}")
}

pub fn group_snapshot_id(id: u64) -> String {
    format!("g-{id:016x}")
}

/// The number in a `v-…` volume id.
pub fn parse_volume_id(r: &str) -> Option<u64> {
    parse_id(r, "v-")
}

/// The number in an `s-…` snapshot id.
pub fn parse_snapshot_id(r: &str) -> Option<u64> {
    parse_id(r, "s-")
}

pub(super) fn parse_id(r: &str, prefix: &str) -> Option<u64> {
    let hex = r.strip_prefix(prefix)?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !name.starts_with(['.', '-'])
        && parse_id(name, "v-").is_none()
        && parse_id(name, "s-").is_none();
    if ok {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "invalid {what} name '{name}': use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-' and not shaped like an id"
        )))
    }
}

/// A name owned by an account: `NAME` (the built-in `default` account's) or `ACCOUNT/NAME`,
/// both parts valid names. Volume, policy and group names are stored this way, so who owns
/// what is in the name itself (see `service::accounts`).
pub fn validate_owned_name(what: &str, name: &str) -> Result<()> {
    match name.split_once('/') {
        None => validate_name(what, name),
        Some((account, bare)) => {
            validate_name("account", account)?;
            validate_name(what, bare)
        }
    }
}

/// The built-in account: owner of every bare name (and of everything from before accounts).
pub const DEFAULT_ACCOUNT: &str = "default";

/// The account owning a stored name (`acme/db` → `acme`, `db` → `default`). Regions' names
/// are owned the same way where they name an account's repository (`acme/local`).
pub fn owner_of(name: &str) -> &str {
    name.split_once('/').map_or(DEFAULT_ACCOUNT, |(account, _)| account)
}

/// `name` as stored for `account`: prefixed, except for the default account.
pub fn owned_name(account: &str, name: &str) -> String {
    match account {
        DEFAULT_ACCOUNT => name.to_string(),
        _ => format!("{account}/{name}"),
    }
}

/// The name without its owner's prefix (`acme/db` → `db`).
pub fn bare_name(name: &str) -> &str {
    name.split_once('/').map_or(name, |(_, bare)| bare)
}

/// Whether a volume of this size and cluster size can exist; the reason when not.
pub(super) fn check_geometry(size: u64, cluster_size: u32) -> std::result::Result<(), String> {
    if !cluster_size.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size) {
        return Err(format!("invalid cluster size {cluster_size}: use a power of two from 4K to 1M (default 64K)"));
    }
    if size == 0 || !size.is_multiple_of(4096) || size > MAX_VOLUME_SIZE {
        return Err(format!(
            "invalid volume size {} ({size} bytes): use a non-zero multiple of 4 KiB up to {}",
            crate::units::human(size),
            crate::units::human(MAX_VOLUME_SIZE)
        ));
    }
    Ok(())
}
