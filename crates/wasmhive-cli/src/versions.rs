//! Versions of the server's apps and zero-downtime reload (`SIGHUP`, admin
//! `POST /reload`).
//!
//! A reload reads the manifest (or the component of the command line)
//! again, loads every app (the compilation cache makes an unchanged
//! component cheap) and instantiates each once, then puts each into a new
//! handler with a pool of its own, and swaps them in together: requests
//! that arrive from then on go to the new version. (`serve`'s loader also
//! reads the TLS certificate and key again and swaps them in.)
//! The old version stops taking requests; once every request that reached
//! it has its response head it is shut down, and it is dropped when its
//! last instance has ended (bodies still streaming finish first). A
//! version that fails to load is refused and the current one keeps
//! serving.
//!
//! A request picks its version with [`Versions::enter`]. Picking and the
//! old version's retirement meet in a handshake on two flags (the
//! request's place in the version's count, the version's `retired`), so
//! that no request reaches a version after it was shut down.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use wasmhive::{App, ProxyHandler, Stats};

use crate::router::Router;

/// One app of a version.
pub struct Served {
    /// The app's name in the manifest.
    pub name: String,
    pub handler: ProxyHandler<App>,
    /// What its metrics are labelled with: its name when the server runs
    /// a manifest, nothing for the one component of the command line.
    pub labels: Vec<metrics::Label>,
}

/// Loads the apps anew: what a reload runs, on a blocking thread.
pub type Load = dyn Fn() -> anyhow::Result<Router<Served>> + Send + Sync;

/// An app's gauges and totals, summed over versions, with its labels.
pub type AppStats = BTreeMap<String, (Vec<metrics::Label>, Stats)>;

/// The version serving new requests, the older ones still draining, and
/// what the gone ones did.
pub struct Versions {
    current: ArcSwap<Version>,
    draining: Mutex<Vec<Arc<Version>>>,
    /// The totals of the versions dropped so far, by app.
    gone: Mutex<AppStats>,
    /// Serialises reloads; counts the versions made.
    reloading: tokio::sync::Mutex<u64>,
    /// Set by [`Versions::shutdown`]: no more reloads.
    closed: AtomicBool,
    load: Arc<Load>,
}

/// One loaded version of the apps.
struct Version {
    router: Router<Served>,
    /// Requests that picked this version and have no response head yet.
    in_flight: AtomicUsize,
    /// Set when a newer version took over.
    retired: AtomicBool,
    /// Wakes the retirement when `in_flight` drops to 0 after `retired`.
    idle: Notify,
}

impl Version {
    fn new(router: Router<Served>) -> Arc<Version> {
        Arc::new(Version {
            router,
            in_flight: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            idle: Notify::new(),
        })
    }

    /// Stops every app of this version taking requests.
    fn shutdown(&self) {
        self.router.apps().for_each(|app| app.handler.shutdown());
    }

    /// Waits until every app of this version has no instance left.
    async fn drained(&self) {
        for app in self.router.apps() {
            app.handler.drained().await;
        }
    }
}

/// A request's hold on the version it was given: the version is not shut
/// down while this lives.
pub struct Entered(Arc<Version>);

impl std::ops::Deref for Entered {
    type Target = Router<Served>;

    fn deref(&self) -> &Router<Served> {
        &self.0.router
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, SeqCst) == 1 && self.0.retired.load(SeqCst) {
            self.0.idle.notify_one();
        }
    }
}

impl Versions {
    /// Serves `first`; reloads call `load`.
    pub fn new(first: Router<Served>, load: Arc<Load>) -> Arc<Versions> {
        Arc::new(Versions {
            current: ArcSwap::new(Version::new(first)),
            draining: Mutex::default(),
            gone: Mutex::default(),
            reloading: tokio::sync::Mutex::new(1),
            closed: AtomicBool::new(false),
            load,
        })
    }

    /// The version for a request arriving now; hold it until the response
    /// head.
    pub fn enter(&self) -> Entered {
        loop {
            let version = self.current.load_full();
            version.in_flight.fetch_add(1, SeqCst);
            // Counted before looking: a retirement that set the flag before
            // this look waits for this count to drop; one that sets it later
            // sees the count.
            if !version.retired.load(SeqCst) {
                return Entered(version);
            }
            // Lost the race to a reload: the newer version takes it.
            drop(Entered(version));
        }
    }

    /// Each app's gauges and totals added up over versions, the dropped
    /// ones' included, so that totals never go back.
    pub fn stats(&self) -> AppStats {
        let draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        let mut stats = self.gone.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for version in draining.iter().chain([&self.current.load_full()]) {
            add_stats(&mut stats, version);
        }
        stats
    }

    /// Instances alive in every version.
    pub fn live_instances(&self) -> usize {
        self.stats()
            .values()
            .map(|(_, stats)| stats.live_instances)
            .sum()
    }

    /// Loads the app again and, if it loads, serves new requests with it;
    /// returns the new version's number (the first is 1). On failure (logged
    /// and counted) the current version keeps serving.
    pub async fn reload(self: &Arc<Self>) -> anyhow::Result<u64> {
        let mut made = self.reloading.lock().await;
        if self.closed.load(SeqCst) {
            anyhow::bail!("the server is draining");
        }
        let started = Instant::now();
        let load = self.load.clone();
        let loaded = tokio::task::spawn_blocking(move || load()).await;
        let router = match loaded {
            Ok(Ok(router)) => router,
            failed => {
                let error = match failed {
                    Ok(Err(error)) => error,
                    _ => anyhow::anyhow!("loading the new version panicked"),
                };
                metrics::counter!("wasmhive_reloads_total", "outcome" => "failed").increment(1);
                tracing::error!(
                    error = format!("{error:#}"),
                    "reload refused; the current version keeps serving"
                );
                return Err(error);
            }
        };
        // Under the lock `shutdown` takes, so that a version swapped in is
        // one it shuts down.
        let old = {
            let mut draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
            if self.closed.load(SeqCst) {
                router.apps().for_each(|app| app.handler.shutdown());
                anyhow::bail!("the server started draining while the new version loaded");
            }
            let old = self.current.swap(Version::new(router));
            draining.push(old.clone());
            old
        };
        *made += 1;
        tokio::spawn(self.clone().retire(old));
        metrics::counter!("wasmhive_reloads_total", "outcome" => "ok").increment(1);
        tracing::info!(version = *made, took = ?started.elapsed(), "reloaded");
        Ok(*made)
    }

    /// Shuts `old` down once no request holds it, and drops it once its
    /// last instance has ended.
    async fn retire(self: Arc<Self>, old: Arc<Version>) {
        let idle = old.idle.notified();
        let mut idle = std::pin::pin!(idle);
        idle.as_mut().enable();
        old.retired.store(true, SeqCst);
        if old.in_flight.load(SeqCst) > 0 {
            idle.await;
        }
        old.shutdown();
        old.drained().await;
        let mut draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        draining.retain(|version| !Arc::ptr_eq(version, &old));
        add_stats(
            &mut self.gone.lock().unwrap_or_else(|e| e.into_inner()),
            &old,
        );
        tracing::debug!("the previous version has drained");
    }

    /// Stops every version taking requests (the server is draining).
    pub fn shutdown(&self) {
        let draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, SeqCst);
        self.current.load().shutdown();
        for version in draining.iter() {
            version.shutdown();
        }
    }

    /// Waits until every version's instances have ended (after
    /// [`Self::shutdown`]).
    pub async fn drained(&self) {
        self.current.load_full().drained().await;
        let draining = self
            .draining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for version in draining {
            version.drained().await;
        }
    }
}

/// Adds the stats of `version`'s apps to `sum`, by app name.
fn add_stats(sum: &mut AppStats, version: &Version) {
    for app in version.router.apps() {
        let (_, stats) = sum
            .entry(app.name.clone())
            .or_insert_with(|| (app.labels.clone(), Stats::default()));
        *stats = std::mem::take(stats) + app.handler.stats();
    }
}
