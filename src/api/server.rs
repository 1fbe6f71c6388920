//! The HTTP server loop of both API listeners: hyper's HTTP/1, a deadline
//! for a connection's first request, and a cap on connections that have not
//! sent one yet (before any token is checked), so slow or silent
//! connections cannot use up the daemon's file descriptors. A connection
//! that sent a request is then kept alive as long as its client likes (a
//! 401 closes it: only authenticated connections stay).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::gateway::Caller;

/// How long a new connection may take to send its first request's headers.
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
    L::Io: Peer,
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
        let caller = io.caller();
        while conns.try_join_next().is_some() {}
        // Released by the first complete request (or when the connection ends).
        let permit = Arc::new(Mutex::new(Some(permit)));
        let first = Arc::new(tokio::sync::Notify::new());
        let (router, stop) = (router.clone(), stop.clone());
        conns.spawn(async move {
            let arrived = first.clone();
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                if permit
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .is_some()
                {
                    arrived.notify_one();
                }
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut().insert(caller);
                router.clone().oneshot(req)
            });
            // No hyper timer: its header_read_timeout would also close idle
            // keep-alive connections under a client about to reuse them.
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = first.notified() => {}
                // No complete request in time: dropped (closed).
                _ = tokio::time::sleep(HEADER_TIMEOUT) => return,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                    return;
                }
            }
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

/// What a connection says of its caller.
pub trait Peer {
    fn caller(&self) -> Caller;
}

impl Peer for tokio::net::TcpStream {
    fn caller(&self) -> Caller {
        Caller::Tcp
    }
}

impl Peer for tokio::net::UnixStream {
    fn caller(&self) -> Caller {
        Caller::of_unix_peer(self.peer_cred().ok().and_then(|c| c.pid()))
    }
}
