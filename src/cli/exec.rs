//! The interactive side of `sprite-env`: `exec`, `sessions attach` and
//! `proxy`, all WebSockets over the daemon's Unix socket. This module owns
//! the local terminal (raw mode, window size, SIGWINCH).

use std::io::Write;
use std::os::fd::AsFd;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use super::{CliError, enc};
use crate::client::UnixClient;

type Ws = WebSocketStream<UnixStream>;

/// What `sprite-env exec` asks for.
pub struct ExecArgs {
    pub argv: Vec<String>,
    pub tty: bool,
    pub env: Vec<String>,
    pub dir: Option<String>,
}

/// Opens a WebSocket to `path_and_query` on the daemon's socket.
async fn connect(client: &UnixClient, path_and_query: &str) -> Result<Ws, CliError> {
    let stream = UnixStream::connect(client.socket())
        .await
        .map_err(|source| crate::client::ClientError::Connect {
            path: client.socket().to_owned(),
            source,
        })?;
    let req = format!("ws://sprite{path_and_query}")
        .into_client_request()
        .map_err(|e| CliError::Usage(format!("bad request: {e}")))?;
    match tokio_tungstenite::client_async(req, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.body().clone().unwrap_or_default();
            Err(CliError::Http {
                status,
                message: crate::client::error_message(&body),
            })
        }
        Err(e) => Err(CliError::Usage(format!(
            "WebSocket to the daemon failed: {e}"
        ))),
    }
}

/// `sprite-env exec`: runs a command and returns its exit code.
pub async fn exec(client: &UnixClient, a: ExecArgs) -> Result<u8, CliError> {
    if a.argv.is_empty() {
        return Err(CliError::Usage(
            "no command: sprite-env exec [-t] -- CMD [ARGS...]".into(),
        ));
    }
    let mut q: Vec<String> = a.argv.iter().map(|c| format!("cmd={}", enc(c))).collect();
    for kv in &a.env {
        if !kv.contains('=') || kv.starts_with('=') {
            return Err(CliError::Usage(format!("--env {kv:?} is not K=V")));
        }
        q.push(format!("env={}", enc(kv)));
    }
    if let Some(d) = &a.dir {
        q.push(format!("dir={}", enc(d)));
    }
    q.push("stdin=true".into());
    if a.tty {
        let (rows, cols) = local_size().unwrap_or((24, 80));
        q.push(format!("tty=true&rows={rows}&cols={cols}"));
    }
    let ws = connect(client, &format!("/v1/exec?{}", q.join("&"))).await?;
    run_session(ws, true).await
}

/// `sprite-env sessions attach ID`.
pub async fn attach(client: &UnixClient, id: &str) -> Result<u8, CliError> {
    let ws = connect(client, &format!("/v1/exec/{}", enc(id))).await?;
    run_session(ws, false).await
}

/// Puts the local terminal in raw mode until dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin().as_fd(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// The local terminal's size (rows, cols), from stdout or stdin.
fn local_size() -> Option<(u16, u16)> {
    crate::sys::get_winsize(&std::io::stdout())
        .or_else(|_| crate::sys::get_winsize(&std::io::stdin()))
        .ok()
        .filter(|(r, c)| *r > 0 && *c > 0)
}

/// Drives a session: the first message says whether it has a TTY; stdin
/// goes up (raw with a TTY, framed with stream id 0 without, EOF as [4]),
/// output comes down, and the exit code ends it.
async fn run_session(ws: Ws, owner_hint: bool) -> Result<u8, CliError> {
    let (mut tx, mut rx) = ws.split();
    let info = loop {
        match rx.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                if v["type"] == "session_info" {
                    break v;
                }
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(CliError::Usage(
                    "the daemon closed the session before it started".into(),
                ));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(CliError::Usage(format!("session failed: {e}"))),
        }
    };
    let tty = info["tty"].as_bool().unwrap_or(false);
    let owner = info["is_owner"].as_bool().unwrap_or(owner_hint);
    let local_tty = nix::unistd::isatty(std::io::stdin().as_fd()).unwrap_or(false);
    let _raw = if tty && local_tty {
        RawMode::enter()
    } else {
        None
    };
    if tty && let Some((rows, cols)) = local_size() {
        let _ = tx
            .send(Message::text(
                json!({"type": "resize", "rows": rows, "cols": cols}).to_string(),
            ))
            .await;
    }
    let mut winch =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let mut stdin = tokio::io::stdin();
    let mut stdin_open = tty || owner;
    let mut buf = vec![0u8; 32 * 1024];
    let mut exit: Option<u8> = None;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => {
                match n {
                    Ok(0) | Err(_) => {
                        stdin_open = false;
                        if !tty {
                            let _ = tx.send(Message::binary(vec![4u8])).await;
                        }
                    }
                    Ok(n) => {
                        let frame = if tty {
                            buf[..n].to_vec()
                        } else {
                            let mut f = Vec::with_capacity(n + 1);
                            f.push(0u8);
                            f.extend_from_slice(&buf[..n]);
                            f
                        };
                        if tx.send(Message::binary(frame)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            _ = async { winch.as_mut().unwrap().recv().await }, if tty && winch.is_some() => {
                if let Some((rows, cols)) = local_size() {
                    let _ = tx
                        .send(Message::text(
                            json!({"type": "resize", "rows": rows, "cols": cols}).to_string(),
                        ))
                        .await;
                }
            }
            m = rx.next() => {
                let Some(Ok(m)) = m else { break };
                match m {
                    Message::Binary(b) if tty => {
                        let _ = stdout.write_all(&b).and_then(|_| stdout.flush());
                    }
                    Message::Binary(b) => match b.first() {
                        Some(1) => {
                            let _ = stdout.write_all(&b[1..]).and_then(|_| stdout.flush());
                        }
                        Some(2) => {
                            let _ = stderr.write_all(&b[1..]).and_then(|_| stderr.flush());
                        }
                        Some(3) => exit = Some(b.get(1).copied().unwrap_or(0)),
                        _ => {}
                    },
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                        if v["type"] == "exit" {
                            exit = Some(v["exit_code"].as_i64().unwrap_or(0).clamp(0, 255) as u8);
                        }
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        }
    }
    let _ = tx.close().await;
    match exit {
        Some(code) => Ok(code),
        None => Err(CliError::Usage(
            "the connection to the session ended before the command exited \
             (a TTY session keeps running: sprite-env sessions attach ID)"
                .into(),
        )),
    }
}

/// `sprite-env proxy LOCAL REMOTE`: forwards every connection to
/// `127.0.0.1:LOCAL` through the daemon's WebSocket proxy to `REMOTE`.
pub async fn proxy(client: &UnixClient, local: u16, remote: u16) -> Result<(), CliError> {
    if remote == 0 {
        return Err(CliError::Usage("REMOTE_PORT must be 1..65535".into()));
    }
    let listener = TcpListener::bind(("127.0.0.1", local))
        .await
        .map_err(|source| CliError::Io {
            what: format!("listen on 127.0.0.1:{local}"),
            source,
        })?;
    let bound = listener.local_addr().map(|a| a.port()).unwrap_or(local);
    if bound == remote {
        // Inside the sprite, the remote port is this very listener: every
        // connection would tunnel back to itself until fds run out.
        return Err(CliError::Usage(format!(
            "local port {bound} is the remote port: the proxy would forward to itself"
        )));
    }
    eprintln!("sprite-env: forwarding 127.0.0.1:{bound} -> sprite port {remote} (Ctrl-C to stop)");
    loop {
        let (conn, peer) = listener.accept().await.map_err(|source| CliError::Io {
            what: "accept".into(),
            source,
        })?;
        let client = client.clone();
        tokio::spawn(async move {
            if let Err(e) = tunnel(&client, conn, remote).await {
                eprintln!("sprite-env: {peer}: {e}");
            }
        });
    }
}

async fn tunnel(
    client: &UnixClient,
    conn: tokio::net::TcpStream,
    remote: u16,
) -> Result<(), CliError> {
    let ws = connect(client, "/v1/proxy").await?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text(
        json!({"host": "localhost", "port": remote}).to_string(),
    ))
    .await
    .map_err(|e| CliError::Usage(format!("proxy: {e}")))?;
    match rx.next().await {
        Some(Ok(Message::Text(t))) => {
            let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
            if v["status"] != "connected" {
                return Err(CliError::Usage(format!("proxy refused: {t}")));
            }
        }
        Some(Ok(Message::Close(Some(f)))) => {
            return Err(CliError::Usage(format!("proxy refused: {}", f.reason)));
        }
        other => return Err(CliError::Usage(format!("proxy failed: {other:?}"))),
    }
    let (mut r, mut w) = conn.into_split();
    let up = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.close().await;
    };
    let down = async {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Binary(b) if w.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(up, down);
    Ok(())
}
