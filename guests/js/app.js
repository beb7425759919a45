// A `wasi:http/proxy` app in JavaScript, packaged by componentize-js.
//
// Routes:
//
// - `GET /`              -> 200 `hello from javascript\n`
// - `POST /echo`         -> 200, the request body streamed back chunk by chunk
// - `GET /env?name=KEY`  -> 200 with the value of KEY (`wasi:cli/environment`), or 404
// - `GET /fetch?url=URL` -> the upstream status and body of an outbound GET
//                           (`wasi:http/outgoing-handler`), or 502 with the error code
// - anything else        -> 404 `no route\n`
//
// It exports `incomingHandler` itself rather than using a `fetch` event
// listener: with componentize-js 0.23 a fetch-event handler cannot serve a
// second request on the same instance.
//
// `crates/wasmhive-guests/build.rs` builds it into `<target>/guests/js-app/js-app.wasm`.

import { getEnvironment } from 'wasi:cli/environment@0.2.12';
import { handle as sendRequest } from 'wasi:http/outgoing-handler@0.2.12';
import {
  Fields,
  OutgoingBody,
  OutgoingRequest,
  OutgoingResponse,
  ResponseOutparam,
} from 'wasi:http/types@0.2.12';

// The most bytes asked of an input stream at once.
const CHUNK = 64n * 1024n;

const encoder = new TextEncoder();

export const incomingHandler = {
  handle(request, responseOut) {
    const method = request.method().tag;
    const target = new URL(request.pathWithQuery() ?? '/', 'http://localhost');
    if (method === 'get' && target.pathname === '/') {
      respond(responseOut, 200, 'hello from javascript\n');
    } else if (method === 'post' && target.pathname === '/echo') {
      echo(request, responseOut);
    } else if (method === 'get' && target.pathname === '/env') {
      const name = target.searchParams.get('name');
      const entry = getEnvironment().find(([key]) => key === name);
      if (entry === undefined) {
        respond(responseOut, 404, 'not set\n');
      } else {
        respond(responseOut, 200, entry[1]);
      }
    } else if (method === 'get' && target.pathname === '/fetch') {
      fetchUpstream(target.searchParams.get('url') ?? '', responseOut);
    } else {
      respond(responseOut, 404, 'no route\n');
    }
  },
};

/** Sends the response head at once, then copies the body as it arrives. */
function echo(request, responseOut) {
  const body = request.consume();
  const response = new OutgoingResponse(headers('application/octet-stream'));
  const outBody = response.body();
  ResponseOutparam.set(responseOut, { tag: 'ok', val: response });
  copyBody(body, outBody);
}

/** GETs `url` and answers with the upstream status and body, or 502. */
function fetchUpstream(url, responseOut) {
  let parts;
  try {
    parts = new URL(url);
  } catch {
    respond(responseOut, 400, 'usage: /fetch?url=http://host:port/path\n');
    return;
  }
  const request = new OutgoingRequest(new Fields());
  request.setMethod({ tag: 'get' });
  const scheme = parts.protocol.slice(0, -1);
  request.setScheme(
    scheme === 'http' || scheme === 'https'
      ? { tag: scheme.toUpperCase() }
      : { tag: 'other', val: scheme },
  );
  request.setAuthority(parts.host);
  request.setPathWithQuery(parts.pathname + parts.search);
  let future;
  try {
    future = sendRequest(request, undefined);
  } catch (e) {
    respond(responseOut, 502, errorText(e.payload ?? e));
    return;
  }
  const ready = future.subscribe();
  ready.block();
  ready[Symbol.dispose]();
  // get() is some(ok(inner)) once ready; inner is the response or its error code.
  const inner = future.get().val;
  if (inner.tag === 'err') {
    respond(responseOut, 502, errorText(inner.val));
    return;
  }
  const upstream = inner.val;
  const response = new OutgoingResponse(headers('application/octet-stream'));
  response.setStatusCode(upstream.status());
  const outBody = response.body();
  ResponseOutparam.set(responseOut, { tag: 'ok', val: response });
  copyBody(upstream.consume(), outBody);
}

/** Streams `body` into `outBody` chunk by chunk, then finishes both. */
function copyBody(body, outBody) {
  const source = body.stream();
  const sink = outBody.write();
  for (;;) {
    let chunk;
    try {
      chunk = source.blockingRead(CHUNK);
    } catch (e) {
      if (e.payload?.tag === 'closed') break;
      throw e;
    }
    writeAll(sink, chunk);
  }
  sink.blockingFlush();
  source[Symbol.dispose]();
  sink[Symbol.dispose]();
  OutgoingBody.finish(outBody, undefined);
}

/** Writes all of `data`, waiting whenever the stream has no room. */
function writeAll(sink, data) {
  while (data.length > 0) {
    const room = Number(sink.checkWrite());
    if (room === 0) {
      const ready = sink.subscribe();
      ready.block();
      ready[Symbol.dispose]();
      continue;
    }
    sink.write(data.subarray(0, room));
    data = data.subarray(room);
  }
}

/** Sends a complete `text/plain` response. */
function respond(responseOut, status, text) {
  const response = new OutgoingResponse(headers('text/plain'));
  response.setStatusCode(status);
  const outBody = response.body();
  ResponseOutparam.set(responseOut, { tag: 'ok', val: response });
  const sink = outBody.write();
  writeAll(sink, encoder.encode(text));
  sink.blockingFlush();
  sink[Symbol.dispose]();
  OutgoingBody.finish(outBody, undefined);
}

function headers(contentType) {
  return Fields.fromList([['content-type', encoder.encode(contentType)]]);
}

/** The WIT name of an `error-code` case, plus any payload:
 * `{ tag: 'HTTP-request-denied' }` -> `HTTP-request-denied`. */
function errorText(code) {
  if (code?.tag === undefined) return `${code}\n`;
  if (code.val === undefined) return `${code.tag}\n`;
  const payload = JSON.stringify(code.val, (_, v) => (typeof v === 'bigint' ? `${v}` : v));
  return `${code.tag}: ${payload}\n`;
}
