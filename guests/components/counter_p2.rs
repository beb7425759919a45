//! `counter-p2`: answers with how many requests this instance has served,
//! this one included (WASIp2). `1` every time means a fresh instance each time.

use wasip2::http::types::{IncomingRequest, ResponseOutparam};
use wasmhive_guest_components::{next_count, p2};

wasip2::http::proxy::export!(Counter);

struct Counter;

impl wasip2::exports::http::incoming_handler::Guest for Counter {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        p2::respond(out, 200, next_count().to_string().as_bytes());
    }
}
