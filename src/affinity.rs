//! Session affinity: a bounded, sharded table of (service port, affinity key)
//! → endpoint, with the timer semantics of kube-proxy and IPVS persistence,
//! and the counters that find "everyone behind one NAT" hotspots.
//!
//! # Semantics
//! The model is IPVS persistence as kube-proxy configures it (full netmask,
//! `expire_quiescent_template=1`) and, equivalently, its iptables
//! `-m recent --rcheck --seconds T --reap` rules (Kubernetes 1.33):
//!
//! - every new connection routed through an entry restarts its timer (only a
//!   connection's first packet reaches the nat table, so the dataplanes treat
//!   every `route` call of an affinity service as a new connection);
//! - an entry idle for `timeoutSeconds` or longer is gone: the client is
//!   balanced afresh;
//! - an entry whose endpoint is removed, or no longer takes new connections
//!   (not ready, outside the topology selection, IPVS weight 0), is dropped
//!   on the next lookup and the client re-balanced at once; a sync also
//!   purges such entries eagerly.
//!
//! IPVS mode adds what the kernel does to a persistence template that
//! still controls connections (`n_control > 0` in `ip_vs_conn_expire`):
//! while the connection tracker holds a connection that the template
//! scheduled, the template's timer, on firing, is put off by 60 s instead
//! of expiring, and from then on a new connection restarts it with 60 s
//! rather than the service's timeout. It expires at the first firing after
//! its last controlled connection went. A connection's template is told
//! from a later one of the same key by a 6-bit generation kept in the
//! tracked entry. Caller-supplied keys are not derived from the flow, so
//! their templates keep their own timers. The iptables (`recent`) and
//! nftables (set timeout) modes have no such link: their entries expire on
//! their own timer.
//!
//! # Keys
//! [`AffinityKey`]: the client address (the Kubernetes default, a full /32
//! or /128), the client address and port, or a caller-supplied `u64` (a
//! cookie or header hash), chosen per service by
//! [`AffinityKeyKind`].
//!
//! # Memory and concurrency
//! [`AffinityTable`] is split into shards chosen by a keyed hash of the
//! key (see [Hash keys](#hash-keys)); each shard is a `parking_lot::Mutex` around a slab of entries,
//! an index map, and intrusive doubly-linked lists: one per timeout class
//! (the entries of the service ports sharing a timeout, in last-use order,
//! which is also their expiry order) and one per service port. A lookup or
//! an insert locks one shard briefly; a hit allocates nothing. The capacity
//! ([`AffinityConfig`]) is global (split evenly among the shards) and per
//! service port (an atomic count per port). When a shard is full, an expired
//! entry goes first (the expired tail of a class), else the shard's least
//! recently used entry (the oldest class tail); when a port is full, its own
//! least recently used entry goes (LRU is per shard and approximate overall,
//! as in every sharded cache). Every miss, and every eighth hit, of a shard
//! reaps a few expired entries from the class tails and from its port's tail
//! ([`AffinityConfig::reap_batch`]); nothing ever scans the whole table to
//! expire entries.
//!
//! Unlike the kernel's `xt_recent` lists (at most `ip_list_tot`, 100 by
//! default, per endpoint) the bound is whatever the caller configures.
//!
//! # Hash keys
//! Clients choose their own addresses and ports, and capacity is split per
//! shard, so a shard choice an outsider can compute would let them aim
//! about capacity/shards keys at one shard and evict everyone else's
//! entries there. The shard is therefore chosen by ahash keyed with a
//! 256-bit secret ([`AffinityConfig::hash_key`]) that is *not* derived
//! from the replay seed: by default it is drawn from the operating system
//! once, when the table is built. Fix it with
//! [`AffinityConfig::hash_key`] to replay a run exactly (the same build of
//! svclb then picks the same shards; ahash does not promise the same
//! output across its versions or target features). The index inside a
//! shard is an `AHashMap` with its own OS-seeded state.
//!
//! Hashes that must agree across processes keep their pinned, public
//! definitions and are not keyed: [`AffinityKey::stable_hash`] (the
//! heavy-hitters sketch's fast comparison), the `sh` scheduler's source
//! hash and Maglev's permutation hashes. They decide backends, not
//! capacity, so knowing them lets a client choose its backend, as it can
//! with IPVS, but not evict other clients.
//!
//! # Hotspots
//! Each service port counts its new connections, per endpoint and per key.
//! Per-key counts come from a fixed-size Space-Saving sketch (32 counters
//! per service port) updated with `try_lock`, so the packet path never waits
//! for it and never grows it. [`AffinityReport`] flags a key whose share of
//! the new connections is at least [`AffinityConfig::hotspot_factor`] times
//! the fair share (one over the live affinity entries of the port).

use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ahash::AHashMap;
use parking_lot::Mutex;
use smallvec::SmallVec;

use crate::conntrack::control::{self, Controls};
use crate::error::ValidationError;
use crate::model::flow::{Flow, Protocol};
use crate::model::service::{AffinityKeyKind, Service, ServiceKey, SessionAffinity};
use crate::rng::mix64;
use crate::time::Instant;

/// What an affinity entry pins: a client address, a client socket, or a key
/// the caller computed.
///
/// # Examples
/// ```
/// use svclb::{AffinityKey, AffinityKeyKind, Flow};
/// let flow = Flow::tcp("192.0.2.7:40000".parse().unwrap(), "10.96.0.10:80".parse().unwrap());
/// let k = AffinityKey::for_flow(AffinityKeyKind::ClientIp, &flow, None);
/// assert_eq!(k.to_string(), "192.0.2.7");
/// // A caller key is used when the service asks for one and the caller gives one.
/// let k = AffinityKey::for_flow(AffinityKeyKind::Caller, &flow, Some(0xfeed));
/// assert_eq!(k, AffinityKey::Caller(0xfeed));
/// // Otherwise the client address.
/// let k = AffinityKey::for_flow(AffinityKeyKind::Caller, &flow, None);
/// assert_eq!(k, AffinityKey::ClientIp("192.0.2.7".parse().unwrap()));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum AffinityKey {
    /// The client address (all of it: /32 or /128).
    ClientIp(IpAddr),
    /// The client address and source port.
    ClientIpPort(SocketAddr),
    /// A caller-supplied key, such as a hash of a cookie or a header.
    Caller(u64),
}

impl AffinityKey {
    /// The key a service with key kind `kind` pins for `flow`, given the
    /// caller's key if any (used only by [`AffinityKeyKind::Caller`], which
    /// falls back to the client address without one).
    #[inline]
    pub fn for_flow(kind: AffinityKeyKind, flow: &Flow, caller: Option<u64>) -> Self {
        match (kind, caller) {
            (AffinityKeyKind::ClientIp, _) | (AffinityKeyKind::Caller, None) => {
                AffinityKey::ClientIp(flow.src.ip())
            }
            (AffinityKeyKind::ClientIpPort, _) => AffinityKey::ClientIpPort(flow.src),
            (AffinityKeyKind::Caller, Some(k)) => AffinityKey::Caller(k),
        }
    }

    /// A stable, public 64-bit hash of the key (the same in every process
    /// and build of svclb). It is pinned and unkeyed, so anyone can compute
    /// it: the table uses it only to compare sketch entries quickly, and
    /// chooses shards with a secret-keyed hash instead (see the
    /// [module docs](self#hash-keys)).
    #[inline]
    pub fn stable_hash(&self) -> u64 {
        fn ip(ip: &IpAddr) -> u64 {
            match ip {
                IpAddr::V4(v4) => mix64(u64::from(u32::from(*v4)) ^ 0x4000_0000_0000_0000),
                IpAddr::V6(v6) => {
                    let b = u128::from(*v6);
                    mix64((b as u64) ^ mix64((b >> 64) as u64 ^ 0x6000_0000_0000_0000))
                }
            }
        }
        match self {
            AffinityKey::ClientIp(a) => ip(a),
            AffinityKey::ClientIpPort(s) => mix64(ip(&s.ip()) ^ u64::from(s.port()) ^ (1 << 60)),
            AffinityKey::Caller(k) => mix64(*k ^ 0x2545_F491_4F6C_DD1D),
        }
    }
}

impl fmt::Display for AffinityKey {
    /// `192.0.2.7`, `192.0.2.7:40000` (`[2001:db8::1]:40000`), or
    /// `key:00000000000feed0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AffinityKey::ClientIp(a) => write!(f, "{a}"),
            AffinityKey::ClientIpPort(s) => write!(f, "{s}"),
            AffinityKey::Caller(k) => write!(f, "key:{k:016x}"),
        }
    }
}

/// The default global capacity of an affinity table: 1,048,576 entries
/// (about 160 MiB when full).
pub const DEFAULT_AFFINITY_CAPACITY: usize = 1 << 20;

/// How an [`AffinityTable`] is sized and when it reports a hotspot.
///
/// Build one with [`AffinityConfig::new`] and the setters; each checks its
/// value, so an `AffinityConfig` is always valid.
///
/// # Examples
/// ```
/// use svclb::AffinityConfig;
/// let config = AffinityConfig::new(100_000)?
///     .per_service_capacity(10_000)?
///     .hotspot_thresholds(20.0, 500)?;
/// assert_eq!(config.capacity(), 100_000);
/// assert_eq!(config.per_service(), Some(10_000));
/// assert!(AffinityConfig::new(0).is_err());
/// # Ok::<(), svclb::ValidationError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AffinityConfig {
    capacity: usize,
    per_service: Option<usize>,
    shards: usize,
    reap_batch: usize,
    hotspot_factor: f64,
    hotspot_min_connections: u64,
    hash_key: Option<[u64; 4]>,
}

impl Default for AffinityConfig {
    /// [`DEFAULT_AFFINITY_CAPACITY`] entries, no per-service bound, 32
    /// shards, 4 entries examined per reap, hotspot factor 10 and at
    /// least 100 connections, and a shard hash key drawn from the operating
    /// system when the table is built.
    fn default() -> Self {
        AffinityConfig {
            capacity: DEFAULT_AFFINITY_CAPACITY,
            per_service: None,
            shards: 32,
            reap_batch: 4,
            hotspot_factor: 10.0,
            hotspot_min_connections: 100,
            hash_key: None,
        }
    }
}

fn invalid(field: &str, value: impl fmt::Display, reason: &'static str) -> ValidationError {
    ValidationError::Invalid {
        field: field.into(),
        value: value.to_string(),
        reason,
    }
}

impl AffinityConfig {
    /// The defaults with a global capacity of `capacity` entries.
    ///
    /// # Errors
    /// [`ValidationError::Invalid`] on `affinity.capacity` if it is 0.
    pub fn new(capacity: usize) -> Result<Self, ValidationError> {
        if capacity == 0 {
            return Err(invalid("affinity.capacity", capacity, "must be at least 1"));
        }
        Ok(AffinityConfig {
            capacity,
            ..Default::default()
        })
    }

    /// Bounds the entries of each service port (each virtual service).
    ///
    /// # Errors
    /// [`ValidationError::Invalid`] on `affinity.perServiceCapacity` if it
    /// is 0.
    pub fn per_service_capacity(mut self, capacity: usize) -> Result<Self, ValidationError> {
        if capacity == 0 {
            return Err(invalid(
                "affinity.perServiceCapacity",
                capacity,
                "must be at least 1",
            ));
        }
        self.per_service = Some(capacity);
        Ok(self)
    }

    /// Sets the number of shards (a power of two, 1..=1024). A small
    /// capacity uses fewer, so that each shard holds at least 16 entries.
    ///
    /// # Errors
    /// [`ValidationError::Invalid`] on `affinity.shards` otherwise.
    pub fn shards(mut self, shards: usize) -> Result<Self, ValidationError> {
        if !(1..=1024).contains(&shards) || !shards.is_power_of_two() {
            return Err(invalid(
                "affinity.shards",
                shards,
                "must be a power of two in 1..=1024",
            ));
        }
        self.shards = shards;
        Ok(self)
    }

    /// Sets how many entries each reap examines for expiry (1..=64); a
    /// shard reaps on every miss and every eighth hit.
    ///
    /// # Errors
    /// [`ValidationError::Invalid`] on `affinity.reapBatch` otherwise.
    pub fn reap_batch(mut self, batch: usize) -> Result<Self, ValidationError> {
        if !(1..=64).contains(&batch) {
            return Err(invalid("affinity.reapBatch", batch, "must be in 1..=64"));
        }
        self.reap_batch = batch;
        Ok(self)
    }

    /// A key is a hotspot when it has at least `min_connections` new
    /// connections and at least `factor` times its fair share of them.
    ///
    /// # Errors
    /// [`ValidationError::Invalid`] on `affinity.hotspotFactor` unless it is
    /// finite and at least 1.
    pub fn hotspot_thresholds(
        mut self,
        factor: f64,
        min_connections: u64,
    ) -> Result<Self, ValidationError> {
        if !factor.is_finite() || factor < 1.0 {
            return Err(invalid(
                "affinity.hotspotFactor",
                factor,
                "must be finite and at least 1",
            ));
        }
        self.hotspot_factor = factor;
        self.hotspot_min_connections = min_connections;
        Ok(self)
    }

    /// Fixes the secret key of the shard hash, for exact replays (tests,
    /// simulations). Without it, each [`AffinityTable`] draws its key from
    /// the operating system once, when it is built: leave it unset in
    /// production, and never derive it from something a client can learn
    /// (such as the replay seed), or clients can aim their keys at one
    /// shard and evict everyone else's entries there.
    ///
    /// # Examples
    /// ```
    /// use svclb::AffinityConfig;
    /// let config = AffinityConfig::new(1000)?.hash_key([1, 2, 3, 4]);
    /// assert_eq!(config.fixed_hash_key(), Some([1, 2, 3, 4]));
    /// assert_eq!(AffinityConfig::default().fixed_hash_key(), None);
    /// # Ok::<(), svclb::ValidationError>(())
    /// ```
    #[must_use]
    pub fn hash_key(mut self, key: [u64; 4]) -> Self {
        self.hash_key = Some(key);
        self
    }

    /// The fixed shard hash key, if [`Self::hash_key`] set one.
    pub fn fixed_hash_key(&self) -> Option<[u64; 4]> {
        self.hash_key
    }

    /// The global capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// The per-service-port capacity, if any.
    pub fn per_service(&self) -> Option<usize> {
        self.per_service
    }
    /// The configured shard count (an upper bound; see [`Self::shards`]).
    pub fn shard_count(&self) -> usize {
        self.shards
    }
    /// Entries examined for expiry per reap.
    pub fn reap_batch_size(&self) -> usize {
        self.reap_batch
    }
    /// The hotspot share factor.
    pub fn hotspot_factor(&self) -> f64 {
        self.hotspot_factor
    }
    /// The fewest new connections a hotspot must have.
    pub fn hotspot_min_connections(&self) -> u64 {
        self.hotspot_min_connections
    }
}

// ---------------------------------------------------------------------------
// Heavy hitters: Space-Saving (Metwally, Agrawal, El Abbadi, 2005).

/// Counters per service port in the heavy-hitters sketch.
const SKETCH_SIZE: usize = 32;

#[derive(Debug, Clone, Copy)]
struct SketchItem {
    key: AffinityKey,
    count: u64,
    /// The count the item inherited when it took over a counter: its true
    /// count is in `count - error ..= count`.
    error: u64,
}

/// Struct of arrays: the hit path scans `hashes`, a replacement scans
/// `counts`, both contiguous `u64`s.
#[derive(Debug)]
struct SpaceSaving {
    hashes: Vec<u64>,
    counts: Vec<u64>,
    errors: Vec<u64>,
    keys: Vec<AffinityKey>,
    total: u64,
    /// A lower bound of the smallest count, and where to look for it next.
    floor: u64,
    cursor: usize,
}

impl SpaceSaving {
    fn new() -> Self {
        SpaceSaving {
            hashes: Vec::with_capacity(SKETCH_SIZE),
            counts: Vec::with_capacity(SKETCH_SIZE),
            errors: Vec::with_capacity(SKETCH_SIZE),
            keys: Vec::with_capacity(SKETCH_SIZE),
            total: 0,
            floor: 0,
            cursor: 0,
        }
    }

    #[inline]
    fn observe(&mut self, key: AffinityKey) {
        self.total += 1;
        let h = key.stable_hash();
        if let Some(i) = self
            .hashes
            .iter()
            .position(|&x| x == h)
            .filter(|&i| self.keys[i] == key)
        {
            self.counts[i] += 1;
            return;
        }
        if self.keys.len() < SKETCH_SIZE {
            self.hashes.push(h);
            self.counts.push(1);
            self.errors.push(0);
            self.keys.push(key);
            return;
        }
        // Find a counter at the minimum. Counts only grow, so `floor` stays
        // a lower bound of the minimum: look for it from the cursor, and
        // rescan for the true minimum only when no counter is at it.
        let n = self.counts.len();
        let i = loop {
            let at_floor = (0..n)
                .map(|d| (self.cursor + d) % n)
                .find(|&j| self.counts[j] == self.floor);
            match at_floor {
                Some(j) => break j,
                None => self.floor = self.counts.iter().copied().min().unwrap_or(0),
            }
        };
        self.cursor = (i + 1) % n;
        let min = self.counts[i];
        self.hashes[i] = h;
        self.keys[i] = key;
        self.counts[i] = min + 1;
        self.errors[i] = min;
    }

    fn items(&self) -> Vec<SketchItem> {
        (0..self.keys.len())
            .map(|i| SketchItem {
                key: self.keys[i],
                count: self.counts[i],
                error: self.errors[i],
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Scopes: one per service port (virtual service).

/// The affinity state of one service port (one virtual service: VIP,
/// protocol, port): its timeout, its entry count and bound, and its
/// connection counters. Created by [`AffinityTable::new_scope`].
#[derive(Debug)]
pub struct AffinityScope {
    slot: u32,
    timeout_nanos: AtomicU64,
    /// The IPVS frontend id + 1 whose persistence templates these entries
    /// are (0: none): the key of their controlled-connection counts.
    frontend: AtomicU32,
    capacity: usize,
    len: AtomicUsize,
    dead: AtomicBool,
    new_connections: AtomicU64,
    hits: AtomicU64,
    sketch: Mutex<SpaceSaving>,
}

impl AffinityScope {
    /// The idle timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout_nanos.load(Ordering::Relaxed))
    }
    /// Sets the idle timeout; existing entries are judged by the new one
    /// (as iptables judges `xt_recent` stamps by the rule's `--seconds`).
    pub fn set_timeout(&self, timeout: Duration) {
        let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        self.timeout_nanos.store(nanos, Ordering::Relaxed);
    }
    /// Entries held (some may have expired and not been reaped yet).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
    /// Whether no entries are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The most entries this scope may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// New connections routed through this scope since it was created.
    pub fn new_connections(&self) -> u64 {
        self.new_connections.load(Ordering::Relaxed)
    }
    /// Those of [`Self::new_connections`] that a live entry decided (hits).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
    /// Whether [`AffinityTable::remove_scope`] removed it.
    pub fn is_removed(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Marks the entries as the persistence templates of IPVS frontend
    /// `id`, whose controlled connections the tracker counts.
    pub(crate) fn set_frontend(&self, id: u32) {
        self.frontend.store(id.saturating_add(1), Ordering::Relaxed);
    }

    /// Reserves room for one entry; false if the scope is full.
    fn try_reserve(&self) -> bool {
        self.len
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.len.fetch_sub(1, Ordering::AcqRel);
    }

    #[inline]
    fn observe(&self, key: AffinityKey, hit: bool) {
        self.new_connections.fetch_add(1, Ordering::Relaxed);
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        // Never wait on the packet path: under contention a connection goes
        // unsampled; shares are computed over the sampled total.
        if let Some(mut sketch) = self.sketch.try_lock() {
            sketch.observe(key);
        }
    }

    /// The sketch's counters, heaviest (by guaranteed count) first, and the
    /// sampled total.
    fn heavy_hitters(&self) -> (Vec<SketchItem>, u64) {
        let s = self.sketch.lock();
        let mut items = s.items();
        items.sort_by_key(|it| core::cmp::Reverse(it.count - it.error));
        (items, s.total)
    }
}

// ---------------------------------------------------------------------------
// Shards.

const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Node {
    key: AffinityKey,
    endpoint: SocketAddr,
    last: Instant,
    /// The template's generation (1..=63), telling its controlled
    /// connections from those of an earlier template of the same key.
    generation: u8,
    /// Its timer has fired while it controlled connections: its timeout is
    /// 60 s from then on, as the kernel's (`cp->timeout = 60*HZ`).
    delayed: bool,
    /// `None` when the node is free.
    scope: Option<Arc<AffinityScope>>,
    /// The timeout class the node is linked into.
    class: u32,
    /// Its class list (head = most recent); the free list reuses `next`.
    prev: u32,
    next: u32,
    /// Its scope's list in this shard (head = most recent).
    sprev: u32,
    snext: u32,
}

#[derive(Debug, Clone, Copy)]
struct Links {
    head: u32,
    tail: u32,
}

const EMPTY: Links = Links {
    head: NIL,
    tail: NIL,
};

/// The entries of a shard whose scopes share one timeout, in last-use order,
/// which is also their expiry order. Most clusters use one timeout (10800 s),
/// so a shard usually has one class.
#[derive(Debug, Clone, Copy)]
struct Class {
    timeout: u64,
    links: Links,
}

#[derive(Debug)]
struct Shard {
    nodes: Vec<Node>,
    free: u32,
    index: AHashMap<(u32, AffinityKey), u32>,
    /// Timeout classes; the shard's least recently used entry is the oldest
    /// of their tails, its next expiring one the earliest-expiring tail.
    classes: Vec<Class>,
    /// Round-robin cursor for reaping over classes.
    cursor: usize,
    /// Per scope slot: that scope's entries in this shard.
    scopes: Vec<Links>,
    len: usize,
    cap: usize,
    /// Hits since the last reap.
    hits: u32,
    /// The next template generation.
    next_generation: u8,
    /// The most entries one sync chunk walked (tests check the bound).
    #[cfg(test)]
    max_sync_walk: usize,
}

/// A hit reaps once in this many (a miss always reaps).
const HIT_REAP_PERIOD: u32 = 8;

/// The most entries a sync walks under one shard lock: purges on sync go
/// in chunks of this many, releasing the lock between chunks, so a packet
/// thread waits for at most one chunk whatever the scope's size.
pub(crate) const SYNC_CHUNK: usize = 64;

/// How often a purge restarts a shard's walk because its cursor entry was
/// removed or reused while the lock was released, before it leaves the
/// rest to lazy expiry (a lookup rechecks an entry's endpoint anyway).
const SYNC_RESTARTS: usize = 4;

/// What [`Shard::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Expired,
    Rearmed,
    Live,
}

/// The timeout of node `n`'s class: 60 s once a delayed template, else its
/// scope's.
#[inline]
fn node_timeout(n: &Node) -> u64 {
    if n.delayed {
        control::DELAY_NANOS
    } else {
        n.scope
            .as_ref()
            .map_or(0, |s| s.timeout_nanos.load(Ordering::Relaxed))
    }
}

/// When node `n` expires as seen at `now` (`None`: it has), and whether
/// its timer has fired while it controlled connections. An entry expires
/// on its own timer, unless it is an IPVS persistence template that still
/// controls tracked connections (`controls`): then its expiry is put off
/// 60 s at a time, as `ip_vs_conn_expire` does while `n_control > 0`.
#[inline]
fn expiry(n: &Node, now: Instant, controls: Option<&Controls>) -> (Option<u64>, bool) {
    let expires = n.last.as_nanos().saturating_add(node_timeout(n));
    let now = now.as_nanos();
    if now < expires {
        return (Some(expires), false);
    }
    let frontend = n
        .scope
        .as_ref()
        .map_or(0, |s| s.frontend.load(Ordering::Relaxed));
    match controls {
        Some(c) if frontend != 0 => {
            control::template_expiry(expires, now, c.get(frontend - 1, &n.key, n.generation))
        }
        _ => (None, false),
    }
}

/// What the tracker keeps of template `n` for a connection it has just
/// scheduled: none without `controls`.
#[inline]
fn controlled(controls: Option<&Controls>, n: &Node) -> control::Controlled {
    match controls {
        Some(_) => control::Controlled {
            code: control::code(&n.key, n.generation),
            timeout: node_timeout(n),
        },
        None => control::Controlled::default(),
    }
}

impl Shard {
    fn new(cap: usize) -> Self {
        Shard {
            nodes: Vec::new(),
            free: NIL,
            index: AHashMap::new(),
            classes: Vec::new(),
            cursor: 0,
            scopes: Vec::new(),
            len: 0,
            cap,
            hits: 0,
            next_generation: 1,
            #[cfg(test)]
            max_sync_walk: 0,
        }
    }

    fn scope_links(&self, slot: u32) -> Links {
        self.scopes.get(slot as usize).copied().unwrap_or(EMPTY)
    }

    /// The class of `timeout`, created on first use (allocates only then).
    fn class_of(&mut self, timeout: u64) -> u32 {
        match self.classes.iter().position(|c| c.timeout == timeout) {
            Some(c) => c as u32,
            None => {
                self.classes.push(Class {
                    timeout,
                    links: EMPTY,
                });
                (self.classes.len() - 1) as u32
            }
        }
    }

    fn unlink(&mut self, i: u32) {
        let n = &self.nodes[i as usize];
        let (prev, next, sprev, snext) = (n.prev, n.next, n.sprev, n.snext);
        let class = n.class as usize;
        let slot = n.scope.as_ref().expect("linked").slot as usize;
        if prev == NIL {
            self.classes[class].links.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.classes[class].links.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        if sprev == NIL {
            self.scopes[slot].head = snext;
        } else {
            self.nodes[sprev as usize].snext = snext;
        }
        if snext == NIL {
            self.scopes[slot].tail = sprev;
        } else {
            self.nodes[snext as usize].sprev = sprev;
        }
    }

    /// Links node `i` at the head of its scope's list and of the class of
    /// its scope's current timeout.
    fn link_front(&mut self, i: u32) {
        let (slot, timeout) = {
            let n = &self.nodes[i as usize];
            let s = n.scope.as_ref().expect("linked");
            (s.slot as usize, node_timeout(n))
        };
        let class = self.class_of(timeout);
        let head = self.classes[class as usize].links.head;
        let shead = self.scopes[slot].head;
        {
            let n = &mut self.nodes[i as usize];
            n.class = class;
            n.prev = NIL;
            n.next = head;
            n.sprev = NIL;
            n.snext = shead;
        }
        if head == NIL {
            self.classes[class as usize].links.tail = i;
        } else {
            self.nodes[head as usize].prev = i;
        }
        self.classes[class as usize].links.head = i;
        if shead == NIL {
            self.scopes[slot].tail = i;
        } else {
            self.nodes[shead as usize].sprev = i;
        }
        self.scopes[slot].head = i;
    }

    /// Frees node `i`, releasing its scope's count.
    fn remove(&mut self, i: u32) {
        self.unlink(i);
        let n = &mut self.nodes[i as usize];
        let scope = n.scope.take().expect("a linked node has a scope");
        self.index.remove(&(scope.slot, n.key));
        n.next = self.free;
        self.free = i;
        self.len -= 1;
        scope.release();
    }

    fn insert(
        &mut self,
        scope: &Arc<AffinityScope>,
        key: AffinityKey,
        endpoint: SocketAddr,
        now: Instant,
    ) -> u32 {
        let slot = scope.slot as usize;
        if self.scopes.len() <= slot {
            self.scopes.resize(slot + 1, EMPTY);
        }
        let generation = self.next_generation;
        self.next_generation = if generation >= 63 { 1 } else { generation + 1 };
        let node = Node {
            key,
            endpoint,
            last: now,
            generation,
            delayed: false,
            scope: Some(Arc::clone(scope)),
            class: 0,
            prev: NIL,
            next: NIL,
            sprev: NIL,
            snext: NIL,
        };
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.nodes[i as usize].next;
            self.nodes[i as usize] = node;
            i
        } else {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        };
        self.link_front(i);
        self.index.insert((scope.slot, key), i);
        self.len += 1;
        if self.len == self.cap && self.index.capacity() < 2 * self.cap + 2 {
            // Full once: size the index so that the tombstones of evictions
            // are always rehashed in place; from now on a miss allocates
            // nothing either.
            self.index.reserve(self.cap + 2);
        }
        i
    }

    fn touch(&mut self, i: u32, now: Instant) {
        let n = &mut self.nodes[i as usize];
        if now > n.last {
            n.last = now;
        }
        let at_front = n.prev == NIL
            && n.sprev == NIL
            && self.classes[n.class as usize].timeout == node_timeout(n);
        if !at_front {
            self.unlink(i);
            self.link_front(i);
        }
    }

    fn is_expired(&self, i: u32, now: Instant, controls: Option<&Controls>) -> bool {
        expiry(&self.nodes[i as usize], now, controls).0.is_none()
    }

    /// Node `i` is a template whose timer fired while it controlled
    /// connections: re-arm it as the kernel does (60 s, from the firing
    /// before `expires`) and move it to the front of its new class, so
    /// that it does not hold up the reaping of the entries behind it.
    fn rearm(&mut self, i: u32, expires: u64) {
        let n = &mut self.nodes[i as usize];
        n.delayed = true;
        n.last = Instant::from_nanos(expires.saturating_sub(control::DELAY_NANOS));
        self.unlink(i);
        self.link_front(i);
    }

    /// Whether node `i` has expired; a template whose timer has fired
    /// while it controlled connections is re-armed.
    fn check(&mut self, i: u32, now: Instant, controls: Option<&Controls>) -> Check {
        match expiry(&self.nodes[i as usize], now, controls) {
            (None, _) => Check::Expired,
            (Some(at), true) => {
                self.rearm(i, at);
                Check::Rearmed
            }
            (Some(_), false) => Check::Live,
        }
    }

    /// Examines up to `k` entries at the tails of the timeout classes
    /// (round-robin) and up to `k` at the tail of `slot`'s list, removing
    /// the expired ones. Each list is in expiry order, so a live tail ends
    /// the search in that list.
    ///
    /// A template whose timer fired while it controlled connections is
    /// re-armed instead (see [`Shard::check`]).
    fn reap(&mut self, slot: u32, now: Instant, k: usize, controls: Option<&Controls>) {
        let mut budget = k;
        let mut live_tails = 0;
        while budget > 0 && live_tails < self.classes.len() {
            self.cursor = (self.cursor + 1) % self.classes.len();
            let t = self.classes[self.cursor].links.tail;
            budget -= 1;
            let found = if t == NIL {
                Check::Live
            } else {
                self.check(t, now, controls)
            };
            match found {
                Check::Expired => {
                    self.remove(t);
                    live_tails = 0;
                }
                Check::Rearmed => live_tails = 0,
                Check::Live => live_tails += 1,
            }
        }
        for _ in 0..k {
            let t = self.scope_links(slot).tail;
            if t == NIL {
                break;
            }
            match self.check(t, now, controls) {
                Check::Expired => self.remove(t),
                Check::Rearmed => {}
                Check::Live => break,
            }
        }
    }

    /// Removes the least recently used entry of `slot` in this shard.
    fn evict_scope_lru(&mut self, slot: u32) -> bool {
        let t = self.scope_links(slot).tail;
        if t == NIL {
            return false;
        }
        self.remove(t);
        true
    }

    /// Makes room for one entry: an expired entry if any class tail has
    /// expired, else the least recently used entry of the shard (the oldest
    /// class tail).
    fn evict_for_room(&mut self, now: Instant, controls: Option<&Controls>) {
        let tails = || {
            self.classes
                .iter()
                .map(|c| c.links.tail)
                .filter(|&t| t != NIL)
        };
        let victim = tails()
            .find(|&t| self.is_expired(t, now, controls))
            .or_else(|| tails().min_by_key(|&t| self.nodes[t as usize].last));
        if let Some(t) = victim {
            self.remove(t);
        }
    }

    /// Walks at most `budget` entries of `slot`'s list from `start` (the
    /// head if `None`), removing those `drop` says to. Returns how many it
    /// removed and where to go on (`None`: the list is done).
    fn retain_scope_chunk(
        &mut self,
        slot: u32,
        start: Option<u32>,
        budget: usize,
        drop: &mut impl FnMut(&Node) -> bool,
    ) -> (usize, Option<u32>) {
        let mut removed = 0;
        let mut i = start.unwrap_or_else(|| self.scope_links(slot).head);
        let mut steps = 0;
        while i != NIL && steps < budget {
            let next = self.nodes[i as usize].snext;
            if drop(&self.nodes[i as usize]) {
                self.remove(i);
                removed += 1;
            }
            i = next;
            steps += 1;
        }
        #[cfg(test)]
        {
            self.max_sync_walk = self.max_sync_walk.max(steps);
        }
        (removed, (i != NIL).then_some(i))
    }

    /// Whether node `i` is still `key`'s entry in scope `slot` (a cursor
    /// kept across an unlock is valid only then).
    fn holds(&self, i: u32, slot: u32, key: AffinityKey) -> bool {
        self.nodes
            .get(i as usize)
            .is_some_and(|n| n.key == key && n.scope.as_ref().is_some_and(|s| s.slot == slot))
    }
}

/// The outcome of [`AffinityTable::route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinned {
    /// The index the `usable` or `schedule` callback returned.
    pub index: usize,
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// Whether a live entry decided (true) or the scheduler did (false).
    pub hit: bool,
    /// The IPVS persistence template, for the tracker (code 0: the
    /// connection is controlled by no template).
    pub(crate) control: control::Controlled,
}

/// One live entry of a scope, as [`AffinityTable::entries`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeEntry {
    /// The key.
    pub key: AffinityKey,
    /// The endpoint it is pinned to.
    pub endpoint: SocketAddr,
    /// The time until it expires unless a new connection refreshes it.
    pub time_left: Duration,
}

/// The sharded, bounded affinity table. See the [module docs](self).
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use svclb::{AffinityConfig, AffinityKey, AffinityTable, Instant};
/// let table = AffinityTable::new(AffinityConfig::new(1000)?, 7);
/// let scope = table.new_scope(Duration::from_secs(10));
/// let client = AffinityKey::ClientIp("192.0.2.7".parse().unwrap());
/// let backends = ["10.1.0.1:80".parse().unwrap(), "10.1.0.2:80".parse().unwrap()];
/// let usable = |ep| backends.iter().position(|b| *b == ep);
/// // A miss: the scheduler decides (here: the second backend), the entry is kept.
/// let p = table.route(&scope, client, Instant::from_secs(0), usable, || Some((1, backends[1]))).unwrap();
/// assert!(!p.hit);
/// // Within the timeout: a hit, whatever the scheduler would say.
/// let p = table.route(&scope, client, Instant::from_secs(9), usable, || Some((0, backends[0]))).unwrap();
/// assert_eq!((p.endpoint, p.hit), (backends[1], true));
/// // Idle for 10 s: gone.
/// assert_eq!(table.get(&scope, client, Instant::from_secs(19)), None);
/// # Ok::<(), svclb::ValidationError>(())
/// ```
#[derive(Debug)]
pub struct AffinityTable {
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    /// The secret-keyed shard hash (never the replay seed).
    shard_hasher: ahash::RandomState,
    config: AffinityConfig,
    slots: Mutex<(Vec<u32>, u32)>,
    /// IPVS mode: the tracker's counts of each template's controlled
    /// connections, which keep a template alive (`n_control`).
    controls: Option<Arc<Controls>>,
}

/// The fewest entries a shard is given: small tables use fewer shards.
const MIN_PER_SHARD: usize = 16;

impl AffinityTable {
    /// An empty table.
    ///
    /// The shard choice (and so which entry capacity pressure evicts)
    /// depends on the secret hash key, not on `seed`: the key is
    /// [`AffinityConfig::hash_key`] if the caller fixed one, else drawn
    /// from the operating system now. `seed` is the dataplane's replay
    /// seed, which clients may learn; the table does not use it, so that
    /// knowing it does not tell anyone the shards.
    pub fn new(config: AffinityConfig, seed: u64) -> Self {
        let _ = seed;
        let mut n = config.shards;
        while n > 1 && config.capacity / n < MIN_PER_SHARD {
            n /= 2;
        }
        let shards = (0..n)
            .map(|i| {
                Mutex::new(Shard::new(
                    config.capacity / n + usize::from(i < config.capacity % n),
                ))
            })
            .collect();
        AffinityTable {
            shards,
            mask: n - 1,
            shard_hasher: match config.hash_key {
                Some([a, b, c, d]) => ahash::RandomState::with_seeds(a, b, c, d),
                None => ahash::RandomState::new(),
            },
            config,
            slots: Mutex::new((Vec::new(), 0)),
            controls: None,
        }
    }

    /// The table of IPVS persistence templates: an entry of a scope marked
    /// with [`AffinityScope::set_frontend`] does not expire while it
    /// controls connections that the tracker counts in `controls`.
    pub(crate) fn with_controls(mut self, controls: Option<Arc<Controls>>) -> Self {
        self.controls = controls;
        self
    }

    /// The config.
    pub fn config(&self) -> &AffinityConfig {
        &self.config
    }

    /// The number of shards in use.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// The global capacity.
    pub fn capacity(&self) -> usize {
        self.config.capacity
    }

    /// Entries held in all shards (locks each shard in turn). Some may have
    /// expired and not been reaped yet; they never count as hits.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len).sum()
    }

    /// Whether the table holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new scope (one service port) with this idle timeout, bounded by
    /// the per-service capacity.
    pub fn new_scope(&self, timeout: Duration) -> Arc<AffinityScope> {
        let slot = {
            let mut s = self.slots.lock();
            match s.0.pop() {
                Some(slot) => slot,
                None => {
                    s.1 += 1;
                    s.1 - 1
                }
            }
        };
        let scope = AffinityScope {
            slot,
            timeout_nanos: AtomicU64::new(0),
            frontend: AtomicU32::new(0),
            capacity: self
                .config
                .per_service
                .unwrap_or(self.config.capacity)
                .min(self.config.capacity),
            len: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            new_connections: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            sketch: Mutex::new(SpaceSaving::new()),
        };
        scope.set_timeout(timeout);
        Arc::new(scope)
    }

    /// Removes a scope and all its entries. Routing through it afterwards
    /// schedules without pinning.
    pub fn remove_scope(&self, scope: &AffinityScope) {
        if scope.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        // The flag is set: no route inserts into this scope any more, so
        // each shard's list only shrinks. Chunks from the head, the lock
        // released between them.
        for shard in self.shards.iter() {
            loop {
                let mut sh = shard.lock();
                let (_, rest) = sh.retain_scope_chunk(scope.slot, None, SYNC_CHUNK, &mut |_| true);
                if rest.is_none() {
                    if let Some(l) = sh.scopes.get_mut(scope.slot as usize) {
                        *l = EMPTY;
                    }
                    break;
                }
            }
        }
        self.slots.lock().0.push(scope.slot);
    }

    /// The shard of `key` in `scope`: a keyed hash of the whole key (all
    /// 128 bits of an IPv6 address, the port, the key kind) and the scope,
    /// so that nobody without the key can predict it.
    #[inline]
    fn shard_of(&self, scope: &AffinityScope, key: &AffinityKey) -> usize {
        use core::hash::{BuildHasher, Hasher};
        let mut h = self.shard_hasher.build_hasher();
        let slot = u64::from(scope.slot);
        match key {
            AffinityKey::ClientIp(IpAddr::V4(a)) => {
                h.write_u64(slot << 8 | 1);
                h.write_u32(u32::from(*a));
            }
            AffinityKey::ClientIp(IpAddr::V6(a)) => {
                let b = u128::from(*a);
                h.write_u64(slot << 8 | 2);
                h.write_u64((b >> 64) as u64);
                h.write_u64(b as u64);
            }
            AffinityKey::ClientIpPort(s) => {
                let tag = if s.is_ipv4() { 3 } else { 4 };
                h.write_u64(slot << 24 | u64::from(s.port()) << 8 | tag);
                match s.ip() {
                    IpAddr::V4(a) => h.write_u32(u32::from(a)),
                    IpAddr::V6(a) => {
                        let b = u128::from(a);
                        h.write_u64((b >> 64) as u64);
                        h.write_u64(b as u64);
                    }
                }
            }
            AffinityKey::Caller(k) => {
                h.write_u64(slot << 8 | 5);
                h.write_u64(*k);
            }
        }
        (h.finish() as usize) & self.mask
    }

    /// The shard the table chooses for `key` in `scope`, in
    /// `0..self.shards()`. For tests and diagnostics (an operator checking
    /// the spread); the packet path computes it internally.
    #[inline]
    pub fn shard_index(&self, scope: &AffinityScope, key: AffinityKey) -> usize {
        self.shard_of(scope, &key)
    }

    /// Routes one new connection of `key` through `scope`.
    ///
    /// If a live entry exists and `usable` accepts its endpoint (returning
    /// the endpoint's index in the caller's destinations), the entry's timer
    /// restarts and that endpoint is returned (`hit`). Otherwise a stale
    /// entry is dropped, `schedule` picks `(index, endpoint)` and the choice
    /// is remembered, evicting (expired first, then least recently used) if
    /// the shard or the scope is full. `None` when `schedule` returns `None`.
    ///
    /// `schedule` runs under the shard's lock, so two first connections of
    /// one key agree; it must not call back into this table.
    pub fn route(
        &self,
        scope: &Arc<AffinityScope>,
        key: AffinityKey,
        now: Instant,
        mut usable: impl FnMut(SocketAddr) -> Option<usize>,
        schedule: impl FnOnce() -> Option<(usize, SocketAddr)>,
    ) -> Option<Pinned> {
        let s = self.shard_of(scope, &key);
        let k = self.config.reap_batch;
        let mut schedule = Some(schedule);
        let mut schedule = move || schedule.take().and_then(|f| f());
        let mut tries = 0;
        let result = loop {
            let mut sh = self.shards[s].lock();
            // Checked under the lock: `remove_scope` sets the flag before it
            // purges each shard under its lock, so a removed scope never
            // inserts into a shard already purged (whose slot may be reused).
            if scope.is_removed() {
                drop(sh);
                break schedule().map(|(index, endpoint)| Pinned {
                    index,
                    endpoint,
                    hit: false,
                    control: control::Controlled::default(),
                });
            }
            let controls = self.controls_of(scope);
            sh.hits += 1;
            if sh.hits >= HIT_REAP_PERIOD {
                sh.hits = 0;
                sh.reap(scope.slot, now, k, controls);
            }
            if let Some(&i) = sh.index.get(&(scope.slot, key)) {
                let n = &sh.nodes[i as usize];
                let endpoint = n.endpoint;
                debug_assert!(n.scope.as_ref().is_some_and(|x| Arc::ptr_eq(x, scope)));
                let (live, delayed) = expiry(n, now, controls);
                let decided = if live.is_some() {
                    usable(endpoint)
                } else {
                    None
                };
                if let Some(index) = decided {
                    // A new connection restarts the template's timer, with
                    // 60 s once it has been delayed (the kernel's
                    // `ct->timeout`).
                    if delayed {
                        sh.nodes[i as usize].delayed = true;
                    }
                    sh.touch(i, now);
                    let control = controlled(controls, &sh.nodes[i as usize]);
                    break Some(Pinned {
                        index,
                        endpoint,
                        hit: true,
                        control,
                    });
                }
                // Expired, or its endpoint no longer takes new connections.
                sh.remove(i);
            }
            // A miss: reap, then make room in the scope.
            sh.reap(scope.slot, now, k, controls);
            let mut reserved = scope.try_reserve();
            while !reserved && sh.evict_scope_lru(scope.slot) {
                reserved = scope.try_reserve();
            }
            if !reserved && tries < 2 {
                // The scope's entries live in other shards: evict there
                // (never holding two shard locks), then start over.
                drop(sh);
                self.evict_scope_elsewhere(scope, s, now);
                tries += 1;
                continue;
            }
            let Some((index, endpoint)) = schedule() else {
                if reserved {
                    scope.release();
                }
                break None;
            };
            let mut control = control::Controlled::default();
            if reserved {
                if sh.len >= sh.cap {
                    sh.evict_for_room(now, controls);
                }
                let i = sh.insert(scope, key, endpoint, now);
                control = controlled(controls, &sh.nodes[i as usize]);
            }
            break Some(Pinned {
                index,
                endpoint,
                hit: false,
                control,
            });
        };
        if let Some(p) = &result {
            scope.observe(key, p.hit);
        }
        result
    }

    /// The controlled-connection counts that keep `scope`'s entries
    /// alive, if they are IPVS persistence templates.
    #[inline]
    fn controls_of(&self, scope: &AffinityScope) -> Option<&Controls> {
        match &self.controls {
            Some(c) if scope.frontend.load(Ordering::Relaxed) != 0 => Some(c),
            _ => None,
        }
    }

    fn evict_scope_elsewhere(&self, scope: &AffinityScope, from: usize, now: Instant) {
        let n = self.shards.len();
        let controls = self.controls_of(scope);
        for d in 1..n {
            let mut sh = self.shards[(from + d) & self.mask].lock();
            sh.reap(scope.slot, now, self.config.reap_batch, controls);
            if sh.scope_links(scope.slot).tail != NIL {
                sh.evict_scope_lru(scope.slot);
                return;
            }
        }
    }

    /// The endpoint `key` is pinned to in `scope`, if the entry is live. Does
    /// not refresh it (inspection, not a connection).
    pub fn get(&self, scope: &AffinityScope, key: AffinityKey, now: Instant) -> Option<SocketAddr> {
        if scope.is_removed() {
            return None;
        }
        let sh = self.shards[self.shard_of(scope, &key)].lock();
        let &i = sh.index.get(&(scope.slot, key))?;
        let n = &sh.nodes[i as usize];
        let s = n.scope.as_ref()?;
        (core::ptr::eq(&**s, scope) && expiry(n, now, self.controls_of(scope)).0.is_some())
            .then_some(n.endpoint)
    }

    /// Drops every entry of `scope` whose endpoint `keep` rejects (or that
    /// has expired); returns how many were dropped. Walks only this scope's
    /// entries, one shard at a time, in chunks of at most 64 entries per
    /// lock hold (packet threads wait for one chunk at most). An entry
    /// that a concurrent route removes or reuses between two chunks makes
    /// the walk restart at its shard's head, a few times at most; entries
    /// left then, or touched by a route while the lock was released, are
    /// dropped lazily (a route rechecks the endpoint of every entry it
    /// finds). The dataplanes call it on sync when an endpoint
    /// stops taking new connections.
    pub fn retain(
        &self,
        scope: &AffinityScope,
        now: Instant,
        mut keep: impl FnMut(SocketAddr) -> bool,
    ) -> usize {
        if scope.is_removed() {
            return 0;
        }
        let controls = self.controls_of(scope);
        let mut drop = |n: &Node| !keep(n.endpoint) || expiry(n, now, controls).0.is_none();
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut cursor: Option<(u32, AffinityKey)> = None;
            let mut restarts = 0;
            loop {
                let mut sh = shard.lock();
                let start = match cursor {
                    None => None,
                    Some((i, key)) if sh.holds(i, scope.slot, key) => Some(i),
                    Some(_) => {
                        restarts += 1;
                        if restarts > SYNC_RESTARTS {
                            break;
                        }
                        None
                    }
                };
                let (n, rest) = sh.retain_scope_chunk(scope.slot, start, SYNC_CHUNK, &mut drop);
                removed += n;
                match rest {
                    None => break,
                    Some(i) => cursor = Some((i, sh.nodes[i as usize].key)),
                }
            }
        }
        removed
    }

    /// The live entries of `scope`, sorted by key. Allocates; for
    /// inspection.
    pub fn entries(&self, scope: &AffinityScope, now: Instant) -> Vec<ScopeEntry> {
        let mut out = Vec::new();
        if scope.is_removed() {
            return out;
        }
        let controls = self.controls_of(scope);
        for shard in self.shards.iter() {
            let sh = shard.lock();
            let mut i = sh.scope_links(scope.slot).head;
            while i != NIL {
                let n = &sh.nodes[i as usize];
                if let (Some(at), _) = expiry(n, now, controls) {
                    out.push(ScopeEntry {
                        key: n.key,
                        endpoint: n.endpoint,
                        time_left: Duration::from_nanos(at.saturating_sub(now.as_nanos())),
                    });
                }
                i = n.snext;
            }
        }
        out.sort_by_key(|e| e.key);
        out
    }
}

// ---------------------------------------------------------------------------
// The dataplanes' side: scopes per virtual service, kept across syncs.

/// A virtual service: protocol and VIP:port.
pub(crate) type VsId = (Protocol, SocketAddr);

/// What a dataplane compiles into a service port with `ClientIP` affinity.
#[derive(Debug)]
pub(crate) struct AffinityPort {
    pub(crate) scope: Arc<AffinityScope>,
    kind: AffinityKeyKind,
    /// Usable endpoint → index in the compiled destinations.
    position: AHashMap<SocketAddr, u32>,
    /// New connections per destination, shared across syncs.
    new_conns: Box<[Arc<AtomicU64>]>,
}

impl AffinityPort {
    /// The key of a new connection.
    #[inline]
    pub(crate) fn key(&self, flow: &Flow, caller: Option<u64>) -> AffinityKey {
        AffinityKey::for_flow(self.kind, flow, caller)
    }

    /// The index of `endpoint` if it takes new connections.
    #[inline]
    pub(crate) fn position(&self, endpoint: SocketAddr) -> Option<usize> {
        self.position.get(&endpoint).map(|&i| i as usize)
    }

    /// Counts a new connection to destination `index`.
    #[inline]
    pub(crate) fn count(&self, index: usize) {
        if let Some(c) = self.new_conns.get(index) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
struct Bound {
    service: ServiceKey,
    scope: Arc<AffinityScope>,
    kind: AffinityKeyKind,
    /// The endpoints that take new connections, in rule order.
    usable: Vec<SocketAddr>,
    /// New connections per endpoint (all destinations).
    counters: AHashMap<SocketAddr, Arc<AtomicU64>>,
}

/// The scopes of a dataplane, by virtual service; touched only by sync and
/// inspection (never by `route`).
#[derive(Debug, Default)]
pub(crate) struct ScopeRegistry {
    bound: AHashMap<VsId, Bound>,
    by_service: AHashMap<ServiceKey, SmallVec<[VsId; 2]>>,
}

impl ScopeRegistry {
    /// Compiles the affinity of one virtual service of `service` whose
    /// destinations are `dests` (`usable(i)`: destination i takes new
    /// connections). `None` without `ClientIP` affinity. Entries pinned to
    /// an endpoint that stopped taking new connections are purged here.
    /// Call [`Self::finish_service`] after binding all of a service's ports.
    pub(crate) fn bind(
        &mut self,
        table: &AffinityTable,
        service: &Service,
        vs: VsId,
        dests: &[SocketAddr],
        usable: impl Fn(usize) -> bool,
    ) -> Option<AffinityPort> {
        // A sync has no clock: expiry is left to reaping and lookups.
        let now = Instant::ZERO;
        let SessionAffinity::ClientIp { timeout_secs } = service.session_affinity() else {
            return None;
        };
        let timeout = Duration::from_secs(u64::from(timeout_secs));
        let kind = service.affinity_key();
        let position: AHashMap<SocketAddr, u32> = dests
            .iter()
            .enumerate()
            .filter(|&(i, _)| usable(i))
            .map(|(i, a)| (*a, i as u32))
            .collect();
        let mut usable_list: Vec<SocketAddr> = dests
            .iter()
            .enumerate()
            .filter(|&(i, _)| usable(i))
            .map(|(_, a)| *a)
            .collect();
        usable_list.dedup();
        if self
            .bound
            .get(&vs)
            .is_some_and(|b| b.service != *service.key())
        {
            // The VIP moved to another service: the old one's entries go.
            let old = self.bound.remove(&vs).expect("checked");
            table.remove_scope(&old.scope);
            if let Some(list) = self.by_service.get_mut(&old.service) {
                list.retain(|x| *x != vs);
            }
        }
        let b = self.bound.entry(vs).or_insert_with(|| Bound {
            service: service.key().clone(),
            scope: table.new_scope(timeout),
            kind,
            usable: Vec::new(),
            counters: AHashMap::new(),
        });
        b.scope.set_timeout(timeout);
        if b.kind != kind {
            // Entries of the old key kind would never match again.
            table.retain(&b.scope, now, |_| false);
            b.kind = kind;
        } else if b.usable.iter().any(|a| !position.contains_key(a)) {
            // An endpoint stopped taking new connections: purge eagerly.
            table.retain(&b.scope, now, |a| position.contains_key(&a));
        }
        let counters: AHashMap<SocketAddr, Arc<AtomicU64>> = dests
            .iter()
            .map(|a| (*a, b.counters.get(a).cloned().unwrap_or_default()))
            .collect();
        let new_conns = dests.iter().map(|a| Arc::clone(&counters[a])).collect();
        b.counters = counters;
        b.usable = usable_list;
        let entry = self.by_service.entry(service.key().clone()).or_default();
        if !entry.contains(&vs) {
            entry.push(vs);
        }
        Some(AffinityPort {
            scope: Arc::clone(&b.scope),
            kind,
            position,
            new_conns,
        })
    }

    /// Removes the scope of one virtual service, if it has one.
    pub(crate) fn remove_vs(&mut self, table: &AffinityTable, vs: VsId) {
        if let Some(b) = self.bound.remove(&vs) {
            table.remove_scope(&b.scope);
            if let Some(list) = self.by_service.get_mut(&b.service) {
                list.retain(|x| *x != vs);
                if list.is_empty() {
                    self.by_service.remove(&b.service);
                }
            }
        }
    }

    /// Removes the scopes of every virtual service `keep` rejects.
    pub(crate) fn retain_vs(&mut self, table: &AffinityTable, keep: impl Fn(&VsId) -> bool) {
        let gone: Vec<VsId> = self.bound.keys().filter(|vs| !keep(vs)).copied().collect();
        for vs in gone {
            self.remove_vs(table, vs);
        }
    }

    fn ports_of(&self, service: &ServiceKey) -> Vec<(VsId, &Bound)> {
        let mut v: Vec<(VsId, &Bound)> = self
            .by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|vs| self.bound.get(vs).map(|b| (*vs, b)))
            .collect();
        v.sort_by_key(|(vs, _)| (vs.1, vs.0));
        v
    }

    /// The live entries of every port of `service`.
    pub(crate) fn entries(
        &self,
        table: &AffinityTable,
        service: &ServiceKey,
        now: Instant,
    ) -> Vec<AffinityEntry> {
        let mut out = Vec::new();
        for ((protocol, vip), b) in self.ports_of(service) {
            out.extend(
                table
                    .entries(&b.scope, now)
                    .into_iter()
                    .map(|e| AffinityEntry {
                        protocol,
                        vip,
                        key: e.key,
                        endpoint: e.endpoint,
                        time_left: e.time_left,
                    }),
            );
        }
        out
    }

    /// The hotspot report of `service`, if it has `ClientIP` affinity.
    pub(crate) fn report(
        &self,
        table: &AffinityTable,
        service: &ServiceKey,
        now: Instant,
    ) -> Option<AffinityReport> {
        let ports = self.ports_of(service);
        if ports.is_empty() {
            return None;
        }
        let config = table.config();
        let ports = ports
            .into_iter()
            .map(|((protocol, vip), b)| {
                let entries = table.entries(&b.scope, now);
                let mut live: AHashMap<SocketAddr, usize> = AHashMap::new();
                for e in &entries {
                    *live.entry(e.endpoint).or_default() += 1;
                }
                let endpoints = b
                    .usable
                    .iter()
                    .map(|a| EndpointAffinityStats {
                        endpoint: *a,
                        new_connections: b.counters.get(a).map_or(0, |c| c.load(Ordering::Relaxed)),
                        live_entries: live.get(a).copied().unwrap_or(0),
                    })
                    .collect();
                let (items, sampled) = b.scope.heavy_hitters();
                let fair_share = 1.0 / entries.len().max(1) as f64;
                let hotspots = items
                    .iter()
                    .filter_map(|it| {
                        let guaranteed = it.count - it.error;
                        let observed = guaranteed as f64 / sampled.max(1) as f64;
                        (guaranteed >= config.hotspot_min_connections
                            && observed >= config.hotspot_factor * fair_share)
                            .then(|| Hotspot {
                                key: it.key,
                                connections: guaranteed,
                                observed_share: observed,
                                fair_share,
                                endpoint: table.get(&b.scope, it.key, now),
                            })
                    })
                    .collect();
                PortAffinityReport {
                    protocol,
                    vip,
                    timeout: b.scope.timeout(),
                    key_kind: b.kind,
                    new_connections: b.scope.new_connections(),
                    affinity_hits: b.scope.hits(),
                    sampled_connections: sampled,
                    live_entries: entries.len(),
                    endpoints,
                    hotspots,
                }
            })
            .collect();
        Some(AffinityReport {
            service: service.clone(),
            ports,
        })
    }
}

// ---------------------------------------------------------------------------
// Inspection and reports.

/// One live affinity entry of a service, as `ipvsadm -ln --persistent-conn`
/// (or `ipvsadm -lnc`'s persistence templates) shows it.
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use svclb::{AffinityEntry, AffinityKey, Protocol};
/// let e = AffinityEntry {
///     protocol: Protocol::Tcp,
///     vip: "10.96.0.10:80".parse().unwrap(),
///     key: AffinityKey::ClientIp("192.0.2.7".parse().unwrap()),
///     endpoint: "10.1.0.2:8080".parse().unwrap(),
///     time_left: Duration::from_secs(10_795),
/// };
/// assert_eq!(e.to_string(), "TCP  10.96.0.10:80  192.0.2.7 -> 10.1.0.2:8080  expires 02:59:55");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AffinityEntry {
    /// The service port's protocol.
    pub protocol: Protocol,
    /// The service port: cluster IP and port.
    pub vip: SocketAddr,
    /// The affinity key.
    pub key: AffinityKey,
    /// The endpoint the key is pinned to.
    pub endpoint: SocketAddr,
    /// Until the entry expires, unless a new connection refreshes it.
    pub time_left: Duration,
}

impl fmt::Display for AffinityEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.time_left.as_secs();
        write!(
            f,
            "{}  {}  {} -> {}  expires {:02}:{:02}:{:02}",
            self.protocol,
            self.vip,
            self.key,
            self.endpoint,
            s / 3600,
            s / 60 % 60,
            s % 60
        )
    }
}

/// New connections and live entries of one endpoint of an affinity service
/// port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointAffinityStats {
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// New connections routed to it (hits and misses) through this port.
    pub new_connections: u64,
    /// Live affinity entries pinned to it.
    pub live_entries: usize,
}

/// An affinity key with a disproportionate share of a service port's new
/// connections: typically many clients behind one NAT.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hotspot {
    /// The key.
    pub key: AffinityKey,
    /// New connections of this key (a guaranteed lower bound from the
    /// sketch).
    pub connections: u64,
    /// Its share of the port's (sampled) new connections.
    pub observed_share: f64,
    /// The share each key would get if all live keys were alike: one over
    /// the live entries.
    pub fair_share: f64,
    /// The endpoint it is pinned to now, if its entry is live.
    pub endpoint: Option<SocketAddr>,
}

/// Affinity counters and hotspots of one service port.
#[derive(Debug, Clone, PartialEq)]
pub struct PortAffinityReport {
    /// The protocol.
    pub protocol: Protocol,
    /// Cluster IP and port.
    pub vip: SocketAddr,
    /// The idle timeout.
    pub timeout: Duration,
    /// Which key the service pins.
    pub key_kind: AffinityKeyKind,
    /// New connections since the port got affinity.
    pub new_connections: u64,
    /// Those of them that a live affinity entry decided (hits); the rest
    /// were scheduled afresh.
    pub affinity_hits: u64,
    /// Those the heavy-hitters sketch saw (all of them without contention).
    pub sampled_connections: u64,
    /// Live entries.
    pub live_entries: usize,
    /// Per endpoint that takes new connections, in rule order.
    pub endpoints: Vec<EndpointAffinityStats>,
    /// The flagged keys, heaviest first.
    pub hotspots: Vec<Hotspot>,
}

/// The affinity report of one service: per port, new connections and live
/// entries per endpoint, and the hotspot keys.
///
/// `Display` prints a short text for operators.
#[derive(Debug, Clone, PartialEq)]
pub struct AffinityReport {
    /// The service.
    pub service: ServiceKey,
    /// One section per service port (and per cluster IP).
    pub ports: Vec<PortAffinityReport>,
}

impl AffinityReport {
    /// Whether any port has a hotspot.
    pub fn has_hotspots(&self) -> bool {
        self.ports.iter().any(|p| !p.hotspots.is_empty())
    }
}

fn pct(x: f64) -> f64 {
    x * 100.0
}

impl fmt::Display for AffinityReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.ports {
            writeln!(
                f,
                "{} {} {}: ClientIP affinity, key {}, timeout {}s: {} new connections, {} live entries",
                self.service,
                p.protocol,
                p.vip,
                p.key_kind,
                p.timeout.as_secs(),
                p.new_connections,
                p.live_entries
            )?;
            let n = p.endpoints.len().max(1) as f64;
            let total: u64 = p.endpoints.iter().map(|e| e.new_connections).sum();
            for e in &p.endpoints {
                writeln!(
                    f,
                    "  endpoint {}: {} new connections ({:.1}%, fair {:.1}%), {} live entries",
                    e.endpoint,
                    e.new_connections,
                    pct(e.new_connections as f64 / total.max(1) as f64),
                    pct(1.0 / n),
                    e.live_entries
                )?;
            }
            for h in &p.hotspots {
                write!(
                    f,
                    "  HOTSPOT key {}: at least {} new connections, {:.2}% of them; fair share {:.4}% ({:.0}x)",
                    h.key,
                    h.connections,
                    pct(h.observed_share),
                    pct(h.fair_share),
                    h.observed_share / h.fair_share
                )?;
                if let Some(ep) = h.endpoint {
                    write!(f, ", pinned to {ep}")?;
                }
                writeln!(
                    f,
                    ": many clients behind one address? pin a cookie or header key (affinity key `caller`) or go stateless"
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 1, 0, i], 8080)))
            .collect()
    }

    fn ip(i: u32) -> AffinityKey {
        AffinityKey::ClientIp(IpAddr::V4((0xC000_0000u32 + i).into()))
    }

    /// Routes `key` with round-robin over `dests` as the scheduler.
    struct Harness {
        table: AffinityTable,
        scope: Arc<AffinityScope>,
        dests: Vec<SocketAddr>,
        rr: core::cell::Cell<usize>,
    }

    impl Harness {
        fn new(config: AffinityConfig, timeout_secs: u64, n: u8) -> Self {
            let table = AffinityTable::new(config, 1);
            let scope = table.new_scope(Duration::from_secs(timeout_secs));
            Harness {
                table,
                scope,
                dests: eps(n),
                rr: core::cell::Cell::new(0),
            }
        }
        fn route(&self, key: AffinityKey, now: Instant) -> Pinned {
            let dests = &self.dests;
            self.table
                .route(
                    &self.scope,
                    key,
                    now,
                    |ep| dests.iter().position(|d| *d == ep),
                    || {
                        let i = self.rr.get() % dests.len();
                        self.rr.set(i + 1);
                        Some((i, dests[i]))
                    },
                )
                .unwrap()
        }
    }

    fn secs(s: u64) -> Instant {
        Instant::from_secs(s)
    }

    #[test]
    fn sticks_within_the_window_and_expires_after_idle_timeout() {
        let h = Harness::new(AffinityConfig::default(), 100, 3);
        let first = h.route(ip(1), secs(0));
        assert!(!first.hit);
        for t in [1, 50, 99] {
            // Each is a new connection: refreshes, so check against the
            // latest refresh (t - previous < 100 always here).
            let p = h.route(ip(1), secs(t));
            assert!(p.hit, "t={t}");
            assert_eq!(p.endpoint, first.endpoint);
        }
        // Last refresh at 99: live until 198.999..., gone at 199.
        assert_eq!(
            h.table
                .get(&h.scope, ip(1), Instant::from_nanos(198_999_999_999)),
            Some(first.endpoint)
        );
        assert_eq!(h.table.get(&h.scope, ip(1), secs(199)), None);
        let p = h.route(ip(1), secs(199));
        assert!(!p.hit, "balanced afresh after {} idle seconds", 100);
        assert_ne!(p.endpoint, first.endpoint, "round-robin moved on");
    }

    #[test]
    fn refresh_on_every_connection_keeps_a_client_pinned_indefinitely() {
        let h = Harness::new(AffinityConfig::default(), 10, 4);
        let first = h.route(ip(7), secs(0));
        // Other clients churn the scheduler meanwhile.
        for n in 1..=1000u64 {
            h.route(ip(1000 + n as u32), secs(n * 9));
            let p = h.route(ip(7), secs(n * 9));
            assert!(p.hit && p.endpoint == first.endpoint, "connection {n}");
        }
    }

    /// Purges on sync walk at most `SYNC_CHUNK` entries per lock hold,
    /// and still drop every entry they should: 1,000 entries of one scope
    /// in one shard.
    #[test]
    fn sync_purges_walk_bounded_chunks_per_lock() {
        let config = AffinityConfig::new(4096).unwrap().shards(1).unwrap();
        let h = Harness::new(config, 1000, 4);
        for i in 0..1000 {
            h.route(ip(i), secs(0));
        }
        assert_eq!(h.table.len(), 1000);
        let gone = h.dests[0];
        let dropped = h.table.retain(&h.scope, secs(1), |ep| ep != gone);
        assert_eq!(dropped, 250);
        assert_eq!(h.table.len(), 750);
        h.table.remove_scope(&h.scope);
        assert_eq!(h.table.len(), 0);
        let walked = h.table.shards[0].lock().max_sync_walk;
        assert!(walked > 0 && walked <= SYNC_CHUNK, "walked {walked}");
    }

    #[test]
    fn unusable_endpoint_is_dropped_and_client_rebalanced_at_once() {
        let h = Harness::new(AffinityConfig::default(), 1000, 3);
        let first = h.route(ip(1), secs(0));
        let others: Vec<SocketAddr> = h
            .dests
            .iter()
            .copied()
            .filter(|d| *d != first.endpoint)
            .collect();
        // The endpoint stops taking new connections: `usable` rejects it.
        let p = h
            .table
            .route(
                &h.scope,
                ip(1),
                secs(1),
                |ep| others.iter().position(|d| *d == ep),
                || Some((0, others[0])),
            )
            .unwrap();
        assert!(!p.hit);
        assert_eq!(p.endpoint, others[0]);
        assert_eq!(h.table.get(&h.scope, ip(1), secs(2)), Some(others[0]));
        assert_eq!(h.scope.len(), 1);
    }

    #[test]
    fn retain_purges_entries_of_removed_endpoints() {
        let h = Harness::new(AffinityConfig::default(), 1000, 2);
        for i in 0..100 {
            h.route(ip(i), secs(0));
        }
        let gone = h.dests[0];
        let removed = h.table.retain(&h.scope, secs(1), |ep| ep != gone);
        assert_eq!(removed, 50);
        assert_eq!(h.scope.len(), 50);
        assert!(
            h.table
                .entries(&h.scope, secs(1))
                .iter()
                .all(|e| e.endpoint != gone)
        );
    }

    #[test]
    fn global_bound_holds_under_a_million_distinct_keys() {
        let cap = 20_000;
        let h = Harness::new(AffinityConfig::new(cap).unwrap(), 10_800, 4);
        for i in 0..1_000_000u32 {
            h.route(ip(i), Instant::from_millis(u64::from(i)));
            if i % 50_000 == 0 {
                assert!(h.table.len() <= cap);
            }
        }
        let len = h.table.len();
        assert!(len <= cap, "{len} > {cap}");
        assert!(len >= cap * 9 / 10, "the table is used: {len}");
        assert_eq!(h.scope.len(), len);
        // The most recent keys are still pinned; the oldest were evicted.
        let now = Instant::from_millis(1_000_000);
        assert!(h.table.get(&h.scope, ip(999_999), now).is_some());
        assert!(h.table.get(&h.scope, ip(0), now).is_none());
    }

    #[test]
    fn per_service_bound_holds_and_spares_other_services() {
        let config = AffinityConfig::new(100_000)
            .unwrap()
            .per_service_capacity(500)
            .unwrap();
        let table = AffinityTable::new(config, 3);
        let flood = table.new_scope(Duration::from_secs(10_800));
        let quiet = table.new_scope(Duration::from_secs(10_800));
        let ep = eps(1)[0];
        for i in 0..100 {
            table.route(&quiet, ip(i), secs(0), |_| Some(0), || Some((0, ep)));
        }
        for i in 0..1_000_000u32 {
            table.route(&flood, ip(i), secs(1), |_| Some(0), || Some((0, ep)));
            assert!(flood.len() <= 500);
        }
        assert_eq!(flood.len(), 500);
        assert_eq!(
            quiet.len(),
            100,
            "another service's entries survive the flood"
        );
        assert_eq!(table.len(), 600);
    }

    #[test]
    fn expired_entries_go_before_live_ones_when_full() {
        // One shard of 16 entries.
        let table = AffinityTable::new(AffinityConfig::new(16).unwrap(), 0);
        assert_eq!(table.shards(), 1);
        let short = table.new_scope(Duration::from_secs(5));
        let long = table.new_scope(Duration::from_secs(1000));
        let ep = eps(1)[0];
        // Long-lived entries first (older), then short ones.
        for i in 0..8 {
            table.route(&long, ip(i), secs(0), |_| Some(0), || Some((0, ep)));
        }
        for i in 0..8 {
            table.route(&short, ip(100 + i), secs(1), |_| Some(0), || Some((0, ep)));
        }
        // At t=10 the short ones have expired; new long entries replace them,
        // not the older but live long ones.
        for i in 0..8 {
            table.route(&long, ip(200 + i), secs(10), |_| Some(0), || Some((0, ep)));
        }
        for i in 0..8 {
            assert_eq!(
                table.get(&long, ip(i), secs(10)),
                Some(ep),
                "live entry {i} kept"
            );
        }
        assert_eq!(short.len(), 0);
        assert_eq!(table.len(), 16);
    }

    #[test]
    fn lru_goes_when_nothing_expired() {
        let table = AffinityTable::new(AffinityConfig::new(16).unwrap(), 0);
        let s = table.new_scope(Duration::from_secs(1000));
        let ep = eps(1)[0];
        for i in 0..16 {
            table.route(&s, ip(i), secs(u64::from(i)), |_| Some(0), || Some((0, ep)));
        }
        // Touch key 0: now key 1 is the least recently used.
        table.route(&s, ip(0), secs(20), |_| Some(0), || Some((0, ep)));
        table.route(&s, ip(99), secs(21), |_| Some(0), || Some((0, ep)));
        assert!(table.get(&s, ip(0), secs(21)).is_some());
        assert!(table.get(&s, ip(1), secs(21)).is_none());
        assert!(table.get(&s, ip(99), secs(21)).is_some());
    }

    #[test]
    fn reaping_is_incremental_and_keys_are_distinct_per_scope() {
        let table = AffinityTable::new(AffinityConfig::new(1024).unwrap().shards(1).unwrap(), 0);
        let a = table.new_scope(Duration::from_secs(1));
        let b = table.new_scope(Duration::from_secs(1));
        let ep = eps(2);
        for i in 0..100 {
            table.route(&a, ip(i), secs(0), |_| Some(0), || Some((0, ep[0])));
        }
        // The same key in another scope is another entry.
        table.route(&b, ip(0), secs(0), |_| Some(1), || Some((1, ep[1])));
        assert_eq!(table.get(&a, ip(0), secs(0)), Some(ep[0]));
        assert_eq!(table.get(&b, ip(0), secs(0)), Some(ep[1]));
        // One operation at t=5 reaps a few, not all 101.
        table.route(&b, ip(1), secs(5), |_| Some(1), || Some((1, ep[1])));
        let left = table.len();
        assert!(left > 90 && left < 101, "{left}");
        // Keep operating: the backlog drains a few at a time.
        for i in 0..100 {
            table.route(&b, ip(1), secs(5 + i), |_| Some(1), || Some((1, ep[1])));
        }
        assert!(table.len() <= 2, "{}", table.len());
        assert_eq!(a.len(), 0);
    }

    #[test]
    fn hits_alone_also_drain_expired_entries() {
        let table = AffinityTable::new(AffinityConfig::new(1024).unwrap().shards(1).unwrap(), 0);
        let short = table.new_scope(Duration::from_secs(1));
        let long = table.new_scope(Duration::from_secs(1000));
        let ep = eps(1)[0];
        for i in 0..100 {
            table.route(&short, ip(i), secs(0), |_| Some(0), || Some((0, ep)));
        }
        table.route(&long, ip(0), secs(0), |_| Some(0), || Some((0, ep)));
        // Only hits from now on: every eighth reaps up to 4 entries.
        for t in 0..400 {
            let p = table.route(&long, ip(0), secs(10 + t), |_| Some(0), || None);
            assert!(p.unwrap().hit);
        }
        assert_eq!(short.len(), 0);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn removal_racing_with_routes_keeps_the_books_straight() {
        let table = AffinityTable::new(AffinityConfig::new(4096).unwrap(), 5);
        let ep = eps(2);
        for round in 0..20u32 {
            let old = table.new_scope(Duration::from_secs(100));
            std::thread::scope(|s| {
                for t in 0..2u32 {
                    let (table, old, ep) = (&table, &old, &ep);
                    s.spawn(move || {
                        for i in 0..2000u32 {
                            table.route(
                                old,
                                ip(t * 10_000 + i),
                                secs(0),
                                |_| Some(0),
                                || Some((0, ep[0])),
                            );
                        }
                    });
                }
                table.remove_scope(&old);
            });
            // The freed slot is reused; the dead scope left nothing behind.
            let new = table.new_scope(Duration::from_secs(100));
            for i in 0..100 {
                let p = table
                    .route(&new, ip(i), secs(1), |_| Some(1), || Some((1, ep[1])))
                    .unwrap();
                assert!(!p.hit, "round {round}: a dead scope's entry was found");
            }
            assert_eq!(old.len(), 0, "round {round}");
            assert_eq!(table.len(), new.len(), "round {round}");
            assert!(
                table
                    .entries(&new, secs(1))
                    .iter()
                    .all(|e| e.endpoint == ep[1])
            );
            table.remove_scope(&new);
            assert!(table.is_empty());
        }
    }

    #[test]
    fn removed_scope_forgets_and_stops_pinning() {
        let h = Harness::new(AffinityConfig::default(), 100, 3);
        for i in 0..10 {
            h.route(ip(i), secs(0));
        }
        h.table.remove_scope(&h.scope);
        assert!(h.scope.is_removed());
        assert_eq!(h.table.len(), 0);
        let p = h.route(ip(1), secs(1));
        assert!(!p.hit);
        assert_eq!(h.table.len(), 0);
        // A new scope reuses the slot with none of the old entries.
        let s2 = h.table.new_scope(Duration::from_secs(100));
        assert_eq!(h.table.get(&s2, ip(1), secs(1)), None);
        assert_eq!(h.table.get(&h.scope, ip(1), secs(1)), None);
    }

    #[test]
    fn scheduler_refusal_inserts_nothing() {
        let h = Harness::new(AffinityConfig::default(), 100, 1);
        assert_eq!(
            h.table.route(&h.scope, ip(1), secs(0), |_| None, || None),
            None
        );
        assert_eq!(h.scope.len(), 0);
        assert!(h.table.is_empty());
    }

    #[test]
    fn sketch_always_replaces_a_minimum_counter() {
        let mut s = SpaceSaving::new();
        let rng = crate::rng::SeededRng::new(3);
        for _ in 0..50_000 {
            let key = ip(rng.below(200) as u32 + if rng.below(4) == 0 { 0 } else { 1000 });
            let before = s.counts.clone();
            let present = s.keys.contains(&key);
            s.observe(key);
            if !present && before.len() == SKETCH_SIZE {
                let min = *before.iter().min().unwrap();
                let i = s.keys.iter().position(|k| *k == key).unwrap();
                assert_eq!(before[i], min, "replaced a counter above the minimum");
                assert_eq!((s.counts[i], s.errors[i]), (min + 1, min));
            }
        }
        // Each observation adds exactly one to the sum of the counts.
        assert_eq!(s.counts.iter().sum::<u64>(), s.total);
    }

    #[test]
    fn sketch_keeps_the_heavy_hitter_with_a_small_error() {
        let mut s = SpaceSaving::new();
        for round in 0..10_000u32 {
            s.observe(ip(round));
            if round % 5 == 0 {
                s.observe(ip(5_000_000));
            }
        }
        let items = s.items();
        let heavy = items.iter().find(|it| it.key == ip(5_000_000)).unwrap();
        assert!(heavy.count >= 2000);
        assert!(heavy.count - heavy.error <= 2000);
        assert!(heavy.count - heavy.error >= 1500, "{heavy:?}");
        assert_eq!(items.len(), SKETCH_SIZE);
        assert_eq!(s.total, 12_000);
    }

    #[test]
    fn config_setters_reject_bad_values_naming_field_and_value() {
        let e = AffinityConfig::new(0).unwrap_err();
        assert_eq!(e.field(), "affinity.capacity");
        let e = AffinityConfig::default()
            .per_service_capacity(0)
            .unwrap_err();
        assert_eq!(e.field(), "affinity.perServiceCapacity");
        let e = AffinityConfig::default().shards(3).unwrap_err();
        assert_eq!(e.field(), "affinity.shards");
        assert!(e.to_string().contains('3'));
        let e = AffinityConfig::default().reap_batch(0).unwrap_err();
        assert_eq!(e.field(), "affinity.reapBatch");
        let e = AffinityConfig::default()
            .hotspot_thresholds(f64::NAN, 1)
            .unwrap_err();
        assert_eq!(e.field(), "affinity.hotspotFactor");
        assert!(
            AffinityConfig::default()
                .hotspot_thresholds(0.5, 1)
                .is_err()
        );
    }

    #[test]
    fn small_capacities_use_fewer_shards_and_split_exactly() {
        assert_eq!(
            AffinityTable::new(AffinityConfig::new(10).unwrap(), 0).shards(),
            1
        );
        assert_eq!(
            AffinityTable::new(AffinityConfig::new(100).unwrap(), 0).shards(),
            4
        );
        let t = AffinityTable::new(AffinityConfig::new(1001).unwrap(), 0);
        let total: usize = t.shards.iter().map(|s| s.lock().cap).sum();
        assert_eq!(total, 1001);
    }

    #[test]
    fn types_are_send_sync_and_keys_small() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<AffinityTable>();
        assert_send_sync::<AffinityScope>();
        assert!(core::mem::size_of::<AffinityKey>() <= 40);
        // One entry: the slab node plus its index slot, about 160 bytes with
        // the map's load factor (the figure the docs give for 1M entries).
        let node = core::mem::size_of::<Node>();
        let slot = core::mem::size_of::<((u32, AffinityKey), u32)>();
        assert!(node <= 112, "{node}");
        assert!(node + slot * 8 / 7 <= 170, "{node} + {slot}");
    }

    #[test]
    fn many_threads_share_the_table_within_its_bound() {
        let table = Arc::new(AffinityTable::new(
            AffinityConfig::new(2_000)
                .unwrap()
                .per_service_capacity(1_500)
                .unwrap(),
            9,
        ));
        let scope = table.new_scope(Duration::from_secs(100));
        let ep = eps(2);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let table = &table;
                let scope = &scope;
                let ep = &ep;
                s.spawn(move || {
                    for i in 0..20_000u32 {
                        let key = ip(t * 1_000_000 + i % 3000);
                        table.route(
                            scope,
                            key,
                            secs(u64::from(i / 100)),
                            |e| ep.iter().position(|x| *x == e),
                            || Some((0, ep[0])),
                        );
                    }
                });
            }
        });
        assert!(scope.len() <= 1_500);
        assert_eq!(scope.len(), table.len());
    }
}
