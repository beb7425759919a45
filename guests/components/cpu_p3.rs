//! `cpu-p3`: does `?iters=N` rounds of integer mixing (default 1,000,000,
//! about 1 ms) and answers with the result (WASIp3). The `cpu` scenario of
//! the bench harness.

use wasip3::http::types::{ErrorCode, Request, Response};
use wasmhive_guest_components::{p3, query_param};

wasip3::http::service::export!(Cpu);

struct Cpu;

/// The work itself, shared in spirit with the native baseline server: a
/// xorshift chain the optimiser cannot fold.
fn mix(iters: u64) -> u64 {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..iters {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x)
}

impl wasip3::exports::http::handler::Guest for Cpu {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path = request.get_path_with_query().unwrap_or_default();
        let iters = query_param(&path, "iters")
            .and_then(|n| n.parse().ok())
            .unwrap_or(1_000_000);
        p3::respond(200, format!("{:016x}\n", mix(iters)).into_bytes())
    }
}
