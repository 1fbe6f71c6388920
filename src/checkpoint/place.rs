//! Putting restored processes back in their cgroups. CRIU restores every
//! task into the init's cgroup (`--manage-cgroups=ignore`: the daemon's
//! cgroups are its own business); each process then goes back to the
//! cgroup it was dumped in.
//!
//! The daemon makes the placement while CRIU's `pre-resume` action script
//! waits at the restore's gate (`hook`): every task is restored and none
//! runs yet, so none can fork on the way. The restore then checks that
//! nothing was left behind; if something was (the hook could not run), it
//! moves the rest with the init's cgroup frozen.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::cgroup::{Cgroup, Cgroups};

/// Which namespace pids go to which cgroup (the init's cgroup's others stay).
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    init: PathBuf,
    to: Vec<(PathBuf, Vec<i32>)>,
}

impl Placement {
    /// From a dump's cgroup names and the namespace pids each held. With
    /// `devices` (the privileges policy in force), each cgroup but the
    /// init's gets its device program before any process goes there, as
    /// the launcher does for a process it starts.
    pub(crate) fn new(
        cgroups: &Cgroups,
        wanted: &BTreeMap<String, Vec<i32>>,
        devices: Option<&[crate::cgroup::DeviceRule]>,
    ) -> Result<Placement, crate::cgroup::CgroupError> {
        let init = cgroups.child(crate::container::INIT_CGROUP)?;
        let mut to = Vec::new();
        for (name, pids) in wanted {
            if name != crate::container::INIT_CGROUP {
                let cgroup = cgroups.child(name)?;
                if let Some(allowed) = devices {
                    cgroup.restrict_devices(allowed)?;
                }
                to.push((cgroup.path().to_owned(), pids.clone()));
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
