"""A `wasi:http/proxy` app in Python, packaged by componentize-py.

Routes:

- `GET /`                  -> 200 `hello from python\\n`
- `POST /echo`             -> 200, the request body streamed back chunk by chunk
- `GET /env?name=KEY`      -> 200 with the value of KEY (`wasi:cli/environment`), or 404
- `GET /fetch?url=URL`     -> the upstream status and body of an outbound GET
                              (`wasi:http/outgoing-handler`), or 502 with the error code
- anything else            -> 404 `no route\\n`

`crates/wasmhive-guests/build.rs` builds it into `<target>/guests/python-app/python-app.wasm`.
"""

import os
import re
from urllib.parse import parse_qs, urlsplit

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import outgoing_handler
from wit_world.imports.streams import OutputStream, StreamError_Closed
from wit_world.imports.types import (
    Fields,
    IncomingBody,
    IncomingRequest,
    Method_Get,
    Method_Post,
    OutgoingBody,
    OutgoingRequest,
    OutgoingResponse,
    ResponseOutparam,
    Scheme_Http,
    Scheme_Https,
    Scheme_Other,
)

# The most bytes moved from an input stream at once.
CHUNK = 64 * 1024


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        method = request.method()
        target = urlsplit(request.path_with_query() or "/")
        query = parse_qs(target.query)
        if isinstance(method, Method_Get) and target.path == "/":
            respond(response_out, 200, b"hello from python\n")
        elif isinstance(method, Method_Post) and target.path == "/echo":
            echo(request, response_out)
        elif isinstance(method, Method_Get) and target.path == "/env":
            value = os.environ.get(query.get("name", [""])[0])
            if value is None:
                respond(response_out, 404, b"not set\n")
            else:
                respond(response_out, 200, value.encode())
        elif isinstance(method, Method_Get) and target.path == "/fetch":
            fetch(query.get("url", [""])[0], response_out)
        else:
            respond(response_out, 404, b"no route\n")


def echo(request: IncomingRequest, response_out: ResponseOutparam) -> None:
    """Sends the response head at once, then copies the body as it arrives."""
    body = request.consume()
    response = OutgoingResponse(Fields.from_list([("content-type", b"application/octet-stream")]))
    out_body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    copy_body(body, out_body)


def fetch(url: str, response_out: ResponseOutparam) -> None:
    """GETs `url` and answers with the upstream status and body, or 502."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        respond(response_out, 400, b"usage: /fetch?url=http://host:port/path\n")
        return
    request = OutgoingRequest(Fields())
    request.set_method(Method_Get())
    request.set_scheme(
        {"http": Scheme_Http(), "https": Scheme_Https()}.get(parts.scheme, Scheme_Other(parts.scheme))
    )
    request.set_authority(parts.netloc)
    request.set_path_with_query(parts.path + ("?" + parts.query if parts.query else "") or "/")
    try:
        future = outgoing_handler.handle(request, None)
    except Err as e:
        respond(response_out, 502, error_text(e.value).encode())
        return
    with future.subscribe() as ready:
        ready.block()
    result = future.get()
    # get() is some(ok(inner)) once ready; inner is the response or its error code.
    if isinstance(result, Ok) and isinstance(result.value, Err):
        respond(response_out, 502, error_text(result.value.value).encode())
        return
    upstream = result.value.value
    response = OutgoingResponse(Fields.from_list([("content-type", b"application/octet-stream")]))
    response.set_status_code(upstream.status())
    out_body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    copy_body(upstream.consume(), out_body)


def copy_body(body: IncomingBody, out_body: OutgoingBody) -> None:
    """Streams `body` into `out_body` as it arrives, then finishes both.

    Each chunk is moved by the host (`blocking-splice`) instead of being read
    into Python and written back: componentize-py 0.25.1 does not free the
    bytes a Python app passes to an imported function such as
    `output-stream.write`, so an instance that wrote every echoed body
    through Python would leak its size on each request until it traps out of
    memory (after 24 echoes of 5 MiB under a 128 MiB cap).
    """
    with body.stream() as source, out_body.write() as sink:
        while True:
            try:
                sink.blocking_splice(source, CHUNK)
            except Err as e:
                if isinstance(e.value, StreamError_Closed):
                    break
                raise
        sink.blocking_flush()
    OutgoingBody.finish(out_body, None)


def write_all(sink: OutputStream, data: bytes) -> None:
    """Writes all of `data`, waiting whenever the stream has no room."""
    view = memoryview(data)
    while view:
        room = sink.check_write()
        if room == 0:
            with sink.subscribe() as ready:
                ready.block()
            continue
        sink.write(bytes(view[:room]))
        view = view[room:]


def respond(response_out: ResponseOutparam, status: int, body: bytes) -> None:
    """Sends a complete `text/plain` response."""
    response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
    response.set_status_code(status)
    out_body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with out_body.write() as sink:
        write_all(sink, body)
        sink.blocking_flush()
    OutgoingBody.finish(out_body, None)


def error_text(code: object) -> str:
    """The WIT name of an `error-code` case, plus any payload:
    `ErrorCode_HttpRequestDenied()` -> `HTTP-request-denied`."""
    name = type(code).__name__.removeprefix("ErrorCode_")
    words = re.findall(r"[A-Z][a-z]*", name)
    text = "-".join(w.upper() if w in ("Dns", "Tls", "Http", "Uri") else w.lower() for w in words)
    value = getattr(code, "value", None)
    return f"{text}: {value}\n" if value is not None else f"{text}\n"
