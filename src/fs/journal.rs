//! The change journal of the overlay upper dir: a fanotify group with a
//! mark on every upper directory, so that a capture reads again only the
//! entries something touched since the last scan instead of calling
//! `fstatat` on the whole tree (the cost of a capture follows what changed).
//!
//! Why it sees every change. Whatever happens in the environment lands in
//! the upper dir through overlayfs, which works on the upper inodes with the
//! ordinary VFS calls, and those report: a write, truncate or fallocate
//! `FAN_MODIFY`, the close of a file opened for writing `FAN_CLOSE_WRITE`,
//! chmod/chown/utimes/xattrs `FAN_ATTRIB`, and creates, deletes and renames
//! (copy-ups and whiteouts are creates and renames into an upper directory)
//! the directory events. A scan marks each directory before it lists it, so
//! nothing can change in a scanned directory unreported. A directory that
//! appears later (created, moved in, copied up) is reported by its parent
//! and listed in full at the next capture, which marks it; a moved directory
//! is forgotten at its old path and listed again at the new one, so events
//! of directories no longer known are dropped (they are outside the upper
//! dir, in overlay's work dir, or under a directory to be listed again).
//!
//! What does not report: stores through a shared writable mapping. The
//! capture asks [`held`] which files the frozen processes hold open for
//! writing or map shared and writable: those are read again (a mapped file
//! at this capture and the next, since a page already dirty takes further
//! writes without moving mtime). Anything else the journal cannot account
//! for — a lost event (queue overflow), a held file outside the known
//! paths — makes the capture scan the whole tree, as without a journal.
//!
//! Each event carries the handle of its directory (the handles a scan
//! records come from `name_to_handle_at`) and that of the object itself: a
//! write through an open file whose name is gone (a removed hard link, an
//! `O_TMPFILE` linked in later) still names its inode, and the scan reads
//! the paths the cache has for that inode.
//!
//! Overlayfs reports writes on the upper files only since Linux 6.5 (before,
//! it opened them `FMODE_NONOTIFY`). [`Journal::open`] therefore checks once
//! per filesystem, on a throwaway overlay mount made beside the upper dir,
//! that a write through overlayfs reports on the upper dir, with the handle
//! `name_to_handle_at` gives; otherwise there is no journal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;

use super::manifest;

use crate::sys;

/// What the marks report (on a directory and its entries).
const MASK: u64 = libc::FAN_MODIFY
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_ATTRIB
    | libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_ONDIR
    | libc::FAN_EVENT_ON_CHILD;

/// Events that mean content was (or may have been) written.
const WRITTEN: u64 = libc::FAN_MODIFY | libc::FAN_CLOSE_WRITE;

/// A fanotify group watching the upper dir's directories.
#[derive(Debug)]
pub struct Journal {
    group: OwnedFd,
    /// Directory handle → its path relative to the upper dir (encoded as
    /// manifest paths are; `""`: the upper dir).
    dirs: HashMap<Vec<u8>, String>,
}

/// What the journal says to read again, relative to the upper dir.
#[derive(Debug, Default)]
pub struct Dirty {
    /// Entries to read again; `true`: content was written (read it even if
    /// its stat looks unchanged).
    pub paths: HashMap<String, bool>,
    /// Directories that appeared: list them in full.
    pub subtrees: HashSet<String>,
    /// Handles of the objects written (see [`Journal`]'s doc on hard links).
    pub written: HashSet<Vec<u8>>,
    /// Why the journal cannot be trusted this time (scan everything).
    pub lost: Option<String>,
}

/// One parsed event: its mask, directory handle, entry name (`.`: the
/// directory itself) and the object's own handle (empty if not reported).
#[derive(Debug, PartialEq, Eq)]
struct Event<'a> {
    mask: u64,
    handle: &'a [u8],
    name: &'a [u8],
    object: &'a [u8],
}

impl Journal {
    /// A new, empty journal. Fails if fanotify is unavailable (no
    /// `CAP_SYS_ADMIN`, an old kernel, a filesystem without file handles),
    /// or if the probe made in `probe_parent` (on the upper dir's
    /// filesystem) finds that writes through overlayfs go unreported there.
    pub fn open(probe_parent: &Path) -> io::Result<Journal> {
        let group = sys::fanotify_dfid_name()?;
        probe(probe_parent)?;
        Ok(Journal {
            group,
            dirs: HashMap::new(),
        })
    }

    /// Marks directory `dir` (open); returns its handle for [`Journal::learn`].
    /// Call before listing it.
    pub fn watch(&self, dir: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
        sys::fanotify_mark_inode(self.group.as_fd(), dir, MASK)?;
        sys::file_handle(dir)
    }

    /// Records where a watched directory is (relative to the upper dir).
    pub fn learn(&mut self, handle: Vec<u8>, rel: String) {
        self.dirs.insert(handle, rel);
    }

    /// Reads every queued event and says what they touched.
    pub fn drain(&mut self) -> Dirty {
        let mut dirty = Dirty::default();
        // Directories deleted or moved away: forgotten once, at the end (an
        // event between still resolves to the old path, which is harmless).
        let mut gone = HashSet::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match nix::unistd::read(&self.group, &mut buf) {
                Ok(0) | Err(nix::errno::Errno::EAGAIN) => break,
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    dirty.lost = Some(format!("reading the journal: {e}"));
                    break;
                }
            };
            for e in parse(&buf[..n]) {
                self.fold(&e, &mut dirty, &mut gone);
            }
        }
        self.forget(&gone);
        dirty
    }

    /// Forgets the directories at (or under) the paths `gone`.
    fn forget(&mut self, gone: &HashSet<String>) {
        if !gone.is_empty() {
            self.dirs
                .retain(|_, p| !gone.contains(p.as_str()) && !under_any(p, gone));
        }
    }

    /// What one event means for the next scan.
    fn fold(&self, e: &Event<'_>, dirty: &mut Dirty, gone: &mut HashSet<String>) {
        if e.mask & libc::FAN_Q_OVERFLOW != 0 {
            dirty.lost = Some("the journal's queue overflowed".into());
            return;
        }
        if e.handle.is_empty() {
            dirty.lost = Some("an event came without its directory".into());
            return;
        }
        let Some(dir) = self.dirs.get(e.handle).cloned() else {
            return; // not (or no longer) a known upper directory: see the module doc
        };
        if e.name == b"." {
            if !dir.is_empty() {
                dirty.paths.entry(dir).or_default();
            }
            return;
        }
        // An entry added, removed or renamed moves the directory's mtime.
        let dirent =
            libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO;
        if e.mask & dirent != 0 && !dir.is_empty() {
            dirty.paths.entry(dir.clone()).or_default();
        }
        let mut path = dir;
        if !path.is_empty() {
            path.push('/');
        }
        manifest::push_encoded(&mut path, e.name);
        let written = e.mask & WRITTEN != 0;
        if written && !e.object.is_empty() {
            dirty.written.insert(e.object.to_vec());
        }
        if e.mask & libc::FAN_ONDIR != 0 {
            if e.mask & (libc::FAN_DELETE | libc::FAN_MOVED_FROM) != 0 {
                gone.insert(path.clone());
            }
            if e.mask & (libc::FAN_CREATE | libc::FAN_MOVED_TO) != 0 {
                dirty.subtrees.insert(path.clone());
            }
        }
        let w = dirty.paths.entry(path).or_default();
        *w |= written;
    }

    /// Directories known (for tests and logs).
    pub fn watched(&self) -> usize {
        self.dirs.len()
    }
}

/// Whether a strict ancestor of encoded path `p` is in `dirs`.
pub fn under_any(p: &str, dirs: &HashSet<String>) -> bool {
    // A few dirs: compare each as a prefix (hashing every prefix of a
    // long, deep path costs its length times its depth).
    if dirs.len() <= 16 {
        return dirs.iter().any(|d| {
            p.len() > d.len() && p.as_bytes()[d.len()] == b'/' && p.starts_with(d.as_str())
        });
    }
    p.match_indices('/').any(|(i, _)| dirs.contains(&p[..i]))
}

/// Probe results by filesystem (device): the kernel and the filesystem
/// decide, not the directory.
static PROBED: Mutex<BTreeMap<u64, Result<(), String>>> = Mutex::new(BTreeMap::new());

/// Checks, once per filesystem, that a write through overlayfs to a file
/// of an upper dir in `parent` reports `FAN_MODIFY` on the upper dir's mark,
/// with the directory handle `name_to_handle_at` gives.
fn probe(parent: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(parent)?.dev();
    let mut probed = PROBED.lock().unwrap_or_else(|e| e.into_inner());
    let result = probed
        .entry(dev)
        .or_insert_with(|| probe_overlay(parent).map_err(|e| e.to_string()));
    result.clone().map_err(io::Error::other)
}

fn probe_dir(parent: &Path) -> std::path::PathBuf {
    parent.join(format!(
        "{}journal-probe-{}",
        crate::durable::TEMP_PREFIX,
        std::process::id()
    ))
}

/// Removes the probe dirs a crash left in `parent` (detaching their mount
/// first: a dir with a mount on it cannot be removed).
pub fn clean_probes(parent: &Path) {
    let prefix = format!("{}journal-probe-", crate::durable::TEMP_PREFIX);
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            remove_probe(&e.path());
        }
    }
}

fn remove_probe(dir: &Path) {
    let _ = nix::mount::umount2(&dir.join("merged"), nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(dir);
}

fn probe_overlay(parent: &Path) -> io::Result<()> {
    let dir = probe_dir(parent);
    remove_probe(&dir);
    let [lower, upper, work, merged] = ["lower", "upper", "work", "merged"].map(|d| dir.join(d));
    for d in [&lower, &upper, &work, &merged] {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(upper.join("f"), b"")?;
    let checked = super::mount_overlay(&[lower], &upper, &work, &merged)
        .map_err(io::Error::other)
        .and_then(|()| {
            let group = sys::fanotify_dfid_name()?;
            let up = open_dir(&upper)?;
            sys::fanotify_mark_inode(group.as_fd(), up.as_fd(), MASK)?;
            let handle = sys::file_handle(up.as_fd())?;
            std::fs::OpenOptions::new()
                .append(true)
                .open(merged.join("f"))?
                .write_all(b"x")?;
            let mut buf = vec![0u8; 4096];
            let n = nix::unistd::read(&group, &mut buf).unwrap_or(0);
            let events = parse(&buf[..n]);
            let writes: Vec<_> = events
                .iter()
                .filter(|e| e.name == b"f" && e.mask & libc::FAN_MODIFY != 0)
                .collect();
            if writes.is_empty() {
                Err(io::Error::other(
                    "overlayfs does not report writes on its upper dir here (before Linux 6.5)",
                ))
            } else if !writes.iter().any(|e| e.handle == handle) {
                Err(io::Error::other(
                    "fanotify reports directory handles unlike name_to_handle_at's",
                ))
            } else {
                Ok(())
            }
        });
    remove_probe(&dir);
    checked
}

/// Opens a directory (not through a symlink).
pub(super) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)?
        .into())
}

/// Splits a buffer read from a `FAN_REPORT_DFID_NAME` group into events.
/// Malformed input ends the parse (an event is never half-read: the
/// kernel returns whole events).
fn parse(buf: &[u8]) -> Vec<Event<'_>> {
    const META: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= META {
        let ev = &buf[at..];
        let len = u32_at(ev, 0) as usize;
        let meta_len = u16_at(ev, 6) as usize;
        if len < META || len > ev.len() || meta_len < META || meta_len > len {
            break;
        }
        let ev = &ev[..len];
        let mask = u64::from_ne_bytes(ev[8..16].try_into().unwrap_or_default());
        // Info records: header (type, pad, len u16), fsid (8 bytes), then a
        // `struct file_handle` (bytes u32, type i32, f_handle) and, for
        // DFID_NAME, a NUL-terminated name.
        let mut handle: &[u8] = &[];
        let mut name: &[u8] = b".";
        let mut object: &[u8] = &[];
        let mut r = meta_len;
        while len - r >= 4 {
            let kind = ev[r];
            let rec_len = u16_at(ev, r + 2) as usize;
            if rec_len < 4 || r + rec_len > len {
                break;
            }
            let rec = &ev[r..r + rec_len];
            let dfid = kind == libc::FAN_EVENT_INFO_TYPE_DFID_NAME
                || kind == libc::FAN_EVENT_INFO_TYPE_DFID;
            if (dfid || kind == libc::FAN_EVENT_INFO_TYPE_FID) && rec.len() >= 20 {
                let hb = u32_at(rec, 12) as usize;
                if 20 + hb <= rec.len() && kind == libc::FAN_EVENT_INFO_TYPE_FID {
                    object = &rec[16..20 + hb];
                } else if 20 + hb <= rec.len() {
                    handle = &rec[16..20 + hb];
                    if kind == libc::FAN_EVENT_INFO_TYPE_DFID_NAME {
                        let tail = &rec[20 + hb..];
                        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
                        name = &tail[..end];
                    }
                }
            }
            r += rec_len;
        }
        out.push(Event {
            mask,
            handle,
            name,
            object,
        });
        at += len;
    }
    out
}

/// Files of the environment that processes hold where the journal cannot
/// see them change, relative to the environment root.
#[derive(Debug, Default)]
pub struct Held {
    /// Open for writing (their stat is read again).
    pub open: Vec<String>,
    /// Mapped shared and writable (read again in full).
    pub mapped: Vec<String>,
    /// A held file of the environment whose path could not be placed.
    pub unplaced: Option<String>,
}

/// Which files of the environment processes `pids` hold open for writing
/// or map shared and writable, from `/proc/<pid>/fd` and `/proc/<pid>/maps`
/// under `proc`. An environment file is on the overlay's device `env_dev`
/// and shows as a path under `env_root` (under `upper` on the kernels that
/// print the upper file of a mapping). Processes gone meanwhile are skipped.
pub fn held(proc: &Path, pids: &[i32], env_root: &Path, upper: &Path, env_dev: u64) -> Held {
    use std::os::unix::fs::MetadataExt;
    let mut out = Held::default();
    let place = |path: &Path| {
        let rel = path
            .strip_prefix(env_root)
            .or_else(|_| path.strip_prefix(upper))
            .ok()?;
        Some(manifest::encode_path(rel.as_os_str().as_bytes()))
    };
    let unplaced = |path: &Path, out: &mut Held| {
        out.unplaced
            .get_or_insert_with(|| format!("{} is held as an environment file", path.display()));
    };
    for &pid in pids {
        let base = proc.join(pid.to_string());
        if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            for fd in fds.flatten() {
                let link = fd.path();
                // The link's own mode says how the fd was opened.
                let Ok(l) = std::fs::symlink_metadata(&link) else {
                    continue;
                };
                if l.mode() & 0o200 == 0 {
                    continue;
                }
                let Ok(m) = std::fs::metadata(&link) else {
                    continue;
                };
                if !m.is_file() || m.dev() != env_dev {
                    continue;
                }
                let Ok(target) = std::fs::read_link(&link) else {
                    // (an environment file whose path the kernel cannot
                    // print, e.g. longer than PATH_MAX: not placed)
                    unplaced(&link, &mut out);
                    continue;
                };
                if target.as_os_str().as_bytes().ends_with(DELETED) {
                    // Unlinked under that name: irrelevant unless another
                    // name still links it, which no path here tells.
                    if m.nlink() > 0 {
                        unplaced(&target, &mut out);
                    }
                    continue;
                }
                match place(&target) {
                    Some(rel) => out.open.push(rel),
                    None => unplaced(&target, &mut out),
                }
            }
        }
        let Ok(maps) = std::fs::read(base.join("maps")) else {
            continue;
        };
        for line in maps.split(|&b| b == b'\n') {
            let Some((range, dev, path)) = shared_writable(line) else {
                continue;
            };
            let path = Path::new(OsStr::from_bytes(path));
            if let Some(path) = path.as_os_str().as_bytes().strip_suffix(DELETED) {
                let path = Path::new(OsStr::from_bytes(path));
                let file = base.join("map_files").join(OsStr::from_bytes(range));
                let linked = std::fs::metadata(file).is_ok_and(|m| m.nlink() > 0);
                if linked && (dev == env_dev || place(path).is_some()) {
                    unplaced(path, &mut out);
                }
                continue;
            }
            match place(path) {
                Some(rel) => out.mapped.push(rel),
                None if dev == env_dev => unplaced(path, &mut out),
                None => {}
            }
        }
    }
    out
}

/// How `/proc` marks the path of a file unlinked since it was opened.
const DELETED: &[u8] = b" (deleted)";

/// The address range, device and path of a `maps` line that maps a file
/// shared and writable (`rw?s`).
fn shared_writable(line: &[u8]) -> Option<(&[u8], u64, &[u8])> {
    // start-end perms offset dev inode path
    let mut f = line.splitn(6, |&b| b == b' ');
    let range = f.next()?;
    let perms = f.next()?;
    if perms.len() < 4 || perms[1] != b'w' || perms[3] != b's' {
        return None;
    }
    let _offset = f.next()?;
    let dev = std::str::from_utf8(f.next()?).ok()?;
    let (major, minor) = dev.split_once(':')?;
    let dev = libc::makedev(
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
    );
    let _inode = f.next()?;
    let path = f.next()?.trim_ascii_start();
    if !path.starts_with(b"/") {
        return None;
    }
    Some((range, dev, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One info record: header, fsid, `struct file_handle`, name.
    fn record(kind: u8, handle: &[u8], name: Option<&[u8]>) -> Vec<u8> {
        let mut rec = vec![kind, 0, 0, 0];
        rec.extend_from_slice(&[7u8; 8]); // fsid
        rec.extend_from_slice(&((handle.len() - 4) as u32).to_ne_bytes());
        rec.extend_from_slice(handle);
        if let Some(name) = name {
            rec.extend_from_slice(name);
            rec.push(0);
        }
        while rec.len() % 4 != 0 {
            rec.push(0);
        }
        let rec_len = rec.len() as u16;
        rec[2..4].copy_from_slice(&rec_len.to_ne_bytes());
        rec
    }

    /// One event as the kernel lays it out (a FID record when `object`).
    fn event(mask: u64, handle: &[u8], name: &[u8], object: Option<&[u8]>) -> Vec<u8> {
        let mut recs = record(libc::FAN_EVENT_INFO_TYPE_DFID_NAME, handle, Some(name));
        if let Some(object) = object {
            recs.extend(record(libc::FAN_EVENT_INFO_TYPE_FID, object, None));
        }
        let mut ev = vec![0u8; 24];
        ev[0..4].copy_from_slice(&((24 + recs.len()) as u32).to_ne_bytes());
        ev[4] = 3;
        ev[6..8].copy_from_slice(&24u16.to_ne_bytes());
        ev[8..16].copy_from_slice(&mask.to_ne_bytes());
        ev[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        ev.extend_from_slice(&recs);
        ev
    }

    fn ev<'a>(mask: u64, handle: &'a [u8], name: &'a [u8]) -> Event<'a> {
        Event {
            mask,
            handle,
            name,
            object: &[],
        }
    }

    #[test]
    fn events_parse_and_fold_into_paths_and_subtrees() {
        let (root, sub) = (vec![1, 0, 0, 0, 9, 9], vec![1, 0, 0, 0, 8, 8]);
        let file = [1u8, 0, 0, 0, 4, 4, 4, 4];
        let mut buf = event(libc::FAN_MODIFY, &sub, b"f", Some(&file));
        buf.extend(event(
            libc::FAN_CREATE | libc::FAN_ONDIR,
            &root,
            b"new",
            None,
        ));
        buf.extend(event(libc::FAN_ATTRIB, &sub, b"g", None));
        buf.extend(event(libc::FAN_ATTRIB | libc::FAN_ONDIR, &sub, b".", None));
        buf.extend(event(
            libc::FAN_MODIFY,
            &[1, 0, 0, 0, 5, 5],
            b"elsewhere",
            None,
        ));
        let events = parse(&buf);
        assert_eq!(events.len(), 5);
        assert_eq!(
            events[0],
            Event {
                mask: libc::FAN_MODIFY,
                handle: &sub,
                name: b"f",
                object: &file,
            }
        );
        let group = sys::fanotify_dfid_name().or_else(|_| {
            // Without CAP_SYS_ADMIN any fd does for the fold.
            std::fs::File::open("/dev/null").map(OwnedFd::from)
        });
        let mut j = Journal {
            group: group.unwrap(),
            dirs: HashMap::new(),
        };
        j.learn(root.clone(), String::new());
        j.learn(sub.clone(), "d".into());
        let mut dirty = Dirty::default();
        let mut gone = HashSet::new();
        for e in &events {
            j.fold(e, &mut dirty, &mut gone);
        }
        assert_eq!(dirty.paths.get("d/f"), Some(&true), "written");
        assert_eq!(dirty.paths.get("d/g"), Some(&false), "attributes only");
        assert_eq!(dirty.paths.get("d"), Some(&false), "the dir itself");
        assert!(dirty.subtrees.contains("new"));
        assert_eq!(
            dirty.paths.len(),
            4,
            "the unknown directory's event is dropped"
        );
        assert!(dirty.written.contains(&file[..]), "the written object");
        let mut moved = Dirty::default();
        j.fold(&ev(libc::FAN_MOVED_FROM, &sub, b"f"), &mut moved, &mut gone);
        assert!(
            moved.paths.contains_key("d"),
            "an entry moved out changes its dir"
        );
        // A directory moved away is forgotten with what is under it.
        j.learn(vec![1, 0, 0, 0, 7, 7], "d/deeper".into());
        j.fold(
            &ev(libc::FAN_MOVED_FROM | libc::FAN_ONDIR, &root, b"d"),
            &mut dirty,
            &mut gone,
        );
        j.forget(&gone);
        assert_eq!(j.watched(), 1);
        j.fold(&ev(libc::FAN_Q_OVERFLOW, &[], b"."), &mut dirty, &mut gone);
        assert!(dirty.lost.is_some());
        let mut no_dir = Dirty::default();
        j.fold(&ev(libc::FAN_MODIFY, &[], b"x"), &mut no_dir, &mut gone);
        assert!(no_dir.lost.is_some(), "an event without its directory");
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        assert!(under_any("a/b", &set(&["a"])) && !under_any("a", &set(&["a"])));
        assert!(!under_any("ab/c", &set(&["a"])));
        // Truncated input ends the parse instead of misreading.
        assert_eq!(parse(&buf[..30]).len(), 0);
    }

    #[test]
    fn maps_lines_shared_and_writable() {
        let line = b"7f00-7f10 rw-s 00000000 00:2a 1234   /srv/env/db/data.mdb";
        assert_eq!(
            shared_writable(line),
            Some((
                &b"7f00-7f10"[..],
                libc::makedev(0, 0x2a),
                &b"/srv/env/db/data.mdb"[..]
            ))
        );
        assert_eq!(
            shared_writable(b"7f00-7f10 r--s 00000000 00:2a 1234 /srv/x"),
            None
        );
        assert_eq!(
            shared_writable(b"7f00-7f10 rw-p 00000000 00:2a 1234 /srv/x"),
            None
        );
        assert_eq!(
            shared_writable(b"7f00-7f10 rw-s 00000000 00:01 9 /a (deleted)").map(|m| m.2),
            Some(&b"/a (deleted)"[..])
        );
        assert_eq!(shared_writable(b"7f00-7f10 rw-s 00000000 00:00 0 "), None);
        assert_eq!(shared_writable(b"garbage"), None);
    }
}
