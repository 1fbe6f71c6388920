//! The remote store against a real SeaweedFS (`weed mini`, started by the
//! test): checkpoints go up in the background, a push follows one, only
//! what the bucket lacks moves, and another sprite lists them (root).

mod common;

use common::counter::{COUNTER, ask, pid_of, restore_with_memory, start};
use common::weed::{self, Weed};
use common::{Daemon, Options, privileged};
use serde_json::Value;

fn write(root: &std::path::Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// Pseudo-random bytes (nothing to compress), different for each seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A GET's JSON answer.
async fn get_json<T: serde::de::DeserializeOwned>(d: &Daemon, path: &str) -> T {
    d.get(path).await.json().await.unwrap()
}

/// The status of a call without a body.
async fn call(d: &Daemon, method: reqwest::Method, path: &str) -> u16 {
    d.req(method, path, None).await.status().as_u16()
}

/// `POST .../push` followed to its end: the last event, which must be
/// `complete`, and its upload status.
async fn push(d: &Daemon, id: &str) -> Value {
    let events = d
        .post_to_complete(&format!("/v1/checkpoints/{id}/push"), None)
        .await;
    let last = events.last().unwrap();
    assert_eq!(last["remote"]["state"], "uploaded", "{events:?}");
    last["remote"].clone()
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root, CRIU and SeaweedFS (scripts/setup.sh)"
)]
async fn checkpoints_go_up_only_new_objects_move_and_another_sprite_lists_them() {
    let what = "checkpoints_go_up_only_new_objects_move_and_another_sprite_lists_them";
    let store = weed::for_test(what).await;
    let a = Daemon::start_with(store.sprite("team", "alpha")).await;
    let status = a.status().await;
    assert_eq!(status["remote"]["url"], "s3://fleet/team");
    assert_eq!(status["remote"]["endpoint"], store.endpoint.as_str());
    assert!(
        !status.to_string().contains(weed::SECRET_KEY),
        "the status shows no secret"
    );

    // 40 files of 64 KiB.
    let root = a.env_root();
    for i in 0..40u64 {
        write(&root, &format!("data/f{i}"), &noise(i, 64 << 10));
    }
    a.checkpoint("first").await;
    let first = push(&a, "v1").await;
    assert_eq!(
        first["total_objects"],
        first["objects"].as_u64().unwrap() + first["present"].as_u64().unwrap()
    );
    assert!(
        first["bytes"].as_u64().unwrap() >= 40 * (64 << 10),
        "{first}"
    );
    let got: Value = get_json(&a, "/v1/checkpoints/v1").await;
    assert_eq!(got["remote"]["state"], "uploaded", "{got}");

    // The bucket: the record and every object, under the prefix.
    let keys = store.keys().await;
    assert!(
        keys.iter()
            .any(|(k, _)| k == "team/sprites/alpha/checkpoints/v1.json"),
        "{keys:?}"
    );
    let objects = keys
        .iter()
        .filter(|(k, _)| k.starts_with("team/objects/"))
        .count() as u64;
    assert_eq!(
        objects,
        first["total_objects"].as_u64().unwrap(),
        "{keys:?}"
    );

    // The same checkpoint again: nothing moves.
    let again = push(&a, "v1").await;
    assert_eq!(again["objects"], 0, "{again}");
    assert_eq!(again["bytes"], 0, "{again}");

    // One file of 40 changes: only it and the manifest's changed parts move.
    write(&root, "data/f7", &noise(1000, 64 << 10));
    a.checkpoint("second").await;
    let second = push(&a, "v2").await;
    let sent = second["bytes"].as_u64().unwrap();
    assert!(
        (64 << 10..3 * (64 << 10)).contains(&sent),
        "v2 sent {sent} bytes for one changed 64 KiB file: {second}"
    );

    // Another sprite under the same prefix sees alpha's checkpoints.
    let b = Daemon::start_with(store.sprite("team", "beta")).await;
    let mine: Vec<Value> = get_json(&b, "/v1/remote/checkpoints").await;
    assert!(mine.is_empty(), "beta has uploaded nothing yet: {mine:?}");
    let theirs: Vec<Value> = get_json(&b, "/v1/remote/checkpoints?sprite=alpha").await;
    let ids: Vec<&str> = theirs.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["v2", "v1"], "{theirs:?}");
    assert_eq!(theirs[0]["sprite"], "alpha");
    assert_eq!(theirs[0]["comment"], "second");
    let all: Vec<Value> = get_json(&b, "/v1/remote/checkpoints?sprite=*").await;
    assert_eq!(all.len(), 2, "{all:?}");
    let out = b
        .cli(&["checkpoint", "list", "--remote", "--sprite", "alpha"])
        .await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"v2\""));

    // Hostile names are refused; a missing record is a 404.
    let r = b.get("/v1/remote/checkpoints?sprite=..%2Fx").await;
    assert_eq!(r.status(), 400);
    let r = b.get("/v1/remote/checkpoints/alpha/v9").await;
    assert_eq!(r.status(), 404);

    // Deleting locally leaves the remote; deleting a record leaves the objects.
    assert_eq!(
        call(&a, reqwest::Method::DELETE, "/v1/checkpoints/v1").await,
        204
    );
    let left: Vec<Value> = get_json(&b, "/v1/remote/checkpoints?sprite=alpha").await;
    assert_eq!(
        left.len(),
        2,
        "a local delete keeps the remote record: {left:?}"
    );
    assert_eq!(
        call(
            &b,
            reqwest::Method::DELETE,
            "/v1/remote/checkpoints/alpha/v1"
        )
        .await,
        204
    );
    let left: Vec<Value> = get_json(&b, "/v1/remote/checkpoints?sprite=alpha").await;
    let ids: Vec<&str> = left.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["v2"], "{left:?}");
    let after = store.keys().await;
    assert!(
        after
            .iter()
            .filter(|(k, _)| k.starts_with("team/objects/"))
            .count() as u64
            >= objects,
        "objects stay"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root, CRIU and SeaweedFS (scripts/setup.sh)"
)]
async fn without_a_remote_the_calls_say_so_and_a_dead_endpoint_does_not_stop_the_daemon() {
    let what = "without_a_remote_the_calls_say_so_and_a_dead_endpoint_does_not_stop_the_daemon";
    assert!(privileged(what), "{what}: needs root");
    let d = Daemon::start().await;
    let r = d.get("/v1/remote/checkpoints").await;
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("--remote"),
        "{body}"
    );
    assert!(d.status().await["remote"].is_null());

    // An endpoint nobody listens on: the daemon starts, checkpoints work,
    // the status names the failure.
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id=a\naws_secret_access_key=b\n",
    )
    .unwrap();
    let port = common::free_port();
    let d = Daemon::start_with(Options {
        extra: vec![
            "--remote".into(),
            "s3://fleet/x".into(),
            "--remote-endpoint".into(),
            format!("http://127.0.0.1:{port}"),
            "--remote-credentials".into(),
            creds.display().to_string(),
        ],
        ..Default::default()
    })
    .await;
    d.checkpoint("works").await;
    let got: Value = get_json(&d, "/v1/checkpoints/v1").await;
    let state = got["remote"]["state"].as_str().unwrap().to_owned();
    assert!(
        ["pending", "uploading", "failed"].contains(&state.as_str()),
        "{got}"
    );

    // A bad --remote is refused at start with a message naming it.
    let (status, log) = common::spawn(Options {
        extra: vec!["--remote".into(), "http://fleet".into()],
        ..Default::default()
    })
    .exits()
    .await;
    assert!(!status.success());
    assert!(log.contains("s3://"), "{log}");
}

/// `POST .../pull` followed to its end: every event (the last one
/// `complete` when `ok`, `error` otherwise).
async fn pull(d: &Daemon, from: &str) -> Vec<Value> {
    d.post_stream(&format!("/v1/remote/checkpoints/{from}/pull"))
        .await
        .collect()
        .await
}

/// The object ids in a daemon's local store.
fn local_objects(d: &Daemon) -> Vec<String> {
    let mut out = Vec::new();
    for fan in std::fs::read_dir(d.state_dir.join("store/objects")).unwrap() {
        for o in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            out.push(o.unwrap().file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// Acceptance 1 and 3: daemon A checkpoints a tree and a counter held in
/// memory; three empty daemons (one through the CLI) pull the checkpoint
/// from the bucket and restore it. Each gets A's tree and a counter that
/// continues from the checkpointed value, and runs on its own.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root, CRIU and SeaweedFS (scripts/setup.sh)"
)]
async fn a_pulled_checkpoint_restores_tree_and_processes_on_three_empty_daemons() {
    let what = "a_pulled_checkpoint_restores_tree_and_processes_on_three_empty_daemons";
    assert!(common::with_criu(what), "{what}: needs root and CRIU");
    let store = Weed::start(&weed::required(what)).await;
    let opts = |name: &str| store.sprite("fleet", name);
    let a = Daemon::start_with(opts("origin")).await;
    for i in 0..100 {
        write(&a.env_root(), &format!("src/{i:03}.txt"), &noise(i, 4096));
    }
    write(&a.env_root(), "data/blob", &noise(1000, 1 << 20));
    let before = start(
        &a,
        "counter",
        serde_json::json!({"cmd": "python3", "args": ["-u", "-c", COUNTER]}),
    )
    .await;
    let pid = pid_of(&before);
    a.checkpoint("first").await;
    write(&a.env_root(), "src/007.txt", b"changed");
    let low = ask(&a, "counter", pid).await;
    a.checkpoint("second").await;
    let tree_at_v2 = common::tree(&a.env_root());
    push(&a, "v2").await;
    // A runs on and changes its tree after the checkpoint.
    write(&a.env_root(), "src/008.txt", b"after the checkpoint");

    let record: Value = get_json(&a, "/v1/remote/checkpoints/origin/v2").await;
    let remote_objects = record["objects"].as_u64().unwrap();
    let forks = [
        Daemon::start_with(opts("fork-1")).await,
        Daemon::start_with(opts("fork-2")).await,
        Daemon::start_with(opts("fork-3")).await,
    ];
    for (i, d) in forks.iter().enumerate() {
        let listed: Vec<Value> = get_json(d, "/v1/remote/checkpoints?sprite=origin").await;
        assert_eq!(listed[0]["id"], "v2", "{listed:?}");
        let id = if i == 2 {
            let out = d.cli(&["checkpoint", "pull", "origin/v2"]).await;
            assert!(out.status.success(), "{out:?}\n{}", d.log_text());
            "v1".to_owned()
        } else {
            let events = pull(d, "origin/v2").await;
            let last = events.last().unwrap();
            assert_eq!(last["type"], "complete", "{events:?}\n{}", d.log_text());
            assert_eq!(
                last["pull"]["objects"], remote_objects,
                "all fetched: {last}"
            );
            last["id"].as_str().unwrap().to_owned()
        };
        let got: Value = get_json(d, &format!("/v1/checkpoints/{id}")).await;
        assert_eq!(got["imported_from"]["sprite"], "origin", "{got}");
        assert_eq!(got["imported_from"]["id"], "v2", "{got}");
        assert_eq!(got["comment"], "second");
        restore_with_memory(d, &id, "counter").await;
        assert_eq!(common::tree(&d.env_root()), tree_at_v2, "the tree at v2");
        let value = ask(d, "counter", pid).await;
        assert!(
            value >= low,
            "continues from the checkpoint: {value} < {low}"
        );
        // Each object once in the local store.
        let local = local_objects(d);
        let mut unique = local.clone();
        unique.dedup();
        assert_eq!(local, unique);
        assert!(local.len() as u64 >= remote_objects);
    }
    // Independent copies: a change in one is not in the others.
    write(&forks[0].env_root(), "mine", b"fork 1 only");
    assert!(!forks[1].env_root().join("mine").exists());
    let host: Vec<i32> =
        futures_util::future::join_all(forks.iter().map(|d| d.host_pid(pid))).await;
    assert!(host[0] != host[1] && host[1] != host[2], "{host:?}");

    // Pulling again moves nothing: every object is here.
    let events = pull(&forks[0], "origin/v2").await;
    let last = events.last().unwrap();
    assert_eq!(last["type"], "complete", "{events:?}");
    assert_eq!(last["pull"]["objects"], 0, "{last}");
}

/// Acceptance 5: a byte changed in the bucket makes the pull fail naming
/// the object, and nothing is kept; wrong credentials fail the upload with
/// the store's reason while the daemon works on.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root, CRIU and SeaweedFS (scripts/setup.sh)"
)]
async fn a_corrupted_object_fails_the_pull_and_wrong_keys_fail_the_upload() {
    let what = "a_corrupted_object_fails_the_pull_and_wrong_keys_fail_the_upload";
    let store = weed::for_test(what).await;
    let a = Daemon::start_with(store.sprite("team", "alpha")).await;
    write(&a.env_root(), "big", &noise(7, 256 << 10));
    a.checkpoint("to corrupt").await;
    push(&a, "v1").await;
    // The object of `big`: the only one of its size.
    let (key, _) = store
        .keys()
        .await
        .into_iter()
        .find(|(k, s)| k.starts_with("team/objects/") && *s == 256 << 10)
        .expect("the file's object");
    {
        use object_store::ObjectStore;
        let s3 = store.client();
        let path = object_store::path::Path::from(key.as_str());
        let mut data = s3.get(&path).await.unwrap().bytes().await.unwrap().to_vec();
        data[1000] ^= 1;
        s3.put(&path, data.into()).await.unwrap();
    }
    let b = Daemon::start_with(store.sprite("team", "beta")).await;
    let events = pull(&b, "alpha/v1").await;
    let last = events.last().unwrap();
    assert_eq!(last["type"], "error", "{events:?}");
    let object = key.trim_start_matches("team/");
    let message = last["error"].as_str().unwrap();
    assert!(message.contains(object), "names {object}: {message}");
    assert!(message.contains("SHA-256"), "{message}");
    let list: Vec<Value> = get_json(&b, "/v1/checkpoints").await;
    assert!(list.is_empty(), "nothing imported: {list:?}");
    let tmp: Vec<_> = std::fs::read_dir(b.state_dir.join("store/tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(tmp.is_empty(), "no temp files remain: {tmp:?}");
    // No such record, a bad name: plain errors before any stream.
    assert_eq!(
        call(
            &b,
            reqwest::Method::POST,
            "/v1/remote/checkpoints/alpha/v9/pull"
        )
        .await,
        404
    );
    assert_eq!(
        call(
            &b,
            reqwest::Method::POST,
            "/v1/remote/checkpoints/..x/v1/pull"
        )
        .await,
        400
    );

    // Wrong keys: the upload fails with the store's reason; the daemon works.
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = wrong\n",
            weed::ACCESS_KEY
        ),
    )
    .unwrap();
    let mut flags = store.flags("team");
    let at = flags
        .iter()
        .position(|f| f == "--remote-credentials")
        .unwrap();
    flags[at + 1] = creds.display().to_string();
    let c = Daemon::start_with(Options {
        extra: flags,
        name: Some("gamma".into()),
        ..Default::default()
    })
    .await;
    c.checkpoint("cannot go up").await;
    let events = c
        .post_stream("/v1/checkpoints/v1/push")
        .await
        .until(|e| e["type"] == "error" || e["remote"]["retrying"] == true)
        .await;
    let last = events.last().unwrap();
    let reason = last["remote"]["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("SignatureDoesNotMatch") || reason.contains("403"),
        "{last}"
    );
    assert!(c.status().await["remote"]["last_error"].is_string());
    c.checkpoint("the daemon works on").await;
}

/// The object ids a record in the bucket names (read with the test's client).
async fn record_objects(store: &Weed, key: &str) -> std::collections::BTreeSet<String> {
    use object_store::ObjectStore;
    let got = store
        .client()
        .get(&object_store::path::Path::from(key))
        .await
        .unwrap_or_else(|e| panic!("{key}: {e}"));
    let record: Value = serde_json::from_slice(&got.bytes().await.unwrap()).unwrap();
    record["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o[0].as_str().unwrap().to_owned())
        .collect()
}

/// Acceptance 6: alpha's records deleted, `remote gc` removes what only
/// alpha used and keeps what beta's checkpoints still reference; beta's
/// checkpoint still pulls. While a gc holds the lock, an upload waits.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root, CRIU and SeaweedFS (scripts/setup.sh)"
)]
async fn remote_gc_keeps_what_other_sprites_use_and_uploads_wait_for_it() {
    let what = "remote_gc_keeps_what_other_sprites_use_and_uploads_wait_for_it";
    let store = weed::for_test(what).await;
    let opts = |name: &str| store.sprite("team", name);
    let (a, b) = (
        Daemon::start_with(opts("alpha")).await,
        Daemon::start_with(opts("beta")).await,
    );
    for d in [&a, &b] {
        write(&d.env_root(), "shared", &noise(1, 100 << 10));
    }
    write(&a.env_root(), "alpha-only", &noise(2, 100 << 10));
    write(&b.env_root(), "beta-only", &noise(3, 100 << 10));
    for d in [&a, &b] {
        d.checkpoint("one").await;
        push(d, "v1").await;
    }
    let alpha = record_objects(&store, "team/sprites/alpha/checkpoints/v1.json").await;
    let beta = record_objects(&store, "team/sprites/beta/checkpoints/v1.json").await;
    let only_alpha: Vec<&String> = alpha.difference(&beta).collect();
    assert!(!only_alpha.is_empty());
    assert!(alpha.intersection(&beta).count() > 0, "the shared file");
    let leases: Vec<_> = store
        .keys()
        .await
        .into_iter()
        .filter(|(k, _)| k.starts_with("team/leases/"))
        .collect();
    assert!(leases.is_empty(), "uploads remove their leases: {leases:?}");

    // A dry run and a gc with the default grace remove nothing yet.
    assert_eq!(
        call(
            &a,
            reqwest::Method::DELETE,
            "/v1/remote/checkpoints/alpha/v1"
        )
        .await,
        204
    );
    let out = a.cli(&["remote", "gc", "--dry-run", "--grace", "0s"]).await;
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["deleted"], only_alpha.len() as u64, "{report}");
    let out = a.cli(&["remote", "gc"]).await;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["deleted"], 0, "all younger than an hour: {report}");
    assert_eq!(report["young"], only_alpha.len() as u64, "{report}");

    let out = a.cli(&["remote", "gc", "--grace", "0s"]).await;
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["deleted"], only_alpha.len() as u64, "{report}");
    let left: std::collections::BTreeSet<String> = store
        .keys()
        .await
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix("team/objects/").map(str::to_owned))
        .collect();
    assert_eq!(left, beta, "exactly beta's objects stay");
    assert!(!store.keys().await.iter().any(|(k, _)| k == "team/gc.lock"));
    let r = a
        .req(
            reqwest::Method::POST,
            "/v1/remote/gc",
            Some(serde_json::json!({"grace": "soon"})),
        )
        .await;
    assert_eq!(r.status(), 400);

    // Beta's checkpoint is whole: a new sprite pulls it.
    let c = Daemon::start_with(opts("gamma")).await;
    let events = pull(&c, "beta/v1").await;
    assert_eq!(events.last().unwrap()["type"], "complete", "{events:?}");

    // A gc holds the lock: an upload waits (retrying), then completes.
    {
        use object_store::ObjectStore;
        store
            .client()
            .put(&object_store::path::Path::from("team/gc.lock"), "{}".into())
            .await
            .unwrap();
    }
    a.checkpoint("two").await;
    let mut s = a.post_stream("/v1/checkpoints/v2/push").await;
    let events = s.until(|e| e["remote"]["retrying"] == true).await;
    let reason = events.last().unwrap()["remote"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("remote gc is running"), "{reason}");
    {
        use object_store::ObjectStore;
        store
            .client()
            .delete(&object_store::path::Path::from("team/gc.lock"))
            .await
            .unwrap();
    }
    let events = s
        .until(|e| e["type"] == "complete" || e["type"] == "error")
        .await;
    assert_eq!(events.last().unwrap()["type"], "complete", "{events:?}");
    let now = record_objects(&store, "team/sprites/alpha/checkpoints/v2.json").await;
    let present: std::collections::BTreeSet<String> = store
        .keys()
        .await
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix("team/objects/").map(str::to_owned))
        .collect();
    assert!(
        now.is_subset(&present),
        "every object of the new record is there"
    );
}

/// Writes `n` files of 4 MiB, each different (pseudo-random, a counter in
/// front): a checkpoint whose upload takes a while.
fn bulk(root: &std::path::Path, dir: &str, n: u64) {
    let base = noise(77, 4 << 20);
    for i in 0..n {
        let mut data = base.clone();
        data[..8].copy_from_slice(&i.to_le_bytes());
        write(root, &format!("{dir}/{i:03}.bin"), &data);
    }
}

/// Watches the bucket until stopped: every record seen must have all its
/// objects in the bucket (records listed first, then objects, so a record
/// seen at one moment is checked against objects listed later: nothing
/// is deleted in these tests). Returns how many rounds it made.
fn watch_records(
    store: &Weed,
    prefix: &'static str,
) -> (
    tokio::task::JoinHandle<usize>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use futures_util::StreamExt;
    use object_store::ObjectStore;
    let s3 = store.client();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let task = tokio::spawn(async move {
        let mut rounds = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let list = |p: String| {
                let s3 = &s3;
                async move {
                    let p = object_store::path::Path::from(p);
                    s3.list(Some(&p))
                        .filter_map(|r| async move { r.ok().map(|m| m.location.to_string()) })
                        .collect::<Vec<_>>()
                        .await
                }
            };
            let records = list(format!("{prefix}/sprites")).await;
            let mut named = Vec::new();
            for key in &records {
                let Ok(got) = s3.get(&object_store::path::Path::from(key.as_str())).await else {
                    continue; // (a list can race a gateway hiccup; the next round sees it)
                };
                let Ok(bytes) = got.bytes().await else {
                    continue;
                };
                let record: Value = serde_json::from_slice(&bytes).expect("a whole record");
                for o in record["objects"].as_array().unwrap() {
                    named.push((key.clone(), o[0].as_str().unwrap().to_owned()));
                }
            }
            let objects: std::collections::HashSet<String> = list(format!("{prefix}/objects"))
                .await
                .into_iter()
                .collect();
            if !objects.is_empty() || !named.is_empty() {
                for (record, o) in &named {
                    assert!(
                        objects.contains(&format!("{prefix}/objects/{o}")),
                        "{record} names {o}, which the bucket does not have"
                    );
                }
            }
            rounds += 1;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        rounds
    });
    (task, stop)
}

/// Acceptance 4, a daemon killed mid-upload: after the restart the upload
/// resumes and completes, and at no moment does the bucket hold a record
/// whose objects are missing.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root, CRIU and SeaweedFS (scripts/setup.sh)"
)]
async fn a_daemon_killed_mid_upload_resumes_it_and_no_record_lacks_an_object() {
    let what = "a_daemon_killed_mid_upload_resumes_it_and_no_record_lacks_an_object";
    let store = weed::for_test(what).await;
    let state = tempfile::tempdir().unwrap();
    let opts = || common::Options {
        state_dir: Some(state.path().join("state")),
        ..store.sprite("team", "alpha")
    };
    let (watcher, stop) = watch_records(&store, "team");
    let mut a = Daemon::start_with(opts()).await;
    bulk(&a.env_root(), "bulk", 64);
    a.checkpoint("big").await;
    let mut s = a.post_stream("/v1/checkpoints/v1/push").await;
    let events = s
        .until(|e| e["remote"]["objects"].as_u64().unwrap_or(0) >= 2 || e["type"] == "complete")
        .await;
    let last = events.last().unwrap().clone();
    assert_eq!(
        last["remote"]["state"], "uploading",
        "caught mid-upload: {last}"
    );
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    let keys = store.keys().await;
    assert!(
        !keys.iter().any(|(k, _)| k.starts_with("team/sprites/")),
        "no record before the upload completes"
    );
    let sent_before = keys
        .iter()
        .filter(|(k, _)| k.starts_with("team/objects/"))
        .count();
    drop(a);

    let b = Daemon::start_with(opts()).await;
    b.log_shows("resuming an upload").await;
    let done = push(&b, "v1").await;
    assert!(
        done["present"].as_u64().unwrap() >= sent_before as u64 - 8,
        "what went up before the kill is not sent again: {done}"
    );
    let listed: Vec<Value> = get_json(&b, "/v1/remote/checkpoints").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(watcher.await.unwrap() > 0, "the watcher looked");
}

/// Acceptance 4, a volume server killed mid-upload in a cluster (master,
/// two volume servers with replication, filer, S3 gateway): the upload
/// retries and completes once the server is back (or, failed for good,
/// on the next push); meanwhile a pull of an earlier checkpoint works
/// from the replicas, and no record ever lacks an object.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root, CRIU and SeaweedFS (scripts/setup.sh)"
)]
async fn a_volume_server_killed_mid_upload_and_pulls_still_work() {
    let what = "a_volume_server_killed_mid_upload_and_pulls_still_work";
    assert!(privileged(what), "{what}: needs root");
    let bin = weed::required(what);
    let mut cluster = weed::Cluster::start(&bin).await;
    let store = &cluster.s3;
    let a = Daemon::start_with(store.sprite("team", "alpha")).await;
    let b = Daemon::start_with(store.sprite("team", "beta")).await;
    let (watcher, stop) = watch_records(store, "team");
    bulk(&a.env_root(), "first", 4);
    a.checkpoint("small").await;
    push(&a, "v1").await;
    bulk(&a.env_root(), "second", 64);
    a.checkpoint("big").await;
    let mut s = a.post_stream("/v1/checkpoints/v2/push").await;
    s.until(|e| e["remote"]["objects"].as_u64().unwrap_or(0) >= 2 || e["type"] == "complete")
        .await;
    cluster.kill_volume(1).await;
    // The upload notices (a try fails) or ends; either way, a pull of v1
    // meanwhile reads the replicas on the live server.
    let seen = s
        .until(|e| {
            e["remote"]["retrying"] == true || e["type"] == "complete" || e["type"] == "error"
        })
        .await;
    let events = pull(&b, "alpha/v1").await;
    assert_eq!(
        events.last().unwrap()["type"],
        "complete",
        "{events:?}\n{}",
        cluster.logs()
    );
    cluster.start_volume(1);
    let end = if seen.last().unwrap()["remote"]["retrying"] == true {
        s.until(|e| e["type"] == "complete" || e["type"] == "error")
            .await
    } else {
        seen
    };
    let last = end.last().unwrap();
    if last["type"] == "error" {
        // Failed for good with the reason; the next push completes it.
        assert!(last["remote"]["error"].is_string(), "{last}");
        push(&a, "v2").await;
    } else {
        assert_eq!(last["type"], "complete", "{end:?}");
    }
    let events = pull(&b, "alpha/v2").await;
    assert_eq!(
        events.last().unwrap()["type"],
        "complete",
        "{events:?}\n{}",
        cluster.logs()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(watcher.await.unwrap() > 0);
}

/// A TCP proxy to `target` that counts the bytes clients send through it
/// (what an upload puts on the wire: bodies and requests).
async fn counting_proxy(target: &str) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let target = target.trim_start_matches("http://").to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let target = target.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                // Counted as it goes: pooled connections live across pushes.
                let up = async {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        count.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (format!("http://{addr}"), sent)
}

/// Acceptance 2: after 1% of a 1 GiB tree changed, the next checkpoint's
/// upload puts at most 1.1× the changed bytes on the wire (counted by a
/// proxy in front of the store, requests and all).
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root, CRIU and SeaweedFS (scripts/setup.sh)"
)]
async fn after_one_percent_of_a_gib_changed_the_upload_moves_about_that() {
    let what = "after_one_percent_of_a_gib_changed_the_upload_moves_about_that";
    let store = weed::for_test(what).await;
    let (endpoint, sent) = counting_proxy(&store.endpoint).await;
    let mut opts = store.sprite("team", "alpha");
    let at = opts
        .extra
        .iter()
        .position(|f| f == "--remote-endpoint")
        .unwrap();
    opts.extra[at + 1] = endpoint;
    let a = Daemon::start_with(opts).await;
    // 1,024 files of 1 MiB, each different.
    let base = noise(5, 1 << 20);
    let file = |i: u64, v: u64| {
        let mut d = base.clone();
        d[..8].copy_from_slice(&i.to_le_bytes());
        d[8..16].copy_from_slice(&v.to_le_bytes());
        d
    };
    for i in 0..1024 {
        write(
            &a.env_root(),
            &format!("tree/{:02}/{i:04}.bin", i % 32),
            &file(i, 0),
        );
    }
    a.checkpoint("1 GiB").await;
    push(&a, "v1").await;
    // 1%: ten files rewritten, scattered.
    let mut changed = 0u64;
    for i in (0..1024).step_by(103).take(10) {
        let d = file(i, 1);
        changed += d.len() as u64;
        write(&a.env_root(), &format!("tree/{:02}/{i:04}.bin", i % 32), &d);
    }
    a.checkpoint("1% changed").await;
    let before = sent.load(std::sync::atomic::Ordering::Relaxed);
    let status = push(&a, "v2").await;
    let wire = sent.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(
        wire as f64 <= 1.1 * changed as f64,
        "{wire} bytes on the wire for {changed} changed: {status}"
    );
    assert!(wire >= changed, "the changed files went up: {wire}");
    eprintln!(
        "uploaded {wire} bytes for {changed} changed ({:.3}×)",
        wire as f64 / changed as f64
    );
}
