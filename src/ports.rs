//! Listening TCP ports: the only code that reads `/proc/net/tcp{,6}` and
//! maps sockets to processes.
//!
//! A poller reads the socket tables every [`POLL`] while anyone listens for
//! changes, and only when a new listening socket appears does it look for its
//! owner (`/proc/<pid>/fd` links to `socket:[inode]`, then that process's
//! cgroup), so the cost follows the changes, not the process count.
//! Subscribers get a snapshot and then every change, with nothing missed in
//! between (both are taken under one lock).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

/// How often the socket tables are read while someone watches.
pub const POLL: Duration = Duration::from_millis(200);

/// A listening TCP socket and the process that owns it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listener {
    pub port: u16,
    pub address: String,
    /// The owner's pid in its own PID namespace (the environment's).
    pub pid: i32,
    /// The owner's cgroup v2 path (`/sprited/_exec-3`), empty if unknown.
    #[serde(skip)]
    pub cgroup: String,
    #[serde(skip)]
    inode: u64,
}

/// A change: `port_opened` or `port_closed`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PortEvent {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(flatten)]
    pub listener: Listener,
}

struct Table {
    /// By socket inode.
    current: BTreeMap<u64, Listener>,
}

/// Cheap, cloneable handle to the watcher.
#[derive(Clone)]
pub struct Ports {
    proc_root: Arc<PathBuf>,
    /// `proc_root`-relative dir of the socket tables read: `net`, or the
    /// environment's own namespace's.
    net_dir: Arc<Mutex<PathBuf>>,
    table: Arc<Mutex<Table>>,
    tx: broadcast::Sender<PortEvent>,
}

impl Ports {
    /// Starts the poller (inside the tokio runtime). `proc_root` is `/proc`.
    pub fn spawn(proc_root: PathBuf) -> Self {
        let (tx, _) = broadcast::channel(256);
        let ports = Ports {
            proc_root: Arc::new(proc_root),
            net_dir: Arc::new(Mutex::new(PathBuf::from("net"))),
            table: Arc::new(Mutex::new(Table {
                current: BTreeMap::new(),
            })),
            tx,
        };
        let p = ports.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if p.tx.receiver_count() == 0 {
                    continue;
                }
                let q = p.clone();
                let _ = tokio::task::spawn_blocking(move || q.refresh()).await;
            }
        });
        ports
    }

    /// Reads the socket tables of `dir` (relative to `/proc`) from now on:
    /// the environment's own network namespace's.
    pub fn set_net_dir(&self, dir: PathBuf) {
        *self.net_dir.lock().unwrap_or_else(|e| e.into_inner()) = dir;
    }

    /// The listeners now, and a receiver of every change after them.
    pub fn subscribe(&self) -> (Vec<Listener>, broadcast::Receiver<PortEvent>) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        self.refresh_locked(&mut t);
        (t.current.values().cloned().collect(), rx)
    }

    fn refresh(&self) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh_locked(&mut t);
    }

    fn refresh_locked(&self, t: &mut Table) {
        let mut now: BTreeMap<u64, (u16, String)> = BTreeMap::new();
        let dir = self
            .proc_root
            .join(&*self.net_dir.lock().unwrap_or_else(|e| e.into_inner()));
        for file in ["tcp", "tcp6"] {
            if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                for (inode, port, addr) in parse_listeners(&text) {
                    now.insert(inode, (port, addr));
                }
            }
        }
        let gone: Vec<u64> = t
            .current
            .keys()
            .filter(|i| !now.contains_key(i))
            .copied()
            .collect();
        for inode in gone {
            if let Some(l) = t.current.remove(&inode) {
                let _ = self.tx.send(PortEvent {
                    kind: "port_closed",
                    listener: l,
                });
            }
        }
        let new: Vec<u64> = now
            .keys()
            .filter(|i| !t.current.contains_key(i))
            .copied()
            .collect();
        if new.is_empty() {
            return;
        }
        let owners = find_owners(&self.proc_root, &new);
        for inode in new {
            let (port, address) = now.remove(&inode).unwrap_or_default();
            let (pid, cgroup) = owners.get(&inode).cloned().unwrap_or((0, String::new()));
            if pid == 0 {
                // Not ours to see yet (the owner is still starting); next poll.
                continue;
            }
            let l = Listener {
                port,
                address,
                pid,
                cgroup,
                inode,
            };
            t.current.insert(inode, l.clone());
            let _ = self.tx.send(PortEvent {
                kind: "port_opened",
                listener: l,
            });
        }
    }
}

/// `(inode, port, address)` of every LISTEN socket in a `/proc/net/tcp{,6}` table.
pub fn parse_listeners(text: &str) -> Vec<(u64, u16, String)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some((addr, port)) = f[1].split_once(':') else {
            continue;
        };
        let (Ok(port), Ok(inode)) = (u16::from_str_radix(port, 16), f[9].parse::<u64>()) else {
            continue;
        };
        if inode == 0 {
            continue;
        }
        if let Some(a) = parse_addr(addr) {
            out.push((inode, port, a));
        }
    }
    out
}

/// The kernel prints addresses as 32-bit words in host (little-endian) order.
fn parse_addr(hex: &str) -> Option<String> {
    let words: Option<Vec<u32>> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect();
    let words = words?;
    match words.len() {
        1 => Some(std::net::Ipv4Addr::from(words[0].swap_bytes()).to_string()),
        4 => {
            let mut b = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(b);
            Some(match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => v6.to_string(),
            })
        }
        _ => None,
    }
}

/// For each wanted socket inode, the pid holding it (as its own PID
/// namespace sees it: the environment's pid for a process inside) and that
/// pid's cgroup.
fn find_owners(proc_root: &Path, wanted: &[u64]) -> BTreeMap<u64, (i32, String)> {
    let mut out = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir(proc_root) else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = link
                .to_str()
                .and_then(|s| s.strip_prefix("socket:["))
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            if wanted.contains(&inode) && !out.contains_key(&inode) {
                let cg = std::fs::read_to_string(p.path().join("cgroup"))
                    .ok()
                    .and_then(|t| {
                        t.lines()
                            .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
                    })
                    .unwrap_or_default();
                let inner = std::fs::read_to_string(p.path().join("status"))
                    .ok()
                    .and_then(|t| {
                        t.lines()
                            .find_map(|l| l.strip_prefix("NSpid:"))?
                            .split_whitespace()
                            .last()?
                            .parse::<i32>()
                            .ok()
                    })
                    .unwrap_or(pid);
                out.insert(inode, (inner, cg));
            }
        }
        if out.len() == wanted.len() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:270F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:270F 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 999 1\n   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        assert_eq!(
            parse_listeners(v4),
            vec![
                (12345, 9999, "127.0.0.1".to_owned()),
                (777, 80, "0.0.0.0".to_owned())
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st\n   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1\n   1: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4243 1\n   2: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4244 1\n";
        assert_eq!(
            parse_listeners(v6),
            vec![
                (4242, 8080, "::".to_owned()),
                (4243, 8081, "::1".to_owned()),
                (4244, 8082, "127.0.0.1".to_owned())
            ]
        );
    }
}
