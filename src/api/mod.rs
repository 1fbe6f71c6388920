//! The HTTP API, served on TCP (token required) and on the Unix socket.
//!
//! Every route is reachable under three prefixes: the internal `/v1/...`, the
//! external `/v1/sprites/{name}/...` (mapped onto the internal one by
//! [`gateway`], 404 for another sprite's name) and the seed-003 root routes
//! (`/exec`, `/checkpoint`, `/restore`, `/proxy`).

mod checkpoints;
mod control;
pub mod error;
pub mod exec;
mod files;
pub mod gateway;
pub mod ingress;
pub mod params;
mod policy;
mod proxy;
mod remote;
pub mod server;
mod services;
pub mod stream;
mod system;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::Request;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{delete, get, post, put};
use tokio_util::sync::CancellationToken;

use crate::cgroup::{CgroupSupport, Cgroups};
use crate::checkpoint::Checkpoints;
use crate::config::Config;
use crate::criu::CriuSupport;
use crate::lifecycle::Lifecycle;
use crate::reaper::Reaper;
use crate::statedir::Identity;
use crate::supervisor::Supervisor;

pub use error::{ApiError, PlainError};
pub use gateway::Transport;

/// What handlers share. Immutable after boot except the `OnceLock`s, which
/// the boot task fills once.
pub struct AppState {
    pub config: Arc<Config>,
    pub lifecycle: Lifecycle,
    pub identity: Identity,
    /// Seals process images ([`crate::checkpoint::seal`]).
    pub checkpoint_key: crate::checkpoint::seal::Key,
    pub started: Instant,
    pub started_at: SystemTime,
    pub kernel: String,
    /// The TCP address actually bound (useful with port 0).
    pub tcp_addr: Option<SocketAddr>,
    /// The public HTTP ingress address actually bound, if any.
    pub ingress_addr: Option<SocketAddr>,
    /// Spawns and reaps every child process.
    pub reaper: Reaper,
    /// The services, once the boot task loaded them.
    pub supervisor: OnceLock<Supervisor>,
    /// The checkpoint chain, once the environment root is mounted.
    pub checkpoints: OnceLock<Arc<Checkpoints>>,
    /// The environment root, as soon as it is mounted (shutdown unmounts it
    /// even when the boot was cut short).
    pub env: OnceLock<Arc<crate::fs::Env>>,
    /// Why checkpoints are unavailable, if they are.
    pub fs_error: OnceLock<String>,
    /// The daemon's cgroup tree, once the boot task found it.
    pub cgroups: OnceLock<Cgroups>,
    pub cgroup: OnceLock<CgroupSupport>,
    pub criu: OnceLock<CriuSupport>,
    /// The environment's container (its init and namespaces), once the
    /// boot task set it up.
    pub container: OnceLock<crate::container::Container>,
    /// The shared bucket (--remote).
    pub remote: OnceLock<Arc<crate::remote::Remote>>,
    /// The uploads of checkpoints to it, once checkpoints are available.
    pub uploads: OnceLock<Arc<crate::remote::Uploads>>,
    /// Exec sessions, once the boot task set them up.
    pub sessions: OnceLock<crate::exec::Sessions>,
    /// The listening-port watcher.
    pub ports: OnceLock<crate::ports::Ports>,
    /// Idleness, sleep and wake: every counted request passes through it.
    pub sleep: Arc<crate::sleep::Sleep>,
    /// Open `/v1/fs/watch` subscriptions (bounded).
    pub watches: crate::watch::Subscriptions,
    /// The sprite's policies (`<state>/policy/`).
    pub policies: crate::policy::PolicyStore,
    /// Cancelled when the daemon shuts down: long streams end on it.
    pub shutdown: CancellationToken,
}

/// The routes, relative to the internal shape.
fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/status", get(system::status))
        .route("/v1/sleep", post(system::sleep))
        .route("/v1/wake", post(system::wake))
        .route("/v1/ready", get(system::ready))
        .route("/v1/sprite", get(system::sprite_record))
        .route("/v1/services", get(services::list))
        .route("/v1/services/signal", post(services::signal))
        .route(
            "/v1/services/{name}",
            get(services::get)
                .put(services::put)
                .delete(services::delete),
        )
        .route("/v1/services/{name}/start", post(services::start))
        .route("/v1/services/{name}/stop", post(services::stop))
        .route("/v1/services/{name}/restart", post(services::restart))
        .route("/v1/services/{name}/logs", get(services::logs))
        // Exec: seed-003 root and internal shapes. Exec and the proxies wait
        // for `running`; CONNECT (any target) is handled by the gateway.
        .route("/exec", exec_routes())
        .route("/v1/exec", exec_routes())
        .route(
            "/exec/{id}",
            get(exec::exec_attach).delete(exec::exec_delete),
        )
        .route(
            "/v1/exec/{id}",
            get(exec::exec_attach).delete(exec::exec_delete),
        )
        .route("/exec/{id}/kill", post(exec::exec_kill))
        .route("/v1/exec/{id}/kill", post(exec::exec_kill))
        .route("/proxy", get(proxy::ws_proxy))
        .route("/v1/proxy", get(proxy::ws_proxy))
        .route("/v1/ports/watch", get(proxy::ports_watch))
        .route("/v1/control", get(control::control_ws))
        .route("/v1/fs/read", get(files::read))
        .route("/v1/fs/write", put(files::write).post(files::write))
        .route("/v1/fs/list", get(files::list))
        .route("/v1/fs/delete", delete(files::delete))
        .route("/v1/fs", delete(files::delete))
        .route("/v1/fs/rename", post(files::rename))
        .route("/v1/fs/copy", post(files::copy))
        .route("/v1/fs/chmod", post(files::chmod))
        .route(
            "/v1/policy/privileges",
            get(policy::get_privileges)
                .post(policy::set_privileges.layer(DefaultBodyLimit::max(policy::MAX_BODY)))
                .delete(policy::delete_privileges),
        )
        .route(
            "/v1/policy/network",
            get(policy::get_network)
                .post(policy::set_network.layer(DefaultBodyLimit::max(policy::MAX_BODY)))
                .delete(policy::delete_network),
        )
        .route(
            "/v1/policy/resources",
            get(policy::get_resources)
                .post(policy::set_resources.layer(DefaultBodyLimit::max(policy::MAX_BODY)))
                .delete(policy::delete_resources),
        )
        .route("/v1/fs/chown", post(files::chown))
        .route("/v1/fs/watch", get(files::watch))
        .route("/checkpoint", post(checkpoints::root_checkpoint))
        .route("/restore", post(checkpoints::root_restore))
        .route("/v1/checkpoint", post(checkpoints::create))
        .route(
            "/v1/checkpoints",
            get(checkpoints::list).post(checkpoints::create),
        )
        .route(
            "/v1/checkpoints/{id}",
            get(checkpoints::get).delete(checkpoints::delete),
        )
        .route("/v1/checkpoints/{id}/restore", post(checkpoints::restore))
        .route("/v1/checkpoints/{id}/export", get(checkpoints::export))
        .route("/v1/checkpoints/{id}/push", post(remote::push))
        .route("/v1/remote/checkpoints", get(remote::list))
        .route("/v1/remote/gc", post(remote::gc))
        .route(
            "/v1/remote/checkpoints/{sprite}/{id}/pull",
            post(remote::pull),
        )
        .route(
            "/v1/remote/checkpoints/{sprite}/{id}",
            get(remote::get).delete(remote::delete),
        )
        .route(
            "/v1/checkpoints/import",
            post(checkpoints::import.layer(DefaultBodyLimit::disable())),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            keep_awake,
        ))
        .with_state(state)
}

/// Reads that show whether the sprite sleeps, and the call that puts it to
/// sleep: they neither wake it nor count as activity.
fn leaves_asleep(method: &Method, path: &str) -> bool {
    (method == Method::GET && matches!(path, "/v1/status" | "/v1/sprite"))
        || (method == Method::POST && path == "/v1/sleep")
}

/// A checkpoint's creation: it counts as activity but does not wake a cold
/// sprite (its handler takes the cold sleep's images instead).
fn checkpoints_while_cold(method: &Method, path: &str) -> bool {
    method == Method::POST && matches!(path, "/v1/checkpoint" | "/v1/checkpoints" | "/checkpoint")
}

/// Every other request counts as activity for as long as its response is
/// being sent, and finds the sprite awake (waking it first: a thaw, or a
/// restore of the whole tree).
async fn keep_awake(
    axum::extract::State(app): axum::extract::State<Arc<AppState>>,
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if leaves_asleep(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let hold = app.sleep.hold();
    if !checkpoints_while_cold(req.method(), req.uri().path()) {
        app.sleep.wake().await;
    }
    let resp = next.run(req).await;
    let (parts, body) = resp.into_parts();
    axum::response::Response::from_parts(
        parts,
        axum::body::Body::new(HeldBody { body, _hold: hold }),
    )
}

/// A response body that keeps the sprite awake until it is sent (or dropped).
struct HeldBody {
    body: axum::body::Body,
    _hold: crate::sleep::Hold,
}

impl http_body::Body for HeldBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The framework's own refusals (a body over the limit, a malformed
/// request) come as plain text: under `/v1/` they become JSON
/// `{"error": ...}` like every other error there. The seed-003 root routes
/// keep plain text, as that seed says.
async fn json_errors(req: Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    use axum::response::IntoResponse;
    let v1 = req.uri().path().starts_with("/v1/");
    let resp = next.run(req).await;
    let plain = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/plain"));
    if !v1 || !plain || !resp.status().is_client_error() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let mut out = axum::Json(serde_json::json!({
        "error": String::from_utf8_lossy(&text).trim(),
    }))
    .into_response();
    *out.status_mut() = parts.status;
    for (k, v) in parts.headers.iter() {
        if k != CONTENT_TYPE && k != CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

fn exec_routes() -> axum::routing::MethodRouter<Arc<AppState>> {
    // exec_post applies its own cap (413 with a message).
    get(exec::exec_get).post(exec::exec_post.layer(DefaultBodyLimit::disable()))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(method: Method, req: Request) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: req.uri().path().to_owned(),
    }
}

/// The service for one listener: gateway (auth, path mapping) around the routes.
pub fn service(state: Arc<AppState>, transport: Transport) -> Router {
    let gw = gateway::Gateway {
        state: state.clone(),
        transport,
    };
    // A router whose only job is to run the gateway before the real router routes.
    let inner = routes(state);
    Router::new()
        .fallback_service(inner)
        .layer(axum::middleware::from_fn_with_state(gw, gateway::gateway))
}
