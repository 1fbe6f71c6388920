//! The filesystem API (`.../fs/*`), shaped like the SDKs'. Every path goes
//! through [`crate::files::Files`], which confines it to the environment root.
//! Reads and writes stream: no file is held in memory.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::params::{self, Params, json_body};
use super::{ApiError, AppState};
use crate::files::{Canceller, Files, FilesError, parse_mode};

fn files(app: &AppState) -> Result<Files, ApiError> {
    let env = app.env.get().ok_or_else(|| {
        ApiError::Unavailable(format!(
            "the environment root is unavailable{}",
            app.fs_error
                .get()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ))
    })?;
    // The environment's `/` with its own mounts (as its processes see it),
    // or the overlay itself while no environment runs.
    let root = match app.container.get().and_then(|c| c.init_host_pid()) {
        Some(pid) => std::path::PathBuf::from(format!("/proc/{pid}/root")),
        None => env.root().to_owned(),
    };
    Ok(Files::new(root))
}

/// The `path` parameter, which every call needs.
fn required_path(q: &Params) -> Result<&str, ApiError> {
    q.get("path")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::BadRequest("path is required".into()))
}

/// Runs blocking file work off the async workers. `cancel` goes with the
/// handler's future: when the client goes away, hyper drops it, and the
/// work stops at its next entry or chunk.
async fn blocking<T: Send + 'static>(
    cancel: Canceller,
    f: impl FnOnce() -> Result<T, FilesError> + Send + 'static,
) -> Result<T, ApiError> {
    let done = tokio::task::spawn_blocking(move || {
        let r = f();
        if let Err(FilesError::Cancelled) = &r {
            tracing::info!("file operation cancelled: its client went away");
        }
        r
    })
    .await;
    cancel.disarm();
    done.map_err(|e| ApiError::Unavailable(format!("file operation failed: {e}")))?
        .map_err(ApiError::from)
}

/// `GET .../fs/read?path=`: the raw bytes, streamed.
pub async fn read(
    State(app): State<Arc<AppState>>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let f = files(&app)?;
    let q = Params::parse(q.as_deref());
    let rel = f.relative(required_path(&q)?, q.get("workingDir"))?;
    let (file, len) = blocking(f.canceller(), move || f.read(&rel)).await?;
    let stream =
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 64 * 1024);
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(resp)
}

/// How much more of an upload whose write failed is still read (and
/// dropped) before the error answer ([`params::linger`]).
const LINGER_BYTES: u64 = 256 << 20;

/// `PUT .../fs/write?path=&mode=0644&mkdirParents=true` (POST too): the body
/// is streamed into a temp file beside the target, then renamed over it.
/// Missing parents are always created (the SDKs' `mkdir` relies on it).
pub async fn write(
    State(app): State<Arc<AppState>>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let f = Arc::new(files(&app)?);
    let q = Params::parse(q.as_deref());
    let rel = f.relative(required_path(&q)?, q.get("workingDir"))?;
    q.flag("mkdirParents")?;
    q.flag("mkdir")?;
    let mode = match q.get("mode").filter(|m| !m.is_empty()) {
        Some(m) => parse_mode(m)
            .ok_or_else(|| ApiError::BadRequest(format!("mode {m:?}: expected octal like 0644")))?,
        None => 0o644,
    };
    let (f2, r2) = (f.clone(), rel.clone());
    let pending = blocking(f2.canceller(), move || f2.begin_write(&r2)).await?;
    let std_file = match pending.file.try_clone() {
        Ok(c) => c,
        Err(e) => {
            pending.abort();
            return Err(ApiError::Unavailable(format!("cannot write: {e}")));
        }
    };
    let mut out = tokio::fs::File::from_std(std_file);
    let mut stream = body.into_data_stream();
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => {
                if let Err(e) = out.write_all(&b).await {
                    failure = Some(ApiError::from(FilesError::Os {
                        op: "write",
                        path: f.display(&rel),
                        errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                    }));
                    break;
                }
            }
            Err(e) => {
                failure = Some(ApiError::BadRequest(format!("request body: {e}")));
                break;
            }
        }
    }
    // tokio's File hands writes to a thread: a full disk may show only here
    // (ENOSPC → 507, as for a failed write).
    if failure.is_none()
        && let Err(e) = out.flush().await
    {
        failure = Some(ApiError::from(FilesError::Os {
            op: "write",
            path: f.display(&rel),
            errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        }));
    }
    drop(out);
    if let Some(e) = failure {
        pending.abort();
        if matches!(e, ApiError::BadRequest(_)) {
            return Err(e);
        }
        // A write that failed (a full disk): the client may still be sending.
        params::linger(&mut stream, LINGER_BYTES).await;
        return Err(e);
    }
    let entry = blocking(f.canceller(), move || f.commit(pending, mode)).await?;
    Ok(Json(
        json!({"path": entry.path, "size": entry.size, "mode": format!("{:04o}", mode)}),
    ))
}

/// `GET .../fs/list?path=`: a directory's entries, or a file's own entry.
pub async fn list(
    State(app): State<Arc<AppState>>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let f = files(&app)?;
    let q = Params::parse(q.as_deref());
    let rel = f.relative(required_path(&q)?, q.get("workingDir"))?;
    let recursive = q.flag("recursive")?.unwrap_or(false);
    let pattern = q
        .get("pattern")
        .filter(|p| !p.is_empty())
        .map(str::to_owned);
    let shown = f.display(&rel);
    let entries = blocking(f.canceller(), move || {
        f.list(&rel, recursive, pattern.as_deref())
    })
    .await?;
    Ok(Json(
        json!({"path": shown, "count": entries.len(), "entries": entries}),
    ))
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PathBody {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    recursive: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    as_root: Option<bool>,
    #[serde(default)]
    mode: Option<String>,
}

/// `DELETE .../fs/delete?path=&recursive=` (or the same in a JSON body).
pub async fn delete(
    State(app): State<Arc<AppState>>,
    RawQuery(q): RawQuery,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let f = files(&app)?;
    let q = Params::parse(q.as_deref());
    let b: PathBody = json_body(&body)?;
    let path = b
        .path
        .clone()
        .or_else(|| q.get("path").map(str::to_owned))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::BadRequest("path is required".into()))?;
    let wd = b
        .working_dir
        .clone()
        .or_else(|| q.get("workingDir").map(str::to_owned));
    let recursive = match b.recursive {
        Some(r) => r,
        None => q.flag("recursive")?.unwrap_or(false),
    };
    let rel = f.relative(&path, wd.as_deref())?;
    let deleted = blocking(f.canceller(), move || f.delete(&rel, recursive)).await?;
    Ok(Json(json!({"deleted": deleted, "count": deleted.len()})))
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MoveBody {
    source: String,
    dest: String,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    recursive: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    as_root: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    preserve_attrs: Option<bool>,
}

fn move_body(body: &[u8]) -> Result<MoveBody, ApiError> {
    let b: MoveBody = json_body(body)?;
    if b.source.is_empty() || b.dest.is_empty() {
        return Err(ApiError::BadRequest("source and dest are required".into()));
    }
    Ok(b)
}

/// `POST .../fs/rename` `{source, dest}`.
pub async fn rename(
    State(app): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let f = files(&app)?;
    let b = move_body(&body)?;
    let s = f.relative(&b.source, b.working_dir.as_deref())?;
    let d = f.relative(&b.dest, b.working_dir.as_deref())?;
    let (ss, ds) = (f.display(&s), f.display(&d));
    blocking(f.canceller(), move || f.rename(&s, &d)).await?;
    Ok(Json(json!({"source": ss, "dest": ds})))
}

/// `POST .../fs/copy` `{source, dest, recursive}`.
pub async fn copy(
    State(app): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let f = files(&app)?;
    let b = move_body(&body)?;
    let s = f.relative(&b.source, b.working_dir.as_deref())?;
    let d = f.relative(&b.dest, b.working_dir.as_deref())?;
    let recursive = b.recursive.unwrap_or(false);
    let (copied, total) = blocking(f.canceller(), move || f.copy(&s, &d, recursive)).await?;
    let copied: Vec<Value> = copied
        .into_iter()
        .map(|(s, d)| json!({"source": s, "dest": d}))
        .collect();
    Ok(Json(
        json!({"count": copied.len(), "copied": copied, "totalBytes": total}),
    ))
}

/// `POST .../fs/chmod` `{path, mode: "0755", recursive}`.
pub async fn chmod(
    State(app): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let f = files(&app)?;
    let b: PathBody = json_body(&body)?;
    let path = b
        .path
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::BadRequest("path is required".into()))?;
    let m = b
        .mode
        .ok_or_else(|| ApiError::BadRequest("mode is required".into()))?;
    let mode = parse_mode(&m)
        .ok_or_else(|| ApiError::BadRequest(format!("mode {m:?}: expected octal like 0755")))?;
    let rel = f.relative(&path, b.working_dir.as_deref())?;
    let recursive = b.recursive.unwrap_or(false);
    let changed = blocking(f.canceller(), move || f.chmod(&rel, mode, recursive)).await?;
    let affected: Vec<Value> = changed
        .into_iter()
        .map(|p| json!({"path": p, "mode": format!("{mode:04o}")}))
        .collect();
    Ok(Json(json!({"count": affected.len(), "affected": affected})))
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ChownBody {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    uid: Option<Value>,
    #[serde(default)]
    gid: Option<Value>,
    #[serde(default)]
    recursive: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    as_root: Option<bool>,
}

/// An owner or group as a request gives it.
#[derive(Debug, PartialEq)]
enum Owner {
    Id(u32),
    /// Looked up in the environment's `/etc/passwd` or `/etc/group`.
    Name(String),
}

/// Longest user or group name accepted (Linux allows 32; some tools more).
const MAX_NAME: usize = 256;

/// `uid` / `gid` of a chown: a number, a decimal string or a name; absent
/// (or null) leaves it unchanged. `u32::MAX` is `-1` to the kernel: refused.
fn owner(field: &str, v: Option<Value>) -> Result<Option<Owner>, ApiError> {
    let bad = |why: String| ApiError::BadRequest(format!("{field}: {why}"));
    let id = |n: u64| {
        u32::try_from(n)
            .ok()
            .filter(|n| *n != u32::MAX)
            .ok_or_else(|| bad(format!("{n} is not an id (0 to 4294967294)")))
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => Ok(Some(Owner::Id(id(n)?))),
            None => Err(bad(format!("{n} is not an id (0 to 4294967294)"))),
        },
        Some(Value::String(s)) => {
            if s.is_empty() || s.len() > MAX_NAME {
                return Err(bad(format!(
                    "a name of {} bytes (1 to {MAX_NAME})",
                    s.len()
                )));
            }
            if s.bytes().all(|b| b.is_ascii_digit()) {
                let n = s
                    .parse::<u64>()
                    .map_err(|_| bad(format!("{s} is not an id")))?;
                return Ok(Some(Owner::Id(id(n)?)));
            }
            if s.contains([':', '\n', '\0']) {
                return Err(bad(format!("{s:?} is not a user or group name")));
            }
            Ok(Some(Owner::Name(s)))
        }
        Some(_) => Err(bad("expected a number or a name".into())),
    }
}

/// `POST .../fs/chown` `{path, uid, gid, recursive}`: ids or the
/// environment's names; the affected paths with their owner and group.
pub async fn chown(
    State(app): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let f = files(&app)?;
    let b: ChownBody = json_body(&body)?;
    let path = b
        .path
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::BadRequest("path is required".into()))?;
    let (uid, gid) = (owner("uid", b.uid)?, owner("gid", b.gid)?);
    if uid.is_none() && gid.is_none() {
        return Err(ApiError::BadRequest("uid or gid is required".into()));
    }
    let rel = f.relative(&path, b.working_dir.as_deref())?;
    let recursive = b.recursive.unwrap_or(false);
    let changed = blocking(f.canceller(), move || {
        let resolve = |field: &str,
                       o: Option<Owner>,
                       db: &str,
                       what: &str|
         -> Result<Option<u32>, FilesError> {
            match o {
                None => Ok(None),
                Some(Owner::Id(n)) => Ok(Some(n)),
                Some(Owner::Name(name)) => f.lookup_id(db, &name)?.map(Some).ok_or_else(|| {
                    FilesError::Invalid(format!(
                        "{field} {name:?}: no such {what} in the environment's /{db}"
                    ))
                }),
            }
        };
        let uid = resolve("uid", uid, "etc/passwd", "user")?;
        let gid = resolve("gid", gid, "etc/group", "group")?;
        f.chown(&rel, uid, gid, recursive)
    })
    .await?;
    let affected: Vec<Value> = changed
        .into_iter()
        .map(|(path, uid, gid)| json!({"path": path, "uid": uid, "gid": gid}))
        .collect();
    Ok(Json(json!({"count": affected.len(), "affected": affected})))
}

/// Paths one `fs/watch` subscription may name.
const MAX_WATCH_PATHS: usize = 64;
/// How long a new `fs/watch` connection may take to subscribe.
const SUBSCRIBE_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Subscribe {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    recursive: bool,
    #[serde(default)]
    working_dir: Option<String>,
}

/// The root-relative paths and `recursive` of a subscribe message, or
/// what is wrong with it.
fn subscription(f: &Files, text: &str) -> Result<(Vec<String>, bool), String> {
    let s: Subscribe =
        serde_json::from_str(text).map_err(|e| format!("not a subscribe message: {e}"))?;
    if s.kind != "subscribe" {
        return Err("type: expected \"subscribe\"".into());
    }
    if s.paths.is_empty() || s.paths.len() > MAX_WATCH_PATHS {
        return Err(format!(
            "paths: {} given (1 to {MAX_WATCH_PATHS})",
            s.paths.len()
        ));
    }
    let rels = s
        .paths
        .iter()
        .map(|p| f.relative(p, s.working_dir.as_deref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok((rels, s.recursive))
}

fn text(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

fn watch_error(message: String) -> Message {
    text(json!({"type": "error", "message": message}))
}

fn change_message(c: &crate::watch::Change) -> Message {
    use crate::watch::Change;
    match c {
        Change::Event { path, kind, is_dir } => text(json!({
            "type": "event",
            "path": path,
            "event": kind,
            "isDir": is_dir,
            "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        })),
        Change::Lost => watch_error(
            "events were lost: the kernel's queue overflowed while the client read slowly".into(),
        ),
        Change::Skipped(why) => watch_error(format!("not watched: {why}")),
    }
}

/// `GET .../fs/watch` (WebSocket): the client's first text frame is
/// `{type: "subscribe", paths, recursive, workingDir}`; then
/// `{type: "subscribed", paths}` and one `{type: "event", path, event:
/// create|write|remove|rename|chmod, isDir, timestamp}` per change, or
/// `{type: "error", message}` (a bad subscription, events lost, a directory
/// not watched). See [`crate::watch`] for the bounds.
pub async fn watch(
    ws: WebSocketUpgrade,
    State(app): State<Arc<AppState>>,
) -> Result<Response, ApiError> {
    let f = files(&app)?;
    let slot = app
        .watches
        .take()
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(ws.on_upgrade(move |socket| watch_session(socket, f, slot, app)))
}

async fn watch_session(
    mut socket: WebSocket,
    f: Files,
    slot: crate::watch::Slot,
    app: Arc<AppState>,
) {
    let first = tokio::time::timeout(SUBSCRIBE_WITHIN, async {
        loop {
            match socket.recv().await {
                Some(Ok(Message::Text(t))) => return Some(t),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    let subscribe = match first {
        Ok(Some(t)) => t,
        Ok(None) => return,
        Err(_) => {
            let why = format!("no subscribe message within {SUBSCRIBE_WITHIN:?}");
            let _ = socket.send(watch_error(why)).await;
            return;
        }
    };
    let (rels, recursive) = match subscription(&f, subscribe.as_str()) {
        Ok(s) => s,
        Err(why) => {
            let _ = socket.send(watch_error(why)).await;
            return;
        }
    };
    let shown: Vec<String> = rels.iter().map(|r| f.display(r)).collect();
    let started =
        tokio::task::spawn_blocking(move || crate::watch::Watcher::new(f, &rels, recursive, slot))
            .await;
    let (mut watcher, skipped) = match started {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => {
            let _ = socket.send(watch_error(e.to_string())).await;
            return;
        }
        Err(e) => {
            let _ = socket.send(watch_error(format!("watch failed: {e}"))).await;
            return;
        }
    };
    if socket
        .send(text(json!({"type": "subscribed", "paths": shown})))
        .await
        .is_err()
    {
        return;
    }
    for s in &skipped {
        if socket.send(change_message(s)).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            changes = watcher.next() => match changes {
                Ok(changes) => {
                    for c in &changes {
                        if socket.send(change_message(c)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = socket.send(watch_error(e.to_string())).await;
                    return;
                }
            },
            m = socket.recv() => match m {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            _ = app.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Owner, owner};
    use serde_json::json;

    #[test]
    fn owners_are_ids_or_names_and_anything_else_is_refused() {
        let ok = |v| owner("uid", Some(v)).unwrap();
        assert_eq!(ok(json!(0)), Some(Owner::Id(0)));
        assert_eq!(ok(json!(4294967294u64)), Some(Owner::Id(4294967294)));
        assert_eq!(ok(json!("1000")), Some(Owner::Id(1000)));
        assert_eq!(ok(json!("nobody")), Some(Owner::Name("nobody".into())));
        assert_eq!(ok(json!(null)), None);
        assert_eq!(owner("uid", None).unwrap(), None);
        for v in [
            json!(-1),
            json!(4294967295u64),
            json!(1.5),
            json!(true),
            json!([1]),
            json!(""),
            json!("99999999999"),
            json!("a:b"),
            json!("x".repeat(257)),
        ] {
            let e = owner("gid", Some(v.clone())).unwrap_err().to_string();
            assert!(e.contains("gid"), "{v}: {e}");
        }
    }
}
