//! What a request tells its server about the instance it keeps alive.
//!
//! An instance that retires (a request of it expired, it spent its reuse,
//! the handler shuts down) takes no more requests, but lives on until the
//! requests it still has in hand are done: a response body a client still
//! reads is written by that instance. Its room for other requests is then
//! lost to everyone, for as long as those few requests last. A server that
//! shares instances out among clients needs to know, or one client keeping
//! one stream open on each of many retired instances holds them all with a
//! few places of its share. [`Occupant`] is how it hears.

use std::sync::{Arc, Mutex};

/// A server's account of one request, told when the request keeps a
/// retired instance alive.
///
/// Put an `Arc<dyn Occupant>` in a request's extensions before
/// [`ProxyHandler::handle`](crate::ProxyHandler::handle). The worker that
/// takes the request keeps it until the request leaves its hands: at the
/// end of the response body (read or dropped), or when the guest is done
/// with a request that has no body to send.
pub trait Occupant: Send + Sync + 'static {
    /// The request's instance takes no more requests, and lives on until
    /// the `holders` requests it has in hand, this one among them, are
    /// done: they keep it alive between them. Called when the instance
    /// retires, and again each time `holders` falls; never once the request
    /// has left the worker's hands. Called on the worker's task: it must
    /// not block.
    fn keeps_retired(&self, holders: usize);
}

/// The occupants of one instance's requests in hand.
#[derive(Default)]
pub(crate) struct Occupants {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    present: Vec<(u64, Arc<dyn Occupant>)>,
    /// The holders last told, once the instance retired.
    told: Option<usize>,
}

impl Occupants {
    /// Registers the occupant in `extensions`, if any, until the returned
    /// guard is dropped.
    pub(crate) fn enter(&self, extensions: &http::Extensions) -> Option<Occupancy<'_>> {
        let occupant = extensions.get::<Arc<dyn Occupant>>()?.clone();
        let mut inner = self.lock();
        let id = inner.next;
        inner.next += 1;
        inner.present.push((id, occupant));
        Some(Occupancy {
            occupants: self,
            id,
        })
    }

    /// The instance is retired with `holders` requests in hand: tells the
    /// occupants present, unless they were told that already.
    pub(crate) fn retired_with(&self, holders: usize) {
        let present: Vec<_> = {
            let mut inner = self.lock();
            if inner.told == Some(holders) {
                return;
            }
            inner.told = Some(holders);
            inner.present.iter().map(|(_, o)| o.clone()).collect()
        };
        for occupant in present {
            occupant.keeps_retired(holders);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request's occupant, registered with its instance while the request is
/// in the worker's hands.
pub(crate) struct Occupancy<'o> {
    occupants: &'o Occupants,
    id: u64,
}

impl Drop for Occupancy<'_> {
    fn drop(&mut self) {
        let mut inner = self.occupants.lock();
        if let Some(at) = inner.present.iter().position(|(id, _)| *id == self.id) {
            inner.present.swap_remove(at);
        }
    }
}
