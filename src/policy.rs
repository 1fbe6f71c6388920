//! The sprite's privileges policy (`/v1/policy/privileges`): which
//! capabilities a process started in the environment may hold, and whether
//! it may gain privileges by exec (`no_new_privs`). This module validates a
//! request's policy, keeps it in `<state>/policy/privileges.json` (written
//! atomically; read back on start) and turns it into what the launcher
//! applies: [`crate::container::Privileges`]. It applies to processes
//! started after the change; running ones keep what they have (a process's
//! bounding set can only shrink, and only from inside it).
//!
//! Profiles, all within the environment's default set (Docker's default
//! capabilities, [`crate::container::init::KEPT_CAPABILITIES`]):
//! - `standard` (also `""`, and no policy): the default set;
//! - `minimal`: `CAP_CHOWN`, `CAP_DAC_OVERRIDE`, `CAP_FOWNER`,
//!   `CAP_FSETID`, `CAP_KILL`, `CAP_SETUID` and `CAP_SETGID` (what a
//!   package manager or `su` needs); no raw sockets, no ports below 1024,
//!   no chroot;
//! - `privileged`: refused. More than the default set (`CAP_SYS_ADMIN` and
//!   the like) would let root inside reach past the environment: its
//!   mounts, the state dir, the kernel.
//!
//! `dropCapabilities` (ours; the SDK passes any field through) removes more
//! from the profile: `["CAP_NET_RAW"]` makes `ping` fail. `devices` (the
//! SDK's device allow-list), when not empty, names the only devices of the
//! environment's `/dev` that processes started afterwards may open
//! (`/dev/null`, `/dev/zero`, `/dev/full`, `/dev/random`, `/dev/urandom`,
//! `/dev/tty`, `/dev/ptmx`, `/dev/pts`: every terminal); the launcher
//! attaches a device program to each new process's cgroup. Files already
//! open (a terminal's, inherited) stay usable.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::cgroup::DeviceRule;

use crate::container::Privileges;
use crate::container::init::KEPT_CAPABILITIES;
use crate::durable::{self, DurableError};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The request's policy is not acceptable; `field` names the culprit.
    #[error("{field}: {why}")]
    Invalid { field: String, why: String },
    #[error(transparent)]
    Store(#[from] DurableError),
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

/// Smallest memory limit accepted: below this the environment's own init
/// and relays could not run.
const MIN_MEMORY_MB: u64 = 16;
/// Largest memory limit accepted (1 TiB).
const MAX_MEMORY_MB: u64 = 1 << 20;

/// The resources policy as the SDK sends it (snake_case on the wire):
/// `{"memory": {"limit_mb": 2048, "autoscale": false}}`. The limit is
/// the environment's `memory.max`: past it the kernel's OOM killer kills a
/// process inside (the service is restarted as after a crash and its exit
/// event says why), never the daemon. `autoscale` (growing the VM) is not
/// offered: `true` is refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryPolicy>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryPolicy {
    pub limit_mb: u64,
    #[serde(default)]
    pub autoscale: bool,
}

impl ResourcesPolicy {
    /// Parses and checks a request body; the error names the field.
    pub fn from_request(body: &[u8]) -> Result<ResourcesPolicy, PolicyError> {
        let p: ResourcesPolicy = object(body, "resources")?;
        if let Some(m) = &p.memory {
            if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&m.limit_mb) {
                return Err(invalid(
                    "memory.limit_mb",
                    format!("{} (from {MIN_MEMORY_MB} to {MAX_MEMORY_MB})", m.limit_mb),
                ));
            }
            if m.autoscale {
                return Err(invalid(
                    "memory.autoscale",
                    "not offered: the limit is fixed (send false)",
                ));
            }
        }
        Ok(p)
    }

    /// The environment's memory limit in bytes (none: no limit).
    pub fn memory_max(&self) -> Option<u64> {
        self.memory.as_ref().map(|m| m.limit_mb << 20)
    }
}

/// A JSON object of type `T` from a request body, or a 400 naming `body`.
fn object<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, PolicyError> {
    let not_one = |e: String| invalid("body", format!("not a {what} policy: {e}"));
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| not_one(e.to_string()))?;
    if !v.is_object() {
        return Err(not_one("expected a JSON object".into()));
    }
    serde_json::from_value(v).map_err(|e| not_one(e.to_string()))
}

/// Most rules a network policy may have.
const MAX_RULES: usize = 1000;

/// A network policy as the SDKs send it: `{"rules": [{"action": "allow",
/// "domain": "*.example.org"}, {"action": "deny", "domain": "*"}]}`,
/// enforced by [`crate::network`] where the environment has its own network
/// namespace (and refused with a 501 where it shares the host's).
///
/// A name takes the action of the most specific rule that matches it: an
/// exact domain before a wildcard, a longer wildcard before a shorter one,
/// `*` last; deny wins a tie. A name no rule matches is allowed. With
/// `deny *`, the policy is an allowlist: the environment reaches only the
/// addresses that allowed names resolved to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    #[serde(default)]
    pub rules: Vec<NetworkRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include: Option<String>,
}

impl NetworkPolicy {
    /// Parses and checks a request body; the error names the field.
    pub fn from_request(body: &[u8]) -> Result<NetworkPolicy, PolicyError> {
        let p: NetworkPolicy = object(body, "network")?;
        if p.rules.len() > MAX_RULES {
            return Err(invalid(
                "rules",
                format!("{} rules (at most {MAX_RULES})", p.rules.len()),
            ));
        }
        for (i, r) in p.rules.iter().enumerate() {
            let field = |f: &str| format!("rules[{i}].{f}");
            if let Some(inc) = &r.include {
                return Err(invalid(
                    field("include"),
                    format!("{:?}: no presets are offered", clip(inc)),
                ));
            }
            match r.action.as_deref() {
                Some("allow" | "deny") => {}
                Some(a) => {
                    return Err(invalid(
                        field("action"),
                        format!("{:?} (allow or deny)", clip(a)),
                    ));
                }
                None => return Err(invalid(field("action"), "missing (allow or deny)")),
            }
            let domain = r
                .domain
                .as_deref()
                .ok_or_else(|| invalid(field("domain"), "missing"))?;
            if !domain_pattern(domain) {
                return Err(invalid(
                    field("domain"),
                    format!(
                        "{:?} is not a domain pattern (github.com, *.example.org, *)",
                        clip(domain)
                    ),
                ));
            }
        }
        Ok(p)
    }
}

impl NetworkPolicy {
    /// Whether `name` (any case, with or without the final dot) may be
    /// looked up.
    pub fn allows(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        // (specificity, allowed) of the best match so far
        let mut best: Option<(usize, bool)> = None;
        for r in &self.rules {
            let (Some(domain), Some(action)) = (r.domain.as_deref(), r.action.as_deref()) else {
                continue;
            };
            let domain = domain.to_ascii_lowercase();
            let rank = if domain == "*" {
                Some(0)
            } else if let Some(suffix) = domain.strip_prefix("*.") {
                name.strip_suffix(suffix)
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1)
                    .then_some(1 + suffix.len())
            } else {
                (name == domain).then_some(usize::MAX)
            };
            let Some(rank) = rank else { continue };
            let allow = action == "allow";
            best = match best {
                Some((b, a)) if b > rank || (b == rank && !a) => Some((b, a)),
                _ => Some((rank, allow)),
            };
        }
        best.is_none_or(|(_, allow)| allow)
    }

    /// An allowlist (`deny *`): addresses no allowed name resolved to are
    /// unreachable.
    pub fn is_allowlist(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.domain.as_deref() == Some("*") && r.action.as_deref() == Some("deny"))
    }
}

/// `*`, a host name, or `*.` and a host name: labels of letters, digits
/// and inner hyphens, 1 to 63 bytes each, 253 in all.
fn domain_pattern(d: &str) -> bool {
    if d == "*" {
        return true;
    }
    let host = d.strip_prefix("*.").unwrap_or(d);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Capability names and numbers (linux/capability.h), for
/// `dropCapabilities` and for saying what a profile keeps.
const CAPABILITIES: &[(&str, u32)] = &[
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("DAC_READ_SEARCH", 2),
    ("FOWNER", 3),
    ("FSETID", 4),
    ("KILL", 5),
    ("SETGID", 6),
    ("SETUID", 7),
    ("SETPCAP", 8),
    ("LINUX_IMMUTABLE", 9),
    ("NET_BIND_SERVICE", 10),
    ("NET_BROADCAST", 11),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("IPC_LOCK", 14),
    ("IPC_OWNER", 15),
    ("SYS_MODULE", 16),
    ("SYS_RAWIO", 17),
    ("SYS_CHROOT", 18),
    ("SYS_PTRACE", 19),
    ("SYS_PACCT", 20),
    ("SYS_ADMIN", 21),
    ("SYS_BOOT", 22),
    ("SYS_NICE", 23),
    ("SYS_RESOURCE", 24),
    ("SYS_TIME", 25),
    ("SYS_TTY_CONFIG", 26),
    ("MKNOD", 27),
    ("LEASE", 28),
    ("AUDIT_WRITE", 29),
    ("AUDIT_CONTROL", 30),
    ("SETFCAP", 31),
    ("MAC_OVERRIDE", 32),
    ("MAC_ADMIN", 33),
    ("SYSLOG", 34),
    ("WAKE_ALARM", 35),
    ("BLOCK_SUSPEND", 36),
    ("AUDIT_READ", 37),
    ("PERFMON", 38),
    ("BPF", 39),
    ("CHECKPOINT_RESTORE", 40),
];

/// What `minimal` keeps.
const MINIMAL: &[u32] = &[0, 1, 3, 4, 5, 6, 7];
/// Most entries `dropCapabilities` takes (there are 41 capabilities).
const MAX_DROPS: usize = 64;
/// Longest string accepted in a policy (a capability name is 20 bytes).
const MAX_STRING: usize = 64;

/// A privileges policy as the API takes and shows it (the SDK's
/// `PrivilegesPolicy`, camelCase, plus `dropCapabilities`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrivilegesPolicy {
    #[serde(default)]
    pub profile: String,
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default, alias = "no_new_privileges")]
    pub no_new_privileges: bool,
    #[serde(default, alias = "drop_capabilities")]
    pub drop_capabilities: Vec<String>,
}

impl PrivilegesPolicy {
    /// Parses and checks a request body; the error names the field.
    pub fn from_request(body: &[u8]) -> Result<PrivilegesPolicy, PolicyError> {
        let p: PrivilegesPolicy = object(body, "privileges")?;
        p.privileges()?;
        Ok(p)
    }

    /// What the launcher applies: the profile's capabilities less the
    /// dropped ones, and `no_new_privs`.
    pub fn privileges(&self) -> Result<Privileges, PolicyError> {
        let base: &[u32] = match self.profile.as_str() {
            "" | "standard" => KEPT_CAPABILITIES,
            "minimal" => MINIMAL,
            "privileged" => {
                return Err(invalid(
                    "profile",
                    "\"privileged\" is not offered: the default set (standard) is the most a process in the environment holds",
                ));
            }
            other => {
                return Err(invalid(
                    "profile",
                    format!("{:?} is not a profile (standard, minimal)", clip(other)),
                ));
            }
        };
        if self.devices.len() > MAX_DEVICES {
            return Err(invalid(
                "devices",
                format!("{} entries (at most {MAX_DEVICES})", self.devices.len()),
            ));
        }
        let mut devices = Vec::new();
        for (i, path) in self.devices.iter().enumerate() {
            let rules = device(path).ok_or_else(|| {
                invalid(
                    format!("devices[{i}]"),
                    format!(
                        "{:?} is not a device of the environment ({})",
                        clip(path),
                        DEVICES
                            .iter()
                            .map(|(p, _)| *p)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
            devices.extend_from_slice(rules);
        }
        if self.drop_capabilities.len() > MAX_DROPS {
            return Err(invalid(
                "dropCapabilities",
                format!(
                    "{} entries (at most {MAX_DROPS})",
                    self.drop_capabilities.len()
                ),
            ));
        }
        let mut drop = Vec::new();
        for (i, name) in self.drop_capabilities.iter().enumerate() {
            drop.push(capability(name).ok_or_else(|| {
                invalid(
                    format!("dropCapabilities[{i}]"),
                    format!(
                        "{:?} is not a capability (CAP_NET_RAW, NET_RAW, ...)",
                        clip(name)
                    ),
                )
            })?);
        }
        Ok(Privileges {
            keep: base.iter().copied().filter(|c| !drop.contains(c)).collect(),
            no_new_privs: self.no_new_privileges,
            devices: (!self.devices.is_empty()).then_some(devices),
        })
    }
}

/// Most entries in `devices`.
const MAX_DEVICES: usize = 64;

const fn dev(major: u32, minor: u32) -> DeviceRule {
    DeviceRule {
        major,
        minor: Some(minor),
    }
}

/// The environment's devices (its `/dev`, made by the init) as `devices`
/// names them: `/dev/pts` is every terminal.
const DEVICES: &[(&str, &[DeviceRule])] = &[
    ("/dev/null", &[dev(1, 3)]),
    ("/dev/zero", &[dev(1, 5)]),
    ("/dev/full", &[dev(1, 7)]),
    ("/dev/random", &[dev(1, 8)]),
    ("/dev/urandom", &[dev(1, 9)]),
    ("/dev/tty", &[dev(5, 0)]),
    ("/dev/ptmx", &[dev(5, 2)]),
    (
        "/dev/pts",
        &[
            DeviceRule {
                major: 136,
                minor: None,
            },
            DeviceRule {
                major: 137,
                minor: None,
            },
            DeviceRule {
                major: 138,
                minor: None,
            },
            DeviceRule {
                major: 139,
                minor: None,
            },
            DeviceRule {
                major: 140,
                minor: None,
            },
            DeviceRule {
                major: 141,
                minor: None,
            },
            DeviceRule {
                major: 142,
                minor: None,
            },
            DeviceRule {
                major: 143,
                minor: None,
            },
        ],
    ),
];

/// The rules of a device path (`/dev/null`, or `null`).
fn device(path: &str) -> Option<&'static [DeviceRule]> {
    let full = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/dev/{path}")
    };
    let full = full.trim_end_matches('/');
    DEVICES.iter().find(|(p, _)| *p == full).map(|(_, r)| *r)
}

/// A capability's number from `CAP_NET_RAW`, `NET_RAW` or `net_raw`.
fn capability(name: &str) -> Option<u32> {
    if name.len() > MAX_STRING {
        return None;
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAPABILITIES
        .iter()
        .find(|(n, _)| *n == bare)
        .map(|(_, c)| *c)
}

/// At most [`MAX_STRING`] bytes of `s`, for error messages.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Where the policies live: `<state>/policy/`.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    dir: PathBuf,
    /// Held while a policy is stored and put in force, so two changes at
    /// once cannot leave one stored and the other in force.
    lock: Arc<Mutex<()>>,
}

impl PolicyStore {
    pub fn new(state_dir: &Path) -> PolicyStore {
        PolicyStore {
            dir: state_dir.join("policy"),
            lock: Arc::default(),
        }
    }

    /// Runs `f` (store a policy, then apply it) alone.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&PolicyStore) -> Result<T, PolicyError>,
    ) -> Result<T, PolicyError> {
        let _alone = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        f(self)
    }

    fn network_path(&self) -> PathBuf {
        self.dir.join("network.json")
    }

    /// The stored network policy (none: everything allowed).
    pub fn network(&self) -> Option<NetworkPolicy> {
        self.load(&self.network_path(), NetworkPolicy::from_request)
    }

    /// Stores `p` atomically.
    pub fn set_network(&self, p: &NetworkPolicy) -> Result<(), PolicyError> {
        self.store(&self.network_path(), p)
    }

    /// Removes the network policy: everything allowed.
    pub fn clear_network(&self) -> Result<(), PolicyError> {
        self.remove(&self.network_path())
    }

    fn privileges_path(&self) -> PathBuf {
        self.dir.join("privileges.json")
    }

    /// The stored privileges policy (none: the default). One that no
    /// longer parses (edited by hand, written by a newer daemon) is
    /// reported and ignored: the default applies.
    pub fn privileges(&self) -> Option<PrivilegesPolicy> {
        self.load(&self.privileges_path(), PrivilegesPolicy::from_request)
    }

    /// Stores `p` (atomically: the old policy or the new, never a torn one).
    pub fn set_privileges(&self, p: &PrivilegesPolicy) -> Result<(), PolicyError> {
        self.store(&self.privileges_path(), p)
    }

    /// Removes the privileges policy: the default applies again.
    pub fn clear_privileges(&self) -> Result<(), PolicyError> {
        self.remove(&self.privileges_path())
    }

    fn resources_path(&self) -> PathBuf {
        self.dir.join("resources.json")
    }

    /// The stored resources policy (none: no limit); one that no longer
    /// parses is reported and ignored.
    pub fn resources(&self) -> Option<ResourcesPolicy> {
        self.load(&self.resources_path(), ResourcesPolicy::from_request)
    }

    /// Stores `p` atomically.
    pub fn set_resources(&self, p: &ResourcesPolicy) -> Result<(), PolicyError> {
        self.store(&self.resources_path(), p)
    }

    /// Removes the resources policy.
    pub fn clear_resources(&self) -> Result<(), PolicyError> {
        self.remove(&self.resources_path())
    }

    fn load<T>(&self, path: &Path, parse: impl Fn(&[u8]) -> Result<T, PolicyError>) -> Option<T> {
        let bytes = std::fs::read(path).ok()?;
        match parse(&bytes) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a stored policy");
                None
            }
        }
    }

    fn store<T: Serialize>(&self, path: &Path, p: &T) -> Result<(), PolicyError> {
        std::fs::create_dir_all(&self.dir).map_err(durable::err("create", &self.dir))?;
        let _ = durable::clean_temp_files(&self.dir);
        durable::write_json(path, p)?;
        Ok(())
    }

    fn remove(&self, path: &Path) -> Result<(), PolicyError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(durable::sync_dir(&self.dir)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(durable::err("remove", path)(e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<PrivilegesPolicy, String> {
        PrivilegesPolicy::from_request(body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn profiles_and_drops_make_the_kept_set() {
        let keep = |body: &str| parse(body).unwrap().privileges().unwrap().keep;
        assert_eq!(keep("{}"), KEPT_CAPABILITIES);
        assert_eq!(keep(r#"{"profile":""}"#), KEPT_CAPABILITIES);
        assert_eq!(keep(r#"{"profile":"standard"}"#), KEPT_CAPABILITIES);
        assert_eq!(keep(r#"{"profile":"minimal"}"#), MINIMAL);
        assert!(!keep(r#"{"profile":"minimal"}"#).contains(&13));
        let dropped = keep(r#"{"dropCapabilities":["CAP_NET_RAW","kill"]}"#);
        assert!(!dropped.contains(&13) && !dropped.contains(&5));
        assert_eq!(dropped.len(), KEPT_CAPABILITIES.len() - 2);
        // Dropping one the profile lacks is fine.
        assert_eq!(
            keep(r#"{"dropCapabilities":["SYS_ADMIN"]}"#),
            KEPT_CAPABILITIES
        );
        let p = parse(r#"{"noNewPrivileges":true}"#).unwrap();
        assert!(p.privileges().unwrap().no_new_privs);
        let p = parse(r#"{"no_new_privileges":true}"#).unwrap();
        assert!(p.no_new_privileges);
        // Devices: none named, all of them; else only those named.
        assert_eq!(parse("{}").unwrap().privileges().unwrap().devices, None);
        let p = parse(r#"{"devices":["/dev/null","urandom","/dev/pts/"]}"#).unwrap();
        let d = p.privileges().unwrap().devices.unwrap();
        assert_eq!(&d[..2], &[dev(1, 3), dev(1, 9)]);
        assert_eq!(d.len(), 2 + 8, "every terminal major");
    }

    #[test]
    fn bad_policies_name_the_field() {
        for (body, field) in [
            (r#"{"profile":"privileged"}"#, "profile"),
            (r#"{"profile":"root"}"#, "profile"),
            (r#"{"profile":7}"#, "body"),
            (r#"{"devices":["/dev/fuse"]}"#, "devices[0]"),
            (r#"{"devices":["/dev/null","../etc/passwd"]}"#, "devices[1]"),
            (r#"{"dropCapabilities":["CAP_FLY"]}"#, "dropCapabilities[0]"),
            (r#"{"dropCapabilities":"NET_RAW"}"#, "body"),
            (r#"{"capabilities":[]}"#, "body"),
            ("[]", "body"),
            ("", "body"),
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.starts_with(&format!("{field}:")), "{body}: {e}");
        }
        let many = format!(
            r#"{{"dropCapabilities":[{}]}}"#,
            vec!["\"NET_RAW\""; 100_000].join(",")
        );
        assert!(parse(&many).unwrap_err().starts_with("dropCapabilities:"));
        let long = format!(r#"{{"profile":"{}"}}"#, "x".repeat(1 << 20));
        let e = parse(&long).unwrap_err();
        assert!(e.starts_with("profile:") && e.len() < 200, "{}", e.len());
    }

    #[test]
    fn resources_take_the_sdks_shape_and_refuse_the_rest() {
        let p = ResourcesPolicy::from_request(br#"{"memory":{"limit_mb":64}}"#).unwrap();
        assert_eq!(p.memory_max(), Some(64 << 20));
        assert_eq!(
            ResourcesPolicy::from_request(b"{}").unwrap().memory_max(),
            None
        );
        for (body, field) in [
            (r#"{"memory":{"limit_mb":1}}"#, "memory.limit_mb"),
            (r#"{"memory":{"limit_mb":99999999999}}"#, "memory.limit_mb"),
            (
                r#"{"memory":{"limit_mb":64,"autoscale":true}}"#,
                "memory.autoscale",
            ),
            (r#"{"memory":{"limitMB":64}}"#, "body"),
            (r#"{"cpu":2}"#, "body"),
            (r#"{"memory":{"limit_mb":-5}}"#, "body"),
            ("[]", "body"),
        ] {
            let e = ResourcesPolicy::from_request(body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("{field}:")), "{body}: {e}");
        }
    }

    #[test]
    fn the_most_specific_network_rule_decides() {
        let p = |body: &str| NetworkPolicy::from_request(body.as_bytes()).unwrap();
        let rule = |a: &str, d: &str| format!(r#"{{"action":"{a}","domain":"{d}"}}"#);
        let list = p(&format!(
            r#"{{"rules":[{},{},{},{}]}}"#,
            rule("allow", "github.com"),
            rule("allow", "*.example.org"),
            rule("deny", "*.bad.example.org"),
            rule("deny", "*")
        ));
        assert!(list.is_allowlist());
        assert!(list.allows("github.com") && list.allows("GitHub.com."));
        assert!(!list.allows("api.github.com"), "an exact rule is exact");
        assert!(list.allows("a.example.org") && list.allows("x.y.example.org"));
        assert!(
            !list.allows("example.org"),
            "*.example.org needs a label more"
        );
        assert!(
            !list.allows("x.bad.example.org"),
            "the longer wildcard wins"
        );
        assert!(!list.allows("notexample.org") && !list.allows("b.test"));
        // Deny wins a tie; no match is allowed; no `deny *` is no allowlist.
        let tie = p(&format!(
            r#"{{"rules":[{},{}]}}"#,
            rule("allow", "a.test"),
            rule("deny", "a.test")
        ));
        assert!(!tie.allows("a.test") && tie.allows("b.test") && !tie.is_allowlist());
        assert!(NetworkPolicy::default().allows("anything.at.all"));
    }

    #[test]
    fn network_rules_are_checked_field_by_field() {
        let ok = br#"{"rules":[{"action":"allow","domain":"github.com"},{"action":"allow","domain":"*.example.org"},{"action":"deny","domain":"*"}]}"#;
        assert_eq!(NetworkPolicy::from_request(ok).unwrap().rules.len(), 3);
        let many = format!(
            r#"{{"rules":[{}]}}"#,
            vec![r#"{"action":"deny","domain":"*"}"#; 100_000].join(",")
        );
        let long = format!(
            r#"{{"rules":[{{"action":"allow","domain":"{}"}}]}}"#,
            "a".repeat(1 << 20)
        );
        for (body, field) in [
            (many.as_str(), "rules"),
            (long.as_str(), "rules[0].domain"),
            (
                r#"{"rules":[{"action":"maybe","domain":"a.test"}]}"#,
                "rules[0].action",
            ),
            (r#"{"rules":[{"domain":"a.test"}]}"#, "rules[0].action"),
            (r#"{"rules":[{"action":"allow"}]}"#, "rules[0].domain"),
            (
                r#"{"rules":[{"action":"allow","domain":"a..test"}]}"#,
                "rules[0].domain",
            ),
            (
                r#"{"rules":[{"action":"allow","domain":"*a.test"}]}"#,
                "rules[0].domain",
            ),
            (
                r#"{"rules":[{"action":"allow","domain":"-a.test"}]}"#,
                "rules[0].domain",
            ),
            (
                r#"{"rules":[{"action":"allow","domain":"a.test"},{"include":"defaults"}]}"#,
                "rules[1].include",
            ),
            (
                r#"{"rules":[{"action":"allow","domain":"a.test","port":1}]}"#,
                "body",
            ),
            (r#"{"rules":{}}"#, "body"),
        ] {
            let e = NetworkPolicy::from_request(body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("{field}:")),
                "{}: {e}",
                &body[..body.len().min(80)]
            );
            assert!(e.len() < 300, "{}", e.len());
        }
    }

    #[test]
    fn the_store_keeps_the_policy_across_restarts_and_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = PolicyStore::new(dir.path());
        assert_eq!(s.privileges(), None);
        let p = parse(r#"{"profile":"minimal","noNewPrivileges":true}"#).unwrap();
        s.set_privileges(&p).unwrap();
        assert_eq!(PolicyStore::new(dir.path()).privileges(), Some(p));
        s.clear_privileges().unwrap();
        assert_eq!(s.privileges(), None);
        s.clear_privileges().unwrap();
        // A stored policy that no longer parses is ignored.
        std::fs::write(
            dir.path().join("policy/privileges.json"),
            "{\"profile\":\"x\"}",
        )
        .unwrap();
        assert_eq!(s.privileges(), None);
    }
}
