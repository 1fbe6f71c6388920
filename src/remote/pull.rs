//! Pulls: a checkpoint from the bucket into the local chain, as the next
//! `vN`. Forking a sprite is a pull into another daemon.
//!
//! The plan: read the record (hostile: checked) → check its metadata as an
//! archive's → fetch the objects level by level (metadata → manifest,
//! images, page lists → shards, packs → files), 16 at a time; an object
//! the local store has is linked, not fetched; every fetched one is
//! checked against the SHA-256 its name carries and decoded as an
//! import decodes it → the caller publishes the staged checkpoint.
//! Objects wait in a staging dir until then: a failure leaves nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::watch;

use super::{Record, Remote, RemoteError};
use crate::archive::{ArchiveError, Fetch, Imported, Wanted};
use crate::checkpoint::{CheckpointMeta, Checkpoints};
use crate::fs::store::Staging;

/// Objects fetched at once.
const PARALLEL: usize = 16;

/// How far a pull is, for its progress events.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PullProgress {
    /// Objects and bytes fetched from the bucket.
    pub objects: u64,
    pub bytes: u64,
    /// Objects the local store had already.
    pub reused: u64,
    /// The checkpoint's objects and bytes in all (from its record).
    pub total_objects: u64,
    pub total_bytes: u64,
}

#[derive(Default)]
struct Counts {
    objects: AtomicU64,
    bytes: AtomicU64,
    reused: AtomicU64,
}

/// Fetches and checks the checkpoint of `record` (from
/// [`Remote::record`]) into a staging area:
/// the result is ready for [`Checkpoints::add_imported`]. `limit` bounds
/// the bytes it may add (as an import's).
#[tracing::instrument(name = "pull", skip_all,
    fields(sprite = %record.sprite, checkpoint = %record.meta["id"]))]
pub async fn fetch(
    remote: Arc<Remote>,
    cps: Arc<Checkpoints>,
    record: Record,
    limit: crate::archive::Limit,
    progress: watch::Sender<PullProgress>,
) -> Result<Imported, RemoteError> {
    let (mut fetch, sizes) = check_record(&record, limit)?;
    let total = PullProgress {
        total_objects: sizes.len() as u64,
        total_bytes: sizes.values().sum(),
        ..Default::default()
    };
    progress.send_replace(total.clone());
    let staging = Arc::new(cps.store().staging()?);
    let counts = Arc::new(Counts::default());
    let started = std::time::Instant::now();
    loop {
        let level = fetch.level();
        if level.is_empty() {
            break;
        }
        let mut results = futures_util::stream::iter(level)
            .map(|w| {
                let size = sizes.get(&w.id).copied();
                get_one(&remote, &cps, &staging, &counts, w, size)
            })
            .buffer_unordered(PARALLEL);
        while let Some(refs) = results.next().await {
            fetch.add(refs?);
            progress.send_replace(PullProgress {
                objects: counts.objects.load(Ordering::Relaxed),
                bytes: counts.bytes.load(Ordering::Relaxed),
                reused: counts.reused.load(Ordering::Relaxed),
                ..total.clone()
            });
        }
    }
    let staging = Arc::try_unwrap(staging)
        .map_err(|_| RemoteError::Checkpoint("the pull's staging area is still in use".into()))?;
    let (objects, bytes, reused) = (
        counts.objects.load(Ordering::Relaxed),
        counts.bytes.load(Ordering::Relaxed),
        counts.reused.load(Ordering::Relaxed),
    );
    tracing::info!(
        objects,
        bytes,
        reused,
        ms = started.elapsed().as_millis() as u64,
        "checkpoint fetched"
    );
    Ok(fetch.finish(staging, bytes, objects + reused, reused))
}

/// The record's metadata as a [`Fetch`], and the size of every object it
/// lists. Too big for `limit` is refused before anything moves.
fn check_record(
    record: &Record,
    limit: crate::archive::Limit,
) -> Result<(Fetch, HashMap<String, u64>), RemoteError> {
    let name = format!(
        "record {}/{}",
        record.sprite,
        record.meta["id"].as_str().unwrap_or_default()
    );
    let meta: CheckpointMeta =
        serde_json::from_value(record.meta.clone()).map_err(|e| RemoteError::BadRecord {
            key: name.clone(),
            why: format!("not valid checkpoint metadata: {e}"),
        })?;
    let sizes: HashMap<String, u64> = record.objects.iter().cloned().collect();
    let total = sizes.values().fold(0u64, |a, b| a.saturating_add(*b));
    if total > limit.bytes {
        return Err(ArchiveError::TooLarge { limit, entry: None }.into());
    }
    Ok((Fetch::new(meta, &name)?, sizes))
}

/// One object: linked from the local store, or fetched and checked.
/// Returns what it references.
async fn get_one(
    remote: &Remote,
    cps: &Arc<Checkpoints>,
    staging: &Arc<Staging>,
    counts: &Arc<Counts>,
    w: Wanted,
    size: Option<u64>,
) -> Result<Vec<Wanted>, RemoteError> {
    let size = size.ok_or_else(|| {
        RemoteError::Pull(ArchiveError::Invalid {
            entry: Some(format!("objects/{}", w.id)),
            why: "referenced by the checkpoint but not listed in its record".into(),
        })
    })?;
    let reader = remote.object_reader(&w.id, size);
    let (cps, staging, counts) = (cps.clone(), staging.clone(), counts.clone());
    let span = tracing::debug_span!("object", id = %w.id, size);
    tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        if let Some(refs) = w.from_store(cps.store(), &staging)? {
            counts.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(refs);
        }
        let mut reader = reader;
        let refs = w.stage(&staging, &mut reader, size)?;
        counts.objects.fetch_add(1, Ordering::Relaxed);
        counts.bytes.fetch_add(size, Ordering::Relaxed);
        Ok(refs)
    })
    .await
    .map_err(|e| RemoteError::Checkpoint(format!("a fetch task failed: {e}")))?
}
