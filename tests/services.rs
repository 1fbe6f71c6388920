//! The Services API against the real daemon, real cgroups and real processes
//! (root). Each test is one acceptance point of the supervisor.

mod common;

use common::{Daemon, Ndjson, Options, alive, of, privileged};
use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::{Value, json};

fn sh(script: &str) -> Value {
    json!({ "cmd": "sh", "args": ["-c", script] })
}

fn with_needs(mut spec: Value, needs: &[&str]) -> Value {
    spec["needs"] = json!(needs);
    spec
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn needs_start_first_and_bad_graphs_are_refused() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("needs_start_first_and_bad_graphs_are_refused"));
    let d = Daemon::start().await;
    d.put_service("db", sh("echo db ready; exec sleep 1000"), "0")
        .await;
    d.put_service(
        "web",
        with_needs(sh("echo web ready; exec sleep 1000"), &["db"]),
        "0",
    )
    .await;
    for name in ["web", "db"] {
        let events = d
            .post_stream(&format!("/v1/services/{name}/stop?timeout=5s"))
            .await
            .collect()
            .await;
        assert!(!of(&events, "stopped", name).is_empty(), "{events:?}");
    }
    assert_eq!(d.service("db").await["state"]["status"], "stopped");

    // Starting web starts db first.
    let events = d
        .post_stream("/v1/services/web/start?duration=0")
        .await
        .collect()
        .await;
    let started: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "started")
        .map(|e| e["service"].as_str().unwrap())
        .collect();
    assert_eq!(started, ["db", "web"], "{events:?}");
    assert_eq!(events.last().unwrap()["type"], "complete");
    let (db, web) = (d.service("db").await, d.service("web").await);
    assert_eq!(db["state"]["status"], "running");
    assert_eq!(web["state"]["status"], "running");
    let t =
        |v: &Value| humantime::parse_rfc3339(v["state"]["started_at"].as_str().unwrap()).unwrap();
    assert!(
        t(&db) <= t(&web),
        "db {} must start before web {}",
        db["state"]["started_at"],
        web["state"]["started_at"]
    );
    assert!(
        db["state"]["started_at"].as_str().unwrap().contains('.'),
        "fractional seconds"
    );

    // A cycle and an unknown need are refused with 400 naming the field.
    let r = d
        .req(
            Method::PUT,
            "/v1/services/db",
            Some(with_needs(sh("true"), &["web"])),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("cycle"));
    let r = d
        .req(
            Method::PUT,
            "/v1/services/api",
            Some(with_needs(sh("true"), &["nope"])),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("nope"));
    // Other bad input: bad name, empty cmd, bad JSON, bad duration.
    assert_eq!(
        d.req(Method::PUT, "/v1/services/-x", Some(sh("true")))
            .await
            .status(),
        400
    );
    assert_eq!(
        d.req(Method::PUT, "/v1/services/x", Some(json!({"cmd": ""})))
            .await
            .status(),
        400
    );
    let r = d
        .http
        .put(d.url("/v1/services/x"))
        .bearer_auth(common::TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        d.req(Method::POST, "/v1/services/db/start?duration=forever", None)
            .await
            .status(),
        400
    );
    // Deleting what others need is a conflict naming them.
    let r = d.req(Method::DELETE, "/v1/services/db", None).await;
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("web"));
    assert_eq!(
        d.req(Method::GET, "/v1/services/nope", None).await.status(),
        404
    );
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn stop_kills_the_whole_tree_even_a_grandchild_ignoring_sigterm() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "stop_kills_the_whole_tree_even_a_grandchild_ignoring_sigterm"
    ));
    let d = Daemon::start().await;
    // main (sh) → child (sh) → grandchild (sh ignoring TERM) that prints its pid.
    let script =
        r#"sh -c 'sh -c "trap \"\" TERM; echo gc=\$\$; while :; do sleep 1; done" & wait' & wait"#;
    let r = d
        .req(
            Method::PUT,
            "/v1/services/tree?duration=60s",
            Some(sh(script)),
        )
        .await;
    let mut stream = Ndjson::new(r);
    let events = stream
        .until(|e| e["data"].as_str().is_some_and(|s| s.starts_with("gc=")))
        .await;
    drop(stream);
    let line = events.last().unwrap()["data"]
        .as_str()
        .unwrap()
        .trim()
        .to_owned();
    let gc: i64 = line.trim_start_matches("gc=").parse().unwrap();
    let main = d.service("tree").await["state"]["pid"].as_i64().unwrap();
    // The API's pids are the environment's; check them on the host.
    let (main, gc) = (
        d.host_pid(main as i32).await as i64,
        d.host_pid(gc as i32).await as i64,
    );
    assert!(alive(main) && alive(gc));

    let events = d
        .post_stream("/v1/services/tree/stop?timeout=2s")
        .await
        .collect()
        .await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"stopping"), "{events:?}");
    assert!(
        kinds.contains(&"stopped") && kinds.last() == Some(&"complete"),
        "{events:?}"
    );
    assert!(!alive(main), "main process {main} survived stop");
    assert!(!alive(gc), "grandchild {gc} ignoring SIGTERM survived stop");
    let state = d.service("tree").await["state"].clone();
    assert_eq!(state["status"], "stopped");
    assert!(state["pid"].is_null());

    // Stopping it again is a conflict.
    assert_eq!(
        d.req(Method::POST, "/v1/services/tree/stop", None)
            .await
            .status(),
        409
    );
    // Deleting keeps the log file.
    assert_eq!(
        d.req(Method::DELETE, "/v1/services/tree", None)
            .await
            .status(),
        204
    );
    assert!(d.state_dir.join("logs/services/tree.log").exists());
    assert_eq!(
        d.req(Method::GET, "/v1/services/tree", None).await.status(),
        404
    );
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_crashing_service_is_restarted_with_backoff_until_stopped() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_crashing_service_is_restarted_with_backoff_until_stopped"
    ));
    let d = Daemon::start().await;
    let r = d
        .req(
            Method::PUT,
            "/v1/services/crashy?duration=60s",
            Some(sh("echo up; sleep 1; exit 3")),
        )
        .await;
    let mut stream = Ndjson::new(r);
    // started, exit 3, started again (after the 1 s backoff), exit 3 again.
    let mut exits = 0;
    let events = stream
        .until(|e| {
            if e["type"] == "exit" {
                assert_eq!(e["exit_code"], 3, "{e}");
                exits += 1;
            }
            exits == 2
        })
        .await;
    drop(stream);
    assert!(of(&events, "started", "crashy").len() >= 2, "{events:?}");
    let state = d.service("crashy").await["state"].clone();
    assert!(state["restart_count"].as_u64().unwrap() >= 1, "{state}");
    assert_eq!(state["exit_code"], 3, "{state}");

    let events = d
        .post_stream("/v1/services/crashy/stop?timeout=2s")
        .await
        .collect()
        .await;
    assert_eq!(events.last().unwrap()["type"], "complete", "{events:?}");
    assert_eq!(d.service("crashy").await["state"]["status"], "stopped");
    // It stays stopped: nothing starts it over a window longer than its backoff.
    let watch = d.get("/v1/services/crashy/logs?lines=0&duration=3s").await;
    let events = Ndjson::new(watch).collect().await;
    assert!(
        of(&events, "started", "crashy").is_empty(),
        "restarted after stop: {events:?}"
    );
    let state = d.service("crashy").await["state"].clone();
    assert_eq!(state["status"], "stopped");
    assert!(state["next_restart_at"].is_null());
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn logs_tail_and_follow_keep_stdout_and_stderr_apart() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "logs_tail_and_follow_keep_stdout_and_stderr_apart"
    ));
    let d = Daemon::start().await;
    // stdout and stderr are two pipes: their relative order is only defined
    // across a round trip, so each line is printed once the previous was seen.
    let script = r#"trap 'echo two >&2' USR2; trap 'echo three' USR1; trap 'echo hup' HUP; echo one; while :; do sleep 0.05; done"#;
    let r = d
        .req(
            Method::PUT,
            "/v1/services/talker?duration=30s",
            Some(sh(script)),
        )
        .await;
    let mut s = Ndjson::new(r);
    s.until(|e| e["type"] == "stdout" && e["data"] == "one\n")
        .await;
    for (signal, line) in [("USR2", "two\n"), ("SIGUSR1", "three\n")] {
        let body = json!({"name": "talker", "signal": signal});
        assert_eq!(
            d.req(Method::POST, "/v1/services/signal", Some(body))
                .await
                .status(),
            204
        );
        s.until(|e| e["data"] == line).await;
    }
    drop(s);

    let tail = Ndjson::new(d.get("/v1/services/talker/logs?lines=2").await)
        .collect()
        .await;
    let lines: Vec<(&str, &str)> = tail
        .iter()
        .filter(|e| e["type"] != "complete")
        .map(|e| (e["type"].as_str().unwrap(), e["data"].as_str().unwrap()))
        .collect();
    assert_eq!(lines, [("stderr", "two\n"), ("stdout", "three\n")]);
    let complete = tail.last().unwrap();
    assert_eq!(complete["type"], "complete");
    assert!(
        complete["log_files"]["stdout"]
            .as_str()
            .unwrap()
            .ends_with("logs/services/talker.log")
    );

    // Following: a line printed during the window arrives.
    let mut follow = Ndjson::new(d.get("/v1/services/talker/logs?lines=0&duration=10s").await);
    let r = d
        .req(
            Method::POST,
            "/v1/services/signal",
            Some(json!({"name": "talker", "signal": "HUP"})),
        )
        .await;
    assert_eq!(r.status(), 204);
    follow
        .until(|e| e["type"] == "stdout" && e["data"] == "hup\n")
        .await;

    // The log file has one line per output line, typed.
    let file = std::fs::read_to_string(d.state_dir.join("logs/services/talker.log")).unwrap();
    assert!(file.lines().any(|l| l.ends_with(" [stderr] two")), "{file}");
    assert!(file.lines().any(|l| l.ends_with(" [stdout] hup")), "{file}");

    // Signal errors.
    let r = d
        .req(
            Method::POST,
            "/v1/services/signal",
            Some(json!({"name": "talker", "signal": "BOGUS"})),
        )
        .await;
    assert_eq!(r.status(), 400);
    let r = d
        .req(
            Method::POST,
            "/v1/services/signal",
            Some(json!({"name": "ghost", "signal": "TERM"})),
        )
        .await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn definitions_survive_restarts_and_come_back_in_order() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "definitions_survive_restarts_and_come_back_in_order"
    ));
    let mut d = Daemon::start().await;
    d.put_service("db", sh("exec sleep 1000"), "0").await;
    d.put_service("web", with_needs(sh("exec sleep 1000"), &["db"]), "0")
        .await;
    d.put_service("idle", sh("exec sleep 1000"), "0").await;
    d.post_stream("/v1/services/idle/stop?timeout=2s")
        .await
        .collect()
        .await;
    let state_dir = d.state_dir.clone();

    // Clean restart.
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit().await.code(), Some(0));
    let mut d = Daemon::start_with(Options {
        state_dir: Some(state_dir.clone()),
        ..Default::default()
    })
    .await;
    assert_started_in_order(&d).await;
    assert_eq!(
        d.service("idle").await["state"]["status"],
        "stopped",
        "a service stopped by the user stays stopped"
    );

    // kill -9: the old processes are killed and the services start afresh.
    let old_inside = d.service("web").await["state"]["pid"].as_i64().unwrap();
    let old = d.host_pid(old_inside as i32).await as i64;
    d.signal(Signal::SIGKILL);
    d.wait_exit().await;
    let d2 = Daemon::start_with(Options {
        state_dir: Some(state_dir.clone()),
        ..Default::default()
    })
    .await;
    assert!(!alive(old), "process {old} of the killed daemon survived");
    assert_started_in_order(&d2).await;
    assert!(d2.service("web").await["state"]["pid"].as_i64().unwrap() > 0);
    drop(d);
}

async fn assert_started_in_order(d: &Daemon) {
    let (db, web) = (d.service("db").await, d.service("web").await);
    assert_eq!(db["state"]["status"], "running", "{db}");
    assert_eq!(web["state"]["status"], "running", "{web}");
    let t =
        |v: &Value| humantime::parse_rfc3339(v["state"]["started_at"].as_str().unwrap()).unwrap();
    assert!(t(&db) <= t(&web));
    let pid = d
        .host_pid(web["state"]["pid"].as_i64().unwrap() as i32)
        .await;
    assert!(alive(pid as i64));
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn one_http_port_and_it_gates_running() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("one_http_port_and_it_gates_running"));
    let d = Daemon::start_host_network().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let spec = json!({"cmd": "python3", "args": ["-m", "http.server", port.to_string(), "--bind", "127.0.0.1"], "http_port": port});
    let events = d.put_service("web", spec, "0").await;
    assert!(!of(&events, "started", "web").is_empty(), "{events:?}");
    // Running means the port accepts connections.
    assert_eq!(d.service("web").await["state"]["status"], "running");
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("http_port accepts once running");
    let r = d
        .req(
            Method::PUT,
            "/v1/services/other",
            Some(json!({"cmd": "true", "http_port": port + 1})),
        )
        .await;
    assert_eq!(r.status(), 409);
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn sprite_env_services_commands() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("sprite_env_services_commands"));
    let d = Daemon::start().await;
    let out = d
        .cli(&[
            "services",
            "create",
            "cli",
            "--cmd",
            "sh",
            "--args=-c,echo from-cli; exec sleep 1000",
            "--env",
            "A=1",
            "--duration",
            "0.5s",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "stdout" && e["data"] == "from-cli\n"),
        "{events:?}"
    );

    let list: Value = serde_json::from_slice(&d.cli(&["services", "list"]).await.stdout).unwrap();
    assert_eq!(list[0]["name"], "cli");
    assert_eq!(list[0]["env"]["A"], "1");
    let logs = d.cli(&["services", "logs", "cli", "--lines", "1"]).await;
    assert!(String::from_utf8_lossy(&logs.stdout).contains("from-cli"));
    assert!(
        d.cli(&["services", "signal", "cli", "CONT"])
            .await
            .status
            .success()
    );
    let stop = d.cli(&["services", "stop", "cli", "--timeout", "2s"]).await;
    assert!(String::from_utf8_lossy(&stop.stdout).contains("\"stopped\""));
    let again = d.cli(&["services", "stop", "cli"]).await;
    assert_eq!(
        again.status.code(),
        Some(sprited::cli::EXIT_HTTP_ERROR as i32)
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("409"));
    assert!(d.cli(&["services", "delete", "cli"]).await.status.success());
    let gone = d.cli(&["services", "get", "cli"]).await;
    assert!(String::from_utf8_lossy(&gone.stderr).contains("404"));
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn orphans_of_services_are_reaped() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("orphans_of_services_are_reaped"));
    let d = Daemon::start().await;
    // Twenty double-forked children: their parents exit at once, so they are
    // reparented to the daemon (a subreaper) and exit there.
    let script = "for i in $(seq 20); do (sh -c 'exit 0' &) ; done; echo spawned; exec sleep 1000";
    let r = d
        .req(
            Method::PUT,
            "/v1/services/forker?duration=30s",
            Some(sh(script)),
        )
        .await;
    Ndjson::new(r).until(|e| e["data"] == "spawned\n").await;
    let daemon = d.pid();
    let zombies = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
            .filter(|stat| {
                let rest = stat
                    .rsplit_once(')')
                    .map(|(_, r)| r.trim_start().to_owned())
                    .unwrap_or_default();
                let mut f = rest.split_whitespace();
                f.next() == Some("Z") && f.next() == Some(&daemon.to_string())
            })
            .count()
    };
    // Reaping happens on SIGCHLD; give it a bounded moment, checking as it goes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while zombies() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(zombies(), 0, "zombies accumulate under the daemon");
}
