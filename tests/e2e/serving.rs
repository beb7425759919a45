//! Serving: the demo app, p2 and p3 guests, HTTP/2, body and header limits,
//! malformed requests.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody};
use wasmhive_tests::{guests, http_call};

use crate::{Server, get, raw_exchange};

#[tokio::test]
async fn serves_the_bundled_demo_without_a_component() {
    let server = Server::start(&[]);
    let (status, _, body) = get(server.addr, "/").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("Hello from wasmhive!"), "{body}");
    let (status, _, echoed) = http_call(
        server.addr,
        "POST",
        "/anything",
        &[],
        Bytes::from_static(b"round trip"),
    )
    .await;
    assert_eq!((status, &echoed[..]), (200, &b"round trip"[..]));
    let (status, _, _) = get(server.addr, "/nowhere").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn serves_p2_and_p3_components() {
    let p2 = Server::start(&[guests::HELLO_P2.path]);
    assert_eq!(get(p2.addr, "/").await.2, "Hello, wasmhive!\n");

    let p3 = Server::start(&[guests::ECHO_P3.path]);
    let body = Bytes::from(vec![7u8; 256 * 1024]);
    let (status, headers, echoed) = http_call(
        p3.addr,
        "PUT",
        "/up?x=1",
        &[("x-test", "yes")],
        body.clone(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(echoed, body);
    assert_eq!(headers["x-echo-method"], "PUT");
    assert_eq!(headers["x-echo-path"], "/up?x=1");
    assert_eq!(headers["x-echo-header-x-test"], "yes");
}

#[tokio::test]
async fn speaks_http2_with_prior_knowledge() {
    let server = Server::start(&[guests::HELLO_P3.path]);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let response = client
        .get(format!("http://{}/", server.addr).parse().unwrap())
        .await
        .expect("h2c request");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "Hello, wasmhive!\n");
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let server = Server::start(&[guests::ECHO_P3.path, "--max-body-size", "1KiB"]);
    // Declared too large: refused before the guest runs.
    let (status, _, body) =
        http_call(server.addr, "POST", "/", &[], Bytes::from(vec![1u8; 4096])).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));

    // Streamed without a Content-Length: cut off as the guest reads it.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let request = http::Request::post(format!("http://{}/?buffer=1", server.addr))
        .body(chunked(8, 512))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 413);

    // Within the limit, both ways work.
    let (status, _, body) = http_call(
        server.addr,
        "POST",
        "/?buffer=1",
        &[],
        Bytes::from(vec![3u8; 1000]),
    )
    .await;
    assert_eq!((status, body.len()), (200, 1000));
    let request = http::Request::post(format!("http://{}/?buffer=1", server.addr))
        .body(chunked(2, 400))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .len(),
        800
    );
}

type Chunks =
    futures::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>;

/// A body of `count` chunks of `size` bytes, sent without a Content-Length.
fn chunked(count: usize, size: usize) -> StreamBody<Chunks> {
    let frames = (0..count)
        .map(|_| Ok(http_body::Frame::data(Bytes::from(vec![b'x'; size]))))
        .collect::<Vec<_>>();
    StreamBody::new(futures::stream::iter(frames))
}

#[tokio::test]
async fn malformed_oversized_and_unsupported_requests_never_reach_a_guest() {
    let server = Server::start(&[guests::COUNTER_P3.path]);
    let reply = raw_exchange(&server, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(128 * 1024)
    );
    let reply = raw_exchange(&server, huge.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
    // An authority-form target is for CONNECT only.
    let reply = raw_exchange(&server, b"GET abc HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    // What the server cannot do: a tunnel over HTTP/1, a transfer coding
    // besides chunked (hyper would undo the chunks and pass on the gzip).
    let connect = b"CONNECT abc:443 HTTP/1.1\r\nhost: abc:443\r\n\r\n";
    let reply = raw_exchange(&server, connect).await;
    assert!(reply.starts_with("HTTP/1.1 501"), "{reply:?}");
    let gzipped = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let reply = raw_exchange(&server, gzipped).await;
    assert!(reply.starts_with("HTTP/1.1 501"), "{reply:?}");
    // None reached the guest: its first request counts 1.
    assert_eq!(get(server.addr, "/").await.2, "1");
}

/// The value of header `name` in a raw response.
fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[tokio::test]
async fn guests_see_the_scheme_and_authority_of_every_request() {
    for guest in [guests::ECHO_P2, guests::ECHO_P3] {
        let server = Server::start(&[guest.path, "--admin-addr", "127.0.0.1:0"]);
        let addr = server.addr;
        // Origin form, as HTTP/1.1 clients send it: the Host header.
        let (status, headers, _) = http_call(addr, "GET", "/a?b=1", &[], Bytes::new()).await;
        assert_eq!(status, 200, "{}", guest.name);
        assert_eq!(headers["x-echo-scheme"], "http", "{}", guest.name);
        assert_eq!(headers["x-echo-authority"], addr.to_string().as_str());
        assert_eq!(headers["x-echo-path"], "/a?b=1");
        // Absolute form: the target's authority wins over Host.
        let response = raw_exchange(
            &server,
            b"GET http://app.example:8080/x HTTP/1.1\r\nHost: ignored.example\r\n\r\n",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert_eq!(header(&response, "x-echo-scheme"), Some("http"));
        assert_eq!(
            header(&response, "x-echo-authority"),
            Some("app.example:8080")
        );
        assert_eq!(header(&response, "x-echo-path"), Some("/x"));
        // h2c: the :scheme and :authority pseudo-headers.
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http::<Full<Bytes>>();
        let response = client
            .get(format!("http://{addr}/h2").parse().unwrap())
            .await
            .expect("h2c request");
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.headers()["x-echo-scheme"], "http");
        assert_eq!(
            response.headers()["x-echo-authority"],
            addr.to_string().as_str()
        );

        // Missing, malformed or repeated Host: 400 before any instance.
        let admin = server.admin_addr().await;
        let (_, _, metrics) = get(admin, "/metrics").await;
        let instances = crate::metric(&metrics, "wasmhive_instantiations_total");
        for host_lines in [
            "Host: a:99999\r\n",
            "Host: a b\r\n",
            "Host: a/b\r\n",
            "Host: u@a\r\n",
            "Host: \r\n",
            "Host: a\r\nHost: b\r\n",
        ] {
            let head = format!("GET / HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n");
            let response = raw_exchange(&server, head.as_bytes()).await;
            assert!(
                response.starts_with("HTTP/1.1 400"),
                "{host_lines:?}: {response}"
            );
            assert!(response.contains("invalid request"), "{response}");
        }
        let (_, _, metrics) = get(admin, "/metrics").await;
        assert_eq!(
            crate::metric(&metrics, "wasmhive_instantiations_total"),
            instances,
            "no instance was created for them"
        );
        server.finish().await;
    }
}

/// Streams 6 chunks of 1,000 bytes, 300 ms apart, through the echo
/// `guest` started with `flags` (whose limits are shorter than the stream),
/// and checks that all of them come back.
async fn stream_through(guest: &str, flags: &[&str]) {
    let server = Server::start(&[&[guest], flags].concat());
    let chunks = futures::stream::unfold(0u8, |i| async move {
        if i == 6 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let frame = http_body::Frame::data(Bytes::from(vec![b'a' + i; 1000]));
        Some((Ok::<_, Infallible>(frame), i + 1))
    });
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let request = http::Request::post(format!("http://{}/", server.addr))
        .body(StreamBody::new(Box::pin(chunks)))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the whole stream, not cut off")
        .to_bytes();
    let expected: Vec<u8> = (0..6u8).flat_map(|i| vec![b'a' + i; 1000]).collect();
    assert_eq!(body, expected);
    server.finish().await;
}

#[tokio::test]
async fn a_p3_stream_outlives_the_post_return_timeout_while_its_client_reads() {
    // The echo guest's call returns at once and its task streams the body
    // back as the client sends it.
    stream_through(guests::ECHO_P3.path, &["--post-return-timeout", "500ms"]).await;
}

#[tokio::test]
async fn a_p2_stream_outlives_the_request_timeout_while_its_client_reads() {
    // The echo guest sets its response at once and its handler goes on
    // copying the body back as the client sends it: the deadline is for the
    // head, and neither it nor the post-return timeout cuts the body.
    let flags = [
        "--request-timeout",
        "500ms",
        "--post-return-timeout",
        "500ms",
    ];
    stream_through(guests::ECHO_P2.path, &flags).await;
}
