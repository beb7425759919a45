//! `secret-p3`: keeps a secret in a global of its linear memory. `GET
//! /?secret=S&ms=N` reads the secret left there before, stores `S`, waits
//! `N` ms (default 10) so that other requests may run meanwhile, and
//! answers `before=<previous> after=<current>`. A fresh instance answers
//! `before= after=S`; anything else shows state shared between requests.

use std::sync::Mutex;

use wasip3::http::types::{ErrorCode, Request, Response};
use wasmhive_guest_components::{p3, query_param};

wasip3::http::service::export!(Secret);

static SECRET: Mutex<String> = Mutex::new(String::new());

struct Secret;

impl wasip3::exports::http::handler::Guest for Secret {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path = request.get_path_with_query().unwrap_or_default();
        let secret = query_param(&path, "secret").unwrap_or_default().to_string();
        let ms: u64 = query_param(&path, "ms")
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(10);
        let before = std::mem::replace(&mut *SECRET.lock().unwrap(), secret);
        wasip3::clocks::monotonic_clock::wait_for(ms * 1_000_000).await;
        let after = SECRET.lock().unwrap().clone();
        p3::respond(200, format!("before={before} after={after}\n").into_bytes())
    }
}
