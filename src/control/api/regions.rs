//! `/v1/regions`: list, show, the snapshots a region holds, GC, key export.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiResult, Body, Object, Routes, Svc};
use crate::jobs::JobView;
use crate::service::{Caller, GcRequest, KeyFile};
use crate::store::{RegionInfo, RegionSnapshot};

pub(super) fn routes(r: Routes) -> Routes {
    r.get("/v1/regions", "List the configured regions", list)
        .get("/v1/regions/{r}", "Show a region: store, usage, reachability", show)
        .get("/v1/regions/{r}/snapshots", "List the snapshots stored in a region (by any node)", snapshots)
        .post("/v1/regions/{r}/gc", "Start a job reclaiming unreferenced store space", gc)
        .get("/v1/regions/{r}/key", "A region's key file", key)
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
