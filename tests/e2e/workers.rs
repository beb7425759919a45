//! `--workers N`: worker processes sharing the port under a supervisor that
//! restarts them, passes signals and reloads on, and sums their metrics.

use std::time::Duration;

use bytes::Bytes;
use wasmhive_guests as guests;

use crate::{Server, get, metric, run, try_call, wait_for_metric};

/// The supervisor's worker processes.
fn workers_of(server: &Server) -> Vec<u32> {
    let output = std::process::Command::new("pgrep")
        .args(["-P", &server.pid().to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|pid| pid.parse().unwrap())
        .collect()
}

/// `count` requests from 8 clients at once, each on a new connection:
/// their statuses.
async fn requests(server: &Server, count: usize) -> Vec<u16> {
    let clients = (0..8).map(|_| {
        let addr = server.addr;
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..count / 8 {
                let (status, _, body) = try_call(addr, "GET", "/", Bytes::new()).await.unwrap();
                assert_eq!(body.unwrap(), "Hello, wasmhive!\n");
                statuses.push(status);
            }
            statuses
        })
    });
    let mut statuses = Vec::new();
    for client in clients {
        statuses.extend(client.await.unwrap());
    }
    statuses
}

#[tokio::test]
async fn workers_share_the_port_are_restarted_and_drain_with_their_supervisor() {
    let _alone = crate::HEAVY.lock().await;
    let server = Server::start(&[
        guests::HELLO_P2.path,
        "--workers",
        "2",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let admin = server.admin_addr().await;
    assert_eq!(workers_of(&server).len(), 2);
    assert!(
        requests(&server, 200)
            .await
            .iter()
            .all(|status| *status == 200)
    );
    // The supervisor's metrics are the workers' summed.
    let (_, _, metrics) = get(admin, "/metrics").await;
    assert_eq!(metric(&metrics, "wasmhive_requests_started_total"), 200.0);
    assert_eq!(metric(&metrics, "wasmhive_workers"), 2.0);

    // A worker that dies is replaced; the port keeps serving.
    let killed = workers_of(&server)[0];
    std::process::Command::new("kill")
        .args(["-KILL", &killed.to_string()])
        .status()
        .unwrap();
    wait_for_metric(
        admin,
        "wasmhive_worker_restarts_total",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    wait_for_metric(admin, "wasmhive_workers", 2.0, Duration::from_secs(30)).await;
    let now = workers_of(&server);
    assert_eq!(now.len(), 2);
    assert!(!now.contains(&killed));
    assert!(
        requests(&server, 80)
            .await
            .iter()
            .all(|status| *status == 200)
    );
    // The killed worker's counts (as last scraped: all of its requests)
    // are kept: the sum does not go back.
    let (_, _, metrics) = get(admin, "/metrics").await;
    assert_eq!(metric(&metrics, "wasmhive_requests_started_total"), 280.0);

    // A reload reaches every worker, by signal and by the admin endpoint.
    server.signal("HUP");
    let reloads = "wasmhive_reloads_total{outcome=\"ok\"}";
    wait_for_metric(admin, reloads, 2.0, Duration::from_secs(30)).await;
    let (status, _, body) = try_call(admin, "POST", "/reload", Bytes::new())
        .await
        .unwrap();
    assert_eq!(
        (status, body.unwrap()),
        (200, Bytes::from("reloaded 2 workers\n"))
    );
    wait_for_metric(admin, reloads, 4.0, Duration::from_secs(30)).await;
    let output = server.finish().await;
    assert!(output.contains("every worker drained"), "{output}");
    assert_eq!(output.matches("Serving HTTP on").count(), 1, "{output}");
}

#[test]
fn a_worker_that_cannot_start_stops_its_supervisor_with_its_exit_code() {
    let (code, stderr) = run(&[
        "serve",
        "--addr",
        ":0",
        "--workers",
        "2",
        "/nowhere/app.wasm",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot read"), "{stderr}");
    assert!(!stderr.contains("Serving HTTP"), "{stderr}");
}
