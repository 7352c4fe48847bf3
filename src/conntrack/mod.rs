//! The connection tracker: a bounded, sharded table of connections with
//! IPVS's TCP states and timeouts and IPVS's per-backend counts.
//!
//! A dataplane [`insert`](Conntrack::insert)s a connection when it
//! schedules its first packet, then calls [`lookup`](Conntrack::lookup) for
//! every later client packet and [`lookup_reply`](Conntrack::lookup_reply)
//! for every backend packet. Each packet advances the connection's state
//! ([`ConnState`]) and restarts its timer with the new state's timeout
//! ([`Timeouts`]). Expired connections are reaped by the caller's timer
//! ([`poll_timeout`](Conntrack::poll_timeout) /
//! [`handle_timeout`](Conntrack::handle_timeout)), in bounded steps.
//!
//! # Layout
//! - Shards: [`ConntrackConfig::effective_shards`], each a
//!   `parking_lot::Mutex` around two open-addressing tables of inline
//!   entries (linear probing, backward-shift deletion): one for all-IPv4
//!   connections (40 bytes an entry), one for the rest (IPv6, mixed
//!   families). A packet takes exactly one shard lock.
//! - Bound: the capacity is split evenly among the shards; a shard at its
//!   share evicts before it inserts. Tables grow by doubling up to 4/3 of
//!   the shard's share (load 0.75 at the bound) and never again, so a warm
//!   tracker allocates nothing.
//! - Keyed hashing: shard and slot come from ahash keyed with a secret
//!   ([`ConntrackConfig::hash_key`], by default drawn from the OS), so that
//!   clients, who choose their addresses and ports, cannot aim their flows
//!   at one slot (hash flooding).
//!
//! # Eviction
//! Approximate LRU per shard, in the spirit of Cilium's LRU maps (and of
//! Redis's sampled LRU): the first 8 occupied slots from the new flow's home
//! slot in the shard's larger table are sampled (at most 64 slots scanned
//! once one is found); an expired entry among them goes at once, otherwise
//! the one whose last packet is oldest (its expiry minus its state's
//! timeout). The home slot comes from the secret-keyed hash, so the sample
//! is random to an outsider, and it is the stretch the insert's own probe
//! has just read, so eviction costs little more than the probe.
//!
//! # Expiry
//! An entry whose expiry has passed (`now >= expires`) counts as absent for
//! [`lookup`](Conntrack::lookup), [`get`](Conntrack::get),
//! [`remove`](Conntrack::remove) and [`entries`](Conntrack::entries), but
//! stays in the table (and in the [`counts`](Conntrack::counts), as IPVS
//! keeps a connection counted until its timer fires) until a sweep step
//! or an [`insert`](Conntrack::insert) of the same flow takes it out.
//!
//! # Examples
//! ```
//! use core::time::Duration;
//! use svclb::conntrack::*;
//! use svclb::{Flow, Instant};
//!
//! let ct = Conntrack::new(ConntrackConfig::new(1024)?.hash_key([1, 2, 3, 4]));
//! let flow = Flow::tcp("10.2.0.9:40000".parse()?, "10.96.0.10:80".parse()?);
//! let backend_addr = "10.1.0.5:8080".parse()?;
//! let t0 = Instant::from_secs(1);
//! let state = ct.insert(&flow, FrontendId(0), BackendId(5), backend_addr, TcpFlags::SYN, t0);
//! assert_eq!(state, ConnState::Tcp(TcpState::SynRecv));
//! ct.lookup_reply(&flow, TcpFlags::SYN | TcpFlags::ACK, t0).unwrap();
//! let hit = ct.lookup(&flow, TcpFlags::ACK, t0).unwrap();
//! assert_eq!(hit.state, ConnState::Tcp(TcpState::Established));
//! assert_eq!(ct.counts(BackendId(5)), (1, 0));
//! // Idle for 900 s: gone.
//! let later = t0 + Duration::from_secs(900);
//! assert!(ct.lookup(&flow, TcpFlags::ACK, later).is_none());
//! assert_eq!(ct.handle_timeout(later), 1);
//! assert!(ct.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod config;
mod counts;
mod state;
mod table;
mod timeouts;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

pub use config::{ConntrackConfig, DEFAULT_CONNTRACK_CAPACITY, MAX_CONNTRACK_CAPACITY};
pub use state::{ConnState, Direction, ParseTcpFlagsError, SctpState, TcpFlags, TcpState};
pub use timeouts::Timeouts;

use counts::BackendCounts;
use state::{STATE_CODES, Transitions, is_active_code};
use table::{Entry, Table, V4Entry, V4Key, WideEntry, max_slots};

use crate::{Flow, Instant};

pub use crate::plan::{BackendId, FrontendId};

/// One tracked connection, as [`Conntrack::get`] and
/// [`Conntrack::entries`] return it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Tracked {
    /// The flow in the original direction (client to frontend).
    pub flow: Flow,
    /// The frontend it came in through.
    pub frontend: FrontendId,
    /// The backend it was scheduled to.
    pub backend: BackendId,
    /// The backend's address (the DNAT destination).
    pub backend_addr: SocketAddr,
    /// Its state.
    pub state: ConnState,
    /// When it expires unless another packet comes.
    pub expires: Instant,
}

/// What a packet of a tracked connection learns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Hit {
    /// The connection's frontend.
    pub frontend: FrontendId,
    /// The connection's backend.
    pub backend: BackendId,
    /// The backend's address.
    pub backend_addr: SocketAddr,
    /// The state after this packet.
    pub state: ConnState,
    /// The state before this packet.
    pub previous: ConnState,
}

/// Slots sampled for eviction (occupied ones).
const EVICT_SAMPLE: usize = 8;
/// Slots scanned for one eviction once a candidate is found.
const EVICT_SCAN: usize = 64;
/// `next_sweep` while nothing was ever inserted.
const UNSET: u64 = u64::MAX;

struct ShardInner {
    v4: Table<V4Entry>,
    wide: Table<WideEntry>,
    /// Sweep cursors.
    sweep_v4: usize,
    sweep_wide: usize,
}

impl ShardInner {
    fn len(&self) -> usize {
        self.v4.len() + self.wide.len()
    }
}

/// One shard, on its own cache lines.
#[repr(align(64))]
struct Shard {
    inner: Mutex<ShardInner>,
    /// `inner.len()`, readable without the lock.
    len: AtomicUsize,
    /// This shard's share of the bound.
    bound: usize,
}

/// Where a flow lives.
enum Place {
    V4 { key: V4Key, hash: u32 },
    Wide,
}

/// Where a flow's entry was found.
#[derive(Clone, Copy)]
enum Found {
    V4(usize),
    Wide(usize),
}

/// The connection tracking table. `Send + Sync`: share it by reference
/// among packet threads; every method takes `&self`.
///
/// See the [module docs](self) for the layout, eviction and expiry rules.
pub struct Conntrack {
    shards: Box<[Shard]>,
    config: ConntrackConfig,
    hasher: ahash::RandomState,
    /// Timeouts in nanoseconds by state code.
    timeouts: [u64; STATE_CODES],
    /// The state machines by state code.
    transitions: Transitions,
    counts: BackendCounts,
    /// The next sweep step, in nanoseconds.
    next_sweep: AtomicU64,
}

impl core::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Conntrack")
            .field("config", &self.config)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// Sweep `budget` slots of `t` from `cursor`, removing expired entries.
fn sweep<E: Entry>(
    t: &mut Table<E>,
    cursor: &mut usize,
    budget: usize,
    now: u64,
    counts: &BackendCounts,
) -> usize {
    let n = t.slot_count();
    if n == 0 {
        return 0;
    }
    let mut removed = 0;
    for _ in 0..budget.min(n) {
        if *cursor >= n {
            *cursor = 0;
        }
        let e = *t.get(*cursor);
        if e.code() != 0 && now >= e.expires() {
            t.remove_at(*cursor);
            counts.sub(e.backend(), e.state().is_active());
            removed += 1;
            if t.len() == 0 {
                break;
            }
        } else {
            *cursor += 1;
        }
    }
    removed
}

impl Conntrack {
    /// An empty tracker. Allocates the shards, not yet their tables.
    pub fn new(config: ConntrackConfig) -> Self {
        Self::with_counts(config, std::sync::Arc::default())
    }

    /// An empty tracker that keeps `counts` up to date (the dataplane's
    /// per-backend counts, read by least-connection schedulers).
    pub fn with_counts(
        config: ConntrackConfig,
        counts: std::sync::Arc<crate::scheduler::ConnectionCounts>,
    ) -> Self {
        let n = config.effective_shards();
        let cap = config.capacity();
        let shards = (0..n)
            .map(|i| {
                let bound = cap / n + usize::from(i < cap % n);
                Shard {
                    inner: Mutex::new(ShardInner {
                        v4: Table::new(max_slots(bound)),
                        wide: Table::new(max_slots(bound)),
                        sweep_v4: 0,
                        sweep_wide: 0,
                    }),
                    len: AtomicUsize::new(0),
                    bound,
                }
            })
            .collect();
        let [k0, k1, k2, k3] = config.key();
        Conntrack {
            shards,
            hasher: ahash::RandomState::with_seeds(k0, k1, k2, k3),
            timeouts: config.timeout_values().nanos_table(),
            transitions: Transitions::new(),
            counts: BackendCounts::shared(counts),
            next_sweep: AtomicU64::new(UNSET),
            config,
        }
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &ConntrackConfig {
        &self.config
    }

    #[inline]
    fn shard_of(&self, hash: u64) -> usize {
        (((hash >> 32) * self.shards.len() as u64) >> 32) as usize
    }

    #[inline]
    fn wide_hash(&self, flow: &Flow) -> u64 {
        self.hasher.hash_one(flow)
    }

    /// The shard and table of `flow`.
    #[inline]
    fn place(&self, flow: &Flow) -> (usize, Place) {
        match V4Key::of(flow) {
            Some(key) => {
                let h = self.hasher.hash_one(key.words());
                (
                    self.shard_of(h),
                    Place::V4 {
                        key,
                        hash: h as u32,
                    },
                )
            }
            None => (self.shard_of(self.wide_hash(flow)), Place::Wide),
        }
    }

    /// Finds `flow`'s entry (live or dead) in a locked shard.
    #[inline]
    fn find(&self, inner: &ShardInner, flow: &Flow, place: &Place) -> Option<Found> {
        if let Place::V4 { key, hash } = place {
            if let Ok(i) = inner.v4.find(key, *hash) {
                return Some(Found::V4(i));
            }
            if inner.wide.len() == 0 {
                return None;
            }
        }
        inner
            .wide
            .find(flow, self.wide_hash(flow) as u32)
            .ok()
            .map(Found::Wide)
    }

    /// Moves a live entry by one packet.
    #[inline]
    fn advance<E: Entry>(
        &self,
        e: &mut E,
        direction: Direction,
        flags: TcpFlags,
        now: u64,
    ) -> Option<Hit> {
        if now >= e.expires() {
            return None;
        }
        let previous = e.code();
        let state = self.transitions.next(direction, flags, previous);
        if state != previous {
            let active = is_active_code(state);
            if active != is_active_code(previous) {
                self.counts.change(e.backend(), active);
            }
            e.set_code(state);
        }
        e.set_expires(now.saturating_add(self.timeouts[state as usize]));
        Some(Hit {
            frontend: FrontendId(e.frontend()),
            backend: BackendId(e.backend()),
            backend_addr: e.backend_addr(),
            state: ConnState::from_code(state),
            previous: ConnState::from_code(previous),
        })
    }

    fn packet(
        &self,
        flow: &Flow,
        direction: Direction,
        flags: TcpFlags,
        now: Instant,
    ) -> Option<Hit> {
        let now = now.as_nanos();
        let (s, place) = self.place(flow);
        let mut inner = self.shards[s].inner.lock();
        match self.find(&inner, flow, &place)? {
            Found::V4(i) => self.advance(inner.v4.get_mut(i), direction, flags, now),
            Found::Wide(i) => self.advance(inner.wide.get_mut(i), direction, flags, now),
        }
    }

    /// A packet of `flow` in the original direction (client to frontend).
    ///
    /// On a live entry: advances the state machine with `flags` (TCP; other
    /// protocols ignore them), restarts the timer with the new state's
    /// timeout and returns the [`Hit`]. `None` if the flow is not tracked
    /// or its entry has expired (`now >= expires`); an expired entry is
    /// left for the sweep. Takes one shard lock and allocates nothing.
    pub fn lookup(&self, flow: &Flow, flags: TcpFlags, now: Instant) -> Option<Hit> {
        self.packet(flow, Direction::Original, flags, now)
    }

    /// A reply packet (backend to client) of the connection whose
    /// original-direction flow is `orig` (the caller reverses the reply's
    /// addresses and undoes the NAT). Runs the state machine with
    /// [`Direction::Reply`]: IPVS's output rows for TCP, `replied` for UDP,
    /// ESTABLISHED for a new SCTP association. Otherwise as
    /// [`lookup`](Self::lookup).
    pub fn lookup_reply(&self, orig: &Flow, flags: TcpFlags, now: Instant) -> Option<Hit> {
        self.packet(orig, Direction::Reply, flags, now)
    }

    /// The live entry of `flow`, with no state change and no refresh.
    pub fn get(&self, flow: &Flow, now: Instant) -> Option<Tracked> {
        let (s, place) = self.place(flow);
        let inner = self.shards[s].inner.lock();
        let t = match self.find(&inner, flow, &place)? {
            Found::V4(i) => inner.v4.get(i).tracked(),
            Found::Wide(i) => inner.wide.get(i).tracked(),
        };
        (now < t.expires).then_some(t)
    }

    fn remove_found(&self, inner: &mut ShardInner, found: Found) -> Tracked {
        let t = match found {
            Found::V4(i) => inner.v4.remove_at(i).tracked(),
            Found::Wide(i) => inner.wide.remove_at(i).tracked(),
        };
        self.counts.sub(t.backend.0, t.state.is_active());
        t
    }

    /// Last packet time of an entry.
    #[inline]
    fn last_use<E: Entry>(&self, e: &E) -> u64 {
        e.expires().saturating_sub(self.timeouts[e.code() as usize])
    }

    /// Samples up to [`EVICT_SAMPLE`] occupied slots from slot `start` on;
    /// the index of the victim (the first expired entry, else the least
    /// recently used).
    fn victim<E: Entry>(&self, t: &Table<E>, start: usize, now: u64) -> Option<usize> {
        let n = t.slot_count();
        if t.len() == 0 {
            return None;
        }
        let mut best: Option<(usize, u64)> = None;
        let mut seen = 0;
        let mut i = start;
        for step in 0..n {
            let e = t.get(i);
            if e.code() != 0 {
                if now >= e.expires() {
                    return Some(i);
                }
                let used = self.last_use(e);
                if best.is_none_or(|(_, b)| used < b) {
                    best = Some((i, used));
                }
                seen += 1;
                if seen == EVICT_SAMPLE {
                    break;
                }
            } else if step >= EVICT_SCAN && best.is_some() {
                break;
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        best.map(|(i, _)| i)
    }

    /// Evicts one entry of a full shard, from its larger table, sampling
    /// the slots from the new flow's home slot on (`hash`: the new flow's
    /// slot hash, random under the secret key).
    fn evict(&self, inner: &mut ShardInner, hash: u32, now: u64) {
        let ShardInner { v4, wide, .. } = inner;
        // (The field list keeps the sweep cursors out of the borrow.)
        if v4.len() >= wide.len() {
            if let Some(i) = self.victim(v4, v4.home_of(hash), now) {
                let e = v4.remove_at(i);
                self.counts.sub(e.backend(), e.state().is_active());
            }
        } else if let Some(i) = self.victim(wide, wide.home_of(hash), now) {
            let e = wide.remove_at(i);
            self.counts.sub(e.backend(), e.state().is_active());
        }
    }

    /// Tracks a new connection from its first packet (original direction)
    /// and returns its state: TCP by IPVS's input transition from NONE (SYN
    /// gives SYN_RECV, a bare ACK ESTABLISHED, anything else CLOSE), UDP
    /// unreplied, SCTP INIT1.
    ///
    /// Replaces any entry the flow already has, live or dead. When the
    /// flow's shard is at its share of the bound, evicts one entry first
    /// (approximate LRU; see the [module docs](self)), so the table never
    /// holds more than [`capacity`](Self::capacity) entries. Takes one
    /// shard lock; allocates only while a table is still growing to its
    /// final size (and the first time a backend id's counter chunk is used).
    pub fn insert(
        &self,
        flow: &Flow,
        frontend: FrontendId,
        backend: BackendId,
        backend_addr: SocketAddr,
        flags: TcpFlags,
        now: Instant,
    ) -> ConnState {
        let state = ConnState::initial(flow.protocol, flags);
        let now = now.as_nanos();
        let expires = now.saturating_add(self.timeouts[state.code() as usize]);
        let (s, place) = self.place(flow);
        let shard = &self.shards[s];
        let mut inner = shard.inner.lock();
        // The empty slot a v4 miss ended on, valid until the table changes.
        let mut hint = usize::MAX;
        match &place {
            Place::V4 { key, hash } => match inner.v4.find(key, *hash) {
                Ok(i) => {
                    self.remove_found(&mut inner, Found::V4(i));
                }
                Err(i) => {
                    hint = i;
                    if inner.wide.len() > 0 {
                        if let Ok(i) = inner.wide.find(flow, self.wide_hash(flow) as u32) {
                            self.remove_found(&mut inner, Found::Wide(i));
                        }
                    }
                }
            },
            Place::Wide => {
                if let Ok(i) = inner.wide.find(flow, self.wide_hash(flow) as u32) {
                    self.remove_found(&mut inner, Found::Wide(i));
                }
            }
        }
        if inner.len() >= shard.bound {
            let h = match &place {
                Place::V4 { hash, .. } => *hash,
                Place::Wide => self.wide_hash(flow) as u32,
            };
            self.evict(&mut inner, h, now);
            hint = usize::MAX;
        }
        match (&place, backend_addr) {
            (Place::V4 { key, hash }, SocketAddr::V4(baddr)) => {
                let e = V4Entry::new(key, *hash, frontend.0, backend.0, baddr, state, expires);
                inner.v4.insert_absent(e, hint);
            }
            _ => {
                let h = self.wide_hash(flow) as u32;
                let e =
                    WideEntry::new(flow, h, frontend.0, backend.0, backend_addr, state, expires);
                inner.wide.insert_absent(e, usize::MAX);
            }
        }
        self.counts.add(backend.0, state.is_active());
        shard.len.store(inner.len(), Ordering::Relaxed);
        drop(inner);
        if self.next_sweep.load(Ordering::Relaxed) == UNSET {
            let first = now.saturating_add(duration_nanos(self.config.sweep_period()));
            let _ = self.next_sweep.compare_exchange(
                UNSET,
                first.min(UNSET - 1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        state
    }

    /// Stops tracking `flow`; returns its entry if it was live (a dead
    /// entry is removed too, and `None` returned).
    pub fn remove(&self, flow: &Flow) -> Option<Tracked> {
        self.remove_at(flow, None)
    }

    fn remove_at(&self, flow: &Flow, now: Option<u64>) -> Option<Tracked> {
        let (s, place) = self.place(flow);
        let shard = &self.shards[s];
        let mut inner = shard.inner.lock();
        let found = self.find(&inner, flow, &place)?;
        let t = self.remove_found(&mut inner, found);
        shard.len.store(inner.len(), Ordering::Relaxed);
        match now {
            Some(now) if now >= t.expires.as_nanos() => None,
            _ => Some(t),
        }
    }

    /// Stops tracking `flow` as seen at `now`: like [`remove`](Self::remove),
    /// but returns `None` for an entry that had expired by `now`.
    pub fn remove_live(&self, flow: &Flow, now: Instant) -> Option<Tracked> {
        self.remove_at(flow, Some(now.as_nanos()))
    }

    /// `(active, inactive)` connections of `backend` as IPVS counts them
    /// (`ActiveConn`, `InActConn`): active = TCP or SCTP ESTABLISHED.
    /// Kept up to date on insert, state change, removal, sweep and
    /// eviction; an expired entry counts until it is swept. O(1).
    pub fn counts(&self, backend: BackendId) -> (u32, u32) {
        self.counts.get(backend.0)
    }

    /// Active plus inactive connections of `backend`.
    pub fn connections(&self, backend: BackendId) -> u32 {
        let (a, i) = self.counts(backend);
        a + i
    }

    /// When the tracker next needs [`handle_timeout`](Self::handle_timeout):
    /// the next sweep step while entries exist, `None` when empty.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_empty() {
            return None;
        }
        match self.next_sweep.load(Ordering::Relaxed) {
            UNSET => Some(Instant::ZERO),
            t => Some(Instant::from_nanos(t)),
        }
    }

    /// One sweep step: in every shard, examines at most
    /// [`reap_batch`](ConntrackConfig::reap_batch) slots from where the
    /// last step stopped and removes the expired entries (counts updated),
    /// under that shard's lock only. Returns how many it removed. A full
    /// pass over a shard takes `slots / reap_batch` steps (rounded up), so
    /// an entry is reaped at most that many sweep intervals after it
    /// expires. Schedules the next step one sweep interval after `now`.
    pub fn handle_timeout(&self, now: Instant) -> usize {
        let now_ns = now.as_nanos();
        let batch = self.config.reap_batch_size();
        let mut removed = 0;
        for shard in self.shards.iter() {
            if shard.len.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut inner = shard.inner.lock();
            let inner = &mut *inner;
            let (nv, nw) = (inner.v4.slot_count(), inner.wide.slot_count());
            let wide_budget = if inner.wide.len() == 0 {
                0
            } else if inner.v4.len() == 0 {
                batch
            } else {
                (batch * nw / (nv + nw)).clamp(1, batch)
            };
            let v4_budget = batch - wide_budget.min(batch);
            removed += sweep(
                &mut inner.v4,
                &mut inner.sweep_v4,
                v4_budget,
                now_ns,
                &self.counts,
            );
            removed += sweep(
                &mut inner.wide,
                &mut inner.sweep_wide,
                wide_budget,
                now_ns,
                &self.counts,
            );
            shard.len.store(inner.len(), Ordering::Relaxed);
        }
        let next = now_ns.saturating_add(duration_nanos(self.config.sweep_period()));
        self.next_sweep
            .store(next.min(UNSET - 1), Ordering::Relaxed);
        removed
    }

    /// Keeps the entries for which `keep` returns true and removes the rest
    /// (live or dead), e.g. to flush the UDP flows of a removed backend
    /// (`|t| t.backend != gone`). Returns how many it removed.
    ///
    /// Works in steps of at most [`reap_batch`](ConntrackConfig::reap_batch)
    /// slots per shard lock, so packets keep flowing meanwhile. `keep` may
    /// be called more than once for an entry (entries move when others are
    /// removed, or a table grows, between two steps); entries inserted
    /// meanwhile may or may not be visited.
    pub fn retain(&self, mut keep: impl FnMut(&Tracked) -> bool) -> usize {
        let batch = self.config.reap_batch_size();
        let mut removed = 0;
        for shard in self.shards.iter() {
            removed += self.retain_table(shard, batch, &mut keep, |i| &mut i.v4);
            removed += self.retain_table(shard, batch, &mut keep, |i| &mut i.wide);
        }
        removed
    }

    fn retain_table<E: Entry>(
        &self,
        shard: &Shard,
        batch: usize,
        keep: &mut impl FnMut(&Tracked) -> bool,
        table: impl Fn(&mut ShardInner) -> &mut Table<E>,
    ) -> usize {
        let mut removed = 0;
        let mut cursor = 0;
        // (generation, removals) as this walk left the table.
        let mut seen: Option<(u64, u64)> = None;
        loop {
            let mut inner = shard.inner.lock();
            let t = table(&mut inner);
            match seen {
                Some((g, _)) if g != t.generation() => cursor = 0,
                // Others' removals may have shifted entries back across the
                // cursor, by one slot each at most.
                Some((_, r)) => cursor = t.back_up(cursor, t.removals().wrapping_sub(r)),
                None => {}
            }
            let n = t.slot_count();
            let mut budget = batch;
            while budget > 0 && cursor < n {
                budget -= 1;
                let e = *t.get(cursor);
                if e.code() != 0 && !keep(&e.tracked()) {
                    t.remove_at(cursor);
                    self.counts.sub(e.backend(), e.state().is_active());
                    removed += 1;
                } else {
                    cursor += 1;
                }
            }
            seen = Some((t.generation(), t.removals()));
            let len = inner.len();
            shard.len.store(len, Ordering::Relaxed);
            if cursor >= n {
                return removed;
            }
        }
    }

    /// Entries in the table, the expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.len.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.shards
            .iter()
            .all(|s| s.len.load(Ordering::Relaxed) == 0)
    }

    /// The bound on entries ([`ConntrackConfig::capacity`]).
    pub fn capacity(&self) -> usize {
        self.config.capacity()
    }

    /// Every live entry, shard by shard (allocates; for inspection such as
    /// a `conntrack -L` listing).
    pub fn entries(&self, now: Instant) -> Vec<Tracked> {
        let mut out = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            let inner = shard.inner.lock();
            let live = |t: &Tracked| now < t.expires;
            out.extend(inner.v4.iter().map(Entry::tracked).filter(live));
            out.extend(inner.wide.iter().map(Entry::tracked).filter(live));
        }
        out
    }

    /// Bytes of table memory (shards, slots, backend counters) per tracked
    /// connection at the current size: [`memory_total_bytes`]
    /// divided by [`len`](Self::len) (by 1 when empty). About 53 bytes for
    /// IPv4 connections at the bound (40-byte entries at load 0.75).
    ///
    /// [`memory_total_bytes`]: Self::memory_total_bytes
    pub fn memory_bytes(&self) -> usize {
        self.memory_total_bytes() / self.len().max(1)
    }

    /// Bytes of table memory in all: the tracker, its shards, their slot
    /// arrays and the backend counters.
    pub fn memory_total_bytes(&self) -> usize {
        let slots: usize = self
            .shards
            .iter()
            .map(|s| {
                let inner = s.inner.lock();
                inner.v4.memory_bytes() + inner.wide.memory_bytes()
            })
            .sum();
        size_of::<Self>()
            + self.shards.len() * size_of::<Shard>()
            + slots
            + self.counts.memory_bytes()
    }
}

fn duration_nanos(d: core::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::time::Duration;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn flow(i: u32) -> Flow {
        Flow::tcp(
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(0x0A00_0000 + i), 40_000)),
            "10.96.0.1:80".parse().unwrap(),
        )
    }

    fn ct(cap: usize) -> Conntrack {
        Conntrack::new(ConntrackConfig::new(cap).unwrap().hash_key([9, 8, 7, 6]))
    }

    const B: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 8080));

    #[test]
    fn send_sync() {
        fn is<T: Send + Sync>() {}
        is::<Conntrack>();
    }

    #[test]
    fn insert_lookup_remove() {
        let ct = ct(100);
        let t0 = Instant::from_secs(1);
        let s = ct.insert(&flow(1), FrontendId(1), BackendId(2), B, TcpFlags::SYN, t0);
        assert_eq!(s, ConnState::Tcp(TcpState::SynRecv));
        assert_eq!(ct.counts(BackendId(2)), (0, 1));
        let hit = ct.lookup(&flow(1), TcpFlags::ACK, t0).unwrap();
        assert_eq!(hit.previous, ConnState::Tcp(TcpState::SynRecv));
        assert_eq!(hit.state, ConnState::Tcp(TcpState::Established));
        assert_eq!(hit.backend_addr, B);
        assert_eq!(ct.counts(BackendId(2)), (1, 0));
        assert!(ct.lookup(&flow(2), TcpFlags::ACK, t0).is_none());
        let got = ct.get(&flow(1), t0).unwrap();
        assert_eq!(got.flow, flow(1));
        assert_eq!(got.expires, t0 + Duration::from_secs(900));
        assert_eq!(ct.remove(&flow(1)).unwrap().backend, BackendId(2));
        assert_eq!(ct.counts(BackendId(2)), (0, 0));
        assert!(ct.is_empty());
    }

    #[test]
    fn wide_and_mixed_entries() {
        let ct = ct(100);
        let t0 = Instant::ZERO;
        let v6 = Flow::udp(
            "[fd00::1]:5000".parse().unwrap(),
            "[fd00::a]:53".parse().unwrap(),
        );
        let b6: SocketAddr = "[fd00::99]:53".parse().unwrap();
        ct.insert(&v6, FrontendId(0), BackendId(1), b6, TcpFlags::NONE, t0);
        // An IPv4 flow with an IPv6 backend lives in the wide table.
        ct.insert(&flow(3), FrontendId(0), BackendId(1), b6, TcpFlags::SYN, t0);
        assert_eq!(ct.len(), 2);
        let hit = ct.lookup_reply(&v6, TcpFlags::NONE, t0).unwrap();
        assert_eq!(hit.state, ConnState::Udp { replied: true });
        assert_eq!(
            ct.lookup(&flow(3), TcpFlags::ACK, t0).unwrap().backend_addr,
            b6
        );
        // Re-inserting with an IPv4 backend moves it to the v4 table.
        ct.insert(&flow(3), FrontendId(0), BackendId(1), B, TcpFlags::SYN, t0);
        assert_eq!(ct.len(), 2);
        assert_eq!(ct.get(&flow(3), t0).unwrap().backend_addr, B);
        assert_eq!(ct.connections(BackendId(1)), 2);
        assert_eq!(ct.entries(t0).len(), 2);
    }

    #[test]
    fn bound_holds_and_evicts_oldest_sampled() {
        let ct = ct(64);
        for i in 0..1000 {
            let now = Instant::from_millis(u64::from(i));
            ct.insert(&flow(i), FrontendId(0), BackendId(0), B, TcpFlags::SYN, now);
            assert!(ct.len() <= 64);
        }
        assert_eq!(ct.len(), 64);
        assert_eq!(ct.connections(BackendId(0)), 64);
        // The most recent flow survives.
        assert!(ct.get(&flow(999), Instant::from_secs(1)).is_some());
    }

    #[test]
    fn sweep_and_retain() {
        let ct = Conntrack::new(
            ConntrackConfig::new(16_384)
                .unwrap()
                .hash_key([1, 1, 1, 1])
                .reap_batch(64)
                .unwrap(),
        );
        for i in 0..3000 {
            let b = BackendId(i % 3);
            ct.insert(&flow(i), FrontendId(0), b, B, TcpFlags::SYN, Instant::ZERO);
        }
        assert_eq!(ct.retain(|t| t.backend != BackendId(1)), 1000);
        assert_eq!(ct.len(), 2000);
        assert_eq!(ct.connections(BackendId(1)), 0);
        let late = Instant::from_secs(61);
        let mut calls = 0;
        let mut removed = 0;
        while !ct.is_empty() {
            removed += ct.handle_timeout(late);
            calls += 1;
            assert!(calls < 100);
        }
        assert_eq!(removed, 2000);
        assert_eq!(ct.poll_timeout(), None);
    }
}
