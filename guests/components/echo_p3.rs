//! `echo-p3`: answers with the request's body, streamed back chunk by chunk
//! as it arrives, and its method, path, query and headers as `x-echo-*`
//! headers (WASIp3). With `?buffer=1` in the query it reads the whole body
//! before answering (`500` if reading it fails), like a handler that parses
//! its input first.

use wasip3::http::types::{ErrorCode, Request, Response, Scheme};
use wasip3::wit_bindgen::StreamResult;
use wasip3::wit_future;
use wasmhive_guest_components::{echo_headers, p3, query_param};

wasip3::http::service::export!(Echo);

struct Echo;

const CHUNK: usize = 64 * 1024;

impl wasip3::exports::http::handler::Guest for Echo {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let scheme = request.get_scheme().map(|scheme| match scheme {
            Scheme::Http => "http".to_string(),
            Scheme::Https => "https".to_string(),
            Scheme::Other(other) => other,
        });
        let headers = echo_headers(
            p3::method(&request),
            scheme,
            request.get_authority(),
            request.get_path_with_query().unwrap_or_default(),
            request.get_headers().copy_all(),
        );
        let buffer =
            query_param(&request.get_path_with_query().unwrap_or_default(), "buffer").is_some();
        let (done_tx, done_rx) = wit_future::new(|| Ok(()));
        let (mut input, trailers) = Request::consume_body(request, done_rx);
        if buffer {
            let mut body = Vec::new();
            loop {
                let (result, chunk) = input.read(Vec::with_capacity(CHUNK)).await;
                body.extend_from_slice(&chunk);
                if !matches!(result, StreamResult::Complete(_)) {
                    break;
                }
            }
            drop(done_tx);
            // The body ended early if the request failed (e.g. it was too large).
            if let Err(code) = trailers.await {
                return p3::respond(
                    500,
                    format!("reading the body failed: {code:?}\n").into_bytes(),
                );
            }
            let (response, mut output) = p3::streaming_response(200, headers);
            wasip3::spawn_local(async move {
                output.write_all(body).await;
            });
            return Ok(response);
        }
        let (response, output) = p3::streaming_response(200, headers);
        wasip3::spawn_local(async move {
            p3::pipe(input, output).await;
            drop(done_tx);
        });
        Ok(response)
    }
}
