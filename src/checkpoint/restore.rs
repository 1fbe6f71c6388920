//! Restore: the environment as checkpoint `id` left it. The plan:
//!
//! 0. take an automatic checkpoint of the state about to be replaced (the
//!    undo point; not when restoring an automatic checkpoint), and delete
//!    the automatic ones beyond `--auto-keep`;
//! 1. stop the environment (every process; services and sessions forgotten);
//! 2. mount the checkpoint's layer with a fresh upper dir, while step 1
//!    runs (the dying processes keep the old root in their own mount
//!    namespace); the old generation goes once the restore is done;
//! 3. restore the service definitions, once steps 1 and 2 are done;
//! 4. with a CRIU dump: restore the init's whole tree onto the new root,
//!    with new pipes where the daemon held the other ends; adopt the init,
//!    put each process back in its cgroup, adopt services and sessions;
//!    without one (or when CRIU fails): start a fresh environment and say why.
//!    This step starts first: the images are rebuilt and CRIU starts up
//!    (probing the kernel, reading the images) while steps 1 to 3 run, and
//!    CRIU's `pre-restore` hook waits at the gate (`hook::Gate`) until
//!    they are done, CRIU is in the init's cgroup and the images are whole;
//! 5. start the services that are not running yet.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::capture::EXTERNAL_MOUNTS;
use super::hook;
use super::image_cache::Filled;
use super::place::Placement;
use super::{CheckpointError, CheckpointMeta, Checkpoints, EnvImages, Note, info};
use crate::container::Container;
use crate::container::dev::KEY as DEV_KEY;
use crate::container::dev::Rebuilt;
use crate::fs::Retired;
use crate::policy::NetworkPolicy;
use crate::supervisor::RunningService;

/// Where the raw images of a dump are.
pub(super) enum ImagesAt {
    /// A checkpoint's, being rebuilt from the store into `dir` (the
    /// image cache): `small` says when every image but the pages is there,
    /// `pages` ends with the whole.
    Rebuilding {
        dir: PathBuf,
        small: std::sync::mpsc::Receiver<Result<(), String>>,
        pages: Rebuild,
    },
    /// A dir of raw images (a cold sleep's).
    Dir(PathBuf),
}

/// The thread rebuilding a checkpoint's images.
type Rebuild = std::thread::JoinHandle<Result<Filled, CheckpointError>>;

/// What a rebuild's waiting is made of.
type Parts = (
    PathBuf,
    Option<std::sync::mpsc::Receiver<Result<(), String>>>,
    Option<Rebuild>,
);

impl ImagesAt {
    /// The dir, what says its small images are there, what ends with the
    /// whole.
    fn split(self) -> Parts {
        match self {
            ImagesAt::Rebuilding { dir, small, pages } => (dir, Some(small), Some(pages)),
            ImagesAt::Dir(dir) => (dir, None, None),
        }
    }
}

/// Whatever the placement at `pre-resume` left in the init's cgroup goes to its own,
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

/// Whether a restore puts back the policies its checkpoint recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyRestore {
    /// The external API's restores: the checkpoint's policies come back.
    FromCheckpoint,
    /// A restore asked from inside the environment: code there may not
    /// change its own restrictions (a checkpoint taken before a policy, or
    /// imported, would lift it), so the policies in force stay.
    KeepInForce,
}

impl Checkpoints {
    /// Restores `id`: stops the environment, mounts the checkpoint's layer
    /// with a fresh upper dir, restores the service definitions (and, as
    /// `policies` says, the policies), then the processes (or a fresh
    /// environment, saying why). CRIU starts at once and waits at its
    /// `pre-restore` hook for the rest to be ready.
    #[tracing::instrument(name = "restore", skip(self, progress), fields(checkpoint = id))]
    pub async fn restore(
        self: &Arc<Self>,
        id: &str,
        policies: PolicyRestore,
        progress: &(dyn Fn(Note) + Sync),
    ) -> Result<(), CheckpointError> {
        let meta = self.get(id)?;
        if !meta.is_auto {
            self.take_undo_point(id, progress).await;
        }
        let t0 = Instant::now();
        let timing = std::sync::Mutex::new((Duration::ZERO, Duration::ZERO));
        // Steps 1 to 3: the old environment stopped while the new root is
        // mounted (and CRIU starts, and the images are rebuilt).
        let (stopped, stop_done) = tokio::sync::oneshot::channel::<()>();
        let stop = async {
            info(progress, "Stopping the environment...");
            self.stop_environment().await;
            timing.lock().unwrap_or_else(|e| e.into_inner()).0 = t0.elapsed();
            let _ = stopped.send(());
        };
        // The old root goes once the restore is done (the old environment
        // killed and waited for by then), its final sync and removal not
        // competing with CRIU.
        let old_root = std::sync::Mutex::new(None::<Retired>);
        // The definitions and policies come back only once the files have
        // and the old environment is gone.
        let (files_done, files_back) = tokio::sync::oneshot::channel::<bool>();
        let prepare = async {
            info(progress, "Restoring filesystem...");
            let restored = self.restore_files(&meta, progress).await;
            let _ = files_done.send(restored.is_ok());
            *old_root.lock().unwrap_or_else(|e| e.into_inner()) = Some(restored?);
            timing.lock().unwrap_or_else(|e| e.into_inner()).1 = t0.elapsed();
            Ok::<(), CheckpointError>(())
        };
        let settle = async {
            if files_back.await != Ok(true) {
                return Ok(()); // (the restore fails with prepare's error)
            }
            let _ = stop_done.await;
            // (on a thread of its own: it writes the definitions durably,
            // and the restore's other steps go on meanwhile)
            let (sup, defs, running) = (
                self.sup.clone(),
                meta.services.clone(),
                meta.running.clone(),
            );
            tokio::task::spawn_blocking(move || sup.replace_definitions(defs, &running))
                .await
                .map_err(|e| CheckpointError::Unavailable(e.to_string()))??;
            match policies {
                PolicyRestore::FromCheckpoint => self.restore_policies(&meta, progress).await,
                PolicyRestore::KeepInForce => {
                    tracing::info!(
                        "a restore asked from inside the environment keeps the policies in force"
                    );
                    info(
                        progress,
                        "The policies in force stay: a restore asked from inside the environment does not change them",
                    );
                }
            }
            Ok::<(), CheckpointError>(())
        };
        if let Some(container) = &self.container {
            let _ = self.image_cache.take_last();
            let outcome = match self.tree_of(&meta) {
                Ok((images, at)) => {
                    self.restore_tree(container, images, at, stop, prepare, settle)
                        .await?
                }
                Err(why) => {
                    stop.await;
                    prepare.await?;
                    settle.await?;
                    Err(why)
                }
            };
            if let Some(f) = self.image_cache.take_last() {
                info(
                    progress,
                    format!(
                        "Process images: {} of {} pages and {} of {} other images written from the store (the rest kept from the last restore)",
                        f.pages_written, f.pages, f.small_extracted, f.small
                    ),
                );
            }
            match outcome {
                Ok(()) => {
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
                Err(why) => {
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
        } else {
            stop.await;
            prepare.await?;
            settle.await?;
        }
        let processes = t0.elapsed();
        self.sup.start_all().await;
        drop(old_root);
        let (killed, files) = *timing.lock().unwrap_or_else(|e| e.into_inner());
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
    /// Every process at once: the services marked stopping, then the
    /// sessions and the whole environment killed, then the services
    /// stopped.
    pub(super) async fn stop_environment(&self) {
        let the_rest = async {
            if let Some(s) = self.sessions.get() {
                s.kill_all().await;
            }
            if let Some(c) = &self.container {
                c.kill().await;
            }
        };
        self.sup.stop_all_with(the_rest).await;
    }

    /// Step 2: the checkpoint's layer (built from its manifest unless
    /// cached) under a fresh upper dir; the old generation is returned, to
    /// be dropped once the old environment is gone.
    async fn restore_files(
        self: &Arc<Self>,
        meta: &CheckpointMeta,
        progress: &(dyn Fn(Note) + Sync),
    ) -> Result<Retired, CheckpointError> {
        let me = self.clone();
        let target = meta.id.clone();
        let (built, retired) =
            tokio::task::spawn_blocking(move || -> Result<_, CheckpointError> {
                let m = me.parent_manifest(Some(&target))?;
                let built = me.env.ensure_layer(&target, &m)?;
                let retired = me.env.switch_to(&target)?;
                Ok((built, retired))
            })
            .await
            .map_err(|e| CheckpointError::Unavailable(e.to_string()))??;
        if !built {
            info(progress, format!("Layer of {} reused from cache", meta.id));
        }
        Ok(retired)
    }

    /// Step 3b: the checkpoint's policies, in force before any of its
    /// processes runs, and stored. One that does not pass the checks (a
    /// hostile archive's) or cannot be put in force is reported; the
    /// policy in force stays. One equal to the policy in force is left as
    /// it is (nothing to rebuild).
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
        if let Ok(p) = &checked
            && p.clone().filter(|p| !p.rules.is_empty()) == net.policy().await
        {
            return;
        }
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

    /// Step 4 begins first: the dump to restore, its raw images being
    /// rebuilt from the store on a thread of their own. The error is why
    /// the processes cannot come back.
    fn tree_of(self: &Arc<Self>, meta: &CheckpointMeta) -> Result<(EnvImages, ImagesAt), String> {
        let env = match (&meta.env, meta.with_processes) {
            (Some(i), _) => i.clone(),
            (None, false) => return Err("the checkpoint keeps files only".into()),
            (None, true) => return Err("its processes were not dumped".into()),
        };
        if self.criu.is_none() {
            return Err("CRIU is unavailable".into());
        }
        if !self.key.opens(&env, &meta.manifest) {
            return Err(
                "its process images are not sealed by this sprite's checkpoint key (taken on a sprite with another --checkpoint-key, or altered)"
                    .into(),
            );
        }
        let dir = self.image_cache.dir().to_owned();
        let (small_tx, small) = std::sync::mpsc::sync_channel(1);
        let (me, plan) = (self.clone(), env.clone());
        let pages = std::thread::Builder::new()
            .name("rebuild images".into())
            .spawn(move || me.image_cache.fill(me.env.store(), &plan, small_tx))
            .map_err(|e| format!("its images could not be rebuilt: {e}"))?;
        Ok((env, ImagesAt::Rebuilding { dir, small, pages }))
    }

    /// Step 4: the whole tree of a CRIU dump back onto the mounted root,
    /// with new pipes where the daemon held the other ends; the init
    /// adopted, each process put back in its cgroup, services and sessions
    /// adopted. CRIU starts at once, while `stop` (the old environment
    /// stopped) and, side by side with it, `prepare` (what else must be
    /// done before any task exists: the root mounted) run; its
    /// `pre-restore` hook waits at the [`hook::Gate`] until those and the
    /// images are ready. `settle` (what must be done before any task runs,
    /// and may wait for `stop` and `prepare` itself) runs beside, and the
    /// `pre-resume` hook waits for it too. The outer error is
    /// `prepare`'s or `settle`'s; the inner one says why the processes
    /// could not come back.
    pub(super) async fn restore_tree<E>(
        self: &Arc<Self>,
        container: &Container,
        images: EnvImages,
        at: ImagesAt,
        stop: impl Future<Output = ()>,
        prepare: impl Future<Output = Result<(), E>>,
        settle: impl Future<Output = Result<(), E>>,
    ) -> Result<Result<(), String>, E> {
        let (pipes, ends) = match self.restore_pipes(container, &images) {
            Ok(p) => p,
            Err(e) => {
                stop.await;
                prepare.await?;
                settle.await?;
                return Ok(Err(e));
            }
        };
        let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
        let started: crate::criu::Started = Box::new(move |pid| {
            let _ = pid_tx.send(pid);
        });
        let (dir, wait_small, pages) = at.split();
        let (mut gate, asker) = hook::Gate::new();
        let t0 = Instant::now();
        let (fill_tx, fill_rx) = tokio::sync::oneshot::channel();
        let mut criu = CriuRun::Running(
            self.start_criu(container, dir, wait_small, started, pipes, asker, fill_tx),
        );
        // CRIU starts up meanwhile. So does `prepare`: the new root is
        // mounted while the old environment dies (its processes keep the
        // old root in their own mount namespace). From the old
        // environment's end until the processes are placed, no cgroup move
        // waits. (Not before: the first move waits for an RCU grace period
        // holding the kernel's cgroup lock, which stopping the environment
        // needs too.) The cgroups the processes go back to are made before
        // moves are kept fast (the first fast move holds the kernel's cgroup
        // lock through an RCU grace period, which making a cgroup would
        // wait for).
        let stop_then_place = async {
            stop.await;
            let placement = self.placement(container, &images);
            (placement, self.fast_migrations(container))
        };
        // CRIU goes on to make the tasks once the old environment is gone,
        // the root is mounted and the images are whole; `settle` (the
        // service definitions, the policies) meanwhile, done before any
        // task runs.
        let before_tasks = async {
            // Both start once CRIU is spawned (or could not be): its spawn
            // (a vfork and an exec) is on the way to the gate, they are not,
            // and on a few CPUs they would slow it down.
            let criu_pid = pid_rx.await;
            let ((placement, fast), prepared) = tokio::join!(stop_then_place, prepare);
            let ready = match &prepared {
                Err(_) => Err("the restore stopped".to_owned()),
                Ok(()) => {
                    self.ready_for_tasks(container, placement, criu_pid, fill_rx, pages)
                        .await
                }
            };
            match (
                criu.at_stage(&mut gate, "pre-restore").await,
                prepared,
                ready,
            ) {
                (Ok(waiting), Ok(()), Ok(p)) => {
                    waiting.answer(true);
                    tracing::debug!(after = ?t0.elapsed(), "CRIU goes on to restore the tasks");
                    Ok((p, fast))
                }
                (waiting, prepared, ready) => {
                    let ended_first = waiting.is_err();
                    if let Ok(w) = waiting {
                        w.answer(false);
                    }
                    Err((ended_first, prepared, ready.err()))
                }
            }
        };
        let (before, settled) = tokio::join!(before_tasks, settle);
        let (placement, fast) = match before {
            Ok(p) => p,
            Err((ended_first, prepared, not_ready)) => {
                // Why: CRIU's own error if it ended first, else what was
                // not ready (CRIU then ends: its stage was refused).
                let ended = criu.finish().await.err();
                prepared?;
                settled?;
                let why = match ended_first {
                    true => ended.or(not_ready),
                    false => not_ready.or(ended),
                };
                return Ok(Err(why.unwrap_or_default()));
            }
        };
        // Every task restored, none running: each goes to its cgroup.
        match criu.at_stage(&mut gate, "pre-resume").await {
            Ok(waiting) => {
                if let Err(e) = settled {
                    waiting.answer(false);
                    let _ = criu.finish().await;
                    return Err(e);
                }
                let moved = placement.clone();
                let _ =
                    tokio::task::spawn_blocking(move || Placement::apply(&moved.pending())).await;
                drop(fast);
                waiting.answer(true);
                tracing::debug!(after = ?t0.elapsed(), "every restored process placed");
            }
            Err(why) => {
                let _ = criu.finish().await;
                settled?;
                return Ok(Err(why));
            }
        }
        Ok(match criu.finish().await {
            Ok((init_pid, exiting)) => {
                let adopted = self
                    .adopt_tree(container, &images, init_pid, ends, placement)
                    .await;
                // (CRIU exits meanwhile, its socket closed: none of it is
                // left in the environment's cgroup once the restore is done)
                let _ = tokio::task::spawn_blocking(move || exiting.wait()).await;
                adopted
            }
            Err(why) => Err(why),
        })
    }

    /// New pipes for the restored tree (and the environment's network
    /// namespace, which CRIU takes as inherited too).
    fn restore_pipes(
        &self,
        container: &Container,
        images: &EnvImages,
    ) -> Result<(Vec<(OwnedFd, String)>, Ends), String> {
        let (mut inherit, ends) = new_pipes(images).map_err(|e| format!("pipes: {e}"))?;
        if let Some(net) = container.network() {
            let ns = net
                .netns()
                .try_clone()
                .map_err(|e| format!("the network namespace: {e}"))?;
            inherit.push((ns, crate::network::CRIU_KEY.to_owned()));
        }
        Ok((inherit, ends))
    }

    /// CRIU restoring the tree in `dir` onto the root, on a blocking thread
    /// (once `wait_small` says the small images are there).
    #[allow(clippy::too_many_arguments)]
    fn start_criu(
        self: &Arc<Self>,
        container: &Container,
        dir: PathBuf,
        wait_small: Option<std::sync::mpsc::Receiver<Result<(), String>>>,
        started: crate::criu::Started,
        inherit: Vec<(OwnedFd, String)>,
        asker: hook::Asker,
        dev_fill: tokio::sync::oneshot::Sender<Option<DevFill>>,
    ) -> tokio::task::JoinHandle<CriuResult> {
        let me = self.clone();
        let root = self.env.root().to_owned();
        let mut externals = self.external_paths(container);
        let dev_at = self.images.join("dev");
        tokio::task::spawn_blocking(move || {
            let criu = me.criu.clone().ok_or("CRIU is unavailable")?;
            // CRIU starts first: its own start runs while the images are
            // made ready.
            let run = criu
                .start_restore(started, inherit)
                .map_err(|e| e.to_string())?;
            let ready = wait_small
                .map_or(Ok(Ok(())), |small| small.recv())
                .map_err(|_| "rebuilding the images failed (a panic)".to_owned())
                .and_then(|r| r)
                .and_then(|()| rebuild_dev(&dir, &dev_at));
            let dev = match ready {
                Ok(dev) => dev,
                Err(e) => {
                    run.abandon();
                    return Err(e);
                }
            };
            let _ = dev_fill.send(
                (dev == Some(Rebuilt::NeedsFill))
                    .then(|| (dir.join(crate::container::dev::ARCHIVE), dev_at.clone())),
            );
            if dev.is_some() {
                externals.push((DEV_KEY.to_owned(), dev_at.clone()));
            }
            let externals: Vec<(&str, PathBuf)> = externals
                .iter()
                .map(|(k, p)| (k.as_str(), p.clone()))
                .collect();
            let restored = run
                .restore(&dir, &root, &externals, &mut |stage| asker.stage(stage))
                .map_err(|e| e.to_string());
            if dev.is_some() {
                crate::container::dev::release(&dev_at);
            }
            let (pid, stats, exiting) = restored?;
            *me.last_restore.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
            Ok((pid, exiting))
        })
    }

    /// What must hold before CRIU forks a task (the old environment is
    /// gone): CRIU in the init's cgroup (so every task is born there, its
    /// memory charged to the environment), `/dev` filled (its file data by
    /// a helper born there too), the images whole. Returns the placement
    /// of the tasks.
    async fn ready_for_tasks(
        &self,
        container: &Container,
        placement: Result<Placement, String>,
        criu_pid: Result<i32, tokio::sync::oneshot::error::RecvError>,
        dev_fill: tokio::sync::oneshot::Receiver<Option<DevFill>>,
        pages: Option<Rebuild>,
    ) -> Result<Placement, String> {
        let placement = placement?;
        let init = container.init_cgroup().map_err(|e| e.to_string())?;
        let pid = criu_pid.map_err(|_| "CRIU did not start".to_owned())?;
        init.add(pid)
            .map_err(|e| format!("CRIU cannot join the init's cgroup: {e}"))?;

        // (sent before CRIU started)
        if let Ok(Some((archive, at))) = dev_fill.await {
            container
                .fill_dev(&archive, &at)
                .await
                .map_err(|e| format!("the environment's /dev: {e}"))?;
        }
        join_rebuild(pages).await?;
        Ok(placement)
    }

    /// Where each restored process goes: the dump's cgroups, made (with
    /// the device program of the privileges policy in force).
    fn placement(&self, container: &Container, images: &EnvImages) -> Result<Placement, String> {
        let devices = container.devices();
        Placement::new(
            &container.config().cgroups,
            &images.cgroups,
            devices.as_deref(),
        )
        .map_err(|e| e.to_string())
    }

    /// Cgroup moves kept fast for the restore ([`crate::cgroup::Cgroup::keep_migrations_fast`]:
    /// the daemon moved into its own cgroup every 3 ms); none if they are
    /// fast anyway (`favordynmods`) or the daemon's cgroup cannot be found
    /// (the moves then wait).
    fn fast_migrations(&self, container: &Container) -> Option<crate::cgroup::FastMigrations> {
        let cgroups = &container.config().cgroups;
        if cgroups.moves().is_some_and(crate::cgroup::Moves::fast) {
            return None;
        }
        let me = std::process::id() as i32;
        let own = cgroups.of_process(me)?;
        own.keep_migrations_fast(me)
            .inspect_err(|e| tracing::warn!(error = %e, "cgroup moves not kept fast"))
            .ok()
    }

    /// After CRIU: the restored init adopted with its new pipes, what the
    /// hook left in the init's cgroup placed, services and sessions
    /// adopted.
    async fn adopt_tree(
        &self,
        container: &Container,
        images: &EnvImages,
        init_pid: i32,
        ends: Ends,
        placement: Placement,
    ) -> Result<(), String> {
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
        self.adopt_processes(container, images, ends.services, ends.sessions)
    }

    /// Forgets the images the last restore left for the next one (which
    /// then rebuilds its images whole from the store), freeing their disk
    /// space.
    pub fn clear_restore_cache(&self) {
        self.image_cache.clear();
    }

    /// What CRIU measured of the last restore of the whole tree (a wake
    /// from cold or a checkpoint's), if there was one.
    pub fn last_restore_stats(&self) -> Option<crate::criu::RestoreStats> {
        *self.last_restore.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Each external bind mount's key and host path, as this daemon's
    /// restores hand them to CRIU, with `dev` as the environment's `/dev`
    /// (for a plain CRIU run beside the daemon: `benches/criu.rs`).
    pub fn external_mounts(&self, dev: &Path) -> Vec<(String, PathBuf)> {
        let Some(container) = &self.container else {
            return Vec::new();
        };
        let mut all = self.external_paths(container);
        all.push((DEV_KEY.to_owned(), dev.to_owned()));
        all
    }

    /// The host path of each external bind mount's key, for this daemon
    /// (`/dev` is rebuilt for each restore: [`rebuild_dev`]).
    fn external_paths(&self, container: &Container) -> Vec<(String, PathBuf)> {
        let s = &container.config().setup;
        EXTERNAL_MOUNTS
            .iter()
            .filter_map(|(inside, key)| {
                let host = match *inside {
                    "/dev" => return None,
                    "/.sprite" => s.sprite_dir.clone(),
                    "/.sprite/bin/sprited" => s.exe.clone(),
                    "/.sprite/api.sock" => s.socket.clone(),
                    "/.sprite/checkpoints" => s.checkpoints.clone(),
                    "/.sprite/logs/services" => s.logs.clone(),
                    other => unreachable!("no host path for the external mount {other}"),
                };
                Some(((*key).to_owned(), host))
            })
            .collect()
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
}

/// The environment's `/dev` rebuilt at `at` from the daemon's archive
/// among the images in `dir`, for CRIU to bind (true); false if the images
/// have none (taken before the daemon archived `/dev`: CRIU's own archive
/// of the tmpfs is among them, and CRIU extracts it).
fn rebuild_dev(dir: &Path, at: &Path) -> Result<Option<Rebuilt>, String> {
    let archive = dir.join(crate::container::dev::ARCHIVE);
    if !archive.exists() {
        return Ok(None);
    }
    let t = Instant::now();
    let rebuilt = crate::container::dev::rebuild(&archive, at)
        .map_err(|e| format!("the environment's /dev: {e}"))?;
    tracing::debug!(
        ms = t.elapsed().as_secs_f64() * 1e3,
        ?rebuilt,
        "/dev rebuilt"
    );
    Ok(Some(rebuilt))
}

/// A rebuilt `/dev` that a helper in the environment's cgroup fills: the
/// archive, the tmpfs.
type DevFill = (PathBuf, PathBuf);

/// Waits for the images' rebuild to end (none: a dir of images).
async fn join_rebuild(pages: Option<Rebuild>) -> Result<(), String> {
    let Some(h) = pages else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || h.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "rebuilding the images failed (a panic)".to_owned())?
        .map(|_| ())
        .map_err(|e| format!("its images could not be rebuilt: {e}"))
}

/// What CRIU's restore ends with: the restored init's host pid, and CRIU
/// exiting.
type CriuResult = Result<(i32, crate::criu::Exiting), String>;

/// A CRIU restore on its blocking thread, or how it ended.
enum CriuRun {
    Running(tokio::task::JoinHandle<CriuResult>),
    Ended(CriuResult),
}

impl CriuRun {
    /// Waits for CRIU at `stage`, or for CRIU's end (an error: CRIU asks
    /// at every stage it gets to).
    async fn at_stage(
        &mut self,
        gate: &mut hook::Gate,
        stage: &str,
    ) -> Result<hook::Waiting, String> {
        let CriuRun::Running(h) = self else {
            return Err(format!("CRIU ended before {stage}"));
        };
        tokio::select! {
            w = gate.next() => {
                let w = w.ok_or_else(|| format!("CRIU ended before {stage}"))?;
                if w.stage == stage {
                    return Ok(w);
                }
                let said = w.stage.clone();
                w.answer(false);
                Err(format!("CRIU came to {said:?}, not {stage}"))
            }
            r = h => {
                let r = r.map_err(|e| e.to_string()).and_then(|r| r);
                let why = match &r {
                    Err(why) => why.clone(),
                    Ok(_) => format!("CRIU ended without stopping at {stage}"),
                };
                *self = CriuRun::Ended(r.and(Err(why.clone())));
                Err(why)
            }
        }
    }

    /// How CRIU ended (waiting for it).
    async fn finish(self) -> CriuResult {
        match self {
            CriuRun::Running(h) => h.await.map_err(|e| e.to_string()).and_then(|r| r),
            CriuRun::Ended(r) => r,
        }
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
