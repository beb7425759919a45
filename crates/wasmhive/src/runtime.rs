//! [`Runtime`]: the wasmtime engine wasmhive runs components on, with its
//! epoch ticker, and loading components into it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Component;

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
    /// stack for each, plus one to instantiate with. Default: none, meaning
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

/// What one instance of a component takes from the pooling allocator.
///
/// Core instances are only counted by the pool, not reserved, so they get a
/// generous allowance; memories and tables reserve address space per slot
/// and are sized exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// Linear memories one instance defines.
    pub memories: u32,
    /// Tables one instance defines.
    pub tables: u32,
    /// Largest initial size of any of its memories, in bytes.
    pub initial_memory: u64,
    /// Largest initial size of any of its tables, in elements.
    pub initial_table_elements: u64,
}

impl Default for Footprint {
    /// Room for a component built by `wit-component` from one module: a
    /// memory or two and a few tables.
    fn default() -> Self {
        Footprint {
            memories: 2,
            tables: 4,
            initial_memory: 0,
            initial_table_elements: 0,
        }
    }
}

impl Footprint {
    /// Resident bytes the pool may hold back from the system to batch the
    /// decommits of ended instances; see [`Self::decommit_batch`].
    const DECOMMIT_BATCH_BYTES: u64 = 16 << 20;

    /// How many ended instances' memories the pooling allocator decommits
    /// at once. Each decommit (`madvise`) costs a TLB shootdown on every
    /// other core running this process, so batching them is what makes a
    /// fresh instance per request cheap: hello-p2 at 32 connections went
    /// from 0.97x to 1.29x `wasmtime serve`'s req/s with batches of 16
    /// (bench harness, one round). The pages wait resident until their
    /// batch goes, so large instances batch fewer: a Python app (13 MiB of
    /// initial memory) gained nothing from it and its peak RSS grew 7%.
    /// Bytes of each linear memory that stay resident when its instance
    /// ends, reset in place (the pages it dirtied, copied back from the
    /// component's memory image) instead of handed back to the kernel, so
    /// that the next instance in that slot starts without page faults: the
    /// component's initial memory, up to 32 MiB. A Python app (13 MiB of
    /// initial memory, a fresh instance per request) went from 225 to 983
    /// req/s with it (bench harness, one round). The slots used stay as
    /// resident as they were at their busiest, so memory after a burst
    /// returns to the system only as far as instances had grown past this.
    fn keep_resident(&self) -> usize {
        usize::try_from(self.initial_memory.min(32 << 20)).unwrap_or(32 << 20)
    }

    fn decommit_batch(&self) -> usize {
        let per_instance = self.initial_memory.max(1);
        (Self::DECOMMIT_BATCH_BYTES / per_instance).clamp(1, 16) as usize
    }

    /// Core instances one component instance may have: only counted by the
    /// pool (no memory is reserved for them), so this is an allowance, well
    /// above the 14 of a componentize-py app.
    const CORE_INSTANCES: u32 = 64;

    /// Measures `component`. A component that instantiates an imported
    /// module cannot be measured; it gets the default.
    pub fn of(component: &Component) -> Footprint {
        let Some(needs) = component.resources_required() else {
            return Footprint::default();
        };
        Footprint {
            memories: needs.num_memories,
            tables: needs.num_tables,
            initial_memory: needs
                .max_initial_memory_size
                .unwrap_or(0)
                .saturating_mul(64 * 1024),
            initial_table_elements: needs.max_initial_table_size.unwrap_or(0),
        }
    }
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
    /// The component is compiled once, on an engine without a pool, and
    /// moved to the sized engine. Fails with [`LoadError::MemoryTooSmall`]
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

    /// [`Self::for_component`] for a precompiled file, memory-mapped.
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
        let probe = Runtime::new(&RuntimeConfig {
            pooling: false,
            ..config.clone()
        })?;
        let component = match source {
            Source::Wasm(bytes) => probe.load_bytes(bytes)?,
            // SAFETY: the caller of `for_precompiled_file` vouches for it.
            Source::Precompiled(path) => unsafe { probe.load_precompiled_file(path)? },
        };
        let footprint = Footprint::of(&component);
        if footprint.initial_memory > config.max_memory as u64 {
            return Err(LoadError::MemoryTooSmall {
                needed: footprint.initial_memory,
                limit: config.max_memory,
            });
        }
        if !config.pooling {
            return Ok((probe, component));
        }
        let world = World::exported_by(&component, probe.engine());
        let sized = RuntimeConfig {
            footprint,
            max_concurrency: Some(
                config
                    .max_concurrency
                    .unwrap_or(Limits::for_world(world).max_concurrency),
            ),
            ..config.clone()
        };
        let engine = match pooled_engine(&sized, probe.0.cache.as_ref()) {
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
                return Ok((probe, component));
            }
        };
        let runtime = Runtime::with_engine(engine, true, probe.0.cache.clone(), config)?;
        let measured = component;
        let component = match source {
            Source::Wasm(_) => {
                let compiled = measured
                    .serialize()
                    .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
                // SAFETY: these bytes were serialized just now by an engine
                // with the same compilation settings; only the instance
                // allocator differs.
                unsafe { Component::deserialize(runtime.engine(), &compiled) }
                    .map_err(|e| LoadError::Incompatible(format!("{e:#}")))?
            }
            // SAFETY: the caller of `for_precompiled_file` vouches for it.
            Source::Precompiled(path) => unsafe { runtime.load_precompiled_file(path)? },
        };
        // Unmapping the measured copy's code and stopping the probe's ticker
        // take milliseconds that start-up need not wait for.
        let _ = std::thread::Builder::new()
            .name("wasmhive-probe-drop".into())
            .spawn(move || drop((measured, probe)));
        Ok((runtime, component))
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
        // Each stack's guard page costs a system call when the pool is made:
        // reserve as many as can be used, not more (without a component to
        // tell, as many as the more concurrent world's default).
        let concurrency = config
            .max_concurrency
            .unwrap_or(Limits::for_world(World::P3).max_concurrency);
        let stacks_per_instance = u32::try_from(concurrency.saturating_add(1)).unwrap_or(u32::MAX);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(Footprint::CORE_INSTANCES))
            .total_memories(instances.saturating_mul(memories))
            .max_memories_per_module(memories)
            .total_tables(instances.saturating_mul(tables))
            .max_tables_per_module(tables)
            .table_elements(20_000.max(footprint.initial_table_elements as usize))
            // A fiber stack per guest task running at once: reserved, but
            // committed only as used.
            .total_stacks(instances.saturating_mul(stacks_per_instance))
            .max_memory_size(config.max_memory);
        pool.decommit_batch_size(footprint.decommit_batch());
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
