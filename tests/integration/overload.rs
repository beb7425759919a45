//! Bounded dispatch: the surplus beyond instances and queue fails fast with
//! `Overloaded`; admitted requests succeed.

use std::time::Duration;

use futures::future::join_all;
use wasmhive::{Error, PoolLimits};
use wasmhive_tests::{get, guests, handler, read_body};

#[tokio::test]
async fn surplus_fails_fast_and_admitted_requests_succeed() {
    let (handler, _) = handler(
        guests::SLEEP_P3,
        |l| l.max_concurrency = 1,
        PoolLimits {
            max_instances: 2,
            max_queue_len: 4,
            max_queue_wait: Duration::from_secs(10),
            ..PoolLimits::default()
        },
    );
    let finished = std::sync::Mutex::new(Vec::new());
    let results = join_all((0..20).map(|i| {
        let (handler, finished) = (&handler, &finished);
        async move {
            let result = handler.handle(i, get("/?ms=300")).await;
            finished.lock().unwrap().push(result.is_ok());
            // Read the body at once, as a server would: until it is read
            // the request holds its instance.
            match result {
                Ok(response) => Ok(read_body(response).await),
                Err(error) => Err(error),
            }
        }
    }))
    .await;
    let mut served = 0;
    let mut overloaded = 0;
    for result in results {
        match result {
            Ok(body) => {
                assert_eq!(body, "slept 300 ms\n");
                served += 1;
            }
            Err(Error::Overloaded(o)) => {
                assert!(o.retry_after() >= Duration::from_secs(1));
                overloaded += 1;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        (served, overloaded),
        (6, 14),
        "2 running + 4 queued admitted"
    );
    // Fail fast: every rejection came back before the first success.
    let order = finished.into_inner().unwrap();
    assert!(
        order[..14].iter().all(|ok| !ok),
        "rejections were not first: {order:?}"
    );
    assert_eq!(handler.stats().overloaded, 14);
}

#[tokio::test]
async fn queued_request_gives_up_after_max_queue_wait() {
    let (handler, reports) = handler(
        guests::SLEEP_P3,
        |l| l.max_concurrency = 1,
        PoolLimits {
            max_instances: 1,
            max_queue_len: 4,
            max_queue_wait: Duration::from_millis(100),
            ..PoolLimits::default()
        },
    );
    let busy = tokio::spawn({
        let handler = handler.clone();
        async move { handler.handle(1, get("/?ms=1000")).await }
    });
    wasmhive_tests::wait_for_stats(&handler, |s| s.requests_started >= 1).await;
    let waited = handler.handle(2, get("/?ms=1")).await;
    assert!(matches!(waited, Err(Error::Overloaded(_))), "{waited:?}");
    assert_eq!(handler.stats().queued_requests, 0);
    assert!(busy.await.unwrap().is_ok());
    let rejected = reports
        .requests()
        .into_iter()
        .find(|r| r.outcome == wasmhive::Outcome::Overloaded)
        .expect("reported");
    assert!(rejected.incarnation.is_none(), "never reached a guest");
}
