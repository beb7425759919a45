//! The soak test: a long run of mixed requests against `wasmhive serve`
//! (the `soak-p3` guest) that checks every answer and samples the server's
//! RSS over time. `wasmhive-bench soak --requests 1000000` is the long form;
//! the README test command runs a 20-second one. The server runs with its
//! defaults except one request at a time per instance (instances are still
//! reused, up to 128 requests each) and as many instances as client
//! connections.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt as _;

use crate::guests;
use crate::load::{Target, connect, exchange_body};
use crate::servers::{Binaries, Running, ServerKind, Settings, rss_of};

/// How long and how hard to soak.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    /// Stop after this many requests...
    pub requests: u64,
    /// ...or after this long, whichever comes first.
    pub duration: Duration,
    /// Client connections, each sending requests back to back.
    pub connections: usize,
    /// The share of the run, from its start, that is warm-up: RSS growth is
    /// measured from its end...
    pub warmup_share: f64,
    /// ...but warm-up lasts at least this long: at ~4,000 r/s the server's
    /// RSS levels off within 10-25 s (a 60 s soak, 16 connections: 34.8 MiB
    /// at 6 s, 36.6 at 24 s, 36.7 at 42 and 60 s), as allocator arenas and
    /// pool slots fill, so a 20 s run measured from 5 s would count that
    /// as growth.
    pub min_warmup: Duration,
}

/// The request mix, one entry per percent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Hello,
    Echo,
    Count,
    Trap,
    Abort,
}

impl Kind {
    /// 1% trap, 1% client abort, the rest hello, 64 KiB echo and counter.
    fn of(i: u64) -> Kind {
        match i % 100 {
            0 => Kind::Trap,
            1 => Kind::Abort,
            2..40 => Kind::Hello,
            40..70 => Kind::Echo,
            _ => Kind::Count,
        }
    }
}

const ECHO: usize = 64 * 1024;

/// What a soak saw.
#[derive(Debug)]
pub struct SoakReport {
    /// Requests sent, aborted ones included.
    pub sent: u64,
    /// Answers that were not the expected one, with a description of the
    /// first few.
    pub unexpected: u64,
    pub examples: Vec<String>,
    /// `(seconds since start, RSS bytes)`, once a second.
    pub rss: Vec<(f64, u64)>,
    /// RSS at the end of warm-up and at the end.
    pub rss_after_warmup: u64,
    pub rss_at_end: u64,
    pub elapsed: Duration,
}

impl SoakReport {
    /// RSS growth after warm-up, as a fraction (0.05 is 5%).
    pub fn growth(&self) -> f64 {
        self.rss_at_end as f64 / self.rss_after_warmup.max(1) as f64 - 1.0
    }

    /// A Markdown summary.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "Soak: {} requests in {:.1} s ({:.0} r/s), {} unexpected answers\n\n\
             RSS after warm-up {:.1} MiB, at the end {:.1} MiB: {:+.2}%\n\n\
             | s | RSS MiB |\n|---|---|\n",
            self.sent,
            self.elapsed.as_secs_f64(),
            self.sent as f64 / self.elapsed.as_secs_f64(),
            self.unexpected,
            mib(self.rss_after_warmup),
            mib(self.rss_at_end),
            self.growth() * 100.0,
        );
        let step = (self.rss.len() / 20).max(1);
        for (at, rss) in self.rss.iter().step_by(step) {
            out.push_str(&format!("| {at:.0} | {:.1} |\n", mib(*rss)));
        }
        for example in &self.examples {
            out.push_str(&format!("\nunexpected: {example}"));
        }
        out
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Starts `wasmhive serve` with the soak guest and runs the mix.
pub async fn run(binaries: &Binaries, options: &SoakOptions) -> anyhow::Result<SoakReport> {
    let server = Running::start(
        ServerKind::Wasmhive,
        binaries,
        Path::new(guests::SOAK_P3.path),
        // A trap takes down every request in flight on its instance; with
        // one at a time per instance it takes only its own, so every other
        // answer can be checked.
        &Settings {
            concurrency: Some(1),
            // Metrics on, as in production, but never scraped: what they
            // keep between scrapes must not grow with the requests.
            wasmhive_extra: vec![
                "--admin-addr".into(),
                "127.0.0.1:0".into(),
                // Every pool slot an instance has used keeps its first pages
                // resident (the pool's `keep_resident`), so RSS follows the
                // most instances ever alive at once, counting ended ones
                // whose slots wait in the pool's decommit batch. With room
                // for 256 (or 24), that high-water mark crept up a slot
                // (1 MiB here) or a few at a time through the run (21 slots
                // at 5 s, 27 at 40 s), which the RSS check cannot tell from
                // a leak. With one slot per client connection (each has one
                // request at a time, each instance takes one), all of them
                // are in use within the first second, so growth after
                // warm-up is the server's own.
                "--max-instances".into(),
                options.connections.to_string(),
            ],
            ..Settings::default()
        },
    )?;
    let addr = server.addr;
    let pid = server.pids()[0];
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let unexpected = Arc::new(AtomicU64::new(0));
    let examples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));

    let sampler = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut samples = Vec::new();
            while !stop.load(Relaxed) {
                samples.push((started.elapsed().as_secs_f64(), rss_of(pid).unwrap_or(0)));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            samples
        }
    });
    let echo_body = Bytes::from((0..ECHO).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let clients: Vec<_> = (0..options.connections)
        .map(|_| {
            let (next, unexpected, examples) = (next.clone(), unexpected.clone(), examples.clone());
            let (options, echo_body) = (options.clone(), echo_body.clone());
            tokio::spawn(async move {
                let mut sender = None;
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i >= options.requests || started.elapsed() >= options.duration {
                        return;
                    }
                    let kind = Kind::of(i);
                    if kind == Kind::Abort {
                        abort(addr).await;
                        continue;
                    }
                    if sender.is_none() {
                        sender = connect(addr).await;
                    }
                    let target = Target {
                        addr,
                        path: match kind {
                            Kind::Hello => "/hello",
                            Kind::Echo => "/echo",
                            Kind::Count => "/count",
                            Kind::Trap | Kind::Abort => "/trap",
                        }
                        .into(),
                        body: (kind == Kind::Echo).then(|| echo_body.clone()),
                    };
                    let answer = match sender.as_mut() {
                        Some(sender) => exchange_body(sender, &target).await,
                        None => None,
                    };
                    if answer.is_none() {
                        sender = None;
                    }
                    if let Some(problem) = check(kind, answer, &echo_body) {
                        unexpected.fetch_add(1, Relaxed);
                        let mut examples = examples.lock().unwrap();
                        if examples.len() < 5 {
                            examples.push(format!("request {i} ({kind:?}): {problem}"));
                        }
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await?;
    }
    let elapsed = started.elapsed();
    stop.store(true, Relaxed);
    let rss = sampler.await?;
    let warm_until =
        (elapsed.as_secs_f64() * options.warmup_share).max(options.min_warmup.as_secs_f64());
    let warm = rss
        .iter()
        .position(|(at, _)| *at >= warm_until)
        .unwrap_or(rss.len().saturating_sub(1));
    let examples = examples.lock().unwrap().clone();
    Ok(SoakReport {
        sent: next.load(Relaxed).min(options.requests),
        unexpected: unexpected.load(Relaxed),
        examples,
        rss_after_warmup: rss.get(warm).map_or(0, |s| s.1),
        rss_at_end: rss.last().map_or(0, |s| s.1),
        rss,
        elapsed,
    })
}

/// What is wrong with `answer` to a request of `kind`, if anything.
fn check(kind: Kind, answer: Option<(u16, Bytes)>, echo_body: &Bytes) -> Option<String> {
    let Some((status, body)) = answer else {
        return Some("no answer".into());
    };
    let ok = match kind {
        Kind::Hello => status == 200 && body == "hello\n",
        Kind::Echo => status == 200 && body == *echo_body,
        Kind::Count => {
            status == 200
                && std::str::from_utf8(&body)
                    .ok()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n >= 1)
        }
        Kind::Trap => status == 500,
        Kind::Abort => true,
    };
    (!ok).then(|| {
        format!(
            "{status} {:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        )
    })
}

/// A client that announces a 64 KiB echo, sends half of it and goes away.
async fn abort(addr: std::net::SocketAddr) {
    if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
        let head = format!("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: {ECHO}\r\n\r\n");
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(&vec![b'x'; ECHO / 2]).await;
    }
}
