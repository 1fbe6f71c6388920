//! The state directory: created on start, locked so that one daemon owns it,
//! cleaned of what a crash left, and home of the sprite's identity record
//! and of its checkpoint key (unless `--checkpoint-key` puts it elsewhere).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::checkpoint::seal;
use crate::config::Config;
use crate::durable::{self, DurableError};
use crate::sys::{FileLock, LockError};

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "another sprited already owns state dir {state_dir}: lock {lock} is held{}",
        holder.map(|p| format!(" by pid {p}")).unwrap_or_default()
    )]
    Locked {
        state_dir: PathBuf,
        lock: PathBuf,
        holder: Option<u32>,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("identity record {path} is corrupt: {message}")]
    BadIdentity { path: PathBuf, message: String },
    #[error(
        "checkpoint key {path} holds {len} bytes: at least {} (and at most {}) are needed",
        seal::MIN_KEY_BYTES,
        MAX_KEY_BYTES
    )]
    BadKey { path: PathBuf, len: u64 },
    #[error(transparent)]
    Durable(#[from] DurableError),
}

/// The sprite's persistent identity, created on first start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    pub id: String,
    /// RFC 3339.
    pub created_at: String,
}

/// An owned state dir. Dropping it releases the lock.
#[derive(Debug)]
pub struct StateDir {
    pub path: PathBuf,
    pub identity: Identity,
    /// Seals the process images of checkpoints.
    pub checkpoint_key: seal::Key,
    _lock: FileLock,
}

impl StateDir {
    /// Creates the dir, takes its lock (failing fast when another daemon holds
    /// it), removes crash leftovers and loads or creates the identity.
    pub fn open(config: &Config) -> Result<Self, StateDirError> {
        let path = config.state_dir.clone();
        std::fs::create_dir_all(&path).map_err(io_err("create", &path))?;
        // Root's alone: the layers and the checkpoints' roots hold whatever
        // an import brought (setuid files, device nodes).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("chmod", &path))?;
        }
        let lock_path = config.lock_path();
        let (lock, mut file) = match FileLock::try_exclusive(&lock_path) {
            Ok(l) => l,
            Err(LockError::Held) => {
                let holder = std::fs::read_to_string(&lock_path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                return Err(StateDirError::Locked {
                    state_dir: path,
                    lock: lock_path,
                    holder,
                });
            }
            Err(LockError::Io(e)) => return Err(io_err("lock", &lock_path)(e)),
        };
        // The lock is ours: record our pid for the message a second daemon prints.
        file.set_len(0)
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(io_err("write", &lock_path))?;
        let cleaned = durable::clean_temp_files(&path)?;
        if cleaned > 0 {
            tracing::info!(cleaned, dir = %path.display(), "removed temp files left by a crash");
        }
        let identity = load_or_create_identity(&config.identity_path())?;
        let checkpoint_key = load_or_create_key(&config.checkpoint_key)?;
        Ok(StateDir {
            path,
            identity,
            checkpoint_key,
            _lock: lock,
        })
    }
}

fn load_or_create_identity(path: &Path) -> Result<Identity, StateDirError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateDirError::BadIdentity {
            path: path.to_owned(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let random =
                crate::sys::random_bytes(8).map_err(io_err("read", Path::new("/dev/urandom")))?;
            let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
            let identity = Identity {
                id: format!("sprite-{hex}"),
                created_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            };
            durable::write_json(path, &identity)?;
            Ok(identity)
        }
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// The most a key file may hold (a key is read whole).
const MAX_KEY_BYTES: u64 = 4096;

/// The checkpoint key at `path`, made (32 random bytes, mode 0600,
/// written atomically) when there is none.
fn load_or_create_key(path: &Path) -> Result<seal::Key, StateDirError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    match std::fs::File::open(path) {
        Ok(file) => {
            let meta = file.metadata().map_err(io_err("stat", path))?;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the checkpoint key can be read by others than its owner: whoever reads it can forge process images");
            }
            let mut bytes = Vec::new();
            file.take(MAX_KEY_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(io_err("read", path))?;
            let len = bytes.len() as u64;
            match seal::Key::new(bytes) {
                Some(key) if len <= MAX_KEY_BYTES => Ok(key),
                _ => Err(StateDirError::BadKey {
                    path: path.to_owned(),
                    len,
                }),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let random = crate::sys::random_bytes(seal::MIN_KEY_BYTES)
                .map_err(io_err("read", Path::new("/dev/urandom")))?;
            durable::write_atomic(path, &random, 0o600)?;
            tracing::info!(path = %path.display(), "made a checkpoint key");
            Ok(seal::Key::new(random).expect("a key of the minimum length"))
        }
        Err(e) => Err(io_err("open", path)(e)),
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateDirError + 'a {
    move |source| StateDirError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(dir: &Path) -> Config {
        let args = crate::config::Args::try_parse_from([
            "sprited",
            "--state-dir",
            dir.to_str().unwrap(),
            "--listen",
            "none",
            "--sprite-name",
            "t",
        ])
        .unwrap();
        Config::from_args(&args).unwrap()
    }

    #[test]
    fn lock_is_exclusive_and_identity_is_stable() {
        let d = tempfile::tempdir().unwrap();
        let c = config(&d.path().join("state"));
        let first = StateDir::open(&c).unwrap();
        match StateDir::open(&c) {
            Err(StateDirError::Locked { lock, holder, .. }) => {
                assert_eq!(lock, c.lock_path());
                assert_eq!(holder, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        let id = first.identity.id.clone();
        drop(first);
        let again = StateDir::open(&c).unwrap();
        assert_eq!(again.identity.id, id);
    }

    #[test]
    fn the_checkpoint_key_is_made_once_private_and_a_short_one_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let c = config(&d.path().join("state"));
        drop(StateDir::open(&c).unwrap());
        let made = std::fs::read(&c.checkpoint_key).unwrap();
        assert_eq!(made.len(), seal::MIN_KEY_BYTES);
        let mode = std::fs::metadata(&c.checkpoint_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(StateDir::open(&c).unwrap());
        assert_eq!(std::fs::read(&c.checkpoint_key).unwrap(), made, "kept");
        for len in [5, MAX_KEY_BYTES as usize + 1] {
            std::fs::write(&c.checkpoint_key, vec![1; len]).unwrap();
            match StateDir::open(&c) {
                Err(StateDirError::BadKey { len: l, .. }) => assert_eq!(l as usize, len.min(4097)),
                other => panic!("expected BadKey, got {other:?}"),
            }
        }
    }
}
