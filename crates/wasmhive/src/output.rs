//! Guest stdout and stderr: written through to the host's in whole lines,
//! each prefixed with the instance and request it comes from.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// A partial line longer than this is written out as a line of its own.
const MAX_LINE: usize = 16 * 1024;

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
}

impl GuestOutput {
    pub(crate) fn new(stream: Stream, label: Arc<Label>) -> Self {
        GuestOutput(Arc::new(Lines {
            stream,
            label,
            pending: Mutex::new(Vec::new()),
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
    /// Writes one whole `line` (ending in a newline), prefixed, in a single
    /// write under the host stream's lock.
    fn emit(&self, line: &[u8]) -> std::io::Result<()> {
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
        out.extend_from_slice(line);
        match self.stream {
            Stream::Stdout => std::io::stdout().lock().write_all(&out),
            Stream::Stderr => std::io::stderr().lock().write_all(&out),
        }
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
}
