//! Sleep and wake. The sprite is idle when no counted activity happened
//! for `--auto-sleep` and none is open; it then sleeps **warm** (the
//! environment's cgroup frozen: memory kept, wake in milliseconds), and
//! after `--cold-after` more, or at once under memory pressure, **cold**
//! (the whole environment dumped with CRIU into the state dir, then ended:
//! its memory goes back to the machine). Every counted request wakes it
//! first: a thaw, or a CRIU restore of the whole tree.
//!
//! What counts as activity (documented in the README): every API request
//! on either listener except `GET /v1/status`, `GET /v1/sprite` (the
//! sprite's record) and `POST /v1/sleep`, for as long as its response is
//! being sent; an open exec or proxy WebSocket; a CONNECT tunnel; an
//! ingress connection. Service output does not count.
//!
//! The depths and what moves between them are the pure [`next_step`]; the
//! [`Sleep`] task applies it, one transition at a time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::checkpoint::Checkpoints;
use crate::lifecycle::{Lifecycle, State};

/// How deep the sprite sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Depth {
    /// Awake (the hosted API's `running`).
    Running,
    Warm,
    Cold,
}

impl Depth {
    pub fn as_str(self) -> &'static str {
        match self {
            Depth::Running => "running",
            Depth::Warm => "warm",
            Depth::Cold => "cold",
        }
    }
}

/// What happened, as far as sleep is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Happening {
    /// `--auto-sleep` passed with no activity.
    Idle,
    /// `--cold-after` passed while warm.
    ColdDue,
    /// The machine is short of memory.
    Pressure,
    /// A request (or `sprite-env wake`) needs the sprite awake.
    Wake,
    /// `sprite-env sleep [--cold]`.
    Force { cold: bool },
}

/// What to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Freeze the environment: running → warm.
    Freeze,
    /// Dump it and end its processes: warm → cold (from running, the
    /// freeze comes first).
    Dump,
    /// warm → running.
    Thaw,
    /// cold → running: restore the dumped tree.
    Restore,
}

/// The transition table: the step `h` calls for at depth `d`, if any.
pub fn next_step(d: Depth, h: Happening) -> Option<Step> {
    use Depth::*;
    use Happening::*;
    match (d, h) {
        (Running, Idle | Force { cold: false }) => Some(Step::Freeze),
        (Running, Force { cold: true }) => Some(Step::Dump),
        (Running, ColdDue | Pressure | Wake) => None,
        (Warm, ColdDue | Pressure | Force { cold: true }) => Some(Step::Dump),
        (Warm, Wake) => Some(Step::Thaw),
        (Warm, Idle | Force { cold: false }) => None,
        (Cold, Wake) => Some(Step::Restore),
        (Cold, Idle | ColdDue | Pressure | Force { .. }) => None,
    }
}

/// The depth, since when, and what the last wake could not bring back.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub status: Depth,
    /// When the sprite went to sleep (none: awake).
    #[serde(with = "opt_rfc3339")]
    pub since: Option<SystemTime>,
    /// Why the last wake started processes fresh, if it did.
    pub last_wake_error: Option<String>,
}

mod opt_rfc3339 {
    use std::time::SystemTime;
    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&humantime::format_rfc3339_millis(*t).to_string()),
            None => s.serialize_none(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SleepError {
    #[error("cannot sleep: {0}")]
    Refused(String),
    #[error("cannot freeze the environment: {0}")]
    Freeze(String),
    #[error("cannot dump the environment: {0}")]
    Dump(String),
}

/// Keeps the sprite awake while it lives (an open WebSocket, a tunnel, a
/// request being answered); its end counts as activity.
pub struct Hold(Arc<Sleep>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.touch();
        self.0.holds.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_one();
    }
}

/// Keeps a cold sprite cold (no wake, no other transition) while it lives.
pub struct StayCold {
    _op: tokio::sync::OwnedMutexGuard<()>,
}

/// What sleeping and waking act on.
pub struct Parts {
    pub checkpoints: Arc<Checkpoints>,
    pub lifecycle: Lifecycle,
}

pub struct Sleep {
    auto_sleep: Duration,
    cold_after: Duration,
    last: Mutex<Instant>,
    holds: AtomicUsize,
    changed: Notify,
    status: watch::Sender<Status>,
    /// One transition at a time; a request waking the sprite waits here.
    ops: Arc<tokio::sync::Mutex<()>>,
    /// Set once the boot is done (before: nothing sleeps, nothing to wake).
    parts: OnceLock<Parts>,
}

/// Memory pressure that sends a warm sprite cold at once: the share of
/// the last 10 s in which some task waited for memory (`/proc/pressure/memory`).
const PRESSURE_SOME_AVG10: f64 = 10.0;
const PRESSURE_CHECK: Duration = Duration::from_secs(2);
/// Freezing waits this long for the cgroup to report frozen.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

impl Sleep {
    pub fn new(auto_sleep: Duration, cold_after: Duration) -> Arc<Sleep> {
        Arc::new(Sleep {
            auto_sleep,
            cold_after,
            last: Mutex::new(Instant::now()),
            holds: AtomicUsize::new(0),
            changed: Notify::new(),
            status: watch::channel(Status {
                status: Depth::Running,
                since: None,
                last_wake_error: None,
            })
            .0,
            ops: Arc::new(tokio::sync::Mutex::new(())),
            parts: OnceLock::new(),
        })
    }

    /// The boot is done: sleep can begin. `cold_since`: the sprite starts
    /// cold (it was when the daemon last stopped).
    pub fn start(self: &Arc<Self>, parts: Parts, cold_since: Option<SystemTime>) {
        if let Some(since) = cold_since {
            self.publish(Depth::Cold, Some(since), None);
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        if self.parts.set(parts).is_ok() {
            tokio::spawn(self.clone().run());
        }
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    pub fn depth(&self) -> Depth {
        self.status.borrow().status
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Counts as activity until dropped (keeps the sprite awake).
    pub fn hold(self: &Arc<Self>) -> Hold {
        self.holds.fetch_add(1, Ordering::SeqCst);
        self.touch();
        Hold(self.clone())
    }

    /// Makes sure the sprite is awake (thaw or restore), waiting for a
    /// transition under way. Never fails: a wake that cannot restore the
    /// processes starts them fresh (see [`Status::last_wake_error`]).
    pub async fn wake(&self) {
        if self.parts.get().is_none() {
            return;
        }
        let _op = self.ops.lock().await;
        self.apply(Happening::Wake).await.ok();
    }

    /// For a checkpoint: a cold sprite stays cold (the returned guard
    /// keeps it so, holding off every transition, until dropped: the
    /// checkpoint takes the images the cold sleep left); otherwise the
    /// sprite is woken, as for any request, and `None` is returned.
    pub async fn stay_cold_or_wake(&self) -> Option<StayCold> {
        self.parts.get()?;
        let op = self.ops.clone().lock_owned().await;
        if self.depth() == Depth::Cold {
            return Some(StayCold { _op: op });
        }
        self.apply(Happening::Wake).await.ok();
        None
    }

    /// `sprite-env sleep [--cold]`.
    pub async fn force(&self, cold: bool) -> Result<Depth, SleepError> {
        let _op = self.ops.lock().await;
        self.apply(Happening::Force { cold }).await?;
        Ok(self.depth())
    }

    fn publish(&self, depth: Depth, since: Option<SystemTime>, err: Option<String>) {
        self.status.send_modify(|s| {
            s.status = depth;
            s.since = since;
            if err.is_some() || depth == Depth::Running {
                s.last_wake_error = err.or(s.last_wake_error.take());
            }
        });
        tracing::info!("sleep: {}", depth.as_str());
        self.changed.notify_one();
    }

    /// Applies what `h` calls for at the current depth (the caller holds
    /// `ops`).
    async fn apply(&self, h: Happening) -> Result<(), SleepError> {
        let Some(parts) = self.parts.get() else {
            return Ok(());
        };
        let Some(step) = next_step(self.depth(), h) else {
            return Ok(());
        };
        if matches!(step, Step::Freeze | Step::Dump) {
            let state = parts.lifecycle.state();
            if state != State::Running {
                return Err(SleepError::Refused(format!("the daemon is {state}")));
            }
        }
        let cps = &parts.checkpoints;
        match step {
            Step::Freeze => {
                let span = tracing::info_span!("freeze", why = ?h);
                let _e = span.enter();
                cps.freeze_environment(FREEZE_TIMEOUT)
                    .await
                    .map_err(|e| SleepError::Freeze(e.to_string()))?;
                self.publish(Depth::Warm, Some(SystemTime::now()), None);
            }
            Step::Dump => {
                let since = self.status().since.unwrap_or_else(SystemTime::now);
                if self.depth() == Depth::Running {
                    cps.freeze_environment(FREEZE_TIMEOUT)
                        .await
                        .map_err(|e| SleepError::Freeze(e.to_string()))?;
                    self.publish(Depth::Warm, Some(since), None);
                }
                cps.sleep_cold(since)
                    .await
                    .map_err(|e| SleepError::Dump(e.to_string()))?;
                self.publish(Depth::Cold, Some(since), None);
            }
            Step::Thaw => {
                cps.thaw_environment();
                self.touch();
                self.publish(Depth::Running, None, None);
            }
            Step::Restore => {
                let why = cps.wake_cold().await;
                self.touch();
                self.publish(Depth::Running, None, why);
            }
        }
        Ok(())
    }

    /// The task: sleeps when idle, goes cold when due.
    async fn run(self: Arc<Self>) {
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let status = self.status();
            let due = match status.status {
                Depth::Running if self.auto_sleep.is_zero() => None,
                Depth::Running if self.holds.load(Ordering::SeqCst) > 0 => None,
                Depth::Running => {
                    let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
                    Some((last + self.auto_sleep, Some(Happening::Idle)))
                }
                Depth::Warm => {
                    let since = status.since.unwrap_or_else(SystemTime::now);
                    let left = self
                        .cold_after
                        .saturating_sub(since.elapsed().unwrap_or_default());
                    let pressure = Instant::now() + PRESSURE_CHECK;
                    if pressured() {
                        Some((Instant::now(), Some(Happening::Pressure)))
                    } else if left > PRESSURE_CHECK {
                        // (nothing due yet: look at the pressure again then)
                        Some((pressure, None))
                    } else {
                        Some((Instant::now() + left, Some(Happening::ColdDue)))
                    }
                }
                Depth::Cold => None,
            };
            let Some((at, h)) = due else {
                notified.await;
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(at.into()) => {}
                () = &mut notified => continue,
            }
            let Some(h) = h else {
                continue;
            };
            let op = self.ops.lock().await;
            // Looked at again under the lock: a request may have come.
            let idle = self.holds.load(Ordering::SeqCst) == 0
                && self
                    .last
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed()
                    >= self.auto_sleep;
            if h == Happening::Idle && !idle {
                continue;
            }
            if let Err(e) = self.apply(h).await {
                tracing::warn!(error = %e, "sleep postponed");
                drop(op);
                // (tried again after another idle period)
                self.touch();
            }
        }
    }
}

/// Whether the machine is short of memory now (PSI).
fn pressured() -> bool {
    std::fs::read_to_string("/proc/pressure/memory")
        .ok()
        .and_then(|s| parse_pressure(&s))
        .is_some_and(|avg10| avg10 >= PRESSURE_SOME_AVG10)
}

/// `some avg10=` of `/proc/pressure/memory`.
fn parse_pressure(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transition_table() {
        use Depth::*;
        use Happening::*;
        assert_eq!(next_step(Running, Idle), Some(Step::Freeze));
        assert_eq!(next_step(Running, Wake), None);
        assert_eq!(next_step(Running, ColdDue), None);
        assert_eq!(next_step(Running, Force { cold: true }), Some(Step::Dump));
        assert_eq!(next_step(Warm, ColdDue), Some(Step::Dump));
        assert_eq!(next_step(Warm, Pressure), Some(Step::Dump));
        assert_eq!(next_step(Warm, Wake), Some(Step::Thaw));
        assert_eq!(next_step(Warm, Idle), None);
        assert_eq!(next_step(Cold, Wake), Some(Step::Restore));
        assert_eq!(next_step(Cold, Force { cold: true }), None);
        assert_eq!(next_step(Cold, Pressure), None);
    }

    #[test]
    fn pressure_lines() {
        let t = "some avg10=12.50 avg60=1.00 avg300=0.10 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_pressure(t), Some(12.5));
        assert_eq!(parse_pressure("garbage"), None);
        assert_eq!(parse_pressure("some avg10=x"), None);
    }
}
