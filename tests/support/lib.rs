//! Helpers shared by the integration tests: loading guests once, building
//! handlers, making requests, serving a handler over loopback, and a
//! recorder that keeps every report.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use wasmhive::{
    App, InstanceReport, Limits, PoolLimits, ProxyHandler, Recorder, Request, RequestReport,
    Runtime, RuntimeConfig,
};
use wasmhive_guests::Guest;
use wasmtime::component::Component;

pub use wasmhive_guests as guests;

/// One runtime for the whole test binary (one engine, one epoch ticker),
/// with components compiled once each.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        Runtime::new(&RuntimeConfig {
            max_instances: 512,
            ..RuntimeConfig::default()
        })
        .expect("runtime")
    })
}

/// The compiled component of `guest`.
pub fn component(guest: Guest) -> Component {
    static COMPONENTS: OnceLock<Mutex<HashMap<&'static str, Component>>> = OnceLock::new();
    let components = COMPONENTS.get_or_init(Default::default);
    if let Some(component) = components.lock().unwrap().get(guest.name) {
        return component.clone();
    }
    let component = runtime().load_file(guest.path).expect("guest compiles");
    components
        .lock()
        .unwrap()
        .insert(guest.name, component.clone());
    component
}

/// An [`App`] for `guest`, its limits adjusted by `limits`.
pub fn app(guest: Guest, limits: impl FnOnce(&mut Limits)) -> App {
    let app = App::new(runtime(), &component(guest)).expect("guest is a wasi:http component");
    let mut adjusted = app.limits().clone();
    limits(&mut adjusted);
    app.with_limits(adjusted).label_output(false)
}

/// A handler for `guest` with adjusted limits, recording into the returned
/// [`Reports`].
pub fn handler(
    guest: Guest,
    limits: impl FnOnce(&mut Limits),
    pool: PoolLimits,
) -> (ProxyHandler<App>, Reports) {
    let reports = Reports::default();
    let handler = ProxyHandler::with_recorder(app(guest, limits), pool, Arc::new(reports.clone()));
    (handler, reports)
}

/// A request to `path` with `body`.
pub fn request(method: &str, path: &str, body: impl Into<Bytes>) -> Request {
    http::Request::builder()
        .method(method)
        .uri(format!("http://localhost{path}"))
        .header("host", "localhost")
        .body(wasmhive::into_body(Full::new(body.into())))
        .unwrap()
}

/// A `GET` of `path` with no body.
pub fn get(path: &str) -> Request {
    request("GET", path, Bytes::new())
}

/// Starts `request` on `handler` and polls it once: it must not be answered
/// at once (it is queued, or a guest works on it). The call goes on when
/// the returned future is polled again, and is given up when it is dropped.
pub async fn pending(
    handler: &ProxyHandler<App>,
    id: u64,
    request: Request,
) -> std::pin::Pin<Box<impl Future<Output = Result<wasmhive::Response, wasmhive::Error>> + '_>> {
    let mut call = Box::pin(handler.handle(id, request));
    assert!(
        futures::future::poll_immediate(&mut call).await.is_none(),
        "request {id} was answered at once"
    );
    call
}

/// Reads a whole body.
pub async fn read_body(response: wasmhive::Response) -> Bytes {
    response
        .into_body()
        .collect()
        .await
        .expect("body streams")
        .to_bytes()
}

/// Keeps every report for the test to inspect.
#[derive(Clone, Default)]
pub struct Reports {
    pub requests: Arc<Mutex<Vec<RequestReport>>>,
    pub instances: Arc<Mutex<Vec<InstanceReport>>>,
}

impl Recorder for Reports {
    fn request(&self, report: &RequestReport) {
        self.requests.lock().unwrap().push(report.clone());
    }

    fn instance(&self, report: &InstanceReport) {
        self.instances.lock().unwrap().push(report.clone());
    }
}

impl Reports {
    pub fn instances(&self) -> Vec<InstanceReport> {
        self.instances.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<RequestReport> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until an instance report satisfies `check`.
    pub async fn wait_for_instance(
        &self,
        check: impl Fn(&InstanceReport) -> bool,
    ) -> InstanceReport {
        for _ in 0..1000 {
            if let Some(found) = self.instances().into_iter().find(|r| check(r)) {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "no matching instance report within 10 s: {:?}",
            self.instances()
        );
    }
}

/// Serves `handler` with hyper (HTTP/1.1 and HTTP/2) on 127.0.0.1 and
/// returns the address. The server lives as long as the runtime.
pub async fn serve(handler: ProxyHandler<App>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let ids = Arc::new(std::sync::atomic::AtomicU64::new(0));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (handler, ids) = (handler.clone(), ids.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        let id = ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        async move {
                            let request = request.map(wasmhive::into_body);
                            Ok::<_, std::convert::Infallible>(
                                match handler.handle(id, request).await {
                                    Ok(response) => response,
                                    Err(error) => http::Response::builder()
                                        .status(500)
                                        .body(wasmhive::into_body(Full::new(Bytes::from(
                                            error.to_string(),
                                        ))))
                                        .unwrap(),
                                },
                            )
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    addr
}

/// Sends a request with extra `headers` over loopback with hyper's client
/// and returns the status, headers and whole body.
pub async fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (u16, http::HeaderMap, Bytes) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body)).unwrap();
    let response = client
        .request(request)
        .await
        .expect("request over loopback");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, body)
}

/// A body of `len` bytes with no repeating pattern of any short period,
/// different for each `seed`: echoes of it can only match byte for byte.
pub fn payload(seed: usize, len: usize) -> Bytes {
    let mut state = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Waits until `handler`'s stats satisfy `check` (checked every 10 ms, for
/// up to 10 s); returns them.
pub async fn wait_for_stats(
    handler: &ProxyHandler<App>,
    check: impl Fn(&wasmhive::Stats) -> bool,
) -> wasmhive::Stats {
    for _ in 0..1000 {
        let stats = handler.stats();
        if check(&stats) {
            return stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("stats never matched: {:?}", handler.stats());
}
