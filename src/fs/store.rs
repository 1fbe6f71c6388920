//! The content-addressed store: `objects/<aa>/<sha256>-<meta>` where the
//! name is the SHA-256 of the content plus a short digest of the inode
//! metadata (mode, owner, mtime, xattrs). Layers hard-link objects, and
//! metadata lives in the inode, so each metadata variant of some content is
//! its own object; unchanged files across checkpoints share one.
//!
//! Objects are written to `tmp/` and renamed into place, never modified
//! after. Writes are not fsynced one by one: [`Store::sync`] (one `syncfs`)
//! makes them durable before any manifest that references them is published.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{FsError, io_err};

const CHUNK: usize = 1 << 20;

/// Inode metadata an object carries.
#[derive(Debug, Clone)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    /// Hex-encoded values.
    pub xattrs: BTreeMap<String, String>,
}

impl Meta {
    /// The short digest of the metadata that ends an object's name.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!(
            "{:o}:{}:{}:{}",
            self.mode, self.uid, self.gid, self.mtime_ns
        ));
        for (k, v) in &self.xattrs {
            h.update(format!("|{k}={v}"));
        }
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A file copied into the store's temp dir, not yet hashed.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    meta: Meta,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Whether `id` is well formed: `<sha256 hex>-<metadata key hex>`.
pub fn valid_id(id: &str) -> bool {
    id.len() > 64 && id.len() < 100 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// zstd worker threads for large compressed objects (CRIU images).
const COMPRESS_WORKERS: u32 = 4;

/// A file stored compressed: its object, the object's size, and whether
/// the store did not have it yet.
#[derive(Debug, Clone)]
pub struct Compressed {
    pub id: String,
    pub len: u64,
    pub new: bool,
}

/// An object being written ([`Store::writer`]); removed unless finished.
pub struct ObjectWriter<'a> {
    store: &'a Store,
    tmp: PathBuf,
    file: Option<File>,
    hash: Sha256,
    len: u64,
}

impl Write for ObjectWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self.file.as_mut().ok_or(io::ErrorKind::BrokenPipe)?;
        let n = file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter<'_> {
    /// Names the object by its content and moves it into the store.
    pub fn finish(mut self) -> Result<Compressed, FsError> {
        drop(self.file.take());
        let hash = std::mem::replace(&mut self.hash, Sha256::new());
        let id = format!("{}-{}", hex(&hash.finalize()), Store::bytes_meta().key());
        let new = self.store.publish(&self.tmp, &id)?;
        Ok(Compressed {
            id,
            len: self.len,
            new,
        })
    }
}

impl Drop for ObjectWriter<'_> {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl Store {
    /// Opens the store at `root`, removing temp files a crash left.
    pub fn open(root: &Path) -> Result<Self, FsError> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err("clean", &tmp))?;
        }
        for d in [root.join("objects"), tmp] {
            fs::create_dir_all(&d).map_err(io_err("create", &d))?;
        }
        Ok(Store {
            root: root.to_owned(),
        })
    }

    /// Removes every temp file (staged copies a failed capture left). Only
    /// while no capture runs.
    pub fn clean_temp(&self) {
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let _ = fs::remove_file(entry.path());
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_path(&self, id: &str) -> PathBuf {
        let prefix = id.get(..2).unwrap_or("xx");
        self.root.join("objects").join(prefix).join(id)
    }

    pub fn has(&self, id: &str) -> bool {
        valid_id(id) && self.object_path(id).exists()
    }

    fn temp(&self) -> Result<(PathBuf, File), FsError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self
            .root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("create", &path))?;
        Ok((path, f))
    }

    /// Moves `tmp` in as object `id`; false when the store had it already.
    fn publish(&self, tmp: &Path, id: &str) -> Result<bool, FsError> {
        let dest = self.object_path(id);
        if dest.exists() {
            let _ = fs::remove_file(tmp);
            return Ok(false);
        }
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        fs::rename(tmp, &dest).map_err(io_err("rename", &dest))?;
        Ok(true)
    }

    /// Copies `src` into the store (holes stay holes), with `meta` applied to
    /// the object's inode. Returns the object id.
    pub fn put_file(&self, src: &Path, meta: &Meta) -> Result<String, FsError> {
        let staged = self.stage_file(src, meta)?;
        self.commit(staged)
    }

    /// The fast half of [`Store::put_file`], for while services are frozen:
    /// an in-kernel copy (`copy_file_range`, data segments only) into the
    /// store's temp dir, no hashing.
    pub fn stage_file(&self, src: &Path, meta: &Meta) -> Result<Staged, FsError> {
        let input = File::open(src).map_err(io_err("open", src))?;
        self.stage_open(&input, src, meta)
    }

    /// [`Store::stage_file`] of a file already open (`src` names it in errors).
    pub fn stage_open(&self, input: &File, src: &Path, meta: &Meta) -> Result<Staged, FsError> {
        let (tmp, out) = self.temp()?;
        let staged = Staged {
            tmp: tmp.clone(),
            meta: meta.clone(),
        };
        let result = (|| {
            let len = input.metadata().map_err(io_err("stat", src))?.len();
            copy_segments(input, &out, len, src, &tmp)
        })();
        match result {
            Ok(()) => Ok(staged),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// The slow half: hashes a staged copy, applies its metadata and makes it
    /// an object (or drops it when the object exists). Returns the object id.
    pub fn commit(&self, staged: Staged) -> Result<String, FsError> {
        let result = (|| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&staged.tmp)
                .map_err(io_err("open", &staged.tmp))?;
            let hash = hash_sparse(&f, &staged.tmp)?;
            let id = format!("{hash}-{}", staged.meta.key());
            if self.object_path(&id).exists() {
                return Ok((id, false));
            }
            apply_meta(&f, &staged.tmp, &staged.meta)?;
            Ok((id, true))
        })();
        match result {
            Ok((id, true)) => {
                self.publish(&staged.tmp, &id)?;
                Ok(id)
            }
            Ok((id, false)) => {
                let _ = fs::remove_file(&staged.tmp);
                Ok(id)
            }
            Err(e) => {
                let _ = fs::remove_file(&staged.tmp);
                Err(e)
            }
        }
    }

    /// The metadata of objects that are not files of the environment.
    pub fn bytes_meta() -> Meta {
        Meta {
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            xattrs: BTreeMap::new(),
        }
    }

    /// Stores bytes (a manifest) as an object (mode 0600, root).
    pub fn put_bytes(&self, data: &[u8]) -> Result<String, FsError> {
        Ok(self.put_bytes_counted(data)?.id)
    }

    /// [`Store::put_bytes`], saying whether the object is new.
    pub fn put_bytes_counted(&self, data: &[u8]) -> Result<Compressed, FsError> {
        let hash = hex(&Sha256::digest(data));
        let id = format!("{hash}-{}", Self::bytes_meta().key());
        let len = data.len() as u64;
        if self.object_path(&id).exists() {
            return Ok(Compressed {
                id,
                len,
                new: false,
            });
        }
        let (tmp, mut out) = self.temp()?;
        out.write_all(data).map_err(io_err("write", &tmp))?;
        drop(out);
        let new = self.publish(&tmp, &id)?;
        Ok(Compressed { id, len, new })
    }

    /// A new object written through [`Write`]: hashed as it goes, named by
    /// its content when [`ObjectWriter::finish`]ed (bytes metadata).
    pub fn writer(&self) -> Result<ObjectWriter<'_>, FsError> {
        let (tmp, file) = self.temp()?;
        Ok(ObjectWriter {
            store: self,
            tmp,
            file: Some(file),
            hash: Sha256::new(),
            len: 0,
        })
    }

    /// Stores bytes compressed (zstd), as [`Store::put_file_compressed`].
    pub fn put_bytes_compressed(&self, data: &[u8]) -> Result<Compressed, FsError> {
        let path = self.root.join("tmp");
        let mut w = self.writer()?;
        let c = zstd::bulk::compress(data, 1).map_err(io_err("compress", &path))?;
        w.write_all(&c).map_err(io_err("write", &path))?;
        w.finish()
    }

    /// Stores a file compressed (zstd, streaming: any size). Returns the
    /// object id and the compressed size.
    pub fn put_file_compressed(&self, src: &Path) -> Result<Compressed, FsError> {
        let mut input = File::open(src).map_err(io_err("open", src))?;
        let mut enc =
            zstd::stream::Encoder::new(self.writer()?, 1).map_err(io_err("compress", src))?;
        // Compressed by worker threads while this one hashes and writes
        // what they produced. A fixed count, so that the same content is
        // the same object on every machine (objects are named by the
        // compressed bytes). Without threads in libzstd: one.
        let _ = enc.multithread(COMPRESS_WORKERS);
        io::copy(&mut input, &mut enc).map_err(io_err("compress", src))?;
        enc.finish().map_err(io_err("compress", src))?.finish()
    }

    /// Writes the decompressed content of object `id` (stored by
    /// [`Store::put_file_compressed`]) to `dest`.
    pub fn extract_compressed(&self, id: &str, dest: &Path) -> Result<(), FsError> {
        if !valid_id(id) {
            return Err(FsError::Corrupt(format!("bad object id {id:?}")));
        }
        let src = self.object_path(id);
        let input = File::open(&src).map_err(io_err("open", &src))?;
        let mut out = File::create(dest).map_err(io_err("create", dest))?;
        let mut dec = zstd::stream::Decoder::new(input).map_err(io_err("decompress", &src))?;
        io::copy(&mut dec, &mut out).map_err(io_err("decompress", &src))?;
        Ok(())
    }

    pub fn read(&self, id: &str) -> Result<Vec<u8>, FsError> {
        if !valid_id(id) {
            return Err(FsError::Corrupt(format!("bad object id {id:?}")));
        }
        let p = self.object_path(id);
        fs::read(&p).map_err(io_err("read", &p))
    }

    /// Makes every object written so far durable (one `syncfs`).
    pub fn sync(&self) -> Result<(), FsError> {
        let dir = File::open(&self.root).map_err(io_err("open", &self.root))?;
        nix::unistd::syncfs(dir.as_fd()).map_err(|e| io_err("syncfs", &self.root)(e.into()))
    }

    /// Bytes of every object (their lengths: what the store holds).
    pub fn objects_bytes(&self) -> u64 {
        objects_bytes(&self.root)
    }

    /// Deletes every object not in `keep`. Returns (objects, bytes) freed.
    pub fn collect_garbage(&self, keep: &HashSet<String>) -> Result<(u64, u64), FsError> {
        let (mut n, mut bytes) = (0, 0);
        let objects = self.root.join("objects");
        for dir in fs::read_dir(&objects).map_err(io_err("read dir", &objects))? {
            let dir = dir.map_err(io_err("read dir", &objects))?.path();
            for obj in fs::read_dir(&dir).map_err(io_err("read dir", &dir))? {
                let obj = obj.map_err(io_err("read dir", &dir))?;
                let name = obj.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    let size = obj.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
                    fs::remove_file(obj.path()).map_err(io_err("remove", &obj.path()))?;
                    n += 1;
                    bytes += size;
                }
            }
        }
        Ok((n, bytes))
    }
}

/// Bytes of every object of the store at `root` (read-only: for a store
/// another process owns too).
pub fn objects_bytes(root: &Path) -> u64 {
    fs::read_dir(root.join("objects"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter_map(|o| o.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The content digest an object id starts with.
pub fn id_digest(id: &str) -> &str {
    id.get(..64).unwrap_or("")
}

/// Objects received from outside (an imported archive), kept in a private
/// dir under the store's `tmp/` until [`Staging::publish`] moves them in.
/// Dropped unpublished, it removes everything it holds.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    published: bool,
}

impl Store {
    /// A new, empty staging dir.
    pub fn staging(&self) -> Result<Staging, FsError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self
            .root
            .join("tmp")
            .join(format!("import-{}-{n}", std::process::id()));
        fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        Ok(Staging {
            dir,
            published: false,
        })
    }

    /// Opens object `id` for reading: the file and its (logical) size.
    pub fn open_object(&self, id: &str) -> Result<(File, u64), FsError> {
        if !valid_id(id) {
            return Err(FsError::Corrupt(format!("bad object id {id:?}")));
        }
        let p = self.object_path(id);
        let f = File::open(&p).map_err(io_err("open", &p))?;
        let len = f.metadata().map_err(io_err("stat", &p))?.len();
        Ok((f, len))
    }
}

impl Staging {
    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// A staged object, open for reading, and its path.
    pub fn open(&self, id: &str) -> Result<(File, PathBuf), FsError> {
        if !valid_id(id) {
            return Err(FsError::Corrupt(format!("bad object id {id:?}")));
        }
        let path = self.path(id);
        let f = File::open(&path).map_err(io_err("open", &path))?;
        Ok((f, path))
    }

    /// Holds an object the store already has (a hard link: a garbage
    /// collection meanwhile cannot take its content away). False when the
    /// store does not have it.
    pub fn keep_existing(&self, store: &Store, id: &str) -> Result<bool, FsError> {
        if !store.has(id) {
            return Ok(false);
        }
        let dest = self.path(id);
        match fs::hard_link(store.object_path(id), &dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("link", &dest)(e)),
        }
    }

    /// Writes object `id` from exactly `size` bytes of `r` (blocks of zeros
    /// become holes) with `meta` applied. Returns the SHA-256 of what was
    /// read; the caller compares it with the id.
    pub fn write(
        &self,
        id: &str,
        r: &mut dyn io::Read,
        size: u64,
        meta: &Meta,
    ) -> Result<String, FsError> {
        use std::io::{Seek, SeekFrom};
        const BLOCK: usize = 64 * 1024;
        if !valid_id(id) {
            return Err(FsError::Corrupt(format!("bad object id {id:?}")));
        }
        let path = self.path(id);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("create", &path))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; BLOCK];
        let mut left = size;
        while left > 0 {
            let want = (left as usize).min(BLOCK);
            r.read_exact(&mut buf[..want])
                .map_err(io_err("read archive for", &path))?;
            h.update(&buf[..want]);
            if buf[..want].iter().all(|b| *b == 0) {
                f.seek(SeekFrom::Current(want as i64))
                    .map_err(io_err("seek", &path))?;
            } else {
                f.write_all(&buf[..want]).map_err(io_err("write", &path))?;
            }
            left -= want as u64;
        }
        f.set_len(size).map_err(io_err("truncate", &path))?;
        apply_meta(&f, &path, meta)?;
        Ok(hex(&h.finalize()))
    }

    /// Moves every staged object into the store; one the store gained
    /// meanwhile is dropped. Returns how many objects were new.
    pub fn publish(mut self, store: &Store) -> Result<u64, FsError> {
        let mut new = 0;
        for entry in fs::read_dir(&self.dir).map_err(io_err("read dir", &self.dir))? {
            let entry = entry.map_err(io_err("read dir", &self.dir))?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if !valid_id(&id) {
                continue;
            }
            let dest = store.object_path(&id);
            if dest.exists() {
                continue; // dropped with the dir
            }
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            }
            fs::rename(entry.path(), &dest).map_err(io_err("rename", &dest))?;
            new += 1;
        }
        self.published = true;
        let _ = fs::remove_dir_all(&self.dir);
        Ok(new)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Lowercase hex of `b` (object names, xattr values).
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The data segments of a file below `len`: `(start, end)` pairs found with
/// SEEK_DATA/SEEK_HOLE (the whole file where holes are not supported).
pub(crate) fn data_segments(f: &File, len: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{Whence, lseek};
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match lseek(f.as_fd(), pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole remains
            Err(_) => return vec![(0, len)],
        };
        if start >= len {
            break;
        }
        let end = match lseek(f.as_fd(), start as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(len),
            Err(_) => len,
        };
        out.push((start, end));
        pos = end;
    }
    out
}

/// Copies the data segments of `input` in the kernel; holes stay holes.
fn copy_segments(
    input: &File,
    out: &File,
    len: u64,
    src: &Path,
    dst: &Path,
) -> Result<(), FsError> {
    for (start, end) in data_segments(input, len) {
        let (mut off_in, mut off_out) = (start as i64, start as i64);
        let mut left = end - start;
        while left > 0 {
            let n = nix::fcntl::copy_file_range(
                input.as_fd(),
                Some(&mut off_in),
                out.as_fd(),
                Some(&mut off_out),
                left as usize,
            )
            .map_err(|e| io_err("copy_file_range", src)(e.into()))?;
            if n == 0 {
                break; // shrank meanwhile: only a writer outside the freeze could do this
            }
            left -= n as u64;
        }
    }
    out.set_len(len).map_err(io_err("truncate", dst))
}

/// SHA-256 of a file's logical content (holes hash as zeros).
fn hash_sparse(f: &File, path: &Path) -> Result<String, FsError> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata().map_err(io_err("stat", path))?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let zeros = vec![0u8; CHUNK];
    let mut pos = 0u64;
    let feed_zeros = |h: &mut Sha256, mut n: u64| {
        while n > 0 {
            let k = n.min(CHUNK as u64) as usize;
            h.update(&zeros[..k]);
            n -= k as u64;
        }
    };
    for (start, end) in data_segments(f, len) {
        feed_zeros(&mut h, start - pos);
        let mut off = start;
        while off < end {
            let want = ((end - off) as usize).min(CHUNK);
            let n = f
                .read_at(&mut buf[..want], off)
                .map_err(io_err("read", path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
        pos = off;
    }
    feed_zeros(&mut h, len - pos);
    Ok(hex(&h.finalize()))
}

fn apply_meta(f: &File, path: &Path, meta: &Meta) -> Result<(), FsError> {
    use nix::sys::stat::{Mode, fchmod, futimens};
    use nix::sys::time::TimeSpec;
    use nix::unistd::{Gid, Uid, fchown};
    fchown(
        f.as_fd(),
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    )
    .map_err(|e| io_err("chown", path)(e.into()))?;
    fchmod(f.as_fd(), Mode::from_bits_truncate(meta.mode))
        .map_err(|e| io_err("chmod", path)(e.into()))?;
    for (k, v) in &meta.xattrs {
        let val: Vec<u8> = (0..v.len() / 2)
            .filter_map(|i| u8::from_str_radix(&v[2 * i..2 * i + 2], 16).ok())
            .collect();
        xattr::set(path, k, &val).map_err(io_err("setxattr", path))?;
    }
    let ts = TimeSpec::new(
        meta.mtime_ns.div_euclid(1_000_000_000),
        meta.mtime_ns.rem_euclid(1_000_000_000),
    );
    futimens(f.as_fd(), &ts, &ts).map_err(|e| io_err("utimens", path)(e.into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn dedups_and_keeps_holes() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("store")).unwrap();
        let src = d.path().join("sparse");
        let mut f = File::create(&src).unwrap();
        f.seek(SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        let meta = Meta {
            mode: 0o640,
            uid: 0,
            gid: 0,
            mtime_ns: 1_700_000_000_123_456_789,
            xattrs: BTreeMap::new(),
        };
        let id = store.put_file(&src, &meta).unwrap();
        let again = store.put_file(&src, &meta).unwrap();
        assert_eq!(id, again);
        let md = fs::metadata(store.object_path(&id)).unwrap();
        assert_eq!(md.len(), (64 << 20) + 3);
        assert!(
            md.blocks() * 512 < 1 << 20,
            "holes were filled: {} blocks",
            md.blocks()
        );
        assert_eq!(md.mode() & 0o7777, 0o640);
        assert_eq!(md.mtime_nsec(), 123_456_789);
        let other = store
            .put_file(
                &src,
                &Meta {
                    mode: 0o600,
                    ..meta.clone()
                },
            )
            .unwrap();
        assert_ne!(id, other, "another mode is another object");
        assert_eq!(id[..64], other[..64], "same content hash");
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
        let keep: HashSet<String> = [id.clone()].into();
        assert_eq!(store.collect_garbage(&keep).unwrap().0, 1);
        assert!(store.has(&id) && !store.has(&other));
    }
}
