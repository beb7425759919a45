//! wasmhive: serve `wasi:http` components from a pool of instance workers.
//!
//! [`ProxyHandler`] takes HTTP requests and dispatches each to a worker
//! owning one wasmtime `Store` and one instance of a WASIp2
//! (`wasi:http/proxy`) or WASIp3 (`wasi:http/service`) component. The
//! traits of [`policy`](HandlerState) say how instances are made, what each
//! accepts and when each ends; [`App`] and [`Limits`] implement them for the
//! common case.
//!
//! # Embedding
//!
//! ```no_run
//! use wasmhive::{App, PoolLimits, ProxyHandler, Runtime, RuntimeConfig};
//!
//! # async fn demo(request: wasmhive::Request) -> Result<(), Box<dyn std::error::Error>> {
//! let (runtime, component) = Runtime::for_component_file(&RuntimeConfig::default(), "app.wasm")?;
//! let app = App::new(&runtime, &component)?;
//! let handler = ProxyHandler::new(app, PoolLimits::default());
//! // In your hyper/axum service, with a request id of your choosing:
//! let response = handler.handle(1, request).await?;
//! # Ok(()) }
//! ```
//!
//! `examples/embed.rs` is a complete hyper server in about 30 lines.
//!
//! The global allocator is the host's choice. A request allocates on the
//! connection's thread what the instance's thread frees; the `wasmhive`
//! binary uses mimalloc for that, which served 15-20% more hello-p3
//! requests a second than glibc's `malloc`.
//!
//! # The request path
//!
//! 0. With [`PoolLimits::adaptive_concurrency`] on, the request first takes
//!    a place under the adaptive in-flight limit or fails at once with
//!    [`Overloaded`]; it gives the place back at its response head, and its
//!    latency moves the limit (`adaptive.rs`).
//! 1. [`ProxyHandler::handle`] asks the pool (`pool.rs`) to admit the
//!    request. Under one lock, if fewer than [`PoolLimits::max_running`]
//!    workers are running guest code, the pool hands it to the most recently
//!    advertised worker with spare capacity or reserves a new worker for it
//!    (within `max_instances`); otherwise it queues it (within
//!    `max_queue_len`), or rejects it at once with [`Overloaded`] (or
//!    [`ShuttingDown`]).
//! 2. A queued request starts when a worker parks (waits on I/O), advertises
//!    or exits. It waits at most `max_queue_wait`; while the queue is
//!    overloaded (a standing queue that grows fast, by more than a closed
//!    loop of 256 clients could: CoDel) it is served newest first
//!    and shed with [`Overloaded`] as soon as it could not start within
//!    `queue_target` (enough newer requests wait ahead of it), or once it
//!    has waited that long and a newer request arrives or a worker takes
//!    one (a free worker takes the newest however long it waited). Now
//!    and then an overload is probed (nothing shed for up to an interval
//!    and a quarter), so that clients resending as soon as they are shed
//!    are not taken for an endless overload.
//!    Dropping the `handle` future also takes it out of the queue: it never
//!    reaches a guest.
//! 3. The worker starts the request as a guest task in its store
//!    (`start_call_concurrent`: p3 `handler.handle`, or p2
//!    `incoming-handler.handle` with a `response-outparam`) and asks its
//!    [`WorkerState::on_request_start`] for the request's deadline.
//! 4. The response head goes back to `handle` as soon as the guest produces
//!    it (for p2, when the outparam is set); the body then streams from the
//!    guest as the caller reads it.
//! 5. Failures come back typed: [`ExpirationError`] when the deadline passes,
//!    [`TrapOrPanicError`] when the instance traps before responding (a trap
//!    after the head aborts the body instead), [`InstantiationError`] with
//!    the request handed back when no instance could be created.
//!
//! # The worker lifecycle
//!
//! * **Instantiation.** The dispatcher (`dispatch.rs`) calls
//!   [`HandlerState::instantiate`], retried with exponential backoff
//!   (`instantiation_retries`, `retry_backoff`). Too many failures within
//!   `circuit_window` open a circuit (`circuit.rs`): for `circuit_cooldown`,
//!   requests needing a new instance fail fast and prewarming pauses. A
//!   failure for lack of capacity ([`AtCapacity`], or a full pooling
//!   allocator) is no failure: the request goes back to the front of the
//!   queue and no new worker starts until another exits. With `prewarm > 0`,
//!   instances are created ahead of demand and refilled in the background
//!   whenever one is taken or ends.
//! * **Running and parked.** The worker sets the store's epoch callback,
//!   which suspends the guest at each engine tick in
//!   `tokio::task::yield_now`: tokio resumes it only after the thread has
//!   run its other ready tasks and polled for I/O, so a computing guest
//!   cannot hold back accepts, `503`s and finished responses (wasmtime's
//!   own yield resumes it at once, and a thread polls for I/O only every
//!   61 tasks). A poll that leaves the loop `Pending` with the guest
//!   suspended at a tick leaves a guest still computing: running. Any
//!   other `Pending` means every guest task waits (on I/O, a timer, its
//!   client), and the worker tells the dispatcher it parked (the next
//!   queued request may start elsewhere). Wakes are no sign: the loop
//!   wakes itself for I/O it routes and for tokio's budget, and a guest may
//!   yield, resume and finish within one poll. The worker talks to the
//!   dispatcher only through the `Supervisor` trait that `worker.rs`
//!   defines.
//! * **Time slices.** Each job carries the [`ClientKey`] its server put in
//!   the request's extensions (none: one anonymous client), and the pool
//!   counts running places per client. A guest that has computed for
//!   [`PoolLimits::time_slice`] since its request started or it last
//!   waited asks, at its next tick, to yield its place
//!   (`Supervisor::yield_place`; refused, it asks again a slice later);
//!   the pool agrees only if a request of a client holding fewer running
//!   places waits, suspended or queued. Then the epoch callback's future
//!   waits until the pool resumes the worker, and its place goes to a
//!   waiter meanwhile. A free place goes to the waiter, suspended or the
//!   queued request next in line, whose client holds the fewest running
//!   places, then the fewest suspended, the longest waiting first. The whole store
//!   stalls while suspended (its other requests too); the level-two
//!   expiration still runs, so `request_timeout` still retires an
//!   instance suspended too long. One client's requests never suspend each
//!   other, so a single client's load is scheduled as if time slices did
//!   not exist.
//! * **Acceptance.** After each event the worker asks
//!   [`WorkerState::should_accept_request`]: `Yes` (advertise capacity),
//!   `No` (not now), `Never` (this instance is done). The concurrent count
//!   it passes includes requests whose response body the instance is still
//!   writing (p3: a task after the call returned; p2: the rest of the call):
//!   a request leaves the books when its body has been read or dropped (or,
//!   p2, its handler returned). Concurrency is earned: after taking a request the worker
//!   advertises again only once it has parked, or has no call in hand (nor
//!   a body to write, if its guest computes: a next request that computes
//!   would hold that body back).
//! * **Two-level expiration.** Level one is the per-request deadline, polled
//!   inside the store's event loop; when it fires the request fails, and the
//!   instance takes no more requests and ends, the expired task with it, as
//!   soon as nothing else it holds is wanted. Level two is the instance's
//!   [`WorkerExpiration`], polled outside the event loop with the worker's
//!   [`WorkerStatus`] (`Idle`, `Requests` since the most recent request,
//!   `Streaming` response bodies clients still read, which has no deadline,
//!   and `PostReturn`). The store's epoch deadline makes a running guest yield
//!   at every engine tick ([`RuntimeConfig::epoch_tick`]), so a guest
//!   spinning on the CPU or blocked in a host call cannot starve it; when it
//!   fires, the store is dropped with whatever it was running.
//! * **Abandoned requests.** A caller that drops `handle` after its request
//!   reached the guest (a reset stream, a closed connection) cannot have its
//!   guest task cancelled (wasmtime has no per-task cancel), so its call is
//!   run out as an orphan: it keeps its place in the instance's concurrency
//!   and its deadline, and the request's extensions (where a server keeps
//!   the client's share) live until it returns. The instance goes on taking
//!   requests; once only orphans are left in hand, it ends with them
//!   ([`ExitReason::Abandoned`]) rather than let them hold its pool slot
//!   (background work of its other requests is cut short then). A guest
//!   that computes keeps the event loop from looking at its calls, so the
//!   worker also checks from outside it, at every epoch tick, whether any
//!   caller still waits (the responders, kept in `reply.rs`). A caller
//!   going away thus frees nothing the guest still uses, and retires
//!   nothing another caller could use. (A p2 call is run out until the
//!   guest sets its response: what it writes after that is leftover work.)
//! * **Retired instances.** An instance that takes no more requests (reuse
//!   spent, a request expired, shutdown) lives on for those it has in hand,
//!   its room lost to everyone else meanwhile. A server that shares
//!   instances among clients puts an [`Occupant`] in each request's
//!   extensions; the worker keeps it while the request is in hand (to the
//!   end of its response body) and tells it, at retirement and each time
//!   one leaves, how many requests keep the instance (`occupant.rs`). The
//!   CLI charges each its part of the instance's places.
//! * **Disposal.** When the worker ends (idle, reuse spent, expired, trapped,
//!   abandoned, shut down) it returns any request it had received but not started to
//!   the pool (they are re-dispatched: they never reached a guest, so this
//!   is safe), passes its store to [`WorkerState::drop`] together with an
//!   [`InstanceReport`] (incarnation, lifetime, requests, peak concurrency,
//!   exit reason, peak memory), and reports it to the [`Recorder`]. Requests
//!   still outstanding get [`ExpirationError`] or [`TrapOrPanicError`],
//!   whichever ended the instance. A request the guest saw is never
//!   replayed.
//!
//! # Where things are
//!
//! `handler.rs` holds [`ProxyHandler`] (admission, the answer's way back to
//! the caller); `policy.rs` the traits that decide instances
//! ([`HandlerState`], [`WorkerState`]), and `app.rs` with `limits.rs` their
//! implementation for the common case ([`App`], [`Limits`]); `error.rs` the
//! typed errors; `metrics.rs` what is reported ([`Recorder`],
//! [`InstanceReport`], [`Stats`]); `adaptive.rs` the adaptive in-flight
//! limit. The scheduling core (`pool.rs`) has no wasmtime in it and is tested on
//! its own with randomized runs; `dispatch.rs` the dispatcher (pool,
//! circuit, prewarming, instantiation); `worker.rs` one instance's event
//! loop (`serve`), the driver that polls level two outside it (`drive`),
//! and its report; `call.rs` one request as a guest task, with a module per
//! calling convention (`call/p2.rs`, `call/p3.rs`); `reply.rs` how its
//! answer gets back to `handle` and how far it has gone out (`Progress`,
//! which the instance deadline reads for a p2 guest blocked in a host call);
//! `occupant.rs` what a server hears of requests keeping a retired instance;
//! `memory.rs` the per-instance and global memory limits ([`MemoryBudget`]);
//! `target.rs` the request target every guest sees (scheme and authority,
//! `Host` validated before admission); `output.rs` guest stdout and stderr
//! in whole, labelled lines; `outbound.rs` outbound HTTP (the allowlist,
//! and p3 `wasi:http/client#send`, whose transmission future reports a
//! request that never left as failed);
//! `runtime.rs` the engine, with the pool sized from the component
//! ([`Runtime::for_component`]); `footprint.rs` what one instance takes
//! ([`Footprint`]), read from a `.wasm` binary without compiling it.

#![deny(missing_docs)]

mod adaptive;
mod app;
mod call;
mod circuit;
mod dispatch;
mod error;
mod footprint;
mod handler;
mod limits;
mod memory;
mod metrics;
mod occupant;
mod outbound;
mod output;
mod policy;
mod pool;
mod reply;
mod runtime;
mod target;
mod worker;
mod world;

pub use adaptive::AdaptiveConcurrency;
pub use app::{App, AppWorker, Host};
pub use error::{
    AtCapacity, Error, ExpirationError, InstantiationError, Overloaded, ShuttingDown,
    TrapOrPanicError,
};
pub use footprint::Footprint;
pub use handler::ProxyHandler;
pub use limits::{Limits, LimitsExpiration};
pub use memory::MemoryBudget;
pub use metrics::{ExitReason, InstanceReport, Outcome, Recorder, RequestReport, Stats};
pub use occupant::Occupant;
pub use outbound::{InvalidAuthority, OutboundAuthority};
pub use output::dropped_output_lines;
pub use policy::{
    HandlerState, Instance, Proxy, RequestDeadline, ShouldAccept, WorkerExpiration, WorkerState,
    WorkerStatus,
};
pub use pool::{ClientKey, PoolLimits};
pub use runtime::{LoadError, Runtime, RuntimeConfig};
pub use world::World;

/// The body of requests and responses: a boxed stream of bytes, as
/// `wasmtime-wasi-http` uses. [`into_body`] makes one from any body, such as
/// hyper's `Incoming`.
pub type Body = wasmtime_wasi_http::WasiBody;

/// The error type of a [`Body`].
pub type BodyError = wasmtime_wasi_http::Error;

/// Boxes `body` into a [`Body`], e.g. `request.map(wasmhive::into_body)` for
/// a request from hyper.
pub fn into_body<B>(body: B) -> Body
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BodyError>,
{
    use http_body_util::BodyExt as _;
    body.map_err(Into::into).boxed_unsync()
}

/// A request for [`ProxyHandler::handle`].
pub type Request = http::Request<Body>;

/// A response from [`ProxyHandler::handle`].
pub type Response = http::Response<Body>;

/// One line describing a trap or error, for logs and reports.
pub(crate) fn describe(error: &wasmtime::Error) -> String {
    // The trap itself, not the backtrace wrapped around it; its own text
    // starts with "wasm trap: ".
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => error.to_string(),
    }
}
