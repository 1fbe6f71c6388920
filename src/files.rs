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

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// A recursive operation beyond its bounds (refused before anything
    /// changed): too deep (400), or too many entries or too long an answer
    /// (`too_large`: 413).
    #[error("{path}: {why}")]
    Limit {
        path: String,
        why: String,
        too_large: bool,
    },
    /// The client went away: the work stopped where it was.
    #[error("cancelled: the client went away")]
    Cancelled,
}

impl FilesError {
    /// The path the error is about, for the error body.
    pub fn path(&self) -> Option<&str> {
        match self {
            FilesError::Outside { path, .. }
            | FilesError::Os { path, .. }
            | FilesError::Limit { path, .. } => Some(path),
            FilesError::Invalid(_) | FilesError::Cancelled => None,
        }
    }

    /// The POSIX name of the error (`ENOENT`), for the error body.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            FilesError::Os { errno, .. } => Some(errno_name(*errno)),
            FilesError::Outside { .. } => Some("EXDEV"),
            FilesError::Invalid(_) => Some("EINVAL"),
            FilesError::Limit {
                too_large: true, ..
            } => Some("E2BIG"),
            FilesError::Limit { .. } => Some("ELOOP"),
            FilesError::Cancelled => Some("ECANCELED"),
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

/// How deep a recursive operation (delete, copy, chmod) may go.
pub const MAX_DEPTH: usize = 256;
/// How many entries it may touch.
pub const MAX_ENTRIES: usize = 100_000;
/// How many bytes of paths its answer may list.
pub const MAX_LISTED_BYTES: usize = 8 << 20;

/// A step of a bounded walk ([`Files::walk`]), parents before children.
enum Step<'a> {
    /// A directory, before what it holds.
    Enter {
        parent: &'a OwnedFd,
        name: &'a [u8],
        rel: &'a str,
        st: &'a FileStat,
    },
    /// Anything but a directory (symlinks are not followed).
    Leaf {
        parent: &'a OwnedFd,
        name: &'a [u8],
        rel: &'a str,
        st: &'a FileStat,
    },
    /// A directory, after what it holds.
    Exit {
        parent: &'a OwnedFd,
        name: &'a [u8],
        rel: &'a str,
    },
}

/// A directory being walked.
struct Frame {
    fd: OwnedFd,
    name: Vec<u8>,
    rel: String,
    names: Vec<Vec<u8>>,
    next: usize,
}

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits()
}

/// A request's view of the environment root.
pub struct Files {
    /// The host path of the environment's `/`.
    root: PathBuf,
    /// Set when the request's client goes away (see [`Files::canceller`]):
    /// long work checks it between entries and between chunks of data.
    cancel: Arc<AtomicBool>,
}

/// Cancels the work of the [`Files`] it came from when dropped: a request
/// handler holds it, and hyper drops the handler when its client goes away.
pub struct Canceller(Option<Arc<AtomicBool>>);

impl Canceller {
    /// The work ended with its client still there: nothing to cancel.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Canceller {
    fn drop(&mut self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// Data is copied in chunks of this size, the request checked in between.
const COPY_CHUNK: u64 = 8 << 20;

/// A path resolved to (confined parent dir fd, last component).
struct Parent {
    dir: OwnedFd,
    name: Vec<u8>,
    /// Root-relative path, for messages and results.
    rel: String,
}

impl Files {
    pub fn new(root: PathBuf) -> Self {
        Files {
            root,
            cancel: Arc::default(),
        }
    }

    /// The guard whose drop cancels this request's work.
    pub fn canceller(&self) -> Canceller {
        Canceller(Some(self.cancel.clone()))
    }

    /// `Err(Cancelled)` once the client has gone.
    fn go_on(&self) -> Result<(), FilesError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(FilesError::Cancelled);
        }
        Ok(())
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
        if wd.contains('\0') {
            return Err(FilesError::Invalid("workingDir contains a NUL byte".into()));
        }
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

    /// `rel` opened `O_PATH` (confined like every path), and whether it is
    /// a directory: what a watch is put on.
    pub fn open_path(&self, rel: &str) -> Result<(OwnedFd, bool), FilesError> {
        let fd = self.open(rel, OFlag::O_PATH)?;
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(self.os("stat", rel))?;
        Ok((fd, is_dir(&st)))
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
            // A FIFO, socket or device: reading could block or never end.
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
                if names.len() >= MAX_ENTRIES {
                    return Err(too_many(rel));
                }
                names.push(n.to_vec());
            }
        }
        Ok(names)
    }

    /// Walks `top` without recursion and without following symlinks,
    /// calling `visit` for every entry (a directory before and after what it
    /// holds). Refuses, naming the limit, a tree deeper than [`MAX_DEPTH`],
    /// with more than [`MAX_ENTRIES`] entries, or whose paths add up to
    /// more than [`MAX_LISTED_BYTES`].
    fn walk(
        &self,
        top: &Parent,
        mut visit: impl FnMut(Step<'_>) -> Result<(), FilesError>,
    ) -> Result<(), FilesError> {
        let st = self.lstat(top)?;
        if !is_dir(&st) {
            return visit(Step::Leaf {
                parent: &top.dir,
                name: &top.name,
                rel: &top.rel,
                st: &st,
            });
        }
        let open_dir = |parent: &OwnedFd, name: &[u8], rel: &str| {
            nix::fcntl::openat(
                parent,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(self.os("open", rel))
        };
        let fd = open_dir(&top.dir, &top.name, &top.rel)?;
        visit(Step::Enter {
            parent: &top.dir,
            name: &top.name,
            rel: &top.rel,
            st: &st,
        })?;
        let names = self.names(&fd, &top.rel)?;
        let mut stack = vec![Frame {
            fd,
            name: top.name.clone(),
            rel: top.rel.clone(),
            names,
            next: 0,
        }];
        let (mut entries, mut listed) = (1usize, top.rel.len() + 1);
        while !stack.is_empty() {
            self.go_on()?;
            let depth = stack.len();
            let frame = stack.last_mut().expect("not empty");
            if frame.next == frame.names.len() {
                let done = stack.pop().expect("not empty");
                let parent = stack.last().map(|f| &f.fd).unwrap_or(&top.dir);
                visit(Step::Exit {
                    parent,
                    name: &done.name,
                    rel: &done.rel,
                })?;
                continue;
            }
            let name = std::mem::take(&mut frame.names[frame.next]);
            frame.next += 1;
            let rel = format!("{}/{}", frame.rel, String::from_utf8_lossy(&name));
            entries += 1;
            listed += rel.len() + 1;
            if entries > MAX_ENTRIES {
                return Err(too_many(&top.rel));
            }
            if listed > MAX_LISTED_BYTES {
                return Err(FilesError::Limit {
                    path: self.display(&top.rel),
                    why: format!("the paths below it add up to more than {MAX_LISTED_BYTES} bytes"),
                    too_large: true,
                });
            }
            let st = match fstatat(&frame.fd, name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue, // went away meanwhile
                Err(e) => return Err(self.os("lstat", &rel)(e)),
            };
            if !is_dir(&st) {
                visit(Step::Leaf {
                    parent: &frame.fd,
                    name: &name,
                    rel: &rel,
                    st: &st,
                })?;
                continue;
            }
            if depth >= MAX_DEPTH {
                return Err(FilesError::Limit {
                    path: self.display(&top.rel),
                    why: format!("the tree is deeper than {MAX_DEPTH} levels"),
                    too_large: false,
                });
            }
            let fd = open_dir(&frame.fd, &name, &rel)?;
            visit(Step::Enter {
                parent: &frame.fd,
                name: &name,
                rel: &rel,
                st: &st,
            })?;
            let names = self.names(&fd, &rel)?;
            stack.push(Frame {
                fd,
                name,
                rel,
                names,
                next: 0,
            });
        }
        Ok(())
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
        use nix::unistd::{UnlinkatFlags, unlinkat};
        let p = self.parent(rel, false)?;
        let st = self.lstat(&p)?;
        if !recursive || !is_dir(&st) {
            let flag = if is_dir(&st) {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            unlinkat(&p.dir, p.name.as_slice(), flag).map_err(self.os("remove", rel))?;
            return Ok(vec![self.display(rel)]);
        }
        // Bounds first: a refused tree is left as it was.
        self.walk(&p, |_| Ok(()))?;
        let mut deleted = Vec::new();
        self.walk(&p, |step| {
            let (parent, name, rel, flag) = match step {
                Step::Enter { .. } => return Ok(()),
                Step::Leaf {
                    parent, name, rel, ..
                } => (parent, name, rel, UnlinkatFlags::NoRemoveDir),
                Step::Exit { parent, name, rel } => (parent, name, rel, UnlinkatFlags::RemoveDir),
            };
            unlinkat(parent, name, flag).map_err(self.os("remove", rel))?;
            deleted.push(self.display(rel));
            Ok(())
        })?;
        Ok(deleted)
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
    /// directory tree (bounded: see [`Files::walk`]). `(source, dest)` pairs
    /// copied and the bytes. A directory is never copied into itself, as the
    /// kernel resolves the paths (a symlink on the way counts).
    pub fn copy(
        &self,
        source: &str,
        dest: &str,
        recursive: bool,
    ) -> Result<(Vec<(String, String)>, u64), FilesError> {
        if source.is_empty() || dest.is_empty() {
            return Err(FilesError::Invalid(
                "the environment's root cannot be copied or replaced".into(),
            ));
        }
        let s = self.parent(source, false)?;
        let st = self.lstat(&s)?;
        let d = self.parent(dest, true)?;
        if is_dir(&st) {
            if !recursive {
                return Err(self.os("copy", source)(Errno::EISDIR));
            }
            self.refuse_into_itself(&s, &st, &d)?;
            self.walk(&s, |_| Ok(()))?;
        }
        let (mut copied, mut bytes) = (Vec::new(), 0u64);
        // The destination dirs entered so far (the walk is depth-first).
        let mut dests: Vec<OwnedFd> = Vec::new();
        let dest_rel = |rel: &str| format!("{}{}", d.rel, &rel[s.rel.len()..]);
        self.walk(&s, |step| {
            match step {
                Step::Enter { name, rel, st, .. } => {
                    let (dparent, dname) = match dests.last() {
                        Some(fd) => (fd, name),
                        None => (&d.dir, d.name.as_slice()),
                    };
                    let drel = dest_rel(rel);
                    let mode = Mode::from_bits_truncate(st.st_mode & 0o7777);
                    match nix::sys::stat::mkdirat(dparent, dname, mode) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(self.os("mkdir", &drel)(e)),
                    }
                    let fd = nix::fcntl::openat(
                        dparent,
                        dname,
                        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(self.os("open", &drel))?;
                    dests.push(fd);
                    copied.push((self.display(rel), self.display(&drel)));
                }
                Step::Exit { .. } => {
                    dests.pop();
                }
                Step::Leaf {
                    parent,
                    name,
                    rel,
                    st,
                } => {
                    let (dparent, dname) = match dests.last() {
                        Some(fd) => (fd, name),
                        None => (&d.dir, d.name.as_slice()),
                    };
                    let drel = dest_rel(rel);
                    bytes += self.copy_leaf((parent, name, rel), st, (dparent, dname, &drel))?;
                    copied.push((self.display(rel), self.display(&drel)));
                }
            }
            Ok(())
        })?;
        Ok((copied, bytes))
    }

    /// Refuses a copy of directory `s` into `d`'s directory or below it:
    /// compares inode identities from `d` up to the root, after the
    /// kernel's resolution (never the strings).
    fn refuse_into_itself(&self, s: &Parent, st: &FileStat, d: &Parent) -> Result<(), FilesError> {
        let id = |st: &FileStat| (st.st_dev, st.st_ino);
        let source = id(st);
        let root = nix::sys::stat::fstat(self.root_fd()?.as_fd()).map_err(self.os("stat", ""))?;
        let mut cur = d.dir.try_clone().map_err(|e| self.io("open", &d.rel, e))?;
        for _ in 0..=MAX_DEPTH * 16 {
            let here = nix::sys::stat::fstat(cur.as_fd()).map_err(self.os("stat", &d.rel))?;
            if id(&here) == source {
                return Err(FilesError::Invalid(format!(
                    "cannot copy {} into itself ({})",
                    self.display(&s.rel),
                    self.display(&d.rel)
                )));
            }
            if id(&here) == id(&root) {
                return Ok(());
            }
            let up = nix::fcntl::openat(
                &cur,
                "..",
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(self.os("open", &d.rel))?;
            let above = nix::sys::stat::fstat(up.as_fd()).map_err(self.os("stat", &d.rel))?;
            if id(&above) == id(&here) {
                return Ok(()); // the top of a filesystem
            }
            cur = up;
        }
        Err(FilesError::Limit {
            path: self.display(&d.rel),
            why: "too deep below the root".into(),
            too_large: false,
        })
    }

    /// Copies a file (its bytes) or a symlink (as a symlink); anything else
    /// is refused. Nothing is opened that could block: a FIFO, socket or
    /// device at either end is refused at once.
    fn copy_leaf(
        &self,
        (sdir, sname, srel): (&OwnedFd, &[u8], &str),
        st: &FileStat,
        (ddir, dname, drel): (&OwnedFd, &[u8], &str),
    ) -> Result<u64, FilesError> {
        let kind = st.st_mode & SFlag::S_IFMT.bits();
        let mode = Mode::from_bits_truncate(st.st_mode & 0o7777);
        let not_regular = |rel: &str| {
            FilesError::Invalid(format!(
                "{}: only files, directories and symlinks can be copied",
                self.display(rel)
            ))
        };
        if kind == SFlag::S_IFLNK.bits() {
            let target = nix::fcntl::readlinkat(sdir, sname).map_err(self.os("readlink", srel))?;
            let _ = nix::unistd::unlinkat(ddir, dname, nix::unistd::UnlinkatFlags::NoRemoveDir);
            nix::unistd::symlinkat(target.as_os_str(), ddir, dname)
                .map_err(self.os("symlink", drel))?;
            return Ok(0);
        }
        if kind != SFlag::S_IFREG.bits() {
            return Err(not_regular(srel));
        }
        if let Ok(existing) = fstatat(ddir, dname, AtFlags::AT_SYMLINK_NOFOLLOW)
            && existing.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits()
        {
            return Err(FilesError::Invalid(format!(
                "{}: exists and is not a regular file",
                self.display(drel)
            )));
        }
        let open = |dir: &OwnedFd, name: &[u8], flags: OFlag, mode: Mode, rel: &str| {
            let fd = nix::fcntl::openat(
                dir,
                name,
                flags | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                mode,
            )
            .map_err(self.os("open", rel))?;
            let st = nix::sys::stat::fstat(fd.as_fd()).map_err(self.os("stat", rel))?;
            if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
                return Err(not_regular(rel));
            }
            Ok(std::fs::File::from(fd))
        };
        let mut src = open(sdir, sname, OFlag::O_RDONLY, Mode::empty(), srel)?;
        let mut dst = open(
            ddir,
            dname,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
            mode,
            drel,
        )?;
        // std::io::copy uses copy_file_range between files (a Take of one
        // too), one chunk at a time so a client that left stops it.
        let mut n = 0;
        loop {
            self.go_on()?;
            let chunk = io::copy(&mut (&mut src).take(COPY_CHUNK), &mut dst)
                .map_err(|e| self.io("copy", drel, e))?;
            n += chunk;
            if chunk < COPY_CHUNK {
                break;
            }
        }
        use std::os::unix::fs::PermissionsExt;
        dst.set_permissions(std::fs::Permissions::from_mode(mode.bits()))
            .map_err(|e| self.io("chmod", drel, e))?;
        Ok(n)
    }

    /// Changes the mode of a path (a final symlink is followed, inside the
    /// root), and with `recursive` of everything below it (bounded; symlinks
    /// below are neither followed nor changed). The paths changed.
    pub fn chmod(&self, rel: &str, mode: u32, recursive: bool) -> Result<Vec<String>, FilesError> {
        self.apply_tree(rel, recursive, |fd, rel| {
            self.chmod_path_fd(fd, rel, mode)?;
            Ok(self.display(rel))
        })
    }

    /// `chown` of `rel`, and with `recursive` of everything under it but
    /// symlinks (as [`Files::chmod`]); `None` leaves that id as it is.
    /// Each path with the owner and group it has now.
    pub fn chown(
        &self,
        rel: &str,
        uid: Option<u32>,
        gid: Option<u32>,
        recursive: bool,
    ) -> Result<Vec<(String, u32, u32)>, FilesError> {
        self.apply_tree(rel, recursive, |fd, rel| {
            nix::unistd::fchownat(
                fd,
                "",
                uid.map(nix::unistd::Uid::from_raw),
                gid.map(nix::unistd::Gid::from_raw),
                nix::fcntl::AtFlags::AT_EMPTY_PATH,
            )
            .map_err(self.os("chown", rel))?;
            let st = nix::sys::stat::fstat(fd.as_fd()).map_err(self.os("stat", rel))?;
            Ok((self.display(rel), st.st_uid, st.st_gid))
        })
    }

    /// The id of `name` in the environment's own user or group database
    /// (`etc/passwd`, `etc/group`: read inside the root, like any path of
    /// the API); None if no line names it.
    pub fn lookup_id(&self, db: &str, name: &str) -> Result<Option<u32>, FilesError> {
        let (f, len) = self.read(db)?;
        if len > MAX_ID_DB {
            return Err(FilesError::Invalid(format!(
                "/{db}: larger than {MAX_ID_DB} bytes"
            )));
        }
        let mut text = Vec::with_capacity(len as usize);
        io::Read::read_to_end(&mut io::Read::take(f, MAX_ID_DB), &mut text)
            .map_err(|e| self.io("read", db, e))?;
        Ok(find_id(&text, name))
    }

    /// `f` on `rel`, then with `recursive` on everything under it, each
    /// opened `O_PATH` without following: symlinks (or ones swapped in)
    /// are left alone. The tree is walked once first, so one too deep or
    /// too large is refused before anything changes.
    fn apply_tree<T>(
        &self,
        rel: &str,
        recursive: bool,
        mut f: impl FnMut(&OwnedFd, &str) -> Result<T, FilesError>,
    ) -> Result<Vec<T>, FilesError> {
        let fd = self.open(rel, OFlag::O_PATH)?;
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(self.os("stat", rel))?;
        if !recursive || !is_dir(&st) {
            return Ok(vec![f(&fd, rel)?]);
        }
        let top = Parent {
            dir: fd,
            name: b".".to_vec(),
            rel: rel.to_owned(),
        };
        self.walk(&top, |_| Ok(()))?;
        let mut done = vec![f(&top.dir, rel)?];
        self.walk(&top, |step| {
            let (parent, name, rel) = match step {
                Step::Enter { rel: r, .. } if r == top.rel => return Ok(()),
                Step::Enter {
                    parent, name, rel, ..
                }
                | Step::Leaf {
                    parent, name, rel, ..
                } => (parent, name, rel),
                Step::Exit { .. } => return Ok(()),
            };
            let Ok(cfd) = nix::fcntl::openat(
                parent,
                name,
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) else {
                return Ok(());
            };
            let st = nix::sys::stat::fstat(cfd.as_fd()).map_err(self.os("stat", rel))?;
            if st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits() {
                return Ok(());
            }
            done.push(f(&cfd, rel)?);
            Ok(())
        })?;
        Ok(done)
    }

    /// chmod of an `O_PATH` fd (which cannot be `fchmod`ed; its
    /// `/proc/self/fd` link names exactly that inode).
    fn chmod_path_fd(&self, fd: &OwnedFd, rel: &str, mode: u32) -> Result<(), FilesError> {
        let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            link.as_str(),
            Mode::from_bits_truncate(mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(self.os("chmod", rel))
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

fn too_many(rel: &str) -> FilesError {
    FilesError::Limit {
        path: format!("/{rel}"),
        why: format!("more than {MAX_ENTRIES} entries"),
        too_large: true,
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

/// Largest `/etc/passwd` or `/etc/group` a name lookup reads.
const MAX_ID_DB: u64 = 16 << 20;

/// The id (third field) of the line of a passwd or group file whose first
/// field is `name`.
fn find_id(db: &[u8], name: &str) -> Option<u32> {
    db.split(|b| *b == b'\n').find_map(|line| {
        let mut fields = line.split(|b| *b == b':');
        if fields.next()? != name.as_bytes() {
            return None;
        }
        std::str::from_utf8(fields.nth(1)?)
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_found_by_the_first_field_only() {
        let db = b"root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/x\nweird:x:notanumber:0\nx:x:7:\n";
        assert_eq!(super::find_id(db, "root"), Some(0));
        assert_eq!(super::find_id(db, "nobody"), Some(65534));
        assert_eq!(super::find_id(db, "x"), Some(7));
        assert_eq!(super::find_id(db, "weird"), None);
        assert_eq!(super::find_id(db, "bin"), None);
        assert_eq!(super::find_id(db, "roo"), None);
        assert_eq!(super::find_id(b"", "root"), None);
    }

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
