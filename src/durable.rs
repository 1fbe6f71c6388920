//! Crash-safe metadata writes: temp file in the same directory, fsync, rename,
//! fsync of the directory. A reader sees the old content or the new, never a
//! torn file; a crash leaves at most a `.tmp-*` file that [`clean_temp_files`]
//! removes on the next start.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Prefix of the temp files this module writes.
pub const TEMP_PREFIX: &str = ".tmp-";

/// An I/O failure, with the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct DurableError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

pub(crate) fn err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> DurableError + 'a {
    move |source| DurableError {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Atomically replaces `path` with `data` (file mode `mode`).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), DurableError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!("{TEMP_PREFIX}{}-{name}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err("create", &tmp))?;
        f.write_all(data).map_err(err("write", &tmp))?;
        f.sync_all().map_err(err("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(err("rename", path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Atomically writes `value` as pretty JSON.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), DurableError> {
    let data = serde_json::to_vec_pretty(value).map_err(|e| DurableError {
        op: "serialize",
        path: path.to_owned(),
        source: e.into(),
    })?;
    write_atomic(path, &data, 0o644)
}

/// fsyncs a directory so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("fsync dir", dir))
}

/// Removes the temp files (and temp dirs, with their content) a crash left
/// in `dir`; does not look in other subdirectories. Returns how many.
pub fn clean_temp_files(dir: &Path) -> Result<usize, DurableError> {
    let mut n = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(err("read dir", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(err("read dir", dir))?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let p = entry.path();
            // (a directory: a probe or staging dir a crash left)
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            }
            .map_err(err("remove", &p))?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_and_cleans() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::write(d.path().join(".tmp-99-a.json"), b"half").unwrap();
        fs::create_dir_all(d.path().join(".tmp-probe/inner")).unwrap();
        assert_eq!(clean_temp_files(d.path()).unwrap(), 2);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn error_names_path() {
        let e = write_atomic(Path::new("/nonexistent-dir/x"), b"", 0o600).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir"));
    }
}
