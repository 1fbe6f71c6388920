//! CRIU: the only module that spawns the `criu` binary.
//!
//! It detects CRIU at start (path, version, `criu check`) for `/v1/status`,
//! and dumps and restores the whole environment (see `crate::container`):
//!
//! - **dump** of the init's tree (`--tree`: its PID, mount, UTS and IPC
//!   namespaces come along) runs while the daemon's cgroup freezes.
//!   `--freeze-cgroup` makes CRIU seize the tasks through that cgroup and
//!   leave it frozen as it found it; `--leave-running` keeps them alive. The
//!   bind mounts from the host (the binary, the API socket, the checkpoints
//!   and logs) are external mounts (`--external mnt[...]`), mapped to this
//!   daemon's paths on restore.
//! - **restore** runs `criu swrk` (CRIU's RPC mode, `rpc`): the same
//!   options as `criu restore --restore-detached --restore-sibling --root`
//!   on a freshly mounted layer, sent as one request, and each stage CRIU
//!   reaches told on the socket and answered by the caller (no action
//!   script forked at every stage). CRIU is moved into the init's cgroup
//!   before it forks, so every restored task is born there; the init
//!   becomes the daemon's child. Pipes to the daemon (the init's requests
//!   and events, every service's output) come back as new pipes
//!   (`inherit_fd`).
//!
//! Options for typical servers: listening sockets and the service's own
//! pipes and unix sockets are restored as they were; established TCP
//! connections are dumped (`--tcp-established`) but restored closed
//! (`--tcp-close`): clients see the connection drop, as after a VM wake.
//! File locks (`--file-locks`), unix sockets to outside peers
//! (`--ext-unix-sk`) and connections not yet accepted (`--skip-in-flight`)
//! are handled. Files deleted while open are kept as CRIU "ghost files" (their
//! content goes into the images, up to `--ghost-limit` each) rather than by
//! `--link-remap`, which would link them back into the live tree, where the
//! file checkpoint would pick up CRIU's temporary names.
//!
//! Every call writes CRIU's log (`-v2`, errors and warnings, unless the
//! daemon is told otherwise): a dump's next to its images, a restore's in
//! `criu-logs/restore/`; an error names the service and CRIU's own error
//! line.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::reaper::{Exit, Reaper};

/// Where to look when no path is configured, in order (setup.sh installs a
/// source-built CRIU to the first when the distribution's fails `criu check`).
const SEARCH: &[&str] = &[
    "/usr/local/sbin/criu",
    "/usr/sbin/criu",
    "/usr/local/bin/criu",
    "/usr/bin/criu",
];

/// How long `criu check` may take before it is reported as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// What the daemon found at start, as reported by `/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct CriuSupport {
    /// Process checkpoints will be taken (binary found, `criu check` passed, not disabled).
    pub available: bool,
    /// `--no-criu` was given.
    pub disabled: bool,
    pub path: Option<PathBuf>,
    pub version: Option<String>,
    /// `criu check` said "Looks good".
    pub check_ok: bool,
    /// Why CRIU is unavailable, or the warning lines of `criu check`.
    pub message: Option<String>,
    /// The kernel tracks dirtied pages (`criu check --feature
    /// mem_dirty_track`: `CONFIG_MEM_SOFT_DIRTY`), which incremental dumps
    /// (pre-dump, then only what changed) need. Without it every dump is
    /// whole.
    pub dirty_tracking: bool,
    /// Checkpoints dump incrementally: the kernel tracks dirty pages and
    /// `--no-dirty-tracking` was not given.
    #[serde(default)]
    pub incremental: bool,
}

/// Longest a dump or restore may run before it is killed.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("criu {op} of {service}: {line} (log: {log})")]
    Failed {
        op: &'static str,
        service: String,
        line: String,
        log: PathBuf,
    },
    #[error("criu {op} of {service}: cannot run {path}: {source}")]
    Spawn {
        op: &'static str,
        service: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CriuError + 'a {
    move |source| CriuError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What a dump of the whole environment takes: the tree of its init (host
/// pid `init`), every task of the daemon's cgroup `cgroup` (which the caller
/// asked to freeze, for a dump), the images dir, the bind mounts from the
/// host (`external`: path inside → key) and the unix sockets whose peer is
/// outside.
#[derive(Clone, Copy)]
pub struct DumpTarget<'a> {
    pub init: i32,
    pub cgroup: &'a Path,
    pub images: &'a Path,
    pub external: &'a [(&'a str, &'a str)],
    pub external_sockets: &'a [u64],
    /// The inode of the environment's own network namespace, dumped as
    /// external (`None`: it shares CRIU's).
    pub netns: Option<u64>,
}

/// A working CRIU (found and `criu check` passed).
#[derive(Clone)]
pub struct Criu {
    path: PathBuf,
    reaper: Reaper,
    /// Where the log of a failed call is kept (`<service>.<op>.log`).
    logs: PathBuf,
    /// `--network-lock skip` (CRIU 3.18 and later; 3.17 refuses the value).
    skip_network_lock: bool,
    /// Pre-dump, then dump only what changed since (dirty tracking).
    incremental: bool,
    /// `-v<N>` of every dump and restore.
    log_level: u8,
}

impl Criu {
    pub fn new(path: PathBuf, reaper: Reaper, logs: PathBuf) -> Self {
        Criu {
            path,
            reaper,
            logs,
            skip_network_lock: true,
            incremental: false,
            log_level: 2,
        }
    }

    /// How much CRIU logs (`-v<N>`, 0 to 4; a debugging log, 4, slows a
    /// big dump down).
    pub fn with_log_level(mut self, level: u8) -> Self {
        self.log_level = level.min(4);
        self
    }

    /// Dumps incrementally (`incremental`: the kernel tracks dirty pages
    /// and the daemon was not told otherwise).
    pub fn with_incremental(mut self, incremental: bool) -> Self {
        self.incremental = incremental;
        self
    }

    /// Whether dumps are incremental: a pre-dump while the processes run,
    /// then the frozen dump writes only the pages dirtied since.
    pub fn incremental(&self) -> bool {
        self.incremental
    }

    /// Adapts the options to the detected version (`3.17.1`): older CRIUs
    /// lack some values (they then lock the network the default way, which
    /// only matters for established TCP connections).
    pub fn with_version(mut self, version: Option<&str>) -> Self {
        self.skip_network_lock = version.and_then(major_minor).is_none_or(|v| v >= (3, 18));
        self
    }

    /// Runs criu with `args` (stdio as set on `cmd`), waiting up to
    /// [`RUN_TIMEOUT`]. Blocking: call from a blocking thread.
    fn run(
        &self,
        mut cmd: Command,
        op: &'static str,
        service: &str,
        log: &Path,
        started: Option<Started>,
    ) -> Result<(), CriuError> {
        let spawned = self.reaper.spawn(&mut cmd);
        drop(cmd); // our copies of the child's fds
        match self.start(spawned, op, service, started)?.finish() {
            Exit::Code(0) => Ok(()),
            exit => Err(self.failure(op, service, log, exit, None)),
        }
    }

    /// Watches a criu just spawned (`started` told its pid): a watchdog
    /// kills it after [`RUN_TIMEOUT`].
    fn start(
        &self,
        spawned: std::io::Result<crate::reaper::Child>,
        op: &'static str,
        service: &str,
        started: Option<Started>,
    ) -> Result<Running, CriuError> {
        let child = spawned.map_err(|source| CriuError::Spawn {
            op,
            service: service.to_owned(),
            path: self.path.clone(),
            source,
        })?;
        let pid = child.pid;
        if let Some(tell) = started {
            tell(pid);
        }
        let done = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let done = done.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + RUN_TIMEOUT;
                while !done.load(Ordering::Acquire) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        let _ = crate::sys::kill(pid, nix::sys::signal::Signal::SIGKILL);
                        return;
                    }
                    std::thread::park_timeout(left);
                }
            })
        };
        Ok(Running {
            exit: child.exit,
            done,
            watchdog,
        })
    }

    /// The error of a criu that exited with `exit`: CRIU's own error line
    /// from `log` (or `said`, what it answered), the log kept past the
    /// images dir (which a failed capture removes).
    fn failure(
        &self,
        op: &'static str,
        service: &str,
        log: &Path,
        exit: Exit,
        said: Option<String>,
    ) -> CriuError {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let kept = self
            .logs
            .join(format!("{}.{op}.log", service.replace(' ', "-")));
        let log = match std::fs::create_dir_all(&self.logs).and_then(|_| std::fs::copy(log, &kept))
        {
            Ok(_) => kept.as_path(),
            Err(_) => log,
        };
        // The end of CRIU's log goes to the daemon's (a test prints that
        // when it fails; the kept log may be gone by then).
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        tracing::warn!(
            op,
            service,
            log = %log.display(),
            "criu failed; its log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        let line = match exit {
            Exit::Signal(9) if text.is_empty() || !text.contains("Error") => {
                format!("killed after {RUN_TIMEOUT:?}")
            }
            _ if text.contains("Error") => error_line(&text),
            _ => said.unwrap_or_else(|| error_line(&text)),
        };
        CriuError::Failed {
            op,
            service: service.to_owned(),
            line: if line.is_empty() {
                format!("exited with {exit:?}")
            } else {
                line
            },
            log: log.to_owned(),
        }
    }

    /// Dumps the whole environment into `t.images`, leaving it running
    /// (and frozen). With `parent` (a pre-dump's dir, relative to the
    /// images dir), only the pages dirtied since it are written; the others
    /// are marked as the parent's. Blocking.
    #[tracing::instrument(name = "criu_dump", skip_all, fields(init = t.init, ?parent))]
    pub fn dump_env(
        &self,
        t: &DumpTarget,
        parent: Option<&str>,
        hook: Option<&ActionHook>,
    ) -> Result<DumpStats, CriuError> {
        let mut args = vec!["--leave-running".to_owned()];
        if let Some(p) = parent {
            args.extend(["--track-mem", "--prev-images-dir", p].map(str::to_owned));
        }
        let mut stats = self.env_dump("dump", &args, t, hook)?;
        if parent.is_some() {
            stats.kind = DumpKind::Incremental;
        }
        Ok(stats)
    }

    /// Pre-dumps the environment's memory into `t.images` while it runs
    /// (CRIU freezes the tasks only to collect their pages) and starts
    /// tracking the pages they dirty from then on. Blocking.
    #[tracing::instrument(name = "criu_pre_dump", skip_all, fields(init = t.init))]
    pub fn pre_dump_env(&self, t: &DumpTarget) -> Result<DumpStats, CriuError> {
        self.env_dump("pre-dump", &["--track-mem".to_owned()], t, None)
    }

    /// `criu <op>` (dump, pre-dump) of the environment's tree with the
    /// options both share, and `extra`.
    fn env_dump(
        &self,
        op: &'static str,
        extra: &[String],
        t: &DumpTarget,
        hook: Option<&ActionHook>,
    ) -> Result<DumpStats, CriuError> {
        let DumpTarget {
            init,
            cgroup,
            images,
            external,
            external_sockets,
            netns,
        } = *t;
        let started = Instant::now();
        std::fs::create_dir_all(images).map_err(io_err("create", images))?;
        let log = images.join(format!("{op}.log"));
        let mut cmd = Command::new(&self.path);
        cmd.arg(op)
            .args(["--tree", &init.to_string()])
            .arg("--images-dir")
            .arg(images)
            .arg("--log-file")
            .arg(&log)
            .arg(format!("-v{}", self.log_level))
            .args(extra)
            .arg("--freeze-cgroup")
            .arg(cgroup)
            .args(DUMP_OPTIONS);
        for (inside, key) in external {
            cmd.arg("--external").arg(format!("mnt[{inside}]:{key}"));
        }
        for ino in external_sockets {
            cmd.arg("--external").arg(format!("unix[{ino}]"));
        }
        if let Some(ino) = netns {
            cmd.arg("--external")
                .arg(format!("net[{ino}]:{}", crate::network::CRIU_KEY));
        }
        if self.skip_network_lock {
            cmd.args(["--network-lock", "skip"]);
        }
        if let Some(h) = hook {
            cmd.arg("--action-script")
                .arg(&h.script)
                .envs(h.env.iter().cloned());
        }
        // What CRIU says before it opens its log (a refused option) lands
        // in the log file too.
        let early = std::fs::File::create(&log).map_err(io_err("create", &log))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(early));
        self.run(cmd, op, ENV, &log, None)?;
        let bytes = std::fs::read_dir(images)
            .map_err(io_err("read dir", images))?
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".log"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        let mut stats = std::fs::read(images.join("stats-dump"))
            .ok()
            .and_then(|b| stats::parse_dump(&b))
            .unwrap_or_default();
        stats.dump_ms = started.elapsed().as_secs_f64() * 1e3;
        stats.bytes = bytes;
        tracing::info!(
            op,
            dump_ms = stats.dump_ms,
            bytes,
            frozen_us = stats.frozen_time,
            memdump_us = stats.memdump_time,
            memwrite_us = stats.memwrite_time,
            pages_written = stats.pages_written,
            "dumped"
        );
        Ok(stats)
    }

    /// Starts a `criu swrk` for a restore of the environment, before the
    /// images are there: CRIU's start (exec, loading its libraries) then
    /// runs while they are made ready, and [`StartedRestore::restore`]
    /// sends the request. CRIU starts in the daemon's cgroup: the caller,
    /// told its pid by `started`, moves it before `pre-restore` is
    /// answered, so every task is born where CRIU is then. `inherit` hands
    /// the restored tasks new pipes: each fd takes the place of the pipe
    /// `pipe:[N]` it is paired with (CRIU takes the fds at its start).
    /// Blocking.
    pub fn start_restore(
        &self,
        started: Started,
        inherit: Vec<(OwnedFd, String)>,
    ) -> Result<StartedRestore, CriuError> {
        let mut keys = Vec::new();
        let mut fds = Vec::new();
        for (i, (fd, key)) in inherit.into_iter().enumerate() {
            keys.push(proto::InheritFd {
                key,
                fd: INHERIT_FIRST_FD + i as i32,
            });
            fds.push(fd);
        }
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| io_err("socketpair for", &self.path)(e.into()))?;
        let sock = INHERIT_FIRST_FD + fds.len() as i32;
        fds.push(theirs);
        // What CRIU says before it opens its log (the images dir is not
        // ready yet): added to the log if the restore fails.
        std::fs::create_dir_all(&self.logs).map_err(io_err("create", &self.logs))?;
        let early = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_TMPFILE)
                .open(&self.logs)
                .map_err(io_err("create a file in", &self.logs))?
        };
        // The restore's log and stats go to a work dir of their own: the
        // images dir holds images only, kept as they are for the next
        // restore (`checkpoint::image_cache`).
        let work_at = self.logs.join(RESTORE_WORK);
        let work = std::fs::create_dir_all(&work_at)
            .and_then(|()| {
                for stale in [RESTORE_LOG, RESTORE_STATS] {
                    match std::fs::remove_file(work_at.join(stale)) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                std::fs::File::open(&work_at)
            })
            .map_err(io_err("prepare", &work_at))?;
        let t0 = std::time::Instant::now();
        let sock = sock.to_string();
        let spawned = self.reaper.spawn_with(|| {
            crate::sys::spawn_passing_fds(
                &self.path,
                &["swrk".as_ref(), sock.as_ref()],
                fds,
                INHERIT_FIRST_FD,
                std::os::fd::AsFd::as_fd(&early),
            )
        });
        let running = self.start(spawned, "restore", ENV, Some(started))?;
        Ok(StartedRestore {
            criu: self.clone(),
            running,
            ours,
            keys,
            early,
            work,
            work_at,
            t0,
        })
    }
}

/// A `criu swrk` started for a restore ([`Criu::start_restore`]), waiting
/// for its request.
pub struct StartedRestore {
    criu: Criu,
    running: Running,
    ours: OwnedFd,
    keys: Vec<proto::InheritFd>,
    early: std::fs::File,
    /// The work dir (CRIU's log and stats), open for CRIU to take by fd.
    work: std::fs::File,
    work_at: PathBuf,
    t0: Instant,
}

impl StartedRestore {
    /// Ends the CRIU without a request (it exits once its socket closes).
    pub fn abandon(self) {
        drop(self.ours);
        let _ = self.running.finish();
    }

    /// The restore's options, and the images dir they name by fd (open
    /// until the request is sent). The images dir is passed as an fd of
    /// this process (CRIU opens it through `/proc/<peer>/fd/<n>`): CRIU
    /// before 4.2 cannot take it by path (it readlinks the path, which
    /// fails for a directory).
    fn options(
        &mut self,
        images: &Path,
        root: &Path,
        external: &[(&str, PathBuf)],
    ) -> Result<(std::fs::File, proto::Opts), CriuError> {
        let text = |p: &Path| -> Result<String, CriuError> {
            p.to_str().map(str::to_owned).ok_or_else(|| {
                io_err("hand CRIU", p)(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the path is not UTF-8",
                ))
            })
        };
        let dir = std::fs::File::open(images).map_err(io_err("open", images))?;
        let mut opts = proto::Opts {
            images_dir_fd: dir.as_raw_fd(),
            work_dir_fd: Some(self.work.as_raw_fd()),
            log_file: Some(RESTORE_LOG.into()),
            log_level: Some(i32::from(self.criu.log_level)),
            root: Some(text(root)?),
            rst_sibling: Some(true),
            manage_cgroups_mode: Some(proto::CG_IGNORE),
            tcp_close: Some(true),
            ext_unix_sk: Some(true),
            file_locks: Some(true),
            notify_scripts: Some(true),
            inherit_fd: std::mem::take(&mut self.keys),
            ..proto::Opts::default()
        };
        for (key, host) in external {
            opts.external.push(format!("mnt[{key}]:{}", text(host)?));
        }
        Ok((dir, opts))
    }

    /// Restores the environment dumped in `images` onto the mounted root
    /// `root`. `external` maps each bind-mount key to its host path. CRIU
    /// runs in its RPC mode (see `rpc`): `stage` answers each stage it
    /// reaches (`pre-restore`, `pre-resume`, …; false fails the stage, and
    /// CRIU ends the restore). Returns the host pid of the restored init, a
    /// child of the daemon, CRIU's statistics, and CRIU itself, exiting
    /// (still in the cgroup it was moved to). Blocking.
    #[tracing::instrument(name = "criu_restore", skip_all)]
    pub fn restore(
        mut self,
        images: &Path,
        root: &Path,
        external: &[(&str, PathBuf)],
        stage: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(i32, RestoreStats, Exiting), CriuError> {
        let log = self.work_at.join(RESTORE_LOG);
        let (_dir, opts) = match self.options(images, root, external) {
            Ok(o) => o,
            Err(e) => {
                self.abandon();
                return Err(e);
            }
        };
        let StartedRestore {
            criu,
            running,
            ours,
            mut early,
            work_at,
            t0,
            ..
        } = self;
        let request = proto::Request {
            kind: proto::RESTORE,
            opts: Some(opts),
            notify_success: None,
        };
        tracing::debug!(after = ?t0.elapsed(), "CRIU has its request");
        let outcome = rpc::converse(&ours, &request, &mut |at| {
            tracing::debug!(stage = at, after = ?t0.elapsed(), "CRIU at a stage");
            stage(at)
        });
        // (`criu swrk` ends once its socket closes)
        drop(ours);
        let (pid, exiting) = match outcome {
            // Its work is done (the stats written, the tree handed over):
            // the caller awaits its exit when it suits it.
            rpc::Outcome::Restored(pid) => (pid, Exiting(Some(running))),
            rpc::Outcome::Failed(said) => {
                return Err(restore_failed(&criu, running, &mut early, &log, said));
            }
            rpc::Outcome::Gone(why) => {
                return Err(restore_failed(&criu, running, &mut early, &log, Some(why)));
            }
        };
        let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
        let stats = std::fs::read(work_at.join(RESTORE_STATS))
            .ok()
            .and_then(|b| stats::parse_restore(&b))
            .unwrap_or_default();
        tracing::info!(
            pid,
            criu_restore_us = stats.restore_time,
            wall_ms,
            pages_restored = stats.pages_restored,
            "restored"
        );
        Ok((pid, stats, exiting))
    }
}

/// A CRIU that answered its restore and is exiting (its socket closed):
/// [`Exiting::wait`] awaits its exit; dropped, a thread of its own does.
pub struct Exiting(Option<Running>);

impl Exiting {
    /// Waits until CRIU has exited. Blocking.
    pub fn wait(mut self) {
        if let Some(r) = self.0.take() {
            Self::check(r.finish());
        }
    }

    fn check(exit: Exit) {
        if exit != Exit::Code(0) {
            tracing::warn!(?exit, "CRIU ended badly after a restore");
        }
    }
}

impl Drop for Exiting {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            std::thread::spawn(move || Self::check(r.finish()));
        }
    }
}

/// The error of a restore CRIU failed (`said`: what it answered), once it
/// has exited; what it said on stderr before its log opened (`early`) goes
/// before its log.
fn restore_failed(
    criu: &Criu,
    running: Running,
    early: &mut std::fs::File,
    log: &Path,
    said: Option<String>,
) -> CriuError {
    use std::io::{Read, Seek};
    let exit = running.finish();
    let mut before = String::new();
    let _ = early.seek(std::io::SeekFrom::Start(0));
    let _ = early.read_to_string(&mut before);
    if !before.is_empty() {
        let after = std::fs::read_to_string(log).unwrap_or_default();
        let _ = std::fs::write(log, before + &after);
    }
    criu.failure("restore", ENV, log, exit, said)
}

/// A criu process and its watchdog.
struct Running {
    exit: tokio::sync::oneshot::Receiver<Exit>,
    done: Arc<AtomicBool>,
    watchdog: std::thread::JoinHandle<()>,
}

impl Running {
    /// Waits for criu to exit (the watchdog kills it at [`RUN_TIMEOUT`]).
    fn finish(self) -> Exit {
        let exit = self.exit.blocking_recv().unwrap_or(Exit::Signal(9));
        self.done.store(true, Ordering::Release);
        self.watchdog.thread().unpark();
        let _ = self.watchdog.join();
        exit
    }
}

/// The work dir of a restore, in the logs dir: its log and stats (never
/// the images dir, which the image cache keeps as it is).
const RESTORE_WORK: &str = "restore";
const RESTORE_LOG: &str = "restore.log";
/// Where CRIU writes a restore's statistics (in its work dir).
const RESTORE_STATS: &str = "stats-restore";

/// Told CRIU's pid once it is spawned.
pub type Started = Box<dyn FnOnce(i32) + Send>;

/// An action script for a dump: CRIU runs `script` (no arguments) at
/// each stage, with `env` set.
#[derive(Debug, Clone)]
pub struct ActionHook {
    pub script: PathBuf,
    pub env: Vec<(String, std::ffi::OsString)>,
}

/// How errors and logs name a whole-environment dump or restore.
const ENV: &str = "the environment";

/// The options of every dump and pre-dump of the environment, besides its
/// tree, images, log, cgroup and external mounts and sockets.
pub const DUMP_OPTIONS: &[&str] = &[
    "--manage-cgroups=ignore",
    "--tcp-established",
    "--skip-in-flight",
    "--ext-unix-sk",
    "--file-locks",
    "--ghost-limit",
    "256M",
];
/// Where the fds handed to a restore start in CRIU's fd table.
const INHERIT_FIRST_FD: i32 = 10;

/// What a dump measured: the daemon's own timing and CRIU's statistics
/// (`stats-dump`, as podman's `--print-stats` reports them; microseconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DumpStats {
    /// `full`: every page written (`incremental`: only those dirtied since
    /// a pre-dump, where the kernel tracks dirty pages).
    pub kind: DumpKind,
    /// Time of the pre-dump taken while the processes ran (ms; none: 0).
    pub pre_dump_ms: f64,
    pub dump_ms: f64,
    /// Bytes of images written.
    pub bytes: u64,
    pub freezing_time: u64,
    pub frozen_time: u64,
    pub memdump_time: u64,
    pub memwrite_time: u64,
    pub pages_scanned: u64,
    pub pages_written: u64,
}

/// Which kind of dump a checkpoint took.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DumpKind {
    #[default]
    Full,
    Incremental,
}

/// What CRIU measured of a restore (`stats-restore`; microseconds).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct RestoreStats {
    pub forking_time: u64,
    pub restore_time: u64,
    pub pages_restored: u64,
}

pub mod pagemap;
mod proto;
mod rpc;

/// CRIU's statistics images (`stats-dump`, `stats-restore`): two magic
/// words, then one length-prefixed `StatsEntry` (`proto`).
pub mod stats {
    use prost::Message as _;

    use super::proto::StatsEntry;
    use super::{DumpStats, RestoreStats};

    fn entry(file: &[u8]) -> Option<StatsEntry> {
        let len = u32::from_le_bytes(file.get(8..12)?.try_into().ok()?) as usize;
        let entry = file.get(12..12usize.checked_add(len)?)?;
        StatsEntry::decode(entry).ok()
    }

    /// Parses a `stats-restore` file (`None` when it is not one).
    pub fn parse_restore(file: &[u8]) -> Option<RestoreStats> {
        let r = entry(file)?.restore?;
        Some(RestoreStats {
            forking_time: r.forking_time.into(),
            restore_time: r.restore_time.into(),
            pages_restored: r.pages_restored.unwrap_or_default(),
        })
    }

    /// Parses a `stats-dump` file (`None` when it is not one).
    pub fn parse_dump(file: &[u8]) -> Option<DumpStats> {
        let d = entry(file)?.dump?;
        Some(DumpStats {
            freezing_time: d.freezing_time.into(),
            frozen_time: d.frozen_time.into(),
            memdump_time: d.memdump_time.into(),
            memwrite_time: d.memwrite_time.into(),
            pages_scanned: d.pages_scanned,
            pages_written: d.pages_written,
            ..DumpStats::default()
        })
    }
}

/// Finds CRIU: the configured path, else the first of [`SEARCH`], else `PATH`.
pub fn locate(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return Some(p.to_owned());
    }
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    SEARCH
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path_dirs).map(|d| d.join("criu")))
        .find(|p| p.is_file())
}

/// Detects CRIU and runs `criu check`.
#[tracing::instrument(name = "criu_detect", skip_all)]
pub async fn detect(reaper: &Reaper, configured: Option<&Path>, disabled: bool) -> CriuSupport {
    let none = |path: Option<PathBuf>, message: String| CriuSupport {
        available: false,
        disabled,
        path,
        version: None,
        check_ok: false,
        message: Some(message),
        dirty_tracking: false,
        incremental: false,
    };
    if disabled {
        return none(
            None,
            "disabled by --no-criu: checkpoints keep files only".into(),
        );
    }
    let Some(path) = locate(configured) else {
        return none(
            None,
            "criu not found (run scripts/setup.sh): checkpoints keep files only".into(),
        );
    };
    let version = match run(reaper, &path, &["--version"]).await {
        Ok((true, out)) => parse_version(&out),
        Ok((false, out)) => {
            return none(
                Some(path.clone()),
                format!("{} --version failed: {}", path.display(), last_line(&out)),
            );
        }
        Err(e) => {
            return none(
                Some(path.clone()),
                format!("cannot run {}: {e}", path.display()),
            );
        }
    };
    let (ok, out) = match run(reaper, &path, &["check"]).await {
        Ok(r) => r,
        Err(e) => return none(Some(path.clone()), format!("{} check: {e}", path.display())),
    };
    let check_ok = ok && out.contains("Looks good");
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let message = if !check_ok {
        Some(format!("criu check failed: {}", error_line(&out)))
    } else if too_old_for_sockets(version.as_deref(), &kernel) {
        Some(format!(
            "criu {} cannot dump processes holding TCP sockets on Linux {kernel} (4.2 or later can): run scripts/setup.sh",
            version.as_deref().unwrap_or("?")
        ))
    } else {
        None
    };
    let dirty_tracking = check_ok
        && matches!(
            run(reaper, &path, &["check", "--feature", "mem_dirty_track"]).await,
            Ok((true, _))
        );
    tracing::info!(path = %path.display(), version = version.as_deref().unwrap_or("?"), check_ok, dirty_tracking, "criu detected");
    CriuSupport {
        available: check_ok,
        disabled,
        path: Some(path),
        version,
        check_ok,
        message,
        dirty_tracking,
        incremental: false,
    }
}

async fn run(reaper: &Reaper, path: &Path, args: &[&str]) -> std::io::Result<(bool, String)> {
    let mut cmd = std::process::Command::new(path);
    cmd.args(args);
    let (exit, out) = reaper.output(&mut cmd, CHECK_TIMEOUT).await?;
    Ok((exit == crate::reaper::Exit::Code(0), out))
}

/// `4.1.1` → (4, 1): the leading major.minor of a version or kernel release.
fn major_minor(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Linux 6.16 refuses SO_PASSCRED on TCP sockets, which CRIU before 4.2
/// reads for every socket it dumps.
fn too_old_for_sockets(criu: Option<&str>, kernel: &str) -> bool {
    match (criu.and_then(major_minor), major_minor(kernel)) {
        (Some(c), Some(k)) => k >= (6, 16) && c < (4, 2),
        _ => false,
    }
}

/// `Version: 4.1.1` → `4.1.1`.
pub fn parse_version(out: &str) -> Option<String> {
    out.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Version:")
            .map(|v| v.trim().to_owned())
    })
}

/// CRIU's own error line: the first line containing `Error` that names a
/// cause (not a helper's exit status, not the non-fatal RLIMIT_NOFILE
/// complaint, not the closing "Dumping FAILED."), else the last `Error`
/// line, else the last line.
pub fn error_line(out: &str) -> String {
    let errors: Vec<&str> = out.lines().filter(|l| l.contains("Error")).collect();
    errors
        .iter()
        .find(|l| {
            !l.contains("exited, status=")
                && !l.contains("RLIMIT_NOFILE")
                && !l.trim_end().ends_with("FAILED.")
        })
        .or(errors.last())
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| last_line(out))
}

fn last_line(out: &str) -> String {
    out.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `stats-dump` as CRIU writes it: two magic words, a length, then
    /// `StatsEntry { dump: DumpStatsEntry { 1: freezing, 2: frozen, 3:
    /// memdump, 4: memwrite, 7: pages_written, ... } }`.
    fn stats_file(dump: &[u8]) -> Vec<u8> {
        let mut entry = vec![0x0a, dump.len() as u8];
        entry.extend_from_slice(dump);
        let mut f = vec![0u8; 8];
        f.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        f.extend_from_slice(&entry);
        f
    }

    #[test]
    fn dump_statistics_are_read_and_hostile_files_are_not() {
        // 1: 300, 2: 40000 (two-byte varints), 3: 5, 4: 6, 5: 9, 7: 4096.
        let dump = [
            0x08, 0xac, 0x02, 0x10, 0xc0, 0xb8, 0x02, 0x18, 5, 0x20, 6, 0x28, 9, 0x38, 0x80, 0x20,
        ];
        let s = stats::parse_dump(&stats_file(&dump)).unwrap();
        assert_eq!(
            (
                s.freezing_time,
                s.frozen_time,
                s.memdump_time,
                s.memwrite_time,
                s.pages_scanned,
                s.pages_written
            ),
            (300, 40000, 5, 6, 9, 4096)
        );
        // Truncated, oversized lengths, endless varints: no panic, no stats.
        assert_eq!(stats::parse_dump(b"short"), None);
        let mut long = stats_file(&dump);
        long[8] = 0xff;
        assert_eq!(stats::parse_dump(&long), None);
        let endless = stats_file(&[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]);
        assert_eq!(stats::parse_dump(&endless), None);
    }

    #[test]
    fn restore_statistics_are_read() {
        // StatsEntry { restore (2): { 1: 7, 2: 0, 3: 300 (forking), 4: 40000, 5: 4096 } }
        let restore = [
            0x08, 7, 0x10, 0, 0x18, 0xac, 0x02, 0x20, 0xc0, 0xb8, 0x02, 0x28, 0x80, 0x20,
        ];
        let mut file = vec![0u8; 8];
        let mut entry = vec![0x12, restore.len() as u8];
        entry.extend_from_slice(&restore);
        file.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        file.extend_from_slice(&entry);
        let s = stats::parse_restore(&file).unwrap();
        assert_eq!(
            (s.forking_time, s.restore_time, s.pages_restored),
            (300, 40000, 4096)
        );
        // A dump's stats are not a restore's.
        assert_eq!(stats::parse_restore(&stats_file(&[0x08, 1])), None);
        assert_eq!(stats::parse_restore(b"short"), None);
    }

    #[test]
    fn parses_output() {
        assert_eq!(parse_version("Version: 4.1.1\n").as_deref(), Some("4.1.1"));
        assert_eq!(parse_version("GitID: x\n"), None);
        let out = "Warn (criu/kerndat.c:1285): x\nError (criu/util.c:642): exited, status=1\n\
                   Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self\n\
                   Error (criu/vdso.c:300): Unexpected rt vDSO area bounds\n\
                   Error (criu/cr-dump.c:2111): Dumping FAILED.\nfoo\n";
        assert_eq!(
            error_line(out),
            "Error (criu/vdso.c:300): Unexpected rt vDSO area bounds"
        );
        assert_eq!(error_line("a\nlast\n\n"), "last");
        assert_eq!(
            error_line("Error (x): Dumping FAILED.\n"),
            "Error (x): Dumping FAILED."
        );
    }

    #[test]
    fn old_criu_on_new_kernels_is_flagged() {
        assert!(too_old_for_sockets(Some("4.1.1"), "6.18.0-1-cloud-amd64"));
        assert!(!too_old_for_sockets(Some("4.2.1"), "6.18.0"));
        assert!(!too_old_for_sockets(Some("3.17"), "6.1.0-27-amd64"));
        assert!(!too_old_for_sockets(None, "6.18.0"));
    }

    #[tokio::test]
    async fn disabled_and_missing() {
        let reaper = Reaper::start().unwrap();
        let s = detect(&reaper, None, true).await;
        assert!(s.disabled && !s.available);
        let s = detect(&reaper, Some(Path::new("/nonexistent/criu")), false).await;
        assert!(!s.available);
        assert!(s.message.unwrap().contains("/nonexistent/criu"));
    }
}
