//! Thin typed wrappers over the system calls the daemon makes directly.
//!
//! This is the only module allowed to call `libc`/`nix` for process-wide or
//! raw kernel interfaces; each wrapper is tiny and says what it does. Any
//! `unsafe` block added here must carry a `// SAFETY:` comment (the rest of
//! the crate denies `unsafe_code`).

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// An exclusive, non-blocking `flock(2)` on a file, held until dropped.
#[derive(Debug)]
pub struct FileLock {
    _lock: Flock<File>,
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it.
    Held,
    Io(io::Error),
}

impl FileLock {
    /// Opens (creating, mode 0600) and locks `path` without waiting.
    pub fn try_exclusive(path: &Path) -> Result<(Self, File), LockError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(LockError::Io)?;
        let writer = file.try_clone().map_err(LockError::Io)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok((FileLock { _lock: lock }, writer)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(LockError::Held),
            Err((_, e)) => Err(LockError::Io(e.into())),
        }
    }
}

/// The running kernel: `uname -sr` plus the version string.
pub fn kernel_release() -> String {
    let u = nix::sys::utsname::uname();
    match u {
        Ok(u) => format!(
            "{} {} {}",
            u.sysname().to_string_lossy(),
            u.release().to_string_lossy(),
            u.version().to_string_lossy()
        ),
        Err(e) => format!("unknown ({e})"),
    }
}

/// Whether the daemon runs as root (effective uid 0).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Sets the process umask and returns the previous one. Process-wide: call
/// only while no other thread creates files.
pub fn set_umask(mask: u32) -> u32 {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    old.bits()
}

/// Sends `signal` to `pid`.
pub fn kill(pid: i32, signal: nix::sys::signal::Signal) -> io::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).map_err(io::Error::from)
}

/// Reads `n` random bytes from the kernel.
pub fn random_bytes(n: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// Makes this process a child subreaper: orphaned descendants are reparented
/// to it (and must be reaped by it) instead of to init.
pub fn set_child_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// How a reaped process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The shell convention: the exit code, or 128 + signal number.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// Reaps one exited child of any pid without blocking: `Ok(None)` when no
/// child has exited (or there are none).
pub fn reap_any() -> io::Result<Option<(i32, Exit)>> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => return Ok(Some((pid.as_raw(), Exit::Code(code)))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                return Ok(Some((pid.as_raw(), Exit::Signal(sig as i32))));
            }
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(_) => continue, // stopped/continued: not an exit
            Err(nix::errno::Errno::ECHILD) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Arranges for the child spawned by `cmd` to move itself into a cgroup
/// before `exec`, by writing `0` to `procs_fd` (an open `cgroup.procs`). The
/// fd stays owned by the closure, so it lives until the `Command` is dropped.
#[allow(unsafe_code)]
pub fn join_cgroup_before_exec(cmd: &mut std::process::Command, procs_fd: std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it calls only write(2) on an fd
    // opened by the parent, allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            let buf = b"0";
            let n = libc::write(procs_fd.as_raw_fd(), buf.as_ptr().cast(), buf.len());
            if n == buf.len() as isize {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// Arranges for the child spawned by `cmd` to start a new session (and
/// process group) before `exec`: a service's tree is then self-contained,
/// which CRIU needs to dump it without `--shell-job`.
#[allow(unsafe_code)]
pub fn new_session_before_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec; setsid(2) is
    // async-signal-safe, and nothing is allocated or locked.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
}

/// Where and how a service is confined in `--chroot` mode.
#[derive(Debug, Clone)]
pub struct Chroot {
    /// The merged environment tree: the service's `/`.
    pub root: std::path::PathBuf,
    /// Host paths bound (recursively) at the same path inside: `/proc`, `/dev`, `/sys`.
    pub binds: Vec<std::path::PathBuf>,
    /// Host dir bound read-only at `inside` (the checkpoints, at `/.sprite/checkpoints`).
    pub read_only: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Arranges for the child of `cmd` to enter its own mount namespace, bind
/// the host's `/proc`, `/dev`, `/sys` (and the read-only bind) into
/// `chroot.root`, `chroot(2)` there and `chdir(2)` to `dir` (a path inside).
/// The mount points must exist. Everything the child needs is prepared here,
/// before the fork.
#[allow(unsafe_code)]
pub fn chroot_before_exec(
    cmd: &mut std::process::Command,
    chroot: &Chroot,
    dir: &str,
) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let c = |p: &std::path::Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let root = c(&chroot.root)?;
    let mut binds = Vec::new();
    for b in &chroot.binds {
        let inside = chroot.root.join(b.strip_prefix("/").unwrap_or(b));
        binds.push((c(b)?, c(&inside)?));
    }
    let ro = match &chroot.read_only {
        Some((host, inside)) => Some((
            c(host)?,
            c(&chroot.root.join(inside.strip_prefix("/").unwrap_or(inside)))?,
        )),
        None => None,
    };
    let dir = CString::new(dir).map_err(io::Error::other)?;
    let slash = CString::new("/").map_err(io::Error::other)?;
    // SAFETY: the closure runs in the forked child before exec. It only makes
    // raw system calls (unshare, mount, chroot, chdir) on C strings built
    // above, allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Slave: mounts the daemon makes later (new checkpoints' roots)
            // propagate in; nothing mounted in here propagates back out.
            check(libc::mount(
                std::ptr::null(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            for (src, dst) in &binds {
                check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
            }
            if let Some((src, dst)) = &ro {
                check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
                check(libc::mount(
                    std::ptr::null(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ))?;
            }
            check(libc::chroot(root.as_ptr()))?;
            check(libc::chdir(dir.as_ptr()))
        });
    }
    Ok(())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether something is mounted at `target`, per the mount table at `mountinfo`.
pub fn is_mount_point(mountinfo: &Path, target: &Path) -> bool {
    let text = std::fs::read_to_string(mountinfo).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|m| Path::new(&unescape_mountinfo(m)) == target)
}

/// A new pseudo-terminal pair, both ends close-on-exec (the slave is handed
/// to a child as its stdio, which clears the flag on the copies).
pub struct Pty {
    pub master: std::os::fd::OwnedFd,
    pub slave: std::os::fd::OwnedFd,
}

/// Opens a pseudo-terminal of `rows` × `cols`.
pub fn open_pty(rows: u16, cols: u16) -> io::Result<Pty> {
    use nix::fcntl::OFlag;
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&name)?;
    let master: std::os::fd::OwnedFd = master.into();
    set_winsize(&master, rows, cols)?;
    Ok(Pty {
        master,
        slave: slave.into(),
    })
}

/// Sets a terminal's window size (`TIOCSWINSZ`); the foreground process
/// group gets `SIGWINCH`.
#[allow(unsafe_code)]
pub fn set_winsize(fd: &impl std::os::fd::AsFd, rows: u16, cols: u16) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points
    // at a live local for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A terminal's window size (`TIOCGWINSZ`) as (rows, cols).
#[allow(unsafe_code)]
pub fn get_winsize(fd: &impl std::os::fd::AsFd) -> io::Result<(u16, u16)> {
    use std::os::fd::AsRawFd;
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which
    // points at a live local for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok((ws.ws_row, ws.ws_col))
    }
}

/// Arranges for the child of `cmd` to start a new session and take its
/// stdin (a pty slave) as its controlling terminal, before `exec`. Stdio is
/// set up before `pre_exec` closures run, so fd 0 is already the slave.
#[allow(unsafe_code)]
pub fn controlling_tty_before_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec; setsid(2)
    // and ioctl(TIOCSCTTY) are async-signal-safe raw system calls, and
    // nothing is allocated or locked.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to every process of the process group `pgid`.
pub fn kill_group(pgid: i32, signal: nix::sys::signal::Signal) -> io::Result<()> {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal).map_err(io::Error::from)
}

/// Registers an owned fd (set non-blocking here) with the tokio reactor.
#[allow(unsafe_code)]
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
    fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // SAFETY: the fd is moved into the AsyncFd, which owns it from here on:
    // it stays open exactly as long as the registration (closed when the
    // AsyncFd is dropped, after deregistering), and no other code holds it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// Available bytes (`f_bavail`) and total bytes of the filesystem holding
/// `path`.
pub fn fs_space(path: &std::path::Path) -> io::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path)?;
    let frag = s.fragment_size() as u64;
    Ok((
        (s.blocks_available() as u64).saturating_mul(frag),
        (s.blocks() as u64).saturating_mul(frag),
    ))
}

/// A fanotify group that reports each event with the file handles of the
/// directory it happened in and of the object itself, and the entry's name
/// (`FAN_REPORT_DFID_NAME | FAN_REPORT_FID`), read without blocking, with
/// no limit on marks. Needs `CAP_SYS_ADMIN`.
#[allow(unsafe_code)]
pub fn fanotify_dfid_name() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let flags = libc::FAN_CLASS_NOTIF
        | libc::FAN_REPORT_DFID_NAME
        | libc::FAN_REPORT_FID
        | libc::FAN_UNLIMITED_MARKS
        | libc::FAN_NONBLOCK
        | libc::FAN_CLOEXEC;
    // SAFETY: a plain system call with constant arguments and no pointers.
    let fd = unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_LARGEFILE) as u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Adds `mask` to `group`'s mark on the inode `dir` (its events and, with
/// `FAN_EVENT_ON_CHILD`, those of its entries).
#[allow(unsafe_code)]
pub fn fanotify_mark_inode(
    group: std::os::fd::BorrowedFd<'_>,
    dir: std::os::fd::BorrowedFd<'_>,
    mask: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: both fds are borrowed (open for the call); a null path makes
    // the kernel mark the object `dir` refers to and read no memory of ours.
    let r = unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            libc::FAN_MARK_ADD,
            mask,
            dir.as_raw_fd(),
            std::ptr::null(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct HandleBuf {
    handle_bytes: u32,
    handle_type: libc::c_int,
    f_handle: [u8; libc::MAX_HANDLE_SZ as usize],
}

/// The file handle of the object `fd` refers to, as fanotify reports it:
/// handle type (4 bytes, native order) followed by the handle's bytes.
#[allow(unsafe_code)]
pub fn file_handle(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf = HandleBuf {
        handle_bytes: libc::MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; libc::MAX_HANDLE_SZ as usize],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is a `struct file_handle` whose `handle_bytes` says how
    // many bytes follow (all it owns); the path is an empty C string
    // (AT_EMPTY_PATH: the object `fd` refers to).
    let r = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            (&raw mut buf).cast::<libc::file_handle>(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = (buf.handle_bytes as usize).min(buf.f_handle.len());
    let mut out = buf.handle_type.to_ne_bytes().to_vec();
    out.extend_from_slice(&buf.f_handle[..len]);
    Ok(out)
}

/// Opens (`O_PATH`) the object a handle from [`file_handle`] (type, then
/// bytes) names on the filesystem of `mount`. Needs `CAP_DAC_READ_SEARCH`;
/// `ESTALE` when the object is gone.
#[allow(unsafe_code)]
pub fn open_by_handle(
    mount: std::os::fd::BorrowedFd<'_>,
    handle: &[u8],
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut buf = HandleBuf {
        handle_bytes: 0,
        handle_type: 0,
        f_handle: [0; libc::MAX_HANDLE_SZ as usize],
    };
    match handle.split_first_chunk::<4>() {
        Some((kind, bytes)) if bytes.len() <= buf.f_handle.len() => {
            buf.handle_bytes = bytes.len() as u32;
            buf.handle_type = libc::c_int::from_ne_bytes(*kind);
            buf.f_handle[..bytes.len()].copy_from_slice(bytes);
        }
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
    // SAFETY: `buf` is a `struct file_handle` whose `handle_bytes` matches
    // the bytes that follow; `mount` is open for the call.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&raw mut buf).cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

// --- the environment: namespaces, init, fds and capabilities -------------

/// Arranges for the child of `cmd` to leave the daemon's mount, UTS, IPC and
/// PID namespaces before `exec` (`unshare(2)` with `flags`). With
/// `CLONE_NEWPID` the child itself stays in the daemon's PID namespace: its
/// first child is PID 1 of the new one.
#[allow(unsafe_code)]
pub fn unshare_before_exec(cmd: &mut std::process::Command, flags: libc::c_int) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec; unshare(2) is
    // a raw system call, and nothing is allocated or locked.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(flags) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
}

/// Makes the child of `cmd` join the namespace `ns` (of type `nstype`,
/// e.g. `CLONE_NEWNET`) before it execs. Register it before
/// [`pass_fds_before_exec`], which may reuse `ns`'s fd number.
#[allow(unsafe_code)]
pub fn setns_before_exec(
    cmd: &mut std::process::Command,
    ns: std::sync::Arc<std::os::fd::OwnedFd>,
    nstype: libc::c_int,
) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec; setns(2) is
    // a raw system call on an fd the closure keeps open (`ns` lives as long
    // as `cmd`), and nothing is allocated or locked.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), nstype) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
}

/// Starts `program` with `args` (the daemon's environment, an empty signal
/// mask, `SIGPIPE` at its default) through `posix_spawn(3)`, handing it
/// `fds` as fds `first`, `first + 1`, … and `stderr` as its fd 2 (stdin
/// and stdout on `/dev/null`); returns its pid. Unlike
/// [`std::process::Command`] with a `pre_exec` step, which forks (copying
/// the daemon's page tables, then faulting on every page it writes until
/// the child execs), glibc's `posix_spawn` shares the daemon's memory until
/// the exec, so a start costs the same whatever the daemon's size.
pub fn spawn_passing_fds(
    program: &Path,
    args: &[&std::ffi::OsStr],
    fds: Vec<std::os::fd::OwnedFd>,
    first: std::os::fd::RawFd,
    stderr: std::os::fd::BorrowedFd<'_>,
) -> io::Result<i32> {
    use nix::fcntl::OFlag;
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c = |b: &[u8]| {
        CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
    };
    let mut argv = vec![c(program.as_os_str().as_bytes())?];
    for a in args {
        argv.push(c(a.as_bytes())?);
    }
    let envp = std::env::vars_os()
        .map(|(k, v)| c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<io::Result<Vec<_>>>()?;
    // Each fd first copied above the targets (close-on-exec here), so that
    // no dup2 in the child overwrites a source still to be handed over.
    let n = fds.len() as std::os::fd::RawFd;
    let high = fds
        .iter()
        .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, first + n))
        .collect::<Result<Vec<_>, _>>()?;
    let mut actions = PosixSpawnFileActions::init()?;
    actions.add_open(
        0,
        "/dev/null",
        OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )?;
    actions.add_open(
        1,
        "/dev/null",
        OFlag::O_WRONLY,
        nix::sys::stat::Mode::empty(),
    )?;
    actions.add_dup2(stderr.as_raw_fd(), 2)?;
    for (i, h) in high.iter().enumerate() {
        actions.add_dup2(h.as_raw_fd(), first + i as std::os::fd::RawFd)?;
    }
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_sigmask(&nix::sys::signal::SigSet::empty())?;
    let mut default = nix::sys::signal::SigSet::empty();
    default.add(nix::sys::signal::Signal::SIGPIPE);
    attr.set_sigdefault(&default)?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )?;
    let pid = posix_spawn(program, &actions, &attr, &argv, &envp)?;
    Ok(pid.as_raw())
}

/// Hands `fds` to the child of `cmd` as fds `first`, `first + 1`, … (open
/// across `exec`). The fds stay owned by the closure until `cmd` is dropped.
#[allow(unsafe_code)]
pub fn pass_fds_before_exec(
    cmd: &mut std::process::Command,
    fds: Vec<std::os::fd::OwnedFd>,
    first: std::os::fd::RawFd,
) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let n = fds.len() as libc::c_int;
    // (allocated here: the child writes into it without allocating)
    let mut high: Vec<libc::c_int> = vec![-1; fds.len()];
    // SAFETY: the closure runs in the forked child before exec. It makes only
    // fcntl(2) and dup2(2) calls on fds the closure owns, with no allocation:
    // every source is first copied above the target range (close-on-exec),
    // and only then are the targets set, so a source that happens to sit on
    // a target number is copied before that number is taken.
    unsafe {
        cmd.pre_exec(move || {
            for (fd, h) in fds.iter().zip(high.iter_mut()) {
                *h = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, first + n);
                if *h < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (i, h) in high.iter().enumerate() {
                if libc::dup2(*h, first + i as libc::c_int) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// What [`fork_single_threaded`] returns in each process.
pub enum Forked {
    Parent(i32),
    Child,
}

/// Forks. Only for the environment's init (and its first stage), which never
/// start a second thread: the child may then run any code before it execs.
#[allow(unsafe_code)]
pub fn fork_single_threaded() -> io::Result<Forked> {
    // SAFETY: callers are single-threaded processes (the init modes of the
    // binary run before any runtime or thread starts), so the child inherits
    // no lock held by another thread.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child.as_raw())),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// A copy of fd `fd` of process `pid` (`pidfd_getfd(2)`, Linux 5.6): how the
/// daemon takes its ends of the pipes and terminals the environment's init
/// opened inside. Needs ptrace access to `pid` (root has it).
pub fn fd_of_process(pid: i32, fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
    Ok(pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())?)
}

/// Drops every capability whose number is not in `keep` from the bounding
/// set, and clears the inheritable and ambient sets: a root process that
/// execs then holds only `keep`. Irreversible for this process and its
/// descendants.
#[allow(unsafe_code)]
pub fn restrict_capabilities(keep: &[u32]) -> io::Result<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    for cap in (0..=last).filter(|c| !keep.contains(c)) {
        // SAFETY: prctl(PR_CAPBSET_DROP) takes plain integers and touches no
        // memory of ours.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    rustix::thread::clear_ambient_capability_set()?;
    let mut sets = rustix::thread::capabilities(None)?;
    sets.inheritable = rustix::thread::CapabilitySet::empty();
    rustix::thread::set_capabilities(None, sets)?;
    Ok(())
}

/// Whether process `pid` is in the daemon's own PID namespace (a process
/// inside the environment is not).
pub fn in_own_pid_namespace(pid: i32) -> io::Result<bool> {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/pid"))?;
    Ok(theirs == std::fs::read_link("/proc/self/ns/pid")?)
}

/// Sets `no_new_privs`: from the next exec on, neither setuid bits nor file
/// capabilities grant anything. Irreversible for this process and its
/// descendants.
pub fn set_no_new_privs() -> io::Result<()> {
    Ok(rustix::thread::set_no_new_privs(true)?)
}

/// A `File` over `fd`, an fd the process keeps open for its whole life
/// (the init's request and event pipes). Wrap it in `ManuallyDrop` so that
/// dropping it does not close the fd.
#[allow(unsafe_code)]
pub fn borrow_raw_file(fd: std::os::fd::RawFd) -> File {
    use std::os::fd::FromRawFd;
    // SAFETY: the callers pass fds that were open when the process started
    // and are never closed elsewhere, and keep the File in ManuallyDrop, so
    // no second owner ever closes them.
    unsafe { File::from_raw_fd(fd) }
}

/// Sets `FD_CLOEXEC` on an inherited fd.
#[allow(unsafe_code)]
pub fn set_cloexec(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: fcntl(F_SETFD) on an integer fd touches no memory of ours.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ignores `signal` (`SIG_IGN`; kept across exec).
#[allow(unsafe_code)]
pub fn ignore_signal(signal: nix::sys::signal::Signal) -> io::Result<()> {
    use nix::sys::signal::{SigHandler, signal as set};
    // SAFETY: SIG_IGN installs no handler, so no code of ours runs on it.
    unsafe { set(signal, SigHandler::SigIgn) }?;
    Ok(())
}

/// Restores the default action of `signal`.
#[allow(unsafe_code)]
pub fn default_signal(signal: nix::sys::signal::Signal) -> io::Result<()> {
    use nix::sys::signal::{SigHandler, signal as set};
    // SAFETY: SIG_DFL installs no handler, so no code of ours runs on it.
    unsafe { set(signal, SigHandler::SigDfl) }?;
    Ok(())
}

/// `kill(pid, signal)` with a raw signal number (0 checks existence).
pub fn kill_raw(pid: i32, signal: i32) -> io::Result<()> {
    let sig = match signal {
        0 => None,
        s => Some(nix::sys::signal::Signal::try_from(s)?),
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(io::Error::from)
}

/// `_exit(2)`: ends a forked child without running any exit handler of
/// the parent's image.
#[allow(unsafe_code)]
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) ends the process at once; it touches no memory.
    unsafe { libc::_exit(code) }
}

/// Makes the terminal on `fd` the controlling terminal of the calling
/// session leader (`TIOCSCTTY`).
#[allow(unsafe_code)]
pub fn take_controlling_tty(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: ioctl(TIOCSCTTY) takes an integer argument, no memory of ours.
    if unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes every fd from `first` up (`close_range(2)`): what a process
/// inherited without asking for it.
#[allow(unsafe_code)]
pub fn close_fds_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range takes integers only; the caller owns no fd in
    // that range that it still means to use.
    if unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Every unix socket of this network namespace with its peer (inode →
/// peer inode; 0: none), from the kernel's `sock_diag` (`NETLINK_SOCK_DIAG`,
/// `UDIAG_SHOW_PEER`), as `ss -x` reads it.
pub fn unix_socket_peers() -> io::Result<std::collections::HashMap<u64, u64>> {
    unix_socket_peers_with(sock_diag_socket()?)
}

/// A `NETLINK_SOCK_DIAG` socket (of the calling thread's network
/// namespace: the one whose sockets it reports).
pub fn sock_diag_socket() -> io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    Ok(socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?)
}

/// [`unix_socket_peers`] of the namespace `fd` (a [`sock_diag_socket`])
/// belongs to.
pub fn unix_socket_peers_with(
    fd: std::os::fd::OwnedFd,
) -> io::Result<std::collections::HashMap<u64, u64>> {
    use nix::sys::socket::{MsgFlags, NetlinkAddr, recv, sendto};
    use std::os::fd::AsRawFd;
    let request = sock_diag::unix_dump_request();
    sendto(
        fd.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut out = std::collections::HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        match sock_diag::parse_unix_dump(&buf[..n], &mut out) {
            sock_diag::Parsed::More => {}
            sock_diag::Parsed::Done => return Ok(out),
            sock_diag::Parsed::Error(errno) => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// The bytes of a `sock_diag` unix dump: the request and a parser for the
/// kernel's answer (pure, so it is unit-tested).
pub mod sock_diag {
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const UDIAG_SHOW_PEER: u32 = 4;
    const UNIX_DIAG_PEER: u16 = 2;

    /// `nlmsghdr` + `unix_diag_req` asking for every unix socket and its peer.
    pub fn unix_dump_request() -> Vec<u8> {
        let mut m = Vec::with_capacity(40);
        m.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes()); // seq
        m.extend_from_slice(&0u32.to_ne_bytes()); // pid
        m.push(libc::AF_UNIX as u8); // sdiag_family
        m.push(0); // sdiag_protocol
        m.extend_from_slice(&0u16.to_ne_bytes()); // pad
        m.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
        m.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino
        m.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
        m.extend_from_slice(&[0xff; 8]); // udiag_cookie: none
        m
    }

    /// Where a reply stands.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Parsed {
        More,
        Done,
        Error(i32),
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    /// Adds the sockets of one datagram of the reply to `out`. Malformed
    /// messages end the datagram (nothing is trusted past them).
    pub fn parse_unix_dump(mut b: &[u8], out: &mut std::collections::HashMap<u64, u64>) -> Parsed {
        while b.len() >= 16 {
            let (Some(len), Some(kind)) = (u32_at(b, 0), u16_at(b, 4)) else {
                break;
            };
            let len = len as usize;
            if len < 16 || len > b.len() {
                break;
            }
            let msg = &b[16..len];
            match kind {
                NLMSG_DONE => return Parsed::Done,
                NLMSG_ERROR => {
                    let errno = u32_at(msg, 0).map(|e| -(e as i32)).unwrap_or(libc::EIO);
                    return Parsed::Error(errno);
                }
                SOCK_DIAG_BY_FAMILY if msg.len() >= 16 => {
                    // unix_diag_msg: family, type, state, pad, ino, cookie[2]; then attributes.
                    let ino = u32_at(msg, 4).unwrap_or(0) as u64;
                    let mut peer = 0u64;
                    let mut attrs = &msg[16..];
                    while attrs.len() >= 4 {
                        let (Some(alen), Some(akind)) = (u16_at(attrs, 0), u16_at(attrs, 2)) else {
                            break;
                        };
                        let alen = alen as usize;
                        if alen < 4 || alen > attrs.len() {
                            break;
                        }
                        if akind == UNIX_DIAG_PEER {
                            peer = u32_at(attrs, 4).unwrap_or(0) as u64;
                        }
                        attrs = &attrs[((alen + 3) & !3).min(attrs.len())..];
                    }
                    out.insert(ino, peer);
                }
                _ => {}
            }
            b = &b[((len + 3) & !3).min(b.len())..];
        }
        Parsed::More
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn message(kind: u16, body: &[u8]) -> Vec<u8> {
            let mut m = Vec::new();
            m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&[0u8; 10]);
            m.extend_from_slice(body);
            while m.len() % 4 != 0 {
                m.push(0);
            }
            m
        }

        fn socket(ino: u32, peer: Option<u32>) -> Vec<u8> {
            let mut b = vec![libc::AF_UNIX as u8, 1, 1, 0];
            b.extend_from_slice(&ino.to_ne_bytes());
            b.extend_from_slice(&[0u8; 8]);
            if let Some(p) = peer {
                b.extend_from_slice(&8u16.to_ne_bytes());
                b.extend_from_slice(&UNIX_DIAG_PEER.to_ne_bytes());
                b.extend_from_slice(&p.to_ne_bytes());
            }
            message(SOCK_DIAG_BY_FAMILY, &b)
        }

        #[test]
        fn a_dump_names_each_socket_and_its_peer() {
            let mut out = std::collections::HashMap::new();
            let mut d = socket(10, Some(11));
            d.extend(socket(11, Some(10)));
            d.extend(socket(12, None));
            assert_eq!(parse_unix_dump(&d, &mut out), Parsed::More);
            assert_eq!(out, [(10, 11), (11, 10), (12, 0)].into_iter().collect());
            assert_eq!(
                parse_unix_dump(&message(NLMSG_DONE, &[0; 4]), &mut out),
                Parsed::Done
            );
            let err = message(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
            assert_eq!(parse_unix_dump(&err, &mut out), Parsed::Error(libc::EPERM));
            assert_eq!(unix_dump_request().len(), 40);
        }

        #[test]
        fn malformed_replies_are_dropped_without_panicking() {
            let mut out = std::collections::HashMap::new();
            let mut bad = socket(10, Some(11));
            bad[0] = 0xff; // a length past the end
            assert_eq!(parse_unix_dump(&bad, &mut out), Parsed::More);
            let mut short_attr = socket(10, Some(11));
            short_attr[32] = 200; // an attribute longer than the message
            assert_eq!(parse_unix_dump(&short_attr, &mut out), Parsed::More);
            assert_eq!(parse_unix_dump(&[1, 2, 3], &mut out), Parsed::More);
            assert!(out.get(&10).is_none_or(|p| *p == 0));
        }
    }
}

/// Raises the soft limit of open files to the hard limit; returns it.
pub fn raise_fd_limit() -> io::Result<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        setrlimit(Resource::Nofile, lim)?;
    }
    Ok(lim.current.unwrap_or(u64::MAX))
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for this process and the
/// processes it starts (CRIU's action script stamps the freeze with it).
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// One eBPF instruction (`struct bpf_insn`): opcode, registers (dst in the
/// low nibble, src in the high), offset, immediate.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// `BPF_PROG_TYPE_CGROUP_DEVICE` and `BPF_CGROUP_DEVICE`.
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD` (the kernel
/// takes a shorter attr as long as it is what it knows, zeros after).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
}

/// The fields of `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// Loads `insns` as a cgroup device program and attaches it to the cgroup
/// dir `cgroup` (allowing others beside it: every program attached on the
/// way up must allow an access). The verifier's log is the error's text.
#[allow(unsafe_code)]
pub fn attach_device_program(
    cgroup: std::os::fd::BorrowedFd<'_>,
    insns: &[BpfInsn],
) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(insns.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
    };
    // (the instructions, license and log buffer `load` points to are alive
    // and sized as stated for the duration of the call)
    let fd = bpf(BPF_PROG_LOAD, &load).map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        io::Error::new(e.kind(), format!("{e}: {}", text.trim()))
    })?;
    // SAFETY: the kernel just returned `fd`, a new program fd nothing else
    // owns.
    let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attach = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    // (both fds are open for the call; the attachment keeps its own
    // reference to the program)
    bpf(BPF_PROG_ATTACH, &attach).map(|_| ())
}

/// bpf(2) with command `cmd` and its attr `attr` (one of the attr structs
/// above, whose pointers the caller keeps alive for the call): the
/// syscall's non-negative result.
#[allow(unsafe_code)]
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) reads `size_of::<T>()` bytes of `attr`, a live
    // reference; what the attr points to is the caller's to keep alive
    // (see above). It returns -1 on error.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};

    #[test]
    fn passed_fds_land_on_their_numbers_even_where_a_source_sits_on_a_target() {
        let d = tempfile::tempdir().unwrap();
        let open =
            |name: &str| -> OwnedFd { std::fs::File::create(d.path().join(name)).unwrap().into() };
        let (a, b) = (open("a"), open("b"));
        // b sits on the number a is to take.
        let first = b.as_raw_fd();
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "readlink /proc/self/fd/{first}; readlink /proc/self/fd/{}",
                first + 1
            ))
            .stderr(std::process::Stdio::inherit());
        super::pass_fds_before_exec(&mut cmd, vec![a, b], first);
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let names: Vec<&str> = text
            .lines()
            .map(|l| l.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn a_spawn_hands_its_fds_over_on_their_numbers_and_stderr_as_fd_2() {
        let d = tempfile::tempdir().unwrap();
        let open =
            |name: &str| -> OwnedFd { std::fs::File::create(d.path().join(name)).unwrap().into() };
        let (a, b) = (open("a"), open("b"));
        let err = std::fs::File::create(d.path().join("err")).unwrap();
        // b sits on the number a is to take.
        let first = b.as_raw_fd();
        // (the spawn returns once the program runs: its fds are set)
        let pid = super::spawn_passing_fds(
            std::path::Path::new("/bin/sleep"),
            &["60".as_ref()],
            vec![a, b],
            first,
            std::os::fd::AsFd::as_fd(&err),
        )
        .unwrap();
        let names: Vec<String> = [first, first + 1, 0, 1, 2]
            .iter()
            .map(|fd| {
                let to = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
                to.file_name().unwrap().to_string_lossy().into_owned()
            })
            .collect();
        let child = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL).unwrap();
        // (a reaper another unit test started may take the exit first)
        let _ = nix::sys::wait::waitpid(child, None);
        assert_eq!(names, ["a", "b", "null", "null", "err"]);
    }

    #[test]
    fn a_spawn_of_a_missing_program_fails_with_its_error() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let e = super::spawn_passing_fds(
            std::path::Path::new("/nonexistent/criu"),
            &[],
            Vec::new(),
            3,
            std::os::fd::AsFd::as_fd(&null),
        )
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
