//! The `snapblk` command line. Every command except `serve` is a client of the daemon's API.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::{
    CloneSnapshot, CreateSnapshot, CreateVolume, ExportRequest, GcRequest, KeyFile, Rollback, SnapshotView, Status,
    VolumeView,
};
use super::client::{Client, ClientError};
use crate::attach::{AttachKind, AttachRequest, Attachment};
use crate::store::{ExportFormat, GcReport, JobView, RegionInfo, RegionSnapshot, UploadState, VerifyReport};
use crate::units::{human, parse_size, utc};

#[derive(Parser, Debug)]
#[command(name = "snapblk", version, about = "Block-device server with instant snapshots")]
pub struct Cli {
    /// The daemon's directory
    #[arg(long, global = true, env = "SNAPBLK_DIR")]
    pub dir: Option<PathBuf>,
    /// Print machine-readable JSON
    #[arg(long, global = true)]
    pub json: bool,
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
}

#[derive(Subcommand, Debug)]
pub enum RegionCommand {
    /// List configured regions
    List,
    /// Show a region: what it stores and the traffic since the daemon started
    Show { region: String },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Print the content of a new key file (to share one key between daemons)
    Generate,
    /// Print a region's key file, to back it up
    Export { region: String },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Also serve NBD over TCP, on this loopback address (e.g. 127.0.0.1:10809). Default: none,
    /// only the unix socket DIR/nbd.sock. Other addresses are refused: NBD is served without
    /// TLS or authentication yet
    #[arg(long, value_name = "HOST:PORT")]
    pub nbd_listen: Option<String>,
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
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume: empty (--size), or with a snapshot's content (--from-snapshot), usable
    /// at once while its data loads from the store
    #[command(group = clap::ArgGroup::new("what").required(true).args(["size", "from_snapshot"]))]
    Create {
        name: String,
        /// Size, e.g. 10G
        #[arg(long)]
        size: Option<String>,
        /// Cluster size, a power of two from 4K to 1M
        #[arg(long, conflicts_with = "from_snapshot")]
        cluster_size: Option<String>,
        /// VOLUME@SNAPSHOT, or a snapshot id (s-...) of this node or stored in a region
        #[arg(long, value_name = "REF")]
        from_snapshot: Option<String>,
        /// Home region for the volume's snapshots (default: local); with --from-snapshot, the
        /// region holding the snapshot (default: look in every region)
        #[arg(long)]
        region: Option<String>,
    },
    /// Load all of a volume's data from the store now (volumes created from a snapshot there)
    Hydrate {
        volume: String,
        /// Wait until everything is loaded, showing progress
        #[arg(long)]
        wait: bool,
    },
    /// List volumes
    List,
    /// Show a volume
    Show { volume: String },
    /// Delete a volume (refused while it has snapshots or clients)
    Delete { volume: String },
    /// Create a volume from a snapshot, sharing unchanged data
    Clone { snapshot: String, new_name: String },
    /// Attach a volume to the kernel as a block device (/dev/ublkbN or /dev/nbdN)
    #[command(group = clap::ArgGroup::new("how").required(true).args(["ublk", "nbd"]))]
    Attach {
        volume: String,
        /// Through ublk (/dev/ublkbN; needs the ublk_drv module)
        #[arg(long)]
        ublk: bool,
        /// Through the kernel NBD driver (needs the nbd module), optionally on this device
        #[arg(long, value_name = "/dev/nbdN", num_args = 0..=1, default_missing_value = "")]
        nbd: Option<String>,
        /// Hardware queues (ublk) or connections (NBD); default: one per CPU
        #[arg(long)]
        queues: Option<u16>,
        /// Requests in flight per queue (ublk only; default 64)
        #[arg(long)]
        depth: Option<u16>,
        /// Logical block size: 512, 1024, 2048 or 4096 (default 4096)
        #[arg(long)]
        logical_block_size: Option<String>,
    },
    /// Detach a volume from the kernel (unmount it first: I/O still in flight fails)
    Detach { volume: String },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot (instant)
    Create {
        volume: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Return only once the snapshot would survive a crash or power loss (otherwise it is
        /// durable a moment later, when the commit the daemon starts at once ends)
        #[arg(long)]
        durable: bool,
        /// Wait until the upload ends, showing progress
        #[arg(long)]
        wait: bool,
    },
    /// List snapshots, of one volume or all (or those stored in a region, by any node)
    List {
        volume: Option<String>,
        #[arg(long, conflicts_with = "volume")]
        region: Option<String>,
    },
    /// Show a snapshot (VOLUME@SNAPSHOT or id)
    Show { snapshot: String },
    /// Delete a snapshot
    Delete { snapshot: String },
    /// Roll a volume back to one of its snapshots
    Rollback {
        snapshot: String,
        /// Disconnect writable clients first
        #[arg(long)]
        force: bool,
    },
    /// Upload a snapshot now (automatic upload off), or retry a failed upload
    Upload {
        snapshot: String,
        /// Wait until the upload ends, showing progress
        #[arg(long)]
        wait: bool,
    },
    /// Re-read everything the snapshot needs from the store and check it
    Verify {
        snapshot: String,
        /// For a snapshot id stored in a region but not known locally
        #[arg(long)]
        region: Option<String>,
    },
    /// Write the snapshot's content to a file, reading only from the store
    Export {
        snapshot: String,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: FormatArg,
        #[arg(long)]
        region: Option<String>,
        /// Replace OUTPUT even if it is not a regular file (a symlink or a device node: the
        /// directory entry is replaced, nothing is written through it)
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    Raw,
    Qcow2,
}

/// Exit codes: 1 for a refused or failed command, 2 when no daemon answers.
pub fn exit_code(e: &ClientError) -> i32 {
    match e {
        ClientError::NoDaemon(_) => 2,
        _ => 1,
    }
}

enum Shown {
    Volume(VolumeView),
    Volumes(Vec<VolumeView>),
    Attachment(Attachment),
    Snapshot(SnapshotView),
    Snapshots(Vec<SnapshotView>),
    RegionSnapshots(Vec<RegionSnapshot>),
    Regions(Vec<String>),
    Region(RegionInfo),
    Verify(VerifyReport),
    Gc(Vec<GcReport>),
    Status(Status),
    Nothing(String),
}

fn volume_lines(view: &VolumeView) -> String {
    let v = &view.info;
    let mut s = format!(
        "name:         {}\nid:           {}\ncreated:      {}\nsize:         {} ({} bytes)\ncluster size: {}\nallocated:    {}\ndirty:        {} clusters\nsnapshots:    {}\nwriters:      {}\nregion:       {}\n",
        v.name,
        v.id,
        utc(v.created),
        human(v.size),
        v.size,
        human(v.cluster_size as u64),
        human(v.allocated_bytes),
        v.dirty_clusters,
        v.snapshots,
        v.writers,
        view.region
    );
    if let Some(o) = &v.origin {
        s.push_str(&format!("origin:       {o}\n"));
    }
    if let Some(a) = &view.attachment {
        s.push_str(&format!("attached:     {}\n", attachment_summary(a)));
    }
    if let Some(h) = &view.hydration {
        let eta = h.eta_secs.map_or(String::new(), |e| format!(", about {e}s left"));
        s.push_str(&format!(
            "loading:      {} of {} from {} in region {} ({}, {}/s{eta})\n",
            human(h.bytes_loaded),
            human(h.bytes_total),
            h.source,
            h.region,
            h.state,
            human(h.rate)
        ));
        if let Some(e) = &h.last_error {
            s.push_str(&format!("store error:  {e}\n"));
        }
    }
    s
}

fn attachment_summary(a: &Attachment) -> String {
    match a.kind {
        AttachKind::Ublk => format!(
            "{} (ublk, {} queues of depth {}, {} blocks)",
            a.device.display(),
            a.queues,
            a.depth,
            human(a.logical_block_size as u64)
        ),
        AttachKind::Nbd => format!(
            "{} (kernel NBD, {} connections, {} blocks)",
            a.device.display(),
            a.queues,
            human(a.logical_block_size as u64)
        ),
    }
}

/// One word (and detail) for a snapshot's store status.
fn upload_summary(v: &SnapshotView) -> String {
    match &v.upload {
        None => "-".into(),
        Some(u) => match u.state {
            UploadState::Uploading if u.bytes_total > 0 => format!(
                "uploading {}% ({} of {}, {}/s)",
                u.bytes_done * 100 / u.bytes_total,
                human(u.bytes_done),
                human(u.bytes_total),
                human(u.rate)
            ),
            UploadState::Uploading => "uploading".into(),
            UploadState::Available => format!("available in {} (+{})", u.region, human(u.added_bytes)),
            UploadState::Failed => format!("failed: {}", u.reason.as_deref().unwrap_or("unknown")),
        },
    }
}

fn snapshot_lines(v: &SnapshotView) -> String {
    let s = &v.info;
    format!(
        "name:        {}@{}\nid:          {}\nvolume:      {} ({})\ndescription: {}\ncreated:     {}\nsize:        {} ({} bytes)\nallocated:   {}\nchanged:     {} clusters since {}\nclones:      {}\nlocal data:  {}\ndurable:     {}\nstore:       {}\n",
        s.volume,
        s.name,
        s.id,
        s.volume,
        s.volume_id,
        s.description,
        utc(s.created),
        human(s.size),
        s.size,
        human(s.allocated_bytes),
        s.changed_clusters,
        s.parent.as_deref().unwrap_or("the beginning"),
        if s.clones.is_empty() { "-".to_string() } else { s.clones.join(", ") },
        if s.local { "yes" } else { "no (released after upload)" },
        if s.durable { "yes" } else { "not yet (committing)" },
        upload_summary(v)
    )
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

impl Shown {
    fn print(self, json: bool) {
        let value = |v: &dyn erased::Json| v.to_pretty();
        let text = match (&self, json) {
            (Shown::Volume(v), true) => value(v),
            (Shown::Volumes(v), true) => value(v),
            (Shown::Attachment(v), true) => value(v),
            (Shown::Snapshot(v), true) => value(v),
            (Shown::Snapshots(v), true) => value(v),
            (Shown::RegionSnapshots(v), true) => value(v),
            (Shown::Regions(v), true) => value(v),
            (Shown::Region(v), true) => value(v),
            (Shown::Verify(v), true) => value(v),
            (Shown::Gc(v), true) => value(v),
            (Shown::Status(v), true) => value(v),
            (Shown::Nothing(_), true) => String::new(),
            (Shown::Volume(v), false) => volume_lines(v),
            (Shown::Attachment(a), false) => format!("{}\n", a.device.display()),
            (Shown::Volumes(vs), false) => table(
                &["NAME", "ID", "SIZE", "CLUSTER", "ALLOCATED", "DIRTY", "SNAPSHOTS", "REGION", "ATTACHED"],
                vs.iter()
                    .map(|view| {
                        let v = &view.info;
                        vec![
                            v.name.clone(),
                            v.id.clone(),
                            human(v.size),
                            human(v.cluster_size as u64),
                            human(v.allocated_bytes),
                            v.dirty_clusters.to_string(),
                            v.snapshots.to_string(),
                            view.region.clone(),
                            view.attachment.as_ref().map_or("-".to_string(), |a| a.device.display().to_string()),
                        ]
                    })
                    .collect(),
            ),
            (Shown::Snapshot(s), false) => snapshot_lines(s),
            (Shown::Snapshots(ss), false) => table(
                &["VOLUME", "NAME", "ID", "CREATED", "SIZE", "CHANGED", "STORE"],
                ss.iter()
                    .map(|v| {
                        let s = &v.info;
                        vec![
                            s.volume.clone(),
                            s.name.clone(),
                            s.id.clone(),
                            utc(s.created),
                            human(s.size),
                            s.changed_clusters.to_string(),
                            upload_summary(v),
                        ]
                    })
                    .collect(),
            ),
            (Shown::RegionSnapshots(ss), false) => table(
                &["VOLUME", "NAME", "ID", "CREATED", "UPLOADED", "SIZE", "ADDED"],
                ss.iter()
                    .map(|s| {
                        vec![
                            s.volume.clone(),
                            s.name.clone(),
                            s.id.clone(),
                            utc(s.created),
                            utc(s.uploaded),
                            human(s.size),
                            human(s.added_bytes),
                        ]
                    })
                    .collect(),
            ),
            (Shown::Regions(rs), false) => rs.iter().map(|r| format!("{r}\n")).collect(),
            (Shown::Region(r), false) => format!(
                "name:       {}\nkind:       {}\nlocation:   {}\nformat:     {} ({})\nsnapshots:  {}\npacks:      {}\nstored:     {} ({} bytes)\ntraffic:    {} PUT ({}), {} GET ({}), {} retries, {} failures since start\n",
                r.name,
                r.kind,
                r.location,
                r.format,
                r.cipher,
                r.snapshots,
                r.packs,
                human(r.stored_bytes),
                r.stored_bytes,
                r.metrics.put_ops,
                human(r.metrics.put_bytes),
                r.metrics.get_ops,
                human(r.metrics.get_bytes),
                r.metrics.retries,
                r.metrics.failures
            ),
            (Shown::Verify(v), false) => {
                let mut t = format!(
                    "snapshot {} in region {}: {} pages, {} blobs, {} checked\n",
                    v.snapshot,
                    v.region,
                    v.pages,
                    v.blobs,
                    human(v.bytes)
                );
                for p in &v.problems {
                    t.push_str(&format!("PROBLEM: {p}\n"));
                }
                if v.problems.is_empty() {
                    t.push_str("ok: every object is present and verifies\n");
                }
                t
            }
            (Shown::Gc(rs), false) => rs
                .iter()
                .map(|r| {
                    format!(
                        "region {}: {} snapshots, {} packs; deleted {} packs ({}); {} stored, {} live; {} unreferenced packs kept (younger than the grace period)\n",
                        r.region,
                        r.manifests,
                        r.packs,
                        r.packs_deleted,
                        human(r.bytes_deleted),
                        human(r.stored_bytes),
                        human(r.live_bytes),
                        r.packs_young
                    )
                })
                .collect(),
            (Shown::Status(s), false) => format!(
                "version:    {}\ndir:        {}\npid:        {}\nnbd socket: {}\nnbd tcp:    {}\n",
                s.version,
                s.dir.display(),
                s.pid,
                s.nbd_socket.display(),
                s.nbd_tcp.as_deref().unwrap_or("off")
            ),
            (Shown::Nothing(msg), false) => format!("{msg}\n"),
        };
        if json && !text.is_empty() {
            out(&format!("{text}\n"));
        } else {
            out(&text);
        }
    }
}

/// Writes to stdout. A reader that went away (`snapblk ... | head`) is not an error: the
/// output is simply not wanted any more.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes()).and_then(|()| std::io::stdout().flush());
}

/// Pretty JSON for any serializable value, behind one object-safe trait.
mod erased {
    pub trait Json {
        fn to_pretty(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_pretty(&self) -> String {
            serde_json::to_string_pretty(self).unwrap_or_default()
        }
    }
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
    parse_size(s).map_err(ClientError::Api)
}

/// One progress line on stderr (`\r`-rewritten), or a JSON line on stdout with `--json`.
fn show_progress(json: bool, label: &str, done: u64, total: u64, rate: u64) {
    use std::io::Write;
    if json {
        out(&format!("{}\n", serde_json::json!({ "progress": label, "done": done, "total": total, "rate": rate })));
        return;
    }
    if total == 0 {
        eprint!("\r{label}: starting   ");
        let _ = std::io::stderr().flush();
        return;
    }
    let pct = (done.min(total) * 100 / total) as usize;
    let bar: String = (0..30).map(|i| if i * 100 < pct * 30 { '#' } else { '.' }).collect();
    eprint!("\r{label} [{bar}] {pct:3}% {} of {} ({}/s)   ", human(done), human(total), human(rate));
    let _ = std::io::stderr().flush();
}

const POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Polls a job until it ends, showing progress; returns its result.
async fn wait_job<T: DeserializeOwned>(
    c: &Client,
    json: bool,
    mut job: JobView,
    label: &str,
) -> Result<T, ClientError> {
    loop {
        match job.state.as_str() {
            "running" => {
                // With --json, stdout carries only the result.
                if !json {
                    show_progress(json, label, job.done, job.total, job.rate);
                }
                tokio::time::sleep(POLL).await;
                job = get(c, &Client::path(&["jobs", &job.id.to_string()])).await?;
            }
            state => {
                if !json {
                    if state == "done" {
                        show_progress(json, label, job.total, job.total, job.rate);
                    }
                    eprintln!();
                }
                return match (job.result, job.error) {
                    (Some(v), _) => serde_json::from_value(v).map_err(|e| ClientError::Transport(e.to_string())),
                    (None, e) => Err(ClientError::Api(e.unwrap_or_else(|| format!("{label} failed")))),
                };
            }
        }
    }
}

/// Waits for a snapshot's upload to end, showing progress; fails if the upload failed.
async fn wait_upload(c: &Client, json: bool, mut view: SnapshotView) -> Result<SnapshotView, ClientError> {
    let name = format!("{}@{}", view.info.volume, view.info.name);
    loop {
        let Some(u) = &view.upload else { return Ok(view) };
        match u.state {
            UploadState::Uploading => {
                show_progress(json, &format!("uploading {name}"), u.bytes_done, u.bytes_total, u.rate);
                tokio::time::sleep(POLL).await;
                view = get(c, &Client::path(&["snapshots", &view.info.id])).await?;
            }
            UploadState::Available => {
                if !json {
                    eprintln!();
                }
                return Ok(view);
            }
            UploadState::Failed => {
                if !json {
                    eprintln!();
                }
                return Err(ClientError::Api(format!(
                    "the upload of {name} failed: {}; retry with: snapblk snapshot upload {name}",
                    u.reason.as_deref().unwrap_or("unknown reason")
                )));
            }
        }
    }
}

/// Waits until a volume has loaded all its data from the store, showing progress.
async fn wait_hydration(c: &Client, json: bool, mut view: VolumeView) -> Result<VolumeView, ClientError> {
    let label = format!("loading {}", view.info.name);
    let mut shown = false;
    while let Some(h) = &view.hydration {
        show_progress(json, &label, h.bytes_loaded, h.bytes_total, h.rate);
        shown = true;
        tokio::time::sleep(POLL).await;
        view = get(c, &Client::path(&["volumes", &view.info.id])).await?;
    }
    if shown && !json {
        show_progress(json, &label, view.info.size, view.info.size, 0);
        eprintln!();
    }
    Ok(view)
}

/// Runs a client command against the daemon in `dir` and prints its result.
pub async fn run(dir: &std::path::Path, json: bool, command: Command) -> Result<(), ClientError> {
    let c = Client::new(dir);
    let p = Client::path;
    let shown = match command {
        Command::Serve(_) => return Err(ClientError::Api("serve is not a client command".into())),
        Command::Status => Shown::Status(get(&c, &p(&["status"])).await?),
        Command::Volume(v) => match v {
            VolumeCommand::Create { name, size, cluster_size, from_snapshot, region } => {
                let cluster_size = match cluster_size {
                    Some(cs) => Some(
                        u32::try_from(size_arg(&cs)?)
                            .map_err(|_| ClientError::Api(format!("cluster size {cs} is too large; use at most 1M")))?,
                    ),
                    None => None,
                };
                let size = size.as_deref().map(size_arg).transpose()?;
                let body = CreateVolume { name, size, cluster_size, region, from_snapshot };
                Shown::Volume(send(&c, Method::POST, &p(&["volumes"]), Some(&body)).await?)
            }
            VolumeCommand::Hydrate { volume, wait } => {
                let view = send(&c, Method::POST, &p(&["volumes", &volume, "hydrate"]), None::<&()>).await?;
                Shown::Volume(if wait { wait_hydration(&c, json, view).await? } else { view })
            }
            VolumeCommand::List => Shown::Volumes(get(&c, &p(&["volumes"])).await?),
            VolumeCommand::Show { volume } => Shown::Volume(get(&c, &p(&["volumes", &volume])).await?),
            VolumeCommand::Delete { volume } => {
                delete(&c, &p(&["volumes", &volume])).await?;
                Shown::Nothing(format!("deleted volume {volume}"))
            }
            VolumeCommand::Clone { snapshot, new_name } => {
                let body = CloneSnapshot { name: new_name };
                Shown::Volume(send(&c, Method::POST, &p(&["snapshots", &snapshot, "clone"]), Some(&body)).await?)
            }
            VolumeCommand::Attach { volume, ublk, nbd, queues, depth, logical_block_size } => {
                let logical_block_size = match logical_block_size {
                    Some(s) => Some(u32::try_from(size_arg(&s)?).map_err(|_| {
                        ClientError::Api(format!("logical block size {s} is too large; use 512 to 4096"))
                    })?),
                    None => None,
                };
                let (kind, device) = match (ublk, nbd) {
                    (true, _) => (AttachKind::Ublk, None),
                    (false, Some(dev)) => (AttachKind::Nbd, Some(dev).filter(|d| !d.is_empty())),
                    (false, None) => {
                        return Err(ClientError::Api("say how to attach: --ublk or --nbd [/dev/nbdN]".into()))
                    }
                };
                let body = AttachRequest { kind: Some(kind), device, queues, depth, logical_block_size };
                Shown::Attachment(send(&c, Method::POST, &p(&["volumes", &volume, "attach"]), Some(&body)).await?)
            }
            VolumeCommand::Detach { volume } => {
                let a: Attachment = send(&c, Method::POST, &p(&["volumes", &volume, "detach"]), None::<&()>).await?;
                Shown::Nothing(format!("detached volume {volume} from {}", a.device.display()))
            }
        },
        Command::Snapshot(s) => match s {
            SnapshotCommand::Create { volume, name, description, durable, wait } => {
                let body = CreateSnapshot { name, description, durable };
                let view = send(&c, Method::POST, &p(&["volumes", &volume, "snapshots"]), Some(&body)).await?;
                Shown::Snapshot(if wait { wait_upload(&c, json, view).await? } else { view })
            }
            SnapshotCommand::List { volume: _, region: Some(r) } => {
                Shown::RegionSnapshots(get(&c, &p(&["regions", &r, "snapshots"])).await?)
            }
            SnapshotCommand::List { volume, region: None } => {
                let mut path = p(&["snapshots"]);
                if let Some(v) = volume {
                    path = format!("{path}?volume={}", p(&[&v]).trim_start_matches("/v1/"));
                }
                Shown::Snapshots(get(&c, &path).await?)
            }
            SnapshotCommand::Show { snapshot } => Shown::Snapshot(get(&c, &p(&["snapshots", &snapshot])).await?),
            SnapshotCommand::Delete { snapshot } => {
                delete(&c, &p(&["snapshots", &snapshot])).await?;
                Shown::Nothing(format!("deleted snapshot {snapshot}"))
            }
            SnapshotCommand::Rollback { snapshot, force } => {
                let body = Rollback { force };
                Shown::Volume(send(&c, Method::POST, &p(&["snapshots", &snapshot, "rollback"]), Some(&body)).await?)
            }
            SnapshotCommand::Upload { snapshot, wait } => {
                let view = send(&c, Method::POST, &p(&["snapshots", &snapshot, "upload"]), None::<&()>).await?;
                Shown::Snapshot(if wait { wait_upload(&c, json, view).await? } else { view })
            }
            SnapshotCommand::Verify { snapshot, region } => {
                let mut path = p(&["snapshots", &snapshot, "verify"]);
                if let Some(r) = region {
                    path = format!("{path}?region={}", p(&[&r]).trim_start_matches("/v1/"));
                }
                let job = send(&c, Method::POST, &path, None::<&()>).await?;
                let report: VerifyReport = wait_job(&c, json, job, &format!("verifying {snapshot}")).await?;
                let failed = !report.problems.is_empty();
                let n = report.problems.len();
                Shown::Verify(report).print(json);
                if failed {
                    return Err(ClientError::Api(format!(
                        "snapshot {snapshot} has {n} problem(s) in the store (listed above); its data cannot be fully restored"
                    )));
                }
                return Ok(());
            }
            SnapshotCommand::Export { snapshot, output, format, region, force } => {
                let output = std::path::absolute(&output)
                    .map_err(|e| ClientError::Api(format!("bad output path {}: {e}", output.display())))?;
                let format = match format {
                    FormatArg::Raw => ExportFormat::Raw,
                    FormatArg::Qcow2 => ExportFormat::Qcow2,
                };
                let body = ExportRequest { output: output.clone(), format, region, force };
                let job = send(&c, Method::POST, &p(&["snapshots", &snapshot, "export"]), Some(&body)).await?;
                let _: serde_json::Value = wait_job(&c, json, job, &format!("exporting {snapshot}")).await?;
                Shown::Nothing(format!("exported {snapshot} to {}", output.display()))
            }
        },
        Command::Region(RegionCommand::List) => Shown::Regions(get(&c, &p(&["regions"])).await?),
        Command::Region(RegionCommand::Show { region }) => Shown::Region(get(&c, &p(&["regions", &region])).await?),
        Command::Gc { region, grace } => {
            let regions = match region {
                Some(r) => vec![r],
                None => get(&c, &p(&["regions"])).await?,
            };
            let mut reports = Vec::new();
            for r in regions {
                let body = GcRequest { grace: grace.clone() };
                let job = send(&c, Method::POST, &p(&["regions", &r, "gc"]), Some(&body)).await?;
                reports.push(wait_job(&c, json, job, &format!("gc {r}")).await?);
            }
            Shown::Gc(reports)
        }
        Command::Key(KeyCommand::Generate) => {
            out(&crate::store::crypto::new_key_file_text());
            return Ok(());
        }
        Command::Key(KeyCommand::Export { region }) => {
            let k: KeyFile = get(&c, &p(&["regions", &region, "key"])).await?;
            if !json {
                eprintln!("key file {} of region {}: keep this copy somewhere safe", k.path.display(), k.region);
            }
            out(&k.content);
            return Ok(());
        }
    };
    shown.print(json);
    Ok(())
}
