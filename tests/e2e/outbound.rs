//! Outbound HTTP from a guest is denied unless its host is allowlisted, and
//! a p3 guest learns from its transmission future whether its request left.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use wasmhive_tests::guests;

use crate::{Server, get};

/// A loopback server answering every request with `upstream says hi`.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                        b"upstream says hi\n",
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn outbound_requests_need_an_allowlisted_host() {
    let upstream = upstream().await;
    let path = format!("/?url=http://{upstream}/hello");

    let denied = Server::start(&[guests::FETCH_P3.path]);
    let (status, headers, body) = get(denied.addr, &path).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    assert_eq!(headers["x-transmission"], "ErrorCode::HttpRequestDenied");
    denied.finish().await;

    let allowed = Server::start(&[
        guests::FETCH_P3.path,
        "--allow-outbound",
        &upstream.to_string(),
    ]);
    let (status, headers, body) = get(allowed.addr, &path).await;
    assert_eq!((status, body.as_str()), (200, "upstream says hi\n"));
    assert_eq!(headers["x-transmission"], "ok");
    // The allowlist is per host and port: another port is still denied.
    let other = format!(
        "/?url=http://127.0.0.1:{}/",
        upstream.port().wrapping_add(1).max(1)
    );
    let (status, headers, body) = get(allowed.addr, &other).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(headers["x-transmission"], "ErrorCode::HttpRequestDenied");
    allowed.finish().await;
}

#[tokio::test]
async fn a_request_that_never_left_reports_its_failure_as_transmission() {
    // A port that was just free: nothing listens on it, connecting is
    // refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = Server::start(&[guests::FETCH_P3.path, "--allow-outbound", "127.0.0.1"]);
    let (status, headers, body) = get(server.addr, &format!("/?url=http://{closed}/")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("ConnectionRefused"), "{body}");
    assert_eq!(headers["x-transmission"], "ErrorCode::ConnectionRefused");
    server.finish().await;
}
