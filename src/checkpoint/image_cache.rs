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
//! The other images (small: registers, file tables, mounts) are kept too
//! when the next restore wants the same stored object under the same name,
//! so that restoring the same checkpoint again extracts nothing before CRIU
//! may start (26 small images took 13 ms here).
//!
//! What each cached image holds (a page list, an object id) is known in
//! memory only: the daemon wipes `<state>/criu/` at every start, so a crash never
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
    /// What the images in `dir` hold; None while a fill changes them (or
    /// after one failed).
    held: Mutex<Option<Held>>,
    /// One fill at a time.
    filling: Mutex<()>,
    /// What the last fill wrote (taken by the restore that asked for it).
    last: Mutex<Option<Filled>>,
}

/// What the images of the cache hold.
#[derive(Debug, Default)]
struct Held {
    /// Pages image name → the page list it holds (and that list's object).
    pages: BTreeMap<String, (String, PageList)>,
    /// Every other image's name → the stored object it was extracted from.
    small: BTreeMap<String, String>,
}

/// What a fill wrote.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Filled {
    pub(super) pages: u64,
    pub(super) pages_written: u64,
    /// Small images, and how many were extracted (the others were
    /// already there).
    pub(super) small: usize,
    pub(super) small_extracted: usize,
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
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let t0 = Instant::now();
        let extracted = self.extract_small(store, p, &held);
        let _ = small.send(extracted.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        let extracted = extracted?;
        let mut filled = Filled {
            small: p.images.len(),
            small_extracted: extracted,
            ..Filled::default()
        };
        tracing::debug!(
            ms = t0.elapsed().as_secs_f64() * 1e3,
            extracted,
            kept = p.images.len() - extracted,
            "small images ready"
        );
        let t = Instant::now();
        let mut now = BTreeMap::new();
        for (name, list) in &p.pages {
            let dest = self.dir.join(name);
            let cached = match held.pages.remove(name) {
                // The same stored list as the image holds: nothing to read.
                Some((id, same))
                    if id == *list
                        && std::fs::metadata(&dest).is_ok_and(|m| m.len() == same.len) =>
                {
                    filled.pages += same.len / pages::PAGE as u64;
                    now.insert(name.clone(), (id, same));
                    continue;
                }
                other => other,
            };
            let r = pages::rebuild(
                store,
                list,
                cached.as_ref().map(|(_, l)| l),
                &dest,
                pages::threads(),
            )?;
            filled.pages += r.list.len / pages::PAGE as u64;
            filled.pages_written += r.pages_written;
            now.insert(name.clone(), (list.clone(), r.list));
        }
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(Held {
            pages: now,
            small: p.images.clone(),
        });
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(filled);
        tracing::info!(
            ms = t.elapsed().as_secs_f64() * 1e3,
            pages = filled.pages,
            pages_written = filled.pages_written,
            "images rebuilt from the store"
        );
        Ok(filled)
    }

    /// Every file goes but the pages images still wanted and the small
    /// images that hold the object `p` wants under their name; the other
    /// small images of `p` are extracted. Returns how many were.
    fn extract_small(
        &self,
        store: &Store,
        p: &EnvImages,
        held: &Held,
    ) -> Result<usize, CheckpointError> {
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
            if held.pages.contains_key(&name) && p.pages.contains_key(&name) {
                continue;
            }
            if held
                .small
                .get(&name)
                .is_some_and(|o| p.images.get(&name) == Some(o))
            {
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
        let mut extracted = 0;
        for (name, object) in &p.images {
            if held.small.get(name) != Some(object) {
                store.extract_compressed(object, &self.dir.join(name))?;
                extracted += 1;
            }
        }
        Ok(extracted)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn images(small: &[(&str, &str)]) -> EnvImages {
        EnvImages {
            images: small
                .iter()
                .map(|(n, o)| ((*n).to_owned(), (*o).to_owned()))
                .collect(),
            pages: BTreeMap::new(),
            stats: Default::default(),
            init_pipes: Default::default(),
            services: vec![],
            sessions: vec![],
            cgroups: BTreeMap::new(),
            external_sockets: vec![],
            mac: None,
        }
    }

    fn fill(cache: &ImageCache, store: &Store, p: &EnvImages) -> Filled {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let filled = cache.fill(store, p, tx).unwrap();
        rx.recv().unwrap().unwrap();
        filled
    }

    #[test]
    fn a_small_image_is_extracted_again_only_when_its_object_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store")).unwrap();
        let put = |b: &[u8]| store.put_bytes_compressed(b).unwrap().id;
        let (core1, core2, mm) = (put(b"core one"), put(b"core two"), put(b"mm"));
        let cache = ImageCache::new(tmp.path());
        let read = |n: &str| std::fs::read(cache.dir().join(n)).unwrap();

        let first = images(&[("core-1.img", &core1), ("mm-1.img", &mm)]);
        assert_eq!(fill(&cache, &store, &first).small_extracted, 2);
        // The same checkpoint again: nothing to extract.
        assert_eq!(fill(&cache, &store, &first).small_extracted, 0);
        assert_eq!(read("core-1.img"), b"core one");

        // Another one: only the image whose object differs.
        let second = images(&[("core-1.img", &core2), ("mm-1.img", &mm)]);
        assert_eq!(fill(&cache, &store, &second).small_extracted, 1);
        assert_eq!(read("core-1.img"), b"core two");
        assert_eq!(read("mm-1.img"), b"mm");

        // An image the next one does not have goes; CRIU's own files too.
        std::fs::write(cache.dir().join("restore.log"), b"log").unwrap();
        let third = images(&[("core-1.img", &core2)]);
        assert_eq!(fill(&cache, &store, &third).small_extracted, 0);
        assert!(!cache.dir().join("mm-1.img").exists());
        assert!(!cache.dir().join("restore.log").exists());

        // After a clear everything is extracted again.
        cache.clear();
        assert_eq!(fill(&cache, &store, &third).small_extracted, 1);
        assert_eq!(read("core-1.img"), b"core two");
    }

    #[test]
    fn the_same_pages_again_read_no_pack_and_a_patch_only_the_packs_it_reads() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store")).unwrap();
        let mut index = pages::PageIndex::default();
        let page = |b: u8| vec![b; pages::PAGE];
        let mut stored = |name: &str, pages_of: &[u8]| {
            let path = tmp.path().join(name);
            std::fs::write(
                &path,
                pages_of.iter().flat_map(|b| page(*b)).collect::<Vec<u8>>(),
            )
            .unwrap();
            pages::store_images(&store, &mut index, &[path], 1)
                .unwrap()
                .lists[0]
                .clone()
        };
        // Two captures: the second changed one page of four (its own pack).
        let first = stored("a.img", &[1, 2, 3, 4]);
        let second = stored("b.img", &[1, 2, 9, 4]);
        let with = |list: &str| EnvImages {
            pages: [("pages-1.img".to_owned(), list.to_owned())].into(),
            ..images(&[])
        };
        let cache = ImageCache::new(tmp.path());
        let image = || std::fs::read(cache.dir().join("pages-1.img")).unwrap();
        assert_eq!(fill(&cache, &store, &with(&first)).pages_written, 4);

        // The first pack gone: the same checkpoint again needs none of it.
        let packs = |list: &str| pages::PageList::load(&store, list).unwrap().packs;
        let first_pack = packs(&first)[0].clone();
        assert_eq!(
            packs(&second)[0],
            first_pack,
            "the unchanged pages are the first pack's"
        );
        let gone = tmp.path().join("gone");
        std::fs::rename(store.object_path(&first_pack), &gone).unwrap();
        let again = fill(&cache, &store, &with(&first));
        assert_eq!((again.pages, again.pages_written), (4, 0));
        // The second checkpoint: only the changed page, from the second pack.
        let patched = fill(&cache, &store, &with(&second));
        assert_eq!(patched.pages_written, 1);
        let want: Vec<u8> = [1, 2, 9, 4].iter().flat_map(|b| page(*b)).collect();
        assert_eq!(image(), want);
        // Whole again (after a clear) it needs the first pack: an error.
        cache.clear();
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        assert!(cache.fill(&store, &with(&second), tx).is_err());
        std::fs::rename(&gone, store.object_path(&first_pack)).unwrap();
        assert_eq!(fill(&cache, &store, &with(&second)).pages_written, 4);
        assert_eq!(image(), want);
    }
}
