//! WASIp3 (`wasi:http/handler@0.3`): the guest returns the response from
//! its `handle` call, and a task of the instance writes the body after the
//! call returned.

use std::sync::atomic::AtomicUsize;

use futures::FutureExt as _;
use tokio::sync::oneshot;
use wasmtime::StoreContextMut;
use wasmtime::component::{Accessor, GuestTaskId, Resource, TypedFuncCallConcurrent};
use wasmtime_wasi_http::WasiHttpCtxView;
use wasmtime_wasi_http::p3::bindings::Service;
use wasmtime_wasi_http::p3::bindings::http::types::{ErrorCode, Request as GuestRequest, Response};

use super::{Deadline, Ended, Guard, GuardedBody, Streaming, race};
use crate::reply::Responder;
use crate::{Error, Request};

type HandleCall<T> =
    TypedFuncCallConcurrent<T, (Resource<GuestRequest>,), (Result<Resource<Response>, ErrorCode>,)>;
/// Forwards the request body into the guest's request.
type RequestIo =
    std::pin::Pin<Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>>;

/// A p3 `handle` call queued in the store.
pub(crate) struct Call<'p, T: 'static> {
    guest: &'p Service,
    view: fn(&mut T) -> WasiHttpCtxView<'_>,
    call: HandleCall<T>,
    request_io: RequestIo,
}

impl<'p, T: Send + 'static> Call<'p, T> {
    pub(super) fn start(
        mut store: StoreContextMut<'_, T>,
        guest: &'p Service,
        view: fn(&mut T) -> WasiHttpCtxView<'_>,
        request: Request,
    ) -> wasmtime::Result<Self> {
        let http = view(store.data_mut());
        let (request, request_io) = wasmtime_wasi_http::p3::Request::from_http(http.hooks, request);
        let request = http.table.push(request)?;
        let call = guest
            .wasi_http_handler()
            .func_handle()
            .start_call_concurrent(store, (request,))?;
        Ok(Call {
            guest,
            view,
            call,
            request_io: Box::pin(request_io),
        })
    }

    pub(super) fn task(&self) -> GuestTaskId {
        self.call.task()
    }

    /// Races the deadline to the call's return with the response.
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
            view,
            call,
            request_io,
        } = self;
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
                            Ok(response.map(|body| GuardedBody::wrap(body, guard, in_flight)))
                        })
                })?,
                Err(code) => Err(Error::Guest(format!("{code:?}"))),
            })
        };
        match race(response, &mut deadline, &responder, orphans).await {
            Ok(answer) => {
                responder.send(answer);
                let streaming: Streaming<'a> = Box::pin(body_done.map(|_| Ok(())));
                Ok((Ended::Responded, Some(streaming)))
            }
            Err(unanswered) => unanswered.settle(&responder),
        }
    }
}
