//! `GET /v1/control` (WebSocket): the SDKs' control connection (their
//! `controlMode`). One socket carries exec operations one after another.
//! Each starts with a text frame
//! `control:{"type":"op.start","op":"exec","args":{cmd, env, dir, tty, rows, cols, stdin}}`
//! (`cmd` and `env` arrays, the rest strings, as the exec WebSocket's query
//! has them); then the frames are the exec WebSocket's (`session_info`,
//! stream-id frames or a terminal's raw bytes, stdin, EOF, `resize`,
//! `signal`), until the server ends the operation with
//! `control:{"type":"op.complete","args":{"exitCode":N}}` (after the exit
//! frame) or `control:{"type":"op.error","args":{"error":"..."}}`. The
//! socket stays open for the next operation. Other `control:` messages
//! (the Go SDK's `release`, say) are ignored.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};

use super::exec::{Pumped, WsRx, WsTx, pump, request_from_query, sessions};
use super::params::Params;
use super::{ApiError, AppState};
use crate::exec::ExecRequest;

/// What marks a control message.
pub const PREFIX: &str = "control:";

fn envelope(v: Value) -> Message {
    Message::Text(format!("{PREFIX}{v}").into())
}

/// `op.error` with `why`.
pub(super) fn op_error(why: &str) -> Message {
    envelope(json!({"type": "op.error", "args": {"error": why}}))
}

fn op_complete(code: i32) -> Message {
    envelope(json!({"type": "op.complete", "args": {"exitCode": code}}))
}

/// The command of an `op.start` (None: another message, ignored), or why
/// it cannot run.
fn op_start(text: &str) -> Result<Option<ExecRequest>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not a control message: {e}"))?;
    if v.get("type").and_then(Value::as_str) != Some("op.start") {
        return Ok(None);
    }
    match v.get("op").and_then(Value::as_str) {
        Some("exec") => {}
        Some(op) => return Err(format!("op {op:?}: only exec is offered")),
        None => return Err("op.start without an op".into()),
    }
    let args = v.get("args").cloned().unwrap_or_else(|| json!({}));
    let q = Params::from_object(&args).map_err(|e| e.to_string())?;
    request_from_query(&q, true)
        .map(Some)
        .map_err(|e| e.to_string())
}

pub async fn control_ws(
    ws: WebSocketUpgrade,
    State(app): State<Arc<AppState>>,
) -> Result<Response, ApiError> {
    sessions(&app)?;
    // An open control connection keeps the sprite awake, as an exec's does.
    let hold = app.sleep.hold();
    Ok(ws
        .max_message_size(16 * 1024 * 1024)
        .on_upgrade(move |socket| async move {
            let _hold = hold;
            run(app, socket).await
        }))
}

async fn run(app: Arc<AppState>, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    loop {
        let Some(req) = next_op(&app, &mut tx, &mut rx).await else {
            return;
        };
        let tty = req.tty.is_some();
        let started = async {
            app.lifecycle
                .wait_running(app.config.wait_for_running)
                .await?;
            Ok::<_, ApiError>(sessions(&app)?.spawn(req).await?)
        };
        let mut att = match started.await {
            Ok(att) => att,
            Err(e) => {
                if tx.send(op_error(&e.to_string())).await.is_err() {
                    return;
                }
                continue;
            }
        };
        match pump(&app, &mut att, &mut tx, &mut rx, true).await {
            Pumped::Exit(code) => {
                if !tty {
                    let exit = Message::Binary(vec![3u8, (code & 0xff) as u8].into());
                    if tx.send(exit).await.is_err() {
                        return;
                    }
                }
                att.saw_exit();
                if tx.send(op_complete(code)).await.is_err() {
                    return;
                }
            }
            Pumped::Gone => return,
            Pumped::Shutdown => return shutting_down(&mut tx).await,
        }
    }
}

/// Waits for the next `op.start` (answering a bad one with `op.error`);
/// None when the client goes or the daemon shuts down.
async fn next_op(app: &AppState, tx: &mut WsTx, rx: &mut WsRx) -> Option<ExecRequest> {
    loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let Some(rest) = t.as_str().strip_prefix(PREFIX) else {
                        continue;
                    };
                    match op_start(rest) {
                        Ok(Some(req)) => return Some(req),
                        Ok(None) => {}
                        Err(why) => tx.send(op_error(&why)).await.ok()?,
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(_)) => {}
            },
            _ = app.shutdown.cancelled() => {
                shutting_down(tx).await;
                return None;
            }
        }
    }
}

async fn shutting_down(tx: &mut WsTx) {
    let _ = tx
        .send(Message::Close(Some(CloseFrame {
            code: 1001,
            reason: "daemon shutting down".into(),
        })))
        .await;
}

#[cfg(test)]
mod tests {
    use super::op_start;

    #[test]
    fn op_start_reads_the_sdks_args() {
        let r = op_start(
            r#"{"type":"op.start","op":"exec","args":{"cmd":["ls","-la"],"env":["A=1"],"dir":"/app","tty":"true","rows":"30","cols":"100","stdin":"false"}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.argv, ["ls", "-la"]);
        assert_eq!(r.dir.as_deref(), Some("/app"));
        assert_eq!(r.tty, Some((30, 100)));
        assert!(!r.stdin);
        assert!(op_start(r#"{"type":"release"}"#).unwrap().is_none());
        for bad in [
            r#"{"type":"op.start","op":"fs.read","args":{}}"#,
            r#"{"type":"op.start","op":"exec","args":{"cmd":[]}}"#,
            r#"{"type":"op.start","op":"exec","args":{"cmd":["ls"],"tty":"maybe"}}"#,
            r#"{"type":"op.start","op":"exec","args":{"cmd":[{"x":1}]}}"#,
            "not json",
        ] {
            assert!(op_start(bad).is_err(), "{bad}");
        }
    }
}
