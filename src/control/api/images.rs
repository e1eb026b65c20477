//! `/v1/images`: images (named sets of pinned snapshots), deploying volumes from them, and
//! exporting and importing image files.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiResult, Body, Object, Routes, Svc};
use crate::jobs::JobView;
use crate::service::{
    Caller, CreateImage, DeployImage, ExportImage, ImageView, ImportImage, ShareRequest, SharedQuery, UnshareRequest,
    VolumeView,
};
use crate::store::shares::ImageGrant;

pub(super) fn routes(r: Routes) -> Routes {
    r.get("/v1/images", "List images", list)
        .post("/v1/images", "Create an image of snapshots (root, data disks), pinning them", create)
        .get("/v1/images/{i}", "Show an image", show)
        .delete("/v1/images/{i}", "Delete an image (its snapshots stay)", delete)
        .post("/v1/images/{i}/volumes", "New volumes (PREFIX + disk name) from an image", deploy)
        .post("/v1/images/{i}/export", "Start a job writing an image's disks to files (raw, qcow2, vmdk, vhdx)", export)
        .post("/v1/image-imports", "Start a job making volumes, snapshots and an image from image files", import)
        .post("/v1/images/{i}/shares", "Share an image (each disk's snapshot) with another account", share)
        .delete("/v1/images/{i}/shares/{account}", "Unshare an image (?grace=24h)", unshare)
        .get(
            "/v1/images-shared-with-me",
            "Images other accounts share with the caller's account (?account=A, ?region=R)",
            shared_with_me,
        )
}

async fn list(State(s): Svc, caller: Caller) -> ApiResult<Json<Vec<ImageView>>> {
    Ok(Json(s.list_images(&caller)?))
}

async fn create(State(s): Svc, caller: Caller, body: Body<CreateImage>) -> ApiResult<(StatusCode, Json<ImageView>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.create_image(&caller, req)?)))
}

async fn show(State(s): Svc, caller: Caller, Path(i): Path<String>) -> ApiResult<Json<ImageView>> {
    Ok(Json(s.image(&caller, &i)?))
}

async fn delete(State(s): Svc, caller: Caller, Path(i): Path<String>) -> ApiResult<StatusCode> {
    s.delete_image(&caller, &i)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn deploy(
    State(s): Svc,
    caller: Caller,
    Path(i): Path<String>,
    body: Body<DeployImage>,
) -> ApiResult<(StatusCode, Json<Vec<VolumeView>>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.create_volumes_from_image(&caller, &i, req).await?)))
}

async fn export(
    State(s): Svc,
    caller: Caller,
    Path(i): Path<String>,
    body: Body<ExportImage>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let Object(req) = body?;
    Ok((StatusCode::ACCEPTED, Json(s.export_image(&caller, &i, req)?)))
}

async fn import(State(s): Svc, caller: Caller, body: Body<ImportImage>) -> ApiResult<(StatusCode, Json<JobView>)> {
    let Object(req) = body?;
    Ok((StatusCode::ACCEPTED, Json(s.import_image(&caller, req)?)))
}

async fn share(
    State(s): Svc,
    caller: Caller,
    Path(i): Path<String>,
    body: Body<ShareRequest>,
) -> ApiResult<(StatusCode, Json<ImageView>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.share_image(&caller, &i, req).await?)))
}

async fn unshare(
    State(s): Svc,
    caller: Caller,
    Path((i, account)): Path<(String, String)>,
    Query(q): Query<super::GraceQuery>,
) -> ApiResult<Json<ImageView>> {
    Ok(Json(s.unshare_image(&caller, &i, UnshareRequest { with: account, grace: q.grace }).await?))
}

async fn shared_with_me(
    State(s): Svc,
    caller: Caller,
    Query(q): Query<SharedQuery>,
) -> ApiResult<Json<Vec<ImageGrant>>> {
    Ok(Json(s.images_shared_with_me(&caller, q).await?))
}
