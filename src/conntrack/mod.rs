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
//! - Shards: [`ConntrackConfig::effective_shards`], each with two
//!   open-addressing tables of inline entries (linear probing,
//!   backward-shift deletion): one for all-IPv4 connections (40 bytes an
//!   entry), one for the rest (IPv6, mixed families; 104 bytes).
//! - Bound: the capacity is split evenly among the shards; a shard at its
//!   share evicts before it inserts. Tables grow in steps (16 slots, ×8
//!   while a step is at most 1/64 of the last, then 4/3 of the shard's
//!   share: load 0.75 at the bound) and never again, so a warm tracker
//!   allocates nothing. The arrays of the earlier steps stay allocated (at
//!   most 1/56 of the last), so that packet threads read the current one
//!   with a plain atomic load.
//! - Persistence: in IPVS mode an entry scheduled through a `ClientIP`
//!   template carries the template's control code (key kind and 6-bit
//!   generation, in spare bits of the control word), and the tracker counts
//!   the template's live connections (the kernel's `n_control`) from insert
//!   to removal, whatever removes it (close, flush, eviction, sweep), so
//!   that the affinity table keeps the template while it controls any.
//! - Keyed hashing: shard and slot come from ahash keyed with a secret
//!   ([`ConntrackConfig::hash_key`], by default drawn from the OS), so that
//!   clients, who choose their addresses and ports, cannot aim their flows
//!   at one slot (hash flooding).
//!
//! # Concurrency
//! A packet of a tracked connection ([`lookup`](Conntrack::lookup),
//! [`lookup_reply`](Conntrack::lookup_reply), [`get`](Conntrack::get))
//! takes no shared lock, as netfilter's RCU lookups and Cilium's map
//! lookups take none. A packet of an all-IPv4 connection that changes
//! nothing (its state stays, and its expiry is already the one it would set:
//! see [`EXPIRY_GRAIN_NS`]) writes nothing at all: it probes the shard's
//! slot array and reads the entry as a seqlock reader, checking that the
//! slot's control word and the shard's sequence word did not change across
//! the read. Any other packet locks the one slot that holds its connection
//! (a bit in the slot's own control word, so the only cache line written is
//! the connection's), updates state and expiry and lets go. Two packet
//! threads share a written cache line only for the same connection, and
//! only for packets that change it.
//!
//! Everything that adds, moves or removes entries ([`insert`](Conntrack::insert),
//! removal, eviction, the sweep, [`retain`](Conntrack::retain), growth)
//! holds the shard's mutex and each slot's lock while it changes it, and
//! marks the shard's sequence word odd meanwhile (a seqlock). A probe that
//! finds nothing counts as a miss only if the sequence word was even and
//! unchanged across it; otherwise, and when a slot stays locked (a slot of
//! an array that growth has replaced stays locked for good), the packet
//! takes the shard's mutex and looks again. So a tracked connection is
//! never missed while an entry moves past its probe.
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
//! A new entry expires its state's timeout after its first packet, to the
//! nanosecond; a later packet sets its new state's timeout from the packet,
//! rounded up to a multiple of [`EXPIRY_GRAIN_NS`] (1/16 s; whole seconds
//! stay exact). An entry whose expiry has passed (`now >= expires`) counts as absent for
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
pub(crate) mod control;
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
use std::sync::Arc;
use table::{
    Layout, Levels, Table, V4, V4Key, Wide, WideKey, WriteSeq, code_of, max_slots, with_code,
    with_control, with_masq,
};

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
    /// Whether the dataplane that tracked the connection source-NATs it
    /// (decided at its first packet and kept, as netfilter keeps a
    /// connection's NAT binding); `false` for a connection tracked with
    /// [`Conntrack::insert`].
    pub masquerade: bool,
}

/// The grain of the expiry a packet sets: its state's timeout from the
/// packet, rounded up to a multiple of 1/16 s (the kernel's timers run in
/// jiffies, and Cilium keeps lifetimes in seconds). So every packet of a
/// connection after the first in one grain finds its expiry already set and
/// writes nothing; an entry outlives its last packet by its timeout plus
/// less than one grain. A new entry's expiry is exact.
pub const EXPIRY_GRAIN_NS: u64 = 62_500_000;

/// The expiry a packet at `now` (nanoseconds) sets with `timeout`: see
/// [`EXPIRY_GRAIN_NS`].
#[inline]
fn refreshed(now: u64, timeout: u64) -> u64 {
    let t = now.saturating_add(timeout);
    match t % EXPIRY_GRAIN_NS {
        0 => t,
        r => t.saturating_add(EXPIRY_GRAIN_NS - r),
    }
}

/// What [`Conntrack::peek`] found.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Peek {
    /// A live entry the packet does not change.
    Hit(V4Hit),
    /// No entry.
    Untracked,
    /// Take [`Conntrack::lookup`].
    Slow,
}

/// An all-IPv4 connection's entry, as a read-only hit found it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct V4Hit {
    /// The frontend.
    pub(crate) frontend: FrontendId,
    /// The backend.
    pub(crate) backend: BackendId,
    /// The backend's address.
    pub(crate) backend_addr: std::net::SocketAddrV4,
    /// The state code (unchanged by the packet).
    pub(crate) code: u8,
    /// The masquerade decision.
    pub(crate) masquerade: bool,
}

impl V4Hit {
    /// The state (before and after the packet).
    #[inline]
    pub(crate) fn state(&self) -> ConnState {
        ConnState::from_code(self.code)
    }

    #[inline]
    fn hit(&self) -> Hit {
        let state = self.state();
        Hit {
            frontend: self.frontend,
            backend: self.backend,
            backend_addr: SocketAddr::V4(self.backend_addr),
            state,
            previous: state,
            masquerade: self.masquerade,
        }
    }
}

/// Slots sampled for eviction (occupied ones).
const EVICT_SAMPLE: usize = 8;
/// Slots scanned for one eviction once a candidate is found.
const EVICT_SCAN: usize = 64;
/// `next_sweep` while nothing was ever inserted.
const UNSET: u64 = u64::MAX;

struct ShardInner {
    v4: Table<V4>,
    wide: Table<Wide>,
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
    /// The writer's lock: inserts, removals, sweeps. Packets of tracked
    /// connections do not take it.
    inner: Mutex<ShardInner>,
    /// Odd while the writer moves entries ([`WriteSeq`]).
    seq: AtomicU64,
    /// The slot arrays, for lock-free reads.
    v4: Arc<Levels<V4>>,
    wide: Arc<Levels<Wide>>,
    /// `inner.wide.len()`, readable without the lock.
    wide_len: AtomicUsize,
    /// `inner.len()`, readable without the lock.
    len: AtomicUsize,
    /// This shard's share of the bound.
    bound: usize,
}

impl Shard {
    /// Publishes the lengths after a write.
    fn store_len(&self, inner: &ShardInner) {
        self.len.store(inner.len(), Ordering::Relaxed);
        self.wide_len.store(inner.wide.len(), Ordering::Relaxed);
    }
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

/// A lock-free attempt's outcome.
enum Fast<R> {
    /// Done: the operation's result, or `None` for a confirmed miss.
    Done(Option<R>),
    /// The slot was in motion or frozen, or the miss is not confirmed:
    /// take the shard lock.
    Retry,
}

/// The connection tracking table. `Send + Sync`: share it by reference
/// among packet threads; every method takes `&self`.
///
/// See the [module docs](self) for the layout, concurrency, eviction and
/// expiry rules.
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
fn sweep<L: Layout>(
    t: &mut Table<L>,
    cursor: &mut usize,
    budget: usize,
    now: u64,
    counts: &BackendCounts,
    seq: &mut WriteSeq<'_>,
) -> usize {
    let n = t.slot_count();
    if n == 0 {
        return 0;
    }
    // At most `budget` slots passed and `budget` entries removed (a
    // removal shifts the next entry into the same slot, which is then
    // examined again), so a pass over `n` slots takes ceil(n / budget)
    // steps.
    let mut removed = 0;
    let mut passed = 0;
    while passed < budget.min(n) && removed < budget {
        if *cursor >= n {
            *cursor = 0;
        }
        let i = *cursor;
        let slots = t.slots();
        if code_of(slots.ctl(i)) != 0 && now >= table::expires(slots.slot(i)) {
            // Confirm under the slot lock: a packet may just have come.
            let ctl = slots.lock(i);
            if now >= table::expires(slots.slot(i)) {
                let (e, control) = t.remove_locked(i, ctl, seq);
                // It went when its timer fired.
                counts.released(&e, control, e.expires.as_nanos().min(now));
                removed += 1;
                if t.len() == 0 {
                    break;
                }
                continue;
            }
            slots.unlock(i, ctl);
        }
        *cursor += 1;
        passed += 1;
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
        Self::with_controls(config, counts, None)
    }

    /// [`with_counts`](Self::with_counts), also counting each persistence
    /// template's controlled connections in `controls` (IPVS mode).
    pub(crate) fn with_controls(
        config: ConntrackConfig,
        counts: std::sync::Arc<crate::scheduler::ConnectionCounts>,
        controls: Option<Arc<control::Controls>>,
    ) -> Self {
        let n = config.effective_shards();
        let cap = config.capacity();
        let shards = (0..n)
            .map(|i| {
                let bound = cap / n + usize::from(i < cap % n);
                let v4 = Arc::new(Levels::new(max_slots(bound)));
                let wide = Arc::new(Levels::new(max_slots(bound)));
                Shard {
                    inner: Mutex::new(ShardInner {
                        v4: Table::new(max_slots(bound), &v4),
                        wide: Table::new(max_slots(bound), &wide),
                        sweep_v4: 0,
                        sweep_wide: 0,
                    }),
                    seq: AtomicU64::new(0),
                    v4,
                    wide,
                    wide_len: AtomicUsize::new(0),
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
            counts: BackendCounts::shared(counts, controls),
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
            .find(&WideKey::of(flow), self.wide_hash(flow) as u32)
            .ok()
            .map(Found::Wide)
    }

    /// Runs `op` on `flow`'s entry under its slot lock: `op` gets the
    /// slot's words and control word and returns the control word to
    /// release it with and its result. Lock-free unless the entry is in
    /// motion (then under the shard lock). `None` if the flow has no entry.
    #[inline]
    fn with_entry<R>(
        &self,
        flow: &Flow,
        op: impl Fn(&[AtomicU64], u64) -> (u64, Option<R>),
    ) -> Option<R> {
        let (s, place) = self.place(flow);
        let shard = &self.shards[s];
        match self.fast(shard, flow, &place, &op) {
            Fast::Done(r) => r,
            Fast::Retry => {
                let inner = shard.inner.lock();
                let (ctl, w, unlock): (u64, &[AtomicU64], &dyn Fn(u64)) =
                    match self.find(&inner, flow, &place)? {
                        Found::V4(i) => {
                            let t = inner.v4.slots();
                            (t.lock(i), t.slot(i), &move |c| t.unlock(i, c))
                        }
                        Found::Wide(i) => {
                            let t = inner.wide.slots();
                            (t.lock(i), t.slot(i), &move |c| t.unlock(i, c))
                        }
                    };
                let (ctl, r) = op(w, ctl);
                unlock(ctl);
                r
            }
        }
    }

    /// The lock-free half of [`with_entry`](Self::with_entry).
    #[inline]
    fn fast<R>(
        &self,
        shard: &Shard,
        flow: &Flow,
        place: &Place,
        op: &impl Fn(&[AtomicU64], u64) -> (u64, Option<R>),
    ) -> Fast<R> {
        let seq = shard.seq.load(Ordering::Acquire);
        if let Place::V4 { key, hash } = place {
            let t = shard.v4.current();
            if let Ok(i) = t.find(key, *hash) {
                return match t.lock_fast(i, key, *hash) {
                    Some(ctl) => {
                        let (ctl, r) = op(t.slot(i), ctl);
                        t.unlock(i, ctl);
                        Fast::Done(r)
                    }
                    None => Fast::Retry,
                };
            }
        }
        if matches!(place, Place::Wide) || shard.wide_len.load(Ordering::Relaxed) != 0 {
            let key = WideKey::of(flow);
            let hash = self.wide_hash(flow) as u32;
            let t = shard.wide.current();
            if let Ok(i) = t.find(&key, hash) {
                return match t.lock_fast(i, &key, hash) {
                    Some(ctl) => {
                        let (ctl, r) = op(t.slot(i), ctl);
                        t.unlock(i, ctl);
                        Fast::Done(r)
                    }
                    None => Fast::Retry,
                };
            }
        }
        // A miss counts only if no entry moved meanwhile.
        std::sync::atomic::fence(Ordering::Acquire);
        if seq % 2 == 0 && shard.seq.load(Ordering::Relaxed) == seq {
            Fast::Done(None)
        } else {
            Fast::Retry
        }
    }

    /// Moves a live entry by one packet (the caller holds its slot lock).
    #[inline]
    fn advance<L: Layout>(
        &self,
        w: &[AtomicU64],
        ctl: u64,
        direction: Direction,
        flags: TcpFlags,
        now: u64,
    ) -> (u64, Option<Hit>) {
        if now >= table::expires(w) {
            return (ctl, None);
        }
        let previous = code_of(ctl);
        let state = self.transitions.next(direction, flags, previous);
        let (frontend, backend) = table::ids(w);
        if state != previous {
            let active = is_active_code(state);
            if active != is_active_code(previous) {
                self.counts.change(backend.0, active);
            }
        }
        table::set_expires(w, refreshed(now, self.timeouts[state as usize]));
        let hit = Hit {
            frontend,
            backend,
            backend_addr: L::backend_addr(w, ctl),
            state: ConnState::from_code(state),
            previous: ConnState::from_code(previous),
            masquerade: table::masq_of(ctl),
        };
        (with_code(ctl, state), Some(hit))
    }

    /// The read-only half of a packet of `flow` in the original direction
    /// (client to frontend): [`Peek::Hit`] if the flow is all-IPv4 and the
    /// packet changes nothing (the state stays and the refreshed expiry is
    /// the one the entry has, as for every packet of a connection after the
    /// first in the same [`EXPIRY_GRAIN_NS`]), [`Peek::Untracked`] if the
    /// flow is not tracked, [`Peek::Slow`] if the packet must write, the
    /// flow is not all-IPv4, or the slot changed while it was read (then
    /// [`lookup`](Self::lookup) takes the slot lock). Writes nothing, so
    /// two packet threads share no written cache line, and returns plain
    /// words, so that a dataplane builds its verdict once.
    #[inline(always)]
    pub(crate) fn peek(&self, flow: &Flow, flags: TcpFlags, now: Instant) -> Peek {
        self.peek_in(flow, Direction::Original, flags, now)
    }

    /// [`peek`](Self::peek) in `direction`.
    #[inline(always)]
    fn peek_in(&self, flow: &Flow, direction: Direction, flags: TcpFlags, now: Instant) -> Peek {
        match V4Key::of(flow) {
            Some(key) => {
                let h = self.hasher.hash_one(key.words());
                let shard = &self.shards[self.shard_of(h)];
                self.peek_v4(shard, &key, h as u32, direction, flags, now.as_nanos())
            }
            None => Peek::Slow,
        }
    }

    /// [`peek_in`](Self::peek_in) of an all-IPv4 flow: a seqlock read. The slot's control word and the shard's sequence word,
    /// unchanged across the reads of the entry's words, show that no writer
    /// touched the entry meanwhile (a packet thread changes only the expiry
    /// and the state, which change the control word or leave the entry's
    /// other words as they were).
    #[inline(always)]
    fn peek_v4(
        &self,
        shard: &Shard,
        key: &V4Key,
        hash: u32,
        direction: Direction,
        flags: TcpFlags,
        now: u64,
    ) -> Peek {
        let seq = shard.seq.load(Ordering::Acquire);
        if seq % 2 != 0 {
            return Peek::Slow;
        }
        let t = shard.v4.current();
        match t.find_ctl(key, hash) {
            Ok((i, ctl)) => {
                if ctl & table::LOCK != 0 {
                    return Peek::Slow;
                }
                let w = t.slot(i);
                let expires = table::expires(w);
                let code = code_of(ctl);
                if now >= expires
                    || self.transitions.next(direction, flags, code) != code
                    || refreshed(now, self.timeouts[code as usize]) != expires
                {
                    return Peek::Slow;
                }
                let (frontend, backend) = table::ids(w);
                let backend_addr = table::v4_backend(w, ctl);
                std::sync::atomic::fence(Ordering::Acquire);
                if w[0].load(Ordering::Relaxed) != ctl || shard.seq.load(Ordering::Relaxed) != seq {
                    return Peek::Slow;
                }
                Peek::Hit(V4Hit {
                    frontend,
                    backend,
                    backend_addr,
                    code,
                    masquerade: table::masq_of(ctl),
                })
            }
            Err(_) => {
                if shard.wide_len.load(Ordering::Relaxed) != 0 {
                    return Peek::Slow;
                }
                std::sync::atomic::fence(Ordering::Acquire);
                if shard.seq.load(Ordering::Relaxed) == seq {
                    Peek::Untracked
                } else {
                    Peek::Slow
                }
            }
        }
    }

    /// A packet: the read-only hit inline, anything else out of line.
    #[inline(always)]
    fn packet(
        &self,
        flow: &Flow,
        direction: Direction,
        flags: TcpFlags,
        now: Instant,
    ) -> Option<Hit> {
        match self.peek_in(flow, direction, flags, now) {
            Peek::Hit(hit) => Some(hit.hit()),
            Peek::Untracked => None,
            Peek::Slow => self.packet_locked(flow, direction, flags, now),
        }
    }

    /// A packet that writes (or an IPv6 or mixed-family flow's), under
    /// the slot lock.
    #[inline(never)]
    fn packet_locked(
        &self,
        flow: &Flow,
        direction: Direction,
        flags: TcpFlags,
        now: Instant,
    ) -> Option<Hit> {
        let now = now.as_nanos();
        let v4 = V4Key::of(flow).is_some();
        self.with_entry(flow, |w, ctl| {
            // The slot's width tells the layout.
            if v4 && w.len() == V4::W {
                self.advance::<V4>(w, ctl, direction, flags, now)
            } else {
                self.advance::<Wide>(w, ctl, direction, flags, now)
            }
        })
    }

    /// A packet of `flow` in the original direction (client to frontend).
    ///
    /// On a live entry: advances the state machine with `flags` (TCP; other
    /// protocols ignore them), restarts the timer with the new state's
    /// timeout (rounded up to [`EXPIRY_GRAIN_NS`]) and returns the [`Hit`].
    /// `None` if the flow is not tracked or its entry has expired
    /// (`now >= expires`); an expired entry is left for the sweep.
    /// Lock-free (the shard lock only while the entry's shard is moving
    /// entries), and with no write at all when the packet changes nothing
    /// (the module's "Concurrency"); allocates nothing.
    #[inline]
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
        let v4 = V4Key::of(flow).is_some();
        let t = self.with_entry(flow, |w, ctl| {
            let t = if v4 && w.len() == V4::W {
                table::tracked::<V4>(w, ctl)
            } else {
                table::tracked::<Wide>(w, ctl)
            };
            (ctl, Some(t))
        })?;
        (now < t.expires).then_some(t)
    }

    /// Removes a found entry; `now` is when, if known (otherwise its last
    /// packet's time).
    fn remove_found(
        &self,
        inner: &mut ShardInner,
        found: Found,
        now: Option<u64>,
        seq: &mut WriteSeq<'_>,
    ) -> Tracked {
        let (t, control) = match found {
            Found::V4(i) => inner.v4.remove_at(i, seq),
            Found::Wide(i) => inner.wide.remove_at(i, seq),
        };
        self.counts.released(&t, control, self.gone_at(&t, now));
        t
    }

    /// When the connection `t` went, removed at `now` (if known): at its
    /// expiry if that came first, else `now`, else its last packet.
    fn gone_at(&self, t: &Tracked, now: Option<u64>) -> u64 {
        let expires = t.expires.as_nanos();
        match now {
            Some(now) => now.min(expires),
            None => self.last_use(t.state.code(), expires),
        }
    }

    /// Last packet time of an entry (`code`: its state code).
    #[inline]
    fn last_use(&self, code: u8, expires: u64) -> u64 {
        expires.saturating_sub(self.timeouts[code as usize])
    }

    /// Samples up to [`EVICT_SAMPLE`] occupied slots from slot `start` on;
    /// the index of the victim (the first expired entry, else the least
    /// recently used).
    fn victim<L: Layout>(&self, t: &Table<L>, start: usize, now: u64) -> Option<usize> {
        let n = t.slot_count();
        if t.len() == 0 {
            return None;
        }
        let slots = t.slots();
        let mut best: Option<(usize, u64)> = None;
        let mut seen = 0;
        let mut i = start;
        for step in 0..n {
            let ctl = slots.ctl(i);
            if code_of(ctl) != 0 {
                let expires = table::expires(slots.slot(i));
                if now >= expires {
                    return Some(i);
                }
                let used = self.last_use(code_of(ctl), expires);
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
    fn evict(&self, inner: &mut ShardInner, hash: u32, now: u64, seq: &mut WriteSeq<'_>) {
        let ShardInner { v4, wide, .. } = inner;
        // (The field list keeps the sweep cursors out of the borrow.)
        let gone = if v4.len() >= wide.len() {
            self.victim(v4, v4.home_of(hash), now)
                .map(|i| v4.remove_at(i, seq))
        } else {
            self.victim(wide, wide.home_of(hash), now)
                .map(|i| wide.remove_at(i, seq))
        };
        if let Some((e, control)) = gone {
            self.counts
                .released(&e, control, self.gone_at(&e, Some(now)));
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
        self.insert_controlled(
            flow,
            frontend,
            backend,
            backend_addr,
            flags,
            now,
            control::Controlled::default(),
            false,
        )
    }

    /// [`insert`](Self::insert) of a connection that the persistence
    /// template `control` scheduled (none if its code is 0): it counts
    /// towards that template's `n_control` until it goes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert_controlled(
        &self,
        flow: &Flow,
        frontend: FrontendId,
        backend: BackendId,
        backend_addr: SocketAddr,
        flags: TcpFlags,
        now: Instant,
        control: control::Controlled,
        masquerade: bool,
    ) -> ConnState {
        let state = ConnState::initial(flow.protocol, flags);
        let now = now.as_nanos();
        let expires = now.saturating_add(self.timeouts[state.code() as usize]);
        let (s, place) = self.place(flow);
        let shard = &self.shards[s];
        let mut inner = shard.inner.lock();
        let mut seq = WriteSeq::new(&shard.seq);
        // The empty slot a v4 miss ended on, valid until the table changes.
        let mut hint = usize::MAX;
        let wide_key = || WideKey::of(flow);
        match &place {
            Place::V4 { key, hash } => match inner.v4.find(key, *hash) {
                Ok(i) => {
                    self.remove_found(&mut inner, Found::V4(i), Some(now), &mut seq);
                }
                Err(i) => {
                    hint = i;
                    if inner.wide.len() > 0 {
                        if let Ok(i) = inner.wide.find(&wide_key(), self.wide_hash(flow) as u32) {
                            self.remove_found(&mut inner, Found::Wide(i), Some(now), &mut seq);
                        }
                    }
                }
            },
            Place::Wide => {
                if let Ok(i) = inner.wide.find(&wide_key(), self.wide_hash(flow) as u32) {
                    self.remove_found(&mut inner, Found::Wide(i), Some(now), &mut seq);
                }
            }
        }
        if inner.len() >= shard.bound {
            let h = match &place {
                Place::V4 { hash, .. } => *hash,
                Place::Wide => self.wide_hash(flow) as u32,
            };
            self.evict(&mut inner, h, now, &mut seq);
            hint = usize::MAX;
        }
        match (&place, backend_addr) {
            (Place::V4 { key, hash }, SocketAddr::V4(baddr)) => {
                let e = key.entry(*hash, frontend, backend, baddr, state, expires);
                inner.v4.insert_absent(
                    &with_masq(with_control(e, control.code), masquerade),
                    hint,
                    &mut seq,
                );
            }
            _ => {
                let h = self.wide_hash(flow) as u32;
                let e = wide_key().entry(h, frontend, backend, backend_addr, state, expires);
                inner.wide.insert_absent(
                    &with_masq(with_control(e, control.code), masquerade),
                    usize::MAX,
                    &mut seq,
                );
            }
        }
        self.counts
            .inserted(flow, frontend.0, backend, state.is_active(), control, now);
        shard.store_len(&inner);
        drop(seq);
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
        let mut seq = WriteSeq::new(&shard.seq);
        let t = self.remove_found(&mut inner, found, now, &mut seq);
        shard.store_len(&inner);
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

    /// One sweep step: in every shard, moves past at most
    /// [`reap_batch`](ConntrackConfig::reap_batch) slots from where the
    /// last step stopped and removes the expired entries among them (at
    /// most `reap_batch`; counts updated), under that shard's lock only. Returns how many it removed. A full
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
            let mut seq = WriteSeq::new(&shard.seq);
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
                &mut seq,
            );
            removed += sweep(
                &mut inner.wide,
                &mut inner.sweep_wide,
                wide_budget,
                now_ns,
                &self.counts,
                &mut seq,
            );
            shard.store_len(inner);
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

    fn retain_table<L: Layout>(
        &self,
        shard: &Shard,
        batch: usize,
        keep: &mut impl FnMut(&Tracked) -> bool,
        table: impl Fn(&mut ShardInner) -> &mut Table<L>,
    ) -> usize {
        let mut removed = 0;
        let mut cursor = 0;
        // (generation, removals) as this walk left the table.
        let mut seen: Option<(u64, u64)> = None;
        loop {
            let mut inner = shard.inner.lock();
            let mut seq = WriteSeq::new(&shard.seq);
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
                match t.read(cursor) {
                    Some(e) if !keep(&e) => {
                        let (e, control) = t.remove_at(cursor, &mut seq);
                        self.counts.released(&e, control, self.gone_at(&e, None));
                        removed += 1;
                    }
                    _ => cursor += 1,
                }
            }
            seen = Some((t.generation(), t.removals()));
            drop(seq);
            shard.store_len(&inner);
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
            out.extend(
                (0..inner.v4.slot_count())
                    .filter_map(|i| inner.v4.read(i))
                    .filter(live),
            );
            out.extend(
                (0..inner.wide.slot_count())
                    .filter_map(|i| inner.wide.read(i))
                    .filter(live),
            );
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

    /// Packet threads never miss a live connection, nor see another's
    /// backend, while the writer grows the table and moves entries past
    /// their probes: the watched flows sit behind other flows in their
    /// runs, which the writer removes (backward shifts), evicts, sweeps and
    /// adds (growth) while two threads look the watched flows up.
    #[test]
    fn lock_free_hits_survive_a_churning_writer() {
        let t0 = Instant::from_secs(1);
        let backend = |i: u32| BackendId(i % 7);
        let v6 = |i: u32| {
            Flow::tcp(
                SocketAddr::new(
                    std::net::Ipv6Addr::from((0xfd00_u128 << 112) | u128::from(i)).into(),
                    1,
                ),
                "[fd00::a]:80".parse().unwrap(),
            )
        };
        let b6: SocketAddr = "[fd00::99]:80".parse().unwrap();
        let churn = |round: u32, i: u32| flow(1_000_000 + round * 10_000 + i);
        for round in 0..60u32 {
            // Even rounds grow the table under the readers (10 entries in
            // the first 16 slots, 12 the limit); odd ones start in the
            // largest array, with the watched flows behind 1,000 others.
            let (initial, watched) = if round % 2 == 0 { (0, 10) } else { (1000, 50) };
            let ct = Conntrack::new(
                ConntrackConfig::new(4096)
                    .unwrap()
                    .shards(1)
                    .unwrap()
                    .hash_key([3, 1, 4, u64::from(round)]),
            );
            for i in 0..initial {
                ct.insert(
                    &churn(round, i),
                    FrontendId(1),
                    BackendId(99),
                    B,
                    TcpFlags::SYN,
                    t0,
                );
            }
            for i in 0..watched {
                ct.insert(&flow(i), FrontendId(0), backend(i), B, TcpFlags::ACK, t0);
            }
            for i in 0..30 {
                ct.insert(&v6(i), FrontendId(0), backend(i), b6, TcpFlags::ACK, t0);
            }
            let stop = std::sync::atomic::AtomicBool::new(false);
            let started = AtomicUsize::new(0);
            std::thread::scope(|s| {
                let readers: Vec<_> = (0..2)
                    .map(|r| {
                        let (ct, stop, started) = (&ct, &stop, &started);
                        s.spawn(move || {
                            let mut rounds = 0u32;
                            while !stop.load(Ordering::Relaxed) && rounds < 100_000 {
                                if rounds == 1 {
                                    started.fetch_add(1, Ordering::Relaxed);
                                }
                                for i in (r..watched).step_by(2) {
                                    let hit = ct.lookup(&flow(i), TcpFlags::ACK, t0);
                                    assert_eq!(hit.map(|h| h.backend), Some(backend(i)), "{i}");
                                }
                                for i in (r..30).step_by(2) {
                                    let hit = ct.get(&v6(i), t0);
                                    assert_eq!(hit.map(|h| h.backend_addr), Some(b6), "v6 {i}");
                                }
                                rounds += 1;
                            }
                        })
                    })
                    .collect();
                // Both readers are at work (or one has failed).
                while started.load(Ordering::Relaxed) < 2
                    && !readers.iter().any(|r| r.is_finished())
                {
                    std::thread::yield_now();
                }
                for i in initial..1600 {
                    ct.insert(
                        &churn(round, i),
                        FrontendId(1),
                        BackendId(99),
                        B,
                        TcpFlags::SYN,
                        t0,
                    );
                }
                // Backward shifts through the watched flows' runs.
                for i in (0..1600).step_by(2) {
                    ct.remove(&churn(round, i));
                }
                ct.retain(|t| t.backend != BackendId(99) || t.flow.src.port() % 3 != 0);
                // The rest expire (SYN_RECV: 60 s); the watched are ESTABLISHED.
                let late = t0 + Duration::from_secs(61);
                while ct.len() > watched as usize + 30 {
                    ct.handle_timeout(late);
                }
                stop.store(true, Ordering::Relaxed);
                for r in readers {
                    r.join().unwrap();
                }
            });
            assert_eq!(ct.len(), watched as usize + 30);
        }
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
