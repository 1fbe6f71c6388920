//! Test harness: starts the real `sprited` binary in a temp state dir and
//! talks to it over real HTTP (reqwest on TCP, hyper on the Unix socket).
//! Readiness is awaited through systemd's `NOTIFY_SOCKET` protocol, never by
//! sleeping.
#![allow(dead_code)]

pub mod counter;
pub mod weed;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use sprited::client::UnixClient;
use tempfile::TempDir;
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_sprited");
pub const CLI: &str = env!("CARGO_BIN_EXE_sprite-env");
pub const TOKEN: &str = "test-token-0123456789";
pub const NAME: &str = "testsprite";
/// Generous bound for a daemon to come up; only reached when something is broken.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether a privileged test can run (root). Every caller asserts it, and
/// is `#[ignore]`d where privileged tests cannot run (`privileged_tests`,
/// see build.rs), so a test asked to run without root fails, never passes.
pub fn privileged(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("SPRITED_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{what}: needs root, and SPRITED_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("{what}: needs root");
    false
}

/// Whether a test that needs CRIU can run, given where CRIU was `found`
/// (its callers assert it): without it, false, or a panic naming setup
/// under `require` (CI: `SPRITED_REQUIRE_PRIVILEGED=1`).
pub fn criu_gate(found: Option<PathBuf>, require: bool, what: &str) -> bool {
    if found.is_some() {
        return true;
    }
    if require {
        panic!(
            "{what}: criu not found (scripts/setup.sh installs it), and SPRITED_REQUIRE_PRIVILEGED=1 forbids skipping"
        );
    }
    eprintln!("{what}: criu not found");
    false
}

/// A privileged test that also needs CRIU.
pub fn with_criu(what: &str) -> bool {
    privileged(what)
        && criu_gate(
            sprited::criu::locate(None),
            std::env::var("SPRITED_REQUIRE_PRIVILEGED").as_deref() == Ok("1"),
            what,
        )
}

pub struct Options {
    pub token: Option<String>,
    pub extra: Vec<String>,
    pub state_dir: Option<PathBuf>,
    /// `--sprite-name` (default [`NAME`]).
    pub name: Option<String>,
    /// A network namespace (`ip netns` name) the daemon runs in.
    pub netns: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            token: Some(TOKEN.into()),
            extra: vec![],
            state_dir: None,
            name: None,
            netns: None,
        }
    }
}

pub struct Daemon {
    pub child: Child,
    /// Holds the temp dir (state dir, notify socket, log) alive.
    pub tmp: TempDir,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub tcp: Option<std::net::SocketAddr>,
    pub log: PathBuf,
    pub unix: UnixClient,
    pub http: reqwest::Client,
}

pub struct Spawned {
    pub child: Child,
    /// The `NOTIFY_SOCKET` line that means "started": `STATUS=running`, or
    /// `READY=1` (API answering) for a daemon held in `booting`.
    ready_line: &'static str,
    pub tmp: TempDir,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    notify: UnixDatagram,
}

/// Spawns the daemon without waiting for it.
pub fn spawn(opts: Options) -> Spawned {
    let tmp = tempfile::Builder::new()
        .prefix("sprited-test-")
        .tempdir()
        .unwrap();
    let state_dir = opts
        .state_dir
        .clone()
        .unwrap_or_else(|| tmp.path().join("state"));
    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log = tmp.path().join("daemon.log");
    let mut cmd = match &opts.netns {
        // (nsenter joins the namespace and execs the daemon: same pid)
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.arg("--state-dir")
        .arg(&state_dir)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--sprite-name",
            opts.name.as_deref().unwrap_or(NAME),
            "--log",
            "sprited=debug,info",
        ])
        .args(&opts.extra)
        // Tests of other things do not want their sprite to fall asleep
        // between two steps: sleep is off unless a test sets it.
        .args(
            (!opts.extra.iter().any(|a| a == "--auto-sleep"))
                .then_some(["--auto-sleep", "0"])
                .into_iter()
                .flatten(),
        )
        .env_remove("SPRITE_HTTP_API_TOKEN")
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
        ))
        .kill_on_drop(true);
    if let Some(t) = &opts.token {
        cmd.args(["--token", t]);
    }
    let child = cmd.spawn().expect("spawn sprited");
    let ready_line = if opts.extra.iter().any(|a| a == "--hold-booting") {
        "READY=1"
    } else {
        "STATUS=running"
    };
    Spawned {
        child,
        ready_line,
        tmp,
        state_dir,
        log,
        notify,
    }
}

impl Spawned {
    /// Waits until the daemon is started (or exits, which fails the test with its log).
    pub async fn ready(mut self) -> Daemon {
        let mut buf = [0u8; 512];
        let wait_ready = async {
            loop {
                let n = self.notify.recv(&mut buf).await.unwrap();
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == self.ready_line)
                {
                    return;
                }
            }
        };
        tokio::select! {
            _ = wait_ready => {}
            status = self.child.wait() => panic!("sprited exited before ready ({status:?}):\n{}", read(&self.log)),
            _ = tokio::time::sleep(START_TIMEOUT) => panic!("sprited not ready in {START_TIMEOUT:?}:\n{}", read(&self.log)),
        }
        let socket = self.state_dir.join("api.sock");
        let unix = UnixClient::new(&socket);
        let (_, status) = unix.get_json("/v1/status").await.unwrap();
        let tcp = status["listen"]["tcp"].as_str().map(|s| s.parse().unwrap());
        Daemon {
            child: self.child,
            tmp: self.tmp,
            state_dir: self.state_dir,
            socket,
            tcp,
            log: self.log,
            unix,
            http: reqwest::Client::new(),
        }
    }

    /// Waits for the daemon to exit (it is expected to fail) and returns its status and log.
    pub async fn exits(mut self) -> (ExitStatus, String) {
        let status = tokio::time::timeout(START_TIMEOUT, self.child.wait())
            .await
            .expect("daemon did not exit")
            .unwrap();
        (status, read(&self.log))
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Writes a checkpoint key (random, mode 0600) at `path`.
pub fn write_key(path: &Path) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut key).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(&key)
        .unwrap();
}

/// A checkpoint key several daemons of a test share, as a fleet's sprites
/// do (`--checkpoint-key`): they restore each other's processes.
pub struct FleetKey {
    dir: TempDir,
}

impl FleetKey {
    pub fn new() -> FleetKey {
        let dir = tempfile::Builder::new()
            .prefix("sprited-key-")
            .tempdir()
            .unwrap();
        write_key(&dir.path().join("fleet.key"));
        FleetKey { dir }
    }

    /// A daemon's options with this key.
    pub fn options(&self) -> Options {
        Options {
            extra: vec![
                "--checkpoint-key".into(),
                self.dir.path().join("fleet.key").display().to_string(),
            ],
            ..Default::default()
        }
    }
}

impl Daemon {
    pub async fn start() -> Daemon {
        spawn(Options::default()).ready().await
    }

    pub async fn start_with(opts: Options) -> Daemon {
        spawn(opts).ready().await
    }

    /// A daemon whose environment shares the host's network (`--network
    /// host`), for tests that reach a port inside from the host's loopback.
    pub async fn start_host_network() -> Daemon {
        spawn(Options {
            extra: vec!["--network".into(), "host".into()],
            ..Default::default()
        })
        .ready()
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.tcp.expect("daemon has no TCP listener"),
            path
        )
    }

    /// An authenticated GET on TCP.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
    }

    pub async fn status(&self) -> Value {
        let (code, v) = self.unix.get_json("/v1/status").await.unwrap();
        assert_eq!(code, 200);
        v
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("daemon already reaped") as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for exit after a signal; a daemon that hangs fails the test.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(s) => s.unwrap(),
            Err(_) => panic!("daemon did not exit:\n{}", self.log_text()),
        }
    }

    pub fn log_text(&self) -> String {
        read(&self.log)
    }

    /// Runs `sprite-env` against this daemon's socket.
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_command(args).output().await.unwrap()
    }

    /// A `sprite-env` command for this daemon's socket, to spawn as needed.
    pub fn cli_command<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: impl IntoIterator<Item = S>,
    ) -> Command {
        let mut c = Command::new(CLI);
        c.env("SPRITE_SOCKET", &self.socket)
            .args(args)
            .kill_on_drop(true);
        c
    }
}

/// Runs `sprite-env` against a socket where no daemon listens.
pub async fn cli_without_daemon(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(CLI)
        .env("SPRITE_SOCKET", socket)
        .args(args)
        .output()
        .await
        .unwrap()
}

impl Drop for Daemon {
    /// Stops the daemon as a user would (SIGTERM), so it removes its cgroups;
    /// SIGKILL only if it does not exit within 10 s.
    fn drop(&mut self) {
        if std::thread::panicking() {
            // (the test failed: the end of the daemon's log, before the
            // temp dir holding it goes)
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("--- the daemon's log, last 40 lines ---\n{tail}");
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Some(pid) = self.child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                // (longer than the 10 s a service's stop may take)
                wait_exit_for(&mut self.child, Duration::from_secs(20));
            }
            if self.child.start_kill().is_ok() {
                wait_exit_for(&mut self.child, Duration::from_secs(10));
            }
        }
        // A daemon killed (here or by its test) leaves its mounts: detach
        // them, or the temp dir cannot go and stays behind in /tmp.
        detach_mounts_under(self.tmp.path());
    }
}

fn wait_exit_for(child: &mut Child, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lazily unmounts every mount at or below `dir`, deepest first.
fn detach_mounts_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in points {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// An NDJSON response read one event at a time, as it streams.
pub struct Ndjson {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Ndjson {
    pub fn new(resp: reqwest::Response) -> Self {
        assert!(
            resp.status().is_success(),
            "stream answered {}",
            resp.status()
        );
        Ndjson {
            resp,
            buf: Vec::new(),
        }
    }

    /// The next event, or `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line).expect("NDJSON line"));
            }
            match tokio::time::timeout(Duration::from_secs(60), self.resp.chunk())
                .await
                .expect("stream stalled")
            {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => return None,
                Err(e) => panic!("stream error: {e}"),
            }
        }
    }

    /// Events until one matches `pred` (returned last); panics at the end.
    pub async fn until(&mut self, mut pred: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let Some(ev) = self.next().await else {
                let tail = &seen[seen.len().saturating_sub(20)..];
                panic!(
                    "stream ended before the awaited event; {} events, the last: {tail:?}",
                    seen.len()
                );
            };
            let done = pred(&ev);
            seen.push(ev);
            if done {
                return seen;
            }
        }
    }

    /// All remaining events.
    pub async fn collect(mut self) -> Vec<Value> {
        let mut all = Vec::new();
        while let Some(ev) = self.next().await {
            all.push(ev);
        }
        all
    }
}

impl Daemon {
    /// An authenticated request on TCP with an optional JSON body.
    pub async fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut r = self.http.request(method, self.url(path)).bearer_auth(TOKEN);
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send().await.unwrap()
    }

    /// `PUT /v1/services/{name}?duration=…` and its whole event stream.
    pub async fn put_service(&self, name: &str, spec: Value, duration: &str) -> Vec<Value> {
        let r = self
            .req(
                reqwest::Method::PUT,
                &format!("/v1/services/{name}?duration={duration}"),
                Some(spec),
            )
            .await;
        Ndjson::new(r).collect().await
    }

    pub async fn service(&self, name: &str) -> Value {
        let r = self.get(&format!("/v1/services/{name}")).await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Streams of a POST (start/stop/restart).
    pub async fn post_stream(&self, path: &str) -> Ndjson {
        Ndjson::new(self.req(reqwest::Method::POST, path, None).await)
    }
}

/// Whether something is mounted at `path` (the daemon's own check).
pub fn is_mounted(path: &Path) -> bool {
    sprited::sys::is_mount_point(Path::new("/proc/self/mountinfo"), path)
}

/// Whether `/proc/<pid>` exists (a zombie counts as gone).
pub fn alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Events of one type (and service) from a list.
pub fn of<'a>(events: &'a [Value], kind: &str, service: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["type"] == kind && e["service"] == service)
        .collect()
}

/// A tree walk: path → a line describing type, mode, owner, size, content
/// hash, mtime, symlink target, user xattrs, and which earlier path a file is
/// hard-linked to. Two equal maps mean equal trees.
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut inodes: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let mut xattrs: Vec<String> = if ft.is_symlink() {
                vec![]
            } else {
                xattr::list(&p)
                    .unwrap()
                    .filter(|n| n.to_string_lossy().starts_with("user."))
                    .map(|n| format!("{}={:?}", n.to_string_lossy(), xattr::get(&p, &n).unwrap()))
                    .collect()
            };
            xattrs.sort();
            let common = format!(
                "mode={:o} uid={} gid={} xattrs={xattrs:?}",
                md.mode() & 0o7777,
                md.uid(),
                md.gid()
            );
            let desc = if ft.is_dir() {
                stack.push(p.clone());
                format!("dir {common}")
            } else if ft.is_symlink() {
                format!(
                    "symlink -> {} uid={} mtime={}",
                    std::fs::read_link(&p).unwrap().display(),
                    md.uid(),
                    md.mtime()
                )
            } else if ft.is_file() {
                let hash: String = Sha256::digest(std::fs::read(&p).unwrap())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let link = if md.nlink() > 1 {
                    match inodes.get(&md.ino()) {
                        Some(first) => format!(" linked-to={first}"),
                        None => {
                            inodes.insert(md.ino(), rel.clone());
                            String::new()
                        }
                    }
                } else {
                    String::new()
                };
                format!(
                    "file {common} size={} sha256={hash} mtime={}.{}{link}",
                    md.size(),
                    md.mtime(),
                    md.mtime_nsec()
                )
            } else {
                format!("special {common} rdev={}", md.rdev())
            };
            out.insert(rel, desc);
        }
    }
    out
}

/// A `/proc/<pid>/status` figure in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: i32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

impl Daemon {
    /// The host pid of the process whose pid inside this daemon's
    /// environment is `pid` (the API reports pids as the environment sees
    /// them): found among the processes of the daemon's cgroups.
    pub async fn host_pid(&self, pid: i32) -> i32 {
        let parent = self.status().await["cgroup"]["parent"]
            .as_str()
            .expect("the daemon's cgroup")
            .to_owned();
        let mut dirs = vec![PathBuf::from(parent)];
        while let Some(dir) = dirs.pop() {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for host in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let status =
                    std::fs::read_to_string(format!("/proc/{host}/status")).unwrap_or_default();
                let inner = status
                    .lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .and_then(|l| l.split_whitespace().last())
                    .and_then(|p| p.parse::<i32>().ok());
                if inner == Some(pid) {
                    return host;
                }
            }
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        panic!("no process with pid {pid} in the environment");
    }

    /// The environment root this daemon mounted.
    pub fn env_root(&self) -> PathBuf {
        self.state_dir.join("root")
    }

    /// POSTs a streaming call and returns its events; the last must be `complete`.
    pub async fn post_to_complete(&self, path: &str, body: Option<Value>) -> Vec<Value> {
        let events = Ndjson::new(self.req(reqwest::Method::POST, path, body).await)
            .collect()
            .await;
        let last = events.last().map(|e| e["type"].clone());
        assert_eq!(
            last,
            Some("complete".into()),
            "{events:?}\n{}",
            self.log_text()
        );
        events
    }

    pub async fn checkpoint(&self, comment: &str) -> Vec<Value> {
        self.post_to_complete(
            "/v1/checkpoint",
            Some(serde_json::json!({"comment": comment})),
        )
        .await
    }

    pub async fn restore(&self, id: &str) -> Vec<Value> {
        self.post_to_complete(&format!("/v1/checkpoints/{id}/restore"), None)
            .await
    }
}

// --- WebSocket clients (exec sessions) -----------------------------------

use futures_util::StreamExt as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Bound on waits for things that should happen promptly; reached only
/// when something is broken.
pub const WAIT: Duration = Duration::from_secs(20);

pub async fn ws(
    d: &Daemon,
    path_and_query: &str,
) -> (Ws, tokio_tungstenite::tungstenite::http::HeaderMap) {
    let url = format!("ws://{}/v1/sprites/{NAME}{path_and_query}", d.tcp.unwrap());
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (s, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    (s, resp.headers().clone())
}

pub async fn next(s: &mut Ws) -> Message {
    match tokio::time::timeout(WAIT, s.next()).await {
        Ok(Some(Ok(m))) => m,
        other => panic!("no WebSocket message: {other:?}"),
    }
}

pub fn text(m: &Message) -> Option<Value> {
    match m {
        Message::Text(t) => serde_json::from_str(t.as_str()).ok(),
        _ => None,
    }
}

/// Waits (up to [`WAIT`]) until `cond` holds, checking it again each time
/// inotify reports `mask` on `watch` (never by polling on a timer).
pub async fn when(
    watch: &Path,
    mask: nix::sys::inotify::AddWatchFlags,
    what: &str,
    cond: impl FnMut() -> bool,
) {
    assert!(
        within(watch, mask, cond).await,
        "waited {WAIT:?} for {what}"
    );
}

/// [`when`], saying whether `cond` came true within [`WAIT`].
async fn within(
    watch: &Path,
    mask: nix::sys::inotify::AddWatchFlags,
    mut cond: impl FnMut() -> bool,
) -> bool {
    use nix::sys::inotify::{InitFlags, Inotify};
    use std::os::fd::AsFd;
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    ino.add_watch(watch, mask).unwrap();
    // (a duplicate registered with tokio; the events are read through `ino`)
    let fd = sprited::sys::async_fd(ino.as_fd().try_clone_to_owned().unwrap()).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        let Ok(ready) = tokio::time::timeout_at(deadline, fd.readable()).await else {
            return false;
        };
        let _ = ino.read_events();
        ready.unwrap().clear_ready();
    }
    true
}

impl Daemon {
    /// Waits until the daemon's log holds `needle` (the log is shown if not).
    pub async fn log_shows(&self, needle: &str) {
        let log = &self.log;
        let found = within(log, nix::sys::inotify::AddWatchFlags::IN_MODIFY, || {
            read(log).contains(needle)
        })
        .await;
        assert!(
            found,
            "waited {WAIT:?} for {needle:?} in the log:\n{}",
            read(log)
        );
    }
}

/// A free port on the loopback (bound, then released for a server to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tar inside a checkpoint archive, entry by entry.
#[allow(dead_code)]
pub fn archive_entries(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let tar = zstd::decode_all(archive).unwrap();
    let mut a = tar::Archive::new(tar.as_slice());
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

/// A network namespace made for a test (`ip netns add`, loopback up),
/// deleted on drop.
pub struct Netns(pub String);

/// Runs `ip args…`; a failure fails the test with its message.
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    pub fn new(name: String) -> Netns {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

/// The state letter of host thread `tid` (after the command's last `)`).
pub fn task_state(tid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether host process `pid` waits for its vfork child: asleep
/// uninterruptibly with a child (a `D` alone may be a page read while it
/// starts).
pub fn in_vfork(pid: i32) -> bool {
    task_state(pid) == Some('D')
        && std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .is_ok_and(|c| !c.trim().is_empty())
}

/// Waits (up to [`WAIT`]) until host process `pid` is in a vfork (polled:
/// nothing tells).
pub async fn until_in_vfork(pid: i32) {
    let deadline = std::time::Instant::now() + WAIT;
    while !in_vfork(pid) {
        assert!(std::time::Instant::now() < deadline, "never in the vfork");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
