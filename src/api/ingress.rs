//! The public HTTP ingress (`--http-ingress ADDR`): every connection is
//! forwarded, bytes unchanged, to `127.0.0.1:<http_port>` of the one service
//! that declares `http_port`. It is not authenticated: it is the sprite's
//! public web address, as the hosted product's sprite URL is.
//!
//! A connection that arrives while the daemon boots or restores, or while
//! the service starts, waits (up to `--wait-for-running`) for the port to
//! accept instead of failing. Errors are plain HTTP responses:
//! 502 no service declares `http_port`; 503 the service is stopped or the
//! daemon is not running in time; 504 the port did not accept in time.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::AppState;
use crate::supervisor::Status;

/// How often a waiting connection retries the port.
const RETRY: Duration = Duration::from_millis(50);

/// Accepts connections until the daemon shuts down.
pub async fn serve(app: Arc<AppState>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = app.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((client, peer)) => {
                let app = app.clone();
                tokio::spawn(async move {
                    let stop = app.shutdown.clone();
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = forward(app, client, peer) => {}
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "ingress accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tracing::instrument(name = "ingress", skip(app, client), fields(%peer, port))]
async fn forward(app: Arc<AppState>, mut client: TcpStream, peer: std::net::SocketAddr) {
    // An ingress connection wakes the sprite and keeps it awake.
    let _hold = app.sleep.hold();
    app.sleep.wake().await;
    let mut upstream = match upstream(&app).await {
        Ok(u) => u,
        Err((status, message)) => {
            tracing::debug!(status, %message, "ingress refused");
            let _ = client
                .write_all(plain_response(status, &message).as_bytes())
                .await;
            let _ = client.shutdown().await;
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "ingress connection ended");
    }
}

/// Waits for the daemon and the `http_port` service, then dials it.
async fn upstream(app: &AppState) -> Result<TcpStream, (u16, String)> {
    let limit = app.config.wait_for_running;
    let deadline = Instant::now() + limit;
    app.lifecycle
        .wait_running(limit)
        .await
        .map_err(|e| (503, e.to_string()))?;
    loop {
        let Some(sup) = app.supervisor.get() else {
            return Err((503, "services are not loaded".into()));
        };
        let Some(svc) = sup.list().into_iter().find(|s| s.http_port.is_some()) else {
            return Err((
                502,
                "no service declares http_port: create one with \"http_port\" in its definition"
                    .into(),
            ));
        };
        let port = svc.http_port.unwrap_or_default() as u16;
        tracing::Span::current().record("port", port);
        // A stopped service, or one that failed with no restart coming,
        // will not open its port by itself.
        let parked = match svc.state.status {
            Status::Stopped | Status::Stopping => true,
            Status::Failed => svc.state.next_restart_at.is_none(),
            Status::Starting | Status::Running => false,
        };
        if parked {
            return Err((
                503,
                format!(
                    "service {} (http_port {port}) is {}; start it to serve requests",
                    svc.name,
                    serde_json::to_value(svc.state.status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ),
            ));
        }
        let dialed = match app.container.get() {
            Some(c) => c.connect(port).await,
            None => TcpStream::connect(("127.0.0.1", port)).await,
        };
        if let Ok(s) = dialed {
            return Ok(s);
        }
        if Instant::now() + RETRY > deadline {
            return Err((
                504,
                format!(
                    "service {} did not accept connections on port {port} within {limit:?}",
                    svc.name
                ),
            ));
        }
        tokio::time::sleep(RETRY).await;
    }
}

fn plain_response(status: u16, message: &str) -> String {
    let reason = match status {
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Gateway Timeout",
    };
    let body = format!("{message}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_complete_http() {
        let r = plain_response(502, "no service");
        assert!(r.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(r.ends_with("\r\n\r\nno service\n"));
        assert!(r.contains("content-length: 11\r\n"));
        assert!(plain_response(504, "x").starts_with("HTTP/1.1 504 Gateway Timeout"));
    }
}
