//! `soak-p3`: the mixed workload of the soak test (WASIp3). `/hello`
//! answers `hello\n`; `/echo` streams the request body back; `/count`
//! answers how many requests this instance has served; `/trap` traps
//! before responding; anything else is `404`.

use wasip3::http::types::{ErrorCode, Request, Response};
use wasmhive_guest_components::{next_count, p3, path};

wasip3::http::service::export!(Soak);

struct Soak;

impl wasip3::exports::http::handler::Guest for Soak {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let count = next_count();
        match path(&request.get_path_with_query().unwrap_or_default()) {
            "/hello" => p3::respond(200, b"hello\n".to_vec()),
            "/count" => p3::respond(200, count.to_string().into_bytes()),
            "/trap" => std::process::abort(),
            "/echo" => p3::echo(request),
            _ => p3::respond(404, b"not found\n".to_vec()),
        }
    }
}
