//! Sleep and wake (issue 17): an idle sprite goes warm, then cold (its
//! processes dumped and ended, their memory given back), and the next
//! request brings every process back with the same pid and state; what
//! keeps it awake; a crash while cold; undoing a restore.

mod common;

use common::{Daemon, Options, with_criu};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// An HTTP server holding `argv[2]` MiB of touched memory; each `GET`
/// answers `<pid> <count>` and counts one more.
const SERVER: &str = r#"
import http.server, os, sys
port, mb = int(sys.argv[1]), int(sys.argv[2])
data = bytearray(mb << 20)
for i in range(0, len(data), 4096):
    data[i] = 1
count = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global count
        count += 1
        body = ('%d %d' % (os.getpid(), count)).encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()
"#;

/// `GET /` on a port of the sprite (the environment shares the host's
/// network): `(pid, count)`. Not an API call: it neither wakes the sprite
/// nor counts as activity.
async fn ask(port: u16) -> Option<(i64, i64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    let text = String::from_utf8_lossy(&out);
    let body = text.split("\r\n\r\n").nth(1)?;
    let mut it = body.split_whitespace().map(|n| n.parse::<i64>());
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// Starts the memory server as a service, answering on `port`.
async fn service(d: &Daemon, port: u16, mb: u32) {
    d.put_service(
        "mem",
        json!({"cmd": "python3", "args": ["-c", SERVER, port.to_string(), mb.to_string()],
               "http_port": port}),
        "1s",
    )
    .await;
    let st = d.service("mem").await;
    assert_eq!(st["state"]["status"], "running", "{st}");
}

/// Starts the memory server through exec, left running after its client
/// goes (`max_run_after_disconnect=0`), and waits for its port to open.
async fn exec_server(d: &Daemon, port: u16, mb: u32) {
    let (mut watch, _) = common::ws(d, "/ports/watch").await;
    let script: String = url_encode(SERVER);
    let (s, _) = common::ws(
        d,
        &format!(
            "/exec?cmd=python3&cmd=-c&cmd={script}&cmd={port}&cmd={mb}&max_run_after_disconnect=0"
        ),
    )
    .await;
    drop(s);
    loop {
        let m = common::next(&mut watch).await;
        if let Some(v) = common::text(&m)
            && v["type"] == "port_opened"
            && v["port"] == port
        {
            break;
        }
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Resident memory (KiB) of every process in the daemon's cgroups.
async fn env_rss_kib(d: &Daemon) -> u64 {
    let parent = d.status().await["cgroup"]["parent"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut dirs = vec![std::path::PathBuf::from(parent)];
    let mut total = 0;
    while let Some(dir) = dirs.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
    }
    total
}

/// The sprite's record status (`running`, `warm`, `cold`): does not wake it.
async fn record_status(d: &Daemon) -> String {
    let v: Value = d.get("/v1/sprites/testsprite").await.json().await.unwrap();
    v["status"].as_str().unwrap().to_owned()
}

fn sleepy(extra: &[&str]) -> Options {
    Options {
        // (the test asks the service on the host's loopback)
        extra: ["--network", "host"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn an_idle_sprite_goes_warm_then_cold_and_one_request_brings_every_process_back() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "an_idle_sprite_goes_warm_then_cold_and_one_request_brings_every_process_back"
    ));
    let d = Daemon::start_with(sleepy(&["--auto-sleep", "2s", "--cold-after", "3s"])).await;
    let (p1, p2) = (common::free_port(), common::free_port());
    service(&d, p1, 256).await;
    exec_server(&d, p2, 16).await;
    let (pid1, _) = ask(p1).await.unwrap();
    let (pid1b, n1) = ask(p1).await.unwrap();
    let (pid2, n2) = ask(p2).await.unwrap();
    assert_eq!((pid1, n1, n2), (pid1b, 2, 1));
    let awake = env_rss_kib(&d).await;
    assert!(awake > 256 * 1024, "{awake} KiB");

    // No client: warm, then cold.
    d.log_shows("sleep: warm").await;
    d.log_shows("sleep: cold").await;
    assert_eq!(record_status(&d).await, "cold");
    let status = d.status().await;
    assert_eq!(status["sleep"]["status"], "cold", "{status}");
    assert!(status["sleep"]["since"].is_string(), "{status}");
    let cold = env_rss_kib(&d).await;
    assert!(cold * 20 < awake, "cold: {cold} KiB of {awake} KiB");
    assert!(ask(p1).await.is_none(), "nothing answers while cold");

    // One request wakes it: both answer with the same pids and go on counting.
    let r = d.get("/v1/services").await;
    assert_eq!(r.status(), 200);
    assert_eq!(record_status(&d).await, "running");
    assert_eq!(ask(p1).await, Some((pid1, 3)));
    assert_eq!(ask(p2).await, Some((pid2, 2)));
    let svc = d.service("mem").await;
    assert_eq!(svc["state"]["status"], "running", "{svc}");
    assert_eq!(svc["state"]["pid"], pid1, "{svc}");
    assert!(d.status().await["sleep"]["last_wake_error"].is_null());
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn an_attached_terminal_or_an_open_tunnel_keeps_the_sprite_awake() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "an_attached_terminal_or_an_open_tunnel_keeps_the_sprite_awake"
    ));
    let d = Daemon::start_with(sleepy(&["--auto-sleep", "1s", "--cold-after", "1h"])).await;
    let port = common::free_port();
    service(&d, port, 1).await;
    // A terminal held open for three idle periods.
    let (mut tty, _) = common::ws(&d, "/exec?cmd=bash&cmd=--norc&tty=true").await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(record_status(&d).await, "running");
    tty.send(Message::Binary(b"echo still-$((1+1))\n".to_vec().into()))
        .await
        .unwrap();
    let mut out = String::new();
    while !out.contains("still-2") {
        if let Message::Binary(b) = common::next(&mut tty).await {
            out.push_str(&String::from_utf8_lossy(&b));
        }
    }
    drop(tty);
    d.log_shows("sleep: warm").await;
    // A proxy tunnel held open: awake (woken by its opening) and kept so.
    let (mut tunnel, _) = common::ws(&d, "/proxy").await;
    tunnel
        .send(Message::Text(
            json!({"host": "127.0.0.1", "port": port})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    let m = tunnel.next().await.unwrap().unwrap();
    assert!(m.to_text().unwrap().contains("connected"), "{m:?}");
    assert_eq!(record_status(&d).await, "running");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(record_status(&d).await, "running");
    tunnel
        .send(Message::Binary(b"GET / HTTP/1.0\r\n\r\n".to_vec().into()))
        .await
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains(" 1") {
        match tunnel.next().await {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.0 200"),
        "{got:?}"
    );
    drop(tunnel);
    let warm_twice = || d.log_text().matches("sleep: warm").count() >= 2;
    let log = d.log.clone();
    common::when(
        &log,
        nix::sys::inotify::AddWatchFlags::IN_MODIFY,
        "a second warm sleep",
        warm_twice,
    )
    .await;
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn an_ingress_request_wakes_a_cold_sprite() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu("an_ingress_request_wakes_a_cold_sprite"));
    let d = Daemon::start_with(sleepy(&[
        "--auto-sleep",
        "1h",
        "--http-ingress",
        "127.0.0.1:0",
    ]))
    .await;
    let port = common::free_port();
    service(&d, port, 8).await;
    let (pid, _) = ask(port).await.unwrap();
    let r = d
        .req(reqwest::Method::POST, "/v1/sleep?cold=true", None)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(record_status(&d).await, "cold");
    let ingress = d.status().await["listen"]["http_ingress"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = reqwest::get(format!("http://{ingress}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, format!("{pid} 2"));
    assert_eq!(record_status(&d).await, "running");
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_daemon_killed_while_cold_comes_back_cold_and_wakes_with_its_processes() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "a_daemon_killed_while_cold_comes_back_cold_and_wakes_with_its_processes"
    ));
    let flags = ["--auto-sleep", "1h"];
    let mut d = Daemon::start_with(sleepy(&flags)).await;
    let port = common::free_port();
    service(&d, port, 32).await;
    let (pid, n) = ask(port).await.unwrap();
    let out = d.cli(&["sleep", "--cold"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(record_status(&d).await, "cold");
    d.child.start_kill().unwrap();
    d.child.wait().await.unwrap();
    let again = Daemon::start_with(Options {
        state_dir: Some(d.state_dir.clone()),
        ..sleepy(&flags)
    })
    .await;
    assert_eq!(record_status(&again).await, "cold");
    assert!(ask(port).await.is_none(), "nothing started while cold");
    let out = again.cli(&["wake"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ask(port).await, Some((pid, n + 1)));
    assert_eq!(record_status(&again).await, "running");
    let svc = again.service("mem").await;
    assert_eq!(svc["state"]["pid"], pid, "{svc}");
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_checkpoint_of_a_cold_sprite_takes_its_sleeping_processes_without_waking_it() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "a_checkpoint_of_a_cold_sprite_takes_its_sleeping_processes_without_waking_it"
    ));
    let d = Daemon::start_with(sleepy(&["--auto-sleep", "1h"])).await;
    let port = common::free_port();
    service(&d, port, 16).await;
    let (pid, n) = ask(port).await.unwrap();
    std::fs::write(d.env_root().join("note"), "while awake").unwrap();
    let r = d
        .req(reqwest::Method::POST, "/v1/sleep?cold=true", None)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(record_status(&d).await, "cold");

    let events = d.checkpoint("taken cold").await;
    let said: Vec<&str> = events.iter().filter_map(|e| e["data"].as_str()).collect();
    assert!(said.iter().any(|l| l.contains("sleeps cold")), "{said:?}");
    assert_eq!(record_status(&d).await, "cold", "the checkpoint woke it");
    assert!(ask(port).await.is_none(), "nothing runs while cold");
    let meta: Value = d.get("/v1/checkpoints/v1").await.json().await.unwrap();
    assert_eq!(meta["processes"][0]["service"], "mem", "{meta}");

    // Woken, it goes on from where it slept; restored, from the same point.
    let out = d.cli(&["wake"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ask(port).await, Some((pid, n + 1)));
    assert_eq!(ask(port).await, Some((pid, n + 2)));
    std::fs::write(d.env_root().join("note"), "changed").unwrap();
    d.restore("v1").await;
    assert_eq!(ask(port).await, Some((pid, n + 1)), "the restored counter");
    assert_eq!(
        std::fs::read_to_string(d.env_root().join("note")).unwrap(),
        "while awake"
    );
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_cold_sleep_during_a_slow_stop_does_not_hang() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu("a_cold_sleep_during_a_slow_stop_does_not_hang"));
    let d = std::sync::Arc::new(Daemon::start_with(sleepy(&["--auto-sleep", "1h"])).await);
    let stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(1e6)";
    d.put_service(
        "stubborn",
        json!({"cmd": "python3", "args": ["-c", stubborn]}),
        "1s",
    )
    .await;
    // A stop that waits 5 s for a process ignoring SIGTERM...
    let stopping = {
        let d = d.clone();
        tokio::spawn(async move {
            d.req(
                reqwest::Method::POST,
                "/v1/services/stubborn/stop?timeout=5s",
                None,
            )
            .await
            .status()
        })
    };
    tokio::time::timeout(common::WAIT, async {
        while d.service("stubborn").await["state"]["status"] != "stopping" {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stop began");
    // ...and a cold sleep meanwhile: both finish.
    let r = tokio::time::timeout(
        common::WAIT,
        d.req(reqwest::Method::POST, "/v1/sleep?cold=true", None),
    )
    .await
    .expect("the sleep finished");
    assert_eq!(r.status(), 200, "{}", d.log_text());
    assert_eq!(record_status(&d).await, "cold");
    let stopped = tokio::time::timeout(common::WAIT, stopping)
        .await
        .expect("the stop finished")
        .unwrap();
    assert!(stopped.is_success(), "{stopped}");
    let st = d.service("stubborn").await;
    assert_ne!(st["state"]["status"], "stopping", "{st}");
}

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_restore_can_be_undone_and_five_automatic_checkpoints_are_kept() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(with_criu(
        "a_restore_can_be_undone_and_five_automatic_checkpoints_are_kept"
    ));
    let d = Daemon::start().await;
    let root = d.env_root();
    std::fs::write(root.join("kept"), b"v1").unwrap();
    d.checkpoint("base").await;
    for i in 0..7 {
        let note = format!("change {i}");
        std::fs::write(root.join("note"), &note).unwrap();
        let events = d.restore("v1").await;
        assert!(
            events.iter().any(|e| e["data"]
                .as_str()
                .is_some_and(|t| t.starts_with("Automatic checkpoint"))),
            "{events:?}"
        );
        assert!(!root.join("note").exists(), "restored to v1");
        let out = d.cli(&["checkpoint", "restore", "--undo"]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read_to_string(root.join("note")).unwrap(), note);
        assert_eq!(std::fs::read_to_string(root.join("kept")).unwrap(), "v1");
    }
    let list: Vec<Value> = d.get("/v1/checkpoints").await.json().await.unwrap();
    let autos: Vec<&Value> = list.iter().filter(|c| c["is_auto"] == true).collect();
    assert_eq!(autos.len(), 5, "{list:?}");
    assert!(
        autos.iter().all(|c| c["comment"] == "before restore to v1"),
        "{autos:?}"
    );
    // The newest is the last one taken (v8: v1, then one per restore).
    assert_eq!(autos[0]["id"], "v8", "{autos:?}");
    assert!(
        list.iter()
            .any(|c| c["id"] == "v1" && c["is_auto"] == false)
    );
}
