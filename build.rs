//! Which VM-tier guests this build tests (`SPRITED_VM_SUITES`, default
//! `bookworm,trixie`): a guest left out is compiled as an ignored test, so
//! the run says "ignored" instead of passing it. Likewise `privileged_tests`:
//! the build runs as root with CRIU installed, or `SPRITED_REQUIRE_PRIVILEGED=1`
//! (where such a test must run, and fails if it cannot); tests marked with it
//! are ignored otherwise. And `has_vagrant`: `vagrant` is on `PATH` (or
//! `SPRITED_REQUIRE_PRIVILEGED=1`), else the Vagrantfile's check is ignored.
fn main() {
    println!("cargo:rerun-if-env-changed=SPRITED_REQUIRE_PRIVILEGED");
    println!("cargo:rustc-check-cfg=cfg(privileged_tests)");
    let required = std::env::var("SPRITED_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
    if required || (is_root() && has_criu()) {
        println!("cargo:rustc-cfg=privileged_tests");
    }
    println!("cargo:rustc-check-cfg=cfg(has_vagrant)");
    if required || on_path("vagrant") {
        println!("cargo:rustc-cfg=has_vagrant");
    }
    println!("cargo:rerun-if-env-changed=SPRITED_VM_SUITES");
    println!("cargo:rustc-check-cfg=cfg(vm_suite_bookworm)");
    println!("cargo:rustc-check-cfg=cfg(vm_suite_trixie)");
    let list = std::env::var("SPRITED_VM_SUITES").unwrap_or_else(|_| "bookworm,trixie".into());
    for suite in list.split([',', ' ']).filter(|s| !s.is_empty()) {
        if matches!(suite, "bookworm" | "trixie") {
            println!("cargo:rustc-cfg=vm_suite_{suite}");
        }
    }
}

/// The effective uid is 0 (`/proc/self/status`: `Uid: real effective ...`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// CRIU is where the daemon looks for it (`criu::locate`).
fn has_criu() -> bool {
    ["/usr/local/sbin/criu", "/usr/sbin/criu"]
        .iter()
        .any(|p| std::path::Path::new(p).is_file())
        || on_path("criu")
}

/// `name` is a file in a directory of `PATH`.
fn on_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(name).is_file())
}
