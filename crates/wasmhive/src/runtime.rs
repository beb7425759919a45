//! [`Runtime`]: the wasmtime engine wasmhive runs components on, with its
//! epoch ticker, and loading components into it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Component;

use crate::footprint::{Footprint, Measured};
use crate::{Limits, World};
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
    /// What one instance takes from the pool; the pool has room for
    /// `max_instances` of them. [`Runtime::for_component`] measures it from
    /// the component. Default: [`Footprint::default`].
    pub footprint: Footprint,
    /// Requests one instance runs at once (keep it at least
    /// [`Limits::max_concurrency`](crate::Limits)): the pool reserves a fiber
    /// stack for each, plus one to instantiate with, up to 1,024 in all
    /// beyond two per instance (a task waiting on async I/O holds none).
    /// Default: none, meaning
    /// [`Limits::for_world`](crate::Limits::for_world)'s for the world the
    /// component exports (without a component, 16).
    pub max_concurrency: Option<usize>,
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
    /// What all instances' linear memories may take together (the
    /// [`MemoryBudget`](crate::MemoryBudget) they share), if bounded. The
    /// memory of an ended instance stays resident, outside any budget, until
    /// the pool decommits a batch of them; with a budget, batches are kept
    /// small enough that what waits in one (at most `max_memory` per
    /// instance) is no more than an eighth of it. Default: none.
    pub memory_budget: Option<usize>,
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
            footprint: Footprint::default(),
            max_concurrency: None,
            max_memory: 128 << 20,
            epoch_tick: Duration::from_millis(1),
            cache_dir: None,
            memory_budget: None,
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
    /// The file could not be read; why is its
    /// [`source`](std::error::Error::source), as error chains print it.
    #[error("cannot read {path}")]
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
    /// Precompiled code offered where only WebAssembly is accepted.
    #[error(
        "this is precompiled native code (a .cwasm), which runs with the server's rights \
         and is trusted blindly when loaded: load it only with --allow-precompiled (in \
         the library, the unsafe Runtime::load_precompiled_file)"
    )]
    Precompiled,
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
    /// The component's initial linear memory is larger than an instance may
    /// have.
    #[error(
        "the component needs {needed} bytes of linear memory at start, more than the \
         per-instance limit of {limit} bytes (raise --max-memory)"
    )]
    MemoryTooSmall {
        /// The component's initial memory, in bytes.
        needed: u64,
        /// The per-instance limit.
        limit: usize,
    },
    /// The pooling allocator cannot reserve room for the requested number
    /// of instances of this component.
    #[error(
        "cannot reserve address space for {instances} instances of this component \
         ({memories} linear memories of up to {memory_reservation} bytes each): lower \
         --max-instances, or serve without the pooling allocator (--no-pooling); {reason}"
    )]
    PoolTooLarge {
        /// Instances asked for.
        instances: usize,
        /// Linear memories the pool would hold.
        memories: u64,
        /// Address space reserved per memory.
        memory_reservation: u64,
        /// What the engine said.
        reason: String,
    },
}

impl Runtime {
    /// Builds the engine (pooling, with a fallback to on-demand allocation;
    /// the compilation cache, if configured and usable) and starts its epoch
    /// ticker.
    pub fn new(config: &RuntimeConfig) -> Result<Runtime, LoadError> {
        let cache = compile_cache(config);
        let pooled = config
            .pooling
            .then(|| pooled_engine(config, cache.as_ref()));
        let (engine, pooling) = match pooled {
            Some(Ok(engine)) => (engine, true),
            Some(Err(error)) => {
                tracing::warn!(
                    error = %format_args!("{error:#}"),
                    "cannot reserve address space for the pooling allocator; \
                     falling back to on-demand allocation"
                );
                (on_demand_engine(config, cache.as_ref())?, false)
            }
            None => (on_demand_engine(config, cache.as_ref())?, false),
        };
        Self::with_engine(engine, pooling, cache, config)
    }

    /// Loads a component and builds a runtime whose pooling allocator is
    /// sized for `config.max_instances` instances of it (the component's
    /// [`Footprint`]), returning both.
    ///
    /// The footprint is read from the binary, and the component loaded once,
    /// into the sized engine; what the binary cannot tell (a module imported
    /// from outside the component) is measured on a copy loaded into an
    /// engine without a pool first. Fails with [`LoadError::MemoryTooSmall`]
    /// when its initial memory exceeds `config.max_memory`, and with
    /// [`LoadError::PoolTooLarge`] when the pool cannot reserve room for
    /// that many instances; if not even one instance fits (a restricted
    /// address space), the runtime allocates on demand instead.
    pub fn for_component(
        config: &RuntimeConfig,
        bytes: &[u8],
    ) -> Result<(Runtime, Component), LoadError> {
        Self::sized_for(config, Source::Wasm(bytes))
    }

    /// [`Self::for_component`] for a precompiled file, memory-mapped; it is
    /// measured on a copy loaded into an engine without a pool first.
    ///
    /// # Safety
    ///
    /// As for [`Self::load_precompiled_file`]: the file is trusted native
    /// code.
    pub unsafe fn for_precompiled_file(
        config: &RuntimeConfig,
        path: impl AsRef<Path>,
    ) -> Result<(Runtime, Component), LoadError> {
        Self::sized_for(config, Source::Precompiled(path.as_ref()))
    }

    fn sized_for(
        config: &RuntimeConfig,
        source: Source<'_>,
    ) -> Result<(Runtime, Component), LoadError> {
        let on_demand = RuntimeConfig {
            pooling: false,
            ..config.clone()
        };
        // A `.wasm` says what it needs in its binary, and a precompiled file
        // may have been measured before; otherwise a copy is loaded on an
        // engine without a pool just to measure it.
        let known = match (source, &config.cache_dir) {
            (Source::Wasm(bytes), _) => Measured::from_binary(bytes),
            (Source::Precompiled(path), Some(dir)) => Measured::remembered(dir, path),
            (Source::Precompiled(_), None) => None,
        };
        let (measured, mut probe) = match known {
            Some(measured) => (measured, None),
            None => {
                let probe = Runtime::new(&on_demand)?;
                let component = probe.load(source)?;
                let measured = Measured {
                    footprint: Footprint::of(&component),
                    world: World::exported_by(&component, probe.engine()),
                };
                if let (Source::Precompiled(path), Some(dir)) = (source, &config.cache_dir) {
                    measured.remember(dir, path);
                }
                (measured, Some((probe, component)))
            }
        };
        let footprint = measured.footprint;
        if footprint.initial_memory > config.max_memory as u64 {
            return Err(LoadError::MemoryTooSmall {
                needed: footprint.initial_memory,
                limit: config.max_memory,
            });
        }
        let unpooled = |probe: Option<(Runtime, Component)>| match probe {
            Some(loaded) => Ok(loaded),
            None => {
                let runtime = Runtime::new(&on_demand)?;
                let component = runtime.load(source)?;
                Ok((runtime, component))
            }
        };
        if !config.pooling {
            return unpooled(probe);
        }
        let sized = RuntimeConfig {
            footprint,
            max_concurrency: Some(
                config
                    .max_concurrency
                    .unwrap_or(Limits::for_world(measured.world).max_concurrency),
            ),
            ..config.clone()
        };
        let cache = compile_cache(config);
        let engine = match pooled_engine(&sized, cache.as_ref()) {
            Ok(engine) => engine,
            Err(error) => {
                let one = RuntimeConfig {
                    max_instances: 1,
                    ..sized.clone()
                };
                if pooled_engine(&one, None).is_ok() {
                    return Err(LoadError::PoolTooLarge {
                        instances: config.max_instances,
                        memories: u64::from(footprint.memories) * config.max_instances as u64,
                        memory_reservation: DEFAULT_MEMORY_RESERVATION
                            .max(config.max_memory as u64),
                        reason: format!("{error:#}"),
                    });
                }
                tracing::warn!(
                    error = %format_args!("{error:#}"),
                    "cannot reserve address space for the pooling allocator; \
                     falling back to on-demand allocation"
                );
                return unpooled(probe);
            }
        };
        let runtime = Runtime::with_engine(engine, true, cache, config)?;
        let component = runtime.load(source)?;
        if let Some(probe) = probe.take() {
            // Unmapping the measured copy's code and stopping the probe's
            // ticker take milliseconds that start-up need not wait for.
            let _ = std::thread::Builder::new()
                .name("wasmhive-probe-drop".into())
                .spawn(move || drop(probe));
        }
        Ok((runtime, component))
    }

    fn load(&self, source: Source<'_>) -> Result<Component, LoadError> {
        match source {
            Source::Wasm(bytes) => self.load_bytes(bytes),
            // SAFETY: the caller of `for_precompiled_file` vouches for it.
            Source::Precompiled(path) => unsafe { self.load_precompiled_file(path) },
        }
    }

    /// [`Self::for_component`] with the bytes of the file at `path`.
    pub fn for_component_file(
        config: &RuntimeConfig,
        path: impl AsRef<Path>,
    ) -> Result<(Runtime, Component), LoadError> {
        Self::for_component(config, &read(path.as_ref())?)
    }

    fn with_engine(
        engine: Engine,
        pooling: bool,
        cache: Option<Cache>,
        config: &RuntimeConfig,
    ) -> Result<Runtime, LoadError> {
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

    /// Loads a `.wasm` component file, compiling it now (or taking it from
    /// the compilation cache). Precompiled files are refused with
    /// [`LoadError::Precompiled`]: see [`Self::load_precompiled_file`].
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<Component, LoadError> {
        self.load_bytes(&read(path.as_ref())?)
    }

    /// Whether the file at `path` is a precompiled component (a `.cwasm`),
    /// judged by its header alone.
    pub fn is_precompiled_file(path: impl AsRef<Path>) -> bool {
        matches!(
            Engine::detect_precompiled_file(path),
            Ok(Some(Precompiled::Component))
        )
    }

    /// Loads a component precompiled by [`Self::precompile`] (a `.cwasm`),
    /// memory-mapping the file rather than reading it.
    ///
    /// # Safety
    ///
    /// The file is native code that wasmtime runs without verifying it: a
    /// crafted or tampered file runs arbitrary code with the host's rights.
    /// Load only files this host produced (or that you trust as much as the
    /// host's own binary), and that nothing else can write. wasmtime checks
    /// only that the file was made by a compatible wasmtime and settings.
    pub unsafe fn load_precompiled_file(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<Component, LoadError> {
        let path = path.as_ref();
        match Engine::detect_precompiled_file(path) {
            Ok(Some(Precompiled::Component)) => {}
            Ok(Some(Precompiled::Module)) => return Err(LoadError::CoreModule),
            Ok(None) => {
                return Err(LoadError::Incompatible(format!(
                    "{} is not precompiled",
                    path.display()
                )));
            }
            Err(error) => {
                return Err(LoadError::Read {
                    path: path.display().to_string(),
                    source: std::io::Error::other(format!("{error:#}")),
                });
            }
        }
        // SAFETY: the caller vouches for the file (see above).
        unsafe { Component::deserialize_file(&self.0.engine, path) }
            .map_err(|e| LoadError::Incompatible(format!("{e:#}")))
    }

    /// Loads a component from bytes; see [`Self::load_file`].
    pub fn load_bytes(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        match Engine::detect_precompiled(bytes) {
            Some(Precompiled::Component) => return Err(LoadError::Precompiled),
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

    /// Notes in `cache_dir` what an instance of `wasm` takes, for the file
    /// `cwasm` just written from [`Self::precompile`]: a runtime that loads
    /// `cwasm` with that cache directory ([`RuntimeConfig::cache_dir`]) then
    /// loads it once, instead of loading a copy first to measure it. A hint:
    /// if it cannot be stored, or `cwasm` changes, loading measures.
    pub fn remember_precompiled(cache_dir: &Path, wasm: &[u8], cwasm: &Path) {
        if let Some(measured) = Measured::from_binary(wasm) {
            measured.remember(cache_dir, cwasm);
        }
    }
}

/// Where a component comes from.
#[derive(Clone, Copy)]
enum Source<'a> {
    Wasm(&'a [u8]),
    /// A trusted precompiled file.
    Precompiled(&'a Path),
}

/// wasmtime's default address-space reservation per linear memory on 64-bit
/// hosts (a pool slot is at least this large).
const DEFAULT_MEMORY_RESERVATION: u64 = 4 << 30;

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn on_demand_engine(config: &RuntimeConfig, cache: Option<&Cache>) -> Result<Engine, LoadError> {
    Engine::new(&engine_config(config, false, cache))
        .map_err(|e| LoadError::Engine(format!("{e:#}")))
}

fn pooled_engine(config: &RuntimeConfig, cache: Option<&Cache>) -> wasmtime::Result<Engine> {
    Engine::new(&engine_config(config, true, cache))
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

/// Fiber stacks the pool holds at most beyond two per instance: see
/// [`engine_config`].
const MAX_SPARE_STACKS: u32 = 1024;

fn engine_config(config: &RuntimeConfig, pooling: bool, cache: Option<&Cache>) -> Config {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true);
    wasm.wasm_component_model_async(true);
    wasm.epoch_interruption(true);
    wasm.cache(cache.cloned());
    if pooling {
        let instances = u32::try_from(config.max_instances).unwrap_or(u32::MAX);
        let footprint = &config.footprint;
        let (memories, tables) = (footprint.memories.max(1), footprint.tables.max(1));
        // A guest task holds a fiber stack while it runs or blocks in a
        // synchronous host call (p2), not while an async (p3) task waits. So
        // one per request an instance runs at once, plus one to instantiate
        // with, is the most that can be used; but each stack's guard page
        // costs a system call when the pool is made (4,352 of them, p3's
        // defaults, took 5 ms of start-up), so beyond two per instance the
        // pool holds at most `MAX_SPARE_STACKS`. Running short makes
        // instantiation wait, like a full pool.
        let concurrency = config
            .max_concurrency
            .unwrap_or(Limits::for_world(World::P3).max_concurrency);
        let stacks_per_instance = u32::try_from(concurrency.saturating_add(1)).unwrap_or(u32::MAX);
        let stacks = instances
            .saturating_mul(stacks_per_instance)
            .min(instances.saturating_mul(2).max(MAX_SPARE_STACKS));
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(Footprint::CORE_INSTANCES))
            .total_memories(instances.saturating_mul(memories))
            .max_memories_per_module(memories)
            .total_tables(instances.saturating_mul(tables))
            .max_tables_per_module(tables)
            .table_elements(20_000.max(footprint.initial_table_elements as usize))
            // Reserved, but committed only as used.
            .total_stacks(stacks)
            .max_memory_size(config.max_memory);
        pool.decommit_batch_size(footprint.decommit_batch(config.max_memory, config.memory_budget));
        let resident = footprint.keep_resident();
        pool.linear_memory_keep_resident(resident)
            .table_keep_resident(resident.min(1 << 20))
            // Used slots keep those bytes resident: reuse the same few
            // rather than spreading over the pool.
            .max_unused_warm_slots(0);
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
