//! The guest components of `guests/`, built by this crate's build script, for
//! the tests and the benches (the CLI's demo app is `wasmhive-demo`'s): the Rust guests compiled
//! for `wasm32-wasip2`, and a Python and a JavaScript app (`PYTHON_APP`,
//! `JS_APP`) packaged by componentize-py and componentize-js.
//!
//! Each component is a [`Guest`] constant named after it (`HELLO_P2` for
//! `hello-p2`). Building this crate needs the `wasm32-wasip2` target
//! (`rustup target add wasm32-wasip2`), `python3` (with venv and pip) and
//! `node` (with npm); the first build installs the pinned packaging tools
//! from PyPI and npm under the target directory. Nothing is run by hand.

/// A compiled guest component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guest {
    /// The component's name, e.g. `hello-p2`.
    pub name: &'static str,
    /// Absolute path of the `.wasm` component file.
    pub path: &'static str,
}

impl Guest {
    /// Reads the component's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(self.path)
            .unwrap_or_else(|e| panic!("reading guest {} at {}: {e}", self.name, self.path))
    }
}

include!(concat!(env!("OUT_DIR"), "/guests.rs"));
