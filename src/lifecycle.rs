//! The daemon's lifecycle state, owned by one task.
//!
//! Handlers never mutate the state: they *read* it (a `watch` snapshot) or
//! *enqueue* a transition request and get the answer back. The transition
//! table is the pure function [`next_state`], so the diagram below is the
//! code's truth and is unit-tested.
//!
//! ```text
//!              BootComplete
//!   Booting ─────────────────▶ Running ◀──────────────┐
//!      │                        │    │                 │ Finish
//!      │             BeginCheckpoint  BeginRestore     │
//!      │                        ▼    ▼                 │
//!      │               Checkpointing  Restoring ───────┘
//!      │                        └───────────────────────┘
//!      │ Shutdown (from any state)
//!      ▼
//!   ShuttingDown   (final: every request answers "shutting down")
//! ```
//!
//! A second `BeginCheckpoint`/`BeginRestore` while one runs is refused with
//! [`LifecycleError::Busy`] (the API maps it to 409). `Finish` is sent by
//! dropping the [`OperationGuard`] that `begin` returns, so an operation that
//! fails or panics still returns the daemon to `Running`.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

/// Where the daemon is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Booting,
    Running,
    Checkpointing,
    Restoring,
    ShuttingDown,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Booting => "booting",
            State::Running => "running",
            State::Checkpointing => "checkpointing",
            State::Restoring => "restoring",
            State::ShuttingDown => "shutting_down",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A requested transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    BootComplete,
    BeginCheckpoint,
    BeginRestore,
    /// End of a checkpoint or restore.
    Finish,
    Shutdown,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LifecycleError {
    #[error("busy: the daemon is {state}")]
    Busy { state: State },
    #[error("the daemon is {state}, not running (waited {waited_ms} ms)")]
    NotRunning { state: State, waited_ms: u64 },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("invalid transition {transition:?} from {state}")]
    Invalid {
        state: State,
        transition: Transition,
    },
}

/// The transition table. Pure: the lifecycle task applies it.
pub fn next_state(state: State, t: Transition) -> Result<State, LifecycleError> {
    use State::*;
    use Transition::*;
    match (state, t) {
        (ShuttingDown, _) => Err(LifecycleError::ShuttingDown),
        (_, Shutdown) => Ok(ShuttingDown),
        (Booting, BootComplete) => Ok(Running),
        (Running, BeginCheckpoint) => Ok(Checkpointing),
        (Running, BeginRestore) => Ok(Restoring),
        (Checkpointing | Restoring, Finish) => Ok(Running),
        (Checkpointing | Restoring, BeginCheckpoint | BeginRestore) => {
            Err(LifecycleError::Busy { state })
        }
        (Booting, BeginCheckpoint | BeginRestore) => Err(LifecycleError::Busy { state }),
        (Booting, Finish)
        | (Running, BootComplete | Finish)
        | (Checkpointing | Restoring, BootComplete) => Err(LifecycleError::Invalid {
            state,
            transition: t,
        }),
    }
}

struct Request {
    transition: Transition,
    reply: Option<oneshot::Sender<Result<State, LifecycleError>>>,
}

/// A cheap, cloneable handle to the lifecycle task.
#[derive(Clone)]
pub struct Lifecycle {
    tx: mpsc::UnboundedSender<Request>,
    state: watch::Receiver<State>,
}

impl Lifecycle {
    /// Spawns the owning task, starting in `Booting`.
    pub fn spawn() -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let (state_tx, state_rx) = watch::channel(State::Booting);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let current = *state_tx.borrow();
                let result = next_state(current, req.transition);
                match &result {
                    Ok(next) => {
                        if *next != current {
                            tracing::info!(from = %current, to = %next, "lifecycle");
                        }
                        state_tx.send_replace(*next);
                    }
                    Err(e) => tracing::debug!(error = %e, "lifecycle transition refused"),
                }
                if let Some(reply) = req.reply {
                    let _ = reply.send(result);
                }
            }
        });
        Lifecycle {
            tx,
            state: state_rx,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Requests a transition and waits for the task's answer.
    pub async fn request(&self, transition: Transition) -> Result<State, LifecycleError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request {
                transition,
                reply: Some(reply),
            })
            .map_err(|_| LifecycleError::ShuttingDown)?;
        rx.await.unwrap_or(Err(LifecycleError::ShuttingDown))
    }

    /// Begins a checkpoint or restore; the returned guard finishes it on drop.
    pub async fn begin(&self, transition: Transition) -> Result<OperationGuard, LifecycleError> {
        debug_assert!(matches!(
            transition,
            Transition::BeginCheckpoint | Transition::BeginRestore
        ));
        self.request(transition).await?;
        Ok(OperationGuard {
            tx: self.tx.clone(),
        })
    }

    /// Waits up to `timeout` for `Running`. Answers at once when shutting down.
    pub async fn wait_running(&self, timeout: Duration) -> Result<(), LifecycleError> {
        let start = Instant::now();
        let mut rx = self.state.clone();
        let wait = rx.wait_for(|s| matches!(s, State::Running | State::ShuttingDown));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(s)) if *s == State::Running => Ok(()),
            Ok(_) => Err(LifecycleError::ShuttingDown),
            Err(_) => Err(LifecycleError::NotRunning {
                state: self.state(),
                waited_ms: start.elapsed().as_millis() as u64,
            }),
        }
    }

    /// A receiver that sees every state change (for status streams and tests).
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state.clone()
    }
}

/// Held for the duration of a checkpoint or restore.
pub struct OperationGuard {
    tx: mpsc::UnboundedSender<Request>,
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(Request {
            transition: Transition::Finish,
            reply: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;
    use Transition::*;

    #[test]
    fn table() {
        assert_eq!(next_state(Booting, BootComplete), Ok(Running));
        assert_eq!(next_state(Running, BeginCheckpoint), Ok(Checkpointing));
        assert_eq!(
            next_state(Checkpointing, BeginRestore),
            Err(LifecycleError::Busy {
                state: Checkpointing
            })
        );
        assert_eq!(next_state(Restoring, Finish), Ok(Running));
        assert_eq!(next_state(Running, Shutdown), Ok(ShuttingDown));
        assert_eq!(
            next_state(ShuttingDown, BootComplete),
            Err(LifecycleError::ShuttingDown)
        );
        assert!(matches!(
            next_state(Running, Finish),
            Err(LifecycleError::Invalid { .. })
        ));
    }

    #[tokio::test]
    async fn guard_returns_to_running_and_waiters_wake() {
        let l = Lifecycle::spawn();
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.wait_running(Duration::from_secs(30)).await })
        };
        assert_eq!(l.request(BootComplete).await, Ok(Running));
        waiter.await.unwrap().unwrap();
        let guard = l.begin(BeginCheckpoint).await.unwrap();
        assert!(matches!(
            l.begin(BeginRestore).await,
            Err(LifecycleError::Busy { .. })
        ));
        drop(guard);
        let mut rx = l.subscribe();
        rx.wait_for(|s| *s == Running).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn wait_times_out_while_booting() {
        let l = Lifecycle::spawn();
        let e = l.wait_running(Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(
            e,
            LifecycleError::NotRunning { state: Booting, .. }
        ));
        l.request(Shutdown).await.unwrap();
        assert_eq!(
            l.wait_running(Duration::from_secs(2)).await,
            Err(LifecycleError::ShuttingDown)
        );
    }
}
