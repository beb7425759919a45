//! Bad input on the command line: a clear message, exit code 2, no panic;
//! a failure met while starting: exit code 1. `wasmtime serve`'s flag
//! names work too. And `compile`, whose output `serve` loads.

use wasmhive_tests::guests;

use crate::{Server, get, run};

/// Runs `wasmhive ARGS` expecting exit code 2 and a message containing
/// `expected`.
fn fails_with(args: &[&str], expected: &str) {
    let (code, stderr) = run(args);
    assert_eq!(code, Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(!stderr.contains("Serving HTTP"), "{args:?}: {stderr}");
    // Each cause once (a message that holds its cause, chained again).
    for line in stderr.lines() {
        let parts: Vec<&str> = line.split(": ").collect();
        assert!(
            !parts.windows(2).any(|pair| pair[0] == pair[1]),
            "{args:?}: a cause said twice: {line}"
        );
    }
}

#[test]
fn bad_components_are_refused_with_clear_errors() {
    let dir = std::env::temp_dir().join(format!("wasmhive-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("notes.wasm");
    std::fs::write(&text, "just some text").unwrap();
    let core = dir.join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    // The smallest valid component: it exports nothing.
    let empty = dir.join("empty.wasm");
    std::fs::write(&empty, b"\0asm\x0d\0\x01\0").unwrap();

    let serve = |path: &std::path::Path| {
        vec![
            "serve".to_string(),
            "--addr".into(),
            ":0".into(),
            path.display().to_string(),
        ]
    };
    // The Python app starts with 13 MiB of linear memory.
    let mut small = serve(std::path::Path::new(guests::PYTHON_APP.path));
    small.extend(["--max-memory".into(), "4MiB".into()]);
    let cases: [(Vec<String>, &str); 5] = [
        (
            serve(&dir.join("missing.wasm")),
            "missing.wasm: No such file or directory",
        ),
        (serve(&text), "not a WebAssembly component"),
        (serve(&core), "core WebAssembly module"),
        (serve(&empty), "exports no wasi:http handler"),
        (
            small,
            "more than the per-instance limit of 4194304 bytes (raise --max-memory)",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, expected);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_flags_are_refused_with_clear_errors() {
    fails_with(
        &["serve", "--no-such-flag"],
        "unexpected argument '--no-such-flag'",
    );
    fails_with(&["serve", "--request-timeout", "soon"], "is not a duration");
    fails_with(
        &["serve", "--idle-timeout", "5 parsecs"],
        "is not a duration",
    );
    fails_with(&["serve", "--max-memory", "lots"], "is not a size");
    fails_with(&["serve", "--env", "NOVALUE"], "is not KEY=VALUE");
    fails_with(&["serve", "--addr", "localhost"], "is not an address");
    fails_with(&["serve", "--max-instances", "0"], "--max-instances");
    fails_with(
        &["serve", "--prewarm", "9", "--max-instances", "2"],
        "cannot exceed",
    );
}

#[test]
fn a_failure_while_starting_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run(&["serve", "--addr", &addr, guests::HELLO_P2.path]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn wasmtime_serve_flag_names_work_too() {
    let server = Server::start(&[
        guests::COUNTER_P3.path,
        "--max-instance-reuse-count",
        "2",
        "--max-instance-concurrent-reuse-count",
        "1",
        "--idle-instance-timeout",
        "30",
        "--max-concurrent-connections",
        "100",
        // One instance: the second request cannot go to a new one.
        "--max-instances",
        "1",
    ]);
    // Reuse 2: the counter restarts on the third request.
    let mut counts = Vec::new();
    for _ in 0..3 {
        counts.push(get(server.addr, "/").await.2);
    }
    assert_eq!(counts, ["1", "2", "1"]);
    server.finish().await;
}

#[test]
fn help_and_readme_list_the_same_flags() {
    let output = crate::wasmhive()
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    // `  -x, --flag <VALUE>` or `      --flag`: the flags --help documents.
    let in_help: std::collections::BTreeSet<String> = help
        .lines()
        .filter_map(|line| {
            let flag = line.trim_start().split(", ").last()?;
            flag.starts_with("--")
                .then(|| flag.split([' ', '=']).next().unwrap().to_string())
        })
        .filter(|flag| flag != "--help" && flag != "--version")
        .collect();
    // `| `--flag ...` | default | meaning |`: the README's flag table.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let in_readme: std::collections::BTreeSet<String> = readme
        .lines()
        .filter_map(|line| line.strip_prefix("| `--"))
        .map(|rest| format!("--{}", rest.split([' ', '`']).next().unwrap()))
        .collect();
    assert!(in_help.len() > 20, "{in_help:?}");
    assert_eq!(
        in_help, in_readme,
        "serve --help and the README's flag table differ"
    );
    assert!(help.contains("[default: 127.0.0.1:8080]"), "{help}");
}

#[tokio::test]
async fn compiled_components_load_without_compiling() {
    let dir = std::env::temp_dir().join(format!("wasmhive-compile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cwasm, cache) = (dir.join("hello.cwasm"), dir.join("cache"));
    let (code, stderr) = run(&[
        "compile",
        guests::HELLO_P3.path,
        "-o",
        cwasm.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    // What an instance takes is noted for `serve`, which need not measure.
    let notes = std::fs::read_dir(cache.join("wasmhive-footprints")).unwrap();
    assert_eq!(notes.count(), 1);
    // Native code is not loaded without the opt-in.
    fails_with(
        &["serve", "--addr", ":0", cwasm.to_str().unwrap()],
        "load it only with --allow-precompiled",
    );
    let server = Server::start(&[
        cwasm.to_str().unwrap(),
        "--allow-precompiled",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert_eq!(get(server.addr, "/").await.2, "Hello, wasmhive!\n");
    server.finish().await;

    // A damaged precompiled file is refused, not trusted.
    let mut bytes = std::fs::read(&cwasm).unwrap();
    bytes.truncate(bytes.len() / 2);
    let broken = dir.join("broken.cwasm");
    std::fs::write(&broken, bytes).unwrap();
    fails_with(
        &["serve", "--allow-precompiled", broken.to_str().unwrap()],
        "error:",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn compiled_code_is_cached_between_runs() {
    let dir = std::env::temp_dir().join(format!("wasmhive-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = dir.to_str().unwrap();
    // The first start compiles and fills the cache; the second loads from it;
    // with --no-cache it compiles again.
    for (args, cached) in [
        (vec!["--cache-dir", cache], false),
        (vec!["--cache-dir", cache], true),
        (vec!["--no-cache"], false),
    ] {
        let server = Server::start(&[&[guests::HELLO_P2.path][..], &args].concat());
        assert_eq!(get(server.addr, "/").await.2, "Hello, wasmhive!\n");
        let loaded = server
            .wait_for_line("from_cache=", std::time::Duration::from_secs(10))
            .await
            .expect("load logged");
        assert!(
            loaded.contains(&format!("from_cache={cached}")),
            "{args:?}: {loaded}"
        );
        assert!(
            std::fs::read_dir(&dir).unwrap().next().is_some(),
            "cache left empty"
        );
    }
    fails_with(
        &["serve", "--no-cache", "--cache-dir", cache],
        "cannot be used with",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let server = Server::start(&[
        guests::HELLO_P3.path,
        "--log-format",
        "json",
        "--admin-addr",
        ":0",
    ]);
    server
        .wait_for_line("admin endpoint", std::time::Duration::from_secs(10))
        .await
        .unwrap();
    // The address line included.
    for line in server.stderr.lock().unwrap().iter() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(object["level"], "INFO", "{line}");
    }
    // And the error a failed start ends with.
    let (code, stderr) = crate::run(&["serve", "--log-format", "json", "/no/such/app.wasm"]);
    assert_eq!(code, Some(2), "{stderr}");
    let object: serde_json::Value =
        serde_json::from_str(stderr.trim()).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(object["level"], "ERROR", "{stderr}");
    assert!(
        object["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot read"),
        "{stderr}"
    );
    server.finish().await;
}
