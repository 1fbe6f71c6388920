//! Start-up, the listeners, and shutdown: the wiring of all parts.
//!
//! Order on start: configuration → state dir lock (a second daemon on the same
//! state dir stops here) → TCP listener → Unix socket (a stale one from a
//! crash is replaced; a live one is refused) → API served, `READY=1` → boot
//! task (cgroup and CRIU detection) → `running`. On SIGTERM/SIGINT: lifecycle
//! `shutting_down` (waiters answer 503 at once), long streams are cancelled,
//! in-flight requests get `--shutdown-timeout` to finish, the socket file is
//! removed, exit 0.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState, Transport};
use crate::cgroup::{CgroupSupport, Cgroups};
use crate::checkpoint::Checkpoints;
use crate::config::{Args, Config, ConfigError, TcpAuth};
use crate::fs::{Env, EnvConfig};
use crate::lifecycle::{Lifecycle, Transition};
use crate::reaper::Reaper;
use crate::statedir::{StateDir, StateDirError};
use crate::supervisor::{Supervisor, SupervisorConfig};
use crate::{criu, notify, sys};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("socket {path} is in use by a running process; stop it or choose another --socket")]
    SocketInUse { path: PathBuf },
    #[error("{op} socket {path}: {source}")]
    Socket {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(args: Args) -> Result<(), DaemonError> {
    let config = Config::from_args(&args)?;
    init_tracing(&args.log);
    // Connections, pipes and exec sessions each hold fds: the soft limit
    // (often 1024) goes up to the hard one.
    match sys::raise_fd_limit() {
        Ok(n) => tracing::debug!(limit = n, "open files"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let state_dir = StateDir::open(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sprited")
        .build()
        .map_err(DaemonError::Runtime)?;
    let result = runtime.block_on(serve(Arc::new(config), &state_dir));
    // Streams that ignored cancellation must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    result
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(io::stderr)
        .try_init();
}

async fn serve(config: Arc<Config>, state_dir: &StateDir) -> Result<(), DaemonError> {
    if !sys::is_root() {
        tracing::warn!("not running as root: cgroups, mounts and CRIU will be unavailable");
    }
    let tcp = match config.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Listen { addr, source })?,
        ),
        None => None,
    };
    let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
    if let (Some(addr), TcpAuth::Insecure) = (tcp_addr, &config.tcp_auth) {
        tracing::warn!(
            "!!! INSECURE: the TCP API on {addr} accepts requests WITHOUT A TOKEN (--insecure-no-token)."
        );
        tracing::warn!(
            "!!! Anyone who can reach {addr} controls this machine as root. Use only for local testing."
        );
    }
    let ingress = match config.http_ingress {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Listen { addr, source })?,
        ),
        None => None,
    };
    let ingress_addr = ingress.as_ref().and_then(|l| l.local_addr().ok());
    let unix = bind_unix_socket(&config.socket_path)?;
    let socket_id = socket_identity(&config.socket_path);

    // Signal handlers first: once READY=1 is out, a SIGTERM must be handled.
    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| DaemonError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| DaemonError::Signal {
        signal: "SIGINT",
        source,
    })?;
    let boot_gate = if config.hold_booting {
        Some(
            signal(SignalKind::user_defined2()).map_err(|source| DaemonError::Signal {
                signal: "SIGUSR2",
                source,
            })?,
        )
    } else {
        None
    };

    let reaper = Reaper::start().map_err(|source| DaemonError::Signal {
        signal: "SIGCHLD",
        source,
    })?;
    let lifecycle = Lifecycle::spawn();
    let shutdown = CancellationToken::new();
    let app = Arc::new(AppState {
        config: config.clone(),
        lifecycle: lifecycle.clone(),
        identity: state_dir.identity.clone(),
        checkpoint_key: state_dir.checkpoint_key.clone(),
        started: Instant::now(),
        started_at: SystemTime::now(),
        kernel: sys::kernel_release(),
        tcp_addr,
        ingress_addr,
        reaper,
        supervisor: OnceLock::new(),
        checkpoints: OnceLock::new(),
        env: OnceLock::new(),
        fs_error: OnceLock::new(),
        cgroups: OnceLock::new(),
        cgroup: OnceLock::new(),
        criu: OnceLock::new(),
        container: OnceLock::new(),
        sessions: OnceLock::new(),
        remote: OnceLock::new(),
        uploads: OnceLock::new(),
        ports: OnceLock::new(),
        sleep: crate::sleep::Sleep::new(config.auto_sleep, config.cold_after),
        shutdown: shutdown.clone(),
        policies: crate::policy::PolicyStore::new(&config.state_dir),
        watches: Default::default(),
    });

    let _ = app
        .ports
        .set(crate::ports::Ports::spawn(PathBuf::from("/proc")));
    if let Some(rc) = &config.remote {
        match crate::remote::Remote::new(rc.clone()) {
            Ok(remote) => {
                let remote = Arc::new(remote);
                let _ = app.remote.set(remote.clone());
                tokio::spawn(async move {
                    match remote.probe().await {
                        Ok(()) => tracing::info!("the remote store answers"),
                        Err(e) => tracing::error!(error = %e, "the remote store does not answer"),
                    }
                });
            }
            Err(e) => tracing::error!(error = %e, "remote store unavailable"),
        }
    }

    let mut servers = tokio::task::JoinSet::new();
    if let Some(listener) = tcp {
        let svc = api::service(app.clone(), Transport::Tcp);
        let stop = shutdown.clone();
        servers.spawn(async move {
            api::server::serve(listener, svc, stop).await;
            Ok::<(), io::Error>(())
        });
    }
    if let Some(listener) = ingress {
        let app = app.clone();
        servers.spawn(async move {
            api::ingress::serve(app, listener).await;
            Ok(())
        });
    }
    {
        let svc = api::service(app.clone(), Transport::Unix);
        let stop = shutdown.clone();
        servers.spawn(async move {
            api::server::serve(unix, svc, stop).await;
            Ok::<(), io::Error>(())
        });
    }
    tracing::info!(
        tcp = tcp_addr.map(|a| a.to_string()).unwrap_or_else(|| "disabled".into()),
        unix = %config.socket_path.display(),
        ingress = ingress_addr.map(|a| a.to_string()).unwrap_or_else(|| "disabled".into()),
        state_dir = %config.state_dir.display(),
        sprite = %config.sprite_name,
        "sprited {} listening", env!("CARGO_PKG_VERSION"),
    );
    notify::notify("READY=1\nSTATUS=booting");

    let boot = tokio::spawn(boot(app.clone(), boot_gate));

    let which = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutting down");
    notify::notify("STOPPING=1");
    let _ = lifecycle.request(Transition::Shutdown).await;
    boot.abort();
    // Wait until it really stopped: it may be mounting the environment.
    let _ = boot.await;
    shutdown.cancel();
    // Warm: thawed, so the services stop as usual. Cold stays cold (its
    // record and dump are kept for the next start).
    if app.sleep.depth() == crate::sleep::Depth::Warm
        && let Some(cps) = app.checkpoints.get()
    {
        cps.thaw_environment();
    }
    if let Some(sup) = app.supervisor.get() {
        sup.shutdown(config.shutdown_timeout).await;
    }
    if let Some(sessions) = app.sessions.get() {
        sessions.kill_all().await;
    }
    if let Some(container) = app.container.get() {
        container.kill().await;
        if let Some(net) = container.network() {
            net.teardown().await;
        }
    }
    if let Some(cps) = app.checkpoints.get() {
        cps.unmount_browsable();
    }
    if let Some(env) = app.env.get() {
        if let Err(e) = env.save_scan_cache() {
            tracing::warn!(error = %e, "cannot save the scan cache: the next first capture reads everything");
        }
        if let Err(e) = env.unmount() {
            tracing::warn!(error = %e, "cannot unmount the environment root");
        }
    }
    let drained = tokio::time::timeout(config.shutdown_timeout, async {
        while let Some(r) = servers.join_next().await {
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "server error during shutdown");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?config.shutdown_timeout, "in-flight requests did not finish; closing them");
        servers.abort_all();
    }
    remove_socket_if_ours(&config.socket_path, socket_id);
    if let Some(cg) = app.cgroups.get() {
        cg.remove_parent_if_empty();
    }
    tracing::info!("stopped");
    Ok(())
}

/// The boot sequence: detect cgroups and CRIU, then become `running` (or wait
/// for SIGUSR2 first when `--hold-booting` is given, for tests).
async fn boot(app: Arc<AppState>, gate: Option<tokio::signal::unix::Signal>) {
    let config = &app.config;
    match Cgroups::open(&config.mountinfo_path, &config.cgroup_parent) {
        Ok(cg) => {
            if let Err(e) = cg.favor_dynamic_moves(!config.no_cgroup_favordynmods) {
                tracing::warn!(error = %e, "cgroup moves may wait (the cgroup v2 mount was not remounted with favordynmods)");
            }
            let support = cg.support();
            tracing::info!(mount = %cg.mount().display(), parent = %cg.parent().display(),
                freeze = support.freeze, kill = support.kill, moves = ?support.moves, "cgroup v2");
            let _ = app.cgroup.set(support);
            // The stored memory limit holds again (none: lifted, in case
            // a crashed daemon left one).
            let max = app.policies.resources().and_then(|p| p.memory_max());
            if let Err(e) = cg.set_memory_limit(max) {
                tracing::error!(error = %e, "the resources policy cannot be enforced");
            }
            let _ = app.cgroups.set(cg);
        }
        Err(e) => {
            tracing::error!(error = %e, "cgroups unavailable: services cannot be supervised");
            let _ = app.cgroup.set(CgroupSupport::unavailable(&e));
        }
    }
    let env = match Env::open(EnvConfig {
        state_dir: config.state_dir.clone(),
        env_root: config.env_root.clone(),
        base: Some(config.env_base.clone()),
        mountinfo: config.mountinfo_path.clone(),
        layer_manifest: Some(crate::checkpoint::manifest_of),
    }) {
        Ok(env) => {
            let env = Arc::new(env);
            let _ = app.env.set(env.clone());
            Some(env)
        }
        Err(e) => {
            tracing::error!(error = %e, "environment root unavailable: checkpoints are disabled");
            let _ = app.fs_error.set(e.to_string());
            None
        }
    };
    // Cold when the daemon last stopped: nothing starts until a request
    // wakes the sprite (its processes come back from the dump).
    let cold = crate::checkpoint::cold_record_path(&config.state_dir).exists();
    if cold {
        tracing::info!("the sprite was asleep (cold): it stays so until a request wakes it");
    }
    let network = match &config.own_network {
        Some(upstreams) => match own_network(&app, upstreams).await {
            Ok(net) => Some(net),
            Err(e) => {
                tracing::error!(error = %e, "the environment's network cannot be made: the environment will not start");
                let _ = app
                    .fs_error
                    .set(format!("the environment's network cannot be made: {e}"));
                None
            }
        },
        None => None,
    };
    let container = match (&env, app.cgroups.get()) {
        (Some(_), Some(_)) if config.own_network.is_some() && network.is_none() => None,
        (Some(env), Some(cgroups)) => {
            match start_container(&app, env, cgroups, network, !cold).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!(error = %e, "the environment cannot start: services and commands will not run");
                    let _ = app.fs_error.set(e.to_string());
                    None
                }
            }
        }
        _ => None,
    };
    let _ = app
        .sessions
        .set(crate::exec::Sessions::new(crate::exec::SessionsConfig {
            cgroups: app.cgroups.get().cloned(),
            container: container.clone(),
            base_env: base_env(config),
        }));
    let supervisor = Supervisor::open(SupervisorConfig {
        state_dir: config.state_dir.clone(),
        cgroups: app.cgroups.get().cloned(),
        container,
        base_env: base_env(config),
        port_wait: config.wait_for_running,
        max_log_file: crate::supervisor::logs::DEFAULT_MAX_FILE,
    });
    let supervisor = match supervisor {
        Ok(s) => Some(app.supervisor.get_or_init(|| s).clone()),
        Err(e) => {
            tracing::error!(error = %e, "services unavailable");
            None
        }
    };
    let mut criu = criu::detect(&app.reaper, config.criu_path.as_deref(), config.no_criu).await;
    criu.incremental = criu.available && criu.dirty_tracking && !config.no_dirty_tracking;
    if !criu.available {
        tracing::warn!(
            reason = criu.message.as_deref().unwrap_or(""),
            "CRIU unavailable: checkpoints keep files only"
        );
    }
    let dumper = criu.path.clone().filter(|_| criu.available).map(|p| {
        criu::Criu::new(p, app.reaper.clone(), config.state_dir.join("criu-logs"))
            .with_version(criu.version.as_deref())
            .with_incremental(criu.incremental)
            .with_log_level(config.criu_log_level)
    });
    let _ = app.criu.set(criu);
    if let (Some(env), Some(sup)) = (env, &supervisor) {
        match Checkpoints::open(
            &config.state_dir,
            app.checkpoint_key.clone(),
            env,
            sup.clone(),
            dumper,
            app.container.get().cloned(),
        ) {
            Ok(c) => {
                if let Some(sessions) = app.sessions.get() {
                    c.set_sessions(sessions.clone());
                }
                c.set_policies(app.policies.clone());
                c.set_auto_keep(config.auto_keep);
                let c = Arc::new(c);
                let _ = app.checkpoints.set(c.clone());
                start_uploads(&app, config, c);
            }
            Err(e) => {
                tracing::error!(error = %e, "checkpoints unavailable");
                let _ = app.fs_error.set(e.to_string());
            }
        }
    }
    if let Some(sup) = supervisor.filter(|_| !cold) {
        sup.start_all().await;
    }
    if let Some(mut gate) = gate {
        tracing::info!("--hold-booting: staying in booting until SIGUSR2");
        gate.recv().await;
    }
    if app
        .lifecycle
        .request(Transition::BootComplete)
        .await
        .is_ok()
    {
        notify::notify("STATUS=running");
    }
    if let Some(cps) = app.checkpoints.get() {
        let since = cold.then(|| {
            cps.cold_record()
                .map_or_else(SystemTime::now, |r| r.since())
        });
        app.sleep.start(
            crate::sleep::Parts {
                checkpoints: cps.clone(),
                lifecycle: app.lifecycle.clone(),
            },
            since,
        );
    }
}

/// With --remote: the bucket's client (checked in the background: a wrong
/// endpoint or credentials are logged and shown in `/v1/status`, and the
/// daemon works on), and the uploads of every new checkpoint.
fn start_uploads(app: &Arc<AppState>, config: &Config, cps: Arc<Checkpoints>) {
    let Some(remote) = app.remote.get().cloned() else {
        return;
    };
    let uploads = crate::remote::Uploads::start(
        remote,
        cps.clone(),
        config.sprite_name.clone(),
        config.state_dir.join("remote"),
        app.shutdown.clone(),
    );
    match uploads {
        Ok(u) => {
            let u2 = u.clone();
            cps.set_on_publish(Box::new(move |id| {
                if let Err(e) = u2.enqueue(id) {
                    tracing::warn!(checkpoint = id, error = %e, "cannot queue the upload");
                }
            }));
            let _ = app.uploads.set(u);
        }
        Err(e) => tracing::error!(error = %e, "uploads unavailable"),
    }
}

/// Sets up the environment's container over the mounted root and starts
/// its init (killing whatever a crashed daemon left in the cgroups).
/// The environment's own network namespace (`--network own`), with the
/// stored network policy in force.
async fn own_network(
    app: &AppState,
    upstreams: &[SocketAddr],
) -> Result<Arc<crate::network::Network>, String> {
    let upstreams = if upstreams.is_empty() {
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        crate::network::nameservers(&conf)
    } else {
        upstreams.to_vec()
    };
    if upstreams.is_empty() {
        tracing::warn!(
            "no DNS upstream (--dns-upstream, /etc/resolv.conf): lookups from the environment will fail"
        );
    }
    let net = crate::network::Network::create(
        crate::network::NetworkConfig {
            daemon_id: app.config.daemon_id.clone(),
            upstreams,
            dir: app.config.state_dir.join("network"),
        },
        app.reaper.clone(),
    )
    .await
    .map_err(|e| e.to_string())?;
    if let Some(p) = app.policies.network() {
        net.apply(Some(p))
            .await
            .map_err(|e| format!("the stored network policy: {e}"))?;
    }
    Ok(net)
}

async fn start_container(
    app: &AppState,
    env: &Env,
    cgroups: &Cgroups,
    network: Option<Arc<crate::network::Network>>,
    start: bool,
) -> Result<crate::container::Container, String> {
    let config = &app.config;
    let checkpoints = config.state_dir.join("checkpoints");
    let logs = config.state_dir.join("logs").join("services");
    for d in [&checkpoints, &logs] {
        std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    let sprite_dir = config.state_dir.join("dot-sprite");
    crate::container::init::make_sprite_dir(&sprite_dir).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("find the daemon's binary: {e}"))?;
    let container = crate::container::Container::new(
        crate::container::ContainerConfig {
            setup: crate::container::init::Setup {
                root: env.root().to_owned(),
                hostname: config.sprite_name.clone(),
                exe,
                socket: config.socket_path.clone(),
                checkpoints,
                logs,
                sprite_dir,
            },
            cgroups: cgroups.clone(),
        },
        app.reaper.clone(),
    );
    if let Some(net) = network {
        container.set_network(net);
        if let Some(ports) = app.ports.get() {
            ports.set_net_dir(container.proc_net());
        }
    }
    if let Some(p) = app.policies.privileges() {
        match p.privileges() {
            Ok(privileges) => container.set_privileges(privileges),
            Err(e) => tracing::warn!(error = %e, "ignoring the stored privileges policy"),
        }
    }
    let _ = app.container.set(container.clone());
    if start {
        container.start().await.map_err(|e| e.to_string())?;
    } else {
        // (what a crashed daemon left goes all the same)
        container.kill().await;
    }
    Ok(container)
}

/// The environment every service starts from. The daemon's own environment
/// (which holds the API token) is not passed on.
fn base_env(config: &Config) -> Vec<(String, String)> {
    vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/.sprite/bin".into(),
        ),
        ("HOME".into(), "/root".into()),
        ("USER".into(), "root".into()),
        ("LOGNAME".into(), "root".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("SPRITE_NAME".into(), config.sprite_name.clone()),
    ]
}

/// Binds the API socket, mode 0600. A socket file left by a crashed daemon is
/// replaced; one that a live process still accepts on is refused.
fn bind_unix_socket(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |op, source| DaemonError::Socket {
        op,
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err("create dir for", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(DaemonError::SocketInUse {
                    path: path.to_owned(),
                });
            }
            tracing::info!(socket = %path.display(), "replacing stale socket left by a previous run");
            std::fs::remove_file(path).map_err(|e| err("remove stale", e))?;
        }
        Ok(_) => {
            return Err(err(
                "bind",
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a non-socket file is in the way",
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("stat", e)),
    }
    // Bind under a umask so the socket is never reachable by others, even briefly.
    let old = sys::set_umask(0o177);
    let listener = UnixListener::bind(path);
    sys::set_umask(old);
    let listener = listener.map_err(|e| err("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err("chmod", e))?;
    Ok(listener)
}

fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes the socket file unless something else replaced it meanwhile.
fn remove_socket_if_ours(path: &Path, id: Option<(u64, u64)>) {
    if id.is_some() && socket_identity(path) == id {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(socket = %path.display(), error = %e, "cannot remove socket");
        }
    }
}
