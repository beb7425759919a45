//! Serves a wasi:http component from a plain hyper server with wasmhive.
//!
//! Usage: `cargo run -p wasmhive --example embed -- app.wasm [127.0.0.1:8080]`

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use wasmhive::{App, PoolLimits, ProxyHandler, Runtime, RuntimeConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: embed COMPONENT.wasm [ADDR]")?;
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());

    // The engine's instance pool is sized for this component.
    let (runtime, component) = Runtime::for_component_file(&RuntimeConfig::default(), &path)?;
    let app = App::new(&runtime, &component)?;
    let handler = ProxyHandler::new(app, PoolLimits::default());

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("Serving HTTP on http://{}/", listener.local_addr()?);
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    loop {
        let (stream, _) = listener.accept().await?;
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
            let handler = handler.clone();
            async move {
                let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                let response = match handler.handle(id, request.map(wasmhive::into_body)).await {
                    Ok(response) => response,
                    Err(error) => {
                        let body = Full::new(Bytes::from(format!("{error}\n")));
                        let mut response = hyper::Response::new(wasmhive::into_body(body));
                        *response.status_mut() = error.status();
                        response
                    }
                };
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
