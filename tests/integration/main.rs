//! Integration tests of the `wasmhive` library: real guest components, real
//! requests, through `ProxyHandler::handle` and through hyper on 127.0.0.1.
//! One module per feature.

mod cancellation;
mod embed_example;
mod expiration;
mod faults;
mod instantiation;
mod occupants;
mod overload;
mod prewarm;
mod responses;
mod reuse;
