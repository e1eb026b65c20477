//! `/v1/regions`: list, show, the snapshots a region holds, GC, key export.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{ApiResult, Body, Object, Svc};
use crate::jobs::JobView;
use crate::service::{Caller, GcRequest, KeyFile, Service};
use crate::store::{RegionInfo, RegionSnapshot};

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/v1/regions", get(list))
        .route("/v1/regions/{r}", get(show))
        .route("/v1/regions/{r}/snapshots", get(snapshots))
        .route("/v1/regions/{r}/gc", post(gc))
        .route("/v1/regions/{r}/key", get(key))
}

async fn list(State(s): Svc, caller: Caller) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(s.list_regions(&caller)?))
}

async fn show(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<RegionInfo>> {
    Ok(Json(s.region(&caller, &r).await?))
}

async fn snapshots(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<Vec<RegionSnapshot>>> {
    Ok(Json(s.region_snapshots(&caller, &r).await?))
}

async fn gc(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<GcRequest>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let Object(req) = body?;
    Ok((StatusCode::ACCEPTED, Json(s.start_gc(&caller, &r, req)?)))
}

async fn key(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<KeyFile>> {
    Ok(Json(s.region_key(&caller, &r).await?))
}
