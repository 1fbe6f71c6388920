//! A service's state as a type: what can happen to a service, and the pure
//! transition function the supervisor applies (see the diagram in
//! `supervisor/mod.rs`). The API asks [`is_idle`] rather than deciding it.

use super::Status;

/// What happens to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Happening {
    /// Its process was started (`starting` until its `http_port` accepts).
    Spawned,
    /// A restore handed it a process that was already running.
    Adopted,
    /// Spawned, and its `http_port` (if any) accepts.
    Up,
    /// No process could be started (missing program, no environment).
    SpawnFailed,
    /// Its main process exited on its own (a restart gets scheduled).
    Exited,
    /// A stop was asked for while it runs.
    StopAsked,
    /// A stop was asked for while it waited to restart.
    RestartCancelled,
    /// The stop finished: nothing of it runs.
    Stopped,
}

/// Why a transition was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a service that is {from:?} cannot take {happening:?}")]
pub struct Refused {
    pub from: Status,
    pub happening: Happening,
}

/// The state after `happening`, from `from`.
pub fn next_state(from: Status, happening: Happening) -> Result<Status, Refused> {
    use Happening as H;
    use Status as S;
    let to = match (from, happening) {
        (S::Stopped | S::Failed, H::Spawned) => S::Starting,
        (S::Stopped | S::Failed, H::Adopted) => S::Running,
        (S::Starting, H::Up) => S::Running,
        (S::Stopped | S::Failed | S::Starting, H::SpawnFailed) => S::Failed,
        (S::Starting | S::Running, H::Exited) => S::Failed,
        (S::Starting | S::Running, H::StopAsked) => S::Stopping,
        (S::Failed, H::RestartCancelled) => S::Stopped,
        (S::Stopping, H::Stopped) => S::Stopped,
        (from, happening) => return Err(Refused { from, happening }),
    };
    Ok(to)
}

/// Whether a service neither runs nor is about to: stopped, or failed
/// with no restart scheduled (a start that could not spawn).
pub fn is_idle(status: Status, restart_scheduled: bool) -> bool {
    match status {
        Status::Stopped => true,
        Status::Failed => !restart_scheduled,
        Status::Starting | Status::Running | Status::Stopping => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Happening as H;
    use Status as S;

    #[test]
    fn the_lifecycle_of_a_service() {
        let path = [
            (S::Stopped, H::Spawned, S::Starting),
            (S::Starting, H::Up, S::Running),
            (S::Running, H::Exited, S::Failed),
            (S::Failed, H::Spawned, S::Starting),
            (S::Starting, H::StopAsked, S::Stopping),
            (S::Stopping, H::Stopped, S::Stopped),
            (S::Stopped, H::SpawnFailed, S::Failed),
            (S::Failed, H::RestartCancelled, S::Stopped),
            (S::Stopped, H::Adopted, S::Running),
            (S::Running, H::StopAsked, S::Stopping),
        ];
        for (from, h, to) in path {
            assert_eq!(next_state(from, h), Ok(to), "{from:?} + {h:?}");
        }
    }

    #[test]
    fn impossible_transitions_are_refused() {
        for (from, h) in [
            (S::Running, H::Spawned),
            (S::Stopped, H::Exited),
            (S::Stopped, H::StopAsked),
            (S::Stopping, H::Spawned),
            (S::Running, H::Up),
            (S::Running, H::Stopped),
            (S::Starting, H::Adopted),
        ] {
            assert_eq!(
                next_state(from, h),
                Err(Refused { from, happening: h }),
                "{from:?} + {h:?}"
            );
        }
    }

    #[test]
    fn idle_means_nothing_runs_or_is_scheduled() {
        assert!(is_idle(S::Stopped, false));
        assert!(is_idle(S::Failed, false));
        assert!(!is_idle(S::Failed, true));
        for s in [S::Starting, S::Running, S::Stopping] {
            assert!(!is_idle(s, false));
        }
    }
}
