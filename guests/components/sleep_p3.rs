//! `sleep-p3`: waits `?ms=N` milliseconds (default 100) without using the
//! CPU, then answers `slept N ms`. Exercises concurrency within an instance.

use wasip3::http::types::{ErrorCode, Request, Response};
use wasmhive_guest_components::{p3, query_param};

wasip3::http::service::export!(Sleep);

struct Sleep;

impl wasip3::exports::http::handler::Guest for Sleep {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path = request.get_path_with_query().unwrap_or_default();
        let ms: u64 = query_param(&path, "ms")
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(100);
        wasip3::clocks::monotonic_clock::wait_for(ms * 1_000_000).await;
        p3::respond(200, format!("slept {ms} ms\n").into_bytes())
    }
}
