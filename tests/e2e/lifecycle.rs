//! The admin endpoint and graceful shutdown.

use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmhive_tests::guests;

use crate::{Server, get, metric, try_call};

#[tokio::test]
async fn metrics_move_and_health_endpoints_answer() {
    let server = Server::start(&[guests::HELLO_P2.path, "--admin-addr", "127.0.0.1:0"]);
    let admin = server.admin_addr().await;
    assert_eq!(get(admin, "/healthz").await.0, 200);
    assert_eq!(get(admin, "/readyz").await.0, 200);
    for _ in 0..3 {
        assert_eq!(get(server.addr, "/").await.0, 200);
    }
    let (status, headers, text) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(
        metric(&text, "wasmhive_http_requests_total{status=\"200\"}"),
        3.0
    );
    // p2 with the defaults: a fresh instance per request.
    assert_eq!(metric(&text, "wasmhive_instantiations_total"), 3.0);
    assert!(text.contains("wasmhive_http_request_duration_seconds_bucket"));
    assert!(text.contains("wasmhive_queue_wait_seconds_bucket"));
    assert_eq!(get(server.addr, "/").await.0, 200);
    let (_, _, text) = get(admin, "/metrics").await;
    assert_eq!(
        metric(&text, "wasmhive_http_requests_total{status=\"200\"}"),
        4.0
    );
    assert_eq!(get(admin, "/nope").await.0, 404);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let mut server = Server::start(&[
        guests::SLEEP_P3.path,
        "--admin-addr",
        "127.0.0.1:0",
        "--drain-timeout",
        "20s",
    ]);
    let admin = server.admin_addr().await;
    let addr = server.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/?ms=1500").await });
    // The request has reached its guest.
    crate::wait_for_metric(
        admin,
        "wasmhive_requests_started_total",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    server.signal("TERM");
    server
        .wait_for_line("draining", Duration::from_secs(10))
        .await
        .expect("drain announced");
    // Not ready while draining; new connections are no longer accepted.
    assert_eq!(get(admin, "/readyz").await.0, 503);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "slept 1500 ms\n"));
    let exit = server.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}

#[tokio::test]
async fn sigterm_under_load_completes_in_flight_requests() {
    let mut server = Server::start(&[guests::SLEEP_P3.path, "--drain-timeout", "10s"]);
    let addr = server.addr;
    let epoch = Instant::now();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let answered = answered.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let sent = epoch.elapsed();
                    let answer = try_call(addr, "GET", "/?ms=200", Bytes::new()).await;
                    let refused = answer.is_err();
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    seen.push((sent, answer));
                    if refused {
                        return seen;
                    }
                }
            })
        })
        .collect();
    // Under load: every client has had two answers, on average.
    let loaded = tokio::time::timeout(Duration::from_secs(30), async {
        while answered.load(std::sync::atomic::Ordering::Relaxed) < 32 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    loaded.await.expect("32 answers within 30 s");
    let signalled = epoch.elapsed();
    server.signal("TERM");
    let exit = server.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(exit.code(), Some(0), "{exit:?}");

    let (mut completed, mut refused) = (0, 0);
    for client in clients {
        for (sent, answer) in client.await.unwrap() {
            match answer {
                Ok((200, _, Ok(body))) => {
                    assert_eq!(body, Bytes::from_static(b"slept 200 ms\n"));
                    completed += 1;
                }
                // Sent as the server stopped listening: refused, or 503.
                Ok((503, headers, _)) if sent + SLACK >= signalled => {
                    assert!(headers.contains_key("retry-after"));
                    refused += 1;
                }
                Err(_) if sent + SLACK >= signalled => refused += 1,
                other => panic!("sent {sent:?}, signal at {signalled:?}: {other:?}"),
            }
        }
    }
    assert!(
        completed >= 16 && refused >= 16,
        "{completed} completed, {refused} refused"
    );
}

/// Requests sent this shortly before the signal may still be in the
/// listener's backlog when it closes.
const SLACK: Duration = Duration::from_millis(50);

/// Two servers started with `--reuse-port` share one port: the kernel
/// spreads connections over both, and when one drains and exits the other
/// serves everything. Without the flag, a second server cannot listen there.
#[tokio::test]
async fn servers_with_reuse_port_share_a_port_and_take_over_from_each_other() {
    let flags = [
        guests::HELLO_P2.path,
        "--reuse-port",
        "--admin-addr",
        "127.0.0.1:0",
    ];
    let first = Server::start_at("127.0.0.1:0", &flags, std::process::Stdio::null());
    let port = first.addr.to_string();
    let second = Server::start_at(&port, &flags, std::process::Stdio::null());
    assert_eq!(second.addr, first.addr);
    let admins = [first.admin_addr().await, second.admin_addr().await];
    let served = |text: &str| metric(text, "wasmhive_http_requests_total{status=\"200\"}");
    let mut both = false;
    for _ in 0..200 {
        assert_eq!(get(first.addr, "/").await.0, 200);
        let (_, _, one) = get(admins[0], "/metrics").await;
        let (_, _, other) = get(admins[1], "/metrics").await;
        if served(&one) > 0.0 && served(&other) > 0.0 {
            both = true;
            break;
        }
    }
    assert!(both, "200 connections all went to one server");

    let (code, output) = crate::run(&["serve", "--addr", &port, guests::HELLO_P2.path]);
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("cannot listen on"), "{output}");

    let addr = first.addr;
    first.finish().await;
    for _ in 0..20 {
        assert_eq!(get(addr, "/").await.0, 200);
    }
    second.finish().await;
}
