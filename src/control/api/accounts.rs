//! `/v1/accounts` and `/v1/tokens`: accounts, and the API tokens that act for them.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::{ApiResult, Body, Object, Routes, Svc};
use crate::service::{AccountView, Caller, CreateAccount, CreateToken, NewToken, TokenView};

pub(super) fn routes(r: Routes) -> Routes {
    r.get("/v1/accounts", "List accounts (an account's caller: its own)", list)
        .post("/v1/accounts", "Create an account (admin)", create)
        .get("/v1/accounts/{r}", "Show an account", show)
        .delete("/v1/accounts/{r}", "Delete an account that owns nothing (admin)", delete)
        .get("/v1/tokens", "List API tokens, never their secrets (?account=NAME)", tokens)
        .post("/v1/tokens", "Create an API token; its secret is in this answer only", create_token)
        .delete("/v1/tokens/{id}", "Revoke an API token (at once)", revoke)
}

#[derive(Debug, Deserialize)]
struct AccountQuery {
    account: Option<String>,
}

async fn list(State(s): Svc, caller: Caller) -> ApiResult<Json<Vec<AccountView>>> {
    Ok(Json(s.list_accounts(&caller)?))
}

async fn create(
    State(s): Svc,
    caller: Caller,
    body: Body<CreateAccount>,
) -> ApiResult<(StatusCode, Json<AccountView>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.create_account(&caller, req)?)))
}

async fn show(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<Json<AccountView>> {
    Ok(Json(s.account(&caller, &r)?))
}

async fn delete(State(s): Svc, caller: Caller, Path(r): Path<String>) -> ApiResult<StatusCode> {
    s.delete_account(&caller, &r)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn tokens(State(s): Svc, caller: Caller, Query(q): Query<AccountQuery>) -> ApiResult<Json<Vec<TokenView>>> {
    Ok(Json(s.list_tokens(&caller, q.account.as_deref())?))
}

async fn create_token(
    State(s): Svc,
    caller: Caller,
    body: Body<CreateToken>,
) -> ApiResult<(StatusCode, Json<NewToken>)> {
    let Object(req) = body?;
    Ok((StatusCode::CREATED, Json(s.create_token(&caller, req)?)))
}

async fn revoke(State(s): Svc, caller: Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    s.revoke_token(&caller, &id)?;
    Ok(StatusCode::NO_CONTENT)
}
