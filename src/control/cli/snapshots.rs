//! `snapblk snapshot ...`: create, list (here or in a region), show, delete, roll back,
//! upload, verify, export.

use std::path::PathBuf;

use clap::Subcommand;
use hyper::Method;

use super::volumes::volume;
use super::{delete, get, out, send, table, wait_job, Client, ClientError, Printed, Progress, POLL};
use crate::service::{
    ArchiveRequest, CopyRequest, CreateSnapshot, ExportRequest, HoldRequest, RestoreArchiveRequest, Rollback,
    ShareRequest, ShareView, SnapshotView, StatusView,
};
use crate::store::s3::ThawTier;
use crate::store::{ExportFormat, RegionSnapshot, UploadState, VerifyReport};
use crate::units::{human, plural, utc};

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
        /// Count what each uploaded snapshot takes in the store (referenced and exclusive
        /// bytes; reads manifests and map pages, never data). Without it, only counts made
        /// before are shown
        #[arg(long, conflicts_with = "region")]
        bytes: bool,
    },
    /// Show a snapshot (VOLUME@SNAPSHOT or id)
    Show { snapshot: String },
    /// Delete a snapshot
    Delete {
        snapshot: String,
        /// Delete a member of a group snapshot on its own (the group snapshot is then degraded),
        /// or one other nodes load from (its copy in the store stays until they let go); with
        /// --region, an archived snapshot before its minimum retention
        #[arg(long)]
        force: bool,
        /// Delete a snapshot stored only in this region (a copy, an archived snapshot), by id
        #[arg(long)]
        region: Option<String>,
    },
    /// Copy a snapshot to another region: a new snapshot there (its own id), restorable by
    /// any node of that region; only what the region does not hold yet is sent
    Copy {
        /// VOLUME@SNAPSHOT, or a snapshot id stored in a region
        snapshot: String,
        #[arg(long)]
        to_region: String,
        /// Where to read a snapshot that is not of this node
        #[arg(long)]
        from_region: Option<String>,
        /// The copy's name (default: the snapshot's)
        #[arg(long)]
        name: Option<String>,
        /// Bytes per second for this copy, e.g. 100M
        #[arg(long)]
        bandwidth_limit: Option<String>,
        /// Wait until the copy ends, showing progress
        #[arg(long)]
        wait: bool,
    },
    /// Archive a snapshot into an archive region (tier = "archive"): a copy that deduplicates
    /// against the volume's other archived snapshots; the standard copy is then deleted
    Archive {
        snapshot: String,
        #[arg(long)]
        to_region: String,
        #[arg(long)]
        from_region: Option<String>,
        /// Deleting the archived snapshot sooner needs --force (default: the region's
        /// min_retention)
        #[arg(long)]
        min_retention: Option<String>,
        /// Keep the standard copy
        #[arg(long)]
        keep_standard: bool,
        /// Only print the bytes the archive would add and the standard bytes it would free
        #[arg(long)]
        estimate: bool,
        #[arg(long)]
        bandwidth_limit: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// Thaw an archived snapshot whose storage class needs it (S3 Glacier Flexible Retrieval,
    /// Deep Archive; OSS Archive): request a restore of each frozen object it reads and show
    /// the state of them all. Run it again (or --wait) to follow; volumes made from it load
    /// by themselves once every object is readable
    RestoreArchive {
        /// Its id (s-...) in the archive region
        snapshot: String,
        /// The archive region
        #[arg(long)]
        region: String,
        /// Restored objects stay readable this many days (default 7)
        #[arg(long)]
        days: Option<u32>,
        /// How fast (and dear) the store thaws
        #[arg(long, value_enum, ignore_case = true, default_value = "standard")]
        tier: TierArg,
        /// Wait until every object is readable, showing the state
        #[arg(long)]
        wait: bool,
    },
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
    /// Hold a snapshot: nothing can delete it (by hand or by retention) until released
    Hold {
        snapshot: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Release a snapshot's hold
    ReleaseHold { snapshot: String },
    /// Share an uploaded snapshot with another account: it can create volumes from it on
    /// any node serving both accounts (by the snapshot's id)
    Share {
        snapshot: String,
        /// The account to share with
        #[arg(long)]
        with: String,
        /// End the share by itself after this long (e.g. 30d)
        #[arg(long)]
        expires: Option<String>,
    },
    /// End a share: no new volumes from it; volumes made from it before keep loading for the
    /// grace period, then reads of what they have not loaded fail
    Unshare {
        snapshot: String,
        #[arg(long)]
        with: String,
        /// How long volumes made from it keep loading
        #[arg(long, default_value = "24h")]
        grace: String,
    },
    /// The accounts a snapshot is shared with
    Shares { snapshot: String },
    /// Snapshots other accounts share with yours (an administrator: --account)
    SharedWithMe {
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        region: Option<String>,
    },
    /// Take a deleted snapshot back out of the recycle bin (with its volume, if deleted)
    RestoreDeleted {
        /// Its id (s-...) or VOLUME@SNAPSHOT, as `recycle-bin list` shows
        snapshot: String,
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
pub enum TierArg {
    Standard,
    Bulk,
    Expedited,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    Raw,
    Qcow2,
}

pub(super) async fn run(c: &Client, json: bool, command: SnapshotCommand) -> Result<Printed, ClientError> {
    let p = Client::path;
    Ok(match command {
        SnapshotCommand::Create { volume, name, description, durable, wait } => {
            let body = CreateSnapshot { name, description, durable };
            let view = send(c, Method::POST, &p(&["volumes", &volume, "snapshots"]), Some(&body)).await?;
            snapshot(if wait { wait_upload(c, json, view).await? } else { view })
        }
        SnapshotCommand::List { volume: _, region: Some(r), bytes: _ } => {
            let ss: Vec<RegionSnapshot> = get(c, &p(&["regions", &r, "snapshots"])).await?;
            let text = region_snapshot_table(&ss);
            Printed::new(&ss, text)
        }
        SnapshotCommand::List { volume, region: None, bytes } => {
            let mut query = Vec::new();
            if let Some(v) = volume {
                query.push(format!("volume={}", p(&[&v]).trim_start_matches("/v1/")));
            }
            if bytes {
                query.push("bytes=true".to_string());
            }
            let mut path = p(&["snapshots"]);
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            let ss: Vec<SnapshotView> = get(c, &path).await?;
            let text = snapshot_table(&ss);
            Printed::new(&ss, text)
        }
        SnapshotCommand::Show { snapshot: s } => snapshot(get(c, &p(&["snapshots", &s])).await?),
        SnapshotCommand::Delete { snapshot, force, region } => {
            let mut query = Vec::new();
            if force {
                query.push("force=true".to_string());
            }
            if let Some(r) = region {
                query.push(format!("region={}", p(&[&r]).trim_start_matches("/v1/")));
            }
            let path = p(&["snapshots", &snapshot]);
            delete(c, &if query.is_empty() { path } else { format!("{path}?{}", query.join("&")) }).await?;
            Printed::message(format!("deleted snapshot {snapshot}"), serde_json::json!({ "deleted": snapshot }))
        }
        SnapshotCommand::Copy { snapshot, to_region, from_region, name, bandwidth_limit, wait } => {
            let req = CopyRequest { to_region, from_region, name, bandwidth_limit };
            super::copies::copy(c, json, &snapshot, req, wait).await?
        }
        SnapshotCommand::Archive {
            snapshot,
            to_region,
            from_region,
            min_retention,
            keep_standard,
            estimate,
            bandwidth_limit,
            wait,
        } => {
            let req =
                ArchiveRequest { to_region, from_region, min_retention, keep_standard, estimate, bandwidth_limit };
            super::copies::archive(c, json, &snapshot, req, wait).await?
        }
        SnapshotCommand::RestoreArchive { snapshot, region, days, tier, wait } => {
            let tier = match tier {
                TierArg::Standard => ThawTier::Standard,
                TierArg::Bulk => ThawTier::Bulk,
                TierArg::Expedited => ThawTier::Expedited,
            };
            let req = RestoreArchiveRequest { region, days, tier };
            super::copies::restore_archive(c, json, &snapshot, req, wait).await?
        }
        SnapshotCommand::Rollback { snapshot, force } => {
            let body = Rollback { force };
            volume(send(c, Method::POST, &p(&["snapshots", &snapshot, "rollback"]), Some(&body)).await?)
        }
        SnapshotCommand::Upload { snapshot: s, wait } => {
            let view = send(c, Method::POST, &p(&["snapshots", &s, "upload"]), None::<&()>).await?;
            snapshot(if wait { wait_upload(c, json, view).await? } else { view })
        }
        SnapshotCommand::Verify { snapshot, region } => {
            let mut path = p(&["snapshots", &snapshot, "verify"]);
            if let Some(r) = region {
                path = format!("{path}?region={}", p(&[&r]).trim_start_matches("/v1/"));
            }
            let job = send(c, Method::POST, &path, None::<&()>).await?;
            let report: VerifyReport = wait_job(c, json, job, &format!("verifying {snapshot}")).await?;
            let problems = report.problems.len();
            if problems > 0 {
                if !json {
                    out(&verify_lines(&report));
                }
                return Err(ClientError::Failed(format!(
                    "snapshot {snapshot} has {problems} problem(s) in the store{}; its data cannot be fully restored",
                    if json { "" } else { " (listed above)" }
                )));
            }
            let text = verify_lines(&report);
            Printed::new(&report, text)
        }
        SnapshotCommand::Hold { snapshot: s, reason } => {
            let body = HoldRequest { reason };
            snapshot(send(c, Method::POST, &p(&["snapshots", &s, "hold"]), Some(&body)).await?)
        }
        SnapshotCommand::ReleaseHold { snapshot: s } => {
            snapshot(send(c, Method::DELETE, &p(&["snapshots", &s, "hold"]), None::<&()>).await?)
        }
        SnapshotCommand::Share { snapshot, with, expires } => {
            let body = ShareRequest { with, expires };
            shares(vec![send(c, Method::POST, &p(&["snapshots", &snapshot, "shares"]), Some(&body)).await?])
        }
        SnapshotCommand::Unshare { snapshot, with, grace } => {
            let path = format!(
                "{}?grace={}",
                p(&["snapshots", &snapshot, "shares", &with]),
                p(&[&grace]).trim_start_matches("/v1/")
            );
            shares(vec![send(c, Method::DELETE, &path, None::<&()>).await?])
        }
        SnapshotCommand::Shares { snapshot } => shares(get(c, &p(&["snapshots", &snapshot, "shares"])).await?),
        SnapshotCommand::SharedWithMe { account, region } => {
            let mut query = Vec::new();
            for (k, v) in [("account", account), ("region", region)] {
                if let Some(v) = v {
                    query.push(format!("{k}={}", p(&[&v]).trim_start_matches("/v1/")));
                }
            }
            let mut path = p(&["shared-with-me"]);
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            shares(get(c, &path).await?)
        }
        SnapshotCommand::RestoreDeleted { snapshot: s } => {
            snapshot(send(c, Method::POST, &p(&["snapshots", &s, "restore-deleted"]), None::<&()>).await?)
        }
        SnapshotCommand::Export { snapshot, output, format, region, force } => {
            let output = std::path::absolute(&output)
                .map_err(|e| ClientError::Usage(format!("bad output path {}: {e}", output.display())))?;
            let format = match format {
                FormatArg::Raw => ExportFormat::Raw,
                FormatArg::Qcow2 => ExportFormat::Qcow2,
            };
            let body = ExportRequest { output: output.clone(), format, region, force };
            let job = send(c, Method::POST, &p(&["snapshots", &snapshot, "export"]), Some(&body)).await?;
            let result: serde_json::Value = wait_job(c, json, job, &format!("exporting {snapshot}")).await?;
            let text = format!("exported {snapshot} to {}", output.display());
            Printed::message(text, serde_json::json!({ "exported": snapshot, "output": output, "result": result }))
        }
    })
}

fn shares(views: Vec<ShareView>) -> Printed {
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.snapshot_id.clone(),
                format!("{}@{}", v.volume, v.snapshot),
                v.owner.clone(),
                v.recipient.clone(),
                match (v.state.as_str(), v.grace_until) {
                    ("grace", Some(g)) => format!("grace until {}", utc(g)),
                    (state, _) => state.to_string(),
                },
                v.expires.map_or_else(|| "-".into(), utc),
            ]
        })
        .collect();
    let text = table(&["SNAPSHOT", "NAME", "OWNER", "SHARED WITH", "STATE", "EXPIRES"], rows);
    Printed::new(&views, text)
}

fn snapshot(view: SnapshotView) -> Printed {
    let text = snapshot_lines(&view);
    Printed::new(&view, text)
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
    let mut text = format!(
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
        s.parent_name.as_deref().or(s.parent.as_deref()).unwrap_or("the beginning"),
        if s.clones.is_empty() { "-".to_string() } else { s.clones.join(", ") },
        if s.local { "yes" } else { "no (released after upload)" },
        if s.durable { "yes" } else { "not yet (committing)" },
        upload_summary(v)
    );
    if let Some(b) = &v.storage {
        text.push_str(&format!(
            "in store:    {} referenced, {} exclusive (what deleting it would free), {} added by its upload\n",
            human(b.referenced_bytes),
            human(b.exclusive_bytes),
            human(b.added_bytes)
        ));
    }
    if let Some(h) = &v.hold {
        let why = if h.reason.is_empty() { String::new() } else { format!(": {}", h.reason) };
        text.push_str(&format!("held:        since {}{why}\n", utc(h.since)));
    }
    if !v.policies.is_empty() {
        text.push_str(&format!("policies:    {}\n", v.policies.join(", ")));
    }
    if let Some(g) = &v.group_snapshot {
        text.push_str(&format!("group:       {} ({})\n", g.name, g.id));
    }
    text
}

fn snapshot_table(ss: &[SnapshotView]) -> String {
    // The store columns only when something was counted (`--bytes`, or counted before).
    let counted = ss.iter().any(|v| v.storage.is_some());
    let mut head = vec!["VOLUME", "NAME", "ID", "CREATED", "SIZE", "CHANGED", "STORE"];
    if counted {
        head.extend(["REFERENCED", "EXCLUSIVE"]);
    }
    table(
        &head,
        ss.iter()
            .map(|v| {
                let s = &v.info;
                let mut row = vec![
                    s.volume.clone(),
                    s.name.clone(),
                    s.id.clone(),
                    utc(s.created),
                    human(s.size),
                    s.changed_clusters.to_string(),
                    upload_summary(v),
                ];
                if counted {
                    let bytes = |f: fn(&crate::store::SnapshotBytes) -> u64| {
                        v.storage.as_ref().map_or("-".into(), |b| human(f(b)))
                    };
                    row.push(bytes(|b| b.referenced_bytes));
                    row.push(bytes(|b| b.exclusive_bytes));
                }
                row
            })
            .collect(),
    )
}

fn region_snapshot_table(ss: &[RegionSnapshot]) -> String {
    table(
        &[
            "VOLUME",
            "NAME",
            "ID",
            "CREATED",
            "UPLOADED",
            "SIZE",
            "ALLOCATED",
            "ADDED",
            "COPY OF",
            "RETAIN UNTIL",
            "REFERENCED",
            "EXCLUSIVE",
        ],
        ss.iter()
            .map(|s| {
                vec![
                    s.volume.clone(),
                    s.name.clone(),
                    s.id.clone(),
                    utc(s.created),
                    utc(s.uploaded),
                    human(s.size),
                    human(s.allocated_bytes),
                    human(s.added_bytes),
                    match (&s.source_id, &s.source_region) {
                        (Some(id), Some(region)) => format!("{id} in {region}"),
                        _ => "-".into(),
                    },
                    s.retain_until.map_or_else(|| "-".into(), utc),
                    human(s.referenced_bytes),
                    human(s.exclusive_bytes),
                ]
            })
            .collect(),
    )
}

fn verify_lines(v: &VerifyReport) -> String {
    let mut t = match v.region.as_str() {
        "" => format!("snapshot {}: its copy in the store could not be found\n", v.snapshot),
        region => format!(
            "snapshot {} in region {region}: {}, {}, {} checked\n",
            v.snapshot,
            plural(v.pages, "page"),
            plural(v.blobs, "blob"),
            human(v.bytes)
        ),
    };
    for p in &v.problems {
        t.push_str(&format!("PROBLEM: {p}\n"));
    }
    if v.problems.is_empty() {
        t.push_str("ok: every object is present and verifies\n");
    }
    t
}

/// Waits for a snapshot's upload to end, showing progress; fails if the upload failed.
async fn wait_upload(c: &Client, json: bool, mut view: SnapshotView) -> Result<SnapshotView, ClientError> {
    let name = format!("{}@{}", view.info.volume, view.info.name);
    let mut progress = Progress::new(json, format!("uploading {name}"));
    loop {
        let Some(u) = &view.upload else {
            let status: StatusView = get(c, &Client::path(&["status"])).await?;
            if !status.upload {
                eprintln!(
                    "{name} is not uploaded: automatic upload is off ([upload] enabled = false in snapblk.toml); upload it with: snapblk snapshot upload {name} --wait"
                );
            }
            return Ok(view);
        };
        match u.state {
            UploadState::Uploading => {
                progress.show(u.bytes_done, u.bytes_total, u.rate);
                tokio::time::sleep(POLL).await;
                view = get(c, &Client::path(&["snapshots", &view.info.id])).await?;
            }
            UploadState::Available => {
                progress.finish(u.bytes_total, u.bytes_total, u.rate);
                return Ok(view);
            }
            UploadState::Failed => {
                progress.finish(u.bytes_done, u.bytes_total, u.rate);
                return Err(ClientError::Failed(format!(
                    "the upload of {name} failed: {}; retry with: snapblk snapshot upload {name}",
                    u.reason.as_deref().unwrap_or("unknown reason")
                )));
            }
        }
    }
}
