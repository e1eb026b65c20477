//! `/v1/policies`: create, list, show, delete, apply, remove, run now, prune, history.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::{ApiResult, Body, Object, Routes, Svc};
use crate::service::{Caller, CreatePolicy, HistoryEntry, PolicyTarget, PolicyView, PolicyVolumes, PruneView};

pub(super) fn routes(r: Routes) -> Routes {
    r.get("/v1/policies", "List snapshot policies", list)
        .post("/v1/policies", "Create a snapshot policy", create)
        .get("/v1/policies/{p}", "Show a policy", show)
        .delete("/v1/policies/{p}", "Delete a policy (its snapshots stay)", delete)
        .post("/v1/policies/{p}/apply", "Apply a policy to volumes", apply)
        .post("/v1/policies/{p}/remove", "Remove volumes from a policy", remove)
        .post("/v1/policies/{p}/run", "Run a policy now (on one volume, or all of its volumes)", run)
        .post("/v1/policies/{p}/prune", "Apply a policy's retention now (or show what it would delete)", prune)
        .get("/v1/policies/{p}/history", "A policy's recent ticks (?volume=NAME for one volume's)", history)
}

#[derive(Debug, Deserialize)]
struct VolumeQuery {
    volume: Option<String>,
}

async fn list(State(s): Svc, caller: Caller) -> ApiResult<Json<Vec<PolicyView>>> {
    Ok(Json(s.list_policies(&caller)?))
}

async fn create(State(s): Svc, caller: Caller, body: Body<CreatePolicy>) -> ApiResult<(StatusCode, Json<PolicyView>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.create_policy(&caller, req)?)))
}

async fn show(State(s): Svc, caller: Caller, Path(p): Path<String>) -> ApiResult<Json<PolicyView>> {
    Ok(Json(s.policy(&caller, &p)?))
}

async fn delete(State(s): Svc, caller: Caller, Path(p): Path<String>) -> ApiResult<StatusCode> {
    s.delete_policy(&caller, &p)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn apply(
    State(s): Svc,
    caller: Caller,
    Path(p): Path<String>,
    body: Body<PolicyVolumes>,
) -> ApiResult<Json<PolicyView>> {
    let Object(req) = body?;
    Ok(Json(s.apply_policy(&caller, &p, req)?))
}

async fn remove(
    State(s): Svc,
    caller: Caller,
    Path(p): Path<String>,
    body: Body<PolicyVolumes>,
) -> ApiResult<Json<PolicyView>> {
    let Object(req) = body?;
    Ok(Json(s.remove_policy(&caller, &p, req)?))
}

async fn run(
    State(s): Svc,
    caller: Caller,
    Path(p): Path<String>,
    body: Body<PolicyTarget>,
) -> ApiResult<Json<Vec<HistoryEntry>>> {
    let Object(req) = body?;
    Ok(Json(s.run_policy_now(&caller, &p, req).await?))
}

async fn prune(
    State(s): Svc,
    caller: Caller,
    Path(p): Path<String>,
    body: Body<PolicyTarget>,
) -> ApiResult<Json<Vec<PruneView>>> {
    let Object(req) = body?;
    Ok(Json(s.prune_policy(&caller, &p, req).await?))
}

async fn history(
    State(s): Svc,
    caller: Caller,
    Path(p): Path<String>,
    Query(q): Query<VolumeQuery>,
) -> ApiResult<Json<Vec<HistoryEntry>>> {
    Ok(Json(s.policy_history(&caller, &p, q.volume.as_deref())?))
}
