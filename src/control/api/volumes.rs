//! `/v1/volumes`: create, list, show, delete, hydrate, attach, detach; `/v1/attachments`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiResult, Body, Object, Routes, Svc};
use crate::attach::{AttachRequest, Attachment};
use crate::service::{Caller, CreateVolume, VolumeView};

pub(super) fn routes(r: Routes) -> Routes {
    r.get("/v1/volumes", "List volumes", list)
        .post("/v1/volumes", "Create a volume (empty, or from a snapshot in a region)", create)
        .get("/v1/volumes/{r}", "Show a volume (name or id)", show)
        .delete("/v1/volumes/{r}", "Delete a volume", delete)
        .post("/v1/volumes/{r}/attach", "Attach a volume to the kernel (ublk or nbd)", attach)
        .post("/v1/volumes/{r}/detach", "Detach a volume from the kernel", detach)
        .post("/v1/volumes/{r}/hydrate", "Load everything a volume still loads from the store now", hydrate)
        .get("/v1/attachments", "List kernel attachments", attachments)
}

async fn list(State(s): Svc, caller: Caller) -> ApiResult<Json<Vec<VolumeView>>> {
    Ok(Json(s.list_volumes(&caller)?))
}

async fn create(State(s): Svc, caller: Caller, body: Body<CreateVolume>) -> ApiResult<(StatusCode, Json<VolumeView>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.create_volume(&caller, req).await?)))
}

async fn show(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<VolumeView>> {
    Ok(Json(s.volume(&caller, &r)?))
}

async fn delete(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<StatusCode> {
    s.delete_volume(&caller, &r).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn hydrate(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<VolumeView>> {
    Ok(Json(s.hydrate_volume(&caller, &r)?))
}

async fn attach(
    State(s): Svc,
    caller: Caller,
    Path(r): Path<String>,
    body: Body<AttachRequest>,
) -> ApiResult<(StatusCode, Json<Attachment>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.attach(&caller, &r, req).await?)))
}

async fn detach(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<Attachment>> {
    Ok(Json(s.detach(&caller, &r).await?))
}

async fn attachments(State(s): Svc, caller: Caller) -> ApiResult<Json<Vec<Attachment>>> {
    Ok(Json(s.attachments(&caller)?))
}
