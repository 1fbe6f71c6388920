//! Checkpoint archives: one checkpoint as a zstd-compressed tar, written for
//! export and read back, as hostile input, for import. This module owns the
//! format; the store ([`crate::fs::store`]) owns the objects and
//! [`crate::checkpoint`] the chain an import joins.
//!
//! ```text
//! index.json               {"format", "checkpoint", "entries": [{"name", "sha256", "size"}]}
//!                          every entry below, in order (not itself)
//! meta.json                the checkpoint's metadata (services, CRIU image list, manifest id)
//! objects/<sha256>-<meta>  the manifest object, its shards, the CRIU images,
//!                          the page lists of the pages images and the packs
//!                          they name, then every file object once; the name is the
//!                          SHA-256 of the content and a digest of the inode
//!                          metadata the manifest gives the file
//! ```
//!
//! Only regular files, only these names, each once, each with the size and
//! digest the index gives. An object must be announced by what came before
//! it (meta.json names the manifest, images and page lists, a page list its
//! packs, the manifest its shards, the shards the files), so an import
//! learns every object's metadata before its bytes arrive and never holds
//! more than one manifest object in memory. A pack is checked page by page
//! against its trailer once staged ([`pages::verify_pack`]): the page
//! index of later captures trusts it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::CheckpointMeta;
use crate::fs::FsError;
use crate::fs::manifest::{self, Parts};
use crate::fs::pages::{self, PageList};
use crate::fs::store::{Meta, Staging, Store, hex, id_digest, valid_id};

pub const FORMAT: &str = "sprited-checkpoint/1";
const INDEX: &str = "index.json";
const META: &str = "meta.json";
const OBJECTS: &str = "objects/";
/// Bounds on the entries read into memory.
const MAX_INDEX: u64 = 64 << 20;
const MAX_META: u64 = 16 << 20;
const MAX_MANIFEST_OBJECT: u64 = 64 << 20;
/// zstd level of exports: fast; the store's contents are often compressed already.
const LEVEL: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive is not acceptable; `entry` names the culprit when there is one.
    #[error("{}{why}", entry.as_ref().map(|e| format!("entry {e:?}: ")).unwrap_or_default())]
    Invalid { entry: Option<String>, why: String },
    #[error("the checkpoint would take more than {limit}{}",
        entry.as_ref().map(|e| format!(" (at entry {e:?})")).unwrap_or_default())]
    TooLarge { limit: Limit, entry: Option<String> },
    #[error(transparent)]
    Store(#[from] FsError),
    /// Reading an object from its source failed (a pull: the remote store
    /// went away mid-object).
    #[error("{entry}: could not be read: {source}")]
    Read {
        entry: String,
        #[source]
        source: io::Error,
    },
    /// Writing the export failed (the client went away, or a disk error).
    #[error("writing the archive: {0}")]
    Write(#[source] io::Error),
}

fn invalid(entry: Option<&str>, why: impl Into<String>) -> ArchiveError {
    ArchiveError::Invalid {
        entry: entry.map(str::to_owned),
        why: why.into(),
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    format: String,
    checkpoint: String,
    entries: Vec<IndexEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IndexEntry {
    name: String,
    sha256: String,
    size: u64,
}

/// Every object of checkpoint `meta`, each once, in the order an import
/// accepts them (each announced by one before it: the manifest and its
/// shards, the CRIU images, the page lists and their packs, the files),
/// with its size.
pub fn objects_of(
    store: &Store,
    meta: &CheckpointMeta,
) -> Result<Vec<(String, u64)>, ArchiveError> {
    let (manifest_objects, files) = manifest::objects_in_order(store, &meta.manifest)?;
    let mut images = Vec::new();
    if let Some(p) = &meta.env {
        images.extend(p.images.values().cloned());
        for list in p.pages.values() {
            images.push(list.clone());
            images.extend(pages::packs_of(store, list)?);
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for id in manifest_objects.into_iter().chain(images).chain(files) {
        if seen.insert(id.clone()) {
            let (_, size) = store.open_object(&id)?;
            out.push((id, size));
        }
    }
    Ok(out)
}

/// Writes the archive of checkpoint `meta` to `out`. Reads each object once,
/// streaming: memory does not depend on the checkpoint's size. Returns the
/// bytes of content written (before compression).
pub fn export(store: &Store, meta: &CheckpointMeta, out: impl Write) -> Result<u64, ArchiveError> {
    let meta_json =
        serde_json::to_vec_pretty(meta).map_err(|e| invalid(Some(META), e.to_string()))?;
    let mut entries = vec![IndexEntry {
        name: META.into(),
        sha256: hex(&Sha256::digest(&meta_json)),
        size: meta_json.len() as u64,
    }];
    let objects = objects_of(store, meta)?;
    for (id, size) in &objects {
        entries.push(IndexEntry {
            name: format!("{OBJECTS}{id}"),
            sha256: id_digest(id).to_owned(),
            size: *size,
        });
    }
    let ids: Vec<String> = objects.into_iter().map(|(id, _)| id).collect();
    let index = serde_json::to_vec_pretty(&Index {
        format: FORMAT.into(),
        checkpoint: meta.id.clone(),
        entries,
    })
    .map_err(|e| invalid(Some(INDEX), e.to_string()))?;

    let enc = zstd::stream::Encoder::new(out, LEVEL).map_err(ArchiveError::Write)?;
    let mut tar = tar::Builder::new(enc);
    let mut total = 0u64;
    let mut append = |tar: &mut tar::Builder<_>, name: &str, size: u64, r: &mut dyn Read| {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).map_err(ArchiveError::Write)?;
        h.set_size(size);
        h.set_mode(0o600);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        // Exactly `size` bytes: a file that changed would corrupt the stream.
        tar.append(&h, r.take(size)).map_err(ArchiveError::Write)?;
        total += size;
        Ok::<_, ArchiveError>(())
    };
    append(&mut tar, INDEX, index.len() as u64, &mut index.as_slice())?;
    append(
        &mut tar,
        META,
        meta_json.len() as u64,
        &mut meta_json.as_slice(),
    )?;
    for id in &ids {
        let (mut f, size) = store.open_object(id)?;
        append(&mut tar, &format!("{OBJECTS}{id}"), size, &mut f)?;
    }
    let enc = tar.into_inner().map_err(ArchiveError::Write)?;
    let mut out = enc.finish().map_err(ArchiveError::Write)?;
    out.flush().map_err(ArchiveError::Write)?;
    Ok(total)
}

/// A verified archive whose objects wait in the store's staging area.
#[derive(Debug)]
pub struct Imported {
    /// The checkpoint's metadata as the archive gives it (validated).
    pub meta: CheckpointMeta,
    pub staging: Staging,
    /// Bytes of content read.
    pub bytes: u64,
    pub objects: u64,
    /// Objects the store already held (not written again).
    pub reused: u64,
}

/// What an announced object must be.
#[derive(Debug, Clone)]
enum Expect {
    /// A manifest object or shard: decoded once it arrives.
    Manifest,
    Shard,
    /// A CRIU image (opaque bytes).
    Image,
    /// A page list (decoded once it arrives) and a pack it names.
    PageList,
    Pack,
    /// A file of the tree, with the metadata its inode gets.
    File(Meta),
}

/// The most an import or a pull may write into the store, and where that
/// bound comes from: the status of a refusal depends on it (413 for the
/// operator's limit, 507 for a disk that cannot take it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub bytes: u64,
    /// `--import-max-bytes` set it; otherwise it is the state dir's free
    /// space less a reserve.
    pub configured: bool,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.configured {
            write!(f, "{} bytes, this daemon's --import-max-bytes", self.bytes)
        } else {
            write!(
                f,
                "the {} bytes the state dir's disk can spare (its free space less a reserve)",
                self.bytes
            )
        }
    }
}

/// Reads an archive from `input`, checking everything, and stages its
/// objects. Nothing enters the store: on error the staging area is dropped.
/// `progress` gets the bytes of content read so far, now and then.
pub fn import(
    store: &Store,
    input: impl Read,
    limit: Limit,
    progress: &dyn Fn(u64),
) -> Result<Imported, ArchiveError> {
    let staging = store.staging()?;
    let dec = zstd::stream::Decoder::new(input)
        .map_err(|e| invalid(None, format!("not a zstd stream: {e}")))?;
    let mut tar = tar::Archive::new(dec);
    let mut st = State {
        store,
        staging: &staging,
        limit,
        index: None,
        meta: None,
        expect: HashMap::new(),
        received: HashSet::new(),
        bytes: 0,
        objects: 0,
        reused: 0,
        last_reported: 0,
        last_entry: None,
    };
    let entries = tar
        .entries()
        .map_err(|e| invalid(None, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| st.truncated(e))?;
        st.entry(&mut entry)?;
        if st.bytes - st.last_reported >= 64 << 20 {
            st.last_reported = st.bytes;
            progress(st.bytes);
        }
    }
    st.finish()?;
    let meta = st
        .meta
        .take()
        .ok_or_else(|| invalid(None, "empty archive"))?;
    let (bytes, objects, reused) = (st.bytes, st.objects, st.reused);
    drop(st);
    Ok(Imported {
        meta,
        staging,
        bytes,
        objects,
        reused,
    })
}

struct State<'a> {
    store: &'a Store,
    staging: &'a Staging,
    limit: Limit,
    /// name → (sha256, size), from index.json.
    index: Option<BTreeMap<String, IndexEntry>>,
    meta: Option<CheckpointMeta>,
    expect: HashMap<String, Expect>,
    received: HashSet<String>,
    bytes: u64,
    objects: u64,
    reused: u64,
    last_reported: u64,
    last_entry: Option<String>,
}

impl State<'_> {
    fn truncated(&self, e: io::Error) -> ArchiveError {
        let after = self
            .last_entry
            .as_ref()
            .map(|n| format!(" after entry {n:?}"))
            .unwrap_or_default();
        invalid(
            None,
            format!("the archive is truncated or corrupt{after}: {e}"),
        )
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ArchiveError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if kind != tar::EntryType::Regular {
            return Err(invalid(
                Some(&name),
                format!("is a {kind:?}: this format has only regular files"),
            ));
        }
        let size = entry
            .header()
            .size()
            .map_err(|e| invalid(Some(&name), e.to_string()))?;
        if !self.received.insert(name.clone()) {
            return Err(invalid(Some(&name), "appears twice"));
        }
        self.last_entry = Some(name.clone());
        if self.bytes.saturating_add(size) > self.limit.bytes {
            return Err(ArchiveError::TooLarge {
                limit: self.limit,
                entry: Some(name),
            });
        }
        if self.index.is_none() {
            if name != INDEX {
                return Err(invalid(
                    Some(&name),
                    format!("the first entry must be {INDEX}"),
                ));
            }
            let bytes = read_small(entry, size, MAX_INDEX, &name)?;
            self.bytes += size;
            return self.take_index(&bytes);
        }
        let declared = self
            .index
            .as_ref()
            .and_then(|i| i.get(&name))
            .cloned()
            .ok_or_else(|| {
                invalid(
                    Some(&name),
                    "is not listed in index.json (not a name this format has)",
                )
            })?;
        if declared.size != size {
            return Err(invalid(
                Some(&name),
                format!("is {size} bytes, index.json says {}", declared.size),
            ));
        }
        self.bytes += size;
        if self.meta.is_none() {
            if name != META {
                return Err(invalid(
                    Some(&name),
                    format!("the second entry must be {META}"),
                ));
            }
            let bytes = read_small(entry, size, MAX_META, &name)?;
            check_digest(&name, &hex(&Sha256::digest(&bytes)), &declared.sha256)?;
            return self.take_meta(&bytes);
        }
        let id = name
            .strip_prefix(OBJECTS)
            .filter(|id| valid_id(id))
            .ok_or_else(|| invalid(Some(&name), "is not a name this format has"))?
            .to_owned();
        let expect = self.expect.remove(&id).ok_or_else(|| {
            invalid(
                Some(&name),
                "is not referenced by what came before it (unknown object, or out of order)",
            )
        })?;
        let meta = match &expect {
            Expect::File(m) => m.clone(),
            Expect::Manifest | Expect::Shard | Expect::Image | Expect::PageList | Expect::Pack => {
                Store::bytes_meta()
            }
        };
        if !id.ends_with(&format!("-{}", meta.key())) {
            return Err(invalid(
                Some(&name),
                "its name does not match the metadata the manifest gives it",
            ));
        }
        self.objects += 1;
        match expect {
            Expect::Manifest | Expect::Shard => {
                let bytes = read_small(entry, size, MAX_MANIFEST_OBJECT, &name)?;
                check_digest(&name, &hex(&Sha256::digest(&bytes)), &declared.sha256)?;
                for (id, e) in structure_refs(&name, &expect, &bytes)? {
                    self.expect_once(id, e);
                }
                if self.staging.keep_existing(self.store, &id)? {
                    self.reused += 1;
                } else {
                    self.staging
                        .write(&id, &mut bytes.as_slice(), size, &meta)?;
                }
            }
            Expect::PageList => {
                let bytes = read_small(entry, size, MAX_MANIFEST_OBJECT, &name)?;
                check_digest(&name, &hex(&Sha256::digest(&bytes)), &declared.sha256)?;
                for (id, e) in structure_refs(&name, &expect, &bytes)? {
                    self.expect_once(id, e);
                }
                if self.staging.keep_existing(self.store, &id)? {
                    self.reused += 1;
                } else {
                    self.staging
                        .write(&id, &mut bytes.as_slice(), size, &meta)?;
                }
            }
            Expect::Image | Expect::File(_) | Expect::Pack => {
                let verify = matches!(expect, Expect::Pack);
                let existing = self.staging.keep_existing(self.store, &id)?;
                let sha = if existing {
                    // Still read and checked: the archive must be whole.
                    self.reused += 1;
                    let mut h = HashingSink(Sha256::new());
                    let n =
                        io::copy(&mut entry.take(size), &mut h).map_err(|e| self.truncated(e))?;
                    if n != size {
                        return Err(self.truncated(io::ErrorKind::UnexpectedEof.into()));
                    }
                    hex(&h.0.finalize())
                } else {
                    // A read that fails is the archive's fault, a write the store's.
                    let mut src = Tracked {
                        inner: entry,
                        failed: None,
                    };
                    let written = self.staging.write(&id, &mut src, size, &meta);
                    match (written, src.failed) {
                        (Ok(sha), _) => sha,
                        (Err(_), Some(e)) => return Err(self.truncated(e)),
                        (Err(e), None) => return Err(e.into()),
                    }
                };
                check_digest(&name, &sha, &declared.sha256)?;
                if verify && !existing {
                    let (f, path) = self.staging.open(&id)?;
                    pages::verify_pack(&f, &path)
                        .map_err(|e| invalid(Some(&name), e.to_string()))?;
                }
            }
        }
        Ok(())
    }

    fn take_index(&mut self, bytes: &[u8]) -> Result<(), ArchiveError> {
        let index: Index = serde_json::from_slice(bytes)
            .map_err(|e| invalid(Some(INDEX), format!("not valid JSON: {e}")))?;
        if index.format != FORMAT {
            return Err(invalid(
                Some(INDEX),
                format!("format {:?} is not {FORMAT:?}", index.format),
            ));
        }
        let mut map = BTreeMap::new();
        let mut total: u64 = 0;
        for e in index.entries {
            let ok_name = e.name == META || e.name.strip_prefix(OBJECTS).is_some_and(valid_id);
            if !ok_name {
                return Err(invalid(
                    Some(&e.name),
                    "listed in index.json, but not a name this format has",
                ));
            }
            if e.sha256.len() != 64 || !e.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(Some(&e.name), "index.json gives no valid SHA-256"));
            }
            if let Some(id) = e.name.strip_prefix(OBJECTS) {
                if id_digest(id) != e.sha256 {
                    return Err(invalid(
                        Some(&e.name),
                        "index.json gives a digest that is not its name's",
                    ));
                }
            }
            total = total.saturating_add(e.size);
            if map.insert(e.name.clone(), e.clone()).is_some() {
                return Err(invalid(Some(&e.name), "listed twice in index.json"));
            }
        }
        if total.saturating_add(bytes.len() as u64) > self.limit.bytes {
            return Err(ArchiveError::TooLarge {
                limit: self.limit,
                entry: None,
            });
        }
        self.index = Some(map);
        Ok(())
    }

    fn take_meta(&mut self, bytes: &[u8]) -> Result<(), ArchiveError> {
        let meta: CheckpointMeta = serde_json::from_slice(bytes)
            .map_err(|e| invalid(Some(META), format!("not valid checkpoint metadata: {e}")))?;
        validate_meta(&meta).map_err(|why| invalid(Some(META), why))?;
        self.expect.extend(meta_refs(&meta));
        self.meta = Some(meta);
        Ok(())
    }

    /// Expects `id` unless it was expected or received already (files
    /// shared by several paths come once).
    fn expect_once(&mut self, id: String, what: Expect) {
        if !self.received.contains(&format!("{OBJECTS}{id}")) {
            self.expect.entry(id).or_insert(what);
        }
    }

    fn finish(&mut self) -> Result<(), ArchiveError> {
        let Some(index) = &self.index else {
            return Err(invalid(None, "empty archive: no index.json"));
        };
        if let Some(missing) = index.keys().find(|n| !self.received.contains(*n)) {
            return Err(invalid(
                Some(missing),
                "listed in index.json but missing: the archive is truncated",
            ));
        }
        if let Some(id) = self.expect.keys().next() {
            return Err(invalid(
                Some(&format!("{OBJECTS}{id}")),
                "referenced by the checkpoint but not in the archive",
            ));
        }
        Ok(())
    }
}

/// What a checkpoint's metadata references: the manifest, the CRIU images
/// and the page lists.
fn meta_refs(meta: &CheckpointMeta) -> Vec<(String, Expect)> {
    let mut out = vec![(meta.manifest.clone(), Expect::Manifest)];
    if let Some(p) = &meta.env {
        for o in p.images.values() {
            if o != &meta.manifest {
                out.push((o.clone(), Expect::Image));
            }
        }
        for o in p.pages.values() {
            if o != &meta.manifest && !p.images.values().any(|i| i == o) {
                out.push((o.clone(), Expect::PageList));
            }
        }
    }
    out
}

/// Decodes a structure object (manifest object, shard or page list; hostile)
/// and returns what it references: shards, files with their metadata, packs.
fn structure_refs(
    name: &str,
    expect: &Expect,
    bytes: &[u8],
) -> Result<Vec<(String, Expect)>, ArchiveError> {
    let bad = |e: FsError| invalid(Some(name), e.to_string());
    let entries = match expect {
        Expect::PageList => {
            let list = PageList::parse(bytes).map_err(|e| invalid(Some(name), e.to_string()))?;
            return Ok(list.packs.into_iter().map(|p| (p, Expect::Pack)).collect());
        }
        Expect::Manifest => match manifest::parts_of(bytes, name).map_err(bad)? {
            Parts::Shards(ids) => {
                if let Some(id) = ids.iter().find(|id| !valid_id(id)) {
                    return Err(invalid(Some(name), format!("names a bad shard {id:?}")));
                }
                return Ok(ids.into_iter().map(|id| (id, Expect::Shard)).collect());
            }
            Parts::Entries(entries) => entries,
        },
        Expect::Shard => manifest::shard_entries(bytes).map_err(bad)?,
        Expect::Image | Expect::Pack | Expect::File(_) => return Ok(Vec::new()),
    };
    let mut out = Vec::new();
    for (path, e) in entries {
        if path.is_empty()
            || path.starts_with('/')
            || path
                .split('/')
                .any(|c| c == ".." || c == "." || c.is_empty())
        {
            return Err(invalid(Some(name), format!("has a bad path {path:?}")));
        }
        if let Some(o) = &e.object {
            if !valid_id(o) {
                return Err(invalid(
                    Some(name),
                    format!("{path:?} names a bad object {o:?}"),
                ));
            }
            if e.xattrs.keys().any(|k| k.starts_with("trusted.overlay.")) {
                return Err(invalid(
                    Some(name),
                    format!("{path:?} carries overlayfs xattrs"),
                ));
            }
            out.push((o.clone(), Expect::File(e.meta())));
        }
    }
    Ok(out)
}

/// One object a checkpoint references and what it must be: the unit of a
/// pull, which fetches a checkpoint object by object and in parallel
/// instead of as one archive, with the same checks.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub id: String,
    expect: Expect,
}

impl Wanted {
    fn name(&self) -> String {
        format!("{OBJECTS}{}", self.id)
    }

    fn meta(&self) -> Result<Meta, ArchiveError> {
        let meta = match &self.expect {
            Expect::File(m) => m.clone(),
            Expect::Manifest | Expect::Shard | Expect::Image | Expect::PageList | Expect::Pack => {
                Store::bytes_meta()
            }
        };
        if !valid_id(&self.id) || !self.id.ends_with(&format!("-{}", meta.key())) {
            return Err(invalid(
                Some(&self.name()),
                "its name does not match the metadata the manifest gives it",
            ));
        }
        Ok(meta)
    }

    fn structure(&self) -> bool {
        matches!(
            self.expect,
            Expect::Manifest | Expect::Shard | Expect::PageList
        )
    }

    /// Holds the object from the local store when it is there (trusted:
    /// the store checked it when it came in), and returns what it
    /// references; `None` when the store does not have it.
    pub fn from_store(
        &self,
        store: &Store,
        staging: &Staging,
    ) -> Result<Option<Vec<Wanted>>, ArchiveError> {
        if !staging.keep_existing(store, &self.id)? {
            return Ok(None);
        }
        if !self.structure() {
            return Ok(Some(Vec::new()));
        }
        let bytes = store.read(&self.id)?;
        Ok(Some(wanted(structure_refs(
            &self.name(),
            &self.expect,
            &bytes,
        )?)))
    }

    /// Stages the object from exactly `size` bytes of `src` (hostile),
    /// checking its digest against its name, decoding what it is, and
    /// returns what it references.
    pub fn stage(
        &self,
        staging: &Staging,
        src: &mut dyn Read,
        size: u64,
    ) -> Result<Vec<Wanted>, ArchiveError> {
        let name = self.name();
        let meta = self.meta()?;
        if self.structure() {
            let mut src = Tracked {
                inner: src,
                failed: None,
            };
            let bytes = match read_small(&mut src, size, MAX_MANIFEST_OBJECT, &name) {
                Ok(b) => b,
                Err(_) if src.failed.is_some() => {
                    return Err(ArchiveError::Read {
                        entry: name,
                        source: src.failed.take().expect("checked"),
                    });
                }
                Err(e) => return Err(e),
            };
            check_digest(&name, &hex(&Sha256::digest(&bytes)), id_digest(&self.id))?;
            let refs = structure_refs(&name, &self.expect, &bytes)?;
            staging.write(&self.id, &mut bytes.as_slice(), size, &meta)?;
            return Ok(wanted(refs));
        }
        let mut src = Tracked {
            inner: src,
            failed: None,
        };
        let sha = match (staging.write(&self.id, &mut src, size, &meta), src.failed) {
            (Ok(sha), _) => sha,
            (Err(_), Some(e)) => {
                return Err(ArchiveError::Read {
                    entry: name,
                    source: e,
                });
            }
            (Err(e), None) => return Err(e.into()),
        };
        check_digest(&name, &sha, id_digest(&self.id))?;
        if matches!(self.expect, Expect::Pack) {
            let (f, path) = staging.open(&self.id)?;
            pages::verify_pack(&f, &path).map_err(|e| invalid(Some(&name), e.to_string()))?;
        }
        Ok(Vec::new())
    }
}

fn wanted(refs: Vec<(String, Expect)>) -> Vec<Wanted> {
    refs.into_iter()
        .map(|(id, expect)| Wanted { id, expect })
        .collect()
}

/// A checkpoint being fetched object by object (a pull): its metadata,
/// checked as an archive's, and the objects still to fetch, each once.
/// Every object of a level can be fetched at once; what they reference
/// is the next level (metadata → manifest, images, page lists → shards,
/// packs → files).
#[derive(Debug)]
pub struct Fetch {
    meta: CheckpointMeta,
    seen: HashSet<String>,
    next: Vec<Wanted>,
}

impl Fetch {
    /// Starts from a checkpoint's metadata (hostile: validated; `name`
    /// says where it came from in errors).
    pub fn new(meta: CheckpointMeta, name: &str) -> Result<Fetch, ArchiveError> {
        validate_meta(&meta).map_err(|why| invalid(Some(name), why))?;
        let mut f = Fetch {
            next: Vec::new(),
            seen: HashSet::new(),
            meta,
        };
        let refs = wanted(meta_refs(&f.meta));
        f.add(refs);
        Ok(f)
    }

    /// Queues objects found referenced (each id once).
    pub fn add(&mut self, refs: Vec<Wanted>) {
        for w in refs {
            if self.seen.insert(w.id.clone()) {
                self.next.push(w);
            }
        }
    }

    /// The objects to fetch now (empty once the checkpoint is complete).
    pub fn level(&mut self) -> Vec<Wanted> {
        std::mem::take(&mut self.next)
    }

    /// Every object is staged: the result, as an import's.
    pub fn finish(self, staging: Staging, bytes: u64, objects: u64, reused: u64) -> Imported {
        Imported {
            meta: self.meta,
            staging,
            bytes,
            objects,
            reused,
        }
    }
}

fn check_digest(name: &str, got: &str, want: &str) -> Result<(), ArchiveError> {
    if got == want {
        Ok(())
    } else {
        Err(invalid(
            Some(name),
            format!(
                "SHA-256 mismatch (content {got}, index.json {want}): the archive is corrupted"
            ),
        ))
    }
}

fn read_small(r: &mut dyn Read, size: u64, max: u64, name: &str) -> Result<Vec<u8>, ArchiveError> {
    if size > max {
        return Err(invalid(
            Some(name),
            format!("is {size} bytes, more than {max} allowed"),
        ));
    }
    let mut buf = Vec::with_capacity(size as usize);
    r.take(size).read_to_end(&mut buf).map_err(|e| {
        invalid(
            Some(name),
            format!("the archive is truncated or corrupt: {e}"),
        )
    })?;
    if buf.len() as u64 != size {
        return Err(invalid(Some(name), "the archive is truncated"));
    }
    Ok(buf)
}

/// A reader that remembers how it failed.
struct Tracked<R> {
    inner: R,
    failed: Option<io::Error>,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(0) if !buf.is_empty() => {
                self.failed = Some(io::ErrorKind::UnexpectedEof.into());
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e) => {
                self.failed = Some(io::Error::new(e.kind(), e.to_string()));
                Err(e)
            }
        }
    }
}

struct HashingSink(Sha256);

impl Write for HashingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Checks what an imported `meta.json` may carry: names become file names,
/// cgroup names and command lines.
fn validate_meta(m: &CheckpointMeta) -> Result<(), String> {
    if !valid_id(&m.manifest) {
        return Err(format!("bad manifest object {:?}", m.manifest));
    }
    let mut defs = BTreeMap::new();
    for d in &m.services {
        crate::supervisor::spec::validate(&d.name, &d.spec, &defs)
            .map_err(|e| format!("service {:?}: {e}", d.name))?;
        defs.insert(d.name.clone(), d.clone());
    }
    for r in &m.running {
        if !defs.contains_key(r) {
            return Err(format!("running service {r:?} has no definition"));
        }
    }
    if let Some(p) = &m.env {
        if let Some(s) = p.services.iter().find(|s| !m.running.contains(&s.name)) {
            return Err(format!(
                "process images of {:?}, which is not running",
                s.name
            ));
        }
        // The cgroups its processes go back to: the init's, a service's
        // (named as services are), an exec session's.
        for name in p.cgroups.keys() {
            let session = name
                .strip_prefix("_exec-")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !(name == crate::container::INIT_CGROUP
                || session
                || crate::config::valid_name(name))
            {
                return Err(format!("bad cgroup name {name:?}"));
            }
        }
        if let Some(name) = p.pages.keys().find(|n| !pages::is_pages_image(n)) {
            return Err(format!(
                "page list for {name:?}, which is not a pages image"
            ));
        }
        for (name, o) in p.images.iter().chain(&p.pages) {
            let plain = !name.is_empty()
                && !name.starts_with('.')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !plain || !valid_id(o) {
                return Err(format!("bad CRIU image {name:?} → {o:?}"));
            }
        }
    }
    Ok(())
}
