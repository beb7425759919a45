//! The command line: subcommands, flags with their defaults, and the parsers
//! of flag values (addresses, durations, sizes, `KEY=VALUE`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Serve WebAssembly `wasi:http` components (WASIp2 and WASIp3) over HTTP.
#[derive(Parser, Debug)]
#[command(name = "wasmhive", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve a component over HTTP/1.1 and HTTP/2 (h2c, or HTTPS with
    /// --tls-cert). SIGTERM or SIGINT drains and exits; SIGHUP reloads the
    /// component file without dropping a request.
    Serve(Box<ServeArgs>),
    /// Precompile a component for this host, so that `serve` starts without
    /// compiling it.
    Compile(CompileArgs),
}

/// `wasmhive serve`.
#[derive(Args, Clone, Debug)]
// A flag given twice takes its last value: the supervisor of --workers
// appends what it changes to the command line it was given.
#[command(args_override_self = true)]
pub struct ServeArgs {
    /// The component to serve: a `.wasm` component exporting
    /// `wasi:http/incoming-handler@0.2` or `wasi:http/handler@0.3`, or a
    /// `.cwasm` from `wasmhive compile` (with `--allow-precompiled`).
    /// Without one, the bundled demo app.
    #[arg(conflicts_with = "config")]
    pub component: Option<PathBuf>,

    /// Serve the apps of this manifest (TOML: `[[app]]` tables with `name`,
    /// `component`, `route`, `host` and per-app settings) instead of one
    /// component. See the README's manifest reference.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on; `:PORT` means 127.0.0.1:PORT, and port 0
    /// picks a free one.
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = parse_addr)]
    pub addr: SocketAddr,

    /// Share the port of --addr with other processes started with this
    /// flag (SO_REUSEPORT): the kernel spreads new connections among them.
    /// Run one per core, or start a new version before draining the old.
    #[arg(long)]
    pub reuse_port: bool,

    /// Serve with this many single-threaded worker processes sharing the
    /// port (SO_REUSEPORT), under this one as supervisor: it restarts a
    /// worker that dies, passes signals on, and sums their metrics on
    /// --admin-addr. The global limits (instances, total memory,
    /// connections, queue length, prewarmed instances, per-client shares)
    /// are divided among the workers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,

    /// Serve HTTPS with this certificate chain (PEM, the server's own
    /// certificate first), with the key of --tls-key; ALPN offers HTTP/2
    /// and HTTP/1.1. Refused at start-up if the certificate has expired or
    /// the key is not its key.
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// Instances alive at once, busy or idle.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_instances: u32,

    /// Requests one instance handles at once [default: 1 for WASIp2, 16 for
    /// WASIp3].
    #[arg(long, alias = "max-instance-concurrent-reuse-count", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_per_instance: Option<u32>,

    /// Requests one instance takes in all before it is replaced; 1 gives each
    /// request a fresh instance [default: 1 for WASIp2, 128 for WASIp3].
    #[arg(long, alias = "max-instance-reuse-count", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_reuse: Option<u32>,

    /// How long an instance with nothing to do is kept for reuse.
    #[arg(long, alias = "idle-instance-timeout", default_value = "1s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// How long a request may take to get its response head; past it the
    /// client gets 504 and the instance is retired.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// How long an instance may keep working once its requests are done and
    /// their response bodies read (a task a request left running) before it
    /// is killed; a body a client is still reading is not counted.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub post_return_timeout: Duration,

    /// Requests that may wait for an instance when all are busy; beyond it
    /// requests get 503 at once.
    #[arg(long, default_value_t = 1024)]
    pub queue_len: usize,

    /// How long a request may wait for an instance before it gets 503.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub queue_timeout: Duration,

    /// Idle instances kept ready ahead of requests.
    #[arg(long, default_value_t = 0)]
    pub prewarm: usize,

    /// Limit the requests in flight adaptively, to where latency stays near
    /// its best, and answer the surplus 503 at once. For CPU-bound apps
    /// whose requests take similar times; off by default.
    #[arg(long)]
    pub adaptive_concurrency: bool,

    /// Linear memory one instance may use (e.g. `64MiB`).
    #[arg(long, default_value = "128MiB", value_parser = parse_size)]
    pub max_memory: u64,

    /// Linear memory and tables of all instances together (e.g. `2GiB`);
    /// growth past it fails inside the guest (500), and new instances wait
    /// for memory to be freed [default: half of the machine's memory, or of
    /// the cgroup's limit if lower].
    #[arg(long, value_parser = parse_size)]
    pub max_total_memory: Option<u64>,

    /// Instances running guest code at once when a request starts; an
    /// instance waiting on I/O does not count. Requests beyond it wait in
    /// the queue [default: the server's worker threads].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_running: Option<u32>,

    /// How long a guest may compute without a break while a request of a
    /// client address holding fewer running places waits; then it yields
    /// its place to that request and waits for one again, an address with
    /// fewer places first. One address's requests never yield to each
    /// other.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub time_slice: Duration,

    /// Client connections open at once; further clients wait to be
    /// accepted.
    #[arg(long, alias = "max-concurrent-connections", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Client connections one client address may have open at once; more
    /// are closed at once [default: half of --max-connections].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_client: Option<u32>,

    /// Requests one client address may have in flight (from arrival until
    /// its response body is sent or dropped; the requests keeping a retired
    /// instance alive count as its places between them); more wait up to
    /// --queue-timeout, then get 503 [default: half of --max-instances x
    /// the requests an instance holds at once: --max-concurrent-per-instance,
    /// at most --max-reuse, and 1 for a WASIp2 app].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_requests_per_client: Option<u32>,

    /// Concurrent streams on one HTTP/2 connection; more are refused with
    /// REFUSED_STREAM.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,

    /// Largest request body accepted (e.g. `16MiB`); larger ones get 413.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub max_body_size: u64,

    /// Longest pause a client may take between two pieces of a request
    /// body while the guest waits for it; then the body fails in the guest
    /// and the client gets 408 (if the guest had not answered yet). Keep it
    /// below --request-timeout, or a stalled body ends as 504 instead.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// Longest time a client may take none of a response body (a reader
    /// that stopped, an HTTP/2 window kept shut); then its connection is
    /// closed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub send_timeout: Duration,

    /// How long a client may take to send a request's headers (HTTP/1), and
    /// how long any connection may stay with nothing in flight (HTTP/2
    /// pings do not count) before it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// On SIGINT or SIGTERM, how long in-flight requests may take to finish
    /// before the server exits anyway.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// An environment variable for the component (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,

    /// A host (or host:port) the component may send HTTP requests to
    /// (repeatable); all others are denied.
    #[arg(long = "allow-outbound", value_name = "HOST[:PORT]")]
    pub allow_outbound: Vec<wasmhive::OutboundAuthority>,

    /// Address of the admin endpoint (`/metrics`, `/healthz`, `/readyz`,
    /// `POST /reload`); off unless given.
    #[arg(long, value_parser = parse_addr)]
    pub admin_addr: Option<SocketAddr>,

    /// Log format on stderr; filter with RUST_LOG (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Do not prefix the component's stdout and stderr lines with
    /// `[stdout instance=N request=M]`.
    #[arg(long)]
    pub no_logging_prefix: bool,

    /// Accept a precompiled component (a `.cwasm` from `wasmhive compile`).
    /// It is native code run with the server's rights and not verified:
    /// pass this only for files this host made and nothing else can write.
    #[arg(long)]
    pub allow_precompiled: bool,

    /// Allocate instances on demand instead of from the pooling allocator.
    #[arg(long)]
    pub no_pooling: bool,

    /// Where compiled components are kept between runs, so that a restart
    /// skips compilation; code found there is trusted, so keep it writable
    /// only by the server's user [default: $XDG_CACHE_HOME/wasmhive, or
    /// $HOME/.cache/wasmhive].
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    pub cache_dir: Option<PathBuf>,

    /// Compile the component at every start instead of using the cache.
    #[arg(long)]
    pub no_cache: bool,
}

impl ServeArgs {
    /// The memory budget of all instances, in bytes.
    pub fn max_total_memory(&self) -> u64 {
        self.max_total_memory
            .unwrap_or_else(|| physical_memory().unwrap_or(8 << 30) / 2)
    }

    /// The compilation cache directory the flags and environment ask for.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if self.no_cache {
            return None;
        }
        self.cache_dir.clone().or_else(default_cache_dir)
    }
}

/// `wasmhive compile`.
#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The `.wasm` component to compile.
    pub component: PathBuf,
    /// Where to write the precompiled component [default: COMPONENT with a
    /// `.cwasm` extension].
    #[arg(short, long)]
    pub output: Option<PathBuf>,

    /// The compilation cache directory `serve` will use: what an instance
    /// of the component takes is noted there, so that `serve` loads the
    /// output once [default: $XDG_CACHE_HOME/wasmhive or
    /// $HOME/.cache/wasmhive].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl CompileArgs {
    /// Where to note the component's footprint.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        self.cache_dir.clone().or_else(default_cache_dir)
    }
}

/// The platform's cache directory for wasmhive: $XDG_CACHE_HOME or
/// ~/.cache on Linux.
fn default_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|base| base.join("wasmhive"))
}

/// How log lines are written.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The memory this process may use: the machine's, or its cgroup's limit if
/// lower (Linux); `None` where neither can be read.
fn physical_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|limit| limit.trim().parse::<u64>().ok());
    Some(cgroup.map_or(total_kib * 1024, |limit| limit.min(total_kib * 1024)))
}

/// `HOST:PORT`, or `:PORT` for 127.0.0.1.
pub fn parse_addr(value: &str) -> Result<SocketAddr, String> {
    if let Some(port) = value.strip_prefix(':') {
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("`{port}` is not a port number"))?;
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    value
        .parse()
        .map_err(|_| format!("`{value}` is not an address like 127.0.0.1:8080 or :8080"))
}

/// A human duration: `250ms`, `2s`, `1m 30s`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    // A bare number is seconds, as `wasmtime serve` reads it.
    if let Ok(seconds) = value.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(value)
        .map_err(|e| format!("`{value}` is not a duration like 250ms or 2s ({e})"))
}

/// A size in bytes: `1048576`, `64KiB`, `16MiB`, `1GB`.
pub fn parse_size(value: &str) -> Result<u64, String> {
    value
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|e| format!("`{value}` is not a size like 64MiB ({e})"))
}

/// `KEY=VALUE`, with a non-empty key.
pub fn parse_env(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, val)) if !key.is_empty() => Ok((key.to_string(), val.to_string())),
        _ => Err(format!("`{value}` is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr(":0").unwrap(), "127.0.0.1:0".parse().unwrap());
        assert_eq!(
            parse_addr("0.0.0.0:80").unwrap(),
            "0.0.0.0:80".parse().unwrap()
        );
        assert!(parse_addr(":http").is_err());
        assert!(parse_addr("localhost").is_err());
        assert!(parse_addr(":70000").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        // A bare number is seconds, as `wasmtime serve` reads it.
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("1 KiB").unwrap(), 1024);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn env_pairs() {
        assert_eq!(
            parse_env("A=b=c").unwrap(),
            ("A".to_string(), "b=c".to_string())
        );
        assert_eq!(parse_env("A=").unwrap(), ("A".to_string(), String::new()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("A").is_err());
    }

    #[test]
    fn defaults_parse() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["wasmhive", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(args.max_memory, 128 << 20);
        assert_eq!(args.queue_timeout, Duration::from_secs(2));
        // A stalled body is the client's fault (408), not the guest's (504).
        assert!(args.body_timeout < args.request_timeout);
        let bad = Cli::try_parse_from(["wasmhive", "serve", "--allow-outbound", "http://x"]);
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("is not a host or host:port")
        );
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(value in "\\PC*") {
            let _ = (parse_addr(&value), parse_duration(&value), parse_size(&value), parse_env(&value));
        }

        #[test]
        fn addresses_round_trip(ip: std::net::IpAddr, port: u16) {
            let addr = SocketAddr::new(ip, port);
            proptest::prop_assert_eq!(parse_addr(&addr.to_string()), Ok(addr));
            proptest::prop_assert_eq!(
                parse_addr(&format!(":{port}")),
                Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            );
        }

        #[test]
        fn durations_in_any_unit(n in 0u64..1_000_000_000) {
            proptest::prop_assert_eq!(parse_duration(&format!("{n}ms")), Ok(Duration::from_millis(n)));
            proptest::prop_assert_eq!(parse_duration(&format!("{n}s")), Ok(Duration::from_secs(n)));
            proptest::prop_assert_eq!(parse_duration(&n.to_string()), Ok(Duration::from_secs(n)));
        }

        #[test]
        fn sizes_in_any_unit(n in 0u64..1 << 30) {
            proptest::prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
            proptest::prop_assert_eq!(parse_size(&format!("{n}KiB")), Ok(n << 10));
            proptest::prop_assert_eq!(parse_size(&format!("{n} MiB")), Ok(n << 20));
        }

        #[test]
        fn env_pairs_split_at_the_first_equals(key in "[^=]+", value in ".*") {
            proptest::prop_assert_eq!(
                parse_env(&format!("{key}={value}")),
                Ok((key.clone(), value.clone()))
            );
        }
    }
}
