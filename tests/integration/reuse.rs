//! Instance reuse and concurrency limits.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use wasmhive::{ExitReason, PoolLimits};
use wasmhive_tests::{get, guests, handler, pending, read_body};

async fn counts(handler: &wasmhive::ProxyHandler<wasmhive::App>, n: usize) -> Vec<String> {
    let mut counts = Vec::new();
    for _ in 0..n {
        let response = handler.handle(1, get("/")).await.expect("counter responds");
        counts.push(String::from_utf8(read_body(response).await.to_vec()).unwrap());
    }
    counts
}

#[tokio::test]
async fn p2_defaults_give_every_request_a_fresh_instance() {
    let (handler, reports) = handler(guests::COUNTER_P2, |_| {}, PoolLimits::default());
    assert_eq!(counts(&handler, 6).await, ["1"; 6]);
    let incarnations: HashSet<_> = reports.requests().iter().map(|r| r.incarnation).collect();
    assert_eq!(incarnations.len(), 6, "each request on its own instance");
    reports
        .wait_for_instance(|r| r.reason == ExitReason::ReuseSpent)
        .await;
}

#[tokio::test]
async fn reuse_five_counts_to_five_then_restarts() {
    for guest in [guests::COUNTER_P2, guests::COUNTER_P3] {
        let (handler, reports) = handler(guest, |l| l.max_reuse = 5, PoolLimits::default());
        assert_eq!(
            counts(&handler, 12).await,
            ["1", "2", "3", "4", "5", "1", "2", "3", "4", "5", "1", "2"],
            "{}",
            guest.name
        );
        let spent = reports
            .wait_for_instance(|r| r.reason == ExitReason::ReuseSpent)
            .await;
        assert_eq!(spent.requests_served, 5);
    }
}

#[tokio::test]
async fn p3_concurrency_spreads_requests_over_instances_within_max() {
    let max_instances = 8;
    let (handler, reports) = handler(
        guests::SLEEP_P3,
        |l| l.max_concurrency = 16,
        PoolLimits {
            max_instances,
            ..PoolLimits::default()
        },
    );
    let watcher = {
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut most = 0;
            for _ in 0..200 {
                most = most.max(handler.stats().live_instances);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };
    let responses = join_all((0..64).map(|_| handler.handle(1, get("/?ms=300")))).await;
    for response in responses {
        let response = response.expect("every sleep request is served");
        assert_eq!(read_body(response).await, "slept 300 ms\n");
    }
    let used: HashSet<_> = reports
        .requests()
        .iter()
        .filter_map(|r| r.incarnation)
        .collect();
    assert!(
        used.len() >= 4,
        "64 requests at 16 per instance need >= 4 instances, used {}",
        used.len()
    );
    assert!(
        used.len() <= max_instances,
        "used {} instances, max {max_instances}",
        used.len()
    );
    assert!(watcher.await.unwrap() <= max_instances);
    let peak = reports
        .requests()
        .iter()
        .filter_map(|r| r.incarnation)
        .fold(std::collections::HashMap::new(), |mut m, i| {
            *m.entry(i).or_insert(0) += 1;
            m
        });
    assert!(
        peak.values().all(|&n| n <= 128),
        "reuse limit respected: {peak:?}"
    );
}

#[tokio::test]
async fn concurrency_limit_caps_requests_in_flight_per_instance() {
    let (handler, reports) = handler(
        guests::SLEEP_P3,
        |l| l.max_concurrency = 3,
        PoolLimits {
            max_instances: 2,
            ..PoolLimits::default()
        },
    );
    let bodies = join_all(
        (0..12)
            .map(|_| async { read_body(handler.handle(1, get("/?ms=200")).await.unwrap()).await }),
    )
    .await;
    assert!(bodies.iter().all(|b| b == "slept 200 ms\n"), "{bodies:?}");
    handler.shutdown();
    handler.drained().await;
    for instance in reports.instances() {
        assert!(instance.peak_concurrency <= 3, "{instance:?}");
    }
}

/// A p3 guest writes a response body after its call returned (a task): an
/// instance whose guest computes takes no next request until that body is
/// out, or the next request would hold the body back for its whole
/// computation.
#[tokio::test]
async fn a_computing_guest_sends_a_body_before_it_takes_the_next_request() {
    let (handler, _reports) = handler(
        guests::CPU_P3,
        |l| l.request_timeout = Duration::from_secs(600),
        PoolLimits {
            max_instances: 1,
            ..PoolLimits::default()
        },
    );
    // Some 20 ms of computing, then some 10 minutes queued behind it.
    let first = pending(&handler, 1, get("/?iters=20000000")).await;
    let second = pending(&handler, 2, get("/?iters=600000000000")).await;
    let body = tokio::time::timeout(Duration::from_secs(10), async {
        read_body(first.await.expect("the first request succeeds")).await
    })
    .await
    .expect("the first body arrives within 10 s, not after the second request");
    assert_eq!(body.len(), 17, "{body:?}");
    drop(second);
}
