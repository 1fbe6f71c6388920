//! A small HTTP/1 client for the daemon's Unix socket, used by `sprite-env`
//! and by the integration tests. Responses are returned unread so callers can
//! stream them.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to {path}: {source} (is sprited running? set --socket or SPRITE_SOCKET)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP error talking to {path}: {source}")]
    Http {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("bad request: {0}")]
    Request(String),
}

#[derive(Debug, Clone)]
pub struct UnixClient {
    path: PathBuf,
}

impl UnixClient {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        UnixClient { path: path.into() }
    }

    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// Sends one request on a fresh connection.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<Response<Incoming>, ClientError> {
        self.send_body(method, path_and_query, headers, Full::new(body))
            .await
    }

    /// Sends one request whose body streams (an upload of any size).
    pub async fn send_body<B>(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(String, String)],
        body: B,
    ) -> Result<Response<Incoming>, ClientError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
        let http = |source| ClientError::Http {
            path: self.path.clone(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", "sprite");
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(body)
            .map_err(|e| ClientError::Request(e.to_string()))?;
        sender.send_request(req).await.map_err(http)
    }

    /// Sends a request and reads the whole body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let (headers, body) = match body {
            Some(v) => (
                vec![("content-type".to_owned(), "application/json".to_owned())],
                Bytes::from(v.to_string()),
            ),
            None => (vec![], Bytes::new()),
        };
        let resp = self.send(method, path, &headers, body).await?;
        let status = resp.status();
        Ok((status, self.read_all(resp).await?))
    }

    /// Reads a whole response body.
    pub async fn read_all(&self, resp: Response<Incoming>) -> Result<Bytes, ClientError> {
        Ok(resp
            .into_body()
            .collect()
            .await
            .map_err(|source| ClientError::Http {
                path: self.path.clone(),
                source,
            })?
            .to_bytes())
    }

    /// `GET` and parse JSON (a non-JSON body becomes a JSON string).
    pub async fn get_json(
        &self,
        path: &str,
    ) -> Result<(StatusCode, serde_json::Value), ClientError> {
        let (status, bytes) = self.call(Method::GET, path, None).await?;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned().into());
        Ok((status, value))
    }
}

/// The message of an error response: `{"error": ...}`'s text, or the body.
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}
