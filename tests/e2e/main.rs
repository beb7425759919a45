//! End-to-end tests of the `wasmhive` binary: each starts the real server on
//! 127.0.0.1:0, reads its port from the first line on stderr, and talks to
//! it over loopback.

mod balancer;
mod cli;
mod deploy;
mod errors;
mod fair_share;
mod faults;
mod hostile;
mod isolation;
mod lifecycle;
mod manifest;
mod memory;
mod outbound;
mod overload;
mod real_apps;
mod reload;
mod serving;
mod tls;
mod workers;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Held by the tests that load the machine (hundreds of clients, storms,
/// open-loop overload), so that they run one at a time rather than
/// measuring each other on CI's two cores.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The binary under test.
pub fn wasmhive() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wasmhive"))
}

/// Writes raw bytes on a fresh connection to `server` and returns what it
/// says up to the end of its answer's head, or until it closes (within
/// 10 s).
pub async fn raw_exchange(server: &Server, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while !reply.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.expect("an answer within 10 s");
    String::from_utf8_lossy(&reply).into_owned()
}

/// A running `wasmhive serve`. [`Server::finish`] shuts it down as a user
/// would; dropping it does the same (blocking), so that every test fails
/// on a server that exits non-zero or panics, unless the test is already
/// failing (then it is killed).
pub struct Server {
    child: Child,
    /// The address from `Serving HTTP on http://ADDR/` (or `HTTPS`).
    pub addr: SocketAddr,
    /// Every stderr line so far, the first one included.
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// Reads stderr into `stderr` until the server exits.
    reader: Option<std::thread::JoinHandle<()>>,
    /// Lets the reader go on past the first line (see
    /// [`Server::start_with_stderr_held`]).
    release_stderr: Option<std::sync::mpsc::Sender<()>>,
}

/// How [`Server::launch`] starts a server, besides its arguments.
struct Launch<'a> {
    /// `--addr`.
    addr: &'a str,
    stdout: Stdio,
    /// Added to the server's environment.
    env: &'a [(&'a str, &'a str)],
    /// Run on a thread of its own with the process id once spawned.
    meanwhile: Box<dyn FnOnce(u32) + Send>,
    /// Read no stderr past the first line until the server exits.
    hold_stderr: bool,
}

impl Default for Launch<'_> {
    /// As [`Server::start`]: any free port, stdout discarded.
    fn default() -> Self {
        Launch {
            addr: "127.0.0.1:0",
            stdout: Stdio::null(),
            env: &[],
            meanwhile: Box::new(|_| {}),
            hold_stderr: false,
        }
    }
}

impl Server {
    /// Starts `wasmhive serve --addr 127.0.0.1:0 ARGS...` and waits for its
    /// first stderr line.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_stdout(args, Stdio::null())
    }

    /// [`Server::start`] with the server's stdout going to `stdout` (a pipe
    /// nobody reads, say).
    pub fn start_with_stdout(args: &[&str], stdout: Stdio) -> Server {
        Server::start_at("127.0.0.1:0", args, stdout)
    }

    /// [`Server::start`] listening on `addr`.
    pub fn start_at(addr: &str, args: &[&str], stdout: Stdio) -> Server {
        Server::launch(
            args,
            Launch {
                addr,
                stdout,
                ..Launch::default()
            },
        )
    }

    /// [`Server::start`] with `env` added to the server's environment.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::launch(
            args,
            Launch {
                env,
                ..Launch::default()
            },
        )
    }

    /// [`Server::start`], reading no stderr past the first line until the
    /// server exits: its stderr is a pipe nobody reads, full after 64 KiB.
    pub fn start_with_stderr_held(args: &[&str]) -> Server {
        Server::launch(
            args,
            Launch {
                hold_stderr: true,
                ..Launch::default()
            },
        )
    }

    /// [`Server::start`], running `meanwhile` on a thread of its own with
    /// the process id as soon as the process is spawned (to signal it
    /// while it starts, say).
    pub fn start_meanwhile(args: &[&str], meanwhile: impl FnOnce(u32) + Send + 'static) -> Server {
        Server::launch(
            args,
            Launch {
                meanwhile: Box::new(meanwhile),
                ..Launch::default()
            },
        )
    }

    fn launch(args: &[&str], launch: Launch<'_>) -> Server {
        let Launch {
            addr,
            stdout,
            env,
            meanwhile,
            hold_stderr,
        } = launch;
        let mut child = wasmhive()
            .args(["serve", "--addr", addr])
            .args(args)
            .envs(env.iter().copied())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("wasmhive starts");
        let pid = child.id();
        std::thread::spawn(move || meanwhile(pid));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let (release_stderr, held) = std::sync::mpsc::channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let reader = std::thread::spawn({
            let stderr = stderr.clone();
            move || {
                if let Some(Ok(first)) = lines.next() {
                    stderr.lock().unwrap().push(first.clone());
                    let _ = first_tx.send(first);
                }
                if hold_stderr {
                    let _ = held.recv();
                }
                for line in lines.map_while(Result::ok) {
                    stderr.lock().unwrap().push(line);
                }
            }
        });
        let first = first_rx.recv_timeout(Duration::from_secs(60));
        // `Serving HTTP on http://ADDR/` (or HTTPS on https://), the whole
        // line or (with `--log-format json`) the message of a JSON line.
        let addr = first.as_ref().ok().and_then(|first| {
            let rest = &first[first.find("Serving HTTP")?..];
            let rest = &rest[rest.find("://")? + 3..];
            rest[..rest.find('/')?].parse().ok()
        });
        let Some(addr) = addr else {
            // Do not leave the server running behind a failed test.
            let _ = child.kill();
            let _ = child.wait();
            panic!("wasmhive serve {args:?}: unexpected first stderr line: {first:?}");
        };
        Server {
            child,
            addr,
            stderr,
            reader: Some(reader),
            release_stderr: Some(release_stderr),
        }
    }

    /// Shuts the server down as a user would (SIGTERM: drain, then exit)
    /// and checks that it exited 0 without a panic; returns its stderr.
    pub async fn finish(mut self) -> String {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(60)).await;
        self.checked_output(status)
    }

    /// The server's whole stderr once it has exited with `status`, checked:
    /// exit 0, and no panic of the server's own (guest output, prefixed
    /// `[stdout ` or `[stderr `, may report a guest's panic).
    fn checked_output(&mut self, status: ExitStatus) -> String {
        // The pipe is closed: the reader ends once it has every line.
        self.release_stderr.take();
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        let output = self.stderr.lock().unwrap().join("\n");
        assert!(
            status.success(),
            "the server exited with {status}:\n{output}"
        );
        let panicked = output
            .lines()
            .any(|line| line.contains("panicked") && !line.starts_with("[std"));
        assert!(!panicked, "the server panicked:\n{output}");
        output
    }

    /// The admin address, from the log line announcing it.
    pub async fn admin_addr(&self) -> SocketAddr {
        let line = self
            .wait_for_line("admin endpoint on http://", Duration::from_secs(10))
            .await
            .expect("admin endpoint announced");
        let rest = &line[line.find("http://").unwrap() + "http://".len()..];
        rest[..rest.find('/').unwrap()].parse().unwrap()
    }

    /// The first stderr line containing `needle`, waiting up to `timeout`.
    pub async fn wait_for_line(&self, needle: &str, timeout: Duration) -> Option<String> {
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
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many stderr lines so far contain `needle`.
    pub fn lines_containing(&self, needle: &str) -> usize {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The server's resident set size, in bytes.
    pub fn rss(&self) -> u64 {
        self.memory_status("VmRSS")
    }

    /// The highest resident set size the server has had, in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.memory_status("VmHWM")
    }

    /// A size field (`VmRSS`, `VmHWM`) of `/proc/PID/status`, in bytes.
    fn memory_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server is running");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
        kib * 1024
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// Stops the server with SIGTERM and returns how it exited, without
    /// looking for panics in its output: for a test whose guest writes
    /// unprefixed output that may say `panicked`.
    pub async fn stop_without_output_check(self) -> ExitStatus {
        self.stopped_by("TERM").await
    }

    /// Kills the server with SIGKILL, as a crash or the OOM killer would,
    /// and returns how it exited (its output is not checked).
    pub async fn kill(self) -> ExitStatus {
        self.stopped_by("KILL").await
    }

    /// Sends `signal` and returns how the server exited, once its output
    /// is all read (and not checked).
    async fn stopped_by(mut self, signal: &str) -> ExitStatus {
        self.signal(signal);
        let status = self.wait_exit(Duration::from_secs(60)).await;
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        status
    }

    /// Waits up to `timeout` for the server to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server is still running after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits, blocking, for the server to exit; kills it if it is still
    /// running after `timeout` (and panics then). For `Drop`, which cannot
    /// await.
    fn wait_exit_blocking(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        let (exited, watch) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            // Only a timeout is a hang: a dropped sender means `wait`
            // failed, which panics on its own.
            let hung = matches!(
                watch.recv_timeout(timeout),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if hung {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
            hung
        });
        let status = self.child.wait().unwrap();
        let _ = exited.send(());
        assert!(
            !watchdog.join().unwrap(),
            "the server was still running after {timeout:?}: killed"
        );
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() || self.reader.is_none() {
            // Failing already, or finished: just make sure it is gone.
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        }
        let status = match self.child.try_wait() {
            // The test stopped it itself: its output is checked all the same.
            Ok(Some(status)) => status,
            _ => {
                self.signal("TERM");
                self.wait_exit_blocking(Duration::from_secs(60))
            }
        };
        self.checked_output(status);
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

/// Reads the admin endpoint's `/metrics` until `series` equals `value`;
/// fails the test if it does not within `timeout`.
pub async fn wait_for_metric(admin: SocketAddr, series: &str, value: f64, timeout: Duration) {
    wait_until_metric(admin, series, |seen| seen == value, timeout).await;
}

/// Reads the admin endpoint's `/metrics` until `series` satisfies `done`,
/// and returns that value; fails the test (with the last value seen) if it
/// does not within `timeout`.
pub async fn wait_until_metric(
    admin: SocketAddr,
    series: &str,
    done: impl Fn(f64) -> bool,
    timeout: Duration,
) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, _, text) = get(admin, "/metrics").await;
        let seen = metric(&text, series);
        if done(seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{series} still {seen} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request on a connection of its own that reports failures instead of
/// panicking: the status and headers, and the body or why reading it
/// failed. `Err` when no response head arrived.
pub async fn try_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: bytes::Bytes,
) -> Result<(u16, http::HeaderMap, Result<bytes::Bytes, String>), String> {
    use http_body_util::BodyExt as _;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Full::new(body))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    let body = response
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .map_err(|e| format!("body: {e}"));
    Ok((status, headers, body))
}

/// Clients sending `GET path` back to back on `connections` connections
/// until stopped, counting the answers by status.
pub struct Bystander {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Result<u16, String>>>>,
}

impl Bystander {
    pub fn start(addr: SocketAddr, path: &'static str, connections: usize) -> Bystander {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..connections)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        seen.push(
                            try_call(addr, "GET", path, bytes::Bytes::new())
                                .await
                                .and_then(|(status, _, body)| body.map(|_| status)),
                        );
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    seen
                })
            })
            .collect();
        Bystander { stop, tasks }
    }

    /// Stops the clients; returns every outcome they saw.
    pub async fn stop(self) -> Vec<Result<u16, String>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut seen = Vec::new();
        for task in self.tasks {
            seen.extend(task.await.unwrap());
        }
        seen
    }
}
