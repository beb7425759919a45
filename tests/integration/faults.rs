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
            // One prefix, not wasmtime's and ours stacked.
            let message = format!("{trap:#}");
            assert!(message.matches("wasm trap").count() <= 1, "{message}");
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

/// An [`App`](wasmhive::App) whose workers' policy panics when a request
/// has the path `/policy-panic`, and counts the stores it disposes of.
struct PanickyPolicy {
    app: wasmhive::App,
    drops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

struct PanickyWorker {
    inner: wasmhive::AppWorker,
    drops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl wasmhive::WorkerState for PanickyWorker {
    type StoreData = wasmhive::Host;
    type RequestData = u64;

    fn should_accept_request(&self, concurrent: usize, total: usize) -> wasmhive::ShouldAccept {
        self.inner.should_accept_request(concurrent, total)
    }

    fn on_request_start(
        &self,
        store: wasmtime::StoreContextMut<'_, wasmhive::Host>,
        request_id: u64,
        task: wasmtime::component::GuestTaskId,
    ) -> wasmhive::RequestDeadline {
        assert_ne!(request_id, 666, "the policy panicked on purpose");
        self.inner.on_request_start(store, request_id, task)
    }

    fn drop(&self, store: wasmtime::Store<wasmhive::Host>, exit: &mut wasmhive::InstanceReport) {
        self.drops.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.drop(store, exit);
    }
}

impl wasmhive::HandlerState for PanickyPolicy {
    type StoreData = wasmhive::Host;
    type WorkerExpiration = wasmhive::LimitsExpiration;
    type WorkerState = PanickyWorker;

    async fn instantiate(&self, incarnation: u64) -> wasmtime::Result<wasmhive::Instance<Self>> {
        let instance = self.app.instantiate(incarnation).await?;
        Ok(instance.for_policy(|inner| PanickyWorker {
            inner,
            drops: self.drops.clone(),
        }))
    }
}

#[tokio::test]
async fn worker_state_drop_runs_for_every_store_even_when_the_policy_panics() {
    let drops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let policy = PanickyPolicy {
        app: wasmhive_tests::app(guests::HELLO_P2, |_| {}),
        drops: drops.clone(),
    };
    let handler = wasmhive::ProxyHandler::new(policy, PoolLimits::default());
    let result = handler.handle(666, get("/")).await;
    assert!(
        matches!(result, Err(Error::TrapOrPanic(_))),
        "the request fails as the worker's failure: {result:?}"
    );
    // Fresh instances (p2): one store per request, each disposed of.
    for id in 1..=3 {
        let ok = handler.handle(id, get("/")).await.expect("still serving");
        assert_eq!(read_body(ok).await, "Hello, wasmhive!\n");
    }
    handler.shutdown();
    handler.drained().await;
    assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 4);
}
