//! The process's memory allocator: mimalloc, returning freed memory to the
//! system at once.
//!
//! A request allocates and frees many small objects (hyper's, the
//! component model's task and resource bookkeeping), often on two threads:
//! the connection's allocates, the instance's frees. glibc's `malloc` spent
//! 14% of the server's CPU on hello-p3 in a profile; with mimalloc hello-p3
//! serves 15-20% more requests a second (README, Performance).
//!
//! mimalloc's defaults keep freed memory for reuse, and the compilation of
//! a large component (the Python app: 200 MiB of compiler data on several
//! threads) then stayed resident for good, twice `wasmtime serve`'s
//! footprint; transparent huge pages (the crate feature `no_thp` turns them
//! off) added 15 MiB to a small app. [`init`] makes it purge at once, which
//! costs no measurable throughput here: the instances' memories come from
//! the pooling allocator, not from `malloc`.

use libmimalloc_sys::{mi_option_set, mi_option_t};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e`, one of its
/// stable options (the Rust bindings name only some of them).
const PURGE_DELAY: mi_option_t = 15;

/// Tunes the allocator; call first in `main`. `MIMALLOC_PURGE_DELAY` in
/// the environment (milliseconds; mimalloc reads it at start-up) takes
/// precedence.
pub fn init() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a value in mimalloc's option table; no pointers.
        unsafe { mi_option_set(PURGE_DELAY, 0) };
    }
}
