//! A caller giving up: a queued request leaves the queue and never reaches
//! a guest; a running one is run out on its instance, which goes on serving
//! others and ends with it once nothing else is wanted.

use std::sync::Arc;
use std::time::Duration;

use wasmhive::{ExitReason, Outcome, PoolLimits};
use wasmhive_tests::{get, guests, handler, pending, read_body};

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
    wasmhive_tests::wait_for_stats(&handler, |s| s.queued_requests == 0).await;
}

/// A caller that goes away while the guest works on its request (a reset
/// stream, a closed connection) must not leave that guest task holding the
/// instance until the instance deadline: the instance finishes what others
/// still wait for, then ends, abandoned task and all.
#[tokio::test]
async fn an_abandoned_request_ends_with_its_instance_once_the_others_are_answered() {
    let (handler, reports, wanted) = abandoned_beside(get("/?ms=600000"), "/?ms=200").await;

    let answer = tokio::time::timeout(Duration::from_secs(10), wanted)
        .await
        .expect("the other request is answered within 10 s")
        .unwrap()
        .expect("the other request succeeds");
    assert_eq!(read_body(answer).await, "slept 200 ms\n");
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        reports.wait_for_instance(|r| r.reason == ExitReason::Abandoned),
    )
    .await
    .expect("the instance ends within 10 s, not at its 600 s deadline");
    assert_eq!(ended.requests_served, 2);
    // The pool slot is free again: a new request gets a new instance.
    let next = tokio::time::timeout(Duration::from_secs(10), handler.handle(3, get("/?ms=1")))
        .await
        .expect("answered within 10 s")
        .expect("succeeds");
    assert_eq!(read_body(next).await, "slept 1 ms\n");
}

/// A caller going away frees nothing its guest task still uses and retires
/// nothing another caller could use: the instance goes on taking requests
/// while the abandoned call runs out, and the abandoned request's extensions
/// (where a server keeps its client's place) live until the instance ends
/// with it.
#[tokio::test]
async fn an_abandoned_request_keeps_its_place_but_leaves_its_instance_to_others() {
    let place = Arc::new(());
    let mut request = get("/?ms=600000");
    request.extensions_mut().insert(place.clone());
    let (handler, reports, kept) = abandoned_beside(request, "/?ms=600000").await;

    // The one instance takes a third request while the other two run (it
    // used to retire when a caller went away, and the third waited for it).
    let third = tokio::time::timeout(Duration::from_secs(10), handler.handle(3, get("/?ms=1")))
        .await
        .expect("answered within 10 s")
        .expect("succeeds");
    assert_eq!(read_body(third).await, "slept 1 ms\n");
    assert_eq!(
        Arc::strong_count(&place),
        2,
        "the abandoned request holds its extensions while its guest task runs"
    );

    // With its last wanted request gone, the instance ends, orphans and all.
    kept.abort();
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        reports.wait_for_instance(|r| r.reason == ExitReason::Abandoned),
    )
    .await
    .expect("the instance ends within 10 s, not at its 600 s deadline");
    assert_eq!(ended.requests_served, 3);
    assert_eq!(Arc::strong_count(&place), 1, "dropped with the instance");
}

/// One p3 instance (its post-return deadline far beyond the tests' bounds:
/// it must not wait for that) running `abandoned` and `GET other` at once
/// (concurrency 16); then the caller of `abandoned` leaves. The other
/// request is left running.
async fn abandoned_beside(
    abandoned: wasmhive::Request,
    other: &str,
) -> (
    wasmhive::ProxyHandler<wasmhive::App>,
    wasmhive_tests::Reports,
    tokio::task::JoinHandle<Result<wasmhive::Response, wasmhive::Error>>,
) {
    let (handler, reports) = handler(
        guests::SLEEP_P3,
        |l| l.post_return_timeout = Duration::from_secs(600),
        PoolLimits {
            max_instances: 1,
            ..PoolLimits::default()
        },
    );
    let abandoned = pending(&handler, 1, abandoned).await;
    let other = tokio::spawn({
        let (handler, other) = (handler.clone(), get(other));
        async move { handler.handle(2, other).await }
    });
    wasmhive_tests::wait_for_stats(&handler, |s| s.requests_started >= 2).await;
    drop(abandoned);
    (handler, reports, other)
}

/// A guest computing keeps the event loop from looking at its calls; an
/// instance whose only request was abandoned while its guest spins still
/// ends at once, not at the request's deadline.
#[tokio::test]
async fn an_abandoned_request_ends_its_instance_while_the_guest_computes() {
    let (handler, reports) = handler(
        guests::FAULT_P3,
        |l| l.request_timeout = Duration::from_secs(600),
        PoolLimits::default(),
    );
    let spinning = pending(&handler, 1, get("/spin")).await;
    wasmhive_tests::wait_for_stats(&handler, |s| s.requests_started >= 1).await;
    drop(spinning);
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        reports.wait_for_instance(|r| r.reason == ExitReason::Abandoned),
    )
    .await
    .expect("the instance ends within 10 s, not at the 600 s deadline");
    assert_eq!(ended.requests_served, 1);
    wasmhive_tests::wait_for_stats(&handler, |s| s.live_instances == 0).await;
}
