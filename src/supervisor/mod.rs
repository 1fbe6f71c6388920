//! Services: their definitions (persisted), their processes (one cgroup
//! each), restarts with backoff, logs, and the events the API streams.
//!
//! ```text
//!  stopped ──start──▶ starting ──(spawned; http_port accepts)──▶ running
//!     ▲                  │ spawn fails                              │
//!     │                  ▼                                          │ exits on its own
//!     │               failed ◀──────────────────────────────────────┘
//!     │                  │ backoff (1 s doubling to 30 s; reset after 60 s up)
//!     │                  └──────────────▶ starting (restart_count + 1)
//!     └── stopping ◀──stop── running | starting   (failed + stop → stopped)
//! ```
//!
//! - `stopped`: not running and not scheduled to (never started, stopped
//!   through the API, or the daemon is shutting down).
//! - `starting`: spawned, waiting for its `http_port` (if any) to accept.
//! - `running`: up.
//! - `stopping`: SIGTERM sent to every process of its cgroup; after the stop
//!   timeout (or once the main process exits) the whole cgroup is killed.
//! - `failed`: exited on its own (restart scheduled: `next_restart_at`) or
//!   could not be spawned (`error` says why; not retried until started again).
//!
//! Concurrency: the table is a `std::sync::Mutex` never held across an
//! `.await`; operations on one service (start, stop, restart, delete) are
//! serialised by that service's async `op` lock.

pub mod logs;
pub mod spec;
pub mod state;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::cgroup::{Cgroup, CgroupError, Cgroups};
use crate::container::{Container, ContainerError, SpawnSpec};
use crate::durable::{self, DurableError};
use crate::reaper::Exit;
use logs::{LogLine, LogSink, Stream, now_ms};
pub use spec::{ServiceDef, ServiceSpec};
use state::Happening;

/// First restart delay; doubles per consecutive crash.
/// How long a stop waits for the exit report of a killed service.
const EXIT_AFTER_KILL: Duration = Duration::from_secs(30);
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A service up this long has its backoff reset.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// Longest output line kept as one event; longer ones are split.
const MAX_LINE: usize = 64 * 1024;
/// Where the service logs are inside the environment.
pub const LOGS_INSIDE: &str = "/.sprite/logs/services";
/// How long a kill of a whole cgroup may take before it is an error.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("service {0:?} not found")]
    NotFound(String),
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    Conflict(String),
    #[error("service {0:?} is not running")]
    NotRunning(String),
    #[error("failed to start service {name:?}: {message}")]
    Start { name: String, message: String },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("service definitions {path} are unreadable: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("services are unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Stopped,
    Starting,
    Running,
    Stopping,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Started,
    Stdout,
    Stderr,
    Exit,
    Error,
    Stopping,
    Stopped,
    Complete,
}

/// One NDJSON event, shaped as the seeds give them, plus the `service` it
/// concerns (streams of a start include the services it needs).
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_files: Option<BTreeMap<&'static str, String>>,
    pub timestamp: u64,
    pub service: String,
}

impl Event {
    pub fn new(kind: EventKind, service: &str) -> Self {
        Event {
            kind,
            data: None,
            exit_code: None,
            log_files: None,
            timestamp: now_ms(),
            service: service.to_owned(),
        }
    }
    pub fn data(mut self, d: impl Into<String>) -> Self {
        self.data = Some(d.into());
        self
    }
    pub fn code(mut self, c: Option<i32>) -> Self {
        self.exit_code = c;
        self
    }
}

/// The record the API returns for a service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceRecord {
    pub name: String,
    pub cmd: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub dir: Option<String>,
    pub needs: Vec<String>,
    pub http_port: Option<u32>,
    pub state: StateRecord,
}

#[derive(Debug, Clone, Serialize)]
pub struct StateRecord {
    pub name: String,
    pub status: Status,
    pub pid: Option<i32>,
    /// RFC 3339 with milliseconds.
    pub started_at: Option<String>,
    pub error: Option<String>,
    pub restart_count: u32,
    pub next_restart_at: Option<String>,
    pub exit_code: Option<i32>,
}

#[derive(Debug, Default)]
struct Runtime {
    status: Option<Status>,
    pid: Option<i32>,
    started_at: Option<SystemTime>,
    error: Option<String>,
    restart_count: u32,
    next_restart_at: Option<SystemTime>,
    exit_code: Option<i32>,
}

struct Instance {
    generation: u64,
    /// The main process, inside the environment and on the host.
    pid: i32,
    host_pid: i32,
    cgroup: Cgroup,
    exited: watch::Receiver<Option<Exit>>,
    stopping: bool,
    up_since: Instant,
}

struct Svc {
    def: ServiceDef,
    rt: Runtime,
    log: Arc<LogSink>,
    op: Arc<tokio::sync::Mutex<()>>,
    instance: Option<Instance>,
    restart_timer: Option<CancellationToken>,
    backoff_exp: u32,
}

/// Settings the daemon hands the supervisor.
pub struct SupervisorConfig {
    pub state_dir: PathBuf,
    pub cgroups: Option<Cgroups>,
    /// Where services run (`None`: the environment is unavailable, and no
    /// service starts).
    pub container: Option<Container>,
    /// The environment every service starts from (its `env` is added on top).
    pub base_env: Vec<(String, String)>,
    /// How long a start waits for a declared `http_port` to accept.
    pub port_wait: Duration,
    pub max_log_file: u64,
}

struct Inner {
    table: Mutex<BTreeMap<String, Svc>>,
    cfg: SupervisorConfig,
    defs_path: PathBuf,
    logs_dir: PathBuf,
    events: broadcast::Sender<Event>,
    generation: std::sync::atomic::AtomicU64,
}

/// Cheap, cloneable handle.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Serialize, serde::Deserialize)]
struct DefsFile {
    services: Vec<ServiceDef>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SupervisorError + 'a {
    move |source| SupervisorError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl Supervisor {
    /// Loads persisted definitions and kills whatever a previous (crashed)
    /// daemon left running in the service cgroups. Starts nothing.
    pub fn open(cfg: SupervisorConfig) -> Result<Self, SupervisorError> {
        let defs_path = cfg.state_dir.join("services.json");
        let logs_dir = cfg.state_dir.join("logs").join("services");
        std::fs::create_dir_all(&logs_dir).map_err(io_err("create", &logs_dir))?;
        let defs: Vec<ServiceDef> = match std::fs::read(&defs_path) {
            Ok(bytes) => {
                serde_json::from_slice::<DefsFile>(&bytes)
                    .map_err(|e| SupervisorError::Corrupt {
                        path: defs_path.clone(),
                        message: e.to_string(),
                    })?
                    .services
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err("read", &defs_path)(e)),
        };
        // What a previous daemon left in the cgroups went with the
        // environment's first start (`Container::start`).
        let mut table = BTreeMap::new();
        for def in defs {
            let log = Arc::new(LogSink::open(
                logs_dir.join(format!("{}.log", def.name)),
                cfg.max_log_file,
            ));
            table.insert(def.name.clone(), new_svc(def, log));
        }
        let (events, _) = broadcast::channel(4096);
        Ok(Supervisor {
            inner: Arc::new(Inner {
                table: Mutex::new(table),
                cfg,
                defs_path,
                logs_dir,
                events,
                generation: std::sync::atomic::AtomicU64::new(1),
            }),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Svc>> {
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads something of service `name` under the table lock.
    fn lookup<T>(&self, name: &str, f: impl FnOnce(&Svc) -> T) -> Result<T, SupervisorError> {
        self.table()
            .get(name)
            .map(f)
            .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))
    }

    fn emit(&self, event: Event) {
        let _ = self.inner.events.send(event);
    }

    /// Every event of every service, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Starts, in dependency order, every service not stopped through the API.
    pub async fn start_all(&self) {
        let names: Vec<String> = self
            .table()
            .values()
            .filter(|s| s.def.autostart)
            .map(|s| s.def.name.clone())
            .collect();
        for name in names {
            if let Err(e) = self.start(&name).await {
                tracing::warn!(service = %name, error = %e, "service did not start");
            }
        }
    }

    pub fn list(&self) -> Vec<ServiceRecord> {
        self.table().values().map(record).collect()
    }

    pub fn get(&self, name: &str) -> Result<ServiceRecord, SupervisorError> {
        self.lookup(name, record)
    }

    /// The log paths the `complete` event reports: where they are inside
    /// the environment.
    pub fn log_files(&self, name: &str) -> BTreeMap<&'static str, String> {
        let p = format!("{LOGS_INSIDE}/{name}.log");
        BTreeMap::from([
            ("combined", p.clone()),
            ("stderr", p.clone()),
            ("stdout", p),
        ])
    }

    /// The last `lines` log lines of a service (all kept ones when `None`).
    pub fn log_tail(
        &self,
        name: &str,
        lines: Option<usize>,
    ) -> Result<Vec<LogLine>, SupervisorError> {
        let log = self.lookup(name, |s| s.log.clone())?;
        Ok(log.tail(lines))
    }

    /// Services that `name` needs, transitively, then `name`.
    pub fn start_order(&self, name: &str) -> Vec<String> {
        let table = self.table();
        let defs: BTreeMap<String, ServiceDef> = table
            .iter()
            .map(|(k, v)| (k.clone(), v.def.clone()))
            .collect();
        spec::start_order(name, &defs)
    }

    fn defs(table: &BTreeMap<String, Svc>) -> BTreeMap<String, ServiceDef> {
        table
            .iter()
            .map(|(k, v)| (k.clone(), v.def.clone()))
            .collect()
    }

    fn persist(&self, table: &BTreeMap<String, Svc>) -> Result<(), SupervisorError> {
        let file = DefsFile {
            services: table.values().map(|s| s.def.clone()).collect(),
        };
        durable::write_json(&self.inner.defs_path, &file)?;
        Ok(())
    }

    /// Creates or updates a definition (validated, persisted). Returns whether
    /// a running instance must be restarted because the spec changed.
    pub fn put(&self, name: &str, spec: ServiceSpec) -> Result<PutOutcome, SupervisorError> {
        let mut table = self.table();
        let mut others = Self::defs(&table);
        others.remove(name);
        spec::validate(name, &spec, &others)?;
        let outcome = match table.get_mut(name) {
            Some(svc) => {
                let changed = svc.def.spec != spec;
                svc.def.spec = spec;
                svc.def.autostart = true;
                PutOutcome {
                    created: false,
                    restart: changed && svc.instance.is_some(),
                }
            }
            None => {
                let log = Arc::new(LogSink::open(
                    self.inner.logs_dir.join(format!("{name}.log")),
                    self.inner.cfg.max_log_file,
                ));
                let def = ServiceDef {
                    name: name.to_owned(),
                    spec,
                    autostart: true,
                };
                table.insert(name.to_owned(), new_svc(def, log));
                PutOutcome {
                    created: true,
                    restart: false,
                }
            }
        };
        if let Err(e) = self.persist(&table) {
            if outcome.created {
                table.remove(name);
            }
            return Err(e);
        }
        Ok(outcome)
    }

    /// Starts `name`, starting what it needs first (each up before the next).
    pub async fn start(&self, name: &str) -> Result<(), SupervisorError> {
        if !self.table().contains_key(name) {
            return Err(SupervisorError::NotFound(name.to_owned()));
        }
        for n in self.start_order(name) {
            self.start_one(&n, false).await?;
        }
        Ok(())
    }

    /// Starts one service if it is not running. `is_restart` counts it.
    async fn start_one(&self, name: &str, is_restart: bool) -> Result<(), SupervisorError> {
        let op = self.lookup(name, |s| s.op.clone())?;
        let _guard = op.lock().await;
        {
            let mut table = self.table();
            let svc = table
                .get_mut(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            if svc.instance.is_some() {
                return Ok(());
            }
            if let Some(t) = svc.restart_timer.take() {
                t.cancel();
            }
            if is_restart {
                svc.rt.restart_count += 1;
            }
            let changed = !svc.def.autostart;
            svc.def.autostart = true;
            if changed {
                self.persist(&table)?;
            }
        }
        self.spawn_instance(name).await
    }

    #[tracing::instrument(name = "service", skip(self), fields(name = %name, pid = tracing::field::Empty))]
    async fn spawn_instance(&self, name: &str) -> Result<(), SupervisorError> {
        let def = self.lookup(name, |s| s.def.clone())?;
        // Nothing from a previous instance survives.
        let cgroup = self.fresh_cgroup(name).await?;
        let Some(container) = self.inner.cfg.container.clone() else {
            let message = "the environment is unavailable (see /v1/status)".to_owned();
            return Err(self.failed_start(name, &cgroup, message));
        };
        let spec = SpawnSpec {
            argv: std::iter::once(def.spec.cmd.clone())
                .chain(def.spec.args.iter().cloned())
                .collect(),
            path: None,
            env: crate::container::env_list(
                &self.inner.cfg.base_env,
                def.spec.env.iter().map(|(k, v)| (k.clone(), v.clone())),
            ),
            dir: def.spec.dir.clone().unwrap_or_else(|| "/".to_owned()),
            stdio: crate::container::Stdio::Pipes { stdin: false },
            privileges: None,
        };
        let mut child = match container.spawn(spec, &cgroup).await {
            Ok(c) => c,
            Err(e) => {
                let message = match &e {
                    ContainerError::Refused {
                        errno: Some(libc::ENOENT),
                        ..
                    } => format!(
                        "command not found: {} (or dir does not exist)",
                        def.spec.cmd
                    ),
                    ContainerError::Refused {
                        errno: Some(libc::EACCES),
                        ..
                    } => format!("permission denied: {}", def.spec.cmd),
                    _ => e.to_string(),
                };
                return Err(self.failed_start(name, &cgroup, message));
            }
        };
        tracing::Span::current().record("pid", child.pid);
        tracing::info!(host_pid = child.host_pid, "started");
        let (generation, exit_rx) = self.attach(
            name,
            cgroup,
            (child.pid, child.host_pid),
            [child.stdout.take(), child.stderr.take()],
            child.exit,
            Happening::Spawned,
            format!("Service {name} started"),
        )?;
        // Up: spawned, and its declared http_port accepts connections.
        if let Some(port) = def.spec.http_port {
            let mut exited = exit_rx;
            let deadline = tokio::time::Instant::now() + self.inner.cfg.port_wait;
            loop {
                if container.connect(port as u16).await.is_ok() {
                    break;
                }
                tokio::select! {
                    _ = exited.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(
                        port,
                        "http_port did not accept connections in time; considering it up"
                    );
                    break;
                }
            }
        }
        let mut table = self.table();
        if let Some(svc) = table.get_mut(name) {
            if svc
                .instance
                .as_ref()
                .is_some_and(|i| i.generation == generation)
                && svc.rt.status == Some(Status::Starting)
            {
                svc.apply(Happening::Up);
            }
        }
        Ok(())
    }

    /// Records a start that failed before a process existed: status
    /// `failed` with the reason, an `error` event, the cgroup removed.
    fn failed_start(&self, name: &str, cgroup: &Cgroup, message: String) -> SupervisorError {
        {
            let mut table = self.table();
            if let Some(svc) = table.get_mut(name) {
                svc.apply(Happening::SpawnFailed);
                svc.rt.error = Some(message.clone());
                svc.rt.pid = None;
            }
        }
        let _ = cgroup.remove();
        self.emit(
            Event::new(EventKind::Error, name).data(format!("Failed to start service: {message}")),
        );
        SupervisorError::Start {
            name: name.to_owned(),
            message,
        }
    }

    /// Makes `pid` (in `cgroup`, its stdout/stderr read from `pipes`) the
    /// running instance of `name`: pumps its output, watches its exit.
    /// Returns the instance's generation and its exit watch.
    #[allow(clippy::too_many_arguments)]
    fn attach(
        &self,
        name: &str,
        cgroup: Cgroup,
        (pid, host_pid): (i32, i32),
        pipes: [Option<OwnedFd>; 2],
        exit: tokio::sync::oneshot::Receiver<Exit>,
        happening: Happening,
        message: String,
    ) -> Result<(u64, watch::Receiver<Option<Exit>>), SupervisorError> {
        let generation = self
            .inner
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (exit_tx, exit_rx) = watch::channel(None);
        let log = {
            let mut table = self.table();
            let svc = table
                .get_mut(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            svc.apply(happening);
            svc.rt.pid = Some(pid);
            svc.rt.started_at = Some(SystemTime::now());
            svc.rt.error = None;
            // exit_code keeps the previous exit, so a restarted crash loop shows why.
            svc.rt.next_restart_at = None;
            svc.instance = Some(Instance {
                generation,
                pid,
                host_pid,
                cgroup,
                exited: exit_rx.clone(),
                stopping: false,
                up_since: Instant::now(),
            });
            svc.log.clone()
        };
        self.emit(Event::new(EventKind::Started, name).data(message));
        for (stream, pipe) in [Stream::Stdout, Stream::Stderr].into_iter().zip(pipes) {
            if let Some(fd) = pipe {
                tokio::spawn(pump(self.clone(), name.to_owned(), stream, fd, log.clone()));
            }
        }
        let me = self.clone();
        let svc_name = name.to_owned();
        tokio::spawn(async move {
            let exit = exit.await.unwrap_or(Exit::Signal(9));
            let _ = exit_tx.send(Some(exit));
            me.on_exit(svc_name, generation, exit).await;
        });
        Ok((generation, exit_rx))
    }

    /// Whether live process `pid` belongs to this daemon (one of its
    /// cgroups); `None` when no such live process exists.
    pub fn owns_pid(&self, pid: i32) -> Option<bool> {
        self.inner.cfg.cgroups.as_ref()?.holds(pid)
    }

    /// The cgroup a service's next instance runs in, emptied of anything a
    /// previous instance left.
    pub async fn fresh_cgroup(&self, name: &str) -> Result<Cgroup, SupervisorError> {
        let cgroups = self.inner.cfg.cgroups.clone().ok_or_else(|| {
            SupervisorError::Unavailable("no cgroup v2 hierarchy: see /v1/status".into())
        })?;
        self.lookup(name, |_| ())?;
        let cgroup = cgroups.child(name)?;
        let leftover = cgroup.clone();
        tokio::task::spawn_blocking(move || leftover.kill_all(KILL_TIMEOUT))
            .await
            .map_err(|e| SupervisorError::Unavailable(e.to_string()))??;
        Ok(cgroup)
    }

    /// Adopts a process tree restored by CRIU into `cgroup` as the running
    /// instance of `name`: the pid, `restart_count` and start time of the
    /// checkpointed instance (`was`) carry over.
    #[tracing::instrument(name = "service", skip_all, fields(name = %was.name, pid = was.pid))]
    pub fn adopt(
        &self,
        was: &RunningService,
        pipes: [Option<OwnedFd>; 2],
        exit: tokio::sync::oneshot::Receiver<Exit>,
    ) -> Result<(), SupervisorError> {
        let (name, pid) = (was.name.as_str(), was.pid);
        {
            let mut table = self.table();
            let svc = table
                .get_mut(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            if let Some(t) = svc.restart_timer.take() {
                t.cancel();
            }
            svc.rt.restart_count = was.restart_count;
            if !svc.def.autostart {
                svc.def.autostart = true;
                self.persist(&table)?;
            }
        }
        self.attach(
            name,
            was.cgroup.clone(),
            (pid, was.host_pid),
            pipes,
            exit,
            Happening::Adopted,
            format!("Service {name} restored with its memory (pid {pid})"),
        )?;
        if let Some(svc) = self.table().get_mut(name) {
            svc.rt.started_at =
                Some(SystemTime::UNIX_EPOCH + Duration::from_millis(was.started_at_ms));
        }
        tracing::info!("adopted a restored process tree");
        Ok(())
    }

    /// The main process of an instance exited. Boxed with an explicit `Send`
    /// type: it schedules restarts, which spawn instances, which call it.
    fn on_exit(
        self,
        name: String,
        generation: u64,
        exit: Exit,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move { self.handle_exit(&name, generation, exit).await })
    }

    async fn handle_exit(&self, name: &str, generation: u64, exit: Exit) {
        let code = exit.code();
        let oom = {
            let cgroup = self
                .table()
                .get(name)
                .and_then(|s| s.instance.as_ref().map(|i| i.cgroup.clone()));
            cgroup.and_then(|cg| cg.oom_kills()).is_some_and(|n| n > 0)
        };
        let (cgroup, delay) = {
            let mut table = self.table();
            let Some(svc) = table.get_mut(name) else {
                return;
            };
            let Some(inst) = svc.instance.as_ref().filter(|i| i.generation == generation) else {
                return;
            };
            if inst.stopping {
                return; // stop() finishes the bookkeeping
            }
            let up_for = inst.up_since.elapsed();
            let cgroup = inst.cgroup.clone();
            svc.instance = None;
            if up_for >= BACKOFF_RESET_AFTER {
                svc.backoff_exp = 0;
            }
            let delay = BACKOFF_START
                .saturating_mul(1 << svc.backoff_exp.min(5))
                .min(BACKOFF_MAX);
            svc.backoff_exp = (svc.backoff_exp + 1).min(5);
            svc.apply(Happening::Exited);
            svc.rt.pid = None;
            svc.rt.exit_code = Some(code);
            svc.rt.error = Some(if oom {
                format!(
                    "killed by the OOM killer (the memory limit of the resources policy), exit code {code}"
                )
            } else {
                format!("exited with code {code}")
            });
            svc.rt.next_restart_at = Some(SystemTime::now() + delay);
            let token = CancellationToken::new();
            svc.restart_timer = Some(token.clone());
            let me = self.clone();
            let svc_name = name.to_owned();
            tokio::spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {
                        if !me.take_restart_timer(&svc_name) {
                            return;
                        }
                        tracing::info!(service = %svc_name, "restarting after crash");
                        if let Err(e) = me.start_one(&svc_name, true).await {
                            tracing::warn!(service = %svc_name, error = %e, "restart failed");
                        }
                    }
                }
            });
            (cgroup, delay)
        };
        tracing::info!(service = %name, code, oom, ?delay, "service exited on its own; restart scheduled");
        let mut ev = Event::new(EventKind::Exit, name).code(Some(code));
        if oom {
            ev = ev.data("killed by the OOM killer: the environment reached the memory limit of its resources policy");
        }
        self.emit(ev);
        // What the main process left behind does not outlive it.
        let _ = tokio::task::spawn_blocking(move || {
            let _ = cgroup.kill_all(KILL_TIMEOUT);
            let _ = cgroup.remove();
        })
        .await;
    }

    /// Claims a due restart: false when it was cancelled meanwhile.
    fn take_restart_timer(&self, name: &str) -> bool {
        let mut table = self.table();
        match table.get_mut(name) {
            Some(s) if s.restart_timer.as_ref().is_some_and(|t| !t.is_cancelled()) => {
                s.restart_timer = None;
                true
            }
            _ => false,
        }
    }

    /// Stops a service: SIGTERM to every process in its cgroup, up to
    /// `timeout` for the main process to exit, then SIGKILL to whatever is
    /// left. `by_user` marks it not to be started on the next daemon start.
    /// Returns the main process's exit code.
    pub async fn stop(
        &self,
        name: &str,
        timeout: Duration,
        by_user: bool,
    ) -> Result<Option<i32>, SupervisorError> {
        let op = self.lookup(name, |s| s.op.clone())?;
        let _guard = op.lock().await;
        let (pid, cgroup, mut exited) = {
            let mut table = self.table();
            let svc = table
                .get_mut(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            if by_user && svc.def.autostart {
                svc.def.autostart = false;
                self.persist(&table)?;
            }
            let svc = table
                .get_mut(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            if let Some(t) = svc.restart_timer.take() {
                // Crashed and waiting to restart: stopping it cancels the restart.
                t.cancel();
                svc.apply(Happening::RestartCancelled);
                svc.rt.next_restart_at = None;
                return Ok(svc.rt.exit_code);
            }
            // (being stopped already: by a cold sleep's end, whose kill
            // finishes it)
            let Some(inst) = svc.instance.as_mut().filter(|i| !i.stopping) else {
                return Err(SupervisorError::NotRunning(name.to_owned()));
            };
            inst.stopping = true;
            let taken = (inst.pid, inst.cgroup.clone(), inst.exited.clone());
            svc.apply(Happening::StopAsked);
            taken
        };
        self.emit(Event::new(EventKind::Stopping, name));
        tracing::info!(service = %name, pid, ?timeout, "stopping");
        for p in cgroup.pids().unwrap_or_default() {
            let _ = crate::sys::kill(p, nix::sys::signal::Signal::SIGTERM);
        }
        let exited_in_time = tokio::time::timeout(timeout, exited.wait_for(|e| e.is_some()))
            .await
            .is_ok();
        if !exited_in_time {
            tracing::info!(service = %name, pid, "did not exit after SIGTERM; killing its cgroup");
        }
        let cg = cgroup.clone();
        let killed = tokio::task::spawn_blocking(move || cg.kill_all(KILL_TIMEOUT))
            .await
            .map_err(|e| SupervisorError::Unavailable(e.to_string()))?;
        if let Err(e) = killed {
            // (its cgroup is gone when the whole environment was killed
            // meanwhile, a cold sleep's end: the stop still finishes, or
            // the service would stay `stopping`)
            if cgroup.path().exists() {
                return Err(e.into());
            }
            tracing::debug!(service = %name, error = %e, "cgroup gone before the kill");
        }
        self.stopped(name, &cgroup, exited).await
    }

    /// The end of a stop: the main process's exit awaited, the instance
    /// gone, its cgroup removed.
    async fn stopped(
        &self,
        name: &str,
        cgroup: &Cgroup,
        mut exited: watch::Receiver<Option<Exit>>,
    ) -> Result<Option<i32>, SupervisorError> {
        // (the cgroup is killed: the exit is reported at once, or the
        // environment is gone and its exits with it)
        let exit = match tokio::time::timeout(EXIT_AFTER_KILL, exited.wait_for(|e| e.is_some()))
            .await
        {
            Ok(Ok(e)) => *e,
            Ok(Err(_)) => return Err(SupervisorError::Unavailable("reaper stopped".into())),
            Err(_) => {
                tracing::warn!(service = %name, "no exit reported after the kill; taken as stopped");
                None
            }
        };
        let code = exit.map(Exit::code);
        {
            let mut table = self.table();
            if let Some(svc) = table.get_mut(name) {
                svc.instance = None;
                svc.apply(Happening::Stopped);
                svc.rt.pid = None;
                svc.rt.exit_code = code;
            }
        }
        let _ = cgroup.remove();
        self.emit(Event::new(EventKind::Stopped, name).code(code));
        Ok(code)
    }

    /// Ends every running service with the environment, when it cannot stop
    /// them politely (it is frozen, its init too): each is marked stopping,
    /// `end` kills the environment, and each is then stopped as [`stop`]
    /// leaves it: no crash, no restart, still to be started (autostart
    /// kept). Services waiting to restart have their restart cancelled.
    /// A service in the middle of another operation (a stop, a start) is
    /// left to it: it ends when the environment does (waiting for its lock
    /// here would wait on a frozen environment).
    ///
    /// [`stop`]: Supervisor::stop
    pub async fn end_all_with(&self, end: impl std::future::Future<Output = ()>) {
        self.end_with(end, false).await;
    }

    /// Stops every service at once with the rest of the environment: each
    /// running one is marked stopping (after any operation on it ends),
    /// then `end` kills the whole environment (every cgroup at once,
    /// rather than one service after another), then each is stopped as
    /// [`stop`] leaves it. For a restore, which replaces them all.
    ///
    /// [`stop`]: Supervisor::stop
    pub async fn stop_all_with(&self, end: impl std::future::Future<Output = ()>) {
        self.end_with(end, true).await;
    }

    /// [`end_all_with`](Self::end_all_with) and, `wait_for_ops`,
    /// [`stop_all_with`](Self::stop_all_with).
    async fn end_with(&self, end: impl std::future::Future<Output = ()>, wait_for_ops: bool) {
        let names: Vec<String> = self.table().keys().cloned().collect();
        let mut guards = BTreeMap::new();
        for name in names {
            let Ok(op) = self.lookup(&name, |s| s.op.clone()) else {
                continue;
            };
            let guard = match wait_for_ops {
                true => Some(op.lock_owned().await),
                false => op.try_lock_owned().ok(),
            };
            if let Some(guard) = guard {
                guards.insert(name, guard);
            }
        }
        let mut ending = Vec::new();
        {
            let mut table = self.table();
            for (name, svc) in table.iter_mut() {
                if !guards.contains_key(name) {
                    continue;
                }
                if let Some(t) = svc.restart_timer.take() {
                    t.cancel();
                    svc.apply(Happening::RestartCancelled);
                    svc.rt.next_restart_at = None;
                    continue;
                }
                let Some(inst) = svc.instance.as_mut().filter(|i| !i.stopping) else {
                    continue;
                };
                inst.stopping = true;
                ending.push((name.clone(), inst.cgroup.clone(), inst.exited.clone()));
                svc.apply(Happening::StopAsked);
            }
        }
        for (name, ..) in &ending {
            self.emit(Event::new(EventKind::Stopping, name));
        }
        end.await;
        for (name, cgroup, exited) in ending {
            if let Err(e) = self.stopped(&name, &cgroup, exited).await {
                tracing::warn!(service = %name, error = %e, "cannot finish stopping");
            }
        }
        drop(guards);
    }

    /// Stops `name` if it runs; not running is fine.
    pub async fn stop_if_running(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<(), SupervisorError> {
        match self.stop(name, timeout, false).await {
            Ok(_) | Err(SupervisorError::NotRunning(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes a service (stopping it first). Its log file is kept.
    pub async fn delete(&self, name: &str) -> Result<(), SupervisorError> {
        {
            let table = self.table();
            if !table.contains_key(name) {
                return Err(SupervisorError::NotFound(name.to_owned()));
            }
            let deps = spec::dependents(name, &Self::defs(&table));
            if !deps.is_empty() {
                return Err(SupervisorError::Conflict(format!(
                    "service {name:?} is needed by {}; delete or change those first",
                    deps.join(", ")
                )));
            }
        }
        self.stop_if_running(name, Duration::from_secs(10)).await?;
        let mut table = self.table();
        if let Some(svc) = table.remove(name) {
            if let Err(e) = self.persist(&table) {
                table.insert(name.to_owned(), svc);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Sends a signal to a running service's main process.
    pub async fn signal(
        &self,
        name: &str,
        signal: nix::sys::signal::Signal,
    ) -> Result<(), SupervisorError> {
        let pid = self
            .lookup(name, |svc| svc.instance.as_ref().map(|i| i.pid))?
            .ok_or_else(|| SupervisorError::NotRunning(name.to_owned()))?;
        let container =
            self.inner.cfg.container.as_ref().ok_or_else(|| {
                SupervisorError::Unavailable("the environment is unavailable".into())
            })?;
        container
            .signal(pid, signal as i32)
            .await
            .map_err(|e| SupervisorError::Unavailable(format!("signal pid {pid}: {e}")))
    }

    /// Stops every service (dependents before what they need) without
    /// marking them stopped by the user: the next daemon start brings them back.
    pub async fn shutdown(&self, timeout: Duration) {
        let mut order = Vec::new();
        {
            let table = self.table();
            let defs = Self::defs(&table);
            for name in table.keys() {
                for n in spec::start_order(name, &defs) {
                    if !order.contains(&n) {
                        order.push(n);
                    }
                }
            }
        }
        for name in order.into_iter().rev() {
            match self.stop(&name, timeout, false).await {
                Ok(_) | Err(SupervisorError::NotRunning(_)) => {}
                Err(e) => tracing::warn!(service = %name, error = %e, "stop at shutdown failed"),
            }
        }
    }

    /// The definitions and which services are running (recorded in a checkpoint).
    pub fn snapshot(&self) -> (Vec<ServiceDef>, Vec<String>) {
        let table = self.table();
        let defs = table.values().map(|s| s.def.clone()).collect();
        let running = table
            .values()
            .filter(|s| s.instance.is_some())
            .map(|s| s.def.name.clone())
            .collect();
        (defs, running)
    }

    /// Replaces every definition (all services must be stopped), marking
    /// `running` ones to be started, and persists them.
    pub fn replace_definitions(
        &self,
        defs: Vec<ServiceDef>,
        running: &[String],
    ) -> Result<(), SupervisorError> {
        let mut table = self.table();
        let mut old = std::mem::take(&mut *table);
        for mut def in defs {
            def.autostart = running.contains(&def.name);
            let svc = match old.remove(&def.name) {
                Some(mut svc) if svc.instance.is_none() => {
                    if let Some(t) = svc.restart_timer.take() {
                        t.cancel();
                    }
                    svc.def = def;
                    svc.rt = Runtime {
                        restart_count: svc.rt.restart_count,
                        ..Runtime::default()
                    };
                    svc
                }
                _ => {
                    let log = Arc::new(LogSink::open(
                        self.inner.logs_dir.join(format!("{}.log", def.name)),
                        self.inner.cfg.max_log_file,
                    ));
                    new_svc(def, log)
                }
            };
            table.insert(svc.def.name.clone(), svc);
        }
        for (_, svc) in old {
            if let Some(t) = svc.restart_timer {
                t.cancel();
            }
        }
        self.persist(&table)
    }

    /// The running services: what a capture freezes and dumps.
    pub fn running(&self) -> Vec<RunningService> {
        self.table()
            .values()
            .filter_map(|s| {
                s.instance.as_ref().map(|i| RunningService {
                    name: s.def.name.clone(),
                    pid: i.pid,
                    host_pid: i.host_pid,
                    cgroup: i.cgroup.clone(),
                    restart_count: s.rt.restart_count,
                    started_at_ms: s
                        .rt
                        .started_at
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_millis() as u64),
                })
            })
            .collect()
    }

    /// The cgroups of running services (for freezing, later).
    pub fn running_cgroups(&self) -> Vec<(String, Cgroup)> {
        self.table()
            .values()
            .filter_map(|s| {
                s.instance
                    .as_ref()
                    .map(|i| (s.def.name.clone(), i.cgroup.clone()))
            })
            .collect()
    }
}

/// A running service's main process and cgroup.
#[derive(Debug, Clone)]
pub struct RunningService {
    pub name: String,
    /// The main process inside the environment.
    pub pid: i32,
    pub host_pid: i32,
    pub cgroup: Cgroup,
    pub restart_count: u32,
    /// When this instance started (ms since the Unix epoch).
    pub started_at_ms: u64,
}

/// What `put` did.
#[derive(Debug, Clone, Copy)]
pub struct PutOutcome {
    pub created: bool,
    /// The spec changed while it was running: restart it.
    pub restart: bool,
}

impl Svc {
    /// The state now (never started counts as stopped).
    fn status(&self) -> Status {
        self.rt.status.unwrap_or(Status::Stopped)
    }

    /// Moves the service's state by `happening` ([`state::next_state`]).
    /// A refused transition is a supervisor bug: it is logged and the
    /// happening's usual outcome applied, so the record stays truthful.
    fn apply(&mut self, happening: Happening) {
        let to = state::next_state(self.status(), happening).unwrap_or_else(|refused| {
            tracing::warn!(service = %self.def.name, error = %refused, "unexpected service transition");
            debug_assert!(false, "{refused}");
            match happening {
                Happening::Spawned => Status::Starting,
                Happening::Adopted | Happening::Up => Status::Running,
                Happening::SpawnFailed | Happening::Exited => Status::Failed,
                Happening::StopAsked => Status::Stopping,
                Happening::RestartCancelled | Happening::Stopped => Status::Stopped,
            }
        });
        self.rt.status = Some(to);
    }
}

fn new_svc(def: ServiceDef, log: Arc<LogSink>) -> Svc {
    Svc {
        def,
        rt: Runtime::default(),
        log,
        op: Arc::new(tokio::sync::Mutex::new(())),
        instance: None,
        restart_timer: None,
        backoff_exp: 0,
    }
}

fn record(svc: &Svc) -> ServiceRecord {
    let d = &svc.def;
    ServiceRecord {
        name: d.name.clone(),
        cmd: d.spec.cmd.clone(),
        args: d.spec.args.clone(),
        env: d.spec.env.clone(),
        dir: d.spec.dir.clone(),
        needs: d.spec.needs.clone(),
        http_port: d.spec.http_port,
        state: StateRecord {
            name: d.name.clone(),
            status: svc.rt.status.unwrap_or(Status::Stopped),
            pid: svc.rt.pid,
            started_at: svc.rt.started_at.map(rfc3339),
            error: svc.rt.error.clone(),
            restart_count: svc.rt.restart_count,
            next_restart_at: svc.rt.next_restart_at.map(rfc3339),
            exit_code: svc.rt.exit_code,
        },
    }
}

/// Reads one output pipe of a service into its log and the event stream, a
/// line at a time (lines over [`MAX_LINE`] are split; invalid UTF-8 is
/// replaced).
async fn pump(
    sup: Supervisor,
    name: String,
    stream: Stream,
    fd: std::os::fd::OwnedFd,
    log: Arc<LogSink>,
) {
    let file = std::fs::File::from(fd);
    let Ok(mut reader) = tokio::net::unix::pipe::Receiver::from_file(file) else {
        return;
    };
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 8192];
    let kind = match stream {
        Stream::Stdout => EventKind::Stdout,
        Stream::Stderr => EventKind::Stderr,
    };
    let emit = |bytes: &[u8]| {
        let mut data = String::from_utf8_lossy(bytes).into_owned();
        if !data.ends_with('\n') {
            data.push('\n');
        }
        let line = LogLine {
            timestamp_ms: now_ms(),
            stream,
            data: data.clone(),
        };
        let ts = line.timestamp_ms;
        log.append(line);
        let mut ev = Event::new(kind, &name).data(data);
        ev.timestamp = ts;
        sup.emit(ev);
    };
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            emit(&line);
        }
        while buf.len() >= MAX_LINE {
            let line: Vec<u8> = buf.drain(..MAX_LINE).collect();
            emit(&line);
        }
    }
    if !buf.is_empty() {
        emit(&buf);
    }
}

/// Parses a signal as the API accepts it: `TERM`, `SIGTERM`, `sigterm`, `15`.
pub fn parse_signal(s: &str) -> Option<nix::sys::signal::Signal> {
    use std::str::FromStr;
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).ok();
    }
    let upper = t.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    nix::sys::signal::Signal::from_str(&full).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("TERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGHUP"), Some(Signal::SIGHUP));
        assert_eq!(parse_signal("usr1"), Some(Signal::SIGUSR1));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("NOPE"), None);
        assert_eq!(parse_signal("999"), None);
        assert_eq!(parse_signal(""), None);
    }

    #[test]
    fn event_shape() {
        let e = Event::new(EventKind::Stopped, "web").code(Some(0));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "stopped");
        assert_eq!(v["exit_code"], 0);
        assert!(v.get("data").is_none());
        assert!(v["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    }
}
