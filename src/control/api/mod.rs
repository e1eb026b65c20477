//! The HTTP/JSON control API, served on `DIR/control.sock`. Handlers are parse → call the
//! operations layer ([`crate::service`]) → answer; its errors map to HTTP status in one place
//! ([`status_of`]). Routes are grouped per resource, one file each.

mod lifecycle;
mod policies;
mod regions;
mod snapshots;
mod volumes;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::engine::ErrorKind;
use crate::jobs::JobView;
use crate::service::{Caller, Error, Service, Status};

/// The error body: `{"error": "<sentence>", "kind": "not_found"}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub kind: String,
}

pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    /// Seconds, for `Retry-After` (throttled requests).
    retry_after: Option<u64>,
}

/// The one mapping from error kinds to HTTP status codes.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists | ErrorKind::Busy | ErrorKind::NotLocal | ErrorKind::Quota => StatusCode::CONFLICT,
        ErrorKind::Throttled => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::ReadOnly => StatusCode::FORBIDDEN,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Gone => StatusCode::GONE,
        ErrorKind::Io | ErrorKind::Corrupt => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let kind = serde_json::to_value(e.kind()).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        ApiError {
            status: status_of(e.kind()),
            retry_after: e.retry_after(),
            body: ErrorBody { error: e.to_string(), kind },
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        Error::Invalid(format!("bad request body: {}", r.body_text())).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, Json(self.body)).into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(secs.max(1)));
        }
        res
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The JSON body of a request: an object (`[]` or `3` is not a request, even where every
/// field has a default), answered with a 400 in our error format when malformed.
type Body<T> = Result<Object<T>, ApiError>;

/// Extracts a JSON object body as `T` (see [`Body`]).
pub struct Object<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Object<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Object<T>, ApiError> {
        let Json(value) = Json::<serde_json::Value>::from_request(req, state).await?;
        if !value.is_object() {
            return Err(
                Error::Invalid("bad request body: expected a JSON object, like {\"name\": \"...\"}".into()).into()
            );
        }
        serde_json::from_value(value).map(Object).map_err(|e| Error::Invalid(format!("bad request body: {e}")).into())
    }
}

/// Who is calling: every client of the control socket is [`Caller::Local`] (the socket is
/// the daemon user's, or its `--socket-group`'s); accounts will authenticate callers here.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Caller, ApiError> {
        Ok(Caller::Local)
    }
}

type Svc = State<Arc<Service>>;

pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/jobs/{id}", get(show_job))
        .merge(volumes::routes())
        .merge(snapshots::routes())
        .merge(regions::routes())
        .merge(policies::routes())
        .merge(lifecycle::routes())
        .fallback(|| async { ApiError::from(Error::NotFound("no such API route".into())) })
        .with_state(service)
        .layer(axum::middleware::from_fn(server_timing))
}

/// Every answer says how long the daemon spent on it (`Server-Timing: handler;dur=MS`), so a
/// slow call can be told apart from a slow client or a busy machine.
async fn server_timing(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let mut res = next.run(req).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("handler;dur={ms:.3}")) {
        res.headers_mut().insert("server-timing", v);
    }
    res
}

async fn status(State(s): Svc, caller: Caller) -> ApiResult<Json<Status>> {
    Ok(Json(s.status(&caller)?))
}

async fn show_job(State(s): Svc, caller: Caller, Path(id): Path<u64>) -> ApiResult<Json<JobView>> {
    Ok(Json(s.job(&caller, id)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;

    #[test]
    fn every_error_kind_maps_to_a_client_or_server_status() {
        assert_eq!(status_of(ErrorKind::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(status_of(ErrorKind::Busy), StatusCode::CONFLICT);
        assert_eq!(status_of(ErrorKind::Invalid), StatusCode::BAD_REQUEST);
        assert!(status_of(ErrorKind::Corrupt).is_server_error());
    }

    #[test]
    fn errors_keep_their_sentence_and_kind() {
        let e: ApiError = Error::from(EngineError::NotFound("no volume named 'x'".into())).into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.body.kind, "not_found");
        assert_eq!(e.body.error, "no volume named 'x'");
    }
}
