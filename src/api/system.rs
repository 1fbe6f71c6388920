//! Daemon-level routes: status, readiness, this sprite's record, and the
//! seed-003 root routes whose features come in later work.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::lifecycle::State as Life;

/// `GET /v1/status`: lifecycle state, version, uptime, kernel, and what was
/// detected at start (`null` while the daemon is still detecting it).
pub async fn status(State(app): State<Arc<AppState>>) -> Json<Value> {
    let c = &app.config;
    Json(json!({
        "state": app.lifecycle.state(),
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "started_at": humantime::format_rfc3339_millis(app.started_at).to_string(),
        "uptime_secs": app.started.elapsed().as_secs_f64(),
        "kernel": app.kernel,
        "sprite": { "id": app.identity.id, "name": c.sprite_name },
        "state_dir": c.state_dir,
        "listen": {
            "tcp": app.tcp_addr.map(|a| a.to_string()),
            "unix": c.socket_path,
            "http_ingress": app.ingress_addr.map(|a| a.to_string()),
            "auth": match c.tcp_auth { crate::config::TcpAuth::Token(_) => "token", crate::config::TcpAuth::Insecure => "none" },
        },
        "wait_for_running_secs": c.wait_for_running.as_secs_f64(),
        "sleep": sleep_json(&app),
        "cgroup": app.cgroup.get(),
        "criu": app.criu.get(),
        "remote": app.remote.get().map(|r| r.status()),
        "network": match app.container.get().and_then(|c| c.network()) {
            Some(net) => json!({"mode": "own", "policy_enforced": true, "address": net.address().to_string(), "interface": net.interface()}),
            None if c.own_network.is_some() => json!({"mode": "own", "policy_enforced": false, "error": "the environment's network could not be made (see the log)"}),
            None => json!({"mode": "host", "policy_enforced": false}),
        },
        "fs": match app.checkpoints.get() {
            Some(c) => {
                let st = c.env().state();
                json!({"available": true, "env_root": c.env().root(), "source": st.source, "layer": st.layer})
            }
            None => json!({"available": false, "error": app.fs_error.get()}),
        },
    }))
}

/// `GET /v1/ready`: waits (up to `--wait-for-running`) for `running`, like
/// `/exec` and `/proxy` do; 200 then, 503 after the wait.
pub async fn ready(State(app): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    app.lifecycle
        .wait_running(app.config.wait_for_running)
        .await?;
    Ok(Json(json!({ "state": Life::Running })))
}

/// `GET /v1/sprites/{name}` (internally `/v1/sprite`): this sprite's record,
/// shaped like the hosted API's sprite object.
pub async fn sprite_record(State(app): State<Arc<AppState>>) -> Json<Value> {
    let status = match app.lifecycle.state() {
        Life::Running | Life::Checkpointing | Life::Restoring => app.sleep.depth().as_str(),
        Life::Booting | Life::ShuttingDown => "warm",
    };
    Json(json!({
        "id": app.identity.id,
        "name": app.config.sprite_name,
        "status": status,
        "created_at": app.identity.created_at,
        "updated_at": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "url": app.config.url,
    }))
}

/// The sleep part of `/v1/status`: `status` (`running`, `warm`, `cold`),
/// `since`, how long it has slept, what the last wake could not restore,
/// and the settings.
fn sleep_json(app: &AppState) -> Value {
    let st = app.sleep.status();
    json!({
        "status": st.status,
        "since": st.since.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        "slept_secs": st.since.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs_f64()),
        "last_wake_error": st.last_wake_error,
        "auto_sleep_secs": app.config.auto_sleep.as_secs_f64(),
        "cold_after_secs": app.config.cold_after.as_secs_f64(),
    })
}

/// `POST /v1/sleep?cold=true`: sleeps now (warm, or cold), whatever the
/// activity. 409 while a checkpoint or restore runs.
pub async fn sleep(
    State(app): State<Arc<AppState>>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<Json<Value>, ApiError> {
    let q = super::params::Params::parse(q.as_deref());
    let cold = q.flag("cold")?.unwrap_or(false);
    app.lifecycle
        .wait_running(app.config.wait_for_running)
        .await?;
    app.sleep.force(cold).await?;
    Ok(Json(sleep_json(&app)))
}

/// `POST /v1/wake`: awake (the request itself woke the sprite).
pub async fn wake(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(sleep_json(&app))
}
