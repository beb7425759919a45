//! The fault matrix: every fault guest, p2 and p3, single-use and reused
//! instances. Each fault gets its documented answer within a bound, a
//! bystander hammering the same server meanwhile sees only `200 ok`, and the
//! live instances return to their resting level (none) afterwards.

use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmhive_tests::guests;

use crate::{Bystander, Server, try_call, wait_for_metric};

/// What a client sees from a fault.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// This status and a complete body.
    Status(u16),
    /// Never a clean end: the `200` head then a body cut off with an
    /// error, or, when the trap beats the head's flush, the connection
    /// closed with no answer at all.
    CutOff,
}

/// The faults of `guests/src/lib.rs` (`Fault`) and their answers, as
/// documented in the README's "Limits and guarantees".
const FAULTS: &[(&str, Answer)] = &[
    ("/trap", Answer::Status(500)),
    ("/panic", Answer::Status(500)),
    ("/oom", Answer::Status(500)),
    ("/stack-overflow", Answer::Status(500)),
    ("/spin", Answer::Status(504)),
    ("/hang", Answer::Status(504)),
    ("/trap-after-headers", Answer::CutOff),
];

async fn matrix(guest: guests::Guest, reuse: &str) {
    let server = Server::start(&[
        guest.path,
        "--admin-addr",
        "127.0.0.1:0",
        "--max-reuse",
        reuse,
        // A fault kills every request in flight on its instance; with one
        // request per instance at a time, only its own.
        "--max-concurrent-per-instance",
        "1",
        "--request-timeout",
        "500ms",
        "--max-memory",
        "64MiB",
    ]);
    let admin = server.admin_addr().await;
    let bystander = Bystander::start(server.addr, "/", 2);

    let faults = FAULTS.iter().map(|&(path, expected)| {
        let addr = server.addr;
        tokio::spawn(async move {
            let started = Instant::now();
            let seen = try_call(addr, "GET", path, Bytes::new()).await;
            let elapsed = started.elapsed();
            assert!(elapsed < Duration::from_secs(10), "{path} took {elapsed:?}");
            match (expected, seen) {
                (Answer::Status(status), Ok((seen, _, Ok(body)))) => {
                    assert_eq!(seen, status, "{path}: {body:?}");
                    assert!(body.len() < 200, "{path}: short body, got {body:?}");
                }
                (Answer::CutOff, Ok((200, _, Err(_))) | Err(_)) => {}
                (expected, seen) => panic!("{path}: expected {expected:?}, got {seen:?}"),
            }
        })
    });
    for fault in futures::future::join_all(faults).await {
        fault.unwrap();
    }
    // Once more in sequence: a reused instance must not carry a fault over.
    for &(path, _) in FAULTS.iter().take(3) {
        let (status, _, _) = try_call(server.addr, "GET", path, Bytes::new())
            .await
            .unwrap();
        assert_eq!(status, 500, "{path}");
    }

    let seen = bystander.stop().await;
    assert!(seen.len() > 10, "the bystander got through: {}", seen.len());
    let hurt: Vec<_> = seen.iter().filter(|s| **s != Ok(200)).collect();
    assert!(hurt.is_empty(), "the bystander saw {hurt:?}");

    // A hanging task outlives its request by at most the post-return
    // timeout (10 s); then every instance is gone.
    // No instance left behind.
    wait_for_metric(
        admin,
        "wasmhive_instances_live",
        0.0,
        Duration::from_secs(30),
    )
    .await;
    let (status, _, body) = try_call(server.addr, "GET", "/", Bytes::new())
        .await
        .unwrap();
    assert_eq!((status, body.unwrap()), (200, Bytes::from_static(b"ok\n")));
}

#[tokio::test]
async fn p2_single_use() {
    matrix(guests::FAULT_P2, "1").await;
}

#[tokio::test]
async fn p2_reused() {
    matrix(guests::FAULT_P2, "4").await;
}

#[tokio::test]
async fn p3_single_use() {
    matrix(guests::FAULT_P3, "1").await;
}

#[tokio::test]
async fn p3_reused() {
    matrix(guests::FAULT_P3, "4").await;
}

/// A guest that sends its head and part of its body, then waits forever:
/// its stream stays open while the client holds it (past the request
/// timeout: the body is not bounded by it), and once the client lets go
/// the instance is killed at the post-return timeout.
async fn stalled_body_ends_with_its_client(guest: guests::Guest) {
    use http_body_util::BodyExt as _;
    let server = Server::start(&[
        guest.path,
        "--admin-addr",
        "127.0.0.1:0",
        "--request-timeout",
        "300ms",
        "--post-return-timeout",
        "300ms",
    ]);
    let admin = server.admin_addr().await;
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get("/hang-after-headers")
        .header("host", "wasmhive.test")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, Bytes::from_static(b"partial body, then a fault"));
    // Well past the request timeout, the stream is still open: no end, no
    // error.
    let next = tokio::time::timeout(Duration::from_secs(1), body.frame()).await;
    assert!(next.is_err(), "the stream ended: {next:?}");
    wait_for_metric(
        admin,
        "wasmhive_instances_live",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    // The client lets go: the instance is left with leftover work only.
    drop((body, sender));
    connection.abort();
    wait_for_metric(
        admin,
        "wasmhive_instances_live",
        0.0,
        Duration::from_secs(10),
    )
    .await;
    let (status, _, body) = try_call(server.addr, "GET", "/", Bytes::new())
        .await
        .unwrap();
    assert_eq!((status, body.unwrap()), (200, Bytes::from_static(b"ok\n")));
    server.finish().await;
}

#[tokio::test]
async fn p2_stalled_body_ends_with_its_client() {
    stalled_body_ends_with_its_client(guests::FAULT_P2).await;
}

#[tokio::test]
async fn p3_stalled_body_ends_with_its_client() {
    stalled_body_ends_with_its_client(guests::FAULT_P3).await;
}
