//! The servers under test, each started as its own process on 127.0.0.1
//! with a free port, and what can be read of them from `/proc`.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// Which server.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerKind {
    /// `wasmhive serve`.
    Wasmhive,
    /// `wasmtime serve -Scli`.
    Wasmtime,
    /// The native hyper server of [`crate::native`]: the same answers
    /// without wasm, the ceiling.
    Native,
}

impl ServerKind {
    /// The label used in tables and charts.
    pub fn label(self) -> &'static str {
        match self {
            ServerKind::Wasmhive => "wasmhive",
            ServerKind::Wasmtime => "wasmtime serve",
            ServerKind::Native => "native hyper",
        }
    }
}

/// Where the server binaries are.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `wasmhive`.
    pub wasmhive: PathBuf,
    /// `wasmtime`, when found.
    pub wasmtime: Option<PathBuf>,
    /// This harness, which runs the native server as a subcommand.
    pub harness: PathBuf,
}

/// Instance policy flags, given to both wasm servers in their own words.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// Requests per instance (`--max-reuse` / `--max-instance-reuse-count`).
    pub reuse: Option<u32>,
    /// Concurrent requests per instance.
    pub concurrency: Option<u32>,
    /// Idle timeout, in seconds.
    pub idle_timeout_secs: Option<u32>,
    /// Instances alive at once: wasmhive's `--max-instances` (which sizes
    /// its pool from the component), and for `wasmtime serve` a pooling
    /// allocator with room for as many, with the allowance per instance of
    /// [`WASMTIME_POOL_PER_INSTANCE`].
    pub max_instances: Option<u32>,
    /// Extra `wasmhive serve` flags with no wasmtime equivalent.
    pub wasmhive_extra: Vec<String>,
    /// Serve the component precompiled by the server's own `compile`
    /// command (see [`precompile`]), with `--allow-precompiled`.
    pub precompiled: bool,
    /// wasmhive only: `--workers N`, N single-threaded worker processes on
    /// one port under a supervisor; below 2, one process with the default
    /// runtime. `wasmtime serve` has no equivalent and runs as one process.
    pub workers: usize,
}

/// What `wasmtime serve`'s pool is given per instance when
/// [`Settings::max_instances`] is set: core instances, memories, tables
/// (a std guest with the WASI adapter has two or three of each).
const WASMTIME_POOL_PER_INSTANCE: [(&str, u32); 3] = [
    ("pooling-total-core-instances", 8),
    ("pooling-total-memories", 4),
    ("pooling-total-tables", 4),
];

/// Precompiles `component` with `kind`'s own `compile` command (a `.cwasm`
/// is specific to the wasmtime version that made it) into the system's
/// temporary directory; returns the `.cwasm`. The native server has no
/// component: `component` comes back as it is.
pub fn precompile(
    kind: ServerKind,
    binaries: &Binaries,
    component: &Path,
) -> anyhow::Result<PathBuf> {
    let program = match kind {
        ServerKind::Wasmhive => binaries.wasmhive.clone(),
        ServerKind::Wasmtime => binaries.wasmtime.clone().context("no wasmtime binary")?,
        ServerKind::Native => return Ok(component.to_path_buf()),
    };
    let stem = component.file_stem().unwrap_or_default().to_string_lossy();
    let output = std::env::temp_dir().join(format!(
        "wasmhive-bench-{}-{stem}-{}.cwasm",
        std::process::id(),
        kind.label().replace(' ', "-")
    ));
    let status = Command::new(&program)
        .arg("compile")
        .arg(component)
        .arg("-o")
        .arg(&output)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {} compile", program.display()))?;
    if !status.success() {
        bail!(
            "{} compile {} failed: {status}",
            kind.label(),
            component.display()
        );
    }
    Ok(output)
}

/// A server process (and its workers, if it has some), killed when
/// dropped.
pub struct Running {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// From spawn to its `Serving HTTP on` line.
    pub ready_after: Duration,
}

impl Running {
    /// Starts `kind` serving `component` (ignored by the native server).
    pub fn start(
        kind: ServerKind,
        binaries: &Binaries,
        component: &Path,
        settings: &Settings,
    ) -> anyhow::Result<Running> {
        let spawned = Instant::now();
        let command = command(kind, binaries, component, settings, "127.0.0.1:0")?;
        let (child, addr) = listening(command, kind)?;
        Ok(Running {
            child,
            addr,
            ready_after: spawned.elapsed(),
        })
    }

    /// The process ids: the server's, then its workers' if it has some.
    pub fn pids(&self) -> Vec<u32> {
        let pid = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        std::iter::once(pid)
            .chain(
                children
                    .split_whitespace()
                    .filter_map(|child| child.parse().ok()),
            )
            .collect()
    }

    /// Resident memory, in bytes, of all its processes.
    pub fn rss(&self) -> u64 {
        self.pids()
            .into_iter()
            .map(|pid| memory_of(pid, "VmRSS").unwrap_or(0))
            .sum()
    }

    /// The highest resident memory each of its processes has had, in bytes,
    /// summed.
    pub fn peak_rss(&self) -> u64 {
        self.pids()
            .into_iter()
            .map(|pid| memory_of(pid, "VmHWM").unwrap_or(0))
            .sum()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Workers end with their supervisor (their parent-death signal).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command line of `kind` serving `component` on `addr`.
fn command(
    kind: ServerKind,
    binaries: &Binaries,
    component: &Path,
    settings: &Settings,
    addr: &str,
) -> anyhow::Result<Command> {
    let mut command = match kind {
        ServerKind::Wasmhive => {
            let mut c = Command::new(&binaries.wasmhive);
            c.args(["serve", "--addr", addr, "--no-logging-prefix"]);
            if let Some(n) = settings.reuse {
                c.arg("--max-reuse").arg(n.to_string());
            }
            if let Some(n) = settings.concurrency {
                c.arg("--max-concurrent-per-instance").arg(n.to_string());
            }
            if let Some(s) = settings.idle_timeout_secs {
                c.arg("--idle-timeout").arg(format!("{s}s"));
            }
            if settings.precompiled {
                c.arg("--allow-precompiled");
            }
            if settings.workers > 1 {
                c.arg("--workers").arg(settings.workers.to_string());
            }
            if let Some(n) = settings.max_instances {
                c.arg("--max-instances").arg(n.to_string());
            }
            c.args(&settings.wasmhive_extra).arg(component);
            c.env("RUST_LOG", "warn");
            c
        }
        ServerKind::Wasmtime => {
            let Some(wasmtime) = &binaries.wasmtime else {
                bail!("no wasmtime binary");
            };
            let mut c = Command::new(wasmtime);
            c.args(["serve", "-Scli", "--addr", addr, "--no-logging-prefix"]);
            if let Some(n) = settings.reuse {
                c.arg("--max-instance-reuse-count").arg(n.to_string());
            }
            if let Some(n) = settings.concurrency {
                c.arg("--max-instance-concurrent-reuse-count")
                    .arg(n.to_string());
            }
            if let Some(s) = settings.idle_timeout_secs {
                c.arg("--idle-instance-timeout").arg(format!("{s}s"));
            }
            if let Some(n) = settings.max_instances {
                c.arg("-O")
                    .arg(format!("pooling-total-component-instances={n}"));
                c.arg("-O").arg(format!("pooling-total-stacks={n}"));
                for (option, per_instance) in WASMTIME_POOL_PER_INSTANCE {
                    c.arg("-O").arg(format!("{option}={}", n * per_instance));
                }
            }
            if settings.precompiled {
                c.arg("--allow-precompiled");
            }
            c.arg(component);
            c
        }
        ServerKind::Native => {
            let mut c = Command::new(&binaries.harness);
            c.args(["native-server", "--addr", addr]);
            c
        }
    };
    // Servers run as they would in production: without the harness's own
    // debugging aids. With RUST_BACKTRACE set, wasmtime captures a
    // backtrace for every error it makes internally, even handled ones (e.g.
    // each time a store with a suspended fiber is dropped), which costs
    // every server alike but measures the shell, not the server.
    command
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    Ok(command)
}

/// Spawns `command` and waits for its `Serving HTTP on` line.
fn listening(mut command: Command, kind: ServerKind) -> anyhow::Result<(Child, SocketAddr)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", kind.label()))?;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.by_ref().map_while(Result::ok) {
            if let Some(addr) = line
                .strip_prefix("Serving HTTP on http://")
                .and_then(|rest| rest.trim_end_matches('/').parse::<SocketAddr>().ok())
            {
                let _ = tx.send(addr);
                break;
            }
        }
        // Keep draining so the server never blocks on a full pipe.
        for _ in lines.map_while(Result::ok) {}
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(addr) => Ok((child, addr)),
        Err(_) => {
            let _ = child.kill();
            bail!("{} did not start listening", kind.label());
        }
    }
}

/// Resident memory of `pid`, from `/proc/PID/status`.
pub fn rss_of(pid: u32) -> Option<u64> {
    memory_of(pid, "VmRSS")
}

/// A size `field` of `/proc/PID/status` (`VmRSS`, `VmHWM`), in bytes.
fn memory_of(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system) used so far by `pid`, or by this process for
/// `None`, from `/proc/PID/stat` (clock ticks of 10 ms, Linux's USER_HZ).
pub fn cpu_time(pid: Option<u32>) -> Duration {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let Ok(stat) = std::fs::read_to_string(path) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// Cores on this machine.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
