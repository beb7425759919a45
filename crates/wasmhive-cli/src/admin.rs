//! The admin endpoint: `GET /metrics` (Prometheus text), `GET /healthz`
//! (the process answers), `GET /readyz` (`503` once draining) and
//! `POST /reload` (load the component again and serve new requests with
//! it: `200` once it does, `500` with the reason if it does not load).
//!
//! It is for probes and scrapers, so it is small and strict: HTTP/1.1, one
//! request per connection, a 5 s deadline for the request head, and at most
//! [`MAX_CONNECTIONS`] open at once (a connection beyond it is closed at
//! once), so that idle connections to it cannot use up the process's file
//! descriptors. Bind it to an address only operators reach.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::versions::Versions;

/// Admin connections open at once.
pub const MAX_CONNECTIONS: usize = 64;

/// How long an admin client has to send its request head.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the admin endpoint reports on.
pub struct Admin {
    pub versions: Arc<Versions>,
    pub metrics: PrometheusHandle,
    /// Set when the server starts draining.
    pub draining: Arc<AtomicBool>,
}

/// What an admin endpoint reports on and acts on: the server itself
/// ([`Admin`]), or a supervisor for its workers. The endpoint answers the
/// probes, the methods and the unknown paths alike for both.
pub trait Reports: Send + Sync + 'static {
    /// Whether the server is draining: `/readyz` answers `503`.
    fn draining(&self) -> bool;
    /// `/metrics`, in Prometheus text format.
    fn metrics(&self) -> impl Future<Output = String> + Send;
    /// `POST /reload`: what to answer, or why it was refused.
    fn reload(&self) -> impl Future<Output = Result<String, String>> + Send;
}

/// How a server announces its admin endpoint (a supervisor looks for it).
pub const ANNOUNCED: &str = "admin endpoint on http://";

/// Binds the admin endpoint's listener, if there is to be one.
pub async fn bind(addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => {
            Ok(Some(TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} (--admin-addr)")
            })?))
        }
        None => Ok(None),
    }
}

/// Writes the line that says where the admin endpoint listens, whatever
/// `RUST_LOG` says.
pub fn announce(listener: &TcpListener) -> std::io::Result<()> {
    crate::telemetry::announce(&format!(
        "{ANNOUNCED}{}/ (/metrics, /healthz, /readyz, POST /reload)",
        listener.local_addr()?
    ));
    Ok(())
}

/// An admin response: short text, or metrics.
type Response = http::Response<Full<Bytes>>;

/// Serves the admin endpoint of `server` on `listener` until the process
/// exits.
pub async fn serve(server: Arc<impl Reports>, listener: TcpListener) {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the cap: closed at once (dropping it), not queued.
        let Ok(place) = places.clone().try_acquire_owned() else {
            continue;
        };
        let server = server.clone();
        let connection = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |request| {
                let server = server.clone();
                async move {
                    let response = answer(&*server, request.method(), request.uri().path()).await;
                    Ok::<_, Infallible>(response)
                }
            }),
        );
        tokio::spawn(async move {
            let _ = connection.await;
            drop(place);
        });
    }
}

/// The response to `method path` for `server`.
async fn answer(server: &impl Reports, method: &Method, path: &str) -> Response {
    if path == "/reload" {
        if method != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into());
        }
        // The operator asked: the reason goes back to them whole.
        return match server.reload().await {
            Ok(done) => text(StatusCode::OK, done),
            Err(why) => text(StatusCode::INTERNAL_SERVER_ERROR, why),
        };
    }
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    match path {
        "/metrics" => {
            let mut response = text(StatusCode::OK, server.metrics().await);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if server.draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
        }
        "/readyz" => text(StatusCode::OK, "ready\n".into()),
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz, /readyz or POST /reload\n".into(),
        ),
    }
}

impl Reports for Admin {
    fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    async fn metrics(&self) -> String {
        crate::telemetry::record_process();
        for (labels, stats) in self.versions.stats().values() {
            crate::telemetry::record_stats(stats, labels);
        }
        self.metrics.render()
    }

    async fn reload(&self) -> Result<String, String> {
        match self.versions.reload().await {
            Ok(version) => Ok(format!("reloaded: version {version}\n")),
            Err(error) => Err(format!(
                "reload refused, the current version keeps serving: {error:#}\n"
            )),
        }
    }
}

/// A response of `status` with `body`.
fn text(status: StatusCode, body: String) -> Response {
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
