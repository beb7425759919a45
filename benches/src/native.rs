//! The native baseline: a plain hyper server giving the guests' answers
//! without wasm (hello, echo, `?ms=` sleep, `?iters=` CPU work), on the same
//! tokio multi-threaded runtime and hyper-util auto builder as wasmhive.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The CPU work of the `cpu-p3` guest, natively.
fn mix(iters: u64) -> u64 {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..iters {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x)
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(k, v)| (k == key).then_some(v))
}

type Body = BoxBody<Bytes, hyper::Error>;

fn text(body: impl Into<Bytes>) -> http::Response<Body> {
    let mut response = http::Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
}

async fn answer(request: http::Request<Incoming>) -> Result<http::Response<Body>, Infallible> {
    let query = request.uri().query().unwrap_or("").to_string();
    if let Some(ms) = query_param(&query, "ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Ok(text(format!("slept {ms} ms\n")));
    }
    if let Some(iters) = query_param(&query, "iters").and_then(|v| v.parse::<u64>().ok()) {
        return Ok(text(format!("{:016x}\n", mix(iters))));
    }
    if request.method() == http::Method::POST || request.method() == http::Method::PUT {
        return Ok(http::Response::new(request.into_body().boxed()));
    }
    Ok(text("Hello, wasmhive!\n"))
}

/// Serves on `addr` forever, printing `Serving HTTP on http://ADDR/` on
/// stderr first, like the wasm servers.
pub fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            eprintln!("Serving HTTP on http://{}/", listener.local_addr()?);
            loop {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer))
                        .await;
                });
            }
        })
}
