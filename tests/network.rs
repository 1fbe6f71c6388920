//! The network policy (issue 20), enforced in the environment's own network
//! namespace (`--network own`). Everything happens in namespaces this test
//! makes: the daemon runs in one ("world"), linked to another ("upstream")
//! that holds a stand-in DNS server and an HTTP server per name (a.test,
//! b.test). No other address is ever contacted.

mod common;

use std::process::Stdio;

use common::{Daemon, Options, TOKEN, ip, privileged};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const DNS: &str = "10.99.0.2";
const A: &str = "10.99.0.10";
const B: &str = "10.99.0.20";

/// The two namespaces and the servers in "upstream"; removed on drop.
struct World {
    world: String,
    servers: tokio::process::Child,
    // (dropped after the servers are killed)
    _namespaces: [common::Netns; 2],
}

impl World {
    async fn new() -> World {
        let id = std::process::id();
        let (world, upstream) = (format!("sprw{id}"), format!("spru{id}"));
        let (w_if, u_if) = (format!("nw{id}"), format!("nu{id}"));
        let namespaces = [
            common::Netns::new(world.clone()),
            common::Netns::new(upstream.clone()),
        ];
        ip(&["link", "add", &w_if, "type", "veth", "peer", "name", &u_if]);
        ip(&["link", "set", &w_if, "netns", &world]);
        ip(&["link", "set", &u_if, "netns", &upstream]);
        ip(&["-n", &world, "addr", "add", "10.99.0.1/24", "dev", &w_if]);
        ip(&["-n", &world, "link", "set", &w_if, "up"]);
        for a in [DNS, A, B] {
            ip(&[
                "-n",
                &upstream,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                &u_if,
            ]);
        }
        ip(&["-n", &upstream, "link", "set", &u_if, "up"]);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/programs/networld.py");
        let mut servers = tokio::process::Command::new("ip")
            .args(["netns", "exec", &upstream, "python3", script, DNS, A, B])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(servers.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(common::WAIT, lines.next_line()).await;
        assert!(
            matches!(&first, Ok(Ok(Some(l))) if l == "ready"),
            "the upstream servers did not start: {first:?}"
        );
        World {
            world,
            servers,
            _namespaces: namespaces,
        }
    }

    /// `curl` run in the world namespace (where the daemon's TCP API and
    /// ingress listen): (exit code, output).
    async fn curl(&self, args: &[&str]) -> (i32, String) {
        let out = tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.world,
                "curl",
                "-sS",
                "--max-time",
                "20",
            ])
            .args(args)
            .output()
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.servers.start_kill();
    }
}

/// GETs /hi.txt of the `web` service through the ingress and through a
/// CONNECT tunnel of the API, from the world namespace.
async fn reach(world: &World, ingress: &str, api: &str) -> ((i32, String), (i32, String)) {
    let through_ingress = world.curl(&[&format!("http://{ingress}/hi.txt")]).await;
    let through_proxy = world
        .curl(&[
            "--proxytunnel",
            "-x",
            &format!("http://{api}"),
            "--proxy-header",
            &format!("Authorization: Bearer {TOKEN}"),
            "http://127.0.0.1:8080/hi.txt",
        ])
        .await;
    (through_ingress, through_proxy)
}

/// `sh -c script` inside the environment: (exit status, stdout + stderr).
async fn sh(d: &Daemon, script: &str) -> (i32, String) {
    let out = d.cli(&["exec", "--", "sh", "-c", script]).await;
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// POSTs a network policy: (status, body).
async fn set_policy(d: &Daemon, rules: Value) -> (u16, String) {
    let (code, body) = d
        .unix
        .call(
            reqwest::Method::POST,
            "/v1/policy/network",
            Some(json!({ "rules": rules })),
        )
        .await
        .unwrap();
    (code.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

/// The rcode the environment's resolver gives a lookup of `name`.
const LOOKUP: &str = r#"python3 - NAME <<'EOF'
import socket, struct, sys
labels = b"".join(bytes([len(l)]) + l.encode() for l in sys.argv[1].split("."))
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1)
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(20)
s.sendto(q, (ns, 53))
print("rcode", s.recv(4096)[3] & 15)
EOF"#;

/// Connects to a.test:81 (a port that never answers), says so, and says
/// when the connection ends.
const HOLD: &str = r#"import socket
s = socket.create_connection(("a.test", 81))
print("connected", flush=True)
try:
    print("closed", s.recv(1), flush=True)
except OSError as e:
    print("closed", e, flush=True)
"#;

#[tokio::test]
#[cfg_attr(
    not(privileged_tests),
    ignore = "needs root (network namespaces, nftables)"
)]
async fn a_network_policy_filters_lookups_and_addresses_and_holds_across_a_restore() {
    assert!(privileged("network policy"));
    let world = World::new().await;
    let d = Daemon::start_with(Options {
        netns: Some(world.world.clone()),
        extra: vec![
            "--network".into(),
            "own".into(),
            "--dns-upstream".into(),
            DNS.into(),
            "--http-ingress".into(),
            "127.0.0.1:0".into(),
        ],
        ..Default::default()
    })
    .await;

    let status = d.status().await;
    assert_eq!(status["network"]["mode"], "own", "{status}");
    assert_eq!(status["network"]["policy_enforced"], true, "{status}");
    // No policy: everything allowed, by name and by address.
    let (rc, out) = sh(&d, "curl -sS --max-time 20 http://b.test/").await;
    assert_eq!((rc, out.as_str()), (0, "site b\n"), "{}", d.log_text());
    let (rc, out) = sh(&d, &format!("curl -sS --max-time 20 http://{A}/")).await;
    assert_eq!((rc, out.as_str()), (0, "site a\n"));

    let (code, body) = set_policy(
        &d,
        json!([{"action": "allow", "domain": "a.test"}, {"action": "deny", "domain": "*"}]),
    )
    .await;
    assert_eq!(code, 204, "{body}");
    let (_, got) = d.unix.get_json("/v1/policy/network").await.unwrap();
    assert_eq!(got["rules"][0]["domain"], "a.test");

    let (rc, out) = sh(&d, "curl -sS --max-time 20 http://a.test/").await;
    assert_eq!((rc, out.as_str()), (0, "site a\n"), "{}", d.log_text());
    let (rc, out) = sh(&d, "curl -sS --max-time 20 http://b.test/").await;
    assert_ne!(rc, 0, "b.test is denied: {out}");
    assert!(out.contains("resolve"), "{out}");
    let (rc, out) = sh(&d, &LOOKUP.replace("NAME", "b.test")).await;
    assert_eq!((rc, out.trim()), (0, "rcode 5"), "REFUSED");
    let (rc, out) = sh(&d, &LOOKUP.replace("NAME", "a.test")).await;
    assert_eq!((rc, out.trim()), (0, "rcode 0"));
    let (rc, out) = sh(&d, &format!("curl -sS --max-time 20 http://{B}/")).await;
    assert_ne!(rc, 0, "b's address is not reachable directly: {out}");

    // Root inside cannot touch the rules: they are not in its namespace,
    // and it may not change its own namespace's either.
    // (the host's nft and iptables, with their libraries and loader)
    let tools = d.env_root().join("opt/net");
    std::fs::create_dir_all(&tools).unwrap();
    for bin in ["/usr/sbin/nft", "/usr/sbin/xtables-nft-multi"] {
        let ldd = std::process::Command::new("ldd").arg(bin).output().unwrap();
        std::fs::copy(
            bin,
            tools.join(std::path::Path::new(bin).file_name().unwrap()),
        )
        .unwrap();
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let name = std::path::Path::new(lib).file_name().unwrap();
            std::fs::copy(lib, tools.join(name)).unwrap();
        }
    }
    let (rc, out) = sh(
        &d,
        "run() { /opt/net/ld-linux-x86-64.so.2 --library-path /opt/net \"$@\"; }; \
         run /opt/net/nft flush ruleset; echo nft=$?; \
         run /opt/net/xtables-nft-multi iptables -F; echo iptables=$?; \
         ip route del default; ip link set eth0 down; id -u",
    )
    .await;
    assert_eq!(rc, 0, "{out}");
    // (root, refused: stdout first, then the errors)
    assert!(out.starts_with("nft=1\niptables=4\n0\n"), "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let (rc, _) = sh(&d, "curl -sS --max-time 20 http://a.test/").await;
    assert_eq!(rc, 0, "a.test still allowed");
    let (rc, _) = sh(&d, &format!("curl -sS --max-time 20 http://{B}/")).await;
    assert_ne!(rc, 0, "b still blocked");

    // An open connection to a.test is closed when a.test is denied.
    let mut hold = d
        .cli_command(["exec", "--", "python3", "-c", HOLD])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(hold.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(common::WAIT, lines.next_line()).await;
    assert!(
        matches!(&first, Ok(Ok(Some(l))) if l == "connected"),
        "{first:?}"
    );
    let (code, body) = set_policy(
        &d,
        json!([{"action": "deny", "domain": "a.test"}, {"action": "deny", "domain": "*"}]),
    )
    .await;
    assert_eq!(code, 204, "{body}");
    let closed = tokio::time::timeout(common::WAIT, lines.next_line()).await;
    assert!(
        matches!(&closed, Ok(Ok(Some(l))) if l.starts_with("closed")),
        "the connection stayed open: {closed:?}"
    );
    let (rc, _) = sh(&d, &format!("curl -sS --max-time 20 http://{A}/")).await;
    assert_ne!(rc, 0, "a's address is blocked now");

    // A checkpoint and restore keep the policy and the listening service,
    // reachable through the proxy and the ingress.
    let out = d
        .cli(&[
            "curl",
            "-X",
            "PUT",
            "/v1/services/web?duration=0",
            "-d",
            r#"{"cmd":"python3","args":["-m","http.server","8080","--bind","127.0.0.1","--directory","/srv"],"http_port":8080}"#,
        ])
        .await;
    assert!(out.status.success(), "{out:?}");
    std::fs::create_dir_all(d.env_root().join("srv")).unwrap();
    std::fs::write(d.env_root().join("srv/hi.txt"), "inside\n").unwrap();
    let (_, status) = d.unix.get_json("/v1/status").await.unwrap();
    let ingress = status["listen"]["http_ingress"]
        .as_str()
        .unwrap()
        .to_owned();
    let api = status["listen"]["tcp"].as_str().unwrap().to_owned();
    let before = reach(&world, &ingress, &api).await;
    assert_eq!(before, ((0, "inside\n".into()), (0, "inside\n".into())));
    let out = d.cli(&["checkpoint", "create", "-m", "net"]).await;
    assert!(out.status.success(), "{out:?}\n{}", d.log_text());
    // Lifted after the checkpoint: the restore puts the checkpoint's back.
    let (code, _) = d
        .unix
        .call(reqwest::Method::DELETE, "/v1/policy/network", None)
        .await
        .map(|(c, b)| (c.as_u16(), b))
        .unwrap();
    assert_eq!(code, 200);
    let (rc, out) = sh(&d, &format!("curl -sS --max-time 20 http://{B}/")).await;
    assert_eq!((rc, out.as_str()), (0, "site b\n"), "lifted");
    let out = d.cli(&["checkpoint", "restore", "v1"]).await;
    assert!(out.status.success(), "{out:?}\n{}", d.log_text());
    let (_, got) = d.unix.get_json("/v1/policy/network").await.unwrap();
    assert_eq!(got["rules"][0]["domain"], "a.test", "{got}");
    assert_eq!(got["rules"][0]["action"], "deny", "{got}");
    let after = reach(&world, &ingress, &api).await;
    assert_eq!(after, ((0, "inside\n".into()), (0, "inside\n".into())));
    let (rc, _) = sh(&d, &format!("curl -sS --max-time 20 http://{B}/")).await;
    assert_ne!(rc, 0, "still blocked after the restore");
    // A cold sleep dumps the tree with its namespace; a wake brings both.
    for step in [&["sleep", "--cold"][..], &["wake"]] {
        let out = d.cli(step).await;
        assert!(out.status.success(), "{step:?}: {out:?}\n{}", d.log_text());
    }
    assert_eq!(
        reach(&world, &ingress, &api).await,
        ((0, "inside\n".into()), (0, "inside\n".into()))
    );
    let (rc, _) = sh(&d, &format!("curl -sS --max-time 20 http://{B}/")).await;
    assert_ne!(rc, 0, "still blocked after a wake");

    // A restore asked from inside keeps the policy in force: v2, the undo
    // point of the restore above, was taken with the policy lifted, and
    // would lift it again if code inside could restore it with its policy.
    let v2: Value =
        serde_json::from_str(&common::read(&d.state_dir.join("checkpoints/v2/meta.json"))).unwrap();
    assert!(v2["is_auto"].as_bool().unwrap(), "{v2}");
    assert!(v2["policies"].is_object(), "recorded: {v2}");
    assert!(v2["policies"]["network"].is_null(), "none in force: {v2}");
    std::fs::write(d.env_root().join("srv/after-v2.txt"), "later\n").unwrap();
    let _ = sh(
        &d,
        "sprite-env curl -X POST /restore -d '{\"checkpoint_id\":\"v2\"}'",
    )
    .await;
    d.log_shows("Restored to v2").await;
    assert!(
        !d.env_root().join("srv/after-v2.txt").exists(),
        "the files are v2's"
    );
    let (_, got) = d.unix.get_json("/v1/policy/network").await.unwrap();
    assert_eq!(got["rules"][0]["domain"], "a.test", "{got}");
    let (rc, _) = sh(&d, &format!("curl -sS --max-time 20 http://{B}/")).await;
    assert_ne!(rc, 0, "still blocked after a restore asked from inside");

    // Only the external API changes it: from inside, a 403; over TCP with
    // the token, in force.
    let (_, out) = sh(
        &d,
        "sprite-env curl -i -X POST /v1/policy/network -d '{\"rules\":[]}'",
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 403") && out.contains("External API"),
        "{out}"
    );
    let (rc, out) = world
        .curl(&[
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
            "-d",
            r#"{"rules":[{"action":"allow","domain":"*"}]}"#,
            &format!("http://{api}/v1/policy/network"),
        ])
        .await;
    assert_eq!(rc, 0, "{out}");
    let (_, got) = d.unix.get_json("/v1/policy/network").await.unwrap();
    assert_eq!(got, json!({"rules": [{"action": "allow", "domain": "*"}]}));
    let (rc, out) = sh(&d, "curl -sS --max-time 20 http://b.test/").await;
    assert_eq!((rc, out.as_str()), (0, "site b\n"), "allowed over TCP");
    let _ = hold.wait().await;
    drop(d);
}
