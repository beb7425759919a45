//! A server's account of its requests: a request keeping a retired
//! instance alive hears so, and how many keep it, until it leaves.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use wasmhive::{Occupant, PoolLimits};
use wasmhive_tests::{get, guests, handler, pending, read_body};

/// Records what it is told.
#[derive(Default)]
struct Told {
    holders: Mutex<Vec<usize>>,
    changed: Notify,
}

impl Occupant for Told {
    fn keeps_retired(&self, holders: usize) {
        self.holders.lock().unwrap().push(holders);
        self.changed.notify_waiters();
    }
}

impl Told {
    fn seen(&self) -> Vec<usize> {
        self.holders.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until it has been told `expected`.
    async fn until(&self, expected: &[usize]) {
        let told = async {
            loop {
                let changed = self.changed.notified();
                if self.seen() == expected {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), told)
            .await
            .is_err()
        {
            panic!("told {:?}, not {expected:?}", self.seen());
        }
    }
}

/// `path` with `occupant` in its extensions.
fn occupying(path: &str, occupant: &Arc<Told>) -> wasmhive::Request {
    let mut request = get(path);
    request
        .extensions_mut()
        .insert(occupant.clone() as Arc<dyn Occupant>);
    request
}

#[tokio::test]
async fn requests_keeping_a_retired_instance_hear_how_many_keep_it() {
    // One instance that takes 3 requests in all: a kept one, a slower and a
    // quick one beside it.
    let (handler, _reports) = handler(
        guests::SLEEP_P3,
        |l| l.max_reuse = 3,
        PoolLimits {
            max_instances: 1,
            ..PoolLimits::default()
        },
    );
    let (kept, slower, quick) = (
        Arc::new(Told::default()),
        Arc::new(Told::default()),
        Arc::new(Told::default()),
    );
    let kept_call = pending(&handler, 1, occupying("/?ms=600000", &kept)).await;
    let slower_call = tokio::spawn({
        let (handler, request) = (handler.clone(), occupying("/?ms=300", &slower));
        async move { read_body(handler.handle(2, request).await.unwrap()).await }
    });
    wasmhive_tests::wait_for_stats(&handler, |s| s.requests_started >= 2).await;
    assert!(kept.seen().is_empty(), "not retired yet");

    // The third request retires the instance, which holds the three.
    let quick_call = handler.handle(3, occupying("/?ms=1", &quick));
    assert_eq!(read_body(quick_call.await.unwrap()).await, "slept 1 ms\n");
    assert_eq!(slower_call.await.unwrap(), "slept 300 ms\n");
    kept.until(&[3, 2, 1]).await;
    assert_eq!(slower.seen(), [3, 2], "told until it left");
    assert_eq!(quick.seen(), [3]);
    drop(kept_call);
}
