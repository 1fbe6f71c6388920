//! `sprite-env checkpoint export|import`: archives streamed to and from
//! files, with a progress bar when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::BodyExt;
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};

use super::CliError;
use crate::client::{ClientError, UnixClient, error_message};

fn bar(total: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} {bytes_per_sec} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
    let what = what.into();
    move |source| CliError::Io { what, source }
}

/// Where the archive goes: a file written as `<file>.part` and renamed
/// when complete, or stdout.
enum Dest {
    Stdout,
    File { path: PathBuf, part: PathBuf },
}

/// `checkpoint export ID [-o FILE]`.
pub async fn export(
    client: &UnixClient,
    checkpoint_path: &str,
    id: &str,
    output: Option<PathBuf>,
) -> Result<(), CliError> {
    let dest = match output {
        Some(p) if p == Path::new("-") => Dest::Stdout,
        None if !std::io::stdout().is_terminal() => Dest::Stdout,
        other => {
            let path = other.unwrap_or_else(|| PathBuf::from(format!("{id}.tar.zst")));
            let mut part = path.clone().into_os_string();
            part.push(".part");
            Dest::File {
                path,
                part: part.into(),
            }
        }
    };
    let resp = client
        .send(
            Method::GET,
            &format!("{checkpoint_path}/export"),
            &[],
            Bytes::new(),
        )
        .await?;
    let resp = success(client, resp).await?;
    let http = |source| ClientError::Http {
        path: client.socket().to_owned(),
        source,
    };
    let mut body = resp.into_body();
    let mut out: Box<dyn Write> = match &dest {
        Dest::Stdout => Box::new(std::io::stdout().lock()),
        Dest::File { part, .. } => Box::new(std::io::BufWriter::new(
            std::fs::File::create(part).map_err(io_err(format!("create {}", part.display())))?,
        )),
    };
    let pb = bar(None);
    let mut total = 0u64;
    let result = async {
        while let Some(frame) = body.frame().await {
            // A failure mid-way (the daemon could not read an object) ends
            // the stream with an error: the archive is incomplete.
            let frame = frame.map_err(http)?;
            if let Some(chunk) = frame.data_ref() {
                out.write_all(chunk).map_err(io_err("write the archive"))?;
                total += chunk.len() as u64;
                pb.set_position(total);
            }
        }
        out.flush().map_err(io_err("write the archive"))?;
        Ok::<_, CliError>(())
    }
    .await;
    drop(out);
    pb.finish_and_clear();
    match (&dest, result) {
        (Dest::File { path, part }, Ok(())) => {
            std::fs::rename(part, path).map_err(io_err(format!("rename to {}", path.display())))?;
            eprintln!(
                "sprite-env: exported {id} to {} ({:.1} MiB)",
                path.display(),
                total as f64 / (1 << 20) as f64
            );
            Ok(())
        }
        (Dest::File { part, .. }, Err(e)) => {
            let _ = std::fs::remove_file(part);
            Err(e)
        }
        (Dest::Stdout, r) => r,
    }
}

/// `checkpoint import FILE`.
pub async fn import(client: &UnixClient, file: &Path) -> Result<(), CliError> {
    let (reader, size): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Option<u64>) =
        if file == Path::new("-") {
            (Box::new(tokio::io::stdin()), None)
        } else {
            let f = tokio::fs::File::open(file)
                .await
                .map_err(io_err(format!("open {}", file.display())))?;
            let size = f.metadata().await.ok().map(|m| m.len());
            (Box::new(f), size)
        };
    let pb = bar(size);
    let counter = pb.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024).inspect_ok(
        move |chunk: &Bytes| {
            counter.inc(chunk.len() as u64);
        },
    );
    let body = http_body_util::StreamBody::new(stream.map_ok(hyper::body::Frame::data));
    let headers = [("content-type".to_owned(), "application/zstd".to_owned())];
    let resp = client
        .send_body(Method::POST, "/v1/checkpoints/import", &headers, body)
        .await;
    pb.finish_and_clear();
    let resp = resp?;
    let status = resp.status();
    let bytes = client.read_all(resp).await?;
    if !status.is_success() {
        return Err(CliError::Http {
            status: status.as_u16(),
            message: error_message(&bytes),
        });
    }
    std::io::stdout()
        .write_all(&bytes)
        .map_err(io_err("write stdout"))?;
    Ok(())
}

/// `sprite-env checkpoint push vN`: queues the upload and follows it (a bar
/// on a terminal, else the NDJSON events on stdout).
pub async fn push(client: &UnixClient, checkpoint_path: &str, id: &str) -> Result<(), CliError> {
    follow(
        client,
        &format!("{checkpoint_path}/push"),
        id,
        "sent",
        |ev| {
            let r = ev.get("remote")?;
            let n = |k: &str| r.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            Some((n("total_objects"), n("objects") + n("present"), n("bytes")))
        },
    )
    .await
}

/// `sprite-env checkpoint pull SPRITE/ID`: fetches a remote checkpoint into
/// the local chain and follows it.
pub async fn pull(client: &UnixClient, sprite: &str, id: &str) -> Result<(), CliError> {
    let path = format!(
        "/v1/remote/checkpoints/{}/{}/pull",
        super::enc(sprite),
        super::enc(id)
    );
    follow(client, &path, &format!("{sprite}/{id}"), "fetched", |ev| {
        let p = ev.get("pull")?;
        let n = |k: &str| p.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        Some((n("total_objects"), n("objects") + n("reused"), n("bytes")))
    })
    .await
}

/// The response when it succeeded, else its error message as the error.
async fn success(
    client: &UnixClient,
    resp: hyper::Response<hyper::body::Incoming>,
) -> Result<hyper::Response<hyper::body::Incoming>, CliError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let bytes = client.read_all(resp).await?;
    Err(CliError::Http {
        status: status.as_u16(),
        message: error_message(&bytes),
    })
}

/// POSTs `path` and follows its NDJSON events to `complete` or `error`.
/// `counts` reads (objects in all, objects done, bytes moved) from an event.
async fn follow(
    client: &UnixClient,
    path: &str,
    what: &str,
    moved: &str,
    counts: impl Fn(&serde_json::Value) -> Option<(u64, u64, u64)>,
) -> Result<(), CliError> {
    let resp = client.send(Method::POST, path, &[], Bytes::new()).await?;
    let resp = success(client, resp).await?;
    let tty = std::io::stderr().is_terminal();
    let pb = if tty {
        ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} objects {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    } else {
        ProgressBar::hidden()
    };
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    let mut failed = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|source| ClientError::Http {
            path: client.socket().to_owned(),
            source,
        })?;
        let Some(chunk) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let ev: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
            if !tty {
                std::io::stdout()
                    .write_all(&line)
                    .map_err(io_err("write stdout"))?;
            }
            if let Some((len, pos, bytes)) = counts(&ev) {
                pb.set_length(len);
                pb.set_position(pos);
                pb.set_message(format!("{} {moved}", indicatif::HumanBytes(bytes)));
            }
            match ev["type"].as_str() {
                Some("complete") => {
                    pb.finish_and_clear();
                    if tty {
                        eprintln!("{}", ev["data"].as_str().unwrap_or_default());
                    }
                }
                Some("error") => {
                    failed = Some(ev["error"].as_str().unwrap_or("failed").to_owned());
                }
                _ => {}
            }
        }
    }
    pb.finish_and_clear();
    match failed {
        Some(message) => Err(CliError::Http {
            status: 502,
            message: format!("{what}: {message}"),
        }),
        None => Ok(()),
    }
}
