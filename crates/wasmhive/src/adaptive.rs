//! An adaptive limit on the requests in flight across the pool, in the
//! manner of Envoy's adaptive concurrency filter and Netflix's
//! `concurrency-limits` gradient limiter.
//!
//! Why: the pool's own limits (instances × concurrency per instance, then the
//! queue) are sized for I/O-bound guests, which need many requests in flight.
//! A CPU-bound guest at several times its capacity turns every one of those
//! slots into a request sharing the same cores, and every admitted request
//! gets slow. The limiter finds the in-flight count the server sustains at
//! near its best latency and answers the surplus with
//! [`Overloaded`](crate::Overloaded) at once.
//!
//! How: the least latency (admission to response head) is measured in a
//! *probe*: the limit drops to [`AdaptiveConcurrency::min_limit`] until
//! enough requests admitted under it have completed, and their median is
//! the baseline `min`. A probe runs at start and every
//! [`AdaptiveConcurrency::probe_interval`], so that a lasting change of the
//! workload is adopted; requests beyond the probe's limit are shed, as under
//! any limit. Between probes, every window compares the 90th percentile of
//! the latencies completed in it with `tolerance × min`: within it, a limit
//! that was used grows by its square root; beyond it, the limit shrinks by
//! the ratio (at most halving per window).
//!
//! Its weakness, shared with every latency-gradient limiter: an app whose
//! routes differ widely in latency (1 ms and 500 ms) looks congested when
//! the slow route is busy. That is why it is opt-in, with a floor
//! ([`AdaptiveConcurrency::min_limit`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Settings of the adaptive in-flight limit; see
/// [`PoolLimits::adaptive_concurrency`](crate::PoolLimits::adaptive_concurrency).
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveConcurrency {
    /// The limit after the first probe, before any window moved it.
    /// Default: 64.
    pub initial_limit: usize,
    /// The limit during a probe, and the least it ever is. Default: 2.
    pub min_limit: usize,
    /// The limit never goes above this. Default: 4096.
    pub max_limit: usize,
    /// How much slower than the baseline the 90th percentile may be before
    /// the limit shrinks. Default: 1.5.
    pub tolerance: f64,
    /// How often the limit is recomputed. Default: 100 ms.
    pub window: Duration,
    /// How often the baseline latency is measured again. Default: 30 s.
    pub probe_interval: Duration,
}

impl Default for AdaptiveConcurrency {
    fn default() -> Self {
        AdaptiveConcurrency {
            initial_limit: 64,
            min_limit: 2,
            max_limit: 4096,
            tolerance: 1.5,
            window: Duration::from_millis(100),
            probe_interval: Duration::from_secs(30),
        }
    }
}

/// Fewest latencies a window or a probe needs before it moves anything.
const MIN_SAMPLES: usize = 8;
/// Most latencies a window keeps; enough for a stable 90th percentile.
const MAX_SAMPLES: usize = 4096;

pub(crate) struct Limiter {
    config: AdaptiveConcurrency,
    state: Mutex<State>,
}

/// A place in flight, to give back with [`Limiter::release`].
#[derive(Debug)]
pub(crate) struct Permit {
    /// The phase it was taken in: a probe counts only its own requests.
    phase: u64,
}

struct State {
    /// The limit between probes.
    limit: f64,
    in_flight: usize,
    /// Most requests in flight during the current window.
    peak: usize,
    window_start: Instant,
    samples: Vec<Duration>,
    /// The baseline, from the last probe.
    baseline: Option<Duration>,
    probing: bool,
    /// Increments when a probe starts or ends.
    phase: u64,
    next_probe: Instant,
}

impl State {
    fn effective_limit(&self, config: &AdaptiveConcurrency) -> usize {
        if self.probing {
            config.min_limit
        } else {
            self.limit as usize
        }
    }

    fn next_phase(&mut self, now: Instant) {
        self.phase += 1;
        self.samples.clear();
        self.peak = self.in_flight;
        self.window_start = now;
    }
}

impl Limiter {
    pub(crate) fn new(mut config: AdaptiveConcurrency, now: Instant) -> Self {
        config.min_limit = config.min_limit.max(1);
        config.max_limit = config.max_limit.max(config.min_limit);
        let limit = config
            .initial_limit
            .clamp(config.min_limit, config.max_limit) as f64;
        Limiter {
            config,
            state: Mutex::new(State {
                limit,
                in_flight: 0,
                peak: 0,
                window_start: now,
                samples: Vec::new(),
                baseline: None,
                probing: true,
                phase: 0,
                next_probe: now,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place in flight, or `None` when the limit is reached.
    pub(crate) fn try_acquire(&self) -> Option<Permit> {
        let mut state = self.lock();
        if state.in_flight >= state.effective_limit(&self.config) {
            return None;
        }
        state.in_flight += 1;
        state.peak = state.peak.max(state.in_flight);
        Some(Permit { phase: state.phase })
    }

    /// Gives a place back; `latency` is the request's time from admission
    /// to response head, when it got that far.
    pub(crate) fn release(&self, permit: Permit, latency: Option<Duration>, now: Instant) {
        let mut state = self.lock();
        state.in_flight -= 1;
        if let Some(latency) = latency
            && permit.phase == state.phase
            && state.samples.len() < MAX_SAMPLES
        {
            state.samples.push(latency);
        }
        if state.samples.len() < MIN_SAMPLES {
            return;
        }
        if state.probing {
            state.samples.sort_unstable();
            state.baseline = Some(state.samples[state.samples.len() / 2]);
            state.probing = false;
            state.next_probe = now + self.config.probe_interval;
            state.next_phase(now);
        } else if now.duration_since(state.window_start) >= self.config.window {
            self.end_window(&mut state, now);
        }
    }

    fn end_window(&self, state: &mut State, now: Instant) {
        if now >= state.next_probe {
            state.probing = true;
            state.next_phase(now);
            return;
        }
        let baseline = state.baseline.expect("a probe ran first");
        state.samples.sort_unstable();
        let p90 = state.samples[(state.samples.len() - 1) * 9 / 10].as_secs_f64();
        let allowed = baseline.as_secs_f64() * self.config.tolerance;
        let limit = state.limit;
        state.limit = if p90 <= allowed {
            // Healthy: grow, but only a limit that was actually reached.
            if state.peak as f64 >= limit / 2.0 {
                limit + limit.sqrt()
            } else {
                limit
            }
        } else {
            limit * (allowed / p90).max(0.5)
        }
        .clamp(self.config.min_limit as f64, self.config.max_limit as f64);
        state.samples.clear();
        state.peak = state.in_flight;
        state.window_start = now;
    }

    /// The limit in force now.
    pub(crate) fn limit(&self) -> usize {
        self.lock().effective_limit(&self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(initial: usize) -> (Limiter, Instant) {
        let now = Instant::now();
        let config = AdaptiveConcurrency {
            initial_limit: initial,
            ..AdaptiveConcurrency::default()
        };
        (Limiter::new(config, now), now)
    }

    /// Offers `wanted` requests at once and completes those admitted after a
    /// window, each taking `latency(admitted)`; returns the clock after it.
    fn window(
        limiter: &Limiter,
        now: Instant,
        wanted: usize,
        latency: impl Fn(usize) -> Duration,
    ) -> Instant {
        let permits: Vec<_> = (0..wanted).map_while(|_| limiter.try_acquire()).collect();
        let n = permits.len();
        let end = now + Duration::from_millis(100);
        for permit in permits {
            limiter.release(permit, Some(latency(n)), end);
        }
        end
    }

    /// Two cores and 1 ms of work per request: latency grows with the
    /// requests in flight beyond two.
    fn cpu(n: usize) -> Duration {
        Duration::from_micros(500 * n.max(2) as u64)
    }

    #[test]
    fn cpu_bound_overload_shrinks_the_limit_to_what_the_cores_sustain() {
        let (limiter, mut now) = limiter(64);
        for _ in 0..100 {
            now = window(&limiter, now, 10_000, cpu);
        }
        let limit = limiter.limit();
        assert!((2..=4).contains(&limit), "limit {limit}");
        assert!(
            cpu(limit) <= Duration::from_micros(1500),
            "{:?}",
            cpu(limit)
        );
    }

    #[test]
    fn io_bound_load_grows_the_limit_to_the_demand() {
        // Sleeping guests: latency does not depend on how many are in flight.
        let (limiter, mut now) = limiter(64);
        for _ in 0..100 {
            now = window(&limiter, now, 256, |_| Duration::from_millis(100));
        }
        assert!(limiter.limit() >= 256, "limit {}", limiter.limit());
    }

    #[test]
    fn an_unused_limit_does_not_grow() {
        let (limiter, mut now) = limiter(64);
        for _ in 0..100 {
            now = window(&limiter, now, 10, |_| Duration::from_millis(1));
        }
        assert_eq!(limiter.limit(), 64);
    }

    #[test]
    fn the_limit_recovers_when_the_overload_ends() {
        let (limiter, mut now) = limiter(64);
        for _ in 0..50 {
            now = window(&limiter, now, 10_000, cpu);
        }
        let low = limiter.limit();
        // Now the guest waits instead: latency no longer grows with load.
        for _ in 0..100 {
            now = window(&limiter, now, 10_000, |_| Duration::from_millis(1));
        }
        assert!(limiter.limit() > 64 * low, "{low} -> {}", limiter.limit());
    }

    #[test]
    fn a_probe_relearns_the_baseline_and_restores_the_limit() {
        let (limiter, mut now) = limiter(64);
        for _ in 0..10 {
            now = window(&limiter, now, 10, |_| Duration::from_millis(1));
        }
        assert_eq!(limiter.limit(), 64);
        // The workload changes for good: every request now takes 50 ms.
        let slow = |_| Duration::from_millis(50);
        for _ in 0..10 {
            now = window(&limiter, now, 40, slow);
        }
        let shrunk = limiter.limit();
        assert!(shrunk <= 4, "limit {shrunk}");
        // After the probe interval, a probe measures the new baseline and
        // the limit grows again.
        now += Duration::from_secs(30);
        for _ in 0..40 {
            now = window(&limiter, now, 40, slow);
        }
        assert!(limiter.limit() >= 32, "limit {}", limiter.limit());
    }

    #[test]
    fn places_are_given_back_and_bounded() {
        let (limiter, now) = limiter(64);
        // The first probe admits `min_limit` requests.
        let permits: Vec<_> = (0..2).map(|_| limiter.try_acquire().unwrap()).collect();
        assert!(limiter.try_acquire().is_none());
        for permit in permits {
            limiter.release(permit, None, now);
        }
        assert!(limiter.try_acquire().is_some());
    }
}
