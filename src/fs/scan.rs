//! The scan of the overlay upper dir, the frozen part of a capture: an
//! `fstatat` per entry, and an in-kernel copy of each file whose (inode,
//! size, mtime, ctime) differ from what the last capture saw. Its output is
//! a [`Delta`] against that cache: what changed, what is gone.
//!
//! Two kinds of scan. A full one lists every directory (and marks it in a
//! fresh [`Journal`]); unchanged entries cost the `fstatat` and a hash
//! lookup. An incremental one, when the journal accounts for everything
//! since the last scan that was kept, reads only the entries it names (and
//! lists directories that appeared), so a capture's cost follows what
//! changed, not the size of the tree.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
use serde::{Deserialize, Serialize};

use super::at;
use super::journal::{Dirty, Held, Journal, under_any};
use super::manifest::{self, Entry, Kind, Manifest};
use super::store::{Meta, Staged, Store};
use super::{FsError, io_err};

/// Overlay's own xattrs: interpreted, never recorded as file xattrs.
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// An error about upper entry `rel`, named as the environment sees it
/// (never by the host path of the upper dir).
fn rel_err(op: &'static str, rel: &str) -> impl FnOnce(std::io::Error) -> FsError {
    let path = PathBuf::from(at::shown(rel));
    move |source| FsError::Io { op, path, source }
}

/// Why an entry the scan met is not in the capture: (relative path, reason).
pub type Skipped = BTreeMap<String, String>;

/// The reason given for a file replaced between its stat and its copy.
const RACED: &str = "changed while it was read (read again next time)";

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
    /// The journal of the upper dir since the last full scan.
    journal: Option<Journal>,
    /// The journal cannot work here (said once, not tried again).
    journal_off: bool,
    /// A scan ran whose delta was not applied (its capture failed): what
    /// the journal reported to it is lost, so the next scan is full.
    unsettled: bool,
    /// Paths the next scan reads in full whatever their stat says: mapped
    /// shared and writable at the last kept frozen scan (a dirty page takes
    /// writes without moving mtime), or written according to a journal
    /// drain whose scan was not kept. Replaced when a scan is applied.
    force_pending: HashSet<String>,
    /// What the upper dir holds that the cache (and so a capture) does
    /// not: entries beyond [`at::MAX_DEPTH`] or [`at::MAX_PATH_BYTES`].
    pub skipped: Skipped,
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
    to_stage: Vec<(usize, String, Meta)>,
    /// Everything the upper dir holds that the scan did not record, once
    /// the scan is applied (not only what this scan met).
    pub skipped: Skipped,
    /// Cached paths no longer in the upper dir (filled by [`Tracked::removed`]).
    pub removed: Vec<String>,
    pub stats: ScanStats,
    /// Whether only what the journal named was read (`removed` is then
    /// filled by the scan itself).
    pub incremental: bool,
    /// Directories this scan marked in the journal: (handle, path).
    watched: Vec<(Vec<u8>, String)>,
    /// Why marking a directory failed (the journal is then given up).
    watch_error: Option<String>,
    /// What [`Tracked::force_pending`] becomes if this delta is applied.
    next_force: HashSet<String>,
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
            ..Tracked::default()
        })
    }

    /// Fills `delta.removed`: the cached paths the scan did not meet. Costs
    /// nothing when every cached path was met.
    pub fn find_removed(&self, delta: &mut Delta) {
        if delta.incremental || delta.met == self.seen.len() as u64 {
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
        let changed: HashSet<&str> = delta.changed.iter().map(|(p, _)| p.as_str()).collect();
        let removed: HashSet<&str> = delta.removed.iter().map(String::as_str).collect();
        self.seen
            .iter()
            .filter(move |(p, _)| !changed.contains(p.as_str()) && !removed.contains(p.as_str()))
            .map(|(p, s)| (p.as_str(), &s.entry))
            .chain(delta.changed.iter().map(|(p, s)| (p.as_str(), &s.entry)))
    }

    /// Makes the delta (of a capture that completed) part of the cache.
    pub fn apply(&mut self, mut delta: Delta, merged: Manifest) {
        let next_force = std::mem::take(&mut delta.next_force);
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
        self.unsettled = false;
        self.force_pending = next_force;
        self.skipped = delta.skipped;
    }

    /// Whether the next scan would list the whole upper dir: nothing is
    /// cached, or the change journal is to be (re)started. Such a scan is
    /// best run before freezing (see `Env::warm_scan`).
    pub fn next_scan_is_full(&self) -> bool {
        self.seen.is_empty() || (!self.journal_off && (self.journal.is_none() || self.unsettled))
    }

    /// Directories the journal watches (0: none).
    pub fn journal_dirs(&self) -> usize {
        self.journal.as_ref().map_or(0, Journal::watched)
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
/// `held`: the files frozen processes hold where the journal cannot see
/// them change (see [`super::journal::held`]); `None` for a scan made with
/// services running (before freezing).
pub fn scan_upper(
    upper: &Path,
    store: &Store,
    tracked: &mut Tracked,
    threads: usize,
    held: Option<&Held>,
) -> Result<Delta, FsError> {
    scan_upper_at(upper, store, tracked, threads, held, now_ns())
}

/// [`scan_upper`] with the clock given (ns since the epoch).
fn scan_upper_at(
    upper: &Path,
    store: &Store,
    tracked: &mut Tracked,
    threads: usize,
    held: Option<&Held>,
    started_ns: i64,
) -> Result<Delta, FsError> {
    tracked.epoch = tracked.epoch.wrapping_add(1);
    let epoch = tracked.epoch;
    let none = Held::default();
    let frozen = held.is_some();
    let held = held.unwrap_or(&none);
    // Read in full: what is pending, and what is mapped shared and writable.
    let mut forced = tracked.force_pending.clone();
    forced.extend(held.mapped.iter().cloned());
    let upper_fd = open_dir(upper)?;
    let dirty = match tracked.journal.as_mut() {
        Some(j) if !tracked.unsettled => {
            let d = j.drain();
            // Written paths stay pending until a scan that read them is kept.
            forced.extend(d.paths.iter().filter(|(_, w)| **w).map(|(p, _)| p.clone()));
            let why = d.lost.clone().or_else(|| held.unplaced.clone());
            match why.map_or_else(|| linked_inodes(&upper_fd, &d.written).map(|i| (d, i)), Err) {
                Ok(ok) => Some(ok),
                Err(why) => {
                    tracing::info!(reason = %why, "scanning the whole upper dir");
                    None
                }
            }
        }
        _ => None,
    };
    tracked.force_pending = forced.clone();
    tracked.unsettled = true;
    let mut delta = match dirty {
        Some((dirty, written)) => scan_dirty(
            &upper_fd,
            &tracked.seen,
            tracked.journal.as_ref(),
            dirty,
            &written,
            held,
            &forced,
            &tracked.skipped,
            epoch,
            threads,
        )?,
        None => {
            // A full scan starts a fresh journal: each directory is marked
            // before it is listed.
            tracked.journal = None;
            if !tracked.journal_off {
                match Journal::open(upper.parent().unwrap_or(upper)) {
                    Ok(j) => tracked.journal = Some(j),
                    Err(e) => {
                        tracked.journal_off = true;
                        tracing::info!(error = %e, "no change journal: every capture lists the whole upper dir");
                    }
                }
            }
            let roots = vec![Pending {
                at: Arc::new(upper_fd.try_clone().map_err(rel_err("dup", ""))?),
                name: None,
                rel: String::new(),
                depth: 0,
            }];
            walk(
                roots,
                &tracked.seen,
                tracked.journal.as_ref(),
                &forced,
                epoch,
                threads,
            )?
        }
    };
    if let Some(e) = delta.watch_error.take() {
        tracing::warn!(error = %e, "change journal given up: every capture lists the whole upper dir");
        tracked.journal = None;
        tracked.journal_off = true;
    } else if let Some(j) = tracked.journal.as_mut() {
        for (handle, rel) in delta.watched.drain(..) {
            j.learn(handle, rel);
        }
    }
    delta.epoch = epoch;
    delta.started_ns = started_ns;
    // A frozen scan saw what is mapped now; one with services running
    // cannot tell, so what was forced stays forced.
    delta.next_force = if frozen {
        held.mapped.iter().cloned().collect()
    } else {
        forced
    };
    let staged = stage_all(
        store,
        &upper_fd,
        std::mem::take(&mut delta.to_stage),
        threads,
    )?;
    delta.keep_staged(staged);
    Ok(delta)
}

/// A directory for [`walk`] to list: entry `name` of open directory `at`
/// (`None`: `at` itself), at path `rel`, `depth` levels down. Queued
/// directories share their parent's fd, so a walk holds about as many fds
/// as the tree is deep, and never resolves a long path.
struct Pending {
    at: Arc<OwnedFd>,
    name: Option<Vec<u8>>,
    rel: String,
    depth: usize,
}

/// Lists directories `roots` (dir, its path relative to the upper dir) and
/// everything under them, shared out to `threads` workers; each directory
/// is marked in `journal` before it is listed.
fn walk(
    roots: Vec<Pending>,
    cache: &ScanCache,
    journal: Option<&Journal>,
    forced: &HashSet<String>,
    epoch: u32,
    threads: usize,
) -> Result<Delta, FsError> {
    // (directories to scan, workers busy)
    let queue: Mutex<(Vec<Pending>, usize)> = Mutex::new((roots, 0));
    let ready = Condvar::new();
    let worker = || -> Result<Delta, FsError> {
        let mut out = Delta {
            epoch,
            ..Delta::default()
        };
        loop {
            // Take a directory; stop when none is queued and no worker may add one.
            let dir = {
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
            let result = scan_dir(dir, cache, journal, forced, epoch, &mut out);
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
        ..Delta::default()
    };
    for r in results {
        all.absorb(r?);
    }
    Ok(all)
}

impl Delta {
    /// Gives the scanned files their staged copies. A file replaced between
    /// its stat and its copy (`None`: a scan made with services running, or
    /// a writer outside the environment) leaves the delta: it is skipped,
    /// and the next scan reads it again.
    fn keep_staged(&mut self, staged: Vec<(usize, Option<Staged>)>) {
        let raced: HashSet<usize> = staged
            .iter()
            .filter(|(_, s)| s.is_none())
            .map(|(i, _)| *i)
            .collect();
        if raced.is_empty() {
            self.staged = staged
                .into_iter()
                .filter_map(|(i, s)| Some((i, s?)))
                .collect();
            return;
        }
        let mut index = vec![usize::MAX; self.changed.len()];
        let mut kept = Vec::with_capacity(self.changed.len());
        for (i, (rel, seen)) in std::mem::take(&mut self.changed).into_iter().enumerate() {
            if raced.contains(&i) {
                self.skipped.insert(rel.clone(), RACED.to_owned());
                self.next_force.insert(rel);
            } else {
                index[i] = kept.len();
                kept.push((rel, seen));
            }
        }
        self.changed = kept;
        self.staged = staged
            .into_iter()
            .filter_map(|(i, s)| Some((index[i], s?)))
            .collect();
    }

    /// Adds what another part of the same scan found.
    fn absorb(&mut self, part: Delta) {
        let offset = self.changed.len();
        self.changed.extend(part.changed);
        self.to_stage.extend(
            part.to_stage
                .into_iter()
                .map(|(i, p, m)| (i + offset, p, m)),
        );
        self.removed.extend(part.removed);
        self.skipped.extend(part.skipped);
        self.watched.extend(part.watched);
        self.watch_error = self.watch_error.take().or(part.watch_error);
        self.met += part.met;
        self.stats.entries += part.stats.entries;
        self.stats.files_hashed += part.stats.files_hashed;
        self.stats.bytes_hashed += part.stats.bytes_hashed;
        self.stats.files_cached += part.stats.files_cached;
    }
}

/// The inodes (still linked somewhere) of the objects the journal saw
/// written, found by their handles; an error says why they cannot be
/// (the scan is then full).
fn linked_inodes(upper_fd: &OwnedFd, written: &HashSet<Vec<u8>>) -> Result<HashSet<u64>, String> {
    let mut out = HashSet::new();
    for handle in written {
        match crate::sys::open_by_handle(upper_fd.as_fd(), handle) {
            Ok(fd) => {
                let st = nix::sys::stat::fstat(&fd).map_err(|e| format!("fstat by handle: {e}"))?;
                if st.st_nlink > 0 {
                    out.insert(st.st_ino);
                }
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) => {}
            Err(e) => return Err(format!("opening a written file by its handle: {e}")),
        }
    }
    Ok(out)
}

/// The incremental scan: reads the entries the journal and `held` name,
/// lists in full the directories that appeared (or replaced others), and
/// finds from the cache what went with removed directories and which hard
/// links share a changed inode.
#[allow(clippy::too_many_arguments)]
fn scan_dirty(
    upper_fd: &OwnedFd,
    cache: &ScanCache,
    journal: Option<&Journal>,
    dirty: Dirty,
    written: &HashSet<u64>,
    held: &Held,
    forced: &HashSet<String>,
    old_skipped: &Skipped,
    epoch: u32,
    threads: usize,
) -> Result<Delta, FsError> {
    // Sorted: a directory comes before what is under it.
    let mut paths: BTreeMap<String, bool> = dirty.paths.into_iter().collect();
    for p in &held.open {
        paths.entry(p.clone()).or_default();
    }
    for p in forced {
        paths.insert(p.clone(), true);
    }
    for p in &dirty.subtrees {
        paths.entry(p.clone()).or_default();
    }
    let mut out = Delta {
        incremental: true,
        epoch,
        ..Delta::default()
    };
    let mut removed: HashSet<String> = HashSet::new();
    // Directories listed in full, and cached directories gone or replaced:
    // what the cache holds under them and the scan did not meet is gone.
    let mut walked: HashSet<String> = HashSet::new();
    let mut emptied: HashSet<String> = HashSet::new();
    let mut roots = Vec::new();
    for (rel, force) in &paths {
        if under_any(rel, &walked) {
            continue;
        }
        let cached = cache.get(rel.as_str());
        let was_dir = cached.is_some_and(|c| c.entry.kind == Kind::Dir);
        let depth = rel.matches('/').count() + 1;
        if let Some(why) = at::beyond_limits(rel, depth) {
            if stat_beneath(upper_fd, rel)?.is_some() {
                out.skipped.insert(rel.clone(), why);
            }
            continue;
        }
        let Some((dir, name, st)) = stat_beneath(upper_fd, rel)? else {
            if cached.is_some() {
                removed.insert(rel.clone());
            }
            if was_dir {
                emptied.insert(rel.clone());
            }
            continue;
        };
        record(dir.as_fd(), &name, &st, rel, cache, epoch, *force, &mut out)?;
        let is_dir = kind_of(&st) == SFlag::S_IFDIR;
        let same_dir = was_dir && cached.is_some_and(|c| c.ino == st.st_ino);
        if is_dir && (!same_dir || dirty.subtrees.contains(rel)) {
            walked.insert(rel.clone());
            roots.push(Pending {
                at: Arc::new(dir),
                name: Some(name),
                rel: rel.clone(),
                depth,
            });
        } else if was_dir && !is_dir {
            emptied.insert(rel.clone());
        }
    }
    out.absorb(walk(roots, cache, journal, forced, epoch, threads)?);
    emptied.extend(walked);
    // What was skipped before and this scan did not look at again still is.
    for (p, why) in old_skipped {
        if !paths.contains_key(p) && !under_any(p, &emptied) && !out.skipped.contains_key(p) {
            out.skipped.insert(p.clone(), why.clone());
        }
    }
    if !emptied.is_empty() {
        for (p, s) in cache {
            if s.visited.load(Ordering::Relaxed) != epoch && under_any(p, &emptied) {
                removed.insert(p.clone());
            }
        }
    }
    // Hard links: a write through one link changes them all (the journal
    // names only the link used), and a link added or removed moves the
    // inode's ctime and link count. And a write through a name that is
    // gone (a removed link, an O_TMPFILE linked in later) reached the
    // inode's other names.
    let old_ino = |p: &str| {
        cache
            .get(p)
            .filter(|s| s.entry.link.is_some())
            .map(|s| s.ino)
    };
    let read: HashSet<u64> = out.changed.iter().map(|(_, s)| s.ino).collect();
    // (written and not read: even a name this scan found unchanged by stat)
    let unread: HashSet<u64> = written.difference(&read).copied().collect();
    let linked: HashSet<u64> = out
        .changed
        .iter()
        .flat_map(|(p, s)| [s.entry.link.map(|_| s.ino), old_ino(p)])
        .chain(removed.iter().map(|p| old_ino(p)))
        .flatten()
        .chain(unread.iter().copied())
        .collect();
    if !linked.is_empty() {
        let siblings: Vec<String> = cache
            .iter()
            .filter(|(p, s)| {
                linked.contains(&s.ino)
                    && (s.visited.load(Ordering::Relaxed) != epoch || unread.contains(&s.ino))
                    && !removed.contains(p.as_str())
            })
            .map(|(p, _)| p.clone())
            .collect();
        for rel in siblings {
            match stat_beneath(upper_fd, &rel)? {
                Some((dir, name, st)) => {
                    record(dir.as_fd(), &name, &st, &rel, cache, epoch, true, &mut out)?;
                }
                None => {
                    removed.insert(rel);
                }
            }
        }
    }
    out.removed = removed.into_iter().collect();
    Ok(out)
}

/// How the upper dir differs from what `tracked` (with `delta` applied, if
/// given) says of it: inode, size, mtime, and what the manifest records
/// (kind, mode, owner, xattrs, symlink target, whether hard-linked), one
/// line per path. Not ctime: it also moves when nothing recorded changes
/// (a link made and removed, overlay's shared whiteout inode). The check of
/// the journal: debug builds run it after every incremental scan.
pub fn verify(
    upper: &Path,
    tracked: &Tracked,
    delta: Option<&Delta>,
) -> Result<Vec<String>, FsError> {
    let changed: HashMap<&str, &Seen> = delta
        .map(|d| d.changed.iter().map(|(p, s)| (p.as_str(), s)).collect())
        .unwrap_or_default();
    let removed: HashSet<&str> = delta
        .map(|d| d.removed.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let expected = |p: &str| {
        changed.get(p).copied().or_else(|| {
            (!removed.contains(p))
                .then(|| tracked.seen.get(p))
                .flatten()
        })
    };
    let mut out = Vec::new();
    let mut met = HashSet::new();
    // (parent, name (none: the upper dir), path, depth)
    let upper_fd = Arc::new(open_dir(upper)?);
    let mut dirs = vec![(upper_fd, None::<Vec<u8>>, String::new(), 0usize)];
    while let Some((parent, name, rel, depth)) = dirs.pop() {
        let fd = match name {
            None => parent.try_clone().map_err(rel_err("dup", &rel))?,
            Some(n) => nix::fcntl::openat(
                parent.as_fd(),
                OsStr::from_bytes(&n),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| rel_err("open", &rel)(e.into()))?,
        };
        let fd = Arc::new(fd);
        let mut listing = nix::dir::Dir::from_fd(fd.try_clone().map_err(rel_err("dup", &rel))?)
            .map_err(|e| rel_err("read dir", &rel)(e.into()))?;
        for item in listing.iter() {
            let item = item.map_err(|e| rel_err("read dir", &rel)(e.into()))?;
            let bytes = item.file_name().to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let mut p = rel.clone();
            if !p.is_empty() {
                p.push('/');
            }
            manifest::push_encoded(&mut p, bytes);
            if at::beyond_limits(&p, depth + 1).is_some() {
                if !tracked.skipped.contains_key(&p)
                    && !delta.is_some_and(|d| d.skipped.contains_key(&p))
                {
                    out.push(format!("{p}: beyond the limits, not known as skipped"));
                }
                continue;
            }
            let st = fstatat(
                fd.as_fd(),
                OsStr::from_bytes(bytes),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| rel_err("stat", &p)(e.into()))?;
            match expected(&p) {
                None => out.push(format!("{p}: not known")),
                Some(s) => {
                    let (now, _) =
                        read_entry(fd.as_fd(), bytes, &p, &st, &mut ScanStats::default())?;
                    let mut was = s.entry.clone();
                    was.object = None;
                    if s.ino != st.st_ino || s.size != st.st_size as u64 || now != was {
                        out.push(format!("{p}: recorded {was:?}, now {now:?}"));
                    }
                }
            }
            if kind_of(&st) == SFlag::S_IFDIR {
                dirs.push((fd.clone(), Some(bytes.to_vec()), p.clone(), depth + 1));
            }
            met.insert(p);
        }
    }
    let known = tracked
        .seen
        .keys()
        .map(String::as_str)
        .filter(|p| !removed.contains(p))
        .chain(changed.keys().copied());
    for p in known {
        if !met.contains(p) {
            out.push(format!("{p}: gone"));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn open_dir(dir: &Path) -> Result<OwnedFd, FsError> {
    super::journal::open_dir(dir).map_err(io_err("open", dir))
}

/// The stat of upper entry `rel` (encoded), looked up without following
/// any symlink: (its directory, its name, its stat), or `None` if it is
/// not there (or a component is no longer a directory). Any length.
fn stat_beneath(
    upper_fd: &OwnedFd,
    rel: &str,
) -> Result<Option<(OwnedFd, Vec<u8>, FileStat)>, FsError> {
    let raw = manifest::decode_path(rel);
    let (parent, name) = at::split_parent(&raw);
    let gone = |e: Errno| {
        matches!(
            e,
            Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV
        )
    };
    let dir = match at::open_dir(upper_fd.as_fd(), parent) {
        Ok(fd) => fd,
        Err(e) if gone(e) => return Ok(None),
        Err(e) => return Err(rel_err("open", rel)(e.into())),
    };
    match fstatat(&dir, OsStr::from_bytes(name), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some((dir, name.to_vec(), st))),
        Err(e) if gone(e) => Ok(None),
        Err(e) => Err(rel_err("stat", rel)(e.into())),
    }
}

/// Copies the changed files into the store's temp dir, on `threads` workers
/// (changes often cluster in one directory, which one scan worker lists).
/// Each is opened beneath the upper dir without following symlinks and
/// must still be the regular file the scan saw; one that is not gives
/// `None` (see [`Delta::keep_staged`]).
fn stage_all(
    store: &Store,
    upper_fd: &OwnedFd,
    files: Vec<(usize, String, Meta)>,
    threads: usize,
) -> Result<Vec<(usize, Option<Staged>)>, FsError> {
    // On an error, the copies already made stay in the store's temp dir
    // until the failed capture cleans it.
    super::par_map(files, threads, "stage", |(i, rel, meta)| {
        let raw = manifest::decode_path(&rel);
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        let file = match at::open_beneath(upper_fd.as_fd(), &raw, flags) {
            Ok(fd) => std::fs::File::from(fd),
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV | Errno::ENXIO) => {
                return Ok((i, None));
            }
            Err(e) => return Err(rel_err("open", &rel)(e.into())),
        };
        let st = nix::sys::stat::fstat(&file).map_err(|e| rel_err("stat", &rel)(e.into()))?;
        if kind_of(&st) != SFlag::S_IFREG {
            return Ok((i, None));
        }
        let shown = PathBuf::from(at::shown(&rel));
        Ok((i, Some(store.stage_open(&file, &shown, &meta)?)))
    })
}

fn ns(secs: i64, nsec: i64) -> i64 {
    secs * 1_000_000_000 + nsec
}

fn kind_of(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Scans one directory's entries into `out` (marking it in `journal`
/// first); returns its subdirectories. Entries beyond the capture's limits
/// ([`at::beyond_limits`]) go into `out.skipped`, and nothing under them
/// is listed.
fn scan_dir(
    dir: Pending,
    cache: &ScanCache,
    journal: Option<&Journal>,
    forced: &HashSet<String>,
    epoch: u32,
    out: &mut Delta,
) -> Result<Vec<Pending>, FsError> {
    let Pending {
        at: parent,
        name,
        rel,
        depth,
    } = dir;
    // Entries that vanish between the listing and their stat (a scan made
    // with services running) are skipped: they are gone.
    let fd = match name {
        None => parent.try_clone().map_err(rel_err("dup", &rel))?,
        Some(name) => match nix::fcntl::openat(
            parent.as_fd(),
            OsStr::from_bytes(&name),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => return Ok(Vec::new()),
            Err(e) => return Err(rel_err("open", &rel)(e.into())),
        },
    };
    drop(parent);
    let fd = Arc::new(fd);
    if let Some(j) = journal {
        match j.watch(fd.as_fd()) {
            Ok(handle) => out.watched.push((handle, rel.clone())),
            Err(e) => {
                out.watch_error
                    .get_or_insert_with(|| format!("{}: {e}", at::shown(&rel)));
            }
        }
    }
    // Listing and stat share the directory (the listing owns a duplicate).
    let listing = fd.try_clone().map_err(rel_err("dup", &rel))?;
    let mut listing =
        nix::dir::Dir::from_fd(listing).map_err(|e| rel_err("read dir", &rel)(e.into()))?;
    let mut subdirs = Vec::new();
    // The relative path of the current entry, reused: only a change allocates.
    let mut rel_path = String::with_capacity(rel.len() + 64);
    rel_path.push_str(&rel);
    if !rel.is_empty() {
        rel_path.push('/');
    }
    let prefix = rel_path.len();
    for item in listing.iter() {
        let item = item.map_err(|e| rel_err("read dir", &rel)(e.into()))?;
        let name: &CStr = item.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        rel_path.truncate(prefix);
        manifest::push_encoded(&mut rel_path, bytes);
        if let Some(why) = at::beyond_limits(&rel_path, depth + 1) {
            out.skipped.insert(rel_path.clone(), why);
            continue;
        }
        let st = match fstatat(fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(rel_err("stat", &rel_path)(e.into())),
        };
        let force = !forced.is_empty() && forced.contains(rel_path.as_str());
        record(fd.as_fd(), bytes, &st, &rel_path, cache, epoch, force, out)?;
        if kind_of(&st) == SFlag::S_IFDIR {
            subdirs.push(Pending {
                at: fd.clone(),
                name: Some(bytes.to_vec()),
                rel: rel_path.clone(),
                depth: depth + 1,
            });
        }
    }
    Ok(subdirs)
}

/// Compares entry `name` of `dir` (its stat `st`, its path `rel_path`) with
/// the cache: a new or changed one, or any with `force`, goes into `out`
/// (a file's copy to be staged).
#[allow(clippy::too_many_arguments)]
fn record(
    dir: BorrowedFd<'_>,
    name: &[u8],
    st: &FileStat,
    rel_path: &str,
    cache: &ScanCache,
    epoch: u32,
    force: bool,
    out: &mut Delta,
) -> Result<(), FsError> {
    let kind = kind_of(st);
    out.stats.entries += 1;
    let (mtime_ns, ctime_ns) = (
        ns(st.st_mtime, st.st_mtime_nsec),
        ns(st.st_ctime, st.st_ctime_nsec),
    );
    let mut unchanged = false;
    let mut visited_before = None;
    if let Some(seen) = cache.get(rel_path) {
        visited_before = Some(seen.visited.swap(epoch, Ordering::Relaxed));
        out.met += 1;
        unchanged = !force
            && seen.ino == st.st_ino
            && seen.size == st.st_size as u64
            && seen.mtime_ns == mtime_ns
            && seen.ctime_ns == ctime_ns;
    }
    if unchanged {
        if kind == SFlag::S_IFREG {
            out.stats.files_cached += 1;
        }
        return Ok(());
    }
    let (entry, meta) = match read_entry(dir, name, rel_path, st, &mut out.stats) {
        Ok(read) => read,
        // Gone since its stat (a scan while the environment runs: a temp
        // file renamed away): as if it had not been listed.
        Err(FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            if let (Some(seen), Some(before)) = (cache.get(rel_path), visited_before) {
                seen.visited.store(before, Ordering::Relaxed);
                out.met -= 1;
            }
            out.stats.entries -= 1;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    out.changed.push((
        rel_path.to_owned(),
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
        out.to_stage
            .push((out.changed.len() - 1, rel_path.to_owned(), meta));
    }
    Ok(())
}

/// The xattrs of entry `name` of `dir` (not following a symlink), and
/// whether it is an overlay opaque dir.
fn xattrs_of(
    dir: BorrowedFd<'_>,
    name: &[u8],
    rel: &str,
) -> Result<(BTreeMap<String, String>, bool), FsError> {
    let path = at::proc_path(dir, name);
    let mut out = BTreeMap::new();
    let mut opaque = false;
    let names = xattr::list(&path).map_err(rel_err("listxattr", rel))?;
    for n in names {
        let Some(key) = n.to_str() else { continue };
        if key == OPAQUE_XATTR {
            opaque = xattr::get(&path, &n)
                .ok()
                .flatten()
                .is_some_and(|v| v == b"y");
            continue;
        }
        if key.starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        if let Some(v) = xattr::get(&path, &n).map_err(rel_err("getxattr", rel))? {
            out.insert(key.to_owned(), super::store::hex(&v));
        }
    }
    Ok((out, opaque))
}

/// Reads one upper entry (`name` of `dir`, at `rel`) the cache does not
/// cover; for a file, also the metadata its store object will carry (its
/// content is staged later).
fn read_entry(
    dir: BorrowedFd<'_>,
    name: &[u8],
    rel: &str,
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
        let (xattrs, opaque) = xattrs_of(dir, name, rel)?;
        Entry {
            xattrs,
            opaque,
            ..base(Kind::Dir)
        }
    } else if kind == SFlag::S_IFLNK {
        // (user xattrs are not allowed on symlinks)
        let target = nix::fcntl::readlinkat(dir, OsStr::from_bytes(name))
            .map_err(|e| rel_err("readlink", rel)(e.into()))?;
        Entry {
            target: Some(manifest::encode_path(target.as_bytes())),
            ..base(Kind::Symlink)
        }
    } else if kind == SFlag::S_IFREG {
        let (xattrs, _) = xattrs_of(dir, name, rel)?;
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
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;

    fn capture(dir: &Path, store: &Store, t: &mut Tracked, now: i64) -> Delta {
        let mut d = scan_upper_at(dir, store, t, 2, Some(&Held::default()), now).unwrap();
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
            incremental: d.incremental,
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

    /// A cache that always lists the whole tree (no journal).
    fn full() -> Tracked {
        Tracked {
            journal_off: true,
            ..Tracked::default()
        }
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
    fn an_entry_gone_between_its_stat_and_its_read_is_as_if_unlisted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::fs::File::open(tmp.path()).unwrap();
        let mut out = Delta::default();
        let mut cache = ScanCache::default();
        for (name, is_dir) in [("gone.tmp", false), ("gone.d", true)] {
            let p = tmp.path().join(name);
            if is_dir {
                std::fs::create_dir(&p).unwrap();
            } else {
                std::fs::write(&p, b"x").unwrap();
            }
            let st = fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).unwrap();
            // Known from before, with another size: it would be read.
            cache.insert(
                name.to_owned(),
                Seen {
                    visited: AtomicU32::new(3),
                    ..seen_stub()
                },
            );
            if is_dir {
                std::fs::remove_dir(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
            record(
                dir.as_fd(),
                name.as_bytes(),
                &st,
                name,
                &cache,
                7,
                false,
                &mut out,
            )
            .unwrap();
            assert_eq!(
                cache[name].visited.load(Ordering::Relaxed),
                3,
                "{name}: not met, so found removed"
            );
        }
        assert!(out.changed.is_empty());
        assert_eq!((out.stats.entries, out.met), (0, 0));
    }

    #[test]
    fn unchanged_entries_are_skipped_changed_and_removed_ones_found() {
        let (_tmp, upper, store) = dirs();
        std::fs::create_dir_all(upper.join("d")).unwrap();
        std::fs::write(upper.join("d/a"), b"a").unwrap();
        std::fs::write(upper.join("b"), b"b").unwrap();
        let mut t = full();
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
        let mut t = full();
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

    /// A named change made to the upper dir.
    type Step<'a> = (&'static str, Box<dyn Fn() + 'a>);

    /// The entries a cache holds, as a full scan from nothing sees them.
    fn truth(upper: &Path, store: &Store, later: i64) -> BTreeMap<String, Entry> {
        let mut t = full();
        capture(upper, store, &mut t, later);
        entries(&t)
    }

    fn entries(t: &Tracked) -> BTreeMap<String, Entry> {
        t.seen
            .iter()
            .map(|(p, s)| (p.clone(), s.entry.clone()))
            .collect()
    }

    #[test]
    fn the_journal_finds_what_a_full_scan_finds() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let (tmp, upper, store) = dirs();
        if let Err(e) = Journal::open(tmp.path()) {
            assert_ne!(
                std::env::var("SPRITED_REQUIRE_PRIVILEGED").as_deref(),
                Ok("1"),
                "fanotify unavailable ({e}) and SPRITED_REQUIRE_PRIVILEGED=1 forbids skipping"
            );
            eprintln!("skipped: fanotify unavailable ({e}); needs root");
            return;
        }
        let later = now_ns() + 10_000_000_000;
        let w = |p: &str, b: &[u8]| {
            let p = upper.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b).unwrap();
        };
        let append = |p: &str, b: &[u8]| {
            use std::io::Write;
            let mut f = OpenOptions::new().append(true).open(upper.join(p)).unwrap();
            f.write_all(b).unwrap();
        };
        w("d/a", b"a");
        w("d/b", b"b");
        w("top", b"top");
        w("d/h1", b"linked");
        std::fs::hard_link(upper.join("d/h1"), upper.join("h2")).unwrap();
        symlink("d/a", upper.join("s")).unwrap();
        // A file kept open across steps.
        let open: std::cell::RefCell<Option<std::fs::File>> = Default::default();
        let mut t = Tracked::default();
        let first = capture(&upper, &store, &mut t, later);
        assert!(!first.incremental, "the first scan lists everything");
        assert!(t.journal_dirs() >= 2, "every directory watched");
        let steps: Vec<Step> = vec![
            ("nothing", Box::new(|| {})),
            ("rewrite in place, same size", Box::new(|| w("d/a", b"A"))),
            ("append", Box::new(|| append("top", b"+"))),
            (
                "write through one hard link",
                Box::new(|| append("h2", b"!")),
            ),
            (
                "chmod, xattr",
                Box::new(|| {
                    std::fs::set_permissions(upper.join("d/b"), PermissionsExt::from_mode(0o600))
                        .unwrap();
                    xattr::set(upper.join("top"), "user.k", b"v").unwrap();
                }),
            ),
            (
                "new nested dirs",
                Box::new(|| {
                    w("n/m/k/f", b"deep");
                    w("n/g", b"g");
                }),
            ),
            ("write in a new dir", Box::new(|| append("n/m/k/f", b"er"))),
            (
                "move a dir, then write under it",
                Box::new(|| {
                    std::fs::rename(upper.join("n"), upper.join("n2")).unwrap();
                    append("n2/m/k/f", b"!");
                }),
            ),
            (
                "write under the moved dir",
                Box::new(|| append("n2/m/k/f", b"?")),
            ),
            (
                "rename files",
                Box::new(|| {
                    std::fs::rename(upper.join("d/b"), upper.join("d/b2")).unwrap();
                    std::fs::rename(upper.join("n2/g"), upper.join("g")).unwrap();
                }),
            ),
            (
                "truncate, symlink retargeted",
                Box::new(|| {
                    OpenOptions::new()
                        .write(true)
                        .open(upper.join("top"))
                        .unwrap()
                        .set_len(1)
                        .unwrap();
                    std::fs::remove_file(upper.join("s")).unwrap();
                    symlink("elsewhere", upper.join("s")).unwrap();
                }),
            ),
            (
                "remove a tree",
                Box::new(|| std::fs::remove_dir_all(upper.join("n2")).unwrap()),
            ),
            (
                "a dir becomes a file, a file a dir",
                Box::new(|| {
                    std::fs::remove_dir_all(upper.join("d")).unwrap();
                    w("d", b"now a file");
                    std::fs::remove_file(upper.join("top")).unwrap();
                    w("top/inner", b"now a dir");
                }),
            ),
            (
                "write in the replacement dir",
                Box::new(|| append("top/inner", b"!")),
            ),
            (
                "a linked pair",
                Box::new(|| {
                    w("x1", b"pair");
                    std::fs::hard_link(upper.join("x1"), upper.join("x2")).unwrap();
                }),
            ),
            (
                "one name removed while open",
                Box::new(|| {
                    let f = OpenOptions::new()
                        .append(true)
                        .open(upper.join("x1"))
                        .unwrap();
                    *open.borrow_mut() = Some(f);
                    std::fs::remove_file(upper.join("x1")).unwrap();
                }),
            ),
            (
                "a write through the removed name",
                Box::new(|| {
                    use std::io::Write;
                    open.borrow_mut().as_mut().unwrap().write_all(b"+").unwrap();
                }),
            ),
            (
                "an O_TMPFILE linked in",
                Box::new(|| {
                    use std::io::Write;
                    let mut f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_TMPFILE)
                        .open(&upper)
                        .unwrap();
                    f.write_all(b"anonymous").unwrap();
                    let fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
                    nix::unistd::linkat(
                        nix::fcntl::AT_FDCWD,
                        fd.as_str(),
                        nix::fcntl::AT_FDCWD,
                        &upper.join("named"),
                        AtFlags::AT_SYMLINK_FOLLOW,
                    )
                    .unwrap();
                    *open.borrow_mut() = Some(f);
                }),
            ),
            (
                "a write through the O_TMPFILE's fd",
                Box::new(|| {
                    use std::io::Write;
                    open.borrow_mut().as_mut().unwrap().write_all(b"!").unwrap();
                }),
            ),
        ];
        for (what, step) in steps {
            step();
            let d = capture(&upper, &store, &mut t, later);
            assert!(d.incremental, "{what}: the journal was not used");
            assert_eq!(
                verify(&upper, &t, None).unwrap(),
                Vec::<String>::new(),
                "{what}"
            );
            let (got, want) = (entries(&t), truth(&upper, &store, later));
            let differ: Vec<_> = want
                .iter()
                .filter(|(p, e)| got.get(*p) != Some(e))
                .map(|(p, e)| format!("{p}: want {e:?}, got {:?}", got.get(p)))
                .chain(
                    got.keys()
                        .filter(|p| !want.contains_key(*p))
                        .map(|p| format!("{p}: gone")),
                )
                .collect();
            assert!(differ.is_empty(), "after: {what}: {differ:#?}");
        }
        // Nothing changed: nothing is read.
        let d = capture(&upper, &store, &mut t, later);
        assert_eq!((d.changed.len(), d.stats.entries), (0, 0));
        // A scan whose delta was never applied (its capture failed) makes
        // the next one full: what the journal told it is gone.
        append("g", b"lost?");
        scan_upper_at(&upper, &store, &mut t, 2, Some(&Held::default()), later).unwrap();
        let d = capture(&upper, &store, &mut t, later);
        assert!(!d.incremental);
        assert_eq!(entries(&t), truth(&upper, &store, later));
        // A file mapped shared and writable is read at this scan and the next.
        let held = Held {
            mapped: vec!["g".into()],
            ..Held::default()
        };
        let none = Held::default();
        for (held, expect) in [(&held, 1), (&none, 1), (&none, 0)] {
            let d = scan_upper_at(&upper, &store, &mut t, 2, Some(held), later).unwrap();
            assert_eq!(d.stats.files_hashed, expect);
            t.apply(d, Manifest::default());
        }
        // ... also when the capture after is not kept: the warm (full) scan
        // that follows and the frozen one after it still read it.
        let d = scan_upper_at(&upper, &store, &mut t, 2, Some(&held), later).unwrap();
        t.apply(d, Manifest::default());
        let lost = scan_upper_at(&upper, &store, &mut t, 2, Some(&none), later).unwrap();
        assert_eq!(lost.stats.files_hashed, 1);
        drop(lost);
        let warm = scan_upper_at(&upper, &store, &mut t, 2, None, later).unwrap();
        assert!(!warm.incremental);
        t.warm(warm);
        for expect in [1, 0] {
            let d = scan_upper_at(&upper, &store, &mut t, 2, Some(&none), later).unwrap();
            assert!(d.incremental);
            assert_eq!(
                d.stats.files_hashed, expect,
                "after a scan that was not kept"
            );
            t.apply(d, Manifest::default());
        }
    }
}
