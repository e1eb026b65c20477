//! Accounts, roles and tokens over the HTTPS control API (`serve --api-listen`), with real
//! tokens and curl: the isolation matrix (each role × each route × own and other account's
//! resource, every cell asserted), token expiry and revocation taking effect at once, and the
//! CLI as a remote client (`--api --token-file --api-ca`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::tls::Certs;
use common::*;

struct Api {
    url: String,
    ca: String,
}

impl Api {
    /// (HTTP status, body) of one request with `token` (none: no Authorization header).
    fn call(&self, token: Option<&str>, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "30", "--cacert", &self.ca, "-X", method, "-w", "\n%{http_code}"]);
        cmd.arg(format!("{}{path}", self.url));
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data", b]);
        }
        let out = run_ok(&mut cmd);
        let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        (code.parse().unwrap_or_else(|_| panic!("curl gave no status: {out}")), body.to_string())
    }
}

fn tools() -> bool {
    ["openssl", "curl"].iter().all(|t| require_tool(t))
}

/// A daemon serving the HTTPS API, with accounts `acme` and `umbrella`, each with volume `db`
/// and its snapshot `s1`.
fn setup(tmp: &Path) -> (Daemon, Api) {
    let certs = Certs::make(&tmp.join("pki"));
    let mut args = certs.serve_args();
    args.extend(["--api-listen".into(), "127.0.0.1:0".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_with(&tmp.join("d"), &args);
    keep_snapshots_local(&tmp.join("d"));
    for account in ["acme", "umbrella"] {
        d.cli_ok(&["account", "create", account]);
        d.cli_ok(&["volume", "create", &format!("{account}/db"), "--size", "16M"]);
        d.cli_ok(&["snapshot", "create", &format!("{account}/db"), "--name", "s1"]);
        d.cli_ok(&["image", "create", &format!("{account}/db"), "--root", &format!("{account}/db@s1")]);
    }
    let status = d.cli_json(&["status"]);
    let addr = status["api"].as_str().unwrap_or_else(|| panic!("no API listener: {status}")).to_string();
    let api = Api { url: format!("https://{addr}"), ca: certs.ca().display().to_string() };
    (d, api)
}

fn token(d: &Daemon, account: &str, role: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", account, "--role", role];
    args.extend(extra);
    d.cli_ok(&args).trim().to_string()
}

const ROLES: [&str; 5] = ["admin", "owner", "operator", "reader", "append-only"];

/// One route of the matrix: method, path and body (with `{v}` the volume, `{r}` the role),
/// and the status expected for each role on its own account's resource and on another's.
struct Cell {
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    /// admin, owner, operator, reader, append-only.
    own: [u16; 5],
    other: [u16; 5],
}

#[test]
fn every_role_on_every_route_on_its_own_and_another_accounts_resources() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (d, api) = setup(tmp.path());
    // Read routes: everyone reads its own; another account's is "not found" (no existence
    // leak) for all but admin. Changing routes: a role without the permission gets 403
    // before anything is looked up; with it, another account's resource is 404.
    let cells = [
        Cell { method: "GET", path: "/v1/volumes/{v}", body: None, own: [200; 5], other: [200, 404, 404, 404, 404] },
        Cell {
            method: "GET",
            path: "/v1/snapshots/{v}@s1",
            body: None,
            own: [200; 5],
            other: [200, 404, 404, 404, 404],
        },
        Cell {
            method: "POST",
            path: "/v1/volumes/{v}/snapshots",
            body: Some(r#"{"name": "by-{r}"}"#),
            own: [201, 201, 201, 403, 201],
            other: [201, 404, 404, 403, 404],
        },
        Cell {
            method: "POST",
            path: "/v1/snapshots/{v}@s1/clone",
            body: Some(r#"{"name": "clone-{r}"}"#),
            own: [201, 201, 201, 201, 403],
            other: [201, 404, 404, 404, 403],
        },
        Cell {
            // The permission of a restore; `local` is not an archive region (400, before any
            // snapshot is looked up: nothing about another account's is told).
            method: "POST",
            path: "/v1/snapshots/{v}@s1/restore-archive",
            body: Some(r#"{"region": "local"}"#),
            own: [400, 400, 400, 400, 403],
            other: [400, 400, 400, 400, 403],
        },
        Cell {
            method: "POST",
            path: "/v1/snapshots/{v}@s1/hold",
            body: Some(r#"{"reason": "test"}"#),
            own: [200, 200, 403, 403, 403],
            other: [200, 404, 403, 403, 403],
        },
        Cell {
            method: "DELETE",
            path: "/v1/snapshots/{v}@s1/hold",
            body: None,
            own: [200, 200, 403, 403, 403],
            other: [200, 404, 403, 403, 403],
        },
        Cell {
            method: "POST",
            path: "/v1/snapshots/{v}@s1/rollback",
            body: Some("{}"),
            own: [200, 200, 403, 403, 403],
            other: [200, 404, 403, 403, 403],
        },
        Cell {
            // The volume has snapshots: refused (409) once the caller may delete and sees it.
            method: "DELETE",
            path: "/v1/volumes/{v}",
            body: None,
            own: [409, 409, 403, 403, 403],
            other: [409, 404, 403, 403, 403],
        },
        Cell {
            method: "DELETE",
            path: "/v1/snapshots/{v}@by-nobody",
            body: None,
            own: [404, 404, 403, 403, 403],
            other: [404, 404, 403, 403, 403],
        },
        Cell {
            // (umbrella's own snapshot cannot be shared with umbrella: 400 for the admin.)
            method: "POST",
            path: "/v1/snapshots/{v}@s1/shares",
            body: Some(r#"{"with": "umbrella"}"#),
            own: [201, 201, 403, 403, 403],
            other: [400, 404, 403, 403, 403],
        },
        Cell {
            method: "GET",
            path: "/v1/snapshots/{v}@s1/shares",
            body: None,
            own: [200; 5],
            other: [200, 404, 404, 404, 404],
        },
        Cell { method: "GET", path: "/v1/images/{v}", body: None, own: [200; 5], other: [200, 404, 404, 404, 404] },
        Cell {
            method: "POST",
            path: "/v1/images/{v}/volumes",
            body: Some(r#"{"prefix": "img-{r}-"}"#),
            own: [201, 201, 201, 201, 403],
            other: [201, 404, 404, 404, 403],
        },
        Cell {
            method: "GET",
            path: "/v1/volumes/{v}/quota",
            body: None,
            own: [200; 5],
            other: [200, 404, 404, 404, 404],
        },
        Cell {
            method: "POST",
            path: "/v1/volumes/{v}/attach",
            body: Some(r#"{"kind": "nbd"}"#),
            own: [0, 403, 403, 403, 403],
            other: [0, 403, 403, 403, 403],
        },
    ];
    // Routes on no account's resource.
    let global: [(&str, &str, Option<&str>, [u16; 5]); 11] = [
        ("GET", "/v1/volumes", None, [200; 5]),
        ("GET", "/v1/snapshots", None, [200; 5]),
        ("GET", "/v1/events", None, [200; 5]),
        ("POST", "/v1/volumes", Some(r#"{"name": "new-{r}", "size": 1048576}"#), [201, 201, 201, 403, 403]),
        ("POST", "/v1/accounts", Some(r#"{"name": "made-by-{r}"}"#), [201, 403, 403, 403, 403]),
        ("GET", "/v1/tokens", None, [200, 200, 403, 403, 403]),
        ("GET", "/v1/regions/local/key", None, [200, 403, 403, 403, 403]),
        ("GET", "/v1/recycle-bin", None, [200; 5]),
        ("GET", "/v1/shared-with-me", None, [200; 5]),
        ("GET", "/v1/images", None, [200; 5]),
        ("GET", "/v1/images-shared-with-me", None, [200; 5]),
    ];
    for (i, role) in ROLES.iter().enumerate() {
        let t = token(&d, "acme", role, &[]);
        for c in &cells {
            for (target, expected) in [("acme/db", c.own[i]), ("umbrella/db", c.other[i])] {
                let tag = format!("{role}-{}", &target[..4]);
                let fill = |s: &str| s.replace("{v}", target).replace("{r}", &tag);
                let path = restore_slashes(&fill(c.path), target);
                let body = c.body.map(fill);
                let (status, answer) = api.call(Some(&t), c.method, &path, body.as_deref());
                if expected == 0 {
                    // admin attach: no kernel module here; only "not refused by role" counts.
                    assert_ne!(status, 403, "{role} {} {path}: {answer}", c.method);
                    continue;
                }
                assert_eq!(status, expected, "{role} {} {path} (account acme): {answer}", c.method);
                if status == 403 {
                    assert!(answer.contains("lacks the '"), "a 403 names the missing permission: {answer}");
                }
                if status == 404 && target.starts_with("umbrella") && *role != "admin" {
                    // Word for word what a volume that does not exist gets: no existence leak.
                    let missing = "acme/missing";
                    let path = restore_slashes(&c.path.replace("{v}", missing), missing);
                    let (s2, absent) = api.call(Some(&t), c.method, &path, body.as_deref());
                    assert_eq!((s2, absent.replace(missing, target)), (404, answer.clone()), "{role} {path}");
                }
            }
        }
        for (method, path, body, expected) in &global {
            let body = body.map(|b| b.replace("{r}", role));
            let (status, answer) = api.call(Some(&t), method, path, body.as_deref());
            assert_eq!(status, expected[i], "{role} {method} {path}: {answer}");
        }
        // Lists show the caller's account's resources only (all of them for admin).
        let (_, volumes) = api.call(Some(&t), "GET", "/v1/volumes", None);
        let (_, snapshots) = api.call(Some(&t), "GET", "/v1/snapshots", None);
        let (_, events) = api.call(Some(&t), "GET", "/v1/events?limit=1000", None);
        for listed in [&volumes, &snapshots, &events] {
            assert!(listed.contains("\"acme/db\""), "{role}: {listed}");
            // (An admin's clone of umbrella's snapshot into acme names its origin; that is all.)
            let other = listed.contains("\"umbrella/db\"");
            assert_eq!(other, *role == "admin", "{role} sees another account: {listed}");
        }
    }
    // A job is seen by its account's callers only (its id is a small number).
    let (status, job) = api.call(
        Some(&token(&d, "acme", "owner", &[])),
        "POST",
        &restore_slashes("/v1/snapshots/acme/db@s1/verify", "acme/db"),
        None,
    );
    assert_eq!(status, 202, "{job}");
    let id = serde_json::from_str::<serde_json::Value>(&job).unwrap()["id"].as_u64().unwrap();
    let path = format!("/v1/jobs/{id}");
    assert_eq!(api.call(Some(&token(&d, "acme", "reader", &[])), "GET", &path, None).0, 200);
    let (status, answer) = api.call(Some(&token(&d, "umbrella", "owner", &[])), "GET", &path, None);
    assert_eq!(status, 404, "another account's job: {answer}");
    // A volume an account's caller creates is its account's.
    let (_, v) = api.call(Some(&token(&d, "acme", "owner", &[])), "GET", "/v1/volumes/new-owner", None);
    assert!(v.contains("\"name\":\"acme/new-owner\""), "{v}");
}

/// `acme%2Fdb` in the volume segment (a name with its account prefix is one path segment).
fn restore_slashes(path: &str, target: &str) -> String {
    path.replace(target, &target.replace('/', "%2F"))
}

#[test]
fn tokens_are_checked_on_every_request_expiry_and_revocation_at_once() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (d, api) = setup(tmp.path());
    let (status, answer) = api.call(None, "GET", "/v1/volumes", None);
    assert_eq!(status, 401, "{answer}");
    assert!(answer.contains("needs a token"), "{answer}");
    for bad in ["nonsense", "sbk_000000000000_00", "sbk_"] {
        assert_eq!(api.call(Some(bad), "GET", "/v1/volumes", None).0, 401, "{bad}");
    }
    let t = token(&d, "acme", "owner", &[]);
    assert_eq!(api.call(Some(&t), "GET", "/v1/volumes", None).0, 200);
    // The secret is not in the accounts file; only its hash.
    let file = std::fs::read_to_string(tmp.path().join("d/meta/accounts.json")).unwrap();
    let secret = t.rsplit('_').next().unwrap();
    assert!(!file.contains(secret), "the token's secret is stored");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(tmp.path().join("d/meta/accounts.json")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Revoked: refused at the next request.
    let id = t.strip_prefix("sbk_").unwrap().split('_').next().unwrap();
    d.cli_ok(&["token", "revoke", id]);
    assert_eq!(api.call(Some(&t), "GET", "/v1/volumes", None).0, 401);
    // Expired: refused once its time is up.
    let short = token(&d, "acme", "reader", &["--expires", "2s"]);
    assert_eq!(api.call(Some(&short), "GET", "/v1/volumes", None).0, 200);
    std::thread::sleep(Duration::from_millis(3100));
    assert_eq!(api.call(Some(&short), "GET", "/v1/volumes", None).0, 401);
    // An owner makes tokens for its own account, never admin ones, never for another account.
    let owner = token(&d, "acme", "owner", &[]);
    let make = |body: &str| api.call(Some(&owner), "POST", "/v1/tokens", Some(body)).0;
    assert_eq!(make(r#"{"account": "acme", "role": "reader"}"#), 201);
    assert_eq!(make(r#"{"account": "acme", "role": "admin"}"#), 403);
    assert_eq!(make(r#"{"account": "umbrella", "role": "reader"}"#), 404);
    // Plain HTTP on the HTTPS port is not served.
    let plain = api.url.replace("https://", "http://");
    let out = run(
        Command::new("curl").args(["-sS", "--max-time", "10", &format!("{plain}/v1/volumes")]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success() || !text(&out.stdout).contains("acme"), "plain HTTP answered");
    // An account that still owns something is not deleted.
    let (code, stderr) = d.cli_err(&["account", "delete", "acme"]);
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("still owns volume acme/db"), "{stderr}");
}

#[test]
fn the_cli_is_a_client_of_the_https_api_with_a_token_file() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (d, api) = setup(tmp.path());
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, token(&d, "umbrella", "operator", &[])).unwrap();
    let remote = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_snapblk"));
        cmd.args(["--api", &api.url, "--token-file", token_file.to_str().unwrap(), "--api-ca", &api.ca]);
        cmd.args(args);
        run(&mut cmd, Duration::from_secs(60))
    };
    let out = remote(&["volume", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("umbrella/db") && !text(&out.stdout).contains("acme"), "{}", text(&out.stdout));
    // Its own volume by its bare name; a snapshot by the operator.
    let out = remote(&["snapshot", "create", "db", "--name", "nightly"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = remote(&["snapshot", "list", "db"]);
    assert!(text(&out.stdout).contains("nightly"), "{}", text(&out.stdout));
    // Deleting needs the delete permission: exit 7 and the sentence naming it.
    let out = remote(&["snapshot", "delete", "db@nightly"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("lacks the 'delete' permission"), "{}", text(&out.stderr));
    // Another account's volume is not found (exit 4).
    let out = remote(&["volume", "show", "acme/db"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    // Without --api-ca the self-signed server is not trusted.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_snapblk"));
    cmd.args(["--api", &api.url, "--token-file", token_file.to_str().unwrap(), "volume", "list"]);
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(!out.status.success(), "an untrusted certificate was accepted");
}

#[test]
fn an_nbd_client_certificate_acts_for_the_account_that_claims_its_name() {
    if !tools() || !require_tool("nbdinfo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::make(&tmp.path().join("pki"));
    let mut args = certs.serve_args();
    args.extend(["--nbd-listen".into(), "127.0.0.1:0".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_with(&tmp.path().join("d"), &args);
    // Certificate "alice" (CN) is account acme's TLS identity.
    d.cli_ok(&["account", "create", "acme", "--tls-identity", "alice"]);
    d.cli_ok(&["account", "create", "umbrella"]);
    for account in ["acme", "umbrella"] {
        d.cli_ok(&["volume", "create", &format!("{account}/db"), "--size", "16M"]);
    }
    let client = |who: &str| certs.root.join(format!("client-{who}")).display().to_string();
    let uri = |export: &str, who: &str| {
        format!("nbds+unix:///{export}?socket={}&tls-certificates={}", d.socket(), client(who))
    };
    let list = |who: &str| {
        let out = run(Command::new("nbdinfo").args(["--list", &uri("", who)]), Duration::from_secs(60));
        text(&out.stdout)
    };
    let alice = list("alice");
    assert!(alice.contains("acme/db") && !alice.contains("umbrella"), "alice lists: {alice}");
    // Its own export by its bare name, read-write; another account's is not there.
    let out = run(Command::new("nbdinfo").args(["--json", &uri("db", "alice")]), Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("\"is_read_only\": false"), "{}", text(&out.stdout));
    let out = run(Command::new("nbdinfo").arg(uri("umbrella/db", "alice")), Duration::from_secs(60));
    assert!(!out.status.success(), "alice opened umbrella's export");
    // A client without a certificate, or with one no account claims, keeps the socket's
    // access (the daemon user's socket).
    let all = list("anonymous");
    assert!(all.contains("acme/db") && all.contains("umbrella/db"), "{all}");
    // Over TCP it is the default account's: its exports only (bare names), no account's.
    d.cli_ok(&["volume", "create", "plain", "--size", "16M"]);
    let status = d.cli_json(&["status"]);
    let tcp = status["nbd_tcp"].as_str().unwrap().to_string();
    let tcp_list = |who: &str| {
        let uri = format!("nbds://{tcp}/?tls-certificates={}", client(who));
        text(&run(Command::new("nbdinfo").args(["--list", &uri]), Duration::from_secs(60)).stdout)
    };
    let anonymous = tcp_list("anonymous");
    assert!(
        anonymous.contains("plain") && !anonymous.contains("acme/db") && !anonymous.contains("umbrella"),
        "{anonymous}"
    );
    let out = run(
        Command::new("nbdinfo").arg(format!("nbds://{tcp}/acme/db?tls-certificates={}", client("anonymous"))),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "an anonymous TCP client opened acme's export");
    let alice = tcp_list("alice");
    assert!(alice.contains("acme/db") && !alice.contains("plain"), "{alice}");
}
