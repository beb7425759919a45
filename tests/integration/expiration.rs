//! Two-level expiration: a guest that spins on the CPU or hangs is cut off
//! at its deadline, and other requests are served meanwhile.

use std::time::Duration;

use wasmhive::{Error, ExitReason, PoolLimits};
use wasmhive_tests::{get, guests, handler, read_body};

/// Runs `path` (a fault that never responds) next to a normal request.
/// A `cpu_bound` fault keeps its instance from advertising, so the normal
/// request must be served by another instance; a guest blocked on I/O may
/// share its instance with it.
async fn expires_while_a_bystander_is_served(
    guest: wasmhive_guests::Guest,
    path: &str,
    cpu_bound: bool,
) {
    let (handler, reports) = handler(
        guest,
        |l| {
            l.request_timeout = Duration::from_millis(200);
            // Far beyond the test's bounds: an instance whose request
            // expired ends, the stuck task with it, as soon as nothing else
            // it holds is wanted, not at this deadline.
            l.post_return_timeout = Duration::from_secs(600);
        },
        PoolLimits::default(),
    );
    let stuck = tokio::spawn({
        let handler = handler.clone();
        let path = path.to_string();
        async move { handler.handle(1, get(&path)).await }
    });
    // Once it has reached its guest, a normal request on the same handler
    // gets its answer meanwhile.
    wasmhive_tests::wait_for_stats(&handler, |s| s.requests_started >= 1).await;
    let bystander = tokio::time::timeout(Duration::from_secs(5), handler.handle(2, get("/")))
        .await
        .unwrap_or_else(|_| panic!("{} {path}: bystander starved", guest.name))
        .expect("bystander succeeds");
    assert_eq!(read_body(bystander).await, "ok\n");

    let result = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .unwrap_or_else(|_| panic!("{} {path}: not cut off within 5 s", guest.name))
        .unwrap();
    assert!(
        matches!(result, Err(Error::Expired(_))),
        "{} {path}: expected ExpirationError, got {result:?}",
        guest.name
    );
    let expired = reports
        .wait_for_instance(|r| r.reason == ExitReason::Expired)
        .await;
    let bystander_instance = reports.requests().iter().find_map(|r| {
        matches!(r.outcome, wasmhive::Outcome::Responded(200)).then_some(r.incarnation)
    });
    if cpu_bound {
        assert_eq!(expired.requests_served, 1);
        assert_ne!(bystander_instance, Some(Some(expired.incarnation)));
    }
    // And the handler keeps serving.
    let after = handler
        .handle(3, get("/"))
        .await
        .expect("served after expiry");
    assert_eq!(after.status(), 200);
}

#[tokio::test]
async fn spinning_p3_guest_is_cut_off() {
    expires_while_a_bystander_is_served(guests::FAULT_P3, "/spin", true).await;
}

#[tokio::test]
async fn spinning_p2_guest_is_cut_off() {
    expires_while_a_bystander_is_served(guests::FAULT_P2, "/spin", true).await;
}

#[tokio::test]
async fn hanging_p3_guest_is_cut_off() {
    expires_while_a_bystander_is_served(guests::FAULT_P3, "/hang", false).await;
}

#[tokio::test]
async fn hanging_p2_guest_is_cut_off() {
    expires_while_a_bystander_is_served(guests::FAULT_P2, "/hang", true).await;
}

#[tokio::test]
async fn idle_instance_is_dropped_after_idle_timeout() {
    let (handler, reports) = handler(
        guests::HELLO_P3,
        |l| l.idle_timeout = Duration::from_millis(100),
        PoolLimits::default(),
    );
    handler.handle(1, get("/")).await.expect("hello");
    let idle = reports
        .wait_for_instance(|r| r.reason == ExitReason::Idle)
        .await;
    assert_eq!(idle.requests_served, 1);
    assert_eq!(handler.stats().live_instances, 0);
}
