//! Root inside the environment cannot reach the state dir or the store:
//! each escape below is tried as root through `exec`, must fail, and every
//! checkpoint must still restore exactly afterwards.

mod common;

use std::os::unix::fs::MetadataExt;

use common::{Daemon, privileged};

/// Runs a Python script inside the environment; returns its stdout.
async fn python(d: &Daemon, script: &str) -> String {
    let out = d.cli(&["exec", "--", "python3", "-c", script]).await;
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn root_inside_cannot_reach_the_state_dir_or_the_store() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "root_inside_cannot_reach_the_state_dir_or_the_store"
    ));
    let d = Daemon::start().await;
    std::fs::write(d.env_root().join("precious"), b"v1").unwrap();
    d.checkpoint("one").await;
    std::fs::write(d.env_root().join("precious"), b"v2").unwrap();
    d.checkpoint("two").await;
    let dev = std::fs::metadata(&d.state_dir).unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let daemon = d.pid();
    // Each attempt prints "<name> blocked: <why>" or "<name> ESCAPED".
    let script = format!(
        r#"
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def report(name, ok, why=""):
    print(f"{{name}} {{'ESCAPED' if ok else 'blocked'}}: {{why}}")
def sys_fail(name, r):
    report(name, r >= 0, errno.errorcode.get(ctypes.get_errno(), r))

# 1. mknod of the state dir's disk, then mount it.
try:
    os.mknod("/tmp/disk", 0o600 | 0o060000, os.makedev({major}, {minor}))
    report("mknod", True)
except OSError as e:
    report("mknod", False, errno.errorcode[e.errno])
os.makedirs("/mnt/x", exist_ok=True)
sys_fail("mount", libc.mount(b"/tmp/disk", b"/mnt/x", b"ext4", 0, None))
sys_fail("mount-proc-elsewhere", libc.mount(b"proc", b"/mnt/x", b"proc", 0, None))

# 2. open_by_handle_at on the filesystem (ext4's root: inode 2).
class Handle(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int), ("f", ctypes.c_ubyte * 8)]
h = Handle(8, 1)
h.f[0] = 2
fd = os.open("/", os.O_RDONLY)
sys_fail("open_by_handle_at", libc.open_by_handle_at(fd, ctypes.byref(h), os.O_RDONLY))

# 3. /proc/<pid>/root of a host process (the daemon's pid on the host), and of PID 1.
for pid in ({daemon}, 1):
    try:
        os.listdir(f"/proc/{{pid}}/root/")
        report(f"proc-root-{{pid}}", pid != 1 or os.path.exists(f"/proc/{{pid}}/root/.sprite/store"), "listed")
    except OSError as e:
        report(f"proc-root-{{pid}}", False, errno.errorcode[e.errno])

# 4. writing /sys.
try:
    open("/sys/kernel/mm/ksm/run", "w").write("1")
    report("sys-write", True)
except OSError as e:
    report("sys-write", False, errno.errorcode[e.errno])

# 5. loading a kernel module (finit_module, syscall 313 on x86_64).
sys_fail("finit_module", libc.syscall(313, os.open("/bin/true", os.O_RDONLY), b"", 0))

# 6. ptrace of the daemon (not even visible) and of the init.
for pid in ({daemon}, 1):
    sys_fail(f"ptrace-{{pid}}", libc.ptrace(16, pid, None, None))

# And the state dir is nowhere to be seen.
report("sprite-dir", sorted(os.listdir("/.sprite")) != ["api.sock", "bin", "checkpoints", "logs"], sorted(os.listdir("/.sprite")))
report("store", any("store" in dirs for _, dirs, _ in os.walk("/.sprite")), "")
"#
    );
    let out = python(&d, &script).await;
    eprintln!("{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 12, "{out}");
    for l in &lines {
        assert!(l.contains(" blocked"), "{l}\n{out}");
    }
    // The store is intact: every checkpoint restores exactly.
    for (id, want) in [("v1", b"v1"), ("v2", b"v2")] {
        d.restore(id).await;
        assert_eq!(std::fs::read(d.env_root().join("precious")).unwrap(), want);
    }
}
