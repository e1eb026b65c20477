//! `snapblk account ...` and `snapblk token ...`: accounts and their API tokens.

use clap::Subcommand;
use hyper::Method;

use super::{delete, get, send, table, Client, ClientError, Printed};
use crate::service::{AccountView, CreateAccount, CreateToken, NewToken, Role, TokenView};
use crate::units::{parse_duration, utc};

#[derive(Subcommand, Debug)]
pub enum AccountCommand {
    /// Create an account (administrators)
    Create {
        name: String,
        /// A client certificate name (CN, DNS or e-mail SAN) whose NBD connections act for the
        /// account as an operator; repeat for several
        #[arg(long = "tls-identity", value_name = "NAME")]
        tls_identities: Vec<String>,
    },
    /// List accounts (an account's token sees its own)
    List,
    /// Show an account
    Show { name: String },
    /// Delete an account that owns nothing any more; its tokens go with it
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create an API token for ACCOUNT; prints its secret, which is shown this once
    Create {
        account: String,
        /// admin, owner, operator, reader or append-only (see README "Security")
        #[arg(long, default_value = "owner")]
        role: Role,
        /// Lifetime (e.g. 30d, 12h); default: it does not expire
        #[arg(long)]
        expires: Option<String>,
        /// What the token is for
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (never their secrets)
    List {
        /// Only this account's
        #[arg(long)]
        account: Option<String>,
    },
    /// Revoke a token: the next request with it is refused
    Revoke { id: String },
}

pub(super) async fn account(c: &Client, command: AccountCommand) -> Result<Printed, ClientError> {
    let p = Client::path;
    Ok(match command {
        AccountCommand::Create { name, tls_identities } => {
            let req = CreateAccount { name, tls_identities };
            let a: AccountView = send(c, Method::POST, &p(&["accounts"]), Some(&req)).await?;
            let text = format!("account {} created\n", a.name);
            Printed::new(&a, text)
        }
        AccountCommand::List => {
            let all: Vec<AccountView> = get(c, &p(&["accounts"])).await?;
            let rows = all.iter().map(|a| vec![a.name.clone(), a.tokens.to_string(), created(a.created)]).collect();
            Printed::new(&all, table(&["NAME", "TOKENS", "CREATED"], rows))
        }
        AccountCommand::Show { name } => {
            let a: AccountView = get(c, &p(&["accounts", &name])).await?;
            let text = format!(
                "name:          {}\ntokens:        {}\ncreated:       {}\ntls identities: {}\n",
                a.name,
                a.tokens,
                created(a.created),
                a.tls_identities.join(", ")
            );
            Printed::new(&a, text)
        }
        AccountCommand::Delete { name } => {
            delete(c, &p(&["accounts", &name])).await?;
            Printed::message(format!("account {name} deleted"), serde_json::json!({ "deleted": name }))
        }
    })
}

pub(super) async fn token(c: &Client, command: TokenCommand) -> Result<Printed, ClientError> {
    let p = Client::path;
    Ok(match command {
        TokenCommand::Create { account, role, expires, description } => {
            let expires_in = expires
                .map(|e| {
                    parse_duration(&e).map(|d| d.as_secs()).map_err(|m| ClientError::Usage(format!("--expires: {m}")))
                })
                .transpose()?;
            let req = CreateToken { account, role, expires_in, description };
            let t: NewToken = send(c, Method::POST, &p(&["tokens"]), Some(&req)).await?;
            eprintln!(
                "token {} ({} of account {}) created; its secret is printed below and cannot be shown again",
                t.token.id, t.token.role, t.token.account
            );
            let text = format!("{}\n", t.secret);
            Printed::new(&t, text)
        }
        TokenCommand::List { account } => {
            let path = match &account {
                Some(a) => format!("{}?account={a}", p(&["tokens"])),
                None => p(&["tokens"]),
            };
            let all: Vec<TokenView> = get(c, &path).await?;
            let rows = all
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.account.clone(),
                        t.role.to_string(),
                        t.expires.map_or("never".into(), utc),
                        t.description.clone(),
                    ]
                })
                .collect();
            Printed::new(&all, table(&["ID", "ACCOUNT", "ROLE", "EXPIRES", "DESCRIPTION"], rows))
        }
        TokenCommand::Revoke { id } => {
            delete(c, &p(&["tokens", &id])).await?;
            Printed::message(format!("token {id} revoked"), serde_json::json!({ "revoked": id }))
        }
    })
}

fn created(t: u64) -> String {
    if t == 0 {
        "(built in)".into()
    } else {
        utc(t)
    }
}
