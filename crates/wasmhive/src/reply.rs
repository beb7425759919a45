//! How a request's answer gets back to the caller of `handle`: the
//! [`Reply`] on a oneshot channel, sent through a [`Responder`] shared by
//! the call and (p2) the `response-outparam` callback, and the worker's
//! [`Fate`] for requests it could not answer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::{Error, Response, TrapOrPanicError};

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
    accepted: Acceptance,
}

impl Responder {
    pub(crate) fn new(tx: oneshot::Sender<Reply>, fate: Arc<Fate>, accepted: Acceptance) -> Self {
        Responder(Arc::new(Mutex::new(ResponderInner {
            tx: Some(tx),
            fate,
            accepted,
        })))
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
        }
    }
}

impl Drop for ResponderInner {
    fn drop(&mut self) {
        let error = self.fate.error();
        self.send(Err(error));
    }
}
