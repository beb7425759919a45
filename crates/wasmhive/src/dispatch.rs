//! [`Dispatcher`]: owns the pool, the circuit and prewarming; creates
//! instances with retries; and reacts to what workers report (parked,
//! running again, exited).
//!
//! It implements the [`Supervisor`] interface that `worker.rs` defines, so
//! the worker knows nothing of pools or circuits, and the handler facade
//! knows nothing of workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::circuit::{Circuit, Failure};
use crate::error::AtCapacity;
use crate::metrics::{ExitReason, InstanceReport, Recorder};
use crate::policy::{HandlerState, Instance};
use crate::pool::{ClientKey, Mailbox, Pool, PoolLimits, Resume, Sheddable, Starts, WorkerId};
use crate::worker::{self, InstantiationFailure, Job, Supervisor};
use crate::{InstantiationError, Overloaded};

pub(crate) struct Dispatcher<S: HandlerState> {
    state: S,
    pub(crate) pool: Pool<Job<S>>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) recorder: Arc<dyn Recorder>,
    circuit: Circuit,
    /// A prewarm refill is scheduled for when the circuit closes.
    refill_scheduled: AtomicBool,
    /// A look at whether capacity came back is scheduled.
    capacity_retry_scheduled: AtomicBool,
    pub(crate) counters: Counters,
    /// Notified whenever a worker ends and none is left alive.
    pub(crate) emptied: tokio::sync::Notify,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) instantiations: AtomicU64,
    pub(crate) instantiation_failures: AtomicU64,
    pub(crate) requests_started: AtomicU64,
    pub(crate) overloaded: AtomicU64,
    pub(crate) yields: AtomicU64,
    pub(crate) exits: [AtomicU64; ExitReason::ALL.len()],
}

/// How long after running out of capacity the pool tries to start a worker
/// again, if no instance of its own has ended meanwhile.
const CAPACITY_RETRY: Duration = Duration::from_millis(100);

impl<S: HandlerState> Sheddable for Job<S> {
    fn admitted(&self) -> Instant {
        self.admitted
    }

    fn shed(self) {
        Job::<S>::reply_early(self.tx, Overloaded::new(Duration::from_secs(1)).into());
    }

    fn client(&self) -> Option<ClientKey> {
        self.client
    }
}

impl<S: HandlerState> Dispatcher<S> {
    pub(crate) fn new(state: S, limits: PoolLimits, recorder: Arc<dyn Recorder>) -> Arc<Self> {
        let dispatcher = Arc::new(Dispatcher {
            state,
            circuit: Circuit::new(
                limits.circuit_failures,
                limits.circuit_window,
                limits.circuit_cooldown,
            ),
            pool: Pool::new(limits),
            shutdown: CancellationToken::new(),
            recorder,
            refill_scheduled: AtomicBool::new(false),
            capacity_retry_scheduled: AtomicBool::new(false),
            counters: Counters::default(),
            emptied: tokio::sync::Notify::new(),
        });
        dispatcher.refill_prewarm();
        dispatcher
    }

    pub(crate) fn state(&self) -> &S {
        &self.state
    }

    pub(crate) fn spawn_worker(self: &Arc<Self>, id: WorkerId, job: Option<Job<S>>) {
        tokio::spawn(worker::run(self.clone(), id, job));
    }

    pub(crate) fn spawn_all(self: &Arc<Self>, starts: Starts<Job<S>>) {
        for (id, job) in starts {
            self.spawn_worker(id, Some(job));
        }
    }

    /// Brings the prewarmed instances back up to target, unless the circuit
    /// is open: then once, when it closes.
    pub(crate) fn refill_prewarm(self: &Arc<Self>) {
        if self.pool.limits().prewarm == 0 || self.shutdown.is_cancelled() {
            return;
        }
        if let Some(until) = self.circuit.open_until(now()) {
            if !self.refill_scheduled.swap(true, Relaxed) {
                let this = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(until.into()).await;
                    this.refill_scheduled.store(false, Relaxed);
                    this.refill_prewarm();
                });
            }
            return;
        }
        for id in self.pool.prewarm() {
            self.spawn_worker(id, None);
        }
    }

    /// Counts a failed instantiation toward the circuit and logs it: the
    /// first of a streak and each opening at `warn`, the rest at `debug`.
    fn note_failure(&self, cause: &Arc<wasmtime::Error>, now: Instant) -> Failure {
        self.counters.instantiation_failures.fetch_add(1, Relaxed);
        let error = format!("{cause:#}");
        let failure = self.circuit.failed(cause, now);
        match failure {
            Failure::First => tracing::warn!(%error, "instantiation failed"),
            Failure::Repeated => tracing::debug!(%error, "instantiation failed"),
            Failure::Opened => tracing::warn!(
                %error,
                cooldown = ?self.pool.limits().circuit_cooldown,
                "instantiation circuit opened after repeated failures"
            ),
        }
        failure
    }

    /// Capacity may come back without an instance of ours ending (another
    /// app sharing the memory budget frees some): look again a little later.
    fn retry_capacity_later(self: &Arc<Self>) {
        if self.capacity_retry_scheduled.swap(true, Relaxed) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CAPACITY_RETRY).await;
            this.capacity_retry_scheduled.store(false, Relaxed);
            this.spawn_all(this.pool.retry_capacity(now()));
            // Prewarming paused with the capacity: resume it too.
            this.refill_prewarm();
        });
    }

    fn record_exit(&self, report: &InstanceReport) {
        self.counters.exits[report.reason.index()].fetch_add(1, Relaxed);
        self.recorder.instance(report);
    }

    /// A worker has gone: wakes whoever waits for the pool to empty.
    fn worker_gone(&self) {
        if self.pool.occupancy().live == 0 {
            self.emptied.notify_waiters();
        }
    }
}

impl<S: HandlerState> Supervisor<S> for Dispatcher<S> {
    fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Creates an instance for worker `id`, retrying with backoff, unless
    /// the circuit is open. Lack of capacity is not retried here: the pool
    /// waits for an instance to end instead.
    async fn instantiate(&self, id: WorkerId) -> Result<Instance<S>, InstantiationFailure> {
        if let Err(cause) = self.circuit.admit(now()) {
            return Err(InstantiationFailure {
                cause,
                circuit_open: true,
                at_capacity: false,
            });
        }
        let limits = self.pool.limits();
        let mut backoff = limits.retry_backoff;
        let mut attempt = 0;
        loop {
            let error = match self.state.instantiate(id).await {
                Ok(instance) => {
                    self.circuit.succeeded();
                    self.counters.instantiations.fetch_add(1, Relaxed);
                    return Ok(instance);
                }
                Err(error) => error,
            };
            let cause = Arc::new(error);
            if is_capacity(&cause) {
                return Err(InstantiationFailure {
                    cause,
                    circuit_open: false,
                    at_capacity: true,
                });
            }
            let failure = self.note_failure(&cause, now());
            if failure == Failure::Opened
                || attempt >= limits.instantiation_retries
                || self.shutdown.is_cancelled()
            {
                return Err(InstantiationFailure::fault(cause));
            }
            tokio::time::sleep(backoff).await;
            // Others' failures may have opened the circuit meanwhile.
            if self.circuit.admit(now()).is_err() {
                return Err(InstantiationFailure::fault(cause));
            }
            backoff *= 2;
            attempt += 1;
        }
    }

    fn instantiation_failed(
        self: &Arc<Self>,
        id: WorkerId,
        first: Option<Job<S>>,
        failure: InstantiationFailure,
        report: InstanceReport,
    ) {
        let now = now();
        // Out of capacity, the request waits for an instance of ours to end,
        // unless none is alive to free any (the capacity is held elsewhere,
        // a budget shared with other apps, say) or this was the probe after
        // a cool-down, which must resolve the circuit: then it fails below.
        let first = if failure.at_capacity && !self.circuit.is_probing(now) {
            match self.pool.at_capacity(id, first, now) {
                Ok(starts) => {
                    tracing::debug!(error = %format_args!("{:#}", failure.cause), "at capacity; waiting for an instance to end");
                    self.spawn_all(starts);
                    self.retry_capacity_later();
                    self.worker_gone();
                    return;
                }
                Err(first) => first,
            }
        } else {
            first
        };
        self.spawn_all(self.pool.exited(id, Vec::new(), now));
        if failure.at_capacity {
            // Counted, so that prewarming backs off; the client may come back.
            self.note_failure(&failure.cause, now);
            if let Some(job) = first {
                job.shed();
            }
        } else if let Some(Job { request, tx, .. }) = first {
            let error = InstantiationError::new(request, failure.cause, failure.circuit_open);
            Job::<S>::reply_early(tx, error.into());
        }
        self.refill_prewarm();
        self.record_exit(&report);
        self.worker_gone();
    }

    fn advertise(&self, id: WorkerId, mailbox: &Mailbox<Job<S>>) -> Option<Job<S>> {
        self.pool.advertise(id, mailbox, now())
    }

    fn withdraw(&self, id: WorkerId) {
        self.pool.withdraw(id);
    }

    fn park(self: &Arc<Self>, id: WorkerId) {
        self.spawn_all(self.pool.park(id, now()));
    }

    fn unpark(&self, id: WorkerId) {
        self.pool.unpark(id);
    }

    fn yield_place(self: &Arc<Self>, id: WorkerId) -> Option<Resume> {
        let (resume, starts) = self.pool.yield_place(id, now())?;
        self.counters.yields.fetch_add(1, Relaxed);
        tracing::debug!("time slice over: yielded the running place to another client");
        self.spawn_all(starts);
        Some(resume)
    }

    fn time_slice(&self) -> Duration {
        self.pool.limits().time_slice
    }

    fn started(&self) {
        self.counters.requests_started.fetch_add(1, Relaxed);
    }

    fn redispatch(self: &Arc<Self>, job: Job<S>) {
        self.spawn_all(self.pool.readmit(job, now()));
    }

    fn exited(self: &Arc<Self>, id: WorkerId, unstarted: Vec<Job<S>>, report: InstanceReport) {
        // The pool first: a panicking recorder must not leave it a worker
        // short.
        self.spawn_all(self.pool.exited(id, unstarted, now()));
        self.refill_prewarm();
        self.record_exit(&report);
        self.worker_gone();
    }
}

/// The time scheduling decisions are made at: tokio's clock, so that they
/// agree with the timers that act on them (and tests can pause it).
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Whether an instantiation failed for lack of shared capacity (a full
/// pooling allocator, an exhausted memory budget) rather than a fault.
fn is_capacity(error: &wasmtime::Error) -> bool {
    error.is::<wasmtime::PoolConcurrencyLimitError>() || error.is::<AtCapacity>()
}
