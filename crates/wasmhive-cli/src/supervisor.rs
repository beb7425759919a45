//! `--workers N`: N single-threaded `wasmhive serve` processes sharing the
//! port with `SO_REUSEPORT`, under this process as their supervisor.
//!
//! Each worker is this binary run with the same command line and `--workers
//! 1 --reuse-port`, the port made concrete, its share of the global limits
//! (`--max-instances`, `--max-total-memory`, `--max-connections`,
//! `--queue-len`, `--prewarm` and the per-client shares, divided among the
//! workers) and one tokio thread: a connection, its requests and their
//! instances stay on one thread, and a worker's memory decommits interrupt
//! no other core.
//!
//! The supervisor reserves the port (bound, not listening, so it gets no
//! connection) so that `--addr :0` gives every worker the same port;
//! prints the address line once every worker listens; forwards the
//! workers' log lines; passes SIGHUP on (reload) and SIGTERM/SIGINT
//! (drain), exiting 0 once every worker has drained; restarts a worker that
//! exits on its own, up to [`MAX_RESTARTS`] within [`RESTART_WINDOW`]
//! (Akka's restart budget), then drains the others and exits 1. Its admin
//! endpoint sums the workers' `/metrics` (carrying an exited worker's
//! counters over as last scraped) and passes `POST /reload` on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{ChildStderr, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::admin::{self, Reports};
use crate::args::ServeArgs;
use crate::{ExitWith, telemetry};

/// Restarts within [`RESTART_WINDOW`] after which the supervisor gives up.
const MAX_RESTARTS: usize = 5;

/// The window [`MAX_RESTARTS`] counts in.
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// How long a worker's admin endpoint has to answer the supervisor's.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `args.workers` workers until they have drained after a signal.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let _logs = telemetry::init_logging(args.log_format);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(supervise(args))
}

async fn supervise(args: ServeArgs) -> anyhow::Result<()> {
    // Bound, not listening: the port is this process's to share, and no
    // connection is queued to it.
    let reserved = crate::serve::bind(args.addr, true)
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let addr = reserved.local_addr()?;
    let admin_listener = admin::bind(args.admin_addr).await?;
    let count = args.workers as usize;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let workers = Arc::new(Workers {
        command: worker_command(&args, addr)?,
        admin: args.admin_addr.is_some(),
        admins: Mutex::new(vec![None; count]),
        pids: Mutex::new(vec![None; count]),
        draining: AtomicBool::new(false),
        restarts: Mutex::default(),
        restarted: AtomicU64::new(0),
        scraped: Mutex::new(vec![None; count]),
        retired: Mutex::default(),
        events: events_tx,
    });
    // Before the address line: a signal from then on is handled, not fatal.
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut started = Vec::with_capacity(count);
    for index in 0..count {
        match workers.start(index).await {
            Ok(output) => started.push(output),
            Err(failed) => {
                workers.signal_all(rustix::process::Signal::KILL);
                for line in &failed.output {
                    eprintln!("{line}");
                }
                // The worker said why (a bad flag or component: exit 2).
                return Err(ExitWith(failed.status.code().unwrap_or(1) as u8).into());
            }
        }
    }
    // The address line first, as from one server; then the workers' lines.
    telemetry::announce_address(addr, args.tls_cert.is_some());
    if let Some(listener) = admin_listener {
        admin::announce(&listener)?;
        tokio::spawn(admin::serve(workers.clone(), listener));
    }
    tracing::info!(workers = count, "supervising worker processes");
    for output in started {
        tokio::spawn(output.forward());
    }

    // `alive` counts the workers running or being restarted.
    let mut alive = count;
    let mut failure = None;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => workers.signal_all(rustix::process::Signal::HUP),
            Some(event) = events.recv() => match event {
                Event::Exited(index, status) => {
                    workers.exited(index);
                    tokio::spawn(workers.clone().restart(index, status));
                }
                Event::Restarted(Ok(())) => {}
                Event::Restarted(Err(error)) => {
                    alive -= 1;
                    failure = Some(error);
                    break;
                }
            }
        }
    }

    // Drain: every worker drains; a second signal makes them exit at once.
    workers.draining.store(true, Ordering::Relaxed);
    tracing::info!("draining the workers (signal again to exit at once)");
    workers.signal_all(rustix::process::Signal::TERM);
    let mut clean = true;
    while alive > 0 {
        tokio::select! {
            _ = terminate.recv() => workers.signal_all(rustix::process::Signal::TERM),
            _ = interrupt.recv() => workers.signal_all(rustix::process::Signal::TERM),
            Some(event) = events.recv() => match event {
                Event::Exited(index, status) => {
                    alive -= 1;
                    workers.exited(index);
                    if !status.success() {
                        tracing::warn!(worker = index, %status, "worker exited while draining");
                        clean = false;
                    }
                }
                // A restart that ended as the drain began drains too.
                Event::Restarted(Ok(())) => workers.signal_all(rustix::process::Signal::TERM),
                Event::Restarted(Err(_)) => alive -= 1,
            }
        }
    }
    drop(reserved);
    match failure {
        Some(error) => Err(error),
        None if clean => {
            tracing::info!("every worker drained; exiting");
            Ok(())
        }
        None => anyhow::bail!("a worker did not drain cleanly"),
    }
}

/// The address in a worker's admin line.
fn admin_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(admin::ANNOUNCED)? + admin::ANNOUNCED.len()..];
    rest[..rest.find('/')?].parse().ok()
}

/// A worker's command line: the supervisor's own, with the flags it
/// changes appended (a flag's last value wins).
fn worker_command(args: &ServeArgs, addr: SocketAddr) -> anyhow::Result<WorkerCommand> {
    let n = args.workers;
    let share = |total: u32| total.div_ceil(n).to_string();
    let given: Vec<OsString> = std::env::args_os().skip(1).collect();
    // What follows a `--` is positional: the changed flags go before it.
    let split = given
        .iter()
        .position(|arg| arg == "--")
        .unwrap_or(given.len());
    let (mut argv, positional) = (given[..split].to_vec(), given[split..].to_vec());
    let mut set = |flag: &str, value: String| argv.extend([flag.into(), value.into()]);
    set("--workers", "1".into());
    set("--addr", addr.to_string());
    set("--max-instances", share(args.max_instances));
    set("--max-connections", share(args.max_connections));
    set(
        "--queue-len",
        args.queue_len.div_ceil(n as usize).to_string(),
    );
    set("--prewarm", args.prewarm.div_ceil(n as usize).to_string());
    set(
        "--max-total-memory",
        (args.max_total_memory() / u64::from(n)).max(1).to_string(),
    );
    if let Some(per_client) = args.max_connections_per_client {
        set("--max-connections-per-client", share(per_client));
    }
    if let Some(per_client) = args.max_requests_per_client {
        set("--max-requests-per-client", share(per_client));
    }
    if args.admin_addr.is_some() {
        set("--admin-addr", "127.0.0.1:0".into());
    }
    argv.push("--reuse-port".into());
    argv.extend(positional);
    Ok(WorkerCommand {
        program: std::env::current_exe().context("cannot find this program's path")?,
        argv,
    })
}

struct WorkerCommand {
    program: std::path::PathBuf,
    argv: Vec<OsString>,
}

/// The workers, and what the admin endpoint reads of them.
struct Workers {
    command: WorkerCommand,
    /// Each worker's admin address, once it has announced it.
    admins: Mutex<Vec<Option<SocketAddr>>>,
    /// Each running worker's process id.
    pids: Mutex<Vec<Option<u32>>>,
    draining: AtomicBool,
    /// When workers exited on their own lately.
    restarts: Mutex<VecDeque<Instant>>,
    /// Restarts so far.
    restarted: AtomicU64,
    /// Each running worker's metrics as last scraped.
    scraped: Mutex<Vec<Option<String>>>,
    /// What exited workers had counted by their last scrape (counters and
    /// histograms, summed): added to the live workers' so that the summed
    /// counters never go back when a worker is restarted.
    retired: Mutex<String>,
    /// Whether workers have admin endpoints (the supervisor has one).
    admin: bool,
    /// Where workers' exits and restarts are reported.
    events: mpsc::UnboundedSender<Event>,
}

/// What the supervisor hears of its workers.
enum Event {
    /// Worker `index` exited with this status.
    Exited(usize, ExitStatus),
    /// A worker was restarted, or could not be (the budget is spent, or
    /// the server drains).
    Restarted(anyhow::Result<()>),
}

/// A worker that exited before it listened, with what it wrote.
struct StartFailed {
    status: ExitStatus,
    output: Vec<String>,
}

/// A started worker's log, still to forward: the lines it wrote while
/// starting, then the rest.
struct Output {
    early: Vec<String>,
    stderr: BufReader<ChildStderr>,
}

impl Output {
    /// Writes the worker's log lines as this process's own, until it ends.
    async fn forward(mut self) {
        for line in std::mem::take(&mut self.early) {
            eprintln!("{line}");
        }
        while let Some(line) = next_line(&mut self.stderr).await {
            eprintln!("{line}");
        }
    }
}

/// The next line of `stderr`, without its newline; invalid UTF-8 (a
/// guest's output) is replaced, not an error. `None` at the end.
async fn next_line(stderr: &mut BufReader<ChildStderr>) -> Option<String> {
    let mut line = Vec::new();
    match stderr.read_until(b'\n', &mut line).await {
        Ok(0) | Err(_) => None,
        Ok(_) => {
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            Some(String::from_utf8_lossy(&line).into_owned())
        }
    }
}

/// How long a worker has to listen (and announce its admin endpoint).
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl Workers {
    /// Starts worker `index` and waits until it listens (and has said
    /// where its admin endpoint is); reports its exit when it comes, and
    /// returns its log still to forward.
    async fn start(&self, index: usize) -> Result<Output, StartFailed> {
        let mut command = Command::new(&self.command.program);
        command
            .args(&self.command.argv)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            // Signals from a terminal (Ctrl-C) reach the supervisor alone,
            // which passes them on once.
            .process_group(0);
        // SAFETY: between fork and exec the closure only makes one system
        // call, which allocates nothing and takes no lock.
        unsafe {
            // A worker whose supervisor died (SIGKILL, say) drains and ends
            // rather than serving on unsupervised.
            command.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::TERM,
                ))
                .map_err(std::io::Error::from)
            });
        }
        if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
            command.env("TOKIO_WORKER_THREADS", "1");
        }
        let mut child = command.spawn().map_err(|error| StartFailed {
            status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
            output: vec![format!("error: cannot start a worker: {error}")],
        })?;
        let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
        // The address line, then (the next announced line, written before
        // any guest runs) the admin endpoint's.
        let mut early = Vec::new();
        let mut admin = None;
        let listening = async {
            let mut serving = false;
            while let Some(line) = next_line(&mut stderr).await {
                if !serving && line.contains(telemetry::SERVING) {
                    serving = true;
                } else if serving && line.contains(admin::ANNOUNCED) {
                    admin = admin_addr(&line);
                } else {
                    early.push(line);
                }
                if serving && (admin.is_some() || !self.admin) {
                    return true;
                }
            }
            false
        };
        let listening = tokio::time::timeout(START_TIMEOUT, listening).await;
        if listening != Ok(true) {
            if listening.is_err() {
                early.push(format!(
                    "error: the worker did not start within {START_TIMEOUT:?}"
                ));
                let _ = child.start_kill();
            }
            let status = child.wait().await.unwrap_or_default();
            return Err(StartFailed {
                status,
                output: early,
            });
        }
        self.admins.lock().unwrap_or_else(|e| e.into_inner())[index] = admin;
        self.pids.lock().unwrap_or_else(|e| e.into_inner())[index] = child.id();
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = child.wait().await.unwrap_or_default();
            let _ = events.send(Event::Exited(index, status));
        });
        Ok(Output { early, stderr })
    }

    /// Forgets worker `index`, which has exited, but for its counters.
    fn exited(&self, index: usize) {
        self.pids.lock().unwrap_or_else(|e| e.into_inner())[index] = None;
        self.admins.lock().unwrap_or_else(|e| e.into_inner())[index] = None;
        let last = self.scraped.lock().unwrap_or_else(|e| e.into_inner())[index].take();
        if let Some(last) = last {
            let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            *retired = sum_metrics(&[std::mem::take(&mut *retired), cumulative(&last)]);
        }
    }

    /// Restarts worker `index`, which exited with `status`, unless the
    /// restart budget is spent or the server drains; reports how it went.
    async fn restart(self: Arc<Self>, index: usize, status: ExitStatus) {
        let restarted = self.try_restart(index, status).await;
        let _ = self.events.send(Event::Restarted(restarted));
    }

    async fn try_restart(&self, index: usize, mut status: ExitStatus) -> anyhow::Result<()> {
        loop {
            if self.draining.load(Ordering::Relaxed) {
                anyhow::bail!("draining");
            }
            let recent = {
                let mut restarts = self.restarts.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                restarts.retain(|at| now.duration_since(*at) < RESTART_WINDOW);
                restarts.push_back(now);
                restarts.len()
            };
            if recent > MAX_RESTARTS {
                tracing::error!(worker = index, %status, "worker exited; giving up after {MAX_RESTARTS} restarts within {RESTART_WINDOW:?}");
                anyhow::bail!(
                    "worker {index} exited with {status}, {MAX_RESTARTS} restarts within {RESTART_WINDOW:?}"
                );
            }
            self.restarted.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(worker = index, %status, "worker exited; restarting it");
            // Backs off as restarts pile up: 0, 100, 200, ... ms.
            tokio::time::sleep(Duration::from_millis(100) * (recent as u32 - 1)).await;
            match self.start(index).await {
                Ok(output) => {
                    tokio::spawn(output.forward());
                    return Ok(());
                }
                Err(failed) => {
                    for line in &failed.output {
                        eprintln!("{line}");
                    }
                    status = failed.status;
                }
            }
        }
    }

    /// Sends `signal` to every running worker.
    fn signal_all(&self, signal: rustix::process::Signal) {
        for pid in self
            .pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
        {
            if let Some(pid) = rustix::process::Pid::from_raw(*pid as i32) {
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    }

    /// `method path` on every worker's admin endpoint: each one's index and
    /// address, and status and body (or why it did not answer).
    async fn ask_all(
        &self,
        method: &Method,
        path: &str,
    ) -> Vec<(usize, SocketAddr, Result<(StatusCode, String), String>)> {
        let admins: Vec<_> = self
            .admins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .enumerate()
            .filter_map(|(index, admin)| Some((index, (*admin)?)))
            .collect();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<Bytes>>();
        let mut answers = Vec::with_capacity(admins.len());
        for (index, admin) in admins {
            let request = http::Request::builder()
                .method(method.clone())
                .uri(format!("http://{admin}{path}"))
                .body(Empty::new())
                .expect("a valid request");
            let asked = async {
                let response = client.request(request).await.map_err(|e| e.to_string())?;
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((
                    status,
                    String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                ))
            };
            answers.push((
                index,
                admin,
                tokio::time::timeout(ADMIN_TIMEOUT, asked)
                    .await
                    .unwrap_or_else(|_| Err(format!("{admin} did not answer"))),
            ));
        }
        answers
    }
}

impl Reports for Workers {
    fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The workers' metrics summed, after the supervisor's own; counters
    /// include what exited workers had counted by their last scrape.
    async fn metrics(&self) -> String {
        let mut texts = Vec::new();
        for (index, admin, answer) in self.ask_all(&Method::GET, "/metrics").await {
            if let Ok((_, body)) = answer {
                let mut scraped = self.scraped.lock().unwrap_or_else(|e| e.into_inner());
                // A worker that exited meanwhile has been retired already
                // (and its successor has an admin address of its own).
                if self.admins.lock().unwrap_or_else(|e| e.into_inner())[index] == Some(admin) {
                    scraped[index] = Some(body.clone());
                }
                texts.push(body);
            }
        }
        texts.push(
            self.retired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        );
        let live = self
            .pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .count();
        let restarts = self.restarted.load(Ordering::Relaxed);
        let own = format!(
            "# HELP wasmhive_workers Worker processes running.\n\
             # TYPE wasmhive_workers gauge\nwasmhive_workers {live}\n\
             # HELP wasmhive_worker_restarts_total Workers restarted after exiting on their own.\n\
             # TYPE wasmhive_worker_restarts_total counter\nwasmhive_worker_restarts_total {restarts}\n"
        );
        own + &sum_metrics(&texts)
    }

    /// Every worker reloads; the first refusal is the answer.
    async fn reload(&self) -> Result<String, String> {
        let answers = self.ask_all(&Method::POST, "/reload").await;
        let failed = answers.iter().find_map(|(_, _, answer)| match answer {
            Ok((StatusCode::OK, _)) => None,
            Ok((_, body)) => Some(body.clone()),
            Err(error) => Some(format!("{error}\n")),
        });
        match failed {
            None => Ok(format!("reloaded {} workers\n", answers.len())),
            Some(why) => Err(why),
        }
    }
}

/// Prometheus texts added up: each sample the sum of its series over the
/// texts (counters, gauges and histogram buckets alike), comments once, in
/// the order they first appear.
fn sum_metrics(texts: &[String]) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut sums: HashMap<&str, f64> = HashMap::new();
    for text in texts {
        for line in text.lines() {
            if line.starts_with('#') {
                if seen.insert(line) {
                    order.push(line);
                }
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if seen.insert(series) {
                order.push(series);
            }
            *sums.entry(series).or_default() += value;
        }
    }
    let mut out = String::new();
    for key in order {
        match sums.get(key) {
            Some(sum) => out.push_str(&format!("{key} {sum}\n")),
            None => out.push_str(&format!("{key}\n")),
        }
    }
    out
}

/// The samples of a Prometheus text's counters and histograms, which only
/// ever grow while a process lives (gauges are dropped).
fn cumulative(text: &str) -> String {
    let families: HashSet<&str> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("# TYPE ")?.split(' ');
            let family = words.next()?;
            matches!(words.next()?, "counter" | "histogram").then_some(family)
        })
        .collect();
    let mut kept = String::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|family| families.contains(family))
            .unwrap_or(name);
        if families.contains(family) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_workers_add_up_series_by_series() {
        let a = "# TYPE x counter\nx{app=\"a\"} 2\nx{app=\"b\"} 1\nh_bucket{le=\"+Inf\"} 3\n";
        let b = "# TYPE x counter\nx{app=\"a\"} 5\nh_bucket{le=\"+Inf\"} 4\ny 0.5\n";
        assert_eq!(
            sum_metrics(&[a.into(), b.into()]),
            "# TYPE x counter\nx{app=\"a\"} 7\nx{app=\"b\"} 1\nh_bucket{le=\"+Inf\"} 7\ny 0.5\n"
        );
    }

    #[test]
    fn an_exited_worker_leaves_its_counters_and_histograms_not_its_gauges() {
        let text = "# TYPE x counter\nx{app=\"a\"} 2\n# TYPE g gauge\ng 3\n\
                    # TYPE h histogram\nh_bucket{le=\"+Inf\"} 4\nh_sum 0.5\nh_count 4\n\
                    # TYPE g_count gauge\ng_count 1\n";
        assert_eq!(
            cumulative(text),
            "x{app=\"a\"} 2\nh_bucket{le=\"+Inf\"} 4\nh_sum 0.5\nh_count 4\n"
        );
    }
}
