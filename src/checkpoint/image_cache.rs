//! The raw images of the last restore, kept for the next one.
//!
//! CRIU restores from image files; the store keeps memory as deduplicated
//! pages (`fs::pages`). Rebuilding the pages images of 1 GiB costs about as
//! much as CRIU's own restore of them, so the images of the last restore
//! stay in `<state>/criu/restore-cache/`, and the next restore rewrites only
//! the pages where its images differ: nothing when it restores the same
//! checkpoint again, about 1% when its processes changed 1% of their pages
//! since the cached one.
//!
//! What each cached pages image holds (its page list) is known in memory
//! only: the daemon wipes `<state>/criu/` at every start, so a crash never
//! leaves a cache that says one thing while its files (written back or not)
//! hold another. While a fill changes the files nothing is known, so a
//! failed fill leaves a cache the next restore rebuilds whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use super::{CheckpointError, EnvImages, io_err};
use crate::fs::pages::{self, PageList};
use crate::fs::store::Store;

pub(super) struct ImageCache {
    dir: PathBuf,
    /// The page list each pages image in `dir` holds; None while a fill
    /// changes them (or after one failed).
    held: Mutex<Option<BTreeMap<String, PageList>>>,
    /// One fill at a time.
    filling: Mutex<()>,
    /// What the last fill wrote (taken by the restore that asked for it).
    last: Mutex<Option<Filled>>,
}

/// What a fill wrote.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Filled {
    pub(super) pages: u64,
    pub(super) pages_written: u64,
}

impl ImageCache {
    /// The cache in `images` (the daemon's dir of raw images).
    pub(super) fn new(images: &Path) -> ImageCache {
        ImageCache {
            dir: images.join("restore-cache"),
            held: Mutex::new(None),
            filling: Mutex::new(()),
            last: Mutex::new(None),
        }
    }

    /// Where the images are, for CRIU.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the dir hold the images of `p` from `store`: every image but
    /// the pages extracted afresh (then `small` is told: CRIU may start
    /// reading), each pages image patched where it differs from the one
    /// cached under its name (or written whole).
    #[tracing::instrument(name = "restore_images", skip_all)]
    pub(super) fn fill(
        &self,
        store: &Store,
        p: &EnvImages,
        small: std::sync::mpsc::SyncSender<Result<(), String>>,
    ) -> Result<Filled, CheckpointError> {
        let _one = self.filling.lock().unwrap_or_else(|e| e.into_inner());
        let held = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let extracted = self.extract_small(store, p, &held);
        let _ = small.send(extracted.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        extracted?;
        let t = Instant::now();
        let mut now = BTreeMap::new();
        let mut filled = Filled::default();
        for (name, list) in &p.pages {
            let r = pages::rebuild(
                store,
                list,
                held.get(name),
                &self.dir.join(name),
                pages::threads(),
            )?;
            filled.pages += r.list.len / pages::PAGE as u64;
            filled.pages_written += r.pages_written;
            now.insert(name.clone(), r.list);
        }
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(filled);
        tracing::info!(
            ms = t.elapsed().as_secs_f64() * 1e3,
            pages = filled.pages,
            pages_written = filled.pages_written,
            "images rebuilt from the store"
        );
        Ok(filled)
    }

    /// Every file but the pages images still wanted goes; the other images
    /// of `p` are extracted.
    fn extract_small(
        &self,
        store: &Store,
        p: &EnvImages,
        held: &BTreeMap<String, PageList>,
    ) -> Result<(), CheckpointError> {
        for name in p.images.keys().chain(p.pages.keys()) {
            if name.contains('/') || name.starts_with('.') || name.is_empty() {
                return Err(CheckpointError::Unavailable(format!(
                    "bad image name {name:?}"
                )));
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(io_err("create", &self.dir))?;
        for entry in std::fs::read_dir(&self.dir)
            .map_err(io_err("read dir", &self.dir))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if held.contains_key(&name) && p.pages.contains_key(&name) {
                continue;
            }
            let path = entry.path();
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            gone.map_err(io_err("remove", &path))?;
        }
        for (name, object) in &p.images {
            store.extract_compressed(object, &self.dir.join(name))?;
        }
        Ok(())
    }

    /// What the last fill wrote, once.
    pub(super) fn take_last(&self) -> Option<Filled> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Forgets what the cache holds and removes it (the next restore
    /// rebuilds its images whole).
    pub(crate) fn clear(&self) {
        let _one = self.filling.lock().unwrap_or_else(|e| e.into_inner());
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
