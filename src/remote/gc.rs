//! `remote gc`: removes the objects no remote checkpoint references, while
//! other sprites may be uploading into the same bucket.
//!
//! The protocol is a mark-and-sweep made safe by leases, a lock and a
//! grace period:
//!
//! - An upload first writes a *lease* (`leases/<sprite>/<id>.json`, the
//!   objects it will reference), then checks for the gc *lock*
//!   (`gc.lock`); while a fresh lock exists it does not start (it is
//!   retried). It deletes the lease once its record is written.
//! - A gc takes the lock, then reads every record and every lease younger
//!   than [`LEASE_TTL`], then lists the objects and deletes those that
//!   none of them names and that are older than the grace period.
//!
//! An upload that wrote its lease before the gc read the leases is seen;
//! one that wrote it after found the lock and waited. So a record never
//! names an object a gc removed. The grace period (default 1 h) also
//! spares objects of uploads from daemons that predate leases. A lock
//! older than [`LOCK_TTL`] is a gc that died: uploads go on.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;

use super::{Remote, RemoteError};

/// A lease older than this is an upload that died; it protects nothing.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// A gc lock older than this is a gc that died.
pub const LOCK_TTL: Duration = Duration::from_secs(3600);
/// Deletes at once.
const PARALLEL: usize = 16;

/// What a gc found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Checkpoint records and live leases read.
    pub records: u64,
    pub leases: u64,
    /// Objects in the bucket, and those a record or lease names.
    pub objects: u64,
    pub referenced: u64,
    /// Unreferenced objects removed (or that would be, with `dry_run`).
    pub deleted: u64,
    pub deleted_bytes: u64,
    /// Unreferenced objects younger than the grace period, kept.
    pub young: u64,
    pub dry_run: bool,
    pub ms: u64,
}

/// One gc of the bucket under the prefix.
#[tracing::instrument(name = "remote_gc", skip(remote))]
pub async fn collect(
    remote: &Remote,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport, RemoteError> {
    if !dry_run {
        remote.set_gc_lock(true).await?;
    }
    let result = sweep(remote, grace, dry_run).await;
    if !dry_run && let Err(e) = remote.set_gc_lock(false).await {
        tracing::warn!(error = %e, "the gc lock stays until it is stale");
    }
    result
}

async fn sweep(remote: &Remote, grace: Duration, dry_run: bool) -> Result<GcReport, RemoteError> {
    let started = Instant::now();
    let mut report = GcReport {
        dry_run,
        ..Default::default()
    };
    // 1. mark: what every record and every live lease names (after the lock)
    let mut live = HashSet::new();
    for (record, _) in remote.all_records(false).await? {
        report.records += 1;
        live.extend(record.objects.into_iter().map(|(id, _)| id));
    }
    for (lease, age) in remote.all_records(true).await? {
        if age > LEASE_TTL {
            let id = lease.meta["id"].as_str().unwrap_or_default().to_owned();
            if !dry_run {
                remote.delete_lease(&lease.sprite, &id).await?;
            }
            continue;
        }
        report.leases += 1;
        live.extend(lease.objects.into_iter().map(|(id, _)| id));
    }
    // 2. sweep: the rest, once past the grace period
    let mut doomed = Vec::new();
    for (id, size, age) in remote.all_objects().await? {
        report.objects += 1;
        if live.contains(&id) {
            report.referenced += 1;
        } else if age < grace {
            report.young += 1;
        } else {
            report.deleted += 1;
            report.deleted_bytes += size;
            doomed.push(id);
        }
    }
    if !dry_run {
        let mut deletes = futures_util::stream::iter(doomed)
            .map(|id| async move { remote.delete_object(&id).await })
            .buffer_unordered(PARALLEL);
        while let Some(r) = deletes.next().await {
            r?;
        }
    }
    report.ms = started.elapsed().as_millis() as u64;
    tracing::info!(?report, "remote gc done");
    Ok(report)
}
