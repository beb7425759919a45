//! What the handler reports about requests and instances.
//!
//! The library keeps no metrics registry of its own: it hands a
//! [`RequestReport`] for every request and an [`InstanceReport`] for every
//! instance to the [`Recorder`] given to
//! [`ProxyHandler::with_recorder`](crate::ProxyHandler::with_recorder), and
//! keeps a few live gauges and totals readable with
//! [`ProxyHandler::stats`](crate::ProxyHandler::stats). Exporting them (as
//! Prometheus text, say) is the embedder's business.

use std::time::Duration;

/// Why an instance ended.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ExitReason {
    /// It stayed idle past its idle timeout.
    Idle,
    /// It took as many requests as it may ([`ShouldAccept::Never`](crate::ShouldAccept)).
    ReuseSpent,
    /// A request or the instance itself passed its deadline.
    Expired,
    /// The guest trapped (including a panic, a stack overflow, or running out
    /// of memory).
    Trapped,
    /// The handler shut down.
    Shutdown,
    /// Instantiation failed; the instance never served.
    InstantiationFailed,
    /// Callers went away (a reset stream, a closed connection) while the
    /// guest still worked on their requests, and nothing else the instance
    /// held was wanted: it ended with those abandoned guest tasks instead of
    /// letting them hold it.
    Abandoned,
}

impl ExitReason {
    /// Every reason, in a fixed order (the order of [`Stats::exits`]).
    pub const ALL: [ExitReason; 7] = [
        ExitReason::Idle,
        ExitReason::ReuseSpent,
        ExitReason::Expired,
        ExitReason::Trapped,
        ExitReason::Shutdown,
        ExitReason::InstantiationFailed,
        ExitReason::Abandoned,
    ];

    /// A short snake_case label, e.g. for a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Idle => "idle",
            ExitReason::ReuseSpent => "reuse_spent",
            ExitReason::Expired => "expired",
            ExitReason::Trapped => "trapped",
            ExitReason::Shutdown => "shutdown",
            ExitReason::InstantiationFailed => "instantiation_failed",
            ExitReason::Abandoned => "abandoned",
        }
    }

    pub(crate) fn index(self) -> usize {
        ExitReason::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// The life of one instance, reported when it ends.
#[derive(Clone, Debug)]
pub struct InstanceReport {
    /// The worker's incarnation id, unique and increasing within a handler.
    pub incarnation: u64,
    /// Time spent instantiating (including retries).
    pub instantiation_time: Duration,
    /// Time from the end of instantiation to the end of the instance.
    pub lifetime: Duration,
    /// Requests the guest was given.
    pub requests_served: u64,
    /// Most requests outstanding at once.
    pub peak_concurrency: usize,
    /// Why it ended.
    pub reason: ExitReason,
    /// The trap or error that ended it, if any, as one line.
    pub error: Option<String>,
    /// Peak linear memory of the instance in bytes, when the
    /// [`WorkerState`](crate::WorkerState) knows it.
    pub peak_memory: Option<usize>,
}

impl InstanceReport {
    /// The report of an instance that ended before serving anything it can
    /// account for (instantiation failed, or its worker panicked).
    pub(crate) fn ended_early(
        incarnation: u64,
        instantiation_time: std::time::Duration,
        lifetime: std::time::Duration,
        reason: ExitReason,
        error: String,
    ) -> InstanceReport {
        InstanceReport {
            incarnation,
            instantiation_time,
            lifetime,
            requests_served: 0,
            peak_concurrency: 0,
            reason,
            error: Some(error),
            peak_memory: None,
        }
    }
}

/// How a request ended, as far as the handler is concerned.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Outcome {
    /// The guest produced a response head with this status.
    Responded(u16),
    /// See [`ExpirationError`](crate::ExpirationError).
    Expired,
    /// See [`TrapOrPanicError`](crate::TrapOrPanicError).
    Trapped,
    /// The guest returned a `wasi:http` error code.
    GuestError,
    /// See [`Overloaded`](crate::Overloaded).
    Overloaded,
    /// See [`ShuttingDown`](crate::ShuttingDown).
    ShuttingDown,
    /// See [`InstantiationError`](crate::InstantiationError).
    InstantiationFailed,
    /// See [`Error::InvalidRequest`](crate::Error::InvalidRequest).
    InvalidRequest,
    /// See [`Error::Internal`](crate::Error::Internal).
    Internal,
    /// The caller dropped the request before it got a response.
    Cancelled,
}

/// Timings of one request, reported when it gets its response head or fails.
#[derive(Clone, Debug)]
pub struct RequestReport {
    /// The instance that handled it, if it reached one.
    pub incarnation: Option<u64>,
    /// Time from admission until a worker took it.
    pub queue_wait: Duration,
    /// Instantiation time, when this request had to wait for a new instance.
    pub instantiation: Option<Duration>,
    /// Time from the worker taking it until the response head (or failure).
    pub guest_time: Duration,
    /// How it ended.
    pub outcome: Outcome,
}

/// Receives reports from a [`ProxyHandler`](crate::ProxyHandler).
///
/// Called on the request path: implementations must be quick and must not
/// block (update counters and histograms, send to a channel).
pub trait Recorder: Send + Sync + 'static {
    /// A request got its response head, or failed.
    fn request(&self, report: &RequestReport) {
        let _ = report;
    }
    /// An instance ended.
    fn instance(&self, report: &InstanceReport) {
        let _ = report;
    }
}

/// A recorder that drops everything.
pub(crate) struct NoRecorder;

impl Recorder for NoRecorder {}

/// Live gauges and running totals of a handler.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Instances alive, including those being instantiated.
    pub live_instances: usize,
    /// Instances running guest code or instantiating, as the scheduler
    /// counts them (see [`PoolLimits::max_running`](crate::PoolLimits)).
    pub running_instances: usize,
    /// Instances advertising spare capacity right now.
    pub available_instances: usize,
    /// Requests waiting in the queue.
    pub queued_requests: usize,
    /// Instances whose guest yielded its running place at the end of a
    /// time slice and waits to run again (see
    /// [`PoolLimits::time_slice`](crate::PoolLimits::time_slice)).
    pub suspended_instances: usize,
    /// Successful instantiations so far.
    pub instantiations: u64,
    /// Failed instantiation attempts so far (each retry counts).
    pub instantiation_failures: u64,
    /// Requests handed to a guest so far.
    pub requests_started: u64,
    /// Requests rejected with [`Overloaded`](crate::Overloaded) so far.
    pub overloaded: u64,
    /// Time slices at whose end a guest yielded its running place so far.
    pub yields: u64,
    /// The adaptive in-flight limit in force, when
    /// [`PoolLimits::adaptive_concurrency`](crate::PoolLimits::adaptive_concurrency)
    /// is on.
    pub concurrency_limit: Option<usize>,
    /// Instances ended so far, by reason, in the order of [`ExitReason::ALL`].
    pub exits: [u64; ExitReason::ALL.len()],
}

impl Stats {
    /// Instances ended so far for `reason`.
    pub fn exits(&self, reason: ExitReason) -> u64 {
        self.exits[reason.index()]
    }
}

/// The stats of two handlers serving side by side (an old version
/// draining beside its successor, say): every gauge and total is the sum,
/// and so is the concurrency limit, each handler having its own.
impl std::ops::Add for Stats {
    type Output = Stats;

    fn add(self, other: Stats) -> Stats {
        Stats {
            live_instances: self.live_instances + other.live_instances,
            running_instances: self.running_instances + other.running_instances,
            available_instances: self.available_instances + other.available_instances,
            queued_requests: self.queued_requests + other.queued_requests,
            suspended_instances: self.suspended_instances + other.suspended_instances,
            instantiations: self.instantiations + other.instantiations,
            instantiation_failures: self.instantiation_failures + other.instantiation_failures,
            requests_started: self.requests_started + other.requests_started,
            overloaded: self.overloaded + other.overloaded,
            yields: self.yields + other.yields,
            concurrency_limit: match (self.concurrency_limit, other.concurrency_limit) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            },
            exits: std::array::from_fn(|i| self.exits[i] + other.exits[i]),
        }
    }
}
