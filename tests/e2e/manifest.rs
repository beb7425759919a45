//! `--config wasmhive.toml`: several apps behind one listener, routed by
//! path prefix and host, each with its own pool and metrics; bad manifests
//! refused with the file, line and column.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use wasmhive_guests as guests;

use crate::{Server, get, metric, run, try_call, wait_until_metric};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmhive-manifest-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `GET path` with a `Host` header of `host` (the server's address if
/// `None`): status, headers, body.
async fn get_at(server: &Server, host: Option<&str>, path: &str) -> (u16, http::HeaderMap, String) {
    let host = host.map_or(server.addr.to_string(), |host| {
        format!("{host}:{}", server.addr.port())
    });
    let (status, headers, body) =
        wasmhive_tests::http_call(server.addr, "GET", path, &[("host", &host)], Bytes::new()).await;
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_manifest_routes_apps_by_path_and_host_each_with_its_own_pool() {
    let dir = scratch("routes");
    let manifest = dir.join("wasmhive.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"
[[app]]
name = "hello"
component = "{hello}"

[[app]]
name = "echo"
component = "{echo}"
route = "/echo"
max-instances = 2

[[app]]
name = "counter"
component = "{counter}"
host = "Counter.Test"
max-reuse = 1000
"#,
            hello = guests::HELLO_P2.path,
            echo = guests::ECHO_P3.path,
            counter = guests::COUNTER_P2.path,
        ),
    )
    .unwrap();
    let server = Server::start(&[
        "--config",
        manifest.to_str().unwrap(),
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let admin = server.admin_addr().await;

    let (status, _, body) = get_at(&server, None, "/").await;
    assert_eq!((status, body.as_str()), (200, "Hello, wasmhive!\n"));
    // The p3 app under its prefix sees the whole path.
    let (status, headers, _) = get_at(&server, None, "/echo/x?y=1").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-echo-path"], "/echo/x?y=1");
    let (_, headers, _) = get_at(&server, None, "/echo").await;
    assert_eq!(headers["x-echo-path"], "/echo");
    // A prefix ends at a segment boundary.
    let (_, headers, body) = get_at(&server, None, "/echoes").await;
    assert!(!headers.contains_key("x-echo-path"));
    assert_eq!(body, "Hello, wasmhive!\n");
    // The host's app wins over any path, in any case; it keeps its instance.
    for expected in ["1", "2"] {
        let (status, _, body) = get_at(&server, Some("counter.TEST"), "/echo/x").await;
        assert_eq!((status, body.as_str()), (200, expected));
    }

    // Each app has its own pool and metrics.
    let (_, _, metrics) = get(admin, "/metrics").await;
    assert_eq!(
        metric(&metrics, r#"wasmhive_requests_started_total{app="hello"}"#),
        2.0
    );
    assert_eq!(
        metric(&metrics, r#"wasmhive_requests_started_total{app="echo"}"#),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"wasmhive_requests_started_total{app="counter"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"wasmhive_http_requests_total{app="echo",status="200"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(&metrics, r#"wasmhive_instances_live{app="counter"}"#),
        1.0
    );
    assert!(
        server.lines_containing("component loaded") == 3,
        "{:?}",
        server.stderr.lock().unwrap()
    );

    // A reload reads the manifest again: the echo app moves, the counter
    // app goes.
    std::fs::write(
        &manifest,
        format!(
            "[[app]]\nname = \"echo\"\ncomponent = \"{}\"\nroute = \"/v2\"\n",
            guests::ECHO_P3.path
        ),
    )
    .unwrap();
    let (status, _, _) = try_call(admin, "POST", "/reload", Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, headers, _) = get_at(&server, Some("counter.test"), "/v2/a").await;
    assert_eq!(
        (status, &headers["x-echo-path"]),
        (200, &"/v2/a".parse().unwrap())
    );
    let (status, _, body) = get_at(&server, None, "/").await;
    assert_eq!((status, body.as_str()), (404, "no app serves this path\n"));
    // Once the old version has drained, the totals of its apps are kept.
    wait_until_metric(
        admin,
        r#"wasmhive_instances_live{app="counter"}"#,
        |live| live == 0.0,
        Duration::from_secs(10),
    )
    .await;
    let (_, _, metrics) = get(admin, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            r#"wasmhive_requests_started_total{app="counter"}"#
        ),
        2.0
    );
    server.finish().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_manifests_are_refused_with_the_file_line_and_column() {
    let dir = scratch("bad");
    let hello = guests::HELLO_P2.path;
    let cases = [
        (
            "syntax.toml",
            "[[app]\nname = \"a\"\n".to_string(),
            vec!["syntax.toml", "line 1, column"],
        ),
        (
            "unknown.toml",
            format!("[[app]]\nname = \"a\"\ncomponent = \"{hello}\"\nmax-instance = 3\n"),
            vec![
                "unknown.toml",
                "line 4, column 1",
                "unknown field `max-instance`",
            ],
        ),
        (
            "duration.toml",
            format!("[[app]]\nname = \"a\"\ncomponent = \"{hello}\"\nrequest-timeout = \"soon\"\n"),
            vec!["duration.toml", "line 4, column 19"],
        ),
        (
            "missing.toml",
            "[[app]]\nname = \"a\"\ncomponent = \"nowhere.wasm\"\n".to_string(),
            vec!["app `a`", "cannot read", "nowhere.wasm"],
        ),
        (
            "twice.toml",
            format!(
                "[[app]]\nname = \"a\"\ncomponent = \"{hello}\"\n\
                 [[app]]\nname = \"b\"\ncomponent = \"{hello}\"\nroute = \"/\"\n"
            ),
            vec![
                "twice.toml",
                "apps `a` and `b` have the same route and host",
            ],
        ),
        (
            "route.toml",
            format!("[[app]]\nname = \"a\"\ncomponent = \"{hello}\"\nroute = \"api\"\n"),
            vec!["route `api` must be a path starting with `/`"],
        ),
        ("empty.toml", String::new(), vec!["no [[app]] to serve"]),
    ];
    for (file, text, says) in cases {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        let (code, stderr) = run(&[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--config",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(2), "{file}: {stderr}");
        for said in says {
            assert!(stderr.contains(said), "{file}: `{said}` not in {stderr}");
        }
        assert!(!stderr.contains("Serving"), "{stderr}");
    }
    // A manifest or a component, not both.
    let (code, stderr) = run(&["serve", hello, "--config", "x.toml"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--config"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}
