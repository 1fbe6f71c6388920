//! API round-trip latency against the real daemon: `GET /v1/status` over the
//! Unix socket (new connection per request, as `sprite-env` does) and over TCP
//! with token auth (kept-alive connection, as SDKs do). The baseline is a
//! request to an unknown route, which measures the HTTP stack plus the
//! gateway (auth, path mapping) without a handler.
//!
//! Run: `cargo bench --bench api`.

use std::process::Stdio;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sprited::client::UnixClient;

const TOKEN: &str = "bench-token";

struct Daemon {
    child: std::process::Child,
    _tmp: tempfile::TempDir,
    socket: std::path::PathBuf,
    tcp: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn start(rt: &tokio::runtime::Runtime) -> Daemon {
    let tmp = tempfile::tempdir().unwrap();
    let notify_path = tmp.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let state = tmp.path().join("state");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_sprited"))
        .arg("--state-dir")
        .arg(&state)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--token",
            TOKEN,
            "--sprite-name",
            "bench",
            "--log",
            "warn",
        ])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    loop {
        let n = notify.recv(&mut buf).expect("daemon did not become ready");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STATUS=running")
        {
            break;
        }
    }
    let socket = state.join("api.sock");
    let (_, status) = rt
        .block_on(UnixClient::new(&socket).get_json("/v1/status"))
        .unwrap();
    let tcp = status["listen"]["tcp"].as_str().unwrap().to_owned();
    Daemon {
        child,
        _tmp: tmp,
        socket,
        tcp,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let d = start(&rt);
    let unix = UnixClient::new(&d.socket);
    let http = reqwest::Client::new();
    let mut g = c.benchmark_group("api");
    g.measurement_time(Duration::from_secs(3)).sample_size(50);
    g.bench_function("unix_status", |b| {
        b.iter(|| {
            rt.block_on(async { assert_eq!(unix.get_json("/v1/status").await.unwrap().0, 200) })
        })
    });
    g.bench_function("tcp_status", |b| {
        let url = format!("http://{}/v1/status", d.tcp);
        b.iter(|| {
            rt.block_on(async {
                assert_eq!(
                    http.get(&url)
                        .bearer_auth(TOKEN)
                        .send()
                        .await
                        .unwrap()
                        .status(),
                    200
                )
            })
        })
    });
    g.bench_function("tcp_not_found_baseline", |b| {
        let url = format!("http://{}/v1/none", d.tcp);
        b.iter(|| {
            rt.block_on(async {
                assert_eq!(
                    http.get(&url)
                        .bearer_auth(TOKEN)
                        .send()
                        .await
                        .unwrap()
                        .status(),
                    404
                )
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
