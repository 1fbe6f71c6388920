//! Request parameters as the handlers read them: query strings decoded as
//! forms (repeated keys kept, `+` is a space) and optional JSON bodies, with
//! 400s that name the bad parameter; and the rest of a body refused midway.

use std::time::Duration;

use super::ApiError;

/// A decoded query string.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(q: Option<&str>) -> Params {
        Params(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The `args` object of a control connection's operation as
    /// parameters: strings, numbers and booleans as given, each element of
    /// an array as a repeated key (the SDKs send `cmd` and `env` as arrays,
    /// everything else as strings).
    pub fn from_object(v: &serde_json::Value) -> Result<Params, ApiError> {
        use serde_json::Value;
        let scalar = |k: &str, v: &Value| match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(ApiError::BadRequest(format!(
                "args.{k}: expected a string, number or boolean"
            ))),
        };
        let obj = v
            .as_object()
            .ok_or_else(|| ApiError::BadRequest("args: expected an object".into()))?;
        let mut out = Vec::new();
        for (k, v) in obj {
            match v {
                Value::Array(items) => {
                    for item in items {
                        out.push((k.clone(), scalar(k, item)?));
                    }
                }
                Value::Null => {}
                _ => out.push((k.clone(), scalar(k, v)?)),
            }
        }
        Ok(Params(out))
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a repeated `key` (also written `key[]`).
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key || k.strip_suffix("[]") == Some(key))
            .map(|(_, v)| v.as_str())
    }

    /// A boolean: `true`/`1`/`yes`/empty or `false`/`0`/`no`.
    pub fn flag(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some("" | "1" | "true" | "TRUE" | "True" | "yes") => Ok(Some(true)),
            Some("0" | "false" | "FALSE" | "False" | "no") => Ok(Some(false)),
            Some(v) => Err(ApiError::BadRequest(format!(
                "{key}={v:?}: expected true or false"
            ))),
        }
    }

    /// A number, `default` when absent or empty.
    pub fn number<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, ApiError> {
        match self.get(key) {
            None | Some("") => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ApiError::BadRequest(format!("{key}={v:?} is not a valid number"))),
        }
    }

    /// A duration (`10s`, `1m30s`, `250ms`, bare seconds); None when absent or empty.
    pub fn duration(&self, key: &str) -> Result<Option<Duration>, ApiError> {
        match self.get(key) {
            None | Some("") => Ok(None),
            Some(v) => duration(key, v).map(Some),
        }
    }
}

/// Parses duration `v` given as parameter `key`.
pub fn duration(key: &str, v: &str) -> Result<Duration, ApiError> {
    crate::config::parse_duration(v)
        .ok_or_else(|| ApiError::BadRequest(format!("{key}={v:?} is not a duration like 10s")))
}

/// An optional JSON body: empty (or blank) is `T::default()`.
pub fn json_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// How long a refused body is still read at most ([`linger`]).
const LINGER_TIME: Duration = Duration::from_secs(5);

/// Reads and drops what is left of a request body refused midway (too
/// large, a full disk), up to about `max` more bytes and [`LINGER_TIME`]:
/// a client still sending then reads the error answer instead of a broken
/// pipe (nginx's lingering close).
pub async fn linger(stream: &mut axum::body::BodyDataStream, max: u64) {
    use futures_util::StreamExt;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut left = max;
        while let Some(Ok(b)) = stream.next().await {
            left = left.saturating_sub(b.len() as u64);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        let q = Params::parse(Some("cmd=a+b&cmd%5B%5D=c&tty=&n=3&t=1m30s&bad=x"));
        assert_eq!(q.all("cmd").collect::<Vec<_>>(), ["a b", "c"]);
        assert_eq!(q.flag("tty").unwrap(), Some(true));
        assert_eq!(q.flag("absent").unwrap(), None);
        assert!(q.flag("bad").is_err());
        assert_eq!(q.number("n", 0u16).unwrap(), 3);
        assert!(q.number("bad", 0u16).is_err());
        assert_eq!(q.duration("t").unwrap(), Some(Duration::from_secs(90)));
        assert!(q.duration("bad").is_err());
        assert_eq!(json_body::<Option<u8>>(b"  ").unwrap(), None);
    }
}
