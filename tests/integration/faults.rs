//! Guests that trap, panic or run out of memory get typed errors, and the
//! handler keeps serving.

use wasmhive::{Error, ExitReason, PoolLimits};
use wasmhive_tests::{get, guests, handler, read_body};

#[tokio::test]
async fn trap_panic_and_oom_fail_with_trap_errors_and_serving_continues() {
    for guest in [guests::FAULT_P2, guests::FAULT_P3] {
        let (handler, reports) = handler(guest, |l| l.max_memory = 64 << 20, PoolLimits::default());
        for path in ["/trap", "/panic", "/oom", "/stack-overflow"] {
            let result = handler.handle(1, get(path)).await;
            let Err(Error::TrapOrPanic(trap)) = &result else {
                panic!(
                    "{} {path}: expected TrapOrPanicError, got {result:?}",
                    guest.name
                );
            };
            assert!(!trap.reason().is_empty());
            let ok = handler.handle(2, get("/")).await.expect("still serving");
            assert_eq!(read_body(ok).await, "ok\n", "{} after {path}", guest.name);
        }
        let oom = reports
            .wait_for_instance(|r| {
                r.reason == ExitReason::Trapped
                    && r.error
                        .as_deref()
                        .is_some_and(|e| e.contains("memory limit"))
            })
            .await;
        let peak = oom.peak_memory.expect("peak memory reported");
        assert!(peak <= 64 << 20, "{} peak {peak} over the cap", guest.name);
        assert!(
            peak > 32 << 20,
            "{} peak {peak}: the guest did grow",
            guest.name
        );
    }
}

#[tokio::test]
async fn trap_after_headers_aborts_the_body() {
    for guest in [guests::FAULT_P2, guests::FAULT_P3] {
        let (handler, reports) = handler(guest, |_| {}, PoolLimits::default());
        let response = handler
            .handle(1, get("/trap-after-headers"))
            .await
            .unwrap_or_else(|e| panic!("{}: headers were sent before the trap: {e}", guest.name));
        assert_eq!(response.status(), 200);
        let body = http_body_util::BodyExt::collect(response.into_body()).await;
        assert!(
            body.is_err(),
            "{}: the body must end in an error, not cleanly",
            guest.name
        );
        reports
            .wait_for_instance(|r| r.reason == ExitReason::Trapped)
            .await;
        let ok = handler.handle(2, get("/")).await.expect("still serving");
        assert_eq!(ok.status(), 200);
    }
}
