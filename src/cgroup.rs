//! cgroup v2: the only code that touches `/sys/fs/cgroup`.
//!
//! The v2 hierarchy is found from the mount table (`/proc/self/mountinfo`, a
//! path injected by the caller), never hard-coded: on hybrid hosts it lives at
//! `/sys/fs/cgroup/unified`. The daemon owns one parent cgroup
//! (`<mount>/<cgroup-parent>`, default `sprited/<daemon-id>`) and nothing
//! outside it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (looked in {mountinfo}); sprited needs cgroup v2")]
    NoV2Mount { mountinfo: PathBuf },
    #[error("cgroup {path}: {what} did not happen within {timeout:?}")]
    Timeout {
        path: PathBuf,
        what: &'static str,
        timeout: Duration,
    },
    #[error(
        "cgroup {path}: {} thread(s) stayed in the middle of starting a program (vfork; first {first}) for {timeout:?}: CRIU cannot seize them",
        .count
    )]
    Unseizable {
        path: PathBuf,
        first: i32,
        count: usize,
        timeout: Duration,
    },
    #[error("cgroups are unavailable: {0}")]
    Unavailable(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One plain path component.
fn plain_child_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What the daemon found at start, as reported by `/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct CgroupSupport {
    /// Whether the daemon can manage cgroups (v2 mounted, parent created).
    pub available: bool,
    /// Where cgroup v2 is mounted.
    pub mount: Option<PathBuf>,
    /// The daemon's parent cgroup (absolute).
    pub parent: Option<PathBuf>,
    /// `cgroup.freeze` exists (kernel 5.2+).
    pub freeze: bool,
    /// `cgroup.kill` exists (kernel 5.14+); otherwise every pid is signalled.
    pub kill: bool,
    /// Whether moves between cgroups skip the kernel's RCU wait
    /// (`favordynmods`), and who made them so.
    pub moves: Option<Moves>,
    pub error: Option<String>,
}

/// Finds the cgroup v2 mount point in a `mountinfo` text. Prefers a mount of
/// the hierarchy's root (`/`) when several exist.
pub fn find_v2_mount(mountinfo: &str) -> Option<PathBuf> {
    v2_mount_entry(mountinfo).map(|m| m.point)
}

/// A cgroup v2 mount as `mountinfo` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    point: PathBuf,
    /// The mount's own options (`rw,nosuid,nodev,noexec,relatime`).
    mount_opts: String,
    /// The hierarchy's (`rw,nsdelegate,memory_recursiveprot`).
    super_opts: String,
}

impl MountEntry {
    /// Whether the hierarchy has `option` (`favordynmods`).
    fn has(&self, option: &str) -> bool {
        self.super_opts.split(',').any(|o| o == option)
    }

    /// What remounts the hierarchy with `option` added and nothing else
    /// changed: the mount's own flags (a remount sets them anew) and the
    /// hierarchy's options (a cgroup v2 remount sets every one of them:
    /// one left out is turned off).
    fn remount_with(&self, option: &str) -> (nix::mount::MsFlags, String) {
        use nix::mount::MsFlags;
        let mut flags = MsFlags::MS_REMOUNT;
        for o in self.mount_opts.split(',') {
            flags |= match o {
                "ro" => MsFlags::MS_RDONLY,
                "nosuid" => MsFlags::MS_NOSUID,
                "nodev" => MsFlags::MS_NODEV,
                "noexec" => MsFlags::MS_NOEXEC,
                "noatime" => MsFlags::MS_NOATIME,
                "nodiratime" => MsFlags::MS_NODIRATIME,
                "relatime" => MsFlags::MS_RELATIME,
                "strictatime" => MsFlags::MS_STRICTATIME,
                "nosymfollow" => MsFlags::from_bits_retain(libc::MS_NOSYMFOLLOW),
                _ => MsFlags::empty(),
            };
        }
        let mut data: Vec<&str> = self
            .super_opts
            .split(',')
            .filter(|o| !o.is_empty() && *o != "rw" && *o != "ro" && *o != option)
            .collect();
        data.push(option);
        (flags, data.join(","))
    }
}

/// The cgroup v2 mount in a `mountinfo` text (see [`find_v2_mount`]).
fn v2_mount_entry(mountinfo: &str) -> Option<MountEntry> {
    let mut fallback = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let right: Vec<&str> = right.split_whitespace().collect();
        if right.first() != Some(&"cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        if fields.len() < 6 {
            continue;
        }
        let entry = MountEntry {
            point: PathBuf::from(crate::sys::unescape_mountinfo(fields[4])),
            mount_opts: fields[5].to_owned(),
            super_opts: right.get(2).copied().unwrap_or("").to_owned(),
        };
        if fields[3] == "/" {
            return Some(entry);
        }
        fallback.get_or_insert(entry);
    }
    fallback
}

/// Whether moving a process between cgroups waits for an RCU grace period
/// (see [`Cgroups::favor_dynamic_moves`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Moves {
    /// `favordynmods` was on already.
    AlreadyFast,
    /// The daemon turned `favordynmods` on.
    MadeFast,
    /// Left as it was (`--no-cgroup-favordynmods`).
    LeftAlone,
    /// The kernel has no `favordynmods` (before Linux 6.0), or the daemon
    /// is not in the host's cgroup namespace: each move may wait.
    Unsupported,
}

impl Moves {
    /// Whether moves skip the wait.
    pub fn fast(self) -> bool {
        matches!(self, Moves::AlreadyFast | Moves::MadeFast)
    }
}

/// The daemon's cgroup tree.
#[derive(Debug, Clone)]
pub struct Cgroups {
    mount: PathBuf,
    parent: PathBuf,
    mountinfo: PathBuf,
    /// What [`Self::favor_dynamic_moves`] found or did.
    moves: std::sync::Arc<std::sync::OnceLock<Moves>>,
}

impl Cgroups {
    /// Finds the v2 mount from `mountinfo_path` and creates the daemon's parent
    /// cgroup `parent_rel` under it.
    pub fn open(mountinfo_path: &Path, parent_rel: &Path) -> Result<Self, CgroupError> {
        let entry = Self::entry(mountinfo_path)?;
        let mount = entry.point;
        let parent = mount.join(parent_rel);
        std::fs::create_dir_all(&parent).map_err(io_err("create cgroup", &parent))?;
        Ok(Cgroups {
            mount,
            parent,
            mountinfo: mountinfo_path.to_owned(),
            moves: Default::default(),
        })
    }

    /// The v2 mount as the mount table at `mountinfo` lists it now.
    fn entry(mountinfo: &Path) -> Result<MountEntry, CgroupError> {
        let text = std::fs::read_to_string(mountinfo).map_err(io_err("read", mountinfo))?;
        v2_mount_entry(&text).ok_or_else(|| CgroupError::NoV2Mount {
            mountinfo: mountinfo.to_owned(),
        })
    }

    /// Makes moves between cgroups fast for the whole machine: remounts
    /// the v2 hierarchy with `favordynmods` (Linux 6.0+), everything else
    /// as it was.
    ///
    /// Every move into a cgroup takes the kernel's threadgroup lock for
    /// writing (`cgroup_threadgroup_rwsem`, one per-CPU rwsem for all
    /// hierarchies), which waits for an RCU grace period unless another
    /// move held it within about one: 5 to 16 ms measured here. A restore
    /// moves CRIU into the environment and every restored process into its
    /// cgroup. With `favordynmods` the lock stays in its slow-reader mode
    /// for good: moves never wait, and every fork and exit on the machine
    /// takes one atomic operation more. The flag is the hierarchy's, so it
    /// holds for every mount of it until a remount without it.
    /// (`change` false: only finds out; `--no-cgroup-favordynmods`.)
    pub fn favor_dynamic_moves(&self, change: bool) -> Result<Moves, CgroupError> {
        let moves = self.remount_for_moves(change)?;
        let _ = self.moves.set(moves);
        Ok(moves)
    }

    /// What [`Self::favor_dynamic_moves`] found or did, if it ran.
    pub fn moves(&self) -> Option<Moves> {
        self.moves.get().copied()
    }

    #[tracing::instrument(name = "cgroup_remount", skip(self), fields(mount = %self.mount.display()))]
    fn remount_for_moves(&self, change: bool) -> Result<Moves, CgroupError> {
        const OPTION: &str = "favordynmods";
        let entry = Self::entry(&self.mountinfo)?;
        if entry.has(OPTION) {
            return Ok(Moves::AlreadyFast);
        }
        if !change {
            return Ok(Moves::LeftAlone);
        }
        let (flags, data) = entry.remount_with(OPTION);
        match nix::mount::mount(
            None::<&str>,
            &entry.point,
            None::<&str>,
            flags,
            Some(data.as_str()),
        ) {
            Ok(()) => {}
            // (an option the kernel does not know)
            Err(nix::errno::Errno::EINVAL) => return Ok(Moves::Unsupported),
            Err(e) => return Err(io_err("remount", &entry.point)(e.into())),
        }
        // (outside the host's cgroup namespace the kernel takes the
        // remount and changes nothing)
        let now = Self::entry(&self.mountinfo)?;
        if !now.has(OPTION) {
            return Ok(Moves::Unsupported);
        }
        tracing::info!(options = %now.super_opts, "cgroup v2 remounted: moves between cgroups no longer wait");
        Ok(Moves::MadeFast)
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// Whether live process `pid` is in one of this daemon's cgroups: `None`
    /// when there is no such live process (gone, or a zombie about to be).
    pub fn holds(&self, pid: i32) -> Option<bool> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let state = status
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .map(str::trim)
            .unwrap_or("");
        if state.starts_with('Z') || state.starts_with('X') {
            return None;
        }
        Some(self.path_of(pid)?.starts_with(&self.parent))
    }

    /// The path of the cgroup (v2) process `pid` is in, from
    /// `/proc/<pid>/cgroup`.
    fn path_of(&self, pid: i32) -> Option<PathBuf> {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(self.mount.join(rel.trim().trim_start_matches('/')))
    }

    /// The cgroup (v2) that live process `pid` is in, wherever it is.
    pub fn of_process(&self, pid: i32) -> Option<Cgroup> {
        let path = self.path_of(pid)?;
        path.is_dir().then_some(Cgroup { path })
    }

    /// What this kernel offers, read from the parent cgroup's interface files.
    pub fn support(&self) -> CgroupSupport {
        CgroupSupport {
            available: true,
            mount: Some(self.mount.clone()),
            parent: Some(self.parent.clone()),
            freeze: self.parent.join("cgroup.freeze").exists(),
            kill: self.parent.join("cgroup.kill").exists(),
            moves: self.moves(),
            error: None,
        }
    }

    /// Limits the memory of the whole environment (the parent cgroup) to
    /// `max` bytes, none: no limit. `memory.max`, with swap off
    /// (`memory.swap.max` 0, where swap is accounted), so past the limit
    /// the kernel's OOM killer picks a process inside: never the daemon,
    /// which is not in this tree. The memory controller is enabled down
    /// the path from the mount to the environment's children (each one's
    /// `cgroup.subtree_control`); where the kernel or the hierarchy does
    /// not offer it (a host whose memory controller is on cgroup v1),
    /// `Unavailable`, and nothing changed.
    #[tracing::instrument(name = "memory_limit", skip(self), fields(cgroup = %self.parent.display()))]
    pub fn set_memory_limit(&self, max: Option<u64>) -> Result<(), CgroupError> {
        if max.is_none() && !self.parent.join("memory.max").exists() {
            return Ok(());
        }
        self.enable_memory()?;
        let whole = self.whole();
        whole.write(
            "memory.max",
            &max.map_or("max".to_owned(), |b| b.to_string()),
        )?;
        if self.parent.join("memory.swap.max").exists() {
            whole.write("memory.swap.max", if max.is_some() { "0" } else { "max" })?;
        }
        tracing::info!(?max, "memory limit set");
        Ok(())
    }

    /// `+memory` in the `cgroup.subtree_control` of every cgroup from the
    /// mount down to the parent (which holds no process itself).
    fn enable_memory(&self) -> Result<(), CgroupError> {
        let rel = self
            .parent
            .strip_prefix(&self.mount)
            .map_err(|_| CgroupError::Unavailable("the parent is outside the mount".into()))?;
        let mut dir = self.mount.clone();
        let mut comps = rel.components();
        loop {
            let offered = dir.join("cgroup.controllers");
            let text = std::fs::read_to_string(&offered).map_err(io_err("read", &offered))?;
            if !text.split_whitespace().any(|c| c == "memory") {
                return Err(CgroupError::Unavailable(format!(
                    "the memory controller is not offered in {} (cgroup v2 without it)",
                    dir.display()
                )));
            }
            let control = dir.join("cgroup.subtree_control");
            let on = std::fs::read_to_string(&control).map_err(io_err("read", &control))?;
            if !on.split_whitespace().any(|c| c == "memory") {
                std::fs::write(&control, "+memory").map_err(io_err("write", &control))?;
            }
            match comps.next() {
                Some(c) => dir.push(c),
                None => return Ok(()),
            }
        }
    }

    /// Removes the parent cgroup if nothing lives in it any more (clean
    /// shutdown), and its `sprited` ancestor when that is empty too.
    pub fn remove_parent_if_empty(&self) {
        let mut dir = self.parent.clone();
        while dir.starts_with(&self.mount) && dir != self.mount {
            match std::fs::remove_dir(&dir) {
                Ok(()) => tracing::debug!(cgroup = %dir.display(), "removed cgroup"),
                Err(e) => {
                    tracing::debug!(cgroup = %dir.display(), error = %e, "cgroup kept");
                    break;
                }
            }
            if !dir.pop() {
                break;
            }
        }
    }
}

impl Cgroups {
    /// The child cgroup `name` (created if missing). A name that is not one
    /// plain path component (a `/`, `.`, `..`, empty, a NUL) is refused:
    /// names can come from an imported checkpoint.
    pub fn child(&self, name: &str) -> Result<Cgroup, CgroupError> {
        if !plain_child_name(name) {
            return Err(CgroupError::Unavailable(format!(
                "{name:?} is not a cgroup name"
            )));
        }
        let path = self.parent.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create cgroup", &path)(e)),
        }
        Ok(Cgroup { path })
    }

    /// The daemon's parent cgroup itself: the whole environment.
    pub fn whole(&self) -> Cgroup {
        Cgroup {
            path: self.parent.clone(),
        }
    }

    /// The existing child cgroups (for clean-up after a crash).
    pub fn children(&self) -> Result<Vec<Cgroup>, CgroupError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.parent).map_err(io_err("read", &self.parent))? {
            let entry = entry.map_err(io_err("read", &self.parent))?;
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(Cgroup { path: entry.path() });
            }
        }
        Ok(out)
    }
}

/// A character device processes may open: by major, and minor (`None`:
/// any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceRule {
    pub major: u32,
    pub minor: Option<u32>,
}

/// The cgroup device program allowing `allowed` and nothing else: for
/// each rule, "a character device with this major (and minor)? allow";
/// past them all, deny.
pub fn device_program(allowed: &[DeviceRule]) -> Vec<crate::sys::BpfInsn> {
    use crate::sys::BpfInsn;
    const LDX_W: u8 = 0x61; // r_dst = *(u32 *)(r_src + off)
    const AND32_K: u8 = 0x54; // w_dst &= imm
    const JNE_K: u8 = 0x55; // if r_dst != imm goto +off
    const MOV64_K: u8 = 0xb7; // r_dst = imm
    const EXIT: u8 = 0x95;
    const CHAR: i32 = 2; // BPF_DEVCG_DEV_CHAR
    let insn = |code, dst: u8, src: u8, off: i16, imm: i32| BpfInsn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    };
    // r1 points at struct bpf_cgroup_dev_ctx { access_type, major, minor }.
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(AND32_K, 2, 0, 0, 0xffff), // the type (access is the upper half)
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for rule in allowed {
        let mut checks = vec![(2u8, CHAR), (4, rule.major as i32)];
        if let Some(minor) = rule.minor {
            checks.push((5, minor as i32));
        }
        let n = checks.len();
        for (i, (reg, value)) in checks.into_iter().enumerate() {
            // past the rest of the checks and the allow (mov, exit)
            p.push(insn(JNE_K, reg, 0, (n - i - 1 + 2) as i16, value));
        }
        p.push(insn(MOV64_K, 0, 0, 0, 1));
        p.push(insn(EXIT, 0, 0, 0, 0));
    }
    p.push(insn(MOV64_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// One cgroup the daemon owns (a service's, later an exec session's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

/// Migrations kept fast ([`Cgroup::keep_migrations_fast`]) while held.
pub struct FastMigrations {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FastMigrations {
    /// Stops the moves and waits for the one under way, if any: after
    /// this, no move of the guard's can undo one made elsewhere.
    pub fn stop(mut self) {
        if let Some(t) = self.signal() {
            let _ = t.join();
        }
    }

    /// Tells the thread to end; its handle, the first time.
    fn signal(&mut self) -> Option<std::thread::JoinHandle<()>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let t = self.thread.take()?;
        t.thread().unpark();
        Some(t)
    }
}

impl Drop for FastMigrations {
    /// Stops the moves (the thread ends after the one under way, if any:
    /// not waited for).
    fn drop(&mut self) {
        self.signal();
    }
}

impl Cgroup {
    /// The cgroup at `path` (a path the daemon made: a restore's plan).
    pub(crate) fn at(path: PathBuf) -> Cgroup {
        Cgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An fd open for writing on `cgroup.procs`: a child writes `0` to it
    /// before `exec` to move itself in (see `sys::join_cgroup_before_exec`),
    /// so not even a fast-forking child escapes.
    pub fn procs_fd(&self) -> Result<OwnedFd, CgroupError> {
        let p = self.path.join("cgroup.procs");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io_err("open", &p))?;
        Ok(f.into())
    }

    /// From now on, processes in this cgroup (and below) may open only the
    /// character devices `allowed` (a cgroup device program).
    pub fn restrict_devices(&self, allowed: &[DeviceRule]) -> Result<(), CgroupError> {
        let dir = std::fs::File::open(&self.path).map_err(io_err("open", &self.path))?;
        crate::sys::attach_device_program(std::os::fd::AsFd::as_fd(&dir), &device_program(allowed))
            .map_err(io_err("attach a device program to", &self.path))
    }

    /// Moves process `pid` (a host pid) into this cgroup.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// Keeps every cgroup move fast until the guard drops: moves `pid`,
    /// already in this cgroup (a no-op move), again every 3 ms.
    ///
    /// A move into any cgroup takes the kernel's threadgroup lock for
    /// writing (`cgroup_threadgroup_rwsem`, one per-CPU rwsem for all).
    /// Taking it waits for an RCU grace period unless another writer held
    /// it within about one grace period: measured here, 5 to 16 ms after
    /// 20 ms of no moves, 0.2 ms within 10 ms of one. A restore moves CRIU
    /// into the init's cgroup before it forks, and the restored processes
    /// to theirs while CRIU waits to resume them; with this guard held for
    /// the restore, neither waits. The first move still waits, holding
    /// the kernel's cgroup lock meanwhile: any other cgroup write (a kill,
    /// a removal) waits with it, so take the guard once those are done.
    /// (The `favordynmods` mount option would keep the lock fast for good,
    /// for the whole hierarchy.) While the guard lives,
    /// `pid` stays here (a move elsewhere is undone); the moves stop when
    /// it is gone or a move fails.
    pub fn keep_migrations_fast(&self, pid: i32) -> Result<FastMigrations, CgroupError> {
        use std::os::unix::fs::FileExt;
        let p = self.path.join("cgroup.procs");
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io_err("open", &p))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let line = pid.to_string();
        let thread = std::thread::Builder::new()
            .name("cgroup-warm".into())
            .spawn(move || {
                while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    if procs.write_at(line.as_bytes(), 0).is_err() {
                        return;
                    }
                    std::thread::park_timeout(Duration::from_millis(3));
                }
            })
            .map_err(io_err("spawn a thread for", &p))?;
        Ok(FastMigrations {
            stop,
            thread: Some(thread),
        })
    }

    /// The pids in this cgroup (not in its children).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let p = self.path.join("cgroup.procs");
        let text = std::fs::read_to_string(&p).map_err(io_err("read", &p))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// The processes of this cgroup and of every cgroup below it (a list
    /// that cannot be read is skipped: the cgroup went away).
    pub fn pids_below(&self) -> Vec<i32> {
        self.ids_below("cgroup.procs")
    }

    /// `file` (`cgroup.procs`, `cgroup.threads`) of this cgroup and of every
    /// cgroup below it.
    fn ids_below(&self, file: &str) -> Vec<i32> {
        let mut out = Vec::new();
        let mut dirs = vec![self.path.clone()];
        while let Some(dir) = dirs.pop() {
            if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        out
    }

    /// Whether any process lives in this cgroup or below (`populated 1`).
    pub fn populated(&self) -> Result<bool, CgroupError> {
        Ok(self.event("populated")? == Some(1))
    }

    fn event(&self, key: &str) -> Result<Option<u64>, CgroupError> {
        let p = self.path.join("cgroup.events");
        let text = std::fs::read_to_string(&p).map_err(io_err("read", &p))?;
        Ok(parse_events(&text, key))
    }

    /// How many times the OOM killer killed a process of this cgroup
    /// (`memory.events`); none without the memory controller.
    pub fn oom_kills(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.path.join("memory.events")).ok()?;
        parse_events(&text, "oom_kill")
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let p = self.path.join(file);
        std::fs::write(&p, value).map_err(io_err("write", &p))
    }

    /// Freezes every process in the cgroup and returns once `cgroup.events`
    /// says `frozen 1`.
    #[tracing::instrument(name = "freeze", skip(self), fields(cgroup = %self.path.display()))]
    pub fn freeze(&self, timeout: Duration) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", "1")?;
        self.wait_event("frozen", 1, timeout)
    }

    /// Freezes the cgroup so that CRIU can seize every task of it, and
    /// returns the time (CLOCK_MONOTONIC ns) of the freeze that held.
    ///
    /// A task waiting for its `vfork` child to exec counts as frozen (the
    /// kernel's `wait_for_vfork_done`), but it sleeps uninterruptibly:
    /// `PTRACE_INTERRUPT` cannot stop it until the child execs, and a
    /// frozen child never does. CRIU then waits for it until its own
    /// timeout (10 s) and fails. Shells (dash) and `posix_spawn` vfork at
    /// every command, so a freeze lands there now and then, more often on
    /// a busy machine. So: freeze, and while any thread is in that state
    /// ([`Cgroup::unseizable`]), thaw (for real: `frozen 0`, so the next
    /// `frozen 1` is the next freeze's), let the children run a moment (1
    /// ms, then twice as long each round, at most 100 ms: nothing says
    /// when a child has exec'd) and freeze again, until `timeout`.
    /// `waiting` hears of each round with the threads waited for.
    #[tracing::instrument(name = "freeze_seizable", skip(self, waiting), fields(cgroup = %self.path.display()))]
    pub fn freeze_seizable(
        &self,
        timeout: Duration,
        waiting: &mut dyn FnMut(&[i32]),
    ) -> Result<u64, CgroupError> {
        let deadline = Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let mut pause = Duration::from_millis(1);
        loop {
            let asked = crate::sys::monotonic_ns();
            // (a last freeze at the deadline still gets its second: the
            // cgroup ends frozen, and the error says why it is not seizable)
            self.freeze(left().max(Duration::from_secs(1)))?;
            let stuck = self.unseizable();
            let Some(&first) = stuck.first() else {
                return Ok(asked);
            };
            if left().is_zero() {
                return Err(CgroupError::Unseizable {
                    path: self.path.clone(),
                    first,
                    count: stuck.len(),
                    timeout,
                });
            }
            tracing::info!(threads = ?stuck, "threads in the middle of a vfork: thawing until they exec");
            waiting(&stuck);
            self.thaw(left())?;
            std::thread::sleep(pause.min(left()));
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// The threads of this frozen cgroup (and below) that CRIU cannot seize:
    /// those in uninterruptible sleep (state `D`). In a cgroup that reports
    /// `frozen 1` that is a task waiting for its `vfork` child (see
    /// [`Cgroup::freeze_seizable`]); a task frozen the usual way sleeps
    /// interruptibly (`S`), a stopped or traced one is `T` or `t`. A thaw
    /// wakes such a task, which then sleeps again as soon as it runs, but
    /// it counts as frozen meanwhile: a thread still runnable (`R`) is
    /// waited for, up to 50 ms, before the states are taken.
    pub fn unseizable(&self) -> Vec<i32> {
        let tids = self.ids_below("cgroup.threads");
        let settled_by = Instant::now() + Duration::from_millis(50);
        loop {
            let states: Vec<(i32, Option<char>)> =
                tids.iter().map(|&tid| (tid, task_state(tid))).collect();
            if Instant::now() < settled_by && states.iter().any(|(_, s)| *s == Some('R')) {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            return states
                .into_iter()
                .filter(|(_, s)| *s == Some('D'))
                .map(|(tid, _)| tid)
                .collect();
        }
    }

    /// Thaws the cgroup and returns once `frozen 0`.
    #[tracing::instrument(name = "thaw", skip(self), fields(cgroup = %self.path.display()))]
    pub fn thaw(&self, timeout: Duration) -> Result<(), CgroupError> {
        self.release()?;
        self.wait_event("frozen", 0, timeout)
    }

    /// Thaws without waiting: the tasks are released at once, but
    /// `cgroup.events` says `frozen 0` only once each has been scheduled
    /// again, which on a busy machine can take a scheduler tick or two.
    pub fn release(&self) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", "0")
    }

    /// SIGKILLs every process in the cgroup and its children, and returns once
    /// it is empty. Uses `cgroup.kill` (kernel 5.14+); elsewhere freezes, kills
    /// every listed pid, thaws, and repeats until empty.
    #[tracing::instrument(name = "kill", skip(self), fields(cgroup = %self.path.display()))]
    pub fn kill_all(&self, timeout: Duration) -> Result<(), CgroupError> {
        if !self.populated()? {
            return Ok(());
        }
        if self.path.join("cgroup.kill").exists() {
            self.write("cgroup.kill", "1")?;
        } else {
            let deadline = Instant::now() + timeout;
            while self.populated()? && Instant::now() < deadline {
                let _ = self.freeze(timeout);
                for pid in self.pids()? {
                    let _ = crate::sys::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
                self.thaw(timeout)?;
            }
        }
        self.wait_event("populated", 0, timeout)
    }

    /// Sends SIGKILL to every process of the cgroup and its descendants
    /// through `cgroup.kill` without waiting for them to die (where the
    /// kernel has no `cgroup.kill`, nothing: [`Self::kill_all`] does it).
    pub fn start_kill(&self) -> Result<(), CgroupError> {
        if self.path.join("cgroup.kill").exists() && self.populated()? {
            self.write("cgroup.kill", "1")?;
        }
        Ok(())
    }

    /// Removes the (empty) cgroup. A missing one is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        match std::fs::remove_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove cgroup", &self.path)(e)),
        }
    }

    /// Waits until `key` in `cgroup.events` equals `want`. The kernel
    /// signals a change of that file to `poll(2)` on an open descriptor of
    /// it (`POLLPRI`), so this sleeps there; but it rate-limits the signal
    /// to one per 10 ms per file (a freeze right after a thaw would wait
    /// for the timer), so the file is also re-read every millisecond.
    ///
    /// Not inotify: closing an inotify descriptor that watched a file waits
    /// for an SRCU grace period (`fsnotify_destroy_group`), measured at
    /// 10-15 ms here, after every freeze, thaw and kill.
    fn wait_event(
        &self,
        key: &'static str,
        want: u64,
        timeout: Duration,
    ) -> Result<(), CgroupError> {
        let path = self.path.join("cgroup.events");
        let file = std::fs::File::open(&path).map_err(io_err("open", &path))?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 256];
        loop {
            // Read from the start each time: a read also marks the change
            // seen, so poll waits for the next one.
            let n = std::os::unix::fs::FileExt::read_at(&file, &mut buf, 0)
                .map_err(io_err("read", &path))?;
            if parse_events(&String::from_utf8_lossy(&buf[..n]), key) == Some(want) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CgroupError::Timeout {
                    path: self.path.clone(),
                    what: key,
                    timeout,
                });
            }
            // One millisecond: the re-read above is the real check.
            let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
            match poll(&mut fds, PollTimeout::from(1u8)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io_err("poll", &path)(e.into())),
            }
        }
    }
}

/// Frozen cgroups, thawed when dropped (also on error paths and panics).
pub struct FreezeGuard {
    frozen: Vec<Cgroup>,
}

impl FreezeGuard {
    /// Freezes every cgroup; on failure thaws those already frozen.
    pub fn freeze_all(cgroups: Vec<Cgroup>, timeout: Duration) -> Result<Self, CgroupError> {
        let guard = Self::begin(cgroups)?;
        guard.wait(timeout)?;
        Ok(guard)
    }

    /// Asks every cgroup to freeze without waiting (a CRIU dump can start
    /// on a cgroup still freezing: it seizes the tasks itself); call
    /// [`FreezeGuard::wait`] before relying on the freeze.
    pub fn begin(cgroups: Vec<Cgroup>) -> Result<Self, CgroupError> {
        let mut guard = FreezeGuard {
            frozen: Vec::with_capacity(cgroups.len()),
        };
        for cg in &cgroups {
            cg.write("cgroup.freeze", "1")?;
            guard.frozen.push(cg.clone());
        }
        Ok(guard)
    }

    /// Cgroups someone else freezes (CRIU's `pre-dump` hook), thawed when
    /// dropped like the others; [`FreezeGuard::ask`] freezes them here.
    pub fn adopt(cgroups: Vec<Cgroup>) -> Self {
        FreezeGuard { frozen: cgroups }
    }

    /// Asks every cgroup to freeze (again: a frozen one stays so), without
    /// waiting.
    pub fn ask(&self) -> Result<(), CgroupError> {
        for cg in &self.frozen {
            cg.write("cgroup.freeze", "1")?;
        }
        Ok(())
    }

    /// Returns once every cgroup is frozen (no task of theirs in a system
    /// call any more).
    pub fn wait(&self, timeout: Duration) -> Result<(), CgroupError> {
        self.wait_except(&[], timeout)
    }

    /// [`FreezeGuard::wait`] for every cgroup but those at `settled` (paths
    /// whose tasks are known to be stopped already).
    pub fn wait_except(&self, settled: &[&Path], timeout: Duration) -> Result<(), CgroupError> {
        for cg in &self.frozen {
            if !settled.contains(&cg.path()) {
                cg.wait_event("frozen", 1, timeout)?;
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.frozen.len()
    }

    /// The processes of every frozen cgroup and of the cgroups below them
    /// (a list that cannot be read is skipped: the cgroup went away).
    pub fn pids(&self) -> Vec<i32> {
        self.frozen.iter().flat_map(Cgroup::pids_below).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.frozen.is_empty()
    }
}

impl Drop for FreezeGuard {
    /// Releases every cgroup (not waiting for each task to run again: the
    /// freeze window ends when the services may run).
    fn drop(&mut self) {
        for cg in &self.frozen {
            if let Err(e) = cg.release() {
                tracing::error!(error = %e, "thaw failed");
            }
        }
    }
}

/// The state letter of thread `tid` (`/proc/<tid>/stat`); none if it is gone.
fn task_state(tid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).ok()?;
    state_of_stat(&stat)
}

/// The state field of a `/proc/<pid>/stat` line: the first field after the
/// command name, which is in parentheses and may itself hold `)`, spaces
/// and anything else the process chose (so: after the last `)`).
fn state_of_stat(stat: &str) -> Option<char> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

/// `populated 1\nfrozen 0\n` → the value of `key`.
pub fn parse_events(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

impl CgroupSupport {
    /// The report when cgroups are unusable.
    pub fn unavailable(error: &CgroupError) -> Self {
        CgroupSupport {
            available: false,
            mount: None,
            parent: None,
            freeze: false,
            kill: false,
            moves: None,
            error: Some(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_is_read_after_the_last_parenthesis() {
        assert_eq!(state_of_stat("42 (sh) D 1 42 42 0 -1"), Some('D'));
        assert_eq!(state_of_stat("42 (a) S (b)) R 1 2"), Some('R'));
        assert_eq!(state_of_stat("7 (x y\n) ) t 1"), Some('t'));
        assert_eq!(state_of_stat("7 (cut"), None);
        assert_eq!(state_of_stat("7 (end)"), None);
        assert_eq!(state_of_stat(""), None);
    }

    #[test]
    fn child_names_are_one_plain_component() {
        for ok in ["_init", "web", "_exec-12", "a.b"] {
            assert!(plain_child_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../..", "a/b", "/abs", "nul\0"] {
            assert!(!plain_child_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_remount_for_fast_moves_keeps_every_other_option() {
        let e = v2_mount_entry(
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n",
        )
        .unwrap();
        assert_eq!(e.point, PathBuf::from("/sys/fs/cgroup"));
        assert!(!e.has("favordynmods"));
        assert!(e.has("nsdelegate"));
        let (flags, data) = e.remount_with("favordynmods");
        use nix::mount::MsFlags as F;
        assert_eq!(
            flags,
            F::MS_REMOUNT | F::MS_NOSUID | F::MS_NODEV | F::MS_NOEXEC | F::MS_RELATIME
        );
        assert_eq!(data, "nsdelegate,memory_recursiveprot,favordynmods");
        // A read-only mount stays read-only; the option is not doubled.
        let ro = MountEntry {
            point: "/c".into(),
            mount_opts: "ro,noatime".into(),
            super_opts: "ro,favordynmods".into(),
        };
        assert!(ro.has("favordynmods"));
        let (flags, data) = ro.remount_with("favordynmods");
        assert_eq!(flags, F::MS_REMOUNT | F::MS_RDONLY | F::MS_NOATIME);
        assert_eq!(data, "favordynmods");
        // A line cut short names no mount.
        assert_eq!(
            v2_mount_entry("29 23 0:26 / /c - cgroup2 cgroup2 rw\n"),
            None
        );
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_unified_on_hybrid_hosts() {
        assert_eq!(
            find_v2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn prefers_root_mount_and_unescapes() {
        let text = "\
50 1 0:40 /sub /mnt/ns\\040dir rw - cgroup2 cgroup2 rw
29 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(find_v2_mount(text), Some(PathBuf::from("/sys/fs/cgroup")));
        let only_sub = text.lines().next().unwrap();
        assert_eq!(find_v2_mount(only_sub), Some(PathBuf::from("/mnt/ns dir")));
    }

    #[test]
    fn events() {
        assert_eq!(parse_events("populated 1\nfrozen 0\n", "frozen"), Some(0));
        assert_eq!(
            parse_events("populated 1\nfrozen 0\n", "populated"),
            Some(1)
        );
        assert_eq!(parse_events("populated 1\n", "frozen"), None);
    }

    #[test]
    fn none_without_v2() {
        let text = HYBRID.lines().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(find_v2_mount(&text), None);
    }

    #[test]
    fn open_in_a_fake_root() {
        let d = tempfile::tempdir().unwrap();
        let mi = d.path().join("mountinfo");
        let root = d.path().join("cg");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(
            &mi,
            format!("41 31 0:38 / {} rw - cgroup2 cgroup2 rw\n", root.display()),
        )
        .unwrap();
        let cg = Cgroups::open(&mi, Path::new("sprited/abc")).unwrap();
        assert_eq!(cg.parent(), root.join("sprited/abc"));
        let s = cg.support();
        assert!(s.available && !s.freeze);
        cg.remove_parent_if_empty();
        assert!(!root.join("sprited").exists());
        assert!(root.exists());

        std::fs::write(&mi, "").unwrap();
        let e = Cgroups::open(&mi, Path::new("x")).unwrap_err();
        assert!(e.to_string().contains(mi.to_str().unwrap()));
    }

    #[test]
    fn the_device_program_allows_the_rules_and_denies_the_rest() {
        // A tiny interpreter of the five opcodes the program uses.
        fn run(p: &[crate::sys::BpfInsn], ctx: [u32; 3]) -> u64 {
            let mut r = [0u64; 11];
            let mut pc = 0usize;
            loop {
                let i = p[pc];
                let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
                pc += 1;
                match i.code {
                    0x61 => {
                        assert_eq!(src, 1);
                        r[dst] = u64::from(ctx[i.off as usize / 4]);
                    }
                    0x54 => r[dst] = (r[dst] as u32 & i.imm as u32) as u64,
                    0x55 => {
                        if r[dst] != i.imm as i64 as u64 {
                            pc += i.off as usize;
                        }
                    }
                    0xb7 => r[dst] = i.imm as i64 as u64,
                    0x95 => return r[0],
                    other => panic!("opcode {other:#x}"),
                }
            }
        }
        let rules = [
            DeviceRule {
                major: 1,
                minor: Some(3),
            },
            DeviceRule {
                major: 136,
                minor: None,
            },
        ];
        let p = device_program(&rules);
        let read_char = |major, minor| [(2 << 16) | 2, major, minor];
        assert_eq!(run(&p, read_char(1, 3)), 1, "/dev/null");
        assert_eq!(run(&p, read_char(1, 5)), 0, "/dev/zero");
        assert_eq!(run(&p, read_char(136, 7)), 1, "any pty");
        assert_eq!(run(&p, [(2 << 16) | 1, 1, 3]), 0, "a block device 1:3");
        assert_eq!(
            run(&device_program(&[]), read_char(1, 3)),
            0,
            "nothing allowed"
        );
    }
}
