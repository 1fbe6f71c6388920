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
//! Each event carries the handle of its directory; the handles a scan
//! records come from `name_to_handle_at`. [`Journal::open`] checks once, on
//! a probe directory of the same filesystem, that the two agree.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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
    /// Why the journal cannot be trusted this time (scan everything).
    pub lost: Option<String>,
}

/// One parsed event: its mask, directory handle and entry name (`.`: the
/// directory itself).
#[derive(Debug, PartialEq, Eq)]
struct Event<'a> {
    mask: u64,
    handle: &'a [u8],
    name: &'a [u8],
}

impl Journal {
    /// A new, empty journal. Fails if fanotify is unavailable (no
    /// `CAP_SYS_ADMIN`, an old kernel, a filesystem without file handles)
    /// or reports handles that `name_to_handle_at` does not give: checked on
    /// a probe directory made (and removed) in `probe_parent`, which must be
    /// on the upper dir's filesystem.
    pub fn open(probe_parent: &Path) -> io::Result<Journal> {
        let group = sys::fanotify_dfid_name()?;
        let probe = probe_parent.join(format!(
            "{}journal-probe-{}",
            crate::durable::TEMP_PREFIX,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&probe);
        std::fs::create_dir(&probe)?;
        let checked = (|| {
            let dir = open_dir(&probe)?;
            sys::fanotify_mark_inode(group.as_fd(), dir.as_fd(), MASK)?;
            let handle = sys::file_handle(dir.as_fd())?;
            std::fs::write(probe.join("probe"), b"")?;
            let mut buf = vec![0u8; 4096];
            let n = nix::unistd::read(&group, &mut buf)?;
            let events = parse(&buf[..n]);
            if events
                .iter()
                .any(|e| e.handle == handle && e.name == b"probe")
            {
                Ok(())
            } else {
                Err(io::Error::other(
                    "fanotify reports directory handles unlike name_to_handle_at's",
                ))
            }
        })();
        let _ = std::fs::remove_dir_all(&probe);
        checked?;
        let mut j = Journal {
            group,
            dirs: HashMap::new(),
        };
        // The probe's own remaining events (its removal).
        let _ = j.drain();
        j.dirs.clear();
        Ok(j)
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
                self.fold(&e, &mut dirty);
            }
        }
        dirty
    }

    /// What one event means for the next scan.
    fn fold(&mut self, e: &Event<'_>, dirty: &mut Dirty) {
        if e.mask & libc::FAN_Q_OVERFLOW != 0 {
            dirty.lost = Some("the journal's queue overflowed".into());
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
        if e.mask & libc::FAN_ONDIR != 0 {
            if e.mask & (libc::FAN_DELETE | libc::FAN_MOVED_FROM) != 0 {
                self.dirs.retain(|_, p| !is_within(p, &path));
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

/// Whether encoded path `p` is `dir` or under it.
pub fn is_within(p: &str, dir: &str) -> bool {
    p.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
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
            if dfid && rec.len() >= 20 {
                let hb = u32_at(rec, 12) as usize;
                if 20 + hb <= rec.len() {
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
        out.push(Event { mask, handle, name });
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
                if let Ok(target) = std::fs::read_link(&link) {
                    match place(&target) {
                        Some(rel) => out.open.push(rel),
                        None => unplaced(&target, &mut out),
                    }
                }
            }
        }
        let Ok(maps) = std::fs::read(base.join("maps")) else {
            continue;
        };
        for line in maps.split(|&b| b == b'\n') {
            let Some((dev, path)) = shared_writable(line) else {
                continue;
            };
            let path = Path::new(OsStr::from_bytes(path));
            match place(path) {
                Some(rel) => out.mapped.push(rel),
                None if dev == env_dev => unplaced(path, &mut out),
                None => {}
            }
        }
    }
    out
}

/// The device and path of a `maps` line that maps a file shared and
/// writable (`rw?s`); deleted files are no one's concern.
fn shared_writable(line: &[u8]) -> Option<(u64, &[u8])> {
    // start-end perms offset dev inode path
    let mut f = line.splitn(6, |&b| b == b' ');
    let _range = f.next()?;
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
    if !path.starts_with(b"/") || path.ends_with(b" (deleted)") {
        return None;
    }
    Some((dev, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event as the kernel lays it out.
    fn event(mask: u64, handle: &[u8], name: &[u8]) -> Vec<u8> {
        let mut rec = vec![libc::FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 0, 0];
        rec.extend_from_slice(&[7u8; 8]); // fsid
        rec.extend_from_slice(&((handle.len() - 4) as u32).to_ne_bytes());
        rec.extend_from_slice(handle);
        rec.extend_from_slice(name);
        rec.push(0);
        while rec.len() % 4 != 0 {
            rec.push(0);
        }
        let rec_len = rec.len() as u16;
        rec[2..4].copy_from_slice(&rec_len.to_ne_bytes());
        let mut ev = vec![0u8; 24];
        ev[0..4].copy_from_slice(&((24 + rec.len()) as u32).to_ne_bytes());
        ev[4] = 3;
        ev[6..8].copy_from_slice(&24u16.to_ne_bytes());
        ev[8..16].copy_from_slice(&mask.to_ne_bytes());
        ev[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        ev.extend_from_slice(&rec);
        ev
    }

    #[test]
    fn events_parse_and_fold_into_paths_and_subtrees() {
        let (root, sub) = (vec![1, 0, 0, 0, 9, 9], vec![1, 0, 0, 0, 8, 8]);
        let mut buf = event(libc::FAN_MODIFY, &sub, b"f");
        buf.extend(event(libc::FAN_CREATE | libc::FAN_ONDIR, &root, b"new"));
        buf.extend(event(libc::FAN_ATTRIB, &sub, b"g"));
        buf.extend(event(libc::FAN_ATTRIB | libc::FAN_ONDIR, &sub, b"."));
        buf.extend(event(libc::FAN_MODIFY, &[1, 0, 0, 0, 5, 5], b"elsewhere"));
        let events = parse(&buf);
        assert_eq!(events.len(), 5);
        assert_eq!(
            events[0],
            Event {
                mask: libc::FAN_MODIFY,
                handle: &sub,
                name: b"f"
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
        j.learn(root, String::new());
        j.learn(sub, "d".into());
        let mut dirty = Dirty::default();
        for e in &events {
            j.fold(e, &mut dirty);
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
        let mut moved = Dirty::default();
        j.fold(
            &Event {
                mask: libc::FAN_MOVED_FROM,
                handle: &[1, 0, 0, 0, 8, 8],
                name: b"f",
            },
            &mut moved,
        );
        assert!(
            moved.paths.contains_key("d"),
            "an entry moved out changes its dir"
        );
        // A directory moved away is forgotten with what is under it.
        j.fold(
            &Event {
                mask: libc::FAN_MOVED_FROM | libc::FAN_ONDIR,
                handle: &[1, 0, 0, 0, 9, 9],
                name: b"d",
            },
            &mut dirty,
        );
        assert_eq!(j.watched(), 1);
        j.fold(
            &Event {
                mask: libc::FAN_Q_OVERFLOW,
                handle: &[],
                name: b".",
            },
            &mut dirty,
        );
        assert!(dirty.lost.is_some());
        assert!(is_within("a/b", "a") && is_within("a", "a") && !is_within("ab", "a"));
        // Truncated input ends the parse instead of misreading.
        assert_eq!(parse(&buf[..30]).len(), 0);
    }

    #[test]
    fn maps_lines_shared_and_writable() {
        let line = b"7f00-7f10 rw-s 00000000 00:2a 1234   /srv/env/db/data.mdb";
        assert_eq!(
            shared_writable(line),
            Some((libc::makedev(0, 0x2a), &b"/srv/env/db/data.mdb"[..]))
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
            shared_writable(b"7f00-7f10 rw-s 00000000 00:01 9 /dev/zero (deleted)"),
            None
        );
        assert_eq!(shared_writable(b"7f00-7f10 rw-s 00000000 00:00 0 "), None);
        assert_eq!(shared_writable(b"garbage"), None);
    }
}
