//! Sleep, as the environment sees it. The plans:
//!
//! - **warm**: freeze the daemon's cgroup (every process of the
//!   environment); thaw to wake.
//! - **cold** (from warm): CRIU dumps the frozen tree into
//!   `<state>/sleep/images/`; the record `<state>/sleep/cold.json` (what a
//!   restore plugs back, and since when) is written durably; then every
//!   process ends. The files stay where they are: the upper dir is not
//!   touched while nothing runs.
//! - **wake from cold**: CRIU restores the tree onto the same root, which
//!   is adopted as after a checkpoint restore; then the record and the
//!   images go. If the tree cannot come back, a fresh environment starts
//!   with the services that were running, and the reason is returned.
//!
//! A daemon that stops (or crashes) while cold finds the record at its next
//! start and stays cold until a request wakes it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::capture::EXTERNAL_MOUNTS;
use super::restore::ImagesAt;
use super::{CheckpointError, Checkpoints, EnvImages, io_err};
use crate::durable;

/// What a cold sleep left: the dump's plan and when the sprite slept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ColdRecord {
    /// When the sprite went to sleep (ms since the Unix epoch).
    pub since_ms: u64,
    pub images: EnvImages,
}

impl ColdRecord {
    pub fn since(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.since_ms)
    }
}

/// Where a cold sleep's record is, under state dir `state_dir` (the boot
/// looks before anything starts).
pub fn cold_record_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("sleep").join("cold.json")
}

impl Checkpoints {
    fn sleep_dir(&self) -> PathBuf {
        self.dir
            .parent()
            .map(|p| p.join("sleep"))
            .unwrap_or_else(|| PathBuf::from("sleep"))
    }

    fn cold_path(&self) -> PathBuf {
        self.sleep_dir().join("cold.json")
    }

    pub(super) fn sleep_images(&self) -> PathBuf {
        self.sleep_dir().join("images")
    }

    /// The record of a cold sleep, if the sprite is cold.
    pub fn cold_record(&self) -> Option<ColdRecord> {
        let bytes = std::fs::read(self.cold_path()).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable cold-sleep record: the sprite starts fresh");
                None
            }
        }
    }

    /// Warm: every process of the environment frozen.
    pub async fn freeze_environment(&self, timeout: Duration) -> Result<(), CheckpointError> {
        let Some(c) = self.container.as_ref() else {
            return Ok(());
        };
        let whole = c.config().cgroups.whole();
        tokio::task::spawn_blocking(move || whole.freeze(timeout))
            .await
            .map_err(|e| CheckpointError::Unavailable(e.to_string()))??;
        Ok(())
    }

    /// Thaws the environment: its tasks run again as soon as they are
    /// scheduled (not waiting for the kernel to report every one thawed,
    /// which can take a scheduler tick: a waking request goes on at once).
    pub fn thaw_environment(&self) {
        let Some(c) = self.container.as_ref() else {
            return;
        };
        if let Err(e) = c.config().cgroups.whole().release() {
            tracing::warn!(error = %e, "cannot thaw the environment");
        }
    }

    /// Cold: the (frozen) environment dumped whole, the record written,
    /// every process ended. On an error nothing has ended.
    #[tracing::instrument(name = "sleep_cold", skip_all)]
    pub async fn sleep_cold(self: &Arc<Self>, since: SystemTime) -> Result<(), CheckpointError> {
        let unavailable = |why: &str| CheckpointError::Unavailable(why.to_owned());
        let container = self
            .container
            .clone()
            .filter(|c| c.is_running())
            .ok_or_else(|| unavailable("no environment runs"))?;
        let criu = self
            .criu
            .clone()
            .ok_or_else(|| unavailable("CRIU is unavailable"))?;
        let init = container
            .init_host_pid()
            .ok_or_else(|| unavailable("the environment's init is gone"))?;
        let plan = self.dump_plan(&container, container.external_unix_sockets());
        let whole = container.config().cgroups.whole();
        let netns = container.network().map(|n| n.netns_inode());
        let (dir, record_path) = (self.sleep_images(), self.cold_path());
        let since_ms = since
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let container_of_dump = container.clone();
        tokio::task::spawn_blocking(move || -> Result<(), CheckpointError> {
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(sleep_dir) = dir.parent() {
                // (best effort: the last wake's removal may still run)
                let _ = durable::clean_temp_files(sleep_dir);
            }
            if let Some(parent) = record_path.parent() {
                std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            }
            // Frozen since the warm sleep; where that caught a task in the
            // middle of a vfork, thawed until it can be seized.
            super::capture::freeze_seizable(&whole, &|_| {})?;
            let stats = criu
                .dump_env(
                    &crate::criu::DumpTarget {
                        init,
                        cgroup: whole.path(),
                        images: &dir,
                        external: EXTERNAL_MOUNTS,
                        external_sockets: &plan.external_sockets,
                        netns,
                    },
                    None,
                    None,
                )
                .map_err(|e| CheckpointError::Unavailable(e.to_string()))?;
            super::capture::archive_dev(&container_of_dump, &dir)?;
            tracing::info!(
                bytes = stats.bytes,
                dump_ms = stats.dump_ms,
                "environment dumped for a cold sleep"
            );
            let record = ColdRecord {
                since_ms,
                images: EnvImages { stats, ..plan },
            };
            let json = serde_json::to_vec(&record).expect("the record serializes");
            durable::write_atomic(&record_path, &json, 0o600)?;
            Ok(())
        })
        .await
        .map_err(|e| CheckpointError::Unavailable(e.to_string()))??;
        // Killed while frozen (the init, which reaps and reports exits, is
        // frozen too, so nothing could stop politely): the services end as
        // stopped, not crashed. Then the cgroups thawed for what the wake
        // restores; then the rest of the bookkeeping.
        self.sup.end_all_with(container.kill()).await;
        self.thaw_environment();
        self.stop_environment().await;
        Ok(())
    }

    /// Wakes a cold sprite: the dumped tree restored onto the same root, or
    /// (returning why) a fresh environment with the services that were
    /// running. Either way the record and the images are gone after.
    #[tracing::instrument(name = "wake_cold", skip_all)]
    pub async fn wake_cold(self: &Arc<Self>) -> Option<String> {
        let record = self.cold_record();
        let container = self.container.clone()?;
        let why = match &record {
            None => Some("the cold dump is missing".to_owned()),
            Some(r) => self
                .restore_tree(
                    &container,
                    r.images.clone(),
                    ImagesAt::Dir(self.sleep_images()),
                    async {},
                    async { Ok::<(), std::convert::Infallible>(()) },
                    async { Ok(()) },
                )
                .await
                .unwrap_or_else(|e| match e {})
                .err(),
        };
        if let Some(why) = &why {
            tracing::warn!(reason = %why, "the sleeping processes cannot come back: a fresh environment starts");
            self.stop_environment().await;
            if let Err(e) = container.start().await {
                tracing::error!(error = %e, "the environment cannot start");
            }
            let running: Vec<String> = record
                .iter()
                .flat_map(|r| r.images.services.iter().map(|s| s.name.clone()))
                .collect();
            let (defs, _) = self.sup.snapshot();
            if let Err(e) = self.sup.replace_definitions(defs, &running) {
                tracing::warn!(error = %e, "cannot mark the services to start");
            }
        }
        self.sup.start_all().await;
        self.forget_cold();
        why
    }

    /// The record first (durably), then the images: renamed aside at once
    /// (the next cold sleep writes a fresh dir), removed in the background.
    fn forget_cold(&self) {
        let path = self.cold_path();
        match std::fs::remove_file(&path) {
            Ok(()) => {
                if let Err(e) = durable::sync_dir(&self.sleep_dir()) {
                    tracing::warn!(error = %e, "cannot sync the sleep dir");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %io_err("remove", &path)(e), "cannot remove the cold-sleep record")
            }
        }
        let dir = self.sleep_dir();
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let aside = dir.join(format!("{}images-{stamp}", durable::TEMP_PREFIX));
        if std::fs::rename(self.sleep_images(), &aside).is_ok() {
            // (a crash meanwhile leaves it to the next cold sleep's cleanup)
            std::thread::spawn(move || {
                let _ = std::fs::remove_dir_all(&aside);
            });
        }
    }
}
