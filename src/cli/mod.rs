//! `sprite-env`: the command-line client of the daemon's Unix socket.

mod exec;
mod transfer;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::BodyExt;
use hyper::Method;

use crate::client::{ClientError, UnixClient, error_message};

/// Exit status when the daemon answered with an HTTP error (as `curl --fail`).
pub const EXIT_HTTP_ERROR: u8 = 22;
/// Exit status when the daemon could not be reached (as curl's "couldn't connect").
pub const EXIT_CONNECT: u8 = 7;

/// Talk to sprited, the sprite's environment daemon, over its Unix socket.
#[derive(Debug, Parser)]
#[command(name = "sprite-env", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(
        long,
        env = "SPRITE_SOCKET",
        default_value = "/.sprite/api.sock",
        global = true,
        value_name = "PATH"
    )]
    pub socket: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

const AFTER_HELP: &str = "\
Examples:
  sprite-env status
  sprite-env curl /v1/status
  sprite-env curl -X PUT /v1/services/web -d '{\"cmd\":\"python3\",\"args\":[\"-m\",\"http.server\"]}'
  sprite-env curl /v1/services/web/logs?duration=30s      # streams as it arrives
  sprite-env services create db --cmd postgres --args -D,/var/lib/postgresql/data
  sprite-env services logs db --lines 20 --duration 1m
  sprite-env checkpoint create -m 'before the migration'
  sprite-env checkpoint restore v3
  sprite-env checkpoint export v3 -o v3.tar.zst             # then, on another sprite:
  sprite-env checkpoint import v3.tar.zst
  sprite-env exec -- sh -c 'echo hi; exit 3'                # exit status 3
  sprite-env exec -t -- bash                                # interactive; survives a disconnect
  sprite-env sessions list
  sprite-env sessions attach 12
  sprite-env proxy 8080 3000                                # localhost:8080 -> the sprite's port 3000

Exit status: 0 on success, 22 when the daemon answers with an HTTP error (the
message goes to stderr), 7 when the daemon cannot be reached, 2 on bad usage;
`exec` and `sessions attach` exit with the command's own exit status.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send a request to the API and stream the response body to stdout.
    Curl {
        /// Path and query, e.g. /v1/services or /v1/services/web/logs?lines=10.
        path: String,
        /// HTTP method (default GET, or POST when -d is given).
        #[arg(short = 'X', long = "request", value_name = "METHOD")]
        method: Option<String>,
        /// Request body; `@FILE` reads a file, `@-` reads stdin. Sent as JSON unless -H says otherwise.
        #[arg(short = 'd', long = "data", value_name = "BODY")]
        data: Option<String>,
        /// Extra header `Name: value` (repeatable).
        #[arg(short = 'H', long = "header", value_name = "HEADER")]
        headers: Vec<String>,
        /// Print the status line and response headers before the body.
        #[arg(short = 'i', long)]
        include: bool,
    },
    /// Show the daemon's status (state, version, kernel, cgroup and CRIU
    /// support, and `sleep`: running, warm or cold, since when and for how
    /// long). Does not wake a sleeping sprite.
    Status,
    /// Put the sprite to sleep now: warm (its processes frozen, memory
    /// kept), or with --cold dumped whole with CRIU and ended (its memory
    /// goes back to the machine). The next request wakes it.
    Sleep {
        /// Cold: dump and end the processes, not just freeze them.
        #[arg(long)]
        cold: bool,
    },
    /// Wake the sprite (thaw it, or restore its processes from a cold sleep).
    Wake,
    /// Manage services (long-running processes the daemon supervises).
    #[command(subcommand)]
    Services(ServicesCmd),
    /// Take, list, restore and delete checkpoints of the environment.
    #[command(subcommand, visible_alias = "checkpoints")]
    Checkpoint(CheckpointCmd),
    /// The shared remote store (the daemon's --remote): see also
    /// `checkpoint push`, `checkpoint pull` and `checkpoint list --remote`.
    #[command(subcommand)]
    Remote(RemoteCmd),
    /// Run a command in the sprite, streaming its output; exits with its status.
    #[command(after_help = "\
Without -t, stdin is forwarded and closed at its end, stdout and stderr stay
apart. With -t the command gets a terminal: the local one is put in raw mode
and its size follows yours; if the connection drops the session keeps
running (`sprite-env sessions attach ID` picks it up again).

Examples:
  sprite-env exec -- make test
  echo hello | sprite-env exec -- cat
  sprite-env exec -t --dir /srv/app -- bash
  sprite-env exec --env PATH=/usr/bin:/bin --env DEBUG=1 -- ./run.sh")]
    Exec {
        /// Give the command a terminal (interactive programs, shells).
        #[arg(short = 't', long)]
        tty: bool,
        /// Environment variable K=V (repeatable). As in the API, giving any
        /// --env replaces the whole environment: include PATH if needed.
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Working directory (default: the environment root).
        #[arg(long, value_name = "DIR")]
        dir: Option<String>,
        /// The command and its arguments (after `--`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true,
            value_name = "CMD"
        )]
        argv: Vec<String>,
    },
    /// List, attach to and kill exec sessions.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Forward 127.0.0.1:LOCAL_PORT here to REMOTE_PORT inside the sprite.
    Proxy {
        /// Local port to listen on (0 picks a free one and prints it).
        local_port: u16,
        /// Port inside the sprite (always on 127.0.0.1 there).
        remote_port: u16,
    },
}

/// Exec session commands.
#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// List sessions: id, terminal, whether a client is attached, command.
    List {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Attach to a session: replays recent output, then goes live.
    Attach { id: String },
    /// Signal a session and kill it if it outlives --timeout (streams progress).
    Kill {
        id: String,
        /// Signal to send first.
        #[arg(long, default_value = "SIGTERM")]
        signal: String,
        /// How long to wait before SIGKILL (e.g. 10s).
        #[arg(long, default_value = "10s")]
        timeout: String,
    },
}

/// Checkpoint commands. `create` and `restore` stream progress as NDJSON.
#[derive(Debug, Subcommand)]
pub enum CheckpointCmd {
    /// Checkpoint the environment now (files and service definitions; services keep running).
    Create {
        /// A note stored with the checkpoint.
        #[arg(long, short = 'm')]
        comment: Option<String>,
        /// Keep files only: no process state (services restart fresh on restore).
        #[arg(long)]
        files_only: bool,
    },
    /// List checkpoints, newest first (`--remote`: those in the shared
    /// bucket, of this sprite or of `--sprite NAME`, `*` for all).
    List {
        /// Only those descending from this checkpoint.
        #[arg(long, conflicts_with = "remote")]
        history: Option<String>,
        /// The checkpoints in the remote store (the daemon's --remote).
        #[arg(long)]
        remote: bool,
        /// With --remote: whose (a sprite's name, or `*` for every sprite).
        #[arg(long, requires = "remote")]
        sprite: Option<String>,
    },
    /// Upload a checkpoint to the remote store and follow the upload (every
    /// checkpoint is uploaded in the background anyway; this one is queued
    /// again, and only what the bucket lacks moves).
    Push {
        /// The checkpoint (`vN`).
        id: String,
    },
    /// Fetch a checkpoint from the remote store (any sprite's, under the
    /// same prefix) and add it as the next `vN`; then `checkpoint restore
    /// vN` runs it here. Forking a sprite is this on another machine.
    /// Every object is checked against its SHA-256; a failed pull keeps
    /// nothing.
    #[command(
        after_help = "Example:\n  sprite-env checkpoint list --remote --sprite web-1\n  sprite-env checkpoint pull web-1/v7\n  sprite-env checkpoint restore v3"
    )]
    Pull {
        /// SPRITE/ID, as `checkpoint list --remote` shows them.
        from: String,
    },
    /// Show one checkpoint.
    Get { id: String },
    /// Restore the environment to a checkpoint (its processes come back
    /// with it). An automatic checkpoint of the current state is taken
    /// first: `--undo` goes back to the newest one.
    #[command(arg_required_else_help = true)]
    Restore {
        /// The checkpoint (`vN`).
        #[arg(required_unless_present = "undo", conflicts_with = "undo")]
        id: Option<String>,
        /// Undo the last restore: restore the newest automatic checkpoint.
        #[arg(long)]
        undo: bool,
    },
    /// Delete a checkpoint and free what only it used.
    Delete { id: String },
    /// Write a checkpoint as one archive (zstd-compressed tar), to move it
    /// to another sprite or keep it off this machine.
    Export {
        id: String,
        /// Where to write it (`-` = stdout). Default: stdout when it is not
        /// a terminal, else `<id>.tar.zst`.
        #[arg(short = 'o', long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Add a checkpoint from an archive made by `export`, as the next vN
    /// (verified end to end; restore it with `checkpoint restore`).
    Import {
        /// The archive (`-` = stdin).
        file: PathBuf,
    },
}

/// The newest automatic checkpoint (taken before a restore).
async fn newest_auto(client: &UnixClient) -> Result<String, CliError> {
    let (status, body) = client.call(Method::GET, "/v1/checkpoints", None).await?;
    if !status.is_success() {
        return Err(CliError::Http {
            status: status.as_u16(),
            message: error_message(&body),
        });
    }
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    list.as_array()
        .into_iter()
        .flatten()
        .find(|c| c["is_auto"] == true)
        .and_then(|c| c["id"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| CliError::Http {
            status: 404,
            message: "no automatic checkpoint: nothing to undo (one is taken before each restore)"
                .into(),
        })
}

/// Runs a checkpoint command: the transfers stream files, the rest are one request.
async fn checkpoint(client: &UnixClient, cmd: CheckpointCmd) -> Result<(), CliError> {
    let one = |id: &str| format!("/v1/checkpoints/{}", enc(id));
    let (method, path, body) = match cmd {
        CheckpointCmd::Create {
            comment,
            files_only,
        } => (
            "POST",
            "/v1/checkpoint".into(),
            Some(
                serde_json::json!({
                    "comment": comment.unwrap_or_default(),
                    "processes": !files_only,
                })
                .to_string(),
            ),
        ),
        CheckpointCmd::List {
            remote: true,
            sprite,
            ..
        } => (
            "GET",
            with_query("/v1/remote/checkpoints".into(), &[("sprite", sprite)]),
            None,
        ),
        CheckpointCmd::List { history, .. } => (
            "GET",
            with_query("/v1/checkpoints".into(), &[("history", history)]),
            None,
        ),
        CheckpointCmd::Push { id } => return transfer::push(client, &one(&id), &id).await,
        CheckpointCmd::Pull { from } => {
            let Some((sprite, id)) = from.split_once('/') else {
                return Err(CliError::Usage(format!(
                    "{from:?}: say which sprite's checkpoint, as SPRITE/ID (e.g. web-1/v7)"
                )));
            };
            return transfer::pull(client, sprite, id).await;
        }
        CheckpointCmd::Get { id } => ("GET", one(&id), None),
        CheckpointCmd::Restore { id, undo } => {
            let id = match id {
                Some(id) if !undo => id,
                _ => newest_auto(client).await?,
            };
            eprintln!("restoring {id}");
            ("POST", one(&id) + "/restore", None)
        }
        CheckpointCmd::Delete { id } => ("DELETE", one(&id), None),
        CheckpointCmd::Export { id, output } => {
            return transfer::export(client, &one(&id), &id, output).await;
        }
        CheckpointCmd::Import { file } => return transfer::import(client, &file).await,
    };
    curl(client, &path, Some(method.to_owned()), body, &[], false).await
}

/// Service commands. Streaming ones print NDJSON events as they arrive.
#[derive(Debug, Subcommand)]
pub enum ServicesCmd {
    /// List services and their state.
    List,
    /// Show one service.
    Get { name: String },
    /// Create or update a service, start it, and stream its output for --duration.
    #[command(
        after_help = "Example:\n  sprite-env services create web --cmd python3 --args -m,http.server,8000 --http-port 8000"
    )]
    Create {
        name: String,
        /// Command to run.
        #[arg(long)]
        cmd: String,
        /// Arguments (comma-separated, or repeat the flag).
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        args: Vec<String>,
        /// Services to start first (comma-separated, or repeat).
        #[arg(long, value_delimiter = ',')]
        needs: Vec<String>,
        /// Environment variable K=V added to the service's environment (repeatable).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Working directory.
        #[arg(long)]
        dir: Option<String>,
        /// HTTP port the service listens on (one service may declare one).
        #[arg(long)]
        http_port: Option<u32>,
        /// How long to stream output after starting (e.g. 5s, 0).
        #[arg(long)]
        duration: Option<String>,
    },
    /// Stop and delete a service (its log file is kept).
    Delete { name: String },
    /// Start a service (and what it needs).
    Start {
        name: String,
        #[arg(long)]
        duration: Option<String>,
    },
    /// Stop a service: SIGTERM, then SIGKILL to its whole cgroup after --timeout.
    Stop {
        name: String,
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Restart a service.
    Restart {
        name: String,
        #[arg(long)]
        duration: Option<String>,
    },
    /// Send a signal (TERM, SIGHUP, 9, …) to a service's main process.
    Signal { name: String, signal: String },
    /// Print a service's log: the last --lines lines, then follow for --duration.
    Logs {
        name: String,
        #[arg(long)]
        lines: Option<usize>,
        #[arg(long)]
        duration: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RemoteCmd {
    /// Remove the objects in the bucket that no remote checkpoint of any
    /// sprite references. Safe while other sprites upload: an upload
    /// holds a lease on what it sends and waits while a gc holds the
    /// bucket's lock; unreferenced objects younger than --grace stay.
    #[command(
        after_help = "Examples:\n  sprite-env remote gc --dry-run\n  sprite-env remote gc --grace 0s"
    )]
    Gc {
        /// Unreferenced objects younger than this stay (1h, 30m, 0s).
        #[arg(long, default_value = "1h")]
        grace: String,
        /// Report what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Percent-encodes a path segment or query value.
pub(crate) fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn with_query(path: String, pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect();
    if q.is_empty() {
        path
    } else {
        format!("{path}?{}", q.join("&"))
    }
}

/// The request a service command makes: method, path, JSON body.
fn services_request(cmd: ServicesCmd) -> Result<(&'static str, String, Option<String>), CliError> {
    let svc = |n: &str| format!("/v1/services/{}", enc(n));
    Ok(match cmd {
        ServicesCmd::List => ("GET", "/v1/services".into(), None),
        ServicesCmd::Get { name } => ("GET", svc(&name), None),
        ServicesCmd::Create {
            name,
            cmd,
            args,
            needs,
            env,
            dir,
            http_port,
            duration,
        } => {
            let mut envs = serde_json::Map::new();
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| CliError::Usage(format!("--env {kv:?} is not K=V")))?;
                envs.insert(k.to_owned(), v.into());
            }
            let body = serde_json::json!({
                "cmd": cmd, "args": args, "needs": needs, "env": envs, "dir": dir, "http_port": http_port,
            });
            (
                "PUT",
                with_query(svc(&name), &[("duration", duration)]),
                Some(body.to_string()),
            )
        }
        ServicesCmd::Delete { name } => ("DELETE", svc(&name), None),
        ServicesCmd::Start { name, duration } => (
            "POST",
            with_query(svc(&name) + "/start", &[("duration", duration)]),
            None,
        ),
        ServicesCmd::Stop { name, timeout } => (
            "POST",
            with_query(svc(&name) + "/stop", &[("timeout", timeout)]),
            None,
        ),
        ServicesCmd::Restart { name, duration } => (
            "POST",
            with_query(svc(&name) + "/restart", &[("duration", duration)]),
            None,
        ),
        ServicesCmd::Signal { name, signal } => (
            "POST",
            "/v1/services/signal".into(),
            Some(serde_json::json!({"name": name, "signal": signal}).to_string()),
        ),
        ServicesCmd::Logs {
            name,
            lines,
            duration,
        } => (
            "GET",
            with_query(
                svc(&name) + "/logs",
                &[
                    ("lines", lines.map(|l| l.to_string())),
                    ("duration", duration),
                ],
            ),
            None,
        ),
    })
}

/// Entry point of the `sprite-env` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sprite-env: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // A read of stdin may still block in its thread: do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(CliError::Http { status, message }) => {
            eprintln!("sprite-env: HTTP {status}: {message}");
            ExitCode::from(EXIT_HTTP_ERROR)
        }
        Err(CliError::Client(e @ ClientError::Connect { .. })) => {
            eprintln!("sprite-env: {e}");
            ExitCode::from(EXIT_CONNECT)
        }
        Err(e) => {
            eprintln!("sprite-env: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("HTTP {status}: {message}")]
    Http { status: u16, message: String },
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

async fn run(cli: Cli) -> Result<u8, CliError> {
    let client = UnixClient::new(&cli.socket);
    match cli.command {
        Command::Exec {
            tty,
            env,
            dir,
            argv,
        } => {
            exec::exec(
                &client,
                exec::ExecArgs {
                    argv,
                    tty,
                    env,
                    dir,
                },
            )
            .await
        }
        Command::Sessions(SessionsCmd::Attach { id }) => exec::attach(&client, &id).await,
        Command::Sessions(SessionsCmd::List { json }) => {
            sessions_list(&client, json).await.map(|_| 0)
        }
        Command::Sessions(SessionsCmd::Kill {
            id,
            signal,
            timeout,
        }) => {
            let path = with_query(
                format!("/v1/exec/{}/kill", enc(&id)),
                &[("signal", Some(signal)), ("timeout", Some(timeout))],
            );
            curl(&client, &path, Some("POST".into()), None, &[], false)
                .await
                .map(|_| 0)
        }
        Command::Proxy {
            local_port,
            remote_port,
        } => exec::proxy(&client, local_port, remote_port)
            .await
            .map(|_| 0),
        Command::Curl {
            path,
            method,
            data,
            headers,
            include,
        } => curl(&client, &path, method, data, &headers, include)
            .await
            .map(|_| 0),
        Command::Checkpoint(cmd) => checkpoint(&client, cmd).await.map(|_| 0),
        Command::Services(cmd) => {
            let (method, path, body) = services_request(cmd)?;
            curl(&client, &path, Some(method.to_owned()), body, &[], false)
                .await
                .map(|_| 0)
        }
        Command::Sleep { cold } => {
            let path = if cold {
                "/v1/sleep?cold=true"
            } else {
                "/v1/sleep"
            };
            curl(&client, path, Some("POST".into()), None, &[], false)
                .await
                .map(|_| 0)
        }
        Command::Remote(RemoteCmd::Gc { grace, dry_run }) => {
            let body = serde_json::json!({"grace": grace, "dry_run": dry_run}).to_string();
            curl(
                &client,
                "/v1/remote/gc",
                Some("POST".into()),
                Some(body),
                &[],
                false,
            )
            .await
            .map(|_| 0)
        }
        Command::Wake => curl(&client, "/v1/wake", Some("POST".into()), None, &[], false)
            .await
            .map(|_| 0),
        Command::Status => {
            let (status, body) = client.call(Method::GET, "/v1/status", None).await?;
            if !status.is_success() {
                return Err(CliError::Http {
                    status: status.as_u16(),
                    message: error_message(&body),
                });
            }
            let v: serde_json::Value =
                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(0)
        }
    }
}

async fn sessions_list(client: &UnixClient, json: bool) -> Result<(), CliError> {
    let (status, body) = client.call(Method::GET, "/v1/exec", None).await?;
    if !status.is_success() {
        return Err(CliError::Http {
            status: status.as_u16(),
            message: error_message(&body),
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!(
        "{:<8} {:<4} {:<7} {:<25} COMMAND",
        "ID", "TTY", "ACTIVE", "CREATED"
    );
    for s in v["sessions"].as_array().into_iter().flatten() {
        let id = match &s["id"] {
            serde_json::Value::String(x) => x.clone(),
            other => other.to_string(),
        };
        let yes = |b: &serde_json::Value| {
            if b.as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            }
        };
        println!(
            "{:<8} {:<4} {:<7} {:<25} {}",
            id,
            yes(&s["tty"]),
            yes(&s["is_active"]),
            s["created"].as_str().unwrap_or(""),
            s["command"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

async fn curl(
    client: &UnixClient,
    path: &str,
    method: Option<String>,
    data: Option<String>,
    raw_headers: &[String],
    include: bool,
) -> Result<(), CliError> {
    if !path.starts_with('/') {
        return Err(CliError::Usage(format!("path {path:?} must start with /")));
    }
    let body = match data.as_deref() {
        None => Bytes::new(),
        Some("@-") => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map_err(|source| {
                CliError::Io {
                    what: "read stdin".into(),
                    source,
                }
            })?;
            Bytes::from(buf)
        }
        Some(d) if d.starts_with('@') => {
            Bytes::from(std::fs::read(&d[1..]).map_err(|source| CliError::Io {
                what: format!("read {}", &d[1..]),
                source,
            })?)
        }
        Some(d) => Bytes::from(d.to_owned()),
    };
    let method = match method {
        Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| CliError::Usage(format!("bad method {m:?}")))?,
        None if data.is_some() => Method::POST,
        None => Method::GET,
    };
    let mut headers = Vec::new();
    for h in raw_headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| CliError::Usage(format!("header {h:?} is not `Name: value`")))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    if data.is_some()
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        headers.push(("content-type".into(), "application/json".into()));
    }
    let resp = client.send(method, path, &headers, body).await?;
    let status = resp.status();
    if include {
        println!("HTTP/1.1 {status}");
        for (k, v) in resp.headers() {
            println!("{k}: {}", v.to_str().unwrap_or("<binary>"));
        }
        println!();
    }
    if !status.is_success() {
        let bytes = client.read_all(resp).await?;
        return Err(CliError::Http {
            status: status.as_u16(),
            message: error_message(&bytes),
        });
    }
    let mut body = resp.into_body();
    let mut out = std::io::stdout().lock();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|source| ClientError::Http {
            path: client.socket().to_owned(),
            source,
        })?;
        if let Some(chunk) = frame.data_ref() {
            out.write_all(chunk)
                .and_then(|_| out.flush())
                .map_err(|source| CliError::Io {
                    what: "write stdout".into(),
                    source,
                })?;
        }
    }
    Ok(())
}
