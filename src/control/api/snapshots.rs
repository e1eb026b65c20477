//! `/v1/snapshots` (and `POST /v1/volumes/{volume}/snapshots`): create, list, show, delete,
//! clone, roll back, upload, verify, export.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{ApiResult, Body, Object, Svc};
use crate::jobs::JobView;
use crate::service::{
    Caller, CloneSnapshot, CreateSnapshot, ExportRequest, HoldRequest, Rollback, Service, SnapshotView, VolumeView,
};

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/v1/volumes/{r}/snapshots", post(create))
        .route("/v1/snapshots", get(list))
        .route("/v1/snapshots/{r}", get(show).delete(delete))
        .route("/v1/snapshots/{r}/clone", post(clone))
        .route("/v1/snapshots/{r}/rollback", post(rollback))
        .route("/v1/snapshots/{r}/upload", post(upload))
        .route("/v1/snapshots/{r}/verify", post(verify))
        .route("/v1/snapshots/{r}/export", post(export))
        .route("/v1/snapshots/{r}/hold", post(hold).delete(release_hold))
}

#[derive(Debug, Deserialize)]
struct VolumeQuery {
    volume: Option<String>,
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

async fn list(State(s): Svc, caller: Caller, Query(q): Query<VolumeQuery>) -> ApiResult<Json<Vec<SnapshotView>>> {
    Ok(Json(s.list_snapshots(&caller, q.volume.as_deref())?))
}

async fn show(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<SnapshotView>> {
    Ok(Json(s.snapshot(&caller, &r)?))
}

async fn delete(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<StatusCode> {
    s.delete_snapshot(&caller, &r).await?;
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
    Ok((StatusCode::ACCEPTED, Json(s.verify_snapshot(&caller, &r, q.region)?)))
}

async fn export(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<ExportRequest>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let Object(req) = body?;
    Ok((StatusCode::ACCEPTED, Json(s.export_snapshot(&caller, &r, req)?)))
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
