//! The Checkpoints API (seeds 000, 003, 004): create (streaming), list, get,
//! restore (streaming), delete, and the seed-003 background variants.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::stream::{Emitter, ndjson};
use super::{ApiError, AppState, PlainError};
use crate::checkpoint::{CheckpointError, Checkpoints, Note};
use crate::lifecycle::{OperationGuard, Transition};

fn checkpoints(app: &AppState) -> Result<Arc<Checkpoints>, ApiError> {
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

fn parse_body<T: Default + for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Forwards progress lines from blocking work into the stream, then the end.
async fn forward(
    em: Emitter,
    mut rx: mpsc::UnboundedReceiver<Note>,
    done: tokio::task::JoinHandle<Result<String, String>>,
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
        Ok(Ok(msg)) => event("complete", &msg),
        Ok(Err(e)) => event("error", &e),
        Err(e) => event("error", &format!("internal error: {e}")),
    };
    if client {
        let _ = em.send(&end).await;
    }
}

/// Starts a capture in the background; the lifecycle guard lives as long as it.
fn spawn_capture(
    cps: Arc<Checkpoints>,
    guard: OperationGuard,
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
        Ok(format!("Checkpoint {} created", meta.id))
    });
    (rx, done)
}

fn spawn_restore(cps: Arc<Checkpoints>, guard: OperationGuard, id: String) -> Progress {
    let (tx, rx) = mpsc::unbounded_channel();
    let done = tokio::spawn(async move {
        let _guard = guard;
        let _ = tx.send(Note::Info(format!("Restoring to checkpoint {id}...")));
        let progress = |n: Note| {
            let _ = tx.send(n);
        };
        cps.restore(&id, &progress)
            .await
            .map(|()| format!("Restored to {id}"))
            .map_err(|e| e.to_string())
    });
    (rx, done)
}

type Progress = (
    mpsc::UnboundedReceiver<Note>,
    tokio::task::JoinHandle<Result<String, String>>,
);

/// Validates a create request and starts the capture (409 while busy).
async fn begin_capture(
    app: &AppState,
    body: &Bytes,
) -> Result<(Progress, Option<String>), ApiError> {
    let cps = checkpoints(app)?;
    let req: CreateBody = parse_body(body)?;
    if let Some(id) = &req.checkpoint_id {
        cps.check_new_id(id)?;
    }
    let guard = app.lifecycle.begin(Transition::BeginCheckpoint).await?;
    let id = req.checkpoint_id.clone();
    Ok((
        spawn_capture(
            cps,
            guard,
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
            Ok(Ok(msg)) => tracing::info!("{msg}"),
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

/// `GET /v1/checkpoints[?history=ID]`: newest first.
pub async fn list(
    State(app): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let cps = checkpoints(&app)?;
    Ok(Json(
        cps.list(q.history.as_deref())
            .iter()
            .map(|m| m.public())
            .collect(),
    ))
}

/// `GET /v1/checkpoints/{id}`
pub async fn get(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(checkpoints(&app)?.get(&id)?.public()))
}

/// `POST /v1/checkpoints/{id}/restore`: streams progress.
pub async fn restore(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let cps = checkpoints(&app)?;
    cps.get(&id)?;
    let guard = app.lifecycle.begin(Transition::BeginRestore).await?;
    let (rx, done) = spawn_restore(cps, guard, id);
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
struct RestoreBody {
    #[serde(default)]
    checkpoint_id: Option<String>,
}

/// Seed 003 `POST /restore` `{checkpoint_id}`: 202, then in the background.
pub async fn root_restore(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, PlainError> {
    let run = async {
        let cps = checkpoints(&app)?;
        let req: RestoreBody = parse_body(&body)?;
        let id = req
            .checkpoint_id
            .ok_or_else(|| ApiError::BadRequest("checkpoint_id is required".into()))?;
        cps.get(&id)?;
        let guard = app.lifecycle.begin(Transition::BeginRestore).await?;
        log_when_done(spawn_restore(cps, guard, id.clone()), "restore");
        Ok::<_, ApiError>(id)
    };
    let id = run.await.map_err(ApiError::plain)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"status": "restore requested", "checkpoint_id": id})),
    )
        .into_response())
}
