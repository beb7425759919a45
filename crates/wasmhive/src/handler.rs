//! [`ProxyHandler`]: admission, dispatch, instantiation with retries and a
//! circuit breaker, prewarming, shutdown and reporting.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::call::{Delivery, Reply};
use crate::limiter::{Limiter, Permit};
use crate::metrics::{
    ExitReason, InstanceReport, NoRecorder, Outcome, Recorder, RequestReport, Stats,
};
use crate::policy::{HandlerState, Instance, WorkerState};
use crate::pool::{Admission, Pool, PoolLimits, Ticket, WorkerId};
use crate::{Error, Overloaded, Request, Response, ShuttingDown, TrapOrPanicError, worker};

type RequestData<S> = <<S as HandlerState>::WorkerState as WorkerState>::RequestData;

/// A request on its way to a worker.
pub(crate) struct Job<S: HandlerState> {
    pub(crate) data: RequestData<S>,
    pub(crate) request: Request,
    pub(crate) tx: oneshot::Sender<Reply>,
}

impl<S: HandlerState> Job<S> {
    /// Fails a job before any worker took it.
    pub(crate) fn reply_early(tx: oneshot::Sender<Reply>, error: Error) {
        let _ = tx.send(Reply {
            delivery: Err(error),
            dispatch: None,
        });
    }
}

/// Dispatches requests to a pool of component-instance workers.
///
/// Cloning is cheap and every clone drives the same pool. See the
/// [crate documentation](crate) for the request path and the worker
/// lifecycle.
pub struct ProxyHandler<S: HandlerState>(Arc<Shared<S>>);

impl<S: HandlerState> Clone for ProxyHandler<S> {
    fn clone(&self) -> Self {
        ProxyHandler(self.0.clone())
    }
}

pub(crate) struct Shared<S: HandlerState> {
    state: S,
    pub(crate) pool: Pool<Job<S>>,
    pub(crate) shutdown: CancellationToken,
    recorder: Arc<dyn Recorder>,
    circuit: Circuit,
    limiter: Option<Limiter>,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    instantiations: AtomicU64,
    instantiation_failures: AtomicU64,
    requests_started: AtomicU64,
    overloaded: AtomicU64,
    exits: [AtomicU64; ExitReason::ALL.len()],
}

/// Why a worker has no instance.
pub(crate) struct InstantiationFailure {
    pub(crate) cause: Arc<wasmtime::Error>,
    pub(crate) circuit_open: bool,
}

impl<S: HandlerState> ProxyHandler<S> {
    /// A handler creating instances with `state`, within `limits`.
    ///
    /// Must be called within a tokio runtime when `limits.prewarm > 0`: the
    /// prewarmed instances start at once.
    pub fn new(state: S, limits: PoolLimits) -> Self {
        Self::with_recorder(state, limits, Arc::new(NoRecorder))
    }

    /// Like [`Self::new`], reporting every request and instance to `recorder`.
    pub fn with_recorder(state: S, limits: PoolLimits, recorder: Arc<dyn Recorder>) -> Self {
        let shared = Arc::new(Shared {
            state,
            circuit: Circuit::new(&limits),
            limiter: limits
                .adaptive_concurrency
                .clone()
                .map(|config| Limiter::new(config, Instant::now())),
            pool: Pool::new(limits),
            shutdown: CancellationToken::new(),
            recorder,
            counters: Counters::default(),
        });
        shared.refill_prewarm();
        ProxyHandler(shared)
    }

    /// The state the handler was made with.
    pub fn state(&self) -> &S {
        &self.0.state
    }

    /// Handles `request`, returning the guest's response once its head is
    /// ready; the body streams from the guest as it is read.
    ///
    /// The request goes to an instance advertising spare capacity, or to a
    /// new instance (within [`PoolLimits::max_instances`]), or waits in the
    /// bounded queue; it fails at once with [`Error::Overloaded`] when the
    /// queue is full, and with [`Error::ShuttingDown`] after
    /// [`Self::shutdown`]. See [`Error`] for the other failures.
    ///
    /// Dropping the returned future gives up on the request: if it is still
    /// queued it leaves the queue and never reaches a guest; if it is
    /// running, it stops counting against its instance (the guest task may
    /// still finish in the background, until the instance expires).
    pub async fn handle(&self, data: RequestData<S>, request: Request) -> Result<Response, Error> {
        let shared = &self.0;
        let admitted = Instant::now();
        let mut record = Record {
            recorder: &*shared.recorder,
            admitted,
            report: None,
        };
        let mut place = match &shared.limiter {
            None => None,
            Some(limiter) => match limiter.try_acquire() {
                Some(permit) => Some(InFlight {
                    limiter,
                    permit: Some(permit),
                }),
                None => {
                    shared.counters.overloaded.fetch_add(1, Relaxed);
                    record.finish(None, Outcome::Overloaded);
                    return Err(shared.overloaded().into());
                }
            },
        };
        let (tx, mut rx) = oneshot::channel();
        let job = Job { data, request, tx };
        let queued = match shared.pool.admit(job) {
            Admission::Handed => None,
            Admission::Start(id, job) => {
                shared.spawn_worker(id, Some(job));
                None
            }
            Admission::Queued(ticket) => Some(QueueSlot {
                pool: &shared.pool,
                ticket,
            }),
            Admission::Overloaded(_) => {
                shared.counters.overloaded.fetch_add(1, Relaxed);
                record.finish(None, Outcome::Overloaded);
                return Err(shared.overloaded().into());
            }
            Admission::Closed(_) => {
                record.finish(None, Outcome::ShuttingDown);
                return Err(ShuttingDown.into());
            }
        };
        shared.refill_prewarm();

        let reply = match queued {
            None => (&mut rx).await,
            Some(slot) => {
                let wait = shared.pool.limits().max_queue_wait;
                match tokio::time::timeout(wait, &mut rx).await {
                    Ok(reply) => reply,
                    Err(_) if slot.leave() => {
                        shared.counters.overloaded.fetch_add(1, Relaxed);
                        record.finish(None, Outcome::Overloaded);
                        return Err(shared.overloaded().into());
                    }
                    // A worker took it just as the wait ran out.
                    Err(_) => (&mut rx).await,
                }
            }
        };
        let Reply { delivery, dispatch } = reply.unwrap_or_else(|_| Reply {
            delivery: Err(TrapOrPanicError::new("the worker vanished before responding").into()),
            dispatch: None,
        });
        if dispatch.is_some() {
            shared.counters.requests_started.fetch_add(1, Relaxed);
            if let Some(place) = &mut place {
                place.done(admitted.elapsed());
            }
        }
        record.finish(dispatch, outcome_of(&delivery));
        delivery
    }

    /// Live gauges and running totals.
    pub fn stats(&self) -> Stats {
        let shared = &self.0;
        let occupancy = shared.pool.occupancy();
        let counters = &shared.counters;
        Stats {
            live_instances: occupancy.live,
            available_instances: occupancy.advertised,
            queued_requests: occupancy.queued,
            instantiations: counters.instantiations.load(Relaxed),
            instantiation_failures: counters.instantiation_failures.load(Relaxed),
            requests_started: counters.requests_started.load(Relaxed),
            overloaded: counters.overloaded.load(Relaxed),
            concurrency_limit: shared.limiter.as_ref().map(Limiter::limit),
            exits: std::array::from_fn(|i| counters.exits[i].load(Relaxed)),
        }
    }

    /// Stops admitting requests: new ones fail with [`Error::ShuttingDown`].
    /// Queued and running requests go on; each instance exits once its
    /// requests are done. Idempotent.
    pub fn shutdown(&self) {
        self.0.pool.close();
        self.0.shutdown.cancel();
    }

    /// Whether [`Self::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.0.pool.is_closed()
    }

    /// Waits until no instance is alive (after [`Self::shutdown`], until the
    /// pool has drained).
    pub async fn drained(&self) {
        while self.0.pool.occupancy().live > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A request's place under the adaptive limit: given back when the request
/// ends, with its latency if it reached a guest, or without when it failed
/// before or was dropped.
struct InFlight<'a> {
    limiter: &'a Limiter,
    permit: Option<Permit>,
}

impl InFlight<'_> {
    fn done(&mut self, latency: Duration) {
        if let Some(permit) = self.permit.take() {
            self.limiter.release(permit, Some(latency), Instant::now());
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.limiter.release(permit, None, Instant::now());
        }
    }
}

impl<S: HandlerState> Shared<S> {
    pub(crate) fn spawn_worker(self: &Arc<Self>, id: WorkerId, job: Option<Job<S>>) {
        tokio::spawn(worker::run(self.clone(), id, job));
    }

    fn refill_prewarm(self: &Arc<Self>) {
        if self.pool.limits().prewarm == 0 {
            return;
        }
        for id in self.pool.prewarm() {
            self.spawn_worker(id, None);
        }
    }

    fn overloaded(&self) -> Overloaded {
        let wait = self.pool.limits().max_queue_wait;
        Overloaded::new(wait.max(Duration::from_secs(1)))
    }

    /// Creates an instance for worker `id`, retrying with backoff, unless the
    /// circuit is open.
    pub(crate) async fn instantiate(
        &self,
        id: WorkerId,
    ) -> Result<Instance<S>, InstantiationFailure> {
        if let Err(cause) = self.circuit.admit() {
            return Err(InstantiationFailure {
                cause,
                circuit_open: true,
            });
        }
        let limits = self.pool.limits();
        let mut backoff = limits.retry_backoff;
        let mut attempt = 0;
        loop {
            match self.state.instantiate(id).await {
                Ok(instance) => {
                    self.circuit.succeeded();
                    self.counters.instantiations.fetch_add(1, Relaxed);
                    return Ok(instance);
                }
                Err(error) => {
                    self.counters.instantiation_failures.fetch_add(1, Relaxed);
                    let cause = Arc::new(error);
                    let opened = self.circuit.failed(&cause);
                    if opened
                        || attempt >= limits.instantiation_retries
                        || self.shutdown.is_cancelled()
                    {
                        return Err(InstantiationFailure {
                            cause,
                            circuit_open: false,
                        });
                    }
                    tracing::debug!(attempt, error = %format_args!("{cause:#}"), "instantiation failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
            }
        }
    }

    /// Passes on a job a worker received but cannot take.
    pub(crate) fn redispatch(self: &Arc<Self>, job: Job<S>) {
        if let Some((id, job)) = self.pool.readmit(job) {
            self.spawn_worker(id, Some(job));
        }
    }

    pub(crate) fn worker_exited(
        self: &Arc<Self>,
        id: WorkerId,
        unstarted: Vec<Job<S>>,
        report: InstanceReport,
    ) {
        self.counters.exits[report.reason.index()].fetch_add(1, Relaxed);
        self.recorder.instance(&report);
        for (id, job) in self.pool.exited(id, unstarted) {
            self.spawn_worker(id, Some(job));
        }
        self.refill_prewarm();
    }
}

/// A queued request's place in line; leaving it (timeout, or the caller
/// dropping the request) takes the job out of the queue.
struct QueueSlot<'a, J> {
    pool: &'a Pool<J>,
    ticket: Ticket,
}

impl<J> QueueSlot<'_, J> {
    /// Leaves the queue; `false` if a worker already took the job.
    fn leave(self) -> bool {
        let left = self.pool.cancel(self.ticket).is_some();
        std::mem::forget(self);
        left
    }
}

impl<J> Drop for QueueSlot<'_, J> {
    fn drop(&mut self) {
        self.pool.cancel(self.ticket);
    }
}

/// Reports a request once, as cancelled if `handle` is dropped first.
struct Record<'a> {
    recorder: &'a dyn Recorder,
    admitted: Instant,
    report: Option<RequestReport>,
}

impl Record<'_> {
    fn finish(&mut self, dispatch: Option<crate::call::Dispatch>, outcome: Outcome) {
        let now = Instant::now();
        let report = RequestReport {
            incarnation: dispatch.map(|d| d.incarnation),
            queue_wait: dispatch.map_or(now - self.admitted, |d| d.accepted_at - self.admitted),
            instantiation: dispatch.and_then(|d| d.instantiation),
            guest_time: dispatch.map_or(Duration::ZERO, |d| now - d.accepted_at),
            outcome,
        };
        self.recorder.request(&report);
        self.report = Some(report);
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if self.report.is_none() {
            self.finish(None, Outcome::Cancelled);
        }
    }
}

fn outcome_of(delivery: &Delivery) -> Outcome {
    match delivery {
        Ok(response) => Outcome::Responded(response.status().as_u16()),
        Err(Error::Expired(_)) => Outcome::Expired,
        Err(Error::TrapOrPanic(_)) => Outcome::Trapped,
        Err(Error::Guest(_)) => Outcome::GuestError,
        Err(Error::Overloaded(_)) => Outcome::Overloaded,
        Err(Error::ShuttingDown(_)) => Outcome::ShuttingDown,
        Err(Error::Instantiation(_)) => Outcome::InstantiationFailed,
        Err(Error::InvalidRequest(_)) => Outcome::InvalidRequest,
    }
}

/// Akka-style restart budget: too many failed instantiations within a
/// window open the circuit, and requests needing a new instance fail fast
/// until the cool-down has passed. After it, the next attempt is a probe:
/// one more failure re-opens the circuit at once, a success closes it.
struct Circuit {
    threshold: usize,
    window: Duration,
    cooldown: Duration,
    state: Mutex<CircuitState>,
}

#[derive(Default)]
struct CircuitState {
    failures: VecDeque<Instant>,
    open_until: Option<Instant>,
    last_error: Option<Arc<wasmtime::Error>>,
}

impl Circuit {
    fn new(limits: &PoolLimits) -> Self {
        Circuit {
            threshold: limits.circuit_failures.max(1) as usize,
            window: limits.circuit_window,
            cooldown: limits.circuit_cooldown,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CircuitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err` with the last failure while the circuit is open.
    fn admit(&self) -> Result<(), Arc<wasmtime::Error>> {
        let state = self.lock();
        match (state.open_until, &state.last_error) {
            (Some(until), Some(error)) if Instant::now() < until => Err(error.clone()),
            _ => Ok(()),
        }
    }

    fn succeeded(&self) {
        let mut state = self.lock();
        if !state.failures.is_empty() || state.open_until.is_some() {
            *state = CircuitState::default();
        }
    }

    /// Records a failure; `true` if it opened the circuit.
    fn failed(&self, error: &Arc<wasmtime::Error>) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        state.last_error = Some(error.clone());
        state.failures.push_back(now);
        while state
            .failures
            .front()
            .is_some_and(|at| now - *at > self.window)
        {
            state.failures.pop_front();
        }
        if state.failures.len() >= self.threshold {
            if state.open_until.is_none_or(|until| until <= now) {
                tracing::warn!(failures = state.failures.len(), cooldown = ?self.cooldown, "instantiation circuit opened");
            }
            state.open_until = Some(now + self.cooldown);
            return true;
        }
        false
    }
}
