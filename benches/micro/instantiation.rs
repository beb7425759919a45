//! Time to create a store and instantiate the hello guests in it, with the
//! pooling allocator and with on-demand allocation: the cost a p2 request
//! pays on its critical path when no instance is prewarmed.
//!
//! `cargo bench -p wasmhive-bench --bench instantiation`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use wasmhive::HandlerState as _;
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

criterion_group!(benches, instantiation);
criterion_main!(benches);
