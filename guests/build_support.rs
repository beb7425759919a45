//! Shared by the build scripts that compile `guests/` (the `wasmhive-guests`
//! and `wasmhive-demo` crates): builds examples of the guests' own cargo
//! workspace for `wasm32-wasip2`, in release mode, into one target
//! directory, so the two builds share their artifacts (cargo's lock on the
//! target directory keeps them from building at once).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds `examples` (every example when empty) of the workspace in
/// `guests_dir` into `target_dir`; returns the directory holding the
/// `<name>.wasm` files.
pub fn build_guest_examples(guests_dir: &Path, target_dir: &Path, examples: &[&str]) -> PathBuf {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(guests_dir)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--target-dir")
        .arg(target_dir);
    if examples.is_empty() {
        cmd.arg("--examples");
    }
    for example in examples {
        cmd.args(["--example", example]);
    }
    // The outer build's flags are for the host, not for wasm.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("failed to run cargo for the guests");
    assert!(
        status.success(),
        "building the guests failed; is the target installed? \
         (`rustup target add wasm32-wasip2`)"
    );
    target_dir.join("wasm32-wasip2/release/examples")
}

/// The directory guest components are built into: `<target>/guests`, next
/// to the host's profiles, found from `OUT_DIR`
/// (`<target>/<profile>/build/<pkg>-<hash>/out`).
pub fn guests_target_dir() -> PathBuf {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    out_dir.ancestors().nth(4).unwrap().join("guests")
}
