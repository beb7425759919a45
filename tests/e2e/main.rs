//! End-to-end tests of the `wasmhive` binary: each starts the real server on
//! 127.0.0.1:0, reads its port from the first line on stderr, and talks to
//! it over loopback.

mod cli;
mod errors;
mod lifecycle;
mod outbound;
mod serving;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn wasmhive() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wasmhive"))
}

/// A running `wasmhive serve`, killed when dropped.
pub struct Server {
    child: Child,
    /// The HTTP address from `Serving HTTP on http://ADDR/`.
    pub addr: SocketAddr,
    /// Every stderr line so far, the first one included.
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `wasmhive serve --addr 127.0.0.1:0 ARGS...` and waits for its
    /// first stderr line.
    pub fn start(args: &[&str]) -> Server {
        let mut child = wasmhive()
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("wasmhive starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        std::thread::spawn({
            let stderr = stderr.clone();
            move || {
                if let Some(Ok(first)) = lines.next() {
                    stderr.lock().unwrap().push(first.clone());
                    let _ = first_tx.send(first);
                }
                for line in lines.map_while(Result::ok) {
                    stderr.lock().unwrap().push(line);
                }
            }
        });
        let first = first_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no stderr line from wasmhive serve {args:?}"));
        let addr = first
            .strip_prefix("Serving HTTP on http://")
            .and_then(|rest| rest.strip_suffix('/'))
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {first:?}"));
        Server {
            child,
            addr,
            stderr,
        }
    }

    /// The admin address, from the log line announcing it.
    pub fn admin_addr(&self) -> SocketAddr {
        let line = self
            .wait_for_line("admin endpoint on http://", Duration::from_secs(10))
            .expect("admin endpoint announced");
        let rest = &line[line.find("http://").unwrap() + "http://".len()..];
        rest[..rest.find('/').unwrap()].parse().unwrap()
    }

    /// The first stderr line containing `needle`, waiting up to `timeout`.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return Some(line.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (e.g. `"TERM"`) to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `timeout` for the server to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server still running");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `wasmhive ARGS...` to completion (within 60 s) and returns its exit
/// code and stderr.
pub fn run(args: &[&str]) -> (Option<i32>, String) {
    let output = wasmhive()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("wasmhive runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A `GET` over loopback: status, headers, body.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, http::HeaderMap, String) {
    let (status, headers, body) =
        wasmhive_tests::http_call(addr, "GET", path, &[], bytes::Bytes::new()).await;
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// The value of a counter or gauge line `name{labels} value` in Prometheus
/// text, or 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}
