//! Fair shares: what one client address may hold, so that one client
//! cannot take the capacity every other client needs.
//!
//! Each address may have `--max-connections-per-client` connections open
//! (more are closed at once) and `--max-requests-per-client` requests in
//! flight. A request is in flight from the moment it arrives until its
//! response body has been sent or dropped, or, if the client went away
//! first, until the guest is done with it (a [`Place`] rides in the
//! request's extensions for that). So a client that stalls its requests
//! (HTTP/2 zero windows, bodies that never come, responses never read) or
//! resets them once they reached a guest pins at most its share of
//! instances. A request that keeps a retired instance alive (one that takes
//! no more requests but still writes its response) is charged its part of
//! that instance's places (what the share has free, then the next places
//! it frees, in line ahead of requests that wait for one later), so that
//! streams kept on retired instances pin no more than the share either. The
//! surplus waits in line like a queued request: up to `--queue-timeout`,
//! and no more than `--queue-len` requests wait so at once; beyond either,
//! `503`.
//!
//! Per connection, on top: HTTP/2 streams are capped (`--max-streams-per-connection`, refused with
//! `REFUSED_STREAM` by the protocol layer), and a connection whose client
//! resets more requests that reached the server than it lets finish is
//! closed ([`ClientConnection::reset`]), a connection with nothing in
//! flight is idle ([`ClientConnection::idle_since`]), and one whose client
//! stopped taking a response body is stalled
//! ([`ClientConnection::stalled_since`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{AcquireError, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use wasmhive::Occupant;

/// Resets a connection may make of requests that reached the server before
/// the reset rule applies: past it, a connection that has reset more
/// requests than it let finish is closed (HTTP/2's own rapid-reset defence
/// counts only streams reset before the server took them).
const FREE_RESETS: u64 = 100;

/// The shares of every client address with a connection open.
pub struct Clients {
    max_connections: usize,
    max_requests: usize,
    wait: Duration,
    max_waiting: usize,
    waiting: AtomicUsize,
    shares: Mutex<HashMap<IpAddr, Share>>,
}

struct Share {
    connections: usize,
    requests: Arc<Semaphore>,
}

impl Clients {
    /// Shares of `max_connections` connections and `max_requests` requests
    /// in flight per address; a request waits up to `wait` for a place, and
    /// at most `max_waiting` requests wait at once.
    pub fn new(
        max_connections: usize,
        max_requests: usize,
        wait: Duration,
        max_waiting: usize,
    ) -> Arc<Clients> {
        Arc::new(Clients {
            max_connections,
            max_requests,
            wait,
            max_waiting,
            waiting: AtomicUsize::new(0),
            shares: Mutex::default(),
        })
    }

    /// A new connection from `ip`, or `None` if that address already has
    /// its share of connections open.
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Option<ClientConnection> {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        let share = shares.entry(ip).or_insert_with(|| Share {
            connections: 0,
            requests: Arc::new(Semaphore::new(self.max_requests)),
        });
        if share.connections >= self.max_connections {
            return None;
        }
        share.connections += 1;
        Some(ClientConnection {
            clients: self.clone(),
            ip,
            requests: share.requests.clone(),
            resets: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            abusive: Notify::new(),
            activity: Mutex::new((0, Instant::now())),
            sending: Mutex::default(),
        })
    }
}

/// One open connection's hold on its client's share, and its tally of
/// reset requests. Dropping it gives the connection back.
pub struct ClientConnection {
    clients: Arc<Clients>,
    ip: IpAddr,
    requests: Arc<Semaphore>,
    resets: AtomicU64,
    finished: AtomicU64,
    abusive: Notify,
    /// Requests in flight on this connection, and when the most recent one
    /// ended (or the connection opened).
    activity: Mutex<(usize, Instant)>,
    /// The response bodies being sent on this connection.
    sending: Mutex<Vec<std::sync::Weak<SendClock>>>,
}

/// Since when a response body has waited for its client to take the piece
/// it last produced; `None` while it waits for the guest, or is done.
#[derive(Default)]
struct SendClock(Mutex<Option<Instant>>);

impl SendClock {
    fn set(&self, since: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = since;
    }
}

impl ClientConnection {
    /// A place for one request in flight, waiting in line for one if the
    /// client has its share in flight; `None` means the line is full or the
    /// wait ran out.
    pub async fn request_place(&self) -> Option<Place> {
        if let Ok(permit) = self.requests.clone().try_acquire_owned() {
            return Some(Place::new(permit, &self.requests));
        }
        let clients = &self.clients;
        if clients.waiting.fetch_add(1, Relaxed) >= clients.max_waiting {
            clients.waiting.fetch_sub(1, Relaxed);
            return None;
        }
        // Leaves the line however the wait ends, the caller's going away
        // included.
        struct InLine<'a>(&'a AtomicUsize);
        impl Drop for InLine<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        let _in_line = InLine(&clients.waiting);
        let place = self.requests.clone().acquire_owned();
        match tokio::time::timeout(clients.wait, place).await {
            Ok(permit) => Some(Place::new(
                permit.expect("the semaphore is never closed"),
                &self.requests,
            )),
            Err(_) => None,
        }
    }

    /// The client's address.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// A request on this connection got its response head.
    pub fn finished(&self) {
        self.finished.fetch_add(1, Relaxed);
    }

    /// The client went away from a request that had reached the server
    /// before its response head. Past [`FREE_RESETS`], a connection that
    /// resets more requests than it lets finish is flagged abusive.
    pub fn reset(&self) {
        let resets = self.resets.fetch_add(1, Relaxed) + 1;
        if resets > FREE_RESETS && resets > self.finished.load(Relaxed) {
            self.abusive.notify_one();
        }
    }

    /// A request arrived: the connection is busy until the returned guard
    /// (moved into its response body) is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.activity.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        Busy(self.clone())
    }

    /// Since when nothing has been in flight on this connection, or `None`
    /// while something is.
    pub fn idle_since(&self) -> Option<Instant> {
        let (in_flight, since) = *self.activity.lock().unwrap_or_else(|e| e.into_inner());
        (in_flight == 0).then_some(since)
    }

    /// Since when the longest-waiting response body on this connection has
    /// waited for its client to take more of it (a client that stopped
    /// reading, or an HTTP/2 window that stays shut), if one waits.
    pub fn stalled_since(&self) -> Option<Instant> {
        // Bodies already gone are skipped here, and pruned as others come.
        let sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        sending
            .iter()
            .filter_map(|clock| *clock.upgrade()?.0.lock().unwrap_or_else(|e| e.into_inner()))
            .min()
    }

    /// Resolves once the connection has been flagged abusive.
    pub async fn abusive(&self) {
        self.abusive.notified().await
    }
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        let mut shares = self
            .clients
            .shares
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(share) = shares.get_mut(&self.ip) {
            share.connections -= 1;
            // An address with requests still in flight (bodies being sent
            // after their connection's task ended) keeps its entry, so that a
            // new connection cannot start over with a full share.
            if share.connections == 0
                && share.requests.available_permits() == self.clients.max_requests
            {
                shares.remove(&self.ip);
            }
        }
    }
}

/// A request's place in its client's share, given back when its last clone
/// is dropped: one goes with the response body ([`Holding`]), one with the
/// request into the guest as its [`Occupant`] (`wasmhive` drops a request's
/// extensions once the guest is done with it, which for a request its
/// client reset is when its guest task returns or its instance ends, and
/// its occupant once the request leaves the instance's hands).
#[derive(Clone)]
pub struct Place(Arc<Held>);

struct Held {
    _permit: OwnedSemaphorePermit,
    share: Arc<Semaphore>,
    /// The places charged on top of this one while the request keeps a
    /// retired instance alive.
    retired: Mutex<Charge>,
}

/// The places a request is charged on top of its own, and the waits in its
/// client's share's line for those the share did not have free when they
/// became owed.
#[derive(Default)]
struct Charge {
    taken: Option<OwnedSemaphorePermit>,
    /// Oldest first. A wait stays in line while more becomes owed (the
    /// increase waits behind it), so that requests coming later cannot
    /// overtake it.
    waiting: Vec<Waiting>,
    next_id: u64,
}

/// A wait for places in the share's line. The semaphore hands places to
/// it without it being polled; its task polls it (through [`Charge`]) to
/// move them into the charge. Dropping it gives back any it was handed.
struct Waiting {
    id: u64,
    places: usize,
    wait: Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>,
    task: AbortHandle,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Charge {
    /// Places held.
    fn places(&self) -> usize {
        self.taken.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Places held or waited for.
    fn owed(&self) -> usize {
        self.places() + self.waiting.iter().map(|w| w.places).sum::<usize>()
    }

    fn add(&mut self, more: OwnedSemaphorePermit) {
        let before = self.places();
        match self.taken.as_mut() {
            Some(taken) => taken.merge(more),
            None => self.taken = Some(more),
        }
        retired_places_moved(before, self.places());
    }

    /// Polls the wait `id`: ready once it is gone, its places taken.
    fn poll_wait(&mut self, id: u64, cx: &mut Context<'_>) -> Poll<()> {
        let Some(at) = self.waiting.iter().position(|w| w.id == id) else {
            return Poll::Ready(());
        };
        let Poll::Ready(result) = self.waiting[at].wait.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        self.waiting.remove(at);
        if let Ok(taken) = result {
            self.add(taken);
        }
        Poll::Ready(())
    }
}

impl Place {
    fn new(permit: OwnedSemaphorePermit, share: &Arc<Semaphore>) -> Place {
        Place(Arc::new(Held {
            _permit: permit,
            share: share.clone(),
            retired: Mutex::default(),
        }))
    }

    /// The request's occupant of an instance of an app whose instances
    /// each hold `per_instance` requests at once.
    pub fn occupant(&self, per_instance: usize) -> Arc<dyn Occupant> {
        Arc::new(Occupying {
            place: self.clone(),
            per_instance,
        })
    }
}

impl Held {
    /// Holds `owed` places on top of this one: gives back any beyond
    /// (the latest waits first), takes what the share has free towards the
    /// rest, and waits in line (ahead of requests that come later, behind
    /// its own earlier waits) for what is still missing. The other requests
    /// keeping the instance often give their places back only after their
    /// instance has let them go (their client still reads the response),
    /// and the place each frees is owed to this one.
    fn charge(self: &Arc<Self>, owed: usize) {
        let mut charge = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        // A wait cannot ask for fewer: one that asks for more than is still
        // owed goes, and the difference is asked for again below.
        while charge.owed() > owed && charge.waiting.pop().is_some() {}
        let held = charge.places();
        if held > owed {
            match charge.taken.as_mut() {
                Some(taken) if owed > 0 => drop(taken.split(held - owed)),
                _ => charge.taken = None,
            }
            retired_places_moved(held, owed);
        }
        let mut missing = owed.saturating_sub(charge.owed());
        let free = missing.min(self.share.available_permits());
        if free > 0
            && let Ok(taken) = self.share.clone().try_acquire_many_owned(free as u32)
        {
            charge.add(taken);
            missing -= free;
        }
        if missing == 0 {
            return;
        }
        let mut wait = Box::pin(self.share.clone().acquire_many_owned(missing as u32));
        // Polled once here to join the line now, not when its task first
        // runs.
        let noop = &mut Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(Ok(taken)) = wait.as_mut().poll(noop) {
            charge.add(taken);
            return;
        }
        let id = charge.next_id;
        charge.next_id += 1;
        let this = Arc::downgrade(self);
        let task = tokio::spawn(std::future::poll_fn(move |cx| {
            let Some(held) = this.upgrade() else {
                return Poll::Ready(());
            };
            let mut charge = held.retired.lock().unwrap_or_else(|e| e.into_inner());
            let poll = charge.poll_wait(id, cx);
            // Before `held`, which may be the last hold on it.
            drop(charge);
            poll
        }));
        charge.waiting.push(Waiting {
            id,
            places: missing,
            wait,
            task: task.abort_handle(),
        });
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let charge = self.retired.get_mut().unwrap_or_else(|e| e.into_inner());
        charge.waiting.clear();
        retired_places_moved(charge.places(), 0);
    }
}

/// Keeps the gauge of places charged for retired instances.
fn retired_places_moved(from: usize, to: usize) {
    if from != to {
        metrics::gauge!("wasmhive_client_places_for_retired_instances")
            .increment(to as f64 - from as f64);
    }
}

/// A request as the occupant of its instance.
struct Occupying {
    place: Place,
    per_instance: usize,
}

impl Occupant for Occupying {
    /// The instance's room is lost to everyone else until the requests
    /// keeping it are done, so they hold it between them: each is charged
    /// its part of the instance's places: those its client's share has
    /// free at once, and the next ones it frees (a client at its share gets
    /// no more in, which is the point; nor does one whose share is smaller
    /// than the part, until the instance is gone).
    fn keeps_retired(&self, holders: usize) {
        let part = self.per_instance.div_ceil(holders.max(1));
        self.place.0.charge(part.saturating_sub(1));
    }
}

/// A request keeping its connection busy; see [`ClientConnection::busy`].
pub struct Busy(Arc<ClientConnection>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut activity = self.0.activity.lock().unwrap_or_else(|e| e.into_inner());
        activity.0 -= 1;
        activity.1 = Instant::now();
    }
}

/// A response body that keeps its request in flight (its place in its
/// client's share, its connection busy) until it has been sent or dropped,
/// and tells its connection when its client stops taking it.
pub struct Holding<B> {
    body: B,
    clock: Arc<SendClock>,
    _place: Option<Place>,
    _busy: Busy,
}

impl<B> Holding<B> {
    /// `body`, holding `place` and `busy`. Its head is about to be sent:
    /// until the server first asks for the body, it waits for the client.
    pub fn new(body: B, place: Option<Place>, busy: Busy) -> Holding<B> {
        let clock = Arc::new(SendClock(Mutex::new(Some(Instant::now()))));
        let mut sending = busy.0.sending.lock().unwrap_or_else(|e| e.into_inner());
        // Bodies sent since the last look are gone: only those in flight
        // (at most the connection's streams) stay listed.
        sending.retain(|clock| clock.strong_count() > 0);
        sending.push(Arc::downgrade(&clock));
        drop(sending);
        Holding {
            body,
            clock,
            _place: place,
            _busy: busy,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Holding<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let poll = Pin::new(&mut self.body).poll_frame(cx);
        // The server comes back for more once the client has taken what it
        // got: a piece handed over starts the wait for the client.
        self.clock.set(match &poll {
            Poll::Ready(Some(Ok(_))) => Some(Instant::now()),
            _ => None,
        });
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_and_requests_are_capped_per_address() {
        let clients = Clients::new(2, 1, Duration::from_millis(10), 8);
        let (a, b) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let first = clients.connect(a).unwrap();
        let second = clients.connect(a).unwrap();
        assert!(clients.connect(a).is_none(), "a third connection from a");
        let other = clients.connect(b).expect("b has its own share");

        let place = first.request_place().await.expect("a's one place");
        assert!(second.request_place().await.is_none(), "a is at its share");
        assert!(other.request_place().await.is_some(), "b is not");
        drop(place);
        assert!(second.request_place().await.is_some());

        // The line is bounded: with none allowed to wait, the surplus is
        // refused at once.
        let strict = Clients::new(1, 1, Duration::from_secs(60), 0);
        let only = strict.connect(a).unwrap();
        let _held = only.request_place().await.unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(1), only.request_place());
        assert!(refused.await.expect("refused at once").is_none());

        // A closed connection gives its place back; the address's entry
        // goes once nothing of it is left.
        drop((first, second));
        assert!(clients.connect(a).is_some());
        drop(other);
        assert!(clients.shares.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_request_keeping_a_retired_instance_is_charged_its_part() {
        let clients = Clients::new(1, 4, Duration::from_millis(10), 8);
        let connection = clients.connect("127.0.0.1".parse().unwrap()).unwrap();
        let free = || connection.requests.available_permits();
        let place = connection.request_place().await.unwrap();
        // An instance of 4 places, kept by 2 requests: 2 places each.
        let occupant = place.occupant(4);
        occupant.keeps_retired(2);
        assert_eq!(free(), 2);
        // The share has 1 place free: the rest of the instance's is owed.
        let other = connection.request_place().await.unwrap();
        occupant.keeps_retired(1);
        assert_eq!(free(), 0);
        // The place the other request frees goes to the charge, not back
        // to the share.
        drop(other);
        assert_eq!(free(), 0);
        assert!(connection.request_place().await.is_none());
        occupant.keeps_retired(2);
        assert_eq!(free(), 2, "gives back what it no longer owes");
        // Its place and charge go with the last of the request's holds.
        drop(place);
        assert_eq!(free(), 2);
        drop(occupant);
        assert_eq!(free(), 4);
    }

    #[tokio::test]
    async fn a_charge_keeps_its_place_in_line_as_it_grows() {
        let clients = Clients::new(1, 4, Duration::from_secs(60), 8);
        let connection = Arc::new(clients.connect("127.0.0.1".parse().unwrap()).unwrap());
        let free = || connection.requests.available_permits();
        let place = connection.request_place().await.unwrap();
        let mut others = Vec::new();
        for _ in 0..3 {
            others.push(connection.request_place().await.unwrap());
        }
        // The share is full: the charge waits for 1 place, then a later
        // request waits, then the charge grows by 2.
        let occupant = place.occupant(4);
        occupant.keeps_retired(2);
        let later = tokio::spawn({
            let connection = connection.clone();
            async move { connection.request_place().await }
        });
        while clients.waiting.load(Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        occupant.keeps_retired(1);
        // The next place freed goes to the charge's first wait, ahead of
        // the later request; the increase waits behind that request.
        drop(others.pop());
        tokio::task::yield_now().await;
        assert_eq!(free(), 0);
        assert!(!later.is_finished(), "a later request overtook the charge");
        assert_eq!(place.0.retired.lock().unwrap().places(), 1);
        drop(others.pop());
        let got = later.await.unwrap().expect("the later request's place");
        drop(others.pop());
        drop(got);
        tokio::task::yield_now().await;
        assert_eq!(place.0.retired.lock().unwrap().places(), 3);
        assert_eq!(free(), 0);
        // The charge goes with the last of the request's holds.
        drop((place, occupant));
        assert_eq!(free(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_when_nothing_is_in_flight() {
        let clients = Clients::new(1, 1, Duration::from_millis(10), 8);
        let connection = Arc::new(clients.connect("127.0.0.1".parse().unwrap()).unwrap());
        let opened = Instant::now();
        assert_eq!(connection.idle_since(), Some(opened));
        let (first, second) = (connection.busy(), connection.busy());
        assert_eq!(connection.idle_since(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(first);
        assert_eq!(connection.idle_since(), None, "one still in flight");
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(second);
        assert_eq!(
            connection.idle_since(),
            Some(opened + Duration::from_secs(2))
        );
    }

    #[tokio::test]
    async fn a_connection_that_resets_more_than_it_finishes_is_abusive() {
        let clients = Clients::new(1, 1, Duration::from_millis(10), 8);
        let connection = clients.connect("127.0.0.1".parse().unwrap()).unwrap();
        for _ in 0..FREE_RESETS * 2 {
            connection.finished();
        }
        for _ in 0..FREE_RESETS * 2 {
            connection.reset();
        }
        let flagged = tokio::time::timeout(Duration::from_millis(10), connection.abusive());
        assert!(
            flagged.await.is_err(),
            "as many resets as finished requests"
        );
        connection.reset();
        let flagged = tokio::time::timeout(Duration::from_secs(1), connection.abusive());
        assert!(flagged.await.is_ok(), "one reset more");
    }
}
