//! Exec sessions: commands run inside the environment on behalf of API
//! clients. This module owns their processes, their pseudo-terminals and
//! their cgroups (`<parent>/_exec-<id>`; a leading `_` is never a service
//! name, so the two cannot collide).
//!
//! A session is one command. Its output is pumped into a bounded scrollback
//! and to every attached client through a bounded channel, so a slow client
//! slows the command (backpressure) and memory stays bounded whatever it
//! prints. Without a client the pump keeps reading: the command never blocks
//! on a detached terminal, and only the newest [`SCROLLBACK`] bytes are kept.
//!
//! ```text
//!  spawn ──▶ Running ──(main process exits, output drained,
//!              │        rest of the cgroup killed)──▶ Exited ──▶ removed
//!              │                                               (exit seen by a
//!              └─(no client for max_run_after_disconnect)─kill  client, or
//!                                                               RETAIN later)
//! ```
//!
//! Checkpoints freeze every session's cgroup with the services'; a restore
//! kills every session ([`Sessions::kill_all`]).

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cgroup::{Cgroup, CgroupError, Cgroups};
use crate::container::{Container, ContainerError};
use crate::reaper::Exit;

/// Output kept for clients that attach later, per session.
pub const SCROLLBACK: usize = 256 * 1024;
/// How long an exited session nobody has seen the end of stays listed.
pub const RETAIN: Duration = Duration::from_secs(300);
/// After the main process exits, how long the rest of its output may take
/// before the session's remaining processes are killed.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
const CHUNK: usize = 32 * 1024;
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("invalid exec request: {0}")]
    Invalid(String),
    #[error("exec session {0} not found")]
    NotFound(String),
    #[error("cannot start {cmd}: {message}")]
    Start { cmd: String, message: String },
    #[error("exec is unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{op} for exec session {id}: {source}")]
    Io {
        op: &'static str,
        id: u64,
        #[source]
        source: io::Error,
    },
}

/// What the daemon hands the session manager.
pub struct SessionsConfig {
    pub cgroups: Option<Cgroups>,
    /// Where commands run (`None`: the environment is unavailable).
    pub container: Option<Container>,
    /// The environment a command starts from (unless its request replaces it).
    pub base_env: Vec<(String, String)>,
}

/// How a request sets the command's environment.
#[derive(Debug, Clone)]
pub enum EnvSpec {
    /// The base environment plus these (the seed-003 JSON `env`).
    Extend(Vec<(String, String)>),
    /// Exactly these (the WebSocket's repeated `env=K=V`).
    Replace(Vec<(String, String)>),
}

/// One command to start.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// argv, argv[0] included.
    pub argv: Vec<String>,
    /// The program to run (default argv[0], looked up in `PATH`).
    pub path: Option<String>,
    pub env: EnvSpec,
    pub dir: Option<String>,
    /// `(rows, cols)` of a pseudo-terminal; `None`: pipes.
    pub tty: Option<(u16, u16)>,
    /// Whether the client may write to its stdin (otherwise `/dev/null`).
    pub stdin: bool,
    /// How long it runs on without any client; zero: forever.
    pub max_run_after_disconnect: Duration,
}

/// What a session sends its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Stream 1 (stdout, or everything from a terminal) or 2 (stderr).
    Data(u8, Bytes),
    /// The command ended (exit code, or 128 + signal), output complete.
    Exit(i32),
}

/// What a client sends a session.
#[derive(Debug)]
pub enum Input {
    Data(Bytes),
    Eof,
}

/// The `session_info` a client gets on connect.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub session_id: String,
    pub command: String,
    pub created: u64,
    pub cols: u16,
    pub rows: u16,
    pub is_owner: bool,
    pub tty: bool,
}

/// One row of `GET .../exec`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionSummary {
    pub id: String,
    pub command: String,
    pub workdir: String,
    pub created: String,
    pub bytes_per_second: f64,
    pub is_active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity: Option<String>,
    pub tty: bool,
    pub pid: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// A session's process as it started (or as a restore brought it back).
struct Started {
    id: u64,
    argv: Vec<String>,
    workdir: String,
    created: SystemTime,
    pid: i32,
    host_pid: i32,
    cgroup: Cgroup,
    max_run_after_disconnect: Duration,
    /// `(rows, cols)` of its terminal, `(0, 0)` without one.
    size: (u16, u16),
}

/// A running session in a checkpoint's dump.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DumpedSession {
    pub id: u64,
    pub argv: Vec<String>,
    pub workdir: String,
    pub created_ms: u64,
    /// Its main process, inside the environment.
    pub pid: i32,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
    /// `pipe:[N]` of its stdin (when the daemon writes it), stdout, stderr.
    pub stdin: Option<String>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    pub max_run_after_disconnect_ms: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct State {
    scrollback: VecDeque<(u8, Bytes)>,
    scroll_bytes: usize,
    clients: BTreeMap<u64, mpsc::Sender<Output>>,
    exit: Option<i32>,
    /// Whether a client has received the exit (the session may go then).
    exit_seen: bool,
    last_activity: SystemTime,
    bytes_out: u64,
    rows: u16,
    cols: u16,
    /// Cancels the kill scheduled for a session left without clients.
    orphan_timer: Option<CancellationToken>,
}

/// One running (or just ended) command.
pub struct Session {
    pub id: u64,
    pub argv: Vec<String>,
    pub workdir: String,
    pub created: SystemTime,
    /// The pid inside the environment (what the API shows).
    pub pid: i32,
    /// The same process on the host (its process group, for signals).
    host_pid: i32,
    /// Whether it runs on a terminal (whose relay inside the environment
    /// the daemon talks to through its stdin and stdout pipes).
    tty: bool,
    /// Where its terminal is resized.
    container: Option<Container>,
    /// `pipe:[N]` of the daemon's stdin, stdout and stderr pipes (what a
    /// restore plugs new pipes into).
    pipe_ids: [Option<String>; 3],
    cgroup: Option<Cgroup>,
    max_run_after_disconnect: Duration,
    stdin: Option<mpsc::Sender<Input>>,
    state: Mutex<State>,
    /// Becomes `Some(code)` when the session ends.
    done: watch::Sender<Option<i32>>,
    next_client: AtomicU64,
}

impl Session {
    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_tty(&self) -> bool {
        self.tty
    }

    /// The session's cgroup, when it has one (for checkpoints and ports).
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    pub fn command(&self) -> String {
        self.argv.join(" ")
    }

    pub fn info(&self, is_owner: bool) -> SessionInfo {
        let st = self.st();
        SessionInfo {
            kind: "session_info",
            session_id: self.id.to_string(),
            command: self.command(),
            created: unix_secs(self.created),
            cols: if self.is_tty() { st.cols } else { 0 },
            rows: if self.is_tty() { st.rows } else { 0 },
            is_owner,
            tty: self.is_tty(),
        }
    }

    fn summary(&self) -> SessionSummary {
        let st = self.st();
        let age = self.created.elapsed().unwrap_or_default().as_secs_f64();
        SessionSummary {
            id: self.id.to_string(),
            command: self.command(),
            workdir: self.workdir.clone(),
            created: rfc3339(self.created),
            bytes_per_second: if age > 0.0 {
                st.bytes_out as f64 / age
            } else {
                0.0
            },
            is_active: !st.clients.is_empty(),
            last_activity: Some(rfc3339(st.last_activity)),
            tty: self.is_tty(),
            pid: self.pid,
            exit_code: st.exit,
        }
    }

    /// The exit code once the session has ended.
    pub fn exit_code(&self) -> Option<i32> {
        *self.done.borrow()
    }

    /// Waits until the session has ended; its exit code.
    pub async fn wait(&self) -> i32 {
        let mut rx = self.done.subscribe();
        loop {
            if let Some(code) = *rx.borrow_and_update() {
                return code;
            }
            if rx.changed().await.is_err() {
                return -1;
            }
        }
    }

    /// Writes to the command's stdin (ignored when it has none).
    pub async fn input(&self, input: Input) {
        if let Some(tx) = &self.stdin {
            let _ = tx.send(input).await;
        }
        self.st().last_activity = SystemTime::now();
    }

    /// Resizes the terminal (no-op without one).
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        let (true, Some(c)) = (self.tty, self.container.clone()) else {
            return Ok(());
        };
        let pid = self.pid;
        tokio::spawn(async move {
            if let Err(e) = c.resize(pid, rows, cols).await {
                tracing::debug!(pid, error = %e, "resize failed");
            }
        });
        let mut st = self.st();
        st.rows = rows;
        st.cols = cols;
        Ok(())
    }

    /// Sends `signal` to the command's process group.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> io::Result<()> {
        if self.exit_code().is_some() {
            return Ok(());
        }
        match crate::sys::kill_group(self.host_pid, signal) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    /// SIGKILLs every process of the session (its whole cgroup).
    pub async fn kill(&self) {
        match self.cgroup.clone() {
            Some(cg) => {
                let r = tokio::task::spawn_blocking(move || cg.kill_all(KILL_TIMEOUT)).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(session = self.id, error = %e, "kill failed");
                }
            }
            None => {
                let _ = crate::sys::kill_group(self.host_pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// A client's view of a session: what it missed, then live output. Dropping
/// it detaches the client.
pub struct Attachment {
    pub session: Arc<Session>,
    /// Output produced before the attach (bounded), oldest first.
    pub scrollback: Vec<Output>,
    pub rx: mpsc::Receiver<Output>,
    pub is_owner: bool,
    client: u64,
    sessions: Sessions,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.sessions.detach(&self.session, self.client);
    }
}

impl Attachment {
    /// Records that this client saw the exit (the session may then be removed).
    pub fn saw_exit(&self) {
        self.session.st().exit_seen = true;
    }
}

struct Inner {
    cfg: SessionsConfig,
    table: Mutex<BTreeMap<u64, Arc<Session>>>,
    next_id: AtomicU64,
}

/// Cheap, cloneable handle to every session.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn io_err(op: &'static str, id: u64) -> impl FnOnce(io::Error) -> ExecError {
    move |source| ExecError::Io { op, id, source }
}

impl Sessions {
    pub fn new(cfg: SessionsConfig) -> Self {
        Sessions {
            inner: Arc::new(Inner {
                cfg,
                table: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Session>>> {
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Result<Arc<Session>, ExecError> {
        id.parse::<u64>()
            .ok()
            .and_then(|n| self.table().get(&n).cloned())
            .ok_or_else(|| ExecError::NotFound(id.to_owned()))
    }

    pub fn list(&self) -> Vec<SessionSummary> {
        let sessions: Vec<_> = self.table().values().cloned().collect();
        sessions.iter().map(|s| s.summary()).collect()
    }

    /// The cgroups of sessions still running (a checkpoint freezes them).
    pub fn cgroups(&self) -> Vec<Cgroup> {
        self.table()
            .values()
            .filter(|s| s.exit_code().is_none())
            .filter_map(|s| s.cgroup.clone())
            .collect()
    }

    /// Kills every session (a restore does, before replacing the files).
    pub async fn kill_all(&self) {
        let sessions: Vec<_> = self.table().values().cloned().collect();
        for s in sessions {
            if s.exit_code().is_none() {
                s.kill().await;
            }
        }
    }

    /// Starts a command and attaches its creator.
    #[tracing::instrument(name = "exec", skip_all, fields(session = tracing::field::Empty, pid = tracing::field::Empty))]
    pub async fn spawn(&self, req: ExecRequest) -> Result<Attachment, ExecError> {
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(ExecError::Invalid("empty command".into()));
        }
        for a in &req.argv {
            if a.contains('\0') {
                return Err(ExecError::Invalid(
                    "a command argument contains a NUL byte".into(),
                ));
            }
        }
        let (Some(container), Some(cgroups)) = (&self.inner.cfg.container, &self.inner.cfg.cgroups)
        else {
            return Err(ExecError::Unavailable(
                "the environment is unavailable (see /v1/status)".into(),
            ));
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::Span::current().record("session", id);
        let program = req.path.clone().unwrap_or_else(|| req.argv[0].clone());
        let mut env = match &req.env {
            EnvSpec::Extend(extra) => {
                crate::container::env_list(&self.inner.cfg.base_env, extra.iter().cloned())
            }
            EnvSpec::Replace(vars) => crate::container::env_list(&[], vars.iter().cloned()),
        };
        for kv in &env {
            let k = kv.split('=').next().unwrap_or("");
            if kv.contains('\0') || k.is_empty() {
                return Err(ExecError::Invalid(format!(
                    "bad environment variable {k:?}"
                )));
            }
        }
        if req.tty.is_some() && !env.iter().any(|kv| kv.starts_with("TERM=")) {
            env.push("TERM=xterm-256color".into());
        }
        let workdir = req.dir.clone().unwrap_or_else(|| "/".to_owned());
        if workdir.contains('\0') {
            return Err(ExecError::Invalid("bad dir: contains a NUL byte".into()));
        }
        let spec = crate::container::SpawnSpec {
            argv: req.argv.clone(),
            path: req.path.clone(),
            env,
            dir: workdir.clone(),
            stdio: match req.tty {
                Some((rows, cols)) => crate::container::Stdio::Tty { rows, cols },
                None => crate::container::Stdio::Pipes { stdin: req.stdin },
            },
            privileges: None,
        };
        let cg = cgroups.child(&format!("_exec-{id}"))?;
        let mut child = match container.spawn(spec, &cg).await {
            Ok(c) => c,
            Err(e) => {
                let _ = cg.remove();
                let message = match &e {
                    ContainerError::Refused {
                        errno: Some(libc::ENOENT),
                        ..
                    } => {
                        if req.dir.is_some() {
                            "command not found (or working directory missing)".to_owned()
                        } else {
                            "command not found".to_owned()
                        }
                    }
                    ContainerError::Refused {
                        errno: Some(libc::EACCES),
                        ..
                    } => "permission denied".to_owned(),
                    _ => e.to_string(),
                };
                return Err(ExecError::Start {
                    cmd: program,
                    message,
                });
            }
        };
        tracing::Span::current().record("pid", child.pid);
        tracing::info!(command = %req.argv.join(" "), tty = req.tty.is_some(), "started");
        let (rows, cols) = req.tty.unwrap_or((0, 0));
        let (session, attachment) = self.install(
            Started {
                id,
                argv: req.argv.clone(),
                workdir,
                created: SystemTime::now(),
                pid: child.pid,
                host_pid: child.host_pid,
                cgroup: cg,
                max_run_after_disconnect: req.max_run_after_disconnect,
                size: (rows, cols),
            },
            [child.stdin.take(), child.stdout.take(), child.stderr.take()],
            req.tty.is_some(),
            child.exit,
            true,
        )?;
        let _ = session;
        Ok(attachment.expect("the owner attaches"))
    }

    /// Makes a started (or restored) process a session: its stdin writer,
    /// output pumps and exit watcher. With `owner`, the creator attaches
    /// before any output is read, so it misses nothing.
    fn install(
        &self,
        st: Started,
        [stdin_fd, stdout, stderr]: [Option<OwnedFd>; 3],
        tty: bool,
        exit: tokio::sync::oneshot::Receiver<Exit>,
        owner: bool,
    ) -> Result<(Arc<Session>, Option<Attachment>), ExecError> {
        let id = st.id;
        let id_of =
            |fd: &Option<OwnedFd>| fd.as_ref().and_then(|f| crate::container::pipe_id(f).ok());
        let pipe_ids = [id_of(&stdin_fd), id_of(&stdout), id_of(&stderr)];
        // Stdin: one writer task owns the pipe (a terminal's input ignores EOF).
        let stdin = if let Some(pipe) = stdin_fd {
            let (tx, mut rx) = mpsc::channel::<Input>(16);
            let mut pipe = tokio::net::unix::pipe::Sender::from_owned_fd(pipe)
                .map_err(io_err("register stdin", id))?;
            tokio::spawn(async move {
                while let Some(i) = rx.recv().await {
                    match i {
                        Input::Data(b) => {
                            if pipe.write_all(&b).await.is_err() {
                                break;
                            }
                        }
                        Input::Eof if tty => {}
                        Input::Eof => break,
                    }
                }
                // Dropping the pipe is the EOF.
            });
            Some(tx)
        } else {
            None
        };
        let (rows, cols) = st.size;
        let session = Arc::new(Session {
            id,
            argv: st.argv,
            workdir: st.workdir,
            created: st.created,
            pid: st.pid,
            host_pid: st.host_pid,
            tty,
            container: self.inner.cfg.container.clone(),
            pipe_ids,
            cgroup: Some(st.cgroup),
            max_run_after_disconnect: st.max_run_after_disconnect,
            stdin,
            state: Mutex::new(State {
                scrollback: VecDeque::new(),
                scroll_bytes: 0,
                clients: BTreeMap::new(),
                exit: None,
                exit_seen: false,
                last_activity: SystemTime::now(),
                bytes_out: 0,
                rows,
                cols,
                orphan_timer: None,
            }),
            done: watch::channel(None).0,
            next_client: AtomicU64::new(1),
        });
        let attachment = owner.then(|| self.attach_session(&session, true));
        self.table().insert(id, session.clone());
        let mut pumps = tokio::task::JoinSet::new();
        if let Some(out) = stdout {
            let r = tokio::net::unix::pipe::Receiver::from_owned_fd(out)
                .map_err(io_err("register stdout", id))?;
            pumps.spawn(pump(session.clone(), 1, r));
        }
        if let Some(err) = stderr {
            let r = tokio::net::unix::pipe::Receiver::from_owned_fd(err)
                .map_err(io_err("register stderr", id))?;
            pumps.spawn(pump(session.clone(), 2, r));
        }
        let me = self.clone();
        let s = session.clone();
        tokio::spawn(async move {
            let exit = exit.await.unwrap_or(Exit::Code(-1));
            me.finish(s, exit, pumps).await;
        });
        if !owner {
            // Nobody is attached: it runs on as a detached session would.
            self.detach(&session, 0);
        }
        Ok((session, attachment))
    }

    /// What a restore needs to adopt each running session: its process and
    /// the pipes the daemon holds (`pipe:[N]`).
    pub fn dump_plan(&self) -> Vec<DumpedSession> {
        self.table()
            .values()
            .filter(|s| s.exit_code().is_none())
            .map(|s| {
                let (rows, cols) = {
                    let st = s.st();
                    (st.rows, st.cols)
                };
                DumpedSession {
                    id: s.id,
                    argv: s.argv.clone(),
                    workdir: s.workdir.clone(),
                    created_ms: unix_ms(s.created),
                    pid: s.pid,
                    tty: s.tty,
                    rows,
                    cols,
                    stdin: s.pipe_ids[0].clone(),
                    stdout: s.pipe_ids[1].clone(),
                    stderr: s.pipe_ids[2].clone(),
                    max_run_after_disconnect_ms: s.max_run_after_disconnect.as_millis() as u64,
                }
            })
            .collect()
    }

    /// Adopts a session whose process a restore brought back (`pipes`: the
    /// daemon's new ends of its stdin, stdout and stderr).
    pub fn adopt(
        &self,
        d: &DumpedSession,
        host_pid: i32,
        cgroup: Cgroup,
        pipes: [Option<OwnedFd>; 3],
        exit: tokio::sync::oneshot::Receiver<Exit>,
    ) -> Result<(), ExecError> {
        self.inner.next_id.fetch_max(d.id + 1, Ordering::Relaxed);
        self.install(
            Started {
                id: d.id,
                argv: d.argv.clone(),
                workdir: d.workdir.clone(),
                created: SystemTime::UNIX_EPOCH + Duration::from_millis(d.created_ms),
                pid: d.pid,
                host_pid,
                cgroup,
                max_run_after_disconnect: Duration::from_millis(d.max_run_after_disconnect_ms),
                size: (d.rows, d.cols),
            },
            pipes,
            d.tty,
            exit,
            false,
        )?;
        tracing::info!(session = d.id, pid = d.pid, "adopted a restored session");
        Ok(())
    }

    /// Drops `session` from the table, unless a restore has put another
    /// session under its id meanwhile.
    fn forget(&self, session: &Arc<Session>) {
        let mut table = self.table();
        if table
            .get(&session.id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            table.remove(&session.id);
        }
    }

    /// Attaches another client to a running (or just ended) session.
    pub fn attach(&self, id: &str) -> Result<Attachment, ExecError> {
        let session = self.get(id)?;
        Ok(self.attach_session(&session, false))
    }

    fn attach_session(&self, session: &Arc<Session>, is_owner: bool) -> Attachment {
        let (tx, rx) = mpsc::channel(16);
        let client = session.next_client.fetch_add(1, Ordering::Relaxed);
        let mut st = session.st();
        if let Some(t) = st.orphan_timer.take() {
            t.cancel();
        }
        let mut scrollback: Vec<Output> = st
            .scrollback
            .iter()
            .map(|(s, b)| Output::Data(*s, b.clone()))
            .collect();
        match st.exit {
            Some(code) => scrollback.push(Output::Exit(code)),
            None => {
                st.clients.insert(client, tx);
            }
        }
        st.last_activity = SystemTime::now();
        drop(st);
        Attachment {
            session: session.clone(),
            scrollback,
            rx,
            is_owner,
            client,
            sessions: self.clone(),
        }
    }

    fn detach(&self, session: &Arc<Session>, client: u64) {
        let mut st = session.st();
        st.clients.remove(&client);
        st.last_activity = SystemTime::now();
        if !st.clients.is_empty() {
            return;
        }
        if st.exit.is_some() {
            if st.exit_seen {
                drop(st);
                self.forget(session);
            }
            return;
        }
        let d = session.max_run_after_disconnect;
        if d.is_zero() {
            return;
        }
        let token = CancellationToken::new();
        st.orphan_timer = Some(token.clone());
        drop(st);
        let s = session.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::time::sleep(d) => {
                    tracing::info!(session = s.id, "no client for {d:?}: killing the session");
                    s.kill().await;
                }
            }
        });
    }

    /// The main process exited: collect the rest of the output, end the
    /// session's other processes, tell the clients.
    async fn finish(&self, session: Arc<Session>, exit: Exit, mut pumps: tokio::task::JoinSet<()>) {
        let code = exit.code();
        let drained = tokio::time::timeout(DRAIN_GRACE, async {
            while pumps.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        if let Some(cg) = session.cgroup.clone() {
            let r = tokio::task::spawn_blocking(move || {
                cg.kill_all(KILL_TIMEOUT)?;
                cg.remove()
            })
            .await;
            if let Ok(Err(e)) = r {
                tracing::warn!(session = session.id, error = %e, "cannot clean up the session's cgroup");
            }
        }
        if !drained {
            // Whoever held the output open is dead now: what is left is buffered.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while pumps.join_next().await.is_some() {}
            })
            .await;
            pumps.abort_all();
        }
        tracing::info!(session = session.id, pid = session.pid, code, "exited");
        let clients: Vec<_> = {
            let mut st = session.st();
            st.exit = Some(code);
            if let Some(t) = st.orphan_timer.take() {
                t.cancel();
            }
            std::mem::take(&mut st.clients).into_values().collect()
        };
        session.done.send_replace(Some(code));
        for tx in clients {
            let _ = tx.send(Output::Exit(code)).await;
        }
        // Listed until a client saw the end, or for RETAIN.
        let me = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + RETAIN;
            loop {
                let seen = session.st().exit_seen;
                if seen || tokio::time::Instant::now() >= deadline {
                    me.forget(&session);
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

/// Appends output to the scrollback and hands it to every client.
async fn deliver(session: &Session, stream: u8, chunk: Bytes) {
    let clients: Vec<_> = {
        let mut st = session.st();
        st.bytes_out += chunk.len() as u64;
        st.last_activity = SystemTime::now();
        st.scroll_bytes += chunk.len();
        st.scrollback.push_back((stream, chunk.clone()));
        while st.scroll_bytes > SCROLLBACK && st.scrollback.len() > 1 {
            if let Some((_, old)) = st.scrollback.pop_front() {
                st.scroll_bytes -= old.len();
            }
        }
        st.clients.values().cloned().collect()
    };
    for tx in clients {
        let _ = tx.send(Output::Data(stream, chunk.clone())).await;
    }
}

async fn pump(session: Arc<Session>, stream: u8, mut r: impl AsyncRead + Unpin) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => deliver(&session, stream, Bytes::copy_from_slice(&buf[..n])).await,
        }
    }
}
