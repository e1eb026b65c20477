//! `/v1/recycle-bin` (list, purge, lock, unlock), `POST /v1/snapshots/{r}/restore-deleted`,
//! `GET /v1/volumes/{r}/quota` and `GET /v1/events`.

use axum::extract::{Path, Query, State};
use axum::Json;

use super::{ApiResult, Body, Object, Routes, Svc};
use crate::service::{BinView, Caller, EventQuery, EventRecord, PurgeRequest, QuotaView, SnapshotView};

pub(super) fn routes(r: Routes) -> Routes {
    r.get("/v1/recycle-bin", "The recycle bin: deleted snapshots and its lock", bin)
        .post("/v1/recycle-bin/purge", "Delete snapshots in the bin for good", purge)
        .post("/v1/recycle-bin/lock", "Lock the recycle bin", lock)
        .post("/v1/recycle-bin/unlock", "Ask to unlock the recycle bin (after its unlock delay)", unlock)
        .post("/v1/snapshots/{r}/restore-deleted", "Take a deleted snapshot back out of the bin", restore_deleted)
        .get("/v1/volumes/{r}/quota", "A volume's quotas and usage", quota)
        .get("/v1/events", "The event log (?after=ID&limit=N&wait=SECONDS)", events)
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
