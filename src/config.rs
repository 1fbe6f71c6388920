//! Configuration: every flag, its environment variable and default, and every
//! path the daemon uses. All paths the daemon writes derive from one state dir,
//! so several daemons can run side by side in temp dirs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use sha2::{Digest, Sha256};

/// Errors in the daemon's configuration: reported before anything starts.
/// Where scripts/setup.sh builds the environment's default OS tree.
pub const DEFAULT_ENV_BASE: &str = "/var/lib/sprited/base";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    #[error("--listen {value:?} is not an address like 0.0.0.0:8181 (or `none` to disable TCP)")]
    BadListen { value: String },
    #[error("--http-ingress {value:?} is not an address like 0.0.0.0:8080")]
    BadIngress { value: String },
    #[error("--import-max-bytes {value:?} is not a size (`1073741824`, `512M`, `20G`)")]
    BadSize { value: String },
    #[error("--wait-for-running {value:?} is not a duration (`30`, `30s`, `1m`)")]
    BadDuration { value: String },
    #[error("--sprite-name {value:?} is not a valid name ([A-Za-z0-9][A-Za-z0-9_.-]{{0,62}})")]
    BadSpriteName { value: String },
    #[error(
        "--cgroup-parent {value:?} must be a relative path of plain names (no `..`, no leading `/`)"
    )]
    BadCgroupParent { value: String },
    #[error(
        "no API token: set SPRITE_HTTP_API_TOKEN or --token, or pass --insecure-no-token \
         (local testing only) or --listen none to serve the Unix socket only"
    )]
    NoToken,
    #[error("the API token is empty or contains whitespace")]
    BadToken,
    #[error("cannot determine the host name for the default sprite name: {0}")]
    Hostname(#[source] std::io::Error),
    #[error(
        "--env-base {base} contains the state dir {state} on the same filesystem: overlayfs refuses a lower \
         layer that contains another layer, so restores would fail. Put the state dir outside the base \
         tree, or on a filesystem of its own"
    )]
    BaseContainsState { base: PathBuf, state: PathBuf },
    #[error(
        "--env-base {base} is not a directory: scripts/setup.sh builds the default OS tree there, \
         or pass --env-base DIR (an OS tree: the environment's `/` before anything is written)"
    )]
    NoBase { base: PathBuf },
    #[error("--network {value:?} is not `host` or `own`")]
    BadNetwork { value: String },
    #[error("--dns-upstream {value:?} is not an IP address or IP:PORT")]
    BadDnsUpstream { value: String },
    #[error("state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `sprited`: the root daemon of a sprite.
///
/// It supervises services, runs commands, tunnels ports and takes and restores
/// checkpoints of the environment (files and running processes). It serves one
/// HTTP API on TCP (token required) and on a Unix socket (no token, mode 0600).
///
/// The environment is the machine: every service, command and terminal runs
/// inside a container whose `/` is an overlay of --env-base (own mount, PID,
/// UTS, IPC and network namespaces: see --network; its PID 1 is this binary's
/// init), with the API at /.sprite/api.sock and `sprite-env` on its PATH. Its
/// ports are reached through the proxy and the --http-ingress.
///
/// Every flag can also be set by the environment variable shown beside it.
#[derive(Debug, Clone, Parser)]
#[command(name = "sprited", version, about, long_about, after_help = AFTER_HELP)]
pub struct Args {
    /// Directory that holds all daemon state: lock, socket, logs, checkpoints.
    #[arg(
        long,
        env = "SPRITED_STATE_DIR",
        default_value = "/.sprite",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,

    /// TCP address of the authenticated API, or `none` to serve only the Unix socket.
    #[arg(
        long,
        env = "SPRITED_LISTEN",
        default_value = "0.0.0.0:8181",
        value_name = "ADDR"
    )]
    pub listen: String,

    /// Public HTTP listener (no token) that forwards every connection to the
    /// service declaring `http_port`, waiting up to --wait-for-running for the
    /// port to accept, so a request wakes a starting service. Default: off.
    #[arg(long, env = "SPRITED_HTTP_INGRESS", value_name = "ADDR")]
    pub http_ingress: Option<String>,

    /// Largest checkpoint an import or a pull accepts, expanded (`20G`,
    /// `512M`); past it a 413. Default: the free space of the state dir's
    /// filesystem less 1% of its size (256 MiB to 1 GiB), measured when the
    /// import starts; past it a 507.
    #[arg(long, env = "SPRITED_IMPORT_MAX_BYTES", value_name = "BYTES")]
    pub import_max_bytes: Option<String>,

    /// Unix socket of the API (no token needed; mode 0600). Default: <state-dir>/api.sock.
    #[arg(long, env = "SPRITE_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Bearer token required on TCP (compared in constant time).
    #[arg(
        long,
        env = "SPRITE_HTTP_API_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// Serve TCP without any token. For local testing only: anyone who can reach the port
    /// controls the machine.
    #[arg(long, env = "SPRITED_INSECURE_NO_TOKEN")]
    pub insecure_no_token: bool,

    /// This sprite's name; `/v1/sprites/{name}/...` answers 404 for any other. Default: host name.
    #[arg(long, env = "SPRITE_NAME", value_name = "NAME")]
    pub sprite_name: Option<String>,

    /// Public URL of this sprite, reported in its record (optional).
    #[arg(long, env = "SPRITE_URL", value_name = "URL")]
    pub url: Option<String>,

    /// Where the daemon mounts the environment's root (an overlayfs mount it
    /// owns; inside the environment it is `/`). Default: <state-dir>/root.
    #[arg(long, env = "SPRITED_ENV_ROOT", value_name = "DIR")]
    pub env_root: Option<PathBuf>,

    /// The read-only OS tree under the environment (the overlay's lower
    /// layer): what `/` holds before anything is written. scripts/setup.sh
    /// builds the default one from Debian packages (bash, coreutils,
    /// python3, curl, git, ...). On a VM, the VM's own root works too when
    /// the state dir is on another filesystem.
    #[arg(
        long,
        env = "SPRITED_ENV_BASE",
        value_name = "DIR",
        default_value = DEFAULT_ENV_BASE
    )]
    pub env_base: PathBuf,

    /// How long /exec and /proxy wait for the daemon to be running before answering 503.
    #[arg(
        long,
        env = "SPRITED_WAIT_FOR_RUNNING",
        default_value = "30",
        value_name = "SECS"
    )]
    pub wait_for_running: String,

    /// Sleep after this long without activity (API requests other than
    /// `GET /v1/status` and the sprite record, open exec WebSockets, proxy
    /// tunnels, ingress connections): the environment is frozen (warm).
    /// `0` never sleeps.
    #[arg(
        long,
        env = "SPRITED_AUTO_SLEEP",
        default_value = "30s",
        value_name = "DURATION"
    )]
    pub auto_sleep: String,

    /// After this long warm (or at once under memory pressure), the
    /// environment is dumped whole with CRIU and its processes end (cold):
    /// its memory goes back to the machine. The next request restores it.
    #[arg(
        long,
        env = "SPRITED_COLD_AFTER",
        default_value = "5m",
        value_name = "DURATION"
    )]
    pub cold_after: String,

    /// How many automatic checkpoints (taken before each restore, for
    /// `sprite-env checkpoint restore --undo`) are kept.
    #[arg(long, env = "SPRITED_AUTO_KEEP", default_value = "5", value_name = "N")]
    pub auto_keep: usize,

    /// Parent of the daemon's cgroups, relative to the cgroup v2 root.
    /// Default: sprited/<daemon-id>, where the id derives from the state dir.
    #[arg(long, env = "SPRITED_CGROUP_PARENT", value_name = "PATH")]
    pub cgroup_parent: Option<String>,

    /// Path of the criu binary. Default: /usr/local/sbin/criu, then criu on PATH, then /usr/sbin/criu.
    #[arg(long, env = "SPRITED_CRIU", value_name = "PATH")]
    pub criu: Option<PathBuf>,

    /// A bucket shared by a fleet of sprites (S3, SeaweedFS, MinIO, ...):
    /// every checkpoint is uploaded there in the background, and any sprite
    /// with the same --remote can list and pull it. Credentials come from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, else from
    /// --remote-credentials. Default: none.
    #[arg(long, env = "SPRITED_REMOTE", value_name = "s3://BUCKET/PREFIX")]
    pub remote: Option<String>,

    /// The S3 endpoint of --remote (`http://127.0.0.1:8333` for a local
    /// SeaweedFS; path-style requests). Default: AWS.
    #[arg(long, env = "SPRITED_REMOTE_ENDPOINT", value_name = "URL")]
    pub remote_endpoint: Option<String>,

    /// The region of --remote.
    #[arg(
        long,
        env = "SPRITED_REMOTE_REGION",
        default_value = "us-east-1",
        value_name = "REGION"
    )]
    pub remote_region: String,

    /// An AWS credentials file for --remote (profile AWS_PROFILE, else
    /// `default`). Default: AWS_SHARED_CREDENTIALS_FILE, else ~/.aws/credentials.
    #[arg(long, env = "SPRITED_REMOTE_CREDENTIALS", value_name = "FILE")]
    pub remote_credentials: Option<PathBuf>,

    /// The secret that authenticates the process images of checkpoints:
    /// each checkpoint's metadata carries an HMAC-SHA256 of its images made
    /// with it. CRIU restores images as root on the host, so a restore runs
    /// processes only from images this key authenticates; a checkpoint
    /// imported or pulled from a sprite with another key comes back as
    /// files, its services started afresh. Give every sprite of a fleet the
    /// same file to move running processes between them. At least 32
    /// bytes; made (32 random bytes, mode 0600) when missing.
    /// Default: <state-dir>/checkpoint.key.
    #[arg(long, env = "SPRITED_CHECKPOINT_KEY", value_name = "FILE")]
    pub checkpoint_key: Option<PathBuf>,

    /// Do not use CRIU: checkpoints keep files only.
    #[arg(long, env = "SPRITED_NO_CRIU")]
    pub no_criu: bool,

    /// How much CRIU writes to the log of each dump and restore (kept beside
    /// the images; a failed one's under <state-dir>/criu-logs): 0 nothing,
    /// 1 errors, 2 also warnings, 3 also progress, 4 also debugging. Every
    /// level names the error of a failed call; raise it to 4 to find out
    /// why one fails. A debugging log costs a 256 MiB dump some 20 ms.
    #[arg(
        long,
        env = "SPRITED_CRIU_LOG_LEVEL",
        default_value_t = 2,
        value_parser = clap::value_parser!(u8).range(0..=4),
        value_name = "0-4"
    )]
    pub criu_log_level: u8,

    /// Take every process dump whole, even where the kernel tracks dirty
    /// pages (by default a checkpoint then pre-dumps memory while the
    /// processes run and, frozen, writes only the pages dirtied since).
    #[arg(long, env = "SPRITED_NO_DIRTY_TRACKING")]
    pub no_dirty_tracking: bool,

    /// Leave the cgroup v2 mount as it is. By default the daemon remounts
    /// it with `favordynmods` (Linux 6.0+; every other option kept), for
    /// the whole machine: a process then moves between cgroups without
    /// waiting for an RCU grace period (5 to 16 ms each), which makes a
    /// restore some 5 ms faster; every fork and exit costs one atomic
    /// operation more. `/v1/status` says what was found (`cgroup.moves`).
    #[arg(long, env = "SPRITED_NO_CGROUP_FAVORDYNMODS")]
    pub no_cgroup_favordynmods: bool,

    /// How long a SIGTERM waits for in-flight requests before closing them.
    #[arg(
        long,
        env = "SPRITED_SHUTDOWN_TIMEOUT",
        default_value = "10",
        value_name = "SECS"
    )]
    pub shutdown_timeout: String,

    /// The environment's network: `own` (the default) gives it a network
    /// namespace of its own behind NAT, with the daemon as its DNS resolver
    /// and the network policy enforced by nftables in the VM's namespace,
    /// so a checkpoint's sockets come back wherever it is restored; `host`
    /// shares the VM's namespace (no network policy can be enforced, and
    /// the environment's ports are the VM's). `own` needs
    /// `ip`, `nft` and `ss`; turns IPv4 forwarding on in the daemon's
    /// namespace, and adds a veth pair (`spr…`, a /30 of 100.64.0.0/10) and
    /// an nftables table (`inet sprited_…`) there, removed at shutdown.
    /// With `own`, ports inside are reached through the proxy and the
    /// ingress, not on the VM's addresses.
    #[arg(
        long,
        env = "SPRITED_NETWORK",
        default_value = "own",
        value_name = "host|own"
    )]
    pub network: String,

    /// With `--network own`: where allowed DNS lookups are sent (IP or
    /// IP:PORT; repeat for more). Default: the nameservers of the VM's
    /// /etc/resolv.conf.
    #[arg(
        long,
        env = "SPRITED_DNS_UPSTREAM",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub dns_upstream: Vec<String>,

    /// Log filter (tracing syntax, e.g. `info`, `sprited=debug`).
    #[arg(
        long,
        env = "SPRITED_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,

    /// Test only: stay in `booting` until SIGUSR2 arrives.
    #[arg(long, hide = true)]
    pub hold_booting: bool,

    /// Test only: where the cgroup mount table is read from.
    #[arg(long, hide = true, default_value = "/proc/self/mountinfo")]
    pub mountinfo: PathBuf,
}

const AFTER_HELP: &str = "\
Examples:
  sprited --insecure-no-token                      # local testing, API on :8181 and /.sprite/api.sock
  SPRITE_HTTP_API_TOKEN=secret sprited             # production: TCP needs `Authorization: Bearer secret`
  sprited --state-dir /tmp/s1 --listen none      # Unix socket only, no token needed
  sprited --http-ingress 0.0.0.0:8080              # public HTTP to the service with http_port
  AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=… \
    sprited --remote s3://fleet/sprites --remote-endpoint http://127.0.0.1:8333
                                                   # upload every checkpoint to a shared bucket

Talk to it:
  sprite-env status
  curl --unix-socket /.sprite/api.sock http://sprite/v1/status
  curl -H 'Authorization: Bearer secret' http://localhost:8181/v1/status

Signals: SIGTERM or SIGINT stop it cleanly (exit 0, socket removed).";

/// `--remote` and its companions → where the bucket is and the credentials.
fn remote_config(args: &Args) -> Result<Option<crate::remote::RemoteConfig>, ConfigError> {
    let Some(url) = &args.remote else {
        return Ok(None);
    };
    let (bucket, prefix) = crate::remote::parse_url(url)?;
    if let Some(ep) = &args.remote_endpoint {
        let ok = (ep.starts_with("http://") || ep.starts_with("https://"))
            && !ep
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
        if !ok {
            return Err(crate::remote::RemoteError::BadConfig {
                value: ep.clone(),
                why: "--remote-endpoint must be an http:// or https:// URL".into(),
            }
            .into());
        }
    }
    let credentials = crate::remote::credentials(args.remote_credentials.as_deref(), &|k| {
        std::env::var(k).ok().filter(|v| !v.is_empty())
    })?;
    Ok(Some(crate::remote::RemoteConfig {
        bucket,
        prefix,
        endpoint: args.remote_endpoint.clone(),
        region: args.remote_region.clone(),
        credentials,
    }))
}

/// An API token. Its `Debug` never prints the secret.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(value: &str) -> Result<Self, ConfigError> {
        if value.is_empty() || value.chars().any(char::is_whitespace) {
            return Err(ConfigError::BadToken);
        }
        Ok(Token(value.to_owned()))
    }

    /// Constant-time comparison against a presented token.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        // Hash both sides first so the comparison does not leak the length.
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(presented);
        a.ct_eq(&b).into()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// How TCP requests are authenticated.
#[derive(Debug, Clone)]
pub enum TcpAuth {
    Token(Token),
    /// `--insecure-no-token`: every request is accepted.
    Insecure,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    pub http_ingress: Option<SocketAddr>,
    /// None: derived from the free space at each import.
    pub import_max_bytes: Option<u64>,
    pub socket_path: PathBuf,
    pub tcp_auth: TcpAuth,
    pub sprite_name: String,
    pub url: Option<String>,
    pub wait_for_running: Duration,
    pub shutdown_timeout: Duration,
    /// Zero: never.
    pub auto_sleep: Duration,
    pub cold_after: Duration,
    pub auto_keep: usize,
    /// Relative to the cgroup v2 mount.
    pub cgroup_parent: PathBuf,
    pub daemon_id: String,
    pub criu_path: Option<PathBuf>,
    /// The file of the key that authenticates process images.
    pub checkpoint_key: PathBuf,
    pub no_criu: bool,
    /// The shared bucket (none: no --remote).
    pub remote: Option<crate::remote::RemoteConfig>,
    pub no_dirty_tracking: bool,
    pub no_cgroup_favordynmods: bool,
    pub criu_log_level: u8,
    pub env_root: PathBuf,
    pub env_base: PathBuf,
    pub hold_booting: bool,
    pub mountinfo_path: PathBuf,
    /// `--network own`: the environment's own namespace, with these DNS
    /// upstreams (empty: the VM's resolvers).
    pub own_network: Option<Vec<SocketAddr>>,
}

impl Config {
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        let state_dir = absolute(&args.state_dir)?;
        let listen = match args.listen.trim() {
            "none" | "off" | "" => None,
            s => Some(s.parse().map_err(|_| ConfigError::BadListen {
                value: s.to_owned(),
            })?),
        };
        let http_ingress = match args.http_ingress.as_deref().map(str::trim) {
            None | Some("none" | "off" | "") => None,
            Some(s) => Some(s.parse().map_err(|_| ConfigError::BadIngress {
                value: s.to_owned(),
            })?),
        };
        let tcp_auth = match (&args.token, args.insecure_no_token) {
            (Some(t), _) if !t.is_empty() => TcpAuth::Token(Token::new(t)?),
            (_, true) => TcpAuth::Insecure,
            (_, false) if listen.is_none() => TcpAuth::Insecure, // no TCP listener at all
            (_, false) => return Err(ConfigError::NoToken),
        };
        let sprite_name = match &args.sprite_name {
            Some(n) => n.clone(),
            None => nix::unistd::gethostname()
                .map_err(|e| ConfigError::Hostname(e.into()))?
                .to_string_lossy()
                .into_owned(),
        };
        if !valid_name(&sprite_name) {
            return Err(ConfigError::BadSpriteName { value: sprite_name });
        }
        let env_base = absolute(&args.env_base)?;
        // Overlayfs refuses a lower dir holding the layers, unless they sit
        // on another filesystem mounted below it (a VM's own `/` as the base,
        // its state dir on a disk of its own).
        if state_dir.starts_with(&env_base) && same_filesystem(&state_dir, &env_base) {
            return Err(ConfigError::BaseContainsState {
                base: env_base,
                state: state_dir,
            });
        }
        if !env_base.is_dir() {
            return Err(ConfigError::NoBase { base: env_base });
        }
        let daemon_id = daemon_id_for(&state_dir);
        let cgroup_parent = match &args.cgroup_parent {
            Some(p) => {
                let path = PathBuf::from(p);
                let plain = path
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
                if !plain || p.is_empty() {
                    return Err(ConfigError::BadCgroupParent { value: p.clone() });
                }
                path
            }
            None => PathBuf::from("sprited").join(&daemon_id),
        };
        let checkpoint_key = match &args.checkpoint_key {
            Some(p) => absolute(p)?,
            None => state_dir.join("checkpoint.key"),
        };
        Ok(Config {
            socket_path: args
                .socket
                .clone()
                .unwrap_or_else(|| state_dir.join("api.sock")),
            state_dir,
            listen,
            http_ingress,
            import_max_bytes: args
                .import_max_bytes
                .as_deref()
                .map(|v| {
                    parse_size(v).ok_or_else(|| ConfigError::BadSize {
                        value: v.to_owned(),
                    })
                })
                .transpose()?,
            tcp_auth,
            sprite_name,
            url: args.url.clone(),
            wait_for_running: parse_secs(&args.wait_for_running)?,
            shutdown_timeout: parse_secs(&args.shutdown_timeout)?,
            auto_sleep: parse_secs(&args.auto_sleep)?,
            cold_after: parse_secs(&args.cold_after)?,
            auto_keep: args.auto_keep,
            cgroup_parent,
            daemon_id,
            criu_path: args.criu.clone(),
            checkpoint_key,
            env_root: match &args.env_root {
                Some(p) => absolute(p)?,
                None => absolute(&args.state_dir)?.join("root"),
            },
            env_base,
            no_criu: args.no_criu,
            remote: remote_config(args)?,
            no_dirty_tracking: args.no_dirty_tracking,
            no_cgroup_favordynmods: args.no_cgroup_favordynmods,
            criu_log_level: args.criu_log_level,
            hold_booting: args.hold_booting,
            mountinfo_path: args.mountinfo.clone(),
            own_network: match args.network.as_str() {
                "host" => None,
                "own" => Some(
                    args.dns_upstream
                        .iter()
                        .map(|a| {
                            a.parse::<SocketAddr>()
                                .or_else(|_| {
                                    a.parse::<std::net::IpAddr>()
                                        .map(|ip| SocketAddr::new(ip, 53))
                                })
                                .map_err(|_| ConfigError::BadDnsUpstream { value: a.clone() })
                        })
                        .collect::<Result<_, _>>()?,
                ),
                other => {
                    return Err(ConfigError::BadNetwork {
                        value: other.to_owned(),
                    });
                }
            },
        })
    }

    /// The lock that keeps a second daemon off this state dir.
    pub fn lock_path(&self) -> PathBuf {
        self.state_dir.join("sprited.lock")
    }

    /// The persisted identity of this sprite (id, creation time).
    pub fn identity_path(&self) -> PathBuf {
        self.state_dir.join("sprite.json")
    }
}

/// Names of sprites (and later services): `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Whether `a` (or, while it does not exist yet, its nearest existing
/// ancestor) is on the same filesystem as `b`.
fn same_filesystem(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| {
        p.ancestors()
            .find_map(|q| std::fs::metadata(q).ok())
            .map(|m| m.dev())
    };
    dev(a) == dev(b)
}

/// A short stable id for the daemon owning `state_dir`.
pub fn daemon_id_for(state_dir: &Path) -> String {
    let digest = Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `30`, `30s`, `1m`, `500ms`: a bare number is seconds.
/// Parses a size: bytes, or with a binary suffix `K`, `M`, `G`, `T`
/// (`512M` = 512 MiB).
///
/// ```
/// use sprited::config::parse_size;
/// assert_eq!(parse_size("512M"), Some(512 << 20));
/// assert_eq!(parse_size("1024"), Some(1024));
/// assert_eq!(parse_size("2g"), Some(2 << 30));
/// assert_eq!(parse_size("lots"), None);
/// ```
pub fn parse_size(value: &str) -> Option<u64> {
    let v = value.trim();
    let (num, shift) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 10),
        (i, 'm' | 'M') => (&v[..i], 20),
        (i, 'g' | 'G') => (&v[..i], 30),
        (i, 't' | 'T') => (&v[..i], 40),
        _ => (v, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

pub fn parse_secs(value: &str) -> Result<Duration, ConfigError> {
    parse_duration(value).ok_or_else(|| ConfigError::BadDuration {
        value: value.to_owned(),
    })
}

/// Parses a duration as the API and the SDKs write them: a bare number of
/// seconds (`5`, `2.5`) or Go-style units (`5s`, `5.0s`, `1m30s`, `250ms`,
/// `1h`, `100us`, `10ns`). Negative or absurd values (over 10 years) are refused.
///
/// ```
/// use std::time::Duration;
/// use sprited::config::parse_duration;
/// assert_eq!(parse_duration("5.0s"), Some(Duration::from_secs(5)));
/// assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
/// assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
/// assert_eq!(parse_duration("soon"), None);
/// ```
pub fn parse_duration(value: &str) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    if let Ok(secs) = v.parse::<f64>() {
        return secs_to_duration(secs);
    }
    let mut total = 0f64;
    let mut rest = v;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    secs_to_duration(total)
}

fn secs_to_duration(secs: f64) -> Option<Duration> {
    (secs.is_finite() && (0.0..=315_360_000.0).contains(&secs))
        .then(|| Duration::from_secs_f64(secs))
}

fn absolute(path: &Path) -> Result<PathBuf, ConfigError> {
    std::path::absolute(path).map_err(|source| ConfigError::StateDir {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["sprited", "--state-dir", "/tmp/x", "--sprite-name", "s1"];
        if !extra.contains(&"--env-base") {
            // Any existing dir outside the state dir (the default one is
            // built by setup.sh, which unit tests do not need).
            v.extend_from_slice(&["--env-base", "/usr"]);
        }
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn no_token_refused_unless_insecure_or_no_tcp() {
        assert!(matches!(
            Config::from_args(&args(&[])),
            Err(ConfigError::NoToken)
        ));
        let c = Config::from_args(&args(&["--insecure-no-token"])).unwrap();
        assert!(matches!(c.tcp_auth, TcpAuth::Insecure));
        let c = Config::from_args(&args(&["--listen", "none"])).unwrap();
        assert!(c.listen.is_none());
        let c = Config::from_args(&args(&["--token", "abc"])).unwrap();
        assert!(matches!(c.tcp_auth, TcpAuth::Token(_)));
    }

    #[test]
    fn paths_derive_from_state_dir() {
        let c = Config::from_args(&args(&["--token", "t"])).unwrap();
        assert_eq!(c.socket_path, PathBuf::from("/tmp/x/api.sock"));
        assert_eq!(c.lock_path(), PathBuf::from("/tmp/x/sprited.lock"));
        assert!(c.cgroup_parent.starts_with("sprited"));
        assert_eq!(
            c.cgroup_parent,
            PathBuf::from("sprited").join(daemon_id_for(Path::new("/tmp/x")))
        );
        assert_ne!(
            daemon_id_for(Path::new("/tmp/x")),
            daemon_id_for(Path::new("/tmp/y"))
        );
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::from_args(&args(&["--token", "t", "--listen", "nope"])).unwrap_err();
        assert!(e.to_string().contains("nope"));
        let e = Config::from_args(&args(&["--token", "t", "--cgroup-parent", "../x"])).unwrap_err();
        assert!(matches!(e, ConfigError::BadCgroupParent { .. }));
        let e =
            Config::from_args(&args(&["--token", "t", "--wait-for-running", "soon"])).unwrap_err();
        assert!(e.to_string().contains("soon"));
        assert!(matches!(Token::new("a b"), Err(ConfigError::BadToken)));
    }

    #[test]
    fn a_base_may_not_contain_the_state_dir() {
        let e = Config::from_args(&args(&["--listen", "none", "--env-base", "/"])).unwrap_err();
        assert!(matches!(e, ConfigError::BaseContainsState { .. }), "{e}");
        let base = tempfile::tempdir().unwrap();
        let base = base.path().to_str().unwrap();
        assert!(Config::from_args(&args(&["--listen", "none", "--env-base", base])).is_ok());
        let e = Config::from_args(&args(&["--listen", "none", "--env-base", "/no/such/base"]))
            .unwrap_err();
        assert!(matches!(e, ConfigError::NoBase { .. }), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5.0s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("1h2m"), Some(Duration::from_secs(3720)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("inf"), None);
        assert_eq!(parse_secs("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_secs("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_secs("250ms").unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn names() {
        assert!(valid_name("my-sprite.1_a"));
        assert!(!valid_name("-x"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"a".repeat(64)));
    }

    #[test]
    fn token_compare() {
        let t = Token::new("secret").unwrap();
        assert!(t.matches(b"secret"));
        assert!(!t.matches(b"secreT"));
        assert!(!t.matches(b"secret2"));
        assert!(!t.matches(b""));
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }
}
