//! `snapblk volume ...`: create, list, show, delete, clone, hydrate, attach, detach.

use clap::Subcommand;
use hyper::Method;

use super::{delete, get, send, size_arg, table, Client, ClientError, Printed, Progress, POLL};
use crate::attach::{AttachKind, AttachRequest, Attachment};
use crate::engine::MAX_VOLUME_SIZE;
use crate::service::{CloneSnapshot, CreateVolume, VolumeView};
use crate::units::{human, utc};

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
    /// A volume's snapshot quotas and task limits, and where it stands
    Quota { volume: String },
    /// Delete a volume (refused while it has clients or snapshots taken by hand; policies'
    /// snapshots of it go with it or stay, as each policy's --on-volume-delete says)
    Delete { volume: String },
    /// Create a volume from a snapshot, sharing unchanged data
    Clone { snapshot: String, new_name: String },
    /// Create one volume per disk of an image (PREFIX + disk name: web1-root, web1-data1, ...),
    /// each usable at once
    CreateFromImage {
        image: String,
        #[arg(long)]
        prefix: String,
    },
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

pub(super) async fn run(c: &Client, json: bool, command: VolumeCommand) -> Result<Printed, ClientError> {
    let p = Client::path;
    Ok(match command {
        VolumeCommand::Create { name, size, cluster_size, from_snapshot, region } => {
            let cluster_size = match cluster_size {
                Some(cs) => Some(
                    u32::try_from(size_arg(&cs)?)
                        .map_err(|_| ClientError::Usage(format!("cluster size {cs} is too large; use at most 1M")))?,
                ),
                None => None,
            };
            let size = match size.as_deref() {
                Some(typed) => Some(size_arg(typed).and_then(|bytes| match bytes {
                    0 => Err(ClientError::Usage(format!("--size {typed}: a volume needs at least 4 KiB"))),
                    b if b > MAX_VOLUME_SIZE => Err(ClientError::Usage(format!(
                        "--size {typed} is too large: the largest volume is {}",
                        human(MAX_VOLUME_SIZE)
                    ))),
                    b => Ok(b),
                })?),
                None => None,
            };
            let body = CreateVolume { name, size, cluster_size, region, from_snapshot };
            volume(send(c, Method::POST, &p(&["volumes"]), Some(&body)).await?)
        }
        VolumeCommand::Hydrate { volume: name, wait } => {
            let view = send(c, Method::POST, &p(&["volumes", &name, "hydrate"]), None::<&()>).await?;
            volume(if wait { wait_hydration(c, json, view).await? } else { view })
        }
        VolumeCommand::List => {
            let vs: Vec<VolumeView> = get(c, &p(&["volumes"])).await?;
            let text = volume_table(&vs);
            Printed::new(&vs, text)
        }
        VolumeCommand::Show { volume: name } => volume(get(c, &p(&["volumes", &name])).await?),
        VolumeCommand::Quota { volume } => super::lifecycle::quota(c, &volume).await?,
        VolumeCommand::CreateFromImage { image, prefix } => super::images::deploy(c, &image, prefix).await?,
        VolumeCommand::Delete { volume } => {
            delete(c, &p(&["volumes", &volume])).await?;
            Printed::message(format!("deleted volume {volume}"), serde_json::json!({ "deleted": volume }))
        }
        VolumeCommand::Clone { snapshot, new_name } => {
            let body = CloneSnapshot { name: new_name };
            volume(send(c, Method::POST, &p(&["snapshots", &snapshot, "clone"]), Some(&body)).await?)
        }
        VolumeCommand::Attach { volume, ublk, nbd, queues, depth, logical_block_size } => {
            let logical_block_size = match logical_block_size {
                Some(s) => Some(u32::try_from(size_arg(&s)?).map_err(|_| {
                    ClientError::Usage(format!("logical block size {s} is too large; use 512 to 4096"))
                })?),
                None => None,
            };
            let (kind, device) = match (ublk, nbd) {
                (true, _) => (AttachKind::Ublk, None),
                (false, Some(dev)) => (AttachKind::Nbd, Some(dev).filter(|d| !d.is_empty())),
                (false, None) => {
                    return Err(ClientError::Usage("say how to attach: --ublk or --nbd [/dev/nbdN]".into()))
                }
            };
            let body = AttachRequest { kind: Some(kind), device, queues, depth, logical_block_size };
            let a: Attachment = send(c, Method::POST, &p(&["volumes", &volume, "attach"]), Some(&body)).await?;
            let text = format!("{}\n", a.device.display());
            Printed::new(&a, text)
        }
        VolumeCommand::Detach { volume } => {
            let a: Attachment = send(c, Method::POST, &p(&["volumes", &volume, "detach"]), None::<&()>).await?;
            Printed::message(
                format!("detached volume {volume} from {}", a.device.display()),
                serde_json::to_value(&a).unwrap_or_default(),
            )
        }
    })
}

/// A volume, as `volume show` prints it.
pub(super) fn volume(view: VolumeView) -> Printed {
    let text = volume_lines(&view);
    Printed::new(&view, text)
}

fn volume_table(vs: &[VolumeView]) -> String {
    table(
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
    )
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
        let how = match h.state.as_str() {
            "loading" => {
                let eta = h.eta_secs.map_or(String::new(), |e| format!(", about {e}s left"));
                format!("loading in the background at {}/s{eta}", human(h.rate))
            }
            "retrying" => "retrying: the store is failing".to_string(),
            _ => "loading only what is read; load the rest with: snapblk volume hydrate NAME".to_string(),
        };
        s.push_str(&format!(
            "loading:      {} of {} from snapshot {} in region {} ({how})\n",
            human(h.bytes_loaded),
            human(h.bytes_total),
            h.source,
            h.region,
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

/// Waits until a volume has loaded all its data from the store, showing progress.
async fn wait_hydration(c: &Client, json: bool, mut view: VolumeView) -> Result<VolumeView, ClientError> {
    let mut progress = Progress::new(json, format!("loading {}", view.info.name));
    let mut last = (0, 0);
    while let Some(h) = &view.hydration {
        progress.show(h.bytes_loaded, h.bytes_total, h.rate);
        last = (h.bytes_total, h.rate);
        tokio::time::sleep(POLL).await;
        view = get(c, &Client::path(&["volumes", &view.info.id])).await?;
    }
    progress.finish(last.0, last.0, last.1);
    Ok(view)
}
