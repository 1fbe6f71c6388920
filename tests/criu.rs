//! Process checkpoints against the real daemon and the real `criu`:
//! services come back from a restore with their memory, their pid, their
//! open files and their listening sockets (root; CRIU from scripts/setup.sh).

mod common;

use common::counter::{
    COUNTER, ask, data, follow, follow_from, infos, number, pid_of, restore_with_memory, start,
};
use common::{Daemon, Options, with_criu};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

async fn checkpoint_with(d: &Daemon, body: Value) -> Vec<Value> {
    d.post_to_complete("/v1/checkpoint", Some(body)).await
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_restored_counter_continues_from_its_checkpointed_memory() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "a_restored_counter_continues_from_its_checkpointed_memory"
    ));
    let d = Daemon::start().await;
    let criu = d.status().await["criu"].clone();
    assert_eq!(criu["available"], true);
    // Dirty-page tracking is reported as the kernel has it (not on the dev
    // VM's kernel; the guests' Debian kernels do).
    let tracks = std::process::Command::new(criu["path"].as_str().unwrap())
        .args(["check", "--feature", "mem_dirty_track"])
        .output()
        .unwrap()
        .status
        .success();
    assert_eq!(criu["dirty_tracking"], tracks, "{criu}");
    let before = start(
        &d,
        "counter",
        json!({"cmd": "python3", "args": ["-u", "-c", COUNTER]}),
    )
    .await;
    let pid = pid_of(&before);
    let low = ask(&d, "counter", pid).await;
    let events = d.checkpoint("counter").await;
    let high = ask(&d, "counter", pid).await;
    assert!(
        infos(&events)
            .iter()
            .any(|l| l.starts_with("Dumped the environment")),
        "{events:?}"
    );
    let meta: Value = d.get("/v1/checkpoints/v1").await.json().await.unwrap();
    let p = &meta["processes"][0];
    assert_eq!(p["service"], "counter");
    assert_eq!(p["pid"], pid);
    assert!(
        p["bytes"].as_u64().unwrap() > 0 && p["dump_ms"].as_f64().unwrap() > 0.0,
        "{meta}"
    );
    assert!(meta["freeze_ms"].as_f64().unwrap() > 0.0);

    // Let it run well past the checkpoint.
    let mut s = follow(&d, "counter").await;
    s.until(|e| number(e, "tick").is_some_and(|n| n >= high + 300))
        .await;
    drop(s);
    let later = ask(&d, "counter", pid).await;

    let events = d.restore("v1").await;
    assert!(
        infos(&events)
            .iter()
            .any(|l| l.starts_with("Service counter restored with its memory")),
        "{events:?}"
    );
    let after = d.service("counter").await["state"].clone();
    assert_eq!(after["pid"], pid, "same pid");
    assert_eq!(after["status"], "running");
    assert_eq!(after["restart_count"], before["restart_count"]);
    assert_eq!(after["started_at"], before["started_at"]);
    let value = ask(&d, "counter", pid).await;
    assert!(
        value >= low && value < later,
        "restored counter at {value}: checkpointed between {low} and {high}, later {later}"
    );

    // A restored tree checkpoints and restores again (its init talks over
    // the pipes the first restore made, which the next dump must name).
    let again = ask(&d, "counter", pid).await;
    let events = d.checkpoint("again").await;
    // The final event carries the figures: the kind of dump (every dump is
    // whole so far), its pages, and what the store had already (the images
    // that did not change since v1).
    let stats = &events.last().unwrap()["stats"];
    assert_eq!(stats["criu"]["kind"], "full", "{stats}");
    assert!(
        stats["criu"]["pages_scanned"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(
        stats["criu"]["pages_written"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(stats["images_new_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["images_dedup_bytes"].as_u64().unwrap() > 0, "{stats}");
    let meta: Value = d.get("/v1/checkpoints/v3").await.json().await.unwrap();
    assert_eq!(meta["store"]["images_new_bytes"], stats["images_new_bytes"]);
    let events = d.restore("v3").await;
    assert!(
        infos(&events)
            .iter()
            .any(|l| l.starts_with("Service counter restored with its memory")),
        "{events:?}"
    );
    assert_eq!(d.service("counter").await["state"]["pid"], pid, "same pid");
    assert!(ask(&d, "counter", pid).await >= again);
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_restored_http_server_answers_on_its_port_without_a_restart() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "a_restored_http_server_answers_on_its_port_without_a_restart"
    ));
    let d = Daemon::start_host_network().await;
    std::fs::write(d.env_root().join("hello.txt"), b"hello from the sprite").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = json!({
        "cmd": "python3",
        "args": ["-m", "http.server", port.to_string(), "--bind", "127.0.0.1"],
        "http_port": port,
    });
    let before = start(&d, "web", spec).await;
    let url = format!("http://127.0.0.1:{port}/hello.txt");
    let get = || async {
        let r = reqwest::get(&url).await.expect("the server answers");
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    };
    assert_eq!(get().await, "hello from the sprite");
    let events = d.checkpoint("web").await;
    assert!(
        !events.iter().any(|e| e["type"] == "error"),
        "{events:?}\n{}",
        common::read(&d.state_dir.join("criu-logs/web.dump.log"))
    );
    // Changes after the checkpoint are undone by the restore.
    std::fs::write(d.env_root().join("hello.txt"), b"changed").unwrap();
    assert_eq!(get().await, "changed");

    let events = d.restore("v1").await;
    assert!(
        infos(&events)
            .iter()
            .any(|l| l.starts_with("Service web restored with its memory")),
        "{events:?}"
    );
    assert_eq!(get().await, "hello from the sprite");
    let after = d.service("web").await["state"].clone();
    assert_eq!(after["pid"], before["pid"], "not restarted: same pid");
    assert_eq!(
        after["started_at"], before["started_at"],
        "not restarted: same start"
    );
    assert_eq!(after["restart_count"], before["restart_count"]);
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_restored_process_keeps_its_file_offset_and_sees_the_checkpointed_file() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "a_restored_process_keeps_its_file_offset_and_sees_the_checkpointed_file"
    ));
    let d = Daemon::start().await;
    let file = d.env_root().join("data.txt");
    std::fs::write(&file, b"0123456789abcdef").unwrap();
    let script = r#"
import os, time
fd = os.open("data.txt", os.O_RDONLY)
os.lseek(fd, 7, os.SEEK_SET)
print("ready", fd, flush=True)
while True:
    time.sleep(1)
"#;
    let state = start(
        &d,
        "reader",
        json!({"cmd": "python3", "args": ["-u", "-c", script]}),
    )
    .await;
    let mut s = follow_from(&d, "reader", 10).await;
    let evs = s.until(|e| data(e).starts_with("ready")).await;
    drop(s);
    let fd: u32 = data(evs.last().unwrap()).trim()[6..].parse().unwrap();
    let pid = pid_of(&state);
    let host = d.host_pid(pid).await;
    let pos = |pid: i32| -> u64 {
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("pos:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(pos(host), 7);
    d.checkpoint("reader").await;
    std::fs::write(&file, b"").unwrap(); // truncated after the checkpoint

    d.restore("v1").await;
    let after = d.service("reader").await["state"].clone();
    assert_eq!(pid_of(&after), pid);
    let host = d.host_pid(pid).await;
    assert_eq!(pos(host), 7, "the restored offset");
    assert_eq!(std::fs::read(&file).unwrap(), b"0123456789abcdef");
    let target = std::fs::read_link(format!("/proc/{host}/fd/{fd}")).unwrap();
    assert_eq!(
        target,
        std::path::Path::new("/data.txt"),
        "the fd is the restored file"
    );
}

const SLEEPER: &str = "while :; do sleep 1; done";

/// Starts `/bin/true` with `posix_spawn` (a vfork) whose child first opens
/// the FIFO `/vfork-gate` for reading: the parent waits in the vfork until
/// someone opens the FIFO for writing. Then counts in memory, saying its
/// value on SIGUSR1 like the counter.
const SPAWNER: &str = r#"
import os, signal, sys, time
n = 0
def show(*_):
    sys.stdout.write(f"value {n}\n"); sys.stdout.flush()
signal.signal(signal.SIGUSR1, show)
os.mkfifo("/vfork-gate")
child = os.posix_spawn("/bin/true", ["true"], {},
    file_actions=[(os.POSIX_SPAWN_OPEN, 3, "/vfork-gate", os.O_RDONLY, 0)])
os.waitpid(child, 0)
sys.stdout.write("spawned\n"); sys.stdout.flush()
while True:
    n += 1
    time.sleep(0.01)
"#;

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_checkpoint_that_freezes_a_vfork_waits_for_the_exec_and_dumps() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "a_checkpoint_that_freezes_a_vfork_waits_for_the_exec_and_dumps"
    ));
    let d = Daemon::start().await;
    let st = start(
        &d,
        "spawner",
        json!({"cmd": "python3", "args": ["-u", "-c", SPAWNER]}),
    )
    .await;
    let pid = pid_of(&st);
    let host = d.host_pid(pid).await;
    // Its vfork child blocks opening the FIFO: the parent sleeps
    // uninterruptibly (`D`) in the vfork until the FIFO has a writer.
    common::until_in_vfork(host).await;
    // A freeze now catches a task CRIU cannot seize (left to CRIU, the
    // dump waits 10 s and fails). The capture thaws and waits for it...
    let mut s = common::Ndjson::new(
        d.req(
            reqwest::Method::POST,
            "/v1/checkpoint",
            Some(json!({"comment": "mid-vfork"})),
        )
        .await,
    );
    let mut events = s
        .until(|e| data(e).contains("finish starting a program"))
        .await;
    // ... and once the child can exec (the FIFO opened for writing from
    // the host side of the root: the open returns when the thawed child
    // opens its end), dumps the processes.
    let fifo = d.env_root().join("vfork-gate");
    let gate = tokio::time::timeout(
        common::WAIT,
        tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(fifo)),
    )
    .await
    .expect("the child opens the FIFO")
    .unwrap()
    .unwrap();
    events.extend(s.collect().await);
    drop(gate);
    assert_eq!(events.last().unwrap()["type"], "complete", "{events:?}");
    assert!(
        !events.iter().any(|e| e["type"] == "error"),
        "{events:?}\n{}",
        d.log_text()
    );
    assert!(
        infos(&events)
            .iter()
            .any(|l| l.starts_with("Dumped the environment")),
        "{events:?}"
    );
    let meta: Value = d.get("/v1/checkpoints/v1").await.json().await.unwrap();
    assert_eq!(meta["processes"][0]["service"], "spawner", "{meta}");
    // The process went on past its vfork, and comes back with its memory
    // (started fresh, it would fail at once: the FIFO is there).
    follow_from(&d, "spawner", 100)
        .await
        .until(|e| data(e) == "spawned\n")
        .await;
    ask(&d, "spawner", pid).await;
    restore_with_memory(&d, "v1", "spawner").await;
    let st = d.service("spawner").await["state"].clone();
    assert_eq!(st["pid"], pid, "same pid");
    assert_eq!(st["status"], "running", "{st}");
    ask(&d, "spawner", pid).await;
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_files_only_checkpoint_restores_services_fresh_and_says_so() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "a_files_only_checkpoint_restores_services_fresh_and_says_so"
    ));
    let d = Daemon::start().await;
    // A fresh environment may hand out the same pids again: a fresh start
    // shows in its start time.
    let mut started = Vec::new();
    for name in ["one", "two"] {
        let st = start(&d, name, json!({"cmd": "sh", "args": ["-c", SLEEPER]})).await;
        started.push(st["started_at"].clone());
    }
    let events = checkpoint_with(&d, json!({"comment": "files", "processes": false})).await;
    assert!(
        !infos(&events).iter().any(|l| l.starts_with("Dumped")),
        "{events:?}"
    );
    let meta: Value = d.get("/v1/checkpoints/v1").await.json().await.unwrap();
    assert_eq!(meta["processes"], json!([]));
    let events = d.restore("v1").await;
    for (name, at) in ["one", "two"].iter().zip(started) {
        let line = format!("Service {name} starts fresh: the checkpoint keeps files only");
        assert!(infos(&events).contains(&line.as_str()), "{events:?}");
        let st = d.service(name).await["state"].clone();
        assert_eq!(st["status"], "running");
        assert_ne!(st["started_at"], at, "started afresh");
    }
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn without_criu_checkpoints_keep_files_and_status_says_so() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "without_criu_checkpoints_keep_files_and_status_says_so"
    ));
    for flags in [vec!["--no-criu"], vec!["--criu", "/nonexistent/criu"]] {
        let d = Daemon::start_with(Options {
            extra: flags.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
        let criu = d.status().await["criu"].clone();
        assert_eq!(criu["available"], false, "{flags:?}: {criu}");
        assert!(criu["message"].as_str().is_some(), "{criu}");
        let st = start(&d, "svc", json!({"cmd": "sh", "args": ["-c", SLEEPER]})).await;
        std::fs::write(d.env_root().join("f"), b"kept").unwrap();
        d.checkpoint("files").await;
        std::fs::write(d.env_root().join("f"), b"lost").unwrap();
        let events = d.restore("v1").await;
        assert_eq!(std::fs::read(d.env_root().join("f")).unwrap(), b"kept");
        assert!(
            infos(&events)
                .iter()
                .any(|l| l.starts_with("Service svc starts fresh")),
            "{events:?}"
        );
        assert_ne!(
            d.service("svc").await["state"]["started_at"],
            st["started_at"]
        );
    }
}

#[test]
fn in_ci_a_missing_criu_fails_the_criu_tests_instead_of_skipping_them() {
    let found = Some(std::path::PathBuf::from("/usr/local/sbin/criu"));
    assert!(common::criu_gate(found, true, "x"));
    assert!(
        !common::criu_gate(None, false, "x"),
        "skips on a developer machine"
    );
    let ci = std::panic::catch_unwind(|| common::criu_gate(None, true, "x"));
    assert!(ci.is_err(), "with SPRITED_REQUIRE_PRIVILEGED=1 it fails");
}

/// A CRIU that works for `check` but fails every dump: the checkpoint still
/// completes for files and says which service failed, with CRIU's own line.
#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_failing_dump_is_an_error_event_and_the_checkpoint_completes() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "a_failing_dump_is_an_error_event_and_the_checkpoint_completes"
    ));
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("criu");
    std::fs::write(
        &fake,
        "#!/bin/sh\ncase \"$1\" in\n--version) echo 'Version: 9.9.9';;\ncheck) echo 'Looks good.';;\n\
         dump) for a; do case \"$prev\" in --log-file) echo 'Error (criu/cr-dump.c:1): fake dump failure' > \"$a\";; esac; prev=$a; done; exit 1;;\n\
         *) exit 1;;\nesac\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let d = Daemon::start_with(Options {
        extra: vec!["--criu".into(), fake.display().to_string()],
        ..Default::default()
    })
    .await;
    assert_eq!(d.status().await["criu"]["available"], true);
    start(&d, "svc", json!({"cmd": "sh", "args": ["-c", SLEEPER]})).await;
    let events = d.checkpoint("partial").await;
    let errors: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "error")
        .map(|e| e["error"].as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 1, "{events:?}");
    assert!(
        errors[0].contains("criu dump of the environment")
            && errors[0].contains("fake dump failure"),
        "{errors:?}"
    );
    let meta: Value = d.get("/v1/checkpoints/v1").await.json().await.unwrap();
    assert_eq!(meta["processes"], json!([]));
    let events = d.restore("v1").await;
    assert!(
        infos(&events).contains(&"Service svc starts fresh: its processes were not dumped"),
        "{events:?}"
    );
}

/// A parent and child joined by a pipe and a unix socket pair, holding a file
/// lock, a file deleted while open and a shared mapping of a file in
/// /dev/shm (POSIX shared memory): all of it comes back.
const PLUMBING: &str = r#"
import fcntl, mmap, os, signal, socket, sys, time
shm_fd = os.open("/dev/shm/sprited-shm", os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(shm_fd, 4096)
shm = mmap.mmap(shm_fd, 4096)
shm[:5] = b"shmok"
r, w = os.pipe()
a, b = socket.socketpair()
lock = open("lock.txt", "w")
fcntl.lockf(lock, fcntl.LOCK_EX)
ghost = open("ghost.txt", "w+")
ghost.write("ghost content")
ghost.flush()
os.unlink("ghost.txt")
if os.fork() == 0:
    while True:  # child: pipe -> socket
        b.sendall(os.read(r, 100))
def ask(*_):
    os.write(w, b"ping")
    echoed = a.recv(100).decode()
    ghost.seek(0)
    with open("/dev/shm/sprited-shm", "rb") as f:
        in_file = f.read(5).decode()
    print("answer", echoed, ghost.read(), shm[:5].decode(), in_file, flush=True)
signal.signal(signal.SIGUSR1, ask)
print("ready", flush=True)
while True:
    time.sleep(1)
"#;

async fn ask_plumbing(d: &Daemon, pid: i32) -> String {
    let host = d.host_pid(pid).await;
    let mut s = follow(d, "plumbing").await;
    kill(Pid::from_raw(host), Signal::SIGUSR1).unwrap();
    let evs = s
        .until(|e| e["type"] == "stdout" && data(e).starts_with("answer"))
        .await;
    data(evs.last().unwrap()).trim().to_owned()
}

fn holds_lock(pid: i32) -> bool {
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(pid.to_string().as_str()))
}

/// Checkpoint `id`'s metadata as the daemon stored it.
fn stored_meta(d: &Daemon, id: &str) -> Value {
    let path = d.state_dir.join(format!("checkpoints/{id}/meta.json"));
    serde_json::from_str(&common::read(&path)).unwrap()
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn pipes_unix_sockets_locks_and_deleted_files_come_back() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "pipes_unix_sockets_locks_and_deleted_files_come_back"
    ));
    let d = Daemon::start().await;
    let st = start(
        &d,
        "plumbing",
        json!({"cmd": "python3", "args": ["-u", "-c", PLUMBING]}),
    )
    .await;
    let pid = pid_of(&st);
    follow_from(&d, "plumbing", 10)
        .await
        .until(|e| data(e).starts_with("ready"))
        .await;
    assert_eq!(
        ask_plumbing(&d, pid).await,
        "answer ping ghost content shmok shmok"
    );
    assert!(holds_lock(d.host_pid(pid).await));
    let events = checkpoint_with(&d, json!({})).await;
    assert!(!events.iter().any(|e| e["type"] == "error"), "{events:?}");
    // The shared memory changes after the checkpoint (through its file,
    // which the mapping shows)...
    let host = d.host_pid(pid).await;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{host}/root/dev/shm/sprited-shm"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"later").unwrap();
    drop(f);
    assert_eq!(
        ask_plumbing(&d, pid).await,
        "answer ping ghost content later later"
    );
    // The daemon archived /dev (CRIU did not): among the stored images.
    let meta = stored_meta(&d, "v1");
    let images = meta["env"]["images"].as_object().unwrap();
    assert!(images.contains_key("sprited-dev.tar"), "{images:?}");
    assert!(
        !images.keys().any(|k| k.starts_with("tmpfs-")),
        "{images:?}"
    );
    // ...and comes back as it was, mapped and in its file.
    d.restore("v1").await;
    assert_eq!(pid_of(&d.service("plumbing").await["state"]), pid);
    assert_eq!(
        ask_plumbing(&d, pid).await,
        "answer ping ghost content shmok shmok"
    );
    assert!(
        holds_lock(d.host_pid(pid).await),
        "the restored process holds its lock again"
    );
    // The daemon archived /dev itself and rebuilt it on a tmpfs of its
    // own, which CRIU bound at /dev: the environment's /dev is a tmpfs
    // with its devices, and nothing of it stays mounted on the host's side.
    let host = d.host_pid(pid).await;
    let inside = std::fs::read_to_string(format!("/proc/{host}/mountinfo")).unwrap();
    assert!(
        inside
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/dev") && l.contains(" - tmpfs ")),
        "{inside}"
    );
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let null = std::fs::metadata(format!("/proc/{host}/root/dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    let ours = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let rebuilt = d.state_dir.join("criu/dev");
    assert!(
        !ours
            .lines()
            .any(|l| l.split(' ').nth(4) == rebuilt.to_str()),
        "{ours}"
    );
}

/// A restore CRIU cannot do (its images damaged) starts the service fresh
/// and says why, with CRIU's own error line; the files are restored anyway.
#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_failed_process_restore_starts_the_service_fresh_and_says_why() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "a_failed_process_restore_starts_the_service_fresh_and_says_why"
    ));
    let d = Daemon::start().await;
    let st = start(&d, "svc", json!({"cmd": "sh", "args": ["-c", SLEEPER]})).await;
    std::fs::write(d.env_root().join("f"), b"checkpointed").unwrap();
    d.checkpoint("v1").await;
    std::fs::write(d.env_root().join("f"), b"later").unwrap();
    // Damage the image in the store (still a zstd object: CRIU reads it).
    let meta = stored_meta(&d, "v1");
    let object = meta["env"]["images"]["pstree.img"].as_str().unwrap();
    let path = d
        .state_dir
        .join("store/objects")
        .join(&object[..2])
        .join(object);
    std::fs::write(&path, zstd::encode_all(&b"not an image"[..], 1).unwrap()).unwrap();
    let events = d.restore("v1").await;
    let line = infos(&events)
        .into_iter()
        .find(|l| l.starts_with("Service svc starts fresh: criu restore of the environment"))
        .unwrap_or_else(|| panic!("{events:?}"));
    assert!(line.contains("Error"), "names CRIU's error: {line}");
    assert_eq!(
        std::fs::read(d.env_root().join("f")).unwrap(),
        b"checkpointed"
    );
    let after = d.service("svc").await["state"].clone();
    assert_eq!(after["status"], "running", "{after}");
    assert_ne!(after["started_at"], st["started_at"], "started fresh");
}

/// No pid conflicts: the environment has its own PID namespace, so two
/// daemons on one host (the exporting one still running the same tree)
/// each import the same checkpoint and bring its processes back with CRIU,
/// at the same pids inside.
#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn two_daemons_restore_the_same_imported_checkpoint_at_the_same_pids() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "two_daemons_restore_the_same_imported_checkpoint_at_the_same_pids"
    ));
    // One fleet: the three share a checkpoint key.
    let key = common::FleetKey::new();
    let a = Daemon::start_with(key.options()).await;
    let before = start(
        &a,
        "counter",
        json!({"cmd": "python3", "args": ["-u", "-c", COUNTER]}),
    )
    .await;
    let pid = pid_of(&before);
    let low = ask(&a, "counter", pid).await;
    a.checkpoint("to move").await;
    let r = a.get("/v1/checkpoints/v1/export").await;
    assert_eq!(r.status(), 200);
    let archive = r.bytes().await.unwrap();
    let import = |d: &Daemon| {
        d.http
            .post(d.url("/v1/checkpoints/import"))
            .bearer_auth(common::TOKEN)
            .body(archive.clone())
            .send()
    };
    // A keeps running its counter meanwhile: the same pids are in use there.
    let (b, c) = (
        Daemon::start_with(key.options()).await,
        Daemon::start_with(key.options()).await,
    );
    for d in [&b, &c] {
        assert_eq!(import(d).await.unwrap().status(), 200);
        restore_with_memory(d, "v1", "counter").await;
        let after = d.service("counter").await["state"].clone();
        assert_eq!(pid_of(&after), pid, "same pid inside on the new daemon");
        assert_eq!(after["started_at"], before["started_at"]);
        let value = ask(d, "counter", pid).await;
        assert!(
            value >= low,
            "continues from its checkpointed memory: {value} < {low}"
        );
    }
    assert_eq!(pid_of(&a.service("counter").await["state"]), pid);
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The archive with the first pack's trailer claiming another content for
/// its last page, and every name and digest made consistent again (as a
/// forger would): only the pages themselves can tell.
fn with_a_forged_pack(archive: &[u8]) -> Vec<u8> {
    let mut entries = common::archive_entries(archive);
    let object = |entries: &[(String, Vec<u8>)], id: &str| {
        entries
            .iter()
            .position(|(n, _)| n == &format!("objects/{id}"))
            .unwrap()
    };
    let renamed = |old: &str, data: &[u8]| format!("{}{}", sha256_hex(data), &old[64..]);
    let mut meta: Value = serde_json::from_slice(&entries[1].1).unwrap();
    let (image, list_id) = meta["env"]["pages"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .unwrap();
    let li = object(&entries, &list_id);
    let mut list: Value = serde_json::from_slice(&entries[li].1).unwrap();
    let pack_id = list["packs"][0].as_str().unwrap().to_owned();
    let pi = object(&entries, &pack_id);
    let pack = &mut entries[pi].1;
    let at = pack.len() - 16 - 1; // the last byte of the last page's hash
    pack[at] ^= 0xff;
    let new_pack = renamed(&pack_id, pack);
    entries[pi].0 = format!("objects/{new_pack}");
    list["packs"][0] = json!(new_pack);
    entries[li].1 = serde_json::to_vec(&list).unwrap();
    let new_list = renamed(&list_id, &entries[li].1);
    entries[li].0 = format!("objects/{new_list}");
    meta["env"]["pages"][&image] = json!(new_list);
    entries[1].1 = serde_json::to_vec_pretty(&meta).unwrap();
    repack(entries)
}

/// The archive with one byte changed in the init's core image (CRIU's
/// record of its registers, credentials and capabilities), every name and
/// digest made consistent again, the seal left as it was.
fn with_a_forged_image(archive: &[u8]) -> Vec<u8> {
    let mut entries = common::archive_entries(archive);
    let mut meta: Value = serde_json::from_slice(&entries[1].1).unwrap();
    let id = meta["env"]["images"]["core-1.img"]
        .as_str()
        .unwrap()
        .to_owned();
    let i = entries
        .iter()
        .position(|(n, _)| n == &format!("objects/{id}"))
        .unwrap();
    let mut image = zstd::decode_all(entries[i].1.as_slice()).unwrap();
    let last = image.len() - 1;
    image[last] ^= 1;
    entries[i].1 = zstd::encode_all(image.as_slice(), 1).unwrap();
    let forged = format!("{}{}", sha256_hex(&entries[i].1), &id[64..]);
    entries[i].0 = format!("objects/{forged}");
    meta["env"]["images"]["core-1.img"] = json!(forged);
    entries[1].1 = serde_json::to_vec_pretty(&meta).unwrap();
    repack(entries)
}

/// An archive of `entries` (index first, rewritten to match the rest).
fn repack(mut entries: Vec<(String, Vec<u8>)>) -> Vec<u8> {
    let mut index: Value = serde_json::from_slice(&entries[0].1).unwrap();
    index["entries"] = json!(
        entries[1..]
            .iter()
            .map(|(n, d)| json!({"name": n, "sha256": sha256_hex(d), "size": d.len()}))
            .collect::<Vec<_>>()
    );
    entries[0].1 = serde_json::to_vec(&index).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in &entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap()
}

/// A pack whose pages do not match its trailer would poison the page
/// index of every later capture: an import refuses it, and nothing of the
/// archive enters the store.
#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn an_archive_with_a_forged_memory_pack_is_refused() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu("an_archive_with_a_forged_memory_pack_is_refused"));
    let a = Daemon::start().await;
    start(
        &a,
        "counter",
        json!({"cmd": "python3", "args": ["-u", "-c", COUNTER]}),
    )
    .await;
    a.checkpoint("to forge").await;
    let archive = a
        .get("/v1/checkpoints/v1/export")
        .await
        .bytes()
        .await
        .unwrap();
    let forged = with_a_forged_pack(&archive);
    let b = Daemon::start().await;
    let objects = |d: &Daemon| common::tree(&d.state_dir.join("store/objects")).len();
    let before = objects(&b);
    let r = b
        .http
        .post(b.url("/v1/checkpoints/import"))
        .bearer_auth(common::TOKEN)
        .body(forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(body.contains("does not match its hash"), "{body}");
    assert_eq!(objects(&b), before, "nothing entered the store");
    // The genuine archive goes in.
    let r = b
        .http
        .post(b.url("/v1/checkpoints/import"))
        .bearer_auth(common::TOKEN)
        .body(archive)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// CRIU restores images as root on the host, and an archive or a bucket
/// can carry any images whose names and digests agree: a restore runs
/// processes only from images sealed by the sprite's checkpoint key. A
/// genuine checkpoint of a sprite with another key, and one of this
/// sprite's own with an image changed, come back as files, their
/// services started afresh; the import says so beforehand.
#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn process_images_restore_only_under_the_key_that_sealed_them() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "process_images_restore_only_under_the_key_that_sealed_them"
    ));
    let a = Daemon::start().await;
    let before = start(
        &a,
        "counter",
        json!({"cmd": "python3", "args": ["-u", "-c", COUNTER]}),
    )
    .await;
    a.checkpoint("sealed here").await;
    let meta = stored_meta(&a, "v1");
    assert_eq!(
        meta["env"]["mac"].as_str().map(str::len),
        Some(64),
        "{meta}"
    );
    let archive = a
        .get("/v1/checkpoints/v1/export")
        .await
        .bytes()
        .await
        .unwrap();
    let import = |d: &Daemon, body: Vec<u8>| {
        d.http
            .post(d.url("/v1/checkpoints/import"))
            .bearer_auth(common::TOKEN)
            .body(body)
            .send()
    };
    let unsealed = "Its process images are not sealed by this sprite's checkpoint key";
    let why = "Service counter starts fresh: its process images are not sealed by this sprite's checkpoint key";
    let fresh = |d: &Daemon, events: Vec<Value>| {
        let lines: Vec<String> = infos(&events).iter().map(|l| l.to_string()).collect();
        assert!(
            lines.iter().any(|l| l.starts_with(why)),
            "{lines:?}\n{}",
            d.log_text()
        );
        assert!(!lines.iter().any(|l| l.contains("restored with its memory")));
    };

    // Another sprite (its own key): the genuine archive restores as files.
    let b = Daemon::start().await;
    let r = import(&b, archive.to_vec()).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains(unsealed), "{text}");
    fresh(&b, b.restore("v1").await);
    let after = b.service("counter").await["state"].clone();
    assert_ne!(after["started_at"], before["started_at"]);
    assert_eq!(after["status"], "running", "{after}");

    // This sprite, one image altered: the seal no longer opens.
    let r = import(&a, with_a_forged_image(&archive)).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("Checkpoint v2 imported"), "{text}");
    assert!(text.contains(unsealed), "{text}");
    fresh(&a, a.restore("v2").await);
    // Its own genuine checkpoint still restores its processes.
    restore_with_memory(&a, "v1", "counter").await;
}

/// `GET /` on a local port answers 200.
async fn answers(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.is_err() {
        return false;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    out.starts_with(b"HTTP/1.0 200")
}

/// The environment's processes as `ps` inside shows them (pid, parent,
/// command), without the `ps` itself.
async fn ps_tree(d: &Daemon) -> Vec<String> {
    let out = d
        .cli(&["exec", "--", "ps", "-e", "-o", "pid=,ppid=,args="])
        .await;
    assert!(out.status.success());
    let mut rows: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("ps -e -o"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    rows.sort();
    rows
}

/// Reads a session's output until `want` shows up.
async fn read_until(s: &mut common::Ws, want: &str) -> String {
    use tokio_tungstenite::tungstenite::Message;
    let mut out = String::new();
    while !out.contains(want) {
        if let Message::Binary(b) = common::next(s).await {
            out.push_str(&String::from_utf8_lossy(&b));
        }
    }
    out
}

/// Everything running in the environment comes back with a restore, from
/// the checkpoint's memory: a counter service, a listening service, a server
/// started through exec that outlives its client (seed 002's pattern), and a
/// TTY shell whose variables are kept and which is re-attached by its id.
#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn services_exec_servers_and_tty_sessions_come_back_with_the_restore() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "services_exec_servers_and_tty_sessions_come_back_with_the_restore"
    ));
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let d = Daemon::start_host_network().await;
    let counter = start(
        &d,
        "counter",
        json!({"cmd": "python3", "args": ["-u", "-c", COUNTER]}),
    )
    .await;
    let pid = pid_of(&counter);
    let (web, server) = (common::free_port(), common::free_port());
    start(
        &d,
        "web",
        json!({"cmd": "python3", "args": ["-m", "http.server", "--bind", "127.0.0.1", web.to_string()],
               "http_port": web}),
    )
    .await;
    let (mut s, _) = common::ws(
        &d,
        &format!(
            "/exec?cmd=python3&cmd=-m&cmd=http.server&cmd=--bind&cmd=127.0.0.1&cmd={server}&max_run_after_disconnect=0"
        ),
    )
    .await;
    let server_id = common::text(&common::next(&mut s).await).unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(s);
    let (mut s, _) = common::ws(
        &d,
        "/exec?cmd=bash&cmd=--norc&cmd=-i&tty=true&rows=24&cols=80",
    )
    .await;
    let tty_id = common::text(&common::next(&mut s).await).unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.send(Message::Binary(
        b"X=42; echo set-$((40+2))\n".to_vec().into(),
    ))
    .await
    .unwrap();
    read_until(&mut s, "set-42").await;
    drop(s);
    for port in [web, server] {
        let mut tries = 0;
        while !answers(port).await {
            tries += 1;
            assert!(tries < 400, "port {port} never answered");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let low = ask(&d, "counter", pid).await;
    let tree = ps_tree(&d).await;

    let events = d.checkpoint("everything").await;
    assert!(!events.iter().any(|e| e["type"] == "error"), "{events:?}");
    let checkpointed = ask(&d, "counter", pid).await;
    assert!(checkpointed >= low);
    // Let them run on, then go back.
    let later = {
        let mut f = follow(&d, "counter").await;
        let evs = f
            .until(|e| number(e, "tick").is_some_and(|n| n > checkpointed + 200))
            .await;
        number(evs.last().unwrap(), "tick").unwrap()
    };
    let events = d.restore("v1").await;
    assert!(
        infos(&events)
            .iter()
            .any(|l| l.starts_with("Service counter restored with its memory")),
        "{events:?}"
    );
    let value = ask(&d, "counter", pid).await;
    assert!(
        value >= low && value < later,
        "the counter continues from the checkpoint (taken after {low}), not from later ({later}): {value}"
    );
    assert_eq!(
        pid_of(&d.service("counter").await["state"]),
        pid,
        "same pid inside"
    );
    assert!(answers(web).await, "the service's listener accepts");
    assert!(answers(server).await, "the exec server's listener accepts");
    assert_eq!(ps_tree(&d).await, tree, "ps inside shows the same tree");
    let list: Value = d.get("/v1/exec").await.json().await.unwrap();
    for id in [&server_id, &tty_id] {
        assert!(
            list["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["id"] == id.as_str()),
            "session {id} is listed after the restore: {list}"
        );
    }
    let (mut s, _) = common::ws(&d, &format!("/exec/{tty_id}")).await;
    let info = common::text(&common::next(&mut s).await).unwrap();
    assert_eq!(info["tty"], true, "{info}");
    s.send(Message::Binary(b"echo value-$X\n".to_vec().into()))
        .await
        .unwrap();
    read_until(&mut s, "value-42").await;
}

/// The upper and work dirs of `state/env` (every generation there).
fn generations(d: &Daemon) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(d.state_dir.join("env"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("upper-") || n.starts_with("work-"))
        .collect();
    names.sort();
    names
}

/// A restore mounts the new root while the old environment dies. A
/// process still creating files as fast as it can when the restore begins
/// writes none of them into the new root (it holds the old one in its own
/// mount namespace), and the old generation goes whole once it is dead.
#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn the_old_root_goes_whole_and_nothing_written_as_it_dies_reaches_the_new_one() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "the_old_root_goes_whole_and_nothing_written_as_it_dies_reaches_the_new_one"
    ));
    let d = Daemon::start().await;
    start(&d, "quiet", json!({"cmd": "sh", "args": ["-c", SLEEPER]})).await;
    let events = d.checkpoint("before the writer").await;
    assert!(
        infos(&events)
            .iter()
            .any(|l| l.starts_with("Dumped the environment")),
        "{events:?}"
    );
    let before = generations(&d);
    start(
        &d,
        "writer",
        json!({"cmd": "sh", "args": ["-c", "mkdir -p /w; i=0; while :; do i=$((i+1)); : > /w/$i; done"]}),
    )
    .await;
    let w = d.env_root().join("w");
    let deadline = std::time::Instant::now() + common::WAIT;
    while std::fs::read_dir(&w).map_or(0, |r| r.count()) < 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer wrote nothing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let events = d.restore("v1").await;
    assert!(
        infos(&events)
            .iter()
            .any(|l| l.starts_with("Service quiet restored with its memory")),
        "{events:?}"
    );
    assert!(
        !w.exists(),
        "files of the dying writer reached the new root"
    );
    assert_eq!(
        d.get("/v1/services/writer").await.status(),
        404,
        "the writer's definition goes with the restore"
    );
    // The old generation goes on a thread of its own after the restore.
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let now = generations(&d);
        if now.len() == 2 && now.iter().all(|n| !before.contains(n)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left: {now:?} (before: {before:?})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        !w.exists(),
        "files of the dying writer reached the new root"
    );
}
