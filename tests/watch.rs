//! `GET /v1/fs/watch` (issue 20): a WebSocket reporting creates, writes,
//! removes, renames and chmods under the watched paths of the environment,
//! recursive on request, confined like every path of the API, bounded.

mod common;

use common::{Daemon, next, privileged, text, ws};
use futures_util::SinkExt as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// `sh -c script` inside the environment (it must succeed).
async fn sh(d: &Daemon, script: &str) {
    let out = d.cli(&["exec", "--", "sh", "-c", script]).await;
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A subscription's socket, once `subscribed` came back (its paths).
async fn subscribe(d: &Daemon, msg: Value) -> (common::Ws, Value) {
    let (mut s, _) = ws(d, "/fs/watch").await;
    s.send(Message::Text(msg.to_string().into())).await.unwrap();
    let first = text(&next(&mut s).await).unwrap();
    (s, first)
}

/// The next `event` messages until one matches `path` and `event`; every
/// message on the way must be an event too.
async fn until(s: &mut common::Ws, path: &str, event: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let m = text(&next(s).await).unwrap();
        assert_eq!(m["type"], "event", "{m} after {seen:?}");
        let done = m["path"] == path && m["event"] == event;
        seen.push(m);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_watch_reports_changes_recursively_and_stays_inside() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_watch_reports_changes_recursively_and_stays_inside"
    ));
    let d = Daemon::start().await;
    std::fs::create_dir_all(d.env_root().join("work/deep/er")).unwrap();
    let (mut s, first) = subscribe(
        &d,
        json!({"type": "subscribe", "paths": ["work"], "recursive": true, "workingDir": "/"}),
    )
    .await;
    assert_eq!(first, json!({"type": "subscribed", "paths": ["/work"]}));

    sh(&d, "echo hi > /work/a.txt").await;
    let seen = until(&mut s, "/work/a.txt", "write").await;
    assert_eq!(seen[0]["event"], "create", "{seen:?}");
    assert_eq!(seen[0]["isDir"], false);
    assert!(seen[0]["timestamp"].as_str().unwrap().ends_with('Z'));
    // A directory that existed at the subscription, two levels down.
    sh(&d, "echo x > /work/deep/er/b.txt").await;
    until(&mut s, "/work/deep/er/b.txt", "write").await;
    // A directory made afterwards is watched from its creation on.
    sh(&d, "mkdir /work/new").await;
    let seen = until(&mut s, "/work/new", "create").await;
    assert_eq!(seen.last().unwrap()["isDir"], true);
    sh(&d, "touch /work/new/c && chmod 600 /work/new/c").await;
    until(&mut s, "/work/new/c", "chmod").await;
    sh(&d, "mv /work/a.txt /work/new/d.txt && rm /work/new/d.txt").await;
    let seen = until(&mut s, "/work/new/d.txt", "remove").await;
    let kinds: Vec<(&str, &str)> = seen
        .iter()
        .map(|m| (m["path"].as_str().unwrap(), m["event"].as_str().unwrap()))
        .collect();
    assert!(kinds.contains(&("/work/a.txt", "rename")), "{kinds:?}");
    assert!(kinds.contains(&("/work/new/d.txt", "create")), "{kinds:?}");

    // Not recursive: a subdirectory's changes are not reported, the
    // directory's own are.
    let (mut flat, first) = subscribe(&d, json!({"type": "subscribe", "paths": ["/work"]})).await;
    assert_eq!(first["type"], "subscribed");
    sh(&d, "echo 1 > /work/deep/hidden && echo 2 > /work/shown").await;
    let seen = until(&mut flat, "/work/shown", "write").await;
    assert!(
        seen.iter().all(|m| m["path"] != "/work/deep/hidden"),
        "{seen:?}"
    );

    // Confined: `..` above the root is refused; a symlink to a host path
    // leads inside the environment (here: nowhere).
    for (msg, needle) in [
        (
            json!({"type": "subscribe", "paths": ["../../etc"], "workingDir": "/work"}),
            "outside",
        ),
        (json!({"type": "subscribe", "paths": []}), "paths"),
        (json!({"type": "unsubscribe", "paths": ["/work"]}), "type"),
        (
            json!({"type": "subscribe", "paths": ["/work/nope"]}),
            "/work/nope",
        ),
    ] {
        let (_, first) = subscribe(&d, msg.clone()).await;
        assert_eq!(first["type"], "error", "{msg}: {first}");
        assert!(
            first["message"].as_str().unwrap().contains(needle),
            "{msg}: {first}"
        );
    }
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), d.env_root().join("work/out")).unwrap();
    let (_, first) = subscribe(&d, json!({"type": "subscribe", "paths": ["/work/out"]})).await;
    assert_eq!(
        first["type"], "error",
        "the host dir is not inside: {first}"
    );

    // Bounded: past 32 open watches, a 503 before the upgrade.
    let mut open = Vec::new();
    while open.len() < 40 {
        let url = format!("ws://{}/v1/fs/watch", d.tcp.unwrap());
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", common::TOKEN).parse().unwrap(),
        );
        match tokio_tungstenite::connect_async(req).await {
            Ok((s, _)) => open.push(s),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 503);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // (the two subscriptions above still run)
    assert_eq!(open.len(), 30, "32 at once, two of them held above");
    drop(open);
    drop((s, flat));
}
