//! Which VM-tier guests this build tests (`SPRITED_VM_SUITES`, default
//! `bookworm,trixie`): a guest left out is compiled as an ignored test, so
//! the run says "ignored" instead of passing it.
fn main() {
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
