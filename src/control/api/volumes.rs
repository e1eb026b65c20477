//! `/v1/volumes`: create, list, show, delete, hydrate, attach, detach; `/v1/attachments`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{ApiResult, Body, Object, Svc};
use crate::attach::{AttachRequest, Attachment};
use crate::service::{Caller, CreateVolume, Service, VolumeView};

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{r}", get(show).delete(delete))
        .route("/v1/volumes/{r}/attach", post(attach))
        .route("/v1/volumes/{r}/detach", post(detach))
        .route("/v1/volumes/{r}/hydrate", post(hydrate))
        .route("/v1/attachments", get(attachments))
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
