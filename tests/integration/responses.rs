//! hello and echo, p2 and p3: the right bodies, byte for byte, any size.

use wasmhive::PoolLimits;
use wasmhive_tests::{get, guests, handler, http_call, payload, read_body, request, serve};

#[tokio::test]
async fn hello_p2_and_p3_answer_hello() {
    for guest in [guests::HELLO_P2, guests::HELLO_P3] {
        let (handler, _) = handler(guest, |_| {}, PoolLimits::default());
        let response = handler.handle(1, get("/")).await.expect(guest.name);
        assert_eq!(response.status(), 200, "{}", guest.name);
        assert_eq!(
            read_body(response).await,
            "Hello, wasmhive!\n",
            "{}",
            guest.name
        );
    }
}

#[tokio::test]
async fn echo_round_trips_bodies_byte_for_byte_through_the_library() {
    for guest in [guests::ECHO_P2, guests::ECHO_P3] {
        let (handler, _) = handler(guest, |_| {}, PoolLimits::default());
        for len in [0, 1024, 8 << 20] {
            let body = payload(0, len);
            let response = handler
                .handle(1, request("POST", "/echo/path?x=1&y=two", body.clone()))
                .await
                .unwrap_or_else(|e| panic!("{} {len}: {e}", guest.name));
            assert_eq!(response.status(), 200);
            let headers = response.headers().clone();
            assert_eq!(headers["x-echo-method"], "POST", "{}", guest.name);
            assert_eq!(
                headers["x-echo-path"], "/echo/path?x=1&y=two",
                "{}",
                guest.name
            );
            let echoed = read_body(response).await;
            assert_eq!(echoed.len(), len, "{} {len}", guest.name);
            assert!(echoed == body, "{} {len}: body differs", guest.name);
        }
    }
}

#[tokio::test]
async fn echo_over_loopback_http_returns_method_path_headers_and_body() {
    for guest in [guests::ECHO_P2, guests::ECHO_P3] {
        let (handler, _) = handler(guest, |_| {}, PoolLimits::default());
        let addr = serve(handler).await;
        for len in [0, 1024, 8 << 20] {
            let body = payload(0, len);
            let (status, headers, echoed) = http_call(
                addr,
                "PUT",
                "/a/b?q=1",
                &[("x-custom", "wasmhive")],
                body.clone(),
            )
            .await;
            assert_eq!(status, 200, "{}", guest.name);
            assert_eq!(headers["x-echo-method"], "PUT");
            assert_eq!(headers["x-echo-path"], "/a/b?q=1");
            assert_eq!(headers["x-echo-header-x-custom"], "wasmhive", "{headers:?}");
            assert_eq!(echoed.len(), len, "{} {len}", guest.name);
            assert!(echoed == body, "{} {len}: body differs", guest.name);
        }
    }
}
