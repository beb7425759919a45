//! `hello-p2`: answers every request with `Hello, wasmhive!` (WASIp2).

use wasip2::http::types::{IncomingRequest, ResponseOutparam};

wasip2::http::proxy::export!(Hello);

struct Hello;

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        wasmhive_guest_components::p2::respond(out, 200, b"Hello, wasmhive!\n");
    }
}
