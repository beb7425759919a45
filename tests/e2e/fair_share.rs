//! One client cannot pin every instance: the HTTP/2 pinning patterns
//! (responses held by a zero flow-control window, request bodies that
//! never come, streams reset just after they started, alone or beside kept
//! ones) each leave at least half of the instance capacity to another
//! client, which gets `200`s meanwhile.
//!
//! The attacker connects from 127.0.0.1, the bystander from 127.0.0.2:
//! shares are per client address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use tokio::net::{TcpSocket, TcpStream};
use wasmhive_tests::guests;

use crate::{HEAVY, Server, wait_until_metric};

const ATTACKER: &str = "127.0.0.1";
const BYSTANDER: &str = "127.0.0.2";

async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// An HTTP/2 connection from `source`; `window` is the flow-control window
/// the client grants the server for each response.
async fn h2_from(source: &str, addr: SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    let stream = connect_from(source, addr).await;
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(stream)
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

fn h2_request(method: &str, addr: SocketAddr, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(())
        .unwrap()
}

/// Sends `GET path` on `sender`'s connection once it has room for a stream;
/// the stream is reset when the returned future is dropped unanswered.
async fn send(
    sender: &h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
) -> h2::client::ResponseFuture {
    let mut ready = sender.clone().ready().await.unwrap();
    ready
        .send_request(h2_request("GET", addr, path), true)
        .unwrap()
        .0
}

/// `sleep-p3` on 4 instances, with a 500 ms queue timeout, metrics, and
/// `flags`.
fn four_sleepers(flags: &[&str]) -> Server {
    let args = [
        guests::SLEEP_P3.path,
        "--max-instances",
        "4",
        "--queue-timeout",
        "500ms",
        "--admin-addr",
        "127.0.0.1:0",
    ];
    Server::start(&args.iter().chain(flags).copied().collect::<Vec<_>>())
}

/// `n` requests at once from the bystander's address, each on its own
/// HTTP/1.1 connection; their statuses (or why there was none), each
/// within 10 s.
async fn bystanders(
    addr: SocketAddr,
    method: &str,
    path: &str,
    n: usize,
) -> Vec<Result<u16, String>> {
    let requests = (0..n).map(|i| {
        let (method, path) = (method.to_string(), path.to_string());
        tokio::spawn(async move {
            let call = async {
                let stream = connect_from(BYSTANDER, addr).await;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                let body = format!("bystander {i}\n");
                let request = http::Request::builder()
                    .method(method.as_str())
                    .uri(path)
                    .header(http::header::HOST, addr.to_string())
                    .body(http_body_util::Full::new(Bytes::from(body.clone())))
                    .unwrap();
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let got = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                if method == "POST" && status == 200 && got.to_bytes() != body.as_bytes() {
                    return Err("the echo differs".to_string());
                }
                Ok(status)
            };
            tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .unwrap_or_else(|_| Err("no answer within 10 s".into()))
        })
    });
    let mut seen = Vec::new();
    for request in requests.collect::<Vec<_>>() {
        seen.push(request.await.unwrap());
    }
    seen
}

/// How an attacker pins instances: `connections` HTTP/2 connections from
/// [`ATTACKER`], each with 64 streams of `method path`.
struct Pinning {
    guest: wasmhive_guests::Guest,
    max_instances: &'static str,
    connections: usize,
    /// The flow-control window the attacker grants for each response.
    window: u32,
    method: &'static str,
    path: &'static str,
    /// Whether each request ends with its headers (else its body never
    /// comes).
    end_stream: bool,
    /// More `wasmhive serve` flags.
    flags: &'static [&'static str],
}

impl Pinning {
    /// Runs the attack until the attacker's surplus is refused (it holds its
    /// whole share), then checks that `bystanders` concurrent requests from
    /// [`BYSTANDER`] (`method bystander_path`) all get `200`.
    async fn leaves_room_for(self, bystander_path: &str, bystanders_at_once: usize) {
        let _heavy = HEAVY.lock().await;
        let server = Server::start(
            &[
                self.guest.path,
                "--max-instances",
                self.max_instances,
                "--queue-timeout",
                "500ms",
                "--admin-addr",
                "127.0.0.1:0",
            ]
            .into_iter()
            .chain(self.flags.iter().copied())
            .collect::<Vec<_>>(),
        );
        let addr = server.addr;
        let mut held = Vec::new();
        for _ in 0..self.connections {
            let mut sender = h2_from(ATTACKER, addr, self.window).await;
            for _ in 0..64 {
                sender = sender.ready().await.unwrap();
                let request = h2_request(self.method, addr, self.path);
                held.push(sender.send_request(request, self.end_stream).unwrap());
            }
        }
        // The attacker has its whole share: its surplus is refused.
        wait_until_metric(
            server.admin_addr().await,
            "wasmhive_client_share_refused_total{what=\"request\"}",
            |n| n >= 1.0,
            Duration::from_secs(20),
        )
        .await;

        let seen = bystanders(addr, self.method, bystander_path, bystanders_at_once).await;
        assert!(seen.iter().all(|s| s == &Ok(200)), "{seen:?}");
        drop(held);
        server.finish().await;
    }
}

#[tokio::test]
async fn zero_window_streams_leave_half_the_instances_to_others() {
    // 4 instances x 16 requests: 64 places, 32 per client. The attacker's
    // 256 responses can never be sent.
    Pinning {
        guest: guests::SLEEP_P3,
        max_instances: "4",
        connections: 4,
        window: 0,
        method: "GET",
        path: "/?ms=1",
        end_stream: true,
        flags: &[],
    }
    .leaves_room_for("/?ms=200", 32)
    .await;
}

/// 128 POST bodies that never arrive, to a p2 app on 8 instances run with
/// `flags`.
fn bodies_that_never_come(flags: &'static [&'static str]) -> Pinning {
    Pinning {
        guest: guests::ECHO_P2,
        max_instances: "8",
        connections: 2,
        window: 65_535,
        method: "POST",
        path: "/",
        end_stream: false,
        flags,
    }
}

#[tokio::test]
async fn request_bodies_that_never_come_leave_half_the_instances_to_others() {
    // p2: one request per instance, 8 places, 4 per client.
    bodies_that_never_come(&[]).leaves_room_for("/", 4).await;
}

#[tokio::test]
async fn a_p2_share_counts_one_request_per_instance_whatever_the_concurrency_flag() {
    // A p2 instance holds one request however high the flag: 8 places, 4
    // per client (the share was 8 of them, every instance).
    bodies_that_never_come(&["--max-concurrent-per-instance", "2"])
        .leaves_room_for("/", 4)
        .await;
}

#[tokio::test]
async fn streams_reset_after_they_started_free_their_instances() {
    let _heavy = HEAVY.lock().await;
    let server = Server::start(&[
        guests::SLEEP_P3.path,
        "--max-instances",
        "4",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let addr = server.addr;
    // HEADERS, then RST_STREAM 2 ms later, over and over: each request
    // reaches a guest that would sleep for a minute.
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut connections = 0;
            while !stop.load(Relaxed) {
                connections += 1;
                let mut sender = h2_from(ATTACKER, addr, 65_535).await;
                while !stop.load(Relaxed) {
                    let Ok(ready) = sender.ready().await else {
                        break;
                    };
                    sender = ready;
                    let Ok((response, _)) =
                        sender.send_request(h2_request("GET", addr, "/?ms=60000"), true)
                    else {
                        break;
                    };
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    drop(response);
                }
            }
            connections
        }
    });
    // The reset rule has closed one of the attacker's connections.
    wait_until_metric(
        server.admin_addr().await,
        "wasmhive_connections_closed_for_resets_total",
        |n| n >= 1.0,
        Duration::from_secs(20),
    )
    .await;

    let seen = bystanders(addr, "GET", "/?ms=200", 32).await;
    stop.store(true, Relaxed);
    assert!(
        attacker.await.unwrap() >= 2,
        "the attacker was never cut off"
    );
    assert!(seen.iter().all(|s| s == &Ok(200)), "{seen:?}");
    // The abandoned guest tasks did not keep their instances.
    wait_until_metric(
        server.admin_addr().await,
        "wasmhive_instance_exits_total{reason=\"abandoned\"}",
        |n| n >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    server.finish().await;
}

#[tokio::test]
async fn streams_reset_beside_kept_ones_leave_the_instances_to_others() {
    let _heavy = HEAVY.lock().await;
    // 4 instances x 16 requests: 64 places, 32 per client.
    let server = four_sleepers(&[]);
    let (addr, admin) = (server.addr, server.admin_addr().await);
    // Pairs of a request kept for a minute and one reset once a guest has
    // it. A reset used to retire its instance, which then lived until the
    // kept request ended: within 8 pairs every instance was held (by at
    // most 8 requests of the attacker's share of 32), and the next pair
    // never started.
    let sender = h2_from(ATTACKER, addr, 65_535).await;
    let mut kept = Vec::new();
    for pair in 1..=8 {
        kept.push(send(&sender, addr, "/?ms=60000").await);
        let reset = send(&sender, addr, "/?ms=60000").await;
        wait_until_metric(
            admin,
            "wasmhive_requests_started_total",
            |n| n >= f64::from(2 * pair),
            Duration::from_secs(20),
        )
        .await;
        drop(reset);
    }

    let seen = bystanders(addr, "GET", "/?ms=200", 16).await;
    assert!(seen.iter().all(|s| s == &Ok(200)), "{seen:?}");
    drop((kept, sender));
    server.finish().await;
}

#[tokio::test]
async fn requests_keeping_retired_instances_are_charged_for_them() {
    let _heavy = HEAVY.lock().await;
    // 4 instances x 2 requests (an instance retires once it took 2): 8
    // places, 4 per client.
    let server = four_sleepers(&["--max-reuse", "2"]);
    let (addr, admin) = (server.addr, server.admin_addr().await);
    // Per instance, a request kept for a minute and a quick one beside it:
    // the instance has taken its 2 and retires, but lives on for the kept
    // one. Each kept request used to count as one place: with 4 of them the
    // attacker held every instance, and others got `503`. Now a request
    // keeping a retired instance alone is charged its 2 places.
    let sender = h2_from(ATTACKER, addr, 65_535).await;
    let mut kept = Vec::new();
    for pair in 1..=2 {
        kept.push(send(&sender, addr, "/?ms=60000").await);
        wait_until_metric(
            admin,
            "wasmhive_requests_started_total",
            |n| n >= f64::from(2 * pair - 1),
            Duration::from_secs(20),
        )
        .await;
        // The kept request's instance offers room again once its guest
        // sleeps; the quick one must go to it, not to a new instance (the
        // retired one offers none).
        wait_until_metric(
            admin,
            "wasmhive_instances_available",
            |n| n >= 1.0,
            Duration::from_secs(20),
        )
        .await;
        let quick = send(&sender, addr, "/?ms=1").await.await.unwrap();
        assert_eq!(quick.status(), 200);
        let mut body = quick.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
        }
        wait_until_metric(
            admin,
            "wasmhive_client_places_for_retired_instances",
            |n| n >= f64::from(pair),
            Duration::from_secs(20),
        )
        .await;
    }
    // Two instances kept, four places: the attacker is at its share.
    let third = send(&sender, addr, "/?ms=60000").await;
    assert_eq!(third.await.unwrap().status(), 503);

    let seen = bystanders(addr, "GET", "/?ms=200", 4).await;
    assert!(seen.iter().all(|s| s == &Ok(200)), "{seen:?}");
    drop((kept, sender));
    server.finish().await;
}

/// A request for `cpu-p3` computing for about 100 s, sent from [`ATTACKER`]
/// on its own HTTP/1.1 connection; dropping the stream abandons it.
async fn long_computation(addr: SocketAddr) -> TcpStream {
    let mut stream = connect_from(ATTACKER, addr).await;
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"GET /?iters=100000000000 HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    stream
}

#[tokio::test]
async fn one_clients_long_computations_yield_their_places_to_another() {
    // Two running places, both taken by the attacker's computations, which
    // outlast the queue timeout many times over. At the end of a time
    // slice one yields its place to the bystander, whose requests would
    // otherwise wait 2 s in the queue and get `503`.
    let _heavy = HEAVY.lock().await;
    let server = Server::start(&[
        guests::CPU_P3.path,
        "--max-running",
        "2",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let (addr, admin) = (server.addr, server.admin_addr().await);
    let held = vec![long_computation(addr).await, long_computation(addr).await];
    let running = "wasmhive_instances_running";
    wait_until_metric(admin, running, |n| n >= 2.0, Duration::from_secs(20)).await;

    let seen = bystanders(addr, "GET", "/?iters=1000", 4).await;
    assert!(seen.iter().all(|s| s == &Ok(200)), "{seen:?}");
    let yielded = "wasmhive_time_slices_yielded_total";
    wait_until_metric(admin, yielded, |n| n >= 1.0, Duration::from_secs(10)).await;
    // The attacker's computations had their places back.
    wait_until_metric(admin, running, |n| n >= 2.0, Duration::from_secs(10)).await;
    drop(held);
    server.finish().await;
}
