//! NDJSON streaming responses. A producer task writes one JSON value per
//! line; the body streams as it is produced. The task stops when the client
//! goes away (its next send fails) or the daemon shuts down.

use std::future::Future;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The producer's end of a stream.
#[derive(Clone)]
pub struct Emitter {
    tx: mpsc::Sender<Bytes>,
}

impl Emitter {
    /// Sends one value as a line; false once the client is gone.
    pub async fn send<T: Serialize>(&self, value: &T) -> bool {
        let mut line = match serde_json::to_vec(value) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serialize stream event");
                return true;
            }
        };
        line.push(b'\n');
        self.tx.send(Bytes::from(line)).await.is_ok()
    }
}

/// A streaming `application/x-ndjson` response fed by `produce`.
pub fn ndjson<F, Fut>(shutdown: CancellationToken, produce: F) -> Response
where
    F: FnOnce(Emitter) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let work = produce(Emitter { tx });
    tokio::spawn(async move {
        tokio::select! {
            _ = work => {}
            _ = shutdown.cancelled() => {}
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), rx))
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}
