//! Memory images in the store: a service holding 512 MiB that changes 1% of
//! its pages at random between checkpoints. Every checkpoint restores to
//! its exact memory, in any order, also after a checkpoint in the middle of
//! the chain is deleted, and each checkpoint after the first adds about 1%
//! of that memory to the store (root; CRIU from scripts/setup.sh).

mod common;

use common::{Daemon, free_port, with_criu};
use serde_json::{Value, json};

/// Holds `MIB` MiB of random bytes and answers on its port: `/sum` is the
/// SHA-256 of the buffer, `/dirty` overwrites 1% of its pages, picked at
/// random, with random bytes.
const HOLDER: &str = r#"
import hashlib, http.server, mmap, os, random, sys
port, mib = int(sys.argv[1]), int(sys.argv[2])
buf = mmap.mmap(-1, mib << 20)  # page-aligned: a page of it is a page
for off in range(0, len(buf), 1 << 20):
    buf[off:off + (1 << 20)] = os.urandom(1 << 20)
pages = len(buf) // 4096
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/dirty":
            for p in random.sample(range(pages), pages // 100):
                buf[p * 4096:(p + 1) * 4096] = os.urandom(4096)
        body = hashlib.sha256(buf).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

const MIB: u64 = 512;

async fn get(port: u16, path: &str) -> String {
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .expect("the holder answers");
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// Bytes of every object in the daemon's store.
fn store_bytes(d: &Daemon) -> u64 {
    sprited::fs::store::objects_bytes(&d.state_dir.join("store"))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_checkpoint_of_a_changing_512_mib_service_restores_exactly_and_adds_only_what_changed()
 {
    if !with_criu(
        "every_checkpoint_of_a_changing_512_mib_service_restores_exactly_and_adds_only_what_changed",
    ) {
        return;
    }
    let d = Daemon::start().await;
    let port = free_port();
    d.put_service(
        "holder",
        json!({"cmd": "python3", "args": ["-c", HOLDER, port.to_string(), MIB.to_string()],
               "http_port": port}),
        "1s",
    )
    .await;
    assert_eq!(d.service("holder").await["state"]["status"], "running");

    let mut sums = Vec::new();
    let mut growth = Vec::new();
    for i in 1..=5 {
        let sum = get(port, if i == 1 { "/sum" } else { "/dirty" }).await;
        assert!(!sums.contains(&sum), "the buffer changed");
        let before = store_bytes(&d);
        let events = d.checkpoint(&format!("c{i}")).await;
        let done = events.last().unwrap();
        growth.push(store_bytes(&d) - before);
        let meta: Value = d
            .get(&format!("/v1/checkpoints/v{i}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(meta["criu"]["kind"], "full", "{meta}");
        assert_eq!(
            done["stats"]["images_new_bytes"], meta["store"]["images_new_bytes"],
            "{done}"
        );
        if i > 1 {
            // 1% of 512 MiB is 5.1 MiB; at most 3% may be added.
            assert!(
                growth[i - 1] <= MIB * (1 << 20) * 3 / 100,
                "checkpoint {i} added {} bytes to the store: {growth:?}",
                growth[i - 1]
            );
            assert!(
                meta["store"]["images_dedup_bytes"].as_u64().unwrap() > (MIB << 20) * 9 / 10,
                "{meta}"
            );
        }
        sums.push(sum);
    }
    eprintln!("store growth per checkpoint: {growth:?}");

    let restore_to = |i: usize| {
        let d = &d;
        let sums = &sums;
        async move {
            let events = d.restore(&format!("v{i}")).await;
            assert!(
                events.iter().any(|e| e["type"] == "info"
                    && e["data"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("Service holder restored with its memory")),
                "v{i}: {events:?}\n{}",
                d.log_text()
            );
            assert_eq!(
                get(port, "/sum").await,
                sums[i - 1],
                "v{i} restored exactly"
            );
        }
    };
    // Any order; the newest images are not cached, so each comes from the
    // store's packs.
    restore_to(2).await;
    restore_to(5).await;
    // The middle of the chain goes; the others stay whole.
    let r = d
        .req(reqwest::Method::DELETE, "/v1/checkpoints/v3", None)
        .await;
    assert_eq!(r.status(), 204);
    restore_to(1).await;
    restore_to(4).await;
}
