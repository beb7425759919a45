//! `hello-p3`: answers every request with `Hello, wasmhive!` (WASIp3).

use wasip3::http::types::{ErrorCode, Request, Response};

wasip3::http::service::export!(Hello);

struct Hello;

impl wasip3::exports::http::handler::Guest for Hello {
    async fn handle(_request: Request) -> Result<Response, ErrorCode> {
        wasmhive_guest_components::p3::respond(200, b"Hello, wasmhive!\n".to_vec())
    }
}
