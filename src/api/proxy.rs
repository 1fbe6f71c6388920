//! Tunnels to ports inside the sprite: HTTP `CONNECT` (seed 003; only the
//! port is used, the target is always `127.0.0.1`), the WebSocket TCP proxy,
//! and the WebSocket port watch.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{ApiError, AppState};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Dials `127.0.0.1:port` in the environment, with a clear error for a
/// closed port.
pub async fn dial(app: &AppState, port: u16) -> Result<TcpStream, ApiError> {
    if port == 0 {
        return Err(ApiError::BadRequest(
            "port must be between 1 and 65535".into(),
        ));
    }
    let Some(container) = app.container.get() else {
        return Err(ApiError::Unavailable(
            "the environment is unavailable (see /v1/status)".into(),
        ));
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, container.connect(port)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(ApiError::BadGateway(format!(
            "cannot connect to 127.0.0.1:{port}: {e}"
        ))),
        Err(_) => Err(ApiError::BadGateway(format!(
            "cannot connect to 127.0.0.1:{port}: timed out after {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// The port of a CONNECT request: from its authority-form target
/// (`CONNECT host:3000`), or, for `CONNECT /proxy`, from the Host header.
fn connect_port(req: &Request) -> Result<u16, ApiError> {
    let from_authority = req.uri().authority().map(|a| a.as_str().to_owned());
    let target = from_authority
        .or_else(|| {
            req.headers()
                .get(axum::http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .ok_or_else(|| ApiError::BadRequest("CONNECT needs a host:port target".into()))?;
    let port = target
        .rsplit_once(':')
        .map(|(_, p)| p)
        .ok_or_else(|| ApiError::BadRequest(format!("CONNECT target {target:?} has no port")))?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::BadRequest(format!("CONNECT target {target:?}: bad port")))
}

/// `CONNECT`: waits for `running`, dials the port, answers 200 and splices
/// the upgraded connection to it.
pub async fn connect(app: Arc<AppState>, mut req: Request) -> Response {
    // An open tunnel keeps the sprite awake (and finds it awake).
    let hold = app.sleep.hold();
    app.sleep.wake().await;
    let port = connect_port(&req);
    let r = async {
        app.lifecycle
            .wait_running(app.config.wait_for_running)
            .await?;
        let port = port?;
        let upstream = dial(&app, port).await?;
        Ok::<_, ApiError>((port, upstream))
    }
    .await;
    let (port, mut upstream) = match r {
        Ok(x) => x,
        Err(e) => return e.plain().into_response(),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _hold = hold;
        match upgrade.await {
            Ok(conn) => {
                let mut conn = hyper_util::rt::TokioIo::new(conn);
                let r = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                tracing::debug!(port, ?r, "CONNECT tunnel closed");
            }
            Err(e) => tracing::debug!(port, error = %e, "CONNECT upgrade failed"),
        }
    });
    StatusCode::OK.into_response()
}

/// `GET .../proxy` (WebSocket): the first text message names the port.
pub async fn ws_proxy(ws: WebSocketUpgrade, State(app): State<Arc<AppState>>) -> Response {
    let hold = app.sleep.hold();
    ws.on_upgrade(move |socket| async move {
        let _hold = hold;
        run_proxy(app, socket).await
    })
}

async fn close(mut socket: WebSocket, code: u16, reason: String) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
    super::exec::finish_close(socket.split().1).await;
}

async fn run_proxy(app: Arc<AppState>, mut socket: WebSocket) {
    let first = match tokio::time::timeout(Duration::from_secs(30), socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(_))) => {
            return close(socket, 1003, "Expected JSON initialization message".into()).await;
        }
        _ => return,
    };
    #[derive(serde::Deserialize)]
    struct Init {
        #[serde(default)]
        #[allow(dead_code)]
        host: Option<String>,
        port: u32,
    }
    let init: Init = match serde_json::from_str(first.as_str()) {
        Ok(i) => i,
        Err(_) => {
            return close(
                socket,
                1003,
                "Invalid JSON in initialization message".into(),
            )
            .await;
        }
    };
    let Some(port) = u16::try_from(init.port).ok().filter(|p| *p != 0) else {
        return close(socket, 1003, "Invalid port number".into()).await;
    };
    if let Err(e) = app
        .lifecycle
        .wait_running(app.config.wait_for_running)
        .await
    {
        return close(socket, 1011, e.to_string()).await;
    }
    let upstream = match dial(&app, port).await {
        Ok(s) => s,
        Err(e) => return close(socket, 1011, format!("Failed to connect to target: {e}")).await,
    };
    let hello = json!({"status": "connected", "target": format!("127.0.0.1:{port}")});
    if socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let (mut up_r, mut up_w) = upstream.into_split();
    let (mut ws_tx, mut ws_rx) = socket.split();
    let to_upstream = async {
        while let Some(Ok(m)) = ws_rx.next().await {
            match m {
                Message::Binary(b) if up_w.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = up_w.shutdown().await;
    };
    let from_upstream = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match up_r.read(&mut buf).await {
                Ok(0) => {
                    let _ = ws_tx
                        .send(Message::Close(Some(CloseFrame {
                            code: 1000,
                            reason: "".into(),
                        })))
                        .await;
                    break;
                }
                Ok(n) => {
                    let m = Message::Binary(axum::body::Bytes::copy_from_slice(&buf[..n]));
                    if ws_tx.send(m).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = ws_tx
                        .send(Message::Close(Some(CloseFrame {
                            code: 1001,
                            reason: format!("upstream closed: {e}").into(),
                        })))
                        .await;
                    break;
                }
            }
        }
    };
    // Either side ending ends the tunnel.
    tokio::select! {
        _ = to_upstream => {}
        _ = from_upstream => {}
        _ = app.shutdown.cancelled() => {}
    }
}

/// `GET .../ports/watch` (WebSocket): `port_list`, then every change.
pub async fn ports_watch(
    ws: WebSocketUpgrade,
    State(app): State<Arc<AppState>>,
) -> Result<Response, ApiError> {
    let ports = app
        .ports
        .get()
        .cloned()
        .ok_or_else(|| ApiError::Unavailable("the port watcher is not running".into()))?;
    Ok(ws.on_upgrade(move |mut socket| async move {
        let (now, mut rx) = ports.subscribe();
        let list: Vec<_> = now
            .into_iter()
            .map(|l| crate::ports::PortEvent {
                kind: "port_opened",
                listener: l,
            })
            .collect();
        let msg = json!({"type": "port_list", "ports": list});
        if socket
            .send(Message::Text(msg.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        if socket.send(super::exec::port_message(&ev)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
                m = socket.recv() => match m {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    _ => {}
                },
                _ = app.shutdown.cancelled() => return,
            }
        }
    }))
}
