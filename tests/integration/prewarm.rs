//! Prewarm: instances ready ahead of demand, taken without paying
//! instantiation on the request path, and refilled.

use std::time::Duration;

use wasmhive::PoolLimits;
use wasmhive_tests::{get, guests, handler, read_body, wait_for_stats};

// Paused, auto-advancing time: waiting out the idle timeout takes no time.
#[tokio::test(start_paused = true)]
async fn prewarmed_instances_serve_without_instantiation_and_are_refilled() {
    let (handler, reports) = handler(
        guests::COUNTER_P2,
        |_| {},
        PoolLimits {
            prewarm: 2,
            ..PoolLimits::default()
        },
    );
    wait_for_stats(&handler, |s| s.available_instances == 2).await;
    // Prewarmed instances do not idle out: the idle timeout is 1 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(handler.stats().live_instances, 2, "none idled out");
    assert_eq!(handler.stats().available_instances, 2);

    for _ in 0..5 {
        let response = handler.handle(1, get("/")).await.expect("served");
        assert_eq!(
            read_body(response).await,
            "1",
            "reuse 1: a fresh instance each time"
        );
        wait_for_stats(&handler, |s| s.available_instances == 2).await;
    }
    let requests = reports.requests();
    assert_eq!(requests.len(), 5);
    assert!(
        requests.iter().all(|r| r.instantiation.is_none()),
        "no request waited for an instantiation: {requests:?}"
    );
    assert!(handler.stats().instantiations >= 7, "2 + 5 refills");
}
