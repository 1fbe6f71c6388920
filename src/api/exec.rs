//! Exec over the API: the WebSocket protocol (new command or attach), the
//! hosted HTTP exec (stream-id frames), the seed-003 `POST /exec` (JSON in,
//! Server-Sent Events out), and the session list, kill and delete.
//!
//! Output in SSE events is binary-safe: `data` is the chunk as text when it
//! is valid UTF-8 (a character split across chunks is carried over to the
//! next event); a chunk that is not UTF-8 is sent as `data` in base64 with
//! `"encoding":"base64"`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::params::{self, Params};
use super::{ApiError, AppState};
use crate::exec::{Attachment, EnvSpec, ExecRequest, Input, Output, Sessions};
use crate::ports::PortEvent;

/// The largest stdin body `POST .../exec` takes.
pub const MAX_STDIN: usize = 10 * 1024 * 1024;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The command of a WebSocket or HTTP exec, from its query.
pub(super) fn request_from_query(q: &Params, allow_tty: bool) -> Result<ExecRequest, ApiError> {
    let argv: Vec<String> = q.all("cmd").map(str::to_owned).collect();
    if argv.is_empty() {
        return Err(ApiError::BadRequest(
            "no command: give it as repeated cmd= parameters".into(),
        ));
    }
    let tty = q.flag("tty")?.unwrap_or(false);
    if tty && !allow_tty {
        return Err(ApiError::BadRequest(
            "TTY not supported on POST /exec".into(),
        ));
    }
    let rows = q.number("rows", 24u16)?;
    let cols = q.number("cols", 80u16)?;
    if tty && (rows == 0 || cols == 0) {
        return Err(ApiError::BadRequest(
            "rows and cols must be positive".into(),
        ));
    }
    let mut env = Vec::new();
    for kv in q.all("env") {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_owned(), v.to_owned())),
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "env={kv:?}: expected KEY=VALUE"
                )));
            }
        }
    }
    let max_run = match q.duration("max_run_after_disconnect")? {
        Some(d) => d,
        _ if tty => Duration::ZERO,
        _ => Duration::from_secs(10),
    };
    Ok(ExecRequest {
        path: q.get("path").filter(|p| !p.is_empty()).map(str::to_owned),
        argv,
        // Without env= the command gets the daemon's base environment.
        env: if env.is_empty() {
            EnvSpec::Extend(Vec::new())
        } else {
            EnvSpec::Replace(env)
        },
        dir: q.get("dir").filter(|d| !d.is_empty()).map(str::to_owned),
        tty: tty.then_some((rows, cols)),
        stdin: q.flag("stdin")?.unwrap_or(tty),
        max_run_after_disconnect: max_run,
    })
}

pub(super) fn sessions(app: &AppState) -> Result<Sessions, ApiError> {
    app.sessions.get().cloned().ok_or_else(|| {
        ApiError::Unavailable("exec is not ready yet (the daemon is booting)".into())
    })
}

fn is_websocket(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn upgrade(app: &Arc<AppState>, req: Request) -> Result<WebSocketUpgrade, ApiError> {
    let (mut parts, _) = req.into_parts();
    WebSocketUpgrade::from_request_parts(&mut parts, app)
        .await
        .map_err(|e| ApiError::BadRequest(format!("bad WebSocket upgrade: {e}")))
}

/// `GET .../exec`: a WebSocket starts a command (or attaches with `id=`);
/// a plain GET lists the sessions.
pub async fn exec_get(
    State(app): State<Arc<AppState>>,
    RawQuery(q): RawQuery,
    req: Request,
) -> Result<Response, ApiError> {
    if !is_websocket(req.headers()) {
        let list = sessions(&app)?.list();
        return Ok(axum::Json(json!({ "count": list.len(), "sessions": list })).into_response());
    }
    let q = Params::parse(q.as_deref());
    if let Some(id) = q.get("id").filter(|i| !i.is_empty()) {
        let id = id.to_owned();
        return attach_ws(app, id, req).await;
    }
    app.lifecycle
        .wait_running(app.config.wait_for_running)
        .await?;
    let exec = request_from_query(&q, true)?;
    let ws = upgrade(&app, req).await?;
    let att = sessions(&app)?.spawn(exec).await?;
    Ok(ws_response(app, ws, att))
}

/// `GET .../exec/{id}` (WebSocket): attach to a session.
pub async fn exec_attach(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    if !is_websocket(req.headers()) {
        let s = sessions(&app)?.get(&id)?;
        let list = sessions(&app)?.list();
        let row = list.into_iter().find(|r| r.id == s.id.to_string());
        return Ok(axum::Json(json!(row)).into_response());
    }
    attach_ws(app, id, req).await
}

async fn attach_ws(app: Arc<AppState>, id: String, req: Request) -> Result<Response, ApiError> {
    let att = sessions(&app)?.attach(&id)?;
    let ws = upgrade(&app, req).await?;
    Ok(ws_response(app, ws, att))
}

fn ws_response(app: Arc<AppState>, ws: WebSocketUpgrade, att: Attachment) -> Response {
    // An open exec WebSocket keeps the sprite awake.
    let hold = app.sleep.hold();
    let mut resp = ws
        .max_message_size(16 * 1024 * 1024)
        .on_upgrade(move |socket| async move {
            let _hold = hold;
            run_ws(app, socket, att).await
        });
    resp.headers_mut()
        .insert("x-sprite-capabilities", HeaderValue::from_static("signal"));
    resp
}

fn json_text(v: &impl serde::Serialize) -> Message {
    Message::Text(serde_json::to_string(v).unwrap_or_default().into())
}

/// One WebSocket client of a session, until the session ends (exit, then
/// close 1000) or the client goes (the session runs on, see `exec`).
async fn run_ws(app: Arc<AppState>, socket: WebSocket, att: Attachment) {
    let tty = att.session.is_tty();
    let (mut tx, mut rx) = socket.split();
    let mut att = att;
    let code = match pump(&app, &mut att, &mut tx, &mut rx, false).await {
        Pumped::Exit(code) => code,
        Pumped::Gone => return,
        Pumped::Shutdown => {
            let _ = tx
                .send(Message::Close(Some(CloseFrame {
                    code: 1001,
                    reason: "daemon shutting down".into(),
                })))
                .await;
            return;
        }
    };
    let _ = tx
        .send(json_text(&json!({"type": "exit", "exit_code": code})))
        .await;
    if !tty {
        let _ = tx
            .send(Message::Binary(vec![3u8, (code & 0xff) as u8].into()))
            .await;
    }
    att.saw_exit();
    let _ = tx
        .send(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "".into(),
        })))
        .await;
    // Read until the client's close: a socket closed with unread input
    // (the client's stdin EOF, say) is reset, and a reset makes the
    // client's kernel drop the exit frames it has not read yet.
    finish_close(rx).await;
}

/// How [`pump`] ended.
pub(super) enum Pumped {
    /// The command exited with this code (its output all sent).
    Exit(i32),
    /// The client closed or failed (the session runs on).
    Gone,
    /// The daemon is shutting down.
    Shutdown,
}

/// The sending half of a WebSocket.
pub(super) type WsTx = futures_util::stream::SplitSink<WebSocket, Message>;
/// The receiving half of a WebSocket.
pub(super) type WsRx = futures_util::stream::SplitStream<WebSocket>;

/// Carries one session over a WebSocket: the session's `session_info`,
/// its scrollback and output out (stream-id frames; raw for a terminal),
/// port changes of its cgroup, and the client's stdin, EOF, `resize` and
/// `signal` in, until the command exits. On a control connection
/// (`control`), a binary frame holding a JSON `resize` or `signal` is one
/// too (the JS SDK sends them so), and another `op.start` meanwhile is
/// refused with `op.error`.
pub(super) async fn pump(
    app: &AppState,
    att: &mut Attachment,
    tx: &mut WsTx,
    rx: &mut WsRx,
    control_mode: bool,
) -> Pumped {
    let session = att.session.clone();
    let tty = session.is_tty();
    if tx
        .send(json_text(&session.info(att.is_owner)))
        .await
        .is_err()
    {
        return Pumped::Gone;
    }
    // Port changes of this session's processes.
    let cg_rel = session.cgroup().and_then(|cg| {
        let mount = app.cgroups.get()?.mount().to_owned();
        cg.path()
            .strip_prefix(&mount)
            .ok()
            .map(|p| format!("/{}", p.display()))
    });
    let mut ports = match (&cg_rel, app.ports.get()) {
        (Some(_), Some(p)) => Some(p.subscribe().1),
        _ => None,
    };
    let frame = |o: &Output| -> Option<Message> {
        match o {
            Output::Data(stream, b) if tty => {
                let _ = stream;
                Some(Message::Binary(b.clone()))
            }
            Output::Data(stream, b) => {
                let mut v = Vec::with_capacity(b.len() + 1);
                v.push(*stream);
                v.extend_from_slice(b);
                Some(Message::Binary(v.into()))
            }
            Output::Exit(_) => None,
        }
    };
    let mut exit: Option<i32> = None;
    for o in std::mem::take(&mut att.scrollback) {
        match &o {
            Output::Exit(code) => exit = Some(*code),
            _ => {
                if let Some(m) = frame(&o)
                    && tx.send(m).await.is_err()
                {
                    return Pumped::Gone;
                }
            }
        }
    }
    let is_owner = att.is_owner;
    while exit.is_none() {
        tokio::select! {
            out = att.rx.recv() => match out {
                Some(Output::Exit(code)) => exit = Some(code),
                Some(o) => {
                    if let Some(m) = frame(&o) && let Err(e) = tx.send(m).await {
                        tracing::debug!(session = session.id, error = %e, "exec client gone");
                        return Pumped::Gone;
                    }
                }
                None => exit = Some(session.wait().await),
            },
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    let json = control_mode && b.first() == Some(&b'{');
                    if json && let Ok(t) = std::str::from_utf8(&b) && is_control(t) {
                        control(&session, t);
                    } else if tty {
                        session.input(Input::Data(b)).await;
                    } else {
                        match b.first() {
                            Some(0) => session.input(Input::Data(b.slice(1..))).await,
                            // The SDK's attach sends EOF at once: only the owner's counts.
                            Some(4) if is_owner => session.input(Input::Eof).await,
                            _ => {}
                        }
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    if control_mode && t.as_str().starts_with(super::control::PREFIX) {
                        let busy = super::control::op_error("an operation is in progress on this connection");
                        if tx.send(busy).await.is_err() {
                            return Pumped::Gone;
                        }
                    } else {
                        control(&session, t.as_str());
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => {
                    tracing::debug!(session = session.id, "exec client closed");
                    return Pumped::Gone;
                }
                Some(Err(e)) => {
                    tracing::debug!(session = session.id, error = %e, "exec client failed");
                    return Pumped::Gone;
                }
            },
            ev = async {
                match ports.as_mut() {
                    Some(p) => p.recv().await.ok(),
                    None => std::future::pending().await,
                }
            } => {
                if let (Some(ev), Some(cg)) = (ev, &cg_rel)
                    && &ev.listener.cgroup == cg
                    && tx.send(json_text(&ev)).await.is_err()
                {
                    return Pumped::Gone;
                }
            }
            _ = app.shutdown.cancelled() => return Pumped::Shutdown,
        }
    }
    Pumped::Exit(exit.unwrap_or(-1))
}

/// Whether `text` is a JSON `resize` or `signal` message.
fn is_control(text: &str) -> bool {
    serde_json::from_str::<Value>(text).is_ok_and(|v| {
        matches!(
            v.get("type").and_then(Value::as_str),
            Some("resize" | "signal")
        )
    })
}

/// The rest of a WebSocket closing handshake: read (and drop) what the
/// client still sends until its close, for a few seconds at most.
pub async fn finish_close(mut rx: WsRx) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = rx.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// A client's JSON control message: `resize` or `signal`.
fn control(session: &crate::exec::Session, text: &str) {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return;
    };
    match v.get("type").and_then(Value::as_str) {
        Some("resize") => {
            let get = |k: &str| {
                v.get(k)
                    .and_then(Value::as_u64)
                    .map(|n| n.min(u16::MAX as u64) as u16)
            };
            if let (Some(cols), Some(rows)) = (get("cols"), get("rows"))
                && cols > 0
                && rows > 0
            {
                let _ = session.resize(rows, cols);
            }
        }
        Some("signal") => {
            if let Some(sig) = v
                .get("signal")
                .and_then(Value::as_str)
                .and_then(crate::supervisor::parse_signal)
            {
                let _ = session.signal(sig);
            }
        }
        _ => {}
    }
}

/// The body of the seed-003 `POST /exec`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonExec {
    command: Vec<String>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    working_dir: Option<String>,
    /// Nanoseconds.
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    tty: bool,
}

/// `POST .../exec`: the seed-003 JSON form (answered with SSE) when the body
/// is JSON and the query has no `cmd`; otherwise the hosted HTTP exec
/// (stdin in the body, stream-id frames out).
pub async fn exec_post(
    State(app): State<Arc<AppState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let body = match read_capped(&headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let q = Params::parse(q.as_deref());
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let legacy = json && q.all("cmd").next().is_none();
    if let Err(e) = app
        .lifecycle
        .wait_running(app.config.wait_for_running)
        .await
    {
        return ApiError::from(e).plain().into_response();
    }
    let r = if legacy {
        exec_sse(app, body).await
    } else {
        exec_frames(app, &q, body).await
    };
    r.unwrap_or_else(|e| e.plain().into_response())
}

/// The request body, refused with 413 past `MAX_STDIN`. What the client is
/// still sending after the cap is read and discarded (up to 4× the cap, for
/// up to 5 s), so that it gets to read the 413 instead of a reset; a body
/// declared larger than that is refused before reading.
async fn read_capped(headers: &HeaderMap, body: axum::body::Body) -> Result<Bytes, ApiError> {
    const LINGER_BYTES: usize = 4 * MAX_STDIN;
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "the request body is larger than {} MiB (stdin of a one-shot exec is capped; \
             stream larger input over the WebSocket exec)",
            MAX_STDIN / (1024 * 1024)
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > LINGER_BYTES as u64) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("reading the request body: {e}")))?;
        if buf.len() + chunk.len() > MAX_STDIN {
            let read = buf.len() + chunk.len();
            drop(buf);
            super::params::linger(&mut stream, LINGER_BYTES.saturating_sub(read) as u64).await;
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

async fn exec_sse(app: Arc<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: JsonExec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("bad exec request: {e}")))?;
    let timeout = match req.timeout {
        None | Some(0) => DEFAULT_TIMEOUT,
        Some(ns) => Duration::from_nanos(ns),
    };
    let att = sessions(&app)?
        .spawn(ExecRequest {
            path: None,
            argv: req.command,
            env: EnvSpec::Extend(req.env.into_iter().collect()),
            dir: req.working_dir.filter(|d| !d.is_empty()),
            tty: req.tty.then_some((24, 80)),
            stdin: false,
            max_run_after_disconnect: Duration::ZERO,
        })
        .await?;
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let shutdown = app.shutdown.clone();
    tokio::spawn(async move {
        let mut out = [Utf8Carry::default(), Utf8Carry::default()];
        let session = att.session.clone();
        let send = |event: &str, v: Value| {
            Bytes::from(format!(
                "event: {event}\ndata: {}\n\n",
                serde_json::to_string(&v).unwrap_or_default()
            ))
        };
        let code = drive(att, timeout, &shutdown, |o| {
            let tx = tx.clone();
            let msg = match o {
                Driven::Data(stream, b) => {
                    let name = if stream == 2 { "stderr" } else { "stdout" };
                    let mut v = out[(stream == 2) as usize].encode(&b);
                    v["type"] = name.into();
                    Some(send(name, v))
                }
                Driven::TimedOut(t) => Some(send(
                    "error",
                    json!({"type": "error", "error": format!("command timed out after {t:?}: killed")}),
                )),
            };
            async move {
                match msg {
                    Some(m) => tx.send(m).await.is_ok(),
                    None => true,
                }
            }
        })
        .await;
        if let Some(code) = code {
            for (i, name) in ["stdout", "stderr"].into_iter().enumerate() {
                if let Some(mut v) = out[i].flush() {
                    v["type"] = name.into();
                    let _ = tx.send(send(name, v)).await;
                }
            }
            let _ = tx
                .send(send("exit", json!({"type": "exit", "exit_code": code})))
                .await;
        } else {
            // The client left: nobody is waiting for this command.
            session.kill().await;
        }
    });
    let mut resp = Response::new(Body::from_stream(receiver_stream(rx)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

async fn exec_frames(app: Arc<AppState>, q: &Params, body: Bytes) -> Result<Response, ApiError> {
    for bad in ["id", "detachable", "cc"] {
        if q.get(bad).is_some() {
            return Err(ApiError::BadRequest(format!(
                "unsupported parameter {bad} on POST /exec"
            )));
        }
    }
    let mut exec = request_from_query(q, false)?;
    exec.max_run_after_disconnect = Duration::ZERO;
    let stdin = exec.stdin;
    let att = sessions(&app)?.spawn(exec).await?;
    let session = att.session.clone();
    if stdin {
        let s = session.clone();
        tokio::spawn(async move {
            if !body.is_empty() {
                s.input(Input::Data(body)).await;
            }
            s.input(Input::Eof).await;
        });
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let shutdown = app.shutdown.clone();
    tokio::spawn(async move {
        let code = drive(att, Duration::ZERO, &shutdown, |o| {
            let tx = tx.clone();
            let frame = match o {
                Driven::Data(stream, b) => {
                    let mut v = Vec::with_capacity(b.len() + 1);
                    v.push(stream);
                    v.extend_from_slice(&b);
                    Some(Bytes::from(v))
                }
                Driven::TimedOut(_) => None,
            };
            async move {
                match frame {
                    Some(f) => tx.send(f).await.is_ok(),
                    None => true,
                }
            }
        })
        .await;
        match code {
            Some(code) => {
                let _ = tx.send(Bytes::from(vec![3u8, (code & 0xff) as u8])).await;
            }
            None => session.kill().await,
        }
    });
    let mut resp = Response::new(Body::from_stream(receiver_stream(rx)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

fn receiver_stream(
    rx: mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
    )
}

enum Driven {
    Data(u8, Bytes),
    TimedOut(Duration),
}

/// Feeds a session's output to `sink` until it exits (its exit code) or
/// the sink fails (`None`: the client left). With a non-zero `timeout` the
/// session is killed when it passes (the sink hears of it first).
async fn drive<F, Fut>(
    mut att: Attachment,
    timeout: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
    mut sink: F,
) -> Option<i32>
where
    F: FnMut(Driven) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = (!timeout.is_zero()).then(|| tokio::time::Instant::now() + timeout);
    let mut timed_out = false;
    for o in std::mem::take(&mut att.scrollback) {
        match o {
            Output::Data(s, b) => {
                if !sink(Driven::Data(s, b)).await {
                    return None;
                }
            }
            Output::Exit(code) => {
                att.saw_exit();
                return Some(code);
            }
        }
    }
    loop {
        let sleep = async {
            match deadline {
                Some(d) if !timed_out => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            out = att.rx.recv() => match out {
                Some(Output::Data(s, b)) => {
                    if !sink(Driven::Data(s, b)).await {
                        return None;
                    }
                }
                Some(Output::Exit(code)) => {
                    att.saw_exit();
                    return Some(code);
                }
                None => return Some(att.session.wait().await),
            },
            _ = sleep => {
                timed_out = true;
                if !sink(Driven::TimedOut(timeout)).await {
                    return None;
                }
                att.session.kill().await;
            }
            _ = shutdown.cancelled() => return None,
        }
    }
}

/// Splits output into SSE-safe JSON: UTF-8 text (a character cut at a chunk
/// edge waits for the next chunk) or base64.
#[derive(Default)]
struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    fn encode(&mut self, chunk: &[u8]) -> Value {
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(chunk);
        match std::str::from_utf8(&buf) {
            Ok(s) => json!({ "data": s }),
            Err(e) if e.error_len().is_none() && buf.len() - e.valid_up_to() < 4 => {
                // An incomplete character at the end: keep it for next time.
                self.pending = buf.split_off(e.valid_up_to());
                json!({ "data": String::from_utf8_lossy(&buf) })
            }
            Err(_) => json!({
                "data": base64::engine::general_purpose::STANDARD.encode(&buf),
                "encoding": "base64",
            }),
        }
    }

    fn flush(&mut self) -> Option<Value> {
        if self.pending.is_empty() {
            return None;
        }
        let b = std::mem::take(&mut self.pending);
        Some(json!({
            "data": base64::engine::general_purpose::STANDARD.encode(&b),
            "encoding": "base64",
        }))
    }
}

/// Kill parameters, from the query or a JSON body.
#[derive(serde::Deserialize, Default)]
struct KillBody {
    signal: Option<String>,
    timeout: Option<Value>,
}

/// `POST .../exec/{id}/kill?signal=SIGTERM&timeout=10s` (or the same as a
/// JSON body): signal the session's process group, wait, then SIGKILL the
/// whole session. Streams NDJSON.
pub async fn exec_kill(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let session = sessions(&app)?.get(&id)?;
    let q = Params::parse(q.as_deref());
    let b: KillBody = if body.iter().all(u8::is_ascii_whitespace) {
        KillBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("bad kill request: {e}")))?
    };
    let sig_name = b
        .signal
        .or_else(|| q.get("signal").map(str::to_owned))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "SIGTERM".into());
    let sig = crate::supervisor::parse_signal(&sig_name)
        .ok_or_else(|| ApiError::BadRequest(format!("unknown signal {sig_name:?}")))?;
    let timeout = match (b.timeout, q.get("timeout")) {
        (Some(Value::Number(n)), _) => Duration::from_secs_f64(n.as_f64().unwrap_or(10.0).max(0.0)),
        (Some(Value::String(s)), _) => params::duration("timeout", &s)?,
        (Some(Value::Null) | None, Some(s)) if !s.is_empty() => params::duration("timeout", s)?,
        (Some(Value::Null) | None, _) => Duration::from_secs(10),
        (Some(other), _) => {
            return Err(ApiError::BadRequest(format!(
                "timeout {other}: expected seconds or a duration like 10s"
            )));
        }
    };
    Ok(super::stream::ndjson(
        app.shutdown.clone(),
        move |em| async move {
            let name = format!("{sig}");
            if session.exit_code().is_none() {
                let pid = session.pid;
                let _ = em
                .send(&json!({"type": "signal", "message": format!("Signaling {name} to process group {pid}"), "signal": name, "pid": pid}))
                .await;
                if let Err(e) = session.signal(sig) {
                    let _ = em
                    .send(&json!({"type": "error", "message": format!("cannot signal {pid}: {e}")}))
                    .await;
                }
            }
            let code = match tokio::time::timeout(timeout, session.wait()).await {
                Ok(code) => {
                    let _ = em
                        .send(&json!({"type": "exited", "message": "Process exited"}))
                        .await;
                    code
                }
                Err(_) => {
                    let _ = em
                    .send(&json!({"type": "timeout", "message": format!("Timeout after {timeout:?}, sending SIGKILL")}))
                    .await;
                    session.kill().await;
                    let code = session.wait().await;
                    let _ = em
                        .send(&json!({"type": "killed", "message": "Process killed"}))
                        .await;
                    code
                }
            };
            let _ = em
                .send(&json!({"type": "complete", "exit_code": code}))
                .await;
        },
    ))
}

/// `DELETE .../exec/{id}`: kill the session at once.
pub async fn exec_delete(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let session = sessions(&app)?.get(&id)?;
    session.kill().await;
    session.wait().await;
    Ok(StatusCode::NO_CONTENT)
}

/// Port changes as text frames, for the ports watch and for sessions.
pub fn port_message(ev: &PortEvent) -> Message {
    json_text(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = Params::parse(Some(
            "cmd=echo&cmd=a+b&cmd%5B%5D=c&env=K%3DV&tty=true&rows=30",
        ));
        let r = request_from_query(&q, true).unwrap();
        assert_eq!(r.argv, ["echo", "a b", "c"]);
        assert_eq!(r.tty, Some((30, 80)));
        assert!(r.stdin, "stdin defaults to on with a TTY");
        assert!(r.max_run_after_disconnect.is_zero());
        assert!(
            matches!(r.env, EnvSpec::Replace(ref v) if v == &[("K".to_owned(), "V".to_owned())])
        );
        let r = request_from_query(&Params::parse(Some("cmd=cat")), true).unwrap();
        assert!(!r.stdin);
        assert_eq!(r.max_run_after_disconnect, Duration::from_secs(10));
        assert!(request_from_query(&Params::parse(Some("path=x")), true).is_err());
        assert!(request_from_query(&Params::parse(Some("cmd=x&tty=1")), false).is_err());
        assert!(request_from_query(&Params::parse(Some("cmd=x&env=novalue")), true).is_err());
        assert!(request_from_query(&Params::parse(Some("cmd=x&rows=abc")), true).is_err());
    }

    #[test]
    fn utf8_carry() {
        let mut c = Utf8Carry::default();
        let e = "é".as_bytes();
        assert_eq!(c.encode(&[b'a', e[0]]), json!({"data": "a"}));
        assert_eq!(c.encode(&[e[1], b'b']), json!({"data": "éb"}));
        assert_eq!(
            c.encode(&[0xff, 0x00]),
            json!({"data": "/wA=", "encoding": "base64"})
        );
        assert!(c.flush().is_none());
    }
}
