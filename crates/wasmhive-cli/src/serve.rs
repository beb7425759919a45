//! `wasmhive serve`: loads the component, accepts connections (HTTP/1.1 and
//! HTTP/2, cleartext or over TLS with ALPN), hands each request to the library's [`ProxyHandler`], maps its
//! typed errors to statuses, and drains on SIGINT or SIGTERM.
//!
//! Per connection: hyper-util's auto builder, a deadline for the first
//! request, a connection cap (`--max-connections`, enforced by not
//! accepting) and the client's fair share (`clients.rs`). Per request: a
//! place in the client's share, an id, a `request` span, the body-size
//! limit (413 from `Content-Length` at once; a body without one is cut off
//! at the limit), then `ProxyHandler::handle`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::Scheme;
use http::{HeaderValue, StatusCode, header};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;
use wasmhive::{
    AdaptiveConcurrency, App, ClientKey, Error, HandlerState, Limits, MemoryBudget, PoolLimits,
    ProxyHandler, Runtime, RuntimeConfig,
};

use crate::UsageError;
use crate::admin::Admin;
use crate::args::ServeArgs;
use crate::clients::{ClientConnection, Clients, Holding};
use crate::manifest::{AppSpec, Source};
use crate::request_body::{CutOff, RequestBody, Verdict};
use crate::router::{Route, Router};
use crate::telemetry;
use crate::versions::{Served, Versions};

/// How often an HTTP/2 connection is pinged, and how long the answer may
/// take before the connection is closed.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Largest request head a client may send: an HTTP/1 request line and
/// headers, or an HTTP/2 header list (counted as HTTP/2 does, 32 bytes
/// more per field); beyond it the answer is `431`.
const MAX_HEAD_SIZE: usize = 64 * 1024;

/// Runs the server until it has drained after a signal.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let _logs = telemetry::init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let served = runtime.block_on(serve(args));
    // A reload still compiling on a blocking thread does not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(100));
    served
}

/// How long a reloaded app's trial instantiation may take (its start-up
/// code runs, which may loop).
const RELOAD_INSTANTIATE_TIMEOUT: Duration = Duration::from_secs(30);

/// File descriptors the server needs besides its client connections: the
/// admin endpoint's, listeners, the component file, the runtime's own.
const FD_RESERVE: u64 = 256;

/// Makes sure `--max-connections` connections fit under the process's
/// file-descriptor limit, raising the soft limit (up to the hard one) if
/// need be.
fn check_fd_limit(max_connections: u32) -> anyhow::Result<()> {
    let needed = u64::from(max_connections) + crate::admin::MAX_CONNECTIONS as u64 + FD_RESERVE;
    let limit =
        rlimit::increase_nofile_limit(needed).context("cannot read the file-descriptor limit")?;
    if limit < needed {
        anyhow::bail!(
            "--max-connections {max_connections} needs {needed} file descriptors, but this \
             process may open only {limit}: lower --max-connections or raise the limit \
             (ulimit -n)"
        );
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // First of all: a reload signal while the app still loads (a deploy
    // tool's, during a slow start) must not end the process, SIGHUP's
    // default. It reloads once the server is up.
    let hangups = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    check_fd_limit(args.max_connections).map_err(UsageError)?;
    let tls = tls_acceptor(&args)
        .map_err(UsageError)?
        .map(|acceptor| Arc::new(ArcSwap::from_pointee(acceptor)));
    let loader = Loader {
        args: args.clone(),
        source: Source::of(&args),
        budget: MemoryBudget::new(usize::try_from(args.max_total_memory()).unwrap_or(usize::MAX)),
        workers: tokio::runtime::Handle::current().metrics().num_workers(),
    };
    let loaded = loader.load().map_err(UsageError)?;
    // What every app's instances take at once: the per-client request
    // share's default is half of it.
    let capacity: usize = loaded
        .iter()
        .map(|app| app.pool.max_instances * app.app.requests_per_instance())
        .sum();
    // Metrics are only collected when something can read them.
    let metrics = match args.admin_addr {
        Some(_) => Some(telemetry::init_metrics()?),
        None => None,
    };

    let listener = listen(args.addr, args.reuse_port)
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let admin_listener = crate::admin::bind(args.admin_addr).await?;
    // Before the address line: a signal from then on is obeyed, not fatal.
    let mut shutdown = Shutdown::new()?;
    telemetry::announce_address(listener.local_addr()?, tls.is_some());
    // Whatever RUST_LOG says, and before any guest runs: a supervisor reads
    // it (`--workers`).
    if let Some(admin) = &admin_listener {
        crate::admin::announce(admin)?;
    }
    announce_loaded(&loaded);
    // Served after the address line: prewarming starts with it, and what
    // it logs must not come first.
    let versions = Versions::new(loader.serve(loaded), {
        let tls = tls.clone();
        Arc::new(move || loader.reload(tls.as_deref()))
    });
    tokio::spawn(reload_on_hangup(versions.clone(), hangups));

    let draining = Arc::new(AtomicBool::new(false));
    if let (Some(admin_listener), Some(metrics)) = (admin_listener, metrics) {
        let admin = Admin {
            versions: versions.clone(),
            metrics,
            draining: draining.clone(),
        };
        tokio::spawn(crate::admin::serve(Arc::new(admin), admin_listener));
    }

    let server = Arc::new(Server {
        versions: versions.clone(),
        scheme: match tls {
            None => Scheme::HTTP,
            Some(_) => Scheme::HTTPS,
        },
        max_body_size: args.max_body_size,
        body_timeout: args.body_timeout,
        next_id: AtomicU64::new(0),
    });
    let clients = Clients::new(
        args.max_connections_per_client
            .map_or((args.max_connections as usize / 2).max(1), |n| n as usize),
        args.max_requests_per_client
            .map_or((capacity / 2).max(1), |n| n as usize),
        args.queue_timeout,
        args.queue_len,
    );
    let graceful = GracefulShutdown::new();
    let connections = Connections::new(&args, server, tls);
    accept(
        &listener,
        &connections,
        &clients,
        (args.max_connections, &graceful),
        std::pin::pin!(shutdown.recv()),
    )
    .await;

    draining.store(true, Ordering::Relaxed);
    drop(listener);
    drain(&versions, graceful, shutdown, args.drain_timeout).await;
    Ok(())
}

/// Drains after the first signal: new requests on open connections are
/// answered 503, in-flight ones finish, idle connections close, all within
/// `deadline`; a second signal exits at once.
async fn drain(
    versions: &Versions,
    graceful: GracefulShutdown,
    mut shutdown: Shutdown,
    deadline: Duration,
) {
    versions.shutdown();
    tracing::info!(
        deadline = %humantime::format_duration(deadline),
        "draining in-flight requests (signal again to exit at once)"
    );
    tokio::spawn(async move {
        shutdown.recv().await;
        telemetry::announce_warning("second signal: exiting without draining");
        std::process::exit(130);
    });
    let drained = async {
        graceful.shutdown().await;
        versions.drained().await;
    };
    match tokio::time::timeout(deadline, drained).await {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => tracing::warn!(
            live_instances = versions.live_instances(),
            "drain deadline passed; exiting with requests still in flight"
        ),
    }
}

/// Logs how loading each app went, once the address line is out.
fn announce_loaded(loaded: &[Loaded]) {
    for app in loaded {
        tracing::info!(
            app = %app.spec.name,
            component = %app.component,
            world = ?app.app.world(),
            took = ?app.took,
            from_cache = app.from_cache,
            route = %app.spec.route,
            host = app.spec.host.as_deref().unwrap_or("*"),
            "component loaded"
        );
        tracing::debug!(app = %app.spec.name, limits = ?app.app.limits(), "instance limits");
    }
}

/// What loading the apps needs, at start-up and on every reload.
struct Loader {
    args: ServeArgs,
    source: Source,
    /// Shared by every app of every version.
    budget: MemoryBudget,
    /// The runtime's worker threads.
    workers: usize,
}

impl Loader {
    /// Whether the apps come from a manifest: then they are named in
    /// errors and labelled with their names in the metrics; the command
    /// line's one app is neither.
    fn is_manifest(&self) -> bool {
        matches!(self.source, Source::Manifest(_))
    }

    /// Every app of the source, loaded with its settings; the apps share
    /// the memory budget. Fails on the first app that does not load.
    fn load(&self) -> anyhow::Result<Vec<Loaded>> {
        self.source
            .read(&self.args)?
            .into_iter()
            .map(|spec| {
                let name = spec.name.clone();
                let loaded = load_app(spec, &self.budget, self.workers);
                if self.is_manifest() {
                    loaded.with_context(|| format!("app `{name}`"))
                } else {
                    loaded
                }
            })
            .collect()
    }

    /// Starts serving `loaded`: each app gets its pool (and starts
    /// prewarming) and its place in the routes.
    fn serve(&self, loaded: Vec<Loaded>) -> Router<Served> {
        Router::new(
            loaded
                .into_iter()
                .map(|loaded| {
                    let labels = match self.is_manifest() {
                        true => vec![metrics::Label::new("app", loaded.spec.name.clone())],
                        false => Vec::new(),
                    };
                    let recorder = Arc::new(telemetry::MetricsRecorder {
                        labels: labels.clone(),
                    });
                    Route {
                        route: loaded.spec.route,
                        host: loaded.spec.host,
                        app: Served {
                            name: loaded.spec.name,
                            handler: ProxyHandler::with_recorder(loaded.app, loaded.pool, recorder),
                            labels,
                        },
                    }
                })
                .collect(),
        )
    }

    /// A new version of every app, for a reload (SIGHUP, the admin
    /// endpoint). It takes requests only once each of its apps has
    /// instantiated: one that cannot is refused here, not met by its first
    /// requests. The TLS certificate and key are read again too (a
    /// renewal) and stored in `tls` once the apps are in.
    fn reload(&self, tls: Option<&ArcSwap<TlsAcceptor>>) -> anyhow::Result<Router<Served>> {
        let loaded = self.load()?;
        let acceptor = tls_acceptor(&self.args)?;
        for app in &loaded {
            let instantiated = tokio::runtime::Handle::current().block_on(tokio::time::timeout(
                RELOAD_INSTANTIATE_TIMEOUT,
                HandlerState::instantiate(&app.app, 0),
            ));
            match instantiated {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    anyhow::bail!("app `{}` does not instantiate: {error:#}", app.spec.name)
                }
                Err(_) => anyhow::bail!(
                    "app `{}` did not instantiate within {RELOAD_INSTANTIATE_TIMEOUT:?}",
                    app.spec.name
                ),
            }
        }
        if let (Some(tls), Some(acceptor)) = (tls, acceptor) {
            tls.store(Arc::new(acceptor));
        }
        Ok(self.serve(loaded))
    }
}

/// The TLS acceptor of `--tls-cert` and `--tls-key`, if given.
fn tls_acceptor(args: &ServeArgs) -> anyhow::Result<Option<TlsAcceptor>> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => crate::tls::acceptor(cert, key).map(Some),
        _ => Ok(None),
    }
}

/// An app loaded, not serving yet, and how loading it went (logged once
/// the server is listening, so that the address stays the first line on
/// stderr).
struct Loaded {
    spec: AppSpec,
    app: App,
    pool: PoolLimits,
    component: String,
    took: Duration,
    from_cache: bool,
}

/// One app's component with the limits, environment and outbound
/// allowlist of its settings.
fn load_app(spec: AppSpec, budget: &MemoryBudget, workers: usize) -> anyhow::Result<Loaded> {
    let args = &spec.args;
    if args.prewarm > args.max_instances as usize {
        anyhow::bail!(
            "--prewarm ({}) cannot exceed --max-instances ({})",
            args.prewarm,
            args.max_instances
        );
    }
    let config = RuntimeConfig {
        pooling: !args.no_pooling,
        max_instances: args.max_instances as usize,
        max_memory: usize::try_from(args.max_memory).unwrap_or(usize::MAX),
        max_concurrency: args.max_concurrent_per_instance.map(|n| n as usize),
        cache_dir: args.cache_dir(),
        memory_budget: Some(budget.limit()),
        ..RuntimeConfig::default()
    };
    let loading = Instant::now();
    let ((runtime, component), name) = match &args.component {
        Some(path) if args.allow_precompiled && Runtime::is_precompiled_file(path) => (
            // SAFETY: the user vouches for the file with --allow-precompiled.
            unsafe { Runtime::for_precompiled_file(&config, path)? },
            path.display().to_string(),
        ),
        Some(path) => (
            Runtime::for_component_file(&config, path)?,
            path.display().to_string(),
        ),
        None => (
            Runtime::for_component(&config, wasmhive_demo::DEMO_WASM)?,
            "the bundled demo app".to_string(),
        ),
    };
    let (took, from_cache) = (loading.elapsed(), runtime.compile_cache_hits() > 0);
    let app = App::new(&runtime, &component).with_context(|| format!("cannot serve {name}"))?;
    let defaults = Limits::for_world(app.world());
    let limits = Limits {
        max_reuse: args.max_reuse.map_or(defaults.max_reuse, |n| n as usize),
        max_concurrency: args
            .max_concurrent_per_instance
            .map_or(defaults.max_concurrency, |n| n as usize),
        idle_timeout: args.idle_timeout,
        request_timeout: args.request_timeout,
        post_return_timeout: args.post_return_timeout,
        max_memory: usize::try_from(args.max_memory).unwrap_or(usize::MAX),
    };
    let mut app = app
        .label_output(!args.no_logging_prefix)
        .with_memory_budget(budget.clone());
    for (key, value) in &args.env {
        app = app.with_env(key, value);
    }
    for authority in &args.allow_outbound {
        app = app.allow_outbound(authority.clone());
    }
    let pool = PoolLimits {
        max_instances: args.max_instances as usize,
        max_running: args.max_running.map_or(workers, |n| n as usize),
        max_queue_len: args.queue_len,
        max_queue_wait: args.queue_timeout,
        prewarm: args.prewarm,
        time_slice: args.time_slice,
        adaptive_concurrency: args.adaptive_concurrency.then(AdaptiveConcurrency::default),
        ..PoolLimits::default()
    };
    Ok(Loaded {
        spec,
        app: app.with_limits(limits),
        pool,
        component: name,
        took,
        from_cache,
    })
}

/// Listens on `addr`, sharing its port with other processes that do so too
/// if `reuse_port`.
fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    bind(addr, reuse_port)?.listen(LISTEN_BACKLOG)
}

/// A socket bound to `addr`, not listening yet; with `reuse_port`, other
/// sockets that set it too may bind the same port.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted server need not wait for its
    // predecessor's connections in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(reuse_port)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Connections the kernel holds ready for `accept`.
const LISTEN_BACKLOG: u32 = 1024;

/// Accepts connections until `signal` fires, within `--max-connections`.
async fn accept(
    listener: &TcpListener,
    connections: &Connections,
    clients: &Arc<Clients>,
    (max_connections, graceful): (u32, &GracefulShutdown),
    mut signal: Pin<&mut impl Future<Output = ()>>,
) {
    let permits = Arc::new(Semaphore::new(max_connections as usize));
    loop {
        let permit = tokio::select! {
            biased;
            () = signal.as_mut() => return,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = signal.as_mut() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(client) = clients.connect(peer.ip()) else {
            metrics::counter!("wasmhive_client_share_refused_total", "what" => "connection")
                .increment(1);
            tracing::debug!(client = %peer.ip(), "connection closed: the client has its share open");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (connections, watcher) = (connections.clone(), graceful.watcher());
        tokio::spawn(async move {
            connections.serve(stream, Arc::new(client), watcher).await;
            drop(permit);
        });
    }
}

/// What serving a client connection takes, shared by all of them.
#[derive(Clone)]
struct Connections {
    builder: auto::Builder<TokioExecutor>,
    server: Arc<Server>,
    /// The acceptor for new connections; a reload may replace it.
    tls: Option<Arc<ArcSwap<TlsAcceptor>>>,
    open: metrics::Gauge,
    /// `--header-timeout`: how long a connection may be idle, and how long
    /// a TLS handshake may take.
    idle_timeout: Duration,
    /// `--send-timeout`.
    send_timeout: Duration,
}

impl Connections {
    fn new(
        args: &ServeArgs,
        server: Arc<Server>,
        tls: Option<Arc<ArcSwap<TlsAcceptor>>>,
    ) -> Connections {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(args.header_timeout)
            .max_buf_size(MAX_HEAD_SIZE);
        // Pings find HTTP/2 peers that went silent (a client that sent its
        // preface and SETTINGS and then nothing answers none).
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(H2_KEEP_ALIVE))
            .keep_alive_timeout(H2_KEEP_ALIVE)
            .max_header_list_size(MAX_HEAD_SIZE as u32)
            .max_concurrent_streams(args.max_streams_per_connection);
        Connections {
            builder,
            server,
            tls,
            open: metrics::gauge!("wasmhive_connections_open"),
            idle_timeout: args.header_timeout,
            send_timeout: args.send_timeout,
        }
    }

    /// Serves `stream` until it ends, its client misbehaves, or the server
    /// has drained (`watcher`); over TLS if the server serves HTTPS.
    async fn serve(&self, stream: TcpStream, client: Arc<ClientConnection>, watcher: Watcher) {
        self.open.increment(1.0);
        let local = stream.local_addr().ok();
        match &self.tls {
            None => {
                self.serve_http(TokioIo::new(stream), client, local, watcher)
                    .await
            }
            Some(tls) => {
                match tokio::time::timeout(self.idle_timeout, tls.load_full().accept(stream)).await
                {
                    Ok(Ok(stream)) => {
                        self.serve_http(TokioIo::new(stream), client, local, watcher)
                            .await
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                    Err(_) => {
                        metrics::counter!("wasmhive_connections_timed_out_total").increment(1);
                        tracing::debug!(
                            "connection closed: no TLS handshake within the header timeout"
                        );
                    }
                }
            }
        }
        self.open.decrement(1.0);
    }

    async fn serve_http<I>(
        &self,
        io: I,
        client: Arc<ClientConnection>,
        local: Option<SocketAddr>,
        watcher: Watcher,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn({
            let (server, client) = (self.server.clone(), client.clone());
            move |mut request| {
                let (server, client) = (server.clone(), client.clone());
                // HTTP/1.0 has no `Host` to require (HAProxy's default health
                // check sends none): the request is for this server.
                if let Some(local) = local {
                    default_host(&mut request, local);
                }
                async move { Ok::<_, Infallible>(server.respond(request, &client).await) }
            }
        });
        let connection = self.builder.serve_connection(io, service).into_owned();
        let mut connection = std::pin::pin!(watcher.watch(connection));
        let (idle_timeout, send_timeout) = (self.idle_timeout, self.send_timeout);
        // Dropping the connection closes the socket.
        let ended = loop {
            // Every connection state has this deadline while nothing is
            // in flight: first bytes, protocol detection, the HTTP/2
            // preface and SETTINGS, an HTTP/1 head, and an HTTP/2
            // connection with no open stream (whose client may answer
            // pings forever).
            let now = tokio::time::Instant::now();
            let idle = client.idle_since().unwrap_or(now) + idle_timeout;
            let stalled = client.stalled_since().unwrap_or(now) + send_timeout;
            tokio::select! {
                ended = &mut connection => break Some(ended),
                () = client.abusive() => {
                    metrics::counter!("wasmhive_connections_closed_for_resets_total")
                        .increment(1);
                    tracing::debug!(
                        "connection closed: it reset more requests than it let finish"
                    );
                    break None;
                }
                () = tokio::time::sleep_until(idle.min(stalled)) => {
                    if client.idle_since().is_some_and(|since| since.elapsed() >= idle_timeout) {
                        metrics::counter!("wasmhive_connections_timed_out_total").increment(1);
                        tracing::debug!("connection closed: idle for the header timeout");
                        break None;
                    }
                    // A client that takes none of a response for this
                    // long would hold its instance for as long as it
                    // likes (an HTTP/2 window kept shut, say).
                    if client.stalled_since().is_some_and(|since| since.elapsed() >= send_timeout) {
                        metrics::counter!("wasmhive_connections_send_timed_out_total")
                            .increment(1);
                        tracing::debug!("connection closed: its client stopped taking a response");
                        break None;
                    }
                }
            }
        };
        if let Some(Err(error)) = ended {
            tracing::debug!(error = %error, "connection ended with an error");
        }
    }
}

/// Reloads the app on every SIGHUP; a version that fails to load is
/// refused and the current one keeps serving.
async fn reload_on_hangup(versions: Arc<Versions>, mut hangups: Signal) {
    while hangups.recv().await.is_some() {
        // A failure is logged by `reload`.
        let _ = versions.reload().await;
    }
}

/// SIGTERM and SIGINT, which drain the server (and, the second time, end
/// it at once).
struct Shutdown {
    terminate: Signal,
    interrupt: Signal,
}

impl Shutdown {
    fn new() -> anyhow::Result<Shutdown> {
        Ok(Shutdown {
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// What every request needs.
struct Server {
    versions: Arc<Versions>,
    /// The scheme every request arrives with: `https` over TLS.
    scheme: Scheme,
    max_body_size: u64,
    body_timeout: Duration,
    next_id: AtomicU64,
}

type Response = http::Response<wasmhive::Body>;

impl Server {
    /// Answers one request within `client`'s share; never fails (errors
    /// become statuses).
    async fn respond(
        &self,
        mut request: hyper::Request<Incoming>,
        client: &Arc<ClientConnection>,
    ) -> Response {
        let busy = client.busy();
        let started = Instant::now();
        if let Some(why) = not_implemented(&request) {
            telemetry::record_response(501, started.elapsed(), &[]);
            let response = plain(StatusCode::NOT_IMPLEMENTED, why.into());
            return response.map(|body| wasmhive::into_body(Holding::new(body, None, busy)));
        }
        let Some(place) = client.request_place().await else {
            metrics::counter!("wasmhive_client_share_refused_total", "what" => "request")
                .increment(1);
            telemetry::record_response(503, started.elapsed(), &[]);
            let mut response = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many requests in flight from this client\n".into(),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1));
            return response.map(|body| wasmhive::into_body(Holding::new(body, None, busy)));
        };
        // Counts the request as reset if the client goes away before its
        // response head.
        let reset = ResetOnDrop(Some(client));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Held until the response head: the version is not shut down
        // before.
        let version = self.versions.enter();
        let Some(app) = version.route(request_host(&request), request.uri().path()) else {
            reset.disarm();
            telemetry::record_response(404, started.elapsed(), &[]);
            let response = plain(StatusCode::NOT_FOUND, "no app serves this path\n".into());
            return response.map(|body| wasmhive::into_body(Holding::new(body, Some(place), busy)));
        };
        // The guest may outlive the client's interest in the request: the
        // place goes with it until the guest is done, and is charged for
        // an instance the request keeps alive after it retired.
        let extensions = request.extensions_mut();
        extensions.insert(place.occupant(app.handler.state().requests_per_instance()));
        // Running places are shared out by address, like the rest.
        extensions.insert(ClientKey::of(&client.ip()));
        let span = tracing::info_span!(
            "request",
            id,
            app = %app.name,
            method = %request.method(),
            path = %request.uri().path(),
        );
        let response = self
            .dispatch(&app.handler, id, request)
            .instrument(span)
            .await;
        reset.disarm();
        telemetry::record_response(response.status().as_u16(), started.elapsed(), &app.labels);
        response.map(|body| wasmhive::into_body(Holding::new(body, Some(place), busy)))
    }

    async fn dispatch(
        &self,
        handler: &ProxyHandler<App>,
        id: u64,
        mut request: hyper::Request<Incoming>,
    ) -> Response {
        // What the guest sees as the scheme is the connection's, whatever
        // the request target or `:scheme` claims.
        request.extensions_mut().insert(self.scheme.clone());
        let limit = self.max_body_size;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit) {
            return too_large(limit);
        }
        // hyper holds a body with a Content-Length to it; a body without one
        // (chunked, or HTTP/2 frames) is counted as the guest reads it.
        let verdict = Verdict::default();
        let request = if request.body().is_end_stream() {
            request.map(wasmhive::into_body)
        } else {
            let limit = declared.is_none().then_some(limit);
            let (pause, verdict) = (self.body_timeout, verdict.clone());
            request.map(|body| wasmhive::into_body(RequestBody::new(body, limit, pause, verdict)))
        };
        let result = handler.handle(id, request).await;
        // The body was cut off before the guest answered: the client's
        // doing, whatever the guest made of it.
        match verdict.get() {
            Some(CutOff::TooLarge) => return too_large(limit),
            Some(CutOff::TooSlow) => {
                return plain(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body stalled\n".into(),
                );
            }
            Some(CutOff::Broken) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    "the request body was malformed or cut short\n".into(),
                );
            }
            None => {}
        }
        match result {
            Ok(response) => {
                // The guest writes a response body after its head (p3: a
                // task after the call returned; p2: after setting the
                // outparam), in the instance's task. Yielding lets that task
                // run first, so that hyper, which polls the body as soon as
                // it has the head, usually finds the first frame (or all of
                // it) ready and sends head and body in one write instead of
                // two (hello-p3: 2.0 `writev` calls per request down to
                // 1.2). A yielded task waits until its thread runs out of
                // other work, though, so not while requests queue for an
                // instance or guests compute on every running place: then
                // the thread has better things to run, and the head would
                // wait behind them (up to 28 ms at the 99th percentile in
                // the overload scenario).
                if !response.body().is_end_stream() && handler.has_room_to_run() {
                    tokio::task::yield_now().await;
                }
                response
            }
            Err(error) => error_response(&error),
        }
    }
}

/// Why this server cannot serve `request`, if it cannot (RFC 9110 asks for
/// `501` then): a CONNECT over HTTP/1, whose `2xx` would turn the connection
/// into a tunnel (hyper then drops the response body the guest wrote), or a
/// body in a transfer coding other than chunked (hyper undoes the chunking
/// alone, and the guest would take the rest for plain content).
fn not_implemented<B>(request: &hyper::Request<B>) -> Option<&'static str> {
    if request.method() == http::Method::CONNECT && request.version() < http::Version::HTTP_2 {
        return Some("CONNECT is not supported over HTTP/1: wasi:http serves no tunnels\n");
    }
    let mut codings = request
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .filter(|coding| !coding.is_empty());
    codings
        .any(|coding| !coding.eq_ignore_ascii_case("chunked"))
        .then_some("no transfer coding but chunked is supported\n")
}

/// Gives an HTTP/1.0 request with neither an absolute target nor a `Host`
/// header the address it arrived on as its `Host`.
fn default_host<B>(request: &mut hyper::Request<B>, local: SocketAddr) {
    if request.version() == http::Version::HTTP_10
        && request.uri().authority().is_none()
        && !request.headers().contains_key(header::HOST)
        && let Ok(host) = HeaderValue::try_from(local.to_string())
    {
        request.headers_mut().insert(header::HOST, host);
    }
}

/// The host a request is for, without port: from an absolute target or
/// HTTP/2's `:authority`, else the `Host` header.
fn request_host<B>(request: &hyper::Request<B>) -> Option<&str> {
    if let Some(host) = request.uri().host() {
        return Some(host);
    }
    let host = request.headers().get(header::HOST)?.to_str().ok()?;
    // `name`, `name:port`, `[v6]` or `[v6]:port`.
    match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => Some(name),
        _ => Some(host),
    }
}

/// Tells a connection, when dropped armed, that its client reset a
/// request it had sent.
struct ResetOnDrop<'a>(Option<&'a ClientConnection>);

impl ResetOnDrop<'_> {
    /// The request got its response head: a finished request, not a reset.
    fn disarm(mut self) {
        if let Some(client) = self.0.take() {
            client.finished();
        }
    }
}

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            client.reset();
        }
    }
}

/// A short plain-text answer for a request the guest did not answer.
fn error_response(error: &Error) -> Response {
    let status = error.status();
    match error {
        Error::Overloaded(_) | Error::ShuttingDown(_) | Error::InvalidRequest(_) => {
            tracing::debug!(%error, status = status.as_u16(), "request refused");
        }
        _ => tracing::warn!(%error, status = status.as_u16(), "request failed"),
    }
    // The details stay in the log: the client learns the status and a
    // fixed sentence, never a trap, a path or a stack.
    let mut response = plain(status, format!("{}\n", error.public_message()));
    if let Some(after) = error.retry_after() {
        let seconds = after.as_secs_f64().ceil().max(1.0) as u64;
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn too_large(limit: u64) -> Response {
    let mut response = plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {limit} bytes\n"),
    );
    // The rest of the body is not read: do not reuse the connection.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn plain(status: StatusCode, body: String) -> Response {
    let mut response = http::Response::new(wasmhive::into_body(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
