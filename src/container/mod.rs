//! The environment as a container: its namespaces and its init. This module
//! is the only code that starts processes in the environment (the one
//! launcher: services, exec commands and terminals all come through
//! [`Container::spawn`]).
//!
//! The environment has its own mount, PID, UTS and IPC namespaces, and
//! joins the network namespace [`crate::network`] made for it (unless the
//! daemon runs with `--network host`). Its `/` is the overlay mount, entered
//! with `pivot_root` (see [`init::setup_mounts`]). PID 1 is the init mode
//! of this binary: every process of the environment descends from it, so
//! one CRIU dump of its tree is a dump of everything the user runs.
//!
//! The daemon talks to the init over two pipes ([`proto`]). A spawn is a
//! handshake: the init forks a child that waits before `exec`; the daemon
//! copies its ends of the child's stdio out of the init (`pidfd_getfd`),
//! moves the child into its cgroup, then releases it. So the child execs
//! already in its cgroup, with the daemon holding its pipes or terminal.

pub(crate) mod dev;
pub mod init;
pub mod proto;

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio as StdStdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::cgroup::{Cgroup, CgroupError, Cgroups};
use crate::reaper::{Exit, Reaper};
use proto::{Event, Request};
pub use proto::{Privileges, SpawnSpec, Stdio};

/// How long the init may take to set up the environment, or to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long killing the environment may take.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// The cgroup (under the daemon's parent) of the init itself.
pub const INIT_CGROUP: &str = "_init";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("the environment is not running")]
    NotRunning,
    #[error("cannot start the environment: {0}")]
    Start(String),
    #[error("the environment's init did not answer within {0:?}")]
    Timeout(Duration),
    /// The init refused or failed the request (`errno` when a system call
    /// said why: `ENOENT` for a missing program or directory).
    #[error("{message}")]
    Refused { errno: Option<i32>, message: String },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{op} (pid {pid}): {source}")]
    Io {
        op: &'static str,
        pid: i32,
        #[source]
        source: io::Error,
    },
}

/// Where the environment lives, all host paths (see [`init::Setup`]).
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub setup: init::Setup,
    pub cgroups: Cgroups,
}

/// A process started in the environment: its pid there, its host pid, the
/// daemon's ends of its stdio and its exit.
pub struct Process {
    /// The pid inside the environment (what `ps` there shows).
    pub pid: i32,
    pub host_pid: i32,
    /// With `Stdio::Tty`: the terminal's input (the relay's pipe).
    pub stdin: Option<OwnedFd>,
    /// With `Stdio::Tty`: everything the terminal shows.
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub exit: oneshot::Receiver<Exit>,
}

#[derive(Default)]
struct Table {
    replies: HashMap<u64, oneshot::Sender<Event>>,
    exits: HashMap<i32, oneshot::Sender<Exit>>,
    /// Exits nobody waited for yet (a restored tree's, before adoption).
    unclaimed: HashMap<i32, Exit>,
    dead: bool,
}

/// One running environment: its init and the pipes to it.
struct Instance {
    init_host_pid: i32,
    requests: tokio::sync::Mutex<tokio::net::unix::pipe::Sender>,
    table: Mutex<Table>,
    next_id: AtomicU64,
    /// The pipes' identities (`pipe:[ino]`), for a CRIU dump.
    pipe_ids: [String; 2],
}

/// Handle to the environment (cheap to clone). A restore replaces the
/// running instance; handles stay valid.
#[derive(Clone)]
pub struct Container {
    inner: Arc<Shared>,
}

struct Shared {
    cfg: ContainerConfig,
    reaper: Reaper,
    current: Mutex<Option<Arc<Instance>>>,
    /// What the next process started may hold (the privileges policy).
    privileges: Mutex<Privileges>,
    /// The environment's own network namespace (`--network own`); unset,
    /// it shares the daemon's.
    network: std::sync::OnceLock<Arc<crate::network::Network>>,
}

fn io_err(op: &'static str, pid: i32) -> impl FnOnce(io::Error) -> ContainerError {
    move |source| ContainerError::Io { op, pid, source }
}

fn exit_of(code: Option<i32>, signal: Option<i32>) -> Exit {
    match (code, signal) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Exit::Signal(s),
        (None, None) => Exit::Signal(9),
    }
}

/// `pipe:[N]`: how CRIU and `/proc/<pid>/fd` name a pipe.
pub fn pipe_id(fd: &impl std::os::fd::AsFd) -> io::Result<String> {
    let st = nix::sys::stat::fstat(fd)?;
    Ok(format!("pipe:[{}]", st.st_ino))
}

impl Container {
    pub fn new(cfg: ContainerConfig, reaper: Reaper) -> Self {
        Container {
            inner: Arc::new(Shared {
                cfg,
                reaper,
                current: Mutex::new(None),
                privileges: Mutex::new(Privileges::default()),
                network: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn config(&self) -> &ContainerConfig {
        &self.inner.cfg
    }

    /// What processes started from now on may hold; running ones keep
    /// what they have.
    pub fn set_privileges(&self, p: Privileges) {
        *self
            .inner
            .privileges
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// The only devices processes started now may open (the privileges
    /// policy's; none: every device of the environment).
    pub(crate) fn devices(&self) -> Option<Vec<crate::cgroup::DeviceRule>> {
        self.inner
            .privileges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .devices
            .clone()
    }

    /// Gives the environment its own network (before it first starts).
    pub(crate) fn set_network(&self, net: Arc<crate::network::Network>) {
        let _ = self.inner.network.set(net);
    }

    /// The environment's own network, if it has one.
    pub(crate) fn network(&self) -> Option<&Arc<crate::network::Network>> {
        self.inner.network.get()
    }

    /// A connection to `port` on the environment's loopback (the daemon's
    /// own where the environment shares its network).
    pub async fn connect(&self, port: u16) -> io::Result<tokio::net::TcpStream> {
        match self.inner.network.get() {
            Some(net) => net.connect(port).await,
            None => tokio::net::TcpStream::connect(("127.0.0.1", port)).await,
        }
    }

    /// `/proc`-relative dir of the socket tables the environment sees
    /// (`net`, the daemon's own, where it shares the daemon's network).
    pub fn proc_net(&self) -> std::path::PathBuf {
        self.inner
            .network
            .get()
            .map_or_else(|| "net".into(), |n| n.proc_net())
    }

    fn current(&self) -> Result<Arc<Instance>, ContainerError> {
        let cur = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        match cur.as_ref() {
            Some(i) if !i.table.lock().unwrap_or_else(|e| e.into_inner()).dead => Ok(i.clone()),
            _ => Err(ContainerError::NotRunning),
        }
    }

    /// Whether an environment is running.
    pub fn is_running(&self) -> bool {
        self.current().is_ok()
    }

    /// The host pid of the environment's init.
    pub fn init_host_pid(&self) -> Option<i32> {
        self.current().ok().map(|i| i.init_host_pid)
    }

    /// Archives the environment's `/dev` into `out` (see [`dev::archive`]);
    /// the environment must be frozen.
    pub(crate) fn archive_dev(
        &self,
        out: &std::path::Path,
    ) -> Result<dev::Archived, ContainerError> {
        let pid = self.init_host_pid().ok_or(ContainerError::NotRunning)?;
        let dev = std::path::PathBuf::from(format!("/proc/{pid}/root/dev"));
        dev::archive(&dev, out).map_err(|source| ContainerError::Io {
            op: "archive /dev of",
            pid,
            source,
        })
    }

    /// Fills the rebuilt `/dev` tmpfs at `at` from `archive` by a helper
    /// (this binary, [`dev::FILL_ARG`]) born in the init's cgroup, so the
    /// pages it writes are charged to the environment (see [`dev`]).
    #[tracing::instrument(name = "dev_fill", skip_all)]
    pub(crate) async fn fill_dev(
        &self,
        archive: &std::path::Path,
        at: &std::path::Path,
    ) -> Result<(), ContainerError> {
        let mut cmd = std::process::Command::new(&self.inner.cfg.setup.exe);
        cmd.arg(dev::FILL_ARG).arg(archive).arg(at);
        crate::sys::join_cgroup_before_exec(&mut cmd, self.init_cgroup()?.procs_fd()?);
        let (exit, said) = self
            .inner
            .reaper
            .output(&mut cmd, ANSWER_TIMEOUT)
            .await
            .map_err(|source| ContainerError::Io {
                op: "run the /dev filler",
                pid: 0,
                source,
            })?;
        match exit {
            Exit::Code(0) => Ok(()),
            other => Err(ContainerError::Start(format!(
                "filling /dev: {} ({other:?})",
                said.trim()
            ))),
        }
    }

    /// The identities of the request and event pipes (`pipe:[N]`), as a
    /// CRIU dump of the init sees them.
    pub fn pipe_ids(&self) -> Option<[String; 2]> {
        self.current().ok().map(|i| i.pipe_ids.clone())
    }

    /// The init's cgroup.
    pub fn init_cgroup(&self) -> Result<Cgroup, ContainerError> {
        Ok(self.inner.cfg.cgroups.child(INIT_CGROUP)?)
    }

    /// Starts a fresh environment on the mounted root: stage 1 in new
    /// namespaces, PID 1 set up and serving. Kills a running one first.
    #[tracing::instrument(name = "env_start", skip(self), fields(root = %self.inner.cfg.setup.root.display()))]
    pub async fn start(&self) -> Result<(), ContainerError> {
        self.kill().await;
        let start_err =
            |what: &str, e: &dyn std::fmt::Display| ContainerError::Start(format!("{what}: {e}"));
        let setup =
            serde_json::to_string(&self.inner.cfg.setup).map_err(|e| start_err("setup", &e))?;
        let cgroup = self.init_cgroup()?;
        let (req_r, req_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| start_err("pipe", &e))?;
        let (evt_r, evt_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| start_err("pipe", &e))?;
        let pipe_ids = [
            pipe_id(&req_r).map_err(|e| start_err("fstat", &e))?,
            pipe_id(&evt_w).map_err(|e| start_err("fstat", &e))?,
        ];
        let mut cmd = Command::new(&self.inner.cfg.setup.exe);
        cmd.arg(init::STAGE1_ARG)
            .arg(setup)
            .env_clear()
            .stdin(StdStdio::piped())
            .stdout(StdStdio::piped())
            .stderr(StdStdio::inherit());
        if let Some(net) = self.inner.network.get() {
            crate::sys::setns_before_exec(&mut cmd, net.netns(), libc::CLONE_NEWNET);
        }
        crate::sys::pass_fds_before_exec(&mut cmd, vec![req_r, evt_w], init::REQUEST_FD);
        crate::sys::join_cgroup_before_exec(&mut cmd, cgroup.procs_fd()?);
        crate::sys::unshare_before_exec(
            &mut cmd,
            libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWPID,
        );
        let mut stage1 = self
            .inner
            .reaper
            .spawn(&mut cmd)
            .map_err(|e| start_err("spawn stage 1", &e))?;
        drop(cmd); // our copies of the init's pipe ends
        let stdout = stage1.stdout.take().expect("piped");
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line).map(|_| line)
        })
        .await
        .map_err(|e| start_err("stage 1", &e))?
        .map_err(|e| start_err("read stage 1", &e))?;
        let Ok(init_host_pid) = line.trim().parse::<i32>() else {
            let exit = stage1.exit.await;
            return Err(ContainerError::Start(format!(
                "stage 1 did not start the init ({exit:?})"
            )));
        };
        // The init is reparented to the daemon (the subreaper) when stage 1
        // exits: expect it before letting stage 1 go.
        let init_exit = self.inner.reaper.expect(init_host_pid);
        drop(stage1.stdin.take());
        let _ = stage1.exit.await;
        let instance = Arc::new(Instance {
            init_host_pid,
            requests: tokio::sync::Mutex::new(
                tokio::net::unix::pipe::Sender::from_owned_fd(req_w)
                    .map_err(|e| start_err("register pipe", &e))?,
            ),
            table: Mutex::new(Table::default()),
            next_id: AtomicU64::new(1),
            pipe_ids,
        });
        self.run(instance, evt_r, init_exit).await
    }

    /// Serves a fresh init and waits until it is `Ready`.
    async fn run(
        &self,
        instance: Arc<Instance>,
        events: OwnedFd,
        init_exit: oneshot::Receiver<Exit>,
    ) -> Result<(), ContainerError> {
        let pid = instance.init_host_pid;
        let ready_rx = self.serve(instance, events, init_exit)?;
        match tokio::time::timeout(ANSWER_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(()))) => {
                tracing::info!(init = pid, "environment running");
                Ok(())
            }
            Ok(Ok(Err(message))) => {
                self.kill().await;
                Err(ContainerError::Start(message))
            }
            Ok(Err(_)) => {
                self.kill().await;
                Err(ContainerError::Start(
                    "the init exited while setting up".into(),
                ))
            }
            Err(_) => {
                self.kill().await;
                Err(ContainerError::Timeout(ANSWER_TIMEOUT))
            }
        }
    }

    /// Adopts an init that CRIU restored (host pid `init_host_pid`), talking
    /// to it over the new pipes handed in with `--inherit-fd`.
    pub async fn adopt(
        &self,
        init_host_pid: i32,
        requests: OwnedFd,
        events: OwnedFd,
        pipe_ids: [String; 2],
    ) -> Result<(), ContainerError> {
        let instance = Arc::new(Instance {
            init_host_pid,
            requests: tokio::sync::Mutex::new(
                tokio::net::unix::pipe::Sender::from_owned_fd(requests)
                    .map_err(io_err("register the request pipe", init_host_pid))?,
            ),
            table: Mutex::new(Table::default()),
            next_id: AtomicU64::new(1),
            pipe_ids,
        });
        let init_exit = self.inner.reaper.expect(init_host_pid);
        self.serve(instance, events, init_exit)?;
        Ok(())
    }

    /// Makes `instance` the running environment: reads its events, watches
    /// its exit. The receiver gets `Ready` (or `Fatal`'s message).
    fn serve(
        &self,
        instance: Arc<Instance>,
        events: OwnedFd,
        init_exit: oneshot::Receiver<Exit>,
    ) -> Result<oneshot::Receiver<Result<(), String>>, ContainerError> {
        let pid = instance.init_host_pid;
        let events = tokio::net::unix::pipe::Receiver::from_owned_fd(events)
            .map_err(io_err("register the event pipe", pid))?;
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(read_events(instance.clone(), events, ready_tx));
        let watched = instance.clone();
        tokio::spawn(async move {
            let exit = init_exit.await.unwrap_or(Exit::Signal(9));
            tracing::info!(pid, ?exit, "the environment's init exited");
            let mut t = watched.table.lock().unwrap_or_else(|e| e.into_inner());
            t.dead = true;
            t.replies.clear();
            for (_, tx) in t.exits.drain() {
                let _ = tx.send(Exit::Signal(9));
            }
        });
        *self.inner.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(instance);
        Ok(ready_rx)
    }

    /// Kills the whole environment (every process in the daemon's cgroups,
    /// a previous daemon's leftovers included: the init's death ends its PID
    /// namespace), waits until it is gone and removes the emptied cgroups.
    #[tracing::instrument(name = "env_kill", skip(self))]
    pub async fn kill(&self) {
        let cur = self
            .inner
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let cgroups = self.inner.cfg.cgroups.clone();
        let _ = tokio::task::spawn_blocking(move || {
            // Every cgroup killed first, then each waited for: the
            // processes die at once, not one cgroup after another.
            let children = cgroups.children().unwrap_or_default();
            for cg in &children {
                let _ = cg.start_kill();
            }
            for cg in children {
                if let Err(e) = cg.kill_all(KILL_TIMEOUT) {
                    tracing::warn!(error = %e, "cannot kill the environment's processes");
                }
                let _ = cg.remove();
            }
        })
        .await;
        if let Some(i) = cur {
            let mut t = i.table.lock().unwrap_or_else(|e| e.into_inner());
            t.dead = true;
        }
    }

    /// Sends a request and waits for its answer.
    async fn call(
        &self,
        instance: &Instance,
        make: impl FnOnce(u64) -> Request,
    ) -> Result<Event, ContainerError> {
        let id = instance.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut t = instance.table.lock().unwrap_or_else(|e| e.into_inner());
            if t.dead {
                return Err(ContainerError::NotRunning);
            }
            t.replies.insert(id, tx);
        }
        let mut line = serde_json::to_vec(&make(id)).expect("requests serialize");
        line.push(b'\n');
        let pid = instance.init_host_pid;
        {
            let mut w = instance.requests.lock().await;
            w.write_all(&line)
                .await
                .map_err(io_err("write to the init", pid))?;
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(Event::Failed { errno, message, .. })) => {
                Err(ContainerError::Refused { errno, message })
            }
            Ok(Ok(ev)) => Ok(ev),
            Ok(Err(_)) => Err(ContainerError::NotRunning),
            Err(_) => Err(ContainerError::Timeout(ANSWER_TIMEOUT)),
        }
    }

    /// Starts a process in the environment, in `cgroup`, and returns it
    /// once it has exec'd (`Refused` with `ENOENT`: no such program or
    /// working directory).
    #[tracing::instrument(name = "env_spawn", skip_all, fields(cmd = %spec.argv.first().map(String::as_str).unwrap_or(""), pid = tracing::field::Empty))]
    pub async fn spawn(
        &self,
        mut spec: SpawnSpec,
        cgroup: &Cgroup,
    ) -> Result<Process, ContainerError> {
        let instance = self.current()?;
        spec.privileges = Some(
            self.inner
                .privileges
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        );
        let stdio = spec.stdio.clone();
        let devices = spec.privileges.as_ref().and_then(|p| p.devices.clone());
        let (pid, fds) = match self
            .call(&instance, |id| Request::Spawn { id, spec })
            .await?
        {
            Event::Spawned { pid, fds, .. } => (pid, fds),
            other => {
                return Err(ContainerError::Start(format!(
                    "unexpected answer to spawn: {other:?}"
                )));
            }
        };
        tracing::Span::current().record("pid", pid);
        // Devices first: the child runs in its cgroup only once the device
        // program is on it.
        let placed = match devices {
            Some(allowed) => cgroup
                .restrict_devices(&allowed)
                .map_err(ContainerError::from),
            None => Ok(()),
        }
        .and_then(|()| self.place(&instance, pid, &fds, cgroup));
        let (host_pid, ends, exit) = match placed {
            Ok((host_pid, ends)) => {
                let (tx, rx) = oneshot::channel();
                instance
                    .table
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .exits
                    .insert(pid, tx);
                (host_pid, ends, rx)
            }
            Err(e) => {
                let _ = self.call(&instance, |id| Request::Abort { id, pid }).await;
                return Err(e);
            }
        };
        if let Err(e) = self
            .call(&instance, |id| Request::Release { id, pid })
            .await
        {
            instance
                .table
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .exits
                .remove(&pid);
            return Err(e);
        }
        let mut ends = ends.into_iter();
        let mut p = Process {
            pid,
            host_pid,
            stdin: None,
            stdout: None,
            stderr: None,
            exit,
        };
        match stdio {
            Stdio::Tty { .. } => {
                p.stdin = ends.next();
                p.stdout = ends.next();
            }
            Stdio::Pipes { stdin } => {
                if stdin {
                    p.stdin = ends.next();
                }
                p.stdout = ends.next();
                p.stderr = ends.next();
            }
        }
        Ok(p)
    }

    /// Copies the daemon's ends out of the init and moves the waiting child
    /// into `cgroup`.
    fn place(
        &self,
        instance: &Instance,
        pid: i32,
        fds: &[i32],
        cgroup: &Cgroup,
    ) -> Result<(i32, Vec<OwnedFd>), ContainerError> {
        let init = instance.init_host_pid;
        let ends = fds
            .iter()
            .map(|fd| crate::sys::fd_of_process(init, *fd))
            .collect::<io::Result<Vec<_>>>()
            .map_err(io_err("copy fds from the init", init))?;
        let host_pid = host_pid_of_child(init, pid).ok_or_else(|| ContainerError::Io {
            op: "find the host pid",
            pid,
            source: io::Error::from_raw_os_error(libc::ESRCH),
        })?;
        cgroup.add(host_pid)?;
        Ok((host_pid, ends))
    }

    /// Sends `signal` to `pid` inside the environment (negative: a group).
    pub async fn signal(&self, pid: i32, signal: i32) -> Result<(), ContainerError> {
        let instance = self.current()?;
        self.call(&instance, |id| Request::Signal { id, pid, signal })
            .await
            .map(|_| ())
    }

    /// Resizes the terminal of `pid` (started with `Stdio::Tty`).
    pub async fn resize(&self, pid: i32, rows: u16, cols: u16) -> Result<(), ContainerError> {
        let instance = self.current()?;
        self.call(&instance, |id| Request::Resize {
            id,
            pid,
            rows,
            cols,
        })
        .await
        .map(|_| ())
    }

    /// The exit of `pid` (a process the init spawned before a restore).
    pub fn watch(&self, pid: i32) -> Result<oneshot::Receiver<Exit>, ContainerError> {
        let instance = self.current()?;
        let (tx, rx) = oneshot::channel();
        let mut t = instance.table.lock().unwrap_or_else(|e| e.into_inner());
        match t.unclaimed.remove(&pid) {
            Some(exit) => {
                let _ = tx.send(exit);
            }
            None => {
                t.exits.insert(pid, tx);
            }
        }
        Ok(rx)
    }
}

/// Reads the init's events until the pipe closes: answers go to their
/// callers, exits to their watchers, `Ready`/`Fatal` to the starter.
async fn read_events(
    instance: Arc<Instance>,
    events: tokio::net::unix::pipe::Receiver,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut ready = Some(ready);
    let mut lines = tokio::io::BufReader::new(events).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => {
                // The init is gone (its exit may have been reaped as an
                // orphan's before anyone expected it).
                let mut t = instance.table.lock().unwrap_or_else(|e| e.into_inner());
                t.dead = true;
                t.replies.clear();
                for (_, tx) in t.exits.drain() {
                    let _ = tx.send(Exit::Signal(9));
                }
                break;
            }
        };
        let ev: Event = match serde_json::from_str(&line) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable event from the init");
                continue;
            }
        };
        match ev {
            Event::Ready => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                }
            }
            Event::Fatal { message } => {
                tracing::error!(%message, "the environment's init failed");
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(message));
                }
            }
            Event::Exit { pid, code, signal } => {
                let exit = exit_of(code, signal);
                let mut t = instance.table.lock().unwrap_or_else(|e| e.into_inner());
                match t.exits.remove(&pid) {
                    Some(tx) => {
                        let _ = tx.send(exit);
                    }
                    None => {
                        if t.unclaimed.len() < 4096 {
                            t.unclaimed.insert(pid, exit);
                        }
                    }
                }
            }
            ev => {
                let Some(id) = ev.reply_to() else { continue };
                let tx = instance
                    .table
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .replies
                    .remove(&id);
                if let Some(tx) = tx {
                    let _ = tx.send(ev);
                }
            }
        }
    }
}

impl Container {
    /// Unix sockets of the environment's processes whose peer is outside
    /// it (a `sprite-env` inside talking to the API socket): CRIU dumps them
    /// as external (`--external unix[ino]`), and a restore hands each a
    /// socket whose peer is gone. Read while the environment is frozen.
    pub fn external_unix_sockets(&self) -> Vec<u64> {
        let mut inside = std::collections::HashSet::new();
        for pid in self.inner.cfg.cgroups.whole().pids_below() {
            for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Some(ino) = std::fs::read_link(fd.path())
                    .ok()
                    .and_then(|t| socket_inode(&t.to_string_lossy()))
                {
                    inside.insert(ino);
                }
            }
        }
        // The environment's sockets are in its own network namespace, if
        // it has one (what they connect to, in the daemon's).
        let Ok(mut peers) = crate::sys::unix_socket_peers() else {
            return Vec::new();
        };
        if let Some(net) = self.inner.network.get() {
            match net.unix_socket_peers() {
                Ok(theirs) => peers.extend(theirs),
                Err(e) => tracing::warn!(error = %e, "cannot list the environment's unix sockets"),
            }
        }
        let mut out: Vec<u64> = inside
            .iter()
            .filter(|s| peers.get(s).is_some_and(|p| *p != 0 && !inside.contains(p)))
            .copied()
            .collect();
        out.sort_unstable();
        out
    }
}

/// `socket:[N]` → N.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The host pid of the init's child whose pid in the environment is `pid`:
/// the init's children (`/proc/<init>/task/<init>/children`) whose last
/// `NSpid` is `pid`.
pub fn host_pid_of_child(init_host_pid: i32, pid: i32) -> Option<i32> {
    let children = std::fs::read_to_string(format!(
        "/proc/{init_host_pid}/task/{init_host_pid}/children"
    ))
    .ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
        .find(|h| ns_pid(*h) == Some(pid))
}

/// The pid of host process `host_pid` in its own (innermost) PID namespace.
pub fn ns_pid(host_pid: i32) -> Option<i32> {
    ns_pids(host_pid)?.last().copied()
}

/// The pid of host process `host_pid` in a nested PID namespace (the
/// environment's), or `None` for a process of the host's own namespace.
pub fn ns_pid_inside(host_pid: i32) -> Option<i32> {
    let pids = ns_pids(host_pid)?;
    (pids.len() >= 2).then(|| pids.last().copied()).flatten()
}

/// `NSpid:` of `/proc/<host_pid>/status`: its pid in each PID namespace,
/// outermost first.
fn ns_pids(host_pid: i32) -> Option<Vec<i32>> {
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
    parse_ns_pids(&status)
}

fn parse_ns_pids(status: &str) -> Option<Vec<i32>> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .map(|p| p.parse().ok())
        .collect()
}

/// A process environment as `KEY=VALUE` lines: `base`, then `extra`
/// (a later value of a key replaces an earlier one).
pub fn env_list(
    base: &[(String, String)],
    extra: impl IntoIterator<Item = (String, String)>,
) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in base.iter().cloned().chain(extra) {
        match out.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_pid_is_the_innermost() {
        let status = "Name:\tsh\nPid:\t4242\nNSpid:\t4242\t7\nNgid:\t0\n";
        let innermost = |s: &str| parse_ns_pids(s).and_then(|p| p.last().copied());
        assert_eq!(innermost(status), Some(7));
        assert_eq!(innermost("NSpid:\t12\n"), Some(12));
        assert_eq!(innermost("Pid:\t1\n"), None);
        assert_eq!(parse_ns_pids(status), Some(vec![4242, 7]));
    }

    #[test]
    fn later_env_values_win() {
        let base = vec![
            ("PATH".to_owned(), "/bin".to_owned()),
            ("A".into(), "1".into()),
        ];
        let env = env_list(
            &base,
            [("A".to_owned(), "2".to_owned()), ("B".into(), "3".into())],
        );
        assert_eq!(env, ["PATH=/bin", "A=2", "B=3"]);
    }

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    #[test]
    fn exits_map_to_codes() {
        assert_eq!(exit_of(Some(3), None), Exit::Code(3));
        assert_eq!(exit_of(None, Some(15)), Exit::Signal(15));
    }
}
