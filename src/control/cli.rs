//! The `snapblk` command line. Every command except `serve` is a client of the daemon's API.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::{CloneSnapshot, CreateSnapshot, CreateVolume, Rollback, Status, VolumeView};
use super::client::{Client, ClientError};
use super::size::{human, parse_size, utc};
use crate::attach::{AttachKind, AttachRequest, Attachment};
use crate::engine::SnapshotInfo;

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
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TCP address for NBD, or "none"
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: String,
    /// Create this volume (NAME:SIZE, e.g. disk0:10G) if it does not exist
    #[arg(long)]
    pub default_volume: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume
    Create {
        name: String,
        /// Size, e.g. 10G
        #[arg(long)]
        size: String,
        /// Cluster size, a power of two from 4K to 1M
        #[arg(long)]
        cluster_size: Option<String>,
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
    },
    /// List snapshots, of one volume or all
    List { volume: Option<String> },
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
    Snapshot(SnapshotInfo),
    Snapshots(Vec<SnapshotInfo>),
    Status(Status),
    Nothing(String),
}

fn volume_lines(view: &VolumeView) -> String {
    let v = &view.volume;
    let mut s = format!(
        "name:         {}\nid:           {}\ncreated:      {}\nsize:         {} ({} bytes)\ncluster size: {}\nallocated:    {}\ndirty:        {} clusters\nsnapshots:    {}\nwriters:      {}\n",
        v.name,
        v.id,
        utc(v.created),
        human(v.size),
        v.size,
        human(v.cluster_size as u64),
        human(v.allocated_bytes),
        v.dirty_clusters,
        v.snapshots,
        v.writers
    );
    if let Some(o) = &v.origin {
        s.push_str(&format!("origin:       {o}\n"));
    }
    if let Some(a) = &view.attachment {
        s.push_str(&format!("attached:     {}\n", attachment_summary(a)));
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

fn snapshot_lines(s: &SnapshotInfo) -> String {
    format!(
        "name:        {}@{}\nid:          {}\nvolume:      {} ({})\ndescription: {}\ncreated:     {}\nsize:        {}\nchanged:     {} clusters since {}\nclones:      {}\n",
        s.volume,
        s.name,
        s.id,
        s.volume,
        s.volume_id,
        s.description,
        utc(s.created),
        human(s.size),
        s.changed_clusters,
        s.parent.as_deref().unwrap_or("the beginning"),
        if s.clones.is_empty() { "-".to_string() } else { s.clones.join(", ") }
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
            (Shown::Status(v), true) => value(v),
            (Shown::Nothing(_), true) => String::new(),
            (Shown::Volume(v), false) => volume_lines(v),
            (Shown::Attachment(a), false) => format!("{}\n", a.device.display()),
            (Shown::Volumes(vs), false) => table(
                &["NAME", "ID", "SIZE", "CLUSTER", "ALLOCATED", "DIRTY", "SNAPSHOTS", "ATTACHED"],
                vs.iter()
                    .map(|view| {
                        let v = &view.volume;
                        vec![
                            v.name.clone(),
                            v.id.clone(),
                            human(v.size),
                            human(v.cluster_size as u64),
                            human(v.allocated_bytes),
                            v.dirty_clusters.to_string(),
                            v.snapshots.to_string(),
                            view.attachment.as_ref().map_or("-".to_string(), |a| a.device.display().to_string()),
                        ]
                    })
                    .collect(),
            ),
            (Shown::Snapshot(s), false) => snapshot_lines(s),
            (Shown::Snapshots(ss), false) => table(
                &["VOLUME", "NAME", "ID", "CREATED", "CHANGED", "DESCRIPTION"],
                ss.iter()
                    .map(|s| {
                        vec![
                            s.volume.clone(),
                            s.name.clone(),
                            s.id.clone(),
                            utc(s.created),
                            s.changed_clusters.to_string(),
                            s.description.clone(),
                        ]
                    })
                    .collect(),
            ),
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
        print!("{text}");
        if json && !text.is_empty() {
            println!();
        }
    }
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

/// Runs a client command against the daemon in `dir` and prints its result.
pub async fn run(dir: &std::path::Path, json: bool, command: Command) -> Result<(), ClientError> {
    let c = Client::new(dir);
    let p = Client::path;
    let shown = match command {
        Command::Serve(_) => return Err(ClientError::Api("serve is not a client command".into())),
        Command::Status => Shown::Status(get(&c, &p(&["status"])).await?),
        Command::Volume(v) => match v {
            VolumeCommand::Create { name, size, cluster_size } => {
                let cluster_size = match cluster_size {
                    Some(cs) => Some(
                        u32::try_from(size_arg(&cs)?)
                            .map_err(|_| ClientError::Api(format!("cluster size {cs} is too large; use at most 1M")))?,
                    ),
                    None => None,
                };
                let body = CreateVolume { name, size: size_arg(&size)?, cluster_size };
                Shown::Volume(send(&c, Method::POST, &p(&["volumes"]), Some(&body)).await?)
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
            SnapshotCommand::Create { volume, name, description } => {
                let body = CreateSnapshot { name, description };
                Shown::Snapshot(send(&c, Method::POST, &p(&["volumes", &volume, "snapshots"]), Some(&body)).await?)
            }
            SnapshotCommand::List { volume } => {
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
        },
    };
    shown.print(json);
    Ok(())
}
