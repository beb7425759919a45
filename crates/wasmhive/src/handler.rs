//! [`ProxyHandler`]: the public facade over the dispatcher: `handle`,
//! `stats`, `shutdown`, and the guards that report each request once and
//! take a request out of the queue when its caller gives up.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::adaptive::{Limiter, Permit};
use crate::dispatch::Dispatcher;
use crate::metrics::{NoRecorder, Outcome, Recorder, RequestReport, Stats};
use crate::policy::{HandlerState, WorkerState};
use crate::pool::{Admission, ClientKey, Pool, PoolLimits, Ticket};
use crate::reply::{Acceptance, Answer, Reply};
use crate::worker::Job;
use crate::{Error, Overloaded, Request, Response, ShuttingDown, TrapOrPanicError};

type RequestData<S> = <<S as HandlerState>::WorkerState as WorkerState>::RequestData;

/// Dispatches requests to a pool of component-instance workers.
///
/// Cloning is cheap and every clone drives the same pool. See the
/// [crate documentation](crate) for the request path and the worker
/// lifecycle.
pub struct ProxyHandler<S: HandlerState> {
    dispatcher: Arc<Dispatcher<S>>,
    limiter: Option<Arc<Limiter>>,
}

impl<S: HandlerState> Clone for ProxyHandler<S> {
    fn clone(&self) -> Self {
        ProxyHandler {
            dispatcher: self.dispatcher.clone(),
            limiter: self.limiter.clone(),
        }
    }
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
        let limiter = limits
            .adaptive_concurrency
            .clone()
            .map(|config| Arc::new(Limiter::new(config, Instant::now())));
        ProxyHandler {
            dispatcher: Dispatcher::new(state, limits, recorder),
            limiter,
        }
    }

    /// The state the handler was made with.
    pub fn state(&self) -> &S {
        self.dispatcher.state()
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
    /// The guest sees an absolute URI: the authority from the request target
    /// or its `Host` header (a request with neither fails with
    /// [`Error::InvalidRequest`]), and the scheme of an [`http::uri::Scheme`]
    /// in the request's extensions (a server puts its connection's there:
    /// `https` over TLS), else the target's, else `http`.
    ///
    /// Dropping the returned future gives up on the request: if it is still
    /// queued it leaves the queue and never reaches a guest; if it is
    /// running, the guest task cannot be cancelled, so it runs on under its
    /// deadline, counted against its instance, until it returns or the
    /// instance ends with it (which it does once nothing else it holds is
    /// wanted).
    ///
    /// The request's extensions are dropped once the guest is done with the
    /// request: at the response head or the request's deadline, or, for an
    /// abandoned request, when its guest call returns (p2: sets its
    /// response) or its instance ends. A server may keep there what the
    /// request holds on its client's behalf (a place in a per-client share),
    /// so that going away does not give it back while a guest still works
    /// for that client. An [`Occupant`](crate::Occupant) there hears when the
    /// request keeps a retired instance alive. A [`ClientKey`] there says
    /// whose request it is, for sharing running places among clients (see
    /// [`PoolLimits::time_slice`]). (The
    /// [`PoolLimits::adaptive_concurrency`] limit is
    /// the handler's own, held by this future: an abandoned request leaves
    /// it at once.)
    pub async fn handle(&self, data: RequestData<S>, request: Request) -> Result<Response, Error> {
        let dispatcher = &self.dispatcher;
        let admitted = crate::dispatch::now();
        let mut record = Record {
            recorder: &*dispatcher.recorder,
            admitted,
            report: None,
        };
        let request = match crate::target::absolute(request) {
            Ok(request) => request,
            Err(error) => return record.fail(dispatcher, error),
        };
        let mut place = match &self.limiter {
            None => None,
            Some(limiter) => match limiter.try_acquire() {
                Some(permit) => Some(InFlight {
                    limiter,
                    permit: Some(permit),
                }),
                None => return record.fail(dispatcher, self.overloaded().into()),
            },
        };
        let (tx, mut rx) = oneshot::channel();
        let job = Job {
            admitted,
            client: request.extensions().get::<ClientKey>().copied(),
            data,
            request,
            tx,
        };
        let queued = match dispatcher.pool.admit(job, admitted) {
            Admission::Handed => None,
            Admission::Start(id, job) => {
                dispatcher.spawn_worker(id, Some(job));
                None
            }
            Admission::Queued(ticket) => Some(QueueSlot {
                pool: &dispatcher.pool,
                ticket,
            }),
            Admission::Overloaded(_) => return record.fail(dispatcher, self.overloaded().into()),
            Admission::Closed(_) => return record.fail(dispatcher, ShuttingDown.into()),
        };
        dispatcher.refill_prewarm();

        let reply = match queued {
            None => (&mut rx).await,
            // The pool sheds what it must; this is the backstop.
            Some(slot) => {
                match tokio::time::timeout(dispatcher.pool.limits().max_queue_wait, &mut rx).await {
                    Ok(reply) => reply,
                    Err(_) if slot.leave() => {
                        return record.fail(dispatcher, self.overloaded().into());
                    }
                    // A worker took it just as the wait ran out.
                    Err(_) => (&mut rx).await,
                }
            }
        };
        let Reply { answer, accepted } = reply.unwrap_or_else(|_| Reply {
            answer: Err(TrapOrPanicError::new("the worker vanished before responding").into()),
            accepted: None,
        });
        if accepted.is_some()
            && let Some(place) = &mut place
        {
            place.done(admitted.elapsed());
        }
        record.finish(dispatcher, accepted, answer)
    }

    /// Live gauges and running totals.
    pub fn stats(&self) -> Stats {
        let dispatcher = &self.dispatcher;
        let occupancy = dispatcher.pool.occupancy();
        let counters = &dispatcher.counters;
        Stats {
            live_instances: occupancy.live,
            running_instances: occupancy.running,
            available_instances: occupancy.advertised,
            queued_requests: occupancy.queued,
            suspended_instances: occupancy.suspended,
            instantiations: counters.instantiations.load(Relaxed),
            instantiation_failures: counters.instantiation_failures.load(Relaxed),
            requests_started: counters.requests_started.load(Relaxed),
            overloaded: counters.overloaded.load(Relaxed),
            yields: counters.yields.load(Relaxed),
            concurrency_limit: self.limiter.as_deref().map(Limiter::limit),
            exits: std::array::from_fn(|i| counters.exits[i].load(Relaxed)),
        }
    }

    /// Whether a request would start at once: none is queued, and fewer
    /// than [`PoolLimits::max_running`] instances run guest code. For a
    /// caller on the request path deciding whether to give way to other
    /// tasks: when this is `false`, guests have the CPU and what gives way
    /// waits behind them.
    pub fn has_room_to_run(&self) -> bool {
        self.dispatcher.pool.has_room_to_run()
    }

    /// Stops admitting requests: new ones fail with [`Error::ShuttingDown`].
    /// Queued and running requests go on; each instance exits once its
    /// requests are done. Idempotent.
    pub fn shutdown(&self) {
        self.dispatcher.pool.close();
        self.dispatcher.shutdown.cancel();
    }

    /// Whether [`Self::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.dispatcher.pool.is_closed()
    }

    /// Waits until no instance is alive (after [`Self::shutdown`], until the
    /// pool has drained).
    pub async fn drained(&self) {
        loop {
            // Registered before the look, so that an exit in between is not
            // missed.
            let emptied = self.dispatcher.emptied.notified();
            let mut emptied = std::pin::pin!(emptied);
            emptied.as_mut().enable();
            if self.dispatcher.pool.occupancy().live == 0 {
                return;
            }
            emptied.await;
        }
    }

    fn overloaded(&self) -> Overloaded {
        let wait = self.dispatcher.pool.limits().max_queue_wait;
        Overloaded::new(wait.max(Duration::from_secs(1)))
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

/// A queued request's place in line; leaving it (timeout, or the caller
/// dropping the request) takes the job out of the queue.
struct QueueSlot<'a, J: crate::pool::Sheddable> {
    pool: &'a Pool<J>,
    ticket: Ticket,
}

impl<J: crate::pool::Sheddable> QueueSlot<'_, J> {
    /// Leaves the queue; `false` if a worker already took the job.
    fn leave(self) -> bool {
        let left = self.pool.cancel(self.ticket).is_some();
        std::mem::forget(self);
        left
    }
}

impl<J: crate::pool::Sheddable> Drop for QueueSlot<'_, J> {
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
    /// Reports a request that failed before reaching a guest.
    fn fail<S: HandlerState>(
        &mut self,
        dispatcher: &Dispatcher<S>,
        error: Error,
    ) -> Result<Response, Error> {
        self.finish(dispatcher, None, Err(error))
    }

    fn finish<S: HandlerState>(
        &mut self,
        dispatcher: &Dispatcher<S>,
        accepted: Option<Acceptance>,
        answer: Answer,
    ) -> Result<Response, Error> {
        if let Err(Error::Overloaded(_)) = answer {
            dispatcher.counters.overloaded.fetch_add(1, Relaxed);
        }
        self.report(accepted, outcome_of(&answer));
        answer
    }

    fn report(&mut self, accepted: Option<Acceptance>, outcome: Outcome) {
        let now = crate::dispatch::now();
        let report = RequestReport {
            incarnation: accepted.map(|d| d.incarnation),
            queue_wait: accepted.map_or(now - self.admitted, |d| d.accepted_at - self.admitted),
            instantiation: accepted.and_then(|d| d.instantiation),
            guest_time: accepted.map_or(Duration::ZERO, |d| now - d.accepted_at),
            outcome,
        };
        self.recorder.request(&report);
        self.report = Some(report);
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if self.report.is_none() {
            self.report(None, Outcome::Cancelled);
        }
    }
}

fn outcome_of(answer: &Answer) -> Outcome {
    match answer {
        Ok(response) => Outcome::Responded(response.status().as_u16()),
        Err(Error::Expired(_)) => Outcome::Expired,
        Err(Error::TrapOrPanic(_)) => Outcome::Trapped,
        Err(Error::Guest(_)) => Outcome::GuestError,
        Err(Error::Overloaded(_)) => Outcome::Overloaded,
        Err(Error::ShuttingDown(_)) => Outcome::ShuttingDown,
        Err(Error::Instantiation(_)) => Outcome::InstantiationFailed,
        Err(Error::InvalidRequest(_)) => Outcome::InvalidRequest,
        Err(Error::Internal(_)) => Outcome::Internal,
    }
}
