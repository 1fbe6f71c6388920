//! CRIU: the only module that spawns the `criu` binary.
//!
//! For now it detects CRIU at start (path, version, `criu check`) for
//! `/v1/status`; dump and restore come with process checkpoints.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::reaper::Reaper;

/// Where to look when no path is configured, in order (setup.sh installs a
/// source-built CRIU to the first when the distribution's fails `criu check`).
const SEARCH: &[&str] = &[
    "/usr/local/sbin/criu",
    "/usr/sbin/criu",
    "/usr/local/bin/criu",
    "/usr/bin/criu",
];

/// How long `criu check` may take before it is reported as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// What the daemon found at start, as reported by `/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct CriuSupport {
    /// Process checkpoints will be taken (binary found, `criu check` passed, not disabled).
    pub available: bool,
    /// `--no-criu` was given.
    pub disabled: bool,
    pub path: Option<PathBuf>,
    pub version: Option<String>,
    /// `criu check` said "Looks good".
    pub check_ok: bool,
    /// Why CRIU is unavailable, or the warning lines of `criu check`.
    pub message: Option<String>,
}

/// Finds CRIU: the configured path, else the first of [`SEARCH`], else `PATH`.
pub fn locate(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return Some(p.to_owned());
    }
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    SEARCH
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path_dirs).map(|d| d.join("criu")))
        .find(|p| p.is_file())
}

/// Detects CRIU and runs `criu check`.
#[tracing::instrument(name = "criu_detect", skip_all)]
pub async fn detect(reaper: &Reaper, configured: Option<&Path>, disabled: bool) -> CriuSupport {
    let none = |path: Option<PathBuf>, message: String| CriuSupport {
        available: false,
        disabled,
        path,
        version: None,
        check_ok: false,
        message: Some(message),
    };
    if disabled {
        return none(
            None,
            "disabled by --no-criu: checkpoints keep files only".into(),
        );
    }
    let Some(path) = locate(configured) else {
        return none(
            None,
            "criu not found (run scripts/setup.sh): checkpoints keep files only".into(),
        );
    };
    let version = match run(reaper, &path, &["--version"]).await {
        Ok((true, out)) => parse_version(&out),
        Ok((false, out)) => {
            return none(
                Some(path.clone()),
                format!("{} --version failed: {}", path.display(), last_line(&out)),
            );
        }
        Err(e) => {
            return none(
                Some(path.clone()),
                format!("cannot run {}: {e}", path.display()),
            );
        }
    };
    let (ok, out) = match run(reaper, &path, &["check"]).await {
        Ok(r) => r,
        Err(e) => return none(Some(path.clone()), format!("{} check: {e}", path.display())),
    };
    let check_ok = ok && out.contains("Looks good");
    let message = if check_ok {
        None
    } else {
        Some(format!("criu check failed: {}", error_line(&out)))
    };
    tracing::info!(path = %path.display(), version = version.as_deref().unwrap_or("?"), check_ok, "criu detected");
    CriuSupport {
        available: check_ok,
        disabled,
        path: Some(path),
        version,
        check_ok,
        message,
    }
}

async fn run(reaper: &Reaper, path: &Path, args: &[&str]) -> std::io::Result<(bool, String)> {
    let mut cmd = std::process::Command::new(path);
    cmd.args(args);
    let (exit, out) = reaper.output(&mut cmd, CHECK_TIMEOUT).await?;
    Ok((exit == crate::reaper::Exit::Code(0), out))
}

/// `Version: 4.1.1` → `4.1.1`.
pub fn parse_version(out: &str) -> Option<String> {
    out.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Version:")
            .map(|v| v.trim().to_owned())
    })
}

/// CRIU's own error line: the first line containing `Error` that is not a
/// report of a helper subprocess's exit, else the last line.
pub fn error_line(out: &str) -> String {
    out.lines()
        .find(|l| l.contains("Error") && !l.contains("exited, status="))
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| last_line(out))
}

fn last_line(out: &str) -> String {
    out.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_output() {
        assert_eq!(parse_version("Version: 4.1.1\n").as_deref(), Some("4.1.1"));
        assert_eq!(parse_version("GitID: x\n"), None);
        let out = "Warn (criu/kerndat.c:1285): x\nError (criu/util.c:642): exited, status=1\n\
                   Error (criu/vdso.c:300): Unexpected rt vDSO area bounds\nfoo\n";
        assert_eq!(
            error_line(out),
            "Error (criu/vdso.c:300): Unexpected rt vDSO area bounds"
        );
        assert_eq!(error_line("a\nlast\n\n"), "last");
    }

    #[tokio::test]
    async fn disabled_and_missing() {
        let reaper = Reaper::start().unwrap();
        let s = detect(&reaper, None, true).await;
        assert!(s.disabled && !s.available);
        let s = detect(&reaper, Some(Path::new("/nonexistent/criu")), false).await;
        assert!(!s.available);
        assert!(s.message.unwrap().contains("/nonexistent/criu"));
    }
}
