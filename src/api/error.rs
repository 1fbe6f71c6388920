//! Every error a handler can return, and the one place that turns errors into
//! HTTP status codes. The `match`es are exhaustive with no `_` arm: a new
//! error variant anywhere forces a decision here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::archive::ArchiveError;
use crate::checkpoint::CheckpointError;
use crate::exec::ExecError;
use crate::files::FilesError;
use crate::lifecycle::LifecycleError;
use crate::policy::PolicyError;
use crate::remote::RemoteError;
use crate::sleep::SleepError;
use crate::supervisor::SupervisorError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unauthorized: missing or invalid token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("{0}")]
    BadRequest(String),
    /// Refused to this caller (a change only the external API may make).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotImplemented(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    BadGateway(String),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Sleep(#[from] SleepError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Policy(e) => match e {
                PolicyError::Invalid { .. } => StatusCode::BAD_REQUEST,
                PolicyError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Exec(e) => match e {
                ExecError::Invalid(_) => StatusCode::BAD_REQUEST,
                ExecError::NotFound(_) => StatusCode::NOT_FOUND,
                ExecError::Start { .. } => StatusCode::BAD_REQUEST,
                ExecError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                ExecError::Cgroup(_) | ExecError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Files(e) => match e {
                FilesError::Outside { .. } | FilesError::Invalid(_) => StatusCode::BAD_REQUEST,
                FilesError::Limit {
                    too_large: true, ..
                } => StatusCode::PAYLOAD_TOO_LARGE,
                FilesError::Limit { .. } => StatusCode::BAD_REQUEST,
                FilesError::Os { errno, .. } => errno_status(*errno),
                // (nobody is left to read it)
                FilesError::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            },
            ApiError::Remote(e) => match e {
                RemoteError::NotConfigured => StatusCode::CONFLICT,
                RemoteError::NotFound { .. } => StatusCode::NOT_FOUND,
                RemoteError::BadName(_) | RemoteError::BadConfig { .. } => StatusCode::BAD_REQUEST,
                // The bucket failed or gave something unacceptable.
                RemoteError::Store { .. } | RemoteError::BadRecord { .. } => {
                    StatusCode::BAD_GATEWAY
                }
                RemoteError::Checkpoint(_) | RemoteError::GcRunning => StatusCode::CONFLICT,
                RemoteError::Pull(a) => match a {
                    ArchiveError::Invalid { .. } | ArchiveError::Read { .. } => {
                        StatusCode::BAD_GATEWAY
                    }
                    ArchiveError::TooLarge { limit, .. } => too_large(limit),
                    ArchiveError::Store(_) | ArchiveError::Write(_) => {
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                },
                RemoteError::Io(_) | RemoteError::Fs(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Lifecycle(e) => match e {
                LifecycleError::Busy { .. } => StatusCode::CONFLICT,
                LifecycleError::NotRunning { .. } => StatusCode::SERVICE_UNAVAILABLE,
                LifecycleError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                LifecycleError::Invalid { .. } => StatusCode::CONFLICT,
            },
            ApiError::Supervisor(e) => supervisor_status(e),
            ApiError::Sleep(e) => match e {
                SleepError::Refused(_) => StatusCode::CONFLICT,
                SleepError::Freeze(_) | SleepError::Dump(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
            ApiError::Checkpoint(e) => match e {
                CheckpointError::NotFound(_) => StatusCode::NOT_FOUND,
                CheckpointError::BadId(_) => StatusCode::BAD_REQUEST,
                CheckpointError::Exists(_)
                | CheckpointError::InUse(_)
                | CheckpointError::Exporting(_) => StatusCode::CONFLICT,
                CheckpointError::Archive(a) => match a {
                    ArchiveError::Invalid { .. } => StatusCode::BAD_REQUEST,
                    ArchiveError::TooLarge { limit, .. } => too_large(limit),
                    ArchiveError::Read { .. } => StatusCode::BAD_GATEWAY,
                    ArchiveError::Store(_) | ArchiveError::Write(_) => {
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                },
                CheckpointError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                CheckpointError::Supervisor(inner) => supervisor_status(inner),
                CheckpointError::Fs(_)
                | CheckpointError::Cgroup(_)
                | CheckpointError::Criu(_)
                | CheckpointError::Durable(_)
                | CheckpointError::Container(_)
                | CheckpointError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// The plain-text form the seed-003 root routes (and 401s) use.
    pub fn plain(self) -> PlainError {
        PlainError(self)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if matches!(self, ApiError::Unauthorized) {
            return PlainError(self).into_response();
        }
        // An internal error's text can name host paths (the state dir, the
        // store): it stays in the log, and the client gets a reference to
        // the log line.
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(%status, error_id = id, error = %self, "request failed");
            format!("internal error #{id}: the daemon's log has the details")
        } else {
            if status.is_server_error() {
                tracing::warn!(%status, error = %self, "request failed");
            }
            self.to_string()
        };
        let mut body = serde_json::json!({ "error": message });
        if let ApiError::Files(e) = &self {
            // The SDKs read `path` and the POSIX `code`.
            body["path"] = e.path().into();
            body["code"] = e.code().into();
        }
        let mut resp = (status, axum::Json(body)).into_response();
        add_headers(&self, &mut resp);
        resp
    }
}

/// A checkpoint too big to import or pull: 413 past the operator's limit,
/// 507 when the disk cannot take it.
fn too_large(limit: &crate::archive::Limit) -> StatusCode {
    if limit.configured {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::INSUFFICIENT_STORAGE
    }
}

fn supervisor_status(e: &SupervisorError) -> StatusCode {
    match e {
        SupervisorError::NotFound(_) => StatusCode::NOT_FOUND,
        SupervisorError::Invalid { .. } => StatusCode::BAD_REQUEST,
        SupervisorError::Conflict(_) => StatusCode::CONFLICT,
        SupervisorError::NotRunning(_) => StatusCode::CONFLICT,
        SupervisorError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        SupervisorError::Start { .. }
        | SupervisorError::Cgroup(_)
        | SupervisorError::Durable(_)
        | SupervisorError::Io { .. }
        | SupervisorError::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// What a failed system call on a request's path means to the client.
fn errno_status(e: nix::errno::Errno) -> StatusCode {
    use nix::errno::Errno;
    match e {
        Errno::ENOENT => StatusCode::NOT_FOUND,
        Errno::EEXIST => StatusCode::CONFLICT,
        Errno::EACCES | Errno::EPERM | Errno::EROFS => StatusCode::FORBIDDEN,
        Errno::EISDIR
        | Errno::ENOTDIR
        | Errno::ENOTEMPTY
        | Errno::EINVAL
        | Errno::ELOOP
        | Errno::ENAMETOOLONG
        | Errno::EXDEV
        | Errno::EBUSY => StatusCode::BAD_REQUEST,
        Errno::ENOSPC => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An [`ApiError`] rendered as `text/plain`, as seed 003 specifies.
#[derive(Debug)]
pub struct PlainError(pub ApiError);

impl IntoResponse for PlainError {
    fn into_response(self) -> Response {
        let mut resp = (self.0.status(), format!("{}\n", self.0)).into_response();
        add_headers(&self.0, &mut resp);
        resp
    }
}

fn add_headers(e: &ApiError, resp: &mut Response) {
    if matches!(e, ApiError::Unauthorized) {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if matches!(e, ApiError::PayloadTooLarge(_)) {
        // The rest of the body is not read: the connection cannot be reused.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}
