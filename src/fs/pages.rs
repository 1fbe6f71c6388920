//! Memory images deduplicated by page.
//!
//! CRIU writes the memory of a dump as `pages-<n>.img`: the contents of the
//! pages its `pagemap-*.img` list, one 4 KiB page after another. Stored as
//! whole objects, a checkpoint whose processes changed one page in a
//! hundred would add all of their memory again, so those images are stored
//! by page instead:
//!
//! - a **pack** holds the pages new to the store at one capture, in zstd
//!   frames of [`FRAME_PAGES`] pages, and ends with a trailer naming each
//!   page by its SHA-256 (the trailer is what deduplication reads);
//! - a **page list** (JSON) rebuilds one image: its length, the packs it
//!   draws from, and runs of pages (`[pack, first page, count]`).
//!
//! A capture hashes every page (in parallel), looks each one up in the
//! [`PageIndex`] of the packs live checkpoints reference, and writes only
//! the pages not found; a restore reassembles each image from its runs. A
//! page list names every pack it uses, so deleting any checkpoint leaves the
//! others whole (a pack stays while some list names it). Packs are hostile
//! input when they arrive in an archive: [`verify_pack`] decompresses every
//! frame and checks every page against the trailer before the pack can be
//! used for deduplication.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::store::{Compressed, Store, valid_id};
use super::{FsError, io_err, par_map};

/// The page size of the images (CRIU on x86-64 and arm64 with 4 KiB pages).
pub const PAGE: usize = 4096;
/// Pages a zstd frame of a pack holds (256 KiB).
pub const FRAME_PAGES: usize = 64;
const MAGIC: &[u8; 8] = b"SPRPACK1";
/// A trailer's fixed end: page count, frame count, magic.
const TAIL: usize = 16;
/// At most 1 TiB of pages in one pack or page list.
const MAX_PAGES: u64 = 1 << 28;
/// zstd level for new pages: fast; memory compresses well or not at all.
const LEVEL: i32 = 1;
/// Bytes read at a time while hashing.
const READ_PAGES: usize = 256;

/// Threads for hashing, compressing and assembling pages: the cores, at
/// most four.
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4)
}

/// A page's SHA-256.
pub type Digest = [u8; 32];

/// Whether a CRIU image file holds page contents (stored by page).
pub fn is_pages_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// How to rebuild one pages image: the object a page list is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PageList {
    /// Format version (1).
    pub v: u32,
    /// The image's length in bytes (a whole number of pages).
    pub len: u64,
    /// Pack objects the runs draw from.
    pub packs: Vec<String>,
    /// `[index into packs, first page in that pack, page count]`, in order.
    pub runs: Vec<[u64; 3]>,
}

impl PageList {
    /// Decodes and checks a page list (hostile input: an archive's).
    pub fn parse(bytes: &[u8]) -> Result<PageList, FsError> {
        let bad = |why: String| FsError::Corrupt(format!("page list: {why}"));
        let list: PageList =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a page list: {e}")))?;
        if list.v != 1 {
            return Err(bad(format!("unknown version {}", list.v)));
        }
        if let Some(p) = list.packs.iter().find(|p| !valid_id(p)) {
            return Err(bad(format!("bad pack object {p:?}")));
        }
        let mut pages: u64 = 0;
        for [pack, first, count] in &list.runs {
            if *pack >= list.packs.len() as u64 || *count == 0 {
                return Err(bad(format!("bad run [{pack}, {first}, {count}]")));
            }
            if first.checked_add(*count).is_none_or(|end| end > MAX_PAGES) {
                return Err(bad(format!("run [{pack}, {first}, {count}] out of range")));
            }
            pages = pages.saturating_add(*count);
        }
        if pages > MAX_PAGES || Some(list.len) != pages.checked_mul(PAGE as u64) {
            return Err(bad(format!(
                "its runs make {pages} pages, its length says {} bytes",
                list.len
            )));
        }
        Ok(list)
    }

    /// Reads page list `id` from the store.
    pub fn load(store: &Store, id: &str) -> Result<PageList, FsError> {
        PageList::parse(&store.read(id)?)
    }
}

/// The packs a page list names (for garbage collection and export).
pub fn packs_of(store: &Store, list: &str) -> Result<Vec<String>, FsError> {
    Ok(PageList::load(store, list)?.packs)
}

/// A pack's trailer: where its frames are and what each page holds.
#[derive(Debug, Clone)]
pub struct Trailer {
    /// (offset, compressed length) of each frame.
    pub frames: Vec<(u64, u32)>,
    pub hashes: Vec<Digest>,
}

impl Trailer {
    fn pages(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Pages frame `i` holds.
    fn frame_pages(&self, i: usize) -> usize {
        (self.hashes.len() - i * FRAME_PAGES).min(FRAME_PAGES)
    }
}

/// Decodes a pack's trailer from its last bytes (`tail`) and the pack's
/// length. Hostile input: every count is checked against the length.
pub fn parse_trailer(tail: &[u8], pack_len: u64) -> Result<Trailer, FsError> {
    let bad = |why: &str| FsError::Corrupt(format!("pack: {why}"));
    let (npages, nframes) = trailer_counts(tail, pack_len)?;
    let need = trailer_len(npages, nframes);
    if need > tail.len() as u64 {
        return Err(bad("its trailer is cut short"));
    }
    let t = &tail[tail.len() - need as usize..];
    let mut frames = Vec::with_capacity(nframes as usize);
    let mut offset = 0u64;
    for c in t[..4 * nframes as usize].chunks_exact(4) {
        let clen = u32::from_le_bytes(c.try_into().expect("4 bytes"));
        frames.push((offset, clen));
        offset += u64::from(clen);
    }
    if offset != pack_len - need {
        return Err(bad("its frames do not add up to its length"));
    }
    let hashes = t[4 * nframes as usize..t.len() - TAIL]
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect();
    Ok(Trailer { frames, hashes })
}

/// (pages, frames) from the last [`TAIL`] bytes of `tail`, checked.
fn trailer_counts(tail: &[u8], pack_len: u64) -> Result<(u64, u64), FsError> {
    let bad = |why: &str| FsError::Corrupt(format!("pack: {why}"));
    if tail.len() < TAIL || pack_len < TAIL as u64 || &tail[tail.len() - 8..] != MAGIC {
        return Err(bad("no trailer"));
    }
    let end = &tail[tail.len() - TAIL..];
    let npages = u64::from(u32::from_le_bytes(end[..4].try_into().expect("4 bytes")));
    let nframes = u64::from(u32::from_le_bytes(end[4..8].try_into().expect("4 bytes")));
    if npages == 0 || npages > MAX_PAGES || nframes != npages.div_ceil(FRAME_PAGES as u64) {
        return Err(bad("bad page or frame count"));
    }
    if trailer_len(npages, nframes) > pack_len {
        return Err(bad("shorter than its trailer says"));
    }
    Ok((npages, nframes))
}

fn trailer_len(npages: u64, nframes: u64) -> u64 {
    TAIL as u64 + 4 * nframes + 32 * npages
}

/// Reads the trailer of the pack open as `f` (`len` bytes).
fn read_trailer(f: &File, path: &Path, len: u64) -> Result<Trailer, FsError> {
    let mut end = [0u8; TAIL];
    if len < TAIL as u64 {
        return Err(FsError::Corrupt("pack: no trailer".into()));
    }
    f.read_exact_at(&mut end, len - TAIL as u64)
        .map_err(io_err("read", path))?;
    let (npages, nframes) = trailer_counts(&end, len)?;
    let need = trailer_len(npages, nframes);
    let mut t = vec![0u8; need as usize];
    f.read_exact_at(&mut t, len - need)
        .map_err(io_err("read", path))?;
    parse_trailer(&t, len)
}

/// An open pack.
struct Pack {
    file: File,
    path: PathBuf,
    trailer: Trailer,
}

impl Pack {
    fn open(store: &Store, id: &str) -> Result<Pack, FsError> {
        let (file, len) = store.open_object(id)?;
        let path = store.object_path(id);
        let trailer = read_trailer(&file, &path, len)?;
        Ok(Pack {
            file,
            path,
            trailer,
        })
    }

    /// Frame `i`, decompressed.
    fn frame(&self, i: usize) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::new();
        self.frame_into(i, &mut FrameReader::default(), &mut out)?;
        Ok(out)
    }

    /// Frame `i`, decompressed into `out` (its allocation reused: a fresh
    /// 256 KiB buffer per frame is an mmap and 64 page faults each, which
    /// cost a restore of 1 GiB a quarter of its rebuild).
    fn frame_into(&self, i: usize, r: &mut FrameReader, out: &mut Vec<u8>) -> Result<(), FsError> {
        let (offset, clen) = self.trailer.frames[i];
        r.compressed.resize(clen as usize, 0);
        self.file
            .read_exact_at(&mut r.compressed, offset)
            .map_err(io_err("read", &self.path))?;
        let want = self.trailer.frame_pages(i) * PAGE;
        out.clear();
        out.reserve(want);
        let n = r
            .zstd
            .decompress_to_buffer(&r.compressed, out)
            .map_err(io_err("decompress", &self.path))?;
        if n != want {
            return Err(FsError::Corrupt(format!(
                "pack {}: frame {i} holds {n} bytes, not {want}",
                self.path.display(),
            )));
        }
        Ok(())
    }
}

/// What reading frames reuses from one frame to the next: the compressed
/// bytes' buffer and a zstd context.
struct FrameReader {
    compressed: Vec<u8>,
    zstd: zstd::bulk::Decompressor<'static>,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            compressed: Vec::new(),
            zstd: zstd::bulk::Decompressor::new().expect("a zstd context"),
        }
    }
}

/// Where every page of the live packs is: what a capture deduplicates
/// against. Built from the packs' trailers (32 bytes a page).
#[derive(Debug, Default)]
pub struct PageIndex {
    packs: Vec<String>,
    map: FxHashMap<Digest, (u32, u32)>,
}

impl PageIndex {
    /// The index of `packs` (ids; duplicates and unreadable packs skipped:
    /// a page not found is only stored again).
    pub fn load(store: &Store, packs: impl IntoIterator<Item = String>) -> PageIndex {
        let mut index = PageIndex::default();
        for id in packs {
            if index.packs.contains(&id) {
                continue;
            }
            match Pack::open(store, &id) {
                Ok(p) => index.add(id, &p.trailer.hashes),
                Err(e) => tracing::warn!(pack = %id, error = %e, "pack left out of the page index"),
            }
        }
        index
    }

    fn add(&mut self, id: String, hashes: &[Digest]) {
        let n = self.packs.len() as u32;
        self.packs.push(id);
        for (i, h) in hashes.iter().enumerate() {
            self.map.entry(*h).or_insert((n, i as u32));
        }
    }

    /// Forgets the packs `keep` says no to (garbage collected): their
    /// pages are no longer found.
    pub fn retain_packs(&mut self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<bool> = self
            .packs
            .iter_mut()
            .map(|id| {
                let g = !id.is_empty() && !keep(id);
                if g {
                    id.clear();
                }
                id.is_empty()
            })
            .collect();
        if gone.iter().any(|g| *g) {
            self.map.retain(|_, (p, _)| !gone[*p as usize]);
        }
    }

    /// Pages it knows.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What [`store_images`] did.
#[derive(Debug, Default, Clone)]
pub struct StoredPages {
    /// A page list object per image, in the order given.
    pub lists: Vec<String>,
    /// Bytes added to the store (the pack and the page lists).
    pub new_bytes: u64,
    /// Bytes of pages found in the store (not stored again).
    pub dedup_bytes: u64,
    pub pages: u64,
    pub new_pages: u64,
}

/// A run of pages to store: `count` pages of `files[file]` from page `first`,
/// at page `start` of the numbering across all images.
struct Seg {
    start: u64,
    file: usize,
    first: u64,
    count: u64,
}

/// What is being stored: the source files, and the runs that make the
/// images, one after another.
struct Sources {
    files: Vec<(File, PathBuf)>,
    segs: Vec<Seg>,
}

impl Sources {
    /// The file and page holding page `g`, and how many pages from there
    /// are contiguous in that file.
    fn locate(&self, g: u64) -> (&File, &Path, u64, u64) {
        let i = self.segs.partition_point(|s| s.start + s.count <= g);
        let s = &self.segs[i];
        let (f, p) = &self.files[s.file];
        (f, p, s.first + (g - s.start), s.start + s.count - g)
    }
}

/// Stores the pages images `files` (each a whole number of pages) by page:
/// hashes every page on `threads` threads, writes the pages `index` does not
/// have into one new pack (compressed in parallel), and a page list per
/// image. `index` learns the new pack.
pub fn store_images(
    store: &Store,
    index: &mut PageIndex,
    files: &[PathBuf],
    threads: usize,
) -> Result<StoredPages, FsError> {
    let mut images = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let len = std::fs::metadata(path).map_err(io_err("stat", path))?.len();
        images.push(vec![(i, 0, len / PAGE as u64)]);
    }
    store_runs(store, index, files, &images, threads)
}

/// [`store_images`] of images made of runs `(file, first page, count)`
/// over `files` (an incremental dump made whole: its new pages and those
/// of its parent).
#[tracing::instrument(name = "store_pages", skip_all, fields(images = images.len()))]
pub fn store_runs(
    store: &Store,
    index: &mut PageIndex,
    files: &[PathBuf],
    images: &[Vec<(usize, u64, u64)>],
    threads: usize,
) -> Result<StoredPages, FsError> {
    let mut src = Sources {
        files: Vec::new(),
        segs: Vec::new(),
    };
    for path in files {
        let file = File::open(path).map_err(io_err("open", path))?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        if len % PAGE as u64 != 0 || len / PAGE as u64 > MAX_PAGES {
            return Err(FsError::Corrupt(format!(
                "{}: {len} bytes is not a whole number of pages",
                path.display()
            )));
        }
        src.files.push((file, path.clone()));
    }
    let mut bounds = Vec::new();
    let mut total = 0u64;
    for runs in images {
        let start = total;
        for &(file, first, count) in runs {
            let (f, path) = src.files.get(file).ok_or_else(|| {
                FsError::Corrupt(format!("a run names file {file} of {}", files.len()))
            })?;
            let pages = f.metadata().map_err(io_err("stat", path))?.len() / PAGE as u64;
            if first.checked_add(count).is_none_or(|end| end > pages) {
                return Err(FsError::Corrupt(format!(
                    "{}: pages {first}+{count} beyond its {pages}",
                    path.display()
                )));
            }
            if count > 0 {
                src.segs.push(Seg {
                    start: total,
                    file,
                    first,
                    count,
                });
                total += count;
            }
        }
        bounds.push((start, total - start));
    }
    let hashes = hash_all(&src, total, threads)?;

    // Each page: found in a live pack, found earlier in this capture, or new.
    const NEW: u32 = u32::MAX;
    let mut seen: FxHashMap<Digest, u32> = FxHashMap::default();
    let mut new_pages: Vec<u64> = Vec::new();
    let mut refs: Vec<(u32, u32)> = Vec::with_capacity(total as usize);
    for (g, h) in hashes.iter().enumerate() {
        if let Some(&at) = index.map.get(h) {
            refs.push(at);
        } else if let Some(&k) = seen.get(h) {
            refs.push((NEW, k));
        } else {
            let k = new_pages.len() as u32;
            seen.insert(*h, k);
            new_pages.push(g as u64);
            refs.push((NEW, k));
        }
    }
    let mut out = StoredPages {
        pages: total,
        new_pages: new_pages.len() as u64,
        dedup_bytes: (total - new_pages.len() as u64) * PAGE as u64,
        ..Default::default()
    };
    let new_pack = if new_pages.is_empty() {
        None
    } else {
        let written = write_pack(store, &src, &new_pages, &hashes, threads)?;
        out.new_bytes += if written.new { written.len } else { 0 };
        let new_hashes: Vec<Digest> = new_pages.iter().map(|g| hashes[*g as usize]).collect();
        index.add(written.id.clone(), &new_hashes);
        Some(index.packs.len() as u32 - 1)
    };
    for &(start, pages) in &bounds {
        let refs = &refs[start as usize..(start + pages) as usize];
        let list = page_list(
            pages,
            refs,
            |p| match p {
                NEW => new_pack.expect("new pages were packed"),
                p => p,
            },
            &index.packs,
        );
        let bytes = serde_json::to_vec(&list).expect("a page list serialises");
        let stored = store.put_bytes_counted(&bytes)?;
        if stored.new {
            out.new_bytes += stored.len;
        }
        out.lists.push(stored.id);
    }
    Ok(out)
}

/// The page list of an image whose pages are `refs` (pack in `index`
/// numbering, after `pack` maps the new pack's placeholder).
fn page_list(
    pages: u64,
    refs: &[(u32, u32)],
    pack: impl Fn(u32) -> u32,
    ids: &[String],
) -> PageList {
    let mut packs: Vec<u32> = Vec::new();
    let mut runs: Vec<[u64; 3]> = Vec::new();
    for &(p, page) in refs {
        let p = pack(p);
        let local = match packs.iter().position(|q| *q == p) {
            Some(i) => i,
            None => {
                packs.push(p);
                packs.len() - 1
            }
        } as u64;
        match runs.last_mut() {
            Some([lp, first, count]) if *lp == local && *first + *count == u64::from(page) => {
                *count += 1;
            }
            _ => runs.push([local, u64::from(page), 1]),
        }
    }
    PageList {
        v: 1,
        len: pages * PAGE as u64,
        packs: packs.iter().map(|p| ids[*p as usize].clone()).collect(),
        runs,
    }
}

/// The SHA-256 of every page, in order, on `threads` threads.
fn hash_all(src: &Sources, total: u64, threads: usize) -> Result<Vec<Digest>, FsError> {
    let threads = threads.max(1) as u64;
    let per = total.div_ceil(threads).max(1);
    let ranges: Vec<(u64, u64)> = (0..threads)
        .map(|t| (t * per, ((t + 1) * per).min(total)))
        .filter(|(a, b)| a < b)
        .collect();
    let parts = par_map(ranges, threads as usize, "page hasher", |(from, to)| {
        let mut out = Vec::with_capacity((to - from) as usize);
        let mut buf = vec![0u8; READ_PAGES * PAGE];
        let mut g = from;
        while g < to {
            let (file, path, page, run) = src.locate(g);
            let n = (to - g).min(run).min(READ_PAGES as u64) as usize;
            file.read_exact_at(&mut buf[..n * PAGE], page * PAGE as u64)
                .map_err(io_err("read", path))?;
            out.extend(
                buf[..n * PAGE]
                    .chunks_exact(PAGE)
                    .map(|p| -> Digest { Sha256::digest(p).into() }),
            );
            g += n as u64;
        }
        Ok(out)
    })?;
    Ok(parts.into_iter().flatten().collect())
}

/// Writes the pages `new` (numbering across the sources) as one pack:
/// frames compressed on `threads` threads, a batch at a time, in order.
fn write_pack(
    store: &Store,
    src: &Sources,
    new: &[u64],
    hashes: &[Digest],
    threads: usize,
) -> Result<Compressed, FsError> {
    let mut w = store.writer()?;
    let path = store.root().join("tmp");
    let frames: Vec<&[u64]> = new.chunks(FRAME_PAGES).collect();
    let mut clens: Vec<u32> = Vec::with_capacity(frames.len());
    for batch in frames.chunks(threads.max(1) * 16) {
        let compressed = par_map(batch.to_vec(), threads, "page compressor", |pages| {
            let mut raw = vec![0u8; pages.len() * PAGE];
            // Consecutive pages of one image are read at once.
            let mut i = 0;
            while i < pages.len() {
                let (file, path, page, run) = src.locate(pages[i]);
                let mut n = 1;
                while i + n < pages.len() && pages[i + n] == pages[i] + n as u64 && (n as u64) < run
                {
                    n += 1;
                }
                file.read_exact_at(&mut raw[i * PAGE..(i + n) * PAGE], page * PAGE as u64)
                    .map_err(io_err("read", path))?;
                i += n;
            }
            zstd::bulk::compress(&raw, LEVEL).map_err(io_err("compress", &path))
        })?;
        for c in compressed {
            w.write_all(&c).map_err(io_err("write", &path))?;
            clens.push(u32::try_from(c.len()).expect("a frame compresses to under 4 GiB"));
        }
    }
    let mut t = Vec::with_capacity(trailer_len(new.len() as u64, clens.len() as u64) as usize);
    for c in &clens {
        t.extend_from_slice(&c.to_le_bytes());
    }
    for g in new {
        t.extend_from_slice(&hashes[*g as usize]);
    }
    t.extend_from_slice(&(new.len() as u32).to_le_bytes());
    t.extend_from_slice(&(clens.len() as u32).to_le_bytes());
    t.extend_from_slice(MAGIC);
    w.write_all(&t).map_err(io_err("write", &path))?;
    w.finish()
}

/// Rebuilds the image page list `list_id` describes at `dest`, on
/// `threads` threads (each writes its own part of the file).
pub fn assemble(store: &Store, list_id: &str, dest: &Path, threads: usize) -> Result<(), FsError> {
    rebuild(store, list_id, None, dest, threads).map(|_| ())
}

/// What [`rebuild`] did.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    /// The page list the image now holds.
    pub list: PageList,
    /// Pages written (all of them, unless the image was patched).
    pub pages_written: u64,
}

/// Brings the image at `dest` to what page list `list_id` describes, on
/// `threads` threads. When `dest` holds the image of `previous` (a list of
/// the same length), only the pages where the two differ are written:
/// the work is what changed between them, and nothing for the same list.
/// Otherwise every page is written (over what the file held: an image
/// whose length changed shifts every page after the change).
#[tracing::instrument(name = "assemble_pages", skip_all, fields(dest = %dest.display()))]
pub fn rebuild(
    store: &Store,
    list_id: &str,
    previous: Option<&PageList>,
    dest: &Path,
    threads: usize,
) -> Result<Rebuilt, FsError> {
    let list = PageList::load(store, list_id)?;
    let on_disk = std::fs::metadata(dest).map(|m| m.len()).ok();
    let previous = previous.filter(|p| p.len == list.len && on_disk == Some(list.len));
    // (an image there is overwritten, not truncated first: writing over
    // pages the kernel holds costs less than allocating new ones)
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dest)
        .map_err(io_err("create", dest))?;
    let runs = match previous {
        Some(old) => differing_runs(old, &list),
        None => {
            out.set_len(list.len).map_err(io_err("truncate", dest))?;
            placed_runs(&list)
        }
    };
    // Only the packs these runs read are opened (a list of a long chain
    // names a pack of every capture that changed a page), each run checked
    // against its pack's trailer.
    let mut packs: Vec<Option<Pack>> = list.packs.iter().map(|_| None).collect();
    for r in &runs {
        let slot = packs.get_mut(r.pack).ok_or_else(|| {
            FsError::Corrupt(format!("page list {list_id}: pack {} of none", r.pack))
        })?;
        if slot.is_none() {
            *slot = Some(Pack::open(store, &list.packs[r.pack])?);
        }
        let have = slot.as_ref().map_or(0, |p| p.trailer.pages());
        if r.first + r.count > have {
            return Err(FsError::Corrupt(format!(
                "page list {list_id}: pages {}..{} of pack {} beyond its {have}",
                r.first,
                r.first + r.count,
                r.pack
            )));
        }
    }
    let pages_written = runs.iter().map(|r| r.count).sum();
    write_runs(&packs, runs, &out, dest, threads)?;
    Ok(Rebuilt {
        list,
        pages_written,
    })
}

/// Pages `first..first + count` of pack `pack` go to page `at` of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placed {
    at: u64,
    pack: usize,
    first: u64,
    count: u64,
}

/// Every run of `list`, with its place in the image.
fn placed_runs(list: &PageList) -> Vec<Placed> {
    let mut at = 0;
    list.runs
        .iter()
        .map(|&[pack, first, count]| {
            let r = Placed {
                at,
                pack: pack as usize,
                first,
                count,
            };
            at += count;
            r
        })
        .collect()
}

/// The runs of `new` (its packs' indices) where the image of `old`, of
/// the same length, holds other pages: a page is the same when it comes
/// from the same page of the same pack object.
fn differing_runs(old: &PageList, new: &PageList) -> Vec<Placed> {
    let (olds, news) = (placed_runs(old), placed_runs(new));
    let mut out: Vec<Placed> = Vec::new();
    let (mut i, mut j, mut pos) = (0, 0, 0u64);
    while i < olds.len() && j < news.len() {
        let (o, n) = (olds[i], news[j]);
        let end = (o.at + o.count).min(n.at + n.count);
        let same = old.packs[o.pack] == new.packs[n.pack]
            && o.first + (pos - o.at) == n.first + (pos - n.at);
        if !same {
            let first = n.first + (pos - n.at);
            match out.last_mut() {
                Some(l)
                    if l.pack == n.pack && l.at + l.count == pos && l.first + l.count == first =>
                {
                    l.count += end - pos;
                }
                _ => out.push(Placed {
                    at: pos,
                    pack: n.pack,
                    first,
                    count: end - pos,
                }),
            }
        }
        pos = end;
        if pos == o.at + o.count {
            i += 1;
        }
        if pos == n.at + n.count {
            j += 1;
        }
    }
    out
}

/// Writes `runs` into `out`, cut into one part per thread by the pages
/// they hold.
fn write_runs(
    packs: &[Option<Pack>],
    runs: Vec<Placed>,
    out: &File,
    dest: &Path,
    threads: usize,
) -> Result<(), FsError> {
    let total: u64 = runs.iter().map(|r| r.count).sum();
    if total == 0 {
        return Ok(());
    }
    let per = total.div_ceil(threads.max(1) as u64).max(1);
    let mut parts: Vec<Vec<Placed>> = Vec::new();
    let mut done = 0u64;
    for mut r in runs {
        while r.count > 0 {
            let part = (done / per) as usize;
            let n = r.count.min((part as u64 + 1) * per - done);
            if parts.len() <= part {
                parts.resize_with(part + 1, Vec::new);
            }
            parts[part].push(Placed { count: n, ..r });
            done += n;
            r.at += n;
            r.first += n;
            r.count -= n;
        }
    }
    par_map(parts, threads, "page assembler", |part| {
        let mut cache: FxHashMap<usize, (usize, Vec<u8>)> = FxHashMap::default();
        let mut reader = FrameReader::default();
        let mut buf: Vec<u8> = Vec::with_capacity(READ_PAGES * PAGE);
        // The image offset of buf's first byte.
        let mut buf_at = 0u64;
        for r in part {
            let at = r.at * PAGE as u64;
            if buf_at + buf.len() as u64 != at {
                out.write_all_at(&buf, buf_at)
                    .map_err(io_err("write", dest))?;
                buf.clear();
                buf_at = at;
            }
            for page in r.first..r.first + r.count {
                let frame = page as usize / FRAME_PAGES;
                let (cached, data) = cache.entry(r.pack).or_insert((usize::MAX, Vec::new()));
                if *cached != frame {
                    *cached = usize::MAX;
                    let pack = packs[r.pack]
                        .as_ref()
                        .ok_or_else(|| FsError::Corrupt(format!("pack {} not opened", r.pack)))?;
                    pack.frame_into(frame, &mut reader, data)?;
                    *cached = frame;
                }
                let off = (page as usize % FRAME_PAGES) * PAGE;
                buf.extend_from_slice(&data[off..off + PAGE]);
                if buf.len() == buf.capacity() {
                    out.write_all_at(&buf, buf_at)
                        .map_err(io_err("write", dest))?;
                    buf_at += buf.len() as u64;
                    buf.clear();
                }
            }
        }
        out.write_all_at(&buf, buf_at)
            .map_err(io_err("write", dest))
    })?;
    Ok(())
}

/// Checks a pack from outside (an archive's): every frame decompresses to
/// its pages and every page matches the trailer's hash. Returns its pages.
pub fn verify_pack(f: &File, path: &Path) -> Result<u64, FsError> {
    let len = f.metadata().map_err(io_err("stat", path))?.len();
    let pack = Pack {
        file: f.try_clone().map_err(io_err("open", path))?,
        path: path.to_owned(),
        trailer: read_trailer(f, path, len)?,
    };
    for i in 0..pack.trailer.frames.len() {
        let data = pack.frame(i)?;
        for (j, page) in data.chunks_exact(PAGE).enumerate() {
            let want = &pack.trailer.hashes[i * FRAME_PAGES + j];
            if Sha256::digest(page).as_slice() != want {
                return Err(FsError::Corrupt(format!(
                    "pack: page {} does not match its hash",
                    i * FRAME_PAGES + j
                )));
            }
        }
    }
    Ok(pack.trailer.pages())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    fn random_pages(n: usize, seed: &mut u64) -> Vec<u8> {
        (0..n * PAGE / 8)
            .flat_map(|_| rng(seed).to_le_bytes())
            .collect()
    }

    fn setup() -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store")).unwrap();
        (tmp, store)
    }

    #[test]
    fn images_come_back_byte_for_byte_and_a_small_change_adds_only_its_pages() {
        let (tmp, store) = setup();
        let mut seed = 7;
        let a = tmp.path().join("pages-1.img");
        let b = tmp.path().join("pages-2.img");
        let mut mem = random_pages(1000, &mut seed);
        // repeated pages inside one image are stored once
        mem[PAGE * 10..PAGE * 11].fill(0);
        mem[PAGE * 20..PAGE * 21].fill(0);
        std::fs::write(&a, &mem).unwrap();
        std::fs::write(&b, random_pages(3, &mut seed)).unwrap();
        let mut index = PageIndex::default();
        let first = store_images(&store, &mut index, &[a.clone(), b.clone()], 3).unwrap();
        assert_eq!(first.pages, 1003);
        assert_eq!(first.new_pages, 1002);

        let orig = mem.clone();
        // 1% of the pages change, scattered
        for _ in 0..10 {
            let p = (rng(&mut seed) % 1000) as usize;
            mem[p * PAGE..(p + 1) * PAGE].copy_from_slice(&random_pages(1, &mut seed));
        }
        std::fs::write(&a, &mem).unwrap();
        let second = store_images(&store, &mut index, &[a.clone(), b.clone()], 2).unwrap();
        assert!(second.new_pages <= 10, "{second:?}");
        assert!(second.new_pages >= 9, "{second:?}");
        assert!(second.new_bytes < 12 * PAGE as u64 + 4096, "{second:?}");
        assert_eq!(
            second.lists[1], first.lists[1],
            "an unchanged image is the same list"
        );

        // Both versions come back, from a fresh index too.
        for (list, want) in [(&first.lists[0], &orig), (&second.lists[0], &mem)] {
            let out = tmp.path().join("out.img");
            assemble(&store, list, &out, 2).unwrap();
            assert!(std::fs::read(&out).unwrap() == *want);
        }
        let out = tmp.path().join("out1.img");
        assemble(&store, &first.lists[1], &out, 1).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&b).unwrap());

        let packs: Vec<String> = [&first.lists[0], &second.lists[0]]
            .iter()
            .flat_map(|l| packs_of(&store, l).unwrap())
            .collect();
        let fresh = PageIndex::load(&store, packs.clone());
        assert_eq!(fresh.len(), index.len());
        // The second capture's pack collected: only the first's pages stay.
        let mut pruned = fresh;
        pruned.retain_packs(|id| id == packs[0]);
        assert_eq!(pruned.len(), first.new_pages as usize);
    }

    #[test]
    fn an_image_is_patched_where_it_differs_and_left_alone_where_not() {
        let (tmp, store) = setup();
        let mut seed = 5;
        let a = tmp.path().join("pages-1.img");
        let mut mem = random_pages(700, &mut seed);
        std::fs::write(&a, &mem).unwrap();
        let mut index = PageIndex::default();
        let first = store_images(&store, &mut index, std::slice::from_ref(&a), 2).unwrap();
        let mut changed = std::collections::BTreeSet::new();
        for _ in 0..9 {
            let p = (rng(&mut seed) % 700) as usize;
            changed.insert(p);
            mem[p * PAGE..(p + 1) * PAGE].copy_from_slice(&random_pages(1, &mut seed));
        }
        std::fs::write(&a, &mem).unwrap();
        let second = store_images(&store, &mut index, std::slice::from_ref(&a), 2).unwrap();
        let out = tmp.path().join("out.img");
        let one = rebuild(&store, &first.lists[0], None, &out, 2).unwrap();
        assert_eq!(one.pages_written, 700);
        // The other checkpoint: only the pages that changed are written.
        let two = rebuild(&store, &second.lists[0], Some(&one.list), &out, 2).unwrap();
        assert_eq!(two.pages_written, changed.len() as u64);
        assert!(std::fs::read(&out).unwrap() == mem);
        // The same list again: nothing to write.
        let again = rebuild(&store, &second.lists[0], Some(&two.list), &out, 3).unwrap();
        assert_eq!(again.pages_written, 0);
        // And back: the first image, byte for byte.
        let back = rebuild(&store, &first.lists[0], Some(&again.list), &out, 2).unwrap();
        assert_eq!(back.pages_written, changed.len() as u64);
        let mut want = tmp.path().join("want.img");
        assemble(&store, &first.lists[0], &want, 1).unwrap();
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&want).unwrap());
        // A previous list of another length (or a file that is not its
        // image) makes a whole rebuild.
        want = tmp.path().join("other.img");
        std::fs::write(&want, b"short").unwrap();
        let whole = rebuild(&store, &first.lists[0], Some(&one.list), &want, 2).unwrap();
        assert_eq!(whole.pages_written, 700);
        assert!(std::fs::read(&want).unwrap() == std::fs::read(&out).unwrap());
    }

    #[test]
    fn differing_runs_compare_pages_by_pack_and_place() {
        let list = |packs: &[&str], runs: Vec<[u64; 3]>| PageList {
            v: 1,
            len: runs.iter().map(|r| r[2]).sum::<u64>() * PAGE as u64,
            packs: packs.iter().map(|p| p.to_string()).collect(),
            runs,
        };
        let old = list(&["a", "b"], vec![[0, 0, 10], [1, 0, 5]]);
        // The same pages under other pack indices: nothing differs.
        let same = list(&["b", "a"], vec![[1, 0, 4], [1, 4, 6], [0, 0, 5]]);
        assert!(differing_runs(&old, &same).is_empty());
        // Pages 3..5 from pack c, page 12 shifted within b.
        let new = list(
            &["a", "b", "c"],
            vec![
                [0, 0, 3],
                [2, 7, 2],
                [0, 5, 5],
                [1, 0, 2],
                [1, 3, 1],
                [1, 3, 2],
            ],
        );
        let d = differing_runs(&old, &new);
        let got: Vec<(u64, usize, u64, u64)> =
            d.iter().map(|r| (r.at, r.pack, r.first, r.count)).collect();
        assert_eq!(got, vec![(3, 2, 7, 2), (12, 1, 3, 1)]);
    }

    #[test]
    fn an_image_made_of_runs_over_two_files_comes_back_whole() {
        let (tmp, store) = setup();
        let mut seed = 11;
        let (a, b) = (random_pages(4, &mut seed), random_pages(3, &mut seed));
        let (pa, pb) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::write(&pa, &a).unwrap();
        std::fs::write(&pb, &b).unwrap();
        let runs = vec![vec![(1, 1, 2), (0, 0, 1)], vec![(0, 3, 1)]];
        let s = store_runs(&store, &mut PageIndex::default(), &[pa, pb], &runs, 2).unwrap();
        let out = tmp.path().join("out");
        assemble(&store, &s.lists[0], &out, 2).unwrap();
        let want = [&b[PAGE..3 * PAGE], &a[..PAGE]].concat();
        assert!(std::fs::read(&out).unwrap() == want);
        assemble(&store, &s.lists[1], &out, 2).unwrap();
        assert!(std::fs::read(&out).unwrap() == a[3 * PAGE..]);
        // A run beyond its file is refused.
        let bad = vec![vec![(1, 2, 2)]];
        let files = [tmp.path().join("a"), tmp.path().join("b")];
        assert!(store_runs(&store, &mut PageIndex::default(), &files, &bad, 2).is_err());
    }

    #[test]
    fn an_empty_image_is_an_empty_list() {
        let (tmp, store) = setup();
        let a = tmp.path().join("pages-1.img");
        std::fs::write(&a, b"").unwrap();
        let mut index = PageIndex::default();
        let s = store_images(&store, &mut index, &[a], 2).unwrap();
        let out = tmp.path().join("out.img");
        assemble(&store, &s.lists[0], &out, 2).unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
    }

    #[test]
    fn a_partial_page_is_refused() {
        let (tmp, store) = setup();
        let a = tmp.path().join("pages-1.img");
        std::fs::write(&a, vec![1u8; PAGE + 1]).unwrap();
        let err = store_images(&store, &mut PageIndex::default(), &[a], 2).unwrap_err();
        assert!(err.to_string().contains("whole number of pages"), "{err}");
    }

    #[test]
    fn a_tampered_pack_fails_verification_and_a_good_one_passes() {
        let (tmp, store) = setup();
        let mut seed = 3;
        let a = tmp.path().join("pages-1.img");
        std::fs::write(&a, random_pages(130, &mut seed)).unwrap();
        let s = store_images(&store, &mut PageIndex::default(), &[a], 2).unwrap();
        let pack = packs_of(&store, &s.lists[0]).unwrap().remove(0);
        let path = store.object_path(&pack);
        assert_eq!(
            verify_pack(&File::open(&path).unwrap(), &path).unwrap(),
            130
        );
        // A pack whose trailer claims another page's hash for a page.
        let mut bytes = std::fs::read(&path).unwrap();
        let hashes_at = bytes.len() - TAIL - 32 * 130;
        bytes[hashes_at] ^= 1;
        let bad = tmp.path().join("bad");
        std::fs::write(&bad, &bytes).unwrap();
        let err = verify_pack(&File::open(&bad).unwrap(), &bad).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        // Truncated anywhere: refused, never a panic.
        for cut in [0, 1, 15, 16, 17, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&bad, &bytes[..cut]).unwrap();
            assert!(
                verify_pack(&File::open(&bad).unwrap(), &bad).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn hostile_page_lists_are_refused() {
        let id = format!("{}-{}", "a".repeat(64), "b".repeat(16));
        let ok = format!(r#"{{"v":1,"len":8192,"packs":["{id}"],"runs":[[0,5,2]]}}"#);
        assert!(PageList::parse(ok.as_bytes()).is_ok());
        for bad in [
            format!(r#"{{"v":2,"len":8192,"packs":["{id}"],"runs":[[0,5,2]]}}"#),
            format!(r#"{{"v":1,"len":4096,"packs":["{id}"],"runs":[[0,5,2]]}}"#),
            format!(r#"{{"v":1,"len":8192,"packs":["{id}"],"runs":[[1,5,2]]}}"#),
            format!(r#"{{"v":1,"len":0,"packs":["{id}"],"runs":[[0,5,0]]}}"#),
            r#"{"v":1,"len":8192,"packs":["../x"],"runs":[[0,5,2]]}"#.to_string(),
            format!(r#"{{"v":1,"len":8192,"packs":["{id}"],"runs":[[0,18446744073709551615,2]]}}"#),
            "[]".to_string(),
        ] {
            assert!(PageList::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostile_trailers_are_refused_without_panicking() {
        let mut t = vec![0u8; 4 + 32];
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(MAGIC);
        // a frame of length 0 and a pack that is only the trailer
        assert!(parse_trailer(&t, t.len() as u64).is_ok());
        assert!(parse_trailer(&t, t.len() as u64 + 1).is_err());
        assert!(parse_trailer(&t, 3).is_err());
        let mut many = t.clone();
        let n = many.len();
        many[n - 16..n - 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_trailer(&many, many.len() as u64).is_err());
        assert!(parse_trailer(&t[1..], t.len() as u64).is_err());
    }
}
