//! What the daemon and the environment's init say to each other: one JSON
//! object per line, requests on one pipe, events on the other. Pipes (not a
//! socket) because CRIU hands a restored init fresh ones (`--inherit-fd`):
//! the init never notices that its daemon changed.

use serde::{Deserialize, Serialize};

/// How a spawned process's stdio is wired.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stdio {
    /// stdout and stderr are pipes to the daemon; stdin a pipe from it, or
    /// `/dev/null`.
    Pipes { stdin: bool },
    /// A pseudo-terminal of the environment's devpts. Its master stays
    /// inside, held by a relay process (so a CRIU dump takes the terminal
    /// along); the daemon writes the relay's input pipe and reads its output.
    Tty { rows: u16, cols: u16 },
}

/// A process to start inside the environment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpawnSpec {
    pub argv: Vec<String>,
    /// The program (default `argv[0]`, looked up in the `PATH` of `env`).
    pub path: Option<String>,
    /// `KEY=VALUE` pairs: the whole environment of the process.
    pub env: Vec<String>,
    /// Working directory, a path inside the environment.
    pub dir: String,
    pub stdio: Stdio,
    /// What the process may hold; none: the default set. The daemon's
    /// launcher ([`crate::container::Container::spawn`]) fills it in from
    /// the privileges policy.
    #[serde(default)]
    pub privileges: Option<Privileges>,
}

/// The capabilities a process started in the environment keeps (its
/// bounding, permitted and effective sets; inheritable and ambient are
/// cleared), and whether `no_new_privs` is set before it execs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Privileges {
    pub keep: Vec<u32>,
    #[serde(default)]
    pub no_new_privs: bool,
    /// The only devices it may open (its cgroup's device program; `None`:
    /// every device of the environment). Enforced by the launcher, not
    /// the init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<crate::cgroup::DeviceRule>>,
}

impl Default for Privileges {
    /// The environment's documented set: Docker's default capabilities.
    fn default() -> Self {
        Privileges {
            keep: super::init::KEPT_CAPABILITIES.to_vec(),
            no_new_privs: false,
            devices: None,
        }
    }
}

/// Daemon → init.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Fork a child that waits (before `exec`) for `Release`: the daemon
    /// first copies its ends of the stdio and moves the child into its cgroup.
    Spawn { id: u64, spec: SpawnSpec },
    /// The daemon took its fds and placed the child: close the init's copies
    /// and let it `exec`.
    Release { id: u64, pid: i32 },
    /// Give up on a child still waiting for `Release` (kills it).
    Abort { id: u64, pid: i32 },
    /// `kill(pid, signal)` inside the environment (`pid < 0`: a process group).
    Signal { id: u64, pid: i32, signal: i32 },
    /// Resize the terminal of `pid` (spawned with `Stdio::Tty`).
    Resize {
        id: u64,
        pid: i32,
        rows: u16,
        cols: u16,
    },
}

/// Init → daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// The environment is set up and the init serves requests.
    Ready,
    /// Setting up the environment failed; the init exits.
    Fatal { message: String },
    /// A child waits for `Release`. `fds` are the init's fd numbers of the
    /// daemon's ends: `[stdin?, stdout, stderr]` for pipes (stdin only when
    /// asked for), `[input, output]` of the relay for a terminal.
    Spawned { id: u64, pid: i32, fds: Vec<i32> },
    /// The request succeeded (after `Release`: the child exec'd).
    Done { id: u64 },
    /// The request failed; `errno` when a system call said why.
    Failed {
        id: u64,
        errno: Option<i32>,
        message: String,
    },
    /// A process the init spawned exited (`signal` when killed by one).
    Exit {
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
    },
}

impl Event {
    /// The request this answers, if it is an answer.
    pub fn reply_to(&self) -> Option<u64> {
        match self {
            Event::Spawned { id, .. } | Event::Done { id } | Event::Failed { id, .. } => Some(*id),
            Event::Ready | Event::Fatal { .. } | Event::Exit { .. } => None,
        }
    }
}

/// Longest line either side accepts: a spawn with a large environment fits.
pub const MAX_LINE: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let r = Request::Spawn {
            id: 7,
            spec: SpawnSpec {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                path: None,
                env: vec!["PATH=/bin".into()],
                dir: "/".into(),
                stdio: Stdio::Tty { rows: 24, cols: 80 },
                privileges: Some(Privileges::default()),
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        let e: Event =
            serde_json::from_str(r#"{"ev":"exit","pid":3,"code":null,"signal":9}"#).unwrap();
        assert_eq!(
            e,
            Event::Exit {
                pid: 3,
                code: None,
                signal: Some(9)
            }
        );
        assert_eq!(e.reply_to(), None);
        assert_eq!(Event::Done { id: 4 }.reply_to(), Some(4));
    }
}
