//! The HTTP/JSON control API, served on `DIR/control.sock`. Handlers are parse → call the
//! operations layer ([`crate::service`]) → answer; its errors map to HTTP status in one place
//! ([`status_of`]). Routes are grouped per resource, one file each.

mod accounts;
mod copies;
mod groups;
mod images;
mod lifecycle;
mod policies;
mod regions;
mod snapshots;
mod volumes;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::engine::ErrorKind;
use crate::jobs::JobView;
use crate::service::{Access, Caller, Error, Service, StatusView};

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
        ErrorKind::ReadOnly | ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
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
        let unauthenticated = self.status == StatusCode::UNAUTHORIZED;
        let mut res = (self.status, Json(self.body)).into_response();
        if unauthenticated {
            res.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
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

/// Set on requests that came over the HTTPS listener (`serve --api-listen`): their callers
/// prove who they are with a bearer token. Requests of the control socket carry none: its
/// callers are the daemon's user or its `--socket-group`, administrators.
#[derive(Debug, Clone, Copy)]
pub struct OverHttps;

/// Who is calling: [`Caller::Local`] on the control socket; on HTTPS, the account and role
/// of the request's bearer token (`Authorization: Bearer sbk_…`), checked on every request.
impl FromRequestParts<Arc<Service>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, service: &Arc<Service>) -> Result<Caller, ApiError> {
        if parts.extensions.get::<OverHttps>().is_none() {
            return Ok(Caller::Local);
        }
        let bearer = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::from(Error::Unauthenticated(
                    "this API needs a token: send 'Authorization: Bearer TOKEN' (the CLI: --token-file FILE)".into(),
                ))
            })?;
        Ok(service.authenticate(bearer.trim())?)
    }
}

type Svc = State<Arc<Service>>;

/// One route of the API, as the OpenAPI document describes it.
#[derive(Debug, Clone)]
struct RouteDoc {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    /// The handler's name (`volumes::create`), the operation's id.
    operation: String,
    /// The type of its JSON body, when it takes one.
    body: Option<String>,
}

/// The API's routes, each added with its method, path and what it does: the router and the
/// OpenAPI document (`GET /v1/openapi.json`, docs/openapi.json) come from this one list, so
/// the document cannot miss a route or name a method the router does not serve.
pub(super) struct Routes {
    router: Router<Arc<Service>>,
    docs: Vec<RouteDoc>,
}

impl Routes {
    fn new() -> Routes {
        Routes { router: Router::new(), docs: Vec::new() }
    }

    fn add<H, T>(
        mut self,
        method: &'static str,
        path: &'static str,
        summary: &'static str,
        route: axum::routing::MethodRouter<Arc<Service>>,
    ) -> Routes
    where
        H: Handler<T, Arc<Service>>,
        T: 'static,
    {
        let handler = std::any::type_name::<H>();
        let operation = handler.trim_start_matches("snapblk::control::api::").replace("::", "_");
        let body = inner_type(std::any::type_name::<T>(), "::Object<");
        self.docs.push(RouteDoc { method, path, summary, operation, body });
        self.router = self.router.route(path, route);
        self
    }

    pub(super) fn get<H: Handler<T, Arc<Service>>, T: 'static>(
        self,
        path: &'static str,
        summary: &'static str,
        h: H,
    ) -> Routes {
        self.add::<H, T>("get", path, summary, axum::routing::get(h))
    }

    pub(super) fn post<H: Handler<T, Arc<Service>>, T: 'static>(
        self,
        path: &'static str,
        summary: &'static str,
        h: H,
    ) -> Routes {
        self.add::<H, T>("post", path, summary, axum::routing::post(h))
    }

    pub(super) fn delete<H: Handler<T, Arc<Service>>, T: 'static>(
        self,
        path: &'static str,
        summary: &'static str,
        h: H,
    ) -> Routes {
        self.add::<H, T>("delete", path, summary, axum::routing::delete(h))
    }
}

/// The last path segment of the type argument after `marker` in a type's name:
/// `Result<snapblk::control::api::Object<snapblk::service::CreateVolume>, …>` → `CreateVolume`.
fn inner_type(type_name: &str, marker: &str) -> Option<String> {
    let rest = &type_name[type_name.find(marker)? + marker.len()..];
    let mut depth = 0;
    let end = rest.char_indices().find(|&(_, c)| {
        match c {
            '<' => depth += 1,
            '>' if depth == 0 => return true,
            '>' => depth -= 1,
            _ => {}
        }
        false
    })?;
    let inner = &rest[..end.0];
    let base = inner.split('<').next().unwrap_or(inner);
    Some(base.rsplit("::").next().unwrap_or(base).to_string())
}

/// `?grace=24h` of an unshare (snapshots and images).
#[derive(Debug, serde::Deserialize)]
struct GraceQuery {
    grace: Option<String>,
}

/// Every route of the API, by resource.
fn routes() -> Routes {
    let r = Routes::new()
        .get("/v1/status", "The daemon: version, sockets, upload setting, pending store deletes", status)
        .get("/v1/jobs/{id}", "A job's state and progress (verify, export, gc)", show_job)
        .get("/v1/openapi.json", "This document", openapi_doc);
    let r = accounts::routes(r);
    let r = volumes::routes(r);
    let r = snapshots::routes(r);
    let r = regions::routes(r);
    let r = policies::routes(r);
    let r = groups::routes(r);
    let r = images::routes(r);
    let r = copies::routes(r);
    lifecycle::routes(r)
}

/// The OpenAPI 3.0 document of the routes.
fn openapi(routes: &Routes) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let mut paths = Map::new();
    for d in &routes.docs {
        let params: Vec<Value> = d
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let mut op = json!({
            "operationId": d.operation,
            "summary": d.summary,
            "responses": {
                "2XX": { "description": "the result, as JSON (204: no body)" },
                "default": {
                    "description": "an error: a sentence and its kind",
                    "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
                }
            }
        });
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if let Some(body) = &d.body {
            op["requestBody"] = json!({
                "required": true,
                "content": { "application/json": { "schema": { "type": "object", "title": body } } }
            });
        }
        let entry = paths.entry(d.path.to_string()).or_insert_with(|| Value::Object(Map::new()));
        entry[d.method] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "snapblk control API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "HTTP/JSON over the daemon's unix socket DIR/control.sock. Generated from the daemon's route list (src/control/api)."
        },
        "paths": paths,
        "components": { "schemas": { "Error": {
            "type": "object",
            "required": ["error", "kind"],
            "properties": {
                "error": { "type": "string", "description": "what failed and what to do" },
                "kind": { "type": "string", "description": "not_found, already_exists, invalid, busy, quota, throttled, unavailable, ..." }
            }
        } } }
    })
}

pub fn router(service: Arc<Service>) -> Router {
    let routes = routes();
    let doc = Arc::new(openapi(&routes));
    let table: Arc<Vec<(&'static str, &'static str)>> =
        Arc::new(routes.docs.iter().map(|d| (d.method, d.path)).collect());
    routes
        .router
        .fallback(|| async {
            ApiError::from(Error::NotFound("no such API route; the routes are listed by GET /v1/openapi.json".into()))
        })
        .with_state(service)
        .layer(axum::Extension(doc))
        .layer(axum::middleware::from_fn_with_state(table, json_errors))
        .layer(axum::middleware::from_fn(server_timing))
}

async fn openapi_doc(
    caller: Caller,
    axum::Extension(doc): axum::Extension<Arc<serde_json::Value>>,
) -> ApiResult<Json<serde_json::Value>> {
    caller.may(Access::Read)?;
    Ok(Json((*doc).clone()))
}

/// The methods the route of `path` serves, upper case (`GET, DELETE`).
fn allowed_methods(table: &[(&'static str, &'static str)], path: &str) -> String {
    let matches = |template: &str| {
        let (t, p): (Vec<_>, Vec<_>) = (template.split('/').collect(), path.split('/').collect());
        t.len() == p.len() && t.iter().zip(&p).all(|(t, p)| t == p || (t.starts_with('{') && !p.is_empty()))
    };
    let methods: Vec<String> =
        table.iter().filter(|(_, template)| matches(template)).map(|(m, _)| m.to_ascii_uppercase()).collect();
    methods.join(", ")
}

/// Errors the router answers by itself (a method the route does not serve, a body too large)
/// get the same JSON body as every other error; a 405 says which methods the route serves
/// (`Allow`).
async fn json_errors(
    State(table): State<Arc<Vec<(&'static str, &'static str)>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (kind, error) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = allowed_methods(&table, &path);
            ("invalid", format!("{method} is not served on {path}; use {allowed}"))
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("invalid", "the request body is too large".to_string()),
        s if s.is_server_error() => ("io", format!("the daemon failed the request ({s})")),
        s => ("invalid", format!("the request was refused ({s})")),
    };
    let mut out = (status, Json(ErrorBody { error, kind: kind.into() })).into_response();
    if status == StatusCode::METHOD_NOT_ALLOWED {
        if let Ok(allow) = axum::http::HeaderValue::from_str(&allowed_methods(&table, &path)) {
            out.headers_mut().insert(axum::http::header::ALLOW, allow);
        }
    }
    out
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

async fn status(State(s): Svc, caller: Caller) -> ApiResult<Json<StatusView>> {
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

    /// docs/openapi.json is what the daemon serves: regenerate it after changing a route.
    #[test]
    fn the_published_openapi_document_is_the_route_list() {
        let doc = serde_json::to_string_pretty(&openapi(&routes())).unwrap() + "\n";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
        if std::env::var_os("SNAPBLK_WRITE_OPENAPI").is_some() {
            std::fs::write(path, &doc).unwrap();
        }
        let published = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            published == doc,
            "docs/openapi.json is not the route list; regenerate it: SNAPBLK_WRITE_OPENAPI=1 cargo test --lib openapi"
        );
    }

    #[test]
    fn a_body_type_is_read_from_the_handler_arguments() {
        let t = "(axum_core::extract::private::ViaParts, core::result::Result<snapblk::control::api::Object<snapblk::service::volumes::CreateVolume>, snapblk::control::api::ApiError>)";
        assert_eq!(inner_type(t, "::Object<").as_deref(), Some("CreateVolume"));
        assert_eq!(inner_type("(Path<String>,)", "::Object<"), None);
        let nested = "x::Object<alloc::vec::Vec<a::B>>";
        assert_eq!(inner_type(nested, "::Object<").as_deref(), Some("Vec"));
    }

    #[test]
    fn errors_keep_their_sentence_and_kind() {
        let e: ApiError = Error::from(EngineError::NotFound("no volume named 'x'".into())).into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.body.kind, "not_found");
        assert_eq!(e.body.error, "no volume named 'x'");
    }
}
