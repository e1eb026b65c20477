//! `snapblk region ...`, `snapblk gc` and `snapblk key ...`: the object-store regions.

use clap::Subcommand;
use hyper::Method;

use super::{get, send, wait_job, Client, ClientError, Printed};
use crate::service::{GcRequest, KeyFile};
use crate::store::shared::ConditionalWrites;
use crate::store::{GcReport, RegionInfo};
use crate::units::human;

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
    /// Print a region's key file, to back it up; `ACCOUNT/REGION`: the account's key file
    /// (it wraps the account's repositories' keys; copy it to other nodes serving the account)
    Export { region: String },
}

pub(super) async fn run(c: &Client, command: RegionCommand) -> Result<Printed, ClientError> {
    let p = Client::path;
    Ok(match command {
        RegionCommand::List => {
            let rs: Vec<String> = get(c, &p(&["regions"])).await?;
            let text = rs.iter().map(|r| format!("{r}\n")).collect();
            Printed::new(&rs, text)
        }
        RegionCommand::Show { region } => {
            let r: RegionInfo = get(c, &p(&["regions", &region])).await?;
            let text = region_lines(&r);
            Printed::new(&r, text)
        }
    })
}

/// `snapblk gc [--region R] [--grace D]`: one GC job per region, in turn.
pub(super) async fn gc(
    c: &Client,
    json: bool,
    region: Option<String>,
    grace: Option<String>,
) -> Result<Printed, ClientError> {
    let p = Client::path;
    let regions = match region {
        Some(r) => vec![r],
        None => get(c, &p(&["regions"])).await?,
    };
    let mut reports: Vec<GcReport> = Vec::new();
    for r in regions {
        let body = GcRequest { grace: grace.clone() };
        let job = send(c, Method::POST, &p(&["regions", &r, "gc"]), Some(&body)).await?;
        reports.push(wait_job(c, json, job, &format!("gc {r}")).await?);
    }
    let text = reports.iter().map(gc_line).collect();
    Ok(Printed::new(&reports, text))
}

/// `snapblk key ...`: prints the key file itself (with `--json`, inside an object), a note on
/// stderr.
pub(super) async fn key(c: &Client, command: KeyCommand) -> Result<Printed, ClientError> {
    Ok(match command {
        KeyCommand::Generate => {
            let content = crate::store::crypto::new_key_file_text();
            Printed::new(&serde_json::json!({ "content": content }), content)
        }
        KeyCommand::Export { region } => {
            let k: KeyFile = get(c, &Client::path(&["regions", &region, "key"])).await?;
            eprintln!("key file {} of region {}: keep this copy somewhere safe", k.path.display(), k.region);
            let text = k.content.clone();
            Printed::new(&k, text)
        }
    })
}

fn region_lines(r: &RegionInfo) -> String {
    let conditional = match r.conditional_writes {
        ConditionalWrites::Enforced => "enforced (the GC lease is taken with a create-only write)",
        ConditionalWrites::NotEnforced => {
            "not enforced by this store (the GC lease is read back after a second; see README, \"Nodes sharing a region\")"
        }
    };
    let lease = match &r.gc_lease {
        Some(l) => format!("GC running on node {} until {}", l.node, crate::units::utc(l.expires)),
        None => "free".into(),
    };
    let referenced = match &r.accounting_error {
        Some(e) => format!("not counted: {e}"),
        None => format!(
            "{} ({} bytes; the rest is pack indexes, and data GC frees or keeps in packs it does not rewrite)",
            human(r.referenced_bytes),
            r.referenced_bytes
        ),
    };
    let tier = match &r.storage_class {
        Some(class) => format!("{} (packs in storage class {class})", r.tier.name()),
        None => r.tier.name().to_string(),
    };
    let mut text = format!(
        "name:       {}\nkind:       {}\nlocation:   {}\ntier:       {tier}\nformat:     {} ({})\nsnapshots:  {}\npacks:      {} ({} condemned: deleted by a GC after gc.delete_delay)\nstored:     {} ({} bytes)\nreferenced: {referenced}\ntraffic:    {} PUT ({}), {} GET ({}), {} retries, {} failures since start\nconditional writes: {conditional}\nGC lease:   {lease}\nthis node:  {}\n",
        r.name,
        r.kind,
        r.location,
        r.format,
        r.cipher,
        r.snapshots,
        r.packs,
        r.packs_condemned,
        human(r.stored_bytes),
        r.stored_bytes,
        r.metrics.put_ops,
        human(r.metrics.put_bytes),
        r.metrics.get_ops,
        human(r.metrics.get_bytes),
        r.metrics.retries,
        r.metrics.failures,
        r.node
    );
    if !r.volumes.is_empty() {
        text.push_str(
            "by volume (referenced: what its snapshots use; exclusive: what no other volume's snapshots use):\n",
        );
        let rows = r
            .volumes
            .iter()
            .map(|v| {
                vec![
                    v.volume.clone(),
                    v.volume_id.clone(),
                    v.snapshots.to_string(),
                    human(v.referenced_bytes),
                    human(v.exclusive_bytes),
                    human(v.added_bytes),
                ]
            })
            .collect();
        text.push_str(&super::table(&["VOLUME", "ID", "SNAPSHOTS", "REFERENCED", "EXCLUSIVE", "ADDED"], rows));
    }
    text
}

fn gc_line(r: &GcReport) -> String {
    format!(
        "region {}: {} snapshots, {} packs; deleted {} packs ({}); {} stored, {} live; {} unreferenced packs kept (younger than the grace period); {} newly condemned, {} waiting for gc.delete_delay\n",
        r.region,
        r.manifests,
        r.packs,
        r.packs_deleted,
        human(r.bytes_deleted),
        human(r.stored_bytes),
        human(r.live_bytes),
        r.packs_young,
        r.packs_condemned,
        r.packs_waiting
    )
}
