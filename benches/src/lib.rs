//! Shared set-up for wasmhive's benchmarks.

use wasmhive::{App, Runtime, RuntimeConfig};
use wasmhive_guests::Guest;

pub use wasmhive_guests as guests;

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
