//! One request as a guest task: starting the call, waiting for the response
//! head, and delivering it (or the failure) to the caller.
//!
//! Each calling convention has its module, behind [`GuestCall`]: `start`
//! moves the request into the store and queues the call, `run` drives it to
//! the response head. WASIp3 (`handler@0.3`, [`p3`]) returns the response
//! from the call; WASIp2 (`incoming-handler@0.2`, [`p2`]) hands it to a
//! `response-outparam` and may keep running afterwards to write the body,
//! so for p2 the response is delivered as soon as the outparam is set, not
//! when the call returns. Either way the request's deadline bounds the time
//! to the response head; the body is then a [`Streaming`] future the worker
//! keeps until the client has read it (or dropped it).
//!
//! A new `wasi:http` world takes a variant of [`World`](crate::World), of
//! [`Proxy`] (its bindings) and of the app's pre-instance, and a module
//! here.

mod p2;
mod p3;

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use futures::FutureExt as _;
use tokio::sync::oneshot;
use wasmtime::StoreContextMut;
use wasmtime::component::{Accessor, GuestTaskId};
use wasmtime_wasi_http::WasiHttpCtxView;

use crate::policy::{Proxy, RequestDeadline};
use crate::reply::{BodyHeld, Fate, Responder};
use crate::{Error, ExpirationError, Request, TrapOrPanicError};

/// A response body on its way to the caller after the response head: it
/// resolves when the caller has read the body to its end or dropped it (for
/// p2, also when the handler returns, having written it all). Until then
/// the request still counts against its instance, with no deadline: a
/// stream lasts as long as its client reads it. An `Err` is a trap.
pub(crate) type Streaming<'a> = Pin<Box<dyn Future<Output = wasmtime::Result<()>> + Send + 'a>>;

/// The request's deadline, as the calls race it.
type Deadline = futures::future::Fuse<RequestDeadline>;

/// Resolves (with an error: its sender is dropped, never used) when a
/// [`GuardedBody`] has been read to its end or dropped.
type BodyDone = oneshot::Receiver<()>;

/// How a call ended for the worker's bookkeeping.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Ended {
    /// The response head (or a guest error) was delivered.
    Responded,
    /// The request's deadline passed first.
    Expired,
    /// The caller went away first; the call has since been run out (see
    /// [`race`]).
    Abandoned,
}

/// A call started in the store but not yet run, on the guest of `'p`.
pub(crate) enum GuestCall<'p, T: 'static> {
    P2(p2::Call<'p, T>),
    P3(p3::Call<'p, T>),
}

impl<'p, T: Send + 'static> GuestCall<'p, T> {
    /// Moves `request` into the store and queues the guest call.
    pub(crate) fn start(
        store: StoreContextMut<'_, T>,
        proxy: &'p Proxy,
        view: fn(&mut T) -> WasiHttpCtxView<'_>,
        request: Request,
        responder: &Responder,
    ) -> Result<Self, Error> {
        let started = match proxy {
            Proxy::P2(guest) => {
                p2::Call::start(store, guest, view, request, responder).map(GuestCall::P2)
            }
            Proxy::P3(guest) => p3::Call::start(store, guest, view, request).map(GuestCall::P3),
        };
        // The request was validated before it was admitted: what fails here
        // is the host's doing (a full resource table, the call set-up).
        started.map_err(|e| Error::Internal(format!("{e:#}")))
    }

    /// The guest task running this call.
    pub(crate) fn task(&self) -> GuestTaskId {
        match self {
            GuestCall::P2(call) => call.task(),
            GuestCall::P3(call) => call.task(),
        }
    }

    /// Runs the call until the response head is delivered, the deadline
    /// passes or the caller goes away. An `Err` is a trap: the instance is
    /// unusable and the worker must end. The instance goes on writing the
    /// response body after that (p3: a task of the instance, once the call
    /// returned; p2: the rest of the call): the [`Streaming`] future tells
    /// when the body is over.
    ///
    /// A call whose caller goes away is run out, counted in `orphans`
    /// meanwhile ([`race`]).
    pub(crate) async fn run<'a>(
        self,
        accessor: &'a Accessor<T>,
        deadline: RequestDeadline,
        responder: Responder,
        orphans: &'a AtomicUsize,
    ) -> wasmtime::Result<(Ended, Option<Streaming<'a>>)>
    where
        'p: 'a,
    {
        let deadline = deadline.fuse();
        match self {
            GuestCall::P2(call) => call.run(accessor, deadline, responder, orphans).await,
            GuestCall::P3(call) => call.run(accessor, deadline, responder, orphans).await,
        }
    }
}

/// Why a call ended without its work done.
enum Unanswered {
    /// The instance trapped.
    Trapped(wasmtime::Error),
    /// The request's deadline passed.
    Expired,
    /// The caller went away, and the call was run out.
    Abandoned,
}

impl Unanswered {
    /// Tells the caller (if still there) and says how the call ended; a
    /// trap is an `Err`: the instance is unusable.
    fn settle<'a>(self, responder: &Responder) -> wasmtime::Result<(Ended, Option<Streaming<'a>>)> {
        match self {
            Unanswered::Trapped(trap) => {
                responder.send(Err(TrapOrPanicError::new(crate::describe(&trap)).into()));
                Err(trap)
            }
            Unanswered::Expired => {
                responder.send(Err(ExpirationError.into()));
                Ok((Ended::Expired, None))
            }
            Unanswered::Abandoned => Ok((Ended::Abandoned, None)),
        }
    }
}

/// Waits for `work`, unless the deadline passes or the caller goes away
/// first. Once the responder has sent, the caller can no longer go away.
///
/// A caller going away does not end the call: wasmtime cannot cancel one
/// guest task, so `work` is run out, its answer unwanted, under the same
/// deadline (an expiry retires the instance, as for any request), and
/// counts in `orphans` meanwhile. The worker ends its instance, orphans
/// and all, once nothing else it holds is wanted.
async fn race<R>(
    work: impl Future<Output = wasmtime::Result<R>>,
    mut deadline: &mut Deadline,
    responder: &Responder,
    orphans: &AtomicUsize,
) -> Result<R, Unanswered> {
    let mut work = pin!(work.fuse());
    let mut abandoned = pin!(responder.closed().fuse());
    futures::select_biased! {
        result = work => return result.map_err(Unanswered::Trapped),
        () = deadline => return Err(Unanswered::Expired),
        () = abandoned => {}
    }
    struct Orphan<'o>(&'o AtomicUsize);
    impl Drop for Orphan<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Relaxed);
        }
    }
    orphans.fetch_add(1, Relaxed);
    let _orphan = Orphan(orphans);
    futures::select_biased! {
        result = work => result.map_err(Unanswered::Trapped).and(Err(Unanswered::Abandoned)),
        () = deadline => Err(Unanswered::Expired),
    }
}

/// A response body that ends in an error, instead of cleanly, when the guest
/// did not finish it.
///
/// wasmtime ends a body cleanly when the store behind it goes away, so a
/// guest that trapped (or was killed) halfway through its body would look to
/// the client like one that sent a short, complete body. At its end, this
/// body checks the [`Guard`] and reports the truncation instead.
struct GuardedBody {
    inner: crate::Body,
    guard: Guard,
    /// Dropped at the end of the body, or with it: see [`BodyDone`] and
    /// [`BodyHeld`].
    in_flight: Option<(oneshot::Sender<()>, BodyHeld)>,
}

/// How a [`GuardedBody`] tells a finished body from a cut-off one.
enum Guard {
    /// p2: the body is the handler's to finish before it returns, so wait
    /// for the handler's outcome (`true`: returned normally).
    Returned(Option<oneshot::Receiver<bool>>),
    /// p3: a task of the instance writes the body after the handler
    /// returned; the body is cut off if the instance ended abnormally. (A
    /// body complete but not yet read when its instance traps for another
    /// request is reported as cut off too: the safe side.)
    Instance(Arc<Fate>),
}

impl GuardedBody {
    fn wrap(
        inner: crate::Body,
        guard: Guard,
        in_flight: (oneshot::Sender<()>, BodyHeld),
    ) -> crate::Body {
        use http_body_util::BodyExt as _;
        GuardedBody {
            inner,
            guard,
            in_flight: Some(in_flight),
        }
        .boxed_unsync()
    }
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {}
            Poll::Ready(Some(Err(error))) => {
                self.in_flight = None;
                return Poll::Ready(Some(Err(error)));
            }
            other => return other,
        }
        let finished = match &mut self.guard {
            Guard::Returned(None) => true,
            Guard::Returned(Some(outcome)) => {
                let returned = std::task::ready!(std::pin::Pin::new(outcome).poll(cx));
                self.guard = Guard::Returned(None);
                returned == Ok(true)
            }
            Guard::Instance(fate) => !fate.is_set(),
        };
        self.in_flight = None;
        if finished {
            Poll::Ready(None)
        } else {
            Poll::Ready(Some(Err(wasmtime_wasi_http::Error::InternalError(Some(
                "the guest failed before finishing the response body".into(),
            )))))
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
