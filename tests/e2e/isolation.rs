//! Isolation between requests: with single-use instances a guest never sees
//! another request's data, even under concurrency. (Outbound HTTP is
//! covered by `outbound.rs`.)

use bytes::Bytes;
use wasmhive_tests::guests;

use crate::{Server, try_call};

/// Sends 64 concurrent `secret-p3` requests, each storing a secret of its
/// own, and returns the bodies: `before=<left by others> after=<current>`.
async fn secrets(server: &Server) -> Vec<(String, String)> {
    let requests = (0..64).map(|i| {
        let addr = server.addr;
        tokio::spawn(async move {
            let secret = format!("s{i}");
            let path = format!("/?secret={secret}&ms=20");
            let (status, _, body) = try_call(addr, "GET", &path, Bytes::new()).await.unwrap();
            let body = String::from_utf8(body.unwrap().to_vec()).unwrap();
            assert_eq!(status, 200, "{body}");
            (secret, body)
        })
    });
    futures::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn single_use_instances_never_see_another_requests_secret() {
    let server = Server::start(&[guests::SECRET_P3.path, "--max-reuse", "1"]);
    for (secret, body) in secrets(&server).await {
        assert_eq!(body, format!("before= after={secret}\n"));
    }
}

/// The control: the same load on reused, concurrent instances does show
/// state shared between requests (documented), so the test above can fail.
#[tokio::test]
async fn reused_instances_share_their_state() {
    let server = Server::start(&[
        guests::SECRET_P3.path,
        "--max-reuse",
        "1000",
        "--max-concurrent-per-instance",
        "64",
    ]);
    let shared = secrets(&server)
        .await
        .into_iter()
        .filter(|(secret, body)| *body != format!("before= after={secret}\n"))
        .count();
    assert!(shared > 0, "no request saw another's secret");
}
