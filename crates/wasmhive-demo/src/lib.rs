//! The demo app `wasmhive serve` runs when given no component: a WASIp3
//! `wasi:http/service` (`guests/components/demo.rs`) that greets on `GET /`
//! and echoes any `POST`. Building this crate needs the `wasm32-wasip2`
//! target (`rustup target add wasm32-wasip2`) and nothing else.

/// The demo component's bytes, embedded at compile time.
pub static DEMO_WASM: &[u8] = include_bytes!(env!("WASMHIVE_DEMO_WASM"));
