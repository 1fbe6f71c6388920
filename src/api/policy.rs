//! `/v1/policy/privileges` (GET, POST, DELETE): the capabilities and
//! `no_new_privs` of processes started in the environment from then on
//! (see [`crate::policy`]). Changing a policy is for the external API: a
//! caller inside the environment, on the Unix socket it sees at
//! `/.sprite/api.sock`, gets a 403.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, State};
use serde_json::{Value, json};

use super::gateway::Caller;
use super::{ApiError, AppState};
use crate::container::Privileges;
use crate::policy::PrivilegesPolicy;

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
