//! One request as a guest task: starting the call, waiting for the response
//! head, and delivering it (or the failure) to the caller.
//!
//! WASIp3 (`handler@0.3`) returns the response from the call; WASIp2
//! (`incoming-handler@0.2`) hands it to a `response-outparam` and may keep
//! running afterwards to write the body, so for p2 the response is delivered
//! as soon as the outparam is set, not when the call returns. Either way the
//! request's deadline bounds the time to the response head; the body is
//! then a [`Streaming`] future the worker keeps until the client has read it
//! (or dropped it).

use std::pin::{Pin, pin};
use std::sync::Arc;

use futures::FutureExt as _;
use futures::future::Either;

use tokio::sync::oneshot;
use wasmtime::StoreContextMut;
use wasmtime::component::{Accessor, GuestTaskId, Resource, TypedFuncCallConcurrent};
use wasmtime_wasi_http::WasiHttpCtxView;
use wasmtime_wasi_http::p2::bindings::http::types as p2_types;
use wasmtime_wasi_http::p3::bindings::http::types as p3_types;

use crate::policy::{Proxy, RequestDeadline};
use crate::reply::{Answer, BodyHeld, Fate, Responder};
use crate::{Error, ExpirationError, Request, TrapOrPanicError};

/// A response body on its way to the caller after the response head: it
/// resolves when the caller has read the body to its end or dropped it (for
/// p2, also when the handler returns, having written it all). Until then
/// the request still counts against its instance, with no deadline: a
/// stream lasts as long as its client reads it. An `Err` is a trap.
pub(crate) type Streaming<'a> = Pin<Box<dyn Future<Output = wasmtime::Result<()>> + Send + 'a>>;

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
    /// The caller went away first; the guest task may still be running.
    Abandoned,
}

type P2Call<T> = TypedFuncCallConcurrent<
    T,
    (
        Resource<p2_types::IncomingRequest>,
        Resource<p2_types::ResponseOutparam>,
    ),
    (),
>;
type P2Response =
    Result<hyper::Response<wasmtime_wasi_http::p2::body::HyperOutgoingBody>, p2_types::ErrorCode>;
type P3Call<T> = TypedFuncCallConcurrent<
    T,
    (Resource<p3_types::Request>,),
    (Result<Resource<p3_types::Response>, p3_types::ErrorCode>,),
>;
type RequestIo =
    std::pin::Pin<Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>>;

/// A call started in the store but not yet run.
pub(crate) enum GuestCall<T: 'static> {
    P2 {
        call: P2Call<T>,
        /// Tells the response body whether the handler returned normally.
        returned: oneshot::Sender<bool>,
        /// Resolves when the guest has set its response outparam.
        head: oneshot::Receiver<()>,
        body_done: BodyDone,
    },
    P3 {
        call: P3Call<T>,
        request_io: RequestIo,
    },
}

impl<T: Send + 'static> GuestCall<T> {
    /// Moves `request` into the store and queues the guest call.
    pub(crate) fn start(
        mut store: StoreContextMut<'_, T>,
        proxy: &Proxy,
        view: fn(&mut T) -> WasiHttpCtxView<'_>,
        request: Request,
        responder: &Responder,
    ) -> Result<GuestCall<T>, Error> {
        // The request was validated before it was admitted: what fails here
        // is the host's doing (a full resource table, the call set-up).
        let invalid = |e: wasmtime::Error| Error::Internal(format!("{e:#}"));
        match proxy {
            Proxy::P2(guest) => {
                let mut http = view(store.data_mut());
                let incoming = http
                    .new_incoming_request(p2_types::Scheme::Http, request)
                    .map_err(invalid)?;
                let responder = responder.clone();
                let (returned, outcome) = oneshot::channel();
                let (head_tx, head) = oneshot::channel();
                let (body_tx, body_done) = oneshot::channel();
                let outparam = http
                    .new_response_outparam_from_callback(move |value| {
                        let guard = Guard::Returned(Some(outcome));
                        let value = value.map(|response| {
                            let held = responder.hold_body();
                            response.map(|body| GuardedBody::wrap(body, guard, (body_tx, held)))
                        });
                        responder.send(p2_answer(Some(value)));
                        let _ = head_tx.send(());
                    })
                    .map_err(invalid)?;
                let call = guest
                    .wasi_http_incoming_handler()
                    .func_handle()
                    .start_call_concurrent(store, (incoming, outparam))
                    .map_err(invalid)?;
                Ok(GuestCall::P2 {
                    call,
                    returned,
                    head,
                    body_done,
                })
            }
            Proxy::P3(guest) => {
                let http = view(store.data_mut());
                let (request, request_io) =
                    wasmtime_wasi_http::p3::Request::from_http(http.hooks, request);
                let request = http.table.push(request).map_err(|e| invalid(e.into()))?;
                let call = guest
                    .wasi_http_handler()
                    .func_handle()
                    .start_call_concurrent(store, (request,))
                    .map_err(invalid)?;
                Ok(GuestCall::P3 {
                    call,
                    request_io: Box::pin(request_io),
                })
            }
        }
    }

    /// The guest task running this call.
    pub(crate) fn task(&self) -> GuestTaskId {
        match self {
            GuestCall::P2 { call, .. } => call.task(),
            GuestCall::P3 { call, .. } => call.task(),
        }
    }

    /// Runs the call until the response head is delivered, the deadline
    /// passes or the caller goes away. An `Err` is a trap: the instance is
    /// unusable and the worker must end. The instance goes on writing the
    /// response body after that (p3: a task of the instance, once the call
    /// returned; p2: the rest of the call): the [`Streaming`] future tells
    /// when the body is over.
    pub(crate) async fn run<'a>(
        self,
        accessor: &'a Accessor<T>,
        proxy: &'a Proxy,
        view: fn(&mut T) -> WasiHttpCtxView<'_>,
        deadline: RequestDeadline,
        responder: Responder,
    ) -> wasmtime::Result<(Ended, Option<Streaming<'a>>)> {
        let mut deadline = deadline.fuse();
        match (self, proxy) {
            (GuestCall::P3 { call, request_io }, Proxy::P3(guest)) => {
                let (body_tx, body_done) = oneshot::channel::<()>();
                let response = async {
                    let (result,) = guest
                        .wasi_http_handler()
                        .func_handle()
                        .finish_call_concurrent(accessor, call)
                        .await?;
                    Ok::<_, wasmtime::Error>(match result {
                        Ok(response) => accessor.with(|mut store| {
                            let response = view(store.get()).table.delete(response)?;
                            response
                                .into_http_with_getter(&mut store, request_io, view)
                                .map(|response| {
                                    let guard = Guard::Instance(responder.fate());
                                    let in_flight = (body_tx, responder.hold_body());
                                    Ok(response
                                        .map(|body| GuardedBody::wrap(body, guard, in_flight)))
                                })
                        })?,
                        Err(code) => Err(Error::Guest(format!("{code:?}"))),
                    })
                };
                match race(response, &mut deadline, &responder).await {
                    Ok(answer) => {
                        responder.send(answer);
                        let streaming: Streaming<'a> = Box::pin(body_done.map(|_| Ok(())));
                        Ok((Ended::Responded, Some(streaming)))
                    }
                    Err(unanswered) => unanswered.settle(&responder),
                }
            }
            (
                GuestCall::P2 {
                    call,
                    returned,
                    head,
                    body_done,
                },
                Proxy::P2(guest),
            ) => {
                // The outparam callback delivers the head, within the
                // deadline; the call goes on writing the body until it
                // returns. A trap after the head aborts the body.
                let mut finished = Box::pin(
                    guest
                        .wasi_http_incoming_handler()
                        .func_handle()
                        .finish_call_concurrent(accessor, call),
                );
                let returned_or_head = async {
                    match futures::future::select(finished.as_mut(), head).await {
                        Either::Left((result, _)) => result.map(|()| true),
                        Either::Right(_) => Ok(false),
                    }
                };
                match race(returned_or_head, &mut deadline, &responder).await {
                    Ok(true) => {
                        let _ = returned.send(true);
                        responder.send(p2_answer(None));
                        Ok((Ended::Responded, None))
                    }
                    // The rest of the call writes the body while the client
                    // reads it. If the client drops it first, what the guest
                    // still does is leftover work, bounded as such.
                    Ok(false) => {
                        let streaming: Streaming<'a> = Box::pin(async move {
                            if let Either::Left((result, _)) =
                                futures::future::select(finished, body_done).await
                            {
                                result?;
                                let _ = returned.send(true);
                            }
                            Ok(())
                        });
                        Ok((Ended::Responded, Some(streaming)))
                    }
                    Err(unanswered) => unanswered.settle(&responder),
                }
            }
            _ => unreachable!("a call always runs on the proxy that started it"),
        }
    }
}

/// Why a call ended without its work done.
enum Unanswered {
    /// The instance trapped.
    Trapped(wasmtime::Error),
    /// The request's deadline passed.
    Expired,
    /// The caller went away.
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
async fn race<R>(
    work: impl Future<Output = wasmtime::Result<R>>,
    mut deadline: &mut futures::future::Fuse<RequestDeadline>,
    responder: &Responder,
) -> Result<R, Unanswered> {
    let mut work = pin!(work.fuse());
    let mut abandoned = pin!(responder.closed().fuse());
    futures::select_biased! {
        result = work => result.map_err(Unanswered::Trapped),
        () = deadline => Err(Unanswered::Expired),
        () = abandoned => Err(Unanswered::Abandoned),
    }
}

/// The answer for a p2 outparam value (`None`: never set).
fn p2_answer(value: Option<P2Response>) -> Answer {
    match value {
        Some(Ok(response)) => Ok(response),
        Some(Err(code)) => Err(Error::Guest(format!("{code:?}"))),
        None => Err(Error::Guest(
            "the guest returned without setting a response".into(),
        )),
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
