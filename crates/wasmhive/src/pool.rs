//! Admission and hand-off of requests to workers, with no wasmtime in sight.
//!
//! [`Pool`] is the scheduling core of [`ProxyHandler`](crate::ProxyHandler):
//! one mutex guards the wait queue, the stack of workers advertising spare
//! capacity, and the count of live workers, so every decision sees one
//! consistent picture. That is what rules out orphans: a job is queued only
//! while no worker advertises capacity *and* no new worker may start, and
//! every event that could change either (a worker advertising, a worker
//! exiting) looks at the queue under the same lock.
//!
//! Invariant, checked by the tests: if the queue is not empty, no worker is
//! advertised and `live == max_instances`.
//!
//! The pool only decides; the handler acts on its answers (spawning workers,
//! failing requests). Jobs are generic so that the logic can be tested fast
//! and hard without compiling a component.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

/// The limits of the worker pool behind a [`ProxyHandler`](crate::ProxyHandler).
///
/// Build one with struct-update syntax:
/// `PoolLimits { max_instances: 8, ..Default::default() }`.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolLimits {
    /// Most instances alive at once, including those being instantiated.
    /// Each costs a store, linear memory and a pooling-allocator slot.
    /// Default: 256.
    pub max_instances: usize,
    /// Most requests waiting for an instance when all are busy and no more
    /// may start; beyond it requests fail at once with
    /// [`Overloaded`](crate::Overloaded). `0` disables queueing. Default: 1024.
    pub max_queue_len: usize,
    /// Longest a request waits in the queue before failing with
    /// [`Overloaded`](crate::Overloaded). Default: 2 s.
    pub max_queue_wait: Duration,
    /// Instances kept instantiated and idle ahead of demand, refilled in the
    /// background as requests take them. A prewarmed instance that has not
    /// served yet is exempt from the idle timeout. Default: 0.
    pub prewarm: usize,
    /// Further attempts after a failed instantiation, before the request
    /// fails with [`InstantiationError`](crate::InstantiationError).
    /// Default: 2.
    pub instantiation_retries: u32,
    /// Delay before the first retry; it doubles for each further one.
    /// Default: 10 ms.
    pub retry_backoff: Duration,
    /// Failed instantiations within [`Self::circuit_window`] that open the
    /// circuit: while open, requests needing a new instance fail fast.
    /// Default: 20.
    pub circuit_failures: u32,
    /// See [`Self::circuit_failures`]. Default: 10 s.
    pub circuit_window: Duration,
    /// An adaptive limit on the requests in flight across the pool, below
    /// the limits above: it settles where latency stays near its best and
    /// answers the surplus with [`Overloaded`](crate::Overloaded) at once,
    /// so a CPU-bound guest at several times its capacity keeps admitted
    /// requests fast. Suits apps whose requests take similar times; see
    /// [`AdaptiveConcurrency`](crate::AdaptiveConcurrency). Default: off.
    pub adaptive_concurrency: Option<crate::AdaptiveConcurrency>,
    /// How long the circuit stays open before one instantiation is tried
    /// again. Default: 5 s.
    pub circuit_cooldown: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_instances: 256,
            max_queue_len: 1024,
            max_queue_wait: Duration::from_secs(2),
            prewarm: 0,
            instantiation_retries: 2,
            retry_backoff: Duration::from_millis(10),
            circuit_failures: 20,
            circuit_window: Duration::from_secs(10),
            circuit_cooldown: Duration::from_secs(5),
            adaptive_concurrency: None,
        }
    }
}

/// Identifies a worker; also its instance's incarnation id.
pub(crate) type WorkerId = u64;

/// Where the pool delivers jobs to a worker that advertised capacity.
pub(crate) type Mailbox<J> = mpsc::UnboundedSender<J>;

/// Identifies a queued job, to take it out again.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Ticket(u64);

/// What [`Pool::admit`] did with a job.
#[derive(Debug)]
pub(crate) enum Admission<J> {
    /// Delivered to the mailbox of an advertised worker.
    Handed,
    /// The caller must start worker `WorkerId` with this job (already counted
    /// as live).
    Start(WorkerId, J),
    /// Waiting in the queue.
    Queued(Ticket),
    /// Rejected: every worker busy, none may start, the queue is full.
    Overloaded(J),
    /// Rejected: the pool is closed.
    Closed(J),
}

/// A snapshot of the pool's occupancy.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) struct Occupancy {
    pub live: usize,
    pub advertised: usize,
    pub queued: usize,
}

pub(crate) struct Pool<J> {
    limits: PoolLimits,
    state: Mutex<State<J>>,
}

struct State<J> {
    queue: VecDeque<(Ticket, J)>,
    next_ticket: u64,
    /// Workers with spare capacity, most recent last: hand-off is LIFO, so
    /// the busiest instances stay warm and surplus ones idle out.
    advertised: Vec<(WorkerId, Mailbox<J>)>,
    /// Workers started and not yet exited, including instantiating ones.
    live: usize,
    /// Prewarm workers started but not yet advertised.
    prewarming: Vec<WorkerId>,
    next_worker: WorkerId,
    closed: bool,
}

impl<J> Pool<J> {
    pub(crate) fn new(limits: PoolLimits) -> Self {
        Pool {
            limits,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                next_ticket: 0,
                advertised: Vec::new(),
                live: 0,
                prewarming: Vec::new(),
                next_worker: 1,
                closed: false,
            }),
        }
    }

    pub(crate) fn limits(&self) -> &PoolLimits {
        &self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State<J>> {
        // No code path panics while holding the lock, but a poisoned lock
        // must not take the whole server down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new request's job: hands it to an advertised worker, asks for
    /// a new worker, queues it, or rejects it.
    pub(crate) fn admit(&self, job: J) -> Admission<J> {
        let mut state = self.lock();
        if state.closed {
            return Admission::Closed(job);
        }
        let job = match state.hand_off(job) {
            Ok(()) => return Admission::Handed,
            Err(job) => job,
        };
        if state.live < self.limits.max_instances {
            let id = state.start_worker();
            return Admission::Start(id, job);
        }
        if state.queue.len() < self.limits.max_queue_len {
            let ticket = Ticket(state.next_ticket);
            state.next_ticket += 1;
            state.queue.push_back((ticket, job));
            return Admission::Queued(ticket);
        }
        Admission::Overloaded(job)
    }

    /// Worker `id` has capacity for one more job. Returns the oldest queued
    /// job if there is one; otherwise the worker is advertised and a later
    /// job arrives in `mailbox`. Either way the advertisement is used up by
    /// one job: the worker advertises again when it has capacity again.
    pub(crate) fn advertise(&self, id: WorkerId, mailbox: &Mailbox<J>) -> Option<J> {
        let mut state = self.lock();
        state.prewarming.retain(|&w| w != id);
        if let Some((_, job)) = state.queue.pop_front() {
            return Some(job);
        }
        if !state.closed && !state.advertised.iter().any(|(w, _)| *w == id) {
            state.advertised.push((id, mailbox.clone()));
        }
        None
    }

    /// Worker `id` no longer has capacity. A job handed to it before this
    /// call is still in its mailbox and is the worker's to run or return.
    pub(crate) fn withdraw(&self, id: WorkerId) {
        self.lock().advertised.retain(|(w, _)| *w != id);
    }

    /// Takes a queued job back out (its caller gave up or timed out).
    /// `None` means it was already handed to a worker.
    pub(crate) fn cancel(&self, ticket: Ticket) -> Option<J> {
        let mut state = self.lock();
        let index = state.queue.iter().position(|(t, _)| *t == ticket)?;
        state.queue.remove(index).map(|(_, job)| job)
    }

    /// Worker `id` has exited; `unstarted` are jobs it received but never
    /// started, which go to the front of the line. Returns the workers the
    /// caller must start for queued jobs, now that there is room.
    pub(crate) fn exited(&self, id: WorkerId, unstarted: Vec<J>) -> Vec<(WorkerId, J)> {
        let mut state = self.lock();
        state.advertised.retain(|(w, _)| *w != id);
        state.prewarming.retain(|&w| w != id);
        state.live -= 1;
        for job in unstarted.into_iter().rev() {
            state.hand_off_or_queue_first(job);
        }
        let mut starts = Vec::new();
        while state.live < self.limits.max_instances
            && let Some((_, job)) = state.queue.pop_front()
        {
            let id = state.start_worker();
            starts.push((id, job));
        }
        starts
    }

    /// Takes back a job a worker received but could not start: it goes to
    /// another advertised worker, or a new one (returned for the caller to
    /// start), or the front of the queue.
    pub(crate) fn readmit(&self, job: J) -> Option<(WorkerId, J)> {
        let mut state = self.lock();
        match state.hand_off(job) {
            Ok(()) => None,
            Err(job) if state.live < self.limits.max_instances => Some((state.start_worker(), job)),
            Err(job) => {
                state.hand_off_or_queue_first(job);
                None
            }
        }
    }

    /// Reserves workers to start without a job, to bring the instances
    /// ready ahead of demand up to [`PoolLimits::prewarm`].
    pub(crate) fn prewarm(&self) -> Vec<WorkerId> {
        let mut state = self.lock();
        let ready = state.advertised.len() + state.prewarming.len();
        let room = self.limits.max_instances - state.live;
        let wanted = self.limits.prewarm.saturating_sub(ready).min(room);
        if state.closed {
            return Vec::new();
        }
        (0..wanted)
            .map(|_| {
                let id = state.start_worker();
                state.prewarming.push(id);
                id
            })
            .collect()
    }

    /// Admits nothing more. Queued jobs stay queued to be served; advertised
    /// workers are forgotten (they see the shutdown themselves and exit).
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.advertised.clear();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub(crate) fn occupancy(&self) -> Occupancy {
        let state = self.lock();
        Occupancy {
            live: state.live,
            advertised: state.advertised.len(),
            queued: state.queue.len(),
        }
    }
}

impl<J> State<J> {
    /// Gives `job` to the most recently advertised worker whose mailbox is
    /// still open, or hands it back.
    fn hand_off(&mut self, mut job: J) -> Result<(), J> {
        while let Some((_, mailbox)) = self.advertised.pop() {
            match mailbox.send(job) {
                Ok(()) => return Ok(()),
                // That worker is gone (it will report its exit); try the next.
                Err(mpsc::error::SendError(returned)) => job = returned,
            }
        }
        Err(job)
    }

    /// Already-admitted jobs skip the line (and the queue's length limit).
    fn hand_off_or_queue_first(&mut self, job: J) {
        if let Err(job) = self.hand_off(job) {
            let ticket = Ticket(self.next_ticket);
            self.next_ticket += 1;
            self.queue.push_front((ticket, job));
        }
    }

    fn start_worker(&mut self) -> WorkerId {
        self.live += 1;
        let id = self.next_worker;
        self.next_worker += 1;
        id
    }
}

#[cfg(test)]
mod tests;
