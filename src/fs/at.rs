//! Trees reached through directory fds: how the snapshot engine gets at
//! the entries of a tree that a process inside the environment made. Such
//! a tree can be deeper than `PATH_MAX` (4,096 bytes), which only a whole
//! path given to one system call is limited by, and can put a symlink where
//! a directory was. So paths are resolved beneath an open directory, a few
//! components at a time, never following a symlink; and the calls that take
//! only a path (the xattr ones) get a short `/proc/self/fd/<dir>/<name>`.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, RenameFlags, ResolveFlag, openat, openat2, renameat2};
use nix::sys::stat::{Mode, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// At most this many bytes of path go to one `openat2` (under `PATH_MAX`,
/// split at a `/`; a name is at most 255 bytes).
const CHUNK: usize = 3072;

/// A checkpoint records entries at most this many levels below `/`…
pub(crate) const MAX_DEPTH: usize = 1024;
/// …and with a path of at most this many bytes. Manifests hold whole paths,
/// so without a bound one chain of directories would make every later
/// capture quadratic in its depth. What lies beyond is reported as skipped
/// (the checkpoint's `health` is then `partial`), never dropped silently.
pub(crate) const MAX_PATH_BYTES: usize = 16 * 1024;

/// Why an entry of a tree is beyond what a checkpoint records, if it is.
/// `rel`: its path (relative, `/`-separated), `depth`: its component count.
pub(crate) fn beyond_limits(rel: &str, depth: usize) -> Option<String> {
    if depth > MAX_DEPTH {
        Some(format!("deeper than {MAX_DEPTH} levels"))
    } else if rel.len() + 1 > MAX_PATH_BYTES {
        Some(format!("path longer than {MAX_PATH_BYTES} bytes"))
    } else {
        None
    }
}

fn how(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        )
}

/// Splits off the first at most [`CHUNK`] bytes of `rel`, at a `/`.
fn split_chunk(rel: &[u8]) -> (&[u8], &[u8]) {
    if rel.len() <= CHUNK {
        return (rel, &[]);
    }
    match rel[..=CHUNK].iter().rposition(|&b| b == b'/') {
        Some(i) if i > 0 => (&rel[..i], &rel[i + 1..]),
        // (no `/` in reach: a name longer than any filesystem allows, which
        // the kernel refuses with ENAMETOOLONG)
        _ => (rel, &[]),
    }
}

/// Opens `rel` (raw bytes, relative, any length) beneath directory `root`
/// with `flags`, following no symlink and leaving neither `root` nor its
/// mount. An empty `rel` is `root` itself.
pub(crate) fn open_beneath(
    root: BorrowedFd<'_>,
    rel: &[u8],
    flags: OFlag,
) -> Result<OwnedFd, Errno> {
    let mut rest = rel;
    while rest.first() == Some(&b'/') {
        rest = &rest[1..];
    }
    if rest.is_empty() {
        return openat(root, ".", flags | OFlag::O_CLOEXEC, Mode::empty());
    }
    let mut cur: Option<OwnedFd> = None;
    loop {
        let (chunk, tail) = split_chunk(rest);
        let at = cur.as_ref().map_or(root, |f| f.as_fd());
        if tail.is_empty() {
            return openat2(at, OsStr::from_bytes(chunk), how(flags));
        }
        let dir = openat2(
            at,
            OsStr::from_bytes(chunk),
            how(OFlag::O_PATH | OFlag::O_DIRECTORY),
        )?;
        cur = Some(dir);
        rest = tail;
    }
}

/// Opens directory `rel` beneath `root` (see [`open_beneath`]) for listing.
pub(crate) fn open_dir(root: BorrowedFd<'_>, rel: &[u8]) -> Result<OwnedFd, Errno> {
    open_beneath(root, rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
}

/// (parent, name) of a relative path: `a/b/c` → (`a/b`, `c`), `c` → (``, `c`).
pub(crate) fn split_parent(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

/// Whether `rel` exists beneath `root` (a path resolved without following
/// symlinks; any failure is "no").
pub(crate) fn exists_beneath(root: &Path, rel: &[u8]) -> bool {
    let Ok(top) = openat(
        nix::fcntl::AT_FDCWD,
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    let (parent, name) = split_parent(rel);
    open_beneath(top.as_fd(), parent, OFlag::O_PATH | OFlag::O_DIRECTORY)
        .and_then(|dir| {
            fstatat(
                &dir,
                OsStr::from_bytes(name),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
        })
        .is_ok()
}

/// A short path to entry `name` of open directory `dir`, for the calls
/// that take only a path: `/proc/self/fd/<dir>/<name>` (the magic link
/// lands on the directory itself, whatever its path).
pub(crate) fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    if !name.is_empty() {
        p.push(OsStr::from_bytes(name));
    }
    p
}

/// `rel` as messages show it: whole when short, else its start and end.
pub(crate) fn shown(rel: &str) -> String {
    const KEEP: usize = 96;
    if rel.len() <= 2 * KEEP + 16 {
        return format!("/{rel}");
    }
    let mut head = KEEP;
    while !rel.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = rel.len() - KEEP;
    while !rel.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "/{}…({} bytes)…{}",
        &rel[..head],
        rel.len() - head - (rel.len() - tail),
        &rel[tail..]
    )
}

/// Removes the tree at `path` however deep it is, with a constant number
/// of open fds and no recursion: each subdirectory met is first moved up
/// to the top of the tree, so no walk goes more than one level down.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let top = match openat(
        nix::fcntl::AT_FDCWD,
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::ENOTDIR | Errno::ELOOP) => return std::fs::remove_file(path),
        Err(e) => return Err(e.into()),
    };
    let mut moved = 0u64;
    loop {
        let names = list(&top)?;
        if names.is_empty() {
            break;
        }
        let mut progress = false;
        for name in names {
            let name = OsStr::from_bytes(&name);
            match unlinkat(&top, name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {
                    progress = true;
                    continue;
                }
                Err(Errno::EISDIR) => {}
                Err(e) => return Err(e.into()),
            }
            // A directory: its files go, its subdirectories move up.
            let dir = match openat(
                &top,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            for inner in list(&dir)? {
                let inner = OsStr::from_bytes(&inner);
                match unlinkat(&dir, inner, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => continue,
                    Err(Errno::EISDIR) => {}
                    Err(e) => return Err(e.into()),
                }
                loop {
                    moved += 1;
                    let up = format!(".rm-{moved}");
                    match renameat2(
                        &dir,
                        inner,
                        &top,
                        up.as_str(),
                        RenameFlags::RENAME_NOREPLACE,
                    ) {
                        Ok(()) | Err(Errno::ENOENT) => break,
                        Err(Errno::EEXIST) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            match unlinkat(&top, name, UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => progress = true,
                // (something was added meanwhile: the next pass sees it)
                Err(Errno::ENOTEMPTY) => progress = true,
                Err(e) => return Err(e.into()),
            }
        }
        if !progress {
            return Err(io::Error::other("entries that cannot be removed are left"));
        }
    }
    drop(top);
    std::fs::remove_dir(path)
}

/// The names in open directory `dir` (not `.`, `..`).
fn list(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let fd = dir.try_clone()?;
    let mut d = nix::dir::Dir::from_fd(fd)?;
    let mut out = Vec::new();
    for item in d.iter() {
        let item = item?;
        let name = item.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain `root/name/d/d/…` of `depth` dirs, made through fds.
    fn chain(root: &Path, depth: usize, name: &str) -> Vec<u8> {
        let mut fd: OwnedFd = std::fs::File::open(root).unwrap().into();
        let mut rel = Vec::new();
        for i in 0..depth {
            nix::sys::stat::mkdirat(&fd, name, Mode::from_bits_truncate(0o755)).unwrap();
            fd = openat(
                &fd,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .unwrap();
            if i > 0 {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
        }
        std::fs::write(proc_path(fd.as_fd(), b"f"), b"deep").unwrap();
        rel
    }

    #[test]
    fn paths_longer_than_path_max_open_beneath_and_symlinks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let name = "n".repeat(200);
        let rel = chain(tmp.path(), 40, &name); // 8,039 bytes
        assert!(rel.len() > 8000);
        let root: OwnedFd = std::fs::File::open(tmp.path()).unwrap().into();
        let dir = open_dir(root.as_fd(), &rel).unwrap();
        assert_eq!(
            std::fs::read(proc_path(dir.as_fd(), b"f")).unwrap(),
            b"deep"
        );
        let mut file = rel.clone();
        file.extend_from_slice(b"/f");
        assert!(open_beneath(root.as_fd(), &file, OFlag::O_RDONLY).is_ok());
        // A symlink in the way, or a way out, is refused.
        std::os::unix::fs::symlink(tmp.path(), tmp.path().join("up")).unwrap();
        let e = open_dir(root.as_fd(), b"up").unwrap_err();
        assert!(matches!(e, Errno::ELOOP | Errno::ENOTDIR), "{e}");
        assert_eq!(open_dir(root.as_fd(), b"up/x").unwrap_err(), Errno::ELOOP);
        assert_eq!(open_dir(root.as_fd(), b"..").unwrap_err(), Errno::EXDEV);
        assert!(exists_beneath(tmp.path(), &file));
        assert!(!exists_beneath(tmp.path(), b"up/f"));
    }

    #[test]
    fn a_12000_deep_tree_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("t");
        std::fs::create_dir(&top).unwrap();
        chain(&top, 12_000, "d");
        std::fs::write(top.join("d/x"), b"x").unwrap();
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        remove_tree(&top).unwrap(); // gone already: fine
    }

    #[test]
    fn limits_and_shown_paths() {
        assert_eq!(beyond_limits("a/b", 2), None);
        assert!(
            beyond_limits("a", MAX_DEPTH + 1)
                .unwrap()
                .contains("deeper")
        );
        assert!(
            beyond_limits(&"a".repeat(MAX_PATH_BYTES), 1)
                .unwrap()
                .contains("longer")
        );
        assert_eq!(shown("a/b"), "/a/b");
        let long = "é".repeat(500);
        let s = shown(&long);
        assert!(s.len() < 260 && s.contains("bytes)"), "{s}");
    }
}
