//! The HTTP server loop of both API listeners: hyper's HTTP/1 with a
//! deadline for the request headers, and a cap on connections that have not
//! sent a complete request yet (before any token is checked), so slow or
//! silent connections cannot use up the daemon's file descriptors.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections of one listener that have not sent a complete request yet;
/// past this, no new one is accepted until one of them does (or times out):
/// they wait in the kernel's backlog.
pub const MAX_PENDING: usize = 256;

/// Serves `router` on `listener` until `stop`; then lets in-flight
/// requests finish (the daemon bounds that with `--shutdown-timeout`).
pub async fn serve<L>(mut listener: L, router: Router, stop: CancellationToken)
where
    L: axum::serve::Listener,
{
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = pending.clone().acquire_owned() => p.expect("never closed"),
            _ = stop.cancelled() => break,
        };
        let (io, _) = tokio::select! {
            c = listener.accept() => c,
            _ = stop.cancelled() => break,
        };
        while conns.try_join_next().is_some() {}
        // Released by the first complete request (or when the connection ends).
        let permit = Arc::new(Mutex::new(Some(permit)));
        let (router, stop) = (router.clone(), stop.clone());
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                permit.lock().unwrap_or_else(|e| e.into_inner()).take();
                router.clone().oneshot(req.map(axum::body::Body::new))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    while conns.join_next().await.is_some() {}
}
