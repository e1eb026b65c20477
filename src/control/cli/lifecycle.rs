//! `snapblk recycle-bin ...`, `snapblk snapshot restore-deleted`, `snapblk volume quota` and
//! `snapblk events`.

use clap::Subcommand;
use hyper::Method;

use super::{get, out, send, table, Client, ClientError, Printed};
use crate::service::{BinView, EventRecord, PurgeRequest, QuotaView};
use crate::units::{duration_text, utc};

#[derive(Subcommand, Debug)]
pub enum BinCommand {
    /// List the deleted snapshots the bin holds, and how it is set
    List,
    /// Delete snapshots in the bin for good: one (VOLUME@SNAPSHOT or id), or all
    Purge {
        snapshot: Option<String>,
        /// Purge everything in the bin
        #[arg(long, conflicts_with = "snapshot")]
        all: bool,
    },
    /// Lock the bin: nothing leaves it before its time until an unlock takes effect
    Lock,
    /// Request an unlock; it takes effect after unlock_delay
    Unlock,
}

pub(super) async fn bin(c: &Client, command: BinCommand) -> Result<Printed, ClientError> {
    let p = Client::path;
    let view: BinView = match command {
        BinCommand::List => get(c, &p(&["recycle-bin"])).await?,
        BinCommand::Purge { snapshot, all } => {
            if snapshot.is_none() && !all {
                return Err(ClientError::Usage(
                    "name the snapshot to purge (VOLUME@SNAPSHOT or id), or purge everything with --all".into(),
                ));
            }
            let purged: Vec<String> =
                send(c, Method::POST, &p(&["recycle-bin", "purge"]), Some(&PurgeRequest { snapshot })).await?;
            let text = format!("purged {} snapshot(s) for good\n", purged.len());
            return Ok(Printed { json: serde_json::to_string_pretty(&purged).unwrap_or_default() + "\n", text });
        }
        BinCommand::Lock => send(c, Method::POST, &p(&["recycle-bin", "lock"]), None::<&()>).await?,
        BinCommand::Unlock => send(c, Method::POST, &p(&["recycle-bin", "unlock"]), None::<&()>).await?,
    };
    let mut text = match view.retention {
        0 => "recycle bin: off (deletes are final; set [recycle_bin] retention in snapblk.toml)\n".to_string(),
        r => format!("recycle bin: deleted snapshots kept {}\n", duration_text(r)),
    };
    if let Some(l) = &view.lock {
        text.push_str(&format!("locked since {}", utc(l.since)));
        match l.unlock_at {
            Some(t) => text.push_str(&format!("; unlocks at {}\n", utc(t))),
            None => text.push_str("; no unlock requested\n"),
        }
    }
    if !view.snapshots.is_empty() {
        text.push_str(&table(
            &["VOLUME", "NAME", "ID", "DELETED", "BY", "GONE FOR GOOD"],
            view.snapshots
                .iter()
                .map(|b| {
                    vec![
                        b.entry.volume.clone(),
                        b.entry.name.clone(),
                        b.id.clone(),
                        utc(b.entry.deleted_at),
                        b.entry.by.clone(),
                        utc(b.entry.expires_at),
                    ]
                })
                .collect(),
        ));
    }
    Ok(Printed::new(&view, text))
}

pub(super) async fn quota(c: &Client, volume: &str) -> Result<Printed, ClientError> {
    let q: QuotaView = get(c, &Client::path(&["volumes", volume, "quota"])).await?;
    let l = &q.quotas;
    let text = format!(
        "volume:               {}\nsnapshots by hand:    {} of {}\nsnapshots by policy:  {} of {} (at the limit: {})\ntasks in flight:      {} of {}\nmin snapshot interval: {}\n",
        q.volume,
        q.manual_snapshots,
        l.max_snapshots_manual,
        q.auto_snapshots,
        l.max_snapshots_auto,
        serde_json::to_value(l.on_limit).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        q.tasks,
        l.max_concurrent_tasks,
        if l.min_snapshot_interval == 0 { "none".into() } else { duration_text(l.min_snapshot_interval) }
    );
    Ok(Printed::new(&q, text))
}

fn event_line(r: &EventRecord) -> String {
    let v = serde_json::to_value(&r.event).unwrap_or_default();
    let kind = v.get("type").and_then(|t| t.as_str()).unwrap_or("event").replace('_', " ");
    let fields: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != "type")
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    format!("{}  #{}  {kind}: {}\n", utc(r.at), r.seq, fields.join(" "))
}

/// Prints the newest `limit` events; with `follow`, then each new one as it comes (one JSON
/// object per line with `--json`).
pub(super) async fn events(c: &Client, json: bool, follow: bool, limit: usize) -> Result<Printed, ClientError> {
    let path = |after: u64, wait: u64| format!("{}?after={after}&limit={limit}&wait={wait}", Client::path(&["events"]));
    let first: Vec<EventRecord> = get(c, &path(0, 0)).await?;
    if !follow {
        let text: String = first.iter().map(event_line).collect();
        return Ok(Printed::new(&first, text));
    }
    let show = |rs: &[EventRecord]| {
        for r in rs {
            out(&if json { serde_json::to_string(r).unwrap_or_default() + "\n" } else { event_line(r) });
        }
    };
    show(&first);
    let mut after = first.last().map_or(0, |r| r.seq);
    loop {
        let next: Vec<EventRecord> = get(c, &path(after, 30)).await?;
        show(&next);
        after = next.last().map_or(after, |r| r.seq);
    }
}
