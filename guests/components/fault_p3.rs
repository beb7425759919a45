//! `fault-p3`: misbehaves on purpose, as chosen by the request path (see
//! [`Fault`]): `/trap`, `/trap-after-headers`, `/hang-after-headers`,
//! `/spin`, `/hang`, `/oom`,
//! `/panic`, `/stack-overflow`; `/print?n=N` prints N lines (with control
//! characters) to stdout; any other path answers `200 ok` (WASIp3).

use wasip3::http::types::{ErrorCode, Request, Response};
use wasmhive_guest_components::{Fault, p3, query_param};

wasip3::http::service::export!(Faulty);

struct Faulty;

impl wasip3::exports::http::handler::Guest for Faulty {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path_with_query = request.get_path_with_query().unwrap_or_default();
        // `/print?n=N`: N lines on stdout (a chatty guest), then `200 ok`.
        if let Some(n) = path_with_query
            .strip_prefix("/print")
            .and_then(|_| query_param(&path_with_query, "n"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            for i in 0..n {
                println!("line {i} of a chatty guest \x1b[31mwith an escape\r");
            }
            return p3::respond(200, b"printed\n".to_vec());
        }
        let fault = Fault::from_path(&path_with_query);
        fault.run_cpu_fault();
        match fault {
            Fault::Hang => {
                wasip3::clocks::monotonic_clock::wait_for(u64::MAX).await;
                p3::respond(200, b"woke up\n".to_vec())
            }
            Fault::TrapAfterHeaders | Fault::HangAfterHeaders => {
                let (response, mut body) = p3::streaming_response(200, Vec::new());
                wasip3::spawn_local(async move {
                    body.write_all(b"partial body, then a fault".to_vec()).await;
                    if fault == Fault::TrapAfterHeaders {
                        std::process::abort();
                    }
                    wasip3::clocks::monotonic_clock::wait_for(u64::MAX).await;
                });
                Ok(response)
            }
            _ => p3::respond(200, b"ok\n".to_vec()),
        }
    }
}
