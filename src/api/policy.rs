//! `/v1/policy/privileges` (GET, POST, DELETE): the capabilities and
//! `no_new_privs` of processes started in the environment from then on;
//! `/v1/policy/resources`: the environment's memory limit, at once (see
//! [`crate::policy`]). Changing a policy is for the external API: a
//! caller inside the environment, on the Unix socket it sees at
//! `/.sprite/api.sock`, gets a 403.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, State};
use serde_json::{Value, json};

use super::gateway::Caller;
use super::{ApiError, AppState};
use crate::container::Privileges;
use crate::policy::{NetworkPolicy, PolicyError, PrivilegesPolicy, ResourcesPolicy};

/// The largest policy body read: enough for a hostile one (100,000 rules,
/// a 1 MiB name) to reach the checks and be refused with a 400 naming its
/// field, rather than a bare 413.
pub const MAX_BODY: usize = 16 << 20;

/// `GET .../policy/privileges`: the policy in force (`{}` fields at their
/// defaults when none was set).
pub async fn get_privileges(State(app): State<Arc<AppState>>) -> Json<Value> {
    let p = app.policies.privileges().unwrap_or_default();
    Json(serde_json::to_value(p).unwrap_or_else(|_| json!({})))
}

/// `POST .../policy/privileges`: checked, stored, then in force for the
/// next process started; a bad one is a 400 naming the field, and the
/// previous policy stays.
pub async fn set_privileges(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    caller.may_change("the privileges policy")?;
    let p = PrivilegesPolicy::from_request(&body)?;
    let privileges = p.privileges()?;
    let store = app.clone();
    let shown = p.clone();
    tokio::task::spawn_blocking(move || {
        store.policies.update(|s| {
            s.set_privileges(&p)?;
            apply(&store, privileges);
            Ok(())
        })
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("storing the policy failed: {e}")))??;
    tracing::info!(policy = ?shown, "privileges policy set");
    Ok(Json(
        serde_json::to_value(shown).unwrap_or_else(|_| json!({})),
    ))
}

/// `DELETE .../policy/privileges`: back to the default set.
pub async fn delete_privileges(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.may_change("the privileges policy")?;
    let store = app.clone();
    tokio::task::spawn_blocking(move || {
        store.policies.update(|s| {
            s.clear_privileges()?;
            apply(&store, Privileges::default());
            Ok(())
        })
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("removing the policy failed: {e}")))??;
    tracing::info!("privileges policy removed");
    Ok(Json(json!({})))
}

/// Hands the launcher what the next process started may hold.
fn apply(app: &AppState, privileges: Privileges) {
    if let Some(c) = app.container.get() {
        c.set_privileges(privileges);
    }
}

/// `GET .../policy/resources`: `{"memory": {"limit_mb", "autoscale"}}`, or
/// `{}` without a limit.
pub async fn get_resources(State(app): State<Arc<AppState>>) -> Json<Value> {
    let p = app.policies.resources().unwrap_or_default();
    Json(serde_json::to_value(p).unwrap_or_else(|_| json!({})))
}

/// `POST .../policy/resources`: checked, put in force on the environment's
/// cgroup at once (running processes included), then stored. Where the
/// memory controller is not available, a 503 and nothing changes.
pub async fn set_resources(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    caller.may_change("the resources policy")?;
    let p = ResourcesPolicy::from_request(&body)?;
    change_resources(&app, Some(p.clone())).await?;
    tracing::info!(policy = ?p, "resources policy set");
    Ok(Json(serde_json::to_value(p).unwrap_or_else(|_| json!({}))))
}

/// `DELETE .../policy/resources`: no limit.
pub async fn delete_resources(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.may_change("the resources policy")?;
    change_resources(&app, None).await?;
    tracing::info!("resources policy removed");
    Ok(Json(json!({})))
}

/// Applies `p` (none: no limit) to the environment's cgroup, then stores
/// it; if storing fails, the previous limit is put back.
async fn change_resources(app: &Arc<AppState>, p: Option<ResourcesPolicy>) -> Result<(), ApiError> {
    let cgroups =
        app.cgroups.get().cloned().ok_or_else(|| {
            ApiError::Unavailable("cgroups are unavailable (see /v1/status)".into())
        })?;
    let app = app.clone();
    tokio::task::spawn_blocking(move || {
        app.policies.update(|s| {
            let before = s.resources().and_then(|p| p.memory_max());
            let max = p.as_ref().and_then(ResourcesPolicy::memory_max);
            if let Err(e) = cgroups.set_memory_limit(max) {
                tracing::warn!(error = %e, "cannot set the memory limit");
                return Ok(Err(ApiError::Unavailable(
                    "the memory limit cannot be enforced here: this host's cgroup v2 offers no memory controller to the daemon; nothing changed".into(),
                )));
            }
            let stored = match &p {
                Some(p) => s.set_resources(p),
                None => s.clear_resources(),
            };
            if let Err(e) = stored {
                let _ = cgroups.set_memory_limit(before);
                return Err::<Result<(), ApiError>, PolicyError>(e);
            }
            Ok(Ok(()))
        })
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("changing the policy failed: {e}")))???;
    Ok(())
}

/// `GET .../policy/network`: the rules in force (none: everything
/// allowed).
pub async fn get_network(State(app): State<Arc<AppState>>) -> Json<Value> {
    let p = match app.container.get().and_then(|c| c.network()) {
        Some(net) => net.policy().await.unwrap_or_default(),
        None => NetworkPolicy::default(),
    };
    Json(json!({"rules": p.rules}))
}

/// `POST .../policy/network`: checked (400s naming the field), put in
/// force at once (lookups, the filter, open connections), then stored: 204.
/// Where the environment shares the host's network namespace it cannot be
/// enforced: a 501, and nothing is stored.
pub async fn set_network(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<axum::http::StatusCode, ApiError> {
    caller.may_change("the network policy")?;
    let p = NetworkPolicy::from_request(&body)?;
    change_network(&app, Some(p.clone())).await?;
    tracing::info!(rules = p.rules.len(), "network policy set");
    // (204: both SDKs' `update_network_policy` expect no body)
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// `DELETE .../policy/network`: everything allowed again.
pub async fn delete_network(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.may_change("the network policy")?;
    change_network(&app, None).await?;
    tracing::info!("network policy removed");
    Ok(Json(json!({"rules": []})))
}

/// Puts `p` in force, then stores it; if storing fails, the previous
/// policy is put back.
async fn change_network(app: &Arc<AppState>, p: Option<NetworkPolicy>) -> Result<(), ApiError> {
    let Some(net) = app.container.get().and_then(|c| c.network()).cloned() else {
        return Err(ApiError::NotImplemented(
            "network policies are not enforced here: the environment shares the host's network namespace (start the daemon with --network own); nothing was stored".into(),
        ));
    };
    let before = net.policy().await;
    net.apply(p.clone()).await.map_err(|e| {
        tracing::error!(error = %e, "cannot put the network policy in force");
        ApiError::Unavailable(
            "the network policy could not be put in force; the previous one stays".into(),
        )
    })?;
    let store = app.clone();
    let stored = tokio::task::spawn_blocking(move || {
        store.policies.update(|s| match &p {
            Some(p) if !p.rules.is_empty() => s.set_network(p),
            _ => s.clear_network(),
        })
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("storing the policy failed: {e}")));
    match stored {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            let _ = net.apply(before).await;
            Err(e.into())
        }
        Err(e) => {
            let _ = net.apply(before).await;
            Err(e)
        }
    }
}
