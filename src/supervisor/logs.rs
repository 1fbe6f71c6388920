//! Service logs: one file per service (`<name>.log`, one line per output line
//! as `<RFC 3339 ms> [stdout|stderr] <text>`), rotated by size with one old
//! file kept (`<name>.log.1`), plus a bounded in-memory tail for the logs
//! endpoint, primed from the file on start so history survives a restart.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Rotate a service's log file past this size.
pub const DEFAULT_MAX_FILE: u64 = 10 * 1024 * 1024;
/// The in-memory tail keeps at most this many lines…
const RING_LINES: usize = 5000;
/// …and at most this many bytes of text.
const RING_BYTES: usize = 2 * 1024 * 1024;
/// How much of the file's end primes the tail on start.
const PRIME_BYTES: u64 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogLine {
    pub timestamp_ms: u64,
    pub stream: Stream,
    /// The line's text, with its trailing newline.
    pub data: String,
}

struct Ring {
    lines: VecDeque<LogLine>,
    bytes: usize,
}

struct FileState {
    file: Option<File>,
    size: u64,
}

pub struct LogSink {
    path: PathBuf,
    max_file: u64,
    file: Mutex<FileState>,
    ring: Mutex<Ring>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl LogSink {
    /// Opens (creating) `path` for appending and primes the tail from it.
    pub fn open(path: PathBuf, max_file: u64) -> Self {
        let mut ring = Ring {
            lines: VecDeque::new(),
            bytes: 0,
        };
        if let Ok(text) = read_tail(&path, PRIME_BYTES) {
            for line in text.lines().filter_map(parse_line) {
                push(&mut ring, line);
            }
        }
        let (file, size) = match open_append(&path) {
            Ok(f) => {
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                (Some(f), size)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open service log");
                (None, 0)
            }
        };
        LogSink {
            path,
            max_file,
            file: Mutex::new(FileState { file, size }),
            ring: Mutex::new(ring),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line (to the file and the tail).
    pub fn append(&self, line: LogLine) {
        let text = line.data.strip_suffix('\n').unwrap_or(&line.data);
        let stamp =
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(line.timestamp_ms));
        let record = format!("{stamp} [{}] {text}\n", line.stream.as_str());
        {
            let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
            if f.size + record.len() as u64 > self.max_file && f.size > 0 {
                self.rotate(&mut f);
            }
            if let Some(file) = f.file.as_mut() {
                if file.write_all(record.as_bytes()).is_ok() {
                    f.size += record.len() as u64;
                }
            }
        }
        push(
            &mut self.ring.lock().unwrap_or_else(|e| e.into_inner()),
            line,
        );
    }

    fn rotate(&self, f: &mut FileState) {
        let old = self.path.with_extension("log.1");
        if let Err(e) = std::fs::rename(&self.path, &old) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate service log");
        }
        match open_append(&self.path) {
            Ok(file) => {
                f.file = Some(file);
                f.size = 0;
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot reopen service log");
                f.file = None;
            }
        }
    }

    /// The last `n` lines (all kept lines when `None`).
    pub fn tail(&self, n: Option<usize>) -> Vec<LogLine> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let skip = n.map(|n| ring.lines.len().saturating_sub(n)).unwrap_or(0);
        ring.lines.iter().skip(skip).cloned().collect()
    }
}

fn push(ring: &mut Ring, line: LogLine) {
    ring.bytes += line.data.len();
    ring.lines.push_back(line);
    while ring.lines.len() > RING_LINES || ring.bytes > RING_BYTES {
        match ring.lines.pop_front() {
            Some(l) => ring.bytes -= l.data.len(),
            None => break,
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn read_tail(path: &Path, max: u64) -> io::Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0 {
        // Drop the partial first line.
        text = text
            .split_once('\n')
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or_default();
    }
    Ok(text)
}

/// Parses one file line back into a [`LogLine`].
pub fn parse_line(line: &str) -> Option<LogLine> {
    let (stamp, rest) = line.split_once(' ')?;
    let (stream, text) = match rest.split_once(' ') {
        Some((s, t)) => (s, t),
        None => (rest, ""),
    };
    let stream = match stream {
        "[stdout]" => Stream::Stdout,
        "[stderr]" => Stream::Stderr,
        _ => return None,
    };
    let at = humantime::parse_rfc3339(stamp).ok()?;
    let timestamp_ms = at.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64;
    Some(LogLine {
        timestamp_ms,
        stream,
        data: format!("{text}\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: Stream, t: &str) -> LogLine {
        LogLine {
            timestamp_ms: 1_767_609_000_123,
            stream: s,
            data: format!("{t}\n"),
        }
    }

    #[test]
    fn round_trip_rotation_and_priming() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("svc.log");
        let sink = LogSink::open(p.clone(), 200);
        for i in 0..10 {
            sink.append(line(
                if i % 2 == 0 {
                    Stream::Stdout
                } else {
                    Stream::Stderr
                },
                &format!("line {i}"),
            ));
        }
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.lines().all(|l| l.contains("] line ")), "{text}");
        assert!(text.starts_with("2026-01-05T10:30:00.123Z ["), "{text}");
        assert!(
            d.path().join("svc.log.1").exists(),
            "rotated past 200 bytes"
        );
        assert!(std::fs::metadata(&p).unwrap().len() <= 200);
        let tail = sink.tail(Some(2));
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[1].data, "line 9\n");
        assert_eq!(tail[1].stream, Stream::Stderr);
        drop(sink);
        let again = LogSink::open(p, 200);
        let primed = again.tail(None);
        assert!(!primed.is_empty());
        assert_eq!(primed.last().unwrap().data, "line 9\n");
        assert_eq!(primed.last().unwrap().timestamp_ms, 1_767_609_000_123);
    }

    #[test]
    fn ring_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let sink = LogSink::open(d.path().join("x.log"), u64::MAX);
        for i in 0..(RING_LINES + 10) {
            sink.append(line(Stream::Stdout, &i.to_string()));
        }
        assert_eq!(sink.tail(None).len(), RING_LINES);
    }
}
