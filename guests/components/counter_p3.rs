//! `counter-p3`: answers with how many requests this instance has served,
//! this one included (WASIp3).

use wasip3::http::types::{ErrorCode, Request, Response};
use wasmhive_guest_components::{next_count, p3};

wasip3::http::service::export!(Counter);

struct Counter;

impl wasip3::exports::http::handler::Guest for Counter {
    async fn handle(_request: Request) -> Result<Response, ErrorCode> {
        p3::respond(200, next_count().to_string().into_bytes())
    }
}
