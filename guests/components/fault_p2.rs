//! `fault-p2`: misbehaves on purpose, as chosen by the request path (see
//! [`Fault`]): `/trap`, `/trap-after-headers`, `/hang-after-headers`,
//! `/spin`, `/hang`, `/oom`,
//! `/panic`, `/stack-overflow`; any other path answers `200 ok` (WASIp2).

use std::io::Write as _;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};
use wasmhive_guest_components::{Fault, p2};

wasip2::http::proxy::export!(Faulty);

struct Faulty;

impl wasip2::exports::http::incoming_handler::Guest for Faulty {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let fault = Fault::from_path(&request.path_with_query().unwrap_or_default());
        fault.run_cpu_fault();
        match fault {
            Fault::Hang => {
                wasip2::clocks::monotonic_clock::subscribe_duration(u64::MAX).block();
            }
            Fault::TrapAfterHeaders | Fault::HangAfterHeaders => {
                let body = p2::start_response(out, 200, Vec::new());
                let mut stream = body.write().unwrap();
                stream.write_all(b"partial body, then a fault").unwrap();
                stream.flush().unwrap();
                if fault == Fault::TrapAfterHeaders {
                    std::process::abort();
                }
                wasip2::clocks::monotonic_clock::subscribe_duration(u64::MAX).block();
            }
            _ => p2::respond(out, 200, b"ok\n"),
        }
    }
}
