//! `echo-p3`: answers with the request's body, streamed back chunk by chunk
//! as it arrives, and its method, path, query and headers as `x-echo-*`
//! headers (WASIp3).

use wasip3::http::types::{ErrorCode, Request, Response};
use wasip3::wit_bindgen::StreamResult;
use wasip3::wit_future;
use wasmhive_guest_components::{echo_headers, p3};

wasip3::http::service::export!(Echo);

struct Echo;

const CHUNK: usize = 64 * 1024;

impl wasip3::exports::http::handler::Guest for Echo {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let headers = echo_headers(
            p3::method(&request),
            request.get_path_with_query().unwrap_or_default(),
            request.get_headers().copy_all(),
        );
        let (done_tx, done_rx) = wit_future::new(|| Ok(()));
        let (mut input, _trailers) = Request::consume_body(request, done_rx);
        let (response, mut output) = p3::streaming_response(200, headers);
        wasip3::spawn_local(async move {
            loop {
                let (result, chunk) = input.read(Vec::with_capacity(CHUNK)).await;
                if !chunk.is_empty() {
                    output.write_all(chunk).await;
                }
                if !matches!(result, StreamResult::Complete(_)) {
                    break;
                }
            }
            drop(done_tx);
        });
        Ok(response)
    }
}
