//! `demo`: the app `wasmhive serve` runs when given no component (WASIp3).
//!
//! `GET /` greets and says which instance answered; any `POST` echoes its
//! body back, streamed; anything else is `404`.

use wasip3::http::types::{ErrorCode, Request, Response};
use wasmhive_guest_components::{next_count, p3, path};

wasip3::http::service::export!(Demo);

struct Demo;

impl wasip3::exports::http::handler::Guest for Demo {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let method = p3::method(&request);
        let path_with_query = request.get_path_with_query().unwrap_or_default();
        match (method.as_str(), path(&path_with_query)) {
            ("GET" | "HEAD", "/") => {
                let served = next_count();
                p3::respond(
                    200,
                    format!(
                        "Hello from wasmhive!\n\n\
                         This page was written by a WASIp3 component; this instance \
                         has now served {served} request(s).\n\
                         POST a body to any path and it is echoed back.\n"
                    )
                    .into_bytes(),
                )
            }
            ("POST", _) => p3::echo(request),
            _ => p3::respond(
                404,
                format!("no route for {method} {path_with_query}\n").into_bytes(),
            ),
        }
    }
}
