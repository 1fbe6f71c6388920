//! The Services API (seeds 000 and 001; the `sprites-py` SDK's services.py).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::CancellationToken;

use super::stream::{Emitter, ndjson};
use super::{ApiError, AppState};
use crate::supervisor::{
    Event, EventKind, ServiceSpec, Supervisor, SupervisorError, parse_signal, spec,
};

/// Default time a start streams the service's output.
const DEFAULT_FOLLOW: Duration = Duration::from_secs(5);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on `duration` and `timeout` parameters.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

fn supervisor(app: &AppState) -> Result<Supervisor, ApiError> {
    app.supervisor.get().cloned().ok_or_else(|| {
        ApiError::Unavailable("services are not loaded yet (the daemon is booting)".into())
    })
}

fn duration_param(
    name: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ApiError> {
    match value {
        None | Some("") => Ok(default),
        Some(v) => crate::config::parse_duration(v)
            .filter(|d| *d <= MAX_WAIT)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{name} {v:?} is not a duration like 5s, 1m or 2.5 (max 24h)"
                ))
            }),
    }
}

#[derive(Debug, Deserialize)]
pub struct FollowQuery {
    duration: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct StopQuery {
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct LogsQuery {
    lines: Option<String>,
    duration: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct SignalBody {
    name: String,
    signal: String,
}

/// `GET /v1/services`
pub async fn list(State(app): State<Arc<AppState>>) -> Result<Response, ApiError> {
    Ok(Json(supervisor(&app)?.list()).into_response())
}

/// `GET /v1/services/{name}`
pub async fn get(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(supervisor(&app)?.get(&name)?).into_response())
}

/// `PUT /v1/services/{name}`: create or update, then start (restarting a
/// running service whose spec changed); streams its output for `duration`.
pub async fn put(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<FollowQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let sup = supervisor(&app)?;
    let follow = duration_param("duration", q.duration.as_deref(), DEFAULT_FOLLOW)?;
    if name == "signal" {
        return Err(ApiError::BadRequest(
            "\"signal\" is reserved (POST /v1/services/signal)".into(),
        ));
    }
    spec::validate_name(&name)?;
    let spec: ServiceSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid service definition: {e}")))?;
    let outcome = sup.put(&name, spec)?;
    let names = sup.start_order(&name);
    let (op_sup, op_name) = (sup.clone(), name.clone());
    let op = async move {
        if outcome.restart {
            op_sup
                .stop_if_running(&op_name, DEFAULT_STOP_TIMEOUT)
                .await?;
        }
        op_sup.start(&op_name).await
    };
    Ok(stream_op(&app, sup, names, name, op, follow))
}

/// `DELETE /v1/services/{name}`: 204; 409 naming the services that need it.
pub async fn delete(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    supervisor(&app)?.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/services/{name}/start`: starts what it needs first, then it.
pub async fn start(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<FollowQuery>,
) -> Result<Response, ApiError> {
    let sup = supervisor(&app)?;
    let follow = duration_param("duration", q.duration.as_deref(), DEFAULT_FOLLOW)?;
    sup.get(&name)?;
    let names = sup.start_order(&name);
    let (op_sup, op_name) = (sup.clone(), name.clone());
    let op = async move { op_sup.start(&op_name).await };
    Ok(stream_op(&app, sup, names, name, op, follow))
}

/// `POST /v1/services/{name}/restart`: stop if running, then start.
pub async fn restart(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<FollowQuery>,
) -> Result<Response, ApiError> {
    let sup = supervisor(&app)?;
    let follow = duration_param("duration", q.duration.as_deref(), DEFAULT_FOLLOW)?;
    sup.get(&name)?;
    let names = sup.start_order(&name);
    let (op_sup, op_name) = (sup.clone(), name.clone());
    let op = async move {
        op_sup
            .stop_if_running(&op_name, DEFAULT_STOP_TIMEOUT)
            .await?;
        op_sup.start(&op_name).await
    };
    Ok(stream_op(&app, sup, names, name, op, follow))
}

/// `POST /v1/services/{name}/stop?timeout=10s`: 409 when it is not running.
pub async fn stop(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<StopQuery>,
) -> Result<Response, ApiError> {
    let sup = supervisor(&app)?;
    let timeout = duration_param("timeout", q.timeout.as_deref(), DEFAULT_STOP_TIMEOUT)?;
    let record = sup.get(&name)?;
    let restart_scheduled = record.state.next_restart_at.is_some();
    if crate::supervisor::state::is_idle(record.state.status, restart_scheduled) {
        return Err(SupervisorError::NotRunning(name).into());
    }
    let (op_sup, op_name) = (sup.clone(), name.clone());
    let op = async move { op_sup.stop(&op_name, timeout, true).await.map(|_| ()) };
    let names = vec![name.clone()];
    Ok(stream_op(&app, sup, names, name, op, Duration::ZERO))
}

/// `POST /v1/services/signal` `{name, signal}`: 204.
pub async fn signal(State(app): State<Arc<AppState>>, body: Bytes) -> Result<StatusCode, ApiError> {
    let sup = supervisor(&app)?;
    let req: SignalBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))?;
    let sig = parse_signal(&req.signal).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "unknown signal {:?} (use TERM, SIGHUP, 9, …)",
            req.signal
        ))
    })?;
    sup.signal(&req.name, sig).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/services/{name}/logs?lines=N&duration=D`: the last `lines` lines
/// (default all kept), then new output for `duration` (default none).
pub async fn logs(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let sup = supervisor(&app)?;
    let lines = match q.lines.as_deref() {
        None | Some("") => None,
        Some(v) => Some(
            v.parse::<usize>()
                .map_err(|_| ApiError::BadRequest(format!("lines {v:?} is not a number")))?,
        ),
    };
    let follow = duration_param("duration", q.duration.as_deref(), Duration::ZERO)?;
    let sub = sup.subscribe(); // before reading the tail: nothing falls between
    let tail = sup.log_tail(&name, lines)?;
    let shutdown = app.shutdown.clone();
    Ok(ndjson(app.shutdown.clone(), move |em| async move {
        for line in tail {
            let kind = match line.stream {
                crate::supervisor::logs::Stream::Stdout => EventKind::Stdout,
                crate::supervisor::logs::Stream::Stderr => EventKind::Stderr,
            };
            let mut ev = Event::new(kind, &name).data(line.data);
            ev.timestamp = line.timestamp_ms;
            if !em.send(&ev).await {
                return;
            }
        }
        let op = async { Ok::<(), SupervisorError>(()) };
        run_and_follow(sup, em, sub, vec![name.clone()], name, op, follow, shutdown).await;
    }))
}

/// Streams the events of `names` while `op` runs and for `follow` after it.
fn stream_op(
    app: &AppState,
    sup: Supervisor,
    names: Vec<String>,
    target: String,
    op: impl std::future::Future<Output = Result<(), SupervisorError>> + Send + 'static,
    follow: Duration,
) -> Response {
    let sub = sup.subscribe(); // before `op` first runs: no event is missed
    // Its own task: a client that goes away stops following, not the
    // operation (a stop dropped half-way would leave its service stopping).
    let op = tokio::spawn(op);
    let op = async move {
        op.await
            .unwrap_or_else(|e| Err(SupervisorError::Unavailable(e.to_string())))
    };
    let shutdown = app.shutdown.clone();
    ndjson(app.shutdown.clone(), move |em| {
        run_and_follow(sup, em, sub, names, target, op, follow, shutdown)
    })
}

/// Runs `op` while forwarding the events of `names`, keeps forwarding for
/// `follow` after it finishes, then sends `complete` (or `error` if it failed).
#[allow(clippy::too_many_arguments)]
async fn run_and_follow(
    sup: Supervisor,
    em: Emitter,
    mut sub: tokio::sync::broadcast::Receiver<Event>,
    names: Vec<String>,
    target: String,
    op: impl std::future::Future<Output = Result<(), SupervisorError>> + Send,
    follow: Duration,
    shutdown: CancellationToken,
) {
    let names: BTreeSet<String> = names.into_iter().collect();
    tokio::pin!(op);
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut failure: Option<SupervisorError> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = &mut op, if deadline.is_none() => match r {
                Ok(()) => deadline = Some(tokio::time::Instant::now() + follow),
                Err(e) => { failure = Some(e); break; }
            },
            ev = sub.recv() => match ev {
                Ok(ev) if names.contains(&ev.service) => if !em.send(&ev).await { return },
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => break,
        }
    }
    // Whatever was already broadcast belongs before the end.
    loop {
        match sub.try_recv() {
            Ok(ev) if names.contains(&ev.service) => {
                if !em.send(&ev).await {
                    return;
                }
            }
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
        }
    }
    if let Some(e) = failure {
        // A failed spawn already sent its own `error` event.
        if !matches!(e, SupervisorError::Start { .. }) {
            let _ = em
                .send(&Event::new(EventKind::Error, &target).data(e.to_string()))
                .await;
        }
    }
    let mut complete = Event::new(EventKind::Complete, &target);
    complete.log_files = Some(sup.log_files(&target));
    let _ = em.send(&complete).await;
}
