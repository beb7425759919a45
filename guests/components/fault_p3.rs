//! `fault-p3`: misbehaves on purpose, as chosen by the request path (see
//! [`Fault`]): `/trap`, `/trap-after-headers`, `/spin`, `/hang`, `/oom`,
//! `/panic`, `/stack-overflow`; any other path answers `200 ok` (WASIp3).

use wasip3::http::types::{ErrorCode, Request, Response};
use wasmhive_guest_components::{Fault, p3};

wasip3::http::service::export!(Faulty);

struct Faulty;

impl wasip3::exports::http::handler::Guest for Faulty {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let fault = Fault::from_path(&request.get_path_with_query().unwrap_or_default());
        fault.run_cpu_fault();
        match fault {
            Fault::Hang => {
                wasip3::clocks::monotonic_clock::wait_for(u64::MAX).await;
                p3::respond(200, b"woke up\n".to_vec())
            }
            Fault::TrapAfterHeaders => {
                let (response, mut body) = p3::streaming_response(200, Vec::new());
                wasip3::spawn_local(async move {
                    body.write_all(b"partial body, then a trap".to_vec()).await;
                    std::process::abort();
                });
                Ok(response)
            }
            _ => p3::respond(200, b"ok\n".to_vec()),
        }
    }
}
