//! `/v1/snapshots` (and `POST /v1/volumes/{volume}/snapshots`): create, list, show, delete,
//! clone, roll back, upload, verify, export.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::{ApiResult, Body, Object, Routes, Svc};
use crate::jobs::JobView;
use crate::service::{
    Caller, CloneSnapshot, CreateSnapshot, ExportRequest, HoldRequest, Rollback, ShareRequest, ShareView, SharedQuery,
    SnapshotView, UnshareRequest, VolumeView,
};

pub(super) fn routes(r: Routes) -> Routes {
    r.post("/v1/volumes/{r}/snapshots", "Take a snapshot of a volume", create)
        .get(
            "/v1/snapshots",
            "List snapshots (?volume=NAME for one volume's; ?bytes=true counts what each takes in the store)",
            list,
        )
        .get("/v1/snapshots/{r}", "Show a snapshot (VOLUME@SNAPSHOT or id), with what it takes in the store", show)
        .delete(
            "/v1/snapshots/{r}",
            "Delete a snapshot (to the recycle bin when it is on; ?force=true for a group snapshot's member; ?region=R for one stored only in a region: a copy, an archived snapshot)",
            delete,
        )
        .post("/v1/snapshots/{r}/clone", "Create a volume from a snapshot", clone)
        .post("/v1/snapshots/{r}/rollback", "Roll a volume back to one of its snapshots", rollback)
        .post("/v1/snapshots/{r}/upload", "Upload a snapshot now, or retry a failed upload", upload)
        .post("/v1/snapshots/{r}/verify", "Start a job re-reading a snapshot from the store (?region=R)", verify)
        .post("/v1/snapshots/{r}/export", "Start a job writing a snapshot to a file", export)
        .post("/v1/snapshots/{r}/hold", "Hold a snapshot: nothing deletes it until released", hold)
        .delete("/v1/snapshots/{r}/hold", "Release a snapshot's hold", release_hold)
        .post("/v1/snapshots/{r}/shares", "Share an uploaded snapshot with another account", share)
        .get("/v1/snapshots/{r}/shares", "The accounts a snapshot is shared with", shares)
        .delete(
            "/v1/snapshots/{r}/shares/{account}",
            "Unshare a snapshot (?grace=24h: how long volumes made from it keep loading)",
            unshare,
        )
        .get(
            "/v1/shared-with-me",
            "Snapshots other accounts share with the caller's account (?account=A, ?region=R)",
            shared_with_me,
        )
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    volume: Option<String>,
    /// Count what each uploaded snapshot takes in the store (else: only what was counted).
    #[serde(default)]
    bytes: bool,
}

#[derive(Debug, Deserialize)]
struct RegionQuery {
    region: Option<String>,
}

async fn create(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<CreateSnapshot>,
) -> ApiResult<(StatusCode, Json<SnapshotView>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.create_snapshot(&caller, &r, req).await?)))
}

async fn list(State(s): Svc, caller: Caller, Query(q): Query<ListQuery>) -> ApiResult<Json<Vec<SnapshotView>>> {
    Ok(Json(s.list_snapshots_counted(&caller, q.volume.as_deref(), q.bytes).await?))
}

async fn show(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<SnapshotView>> {
    Ok(Json(s.show_snapshot(&caller, &r).await?))
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
    /// A snapshot stored only in this region (by id).
    #[serde(default)]
    region: Option<String>,
}

async fn delete(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<StatusCode> {
    match q.region {
        Some(region) => s.delete_stored_snapshot(&caller, &r, &region, q.force).await?,
        None => s.delete_snapshot_forced(&caller, &r, q.force).await?,
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn clone(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<CloneSnapshot>,
) -> ApiResult<(StatusCode, Json<VolumeView>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.clone_snapshot(&caller, &r, req).await?)))
}

async fn rollback(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<Rollback>,
) -> ApiResult<Json<VolumeView>> {
    let Object(req) = body?;
    Ok(Json(s.rollback(&caller, &r, req).await?))
}

async fn upload(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<SnapshotView>> {
    Ok(Json(s.upload_snapshot(&caller, &r)?))
}

async fn verify(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    Query(q): Query<RegionQuery>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    Ok((StatusCode::ACCEPTED, Json(s.verify_snapshot(&caller, &r, q.region).await?)))
}

async fn export(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<ExportRequest>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let Object(req) = body?;
    Ok((StatusCode::ACCEPTED, Json(s.export_snapshot(&caller, &r, req).await?)))
}

async fn hold(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<HoldRequest>,
) -> ApiResult<Json<SnapshotView>> {
    let Object(req) = body?;
    Ok(Json(s.hold_snapshot(&caller, &r, req)?))
}

async fn release_hold(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<SnapshotView>> {
    Ok(Json(s.release_hold(&caller, &r)?))
}

async fn share(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<ShareRequest>,
) -> ApiResult<(StatusCode, Json<ShareView>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.share_snapshot(&caller, &r, req).await?)))
}

async fn shares(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<Vec<ShareView>>> {
    Ok(Json(s.snapshot_shares(&caller, &r)?))
}

async fn unshare(
    State(s): Svc,
    caller: Caller,
    Path((r, account)): Path<(String, String)>,
    Query(q): Query<super::GraceQuery>,
) -> ApiResult<Json<ShareView>> {
    Ok(Json(s.unshare_snapshot(&caller, &r, UnshareRequest { with: account, grace: q.grace }).await?))
}

async fn shared_with_me(
    State(s): Svc,
    caller: Caller,
    Query(q): Query<SharedQuery>,
) -> ApiResult<Json<Vec<ShareView>>> {
    Ok(Json(s.shared_with_me(&caller, q).await?))
}
