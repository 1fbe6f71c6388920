//! A counter service for process checkpoints: it counts in memory, and
//! says its value when asked (SIGUSR1), through the service's log stream.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::Method;
use serde_json::Value;

use super::{Daemon, Ndjson};

/// Counts in memory every 10 ms; prints `value N` on SIGUSR1 and `tick N`
/// every 100 counts.
pub const COUNTER: &str = r#"
import signal, sys, time
n = 0
def show(*_):
    sys.stdout.write(f"value {n}\n"); sys.stdout.flush()
signal.signal(signal.SIGUSR1, show)
while True:
    n += 1
    if n % 100 == 0:
        sys.stdout.write(f"tick {n}\n"); sys.stdout.flush()
    time.sleep(0.01)
"#;

pub fn data(e: &Value) -> &str {
    e["data"].as_str().unwrap_or("")
}

/// `prefix N` in a stdout event → N.
pub fn number(e: &Value, prefix: &str) -> Option<u64> {
    (e["type"] == "stdout")
        .then(|| data(e).trim().strip_prefix(prefix)?.trim().parse().ok())
        .flatten()
}

/// The service's log stream from now on (with the last `lines` lines first).
pub async fn follow_from(d: &Daemon, name: &str, lines: usize) -> Ndjson {
    Ndjson::new(
        d.req(
            Method::GET,
            &format!("/v1/services/{name}/logs?lines={lines}&duration=60s"),
            None,
        )
        .await,
    )
}

pub async fn follow(d: &Daemon, name: &str) -> Ndjson {
    follow_from(d, name, 0).await
}

/// Asks the counter for its value (SIGUSR1) and reads the answer from the
/// service's log stream.
pub async fn ask(d: &Daemon, name: &str, pid: i32) -> u64 {
    let host = d.host_pid(pid).await;
    let mut s = follow(d, name).await;
    kill(Pid::from_raw(host), Signal::SIGUSR1).unwrap();
    let evs = s.until(|e| number(e, "value").is_some()).await;
    number(evs.last().unwrap(), "value").unwrap()
}

pub async fn start(d: &Daemon, name: &str, spec: Value) -> Value {
    d.put_service(name, spec, "1s").await;
    let st = d.service(name).await["state"].clone();
    assert_eq!(st["status"], "running", "{st}\n{}", d.log_text());
    st
}

pub fn pid_of(state: &Value) -> i32 {
    state["pid"].as_i64().unwrap() as i32
}

pub fn infos(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .filter(|e| e["type"] == "info")
        .map(data)
        .collect()
}

/// Restores `id` on `d` and checks that service `name` came back with its
/// memory (through CRIU), not started fresh.
pub async fn restore_with_memory(d: &Daemon, id: &str, name: &str) -> Vec<Value> {
    let events = d.restore(id).await;
    let want = format!("Service {name} restored with its memory");
    assert!(
        infos(&events).iter().any(|l| l.starts_with(&want)),
        "{events:?}\n{}",
        d.log_text()
    );
    events
}
