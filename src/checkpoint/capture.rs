//! Capture: a checkpoint of the environment's files and, with CRIU, of its
//! whole process tree. The plan:
//!
//! 1. claim an id, write the capture journal;
//! 2. index the files before freezing (when the scan cache is cold);
//! 3. freeze the environment's cgroup; CRIU dumps the init's tree while it
//!    freezes; scan what the file journal says changed; thaw;
//! 4. store the changed files, the manifest and the CRIU images;
//! 5. publish: one `syncfs`, then `meta.json` and the new source by rename.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{
    CaptureStats, CheckpointError, CheckpointMeta, Checkpoints, DumpedService, EnvImages,
    FREEZE_TIMEOUT, Note, SKIPPED_LISTED, SkippedEntry, info, io_err, now_rfc3339,
};
use crate::cgroup::FreezeGuard;
use crate::criu::{DumpTarget, pagemap};
use crate::durable;
use crate::fs::manifest::Manifest;
use crate::fs::{EnvState, FrozenScan, pages};
use crate::supervisor::ServiceDef;

/// The bind mounts from the host inside the environment, and the keys their
/// CRIU images name them by.
pub const EXTERNAL_MOUNTS: &[(&str, &str)] = &[
    ("/dev", crate::container::dev::KEY),
    ("/.sprite", "sprited-dir"),
    ("/.sprite/bin/sprited", "sprited-exe"),
    ("/.sprite/api.sock", "sprited-api"),
    ("/.sprite/checkpoints", "sprited-checkpoints"),
    ("/.sprite/logs/services", "sprited-logs"),
];

/// The environment's `/dev` (named external to CRIU, so not in its images)
/// archived among the images in `dir`, while the environment is still
/// frozen.
#[tracing::instrument(name = "archive_dev", skip_all)]
pub(super) fn archive_dev(
    container: &crate::container::Container,
    dir: &Path,
) -> Result<(), CheckpointError> {
    let t = std::time::Instant::now();
    let done = container.archive_dev(&dir.join(crate::container::dev::ARCHIVE))?;
    tracing::debug!(
        entries = done.entries,
        bytes = done.bytes,
        ms = t.elapsed().as_secs_f64() * 1e3,
        "archived /dev"
    );
    Ok(())
}

/// The environment frozen where CRIU can seize every task of it (none
/// waiting for a `vfork` child: see
/// [`crate::cgroup::Cgroup::freeze_seizable`]). The time the freeze that
/// held was asked (CLOCK_MONOTONIC ns), and whether it had to thaw first.
pub(super) fn freeze_seizable(
    whole: &crate::cgroup::Cgroup,
    progress: &dyn Fn(Note),
) -> Result<(u64, bool), CheckpointError> {
    let mut thawed = false;
    let at = whole.freeze_seizable(FREEZE_TIMEOUT, &mut |tids| {
        if !thawed {
            info(
                progress,
                format!(
                    "Waiting for {} process(es) of the environment to finish starting a program (a task frozen in vfork cannot be dumped)...",
                    tids.len()
                ),
            );
        }
        thawed = true;
    })?;
    Ok((at, thawed))
}

/// The entries a capture could not record: an `error` note naming the
/// first few, and the list the metadata keeps (at most [`SKIPPED_LISTED`])
/// with the total.
fn report_skipped(
    skipped: &crate::fs::scan::Skipped,
    progress: &dyn Fn(Note),
) -> (Vec<SkippedEntry>, u64) {
    if skipped.is_empty() {
        return (Vec::new(), 0);
    }
    let listed: Vec<SkippedEntry> = skipped
        .iter()
        .take(SKIPPED_LISTED)
        .map(|(rel, reason)| SkippedEntry {
            path: crate::fs::shown_path(rel),
            reason: reason.clone(),
        })
        .collect();
    let first: Vec<String> = listed
        .iter()
        .take(3)
        .map(|s| format!("{} ({})", s.path, s.reason))
        .collect();
    let more = skipped.len().saturating_sub(first.len());
    progress(Note::Error(format!(
        "{} entr{} not captured, the checkpoint is partial: {}{}",
        skipped.len(),
        if skipped.len() == 1 { "y" } else { "ies" },
        first.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        },
    )));
    (listed, skipped.len() as u64)
}

/// A dump's images in the store.
#[derive(Default)]
struct StoredImages {
    /// Image name → object.
    objects: BTreeMap<String, String>,
    /// Pages image name → page list.
    pages_lists: BTreeMap<String, String>,
    new_bytes: u64,
    dedup_bytes: u64,
    pages: u64,
    new_pages: u64,
}

/// What the frozen moment produced.
struct Frozen {
    scan: FrozenScan,
    services: Vec<ServiceDef>,
    running: Vec<String>,
    freeze_ms: f64,
    dump: Option<Dump>,
}

/// A dump's raw images and what to record with them.
struct Dump {
    dir: PathBuf,
    /// The pre-dump an incremental dump's unchanged pages are in.
    parent: Option<PathBuf>,
    images: EnvImages,
}

impl Checkpoints {
    /// Takes a checkpoint: files, and with `processes` (and CRIU) the
    /// memory of the whole environment. Blocking (disk work, CRIU): run it
    /// off the async workers. `progress` receives human-readable steps.
    pub fn capture(
        &self,
        comment: String,
        id: Option<String>,
        processes: bool,
        progress: &dyn Fn(Note),
    ) -> Result<CheckpointMeta, CheckpointError> {
        self.capture_as(comment, id, processes, false, progress)
    }

    /// [`Checkpoints::capture`], marked automatic (`is_auto`) with `auto`.
    #[tracing::instrument(name = "checkpoint", skip_all, fields(id = tracing::field::Empty, auto))]
    pub(super) fn capture_as(
        &self,
        comment: String,
        id: Option<String>,
        processes: bool,
        auto: bool,
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
        let result = self.capture_steps(
            &id,
            &st,
            &parent,
            (comment, auto),
            processes,
            progress,
            started,
        );
        match &result {
            Ok(meta) => {
                self.metas
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), meta.clone());
                let _ = std::fs::remove_file(self.journal());
                tracing::info!(
                    freeze_ms = meta.stats.freeze_ms,
                    capture_ms = meta.stats.capture_ms,
                    "checkpoint created"
                );
                if let Some(f) = self.on_publish.get() {
                    f(&id);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint failed; collecting its objects");
                let _ = std::fs::remove_dir_all(self.temp_images(&id));
                let _ = std::fs::remove_dir_all(self.pre_images(&id));
                self.env.store().clean_temp();
                let _ = self.collect_garbage();
                let _ = std::fs::remove_file(self.journal());
            }
        }
        // A process dump unmounted the views: back, without building any
        // layer (the API then makes the new checkpoint browsable with
        // `refresh_browsable`, which builds its layer).
        self.mount_browsable(false);
        result
    }

    fn temp_images(&self, id: &str) -> PathBuf {
        self.images.join(format!("{}{id}", durable::TEMP_PREFIX))
    }

    /// Where capture `id` pre-dumps the memory (dirty tracking).
    fn pre_images(&self, id: &str) -> PathBuf {
        self.images
            .join(format!("{}{id}-pre", durable::TEMP_PREFIX))
    }

    #[allow(clippy::too_many_arguments)]
    fn capture_steps(
        &self,
        id: &str,
        st: &EnvState,
        parent: &Manifest,
        (comment, auto): (String, bool),
        processes: bool,
        progress: &dyn Fn(Note),
        started: Instant,
    ) -> Result<CheckpointMeta, CheckpointError> {
        self.index_before_freezing(progress)?;
        let frozen = self.freeze_dump_scan(id, processes, progress)?;
        let scan = frozen.scan.stats();
        let incremental = frozen.scan.incremental();
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
                "Environment thawed after {:.1} ms; {how}, {} file(s) changed ({} bytes)",
                frozen.freeze_ms, scan.files_hashed, scan.bytes_hashed
            ),
        );
        let mut captured = self.env.finish_capture(frozen.scan, parent)?;
        let (skipped, skipped_count) = report_skipped(captured.skipped(), progress);
        info(progress, "Saving filesystem state...");
        let manifest_id = captured.manifest.store(self.env.store())?;
        let (mut images_new_bytes, mut images_dedup_bytes) = (0, 0);
        let env = match frozen.dump {
            Some(Dump {
                dir,
                parent,
                mut images,
            }) => {
                let t = Instant::now();
                let stored = self.store_images(&dir, parent.as_deref());
                // Stored: the raw images go before the syncfs below, so
                // the kernel never writes them back (a dump is as large
                // as the memory it took).
                if let Some(p) = &parent {
                    let _ = std::fs::remove_dir_all(p);
                }
                if dir == self.temp_images(id) {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                let stored = stored?;
                tracing::info!(
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    pages = stored.pages,
                    new_pages = stored.new_pages,
                    new_bytes = stored.new_bytes,
                    "process images stored"
                );
                images.images = stored.objects;
                images.pages = stored.pages_lists;
                self.key.seal(&mut images, &manifest_id);
                (images_new_bytes, images_dedup_bytes) = (stored.new_bytes, stored.dedup_bytes);
                info(
                    progress,
                    format!(
                        "Stored the process images: {} of {} pages new, {} bytes added to the store, {} bytes already there",
                        stored.new_pages, stored.pages, stored.new_bytes, stored.dedup_bytes
                    ),
                );
                Some(images)
            }
            None => None,
        };
        let meta = CheckpointMeta {
            id: id.to_owned(),
            create_time: now_rfc3339(),
            source_id: st.source.clone(),
            comment,
            history: self.history_of(st.source.as_deref()),
            is_auto: auto,
            health: if skipped_count == 0 { "ok" } else { "partial" }.into(),
            manifest: manifest_id,
            services: frozen.services,
            running: frozen.running,
            env,
            with_processes: processes && self.criu.is_some(),
            imported_from: None,
            policies: self.policies_now(),
            skipped,
            skipped_count,
            stats: CaptureStats {
                freeze_ms: frozen.freeze_ms,
                capture_ms: started.elapsed().as_secs_f64() * 1e3,
                entries: captured.manifest.len() as u64,
                files_hashed: scan.files_hashed,
                bytes_hashed: scan.bytes_hashed,
                files_cached: scan.files_cached,
                incremental,
                images_new_bytes,
                images_dedup_bytes,
            },
        };
        // Visible only once complete: a temp dir renamed into place. One
        // syncfs makes the objects, the manifest, the id counter and
        // meta.json durable together, before the rename publishes them.
        let tmp = self.stage_meta(&meta)?;
        let pending = self.env.prepare_source(id)?;
        let t = Instant::now();
        self.env.store().sync()?;
        tracing::info!(ms = t.elapsed().as_secs_f64() * 1e3, "store synced");
        self.publish_meta(&tmp, id)?;
        // Published: from here on the environment descends from it.
        self.env.publish_source(pending)?;
        self.env.keep_scan(captured);
        Ok(meta)
    }

    /// Step 2: a cold scan cache is filled while everything still runs, so
    /// the frozen scan only reads what changed since.
    fn index_before_freezing(&self, progress: &dyn Fn(Note)) -> Result<(), CheckpointError> {
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
        Ok(())
    }

    /// Step 3: freeze the whole environment, dump it with CRIU while it
    /// freezes (CRIU seizes the tasks itself), scan the files, thaw. A
    /// failed dump is an `error` note: the checkpoint keeps the files.
    fn freeze_dump_scan(
        &self,
        id: &str,
        processes: bool,
        progress: &dyn Fn(Note),
    ) -> Result<Frozen, CheckpointError> {
        let container = self.container.as_ref().filter(|c| c.is_running());
        if container.is_none()
            && let Some(cold) = self.cold_record()
        {
            return self.scan_cold(cold, processes, progress);
        }
        let dumper = self
            .criu
            .as_ref()
            .filter(|_| processes)
            .zip(container.and_then(|c| c.init_host_pid().map(|p| (c, p))));
        if dumper.is_some() {
            // The browsable roots under the checkpoints dir propagate into
            // the environment (/.sprite/checkpoints/<id>/root) as slaves of
            // mounts outside it where the host's mounts are shared (as
            // under systemd; not where `/` is private), which CRIU cannot
            // dump: they go for the dump and come back after it
            // (`capture_as`).
            self.unmount_browsable();
        }
        let whole = container.map(|c| c.config().cgroups.whole());
        let mut pre = match (dumper, &whole) {
            (Some((criu, (container, init))), Some(whole)) if criu.incremental() => {
                self.pre_dump(id, criu, container, init, whole.path(), progress)
            }
            _ => None,
        };
        info(
            progress,
            if dumper.is_some() {
                "Freezing the environment and dumping its processes..."
            } else {
                "Freezing the environment..."
            },
        );
        let mut dump = None;
        let mut frozen_at = crate::sys::monotonic_ns();
        let mut stamped = false;
        let guard = match (dumper, &whole) {
            (Some((criu, (container, init))), Some(whole)) => {
                // CRIU's hook freezes the cgroup once CRIU is up (see
                // `hook`); the guard thaws it whatever happens.
                let guard = FreezeGuard::adopt(vec![whole.clone()]);
                let dumped = self.dump(id, criu, container, init, whole, pre.take(), progress);
                match dumped {
                    Ok((d, at)) => {
                        stamped = at.is_some();
                        frozen_at = at.unwrap_or(frozen_at);
                        dump = Some(d);
                    }
                    Err(e) => progress(Note::Error(format!(
                        "{e}; the checkpoint keeps the files, and a restore starts services fresh"
                    ))),
                }
                guard.ask()?;
                guard
            }
            _ => FreezeGuard::begin(whole.iter().cloned().collect())?,
        };
        if let Some(d) = &dump {
            let stats = &d.images.stats;
            info(
                progress,
                format!(
                    "Dumped the environment: {} bytes in {:.1} ms (frozen {:.1} ms by CRIU)",
                    stats.bytes,
                    stats.dump_ms,
                    stats.frozen_time as f64 / 1e3
                ),
            );
        }
        // A dumped cgroup the hook froze is settled: CRIU seized every task
        // (each stopped out of any system call), found the cgroup frozen,
        // set it frozen again and only then let go of them. Otherwise (CRIU
        // froze it, and thawed it when done) wait for the freezer.
        let settled: Vec<&Path> = match (&dump, &whole) {
            (Some(_), Some(w)) if stamped => vec![w.path()],
            _ => vec![],
        };
        guard.wait_except(&settled, FREEZE_TIMEOUT)?;
        // Frozen for sure now (CRIU may have thawed what it froze itself):
        // the environment's /dev goes with the images.
        if let (Some(d), Some((_, (container, _)))) = (&dump, dumper)
            && let Err(e) = archive_dev(container, &d.dir)
        {
            tracing::warn!(error = %e, "the environment's /dev could not be archived");
            progress(Note::Error(
                "the environment's /dev could not be archived; the checkpoint keeps the files, and a restore starts services fresh".into(),
            ));
            let _ = std::fs::remove_dir_all(&d.dir);
            if let Some(p) = &d.parent {
                let _ = std::fs::remove_dir_all(p);
            }
            dump = None;
        }
        let scan = self.env.scan_frozen(&guard.pids())?;
        let (services, running) = self.sup.snapshot();
        drop(guard);
        let thawed_at = crate::sys::monotonic_ns();
        Ok(Frozen {
            scan,
            services,
            running,
            freeze_ms: thawed_at.saturating_sub(frozen_at) as f64 / 1e6,
            dump,
        })
    }

    /// Step 3b: CRIU dumps the environment, its hook freezing it once CRIU
    /// is up (without a hook, it is frozen first); with `pre`, only the
    /// pages dirtied since that pre-dump. What the restore needs besides
    /// the images is read once it is frozen. A failed attempt with the
    /// hook or incremental (a socket to outside opened after the list
    /// CRIU was given, a pre-dump gone wrong) is followed by a plain one:
    /// frozen first, dumped whole. The dump, and since when the cgroup has
    /// been frozen (CLOCK_MONOTONIC ns; none: CRIU froze it, and thawed it
    /// when done).
    #[allow(clippy::too_many_arguments)]
    fn dump(
        &self,
        id: &str,
        criu: &crate::criu::Criu,
        container: &crate::container::Container,
        init: i32,
        whole: &crate::cgroup::Cgroup,
        mut pre: Option<(PathBuf, f64)>,
        progress: &dyn Fn(Note),
    ) -> Result<(Dump, Option<u64>), CheckpointError> {
        let dir = self.temp_images(id);
        let stamp = self
            .images
            .join(format!("{}{id}-frozen", durable::TEMP_PREFIX));
        let hook = self.freeze_hook(container, whole, &stamp);
        let mut frozen_at = None;
        if hook.is_none() {
            frozen_at = Some(freeze_seizable(whole, progress)?.0);
        }
        let mut sockets = container.external_unix_sockets();
        let parent = pre
            .as_ref()
            .map(|(p, _)| format!("../{}", p.file_name().unwrap_or_default().to_string_lossy()));
        let target = DumpTarget {
            init,
            cgroup: whole.path(),
            images: &dir,
            external: EXTERNAL_MOUNTS,
            external_sockets: &[],
            netns: container.network().map(|n| n.netns_inode()),
        };
        let mut result = criu.dump_env(
            &DumpTarget {
                external_sockets: &sockets,
                ..target
            },
            parent.as_deref(),
            hook.as_ref(),
        );
        if hook.is_some() {
            frozen_at = super::hook::frozen_at(&stamp);
        }
        if let Err(e) = &result
            && (hook.is_some() || parent.is_some())
        {
            tracing::warn!(error = %e, "the dump failed; dumping whole, frozen first");
            let _ = std::fs::remove_dir_all(&dir);
            if let Some((p, _)) = pre.take() {
                let _ = std::fs::remove_dir_all(p);
            }
            // Frozen where every task can be seized (the hook gives up on a
            // freeze that caught a vfork); thawed on the way, the window
            // starts again.
            let (asked, thawed) = freeze_seizable(whole, progress)?;
            frozen_at = if thawed {
                Some(asked)
            } else {
                frozen_at.or(Some(asked))
            };
            sockets = container.external_unix_sockets();
            let target = DumpTarget {
                external_sockets: &sockets,
                ..target
            };
            result = criu.dump_env(&target, None, None);
        }
        let mut stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                if let Some((p, _)) = &pre {
                    let _ = std::fs::remove_dir_all(p);
                }
                return Err(e.into());
            }
        };
        stats.pre_dump_ms = pre.as_ref().map_or(0.0, |(_, ms)| *ms);
        let plan = self.dump_plan(container, sockets);
        let dump = Dump {
            dir,
            parent: pre.map(|(p, _)| p),
            images: EnvImages { stats, ..plan },
        };
        Ok((dump, frozen_at))
    }

    /// The `pre-dump` hook that freezes `whole` once CRIU is up, stamping
    /// the time into `stamp`. None if the script cannot be written (the
    /// capture then freezes before starting CRIU).
    fn freeze_hook(
        &self,
        container: &crate::container::Container,
        whole: &crate::cgroup::Cgroup,
        stamp: &Path,
    ) -> Option<crate::criu::ActionHook> {
        let state = self.dir.parent()?;
        let exe = &container.config().setup.exe;
        match super::hook::for_dump(state, exe, whole.path(), stamp) {
            Ok(hook) => Some(hook),
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the dump hook: freezing before CRIU starts");
                None
            }
        }
    }

    /// Step 3a, where the kernel tracks dirty pages: a pre-dump of the
    /// memory while everything runs, so the frozen dump writes only what
    /// changed since. Its dir and how long it took; none when it failed
    /// (the dump is then whole).
    fn pre_dump(
        &self,
        id: &str,
        criu: &crate::criu::Criu,
        container: &crate::container::Container,
        init: i32,
        cgroup: &Path,
        progress: &dyn Fn(Note),
    ) -> Option<(PathBuf, f64)> {
        let dir = self.pre_images(id);
        let sockets = container.external_unix_sockets();
        let target = DumpTarget {
            init,
            cgroup,
            images: &dir,
            external: EXTERNAL_MOUNTS,
            external_sockets: &sockets,
            netns: container.network().map(|n| n.netns_inode()),
        };
        // Frozen before CRIU starts: left to freeze a running cgroup, CRIU
        // polls the freezer in steps of 100 ms. It leaves a cgroup it found
        // frozen frozen; the guard thaws it.
        let cgroup = crate::cgroup::Cgroup::at(cgroup.to_owned());
        let guard = FreezeGuard::adopt(vec![cgroup.clone()]);
        let result = match freeze_seizable(&cgroup, progress) {
            Ok(_) => criu.pre_dump_env(&target),
            Err(e) => {
                tracing::warn!(error = %e, "cannot freeze for the pre-dump: this dump is whole");
                return None;
            }
        };
        drop(guard);
        match result {
            Ok(stats) => {
                info(
                    progress,
                    format!(
                        "Pre-dumped the memory while it runs: {} pages in {:.1} ms",
                        stats.pages_written, stats.dump_ms
                    ),
                );
                Some((dir, stats.dump_ms))
            }
            Err(e) => {
                tracing::warn!(error = %e, "pre-dump failed: this dump is whole");
                let _ = std::fs::remove_dir_all(&dir);
                None
            }
        }
    }

    /// Step 3 of a cold sprite: nothing runs, so nothing is frozen; the
    /// processes are the images its cold sleep dumped (stored as they are,
    /// the sprite stays cold).
    fn scan_cold(
        &self,
        cold: super::sleep::ColdRecord,
        processes: bool,
        progress: &dyn Fn(Note),
    ) -> Result<Frozen, CheckpointError> {
        info(
            progress,
            if processes {
                "The sprite sleeps cold: taking the processes its sleep dumped"
            } else {
                "The sprite sleeps cold: taking its files"
            },
        );
        let start = Instant::now();
        let scan = self.env.scan_frozen(&[])?;
        let (services, _) = self.sup.snapshot();
        let running = cold
            .images
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect();
        let dump = (processes && self.criu.is_some()).then(|| Dump {
            dir: self.sleep_images(),
            parent: None,
            images: cold.images,
        });
        Ok(Frozen {
            scan,
            services,
            running,
            freeze_ms: start.elapsed().as_secs_f64() * 1e3,
            dump,
        })
    }

    /// What a restore needs besides CRIU's images, read while frozen: the
    /// init's pipes, each service's and session's pipes, and which cgroup
    /// each process of the environment is in.
    /// `external_sockets`: those CRIU was told of.
    pub(super) fn dump_plan(
        &self,
        container: &crate::container::Container,
        external_sockets: Vec<u64>,
    ) -> EnvImages {
        let pipe = |host_pid: i32, fd: u32| {
            std::fs::read_link(format!("/proc/{host_pid}/fd/{fd}"))
                .ok()
                .map(|t| t.to_string_lossy().into_owned())
                .filter(|t| t.starts_with("pipe:["))
        };
        let services = self
            .sup
            .running()
            .into_iter()
            .map(|r| DumpedService {
                stdout: pipe(r.host_pid, 1),
                stderr: pipe(r.host_pid, 2),
                name: r.name,
                pid: r.pid,
                restart_count: r.restart_count,
                started_at_ms: r.started_at_ms,
            })
            .collect();
        let sessions = self
            .sessions
            .get()
            .map(|s| s.dump_plan())
            .unwrap_or_default();
        let mut cgroups = BTreeMap::new();
        for cg in container.config().cgroups.children().unwrap_or_default() {
            let Some(name) = cg
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
            else {
                continue;
            };
            let pids: Vec<i32> = cg
                .pids()
                .unwrap_or_default()
                .into_iter()
                .filter_map(crate::container::ns_pid)
                .collect();
            if !pids.is_empty() {
                cgroups.insert(name, pids);
            }
        }
        EnvImages {
            images: BTreeMap::new(),
            pages: BTreeMap::new(),
            stats: Default::default(),
            init_pipes: container.pipe_ids().unwrap_or_default(),
            services,
            sessions,
            cgroups,
            external_sockets,
            mac: None,
        }
    }

    /// Step 4: CRIU's images into the store: the pages images by page
    /// (only pages the store does not have are written), the others zstd,
    /// one object each. An incremental dump (its unchanged pages in the
    /// pre-dump `parent`) is stored whole: its pagemaps rewritten with
    /// every page present, its pages images made of both dumps' pages.
    fn store_images(
        &self,
        dir: &Path,
        parent: Option<&Path>,
    ) -> Result<StoredImages, CheckpointError> {
        let store = self.env.store();
        let mut out = StoredImages::default();
        let flat =
            match parent {
                Some(p) => Some(pagemap::flatten(dir, p).map_err(|e| {
                    CheckpointError::Unavailable(format!("the incremental dump: {e}"))
                })?),
                None => None,
            };
        let mut pages_images = Vec::new();
        for entry in std::fs::read_dir(dir)
            .map_err(io_err("read dir", dir))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if !is_file || name.ends_with(".log") || name.ends_with(".pid") {
                continue; // (and the `parent` link of an incremental dump)
            }
            if pages::is_pages_image(&name) {
                pages_images.push((name, entry.path()));
                continue;
            }
            let c = match &flat {
                Some(f) if pagemap::is_pagemap_image(&name) => {
                    let (_, bytes) =
                        f.pagemaps.iter().find(|(n, _)| *n == name).ok_or_else(|| {
                            CheckpointError::Unavailable(format!("{name} not flattened"))
                        })?;
                    store.put_bytes_compressed(bytes)?
                }
                _ => store.put_file_compressed(&entry.path())?,
            };
            if c.new {
                out.new_bytes += c.len;
            } else {
                out.dedup_bytes += c.len;
            }
            out.objects.insert(name, c.id);
        }
        let (names, stored) = match &flat {
            Some(f) => {
                let runs: Vec<Vec<(usize, u64, u64)>> =
                    f.pages.iter().map(|p| p.runs.clone()).collect();
                let names: Vec<String> = f.pages.iter().map(|p| p.name.clone()).collect();
                let stored = self.with_page_index(|index| {
                    pages::store_runs(store, index, &f.files, &runs, pages::threads())
                })?;
                (names, stored)
            }
            None => {
                let paths: Vec<PathBuf> = pages_images.iter().map(|(_, p)| p.clone()).collect();
                let stored = self.with_page_index(|index| {
                    pages::store_images(store, index, &paths, pages::threads())
                })?;
                (pages_images.into_iter().map(|(n, _)| n).collect(), stored)
            }
        };
        out.new_bytes += stored.new_bytes;
        out.dedup_bytes += stored.dedup_bytes;
        out.new_pages = stored.new_pages;
        out.pages = stored.pages;
        for (name, list) in names.into_iter().zip(stored.lists) {
            out.pages_lists.insert(name, list);
        }
        Ok(out)
    }

    /// The ancestry of a checkpoint descending from `source`.
    fn history_of(&self, source: Option<&str>) -> Vec<String> {
        let mut history = Vec::new();
        if let Some(src) = source {
            history.push(src.to_owned());
            if let Ok(m) = self.get(src) {
                history.extend(m.history);
            }
        }
        history
    }
}
