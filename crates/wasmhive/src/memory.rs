//! Memory limits of instances: [`MemoryBudget`], one budget that all
//! instances' linear memories and tables together cannot exceed, and the
//! per-store limiter that enforces it along with the per-instance cap.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use wasmtime::ResourceLimiter;

use crate::AtCapacity;

/// Bytes of linear memory and tables that all instances sharing it may use
/// together; cloning shares the same budget.
///
/// Growing past it fails inside the guest (usually a trap, so its request
/// gets a `500`), and an instance whose initial memory does not fit is not
/// created: its request waits for another instance to end and free some
/// (see [`AtCapacity`]), or, with no instance of its handler alive to free
/// any, fails at once with [`Overloaded`](crate::Overloaded). Memory is returned when a store is dropped. It
/// bounds what guests can take; the host's own memory (compiled code,
/// connections, buffers) comes on top.
#[derive(Clone, Debug)]
pub struct MemoryBudget(Arc<Budget>);

#[derive(Debug)]
struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        MemoryBudget(Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
        }))
    }

    /// The budget, in bytes.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Bytes in use now.
    pub fn used(&self) -> usize {
        self.0.used.load(Relaxed)
    }

    fn take(&self, bytes: usize) -> bool {
        self.0
            .used
            .fetch_update(Relaxed, Relaxed, |used| {
                used.checked_add(bytes)
                    .filter(|total| *total <= self.0.limit)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.0.used.fetch_sub(bytes, Relaxed);
    }
}

/// Bytes of table memory per element (a function reference).
const TABLE_ELEMENT: usize = std::mem::size_of::<usize>();

/// Caps one instance's linear memory (across its memories), charges it and
/// its tables to the shared [`MemoryBudget`], and remembers the peak.
pub(crate) struct MemoryLimiter {
    limit: usize,
    budget: Option<MemoryBudget>,
    /// Linear memory in use, bytes.
    used: usize,
    /// Everything charged to the budget, bytes.
    charged: usize,
    /// The last growth granted, returned if the growth then failed.
    last_grant: usize,
    /// `used` and `peak` before the last memory growth granted, restored if
    /// it then failed.
    before_grant: Option<(usize, usize)>,
    pub(crate) peak: usize,
    /// The per-instance cap refused a growth.
    pub(crate) denied: bool,
    /// The shared budget refused a growth.
    pub(crate) over_budget: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: usize, budget: Option<MemoryBudget>) -> Self {
        MemoryLimiter {
            limit,
            budget,
            used: 0,
            charged: 0,
            last_grant: 0,
            before_grant: None,
            peak: 0,
            denied: false,
            over_budget: false,
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Why an instantiation failed, if it was for lack of budget.
    pub(crate) fn capacity_error(&self) -> Option<AtCapacity> {
        self.over_budget
            .then(|| AtCapacity::new("the memory budget (--max-total-memory) is spent"))
    }

    fn charge(&mut self, bytes: usize) -> bool {
        self.last_grant = 0;
        self.before_grant = None;
        if let Some(budget) = &self.budget {
            if !budget.take(bytes) {
                self.over_budget = true;
                return false;
            }
            self.charged += bytes;
            self.last_grant = bytes;
        }
        true
    }

    /// The last growth granted failed after all: undo its accounting.
    fn refund_last(&mut self) {
        if let Some(budget) = &self.budget {
            budget.give_back(self.last_grant);
            self.charged -= self.last_grant;
        }
        self.last_grant = 0;
        if let Some((used, peak)) = self.before_grant.take() {
            (self.used, self.peak) = (used, peak);
        }
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.give_back(self.charged);
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|maximum| desired > maximum) {
            // Past the memory's own maximum: wasmtime refuses it anyway.
            return Ok(false);
        }
        let growth = desired.saturating_sub(current);
        let used = (self.used - current.min(self.used)).checked_add(desired);
        let Some(used) = used.filter(|used| *used <= self.limit) else {
            self.denied = true;
            return Ok(false);
        };
        if !self.charge(growth) {
            return Ok(false);
        }
        self.before_grant = Some((self.used, self.peak));
        self.used = used;
        self.peak = self.peak.max(used);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.refund_last();
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > 1 << 20 {
            return Ok(false);
        }
        Ok(self.charge(desired.saturating_sub(current) * TABLE_ELEMENT))
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.refund_last();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_share_the_budget_and_give_it_back_when_dropped() {
        let budget = MemoryBudget::new(100);
        let mut a = MemoryLimiter::new(80, Some(budget.clone()));
        let mut b = MemoryLimiter::new(80, Some(budget.clone()));
        assert!(a.memory_growing(0, 60, None).unwrap());
        assert!(!b.memory_growing(0, 60, None).unwrap(), "over the budget");
        assert!(b.over_budget && !b.denied);
        assert!(b.capacity_error().is_some());
        assert!(
            !a.memory_growing(60, 90, None).unwrap(),
            "over the instance cap"
        );
        assert!(a.denied);
        assert!(b.memory_growing(0, 40, None).unwrap());
        assert_eq!(budget.used(), 100);
        // A growth granted and then failed is refunded.
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(b.memory_growing(40, 50, None).unwrap());
        b.memory_grow_failed(wasmtime::Error::msg("no")).unwrap();
        assert_eq!(budget.used(), 40);
        assert_eq!((b.used, b.peak), (40, 40), "the failed growth is undone");
        assert!(
            !b.memory_growing(40, usize::MAX, None).unwrap(),
            "no overflow"
        );
        assert!(
            !b.memory_growing(40, 60, Some(50)).unwrap(),
            "past its maximum"
        );
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
