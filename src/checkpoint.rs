//! The checkpoint chain `v1, v2, …`: capture, restore, delete, and the
//! metadata that makes a checkpoint visible only once it is complete.
//!
//! ```text
//! <state>/checkpoints/counter        last vN number handed out (ids are never reused)
//! <state>/checkpoints/<id>/meta.json  a complete checkpoint (the dir appears by rename)
//! <state>/checkpoints/.capturing      journal: a capture is under way
//! ```
//!
//! Capture: freeze every service cgroup → scan the upper dir and store what
//! changed → record the service definitions → thaw → `syncfs` the store →
//! store the manifest → write `meta.json` in a temp dir, fsync, rename. A
//! crash before the rename leaves no checkpoint; the journal makes the next
//! start collect the objects the half capture wrote.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::archive;
use crate::cgroup::{CgroupError, FreezeGuard};
use crate::criu::{Criu, Dumped};
use crate::durable::{self, DurableError};
use crate::fs::manifest::{self, Manifest};
use crate::fs::{Env, FsError};
use crate::supervisor::{ServiceDef, Supervisor, SupervisorError};

const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// Raw CRIU images are kept on disk for this many of the newest
/// checkpoints (restoring them skips the decompression).
const RAW_IMAGES_KEPT: usize = 2;
/// How long a restore waits for the pids of killed services to be free.
const PIDS_FREE_TIMEOUT: Duration = Duration::from_secs(5);

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
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Durable(#[from] DurableError),
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
    /// CRIU images of the services that were running (none: files only).
    #[serde(default)]
    pub processes: Vec<ProcessImages>,
    /// Whether process state was asked for (`processes: false`: files only).
    #[serde(default)]
    pub with_processes: bool,
    /// Where an imported checkpoint came from (its id, time, comment and
    /// ancestry on the machine that exported it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_from: Option<ImportedFrom>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportedFrom {
    pub id: String,
    pub create_time: String,
    pub comment: String,
    pub history: Vec<String>,
}

/// One service's process tree in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessImages {
    pub service: String,
    pub restart_count: u32,
    /// When the dumped instance started (ms since the Unix epoch).
    #[serde(default)]
    pub started_at_ms: u64,
    #[serde(flatten)]
    pub dumped: Dumped,
    /// Image file name → store object (zstd).
    pub images: BTreeMap<String, String>,
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
            "processes": self.processes.iter().map(|p| serde_json::json!({
                "service": p.service,
                "pid": p.dumped.pid,
                "dump_ms": p.dumped.dump_ms,
                "bytes": p.dumped.bytes,
            })).collect::<Vec<_>>(),
            "capture_ms": self.stats.capture_ms,
            "files": self.stats.entries,
            "imported_from": self.imported_from,
        })
    }
}

pub struct Checkpoints {
    dir: PathBuf,
    /// Raw CRIU images: `<state>/criu/<id>/<service>/`.
    images: PathBuf,
    env: Arc<Env>,
    sup: Supervisor,
    criu: Option<Criu>,
    metas: Mutex<BTreeMap<String, CheckpointMeta>>,
    /// The decoded manifest of the mounted layer (the parent of captures).
    parent: Mutex<Option<(String, Arc<Manifest>)>>,
    /// Exec sessions: frozen with the services, killed by a restore.
    sessions: std::sync::OnceLock<crate::exec::Sessions>,
    /// Checkpoints being exported (id → how many exports): not deletable.
    exporting: Arc<Mutex<BTreeMap<String, usize>>>,
}

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
    /// `criu`: process checkpoints (none: files only).
    pub fn open(
        state_dir: &Path,
        env: Arc<Env>,
        sup: Supervisor,
        criu: Option<Criu>,
    ) -> Result<Self, CheckpointError> {
        let dir = state_dir.join("checkpoints");
        let images = state_dir.join("criu");
        for d in [&dir, &images] {
            std::fs::create_dir_all(d).map_err(io_err("create", d))?;
        }
        // Dumps a crash interrupted.
        for entry in std::fs::read_dir(&images)
            .map_err(io_err("read dir", &images))?
            .flatten()
        {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(durable::TEMP_PREFIX)
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
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
            metas: Mutex::new(metas),
            parent: Mutex::new(None),
            sessions: std::sync::OnceLock::new(),
            exporting: Arc::default(),
        };
        cps.refresh_browsable();
        if cps.journal().exists() {
            tracing::warn!("a capture was interrupted: collecting the objects it wrote");
            cps.collect_garbage()?;
            std::fs::remove_file(cps.journal()).map_err(io_err("remove", &cps.journal()))?;
        }
        Ok(cps)
    }

    /// Exec sessions to freeze during captures and to kill on restores.
    pub fn set_sessions(&self, sessions: crate::exec::Sessions) {
        let _ = self.sessions.set(sessions);
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

    /// Takes a checkpoint: files, and with `processes` (and CRIU) the
    /// memory of every running service. Blocking (disk work, CRIU): run it
    /// off the async workers. `progress` receives human-readable steps.
    #[tracing::instrument(name = "checkpoint", skip_all, fields(id = tracing::field::Empty))]
    pub fn capture(
        &self,
        comment: String,
        id: Option<String>,
        processes: bool,
        progress: &dyn Fn(Note),
    ) -> Result<CheckpointMeta, CheckpointError> {
        let started = Instant::now();
        let id = match id {
            Some(id) => {
                self.check_new_id(&id)?;
                id
            }
            None => self.next_id()?,
        };
        tracing::Span::current().record("id", id.as_str());
        let st = self.env.state();
        let parent = self.parent_manifest(st.layer.as_deref())?;
        durable::write_atomic(&self.journal(), id.as_bytes(), 0o644)?;
        let result = (|| {
            if self.env.cache_is_cold() {
                info(progress, "Indexing files before freezing...");
            }
            if let Some(warm) = self.env.warm_scan()? {
                info(
                    progress,
                    format!(
                        "Indexed {} entries before freezing ({} files, {} bytes stored)",
                        warm.entries, warm.files_hashed, warm.bytes_hashed
                    ),
                );
            }
            let services_running = self.sup.running();
            let criu = self.criu.as_ref().filter(|_| processes);
            info(
                progress,
                format!(
                    "Freezing {} service(s){}...",
                    services_running.len(),
                    if criu.is_some() && !services_running.is_empty() {
                        " and dumping their processes"
                    } else {
                        ""
                    }
                ),
            );
            let freeze_start = Instant::now();
            // CRIU dumps start while the cgroups are still freezing (CRIU
            // seizes the tasks itself and leaves each cgroup frozen); the
            // file scan waits until every service is frozen.
            let mut to_freeze: Vec<_> = services_running.iter().map(|r| r.cgroup.clone()).collect();
            if let Some(s) = self.sessions.get() {
                to_freeze.extend(s.cgroups());
            }
            let guard = FreezeGuard::begin(to_freeze)?;
            let tmp_images = self.images.join(format!("{}{id}", durable::TEMP_PREFIX));
            let mut dumps = Vec::new();
            let mut failed = Vec::new();
            if let Some(criu) = criu {
                for r in &services_running {
                    let dir = tmp_images.join(&r.name);
                    match criu.dump(&r.name, r.pid, r.cgroup.path(), &dir) {
                        Ok(d) => dumps.push((r, d, dir)),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
            }
            let dumped_at = freeze_start.elapsed();
            // A dumped service is settled: CRIU seized every task of its
            // cgroup (each stopped out of any system call), set the cgroup
            // frozen again and only then let go of them, so none runs a user
            // instruction before the thaw. The others must reach the freezer.
            let settled: Vec<&Path> = dumps.iter().map(|(r, _, _)| r.cgroup.path()).collect();
            guard.wait_except(&settled, FREEZE_TIMEOUT)?;
            let frozen_at = freeze_start.elapsed();
            let frozen = self.env.scan_frozen(&guard.pids())?;
            let (services, running) = self.sup.snapshot();
            let scanned_at = freeze_start.elapsed();
            drop(guard);
            let freeze_ms = freeze_start.elapsed().as_secs_f64() * 1e3;
            tracing::debug!(
                ?dumped_at,
                ?frozen_at,
                ?scanned_at,
                freeze_ms,
                "freeze window"
            );
            let scan = frozen.stats();
            for e in failed {
                progress(Note::Error(format!(
                    "{e}; the checkpoint keeps its files and other services"
                )));
            }
            let incremental = frozen.incremental();
            let how = if incremental {
                format!(
                    "{} entries read (named by the change journal)",
                    scan.entries
                )
            } else {
                format!(
                    "{} entries scanned, {} unchanged",
                    scan.entries, scan.files_cached
                )
            };
            info(
                progress,
                format!(
                    "Services thawed after {freeze_ms:.1} ms; {how}, {} file(s) changed ({} bytes)",
                    scan.files_hashed, scan.bytes_hashed
                ),
            );
            for (r, d, _) in &dumps {
                info(
                    progress,
                    format!(
                        "Dumped {} (pid {}): {} bytes in {:.1} ms",
                        r.name, d.pid, d.bytes, d.dump_ms
                    ),
                );
            }
            let mut captured = self.env.finish_capture(frozen, &parent)?;
            info(progress, "Saving filesystem state...");
            let manifest_id = captured.manifest.store(self.env.store())?;
            let mut process_images = Vec::new();
            for (r, dumped, dir) in dumps {
                let mut images = BTreeMap::new();
                for entry in std::fs::read_dir(&dir)
                    .map_err(io_err("read dir", &dir))?
                    .flatten()
                {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".log") {
                        continue;
                    }
                    let (object, _) = self.env.store().put_file_compressed(&entry.path())?;
                    images.insert(name, object);
                }
                process_images.push(ProcessImages {
                    service: r.name.clone(),
                    restart_count: r.restart_count,
                    started_at_ms: r.started_at_ms,
                    dumped,
                    images,
                });
            }
            let source = st.source.clone();
            let mut history = Vec::new();
            if let Some(src) = &source {
                history.push(src.clone());
                if let Ok(m) = self.get(src) {
                    history.extend(m.history);
                }
            }
            let meta = CheckpointMeta {
                id: id.clone(),
                create_time: now_rfc3339(),
                source_id: source,
                comment: comment.clone(),
                history,
                is_auto: false,
                health: "ok".into(),
                manifest: manifest_id,
                services,
                running,
                processes: process_images,
                with_processes: criu.is_some(),
                imported_from: None,
                stats: CaptureStats {
                    freeze_ms,
                    capture_ms: started.elapsed().as_secs_f64() * 1e3,
                    entries: captured.manifest.len() as u64,
                    files_hashed: scan.files_hashed,
                    bytes_hashed: scan.bytes_hashed,
                    files_cached: scan.files_cached,
                    incremental,
                },
            };
            // Visible only once complete: a temp dir renamed into place. One
            // syncfs makes the objects, the manifest, the id counter and
            // meta.json durable together, before the rename publishes them.
            let tmp = self.stage_meta(&meta)?;
            let pending = self.env.prepare_source(&id)?;
            self.env.store().sync()?;
            self.publish_meta(&tmp, &id)?;
            // Published: from here on the environment descends from it.
            self.env.publish_source(pending)?;
            if tmp_images.exists() {
                let _ = std::fs::rename(&tmp_images, self.images.join(&id));
            }
            self.env.keep_scan(captured);
            Ok(meta)
        })();
        match &result {
            Ok(meta) => {
                self.metas
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), meta.clone());
                let _ = std::fs::remove_file(self.journal());
                self.prune_raw_images();
                tracing::info!(
                    freeze_ms = meta.stats.freeze_ms,
                    capture_ms = meta.stats.capture_ms,
                    "checkpoint created"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint failed; collecting its objects");
                let _ = std::fs::remove_dir_all(
                    self.images.join(format!("{}{id}", durable::TEMP_PREFIX)),
                );
                self.env.store().clean_temp();
                let _ = self.collect_garbage();
                let _ = std::fs::remove_file(self.journal());
            }
        }
        result
    }

    /// Restores `id`: kills every service, mounts the checkpoint's layer with
    /// a fresh upper dir, restores the service definitions and starts those
    /// that were running.
    #[tracing::instrument(name = "restore", skip(self, progress), fields(checkpoint = id))]
    pub async fn restore(
        self: &Arc<Self>,
        id: &str,
        progress: &(dyn Fn(Note) + Sync),
    ) -> Result<(), CheckpointError> {
        let meta = self.get(id)?;
        let t0 = Instant::now();
        info(progress, "Stopping services...");
        self.sup.kill_all().await;
        if let Some(s) = self.sessions.get() {
            s.kill_all().await;
        }
        let killed = t0.elapsed();
        info(progress, "Restoring filesystem...");
        let me = self.clone();
        let target = meta.clone();
        let built = tokio::task::spawn_blocking(move || -> Result<bool, CheckpointError> {
            let m = me.parent_manifest(Some(&target.id))?;
            let built = me.env.ensure_layer(&target.id, &m)?;
            me.env.switch_to(&target.id)?;
            Ok(built)
        })
        .await
        .map_err(|e| CheckpointError::Unavailable(e.to_string()))??;
        if !built {
            info(progress, format!("Layer of {id} reused from cache"));
        }
        self.sup
            .replace_definitions(meta.services.clone(), &meta.running)?;
        let files = t0.elapsed();
        // Processes after the files, so they see the restored tree.
        for name in &meta.running {
            let why = match (
                meta.processes.iter().find(|p| &p.service == name),
                &self.criu,
            ) {
                (Some(p), Some(criu)) => match self.restore_process(&meta.id, p, criu).await {
                    Ok(()) => {
                        info(
                            progress,
                            format!(
                                "Service {name} restored with its memory (pid {})",
                                p.dumped.pid
                            ),
                        );
                        continue;
                    }
                    Err(e) => e,
                },
                (Some(_), None) => "CRIU is unavailable".to_owned(),
                (None, _) if !meta.with_processes => "the checkpoint keeps files only".to_owned(),
                (None, _) => "its processes were not dumped".to_owned(),
            };
            info(progress, format!("Service {name} starts fresh: {why}"));
        }
        let processes = t0.elapsed();
        self.sup.start_all().await;
        tracing::debug!(?killed, ?files, ?processes, total = ?t0.elapsed(), "restore timing");
        Ok(())
    }

    /// Restores one service's process tree with CRIU into a fresh cgroup
    /// and hands it to the supervisor. The error is the reason to start it
    /// fresh instead.
    async fn restore_process(
        self: &Arc<Self>,
        id: &str,
        p: &ProcessImages,
        criu: &Criu,
    ) -> Result<(), String> {
        let (cgroup, procs) = self
            .sup
            .fresh_cgroup(&p.service)
            .await
            .map_err(|e| e.to_string())?;
        let was = crate::supervisor::RunningService {
            name: p.service.clone(),
            pid: p.dumped.pid,
            cgroup,
            restart_count: p.restart_count,
            started_at_ms: p.started_at_ms,
        };
        let me = self.clone();
        let (id, p2, criu) = (id.to_owned(), p.clone(), criu.clone());
        let restored = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let dir = me.raw_images(&id, &p2).map_err(|e| e.to_string())?;
            // A pid held by a process that is not ours (an imported
            // checkpoint, a long-lived machine) will not be freed: say so now.
            if let Some(t) = p2
                .dumped
                .tids
                .iter()
                .find(|t| me.sup.owns_pid(**t) == Some(false))
            {
                let comm = std::fs::read_to_string(format!("/proc/{t}/comm")).unwrap_or_default();
                return Err(format!(
                    "its pid {t} is in use by another process ({}): a pid conflict",
                    comm.trim()
                ));
            }
            if !Criu::wait_free(&p2.dumped.tids, PIDS_FREE_TIMEOUT) {
                return Err(format!("its pids ({:?}) are still in use", p2.dumped.tids));
            }
            criu.restore(&p2.service, &p2.dumped, &dir, procs)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        self.sup
            .adopt(&was, [restored.stdout, restored.stderr], restored.exit)
            .map_err(|e| e.to_string())
    }

    /// The raw images of a service in checkpoint `id`: the cached dir, or
    /// decompressed from the store into it.
    fn raw_images(&self, id: &str, p: &ProcessImages) -> Result<PathBuf, CheckpointError> {
        let dir = self.images.join(id).join(&p.service);
        if p.images.keys().all(|n| dir.join(n).exists()) {
            return Ok(dir);
        }
        let tmp = self
            .images
            .join(format!("{}{id}-{}", durable::TEMP_PREFIX, p.service));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        for (name, object) in &p.images {
            if name.contains('/') || name.starts_with('.') {
                return Err(CheckpointError::Unavailable(format!(
                    "bad image name {name:?}"
                )));
            }
            self.env
                .store()
                .extract_compressed(object, &tmp.join(name))?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(self.images.join(id)).map_err(io_err("create", &dir))?;
        std::fs::rename(&tmp, &dir).map_err(io_err("rename", &dir))?;
        Ok(dir)
    }

    /// Keeps raw images only for the newest [`RAW_IMAGES_KEPT`] checkpoints.
    fn prune_raw_images(&self) {
        let keep: HashSet<String> = self
            .list(None)
            .into_iter()
            .take(RAW_IMAGES_KEPT)
            .map(|m| m.id)
            .collect();
        for entry in std::fs::read_dir(&self.images)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(durable::TEMP_PREFIX) && !keep.contains(&name) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
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

    /// Reads and verifies an archive into the store's staging area
    /// (blocking; nothing is visible yet, nothing is kept on error).
    pub fn receive(
        &self,
        input: impl std::io::Read,
        limit: u64,
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
                health: "ok".into(),
                manifest: src.manifest.clone(),
                services: src.services.clone(),
                running: src.running.clone(),
                stats: src.stats.clone(),
                processes: src.processes.clone(),
                with_processes: src.with_processes,
                imported_from: Some(ImportedFrom {
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

    /// Deletes a checkpoint and frees the objects no other one references.
    /// Returns bytes freed.
    pub fn delete(&self, id: &str) -> Result<u64, CheckpointError> {
        self.get(id)?;
        if self
            .exporting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
        {
            return Err(CheckpointError::Exporting(id.to_owned()));
        }
        let st = self.env.state();
        if st.source.as_deref() == Some(id) || st.layer.as_deref() == Some(id) {
            return Err(CheckpointError::InUse(id.to_owned()));
        }
        let dir = self.dir.join(id);
        self.env.unmount_path(&self.root_of(id));
        // Out of sight first (atomic), then gone.
        let trash = self
            .dir
            .join(format!("{}deleted-{id}", durable::TEMP_PREFIX));
        std::fs::rename(&dir, &trash).map_err(io_err("rename", &dir))?;
        self.metas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let _ = std::fs::remove_dir_all(&trash);
        self.env.remove_layer(id);
        let _ = std::fs::remove_dir_all(self.images.join(id));
        let (_, bytes) = self.collect_garbage()?;
        self.refresh_browsable();
        Ok(bytes)
    }

    /// Where checkpoint `id` is browsable read-only.
    pub fn root_of(&self, id: &str) -> PathBuf {
        self.dir.join(id).join("root")
    }

    /// Makes the newest checkpoints browsable read-only (building their
    /// layers, which later restores reuse) and unmounts the older ones.
    pub fn refresh_browsable(&self) {
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
            let result = self
                .parent_manifest_uncached(&m.id)
                .and_then(|manifest| Ok(self.env.ensure_layer(&m.id, &manifest)?))
                .and_then(|_| Ok(self.env.mount_readonly(&m.id, &root)?));
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

    /// Deletes every store object no checkpoint references.
    fn collect_garbage(&self) -> Result<(u64, u64), CheckpointError> {
        let metas: Vec<CheckpointMeta> = self
            .metas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut keep: HashSet<String> = self.env.cached_objects().into_iter().collect();
        for m in metas {
            manifest::references(self.env.store(), &m.manifest, &mut keep)?;
            for p in &m.processes {
                keep.extend(p.images.values().cloned());
            }
        }
        Ok(self.env.store().collect_garbage(&keep)?)
    }
}
