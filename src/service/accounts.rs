//! Accounts, roles and API tokens: who may call which operation on what.
//!
//! An account owns volumes (and their snapshots), policies and groups. Ownership is in the
//! resource's name: the built-in account `default` owns bare names (`db`), account `acme`
//! owns `acme/db` — so every name a journal or the lifecycle file ever held keeps its owner
//! across a crash, and data from before accounts existed is `default`'s with nothing to
//! migrate. A caller of an account names its resources with or without the prefix; it never
//! sees another account's (they are "not found", exactly as missing ones).
//!
//! Callers of the control socket (its user, or `--socket-group`) are administrators, as the
//! socket's mode already decides. Callers of the HTTPS API prove an account and a role with a
//! bearer token: `sbk_<id>_<secret>`, of which the daemon keeps the id and the secret's
//! SHA-256 only (`DIR/meta/accounts.json`, 0600), so the file does not give the tokens away.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Access, Caller, Error, Result, Service};
use crate::engine::validate_name;

/// The account that owns resources named without an account prefix.
pub use crate::engine::{owned_name, owner_of, DEFAULT_ACCOUNT};
/// Most tokens per account (each is checked by hash on every request; revoked ones go).
const MAX_TOKENS_PER_ACCOUNT: usize = 64;

/// What a token may do (Proxmox Backup Server's model, smaller). [`Role::allows`] is the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything, on every account (as the control socket's callers).
    Admin,
    /// Everything on its account's resources.
    Owner,
    /// Exports (read-write), snapshots, restores to new volumes; never deletes or rolls back.
    Operator,
    /// Read-only: lists, read-only exports, restores to new volumes.
    Reader,
    /// Lists and takes snapshots, nothing else: a backup agent's token, useless for
    /// destroying backups.
    AppendOnly,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Admin, Role::Owner, Role::Operator, Role::Reader, Role::AppendOnly];

    pub fn allows(self, access: Access) -> bool {
        use Access::*;
        match self {
            Role::Admin => true,
            Role::Owner => access != Admin,
            Role::Operator => matches!(access, Read | Snapshot | Restore | Write),
            Role::Reader => matches!(access, Read | Restore),
            Role::AppendOnly => matches!(access, Read | Snapshot),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Owner => "owner",
            Role::Operator => "operator",
            Role::Reader => "reader",
            Role::AppendOnly => "append-only",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role '{s}': use admin, owner, operator, reader or append-only"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountView {
    pub name: String,
    /// Seconds since the Unix epoch (0 for `default`, which always existed).
    pub created: u64,
    /// Tokens the account has (not their secrets).
    #[serde(default)]
    pub tokens: usize,
    /// NBD clients presenting a verified certificate with one of these names (its CN, a DNS
    /// or e-mail SAN) act for this account as operators.
    #[serde(default)]
    pub tls_identities: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenView {
    pub id: String,
    pub account: String,
    pub role: Role,
    pub created: u64,
    /// Seconds since the Unix epoch; none: it does not expire.
    pub expires: Option<u64>,
    #[serde(default)]
    pub description: String,
}

/// A new token: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewToken {
    #[serde(flatten)]
    pub token: TokenView,
    /// `sbk_<id>_<secret>`: give it to the client (`--token-file`); it cannot be shown again.
    pub secret: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    pub name: String,
    /// Client certificate names that act for the account over NBD (see [`AccountView`]).
    #[serde(default)]
    pub tls_identities: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub account: String,
    pub role: Role,
    /// Seconds from now; none: the token does not expire.
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredToken {
    #[serde(flatten)]
    view: TokenView,
    /// SHA-256 of the secret, hex.
    hash: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    version: u32,
    accounts: BTreeMap<String, AccountView>,
    tokens: BTreeMap<String, StoredToken>,
}

/// The accounts file, and its state in memory (changes are written, durably, before they
/// are answered: a revoked token stays revoked across a crash).
pub(super) struct Accounts {
    path: PathBuf,
    state: parking_lot::Mutex<State>,
}

fn sha256_hex(secret: &str) -> String {
    crate::store::crypto::hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

impl Accounts {
    pub(super) fn open(dir: &std::path::Path) -> Result<Accounts> {
        let path = dir.join("meta").join("accounts.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::Internal(format!("{} is damaged ({e}); restore it from a backup", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(Error::Internal(format!("cannot read {}: {e}", path.display()))),
        };
        Ok(Accounts { path, state: parking_lot::Mutex::new(state) })
    }

    fn save(&self, state: &State) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::Internal(e.to_string()))?;
        crate::fsutil::replace_file(&self.path, &bytes, true)
            .map_err(|e| Error::Internal(format!("cannot write {}: {e}", self.path.display())))
    }

    /// The accounts besides `default`.
    pub(super) fn names(&self) -> Vec<String> {
        self.state.lock().accounts.keys().cloned().collect()
    }

    pub(super) fn exists(&self, name: &str) -> bool {
        name == DEFAULT_ACCOUNT || self.state.lock().accounts.contains_key(name)
    }

    /// The caller a bearer token stands for; checked on every request, so an expiry or a
    /// revocation takes effect at once.
    pub(super) fn authenticate(&self, bearer: &str, now: u64) -> Result<Caller> {
        let refused = || {
            Error::Unauthenticated(
                "the token is unknown, revoked or expired: ask an administrator for a new one (snapblk token create)"
                    .into(),
            )
        };
        let (id, _) = bearer.strip_prefix("sbk_").and_then(|t| t.split_once('_')).ok_or_else(refused)?;
        let st = self.state.lock();
        let stored = st.tokens.get(id).ok_or_else(refused)?;
        let view = &stored.view;
        // Hashes, compared in constant time: the secret is random and long, the hash does not
        // leak it, and comparing hashes leaks nothing about a guess's prefix.
        let matches = ring_compare(&stored.hash, &sha256_hex(bearer));
        if !matches || view.expires.is_some_and(|e| e <= now) {
            return Err(refused());
        }
        Ok(Caller::Account { account: view.account.clone(), role: view.role, token: view.id.clone() })
    }
}

fn ring_compare(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Service {
    /// Who an NBD client is. With a verified client certificate one of whose names an account
    /// claims as a TLS identity: that account, as an operator (read-write exports of its own
    /// volumes, read-only of its snapshots). Otherwise — no certificate, or one no account
    /// claims — on the unix socket, whose mode decided who may connect, an administrator as
    /// before accounts; on TCP (`network`), the default account's operator: the exports with
    /// bare names, as before accounts, and never another account's.
    pub fn nbd_caller(&self, client_names: &[String], network: bool) -> Caller {
        let st = self.accounts.state.lock();
        let claimed = st.accounts.values().find(|a| a.tls_identities.iter().any(|i| client_names.contains(i)));
        let operator = |account: &str, token: String| Caller::Account {
            account: account.to_string(),
            role: Role::Operator,
            token,
        };
        match claimed {
            Some(a) => operator(&a.name, format!("tls:{}", client_names.first().map_or("", String::as_str))),
            None if network => {
                operator(DEFAULT_ACCOUNT, format!("tls:{}", client_names.first().map_or("anonymous", String::as_str)))
            }
            None => Caller::Local,
        }
    }

    /// Who a bearer token is (the HTTPS API's callers).
    pub fn authenticate(&self, bearer: &str) -> Result<Caller> {
        self.accounts.authenticate(bearer, self.engine.clock().now())
    }

    pub fn create_account(&self, caller: &Caller, req: CreateAccount) -> Result<AccountView> {
        caller.may(Access::Admin)?;
        validate_name("account", &req.name)?;
        let mut st = self.accounts.state.lock();
        if req.name == DEFAULT_ACCOUNT || st.accounts.contains_key(&req.name) {
            return Err(Error::Engine(crate::engine::EngineError::AlreadyExists(format!(
                "account '{}' already exists",
                req.name
            ))));
        }
        if let Some(taken) = req
            .tls_identities
            .iter()
            .find(|i| i.is_empty() || st.accounts.values().any(|a| a.tls_identities.contains(i)))
        {
            return Err(Error::Invalid(format!(
                "TLS identity '{taken}' is empty or another account's already: one certificate name, one account"
            )));
        }
        let view = AccountView {
            name: req.name.clone(),
            created: self.engine.clock().now(),
            tokens: 0,
            tls_identities: req.tls_identities,
        };
        st.accounts.insert(req.name.clone(), view.clone());
        if let Err(e) = self.accounts.save(&st) {
            st.accounts.remove(&req.name);
            return Err(e);
        }
        tracing::info!(account = %req.name, by = %caller, "account created");
        self.event(super::Event::AccountCreated { account: req.name, by: caller.to_string() });
        Ok(view)
    }

    /// The accounts the caller may see: every one for an administrator, its own otherwise.
    pub fn list_accounts(&self, caller: &Caller) -> Result<Vec<AccountView>> {
        caller.may(Access::Read)?;
        let st = self.accounts.state.lock();
        let count = |name: &str| st.tokens.values().filter(|t| t.view.account == name).count();
        let default = AccountView {
            name: DEFAULT_ACCOUNT.into(),
            created: 0,
            tokens: count(DEFAULT_ACCOUNT),
            tls_identities: Vec::new(),
        };
        Ok(std::iter::once(default)
            .chain(st.accounts.values().map(|a| AccountView { tokens: count(&a.name), ..a.clone() }))
            .filter(|a| caller.sees_account(&a.name))
            .collect())
    }

    pub fn account(&self, caller: &Caller, name: &str) -> Result<AccountView> {
        self.list_accounts(caller)?
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| Error::NotFound(format!("no account named '{name}'; list them with: snapblk account list")))
    }

    /// Deletes an account that owns nothing any more; its tokens go with it.
    pub fn delete_account(&self, caller: &Caller, name: &str) -> Result<()> {
        caller.may(Access::Admin)?;
        if name == DEFAULT_ACCOUNT {
            return Err(Error::Invalid("the default account is built in and cannot be deleted".into()));
        }
        self.account(caller, name)?;
        let volumes: Vec<String> =
            self.engine.list_volumes().into_iter().map(|v| v.name).filter(|v| owner_of(v) == name).collect();
        let (policies, groups) = {
            let st = self.lifecycle.lock();
            let policies: Vec<String> = st.policies.keys().filter(|p| owner_of(p) == name).cloned().collect();
            let groups: Vec<String> = st.groups.keys().filter(|g| owner_of(g) == name).cloned().collect();
            (policies, groups)
        };
        if !(volumes.is_empty() && policies.is_empty() && groups.is_empty()) {
            let owned: Vec<String> = volumes
                .iter()
                .map(|v| format!("volume {v}"))
                .chain(policies.iter().map(|p| format!("policy {p}")))
                .chain(groups.iter().map(|g| format!("group {g}")))
                .collect();
            return Err(Error::Engine(crate::engine::EngineError::Busy(format!(
                "account '{name}' still owns {}; delete them first",
                owned.join(", ")
            ))));
        }
        let mut st = self.accounts.state.lock();
        let removed = st.accounts.remove(name);
        let tokens: Vec<String> =
            st.tokens.iter().filter(|(_, t)| t.view.account == name).map(|(id, _)| id.clone()).collect();
        let mut dropped = Vec::new();
        for id in &tokens {
            dropped.extend(st.tokens.remove(id).map(|t| (id.clone(), t)));
        }
        if let Err(e) = self.accounts.save(&st) {
            st.accounts.extend(removed.map(|a| (name.to_string(), a)));
            st.tokens.extend(dropped);
            return Err(e);
        }
        tracing::info!(account = %name, by = %caller, "account deleted");
        self.event(super::Event::AccountDeleted { account: name.to_string(), by: caller.to_string() });
        Ok(())
    }

    /// A new token for `account`. Administrators make any; an account's owner makes tokens of
    /// its own account with any role but admin.
    pub fn create_token(&self, caller: &Caller, req: CreateToken) -> Result<NewToken> {
        caller.may(Access::Manage)?;
        if !caller.sees_account(&req.account) || !self.accounts.exists(&req.account) {
            return Err(Error::NotFound(format!(
                "no account named '{}'; list them with: snapblk account list",
                req.account
            )));
        }
        if req.role == Role::Admin {
            caller.may(Access::Admin)?;
        }
        if req.description.len() > 256 {
            return Err(Error::Invalid("a token description is at most 256 bytes".into()));
        }
        let now = self.engine.clock().now();
        let mut st = self.accounts.state.lock();
        let held = st.tokens.values().filter(|t| t.view.account == req.account).count();
        if held >= MAX_TOKENS_PER_ACCOUNT {
            return Err(Error::Limit {
                message: format!(
                    "account '{}' has {MAX_TOKENS_PER_ACCOUNT} tokens already; revoke some (snapblk token revoke ID)",
                    req.account
                ),
                retry_after: None,
            });
        }
        let id = crate::store::crypto::hex(&rand::random::<[u8; 6]>());
        let secret = format!("sbk_{id}_{}", crate::store::crypto::hex(&rand::random::<[u8; 32]>()));
        let view = TokenView {
            id: id.clone(),
            account: req.account.clone(),
            role: req.role,
            created: now,
            expires: req.expires_in.map(|s| now.saturating_add(s)),
            description: req.description,
        };
        st.tokens.insert(id.clone(), StoredToken { view: view.clone(), hash: sha256_hex(&secret) });
        if let Err(e) = self.accounts.save(&st) {
            st.tokens.remove(&id);
            return Err(e);
        }
        tracing::info!(token = %id, account = %req.account, role = %req.role, by = %caller, "token created");
        self.event(super::Event::TokenCreated {
            account: req.account,
            token: id,
            role: req.role.name().into(),
            by: caller.to_string(),
        });
        Ok(NewToken { token: view, secret })
    }

    /// Tokens (never their secrets): every account's for an administrator, the caller's
    /// account's otherwise.
    pub fn list_tokens(&self, caller: &Caller, account: Option<&str>) -> Result<Vec<TokenView>> {
        caller.may(Access::Manage)?;
        let st = self.accounts.state.lock();
        Ok(st
            .tokens
            .values()
            .map(|t| t.view.clone())
            .filter(|t| caller.sees_account(&t.account) && account.is_none_or(|a| a == t.account))
            .collect())
    }

    /// Revokes a token: the next request with it is refused.
    pub fn revoke_token(&self, caller: &Caller, id: &str) -> Result<()> {
        caller.may(Access::Manage)?;
        let mut st = self.accounts.state.lock();
        let removed = match st.tokens.remove(id) {
            Some(t) if caller.sees_account(&t.view.account) => t,
            other => {
                st.tokens.extend(other.map(|t| (id.to_string(), t)));
                return Err(Error::NotFound(format!("no token with id '{id}'; list them with: snapblk token list")));
            }
        };
        if let Err(e) = self.accounts.save(&st) {
            st.tokens.insert(id.to_string(), removed);
            return Err(e);
        }
        let account = removed.view.account;
        tracing::info!(token = %id, account = %account, by = %caller, "token revoked");
        self.event(super::Event::TokenRevoked { account, token: id.to_string(), by: caller.to_string() });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_the_readme_table_says() {
        use Access::*;
        let table = [
            (Role::Admin, vec![Read, Snapshot, Restore, Write, Delete, Manage, Admin]),
            (Role::Owner, vec![Read, Snapshot, Restore, Write, Delete, Manage]),
            (Role::Operator, vec![Read, Snapshot, Restore, Write]),
            (Role::Reader, vec![Read, Restore]),
            (Role::AppendOnly, vec![Read, Snapshot]),
        ];
        for (role, allowed) in table {
            for access in [Read, Snapshot, Restore, Write, Delete, Manage, Admin] {
                assert_eq!(role.allows(access), allowed.contains(&access), "{role} {access:?}");
            }
            assert_eq!(role.name().parse::<Role>(), Ok(role));
        }
    }

    #[test]
    fn callers_name_their_own_resources_bare_and_the_default_accounts_with_its_prefix() {
        let acme = Caller::Account { account: "acme".into(), role: Role::Admin, token: "t".into() };
        assert_eq!(acme.qualify("db"), "acme/db");
        assert_eq!(acme.qualify("default/db"), "db");
        assert_eq!(acme.qualify("other/db"), "other/db");
        assert_eq!(acme.qualify_ref("db@daily"), "acme/db@daily");
        assert_eq!(acme.qualify_ref("s-0000000000000001"), "s-0000000000000001");
        assert_eq!(Caller::Local.qualify("db"), "db");
        let reader = Caller::Account { account: "acme".into(), role: Role::Reader, token: "t".into() };
        assert!(reader.sees("acme/db") && !reader.sees("db") && !reader.sees("other/db"));
        assert!(acme.sees("db") && acme.sees("other/db"));
        let e = reader.may(Access::Delete).unwrap_err().to_string();
        assert!(e.contains("role reader lacks the 'delete' permission") && e.contains("owner"), "{e}");
    }

    #[test]
    fn names_carry_their_owner() {
        assert_eq!(owner_of("db"), "default");
        assert_eq!(owner_of("acme/db"), "acme");
        assert_eq!(owned_name("acme", "db"), "acme/db");
        assert_eq!(owned_name("default", "db"), "db");
    }
}
