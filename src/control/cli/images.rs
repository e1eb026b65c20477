//! `snapblk image ...`: images (named sets of pinned snapshots), deploying them, exporting and
//! importing image files.

use std::path::PathBuf;

use clap::Subcommand;
use hyper::Method;

use super::{delete, get, send, table, wait_job, Client, ClientError, Printed};
use crate::service::{
    CreateImage, DeployImage, ExportImage, ExportManifest, ImageFormat, ImageView, ImportImage, ShareRequest,
    VolumeView,
};
use crate::store::shares::ImageGrant;
use crate::units::{human, utc};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Name a set of snapshots as an image (pinned: not deletable while the image exists)
    Create {
        name: String,
        /// The root disk's snapshot (VOLUME@SNAPSHOT or id)
        #[arg(long, conflicts_with = "from_group")]
        root: Option<String>,
        /// A data disk's snapshot (repeat for more, in order)
        #[arg(long)]
        data: Vec<String>,
        /// Every member of a group snapshot (GROUP@SNAPSHOT), the first the root
        #[arg(long)]
        from_group: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List images
    List,
    /// Show an image and its disks
    Show { image: String },
    /// Delete an image (its snapshots stay)
    Delete { image: String },
    /// Write each disk to a file (DISK.FORMAT) and manifest.json (disk, size, sha256) into a
    /// directory of the daemon's machine
    Export {
        image: String,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: FormatArg,
        /// Replace files of an earlier export
        #[arg(long)]
        force: bool,
    },
    /// Make volumes (NAME-root, NAME-data1, ...), their snapshots and an image from image
    /// files of the daemon's machine
    Import {
        name: String,
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        data: Vec<PathBuf>,
        /// raw, qcow2, vmdk or vhdx (default: detected)
        #[arg(long, default_value = "auto")]
        format: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Share an image (each disk's snapshot, uploaded) with another account, which can then
    /// deploy it on any node serving both: volume create-from-image OWNER/IMAGE --prefix P
    Share {
        image: String,
        #[arg(long)]
        with: String,
        #[arg(long)]
        expires: Option<String>,
    },
    /// End an image's share (volumes deployed before keep loading for the grace period)
    Unshare {
        image: String,
        #[arg(long)]
        with: String,
        #[arg(long, default_value = "24h")]
        grace: String,
    },
    /// Images other accounts share with yours (an administrator: --account)
    SharedWithMe {
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        region: Option<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
}

fn absolute(p: PathBuf) -> Result<PathBuf, ClientError> {
    std::path::absolute(&p).map_err(|e| ClientError::Usage(format!("bad path {}: {e}", p.display())))
}

pub(super) async fn run(c: &Client, json: bool, command: ImageCommand) -> Result<Printed, ClientError> {
    let p = Client::path;
    Ok(match command {
        ImageCommand::Create { name, root, data, from_group, description } => {
            let body = CreateImage { name, root, data, from_group, description };
            image(send(c, Method::POST, &p(&["images"]), Some(&body)).await?)
        }
        ImageCommand::List => {
            let is: Vec<ImageView> = get(c, &p(&["images"])).await?;
            let rows = is
                .iter()
                .map(|i| {
                    let disks: Vec<String> = i.disks.iter().map(|d| format!("{}={}", d.name, d.snapshot)).collect();
                    vec![i.name.clone(), utc(i.created), disks.join(" "), i.description.clone()]
                })
                .collect();
            let text = table(&["IMAGE", "CREATED", "DISKS", "DESCRIPTION"], rows);
            Printed::new(&is, text)
        }
        ImageCommand::Show { image: i } => image(get(c, &p(&["images", &i])).await?),
        ImageCommand::Delete { image: i } => {
            delete(c, &p(&["images", &i])).await?;
            Printed::message(format!("deleted image {i}"), serde_json::json!({ "deleted": i }))
        }
        ImageCommand::Export { image: i, output, format, force } => {
            let output = absolute(output)?;
            let format = match format {
                FormatArg::Raw => ImageFormat::Raw,
                FormatArg::Qcow2 => ImageFormat::Qcow2,
                FormatArg::Vmdk => ImageFormat::Vmdk,
                FormatArg::Vhdx => ImageFormat::Vhdx,
            };
            let body = ExportImage { output: output.clone(), format, force };
            let job = send(c, Method::POST, &p(&["images", &i, "export"]), Some(&body)).await?;
            let m: ExportManifest = wait_job(c, json, job, &format!("exporting image {i}")).await?;
            let rows = m
                .disks
                .iter()
                .map(|d| {
                    vec![d.disk.clone(), output.join(&d.file).display().to_string(), human(d.size), d.sha256.clone()]
                })
                .collect();
            let text = table(&["DISK", "FILE", "SIZE", "SHA256"], rows);
            Printed::new(&m, text)
        }
        ImageCommand::Share { image: i, with, expires } => {
            image(send(c, Method::POST, &p(&["images", &i, "shares"]), Some(&ShareRequest { with, expires })).await?)
        }
        ImageCommand::Unshare { image: i, with, grace } => {
            let path =
                format!("{}?grace={}", p(&["images", &i, "shares", &with]), p(&[&grace]).trim_start_matches("/v1/"));
            image(send(c, Method::DELETE, &path, None::<&()>).await?)
        }
        ImageCommand::SharedWithMe { account, region } => {
            let query: Vec<String> = [("account", account), ("region", region)]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| format!("{k}={}", p(&[&v]).trim_start_matches("/v1/"))))
                .collect();
            let mut path = p(&["images-shared-with-me"]);
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            let gs: Vec<ImageGrant> = get(c, &path).await?;
            let rows = gs
                .iter()
                .map(|g| {
                    let disks: Vec<String> = g.disks.iter().map(|(d, s)| format!("{d}={s}")).collect();
                    vec![g.image.clone(), g.owner.clone(), utc(g.granted_at), disks.join(" ")]
                })
                .collect();
            let text = table(&["IMAGE", "OWNER", "SHARED", "DISKS"], rows);
            Printed::new(&gs, text)
        }
        ImageCommand::Import { name, root, data, format, description } => {
            let root = absolute(root)?;
            let data = data.into_iter().map(absolute).collect::<Result<Vec<_>, _>>()?;
            let format = (format != "auto").then_some(format);
            let body = ImportImage { name: name.clone(), root, data, format, description };
            let job = send(c, Method::POST, &p(&["image-imports"]), Some(&body)).await?;
            let view: ImageView = wait_job(c, json, job, &format!("importing image {name}")).await?;
            image(view)
        }
    })
}

fn image(v: ImageView) -> Printed {
    let mut text =
        format!("name:        {}\ndescription: {}\ncreated:     {}\ndisks:\n", v.name, v.description, utc(v.created));
    for d in &v.disks {
        text.push_str(&format!("  {:<8} {} ({}, {})\n", d.name, d.snapshot, d.snapshot_id, human(d.size)));
    }
    Printed::new(&v, text)
}

/// `snapblk volume create-from-image IMAGE --prefix P`.
pub(super) async fn deploy(c: &Client, image: &str, prefix: String) -> Result<Printed, ClientError> {
    let vs: Vec<VolumeView> =
        send(c, Method::POST, &Client::path(&["images", image, "volumes"]), Some(&DeployImage { prefix })).await?;
    let names: Vec<&str> = vs.iter().map(|v| v.info.name.as_str()).collect();
    let text = format!("created {} from image {image}\n", names.join(", "));
    Ok(Printed::new(&vs, text))
}
