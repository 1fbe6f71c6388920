//! Watching the environment's files for the API (`/v1/fs/watch`): one
//! inotify instance per subscription, owned here and by nothing else. A
//! watched file gets one watch; a watched directory one, and with
//! `recursive` one per directory below it (found when the subscription
//! starts, and added as new ones appear). Paths are opened through
//! [`Files`] (confined to the environment's root like every path of the
//! API) and the watch is put on the opened inode, so a symlink cannot lead
//! a watch outside.
//!
//! Bounds: at most [`MAX_WATCHES`] directories per subscription and
//! [`MAX_SUBSCRIPTIONS`] subscriptions at once (each is an inotify instance:
//! the kernel allows 128 per user). Events wait in the kernel's queue
//! (`fs.inotify.max_queued_events`) while the client reads slowly; when it
//! overflows, the events lost are reported as such ([`Change::Lost`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

use crate::files::{Files, FilesError};

/// Directories one subscription may watch.
pub const MAX_WATCHES: usize = 4096;
/// Subscriptions at once, daemon-wide.
pub const MAX_SUBSCRIPTIONS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error("{0}")]
    Limit(String),
    #[error("inotify: {op}: {source}")]
    Inotify {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
}

/// What happened to a path, in the SDK's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Event {
        /// The path inside the environment (`/work/a.txt`).
        path: String,
        /// `create`, `write`, `remove`, `rename` or `chmod`.
        kind: &'static str,
        is_dir: bool,
    },
    /// The kernel's queue overflowed: events were lost.
    Lost,
    /// A directory could not be watched (the limit, or it went away).
    Skipped(String),
}

/// The daemon-wide count of subscriptions.
#[derive(Debug, Default, Clone)]
pub struct Subscriptions(Arc<AtomicUsize>);

/// One subscription's slot; freed when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Subscriptions {
    /// A slot, or why there is none.
    pub fn take(&self) -> Result<Slot, WatchError> {
        let n = self.0.fetch_add(1, Ordering::AcqRel);
        if n >= MAX_SUBSCRIPTIONS {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return Err(WatchError::Limit(format!(
                "{MAX_SUBSCRIPTIONS} watches are open already"
            )));
        }
        Ok(Slot(self.0.clone()))
    }
}

/// What a watch descriptor stands for.
struct Watched {
    /// Root-relative (`work/src`; empty: the root).
    rel: String,
    is_dir: bool,
}

pub struct Watcher {
    inotify: Inotify,
    /// A second fd of the same inotify instance, registered with the
    /// reactor: it says when `inotify` has events.
    ready: AsyncFd<OwnedFd>,
    files: Files,
    watched: HashMap<WatchDescriptor, Watched>,
    recursive: bool,
    dirs: usize,
    _slot: Slot,
}

const MASK: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MODIFY)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);

fn inotify(op: &'static str) -> impl FnOnce(nix::Error) -> WatchError {
    move |source| WatchError::Inotify { op, source }
}

impl Watcher {
    /// Watches `rels` (root-relative paths), each directory's subtree too
    /// with `recursive`. Blocking (it lists the trees): run it off the
    /// async workers. What could not be watched is in the second value.
    pub fn new(
        files: Files,
        rels: &[String],
        recursive: bool,
        slot: Slot,
    ) -> Result<(Watcher, Vec<Change>), WatchError> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(inotify("init"))?;
        let ready = ino
            .as_fd()
            .try_clone_to_owned()
            .and_then(crate::sys::async_fd)
            .map_err(|e| WatchError::Inotify {
                op: "register",
                source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
        let mut w = Watcher {
            inotify: ino,
            ready,
            files,
            watched: HashMap::new(),
            recursive,
            dirs: 0,
            _slot: slot,
        };
        let mut skipped = Vec::new();
        for rel in rels {
            let is_dir = w.add(rel)?;
            if is_dir && recursive {
                w.add_below(rel, &mut skipped);
            }
        }
        Ok((w, skipped))
    }

    /// Puts a watch on `rel` (opened confined): whether it is a directory.
    fn add(&mut self, rel: &str) -> Result<bool, WatchError> {
        let (fd, is_dir) = self.files.open_path(rel)?;
        if is_dir {
            if self.dirs >= MAX_WATCHES {
                return Err(WatchError::Limit(format!(
                    "{}: past {MAX_WATCHES} watched directories",
                    self.files.display(rel)
                )));
            }
            self.dirs += 1;
        }
        let wd = self
            .inotify
            .add_watch(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(), MASK)
            .map_err(inotify("add_watch"))?;
        self.watched.insert(
            wd,
            Watched {
                rel: rel.to_owned(),
                is_dir,
            },
        );
        Ok(is_dir)
    }

    /// Watches every directory below `rel`; what fails goes to `skipped`.
    fn add_below(&mut self, rel: &str, skipped: &mut Vec<Change>) {
        let entries = match self.files.list(rel, true, None) {
            Ok(e) => e,
            Err(e) => {
                skipped.push(Change::Skipped(e.to_string()));
                return;
            }
        };
        for e in entries.into_iter().filter(|e| e.is_dir) {
            let sub = e.path.trim_start_matches('/').to_owned();
            if let Err(err) = self.add(&sub) {
                skipped.push(Change::Skipped(err.to_string()));
                if matches!(err, WatchError::Limit(_)) {
                    return;
                }
            }
        }
    }

    /// The next changes (waits for them).
    pub async fn next(&mut self) -> Result<Vec<Change>, WatchError> {
        loop {
            let mut ready = self
                .ready
                .readable()
                .await
                .map_err(|e| WatchError::Inotify {
                    op: "poll",
                    source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                })?;
            match self.inotify.read_events() {
                Ok(events) => {
                    let out = self.changes(events);
                    if !out.is_empty() {
                        return Ok(out);
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(e) => return Err(inotify("read")(e)),
            }
        }
    }

    fn changes(&mut self, events: Vec<nix::sys::inotify::InotifyEvent>) -> Vec<Change> {
        let mut out: Vec<Change> = Vec::new();
        for ev in events {
            let m = ev.mask;
            if m.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                out.push(Change::Lost);
                continue;
            }
            if m.contains(AddWatchFlags::IN_IGNORED) {
                if let Some(w) = self.watched.remove(&ev.wd)
                    && w.is_dir
                {
                    self.dirs -= 1;
                }
                continue;
            }
            let Some(w) = self.watched.get(&ev.wd) else {
                continue;
            };
            let is_dir = m.contains(AddWatchFlags::IN_ISDIR);
            let rel = match &ev.name {
                Some(name) => {
                    let name = name.to_string_lossy();
                    if w.rel.is_empty() {
                        name.into_owned()
                    } else {
                        format!("{}/{name}", w.rel)
                    }
                }
                None => w.rel.clone(),
            };
            let kind = if m.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
                "create"
            } else if m.contains(AddWatchFlags::IN_MODIFY) {
                "write"
            } else if m.contains(AddWatchFlags::IN_ATTRIB) {
                "chmod"
            } else if m.intersects(AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_MOVE_SELF) {
                "rename"
            } else if m.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_DELETE_SELF) {
                "remove"
            } else {
                continue;
            };
            // A burst of writes to one file is one event.
            let change = Change::Event {
                path: self.files.display(&rel),
                kind,
                is_dir,
            };
            if kind == "write" && out.last() == Some(&change) {
                continue;
            }
            out.push(change);
            if kind == "create" && is_dir && self.recursive {
                let mut skipped = Vec::new();
                match self.add(&rel) {
                    Ok(_) => self.add_below(&rel, &mut skipped),
                    Err(e) => skipped.push(Change::Skipped(e.to_string())),
                }
                out.extend(skipped);
            }
        }
        out
    }
}
