//! A worker: one store, one instance, the requests it takes, and its end.
//!
//! The worker runs the store's event loop (`Store::run_concurrent`). Inside
//! it, a `poll_fn` loop reaps finished calls ([`InHand`]), decides whether
//! to take more ([`Retirement`]), offers spare capacity to the pool and
//! takes jobs from its mailbox ([`Offer`]), and starts them as guest tasks
//! ([`Starter`]), each with its per-request deadline (level one). Around it, a second
//! `poll_fn` polls the instance-level [`WorkerExpiration`] every time the
//! event loop yields (level two); epoch interruption makes a spinning guest
//! yield at every engine tick, so this poll cannot be starved. When level two
//! fires, the store is dropped with whatever it was running.
//!
//! A request stays on the worker's books after its response head, until the
//! caller has read its response body (or, p2, the handler returned): the
//! instance writes that body, so a trap for a later request would cut it
//! off, and the request's deadline no longer applies to it.
//!
//! Concurrency is earned: taking a job clears `accept_more`, assuming the new
//! task is CPU-bound. Only when the event loop returns `Pending` with the
//! guest not suspended at an epoch tick (every task waits on I/O, as
//! opposed to a guest computing: see `Activity`) does the outer loop set it
//! again and let the inner loop advertise. A CPU-bound guest so never
//! hoards requests. An instance with no call in hand may take one without
//! earning it, unless its guest computes and still has a response body to
//! write: wasmtime keeps resuming a computing task, so the next request
//! would hold that body back for its whole computation
//! ([`InHand::is_free`]).
//!
//! The same observation tells the [`Supervisor`] whether this worker is
//! *running* (instantiating, or its guest computing) or *parked* (waiting on
//! I/O): the scheduler starts new requests only while few enough run.
//!
//! The worker talks to whoever dispatches to it only through [`Supervisor`],
//! the interface defined here.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use wasmtime::AsContextMut as _;
use wasmtime::component::Accessor;

use crate::call::{Ended, GuestCall, Streaming};
use crate::metrics::{ExitReason, InstanceReport};
use crate::occupant::Occupants;
use crate::policy::{
    HandlerState, Instance, Proxy, ShouldAccept, WorkerExpiration, WorkerState, WorkerStatus,
};
use crate::pool::{ClientKey, Mailbox, Resume, WorkerId};
use crate::reply::{Acceptance, Fate, Progress, Reply, Responder};
use crate::{Error, ExpirationError, Request, TrapOrPanicError};

type RequestData<S> = <<S as HandlerState>::WorkerState as WorkerState>::RequestData;

/// A request on its way to a worker.
pub(crate) struct Job<S: HandlerState> {
    /// When the request was admitted.
    pub(crate) admitted: Instant,
    /// Who the request is for, if its server said.
    pub(crate) client: Option<ClientKey>,
    pub(crate) data: RequestData<S>,
    pub(crate) request: Request,
    pub(crate) tx: oneshot::Sender<Reply>,
}

impl<S: HandlerState> Job<S> {
    /// Fails a job before any worker took it.
    pub(crate) fn reply_early(tx: oneshot::Sender<Reply>, error: Error) {
        let _ = tx.send(Reply {
            answer: Err(error),
            accepted: None,
        });
    }
}

/// Why a worker has no instance.
pub(crate) struct InstantiationFailure {
    pub(crate) cause: Arc<wasmtime::Error>,
    /// The circuit was open: nothing was attempted.
    pub(crate) circuit_open: bool,
    /// No room (instance pool, memory budget): waiting may help.
    pub(crate) at_capacity: bool,
}

impl InstantiationFailure {
    /// The instantiation itself failed.
    pub(crate) fn fault(cause: Arc<wasmtime::Error>) -> Self {
        InstantiationFailure {
            cause,
            circuit_open: false,
            at_capacity: false,
        }
    }
}

/// What a worker needs from whoever dispatches requests to it.
pub(crate) trait Supervisor<S: HandlerState>: Send + Sync + Sized + 'static {
    /// Fires when the handler shuts down: take nothing more, finish, exit.
    fn shutdown(&self) -> &CancellationToken;

    /// Creates the instance of worker `id` (with whatever retries apply).
    fn instantiate(
        &self,
        id: WorkerId,
    ) -> impl Future<Output = Result<Instance<S>, InstantiationFailure>> + Send;

    /// Worker `id` ended without an instance; `first` is the job it was
    /// started for, now the supervisor's to requeue or fail.
    fn instantiation_failed(
        self: &Arc<Self>,
        id: WorkerId,
        first: Option<Job<S>>,
        failure: InstantiationFailure,
        report: InstanceReport,
    );

    /// Worker `id` waits on I/O and has room for one more request: returns
    /// one now, or mails one to `mailbox` later. A worker given a job is
    /// running.
    fn advertise(&self, id: WorkerId, mailbox: &Mailbox<Job<S>>) -> Option<Job<S>>;

    /// Worker `id` has no room any more; jobs already mailed are its own.
    fn withdraw(&self, id: WorkerId);

    /// Worker `id` waits on I/O (or has nothing to do).
    fn park(self: &Arc<Self>, id: WorkerId);

    /// Worker `id` runs guest code again.
    fn unpark(&self, id: WorkerId);

    /// Worker `id`'s guest has computed for a time slice: yields its place
    /// if another client's request should have it, returning what to wait
    /// on before running again; `None` runs on.
    fn yield_place(self: &Arc<Self>, id: WorkerId) -> Option<Resume>;

    /// How long a guest computes before it asks to yield its place.
    fn time_slice(&self) -> Duration;

    /// A worker handed a request to its guest.
    fn started(&self);

    /// A job mailed to a worker that could not take it after all.
    fn redispatch(self: &Arc<Self>, job: Job<S>);

    /// Worker `id` has ended: `unstarted` were mailed to it but never
    /// reached the guest, so they may go elsewhere.
    fn exited(self: &Arc<Self>, id: WorkerId, unstarted: Vec<Job<S>>, report: InstanceReport);
}

/// Runs worker `id` from instantiation to disposal. `first` is the job it
/// was started for (`None` for a prewarmed worker).
pub(crate) async fn run<S: HandlerState, D: Supervisor<S>>(
    supervisor: Arc<D>,
    id: WorkerId,
    first: Option<Job<S>>,
) {
    let span = tracing::info_span!("instance", incarnation = id);
    async {
        // Armed from the start: whatever panics (the policy's instantiate,
        // the guest, a recorder), the supervisor hears of the end.
        let mut exit = ExitGuard {
            supervisor: supervisor.clone(),
            id,
            unstarted: Vec::new(),
            report: None,
            armed: true,
        };
        let began = Instant::now();
        let instance = match supervisor.instantiate(id).await {
            Ok(instance) => instance,
            Err(failure) => {
                let report = InstanceReport::ended_early(
                    id,
                    began.elapsed(),
                    Duration::ZERO,
                    ExitReason::InstantiationFailed,
                    format!("{:#}", failure.cause),
                );
                exit.disarm();
                supervisor.instantiation_failed(id, first, failure, report);
                return;
            }
        };
        let instantiation_time = began.elapsed();
        tracing::debug!(?instantiation_time, "instantiated");
        let Instance {
            mut store,
            proxy,
            view,
            expiration,
            state,
        } = instance;
        let parts = Parts {
            proxy: &proxy,
            view,
            expiration,
            state: &state,
        };
        let born = Instant::now();
        let served = serve(
            &supervisor,
            id,
            &mut store,
            parts,
            first,
            instantiation_time,
            born,
            &mut exit,
        );
        // A panic in the loop (a policy's, or ours) still ends in the
        // policy's `drop` with the store: that is its contract.
        let mut report = match AssertUnwindSafe(served).catch_unwind().await {
            Ok(report) => report,
            Err(_) => {
                tracing::error!("the worker panicked; its instance is dropped");
                InstanceReport::ended_early(
                    id,
                    instantiation_time,
                    born.elapsed(),
                    ExitReason::Trapped,
                    PANICKED.into(),
                )
            }
        };
        // Callers whose answers this instance just completed were woken on
        // this thread, where tokio runs them next, but only once this task
        // yields. Dropping the store resets its memory: milliseconds for a
        // large instance (the Python app's first request took 13 ms instead
        // of 5 without this), so let them go first. Small instances skip the
        // yield, which would cost them 9% of their throughput.
        if instantiation_time >= HEAVY_INSTANCE {
            tokio::task::yield_now().await;
        }
        state.drop(store, &mut report);
        exit.report = Some(report);
    }
    .instrument(span)
    .await;
}

/// An instance that takes this long to instantiate is large enough that
/// resetting its memory holds up a thread noticeably (see [`run`]).
const HEAVY_INSTANCE: Duration = Duration::from_micros(500);

/// The error of an instance whose worker panicked.
const PANICKED: &str = "the worker panicked";

/// Makes sure the supervisor hears of the worker's end, even if it panicked.
struct ExitGuard<S: HandlerState, D: Supervisor<S>> {
    supervisor: Arc<D>,
    id: WorkerId,
    unstarted: Vec<Job<S>>,
    report: Option<InstanceReport>,
    armed: bool,
}

impl<S: HandlerState, D: Supervisor<S>> ExitGuard<S, D> {
    /// The end is reported another way.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl<S: HandlerState, D: Supervisor<S>> Drop for ExitGuard<S, D> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let report = self.report.take().unwrap_or_else(|| {
            InstanceReport::ended_early(
                self.id,
                Duration::ZERO,
                Duration::ZERO,
                ExitReason::Trapped,
                PANICKED.into(),
            )
        });
        self.supervisor
            .exited(self.id, std::mem::take(&mut self.unstarted), report);
    }
}

/// Tells a guest that computes from one that waits (on I/O, a timer, its
/// client), makes a computing guest give way to the server's I/O, and
/// suspends one that computed for a whole time slice if another client's
/// request should have its running place.
///
/// At every epoch tick the store's deadline callback, which the worker
/// sets, suspends the guest in [`tokio::task::yield_now`]: a wake that
/// tokio defers until the thread has run its other ready tasks and polled
/// for I/O. (wasmtime's own yield wakes the task at once, and a thread
/// polls for I/O only every `event_interval` tasks, 61 by default: under
/// overload, with a computing guest on every thread, new requests, `503`s
/// and finished responses waited out tens of guest slices.) Past the time
/// slice, it asks the [`Supervisor`] instead whether to yield the place,
/// and if so waits there until the pool lets it run again; the level-two
/// expiration, polled outside the event loop, still applies meanwhile.
///
/// The guest is computing when a poll of the event loop leaves it pending
/// while it is suspended at a tick. Other signs mislead: the loop wakes
/// itself for I/O it routes (a request body's next piece reaching the
/// guest's stream) and for tokio's cooperative budget, so a client
/// streaming tiny pieces kept its instance "running" and two of them left
/// no room for any other request; and a guest may yield and be resumed
/// within one poll, then finish and wait, idle but not parked.
struct Activity {
    at_tick: Arc<AtomicBool>,
    /// Since when the guest has computed without a break (its last request
    /// start, or the last poll that found every task waiting), or since
    /// the pool last refused it a yield.
    computing_since: Arc<Mutex<Instant>>,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Activity {
            at_tick: Arc::default(),
            computing_since: Arc::new(Mutex::new(now)),
        }
    }

    /// Makes `store` yield at every epoch tick, noting it here, and offer
    /// worker `id`'s place at the end of each time slice.
    fn watch<T: 'static, S: HandlerState, D: Supervisor<S>>(
        &self,
        store: &mut wasmtime::Store<T>,
        supervisor: &Arc<D>,
        id: WorkerId,
    ) {
        let at_tick = self.at_tick.clone();
        let since = self.computing_since.clone();
        let supervisor = supervisor.clone();
        let slice = supervisor.time_slice();
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            at_tick.store(true, Relaxed);
            let at_tick = at_tick.clone();
            let resume = {
                let mut since = lock(&since);
                if since.elapsed() < slice {
                    None
                } else {
                    let resume = supervisor.yield_place(id);
                    if resume.is_none() {
                        // Nobody to yield to: ask again a slice later, not
                        // at every tick.
                        *since = Instant::now();
                    }
                    resume
                }
            };
            let since = since.clone();
            Ok(wasmtime::UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    match resume {
                        Some(resume) => {
                            // An error means the pool is gone: run on.
                            let _ = resume.await;
                            *lock(&since) = Instant::now();
                        }
                        None => tokio::task::yield_now().await,
                    }
                    at_tick.store(false, Relaxed);
                }),
            ))
        });
    }

    /// The guest starts its time slice afresh: it took a request, or every
    /// task waited.
    fn rest(&self) {
        *lock(&self.computing_since) = Instant::now();
    }

    /// Polls `event_loop` with `cx`; then whether the guest is computing.
    fn poll<F: Future>(
        &self,
        event_loop: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> (Poll<F::Output>, bool) {
        let poll = event_loop.poll(cx);
        (poll, self.at_tick.load(Relaxed))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Start times of outstanding requests; the most recent one is what the
/// level-two expiration measures from.
#[derive(Default)]
struct StartTimes(BTreeMap<Instant, usize>);

impl StartTimes {
    fn add(&mut self, at: Instant) {
        *self.0.entry(at).or_default() += 1;
    }

    fn remove(&mut self, at: Instant) {
        if let Some(count) = self.0.get_mut(&at) {
            *count -= 1;
            if *count == 0 {
                self.0.remove(&at);
            }
        }
    }

    fn most_recent(&self) -> Option<Instant> {
        self.0.last_key_value().map(|(at, _)| *at)
    }
}

/// How the inner loop ended on its own.
#[derive(Clone, Copy)]
enum Finished {
    ReuseSpent,
    Expired,
    Shutdown,
    Abandoned,
}

/// How the worker ended, seen from outside the event loop.
enum Ending {
    Finished(Finished),
    Trapped(wasmtime::Error),
    ExpiredWhile(WorkerStatus),
}

/// The instance's working life: runs its event loop until it ends, and
/// says how in the report. The store stays with the caller, so that it
/// reaches [`WorkerState::drop`] even if this panics.
#[allow(clippy::too_many_arguments)]
async fn serve<S: HandlerState, D: Supervisor<S>>(
    supervisor: &Arc<D>,
    id: WorkerId,
    store: &mut wasmtime::Store<S::StoreData>,
    parts: Parts<'_, S>,
    first: Option<Job<S>>,
    instantiation_time: Duration,
    born: Instant,
    exit: &mut ExitGuard<S, D>,
) -> InstanceReport {
    let Parts {
        proxy,
        view,
        expiration,
        state,
    } = parts;
    let shared = Shared::new(proxy, born);
    let prewarmed = first.is_none();
    let starter = Starter {
        supervisor,
        id,
        proxy,
        view,
        state,
        shared: &shared,
        instantiated_for_first: (!prewarmed).then_some(instantiation_time),
    };
    let mut offer = Offer::new(supervisor, id);
    let offer_ref = &mut offer;
    let func = proxy.handle_func();

    let inner = async move |accessor: &Accessor<S::StoreData>| -> wasmtime::Result<Finished> {
        let starter = &starter;
        let mut in_hand = InHand::default();
        let mut retirement = Retirement::default();
        let mut shutdown = pin!(supervisor.shutdown().cancelled());
        if let Some(job) = first {
            in_hand.take(starter.start(accessor, job), starter.shared);
        }

        poll_fn(|cx| {
            loop {
                // Reap finished calls first: an expiry must stop this
                // instance accepting before it takes anything new.
                if in_hand.reap(cx, &mut retirement)? {
                    starter.shared.note_doing(in_hand.now_doing());
                }
                if retirement.may_accept && shutdown.as_mut().poll(cx).is_ready() {
                    retirement.end(Finished::Shutdown);
                }
                // Only calls whose callers went away are left: end them
                // with the instance rather than let them hold it.
                let orphans = starter.shared.orphans.load(Relaxed);
                if orphans > 0 && in_hand.len() == orphans {
                    if retirement.may_accept {
                        retirement.end(Finished::Abandoned);
                    }
                    offer_ref.update(false, starter.shared);
                    return Poll::Ready(Ok(retirement.reason));
                }
                // Whether to offer room for one more request: the store can
                // take another call, the policy's limits allow it, and the
                // instance earned concurrency by parking since its last
                // request (a CPU-bound guest hoards nothing).
                let ready = accessor.poll_ready_for_concurrent_call(func, cx).is_ready();
                let shared = starter.shared;
                let want = ready
                    && retirement.may_accept
                    && retirement.wants_more(
                        state.should_accept_request(in_hand.len(), shared.served()),
                        in_hand.is_free(shared) || shared.accept_more.load(Relaxed),
                    );
                // Offer it (a queued job may come at once), or take the
                // offer back; or take a job mailed since the offer.
                if let Some(job) = offer_ref.update(want, starter.shared) {
                    in_hand.take(starter.start(accessor, job), starter.shared);
                    continue;
                }
                if let Some(job) = offer_ref.mailed(cx, starter.shared) {
                    if want {
                        in_hand.take(starter.start(accessor, job), starter.shared);
                    } else {
                        // Capacity went away as the job arrived: pass it on.
                        supervisor.redispatch(job);
                    }
                    continue;
                }

                // A retired instance lives for the requests it has in hand:
                // their servers hear how few keep it.
                if !retirement.may_accept && in_hand.len() > 0 {
                    starter.shared.occupants.retired_with(in_hand.len());
                }
                // Nothing more to take now: wait for the guest, or end.
                if in_hand.len() > 0 {
                    return Poll::Pending;
                }
                // No request outstanding; the guest may still be working
                // for earlier ones (streaming a body, say), which it may
                // finish unless a request expired: its task is still
                // running, and waiting for leftover work would wait for it.
                let expired = matches!(retirement.reason, Finished::Expired);
                if !expired && accessor.poll_no_interesting_tasks(cx).is_pending() {
                    return Poll::Pending;
                }
                if !(retirement.may_accept && ready) {
                    offer_ref.update(false, starter.shared);
                    return Poll::Ready(Ok(retirement.reason));
                }
                starter
                    .shared
                    .note_doing((WorkerStatus::Idle, Instant::now()));
                return Poll::Pending;
            }
        })
        .await
    };

    shared.activity.watch(store, supervisor, id);
    let ending = drive(
        pin!(store.run_concurrent(inner)),
        pin!(expiration),
        &shared,
        supervisor,
        id,
        prewarmed,
    )
    .await;
    exit.unstarted = offer.close();
    report(ending, id, instantiation_time, born, &shared)
}

/// Starts requests on this instance as guest tasks.
struct Starter<'w, S: HandlerState, D> {
    supervisor: &'w Arc<D>,
    id: WorkerId,
    proxy: &'w Proxy,
    view: fn(&mut S::StoreData) -> wasmtime_wasi_http::WasiHttpCtxView<'_>,
    state: &'w S::WorkerState,
    shared: &'w Shared,
    /// Reported with the first request of an instance created for it.
    instantiated_for_first: Option<Duration>,
}

/// A request's call as a guest task: it resolves at the response head with
/// how the call ended, the body to come, and when the request started.
type CallFuture<'a> = Pin<
    Box<dyn Future<Output = wasmtime::Result<(Ended, Option<Streaming<'a>>, Instant)>> + Send + 'a>,
>;

impl<'w, S: HandlerState, D: Supervisor<S>> Starter<'w, S, D> {
    /// Starts `job` as a guest task, unless its caller has left (or the
    /// call could not be set up: its caller gets the error).
    fn start<'a>(
        &self,
        accessor: &'a Accessor<S::StoreData>,
        job: Job<S>,
    ) -> Option<(Instant, CallFuture<'a>)>
    where
        'w: 'a,
    {
        let Job {
            data,
            mut request,
            tx,
            ..
        } = job;
        // Kept until the guest is done with the request (see
        // `ProxyHandler::handle`).
        let extensions = std::mem::take(request.extensions_mut());
        if tx.is_closed() {
            // The caller left while the job was on its way.
            return None;
        }
        let shared = self.shared;
        shared.accept_more.store(false, Relaxed);
        shared.activity.rest();
        let taken = shared.served.fetch_add(1, Relaxed) + 1;
        let accepted_at = Instant::now();
        let responder = Responder::new(
            tx,
            shared.fate.clone(),
            shared.progress.clone(),
            Acceptance {
                incarnation: self.id,
                accepted_at,
                instantiation: self.instantiated_for_first.filter(|_| taken == 1),
            },
        );
        let (proxy, view, state) = (self.proxy, self.view, self.state);
        let started = accessor.with(|mut store| {
            let call = GuestCall::start(store.as_context_mut(), proxy, view, request, &responder)?;
            let deadline = state.on_request_start(store.as_context_mut(), data, call.task());
            Ok::<_, crate::Error>((call, deadline))
        });
        let (call, deadline) = match started {
            Ok(started) => started,
            Err(error) => {
                responder.send(Err(error));
                return None;
            }
        };
        self.supervisor.started();
        shared.set_status(WorkerStatus::Requests, accepted_at);
        // Until the request leaves the worker's hands, with its body if any.
        let occupancy = shared.occupants.enter(&extensions);
        let call = async move {
            let (ended, body) = call
                .run(accessor, deadline, responder, &shared.orphans)
                .await?;
            drop(extensions);
            let body = match occupancy {
                Some(occupancy) => body.map(|body| -> Streaming<'a> {
                    Box::pin(async move {
                        let _occupancy = occupancy;
                        body.await
                    })
                }),
                None => body,
            };
            Ok((ended, body, accepted_at))
        };
        Some((accepted_at, Box::pin(call)))
    }
}

/// This worker's offer of room for one more request to the pool, and the
/// mailbox jobs come by once it is made.
struct Offer<'w, S: HandlerState, D> {
    supervisor: &'w Arc<D>,
    id: WorkerId,
    advertised: bool,
    mailbox: Mailbox<Job<S>>,
    inbox: mpsc::UnboundedReceiver<Job<S>>,
}

impl<'w, S: HandlerState, D: Supervisor<S>> Offer<'w, S, D> {
    fn new(supervisor: &'w Arc<D>, id: WorkerId) -> Self {
        let (mailbox, inbox) = mpsc::unbounded_channel();
        Offer {
            supervisor,
            id,
            advertised: false,
            mailbox,
            inbox,
        }
    }

    /// Makes the offer if `want` and not made yet (a queued job may come at
    /// once: the worker runs it), or takes it back if not `want`.
    fn update(&mut self, want: bool, shared: &Shared) -> Option<Job<S>> {
        if want && !self.advertised {
            let job = self.supervisor.advertise(self.id, &self.mailbox);
            shared.running.store(job.is_some(), Relaxed);
            self.advertised = job.is_none();
            return job;
        }
        if !want && self.advertised {
            self.supervisor.withdraw(self.id);
            self.advertised = false;
        }
        None
    }

    /// A job mailed since the offer was made, which used it up; the worker
    /// is running from then on.
    fn mailed(&mut self, cx: &mut Context<'_>, shared: &Shared) -> Option<Job<S>> {
        let Poll::Ready(Some(job)) = self.inbox.poll_recv(cx) else {
            return None;
        };
        self.advertised = false;
        shared.running.store(true, Relaxed);
        Some(job)
    }

    /// Takes the offer back for good, returning the jobs mailed but never
    /// started (withdrawing first means none can arrive after the mailbox
    /// is drained).
    fn close(mut self) -> Vec<Job<S>> {
        self.supervisor.withdraw(self.id);
        let mut unstarted = Vec::new();
        while let Ok(job) = self.inbox.try_recv() {
            unstarted.push(job);
        }
        unstarted
    }
}

/// The requests an instance has in hand: calls the guest is working on, and
/// response bodies clients still read, whose requests count against the
/// concurrency limit until then.
#[derive(Default)]
struct InHand<'a> {
    calls: FuturesUnordered<CallFuture<'a>>,
    bodies: FuturesUnordered<Streaming<'a>>,
    starts: StartTimes,
}

impl<'a> InHand<'a> {
    /// Takes a request started by [`Starter::start`] (at that time), if it
    /// was.
    fn take(&mut self, started: Option<(Instant, CallFuture<'a>)>, shared: &Shared) {
        if let Some((at, call)) = started {
            self.starts.add(at);
            self.calls.push(call);
            shared.peak.fetch_max(self.calls.len(), Relaxed);
        }
    }

    /// Requests in hand: calls and bodies.
    fn len(&self) -> usize {
        self.calls.len() + self.bodies.len()
    }

    /// Whether the instance may take a request without having earned it:
    /// no call is in hand, and no body either if its guest computes. The
    /// guest writes a body after the call returned (a p3 task), and a next
    /// request that computes would hold it back for its whole computation.
    /// (Waiting for the body costs a quick guest some 10% of its
    /// throughput, so it is spared that.)
    fn is_free(&self, shared: &Shared) -> bool {
        self.calls.is_empty() && (self.bodies.is_empty() || !shared.computes())
    }

    /// Collects the calls and bodies that have finished, telling
    /// `retirement` how each call ended; whether any had. A trap is an
    /// `Err`: the instance is unusable.
    fn reap(
        &mut self,
        cx: &mut Context<'_>,
        retirement: &mut Retirement,
    ) -> wasmtime::Result<bool> {
        let mut settled = false;
        while let Poll::Ready(Some(result)) = self.calls.poll_next_unpin(cx) {
            let (ended, body, started) = result?;
            self.bodies.extend(body);
            self.starts.remove(started);
            retirement.call_ended(ended);
            settled = true;
        }
        while let Poll::Ready(Some(result)) = self.bodies.poll_next_unpin(cx) {
            result?;
            settled = true;
        }
        Ok(settled)
    }

    /// What the instance does now: answering requests (since the most
    /// recent), delivering bodies clients still read, or leftover work.
    fn now_doing(&self) -> (WorkerStatus, Instant) {
        match self.starts.most_recent() {
            Some(at) => (WorkerStatus::Requests, at),
            None if !self.bodies.is_empty() => (WorkerStatus::Streaming, Instant::now()),
            None => (WorkerStatus::PostReturn, Instant::now()),
        }
    }
}

/// Whether an instance may take more requests, and if not, why it ends.
struct Retirement {
    may_accept: bool,
    reason: Finished,
}

impl Default for Retirement {
    fn default() -> Self {
        Retirement {
            may_accept: true,
            reason: Finished::ReuseSpent,
        }
    }
}

impl Retirement {
    /// The instance takes nothing more, for `reason` (an expiry, once
    /// recorded, stays the reason).
    fn end(&mut self, reason: Finished) {
        self.may_accept = false;
        if !matches!(self.reason, Finished::Expired) {
            self.reason = reason;
        }
    }

    /// Whether to take one more request, by the policy's `verdict` and
    /// whether the instance has `earned` concurrency; a `Never` verdict
    /// retires it.
    fn wants_more(&mut self, verdict: ShouldAccept, earned: bool) -> bool {
        match verdict {
            ShouldAccept::Yes => earned,
            ShouldAccept::No => false,
            ShouldAccept::Never => {
                self.end(Finished::ReuseSpent);
                false
            }
        }
    }

    fn call_ended(&mut self, ended: Ended) {
        match ended {
            // An abandoned call ran out within its deadline: the instance is
            // as good as after any answered request.
            Ended::Responded | Ended::Abandoned => {}
            Ended::Expired => self.end(Finished::Expired),
        }
    }
}

/// What the event loop and [`drive`], outside it, share about the worker.
struct Shared {
    /// What becomes of outstanding requests if the instance goes down.
    fate: Arc<Fate>,
    /// How far the answers to them have gone out, seen outside the event
    /// loop.
    progress: Arc<Progress>,
    /// The guest's host calls block its event loop while they wait (p2
    /// guests call synchronously), so the loop's view of its requests may be
    /// stale: [`Self::progress`] tells more.
    blocking_calls: bool,
    /// What the instance is doing and since when, for its expiration.
    status: Mutex<(WorkerStatus, Instant)>,
    /// Concurrency is earned: cleared when the worker takes a request, set
    /// again once every task waits on I/O, and only then may it advertise
    /// room for more.
    accept_more: AtomicBool,
    /// Whether the guest computes, and for how long (see [`Activity`]).
    activity: Activity,
    /// Polls of the event loop that left the guest computing.
    computing_polls: AtomicU64,
    /// Whether the supervisor counts this worker as running: it was started
    /// running, and every job it is given makes it running again.
    running: AtomicBool,
    /// Calls in hand whose callers went away, run out until they return
    /// (see [`GuestCall::run`]).
    orphans: AtomicUsize,
    /// The servers' accounts of the requests in hand.
    occupants: Occupants,
    /// Requests taken in all.
    served: AtomicU64,
    peak: AtomicUsize,
}

impl Shared {
    /// An instance of `proxy` born at `born`, idle, running (it was started
    /// running) and with nothing served.
    fn new(proxy: &Proxy, born: Instant) -> Self {
        Shared {
            fate: Arc::new(Fate::default()),
            progress: Arc::default(),
            blocking_calls: proxy.blocks_in_host_calls(),
            status: Mutex::new((WorkerStatus::Idle, born)),
            accept_more: AtomicBool::new(true),
            activity: Activity::new(born),
            computing_polls: AtomicU64::new(0),
            running: AtomicBool::new(true),
            orphans: AtomicUsize::new(0),
            occupants: Occupants::default(),
            served: AtomicU64::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    fn set_status(&self, status: WorkerStatus, since: Instant) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = (status, since);
    }

    /// Whether the guest's requests compute: at least one epoch tick for
    /// every two requests. A tick catches a quick guest now and then
    /// (hello-p3 under load: one request in 13), one that computes for
    /// milliseconds at every one.
    fn computes(&self) -> bool {
        self.computing_polls.load(Relaxed) * 2 >= self.served.load(Relaxed).max(1)
    }

    fn served(&self) -> usize {
        self.served.load(Relaxed) as usize
    }

    fn status(&self) -> (WorkerStatus, Instant) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records what the instance does now. Only a change of status restarts
    /// its clock, except for requests, whose clock is the most recent
    /// request's.
    fn note_doing(&self, (now_doing, since): (WorkerStatus, Instant)) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if now_doing != status.0 || now_doing == WorkerStatus::Requests {
            *status = (now_doing, since);
        }
    }
}

/// Polls the event loop until it ends and, after each poll that leaves it
/// pending, what the loop cannot see for itself: the instance-level
/// deadline (level two, which a guest stuck on the CPU or in a host call
/// cannot hide from), and whether the guest yielded at an epoch tick (still
/// running) or every task waits on I/O (parked: others may run in its
/// place, and it may take more work).
async fn drive<S: HandlerState, D: Supervisor<S>>(
    mut event_loop: Pin<&mut impl Future<Output = wasmtime::Result<wasmtime::Result<Finished>>>>,
    mut expiration: Pin<&mut S::WorkerExpiration>,
    shared: &Shared,
    supervisor: &Arc<D>,
    id: WorkerId,
    prewarmed: bool,
) -> Ending {
    let activity = &shared.activity;
    poll_fn(|cx| {
        let (mut poll, computing) = activity.poll(event_loop.as_mut(), cx);
        if poll.is_pending() {
            let (mut current, mut since) = shared.status();
            // A p2 guest blocked in a host call after sending its head keeps
            // the event loop (and its view of the requests) from running:
            // streaming is not waiting for a head.
            if shared.blocking_calls
                && current == WorkerStatus::Requests
                && let Some(status) = shared.progress.after_heads(cx)
            {
                (current, since) = status;
            }
            let untouched_prewarm = prewarmed && shared.served.load(Relaxed) == 0;
            if !(untouched_prewarm && current == WorkerStatus::Idle)
                && expiration.as_mut().poll(cx, current, since).is_ready()
            {
                if current != WorkerStatus::Idle {
                    shared.fate.set(ExpirationError.into());
                }
                return Poll::Ready(Ending::ExpiredWhile(current));
            }
            // A guest computing keeps the event loop from looking at its
            // calls: whether only orphans are left is told from here then.
            if computing && shared.progress.only_abandoned() {
                return Poll::Ready(Ending::Finished(Finished::Abandoned));
            }
            if computing {
                shared.computing_polls.fetch_add(1, Relaxed);
                if !shared.running.swap(true, Relaxed) {
                    supervisor.unpark(id);
                }
            } else {
                activity.rest();
                if shared.running.swap(false, Relaxed) {
                    supervisor.park(id);
                }
                if !shared.accept_more.swap(true, Relaxed) {
                    (poll, _) = activity.poll(event_loop.as_mut(), cx);
                }
            }
        }
        poll.map(|result| match result.and_then(|inner| inner) {
            Ok(finished) => Ending::Finished(finished),
            Err(trap) => {
                shared
                    .fate
                    .set(TrapOrPanicError::new(crate::describe(&trap)).into());
                Ending::Trapped(trap)
            }
        })
    })
    .await
}

/// The report of an instance that ended as `ending`, logged.
fn report(
    ending: Ending,
    id: WorkerId,
    instantiation_time: Duration,
    born: Instant,
    shared: &Shared,
) -> InstanceReport {
    let (reason, error) = match ending {
        Ending::Finished(Finished::ReuseSpent) => (ExitReason::ReuseSpent, None),
        Ending::Finished(Finished::Expired) => (ExitReason::Expired, None),
        Ending::Finished(Finished::Shutdown) => (ExitReason::Shutdown, None),
        Ending::Finished(Finished::Abandoned) => (ExitReason::Abandoned, None),
        Ending::ExpiredWhile(WorkerStatus::Idle) => (ExitReason::Idle, None),
        Ending::ExpiredWhile(_) => (ExitReason::Expired, None),
        Ending::Trapped(trap) => (ExitReason::Trapped, Some(crate::describe(&trap))),
    };
    match &error {
        Some(error) => tracing::warn!(reason = reason.as_str(), %error, "instance ended"),
        None => tracing::debug!(reason = reason.as_str(), "instance ended"),
    }
    InstanceReport {
        incarnation: id,
        instantiation_time,
        lifetime: born.elapsed(),
        requests_served: shared.served.load(Relaxed),
        peak_concurrency: shared.peak.load(Relaxed),
        reason,
        error,
        peak_memory: None,
    }
}

/// What the event loop needs of an [`Instance`] besides its store.
struct Parts<'a, S: HandlerState> {
    proxy: &'a Proxy,
    view: fn(&mut S::StoreData) -> wasmtime_wasi_http::WasiHttpCtxView<'_>,
    expiration: S::WorkerExpiration,
    state: &'a S::WorkerState,
}
