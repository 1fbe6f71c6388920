//! Wire compatibility with the official `sprites-py` SDK: its own code,
//! pointed at a real daemon over TCP with a token. `scripts/setup.sh` installs
//! the pinned SDK into a venv; without it the test skips, or fails under
//! `SPRITED_REQUIRE_PRIVILEGED=1` (CI).

mod common;

use std::path::PathBuf;

use common::{Daemon, NAME, TOKEN, privileged};

fn sdk_python() -> Option<PathBuf> {
    let cache = std::env::var_os("SPRITED_SETUP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/sprited-setup".into());
    let py = cache.join("sdk-venv/bin/python");
    if py.exists() {
        return Some(py);
    }
    if std::env::var("SPRITED_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{} is missing: run scripts/setup.sh", py.display());
    }
    eprintln!("SKIPPED: the sprites-py SDK is not installed (run scripts/setup.sh)");
    None
}

/// Runs one SDK script against a fresh daemon; it must print `done`.
async fn run_script(name: &str, done: &str) {
    let Some(python) = sdk_python() else { return };
    let d = Daemon::start().await;
    let script = format!("{}/tests/sdk/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(python)
        .arg(script)
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
