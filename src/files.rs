//! File operations of the filesystem API, confined to the environment root.
//! The only code that touches the environment's files on behalf of requests.
//!
//! Paths are as the environment sees them: `/` is the environment's `/`
//! (the daemon opens it as the init's root, `/proc/<init>/root`, so the
//! environment's own mounts are seen too), and a relative path is taken from
//! the request's `workingDir` (default `/`). A `..` that climbs above the
//! root is refused (400) before anything is opened. Every lookup then goes
//! through `openat2(2)` from an fd on the root with `RESOLVE_IN_ROOT`: the
//! kernel resolves `..` and symlinks (absolute ones included) as they
//! resolve inside, never leaving the root. Entries are created, renamed and
//! removed with `*at` calls on a confined parent fd, so a symlink swapped in
//! between cannot redirect them.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{path}: {why}")]
    Outside { path: String, why: &'static str },
    #[error("{0}")]
    Invalid(String),
    #[error("{op} {path}: {}", describe(*errno))]
    Os {
        op: &'static str,
        path: String,
        errno: Errno,
    },
}

impl FilesError {
    /// The path the error is about, for the error body.
    pub fn path(&self) -> Option<&str> {
        match self {
            FilesError::Outside { path, .. } | FilesError::Os { path, .. } => Some(path),
            FilesError::Invalid(_) => None,
        }
    }

    /// The POSIX name of the error (`ENOENT`), for the error body.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            FilesError::Os { errno, .. } => Some(errno_name(*errno)),
            FilesError::Outside { .. } => Some("EXDEV"),
            FilesError::Invalid(_) => Some("EINVAL"),
        }
    }
}

fn describe(e: Errno) -> String {
    let d = e.desc();
    let mut c = d.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

fn errno_name(e: Errno) -> &'static str {
    match e {
        Errno::ENOENT => "ENOENT",
        Errno::EEXIST => "EEXIST",
        Errno::ENOTDIR => "ENOTDIR",
        Errno::EISDIR => "EISDIR",
        Errno::EACCES => "EACCES",
        Errno::EPERM => "EPERM",
        Errno::ENOTEMPTY => "ENOTEMPTY",
        Errno::EINVAL => "EINVAL",
        Errno::ELOOP => "ELOOP",
        Errno::EXDEV => "EXDEV",
        Errno::ENOSPC => "ENOSPC",
        Errno::EROFS => "EROFS",
        Errno::ENAMETOOLONG => "ENAMETOOLONG",
        Errno::EBUSY => "EBUSY",
        _ => "EIO",
    }
}

/// One entry of a listing (the SDKs' shape).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
    pub mode: String,
    #[serde(rename = "modTime")]
    pub mod_time: String,
    #[serde(rename = "isDir")]
    pub is_dir: bool,
}

/// A request's view of the environment root.
pub struct Files {
    /// The host path of the environment's `/`.
    root: PathBuf,
}

/// A path resolved to (confined parent dir fd, last component).
struct Parent {
    dir: OwnedFd,
    name: Vec<u8>,
    /// Root-relative path, for messages and results.
    rel: String,
}

impl Files {
    pub fn new(root: PathBuf) -> Self {
        Files { root }
    }

    fn os(&self, op: &'static str, rel: &str) -> impl FnOnce(Errno) -> FilesError + '_ {
        let path = self.display(rel);
        move |errno| FilesError::Os { op, path, errno }
    }

    /// How a root-relative path looks to the client.
    pub fn display(&self, rel: &str) -> String {
        format!("/{rel}")
    }

    /// Turns a request path into a root-relative one, refusing `..` above
    /// the root.
    pub fn relative(&self, path: &str, working_dir: Option<&str>) -> Result<String, FilesError> {
        if path.is_empty() {
            return Err(FilesError::Invalid("path is required".into()));
        }
        if path.contains('\0') {
            return Err(FilesError::Invalid("path contains a NUL byte".into()));
        }
        let wd = working_dir.filter(|w| !w.is_empty()).unwrap_or("/");
        let full = if path.starts_with('/') {
            path.to_owned()
        } else if wd.starts_with('/') {
            format!("{wd}/{path}")
        } else {
            return Err(FilesError::Invalid(format!(
                "workingDir {wd:?} must be absolute"
            )));
        };
        let mut parts: Vec<&str> = Vec::new();
        for c in full.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        return Err(FilesError::Outside {
                            path: path.to_owned(),
                            why: "`..` leads outside the environment root",
                        });
                    }
                }
                c => parts.push(c),
            }
        }
        Ok(parts.join("/"))
    }

    fn root_fd(&self) -> Result<OwnedFd, FilesError> {
        nix::fcntl::open(
            &self.root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(self.os("open", ""))
    }

    fn how(&self, flags: OFlag, mode: u32) -> OpenHow {
        let resolve = ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS;
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(Mode::from_bits_truncate(mode))
            .resolve(resolve)
    }

    /// Opens a root-relative path, confined, following a final symlink.
    fn open(&self, rel: &str, flags: OFlag) -> Result<OwnedFd, FilesError> {
        let root = self.root_fd()?;
        let p = if rel.is_empty() { "." } else { rel };
        openat2(&root, p, self.how(flags, 0)).map_err(self.os("open", rel))
    }

    /// The confined parent dir of `rel` and its last component (`rel` must
    /// not be the root). With `create`, missing parents are made (0755).
    fn parent(&self, rel: &str, create: bool) -> Result<Parent, FilesError> {
        let (dir, name) = match rel.rfind('/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => ("", rel),
        };
        if name.is_empty() {
            return Err(FilesError::Invalid(
                "the environment root itself cannot be changed this way".into(),
            ));
        }
        if create && !dir.is_empty() {
            self.mkdirs(dir)?;
        }
        let fd = self.open(dir, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
        Ok(Parent {
            dir: fd,
            name: name.as_bytes().to_vec(),
            rel: rel.to_owned(),
        })
    }

    /// Creates every missing directory of `rel`, one confined step at a time.
    fn mkdirs(&self, rel: &str) -> Result<(), FilesError> {
        let mut done = String::new();
        for c in rel.split('/') {
            let parent = self.open(&done, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
            if !done.is_empty() {
                done.push('/');
            }
            done.push_str(c);
            match nix::sys::stat::mkdirat(&parent, c, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(self.os("mkdir", &done)(e)),
            }
        }
        Ok(())
    }

    fn lstat(&self, p: &Parent) -> Result<FileStat, FilesError> {
        fstatat(&p.dir, p.name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(self.os("lstat", &p.rel))
    }

    fn entry(&self, name: &[u8], rel: &str, st: &FileStat) -> Entry {
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let kind = match kind {
            SFlag::S_IFDIR => "directory",
            SFlag::S_IFREG => "file",
            SFlag::S_IFLNK => "symlink",
            SFlag::S_IFIFO => "fifo",
            SFlag::S_IFSOCK => "socket",
            SFlag::S_IFCHR => "char_device",
            SFlag::S_IFBLK => "block_device",
            _ => "unknown",
        };
        let mtime = SystemTime::UNIX_EPOCH
            + Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec.max(0) as u32);
        Entry {
            name: String::from_utf8_lossy(name).into_owned(),
            path: self.display(rel),
            kind,
            size: st.st_size.max(0) as u64,
            mode: format!("{:o}", st.st_mode & 0o7777),
            mod_time: humantime::format_rfc3339_seconds(mtime).to_string(),
            is_dir: kind == "directory",
        }
    }

    /// A file opened for reading, and its size. A directory is `EISDIR`.
    pub fn read(&self, rel: &str) -> Result<(std::fs::File, u64), FilesError> {
        let fd = self.open(rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK)?;
        let f = std::fs::File::from(fd);
        let md = f.metadata().map_err(|e| self.io("stat", rel, e))?;
        if md.is_dir() {
            return Err(self.os("read", rel)(Errno::EISDIR));
        }
        if !md.is_file() {
            return Err(FilesError::Invalid(format!(
                "{}: not a regular file",
                self.display(rel)
            )));
        }
        Ok((f, md.len()))
    }

    fn io(&self, op: &'static str, rel: &str, e: io::Error) -> FilesError {
        match e.raw_os_error() {
            Some(n) => self.os(op, rel)(Errno::from_raw(n)),
            None => FilesError::Os {
                op,
                path: self.display(rel),
                errno: Errno::EIO,
            },
        }
    }

    /// Starts a write: a temp file beside the target (parents created).
    /// [`Files::commit`] moves it into place.
    pub fn begin_write(&self, rel: &str) -> Result<PendingWrite, FilesError> {
        let p = self.parent(rel, true)?;
        match fstatat(&p.dir, p.name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits() => {
                return Err(self.os("write", rel)(Errno::EISDIR));
            }
            _ => {}
        }
        let rand = crate::sys::random_bytes(6).map_err(|e| self.io("write", rel, e))?;
        let tmp: String = format!(
            ".sprited-write-{}",
            rand.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let fd = nix::fcntl::openat(
            &p.dir,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(self.os("create", rel))?;
        Ok(PendingWrite {
            file: std::fs::File::from(fd),
            parent: p,
            tmp,
        })
    }

    /// Sets the mode, makes the data durable and renames it over the target.
    pub fn commit(&self, w: PendingWrite, mode: u32) -> Result<Entry, FilesError> {
        let rel = w.parent.rel.clone();
        let r = (|| {
            use std::os::unix::fs::PermissionsExt;
            w.file
                .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| self.io("chmod", &rel, e))?;
            w.file.sync_all().map_err(|e| self.io("fsync", &rel, e))?;
            nix::fcntl::renameat(
                &w.parent.dir,
                w.tmp.as_str(),
                &w.parent.dir,
                w.parent.name.as_slice(),
            )
            .map_err(self.os("rename", &rel))
        })();
        if r.is_err() {
            let _ = nix::unistd::unlinkat(
                &w.parent.dir,
                w.tmp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        r?;
        let st = self.lstat(&w.parent)?;
        Ok(self.entry(&w.parent.name, &rel, &st))
    }

    /// A file: itself. A directory (a symlink to one is followed): its
    /// entries (all levels with `recursive`), filtered by a `*`/`?` pattern.
    pub fn list(
        &self,
        rel: &str,
        recursive: bool,
        pattern: Option<&str>,
    ) -> Result<Vec<Entry>, FilesError> {
        if !rel.is_empty() {
            let p = self.parent(rel, false)?;
            let st = self.lstat(&p)?;
            let is_dir = st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits();
            let is_link = st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits();
            // A symlink to a directory lists the directory, if it stays
            // inside the root; one that leads outside is refused.
            let link_to_dir = is_link
                && match self.open(rel, OFlag::O_PATH | OFlag::O_DIRECTORY) {
                    Ok(_) => true,
                    Err(e @ FilesError::Outside { .. }) => return Err(e),
                    Err(_) => false,
                };
            if !is_dir && !link_to_dir {
                return Ok(vec![self.entry(&p.name, rel, &st)]);
            }
        }
        let mut out = Vec::new();
        self.list_dir(rel, recursive, pattern, &mut out, 0)?;
        Ok(out)
    }

    /// The entry names of directory `dir` (any fd of it, `O_PATH` too),
    /// without `.` and `..`, read through a fresh descriptor so `dir`'s own
    /// offset is untouched.
    fn names(&self, dir: &impl AsFd, rel: &str) -> Result<Vec<Vec<u8>>, FilesError> {
        let rd = nix::fcntl::openat(
            dir,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(self.os("open", rel))?;
        let mut listing = nix::dir::Dir::from_fd(rd).map_err(self.os("read dir", rel))?;
        let mut names = Vec::new();
        for e in listing.iter() {
            let e = e.map_err(self.os("read dir", rel))?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        Ok(names)
    }

    fn list_dir(
        &self,
        rel: &str,
        recursive: bool,
        pattern: Option<&str>,
        out: &mut Vec<Entry>,
        depth: usize,
    ) -> Result<(), FilesError> {
        const MAX_ENTRIES: usize = 100_000;
        let fd = self.open(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        let mut subdirs = Vec::new();
        let mut names = self.names(&fd, rel)?;
        names.sort();
        for n in names {
            let child = if rel.is_empty() {
                String::from_utf8_lossy(&n).into_owned()
            } else {
                format!("{rel}/{}", String::from_utf8_lossy(&n))
            };
            let Ok(st) = fstatat(&fd, n.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue; // removed meanwhile
            };
            let e = self.entry(&n, &child, &st);
            if recursive && e.is_dir && depth < 64 {
                subdirs.push(child);
            }
            if pattern.is_none_or(|p| glob(p.as_bytes(), &n)) {
                out.push(e);
            }
            if out.len() >= MAX_ENTRIES {
                return Err(FilesError::Invalid(format!(
                    "{}: more than {MAX_ENTRIES} entries; list a smaller tree",
                    self.display(rel)
                )));
            }
        }
        for d in subdirs {
            self.list_dir(&d, recursive, pattern, out, depth + 1)?;
        }
        Ok(())
    }

    /// Removes a file, a symlink, an empty directory, or with `recursive`
    /// a whole tree. The paths removed.
    pub fn delete(&self, rel: &str, recursive: bool) -> Result<Vec<String>, FilesError> {
        let p = self.parent(rel, false)?;
        let st = self.lstat(&p)?;
        let mut deleted = Vec::new();
        if st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits() {
            if recursive {
                self.empty_dir(&p.dir, &p.name, rel, &mut deleted)?;
            }
            nix::unistd::unlinkat(
                &p.dir,
                p.name.as_slice(),
                nix::unistd::UnlinkatFlags::RemoveDir,
            )
            .map_err(self.os("remove", rel))?;
        } else {
            nix::unistd::unlinkat(
                &p.dir,
                p.name.as_slice(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            )
            .map_err(self.os("remove", rel))?;
        }
        deleted.push(self.display(rel));
        Ok(deleted)
    }

    /// Removes everything inside `parent/name` (never following symlinks).
    fn empty_dir(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        rel: &str,
        deleted: &mut Vec<String>,
    ) -> Result<(), FilesError> {
        let fd = nix::fcntl::openat(
            parent,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(self.os("open", rel))?;
        for n in self.names(&fd, rel)? {
            let child = format!("{rel}/{}", String::from_utf8_lossy(&n));
            let st = fstatat(&fd, n.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(self.os("lstat", &child))?;
            if st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits() {
                self.empty_dir(&fd, &n, &child, deleted)?;
                nix::unistd::unlinkat(&fd, n.as_slice(), nix::unistd::UnlinkatFlags::RemoveDir)
            } else {
                nix::unistd::unlinkat(&fd, n.as_slice(), nix::unistd::UnlinkatFlags::NoRemoveDir)
            }
            .map_err(self.os("remove", &child))?;
            deleted.push(self.display(&child));
        }
        Ok(())
    }

    /// Renames (replacing an existing file at `dest`; parents created).
    pub fn rename(&self, source: &str, dest: &str) -> Result<(), FilesError> {
        let s = self.parent(source, false)?;
        self.lstat(&s)?;
        let d = self.parent(dest, true)?;
        nix::fcntl::renameat(&s.dir, s.name.as_slice(), &d.dir, d.name.as_slice())
            .map_err(self.os("rename", source))
    }

    /// Copies a file, a symlink (as a symlink) or, with `recursive`, a
    /// directory tree. `(source, dest)` pairs copied and the bytes.
    pub fn copy(
        &self,
        source: &str,
        dest: &str,
        recursive: bool,
    ) -> Result<(Vec<(String, String)>, u64), FilesError> {
        if dest == source || dest.starts_with(&format!("{source}/")) || source.is_empty() {
            return Err(FilesError::Invalid(format!(
                "cannot copy {} into itself",
                self.display(source)
            )));
        }
        let s = self.parent(source, false)?;
        let st = self.lstat(&s)?;
        let d = self.parent(dest, true)?;
        let mut copied = Vec::new();
        let mut bytes = 0;
        self.copy_entry(&s, &st, &d, recursive, &mut copied, &mut bytes)?;
        Ok((copied, bytes))
    }

    fn copy_entry(
        &self,
        s: &Parent,
        st: &FileStat,
        d: &Parent,
        recursive: bool,
        copied: &mut Vec<(String, String)>,
        bytes: &mut u64,
    ) -> Result<(), FilesError> {
        let kind = st.st_mode & SFlag::S_IFMT.bits();
        let mode = Mode::from_bits_truncate(st.st_mode & 0o7777);
        if kind == SFlag::S_IFDIR.bits() {
            if !recursive {
                return Err(self.os("copy", &s.rel)(Errno::EISDIR));
            }
            match nix::sys::stat::mkdirat(&d.dir, d.name.as_slice(), mode) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(self.os("mkdir", &d.rel)(e)),
            }
            copied.push((self.display(&s.rel), self.display(&d.rel)));
            let open = |p: &Parent, flags: OFlag| {
                nix::fcntl::openat(
                    &p.dir,
                    p.name.as_slice(),
                    flags | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(self.os("open", &p.rel))
            };
            let sfd = open(s, OFlag::O_RDONLY)?;
            let dfd = open(d, OFlag::O_PATH)?;
            for n in self.names(&sfd, &s.rel)? {
                let child = |p: &Parent, fd: &OwnedFd| -> Result<Parent, FilesError> {
                    Ok(Parent {
                        dir: fd.try_clone().map_err(|e| self.io("open", &p.rel, e))?,
                        name: n.clone(),
                        rel: format!("{}/{}", p.rel, String::from_utf8_lossy(&n)),
                    })
                };
                let cs = child(s, &sfd)?;
                let cd = child(d, &dfd)?;
                let cst = self.lstat(&cs)?;
                self.copy_entry(&cs, &cst, &cd, true, copied, bytes)?;
            }
            return Ok(());
        }
        if kind == SFlag::S_IFLNK.bits() {
            let target = nix::fcntl::readlinkat(&s.dir, s.name.as_slice())
                .map_err(self.os("readlink", &s.rel))?;
            let _ = nix::unistd::unlinkat(
                &d.dir,
                d.name.as_slice(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
            nix::unistd::symlinkat(target.as_os_str(), &d.dir, d.name.as_slice())
                .map_err(self.os("symlink", &d.rel))?;
            copied.push((self.display(&s.rel), self.display(&d.rel)));
            return Ok(());
        }
        if kind != SFlag::S_IFREG.bits() {
            return Err(FilesError::Invalid(format!(
                "{}: only files, directories and symlinks can be copied",
                self.display(&s.rel)
            )));
        }
        let src = nix::fcntl::openat(
            &s.dir,
            s.name.as_slice(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(self.os("open", &s.rel))?;
        let dst = nix::fcntl::openat(
            &d.dir,
            d.name.as_slice(),
            OFlag::O_WRONLY
                | OFlag::O_CREAT
                | OFlag::O_TRUNC
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC,
            mode,
        )
        .map_err(self.os("create", &d.rel))?;
        let (mut src, mut dst) = (std::fs::File::from(src), std::fs::File::from(dst));
        // std::io::copy uses copy_file_range between files.
        *bytes += io::copy(&mut src, &mut dst).map_err(|e| self.io("copy", &d.rel, e))?;
        use std::os::unix::fs::PermissionsExt;
        dst.set_permissions(std::fs::Permissions::from_mode(mode.bits()))
            .map_err(|e| self.io("chmod", &d.rel, e))?;
        copied.push((self.display(&s.rel), self.display(&d.rel)));
        Ok(())
    }

    /// Changes the mode of a path (a final symlink is followed, inside the
    /// root), and with `recursive` of everything below it. The paths changed.
    pub fn chmod(&self, rel: &str, mode: u32, recursive: bool) -> Result<Vec<String>, FilesError> {
        let fd = self.open(rel, OFlag::O_PATH)?;
        let mut changed = Vec::new();
        self.chmod_fd(&fd, rel, mode, recursive, &mut changed)?;
        Ok(changed)
    }

    fn chmod_fd(
        &self,
        fd: &OwnedFd,
        rel: &str,
        mode: u32,
        recursive: bool,
        changed: &mut Vec<String>,
    ) -> Result<(), FilesError> {
        // An O_PATH fd cannot be fchmod'ed; its /proc/self/fd link names
        // exactly that inode.
        let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            link.as_str(),
            Mode::from_bits_truncate(mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(self.os("chmod", rel))?;
        changed.push(self.display(rel));
        if !recursive {
            return Ok(());
        }
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(self.os("stat", rel))?;
        if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFDIR.bits() {
            return Ok(());
        }
        for n in self.names(fd, rel)? {
            let child = format!("{rel}/{}", String::from_utf8_lossy(&n));
            // Symlinks inside are not followed (nor changed).
            let Ok(cfd) = nix::fcntl::openat(
                fd,
                n.as_slice(),
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            let st = nix::sys::stat::fstat(cfd.as_fd()).map_err(self.os("stat", &child))?;
            if st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits() {
                continue;
            }
            self.chmod_fd(&cfd, &child, mode, true, changed)?;
        }
        Ok(())
    }
}

/// A write in progress: the data goes to `file`, a temp file beside the target.
pub struct PendingWrite {
    pub file: std::fs::File,
    parent: Parent,
    tmp: String,
}

impl PendingWrite {
    /// Abandons the write (the temp file is removed).
    pub fn abort(self) {
        let _ = nix::unistd::unlinkat(
            &self.parent.dir,
            self.tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
}

/// Parses an octal mode: `644`, `0644`, `0o644`.
pub fn parse_mode(s: &str) -> Option<u32> {
    let t = s.trim();
    let t = t.strip_prefix("0o").unwrap_or(t);
    if t.is_empty() || t.len() > 5 {
        return None;
    }
    u32::from_str_radix(t, 8).ok().filter(|m| *m <= 0o7777)
}

/// `*` and `?` wildcards over bytes.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let f = Files::new("/srv/env".into());
        assert_eq!(f.relative("/etc/passwd", None).unwrap(), "etc/passwd");
        assert_eq!(f.relative("/", None).unwrap(), "");
        assert_eq!(f.relative("b/./c", Some("/a")).unwrap(), "a/b/c");
        assert_eq!(f.relative("x/../y", None).unwrap(), "y");
        assert_eq!(
            f.relative("hello.txt", Some("/app")).unwrap(),
            "app/hello.txt"
        );
        assert!(matches!(
            f.relative("../../etc/passwd", Some("/a")),
            Err(FilesError::Outside { .. })
        ));
        assert!(matches!(
            f.relative("/../etc", None),
            Err(FilesError::Outside { .. })
        ));
        assert!(matches!(
            f.relative("a", Some("rel")),
            Err(FilesError::Invalid(_))
        ));
        assert_eq!(f.display("etc/passwd"), "/etc/passwd");
        assert_eq!(f.display(""), "/");
    }

    #[test]
    fn modes_and_globs() {
        assert_eq!(parse_mode("0644"), Some(0o644));
        assert_eq!(parse_mode("755"), Some(0o755));
        assert_eq!(parse_mode("0o600"), Some(0o600));
        assert_eq!(parse_mode("999"), None);
        assert_eq!(parse_mode(""), None);
        assert!(glob(b"*.txt", b"a.txt"));
        assert!(!glob(b"*.txt", b"a.txt.bak"));
        assert!(glob(b"a?c*", b"abcdef"));
        assert!(glob(b"*", b""));
    }
}
