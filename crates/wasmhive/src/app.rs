//! [`App`]: a ready [`HandlerState`] serving one component with [`Limits`],
//! and [`Host`], the store data of its instances (WASI p2 and p3,
//! `wasi:http`, a memory limiter, labelled guest output, and the outbound
//! hooks of [`crate::outbound`]).

use std::sync::Arc;

use wasmtime::component::{Component, GuestTaskId, Linker, ResourceTable};
use wasmtime::{Store, StoreContextMut};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p3::bindings::ServicePre;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::World;
use crate::limits::{Limits, LimitsExpiration};
use crate::memory::{MemoryBudget, MemoryLimiter};
use crate::metrics::InstanceReport;
use crate::outbound::{Client, OutboundAuthority, OutboundHooks};
use crate::output::{GuestOutput, Label, Stream};
use crate::policy::{HandlerState, Instance, Proxy, RequestDeadline, ShouldAccept, WorkerState};
use crate::runtime::{LoadError, Runtime};

/// Serves one `wasi:http` component (p2 or p3, detected when it is made)
/// with [`Limits`]: the [`HandlerState`] for the common case.
///
/// Instances get the full WASI p2 and p3 interfaces (standard-library
/// guests import `wasi:cli`), no filesystem, no sockets, environment
/// variables from [`App::with_env`], and outbound HTTP only to the hosts of
/// [`App::allow_outbound`]. The request data is a request id, used to label
/// the guest's output.
pub struct App {
    runtime: Runtime,
    pre: Pre,
    limits: Limits,
    env: Vec<(String, String)>,
    outbound: Arc<[OutboundAuthority]>,
    label_output: bool,
    budget: Option<MemoryBudget>,
}

enum Pre {
    P2(ProxyPre<Host>),
    P3(ServicePre<Host>),
}

impl App {
    /// Prepares `component` for instantiation: links it and finds which
    /// `wasi:http` world it exports. Limits default to
    /// [`Limits::for_world`] of that world.
    pub fn new(runtime: &Runtime, component: &Component) -> Result<App, LoadError> {
        let mut linker = Linker::<Host>::new(runtime.engine());
        let link = |e: wasmtime::Error| LoadError::Engine(format!("{e:#}"));
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(link)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(link)?;
        wasmtime_wasi::p3::add_to_linker(&mut linker).map_err(link)?;
        Client::add_to_linker(&mut linker, Host::http_view).map_err(link)?;
        let pre = linker
            .instantiate_pre(component)
            .map_err(|e| LoadError::UnsupportedImport(format!("{e:#}")))?;
        // The same rule as the runtime's sizing: p3 if it exports the p3
        // handler, else p2; either must then type-check.
        let world = World::exported_by(component, runtime.engine());
        let pre = match world {
            World::P3 => Pre::P3(ServicePre::new(pre).map_err(|_| LoadError::NoHandler)?),
            World::P2 => Pre::P2(ProxyPre::new(pre).map_err(|_| LoadError::NoHandler)?),
        };
        Ok(App {
            runtime: runtime.clone(),
            pre,
            limits: Limits::for_world(world),
            env: Vec::new(),
            outbound: Arc::from([]),
            label_output: true,
            budget: None,
        })
    }

    /// The component's `wasi:http` world.
    pub fn world(&self) -> World {
        match self.pre {
            Pre::P2(_) => World::P2,
            Pre::P3(_) => World::P3,
        }
    }

    /// The limits instances run with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many requests one instance can hold at once: its
    /// [`Limits::max_concurrency`], but no more than it takes in all
    /// ([`Limits::max_reuse`]), and one for p2, whose handler is
    /// synchronous.
    pub fn requests_per_instance(&self) -> usize {
        match self.world() {
            World::P2 => 1,
            World::P3 => self
                .limits
                .max_concurrency
                .min(self.limits.max_reuse)
                .max(1),
        }
    }

    /// Replaces the limits.
    pub fn with_limits(mut self, limits: Limits) -> App {
        self.limits = limits;
        self
    }

    /// Adds an environment variable every instance sees.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> App {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Lets guests send HTTP requests to `authority` (`host` for any port,
    /// or `host:port`; parse one with `"example.com:8080".parse()`).
    /// Everything else is denied with `HTTP-request-denied`.
    pub fn allow_outbound(mut self, authority: OutboundAuthority) -> App {
        let mut allowed = self.outbound.to_vec();
        allowed.push(authority);
        self.outbound = allowed.into();
        self
    }

    /// Charges every instance's linear memories and tables to `budget`,
    /// shared with whatever else holds a clone of it. Default: no budget
    /// beyond [`Limits::max_memory`] per instance.
    pub fn with_memory_budget(mut self, budget: MemoryBudget) -> App {
        self.budget = Some(budget);
        self
    }

    /// Whether guest stdout/stderr lines are prefixed with the instance and
    /// request they come from. Default: true.
    pub fn label_output(mut self, label: bool) -> App {
        self.label_output = label;
        self
    }
}

impl HandlerState for App {
    type StoreData = Host;
    type WorkerExpiration = LimitsExpiration;
    type WorkerState = AppWorker;

    async fn instantiate(&self, incarnation: u64) -> wasmtime::Result<Instance<App>> {
        let label = Arc::new(Label::new(incarnation, self.label_output));
        let mut wasi = WasiCtxBuilder::new();
        wasi.envs(&self.env)
            .stdout(GuestOutput::new(Stream::Stdout, label.clone()))
            .stderr(GuestOutput::new(Stream::Stderr, label.clone()));
        let host = Host {
            table: ResourceTable::new(),
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks: OutboundHooks::new(self.outbound.clone()),
            memory: MemoryLimiter::new(self.limits.max_memory, self.budget.clone()),
        };
        let mut store = Store::new(self.runtime.engine(), host);
        store.limiter(|host| &mut host.memory);
        // Yield to the host at every epoch tick, so that instantiating (a
        // Python interpreter's start-up, say) shares the CPU; the worker
        // sets its own tick callback for serving.
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        let proxy = match &self.pre {
            Pre::P2(pre) => pre.instantiate_async(&mut store).await.map(Proxy::P2),
            Pre::P3(pre) => pre.instantiate_async(&mut store).await.map(Proxy::P3),
        };
        let proxy = match proxy {
            Ok(proxy) => proxy,
            Err(error) => match store.data().memory.capacity_error() {
                Some(capacity) => return Err(error.context(capacity)),
                None => return Err(error),
            },
        };
        Ok(Instance {
            store,
            proxy,
            view: Host::http_view,
            expiration: self.limits.expiration(),
            state: AppWorker {
                limits: self.limits.clone(),
                label,
            },
        })
    }
}

/// The [`WorkerState`] of an [`App`] instance.
pub struct AppWorker {
    limits: Limits,
    label: Arc<Label>,
}

impl WorkerState for AppWorker {
    type StoreData = Host;
    type RequestData = u64;

    fn should_accept_request(&self, concurrent: usize, total: usize) -> ShouldAccept {
        self.limits.should_accept(concurrent, total)
    }

    fn on_request_start(
        &self,
        _store: StoreContextMut<'_, Host>,
        request_id: u64,
        _task: GuestTaskId,
    ) -> RequestDeadline {
        self.label.set_request(request_id);
        self.limits.request_deadline()
    }

    fn drop(&self, store: Store<Host>, exit: &mut InstanceReport) {
        let memory = &store.data().memory;
        exit.peak_memory = Some(memory.peak);
        if let Some(error) = &mut exit.error {
            if memory.denied {
                error.push_str(&format!(
                    " (after reaching the memory limit of {} bytes)",
                    memory.limit()
                ));
            } else if memory.over_budget {
                error.push_str(" (after the shared memory budget ran out)");
            }
        }
    }
}

/// The data of an [`App`] instance's store.
pub struct Host {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: OutboundHooks,
    memory: MemoryLimiter,
}

impl Host {
    fn http_view(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        self.http_view()
    }
}
