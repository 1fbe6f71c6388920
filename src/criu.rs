//! CRIU: the only module that spawns the `criu` binary.
//!
//! It detects CRIU at start (path, version, `criu check`) for `/v1/status`,
//! and dumps and restores one service's process tree at a time:
//!
//! - **dump** runs while the daemon holds the service's cgroup frozen.
//!   `--freeze-cgroup` makes CRIU seize the frozen tasks through that cgroup
//!   and leave it frozen as it found it; `--leave-running` keeps the service
//!   alive. The service's stdout/stderr are pipes to the daemon: their pipe
//!   ids are recorded so a restore can plug in new ones.
//! - **restore** runs `criu restore --restore-detached` inside the service's
//!   fresh cgroup (CRIU joins it before exec, so every restored task is born
//!   there), with the new pipes as CRIU's own stdout/stderr handed over by
//!   `--inherit-fd`. When CRIU exits, the restored tree's root is
//!   reparented to the daemon, the subreaper.
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
//! Every call writes CRIU's log (`-v4`) next to the images; an error names
//! the service and CRIU's own error line.

use std::os::fd::OwnedFd;
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
}

/// Longest a dump or restore may run before it is killed.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("criu {op} of service {service}: {line} (log: {log})")]
    Failed {
        op: &'static str,
        service: String,
        line: String,
        log: PathBuf,
    },
    #[error("criu {op} of service {service}: cannot run {path}: {source}")]
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

/// A working CRIU (found and `criu check` passed).
#[derive(Clone)]
pub struct Criu {
    path: PathBuf,
    reaper: Reaper,
    /// Where the log of a failed call is kept (`<service>.<op>.log`).
    logs: PathBuf,
    /// `--network-lock skip` (CRIU 3.18 and later; 3.17 refuses the value).
    skip_network_lock: bool,
}

/// What a dump recorded besides the images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dumped {
    pub pid: i32,
    /// `pipe:[N]` of the root's stdout and stderr at dump time (when pipes).
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    /// Every thread id in the service's cgroup: a restore waits until they
    /// are all free again.
    pub tids: Vec<i32>,
    pub dump_ms: f64,
    /// Bytes of images written.
    pub bytes: u64,
}

/// The pipes a restored service writes to (the daemon reads the other ends).
pub struct Restored {
    pub pid: i32,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub exit: tokio::sync::oneshot::Receiver<Exit>,
}

impl Criu {
    pub fn new(path: PathBuf, reaper: Reaper, logs: PathBuf) -> Self {
        Criu {
            path,
            reaper,
            logs,
            skip_network_lock: true,
        }
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
    ) -> Result<(), CriuError> {
        let child = self
            .reaper
            .spawn(&mut cmd)
            .map_err(|source| CriuError::Spawn {
                op,
                service: service.to_owned(),
                path: self.path.clone(),
                source,
            })?;
        drop(cmd); // our copies of the child's fds
        let pid = child.pid;
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
        let exit = child.exit.blocking_recv().unwrap_or(Exit::Signal(9));
        done.store(true, Ordering::Release);
        watchdog.thread().unpark();
        let _ = watchdog.join();
        if exit == Exit::Code(0) {
            return Ok(());
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // Kept past the images dir (which a failed capture removes).
        let kept = self.logs.join(format!("{service}.{op}.log"));
        let log = match std::fs::create_dir_all(&self.logs).and_then(|_| std::fs::copy(log, &kept))
        {
            Ok(_) => kept.as_path(),
            Err(_) => log,
        };
        let line = match exit {
            Exit::Signal(9) if text.is_empty() || !text.contains("Error") => {
                format!("killed after {RUN_TIMEOUT:?}")
            }
            _ => error_line(&text),
        };
        Err(CriuError::Failed {
            op,
            service: service.to_owned(),
            line: if line.is_empty() {
                format!("exited with {exit:?}")
            } else {
                line
            },
            log: log.to_owned(),
        })
    }

    /// Dumps the process tree rooted at `pid` (all of the service's cgroup
    /// `cgroup`, which the caller holds frozen) into `images`, leaving it
    /// running (and frozen). Blocking.
    #[tracing::instrument(name = "criu_dump", skip(self, cgroup, images), fields(service = service, pid))]
    pub fn dump(
        &self,
        service: &str,
        pid: i32,
        cgroup: &Path,
        images: &Path,
    ) -> Result<Dumped, CriuError> {
        let started = Instant::now();
        std::fs::create_dir_all(images).map_err(io_err("create", images))?;
        let fd_target = |fd: u32| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .ok()
                .map(|t| t.to_string_lossy().into_owned())
                .filter(|t| t.starts_with("pipe:["))
        };
        let (stdout, stderr) = (fd_target(1), fd_target(2));
        let tids = std::fs::read_to_string(cgroup.join("cgroup.threads"))
            .map_err(io_err("read", &cgroup.join("cgroup.threads")))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        let log = images.join("dump.log");
        let mut cmd = Command::new(&self.path);
        cmd.arg("dump")
            .args(["--tree", &pid.to_string()])
            .arg("--images-dir")
            .arg(images)
            .arg("--log-file")
            .arg(&log)
            .arg("-v4")
            .arg("--leave-running")
            .arg("--freeze-cgroup")
            .arg(cgroup)
            .args([
                "--manage-cgroups=ignore",
                "--tcp-established",
                "--skip-in-flight",
                "--ext-unix-sk",
                "--file-locks",
                "--ghost-limit",
                "256M",
            ]);
        if self.skip_network_lock {
            cmd.args(["--network-lock", "skip"]);
        }
        // What CRIU says before it opens its log (a refused option) lands
        // in the log file too.
        let early = std::fs::File::create(&log).map_err(io_err("create", &log))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(early));
        self.run(cmd, "dump", service, &log)?;
        let bytes = std::fs::read_dir(images)
            .map_err(io_err("read dir", images))?
            .flatten()
            .filter(|e| e.file_name() != "dump.log")
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        let dump_ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::info!(dump_ms, bytes, "dumped");
        Ok(Dumped {
            pid,
            stdout,
            stderr,
            tids,
            dump_ms,
            bytes,
        })
    }

    /// Restores the tree dumped in `images` into `cgroup_procs` (an open
    /// `cgroup.procs` of the service's fresh cgroup), with new pipes for its
    /// stdout/stderr. Its pids must be free ([`Criu::wait_free`]). Blocking.
    #[tracing::instrument(name = "criu_restore", skip(self, dumped, images, cgroup_procs), fields(service = service, pid = dumped.pid))]
    pub fn restore(
        &self,
        service: &str,
        dumped: &Dumped,
        images: &Path,
        cgroup_procs: OwnedFd,
    ) -> Result<Restored, CriuError> {
        let log = images.join("restore.log");
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new(&self.path);
        cmd.arg("restore")
            .arg("--images-dir")
            .arg(images)
            .arg("--log-file")
            .arg(&log)
            .arg("-v4")
            .args([
                "--restore-detached",
                "--manage-cgroups=ignore",
                "--tcp-close",
                "--ext-unix-sk",
                "--file-locks",
            ])
            .stdin(Stdio::null());
        let pipe = |what: &str| -> Result<(OwnedFd, OwnedFd), CriuError> {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| io_err("pipe", Path::new(what))(e.into()))
        };
        // The service's stdout/stderr pipes become CRIU's stdout/stderr,
        // which --inherit-fd hands to the restored tasks.
        let mut reads = [None, None];
        match (&dumped.stdout, &dumped.stderr) {
            (Some(o), Some(e)) if o == e => {
                let (r, w) = pipe("stdout")?;
                let w2 = w.try_clone().map_err(io_err("dup", Path::new("stdout")))?;
                cmd.arg("--inherit-fd").arg(format!("fd[1]:{o}"));
                cmd.stdout(Stdio::from(w)).stderr(Stdio::from(w2));
                reads[0] = Some(r);
            }
            (o, e) => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
                if let Some(o) = o {
                    let (r, w) = pipe("stdout")?;
                    cmd.arg("--inherit-fd").arg(format!("fd[1]:{o}"));
                    cmd.stdout(Stdio::from(w));
                    reads[0] = Some(r);
                }
                if let Some(e) = e {
                    let (r, w) = pipe("stderr")?;
                    cmd.arg("--inherit-fd").arg(format!("fd[2]:{e}"));
                    cmd.stderr(Stdio::from(w));
                    reads[1] = Some(r);
                }
            }
        }
        crate::sys::join_cgroup_before_exec(&mut cmd, cgroup_procs);
        let exit = self.reaper.expect(dumped.pid);
        if let Err(e) = self.run(cmd, "restore", service, &log) {
            self.reaper.forget(dumped.pid);
            return Err(e);
        }
        let [stdout, stderr] = reads;
        tracing::info!("restored");
        Ok(Restored {
            pid: dumped.pid,
            stdout,
            stderr,
            exit,
        })
    }

    /// Waits (up to `timeout`) until none of `tids` exists, as a restore
    /// with the same pids needs: killed tasks may still be zombies for a
    /// moment until the reaper collects them.
    pub fn wait_free(tids: &[i32], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if tids
                .iter()
                .all(|t| !Path::new(&format!("/proc/{t}")).exists())
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
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
    tracing::info!(path = %path.display(), version = version.as_deref().unwrap_or("?"), check_ok, "criu detected");
    CriuSupport {
        available: check_ok,
        disabled,
        path: Some(path),
        version,
        check_ok,
        message,
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
