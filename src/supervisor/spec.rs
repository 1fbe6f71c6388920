//! Service definitions: the request shape, validation, and the dependency
//! graph (order and cycles). Pure logic.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::SupervisorError;

/// What a client sends to create or update a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub cmd: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub args: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub dir: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub needs: Vec<String>,
    #[serde(default)]
    pub http_port: Option<u32>,
}

/// `null` means the same as an absent field.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A persisted definition: the spec plus whether it should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDef {
    pub name: String,
    #[serde(flatten)]
    pub spec: ServiceSpec,
    /// False once stopped through the API: not started on daemon start.
    #[serde(default = "yes")]
    pub autostart: bool,
}

fn yes() -> bool {
    true
}

fn invalid(field: &str, message: impl Into<String>) -> SupervisorError {
    SupervisorError::Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Validates a service name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), SupervisorError> {
    if crate::config::valid_name(name) {
        Ok(())
    } else {
        Err(invalid(
            "name",
            format!("{name:?} is not a valid service name ([A-Za-z0-9][A-Za-z0-9_.-]{{0,62}})"),
        ))
    }
}

/// Validates `spec` for service `name` against the other definitions.
pub fn validate(
    name: &str,
    spec: &ServiceSpec,
    others: &BTreeMap<String, ServiceDef>,
) -> Result<(), SupervisorError> {
    validate_name(name)?;
    if spec.cmd.trim().is_empty() {
        return Err(invalid("cmd", "cmd must not be empty"));
    }
    if spec.cmd.contains('\0') || spec.args.iter().any(|a| a.contains('\0')) {
        return Err(invalid("cmd", "cmd and args must not contain NUL bytes"));
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(
                "env",
                format!("{k:?} is not a valid environment variable name"),
            ));
        }
    }
    if let Some(dir) = &spec.dir {
        if !dir.starts_with('/') || dir.contains('\0') {
            return Err(invalid(
                "dir",
                format!("dir {dir:?} must be an absolute path"),
            ));
        }
    }
    if let Some(port) = spec.http_port {
        if !(1..=65535).contains(&port) {
            return Err(invalid(
                "http_port",
                format!("http_port {port} is not in 1..65535"),
            ));
        }
        if let Some(other) = others
            .values()
            .find(|d| d.name != name && d.spec.http_port == Some(port))
        {
            return Err(SupervisorError::Conflict(format!(
                "http_port {port} is already declared by service {:?}",
                other.name
            )));
        }
        if let Some(other) = others
            .values()
            .find(|d| d.name != name && d.spec.http_port.is_some())
        {
            return Err(SupervisorError::Conflict(format!(
                "only one service may declare http_port; {:?} already does",
                other.name
            )));
        }
    }
    let mut seen = BTreeSet::new();
    for need in &spec.needs {
        if need == name {
            return Err(invalid(
                "needs",
                format!("service {name:?} cannot need itself"),
            ));
        }
        if !seen.insert(need) {
            return Err(invalid("needs", format!("{need:?} is listed twice")));
        }
        if !others.contains_key(need) {
            return Err(invalid(
                "needs",
                format!("needs {need:?}, which is not a defined service"),
            ));
        }
    }
    // With this spec in place, the graph must stay acyclic.
    let mut graph: BTreeMap<&str, Vec<&str>> = others
        .values()
        .map(|d| {
            (
                d.name.as_str(),
                d.spec.needs.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    graph.insert(name, spec.needs.iter().map(String::as_str).collect());
    if let Some(cycle) = find_cycle(&graph) {
        return Err(invalid(
            "needs",
            format!("dependency cycle: {}", cycle.join(" -> ")),
        ));
    }
    Ok(())
}

/// A dependency cycle in `graph`, as the path that closes it.
fn find_cycle<'a>(graph: &BTreeMap<&'a str, Vec<&'a str>>) -> Option<Vec<&'a str>> {
    fn visit<'a>(
        n: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(i) = path.iter().position(|p| *p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n);
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n);
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n);
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

/// `name` and everything it needs, transitively, dependencies first.
pub fn start_order(name: &str, defs: &BTreeMap<String, ServiceDef>) -> Vec<String> {
    fn visit(
        n: &str,
        defs: &BTreeMap<String, ServiceDef>,
        out: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) {
        if !seen.insert(n.to_owned()) {
            return;
        }
        if let Some(d) = defs.get(n) {
            for m in &d.spec.needs {
                visit(m, defs, out, seen);
            }
        }
        out.push(n.to_owned());
    }
    let mut out = Vec::new();
    visit(name, defs, &mut out, &mut BTreeSet::new());
    out
}

/// The services that directly need `name`.
pub fn dependents(name: &str, defs: &BTreeMap<String, ServiceDef>) -> Vec<String> {
    defs.values()
        .filter(|d| d.spec.needs.iter().any(|n| n == name))
        .map(|d| d.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, needs: &[&str]) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            spec: ServiceSpec {
                cmd: "true".into(),
                args: vec![],
                env: BTreeMap::new(),
                dir: None,
                needs: needs.iter().map(|s| s.to_string()).collect(),
                http_port: None,
            },
            autostart: true,
        }
    }

    fn defs(list: &[ServiceDef]) -> BTreeMap<String, ServiceDef> {
        list.iter().map(|d| (d.name.clone(), d.clone())).collect()
    }

    #[test]
    fn order_and_dependents() {
        let all = defs(&[
            def("db", &[]),
            def("cache", &["db"]),
            def("web", &["cache", "db"]),
        ]);
        assert_eq!(start_order("web", &all), vec!["db", "cache", "web"]);
        assert_eq!(dependents("db", &all), vec!["cache", "web"]);
    }

    #[test]
    fn rejects_bad_specs() {
        let all = defs(&[def("a", &["b"]), def("b", &[])]);
        let e = validate("b", &def("b", &["a"]).spec, &all).unwrap_err();
        assert!(e.to_string().contains("cycle"), "{e}");
        let e = validate("c", &def("c", &["zzz"]).spec, &all).unwrap_err();
        assert!(e.to_string().contains("zzz"));
        let e = validate("c", &def("c", &["c"]).spec, &all).unwrap_err();
        assert!(matches!(e, SupervisorError::Invalid { ref field, .. } if field == "needs"));
        let mut s = def("c", &[]).spec;
        s.cmd = " ".into();
        assert!(
            matches!(validate("c", &s, &all), Err(SupervisorError::Invalid { ref field, .. }) if field == "cmd")
        );
        s.cmd = "x".into();
        s.http_port = Some(0);
        assert!(
            matches!(validate("c", &s, &all), Err(SupervisorError::Invalid { ref field, .. }) if field == "http_port")
        );
        s.http_port = None;
        s.dir = Some("relative".into());
        assert!(
            matches!(validate("c", &s, &all), Err(SupervisorError::Invalid { ref field, .. }) if field == "dir")
        );
        assert!(validate("-bad", &def("x", &[]).spec, &all).is_err());
        assert!(validate("c", &def("c", &["a", "b"]).spec, &all).is_ok());
    }

    #[test]
    fn one_http_port() {
        let mut web = def("web", &[]);
        web.spec.http_port = Some(8080);
        let all = defs(&[web.clone(), def("db", &[])]);
        let mut s = def("api", &[]).spec;
        s.http_port = Some(9090);
        assert!(matches!(
            validate("api", &s, &all),
            Err(SupervisorError::Conflict(_))
        ));
        // Updating the service that already declares it is fine.
        assert!(validate("web", &web.spec, &all).is_ok());
    }

    #[test]
    fn absent_args_and_needs_deserialize() {
        let s: ServiceSpec = serde_json::from_str(r#"{"cmd":"sleep"}"#).unwrap();
        assert!(s.args.is_empty() && s.needs.is_empty());
        let s: ServiceSpec = serde_json::from_str(
            r#"{"cmd":"sleep","args":null,"needs":null,"env":null,"http_port":null}"#,
        )
        .unwrap();
        assert!(
            s.args.is_empty() && s.needs.is_empty() && s.env.is_empty() && s.http_port.is_none()
        );
        assert!(serde_json::from_str::<ServiceSpec>(r#"{"cmd":"x","bogus":1}"#).is_err());
    }
}
