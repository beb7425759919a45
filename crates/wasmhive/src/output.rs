//! Guest stdout and stderr: written through to the host's in whole lines,
//! each prefixed with the instance and request it comes from.
//!
//! Guests never wait for the host's output: lines go to one writer thread
//! per process through a bounded queue. When the host's stdout is slow or
//! blocked (a stalled log shipper), or a guest prints faster than
//! [`LINES_PER_SECOND`], lines are dropped and counted
//! ([`dropped_output_lines`]) instead of stalling a runtime thread. Control
//! characters are escaped, so a guest cannot move the cursor or rewrite a
//! line of someone else's log.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// A partial line longer than this is written out as a line of its own.
const MAX_LINE: usize = 16 * 1024;

/// Lines waiting for the writer thread; beyond it lines are dropped.
const QUEUE: usize = 4096;

/// Lines one instance's stream may write per second (in bursts of as many);
/// beyond it lines are dropped.
pub(crate) const LINES_PER_SECOND: u32 = 1000;

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Guest output lines dropped so far in this process, because the host's
/// output could not keep up or a guest printed past its rate.
pub fn dropped_output_lines() -> u64 {
    DROPPED.load(Relaxed)
}

/// Where lines go: the writer thread's queue.
type Queue = SyncSender<(Stream, Vec<u8>)>;

/// The writer thread's queue, started on first use (`None` if the thread
/// could not be started: lines are then dropped).
fn writer() -> Option<&'static Queue> {
    static WRITER: OnceLock<Option<Queue>> = OnceLock::new();
    WRITER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(Stream, Vec<u8>)>(QUEUE);
            std::thread::Builder::new()
                .name("wasmhive-guest-output".into())
                .spawn(move || {
                    for (stream, line) in rx {
                        let _ = match stream {
                            Stream::Stdout => std::io::stdout().lock().write_all(&line),
                            Stream::Stderr => std::io::stderr().lock().write_all(&line),
                        };
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Who is writing: the instance, and the request it most recently started.
pub(crate) struct Label {
    incarnation: u64,
    request: AtomicU64,
    enabled: bool,
}

impl Label {
    /// The label of instance `incarnation`; `enabled: false` writes no
    /// prefix.
    pub(crate) fn new(incarnation: u64, enabled: bool) -> Self {
        Label {
            incarnation,
            request: AtomicU64::new(0),
            enabled,
        }
    }

    /// The instance has started request `id`.
    pub(crate) fn set_request(&self, id: u64) {
        self.request.store(id, Relaxed);
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// A guest's stdout or stderr, written through to the host's a whole line
/// at a time, each prefixed with `[stdout instance=N request=M]` (when
/// labelling is on), so that lines of concurrent instances never mix. A
/// partial line waits for its end (or the instance's) up to 16 KiB. With
/// concurrent requests in one instance, the request is the most recently
/// started one.
#[derive(Clone)]
pub(crate) struct GuestOutput(Arc<Lines>);

struct Lines {
    stream: Stream,
    label: Arc<Label>,
    pending: Mutex<Vec<u8>>,
    /// Lines it may still write now, and when that was last topped up.
    allowance: Mutex<(f64, Instant)>,
}

impl GuestOutput {
    pub(crate) fn new(stream: Stream, label: Arc<Label>) -> Self {
        GuestOutput(Arc::new(Lines {
            stream,
            label,
            pending: Mutex::new(Vec::new()),
            allowance: Mutex::new((f64::from(LINES_PER_SECOND), Instant::now())),
        }))
    }

    fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        let lines = &self.0;
        let mut pending = lines.pending.lock().unwrap_or_else(|e| e.into_inner());
        for line in whole_lines(&mut pending, bytes) {
            lines.emit(&line)?;
        }
        Ok(())
    }
}

/// Adds `bytes` to the partial line in `pending` and takes out every line
/// now complete (a partial one past [`MAX_LINE`] counts as complete), each
/// ending in a newline.
fn whole_lines(pending: &mut Vec<u8>, bytes: &[u8]) -> Vec<Vec<u8>> {
    pending.extend_from_slice(bytes);
    let mut lines = Vec::new();
    while let Some(end) = pending.iter().position(|b| *b == b'\n') {
        lines.push(pending.drain(..=end).collect());
    }
    if pending.len() > MAX_LINE {
        let mut line = std::mem::take(pending);
        line.push(b'\n');
        lines.push(line);
    }
    lines
}

impl Lines {
    /// Queues one whole `line` (ending in a newline), prefixed and with its
    /// control characters escaped, for the writer thread; drops it if the
    /// queue is full or the stream is over its rate.
    fn emit(&self, line: &[u8]) -> std::io::Result<()> {
        if !self.allowed() {
            DROPPED.fetch_add(1, Relaxed);
            return Ok(());
        }
        let mut out = Vec::with_capacity(line.len() + 48);
        if self.label.enabled {
            let name = match self.stream {
                Stream::Stdout => "stdout",
                Stream::Stderr => "stderr",
            };
            let request = self.label.request.load(Relaxed);
            write!(
                out,
                "[{name} instance={} request={request}] ",
                self.label.incarnation
            )?;
        }
        escape_into(&mut out, line);
        match writer().map(|writer| writer.try_send((self.stream, out))) {
            Some(Ok(())) | Some(Err(TrySendError::Disconnected(_))) => {}
            Some(Err(TrySendError::Full(_))) | None => {
                DROPPED.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }

    /// Takes one line from the stream's allowance (a token bucket).
    fn allowed(&self) -> bool {
        let mut allowance = self.allowance.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, since) = &mut *allowance;
        let now = Instant::now();
        let rate = f64::from(LINES_PER_SECOND);
        *tokens = (*tokens + now.duration_since(*since).as_secs_f64() * rate).min(rate);
        *since = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Appends `line` to `out` with control characters other than tab and the
/// final newline written as `\xNN`.
fn escape_into(out: &mut Vec<u8>, line: &[u8]) {
    let (body, newline) = match line.split_last() {
        Some((b'\n', body)) => (body, true),
        _ => (line, false),
    };
    for &byte in body {
        if (byte < 0x20 && byte != b'\t') || byte == 0x7f {
            let _ = write!(out, "\\x{byte:02x}");
        } else {
            out.push(byte);
        }
    }
    if newline {
        out.push(b'\n');
    }
}

impl Drop for Lines {
    /// The instance is gone: what it left without a newline is a line too.
    fn drop(&mut self) {
        let pending = self.pending.get_mut().unwrap_or_else(|e| e.into_inner());
        if !pending.is_empty() {
            let mut line = std::mem::take(pending);
            line.push(b'\n');
            let _ = self.emit(&line);
        }
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_all(&bytes)
            .map_err(|e| StreamError::LastOperationFailed(e.into()))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(self.write_all(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_lines_wait_for_their_end_and_long_ones_are_cut() {
        let mut pending = Vec::new();
        assert!(whole_lines(&mut pending, b"hel").is_empty());
        assert_eq!(
            whole_lines(&mut pending, b"lo\nworld\nand"),
            vec![b"hello\n".to_vec(), b"world\n".to_vec()]
        );
        assert_eq!(pending, b"and");
        let long = vec![b'x'; MAX_LINE];
        let lines = whole_lines(&mut pending, &long);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE + 4);
        assert!(lines[0].ends_with(b"x\n") && pending.is_empty());
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut out = Vec::new();
        escape_into(&mut out, b"red \x1b[31m\r\tend\n");
        assert_eq!(out, b"red \\x1b[31m\\x0d\tend\n");
    }
}
