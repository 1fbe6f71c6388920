//! The environment's init: two small modes of the `sprited` binary, both
//! single-threaded (they run before any runtime starts).
//!
//! - **stage 1** (`sprited __env-stage1 <setup>`) is started by the daemon
//!   with its mount, UTS, IPC and PID namespaces already unshared. It forks
//!   the environment's PID 1, tells the daemon that child's host pid on
//!   stdout, and exits when the daemon closes its stdin (by then the daemon,
//!   a subreaper, expects the orphaned PID 1).
//! - **PID 1** sets up the environment's mounts ([`setup_mounts`]), enters
//!   the overlay root with `pivot_root`, detaches the old root and execs
//!   `/.sprite/bin/sprited __env-init`: the init proper ([`serve`]), whose
//!   binary is then inside the environment (CRIU finds it there).
//!
//! The init spawns every process of the environment on the daemon's request
//! (see [`super::proto`]), reaps everything (orphans included) and reports
//! the exits of what it spawned. Requests come on fd 3, events go out on
//! fd 4.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde::{Deserialize, Serialize};

use super::proto::{Event, MAX_LINE, Request, SpawnSpec, Stdio};

/// Requests from the daemon.
pub const REQUEST_FD: RawFd = 3;
/// Events to the daemon.
pub const EVENT_FD: RawFd = 4;

/// The `sprited` subcommand of stage 1 and of the init proper.
pub const STAGE1_ARG: &str = "__env-stage1";
pub const INIT_ARG: &str = "__env-init";

/// Where the binary is inside the environment.
pub const INSIDE_EXE: &str = "/.sprite/bin/sprited";

/// The capabilities processes in the environment keep (Docker's default set
/// less `CAP_MKNOD`: with no device cgroup, a block device node would read
/// the disk that holds the store). Notably absent: `CAP_SYS_ADMIN` (mount),
/// `CAP_DAC_READ_SEARCH` (`open_by_handle_at`), `CAP_SYS_PTRACE`,
/// `CAP_SYS_MODULE`, `CAP_SYS_RAWIO`, `CAP_SYS_BOOT`, `CAP_NET_ADMIN`.
pub const KEPT_CAPABILITIES: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// What PID 1 mounts, all host paths.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    /// The environment's overlay mount: its `/`.
    pub root: PathBuf,
    pub hostname: String,
    /// This binary, bound read-only at [`INSIDE_EXE`] (`sprite-env` is a
    /// symlink to it).
    pub exe: PathBuf,
    /// The API socket, bound at `/.sprite/api.sock`.
    pub socket: PathBuf,
    /// The checkpoints dir, bound read-only at `/.sprite/checkpoints`.
    pub checkpoints: PathBuf,
    /// The service logs, bound read-only at `/.sprite/logs/services`.
    pub logs: PathBuf,
    /// The host dir bound read-only at `/.sprite`: its skeleton (the
    /// mountpoints of the binds above and the `sprite-env` link), made by
    /// [`make_sprite_dir`]. A bind, not a tmpfs, so that a dump names it
    /// as external and a restore binds it again: CRIU archives a tmpfs's
    /// contents with `tar` at every dump and extracts them at every restore
    /// (some 3.5 ms each here), for a dir that never changes.
    pub sprite_dir: PathBuf,
}

/// Makes (or completes) `dir`, the skeleton bound at `/.sprite`: `bin/`
/// with an empty `sprited` (the bind's mountpoint) and the `sprite-env`
/// link to it, an empty `api.sock`, `checkpoints/` and `logs/services/`.
/// Idempotent; the daemon's alone (nothing inside can write it).
pub fn make_sprite_dir(dir: &Path) -> io::Result<()> {
    for d in ["bin", "checkpoints", "logs/services"] {
        let p = dir.join(d);
        std::fs::create_dir_all(&p).map_err(ctx_io(format!("create {}", p.display())))?;
    }
    for f in ["bin/sprited", "api.sock"] {
        let p = dir.join(f);
        if std::fs::symlink_metadata(&p).is_err() {
            std::fs::File::create(&p).map_err(ctx_io(format!("create {}", p.display())))?;
        }
    }
    let link = dir.join("bin/sprite-env");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("sprited", &link)
            .map_err(ctx_io(format!("link {}", link.display())))?;
    }
    Ok(())
}

/// Runs a mode of the binary if `args` asks for one (`None`: the caller
/// goes on as the daemon or the CLI).
pub fn dispatch(args: &[std::ffi::OsString]) -> Option<i32> {
    match args.get(1).and_then(|a| a.to_str()) {
        Some(STAGE1_ARG) => Some(stage1(args.get(2))),
        Some(INIT_ARG) => Some(init()),
        Some(super::dev::FILL_ARG) => Some(super::dev::fill_main(
            args.get(2).map(|a| a.as_os_str()),
            args.get(3).map(|a| a.as_os_str()),
        )),
        _ => None,
    }
}

fn stage1(setup: Option<&std::ffi::OsString>) -> i32 {
    // Only stdio and the two pipes: nothing the daemon's own parent let it
    // inherit may reach the environment (CRIU could not dump it either).
    let _ = crate::sys::close_fds_from(EVENT_FD as u32 + 1);
    let setup: Setup = match setup.map(|s| serde_json::from_slice(s.as_bytes())) {
        Some(Ok(s)) => s,
        _ => {
            eprintln!("sprited {STAGE1_ARG}: bad or missing setup argument");
            return 2;
        }
    };
    match crate::sys::fork_single_threaded() {
        Err(e) => {
            eprintln!("sprited {STAGE1_ARG}: fork: {e}");
            1
        }
        Ok(crate::sys::Forked::Parent(pid)) => {
            // The daemon registers the pid, then closes our stdin.
            let mut out = io::stdout();
            let _ = writeln!(out, "{pid}");
            let _ = out.flush();
            let mut sink = Vec::new();
            let _ = io::stdin().read_to_end(&mut sink);
            0
        }
        Ok(crate::sys::Forked::Child) => {
            let err = setup_mounts(&setup).and_then(|()| exec_init());
            let message = match err {
                Err(e) => e.to_string(),
                Ok(never) => match never {},
            };
            send(&Event::Fatal { message });
            1
        }
    }
}

pub(super) fn ctx(what: impl std::fmt::Display) -> impl FnOnce(nix::Error) -> io::Error {
    move |e| io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
}

pub(super) fn ctx_io(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn mount_fs(fstype: &str, target: &Path, flags: MsFlags, data: Option<&str>) -> io::Result<()> {
    mount(Some(fstype), target, Some(fstype), flags, data)
        .map_err(ctx(format!("mount {fstype} on {}", target.display())))
}

/// Binds `src` onto `target` (created as a dir or an empty file like
/// `src`), read-only unless `writable`.
fn bind(src: &Path, target: &Path, recursive: bool, writable: bool) -> io::Result<()> {
    if src.is_dir() {
        std::fs::create_dir_all(target).map_err(ctx_io(format!("create {}", target.display())))?;
    } else if std::fs::symlink_metadata(target).is_err() {
        std::fs::File::create(target).map_err(ctx_io(format!("create {}", target.display())))?;
    }
    let rec = if recursive {
        MsFlags::MS_REC
    } else {
        MsFlags::empty()
    };
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND | rec,
        None::<&str>,
    )
    .map_err(ctx(format!(
        "bind {} on {}",
        src.display(),
        target.display()
    )))?;
    if !writable {
        let flags = MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            .map_err(ctx(format!("remount {} read-only", target.display())))?;
    }
    Ok(())
}

/// The directories of the root the environment's own mounts go on.
const MOUNTPOINTS: [&str; 4] = ["proc", "sys", "dev", ".sprite"];

/// `p`, made a directory when missing. Anything else there (a symlink, a
/// file) refuses the environment: the root is the user's tree (a layer
/// from an import, an upper dir a file request changed), and a mount
/// follows a symlink: `/.sprite -> /mnt` would put the daemon's binds on
/// the host's `/mnt` and leave `/.sprite/bin/sprited`, which PID 1 execs
/// with every capability, to the tree. Nothing of the environment runs
/// yet to race this check.
fn mountpoint_dir(p: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "mount {}: {} is not a directory (a mount there would follow it out of the root)",
                p.file_name().unwrap_or_default().to_string_lossy(),
                p.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir(p).map_err(ctx_io(format!("create {}", p.display())))
        }
        Err(e) => Err(ctx_io(format!("stat {}", p.display()))(e)),
    }
}

/// The environment's mounts, made in PID 1's fresh mount namespace, then
/// `pivot_root` into the overlay. Nothing mounted here propagates out.
pub fn setup_mounts(s: &Setup) -> io::Result<()> {
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none)
        .map_err(ctx("make / a slave"))?;
    let r = &s.root;
    for d in MOUNTPOINTS {
        mountpoint_dir(&r.join(d))?;
    }
    let tmp = r.join("tmp");
    if std::fs::symlink_metadata(&tmp).is_err() {
        std::fs::create_dir_all(&tmp).map_err(ctx_io(format!("create {}", tmp.display())))?;
    }
    let secure = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", &r.join("proc"), secure, None)?;
    mount_fs("sysfs", &r.join("sys"), secure | MsFlags::MS_RDONLY, None)?;
    setup_dev(&r.join("dev"))?;
    // /.sprite: the daemon's skeleton, bound read-only, then the binds.
    let sprite = r.join(".sprite");
    make_sprite_dir(&s.sprite_dir)?;
    bind(&s.sprite_dir, &sprite, false, false)?;
    bind(&s.exe, &sprite.join("bin/sprited"), false, false)?;
    bind(&s.socket, &sprite.join("api.sock"), false, true)?;
    bind(&s.checkpoints, &sprite.join("checkpoints"), false, false)?;
    bind(&s.logs, &sprite.join("logs/services"), false, false)?;
    nix::unistd::sethostname(&s.hostname).map_err(ctx("set the hostname"))?;
    // pivot_root(".", "."): the old root ends up on top of the new one,
    // where it is detached.
    nix::unistd::chdir(r).map_err(ctx(format!("chdir {}", r.display())))?;
    nix::unistd::pivot_root(".", ".").map_err(ctx("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(ctx("detach the old root"))?;
    nix::unistd::chdir("/").map_err(ctx("chdir /"))?;
    Ok(())
}

/// A minimal `/dev`: a tmpfs with null, zero, full, random, urandom and
/// tty, a private devpts (`/dev/ptmx` points into it) and `/dev/shm`, a
/// directory of the same tmpfs (sized as a tmpfs is by default: half the
/// memory). One tmpfs, not two: a dump archives it while the processes are
/// frozen, and a restore rebuilds it (see [`super::dev`]).
fn setup_dev(dev: &Path) -> io::Result<()> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    mount_fs(
        "tmpfs",
        dev,
        super::dev::TMPFS_FLAGS,
        Some(super::dev::TMPFS_DATA),
    )?;
    let old = nix::sys::stat::umask(Mode::empty());
    let made = super::dev::NODES
        .iter()
        .try_for_each(|(name, major, minor)| {
            mknod(
                &dev.join(name),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(*major, *minor),
            )
            .map_err(ctx(format!("mknod /dev/{name}")))
        });
    nix::sys::stat::umask(old);
    made?;
    for (d, mode) in [("pts", 0o755), ("shm", 0o1777)] {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let p = dev.join(d);
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(&p)
            .and_then(|()| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)))
            .map_err(ctx_io(format!("create /dev/{d}")))?;
    }
    mount_fs(
        "devpts",
        &dev.join("pts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))
            .map_err(ctx_io(format!("link /dev/{link}")))?;
    }
    Ok(())
}

/// Replaces PID 1's image with the init proper, from inside the environment.
fn exec_init() -> io::Result<std::convert::Infallible> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(ctx_io("open /dev/null"))?;
    nix::unistd::dup2_stdin(&null).map_err(ctx("dup2"))?;
    nix::unistd::dup2_stdout(&null).map_err(ctx("dup2"))?;
    nix::unistd::dup2_stderr(&null).map_err(ctx("dup2"))?;
    let exe = CString::new(INSIDE_EXE).expect("no NUL");
    let argv = [
        c"sprited".to_owned(),
        CString::new(INIT_ARG).expect("no NUL"),
    ];
    let env = [c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()];
    match nix::unistd::execve(&exe, &argv, &env) {
        Err(e) => Err(ctx(format!("exec {INSIDE_EXE}"))(e)),
        Ok(never) => match never {},
    }
}

/// Writes one event line to the daemon (errors ignored: a daemon that went
/// away reads nothing, and the init goes on).
fn send(ev: &Event) {
    let Ok(mut line) = serde_json::to_vec(ev) else {
        return;
    };
    line.push(b'\n');
    // fd 4 is open for the init's whole life: ManuallyDrop never closes it.
    let mut f = std::mem::ManuallyDrop::new(crate::sys::borrow_raw_file(EVENT_FD));
    let _ = f.write_all(&line);
}

/// A child waiting for `Release`.
struct Pending {
    gate: OwnedFd,
    exec_error: OwnedFd,
    daemon_ends: Vec<OwnedFd>,
}

struct Init {
    pending: HashMap<i32, Pending>,
    /// The terminal masters of spawned children (for `Resize`; the relay
    /// holds its own copy).
    terminals: HashMap<i32, OwnedFd>,
    /// Pids whose exit the daemon hears about.
    spawned: HashSet<i32>,
}

/// The init proper: PID 1 of the environment.
fn init() -> i32 {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    for fd in [REQUEST_FD, EVENT_FD] {
        let _ = crate::sys::set_cloexec(fd);
    }
    // A daemon that went away must not kill the init with SIGPIPE.
    let _ = crate::sys::ignore_signal(Signal::SIGPIPE);
    // The init leads its own session (CRIU dumps a tree whose root does).
    let _ = nix::unistd::setsid();
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    if let Err(e) = mask.thread_block() {
        send(&Event::Fatal {
            message: format!("block SIGCHLD: {e}"),
        });
        return 1;
    }
    let sfd = match SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) {
        Ok(s) => s,
        Err(e) => {
            send(&Event::Fatal {
                message: format!("signalfd: {e}"),
            });
            return 1;
        }
    };
    let mut me = Init {
        pending: HashMap::new(),
        terminals: HashMap::new(),
        spawned: HashSet::new(),
    };
    send(&Event::Ready);
    let mut requests = std::mem::ManuallyDrop::new(crate::sys::borrow_raw_file(REQUEST_FD));
    let mut buf: Vec<u8> = Vec::new();
    let mut daemon_gone = false;
    loop {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let req_fd = requests.as_fd();
        let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        if !daemon_gone {
            fds.push(PollFd::new(req_fd, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => continue,
        }
        let readable = !daemon_gone
            && fds[1]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP));
        drop(fds);
        // Drain the signalfd, then reap everything that exited.
        while let Ok(Some(_)) = sfd.read_signal() {}
        me.reap();
        if readable {
            let mut chunk = [0u8; 65536];
            match requests.read(&mut chunk) {
                Ok(0) => daemon_gone = true,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => daemon_gone = true,
            }
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                match serde_json::from_slice::<Request>(&line) {
                    Ok(r) => me.handle(r),
                    Err(e) => send(&Event::Failed {
                        id: 0,
                        errno: None,
                        message: format!("bad request: {e}"),
                    }),
                }
            }
            if buf.len() > MAX_LINE {
                buf.clear();
            }
            me.reap();
        }
    }
}

impl Init {
    fn reap(&mut self) {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        loop {
            let (pid, code, signal) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, c)) => (p.as_raw(), Some(c), None),
                Ok(WaitStatus::Signaled(p, s, _)) => (p.as_raw(), None, Some(s as i32)),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            };
            self.pending.remove(&pid);
            self.terminals.remove(&pid);
            if self.spawned.remove(&pid) {
                send(&Event::Exit { pid, code, signal });
            }
        }
    }

    fn handle(&mut self, r: Request) {
        let (id, result) = match r {
            Request::Spawn { id, spec } => match self.spawn(&spec) {
                Ok((pid, fds)) => {
                    send(&Event::Spawned { id, pid, fds });
                    return;
                }
                Err(e) => (id, Err(e)),
            },
            Request::Release { id, pid } => (id, self.release(pid)),
            Request::Abort { id, pid } => {
                if self.pending.remove(&pid).is_some() {
                    let _ = crate::sys::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
                (id, Ok(()))
            }
            Request::Signal { id, pid, signal } => (id, crate::sys::kill_raw(pid, signal)),
            Request::Resize {
                id,
                pid,
                rows,
                cols,
            } => (
                id,
                match self.terminals.get(&pid) {
                    Some(m) => crate::sys::set_winsize(m, rows, cols),
                    None => Err(io::Error::from_raw_os_error(libc::ENOTTY)),
                },
            ),
        };
        send(&match result {
            Ok(()) => Event::Done { id },
            Err(e) => Event::Failed {
                id,
                errno: e.raw_os_error(),
                message: e.to_string(),
            },
        });
    }

    /// Forks a child that waits for `Release`; returns its pid and the
    /// init's fd numbers of the daemon's ends.
    fn spawn(&mut self, spec: &SpawnSpec) -> io::Result<(i32, Vec<i32>)> {
        let cstr =
            |s: &str| CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
        if spec.argv.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
        }
        let argv = spec
            .argv
            .iter()
            .map(|a| cstr(a))
            .collect::<io::Result<Vec<_>>>()?;
        let env = spec
            .env
            .iter()
            .map(|a| cstr(a))
            .collect::<io::Result<Vec<_>>>()?;
        let dir = cstr(&spec.dir)?;
        let privileges = spec.privileges.clone().unwrap_or_default();
        let candidates = program_candidates(spec)
            .iter()
            .map(|p| cstr(p))
            .collect::<io::Result<Vec<_>>>()?;
        let pipe = || -> io::Result<(OwnedFd, OwnedFd)> {
            Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
        };
        let (gate_r, gate_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        // (child's stdin, stdout, stderr), the daemon's ends, and a terminal's master.
        type Wiring = ([OwnedFd; 3], Vec<OwnedFd>, Option<OwnedFd>);
        let (child_stdio, daemon_ends, master): Wiring = match &spec.stdio {
            Stdio::Pipes { stdin } => {
                let (out_r, out_w) = pipe()?;
                let (e_r, e_w) = pipe()?;
                if *stdin {
                    let (in_r, in_w) = pipe()?;
                    ([in_r, out_w, e_w], vec![in_w, out_r, e_r], None)
                } else {
                    let null: OwnedFd = std::fs::File::open("/dev/null")?.into();
                    ([null, out_w, e_w], vec![out_r, e_r], None)
                }
            }
            Stdio::Tty { rows, cols } => {
                let pty = crate::sys::open_pty(*rows, *cols)?;
                let (in_r, in_w) = pipe()?;
                let (out_r, out_w) = pipe()?;
                start_relay(pty.master.try_clone()?, in_r, out_w)?;
                let s1 = pty.slave.try_clone()?;
                let s2 = pty.slave.try_clone()?;
                ([pty.slave, s1, s2], vec![in_w, out_r], Some(pty.master))
            }
        };
        let tty = master.is_some();
        match crate::sys::fork_single_threaded()? {
            crate::sys::Forked::Child => child(
                child_stdio,
                tty,
                gate_r,
                err_w,
                &dir,
                &candidates,
                &argv,
                &env,
                &privileges,
            ),
            crate::sys::Forked::Parent(pid) => {
                drop(child_stdio);
                if let Some(m) = master {
                    self.terminals.insert(pid, m);
                }
                let fds = daemon_ends.iter().map(|f| f.as_raw_fd()).collect();
                self.pending.insert(
                    pid,
                    Pending {
                        gate: gate_w,
                        exec_error: err_r,
                        daemon_ends,
                    },
                );
                Ok((pid, fds))
            }
        }
    }

    /// Lets a waiting child exec; fails with its exec error.
    fn release(&mut self, pid: i32) -> io::Result<()> {
        let p = self
            .pending
            .remove(&pid)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        drop(p.daemon_ends);
        let mut gate = std::fs::File::from(p.gate);
        gate.write_all(b"x")?;
        drop(gate);
        // Until exec (EOF, close-on-exec) or the errno the child reports.
        let mut errno = Vec::new();
        std::fs::File::from(p.exec_error).read_to_end(&mut errno)?;
        if errno.len() >= 4 {
            let n = i32::from_ne_bytes([errno[0], errno[1], errno[2], errno[3]]);
            return Err(io::Error::from_raw_os_error(n));
        }
        self.spawned.insert(pid);
        Ok(())
    }
}

/// Forks the relay of a terminal: a process of the environment that holds
/// the master and copies the daemon's input pipe to it and its output to the
/// daemon's output pipe, until the terminal's last user is gone (`EIO`).
/// Because it lives inside, a CRIU dump takes the whole terminal along.
fn start_relay(master: OwnedFd, input: OwnedFd, output: OwnedFd) -> io::Result<()> {
    match crate::sys::fork_single_threaded()? {
        crate::sys::Forked::Parent(_) => Ok(()),
        crate::sys::Forked::Child => {
            // stdin: the input pipe, stdout: the output pipe, stderr: the
            // master; nothing else of the init's.
            let ok = nix::unistd::dup2_stdin(&input).is_ok()
                && nix::unistd::dup2_stdout(&output).is_ok()
                && nix::unistd::dup2_stderr(&master).is_ok();
            drop((input, output, master));
            if !ok || crate::sys::close_fds_from(3).is_err() {
                crate::sys::exit_now(1);
            }
            let _ = nix::sys::signal::SigSet::all().thread_unblock();
            let _ = crate::sys::default_signal(nix::sys::signal::Signal::SIGPIPE);
            relay();
            crate::sys::exit_now(0)
        }
    }
}

/// The relay's loop over fds 0 (input), 1 (output) and 2 (master).
fn relay() {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut input = std::mem::ManuallyDrop::new(crate::sys::borrow_raw_file(0));
    let mut output = std::mem::ManuallyDrop::new(crate::sys::borrow_raw_file(1));
    let mut master = std::mem::ManuallyDrop::new(crate::sys::borrow_raw_file(2));
    let mut buf = vec![0u8; 65536];
    let mut input_open = true;
    loop {
        let (m_ready, i_ready) = {
            let mut fds = vec![PollFd::new(master.as_fd(), PollFlags::POLLIN)];
            if input_open {
                fds.push(PollFd::new(input.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
            let any = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
            (
                fds[0].revents().is_some_and(|r| r.intersects(any)),
                input_open && fds[1].revents().is_some_and(|r| r.intersects(any)),
            )
        };
        if m_ready {
            match master.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if output.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO: every slave end is closed.
                Err(_) => return,
            }
        }
        if i_ready {
            match input.read(&mut buf) {
                // The daemon closed its end: output goes on.
                Ok(0) | Err(_) => input_open = false,
                Ok(n) => {
                    if master.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Where to look for the program: itself when it has a `/`, else each dir
/// of the process's `PATH`.
fn program_candidates(spec: &SpawnSpec) -> Vec<String> {
    let prog = spec.path.as_deref().unwrap_or(&spec.argv[0]);
    if prog.contains('/') {
        return vec![prog.to_owned()];
    }
    let path = spec
        .env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{prog}", d.trim_end_matches('/')))
        .collect()
}

/// The forked child: stdio, session, wait for the gate, chdir, drop
/// capabilities, exec. Never returns.
#[allow(clippy::too_many_arguments)]
fn child(
    stdio: [OwnedFd; 3],
    tty: bool,
    gate: OwnedFd,
    exec_error: OwnedFd,
    dir: &CString,
    candidates: &[CString],
    argv: &[CString],
    env: &[CString],
    privileges: &super::Privileges,
) -> ! {
    let fail = |e: i32| -> ! {
        let mut f = std::fs::File::from(
            exec_error
                .try_clone()
                .unwrap_or_else(|_| std::process::exit(127)),
        );
        let _ = f.write_all(&e.to_ne_bytes());
        crate::sys::exit_now(127)
    };
    let _ = nix::sys::signal::SigSet::all().thread_unblock();
    let _ = crate::sys::default_signal(nix::sys::signal::Signal::SIGPIPE);
    if nix::unistd::setsid().is_err() {
        fail(nix::errno::Errno::last_raw());
    }
    let [i, o, e] = stdio;
    for (fd, r) in [
        (&i, nix::unistd::dup2_stdin(&i)),
        (&o, nix::unistd::dup2_stdout(&o)),
        (&e, nix::unistd::dup2_stderr(&e)),
    ] {
        let _ = fd;
        if let Err(err) = r {
            fail(err as i32);
        }
    }
    drop((i, o, e));
    if tty && let Err(err) = crate::sys::take_controlling_tty(0) {
        fail(err.raw_os_error().unwrap_or(libc::EIO));
    }
    let mut b = [0u8; 1];
    if !matches!(std::fs::File::from(gate).read(&mut b), Ok(1)) {
        crate::sys::exit_now(127);
    }
    if let Err(err) = nix::unistd::chdir(dir.as_c_str()) {
        fail(err as i32);
    }
    if let Err(err) = crate::sys::restrict_capabilities(&privileges.keep) {
        fail(err.raw_os_error().unwrap_or(libc::EPERM));
    }
    if privileges.no_new_privs
        && let Err(err) = crate::sys::set_no_new_privs()
    {
        fail(err.raw_os_error().unwrap_or(libc::EPERM));
    }
    let mut errno = libc::ENOENT;
    for c in candidates {
        let Err(err) = nix::unistd::execve(c, argv, env);
        // Keep the most telling error: a found but unrunnable program.
        if err != nix::errno::Errno::ENOENT && err != nix::errno::Errno::ENOTDIR {
            errno = err as i32;
        }
    }
    fail(errno)
}
