//! Exec, sessions, ports, proxies and the filesystem API, against the real
//! daemon with real clients: reqwest for HTTP and SSE, tokio-tungstenite for
//! WebSockets, raw TCP for CONNECT.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, NAME, TOKEN, WAIT, next, privileged, text, ws};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Server-sent events of a response, parsed incrementally.
struct Sse {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: Vec<u8>,
}

impl Sse {
    fn new(r: reqwest::Response) -> Self {
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        Sse {
            body: Box::pin(r.bytes_stream()),
            buf: Vec::new(),
        }
    }

    /// The next `(event, data)`.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..i + 2).collect();
                let text = String::from_utf8(block).unwrap();
                let mut event = String::new();
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(e) = line.strip_prefix("event: ") {
                        event = e.to_owned();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                return Some((event, serde_json::from_str(&data).unwrap()));
            }
            match tokio::time::timeout(WAIT, self.body.next()).await.unwrap() {
                Some(chunk) => self.buf.extend_from_slice(&chunk.unwrap()),
                None => return None,
            }
        }
    }
}

async fn post_exec(d: &Daemon, body: Value) -> Sse {
    Sse::new(d.req(reqwest::Method::POST, "/exec", Some(body)).await)
}

/// Pids whose command line contains `needle`.
fn procs_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(needle)
            && common::alive(pid as i64)
        {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn post_exec_streams_events_times_out_and_carries_50_mib() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "post_exec_streams_events_times_out_and_carries_50_mib"
    ));
    let d = Daemon::start().await;
    let mut s = post_exec(
        &d,
        json!({"command": ["sh", "-c", "echo out; echo err >&2; exit 7"]}),
    )
    .await;
    let mut events = Vec::new();
    while let Some(e) = s.next().await {
        events.push(e);
    }
    let find = |name: &str| {
        events
            .iter()
            .find(|(e, _)| e == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(find("stdout").unwrap()["data"], "out\n", "{events:?}");
    assert_eq!(find("stderr").unwrap()["data"], "err\n", "{events:?}");
    assert_eq!(events.last().unwrap().0, "exit");
    assert_eq!(events.last().unwrap().1["exit_code"], 7);

    // A timeout kills the whole tree (the shell and its sleep), then exits.
    let t = Instant::now();
    let mut s = post_exec(
        &d,
        json!({"command": ["sh", "-c", "sleep 60.4242 & sleep 60.4243; wait"], "timeout": 1_000_000_000u64}),
    )
    .await;
    let mut events = Vec::new();
    while let Some(e) = s.next().await {
        events.push(e);
    }
    let took = t.elapsed();
    let error = events
        .iter()
        .find(|(e, _)| e == "error")
        .expect("an error event");
    assert!(
        error.1["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 1s"),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap().0, "exit", "{events:?}");
    assert!(
        took < Duration::from_secs(30),
        "cut short, not run for 60 s: {took:?}"
    );
    eprintln!("sleep 60 with a 1 s timeout ended after {took:?}");
    assert!(
        procs_with("sleep 60.424").is_empty(),
        "a process outlived the timeout"
    );

    // 50 MiB arrive complete; the daemon's peak memory does not grow by it.
    const TOTAL: u64 = 50 * 1024 * 1024;
    let before = common::status_kib(d.pid(), "VmHWM:");
    let mut s = post_exec(
        &d,
        json!({"command": ["sh", "-c", format!("yes 0123456789abcdef | head -c {TOTAL}")]}),
    )
    .await;
    let (mut got, mut exit) = (0u64, None);
    let mut sample = Vec::new();
    while let Some((e, v)) = s.next().await {
        match e.as_str() {
            "stdout" => {
                let data = v["data"].as_str().unwrap();
                if sample.len() < 64 {
                    sample.extend_from_slice(data.as_bytes());
                }
                got += data.len() as u64;
            }
            "exit" => exit = Some(v["exit_code"].clone()),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(got, TOTAL);
    assert_eq!(exit, Some(json!(0)));
    assert!(sample.starts_with(b"0123456789abcdef\n0123456789abcdef\n"));
    let grew_kib = common::status_kib(d.pid(), "VmHWM:").saturating_sub(before);
    eprintln!("daemon peak RSS grew by {grew_kib} KiB while streaming 50 MiB");
    assert!(
        grew_kib < 32 * 1024,
        "peak RSS grew by {grew_kib} KiB: the output was buffered"
    );
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn http_exec_frames_and_stdin_body() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("http_exec_frames_and_stdin_body"));
    let d = Daemon::start().await;
    let r = d
        .http
        .post(d.url(&format!(
            "/v1/sprites/{NAME}/exec?cmd=sh&cmd=-c&cmd=cat%3B+echo+e+%3E%262%3B+exit+5&stdin=true"
        )))
        .bearer_auth(TOKEN)
        .body("from stdin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let body = r.bytes().await.unwrap();
    assert!(body.ends_with(&[3, 5]), "{body:?}");
    let mut out = Vec::new();
    let mut err = Vec::new();
    // Frames are [stream][payload]; walk them by known contents.
    let s = &body[..body.len() - 2];
    assert!(s.starts_with(&[1]) || s.starts_with(&[2]), "{s:?}");
    for part in [(&b"\x01from stdin"[..]), (&b"\x02e\n"[..])] {
        assert!(
            s.windows(part.len()).any(|w| w == part),
            "{part:?} in {s:?}"
        );
        if part[0] == 1 {
            out.extend_from_slice(&part[1..]);
        } else {
            err.extend_from_slice(&part[1..]);
        }
    }
    // TTY is refused here; a huge stdin is refused with 413.
    let r = d
        .req(reqwest::Method::POST, "/v1/exec?cmd=true&tty=true", None)
        .await;
    assert_eq!(r.status(), 400);
    let r = d
        .http
        .post(d.url("/v1/exec?cmd=cat&stdin=true"))
        .bearer_auth(TOKEN)
        .body(vec![b'x'; 11 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("larger than 10 MiB"));
    // The same without a content-length (chunked): cut off once 10 MiB arrived.
    let chunks = futures_util::stream::iter(
        (0..11).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 1024 * 1024])),
    );
    let r = d
        .http
        .post(d.url("/v1/exec?cmd=cat&stdin=true"))
        .bearer_auth(TOKEN)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Bad input is a 400 with a message, not a 500.
    let r = d
        .req(reqwest::Method::POST, "/exec", Some(json!({"command": []})))
        .await;
    assert_eq!(r.status(), 400);
    let r = d
        .req(
            reqwest::Method::POST,
            "/exec",
            Some(json!({"command": ["/no/such/program"]})),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("command not found"));
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn websocket_exec_cat_and_a_tty_session_that_survives_a_disconnect() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "websocket_exec_cat_and_a_tty_session_that_survives_a_disconnect"
    ));
    let d = Daemon::start().await;
    // cat: stdin comes back, EOF ends it with 0.
    let (mut s, headers) = ws(&d, "/exec?cmd=cat&stdin=true").await;
    assert_eq!(headers["x-sprite-capabilities"], "signal");
    let info = text(&next(&mut s).await).unwrap();
    assert_eq!(info["type"], "session_info");
    assert_eq!(info["tty"], false);
    assert!(info["session_id"].is_string());
    s.send(Message::Binary(b"\x00hello cat".to_vec().into()))
        .await
        .unwrap();
    let m = next(&mut s).await;
    assert_eq!(m, Message::Binary(b"\x01hello cat".to_vec().into()));
    s.send(Message::Binary(vec![4].into())).await.unwrap();
    let exit = text(&next(&mut s).await).unwrap();
    assert_eq!(exit, json!({"type": "exit", "exit_code": 0}));
    assert_eq!(next(&mut s).await, Message::Binary(vec![3, 0].into()));
    match next(&mut s).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected close 1000, got {other:?}"),
    }

    // A TTY bash: resize, detach, output while detached, re-attach.
    let (mut s, _) = ws(
        &d,
        "/exec?cmd=bash&cmd=--norc&cmd=-i&tty=true&rows=24&cols=80",
    )
    .await;
    let info = text(&next(&mut s).await).unwrap();
    assert_eq!(info["tty"], true, "{info}");
    assert_eq!(
        (info["rows"].clone(), info["cols"].clone()),
        (json!(24), json!(80))
    );
    let id = info["session_id"].as_str().unwrap().to_owned();
    s.send(Message::Text(
        json!({"type": "resize", "cols": 123, "rows": 45})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    s.send(Message::Binary(
        b"stty size; echo size-$((1+1))\n".to_vec().into(),
    ))
    .await
    .unwrap();
    let mut out = String::new();
    while !out.contains("size-2") {
        if let Message::Binary(b) = next(&mut s).await {
            out.push_str(&String::from_utf8_lossy(&b));
        }
    }
    assert!(out.contains("45 123"), "stty size after resize: {out:?}");
    // Output written while nobody is attached.
    s.send(Message::Binary(
        b"sleep 0.5; echo detached-$((6*7))\n".to_vec().into(),
    ))
    .await
    .unwrap();
    drop(s);
    let list: Value = d.get("/v1/exec").await.json().await.unwrap();
    let row = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap_or_else(|| panic!("session {id} listed: {list}"))
        .clone();
    assert_eq!(row["tty"], true);
    assert_eq!(list["count"], list["sessions"].as_array().unwrap().len());
    // Attach again: the scrollback holds what was written meanwhile.
    let mut seen = String::new();
    let deadline = Instant::now() + WAIT;
    while !seen.contains("detached-42") {
        assert!(
            Instant::now() < deadline,
            "never saw the detached output: {seen:?}"
        );
        let (mut s, _) = ws(&d, &format!("/exec/{id}")).await;
        let info = text(&next(&mut s).await).unwrap();
        assert_eq!(info["session_id"], id.as_str());
        assert_eq!(info["is_owner"], false);
        // Read what is there (scrollback then live) for a moment.
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(300), s.next()).await
        {
            if let Message::Binary(b) = m {
                seen.push_str(&String::from_utf8_lossy(&b));
            }
        }
        if seen.contains("detached-42") {
            s.send(Message::Binary(b"exit 3\n".to_vec().into()))
                .await
                .unwrap();
            loop {
                if let Some(v) = text(&next(&mut s).await)
                    && v["type"] == "exit"
                {
                    assert_eq!(v["exit_code"], 3);
                    break;
                }
            }
        }
    }
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_session_reports_the_port_it_opens() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("a_session_reports_the_port_it_opens"));
    let d = Daemon::start().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (mut watch, _) = ws(&d, "/ports/watch").await;
    let list = text(&next(&mut watch).await).unwrap();
    assert_eq!(list["type"], "port_list");
    let (mut s, _) = ws(
        &d,
        &format!("/exec?cmd=python3&cmd=-m&cmd=http.server&cmd={port}&cmd=--bind&cmd=127.0.0.1"),
    )
    .await;
    let info = text(&next(&mut s).await).unwrap();
    let opened = loop {
        if let Some(v) = text(&next(&mut s).await)
            && v["type"] == "port_opened"
        {
            break v;
        }
    };
    assert_eq!(opened["port"], port);
    assert_eq!(opened["address"], "127.0.0.1");
    // The pid as the environment sees it: the session's own process.
    let list: Value = d.get("/v1/exec").await.json().await.unwrap();
    let row = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == info["session_id"])
        .unwrap()
        .clone();
    assert_eq!(opened["pid"], row["pid"], "{opened} {row}");
    // The port watch saw it too.
    let seen = loop {
        let v = text(&next(&mut watch).await).unwrap();
        if v["type"] == "port_opened" && v["port"] == port {
            break v;
        }
    };
    assert_eq!(seen["pid"], opened["pid"]);
    // Killing the session closes the port.
    let id = info["session_id"].as_str().unwrap();
    let events = d
        .post_to_complete(
            &format!("/v1/exec/{id}/kill?signal=SIGTERM&timeout=5s"),
            None,
        )
        .await;
    assert_eq!(events[0]["type"], "signal", "{events:?}");
    loop {
        let v = text(&next(&mut watch).await).unwrap();
        if v["type"] == "port_closed" && v["port"] == port {
            break;
        }
    }
}

/// A one-shot HTTP server on a free port: answers any request with `body`.
async fn http_server(body: &'static str) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut req = Vec::new();
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = c.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                c.write_all(resp.as_bytes()).await.unwrap();
            });
        }
    });
    port
}

/// A port where nothing listens: bound but not listening (connections are
/// refused), so nothing else is given it while the socket lives.
fn closed_port() -> (tokio::net::TcpSocket, u16) {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

async fn read_until_close(s: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("connection not closed: {}", String::from_utf8_lossy(&out)))
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn connect_and_websocket_proxies_reach_local_ports_only() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "connect_and_websocket_proxies_reach_local_ports_only"
    ));
    let d = Daemon::start_host_network().await;
    let port = http_server("hello through the tunnel").await;
    // CONNECT names another host: the tunnel still goes to 127.0.0.1.
    let mut c = tokio::net::TcpStream::connect(d.tcp.unwrap())
        .await
        .unwrap();
    c.write_all(
        format!("CONNECT evil.example:{port} HTTP/1.1\r\nHost: evil.example:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let resp = read_until_close(&mut c).await;
    assert!(resp.ends_with("hello through the tunnel"), "{resp}");

    // Without a token: 401.
    let mut c = tokio::net::TcpStream::connect(d.tcp.unwrap())
        .await
        .unwrap();
    c.write_all(
        format!("CONNECT x:{port} HTTP/1.1\r\nHost: x:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let resp = read_until_close(&mut c).await;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");

    // A closed port: a clear error, not a hang.
    let (_reserved, closed) = closed_port();
    let mut c = tokio::net::TcpStream::connect(d.tcp.unwrap())
        .await
        .unwrap();
    c.write_all(
        format!("CONNECT x:{closed} HTTP/1.1\r\nHost: x:{closed}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let resp = read_until_close(&mut c).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert!(resp.contains(&format!("127.0.0.1:{closed}")), "{resp}");

    // The WebSocket proxy carries an HTTP exchange.
    let (mut s, _) = ws(&d, "/proxy").await;
    s.send(Message::Text(
        json!({"host": "elsewhere", "port": port})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let hello = text(&next(&mut s).await).unwrap();
    assert_eq!(
        hello,
        json!({"status": "connected", "target": format!("127.0.0.1:{port}")})
    );
    s.send(Message::Binary(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec().into(),
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    loop {
        match next(&mut s).await {
            Message::Binary(b) => got.extend_from_slice(&b),
            Message::Close(_) => break,
            _ => {}
        }
    }
    assert!(String::from_utf8_lossy(&got).ends_with("hello through the tunnel"));
    // And refuses a closed port with a reason.
    let (mut s, _) = ws(&d, "/proxy").await;
    s.send(Message::Text(
        json!({"host": "localhost", "port": closed})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    match next(&mut s).await {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 1011);
            assert!(f.reason.contains("Failed to connect"), "{}", f.reason);
        }
        other => panic!("expected a close, got {other:?}"),
    }
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn http_ingress_forwards_to_the_http_port_service_and_waits_for_it() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "http_ingress_forwards_to_the_http_port_service_and_waits_for_it"
    ));
    let d = Daemon::start_with(common::Options {
        extra: vec!["--http-ingress".into(), "127.0.0.1:0".into()],
        ..Default::default()
    })
    .await;
    let status = d.status().await;
    let ingress: std::net::SocketAddr = status["listen"]["http_ingress"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let send = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(ingress).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: demo.example\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        s
    };
    let get = |path: &'static str| async move { read_until_close(&mut send(path).await).await };
    // No service declares http_port yet.
    let r = get("/").await;
    assert!(r.starts_with("HTTP/1.1 502 "), "{r}");
    assert!(r.contains("no service declares http_port"), "{r}");

    // A service that opens its port only when told: a request sent while it
    // is starting waits for it instead of failing.
    std::fs::write(d.env_root().join("hello.txt"), "hello through the ingress").unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let spec = json!({
        "cmd": "sh",
        "args": ["-c", format!("while [ ! -e go ]; do sleep 0.05; done; exec python3 -m http.server {port} --bind 127.0.0.1")],
        "http_port": port,
    });
    let mut put = common::Ndjson::new(
        d.req(
            reqwest::Method::PUT,
            "/v1/services/web?duration=0",
            Some(spec),
        )
        .await,
    );
    put.until(|e| e["type"] == "started").await;
    assert_eq!(d.service("web").await["state"]["status"], "starting");
    let mut pending = send("/hello.txt").await;
    // The request is in flight: now let the service open its port.
    std::fs::write(d.env_root().join("go"), "").unwrap();
    let r = read_until_close(&mut pending).await;
    assert!(
        r.starts_with("HTTP/1.0 200 ") || r.starts_with("HTTP/1.1 200 "),
        "{r}"
    );
    assert!(r.ends_with("hello through the ingress"), "{r}");
    // Whatever Host the client names, the service is the target.
    let r = get("/").await;
    assert!(r.contains("hello.txt"), "{r}");

    // A stopped service is named in a 503, not waited for.
    common::Ndjson::new(
        d.req(
            reqwest::Method::POST,
            "/v1/services/web/stop?timeout=5s",
            None,
        )
        .await,
    )
    .collect()
    .await;
    let r = get("/").await;
    assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
    assert!(r.contains("service web (http_port"), "{r}");
    // The ingress needs no token, but it is not the API.
    let r = get("/v1/status").await;
    assert!(!r.contains("\"sprite\""), "{r}");
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn filesystem_api_round_trips_and_stays_inside_the_root() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "filesystem_api_round_trips_and_stays_inside_the_root"
    ));
    let d = Daemon::start().await;
    // The API's paths are the environment's: `{r}/a` is `/work/a` inside,
    // `root.join("a")` on the host (the overlay mount).
    let r = "/work".to_owned();
    let root = d.env_root().join("work");
    let q = |path: &str| percent(path);
    let outside = tempfile::tempdir().unwrap();
    let o = outside.path().display().to_string();
    std::fs::write(outside.path().join("keep.txt"), "untouched").unwrap();

    let put = |path: String, body: Vec<u8>| {
        d.http
            .put(d.url(&format!(
                "/v1/sprites/{NAME}/fs/write?path={}&mode=0640&mkdirParents=true",
                q(&path)
            )))
            .bearer_auth(TOKEN)
            .body(body)
            .send()
    };
    let resp = put(format!("{r}/a/b/c.bin"), (0u8..=255).collect())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"path": format!("{r}/a/b/c.bin"), "size": 256, "mode": "0640"})
    );
    let got = d
        .get(&format!(
            "/v1/fs/read?path=c.bin&workingDir={}",
            q(&format!("{r}/a/b"))
        ))
        .await;
    assert_eq!(got.status(), 200);
    assert_eq!(
        got.bytes().await.unwrap().to_vec(),
        (0u8..=255).collect::<Vec<u8>>()
    );
    let list: Value = d
        .get(&format!("/v1/fs/list?path={}", q(&format!("{r}/a/b"))))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["count"], 1);
    let e = &list["entries"][0];
    assert_eq!(
        (
            e["name"].clone(),
            e["type"].clone(),
            e["size"].clone(),
            e["mode"].clone(),
            e["isDir"].clone()
        ),
        (
            json!("c.bin"),
            json!("file"),
            json!(256),
            json!("640"),
            json!(false)
        )
    );
    let resp = d
        .req(
            reqwest::Method::POST,
            "/v1/fs/rename",
            Some(json!({"source": format!("{r}/a/b/c.bin"), "dest": format!("{r}/a/d.bin")})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(root.join("a/d.bin").exists() && !root.join("a/b/c.bin").exists());
    let resp = d
        .req(
            reqwest::Method::POST,
            "/v1/fs/copy",
            Some(json!({"source": format!("{r}/a"), "dest": format!("{r}/z"), "recursive": true})),
        )
        .await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["totalBytes"], 256, "{v}");
    assert_eq!(std::fs::read(root.join("z/d.bin")).unwrap().len(), 256);
    let resp = d
        .req(
            reqwest::Method::POST,
            "/v1/fs/chmod",
            Some(json!({"path": format!("{r}/z/d.bin"), "mode": "0600"})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(root.join("z/d.bin"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let resp = d
        .req(
            reqwest::Method::DELETE,
            &format!(
                "/v1/fs/delete?path={}&recursive=false",
                q(&format!("{r}/z"))
            ),
            None,
        )
        .await;
    assert_eq!(resp.status(), 400, "a non-empty dir needs recursive");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["code"], "ENOTEMPTY");
    let resp = d
        .req(
            reqwest::Method::DELETE,
            "/v1/fs/delete",
            Some(json!({"path": format!("{r}/z"), "recursive": true})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(!root.join("z").exists());
    let resp = d
        .get(&format!("/v1/fs/read?path={}", q(&format!("{r}/nope"))))
        .await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["code"], "ENOENT");

    // Escapes: `..` above the root is refused; absolute paths and symlinks
    // (even ones naming host paths) resolve inside the environment.
    std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
    for a in [
        "/v1/fs/read?path=../../etc/passwd&workingDir=/work".to_owned(),
        format!("/v1/fs/read?path={}", q(&format!("/../{o}/keep.txt"))),
    ] {
        let resp = d.get(&a).await;
        assert_eq!(resp.status(), 400, "{a}");
        let v: Value = resp.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("outside"), "{a}: {v}");
    }
    let env_passwd = std::fs::read(d.env_root().join("etc/passwd")).unwrap();
    for a in [
        "/v1/fs/read?path=/etc/passwd",
        "/v1/fs/read?path=/work/etc-link/passwd",
    ] {
        let resp = d.get(a).await;
        assert_eq!(resp.status(), 200, "{a}");
        assert_eq!(
            resp.bytes().await.unwrap().to_vec(),
            env_passwd,
            "{a}: the environment's"
        );
    }
    let resp = d
        .get(&format!(
            "/v1/fs/read?path={}",
            q(&format!("{r}/out/keep.txt"))
        ))
        .await;
    assert_eq!(resp.status(), 404, "a symlink to a host path leads inside");
    // Through the dangling link (its target does not exist inside): not found.
    let resp = put(format!("{r}/out/new.txt"), b"evil".to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    for path in [format!("{o}/keep.txt"), format!("{o}/new.txt")] {
        let resp = put(path.clone(), b"evil".to_vec()).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let inside = d.env_root().join(o.trim_start_matches('/'));
    assert_eq!(std::fs::read(inside.join("keep.txt")).unwrap(), b"evil");
    assert_eq!(std::fs::read(inside.join("new.txt")).unwrap(), b"evil");
    for (m, path, body) in [
        (
            reqwest::Method::DELETE,
            format!("/v1/fs/delete?path={}", q(&format!("{o}/keep.txt"))),
            None,
        ),
        (
            reqwest::Method::POST,
            "/v1/fs/chmod".to_owned(),
            Some(json!({"path": format!("{o}/new.txt"), "mode": "0777"})),
        ),
    ] {
        assert_eq!(d.req(m, &path, body).await.status(), 200, "{path}");
    }
    // Nothing outside changed.
    let names: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("keep.txt")]);
    assert_eq!(
        std::fs::read_to_string(outside.path().join("keep.txt")).unwrap(),
        "untouched"
    );
    assert_eq!(
        std::fs::metadata(outside.path().join("keep.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    // The symlink itself can go (it is inside); its target stays.
    let resp = d
        .req(
            reqwest::Method::DELETE,
            &format!("/v1/fs/delete?path={}", q(&format!("{r}/out"))),
            None,
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(outside.path().join("keep.txt").exists());
    assert!(!root.join("out").exists());
}

/// `POST /v1/fs/chown`: ids by number or by the environment's own names
/// (its /etc/passwd and /etc/group, not the host's), recursive without
/// following symlinks, and the usual confinement and 4xx for bad input.
#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn chown_sets_owners_by_id_or_by_the_environments_names_and_stays_inside() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "chown_sets_owners_by_id_or_by_the_environments_names_and_stays_inside"
    ));
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start().await;
    let env = d.env_root();
    let root = env.join("work/o");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("a.txt"), "a").unwrap();
    std::fs::write(root.join("sub/b.txt"), "b").unwrap();
    // A user and a group that exist only inside the environment.
    for (file, line) in [
        ("etc/passwd", "sprite-owner:x:4242:4343::/home/o:/bin/sh\n"),
        ("etc/group", "sprite-crew:x:4343:\n"),
    ] {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(env.join(file))
            .unwrap();
        std::io::Write::write_all(&mut f, line.as_bytes()).unwrap();
    }
    // A symlink to a host file: the walk leaves it (and its target) alone.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("keep"), "host").unwrap();
    std::os::unix::fs::symlink(outside.path().join("keep"), root.join("link")).unwrap();

    let chown = |body: Value| d.req(reqwest::Method::POST, "/v1/fs/chown", Some(body));
    let r = chown(json!({"path": "o", "workingDir": "/work", "uid": "sprite-owner", "gid": "sprite-crew", "recursive": true})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["count"], 4, "{v}");
    let mut paths: Vec<&str> = v["affected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            assert_eq!(
                (a["uid"].as_u64(), a["gid"].as_u64()),
                (Some(4242), Some(4343)),
                "{a}"
            );
            a["path"].as_str().unwrap()
        })
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/work/o",
            "/work/o/a.txt",
            "/work/o/sub",
            "/work/o/sub/b.txt"
        ]
    );
    for p in ["", "a.txt", "sub", "sub/b.txt"] {
        let m = std::fs::metadata(root.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (4242, 4343), "{p}");
    }
    let host = std::fs::metadata(outside.path().join("keep")).unwrap();
    assert_eq!(
        (host.uid(), host.gid()),
        (0, 0),
        "the host file is untouched"
    );
    assert_eq!(
        std::fs::symlink_metadata(root.join("link")).unwrap().uid(),
        0
    );

    // One id alone; the other stays. Numbers as strings too.
    let r = chown(json!({"path": "/work/o/a.txt", "gid": "77"})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["affected"][0],
        json!({"path": "/work/o/a.txt", "uid": 4242, "gid": 77})
    );

    // Bad input: a 400 naming the field, and nothing changes.
    for (body, needle) in [
        (json!({"path": "/work/o/a.txt"}), "uid or gid"),
        (
            json!({"path": "/work/o/a.txt", "uid": "nobody-here"}),
            "uid",
        ),
        (
            json!({"path": "/work/o/a.txt", "gid": "no-such-group"}),
            "gid",
        ),
        (json!({"path": "/work/o/a.txt", "uid": -1}), "uid"),
        (
            json!({"path": "/work/o/a.txt", "uid": 4294967295u64}),
            "uid",
        ),
        (json!({"path": "/work/o/a.txt", "uid": 1.5}), "uid"),
        (json!({"path": "/work/o/a.txt", "gid": true}), "gid"),
        (
            json!({"path": "/work/o/a.txt", "uid": "x".repeat(1 << 20)}),
            "uid",
        ),
        (
            json!({"path": "../../etc/shadow", "workingDir": "/work", "uid": 0}),
            "outside",
        ),
        (json!({"uid": 0}), "path"),
    ] {
        let r = chown(body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains(needle), "{body}: {v}");
    }
    let m = std::fs::metadata(root.join("a.txt")).unwrap();
    assert_eq!((m.uid(), m.gid()), (4242, 77));
    let r = chown(json!({"path": "/work/nope", "uid": 1})).await;
    assert_eq!(r.status(), 404);
}

fn percent(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A pseudo-terminal for `sprite-env -t`: the child gets the slave as its
/// stdio; the test reads and types on the master.
struct Pty {
    master: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    slave: std::os::fd::OwnedFd,
}

impl Pty {
    fn new(rows: u16, cols: u16) -> Pty {
        let ws = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let p = nix::pty::openpty(Some(&ws), None).unwrap();
        Pty {
            master: sprited::sys::async_fd(p.master).unwrap(),
            slave: p.slave,
        }
    }

    fn spawn(&self, d: &Daemon, args: &[&str]) -> tokio::process::Child {
        let io = || std::process::Stdio::from(self.slave.try_clone().unwrap());
        d.cli_command(args)
            .stdin(io())
            .stdout(io())
            .stderr(io())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// Reads the master until `needle` has appeared; returns all read so far.
    async fn read_until(&self, seen: &mut String, needle: &str) {
        let r = tokio::time::timeout(WAIT, async {
            while !seen.contains(needle) {
                let mut g = self.master.readable().await.unwrap();
                let mut buf = [0u8; 4096];
                match g.try_io(|fd| {
                    nix::unistd::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)
                }) {
                    Ok(Ok(n)) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                    Ok(Ok(_)) => panic!("terminal closed before {needle:?}: {seen:?}"),
                    Ok(Err(e)) => panic!("terminal read failed before {needle:?}: {e}; {seen:?}"),
                    Err(_would_block) => {}
                }
            }
        })
        .await;
        assert!(r.is_ok(), "no {needle:?} on the terminal: {seen:?}");
    }

    fn type_in(&self, s: &str) {
        nix::unistd::write(self.master.get_ref(), s.as_bytes()).unwrap();
    }

    fn is_raw(&self) -> bool {
        let t = nix::sys::termios::tcgetattr(&self.slave).unwrap();
        !t.local_flags
            .contains(nix::sys::termios::LocalFlags::ICANON)
    }
}

async fn exit_code(child: &mut tokio::process::Child) -> Option<i32> {
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("sprite-env did not exit")
        .unwrap()
        .code()
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn sprite_env_exec_sessions_and_proxy() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("sprite_env_exec_sessions_and_proxy"));
    let d = Daemon::start_host_network().await;

    // exec: separate streams, the command's exit status.
    let out = d
        .cli(&["exec", "--", "sh", "-c", "echo out; echo err >&2; exit 3"])
        .await;
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref(),
            String::from_utf8_lossy(&out.stderr).as_ref()
        ),
        (Some(3), "out\n", "err\n")
    );
    // stdin is forwarded and closed at its end.
    let mut cat = d
        .cli_command(["exec", "--", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cat.stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two\n")
        .await
        .unwrap();
    let out = tokio::time::timeout(WAIT, cat.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (out.status.code(), out.stdout.as_slice()),
        (Some(0), &b"line one\nline two\n"[..])
    );
    let out = d
        .cli(&["exec", "--dir", "/nonexistent-dir", "--", "true"])
        .await;
    assert_eq!(out.status.code(), Some(22), "{out:?}");

    // -t: the command sees a terminal of the local size; raw mode is undone at the end.
    let pty = Pty::new(30, 100);
    assert!(!pty.is_raw());
    let mut child = pty.spawn(&d, &["exec", "-t", "--", "sh", "-c", "stty size; exit 5"]);
    let mut seen = String::new();
    pty.read_until(&mut seen, "30 100").await;
    assert_eq!(exit_code(&mut child).await, Some(5));
    assert!(!pty.is_raw(), "sprite-env left the terminal in raw mode");

    // sessions attach: a TTY session left by its client, picked up again.
    let (mut s, _) = ws(&d, "/exec?cmd=sh&cmd=-c&cmd=echo%20before%3B%20read%20x%3B%20echo%20got-%24x%3B%20exit%204&tty=true").await;
    let info = text(&next(&mut s).await).unwrap();
    let id = info["session_id"].as_str().unwrap().to_owned();
    let mut early = Vec::new();
    while !String::from_utf8_lossy(&early).contains("before") {
        if let Message::Binary(b) = next(&mut s).await {
            early.extend_from_slice(&b);
        }
    }
    drop(s);
    let list = d.cli(&["sessions", "list"]).await;
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains("echo before")),
        "{table}"
    );
    let pty = Pty::new(24, 80);
    let mut child = pty.spawn(&d, &["sessions", "attach", &id]);
    let mut seen = String::new();
    pty.read_until(&mut seen, "before").await; // the scrollback
    pty.type_in("hi\r");
    pty.read_until(&mut seen, "got-hi").await;
    assert_eq!(exit_code(&mut child).await, Some(4));

    // sessions kill: ends a running command; its client exits too. (The
    // duration names this run's sleep: another suite may run beside it.)
    let secs = format!("300.{}", std::process::id());
    let command = format!("sleep {secs}");
    let mut sleeper = d
        .cli_command(["exec", "--", "sleep", &secs])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let id = loop {
        let out = d.cli(&["sessions", "list", "--json"]).await;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(s) = v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["command"] == command.as_str())
        {
            break s["id"].as_str().unwrap().to_owned();
        }
        tokio::task::yield_now().await;
    };
    let out = d.cli(&["sessions", "kill", &id, "--timeout", "5s"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.first().unwrap()["type"], "signal", "{events:?}");
    assert_eq!(events.last().unwrap()["type"], "complete", "{events:?}");
    let code = exit_code(&mut sleeper).await;
    assert_eq!(code, Some(128 + 15), "the client reports the SIGTERM death");
    assert!(procs_with(&command).is_empty());

    // proxy: a local port reaches a port inside the sprite.
    let port = http_server("through the cli proxy").await;
    let mut proxy = d
        .cli_command(["proxy", "0", &port.to_string()])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut err = tokio::io::BufReader::new(proxy.stderr.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncBufReadExt::read_line(&mut err, &mut line),
    )
    .await
    .unwrap()
    .unwrap();
    let local: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no local port in {line:?}"));
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_until_close(&mut c).await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("through the cli proxy"),
        "{r}"
    );
    // A closed port is a clear error, not a hang.
    let (_reserved, closed) = closed_port();
    let _ = proxy.start_kill();
    let mut proxy = d
        .cli_command(["proxy", "0", &closed.to_string()])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut err = tokio::io::BufReader::new(proxy.stderr.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut err, &mut line)
        .await
        .unwrap();
    let local: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .unwrap();
    let r = read_until_close(&mut c).await;
    assert_eq!(r, "", "the local connection is closed");
    line.clear();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncBufReadExt::read_line(&mut err, &mut line),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        line.contains("refused") && line.contains(&closed.to_string()),
        "{line}"
    );
}
