//! The remote store: an S3-compatible bucket a fleet of sprites shares
//! (SeaweedFS, or any S3). This module owns the bucket and the daemon's
//! bookkeeping of it (`<state>/remote/`); nothing else talks to it.
//!
//! ```text
//! s3://BUCKET/PREFIX/objects/<sha256>-<meta>                  store objects, shared by every sprite
//! s3://BUCKET/PREFIX/sprites/<sprite>/checkpoints/<id>.json   a checkpoint's record, written last
//! ```
//!
//! Objects are named by their content (the store's ids), so a bucket
//! shared by many sprites holds each once. A record names every object of
//! its checkpoint, in the order an import accepts them; it is written only
//! once they are all in the bucket, so a listed checkpoint is complete.
//! Requests go through `object_store` (its S3 client signs them and retries
//! server errors and timeouts with backoff).

pub(crate) mod upload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path as Key;
use serde::{Deserialize, Serialize};

pub use upload::{UploadState, UploadStatus, Uploads};

pub mod gc;
pub mod pull;

/// The format of a record.
pub const RECORD_FORMAT: &str = "sprited-remote/1";
/// Largest record read back (a record names every object of a checkpoint).
const MAX_RECORD: u64 = 64 << 20;
/// Objects up to this size go up in one request; bigger ones in parts.
const SINGLE_PUT: u64 = 32 << 20;
/// The size of a part of a multipart upload (S3's minimum is 5 MiB).
const PART: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("--remote {value:?}: {why}")]
    BadConfig { value: String, why: String },
    #[error("no remote store is configured (start the daemon with --remote s3://BUCKET/PREFIX)")]
    NotConfigured,
    #[error("the remote store: {op} {key}: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("remote checkpoint {sprite}/{id} not found")]
    NotFound { sprite: String, id: String },
    #[error("remote record {key}: {why}")]
    BadRecord { key: String, why: String },
    #[error("{0:?} is not a valid name ([A-Za-z0-9][A-Za-z0-9_.-]{{0,62}})")]
    BadName(String),
    #[error(transparent)]
    Io(#[from] crate::durable::DurableError),
    #[error(transparent)]
    Fs(#[from] crate::fs::FsError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A `remote gc` holds the bucket's lock: uploads wait (retried).
    #[error("a remote gc is running; the upload waits for it")]
    GcRunning,
    /// A pulled checkpoint is refused (bad remote data, a failed read, no
    /// room): nothing of it was kept.
    #[error("pull refused: {0}")]
    Pull(#[from] crate::archive::ArchiveError),
}

/// Where the remote store is and how to reach it (from the flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    pub bucket: String,
    /// Without leading or trailing slashes; may be empty.
    pub prefix: String,
    /// `http://127.0.0.1:8333` (none: AWS).
    pub endpoint: Option<String>,
    pub region: String,
    pub credentials: Credentials,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    /// Where they came from, for `/v1/status` (never the secret).
    pub source: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// `s3://BUCKET/PREFIX` → (bucket, prefix).
pub fn parse_url(url: &str) -> Result<(String, String), RemoteError> {
    let bad = |why: &str| RemoteError::BadConfig {
        value: url.to_owned(),
        why: why.to_owned(),
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("must start with s3://"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !bucket_ok {
        return Err(bad(
            "the bucket must be 3 to 63 lowercase letters, digits, dots or hyphens",
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|c| c == "." || c == "..")
        || prefix.contains("//")
        || prefix.len() > 512
        || prefix.bytes().any(|b| b.is_ascii_control())
    {
        return Err(bad(
            "the prefix must be plain path components (no . or .., at most 512 bytes)",
        ));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// Credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and
/// `AWS_SESSION_TOKEN`), else from a credentials file (`file`, else
/// `AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`; profile
/// `AWS_PROFILE` or `default`). `env` reads a variable (injected for tests).
pub fn credentials(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Credentials, RemoteError> {
    if let (Some(access_key), Some(secret_key)) =
        (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
    {
        return Ok(Credentials {
            access_key,
            secret_key,
            session_token: env("AWS_SESSION_TOKEN"),
            source: "environment (AWS_ACCESS_KEY_ID)".into(),
        });
    }
    let path = file
        .map(Path::to_owned)
        .or_else(|| env("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from))
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".aws/credentials")));
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let none = || RemoteError::BadConfig {
        value: "credentials".into(),
        why: "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give a credentials file \
              (--remote-credentials)"
            .into(),
    };
    let Some(path) = path else {
        return Err(none());
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && file.is_none() => {
            return Err(none());
        }
        Err(e) => {
            return Err(RemoteError::BadConfig {
                value: path.display().to_string(),
                why: format!("cannot read the credentials file: {e}"),
            });
        }
    };
    let values = ini_section(&text, &profile);
    let get = |k: &str| values.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(access_key), Some(secret_key)) => Ok(Credentials {
            access_key,
            secret_key,
            session_token: get("aws_session_token"),
            source: format!("file {} [{profile}]", path.display()),
        }),
        _ => Err(RemoteError::BadConfig {
            value: path.display().to_string(),
            why: format!("profile [{profile}] has no aws_access_key_id and aws_secret_access_key"),
        }),
    }
}

/// The `key = value` lines of section `[name]` of an INI text (AWS's
/// credentials file).
fn ini_section(text: &str, name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section.trim() == name;
            continue;
        }
        if inside && let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    out
}

/// A checkpoint's record in the bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub format: String,
    pub sprite: String,
    pub uploaded_at: String,
    /// The checkpoint's metadata, as its sprite has it.
    pub meta: serde_json::Value,
    /// Every object, in the order an import accepts them: (id, size).
    pub objects: Vec<(String, u64)>,
}

/// What a listing shows of a record.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteCheckpoint {
    pub sprite: String,
    pub id: String,
    pub create_time: serde_json::Value,
    pub source_id: serde_json::Value,
    pub comment: serde_json::Value,
    pub is_auto: serde_json::Value,
    pub health: serde_json::Value,
    pub services: serde_json::Value,
    pub uploaded_at: String,
    pub objects: usize,
    pub bytes: u64,
}

impl Record {
    /// What a listing shows of it.
    pub fn summary(&self) -> RemoteCheckpoint {
        let f = |k: &str| self.meta.get(k).cloned().unwrap_or(serde_json::Value::Null);
        RemoteCheckpoint {
            sprite: self.sprite.clone(),
            id: self.meta["id"].as_str().unwrap_or_default().to_owned(),
            create_time: f("create_time"),
            source_id: f("source_id"),
            comment: f("comment"),
            is_auto: f("is_auto"),
            health: f("health"),
            services: f("running"),
            uploaded_at: self.uploaded_at.clone(),
            objects: self.objects.len(),
            bytes: self.objects.iter().map(|(_, s)| s).sum(),
        }
    }
}

/// Reads one object of the bucket in ranges (see [`Remote::object_reader`]).
pub struct ObjectReader {
    store: Arc<dyn ObjectStore>,
    key: Key,
    size: u64,
    pos: u64,
    buf: bytes::Bytes,
    handle: tokio::runtime::Handle,
}

/// The range one request of an [`ObjectReader`] asks for.
const READ_RANGE: u64 = 8 << 20;

impl std::io::Read for ObjectReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            if self.pos >= self.size || out.is_empty() {
                return Ok(0);
            }
            let end = self.size.min(self.pos + READ_RANGE);
            let got = self
                .handle
                .block_on(self.store.get_range(&self.key, self.pos..end))
                .map_err(|e| std::io::Error::other(format!("get {}: {e}", self.key)))?;
            if got.len() as u64 != end - self.pos {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} is shorter than its record says ({} bytes at {})",
                        self.key,
                        got.len(),
                        self.pos
                    ),
                ));
            }
            self.pos = end;
            self.buf = got;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

/// The bucket, through `object_store`'s S3 client.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    config: RemoteConfig,
    last_error: std::sync::Mutex<Option<String>>,
}

impl Remote {
    pub fn new(config: RemoteConfig) -> Result<Remote, RemoteError> {
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.credentials.access_key)
            .with_secret_access_key(&config.credentials.secret_key)
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: 6,
                retry_timeout: Duration::from_secs(60),
            })
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            );
        if let Some(t) = &config.credentials.session_token {
            b = b.with_token(t);
        }
        if let Some(ep) = &config.endpoint {
            b = b
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let store = b.build().map_err(|e| RemoteError::BadConfig {
            value: format!("s3://{}/{}", config.bucket, config.prefix),
            why: e.to_string(),
        })?;
        Ok(Remote {
            store: Arc::new(store),
            config,
            last_error: Default::default(),
        })
    }

    pub fn config(&self) -> &RemoteConfig {
        &self.config
    }

    /// What `/v1/status` shows (no secrets).
    pub fn status(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "url": format!("s3://{}/{}", c.bucket, c.prefix),
            "endpoint": c.endpoint,
            "region": c.region,
            "credentials": c.credentials.source,
            "access_key_id": c.credentials.access_key,
            "last_error": *self.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    fn note(&self, r: Result<(), &RemoteError>) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        *last = r.err().map(|e| e.to_string());
    }

    fn key(&self, rel: &str) -> Key {
        if self.config.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.config.prefix))
        }
    }

    fn object_key(&self, id: &str) -> Key {
        self.key(&format!("objects/{id}"))
    }

    fn record_key(&self, sprite: &str, id: &str) -> Key {
        self.key(&format!("sprites/{sprite}/checkpoints/{id}.json"))
    }

    fn lease_key(&self, sprite: &str, id: &str) -> Key {
        self.key(&format!("leases/{sprite}/{id}.json"))
    }

    fn gc_lock_key(&self) -> Key {
        self.key("gc.lock")
    }

    fn err<'a>(
        op: &'static str,
        key: &'a Key,
    ) -> impl FnOnce(object_store::Error) -> RemoteError + 'a {
        move |source| RemoteError::Store {
            op,
            key: key.to_string(),
            source,
        }
    }

    /// Checks that the bucket answers with these credentials (a listing of
    /// at most one key).
    pub async fn probe(&self) -> Result<(), RemoteError> {
        let key = self.key("sprites");
        let r = self
            .store
            .list_with_delimiter(Some(&key))
            .await
            .map(|_| ())
            .map_err(Self::err("list", &key));
        self.note(r.as_ref().map(|_| ()));
        r
    }

    /// Whether the bucket holds object `id`.
    pub async fn has(&self, id: &str) -> Result<bool, RemoteError> {
        let key = self.object_key(id);
        match self.store.head(&key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Self::err("head", &key)(e)),
        }
    }

    /// Uploads object `id` from `file` (`size` bytes): one request, or
    /// parts of 16 MiB for a big one. Reads happen off the runtime.
    pub async fn put_object(
        &self,
        id: &str,
        file: std::fs::File,
        size: u64,
    ) -> Result<(), RemoteError> {
        let key = self.object_key(id);
        let r = self.put_file(&key, file, size).await;
        self.note(r.as_ref().map(|_| ()));
        r
    }

    async fn put_file(&self, key: &Key, file: std::fs::File, size: u64) -> Result<(), RemoteError> {
        let file = Arc::new(file);
        let read = |off: u64, len: usize| {
            let file = file.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, off)?;
                    Ok::<_, std::io::Error>(bytes::Bytes::from(buf))
                })
                .await
                .map_err(std::io::Error::other)?
            }
        };
        let io = |e: std::io::Error| RemoteError::Store {
            op: "read the object for",
            key: key.to_string(),
            source: object_store::Error::Generic {
                store: "local",
                source: Box::new(e),
            },
        };
        if size <= SINGLE_PUT {
            let data = read(0, size as usize).await.map_err(io)?;
            self.store
                .put(key, data.into())
                .await
                .map_err(Self::err("put", key))?;
            return Ok(());
        }
        let mut upload = self
            .store
            .put_multipart(key)
            .await
            .map_err(Self::err("start the upload of", key))?;
        let mut off = 0u64;
        while off < size {
            let len = (size - off).min(PART as u64) as usize;
            let data = match read(off, len).await {
                Ok(d) => d,
                Err(e) => {
                    let _ = upload.abort().await;
                    return Err(io(e));
                }
            };
            if let Err(e) = upload.put_part(data.into()).await {
                let _ = upload.abort().await;
                return Err(Self::err("upload a part of", key)(e));
            }
            off += len as u64;
        }
        upload
            .complete()
            .await
            .map_err(Self::err("complete the upload of", key))?;
        Ok(())
    }

    /// A blocking reader of object `id` (`size` bytes, from the record), in
    /// ranges of 8 MiB, each request retried by the client. Use it off the
    /// runtime (in `spawn_blocking`).
    pub fn object_reader(&self, id: &str, size: u64) -> ObjectReader {
        ObjectReader {
            store: self.store.clone(),
            key: self.object_key(id),
            size,
            pos: 0,
            buf: bytes::Bytes::new(),
            handle: tokio::runtime::Handle::current(),
        }
    }

    /// Writes the record of checkpoint `id` of `sprite`.
    pub async fn put_record(&self, record: &Record) -> Result<(), RemoteError> {
        let id = record.meta["id"].as_str().unwrap_or_default();
        let key = self.record_key(&record.sprite, id);
        let bytes = serde_json::to_vec(record).expect("a record serializes");
        let r = self
            .store
            .put(&key, bytes.into())
            .await
            .map(|_| ())
            .map_err(Self::err("put", &key));
        self.note(r.as_ref().map(|_| ()));
        r
    }

    /// The record of checkpoint `id` of `sprite` (hostile: checked).
    pub async fn record(&self, sprite: &str, id: &str) -> Result<Record, RemoteError> {
        for n in [sprite, id] {
            if !crate::config::valid_name(n) {
                return Err(RemoteError::BadName(n.to_owned()));
            }
        }
        self.read_record(&self.record_key(sprite, id), sprite, id)
            .await
    }

    /// Reads and checks the record (or lease) at `key`, which must be of
    /// checkpoint `id` of `sprite`.
    async fn read_record(&self, key: &Key, sprite: &str, id: &str) -> Result<Record, RemoteError> {
        let key = key.clone();
        let got = match self.store.get(&key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RemoteError::NotFound {
                    sprite: sprite.to_owned(),
                    id: id.to_owned(),
                });
            }
            Err(e) => return Err(Self::err("get", &key)(e)),
        };
        let bad = |why: String| RemoteError::BadRecord {
            key: key.to_string(),
            why,
        };
        if got.meta.size > MAX_RECORD {
            return Err(bad(format!("{} bytes is too big", got.meta.size)));
        }
        let bytes = got.bytes().await.map_err(Self::err("read", &key))?;
        let record: Record =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a record: {e}")))?;
        if record.format != RECORD_FORMAT {
            return Err(bad(format!(
                "format {:?} is not {RECORD_FORMAT:?}",
                record.format
            )));
        }
        if record.sprite != sprite || record.meta["id"].as_str() != Some(id) {
            return Err(bad("names another sprite or checkpoint".into()));
        }
        if let Some((o, _)) = record
            .objects
            .iter()
            .find(|(o, _)| !crate::fs::store::valid_id(o))
        {
            return Err(bad(format!("names a bad object {o:?}")));
        }
        Ok(record)
    }

    /// The sprites with records under the prefix.
    pub async fn sprites(&self) -> Result<Vec<String>, RemoteError> {
        let key = self.key("sprites");
        let listing = self
            .store
            .list_with_delimiter(Some(&key))
            .await
            .map_err(Self::err("list", &key))?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .filter(|n| crate::config::valid_name(n))
            .collect())
    }

    /// The remote checkpoints of `sprite`, newest first (by create time).
    pub async fn list(&self, sprite: &str) -> Result<Vec<RemoteCheckpoint>, RemoteError> {
        if !crate::config::valid_name(sprite) {
            return Err(RemoteError::BadName(sprite.to_owned()));
        }
        let key = self.key(&format!("sprites/{sprite}/checkpoints"));
        let mut ids = Vec::new();
        let mut listing = self.store.list(Some(&key));
        while let Some(item) = listing.next().await {
            let item = item.map_err(Self::err("list", &key))?;
            if let Some(id) = item
                .location
                .filename()
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|n| crate::config::valid_name(n))
            {
                ids.push(id.to_owned());
            }
        }
        let records = futures_util::stream::iter(ids)
            .map(|id| async move { self.record(sprite, &id).await })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
        let mut out = Vec::new();
        for r in records {
            match r {
                Ok(r) => out.push(r.summary()),
                // (deleted meanwhile)
                Err(RemoteError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| {
            b.create_time
                .as_str()
                .cmp(&a.create_time.as_str())
                .then(b.id.cmp(&a.id))
        });
        Ok(out)
    }

    /// Removes the record of checkpoint `id` of `sprite` (objects stay).
    pub async fn delete_record(&self, sprite: &str, id: &str) -> Result<(), RemoteError> {
        self.record(sprite, id).await?;
        let key = self.record_key(sprite, id);
        self.store
            .delete(&key)
            .await
            .map_err(Self::err("delete", &key))
    }

    /// Writes the lease of an upload about to start: the objects it will
    /// reference, which a `remote gc` keeps (see [`gc`]).
    pub async fn put_lease(&self, lease: &Record) -> Result<(), RemoteError> {
        let id = lease.meta["id"].as_str().unwrap_or_default();
        let key = self.lease_key(&lease.sprite, id);
        let bytes = serde_json::to_vec(lease).expect("a lease serializes");
        self.store
            .put(&key, bytes.into())
            .await
            .map(|_| ())
            .map_err(Self::err("put", &key))
    }

    /// Removes an upload's lease (its record is written, or it is stale).
    pub async fn delete_lease(&self, sprite: &str, id: &str) -> Result<(), RemoteError> {
        let key = self.lease_key(sprite, id);
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::err("delete", &key)(e)),
        }
    }

    /// How old the lock of a running `remote gc` is (none: no gc runs).
    pub async fn gc_lock_age(&self) -> Result<Option<Duration>, RemoteError> {
        let key = self.gc_lock_key();
        match self.store.head(&key).await {
            Ok(m) => Ok(Some(age(m.last_modified))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::err("head", &key)(e)),
        }
    }

    /// Takes (true) or drops (false) the lock of a `remote gc`.
    pub async fn set_gc_lock(&self, held: bool) -> Result<(), RemoteError> {
        let key = self.gc_lock_key();
        let r = if held {
            let body = serde_json::json!({"started": humantime::format_rfc3339(std::time::SystemTime::now()).to_string()});
            self.store
                .put(&key, body.to_string().into())
                .await
                .map(|_| ())
        } else {
            match self.store.delete(&key).await {
                Err(object_store::Error::NotFound { .. }) => Ok(()),
                r => r,
            }
        };
        r.map_err(Self::err(if held { "put" } else { "delete" }, &key))
    }

    /// Every record (`sprites/`) or lease (`leases/`) under the prefix with
    /// its age, each read and checked. An unreadable one is an error.
    pub async fn all_records(&self, leases: bool) -> Result<Vec<(Record, Duration)>, RemoteError> {
        let dir = self.key(if leases { "leases" } else { "sprites" });
        let mut found = Vec::new();
        let mut listing = self.store.list(Some(&dir));
        while let Some(item) = listing.next().await {
            let item = item.map_err(Self::err("list", &dir))?;
            let parts: Vec<String> = item
                .location
                .prefix_match(&dir)
                .map(|p| p.map(|s| s.as_ref().to_owned()).collect())
                .unwrap_or_default();
            let (sprite, id) = match parts.as_slice() {
                [sprite, id] if leases => (sprite, id),
                [sprite, c, id] if !leases && c == "checkpoints" => (sprite, id),
                _ => continue,
            };
            let Some(id) = id.strip_suffix(".json") else {
                continue;
            };
            found.push((
                item.location,
                sprite.clone(),
                id.to_owned(),
                age(item.last_modified),
            ));
        }
        let read = futures_util::stream::iter(found)
            .map(|(key, sprite, id, age)| async move {
                let r = self.read_record(&key, &sprite, &id).await;
                (r, age)
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
        let mut out = Vec::new();
        for (r, age) in read {
            match r {
                Ok(r) => out.push((r, age)),
                Err(RemoteError::NotFound { .. }) => {} // (deleted meanwhile)
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Every object under the prefix: id, size, age.
    pub async fn all_objects(&self) -> Result<Vec<(String, u64, Duration)>, RemoteError> {
        let dir = self.key("objects");
        let mut out = Vec::new();
        let mut listing = self.store.list(Some(&dir));
        while let Some(item) = listing.next().await {
            let item = item.map_err(Self::err("list", &dir))?;
            if let Some(id) = item.location.filename() {
                out.push((id.to_owned(), item.size, age(item.last_modified)));
            }
        }
        Ok(out)
    }

    /// Deletes object `id` (a `remote gc`).
    pub async fn delete_object(&self, id: &str) -> Result<(), RemoteError> {
        let key = self.object_key(id);
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::err("delete", &key)(e)),
        }
    }
}

/// Time since `t` (zero for a clock ahead of ours).
fn age(t: chrono::DateTime<chrono::Utc>) -> Duration {
    let now = std::time::SystemTime::now();
    now.duration_since(t.into()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_clean_prefix() {
        assert_eq!(
            parse_url("s3://fleet").unwrap(),
            ("fleet".into(), "".into())
        );
        assert_eq!(
            parse_url("s3://fleet/a/b/").unwrap(),
            ("fleet".into(), "a/b".into())
        );
        for bad in [
            "fleet/x",
            "s3://",
            "s3://UPPER/x",
            "s3://ab",
            "s3://-fleet",
            "s3://fleet/a/../b",
            "s3://fleet/a//b",
            "s3://fleet/a\nb",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_come_from_the_environment_then_the_file() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("credentials");
        std::fs::write(
            &file,
            "[default]\naws_access_key_id = AK1\naws_secret_access_key=SK1\n\n# c\n[other]\naws_access_key_id=AK2\naws_secret_access_key = SK2\n",
        )
        .unwrap();
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = credentials(
            Some(&file),
            &env(&[("AWS_ACCESS_KEY_ID", "E"), ("AWS_SECRET_ACCESS_KEY", "S")]),
        )
        .unwrap();
        assert_eq!((c.access_key.as_str(), c.secret_key.as_str()), ("E", "S"));
        let c = credentials(Some(&file), &env(&[])).unwrap();
        assert_eq!(
            (c.access_key.as_str(), c.secret_key.as_str()),
            ("AK1", "SK1")
        );
        let c = credentials(Some(&file), &env(&[("AWS_PROFILE", "other")])).unwrap();
        assert_eq!(
            (c.access_key.as_str(), c.secret_key.as_str()),
            ("AK2", "SK2")
        );
        assert!(credentials(Some(&file), &env(&[("AWS_PROFILE", "none")])).is_err());
        assert!(credentials(Some(&d.path().join("missing")), &env(&[])).is_err());
        assert!(credentials(None, &env(&[("HOME", "/nonexistent")])).is_err());
        assert!(!format!("{c:?}").contains("SK2"), "Debug hides the secret");
    }
}
