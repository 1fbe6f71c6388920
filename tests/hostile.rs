//! Requests and connections that used to crash or hang the daemon (issue
//! 16): each gets a clean 4xx or is dropped within its deadline, and the
//! daemon stays up and keeps serving.

mod common;

use std::os::fd::OwnedFd;
use std::path::Path;

use common::{Daemon, privileged};
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, mkdirat};
use reqwest::Method;
use serde_json::{Value, json};

/// A chain of `depth` nested dirs `root/name/d/d/…`, made one level at a
/// time through fds (no path gets long).
fn deep_chain(root: &Path, name: &str, depth: usize) {
    std::fs::create_dir(root.join(name)).unwrap();
    let mut fd: OwnedFd = std::fs::File::open(root.join(name)).unwrap().into();
    for _ in 1..depth {
        mkdirat(&fd, "d", Mode::from_bits_truncate(0o755)).unwrap();
        fd = openat(
            &fd,
            "d",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
    }
}

/// Takes the chain apart top-down (each child moved up, its parent
/// removed), so nothing recurses 12,000 levels deep to clean it up.
fn dismantle(root: &Path, name: &str) {
    let mut cur = root.join(name);
    for i in 0.. {
        let child = cur.join("d");
        if child.exists() {
            let next = root.join(format!(".dismantle-{i}"));
            std::fs::rename(&child, &next).unwrap();
            std::fs::remove_dir(&cur).unwrap();
            cur = next;
        } else {
            std::fs::remove_dir(&cur).unwrap();
            return;
        }
    }
}

/// Resets a process's peak-memory mark (`VmHWM`).
fn reset_peak(pid: i32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// The daemon still serves: an exec and a checkpoint work.
async fn still_serves(d: &Daemon) {
    let out = d.cli(&["exec", "--", "echo", "alive"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alive\n");
    let events = d.checkpoint("still here").await;
    assert!(!events.is_empty());
}

async fn post(d: &Daemon, path: &str, body: Value) -> (u16, Value) {
    let r = d.req(Method::POST, path, Some(body)).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_copy_into_itself_through_a_symlink_is_refused() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_copy_into_itself_through_a_symlink_is_refused"
    ));
    let d = Daemon::start().await;
    let root = d.env_root();
    std::fs::create_dir_all(root.join("a/inner")).unwrap();
    std::fs::write(root.join("a/inner/f"), b"x").unwrap();
    std::os::unix::fs::symlink("a", root.join("lnk")).unwrap();
    let (status, body) = post(
        &d,
        "/v1/fs/copy",
        json!({"source": "/a", "dest": "/lnk/x", "recursive": true}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("into itself"),
        "{body}"
    );
    assert!(!root.join("a/x").exists(), "nothing was copied");
    // A copy beside it works.
    let (status, _) = post(
        &d,
        "/v1/fs/copy",
        json!({"source": "/a", "dest": "/b", "recursive": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(std::fs::read(root.join("b/inner/f")).unwrap(), b"x");
    still_serves(&d).await;
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn recursive_operations_on_a_12000_deep_tree_are_refused_in_bounded_memory() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "recursive_operations_on_a_12000_deep_tree_are_refused_in_bounded_memory"
    ));
    let d = Daemon::start().await;
    let root = d.env_root();
    deep_chain(&root, "deep", 12_000);
    let pid = d.pid();
    let idle = {
        reset_peak(pid);
        common::status_kib(pid, "VmHWM:")
    };
    for (m, path, body) in [
        (
            Method::POST,
            "/v1/fs/copy",
            json!({"source": "/deep", "dest": "/copy", "recursive": true}),
        ),
        (
            Method::POST,
            "/v1/fs/chmod",
            json!({"path": "/deep", "mode": "0700", "recursive": true}),
        ),
        (
            Method::DELETE,
            "/v1/fs/delete",
            json!({"path": "/deep", "recursive": true}),
        ),
    ] {
        let r = d.req(m, path, Some(body)).await;
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 400, "{path}: {v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("deeper than 256 levels"),
            "{path}: {v}"
        );
    }
    assert!(
        root.join("deep/d/d").exists(),
        "a refused delete changed nothing"
    );
    assert!(!root.join("copy").exists(), "a refused copy wrote nothing");
    // A checkpoint still completes: everything down to the depth limit is
    // in it, and what lies deeper is reported, not silently dropped.
    let events = d.checkpoint("with a 12,000-deep tree").await;
    let errors: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "error")
        .filter_map(|e| e["error"].as_str().or(e["data"].as_str()))
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("deeper than 1024 levels")),
        "{events:?}"
    );
    let meta: Value = d.get("/v1/checkpoints/v1").await.json().await.unwrap();
    assert_eq!(meta["health"], "partial", "{meta}");
    assert_eq!(meta["skipped_count"], 1, "{meta}");
    assert!(
        meta["skipped"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("/deep/d/d"),
        "{meta}"
    );
    let out = d.cli(&["exec", "--", "echo", "alive"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alive\n");
    let peak = common::status_kib(pid, "VmHWM:");
    assert!(
        peak < idle + 64 * 1024,
        "the daemon's peak memory grew by {} KiB",
        peak - idle
    );
    dismantle(&root, "deep");
    still_serves(&d).await;
    let meta: Value = d.get("/v1/checkpoints/v2").await.json().await.unwrap();
    assert_eq!(meta["health"], "ok", "{meta}");
}

/// Makes, inside the environment, `/tmp/<25 dirs of 201-byte names>/`
/// (a path of about 5,000 bytes) holding a file, a symlink and a fifo;
/// or (with `check`) prints what is there.
const LONG_PATH: &str = r#"
import os, stat, sys
os.chdir('/tmp')
for i in range(25):
    n = '%02d' % i + 'x' * 199
    if sys.argv[1] == 'make':
        os.mkdir(n, 0o750)
    os.chdir(n)
if sys.argv[1] == 'make':
    with open('f', 'w') as f:
        f.write('at the bottom')
    os.chmod('f', 0o640)
    os.setxattr('f', 'user.k', b'v')
    os.symlink('f', 's')
    os.mkfifo('p', 0o600)
    print(len(os.getcwd()))
else:
    st = os.stat('f')
    print(open('f').read(), oct(st.st_mode & 0o7777), os.getxattr('f', 'user.k'),
          os.readlink('s'), stat.S_ISFIFO(os.lstat('p').st_mode),
          oct(os.stat('.').st_mode & 0o7777))
"#;

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_5000_byte_path_is_captured_and_restored_exactly() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_5000_byte_path_is_captured_and_restored_exactly"
    ));
    let d = Daemon::start().await;
    let run = |arg: &'static str| {
        let d = &d;
        async move {
            let out = d
                .cli(&["exec", "--", "python3", "-c", LONG_PATH, arg])
                .await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let len: usize = run("make").await.trim().parse().unwrap();
    assert!(len > 5000, "{len}");
    let before = run("check").await;
    assert_eq!(before, "at the bottom 0o640 b'v' f True 0o750\n");
    let events = d.checkpoint("long path").await;
    assert!(!events.iter().any(|e| e["type"] == "error"), "{events:?}");
    let meta: Value = d.get("/v1/checkpoints/v1").await.json().await.unwrap();
    assert_eq!(meta["health"], "ok", "{meta}");
    // Gone, then back exactly with the restore.
    let out = d
        .cli(&[
            "exec",
            "--",
            "python3",
            "-c",
            "import shutil; shutil.rmtree('/tmp/00' + 'x' * 199)",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.restore("v1").await;
    assert_eq!(run("check").await, before);
    // And a checkpoint of the restored tree holds it again.
    let events = d.checkpoint("again").await;
    assert!(!events.iter().any(|e| e["type"] == "error"), "{events:?}");
    still_serves(&d).await;
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn copies_onto_fifos_are_refused_at_once_even_600_of_them() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "copies_onto_fifos_are_refused_at_once_even_600_of_them"
    ));
    let d = Daemon::start().await;
    let root = d.env_root();
    std::fs::write(root.join("src"), b"data").unwrap();
    nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    let (status, body) = post(
        &d,
        "/v1/fs/copy",
        json!({"source": "/src", "dest": "/fifo"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{body}"
    );
    let r = d.get("/v1/fs/read?path=/fifo").await;
    assert_eq!(r.status(), 400, "reading a FIFO is refused, not waited on");
    let all = futures_util::future::join_all((0..600).map(|_| {
        post(
            &d,
            "/v1/fs/copy",
            json!({"source": "/src", "dest": "/fifo"}),
        )
    }))
    .await;
    assert!(all.iter().all(|(s, _)| *s == 400), "every one answered 400");
    still_serves(&d).await;
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_checkpoint_body_with_unknown_fields_is_refused() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_checkpoint_body_with_unknown_fields_is_refused"
    ));
    let d = Daemon::start().await;
    for path in ["/v1/checkpoint", "/checkpoint"] {
        let r = d
            .req(
                Method::POST,
                path,
                Some(json!({"comment": "x", "coment": "typo"})),
            )
            .await;
        assert_eq!(r.status(), 400, "{path}");
        assert!(
            r.text().await.unwrap().contains("coment"),
            "{path}: names the field"
        );
    }
    assert_eq!(
        d.get("/v1/checkpoints")
            .await
            .json::<Value>()
            .await
            .unwrap(),
        json!([])
    );
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn the_frameworks_own_refusals_are_json_under_v1() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("the_frameworks_own_refusals_are_json_under_v1"));
    let d = Daemon::start().await;
    // Over the default body limit (2 MiB): refused by the framework.
    let big = vec![b' '; 3 << 20];
    let r = d
        .http
        .post(d.url("/v1/checkpoint"))
        .bearer_auth(common::TOKEN)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        r.headers()
    );
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
}

/// Connections that never finish their request headers are closed by the
/// daemon within its header deadline (those past the cap wait to be
/// accepted, then get the same deadline), and the API stays reachable: the
/// Unix socket meanwhile, TCP once they are gone.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn half_open_connections_are_dropped_and_the_api_stays_reachable() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "half_open_connections_are_dropped_and_the_api_stays_reachable"
    ));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Daemon::start().await;
    let addr = d.tcp.unwrap();
    let mut conns = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Never finished: no blank line.
        let _ = s
            .write_all(b"GET /v1/status HTTP/1.1\r\nHost: sprite\r\n")
            .await;
        conns.push(s);
    }
    let status = d.cli(&["status"]).await;
    assert!(status.status.success(), "the Unix socket answers meanwhile");
    // Bound: the deadline plus slack, reached only if the daemon keeps them.
    let bound = sprited::api::server::HEADER_TIMEOUT * 2 + std::time::Duration::from_secs(10);
    for (i, s) in conns.iter_mut().enumerate() {
        let closed = tokio::time::timeout(bound, async {
            let mut buf = [0u8; 512];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // a 408 before the close is fine
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "connection {i} is still open after {bound:?}"
        );
    }
    assert_eq!(d.get("/v1/status").await.status(), 200);
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_client_that_goes_away_cancels_its_copy() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("a_client_that_goes_away_cancels_its_copy"));
    let d = Daemon::start().await;
    let root = d.env_root();
    const FILES: usize = 60_000;
    std::fs::create_dir(root.join("many")).unwrap();
    for i in 0..FILES {
        std::fs::write(root.join(format!("many/{i}")), b"x").unwrap();
    }
    let copy = d.req(
        Method::POST,
        "/v1/fs/copy",
        Some(json!({"source": "/many", "dest": "/copy", "recursive": true})),
    );
    // The client leaves once the copy has begun.
    let begun = common::when(
        &root,
        nix::sys::inotify::AddWatchFlags::IN_CREATE,
        "the copy to begin",
        || root.join("copy").exists(),
    );
    tokio::select! {
        r = copy => panic!("the copy of {FILES} files finished before its client left: {}", r.status()),
        () = begun => {}
    }
    d.log_shows("file operation cancelled: its client went away")
        .await;
    let copied = std::fs::read_dir(root.join("copy")).unwrap().count();
    assert!(copied < FILES, "all {copied} files were copied");
    still_serves(&d).await;
}

/// A tmpfs mounted for one test, detached when dropped (after the daemon
/// using it, declared later, is gone).
struct SmallDisk(std::path::PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("disk");
        std::fs::create_dir(&dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap();
        SmallDisk(dir, tmp)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_write_to_a_full_disk_is_507_and_leaves_nothing_behind() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_write_to_a_full_disk_is_507_and_leaves_nothing_behind"
    ));
    let disk = SmallDisk::new("48m");
    let d = Daemon::start_with(common::Options {
        state_dir: Some(disk.0.join("state")),
        ..Default::default()
    })
    .await;
    let free = |p: &Path| {
        let s = nix::sys::statvfs::statvfs(p).unwrap();
        s.blocks_available() * s.fragment_size()
    };
    let before = free(&disk.0);
    // More than the disk holds.
    let r = d
        .http
        .put(d.url("/v1/fs/write?path=/big"))
        .bearer_auth(common::TOKEN)
        .body(vec![7u8; 64 << 20])
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 507, "{body}");
    assert!(body["error"].as_str().unwrap().contains("space"), "{body}");
    assert!(!d.env_root().join("big").exists());
    assert_eq!(free(&disk.0), before, "the partial file was removed");
    still_serves(&d).await;
}
