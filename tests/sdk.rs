//! Wire compatibility with the official SDKs, `sprites-py` and
//! `@fly/sprites`: their own code, pointed at a real daemon over TCP with a
//! token. `scripts/setup.sh` installs the pinned SDKs (a venv, an npm
//! prefix); without them the tests skip, or fail under
//! `SPRITED_REQUIRE_PRIVILEGED=1` (CI).

mod common;

use std::path::PathBuf;

use common::{Daemon, NAME, TOKEN, privileged};

/// `rel` under the setup cache, if setup installed it (else the test skips,
/// or fails in CI).
fn installed(rel: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("SPRITED_SETUP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/sprited-setup".into());
    let p = cache.join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("SPRITED_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{} is missing: run scripts/setup.sh", p.display());
    }
    eprintln!(
        "SKIPPED: {} is not installed (run scripts/setup.sh)",
        p.display()
    );
    None
}

/// Runs one SDK script against a fresh daemon; it must print `done`.
async fn run_script(name: &str, done: &str) {
    let Some(python) = installed("sdk-venv/bin/python") else {
        return;
    };
    let script = format!("{}/tests/sdk/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(script);
    run(cmd, done).await;
}

/// Runs an SDK client against a fresh daemon; it must succeed and print `done`.
async fn run(mut cmd: tokio::process::Command, done: &str) {
    let d = Daemon::start().await;
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
}

#[tokio::test]
async fn sprites_py_manages_services() {
    if privileged("sprites_py_manages_services") {
        run_script("services.py", "SDK services: all passed").await;
    }
}

#[tokio::test]
async fn sprites_py_takes_and_restores_checkpoints() {
    if privileged("sprites_py_takes_and_restores_checkpoints") {
        run_script("checkpoints.py", "SDK checkpoints: all passed").await;
    }
}

#[tokio::test]
async fn sprites_py_runs_commands_and_uses_files() {
    if privileged("sprites_py_runs_commands_and_uses_files") {
        run_script("exec_fs.py", "SDK exec and fs: all passed").await;
    }
}

#[tokio::test]
async fn fly_sprites_js_uses_absolute_paths_and_restores() {
    if !privileged("fly_sprites_js_uses_absolute_paths_and_restores") {
        return;
    }
    let Some(modules) = installed("js-sdk/node_modules/@fly/sprites") else {
        return;
    };
    // The script imports the package from the setup cache's node_modules.
    let dir = modules
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap();
    let script = dir.join("js_sdk.mjs");
    std::fs::copy(
        format!("{}/tests/sdk/js_sdk.mjs", env!("CARGO_MANIFEST_DIR")),
        &script,
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("--experimental-websocket")
        .arg("--no-warnings")
        .arg(&script);
    run(cmd, "JS SDK: all passed").await;
}
