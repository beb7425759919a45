//! The global memory budget: a storm of requests that each try to eat all
//! the memory they can stays within `--max-total-memory`, and the server
//! keeps serving everyone else.

use bytes::Bytes;
use wasmhive_tests::guests;

use crate::{Bystander, Server, try_call};

const GIB: u64 = 1 << 30;

/// What the server itself may use beyond the guests' budget: its code,
/// the compiled component, connections and buffers (measured at about
/// 100 MiB for this test in a debug build).
const HOST_OVERHEAD: u64 = GIB / 2;

#[tokio::test]
async fn oom_storm_stays_within_the_budget_and_bystanders_are_served() {
    let _alone = crate::HEAVY.lock().await;
    // 64 guests running at once, each allowed 128 MiB: 8 GiB of demand
    // against a 2 GiB budget. Fresh instance per request (p2), so a trap
    // cannot take a bystander's request down with it.
    let server = Server::start(&[
        guests::FAULT_P2.path,
        "--max-total-memory",
        "2GiB",
        "--max-running",
        "64",
        "--max-instances",
        "128",
        // Storm and bystander share 127.0.0.1: this test is about memory,
        // not about one client's share of the instances.
        "--max-requests-per-client",
        "128",
        // While the storm holds the whole budget a bystander's new instance
        // waits for memory in the queue; on a loaded machine that can take
        // longer than the default 2 s wait (then 503). A generous bound.
        "--queue-timeout",
        "10s",
    ]);
    let bystander = Bystander::start(server.addr, "/", 2);
    let storm: Vec<_> = (0..64)
        .map(|_| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..3 {
                    let answer = try_call(addr, "GET", "/oom", Bytes::new()).await;
                    statuses.push(answer.map(|(status, _, _)| status));
                }
                statuses
            })
        })
        .collect();
    for client in storm {
        for status in client.await.unwrap() {
            assert_eq!(status, Ok(500), "an /oom request fails inside its guest");
        }
    }
    let seen = bystander.stop().await;
    let peak = server.peak_rss();
    let output = server.finish().await;
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|outcome| *outcome == Ok(200)),
        "bystanders got {:?}\n{}",
        seen.iter().filter(|o| **o != Ok(200)).collect::<Vec<_>>(),
        output
            .lines()
            .filter(|l| !l.contains("[std"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        peak <= 2 * GIB + HOST_OVERHEAD,
        "peak RSS {} MiB, budget 2048 MiB + {} MiB",
        peak >> 20,
        HOST_OVERHEAD >> 20
    );
}
