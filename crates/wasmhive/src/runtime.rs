//! [`Runtime`]: the wasmtime engine wasmhive runs components on, with its
//! epoch ticker, and loading components into it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Component;
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
    Precompiled,
};

/// How to build a [`Runtime`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Use wasmtime's pooling allocator (instances in pre-reserved slots,
    /// linear memory reset copy-on-write): instantiation in microseconds, at
    /// the price of reserving virtual address space up front. If it cannot
    /// be reserved, the runtime falls back to on-demand allocation.
    /// Default: true.
    pub pooling: bool,
    /// Instances the pooling allocator has room for; keep it at least
    /// [`PoolLimits::max_instances`](crate::PoolLimits). Default: 256.
    pub max_instances: usize,
    /// Largest linear memory of one instance, in bytes: the pool's slot size
    /// (enforced per instance by [`Limits::max_memory`](crate::Limits)).
    /// Default: 128 MiB.
    pub max_memory: usize,
    /// How often the engine's epoch advances. A running guest yields to the
    /// host at every tick, which is what lets the instance-level deadline cut
    /// off a guest stuck on the CPU, and what keeps a CPU-bound guest from
    /// holding a thread the server's I/O needs for longer than a tick.
    /// Shorter ticks cut off sooner and cost a wake-up per tick. Default:
    /// 1 ms.
    pub epoch_tick: Duration,
    /// A directory where compiled code is kept between runs, keyed by the
    /// component's bytes, the wasmtime version and the engine settings: a
    /// component compiled once loads in milliseconds afterwards. If the
    /// directory cannot be created the runtime compiles without it.
    /// Default: none (compile on every load).
    pub cache_dir: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            pooling: true,
            max_instances: 256,
            max_memory: 128 << 20,
            epoch_tick: Duration::from_millis(1),
            cache_dir: None,
        }
    }
}

/// The engine components are compiled for and run on, with one epoch ticker
/// thread for all of its instances. Cloning is cheap; the ticker stops when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Runtime(Arc<RuntimeInner>);

struct RuntimeInner {
    engine: Engine,
    pooling: bool,
    cache: Option<Cache>,
    /// Held for its `Drop`: stops the ticker thread with the last clone.
    _ticker: EpochTicker,
}

/// Why a component could not be loaded, or a runtime not built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not WebAssembly.
    #[error("not a WebAssembly component (no `\\0asm` header)")]
    NotWasm,
    /// A core module, not a component.
    #[error(
        "this is a core WebAssembly module, not a component; wasmhive serves wasi:http \
         components (build for wasm32-wasip2, or wrap the module with `wasm-tools component new`)"
    )]
    CoreModule,
    /// The component does not validate or compile.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// A precompiled component made by another wasmtime or with other settings.
    #[error(
        "precompiled component cannot be used here (recompile it with `wasmhive compile`): {0}"
    )]
    Incompatible(String),
    /// The component imports something this host does not provide.
    #[error("the component needs an import wasmhive does not provide: {0}")]
    UnsupportedImport(String),
    /// The component exports neither `wasi:http` handler.
    #[error(
        "the component exports no wasi:http handler (wasi:http/incoming-handler@0.2 or \
         wasi:http/handler@0.3); is it a command rather than a proxy?"
    )]
    NoHandler,
    /// The wasmtime engine could not be created.
    #[error("cannot create the wasmtime engine: {0}")]
    Engine(String),
}

impl Runtime {
    /// Builds the engine (pooling, with a fallback to on-demand allocation;
    /// the compilation cache, if configured and usable) and starts its epoch
    /// ticker.
    pub fn new(config: &RuntimeConfig) -> Result<Runtime, LoadError> {
        let engine_error = |e: wasmtime::Error| LoadError::Engine(format!("{e:#}"));
        let cache = compile_cache(config);
        let build = |pooling| Engine::new(&engine_config(config, pooling, cache.as_ref()));
        let pooled = config.pooling.then(|| build(true)).and_then(|result| {
            result
                .inspect_err(|error| {
                    tracing::warn!(
                        error = %format_args!("{error:#}"),
                        "cannot reserve address space for the pooling allocator; \
                         falling back to on-demand allocation"
                    )
                })
                .ok()
        });
        let (engine, pooling) = match pooled {
            Some(engine) => (engine, true),
            None => (build(false).map_err(engine_error)?, false),
        };
        let ticker = EpochTicker::start(engine.clone(), config.epoch_tick)
            .map_err(|e| LoadError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Runtime(Arc::new(RuntimeInner {
            engine,
            pooling,
            cache,
            _ticker: ticker,
        })))
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.0.engine
    }

    /// Whether the pooling allocator is in use (it may have fallen back).
    pub fn is_pooling(&self) -> bool {
        self.0.pooling
    }

    /// How many components the compilation cache has supplied compiled
    /// instead of them being compiled; 0 without a cache.
    pub fn compile_cache_hits(&self) -> usize {
        self.0.cache.as_ref().map_or(0, Cache::cache_hits)
    }

    /// Loads a component file: a `.wasm` component (compiled now) or one
    /// precompiled by [`Self::precompile`] for this same engine.
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<Component, LoadError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        self.load_bytes(&bytes)
    }

    /// Loads a component from bytes; see [`Self::load_file`].
    pub fn load_bytes(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        match Engine::detect_precompiled(bytes) {
            Some(Precompiled::Component) => {
                // SAFETY: deserializing runs no code, but trusts that the
                // bytes are wasmtime's output; the engine checks that they
                // were produced by a compatible wasmtime and configuration.
                return unsafe { Component::deserialize(&self.0.engine, bytes) }
                    .map_err(|e| LoadError::Incompatible(format!("{e:#}")));
            }
            Some(Precompiled::Module) => return Err(LoadError::CoreModule),
            None => {}
        }
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 0x01, 0, 0, 0]) => return Err(LoadError::CoreModule),
            Some([0, b'a', b's', b'm', ..]) => {}
            _ => return Err(LoadError::NotWasm),
        }
        Component::new(&self.0.engine, bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))
    }

    /// Compiles a component ahead of time, for [`Self::load_file`] to load
    /// without compiling. The output only loads on the same wasmtime version
    /// with the same configuration.
    pub fn precompile(&self, wasm: &[u8]) -> Result<Vec<u8>, LoadError> {
        match wasm.get(..8) {
            Some([0, b'a', b's', b'm', 0x01, 0, 0, 0]) => return Err(LoadError::CoreModule),
            Some([0, b'a', b's', b'm', ..]) => {}
            _ => return Err(LoadError::NotWasm),
        }
        self.0
            .engine
            .precompile_component(wasm)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))
    }
}

/// The compilation cache of `config`, if it asks for one and it can be had.
fn compile_cache(config: &RuntimeConfig) -> Option<Cache> {
    let dir = config.cache_dir.as_ref()?;
    let mut cache = CacheConfig::new();
    cache.with_directory(dir);
    Cache::new(cache)
        .inspect_err(|error| {
            tracing::warn!(
                dir = %dir.display(),
                error = %format_args!("{error:#}"),
                "cannot use the compilation cache; compiling without it"
            )
        })
        .ok()
}

fn engine_config(config: &RuntimeConfig, pooling: bool, cache: Option<&Cache>) -> Config {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true);
    wasm.wasm_component_model_async(true);
    wasm.epoch_interruption(true);
    wasm.cache(cache.cloned());
    if pooling {
        let instances = u32::try_from(config.max_instances).unwrap_or(u32::MAX);
        let mut pool = PoolingAllocationConfig::default();
        // A component built by wit-component has a handful of core
        // instances (the module plus adapter shims), a memory or two, and a
        // few tables; give each slot room for that.
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(8))
            .total_memories(instances.saturating_mul(2))
            .total_tables(instances.saturating_mul(4))
            .total_stacks(instances.saturating_mul(4))
            .max_memory_size(config.max_memory);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    wasm
}

/// Advances an engine's epoch at a fixed interval on a thread of its own:
/// one per engine, whatever the number of instances.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> std::io::Result<EpochTicker> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("wasmhive-epoch".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                }
            })?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
