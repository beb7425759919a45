//! The admin endpoint: `GET /metrics` (Prometheus text), `GET /healthz`
//! (the process answers) and `GET /readyz` (`503` once draining).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use wasmhive::{App, ProxyHandler};

/// What the admin endpoint reports on.
pub struct Admin {
    pub handler: ProxyHandler<App>,
    pub metrics: PrometheusHandle,
    /// Set when the server starts draining.
    pub draining: Arc<AtomicBool>,
}

impl Admin {
    /// Serves admin requests on `listener` until the process exits.
    pub async fn serve(self, listener: TcpListener) {
        let admin = Arc::new(self);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "admin endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.answer(&request)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    fn answer<B>(&self, request: &http::Request<B>) -> http::Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
        }
        match request.uri().path() {
            "/metrics" => {
                crate::telemetry::record_stats(&self.handler.stats());
                let mut response = text(StatusCode::OK, self.metrics.render());
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" if self.draining.load(Ordering::Relaxed) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
            }
            "/readyz" => text(StatusCode::OK, "ready\n".into()),
            _ => text(
                StatusCode::NOT_FOUND,
                "try /metrics, /healthz or /readyz\n".into(),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
