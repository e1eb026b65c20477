//! `/v1/groups`: consistency groups and their group snapshots.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiResult, Body, Object, Routes, Svc};
use crate::service::{
    Caller, CreateGroup, CreateGroupSnapshot, GroupMemberRequest, GroupSnapshotView, GroupView, RestoreGroup, Rollback,
    VolumeView,
};

pub(super) fn routes(r: Routes) -> Routes {
    r.get("/v1/groups", "List consistency groups", list)
        .post("/v1/groups", "Create a consistency group of volumes", create)
        .get("/v1/groups/{g}", "Show a group", show)
        .delete("/v1/groups/{g}", "Delete a group (its volumes stay)", delete)
        .post("/v1/groups/{g}/members", "Add a volume to a group", add)
        .delete("/v1/groups/{g}/members/{v}", "Take a volume out of a group", remove)
        .get("/v1/groups/{g}/snapshots", "List a group's snapshots", list_snapshots)
        .post("/v1/groups/{g}/snapshots", "Take a snapshot of every member at one instant", create_snapshot)
        .get("/v1/group-snapshots/{r}", "Show a group snapshot (GROUP@SNAPSHOT or id)", show_snapshot)
        .delete("/v1/group-snapshots/{r}", "Delete a group snapshot (every member's snapshot)", delete_snapshot)
        .post("/v1/group-snapshots/{r}/rollback", "Roll every member back to the group snapshot, all or none", rollback)
        .post(
            "/v1/group-snapshots/{r}/restore",
            "New volumes (PREFIX + member name) from a group snapshot, here or in a region",
            restore,
        )
        .get(
            "/v1/regions/{r}/group-snapshots",
            "List the group snapshots published in a region (by any node)",
            region_list,
        )
}

async fn list(State(s): Svc, caller: Caller) -> ApiResult<Json<Vec<GroupView>>> {
    Ok(Json(s.list_groups(&caller)?))
}

async fn create(State(s): Svc, caller: Caller, body: Body<CreateGroup>) -> ApiResult<(StatusCode, Json<GroupView>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.create_group(&caller, req)?)))
}

async fn show(State(s): Svc, caller: Caller, Path(g): Path<String>) -> ApiResult<Json<GroupView>> {
    Ok(Json(s.group(&caller, &g)?))
}

async fn delete(State(s): Svc, caller: Caller, Path(g): Path<String>) -> ApiResult<StatusCode> {
    s.delete_group(&caller, &g)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn add(
    State(s): Svc,
    caller: Caller,
    Path(g): Path<String>,
    body: Body<GroupMemberRequest>,
) -> ApiResult<Json<GroupView>> {
    let Object(req) = body?;
    Ok(Json(s.change_group_member(&caller, &g, &req.volume, true)?))
}

async fn remove(State(s): Svc, caller: Caller, Path((g, v)): Path<(String, String)>) -> ApiResult<Json<GroupView>> {
    Ok(Json(s.change_group_member(&caller, &g, &v, false)?))
}

async fn list_snapshots(
    State(s): Svc,
    caller: Caller,
    Path(g): Path<String>,
) -> ApiResult<Json<Vec<GroupSnapshotView>>> {
    Ok(Json(s.list_group_snapshots(&caller, &g)?))
}

async fn create_snapshot(
    State(s): Svc,
    caller: Caller,
    Path(g): Path<String>,
    body: Body<CreateGroupSnapshot>,
) -> ApiResult<(StatusCode, Json<GroupSnapshotView>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.create_group_snapshot(&caller, &g, req).await?)))
}

async fn show_snapshot(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<GroupSnapshotView>> {
    Ok(Json(s.group_snapshot(&caller, &r)?))
}

async fn delete_snapshot(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<StatusCode> {
    s.delete_group_snapshot(&caller, &r).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rollback(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<Rollback>,
) -> ApiResult<Json<Vec<VolumeView>>> {
    let Object(req) = body?;
    Ok(Json(s.rollback_group(&caller, &r, req.force).await?))
}

async fn restore(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<RestoreGroup>,
) -> ApiResult<(StatusCode, Json<Vec<VolumeView>>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.restore_group(&caller, &r, req).await?)))
}

async fn region_list(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
) -> ApiResult<Json<Vec<crate::store::format::GroupManifest>>> {
    Ok(Json(s.region_group_snapshots(&caller, &r).await?))
}
