//! `snapblk group ...`: consistency groups and their group snapshots.

use clap::{Args, Subcommand};
use hyper::Method;

use super::{delete, get, send, table, Client, ClientError, Printed};
use crate::service::{CreateGroup, CreateGroupSnapshot, GroupMemberRequest, GroupSnapshotView, GroupView};
use crate::units::{human, utc};

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
}

#[derive(Subcommand, Debug)]
pub enum GroupSnapshotCommand {
    /// List a group's snapshots
    List { group: String },
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
        GroupCommand::Show { group } => group_printed(get(c, &p(&["groups", &group])).await?),
        GroupCommand::Delete { group } => {
            delete(c, &p(&["groups", &group])).await?;
            Printed::message(
                format!("deleted group {group}; its volumes stay"),
                serde_json::json!({ "deleted": group }),
            )
        }
        GroupCommand::Snapshot(args) => match (args.command, args.group, args.name) {
            (Some(GroupSnapshotCommand::List { group }), _, _) => {
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
                let body = CreateGroupSnapshot { name, description: args.description };
                snapshot_printed(send(c, Method::POST, &p(&["groups", &group, "snapshots"]), Some(&body)).await?)
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
