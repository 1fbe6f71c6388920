//! Sleep and wake of one service holding 256 MiB of touched memory,
//! measured from the wake's start to the service answering a request on
//! its TCP port (needs root and CRIU):
//!
//! - `wake_from_warm_256MiB`: thaw (goal: at most 5 ms);
//! - `answer_awake_256MiB`: the same request to the awake service (the
//!   floor the warm wake is measured against);
//! - `wake_from_cold_256MiB`: a CRIU restore of the whole environment
//!   from the cold sleep's images, the adoption and the services' upkeep
//!   (goal: at most 1.2× the plain restore);
//! - `plain_restore_256MiB`: `criu restore --restore-detached` of a copy
//!   of the same program outside the daemon, dumped once by plain
//!   `criu dump`, then the same request.
//!
//! Each cold wake is followed by a plain restore, and the median of those
//! pairs' ratios is printed after the criterion figures, with CRIU's own
//! `restore_time` (its `stats-restore`) within the cold wake: the plain
//! copy is one process, the environment a PID and mount namespace with
//! its init, so part of the difference is CRIU's, not the daemon's. Sleeping (freeze,
//! dump) and the plain copy's kill are outside the timings; `sync(2)` runs
//! (untimed) before each timed wake.
//!
//! Run: `sudo cargo bench --bench sleep` (about two minutes).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Rig, median, median_ratio, run_criu, spawn_plain};
use criterion::{Criterion, criterion_group, criterion_main};
use sprited::lifecycle::{Lifecycle, Transition};
use sprited::sleep::{Depth, Parts, Sleep};

/// Holds N MiB of touched memory and answers each connection on the port
/// with `<pid> <count>`; says "ready" once listening.
const SERVER: &str = r#"
import os, socket, sys
port, mb = int(sys.argv[1]), int(sys.argv[2])
block = os.urandom(1 << 20)
mem = bytearray(block * mb)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', port))
s.listen(16)
print("ready", flush=True)
count = 0
while True:
    c, _ = s.accept()
    c.recv(1)
    count += 1
    c.sendall(('%d %d' % (os.getpid(), count)).encode())
    c.close()
"#;

const MIB: u64 = 256;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request: the answer's pid.
fn ask(port: u16) -> i64 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"?").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace().next().unwrap().parse().unwrap()
}

/// The plain copy's restore and first answer: ms.
fn plain_wake(criu: &Path, pid: i32, port: u16, images: &Path) -> f64 {
    common::kill_and_wait(pid);
    nix::unistd::sync();
    let t = Instant::now();
    run_criu(criu, &["restore", "--restore-detached"], images);
    assert_eq!(ask(port), pid as i64, "the plain copy came back");
    t.elapsed().as_secs_f64() * 1e3
}

fn bench(c: &mut Criterion) {
    let Some(criu_path) = common::can_run("sleep") else {
        return;
    };
    let rig = Rig::new("sleep", criu_path.clone());
    let port = free_port();
    rig.start_service("mem", SERVER, &[port.to_string(), MIB.to_string()]);
    let pid = ask(port);

    // Sleep on demand only (no idle timer).
    let sleep = Sleep::new(Duration::ZERO, Duration::from_secs(3600));
    rig.rt.block_on(async {
        let lifecycle = Lifecycle::spawn();
        lifecycle.request(Transition::BootComplete).await.unwrap();
        sleep.start(
            Parts {
                checkpoints: rig.cps.clone(),
                lifecycle,
            },
            None,
        );
    });
    let go = |cold: bool| {
        let depth = rig.rt.block_on(sleep.force(cold)).unwrap();
        assert_eq!(depth, if cold { Depth::Cold } else { Depth::Warm });
        nix::unistd::sync();
    };
    let wake = || {
        let t = Instant::now();
        rig.rt.block_on(sleep.wake());
        if let Some(why) = sleep.status().last_wake_error {
            panic!("the wake started the service fresh: {why}");
        }
        assert_eq!(ask(port), pid, "the same process answers");
        t.elapsed()
    };

    let plain_port = free_port();
    let plain_pid = spawn_plain(SERVER, &[plain_port.to_string(), MIB.to_string()]);
    let images = rig.tmp.path().join("plain");
    std::fs::create_dir_all(&images).unwrap();
    run_criu(
        &criu_path,
        &["dump", "--tree", &plain_pid.to_string()],
        &images,
    );
    common::kill_and_wait(plain_pid);
    run_criu(&criu_path, &["restore", "--restore-detached"], &images);

    let mut g = c.benchmark_group("sleep");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(100));
    let mut warm = Vec::new();
    g.bench_function("wake_from_warm_256MiB", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    go(false);
                    let took = wake();
                    warm.push(took.as_secs_f64() * 1e3);
                    took
                })
                .sum()
        })
    });
    let mut awake = Vec::new();
    g.bench_function("answer_awake_256MiB", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let took = wake();
                    awake.push(took.as_secs_f64() * 1e3);
                    took
                })
                .sum()
        })
    });
    let (mut cold, mut paired, mut criu_own) = (Vec::new(), Vec::new(), Vec::new());
    g.bench_function("wake_from_cold_256MiB", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    go(true);
                    let took = wake();
                    cold.push(took.as_secs_f64() * 1e3);
                    let stats = rig.cps.last_restore_stats().expect("the wake restored");
                    criu_own.push(stats.restore_time as f64 / 1e3);
                    paired.push(plain_wake(&criu_path, plain_pid, plain_port, &images));
                    took
                })
                .sum()
        })
    });
    let mut plain = Vec::new();
    g.bench_function("plain_restore_256MiB", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let ms = plain_wake(&criu_path, plain_pid, plain_port, &images);
                    plain.push(ms);
                    Duration::from_secs_f64(ms / 1e3)
                })
                .sum()
        })
    });
    g.finish();
    common::kill_and_wait(plain_pid);
    drop(rig);
    let (w, a, cd, p) = (
        median(&mut warm.clone()),
        median(&mut awake),
        median(&mut cold.clone()),
        median(&mut plain),
    );
    eprintln!(
        "256MiB: wake from warm {w:.2} ms (awake answer {a:.2} ms); \
         wake from cold {cd:.1} ms vs plain restore {p:.1} ms ({:.2}x; paired runs {:.2}x); \
         CRIU's own restore time within the cold wake {:.1} ms",
        cd / p,
        median_ratio(&cold, &paired),
        median(&mut criu_own)
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
