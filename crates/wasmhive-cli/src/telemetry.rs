//! Logs (`tracing` to stderr) and metrics (the `metrics` facade, exported in
//! Prometheus text format by the admin endpoint).

use std::time::Duration;

use metrics::{
    Label, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use wasmhive::{InstanceReport, Recorder, RequestReport, Stats};

use crate::args::LogFormat;

/// The format logging was set up with, for the lines written outside it.
static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Writes a line that must come out whatever `RUST_LOG` says (the address
/// line): plain text, or with `--log-format json` a JSON object like every
/// other line.
pub fn announce(line: &str) {
    write_line("INFO", line, line);
}

/// How the address line starts (`Serving HTTP on http://` or `Serving
/// HTTPS on https://`); tests and a supervisor look for it.
pub const SERVING: &str = "Serving HTTP";

/// Writes the address line: the first a server writes, once it listens.
pub fn announce_address(addr: std::net::SocketAddr, tls: bool) {
    announce(&match tls {
        false => format!("{SERVING} on http://{addr}/"),
        true => format!("{SERVING}S on https://{addr}/"),
    });
}

/// Writes a warning the process exits right after, as [`announce`] does
/// (the log's writer may not get to flush).
pub fn announce_warning(line: &str) {
    write_line("WARN", line, line);
}

/// Writes the error a command ends with, as [`announce`] does.
pub fn announce_error(error: &anyhow::Error) {
    let message = format!("{error:#}");
    write_line("ERROR", &message, &format!("error: {message}"));
}

fn write_line(level: &str, message: &str, plain: &str) {
    if FORMAT.get() == Some(&LogFormat::Json) {
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        let object = serde_json::json!({
            "timestamp": now.to_string(),
            "level": level,
            "fields": { "message": message },
        });
        eprintln!("{object}");
    } else {
        eprintln!("{plain}");
    }
}

/// Log lines waiting for stderr beyond which new ones are dropped (and
/// counted in `wasmhive_log_lines_dropped_total`).
const LOG_QUEUE_LINES: usize = 16 * 1024;

/// Log lines dropped because stderr did not keep up.
static LOG_DROPS: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// Installs the global `tracing` subscriber: stderr, filtered by `RUST_LOG`
/// (default `info`). Lines go to stderr from a thread of their own through
/// a bounded queue, and are dropped when it is full: a stderr that blocks
/// (a pipe nobody reads) must not stop the threads that serve requests,
/// and clients can make warnings cheaply. Keep the guard until exit: it
/// writes out what is queued when dropped.
pub fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let _ = FORMAT.set(format);
    // wasmtime's cache warns when two processes store the same compiled
    // component at once, which is harmless (one of them wins).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,wasmtime_internal_cache=error"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("wasmhive-log")
        .finish(std::io::stderr());
    let _ = LOG_DROPS.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

/// Seconds buckets for every histogram: 100 us to 30 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// How often histogram samples are folded into their buckets when no
/// scrape does it.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the global metrics recorder and describes wasmhive's metrics.
///
/// Must be called within a tokio runtime: the recorder keeps every
/// histogram sample until a scrape or an upkeep folds it into its buckets
/// (about 50 bytes a request), so a task folds them every
/// [`UPKEEP_INTERVAL`] for a server whose admin endpoint nobody scrapes.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)?
        .install_recorder()?;
    tokio::spawn({
        let handle = handle.clone();
        async move {
            let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
            upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                upkeep.tick().await;
                handle.run_upkeep();
            }
        }
    });
    describe_counter!(
        "wasmhive_http_requests_total",
        "HTTP requests answered, by status code"
    );
    describe_histogram!(
        "wasmhive_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from a request's arrival to its response head"
    );
    describe_histogram!(
        "wasmhive_queue_wait_seconds",
        metrics::Unit::Seconds,
        "Time a request waited for an instance"
    );
    describe_histogram!(
        "wasmhive_instantiation_seconds",
        metrics::Unit::Seconds,
        "Time to create an instance"
    );
    describe_counter!(
        "wasmhive_instance_exits_total",
        "Instances ended, by reason"
    );
    describe_counter!("wasmhive_instantiations_total", "Instances created");
    describe_counter!(
        "wasmhive_requests_started_total",
        "Requests handed to a guest"
    );
    describe_counter!(
        "wasmhive_instantiation_failures_total",
        "Failed attempts to create an instance"
    );
    describe_counter!(
        "wasmhive_overloaded_total",
        "Requests refused with 503 because the pool and its queue were full"
    );
    describe_gauge!("wasmhive_instances_live", "Instances alive, busy or idle");
    describe_gauge!(
        "wasmhive_instances_available",
        "Instances with spare capacity (idle ones, and busy ones below their concurrency)"
    );
    describe_gauge!(
        "wasmhive_requests_queued",
        "Requests waiting for an instance"
    );
    describe_gauge!(
        "wasmhive_connections_open",
        "Client connections open on the HTTP listener"
    );
    describe_counter!(
        "wasmhive_client_share_refused_total",
        "Connections closed and requests answered 503 because their client address had its share (what: connection, request)"
    );
    describe_gauge!(
        "wasmhive_client_places_for_retired_instances",
        "Places of client shares charged, beyond each request's own, for retired instances that requests of those clients keep alive"
    );
    describe_counter!(
        "wasmhive_connections_timed_out_total",
        "Connections closed with nothing in flight for the header timeout"
    );
    describe_counter!(
        "wasmhive_connections_send_timed_out_total",
        "Connections closed because their client took none of a response for the send timeout"
    );
    describe_counter!(
        "wasmhive_connections_closed_for_resets_total",
        "Connections closed because their client reset more requests than it let finish"
    );
    describe_counter!(
        "wasmhive_log_lines_dropped_total",
        "Log lines dropped because stderr did not take them fast enough"
    );
    describe_gauge!(
        "wasmhive_runtime_tasks_alive",
        "Tokio tasks alive in the server process (connections, requests, instances)"
    );
    Ok(handle)
}

/// Counts an answered request and its duration; `app` labels them with
/// the app that answered (empty for the one app of the command line, or
/// for a request no app serves).
pub fn record_response(status: u16, elapsed: Duration, app: &[Label]) {
    let status = status_label(status);
    if app.is_empty() {
        // The one app of the command line: nothing to allocate.
        histogram!("wasmhive_http_request_duration_seconds").record(elapsed);
        counter!("wasmhive_http_requests_total", "status" => status).increment(1);
        return;
    }
    let mut labels = app.to_vec();
    histogram!("wasmhive_http_request_duration_seconds", labels.clone()).record(elapsed);
    labels.push(Label::new("status", status));
    counter!("wasmhive_http_requests_total", labels).increment(1);
}

/// The process's own gauges and totals, just before a scrape renders them.
pub fn record_process() {
    counter!("wasmhive_guest_output_dropped_total").absolute(wasmhive::dropped_output_lines());
    if let Some(drops) = LOG_DROPS.get() {
        counter!("wasmhive_log_lines_dropped_total").absolute(drops.dropped_lines() as u64);
    }
    gauge!("wasmhive_runtime_tasks_alive").set(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks() as f64,
    );
}

/// Copies an app's gauges and totals into the registry with its `labels`,
/// just before a scrape renders them.
pub fn record_stats(stats: &Stats, labels: &[Label]) {
    gauge!("wasmhive_instances_live", labels.to_vec()).set(stats.live_instances as f64);
    counter!("wasmhive_requests_started_total", labels.to_vec()).absolute(stats.requests_started);
    gauge!("wasmhive_instances_available", labels.to_vec()).set(stats.available_instances as f64);
    gauge!("wasmhive_requests_queued", labels.to_vec()).set(stats.queued_requests as f64);
    gauge!("wasmhive_instances_running", labels.to_vec()).set(stats.running_instances as f64);
    gauge!("wasmhive_instances_suspended", labels.to_vec()).set(stats.suspended_instances as f64);
    counter!("wasmhive_time_slices_yielded_total", labels.to_vec()).absolute(stats.yields);
    if let Some(limit) = stats.concurrency_limit {
        gauge!("wasmhive_concurrency_limit", labels.to_vec()).set(limit as f64);
    }
    counter!("wasmhive_instantiations_total", labels.to_vec()).absolute(stats.instantiations);
    counter!("wasmhive_instantiation_failures_total", labels.to_vec())
        .absolute(stats.instantiation_failures);
    counter!("wasmhive_overloaded_total", labels.to_vec()).absolute(stats.overloaded);
    for reason in wasmhive::ExitReason::ALL {
        let mut labels = labels.to_vec();
        labels.push(Label::new("reason", reason.as_str()));
        counter!("wasmhive_instance_exits_total", labels).absolute(stats.exits(reason));
    }
}

/// An app's [`Recorder`]: per-request and per-instance timings into
/// histograms, with the app's labels.
pub struct MetricsRecorder {
    pub labels: Vec<Label>,
}

impl Recorder for MetricsRecorder {
    fn request(&self, report: &RequestReport) {
        if report.incarnation.is_some() {
            histogram!("wasmhive_queue_wait_seconds", self.labels.clone())
                .record(report.queue_wait);
        }
    }

    fn instance(&self, report: &InstanceReport) {
        histogram!("wasmhive_instantiation_seconds", self.labels.clone())
            .record(report.instantiation_time);
        if let Some(error) = &report.error {
            tracing::debug!(
                incarnation = report.incarnation,
                reason = report.reason.as_str(),
                %error,
                "instance ended"
            );
        }
    }
}

/// A static label for common statuses, so the hot path does not allocate.
fn status_label(status: u16) -> metrics::SharedString {
    match status {
        200 => "200".into(),
        204 => "204".into(),
        400 => "400".into(),
        404 => "404".into(),
        413 => "413".into(),
        500 => "500".into(),
        502 => "502".into(),
        503 => "503".into(),
        504 => "504".into(),
        other => other.to_string().into(),
    }
}
