//! Uploads: every checkpoint goes to the bucket in the background, after
//! it is published; nothing waits for it.
//!
//! The plan of one upload: pin the checkpoint (it cannot be deleted
//! meanwhile) → list its objects → write the lease (what a `remote gc`
//! must keep), and stop if a gc holds the lock (retried) → for each
//! object, 8 at a time, ask the bucket whether it has it and send it if
//! not → write the record last → remove the lease. Its state
//! (`pending`, `uploading`, `uploaded`, `failed`; bytes and objects sent)
//! is kept in `<state>/remote/<id>.json`, written atomically at each change
//! of state; a daemon that starts resumes the uploads that were pending or
//! under way. A failure is retried with backoff (1 s doubling, five times),
//! then left `failed` with the reason until the next push.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::{RECORD_FORMAT, Record, Remote, RemoteError};
use crate::checkpoint::Checkpoints;

/// Objects in flight at once.
const PARALLEL: usize = 8;
/// Tries of one upload before it is left `failed`.
const TRIES: u32 = 6;
/// How often progress is published while an upload runs.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadState {
    Pending,
    Uploading,
    Uploaded,
    Failed,
}

/// A checkpoint's upload, as `remote` in the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadStatus {
    pub state: UploadState,
    /// Bytes and objects sent (new to the bucket).
    pub bytes: u64,
    pub objects: u64,
    /// Objects the bucket had already.
    pub present: u64,
    /// The checkpoint's objects and bytes in all.
    pub total_objects: u64,
    pub total_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A failed try that will be tried again (after a backoff).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retrying: bool,
    pub updated: String,
}

impl UploadStatus {
    fn new(state: UploadState) -> UploadStatus {
        UploadStatus {
            state,
            bytes: 0,
            objects: 0,
            present: 0,
            total_objects: 0,
            total_bytes: 0,
            error: None,
            retrying: false,
            updated: now(),
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// The uploads of this daemon's checkpoints.
pub struct Uploads {
    remote: Arc<Remote>,
    cps: Arc<Checkpoints>,
    sprite: String,
    /// `<state>/remote`: one `<id>.json` per checkpoint.
    dir: PathBuf,
    statuses: Mutex<HashMap<String, UploadStatus>>,
    events: broadcast::Sender<(String, UploadStatus)>,
    queue: mpsc::UnboundedSender<String>,
}

impl Uploads {
    /// Starts the upload task; resumes what a previous run left pending or
    /// under way (and forgets the uploads of deleted checkpoints).
    pub fn start(
        remote: Arc<Remote>,
        cps: Arc<Checkpoints>,
        sprite: String,
        dir: PathBuf,
        shutdown: CancellationToken,
    ) -> Result<Arc<Uploads>, RemoteError> {
        std::fs::create_dir_all(&dir).map_err(crate::durable::err("create", &dir))?;
        let _ = crate::durable::clean_temp_files(&dir);
        let (queue, rx) = mpsc::unbounded_channel();
        let up = Arc::new(Uploads {
            remote,
            cps,
            sprite,
            dir,
            statuses: Mutex::default(),
            events: broadcast::channel(256).0,
            queue,
        });
        let mut resume = Vec::new();
        for entry in std::fs::read_dir(&up.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            let status = std::fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<UploadStatus>(&b).ok());
            match status {
                Some(s) if up.cps.get(id).is_ok() => {
                    if matches!(s.state, UploadState::Pending | UploadState::Uploading)
                        || s.retrying
                    {
                        resume.push(id.to_owned());
                    }
                    up.lock().insert(id.to_owned(), s);
                }
                _ => {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        resume.sort_by_key(|id| id_number(id));
        for id in resume {
            tracing::info!(checkpoint = %id, "resuming an upload");
            let _ = up.queue.send(id);
        }
        tokio::spawn(up.clone().run(rx, shutdown));
        Ok(up)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, UploadStatus>> {
        self.statuses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The upload of checkpoint `id` (none: never asked for).
    pub fn status(&self, id: &str) -> Option<UploadStatus> {
        self.lock().get(id).cloned()
    }

    /// Every change of an upload's status (and its progress).
    pub fn subscribe(&self) -> broadcast::Receiver<(String, UploadStatus)> {
        self.events.subscribe()
    }

    /// Queues checkpoint `id` for upload (again: only what the bucket lacks
    /// moves). One already queued or under way is left as it is.
    pub fn enqueue(&self, id: &str) -> Result<(), RemoteError> {
        let busy = match self.status(id) {
            Some(s) => {
                matches!(s.state, UploadState::Pending | UploadState::Uploading) || s.retrying
            }
            None => false,
        };
        if busy {
            return Ok(());
        }
        self.set(id, UploadStatus::new(UploadState::Pending), true)?;
        let _ = self.queue.send(id.to_owned());
        Ok(())
    }

    /// Records and publishes a status; `durable` also writes its file.
    fn set(&self, id: &str, status: UploadStatus, durable: bool) -> Result<(), RemoteError> {
        if durable {
            let path = self.dir.join(format!("{id}.json"));
            let json = serde_json::to_vec(&status).expect("a status serializes");
            crate::durable::write_atomic(&path, &json, 0o600)?;
        }
        self.lock().insert(id.to_owned(), status.clone());
        let _ = self.events.send((id.to_owned(), status));
        Ok(())
    }

    async fn run(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<String>,
        stop: CancellationToken,
    ) {
        loop {
            let id = tokio::select! {
                _ = stop.cancelled() => return,
                id = rx.recv() => match id { Some(id) => id, None => return },
            };
            let mut delay = Duration::from_secs(1);
            for attempt in 1..=TRIES {
                let span = tracing::info_span!("upload", checkpoint = %id, attempt);
                let result = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = tracing::Instrument::instrument(self.upload(&id), span) => r,
                };
                match result {
                    Ok(()) => break,
                    Err(RemoteError::Checkpoint(why)) => {
                        // Deleted meanwhile, or unreadable: retrying will not help.
                        self.fail(&id, why, false);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(checkpoint = %id, attempt, error = %e, "upload failed");
                        self.fail(&id, e.to_string(), attempt < TRIES);
                        if attempt == TRIES {
                            break;
                        }
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay *= 2;
                    }
                }
            }
        }
    }

    fn fail(&self, id: &str, why: String, retrying: bool) {
        let mut s = self
            .status(id)
            .unwrap_or_else(|| UploadStatus::new(UploadState::Failed));
        s.state = UploadState::Failed;
        s.error = Some(why);
        s.retrying = retrying;
        s.updated = now();
        if let Err(e) = self.set(id, s, true) {
            tracing::warn!(checkpoint = %id, error = %e, "cannot record a failed upload");
        }
    }

    /// One upload of checkpoint `id`.
    async fn upload(&self, id: &str) -> Result<(), RemoteError> {
        let started = Instant::now();
        // 1. pin it and list its objects
        let (cps, id2) = (self.cps.clone(), id.to_owned());
        let (meta, pin, objects) = tokio::task::spawn_blocking(move || {
            let (meta, pin) = cps
                .pin_for_export(&id2)
                .map_err(|e| RemoteError::Checkpoint(e.to_string()))?;
            let objects = cps
                .objects_of(&meta, &pin)
                .map_err(|e| RemoteError::Checkpoint(e.to_string()))?;
            Ok::<_, RemoteError>((meta, pin, objects))
        })
        .await
        .map_err(|e| RemoteError::Checkpoint(e.to_string()))??;
        let mut status = UploadStatus::new(UploadState::Uploading);
        status.total_objects = objects.len() as u64;
        status.total_bytes = objects.iter().map(|(_, s)| s).sum();
        self.set(id, status.clone(), true)?;
        // 2. the lease (a `remote gc` keeps what it names), then no gc
        //    under way (see gc.rs)
        let mut record = Record {
            format: RECORD_FORMAT.into(),
            sprite: self.sprite.clone(),
            uploaded_at: now(),
            meta: serde_json::json!({"id": id}),
            objects,
        };
        self.remote.put_lease(&record).await?;
        if let Some(age) = self.remote.gc_lock_age().await?
            && age < super::gc::LOCK_TTL
        {
            return Err(RemoteError::GcRunning);
        }
        // 3. every object the bucket lacks; those an earlier record of
        //    this sprite names are there (a record that exists after our
        //    lease existed through any gc, which kept its objects)
        let known = self.known_present(id).await;
        let store = self.cps.env().store();
        let known = &known;
        let mut sends = futures_util::stream::iter(record.objects.iter().cloned())
            .map(|(oid, size)| async move {
                if known.contains(&oid) || self.remote.has(&oid).await? {
                    return Ok::<_, RemoteError>(None);
                }
                let (file, _) = store.open_object(&oid)?;
                self.remote.put_object(&oid, file, size).await?;
                Ok(Some(size))
            })
            .buffer_unordered(PARALLEL);
        let mut last = Instant::now();
        while let Some(sent) = sends.next().await {
            match sent? {
                Some(size) => {
                    status.objects += 1;
                    status.bytes += size;
                }
                None => status.present += 1,
            }
            if last.elapsed() >= PROGRESS_EVERY {
                last = Instant::now();
                status.updated = now();
                self.set(id, status.clone(), false)?;
            }
        }
        drop(sends);
        // 4. the record, last; then the lease goes
        record.uploaded_at = now();
        record.meta = serde_json::to_value(&meta).expect("metadata serializes");
        self.remote.put_record(&record).await?;
        if let Err(e) = self.remote.delete_lease(&self.sprite, id).await {
            tracing::warn!(error = %e, "the lease stays until it is stale");
        }
        drop(pin);
        status.state = UploadState::Uploaded;
        status.error = None;
        status.updated = now();
        self.set(id, status.clone(), true)?;
        tracing::info!(
            bytes = status.bytes,
            objects = status.objects,
            present = status.present,
            ms = started.elapsed().as_millis() as u64,
            "checkpoint uploaded"
        );
        Ok(())
    }
}

impl Uploads {
    /// The objects of the newest earlier checkpoint of this sprite that is
    /// uploaded and whose record is still in the bucket (none: ask the
    /// bucket about every object).
    async fn known_present(&self, id: &str) -> std::collections::HashSet<String> {
        let before = id_number(id);
        let prev = self
            .lock()
            .iter()
            .filter(|(i, s)| s.state == UploadState::Uploaded && id_number(i) < before)
            .map(|(i, _)| i.clone())
            .max_by_key(|i| id_number(i));
        let Some(prev) = prev else {
            return Default::default();
        };
        match self.remote.record(&self.sprite, &prev).await {
            Ok(r) => r.objects.into_iter().map(|(o, _)| o).collect(),
            Err(e) => {
                tracing::debug!(previous = %prev, error = %e, "no earlier record to trust");
                Default::default()
            }
        }
    }
}

/// `v12` → 12, for resuming in order.
fn id_number(id: &str) -> u64 {
    id.strip_prefix('v')
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}
