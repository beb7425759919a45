//! `wasmhive-bench`: measures `wasmhive serve` side by side with `wasmtime
//! serve` and a native hyper server. See the README's performance section.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use wasmhive_bench::scenarios::{self, Options};
use wasmhive_bench::servers::Binaries;
use wasmhive_bench::soak::SoakOptions;

/// Load-test wasmhive against wasmtime serve and a native hyper server.
#[derive(Parser, Debug)]
#[command(name = "wasmhive-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Extra>,

    /// Scenarios to run [default: all]: hello-p2, hello-py, hello-js,
    /// hello-p3, echo-64k, cpu, sleep-io, overload, cold-start, cold-start-py, memory.
    scenarios: Vec<String>,

    /// Smoke mode: one short round of everything (about 1 s per scenario).
    #[arg(long)]
    quick: bool,

    /// Rounds over all servers [default: 3, or 1 with --quick].
    #[arg(long)]
    rounds: Option<usize>,

    /// Measured seconds per run [default: 5, or 1 with --quick].
    #[arg(long)]
    duration: Option<f64>,

    /// Closed-loop connections (like wrk -c).
    #[arg(long, default_value_t = 32)]
    connections: usize,

    /// The wasmhive binary [default: `wasmhive` next to this one, e.g.
    /// target/dist/wasmhive].
    #[arg(long)]
    wasmhive: Option<PathBuf>,

    /// The wasmtime binary [default: `wasmtime` on PATH, if any].
    #[arg(long)]
    wasmtime: Option<PathBuf>,

    /// Where to write <set>.md, <set>.json and <set>.svg.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,

    /// Name of the result files [default: `quick` with --quick, else `full`
    /// for all scenarios or the scenario names joined by `+`].
    #[arg(long)]
    set: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Extra {
    /// Soak `wasmhive serve` with mixed requests (hello, 64 KiB echo,
    /// counter, 1% trap, 1% client abort), checking every answer and
    /// sampling RSS; fails on any unexpected answer or on RSS growth after
    /// warm-up of 5% or more.
    Soak {
        /// Stop after this many requests.
        #[arg(long, default_value_t = 1_000_000)]
        requests: u64,
        /// Stop after this many seconds, if the requests are not all sent.
        #[arg(long, default_value_t = 3600.0)]
        duration: f64,
        /// Client connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// The wasmhive binary [default: `wasmhive` next to this one].
        #[arg(long)]
        wasmhive: Option<PathBuf>,
    },
    /// The native baseline server (started by the harness itself).
    #[command(hide = true)]
    NativeServer {
        #[arg(long)]
        addr: SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Extra::NativeServer { addr }) => return wasmhive_bench::native::serve(addr),
        Some(Extra::Soak {
            requests,
            duration,
            connections,
            wasmhive,
        }) => {
            let options = SoakOptions {
                requests,
                duration: Duration::from_secs_f64(duration),
                connections,
                warmup_share: 0.25,
                min_warmup: Duration::from_secs(10),
            };
            return soak(binaries(wasmhive, None)?, options);
        }
        None => {}
    }
    let binaries = binaries(cli.wasmhive, cli.wasmtime)?;

    let all = scenarios::all();
    let chosen: Vec<_> = if cli.scenarios.is_empty() {
        all
    } else {
        let mut chosen = Vec::new();
        for name in &cli.scenarios {
            match all.iter().find(|s| s.name == name) {
                Some(s) => chosen.push(s.clone()),
                None => bail!(
                    "unknown scenario `{name}`; known: {}",
                    all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                ),
            }
        }
        chosen
    };
    let duration =
        Duration::from_secs_f64(cli.duration.unwrap_or(if cli.quick { 1.0 } else { 5.0 }));
    let options = Options {
        rounds: cli.rounds.unwrap_or(if cli.quick { 1 } else { 3 }),
        duration,
        warmup: if cli.quick {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(1)
        },
        connections: cli.connections,
        memory_instances: if cli.quick {
            vec![1, 10, 50]
        } else {
            vec![1, 100, 1000]
        },
    };
    let set = cli.set.unwrap_or_else(|| {
        if cli.quick {
            "quick".into()
        } else if cli.scenarios.is_empty() {
            "full".into()
        } else {
            cli.scenarios.join("+")
        }
    });
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let report = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(wasmhive_bench::run(&chosen, &options, &binaries, command));
    println!("{}", report.markdown());
    report
        .write(&cli.out, &set)
        .with_context(|| format!("writing results to {}", cli.out.display()))?;
    eprintln!(
        "results written to {}/{set}.{{md,json,svg}}",
        cli.out.display()
    );
    if report.rounds.is_empty() {
        bail!("no scenario completed");
    }
    Ok(())
}

/// The servers' binaries: `wasmhive` defaults to the one next to this
/// harness, `wasmtime` to the one on PATH.
fn binaries(wasmhive: Option<PathBuf>, wasmtime: Option<PathBuf>) -> anyhow::Result<Binaries> {
    let harness = std::env::current_exe()?;
    let wasmhive = wasmhive.unwrap_or_else(|| harness.with_file_name("wasmhive"));
    if !wasmhive.exists() {
        bail!(
            "{} not found: build it first (`cargo build --release -p wasmhive-cli`) or pass --wasmhive",
            wasmhive.display()
        );
    }
    Ok(Binaries {
        wasmhive,
        wasmtime: wasmtime.or_else(|| find_on_path("wasmtime")),
        harness,
    })
}

fn soak(binaries: Binaries, options: SoakOptions) -> anyhow::Result<()> {
    let report = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(wasmhive_bench::soak::run(&binaries, &options))?;
    println!("{}", report.markdown());
    if report.unexpected > 0 {
        bail!("{} unexpected answers", report.unexpected);
    }
    if report.growth() >= 0.05 {
        bail!("RSS grew {:.1}% after warm-up", report.growth() * 100.0);
    }
    println!("every answer as expected; RSS growth after warm-up under 5%");
    Ok(())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}
