//! What every request passes before routing: authentication (TCP only) and
//! the mapping of the external path shape `/v1/sprites/{name}/...` onto the
//! internal `/v1/...` routes.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::config::{TcpAuth, Token};

/// Which listener a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Authenticated by token.
    Tcp,
    /// Trusted: the socket is mode 0600, so only root can connect.
    Unix,
}

/// Who sent a request, as far as its connection tells: every request
/// carries one (an extension the server loop adds per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The TCP API: whoever has the token (checked by the gateway).
    Tcp,
    /// The Unix socket from outside the environment: root on the host.
    Host,
    /// The Unix socket from a process inside the environment (another PID
    /// namespace than the daemon's; also when the peer cannot be told).
    Environment,
}

impl Caller {
    /// The caller of a Unix connection whose peer is `pid` (`SO_PEERCRED`,
    /// in the daemon's PID namespace; none: unknown).
    pub fn of_unix_peer(pid: Option<i32>) -> Caller {
        match pid.map(crate::sys::in_own_pid_namespace) {
            Some(Ok(true)) => Caller::Host,
            _ => Caller::Environment,
        }
    }

    /// A 403 for a caller inside the environment: changing `what` is for
    /// the external API, so code running as root inside cannot lift its
    /// own restrictions.
    pub fn may_change(self, what: &str) -> Result<(), super::ApiError> {
        match self {
            Caller::Tcp | Caller::Host => Ok(()),
            Caller::Environment => Err(super::ApiError::Forbidden(format!(
                "changing {what} requires the External API (TCP, with the sprite's token); the socket inside the sprite cannot"
            ))),
        }
    }
}

#[derive(Clone)]
pub struct Gateway {
    pub state: Arc<AppState>,
    pub transport: Transport,
}

/// The credentials a request presents: the Bearer token (in `Authorization`,
/// or `Proxy-Authorization` for CONNECT clients) and the `api:` token of
/// every `state=` pair in `fly-replay-src` (pairs are `;`-separated, any order).
pub fn presented_tokens(headers: &HeaderMap) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let bearer = headers
        .get_all(header::AUTHORIZATION)
        .into_iter()
        .chain(headers.get_all(header::PROXY_AUTHORIZATION));
    for value in bearer {
        let v = value.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            out.push(trim(&v[7..]));
        }
    }
    for value in headers.get_all("fly-replay-src") {
        for pair in value.as_bytes().split(|b| *b == b';') {
            if let Some(token) = trim(pair).strip_prefix(b"state=api:") {
                out.push(token);
            }
        }
    }
    out
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// Whether any presented credential equals the token (each compared in
/// constant time; all are compared).
pub fn authorized(token: &Token, headers: &HeaderMap) -> bool {
    presented_tokens(headers)
        .into_iter()
        .fold(false, |ok, presented| token.matches(presented) | ok)
}

/// How an incoming path maps onto the internal routes.
#[derive(Debug, PartialEq, Eq)]
pub enum Mapped {
    /// Route as it is.
    Keep,
    /// `/v1/sprites/{own}/rest` → `/v1/rest`; `/v1/sprites/{own}` → `/v1/sprite`.
    Internal(String),
    /// `/v1/sprites/{other}/...`.
    OtherSprite(String),
}

pub fn map_path(path: &str, own_name: &str) -> Mapped {
    let Some(rest) = path.strip_prefix("/v1/sprites/") else {
        return Mapped::Keep;
    };
    let (name, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if name.is_empty() {
        return Mapped::Keep;
    }
    if name != own_name {
        return Mapped::OtherSprite(name.to_owned());
    }
    match tail {
        "" | "/" => Mapped::Internal("/v1/sprite".to_owned()),
        t => Mapped::Internal(format!("/v1{t}")),
    }
}

/// The middleware wrapped around the router (so it runs *before* routing).
pub async fn gateway(State(gw): State<Gateway>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let config = &gw.state.config;
    if gw.transport == Transport::Tcp {
        match &config.tcp_auth {
            TcpAuth::Token(token) if !authorized(token, req.headers()) => {
                tracing::info!(%method, %path, "401 unauthorized");
                // Not kept alive: only an authenticated connection outlives
                // the header deadline (see `api::server`).
                let mut r = ApiError::Unauthorized.into_response();
                r.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
                return r;
            }
            TcpAuth::Token(_) | TcpAuth::Insecure => {}
        }
    }
    match map_path(&path, &config.sprite_name) {
        Mapped::Keep => {}
        Mapped::OtherSprite(name) => {
            return ApiError::NotFound(format!(
                "sprite {name:?} not found: this daemon serves sprite {:?}",
                config.sprite_name
            ))
            .into_response();
        }
        Mapped::Internal(internal) => {
            let pq = match req.uri().query() {
                Some(q) => format!("{internal}?{q}"),
                None => internal,
            };
            match pq.parse::<Uri>() {
                Ok(uri) => *req.uri_mut() = uri,
                Err(e) => return ApiError::BadRequest(format!("bad path: {e}")).into_response(),
            }
        }
    }
    if req.method() == axum::http::Method::CONNECT {
        return super::proxy::connect(gw.state.clone(), req).await;
    }
    let resp = next.run(req).await;
    tracing::debug!(transport = ?gw.transport, %method, %path, status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64, "request");
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn mapping() {
        assert_eq!(map_path("/v1/status", "me"), Mapped::Keep);
        assert_eq!(
            map_path("/v1/sprites/me", "me"),
            Mapped::Internal("/v1/sprite".into())
        );
        assert_eq!(
            map_path("/v1/sprites/me/", "me"),
            Mapped::Internal("/v1/sprite".into())
        );
        assert_eq!(
            map_path("/v1/sprites/me/services/x", "me"),
            Mapped::Internal("/v1/services/x".into())
        );
        assert_eq!(
            map_path("/v1/sprites/you/services", "me"),
            Mapped::OtherSprite("you".into())
        );
        assert_eq!(map_path("/v1/sprites/", "me"), Mapped::Keep);
        assert_eq!(map_path("/v1/spritesX/me", "me"), Mapped::Keep);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn auth_headers() {
        let t = Token::new("s3cret").unwrap();
        assert!(authorized(
            &t,
            &headers(&[("authorization", "Bearer s3cret")])
        ));
        assert!(authorized(
            &t,
            &headers(&[("authorization", "bearer  s3cret ")])
        ));
        assert!(!authorized(
            &t,
            &headers(&[("authorization", "Bearer wrong")])
        ));
        assert!(!authorized(
            &t,
            &headers(&[("authorization", "Basic s3cret")])
        ));
        assert!(!authorized(&t, &headers(&[])));
        assert!(authorized(
            &t,
            &headers(&[("fly-replay-src", "region=ord;state=api:s3cret;app=x")])
        ));
        assert!(authorized(
            &t,
            &headers(&[("fly-replay-src", "state=api:s3cret")])
        ));
        assert!(authorized(
            &t,
            &headers(&[("fly-replay-src", "app=x; state=api:s3cret")])
        ));
        assert!(!authorized(
            &t,
            &headers(&[("fly-replay-src", "region=ord;state=api:wrong;app=x")])
        ));
        assert!(!authorized(
            &t,
            &headers(&[("fly-replay-src", "state=s3cret")])
        ));
        // A wrong Bearer does not hide a right fly-replay-src, and vice versa.
        assert!(authorized(
            &t,
            &headers(&[
                ("authorization", "Bearer nope"),
                ("fly-replay-src", "state=api:s3cret")
            ])
        ));
    }
}
