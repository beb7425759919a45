//! The scheduling core: admission, the wait queue and hand-off of requests
//! to workers, with no wasmtime in sight.
//!
//! [`Pool`] is what the dispatcher asks before anything runs. One mutex
//! guards the queue, the workers advertising spare capacity, and which
//! workers are *running*, so every decision sees one consistent picture.
//!
//! # Who runs when
//!
//! Admitting a request is not starting it. A worker is *running* while it
//! instantiates or its guest computes, and *parked* while every task it has
//! waits on I/O (or it has none). At most [`PoolLimits::max_running`]
//! workers are running when a request is started: a request is handed to a
//! parked worker with spare capacity, or starts a new worker, only while
//! fewer run; otherwise it waits in the queue. CPU-bound requests so run to
//! completion in arrival order on as many instances as there are threads,
//! instead of being time-sliced across an instance per open connection, and
//! memory follows cores rather than connections. A worker whose guest
//! blocks on I/O parks and so lets the next request start, which keeps
//! I/O-bound apps at full throughput.
//!
//! Running to completion must not let one client's long requests hold
//! every running place while another's wait. A guest that has computed for
//! [`PoolLimits::time_slice`] without a break asks to yield its place
//! ([`Pool::yield_place`]). It does so only to a waiter of a client
//! ([`ClientKey`]) holding fewer running places than the yielder's: a
//! queued request a worker can take, or a worker itself suspended so. Then
//! it is *suspended* at its epoch tick and waits for a place in turn. Every
//! free place goes to the waiter, suspended or the queued request next in
//! line, whose client holds the fewest running places, then the fewest
//! suspended ones, and of those to the one waiting longest (a suspended
//! worker waits from its suspension). Requests of one client (and those
//! without a key, which count as one client) never suspend each other, so
//! a single client's load runs as before. Clients with long computations
//! so take turns by the slice, and a client with nothing running or
//! suspended gets a place at the next slice end of a client with more.
//! What slices cost and do not share: a yield to a queued request starts
//! it on another instance (parked or new) while the yielder keeps its own,
//! so live instances grow with the clients taking turns, up to
//! [`PoolLimits::max_instances`] (or the memory budget), where a newcomer
//! waits for a computation to end; the queue (requests that end within a
//! slice run in line order, whoever sent them, and an overloaded queue
//! sheds without regard to clients); and a suspended instance's other
//! requests, which stall with it.
//!
//! # The queue
//!
//! A CoDel-managed queue with adaptive LIFO (as in Facebook's Wangle): the
//! sojourn time of the oldest waiting request is sampled at every dequeue.
//! An interval of [`PoolLimits::queue_interval`] starts when it first rises
//! above [`PoolLimits::queue_target`], and a sample at or below the target
//! ends it (a burst that drains). If two such standing intervals in a row
//! each saw more than twice as many requests join the queue as leave it for
//! a worker, plus a margin of 16 (a growing queue), and the queue is more
//! than 256 longer than its shortest since its wait rose above the target,
//! it is overloaded until requests no longer join faster than they leave.
//! Each client of a fixed set has at most one request waiting, so up to
//! 256 of them, however unevenly they arrive, are queued and served, never
//! shed (a queue limited to 256 or fewer is never overloaded: it refuses
//! the surplus when full). While overloaded it serves the newest request
//! first (it still has a client willing to wait), and a free worker takes
//! it however long it waited, so a guest slower than the target never
//! idles. The queue keeps only as
//! many requests as the workers take within the target, and sheds the
//! older ones, and any that waited past the target, as soon as a newer one
//! arrives or a worker takes one: admitted requests stay fast and the
//! surplus gets its `503` within a few milliseconds.
//!
//! More clients than that, sending again as soon as they are shed, also
//! join faster than they leave, so an overload is probed now and then:
//! nothing is shed for a quarter interval, while shed clients come back,
//! and then for up to an interval in which the queue must still grow fast,
//! with requests joining at least half as fast as in the first part. New requests keep pouring in
//! at the same rate, and shedding resumes as soon as the counts say so; a
//! fixed set of clients now takes turns, and the overload ends. Clients
//! that resend within about half an interval of their `503` are told apart
//! so (the tests check 10 ms at the defaults); slower ones stay shed, newest
//! first, like an open load, until they no longer join faster than they
//! leave.
//!
//! Not overloaded, the queue is FIFO, and a burst may wait up to
//! [`PoolLimits::max_queue_wait`]. The growth condition is what tells
//! overload (requests arrive faster than they are served) from many clients
//! each waiting for their turn, such as 200 connections on one instance:
//! those are queued and served, not shed.
//!
//! # No orphans
//!
//! Invariant, checked by the tests: if the queue is not empty, either
//! `max_running` workers are running, or no worker is advertised and none
//! may start; and if a worker is suspended, `max_running` are running.
//! Every event that could change that (a worker parking, advertising,
//! yielding or exiting) looks at the queue and the suspended workers under
//! the same lock.
//!
//! The pool only decides; the dispatcher acts on its answers (spawning
//! workers, failing requests). Jobs are generic so that the logic is tested
//! fast and hard without compiling a component.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

/// The limits of the worker pool behind a [`ProxyHandler`](crate::ProxyHandler).
///
/// Build one with struct-update syntax:
/// `PoolLimits { max_instances: 8, ..Default::default() }`.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolLimits {
    /// Most instances alive at once, running, parked or idle, including
    /// those being instantiated. Each costs a store, linear memory and a
    /// pooling-allocator slot. Default: 256.
    pub max_instances: usize,
    /// Most instances running guest code (or instantiating) when a request
    /// is started; an instance whose tasks all wait on I/O does not count.
    /// Match it to the threads that run guests: more only time-slices them
    /// and multiplies memory. Default: the machine's available parallelism.
    pub max_running: usize,
    /// Most requests waiting to start; beyond it requests fail at once with
    /// [`Overloaded`](crate::Overloaded). `0` disables queueing. A queue
    /// of 256 or fewer never counts as overloaded (see
    /// [`Self::queue_target`]). Default: 1024.
    pub max_queue_len: usize,
    /// Longest a request waits in a queue that is not overloaded before it
    /// fails with [`Overloaded`](crate::Overloaded): room for bursts.
    /// Default: 2 s.
    pub max_queue_wait: Duration,
    /// The queue's target sojourn time. When waits stay above it and the
    /// queue grows fast for two [`Self::queue_interval`]s in a row, to more
    /// than 256 requests beyond its shortest since the waits rose, the
    /// queue counts as overloaded: it serves newest first and sheds
    /// requests that would wait longer than this (a free worker still
    /// takes the newest request, however long it waited). Lower than
    /// CoDel's classic 5 ms: on a saturated machine, every millisecond a
    /// request waits adds to a service time the CPU contention already
    /// stretches. Default: 2 ms.
    pub queue_target: Duration,
    /// See [`Self::queue_target`]. A burst that drains within one interval
    /// is queued, not shed. Default: 25 ms.
    pub queue_interval: Duration,
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
    /// circuit: while open, requests needing a new instance fail fast and
    /// prewarming pauses. A full pool or memory budget is not a failure
    /// (the request waits for an instance to end) unless no instance is
    /// alive to free any. Default: 20.
    pub circuit_failures: u32,
    /// See [`Self::circuit_failures`]. Default: 10 s.
    pub circuit_window: Duration,
    /// How long the circuit stays open before one instantiation is tried
    /// again. Default: 5 s.
    pub circuit_cooldown: Duration,
    /// How long a guest computes without a break before it yields its
    /// running place to a waiting request of a client holding fewer places
    /// (see [`ClientKey`]); it waits for a place again in turn, a client
    /// with fewer places first. Requests of one client never yield to each
    /// other. Zero asks at every epoch tick. Default: 50 ms.
    pub time_slice: Duration,
    /// An adaptive limit on the requests in flight across the pool, below
    /// the limits above: it settles where latency stays near its best and
    /// answers the surplus with [`Overloaded`](crate::Overloaded) at once.
    /// Suits apps whose requests take similar times; see
    /// [`AdaptiveConcurrency`](crate::AdaptiveConcurrency). Default: off.
    pub adaptive_concurrency: Option<crate::AdaptiveConcurrency>,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_instances: 256,
            max_running: std::thread::available_parallelism().map_or(1, usize::from),
            max_queue_len: 1024,
            max_queue_wait: Duration::from_secs(2),
            queue_target: Duration::from_millis(2),
            queue_interval: Duration::from_millis(25),
            prewarm: 0,
            instantiation_retries: 2,
            retry_backoff: Duration::from_millis(10),
            circuit_failures: 20,
            circuit_window: Duration::from_secs(10),
            circuit_cooldown: Duration::from_secs(5),
            time_slice: Duration::from_millis(50),
            adaptive_concurrency: None,
        }
    }
}

/// The client a request is for, as far as sharing running places goes: a
/// peer address, a tenant, an API key.
///
/// Put one in a request's extensions before
/// [`ProxyHandler::handle`](crate::ProxyHandler::handle). A guest that
/// computes past [`PoolLimits::time_slice`] yields its place to a waiting
/// request of a client that holds fewer running places, so one client's
/// long requests cannot keep every other client's out. Requests without a
/// key count as one client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ClientKey(u64);

impl ClientKey {
    /// The key of whatever identifies a client: equal values give equal
    /// keys (a 64-bit hash, fixed for the process).
    pub fn of(client: &impl Hash) -> Self {
        let mut hasher = DefaultHasher::new();
        client.hash(&mut hasher);
        ClientKey(hasher.finish())
    }
}

/// Identifies a worker; also its instance's incarnation id.
pub(crate) type WorkerId = u64;

/// Where the pool delivers jobs to a worker that advertised capacity.
pub(crate) type Mailbox<J> = mpsc::UnboundedSender<J>;

/// Workers the caller must start, each with its first job (already counted
/// as live and running).
pub(crate) type Starts<J> = Vec<(WorkerId, J)>;

/// A job the pool may give up on: shed from an overloaded queue, or past
/// the queue's longest wait.
pub(crate) trait Sheddable {
    /// When the job's request was admitted: its wait counts from there,
    /// even when a worker hands it back to the queue.
    fn admitted(&self) -> Instant;
    /// Fails the job's request as overloaded.
    fn shed(self);
    /// The client its request is for, if it said.
    fn client(&self) -> Option<ClientKey>;
}

/// What a worker suspended by [`Pool::yield_place`] waits for: it may run
/// again when this resolves (or, if its sender is dropped, it exited).
pub(crate) type Resume = oneshot::Receiver<()>;

/// Identifies a queued job, to take it out again. Ordered like the queue.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) struct Ticket(i64);

/// What [`Pool::admit`] did with a job.
#[derive(Debug)]
pub(crate) enum Admission<J> {
    /// Delivered to the mailbox of an advertised worker.
    Handed,
    /// The caller must start worker `WorkerId` with this job.
    Start(WorkerId, J),
    /// Waiting in the queue. The pool sheds it if it must; its caller
    /// gives up after [`PoolLimits::max_queue_wait`] at the latest.
    Queued(Ticket),
    /// Rejected: the queue is full.
    Overloaded(J),
    /// Rejected: the pool is closed.
    Closed(J),
}

/// A snapshot of the pool's occupancy.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) struct Occupancy {
    pub live: usize,
    pub running: usize,
    pub advertised: usize,
    pub queued: usize,
    pub suspended: usize,
}

pub(crate) struct Pool<J> {
    limits: PoolLimits,
    state: Mutex<State<J>>,
}

struct Queued<J> {
    ticket: Ticket,
    job: J,
    since: Instant,
}

/// What the pool knows of a live worker.
struct Slot {
    running: bool,
    /// The client of the last job given to it, which its running place is
    /// counted for.
    client: Option<ClientKey>,
}

/// Who gets a free running place: the suspended worker at an index, or
/// the queued job at an index.
enum Turn {
    Resume(usize),
    Start(usize),
}

/// A worker waiting to run again after yielding its place.
struct Suspended<J> {
    id: WorkerId,
    /// When it yielded: its turn counts from then, like a queued job's
    /// from its admission.
    since: Instant,
    resume: oneshot::Sender<()>,
    /// Its advertisement, if it had one: no job goes to a suspended worker
    /// (it would wait for the whole suspension).
    mailbox: Option<Mailbox<J>>,
}

struct State<J> {
    /// Sorted by ticket: pushed at the back with increasing tickets, at the
    /// front (jobs returned by workers) with decreasing ones.
    queue: VecDeque<Queued<J>>,
    next_back: i64,
    next_front: i64,
    /// Workers with spare capacity, most recent last: hand-off is LIFO, so
    /// the busiest instances stay warm and surplus ones idle out.
    advertised: Vec<(WorkerId, Mailbox<J>)>,
    /// Live workers (started, not exited).
    workers: HashMap<WorkerId, Slot>,
    running: usize,
    /// Running workers per client of the request they were last given.
    running_for: HashMap<Option<ClientKey>, usize>,
    /// Workers that yielded their place, oldest first.
    suspended: VecDeque<Suspended<J>>,
    /// Prewarm workers started but not yet advertised.
    prewarming: Vec<WorkerId>,
    /// After an instantiation failed for lack of capacity (pool slots,
    /// memory budget): no new worker until one exits and frees some.
    at_capacity: bool,
    next_worker: WorkerId,
    closed: bool,
    codel: Codel,
}

impl<J: Sheddable> Pool<J> {
    /// A pool within `limits` (at least one instance, running one).
    pub(crate) fn new(mut limits: PoolLimits) -> Self {
        limits.max_instances = limits.max_instances.max(1);
        limits.max_running = limits.max_running.max(1);
        let codel = Codel::new(&limits);
        Pool {
            limits,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                next_back: 0,
                next_front: -1,
                advertised: Vec::new(),
                workers: HashMap::new(),
                running: 0,
                running_for: HashMap::new(),
                suspended: VecDeque::new(),
                prewarming: Vec::new(),
                at_capacity: false,
                next_worker: 1,
                closed: false,
                codel,
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

    /// Admits a new request's job at `now`: hands it to an advertised
    /// worker or asks for a new one (while fewer than `max_running` run),
    /// queues it, or rejects it.
    pub(crate) fn admit(&self, job: J, now: Instant) -> Admission<J> {
        let limits = &self.limits;
        let mut state = self.lock();
        if state.closed {
            return Admission::Closed(job);
        }
        if state.has_room_to_run(limits) {
            let may_enter = !state.at_capacity;
            state.codel.observe(Duration::ZERO, now, may_enter, 0);
            let job = match state.hand_off(job) {
                Ok(()) => return Admission::Handed,
                Err(job) => job,
            };
            if state.may_start(limits) {
                return Admission::Start(state.start_worker(job.client()), job);
            }
            return state.enqueue(job, now, limits);
        }
        state.shed_stale(now, limits.max_queue_wait);
        state.enqueue(job, now, limits)
    }

    /// Worker `id` has capacity for one more job and waits on I/O (or has
    /// nothing to do). Returns a queued job if one may start now; otherwise
    /// the worker is advertised and a later job arrives in `mailbox`. Either
    /// way the advertisement is used up by one job: the worker advertises
    /// again when it has capacity again. A worker given a job is running.
    pub(crate) fn advertise(&self, id: WorkerId, mailbox: &Mailbox<J>, now: Instant) -> Option<J> {
        let mut state = self.lock();
        state.prewarming.retain(|&w| w != id);
        state.set_running(id, false);
        let limits = &self.limits;
        while state.running < limits.max_running {
            match state.next_turn(true, |_| true) {
                Some(Turn::Resume(at)) => state.resume(at),
                Some(Turn::Start(_)) => {
                    // `None`: every queued job was shed as stale.
                    if let Some(job) = state.next_job(now, limits) {
                        state.occupy(id, job.client());
                        return Some(job);
                    }
                }
                None => break,
            }
        }
        if !state.closed && !state.advertised.iter().any(|(w, _)| *w == id) {
            state.advertised.push((id, mailbox.clone()));
        }
        None
    }

    /// Worker `id` no longer has capacity. A job handed to it before this
    /// call is still in its mailbox and is the worker's to run or return.
    pub(crate) fn withdraw(&self, id: WorkerId) {
        let mut state = self.lock();
        state.advertised.retain(|(w, _)| *w != id);
        // Nor may it advertise again when it resumes.
        if let Some(suspended) = state.suspended.iter_mut().find(|s| s.id == id) {
            suspended.mailbox = None;
        }
    }

    /// Worker `id` waits on I/O (or has nothing to do) without advertising:
    /// queued jobs may start elsewhere in its place.
    pub(crate) fn park(&self, id: WorkerId, now: Instant) -> Starts<J> {
        let mut state = self.lock();
        state.set_running(id, false);
        state.fill(now, &self.limits)
    }

    /// Worker `id` runs guest code again (its I/O completed).
    pub(crate) fn unpark(&self, id: WorkerId) {
        self.lock().set_running(id, true);
    }

    /// Running worker `id` has computed for a time slice: it yields its
    /// place if a request of a client holding fewer running places than
    /// its own waits, suspended or queued (and can start), and returns what
    /// to wait on before it runs again, with the workers the caller must
    /// start. `None`: it runs on.
    pub(crate) fn yield_place(&self, id: WorkerId, now: Instant) -> Option<(Resume, Starts<J>)> {
        let limits = &self.limits;
        let mut state = self.lock();
        if state.suspended.is_empty() && state.queue.is_empty() {
            return None;
        }
        let slot = state.workers.get(&id).filter(|slot| slot.running)?;
        let mine = slot.client;
        let held = state.places_of(mine);
        let taker = state.may_start(limits) || state.advertised.iter().any(|(w, _)| *w != id);
        let turn = state.next_turn(taker, |client| {
            client != mine && state.places_of(client) < held
        })?;
        let (resume, suspended) = oneshot::channel();
        let mailbox = state
            .advertised
            .iter()
            .position(|(w, _)| *w == id)
            .map(|at| state.advertised.remove(at).1);
        state.set_running(id, false);
        state.suspended.push_back(Suspended {
            id,
            since: now,
            resume,
            mailbox,
        });
        let mut starts = Vec::new();
        match turn {
            Turn::Resume(at) => state.resume(at),
            Turn::Start(at) => {
                let queued = state.queue.remove(at).expect("found above");
                state.codel.left += 1;
                let length = state.queue.len();
                state.codel.shrunk(length);
                state.start(queued.job, now, limits, &mut starts);
            }
        }
        // Whatever place is still free (the worker woken above had gone).
        starts.extend(state.fill(now, limits));
        Some((suspended, starts))
    }

    /// Takes a queued job back out (its caller gave up or timed out).
    /// `None` means it was already handed to a worker, or shed.
    pub(crate) fn cancel(&self, ticket: Ticket) -> Option<J> {
        let mut state = self.lock();
        let index = state
            .queue
            .binary_search_by_key(&ticket, |queued| queued.ticket)
            .ok()?;
        let job = state.queue.remove(index).map(|queued| queued.job);
        let queued = state.queue.len();
        state.codel.shrunk(queued);
        job
    }

    /// Worker `id` has exited; `unstarted` are jobs it received but never
    /// started, which go to the front of the line. Returns the workers the
    /// caller must start for queued jobs, now that there is room.
    pub(crate) fn exited(&self, id: WorkerId, unstarted: Vec<J>, now: Instant) -> Starts<J> {
        let mut state = self.lock();
        state.remove_worker(id);
        state.at_capacity = false;
        for job in unstarted.into_iter().rev() {
            state.push_front(job, now);
        }
        state.fill(now, &self.limits)
    }

    /// Worker `id` could not instantiate for lack of capacity (a full
    /// instance pool, an exhausted memory budget): it is gone, and no worker
    /// starts until another exits and frees some. Its `job` goes back to the
    /// front of the line. `Err` hands the job back when no other worker is
    /// alive to free anything: then the capacity is held elsewhere and
    /// waiting would not help.
    pub(crate) fn at_capacity(
        &self,
        id: WorkerId,
        job: Option<J>,
        now: Instant,
    ) -> Result<Starts<J>, Option<J>> {
        let mut state = self.lock();
        state.remove_worker(id);
        if state.workers.is_empty() {
            return Err(job);
        }
        state.at_capacity = true;
        if let Some(job) = job {
            state.push_front(job, now);
        }
        Ok(state.fill(now, &self.limits))
    }

    /// Capacity may have come back from elsewhere: workers may start again.
    pub(crate) fn retry_capacity(&self, now: Instant) -> Starts<J> {
        let mut state = self.lock();
        state.at_capacity = false;
        state.fill(now, &self.limits)
    }

    /// Takes back a job a worker received but could not start: it goes to
    /// the front of the line, and on to whatever may take it now.
    pub(crate) fn readmit(&self, job: J, now: Instant) -> Starts<J> {
        let mut state = self.lock();
        state.push_front(job, now);
        state.fill(now, &self.limits)
    }

    /// Reserves workers to start without a job, to bring the instances
    /// ready ahead of demand up to [`PoolLimits::prewarm`], as far as the
    /// running limit allows (instantiating is running).
    pub(crate) fn prewarm(&self) -> Vec<WorkerId> {
        let limits = &self.limits;
        let mut state = self.lock();
        if state.closed || state.at_capacity {
            return Vec::new();
        }
        let ready = state.advertised.len() + state.prewarming.len();
        let wanted = limits
            .prewarm
            .saturating_sub(ready)
            .min(limits.max_instances.saturating_sub(state.workers.len()))
            .min(limits.max_running.saturating_sub(state.running));
        (0..wanted)
            .map(|_| {
                let id = state.start_worker(None);
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
        for suspended in &mut state.suspended {
            suspended.mailbox = None;
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Whether a job would start at once: none waits, and fewer than
    /// `max_running` workers run.
    pub(crate) fn has_room_to_run(&self) -> bool {
        self.lock().has_room_to_run(&self.limits)
    }

    pub(crate) fn occupancy(&self) -> Occupancy {
        let state = self.lock();
        Occupancy {
            live: state.workers.len(),
            running: state.running,
            advertised: state.advertised.len(),
            queued: state.queue.len(),
            suspended: state.suspended.len(),
        }
    }
}

impl<J: Sheddable> State<J> {
    fn may_start(&self, limits: &PoolLimits) -> bool {
        !self.at_capacity && self.workers.len() < limits.max_instances
    }

    fn has_room_to_run(&self, limits: &PoolLimits) -> bool {
        self.queue.is_empty() && self.suspended.is_empty() && self.running < limits.max_running
    }

    /// Whether a queued job could start now: an advertised worker takes
    /// it, or a new one may start.
    fn may_take_one(&self, limits: &PoolLimits) -> bool {
        !self.advertised.is_empty() || self.may_start(limits)
    }

    /// Running places held for `client`'s requests.
    fn places_of(&self, client: Option<ClientKey>) -> usize {
        self.running_for.get(&client).copied().unwrap_or(0)
    }

    fn count_running(&mut self, client: Option<ClientKey>, running: bool) {
        if running {
            *self.running_for.entry(client).or_default() += 1;
            self.running += 1;
        } else {
            if let Some(places) = self.running_for.get_mut(&client) {
                *places -= 1;
                if *places == 0 {
                    self.running_for.remove(&client);
                }
            }
            self.running -= 1;
        }
    }

    fn set_running(&mut self, id: WorkerId, running: bool) {
        if let Some(slot) = self.workers.get_mut(&id)
            && slot.running != running
        {
            slot.running = running;
            let client = slot.client;
            self.count_running(client, running);
        }
    }

    /// Worker `id` was given a job of `client`'s: it runs for that client.
    fn occupy(&mut self, id: WorkerId, client: Option<ClientKey>) {
        self.set_running(id, false);
        if let Some(slot) = self.workers.get_mut(&id) {
            slot.client = client;
        }
        self.set_running(id, true);
    }

    fn remove_worker(&mut self, id: WorkerId) {
        self.advertised.retain(|(w, _)| *w != id);
        self.prewarming.retain(|&w| w != id);
        self.suspended.retain(|s| s.id != id);
        if let Some(slot) = self.workers.remove(&id)
            && slot.running
        {
            self.count_running(slot.client, false);
        }
    }

    /// Lets the suspended worker at `at` run again, with its advertisement
    /// back (unless it has gone).
    fn resume(&mut self, at: usize) {
        let Some(suspended) = self.suspended.remove(at) else {
            return;
        };
        if suspended.resume.send(()).is_err() || !self.workers.contains_key(&suspended.id) {
            return;
        }
        self.set_running(suspended.id, true);
        if let Some(mailbox) = suspended.mailbox
            && !self.closed
        {
            self.advertised.push((suspended.id, mailbox));
        }
    }

    /// Who gets the next free running place, of the suspended workers and
    /// the queued job next in line (if `taker`: a worker can take it) whose
    /// client `may_have` it: the one whose client holds the fewest running
    /// places, then the fewest suspended workers (a client new to the line
    /// goes before those taking turns), then the one waiting longest. The
    /// queued job next in line is the oldest such, or while overloaded the
    /// newest. (The job [`Self::next_job`] then takes may differ, if that
    /// one is shed or the queue's mode changes: a harmless slip.)
    fn next_turn(&self, taker: bool, may_have: impl Fn(Option<ClientKey>) -> bool) -> Option<Turn> {
        let start = taker
            .then(|| {
                let mut eligible = (self.queue.iter().enumerate())
                    .filter(|(_, queued)| may_have(queued.job.client()));
                if self.codel.overloaded {
                    eligible.next_back()
                } else {
                    eligible.next()
                }
            })
            .flatten();
        if self.suspended.is_empty() {
            // The common case, with no ranking to do.
            return start.map(|(at, _)| Turn::Start(at));
        }
        let mut suspended_for = HashMap::new();
        for suspended in &self.suspended {
            if let Some(slot) = self.workers.get(&suspended.id) {
                *suspended_for.entry(slot.client).or_insert(0_usize) += 1;
            }
        }
        let rank = |client, since| {
            let suspended = suspended_for.get(&client).copied().unwrap_or(0);
            (self.places_of(client), suspended, since)
        };
        let resume = (self.suspended.iter().enumerate())
            .filter_map(|(at, suspended)| {
                let client = self.workers.get(&suspended.id)?.client;
                may_have(client).then(|| (rank(client, suspended.since), Turn::Resume(at)))
            })
            .min_by_key(|(rank, _)| *rank);
        let start = start.map(|(at, queued)| {
            let client = queued.job.client();
            (rank(client, queued.since), Turn::Start(at))
        });
        // A suspended worker goes first among equals.
        [resume, start]
            .into_iter()
            .flatten()
            .min_by_key(|(rank, _)| *rank)
            .map(|(_, turn)| turn)
    }

    /// Gives `job` to the most recently advertised worker whose mailbox is
    /// still open, which is running from now on; or hands the job back.
    fn hand_off(&mut self, mut job: J) -> Result<(), J> {
        while let Some((id, mailbox)) = self.advertised.pop() {
            let client = job.client();
            match mailbox.send(job) {
                Ok(()) => {
                    self.occupy(id, client);
                    return Ok(());
                }
                // That worker is gone (it will report its exit); try the next.
                Err(mpsc::error::SendError(returned)) => job = returned,
            }
        }
        Err(job)
    }

    /// Gives `job`, taken from the queue, to an advertised worker or to a
    /// new one (added to `starts`); with neither (every advertised mailbox
    /// had closed, and no worker may start) it goes back to the front.
    fn start(&mut self, job: J, now: Instant, limits: &PoolLimits, starts: &mut Starts<J>) {
        match self.hand_off(job) {
            Ok(()) => {}
            Err(job) if self.may_start(limits) => {
                starts.push((self.start_worker(job.client()), job));
            }
            Err(job) => self.push_front(job, now),
        }
    }

    /// Gives free running places, while fewer than `max_running` workers
    /// run, to suspended workers and queued jobs some worker can take, in
    /// [turn](Self::next_turn).
    fn fill(&mut self, now: Instant, limits: &PoolLimits) -> Starts<J> {
        let mut starts = Vec::new();
        while self.running < limits.max_running {
            match self.next_turn(self.may_take_one(limits), |_| true) {
                Some(Turn::Resume(at)) => self.resume(at),
                Some(Turn::Start(_)) => {
                    // `None`: every queued job was shed as stale. A job put
                    // back leaves the places to suspended workers, as no
                    // worker can take it.
                    if let Some(job) = self.next_job(now, limits) {
                        self.start(job, now, limits, &mut starts);
                    }
                }
                None => break,
            }
        }
        starts
    }

    fn enqueue(&mut self, job: J, now: Instant, limits: &PoolLimits) -> Admission<J> {
        // A full queue hides growth: a job refused for lack of room joined
        // as much as one let in.
        self.codel.joined += 1;
        if self.queue.len() >= limits.max_queue_len {
            return Admission::Overloaded(job);
        }
        let ticket = Ticket(self.next_back);
        self.next_back += 1;
        self.queue.push_back(Queued {
            ticket,
            job,
            since: now,
        });
        if self.codel.shedding() {
            // Newest first: with `depth` newer jobs ahead of it, the oldest
            // would wait past the target anyway. It gets its answer now
            // rather than after the target.
            while self.queue.len() > self.codel.depth
                && let Some(oldest) = self.queue.pop_front()
            {
                oldest.job.shed();
            }
        }
        Admission::Queued(ticket)
    }

    /// Already-admitted jobs skip the line (and the queue's length limit);
    /// their wait still counts from their admission.
    fn push_front(&mut self, job: J, now: Instant) {
        let ticket = Ticket(self.next_front);
        self.next_front -= 1;
        let since = job.admitted().min(now);
        self.queue.push_front(Queued { ticket, job, since });
    }

    /// The next job to start, shedding those that waited too long: the
    /// oldest, or, while overloaded, the newest.
    fn next_job(&mut self, now: Instant, limits: &PoolLimits) -> Option<J> {
        let oldest = self.queue.front()?.since;
        // Waiting for memory or pool slots is not overload: shedding
        // newcomers would free neither.
        let may_enter = !self.at_capacity;
        let waited = now.saturating_duration_since(oldest);
        self.codel.observe(waited, now, may_enter, self.queue.len());
        let queued = if self.codel.overloaded {
            // A worker is free now: the newest job starts at once, however
            // long it waited. Were it shed with the stale ones, a guest
            // slower than the target would find them all stale and idle.
            let newest = self.queue.pop_back();
            self.shed_stale(now, limits.max_queue_wait);
            newest
        } else {
            self.shed_stale(now, limits.max_queue_wait);
            self.queue.pop_front()
        }?;
        self.codel.shrunk(self.queue.len());
        if self.queue.is_empty() {
            // The queue drained: a sojourn of zero for what comes next.
            self.codel.observe(Duration::ZERO, now, may_enter, 0);
        }
        self.codel.left += 1;
        Some(queued.job)
    }

    /// Sheds every job at the front that waited longer than it may: the
    /// target while overloaded, the longest queue wait otherwise (its caller
    /// times out by then anyway, unless a worker handed it back).
    fn shed_stale(&mut self, now: Instant, max_wait: Duration) {
        let max_wait = if self.codel.shedding() {
            self.codel.target
        } else {
            max_wait
        };
        while let Some(oldest) = self.queue.front()
            && now.saturating_duration_since(oldest.since) > max_wait
        {
            if let Some(queued) = self.queue.pop_front() {
                queued.job.shed();
            }
        }
        self.codel.shrunk(self.queue.len());
    }

    /// A new worker, running for `client`.
    fn start_worker(&mut self, client: Option<ClientKey>) -> WorkerId {
        let id = self.next_worker;
        self.next_worker += 1;
        self.workers.insert(
            id,
            Slot {
                running: true,
                client,
            },
        );
        self.count_running(client, true);
        id
    }
}

/// Jobs beyond twice the departures that must join in an interval for the
/// queue to count as growing.
const GROWTH_MARGIN: u32 = 16;

/// Intervals of overload before the first probe; the gap grows fourfold
/// after each probe that finds the overload still there, up to
/// [`PROBE_MAX_INTERVALS`]: clients still ramping up (connections the
/// server has yet to accept) can make a probe find growth, so the early
/// probes come soon after another, and a lasting overload, which each
/// probe costs a few late `503`s, is probed rarely.
const PROBE_FIRST_INTERVALS: u32 = 2;

/// A probe's first part, while shed clients come back, lasts this share of
/// an interval: a client sends again within a round trip of its `503`, and
/// every request it holds would be shed late in an open overload.
const PROBE_SETTLING_SHARE: u32 = 4;

/// The longest gap between probes, in intervals (10 s at the default
/// interval).
const PROBE_MAX_INTERVALS: u32 = 400;

/// How much longer than its shortest the queue must be, since its wait
/// rose above the target, before an overload may begin. Each of a fixed
/// set of clients has at most one request waiting, so a closed loop of up
/// to this many clients cannot make it longer, however unevenly its
/// requests arrive (a client stalled for a moment sends a burst, a slow
/// one ramps up over many intervals) and whether or not some of them time
/// out and send again: it is queued and served in turn, never shed. An
/// open overload passes it in a few intervals (at four times a capacity of
/// 1,200 r/s, in ~100 ms). A queue limited to this many or fewer
/// (`max_queue_len`) never counts as overloaded: it refuses the surplus
/// at once when full.
const ONSET_BACKLOG: usize = 256;

/// The overload detector of a CoDel queue. As in CoDel, an interval starts
/// when the sampled wait first rises above the target, and any sample at
/// or below it ends the interval: a burst drains before then, a standing
/// queue does not. The queue becomes overloaded at the end of the second
/// standing interval in a row in which more than twice as many jobs joined
/// as left for a worker, plus a margin (a queue growing fast), once it is
/// more than [`ONSET_BACKLOG`] longer than its shortest since the wait
/// rose above the target. (Clients ramping up, or re-queueing at once
/// after a shed, grow it for a while; clients taking turns keep the two
/// about equal.) It stays so
/// while jobs join faster than they leave for a worker, shed ones counting
/// as having joined, not as having left.
///
/// That last rule cannot tell an open stream of new requests from a fixed
/// set of clients that each send again as soon as they are shed: both join
/// faster than they leave. So an overload is *probed* now and then (first
/// after [`PROBE_FIRST_INTERVALS`] intervals, then at growing gaps):
/// nothing is shed (the queue stays newest first) for a settling part, in
/// which shed clients come back, and then a counting interval, which asks
/// that the queue still grow fast, by the rule that began the overload,
/// with jobs joining at least half as fast as while settling. A fixed set of
/// clients now only takes turns, or its last stragglers come back (fewer
/// and fewer): the overload ends and the queue is FIFO again. New requests
/// still pour in at the same rate, faster than they leave, and shedding
/// resumes with what waited past the target, as soon as the joins so far
/// would pass at the interval's end. A probe so costs an open overload a
/// few late `503`s, and saves a closed loop from being shed for good after
/// one misjudged ramp-up.
struct Codel {
    target: Duration,
    interval: Duration,
    /// The end of the current interval: `None` while the wait is at or
    /// below the target (and not overloaded).
    interval_end: Option<Instant>,
    /// Jobs that joined (or, the queue being full, tried to join) during
    /// this interval.
    joined: u32,
    /// Jobs taken from the queue by workers during this interval.
    left: u32,
    /// The queue's shortest length since the wait rose above the target,
    /// or since the overload began or ended.
    shortest: usize,
    /// The last interval had a standing, growing queue.
    grew: bool,
    overloaded: bool,
    /// While overloaded, how many of the newest jobs the queue keeps: as
    /// many as workers took within the target at the last interval's rate.
    /// An older one would wait past the target and is shed at once.
    depth: usize,
    /// While overloaded: the current probe, if one runs.
    probe: Option<Probe>,
    /// While overloaded and not probing: when the next probe starts.
    next_probe: Option<Instant>,
    /// The gap before the next probe, in intervals.
    probe_gap: u32,
}

/// The two parts of a probe.
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// Since `since`, shed clients come back; the counts are only kept for
    /// the next part. It lasts [`PROBE_SETTLING_SHARE`] of an interval, up
    /// to the next sample.
    Settling { since: Instant },
    /// An interval whose counts tell whether the queue still grows fast,
    /// and whether about as fast as while `settling` jobs joined in
    /// `settled`: new requests keep coming at the same rate, clients that
    /// came back do not.
    Counting { settling: u32, settled: Duration },
}

impl Codel {
    fn new(limits: &PoolLimits) -> Self {
        Codel {
            target: limits.queue_target,
            interval: limits.queue_interval,
            interval_end: None,
            joined: 0,
            left: 0,
            shortest: 0,
            grew: false,
            overloaded: false,
            depth: limits.max_running,
            probe: None,
            next_probe: None,
            probe_gap: PROBE_FIRST_INTERVALS,
        }
    }

    /// Overloaded and not probing: the queue keeps only the newest
    /// [`Self::depth`] jobs and sheds what waited past the target.
    fn shedding(&self) -> bool {
        self.overloaded && self.probe.is_none()
    }

    /// More than twice as many jobs joined as left, plus a margin.
    fn growing_fast(&self) -> bool {
        self.joined > 2 * self.left + GROWTH_MARGIN
    }

    /// Samples the wait `delay` at `now`, with `queued` jobs waiting,
    /// ending the interval if it is over; overload may begin then only if
    /// `may_enter`.
    fn observe(&mut self, delay: Duration, now: Instant, may_enter: bool, queued: usize) {
        if !self.overloaded && delay <= self.target {
            self.interval_end = None;
            self.grew = false;
            self.shortest = queued;
            return;
        }
        let Some(end) = self.interval_end else {
            self.start_interval(now);
            return;
        };
        if now < end {
            // A probe that already sees the overload hold ends at once: the
            // newcomers it holds would only be shed later.
            if let Some(Probe::Counting { settling, settled }) = self.probe
                && self.probe_holds(settling, settled, end, now)
            {
                self.end_probe(true, end, now, queued);
            }
            return;
        }
        match self.probe {
            Some(Probe::Settling { since }) => {
                self.probe = Some(Probe::Counting {
                    settling: self.joined,
                    settled: now.saturating_duration_since(since),
                });
                self.start_interval(now);
            }
            Some(Probe::Counting { settling, settled }) => {
                let holds = self.probe_holds(settling, settled, end, now);
                self.end_probe(holds, end, now, queued);
            }
            None => self.end_interval(end, now, may_enter, queued),
        }
    }

    /// Whether a probe's counting interval, due to end at `end`, finds at
    /// `now` the queue still growing fast, with jobs joining at least half
    /// as fast as the `settling` jobs did in `settled`. Before `end` it
    /// rates the joins so far over the whole interval: the outcome is
    /// already known once they would do at its end.
    fn probe_holds(&self, settling: u32, settled: Duration, end: Instant, now: Instant) -> bool {
        let counted = now
            .saturating_duration_since(end - self.interval)
            .max(self.interval);
        self.growing_fast()
            && 2 * u128::from(self.joined) * settled.as_nanos()
                > u128::from(settling) * counted.as_nanos()
    }

    /// The end of an interval outside a probe: overload begins, holds or
    /// ends, and a probe starts if one is due.
    fn end_interval(&mut self, end: Instant, now: Instant, may_enter: bool, queued: usize) {
        let growing = if self.overloaded {
            self.joined > self.left
        } else {
            self.growing_fast()
        };
        let grown = queued.saturating_sub(self.shortest);
        let overloaded =
            growing && (self.overloaded || self.grew && grown > ONSET_BACKLOG && may_enter);
        self.set_depth(end, now);
        self.grew = growing && !self.overloaded;
        if overloaded != self.overloaded {
            self.transition(overloaded, now, queued);
        }
        if overloaded && self.next_probe.is_some_and(|at| now >= at) {
            tracing::debug!("request queue overload: probing, not shedding");
            self.probe = Some(Probe::Settling { since: now });
            self.next_probe = None;
        }
        self.start_interval(now);
        if matches!(self.probe, Some(Probe::Settling { .. })) {
            self.interval_end = Some(now + self.interval / PROBE_SETTLING_SHARE);
        }
    }

    /// The end of a probe: if the overload `holds`, the next probe waits
    /// four times as long; otherwise the overload ends.
    fn end_probe(&mut self, holds: bool, end: Instant, now: Instant, queued: usize) {
        self.probe = None;
        self.set_depth(end, now);
        tracing::debug!(
            holds,
            joined = self.joined,
            left = self.left,
            "request queue overload probed"
        );
        if holds {
            self.probe_gap = (self.probe_gap * 4).min(PROBE_MAX_INTERVALS);
            self.next_probe = Some(now + self.interval * self.probe_gap);
        } else {
            self.grew = false;
            self.transition(false, now, queued);
        }
        self.start_interval(now);
    }

    /// Overload begins or ends at `now`, with `queued` jobs waiting; either
    /// way the probes start again from the shortest gap.
    fn transition(&mut self, overloaded: bool, now: Instant, queued: usize) {
        self.overloaded = overloaded;
        self.shortest = queued;
        self.probe_gap = PROBE_FIRST_INTERVALS;
        self.next_probe = overloaded.then(|| now + self.interval * self.probe_gap);
        tracing::info!(
            overloaded,
            joined = self.joined,
            left = self.left,
            "request queue overload {}",
            if overloaded {
                "began: newest first, shedding"
            } else {
                "ended"
            }
        );
    }

    /// As many jobs as workers took within the target at the rate of the
    /// interval due to end at `end`, which ended at `now`.
    fn set_depth(&mut self, end: Instant, now: Instant) {
        let elapsed = now.saturating_duration_since(end - self.interval);
        let per_target = u128::from(self.left) * self.target.as_nanos() / elapsed.as_nanos().max(1);
        self.depth = usize::try_from(per_target).unwrap_or(usize::MAX).max(1);
    }

    /// The queue is down to `queued` jobs (one left, was cancelled or
    /// shed): every place that takes a job out of the queue calls this,
    /// except the overloaded queue's own shedding (a transition resets
    /// [`Self::shortest`]).
    fn shrunk(&mut self, queued: usize) {
        self.shortest = self.shortest.min(queued);
    }

    fn start_interval(&mut self, now: Instant) {
        (self.joined, self.left) = (0, 0);
        self.interval_end = Some(now + self.interval);
    }
}

#[cfg(test)]
mod tests;
