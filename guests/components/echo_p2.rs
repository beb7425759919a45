//! `echo-p2`: answers with the request's body, streamed back byte for byte,
//! and its method, path, query and headers as `x-echo-*` headers (WASIp2).

use wasip2::http::types::{
    IncomingBody, IncomingRequest, OutgoingBody, ResponseOutparam, Scheme,
};
use wasmhive_guest_components::{echo_headers, p2};

wasip2::http::proxy::export!(Echo);

struct Echo;

impl wasip2::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let scheme = request.scheme().map(|scheme| match scheme {
            Scheme::Http => "http".to_string(),
            Scheme::Https => "https".to_string(),
            Scheme::Other(other) => other,
        });
        let headers = echo_headers(
            p2::method(&request),
            scheme,
            request.authority(),
            request.path_with_query().unwrap_or_default(),
            request.headers().entries(),
        );
        let in_body = request.consume().unwrap();
        let out_body = p2::start_response(out, 200, headers);
        let copied = {
            let mut input = in_body.stream().unwrap();
            let mut output = out_body.write().unwrap();
            std::io::copy(&mut input, &mut output)
        };
        if copied.is_err() {
            // The request body broke off (its client went away): dropping
            // the response body unfinished aborts the echo too.
            return;
        }
        IncomingBody::finish(in_body);
        OutgoingBody::finish(out_body, None).unwrap();
    }
}
