//! `scripts/drill.sh` against a locally started daemon: the restore drill
//! anyone can run passes, and prints its checks and timings (root).

mod common;

use common::{Daemon, with_criu};

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn the_drill_script_passes_against_a_local_daemon() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu("the_drill_script_passes_against_a_local_daemon"));
    let d = Daemon::start().await;
    let out =
        tokio::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/drill.sh"))
            .arg(format!("http://{}", d.tcp.unwrap()))
            .env("SPRITE_TOKEN", common::TOKEN)
            .output()
            .await
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    assert!(text.contains("ok   same pid"), "{text}");
    assert!(text.contains("drill: passed"), "{text}");
    let timings = text
        .lines()
        .find(|l| l.starts_with("drill: checkpoint"))
        .unwrap_or("");
    assert!(
        timings.contains(" ms, restore ") && timings.contains(" ms"),
        "timings: {text}"
    );

    // A wrong token: the drill fails (non-zero) instead of passing vacuously.
    let bad =
        tokio::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/drill.sh"))
            .arg(format!("http://{}", d.tcp.unwrap()))
            .env("SPRITE_TOKEN", "wrong")
            .output()
            .await
            .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("HTTP 401"),
        "{bad:?}"
    );
}
