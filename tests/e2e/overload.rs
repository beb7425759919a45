//! Open-loop load at ten times capacity: memory stays bounded, the surplus
//! is shed fast with `503` and `Retry-After`, the admitted requests succeed,
//! and the server is back to normal as soon as the load stops; and the
//! adaptive limit sheds CPU-bound overload instead of slowing every request.

use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmhive_tests::guests;

use crate::{Server, get, metric, try_call};

#[tokio::test]
async fn ten_times_capacity_for_ten_seconds() {
    let _alone = crate::HEAVY.lock().await;
    // Capacity: 4 instances, one 50 ms request each at a time: 80 r/s.
    let server = Server::start(&[
        guests::SLEEP_P3.path,
        "--max-instances",
        "4",
        "--max-concurrent-per-instance",
        "1",
        "--queue-len",
        "8",
        "--queue-timeout",
        "100ms",
    ]);
    let (rate, duration) = (800.0, Duration::from_secs(10));
    let rss_before = server.rss();
    let mut rss_peak = rss_before;

    let started = Instant::now();
    let mut requests = Vec::new();
    let mut next_sample = started;
    for i in 0..(rate * duration.as_secs_f64()) as u64 {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        if Instant::now() >= next_sample {
            rss_peak = rss_peak.max(server.rss());
            next_sample += Duration::from_millis(250);
        }
        let addr = server.addr;
        requests.push(tokio::spawn(async move {
            let answer = try_call(addr, "GET", "/?ms=50", Bytes::new()).await;
            (answer, due.elapsed())
        }));
    }
    let (mut admitted, mut shed) = (0, Vec::new());
    for request in requests {
        let (answer, latency) = request.await.unwrap();
        let (status, headers, body) = answer.expect("every request gets an answer");
        let body = body.expect("and a whole body");
        match status {
            200 => {
                assert_eq!(body, Bytes::from_static(b"slept 50 ms\n"));
                admitted += 1;
            }
            503 => {
                assert!(headers.contains_key("retry-after"), "{headers:?}");
                shed.push(latency);
            }
            other => panic!("unexpected {other}: {body:?}"),
        }
    }
    shed.sort();
    let p99 = shed[shed.len() * 99 / 100];
    eprintln!(
        "10x overload: {admitted} admitted, {} shed (p50 {:?}, p99 {p99:?}), RSS {} MiB before, peak {} MiB",
        shed.len(),
        shed[shed.len() / 2],
        rss_before >> 20,
        rss_peak >> 20,
    );
    assert!(admitted > 0);
    assert!(shed.len() > admitted, "most of the surplus is shed");
    // Shedding takes at most the queue wait; bounded generously here.
    assert!(p99 < Duration::from_secs(2), "shed p99 {p99:?}");
    assert!(
        rss_peak < rss_before + (64 << 20),
        "RSS grew from {rss_before} to {rss_peak}"
    );

    // Every request has been answered: the very next one is served at once.
    let started = Instant::now();
    let (status, _, body) = try_call(server.addr, "GET", "/?ms=0", Bytes::new())
        .await
        .unwrap();
    assert_eq!(
        (status, body.unwrap()),
        (200, Bytes::from_static(b"slept 0 ms\n"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn adaptive_concurrency_sheds_cpu_bound_overload_at_once() {
    let _alone = crate::HEAVY.lock().await;
    // 64 clients keep a CPU-bound guest busy on a machine with a few cores:
    // the pool's own limits would admit them all and slow every one down.
    // The adaptive limit must fall below them and answer the surplus 503.
    let server = Server::start(&[
        guests::CPU_P3.path,
        "--adaptive-concurrency",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let admin = server.admin_addr().await;
    let until = Instant::now() + Duration::from_secs(6);
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let addr = server.addr;
            tokio::spawn(async move {
                let (mut ok, mut shed) = (0u32, 0u32);
                while Instant::now() < until {
                    let answer = try_call(addr, "GET", "/?iters=1000000", Bytes::new()).await;
                    let (status, headers, body) = answer.expect("an answer");
                    let body = body.expect("a whole body");
                    match status {
                        200 => {
                            assert_eq!(body.len(), 17, "{body:?}");
                            ok += 1;
                        }
                        503 => {
                            assert!(headers.contains_key("retry-after"), "{headers:?}");
                            shed += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        other => panic!("unexpected {other}: {body:?}"),
                    }
                }
                (ok, shed)
            })
        })
        .collect();
    // Under load, once the limit has settled enough to shed.
    // Under load, the limit falls below the 64 clients (it starts higher,
    // and sheds while it probes the baseline).
    let limit = crate::wait_until_metric(
        admin,
        "wasmhive_concurrency_limit",
        |limit| (1.0..64.0).contains(&limit),
        Duration::from_secs(5),
    )
    .await;
    let (mut ok, mut shed) = (0, 0);
    for client in clients {
        let (o, s) = client.await.unwrap();
        ok += o;
        shed += s;
    }
    eprintln!("adaptive: limit {limit} under load, {ok} admitted, {shed} shed");
    assert!(ok > 0 && shed > 0, "{ok} admitted, {shed} shed");
    assert!((1.0..64.0).contains(&limit), "limit {limit}");
}

/// CPU-bound requests run `--max-running` at a time, on as many instances:
/// the rest wait in the queue instead of each starting an instance of its
/// own and time-slicing the CPU with the others.
#[tokio::test]
async fn cpu_bound_requests_run_max_running_at_a_time() {
    let _alone = crate::HEAVY.lock().await;
    let server = Server::start(&[
        guests::CPU_P3.path,
        "--max-running",
        "1",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let admin = server.admin_addr().await;
    // Eight clients, three requests each of ~20 ms of computing.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let addr = server.addr;
            tokio::spawn(async move {
                for _ in 0..3 {
                    let answer = try_call(addr, "GET", "/?iters=20000000", Bytes::new()).await;
                    assert_eq!(answer.expect("an answer").0, 200);
                }
            })
        })
        .collect();
    let mut most_live = 0.0f64;
    while !clients.iter().all(|client| client.is_finished()) {
        let (_, _, metrics) = get(admin, "/metrics").await;
        most_live = most_live.max(metric(&metrics, "wasmhive_instances_live"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for client in clients {
        client.await.unwrap();
    }
    // One computes; the next request takes its instance when it is done.
    assert!(most_live <= 2.0, "{most_live} instances alive at once");
    server.finish().await;
}
