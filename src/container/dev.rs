//! The environment's `/dev`: a tmpfs of its own with a few device nodes,
//! `/dev/shm` (a directory of it) and a private devpts on `/dev/pts`.
//!
//! - A fresh environment's init makes it ([`super::init`], from [`NODES`]).
//! - A dump names it external to CRIU ([`KEY`]), and the daemon archives
//!   it itself while the environment is frozen ([`archive`], an
//!   uncompressed tar of [`ARCHIVE`] among the images), instead of CRIU
//!   forking `tar --gzip` in every freeze window and again at every
//!   restore (about 4 ms each).
//! - A restore mounts a new tmpfs on the host side ([`rebuild`]), fills it
//!   from the archive, and CRIU binds it at `/dev`; the daemon then lets
//!   go of its side ([`release`]). A tmpfs page is charged to the memory
//!   cgroup of the process that first writes it, so an archive holding
//!   file data (shared memory) is filled not by the daemon but by a helper
//!   in the environment's cgroup ([`FILL_ARG`], [`fill_main`]), once the
//!   old environment is gone: the restored memory counts against the
//!   environment's limit, as it did before the checkpoint.
//!
//! What the archive holds comes from inside the environment, so both ends
//! treat it as hostile: the walk follows no symlink and stays on the one
//! mount (the devpts is recorded as an empty dir); the rebuild resolves
//! every path beneath the new tmpfs without following symlinks, and makes
//! only the device nodes a fresh `/dev` has (nothing inside can `mknod`,
//! and a restore makes no other: not a disk).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, BufReader, BufWriter, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmodat, fstat, fstatat, makedev, mkdirat,
    mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat, symlinkat};

/// The hidden argument that makes this binary the helper filling a
/// rebuilt `/dev` (`sprited __dev-fill <archive> <dir>`; see [`fill_main`]).
pub const FILL_ARG: &str = "__dev-fill";

/// CRIU's key for the `/dev` mount (`--external mnt[/dev]:sprited-dev`).
pub const KEY: &str = "sprited-dev";
/// The daemon's archive of `/dev` among a dump's images.
pub const ARCHIVE: &str = "sprited-dev.tar";
/// How deep the archive goes below `/dev`.
const MAX_DEPTH: usize = 64;

/// The character devices of a fresh `/dev` (name, major, minor): the only
/// device nodes the environment has, and the only ones a rebuild makes.
pub const NODES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Mount flags and options of the `/dev` tmpfs (sized as a tmpfs is by
/// default: half the memory, for `/dev/shm`).
pub const TMPFS_FLAGS: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_STRICTATIME);
pub const TMPFS_DATA: &str = "mode=755";

use super::init::{ctx, ctx_io};

/// What [`archive`] wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Archived {
    pub entries: u64,
    pub bytes: u64,
}

/// Archives the `/dev` tree at `dev` (the environment's, seen from the
/// host: `/proc/<init>/root/dev`) into a new tar at `out`: dirs, regular
/// files, symlinks, fifos and character devices with their owners, modes
/// and mtimes; not sockets (a restored socket is bound anew), nothing of
/// another mount (the devpts), nothing deeper than [`MAX_DEPTH`]. The
/// environment must be frozen.
pub fn archive(dev: &Path, out: &Path) -> io::Result<Archived> {
    let top = openat(
        nix::fcntl::AT_FDCWD,
        dev,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(ctx(format!("open {}", dev.display())))?;
    let mount_dev = fstat(&top).map_err(ctx("stat /dev"))?.st_dev;
    // What the tmpfs holds bounds the data archived (holes are not
    // written, a hard link is one entry): past it, something was counted
    // twice, and the archive would fill the disk rather than the tmpfs.
    let vfs = nix::sys::statvfs::fstatvfs(&top).map_err(ctx("statvfs /dev"))?;
    let used =
        (vfs.blocks() as u64).saturating_sub(vfs.blocks_free() as u64) * vfs.fragment_size() as u64;
    let file = std::fs::File::create(out).map_err(ctx_io(format!("create {}", out.display())))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let mut walk_state = Walk {
        mount_dev,
        budget: used + (1 << 20),
        links: HashMap::new(),
        done: Archived::default(),
    };
    walk(&mut tar, top, PathBuf::new(), 0, &mut walk_state)?;
    let mut done = walk_state.done;
    let file = tar
        .into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(ctx_io(format!("write {}", out.display())))?;
    done.bytes = file
        .metadata()
        .map_err(ctx_io(format!("stat {}", out.display())))?
        .len();
    Ok(done)
}

fn header(st: &nix::sys::stat::FileStat, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_size(0);
    h
}

/// What a walk carries along.
struct Walk {
    mount_dev: u64,
    /// Data bytes still allowed.
    budget: u64,
    /// The first name of each file with more than one link.
    links: HashMap<(u64, u64), PathBuf>,
    done: Archived,
}

/// Key of a PAX record: the apparent size of a file with holes.
const SPARSE_SIZE: &str = "SPRITED.size";
/// Key of a PAX record: the data extents of a file with holes
/// (`offset:length,...`; the entry's data is theirs, in order).
const SPARSE_MAP: &str = "SPRITED.map";
/// At most this many extents in one file's map.
const MAX_EXTENTS: usize = 1 << 16;

/// Reads the extents of a file in order; a file shorter than they say is
/// an error, not a short entry.
struct Extents<'a> {
    file: &'a std::fs::File,
    left: std::collections::VecDeque<(u64, u64)>,
}

impl Read for Extents<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let Some((at, len)) = self.left.front_mut() else {
            return Ok(0);
        };
        let want = (*len).min(buf.len() as u64) as usize;
        let n = self.file.read_at(&mut buf[..want], *at)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while archived",
            ));
        }
        *at += n as u64;
        *len -= n as u64;
        if *len == 0 {
            self.left.pop_front();
        }
        Ok(n)
    }
}

fn walk<W: io::Write>(
    tar: &mut tar::Builder<W>,
    dir: OwnedFd,
    rel: PathBuf,
    depth: usize,
    w: &mut Walk,
) -> io::Result<()> {
    let mut names: Vec<OsString> = Vec::new();
    let mut listing =
        nix::dir::Dir::from_fd(dir).map_err(ctx(format!("list /dev/{}", rel.display())))?;
    for entry in listing.iter() {
        let entry = entry.map_err(ctx(format!("list /dev/{}", rel.display())))?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name != "." && name != ".." {
            names.push(name.to_owned());
        }
    }
    names.sort();
    let dir = listing.as_fd();
    for name in names {
        let path = rel.join(&name);
        let shown = || format!("/dev/{}", path.display());
        let st = match fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(ctx(format!("stat {}", shown()))(e)),
        };
        let empty: &[u8] = &[];
        match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFDIR => {
                tar.append_data(&mut header(&st, tar::EntryType::Directory), &path, empty)?;
                w.done.entries += 1;
                if st.st_dev == w.mount_dev && depth >= MAX_DEPTH {
                    tracing::warn!(path = %shown(), "deeper than {MAX_DEPTH} levels in /dev: left out");
                } else if st.st_dev == w.mount_dev {
                    let sub = openat(
                        dir,
                        name.as_os_str(),
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(ctx(format!("open {}", shown())))?;
                    walk(tar, sub, path, depth + 1, w)?;
                }
            }
            SFlag::S_IFREG => {
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = w.links.get(&key) {
                        let mut h = header(&st, tar::EntryType::Link);
                        tar.append_link(&mut h, &path, first)?;
                        w.done.entries += 1;
                        continue;
                    }
                    w.links.insert(key, path.clone());
                }
                let fd = openat(
                    dir,
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(ctx(format!("open {}", shown())))?;
                let file = std::fs::File::from(fd);
                let st = fstat(&file).map_err(ctx(format!("stat {}", shown())))?;
                if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits()
                    || (st.st_dev, st.st_ino) != key
                {
                    return Err(io::Error::other(format!(
                        "{} changed while archived",
                        shown()
                    )));
                }
                let len = st.st_size.max(0) as u64;
                let extents: Vec<(u64, u64)> = crate::fs::store::data_segments(&file, len)
                    .into_iter()
                    .map(|(start, end)| (start, end - start))
                    .collect();
                if extents.len() > MAX_EXTENTS {
                    return Err(io::Error::other(format!(
                        "{}: more than {MAX_EXTENTS} extents",
                        shown()
                    )));
                }
                let data: u64 = extents.iter().map(|(_, n)| n).sum();
                w.budget = w.budget.checked_sub(data).ok_or_else(|| {
                    io::Error::other(format!(
                        "{}: /dev holds less than its files add up to (counted twice?)",
                        shown()
                    ))
                })?;
                if data < len {
                    let map: Vec<String> =
                        extents.iter().map(|(o, n)| format!("{o}:{n}")).collect();
                    let size = len.to_string();
                    let map = map.join(",");
                    tar.append_pax_extensions([
                        (SPARSE_SIZE, size.as_bytes()),
                        (SPARSE_MAP, map.as_bytes()),
                    ])?;
                }
                let mut h = header(&st, tar::EntryType::Regular);
                h.set_size(data);
                let reader = Extents {
                    file: &file,
                    left: extents.into(),
                };
                tar.append_data(&mut h, &path, reader)?;
                w.done.entries += 1;
            }
            SFlag::S_IFLNK => {
                let target = nix::fcntl::readlinkat(dir, name.as_os_str())
                    .map_err(ctx(format!("read link {}", shown())))?;
                tar.append_link(&mut header(&st, tar::EntryType::Symlink), &path, &target)?;
                w.done.entries += 1;
            }
            SFlag::S_IFIFO => {
                tar.append_data(&mut header(&st, tar::EntryType::Fifo), &path, empty)?;
                w.done.entries += 1;
            }
            SFlag::S_IFCHR => {
                let mut h = header(&st, tar::EntryType::Char);
                let (major, minor) = (
                    nix::sys::stat::major(st.st_rdev),
                    nix::sys::stat::minor(st.st_rdev),
                );
                h.set_device_major(major as u32)?;
                h.set_device_minor(minor as u32)?;
                tar.append_data(&mut h, &path, empty)?;
                w.done.entries += 1;
            }
            // Sockets (CRIU binds a restored one anew) and anything else.
            _ => {}
        }
    }
    Ok(())
}

/// Whether a rebuilt `/dev` is filled yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuilt {
    /// Filled: the archive held no file data.
    Filled,
    /// Mounted, empty: the archive holds file data, which a process in the
    /// environment's cgroup must write ([`FILL_ARG`]).
    NeedsFill,
}

/// A new tmpfs at `at` (a dir created if missing; anything left mounted
/// there detached first), filled from the archive at `from` unless that
/// holds file data ([`Rebuilt::NeedsFill`]). On an error nothing stays
/// mounted.
pub fn rebuild(from: &Path, at: &Path) -> io::Result<Rebuilt> {
    std::fs::create_dir_all(at).map_err(ctx_io(format!("create {}", at.display())))?;
    release(at);
    mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        TMPFS_FLAGS,
        Some(TMPFS_DATA),
    )
    .map_err(ctx(format!("mount a tmpfs on {}", at.display())))?;
    // Its own peer group: nothing propagates to or from the host's mounts.
    let filled = mount(
        None::<&str>,
        at,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(ctx(format!("make {} private", at.display())))
    .and_then(|()| {
        if holds_data(from)? {
            return Ok(Rebuilt::NeedsFill);
        }
        let file = std::fs::File::open(from).map_err(ctx_io(format!("open {}", from.display())))?;
        extract(BufReader::new(file), at).map(|()| Rebuilt::Filled)
    });
    if filled.is_err() {
        release(at);
    }
    filled
}

/// Whether the archive at `from` holds file data (reading its headers
/// only).
fn holds_data(from: &Path) -> io::Result<bool> {
    let file = std::fs::File::open(from).map_err(ctx_io(format!("open {}", from.display())))?;
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        let h = entry.header();
        if h.entry_type() == tar::EntryType::Regular && h.size()? > 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The helper's main (`sprited __dev-fill <archive> <dir>`, spawned into
/// the environment's cgroup): fills the empty tmpfs at `dir` from the
/// archive, so the pages it writes are the environment's. Returns the exit
/// code.
pub fn fill_main(archive: Option<&OsStr>, dir: Option<&OsStr>) -> i32 {
    let (Some(archive), Some(dir)) = (archive, dir) else {
        eprintln!("sprited {FILL_ARG}: usage: {FILL_ARG} <archive> <dir>");
        return 2;
    };
    let filled = std::fs::File::open(archive)
        .map_err(ctx_io(format!("open {}", Path::new(archive).display())))
        .and_then(|f| extract(BufReader::new(f), Path::new(dir)));
    match filled {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sprited {FILL_ARG}: {e}");
            1
        }
    }
}

/// Detaches whatever is mounted at `at` (the host's side of a rebuilt
/// `/dev`: the environment's bind keeps the tmpfs).
pub fn release(at: &Path) {
    while umount2(at, MntFlags::MNT_DETACH).is_ok() {}
}

/// Fills the directory `at` from a tar stream made by [`archive`].
pub fn extract(from: impl Read, at: &Path) -> io::Result<()> {
    let root = openat(
        nix::fcntl::AT_FDCWD,
        at,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(ctx(format!("open {}", at.display())))?;
    let mut archive = tar::Archive::new(from);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let Some((parent, name)) = split(&path) else {
            tracing::warn!(path = %path.display(), "a /dev archive entry with a bad path: skipped");
            continue;
        };
        let shown = format!("/dev/{}", path.display());
        let dir = crate::fs::at::open_beneath(
            root.as_fd(),
            parent.as_os_str().as_bytes(),
            OFlag::O_PATH | OFlag::O_DIRECTORY,
        )
        .map_err(ctx(format!("open the dir of {shown}")))?;
        let h = entry.header().clone();
        let mode = Mode::from_bits_truncate(h.mode()? & 0o7777);
        let sparse =
            sparse_map(&mut entry, h.size()?).map_err(ctx_io(format!("the holes of {shown}")))?;
        let made = match h.entry_type() {
            tar::EntryType::Directory => match mkdirat(&dir, name, Mode::S_IRWXU) {
                Err(Errno::EEXIST) if is_dir(&dir, name) => Ok(true),
                other => other.map(|()| true),
            },
            tar::EntryType::Regular => {
                let fd = openat(
                    &dir,
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::S_IRUSR | Mode::S_IWUSR,
                )
                .map_err(ctx(format!("create {shown}")))?;
                let mut file = std::fs::File::from(fd);
                match sparse {
                    None => {
                        io::copy(&mut entry, &mut file)
                            .map_err(ctx_io(format!("write {shown}")))?;
                    }
                    Some((size, extents)) => {
                        use std::os::unix::fs::FileExt;
                        let mut buf = vec![0u8; 1 << 16];
                        for (mut at, len) in extents {
                            let mut left = len;
                            while left > 0 {
                                let n = left.min(buf.len() as u64) as usize;
                                entry
                                    .read_exact(&mut buf[..n])
                                    .map_err(ctx_io(format!("read {shown}")))?;
                                file.write_all_at(&buf[..n], at)
                                    .map_err(ctx_io(format!("write {shown}")))?;
                                at += n as u64;
                                left -= n as u64;
                            }
                        }
                        file.set_len(size)
                            .map_err(ctx_io(format!("size {shown}")))?;
                    }
                }
                Ok(true)
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{shown}: a symlink without a target"),
                        )
                    })?
                    .into_owned();
                symlinkat(target.as_os_str(), &dir, name).map(|()| false)
            }
            tar::EntryType::Link => {
                // (a hard link to a file made before, resolved beneath too)
                let target = entry.link_name()?.map(|t| t.into_owned());
                let Some((tparent, tname)) = target.as_deref().and_then(split) else {
                    tracing::warn!(path = %shown, "a /dev hard link with a bad target: skipped");
                    continue;
                };
                let tdir = crate::fs::at::open_beneath(
                    root.as_fd(),
                    tparent.as_os_str().as_bytes(),
                    OFlag::O_PATH | OFlag::O_DIRECTORY,
                )
                .map_err(ctx(format!("open the dir of the target of {shown}")))?;
                nix::unistd::linkat(&tdir, tname, &dir, name, AtFlags::empty())
                    .map_err(ctx(format!("link {shown}")))?;
                continue;
            }
            tar::EntryType::Fifo => {
                mknodat(&dir, name, SFlag::S_IFIFO, Mode::S_IRUSR, 0).map(|()| true)
            }
            tar::EntryType::Char => {
                let (major, minor) = (
                    u64::from(h.device_major()?.unwrap_or(0)),
                    u64::from(h.device_minor()?.unwrap_or(0)),
                );
                if !NODES.iter().any(|(_, ma, mi)| (*ma, *mi) == (major, minor)) {
                    tracing::warn!(path = %shown, major, minor, "a device a fresh /dev does not have: not made");
                    continue;
                }
                mknodat(
                    &dir,
                    name,
                    SFlag::S_IFCHR,
                    Mode::S_IRUSR,
                    makedev(major, minor),
                )
                .map(|()| true)
            }
            other => {
                tracing::warn!(path = %shown, kind = ?other, "a /dev archive entry of another kind: skipped");
                continue;
            }
        };
        let chmod = made.map_err(ctx(format!("make {shown}")))?;
        let (uid, gid) = (h.uid()? as u32, h.gid()? as u32);
        fchownat(
            &dir,
            name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(ctx(format!("chown {shown}")))?;
        if chmod {
            // (only what was just made: never a symlink)
            fchmodat(&dir, name, mode, FchmodatFlags::FollowSymlink)
                .map_err(ctx(format!("chmod {shown}")))?;
        }
        let mtime = TimeSpec::new(h.mtime()? as i64, 0);
        utimensat(&dir, name, &mtime, &mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(ctx(format!("set the times of {shown}")))?;
    }
    Ok(())
}

/// A file with holes: its apparent size and its data extents (offset,
/// length).
type Sparse = (u64, Vec<(u64, u64)>);

/// The apparent size and data extents of an entry with holes (its PAX
/// records), checked: in order, apart, inside the size, their lengths
/// adding up to the entry's data. None: an ordinary file.
fn sparse_map<R: Read>(entry: &mut tar::Entry<'_, R>, data: u64) -> io::Result<Option<Sparse>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    let Some(records) = entry.pax_extensions()? else {
        return Ok(None);
    };
    let (mut size, mut map) = (None, None);
    for r in records {
        let r = r?;
        match r.key().map_err(|_| bad("a PAX key that is not UTF-8"))? {
            SPARSE_SIZE => size = Some(r.value().map_err(|_| bad("size"))?.to_owned()),
            SPARSE_MAP => map = Some(r.value().map_err(|_| bad("map"))?.to_owned()),
            _ => {}
        }
    }
    let (Some(size), Some(map)) = (size, map) else {
        return Ok(None);
    };
    let size: u64 = size.parse().map_err(|_| bad("size not a number"))?;
    let mut extents = Vec::new();
    let (mut end, mut total) = (0u64, 0u64);
    for part in map.split(',').filter(|p| !p.is_empty()) {
        let (o, n) = part.split_once(':').ok_or_else(|| bad("map entry"))?;
        let (o, n): (u64, u64) = (
            o.parse().map_err(|_| bad("map offset"))?,
            n.parse().map_err(|_| bad("map length"))?,
        );
        let stop = o.checked_add(n).ok_or_else(|| bad("map overflows"))?;
        if o < end || stop > size || extents.len() >= MAX_EXTENTS {
            return Err(bad("map out of order or beyond the size"));
        }
        (end, total) = (stop, total + n);
        extents.push((o, n));
    }
    if total != data {
        return Err(bad("map does not add up to the data"));
    }
    Ok(Some((size, extents)))
}

/// (parent, name) of an archive path made only of normal components.
fn split(path: &Path) -> Option<(PathBuf, &OsStr)> {
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some((path.parent()?.to_owned(), path.file_name()?))
}

fn is_dir(dir: &impl AsFd, name: &OsStr) -> bool {
    fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_dev_without_file_data_is_filled_by_the_daemon() {
        let t = tempfile::tempdir().unwrap();
        let dev = t.path().join("dev");
        std::fs::create_dir_all(dev.join("shm")).unwrap();
        std::fs::write(dev.join("shm/empty"), b"").unwrap();
        // Sized, but all holes: nothing to write.
        std::fs::File::create(dev.join("shm/sparse"))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx")).unwrap();
        let out = t.path().join(ARCHIVE);
        archive(&dev, &out).unwrap();
        assert!(!holds_data(&out).unwrap());
        std::fs::write(dev.join("shm/seg"), b"x").unwrap();
        archive(&dev, &out).unwrap();
        assert!(holds_data(&out).unwrap());
    }

    #[test]
    fn a_dev_tree_comes_back_as_it_was_holes_and_hard_links_included() {
        let t = tempfile::tempdir().unwrap();
        let dev = t.path().join("dev");
        std::fs::create_dir_all(dev.join("shm/deep")).unwrap();
        std::fs::set_permissions(dev.join("shm"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::write(dev.join("shm/seg"), b"shared bytes").unwrap();
        std::fs::set_permissions(dev.join("shm/seg"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::fs::write(dev.join("shm/deep/x"), vec![7u8; 70_000]).unwrap();
        std::fs::hard_link(dev.join("shm/deep/x"), dev.join("shm/x-again")).unwrap();
        // A POSIX shm segment sized far past what it holds: holes.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(dev.join("shm/segment")).unwrap();
            f.set_len(1 << 40).unwrap();
            f.write_all_at(b"head", 0).unwrap();
            f.write_all_at(b"tail", (1 << 40) - 4).unwrap();
        }
        std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx")).unwrap();
        nix::unistd::mkfifo(&dev.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(dev.join("shm/sock")).unwrap();
        if root() {
            mknodat(
                nix::fcntl::AT_FDCWD,
                &dev.join("null"),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(1, 3),
            )
            .unwrap();
            std::fs::set_permissions(dev.join("null"), std::fs::Permissions::from_mode(0o666))
                .unwrap();
            nix::unistd::chown(
                &dev.join("shm/seg"),
                Some(Uid::from_raw(1000)),
                Some(Gid::from_raw(1000)),
            )
            .unwrap();
        }
        let out = t.path().join(ARCHIVE);
        let done = archive(&dev, &out).unwrap();
        assert!(holds_data(&out).unwrap(), "shared memory is for the helper");
        assert!(done.entries >= 8, "{done:?}");
        assert!(
            done.bytes < 1 << 20,
            "holes and links are not written out: {done:?}"
        );

        let back = t.path().join("back");
        std::fs::create_dir(&back).unwrap();
        extract(std::fs::File::open(&out).unwrap(), &back).unwrap();
        assert_eq!(
            std::fs::read(back.join("shm/seg")).unwrap(),
            b"shared bytes"
        );
        assert_eq!(
            std::fs::read(back.join("shm/deep/x")).unwrap(),
            vec![7u8; 70_000]
        );
        let (x, again) = (
            std::fs::metadata(back.join("shm/deep/x")).unwrap(),
            std::fs::metadata(back.join("shm/x-again")).unwrap(),
        );
        assert_eq!(
            (x.ino(), x.nlink()),
            (again.ino(), 2),
            "a hard link stays one"
        );
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(back.join("shm/segment")).unwrap();
            assert_eq!(f.metadata().unwrap().len(), 1 << 40);
            let mut b = [0u8; 4];
            f.read_exact_at(&mut b, 0).unwrap();
            assert_eq!(&b, b"head");
            f.read_exact_at(&mut b, (1 << 40) - 4).unwrap();
            assert_eq!(&b, b"tail");
            f.read_exact_at(&mut b, 1 << 30).unwrap();
            assert_eq!(b, [0; 4]);
            assert!(
                f.metadata().unwrap().blocks() < 1024,
                "the holes stay holes"
            );
        }
        let seg = std::fs::metadata(back.join("shm/seg")).unwrap();
        assert_eq!(seg.mode() & 0o7777, 0o640);
        assert_eq!(
            std::fs::metadata(back.join("shm")).unwrap().mode() & 0o7777,
            0o1777
        );
        assert_eq!(
            std::fs::read_link(back.join("ptmx")).unwrap(),
            Path::new("pts/ptmx")
        );
        assert!(
            std::fs::symlink_metadata(back.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        assert!(
            !back.join("shm/sock").exists(),
            "sockets are bound anew, not archived"
        );
        if root() {
            assert_eq!(seg.uid(), 1000);
            let null = std::fs::symlink_metadata(back.join("null")).unwrap();
            assert!(null.file_type().is_char_device());
            assert_eq!(null.rdev(), makedev(1, 3));
            assert_eq!(null.mode() & 0o7777, 0o666);
        }
    }

    /// A tar stream of `entries` (path, kind, link target or device).
    fn hostile(entries: &[(&str, tar::EntryType, &str, (u32, u32))]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link, (major, minor)) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(if *kind == tar::EntryType::Regular {
                3
            } else {
                0
            });
            h.set_device_major(*major).unwrap();
            h.set_device_minor(*minor).unwrap();
            // (the raw name: `append_data` would refuse `..`)
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if *kind == tar::EntryType::Symlink {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"bad"
            } else {
                b""
            };
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_hostile_archive_writes_nothing_outside_and_makes_no_other_device() {
        use tar::EntryType as E;
        let t = tempfile::tempdir().unwrap();
        let at = t.path().join("dev");
        std::fs::create_dir(&at).unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let tar = hostile(&[
            ("../escaped", E::Regular, "", (0, 0)),
            ("sda", E::Block, "", (8, 0)),
            ("mem", E::Char, "", (1, 1)),
            ("ok", E::Regular, "", (0, 0)),
        ]);
        extract(&tar[..], &at).unwrap();
        assert!(!t.path().join("escaped").exists());
        assert!(!at.join("sda").exists(), "a block device is never made");
        assert!(!at.join("mem").exists(), "nor a device a fresh /dev lacks");
        assert_eq!(std::fs::read(at.join("ok")).unwrap(), b"bad");

        // Through a symlink the archive made: refused, nothing written.
        let link = outside.to_str().unwrap();
        let tar = hostile(&[
            ("out", E::Symlink, link, (0, 0)),
            ("out/x", E::Regular, "", (0, 0)),
        ]);
        assert!(extract(&tar[..], &at).is_err());
        assert!(!outside.join("x").exists());
        // A name made twice: the second does not follow the first.
        let tar = hostile(&[
            ("twice", E::Symlink, link, (0, 0)),
            ("twice", E::Regular, "", (0, 0)),
        ]);
        assert!(extract(&tar[..], &at).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }
}
