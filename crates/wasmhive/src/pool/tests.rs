//! The scheduling core under many requests, random completion order,
//! cancellations, exits and crashes, with no wasmtime involved.

use std::collections::{BTreeMap, HashMap};

use super::*;

fn limits(max_instances: usize, max_queue_len: usize) -> PoolLimits {
    PoolLimits {
        max_instances,
        max_queue_len,
        ..PoolLimits::default()
    }
}

#[test]
fn first_job_starts_a_worker_then_the_queue_fills_then_overload() {
    let pool = Pool::new(limits(1, 2));
    assert!(matches!(pool.admit(1), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(2), Admission::Queued(_)));
    assert!(matches!(pool.admit(3), Admission::Queued(_)));
    assert!(matches!(pool.admit(4), Admission::Overloaded(4)));
    let occupancy = pool.occupancy();
    assert_eq!((occupancy.live, occupancy.queued), (1, 2));
}

#[test]
fn advertising_worker_takes_the_oldest_queued_job_first() {
    let pool = Pool::new(limits(1, 4));
    let (tx, mut rx) = mpsc::unbounded_channel();
    assert!(matches!(pool.admit(1), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(2), Admission::Queued(_)));
    assert!(matches!(pool.admit(3), Admission::Queued(_)));
    assert_eq!(pool.advertise(1, &tx), Some(2));
    assert_eq!(pool.advertise(1, &tx), Some(3));
    // Nothing queued: the worker is advertised and the next job is mailed.
    assert_eq!(pool.advertise(1, &tx), None);
    assert!(matches!(pool.admit(4), Admission::Handed));
    assert_eq!(rx.try_recv().ok(), Some(4));
    // The advertisement was used up by that job.
    assert!(matches!(pool.admit(5), Admission::Queued(_)));
}

#[test]
fn cancelled_queued_job_is_removed_and_never_handed_out() {
    let pool = Pool::new(limits(1, 4));
    let (tx, _rx) = mpsc::unbounded_channel();
    assert!(matches!(pool.admit(1), Admission::Start(..)));
    let Admission::Queued(ticket) = pool.admit(2) else {
        panic!("expected queued")
    };
    assert_eq!(pool.cancel(ticket), Some(2));
    assert_eq!(pool.cancel(ticket), None);
    assert_eq!(pool.advertise(1, &tx), None);
    assert_eq!(pool.occupancy().queued, 0);
}

#[test]
fn exit_starts_a_worker_for_queued_jobs_and_requeues_unstarted_ones() {
    let pool = Pool::new(limits(1, 4));
    assert!(matches!(pool.admit(1), Admission::Start(1, 1)));
    assert!(matches!(pool.admit(2), Admission::Queued(_)));
    // Worker 1 dies with job 7 in its mailbox, never started: job 7 goes
    // first, ahead of job 2.
    let starts = pool.exited(1, vec![7]);
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
    assert!(matches!(pool.admit(1), Admission::Start(1, 1)));
    assert_eq!(pool.advertise(1, &tx), None);
    pool.withdraw(1);
    match pool.admit(2) {
        Admission::Start(2, 2) => {}
        other => panic!("expected a new worker, got {other:?}"),
    }
    assert!(rx.try_recv().is_err());
}

#[test]
fn prewarm_fills_up_to_target_and_counts_pending_ones() {
    let pool: Pool<u32> = Pool::new(PoolLimits {
        prewarm: 3,
        max_instances: 4,
        ..PoolLimits::default()
    });
    assert_eq!(pool.prewarm(), vec![1, 2, 3]);
    assert_eq!(pool.prewarm(), Vec::<WorkerId>::new());
    let (tx, _rx) = mpsc::unbounded_channel();
    assert_eq!(pool.advertise(1, &tx), None);
    assert!(matches!(pool.admit(10), Admission::Handed));
    // Worker 1 was taken: one more may start, within max_instances.
    assert_eq!(pool.prewarm(), vec![4]);
    assert_eq!(pool.prewarm(), Vec::<WorkerId>::new());
}

#[test]
fn closed_pool_rejects_but_keeps_queued_jobs_for_draining() {
    let pool = Pool::new(limits(1, 4));
    let (tx, _rx) = mpsc::unbounded_channel();
    assert!(matches!(pool.admit(1), Admission::Start(..)));
    assert!(matches!(pool.admit(2), Admission::Queued(_)));
    pool.close();
    assert!(matches!(pool.admit(3), Admission::Closed(3)));
    assert_eq!(pool.advertise(1, &tx), Some(2));
    assert_eq!(pool.advertise(1, &tx), None);
    assert_eq!(pool.occupancy().advertised, 0);
    assert!(pool.prewarm().is_empty());
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
}

struct Sim {
    pool: Pool<u64>,
    workers: BTreeMap<WorkerId, SimWorker>,
    fates: HashMap<u64, Fate>,
    tickets: Vec<(Ticket, u64)>,
    next_job: u64,
    max_instances: usize,
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
            },
        );
        assert!(old.is_none(), "worker id {id} reused");
    }

    fn check(&self) {
        let occupancy = self.pool.occupancy();
        assert_eq!(occupancy.live, self.workers.len());
        assert!(occupancy.live <= self.max_instances);
        if occupancy.queued > 0 {
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
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        let some_worker = |rng: &mut Rng| (!ids.is_empty()).then(|| ids[rng.below(ids.len())]);
        match rng.below(8) {
            0 | 1 => {
                let job = self.next_job;
                self.next_job += 1;
                self.fates.insert(job, Fate::Pending);
                match self.pool.admit(job) {
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
                        worker.running.push(job);
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
                        match self.pool.advertise(id, &worker.mailbox) {
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
                if rng.below(4) == 0
                    && let Some(id) = some_worker(rng)
                {
                    self.exit(id, true);
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
        for (new_id, job) in self.pool.exited(id, unstarted) {
            self.start(new_id, Some(job), 1);
        }
    }

    /// Lets every worker run to completion until nothing is left anywhere.
    fn drain(&mut self) {
        for _ in 0..100_000 {
            let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
            for id in ids {
                let worker = self.workers.get_mut(&id).unwrap();
                while let Ok(job) = worker.inbox.try_recv() {
                    worker.advertised = false;
                    worker.running.push(job);
                }
                for job in worker.running.drain(..) {
                    self.fates.insert(job, Fate::Completed);
                }
                if !worker.advertised {
                    match self.pool.advertise(id, &worker.mailbox) {
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
    for seed in 1..=40u64 {
        let max_instances = 1 + (seed as usize % 5);
        let mut sim = Sim {
            pool: Pool::new(limits(max_instances, seed as usize % 7)),
            workers: BTreeMap::new(),
            fates: HashMap::new(),
            tickets: Vec::new(),
            next_job: 0,
            max_instances,
        };
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        for _ in 0..5_000 {
            sim.step(&mut rng);
        }
        sim.drain();
        let pending: Vec<_> = sim
            .fates
            .iter()
            .filter(|(_, f)| **f == Fate::Pending)
            .collect();
        assert!(pending.is_empty(), "seed {seed}: jobs lost: {pending:?}");
        assert!(sim.next_job > 1_000, "seed {seed}: too few jobs exercised");
        assert!(
            sim.fates.values().any(|f| *f == Fate::Completed),
            "seed {seed}: nothing completed"
        );
    }
}
