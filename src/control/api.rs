//! The HTTP/JSON control API, served on `DIR/control.sock`. Handlers are thin: they call the
//! engine and map its errors to HTTP status in one place ([`status_of`]).

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::attach::{AttachRequest, Attachment, Attachments};
use crate::engine::{Engine, EngineError, ErrorKind, SnapshotInfo, VolumeInfo};
use crate::store::{
    ExportFormat, HydrationView, JobView, RegionInfo, RegionSnapshot, RemoteStatus, StoreError, StoreService,
};

/// What `GET /v1/status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub dir: PathBuf,
    pub pid: u32,
    pub nbd_socket: PathBuf,
    pub nbd_tcp: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateVolume {
    pub name: String,
    /// Required unless `from_snapshot` is given (the size is then the snapshot's).
    #[serde(default)]
    pub size: Option<u64>,
    pub cluster_size: Option<u32>,
    /// Home region of the volume's snapshots (default `local`); with `from_snapshot`, the
    /// region to find the snapshot in.
    #[serde(default)]
    pub region: Option<String>,
    /// `VOLUME@SNAPSHOT` or a snapshot id (of this node, or in a region).
    #[serde(default)]
    pub from_snapshot: Option<String>,
}

/// A volume plus its home region and its kernel attachment, if any.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeView {
    #[serde(flatten)]
    pub info: VolumeInfo,
    pub region: String,
    /// The kernel device the volume is attached to (`volume attach`), if any.
    #[serde(default)]
    pub attachment: Option<Attachment>,
    /// Set while some of its data is still loading from the object store.
    #[serde(default)]
    pub hydration: Option<HydrationView>,
}

/// A snapshot plus its store-side status (none for snapshots taken before the store existed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotView {
    #[serde(flatten)]
    pub info: SnapshotInfo,
    pub upload: Option<RemoteStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ExportRequest {
    pub output: PathBuf,
    pub format: ExportFormat,
    #[serde(default)]
    pub region: Option<String>,
    /// Replace an existing target that is not a regular file (a symlink, a device node).
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RegionQuery {
    pub region: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct GcRequest {
    /// Override the configured grace period (e.g. "0s").
    #[serde(default)]
    pub grace: Option<String>,
}

/// The key file of a region (`snapblk key export`).
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyFile {
    pub region: String,
    pub path: PathBuf,
    pub content: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateSnapshot {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Answer only once the snapshot is durable (by default it is taken, readable and
    /// answered at once, and durable when the commit started with it ends).
    #[serde(default)]
    pub durable: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CloneSnapshot {
    pub name: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Rollback {
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Deserialize)]
pub struct SnapshotQuery {
    pub volume: Option<String>,
}

/// The error body: `{"error": "<sentence>", "kind": "not_found"}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub kind: String,
}

pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

/// The one mapping from engine error kinds to HTTP status codes.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists | ErrorKind::Busy | ErrorKind::NotLocal => StatusCode::CONFLICT,
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::ReadOnly => StatusCode::FORBIDDEN,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Gone => StatusCode::GONE,
        ErrorKind::Io | ErrorKind::Corrupt => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        let kind = serde_json::to_value(e.kind()).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        ApiError { status: status_of(e.kind()), body: ErrorBody { error: e.to_string(), kind } }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let kind = serde_json::to_value(e.kind()).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        ApiError { status: status_of(e.kind()), body: ErrorBody { error: e.to_string(), kind } }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        ApiError::invalid(format!("bad request body: {}", r.body_text()))
    }
}

impl ApiError {
    fn invalid(error: String) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, body: ErrorBody { error, kind: "invalid".into() } }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

struct Ctx {
    engine: Arc<Engine>,
    store: Arc<StoreService>,
    attachments: Arc<Attachments>,
    status: Status,
}

/// Runs a (short, possibly fsyncing) engine call off the async workers, so NBD connections
/// sharing the runtime are not held up by it.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, EngineError> + Send + 'static) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: ErrorBody { error: format!("internal error: {e}"), kind: "io".into() },
        }),
    }
}

pub fn router(engine: Arc<Engine>, store: Arc<StoreService>, attachments: Arc<Attachments>, status: Status) -> Router {
    let ctx = Arc::new(Ctx { engine, store, attachments, status });
    Router::new()
        .route("/v1/status", get(|State(c): State<Arc<Ctx>>| async move { Json(c.status.clone()) }))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{r}", get(show_volume).delete(delete_volume))
        .route("/v1/volumes/{r}/snapshots", post(create_snapshot))
        .route("/v1/volumes/{r}/attach", post(attach))
        .route("/v1/volumes/{r}/detach", post(detach))
        .route("/v1/volumes/{r}/hydrate", post(hydrate_volume))
        .route("/v1/attachments", get(|State(c): State<Arc<Ctx>>| async move { Json(c.attachments.list()) }))
        .route("/v1/snapshots", get(list_snapshots))
        .route("/v1/snapshots/{r}", get(show_snapshot).delete(delete_snapshot))
        .route("/v1/snapshots/{r}/clone", post(clone_snapshot))
        .route("/v1/snapshots/{r}/rollback", post(rollback))
        .route("/v1/snapshots/{r}/upload", post(retry_upload))
        .route("/v1/snapshots/{r}/verify", post(verify_snapshot))
        .route("/v1/snapshots/{r}/export", post(export_snapshot))
        .route("/v1/regions", get(list_regions))
        .route("/v1/regions/{r}", get(show_region))
        .route("/v1/regions/{r}/snapshots", get(region_snapshots))
        .route("/v1/regions/{r}/gc", post(gc_region))
        .route("/v1/regions/{r}/key", get(region_key))
        .route("/v1/jobs/{id}", get(show_job))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                body: ErrorBody { error: "no such API route".into(), kind: "not_found".into() },
            }
        })
        .with_state(ctx)
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

fn volume_view(c: &Ctx, info: VolumeInfo) -> VolumeView {
    VolumeView {
        region: c.store.volume_region(&info.id),
        attachment: c.attachments.of_volume(&info.id),
        hydration: c.store.hydration.view_of(&info),
        info,
    }
}

fn snapshot_view(c: &Ctx, info: SnapshotInfo) -> SnapshotView {
    SnapshotView { upload: c.store.status(&info.id), info }
}

async fn list_volumes(State(c): State<Arc<Ctx>>) -> Json<Vec<VolumeView>> {
    Json(c.engine.list_volumes().into_iter().map(|v| volume_view(&c, v)).collect())
}

async fn create_volume(
    State(c): State<Arc<Ctx>>,
    body: Result<Json<CreateVolume>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<VolumeView>)> {
    let Json(b) = body?;
    if let Some(from) = &b.from_snapshot {
        if b.size.is_some() || b.cluster_size.is_some() {
            return Err(ApiError::invalid(
                "a volume created from a snapshot has the snapshot's size and cluster size: leave them out".into(),
            ));
        }
        let v = c.store.create_from_snapshot(&b.name, from, b.region.as_deref()).await?;
        return Ok((StatusCode::CREATED, Json(volume_view(&c, v))));
    }
    let Some(size) = b.size else {
        return Err(ApiError::invalid("a new volume needs a size (or --from-snapshot)".into()));
    };
    let region = b.region.unwrap_or_else(|| "local".into());
    c.store.check_region(&region)?;
    let e = c.engine.clone();
    let v = blocking(move || e.create_volume(&b.name, size, b.cluster_size)).await?;
    c.store.set_volume_region(&v.id, &region)?;
    Ok((StatusCode::CREATED, Json(volume_view(&c, v))))
}

async fn hydrate_volume(State(c): State<Arc<Ctx>>, Path(r): Path<String>) -> ApiResult<Json<VolumeView>> {
    Ok(Json(volume_view(&c, c.store.hydrate(&r)?)))
}

async fn show_volume(State(c): State<Arc<Ctx>>, Path(r): Path<String>) -> ApiResult<Json<VolumeView>> {
    Ok(Json(volume_view(&c, c.engine.volume(&r)?)))
}

async fn delete_volume(State(c): State<Arc<Ctx>>, Path(r): Path<String>) -> ApiResult<StatusCode> {
    let id = c.engine.volume(&r)?.id;
    c.attachments.before_delete(&id)?;
    let e = c.engine.clone();
    blocking(move || e.delete_volume(&r)).await?;
    c.store.volume_deleted(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn attach(
    State(c): State<Arc<Ctx>>,
    Path(r): Path<String>,
    body: Result<Json<AttachRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Attachment>)> {
    let Json(b) = body?;
    let a = c.attachments.clone();
    let attached = blocking(move || a.attach(&r, &b)).await?;
    Ok((StatusCode::CREATED, Json(attached)))
}

async fn detach(State(c): State<Arc<Ctx>>, Path(r): Path<String>) -> ApiResult<Json<Attachment>> {
    let a = c.attachments.clone();
    Ok(Json(blocking(move || a.detach(&r)).await?))
}

async fn create_snapshot(
    State(c): State<Arc<Ctx>>,
    Path(r): Path<String>,
    body: Result<Json<CreateSnapshot>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<SnapshotView>)> {
    let Json(b) = body?;
    let s = if b.durable {
        let e = c.engine.clone();
        blocking(move || {
            let s = e.create_snapshot(&r, &b.name, &b.description)?;
            e.make_durable(&s.id)?;
            e.snapshot(&s.id)
        })
        .await?
    } else {
        // Right here: it waits for no disk sync (see `Engine::create_snapshot`), and a hop to
        // a blocking thread and back costs more than the create on a loaded machine.
        c.engine.create_snapshot(&r, &b.name, &b.description)?
    };
    // The snapshot exists (and is usable) now; its upload starts in the background.
    c.store.snapshot_created(&s)?;
    Ok((StatusCode::CREATED, Json(snapshot_view(&c, s))))
}

async fn list_snapshots(
    State(c): State<Arc<Ctx>>,
    Query(q): Query<SnapshotQuery>,
) -> ApiResult<Json<Vec<SnapshotView>>> {
    let snaps = c.engine.list_snapshots(q.volume.as_deref())?;
    Ok(Json(snaps.into_iter().map(|s| snapshot_view(&c, s)).collect()))
}

async fn show_snapshot(State(c): State<Arc<Ctx>>, Path(r): Path<String>) -> ApiResult<Json<SnapshotView>> {
    Ok(Json(snapshot_view(&c, c.engine.snapshot(&r)?)))
}

async fn delete_snapshot(State(c): State<Arc<Ctx>>, Path(r): Path<String>) -> ApiResult<StatusCode> {
    c.store.delete_snapshot(&r).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn retry_upload(State(c): State<Arc<Ctx>>, Path(r): Path<String>) -> ApiResult<Json<SnapshotView>> {
    let s = c.engine.snapshot(&r)?;
    c.store.upload(&s)?;
    Ok(Json(snapshot_view(&c, s)))
}

async fn verify_snapshot(
    State(c): State<Arc<Ctx>>,
    Path(r): Path<String>,
    Query(q): Query<RegionQuery>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let job = c.store.spawn_job("verify", &r.clone(), move |svc, job| async move {
        svc.verify(&r, q.region.as_deref(), &job).await
    });
    Ok((StatusCode::ACCEPTED, Json(job)))
}

async fn export_snapshot(
    State(c): State<Arc<Ctx>>,
    Path(r): Path<String>,
    body: Result<Json<ExportRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let Json(b) = body?;
    if !b.output.is_absolute() {
        return Err(ApiError::invalid(format!("export output '{}' must be an absolute path", b.output.display())));
    }
    let job = c.store.spawn_job("export", &r.clone(), move |svc, job| async move {
        svc.export(&r, b.region.as_deref(), &b.output, b.format, b.force, &job).await
    });
    Ok((StatusCode::ACCEPTED, Json(job)))
}

async fn list_regions(State(c): State<Arc<Ctx>>) -> Json<Vec<String>> {
    Json(c.store.region_names())
}

async fn show_region(State(c): State<Arc<Ctx>>, Path(r): Path<String>) -> ApiResult<Json<RegionInfo>> {
    Ok(Json(c.store.region_info(&r).await?))
}

async fn region_snapshots(State(c): State<Arc<Ctx>>, Path(r): Path<String>) -> ApiResult<Json<Vec<RegionSnapshot>>> {
    Ok(Json(c.store.region_snapshots(&r).await?))
}

async fn gc_region(
    State(c): State<Arc<Ctx>>,
    Path(r): Path<String>,
    body: Result<Json<GcRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let Json(b) = body?;
    c.store.check_region(&r)?;
    let grace = b.grace.as_deref().map(crate::units::parse_duration).transpose().map_err(ApiError::invalid)?;
    let job = c.store.spawn_job("gc", &r.clone(), move |svc, _job| async move { svc.gc(&r, grace).await });
    Ok((StatusCode::ACCEPTED, Json(job)))
}

async fn region_key(State(c): State<Arc<Ctx>>, Path(r): Path<String>) -> ApiResult<Json<KeyFile>> {
    c.store.check_region(&r)?;
    // Opening the region creates the key file if it does not exist yet.
    c.store.region(&r).await?;
    let path = c.store.config.regions[&r].key_file.clone();
    let content = std::fs::read_to_string(&path)
        .map_err(|e| ApiError::from(StoreError::io(format!("reading {}", path.display()))(e)))?;
    Ok(Json(KeyFile { region: r, path, content }))
}

async fn show_job(State(c): State<Arc<Ctx>>, Path(id): Path<u64>) -> ApiResult<Json<JobView>> {
    c.store.job(id).map(Json).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        body: ErrorBody {
            error: format!("no job {id} (jobs are kept until the daemon restarts)"),
            kind: "not_found".into(),
        },
    })
}

async fn clone_snapshot(
    State(c): State<Arc<Ctx>>,
    Path(r): Path<String>,
    body: Result<Json<CloneSnapshot>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<VolumeView>)> {
    let Json(b) = body?;
    c.engine.snapshot(&r)?;
    let v = c.store.create_from_snapshot(&b.name, &r, None).await?;
    Ok((StatusCode::CREATED, Json(volume_view(&c, v))))
}

async fn rollback(
    State(c): State<Arc<Ctx>>,
    Path(r): Path<String>,
    body: Result<Json<Rollback>, JsonRejection>,
) -> ApiResult<Json<VolumeView>> {
    let Json(b) = body?;
    // A volume attached to the kernel: refused, or with --force detached first, so the
    // kernel's page cache of the old content goes away with the device.
    let volume_id = c.engine.snapshot(&r)?.volume_id;
    let a = c.attachments.clone();
    let force = b.force;
    if let Some(gone) = blocking(move || a.before_rollback(&volume_id, force)).await? {
        tracing::warn!(volume = gone.volume, device = %gone.device.display(), "detached for a forced rollback");
    }
    let v = c.store.rollback(&r, b.force).await?;
    Ok(Json(volume_view(&c, v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_maps_to_a_client_or_server_status() {
        assert_eq!(status_of(ErrorKind::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(status_of(ErrorKind::Busy), StatusCode::CONFLICT);
        assert_eq!(status_of(ErrorKind::Invalid), StatusCode::BAD_REQUEST);
        assert!(status_of(ErrorKind::Corrupt).is_server_error());
    }

    #[test]
    fn engine_errors_keep_their_sentence_and_kind() {
        let e: ApiError = EngineError::NotFound("no volume named 'x'".into()).into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.body.kind, "not_found");
        assert_eq!(e.body.error, "no volume named 'x'");
    }
}
