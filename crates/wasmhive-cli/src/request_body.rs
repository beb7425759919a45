//! Request bodies as the guest reads them: the size limit for a body
//! without a declared length (hyper holds one with a `Content-Length` to
//! it), a minimum-progress rule for every body, and small pieces gathered
//! into larger ones.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;
use wasmhive::BodyError;

/// Why a request body was cut off, if it was: read by the server once the
/// guest has answered, to answer `413`, `408` or `400` in its place.
#[derive(Clone, Default)]
pub struct Verdict(Arc<AtomicU8>);

/// What [`Verdict::get`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutOff {
    /// More bytes than the limit arrived.
    TooLarge,
    /// The client paused longer than the body timeout.
    TooSlow,
    /// The client sent a malformed body (a bad chunk), or went away before
    /// sending all of it.
    Broken,
}

impl Verdict {
    const TOO_LARGE: u8 = 1;
    const TOO_SLOW: u8 = 2;
    const BROKEN: u8 = 3;

    /// Whether, and why, the body was cut off.
    pub fn get(&self) -> Option<CutOff> {
        match self.0.load(Relaxed) {
            Self::TOO_LARGE => Some(CutOff::TooLarge),
            Self::TOO_SLOW => Some(CutOff::TooSlow),
            Self::BROKEN => Some(CutOff::Broken),
            _ => None,
        }
    }

    /// Records the first fault; a later one does not replace it.
    fn set(&self, value: u8) {
        let _ = self.0.compare_exchange(0, value, Relaxed, Relaxed);
    }
}

/// A piece of a body at least this large goes to the guest as it is.
const SMALL_PIECE: usize = 8 * 1024;

/// Smaller pieces are gathered up to this many bytes...
const GATHER_UP_TO: usize = 64 * 1024;

/// ...or for at most this long after the first of them arrived, while no
/// more is at hand. A client sending a body a byte per chunk otherwise
/// costs a guest wake-up per byte: two such uploads kept a p3 guest
/// computing on every worker thread and everyone else waiting.
const GATHER_FOR: Duration = Duration::from_millis(1);

/// A request body that fails once more than `remaining` bytes arrive (for
/// a body without a declared length), or once the guest has waited
/// `pause` for the next piece of it. Pieces smaller than [`SMALL_PIECE`]
/// are gathered (see [`GATHER_FOR`]).
pub struct RequestBody {
    inner: Incoming,
    remaining: Option<u64>,
    pause: Duration,
    waiting: Option<Pin<Box<Sleep>>>,
    verdict: Verdict,
    /// Small pieces gathered so far.
    gathered: BytesMut,
    /// When the gathered pieces go to the guest, more or not.
    gathering: Option<Pin<Box<Sleep>>>,
    /// What came after the gathered pieces (trailers, an error, the end),
    /// for the poll after they went out.
    next: Option<Option<Result<Frame<Bytes>, BodyError>>>,
}

impl RequestBody {
    /// `inner`, limited to `limit` bytes if given, and to pauses of
    /// `pause`; how it was cut off, if it was, goes to `verdict`.
    pub fn new(inner: Incoming, limit: Option<u64>, pause: Duration, verdict: Verdict) -> Self {
        RequestBody {
            inner,
            remaining: limit,
            pause,
            waiting: None,
            verdict,
            gathered: BytesMut::new(),
            gathering: None,
            next: None,
        }
    }

    /// The next frame from the client, its size checked against the limit,
    /// and `Pending` past the body timeout failing the body.
    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => {
                self.verdict.set(Verdict::BROKEN);
                return Poll::Ready(Some(Err(error.into())));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {
                if !self.gathered.is_empty() {
                    // The guest has bytes to read, or will within
                    // `GATHER_FOR`: it is not waiting for the client.
                    return Poll::Pending;
                }
                // The guest waits for the client: from now, it may wait
                // `pause` for the next piece.
                let pause = self.pause;
                let waiting = self
                    .waiting
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(pause)));
                if waiting.as_mut().poll(cx).is_ready() {
                    self.verdict.set(Verdict::TOO_SLOW);
                    return Poll::Ready(Some(Err(BodyError::ConnectionReadTimeout)));
                }
                return Poll::Pending;
            }
        };
        self.waiting = None;
        if let (Some(data), Some(remaining)) = (frame.data_ref(), self.remaining) {
            let len = data.len() as u64;
            if len > remaining {
                self.verdict.set(Verdict::TOO_LARGE);
                return Poll::Ready(Some(Err(BodyError::HttpRequestBodySize(None))));
            }
            self.remaining = Some(remaining - len);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    /// The gathered pieces as one frame.
    fn take_gathered(&mut self) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.gathering = None;
        Poll::Ready(Some(Ok(Frame::data(self.gathered.split().freeze()))))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.gathered.is_empty()
            && let Some(next) = this.next.take()
        {
            return Poll::Ready(next);
        }
        loop {
            let frame = match this.poll_inner(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Pending => {
                    if this.gathered.is_empty() {
                        return Poll::Pending;
                    }
                    let gathering = this
                        .gathering
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(GATHER_FOR)));
                    if gathering.as_mut().poll(cx).is_ready() {
                        return this.take_gathered();
                    }
                    return Poll::Pending;
                }
                // Trailers, an error or the end: after what was gathered.
                other if this.gathered.is_empty() => return other,
                Poll::Ready(other) => {
                    this.next = Some(other);
                    return this.take_gathered();
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(trailers) if this.gathered.is_empty() => {
                    return Poll::Ready(Some(Ok(trailers)));
                }
                Err(trailers) => {
                    this.next = Some(Some(Ok(trailers)));
                    return this.take_gathered();
                }
            };
            if this.gathered.is_empty() && (data.len() >= SMALL_PIECE || this.inner.is_end_stream())
            {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            this.gathered.extend_from_slice(&data);
            if this.gathered.len() >= GATHER_UP_TO || this.inner.is_end_stream() {
                return this.take_gathered();
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.gathered.is_empty() && self.next.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let (inner, gathered) = (self.inner.size_hint(), self.gathered.len() as u64);
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + gathered);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + gathered);
        }
        hint
    }
}
