//! The environment's network: the only code that touches its network
//! namespace, the veth pair that links it to the host, the host's nftables
//! table for it, and the DNS resolver it uses ([`dns`]).
//!
//! With `--network own` (the default) the environment gets a network
//! namespace of its own, made once per daemon and kept across restarts of
//! the environment and restores (CRIU gets it as an external namespace):
//!
//! - `eth0` inside, one end of a veth pair; the other end (`spr…`) is in
//!   the daemon's namespace. A /30 of 100.64.0.0/10 (from the daemon id)
//!   addresses them; the environment's default route is the daemon's end.
//! - An nftables table (`inet sprited_…`) in the daemon's namespace: NAT
//!   for what leaves, every DNS query (port 53, any address) redirected to
//!   the daemon's resolver, and the network policy's filter.
//! - The resolver (in the daemon, on the daemon's end) answers `REFUSED`
//!   for a denied name and forwards an allowed one upstream. Under an
//!   allowlist (`deny *`) the addresses an allowed name resolved to join a
//!   set, and the environment reaches nothing else.
//!
//! All of it lives outside the environment: root inside has no
//! `CAP_NET_ADMIN` in the daemon's namespace, so it can change none of it.
//! A policy change rebuilds the table in one nftables transaction and
//! closes the environment's connections to addresses it no longer may
//! reach (`ss -K`, socket destroy, inside the namespace).
//!
//! The daemon reaches ports inside (proxies, the ingress, readiness checks)
//! with sockets made in the namespace ([`Network::connect`]), and port
//! watching reads the namespace's own socket tables ([`Network::proc_net`]).

pub mod dns;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::policy::NetworkPolicy;
use crate::reaper::{Exit, Reaper};

/// The key CRIU knows the environment's namespace by (`--external
/// net[inode]:KEY` on dump, `--inherit-fd fd[N]:KEY` on restore).
pub const CRIU_KEY: &str = "sprited-netns";
/// How long `ip`, `nft` and `ss` may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// Shortest and longest time an allowed address stays in the set after a
/// lookup (the answer's TTL, clamped): connections already made survive
/// its expiry (they are established), new ones need a fresh lookup.
const MIN_ALLOW: Duration = Duration::from_secs(300);
const MAX_ALLOW: Duration = Duration::from_secs(24 * 3600);
/// Most names remembered with what they resolved to.
const MAX_RECORDS: usize = 4096;
/// Most addresses kept from one answer.
const MAX_ADDRS_PER_NAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("`{cmd}` failed: {output}")]
    Command { cmd: String, output: String },
}

fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
    let op = op.into();
    move |source| NetworkError::Io { op, source }
}

/// What the network needs from the daemon.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Names the interface, the table and the addresses, so daemons side
    /// by side (tests) do not collide.
    pub daemon_id: String,
    /// Where allowed lookups go (the host's resolvers by default).
    pub upstreams: Vec<SocketAddr>,
    /// Where the rules file is written (the state dir's `network/`).
    pub dir: PathBuf,
}

/// A request to the thread that lives in the namespace: a new socket there
/// (`AF_INET` of this type, or `None`: a `NETLINK_SOCK_DIAG` one).
type SocketRequest = (
    Option<libc::c_int>,
    std::sync::mpsc::SyncSender<io::Result<OwnedFd>>,
);

/// A name and what it last resolved to.
struct Record {
    addrs: Vec<Ipv4Addr>,
    until: Instant,
}

#[derive(Default)]
struct State {
    policy: Option<NetworkPolicy>,
    records: HashMap<String, Record>,
}

/// The environment's network (see the module docs).
pub struct Network {
    netns: Arc<OwnedFd>,
    netns_inode: u64,
    sockets: std::sync::Mutex<std::sync::mpsc::Sender<SocketRequest>>,
    /// `<daemon pid>/task/<tid>/net` of the thread in the namespace.
    proc_net: PathBuf,
    host_if: String,
    table: String,
    gateway: Ipv4Addr,
    address: Ipv4Addr,
    reaper: Reaper,
    cfg: NetworkConfig,
    /// Held across every change of the table, so lookups and policy
    /// changes apply in order.
    state: tokio::sync::Mutex<State>,
}

impl Network {
    /// Makes the namespace, links it to the daemon's, writes the table
    /// (no policy: everything allowed) and starts the resolver. What a
    /// crashed daemon with the same id left is removed first.
    #[tracing::instrument(name = "network_create", skip_all, fields(daemon = %cfg.daemon_id))]
    pub async fn create(cfg: NetworkConfig, reaper: Reaper) -> Result<Arc<Network>, NetworkError> {
        let h = fnv(&cfg.daemon_id);
        let block = 0x6440_0000u32 + ((h as u32) & 0x000f_ffff) * 4;
        let (gateway, address) = (Ipv4Addr::from(block + 1), Ipv4Addr::from(block + 2));
        let host_if = format!("spr{:08x}", h as u32);
        let table = format!("sprited_{:08x}", h as u32);
        let (netns, sockets, tid) = namespace_thread()?;
        let netns_inode = nix::sys::stat::fstat(&*netns)
            .map_err(|e| io_err("stat the namespace")(e.into()))?
            .st_ino;
        std::fs::create_dir_all(&cfg.dir)
            .map_err(io_err(format!("create {}", cfg.dir.display())))?;
        let net = Arc::new(Network {
            netns,
            netns_inode,
            sockets: std::sync::Mutex::new(sockets),
            proc_net: PathBuf::from(format!("{}/task/{tid}/net", std::process::id())),
            host_if,
            table,
            gateway,
            address,
            reaper,
            cfg,
            state: tokio::sync::Mutex::new(State::default()),
        });
        net.remove_leftovers().await;
        net.link().await?;
        net.write_table(&State::default(), &[]).await?;
        dns::serve(net.clone(), SocketAddr::from((gateway, 53))).await?;
        tracing::info!(interface = %net.host_if, gateway = %gateway, address = %address, "the environment has its own network");
        Ok(net)
    }

    /// The namespace, for the environment's init to join and CRIU to
    /// restore into.
    pub fn netns(&self) -> Arc<OwnedFd> {
        self.netns.clone()
    }

    /// Its inode, which CRIU's dump names it by.
    pub fn netns_inode(&self) -> u64 {
        self.netns_inode
    }

    /// `/proc`-relative dir of the namespace's socket tables (`tcp`, `tcp6`).
    pub fn proc_net(&self) -> PathBuf {
        self.proc_net.clone()
    }

    /// The environment's address on its `eth0`.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The daemon's end of the veth pair.
    pub fn interface(&self) -> &str {
        &self.host_if
    }

    /// A TCP connection to `127.0.0.1:port` inside the namespace.
    pub async fn connect(&self, port: u16) -> io::Result<tokio::net::TcpStream> {
        let rx = self.ask(Some(libc::SOCK_STREAM))?;
        let fd = tokio::task::spawn_blocking(move || rx.recv())
            .await
            .map_err(io::Error::other)?
            .map_err(|_| io::Error::other("the namespace's thread is gone"))??;
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
    }

    /// Every unix socket of the namespace with its peer (see
    /// `sys::unix_socket_peers`). Blocking (briefly).
    pub fn unix_socket_peers(&self) -> io::Result<std::collections::HashMap<u64, u64>> {
        let fd = self
            .ask(None)?
            .recv()
            .map_err(|_| io::Error::other("the namespace's thread is gone"))??;
        crate::sys::unix_socket_peers_with(fd)
    }

    /// Asks the namespace's thread for a socket (`AF_INET` of type `kind`,
    /// or `None`: `NETLINK_SOCK_DIAG`); it comes on the receiver.
    fn ask(
        &self,
        kind: Option<libc::c_int>,
    ) -> io::Result<std::sync::mpsc::Receiver<io::Result<OwnedFd>>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((kind, tx))
            .map_err(|_| io::Error::other("the namespace's thread is gone"))?;
        Ok(rx)
    }

    /// The policy in force (`None`: everything allowed).
    pub async fn policy(&self) -> Option<NetworkPolicy> {
        self.state.lock().await.policy.clone()
    }

    /// Puts `policy` in force at once: the table is rebuilt in one
    /// transaction, keeping the addresses of names still allowed, and the
    /// environment's connections to addresses it may no longer reach are
    /// closed.
    #[tracing::instrument(name = "network_policy", skip_all, fields(rules = policy.as_ref().map_or(0, |p| p.rules.len())))]
    pub async fn apply(&self, policy: Option<NetworkPolicy>) -> Result<(), NetworkError> {
        let mut st = self.state.lock().await;
        let before = std::mem::replace(&mut st.policy, policy.filter(|p| !p.rules.is_empty()));
        let (allowed, revoked) = split(&st);
        if let Err(e) = self.write_table(&st, &revoked).await {
            st.policy = before; // the table is as it was
            return Err(e);
        }
        let allowlist = st.policy.as_ref().is_some_and(|p| p.is_allowlist());
        drop(st);
        self.close_connections(allowlist, &allowed, &revoked).await;
        Ok(())
    }

    /// Whether a lookup of `name` may go upstream.
    pub(crate) async fn allows(&self, name: &str) -> bool {
        self.state
            .lock()
            .await
            .policy
            .as_ref()
            .is_none_or(|p| p.allows(name))
    }

    /// Records what an allowed `name` resolved to; under an allowlist the
    /// addresses join the set before the answer reaches the environment.
    pub(crate) async fn resolved(&self, name: &str, addrs: Vec<(Ipv4Addr, u32)>) {
        if addrs.is_empty() {
            return;
        }
        let ttl = addrs.iter().map(|(_, t)| *t).min().unwrap_or(0);
        let keep = Duration::from_secs(ttl.into()).clamp(MIN_ALLOW, MAX_ALLOW);
        let mut addrs: Vec<Ipv4Addr> = addrs.into_iter().map(|(a, _)| a).collect();
        addrs.sort();
        addrs.dedup();
        addrs.truncate(MAX_ADDRS_PER_NAME);
        let mut st = self.state.lock().await;
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !st.policy.as_ref().is_none_or(|p| p.allows(&name)) {
            return; // the policy changed meanwhile
        }
        let now = Instant::now();
        if st.records.len() >= MAX_RECORDS && !st.records.contains_key(&name) {
            st.records.retain(|_, r| r.until > now);
            if st.records.len() >= MAX_RECORDS
                && let Some(oldest) = st
                    .records
                    .iter()
                    .min_by_key(|(_, r)| r.until)
                    .map(|(n, _)| n.clone())
            {
                st.records.remove(&oldest);
            }
        }
        st.records.insert(
            name,
            Record {
                addrs: addrs.clone(),
                until: now + keep,
            },
        );
        if st.policy.as_ref().is_some_and(|p| p.is_allowlist()) {
            let elements: Vec<String> = addrs
                .iter()
                .map(|a| format!("{a} timeout {}s", keep.as_secs()))
                .collect();
            let cmd = format!(
                "add element inet {} allowed {{ {} }}",
                self.table,
                elements.join(", ")
            );
            if let Err(e) = self.nft_script(&cmd).await {
                tracing::warn!(error = %e, "cannot allow the addresses of an allowed name");
            }
        }
    }

    /// Removes the veth pair and the table (at shutdown; the namespace goes
    /// with the last process and fd that hold it).
    pub async fn teardown(&self) {
        self.remove_leftovers().await;
    }

    async fn remove_leftovers(&self) {
        let _ = self
            .run(host_cmd("ip", &["link", "del", &self.host_if]))
            .await;
        let _ = self
            .run(host_cmd("nft", &["delete", "table", "inet", &self.table]))
            .await;
    }

    /// The veth pair, addresses, routes, and forwarding on.
    async fn link(&self) -> Result<(), NetworkError> {
        let (gw, addr) = (
            format!("{}/30", self.gateway),
            format!("{}/30", self.address),
        );
        let pid = std::process::id().to_string();
        let inside: [&[&str]; 5] = [
            &["link", "set", "lo", "up"],
            &[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &self.host_if,
                "netns",
                &pid,
            ],
            &["addr", "add", &addr, "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &["route", "add", "default", "via", &self.gateway.to_string()],
        ];
        for args in inside {
            let mut cmd = host_cmd("ip", args);
            crate::sys::setns_before_exec(&mut cmd, self.netns.clone(), libc::CLONE_NEWNET);
            self.run(cmd).await?;
        }
        self.run(host_cmd("ip", &["addr", "add", &gw, "dev", &self.host_if]))
            .await?;
        self.run(host_cmd("ip", &["link", "set", &self.host_if, "up"]))
            .await?;
        let fwd = "/proc/sys/net/ipv4/ip_forward";
        std::fs::write(fwd, "1").map_err(io_err(format!("write {fwd}")))?;
        Ok(())
    }

    /// Replaces the table in one transaction: NAT, DNS to the resolver,
    /// and the filter for `st`'s policy, with `revoked` refused.
    async fn write_table(&self, st: &State, revoked: &[Ipv4Addr]) -> Result<(), NetworkError> {
        let (allowed, _) = split(st);
        let now = Instant::now();
        let allowed: Vec<String> = allowed
            .iter()
            .map(|a| {
                let until = st
                    .records
                    .values()
                    .filter(|r| r.addrs.contains(a))
                    .map(|r| r.until)
                    .max()
                    .unwrap_or(now);
                let secs = until.saturating_duration_since(now).as_secs().max(60);
                format!("{a} timeout {secs}s")
            })
            .collect();
        let allowlist = st.policy.as_ref().is_some_and(|p| p.is_allowlist());
        let script = table_script(&TableSpec {
            table: &self.table,
            host_if: &self.host_if,
            gateway: self.gateway,
            address: self.address,
            allowlist,
            allowed: &allowed,
            revoked: &revoked.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        });
        let file = self.cfg.dir.join("rules.nft");
        std::fs::write(&file, script).map_err(io_err(format!("write {}", file.display())))?;
        let mut cmd = Command::new("nft");
        cmd.arg("-f").arg(&file);
        self.run(cmd).await
    }

    /// Closes the environment's connections it may no longer keep: under
    /// an allowlist every one to an address not allowed (loopback and the
    /// resolver aside), else those to `revoked`.
    async fn close_connections(&self, allowlist: bool, allowed: &[Ipv4Addr], revoked: &[Ipv4Addr]) {
        let mut filter: Vec<String> = vec!["state".into(), "connected".into()];
        if allowlist {
            let mut keep = vec![
                "127.0.0.0/8".to_owned(),
                "[::1]".to_owned(),
                self.gateway.to_string(),
            ];
            keep.extend(allowed.iter().map(|a| a.to_string()));
            filter.extend(["not".into(), "(".into()]);
            for (i, k) in keep.iter().enumerate() {
                if i > 0 {
                    filter.push("or".into());
                }
                filter.extend(["dst".into(), k.clone()]);
            }
            filter.push(")".into());
        } else if revoked.is_empty() {
            return;
        } else {
            filter.push("(".into());
            for (i, a) in revoked.iter().enumerate() {
                if i > 0 {
                    filter.push("or".into());
                }
                filter.extend(["dst".into(), a.to_string()]);
            }
            filter.push(")".into());
        }
        let mut cmd = Command::new("ss");
        cmd.args(["-K", "-t", "-u", "-n"]).args(&filter);
        crate::sys::setns_before_exec(&mut cmd, self.netns.clone(), libc::CLONE_NEWNET);
        if let Err(e) = self.run(cmd).await {
            tracing::warn!(error = %e, "cannot close connections the policy no longer allows");
        }
    }

    async fn nft_script(&self, line: &str) -> Result<(), NetworkError> {
        let mut cmd = Command::new("nft");
        cmd.arg(line);
        self.run(cmd).await
    }

    async fn run(&self, mut cmd: Command) -> Result<(), NetworkError> {
        let shown = format!("{cmd:?}").replace('"', "");
        let (exit, output) = self
            .reaper
            .output(&mut cmd, COMMAND_TIMEOUT)
            .await
            .map_err(|e| NetworkError::Command {
                cmd: shown.clone(),
                output: e.to_string(),
            })?;
        if exit == Exit::Code(0) {
            Ok(())
        } else {
            Err(NetworkError::Command {
                cmd: shown,
                output: output.trim().to_owned(),
            })
        }
    }

    /// Where lookups go.
    pub(crate) fn upstreams(&self) -> &[SocketAddr] {
        &self.cfg.upstreams
    }
}

fn host_cmd(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// The addresses still allowed (of names the policy allows, not expired)
/// and those no longer (of names it denies, and not also of an allowed one).
fn split(st: &State) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    let now = Instant::now();
    let allows = |n: &str| st.policy.as_ref().is_none_or(|p| p.allows(n));
    let allowed: BTreeSet<Ipv4Addr> = st
        .records
        .iter()
        .filter(|(n, r)| r.until > now && allows(n))
        .flat_map(|(_, r)| r.addrs.iter().copied())
        .collect();
    let revoked: BTreeSet<Ipv4Addr> = st
        .records
        .iter()
        .filter(|(n, _)| !allows(n))
        .flat_map(|(_, r)| r.addrs.iter().copied())
        .filter(|a| !allowed.contains(a))
        .collect();
    (allowed.into_iter().collect(), revoked.into_iter().collect())
}

struct TableSpec<'a> {
    table: &'a str,
    host_if: &'a str,
    gateway: Ipv4Addr,
    address: Ipv4Addr,
    allowlist: bool,
    /// `ADDR timeout Ns` elements.
    allowed: &'a [String],
    revoked: &'a [String],
}

/// The nftables script that replaces the table (`add`, `delete`, define:
/// one transaction, so there is no instant without rules).
fn table_script(t: &TableSpec) -> String {
    let TableSpec {
        table,
        host_if,
        gateway,
        address,
        ..
    } = *t;
    let mut s = String::new();
    let _ = writeln!(s, "add table inet {table}\ndelete table inet {table}");
    let _ = writeln!(s, "table inet {table} {{");
    let set = |s: &mut String, name: &str, flags: &str, elements: &[String]| {
        let _ = writeln!(s, "  set {name} {{ type ipv4_addr; {flags}");
        if !elements.is_empty() {
            let _ = writeln!(s, "    elements = {{ {} }}", elements.join(", "));
        }
        let _ = writeln!(s, "  }}");
    };
    set(&mut s, "allowed", "flags timeout;", t.allowed);
    set(&mut s, "revoked", "", t.revoked);
    let _ = writeln!(
        s,
        "  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    iifname \"{host_if}\" meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {gateway}:53
  }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
    ip saddr {address} oifname != \"{host_if}\" masquerade
  }}
  chain input {{ type filter hook input priority filter; policy accept;
    iifname \"{host_if}\" jump from_env_to_host
  }}
  chain forward {{ type filter hook forward priority filter; policy accept;
    iifname \"{host_if}\" jump from_env
  }}
  chain from_env_to_host {{
    ct state established,related accept
    ip daddr {gateway} meta l4proto {{ tcp, udp }} th dport 53 accept"
    );
    if t.allowlist {
        let _ = writeln!(s, "    jump refuse");
    }
    let _ = writeln!(
        s,
        "  }}
  chain from_env {{
    ip daddr @revoked jump refuse"
    );
    if t.allowlist {
        let _ = writeln!(
            s,
            "    ip daddr @allowed accept
    ct state established,related accept
    jump refuse"
        );
    }
    let _ = writeln!(
        s,
        "  }}
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject with icmpx admin-prohibited
  }}
}}"
    );
    s
}

/// A thread that moves into a new network namespace and then makes
/// sockets there on request. Returns the namespace, the request channel
/// and the thread's id.
fn namespace_thread()
-> Result<(Arc<OwnedFd>, std::sync::mpsc::Sender<SocketRequest>, i32), NetworkError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let (tx, rx) = std::sync::mpsc::channel::<SocketRequest>();
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            let made = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)
                .and_then(|()| std::fs::File::open("/proc/thread-self/ns/net"))
                .map(|f| (OwnedFd::from(f), nix::unistd::gettid().as_raw()));
            let ok = made.is_ok();
            let _ = ready_tx.send(made);
            if !ok {
                return;
            }
            while let Ok((kind, reply)) = rx.recv() {
                let s = match kind {
                    None => crate::sys::sock_diag_socket(),
                    Some(kind) => nix::sys::socket::socket(
                        nix::sys::socket::AddressFamily::Inet,
                        if kind == libc::SOCK_DGRAM {
                            nix::sys::socket::SockType::Datagram
                        } else {
                            nix::sys::socket::SockType::Stream
                        },
                        nix::sys::socket::SockFlag::SOCK_CLOEXEC
                            | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
                        None,
                    )
                    .map_err(io::Error::from),
                };
                let _ = reply.send(s);
            }
        })
        .map_err(io_err("start the namespace's thread"))?;
    let (fd, tid) = ready_rx
        .recv()
        .map_err(|_| io_err("make a network namespace")(io::Error::other("the thread died")))?
        .map_err(io_err("make a network namespace"))?;
    Ok((Arc::new(fd), tx, tid))
}

/// FNV-1a: a stable hash of the daemon id (names and addresses).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The nameservers of a `resolv.conf` (port 53).
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("netns", &self.netns.as_raw_fd())
            .field("host_if", &self.host_if)
            .field("address", &self.address)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &str) -> NetworkPolicy {
        NetworkPolicy::from_request(format!(r#"{{"rules":{rules}}}"#).as_bytes()).unwrap()
    }

    #[test]
    fn names_decide_which_addresses_stay_and_which_go() {
        let later = Instant::now() + Duration::from_secs(60);
        let rec = |a: &[u8]| Record {
            addrs: a.iter().map(|n| Ipv4Addr::new(10, 0, 0, *n)).collect(),
            until: later,
        };
        let mut st = State::default();
        st.records.insert("a.test".into(), rec(&[1, 2]));
        st.records.insert("b.test".into(), rec(&[2, 3]));
        st.policy = Some(policy(
            r#"[{"action":"deny","domain":"b.test"},{"action":"allow","domain":"*"}]"#,
        ));
        let (allowed, revoked) = split(&st);
        let ip = |n| Ipv4Addr::new(10, 0, 0, n);
        assert_eq!(allowed, vec![ip(1), ip(2)]);
        assert_eq!(
            revoked,
            vec![ip(3)],
            "an address an allowed name shares stays"
        );
    }

    #[test]
    fn the_table_refuses_all_but_allowed_under_an_allowlist() {
        let (allowed, revoked) = (["1.2.3.4 timeout 300s".to_owned()], ["5.6.7.8".to_owned()]);
        let spec = |allowlist| TableSpec {
            table: "sprited_t",
            host_if: "sprt",
            gateway: Ipv4Addr::new(100, 64, 0, 1),
            address: Ipv4Addr::new(100, 64, 0, 2),
            allowlist,
            allowed: &allowed,
            revoked: &revoked,
        };
        let open = table_script(&spec(false));
        assert!(open.starts_with("add table inet sprited_t\ndelete table inet sprited_t\n"));
        assert!(open.contains("dnat ip to 100.64.0.1:53"));
        assert!(open.contains("masquerade"));
        assert!(open.contains("elements = { 5.6.7.8 }"));
        assert!(!open.contains("ip daddr @allowed accept"));
        let list = table_script(&spec(true));
        assert!(list.contains("elements = { 1.2.3.4 timeout 300s }"));
        assert!(list.contains(
            "ip daddr @allowed accept\n    ct state established,related accept\n    jump refuse"
        ));
    }

    #[test]
    fn nameservers_are_read_from_resolv_conf() {
        let got = nameservers(
            "# x\nnameserver 10.255.255.53\nsearch a\nnameserver ::1\nnameserver bogus\n",
        );
        assert_eq!(
            got,
            vec![
                "10.255.255.53:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
