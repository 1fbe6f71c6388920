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
