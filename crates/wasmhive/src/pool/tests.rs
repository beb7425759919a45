//! The scheduling core under many requests, random completion order,
//! cancellations, exits and crashes, with no wasmtime involved.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use super::*;

thread_local! {
    /// Jobs shed by the pool on this thread, in order.
    static SHED: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

impl Sheddable for u64 {
    fn admitted(&self) -> Instant {
        // Jobs handed back count as admitted now.
        Instant::now()
    }

    fn shed(self) {
        SHED.with(|shed| shed.borrow_mut().push(self));
    }

    /// The last digit is the client.
    fn client(&self) -> Option<ClientKey> {
        Some(ClientKey::of(&(self % 10)))
    }
}

fn take_shed() -> Vec<u64> {
    SHED.with(|shed| std::mem::take(&mut *shed.borrow_mut()))
}

/// Limits where the running limit never binds, unless a test sets it.
fn limits(max_instances: usize, max_queue_len: usize) -> PoolLimits {
    PoolLimits {
        max_instances,
        max_running: usize::MAX,
        max_queue_len,
        ..PoolLimits::default()
    }
}

fn now() -> Instant {
    Instant::now()
}

const MS: Duration = Duration::from_millis(1);

#[test]
fn first_job_starts_a_worker_then_the_queue_fills_then_overload() {
    let pool = Pool::new(limits(1, 2));
    assert!(matches!(pool.admit(1, now()), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(2, now()), Admission::Queued(..)));
    assert!(matches!(pool.admit(3, now()), Admission::Queued(..)));
    assert!(matches!(pool.admit(4, now()), Admission::Overloaded(4)));
    let occupancy = pool.occupancy();
    assert_eq!((occupancy.live, occupancy.queued), (1, 2));
}

#[test]
fn advertising_worker_takes_the_oldest_queued_job_first() {
    let pool = Pool::new(limits(1, 4));
    let (tx, mut rx) = mpsc::unbounded_channel();
    assert!(matches!(pool.admit(1, now()), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(2, now()), Admission::Queued(..)));
    assert!(matches!(pool.admit(3, now()), Admission::Queued(..)));
    assert_eq!(pool.advertise(1, &tx, now()), Some(2));
    assert_eq!(pool.advertise(1, &tx, now()), Some(3));
    // Nothing queued: the worker is advertised and the next job is mailed.
    assert_eq!(pool.advertise(1, &tx, now()), None);
    assert!(matches!(pool.admit(4, now()), Admission::Handed));
    assert_eq!(rx.try_recv().ok(), Some(4));
    // The advertisement was used up by that job.
    assert!(matches!(pool.admit(5, now()), Admission::Queued(..)));
}

#[test]
fn cancelled_queued_job_is_removed_and_never_handed_out() {
    let pool = Pool::new(limits(1, 4));
    let (tx, _rx) = mpsc::unbounded_channel();
    assert!(matches!(pool.admit(1, now()), Admission::Start(..)));
    let Admission::Queued(ticket) = pool.admit(2, now()) else {
        panic!("expected queued")
    };
    assert_eq!(pool.cancel(ticket), Some(2));
    assert_eq!(pool.cancel(ticket), None);
    assert_eq!(pool.advertise(1, &tx, now()), None);
    assert_eq!(pool.occupancy().queued, 0);
}

#[test]
fn exit_starts_a_worker_for_queued_jobs_and_requeues_unstarted_ones() {
    let pool = Pool::new(limits(1, 4));
    assert!(matches!(pool.admit(1, now()), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(2, now()), Admission::Queued(..)));
    // Worker 1 dies with job 7 in its mailbox, never started: job 7 goes
    // first, ahead of job 2.
    let starts = pool.exited(1, vec![7], now());
    assert_eq!(starts, vec![(2, 7)]);
    assert_eq!(pool.occupancy().queued, 1);
    assert_eq!(pool.occupancy().live, 1);
}

#[test]
fn last_available_worker_withdrawing_does_not_orphan_a_request() {
    // The race of DESIGN.md: the only advertised worker becomes busy just
    // as a request arrives. Whatever the order, the request is either
    // handed to it, or starts a worker, or waits for the busy worker to
    // advertise again; it never sits in a queue no worker will read.
    let pool = Pool::new(limits(2, 4));
    let (tx, mut rx) = mpsc::unbounded_channel();
    assert!(matches!(pool.admit(1, now()), Admission::Start(1, 1)));
    assert_eq!(pool.advertise(1, &tx, now()), None);
    pool.withdraw(1);
    match pool.admit(2, now()) {
        Admission::Start(2, 2) => {}
        other => panic!("expected a new worker, got {other:?}"),
    }
    assert!(rx.try_recv().is_err());
}

#[test]
fn prewarm_fills_up_to_target_and_counts_pending_ones() {
    let pool: Pool<u64> = Pool::new(PoolLimits {
        prewarm: 3,
        max_instances: 4,
        max_running: 8,
        ..PoolLimits::default()
    });
    assert_eq!(pool.prewarm(), vec![1, 2, 3]);
    assert_eq!(pool.prewarm(), Vec::<WorkerId>::new());
    let (tx, _rx) = mpsc::unbounded_channel();
    assert_eq!(pool.advertise(1, &tx, now()), None);
    assert!(matches!(pool.admit(10, now()), Admission::Handed));
    // Worker 1 was taken: one more may start, within max_instances.
    assert_eq!(pool.prewarm(), vec![4]);
    assert_eq!(pool.prewarm(), Vec::<WorkerId>::new());
}

#[test]
fn closed_pool_rejects_but_keeps_queued_jobs_for_draining() {
    let pool = Pool::new(limits(1, 4));
    let (tx, _rx) = mpsc::unbounded_channel();
    assert!(matches!(pool.admit(1, now()), Admission::Start(..)));
    assert!(matches!(pool.admit(2, now()), Admission::Queued(..)));
    pool.close();
    assert!(matches!(pool.admit(3, now()), Admission::Closed(3)));
    assert_eq!(pool.advertise(1, &tx, now()), Some(2));
    assert_eq!(pool.advertise(1, &tx, now()), None);
    assert_eq!(pool.occupancy().advertised, 0);
    assert!(pool.prewarm().is_empty());
}

#[test]
fn only_max_running_workers_start_requests_and_parking_lets_the_next_one_start() {
    let pool = Pool::new(PoolLimits {
        max_running: 2,
        ..limits(8, 8)
    });
    assert!(matches!(pool.admit(1, now()), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(2, now()), Admission::Start(2, 2)));
    // Two run: the third waits, though instances are free.
    assert!(matches!(pool.admit(3, now()), Admission::Queued(..)));
    assert_eq!(pool.occupancy().running, 2);
    // Worker 1 blocks on I/O: job 3 starts on a new worker in its place.
    assert_eq!(pool.park(1, now()), vec![(3, 3)]);
    assert_eq!(pool.occupancy().running, 2);
    // Its I/O completes: it runs again, above the limit (admission only).
    pool.unpark(1);
    assert_eq!(pool.occupancy().running, 3);
    assert!(matches!(pool.admit(4, now()), Admission::Queued(..)));
    // An advertising worker parks and takes a job only below the limit.
    let (tx, _rx) = mpsc::unbounded_channel();
    assert_eq!(pool.advertise(2, &tx, now()), None);
    assert_eq!(pool.occupancy().running, 2);
    assert_eq!(pool.advertise(3, &tx, now()), Some(4));
    assert_eq!(
        pool.occupancy(),
        Occupancy {
            suspended: 0,
            live: 3,
            running: 2,
            advertised: 1,
            queued: 0
        }
    );
}

#[test]
fn a_standing_queue_turns_lifo_and_sheds_what_waited_past_the_target() {
    let pool = Pool::new(PoolLimits {
        max_running: 1,
        queue_target: 5 * MS,
        queue_interval: 100 * MS,
        ..limits(1, 1000)
    });
    let (tx, _rx) = mpsc::unbounded_channel();
    let t0 = now();
    assert!(matches!(pool.admit(0, t0), Admission::Start(1, 0)));
    // A standing queue of three, each job waiting 30 ms (> target), for
    // more than an interval, but served as fast as jobs arrive (closed-loop
    // clients taking turns): FIFO all along, nothing shed.
    for job in 1..=3 {
        assert!(matches!(pool.admit(job, t0), Admission::Queued(..)));
    }
    let mut at = t0;
    for job in 4..=30 {
        at += 10 * MS;
        assert!(matches!(pool.admit(job, at), Admission::Queued(..)));
        assert_eq!(
            pool.advertise(1, &tx, at),
            Some(job - 3),
            "FIFO while not overloaded"
        );
    }
    assert!(!pool.lock().codel.overloaded);
    assert!(take_shed().is_empty());
    // Now jobs arrive five times as fast as they are served: a growing queue
    // (for two intervals in a row before it counts).
    // Once an interval of that has ended, the next dequeue finds the queue
    // overloaded: it sheds what waited past the target, serves the newest.
    let mut job = 31;
    loop {
        for arrival in 0..5 {
            at += 2 * MS;
            assert!(matches!(
                pool.admit(job + arrival, at),
                Admission::Queued(..)
            ));
        }
        job += 5;
        let queued = pool.occupancy().queued;
        let next = pool.advertise(1, &tx, at);
        if pool.lock().codel.overloaded {
            assert_eq!(next, Some(job - 1), "the newest first");
            // All but the newest three had waited past the target.
            assert_eq!(take_shed().len(), queued - 3);
            assert_eq!(pool.advertise(1, &tx, at), Some(job - 2));
            assert_eq!(pool.advertise(1, &tx, at), Some(job - 3));
            assert_eq!(pool.occupancy().queued, 0);
            break;
        }
        assert!(job < 1000, "never overloaded");
    }
    // Overloaded: the queue keeps only as many of the newest as workers
    // took within the target at the last interval's rate (here one, at 10
    // per 100 ms): an older one is shed as soon as a newer one arrives.
    assert!(matches!(pool.admit(1000, at), Admission::Queued(..)));
    assert!(take_shed().is_empty());
    assert!(matches!(pool.admit(1001, at + MS), Admission::Queued(..)));
    assert_eq!(take_shed(), vec![1000]);
    assert_eq!(pool.advertise(1, &tx, at + 2 * MS), Some(1001));
    assert!(matches!(
        pool.admit(1002, at + 3 * MS),
        Admission::Queued(..)
    ));
    assert!(matches!(
        pool.admit(1003, at + 4 * MS),
        Admission::Queued(..)
    ));
    assert_eq!(take_shed(), vec![1002]);
    assert_eq!(pool.occupancy().queued, 1);
    // The queue drains: after an interval with no wait, it is FIFO again.
    assert_eq!(pool.advertise(1, &tx, at + 5 * MS), Some(1003));
    assert_eq!(pool.advertise(1, &tx, at + 200 * MS), None);
    let Admission::Handed = pool.admit(2000, at + 201 * MS) else {
        panic!()
    };
    assert!(matches!(
        pool.admit(2001, at + 202 * MS),
        Admission::Queued(..)
    ));
}

#[test]
fn clients_ramping_up_within_an_interval_are_queued_not_shed() {
    let pool = Pool::new(PoolLimits {
        max_running: 1,
        ..limits(1, 1000)
    });
    let interval = pool.limits().queue_interval;
    let (tx, _rx) = mpsc::unbounded_channel();
    let t0 = now();
    assert!(matches!(pool.admit(0, t0), Admission::Start(1, 0)));
    // 200 clients arrive over most of one interval, and each sends its
    // next request as soon as its last one is served, one per millisecond:
    // a long standing queue that stops growing once they are all there.
    let ramp_ms = (interval * 4 / 5).as_millis() as u64;
    let (mut next, mut served) = (1, 1);
    let mut at = t0;
    while served < 2000 {
        at += MS;
        let clients = (200 * (at - t0).as_millis() as u64 / ramp_ms).min(200);
        while next < clients {
            assert!(matches!(pool.admit(next, at), Admission::Queued(..)));
            next += 1;
        }
        assert_eq!(pool.advertise(1, &tx, at), Some(served), "FIFO");
        served += 1;
        assert!(matches!(pool.admit(next, at), Admission::Queued(..)));
        next += 1;
    }
    assert!(!pool.lock().codel.overloaded);
    assert!(take_shed().is_empty());
}

/// One worker finishing one job per millisecond (or per `service`
/// milliseconds) on a simulated clock, and callers that give up on a queued
/// job when its patience runs out, as the dispatcher's do.
struct Clocked {
    pool: Pool<u64>,
    mailbox: Mailbox<u64>,
    inbox: mpsc::UnboundedReceiver<u64>,
    at: Instant,
    running: Option<u64>,
    /// Queued jobs and when their callers give up on them.
    patience: HashMap<u64, (Ticket, Instant)>,
    service: u64,
    ticks: u64,
}

impl Clocked {
    fn new() -> Self {
        Self::with_service(1)
    }

    fn with_service(service_ms: u64) -> Self {
        let pool = Pool::new(PoolLimits {
            max_running: 1,
            ..limits(1, 1000)
        });
        let (mailbox, inbox) = mpsc::unbounded_channel();
        let at = now();
        assert!(matches!(pool.admit(0, at), Admission::Start(1, 0)));
        Clocked {
            pool,
            mailbox,
            inbox,
            at,
            running: Some(0),
            patience: HashMap::new(),
            service: service_ms,
            ticks: 0,
        }
    }

    /// Admits `job` now; `false` if it was refused at once.
    fn send(&mut self, job: u64) -> bool {
        match self.pool.admit(job, self.at) {
            Admission::Queued(ticket) => {
                let patience = self.pool.limits().max_queue_wait;
                self.patience.insert(job, (ticket, self.at + patience));
                true
            }
            Admission::Handed => true,
            Admission::Overloaded(_) => false,
            other => panic!("{other:?}"),
        }
    }

    /// One millisecond later: the running job is done, if its service time
    /// is over, and the worker takes the next. Returns the job served (if
    /// any) and the jobs that failed as overloaded: shed by the pool or
    /// given up on by their callers.
    fn tick(&mut self) -> (Option<u64>, Vec<u64>) {
        self.at += MS;
        self.ticks += 1;
        let mut failed = take_shed();
        let at = self.at;
        let expired: Vec<u64> = self
            .patience
            .iter()
            .filter(|(_, (_, until))| *until < at)
            .map(|(job, _)| *job)
            .collect();
        for job in expired {
            let (ticket, _) = self.patience.remove(&job).unwrap();
            failed.extend(self.pool.cancel(ticket));
        }
        if !self.ticks.is_multiple_of(self.service) {
            return (None, failed);
        }
        let served = self.running.take();
        self.running = self
            .pool
            .advertise(1, &self.mailbox, self.at)
            .or_else(|| self.inbox.try_recv().ok());
        if let Some(job) = self.running {
            self.patience.remove(&job);
        }
        failed.extend(take_shed());
        for job in &failed {
            self.patience.remove(job);
        }
        (served, failed)
    }

    fn overloaded(&self) -> bool {
        self.pool.lock().codel.overloaded
    }
}

/// 400 clients ramp up over four intervals: a queue growing fast for long
/// enough to be taken for an overload. Each sends again a millisecond after
/// it is served, and `resend_ms` after it is refused. Asserts that a probe
/// ends the overload and that every client then gets its turns.
fn closed_loop_recovers(resend_ms: u64) {
    let mut sim = Clocked::new();
    let interval = sim.pool.limits().queue_interval;
    let ramp_ms = 4 * interval.as_millis() as u64;
    let mut joined = 1;
    // Clients and when each sends again.
    let mut again = BTreeMap::<u64, Vec<u64>>::new();
    let mut seen_overload = false;
    let mut shed_at = Vec::new();
    let mut served_late = HashMap::<u64, u32>::new();
    for ms in 1..=3000u64 {
        let ramped = (400 * ms / ramp_ms).min(400);
        let due = again.remove(&ms).unwrap_or_default();
        for client in due.into_iter().chain(joined..ramped) {
            if !sim.send(client) {
                shed_at.push(ms);
                again.entry(ms + resend_ms).or_default().push(client);
            }
        }
        joined = joined.max(ramped);
        let (served, failed) = sim.tick();
        shed_at.extend(failed.iter().map(|_| ms));
        again.entry(ms + resend_ms).or_default().extend(failed);
        again.entry(ms + 1).or_default().extend(served);
        if ms > 2000
            && let Some(client) = served
        {
            *served_late.entry(client).or_default() += 1;
        }
        seen_overload |= sim.overloaded();
    }
    assert!(seen_overload, "the ramp-up was never taken for an overload");
    let last_shed = *shed_at.last().unwrap();
    assert!(
        last_shed < 20 * interval.as_millis() as u64,
        "still shedding at {last_shed} ms"
    );
    assert!(!sim.overloaded());
    // FIFO again: every client got its turns.
    assert_eq!(served_late.len(), 400);
    assert!(served_late.values().all(|&turns| turns >= 2));
}

#[test]
fn a_closed_loop_taken_for_an_overload_is_queued_again_after_a_probe() {
    closed_loop_recovers(1);
}

#[test]
fn clients_resending_within_half_an_interval_are_queued_again_after_a_probe() {
    // Their 503s come back over the probe's settling and the start of its
    // counting: the counting interval must still see joins fall.
    closed_loop_recovers(10);
}

#[test]
fn an_open_overload_stays_shedding_through_its_probes() {
    let mut sim = Clocked::new();
    // Four new requests a millisecond for a worker that serves one.
    let mut admitted_at = HashMap::new();
    let mut began = None;
    let mut next = 1;
    let mut late = 0;
    for ms in 1..=3000u64 {
        for _ in 0..4 {
            admitted_at.insert(next, sim.at);
            sim.send(next);
            next += 1;
        }
        let (_, failed) = sim.tick();
        if let Some(began) = began {
            assert!(sim.overloaded(), "overload ended at {ms} ms");
            // Past the onset, what a worker takes has barely waited...
            if let Some(job) = sim.running {
                assert!(sim.at - admitted_at[&job] <= 2 * MS);
            }
            // ...and few are told late (by the probes) that they are shed.
            let target = sim.pool.limits().queue_target;
            if ms > began + 100 {
                late += failed
                    .iter()
                    .filter(|job| sim.at - admitted_at[job] > 2 * target)
                    .count();
            }
        } else if sim.overloaded() {
            began = Some(ms);
        }
    }
    assert!(began.is_some(), "never overloaded");
    let codel = &sim.pool.lock().codel;
    assert!(
        codel.probe_gap > 2 * PROBE_FIRST_INTERVALS,
        "probes: gap {}",
        codel.probe_gap
    );
    // 3 s x 3 surplus requests a millisecond are shed; those queued during
    // a probe (at 50 ms, 250 ms and 1 s after the onset) are shed late, 50
    // at most for each: a probe ends once it has seen the overload hold.
    assert!(late <= 150, "{late} shed late");
}

#[test]
fn an_overloaded_queue_keeps_a_guest_slower_than_its_target_busy() {
    // A guest taking 18 ms, eighteen times the target, and a request every
    // 5 ms: when the worker is free, the newest job has mostly waited past
    // the target. It must start all the same, or the worker idles until the
    // next request arrives.
    let pool = Pool::new(PoolLimits {
        max_running: 1,
        queue_target: MS,
        queue_interval: 500 * MS,
        ..limits(1, 1000)
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t0 = now();
    assert!(matches!(pool.admit(0, t0), Admission::Start(1, 0)));
    let mut busy_until = Some(t0 + 18 * MS);
    let (mut next, mut served, mut overloaded_at) = (1, 0, None);
    for ms in 1..=10_000u32 {
        let at = t0 + ms * MS;
        if busy_until.is_some_and(|until| at >= until) {
            served += u32::from(overloaded_at.is_some());
            busy_until = pool.advertise(1, &tx, at).map(|_| at + 18 * MS);
        }
        if ms % 5 == 0 {
            if let Admission::Handed = pool.admit(next, at) {
                rx.try_recv().expect("the handed job");
                busy_until = Some(at + 18 * MS);
            }
            next += 1;
        }
        if overloaded_at.is_none() && pool.lock().codel.overloaded {
            overloaded_at = Some(ms);
        }
    }
    let began = overloaded_at.expect("never overloaded");
    assert!(!take_shed().is_empty());
    let busy = (10_000 - began) / 18;
    assert!(served + 1 >= busy, "served {served} in the time of {busy}");
}

#[test]
fn a_full_pool_is_capacity_the_job_waits_for_an_exit() {
    let pool = Pool::new(limits(4, 8));
    assert!(matches!(pool.admit(1, now()), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(2, now()), Admission::Start(2, 2)));
    // Worker 2 finds no room to instantiate: job 2 waits, nothing starts
    // until worker 1 exits, though max_instances would allow it.
    assert_eq!(pool.at_capacity(2, Some(2), now()).ok(), Some(vec![]));
    assert!(matches!(pool.admit(3, now()), Admission::Queued(..)));
    assert!(pool.prewarm().is_empty());
    assert_eq!(pool.exited(1, vec![], now()), vec![(3, 2), (4, 3)]);
    // With no other instance alive, waiting would not help: the job comes back.
    assert_eq!(pool.exited(3, vec![], now()), vec![]);
    assert_eq!(pool.at_capacity(4, Some(9), now()).err(), Some(Some(9)));
}

#[test]
fn cancel_finds_jobs_pushed_at_either_end() {
    let pool = Pool::new(PoolLimits {
        max_running: 1,
        ..limits(1, 8)
    });
    assert!(matches!(pool.admit(1, now()), Admission::Start(1, 1)));
    let Admission::Queued(back) = pool.admit(2, now()) else {
        panic!()
    };
    assert!(pool.readmit(3, now()).is_empty());
    let Admission::Queued(last) = pool.admit(4, now()) else {
        panic!()
    };
    assert_eq!(pool.cancel(last), Some(4));
    assert_eq!(pool.cancel(back), Some(2));
    let (tx, _rx) = mpsc::unbounded_channel();
    assert_eq!(pool.advertise(1, &tx, now()), Some(3));
}

/// xorshift64*: a tiny deterministic generator, so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    Pending,
    Completed,
    Overloaded,
    Cancelled,
    Crashed,
}

struct SimWorker {
    mailbox: Mailbox<u64>,
    inbox: mpsc::UnboundedReceiver<u64>,
    running: Vec<u64>,
    capacity: usize,
    advertised: bool,
    /// Whether the pool should count it as running.
    busy: bool,
    /// Yielded its place: waits for this before it runs again.
    suspended: Option<Resume>,
}

struct Sim {
    pool: Pool<u64>,
    workers: BTreeMap<WorkerId, SimWorker>,
    fates: HashMap<u64, Fate>,
    tickets: Vec<(Ticket, u64)>,
    next_job: u64,
    max_instances: usize,
    max_running: usize,
    yields: usize,
}

impl Sim {
    fn start(&mut self, id: WorkerId, job: Option<u64>, capacity: usize) {
        let (mailbox, inbox) = mpsc::unbounded_channel();
        let old = self.workers.insert(
            id,
            SimWorker {
                mailbox,
                inbox,
                running: job.into_iter().collect(),
                capacity,
                advertised: false,
                busy: true,
                suspended: None,
            },
        );
        assert!(old.is_none(), "worker id {id} reused");
    }

    fn check(&self) {
        let occupancy = self.pool.occupancy();
        assert_eq!(occupancy.live, self.workers.len());
        assert!(occupancy.live <= self.max_instances);
        // A job mailed to a worker, or a resume sent, makes it running at
        // once.
        let busy = self
            .workers
            .values()
            .filter(|w| {
                let resumed = w.suspended.as_ref().is_some_and(|r| !r.is_empty());
                w.busy || !w.inbox.is_empty() || resumed
            })
            .count();
        assert_eq!(occupancy.running, busy);
        let suspended = self.workers.values().filter(|w| w.suspended.is_some());
        let waiting = suspended.filter(|w| w.suspended.as_ref().unwrap().is_empty());
        assert_eq!(occupancy.suspended, waiting.count());
        if occupancy.suspended > 0 {
            assert!(
                occupancy.running >= self.max_running,
                "a suspended worker waits while a place is free"
            );
        }
        if occupancy.queued > 0 && occupancy.running < self.max_running {
            assert_eq!(
                occupancy.advertised, 0,
                "queued jobs while a worker is free"
            );
            assert_eq!(
                occupancy.live, self.max_instances,
                "queued jobs while room to start"
            );
        }
        for worker in self.workers.values() {
            assert!(worker.running.len() <= worker.capacity);
        }
    }

    fn step(&mut self, rng: &mut Rng) {
        // A suspended worker that was resumed runs again; it does nothing
        // else while suspended.
        for worker in self.workers.values_mut() {
            if worker
                .suspended
                .as_mut()
                .is_some_and(|r| r.try_recv().is_ok())
            {
                worker.suspended = None;
                worker.busy = true;
            }
        }
        let ids: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.suspended.is_none())
            .map(|(id, _)| *id)
            .collect();
        let some_worker = |rng: &mut Rng| (!ids.is_empty()).then(|| ids[rng.below(ids.len())]);
        match rng.below(10) {
            0 | 1 => {
                let job = self.next_job;
                self.next_job += 1;
                self.fates.insert(job, Fate::Pending);
                match self.pool.admit(job, now()) {
                    Admission::Handed => {}
                    Admission::Start(id, job) => self.start(id, Some(job), 1 + rng.below(3)),
                    Admission::Queued(ticket) => self.tickets.push((ticket, job)),
                    Admission::Overloaded(job) => {
                        self.fates.insert(job, Fate::Overloaded);
                    }
                    Admission::Closed(_) => unreachable!("never closed here"),
                }
            }
            2 => {
                // A worker picks up what was mailed to it.
                if let Some(id) = some_worker(rng) {
                    let worker = self.workers.get_mut(&id).unwrap();
                    while let Ok(job) = worker.inbox.try_recv() {
                        worker.advertised = false;
                        worker.busy = true;
                        worker.running.push(job);
                    }
                }
            }
            8 => {
                // A worker blocks on I/O, or runs again.
                if let Some(id) = some_worker(rng) {
                    let worker = self.workers.get_mut(&id).unwrap();
                    if !worker.inbox.is_empty() {
                        // Mail wakes it: it does not block now.
                    } else if worker.busy {
                        worker.busy = false;
                        for (new_id, job) in self.pool.park(id, now()) {
                            self.start(new_id, Some(job), 1 + rng.below(3));
                        }
                    } else {
                        worker.busy = true;
                        self.pool.unpark(id);
                    }
                }
            }
            3 => {
                // A worker with room advertises (only once its inbox is empty:
                // the real worker drains its mailbox before advertising).
                if let Some(id) = some_worker(rng) {
                    let worker = self.workers.get_mut(&id).unwrap();
                    if !worker.advertised
                        && worker.inbox.is_empty()
                        && worker.running.len() < worker.capacity
                    {
                        let job = self.pool.advertise(id, &worker.mailbox, now());
                        worker.busy = job.is_some();
                        match job {
                            Some(job) => worker.running.push(job),
                            None => worker.advertised = true,
                        }
                    }
                }
            }
            4 => {
                // A request finishes, in random order.
                if let Some(id) = some_worker(rng) {
                    let worker = self.workers.get_mut(&id).unwrap();
                    if !worker.running.is_empty() {
                        let job = worker.running.swap_remove(rng.below(worker.running.len()));
                        self.fates.insert(job, Fate::Completed);
                    }
                }
            }
            5 => {
                // A queued caller gives up.
                if !self.tickets.is_empty() {
                    let (ticket, job) = self.tickets.swap_remove(rng.below(self.tickets.len()));
                    if self.pool.cancel(ticket).is_some() {
                        self.fates.insert(job, Fate::Cancelled);
                    }
                }
            }
            9 => {
                // A computing worker reaches the end of its time slice.
                if let Some(id) = some_worker(rng)
                    && self.workers[&id].busy
                    && self.workers[&id].inbox.is_empty()
                    && let Some((resume, starts)) = self.pool.yield_place(id, now())
                {
                    self.yields += 1;
                    let worker = self.workers.get_mut(&id).unwrap();
                    worker.busy = false;
                    worker.suspended = Some(resume);
                    for (new_id, job) in starts {
                        self.start(new_id, Some(job), 1 + rng.below(3));
                    }
                }
            }
            6 => {
                // An idle worker withdraws and exits (idle timeout, reuse spent).
                if let Some(id) = some_worker(rng)
                    && self.workers[&id].running.is_empty()
                {
                    self.exit(id, false);
                }
            }
            _ => {
                // A worker crashes: its running jobs fail, its mailbox is
                // returned unstarted. Rarer than the rest.
                if rng.below(4) == 0 {
                    // Suspended ones too: a request deadline fires there.
                    let all: Vec<WorkerId> = self.workers.keys().copied().collect();
                    if !all.is_empty() {
                        self.exit(all[rng.below(all.len())], true);
                    }
                }
            }
        }
        self.check();
    }

    fn exit(&mut self, id: WorkerId, crash: bool) {
        self.pool.withdraw(id);
        let mut worker = self.workers.remove(&id).unwrap();
        let mut unstarted = Vec::new();
        while let Ok(job) = worker.inbox.try_recv() {
            unstarted.push(job);
        }
        if crash {
            for job in worker.running.drain(..) {
                self.fates.insert(job, Fate::Crashed);
            }
        }
        assert!(worker.running.is_empty());
        drop(worker);
        for (new_id, job) in self.pool.exited(id, unstarted, now()) {
            self.start(new_id, Some(job), 1);
        }
    }

    /// Lets every worker run to completion until nothing is left anywhere.
    fn drain(&mut self) {
        for _ in 0..100_000 {
            let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
            for id in ids {
                let worker = self.workers.get_mut(&id).unwrap();
                if let Some(resume) = &mut worker.suspended {
                    if resume.try_recv().is_err() {
                        continue;
                    }
                    worker.suspended = None;
                    worker.busy = true;
                }
                while let Ok(job) = worker.inbox.try_recv() {
                    worker.advertised = false;
                    worker.busy = true;
                    worker.running.push(job);
                }
                for job in worker.running.drain(..) {
                    self.fates.insert(job, Fate::Completed);
                }
                if worker.advertised && worker.busy {
                    // Done computing: it blocks (on its client) again.
                    worker.busy = false;
                    let starts = self.pool.park(id, now());
                    for (new_id, job) in starts {
                        self.start(new_id, Some(job), 1);
                    }
                    self.check();
                    continue;
                }
                if !worker.advertised {
                    let job = self.pool.advertise(id, &worker.mailbox, now());
                    worker.busy = job.is_some();
                    match job {
                        Some(job) => worker.running.push(job),
                        None => worker.advertised = true,
                    }
                }
                self.check();
            }
            if self.pool.occupancy().queued == 0
                && self
                    .workers
                    .values()
                    .all(|w| w.running.is_empty() && w.inbox.is_empty())
            {
                return;
            }
        }
        panic!("the pool did not drain");
    }
}

#[test]
fn randomized_stress_loses_and_orphans_nothing() {
    let mut yields = 0;
    for seed in 1..=40u64 {
        let max_instances = 1 + (seed as usize % 5);
        let max_running = 1 + (seed as usize % 3);
        let mut sim = Sim {
            pool: Pool::new(PoolLimits {
                max_running,
                ..limits(max_instances, seed as usize % 7)
            }),
            workers: BTreeMap::new(),
            fates: HashMap::new(),
            tickets: Vec::new(),
            next_job: 0,
            max_instances,
            max_running,
            yields: 0,
        };
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        for _ in 0..6_000 {
            sim.step(&mut rng);
        }
        sim.drain();
        for job in take_shed() {
            sim.fates.insert(job, Fate::Overloaded);
        }
        let pending: Vec<_> = sim
            .fates
            .iter()
            .filter(|(_, f)| **f == Fate::Pending)
            .collect();
        assert!(pending.is_empty(), "seed {seed}: jobs lost: {pending:?}");
        assert!(sim.next_job > 1_000, "seed {seed}: too few jobs exercised");
        yields += sim.yields;
        assert!(
            sim.fates.values().any(|f| *f == Fate::Completed),
            "seed {seed}: nothing completed"
        );
    }
    assert!(yields > 100, "time slices yielded only {yields} times");
}

#[test]
fn a_probe_compares_rates_however_long_its_settling_lasted() {
    // An open overload on a guest taking 16 ms: four arrivals a
    // millisecond, and a sample only when the worker takes a job, so a
    // probe's settling lasts its quarter interval plus up to 16 ms until
    // the next sample. Joins over that longer time are no faster.
    let mut codel = Codel::new(&PoolLimits {
        max_running: 1,
        ..PoolLimits::default()
    });
    let t0 = now();
    let (mut began, mut queued) = (None, 0);
    for ms in 1..=3000u32 {
        let at = t0 + ms * MS;
        codel.joined += 4;
        queued += 4;
        if ms % 16 == 0 {
            codel.observe(20 * MS, at, true, queued);
            codel.left += 1;
            queued -= 1;
        }
        match began {
            Some(began) => assert!(
                codel.overloaded,
                "overload ended at {ms} ms (began {began})"
            ),
            None if codel.overloaded => began = Some(ms),
            None => {}
        }
    }
    assert!(began.is_some(), "never overloaded");
    assert!(codel.probe_gap > 2 * PROBE_FIRST_INTERVALS, "never probed");
}

#[test]
fn an_overload_that_resumes_after_a_probe_ended_it_is_known_once_it_grows_as_far() {
    // Four arrivals a millisecond and one departure, until the load stalls
    // long enough for a probe to see no arrivals and end the overload.
    let mut codel = Codel::new(&PoolLimits {
        max_running: 1,
        ..PoolLimits::default()
    });
    let interval_ms = codel.interval.as_millis() as u32;
    let t0 = now();
    let (mut stalled, mut resumed, mut queued) = (None, None, 0usize);
    for ms in 1..=2000u32 {
        let arriving = match (stalled, resumed) {
            (None, _) => {
                if codel.probe.is_some() {
                    stalled = Some(ms);
                }
                true
            }
            (Some(_), None) => {
                if !codel.overloaded {
                    resumed = Some(ms);
                }
                false
            }
            (Some(_), Some(resumed)) => {
                if codel.overloaded {
                    // Growing by three a millisecond from an empty queue:
                    // past the onset backlog, and at the end of the
                    // interval in which it was passed.
                    let backlog_ms = ONSET_BACKLOG as u32 / 3;
                    let took = ms - resumed;
                    assert!(took > backlog_ms, "{took} ms");
                    assert!(took <= backlog_ms + interval_ms + 2, "{took} ms");
                    return;
                }
                true
            }
        };
        if arriving {
            codel.joined += 4;
            queued += 4;
        }
        codel.observe(20 * MS, t0 + ms * MS, true, queued);
        codel.left += 1;
        queued = queued.saturating_sub(1);
    }
    panic!("stalled at {stalled:?}, resumed at {resumed:?}, never overloaded again");
}

/// The largest closed loop the onset rule lets through, on a worker taking
/// `service_ms` a job: a client that ramps up in bursts of 64 every
/// interval and then only looks at its answers every 30 ms, sending again
/// in one burst all those served since, and at once those that failed (its
/// patience ran out). Each interval in the ramp sees far more join than
/// leave, as in an overload. Asserts the queue is never taken for
/// overloaded; returns how many requests failed.
fn closed_loop_of_the_onset_backlog(service_ms: u64) -> usize {
    let mut sim = Clocked::with_service(service_ms);
    let interval_ms = sim.pool.limits().queue_interval.as_millis() as u64;
    let clients = ONSET_BACKLOG as u64;
    let (mut arrived, mut answered, mut failures) = (1, Vec::new(), 0);
    for ms in 1..=6000u64 {
        let mut sending = Vec::new();
        if ms % interval_ms == 1 {
            sending.extend(arrived..(arrived + 64).min(clients));
            arrived = (arrived + 64).min(clients);
        }
        if ms % 30 == 0 {
            sending.append(&mut answered);
        }
        for client in sending {
            assert!(sim.send(client), "refused at {ms} ms");
        }
        let (served, failed) = sim.tick();
        assert!(!sim.overloaded(), "taken for an overload at {ms} ms");
        answered.extend(served);
        failures += failed.len();
        for client in failed {
            assert!(sim.send(client), "refused at {ms} ms");
        }
    }
    assert_eq!(arrived, clients);
    failures
}

#[test]
fn a_closed_loop_of_up_to_the_onset_backlog_is_never_shed_however_it_arrives() {
    assert_eq!(closed_loop_of_the_onset_backlog(1), 0);
}

#[test]
fn a_closed_loop_whose_callers_time_out_and_send_again_is_still_not_overload() {
    // 10 ms a job: the last in line would wait 2.5 s, past the callers'
    // patience (2 s), and those that give up send again at once: many more
    // join than leave, for as long as it lasts, but the queue is no longer.
    assert!(closed_loop_of_the_onset_backlog(10) > 0, "nobody timed out");
}

/// Two running places, many instances: the time-slice tests' pool.
fn two_places() -> Pool<u64> {
    Pool::new(PoolLimits {
        max_running: 2,
        ..limits(8, 16)
    })
}

/// [`two_places`], with client 1's jobs 1 and 11 running on workers 1
/// and 2.
fn client_1_on_both_places() -> Pool<u64> {
    let pool = two_places();
    assert!(matches!(pool.admit(1, now()), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(11, now()), Admission::Start(2, 11)));
    pool
}

#[test]
fn a_guest_past_its_slice_yields_to_a_client_holding_fewer_places() {
    let pool = two_places();
    // Client 1 holds both places; client 2 waits.
    assert!(matches!(pool.admit(1, now()), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(11, now()), Admission::Start(2, 11)));
    assert!(matches!(pool.admit(2, now()), Admission::Queued(..)));
    let (mut resume, starts) = pool.yield_place(1, now()).expect("yields to client 2");
    assert_eq!(starts, vec![(3, 2)]);
    let occupancy = pool.occupancy();
    assert_eq!((occupancy.running, occupancy.suspended), (2, 1));
    // Client 2's worker holds its one place now: worker 2 (client 1) has
    // no one poorer to yield to.
    assert!(pool.yield_place(2, now()).is_none());
    // A place frees: the suspended worker runs before a later queued job of
    // its client.
    assert!(matches!(pool.admit(21, now()), Admission::Queued(..)));
    assert!(resume.try_recv().is_err());
    assert!(pool.park(3, now()).is_empty());
    assert!(resume.try_recv().is_ok());
    let occupancy = pool.occupancy();
    assert_eq!(
        (occupancy.running, occupancy.suspended, occupancy.queued),
        (2, 0, 1)
    );
}

#[test]
fn one_clients_requests_never_suspend_each_other() {
    let pool = client_1_on_both_places();
    assert!(matches!(pool.admit(21, now()), Admission::Queued(..)));
    assert!(pool.yield_place(1, now()).is_none());
    // Nor does a worker with nothing waiting at all.
    let pool = two_places();
    assert!(matches!(pool.admit(1, now()), Admission::Start(1, 1)));
    assert!(pool.yield_place(1, now()).is_none());
}

#[test]
fn clients_with_a_place_each_take_turns_with_a_third() {
    let pool = two_places();
    assert!(matches!(pool.admit(1, now()), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(2, now()), Admission::Start(2, 2)));
    assert!(matches!(pool.admit(3, now()), Admission::Queued(..)));
    // One place each: client 3, with none, gets worker 1's.
    let (mut first, starts) = pool.yield_place(1, now()).expect("yields to client 3");
    assert_eq!(starts, vec![(3, 3)]);
    // Client 1 now holds none: worker 2's slice goes to suspended worker 1.
    let (mut second, starts) = pool.yield_place(2, now()).expect("yields to client 1");
    assert!(starts.is_empty());
    assert!(first.try_recv().is_ok());
    assert!(second.try_recv().is_err());
    // And back: worker 3 (client 3) yields to client 2's suspended worker.
    let (_third, starts) = pool.yield_place(3, now()).expect("yields to client 2");
    assert!(starts.is_empty());
    assert!(second.try_recv().is_ok());
    assert_eq!(pool.occupancy().suspended, 1);
}

#[test]
fn a_suspended_worker_that_exits_leaves_the_line_and_its_place_is_kept() {
    let pool = client_1_on_both_places();
    assert!(matches!(pool.admit(2, now()), Admission::Queued(..)));
    let (_resume, starts) = pool.yield_place(1, now()).expect("yields to client 2");
    assert_eq!(starts, vec![(3, 2)]);
    // Its request's deadline fires while it is suspended.
    assert!(pool.exited(1, Vec::new(), now()).is_empty());
    let occupancy = pool.occupancy();
    assert_eq!(
        (occupancy.live, occupancy.running, occupancy.suspended),
        (2, 2, 0)
    );
}

#[test]
fn a_suspended_worker_gets_no_jobs_until_it_resumes() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let pool = client_1_on_both_places();
    // Advertised while it waited on I/O, then computing again.
    assert_eq!(pool.advertise(1, &tx, now()), None);
    pool.unpark(1);
    assert!(matches!(pool.admit(2, now()), Admission::Queued(..)));
    let (mut resume, starts) = pool.yield_place(1, now()).expect("yields to client 2");
    assert_eq!(starts, vec![(3, 2)]);
    // Its advertisement is set aside: the next job waits rather than sit
    // in the mailbox of a worker that is not running.
    assert!(matches!(pool.admit(4, now()), Admission::Queued(..)));
    assert!(rx.try_recv().is_err());
    // A place frees: client 4's job goes first, as its client holds none
    // and worker 1's still holds worker 2's.
    assert_eq!(
        pool.advertise(3, &mpsc::unbounded_channel().0, now()),
        Some(4)
    );
    assert!(resume.try_recv().is_err());
    // At the next, worker 1 resumes, with its advertisement back.
    assert_eq!(pool.advertise(2, &mpsc::unbounded_channel().0, now()), None);
    assert!(resume.try_recv().is_ok());
    assert_eq!(pool.occupancy().advertised, 2);
    assert!(rx.try_recv().is_err());
}

#[test]
fn a_waiting_client_is_not_passed_over_by_suspended_ones() {
    // Three clients with a long computation each take turns on two places;
    // client 4 comes later and must not wait for all of them.
    let pool = two_places();
    let t0 = now();
    assert!(matches!(pool.admit(1, t0), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(2, t0), Admission::Start(2, 2)));
    assert!(matches!(pool.admit(3, t0), Admission::Queued(..)));
    let (mut first, starts) = pool.yield_place(1, t0 + MS).expect("yields to client 3");
    assert_eq!(starts, vec![(3, 3)]);
    assert!(matches!(pool.admit(4, t0 + 2 * MS), Admission::Queued(..)));
    // Client 4, with nothing running or suspended, goes before worker 1,
    // which waited longer but whose client is taking turns.
    let (mut second, starts) = pool.yield_place(2, t0 + 3 * MS).expect("yields");
    assert_eq!(starts, vec![(4, 4)]);
    assert!(first.try_recv().is_err());
    let occupancy = pool.occupancy();
    assert_eq!(
        (occupancy.running, occupancy.suspended, occupancy.queued),
        (2, 2, 0)
    );
    // Among equals, the longest suspended goes first: worker 1, then 2.
    let (_third, starts) = pool.yield_place(3, t0 + 4 * MS).expect("yields");
    assert!(starts.is_empty());
    assert!(first.try_recv().is_ok());
    assert!(pool.park(4, t0 + 5 * MS).is_empty());
    assert!(second.try_recv().is_ok());
    let occupancy = pool.occupancy();
    assert_eq!((occupancy.running, occupancy.suspended), (2, 1));
}

#[test]
fn a_suspended_worker_that_withdrew_does_not_advertise_when_it_resumes() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let pool = client_1_on_both_places();
    assert_eq!(pool.advertise(1, &tx, now()), None);
    pool.unpark(1);
    assert!(matches!(pool.admit(2, now()), Admission::Queued(..)));
    let (mut resume, starts) = pool.yield_place(1, now()).expect("yields to client 2");
    assert_eq!(starts, vec![(3, 2)]);
    // It is closing (its request expired) while suspended.
    pool.withdraw(1);
    assert!(pool.park(3, now()).is_empty());
    assert!(resume.try_recv().is_ok());
    assert_eq!(pool.occupancy().advertised, 0);
}
