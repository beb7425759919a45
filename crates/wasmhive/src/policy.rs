//! The traits through which an embedder decides how workers behave:
//! [`HandlerState`] creates instances, [`WorkerState`] decides what each
//! worker accepts and how long each request may take, [`WorkerExpiration`]
//! decides when a whole instance must go.
//!
//! [`Limits`](crate::Limits) and [`App`](crate::App) implement all three for
//! the common case; implement them yourself for a different policy.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use wasmtime::component::GuestTaskId;
use wasmtime::{Store, StoreContextMut};
use wasmtime_wasi_http::WasiHttpCtxView;

/// A future that resolves when a request's deadline has passed.
pub type RequestDeadline = Pin<Box<dyn Future<Output = ()> + Send + Sync + 'static>>;

/// What a worker is doing, as seen by [`WorkerExpiration::poll`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WorkerStatus {
    /// No request is outstanding and the guest has no task left running.
    Idle,
    /// At least one request is waiting for its response.
    Requests,
    /// Every request has its response head, and at least one response body
    /// is still being read by its client (the guest may be writing it):
    /// delivering a stream, not leftover work.
    Streaming,
    /// Every request is done (answered and its body read, or expired), but
    /// the guest is still running tasks it started for them.
    PostReturn,
}

/// Whether a worker should take another request now.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ShouldAccept {
    /// Yes, now.
    Yes,
    /// Not now; ask again when a request finishes.
    No,
    /// Never again: this instance has done its share and exits once its
    /// outstanding requests are done.
    Never,
}

/// The instance-level deadline of one worker, polled *outside* the store's
/// event loop.
///
/// A per-request deadline ([`WorkerState::on_request_start`]) runs inside
/// `Store::run_concurrent`, and that loop makes no progress while a guest
/// spins on the CPU or a host call holds the store (wasmtime issues
/// [#11869](https://github.com/bytecodealliance/wasmtime/issues/11869) and
/// [#11870](https://github.com/bytecodealliance/wasmtime/issues/11870)). This
/// second level is polled by the worker around that loop instead; epoch
/// interruption makes a busy guest yield at every engine tick, so this poll
/// happens even then. When it resolves, the worker drops its store at once,
/// killing whatever the guest was doing.
pub trait WorkerExpiration: Send + Sync + 'static {
    /// Returns `Poll::Ready(())` when an instance that has been in `status`
    /// since `since` must be dropped; otherwise `Poll::Pending`, arranging for
    /// `cx` to be woken when it should be polled again.
    ///
    /// For [`WorkerStatus::Requests`], `since` is when the *most recent*
    /// outstanding request started: once that request is past the request
    /// timeout, every outstanding request is, so the whole instance can go.
    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        status: WorkerStatus,
        since: Instant,
    ) -> Poll<()>;
}

/// The per-instance policy of a worker: how many requests it takes, how long
/// each may run, and what happens to its store at the end.
pub trait WorkerState: Send + Sync + 'static {
    /// The `T` of the worker's `Store<T>`.
    type StoreData: Send + 'static;
    /// Data the caller of [`ProxyHandler::handle`](crate::ProxyHandler::handle)
    /// attaches to a request, handed to [`Self::on_request_start`].
    type RequestData: Send + 'static;

    /// Whether to take another request, given how many this instance is
    /// handling now (`concurrent`) and how many it has taken in all (`total`).
    ///
    /// This is a ceiling, not a promise: the worker also waits until its
    /// guest is idle or blocked on I/O before advertising capacity, so a
    /// CPU-bound guest never hoards requests another instance could serve.
    fn should_accept_request(&self, concurrent: usize, total: usize) -> ShouldAccept;

    /// Called as a request is about to start as a guest task `task` in
    /// `store`. Returns the request's deadline: if it resolves before the
    /// guest responds, the request fails with
    /// [`ExpirationError`](crate::ExpirationError) and this instance accepts
    /// no more requests. The guest task is not cancelled (wasmtime cannot yet
    /// cancel a task), it runs on until the instance ends, which it does
    /// once nothing else it holds is wanted. A
    /// request whose caller goes away before the response head (the `handle`
    /// future is dropped) is run out under this same deadline, counted
    /// against the instance; the instance ends, abandoned tasks and all,
    /// once nothing else it holds is wanted
    /// ([`ExitReason::Abandoned`](crate::ExitReason)).
    ///
    /// This deadline is polled inside the store's event loop, which a busy
    /// guest can stall; [`WorkerExpiration`] is the backstop.
    fn on_request_start(
        &self,
        store: StoreContextMut<'_, Self::StoreData>,
        data: Self::RequestData,
        task: GuestTaskId,
    ) -> RequestDeadline;

    /// Disposes of the store of a worker that has ended, for whatever reason
    /// `exit` says: called for every store, including after a panic in the
    /// worker's loop or in this policy's other methods (the report then
    /// says `the worker panicked`). Implementations may read what they need from the store
    /// (memory use, logs) and add it to `exit` before the store is dropped;
    /// the handler then reports `exit` to its
    /// [`Recorder`](crate::Recorder).
    fn drop(&self, store: Store<Self::StoreData>, exit: &mut crate::InstanceReport);
}

/// The guest entry point of an instance: one of the two `wasi:http` worlds.
pub enum Proxy {
    /// A `wasi:http/proxy` (WASIp2) instance exporting `incoming-handler@0.2`.
    P2(wasmtime_wasi_http::p2::bindings::Proxy),
    /// A `wasi:http/service` (WASIp3) instance exporting `handler@0.3`.
    P3(wasmtime_wasi_http::p3::bindings::Service),
}

impl Proxy {
    /// The guest's `handle` export, which the store's readiness for another
    /// concurrent call is asked about.
    pub(crate) fn handle_func(&self) -> wasmtime::component::Func {
        match self {
            Proxy::P2(guest) => *guest.wasi_http_incoming_handler().func_handle().func(),
            Proxy::P3(guest) => *guest.wasi_http_handler().func_handle().func(),
        }
    }

    /// Whether the guest's host calls block the store's event loop while
    /// they wait: p2 guests call synchronously.
    pub(crate) fn blocks_in_host_calls(&self) -> bool {
        matches!(self, Proxy::P2(_))
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proxy::P2(_) => f.write_str("Proxy::P2"),
            Proxy::P3(_) => f.write_str("Proxy::P3"),
        }
    }
}

/// A freshly instantiated guest with its store and policies, as returned by
/// [`HandlerState::instantiate`].
pub struct Instance<S: HandlerState> {
    /// The store owning the instance.
    pub store: Store<S::StoreData>,
    /// The instance's `wasi:http` export.
    pub proxy: Proxy,
    /// How to reach the `wasi:http` context inside the store data.
    pub view: fn(&mut S::StoreData) -> WasiHttpCtxView<'_>,
    /// The instance-level deadline.
    pub expiration: S::WorkerExpiration,
    /// The per-instance policy.
    pub state: S::WorkerState,
}

impl<S: HandlerState> Instance<S> {
    /// The same instance for policy `T`, which shares its store data and
    /// expiration, with the worker state `wrap` makes of this one's: for a
    /// [`HandlerState`] that wraps another (an [`App`](crate::App), say).
    pub fn for_policy<T>(self, wrap: impl FnOnce(S::WorkerState) -> T::WorkerState) -> Instance<T>
    where
        T: HandlerState<StoreData = S::StoreData, WorkerExpiration = S::WorkerExpiration>,
    {
        Instance {
            store: self.store,
            proxy: self.proxy,
            view: self.view,
            expiration: self.expiration,
            state: wrap(self.state),
        }
    }
}

/// Creates instances for a [`ProxyHandler`](crate::ProxyHandler).
pub trait HandlerState: Send + Sync + Sized + 'static {
    /// The `T` of each worker's `Store<T>`.
    type StoreData: Send + 'static;
    /// See [`WorkerExpiration`].
    type WorkerExpiration: WorkerExpiration;
    /// See [`WorkerState`].
    type WorkerState: WorkerState<StoreData = Self::StoreData>;

    /// Creates a store and instantiates the guest in it, for the worker with
    /// incarnation id `incarnation` (unique within the handler, increasing).
    ///
    /// Errors are retried by the handler with backoff (see
    /// [`PoolLimits::instantiation_retries`](crate::PoolLimits)), so they
    /// should describe a transient failure where possible. This call is not
    /// timed out by the handler. The engine needs epoch interruption; once
    /// the guest is instantiated, the worker sets the store's epoch deadline
    /// and callback itself (a yield at every tick), replacing any set here.
    fn instantiate(
        &self,
        incarnation: u64,
    ) -> impl Future<Output = wasmtime::Result<Instance<Self>>> + Send;
}
