//! Pulling from the shared store (issue 19): pull-and-restore of a 1 GiB /
//! 10,000-file checkpoint into an empty daemon, beside plain parallel
//! downloads of the same objects from the same bucket in the same run
//! (needs root and `weed`; boto3 for one of the baselines: all three come
//! with scripts/setup.sh).
//!
//! Setup (untimed): `weed mini` on loopback; a daemon "origin" writes
//! 10,000 files of 107,374 bytes (1 GiB that does not compress) in 100
//! dirs, checkpoints and pushes them, then stops.
//!
//! - `daemon_pull_and_restore_1GiB_10k`: a daemon with an empty state dir
//!   (started untimed) is asked `POST /v1/remote/checkpoints/origin/v1/pull`
//!   and then `POST /v1/checkpoints/v1/restore`, both followed to their
//!   `complete`: every object fetched in 8 MiB ranges, its SHA-256 checked,
//!   the checkpoint's structure checked, the objects stored durably, the
//!   tree restored and the environment running on it;
//! - `boto3_threads_1GiB_10k`: the baseline the issue names: boto3, 16
//!   threads, `get_object` of each of the record's objects, written to a
//!   file (a Python process kept running between runs, so its start is not
//!   counted);
//! - `object_store_1GiB_10k`: the same with the daemon's own S3 client
//!   (`object_store`, 16 requests at once), for a baseline without Python.
//!
//! Before each timed run, of any kind, the bench runs `sync(2)` (untimed),
//! so that the writeback of the previous one does not land inside it. Each
//! daemon run is followed by an `object_store` run, and the median of those
//! pairs' ratios is printed too (boto3 is too slow to pair: 20 s a run).
//! Neither baseline verifies digests or makes its files durable; the
//! daemon does both.
//!
//! Measured (2 cores, `weed mini` on loopback): pull-and-restore 7.3 s,
//! boto3 24.2 s (0.30x), object_store 6.9 s (1.06x; paired runs 1.30x).
//!
//! Run: `sudo cargo bench --bench remote` (about ten minutes).

mod common;
#[path = "../tests/common/mod.rs"]
mod tc;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{median, median_ratio};
use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::StreamExt as _;
use serde_json::Value;
use tc::Daemon;
use tc::weed::{self, Weed};

const FILES: usize = 10_000;
const FILE_SIZE: usize = (1 << 30) / FILES;
const PREFIX: &str = "bench";
/// Requests in flight in the baselines (the daemon's pull runs 16).
const PARALLEL: usize = 16;

/// A boto3 downloader that stays up between runs: each line on stdin is a
/// directory to download every object into; it answers "done".
const BOTO3: &str = r#"
import os, sys, concurrent.futures as cf
import boto3
from botocore.config import Config
endpoint, bucket, prefix, key, secret, listing, parallel = sys.argv[1:8]
parallel = int(parallel)
ids = [line.split()[0] for line in open(listing)]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=key, aws_secret_access_key=secret,
                  config=Config(max_pool_connections=parallel * 2))
def get(dest, oid):
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/objects/{oid}")["Body"].read()
    with open(os.path.join(dest, oid), "wb") as f:
        f.write(body)
print("ready", flush=True)
with cf.ThreadPoolExecutor(parallel) as pool:
    for line in sys.stdin:
        dest = line.strip()
        os.makedirs(dest, exist_ok=True)
        list(pool.map(lambda oid: get(dest, oid), ids))
        print("done", flush=True)
"#;

fn file_path(root: &Path, i: usize) -> PathBuf {
    root.join(format!("data/d{:03}/f{i}", i % 100))
}

/// What `weed`, root and boto3 give, or why the bench cannot run.
fn can_run() -> Option<PathBuf> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("benches/remote.rs needs root; skipped");
        return None;
    }
    let Some(weed) = weed::find() else {
        eprintln!("benches/remote.rs needs weed (scripts/setup.sh); skipped");
        return None;
    };
    let python = python(&weed);
    let boto3 = Command::new(&python)
        .args(["-c", "import boto3"])
        .status()
        .is_ok_and(|s| s.success());
    if !boto3 {
        eprintln!("benches/remote.rs needs boto3 beside weed (scripts/setup.sh); skipped");
        return None;
    }
    Some(weed)
}

/// The venv's python next to `weed` (setup.sh puts boto3 there).
fn python(weed: &Path) -> PathBuf {
    weed.with_file_name("python3")
}

/// (untimed) Daemon "origin" writes the tree, checkpoints it and pushes it;
/// returns the record's objects (id, size).
async fn seed(store: &Weed) -> Vec<(String, u64)> {
    let origin = Daemon::start_with(store.sprite(PREFIX, "origin")).await;
    let root = origin.env_root();
    let t = Instant::now();
    let mut block = vec![0u8; FILE_SIZE];
    for i in 0..FILES {
        common::fill(&mut block, i as u64, 0);
        let p = file_path(&root, i);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, &block).unwrap();
    }
    eprintln!(
        "setup: {FILES} files x {FILE_SIZE} bytes in {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    origin.checkpoint("bench").await;
    let last = origin
        .post_to_complete("/v1/checkpoints/v1/push", None)
        .await
        .pop()
        .unwrap();
    eprintln!("setup: checkpoint and push in {:?}: {last}", t.elapsed());
    let got = object_store::ObjectStore::get(
        &store.client(),
        &object_store::path::Path::from(format!("{PREFIX}/sprites/origin/checkpoints/v1.json")),
    )
    .await
    .unwrap();
    let record: Value = serde_json::from_slice(&got.bytes().await.unwrap()).unwrap();
    record["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o[0].as_str().unwrap().to_owned(), o[1].as_u64().unwrap()))
        .collect()
}

/// One timed pull-and-restore into a fresh empty daemon (started and
/// checked untimed): ms.
fn daemon_run(rt: &tokio::runtime::Runtime, store: &Weed, n: usize) -> f64 {
    let d = rt.block_on(Daemon::start_with(
        store.sprite(PREFIX, &format!("fork{n}")),
    ));
    nix::unistd::sync();
    let t = Instant::now();
    rt.block_on(async {
        let events = d
            .post_stream("/v1/remote/checkpoints/origin/v1/pull")
            .await
            .collect()
            .await;
        let last = events.last().cloned().unwrap_or_default();
        assert_eq!(last["type"], "complete", "{events:?}\n{}", d.log_text());
        assert_eq!(last["id"], "v1", "{last}");
        d.restore("v1").await;
    });
    let ms = t.elapsed().as_secs_f64() * 1e3;
    // (untimed) The environment holds the tree: every 97th file checked
    // byte for byte, and all of them there.
    let root = d.env_root();
    let mut want = vec![0u8; FILE_SIZE];
    for i in (0..FILES).step_by(97) {
        common::fill(&mut want, i as u64, 0);
        assert!(
            std::fs::read(file_path(&root, i)).unwrap() == want,
            "file {i} differs after the pull"
        );
    }
    let count: usize = (0..100)
        .map(|d| {
            std::fs::read_dir(root.join(format!("data/d{d:03}")))
                .unwrap()
                .count()
        })
        .sum();
    assert_eq!(count, FILES);
    drop(d);
    ms
}

struct Boto3 {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Boto3 {
    fn start(weed: &Path, store: &Weed, listing: &Path) -> Boto3 {
        let mut child = Command::new(python(weed))
            .args(["-u", "-c", BOTO3])
            .arg(&store.endpoint)
            .arg(weed::BUCKET)
            .arg(PREFIX)
            .arg(weed::ACCESS_KEY)
            .arg(weed::SECRET_KEY)
            .arg(listing)
            .arg(PARALLEL.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        Boto3 {
            child,
            stdin,
            stdout,
        }
    }

    /// One timed download of every object into `dest` (emptied untimed): ms.
    fn run(&mut self, dest: &Path) -> f64 {
        let _ = std::fs::remove_dir_all(dest);
        nix::unistd::sync();
        let t = Instant::now();
        writeln!(self.stdin, "{}", dest.display()).unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(line.trim(), "done");
        ms
    }
}

impl Drop for Boto3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One timed download of every object into `dest` with `object_store`,
/// `PARALLEL` at once: ms.
fn object_store_run(
    rt: &tokio::runtime::Runtime,
    s3: &object_store::aws::AmazonS3,
    objects: &[(String, u64)],
    dest: &Path,
) -> f64 {
    let _ = std::fs::remove_dir_all(dest);
    std::fs::create_dir_all(dest).unwrap();
    nix::unistd::sync();
    let t = Instant::now();
    rt.block_on(async {
        futures_util::stream::iter(objects)
            .map(|(id, _)| async move {
                let key = object_store::path::Path::from(format!("{PREFIX}/objects/{id}"));
                let got = object_store::ObjectStore::get(s3, &key).await.unwrap();
                let bytes = got.bytes().await.unwrap();
                tokio::fs::write(dest.join(id), bytes).await.unwrap();
            })
            .buffer_unordered(PARALLEL)
            .collect::<Vec<()>>()
            .await;
    });
    t.elapsed().as_secs_f64() * 1e3
}

fn bench(c: &mut Criterion) {
    let Some(weed_bin) = can_run() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(Weed::start(&weed_bin));
    let objects = rt.block_on(seed(&store));
    let bytes: u64 = objects.iter().map(|(_, s)| s).sum();
    eprintln!(
        "setup: the record names {} objects, {bytes} bytes",
        objects.len()
    );
    let scratch = tempfile::Builder::new()
        .prefix("sprited-bench-remote-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let listing = scratch.path().join("objects.txt");
    std::fs::write(
        &listing,
        objects
            .iter()
            .map(|(id, s)| format!("{id} {s}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let mut boto3 = Boto3::start(&weed_bin, &store, &listing);
    let s3 = store.client();
    let (boto3_dest, os_dest) = (scratch.path().join("boto3"), scratch.path().join("os"));

    let mut g = c.benchmark_group("remote");
    g.sample_size(10)
        .sampling_mode(criterion::SamplingMode::Flat)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(1));
    let (mut pulls, mut paired_os) = (Vec::new(), Vec::new());
    let mut n = 0;
    g.bench_function("daemon_pull_and_restore_1GiB_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let ms = daemon_run(&rt, &store, n);
                pulls.push(ms);
                total += Duration::from_secs_f64(ms / 1e3);
                paired_os.push(object_store_run(&rt, &s3, &objects, &os_dest));
            }
            total
        })
    });
    let (mut plain_boto3, mut plain_os) = (Vec::new(), Vec::new());
    g.bench_function("boto3_threads_1GiB_10k", |b| {
        b.iter_custom(|iters| {
            let ms: f64 = (0..iters)
                .map(|_| boto3.run(&boto3_dest))
                .inspect(|ms| plain_boto3.push(*ms))
                .sum();
            Duration::from_secs_f64(ms / 1e3)
        })
    });
    g.bench_function("object_store_1GiB_10k", |b| {
        b.iter_custom(|iters| {
            let ms: f64 = (0..iters)
                .map(|_| object_store_run(&rt, &s3, &objects, &os_dest))
                .inspect(|ms| plain_os.push(*ms))
                .sum();
            Duration::from_secs_f64(ms / 1e3)
        })
    });
    g.finish();
    drop(boto3);
    let (p, pb, po) = (
        median(&mut pulls.clone()),
        median(&mut plain_boto3),
        median(&mut plain_os),
    );
    eprintln!(
        "pull-and-restore of 1 GiB / {FILES} files: {p:.0} ms; boto3 with {PARALLEL} threads {pb:.0} ms \
         ({:.2}x); object_store, {PARALLEL} at once, {po:.0} ms ({:.2}x; paired runs {:.2}x); goal: at most 1.3x",
        p / pb,
        p / po,
        median_ratio(&pulls, &paired_os),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
