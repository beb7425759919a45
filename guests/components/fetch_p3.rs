//! `fetch-p3`: sends `GET` to the URL given as `?url=http://host:port/path`
//! and answers with the upstream status and body, or with `502` and the
//! `wasi:http` error code when the host refuses or fails the outbound
//! request (WASIp3). Either way it reports the request's transmission
//! result (the future `request.new` returned) in `x-transmission`: `ok`, or
//! the error code. Exercises the outbound allowlist and the host's `send`.

use wasip3::http::types::{ErrorCode, Fields, Request, Response, Scheme};
use wasip3::wit_bindgen::FutureReader;
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
        let (outgoing, transmitted) = Request::new(Fields::new(), None, trailers_rx, None);
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
                respond(status, bytes, transmitted).await
            }
            Err(code) => {
                let body = format!("outbound request failed: {code:?}\n").into_bytes();
                respond(502, body, transmitted).await
            }
        }
    }
}

/// A response with `status` and `body` once the outgoing request's
/// transmission has ended, reporting how in `x-transmission`.
async fn respond(
    status: u16,
    body: Vec<u8>,
    transmitted: FutureReader<Result<(), ErrorCode>>,
) -> Result<Response, ErrorCode> {
    let transmission = match transmitted.await {
        Ok(()) => "ok".to_string(),
        Err(code) => format!("{code:?}"),
    };
    let (response, mut body_tx) = p3::streaming_response(
        status,
        vec![("x-transmission".into(), transmission.into_bytes())],
    );
    wasip3::spawn_local(async move {
        body_tx.write_all(body).await;
    });
    Ok(response)
}

/// `http://authority/path` into its authority and path (`/` when empty).
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("http://")?;
    match rest.find('/') {
        Some(i) => Some((&rest[..i], &rest[i..])),
        None => Some((rest, "/")),
    }
}
