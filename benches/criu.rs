//! Process checkpoints: dump and restore latency of a service holding
//! 16 MiB, 256 MiB and 1 GiB of touched memory, beside a plain `criu dump` /
//! `criu restore` of another copy of the same program in the same run, so
//! the daemon's overhead shows as a ratio (needs root and CRIU).
//!
//! - `daemon_freeze_window_<size>`: what the service feels of a checkpoint
//!   (freeze → CRIU dump → file scan → thaw; `freeze_ms` of the checkpoint);
//! - `plain_dump_<size>`: `criu dump --leave-running` of the copy;
//! - `daemon_restore_<size>`: a whole restore (kill, files, CRIU restore
//!   from the cached images, adoption);
//! - `plain_restore_<size>`: killing the copy, waiting until its pid is free,
//!   and `criu restore --restore-detached` (a restore of a running service
//!   has to stop it first; the daemon's restore does the same).
//!
//! Before each timed operation, daemon or plain, the bench runs `sync(2)`
//! (untimed), so that the writeback and discards of the previous one (the
//! daemon writes the images to its store after the thaw, and prunes older
//! raw images) do not land inside the next.
//!
//! Each daemon operation is also followed by the same plain operation on
//! the copy, and the median of those pairs' ratios is printed too (less
//! sensitive to the machine drifting between the criterion groups).
//!
//! After the criterion figures it prints the ratios, and the end-to-end
//! capture time (the freeze window plus storing the images, zstd, in the
//! content-addressed store after the thaw).
//!
//! Run: `sudo cargo bench --bench criu` (about five minutes).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sprited::cgroup::Cgroups;
use sprited::checkpoint::Checkpoints;
use sprited::container::init::Setup;
use sprited::container::{Container, ContainerConfig};
use sprited::criu::Criu;
use sprited::fs::{Env, EnvConfig};
use sprited::reaper::Reaper;
use sprited::supervisor::spec::ServiceSpec;
use sprited::supervisor::{EventKind, Status, Supervisor, SupervisorConfig};

/// Touches N MiB (1 MiB of random bytes repeated: zstd level 1 cannot
/// shrink it), says "ready", then idles.
const HOLDER: &str = r#"
import os, sys, time
n = int(sys.argv[1]) << 20
block = os.urandom(1 << 20)
mem = bytearray(block * (n >> 20))
print("ready", flush=True)
while True:
    time.sleep(1)
"#;

const SIZES: [(u64, &str); 3] = [(16, "16MiB"), (256, "256MiB"), (1024, "1GiB")];

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A copy of the program outside the daemon, for plain CRIU. Killed by the
/// bench; the `Reaper` (this process is a subreaper) collects it.
#[allow(clippy::zombie_processes)]
fn spawn_plain(mib: u64) -> i32 {
    let mut child = Command::new("python3")
        .args(["-u", "-c", HOLDER, &mib.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    child.id() as i32
}

fn run(criu: &Path, args: &[&str], dir: &Path) {
    let st = Command::new(criu)
        .args(args)
        .arg("--images-dir")
        .arg(dir)
        .args(["--log-file", "plain.log", "--shell-job"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "criu {args:?} failed: {}",
        std::fs::read_to_string(dir.join("plain.log")).unwrap_or_default()
    );
}

fn gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// A plain `criu dump --leave-running` of `pid` into `images`: ms.
fn plain_dump(criu: &Path, pid: i32, images: &Path) -> f64 {
    let _ = std::fs::remove_dir_all(images);
    std::fs::create_dir_all(images).unwrap();
    nix::unistd::sync();
    let t = Instant::now();
    run(
        criu,
        &["dump", "--tree", &pid.to_string(), "--leave-running"],
        images,
    );
    t.elapsed().as_secs_f64() * 1e3
}

/// Kill `pid`, wait until it is gone, `criu restore --restore-detached`: ms.
fn plain_restore(criu: &Path, pid: i32, images: &Path) -> f64 {
    nix::unistd::sync();
    let t = Instant::now();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    while !gone(pid) {
        std::thread::sleep(Duration::from_millis(1));
    }
    run(criu, &["restore", "--restore-detached"], images);
    t.elapsed().as_secs_f64() * 1e3
}

fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&mut r)
}

fn bench(c: &mut Criterion) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("benches/criu.rs needs root; skipped");
        return;
    }
    let Some(criu_path) = sprited::criu::locate(None) else {
        eprintln!("benches/criu.rs needs criu (scripts/setup.sh); skipped");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("sprited-bench-criu-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let state = tmp.path().join("state");
    let root = state.join("root");
    let env = Arc::new(
        Env::open(EnvConfig {
            state_dir: state.clone(),
            env_root: root.clone(),
            base: Some(sprited::config::DEFAULT_ENV_BASE.into()),
            mountinfo: "/proc/self/mountinfo".into(),
            layer_manifest: None,
        })
        .unwrap(),
    );
    let parent = PathBuf::from(format!("sprited-bench/{}", std::process::id()));
    let cgroups = Cgroups::open(Path::new("/proc/self/mountinfo"), &parent).unwrap();
    let reaper = rt.block_on(async { Reaper::start().unwrap() });
    let container = rt.block_on(start_environment(&state, &root, &cgroups, &reaper));
    let sup = rt.block_on(async {
        Supervisor::open(SupervisorConfig {
            state_dir: state.clone(),
            cgroups: Some(cgroups.clone()),
            container: Some(container.clone()),
            base_env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            port_wait: Duration::from_secs(1),
            max_log_file: 1 << 20,
        })
        .unwrap()
    });
    let criu = Criu::new(criu_path.clone(), reaper.clone(), state.join("criu-logs"));
    let cps = Arc::new(
        Checkpoints::open(
            &state,
            env.clone(),
            sup.clone(),
            Some(criu),
            Some(container.clone()),
        )
        .unwrap(),
    );

    let mut g = c.benchmark_group("criu");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(100));
    let mut report = Vec::new();
    for (mib, label) in SIZES {
        let name = format!("mem{mib}");
        let mut events = sup.subscribe();
        sup.put(
            &name,
            ServiceSpec {
                cmd: "python3".into(),
                args: vec!["-u".into(), "-c".into(), HOLDER.into(), mib.to_string()],
                env: Default::default(),
                dir: None,
                needs: vec![],
                http_port: None,
            },
        )
        .unwrap();
        rt.block_on(async {
            sup.start(&name).await.unwrap();
            loop {
                let ev = events.recv().await.unwrap();
                if ev.kind == EventKind::Stdout && ev.data.as_deref() == Some("ready\n") {
                    break;
                }
            }
        });

        // The plain copy runs beside the service: every daemon operation is
        // followed by the same plain one, so each pair saw the same machine.
        let pid = spawn_plain(mib);
        let images = tmp.path().join(format!("plain-{mib}"));
        let (mut freeze, mut capture, mut restore) = (Vec::new(), Vec::new(), Vec::new());
        let (mut paired_dump, mut paired_restore) = (Vec::new(), Vec::new());
        let mut taken: Vec<String> = Vec::new();
        g.bench_function(format!("daemon_freeze_window_{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    nix::unistd::sync();
                    let t = Instant::now();
                    let meta = cps.capture(String::new(), None, true, &|_| {}).unwrap();
                    capture.push(t.elapsed().as_secs_f64() * 1e3);
                    assert!(meta.env.is_some(), "the environment was dumped");
                    freeze.push(meta.stats.freeze_ms);
                    total += Duration::from_secs_f64(meta.stats.freeze_ms / 1e3);
                    // Deleted after the group: deleting gigabytes between
                    // captures (online discard) would disturb them.
                    taken.push(meta.id);
                    paired_dump.push(plain_dump(&criu_path, pid, &images));
                }
                total
            })
        });
        let id = taken.last().cloned().unwrap();
        g.bench_function(format!("daemon_restore_{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    nix::unistd::sync();
                    let t = Instant::now();
                    rt.block_on(cps.restore(&id, &|_| {})).unwrap();
                    let took = t.elapsed();
                    restore.push(took.as_secs_f64() * 1e3);
                    total += took;
                    let st = sup.get(&name).unwrap();
                    assert_eq!(st.state.status, Status::Running);
                    paired_restore.push(plain_restore(&criu_path, pid, &images));
                }
                total
            })
        });
        rt.block_on(sup.stop_if_running(&name, Duration::ZERO))
            .unwrap();

        let (mut pdump, mut prestore) = (Vec::new(), Vec::new());
        g.bench_function(format!("plain_dump_{label}"), |b| {
            b.iter_custom(|iters| {
                let ms: f64 = (0..iters)
                    .map(|_| plain_dump(&criu_path, pid, &images))
                    .inspect(|ms| pdump.push(*ms))
                    .sum();
                Duration::from_secs_f64(ms / 1e3)
            })
        });
        g.bench_function(format!("plain_restore_{label}"), |b| {
            b.iter_custom(|iters| {
                let ms: f64 = (0..iters)
                    .map(|_| plain_restore(&criu_path, pid, &images))
                    .inspect(|ms| prestore.push(*ms))
                    .sum();
                Duration::from_secs_f64(ms / 1e3)
            })
        });
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        for old in &taken {
            cps.delete(old).ok();
        }
        report.push((
            label,
            [
                median(&mut freeze.clone()),
                median(&mut pdump),
                median(&mut restore.clone()),
                median(&mut prestore),
                median(&mut capture),
                median_ratio(&freeze, &paired_dump),
                median_ratio(&restore, &paired_restore),
            ],
        ));
    }
    g.finish();
    rt.block_on(sup.shutdown(Duration::from_secs(5)));
    rt.block_on(container.kill());
    cps.unmount_browsable(); // deletes made the newest checkpoints browsable
    let _ = env.unmount();
    cgroups.remove_parent_if_empty();
    for (label, [f, pd, r, pr, cap, dump_pairs, restore_pairs]) in report {
        eprintln!(
            "{label}: freeze window {f:.1} ms vs plain dump {pd:.1} ms ({:.2}x; paired runs {dump_pairs:.2}x); \
             restore {r:.1} ms vs plain {pr:.1} ms ({:.2}x; paired runs {restore_pairs:.2}x); whole capture {cap:.1} ms",
            f / pd,
            r / pr
        );
    }
}

/// The environment's container over the mounted root, as the daemon sets
/// it up (the API socket is a plain file here: nothing talks to it).
async fn start_environment(
    state: &Path,
    root: &Path,
    cgroups: &Cgroups,
    reaper: &Reaper,
) -> Container {
    let (checkpoints, logs, socket) = (
        state.join("checkpoints"),
        state.join("logs/services"),
        state.join("api.sock"),
    );
    std::fs::create_dir_all(&checkpoints).unwrap();
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(&socket, b"").unwrap();
    let c = Container::new(
        ContainerConfig {
            setup: Setup {
                root: root.to_owned(),
                hostname: "bench".into(),
                exe: env!("CARGO_BIN_EXE_sprited").into(),
                socket,
                checkpoints,
                logs,
            },
            cgroups: cgroups.clone(),
        },
        reaper.clone(),
    );
    c.start().await.expect("start the environment");
    c
}

criterion_group!(benches, bench);
criterion_main!(benches);
