//! One client cannot pin every instance: the three HTTP/2 pinning patterns
//! (responses held by a zero flow-control window, request bodies that
//! never come, streams reset just after they started) each leave at least
//! half of the instance capacity to another client, which gets `200`s
//! meanwhile.
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

/// Waits until the attacker's surplus is being refused: it holds its whole
/// share.
async fn attacker_holds_its_share(server: &Server) {
    let refused = wait_until_metric(
        server.admin_addr().await,
        "wasmhive_client_share_refused_total{what=\"request\"}",
        |n| n >= 1.0,
        Duration::from_secs(20),
    )
    .await;
    assert!(refused >= 1.0, "the attacker never reached its share");
}

#[tokio::test]
async fn zero_window_streams_leave_half_the_instances_to_others() {
    let _heavy = HEAVY.lock().await;
    // 4 instances x 16 requests: 64 places, 32 per client.
    let server = Server::start(&[
        guests::SLEEP_P3.path,
        "--max-instances",
        "4",
        "--queue-timeout",
        "500ms",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let addr = server.addr;
    // 4 connections x 64 streams whose responses can never be sent.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut sender = h2_from(ATTACKER, addr, 0).await;
        for _ in 0..64 {
            sender = sender.ready().await.unwrap();
            let (response, _) = sender
                .send_request(h2_request("GET", addr, "/?ms=1"), true)
                .unwrap();
            held.push(response);
        }
    }
    attacker_holds_its_share(&server).await;

    let seen = bystanders(addr, "GET", "/?ms=200", 32).await;
    assert!(seen.iter().all(|s| s == &Ok(200)), "{seen:?}");
    drop(held);
    server.finish().await;
}

#[tokio::test]
async fn request_bodies_that_never_come_leave_half_the_instances_to_others() {
    let _heavy = HEAVY.lock().await;
    // p2: one request per instance, 8 places, 4 per client.
    let server = Server::start(&[
        guests::ECHO_P2.path,
        "--max-instances",
        "8",
        "--queue-timeout",
        "500ms",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let addr = server.addr;
    // 2 connections x 64 POSTs whose bodies never arrive.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut sender = h2_from(ATTACKER, addr, 65_535).await;
        for _ in 0..64 {
            sender = sender.ready().await.unwrap();
            held.push(
                sender
                    .send_request(h2_request("POST", addr, "/"), false)
                    .unwrap(),
            );
        }
    }
    attacker_holds_its_share(&server).await;

    let seen = bystanders(addr, "POST", "/", 4).await;
    assert!(seen.iter().all(|s| s == &Ok(200)), "{seen:?}");
    drop(held);
    server.finish().await;
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
    let closed = wait_until_metric(
        server.admin_addr().await,
        "wasmhive_connections_closed_for_resets_total",
        |n| n >= 1.0,
        Duration::from_secs(20),
    )
    .await;
    assert!(closed >= 1.0, "no connection was closed for its resets");

    let seen = bystanders(addr, "GET", "/?ms=200", 32).await;
    stop.store(true, Relaxed);
    assert!(
        attacker.await.unwrap() >= 2,
        "the attacker was never cut off"
    );
    assert!(seen.iter().all(|s| s == &Ok(200)), "{seen:?}");
    // The abandoned guest tasks did not keep their instances.
    let abandoned = wait_until_metric(
        server.admin_addr().await,
        "wasmhive_instance_exits_total{reason=\"abandoned\"}",
        |n| n >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    assert!(abandoned >= 1.0);
    server.finish().await;
}
