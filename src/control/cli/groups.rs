//! `snapblk group ...`: consistency groups and their group snapshots.

use clap::{Args, Subcommand};
use hyper::Method;

use super::{delete, get, send, table, Client, ClientError, Printed};
use crate::service::{
    CreateGroup, CreateGroupSnapshot, GroupMemberRequest, GroupSnapshotView, GroupView, RestoreGroup, Rollback,
    VolumeView,
};
use crate::store::format::GroupManifest;
use crate::units::{human, parse_duration, utc};

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a consistency group of volumes (1 to 64)
    Create {
        group: String,
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// Add a volume to a group
    Add { group: String, volume: String },
    /// Take a volume out of a group
    Remove { group: String, volume: String },
    /// List groups
    List,
    /// Show a group: its members and group snapshots
    Show { group: String },
    /// Delete a group (its volumes and their snapshots stay)
    Delete { group: String },
    /// Take a snapshot of every member at one instant (GROUP --name NAME), or list, show
    /// and delete group snapshots
    Snapshot(GroupSnapshotArgs),
    /// New volumes from a group snapshot (GROUP@SNAPSHOT or g-…), one per member, named
    /// PREFIX + the member's name; from a region when this node does not have it
    Restore {
        snapshot: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        region: Option<String>,
    },
    /// Roll every member back to a group snapshot (GROUP@SNAPSHOT), all or none
    Rollback {
        snapshot: String,
        /// Disconnect writers and detach attached members first
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GroupSnapshotArgs {
    #[command(subcommand)]
    command: Option<GroupSnapshotCommand>,
    /// The group to take a snapshot of
    group: Option<String>,
    /// The name of the group snapshot, and of each member's snapshot
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "")]
    description: String,
    /// Run `PATH freeze VOLUME...` before the cut and `PATH thaw VOLUME...` after (e.g. a
    /// script doing fsfreeze in each guest): the group snapshot is then application-consistent
    #[arg(long, value_name = "PATH")]
    quiesce_hook: Option<std::path::PathBuf>,
    /// Time the hook has for each call; a freeze that takes longer aborts the group snapshot
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    freeze_timeout: String,
    /// Take the group snapshot (crash-consistent) even when the freeze hook fails
    #[arg(long)]
    ignore_hook_errors: bool,
    /// Return only once every member's snapshot is durable (survives a power loss; by default
    /// durable a moment later, when the commit the daemon starts at once ends)
    #[arg(long)]
    durable: bool,
}

#[derive(Subcommand, Debug)]
pub enum GroupSnapshotCommand {
    /// List a group's snapshots (or, with --region, those published in a region by any node)
    List {
        #[arg(required_unless_present = "region")]
        group: Option<String>,
        #[arg(long, conflicts_with = "group")]
        region: Option<String>,
    },
    /// Show a group snapshot (GROUP@SNAPSHOT or id)
    Show { snapshot: String },
    /// Delete a group snapshot: every member's snapshot
    Delete { snapshot: String },
}

pub(super) async fn run(c: &Client, command: GroupCommand) -> Result<Printed, ClientError> {
    let p = Client::path;
    Ok(match command {
        GroupCommand::Create { group, volumes } => {
            group_printed(send(c, Method::POST, &p(&["groups"]), Some(&CreateGroup { name: group, volumes })).await?)
        }
        GroupCommand::Add { group, volume } => {
            let body = GroupMemberRequest { volume };
            group_printed(send(c, Method::POST, &p(&["groups", &group, "members"]), Some(&body)).await?)
        }
        GroupCommand::Remove { group, volume } => {
            group_printed(send(c, Method::DELETE, &p(&["groups", &group, "members", &volume]), None::<&()>).await?)
        }
        GroupCommand::List => {
            let gs: Vec<GroupView> = get(c, &p(&["groups"])).await?;
            let rows = gs
                .iter()
                .map(|g| {
                    let members: Vec<&str> = g.members.iter().map(|m| m.volume.as_str()).collect();
                    vec![g.name.clone(), members.join(","), g.snapshots.len().to_string()]
                })
                .collect();
            let text = table(&["GROUP", "VOLUMES", "SNAPSHOTS"], rows);
            Printed::new(&gs, text)
        }
        GroupCommand::Restore { snapshot, prefix, region } => {
            let path = p(&["group-snapshots", &snapshot, "restore"]);
            let vs: Vec<VolumeView> = send(c, Method::POST, &path, Some(&RestoreGroup { prefix, region })).await?;
            let names: Vec<&str> = vs.iter().map(|v| v.info.name.as_str()).collect();
            let text =
                format!("restored {snapshot} as {} (loading on demand and in the background)\n", names.join(", "));
            Printed::new(&vs, text)
        }
        GroupCommand::Rollback { snapshot, force } => {
            let path = p(&["group-snapshots", &snapshot, "rollback"]);
            let vs: Vec<VolumeView> = send(c, Method::POST, &path, Some(&Rollback { force })).await?;
            let names: Vec<&str> = vs.iter().map(|v| v.info.name.as_str()).collect();
            let text = format!("rolled back {} to {snapshot}\n", names.join(", "));
            Printed::new(&vs, text)
        }
        GroupCommand::Show { group } => group_printed(get(c, &p(&["groups", &group])).await?),
        GroupCommand::Delete { group } => {
            delete(c, &p(&["groups", &group])).await?;
            Printed::message(
                format!("deleted group {group}; its volumes stay"),
                serde_json::json!({ "deleted": group }),
            )
        }
        GroupCommand::Snapshot(args) => match (args.command, args.group, args.name) {
            (Some(GroupSnapshotCommand::List { region: Some(region), .. }), _, _) => {
                let gs: Vec<GroupManifest> = get(c, &p(&["regions", &region, "group-snapshots"])).await?;
                let rows = gs
                    .iter()
                    .map(|g| {
                        let members: Vec<&str> = g.members.iter().map(|m| m.volume_name.as_str()).collect();
                        vec![
                            format!("{}@{}", g.group, g.name),
                            g.id.clone(),
                            utc(g.created),
                            members.join(","),
                            g.consistency.clone(),
                        ]
                    })
                    .collect();
                let text = table(&["GROUP SNAPSHOT", "ID", "CREATED", "VOLUMES", "CONSISTENCY"], rows);
                Printed::new(&gs, text)
            }
            (Some(GroupSnapshotCommand::List { group, .. }), _, _) => {
                let group = group.unwrap_or_default();
                let ss: Vec<GroupSnapshotView> = get(c, &p(&["groups", &group, "snapshots"])).await?;
                let rows = ss
                    .iter()
                    .map(|s| {
                        vec![
                            format!("{}@{}", s.group, s.name),
                            s.id.clone(),
                            utc(s.created),
                            s.members.len().to_string(),
                            if s.degraded { "degraded".into() } else { s.consistency.clone() },
                        ]
                    })
                    .collect();
                let text = table(&["GROUP SNAPSHOT", "ID", "CREATED", "MEMBERS", "CONSISTENCY"], rows);
                Printed::new(&ss, text)
            }
            (Some(GroupSnapshotCommand::Show { snapshot }), _, _) => {
                snapshot_printed(get(c, &p(&["group-snapshots", &snapshot])).await?)
            }
            (Some(GroupSnapshotCommand::Delete { snapshot }), _, _) => {
                delete(c, &p(&["group-snapshots", &snapshot])).await?;
                Printed::message(
                    format!("deleted group snapshot {snapshot} (every member's snapshot)"),
                    serde_json::json!({ "deleted": snapshot }),
                )
            }
            (None, Some(group), Some(name)) => {
                let Some(hook) = args.quiesce_hook else {
                    let body = CreateGroupSnapshot {
                        name,
                        description: args.description,
                        consistency: None,
                        durable: args.durable,
                    };
                    return Ok(snapshot_printed(
                        send(c, Method::POST, &p(&["groups", &group, "snapshots"]), Some(&body)).await?,
                    ));
                };
                let timeout = parse_duration(&args.freeze_timeout).map_err(ClientError::Usage)?;
                let g: GroupView = get(c, &p(&["groups", &group])).await?;
                let volumes: Vec<String> = g.members.into_iter().map(|m| m.volume).collect();
                let consistency = match run_hook(&hook, "freeze", &volumes, timeout).await {
                    Ok(()) => "application",
                    Err(why) => {
                        // Whatever it froze before failing is thawed.
                        if let Err(e) = run_hook(&hook, "thaw", &volumes, timeout).await {
                            eprintln!(
                                "warning: the quiesce hook's thaw failed too ({e}): check the members' filesystems"
                            );
                        }
                        if !args.ignore_hook_errors {
                            return Err(ClientError::Failed(format!(
                                "the quiesce hook's freeze failed ({why}); no group snapshot was taken (--ignore-hook-errors takes a crash-consistent one anyway)"
                            )));
                        }
                        eprintln!("warning: the quiesce hook's freeze failed ({why}); taking a crash-consistent group snapshot");
                        "crash"
                    }
                };
                let body = CreateGroupSnapshot {
                    name,
                    description: args.description,
                    consistency: Some(consistency.into()),
                    durable: args.durable,
                };
                let taken = send(c, Method::POST, &p(&["groups", &group, "snapshots"]), Some(&body)).await;
                if consistency == "application" {
                    if let Err(why) = run_hook(&hook, "thaw", &volumes, timeout).await {
                        eprintln!(
                            "warning: the quiesce hook's thaw failed ({why}): thaw the members' filesystems by hand"
                        );
                    }
                }
                snapshot_printed(taken?)
            }
            (None, _, _) => {
                return Err(ClientError::Usage(
                    "say which group and name: snapblk group snapshot GROUP --name NAME (or list|show|delete)".into(),
                ))
            }
        },
    })
}

fn group_printed(g: GroupView) -> Printed {
    let members: Vec<String> = g.members.iter().map(|m| format!("{} ({})", m.volume, m.volume_id)).collect();
    let text = format!(
        "group:      {}\ncreated:    {}\nvolumes:    {}\nsnapshots:  {}\n",
        g.name,
        utc(g.created),
        members.join(", "),
        if g.snapshots.is_empty() { "-".to_string() } else { g.snapshots.join(", ") }
    );
    Printed::new(&g, text)
}

fn snapshot_printed(s: GroupSnapshotView) -> Printed {
    let mut text = format!(
        "group snapshot: {}@{}\nid:             {}\ncreated:        {}\ndescription:    {}\nconsistency:    {}{}\nmembers:\n",
        s.group,
        s.name,
        s.id,
        utc(s.created),
        s.description,
        s.consistency,
        if s.degraded { " (degraded: a member's snapshot was deleted on its own)" } else { "" }
    );
    for m in &s.members {
        let state = match (m.present, m.upload.as_deref()) {
            (false, _) => "deleted".to_string(),
            (true, Some(u)) => format!("{}, store: {u}", human(m.size)),
            (true, None) => human(m.size),
        };
        text.push_str(&format!("  {}@{} ({}): {state}\n", m.volume, s.name, m.snapshot_id));
    }
    Printed::new(&s, text)
}

/// Runs the quiesce hook (`PATH ACTION VOLUME...`) with a time limit; the reason when it fails.
async fn run_hook(
    hook: &std::path::Path,
    action: &str,
    volumes: &[String],
    limit: std::time::Duration,
) -> Result<(), String> {
    // In a process group of its own, so a hook that times out goes with everything it started.
    let mut child = tokio::process::Command::new(hook)
        .arg(action)
        .args(volumes)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", hook.display()))?;
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{} {action} exited with {status}", hook.display())),
        Ok(Err(e)) => Err(format!("{} {action}: {e}", hook.display())),
        Err(_) => {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
            }
            let _ = child.kill().await;
            Err(format!("{} {action} did not finish within {limit:?}", hook.display()))
        }
    }
}
