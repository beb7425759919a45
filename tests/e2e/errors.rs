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
    ]);
    let addr = server.addr;
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { get(addr, "/?ms=1500").await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
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
        .expect("guest stderr forwarded");
    assert!(!line.contains("[stderr instance="), "{line}");
}
