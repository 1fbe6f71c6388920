//! Filesystem checkpoints against the real daemon: real overlayfs, real
//! cgroup freezer, real processes (root).

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::{Daemon, Ndjson, Options, privileged, tree};
use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::{Value, json};

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn restore_brings_back_each_tree_exactly() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("restore_brings_back_each_tree_exactly"));
    let d = Daemon::start().await;
    let root = d.env_root();
    write(&root, "keep.txt", b"unchanged");
    write(&root, "edit.txt", b"version one");
    write(&root, "gone.txt", b"to be deleted");
    write(&root, "dir/deep/file", b"deep");
    write(&root, "dir/doomed/x", b"doomed dir");
    let mut sparse = std::fs::File::create(root.join("sparse.img")).unwrap();
    sparse.seek(SeekFrom::Start(256 << 20)).unwrap();
    sparse.write_all(b"tail").unwrap();
    drop(sparse);
    let v1_tree = tree(&root);
    d.checkpoint("v1").await;

    // Modify, delete and add, including the awkward kinds of entry.
    write(&root, "edit.txt", b"version two, longer");
    std::fs::remove_file(root.join("gone.txt")).unwrap();
    std::fs::remove_dir_all(root.join("dir/doomed")).unwrap();
    std::os::unix::fs::symlink("keep.txt", root.join("link")).unwrap();
    write(&root, "attr.txt", b"has an xattr");
    xattr::set(root.join("attr.txt"), "user.sprite", b"value").unwrap();
    write(&root, "pair/a", b"hard-linked pair");
    std::fs::hard_link(root.join("pair/a"), root.join("pair/b")).unwrap();
    write(&root, "secret", b"for uid 1000 only");
    std::fs::set_permissions(root.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    nix::unistd::chown(&root.join("secret"), Some(1000.into()), Some(1000.into())).unwrap();
    let v2_tree = tree(&root);
    assert_ne!(v1_tree, v2_tree);
    let events = d.checkpoint("v2").await;
    // Only what changed was read: the change journal named it.
    assert!(
        events.iter().any(|e| e["data"]
            .as_str()
            .is_some_and(|s| s.contains("named by the change journal"))),
        "{events:?}"
    );

    let events = d.restore("v1").await;
    assert_eq!(events.last().unwrap()["data"], "Restored to v1");
    assert_eq!(tree(&root), v1_tree, "restore of v1");
    let blocks = std::fs::metadata(root.join("sparse.img")).unwrap().blocks();
    assert!(
        blocks * 512 < 1 << 20,
        "the sparse file came back dense ({blocks} blocks)"
    );

    d.restore("v2").await;
    assert_eq!(tree(&root), v2_tree, "restore of v2 after v1");
    let a = std::fs::metadata(root.join("pair/a")).unwrap();
    let b = std::fs::metadata(root.join("pair/b")).unwrap();
    assert_eq!(a.ino(), b.ino(), "the hard-linked pair is still one file");

    // Writes after a restore do not leak into the checkpoint (copy-up).
    write(&root, "keep.txt", b"scribbled over");
    d.restore("v2").await;
    assert_eq!(
        tree(&root),
        v2_tree,
        "a second restore of the same checkpoint"
    );
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn the_chain_records_where_each_checkpoint_came_from() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "the_chain_records_where_each_checkpoint_came_from"
    ));
    let d = Daemon::start().await;
    write(&d.env_root(), "f", b"1");
    d.checkpoint("first").await; // v1
    write(&d.env_root(), "f", b"2");
    d.checkpoint("second").await; // v2, from v1
    d.restore("v1").await; // v3: the automatic checkpoint (undo point)
    write(&d.env_root(), "f", b"3");
    d.checkpoint("branch").await; // v4, from v1

    let auto: Value = d.get("/v1/checkpoints/v3").await.json().await.unwrap();
    assert_eq!(auto["is_auto"], true, "{auto}");
    assert_eq!(auto["comment"], "before restore to v1", "{auto}");
    assert_eq!(auto["source_id"], "v2", "{auto}");
    let v3: Value = d.get("/v1/checkpoints/v4").await.json().await.unwrap();
    assert_eq!(v3["source_id"], "v1");
    assert_eq!(v3["history"][0], "v1");
    assert_eq!(v3["comment"], "branch");
    let v2: Value = d.get("/v1/checkpoints/v2").await.json().await.unwrap();
    assert_eq!(v2["history"], json!(["v1"]));
    let list: Vec<Value> = d.get("/v1/checkpoints").await.json().await.unwrap();
    let ids: Vec<&str> = list.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["v4", "v3", "v2", "v1"], "newest first");
    let from_v1: Vec<Value> = d
        .get("/v1/checkpoints?history=v1")
        .await
        .json()
        .await
        .unwrap();
    let mut ids: Vec<&str> = from_v1.iter().map(|c| c["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["v2", "v3", "v4"]);
    // The external path shape and the browsable roots.
    let via_sprite = d
        .get(&format!("/v1/sprites/{}/checkpoints/v1", common::NAME))
        .await;
    assert_eq!(via_sprite.status(), 200);
    assert_eq!(
        std::fs::read(d.state_dir.join("checkpoints/v2/root/f")).unwrap(),
        b"2"
    );
    assert!(
        std::fs::write(d.state_dir.join("checkpoints/v2/root/f"), b"x").is_err(),
        "browsable roots are read-only"
    );
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_service_keeps_running_through_a_checkpoint() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("a_service_keeps_running_through_a_checkpoint"));
    let d = Daemon::start().await;
    // Writes its counter atomically every 50 ms, in the environment root.
    let script = "i=0; while :; do i=$((i+1)); echo $i > counter.tmp; mv counter.tmp counter; echo $i; sleep 0.05; done";
    let r = d
        .req(
            Method::PUT,
            "/v1/services/counter?duration=30s",
            Some(json!({"cmd": "sh", "args": ["-c", script]})),
        )
        .await;
    let mut s = Ndjson::new(r);
    s.until(|e| e["data"] == "3\n").await;
    drop(s);
    let before = d.service("counter").await["state"].clone();
    let low: u64 = std::fs::read_to_string(d.env_root().join("counter"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let events = d.checkpoint("live").await;
    assert!(
        events.iter().any(|e| e["data"]
            .as_str()
            .is_some_and(|s| s.starts_with("Freezing the environment"))),
        "{events:?}"
    );
    let high: u64 = std::fs::read_to_string(d.env_root().join("counter"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let after = d.service("counter").await["state"].clone();
    assert_eq!(after["pid"], before["pid"], "the service was not restarted");
    assert_eq!(after["status"], "running");
    assert_eq!(after["restart_count"], before["restart_count"]);

    let captured =
        std::fs::read_to_string(d.state_dir.join("checkpoints/v1/root/counter")).unwrap();
    let value: u64 = captured
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("torn counter file: {captured:?}"));
    assert!(
        (low..=high).contains(&value),
        "captured {value}, not between {low} and {high}"
    );
    let meta: Value = d.get("/v1/checkpoints/v1").await.json().await.unwrap();
    assert!(meta["freeze_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(meta["services"], json!(["counter"]));

    // Restoring brings the service back running (with its memory, same
    // pid, when CRIU is there: tests/criu.rs) on the restored files.
    d.restore("v1").await;
    let state = d.service("counter").await["state"].clone();
    assert_eq!(state["status"], "running", "{state}");
    let value: u64 = std::fs::read_to_string(d.env_root().join("counter"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        value >= low,
        "the counter file went back to {value}, before {low}"
    );
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_daemon_killed_mid_capture_leaves_nothing_half_done() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_daemon_killed_mid_capture_leaves_nothing_half_done"
    ));
    let mut d = Daemon::start().await;
    let root = d.env_root();
    // Large enough that the capture takes a while (about 400 MiB, unique content).
    let mut block = vec![0u8; 256 * 1024];
    for i in 0..1600u32 {
        block[..4].copy_from_slice(&i.to_le_bytes());
        write(&root, &format!("big/{}/{i}", i % 16), &block);
    }
    let r = d.req(Method::POST, "/v1/checkpoint", Some(json!({}))).await;
    let mut s = Ndjson::new(r);
    // The first capture reads every file (before freezing): kill it there.
    s.until(|e| {
        e["data"]
            .as_str()
            .is_some_and(|t| t.starts_with("Indexing"))
    })
    .await;
    // While it runs, a second one is refused.
    let busy = d.req(Method::POST, "/v1/checkpoint", Some(json!({}))).await;
    assert_eq!(busy.status(), 409);
    d.signal(Signal::SIGKILL);
    d.wait_exit().await;
    drop(s);

    let state_dir = d.state_dir.clone();
    let d2 = Daemon::start_with(Options {
        state_dir: Some(state_dir.clone()),
        ..Default::default()
    })
    .await;
    let list: Vec<Value> = d2.get("/v1/checkpoints").await.json().await.unwrap();
    let store_tmp = std::fs::read_dir(state_dir.join("store/tmp"))
        .unwrap()
        .count();
    assert_eq!(store_tmp, 0, "temp objects left behind");
    let leftovers: Vec<String> = std::fs::read_dir(state_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    eprintln!(
        "killed {} the capture completed",
        if list.is_empty() { "before" } else { "after" }
    );
    if list.is_empty() {
        // Killed mid-capture: the objects it wrote were collected.
        let objects = walk_count(&state_dir.join("store/objects"));
        assert_eq!(objects, 0, "orphaned objects of the interrupted capture");
    }
    // Either way a new checkpoint and a restore work.
    d2.checkpoint("after crash").await;
    std::fs::remove_dir_all(root.join("big/0")).unwrap();
    let id = d2
        .get("/v1/checkpoints")
        .await
        .json::<Vec<Value>>()
        .await
        .unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    d2.restore(&id).await;
    assert!(root.join("big/0/0").exists());
    // (d2 first: its state dir lives in d's temp dir)
    drop(d2);
    drop(d);
}

fn walk_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk_count(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn conflicts_unknown_ids_and_deletes_that_free_space() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "conflicts_unknown_ids_and_deletes_that_free_space"
    ));
    let d = Daemon::start().await;
    let root = d.env_root();
    write(&root, "small", b"shared by both");
    d.checkpoint("base").await; // v1
    let big: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    write(&root, "big.bin", &big);
    d.checkpoint("with big").await; // v2
    let store = d.state_dir.join("store");
    let before = du(&store);

    assert_eq!(
        d.req(Method::POST, "/v1/checkpoints/v99/restore", None)
            .await
            .status(),
        404
    );
    assert_eq!(
        d.req(Method::GET, "/v1/checkpoints/v99", None)
            .await
            .status(),
        404
    );
    assert_eq!(
        d.req(Method::DELETE, "/v1/checkpoints/v99", None)
            .await
            .status(),
        404
    );
    // The checkpoint the environment descends from cannot go.
    assert_eq!(
        d.req(Method::DELETE, "/v1/checkpoints/v2", None)
            .await
            .status(),
        409
    );

    d.restore("v1").await;
    // (v3, the automatic checkpoint the restore took, holds the big file too)
    for id in ["v2", "v3"] {
        assert_eq!(
            d.req(Method::DELETE, &format!("/v1/checkpoints/{id}"), None)
                .await
                .status(),
            204
        );
    }
    let after = du(&store);
    assert!(
        after + (7 << 20) < before,
        "store did not shrink by the big file: {before} -> {after}"
    );
    assert_eq!(
        d.req(Method::GET, "/v1/checkpoints/v2", None)
            .await
            .status(),
        404
    );
    // The other checkpoint is intact and restorable.
    write(&root, "small", b"scribble");
    d.restore("v1").await;
    assert_eq!(
        std::fs::read(root.join("small")).unwrap(),
        b"shared by both"
    );
    assert!(!root.join("big.bin").exists());

    // Seed 003: background checkpoint with a chosen id, then a restore.
    let r = d
        .req(
            Method::POST,
            "/checkpoint",
            Some(json!({"checkpoint_id": "before-deploy"})),
        )
        .await;
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "checkpoint requested");
    // The daemon is `checkpointing` until it is done; /v1/ready waits for `running`.
    assert_eq!(d.get("/v1/ready").await.status(), 200);
    assert_eq!(d.get("/v1/checkpoints/before-deploy").await.status(), 200);
    let r = d
        .req(
            Method::POST,
            "/checkpoint",
            Some(json!({"checkpoint_id": "../etc"})),
        )
        .await;
    assert_eq!(r.status(), 400);
    let r = d
        .req(
            Method::POST,
            "/restore",
            Some(json!({"checkpoint_id": "nope"})),
        )
        .await;
    assert_eq!(r.status(), 404);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
}

fn du(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let md = std::fs::symlink_metadata(e.path()).unwrap();
                    if md.is_dir() {
                        du(&e.path())
                    } else {
                        md.blocks() * 512
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn sprite_env_checkpoint_commands() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("sprite_env_checkpoint_commands"));
    let d = Daemon::start().await;
    write(&d.env_root(), "note", b"one");
    let out = d.cli(&["checkpoint", "create", "-m", "from the cli"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Checkpoint v1 created"));
    write(&d.env_root(), "note", b"two");
    let list: Vec<Value> =
        serde_json::from_slice(&d.cli(&["checkpoint", "list"]).await.stdout).unwrap();
    assert_eq!(list[0]["comment"], "from the cli");
    let out = d.cli(&["checkpoint", "restore", "v1"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("Restored to v1"));
    assert_eq!(std::fs::read(d.env_root().join("note")).unwrap(), b"one");
    let out = d.cli(&["checkpoint", "get", "v7"]).await;
    assert_eq!(
        out.status.code(),
        Some(sprited::cli::EXIT_HTTP_ERROR as i32)
    );
}

/// A minimal OS tree: `/bin/sh`, `/bin/sleep` and the libraries `ldd` names.
fn base_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sprited-base-")
        .tempdir()
        .unwrap()
}

/// Runs `script` with `sh -c` inside the environment through the CLI's
/// `exec`; returns its stdout (panics with its stderr on failure).
async fn sh(d: &Daemon, script: &str) -> String {
    let out = d.cli(&["exec", "--", "sh", "-c", script]).await;
    assert!(
        out.status.success(),
        "{script}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The environment is the machine: `/` of a command is the environment's
/// overlay (an OS tree), not the host's. Writes anywhere (as root) land in
/// the checkpoint and a restore rolls them back; the host is untouched.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn writes_anywhere_are_captured_and_rolled_back() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("writes_anywhere_are_captured_and_rolled_back"));
    let d = Daemon::start().await;
    let tag = format!("sprited-test-{}", std::process::id());
    let paths = [
        "/etc/motd.d/x",
        "/usr/local/bin/tool",
        "/home/u/file",
        "/tmp/y",
    ];
    let mut write = String::new();
    for p in paths {
        write.push_str(&format!("mkdir -p $(dirname {p}); echo {tag} > {p}; "));
    }
    sh(&d, &write).await;
    // A device node on the root (as a hostile layer could bring: nothing
    // inside can make one) opens nothing: the root is mounted nodev.
    nix::sys::stat::mknod(
        &d.env_root().join("planted"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    // A Debian userland with its own /proc, /dev and the API inside.
    let facts = sh(
        &d,
        "cat /etc/debian_version >/dev/null && echo debian; test -c /dev/null && echo dev; \
         cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; \
         sprite-env services list >/dev/null && echo api; \
         echo x > /.sprite/x 2>/dev/null || echo sprite-ro; \
         test -c /planted && { head -c0 /planted 2>/dev/null && echo planted-opens || echo planted-inert; }",
    )
    .await;
    for want in [
        "debian",
        "dev",
        "sprited __env-init",
        common::NAME,
        "api",
        "sprite-ro",
        "planted-inert",
    ] {
        assert!(facts.contains(want), "{want:?} missing from {facts:?}");
    }
    d.checkpoint("written").await;
    sh(
        &d,
        "rm -rf /etc/motd.d/x /usr/local/bin/tool /home/u /tmp/y; echo other > /etc/other; echo z > /tmp/z",
    )
    .await;
    d.restore("v1").await;
    let after = sh(
        &d,
        &format!(
            "for p in {}; do cat $p; done; test -e /etc/other || echo no-other; test -e /tmp/z || echo no-z",
            paths.join(" ")
        ),
    )
    .await;
    assert_eq!(
        after,
        format!("{tag}\n{tag}\n{tag}\n{tag}\nno-other\nno-z\n"),
        "the environment is not exactly the checkpoint's tree"
    );
    // Nothing reached the host (outside the state dir).
    for p in paths {
        let host = std::fs::read_to_string(p).unwrap_or_default();
        assert!(!host.contains(&tag), "{p} was written on the host");
    }
    for (p, inside) in [("/etc/other", "other\n"), ("/tmp/z", "z\n")] {
        let host = std::fs::read_to_string(p).unwrap_or_default();
        assert_ne!(host, inside, "{p} was written on the host");
    }
    // A service's log is where the API says, inside.
    let events = d
        .put_service(
            "hello",
            json!({"cmd": "sh", "args": ["-c", "echo hello-log; sleep 1000"]}),
            "1s",
        )
        .await;
    let log = events.last().unwrap()["log_files"]["stdout"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(log, "/.sprite/logs/services/hello.log");
    assert!(sh(&d, &format!("cat {log}")).await.contains("hello-log"));
    // The checkpoints are readable inside, and read-only.
    let views = sh(
        &d,
        "test -r /.sprite/checkpoints/v1/meta.json && echo readable; \
         touch /.sprite/checkpoints/v1/x 2>/dev/null || echo read-only",
    )
    .await;
    assert_eq!(views, "readable\nread-only\n");
    // And the API from inside can take one, processes included (the
    // caller's own connection to the API is dumped as external).
    let inside = sh(&d, "sprite-env checkpoint create -m inside").await;
    assert!(
        inside.contains("Dumped the environment") && !inside.contains("\"error\""),
        "{inside}"
    );
    assert_eq!(d.get("/v1/checkpoints/v2").await.status(), 200);
    // Its browsable root holds the device node, inert there too (where
    // the host's mounts propagate, the environment sees these roots).
    let planted = d.state_dir.join("checkpoints/v2/root/planted");
    assert!(
        std::fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_char_device()
    );
    let opened = std::fs::File::open(&planted);
    assert_eq!(
        opened.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::PermissionDenied),
        "mounted nodev"
    );
    let events = d.restore("v2").await;
    assert!(!events.iter().any(|e| e["type"] == "error"), "{events:?}");
}

/// An environment that cannot be set up (here a file where `/proc` must be
/// mounted) starts no service, rather than running it on the host.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn an_environment_that_cannot_start_runs_nothing_on_the_host() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "an_environment_that_cannot_start_runs_nothing_on_the_host"
    ));
    let base = base_dir();
    std::fs::write(base.path().join("proc"), b"not a directory").unwrap();
    let d = Daemon::start_with(Options {
        extra: vec!["--env-base".into(), base.path().display().to_string()],
        ..Default::default()
    })
    .await;
    let marker = base.path().join("ran-on-the-host");
    let events = d
        .put_service(
            "jail",
            json!({"cmd": "touch", "args": [marker.display().to_string()]}),
            "1s",
        )
        .await;
    assert!(
        events.iter().any(|e| e["type"] == "error"
            && e["data"]
                .as_str()
                .is_some_and(|s| s.contains("environment is unavailable"))),
        "{events:?}"
    );
    let st = d.service("jail").await["state"].clone();
    assert_ne!(st["status"], "running", "{st}");
    assert!(!marker.exists(), "the service ran outside the environment");
    assert!(d.log_text().contains("mount proc"), "the reason is logged");
}

/// The root is the user's tree (an imported layer, a file request's
/// change), and a mount follows a symlink: with `/.sprite` a symlink to a
/// directory that exists on the host, the daemon's binds would land there
/// and PID 1 would exec the tree's own `<that dir>/bin/sprited` with every
/// capability. An environment whose mountpoint is not a directory does
/// not start, and nothing of the tree runs.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_symlink_where_the_environment_mounts_runs_nothing() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_symlink_where_the_environment_mounts_runs_nothing"
    ));
    let mut d = Daemon::start().await;
    d.signal(Signal::SIGTERM);
    d.wait_exit().await;
    let upper = std::fs::read_dir(d.state_dir.join("env"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("upper-")
        })
        .unwrap();
    // A directory of the host, and the same path in the tree with a
    // program that leaves evidence when it runs.
    let host = tempfile::Builder::new()
        .prefix("sprited-elsewhere-")
        .tempdir()
        .unwrap();
    let planted = upper.join(host.path().strip_prefix("/").unwrap());
    std::fs::create_dir_all(planted.join("bin")).unwrap();
    let fake = planted.join("bin/sprited");
    std::fs::write(&fake, "#!/bin/sh\necho ran > /evidence\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = std::fs::remove_dir_all(upper.join(".sprite"));
    std::os::unix::fs::symlink(host.path(), upper.join(".sprite")).unwrap();

    let d2 = Daemon::start_with(Options {
        state_dir: Some(d.state_dir.clone()),
        ..Default::default()
    })
    .await;
    let events = d2.put_service("jail", json!({"cmd": "true"}), "1s").await;
    assert!(
        events.iter().any(|e| e["type"] == "error"
            && e["data"]
                .as_str()
                .is_some_and(|s| s.contains("environment is unavailable"))),
        "{events:?}"
    );
    assert!(
        !upper.join("evidence").exists(),
        "the tree's program ran as the environment's init"
    );
    assert!(
        d2.log_text().contains("mount .sprite"),
        "the reason is logged"
    );
    drop(d2);
}

#[tokio::test]
async fn a_base_containing_the_state_dir_is_refused() {
    let (status, log) = common::spawn(Options {
        extra: vec!["--env-base".into(), "/".into()],
        ..Default::default()
    })
    .exits()
    .await;
    assert!(!status.success());
    assert!(log.contains("contains the state dir"), "{log}");
}

/// Random edits of every kind (writes, deletes, renames, whole dirs removed,
/// symlinks, modes, xattrs) over many checkpoints, with restores in between
/// so later edits land on top of a layer (whiteouts, opaque dirs). Every
/// checkpoint must restore to exactly the tree it was taken of. (In this
/// debug build the daemon also checks each capture's incremental manifest
/// update against a full merge.)
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn random_edits_over_many_checkpoints_all_restore_exactly() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "random_edits_over_many_checkpoints_all_restore_exactly"
    ));
    let d = Daemon::start().await;
    // Under one dir of the environment (its OS tree stays as it is), which
    // the edits may remove too.
    let root = d.env_root().join("work");
    std::fs::create_dir_all(&root).unwrap();
    let tree = |r: &Path| {
        if r.exists() {
            tree(r)
        } else {
            Default::default()
        }
    };
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let dirs = ["", "a", "a/x", "b", "b/y/z"];
    let mut taken: Vec<(String, std::collections::BTreeMap<String, String>)> = Vec::new();
    for round in 0..14u64 {
        for op in 0..25u64 {
            let dir = root.join(dirs[next(dirs.len() as u64) as usize]);
            let file = dir.join(format!("f{}", next(6)));
            let other = root
                .join(dirs[next(dirs.len() as u64) as usize])
                .join(format!("f{}", next(6)));
            // Edits may fail (a missing parent, a file where a dir is): fine.
            let _ = match next(9) {
                0 | 1 => std::fs::create_dir_all(&dir).and_then(|_| {
                    std::fs::write(&file, format!("{round}.{op}").repeat(1 + op as usize))
                }),
                2 => std::fs::remove_file(&file),
                3 => std::fs::rename(&file, &other),
                4 => std::fs::remove_dir_all(&dir).and(Ok(())),
                5 => std::fs::remove_file(&file)
                    .or(Ok(()))
                    .and_then(|_| std::os::unix::fs::symlink(format!("t{op}"), &file)),
                6 => std::fs::set_permissions(
                    &file,
                    std::fs::Permissions::from_mode(0o600 + next(0o100) as u32),
                ),
                7 => xattr::set(&file, "user.k", format!("{round}").as_bytes()),
                _ => std::fs::create_dir_all(&dir),
            };
        }
        let events = d.checkpoint(&format!("round {round}")).await;
        // (restores take automatic checkpoints too: the id is the one reported)
        let id = events.last().unwrap()["data"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned();
        taken.push((id, tree(&root)));
        if round % 4 == 3 {
            let (id, want) = &taken[next(taken.len() as u64) as usize];
            d.restore(id).await;
            assert_eq!(&tree(&root), want, "restore of {id} mid-way");
        }
    }
    for (id, want) in &taken {
        d.restore(id).await;
        assert_eq!(&tree(&root), want, "restore of {id}");
    }
    // Both ways of building a manifest were exercised.
    let log = d.log_text();
    for way in ["incremental=true", "incremental=false"] {
        assert!(log.contains(way), "no capture merged with {way}");
    }
}

/// A layer dir is a cache: when the mounted one is deleted while the daemon
/// is down, the next start builds it again from the store.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_missing_layer_dir_is_rebuilt_at_start() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("a_missing_layer_dir_is_rebuilt_at_start"));
    let mut d = Daemon::start().await;
    write(&d.env_root(), "kept/file", b"from v1");
    d.checkpoint("v1").await;
    d.restore("v1").await; // v1's layer is now the mounted lower dir
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit().await.success());
    let state_dir = d.state_dir.clone();
    std::fs::remove_dir_all(state_dir.join("layers/v1")).unwrap();
    let d2 = Daemon::start_with(Options {
        state_dir: Some(state_dir.clone()),
        ..Default::default()
    })
    .await;
    assert_eq!(
        std::fs::read(d2.env_root().join("kept/file")).unwrap(),
        b"from v1",
        "{}",
        d2.log_text()
    );
    assert!(d2.log_text().contains("rebuilding it"));
    d2.checkpoint("after").await;
}

/// A clean shutdown saves what the scans learned: the first capture of the
/// next run does not read and store the whole tree again.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn the_scan_cache_survives_a_clean_restart() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("the_scan_cache_survives_a_clean_restart"));
    let mut d = Daemon::start().await;
    for i in 0..50 {
        write(
            &d.env_root(),
            &format!("many/{i}"),
            format!("file {i}").as_bytes(),
        );
    }
    let first = d.checkpoint("v1").await;
    let indexing = |evs: &[Value]| {
        evs.iter().any(|e| {
            e["data"]
                .as_str()
                .is_some_and(|s| s.starts_with("Indexing"))
        })
    };
    assert!(
        indexing(&first),
        "the first capture reads everything: {first:?}"
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit().await.success());
    let state_dir = d.state_dir.clone();
    assert!(state_dir.join("env/scan-cache.zst").exists());
    let d2 = Daemon::start_with(Options {
        state_dir: Some(state_dir.clone()),
        ..Default::default()
    })
    .await;
    assert!(
        !state_dir.join("env/scan-cache.zst").exists(),
        "consumed at start"
    );
    write(&d2.env_root(), "many/7", b"changed after the restart");
    let second = d2.checkpoint("v2").await;
    assert!(!indexing(&second), "the cache was loaded: {second:?}");
    std::fs::remove_file(d2.env_root().join("many/8")).unwrap();
    d2.restore("v2").await;
    assert_eq!(
        std::fs::read(d2.env_root().join("many/7")).unwrap(),
        b"changed after the restart"
    );
    assert_eq!(
        std::fs::read(d2.env_root().join("many/8")).unwrap(),
        b"file 8"
    );
}
