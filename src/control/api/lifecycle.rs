//! `/v1/recycle-bin` (list, purge, lock, unlock), `POST /v1/snapshots/{r}/restore-deleted`,
//! `GET /v1/volumes/{r}/quota` and `GET /v1/events`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{ApiResult, Body, Object, Svc};
use crate::service::{BinView, Caller, EventQuery, EventRecord, PurgeRequest, QuotaView, Service, SnapshotView};

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/v1/recycle-bin", get(bin))
        .route("/v1/recycle-bin/purge", post(purge))
        .route("/v1/recycle-bin/lock", post(lock))
        .route("/v1/recycle-bin/unlock", post(unlock))
        .route("/v1/snapshots/{r}/restore-deleted", post(restore_deleted))
        .route("/v1/volumes/{r}/quota", get(quota))
        .route("/v1/events", get(events))
}

async fn bin(State(s): Svc, caller: Caller) -> ApiResult<Json<BinView>> {
    Ok(Json(s.recycle_bin(&caller)?))
}

async fn purge(State(s): Svc, caller: Caller, body: Body<PurgeRequest>) -> ApiResult<Json<Vec<String>>> {
    let Object(req) = body?;
    Ok(Json(s.purge_bin(&caller, req).await?))
}

async fn lock(State(s): Svc, caller: Caller) -> ApiResult<Json<BinView>> {
    Ok(Json(s.lock_bin(&caller)?))
}

async fn unlock(State(s): Svc, caller: Caller) -> ApiResult<Json<BinView>> {
    Ok(Json(s.unlock_bin(&caller)?))
}

async fn restore_deleted(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<SnapshotView>> {
    Ok(Json(s.restore_deleted(&caller, &r)?))
}

async fn quota(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<QuotaView>> {
    Ok(Json(s.volume_quota(&caller, &r)?))
}

async fn events(State(s): Svc, caller: Caller, Query(q): Query<EventQuery>) -> ApiResult<Json<Vec<EventRecord>>> {
    Ok(Json(s.events(&caller, q).await?))
}
