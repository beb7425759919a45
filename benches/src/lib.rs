//! wasmhive's benchmarks: the side-by-side load harness (`wasmhive-bench`,
//! comparing `wasmhive serve`, `wasmtime serve` and a native hyper server)
//! and the set-up shared by the criterion micro-benchmarks in `micro/`.

pub mod load;
pub mod native;
pub mod report;
pub mod scenarios;
pub mod servers;
pub mod soak;

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use wasmhive::{App, Runtime, RuntimeConfig};
use wasmhive_guests::Guest;

pub use wasmhive_guests as guests;

use crate::report::Report;
use crate::scenarios::{Options, RoundResult, Scenario};
use crate::servers::{Binaries, ServerKind};

/// A runtime with the pooling allocator on or off.
pub fn runtime(pooling: bool) -> Runtime {
    Runtime::new(&RuntimeConfig {
        pooling,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

/// An [`App`] serving `guest` on `runtime`, with guest output unlabelled.
pub fn app(runtime: &Runtime, guest: Guest) -> App {
    let component = runtime.load_file(guest.path).expect("guest compiles");
    App::new(runtime, &component)
        .expect("guest is a wasi:http component")
        .label_output(false)
}

/// Plays `scenarios` against every server found in `binaries`, `options.rounds`
/// times, alternating the order of the servers from round to round.
pub async fn run(
    scenarios: &[Scenario],
    options: &Options,
    binaries: &Binaries,
    command: String,
) -> Report {
    let mut skipped = Vec::new();
    let mut servers = vec![ServerKind::Wasmhive];
    match &binaries.wasmtime {
        Some(_) => servers.push(ServerKind::Wasmtime),
        None => skipped.push(
            "wasmtime serve: no `wasmtime` on PATH and no --wasmtime given; \
             install it with `cargo install wasmtime-cli@48.0.8 --locked`"
                .to_string(),
        ),
    }
    servers.push(ServerKind::Native);
    for note in &skipped {
        eprintln!("note: {note}");
    }

    let steps: usize = scenarios
        .iter()
        .map(|s| {
            let servers = servers
                .iter()
                .filter(|k| s.native || **k != ServerKind::Native)
                .count();
            s.variants.len() * options.rounds * servers
        })
        .sum();
    let progress = ProgressBar::new(steps as u64).with_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut rounds = Vec::new();
    for scenario in scenarios {
        for (variant, settings) in &scenario.variants {
            for round in 0..options.rounds {
                // A B C, then C B A, ...: drift hits every server alike.
                let mut order: Vec<ServerKind> = servers
                    .iter()
                    .copied()
                    .filter(|k| scenario.native || *k != ServerKind::Native)
                    .collect();
                if round % 2 == 1 {
                    order.reverse();
                }
                for server in order {
                    progress.set_message(format!(
                        "{} ({variant}) round {} on {}",
                        scenario.name,
                        round + 1,
                        server.label()
                    ));
                    match scenarios::run_one(scenario, settings, server, binaries, options).await {
                        Ok((figures, statuses, errors)) => rounds.push(RoundResult {
                            scenario: scenario.name,
                            variant,
                            server,
                            round,
                            figures,
                            statuses,
                            errors,
                        }),
                        Err(error) => {
                            let note = format!(
                                "{} ({variant}) on {} failed in round {}: {error:#}",
                                scenario.name,
                                server.label(),
                                round + 1
                            );
                            progress.println(format!("warning: {note}"));
                            skipped.push(note);
                        }
                    }
                    progress.inc(1);
                    // Let the port and the stopped server's memory go.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    progress.finish_and_clear();
    Report {
        machine: machine(),
        command,
        rounds,
        skipped,
    }
}

/// Cores, CPU model and kernel of this machine.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{} cores ({cpu}), client and servers on the same machine",
        servers::cores()
    )
}
