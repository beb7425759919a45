//! Compiles the demo guest (`guests/components/demo.rs`, the `demo`
//! example of the guests' workspace) for `wasm32-wasip2`: the only guest the
//! CLI ships. The test fixtures are `wasmhive-guests`'.

#[path = "../../guests/build_support.rs"]
mod build_support;

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let guests_dir = manifest_dir.join("../../guests").canonicalize().unwrap();
    for watched in ["Cargo.toml", "Cargo.lock", "src", "components/demo.rs"] {
        println!(
            "cargo:rerun-if-changed={}",
            guests_dir.join(watched).display()
        );
    }
    let examples = build_support::build_guest_examples(
        &guests_dir,
        &build_support::guests_target_dir(),
        &["demo"],
    );
    let demo = examples.join("demo.wasm");
    assert!(demo.exists(), "missing {}", demo.display());
    println!("cargo:rustc-env=WASMHIVE_DEMO_WASM={}", demo.display());
}
