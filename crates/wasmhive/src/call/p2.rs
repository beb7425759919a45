//! WASIp2 (`wasi:http/incoming-handler@0.2`): the guest gets the request and
//! a `response-outparam`, sets the response head on it, and goes on writing
//! the body until its handler returns.
//!
//! The head reaches the caller from the outparam's callback, the moment the
//! guest sets it: a p2 guest blocked in a synchronous host call keeps the
//! store's event loop, and so [`Call::run`], from running until it returns.

use std::sync::atomic::AtomicUsize;

use futures::future::Either;
use tokio::sync::oneshot;
use wasmtime::StoreContextMut;
use wasmtime::component::{Accessor, GuestTaskId, Resource, TypedFuncCallConcurrent};
use wasmtime_wasi_http::WasiHttpCtxView;
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p2::bindings::http::types::{
    ErrorCode, IncomingRequest, ResponseOutparam, Scheme,
};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use super::{BodyDone, Deadline, Ended, Guard, GuardedBody, Streaming, race};
use crate::reply::{Answer, Responder};
use crate::{Error, Request};

type HandleCall<T> =
    TypedFuncCallConcurrent<T, (Resource<IncomingRequest>, Resource<ResponseOutparam>), ()>;
type OutparamValue = Result<hyper::Response<HyperOutgoingBody>, ErrorCode>;

/// A p2 `handle` call queued in the store.
pub(crate) struct Call<'p, T: 'static> {
    guest: &'p Proxy,
    call: HandleCall<T>,
    /// Tells the response body whether the handler returned normally.
    returned: oneshot::Sender<bool>,
    /// Resolves when the guest has set its response outparam.
    head: oneshot::Receiver<()>,
    body_done: BodyDone,
}

impl<'p, T: Send + 'static> Call<'p, T> {
    pub(super) fn start(
        mut store: StoreContextMut<'_, T>,
        guest: &'p Proxy,
        view: fn(&mut T) -> WasiHttpCtxView<'_>,
        request: Request,
        responder: &Responder,
    ) -> wasmtime::Result<Self> {
        let mut http = view(store.data_mut());
        // `target::absolute` gave every request its scheme.
        let scheme = match request.uri().scheme() {
            Some(scheme) if *scheme == http::uri::Scheme::HTTPS => Scheme::Https,
            _ => Scheme::Http,
        };
        let incoming = http.new_incoming_request(scheme, request)?;
        let responder = responder.clone();
        let (returned, outcome) = oneshot::channel();
        let (head_tx, head) = oneshot::channel();
        let (body_tx, body_done) = oneshot::channel();
        let outparam = http.new_response_outparam_from_callback(move |value| {
            let guard = Guard::Returned(Some(outcome));
            let value = value.map(|response| {
                let held = responder.hold_body();
                response.map(|body| GuardedBody::wrap(body, guard, (body_tx, held)))
            });
            responder.send(answer(Some(value)));
            let _ = head_tx.send(());
        })?;
        let call = guest
            .wasi_http_incoming_handler()
            .func_handle()
            .start_call_concurrent(store, (incoming, outparam))?;
        Ok(Call {
            guest,
            call,
            returned,
            head,
            body_done,
        })
    }

    pub(super) fn task(&self) -> GuestTaskId {
        self.call.task()
    }

    /// Races the deadline to the head (the outparam set) or the handler's
    /// return, whichever comes first. A trap after the head aborts the body.
    pub(super) async fn run<'a>(
        self,
        accessor: &'a Accessor<T>,
        mut deadline: Deadline,
        responder: Responder,
        orphans: &'a AtomicUsize,
    ) -> wasmtime::Result<(Ended, Option<Streaming<'a>>)>
    where
        'p: 'a,
    {
        let Call {
            guest,
            call,
            returned,
            head,
            body_done,
        } = self;
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
        match race(returned_or_head, &mut deadline, &responder, orphans).await {
            Ok(true) => {
                let _ = returned.send(true);
                responder.send(answer(None));
                Ok((Ended::Responded, None))
            }
            // The rest of the call writes the body while the client reads
            // it. If the client drops it first, what the guest still does is
            // leftover work, bounded as such.
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
}

/// The answer for an outparam value (`None`: never set).
fn answer(value: Option<OutparamValue>) -> Answer {
    match value {
        Some(Ok(response)) => Ok(response),
        Some(Err(code)) => Err(Error::Guest(format!("{code:?}"))),
        None => Err(Error::Guest(
            "the guest returned without setting a response".into(),
        )),
    }
}
