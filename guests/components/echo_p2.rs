//! `echo-p2`: answers with the request's body, streamed back byte for byte,
//! and its method, path, query and headers as `x-echo-*` headers (WASIp2).
//! With `?buffer=1` in the query it reads the whole body before answering
//! (`500` if reading it fails), like a handler that parses its input first.

use std::io::Read as _;
use wasip2::http::types::{IncomingBody, IncomingRequest, OutgoingBody, ResponseOutparam, Scheme};
use wasmhive_guest_components::{echo_headers, p2, query_param};

wasip2::http::proxy::export!(Echo);

struct Echo;

impl wasip2::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let scheme = request.scheme().map(|scheme| match scheme {
            Scheme::Http => "http".to_string(),
            Scheme::Https => "https".to_string(),
            Scheme::Other(other) => other,
        });
        let path_with_query = request.path_with_query().unwrap_or_default();
        let buffer = query_param(&path_with_query, "buffer").is_some();
        let headers = echo_headers(
            p2::method(&request),
            scheme,
            request.authority(),
            path_with_query,
            request.headers().entries(),
        );
        let in_body = request.consume().unwrap();
        if buffer {
            let mut body = Vec::new();
            let read = in_body.stream().unwrap().read_to_end(&mut body);
            IncomingBody::finish(in_body);
            match read {
                Ok(_) => p2::respond_with_headers(out, 200, headers, &body),
                Err(error) => p2::respond(
                    out,
                    500,
                    format!("reading the body failed: {error}\n").as_bytes(),
                ),
            }
            return;
        }
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
