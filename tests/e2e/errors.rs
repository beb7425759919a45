//! Typed errors from the core become statuses; the server stays up.

use std::time::{Duration, Instant};

use wasmhive_tests::guests;

use crate::{Server, get};

#[tokio::test]
async fn overload_is_shed_with_503_and_retry_after() {
    let server = Server::start(&[
        guests::SLEEP_P3.path,
        "--max-instances",
        "1",
        "--max-concurrent-per-instance",
        "1",
        "--queue-len",
        "1",
        // The pool's queue, not the client's share, is under test.
        "--max-requests-per-client",
        "10",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let (addr, admin) = (server.addr, server.admin_addr().await);
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { get(addr, "/?ms=1500").await }))
        .collect();
    // One runs, one waits in the queue, which is then full.
    crate::wait_for_metric(
        admin,
        "wasmhive_requests_queued",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let started = Instant::now();
    let (status, headers, body) = get(addr, "/?ms=1").await;
    assert_eq!(status, 503, "{body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "shed at once, not after the queue wait"
    );
    for request in slow {
        let (status, _, body) = request.await.unwrap();
        assert_eq!((status, body.as_str()), (200, "slept 1500 ms\n"));
    }
}

#[tokio::test]
async fn spinning_guest_gets_504_and_the_server_keeps_serving() {
    let server = Server::start(&[guests::FAULT_P3.path, "--request-timeout", "300ms"]);
    let started = Instant::now();
    let (status, _, _) = get(server.addr, "/spin").await;
    assert_eq!(status, 504);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(get(server.addr, "/").await.0, 200);
}

#[tokio::test]
async fn trapping_guest_gets_500_with_a_short_body() {
    let server = Server::start(&[guests::FAULT_P2.path]);
    for path in ["/trap", "/panic"] {
        let (status, _, body) = get(server.addr, path).await;
        assert_eq!(status, 500, "{path}");
        assert!(body.len() < 500 && !body.contains("backtrace"), "{body}");
    }
    let (status, _, body) = get(server.addr, "/").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

#[tokio::test]
async fn guest_output_is_labelled_unless_told_not_to() {
    let server = Server::start(&[guests::FAULT_P3.path]);
    assert_eq!(get(server.addr, "/panic").await.0, 500);
    let line = server
        .wait_for_line(
            "the fault guest panicked on purpose",
            Duration::from_secs(10),
        )
        .await
        .expect("guest stderr forwarded");
    assert!(line.starts_with("[stderr instance="), "{line}");
    assert!(line.contains("request=0]"), "{line}");

    let bare = Server::start(&[guests::FAULT_P3.path, "--no-logging-prefix"]);
    assert_eq!(get(bare.addr, "/panic").await.0, 500);
    let line = bare
        .wait_for_line(
            "the fault guest panicked on purpose",
            Duration::from_secs(10),
        )
        .await
        .expect("guest stderr forwarded");
    assert!(!line.contains("[stderr instance="), "{line}");
    // Unprefixed, the guest's panic message cannot be told from the
    // server's: check the exit alone.
    let status = bare.stop_without_output_check().await;
    assert!(status.success(), "{status}");
    server.finish().await;
}

#[tokio::test]
async fn failing_prewarm_makes_a_bounded_number_of_attempts_and_log_lines() {
    // No instance fits a 64 KiB memory budget, and none is alive to free
    // any: every prewarm attempt fails and counts toward the circuit.
    let server = Server::start(&[
        guests::HELLO_P2.path,
        "--prewarm",
        "2",
        "--max-total-memory",
        "64KiB",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let admin = server.admin_addr().await;
    let opened = "instantiation circuit opened";
    server
        .wait_for_line(opened, Duration::from_secs(30))
        .await
        .expect("the circuit opens");
    // While it is open, a request needing an instance fails fast.
    let (status, headers, _) = get(server.addr, "/").await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    // After the 5 s cool-down one probe fails and the circuit opens again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.lines_containing(opened) < 2 {
        assert!(
            Instant::now() < deadline,
            "the circuit never re-opened:\n{}",
            server.stderr.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, _, metrics) = get(admin, "/metrics").await;
    let attempts = crate::metric(&metrics, "wasmhive_instantiation_failures_total");
    let output = server.finish().await;
    // 20 failures open the circuit; then one probe per cool-down (plus the
    // attempts under way when it opened, at most one per running worker).
    assert!(
        (20.0..=24.0).contains(&attempts),
        "{attempts} failed instantiations"
    );
    let warnings = output
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("instantiation"))
        .count();
    assert!(
        warnings <= 4,
        "{warnings} warnings about instantiation:\n{output}"
    );
}
