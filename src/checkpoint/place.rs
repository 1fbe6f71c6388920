//! Putting restored processes back in their cgroups. CRIU restores every
//! task into the init's cgroup (`--manage-cgroups=ignore`: the daemon's
//! cgroups are its own business); each process then goes back to the
//! cgroup it was dumped in.
//!
//! The placement is made by CRIU's `pre-resume` action script (`hook`),
//! which runs when every task is restored and none runs yet, so none can
//! fork on the way, with [`PLAN_ENV`] naming the plan. The restore
//! then checks that nothing was left behind; if something was (the hook
//! could not run), it moves the rest with the init's cgroup frozen.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cgroup::{Cgroup, Cgroups};

/// The environment variable that names the plan file for the hook.
pub(crate) const PLAN_ENV: &str = "SPRITED_CRIU_PLACEMENT";

/// Which namespace pids go to which cgroup (the init's cgroup's others stay).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Placement {
    init: PathBuf,
    to: Vec<(PathBuf, Vec<i32>)>,
}

impl Placement {
    /// From a dump's cgroup names and the namespace pids each held.
    pub(crate) fn new(
        cgroups: &Cgroups,
        wanted: &BTreeMap<String, Vec<i32>>,
    ) -> Result<Placement, crate::cgroup::CgroupError> {
        let init = cgroups.child(crate::container::INIT_CGROUP)?;
        let mut to = Vec::new();
        for (name, pids) in wanted {
            if name != crate::container::INIT_CGROUP {
                to.push((cgroups.child(name)?.path().to_owned(), pids.clone()));
            }
        }
        Ok(Placement {
            init: init.path().to_owned(),
            to,
        })
    }

    /// The moves still to make: each process in the init's cgroup that was
    /// dumped elsewhere, as (host pid, its cgroup). Processes outside the
    /// environment's PID namespace (CRIU and this hook) are not its.
    pub(crate) fn pending(&self) -> Vec<(i32, Cgroup)> {
        let init = Cgroup::at(self.init.clone());
        let mut out = Vec::new();
        for host in init.pids().unwrap_or_default() {
            let Some(pid) = crate::container::ns_pid_inside(host) else {
                continue;
            };
            if let Some((path, _)) = self.to.iter().find(|(_, pids)| pids.contains(&pid)) {
                out.push((host, Cgroup::at(path.clone())));
            }
        }
        out
    }

    /// Makes the moves; returns how many could not be made.
    pub(crate) fn apply(moves: &[(i32, Cgroup)]) -> usize {
        let mut failed = 0;
        for (host, cg) in moves {
            if let Err(e) = cg.add(*host) {
                tracing::warn!(pid = host, error = %e, "cannot put a restored process back in its cgroup");
                failed += 1;
            }
        }
        failed
    }

    /// The init's cgroup.
    pub(crate) fn init(&self) -> Cgroup {
        Cgroup::at(self.init.clone())
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(data)
}

/// Writes the plan for the restore's hook into state dir `state` (the
/// daemon's: out of the environment's reach); returns its path.
pub(crate) fn write_plan(
    state: &Path,
    placement: &Placement,
) -> Result<PathBuf, crate::durable::DurableError> {
    let plan = state.join("criu-placement.json");
    let json = serde_json::to_vec(placement).expect("a placement serializes");
    // (not durable: read once, now; a crash leaves a stale one to overwrite)
    write_private(&plan, &json).map_err(crate::durable::err("write", &plan))?;
    Ok(plan)
}

/// The `pre-resume` hook (see `hook`): makes the placement in the plan at
/// `plan`; the exit code. A failed placement exits 1, which CRIU logs and
/// goes on: the restore moves the rest itself.
pub(crate) fn place_by_plan(plan: &Path) -> u8 {
    let placement: Placement = match std::fs::read(plan)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sprited pre-resume: cannot read the placement plan: {e}");
            return 1;
        }
    };
    let moves = placement.pending();
    let failed = Placement::apply(&moves);
    if failed > 0 {
        eprintln!("sprited pre-resume: {failed} process(es) not placed");
        return 1;
    }
    0
}
