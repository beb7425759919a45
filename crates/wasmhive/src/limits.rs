//! [`Limits`]: the ready-made per-instance policy, and its instance-level
//! deadline [`LimitsExpiration`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::World;
use crate::policy::{RequestDeadline, ShouldAccept, WorkerExpiration, WorkerStatus};

/// Per-instance limits: how instances are reused, how long requests and
/// instances may take, and how much memory an instance may use.
///
/// Start from [`Limits::for_world`] and change what you need:
/// `Limits { max_reuse: 5, ..Limits::for_world(World::P2) }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Requests an instance takes in all before it is dropped. `1` gives
    /// every request a fresh instance, so no request can see state another
    /// left behind; above `1`, globals and linear memory persist between the
    /// requests of an instance. Default: 1 for p2, 128 for p3.
    pub max_reuse: usize,
    /// Requests an instance handles at once. A p3 request counts until its
    /// response body has been read (or dropped), since the instance writes
    /// it. A p2 handler is synchronous, so more than 1 has no effect there.
    /// Default: 1 for p2, 16 for p3.
    pub max_concurrency: usize,
    /// How long an instance with nothing to do is kept for reuse. Default: 1 s.
    pub idle_timeout: Duration,
    /// How long a request may take to get its response head (p2: for the
    /// guest to set its response outparam). The body that follows has no
    /// deadline while its client reads it. Past it the request fails with
    /// [`ExpirationError`](crate::ExpirationError) and the instance takes no
    /// more requests; the instance is killed once its most recent request is
    /// this old. Default: 30 s.
    pub request_timeout: Duration,
    /// How long an instance may keep working with no request outstanding
    /// and no response body being read before it is killed: a task left
    /// running by a request that expired, say. Default: 10 s.
    pub post_return_timeout: Duration,
    /// Linear memory an instance may use in all, in bytes; growing beyond it
    /// fails inside the guest (usually a trap). Default: 128 MiB.
    pub max_memory: usize,
}

impl Limits {
    /// The defaults for components of `world` (those of `wasmtime serve`
    /// where they mean the same thing).
    pub fn for_world(world: World) -> Limits {
        let (max_reuse, max_concurrency) = match world {
            World::P2 => (1, 1),
            World::P3 => (128, 16),
        };
        Limits {
            max_reuse,
            max_concurrency,
            idle_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            post_return_timeout: Duration::from_secs(10),
            max_memory: 128 << 20,
        }
    }

    /// [`WorkerState::should_accept_request`](crate::WorkerState) by these
    /// limits.
    pub fn should_accept(&self, concurrent: usize, total: usize) -> ShouldAccept {
        if total >= self.max_reuse {
            ShouldAccept::Never
        } else if concurrent >= self.max_concurrency {
            ShouldAccept::No
        } else {
            ShouldAccept::Yes
        }
    }

    /// A request's deadline by these limits.
    pub fn request_deadline(&self) -> RequestDeadline {
        Box::pin(tokio::time::sleep(self.request_timeout))
    }

    /// The instance-level deadline by these limits.
    pub fn expiration(&self) -> LimitsExpiration {
        LimitsExpiration {
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            post_return_timeout: self.post_return_timeout,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed_for: None,
        }
    }
}

/// Expires an instance idle for [`Limits::idle_timeout`], with requests
/// outstanding for [`Limits::request_timeout`] (counted from the most recent
/// one), or working after its responses (and their bodies) are done for
/// [`Limits::post_return_timeout`]. An instance streaming response bodies
/// to clients that read them does not expire.
pub struct LimitsExpiration {
    idle_timeout: Duration,
    request_timeout: Duration,
    post_return_timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed_for: Option<Instant>,
}

impl WorkerExpiration for LimitsExpiration {
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        status: WorkerStatus,
        since: Instant,
    ) -> Poll<()> {
        let timeout = match status {
            WorkerStatus::Idle => self.idle_timeout,
            WorkerStatus::Requests => self.request_timeout,
            // A stream lasts as long as its client reads it.
            WorkerStatus::Streaming => return Poll::Pending,
            WorkerStatus::PostReturn => self.post_return_timeout,
        };
        let Some(deadline) = since.checked_add(timeout) else {
            return Poll::Pending;
        };
        if self.armed_for != Some(deadline) {
            self.armed_for = Some(deadline);
            self.sleep.as_mut().reset(deadline.into());
        }
        self.sleep.as_mut().poll(cx)
    }
}
