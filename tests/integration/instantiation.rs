//! Instantiation failures: retried with backoff, handed back with the
//! request, and a circuit that opens after repeated failures.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;

use wasmhive::{App, Error, HandlerState, Instance, PoolLimits, ProxyHandler};
use wasmhive_tests::{app, get, guests, read_body};

/// An [`App`] whose first `failures` instantiations fail.
struct Flaky {
    app: App,
    failures: AtomicU32,
    attempts: Arc<AtomicU32>,
}

impl HandlerState for Flaky {
    type StoreData = <App as HandlerState>::StoreData;
    type WorkerExpiration = <App as HandlerState>::WorkerExpiration;
    type WorkerState = <App as HandlerState>::WorkerState;

    async fn instantiate(&self, incarnation: u64) -> wasmtime::Result<Instance<Self>> {
        self.attempts.fetch_add(1, Relaxed);
        if self
            .failures
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            wasmtime::bail!("simulated transient failure");
        }
        let instance = self.app.instantiate(incarnation).await?;
        Ok(instance.for_policy(|state| state))
    }
}

fn flaky(failures: u32, limits: PoolLimits) -> (ProxyHandler<Flaky>, Arc<AtomicU32>) {
    let attempts = Arc::new(AtomicU32::new(0));
    let state = Flaky {
        app: app(guests::HELLO_P3, |_| {}),
        failures: AtomicU32::new(failures),
        attempts: attempts.clone(),
    };
    (ProxyHandler::new(state, limits), attempts)
}

#[tokio::test]
async fn transient_failures_are_retried_and_the_request_succeeds() {
    let (handler, attempts) = flaky(
        2,
        PoolLimits {
            instantiation_retries: 2,
            retry_backoff: Duration::from_millis(1),
            ..PoolLimits::default()
        },
    );
    let response = handler
        .handle(1, get("/"))
        .await
        .expect("third attempt works");
    assert_eq!(read_body(response).await, "Hello, wasmhive!\n");
    assert_eq!(attempts.load(Relaxed), 3);
    assert_eq!(handler.stats().instantiation_failures, 2);
}

#[tokio::test]
async fn exhausted_retries_hand_the_request_back_and_the_circuit_opens() {
    let (handler, attempts) = flaky(
        u32::MAX,
        PoolLimits {
            instantiation_retries: 1,
            retry_backoff: Duration::from_millis(1),
            circuit_failures: 4,
            circuit_cooldown: Duration::from_secs(60),
            ..PoolLimits::default()
        },
    );
    let request = get("/given-back");
    let Err(Error::Instantiation(error)) = handler.handle(1, request).await else {
        panic!("expected an instantiation error");
    };
    assert!(!error.is_circuit_open());
    assert!(
        error.to_string().contains("simulated transient failure"),
        "{error}"
    );
    let back = error.take_request().expect("the request is handed back");
    assert_eq!(back.uri().path(), "/given-back");
    assert_eq!(attempts.load(Relaxed), 2);

    // Two more failed attempts reach the budget of four: the circuit opens.
    let Err(Error::Instantiation(second)) = handler.handle(2, get("/")).await else {
        panic!("expected an instantiation error");
    };
    assert!(!second.is_circuit_open());
    assert_eq!(attempts.load(Relaxed), 4);

    // Now requests fail fast without trying to instantiate.
    let Err(Error::Instantiation(fast)) = handler.handle(3, get("/")).await else {
        panic!("expected an instantiation error");
    };
    assert!(fast.is_circuit_open());
    assert_eq!(
        attempts.load(Relaxed),
        4,
        "no attempt while the circuit is open"
    );
    assert!(fast.take_request().is_some());
}

#[tokio::test(start_paused = true)]
async fn failing_prewarm_backs_off_under_the_circuit_instead_of_spinning() {
    let limits = PoolLimits {
        prewarm: 2,
        circuit_failures: 5,
        circuit_window: Duration::from_secs(10),
        circuit_cooldown: Duration::from_secs(5),
        ..PoolLimits::default()
    };
    let (handler, attempts) = flaky(u32::MAX, limits);
    // A minute of (paused, auto-advancing) time with nothing else to do.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let attempts = attempts.load(Relaxed);
    // Up to the opening: the circuit's 5, plus the retries of the (at most
    // max_running) workers in flight. Then one probe per worker per
    // cool-down, 12 cool-downs in a minute.
    let running = PoolLimits::default().max_running as u32;
    let bound = 5 + 2 * running + 13 * running;
    assert!(
        (5..=bound).contains(&attempts),
        "{attempts} instantiation attempts in a minute (bound {bound})"
    );
    assert_eq!(handler.stats().instantiations, 0);
}
