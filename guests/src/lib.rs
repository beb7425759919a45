//! Small helpers shared by the guest components in `components/`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Returns the value of `key` in the query part of `path_with_query`
/// (`/path?key=value&other=1`), if present.
pub fn query_param<'a>(path_with_query: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = path_with_query.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(k, v)| (k == key).then_some(v))
}

/// Returns the path part of `path_with_query`, without the query.
pub fn path(path_with_query: &str) -> &str {
    path_with_query
        .split_once('?')
        .map_or(path_with_query, |(path, _)| path)
}

/// A per-instance request counter: the first call returns 1. Because it lives
/// in the instance's linear memory, it shows whether an instance was reused.
pub fn next_count() -> u64 {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    COUNT.fetch_add(1, Ordering::Relaxed) + 1
}

/// The response headers an echo guest sends for a request: `x-echo-method`,
/// `x-echo-scheme` and `x-echo-authority` (`-` when absent), `x-echo-path`
/// (path and query), each request header again as `x-echo-header-NAME`,
/// and the request's `content-type`.
pub fn echo_headers(
    method: String,
    scheme: Option<String>,
    authority: Option<String>,
    path_with_query: String,
    request_headers: Vec<(String, Vec<u8>)>,
) -> Vec<(String, Vec<u8>)> {
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".into()).into_bytes();
    let mut headers = vec![
        ("x-echo-method".to_string(), method.into_bytes()),
        ("x-echo-scheme".to_string(), or_dash(scheme)),
        ("x-echo-authority".to_string(), or_dash(authority)),
        ("x-echo-path".to_string(), path_with_query.into_bytes()),
    ];
    for (name, value) in request_headers {
        if name == "content-type" {
            headers.push((name.clone(), value.clone()));
        }
        headers.push((format!("x-echo-header-{name}"), value));
    }
    headers
}

/// What a fault guest does for a request, chosen by the request path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fault {
    /// `/trap`: execute `unreachable` before responding.
    Trap,
    /// `/trap-after-headers`: send headers and part of the body, then trap.
    TrapAfterHeaders,
    /// `/hang-after-headers`: send headers and part of the body, then wait
    /// forever without using the CPU.
    HangAfterHeaders,
    /// `/spin`: loop forever on the CPU.
    Spin,
    /// `/hang`: wait forever without using the CPU.
    Hang,
    /// `/oom`: grow linear memory until allocation fails.
    Oom,
    /// `/panic`: a Rust panic (an abort, hence a trap, in wasm).
    Panic,
    /// `/stack-overflow`: unbounded recursion.
    StackOverflow,
    /// Any other path: respond `200 ok`.
    None,
}

impl Fault {
    /// The fault named by the path of `path_with_query`.
    pub fn from_path(path_with_query: &str) -> Fault {
        match path(path_with_query) {
            "/trap" => Fault::Trap,
            "/trap-after-headers" => Fault::TrapAfterHeaders,
            "/hang-after-headers" => Fault::HangAfterHeaders,
            "/spin" => Fault::Spin,
            "/hang" => Fault::Hang,
            "/oom" => Fault::Oom,
            "/panic" => Fault::Panic,
            "/stack-overflow" => Fault::StackOverflow,
            _ => Fault::None,
        }
    }

    /// Runs the faults that need no I/O: they never return. `Hang`,
    /// `TrapAfterHeaders` and `HangAfterHeaders` depend on the world and are
    /// left to the caller.
    pub fn run_cpu_fault(self) {
        match self {
            Fault::Trap => std::process::abort(),
            Fault::Spin => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            Fault::Oom => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Touch every page so the memory is really committed.
                    hoard.push(vec![1u8; 1 << 20]);
                }
            }
            Fault::Panic => panic!("the fault guest panicked on purpose"),
            Fault::StackOverflow => {
                std::hint::black_box(recurse(std::hint::black_box(1)));
            }
            Fault::TrapAfterHeaders | Fault::HangAfterHeaders | Fault::Hang | Fault::None => {}
        }
    }
}

// Recursing forever is the point: this is the stack-overflow fault.
#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    let buf = std::hint::black_box([n; 64]);
    recurse(buf[(n % 64) as usize] + 1) + buf[0]
}

/// The text of `method`, a value of either world's generated `Method` type
/// (`$Method`): they have the same variants.
macro_rules! method_text {
    ($method:expr, $Method:ident) => {
        match $method {
            $Method::Get => "GET".into(),
            $Method::Head => "HEAD".into(),
            $Method::Post => "POST".into(),
            $Method::Put => "PUT".into(),
            $Method::Delete => "DELETE".into(),
            $Method::Connect => "CONNECT".into(),
            $Method::Options => "OPTIONS".into(),
            $Method::Trace => "TRACE".into(),
            $Method::Patch => "PATCH".into(),
            $Method::Other(other) => other,
        }
    };
}

/// `headers` with `content-type: text/plain` unless they have one.
fn text_plain_unless_typed(mut headers: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    if !headers.iter().any(|(k, _)| k == "content-type") {
        headers.push(("content-type".into(), b"text/plain".to_vec()));
    }
    headers
}

/// Helpers for WASIp2 (`wasi:http/proxy`) guests.
pub mod p2 {
    use std::io::Write as _;
    use wasip2::http::types::{
        Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
    };

    /// The request's method as text.
    pub fn method(request: &IncomingRequest) -> String {
        method_text!(request.method(), Method)
    }

    /// Sends a complete `text/plain` response with `status` and `body`.
    pub fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
        respond_with_headers(out, status, Vec::new(), body);
    }

    /// Sends a complete response with `status`, the extra `headers` and
    /// `body` (`text/plain` unless the headers say otherwise).
    pub fn respond_with_headers(
        out: ResponseOutparam,
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        body: &[u8],
    ) {
        let out_body = start_response(out, status, headers);
        let mut stream = out_body.write().unwrap();
        stream.write_all(body).unwrap();
        stream.flush().unwrap();
        drop(stream);
        OutgoingBody::finish(out_body, None).unwrap();
    }

    /// Sends the head of a `text/plain` response with `status` and the extra
    /// `headers`, and returns the body to write.
    pub fn start_response(
        out: ResponseOutparam,
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
    ) -> OutgoingBody {
        let headers = super::text_plain_unless_typed(headers);
        let response = OutgoingResponse::new(Fields::from_list(&headers).unwrap());
        response.set_status_code(status).unwrap();
        let body = response.body().unwrap();
        ResponseOutparam::set(out, Ok(response));
        body
    }
}

/// Helpers for WASIp3 (`wasi:http/service`) guests.
pub mod p3 {
    use wasip3::http::types::{ErrorCode, Fields, Method, Request, Response};
    use wasip3::wit_bindgen::StreamWriter;
    use wasip3::{wit_future, wit_stream};

    /// The request's method as text.
    pub fn method(request: &Request) -> String {
        method_text!(request.get_method(), Method)
    }

    /// A `text/plain` response with `status`, the extra `headers`, and a body
    /// stream the caller writes to (dropping the writer ends the body).
    pub fn streaming_response(
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
    ) -> (Response, StreamWriter<u8>) {
        let headers = super::text_plain_unless_typed(headers);
        let (body_tx, body_rx) = wit_stream::new();
        let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
        drop(trailers_tx);
        let (response, _sent) = Response::new(
            Fields::from_list(&headers).unwrap(),
            Some(body_rx),
            trailers_rx,
        );
        response.set_status_code(status).unwrap();
        (response, body_tx)
    }

    /// Copies `input` to `output` chunk by chunk as it arrives, until
    /// `input` ends or `output`'s reader is dropped.
    pub async fn pipe(
        mut input: wasip3::wit_bindgen::StreamReader<u8>,
        mut output: StreamWriter<u8>,
    ) {
        loop {
            let (result, chunk) = input.read(Vec::with_capacity(64 * 1024)).await;
            // Leftovers mean the reader went away (the client, say); writing
            // again after that would trap.
            if !chunk.is_empty() && !output.write_all(chunk).await.is_empty() {
                break;
            }
            if !matches!(result, wasip3::wit_bindgen::StreamResult::Complete(_)) {
                break;
            }
        }
    }

    /// A `200` whose body is `request`'s, streamed back as it arrives.
    pub fn echo(request: Request) -> Result<Response, ErrorCode> {
        let (done_tx, done_rx) = wit_future::new(|| Ok(()));
        let (input, _trailers) = Request::consume_body(request, done_rx);
        let (response, output) = streaming_response(200, Vec::new());
        wasip3::spawn_local(async move {
            pipe(input, output).await;
            drop(done_tx);
        });
        Ok(response)
    }

    /// A complete `text/plain` response with `status` and `body`, written by a
    /// task that outlives the handler call.
    pub fn respond(status: u16, body: Vec<u8>) -> Result<Response, ErrorCode> {
        let (response, mut body_tx) = streaming_response(status, Vec::new());
        wasip3::spawn_local(async move {
            body_tx.write_all(body).await;
        });
        Ok(response)
    }
}
