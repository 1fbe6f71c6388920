//! Manifests: what a checkpoint's tree is, entry by entry, relative to the
//! base. Built by scanning the overlay upper dir (only files whose
//! inode/size/mtime/ctime changed are read) and merging the scan onto the
//! manifest of the layer the environment was restored from; turned back into
//! a layer dir of hard links into the store.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::FsError;
use super::store::{Meta, Staged, Store};

/// Overlay's own xattrs: interpreted, never recorded as file xattrs.
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// An overlay whiteout: the path is deleted.
    Whiteout,
    Fifo,
    Char,
    Block,
    Socket,
}

/// One path of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub mtime_ns: i64,
    /// Extended attributes, values hex-encoded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// Files: the store object (content + metadata variant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// Symlinks: the target (path-encoded, see [`encode_path`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Dirs: overlay opaque (hides everything below it in lower layers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opaque: bool,
    /// Devices: the device number.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    /// Files with several links: a group id shared by the paths linked together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<u64>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A checkpoint's tree: relative path (no leading `/`, path-encoded) → entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: BTreeMap<String, Entry>,
}

/// Paths are bytes; the manifest stores them as UTF-8 with `%` and invalid
/// bytes percent-escaped, so every name round-trips.
pub fn encode_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                push_escaped(&mut out, s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                push_escaped(&mut out, std::str::from_utf8(good).unwrap_or_default());
                let n = e.error_len().unwrap_or(bad.len());
                for b in &bad[..n] {
                    out.push_str(&format!("%{b:02X}"));
                }
                rest = &bad[n..];
            }
        }
    }
    out
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        if c == '%' {
            out.push_str("%25")
        } else {
            out.push(c)
        }
    }
}

pub fn decode_path(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| FsError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What a previous scan learned about an upper entry: while its inode,
/// size, mtime and ctime are unchanged, so is its entry (any chmod, chown,
/// xattr or content change moves ctime), content object included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub entry: Entry,
}

/// What one scan produces: the new cache, its counters, and the staged copies
/// of changed files (by path) still to be committed to the store.
pub type ScanResult = (ScanCache, ScanStats, Vec<(String, Staged)>);

/// path → what the last scan saw.
pub type ScanCache = HashMap<String, Seen, rustc_hash::FxBuildHasher>;

/// An empty cache sized for `n` entries.
pub fn new_cache(n: usize) -> ScanCache {
    HashMap::with_capacity_and_hasher(n, rustc_hash::FxBuildHasher)
}

/// Counters of one scan.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct ScanStats {
    pub entries: u64,
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    pub files_cached: u64,
}

fn xattrs_of(path: &Path, symlink: bool) -> Result<(BTreeMap<String, String>, bool), FsError> {
    let mut out = BTreeMap::new();
    let mut opaque = false;
    if symlink {
        return Ok((out, false)); // user xattrs are not allowed on symlinks
    }
    let names = xattr::list(path).map_err(io_err("listxattr", path))?;
    for name in names {
        let Some(n) = name.to_str() else { continue };
        if n == OPAQUE_XATTR {
            opaque = xattr::get(path, &name)
                .ok()
                .flatten()
                .is_some_and(|v| v == b"y");
            continue;
        }
        if n.starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        if let Some(v) = xattr::get(path, &name).map_err(io_err("getxattr", path))? {
            out.insert(n.to_owned(), hex(&v));
        }
    }
    Ok((out, opaque))
}

/// Scans the upper dir into `next` (path → what is there now), reading and
/// storing only entries whose inode/size/mtime/ctime differ from `cache`.
/// Directories are shared out to `threads` workers. Changed files are only
/// staged (copied, not hashed): their entries get an object once
/// [`Store::commit`] ran on the returned list.
pub fn scan_upper(
    upper: &Path,
    store: &Store,
    cache: &ScanCache,
    threads: usize,
) -> Result<ScanResult, FsError> {
    use std::sync::Mutex;
    let queue: Mutex<(Vec<(PathBuf, String)>, usize)> =
        Mutex::new((vec![(upper.to_owned(), String::new())], 0));
    let ready = std::sync::Condvar::new();
    let worker = || -> Result<ScanResult, FsError> {
        let mut next = new_cache(cache.len() / threads.max(1) + 16);
        let mut stats = ScanStats::default();
        let mut staged = Vec::new();
        loop {
            // Take a directory; stop when none is queued and no worker may add one.
            let (dir, rel) = {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(d) = q.0.pop() {
                        q.1 += 1;
                        break d;
                    }
                    if q.1 == 0 {
                        ready.notify_all();
                        return Ok((next, stats, staged));
                    }
                    q = ready.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let result = scan_dir(&dir, &rel, store, cache, &mut next, &mut stats, &mut staged);
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            q.1 -= 1;
            match result {
                Ok(subdirs) => q.0.extend(subdirs),
                Err(e) => {
                    q.0.clear();
                    ready.notify_all();
                    return Err(e);
                }
            }
            ready.notify_all();
        }
    };
    let results: Vec<Result<ScanResult, FsError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1)).map(|_| scope.spawn(worker)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(FsError::Corrupt("scan worker panicked".into())))
            })
            .collect()
    });
    let mut all = new_cache(cache.len() + 16);
    let mut total = ScanStats::default();
    let mut all_staged = Vec::new();
    for r in results {
        let (part, stats, staged) = r?;
        all.extend(part);
        all_staged.extend(staged);
        total.entries += stats.entries;
        total.files_hashed += stats.files_hashed;
        total.bytes_hashed += stats.bytes_hashed;
        total.files_cached += stats.files_cached;
    }
    Ok((all, total, all_staged))
}

/// Scans one directory's entries; returns its subdirectories.
fn scan_dir(
    dir: &Path,
    rel: &str,
    store: &Store,
    cache: &ScanCache,
    next: &mut ScanCache,
    stats: &mut ScanStats,
    staged: &mut Vec<(String, Staged)>,
) -> Result<Vec<(PathBuf, String)>, FsError> {
    let mut subdirs = Vec::new();
    let rd = fs::read_dir(dir).map_err(io_err("read dir", dir))?;
    for item in rd {
        let item = item.map_err(io_err("read dir", dir))?;
        let name = encode_path(item.file_name().as_bytes());
        let rel_path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let path = item.path();
        let md = item.metadata().map_err(io_err("stat", &path))?;
        let ft = md.file_type();
        stats.entries += 1;
        let (mtime_ns, ctime_ns) = (
            md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            md.ctime() * 1_000_000_000 + md.ctime_nsec(),
        );
        let unchanged = cache.get(&rel_path).filter(|s| {
            s.ino == md.ino()
                && s.size == md.size()
                && s.mtime_ns == mtime_ns
                && s.ctime_ns == ctime_ns
        });
        let entry = match unchanged {
            Some(seen) => {
                if ft.is_file() {
                    stats.files_cached += 1;
                }
                seen.entry.clone()
            }
            None => read_entry(&path, &rel_path, &md, store, stats, staged)?,
        };
        if ft.is_dir() {
            subdirs.push((path, rel_path.clone()));
        }
        next.insert(
            rel_path,
            Seen {
                ino: md.ino(),
                size: md.size(),
                mtime_ns,
                ctime_ns,
                entry,
            },
        );
    }
    Ok(subdirs)
}

/// Reads one upper entry that the cache does not cover (storing a file's content).
fn read_entry(
    path: &Path,
    rel_path: &str,
    md: &fs::Metadata,
    store: &Store,
    stats: &mut ScanStats,
    staged: &mut Vec<(String, Staged)>,
) -> Result<Entry, FsError> {
    let ft = md.file_type();
    let base = |kind| Entry {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        xattrs: BTreeMap::new(),
        object: None,
        size: 0,
        target: None,
        opaque: false,
        rdev: 0,
        link: None,
    };
    Ok(if ft.is_char_device() && md.rdev() == 0 {
        base(Kind::Whiteout)
    } else if ft.is_dir() {
        let (xattrs, opaque) = xattrs_of(path, false)?;
        Entry {
            xattrs,
            opaque,
            ..base(Kind::Dir)
        }
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(io_err("readlink", path))?;
        Entry {
            target: Some(encode_path(target.as_os_str().as_bytes())),
            ..base(Kind::Symlink)
        }
    } else if ft.is_file() {
        let (xattrs, _) = xattrs_of(path, false)?;
        let mut e = Entry {
            xattrs,
            size: md.size(),
            ..base(Kind::File)
        };
        if md.nlink() > 1 {
            e.link = Some(md.ino());
        }
        stats.files_hashed += 1;
        stats.bytes_hashed += md.size();
        let meta = Meta {
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime_ns: e.mtime_ns,
            xattrs: e.xattrs.clone(),
        };
        staged.push((rel_path.to_owned(), store.stage_file(path, &meta)?));
        e
    } else {
        let kind = if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_char_device() {
            Kind::Char
        } else if ft.is_block_device() {
            Kind::Block
        } else {
            Kind::Socket
        };
        Entry {
            rdev: md.rdev(),
            ..base(kind)
        }
    })
}

/// Applies an upper scan onto the manifest of the layer below it. A whiteout
/// is kept only where the base still has the path (elsewhere it hides nothing).
pub fn merge(parent: &Manifest, scan: &ScanCache, base: &Path) -> Manifest {
    let mut upper: Vec<(&String, &Entry)> = scan.iter().map(|(k, s)| (k, &s.entry)).collect();
    upper.sort_unstable_by(|a, b| a.0.cmp(b.0)); // parents before children
    let mut entries = parent.entries.clone();
    fn remove_below(entries: &mut BTreeMap<String, Entry>, p: &str) {
        let prefix = format!("{p}/");
        let doomed: Vec<String> = entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            entries.remove(&k);
        }
    }
    let parent_empty = parent.entries.is_empty();
    for (p, e) in upper {
        match e.kind {
            Kind::Whiteout => {
                remove_below(&mut entries, p);
                entries.remove(p);
                let in_base =
                    fs::symlink_metadata(base.join(OsStr::from_bytes(&decode_path(p)))).is_ok();
                if in_base {
                    entries.insert(p.clone(), e.clone());
                }
            }
            Kind::Dir => {
                if e.opaque && !parent_empty {
                    remove_below(&mut entries, p);
                }
                entries.insert(p.clone(), e.clone());
            }
            _ => {
                // A non-directory hides whatever lower tree was at this path.
                if !parent_empty {
                    remove_below(&mut entries, p);
                }
                entries.insert(p.clone(), e.clone());
            }
        }
    }
    Manifest { entries }
}

/// Builds a layer dir for `manifest` at `dest` (which must not exist): dirs
/// are created, files are hard links to store objects (so hard-linked paths
/// share an inode), whiteouts and opaque dirs are overlay's own markers.
pub fn materialize(manifest: &Manifest, store: &Store, dest: &Path) -> Result<(), FsError> {
    use nix::sys::stat::{Mode, SFlag, mknod};
    fs::create_dir(dest).map_err(io_err("create", dest))?;
    let mut dirs = Vec::new();
    for (p, e) in &manifest.entries {
        let path = dest.join(OsStr::from_bytes(&decode_path(p)));
        match e.kind {
            Kind::Dir => {
                fs::create_dir(&path).map_err(io_err("mkdir", &path))?;
                if e.opaque {
                    xattr::set(&path, OPAQUE_XATTR, b"y").map_err(io_err("setxattr", &path))?;
                }
                dirs.push((path, e));
            }
            Kind::File => {
                let object = e
                    .object
                    .as_deref()
                    .ok_or_else(|| FsError::Corrupt(format!("file {p} has no object")))?;
                let src = store.object_path(object);
                fs::hard_link(&src, &path).map_err(io_err("link", &path))?;
            }
            Kind::Symlink => {
                let target = decode_path(e.target.as_deref().unwrap_or(""));
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(io_err("symlink", &path))?;
                set_owner_times(&path, e, true)?;
            }
            Kind::Whiteout => {
                mknod(&path, SFlag::S_IFCHR, Mode::empty(), 0)
                    .map_err(|e| io_err("mknod", &path)(e.into()))?;
            }
            Kind::Fifo | Kind::Char | Kind::Block | Kind::Socket => {
                let kind = match e.kind {
                    Kind::Fifo => SFlag::S_IFIFO,
                    Kind::Char => SFlag::S_IFCHR,
                    Kind::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFSOCK,
                };
                mknod(&path, kind, Mode::from_bits_truncate(e.mode), e.rdev)
                    .map_err(|err| io_err("mknod", &path)(err.into()))?;
                set_owner_times(&path, e, false)?;
            }
        }
    }
    // Directory metadata last, deepest first: creating entries changes mtimes.
    for (path, e) in dirs.into_iter().rev() {
        for (k, v) in &e.xattrs {
            xattr::set(&path, k, &unhex(v)).map_err(io_err("setxattr", &path))?;
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(e.mode))
            .map_err(io_err("chmod", &path))?;
        set_owner_times(&path, e, false)?;
    }
    Ok(())
}

fn set_owner_times(path: &Path, e: &Entry, nofollow: bool) -> Result<(), FsError> {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::utimensat;
    use nix::sys::time::TimeSpec;
    use nix::unistd::{Gid, Uid, fchownat};
    let flag = if nofollow {
        AtFlags::AT_SYMLINK_NOFOLLOW
    } else {
        AtFlags::empty()
    };
    fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(Uid::from_raw(e.uid)),
        Some(Gid::from_raw(e.gid)),
        flag,
    )
    .map_err(|err| io_err("chown", path)(err.into()))?;
    let ts = TimeSpec::new(
        e.mtime_ns.div_euclid(1_000_000_000),
        e.mtime_ns.rem_euclid(1_000_000_000),
    );
    let uflag = if nofollow {
        nix::sys::stat::UtimensatFlags::NoFollowSymlink
    } else {
        nix::sys::stat::UtimensatFlags::FollowSymlink
    };
    utimensat(nix::fcntl::AT_FDCWD, path, &ts, &ts, uflag)
        .map_err(|err| io_err("utimensat", path)(err.into()))?;
    Ok(())
}

/// Serialises a manifest (JSON, zstd).
pub fn encode(manifest: &Manifest) -> Vec<u8> {
    let json = serde_json::to_vec(manifest).unwrap_or_default();
    zstd::encode_all(&json[..], 1).unwrap_or(json)
}

pub fn decode(bytes: &[u8]) -> Result<Manifest, FsError> {
    let json = zstd::decode_all(bytes).map_err(|e| FsError::Corrupt(format!("manifest: {e}")))?;
    serde_json::from_slice(&json).map_err(|e| FsError::Corrupt(format!("manifest: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        for raw in [
            &b"plain/name"[..],
            b"100%",
            b"bad\xffbyte",
            b"\xc3\xa9t\xc3\xa9",
        ] {
            assert_eq!(decode_path(&encode_path(raw)), raw);
        }
        assert_eq!(encode_path(b"a%b"), "a%25b");
    }

    fn file(obj: &str) -> Entry {
        Entry {
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            xattrs: BTreeMap::new(),
            object: Some(obj.into()),
            size: 1,
            target: None,
            opaque: false,
            rdev: 0,
            link: None,
        }
    }

    #[test]
    fn merge_applies_whiteouts_opaque_dirs_and_replacements() {
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("in-base"), b"x").unwrap();
        let mut parent = Manifest::default();
        for p in ["a", "d/x", "d/y", "e/z", "f/g"] {
            parent.entries.insert(p.into(), file(p));
        }
        let mut upper = new_cache(8);
        let seen = |entry: Entry| Seen {
            ino: 0,
            size: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            entry,
        };
        let wh = Entry {
            kind: Kind::Whiteout,
            object: None,
            ..file("")
        };
        upper.insert("a".to_string(), seen(wh.clone()));
        upper.insert("in-base".to_string(), seen(wh.clone()));
        let dir = Entry {
            kind: Kind::Dir,
            opaque: true,
            object: None,
            ..file("")
        };
        upper.insert("d".to_string(), seen(dir));
        upper.insert("d/new".to_string(), seen(file("n")));
        upper.insert("f".to_string(), seen(file("now-a-file")));
        let m = merge(&parent, &upper, base.path());
        let keys: Vec<&str> = m.entries.keys().map(String::as_str).collect();
        assert_eq!(keys, ["d", "d/new", "e/z", "f", "in-base"]);
        assert_eq!(m.entries["in-base"].kind, Kind::Whiteout);
    }
}
