//! Builds every component of `guests/` for `wasm32-wasip2` and writes
//! `guests.rs` into `OUT_DIR`: one `Guest` constant per component.
//!
//! The guests are their own cargo workspace, built in release mode (small,
//! fast to instantiate) into `<target>/guests`, so repeated host builds reuse
//! the same guest artifacts.

use std::env;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let guests_dir = manifest_dir.join("../../guests").canonicalize().unwrap();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let target_dir = out_dir.ancestors().nth(4).unwrap().join("guests");

    for watched in ["Cargo.toml", "Cargo.lock", "src", "components"] {
        println!(
            "cargo:rerun-if-changed={}",
            guests_dir.join(watched).display()
        );
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guests_dir)
        .args([
            "build",
            "--release",
            "--examples",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
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

    let examples = target_dir.join("wasm32-wasip2/release/examples");
    let manifest = std::fs::read_to_string(guests_dir.join("Cargo.toml")).unwrap();
    let mut generated = String::new();
    for name in example_names(&manifest) {
        let file = examples.join(format!("{}.wasm", name.replace('-', "_")));
        assert!(file.exists(), "missing guest artifact {}", file.display());
        let konst = name.replace('-', "_").to_uppercase();
        writeln!(
            generated,
            "/// The `{name}` guest component (`guests/components/{file_name}.rs`).\n\
             pub const {konst}: Guest = Guest {{ name: {name:?}, path: {path:?} }};",
            file_name = name.replace('-', "_"),
            path = file.display().to_string(),
        )
        .unwrap();
        if name == "demo" {
            // The CLI embeds the demo app in its binary.
            writeln!(
                generated,
                "/// The bytes of the `demo` component, embedded at compile time.\n\
                 pub static DEMO_WASM: &[u8] = include_bytes!({path:?});",
                path = file.display().to_string(),
            )
            .unwrap();
        }
    }
    std::fs::write(out_dir.join("guests.rs"), generated).unwrap();
}

/// The `name = "..."` of every `[[example]]` in the guests' manifest.
fn example_names(manifest: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_example = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_example = line == "[[example]]";
        } else if in_example && let Some(value) = line.strip_prefix("name = ") {
            names.push(value.trim_matches('"').to_string());
        }
    }
    names
}
