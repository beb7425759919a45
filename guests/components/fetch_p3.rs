//! `fetch-p3`: sends `GET` to the URL given as `?url=http://host:port/path`
//! and answers with the upstream status and body, or with `502` and the
//! `wasi:http` error code when the host refuses or fails the outbound
//! request (WASIp3). Exercises the outbound allowlist.

use wasip3::http::types::{ErrorCode, Fields, Request, Response, Scheme};
use wasip3::wit_bindgen::StreamResult;
use wasip3::wit_future;
use wasmhive_guest_components::{p3, query_param};

wasip3::http::service::export!(Fetch);

struct Fetch;

impl wasip3::exports::http::handler::Guest for Fetch {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path_with_query = request.get_path_with_query().unwrap_or_default();
        let Some(url) = query_param(&path_with_query, "url") else {
            return p3::respond(400, b"missing ?url=http://host:port/path\n".to_vec());
        };
        let Some((authority, path)) = split_url(url) else {
            return p3::respond(400, format!("not an http:// URL: {url}\n").into_bytes());
        };
        let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
        drop(trailers_tx);
        let (outgoing, _sent) = Request::new(Fields::new(), None, trailers_rx, None);
        outgoing.set_scheme(Some(&Scheme::Http)).unwrap();
        outgoing.set_authority(Some(authority)).unwrap();
        outgoing.set_path_with_query(Some(path)).unwrap();
        match wasip3::http::client::send(outgoing).await {
            Ok(upstream) => {
                let status = upstream.get_status_code();
                let (_done_tx, done_rx) = wit_future::new(|| Ok(()));
                let (mut body, _trailers) = Response::consume_body(upstream, done_rx);
                let mut bytes = Vec::new();
                loop {
                    let (result, chunk) = body.read(Vec::with_capacity(16 * 1024)).await;
                    bytes.extend_from_slice(&chunk);
                    if !matches!(result, StreamResult::Complete(_)) {
                        break;
                    }
                }
                p3::respond(status, bytes)
            }
            Err(code) => p3::respond(502, format!("outbound request failed: {code:?}\n").into_bytes()),
        }
    }
}

/// `http://authority/path` into its authority and path (`/` when empty).
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("http://")?;
    match rest.find('/') {
        Some(i) => Some((&rest[..i], &rest[i..])),
        None => Some((rest, "/")),
    }
}
