//! `snapblk snapshot copy|archive|restore-archive` and `snapblk copy list|show|cancel`:
//! copies to other regions and the archive tier.

use clap::Subcommand;
use hyper::Method;

use super::{get, send, table, Client, ClientError, Printed, Progress, POLL};
use crate::service::{ArchiveAnswer, ArchiveRequest, CopyRequest, RestoreArchiveRequest};
use crate::store::copies::{CopyState, CopyView};
use crate::store::ThawReport;
use crate::units::{human, utc};

#[derive(Subcommand, Debug)]
pub enum CopyCommand {
    /// List copies and archives of snapshots (running and finished)
    List,
    /// Show a copy: state, bytes done and total, rate, time left
    Show { id: String },
    /// Cancel a running copy (what it stored is left to GC)
    Cancel { id: String },
}

pub(super) async fn run(c: &Client, command: CopyCommand) -> Result<Printed, ClientError> {
    let p = Client::path;
    Ok(match command {
        CopyCommand::List => {
            let cs: Vec<CopyView> = get(c, &p(&["copies"])).await?;
            let text = copy_table(&cs);
            Printed::new(&cs, text)
        }
        CopyCommand::Show { id } => copy_printed(get(c, &p(&["copies", &id])).await?),
        CopyCommand::Cancel { id } => {
            let v: CopyView = send(c, Method::POST, &p(&["copies", &id, "cancel"]), None::<&()>).await?;
            Printed::message(format!("cancelling copy {id}"), serde_json::to_value(&v).unwrap_or_default())
        }
    })
}

/// `snapshot copy`: starts the copy; with `wait`, follows it to its end.
pub(super) async fn copy(
    c: &Client,
    json: bool,
    snapshot: &str,
    req: CopyRequest,
    wait: bool,
) -> Result<Printed, ClientError> {
    let v: CopyView = send(c, Method::POST, &Client::path(&["snapshots", snapshot, "copy"]), Some(&req)).await?;
    Ok(copy_printed(if wait { wait_copy(c, json, v).await? } else { v }))
}

/// `snapshot archive`: the estimate, or the archive started (followed with `wait`).
pub(super) async fn archive(
    c: &Client,
    json: bool,
    snapshot: &str,
    req: ArchiveRequest,
    wait: bool,
) -> Result<Printed, ClientError> {
    let a: ArchiveAnswer =
        send(c, Method::POST, &Client::path(&["snapshots", snapshot, "archive"]), Some(&req)).await?;
    match (a.estimate, a.copy) {
        (Some(e), _) => {
            let text = format!(
                "archiving {} into region {} would add {} there and free {} in its standard region (logical size {})\n",
                e.snapshot,
                e.to_region,
                human(e.archive_bytes_added),
                human(e.standard_bytes_freed),
                human(e.logical_bytes)
            );
            Ok(Printed::new(&e, text))
        }
        (None, Some(v)) => Ok(copy_printed(if wait { wait_copy(c, json, v).await? } else { v })),
        (None, None) => Err(ClientError::Transport("the daemon answered neither an estimate nor a copy".into())),
    }
}

/// `snapshot restore-archive`: requests the thaw and shows its state; with `wait`, asks again
/// (1 s, then less and less often, up to every minute) until every object is readable.
pub(super) async fn restore_archive(
    c: &Client,
    json: bool,
    snapshot: &str,
    req: RestoreArchiveRequest,
    wait: bool,
) -> Result<Printed, ClientError> {
    let path = Client::path(&["snapshots", snapshot, "restore-archive"]);
    let mut report: ThawReport = send(c, Method::POST, &path, Some(&req)).await?;
    let mut pause = std::time::Duration::from_secs(1);
    let mut shown = None;
    let mut requested = report.requested;
    while wait && !report.ready {
        let line = thaw_counts(&report);
        if !json && shown.as_ref() != Some(&line) {
            eprintln!("thawing {snapshot}: {line}");
            shown = Some(line);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(60));
        report = send(c, Method::POST, &path, Some(&req)).await?;
        requested += report.requested;
    }
    report.requested = requested;
    let text = thaw_text(&report);
    Ok(Printed::new(&report, text))
}

/// The objects of a thaw by state, in a line.
fn thaw_counts(r: &ThawReport) -> String {
    let mut line = format!(
        "{} object(s){}: {} readable, {} in progress, {} frozen, {} need no thaw",
        r.objects,
        if r.complete { "" } else { " so far" },
        r.readable,
        r.in_progress,
        r.frozen,
        r.not_needed
    );
    if let Some(e) = r.earliest_expiry {
        line.push_str(&format!(" (restored ones readable until {} at least)", utc(e)));
    }
    line
}

fn thaw_text(r: &ThawReport) -> String {
    let class = r.storage_class.as_deref().map(|c| format!(", class {c}")).unwrap_or_default();
    let mut text = format!(
        "snapshot {} in region {}{class}
  {}
",
        r.snapshot,
        r.region,
        thaw_counts(r)
    );
    if r.requested > 0 {
        text.push_str(&format!(
            "  restores requested: {}
",
            r.requested
        ));
    }
    if r.ready && r.not_needed == r.objects {
        text.push_str(
            "  no object needs a thaw (their class, or this store, keeps them readable): restore it as from any region
",
        );
    } else if r.ready {
        text.push_str(
            "  ready: every object is readable; volumes made from it read and load now
",
        );
    } else {
        if !r.complete {
            text.push_str("  the packs holding its map pages come first; its data packs are requested once those are readable (run this again then, or use --wait)
");
        }
        text.push_str("  not ready: reads of its data fail until every object is readable; volumes made from it load by themselves then
");
    }
    text
}

/// Polls a copy until it ends, showing progress; a failed or cancelled copy is an error.
async fn wait_copy(c: &Client, json: bool, mut v: CopyView) -> Result<CopyView, ClientError> {
    let what = if v.record.kind == crate::store::copies::CopyKind::Archive { "archiving" } else { "copying" };
    let mut progress = Progress::new(json, format!("{what} {} to {}", v.record.source, v.record.dest_region));
    while !v.record.state.finished() {
        progress.show(v.record.bytes_done, v.record.bytes_total, v.rate);
        tokio::time::sleep(POLL).await;
        v = get(c, &Client::path(&["copies", &v.record.id])).await?;
    }
    progress.finish(v.record.bytes_done, v.record.bytes_total, v.rate);
    match v.record.state {
        CopyState::Done => Ok(v),
        CopyState::Cancelled => Err(ClientError::Failed(format!("copy {} was cancelled", v.record.id))),
        _ => Err(ClientError::Failed(format!(
            "copy {} failed: {}; start it again with the same command (what it stored is reused)",
            v.record.id,
            v.record.error.as_deref().unwrap_or("unknown reason")
        ))),
    }
}

fn state_name(s: CopyState) -> String {
    serde_json::to_value(s).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn copy_printed(v: CopyView) -> Printed {
    let r = &v.record;
    let mut text = format!(
        "copy {} ({}): {} ({}) → region {} as {} '{}'\n  state: {}",
        r.id,
        state_name_kind(r),
        r.source,
        r.source_id,
        r.dest_region,
        r.dest_id,
        r.name,
        state_name(r.state)
    );
    if !r.state.finished() && r.bytes_total > 0 {
        text.push_str(&format!(
            ", {} of {} ({}/s{})",
            human(r.bytes_done),
            human(r.bytes_total),
            human(v.rate),
            v.eta_secs.map(|s| format!(", about {s}s left")).unwrap_or_default()
        ));
    }
    text.push('\n');
    text.push_str(&format!("  read from the source: {}, stored: {}\n", human(r.bytes_read), human(r.bytes_sent)));
    if let Some(until) = r.retain_until {
        text.push_str(&format!("  minimum retention until {}\n", utc(until)));
    }
    if let Some(e) = &r.error {
        text.push_str(&format!("  error: {e}\n"));
    }
    if let Some(n) = &r.note {
        text.push_str(&format!("  {n}\n"));
    }
    Printed::new(&v, text)
}

fn state_name_kind(r: &crate::store::copies::CopyRecord) -> &'static str {
    match r.kind {
        crate::store::copies::CopyKind::Copy => "copy",
        crate::store::copies::CopyKind::Archive => "archive",
    }
}

fn copy_table(cs: &[CopyView]) -> String {
    table(
        &["ID", "KIND", "SOURCE", "TO", "NEW ID", "STATE", "DONE", "STORED"],
        cs.iter()
            .map(|v| {
                let r = &v.record;
                vec![
                    r.id.clone(),
                    state_name_kind(r).into(),
                    r.source.clone(),
                    r.dest_region.clone(),
                    r.dest_id.clone(),
                    state_name(r.state),
                    format!("{}/{}", human(r.bytes_done), human(r.bytes_total)),
                    human(r.bytes_sent),
                ]
            })
            .collect(),
    )
}
