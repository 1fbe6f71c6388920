//! CRIU's action script: this binary, run by CRIU at a few stages.
//!
//! - **`pre-dump`** (a capture): freezes the environment's cgroup and
//!   stamps the time. CRIU runs it after its own start-up (probing the
//!   kernel, parsing options: some 25 ms) and just before it seizes the
//!   tasks, so the freeze window no longer holds CRIU's start-up, and CRIU
//!   finds the cgroup frozen (left to itself it polls the freezer in steps
//!   of 100 ms). CRIU leaves a cgroup it found frozen frozen; the capture
//!   scans the files and thaws.
//! - **`pre-restore`** and **`pre-resume`** (a restore): the restore's
//!   [`Gate`]. A restore starts CRIU at once, so CRIU's start-up (probing
//!   the kernel, reading the images) runs while the daemon stops the old
//!   environment and mounts the new root. At `pre-restore` (before CRIU
//!   touches the root or forks a task) the hook asks the daemon and waits
//!   for its answer: go once the root, the images and the cgroup are ready,
//!   stop if the restore cannot go on. At `pre-resume` (every task
//!   restored, none running) the daemon puts each process back in its
//!   cgroup (see `place`), then answers.
//!
//! The script is a few lines of shell (CRIU runs it at every stage, seven
//! or so) that execs this binary only at those stages; the binary knows it
//! is the hook by `CRTOOLS_SCRIPT_ACTION` and one of [`FREEZE_ENV`] or
//! [`GATE_ENV`]. Both sides fall back when the hook cannot run: a state dir
//! mounted noexec makes the capture freeze before starting CRIU, and the
//! restore start CRIU only when everything is ready (placing the processes
//! itself after); a hook that cannot freeze exits 0 so CRIU freezes.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

use crate::criu::ActionHook;

/// The environment variable that names the cgroup the `pre-dump` hook freezes.
pub(crate) const FREEZE_ENV: &str = "SPRITED_FREEZE_CGROUP";
/// The file where the `pre-dump` hook stamps the freeze (CLOCK_MONOTONIC, ns).
const STAMP_ENV: &str = "SPRITED_FREEZE_STAMP";

/// How long the hook waits for the freezer.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// The environment variable that names a restore's [`Gate`] socket.
pub(crate) const GATE_ENV: &str = "SPRITED_CRIU_GATE";
/// How long the hook waits for the daemon's answer (CRIU's own watchdog
/// ends a restore sooner).
const GATE_TIMEOUT: Duration = Duration::from_secs(600);

const SCRIPT: &str = "#!/bin/sh\n\
# sprited: CRIU's action script (see checkpoint/hook.rs)\n\
case \"$CRTOOLS_SCRIPT_ACTION\" in\n\
pre-dump|pre-restore|pre-resume) exec \"$SPRITED_EXE\" ;;\n\
esac\n\
exit 0\n";

/// Writes the script into state dir `state` (the daemon's: out of the
/// environment's reach) unless it is there already. CRIU aborts an
/// operation whose script fails at an early stage, so only a script that
/// can surely run is handed over: an executable file on a filesystem that
/// allows it.
fn script(state: &Path) -> Result<PathBuf, crate::durable::DurableError> {
    let path = state.join("criu-hook.sh");
    let noexec = nix::sys::statvfs::statvfs(state)
        .map(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC))
        .unwrap_or(true);
    if noexec {
        return Err(crate::durable::err("run scripts from", state)(
            std::io::Error::other("the state dir's filesystem is mounted noexec"),
        ));
    }
    if std::fs::read(&path).ok().as_deref() != Some(SCRIPT.as_bytes()) {
        crate::durable::write_atomic(&path, SCRIPT.as_bytes(), 0o700)?;
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .map_err(crate::durable::err("chmod", &path))?;
    }
    Ok(path)
}

/// The hook for a dump: freezes `cgroup` at `pre-dump` and stamps the time
/// into `stamp` (read back with [`frozen_at`]).
pub(crate) fn for_dump(
    state: &Path,
    exe: &Path,
    cgroup: &Path,
    stamp: &Path,
) -> Result<ActionHook, crate::durable::DurableError> {
    let _ = std::fs::remove_file(stamp);
    Ok(ActionHook {
        script: script(state)?,
        env: vec![
            (FREEZE_ENV.to_owned(), cgroup.as_os_str().to_owned()),
            (STAMP_ENV.to_owned(), stamp.as_os_str().to_owned()),
            ("SPRITED_EXE".to_owned(), exe.as_os_str().to_owned()),
        ],
    })
}

/// The hook for a restore: asks `gate` at `pre-restore` and `pre-resume`.
pub(crate) fn for_restore(
    state: &Path,
    exe: &Path,
    gate: &Gate,
) -> Result<ActionHook, crate::durable::DurableError> {
    Ok(ActionHook {
        script: script(state)?,
        env: vec![
            (GATE_ENV.to_owned(), gate.path.as_os_str().to_owned()),
            ("SPRITED_EXE".to_owned(), exe.as_os_str().to_owned()),
        ],
    })
}

/// A restore's meeting point with CRIU's hook: a Unix socket in the state
/// dir (out of the environment's reach; removed when dropped). The hook
/// connects at each of its stages, says `<stage> <CRTOOLS_INIT_PID>` and
/// waits for `go` (anything else, or the daemon gone, makes the stage
/// fail, and CRIU abort the restore).
pub(crate) struct Gate {
    path: PathBuf,
    listener: tokio::net::UnixListener,
}

/// A hook waiting at a stage of the restore.
pub(crate) struct Waiting {
    stream: tokio::net::UnixStream,
    /// The stage it waits at (`pre-restore`, `pre-resume`).
    pub(crate) stage: String,
}

impl Gate {
    /// Binds the gate in state dir `state` (a stale socket replaced).
    pub(crate) fn bind(state: &Path) -> Result<Gate, crate::durable::DurableError> {
        let path = state.join("criu-gate.sock");
        let _ = std::fs::remove_file(&path);
        let listener =
            tokio::net::UnixListener::bind(&path).map_err(crate::durable::err("bind", &path))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(crate::durable::err("chmod", &path))?;
        Ok(Gate { path, listener })
    }

    /// The next hook to arrive, with the stage it waits at.
    pub(crate) async fn next(&self) -> std::io::Result<Waiting> {
        let (stream, _) = self.listener.accept().await?;
        // (a line of a few bytes; a peer that sends more is cut off)
        let mut reader = tokio::io::BufReader::new(stream).take(256);
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::other("the hook said nothing"))??;
        let stage = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        Ok(Waiting {
            stream: reader.into_inner().into_inner(),
            stage,
        })
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Waiting {
    /// Lets CRIU go on (`go`) or makes the stage fail (`stop`).
    pub(crate) async fn answer(mut self, go: bool) {
        let word: &[u8] = if go { b"go\n" } else { b"stop\n" };
        let _ = self.stream.write_all(word).await;
    }
}

/// The hook's side of the gate at `socket`: says the stage, waits for the
/// answer; the exit code (0 to go on).
fn ask_gate(socket: &Path, stage: &str) -> u8 {
    let asked = (|| -> std::io::Result<String> {
        let mut s = std::os::unix::net::UnixStream::connect(socket)?;
        s.set_read_timeout(Some(GATE_TIMEOUT))?;
        let init = std::env::var("CRTOOLS_INIT_PID").unwrap_or_else(|_| "-".into());
        s.write_all(format!("{stage} {init}\n").as_bytes())?;
        let mut answer = String::new();
        BufReader::new(s.take(64)).read_line(&mut answer)?;
        Ok(answer)
    })();
    match asked {
        Ok(a) if a.trim() == "go" => 0,
        Ok(a) => {
            eprintln!("sprited {stage}: the daemon said {:?}", a.trim());
            1
        }
        Err(e) => {
            eprintln!("sprited {stage}: cannot ask the daemon: {e}");
            1
        }
    }
}

/// When the `pre-dump` hook froze the cgroup: its stamp (CLOCK_MONOTONIC,
/// ns), removed once read. None if it did not (CRIU froze it, or no hook).
pub(crate) fn frozen_at(stamp: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(stamp).ok()?;
    let _ = std::fs::remove_file(stamp);
    text.trim().parse().ok()
}

/// When this process is CRIU's action script (`CRTOOLS_SCRIPT_ACTION` and
/// [`FREEZE_ENV`] or [`GATE_ENV`] set): does its part and returns the exit
/// code; every stage but its own is a no-op.
pub fn criu_action() -> Option<u8> {
    let action = std::env::var_os("CRTOOLS_SCRIPT_ACTION")?;
    if let Some(cgroup) = std::env::var_os(FREEZE_ENV) {
        if action == "pre-dump" {
            freeze(
                Path::new(&cgroup),
                std::env::var_os(STAMP_ENV).map(PathBuf::from),
            );
        }
        return Some(0);
    }
    let gate = std::env::var_os(GATE_ENV)?;
    match action.to_str() {
        Some(stage @ ("pre-restore" | "pre-resume")) => Some(ask_gate(Path::new(&gate), stage)),
        _ => Some(0),
    }
}

/// `pre-dump`: freeze, wait until frozen, stamp the time (only the first
/// freeze of a capture is stamped: a dump retried whole keeps it). A
/// failure is CRIU's log's business and exits 0: CRIU then freezes the
/// cgroup itself.
fn freeze(cgroup: &Path, stamp: Option<PathBuf>) {
    let at = crate::sys::monotonic_ns();
    match crate::cgroup::Cgroup::at(cgroup.to_owned()).freeze(FREEZE_TIMEOUT) {
        Ok(()) => {
            if let Some(stamp) = stamp {
                use std::io::Write;
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(stamp)
                    .and_then(|mut f| f.write_all(at.to_string().as_bytes()));
            }
        }
        Err(e) => eprintln!("sprited pre-dump: cannot freeze the environment: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_is_read_once_and_a_bad_one_is_none() {
        let d = tempfile::tempdir().unwrap();
        let stamp = d.path().join("stamp");
        assert_eq!(frozen_at(&stamp), None);
        std::fs::write(&stamp, "12345").unwrap();
        assert_eq!(frozen_at(&stamp), Some(12345));
        assert_eq!(frozen_at(&stamp), None);
        std::fs::write(&stamp, "soon").unwrap();
        assert_eq!(frozen_at(&stamp), None);
    }

    #[test]
    fn the_script_runs_the_binary_only_at_its_stages() {
        let d = tempfile::tempdir().unwrap();
        let path = script(d.path()).unwrap();
        let marker = d.path().join("ran");
        let exe = d.path().join("exe.sh");
        std::fs::write(
            &exe,
            format!(
                "#!/bin/sh\necho $CRTOOLS_SCRIPT_ACTION >> {}\n",
                marker.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o700)).unwrap();
        for stage in [
            "pre-dump",
            "post-dump",
            "network-lock",
            "pre-restore",
            "pre-resume",
            "post-resume",
        ] {
            let ok = std::process::Command::new(&path)
                .env("CRTOOLS_SCRIPT_ACTION", stage)
                .env("SPRITED_EXE", &exe)
                .status()
                .unwrap();
            assert!(ok.success(), "{stage}");
        }
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap(),
            "pre-dump\npre-restore\npre-resume\n"
        );
    }

    #[tokio::test]
    async fn the_gate_lets_the_hook_go_on_or_stop_it() {
        let d = tempfile::tempdir().unwrap();
        let gate = Gate::bind(d.path()).unwrap();
        let socket = gate.path.clone();
        for (stage, go, code) in [("pre-restore", true, 0), ("pre-resume", false, 1)] {
            let s = socket.clone();
            let hook = tokio::task::spawn_blocking(move || ask_gate(&s, stage));
            let waiting = gate.next().await.unwrap();
            assert_eq!(waiting.stage, stage);
            waiting.answer(go).await;
            assert_eq!(hook.await.unwrap(), code, "{stage}");
        }
        // A hook whose daemon went away fails its stage.
        drop(gate);
        assert!(!socket.exists());
        let code = tokio::task::spawn_blocking(move || ask_gate(&socket, "pre-restore"))
            .await
            .unwrap();
        assert_eq!(code, 1);
    }
}
