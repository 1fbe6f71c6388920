//! Process checkpoints: dump and restore latency of a service holding
//! 16 MiB, 256 MiB and 1 GiB of touched memory, beside a plain `criu dump` /
//! `criu restore` of another copy of the same program in the same run, so
//! the daemon's overhead shows as a ratio (needs root and CRIU).
//!
//! - `daemon_freeze_window_<size>`: what the service feels of a checkpoint
//!   (freeze → CRIU dump → file scan → thaw; `freeze_ms` of the checkpoint),
//!   each after the service changed 1% of its pages at random (untimed);
//!   the whole capture (until the images are durable in the store) and
//!   the store's growth are recorded too;
//! - `plain_dump_<size>`: `criu dump --leave-running` of the copy;
//! - `plain_dump_same_tree_<size>`: `criu dump --leave-running` of the
//!   daemon's environment, its whole tree (the init, its namespaces, the
//!   overlay root and the external mounts), with the daemon's options,
//!   its cgroup frozen first (as the daemon's hook does);
//! - `daemon_restore_<size>`: a whole restore (the undo point: a capture
//!   of the state being replaced; then kill, files and CRIU's start-up,
//!   the images brought up to date from the store's packs meanwhile, CRIU
//!   restore, adoption);
//! - `daemon_restore_without_undo_point_<size>`: the same of an automatic
//!   checkpoint, which takes no undo point: the restore itself (the images
//!   the last restore left are patched where they differ: after the first,
//!   nothing);
//! - `daemon_restore_uncached_<size>`: the same with no images cached: every
//!   page of the images rebuilt from the store's packs;
//! - `plain_restore_<size>`: killing the copy, waiting until its pid is free,
//!   and `criu restore --restore-detached` (a restore of a running service
//!   has to stop it first; the daemon's restore does the same);
//! - `plain_restore_same_tree_<size>`: `criu restore` of the daemon's
//!   images of that whole tree, onto the same root with the daemon's
//!   options, as a container runtime does it (the tree there killed, the
//!   init's cgroup made again, CRIU started in it). The issue's goal is
//!   the daemon within 1.1x of plain CRIU doing the same; the tree's
//!   namespaces and mounts are part of what it does. CRIU is started as
//!   the daemon starts its own (`posix_spawn`: a fork of this big process
//!   would cost milliseconds that neither the daemon nor a runtime pays),
//!   and CRIU's own restore time (its `stats-restore`) is printed for both.
//!   The root is the one mounted already, its files in the kernel's caches
//!   from the run before;
//! - `plain_restore_same_tree_fresh_root_<size>`: the same onto a root
//!   mounted afresh first (the checkpoint's layer, an empty upper dir), as
//!   the daemon's restore mounts it and a runtime mounts a container's
//!   root: CRIU's lookups on the root then start from cold caches, as the
//!   daemon's do.
//!
//! Before each timed operation, daemon or plain, the bench runs `sync(2)`
//! (untimed), so that the writeback and discards of the previous one (the
//! daemon writes the new pages to its store after the thaw) do not land
//! inside the next.
//!
//! Each daemon operation is also followed by the same plain operation on
//! the copy, and the median of those pairs' ratios is printed too (less
//! sensitive to the machine drifting between the criterion groups).
//!
//! After the criterion figures it prints the ratios, the end-to-end
//! capture time (the freeze window plus storing the images by page after
//! the thaw) and the store's growth per checkpoint, as a share of the
//! service's memory.
//!
//! Run: `sudo cargo bench --bench criu` (about ten minutes);
//! `SPRITED_BENCH_MIB=16` runs one size.
//!
//! Where `/run` is not a tmpfs (this development VM), the bench runs in a
//! mount namespace of its own with one (see `common::kdat_cache`): CRIU,
//! the daemon's and the plain one, then keeps its kernel probe between
//! runs, as on the sprites' VMs.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Rig, median, median_ratio, run_criu as run, spawn_plain};
use criterion::{Criterion, criterion_group, criterion_main};
use sprited::checkpoint::PolicyRestore;
use sprited::supervisor::Status;

/// Fills N MiB with random bytes (nothing to compress or deduplicate),
/// says "ready", then idles; on SIGUSR1 it overwrites 1% of its pages,
/// picked at random, and says "dirtied".
const HOLDER: &str = r#"
import mmap, os, random, signal, sys, time
n = int(sys.argv[1]) << 20
mem = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE)
for off in range(0, n, 1 << 20):
    mem[off:off + (1 << 20)] = os.urandom(1 << 20)
pages = n // 4096
def dirty(*_):
    for p in random.sample(range(pages), max(1, pages // 100)):
        mem[p * 4096:(p + 1) * 4096] = os.urandom(4096)
    print("dirtied", flush=True)
signal.signal(signal.SIGUSR1, dirty)
print("ready", flush=True)
while True:
    time.sleep(1)
"#;

const SIZES: [(u64, &str); 3] = [(16, "16MiB"), (256, "256MiB"), (1024, "1GiB")];

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
    common::kill_and_wait(pid);
    run(criu, &["restore", "--restore-detached"], images);
    t.elapsed().as_secs_f64() * 1e3
}

/// The raw images in `from` (a restore's) copied to `to`, without that
/// restore's log and statistics.
fn copy_images(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let name = e.file_name();
        if e.file_type().unwrap().is_file()
            && !["restore.log", "stats-restore"].contains(&name.to_str().unwrap_or(""))
        {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

/// Plain `criu dump --leave-running` of the environment's whole tree (its
/// init, `init`), with the same options, external mounts and cgroup to
/// freeze as the daemon's dump, the cgroup frozen first and thawed after
/// (left to freeze it, CRIU polls for `frozen` in 100 ms steps): ms.
fn plain_tree_dump(criu: &Path, init: i32, cgroup: &sprited::cgroup::Cgroup, images: &Path) -> f64 {
    let _ = std::fs::remove_dir_all(images);
    std::fs::create_dir_all(images).unwrap();
    let mut cmd = std::process::Command::new(criu);
    cmd.args(["dump", "--tree", &init.to_string(), "--leave-running"])
        .arg("--freeze-cgroup")
        .arg(cgroup.path())
        .args(sprited::criu::DUMP_OPTIONS)
        .args(["--network-lock", "skip"])
        .arg("--images-dir")
        .arg(images)
        .args(["--log-file", "plain.log"]);
    for (inside, key) in sprited::checkpoint::EXTERNAL_MOUNTS {
        cmd.arg("--external").arg(format!("mnt[{inside}]:{key}"));
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    nix::unistd::sync();
    let t = Instant::now();
    cgroup.freeze(Duration::from_secs(10)).unwrap();
    let st = cmd.status().unwrap();
    cgroup.thaw(Duration::from_secs(10)).unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(
        st.success(),
        "plain criu dump of the tree failed: {}",
        std::fs::read_to_string(images.join("plain.log")).unwrap_or_default()
    );
    ms
}

/// CRIU's own restore time in the `stats-restore` of `dir`: ms (0 if none).
fn restore_time(dir: &Path) -> f64 {
    std::fs::read(dir.join("stats-restore"))
        .ok()
        .and_then(|b| sprited::criu::stats::parse_restore(&b))
        .map_or(0.0, |s| s.restore_time as f64 / 1e3)
}

/// Plain `criu restore` of the environment's whole tree (`images`, a
/// daemon's dump of it), as a container runtime does it: the tree there
/// now killed and waited for (its cgroups emptied and removed), the init's
/// cgroup made again, and CRIU started (`posix_spawn`, as the daemon
/// starts its own) and moved into it, onto the same root with the same
/// external mounts and options as the daemon's CRIU, detached: ms.
/// (CRIU's own time is then in `images/stats-restore`: [`restore_time`].)
/// (It hands the tasks no pipes of the daemon's: the restored init finds
/// its request pipe closed.)
///
/// With `fresh_root` (a checkpoint id), the root is first mounted afresh
/// with that checkpoint's layer and an empty upper dir, as the daemon's
/// restore mounts it (and a runtime mounts a container's root before it
/// restores it); without, CRIU restores onto the root already mounted,
/// its files and directories in the kernel's caches from the last run.
fn plain_tree_restore(
    rig: &Rig,
    criu: &Path,
    images: &Path,
    externals: &[(String, std::path::PathBuf)],
    fresh_root: Option<&str>,
) -> f64 {
    nix::unistd::sync();
    let t = Instant::now();
    rig.rt.block_on(rig.container.kill());
    // (the old generation removed after the timed part)
    let _old = fresh_root.map(|id| rig.env.switch_to(id).unwrap());
    let init = rig.container.init_cgroup().unwrap();
    let mut args: Vec<std::ffi::OsString> =
        ["restore", "--restore-detached", "--manage-cgroups=ignore"]
            .into_iter()
            .chain(["--tcp-close", "--ext-unix-sk", "--file-locks", "--root"])
            .map(Into::into)
            .collect();
    args.push(rig.env.root().into());
    args.push("--images-dir".into());
    args.push(images.into());
    args.extend(["--log-file".into(), "plain.log".into()]);
    for (key, host) in externals {
        args.push("--external".into());
        args.push(format!("mnt[{key}]:{}", host.display()).into());
    }
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    // Started as the daemon starts its CRIU (`posix_spawn`, then moved
    // into the init's cgroup), not by a fork of this big process, as a
    // container runtime starts it. The move does not wait (the rig mounts
    // the hierarchy with `favordynmods`), and CRIU makes its first task
    // only after reading its images, milliseconds later; unlike the
    // daemon's, nothing here enforces that order.
    let null = std::fs::File::options()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let child = rig
        .reaper
        .spawn_with(|| {
            sprited::sys::spawn_passing_fds(
                criu,
                &args,
                Vec::new(),
                3,
                std::os::fd::AsFd::as_fd(&null),
            )
        })
        .unwrap();
    init.add(child.pid).unwrap();
    let exit = rig.rt.block_on(child.exit).unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(
        exit == sprited::sys::Exit::Code(0),
        "plain criu restore of the tree failed ({exit:?}): {}",
        std::fs::read_to_string(images.join("plain.log")).unwrap_or_default()
    );
    ms
}

fn bench(c: &mut Criterion) {
    let Some(criu_path) = common::can_run("criu") else {
        return;
    };
    let rig = Rig::new("criu", criu_path.clone());
    let (rt, tmp, sup, cps) = (&rig.rt, &rig.tmp, &rig.sup, &rig.cps);

    let mut g = c.benchmark_group("criu");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(100));
    let mut report = Vec::new();
    // SPRITED_BENCH_MIB=16,256 runs only those sizes (all three by default).
    let only = std::env::var("SPRITED_BENCH_MIB").ok();
    let picked = |mib: u64| {
        only.as_deref()
            .is_none_or(|l| l.split(',').any(|m| m.trim() == mib.to_string()))
    };
    for (mib, label) in SIZES.into_iter().filter(|(m, _)| picked(*m)) {
        let name = format!("mem{mib}");
        rig.start_service(&name, HOLDER, &[mib.to_string()]);

        // The plain copy runs beside the service: every daemon operation is
        // followed by the same plain one, so each pair saw the same machine.
        let pid = spawn_plain(HOLDER, &[mib.to_string()]);
        let images = tmp.path().join(format!("plain-{mib}"));
        let (mut freeze, mut capture, mut restore) = (Vec::new(), Vec::new(), Vec::new());
        // (freeze window, CRIU's memdump and memwrite time) of each capture
        let mut spread: Vec<(f64, f64, f64)> = Vec::new();
        let mut growth = Vec::new();
        // The first checkpoint stores everything; the timed ones after it
        // store what changed.
        cps.capture(String::new(), None, true, &|_| {}).unwrap();
        let (mut paired_dump, mut paired_restore) = (Vec::new(), Vec::new());
        let mut taken: Vec<String> = Vec::new();
        g.bench_function(format!("daemon_freeze_window_{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // (untimed) 1% of the service's pages change
                    rig.signal_service(&name, "dirtied");
                    nix::unistd::sync();
                    let stored = rig.env.store().objects_bytes();
                    let t = Instant::now();
                    let meta = cps.capture(String::new(), None, true, &|_| {}).unwrap();
                    capture.push(t.elapsed().as_secs_f64() * 1e3);
                    growth.push(rig.env.store().objects_bytes().saturating_sub(stored) as f64);
                    assert!(meta.env.is_some(), "the environment was dumped");
                    freeze.push(meta.stats.freeze_ms);
                    let stats = meta
                        .env
                        .as_ref()
                        .map(|e| e.stats.clone())
                        .unwrap_or_default();
                    spread.push((
                        meta.stats.freeze_ms,
                        stats.memdump_time as f64 / 1e3,
                        stats.memwrite_time as f64 / 1e3,
                    ));
                    total += Duration::from_secs_f64(meta.stats.freeze_ms / 1e3);
                    // Deleted after the group: deleting gigabytes between
                    // captures (online discard) would disturb them.
                    taken.push(meta.id);
                    paired_dump.push(plain_dump(&criu_path, pid, &images));
                }
                total
            })
        });
        // Plain CRIU dumping the same tree (the daemon's environment, its
        // service running), with the daemon's options.
        let init = rig.container.init_host_pid().expect("the environment runs");
        let whole = rig.cgroups.whole();
        let tree_images = tmp.path().join(format!("plain-tree-dump-{mib}"));
        let mut ptree_dump = Vec::new();
        g.bench_function(format!("plain_dump_same_tree_{label}"), |b| {
            b.iter_custom(|iters| {
                let ms: f64 = (0..iters)
                    .map(|_| plain_tree_dump(&criu_path, init, &whole, &tree_images))
                    .inspect(|ms| ptree_dump.push(*ms))
                    .sum();
                Duration::from_secs_f64(ms / 1e3)
            })
        });
        let _ = std::fs::remove_dir_all(&tree_images);
        let id = taken.last().cloned().unwrap();
        g.bench_function(format!("daemon_restore_{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    nix::unistd::sync();
                    let t = Instant::now();
                    rt.block_on(cps.restore(&id, PolicyRestore::FromCheckpoint, &|_| {}))
                        .unwrap();
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
        // An automatic checkpoint (an undo point the restores above took)
        // restores without taking one: the restore itself.
        let auto = cps
            .list(None)
            .into_iter()
            .find(|m| m.is_auto && m.env.is_some())
            .expect("the restores took undo points")
            .id;
        let mut step = Vec::new();
        let mut criu_step = Vec::new();
        let mut paired_step = Vec::new();
        g.bench_function(format!("daemon_restore_without_undo_point_{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    nix::unistd::sync();
                    let t = Instant::now();
                    rt.block_on(cps.restore(&auto, PolicyRestore::FromCheckpoint, &|_| {}))
                        .unwrap();
                    let took = t.elapsed();
                    step.push(took.as_secs_f64() * 1e3);
                    criu_step.push(
                        cps.last_restore_stats()
                            .map_or(0.0, |s| s.restore_time as f64 / 1e3),
                    );
                    total += took;
                    assert_eq!(sup.get(&name).unwrap().state.status, Status::Running);
                    paired_step.push(plain_restore(&criu_path, pid, &images));
                }
                total
            })
        });
        // Plain CRIU restoring the same tree: the images of that restore,
        // onto the same root, with the same options, the daemon idle.
        let tree = tmp.path().join(format!("plain-tree-{mib}"));
        copy_images(&rig.tmp.path().join("state/criu/restore-cache"), &tree);
        rt.block_on(sup.stop_if_running(&name, Duration::ZERO))
            .unwrap();
        let externals = cps.external_mounts(Path::new("/dev"));
        let mut ptree = Vec::new();
        let mut criu_ptree = Vec::new();
        g.bench_function(format!("plain_restore_same_tree_{label}"), |b| {
            b.iter_custom(|iters| {
                let ms: f64 = (0..iters)
                    .map(|_| {
                        let ms = plain_tree_restore(&rig, &criu_path, &tree, &externals, None);
                        criu_ptree.push(restore_time(&tree));
                        ms
                    })
                    .inspect(|ms| ptree.push(*ms))
                    .sum();
                Duration::from_secs_f64(ms / 1e3)
            })
        });
        let (mut pfresh, mut criu_pfresh) = (Vec::new(), Vec::new());
        g.bench_function(format!("plain_restore_same_tree_fresh_root_{label}"), |b| {
            b.iter_custom(|iters| {
                let ms: f64 = (0..iters)
                    .map(|_| {
                        let ms =
                            plain_tree_restore(&rig, &criu_path, &tree, &externals, Some(&auto));
                        criu_pfresh.push(restore_time(&tree));
                        ms
                    })
                    .inspect(|ms| pfresh.push(*ms))
                    .sum();
                Duration::from_secs_f64(ms / 1e3)
            })
        });
        // (the daemon takes over again: its restore kills that tree)
        rt.block_on(cps.restore(&auto, PolicyRestore::FromCheckpoint, &|_| {}))
            .unwrap();
        assert_eq!(sup.get(&name).unwrap().state.status, Status::Running);
        // The same restore with nothing cached: its images rebuilt whole
        // from the store's packs first.
        let mut cold = Vec::new();
        g.bench_function(format!("daemon_restore_uncached_{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    cps.clear_restore_cache();
                    nix::unistd::sync();
                    let t = Instant::now();
                    rt.block_on(cps.restore(&auto, PolicyRestore::FromCheckpoint, &|_| {}))
                        .unwrap();
                    let took = t.elapsed();
                    cold.push(took.as_secs_f64() * 1e3);
                    total += took;
                    assert_eq!(sup.get(&name).unwrap().state.status, Status::Running);
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
        spread.sort_by(|a, b| a.0.total_cmp(&b.0));
        let at = |q: f64| spread[((spread.len() - 1) as f64 * q).round() as usize];
        let (lo, mid, hi, top) = (at(0.1), at(0.5), at(0.9), at(1.0));
        eprintln!(
            "{label}: freeze windows of {} captures: p10 {:.1}, median {:.1}, p90 {:.1}, max {:.1} ms; \
             CRIU's memdump / memwrite at the median {:.1} / {:.1} ms, at the max {:.1} / {:.1} ms",
            spread.len(),
            lo.0,
            mid.0,
            hi.0,
            top.0,
            mid.1,
            mid.2,
            top.1,
            top.2
        );
        report.push((
            label,
            [
                median(&mut freeze.clone()),
                median(&mut pdump),
                median(&mut restore.clone()),
                median(&mut prestore),
                median(&mut capture),
                median(&mut growth) / (mib << 20) as f64 * 100.0,
                median_ratio(&freeze, &paired_dump),
                median_ratio(&restore, &paired_restore),
                median(&mut step.clone()),
                median_ratio(&step, &paired_step),
                median(&mut cold),
                median(&mut ptree),
                median(&mut ptree_dump),
                median(&mut criu_step),
                median(&mut criu_ptree),
                median(&mut pfresh),
                median(&mut criu_pfresh),
            ],
        ));
    }
    g.finish();
    drop(rig);
    for (
        label,
        [
            f,
            pd,
            r,
            pr,
            cap,
            grew,
            dump_pairs,
            restore_pairs,
            st,
            step_pairs,
            uncached,
            same_tree,
            same_tree_dump,
            criu_daemon,
            criu_plain,
            fresh,
            criu_fresh,
        ],
    ) in report
    {
        eprintln!(
            "{label}: freeze window {f:.1} ms vs plain dump {pd:.1} ms ({:.2}x; paired runs {dump_pairs:.2}x); \
             restore {r:.1} ms vs plain {pr:.1} ms ({:.2}x; paired runs {restore_pairs:.2}x), \
             without the undo point {st:.1} ms ({:.2}x; paired runs {step_pairs:.2}x), \
             with no image cached {uncached:.1} ms ({:.2}x); \
             whole capture after 1% changed {cap:.1} ms, store growth {grew:.2}% of the memory",
            f / pd,
            r / pr,
            st / pr,
            uncached / pr
        );
        eprintln!(
            "{label}: freeze window {f:.1} ms vs plain CRIU dumping the same tree {same_tree_dump:.1} ms ({:.2}x)",
            f / same_tree_dump
        );
        eprintln!(
            "{label}: restore without the undo point {st:.1} ms vs plain CRIU restoring the same tree \
             {same_tree:.1} ms ({:.2}x; the tree itself, its namespaces and mounts, costs plain CRIU \
             {:.1} ms over one process); CRIU's own restore time (its stats) {criu_daemon:.1} ms in \
             the daemon's, {criu_plain:.1} ms in plain CRIU's",
            st / same_tree,
            same_tree - pr
        );
        eprintln!(
            "{label}: restore without the undo point {st:.1} ms vs plain CRIU restoring the same tree \
             onto a root mounted afresh {fresh:.1} ms ({:.2}x); CRIU's own restore time there \
             {criu_fresh:.1} ms",
            st / fresh
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
