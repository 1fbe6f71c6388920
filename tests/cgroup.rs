//! The cgroup module on the real cgroup v2 hierarchy (root): freeze, thaw,
//! kill of a whole tree. Each test owns a parent cgroup of its own.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::privileged;
use sprited::cgroup::{Cgroups, Moves, parse_events};
use sprited::reaper::Reaper;

fn parent() -> PathBuf {
    PathBuf::from(format!(
        "sprited-test/{}-{}",
        std::process::id(),
        rand_suffix()
    ))
}

fn rand_suffix() -> String {
    sprited::sys::random_bytes(4)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Kills and removes a test's cgroups even when the test panics.
struct Cleanup(Cgroups, sprited::cgroup::Cgroup);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.1.kill_all(Duration::from_secs(10));
        let _ = self.1.remove();
        self.0.remove_parent_if_empty();
    }
}

/// A pipe end that reads without blocking (for "nothing arrived" checks).
fn nonblocking(out: &std::process::ChildStdout) {
    let flags = nix::fcntl::fcntl(out, nix::fcntl::FcntlArg::F_GETFL).unwrap();
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(out, nix::fcntl::FcntlArg::F_SETFL(flags)).unwrap();
    let _ = out.as_raw_fd();
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn freeze_stops_a_counter_and_thaw_resumes_it() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("freeze_stops_a_counter_and_thaw_resumes_it"));
    let reaper = Reaper::start().unwrap();
    let cgroups = Cgroups::open(std::path::Path::new("/proc/self/mountinfo"), &parent()).unwrap();
    let cg = cgroups.child("counter").unwrap();
    let _cleanup = Cleanup(cgroups.clone(), cg.clone());
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i; sleep 0.01; done",
    ])
    .stdout(Stdio::piped());
    sprited::sys::join_cgroup_before_exec(&mut cmd, cg.procs_fd().unwrap());
    let mut child = reaper.spawn(&mut cmd).unwrap();
    let mut out = child.stdout.take().unwrap();
    assert!(
        cg.pids().unwrap().contains(&child.pid),
        "the child joined its cgroup before exec"
    );
    let mut buf = [0u8; 4096];
    assert!(out.read(&mut buf).unwrap() > 0, "the counter counts");

    cg.freeze(Duration::from_secs(10)).unwrap();
    // The call returned only once the kernel says frozen.
    let events = std::fs::read_to_string(cg.path().join("cgroup.events")).unwrap();
    assert_eq!(parse_events(&events, "frozen"), Some(1), "{events}");
    // Drain what was written before the freeze, then nothing more arrives.
    nonblocking(&out);
    while out.read(&mut buf).is_ok_and(|n| n > 0) {}
    std::thread::sleep(Duration::from_millis(500));
    let err = out
        .read(&mut buf)
        .expect_err("a frozen counter must not write");
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);

    cg.thaw(Duration::from_secs(10)).unwrap();
    let events = std::fs::read_to_string(cg.path().join("cgroup.events")).unwrap();
    assert_eq!(parse_events(&events, "frozen"), Some(0));
    let mut resumed = tokio::net::unix::pipe::Receiver::from_file(std::fs::File::from(
        std::os::fd::OwnedFd::from(out),
    ))
    .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(30), async {
        use tokio::io::AsyncReadExt;
        resumed.read(&mut buf).await.unwrap()
    })
    .await
    .expect("the counter resumes after thaw");
    assert!(n > 0);

    cg.kill_all(Duration::from_secs(10)).unwrap();
    assert!(!cg.populated().unwrap());
    let exit = child.exit.await.unwrap();
    assert_eq!(exit, sprited::reaper::Exit::Signal(9));
    cg.remove().unwrap();
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn kill_all_empties_a_tree_that_ignores_sigterm() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged("kill_all_empties_a_tree_that_ignores_sigterm"));
    let reaper = Reaper::start().unwrap();
    let cgroups = Cgroups::open(std::path::Path::new("/proc/self/mountinfo"), &parent()).unwrap();
    let cg = cgroups.child("tree").unwrap();
    let _cleanup = Cleanup(cgroups.clone(), cg.clone());
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "trap '' TERM; for i in 1 2 3; do (trap '' TERM; exec sleep 1000) & done; echo ready; wait",
    ])
    .stdout(Stdio::piped());
    sprited::sys::join_cgroup_before_exec(&mut cmd, cg.procs_fd().unwrap());
    let mut child = reaper.spawn(&mut cmd).unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    assert!(out.read(&mut buf).unwrap() > 0);
    assert_eq!(
        cg.pids().unwrap().len(),
        4,
        "the shell and its three sleeps"
    );
    cg.kill_all(Duration::from_secs(10)).unwrap();
    assert!(cg.pids().unwrap().is_empty());
    assert!(!cg.populated().unwrap());
    child.exit.await.unwrap();
    cg.remove().unwrap();
}

/// The cgroup v2 line of this process's mount table: (mount point, the
/// mount's options, the hierarchy's options).
fn v2_line() -> (String, String, String) {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.split_once(" - ")
                .is_some_and(|(_, r)| r.starts_with("cgroup2 "))
        })
        .expect("a cgroup v2 mount");
    let (left, right) = line.split_once(" - ").unwrap();
    let left: Vec<&str> = left.split_whitespace().collect();
    let right: Vec<&str> = right.split_whitespace().collect();
    (left[4].into(), left[5].into(), right[2].into())
}

fn without(opts: &str, gone: &str) -> Vec<String> {
    let mut v: Vec<String> = opts
        .split(',')
        .filter(|o| *o != gone)
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
fn the_hierarchy_is_remounted_for_fast_moves_with_every_other_option_kept() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "the_hierarchy_is_remounted_for_fast_moves_with_every_other_option_kept"
    ));
    // Turned off first (moves only get slower meanwhile), so the remount
    // is seen happening.
    let (point, mount_opts, super_opts) = v2_line();
    let kept: Vec<&str> = super_opts
        .split(',')
        .filter(|o| !["rw", "ro", "favordynmods"].contains(o))
        .collect();
    use nix::mount::MsFlags as F;
    let mut flags = F::MS_REMOUNT;
    for (name, flag) in [
        ("ro", F::MS_RDONLY),
        ("nosuid", F::MS_NOSUID),
        ("nodev", F::MS_NODEV),
        ("noexec", F::MS_NOEXEC),
        ("noatime", F::MS_NOATIME),
        ("relatime", F::MS_RELATIME),
    ] {
        if mount_opts.split(',').any(|o| o == name) {
            flags |= flag;
        }
    }
    nix::mount::mount(
        None::<&str>,
        point.as_str(),
        None::<&str>,
        flags,
        Some(kept.join(",").as_str()),
    )
    .unwrap();
    let (_, before_mount, before_super) = v2_line();
    assert!(!before_super.split(',').any(|o| o == "favordynmods"));

    let cgroups = Cgroups::open(std::path::Path::new("/proc/self/mountinfo"), &parent()).unwrap();
    // Asked to leave it: left.
    assert_eq!(
        cgroups.favor_dynamic_moves(false).unwrap(),
        Moves::LeftAlone
    );
    assert_eq!(v2_line().2, before_super);
    // Asked to change it: the hierarchy gains the option, and nothing else
    // of the mount or the hierarchy changes.
    let cgroups = Cgroups::open(std::path::Path::new("/proc/self/mountinfo"), &parent()).unwrap();
    assert_eq!(cgroups.favor_dynamic_moves(true).unwrap(), Moves::MadeFast);
    assert_eq!(cgroups.moves(), Some(Moves::MadeFast));
    assert_eq!(cgroups.support().moves, Some(Moves::MadeFast));
    let (_, after_mount, after_super) = v2_line();
    assert_eq!(after_mount, before_mount);
    assert!(after_super.split(',').any(|o| o == "favordynmods"));
    assert_eq!(
        without(&after_super, "favordynmods"),
        without(&before_super, "favordynmods")
    );
    // Once more: already so.
    let cgroups = Cgroups::open(std::path::Path::new("/proc/self/mountinfo"), &parent()).unwrap();
    assert_eq!(
        cgroups.favor_dynamic_moves(true).unwrap(),
        Moves::AlreadyFast
    );
    assert!(Moves::AlreadyFast.fast() && !Moves::LeftAlone.fast());
    cgroups.remove_parent_if_empty();
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn kept_fast_a_process_stays_in_its_cgroup_until_the_guard_stops() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "kept_fast_a_process_stays_in_its_cgroup_until_the_guard_stops"
    ));
    let reaper = Reaper::start().unwrap();
    let cgroups = Cgroups::open(std::path::Path::new("/proc/self/mountinfo"), &parent()).unwrap();
    let (a, b) = (cgroups.child("a").unwrap(), cgroups.child("b").unwrap());
    let _cleanup = (
        Cleanup(cgroups.clone(), a.clone()),
        Cleanup(cgroups.clone(), b.clone()),
    );
    let mut cmd = Command::new("sleep");
    cmd.arg("1000");
    sprited::sys::join_cgroup_before_exec(&mut cmd, a.procs_fd().unwrap());
    let child = reaper.spawn(&mut cmd).unwrap();
    assert_eq!(
        cgroups.of_process(child.pid).map(|c| c.path().to_owned()),
        Some(a.path().to_owned())
    );

    // The guard moves it into `a` again and again (a no-op each time): a
    // move elsewhere is undone.
    let guard = a.keep_migrations_fast(child.pid).unwrap();
    b.add(child.pid).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !a.pids().unwrap().contains(&child.pid) {
        assert!(std::time::Instant::now() < deadline, "never moved back");
        std::thread::yield_now();
    }
    assert!(b.pids().unwrap().is_empty());

    // Stopped (and its last move over), it moves nothing any more.
    guard.stop();
    b.add(child.pid).unwrap();
    assert_eq!(b.pids().unwrap(), vec![child.pid]);
    assert!(a.pids().unwrap().is_empty());
    // The process ran on through all of it.
    assert_eq!(cgroups.holds(child.pid), Some(true));
}

#[tokio::test]
#[cfg_attr(not(privileged_tests), ignore = "needs root (scripts/test.sh)")]
async fn a_task_waiting_for_its_vfork_child_is_found_after_every_freeze() {
    // (ignored where it cannot run; asked to run anyway, it fails)
    assert!(privileged(
        "a_task_waiting_for_its_vfork_child_is_found_after_every_freeze"
    ));
    let reaper = Reaper::start().unwrap();
    let cgroups = Cgroups::open(std::path::Path::new("/proc/self/mountinfo"), &parent()).unwrap();
    let cg = cgroups.child("spawner").unwrap();
    let _cleanup = Cleanup(cgroups.clone(), cg.clone());
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("gate");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // posix_spawn (a vfork) of a child that opens the FIFO before its exec:
    // the parent waits uninterruptibly until the FIFO has a writer.
    let script = format!(
        "import os, time\n\
         c = os.posix_spawn('/bin/true', ['true'], {{}}, file_actions=[(os.POSIX_SPAWN_OPEN, 3, {:?}, os.O_RDONLY, 0)])\n\
         os.waitpid(c, 0)\n\
         time.sleep(1e6)\n",
        fifo.to_str().unwrap()
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script]);
    sprited::sys::join_cgroup_before_exec(&mut cmd, cg.procs_fd().unwrap());
    let child = reaper.spawn(&mut cmd).unwrap();
    common::until_in_vfork(child.pid).await;
    cg.freeze(Duration::from_secs(10)).unwrap();
    assert_eq!(cg.unseizable(), vec![child.pid]);
    // A thaw wakes it (it sleeps again as soon as it runs), and a freeze
    // can report `frozen 1` before it has: every freeze still finds it.
    for round in 0..50 {
        cg.release().unwrap();
        cg.freeze(Duration::from_secs(10)).unwrap();
        assert_eq!(cg.unseizable(), vec![child.pid], "round {round}");
    }
    // While the child cannot exec, the freeze is given up at the timeout.
    let mut rounds = 0;
    let err = cg
        .freeze_seizable(Duration::from_millis(300), &mut |tids| {
            rounds += 1;
            assert_eq!(tids, [child.pid]);
        })
        .unwrap_err();
    assert!(
        matches!(err, sprited::cgroup::CgroupError::Unseizable { first, count: 1, .. } if first == child.pid),
        "{err}"
    );
    assert!(rounds >= 2, "thawed and tried again: {rounds}");
    // Once it can (the FIFO opened for writing, which returns when the
    // thawed child opens its end), the freeze holds with every task
    // seizable.
    let writer = std::thread::spawn(move || std::fs::OpenOptions::new().write(true).open(fifo));
    let mut waited = false;
    cg.freeze_seizable(Duration::from_secs(10), &mut |_| waited = true)
        .unwrap();
    assert!(waited);
    assert!(cg.unseizable().is_empty());
    assert_ne!(common::task_state(child.pid), Some('D'));
    writer.join().unwrap().unwrap();
    drop(dir);
}
