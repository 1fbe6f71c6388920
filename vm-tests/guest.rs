//! A Debian guest under QEMU running sprited: the image (built by
//! `scripts/vm-image.sh`), the accelerator (KVM when a guest really boots
//! with it, software emulation otherwise), the forwarded API port, the
//! serial console (the guest's journal goes there), the monitor (hard power
//! off) and the guest agent (commands in the guest without the daemon).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

pub const TOKEN: &str = "vm-test-token";
/// QEMU 7.2's TCG with `-cpu max` makes trixie's kernel oops at boot.
const TCG_CPU: &str = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt";
/// Boot to a running daemon: ~15 s under TCG here; generous for slow CI.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds (or reuses) the image of `suite`; returns its dir.
pub fn image(suite: &str) -> PathBuf {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_sprited")).parent().unwrap();
    let out = Command::new(repo().join("scripts/vm-image.sh"))
        .arg(suite)
        .env("SPRITED_BIN_DIR", bin_dir)
        .env("SPRITED_VM_TOKEN", TOKEN)
        .current_dir(repo())
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/vm-image.sh");
    assert!(out.status.success(), "scripts/vm-image.sh {suite} failed");
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_owned();
    repo().join(dir)
}

/// `kvm` when a guest kernel gets through its boot with it within seconds
/// (on this machine `/dev/kvm` exists but a nested guest hangs), else `tcg`.
/// `SPRITED_VM_ACCEL` forces one.
pub fn accel(image: &Path) -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| {
        match std::env::var("SPRITED_VM_ACCEL").as_deref() {
            Ok("kvm") => return "kvm",
            Ok("tcg") => return "tcg",
            _ => {}
        }
        if !Path::new("/dev/kvm").exists() {
            return "tcg";
        }
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let mut probe = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-m",
                "512",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(image.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.join("initrd.img"))
            .args(["-append", "console=ttyS0 panic=-1"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut works = false;
        while Instant::now() < deadline && !works {
            works = std::fs::read_to_string(&serial)
                .unwrap_or_default()
                .contains("Run /init as init process");
            if matches!(probe.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = probe.kill();
        let _ = probe.wait();
        let chosen = if works { "kvm" } else { "tcg" };
        eprintln!(
            "vm: KVM {} here: using {chosen}",
            if works {
                "works"
            } else {
                "does not boot a guest"
            }
        );
        chosen
    })
}

pub struct Guest {
    pub suite: String,
    image: PathBuf,
    dir: tempfile::TempDir,
    qemu: Option<Child>,
    pub port: u16,
    pub http: reqwest::Client,
}

impl Guest {
    /// Boots a fresh guest of `suite` on a copy-on-write overlay of its image.
    pub fn boot(suite: &str) -> Guest {
        let image = image(suite);
        let dir = tempfile::Builder::new()
            .prefix("sprited-vm-")
            .tempdir()
            .unwrap();
        // The OS disk and the state disk (/.sprite), each on an overlay.
        for disk in ["disk", "state"] {
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(image.join(format!("{disk}.raw")))
                .arg(dir.path().join(format!("{disk}.qcow2")))
                .status()
                .expect("qemu-img");
            assert!(st.success(), "qemu-img create failed");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut g = Guest {
            suite: suite.to_owned(),
            image,
            dir,
            qemu: None,
            port,
            http: reqwest::Client::new(),
        };
        g.power_on();
        g
    }

    /// Starts QEMU on the guest's disk (first boot, or after a power-off).
    pub fn power_on(&mut self) {
        assert!(self.qemu.is_none(), "already running");
        let d = self.dir.path();
        let _ = std::fs::remove_file(d.join("qga.sock"));
        let _ = std::fs::remove_file(d.join("mon.sock"));
        let accel = accel(&self.image);
        // One vCPU under TCG: with two, the guest kernel's live code
        // patching (int3 over jump labels) races the other vCPU and oopses
        // (seen with CRIU's ptrace breakpoints on trixie's 6.12).
        let (cpu, smp) = if accel == "kvm" {
            ("host", "2")
        } else {
            (TCG_CPU, "1")
        };
        // Append, so the log of a boot before a power-off is kept.
        let serial = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("serial.log"))
            .unwrap();
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", accel, "-cpu", cpu, "-m", "1536", "-smp", smp])
            .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
            .arg("-kernel")
            .arg(self.image.join("vmlinuz"))
            .arg("-initrd")
            .arg(self.image.join("initrd.img"))
            .args([
                "-append",
                "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2",
                d.join("disk.qcow2").display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2",
                d.join("state.qcow2").display()
            ))
            .args([
                "-netdev",
                &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{}-:8181", self.port),
            ])
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .args(["-device", "virtio-serial"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=qga,path={},server=on,wait=off",
                d.join("qga.sock").display()
            ))
            .args([
                "-device",
                "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
            ])
            .arg("-monitor")
            .arg(format!(
                "unix:{},server,nowait",
                d.join("mon.sock").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::from(serial.try_clone().unwrap()))
            .stderr(Stdio::from(serial))
            .spawn()
            .expect("qemu-system-x86_64");
        self.qemu = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn base_url(&self) -> String {
        self.url("")
    }

    /// What the guest printed on its serial console (kernel, journal).
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(
            &std::fs::read(self.dir.path().join("serial.log")).unwrap_or_default(),
        )
        .into_owned()
    }

    fn qemu_exited(&mut self) -> bool {
        self.qemu
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Waits until the daemon answers and is `running`; returns its status.
    pub async fn ready(&mut self) -> Value {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(r) = self
                .http
                .get(self.url("/v1/status"))
                .bearer_auth(TOKEN)
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                if let Ok(v) = r.json::<Value>().await {
                    if v["state"] == "running" {
                        return v;
                    }
                }
            }
            assert!(!self.qemu_exited(), "QEMU exited during boot");
            assert!(
                Instant::now() < deadline,
                "the daemon was not running within {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Pulls the plug: QEMU's `quit`, no shutdown in the guest.
    pub fn power_off(&mut self) {
        let mut s = UnixStream::connect(self.dir.path().join("mon.sock")).expect("QEMU monitor");
        s.write_all(b"quit\n").unwrap();
        if let Some(mut c) = self.qemu.take() {
            let _ = c.wait();
        }
    }

    /// Runs `sh -c script` in the guest through the guest agent (not
    /// through the daemon). Returns the exit code and stdout+stderr.
    pub fn sh(&self, script: &str) -> (i64, String) {
        self.try_sh(script, Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("guest agent: {e} (running {script:?})"))
    }

    fn try_sh(&self, script: &str, limit: Duration) -> Result<(i64, String), String> {
        let deadline = Instant::now() + limit;
        let s = loop {
            match UnixStream::connect(self.dir.path().join("qga.sock")) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let mut r = BufReader::new(s);
        let mut call = |cmd: Value| -> Result<Value, String> {
            w.write_all(format!("{cmd}\n").as_bytes())
                .map_err(|e| e.to_string())?;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                    return Err("the guest agent closed the connection".into());
                }
                let v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
                if v.get("return").is_some() || v.get("error").is_some() {
                    return Ok(v);
                }
            }
        };
        // Resynchronise: the agent may still hold an answer for a caller that left.
        let id = u64::from(std::process::id()) * 1000 + rand_id();
        while call(json!({"execute": "guest-sync", "arguments": {"id": id}}))?["return"] != id {}
        let started = call(json!({"execute": "guest-exec", "arguments": {
            "path": "/bin/sh", "arg": ["-c", script], "capture-output": true}}))?;
        let pid = started["return"]["pid"]
            .as_i64()
            .ok_or_else(|| format!("guest-exec: {started}"))?;
        loop {
            let st = call(json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}))?;
            let st = &st["return"];
            if st["exited"] == true {
                let dec = |k: &str| {
                    base64::engine::general_purpose::STANDARD
                        .decode(st[k].as_str().unwrap_or(""))
                        .unwrap_or_default()
                };
                let mut out = dec("out-data");
                out.extend(dec("err-data"));
                return Ok((
                    st["exitcode"].as_i64().unwrap_or(-1),
                    String::from_utf8_lossy(&out).into_owned(),
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("still running after {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The daemon's log, from the guest's journal (or the serial console).
    pub fn daemon_log(&self) -> String {
        match self.try_sh(
            "journalctl -u sprited --no-pager -n 300 -o short-monotonic",
            Duration::from_secs(15),
        ) {
            Ok((0, out)) => out,
            _ => self.serial(),
        }
    }
}

fn rand_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 % 1000)
        .unwrap_or(0)
}

impl Drop for Guest {
    /// On a failing test, prints the guest daemon's log; always stops QEMU.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = if self.qemu_exited() {
                self.serial()
            } else {
                self.daemon_log()
            };
            let tail: Vec<&str> = log.lines().rev().take(300).collect();
            eprintln!(
                "---- {} guest: daemon log (last {} lines) ----\n{}\n---- end of guest log ----",
                self.suite,
                tail.len(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
