//! One request as a guest task: starting the call, waiting for the response
//! head, and delivering it (or the failure) to the caller.
//!
//! WASIp3 (`handler@0.3`) returns the response from the call; WASIp2
//! (`incoming-handler@0.2`) hands it to a `response-outparam` and may keep
//! running afterwards to write the body, so for p2 the response is delivered
//! as soon as the outparam is set, not when the call returns.

use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use tokio::sync::oneshot;
use wasmtime::StoreContextMut;
use wasmtime::component::{Accessor, GuestTaskId, Resource, TypedFuncCallConcurrent};
use wasmtime_wasi_http::WasiHttpCtxView;
use wasmtime_wasi_http::p2::bindings::http::types as p2_types;
use wasmtime_wasi_http::p3::bindings::http::types as p3_types;

use crate::policy::{Proxy, RequestDeadline};
use crate::{Error, ExpirationError, Request, Response, TrapOrPanicError};

/// The response head, or why there is none.
pub(crate) type Delivery = Result<Response, Error>;

/// Where and when a request was taken by a worker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dispatch {
    pub(crate) incarnation: u64,
    pub(crate) accepted_at: Instant,
    /// Set when this request waited for its instance to be created.
    pub(crate) instantiation: Option<Duration>,
}

/// What the caller of `handle` receives.
pub(crate) struct Reply {
    pub(crate) delivery: Delivery,
    pub(crate) dispatch: Option<Dispatch>,
}

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

/// What becomes of requests still outstanding when a worker tears down.
#[derive(Default)]
pub(crate) struct Fate(Mutex<Option<Error>>);

impl Fate {
    /// Records why the worker is going away, before it drops its calls.
    pub(crate) fn set(&self, error: Error) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    fn error(&self) -> Error {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(Error::Expired(e)) => Error::Expired(e.clone()),
            Some(Error::TrapOrPanic(e)) => Error::TrapOrPanic(e.clone()),
            _ => TrapOrPanicError::new("the instance stopped before the guest responded").into(),
        }
    }
}

/// The sending half of a request's delivery. If dropped unsent (the worker
/// tore down, or panicked), the caller gets the worker's [`Fate`] instead.
pub(crate) struct Responder {
    tx: Option<oneshot::Sender<Reply>>,
    fate: Arc<Fate>,
    dispatch: Dispatch,
}

impl Responder {
    pub(crate) fn new(tx: oneshot::Sender<Reply>, fate: Arc<Fate>, dispatch: Dispatch) -> Self {
        Responder {
            tx: Some(tx),
            fate,
            dispatch,
        }
    }

    pub(crate) fn send(&mut self, delivery: Delivery) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Reply {
                delivery,
                dispatch: Some(self.dispatch),
            });
        }
    }

    async fn closed(&mut self) {
        match &mut self.tx {
            Some(tx) => tx.closed().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let error = self.fate.error();
        self.send(Err(error));
    }
}

type P2Call<T> = TypedFuncCallConcurrent<
    T,
    (
        Resource<p2_types::IncomingRequest>,
        Resource<p2_types::ResponseOutparam>,
    ),
    (),
>;
type P2Response = Result<hyper::Response<wasmtime_wasi_http::p2::body::HyperOutgoingBody>, p2_types::ErrorCode>;
type P3Call<T> = TypedFuncCallConcurrent<
    T,
    (Resource<p3_types::Request>,),
    (Result<Resource<p3_types::Response>, p3_types::ErrorCode>,),
>;
type RequestIo = std::pin::Pin<Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>>;

/// A call started in the store but not yet run.
pub(crate) enum GuestCall<T: 'static> {
    P2 {
        call: P2Call<T>,
        response: oneshot::Receiver<P2Response>,
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
    ) -> Result<GuestCall<T>, Error> {
        let invalid = |e: wasmtime::Error| Error::InvalidRequest(format!("{e:#}"));
        match proxy {
            Proxy::P2(guest) => {
                let mut http = view(store.data_mut());
                let incoming = http
                    .new_incoming_request(p2_types::Scheme::Http, request)
                    .map_err(invalid)?;
                let (tx, response) = oneshot::channel();
                let outparam = http
                    .new_response_outparam_from_callback(move |value| {
                        let _ = tx.send(value);
                    })
                    .map_err(invalid)?;
                let call = guest
                    .wasi_http_incoming_handler()
                    .func_handle()
                    .start_call_concurrent(store, (incoming, outparam))
                    .map_err(invalid)?;
                Ok(GuestCall::P2 { call, response })
            }
            Proxy::P3(guest) => {
                let http = view(store.data_mut());
                let (request, request_io) = wasmtime_wasi_http::p3::Request::from_http(http.hooks, request);
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
    /// unusable and the worker must end.
    pub(crate) async fn run(
        self,
        accessor: &Accessor<T>,
        proxy: &Proxy,
        view: fn(&mut T) -> WasiHttpCtxView<'_>,
        deadline: RequestDeadline,
        mut responder: Responder,
    ) -> wasmtime::Result<Ended> {
        let mut deadline = deadline.fuse();
        match (self, proxy) {
            (GuestCall::P3 { call, request_io }, Proxy::P3(guest)) => {
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
                                .map(Ok)
                        })?,
                        Err(code) => Err(Error::Guest(format!("{code:?}"))),
                    })
                };
                match race(response, &mut deadline, &mut responder).await {
                    First::Done(Ok(delivery)) => {
                        responder.send(delivery);
                        Ok(Ended::Responded)
                    }
                    First::Done(Err(trap)) => {
                        responder.send(Err(TrapOrPanicError::new(crate::describe(&trap)).into()));
                        Err(trap)
                    }
                    First::Expired => {
                        responder.send(Err(ExpirationError.into()));
                        Ok(Ended::Expired)
                    }
                    First::Abandoned => Ok(Ended::Abandoned),
                }
            }
            (GuestCall::P2 { call, response }, Proxy::P2(guest)) => {
                let mut finished = pin!(
                    guest
                        .wasi_http_incoming_handler()
                        .func_handle()
                        .finish_call_concurrent(accessor, call)
                        .fuse()
                );
                let mut response = response.fuse();
                // Until the response head, the outparam and the call's return
                // race each other, the deadline and the caller.
                let head = async {
                    futures::select_biased! {
                        value = response => Head::Set(value.ok()),
                        result = finished => Head::Returned(result),
                    }
                };
                let returned = match race(head, &mut deadline, &mut responder).await {
                    First::Done(Head::Set(value)) => {
                        responder.send(p2_delivery(value));
                        None
                    }
                    First::Done(Head::Returned(result)) => Some(result),
                    First::Expired => {
                        responder.send(Err(ExpirationError.into()));
                        return Ok(Ended::Expired);
                    }
                    First::Abandoned => return Ok(Ended::Abandoned),
                };
                // After the head, the call goes on writing the body until it
                // returns, still within the deadline; a trap there aborts the
                // body.
                let result = match returned {
                    Some(result) => result,
                    None => match race(finished, &mut deadline, &mut responder).await {
                        First::Done(result) => result,
                        First::Expired => return Ok(Ended::Expired),
                        First::Abandoned => return Ok(Ended::Abandoned),
                    },
                };
                match result {
                    Ok(()) => {
                        // Returned: the outparam may have been set just before.
                        responder.send(p2_delivery(response.now_or_never().and_then(Result::ok)));
                        Ok(Ended::Responded)
                    }
                    Err(trap) => {
                        responder.send(Err(TrapOrPanicError::new(crate::describe(&trap)).into()));
                        Err(trap)
                    }
                }
            }
            _ => unreachable!("a call always runs on the proxy that started it"),
        }
    }
}

enum Head {
    Set(Option<P2Response>),
    Returned(wasmtime::Result<()>),
}

enum First<R> {
    Done(R),
    Expired,
    Abandoned,
}

/// Waits for `work`, unless the deadline passes or the caller goes away
/// first. Once the responder has sent, the caller can no longer go away.
async fn race<R>(
    work: impl Future<Output = R>,
    mut deadline: &mut futures::future::Fuse<RequestDeadline>,
    responder: &mut Responder,
) -> First<R> {
    let mut work = pin!(work.fuse());
    let mut abandoned = pin!(responder.closed().fuse());
    futures::select_biased! {
        result = work => First::Done(result),
        () = deadline => First::Expired,
        () = abandoned => First::Abandoned,
    }
}

/// The delivery for a p2 outparam value (`None`: never set).
fn p2_delivery(value: Option<P2Response>) -> Delivery {
    match value {
        Some(Ok(response)) => Ok(response),
        Some(Err(code)) => Err(Error::Guest(format!("{code:?}"))),
        None => Err(Error::Guest("the guest returned without setting a response".into())),
    }
}
