//! `snapblk policy ...`: automatic snapshot policies, their retention, and the prune simulator
//! (which runs here, without a daemon).

use clap::{Args, Subcommand};
use hyper::Method;

use super::{delete, get, send, table, Client, ClientError, Printed};
use crate::policy::{Candidate, Missed, OnVolumeDelete, Overlap, Retention, Schedule};
use crate::service::{CreatePolicy, HistoryEntry, PolicyTarget, PolicyView, PolicyVolumes, PruneView};
use crate::units::{parse_duration, utc};

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Create a policy: a schedule (--at, --every or --cron) and a retention
    #[command(group = clap::ArgGroup::new("schedule").required(true).args(["at", "every", "cron"]))]
    Create {
        name: String,
        /// Local times of day, e.g. 02:00,14:00
        #[arg(long, value_delimiter = ',')]
        at: Vec<String>,
        /// With --at: the weekdays, e.g. mon-fri (default: every day)
        #[arg(long, value_delimiter = ',', requires = "at")]
        weekdays: Vec<String>,
        /// An interval of elapsed time, e.g. 4h, 30m, 1s
        #[arg(long)]
        every: Option<String>,
        /// With --every: the local time of day the series starts from (default 00:00)
        #[arg(long, requires = "every", default_value = "00:00")]
        start: String,
        /// A 5-field cron expression, e.g. '0 */6 * * *'
        #[arg(long)]
        cron: Option<String>,
        /// IANA time zone of the schedule and of retention's periods
        #[arg(long, default_value = "UTC")]
        tz: String,
        #[command(flatten)]
        retention: RetentionArgs,
        /// A tick that comes while the previous one still runs
        #[arg(long, value_enum, default_value = "skip")]
        overlap: Overlap,
        /// Ticks missed while the daemon was down
        #[arg(long, value_enum, default_value = "skip")]
        missed: Missed,
        /// Skip a tick when nothing was written since the volume's last snapshot
        #[arg(long)]
        skip_if_unchanged: bool,
        /// Prune only once the new snapshot's upload has completed
        #[arg(long)]
        after_upload: bool,
        /// Copy each snapshot to this region once uploaded (snapshot copy)
        #[arg(long)]
        copy_to: Option<String>,
        /// Archive the policy's snapshots once this old (e.g. 30d) into --archive-to
        #[arg(long, requires = "archive_to")]
        archive_after: Option<String>,
        /// The archive region (tier = "archive") for --archive-after
        #[arg(long, requires = "archive_after")]
        archive_to: Option<String>,
        /// When a volume is deleted, the snapshots this policy took of it: keep them, or
        /// delete them with it (into the recycle bin, when it is on)
        #[arg(long, value_enum, default_value = "keep")]
        on_volume_delete: OnVolumeDelete,
    },
    /// Apply a policy to volumes, or to consistency groups (a group snapshot per tick)
    Apply {
        policy: String,
        #[arg(required_unless_present = "groups")]
        volumes: Vec<String>,
        /// A consistency group (repeatable)
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// Remove a policy from volumes or groups (the snapshots it took stay)
    Remove {
        policy: String,
        #[arg(required_unless_present = "groups")]
        volumes: Vec<String>,
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// List policies
    List,
    /// Show a policy and where it stands on each volume
    Show { policy: String },
    /// Delete a policy (the snapshots it took stay)
    Delete { policy: String },
    /// One tick now: create, then prune (on one volume, or all of the policy's)
    RunNow { policy: String, volume: Option<String> },
    /// Every tick: taken, skipped (why) or failed (the error), and what retention removed
    History { policy: String, volume: Option<String> },
    /// Apply the policy's retention now (with --dry-run: show what it would keep and remove)
    Prune {
        policy: String,
        volume: Option<String>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Show which snapshots of a synthetic series each retention option keeps
    Simulate {
        #[command(flatten)]
        retention: RetentionArgs,
        /// The first snapshot's time, e.g. 2026-01-01T00:00:00Z
        #[arg(long)]
        from: String,
        /// Between two snapshots, e.g. 1h
        #[arg(long)]
        every: String,
        /// How many snapshots
        #[arg(long)]
        count: u32,
        /// Time zone of the periods (days, weeks, ...)
        #[arg(long, default_value = "UTC")]
        tz: String,
    },
}

#[derive(Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Keep the newest N snapshots
    #[arg(long)]
    keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours
    #[arg(long)]
    keep_hourly: Option<u32>,
    /// ... of each of the last N days
    #[arg(long)]
    keep_daily: Option<u32>,
    /// ... of each of the last N ISO weeks
    #[arg(long)]
    keep_weekly: Option<u32>,
    /// ... of each of the last N months
    #[arg(long)]
    keep_monthly: Option<u32>,
    /// ... of each of the last N years
    #[arg(long)]
    keep_yearly: Option<u32>,
    /// Keep every snapshot taken within this long before the newest one, e.g. 2d
    #[arg(long)]
    keep_within: Option<String>,
    /// Keep every snapshot younger than N days
    #[arg(long)]
    retention_days: Option<u32>,
    /// Never keep fewer than N snapshots
    #[arg(long)]
    min_count: Option<u32>,
}

impl RetentionArgs {
    fn retention(&self) -> Result<Retention, ClientError> {
        let keep_within = match &self.keep_within {
            Some(d) => Some(parse_duration(d).map_err(ClientError::Usage)?.as_secs()),
            None => None,
        };
        Ok(Retention {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within,
            retention_days: self.retention_days,
            min_count: self.min_count,
        })
    }
}

pub(super) async fn run(c: &Client, command: PolicyCommand) -> Result<Printed, ClientError> {
    let p = Client::path;
    Ok(match command {
        PolicyCommand::Create {
            name,
            at,
            weekdays,
            every,
            start,
            cron,
            tz,
            retention,
            overlap,
            missed,
            skip_if_unchanged,
            after_upload,
            copy_to,
            archive_after,
            archive_to,
            on_volume_delete,
        } => {
            let archive_after = archive_after
                .map(|a| parse_duration(&a).map(|d| d.as_secs()))
                .transpose()
                .map_err(ClientError::Usage)?;
            let schedule = match (every, cron) {
                (Some(e), _) => {
                    let every = parse_duration(&e).map_err(ClientError::Usage)?.as_secs();
                    Schedule::Every { every, start }
                }
                (None, Some(expr)) => Schedule::Cron { expr },
                (None, None) => Schedule::At { times: at, weekdays },
            };
            let body = CreatePolicy {
                name,
                schedule,
                tz,
                retention: retention.retention()?,
                overlap,
                missed,
                skip_if_unchanged,
                after_upload,
                on_volume_delete,
                copy_to,
                archive_after,
                archive_to,
            };
            policy(send(c, Method::POST, &p(&["policies"]), Some(&body)).await?)
        }
        PolicyCommand::Apply { policy: name, volumes, groups } => {
            let body = PolicyVolumes { volumes, groups };
            policy(send(c, Method::POST, &p(&["policies", &name, "apply"]), Some(&body)).await?)
        }
        PolicyCommand::Remove { policy: name, volumes, groups } => {
            let body = PolicyVolumes { volumes, groups };
            policy(send(c, Method::POST, &p(&["policies", &name, "remove"]), Some(&body)).await?)
        }
        PolicyCommand::List => {
            let ps: Vec<PolicyView> = get(c, &p(&["policies"])).await?;
            let text = table(
                &["NAME", "ID", "SCHEDULE", "RETENTION", "VOLUMES", "NEXT"],
                ps.iter()
                    .map(|v| {
                        vec![
                            v.policy.name.clone(),
                            v.policy.id.clone(),
                            v.schedule_text.clone(),
                            retention_text(&v.policy.retention),
                            v.on.iter().map(|o| o.volume.as_str()).collect::<Vec<_>>().join(","),
                            v.next_due.map_or("-".into(), utc),
                        ]
                    })
                    .collect(),
            );
            Printed::new(&ps, text)
        }
        PolicyCommand::Show { policy: name } => policy(get(c, &p(&["policies", &name])).await?),
        PolicyCommand::Delete { policy } => {
            delete(c, &p(&["policies", &policy])).await?;
            Printed::message(
                format!("deleted policy {policy}; the snapshots it took stay"),
                serde_json::json!({ "deleted": policy }),
            )
        }
        PolicyCommand::RunNow { policy, volume } => {
            let body = PolicyTarget { volume, dry_run: false };
            let entries: Vec<HistoryEntry> =
                send(c, Method::POST, &p(&["policies", &policy, "run"]), Some(&body)).await?;
            let text = history_table(&entries);
            Printed::new(&entries, text)
        }
        PolicyCommand::History { policy, volume } => {
            let mut path = p(&["policies", &policy, "history"]);
            if let Some(v) = volume {
                path = format!("{path}?volume={}", p(&[&v]).trim_start_matches("/v1/"));
            }
            let entries: Vec<HistoryEntry> = get(c, &path).await?;
            let text = history_table(&entries);
            Printed::new(&entries, text)
        }
        PolicyCommand::Prune { policy, volume, dry_run } => {
            let body = PolicyTarget { volume, dry_run };
            let verdicts: Vec<PruneView> =
                send(c, Method::POST, &p(&["policies", &policy, "prune"]), Some(&body)).await?;
            let text = table(
                &["VOLUME", "SNAPSHOT", "CREATED", if dry_run { "WOULD" } else { "DONE" }],
                verdicts
                    .iter()
                    .map(|v| vec![v.volume.clone(), v.snapshot.clone(), utc(v.created), verdict_text(v.verdict)])
                    .collect(),
            );
            Printed::new(&verdicts, text)
        }
        PolicyCommand::Simulate { retention, from, every, count, tz } => {
            simulate(&retention, &from, &every, count, &tz)?
        }
    })
}

/// The prune simulator: a series of `count` snapshots from `from`, one every `every`; what
/// retention keeps of it (relative to the last one), and why.
fn simulate(args: &RetentionArgs, from: &str, every: &str, count: u32, tz: &str) -> Result<Printed, ClientError> {
    let bad = ClientError::Usage;
    let start = from
        .parse::<jiff::Timestamp>()
        .map_err(|e| bad(format!("--from '{from}' is not a time such as 2026-01-01T00:00:00Z ({e})")))?
        .as_second();
    let step = parse_duration(every).map_err(bad)?.as_secs() as i64;
    if step == 0 || count == 0 {
        return Err(bad("--every and --count must be more than 0".into()));
    }
    let zone = jiff::tz::TimeZone::get(tz).map_err(|_| bad(format!("'{tz}' is not a known time zone")))?;
    let retention = args.retention()?;
    let series: Vec<Candidate> =
        (0..count as i64).map(|i| Candidate { id: i.to_string(), created: start + i * step, held: false }).collect();
    let now = start + (count as i64 - 1) * step;
    let local = |t: i64| zone.to_datetime(jiff::Timestamp::from_second(t).unwrap_or_default());
    let verdicts = retention.select(&series, now, local);
    let kept = verdicts.iter().filter(|(_, v)| v.keeps()).count();
    let rows: Vec<Vec<String>> =
        verdicts.iter().map(|(c, v)| vec![local(c.created).to_string(), verdict_text(*v)]).collect();
    let text =
        table(&["TIME", "VERDICT"], rows) + &format!("{kept} of {count} kept ({})\n", retention_text(&retention));
    let json: Vec<serde_json::Value> = verdicts
        .iter()
        .map(|(c, v)| serde_json::json!({ "time": local(c.created).to_string(), "verdict": v }))
        .collect();
    Ok(Printed::new(&json, text))
}

fn verdict_text(v: crate::policy::Verdict) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) if s == "remove" => "remove".into(),
        Ok(serde_json::Value::String(s)) => format!("keep ({s})"),
        _ => "?".into(),
    }
}

fn retention_text(r: &Retention) -> String {
    let mut parts = Vec::new();
    for (name, v) in [
        ("keep-last", r.keep_last),
        ("keep-hourly", r.keep_hourly),
        ("keep-daily", r.keep_daily),
        ("keep-weekly", r.keep_weekly),
        ("keep-monthly", r.keep_monthly),
        ("keep-yearly", r.keep_yearly),
        ("retention-days", r.retention_days),
        ("min-count", r.min_count),
    ] {
        if let Some(n) = v {
            parts.push(format!("{name} {n}"));
        }
    }
    if let Some(w) = r.keep_within {
        parts.push(format!("keep-within {}", crate::units::duration_text(w)));
    }
    if parts.is_empty() {
        "keep all".into()
    } else {
        parts.join(", ")
    }
}

fn history_table(entries: &[HistoryEntry]) -> String {
    table(
        &["TIME", "VOLUME", "OUTCOME", "SNAPSHOT", "REMOVED", "NOTE"],
        entries
            .iter()
            .map(|e| {
                vec![
                    utc(e.at),
                    e.volume.clone(),
                    format!("{:?}", e.outcome).to_lowercase(),
                    e.snapshot.clone().unwrap_or_else(|| "-".into()),
                    if e.removed.is_empty() { "-".into() } else { e.removed.join(",") },
                    e.reason.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    )
}

fn policy(v: PolicyView) -> Printed {
    let p = &v.policy;
    let mut text = format!(
        "name:       {}\nid:         {}\nschedule:   {}\nretention:  {}\noverlap:    {:?}\nmissed:     {:?}\nnext:       {}\n",
        p.name,
        p.id,
        v.schedule_text,
        retention_text(&p.retention),
        p.overlap,
        p.missed,
        v.next_due.map_or("-".into(), utc)
    );
    if p.skip_if_unchanged {
        text.push_str("skips ticks when nothing changed\n");
    }
    if p.after_upload {
        text.push_str("prunes after the upload\n");
    }
    if let Some(r) = &p.copy_to {
        text.push_str(&format!("copies each snapshot to region {r}\n"));
    }
    if let (Some(after), Some(r)) = (p.archive_after, &p.archive_to) {
        text.push_str(&format!(
            "archives its snapshots into region {r} once {} old\n",
            crate::units::duration_text(after)
        ));
    }
    for o in &v.on {
        text.push_str(&format!(
            "volume {}: {} snapshots, last attempt {}, last success {}\n",
            o.volume,
            o.snapshots,
            o.last_attempt.map_or("-".into(), utc),
            o.last_success.map_or("-".into(), utc)
        ));
    }
    Printed::new(&v, text)
}
