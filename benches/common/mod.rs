//! The environment a process bench runs in, set up as the daemon does: an
//! overlay root, the environment's container in its own cgroups, the
//! supervisor and the checkpoints, in a temp state dir under `/var/tmp`.

#![allow(dead_code)] // (each bench uses part of it)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sprited::cgroup::Cgroups;
use sprited::checkpoint::Checkpoints;
use sprited::container::init::Setup;
use sprited::container::{Container, ContainerConfig};
use sprited::criu::Criu;
use sprited::fs::{Env, EnvConfig};
use sprited::reaper::Reaper;
use sprited::supervisor::spec::ServiceSpec;
use sprited::supervisor::{EventKind, Supervisor, SupervisorConfig};

pub struct Rig {
    pub rt: tokio::runtime::Runtime,
    pub tmp: tempfile::TempDir,
    pub criu_path: PathBuf,
    pub env: Arc<Env>,
    pub cgroups: Cgroups,
    pub reaper: Reaper,
    pub container: Container,
    pub sup: Supervisor,
    pub cps: Arc<Checkpoints>,
}

/// Root and CRIU, or why the bench cannot run. With `RUST_LOG` set, the
/// daemon's code logs to stderr.
pub fn can_run(bench: &str) -> Option<PathBuf> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("benches/{bench}.rs needs root; skipped");
        return None;
    }
    let found = sprited::criu::locate(None);
    if found.is_none() {
        eprintln!("benches/{bench}.rs needs criu (scripts/setup.sh); skipped");
        return None;
    }
    kdat_cache();
    found
}

/// Gives every CRIU of the bench, the daemon's and the plain one alike,
/// CRIU's cache of what it probed of the kernel (`/run/criu.kdat`), as on
/// a host whose `/run` is a tmpfs (Debian's, the sprites' VMs). CRIU keeps
/// that cache only on a tmpfs; where `/run` is not one (this development
/// VM), every CRIU run probes the kernel again, about 25 ms that plain
/// CRIU and the daemon would both pay, a fixed cost that would flatter
/// every ratio. The bench process gets a mount namespace of its own
/// (a slave of the host's) with a tmpfs on `/run`; called before any
/// thread starts (`unshare(CLONE_NEWNS)` needs a single thread).
fn kdat_cache() {
    use nix::mount::{MsFlags, mount};
    let tmpfs = nix::sys::statfs::statfs("/run")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    if tmpfs {
        return;
    }
    let own = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .and_then(|()| {
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_SLAVE,
                None::<&str>,
            )
        })
        .and_then(|()| {
            mount(
                Some("tmpfs"),
                "/run",
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=755"),
            )
        });
    // What the bench inherited (opened in the host's mount namespace) is
    // not passed on: CRIU could not find the mount of such an fd of the
    // plain copy in the bench's namespace.
    for fd in std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(fd) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
            && fd > 2
        {
            let _ = sprited::sys::set_cloexec(fd);
        }
    }
    match own {
        Ok(()) => eprintln!(
            "/run is not a tmpfs here: the bench runs with one of its own, so that CRIU (the daemon's and the plain one) keeps its kernel probe in /run/criu.kdat"
        ),
        Err(e) => eprintln!(
            "/run is not a tmpfs and the bench cannot mount one ({e}): every CRIU run probes the kernel again"
        ),
    }
}

impl Rig {
    pub fn new(bench: &str, criu_path: PathBuf) -> Rig {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("sprited-bench-{bench}-"))
            .tempdir_in("/var/tmp")
            .unwrap();
        let state = tmp.path().join("state");
        let root = state.join("root");
        let env = open_env(&state, Some(sprited::config::DEFAULT_ENV_BASE.into()));
        let parent = PathBuf::from(format!("sprited-bench/{}", std::process::id()));
        let cgroups = Cgroups::open(Path::new("/proc/self/mountinfo"), &parent).unwrap();
        // (as the daemon does at start, unless --no-cgroup-favordynmods)
        let moves = cgroups.favor_dynamic_moves(true).unwrap();
        eprintln!("cgroup moves: {moves:?}");
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
                sprited::checkpoint::seal::Key::new(vec![7; 32]).unwrap(),
                env.clone(),
                sup.clone(),
                Some(criu),
                Some(container.clone()),
            )
            .unwrap(),
        );
        Rig {
            rt,
            tmp,
            criu_path,
            env,
            cgroups,
            reaper,
            container,
            sup,
            cps,
        }
    }

    /// Starts service `name` running `python3 -u -c <program> <args>` and
    /// waits until it prints `ready`.
    pub fn start_service(&self, name: &str, program: &str, args: &[String]) {
        let mut events = self.sup.subscribe();
        let mut argv = vec!["-u".to_owned(), "-c".to_owned(), program.to_owned()];
        argv.extend(args.iter().cloned());
        self.sup
            .put(
                name,
                ServiceSpec {
                    cmd: "python3".into(),
                    args: argv,
                    env: Default::default(),
                    dir: None,
                    needs: vec![],
                    http_port: None,
                },
            )
            .unwrap();
        self.rt.block_on(async {
            self.sup.start(name).await.unwrap();
            loop {
                let ev = events.recv().await.unwrap();
                if ev.kind == EventKind::Stdout && ev.data.as_deref() == Some("ready\n") {
                    break;
                }
            }
        });
    }
}

/// Stops everything and removes what the rig made (also when a bench
/// panics).
/// The environment root of a bench under `state` (`state/root`), on `base`.
pub fn open_env(state: &Path, base: Option<PathBuf>) -> Arc<Env> {
    Arc::new(
        Env::open(EnvConfig {
            state_dir: state.to_owned(),
            env_root: state.join("root"),
            base,
            mountinfo: "/proc/self/mountinfo".into(),
            layer_manifest: None,
        })
        .expect("mount the environment (run as root)"),
    )
}

impl Rig {
    /// Sends SIGUSR1 to service `name`'s main process and waits until it
    /// prints `line`.
    pub fn signal_service(&self, name: &str, line: &str) {
        let mut events = self.sup.subscribe();
        let s = self
            .sup
            .running()
            .into_iter()
            .find(|s| s.name == name)
            .expect("the service runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(s.host_pid),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .unwrap();
        let want = format!("{line}\n");
        self.rt.block_on(async {
            loop {
                let ev = events.recv().await.unwrap();
                if ev.kind == EventKind::Stdout && ev.data.as_deref() == Some(want.as_str()) {
                    break;
                }
            }
        });
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.rt.block_on(self.sup.shutdown(Duration::from_secs(5)));
        self.rt.block_on(self.container.kill());
        self.cps.unmount_browsable();
        let _ = self.env.unmount();
        self.cgroups.remove_parent_if_empty();
    }
}

/// A copy of `python3 -u -c <program> <args>` outside the daemon, for plain
/// CRIU, once it printed `ready`. Killed by the bench; the `Reaper` (this
/// process is a subreaper) collects it.
#[allow(clippy::zombie_processes)]
pub fn spawn_plain(program: &str, args: &[String]) -> i32 {
    let mut child = Command::new("python3")
        .args(["-u", "-c", program])
        .args(args)
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

/// `criu <args> --images-dir <dir>` (log in `dir/plain.log`).
pub fn run_criu(criu: &Path, args: &[&str], dir: &Path) {
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

pub fn gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills `pid` and waits until it is gone.
pub fn kill_and_wait(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    while !gone(pid) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Unique, incompressible-ish content per (file, round).
pub fn fill(block: &mut [u8], file: u64, round: u64) {
    let mut x =
        file.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&mut r)
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
                sprite_dir: state.join("dot-sprite"),
            },
            cgroups: cgroups.clone(),
        },
        reaper.clone(),
    );
    c.start().await.expect("start the environment");
    c
}
