//! The snapshot engine's side of the filesystem: the environment root (an
//! overlayfs mount the daemon owns), its upper/work dirs, the layers built
//! from checkpoints, and the content-addressed store.
//!
//! ```text
//! <state>/env/state.json      which layer is mounted, upper generation, source checkpoint
//! <state>/env/upper-<gen>/    all changes since the last restore
//! <state>/env/work-<gen>/     overlay's work dir
//! <state>/env/base/           the default (empty) base when --env-base is not given
//! <state>/layers/<id>/        a checkpoint's tree as hard links into the store (cached)
//! <state>/store/              see [`store`]
//! mount: lowerdir=<layer>:<base>,upperdir=upper-<gen>,workdir=work-<gen> on --env-root
//! ```
//!
//! A restore mounts a *new* generation and only then switches `state.json`
//! (written atomically), so a crash at any point leaves either the old
//! environment or the new one, never a mix. The old environment's processes
//! may still be dying meanwhile (they hold the old root in a mount namespace
//! of their own); the stale generation is deleted once they are killed and
//! waited for (or on the next start).

pub(crate) mod at;
pub mod journal;
pub mod manifest;
pub mod pages;
pub mod scan;
pub mod store;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::durable::{self, DurableError};
use manifest::Manifest;
use scan::{Delta, ScanStats, Tracked};
use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mount overlay on {target} ({options}): {source}")]
    Mount {
        target: PathBuf,
        options: String,
        #[source]
        source: io::Error,
    },
    #[error("unmount {target}: {source}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("path {0} cannot be used in overlay options (contains `,`, `:` or a newline)")]
    BadPath(PathBuf),
    #[error("corrupt snapshot data: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Durable(#[from] DurableError),
}

/// A state update written but not yet renamed into place.
pub struct PendingSource {
    tmp: PathBuf,
    state: EnvState,
}

/// What the frozen part of a capture found.
pub struct FrozenScan {
    delta: Delta,
}

impl FrozenScan {
    pub fn stats(&self) -> ScanStats {
        self.delta.stats
    }

    /// Whether only what the change journal named was read.
    pub fn incremental(&self) -> bool {
        self.delta.incremental
    }
}

/// A capture's manifest, and what to remember of its scan once it is published.
pub struct Captured {
    pub manifest: Manifest,
    delta: Delta,
}

impl Captured {
    /// What the environment holds that the manifest does not.
    pub fn skipped(&self) -> &scan::Skipped {
        &self.delta.skipped
    }
}

/// An upper-dir path (encoded) as the environment shows it, shortened
/// when very long.
pub fn shown_path(rel: &str) -> String {
    at::shown(rel)
}

/// Workers sharing out the directories of a scan.
const SCAN_THREADS: usize = 2;

/// The `map_err` of every I/O call in `fs` and its submodules.
pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| FsError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// `f` over `items` on `threads` scoped threads (contiguous chunks),
/// results in order; the first error wins. `what` names the work in the
/// error a panicking worker turns into.
pub(crate) fn par_map<T: Send, R: Send>(
    items: Vec<T>,
    threads: usize,
    what: &str,
    f: impl Fn(T) -> Result<R, FsError> + Sync,
) -> Result<Vec<R>, FsError> {
    let chunk = items.len().div_ceil(threads.max(1)).max(1);
    let mut parts: Vec<Vec<T>> = Vec::new();
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        parts.push(it.by_ref().take(chunk).collect());
    }
    let f = &f;
    let done: Vec<Result<Vec<R>, FsError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || part.into_iter().map(f).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(FsError::Corrupt(format!("{what} worker panicked"))))
            })
            .collect()
    });
    let mut out = Vec::new();
    for part in done {
        out.extend(part?);
    }
    Ok(out)
}

/// Where things are.
#[derive(Debug, Clone)]
pub struct EnvConfig {
    pub state_dir: PathBuf,
    /// Where the merged tree is mounted.
    pub env_root: PathBuf,
    /// Read-only lowest layer; default `<state>/env/base` (empty).
    pub base: Option<PathBuf>,
    pub mountinfo: PathBuf,
    /// (state dir, checkpoint id) → the store object of its manifest: lets
    /// start-up rebuild a mounted layer whose dir went missing.
    pub layer_manifest: Option<fn(&Path, &str) -> Option<String>>,
}

/// What is mounted, persisted in `env/state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvState {
    /// The checkpoint whose layer is the lower dir (none: the bare base).
    pub layer: Option<String>,
    /// Generation of the upper/work dirs in use.
    pub generation: u64,
    /// The checkpoint the environment descends from (last created or restored).
    pub source: Option<String>,
}

pub struct Env {
    cfg: EnvConfig,
    base: PathBuf,
    store: Store,
    state: Mutex<EnvState>,
    /// What the last capture saw in the current upper dir.
    tracked: Mutex<Tracked>,
}

impl Env {
    /// Prepares the directories, cleans what a crash left, and mounts the
    /// environment root as `state.json` says (replacing a mount a crash left).
    pub fn open(cfg: EnvConfig) -> Result<Self, FsError> {
        let env_dir = cfg.state_dir.join("env");
        let layers = cfg.state_dir.join("layers");
        let base = cfg.base.clone().unwrap_or_else(|| env_dir.join("base"));
        for d in [&env_dir, &layers, &base, &cfg.env_root] {
            std::fs::create_dir_all(d).map_err(io_err("create", d))?;
        }
        journal::clean_probes(&env_dir);
        durable::clean_temp_files(&env_dir)?;
        let store = Store::open(&cfg.state_dir.join("store"))?;
        let state: EnvState = match std::fs::read(env_dir.join("state.json")) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| FsError::Corrupt(format!("env/state.json: {e}")))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => EnvState::default(),
            Err(e) => return Err(io_err("read", &env_dir.join("state.json"))(e)),
        };
        let env = Env {
            cfg,
            base,
            store,
            state: Mutex::new(state),
            tracked: Mutex::new(Tracked::default()),
        };
        env.clean_stale()?;
        if env.is_mounted() {
            tracing::info!(root = %env.cfg.env_root.display(), "replacing the environment mount a previous run left");
            env.unmount()?;
        }
        let st = env.state();
        if let Some(id) = st.layer.as_deref() {
            env.rebuild_missing_layer(id)?;
        }
        env.mount(st.layer.as_deref(), st.generation)?;
        env.load_scan_cache(st.generation);
        Ok(env)
    }

    fn scan_cache_path(&self) -> PathBuf {
        self.env_dir().join("scan-cache.zst")
    }

    /// Takes the scan cache a clean shutdown saved (the file is consumed:
    /// after a crash the next start scans from nothing).
    fn load_scan_cache(&self, generation: u64) {
        let path = self.scan_cache_path();
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let _ = std::fs::remove_file(&path);
        match Tracked::load(&bytes, generation) {
            Some(t) => {
                tracing::info!(entries = t.seen.len(), "scan cache of the last run loaded");
                *self.tracked.lock().unwrap_or_else(|e| e.into_inner()) = t;
            }
            None => tracing::info!("the saved scan cache is for another upper dir; ignored"),
        }
    }

    /// Saves the scan cache (clean shutdown), so the first capture of the
    /// next run does not read and store the whole upper dir again.
    pub fn save_scan_cache(&self) -> Result<(), FsError> {
        let bytes = {
            let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
            if tracked.seen.is_empty() {
                return Ok(());
            }
            tracked.save(self.state().generation)
        };
        durable::write_atomic(&self.scan_cache_path(), &bytes, 0o600)?;
        Ok(())
    }

    /// A layer is a cache of its manifest: when the mounted one's dir is
    /// gone (deleted by hand, a disk cleaned), it is built again.
    fn rebuild_missing_layer(&self, id: &str) -> Result<(), FsError> {
        if self.layer_dir(id).exists() {
            return Ok(());
        }
        let Some(object) = self
            .cfg
            .layer_manifest
            .and_then(|f| f(&self.cfg.state_dir, id))
        else {
            return Ok(()); // the mount reports the missing dir
        };
        tracing::warn!(
            checkpoint = id,
            "the mounted layer's dir is missing: rebuilding it"
        );
        let manifest = Manifest::load(&self.store, &object)?;
        self.ensure_layer(id, &manifest)?;
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.cfg.env_root
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn state(&self) -> EnvState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn env_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("env")
    }

    pub fn upper(&self) -> PathBuf {
        self.env_dir()
            .join(format!("upper-{}", self.state().generation))
    }

    pub fn layer_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("layers").join(id)
    }

    fn save_state(&self, st: EnvState) -> Result<(), FsError> {
        durable::write_json(&self.env_dir().join("state.json"), &st)?;
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = st;
        Ok(())
    }

    /// Writes (not yet durably, not yet visible) the state with a new source:
    /// the caller's `syncfs` makes it durable, [`Env::publish_source`] visible.
    pub fn prepare_source(&self, id: &str) -> Result<PendingSource, FsError> {
        let mut st = self.state();
        st.source = Some(id.to_owned());
        let tmp = self
            .env_dir()
            .join(format!("{}state.json", durable::TEMP_PREFIX));
        let json =
            serde_json::to_vec_pretty(&st).map_err(|e| io_err("serialize", &tmp)(e.into()))?;
        std::fs::write(&tmp, json).map_err(io_err("write", &tmp))?;
        Ok(PendingSource { tmp, state: st })
    }

    /// Renames a prepared state into place and fsyncs its directory.
    pub fn publish_source(&self, pending: PendingSource) -> Result<(), FsError> {
        let dest = self.env_dir().join("state.json");
        std::fs::rename(&pending.tmp, &dest).map_err(io_err("rename", &dest))?;
        durable::sync_dir(&self.env_dir())?;
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = pending.state;
        Ok(())
    }

    /// Removes upper/work generations not in use and half-built layers.
    fn clean_stale(&self) -> Result<(), FsError> {
        let generation = self.state().generation;
        let keep = [format!("upper-{generation}"), format!("work-{generation}")];
        for entry in std::fs::read_dir(self.env_dir())
            .map_err(io_err("read dir", &self.env_dir()))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if (name.starts_with("upper-") || name.starts_with("work-")) && !keep.contains(&name) {
                remove_tree(&entry.path());
            }
        }
        let layers = self.cfg.state_dir.join("layers");
        for entry in std::fs::read_dir(&layers)
            .map_err(io_err("read dir", &layers))?
            .flatten()
        {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(durable::TEMP_PREFIX)
            {
                remove_tree(&entry.path());
            }
        }
        Ok(())
    }

    fn is_mounted(&self) -> bool {
        self.is_mount_point(&self.cfg.env_root)
    }

    /// Whether something is mounted at `path` (per the injected mount table).
    pub fn is_mount_point(&self, path: &Path) -> bool {
        crate::sys::is_mount_point(&self.cfg.mountinfo, path)
    }

    #[tracing::instrument(name = "mount", skip(self), fields(root = %self.cfg.env_root.display()))]
    fn mount(&self, layer: Option<&str>, generation: u64) -> Result<(), FsError> {
        let upper = self.env_dir().join(format!("upper-{generation}"));
        let work = self.env_dir().join(format!("work-{generation}"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(io_err("create", d))?;
        }
        let mut lower = Vec::new();
        if let Some(id) = layer {
            lower.push(self.layer_dir(id));
        }
        lower.push(self.base.clone());
        mount_overlay(&lower, &upper, &work, &self.cfg.env_root)?;
        tracing::info!(
            layer = layer.unwrap_or("-"),
            generation,
            "environment mounted"
        );
        Ok(())
    }

    /// Detaches the environment root (`MNT_DETACH`): gone from the mount
    /// table at once, unmounted when its last user lets go.
    fn detach(&self) -> Result<(), FsError> {
        use nix::mount::{MntFlags, umount2};
        let target = &self.cfg.env_root;
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(()), // (not mounted)
            Err(e) => Err(FsError::Unmount {
                target: target.clone(),
                source: e.into(),
            }),
        }
    }

    /// Unmounts the environment root (lazily if something still uses it).
    pub fn unmount(&self) -> Result<(), FsError> {
        use nix::mount::{MntFlags, umount2};
        let target = &self.cfg.env_root;
        match umount2(target, MntFlags::empty()) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) => {
                tracing::warn!(root = %target.display(), "environment busy; detaching it");
                umount2(target, MntFlags::MNT_DETACH).map_err(|e| FsError::Unmount {
                    target: target.clone(),
                    source: e.into(),
                })
            }
            Err(nix::errno::Errno::EINVAL) => Ok(()), // not mounted
            Err(e) => Err(FsError::Unmount {
                target: target.clone(),
                source: e.into(),
            }),
        }
    }

    /// The part of a capture that runs while services are frozen: a stat of
    /// the upper entries the change journal names (of every one when it
    /// cannot tell), and an in-kernel copy of what changed since the last
    /// capture (no hashing).
    ///
    /// `holders`: the frozen processes; files they hold open for writing or
    /// map shared are read again even when the change journal is quiet.
    pub fn scan_frozen(&self, holders: &[i32]) -> Result<FrozenScan, FsError> {
        let held = if holders.is_empty() {
            journal::Held::default()
        } else {
            use std::os::unix::fs::MetadataExt;
            // As the kernel prints them: no symlinks.
            let canonical = |p: &Path| std::fs::canonicalize(p).map_err(io_err("resolve", p));
            let (root, upper) = (canonical(&self.cfg.env_root)?, canonical(&self.upper())?);
            let dev = std::fs::metadata(&root)
                .map_err(io_err("stat", &root))?
                .dev();
            journal::held(Path::new("/proc"), holders, &root, &upper, dev)
        };
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        let delta = scan::scan_upper(
            &self.upper(),
            &self.store,
            &mut tracked,
            SCAN_THREADS,
            Some(&held),
        )?;
        #[cfg(debug_assertions)]
        if delta.incremental {
            let differ = scan::verify(&self.upper(), &tracked, Some(&delta))?;
            assert!(differ.is_empty(), "the change journal missed: {differ:?}");
        }
        tracing::debug!(
            incremental = delta.incremental,
            entries = delta.stats.entries,
            journal_dirs = tracked.journal_dirs(),
            held_open = held.open.len(),
            held_mapped = held.mapped.len(),
            "frozen scan"
        );
        Ok(FrozenScan { delta })
    }

    /// How the upper dir differs from the scan cache (see [`scan::verify`]);
    /// empty when the cache is right.
    pub fn verify_scan(&self) -> Result<Vec<String>, FsError> {
        let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        scan::verify(&self.upper(), &tracked, None)
    }

    /// Whether nothing is cached (first capture since start or restore).
    pub fn cache_is_cold(&self) -> bool {
        self.tracked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .is_empty()
    }

    /// Before a capture whose scan would read the whole upper dir (the
    /// cache is cold, or the change journal must start again), the same
    /// scan with services running, so the frozen one only reads what
    /// changed since. Returns what it found, or `None` when not needed.
    pub fn warm_scan(&self) -> Result<Option<ScanStats>, FsError> {
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        if !tracked.next_scan_is_full() {
            return Ok(None);
        }
        let mut delta =
            scan::scan_upper(&self.upper(), &self.store, &mut tracked, SCAN_THREADS, None)?;
        drop(tracked);
        self.commit_staged(&mut delta)?;
        let stats = delta.stats;
        self.tracked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .warm(delta);
        Ok(Some(stats))
    }

    /// The rest, after the thaw: hashes the staged copies into the store and
    /// merges the scan onto `parent`, the manifest of the mounted layer.
    pub fn finish_capture(
        &self,
        frozen: FrozenScan,
        parent: &Manifest,
    ) -> Result<Captured, FsError> {
        let FrozenScan { mut delta } = frozen;
        self.commit_staged(&mut delta)?;
        let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        tracked.find_removed(&mut delta);
        let manifest = tracked.merge(&delta, parent, &self.base);
        Ok(Captured { manifest, delta })
    }

    /// Hashes a scan's staged copies into the store (both cores) and gives
    /// their entries the objects.
    fn commit_staged(&self, delta: &mut Delta) -> Result<(), FsError> {
        let staged = std::mem::take(&mut delta.staged);
        let committed = par_map(staged, SCAN_THREADS, "commit", |(i, s)| {
            Ok((i, self.store.commit(s)?))
        })?;
        for (i, id) in committed {
            delta.changed[i].1.entry.object = Some(id);
        }
        Ok(())
    }

    /// Remembers what a published capture saw, for the next one.
    pub fn keep_scan(&self, captured: Captured) {
        self.tracked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply(captured.delta, captured.manifest);
    }

    /// Store objects the scan cache refers to (garbage collection keeps them).
    pub fn cached_objects(&self) -> Vec<String> {
        self.tracked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .values()
            .filter_map(|s| s.entry.object.clone())
            .collect()
    }

    /// Builds the layer of checkpoint `id` unless it is already built.
    #[tracing::instrument(name = "build_layer", skip(self, manifest), fields(checkpoint = id))]
    pub fn ensure_layer(&self, id: &str, manifest: &Manifest) -> Result<bool, FsError> {
        let dir = self.layer_dir(id);
        if dir.exists() {
            return Ok(false);
        }
        let tmp = self
            .cfg
            .state_dir
            .join("layers")
            .join(format!("{}{id}", durable::TEMP_PREFIX));
        remove_tree(&tmp);
        manifest::materialize(manifest, &self.store, &tmp)?;
        std::fs::rename(&tmp, &dir).map_err(io_err("rename", &dir))?;
        Ok(true)
    }

    /// Mounts checkpoint `id`'s tree read-only at `target` (its layer over
    /// the base, no upper dir). The layer must exist.
    pub fn mount_readonly(&self, id: &str, target: &Path) -> Result<(), FsError> {
        std::fs::create_dir_all(target).map_err(io_err("create", target))?;
        let options = format!(
            "lowerdir={}:{}",
            self.layer_dir(id).display(),
            self.base.display()
        );
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            // (an imported layer's device nodes and setuid files are shown
            // inside too, under `/.sprite/checkpoints`: inert there)
            nix::mount::MsFlags::MS_RDONLY
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOSUID,
            Some(options.as_str()),
        )
        .map_err(|e| FsError::Mount {
            target: target.to_owned(),
            options,
            source: e.into(),
        })
    }

    /// Makes `dir` a shared mount point (a bind of itself), so that mounts
    /// made below it later propagate into services' (slave) namespaces.
    pub fn share(&self, dir: &Path) -> Result<(), FsError> {
        use nix::mount::{MsFlags, mount};
        if !self.is_mount_point(dir) {
            mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| {
                FsError::Mount {
                    target: dir.to_owned(),
                    options: "bind".into(),
                    source: e.into(),
                }
            })?;
        }
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| FsError::Mount {
            target: dir.to_owned(),
            options: "shared".into(),
            source: e.into(),
        })
    }

    /// Unmounts `target` if something is mounted there (lazily when busy).
    pub fn unmount_path(&self, target: &Path) {
        use nix::mount::{MntFlags, umount2};
        match umount2(target, MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(_) => {
                let _ = umount2(target, MntFlags::MNT_DETACH);
            }
        }
    }

    pub fn remove_layer(&self, id: &str) {
        remove_tree(&self.layer_dir(id));
    }

    /// Switches the environment to checkpoint `id`'s layer with an empty
    /// upper dir. Processes of the old environment may still be dying: they
    /// keep the old root in their own mount namespace and cannot see the
    /// new one. The old generation is the returned [`Retired`]: drop it once
    /// none of them is left.
    #[tracing::instrument(name = "restore_mount", skip(self), fields(checkpoint = id))]
    pub fn switch_to(&self, id: &str) -> Result<Retired, FsError> {
        let old = self.state();
        let generation = old.generation + 1;
        // The old root is detached, not unmounted, and held open here: its
        // last reference goes with the [`Retired`], on a thread of its own,
        // which then pays for the overlay's final sync of the upper
        // filesystem (that root's files are discarded anyway) while the
        // restore goes on.
        let hold = std::fs::File::open(&self.cfg.env_root).ok();
        self.detach()?;
        if let Err(e) = self.mount(Some(id), generation) {
            // Put the old environment back; the error is what the caller sees.
            let _ = self.mount(old.layer.as_deref(), old.generation);
            return Err(e);
        }
        self.save_state(EnvState {
            layer: Some(id.to_owned()),
            generation,
            source: Some(id.to_owned()),
        })?;
        *self.tracked.lock().unwrap_or_else(|e| e.into_inner()) = Tracked::default();
        Ok(Retired {
            hold,
            stale: ["upper", "work"]
                .map(|d| self.env_dir().join(format!("{d}-{}", old.generation))),
        })
    }
}

/// The generation a restore switched away from: its root (detached, held
/// open) and its upper and work dirs. Dropped, it lets go of the root and
/// removes the dirs on a thread of its own; what a crash leaves of them goes
/// on the next start. Dropped early (while processes of the old environment
/// still run and write there), a removal can leave part of them until then.
#[must_use = "the old generation is removed when this is dropped, once nothing runs on it"]
pub struct Retired {
    hold: Option<std::fs::File>,
    stale: [PathBuf; 2],
}

impl Drop for Retired {
    fn drop(&mut self) {
        let (hold, stale) = (self.hold.take(), std::mem::take(&mut self.stale));
        std::thread::spawn(move || {
            drop(hold);
            for p in &stale {
                remove_tree(p);
            }
        });
    }
}

/// Mounts overlayfs on `target` with the options the environment uses
/// (also those of the change journal's probe, which must behave alike).
/// `nodev`: a device node on the root opens nothing. Processes inside
/// cannot make one (no `CAP_MKNOD`), but a layer can hold one (an
/// imported archive is hostile), and with no device cgroup a block device
/// would read the disk that holds the store. The environment's devices are
/// those of its own `/dev` tmpfs.
pub(crate) fn mount_overlay(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), FsError> {
    for p in lower.iter().map(PathBuf::as_path).chain([upper, work]) {
        if p.to_string_lossy().contains([',', ':', '\n']) {
            return Err(FsError::BadPath(p.to_owned()));
        }
    }
    let lowers: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
        lowers.join(":"),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        nix::mount::MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| FsError::Mount {
        target: target.to_owned(),
        options,
        source: e.into(),
    })
}

/// Removes a tree, logging (not failing) on error.
fn remove_tree(path: &Path) {
    match at::remove_tree(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove"),
    }
}
