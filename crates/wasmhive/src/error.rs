//! The errors [`ProxyHandler::handle`](crate::ProxyHandler::handle) returns.
//!
//! [`Error`] is one enum of small, typed errors. Each variant wraps a public
//! struct, so callers can match on the kind (to choose an HTTP status) and
//! still reach the details (the request handed back by
//! [`InstantiationError`], the reason of a [`TrapOrPanicError`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Request;

/// Why a request did not produce a response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No instance could be created for the request; see [`InstantiationError`].
    #[error(transparent)]
    Instantiation(#[from] InstantiationError),
    /// The guest did not respond before its deadline; see [`ExpirationError`].
    #[error(transparent)]
    Expired(#[from] ExpirationError),
    /// The guest trapped or the worker panicked before responding; see
    /// [`TrapOrPanicError`].
    #[error(transparent)]
    TrapOrPanic(#[from] TrapOrPanicError),
    /// The pool and its queue are full; see [`Overloaded`].
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    /// The handler is shutting down; see [`ShuttingDown`].
    #[error(transparent)]
    ShuttingDown(#[from] ShuttingDown),
    /// The guest answered with a `wasi:http` `error-code` instead of a response.
    #[error("the guest returned an error: {0}")]
    Guest(String),
    /// The request is malformed in a way the guest cannot be given (no
    /// authority and no `Host` header, an invalid or repeated `Host`): the
    /// client's fault, found before any instance is involved.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The host failed to hand the request to the guest (a full resource
    /// table, a failed call set-up): the server's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The HTTP status to answer with: `503` when the handler is overloaded,
    /// shutting down, or its instantiation circuit is open; `504` when the
    /// guest did not respond in time; `400` for a malformed request (the
    /// only client fault); `500` for everything else that went wrong on the
    /// server's side: traps, guest errors, failed instantiations, host
    /// faults.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Error::Overloaded(_) | Error::ShuttingDown(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Instantiation(e) if e.is_circuit_open() => StatusCode::SERVICE_UNAVAILABLE,
            Error::Expired(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Error::Instantiation(_)
            | Error::TrapOrPanic(_)
            | Error::Guest(_)
            | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short, fixed text for the client, saying which of the statuses of
    /// [`Self::status`] this is and nothing of the guest's or host's
    /// internals (those belong in logs: use the error's `Display`).
    pub fn public_message(&self) -> &'static str {
        match self {
            Error::Overloaded(_) => "the server is busy; retry later",
            Error::ShuttingDown(_) => "the server is shutting down; retry later",
            Error::Instantiation(e) if e.is_circuit_open() => {
                "the application is unavailable; retry later"
            }
            Error::Instantiation(_) => "the application could not be started",
            Error::Expired(_) => "the application did not respond in time",
            Error::TrapOrPanic(_) | Error::Guest(_) => "the application failed",
            Error::InvalidRequest(_) => "invalid request",
            Error::Internal(_) => "internal server error",
        }
    }

    /// For a `503`, how long the client should wait before retrying (for a
    /// `Retry-After` header).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Overloaded(o) => Some(o.retry_after()),
            Error::ShuttingDown(_) => Some(Duration::from_secs(1)),
            Error::Instantiation(e) if e.is_circuit_open() => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Whether retrying the same request later may succeed: exactly the
    /// `503`s (overloaded, shutting down, instantiation circuit open), which
    /// come with a [`Self::retry_after`]. The request never reached a guest.
    pub fn is_retryable(&self) -> bool {
        self.retry_after().is_some()
    }
}

/// No instance could be created to handle the request, even after the
/// configured retries, or the instantiation circuit is open after repeated
/// failures.
///
/// The request never reached a guest, so it is handed back intact: the caller
/// may retry it elsewhere.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct InstantiationError {
    // Boxed: a request is large, and errors travel by value.
    request: Box<Mutex<Option<Request>>>,
    cause: Arc<wasmtime::Error>,
    circuit_open: bool,
}

impl InstantiationError {
    pub(crate) fn new(request: Request, cause: Arc<wasmtime::Error>, circuit_open: bool) -> Self {
        InstantiationError {
            request: Box::new(Mutex::new(Some(request))),
            cause,
            circuit_open,
        }
    }

    /// Takes back the request that could not be handled (once; later calls
    /// return `None`).
    pub fn take_request(&self) -> Option<Request> {
        self.request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The last instantiation failure.
    pub fn cause(&self) -> &wasmtime::Error {
        &self.cause
    }

    /// Whether the request failed fast because repeated instantiation
    /// failures opened the circuit (no instantiation was attempted for it).
    pub fn is_circuit_open(&self) -> bool {
        self.circuit_open
    }

    fn describe(&self) -> String {
        if self.circuit_open {
            format!(
                "instantiation circuit open after repeated failures; last: {:#}",
                self.cause
            )
        } else {
            format!("instantiation failed: {:#}", self.cause)
        }
    }
}

/// The guest did not produce a response before the request's deadline, or
/// its instance expired while the request was outstanding.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the guest did not respond in time")]
pub struct ExpirationError;

/// The instance trapped (or the worker panicked) before the request got a
/// response. A trap after the response head was sent shows up instead as an
/// aborted response body.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the guest failed: {reason}")]
pub struct TrapOrPanicError {
    reason: String,
}

impl TrapOrPanicError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        TrapOrPanicError {
            reason: reason.into(),
        }
    }

    /// A one-line description of the trap or panic, for logs (not for
    /// clients: it describes guest internals).
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Every instance is busy, no more may be created, and the wait queue is
/// full (or the request waited in it longer than allowed).
#[derive(Debug, Clone, thiserror::Error)]
#[error("overloaded: no instance available and the queue is full or too slow")]
pub struct Overloaded {
    retry_after: Duration,
}

impl Overloaded {
    pub(crate) fn new(retry_after: Duration) -> Self {
        Overloaded { retry_after }
    }

    /// A suggested delay before retrying (the queue's maximum wait, at least
    /// one second), suitable for a `Retry-After` header.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

/// The handler is shutting down and admits no new requests.
#[derive(Debug, Clone, thiserror::Error)]
#[error("shutting down")]
pub struct ShuttingDown;

/// An instance could not be created for lack of shared capacity (a full
/// instance pool, an exhausted memory budget), not because anything is
/// wrong with it.
///
/// A [`HandlerState::instantiate`](crate::HandlerState::instantiate) that
/// fails with an error whose chain holds this (or wasmtime's
/// `PoolConcurrencyLimitError`) makes the request wait for another instance
/// of the handler to end instead of failing, and does not count against the
/// circuit. When none is alive to free anything, the request fails at once
/// with [`Overloaded`] (`503`), and the failure does count.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no capacity for another instance: {what}")]
pub struct AtCapacity {
    what: String,
}

impl AtCapacity {
    /// Capacity ran out of `what` (e.g. "the memory budget").
    pub fn new(what: impl Into<String>) -> Self {
        AtCapacity { what: what.into() }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;

    use super::*;

    fn request() -> Request {
        http::Request::new(crate::into_body(http_body_util::Empty::new()))
    }

    fn instantiation(circuit_open: bool) -> Error {
        let cause = Arc::new(wasmtime::Error::msg("secret detail at /srv/app.wasm"));
        InstantiationError::new(request(), cause, circuit_open).into()
    }

    #[test]
    fn every_error_maps_to_a_status_retry_advice_and_a_safe_message() {
        let cases: Vec<(Error, StatusCode, Option<Duration>)> = vec![
            (
                Overloaded::new(Duration::from_secs(2)).into(),
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(2)),
            ),
            (
                ShuttingDown.into(),
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(1)),
            ),
            (
                instantiation(true),
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(1)),
            ),
            (
                instantiation(false),
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
            ),
            (ExpirationError.into(), StatusCode::GATEWAY_TIMEOUT, None),
            (
                TrapOrPanicError::new("wasm trap: secret detail").into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
            ),
            (
                Error::Guest("secret detail".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
            ),
            (
                Error::InvalidRequest("no Host".into()),
                StatusCode::BAD_REQUEST,
                None,
            ),
            (
                Error::Internal("secret detail".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
            ),
        ];
        for (error, status, retry_after) in cases {
            assert_eq!(error.status(), status, "{error}");
            assert_eq!(error.retry_after(), retry_after, "{error}");
            assert_eq!(error.is_retryable(), retry_after.is_some(), "{error}");
            assert_eq!(
                error.status() == StatusCode::SERVICE_UNAVAILABLE,
                error.is_retryable(),
                "{error}"
            );
            let message = error.public_message();
            assert!(!message.contains("secret"), "{message}");
            assert!(!message.is_empty() && message.len() < 64, "{message}");
        }
    }
}
