//! `wasmhive`: serve `wasi:http` components over HTTP.
//!
//! `serve` runs the server of [`serve`] (connections, limits, drain) over
//! the library's `ProxyHandler`, one per app of the [`manifest`] (or the one
//! component of the command line), each request going to its app by the
//! [`router`], with each client address's fair share of
//! connections and requests ([`clients`]), request bodies limited in size and
//! pace ([`request_body`]), TLS ([`tls`]), reloads without downtime
//! ([`versions`]), the admin endpoint of [`admin`] and the metrics and logs
//! of [`telemetry`]; with `--workers N`, the [`supervisor`] runs N such
//! servers as processes sharing the port. `compile` precompiles a
//! component. The process allocates with mimalloc ([`allocator`]).

mod admin;
mod allocator;
mod args;
mod clients;
mod manifest;
mod request_body;
mod router;
mod serve;
mod supervisor;
mod telemetry;
mod tls;
mod versions;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;

use crate::args::{Cli, Command, CompileArgs};

fn main() -> ExitCode {
    allocator::init();
    // wasmtime makes `anyhow` errors on routine paths (a client's bad body,
    // a store dropped with a suspended fiber). With RUST_BACKTRACE=1, common
    // in containers, each would capture a backtrace (15% of CPU in a
    // profile), and the first a guest asks the debug string of would load
    // the binary's debug information, 100-200 MiB resident for good. Panics
    // keep their backtraces; RUST_LIB_BACKTRACE=1 brings these back.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: the first thing the process does: no other thread exists
        // to read the environment meanwhile.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) if args.workers > 1 => supervisor::run(*args),
        Command::Serve(args) => serve::run(*args),
        Command::Compile(args) => compile(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A worker said why it stopped; its supervisor exits as it did.
        Err(error) if error.downcast_ref::<ExitWith>().is_some() => {
            ExitCode::from(error.downcast_ref::<ExitWith>().map_or(1, |code| code.0))
        }
        Err(error) => {
            telemetry::announce_error(&error);
            if error.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A failure caused by what the command was given (a flag, the component
/// file) rather than met while running (a port in use, say): exit code 2,
/// like clap's own usage errors, instead of 1.
#[derive(Debug)]
pub struct UsageError(pub anyhow::Error);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for UsageError {}

/// Exit with this code, the reason having been written already.
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// `wasmhive compile`: precompiles a component for this host's engine.
fn compile(args: CompileArgs) -> anyhow::Result<()> {
    // The allocation strategy does not change compiled code, so the output
    // loads in `serve` with or without `--no-pooling`.
    let runtime = wasmhive::Runtime::new(&wasmhive::RuntimeConfig {
        pooling: false,
        ..wasmhive::RuntimeConfig::default()
    })?;
    let wasm = std::fs::read(&args.component)
        .with_context(|| format!("reading {}", args.component.display()))
        .map_err(UsageError)?;
    let compiled = runtime
        .precompile(&wasm)
        .with_context(|| format!("compiling {}", args.component.display()))
        .map_err(UsageError)?;
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| args.component.with_extension("cwasm"));
    std::fs::write(&output, compiled).with_context(|| format!("writing {}", output.display()))?;
    if let Some(cache_dir) = args.cache_dir() {
        wasmhive::Runtime::remember_precompiled(&cache_dir, &wasm, &output);
    }
    eprintln!(
        "Compiled {} to {}",
        args.component.display(),
        output.display()
    );
    Ok(())
}
