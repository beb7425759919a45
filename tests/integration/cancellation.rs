//! Dropping a queued request takes it out of the queue: it never reaches a
//! guest.

use std::time::Duration;

use wasmhive::{Outcome, PoolLimits};
use wasmhive_tests::{get, guests, handler, read_body};

#[tokio::test]
async fn dropped_queued_requests_never_reach_a_guest() {
    let (handler, reports) = handler(
        guests::COUNTER_P3,
        |l| l.max_concurrency = 1,
        PoolLimits {
            max_instances: 1,
            ..PoolLimits::default()
        },
    );
    // One instance, one request at a time: the first request starts it and
    // the next five queue behind it.
    let first = handler.handle(1, get("/"));
    let queued: Vec<_> = (0..5).map(|i| handler.handle(10 + i, get("/"))).collect();
    let mut first = Box::pin(first);
    let mut queued: Vec<_> = queued.into_iter().map(Box::pin).collect();
    // Poll everything once so that all are admitted: the first starts the
    // worker, the others queue (max_instances 1).
    futures::future::poll_immediate(&mut first).await;
    for q in &mut queued {
        assert!(futures::future::poll_immediate(q).await.is_none());
    }
    assert_eq!(handler.stats().queued_requests, 5);
    // Give up on three of the five queued requests.
    let kept: Vec<_> = queued.drain(..2).collect();
    drop(queued);
    assert_eq!(handler.stats().queued_requests, 2);

    let mut counts = vec![read_body(first.await.expect("first")).await];
    for q in kept {
        counts.push(read_body(q.await.expect("kept")).await);
    }
    // The instance saw exactly three requests, in order: the dropped ones
    // never ran.
    assert_eq!(counts, ["1", "2", "3"]);
    assert_eq!(handler.stats().requests_started, 3);
    let cancelled = reports
        .requests()
        .iter()
        .filter(|r| r.outcome == Outcome::Cancelled)
        .count();
    assert_eq!(cancelled, 3);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(handler.stats().queued_requests, 0);
}
