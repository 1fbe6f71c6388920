//! The checkpoint chain `v1, v2, …`: capture, restore, delete, and the
//! metadata that makes a checkpoint visible only once it is complete.
//!
//! ```text
//! <state>/checkpoints/counter        last vN number handed out (ids are never reused)
//! <state>/checkpoints/<id>/meta.json  a complete checkpoint (the dir appears by rename)
//! <state>/checkpoints/.capturing      journal: a capture is under way
//! ```
//!
//! One file per operation: `capture.rs` (freeze the environment, CRIU dump,
//! scan and store what changed, publish), `restore.rs` (stop the
//! environment, mount the layer, CRIU restore, adopt) and `gc.rs` (delete,
//! collect garbage); this file holds the chain and its metadata. A crash
//! before a capture's final rename leaves no checkpoint; the journal makes
//! the next start collect the objects the half capture wrote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

mod capture;
mod gc;
mod hook;
mod image_cache;
mod place;
mod restore;
pub mod seal;
mod sleep;

pub use capture::EXTERNAL_MOUNTS;
pub use hook::criu_action;
pub use restore::PolicyRestore;

pub use sleep::{ColdRecord, cold_record_path};

use crate::archive;
use crate::cgroup::CgroupError;
use crate::container::Container;
use crate::criu::{Criu, DumpStats};
use crate::durable::{self, DurableError};
use crate::fs::manifest::Manifest;
use crate::fs::{Env, FsError};
use crate::supervisor::{ServiceDef, Supervisor, SupervisorError};

const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// A line of progress for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    Info(String),
    /// Something failed without failing the operation (a service's dump).
    Error(String),
}

fn info(progress: &dyn Fn(Note), s: impl Into<String>) {
    progress(Note::Info(s.into()));
}
/// How many of the newest checkpoints are browsable under `<id>/root`.
const BROWSABLE: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {0:?} not found")]
    NotFound(String),
    #[error("checkpoint id {0:?} is invalid ([A-Za-z0-9][A-Za-z0-9_.-]{{0,62}})")]
    BadId(String),
    #[error("checkpoint {0:?} already exists")]
    Exists(String),
    #[error(
        "checkpoint {0:?} is the one the environment descends from; restore or checkpoint another first"
    )]
    InUse(String),
    #[error("checkpoint {0:?} is being exported; delete it once the export ends")]
    Exporting(String),
    #[error("checkpoints are unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Archive(#[from] crate::archive::ArchiveError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Criu(#[from] crate::criu::CriuError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error(transparent)]
    Container(#[from] crate::container::ContainerError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// How a capture went, for the metadata and the `info` events.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CaptureStats {
    /// Freeze → thaw: the pause every service saw (CRIU dumps included).
    pub freeze_ms: f64,
    pub capture_ms: f64,
    pub entries: u64,
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    pub files_cached: u64,
    /// Whether the change journal spared listing the whole upper dir.
    #[serde(default)]
    pub incremental: bool,
    /// Bytes of CRIU images (compressed) new to the store, and already
    /// there (deduplicated).
    #[serde(default)]
    pub images_new_bytes: u64,
    #[serde(default)]
    pub images_dedup_bytes: u64,
}

/// The policies a checkpoint keeps: the network policy, where the
/// environment has its own network (none: everything allowed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Policies {
    #[serde(default)]
    pub network: Option<crate::policy::NetworkPolicy>,
}

/// A checkpoint's metadata (`meta.json`); the API shows the public fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub id: String,
    pub create_time: String,
    pub source_id: Option<String>,
    pub comment: String,
    /// Ancestry, nearest first.
    pub history: Vec<String>,
    pub is_auto: bool,
    pub health: String,
    /// Store object holding the manifest.
    pub manifest: String,
    pub services: Vec<ServiceDef>,
    pub running: Vec<String>,
    pub stats: CaptureStats,
    /// The CRIU dump of the whole environment (none: files only).
    #[serde(default)]
    pub env: Option<EnvImages>,
    /// Whether process state was asked for (`processes: false`: files only).
    #[serde(default)]
    pub with_processes: bool,
    /// Where an imported checkpoint came from (its id, time, comment and
    /// ancestry on the machine that exported it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_from: Option<ImportedFrom>,
    /// What the environment held that this checkpoint does not (its
    /// `health` is then `partial`): the first [`SKIPPED_LISTED`] entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedEntry>,
    /// How many entries were skipped in all.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_count: u64,
    /// The policies in force when it was taken; a restore puts them back
    /// (none recorded: the policies stay as they are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Policies>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The metadata lists at most this many skipped entries (and counts all).
pub const SKIPPED_LISTED: usize = 100;

/// An entry of the environment a checkpoint could not record, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SkippedEntry {
    /// Its path inside the environment (shortened when very long).
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportedFrom {
    /// The sprite it was pulled from (none: an archive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sprite: Option<String>,
    pub id: String,
    pub create_time: String,
    pub comment: String,
    pub history: Vec<String>,
}

/// The CRIU dump of the whole environment in a checkpoint, and what the
/// daemon needs to plug its side back in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnvImages {
    /// Image file name → store object (zstd), for every image but the
    /// pages ones.
    pub images: BTreeMap<String, String>,
    /// Pages image name (`pages-<n>.img`) → its page list
    /// ([`crate::fs::pages`]: stored by page, deduplicated).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pages: BTreeMap<String, String>,
    pub stats: DumpStats,
    /// `pipe:[N]` of the init's request and event pipes.
    pub init_pipes: [String; 2],
    pub services: Vec<DumpedService>,
    #[serde(default)]
    pub sessions: Vec<crate::exec::DumpedSession>,
    /// Cgroup name (under the daemon's) → the pids inside that were in it.
    pub cgroups: BTreeMap<String, Vec<i32>>,
    /// Inodes of unix sockets inside whose peer was outside (a client of
    /// the API socket): dumped as external, restored with a gone peer.
    #[serde(default)]
    pub external_sockets: Vec<u64>,
    /// The seal of the checkpoint key over the rest ([`seal`], hex; none:
    /// taken before seals, or forged): a restore runs processes only from
    /// images it opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A running service in a dump.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpedService {
    pub name: String,
    /// Its main process, inside the environment.
    pub pid: i32,
    pub restart_count: u32,
    /// When the dumped instance started (ms since the Unix epoch).
    pub started_at_ms: u64,
    /// `pipe:[N]` of its stdout and stderr (the daemon reads the other ends).
    pub stdout: Option<String>,
    pub stderr: Option<String>,
}

/// The manifest object of checkpoint `id` under `state_dir`, read from its
/// `meta.json` (for [`crate::fs::EnvConfig::layer_manifest`], before the
/// chain is loaded).
pub fn manifest_of(state_dir: &Path, id: &str) -> Option<String> {
    if !crate::config::valid_name(id) {
        return None;
    }
    let bytes = std::fs::read(state_dir.join("checkpoints").join(id).join("meta.json")).ok()?;
    serde_json::from_slice::<CheckpointMeta>(&bytes)
        .ok()
        .map(|m| m.manifest)
}

impl CheckpointMeta {
    /// The API object.
    pub fn public(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "create_time": self.create_time,
            "source_id": self.source_id,
            "comment": self.comment,
            "history": self.history,
            "is_auto": self.is_auto,
            "health": self.health,
            "services": self.running,
            "freeze_ms": self.stats.freeze_ms,
            "processes": self.env.iter().flat_map(|e| e.services.iter().map(|p| serde_json::json!({
                "service": p.name,
                "pid": p.pid,
                "dump_ms": e.stats.dump_ms,
                "bytes": e.stats.bytes,
            }))).collect::<Vec<_>>(),
            "criu": self.env.as_ref().map(|e| &e.stats),
            "store": {
                "images_new_bytes": self.stats.images_new_bytes,
                "images_dedup_bytes": self.stats.images_dedup_bytes,
            },
            "capture_ms": self.stats.capture_ms,
            "files": self.stats.entries,
            "imported_from": self.imported_from,
            "skipped": self.skipped,
            "skipped_count": self.skipped_count,
        })
    }
}

/// Told the id of every checkpoint published (the uploads queue it).
type OnPublish = Box<dyn Fn(&str) + Send + Sync>;

pub struct Checkpoints {
    dir: PathBuf,
    /// Raw CRIU images while a capture or restore uses them: `<state>/criu/`.
    images: PathBuf,
    env: Arc<Env>,
    sup: Supervisor,
    criu: Option<Criu>,
    /// The environment's container (none: no environment, files only).
    container: Option<Container>,
    metas: Mutex<BTreeMap<String, CheckpointMeta>>,
    /// The decoded manifest of the mounted layer (the parent of captures).
    parent: Mutex<Option<(String, Arc<Manifest>)>>,
    /// Exec sessions: frozen with the services, killed by a restore.
    sessions: std::sync::OnceLock<crate::exec::Sessions>,
    /// The stored policies: recorded by captures, put back by restores.
    policies: std::sync::OnceLock<crate::policy::PolicyStore>,
    /// Checkpoints being exported (id → how many exports): not deletable.
    exporting: Arc<Mutex<BTreeMap<String, usize>>>,
    /// How many automatic checkpoints (taken before restores) are kept.
    auto_keep: std::sync::atomic::AtomicUsize,
    /// What CRIU measured of the last restore of the whole tree.
    last_restore: Mutex<Option<crate::criu::RestoreStats>>,
    /// The raw images of the last restore, patched by the next.
    image_cache: image_cache::ImageCache,
    /// Where every page of the live packs is (none: built at the next
    /// capture; pruned by every garbage collection).
    page_index: Mutex<Option<crate::fs::pages::PageIndex>>,
    /// Told the id of every checkpoint a capture publishes (the remote
    /// store's uploads).
    on_publish: std::sync::OnceLock<OnPublish>,
    /// Seals the process images of each capture; a restore runs processes
    /// only from images it opens.
    key: seal::Key,
}

/// The default of `--auto-keep`.
pub const AUTO_KEEP: usize = 5;

/// Keeps a checkpoint from being deleted while it is exported.
pub struct ExportPin {
    id: String,
    pins: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Drop for ExportPin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = pins.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.id);
            }
        }
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// `v12` → 12.
fn vnum(id: &str) -> Option<u64> {
    id.strip_prefix('v')?.parse().ok()
}

impl Checkpoints {
    /// Loads the chain; finishes what a crash interrupted.
    /// `criu`: process checkpoints (none: files only). `key`: the
    /// checkpoint key ([`seal`]).
    pub fn open(
        state_dir: &Path,
        key: seal::Key,
        env: Arc<Env>,
        sup: Supervisor,
        criu: Option<Criu>,
        container: Option<Container>,
    ) -> Result<Self, CheckpointError> {
        let dir = state_dir.join("checkpoints");
        let images = state_dir.join("criu");
        for d in [&dir, &images] {
            std::fs::create_dir_all(d).map_err(io_err("create", d))?;
        }
        // Raw images live only while a capture stores them or a restore
        // reads them: whatever is here, a crash left (or an older version's
        // cache). A restore's `/dev` may still be mounted there.
        crate::container::dev::release(&images.join("dev"));
        for entry in std::fs::read_dir(&images)
            .map_err(io_err("read dir", &images))?
            .flatten()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
        let mut metas = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)
            .map_err(io_err("read dir", &dir))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(durable::TEMP_PREFIX) {
                let _ = std::fs::remove_dir_all(entry.path());
                continue;
            }
            if !entry.path().is_dir() {
                continue;
            }
            match std::fs::read(entry.path().join("meta.json"))
                .map(|b| serde_json::from_slice::<CheckpointMeta>(&b))
            {
                Ok(Ok(m)) => {
                    metas.insert(m.id.clone(), m);
                }
                other => {
                    tracing::warn!(checkpoint = %name, ?other, "ignoring unreadable checkpoint")
                }
            }
        }
        let cps = Checkpoints {
            dir,
            images,
            env,
            sup,
            criu,
            container,
            metas: Mutex::new(metas),
            parent: Mutex::new(None),
            sessions: std::sync::OnceLock::new(),
            policies: std::sync::OnceLock::new(),
            exporting: Arc::default(),
            auto_keep: AUTO_KEEP.into(),
            last_restore: Mutex::new(None),
            image_cache: image_cache::ImageCache::new(&state_dir.join("criu")),
            page_index: Mutex::new(None),
            on_publish: Default::default(),
            key,
        };
        cps.seal_own_checkpoints();
        cps.refresh_browsable();
        if cps.journal().exists() {
            tracing::warn!("a capture was interrupted: collecting the objects it wrote");
            cps.collect_garbage()?;
            std::fs::remove_file(cps.journal()).map_err(io_err("remove", &cps.journal()))?;
        }
        Ok(cps)
    }

    /// Seals the process images of the checkpoints this sprite took whose
    /// seal the key does not open (an older version's, unsealed; or the
    /// key was replaced): they were dumped here, into a state dir nothing
    /// else writes (rewritten atomically). Imported ones stay as they
    /// are: their images came from elsewhere.
    fn seal_own_checkpoints(&self) {
        let mut metas = self.metas.lock().unwrap_or_else(|e| e.into_inner());
        for meta in metas.values_mut() {
            let Some(images) = meta.env.as_mut() else {
                continue;
            };
            if meta.imported_from.is_some() || self.key.opens(images, &meta.manifest) {
                continue;
            }
            self.key.seal(images, &meta.manifest);
            let path = self.dir.join(&meta.id).join("meta.json");
            match durable::write_json(&path, &*meta) {
                Ok(()) => {
                    tracing::info!(checkpoint = %meta.id, "sealed the process images of a checkpoint of this sprite (taken before seals, or under another key)")
                }
                Err(e) => {
                    tracing::warn!(checkpoint = %meta.id, error = %e, "could not seal a checkpoint's process images")
                }
            }
        }
    }

    /// Whether a restore of `meta` can run its processes as far as the seal
    /// goes: its images sealed by this sprite's key (none: it has no
    /// process images).
    pub fn sealed_here(&self, meta: &CheckpointMeta) -> Option<bool> {
        meta.env
            .as_ref()
            .map(|images| self.key.opens(images, &meta.manifest))
    }

    /// Exec sessions to freeze during captures and to kill on restores.
    pub fn set_sessions(&self, sessions: crate::exec::Sessions) {
        let _ = self.sessions.set(sessions);
    }

    /// The policy store: captures record the policies, restores put them
    /// back.
    pub fn set_policies(&self, policies: crate::policy::PolicyStore) {
        let _ = self.policies.set(policies);
    }

    /// The policies a capture records (none where the environment has no
    /// network of its own: nothing to put back).
    fn policies_now(&self) -> Option<Policies> {
        self.container.as_ref()?.network()?;
        Some(Policies {
            network: self.policies.get()?.network(),
        })
    }

    /// `f` is told the id of every checkpoint a capture publishes, once
    /// it is durable.
    pub fn set_on_publish(&self, f: Box<dyn Fn(&str) + Send + Sync>) {
        let _ = self.on_publish.set(f);
    }

    /// Every object of a pinned checkpoint with its size, in the order an
    /// import accepts them (blocking; see [`archive::objects_of`]).
    pub fn objects_of(
        &self,
        meta: &CheckpointMeta,
        _pin: &ExportPin,
    ) -> Result<Vec<(String, u64)>, archive::ArchiveError> {
        archive::objects_of(self.env.store(), meta)
    }

    /// How many automatic checkpoints to keep (`--auto-keep`).
    pub fn set_auto_keep(&self, n: usize) {
        self.auto_keep
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Deletes the automatic checkpoints beyond the newest `--auto-keep`.
    pub(crate) fn prune_auto(&self) {
        let keep = self.auto_keep.load(std::sync::atomic::Ordering::Relaxed);
        for m in self.list(None).into_iter().filter(|m| m.is_auto).skip(keep) {
            match self.delete(&m.id) {
                Ok(_) => tracing::info!(id = %m.id, "old automatic checkpoint deleted"),
                Err(e) => {
                    tracing::warn!(id = %m.id, error = %e, "cannot delete an old automatic checkpoint")
                }
            }
        }
    }

    fn journal(&self) -> PathBuf {
        self.dir.join(".capturing")
    }

    pub fn env(&self) -> &Env {
        &self.env
    }

    /// Newest first; with `history`, only those whose ancestry contains it.
    pub fn list(&self, history: Option<&str>) -> Vec<CheckpointMeta> {
        let metas = self.metas.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<CheckpointMeta> = metas
            .values()
            .filter(|m| history.is_none_or(|h| m.history.iter().any(|x| x == h)))
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            b.create_time
                .cmp(&a.create_time)
                .then_with(|| vnum(&b.id).cmp(&vnum(&a.id)))
        });
        out
    }

    pub fn get(&self, id: &str) -> Result<CheckpointMeta, CheckpointError> {
        self.metas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| CheckpointError::NotFound(id.to_owned()))
    }

    /// Validates an id a client chose (seed-003 `POST /checkpoint`).
    pub fn check_new_id(&self, id: &str) -> Result<(), CheckpointError> {
        if !crate::config::valid_name(id) {
            return Err(CheckpointError::BadId(id.to_owned()));
        }
        if self
            .metas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
            || self.dir.join(id).exists()
        {
            return Err(CheckpointError::Exists(id.to_owned()));
        }
        Ok(())
    }

    /// Hands out the next `vN` (persisted first: ids are never reused).
    fn next_id(&self) -> Result<String, CheckpointError> {
        let path = self.dir.join("counter");
        let last: u64 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let seen = self
            .metas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter_map(|k| vnum(k))
            .max()
            .unwrap_or(0);
        let mut n = last.max(seen) + 1;
        while self.dir.join(format!("v{n}")).exists() {
            n += 1;
        }
        // Not fsynced here: the store's syncfs makes it durable before any
        // checkpoint with this id is published.
        let tmp = self.dir.join(format!("{}counter", durable::TEMP_PREFIX));
        std::fs::write(&tmp, n.to_string()).map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        Ok(format!("v{n}"))
    }

    fn parent_manifest(&self, layer: Option<&str>) -> Result<Arc<Manifest>, CheckpointError> {
        let Some(layer) = layer else {
            return Ok(Arc::new(Manifest::default()));
        };
        let mut cached = self.parent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, m)) = cached.as_ref() {
            if id == layer {
                return Ok(m.clone());
            }
        }
        let meta = self.get(layer)?;
        let m = Arc::new(Manifest::load(self.env.store(), &meta.manifest)?);
        *cached = Some((layer.to_owned(), m.clone()));
        Ok(m)
    }

    /// Runs `f` on the page index of the live packs (built first when a
    /// start or a garbage collection dropped it).
    fn with_page_index<R>(&self, f: impl FnOnce(&mut crate::fs::pages::PageIndex) -> R) -> R {
        let mut slot = self.page_index.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let lists: Vec<String> = self
                .metas
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .filter_map(|m| m.env.as_ref())
                .flat_map(|e| e.pages.values().cloned())
                .collect();
            let store = self.env.store();
            let mut packs = Vec::new();
            for list in lists {
                match crate::fs::pages::packs_of(store, &list) {
                    Ok(p) => packs.extend(p),
                    Err(e) => {
                        tracing::warn!(list, error = %e, "page list left out of the page index")
                    }
                }
            }
            let t = Instant::now();
            let index = crate::fs::pages::PageIndex::load(store, packs);
            tracing::info!(
                pages = index.len(),
                ms = t.elapsed().as_secs_f64() * 1e3,
                "page index built"
            );
            *slot = Some(index);
        }
        f(slot.as_mut().expect("just built"))
    }

    /// Writes `meta` into a temp dir (not visible, not yet durable: the
    /// caller's `syncfs` makes it so). Returns the dir.
    fn stage_meta(&self, meta: &CheckpointMeta) -> Result<PathBuf, CheckpointError> {
        let tmp = self
            .dir
            .join(format!("{}{}", durable::TEMP_PREFIX, meta.id));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(io_err("create", &tmp))?;
        let meta_path = tmp.join("meta.json");
        let json = serde_json::to_vec_pretty(meta)
            .map_err(|e| io_err("serialize", &meta_path)(e.into()))?;
        std::fs::write(&meta_path, json).map_err(io_err("write", &meta_path))?;
        Ok(tmp)
    }

    /// Makes a staged checkpoint visible: rename into place, fsync the dir.
    fn publish_meta(&self, tmp: &Path, id: &str) -> Result<(), CheckpointError> {
        let dest = self.dir.join(id);
        std::fs::rename(tmp, &dest).map_err(io_err("rename", &dest))?;
        durable::sync_dir(&self.dir)?;
        Ok(())
    }

    /// Pins checkpoint `id` for an export: it cannot be deleted until the
    /// pin is dropped.
    pub fn pin_for_export(&self, id: &str) -> Result<(CheckpointMeta, ExportPin), CheckpointError> {
        let meta = self.get(id)?;
        *self
            .exporting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_default() += 1;
        Ok((
            meta,
            ExportPin {
                id: id.to_owned(),
                pins: self.exporting.clone(),
            },
        ))
    }

    /// Writes the archive of a pinned checkpoint (blocking; see [`archive::export`]).
    pub fn export(
        &self,
        meta: &CheckpointMeta,
        _pin: &ExportPin,
        out: impl std::io::Write,
    ) -> Result<u64, archive::ArchiveError> {
        archive::export(self.env.store(), meta, out)
    }

    /// The object store (a pull stages into it and links from it).
    pub(crate) fn store(&self) -> &crate::fs::store::Store {
        self.env.store()
    }

    /// Reads and verifies an archive into the store's staging area
    /// (blocking; nothing is visible yet, nothing is kept on error).
    pub fn receive(
        &self,
        input: impl std::io::Read,
        limit: archive::Limit,
        progress: &dyn Fn(u64),
    ) -> Result<archive::Imported, archive::ArchiveError> {
        archive::import(self.env.store(), input, limit, progress)
    }

    /// Adds a verified archive as the next `vN`: its objects enter the store
    /// (those it already holds are dropped), then its metadata is published
    /// like a capture's. Call under the lifecycle's checkpoint guard.
    pub fn add_imported(
        &self,
        imported: archive::Imported,
        from_sprite: Option<&str>,
    ) -> Result<(CheckpointMeta, u64), CheckpointError> {
        std::fs::write(self.journal(), b"import").map_err(io_err("write", &self.journal()))?;
        let result = (|| {
            let id = self.next_id()?;
            let store = self.env.store();
            let new_objects = imported.staging.publish(store)?;
            let src = imported.meta;
            let meta = CheckpointMeta {
                id: id.clone(),
                create_time: now_rfc3339(),
                source_id: None,
                comment: src.comment.clone(),
                history: Vec::new(),
                is_auto: false,
                // (what the exporting machine could not capture is missing here too)
                health: if src.skipped_count == 0 && src.skipped.is_empty() {
                    "ok"
                } else {
                    "partial"
                }
                .into(),
                skipped: src.skipped.iter().take(SKIPPED_LISTED).cloned().collect(),
                skipped_count: src.skipped_count.max(src.skipped.len() as u64),
                manifest: src.manifest.clone(),
                services: src.services.clone(),
                running: src.running.clone(),
                stats: src.stats.clone(),
                env: src.env.clone(),
                with_processes: src.with_processes,
                policies: src.policies.clone(),
                imported_from: Some(ImportedFrom {
                    sprite: from_sprite.map(str::to_owned),
                    id: src.id.clone(),
                    create_time: src.create_time.clone(),
                    comment: src.comment.clone(),
                    history: src.history.clone(),
                }),
            };
            let tmp = self.stage_meta(&meta)?;
            store.sync()?;
            self.publish_meta(&tmp, &id)?;
            Ok((meta, new_objects))
        })();
        match &result {
            Ok((meta, _)) => {
                self.metas
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(meta.id.clone(), meta.clone());
                let _ = std::fs::remove_file(self.journal());
            }
            Err(e) => {
                tracing::warn!(error = %e, "import failed while publishing; collecting its objects");
                let _ = self.collect_garbage();
                let _ = std::fs::remove_file(self.journal());
            }
        }
        result
    }

    /// Where checkpoint `id` is browsable read-only.
    pub fn root_of(&self, id: &str) -> PathBuf {
        self.dir.join(id).join("root")
    }

    /// Makes the newest checkpoints browsable read-only (building their
    /// layers, which later restores reuse) and unmounts the older ones.
    pub fn refresh_browsable(&self) {
        self.mount_browsable(true);
    }

    /// [`Checkpoints::refresh_browsable`]; with `build` false, only the
    /// checkpoints whose layer is built already (no manifest is read: the
    /// remount after a process dump, on a restore's path too).
    fn mount_browsable(&self, build: bool) {
        let all = self.list(None);
        for (i, m) in all.iter().enumerate() {
            let root = self.root_of(&m.id);
            if i >= BROWSABLE {
                self.env.unmount_path(&root);
                let _ = std::fs::remove_dir(&root);
                continue;
            }
            if self.env.is_mount_point(&root) {
                continue;
            }
            let result = if self.env.layer_dir(&m.id).exists() {
                self.env.mount_readonly(&m.id, &root).map_err(Into::into)
            } else if build {
                self.parent_manifest_uncached(&m.id)
                    .and_then(|manifest| Ok(self.env.ensure_layer(&m.id, &manifest)?))
                    .and_then(|_| Ok(self.env.mount_readonly(&m.id, &root)?))
            } else {
                continue;
            };
            if let Err(e) = result {
                tracing::warn!(checkpoint = %m.id, error = %e, "cannot make checkpoint browsable");
            }
        }
    }

    /// Unmounts every browsable root (shutdown).
    pub fn unmount_browsable(&self) {
        for m in self.list(None) {
            self.env.unmount_path(&self.root_of(&m.id));
        }
    }

    fn parent_manifest_uncached(&self, id: &str) -> Result<Manifest, CheckpointError> {
        let meta = self.get(id)?;
        Ok(Manifest::load(self.env.store(), &meta.manifest)?)
    }
}
