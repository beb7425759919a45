//! Request bodies as the guest reads them: the size limit for a body
//! without a declared length (hyper holds one with a `Content-Length` to
//! it), and a minimum-progress rule for every body.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
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

/// A request body that fails once more than `remaining` bytes arrive (for
/// a body without a declared length), or once the guest has waited
/// `pause` for the next piece of it.
pub struct RequestBody {
    inner: Incoming,
    remaining: Option<u64>,
    pause: Duration,
    waiting: Option<Pin<Box<Sleep>>>,
    verdict: Verdict,
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
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
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

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
