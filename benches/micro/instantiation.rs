//! Micro-benchmarks of the request path, in-process with no socket:
//!
//! - `instantiate/{pooling,on-demand}/{hello-p2,hello-p3}`: create a store
//!   and instantiate the guest in it, the cost a request pays on its
//!   critical path when no instance is ready;
//! - `handle/{hello-p2,hello-p3}/{fresh,prewarm}`: one request through
//!   [`ProxyHandler::handle`] on an instance of its own (`max_reuse` 1, for
//!   p3 too, whose default reuses), reading the whole body, with no
//!   instance prepared ahead and with 4 prewarmed instances refilled in the
//!   background;
//! - `handle/hello-p3/reused`: the same with a warm p3 instance reused, so
//!   the figure is the dispatch overhead plus one guest call.
//!
//! `cargo bench -p wasmhive-bench --bench instantiation`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt as _, Empty};
use wasmhive::{App, HandlerState as _, Limits, PoolLimits, ProxyHandler, Request};
use wasmhive_bench::{app, guests, runtime};

fn instantiation(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("instantiate");
    for pooling in [true, false] {
        let runtime = runtime(pooling);
        assert_eq!(
            runtime.is_pooling(),
            pooling,
            "pooling allocator unavailable"
        );
        let allocator = if pooling { "pooling" } else { "on-demand" };
        for guest in [guests::HELLO_P2, guests::HELLO_P3] {
            let app = app(&runtime, guest);
            group.bench_function(BenchmarkId::new(allocator, guest.name), |b| {
                b.to_async(&tokio)
                    .iter_with_large_drop(|| app.instantiate(0));
            });
        }
    }
    group.finish();
}

fn get() -> Request {
    http::Request::get("http://bench.local/")
        .body(wasmhive::into_body(Empty::new()))
        .unwrap()
}

/// One request through `handler`, body read to the end.
async fn call(handler: &ProxyHandler<App>) {
    let response = handler.handle(0, get()).await.expect("hello answers");
    assert!(response.status().is_success());
    response.into_body().collect().await.expect("body");
}

fn handle(c: &mut Criterion) {
    // Workers run as tasks next to the caller, as in a server.
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let runtime = runtime(true);
    let mut group = c.benchmark_group("handle");
    for guest in [guests::HELLO_P2, guests::HELLO_P3] {
        for prewarm in [0, 4] {
            let _guard = tokio.enter();
            let app = app(&runtime, guest);
            let once = Limits {
                max_reuse: 1,
                ..app.limits().clone()
            };
            let handler = ProxyHandler::new(
                app.with_limits(once),
                PoolLimits {
                    prewarm,
                    ..PoolLimits::default()
                },
            );
            let variant = if prewarm == 0 { "fresh" } else { "prewarm" };
            group.bench_function(BenchmarkId::new(guest.name, variant), |b| {
                b.to_async(&tokio).iter(|| call(&handler));
            });
        }
    }
    let hello = app(&runtime, guests::HELLO_P3);
    let limits = Limits {
        max_reuse: usize::MAX,
        ..hello.limits().clone()
    };
    let handler = {
        let _guard = tokio.enter();
        ProxyHandler::new(hello.with_limits(limits), PoolLimits::default())
    };
    group.bench_function(BenchmarkId::new(guests::HELLO_P3.name, "reused"), |b| {
        b.to_async(&tokio).iter(|| call(&handler));
    });
    group.finish();
}

criterion_group!(benches, instantiation, handle);
criterion_main!(benches);
