//! The Checkpoints API (seeds 000, 003, 004): create (streaming), list, get,
//! restore (streaming), delete, and the seed-003 background variants.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::gateway::Caller;
use super::params::json_body;
use super::stream::{Emitter, ndjson};
use super::{ApiError, AppState, PlainError};
use crate::checkpoint::{CheckpointError, Checkpoints, Note, PolicyRestore};
use crate::lifecycle::{OperationGuard, Transition};
use crate::sleep::StayCold;

pub(super) fn checkpoints(app: &AppState) -> Result<Arc<Checkpoints>, ApiError> {
    if let Some(c) = app.checkpoints.get() {
        return Ok(c.clone());
    }
    let why = app
        .fs_error
        .get()
        .cloned()
        .unwrap_or_else(|| "the daemon is booting".into());
    Err(CheckpointError::Unavailable(why).into())
}

fn event(kind: &str, text: &str) -> Value {
    let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    match kind {
        "error" => json!({"type": "error", "error": text, "time": time}),
        _ => json!({"type": kind, "data": text, "time": time}),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    comment: Option<String>,
    /// Seed 003: the client may name the checkpoint.
    #[serde(default)]
    checkpoint_id: Option<String>,
    /// `false`: files only, no process state (default: with processes
    /// when CRIU is available).
    #[serde(default)]
    processes: Option<bool>,
}

/// Forwards progress lines from blocking work into the stream, then the end.
async fn forward(
    em: Emitter,
    mut rx: mpsc::UnboundedReceiver<Note>,
    done: tokio::task::JoinHandle<Result<Done, String>>,
) {
    let mut client = true;
    while let Some(note) = rx.recv().await {
        if client {
            let ev = match &note {
                Note::Info(line) => event("info", line),
                Note::Error(line) => event("error", line),
            };
            client = em.send(&ev).await;
        }
    }
    let end = match done.await {
        Ok(Ok(done)) => {
            let mut ev = event("complete", &done.msg);
            if let Some(stats) = done.stats {
                ev["stats"] = stats;
            }
            ev
        }
        Ok(Err(e)) => event("error", &e),
        Err(e) => event("error", &format!("internal error: {e}")),
    };
    if client {
        let _ = em.send(&end).await;
    }
}

/// How an operation ended: the `complete` event's text, and its figures.
struct Done {
    msg: String,
    stats: Option<Value>,
}

/// Starts a capture in the background; the lifecycle guard lives as long as it.
fn spawn_capture(
    cps: Arc<Checkpoints>,
    guard: (OperationGuard, Option<StayCold>),
    comment: String,
    id: Option<String>,
    processes: bool,
) -> Progress {
    let (tx, rx) = mpsc::unbounded_channel();
    let done = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let _ = tx.send(Note::Info("Creating checkpoint...".into()));
        let progress = |n: Note| {
            let _ = tx.send(n);
        };
        let meta = cps
            .capture(comment, id, processes, &progress)
            .map_err(|e| e.to_string())?;
        cps.refresh_browsable();
        Ok(Done {
            msg: format!("Checkpoint {} created", meta.id),
            stats: Some(json!({
                "freeze_ms": meta.stats.freeze_ms,
                "capture_ms": meta.stats.capture_ms,
                "criu": meta.env.as_ref().map(|e| &e.stats),
                "images_new_bytes": meta.stats.images_new_bytes,
                "images_dedup_bytes": meta.stats.images_dedup_bytes,
            })),
        })
    });
    (rx, done)
}

/// How a restore asked by `caller` treats the checkpoint's policies: only
/// the external API's put them back.
fn policies_for(caller: Caller) -> PolicyRestore {
    match caller {
        Caller::Tcp | Caller::Host => PolicyRestore::FromCheckpoint,
        Caller::Environment => PolicyRestore::KeepInForce,
    }
}

fn spawn_restore(
    cps: Arc<Checkpoints>,
    guard: OperationGuard,
    id: String,
    policies: PolicyRestore,
) -> Progress {
    let (tx, rx) = mpsc::unbounded_channel();
    let done = tokio::spawn(async move {
        let _guard = guard;
        let _ = tx.send(Note::Info(format!("Restoring to checkpoint {id}...")));
        let progress = |n: Note| {
            let _ = tx.send(n);
        };
        cps.restore(&id, policies, &progress)
            .await
            .map(|()| Done {
                msg: format!("Restored to {id}"),
                stats: None,
            })
            .map_err(|e| e.to_string())
    });
    (rx, done)
}

type Progress = (
    mpsc::UnboundedReceiver<Note>,
    tokio::task::JoinHandle<Result<Done, String>>,
);

/// Validates a create request and starts the capture (409 while busy).
async fn begin_capture(
    app: &AppState,
    body: &Bytes,
) -> Result<(Progress, Option<String>), ApiError> {
    let cps = checkpoints(app)?;
    let req: CreateBody = json_body(body)?;
    if let Some(id) = &req.checkpoint_id {
        cps.check_new_id(id)?;
    }
    let guard = app.lifecycle.begin(Transition::BeginCheckpoint).await?;
    // A cold sprite stays cold: the capture takes the images it has.
    let cold = app.sleep.stay_cold_or_wake().await;
    let id = req.checkpoint_id.clone();
    Ok((
        spawn_capture(
            cps,
            (guard, cold),
            req.comment.unwrap_or_default(),
            req.checkpoint_id,
            req.processes.unwrap_or(true),
        ),
        id,
    ))
}

/// Seed-003 operations run unobserved: their outcome goes to the log.
fn log_when_done(progress: Progress, what: &'static str) {
    let (rx, done) = progress;
    drop(rx);
    tokio::spawn(async move {
        match done.await {
            Ok(Ok(done)) => tracing::info!("{}", done.msg),
            Ok(Err(e)) => tracing::warn!(error = %e, "background {what} failed"),
            Err(e) => tracing::warn!(error = %e, "background {what} panicked"),
        }
    });
}

/// `POST /v1/checkpoint`, `POST /v1/checkpoints`: streams progress.
pub async fn create(State(app): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let ((rx, done), _) = begin_capture(&app, &body).await?;
    Ok(ndjson(app.shutdown.clone(), move |em| {
        forward(em, rx, done)
    }))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    history: Option<String>,
}

/// A checkpoint as the API shows it, with its upload when there is a remote.
fn with_remote(app: &AppState, m: &crate::checkpoint::CheckpointMeta) -> Value {
    let mut v = m.public();
    if let Some(r) = super::remote::field(app, &m.id) {
        v["remote"] = r;
    }
    v
}

/// `GET /v1/checkpoints[?history=ID]`: newest first.
pub async fn list(
    State(app): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let cps = checkpoints(&app)?;
    Ok(Json(
        cps.list(q.history.as_deref())
            .iter()
            .map(|m| with_remote(&app, m))
            .collect(),
    ))
}

/// `GET /v1/checkpoints/{id}`
pub async fn get(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(with_remote(&app, &checkpoints(&app)?.get(&id)?)))
}

/// `POST /v1/checkpoints/{id}/restore`: streams progress.
pub async fn restore(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let cps = checkpoints(&app)?;
    cps.get(&id)?;
    let guard = app.lifecycle.begin(Transition::BeginRestore).await?;
    let (rx, done) = spawn_restore(cps, guard, id, policies_for(caller));
    Ok(ndjson(app.shutdown.clone(), move |em| {
        forward(em, rx, done)
    }))
}

/// `DELETE /v1/checkpoints/{id}`: 204.
pub async fn delete(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let cps = checkpoints(&app)?;
    // Not while a capture or restore runs (they read the store).
    let guard = app.lifecycle.begin(Transition::BeginCheckpoint).await?;
    let result = tokio::task::spawn_blocking(move || cps.delete(&id)).await;
    drop(guard);
    result.map_err(|e| ApiError::Unavailable(e.to_string()))??;
    Ok(StatusCode::NO_CONTENT)
}

/// Seed 003 `POST /checkpoint` `{checkpoint_id?}`: 202, then in the background.
pub async fn root_checkpoint(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, PlainError> {
    let (progress, id) = begin_capture(&app, &body).await.map_err(ApiError::plain)?;
    log_when_done(progress, "checkpoint");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"status": "checkpoint requested", "checkpoint_id": id})),
    )
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    #[serde(default)]
    checkpoint_id: Option<String>,
}

/// Seed 003 `POST /restore` `{checkpoint_id}`: 202, then in the background.
pub async fn root_restore(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, PlainError> {
    let run = async {
        let cps = checkpoints(&app)?;
        let req: RestoreBody = json_body(&body)?;
        let id = req
            .checkpoint_id
            .ok_or_else(|| ApiError::BadRequest("checkpoint_id is required".into()))?;
        cps.get(&id)?;
        let guard = app.lifecycle.begin(Transition::BeginRestore).await?;
        log_when_done(
            spawn_restore(cps, guard, id.clone(), policies_for(caller)),
            "restore",
        );
        Ok::<_, ApiError>(id)
    };
    let id = run.await.map_err(ApiError::plain)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"status": "restore requested", "checkpoint_id": id})),
    )
        .into_response())
}

/// `GET /v1/checkpoints/{id}/export`: the checkpoint as one streamed
/// archive (`application/zstd`, a tar inside). The checkpoint cannot be
/// deleted meanwhile; a client that goes away stops the work.
pub async fn export(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let cps = checkpoints(&app)?;
    let (meta, pin) = cps.pin_for_export(&id)?;
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let span = tracing::info_span!("export", checkpoint = %id);
    tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let out = std::io::BufWriter::with_capacity(256 * 1024, ChannelWriter(tx.clone()));
        match cps.export(&meta, &pin, out) {
            Ok(bytes) => tracing::info!(bytes, "checkpoint exported"),
            Err(e) => {
                tracing::warn!(error = %e, "export stopped");
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
    });
    let body =
        axum::body::Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let file = format!("{}-{id}.tar.zst", app.config.sprite_name);
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/zstd".to_owned(),
            ),
            (
                axum::http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        body,
    )
        .into_response())
}

/// A blocking writer that hands chunks to the response body; it fails
/// (and the export stops) once the client is gone.
struct ChannelWriter(mpsc::Sender<Result<Bytes, std::io::Error>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
            })?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The most an import or a pull may write: `--import-max-bytes`, else the
/// free space of the state dir less a reserve of 1% of its filesystem,
/// between 256 MiB and 1 GiB (a percentage alone would keep tens of GiB
/// back on a large disk that is merely busy).
pub(super) fn import_limit(app: &AppState) -> crate::archive::Limit {
    if let Some(bytes) = app.config.import_max_bytes {
        return crate::archive::Limit {
            bytes,
            configured: true,
        };
    }
    let bytes = match crate::sys::fs_space(&app.config.state_dir) {
        Ok((free, total)) => free.saturating_sub(space_reserve(total)),
        Err(e) => {
            tracing::warn!(error = %e, "free space of the state dir unknown");
            0
        }
    };
    crate::archive::Limit {
        bytes,
        configured: false,
    }
}

/// What an import leaves free on a filesystem of `total` bytes.
fn space_reserve(total: u64) -> u64 {
    (total / 100).clamp(256 << 20, 1 << 30)
}

/// Adds a verified checkpoint (an archive's, a pull's) as the next `vN`.
/// Publishing takes the checkpoint slot: it waits for a capture or restore
/// that runs to end rather than throw the verified objects away.
pub(super) async fn publish_imported(
    app: &AppState,
    cps: Arc<Checkpoints>,
    verified: crate::archive::Imported,
    from_sprite: Option<String>,
) -> Result<(crate::checkpoint::CheckpointMeta, u64), ApiError> {
    let guard = loop {
        match app.lifecycle.begin(Transition::BeginCheckpoint).await {
            Ok(g) => break g,
            Err(crate::lifecycle::LifecycleError::Busy { .. }) => {
                app.lifecycle
                    .wait_running(std::time::Duration::from_secs(300))
                    .await?;
            }
            Err(e) => return Err(e.into()),
        }
    };
    Ok(tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let r = cps.add_imported(verified, from_sprite.as_deref());
        cps.refresh_browsable();
        r
    })
    .await
    .map_err(|e| ApiError::Unavailable(e.to_string()))??)
}

/// What an import or a pull says of a checkpoint whose process images this
/// sprite's key did not seal (none: nothing to say).
pub(super) fn unsealed_note(
    cps: &Checkpoints,
    meta: &crate::checkpoint::CheckpointMeta,
) -> Option<String> {
    (cps.sealed_here(meta) == Some(false)).then(|| {
        "Its process images are not sealed by this sprite's checkpoint key (--checkpoint-key): a restore brings back its files and starts its services afresh".to_owned()
    })
}

/// `POST /v1/checkpoints/import`: the body is an archive from `export`.
/// It is read and verified completely (400 naming the entry on any
/// problem, leaving nothing behind) before the answer starts: then NDJSON
/// `info` lines (bytes received along the way, objects, what was new) and
/// `complete` `Checkpoint vN imported`.
pub async fn import(
    State(app): State<Arc<AppState>>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use futures_util::TryStreamExt;
    let cps = checkpoints(&app)?;
    let limit = import_limit(&app);
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let received = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let (cps2, received2) = (cps.clone(), received.clone());
    let span = tracing::info_span!("import");
    let verified = tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let mut reader = reader;
        let r = cps2.receive(&mut reader, limit, &|bytes| {
            received2
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(bytes);
        });
        if r.is_err() {
            // Let a client still sending read the answer (bounded).
            let _ = std::io::copy(
                &mut std::io::Read::take(&mut reader, 16 << 20),
                &mut std::io::sink(),
            );
        }
        r
    })
    .await
    .map_err(|e| ApiError::Unavailable(e.to_string()))?
    .map_err(|e| {
        tracing::warn!(error = %e, "import refused");
        ApiError::from(CheckpointError::from(e))
    })?;
    let mut lines = Vec::new();
    for b in received.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        lines.push(event("info", &format!("Received {} MiB", b >> 20)));
    }
    lines.push(event(
        "info",
        &format!(
            "Verified {} bytes: checkpoint {} with {} objects ({} already in the store)",
            verified.bytes, verified.meta.id, verified.objects, verified.reused
        ),
    ));
    let (meta, new_objects) = publish_imported(&app, cps.clone(), verified, None).await?;
    lines.push(event("info", &format!("Stored {new_objects} new objects")));
    if let Some(note) = unsealed_note(&cps, &meta) {
        lines.push(event("info", &note));
    }
    lines.push(event(
        "complete",
        &format!("Checkpoint {} imported", meta.id),
    ));
    let mut body = Vec::new();
    for l in lines {
        body.extend_from_slice(l.to_string().as_bytes());
        body.push(b'\n');
    }
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::space_reserve;

    #[test]
    fn the_reserve_is_a_percent_between_256_mib_and_1_gib() {
        assert_eq!(space_reserve(0), 256 << 20);
        assert_eq!(space_reserve(10 << 30), 256 << 20);
        assert_eq!(space_reserve(50 << 30), (50 << 30) / 100);
        // A 252 GiB disk keeps 1 GiB back, not 12.6 GiB: an import is
        // refused only when the disk is nearly full.
        assert_eq!(space_reserve(252 << 30), 1 << 30);
    }
}
