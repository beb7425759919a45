//! `wasmhive`: serve `wasi:http` components over HTTP.
//!
//! `serve` runs the server of [`serve`] (connections, limits, drain) over the
//! library's `ProxyHandler`, with the admin endpoint of [`admin`] and the
//! metrics and logs of [`telemetry`]; `compile` precompiles a component.

mod admin;
mod args;
mod clients;
mod request_body;
mod serve;
mod telemetry;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;

use crate::args::{Cli, Command, CompileArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Compile(args) => compile(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            // Like clap's usage errors: the command could not do its job with
            // what it was given.
            ExitCode::from(2)
        }
    }
}

/// `wasmhive compile`: precompiles a component for this host's engine.
fn compile(args: CompileArgs) -> anyhow::Result<()> {
    // The allocation strategy does not change compiled code, so the output
    // loads in `serve` with or without `--no-pooling`.
    let runtime = wasmhive::Runtime::new(&wasmhive::RuntimeConfig {
        pooling: false,
        ..wasmhive::RuntimeConfig::default()
    })?;
    let wasm = std::fs::read(&args.component)
        .with_context(|| format!("reading {}", args.component.display()))?;
    let compiled = runtime
        .precompile(&wasm)
        .with_context(|| format!("compiling {}", args.component.display()))?;
    let output = args
        .output
        .unwrap_or_else(|| args.component.with_extension("cwasm"));
    std::fs::write(&output, compiled).with_context(|| format!("writing {}", output.display()))?;
    eprintln!(
        "Compiled {} to {}",
        args.component.display(),
        output.display()
    );
    Ok(())
}
