//! The load generator: a closed loop (N connections, each sending its next
//! request when the previous answer is complete) and an open loop (a fixed
//! offered rate, latency counted from when each request was due, so a
//! stalled server cannot hide its queueing). Every latency goes into an HDR
//! histogram in microseconds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;

use crate::servers::{cores, cpu_time};

/// What to send.
#[derive(Clone, Debug)]
pub struct Target {
    /// The server.
    pub addr: SocketAddr,
    /// Path and query.
    pub path: String,
    /// A request body (sent with `POST`), or none (`GET`).
    pub body: Option<Bytes>,
}

impl Target {
    fn request(&self) -> http::Request<Full<Bytes>> {
        let builder = http::Request::builder()
            .uri(&self.path)
            .header(http::header::HOST, self.addr.to_string());
        match &self.body {
            Some(body) => builder
                .method(http::Method::POST)
                .body(Full::new(body.clone())),
            None => builder
                .method(http::Method::GET)
                .body(Full::new(Bytes::new())),
        }
        .expect("valid request")
    }
}

/// What a load run measured.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Latencies of successful (2xx) answers, in microseconds.
    pub ok: Histogram<u64>,
    /// The same answers' latencies from when the client sent the request,
    /// not from when it was due: without an open loop's own lateness (its
    /// timer's 1 ms granularity, its threads waiting for a core), which
    /// the closed loops do not have.
    pub ok_from_send: Histogram<u64>,
    /// Latencies of `503` answers, in microseconds.
    pub shed: Histogram<u64>,
    /// Answers by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that failed without a status (connection errors).
    pub errors: u64,
    /// Open loop: requests the client could not even send because too many
    /// were outstanding.
    pub not_sent: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// This process's CPU time over the run, as a share of all cores.
    pub client_cpu: f64,
    /// The server's CPU time over the run, as a share of all cores.
    pub server_cpu: f64,
}

impl Measured {
    fn new() -> Measured {
        Measured {
            ok: histogram(),
            ok_from_send: histogram(),
            shed: histogram(),
            statuses: BTreeMap::new(),
            errors: 0,
            not_sent: 0,
            elapsed: Duration::ZERO,
            client_cpu: 0.0,
            server_cpu: 0.0,
        }
    }

    fn merge(&mut self, other: &Measured) {
        self.ok.add(&other.ok).expect("same bounds");
        self.ok_from_send
            .add(&other.ok_from_send)
            .expect("same bounds");
        self.shed.add(&other.shed).expect("same bounds");
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
        self.errors += other.errors;
        self.not_sent += other.not_sent;
    }

    /// Records an answer (`None`: no answer) `latency` after the request
    /// was due and `from_send` after it was sent.
    fn record(&mut self, status: Option<u16>, latency: Duration, from_send: Duration) {
        let us = |d: Duration| (d.as_micros() as u64).max(1);
        match status {
            Some(status) => {
                *self.statuses.entry(status).or_default() += 1;
                if (200..300).contains(&status) {
                    self.ok.saturating_record(us(latency));
                    self.ok_from_send.saturating_record(us(from_send));
                } else if status == 503 {
                    self.shed.saturating_record(us(latency));
                }
            }
            None => self.errors += 1,
        }
    }

    /// Successful answers per second.
    pub fn ok_rate(&self) -> f64 {
        self.ok.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A percentile of successful answers, in milliseconds.
    pub fn ok_ms(&self, percentile: f64) -> f64 {
        percentile_ms(&self.ok, percentile)
    }
}

/// A percentile of one of [`Measured`]'s histograms, in milliseconds.
pub fn percentile_ms(latencies: &Histogram<u64>, percentile: f64) -> f64 {
    latencies.value_at_percentile(percentile) as f64 / 1000.0
}

fn histogram() -> Histogram<u64> {
    // 1 us to 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds")
}

/// Measures CPU use of this process and `server` around `run`.
async fn with_cpu<F: Future<Output = Measured>>(server: &[u32], run: F) -> Measured {
    let server_cpu = || -> Duration { server.iter().map(|&pid| cpu_time(Some(pid))).sum() };
    let started = Instant::now();
    let (client0, server0) = (cpu_time(None), server_cpu());
    let mut measured = run.await;
    measured.elapsed = started.elapsed();
    let capacity = measured.elapsed.as_secs_f64() * cores() as f64;
    measured.client_cpu = (cpu_time(None) - client0).as_secs_f64() / capacity;
    measured.server_cpu = (server_cpu().saturating_sub(server0)).as_secs_f64() / capacity;
    measured
}

pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Opens an HTTP/1.1 connection to `addr`; `None` when it fails.
pub(crate) async fn connect(addr: SocketAddr) -> Option<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// Sends one request on `sender` and reads the whole answer; `None` when the
/// connection failed.
async fn exchange(sender: &mut Sender, target: &Target) -> Option<u16> {
    exchange_body(sender, target)
        .await
        .map(|(status, _)| status)
}

/// Like [`exchange`], also returning the body.
pub(crate) async fn exchange_body(sender: &mut Sender, target: &Target) -> Option<(u16, Bytes)> {
    sender.ready().await.ok()?;
    let response = sender.send_request(target.request()).await.ok()?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, body))
}

/// `connections` connections, each sending requests back to back for
/// `duration`. `server` is the server's pid, for its CPU share.
pub async fn closed_loop(
    target: &Target,
    connections: usize,
    duration: Duration,
    server: &[u32],
) -> Measured {
    with_cpu(server, async {
        let deadline = Instant::now() + duration;
        let tasks: Vec<_> = (0..connections)
            .map(|_| {
                let target = target.clone();
                tokio::spawn(async move {
                    let mut measured = Measured::new();
                    let mut sender = None;
                    while Instant::now() < deadline {
                        if sender.is_none() {
                            sender = connect(target.addr).await;
                            if sender.is_none() {
                                measured.errors += 1;
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        }
                        let started = Instant::now();
                        let status = exchange(sender.as_mut().unwrap(), &target).await;
                        if status.is_none() {
                            sender = None;
                        }
                        let latency = started.elapsed();
                        measured.record(status, latency, latency);
                    }
                    measured
                })
            })
            .collect();
        let mut total = Measured::new();
        for task in tasks {
            total.merge(&task.await.expect("load task"));
        }
        total
    })
    .await
}

/// How long an open-loop request may wait for its answer.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// What an open loop measured: over the whole run, and over the requests
/// due once the server had had time to settle into the load.
pub struct OpenLoop {
    pub all: Measured,
    /// Answers (statuses and latencies only) to requests due at or after
    /// the `settle` time given to [`open_loop`]: without the onset of the
    /// overload.
    pub settled: Measured,
}

/// Offers `rate` requests per second for `duration`, each on a connection
/// of its own pool, with at most `max_outstanding` in flight (more are
/// counted as not sent). Latency counts from when a request was due (and,
/// in [`Measured::ok_from_send`], from when it was sent); no answer within
/// [`ANSWER_DEADLINE`] counts as an error.
pub async fn open_loop(
    target: &Target,
    rate: f64,
    duration: Duration,
    settle: Duration,
    max_outstanding: usize,
    server: &[u32],
) -> OpenLoop {
    let settled = Arc::new(std::sync::Mutex::new(Measured::new()));
    let all = with_cpu(server, async {
        let results = Arc::new(std::sync::Mutex::new(Measured::new()));
        let outstanding = Arc::new(Semaphore::new(max_outstanding));
        let idle: Arc<std::sync::Mutex<Vec<Sender>>> = Arc::default();
        let start = Instant::now();
        let total = (rate * duration.as_secs_f64()) as u64;
        let mut tasks = Vec::new();
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                results.lock().unwrap().not_sent += 1;
                continue;
            };
            let (target, results, idle) = (target.clone(), results.clone(), idle.clone());
            let settled = (due >= start + settle).then(|| settled.clone());
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let attempt = async {
                    let pooled = idle.lock().unwrap().pop();
                    let mut sender = match pooled {
                        Some(sender) => sender,
                        None => connect(target.addr).await?,
                    };
                    let status = exchange(&mut sender, &target).await?;
                    idle.lock().unwrap().push(sender);
                    Some(status)
                };
                // A server that stops answering (or a SYN stuck in an
                // overflowing accept backlog) counts as an error, not as a
                // stalled run.
                let status = tokio::time::timeout(ANSWER_DEADLINE, attempt)
                    .await
                    .ok()
                    .flatten();
                let (latency, from_send) = (due.elapsed(), sent.elapsed());
                results.lock().unwrap().record(status, latency, from_send);
                if let Some(settled) = settled {
                    settled.lock().unwrap().record(status, latency, from_send);
                }
                drop(permit);
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        results.lock().unwrap().clone()
    })
    .await;
    let settled = settled.lock().unwrap().clone();
    OpenLoop { all, settled }
}

/// Sends `GET path` until it gets a 200, for up to `timeout`; returns the
/// latency of the successful request.
pub async fn first_ok(addr: SocketAddr, path: &str, timeout: Duration) -> Option<Duration> {
    let target = Target {
        addr,
        path: path.to_string(),
        body: None,
    };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(mut sender) = connect(addr).await {
            let started = Instant::now();
            if exchange(&mut sender, &target).await == Some(200) {
                return Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Sends `n` requests at once, each on a connection of its own, and waits
/// for every answer.
pub async fn burst(target: &Target, n: usize) -> Measured {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let target = target.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let status = match connect(target.addr).await {
                    Some(mut sender) => exchange(&mut sender, &target).await,
                    None => None,
                };
                (status, started.elapsed())
            })
        })
        .collect();
    let mut measured = Measured::new();
    for task in tasks {
        let (status, latency) = task.await.expect("burst task");
        measured.record(status, latency, latency);
    }
    measured
}
