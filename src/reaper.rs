//! Child processes: the only code that spawns processes and waits for them.
//!
//! The daemon is a child subreaper, so orphaned descendants of its services
//! are reparented to it. One task reaps every exited child on `SIGCHLD` with
//! `waitpid(-1)`: the exit of a process spawned here goes to its waiter; an
//! orphan is just reaped, so no zombie accumulates. Because `waitpid(-1)`
//! would steal exit statuses from any other spawner, every process the daemon
//! starts (services, CRIU, exec) must go through [`Reaper::spawn`] (or
//! [`Reaper::spawn_with`], for a process started otherwise than by a
//! [`Command`]: CRIU's restore, by `posix_spawn`).
//!
//! A spawn registers its pid while holding the same lock the reaper takes to
//! dispatch, so an exit that happens before registration cannot be lost.

use std::collections::HashMap;
use std::io;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

pub use crate::sys::Exit;

#[derive(Default)]
struct Table {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    /// Exits of registered pids whose waiter was dropped: kept for nobody.
    orphans_reaped: u64,
}

/// Handle to the reaping task.
#[derive(Clone)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

/// A spawned child: its pid, its pipes (when asked for) and its exit.
pub struct Child {
    pub pid: i32,
    pub stdin: Option<std::process::ChildStdin>,
    pub stdout: Option<std::process::ChildStdout>,
    pub stderr: Option<std::process::ChildStderr>,
    pub exit: oneshot::Receiver<Exit>,
}

impl Reaper {
    /// Becomes a subreaper and starts the reaping task. Must run inside the
    /// tokio runtime. Not being allowed to become a subreaper is logged, not
    /// fatal (orphans then go to init).
    pub fn start() -> io::Result<Self> {
        if let Err(e) = crate::sys::set_child_subreaper() {
            tracing::warn!(error = %e, "cannot become a child subreaper: orphaned service processes go to init");
        }
        let mut sigchld = signal(SignalKind::child())?;
        let table = Arc::new(Mutex::new(Table::default()));
        let reaper = Reaper {
            table: table.clone(),
        };
        tokio::spawn(async move {
            loop {
                reap_all(&table);
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `cmd` and registers its pid. The caller sets up stdio.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut child = cmd.spawn()?;
        let pid = child.id() as i32;
        let (tx, rx) = oneshot::channel();
        table.waiters.insert(pid, tx);
        drop(table);
        Ok(Child {
            pid,
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            exit: rx,
        })
        // `child` (std) is dropped without waiting: the reaper owns the wait.
    }

    /// Starts a process with `start` (which returns its pid: e.g.
    /// [`crate::sys::spawn_passing_fds`]) and hands its exit over, as
    /// [`Reaper::spawn`] does for a [`Command`].
    pub fn spawn_with(&self, start: impl FnOnce() -> io::Result<i32>) -> io::Result<Child> {
        // (held across the start: the reaper cannot take the exit first)
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let pid = start()?;
        let (tx, rx) = oneshot::channel();
        table.waiters.insert(pid, tx);
        drop(table);
        Ok(Child {
            pid,
            stdin: None,
            stdout: None,
            stderr: None,
            exit: rx,
        })
    }

    /// Registers `pid`, a process about to appear under the daemon without
    /// being spawned by it (a CRIU restore's root, reparented to the daemon
    /// as the subreaper), so its exit is handed over instead of being
    /// reaped as an orphan's. [`Reaper::forget`] undoes it.
    pub fn expect(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiters
            .insert(pid, tx);
        rx
    }

    /// Drops the registration of a pid that did not appear.
    pub fn forget(&self, pid: i32) {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiters
            .remove(&pid);
    }

    /// Runs `cmd` to completion with a time limit and returns its exit and
    /// combined stdout+stderr. On timeout the process is killed.
    pub async fn output(&self, cmd: &mut Command, timeout: Duration) -> io::Result<(Exit, String)> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawn(cmd)?;
        let pid = child.pid;
        let mut out = tokio::process::ChildStdout::from_std(child.stdout.take().expect("piped"))?;
        let mut err = tokio::process::ChildStderr::from_std(child.stderr.take().expect("piped"))?;
        let work = async {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let (r1, r2) = tokio::join!(out.read_to_end(&mut a), err.read_to_end(&mut b));
            r1?;
            r2?;
            let exit = (&mut child.exit)
                .await
                .map_err(|_| io::Error::other("reaper stopped"))?;
            a.extend_from_slice(&b);
            Ok::<_, io::Error>((exit, String::from_utf8_lossy(&a).into_owned()))
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                let _ = crate::sys::kill(pid, nix::sys::signal::Signal::SIGKILL);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out after {timeout:?}"),
                ))
            }
        }
    }

    /// How many orphans (exited descendants nobody spawned here) were reaped.
    pub fn orphans_reaped(&self) -> u64 {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .orphans_reaped
    }
}

fn reap_all(table: &Mutex<Table>) {
    loop {
        let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
        match crate::sys::reap_any() {
            Ok(Some((pid, exit))) => match t.waiters.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => {
                    t.orphans_reaped += 1;
                    tracing::debug!(pid, ?exit, "reaped orphan");
                }
            },
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "waitpid failed");
                return;
            }
        }
    }
}
