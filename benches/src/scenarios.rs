//! The scenarios, and the runner that plays each against every server,
//! fresh, in alternating order over several rounds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use wasmhive_guests::Guest;

use crate::load::{self, Target};
use crate::servers::{Binaries, Running, ServerKind, Settings};

/// How a scenario loads the server.
#[derive(Clone, Debug)]
pub enum Load {
    /// Closed loop on `path`, with a body of `body` bytes (POST) or none.
    Closed {
        /// Path and query.
        path: &'static str,
        /// Request body size; 0 sends GET.
        body: usize,
        /// Connections, or the run's default.
        connections: Option<usize>,
    },
    /// Capacity by closed loop, then an open loop at 4x it.
    Overload {
        /// Path and query.
        path: &'static str,
    },
    /// Process start to first 200, and the first request's latency.
    ColdStart,
    /// RSS with idle instances (counts from the run's options).
    Memory,
}

/// One scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Its name on the command line and in tables.
    pub name: &'static str,
    /// The component (the native server answers alike without it).
    pub guest: Guest,
    /// How it loads the server.
    pub load: Load,
    /// Named instance settings to run with: `defaults` (each server's own)
    /// and, where they differ, `matched` (the same for both wasm servers).
    pub variants: Vec<(&'static str, Settings)>,
    /// Whether the native server takes part.
    pub native: bool,
}

/// Every scenario, in order.
pub fn all() -> Vec<Scenario> {
    use wasmhive_guests as g;
    let defaults = || ("defaults", Settings::default());
    let precompiled = || {
        (
            "precompiled",
            Settings {
                precompiled: true,
                ..Settings::default()
            },
        )
    };
    // One single-threaded wasmhive worker process per core on one port
    // (`--workers N`), as `settings` otherwise.
    let per_core = |name, settings: Settings| {
        (
            name,
            Settings {
                workers: crate::servers::cores(),
                ..settings
            },
        )
    };
    let closed = |path, body| Load::Closed {
        path,
        body,
        connections: None,
    };
    vec![
        Scenario {
            name: "hello-p2",
            guest: g::HELLO_P2,
            load: closed("/", 0),
            variants: vec![
                defaults(),
                (
                    "reuse-128",
                    Settings {
                        reuse: Some(128),
                        ..Settings::default()
                    },
                ),
                per_core("per-core", Settings::default()),
                per_core(
                    "reuse-128-per-core",
                    Settings {
                        reuse: Some(128),
                        ..Settings::default()
                    },
                ),
            ],
            native: true,
        },
        real_app("hello-py", g::PYTHON_APP),
        real_app("hello-js", g::JS_APP),
        Scenario {
            name: "hello-p3",
            guest: g::HELLO_P3,
            load: closed("/", 0),
            variants: vec![defaults(), per_core("per-core", Settings::default())],
            native: true,
        },
        Scenario {
            name: "echo-64k",
            guest: g::ECHO_P3,
            load: closed("/", 64 * 1024),
            variants: vec![defaults()],
            native: true,
        },
        Scenario {
            name: "cpu",
            guest: g::CPU_P3,
            load: closed("/?iters=1000000", 0),
            variants: vec![
                defaults(),
                (
                    "concurrency-1",
                    Settings {
                        concurrency: Some(1),
                        ..Settings::default()
                    },
                ),
            ],
            native: true,
        },
        Scenario {
            name: "sleep-io",
            guest: g::SLEEP_P3,
            load: Load::Closed {
                path: "/?ms=100",
                body: 0,
                connections: Some(256),
            },
            variants: vec![defaults()],
            native: true,
        },
        Scenario {
            name: "overload",
            guest: g::CPU_P3,
            load: Load::Overload {
                path: "/?iters=1000000",
            },
            variants: vec![
                defaults(),
                (
                    "short-queue",
                    Settings {
                        wasmhive_extra: vec!["--queue-timeout".into(), "20ms".into()],
                        ..Settings::default()
                    },
                ),
                (
                    "adaptive",
                    Settings {
                        wasmhive_extra: vec!["--adaptive-concurrency".into()],
                        ..Settings::default()
                    },
                ),
            ],
            native: false,
        },
        Scenario {
            name: "cold-start",
            guest: g::HELLO_P3,
            load: Load::ColdStart,
            variants: vec![defaults(), precompiled()],
            native: true,
        },
        Scenario {
            name: "cold-start-py",
            guest: g::PYTHON_APP,
            load: Load::ColdStart,
            variants: vec![defaults(), precompiled()],
            native: false,
        },
        Scenario {
            name: "memory",
            guest: g::SLEEP_P3,
            load: Load::Memory,
            variants: vec![(
                "concurrency-1",
                Settings {
                    concurrency: Some(1),
                    idle_timeout_secs: Some(300),
                    max_instances: Some(1200),
                    ..Settings::default()
                },
            )],
            native: false,
        },
    ]
}

/// A Python or JavaScript app's hello route at 100 connections, with a
/// fresh instance per request (both servers' default for p2) and with
/// instances reused 100 times.
fn real_app(name: &'static str, guest: Guest) -> Scenario {
    Scenario {
        name,
        guest,
        load: Load::Closed {
            path: "/",
            body: 0,
            connections: Some(100),
        },
        variants: vec![
            ("defaults", Settings::default()),
            (
                "reuse-100",
                Settings {
                    reuse: Some(100),
                    ..Settings::default()
                },
            ),
        ],
        native: false,
    }
}

/// How long and how hard.
#[derive(Clone, Debug)]
pub struct Options {
    /// Rounds over all servers.
    pub rounds: usize,
    /// Measured time per run.
    pub duration: Duration,
    /// Unmeasured load before each run.
    pub warmup: Duration,
    /// Closed-loop connections, unless the scenario says otherwise.
    pub connections: usize,
    /// Idle instance counts of the memory scenario.
    pub memory_instances: Vec<usize>,
}

/// One server's result in one round of one scenario variant.
#[derive(Clone, Debug, Serialize)]
pub struct RoundResult {
    /// Scenario name.
    pub scenario: &'static str,
    /// Variant name.
    pub variant: &'static str,
    /// Server.
    pub server: ServerKind,
    /// Round number.
    pub round: usize,
    /// Named figures: `rps`, `p50_ms`, `p99_ms`, `client_cpu`, ... as the
    /// scenario defines.
    pub figures: BTreeMap<String, f64>,
    /// Answers by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that failed without a status.
    pub errors: u64,
}

/// Runs one scenario variant against one server, fresh.
pub async fn run_one(
    scenario: &Scenario,
    settings: &Settings,
    server: ServerKind,
    binaries: &Binaries,
    options: &Options,
) -> anyhow::Result<(BTreeMap<String, f64>, BTreeMap<u16, u64>, u64)> {
    let component = std::path::Path::new(scenario.guest.path);
    let precompiled;
    let component = if settings.precompiled {
        precompiled = crate::servers::precompile(server, binaries, component)?;
        precompiled.as_path()
    } else {
        component
    };
    let spawned = Instant::now();
    let running = Running::start(server, binaries, component, settings)?;
    let mut figures = BTreeMap::new();
    match &scenario.load {
        Load::Closed {
            path,
            body,
            connections,
        } => {
            let target = Target {
                addr: running.addr,
                path: path.to_string(),
                body: (*body > 0).then(|| Bytes::from(vec![b'x'; *body])),
            };
            let connections = connections.unwrap_or(options.connections);
            load::closed_loop(&target, connections, options.warmup, &running.pids()).await;
            let m =
                load::closed_loop(&target, connections, options.duration, &running.pids()).await;
            throughput_figures(&mut figures, &m);
            figures.insert("peak_rss_mib".into(), mib(running.peak_rss()));
            return Ok((figures, m.statuses, m.errors));
        }
        Load::Overload { path } => {
            let target = Target {
                addr: running.addr,
                path: path.to_string(),
                body: None,
            };
            let unloaded = load::closed_loop(&target, 1, options.warmup, &running.pids()).await;
            let capacity = load::closed_loop(
                &target,
                options.connections,
                options.duration,
                &running.pids(),
            )
            .await;
            // Let the instances the capacity run left behind settle.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let offered = 4.0 * capacity.ok_rate().max(10.0);
            // The onset of an overload (the queue telling it from clients
            // taking turns) is reported apart: the first fifth of the run.
            let settle = options.duration / 5;
            let load::OpenLoop { all: m, settled } = load::open_loop(
                &target,
                offered,
                options.duration,
                settle,
                16_384,
                &running.pids(),
            )
            .await;
            let answered: u64 = m.statuses.values().sum();
            figures.insert("unloaded_p50_ms".into(), unloaded.ok_ms(50.0));
            figures.insert("unloaded_p99_ms".into(), unloaded.ok_ms(99.0));
            figures.insert("capacity_rps".into(), capacity.ok_rate());
            figures.insert("offered_rps".into(), offered);
            figures.insert("admitted_rps".into(), m.ok_rate());
            figures.insert("admitted_p99_ms".into(), m.ok_ms(99.0));
            figures.insert(
                "shed_share".into(),
                m.shed.len() as f64 / answered.max(1) as f64,
            );
            figures.insert("shed_p99_ms".into(), load::percentile_ms(&m.shed, 99.0));
            figures.insert("settled_admitted_p50_ms".into(), settled.ok_ms(50.0));
            figures.insert("settled_admitted_p90_ms".into(), settled.ok_ms(90.0));
            figures.insert("settled_admitted_p99_ms".into(), settled.ok_ms(99.0));
            // The same, without the load generator's own lateness.
            figures.insert(
                "settled_admitted_from_send_p50_ms".into(),
                load::percentile_ms(&settled.ok_from_send, 50.0),
            );
            figures.insert(
                "settled_admitted_from_send_p99_ms".into(),
                load::percentile_ms(&settled.ok_from_send, 99.0),
            );
            figures.insert(
                "settled_shed_p99_ms".into(),
                load::percentile_ms(&settled.shed, 99.0),
            );
            figures.insert("client_cpu".into(), m.client_cpu);
            figures.insert("not_sent".into(), m.not_sent as f64);
            return Ok((figures, m.statuses, m.errors));
        }
        Load::ColdStart => {
            let first = load::first_ok(running.addr, "/", Duration::from_secs(60))
                .await
                .ok_or_else(|| anyhow::anyhow!("no 200 within 60 s"))?;
            figures.insert(
                "start_to_first_ok_ms".into(),
                spawned.elapsed().as_secs_f64() * 1000.0,
            );
            figures.insert(
                "listening_ms".into(),
                running.ready_after.as_secs_f64() * 1000.0,
            );
            figures.insert("first_request_ms".into(), first.as_secs_f64() * 1000.0);
        }
        Load::Memory => {
            figures.insert("rss_start_mib".into(), mib(running.rss()));
            let mut previous: Option<(usize, u64)> = None;
            for &instances in &options.memory_instances {
                let target = Target {
                    addr: running.addr,
                    path: "/?ms=500".into(),
                    body: None,
                };
                // As many simultaneous sleeping requests as instances wanted:
                // with concurrency 1, each needs an instance of its own.
                let m = load::burst(&target, instances).await;
                if m.ok.len() < instances as u64 {
                    anyhow::bail!("only {} of {instances} requests succeeded", m.ok.len());
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                let rss = running.rss();
                figures.insert(format!("rss_{instances}_idle_mib"), mib(rss));
                if let Some((n, before)) = previous {
                    let per = rss.saturating_sub(before) as f64 / (instances - n) as f64;
                    figures.insert(format!("kib_per_instance_{n}_to_{instances}"), per / 1024.0);
                }
                previous = Some((instances, rss));
            }
        }
    }
    Ok((figures, BTreeMap::new(), 0))
}

fn throughput_figures(figures: &mut BTreeMap<String, f64>, m: &load::Measured) {
    figures.insert("rps".into(), m.ok_rate());
    figures.insert("p50_ms".into(), m.ok_ms(50.0));
    figures.insert("p99_ms".into(), m.ok_ms(99.0));
    figures.insert("client_cpu".into(), m.client_cpu);
    figures.insert("server_cpu".into(), m.server_cpu);
    let non_ok: u64 = m
        .statuses
        .iter()
        .filter(|(s, _)| !(200..300).contains(*s))
        .map(|(_, n)| n)
        .sum();
    figures.insert("failed".into(), (non_ok + m.errors) as f64);
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
