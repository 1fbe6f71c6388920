//! CRIU's action script for dumps, and the gate where a restore meets
//! CRIU.
//!
//! - **`pre-dump`** (a capture): CRIU runs this binary as its action
//!   script, which freezes the environment's cgroup and stamps the time.
//!   CRIU runs it after its own start-up (probing the kernel, parsing
//!   options: some 25 ms) and just before it seizes the tasks, so the
//!   freeze window no longer holds CRIU's start-up, and CRIU finds the
//!   cgroup frozen (left to itself it polls the freezer in steps of
//!   100 ms). CRIU leaves a cgroup it found frozen frozen; the capture
//!   scans the files and thaws. The script is a few lines of shell (CRIU
//!   runs it at every stage, five or so) that execs this binary only at
//!   `pre-dump`; the binary knows it is the hook by
//!   `CRTOOLS_SCRIPT_ACTION` and [`FREEZE_ENV`]. When the script cannot
//!   run (a state dir mounted noexec) the capture freezes before starting
//!   CRIU; a hook that cannot freeze exits 0 so CRIU freezes. A freeze
//!   that catches a task waiting for its `vfork` child, which CRIU cannot
//!   seize, is undone and exits 1: CRIU stops at once, and the capture
//!   freezes again itself until every task can be seized
//!   (`Cgroup::freeze_seizable`), then runs CRIU again.
//! - **`pre-restore`** and **`pre-resume`** (a restore): the restore's
//!   [`Gate`]. A restore runs CRIU in its RPC mode (`criu::rpc`), which
//!   tells the daemon each stage on a socket and waits for the answer; the
//!   thread talking to CRIU asks the gate at these two stages ([`Asker`])
//!   and answers every other stage at once. CRIU starts at once, so its
//!   start-up (probing the kernel, reading the images) runs while the
//!   daemon stops the old environment and mounts the new root. At
//!   `pre-restore` (before CRIU touches the root or forks a task) the gate
//!   says go once the root, the images and the cgroup are ready, stop if
//!   the restore cannot go on. At `pre-resume` (every task restored, none
//!   running) the daemon puts each process back in its cgroup (see
//!   `place`), then says go.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::criu::ActionHook;

/// The environment variable that names the cgroup the `pre-dump` hook freezes.
pub(crate) const FREEZE_ENV: &str = "SPRITED_FREEZE_CGROUP";
/// The file where the `pre-dump` hook stamps the freeze (CLOCK_MONOTONIC, ns).
const STAMP_ENV: &str = "SPRITED_FREEZE_STAMP";

/// How long the hook waits for the freezer.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

const SCRIPT: &str = "#!/bin/sh\n\
# sprited: CRIU's action script (see checkpoint/hook.rs)\n\
case \"$CRTOOLS_SCRIPT_ACTION\" in\n\
pre-dump) exec \"$SPRITED_EXE\" ;;\n\
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

/// A restore's meeting point with CRIU: the thread talking to CRIU asks
/// at `pre-restore` and `pre-resume` ([`Asker::stage`]) and waits for the
/// answer; [`Gate::next`] yields each question.
pub(crate) struct Gate {
    questions: mpsc::UnboundedReceiver<Waiting>,
}

/// CRIU's side of a [`Gate`].
pub(crate) struct Asker {
    questions: mpsc::UnboundedSender<Waiting>,
}

/// CRIU waiting at a stage of the restore.
pub(crate) struct Waiting {
    /// The stage it waits at (`pre-restore`, `pre-resume`).
    pub(crate) stage: String,
    answer: oneshot::Sender<bool>,
}

impl Gate {
    pub(crate) fn new() -> (Gate, Asker) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Gate { questions: rx }, Asker { questions: tx })
    }

    /// The next stage CRIU waits at; none once the asker is gone (the
    /// restore's thread ended).
    pub(crate) async fn next(&mut self) -> Option<Waiting> {
        self.questions.recv().await
    }
}

impl Waiting {
    /// Lets CRIU go on (`go`) or makes the stage fail (CRIU then ends the
    /// restore).
    pub(crate) fn answer(self, go: bool) {
        let _ = self.answer.send(go);
    }
}

impl Asker {
    /// CRIU reached `stage`: at `pre-restore` and `pre-resume`, asks the
    /// gate and waits for its answer (a gate gone, or a question dropped
    /// unanswered, is a stop); every other stage goes on. Blocking.
    pub(crate) fn stage(&self, stage: &str) -> bool {
        if !matches!(stage, "pre-restore" | "pre-resume") {
            return true;
        }
        let (tx, rx) = oneshot::channel();
        let asked = Waiting {
            stage: stage.to_owned(),
            answer: tx,
        };
        if self.questions.send(asked).is_err() {
            return false;
        }
        rx.blocking_recv().unwrap_or(false)
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
/// [`FREEZE_ENV`] set): does its part and returns the exit code; every
/// stage but `pre-dump` is a no-op.
pub fn criu_action() -> Option<u8> {
    let action = std::env::var_os("CRTOOLS_SCRIPT_ACTION")?;
    let cgroup = std::env::var_os(FREEZE_ENV)?;
    if action == "pre-dump" {
        return Some(freeze(
            Path::new(&cgroup),
            std::env::var_os(STAMP_ENV).map(PathBuf::from),
        ));
    }
    Some(0)
}

/// `pre-dump`: freeze, wait until frozen, stamp the time (only the first
/// freeze of a capture is stamped: a dump retried whole keeps it). A
/// failure to freeze is CRIU's log's business and exits 0: CRIU then
/// freezes the cgroup itself. A freeze that caught a task waiting for its
/// `vfork` child, which CRIU cannot seize (see
/// [`crate::cgroup::Cgroup::freeze_seizable`]), is undone and exits 1: CRIU
/// stops at once, and the capture freezes again until every task can be
/// seized, then runs CRIU again.
fn freeze(cgroup: &Path, stamp: Option<PathBuf>) -> u8 {
    let at = crate::sys::monotonic_ns();
    let cgroup = crate::cgroup::Cgroup::at(cgroup.to_owned());
    match cgroup.freeze(FREEZE_TIMEOUT) {
        Ok(()) => {
            let stuck = cgroup.unseizable();
            if !stuck.is_empty() {
                let _ = cgroup.release();
                eprintln!(
                    "sprited pre-dump: threads {stuck:?} wait for a vfork child: not seizable now"
                );
                return 1;
            }
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
    0
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
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "pre-dump\n");
    }

    #[tokio::test]
    async fn the_gate_answers_its_two_stages_and_lets_the_others_go_on() {
        let (mut gate, asker) = Gate::new();
        let asker = std::sync::Arc::new(asker);
        for (stage, go) in [("pre-restore", true), ("pre-resume", false)] {
            let a = asker.clone();
            let criu = tokio::task::spawn_blocking(move || a.stage(stage));
            let waiting = gate.next().await.unwrap();
            assert_eq!(waiting.stage, stage);
            waiting.answer(go);
            assert_eq!(criu.await.unwrap(), go, "{stage}");
        }
        // Other stages go on without asking.
        assert!(asker.stage("post-restore"));
        assert!(asker.stage("network-unlock"));
        // A question dropped unanswered is a stop.
        let a = asker.clone();
        let criu = tokio::task::spawn_blocking(move || a.stage("pre-resume"));
        drop(gate.next().await.unwrap());
        assert!(!criu.await.unwrap());
        // So is a gate gone.
        drop(gate);
        let criu = tokio::task::spawn_blocking(move || asker.stage("pre-restore"));
        assert!(!criu.await.unwrap());
    }
}
