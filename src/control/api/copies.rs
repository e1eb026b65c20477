//! `/v1/copies` and `POST /v1/snapshots/{r}/copy|archive|restore-archive`: copies to other
//! regions and the archive tier.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiResult, Body, Object, Routes, Svc};
use crate::service::{ArchiveAnswer, ArchiveRequest, Caller, CopyRequest, RestoreArchiveRequest};
use crate::store::copies::CopyView;
use crate::store::ThawReport;

pub(super) fn routes(r: Routes) -> Routes {
    r.post("/v1/snapshots/{r}/copy", "Start copying a snapshot to another region", copy)
        .post(
            "/v1/snapshots/{r}/archive",
            "Start archiving a snapshot into an archive region (estimate: true only estimates)",
            archive,
        )
        .post(
            "/v1/snapshots/{r}/restore-archive",
            "Thaw an archived snapshot whose class needs it: request a restore of its frozen objects and report the state of them all",
            restore_archive,
        )
        .get("/v1/copies", "List copies and archives (running and finished)", list)
        .get("/v1/copies/{id}", "Show a copy: state, bytes done/total, rate, ETA", show)
        .post("/v1/copies/{id}/cancel", "Cancel a running copy", cancel)
}

async fn copy(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<CopyRequest>,
) -> ApiResult<(StatusCode, Json<CopyView>)> {
    let Object(req) = body?;
    Ok((StatusCode::ACCEPTED, Json(s.copy_snapshot(&caller, &r, req).await?)))
}

async fn archive(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<ArchiveRequest>,
) -> ApiResult<(StatusCode, Json<ArchiveAnswer>)> {
    let Object(req) = body?;
    let answer = s.archive_snapshot(&caller, &r, req).await?;
    let status = if answer.copy.is_some() { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, Json(answer)))
}

async fn restore_archive(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<RestoreArchiveRequest>,
) -> ApiResult<Json<ThawReport>> {
    let Object(req) = body?;
    Ok(Json(s.restore_archive(&caller, &r, req).await?))
}

async fn list(State(s): Svc, caller: Caller) -> ApiResult<Json<Vec<CopyView>>> {
    Ok(Json(s.copies(&caller)?))
}

async fn show(State(s): Svc, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<CopyView>> {
    Ok(Json(s.copy(&caller, &id)?))
}

async fn cancel(State(s): Svc, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<CopyView>> {
    Ok(Json(s.cancel_copy(&caller, &id)?))
}
