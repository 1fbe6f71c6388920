//! Wire compatibility with the official SDKs, `sprites-py` and
//! `@fly/sprites`: their own code, pointed at a real daemon over TCP with a
//! token. `scripts/setup.sh` installs the pinned SDKs (a venv, an npm
//! prefix). The tests are ignored where privileged tests cannot run; asked
//! to run without the SDKs, they fail.

mod common;

use std::path::PathBuf;

use common::{Daemon, NAME, TOKEN, privileged};

/// `rel` under the setup cache; a test asked to run without it fails.
fn installed(rel: &str) -> PathBuf {
    let cache = std::env::var_os("SPRITED_SETUP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/sprited-setup".into());
    let p = cache.join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

/// `python` of the SDK's venv running `tests/sdk/<name>`.
fn py_script(name: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(installed("sdk-venv/bin/python"));
    cmd.arg(format!("{}/tests/sdk/{name}", env!("CARGO_MANIFEST_DIR")));
    cmd
}

/// Runs one SDK script against a fresh daemon; it must print `done`. The
/// daemon's log.
async fn run_script(name: &str, done: &str) -> String {
    run(py_script(name), done).await
}

/// Runs an SDK client against a fresh daemon whose environment has its own
/// network (`--network own`), both in a network namespace made for the
/// test (the daemon's veth pair and nftables table stay in there); it must
/// print `done`. The daemon's log.
async fn run_own_network(cmd: tokio::process::Command, done: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ns = common::Netns::new(format!("sprsdk{}-{n}", std::process::id()));
    let d = Daemon::start_with(common::Options {
        netns: Some(ns.0.clone()),
        extra: vec!["--network".into(), "own".into()],
        ..Default::default()
    })
    .await;
    let mut inside = tokio::process::Command::new("ip");
    inside
        .args(["netns", "exec", &ns.0])
        .arg(cmd.as_std().get_program())
        .args(cmd.as_std().get_args());
    client(&d, inside, done).await
}

/// `node` running `tests/sdk/<name>` (copied beside the setup cache's
/// node_modules, with `js_common.mjs`, so it imports the installed SDK).
fn js_script(name: &str) -> tokio::process::Command {
    let modules = installed("js-sdk/node_modules/@fly/sprites");
    let dir = modules.ancestors().nth(3).unwrap();
    for f in [name, "js_common.mjs"] {
        std::fs::copy(
            format!("{}/tests/sdk/{f}", env!("CARGO_MANIFEST_DIR")),
            dir.join(f),
        )
        .unwrap();
    }
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("--experimental-websocket")
        .arg("--no-warnings")
        .arg(dir.join(name));
    cmd
}

/// How many TCP requests the daemon's log shows on a path ending in `path`.
fn requests(log: &str, path: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("request transport=Tcp") && l.contains(&format!("{path} status=")))
        .count()
}

/// Runs an SDK client against a fresh daemon; it must succeed and print
/// `done`. The daemon's log.
async fn run(cmd: tokio::process::Command, done: &str) -> String {
    client(&Daemon::start().await, cmd, done).await
}

/// Runs an SDK client against `d`; it must succeed and print `done`. The
/// daemon's log.
async fn client(d: &Daemon, mut cmd: tokio::process::Command, done: &str) -> String {
    let out = cmd
        .env("SPRITED_ENV_ROOT", d.env_root())
        .env("SPRITED_URL", format!("http://{}", d.tcp.unwrap()))
        .env("SPRITED_TOKEN", TOKEN)
        .env("SPRITED_NAME", NAME)
        .env("SPRITES_CLIENT_SIGNALS", "0")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK script failed:\n{stdout}\n{stderr}\n--- daemon log ---\n{}",
        d.log_text()
    );
    assert!(stdout.contains(done), "{stdout}");
    d.log_text()
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and the SDKs (scripts/setup.sh)"
)]
async fn sprites_py_manages_services() {
    assert!(privileged("sprites_py_manages_services"));
    run_script("services.py", "SDK services: all passed").await;
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and the SDKs (scripts/setup.sh)"
)]
async fn sprites_py_takes_and_restores_checkpoints() {
    assert!(privileged("sprites_py_takes_and_restores_checkpoints"));
    run_script("checkpoints.py", "SDK checkpoints: all passed").await;
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and the SDKs (scripts/setup.sh)"
)]
async fn sprites_py_runs_commands_and_uses_files() {
    assert!(privileged("sprites_py_runs_commands_and_uses_files"));
    run_script("exec_fs.py", "SDK exec and fs: all passed").await;
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and the SDKs (scripts/setup.sh)"
)]
async fn sprites_py_sets_reads_and_lifts_network_policies() {
    assert!(privileged(
        "sprites_py_sets_reads_and_lifts_network_policies"
    ));
    run_own_network(py_script("policy.py"), "SDK policy: all passed").await;
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and the SDKs (scripts/setup.sh)"
)]
async fn fly_sprites_js_uses_absolute_paths_and_restores() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "fly_sprites_js_uses_absolute_paths_and_restores"
    ));
    let cmd = js_script("js_sdk.mjs");
    run(cmd, "JS SDK: all passed").await;
}

/// The JS SDK's control mode: execs over one multiplexed WebSocket each
/// (two at once, then reused), and none fell back to the exec WebSocket.
#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and the SDKs (scripts/setup.sh)"
)]
async fn fly_sprites_js_runs_commands_over_the_control_connection() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "fly_sprites_js_runs_commands_over_the_control_connection"
    ));
    let cmd = js_script("js_control.mjs");
    let log = run(cmd, "JS control: all passed").await;
    assert!(requests(&log, "/control") >= 1, "{log}");
    assert_eq!(requests(&log, "/exec"), 0, "an exec fell back:\n{log}");
}

/// The rest of the JS SDK's per-sprite calls, through its own code.
#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and the SDKs (scripts/setup.sh)"
)]
async fn fly_sprites_js_makes_every_other_call() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("fly_sprites_js_makes_every_other_call"));
    let cmd = js_script("js_calls.mjs");
    run(cmd, "JS calls: all passed").await;
}

/// sprites-py's control mode: its commands over the control connection,
/// none falling back to the exec WebSocket.
#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and the SDKs (scripts/setup.sh)"
)]
async fn fly_sprites_js_sets_and_reads_network_policies() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("fly_sprites_js_sets_and_reads_network_policies"));
    run_own_network(js_script("js_policy.mjs"), "JS SDK policy: all passed").await;
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and the SDKs (scripts/setup.sh)"
)]
async fn sprites_py_runs_commands_over_the_control_connection() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "sprites_py_runs_commands_over_the_control_connection"
    ));
    let log = run_script("control.py", "SDK control: all passed").await;
    assert!(requests(&log, "/control") >= 1, "{log}");
    assert_eq!(requests(&log, "/exec"), 0, "a command fell back:\n{log}");
}
