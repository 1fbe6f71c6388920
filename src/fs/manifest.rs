//! Manifests: what a checkpoint's tree is, entry by entry, relative to the
//! base. Built by scanning the overlay upper dir (only files whose
//! inode/size/mtime/ctime changed are read) and merging the scan onto the
//! manifest of the layer the environment was restored from; turned back into
//! a layer dir of hard links into the store.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::scan::OPAQUE_XATTR;
use super::store::Store;
use super::{FsError, io_err};

/// A shard holds about this many entries (the shard count is a power of
/// two chosen from the manifest's size).
const SHARD_TARGET: usize = 256;
const MAX_SHARD_BITS: u8 = 14;
/// The stored form: an index naming one store object per shard.
const FORMAT: u32 = 2;

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

impl Entry {
    /// An entry of `kind` with every other field zero or empty.
    pub fn new(kind: Kind) -> Entry {
        Entry {
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            xattrs: BTreeMap::new(),
            object: None,
            size: 0,
            target: None,
            opaque: false,
            rdev: 0,
            link: None,
        }
    }
}

impl Entry {
    /// The inode metadata of this entry's object.
    pub fn meta(&self) -> super::store::Meta {
        super::store::Meta {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime_ns: self.mtime_ns,
            xattrs: self.xattrs.clone(),
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A checkpoint's tree: relative path (no leading `/`, path-encoded) →
/// entry, split into shards by a hash of the path. Each shard is its own
/// store object, so a capture re-encodes and stores only the shards that
/// hold a changed path; shards are shared (`Arc`) between the manifests of
/// successive captures and updated copy-on-write.
#[derive(Debug, Clone)]
pub struct Manifest {
    bits: u8,
    shards: Vec<Arc<Shard>>,
    len: usize,
}

#[derive(Debug, Clone, Default)]
struct Shard {
    entries: BTreeMap<String, Entry>,
    /// The store object holding exactly `entries`, once stored.
    stored: Option<String>,
}

/// What the manifest object of a checkpoint holds.
#[derive(Debug, Serialize, Deserialize)]
struct Index {
    format: u32,
    bits: u8,
    len: usize,
    shards: Vec<String>,
}

/// The first format: the whole tree in one object.
#[derive(Debug, Deserialize)]
struct Flat {
    entries: BTreeMap<String, Entry>,
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            bits: 0,
            shards: vec![Arc::default()],
            len: 0,
        }
    }
}

/// FNV-1a: stable across builds and platforms (shard numbers are stored).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn shard_of(path: &str, bits: u8) -> usize {
    if bits == 0 {
        0
    } else {
        (fnv1a(path.as_bytes()) >> (64 - u32::from(bits))) as usize
    }
}

fn bits_for(len: usize) -> u8 {
    (0..MAX_SHARD_BITS)
        .find(|b| len <= SHARD_TARGET << b)
        .unwrap_or(MAX_SHARD_BITS)
}

impl Manifest {
    /// A manifest of `entries`, sharing the shards of `like` that hold the
    /// same entries (so they need not be stored again).
    pub fn build(entries: BTreeMap<String, Entry>, like: Option<&Manifest>) -> Manifest {
        let bits = bits_for(entries.len());
        let len = entries.len();
        let mut parts: Vec<BTreeMap<String, Entry>> =
            (0..1usize << bits).map(|_| BTreeMap::new()).collect();
        for (k, v) in entries {
            parts[shard_of(&k, bits)].insert(k, v);
        }
        let shards = parts
            .into_iter()
            .enumerate()
            .map(|(i, entries)| match like {
                Some(l) if l.bits == bits && l.shards[i].entries == entries => l.shards[i].clone(),
                _ => Arc::new(Shard {
                    entries,
                    stored: None,
                }),
            })
            .collect();
        Manifest { bits, shards, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.shards[shard_of(path, self.bits)].entries.get(path)
    }

    pub fn insert(&mut self, path: String, entry: Entry) {
        let i = shard_of(&path, self.bits);
        if self.shards[i].entries.get(&path) == Some(&entry) {
            return;
        }
        let shard = Arc::make_mut(&mut self.shards[i]);
        shard.stored = None;
        if shard.entries.insert(path, entry).is_none() {
            self.len += 1;
        }
    }

    pub fn remove(&mut self, path: &str) -> Option<Entry> {
        let i = shard_of(path, self.bits);
        if !self.shards[i].entries.contains_key(path) {
            return None;
        }
        let shard = Arc::make_mut(&mut self.shards[i]);
        shard.stored = None;
        self.len -= 1;
        shard.entries.remove(path)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.shards.iter().flat_map(|s| s.entries.iter())
    }

    /// Every entry in path order (parents before children).
    pub fn sorted(&self) -> Vec<(&String, &Entry)> {
        let mut all: Vec<_> = self.iter().collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all
    }

    pub fn to_map(&self) -> BTreeMap<String, Entry> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Stores the shards not stored yet (two threads), then the index.
    /// Returns the index's object id, the manifest's id.
    pub fn store(&mut self, store: &Store) -> Result<String, FsError> {
        if self.len > (SHARD_TARGET * 4) << self.bits {
            // Grown well past its shard count: reshard (stores everything once).
            *self = Manifest::build(self.to_map(), None);
        }
        let dirty: Vec<usize> = (0..self.shards.len())
            .filter(|i| self.shards[*i].stored.is_none())
            .collect();
        let shards = &self.shards;
        let encoded = super::par_map(dirty, 2, "manifest encoder", |i| {
            Ok((i, store.put_bytes(&encode_shard(&shards[i].entries))?))
        })?;
        for (i, id) in encoded {
            Arc::make_mut(&mut self.shards[i]).stored = Some(id);
        }
        let index = Index {
            format: FORMAT,
            bits: self.bits,
            len: self.len,
            shards: self
                .shards
                .iter()
                .map(|s| s.stored.clone().unwrap_or_default())
                .collect(),
        };
        store.put_bytes(&compress(&serde_json::to_vec(&index).unwrap_or_default()))
    }

    /// Loads the manifest stored as object `id`.
    pub fn load(store: &Store, id: &str) -> Result<Manifest, FsError> {
        match read_index(store, id)? {
            Stored::Sharded(index) => {
                let mut shards = Vec::with_capacity(index.shards.len());
                let mut len = 0;
                for sid in index.shards {
                    let entries = decode_shard(&store.read(&sid)?)?;
                    len += entries.len();
                    shards.push(Arc::new(Shard {
                        entries,
                        stored: Some(sid),
                    }));
                }
                if shards.len() != 1 << index.bits {
                    return Err(FsError::Corrupt(format!("manifest {id}: shard count")));
                }
                Ok(Manifest {
                    bits: index.bits,
                    shards,
                    len,
                })
            }
            Stored::Flat(entries) => Ok(Manifest::build(entries, None)),
        }
    }
}

enum Stored {
    Sharded(Index),
    Flat(BTreeMap<String, Entry>),
}

fn compress(json: &[u8]) -> Vec<u8> {
    zstd::encode_all(json, 1).unwrap_or_else(|_| json.to_vec())
}

fn decompress(bytes: &[u8], what: &str) -> Result<Vec<u8>, FsError> {
    zstd::decode_all(bytes).map_err(|e| FsError::Corrupt(format!("{what}: {e}")))
}

fn read_index(store: &Store, id: &str) -> Result<Stored, FsError> {
    parse_index(&decompress(&store.read(id)?, "manifest")?, id)
}

fn parse_index(json: &[u8], id: &str) -> Result<Stored, FsError> {
    if let Ok(index) = serde_json::from_slice::<Index>(json) {
        if index.format != FORMAT || index.bits > MAX_SHARD_BITS {
            return Err(FsError::Corrupt(format!(
                "manifest {id}: format {} with {} shard bits is not supported",
                index.format, index.bits
            )));
        }
        return Ok(Stored::Sharded(index));
    }
    let flat: Flat = serde_json::from_slice(json)
        .map_err(|e| FsError::Corrupt(format!("manifest {id}: {e}")))?;
    Ok(Stored::Flat(flat.entries))
}

fn encode_shard(entries: &BTreeMap<String, Entry>) -> Vec<u8> {
    compress(&serde_json::to_vec(entries).unwrap_or_default())
}

fn decode_shard(bytes: &[u8]) -> Result<BTreeMap<String, Entry>, FsError> {
    serde_json::from_slice(&decompress(bytes, "manifest shard")?)
        .map_err(|e| FsError::Corrupt(format!("manifest shard: {e}")))
}

/// Adds to `keep` every store object manifest `id` references (itself, its
/// shards, its files). Shards already in `keep` are not read again, so
/// walking many checkpoints costs one read per distinct shard.
pub fn references(store: &Store, id: &str, keep: &mut HashSet<String>) -> Result<(), FsError> {
    keep.insert(id.to_owned());
    let add = |entries: BTreeMap<String, Entry>, keep: &mut HashSet<String>| {
        keep.extend(entries.into_values().filter_map(|e| e.object));
    };
    match read_index(store, id)? {
        Stored::Sharded(index) => {
            for sid in index.shards {
                if keep.insert(sid.clone()) {
                    add(decode_shard(&store.read(&sid)?)?, keep);
                }
            }
        }
        Stored::Flat(entries) => add(entries, keep),
    }
    Ok(())
}

/// The store objects checkpoint manifest `id` consists of, in the order an
/// archive carries them: the manifest objects (the index, then its shards),
/// then each file object once.
pub fn objects_in_order(store: &Store, id: &str) -> Result<(Vec<String>, Vec<String>), FsError> {
    let mut manifest = vec![id.to_owned()];
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |entries: BTreeMap<String, Entry>| {
        for o in entries.into_values().filter_map(|e| e.object) {
            if seen.insert(o.clone()) {
                files.push(o);
            }
        }
    };
    match read_index(store, id)? {
        Stored::Sharded(index) => {
            for sid in index.shards {
                if !manifest.contains(&sid) {
                    add(decode_shard(&store.read(&sid)?)?);
                    manifest.push(sid);
                }
            }
        }
        Stored::Flat(entries) => add(entries),
    }
    Ok((manifest, files))
}

/// A manifest object from outside (an archive), decoded from its bytes:
/// the shard objects it names, or the entries of the flat format.
pub enum Parts {
    Shards(Vec<String>),
    Entries(BTreeMap<String, Entry>),
}

/// Decompressed size past which an imported manifest object is refused.
const MAX_DECODED: u64 = 256 << 20;

fn decompress_bounded(bytes: &[u8], what: &str) -> Result<Vec<u8>, FsError> {
    use std::io::Read;
    let dec =
        zstd::stream::Decoder::new(bytes).map_err(|e| FsError::Corrupt(format!("{what}: {e}")))?;
    let mut out = Vec::new();
    dec.take(MAX_DECODED + 1)
        .read_to_end(&mut out)
        .map_err(|e| FsError::Corrupt(format!("{what}: {e}")))?;
    if out.len() as u64 > MAX_DECODED {
        return Err(FsError::Corrupt(format!(
            "{what}: expands past {MAX_DECODED} bytes"
        )));
    }
    Ok(out)
}

/// Decodes manifest object `id` from `bytes` (hostile input: bounded).
pub fn parts_of(bytes: &[u8], id: &str) -> Result<Parts, FsError> {
    match parse_index(&decompress_bounded(bytes, "manifest")?, id)? {
        Stored::Sharded(index) => {
            if index.shards.len() != 1 << index.bits {
                return Err(FsError::Corrupt(format!("manifest {id}: shard count")));
            }
            Ok(Parts::Shards(index.shards))
        }
        Stored::Flat(entries) => Ok(Parts::Entries(entries)),
    }
}

/// Decodes a manifest shard from `bytes` (hostile input: bounded).
pub fn shard_entries(bytes: &[u8]) -> Result<BTreeMap<String, Entry>, FsError> {
    serde_json::from_slice(&decompress_bounded(bytes, "manifest shard")?)
        .map_err(|e| FsError::Corrupt(format!("manifest shard: {e}")))
}

/// Paths are bytes; the manifest stores them as UTF-8 with `%` and invalid
/// bytes percent-escaped, so every name round-trips.
pub fn encode_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    push_encoded(&mut out, bytes);
    out
}

/// Appends the encoding of `bytes` to `out` (no allocation for plain names).
pub fn push_encoded(out: &mut String, bytes: &[u8]) {
    if let Ok(s) = std::str::from_utf8(bytes) {
        if !s.contains('%') {
            out.push_str(s);
            return;
        }
    }
    let mut rest = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                push_escaped(out, s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                push_escaped(out, std::str::from_utf8(good).unwrap_or_default());
                let n = e.error_len().unwrap_or(bad.len());
                for b in &bad[..n] {
                    out.push_str(&format!("%{b:02X}"));
                }
                rest = &bad[n..];
            }
        }
    }
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

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// Applies the upper dir's entries onto `parent`, the manifest of the layer
/// below it (the full merge). A whiteout is kept only where the base still
/// has the path (elsewhere it hides nothing). Shards equal to those of
/// `like` (or of `parent`) are shared with it.
pub fn merge<'a>(
    parent: &Manifest,
    upper: impl Iterator<Item = (&'a str, &'a Entry)>,
    base: &Path,
    like: Option<&Manifest>,
) -> Manifest {
    let mut upper: Vec<(&str, &Entry)> = upper.collect();
    upper.sort_unstable_by(|a, b| a.0.cmp(b.0)); // parents before children
    let mut entries = parent.to_map();
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
    let parent_empty = parent.is_empty();
    for (p, e) in upper {
        match e.kind {
            Kind::Whiteout => {
                remove_below(&mut entries, p);
                entries.remove(p);
                let in_base = super::at::exists_beneath(base, &decode_path(p));
                if in_base {
                    entries.insert(p.to_owned(), e.clone());
                }
            }
            Kind::Dir => {
                if e.opaque && !parent_empty {
                    remove_below(&mut entries, p);
                }
                entries.insert(p.to_owned(), e.clone());
            }
            _ => {
                // A non-directory hides whatever lower tree was at this path.
                if !parent_empty {
                    remove_below(&mut entries, p);
                }
                entries.insert(p.to_owned(), e.clone());
            }
        }
    }
    Manifest::build(entries, like.or(Some(parent)))
}

/// The merge of an upper dir that changed by a delta, as an update of the
/// previous merge `prev` (both onto `parent`), in time proportional to the
/// delta. `changed`: (path, its previous upper entry if any, its new one);
/// `removed`: (path, its previous upper entry). `None` when the delta holds
/// something only the full [`merge`] gets right: a whiteout or opaque dir
/// coming or going, a directory turning into something else, or a removed
/// path the parent has.
///
/// Why the rest is exact: a path leaves the upper dir only when no lower
/// layer has it (deleting a lower path leaves a whiteout), so it leaves the
/// merge too, children included (each is removed as well); a changed entry
/// that is not a whiteout, an opaque dir, or replacing a dir hides nothing
/// below it, so it simply takes the path.
pub fn apply_delta<'a>(
    prev: &Manifest,
    parent: &Manifest,
    changed: impl Iterator<Item = (&'a str, Option<&'a Entry>, &'a Entry)>,
    removed: impl Iterator<Item = (&'a str, &'a Entry)>,
) -> Option<Manifest> {
    let hides = |e: &Entry| e.kind == Kind::Whiteout || (e.kind == Kind::Dir && e.opaque);
    let mut m = prev.clone();
    for (p, old, new) in changed {
        if hides(new) || old.is_some_and(hides) {
            return None;
        }
        if m.get(p).is_some_and(|cur| cur.kind == Kind::Dir) && new.kind != Kind::Dir {
            return None;
        }
        m.insert(p.to_owned(), new.clone());
    }
    for (p, old) in removed {
        if hides(old) || parent.get(p).is_some() {
            return None;
        }
        m.remove(p);
    }
    Some(m)
}

/// Whether `raw` is a relative path of proper names (no empty, `.` or
/// `..` component): a manifest comes from an archive too, so it is hostile.
fn proper(raw: &[u8]) -> bool {
    !raw.is_empty()
        && raw
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b".." && !c.contains(&0))
}

/// The directories of a layer being built, opened beneath its top, the
/// last one kept while entries share it. Paths of any length.
struct Dirs {
    top: OwnedFd,
    last: Option<(Vec<u8>, OwnedFd)>,
}

impl Dirs {
    fn get(&mut self, parent: &[u8], p: &str) -> Result<BorrowedFd<'_>, FsError> {
        if self
            .last
            .as_ref()
            .is_none_or(|(l, _)| l.as_slice() != parent)
        {
            let fd = super::at::open_dir(self.top.as_fd(), parent)
                .map_err(|e| rel_err("open", p)(e.into()))?;
            self.last = Some((parent.to_vec(), fd));
        }
        Ok(self
            .last
            .as_ref()
            .map_or(self.top.as_fd(), |(_, fd)| fd.as_fd()))
    }
}

fn rel_err(op: &'static str, p: &str) -> impl FnOnce(std::io::Error) -> FsError {
    let path = std::path::PathBuf::from(super::at::shown(p));
    move |source| FsError::Io { op, path, source }
}

/// Builds a layer dir for `manifest` at `dest` (which must not exist): dirs
/// are created, files are hard links to store objects (so hard-linked paths
/// share an inode), whiteouts and opaque dirs are overlay's own markers.
/// Every entry is made relative to its directory's fd (any path length).
pub fn materialize(manifest: &Manifest, store: &Store, dest: &Path) -> Result<(), FsError> {
    use super::at::{proc_path, split_parent};
    use nix::sys::stat::{Mode, SFlag, mkdirat, mknodat};
    fs::create_dir(dest).map_err(io_err("create", dest))?;
    let top: OwnedFd = fs::File::open(dest).map_err(io_err("open", dest))?.into();
    let mut dirs = Dirs { top, last: None };
    let mut made = Vec::new();
    for (p, e) in manifest.sorted() {
        let raw = decode_path(p);
        if !proper(&raw) {
            return Err(FsError::Corrupt(format!(
                "manifest path {p:?} is not a proper relative path"
            )));
        }
        let (parent, name) = split_parent(&raw);
        let dir = dirs.get(parent, p)?;
        let nm = OsStr::from_bytes(name);
        let errno = |op| move |err: nix::errno::Errno| rel_err(op, p)(err.into());
        match e.kind {
            Kind::Dir => {
                mkdirat(dir, nm, Mode::from_bits_truncate(0o700)).map_err(errno("mkdir"))?;
                if e.opaque {
                    xattr::set(proc_path(dir, name), OPAQUE_XATTR, b"y")
                        .map_err(rel_err("setxattr", p))?;
                }
                made.push((p, e));
            }
            Kind::File => {
                let object = e
                    .object
                    .as_deref()
                    .ok_or_else(|| FsError::Corrupt(format!("file {p} has no object")))?;
                let src = store.object_path(object);
                nix::unistd::linkat(
                    nix::fcntl::AT_FDCWD,
                    &src,
                    dir,
                    nm,
                    nix::fcntl::AtFlags::empty(),
                )
                .map_err(errno("link"))?;
            }
            Kind::Symlink => {
                let target = decode_path(e.target.as_deref().unwrap_or(""));
                nix::unistd::symlinkat(OsStr::from_bytes(&target), dir, nm)
                    .map_err(errno("symlink"))?;
                set_owner_times(dir, name, p, e, true)?;
            }
            Kind::Whiteout => {
                mknodat(dir, nm, SFlag::S_IFCHR, Mode::empty(), 0).map_err(errno("mknod"))?;
            }
            Kind::Fifo | Kind::Char | Kind::Block | Kind::Socket => {
                let kind = match e.kind {
                    Kind::Fifo => SFlag::S_IFIFO,
                    Kind::Char => SFlag::S_IFCHR,
                    Kind::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFSOCK,
                };
                mknodat(dir, nm, kind, Mode::from_bits_truncate(e.mode), e.rdev)
                    .map_err(errno("mknod"))?;
                set_owner_times(dir, name, p, e, false)?;
            }
        }
    }
    // Directory metadata last, deepest first: creating entries changes mtimes.
    for (p, e) in made.into_iter().rev() {
        let raw = decode_path(p);
        let (parent, name) = split_parent(&raw);
        let dir = dirs.get(parent, p)?;
        for (k, v) in &e.xattrs {
            xattr::set(proc_path(dir, name), k, &unhex(v)).map_err(rel_err("setxattr", p))?;
        }
        nix::sys::stat::fchmodat(
            dir,
            OsStr::from_bytes(name),
            Mode::from_bits_truncate(e.mode),
            // (a directory this function made: no symlink)
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|err| rel_err("chmod", p)(err.into()))?;
        set_owner_times(dir, name, p, e, false)?;
    }
    Ok(())
}

fn set_owner_times(
    dir: BorrowedFd<'_>,
    name: &[u8],
    p: &str,
    e: &Entry,
    nofollow: bool,
) -> Result<(), FsError> {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::utimensat;
    use nix::sys::time::TimeSpec;
    use nix::unistd::{Gid, Uid, fchownat};
    let name = OsStr::from_bytes(name);
    let flag = if nofollow {
        AtFlags::AT_SYMLINK_NOFOLLOW
    } else {
        AtFlags::empty()
    };
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(e.uid)),
        Some(Gid::from_raw(e.gid)),
        flag,
    )
    .map_err(|err| rel_err("chown", p)(err.into()))?;
    let ts = TimeSpec::new(
        e.mtime_ns.div_euclid(1_000_000_000),
        e.mtime_ns.rem_euclid(1_000_000_000),
    );
    let uflag = if nofollow {
        nix::sys::stat::UtimensatFlags::NoFollowSymlink
    } else {
        nix::sys::stat::UtimensatFlags::FollowSymlink
    };
    utimensat(dir, name, &ts, &ts, uflag).map_err(|err| rel_err("utimensat", p)(err.into()))?;
    Ok(())
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
            mode: 0o644,
            object: Some(obj.into()),
            size: 1,
            ..Entry::new(Kind::File)
        }
    }

    fn parent_of(paths: &[&str]) -> Manifest {
        Manifest::build(
            paths.iter().map(|p| (p.to_string(), file(p))).collect(),
            None,
        )
    }

    #[test]
    fn merge_applies_whiteouts_opaque_dirs_and_replacements() {
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("in-base"), b"x").unwrap();
        let parent = parent_of(&["a", "d/x", "d/y", "e/z", "f/g"]);
        let wh = Entry {
            kind: Kind::Whiteout,
            object: None,
            ..file("")
        };
        let dir = Entry {
            kind: Kind::Dir,
            opaque: true,
            object: None,
            ..file("")
        };
        let upper = [
            ("a", wh.clone()),
            ("in-base", wh),
            ("d", dir),
            ("d/new", file("n")),
            ("f", file("now-a-file")),
        ];
        let m = merge(
            &parent,
            upper.iter().map(|(p, e)| (*p, e)),
            base.path(),
            None,
        );
        let map = m.to_map();
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(keys, ["d", "d/new", "e/z", "f", "in-base"]);
        assert_eq!(map["in-base"].kind, Kind::Whiteout);
        assert_eq!(m.len(), 5);
    }

    #[test]
    fn delta_updates_match_the_full_merge_or_defer_to_it() {
        let base = tempfile::tempdir().unwrap();
        let parent = parent_of(&["p", "q/r"]);
        let u1: Vec<(&str, Entry)> = vec![("n1", file("1")), ("n2", file("2")), ("p", file("p2"))];
        let prev = merge(&parent, u1.iter().map(|(p, e)| (*p, e)), base.path(), None);
        // n1 changes, n3 appears, n2 goes: an update does it.
        let u2: Vec<(&str, Entry)> = vec![("n1", file("1b")), ("n3", file("3")), ("p", file("p2"))];
        let full = merge(
            &parent,
            u2.iter().map(|(p, e)| (*p, e)),
            base.path(),
            Some(&prev),
        );
        let old = |p: &str| u1.iter().find(|(q, _)| *q == p).map(|(_, e)| e);
        let inc = apply_delta(
            &prev,
            &parent,
            [("n1", old("n1"), &u2[0].1), ("n3", None, &u2[1].1)].into_iter(),
            [("n2", old("n2").unwrap())].into_iter(),
        )
        .expect("a plain delta is applied");
        assert_eq!(inc.to_map(), full.to_map());
        // A path of the parent leaving the upper dir, a whiteout, a dir
        // turning into a file: left to the full merge.
        assert!(
            apply_delta(
                &prev,
                &parent,
                [].into_iter(),
                [("p", old("p").unwrap())].into_iter()
            )
            .is_none()
        );
        let wh = Entry {
            kind: Kind::Whiteout,
            ..file("")
        };
        assert!(
            apply_delta(
                &prev,
                &parent,
                [("n1", old("n1"), &wh)].into_iter(),
                [].into_iter()
            )
            .is_none()
        );
        assert!(
            apply_delta(
                &prev,
                &parent,
                [("q", None, &file("x"))].into_iter(),
                [].into_iter()
            )
            .is_some()
        );
        let mut with_dir = prev.clone();
        with_dir.insert(
            "q".into(),
            Entry {
                kind: Kind::Dir,
                ..file("")
            },
        );
        assert!(
            apply_delta(
                &with_dir,
                &parent,
                [("q", None, &file("x"))].into_iter(),
                [].into_iter()
            )
            .is_none()
        );
    }

    #[test]
    fn shards_round_trip_and_unchanged_shards_are_shared() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let entries: BTreeMap<String, Entry> = (0..5000)
            .map(|i| (format!("d{}/f{i}", i % 7), file(&format!("{i:0>70}"))))
            .collect();
        let mut m = Manifest::build(entries.clone(), None);
        assert!(m.shards.len() > 1, "5000 entries are sharded");
        let id = m.store(&store).unwrap();
        let loaded = Manifest::load(&store, &id).unwrap();
        assert_eq!(loaded.to_map(), entries);
        assert_eq!(loaded.len(), 5000);
        // One changed path: one shard to store again; the rest are shared.
        let mut next = loaded.clone();
        next.insert("d1/f1".into(), file("changed"));
        let dirty = next.shards.iter().filter(|s| s.stored.is_none()).count();
        assert_eq!(dirty, 1);
        let id2 = next.store(&store).unwrap();
        assert_ne!(id, id2);
        let mut keep = HashSet::new();
        references(&store, &id2, &mut keep).unwrap();
        assert!(keep.contains("changed") && keep.contains(&id2));
        assert!(!keep.contains(&format!("{:0>70}", 1)));
        // Storing the same tree again gives the same id (no growth).
        assert_eq!(Manifest::build(entries, None).store(&store).unwrap(), id);
    }
}
