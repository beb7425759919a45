//! `crates/wasmhive/examples/embed.rs` runs and serves a component.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use bytes::Bytes;
use wasmhive_tests::{guests, http_call};

#[tokio::test]
async fn embed_example_serves_a_component() {
    // `cargo test` builds the examples of the workspace next to the tests.
    let examples = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples");
    let binary = examples.join(format!("embed{}", std::env::consts::EXE_SUFFIX));
    assert!(binary.exists(), "{} not built", binary.display());
    let mut child = Command::new(&binary)
        .arg(guests::HELLO_P3.path)
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .spawn()
        .expect("example starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|a| {
            a.trim_start_matches("http://")
                .trim_end_matches('/')
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let (status, _, body) = http_call(addr, "GET", "/", &[], Bytes::new()).await;
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(status, 200);
    assert_eq!(body, "Hello, wasmhive!\n");
}
