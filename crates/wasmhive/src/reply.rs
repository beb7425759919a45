//! How a request's answer gets back to the caller of `handle`: the
//! [`Reply`] on a oneshot channel, sent through a [`Responder`] shared by
//! the call and (p2) the `response-outparam` callback, the worker's
//! [`Fate`] for requests it could not answer, and its [`Progress`]: how far
//! its answers have gone out.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::task::Context;
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use tokio::sync::oneshot;

use crate::{Error, Response, TrapOrPanicError, WorkerStatus};

/// The response head, or why there is none.
pub(crate) type Answer = Result<Response, Error>;

/// Where and when a request was taken by a worker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Acceptance {
    pub(crate) incarnation: u64,
    pub(crate) accepted_at: Instant,
    /// Set when this request waited for its instance to be created.
    pub(crate) instantiation: Option<Duration>,
}

/// What the caller of `handle` receives.
pub(crate) struct Reply {
    pub(crate) answer: Answer,
    pub(crate) accepted: Option<Acceptance>,
}

/// What becomes of requests still outstanding when a worker tears down.
#[derive(Default)]
pub(crate) struct Fate(Mutex<Option<Error>>);

impl Fate {
    /// Records why the worker is going away, before it drops its calls.
    pub(crate) fn set(&self, error: Error) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// Whether the instance ended abnormally (trapped or killed).
    pub(crate) fn is_set(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn error(&self) -> Error {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(Error::Expired(e)) => Error::Expired(e.clone()),
            Some(Error::TrapOrPanic(e)) => Error::TrapOrPanic(e.clone()),
            _ => TrapOrPanicError::new("the instance stopped before the guest responded").into(),
        }
    }
}

/// How far a worker's answers have gone out, kept by the responders and the
/// response bodies themselves rather than by the worker's event loop: a p2
/// guest blocked in a host call keeps that loop from running while its
/// response head and body go out, and the instance-level deadline must
/// still tell a stream from a request waiting for its head.
pub(crate) struct Progress {
    /// Requests taken whose answer (head or error) is not sent yet.
    awaiting_head: AtomicUsize,
    /// Response bodies sent and not yet read to their end or dropped.
    bodies: AtomicUsize,
    /// When the last answer went out or the last body ended.
    last_change: Mutex<Instant>,
    /// Woken at every change: the worker polls its deadline again.
    watcher: AtomicWaker,
    /// The responders of requests taken (those answered or gone are pruned
    /// as others come), to tell from outside the event loop whether any
    /// caller still waits.
    responders: Mutex<Vec<Weak<Mutex<ResponderInner>>>>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            awaiting_head: AtomicUsize::new(0),
            bodies: AtomicUsize::new(0),
            last_change: Mutex::new(Instant::now()),
            watcher: AtomicWaker::new(),
            responders: Mutex::default(),
        }
    }
}

impl Progress {
    /// What the instance does once every request it took has its answer:
    /// `Streaming` while clients hold bodies, else `PostReturn` since the
    /// last one ended. `None` while a request still awaits its head. `cx` is
    /// woken at the next change.
    pub(crate) fn after_heads(&self, cx: &Context<'_>) -> Option<(WorkerStatus, Instant)> {
        self.watcher.register(cx.waker());
        if self.awaiting_head.load(Relaxed) > 0 {
            return None;
        }
        let since = *self.last_change.lock().unwrap_or_else(|e| e.into_inner());
        Some(if self.bodies.load(Relaxed) > 0 {
            (WorkerStatus::Streaming, since)
        } else {
            (WorkerStatus::PostReturn, since)
        })
    }

    /// Whether the instance holds requests and every one of them was
    /// abandoned: no body is being read and every caller awaiting a head
    /// has gone away. The worker's event loop tells the same from its calls,
    /// but does not run while a guest computes.
    pub(crate) fn only_abandoned(&self) -> bool {
        let awaiting = self.awaiting_head.load(Relaxed);
        if awaiting == 0 || self.bodies.load(Relaxed) > 0 {
            return false;
        }
        let responders = self.responders.lock().unwrap_or_else(|e| e.into_inner());
        let gone = responders
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|inner| {
                let inner = inner.lock().unwrap_or_else(|e| e.into_inner());
                inner.tx.as_ref().is_some_and(oneshot::Sender::is_closed)
            })
            .count();
        gone == awaiting
    }

    fn changed(&self) {
        *self.last_change.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.watcher.wake();
    }
}

/// A response body a client holds, counted in its worker's [`Progress`]
/// until dropped.
pub(crate) struct BodyHeld(Arc<Progress>);

impl Drop for BodyHeld {
    fn drop(&mut self) {
        self.0.bodies.fetch_sub(1, Relaxed);
        self.0.changed();
    }
}

/// The sending half of a request's answer, shared by the call and (for
/// p2) the `response-outparam` callback, so that a p2 response head reaches
/// the caller the moment the guest sets it, even while the guest goes on
/// writing the body in a host call that keeps the event loop from running.
///
/// If every clone is dropped unsent (the worker tore down, or panicked), the
/// caller gets the worker's [`Fate`] instead.
#[derive(Clone)]
pub(crate) struct Responder(Arc<Mutex<ResponderInner>>);

struct ResponderInner {
    tx: Option<oneshot::Sender<Reply>>,
    fate: Arc<Fate>,
    progress: Arc<Progress>,
    accepted: Acceptance,
}

impl Responder {
    /// The responder of a request its worker took, counted in `progress`
    /// as awaiting its head until something is sent.
    pub(crate) fn new(
        tx: oneshot::Sender<Reply>,
        fate: Arc<Fate>,
        progress: Arc<Progress>,
        accepted: Acceptance,
    ) -> Self {
        progress.awaiting_head.fetch_add(1, Relaxed);
        let inner = Arc::new(Mutex::new(ResponderInner {
            tx: Some(tx),
            fate,
            progress: progress.clone(),
            accepted,
        }));
        let mut listed = progress
            .responders
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        listed.retain(|listed| {
            listed
                .upgrade()
                .is_some_and(|inner| inner.lock().unwrap_or_else(|e| e.into_inner()).tx.is_some())
        });
        listed.push(Arc::downgrade(&inner));
        drop(listed);
        Responder(inner)
    }

    /// Counts a response body of this worker's as held by its client.
    pub(crate) fn hold_body(&self) -> BodyHeld {
        let progress = self.lock().progress.clone();
        progress.bodies.fetch_add(1, Relaxed);
        BodyHeld(progress)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ResponderInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers `answer`, unless something was delivered already.
    pub(crate) fn send(&self, answer: Answer) {
        self.lock().send(answer);
    }

    pub(crate) fn fate(&self) -> Arc<Fate> {
        self.lock().fate.clone()
    }

    /// Resolves when the caller has gone away before anything was sent.
    pub(crate) async fn closed(&self) {
        std::future::poll_fn(|cx| match &mut self.lock().tx {
            Some(tx) => tx.poll_closed(cx),
            None => std::task::Poll::Pending,
        })
        .await
    }
}

impl ResponderInner {
    fn send(&mut self, answer: Answer) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Reply {
                answer,
                accepted: Some(self.accepted),
            });
            self.progress.awaiting_head.fetch_sub(1, Relaxed);
            self.progress.changed();
        }
    }
}

impl Drop for ResponderInner {
    fn drop(&mut self) {
        let error = self.fate.error();
        self.send(Err(error));
    }
}
