//! Restore: the environment as checkpoint `id` left it. The plan:
//!
//! 0. take an automatic checkpoint of the state about to be replaced (the
//!    undo point; not when restoring an automatic checkpoint), and delete
//!    the automatic ones beyond `--auto-keep`;
//! 1. stop the environment (every process; services and sessions forgotten);
//! 2. mount the checkpoint's layer with a fresh upper dir;
//! 3. restore the service definitions;
//! 4. with a CRIU dump: restore the init's whole tree onto the new root,
//!    with new pipes where the daemon held the other ends; adopt the init,
//!    put each process back in its cgroup, adopt services and sessions;
//!    without one (or when CRIU fails): start a fresh environment and say why;
//! 5. start the services that are not running yet.

use crate::policy::NetworkPolicy;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::capture::EXTERNAL_MOUNTS;
use super::hook;
use super::place::{self, Placement};
use super::{CheckpointError, CheckpointMeta, Checkpoints, EnvImages, Note, info, io_err};
use crate::container::Container;
use crate::criu::ActionHook;
use crate::durable;
use crate::fs::pages;
use crate::supervisor::RunningService;

/// Where the raw images of a dump are.
pub(super) enum ImagesAt {
    /// A checkpoint's, being rebuilt from the store (removed when the
    /// guard drops).
    Rebuilding(std::thread::JoinHandle<Result<RemoveOnDrop, CheckpointError>>),
    /// A dir of raw images (a cold sleep's).
    Dir(PathBuf),
}

/// Whatever the `pre-resume` hook left in the init's cgroup goes to its own,
/// with that cgroup frozen meanwhile (so none forks on the way).
async fn place_the_rest(placement: Placement) {
    let _ = tokio::task::spawn_blocking(move || {
        if placement.pending().is_empty() {
            return;
        }
        tracing::warn!("the restore hook left processes in the init's cgroup: placing them now");
        let init = placement.init();
        let _ = init.freeze(super::FREEZE_TIMEOUT);
        Placement::apply(&placement.pending());
        // (released: the tasks run on as soon as they are scheduled)
        let _ = init.release();
    })
    .await;
}

/// The daemon's ends of the pipes a restored environment gets.
struct Ends {
    init_requests: OwnedFd,
    init_events: OwnedFd,
    /// Per service (in dump order): stdout and stderr read ends.
    services: Vec<[Option<OwnedFd>; 2]>,
    /// Per session (in dump order): stdin write end, stdout and stderr read ends.
    sessions: Vec<[Option<OwnedFd>; 3]>,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

impl Checkpoints {
    /// Restores `id`: stops the environment, mounts the checkpoint's layer
    /// with a fresh upper dir, restores the service definitions, then the
    /// processes (or a fresh environment, saying why).
    #[tracing::instrument(name = "restore", skip(self, progress), fields(checkpoint = id))]
    pub async fn restore(
        self: &Arc<Self>,
        id: &str,
        progress: &(dyn Fn(Note) + Sync),
    ) -> Result<(), CheckpointError> {
        let meta = self.get(id)?;
        if !meta.is_auto {
            self.take_undo_point(id, progress).await;
        }
        // The images are rebuilt while the environment stops and the files
        // come back (the old root's final sync is off the restore's path).
        let images = self.start_rebuilding(&meta);
        let t0 = Instant::now();
        info(progress, "Stopping the environment...");
        self.stop_environment().await;
        let killed = t0.elapsed();
        info(progress, "Restoring filesystem...");
        self.restore_files(&meta, progress).await?;
        self.sup
            .replace_definitions(meta.services.clone(), &meta.running)?;
        self.restore_policies(&meta, progress).await;
        let files = t0.elapsed();
        if let Some(container) = &self.container {
            match self.restore_processes(&meta, container, images).await.err() {
                None => {
                    for s in meta.env.iter().flat_map(|e| &e.services) {
                        info(
                            progress,
                            format!(
                                "Service {} restored with its memory (pid {})",
                                s.name, s.pid
                            ),
                        );
                    }
                }
                Some(why) => {
                    if let Err(e) = container.start().await {
                        return Err(CheckpointError::Unavailable(format!(
                            "the environment cannot start: {e}"
                        )));
                    }
                    for name in &meta.running {
                        info(progress, format!("Service {name} starts fresh: {why}"));
                    }
                }
            }
        }
        let processes = t0.elapsed();
        self.sup.start_all().await;
        tracing::debug!(?killed, ?files, ?processes, total = ?t0.elapsed(), "restore timing");
        Ok(())
    }

    /// Step 0: an automatic checkpoint of what is about to be replaced,
    /// with its processes (`sprite-env checkpoint restore --undo` goes back
    /// to it). When it cannot be taken the restore goes on, saying so.
    async fn take_undo_point(self: &Arc<Self>, target: &str, progress: &(dyn Fn(Note) + Sync)) {
        info(
            progress,
            "Taking an automatic checkpoint first (to undo this restore)...",
        );
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let me = self.clone();
        let comment = format!("before restore to {target}");
        let done = tokio::task::spawn_blocking(move || {
            me.capture_as(comment, None, true, true, &|n| {
                let _ = tx.send(n);
            })
        });
        while let Some(n) = rx.recv().await {
            progress(n);
        }
        match done.await {
            Ok(Ok(meta)) => {
                info(
                    progress,
                    format!(
                        "Automatic checkpoint {} taken (sprite-env checkpoint restore --undo goes back to it)",
                        meta.id
                    ),
                );
                self.prune_auto();
            }
            Ok(Err(e)) => progress(Note::Error(format!(
                "no automatic checkpoint ({e}): this restore cannot be undone"
            ))),
            Err(e) => progress(Note::Error(format!(
                "no automatic checkpoint ({e}): this restore cannot be undone"
            ))),
        }
    }

    /// Step 1: every process of the environment goes.
    pub(super) async fn stop_environment(&self) {
        self.sup.kill_all().await;
        if let Some(s) = self.sessions.get() {
            s.kill_all().await;
        }
        if let Some(c) = &self.container {
            c.kill().await;
        }
    }

    /// Step 2: the checkpoint's layer (built from its manifest unless
    /// cached) under a fresh upper dir.
    async fn restore_files(
        self: &Arc<Self>,
        meta: &CheckpointMeta,
        progress: &(dyn Fn(Note) + Sync),
    ) -> Result<(), CheckpointError> {
        let me = self.clone();
        let target = meta.id.clone();
        let built = tokio::task::spawn_blocking(move || -> Result<bool, CheckpointError> {
            let m = me.parent_manifest(Some(&target))?;
            let built = me.env.ensure_layer(&target, &m)?;
            me.env.switch_to(&target)?;
            Ok(built)
        })
        .await
        .map_err(|e| CheckpointError::Unavailable(e.to_string()))??;
        if !built {
            info(progress, format!("Layer of {} reused from cache", meta.id));
        }
        Ok(())
    }

    /// Step 3b: the checkpoint's policies, in force before any of its
    /// processes runs, and stored. One that does not pass the checks (a
    /// hostile archive's) or cannot be put in force is reported; the
    /// policy in force stays.
    async fn restore_policies(&self, meta: &CheckpointMeta, progress: &(dyn Fn(Note) + Sync)) {
        let (Some(kept), Some(net), Some(store)) = (
            &meta.policies,
            self.container.as_ref().and_then(|c| c.network()),
            self.policies.get(),
        ) else {
            return;
        };
        let checked = match &kept.network {
            None => Ok(None),
            Some(p) => serde_json::to_vec(p)
                .map_err(|e| e.to_string())
                .and_then(|b| NetworkPolicy::from_request(&b).map_err(|e| e.to_string()))
                .map(Some),
        };
        let result = match checked {
            Err(e) => Err(format!("it is not valid: {e}")),
            Ok(p) => match net.apply(p.clone()).await {
                Err(e) => Err(e.to_string()),
                Ok(()) => {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || {
                        store.update(|s| match &p {
                            Some(p) if !p.rules.is_empty() => s.set_network(p),
                            _ => s.clear_network(),
                        })
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                }
            },
        };
        match result {
            Ok(()) => info(progress, "Network policy restored"),
            Err(e) => {
                tracing::warn!(error = %e, "the checkpoint's network policy was not restored");
                info(
                    progress,
                    "The checkpoint's network policy could not be restored; the current one stays",
                );
            }
        }
    }

    /// Step 4 begins early: the raw images of `meta`'s dump, rebuilt from
    /// the store on a thread of their own (none without a dump or CRIU).
    fn start_rebuilding(self: &Arc<Self>, meta: &CheckpointMeta) -> Option<ImagesAt> {
        let env = meta.env.clone()?;
        self.container.as_ref()?;
        self.criu.as_ref()?;
        let (me, id) = (self.clone(), meta.id.clone());
        let rebuild = move || me.raw_images(&id, &env).map(RemoveOnDrop);
        match std::thread::Builder::new()
            .name("rebuild images".into())
            .spawn(rebuild)
        {
            Ok(h) => Some(ImagesAt::Rebuilding(h)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to rebuild the images");
                None
            }
        }
    }

    /// Step 4: the whole tree back with CRIU. The error is the reason to
    /// start a fresh environment instead.
    async fn restore_processes(
        self: &Arc<Self>,
        meta: &CheckpointMeta,
        container: &Container,
        at: Option<ImagesAt>,
    ) -> Result<(), String> {
        let images = match (&meta.env, meta.with_processes) {
            (Some(i), _) => i.clone(),
            (None, false) => return Err("the checkpoint keeps files only".into()),
            (None, true) => return Err("its processes were not dumped".into()),
        };
        let at = at.ok_or("its images could not be rebuilt")?;
        self.restore_tree(container, images, at).await
    }

    /// The whole tree of a CRIU dump back onto the mounted root, with new
    /// pipes where the daemon held the other ends; the init adopted, each
    /// process put back in its cgroup, services and sessions adopted. The
    /// error says why it could not be.
    pub(super) async fn restore_tree(
        self: &Arc<Self>,
        container: &Container,
        images: EnvImages,
        at: ImagesAt,
    ) -> Result<(), String> {
        let criu = self.criu.clone().ok_or("CRIU is unavailable")?;
        let init_cgroup = container.init_cgroup().map_err(|e| e.to_string())?;
        let me = self.clone();
        let plan = images.clone();
        let root = self.env.root().to_owned();
        let externals = self.external_paths(container);
        let placement = Placement::new(&container.config().cgroups, &images.cgroups)
            .map_err(|e| e.to_string())?;
        let hook = self.placement_hook(container, &placement);
        let netns = container.network().map(|n| n.netns());
        let (init_pid, ends) = tokio::task::spawn_blocking(move || -> Result<_, String> {
            // A checkpoint's images are rebuilt from the store for this
            // restore, and removed after it (before any writeback).
            let (dir, rebuilt) = match at {
                ImagesAt::Rebuilding(h) => {
                    let guard = h
                        .join()
                        .map_err(|_| "rebuilding the images failed (a panic)".to_owned())?
                        .map_err(|e| e.to_string())?;
                    (guard.0.clone(), Some(guard))
                }
                ImagesAt::Dir(dir) => (dir, None),
            };
            let (mut inherit, ends) = new_pipes(&plan).map_err(|e| format!("pipes: {e}"))?;
            if let Some(ns) = &netns {
                let ns = ns
                    .try_clone()
                    .map_err(|e| format!("the network namespace: {e}"))?;
                inherit.push((ns, crate::network::CRIU_KEY.to_owned()));
            }
            let procs = init_cgroup.procs_fd().map_err(|e| e.to_string())?;
            let externals: Vec<(&str, PathBuf)> = externals
                .iter()
                .map(|(k, p)| (k.as_str(), p.clone()))
                .collect();
            let (pid, stats) = criu
                .restore_env(&dir, &root, procs, &externals, inherit, hook.as_ref())
                .map_err(|e| e.to_string())?;
            *me.last_restore.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
            // (removing gigabytes takes a while: not on the restore's path)
            if let Some(r) = rebuilt {
                std::thread::spawn(move || drop(r));
            }
            Ok((pid, ends))
        })
        .await
        .map_err(|e| e.to_string())??;
        // The restored init holds the new pipes now: the next dump must
        // name them, not the ones in these images.
        let pipe_ids = [
            crate::container::pipe_id(&ends.init_requests).map_err(|e| format!("pipes: {e}"))?,
            crate::container::pipe_id(&ends.init_events).map_err(|e| format!("pipes: {e}"))?,
        ];
        container
            .adopt(init_pid, ends.init_requests, ends.init_events, pipe_ids)
            .await
            .map_err(|e| e.to_string())?;
        place_the_rest(placement).await;
        self.adopt_processes(container, &images, ends.services, ends.sessions)
    }

    /// What CRIU measured of the last restore of the whole tree (a wake
    /// from cold or a checkpoint's), if there was one.
    pub fn last_restore_stats(&self) -> Option<crate::criu::RestoreStats> {
        *self.last_restore.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host path of each external mount's key, for this daemon.
    fn external_paths(&self, container: &Container) -> Vec<(String, PathBuf)> {
        let s = &container.config().setup;
        EXTERNAL_MOUNTS
            .iter()
            .map(|(inside, key)| {
                let host = match *inside {
                    "/.sprite/bin/sprited" => s.exe.clone(),
                    "/.sprite/api.sock" => s.socket.clone(),
                    "/.sprite/checkpoints" => s.checkpoints.clone(),
                    _ => s.logs.clone(),
                };
                ((*key).to_owned(), host)
            })
            .collect()
    }

    /// CRIU's `pre-resume` hook that puts each restored process in its
    /// cgroup before any runs (see `place`), with the plan and the script
    /// written to the state dir. None if they cannot be written (the
    /// restore then places every process itself).
    fn placement_hook(&self, container: &Container, placement: &Placement) -> Option<ActionHook> {
        let state = self.dir.parent()?;
        let written = place::write_plan(state, placement)
            .and_then(|plan| hook::for_restore(state, &container.config().setup.exe, &plan));
        match written {
            Ok(hook) => Some(hook),
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the restore hook");
                None
            }
        }
    }

    /// The supervisor and the exec sessions take their processes back.
    fn adopt_processes(
        &self,
        container: &Container,
        images: &EnvImages,
        services: Vec<[Option<OwnedFd>; 2]>,
        sessions: Vec<[Option<OwnedFd>; 3]>,
    ) -> Result<(), String> {
        let init = container
            .init_host_pid()
            .ok_or("the restored init exited")?;
        let cgroups = container.config().cgroups.clone();
        for (s, pipes) in images.services.iter().zip(services) {
            let host_pid = crate::container::host_pid_of_child(init, s.pid)
                .ok_or_else(|| format!("service {} (pid {}) did not come back", s.name, s.pid))?;
            let was = RunningService {
                name: s.name.clone(),
                pid: s.pid,
                host_pid,
                cgroup: cgroups.child(&s.name).map_err(|e| e.to_string())?,
                restart_count: s.restart_count,
                started_at_ms: s.started_at_ms,
            };
            let exit = container.watch(s.pid).map_err(|e| e.to_string())?;
            self.sup
                .adopt(&was, pipes, exit)
                .map_err(|e| e.to_string())?;
        }
        if let Some(all) = self.sessions.get() {
            for (d, pipes) in images.sessions.iter().zip(sessions) {
                let Some(host_pid) = crate::container::host_pid_of_child(init, d.pid) else {
                    tracing::warn!(session = d.id, "a restored session's process is gone");
                    continue;
                };
                let cgroup = cgroups
                    .child(&format!("_exec-{}", d.id))
                    .map_err(|e| e.to_string())?;
                let exit = container.watch(d.pid).map_err(|e| e.to_string())?;
                if let Err(e) = all.adopt(d, host_pid, cgroup, pipes, exit) {
                    tracing::warn!(session = d.id, error = %e, "cannot adopt a restored session");
                }
            }
        }
        Ok(())
    }

    /// The raw images of checkpoint `id`, rebuilt from the store into a
    /// temp dir (the pages images reassembled from their packs).
    fn raw_images(&self, id: &str, p: &EnvImages) -> Result<PathBuf, CheckpointError> {
        let tmp = self
            .images
            .join(format!("{}{id}-restore", durable::TEMP_PREFIX));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        let store = self.env.store();
        for name in p.images.keys().chain(p.pages.keys()) {
            if name.contains('/') || name.starts_with('.') {
                return Err(CheckpointError::Unavailable(format!(
                    "bad image name {name:?}"
                )));
            }
        }
        for (name, object) in &p.images {
            store.extract_compressed(object, &tmp.join(name))?;
        }
        let t = Instant::now();
        for (name, list) in &p.pages {
            pages::assemble(store, list, &tmp.join(name), pages::threads())?;
        }
        tracing::info!(
            ms = t.elapsed().as_secs_f64() * 1e3,
            "images rebuilt from the store"
        );
        Ok(tmp)
    }
}

/// A dir removed when dropped.
pub(super) struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// New pipes for everything that had its other end in the daemon: the
/// restored side (`--inherit-fd`, paired with the dumped `pipe:[N]`) and
/// the daemon's side.
fn new_pipes(plan: &EnvImages) -> std::io::Result<(Vec<(OwnedFd, String)>, Ends)> {
    let mut inherit = Vec::new();
    let (req_r, req_w) = pipe()?;
    let (evt_r, evt_w) = pipe()?;
    inherit.push((req_r, plan.init_pipes[0].clone()));
    inherit.push((evt_w, plan.init_pipes[1].clone()));
    // A reading end for the daemon; the writing end goes to the restore.
    let mut out = |id: &Option<String>| -> std::io::Result<Option<OwnedFd>> {
        match id {
            Some(id) if !inherit.iter().any(|(_, i)| i == id) => {
                let (r, w) = pipe()?;
                inherit.push((w, id.clone()));
                Ok(Some(r))
            }
            _ => Ok(None),
        }
    };
    let mut services = Vec::new();
    for s in &plan.services {
        services.push([out(&s.stdout)?, out(&s.stderr)?]);
    }
    let mut sessions = Vec::new();
    for s in &plan.sessions {
        let o = out(&s.stdout)?;
        let e = out(&s.stderr)?;
        sessions.push([None, o, e]);
    }
    for (s, ends) in plan.sessions.iter().zip(sessions.iter_mut()) {
        if let Some(id) = &s.stdin {
            let (r, w) = pipe()?;
            inherit.push((r, id.clone()));
            ends[0] = Some(w);
        }
    }
    // A client of the API socket inside gets a socket whose peer is gone:
    // its call ended with the dump (it reads end of file).
    for ino in &plan.external_sockets {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (mine, _gone) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        inherit.push((mine, format!("socket:[{ino}]")));
    }
    Ok((
        inherit,
        Ends {
            init_requests: req_w,
            init_events: evt_r,
            services,
            sessions,
        },
    ))
}
