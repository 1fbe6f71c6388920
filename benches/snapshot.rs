//! Capture and restore latency of filesystem checkpoints (needs root: it
//! mounts overlayfs), beside the naive baseline measured in the same run:
//! tar + zstd of the whole upper dir.
//!
//! - `capture_1pct_of_10k`: 10,000 files / 1 GiB in the upper dir, 100 of
//!   them rewritten before each capture;
//! - `capture_unchanged_10k`: nothing changed since the last capture;
//! - `restore_cached_10k` / `restore_uncached_10k`: restore with the layer
//!   already built / built from the store;
//! - `tar_zstd_upper_10k`: the baseline;
//! - `capture_100_changed_of_100k`: 100,000 unchanged files plus the same
//!   100 changed ones (cost must follow what changed, not the tree).
//!
//! The freeze window of each capture and the store growth of an unchanged
//! capture are printed after the criterion figures.
//!
//! Run: `sudo cargo bench --bench snapshot` (about five minutes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use criterion::{Criterion, criterion_group, criterion_main};
use sprited::checkpoint::{Checkpoints, PolicyRestore};
use sprited::supervisor::{Supervisor, SupervisorConfig};

const FILE_SIZE: usize = 100 * 1024; // 10,000 × 100 KiB ≈ 1 GiB

struct Setup {
    _tmp: tempfile::TempDir,
    cps: Arc<Checkpoints>,
    root: PathBuf,
    state: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.cps.env().unmount();
    }
}

fn setup(rt: &tokio::runtime::Runtime, files: usize, size: usize) -> Setup {
    let tmp = tempfile::Builder::new()
        .prefix("sprited-bench-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let state = tmp.path().join("state");
    let root = state.join("root");
    let env = common::open_env(&state, None);
    let sup = rt.block_on(async {
        Supervisor::open(SupervisorConfig {
            state_dir: state.clone(),
            cgroups: None,
            container: None,
            base_env: vec![],
            port_wait: Duration::from_secs(1),
            max_log_file: 1 << 20,
        })
        .unwrap()
    });
    let cps = Arc::new(
        Checkpoints::open(
            &state,
            sprited::checkpoint::seal::Key::new(vec![7; 32]).unwrap(),
            env,
            sup,
            None,
            None,
        )
        .unwrap(),
    );
    let t = Instant::now();
    let mut block = vec![0u8; size];
    for i in 0..files {
        common::fill(&mut block, i as u64, 0);
        let p = root.join(format!("d{:03}/f{i}", i % 100));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, &block).unwrap();
    }
    eprintln!(
        "setup: {files} files x {size} bytes written in {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    cps.capture("initial".into(), None, false, &|_| {}).unwrap();
    eprintln!("setup: first (full) capture in {:?}", t.elapsed());
    // The setup's writeback must not land inside the measured captures.
    nix::unistd::sync();
    Setup {
        _tmp: tmp,
        cps,
        root,
        state,
    }
}

/// Rewrites files `ids` (spread over the tree's 100 dirs) with `size` bytes.
fn change(root: &Path, ids: impl Iterator<Item = usize>, size: usize, round: u64) {
    let mut block = vec![0u8; size];
    for i in ids {
        common::fill(&mut block, i as u64, round);
        let p = root.join(format!("d{:03}/f{i}", i % 100));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, &block).unwrap();
    }
}

/// The 1% of the 10k tree that changes: every 100th file.
fn one_pct() -> impl Iterator<Item = usize> {
    (0..100).map(|k| k * 100)
}

fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let md = std::fs::symlink_metadata(e.path()).unwrap();
                    if md.is_dir() {
                        du(&e.path())
                    } else {
                        md.blocks() * 512
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn bench(c: &mut Criterion) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("benches/snapshot.rs needs root (it mounts overlayfs); skipped");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(500));
    let (mut freeze_1pct, mut freeze_none, mut growth) = (Vec::new(), Vec::new(), Vec::new());
    // SPRITED_BENCH_100K_ONLY=1 skips the 10k benches (for profiling the big one).
    if std::env::var_os("SPRITED_BENCH_100K_ONLY").is_none() {
        let s = setup(&rt, 10_000, FILE_SIZE);

        let mut round = 0u64;
        g.bench_function("capture_1pct_of_10k", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    round += 1;
                    change(&s.root, one_pct(), FILE_SIZE, round);
                    let t = Instant::now();
                    let meta = s.cps.capture(String::new(), None, false, &|_| {}).unwrap();
                    total += t.elapsed();
                    freeze_1pct.push(meta.stats.freeze_ms);
                }
                total
            })
        });

        let store = s.state.join("store");
        g.bench_function("capture_unchanged_10k", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let before = du(&store);
                    let t = Instant::now();
                    let meta = s.cps.capture(String::new(), None, false, &|_| {}).unwrap();
                    total += t.elapsed();
                    growth.push(du(&store) as f64 - before as f64);
                    freeze_none.push(meta.stats.freeze_ms);
                }
                total
            })
        });

        let upper = s.cps.env().upper();
        g.bench_function("tar_zstd_upper_10k", |b| {
            b.iter(|| {
                let enc = zstd::Encoder::new(std::io::sink(), 3).unwrap();
                let mut tar = tar::Builder::new(enc);
                tar.append_dir_all(".", &upper).unwrap();
                tar.into_inner().unwrap().finish().unwrap();
            })
        });
        // Two checkpoints to restore back and forth between.
        let a = s.cps.capture("a".into(), None, false, &|_| {}).unwrap().id;
        change(&s.root, one_pct(), FILE_SIZE, 9999);
        let b_id = s.cps.capture("b".into(), None, false, &|_| {}).unwrap().id;
        let mut flip = false;
        g.bench_function("restore_cached_10k", |b| {
            b.iter(|| {
                flip = !flip;
                let id = if flip { &a } else { &b_id };
                rt.block_on(s.cps.restore(id, PolicyRestore::FromCheckpoint, &|_| {}))
                    .unwrap();
            })
        });
        g.bench_function("restore_uncached_10k", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    flip = !flip;
                    let id = if flip { &a } else { &b_id };
                    // The layer of the checkpoint not mounted is dropped from the cache.
                    s.cps.env().remove_layer(id);
                    let t = Instant::now();
                    rt.block_on(s.cps.restore(id, PolicyRestore::FromCheckpoint, &|_| {}))
                        .unwrap();
                    total += t.elapsed();
                }
                total
            })
        });

        drop(s);
    }

    // 100,000 small files that never change, plus the same 100 files of
    // 100 KiB as in the 10k case, changed before each capture.
    const HOT: std::ops::Range<usize> = 100_000..100_100;
    let big = setup(&rt, 100_000, 1024);
    change(&big.root, HOT.clone(), FILE_SIZE, 0);
    big.cps
        .capture("hot files".into(), None, false, &|_| {})
        .unwrap();
    let mut freeze_big = Vec::new();
    let mut round = 0u64;
    g.bench_function("capture_100_changed_of_100k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round += 1;
                change(&big.root, HOT.clone(), FILE_SIZE, round);
                let t = Instant::now();
                let meta = big
                    .cps
                    .capture(String::new(), None, false, &|_| {})
                    .unwrap();
                total += t.elapsed();
                freeze_big.push(meta.stats.freeze_ms);
            }
            total
        })
    });
    g.finish();
    drop(big);
    eprintln!(
        "freeze window, median: 1% of 10k {:.1} ms; unchanged 10k {:.1} ms; 100 of 100k {:.1} ms",
        common::median(&mut freeze_1pct),
        common::median(&mut freeze_none),
        common::median(&mut freeze_big)
    );
    eprintln!(
        "store growth of an unchanged capture, median: {:.0} bytes",
        common::median(&mut growth)
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
