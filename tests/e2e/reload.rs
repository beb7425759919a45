//! Zero-downtime reload: `SIGHUP` and the admin's `POST /reload` load the
//! component file again; new requests go to the new version, in-flight
//! ones finish on the old, and a version that fails to load is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use wasmhive_guests as guests;

use crate::{Bystander, Server, get, try_call, wait_for_metric};

/// A directory of its own for one test's component file.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmhive-reload-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Replaces `app` with `with` as a deploy would: a new file renamed over
/// the old, so that a reader never sees half of it.
fn deploy(app: &Path, with: &[u8]) {
    let staged = app.with_extension("new");
    std::fs::write(&staged, with).unwrap();
    std::fs::rename(staged, app).unwrap();
}

/// What `GET /` answers on `server`.
async fn body_of_root(server: &Server) -> String {
    let (status, _, body) = get(server.addr, "/").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn ten_reloads_under_load_lose_no_request_and_the_new_version_answers() {
    let _alone = crate::HEAVY.lock().await;
    let dir = scratch("load");
    let app = dir.join("app.wasm");
    let hello = std::fs::read(guests::HELLO_P2.path).unwrap();
    // A p3 app that answers after 100 ms: the versions differ in what they
    // say and in their world, and a reload away from this one always has
    // requests in flight on it.
    let sleep = std::fs::read(guests::SLEEP_P3.path).unwrap();
    deploy(&app, &hello);
    let server = Server::start(&[app.to_str().unwrap(), "--admin-addr", "127.0.0.1:0"]);
    let admin = server.admin_addr().await;
    assert_eq!(body_of_root(&server).await, "Hello, wasmhive!\n");

    let load = Bystander::start(server.addr, "/?ms=100", 16);
    for reload in 1..=10u32 {
        let (next, says_hello) = if reload % 2 == 1 {
            (&sleep, false)
        } else {
            (&hello, true)
        };
        deploy(&app, next);
        if reload % 2 == 1 {
            server.signal("HUP");
            wait_for_metric(
                admin,
                "wasmhive_reloads_total{outcome=\"ok\"}",
                f64::from(reload),
                Duration::from_secs(30),
            )
            .await;
        } else {
            let (status, _, body) = try_call(admin, "POST", "/reload", Bytes::new())
                .await
                .unwrap();
            let body = String::from_utf8_lossy(&body.unwrap()).into_owned();
            assert_eq!(status, 200, "{body}");
            assert_eq!(body, format!("reloaded: version {}\n", reload + 1));
        }
        // From now on, the new version answers.
        let body = body_of_root(&server).await;
        if says_hello {
            assert_eq!(body, "Hello, wasmhive!\n", "after reload {reload}");
        } else {
            assert_eq!(body, "slept 100 ms\n", "after reload {reload}");
        }
    }
    let seen = load.stop().await;
    let failed: Vec<_> = seen.iter().filter(|seen| **seen != Ok(200)).collect();
    assert!(seen.len() > 100, "the load ran: {} requests", seen.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        seen.len()
    );
    // Every old version drains and is dropped.
    wait_for_metric(
        admin,
        "wasmhive_instances_live",
        0.0,
        Duration::from_secs(30),
    )
    .await;
    server.finish().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_version_that_fails_to_load_is_refused_and_the_old_one_keeps_serving() {
    let dir = scratch("refused");
    let app = dir.join("app.wasm");
    deploy(&app, &std::fs::read(guests::HELLO_P3.path).unwrap());
    let server = Server::start(&[app.to_str().unwrap(), "--admin-addr", "127.0.0.1:0"]);
    let admin = server.admin_addr().await;

    // Not a component at all, then a component that serves no HTTP world.
    deploy(&app, b"\0asm garbage");
    let (status, _, body) = try_call(admin, "POST", "/reload", Bytes::new())
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&body.unwrap()).into_owned();
    assert_eq!(status, 500, "{body}");
    assert!(
        body.starts_with("reload refused, the current version keeps serving"),
        "{body}"
    );
    assert_eq!(body_of_root(&server).await, "Hello, wasmhive!\n");

    // The smallest valid component: it exports nothing.
    deploy(&app, b"\0asm\x0d\0\x01\0");
    server.signal("HUP");
    wait_for_metric(
        admin,
        "wasmhive_reloads_total{outcome=\"failed\"}",
        2.0,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(body_of_root(&server).await, "Hello, wasmhive!\n");
    // The log line comes with the metric; the reader thread may lag it.
    server
        .wait_for_line("exports no wasi:http handler", Duration::from_secs(10))
        .await
        .expect("the second refusal is logged");
    assert_eq!(server.lines_containing("reload refused"), 2);

    // A good version after bad ones is taken.
    deploy(&app, &std::fs::read(guests::COUNTER_P2.path).unwrap());
    let (status, _, _) = try_call(admin, "POST", "/reload", Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body_of_root(&server).await, "1");
    // Only POST reloads.
    let (status, _, _) = get(admin, "/reload").await;
    assert_eq!(status, 405);
    server.finish().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// A reload signal while the app still loads (a deploy tool's, during a
/// slow start) does not end the process: it comes up, serves, and then
/// does the reload it was asked for. The component file is a FIFO, so that
/// the server is known to be loading (reading it) when the signal comes,
/// and reads it again to reload.
#[tokio::test]
async fn sighup_while_the_app_loads_is_not_fatal() {
    let fifo = scratch("sighup-while-loading").join("app.wasm");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.unwrap().success(), "mkfifo");
    let server = Server::start_meanwhile(&[fifo.to_str().unwrap()], {
        let fifo = fifo.clone();
        move |pid| {
            // Opening for writing waits until the server opens it to read.
            let mut pipe = std::fs::File::options().write(true).open(&fifo).unwrap();
            let hup = std::process::Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status();
            assert!(hup.unwrap().success(), "kill -HUP");
            std::io::Write::write_all(&mut pipe, &std::fs::read(guests::HELLO_P3.path).unwrap())
                .unwrap();
        }
    });
    let (status, _, body) = get(server.addr, "/").await;
    assert_eq!((status, body.as_str()), (200, "Hello, wasmhive!\n"));
    // The reload the signal asked for reads the FIFO again.
    let writer = tokio::task::spawn_blocking(move || {
        let mut pipe = std::fs::File::options().write(true).open(&fifo).unwrap();
        std::io::Write::write_all(&mut pipe, &std::fs::read(guests::HELLO_P3.path).unwrap())
            .unwrap();
    });
    let reloaded = server.wait_for_line("reloaded", Duration::from_secs(30));
    assert!(
        reloaded.await.is_some(),
        "the signalled reload never happened"
    );
    writer.await.unwrap();
    let (status, _, _) = get(server.addr, "/").await;
    assert_eq!(status, 200);
    server.finish().await;
}
