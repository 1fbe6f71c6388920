//! The remote store's API: push a checkpoint (following its upload),
//! list the checkpoints in the bucket (this sprite's or another's), look
//! at one, delete its record.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::stream::ndjson;
use super::{ApiError, AppState};
use crate::remote::pull::{self, PullProgress};
use crate::remote::{Remote, RemoteError, UploadState, UploadStatus, Uploads};

fn remote(app: &AppState) -> Result<Arc<Remote>, ApiError> {
    app.remote
        .get()
        .cloned()
        .ok_or(ApiError::Remote(RemoteError::NotConfigured))
}

fn uploads(app: &AppState) -> Result<Arc<Uploads>, ApiError> {
    remote(app)?;
    app.uploads.get().cloned().ok_or_else(|| {
        ApiError::Unavailable("checkpoints are unavailable, so are their uploads".into())
    })
}

/// The `remote` field of a local checkpoint (none: no --remote).
pub fn field(app: &AppState, id: &str) -> Option<Value> {
    let up = app.uploads.get()?;
    Some(match up.status(id) {
        Some(s) => json!(s),
        None => json!({"state": "none"}),
    })
}

/// The longest a push's stream stays silent.
const QUIET: std::time::Duration = std::time::Duration::from_secs(10);

fn event(kind: &str, text: &str, status: Option<&UploadStatus>) -> Value {
    let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let mut ev = match kind {
        "error" => json!({"type": "error", "error": text, "time": time}),
        _ => json!({"type": kind, "data": text, "time": time}),
    };
    if let Some(s) = status {
        ev["remote"] = json!(s);
    }
    ev
}

fn progress_line(id: &str, s: &UploadStatus) -> String {
    let done = s.objects + s.present;
    format!(
        "Uploading {id}: {done}/{} objects checked, {} sent ({} of {} bytes)",
        s.total_objects, s.objects, s.bytes, s.total_bytes
    )
}

/// `POST /v1/checkpoints/{id}/push`: queues the upload (again: only what
/// the bucket lacks moves) and streams its progress until it is uploaded
/// (`complete`) or has failed for good (`error`). Leaving early does not
/// stop it.
pub async fn push(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let up = uploads(&app)?;
    if let Some(cps) = app.checkpoints.get() {
        cps.get(&id)?;
    }
    let mut rx = up.subscribe();
    up.enqueue(&id)?;
    let first = up.status(&id);
    Ok(ndjson(app.shutdown.clone(), move |em| async move {
        let mut client = em
            .send(&event("info", &format!("Pushing {id}..."), first.as_ref()))
            .await;
        let mut status = first;
        loop {
            if let Some(s) = &status {
                match s.state {
                    UploadState::Uploaded => {
                        let text = format!(
                            "Checkpoint {id} uploaded: {} objects ({} bytes) sent, {} already there",
                            s.objects, s.bytes, s.present
                        );
                        let _ = em.send(&event("complete", &text, Some(s))).await;
                        return;
                    }
                    UploadState::Failed if !s.retrying => {
                        let text = format!(
                            "the upload of {id} failed: {}",
                            s.error.as_deref().unwrap_or("unknown error")
                        );
                        let _ = em.send(&event("error", &text, Some(s))).await;
                        return;
                    }
                    _ => {}
                }
            }
            let next = loop {
                // Nothing for a while (a slow store, a try's retries): say
                // where it is anyway, so a client sees the upload alive.
                let Ok(got) = tokio::time::timeout(QUIET, rx.recv()).await else {
                    break up.status(&id);
                };
                match got {
                    Ok((i, s)) if i == id => break Some(s),
                    Ok(_) => {}
                    // Missed some: the current status says where it is.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        break up.status(&id);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            };
            if client && let Some(s) = &next {
                let line = match s.state {
                    UploadState::Failed => format!(
                        "A try failed ({}); trying again",
                        s.error.as_deref().unwrap_or("unknown error")
                    ),
                    UploadState::Pending => format!("{id} waits for the uploads before it"),
                    _ => progress_line(&id, s),
                };
                client = em.send(&event("info", &line, Some(s))).await;
            }
            status = next;
        }
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Whose checkpoints: a sprite's name, `*` for every sprite (default:
    /// this one).
    sprite: Option<String>,
}

/// `GET /v1/remote/checkpoints[?sprite=NAME|*]`: newest first, each with
/// its sprite.
pub async fn list(
    State(app): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let remote = remote(&app)?;
    let sprite = q.sprite.unwrap_or_else(|| app.config.sprite_name.clone());
    let sprites = if sprite == "*" {
        remote.sprites().await?
    } else {
        vec![sprite]
    };
    let mut out = Vec::new();
    for s in sprites {
        out.extend(remote.list(&s).await?);
    }
    Ok(Json(json!(out)))
}

/// `GET /v1/remote/checkpoints/{sprite}/{id}`
pub async fn get(
    State(app): State<Arc<AppState>>,
    Path((sprite, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let record = remote(&app)?.record(&sprite, &id).await?;
    let mut v = json!(record.summary());
    v["meta"] = record.meta;
    Ok(Json(v))
}

/// `DELETE /v1/remote/checkpoints/{sprite}/{id}`: removes the record (the
/// objects stay until `remote gc`); 204.
pub async fn delete(
    State(app): State<Arc<AppState>>,
    Path((sprite, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    remote(&app)?.delete_record(&sprite, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/remote/checkpoints/{sprite}/{id}/pull`: fetches what the
/// local store lacks (in parallel, every object checked against its
/// SHA-256) and adds the checkpoint as the next `vN`, with
/// `imported_from` naming the sprite. Refusals known before anything moves
/// (no remote, no such record, a bad record, too big) are plain errors;
/// after that, NDJSON: `info` progress with `pull` counts, then `complete`
/// (`Checkpoint vN pulled from SPRITE/ID`, with `id`) or `error` naming
/// the object. A failed pull keeps nothing.
pub async fn pull(
    State(app): State<Arc<AppState>>,
    Path((sprite, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let remote = remote(&app)?;
    let cps = super::checkpoints::checkpoints(&app)?;
    // The record first: a missing or bad one is the answer's status.
    let record = remote.record(&sprite, &id).await?;
    let limit = super::checkpoints::import_limit(&app);
    let total: u64 = record.objects.iter().map(|(_, s)| s).sum();
    if total > limit.bytes {
        return Err(RemoteError::Pull(crate::archive::ArchiveError::TooLarge {
            limit,
            entry: None,
        })
        .into());
    }
    let objects = record.objects.len();
    let (tx, mut rx) = tokio::sync::watch::channel(PullProgress::default());
    let work = {
        let (remote, cps, record) = (remote.clone(), cps.clone(), record.clone());
        tokio::spawn(async move { pull::fetch(remote, cps, record, limit, tx).await })
    };
    let app2 = app.clone();
    Ok(ndjson(app.shutdown.clone(), move |em| async move {
        let time = || humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let info = |text: String, p: &PullProgress| json!({"type": "info", "data": text, "pull": p, "time": time()});
        let fail = |text: String| json!({"type": "error", "error": text, "time": time()});
        let mut client = em
            .send(&info(
                format!("Pulling {sprite}/{id}: {} objects, {total} bytes", objects),
                &PullProgress::default(),
            ))
            .await;
        let mut last = std::time::Instant::now();
        // Progress until the fetch ends (the sender drops), a line per 250 ms.
        while rx.changed().await.is_ok() {
            if client && last.elapsed() >= std::time::Duration::from_millis(250) {
                last = std::time::Instant::now();
                let p = rx.borrow_and_update().clone();
                let text = format!(
                    "Fetched {}/{} objects ({} bytes; {} already here)",
                    p.objects + p.reused,
                    p.total_objects,
                    p.bytes,
                    p.reused
                );
                client = em.send(&info(text, &p)).await;
            }
        }
        let imported = match work.await {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "pull refused");
                let _ = em.send(&fail(e.to_string())).await;
                return;
            }
            Err(e) => {
                let _ = em.send(&fail(format!("the pull stopped: {e}"))).await;
                return;
            }
        };
        let p = rx.borrow().clone();
        let _ = em
            .send(&info(
                format!(
                    "Verified {} objects: {} fetched ({} bytes), {} already here",
                    imported.objects, p.objects, p.bytes, p.reused
                ),
                &p,
            ))
            .await;
        match super::checkpoints::publish_imported(
            &app2,
            cps.clone(),
            imported,
            Some(sprite.clone()),
        )
        .await
        {
            Ok((meta, new_objects)) => {
                if let Some(note) = super::checkpoints::unsealed_note(&cps, &meta) {
                    let _ = em.send(&info(note, &p)).await;
                }
                let text = format!("Checkpoint {} pulled from {sprite}/{id}", meta.id);
                let _ = em
                    .send(&json!({"type": "complete", "data": text, "id": meta.id,
                        "new_objects": new_objects, "pull": p, "time": time()}))
                    .await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "pulled checkpoint not published");
                let _ = em.send(&fail(e.to_string())).await;
            }
        }
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcBody {
    /// Unreferenced objects younger than this stay (default 1h; `0s`
    /// takes every unreferenced object).
    grace: Option<String>,
    /// Report what would go, remove nothing.
    #[serde(default)]
    dry_run: bool,
}

/// `POST /v1/remote/gc` `{"grace": "1h", "dry_run": false}`: removes the
/// objects no remote checkpoint of any sprite references (see
/// `remote::gc` for why that is safe while others upload); the report.
pub async fn gc(
    State(app): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let remote = remote(&app)?;
    let req: GcBody = super::params::json_body(&body)?;
    let grace = match req.grace.as_deref() {
        None => std::time::Duration::from_secs(3600),
        Some(g) => humantime::parse_duration(g)
            .map_err(|e| ApiError::BadRequest(format!("grace {g:?}: {e} (e.g. 1h, 30m, 0s)")))?,
    };
    let report = crate::remote::gc::collect(&remote, grace, req.dry_run).await?;
    Ok(Json(json!(report)))
}
