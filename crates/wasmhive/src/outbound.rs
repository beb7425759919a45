//! Outbound HTTP from guests: the allowlist ([`OutboundAuthority`]), the
//! hooks that enforce it for every send, and the host side of the p3
//! `wasi:http/client` interface.
//!
//! p2 guests send through wasmtime-wasi-http's own `outgoing-handler`,
//! which calls [`OutboundHooks::send_request`]. p3 guests send through
//! [`Client`], our implementation of `wasi:http/client#send`. It exists
//! because the transmission future a p3 guest gets from `request.new`
//! must report a request that never left (refused connection, denied
//! host, timeout) as failed; wasmtime-wasi-http 48 resolves it as success
//! when the send fails before its I/O starts.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use wasmtime::component::{Accessor, HasData, Linker, Resource};
use wasmtime_wasi::TrappableError;
use wasmtime_wasi_http::p3::bindings::http::client;
use wasmtime_wasi_http::p3::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::p3::{Request, Response};
use wasmtime_wasi_http::{Error, WasiHttpCtxView, WasiHttpHooks};

/// A `host` (any port) or `host:port` that guests may send HTTP requests
/// to; see [`App::allow_outbound`](crate::App::allow_outbound). Hosts compare case-insensitively; IPv6
/// hosts are written in brackets (`[::1]:8080`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundAuthority {
    host: String,
    port: Option<u16>,
}

/// A string that is not a `host` or `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a host or host:port")]
pub struct InvalidAuthority(String);

impl std::str::FromStr for OutboundAuthority {
    type Err = InvalidAuthority;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let authority = crate::target::checked_authority(value.trim())
            .ok_or_else(|| InvalidAuthority(value.to_string()))?;
        Ok(OutboundAuthority {
            host: authority.host().to_ascii_lowercase(),
            port: authority.port_u16(),
        })
    }
}

impl OutboundAuthority {
    fn allows(&self, uri: &http::Uri) -> bool {
        let Some(host) = uri.host() else {
            return false;
        };
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            _ => Some(80),
        });
        host.eq_ignore_ascii_case(&self.host) && (self.port.is_none() || self.port == port)
    }
}

/// The [`WasiHttpHooks`] of an instance: every outbound request, p2 or
/// p3, is sent here, and only to an allowed authority.
pub(crate) struct OutboundHooks {
    allowed: Arc<[OutboundAuthority]>,
}

impl OutboundHooks {
    pub(crate) fn new(allowed: Arc<[OutboundAuthority]>) -> OutboundHooks {
        OutboundHooks { allowed }
    }
}

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<wasmtime_wasi_http::WasiBody>,
    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
)>;

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        if !self.allowed.iter().any(|a| a.allows(request.uri())) {
            tracing::info!(uri = %request.uri(), "outbound request denied");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(http_body_util::BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

/// The host side of p3 `wasi:http/client`; see the module docs.
pub(crate) struct Client;

impl HasData for Client {
    type Data<'a> = WasiHttpCtxView<'a>;
}

impl Client {
    /// Links `wasi:http/client` (this implementation) and wasmtime's
    /// `wasi:http/types` into `linker`.
    pub(crate) fn add_to_linker<T: Send + 'static>(
        linker: &mut Linker<T>,
        view: fn(&mut T) -> WasiHttpCtxView<'_>,
    ) -> wasmtime::Result<()> {
        client::add_to_linker::<T, Client>(linker, view)?;
        wasmtime_wasi_http::p3::bindings::http::types::add_to_linker::<
            T,
            wasmtime_wasi_http::WasiHttp,
        >(linker, view)
    }
}

type HttpError = TrappableError<ErrorCode>;
type HttpResult<T> = Result<T, HttpError>;

impl<T> client::HostWithStore<T> for Client {
    async fn send(
        store: &Accessor<T, Self>,
        request: Resource<Request>,
    ) -> HttpResult<Resource<Response>> {
        // What the guest's transmission future resolves to: the failure of
        // a send that never got a response, or else the end of the
        // connection's I/O. A sender dropped unsent (the guest cancelled
        // the send) means the request was not transmitted either.
        let (transmitted_tx, transmitted_rx) = oneshot::channel::<Result<(), Error>>();
        let transmitted = async move {
            transmitted_rx
                .await
                .unwrap_or(Err(Error::ConnectionTerminated))
        };
        // Keeps the connection's I/O task alive while the request body is
        // still being sent or the guest still holds the response body.
        let io = IoTask::default();
        let getter = store.getter();
        let sending = store.with(|mut store| {
            let request = store.get().table.delete(request).map_err(HttpError::trap)?;
            let (request, options) =
                request.into_http_with_getter(&mut store, transmitted, getter)?;
            let request = request.map(|body| io.guard(body));
            HttpResult::Ok(store.get().hooks.send_request(
                request,
                options.as_deref().copied(),
                // The guest's result of consuming the response body: not
                // needed by this host.
                Box::new(async { Ok(()) }),
            ))
        })?;
        let (response, connection) = match Box::into_pin(sending).await {
            Ok(sent) => sent,
            Err(error) => {
                let code = store.with(|mut store| error_code(store.get().hooks, &error));
                let _ = transmitted_tx.send(Err(Error::from(code.clone())));
                return Err(code.into());
            }
        };
        // Made before the task, so that it reports even if the task is
        // aborted before it first runs.
        let mut report = Transmitted(Some(transmitted_tx));
        let task = tokio::spawn(async move {
            let result = Box::into_pin(connection).await;
            if let Some(tx) = report.0.take() {
                let _ = tx.send(result);
            }
        });
        io.set(task.abort_handle());
        store.with(|mut store| {
            let hooks = store.get().hooks;
            let (response, _consumed) = Response::from_http(hooks, response.map(|b| io.guard(b)));
            store.get().table.push(response).map_err(HttpError::trap)
        })
    }
}

/// Reports the transmission of a request that got its response. If the
/// I/O task is aborted first (both bodies are gone: the request body was
/// sent in full and the guest dropped the response), it went well.
struct Transmitted(Option<oneshot::Sender<Result<(), Error>>>);

impl Drop for Transmitted {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Ok(()));
        }
    }
}

/// The p3 error code a failed send gives the guest.
fn error_code(hooks: &mut dyn WasiHttpHooks, error: &Error) -> ErrorCode {
    match error {
        Error::Connect(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => ErrorCode::ConnectionRefused,
            std::io::ErrorKind::TimedOut => ErrorCode::ConnectionTimeout,
            _ => hooks.p3_error_from_connect(io),
        },
        Error::Hyper(e) => hooks.p3_error_from_hyper(e),
        Error::Tls(io) => hooks.p3_error_from_tls(io),
        Error::InvalidDnsNameError(e) => hooks.p3_error_from_dns(e),
        Error::HttpRequestDenied => ErrorCode::HttpRequestDenied,
        Error::HttpRequestUriInvalid => ErrorCode::HttpRequestUriInvalid,
        Error::ConnectionTimeout => ErrorCode::ConnectionTimeout,
        Error::ConnectionReadTimeout => ErrorCode::ConnectionReadTimeout,
        Error::HttpResponseTimeout => ErrorCode::HttpResponseTimeout,
        other => ErrorCode::InternalError(Some(other.to_string())),
    }
}

/// The connection I/O task of one outbound request, aborted when the last
/// body that holds a [`IoTask::guard`] is dropped.
#[derive(Clone, Default)]
struct IoTask(Arc<IoAbort>);

#[derive(Default)]
struct IoAbort(Mutex<Option<AbortHandle>>);

impl Drop for IoAbort {
    fn drop(&mut self) {
        if let Some(task) = self.0.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

impl IoTask {
    fn set(&self, task: AbortHandle) {
        *self.0.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    fn guard(&self, body: UnsyncBoxBody<Bytes, Error>) -> UnsyncBoxBody<Bytes, Error> {
        WithIo {
            body,
            _io: self.clone(),
        }
        .boxed_unsync()
    }
}

/// A body that keeps an [`IoTask`] alive.
struct WithIo {
    body: UnsyncBoxBody<Bytes, Error>,
    _io: IoTask,
}

impl http_body::Body for WithIo {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::OutboundAuthority;

    fn uri(host: &str, port: u16) -> http::Uri {
        format!("http://{host}:{port}/path").parse().unwrap()
    }

    #[test]
    fn authorities() {
        let any_port: OutboundAuthority = "Example.COM".parse().unwrap();
        assert!(any_port.allows(&uri("example.com", 1234)));
        assert!(any_port.allows(&"https://EXAMPLE.com/".parse().unwrap()));
        let v6: OutboundAuthority = "[::1]:8080".parse().unwrap();
        assert!(v6.allows(&uri("[::1]", 8080)));
        assert!(!v6.allows(&uri("[::1]", 8081)));
        let default_port: OutboundAuthority = "example.com:80".parse().unwrap();
        assert!(default_port.allows(&"http://example.com/".parse().unwrap()));
        assert!(!default_port.allows(&"https://example.com/".parse().unwrap()));
        for bad in [
            "",
            "http://example.com",
            "user@example.com",
            "host:port",
            "a b",
            ":80",
        ] {
            assert!(bad.parse::<OutboundAuthority>().is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn parsing_never_panics(value in "\\PC*") {
            let _ = value.parse::<OutboundAuthority>();
        }

        #[test]
        fn host_and_port_allow_exactly_that(
            host in "[a-zA-Z][a-zA-Z0-9-]{0,20}(\\.[a-z]{2,6}){0,2}",
            port in 0u16..u16::MAX,
        ) {
            let allowed: OutboundAuthority = format!("{host}:{port}").parse().unwrap();
            prop_assert!(allowed.allows(&uri(&host.to_ascii_uppercase(), port)));
            prop_assert!(!allowed.allows(&uri(&host, port + 1)));
            let other_host = format!("x{host}");
            prop_assert!(!allowed.allows(&uri(&other_host, port)));
        }
    }
}
