//! The `snapblk` command line. Every command except `serve` is a client of the daemon's API;
//! the commands of each resource are in a file of their own.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

mod accounts;
mod copies;
mod groups;
mod images;
mod lifecycle;
mod policies;
mod regions;
mod snapshots;
mod volumes;

pub use accounts::{AccountCommand, TokenCommand};
pub use groups::GroupCommand;
pub use lifecycle::BinCommand;
pub use policies::PolicyCommand;
pub use regions::{KeyCommand, RegionCommand};
pub use snapshots::{FormatArg, SnapshotCommand};
pub use volumes::VolumeCommand;

use super::client::{Client, ClientError};
use crate::jobs::JobView;
use crate::service::StatusView;
use crate::units::{human, parse_size};

#[derive(Parser, Debug)]
#[command(name = "snapblk", version, about = "Block-device server with instant snapshots")]
pub struct Cli {
    /// The daemon's directory
    #[arg(long, global = true, env = "SNAPBLK_DIR")]
    pub dir: Option<PathBuf>,
    /// Print machine-readable JSON
    #[arg(long, global = true)]
    pub json: bool,
    /// Talk to a daemon's HTTPS API (https://HOST:PORT, its serve --api-listen) instead of
    /// the control socket of --dir; needs --token-file
    #[arg(long, global = true, env = "SNAPBLK_API", value_name = "URL")]
    pub api: Option<String>,
    /// The file holding the API token (snapblk token create), for --api
    #[arg(long, global = true, env = "SNAPBLK_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) to check the API server's certificate with, for --api.
    /// Default: the system's trusted roots
    #[arg(long, global = true, env = "SNAPBLK_API_CA", value_name = "FILE")]
    pub api_ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon in the foreground
    Serve(ServeArgs),
    /// Manage volumes
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Manage snapshots
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Show the daemon's status
    Status,
    /// Accounts: owners of volumes, snapshots, policies and groups (see README "Security")
    #[command(subcommand)]
    Account(AccountCommand),
    /// API tokens: what HTTPS API callers (--api) prove their account and role with
    #[command(subcommand)]
    Token(TokenCommand),
    /// Object-store regions (from DIR/snapblk.toml)
    #[command(subcommand)]
    Region(RegionCommand),
    /// Reclaim store space no snapshot references
    Gc {
        /// Only this region (default: every region)
        #[arg(long)]
        region: Option<String>,
        /// Keep unreferenced packs younger than this (default: gc.grace from the config)
        #[arg(long)]
        grace: Option<String>,
    },
    /// Key files (the key-encryption keys of regions)
    #[command(subcommand)]
    Key(KeyCommand),
    /// Consistency groups: snapshots of several volumes taken at one instant
    #[command(subcommand)]
    Group(GroupCommand),
    /// Images: named sets of snapshots (root and data disks) to deploy volumes from, export
    /// and import
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// Copies of snapshots to other regions and archives: list, show, cancel
    #[command(subcommand)]
    Copy(copies::CopyCommand),
    /// Automatic snapshot policies: schedules and retention
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Deleted snapshots waiting to be deleted for good ([recycle_bin] in snapblk.toml)
    #[command(subcommand)]
    RecycleBin(BinCommand),
    /// The daemon's event log: snapshots taken, deleted, expired, restored; policy ticks
    /// skipped or failed; quotas hit; uploads failed
    Events {
        /// Then print new events as they happen, until interrupted
        #[arg(short, long)]
        follow: bool,
        /// How many of the newest events to print first
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Also serve NBD over TCP, on this address (e.g. 127.0.0.1:10809). Default: none, only the
    /// unix socket DIR/nbd.sock. Non-loopback addresses are refused unless TLS is required
    /// (--tls-cert, --tls-key and --nbd-tls require, the default with a certificate)
    #[arg(long, value_name = "HOST:PORT")]
    pub nbd_listen: Option<String>,
    /// Server certificate (PEM, the chain from the server's own certificate up) for TLS
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Private key of --tls-cert (PEM; keep it mode 0600)
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<std::path::PathBuf>,
    /// CA certificate(s) (PEM) that sign client certificates: clients may then present one,
    /// and one not signed by this CA fails the TLS handshake. Without it no client certificate
    /// is asked for
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// NBD over TLS (NBD_OPT_STARTTLS): off, on (TLS for clients that ask, plaintext too) or
    /// require (TLS only). Default: require with --tls-cert, off without. Applies to the unix
    /// socket and --nbd-listen
    #[arg(long, value_name = "MODE", value_enum)]
    pub nbd_tls: Option<crate::tls::NbdTlsMode>,
    /// Serve Prometheus metrics (GET /metrics) over HTTP on this loopback address (e.g.
    /// 127.0.0.1:9100). Default: off. Other addresses are refused: the endpoint has no TLS or
    /// authentication. See docs/METRICS.md
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    /// Most NBD client connections at once, over all listeners; more are closed at once
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Time a new NBD connection has to finish its handshake (e.g. 10s, 500ms)
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub handshake_timeout: String,
    /// Create this volume (NAME:SIZE, e.g. disk0:10G) if it does not exist
    #[arg(long)]
    pub default_volume: Option<String>,
    /// Let this group's members use the sockets (NBD and control API): they become group
    /// GROUP (mode 0660) and DIR group-searchable (0710). Default: the daemon's user only
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Also serve the control API over HTTPS on this address (e.g. 127.0.0.1:8443 or
    /// 0.0.0.0:8443), for callers with an API token (snapblk token create). Needs --tls-cert
    /// and --tls-key. Default: off, the control socket DIR/control.sock only
    #[arg(long, value_name = "HOST:PORT")]
    pub api_listen: Option<String>,
    /// Serve the EBS direct APIs (ListSnapshotBlocks, ListChangedBlocks, GetSnapshotBlock,
    /// StartSnapshot, PutSnapshotBlock, CompleteSnapshot; for coldsnap and `aws ebs`) on this
    /// address, signed with the access keys of snapblk.toml's [ebs_api]. Over HTTPS with
    /// --tls-cert/--tls-key; without them on a loopback address only. Default: off
    #[arg(long, value_name = "HOST:PORT")]
    pub ebs_listen: Option<String>,
}

/// Reports a failed command and exits with its class's code: `error: SENTENCE` on stderr, or
/// with `--json` the object `{"error": {"code", "message"}}` on stdout (and the sentence on
/// stderr too, for a person watching).
pub fn fail(json: bool, e: &ClientError) -> ! {
    if json {
        let doc = serde_json::json!({ "error": { "code": e.code(), "message": e.to_string() } });
        out(&format!("{}\n", serde_json::to_string_pretty(&doc).unwrap_or_default()));
    }
    eprintln!("error: {e}");
    std::process::exit(e.exit_code())
}

/// Left-aligned columns.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l: String = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}  ")).collect();
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// Writes to stdout. A reader that went away (`snapblk ... | head`) is not an error: the
/// output is simply not wanted any more.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes()).and_then(|()| std::io::stdout().flush());
}

async fn get<T: DeserializeOwned>(c: &Client, path: &str) -> Result<T, ClientError> {
    send(c, Method::GET, path, None::<&()>).await
}

async fn send<T: DeserializeOwned>(
    c: &Client,
    method: Method,
    path: &str,
    body: Option<&impl Serialize>,
) -> Result<T, ClientError> {
    c.call(method, path, body).await?.ok_or_else(|| ClientError::Transport("the daemon sent no answer".into()))
}

async fn delete(c: &Client, path: &str) -> Result<(), ClientError> {
    c.call::<serde_json::Value>(Method::DELETE, path, None::<&()>).await.map(|_| ())
}

fn size_arg(s: &str) -> Result<u64, ClientError> {
    parse_size(s).map_err(ClientError::Usage)
}

/// Progress of a long command, on stderr (stdout holds only the result):
/// - on a terminal, one line rewritten in place (`\r`);
/// - otherwise (a log, a pipe), a line when the work starts or ends and at most one every
///   [`Progress::EVERY`] in between, never the same line twice;
/// - with `--json`, the same lines as JSON objects (`{"progress", "done", "total", "rate"}`).
struct Progress {
    label: String,
    json: bool,
    tty: bool,
    last: Option<(std::time::Instant, u64, u64)>,
}

impl Progress {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    fn new(json: bool, label: impl Into<String>) -> Progress {
        let tty = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
        Progress { label: label.into(), json, tty, last: None }
    }

    fn show(&mut self, done: u64, total: u64, rate: u64) {
        // Off a terminal: a line when something changed and (after the first) EVERY has passed.
        if let (false, Some((at, d, t))) = (self.tty, self.last) {
            if (d, t) == (done, total) || at.elapsed() < Self::EVERY {
                return;
            }
        }
        self.emit(done, total, rate);
    }

    fn emit(&mut self, done: u64, total: u64, rate: u64) {
        use std::io::Write;
        self.last = Some((std::time::Instant::now(), done, total));
        let line = match (self.json, (done.min(total) * 100).checked_div(total)) {
            (true, _) => {
                serde_json::json!({ "progress": self.label, "done": done, "total": total, "rate": rate }).to_string()
            }
            (false, None) => format!("{}: starting", self.label),
            (false, Some(pct)) => {
                let bar: String = (0..30).map(|i| if i * 100 < pct * 30 { '#' } else { '.' }).collect();
                format!("{} [{bar}] {pct:3}% {} of {} ({}/s)", self.label, human(done), human(total), human(rate))
            }
        };
        if self.tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    }

    /// The work ended: its last line (if it changed), and the end of the rewritten line.
    fn finish(mut self, done: u64, total: u64, rate: u64) {
        if self.last.is_none() {
            return; // ended before anything was shown: the result says it all
        }
        if self.last.is_some_and(|(_, d, t)| (d, t) != (done, total)) {
            self.emit(done, total, rate);
        }
        if self.tty {
            eprintln!();
        }
    }
}

const POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Polls a job until it ends, showing progress; returns its result.
async fn wait_job<T: DeserializeOwned>(
    c: &Client,
    json: bool,
    mut job: JobView,
    label: &str,
) -> Result<T, ClientError> {
    let mut progress = Progress::new(json, label);
    while job.state == "running" {
        progress.show(job.done, job.total, job.rate);
        tokio::time::sleep(POLL).await;
        job = get(c, &Client::path(&["jobs", &job.id.to_string()])).await?;
    }
    if job.state == "done" {
        progress.finish(job.total, job.total, job.rate);
    } else {
        progress.finish(job.done, job.total, job.rate);
    }
    match (job.result, job.error) {
        (Some(v), _) => serde_json::from_value(v).map_err(|e| ClientError::Transport(e.to_string())),
        (None, e) => Err(ClientError::refused(job.error_kind, e.unwrap_or_else(|| format!("{label} failed")))),
    }
}

/// What a command prints: its result as JSON with `--json`, else as text.
struct Printed {
    json: String,
    text: String,
}

impl Printed {
    fn new(value: &impl Serialize, text: String) -> Printed {
        Printed { json: serde_json::to_string_pretty(value).unwrap_or_default() + "\n", text }
    }

    /// A sentence, or with `--json` the same facts as an object.
    fn message(sentence: String, value: serde_json::Value) -> Printed {
        Printed { json: serde_json::to_string_pretty(&value).unwrap_or_default() + "\n", text: sentence + "\n" }
    }

    fn print(self, json: bool) {
        out(if json { &self.json } else { &self.text });
    }
}

/// Runs a client command against the daemon in `dir` and prints its result.
pub async fn run(c: Client, json: bool, command: Command) -> Result<(), ClientError> {
    let printed = match command {
        Command::Serve(_) => return Err(ClientError::Usage("serve is not a client command".into())),
        Command::Status => {
            let s: StatusView = get(&c, &Client::path(&["status"])).await?;
            let d = &s.daemon;
            let mut text = format!(
                "version:    {}\ndir:        {}\npid:        {}\nnbd socket: {}\nnbd tcp:    {}\nupload:     {}\n",
                d.version,
                d.dir.display(),
                d.pid,
                d.nbd_socket.display(),
                d.nbd_tcp.as_deref().unwrap_or("off"),
                if s.upload { "on (every snapshot when taken)" } else { "off ([upload] enabled = false)" }
            );
            for (region, n) in &s.store_deletes_pending {
                text.push_str(&format!(
                    "pending:    {n} deleted snapshot(s) still to delete from region {region} (retried every second)\n"
                ));
            }
            Printed::new(&s, text)
        }
        Command::Account(a) => accounts::account(&c, a).await?,
        Command::Token(t) => accounts::token(&c, t).await?,
        Command::Volume(v) => volumes::run(&c, json, v).await?,
        Command::Snapshot(s) => snapshots::run(&c, json, s).await?,
        Command::Region(r) => regions::run(&c, r).await?,
        Command::Gc { region, grace } => regions::gc(&c, json, region, grace).await?,
        Command::Key(k) => regions::key(&c, k).await?,
        Command::Policy(p) => policies::run(&c, p).await?,
        Command::Group(g) => groups::run(&c, g).await?,
        Command::Image(i) => images::run(&c, json, i).await?,
        Command::Copy(cmd) => copies::run(&c, cmd).await?,
        Command::RecycleBin(b) => lifecycle::bin(&c, b).await?,
        Command::Events { follow, limit } => lifecycle::events(&c, json, follow, limit).await?,
    };
    printed.print(json);
    Ok(())
}
