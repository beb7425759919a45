//! Hostile clients: slowloris, and clients that vanish mid-request or
//! mid-response. (Oversized heads, oversized bodies and malformed requests
//! are in `serving.rs`.)

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use wasmhive_tests::guests;

use crate::{Server, get, metric, raw_exchange, try_call, wait_for_metric};

/// Opens a connection (counting it in `connected`) and trickles a request
/// head one byte every 200 ms, never finishing it; returns how long the
/// server took to hang up.
async fn slowloris(
    addr: std::net::SocketAddr,
    connected: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Duration {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    for byte in b"x-slow: ".iter().cycle() {
        tokio::select! {
            read = stream.read(&mut buf) => {
                // A 408 or a plain close: either way the connection ends.
                if matches!(read, Ok(0) | Err(_)) {
                    break;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if stream.write_all(&[*byte]).await.is_err() {
                    break;
                }
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never cut off");
    }
    started.elapsed()
}

#[tokio::test]
async fn slowloris_is_cut_off_and_does_not_starve_others() {
    let server = Server::start(&[guests::HELLO_P3.path, "--header-timeout", "1s"]);
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let attackers: Vec<_> = (0..300)
        .map(|_| tokio::spawn(slowloris(server.addr, connected.clone())))
        .collect();
    // Every attacker is connected (and trickling) before the bystander.
    tokio::time::timeout(Duration::from_secs(10), async {
        while connected.load(std::sync::atomic::Ordering::Relaxed) < 300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("300 attackers connected within 10 s");
    for _ in 0..20 {
        let (status, _, _) = get(server.addr, "/").await;
        assert_eq!(status, 200);
    }
    for attacker in attackers {
        let lasted = attacker.await.unwrap();
        assert!(lasted < Duration::from_secs(10), "lasted {lasted:?}");
    }
}

const BODY: usize = 256 * 1024;

/// Sends the head and 1 KiB of a 256 KiB body, then goes away.
async fn abandon_request(addr: std::net::SocketAddr) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {BODY}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b'x'; 1024]).await.unwrap();
}

/// Sends a whole 256 KiB body, reads the first 16 KiB of the echo, then
/// goes away.
async fn abandon_response(addr: std::net::SocketAddr) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let head = format!("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {BODY}\r\n\r\n");
        write.write_all(head.as_bytes()).await?;
        write.write_all(&vec![b'x'; BODY]).await?;
        Ok::<_, std::io::Error>(write)
    });
    let mut seen = 0;
    let mut buf = vec![0u8; 4096];
    while seen < 16 * 1024 {
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => panic!("the echo ended early after {seen} bytes"),
            Ok(n) => seen += n,
        }
    }
    drop(writer.await);
}

#[tokio::test]
async fn clients_vanishing_mid_request_or_mid_response_leak_nothing() {
    let server = Server::start(&[
        guests::ECHO_P3.path,
        "--admin-addr",
        "127.0.0.1:0",
        "--idle-timeout",
        "200ms",
    ]);
    let admin = server.admin_addr().await;
    let round = |n: usize| async move {
        for batch in 0..n / 20 {
            let clients = (0..20).map(|i| {
                let addr = server.addr;
                tokio::spawn(async move {
                    if (batch + i) % 2 == 0 {
                        abandon_request(addr).await
                    } else {
                        abandon_response(addr).await
                    }
                })
            });
            for client in futures::future::join_all(clients).await {
                client.unwrap();
            }
        }
    };
    let settled = |what: &'static str| async move {
        for series in ["wasmhive_connections_open", "wasmhive_instances_live"] {
            eprintln!("waiting for {series} to reach 0 after {what}");
            wait_for_metric(admin, series, 0.0, Duration::from_secs(20)).await;
        }
        let (_, _, text) = get(admin, "/metrics").await;
        metric(&text, "wasmhive_runtime_tasks_alive")
    };

    // The warm-up is the same load as the measured round: the pool keeps
    // the slots its busiest moment used resident (see
    // `Footprint::keep_resident`), so only memory that grows round after
    // round is a leak.
    round(1000).await;
    let tasks_at_rest = settled("warm-up").await;
    let rss_at_rest = server.rss();
    round(1000).await;
    // Tasks alive at rest: the listeners and the admin scrape itself. Give
    // stragglers a moment to end, then there must be no more than before.
    let mut tasks = settled("2,000 clients").await;
    for _ in 0..50 {
        if tasks <= tasks_at_rest {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        tasks = settled("2,000 clients").await;
    }
    assert!(
        tasks <= tasks_at_rest,
        "tasks alive: {tasks} now, {tasks_at_rest} before"
    );
    let rss = server.rss();
    eprintln!("RSS at rest after 1,000 clients {rss_at_rest} B, after 2,000: {rss} B");
    assert!(
        rss < rss_at_rest + rss_at_rest / 4,
        "RSS grew from {rss_at_rest} to {rss}"
    );

    // Still serving, byte for byte.
    let body = Bytes::from(vec![b'y'; BODY]);
    let (status, _, echoed) = try_call(server.addr, "POST", "/", body.clone())
        .await
        .unwrap();
    assert_eq!((status, echoed.unwrap()), (200, body));
}

#[tokio::test]
async fn silent_and_preface_only_connections_are_closed_by_their_deadline() {
    let _alone = crate::HEAVY.lock().await;
    let server = Server::start(&[
        guests::HELLO_P2.path,
        "--header-timeout",
        "1s",
        // Every connection here comes from 127.0.0.1: let its share be the
        // whole cap, so that the cap is what holds the surplus back (in the
        // listen backlog, not accepted) rather than the share (accepted and
        // closed at once).
        "--max-connections-per-client",
        "4096",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let (addr, admin) = (server.addr, server.admin_addr().await);
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const SETTINGS: &[u8] = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    // 5,000 connections, more than --max-connections (4,096): silent ones,
    // ones that sent half the HTTP/2 preface, and ones that sent the whole
    // preface and SETTINGS, then nothing.
    let mut held = Vec::new();
    for i in 0..5000 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        match i % 50 {
            0 => stream.write_all(&PREFACE[..10]).await.unwrap(),
            1 => {
                stream.write_all(PREFACE).await.unwrap();
                stream.write_all(SETTINGS).await.unwrap();
            }
            _ => {}
        }
        held.push(stream);
    }
    // Meanwhile a bystander is served (once deadlines free a place).
    let started = Instant::now();
    let (status, _, body) = tokio::time::timeout(Duration::from_secs(20), get(addr, "/"))
        .await
        .expect("the bystander is answered");
    assert_eq!((status, body.as_str()), (200, "Hello, wasmhive!\n"));
    assert!(started.elapsed() < Duration::from_secs(20));
    // Every held connection is closed by the server.
    let mut buf = [0u8; 256];
    for mut stream in held {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                // An HTTP/2 server's own SETTINGS may come first.
                Ok(Ok(_)) => continue,
                Err(_) => panic!("a silent connection was never closed"),
            }
        }
    }
    wait_for_metric(
        admin,
        "wasmhive_connections_timed_out_total",
        5000.0,
        Duration::from_secs(20),
    )
    .await;
    server.finish().await;
}

#[tokio::test]
async fn idle_admin_connections_neither_exhaust_descriptors_nor_stop_the_server() {
    let _alone = crate::HEAVY.lock().await;
    let server = Server::start(&[guests::HELLO_P2.path, "--admin-addr", "127.0.0.1:0"]);
    let admin = server.admin_addr().await;
    let mut idle = Vec::new();
    for _ in 0..1100 {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    // The main port serves meanwhile.
    let (status, _, _) = get(server.addr, "/").await;
    assert_eq!(status, 200);
    // The idle ones are closed (at once past the cap, at the header
    // deadline otherwise) and the admin endpoint answers again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Ok((200, _, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            try_call(admin, "GET", "/healthz", Bytes::new()),
        )
        .await
        {
            break;
        }
        assert!(Instant::now() < deadline, "/healthz never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut buf = [0u8; 16];
    for mut stream in idle {
        let closed = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "an idle admin connection stayed open"
        );
    }
    server.finish().await;
}

#[test]
fn max_connections_beyond_the_descriptor_limit_is_refused() {
    let binary = env!("CARGO_BIN_EXE_wasmhive");
    let output = std::process::Command::new("bash")
        .args([
            "-c",
            &format!("ulimit -Sn 512 -Hn 512 && exec {binary} serve --addr :0"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--max-connections 4096 needs"), "{stderr}");
    assert!(!stderr.contains("Serving HTTP"), "{stderr}");
}

#[tokio::test]
async fn a_blocked_stdout_pipe_stops_neither_requests_nor_healthz() {
    let _alone = crate::HEAVY.lock().await;
    // stdout is a pipe nobody reads (a stalled log shipper): it is full
    // after 64 KiB.
    let server = Server::start_with_stdout(
        &[guests::FAULT_P3.path, "--admin-addr", "127.0.0.1:0"],
        std::process::Stdio::piped(),
    );
    let admin = server.admin_addr().await;
    for _ in 0..4 {
        let answer =
            tokio::time::timeout(Duration::from_secs(20), get(server.addr, "/print?n=50000"))
                .await
                .expect("a chatty guest is not blocked by its output");
        assert_eq!((answer.0, answer.2.as_str()), (200, "printed\n"));
    }
    let healthz = tokio::time::timeout(Duration::from_secs(10), get(admin, "/healthz"))
        .await
        .expect("/healthz answers");
    assert_eq!(healthz.0, 200);
    assert_eq!(get(server.addr, "/").await.0, 200);
    let (_, _, metrics) = get(admin, "/metrics").await;
    assert!(metric(&metrics, "wasmhive_guest_output_dropped_total") > 100_000.0);
    server.finish().await;
}

/// A stderr that takes nothing (a pipe nobody reads) stops neither
/// requests nor signals, however much clients make the server log: each
/// trapping request logs a warning, and 64 KiB of them fill the pipe.
#[tokio::test]
async fn a_blocked_stderr_pipe_stops_neither_requests_nor_signals() {
    let mut server = Server::start_with_stderr_held(&[guests::FAULT_P2.path]);
    for _ in 0..600 {
        let answer = tokio::time::timeout(Duration::from_secs(10), get(server.addr, "/trap"))
            .await
            .expect("a logged failure does not block the server");
        assert_eq!(answer.0, 500);
    }
    let answer = tokio::time::timeout(Duration::from_secs(10), get(server.addr, "/"))
        .await
        .expect("the server still answers");
    assert_eq!(answer.0, 200);
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
}

/// Request bodies sent a byte per chunk, as fast as the connection takes
/// them, leave room for everyone else: the guest gets the bytes gathered
/// (not a wake-up per byte), and an instance waiting for its client's next
/// piece is not computing, however often one arrives. Every byte is echoed.
#[tokio::test]
async fn uploads_of_one_byte_chunks_do_not_shut_others_out() {
    let _alone = crate::HEAVY.lock().await;
    let server = Server::start(&[guests::ECHO_P3.path]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let uploads: Vec<_> = (0..2)
        .map(|_| {
            let (addr, stop) = (server.addr, stop.clone());
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let head = "POST /?buffer=1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n";
                stream.write_all(head.as_bytes()).await.unwrap();
                let batch = b"1\r\nz\r\n".repeat(1000);
                let mut sent = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    stream.write_all(&batch).await.unwrap();
                    sent += 1000;
                }
                stream.write_all(b"0\r\n\r\n").await.unwrap();
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).await.unwrap();
                (sent, String::from_utf8_lossy(&answer).into_owned())
            })
        })
        .collect();
    // While both upload, a bystander's requests are served at once.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = tokio::time::timeout(Duration::from_secs(10), get(server.addr, "/"))
            .await
            .expect("the bystander is answered");
        assert_eq!(answer.0, 200);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for upload in uploads {
        let (sent, answer) = upload.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.200}");
        let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
        // The echo comes back chunked: count the bytes, not the framing
        // (hexadecimal chunk sizes have no `z`).
        assert_eq!(body.matches('z').count(), sent, "every byte echoed");
    }
    server.finish().await;
}

/// `GET /` on a new HTTP/2 connection whose client grants `window` bytes
/// per response: the connection's task, its sender and the response (with
/// status 200).
async fn h2_get(
    addr: std::net::SocketAddr,
    window: u32,
) -> (
    tokio::task::JoinHandle<Result<(), h2::Error>>,
    h2::client::SendRequest<Bytes>,
    http::Response<h2::RecvStream>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, Bytes>(stream)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut sender = sender.ready().await.unwrap();
    let request = http::Request::builder()
        .uri(format!("http://{addr}/"))
        .body(())
        .unwrap();
    let (response, _) = sender.send_request(request, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    (connection, sender, response)
}

/// With `RUST_BACKTRACE=1` (common in containers), a client's bad body
/// does not make the server capture and symbolise a backtrace (the guest
/// asks for the error's debug string): that kept its debug information,
/// 100-200 MiB, resident for good.
#[tokio::test]
async fn a_bad_body_costs_no_backtrace_with_rust_backtrace_set() {
    let server = Server::start_with_env(&[guests::ECHO_P2.path], &[("RUST_BACKTRACE", "1")]);
    let (status, _, _) = get(server.addr, "/").await;
    assert_eq!(status, 200);
    let before = server.rss();
    // The guest reads the body before it answers, so the answer is the
    // bad body's 400 whenever the body fails.
    let request =
        b"POST /?buffer=1 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n";
    let answer = raw_exchange(&server, request).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let grown = server.rss().saturating_sub(before);
    assert!(grown < 32 << 20, "RSS grew by {} MiB", grown >> 20);
    server.finish().await;
}

/// An HTTP/1.0 request needs no `Host` (HAProxy's default health check
/// sends `OPTIONS / HTTP/1.0` and nothing more): it is for this server. From
/// HTTP/1.1 on, a request without one is malformed.
#[tokio::test]
async fn http10_needs_no_host_but_http11_does() {
    let server = Server::start(&[guests::HELLO_P3.path]);
    let answer = raw_exchange(&server, b"OPTIONS / HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let answer = raw_exchange(&server, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    server.finish().await;
}

/// The head size limit is the same over HTTP/2 as over HTTP/1 (64 KiB):
/// a 40 KB cookie is served on both (HTTP/2's own default is 16 KiB), and
/// a 70 KB one refused with `431` on both.
#[tokio::test]
async fn http2_heads_have_the_same_size_limit_as_http1() {
    let server = Server::start(&[guests::HELLO_P3.path]);
    for (size, expected) in [(40_000, 200), (70_000, 431)] {
        let cookie = "c".repeat(size);
        let request = format!("GET / HTTP/1.1\r\nhost: x\r\ncookie: {cookie}\r\n\r\n");
        let answer = raw_exchange(&server, request.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {expected}")),
            "HTTP/1, {size} bytes: {answer:.40}"
        );

        let stream = TcpStream::connect(server.addr).await.unwrap();
        let (sender, connection) = h2::client::handshake(stream).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let request = http::Request::builder()
            .uri(format!("http://{}/", server.addr))
            .header("cookie", cookie)
            .body(())
            .unwrap();
        let (response, _) = sender.send_request(request, true).unwrap();
        let status = response.await.map(|r| r.status().as_u16());
        assert_eq!(status.ok(), Some(expected), "HTTP/2, {size} bytes");
        drop(sender);
        connection.abort();
    }
    server.finish().await;
}

/// An HTTP/2 client that answers every ping but sends nothing more is
/// closed once nothing has been in flight for `--header-timeout`: pings
/// alone do not keep a connection (and its place under
/// `--max-connections`).
#[tokio::test]
async fn idle_http2_connections_are_closed_at_the_header_timeout() {
    let server = Server::start(&[guests::HELLO_P3.path, "--header-timeout", "1s"]);
    let (connection, sender, response) = h2_get(server.addr, 65_535).await;
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    // The client keeps its handle, and would answer pings forever.
    let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(
        closed.is_ok(),
        "the idle connection was not closed within 10 s"
    );
    drop(sender);
    server.finish().await;
}

/// A request body that stops coming fails in the guest after
/// `--body-timeout` without progress, and its client gets `408`; the
/// instance is free again for others.
#[tokio::test]
async fn a_stalled_request_body_gets_408_at_the_body_timeout() {
    let server = Server::start(&[guests::ECHO_P3.path, "--body-timeout", "1s"]);
    // Half a body; the guest reads it all before it answers.
    let request = b"POST /?buffer=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789";
    let answer = raw_exchange(&server, request).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let (status, _, body) = get(server.addr, "/").await;
    assert_eq!((status, body.as_str()), (200, ""));
    server.finish().await;
}

/// A malformed chunked body is the client's fault whatever the guest made
/// of the error it read: `400`, not the guest's `500`.
#[tokio::test]
async fn a_malformed_chunked_body_gets_400() {
    let server = Server::start(&[guests::ECHO_P3.path]);
    let request =
        b"POST /?buffer=1 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n";
    let answer = raw_exchange(&server, request).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let (status, _, body) = get(server.addr, "/").await;
    assert_eq!((status, body.as_str()), (200, ""));
    server.finish().await;
}

/// A client that takes none of its response (here an HTTP/2 window kept
/// shut, while it answers pings) loses its connection at `--send-timeout`,
/// and with it the places its requests held.
#[tokio::test]
async fn a_client_that_takes_none_of_its_response_is_cut_off_at_the_send_timeout() {
    let server = Server::start(&[guests::HELLO_P3.path, "--send-timeout", "1s"]);
    let (connection, sender, response) = h2_get(server.addr, 0).await;
    // The body cannot be sent: the window stays shut.
    let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(
        closed.is_ok(),
        "the stalled connection was not closed within 10 s"
    );
    drop((sender, response));
    let (status, _, _) = get(server.addr, "/").await;
    assert_eq!(status, 200);
    server.finish().await;
}
