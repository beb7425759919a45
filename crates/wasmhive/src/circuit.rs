//! [`Circuit`]: an Akka-style restart budget for instantiation.
//!
//! Too many failed instantiations within a window open the circuit: for a
//! cool-down, requests needing a new instance fail fast and prewarming
//! pauses, instead of every request paying for retries that will fail too.
//! After the cool-down the next attempt is a probe: one more failure opens
//! the circuit again at once, a success closes it.
//!
//! Every method takes the current time, so the logic is tested without
//! waiting.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub(crate) struct Circuit {
    threshold: usize,
    window: Duration,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    failures: VecDeque<Instant>,
    open_until: Option<Instant>,
    /// After the cool-down, one attempt is let through; until it resolves
    /// (or another cool-down passes, should it never resolve) others wait.
    probing_until: Option<Instant>,
    last_error: Option<Arc<wasmtime::Error>>,
}

/// What a recorded failure meant.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Failure {
    /// The first failure since the last success or opening: worth a log line.
    First,
    /// One more in a streak already reported.
    Repeated,
    /// This failure opened the circuit (or re-opened it after a probe).
    Opened,
}

impl Circuit {
    /// `threshold` failures within `window` open the circuit for `cooldown`.
    pub(crate) fn new(threshold: u32, window: Duration, cooldown: Duration) -> Self {
        Circuit {
            threshold: threshold.max(1) as usize,
            window,
            cooldown,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err` with the last failure while the circuit is open at `now`. The
    /// first call after the cool-down is the probe and gets `Ok`; the calls
    /// after it get `Err` until the probe succeeds or fails.
    pub(crate) fn admit(&self, now: Instant) -> Result<(), Arc<wasmtime::Error>> {
        let mut state = self.lock();
        let (Some(until), Some(error)) = (state.open_until, state.last_error.clone()) else {
            return Ok(());
        };
        if now < until || state.probing_until.is_some_and(|probing| now < probing) {
            return Err(error);
        }
        state.probing_until = Some(now + self.cooldown);
        Ok(())
    }

    /// When [`Self::admit`] may let an attempt through again, if it would
    /// not at `now` (open, or a probe under way).
    pub(crate) fn open_until(&self, now: Instant) -> Option<Instant> {
        let state = self.lock();
        state
            .open_until
            .filter(|until| now < *until)
            .or(state.probing_until.filter(|until| now < *until))
    }

    /// Whether a probe is under way at `now` (let through after the
    /// cool-down, not yet resolved).
    pub(crate) fn is_probing(&self, now: Instant) -> bool {
        let state = self.lock();
        state.open_until.is_some_and(|until| until <= now)
            && state.probing_until.is_some_and(|until| now < until)
    }

    /// An instantiation succeeded: the streak is over.
    pub(crate) fn succeeded(&self) {
        let mut state = self.lock();
        if !state.failures.is_empty() || state.open_until.is_some() {
            *state = State::default();
        }
    }

    /// Records a failure at `now`.
    pub(crate) fn failed(&self, error: &Arc<wasmtime::Error>, now: Instant) -> Failure {
        let mut state = self.lock();
        let first = state.failures.is_empty() && state.open_until.is_none();
        state.last_error = Some(error.clone());
        state.failures.push_back(now);
        while state
            .failures
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) > self.window)
        {
            state.failures.pop_front();
        }
        // A failed probe after the cool-down re-opens at once.
        let probe_failed = state.open_until.is_some_and(|until| until <= now);
        if state.failures.len() >= self.threshold || probe_failed {
            state.open_until = Some(now + self.cooldown);
            state.probing_until = None;
            state.failures.clear();
            return Failure::Opened;
        }
        if first {
            Failure::First
        } else {
            Failure::Repeated
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error() -> Arc<wasmtime::Error> {
        Arc::new(wasmtime::Error::msg("boom"))
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn opens_after_threshold_failures_within_the_window() {
        let circuit = Circuit::new(3, 10 * SECOND, 5 * SECOND);
        let t0 = Instant::now();
        assert_eq!(circuit.failed(&error(), t0), Failure::First);
        assert_eq!(circuit.failed(&error(), t0 + SECOND), Failure::Repeated);
        assert!(circuit.admit(t0 + SECOND).is_ok());
        assert_eq!(circuit.failed(&error(), t0 + 2 * SECOND), Failure::Opened);
        assert!(circuit.admit(t0 + 2 * SECOND).is_err());
        assert_eq!(circuit.open_until(t0 + 3 * SECOND), Some(t0 + 7 * SECOND));
        // Once the cool-down has passed, one probe may go, and only one.
        assert!(!circuit.is_probing(t0 + 7 * SECOND));
        assert!(circuit.admit(t0 + 7 * SECOND).is_ok());
        assert!(circuit.is_probing(t0 + 7 * SECOND));
        assert!(circuit.admit(t0 + 7 * SECOND).is_err());
        assert_eq!(circuit.open_until(t0 + 7 * SECOND), Some(t0 + 12 * SECOND));
        // A probe that never reports back does not hold the circuit for ever.
        assert!(circuit.admit(t0 + 12 * SECOND).is_ok());
    }

    #[test]
    fn failures_outside_the_window_do_not_count() {
        let circuit = Circuit::new(3, 10 * SECOND, 5 * SECOND);
        let t0 = Instant::now();
        circuit.failed(&error(), t0);
        circuit.failed(&error(), t0 + SECOND);
        assert_eq!(
            circuit.failed(&error(), t0 + 12 * SECOND),
            Failure::Repeated
        );
        assert!(circuit.admit(t0 + 12 * SECOND).is_ok());
    }

    #[test]
    fn a_failed_probe_reopens_at_once_and_a_success_closes() {
        let circuit = Circuit::new(2, 10 * SECOND, 5 * SECOND);
        let t0 = Instant::now();
        circuit.failed(&error(), t0);
        assert_eq!(circuit.failed(&error(), t0), Failure::Opened);
        let after = t0 + 6 * SECOND;
        assert!(circuit.admit(after).is_ok());
        assert_eq!(circuit.failed(&error(), after), Failure::Opened);
        assert!(circuit.admit(after + SECOND).is_err());
        circuit.succeeded();
        assert!(circuit.admit(after + SECOND).is_ok());
        assert_eq!(circuit.failed(&error(), after + SECOND), Failure::First);
    }
}
