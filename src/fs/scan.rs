//! The scan of the overlay upper dir, the frozen part of a capture: one
//! `fstatat` per entry, and an in-kernel copy of each file whose (inode,
//! size, mtime, ctime) differ from what the last capture saw. Its output is
//! a [`Delta`] against that cache: what changed, what is gone. Unchanged
//! entries cost the `fstatat`, a hash lookup and nothing else (no allocation,
//! no copy), so a capture's cost follows what changed.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, OsStr};
use std::fs::{self, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};

use nix::fcntl::AtFlags;
use nix::sys::stat::{FileStat, SFlag, fstatat};
use serde::{Deserialize, Serialize};

use super::manifest::{self, Entry, Kind, Manifest};
use super::store::{Meta, Staged, Store};
use super::{FsError, io_err};

/// Overlay's own xattrs: interpreted, never recorded as file xattrs.
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

fn errno<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::errno::Errno) -> FsError + 'a {
    move |e| io_err(op, path)(e.into())
}

/// What a capture learned about an upper entry: while its inode, size,
/// mtime and ctime are unchanged, so is its entry (any chmod, chown, xattr
/// or content change moves ctime), content object included.
#[derive(Debug)]
pub struct Seen {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub entry: Entry,
    /// The last scan that met this path (see [`Tracked::epoch`]).
    visited: AtomicU32,
}

/// path → what the last capture saw.
pub type ScanCache = HashMap<String, Seen, rustc_hash::FxBuildHasher>;

/// What the environment knows about its current upper dir between captures.
#[derive(Debug, Default)]
pub struct Tracked {
    pub seen: ScanCache,
    /// Bumped by every scan; a cached path whose `visited` stamp is older
    /// than the scan that just ran is gone from the upper dir.
    epoch: u32,
    /// The last capture's manifest (its merge of `seen` onto the mounted
    /// layer), the starting point of the next one.
    pub merged: Option<Manifest>,
}

/// Counters of one scan.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct ScanStats {
    pub entries: u64,
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    pub files_cached: u64,
}

/// What changed in the upper dir since the cache was made.
#[derive(Debug, Default)]
pub struct Delta {
    /// New or changed entries; files have no object until their staged copy
    /// is committed.
    pub changed: Vec<(String, Seen)>,
    /// Staged copies of changed files, by index into `changed`.
    pub staged: Vec<(usize, Staged)>,
    /// Changed files still to stage: (index into `changed`, path, metadata).
    to_stage: Vec<(usize, PathBuf, Meta)>,
    /// Cached paths no longer in the upper dir (filled by [`Tracked::removed`]).
    pub removed: Vec<String>,
    pub stats: ScanStats,
    /// Cached paths the scan met, changed or not.
    met: u64,
    epoch: u32,
    /// Wall-clock time (ns since the epoch) when the scan started.
    started_ns: i64,
}

/// Timestamps come from a coarse clock (one tick: 1–10 ms), so a file
/// written again within the tick of a write the scan saw could keep its
/// ctime, size and mtime. An entry whose ctime is this close to the scan
/// ("racy", as git calls it) is not trusted by the next scan.
const RACY_NS: i64 = 50_000_000;

/// Never equal to a real ctime: the next scan reads the entry again.
const UNTRUSTED: i64 = i64::MIN;

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// The cache as saved at a clean shutdown (`env/scan-cache.zst`).
#[derive(Serialize, Deserialize)]
struct Saved {
    /// The upper dir generation it describes.
    generation: u64,
    entries: Vec<(String, u64, u64, i64, i64, Entry)>,
}

impl Tracked {
    /// The cache, compressed, for [`Tracked::load`] at the next start.
    pub fn save(&self, generation: u64) -> Vec<u8> {
        let saved = Saved {
            generation,
            entries: self
                .seen
                .iter()
                .map(|(p, s)| {
                    (
                        p.clone(),
                        s.ino,
                        s.size,
                        s.mtime_ns,
                        s.ctime_ns,
                        s.entry.clone(),
                    )
                })
                .collect(),
        };
        let json = serde_json::to_vec(&saved).unwrap_or_default();
        zstd::encode_all(&json[..], 1).unwrap_or_default()
    }

    /// A saved cache, if it describes upper dir `generation`. Safe even if
    /// the tree changed while the daemon was down: every entry is checked
    /// against a fresh `fstatat` (a change moves ctime, which nobody can set
    /// back) before it is trusted.
    pub fn load(bytes: &[u8], generation: u64) -> Option<Tracked> {
        let json = zstd::decode_all(bytes).ok()?;
        let saved: Saved = serde_json::from_slice(&json).ok()?;
        if saved.generation != generation {
            return None;
        }
        let mut seen = ScanCache::with_capacity_and_hasher(saved.entries.len(), Default::default());
        for (p, ino, size, mtime_ns, ctime_ns, entry) in saved.entries {
            seen.insert(
                p,
                Seen {
                    ino,
                    size,
                    mtime_ns,
                    ctime_ns,
                    entry,
                    visited: AtomicU32::new(0),
                },
            );
        }
        Some(Tracked {
            seen,
            epoch: 0,
            merged: None,
        })
    }

    /// Fills `delta.removed`: the cached paths the scan did not meet. Costs
    /// nothing when every cached path was met.
    pub fn find_removed(&self, delta: &mut Delta) {
        if delta.met == self.seen.len() as u64 {
            return;
        }
        delta.removed = self
            .seen
            .iter()
            .filter(|(_, s)| s.visited.load(Ordering::Relaxed) != delta.epoch)
            .map(|(p, _)| p.clone())
            .collect();
    }

    /// Every upper entry as the scan found it: the cache with the delta applied.
    pub fn upper_after<'a>(
        &'a self,
        delta: &'a Delta,
    ) -> impl Iterator<Item = (&'a str, &'a Entry)> {
        let changed: std::collections::HashSet<&str> =
            delta.changed.iter().map(|(p, _)| p.as_str()).collect();
        self.seen
            .iter()
            .filter(move |(p, s)| {
                s.visited.load(Ordering::Relaxed) == delta.epoch && !changed.contains(p.as_str())
            })
            .map(|(p, s)| (p.as_str(), &s.entry))
            .chain(delta.changed.iter().map(|(p, s)| (p.as_str(), &s.entry)))
    }

    /// Makes the delta (of a capture that completed) part of the cache.
    pub fn apply(&mut self, delta: Delta, merged: Manifest) {
        for p in &delta.removed {
            self.seen.remove(p);
        }
        for (p, mut s) in delta.changed {
            s.visited.store(delta.epoch, Ordering::Relaxed);
            if s.ctime_ns >= delta.started_ns - RACY_NS {
                s.ctime_ns = UNTRUSTED;
            }
            self.seen.insert(p, s);
        }
        self.merged = Some(merged);
    }

    /// Makes a scan taken outside a capture (nothing published) part of
    /// the cache. The next capture merges in full.
    pub fn warm(&mut self, delta: Delta) {
        self.apply(delta, Manifest::default());
        self.merged = None;
    }

    /// The manifest of the upper dir after `delta`, merged onto `parent`
    /// (the mounted layer's manifest): an update of the last capture's
    /// manifest when the delta allows it, a full merge otherwise.
    pub fn merge(&self, delta: &Delta, parent: &Manifest, base: &Path) -> Manifest {
        let incremental = self.merged.as_ref().and_then(|prev| {
            manifest::apply_delta(
                prev,
                parent,
                delta
                    .changed
                    .iter()
                    .map(|(p, s)| (p.as_str(), self.seen.get(p).map(|o| &o.entry), &s.entry)),
                delta
                    .removed
                    .iter()
                    .filter_map(|p| Some((p.as_str(), &self.seen.get(p)?.entry))),
            )
        });
        let full = || manifest::merge(parent, self.upper_after(delta), base, self.merged.as_ref());
        tracing::debug!(
            changed = delta.changed.len(),
            removed = delta.removed.len(),
            incremental = incremental.is_some(),
            "manifest merged"
        );
        match incremental {
            Some(m) => {
                // Every capture of the debug-built test suite checks the
                // update against the full merge.
                debug_assert_eq!(m.to_map(), full().to_map(), "incremental merge diverged");
                m
            }
            None => full(),
        }
    }
}

/// Scans the upper dir against `tracked` (directories shared out to
/// `threads` workers). Changed files are only staged (copied, not hashed).
pub fn scan_upper(
    upper: &Path,
    store: &Store,
    tracked: &mut Tracked,
    threads: usize,
) -> Result<Delta, FsError> {
    scan_upper_at(upper, store, tracked, threads, now_ns())
}

/// [`scan_upper`] with the clock given (ns since the epoch).
fn scan_upper_at(
    upper: &Path,
    store: &Store,
    tracked: &mut Tracked,
    threads: usize,
    started_ns: i64,
) -> Result<Delta, FsError> {
    tracked.epoch = tracked.epoch.wrapping_add(1);
    let epoch = tracked.epoch;
    let cache = &tracked.seen;
    // (directories to scan, workers busy)
    let queue: Mutex<(Vec<(PathBuf, String)>, usize)> =
        Mutex::new((vec![(upper.to_owned(), String::new())], 0));
    let ready = Condvar::new();
    let worker = || -> Result<Delta, FsError> {
        let mut out = Delta {
            epoch,
            ..Delta::default()
        };
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
                        return Ok(out);
                    }
                    q = ready.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let result = scan_dir(&dir, &rel, cache, epoch, &mut out);
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
    let results: Vec<Result<Delta, FsError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1)).map(|_| scope.spawn(worker)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(FsError::Corrupt("scan worker panicked".into())))
            })
            .collect()
    });
    let mut all = Delta {
        epoch,
        started_ns,
        ..Delta::default()
    };
    for r in results {
        let part = r?;
        let offset = all.changed.len();
        all.changed.extend(part.changed);
        all.to_stage.extend(
            part.to_stage
                .into_iter()
                .map(|(i, p, m)| (i + offset, p, m)),
        );
        all.met += part.met;
        all.stats.entries += part.stats.entries;
        all.stats.files_hashed += part.stats.files_hashed;
        all.stats.bytes_hashed += part.stats.bytes_hashed;
        all.stats.files_cached += part.stats.files_cached;
    }
    all.staged = stage_all(store, std::mem::take(&mut all.to_stage), threads)?;
    Ok(all)
}

/// Copies the changed files into the store's temp dir, on `threads` workers
/// (changes often cluster in one directory, which one scan worker lists).
fn stage_all(
    store: &Store,
    files: Vec<(usize, PathBuf, Meta)>,
    threads: usize,
) -> Result<Vec<(usize, Staged)>, FsError> {
    // On an error, the copies already made stay in the store's temp dir
    // until the failed capture cleans it.
    super::par_map(files, threads, "stage", |(i, path, meta)| {
        Ok((i, store.stage_file(&path, &meta)?))
    })
}

fn ns(secs: i64, nsec: i64) -> i64 {
    secs * 1_000_000_000 + nsec
}

fn kind_of(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Scans one directory's entries into `out`; returns its subdirectories.
fn scan_dir(
    dir: &Path,
    rel: &str,
    cache: &ScanCache,
    epoch: u32,
    out: &mut Delta,
) -> Result<Vec<(PathBuf, String)>, FsError> {
    let fd: OwnedFd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(io_err("open", dir))?
        .into();
    // Listing and stat share the directory (the listing owns a duplicate).
    let listing = fd.try_clone().map_err(io_err("dup", dir))?;
    let mut listing = nix::dir::Dir::from_fd(listing).map_err(errno("read dir", dir))?;
    let mut subdirs = Vec::new();
    // The relative path of the current entry, reused: only a change allocates.
    let mut rel_path = String::with_capacity(rel.len() + 64);
    rel_path.push_str(rel);
    if !rel.is_empty() {
        rel_path.push('/');
    }
    let prefix = rel_path.len();
    for item in listing.iter() {
        let item = item.map_err(errno("read dir", dir))?;
        let name: &CStr = item.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        rel_path.truncate(prefix);
        manifest::push_encoded(&mut rel_path, bytes);
        let st = fstatat(&fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("stat", &dir.join(OsStr::from_bytes(bytes)))(e.into()))?;
        let kind = kind_of(&st);
        out.stats.entries += 1;
        let (mtime_ns, ctime_ns) = (
            ns(st.st_mtime, st.st_mtime_nsec),
            ns(st.st_ctime, st.st_ctime_nsec),
        );
        let cached = cache.get(rel_path.as_str());
        let mut unchanged = false;
        if let Some(seen) = cached {
            seen.visited.store(epoch, Ordering::Relaxed);
            out.met += 1;
            unchanged = seen.ino == st.st_ino
                && seen.size == st.st_size as u64
                && seen.mtime_ns == mtime_ns
                && seen.ctime_ns == ctime_ns;
        }
        if kind == SFlag::S_IFDIR {
            subdirs.push((dir.join(OsStr::from_bytes(bytes)), rel_path.clone()));
        }
        if unchanged {
            if kind == SFlag::S_IFREG {
                out.stats.files_cached += 1;
            }
            continue;
        }
        let path = dir.join(OsStr::from_bytes(bytes));
        let (entry, meta) = read_entry(&path, &st, &mut out.stats)?;
        out.changed.push((
            rel_path.clone(),
            Seen {
                ino: st.st_ino,
                size: st.st_size as u64,
                mtime_ns,
                ctime_ns,
                entry,
                visited: AtomicU32::new(epoch),
            },
        ));
        if let Some(meta) = meta {
            out.to_stage.push((out.changed.len() - 1, path, meta));
        }
    }
    Ok(subdirs)
}

fn xattrs_of(path: &Path) -> Result<(BTreeMap<String, String>, bool), FsError> {
    let mut out = BTreeMap::new();
    let mut opaque = false;
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
            out.insert(n.to_owned(), super::store::hex(&v));
        }
    }
    Ok((out, opaque))
}

/// Reads one upper entry the cache does not cover; for a file, also the
/// metadata its store object will carry (its content is staged later).
fn read_entry(
    path: &Path,
    st: &FileStat,
    stats: &mut ScanStats,
) -> Result<(Entry, Option<Meta>), FsError> {
    let kind = kind_of(st);
    let base = |kind| Entry {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
        ..Entry::new(kind)
    };
    let entry = if kind == SFlag::S_IFCHR && st.st_rdev == 0 {
        base(Kind::Whiteout)
    } else if kind == SFlag::S_IFDIR {
        let (xattrs, opaque) = xattrs_of(path)?;
        Entry {
            xattrs,
            opaque,
            ..base(Kind::Dir)
        }
    } else if kind == SFlag::S_IFLNK {
        // (user xattrs are not allowed on symlinks)
        let target = fs::read_link(path).map_err(io_err("readlink", path))?;
        Entry {
            target: Some(manifest::encode_path(target.as_os_str().as_bytes())),
            ..base(Kind::Symlink)
        }
    } else if kind == SFlag::S_IFREG {
        let (xattrs, _) = xattrs_of(path)?;
        let mut e = Entry {
            xattrs,
            size: st.st_size as u64,
            ..base(Kind::File)
        };
        if st.st_nlink > 1 {
            e.link = Some(st.st_ino);
        }
        stats.files_hashed += 1;
        stats.bytes_hashed += e.size;
        let meta = e.meta();
        return Ok((e, Some(meta)));
    } else {
        let kind = match kind {
            SFlag::S_IFIFO => Kind::Fifo,
            SFlag::S_IFCHR => Kind::Char,
            SFlag::S_IFBLK => Kind::Block,
            _ => Kind::Socket,
        };
        Entry {
            rdev: st.st_rdev,
            ..base(kind)
        }
    };
    Ok((entry, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(dir: &Path, store: &Store, t: &mut Tracked, now: i64) -> Delta {
        let mut d = scan_upper_at(dir, store, t, 2, now).unwrap();
        for (i, staged) in std::mem::take(&mut d.staged) {
            d.changed[i].1.entry.object = Some(store.commit(staged).unwrap());
        }
        t.find_removed(&mut d);
        let stats = Delta {
            changed: d
                .changed
                .iter()
                .map(|(p, _)| (p.clone(), seen_stub()))
                .collect(),
            removed: d.removed.clone(),
            stats: d.stats,
            ..Delta::default()
        };
        t.apply(d, Manifest::default());
        stats
    }

    /// A temp dir with an empty `upper` and a store.
    fn dirs() -> (tempfile::TempDir, PathBuf, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        std::fs::create_dir_all(&upper).unwrap();
        let store = Store::open(&tmp.path().join("store")).unwrap();
        (tmp, upper, store)
    }

    fn seen_stub() -> Seen {
        Seen {
            ino: 0,
            size: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            entry: Entry::new(Kind::File),
            visited: AtomicU32::new(0),
        }
    }

    #[test]
    fn unchanged_entries_are_skipped_changed_and_removed_ones_found() {
        let (_tmp, upper, store) = dirs();
        std::fs::create_dir_all(upper.join("d")).unwrap();
        std::fs::write(upper.join("d/a"), b"a").unwrap();
        std::fs::write(upper.join("b"), b"b").unwrap();
        let mut t = Tracked::default();
        let later = now_ns() + 10_000_000_000; // past the racy window
        let d = capture(&upper, &store, &mut t, later);
        assert_eq!((d.changed.len(), d.stats.files_hashed), (3, 2));
        let d = capture(&upper, &store, &mut t, later);
        assert_eq!(
            (d.changed.len(), d.stats.files_cached),
            (0, 2),
            "nothing changed"
        );
        std::fs::write(upper.join("d/a"), b"a2").unwrap();
        std::fs::remove_file(upper.join("b")).unwrap();
        let d = capture(&upper, &store, &mut t, later + 1);
        let changed: Vec<&str> = d.changed.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(changed, ["d/a"], "only the rewritten file");
        assert_eq!(d.removed, ["b"]);
        assert_eq!(t.seen.len(), 2);
    }

    #[test]
    fn entries_changed_just_before_a_scan_are_read_again_next_time() {
        let (_tmp, upper, store) = dirs();
        std::fs::write(upper.join("hot"), b"1").unwrap();
        let mut t = Tracked::default();
        let now = now_ns();
        assert_eq!(capture(&upper, &store, &mut t, now).stats.files_hashed, 1);
        // Written within the window of that scan: a same-tick rewrite could
        // look unchanged, so the next scan reads it again.
        assert_eq!(
            capture(&upper, &store, &mut t, now).stats.files_hashed,
            1,
            "racy entry trusted"
        );
        // Once a scan starts well after its ctime, it is trusted.
        let later = now + 10_000_000_000;
        assert_eq!(capture(&upper, &store, &mut t, later).stats.files_hashed, 1);
        let d = capture(&upper, &store, &mut t, later);
        assert_eq!((d.stats.files_hashed, d.stats.files_cached), (0, 1));
    }

    #[test]
    fn a_saved_cache_loads_only_for_its_generation() {
        let (_tmp, upper, store) = dirs();
        std::fs::write(upper.join("f"), b"1").unwrap();
        let mut t = Tracked::default();
        capture(&upper, &store, &mut t, now_ns() + 10_000_000_000);
        let bytes = t.save(3);
        assert!(Tracked::load(&bytes, 4).is_none(), "another upper dir");
        let mut loaded = Tracked::load(&bytes, 3).expect("same generation");
        assert_eq!(loaded.seen.len(), 1);
        let d = capture(&upper, &store, &mut loaded, now_ns() + 20_000_000_000);
        assert_eq!(
            (d.stats.files_hashed, d.stats.files_cached),
            (0, 1),
            "trusted after load"
        );
        assert!(Tracked::load(b"garbage", 3).is_none());
    }
}
