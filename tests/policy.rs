//! Policies (issue 20): the privileges policy restricts what processes
//! started afterwards hold, persists across a restart and rejects bad
//! bodies naming the field; only the external API (TCP with the token, or
//! root on the host) may change a policy, never a caller inside the
//! environment.

mod common;

use common::{Daemon, Options, TOKEN, privileged};
use serde_json::{Value, json};

/// `sh -c script` inside the environment through the CLI: (exit status,
/// stdout, stderr).
async fn sh(d: &Daemon, script: &str) -> (i32, String, String) {
    let out = d.cli(&["exec", "--", "sh", "-c", script]).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Opens a raw ICMP socket (what `ping` does without the ping group):
/// "raw ok", or the error.
const RAW_SOCKET: &str = "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); print(\"raw ok\")'";

/// The capability bounding set of a new process, from its /proc status.
async fn bounding_set(d: &Daemon) -> u64 {
    let (rc, out, err) = sh(d, "grep CapBnd /proc/self/status").await;
    assert_eq!(rc, 0, "{err}");
    u64::from_str_radix(out.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

/// Puts in force a privileges policy under which new processes may open
/// only `/dev/null`.
async fn only_dev_null(d: &Daemon) {
    let (status, got) = policy(
        d,
        reqwest::Method::POST,
        Some(json!({"devices": ["/dev/null"]})),
    )
    .await;
    assert_eq!(status, 200, "{got}");
}

async fn policy(d: &Daemon, method: reqwest::Method, body: Option<Value>) -> (u16, Value) {
    let r = d.req(method, "/v1/policy/privileges", body).await;
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

const NET_RAW: u64 = 1 << 13;

/// Each body POSTed to `path` is a 400 whose message starts with its
/// field's name and does not echo a huge value.
async fn refused(d: &Daemon, path: &str, cases: Vec<(Value, &str)>) {
    for (body, field) in cases {
        let r = d.req(reqwest::Method::POST, path, Some(body)).await;
        assert_eq!(r.status(), 400, "{field}");
        let v: Value = r.json().await.unwrap();
        let msg = v["error"].as_str().unwrap();
        assert!(msg.starts_with(&format!("{field}:")), "{msg}");
        assert!(msg.len() < 1000, "the message does not echo a huge field");
    }
}

/// Acceptance 3 and 6 (privileges): dropping CAP_NET_RAW makes a raw
/// socket (ping's) fail with a permission error in a new exec, and the
/// policy survives a restart; DELETE restores it for the next exec; bad
/// bodies are 400s naming the field, and the previous policy stays.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_privileges_policy_restricts_new_processes_and_delete_restores_them() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_privileges_policy_restricts_new_processes_and_delete_restores_them"
    ));
    let d = Daemon::start().await;
    let (rc, out, err) = sh(&d, RAW_SOCKET).await;
    assert_eq!((rc, out.as_str()), (0, "raw ok\n"), "{err}");
    assert_ne!(bounding_set(&d).await & NET_RAW, 0);
    assert_eq!(policy(&d, reqwest::Method::GET, None).await.0, 200);

    // Over TCP with the token (the SDK's path).
    let r = d
        .http
        .post(d.url("/v1/sprites/testsprite/policy/privileges"))
        .bearer_auth(TOKEN)
        .json(&json!({"dropCapabilities": ["CAP_NET_RAW"], "noNewPrivileges": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (rc, out, err) = sh(&d, RAW_SOCKET).await;
    assert_ne!(rc, 0, "{out}");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(bounding_set(&d).await & NET_RAW, 0);
    let (_, nnp, _) = sh(&d, "grep NoNewPrivs /proc/self/status").await;
    assert!(nnp.trim().ends_with('1'), "{nnp}");
    let (status, got) = policy(&d, reqwest::Method::GET, None).await;
    assert_eq!(status, 200);
    assert_eq!(got["dropCapabilities"], json!(["CAP_NET_RAW"]), "{got}");
    assert_eq!(got["noNewPrivileges"], true, "{got}");

    // Hostile or wrong bodies: a 400 naming the field; nothing changes.
    let many: Vec<&str> = vec!["NET_RAW"; 100_000];
    refused(
        &d,
        "/v1/policy/privileges",
        vec![
            (json!({"profile": "privileged"}), "profile"),
            (json!({"profile": "x".repeat(1 << 20)}), "profile"),
            (json!({"dropCapabilities": many}), "dropCapabilities"),
            (
                json!({"dropCapabilities": ["CAP_BOGUS"]}),
                "dropCapabilities[0]",
            ),
            (json!({"devices": ["/dev/fuse"]}), "devices[0]"),
            (json!({"action": "allow"}), "body"),
        ],
    )
    .await;
    assert_eq!(policy(&d, reqwest::Method::GET, None).await.1, got);

    // Kept across a restart of the daemon (the first one's temp dir, which
    // holds the state dir, lives on in `first`).
    let mut first = d;
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(first.wait_exit().await.success());
    let d = Daemon::start_with(Options {
        state_dir: Some(first.state_dir.clone()),
        ..Default::default()
    })
    .await;
    assert_eq!(policy(&d, reqwest::Method::GET, None).await.1, got);
    assert_eq!(bounding_set(&d).await & NET_RAW, 0);

    let (status, _) = policy(&d, reqwest::Method::DELETE, None).await;
    assert_eq!(status, 200);
    let (rc, out, err) = sh(&d, RAW_SOCKET).await;
    assert_eq!((rc, out.as_str()), (0, "raw ok\n"), "{err}");
    assert_eq!(
        policy(&d, reqwest::Method::GET, None).await.1,
        json!({"profile": "", "devices": [], "noNewPrivileges": false, "dropCapabilities": []})
    );
}

/// Devices: a policy naming `/dev/null` only lets new processes open
/// /dev/null and nothing else of the environment's /dev (a cgroup device
/// program on each new process's cgroup), and DELETE gives the next one
/// every device again.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_devices_policy_limits_what_new_processes_open() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_devices_policy_limits_what_new_processes_open"
    ));
    let d = Daemon::start().await;
    const READ_ZERO: &str = "head -c 3 /dev/zero | wc -c";
    let (rc, out, err) = sh(&d, READ_ZERO).await;
    assert_eq!((rc, out.trim()), (0, "3"), "{err}");
    only_dev_null(&d).await;
    let (rc, out, err) = sh(&d, READ_ZERO).await;
    assert_eq!(out.trim(), "0", "{rc} {err}");
    assert!(err.contains("Operation not permitted"), "{err}");
    let (rc, out, err) = sh(&d, "echo hidden > /dev/null && echo null ok").await;
    assert_eq!((rc, out.as_str()), (0, "null ok\n"), "{err}");
    // Nor any other device: /dev/urandom.
    let (rc, out, err) = sh(&d, "head -c 1 /dev/urandom > /dev/null").await;
    assert_ne!(rc, 0, "{out}");
    assert!(err.contains("Operation not permitted"), "{err}");

    let (status, _) = policy(&d, reqwest::Method::DELETE, None).await;
    assert_eq!(status, 200);
    let (rc, out, err) = sh(&d, READ_ZERO).await;
    assert_eq!((rc, out.trim()), (0, "3"), "{err}");
}

/// Signals the `probe` service's process `pid` and returns what it says of
/// reading /dev/zero.
async fn probe_zero(d: &Daemon, pid: i32) -> String {
    use common::counter::{data, follow};
    let host = d.host_pid(pid).await;
    let mut s = follow(d, "probe").await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    let evs = s.until(|e| data(e).starts_with("zero")).await;
    data(evs.last().unwrap()).trim().to_owned()
}

/// The devices policy holds for processes a restore brings back too: CRIU
/// restores every task into the init's cgroup and the daemon moves each
/// back to its own, which gets the device program of the policy in force
/// first (as a process the launcher starts does).
#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root and CRIU (scripts/test.sh)"
)]
async fn a_restored_service_keeps_the_devices_policy() {
    use common::counter::{pid_of, restore_with_memory, start};
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(common::with_criu(
        "a_restored_service_keeps_the_devices_policy"
    ));
    // On SIGUSR1 it tries to read /dev/zero and says how that went.
    const PROBE: &str = r#"
import signal, sys, time
def probe(*_):
    try:
        open("/dev/zero", "rb").read(1)
        print("zero read", flush=True)
    except OSError as e:
        print("zero refused", e.errno, flush=True)
signal.signal(signal.SIGUSR1, probe)
while True:
    time.sleep(1)
"#;
    let d = Daemon::start().await;
    only_dev_null(&d).await;
    let st = start(
        &d,
        "probe",
        json!({"cmd": "python3", "args": ["-u", "-c", PROBE]}),
    )
    .await;
    let pid = pid_of(&st);
    assert_eq!(probe_zero(&d, pid).await, "zero refused 1", "EPERM before");
    d.checkpoint("restricted").await;
    restore_with_memory(&d, "v1", "probe").await;
    assert_eq!(
        probe_zero(&d, pid).await,
        "zero refused 1",
        "EPERM after the restore"
    );
}

/// Acceptance 5 (scope): from inside the environment, the Unix socket it
/// sees refuses a policy change with a 403 naming the external API, while
/// a checkpoint works; root on the host (the same socket from outside)
/// and TCP with the token may change it.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn only_the_external_api_changes_a_policy() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("only_the_external_api_changes_a_policy"));
    let d = Daemon::start().await;
    let (rc, out, err) = sh(
        &d,
        "sprite-env curl -i -X POST /v1/policy/privileges -d '{\"profile\":\"minimal\"}'",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{rc} {out} {err}");
    assert_ne!(rc, 0);
    assert!(err.contains("External API"), "{err}");
    let (rc, out, _) = sh(&d, "sprite-env curl -i -X DELETE /v1/policy/privileges").await;
    assert!(out.starts_with("HTTP/1.1 403"), "{rc} {out}");
    // Reading is fine inside; so is a checkpoint.
    let (rc, out, _) = sh(&d, "sprite-env curl /v1/policy/privileges").await;
    assert_eq!(rc, 0);
    assert!(out.contains("\"profile\""), "{out}");
    let (rc, out, err) = sh(&d, "sprite-env checkpoint create -m inside").await;
    assert_eq!(rc, 0, "{out} {err}");
    assert_eq!(d.get("/v1/checkpoints/v1").await.status(), 200);
    // Still the default policy.
    assert_ne!(bounding_set(&d).await & NET_RAW, 0);

    // Root on the host, through the same socket: allowed.
    let out = d
        .cli(&[
            "curl",
            "-X",
            "POST",
            "/v1/policy/privileges",
            "-d",
            "{\"profile\":\"minimal\"}",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(bounding_set(&d).await & NET_RAW, 0);
    // TCP with the token: allowed.
    let r = d
        .http
        .delete(d.url("/v1/policy/privileges"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_ne!(bounding_set(&d).await & NET_RAW, 0);
}

/// The resources policy on this host. It is enforced or refused, never
/// only stored: where the daemon's cgroup v2 offers no memory controller
/// (this dev VM: memory is on cgroup v1), a 503 naming it and nothing
/// stored; where it does, `memory.max` of the environment is set and
/// lifted (the OOM kill itself is tested in the VM tier, on Debian's
/// kernel). Bad bodies are 400s naming the field; from inside, a 403.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_resources_policy_is_enforced_or_refused_never_only_stored() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_resources_policy_is_enforced_or_refused_never_only_stored"
    ));
    let d = Daemon::start().await;
    let status = d.status().await;
    let mount = std::path::PathBuf::from(status["cgroup"]["mount"].as_str().unwrap());
    let parent = std::path::PathBuf::from(status["cgroup"]["parent"].as_str().unwrap());
    let offered = std::fs::read_to_string(mount.join("cgroup.controllers"))
        .unwrap()
        .split_whitespace()
        .any(|c| c == "memory");
    let r = d
        .req(
            reqwest::Method::POST,
            "/v1/sprites/testsprite/policy/resources",
            Some(json!({"memory": {"limit_mb": 64}})),
        )
        .await;
    let code = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    let get = || async {
        d.req(reqwest::Method::GET, "/v1/policy/resources", None)
            .await
            .json::<Value>()
            .await
            .unwrap()
    };
    if offered {
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            body,
            json!({"memory": {"limit_mb": 64, "autoscale": false}})
        );
        let max = std::fs::read_to_string(parent.join("memory.max")).unwrap();
        assert_eq!(max.trim(), (64u64 << 20).to_string());
        assert_eq!(get().await, body);
        let r = d
            .req(reqwest::Method::DELETE, "/v1/policy/resources", None)
            .await;
        assert_eq!(r.status(), 200);
        let max = std::fs::read_to_string(parent.join("memory.max")).unwrap();
        assert_eq!(max.trim(), "max");
    } else {
        assert_eq!(code, 503, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("memory controller"),
            "{body}"
        );
        assert!(
            !d.state_dir.join("policy/resources.json").exists(),
            "a policy not enforced is not stored"
        );
    }
    assert_eq!(get().await, json!({}));
    refused(
        &d,
        "/v1/policy/resources",
        vec![
            (json!({"memory": {"limit_mb": 1}}), "memory.limit_mb"),
            (
                json!({"memory": {"limit_mb": 64, "autoscale": true}}),
                "memory.autoscale",
            ),
            (json!({"memory": {"limitMB": 64}}), "body"),
            (json!({"cpu": "x".repeat(1 << 20)}), "body"),
        ],
    )
    .await;
    let (_, out, err) = sh(
        &d,
        "sprite-env curl -i -X POST /v1/policy/resources -d '{\"memory\":{\"limit_mb\":64}}'",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out} {err}");
}

/// The network policy: none is in force (GET: no rules); a valid one is
/// checked and refused with a 501 (the environment has no network
/// namespace of its own yet, so it could not be enforced); hostile bodies
/// are 400s naming the field; from inside, a 403 before anything.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_network_policy_is_checked_and_refused_until_it_can_be_enforced() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_network_policy_is_checked_and_refused_until_it_can_be_enforced"
    ));
    let d = Daemon::start_host_network().await;
    let status = d.status().await;
    assert_eq!(
        status["network"],
        json!({"mode": "host", "policy_enforced": false})
    );
    let get = d
        .req(reqwest::Method::GET, "/v1/policy/network", None)
        .await;
    assert_eq!(get.json::<Value>().await.unwrap(), json!({"rules": []}));
    let post = |body: Value| d.req(reqwest::Method::POST, "/v1/policy/network", Some(body));
    let r = post(json!({"rules": [{"action": "allow", "domain": "a.test"}, {"action": "deny", "domain": "*"}]})).await;
    assert_eq!(r.status(), 501);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("not enforced"), "{v}");
    let many: Vec<Value> = (0..100_000)
        .map(|_| json!({"action": "deny", "domain": "*"}))
        .collect();
    refused(
        &d,
        "/v1/policy/network",
        vec![
            (json!({"rules": many}), "rules"),
            (
                json!({"rules": [{"action": "allow", "domain": "x".repeat(1 << 20)}]}),
                "rules[0].domain",
            ),
            (
                json!({"rules": [{"action": "allow", "domain": "bad domain"}]}),
                "rules[0].domain",
            ),
            (
                json!({"rules": [{"action": "block", "domain": "a.test"}]}),
                "rules[0].action",
            ),
        ],
    )
    .await;
    let (_, out, err) = sh(
        &d,
        "sprite-env curl -i -X POST /v1/policy/network -d '{\"rules\":[]}'",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out} {err}");
    assert!(err.contains("External API"), "{err}");
}

/// An internal error (here: the policy cannot be stored, `policy` being a
/// file in the state dir) is a 500 whose body names no host path, only a
/// reference to the log line that has the details; the policy in force
/// is unchanged.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn an_internal_error_keeps_host_paths_in_the_log() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("an_internal_error_keeps_host_paths_in_the_log"));
    let d = Daemon::start().await;
    std::fs::write(d.state_dir.join("policy"), b"in the way").unwrap();
    let r = d
        .req(
            reqwest::Method::POST,
            "/v1/policy/privileges",
            Some(json!({"profile": "minimal"})),
        )
        .await;
    assert_eq!(r.status(), 500);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"].as_str().unwrap();
    assert!(msg.starts_with("internal error #"), "{msg}");
    let state = d.state_dir.display().to_string();
    assert!(!msg.contains(&state) && !msg.contains("/tmp"), "{msg}");
    d.log_shows("error_id=").await;
    assert!(
        d.log_text().contains(&format!("{state}/policy")),
        "the log has the path"
    );
    assert_ne!(
        bounding_set(&d).await & NET_RAW,
        0,
        "the default set is in force"
    );
}
