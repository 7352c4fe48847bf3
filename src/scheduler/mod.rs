//! Selection strategies: which destination of a virtual service takes a new
//! connection.
//!
//! The built-ins follow the Linux IPVS schedulers (`net/netfilter/ipvs/ip_vs_*.c`,
//! Maglev for `mh`) and kube-proxy's iptables cascade. A scheduler is built once per change of
//! a service's destinations ([`SchedulerFactory::build`]) and then picks by
//! index arithmetic, with no allocation ([`Scheduler::pick`]).
//!
//! Implement [`Scheduler`] and [`SchedulerFactory`] to plug in your own, and
//! pass it as [`SchedulerConfig::Custom`].

mod least_conn;
pub mod maglev;
mod numgen;
pub(crate) mod random;
mod round_robin;
mod source_hash;

use core::fmt;
use core::str::FromStr;
use core::sync::atomic::{AtomicU64, Ordering};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

pub use least_conn::{LeastConnection, WeightedLeastConnection};
pub use maglev::{DEFAULT_MAGLEV_TABLE_SIZE, MAGLEV_TABLE_SIZES, Maglev};
pub use numgen::{Numgen, NumgenFactory};
pub use random::{RandomCascade, iptables_probability, probability_threshold};
pub use round_robin::{RoundRobin, WeightedRoundRobin};
pub use source_hash::SourceHash;

use crate::error::ValidationError;
use crate::model::flow::Flow;
use crate::plan::BackendId;
use crate::rng::SeededRng;
use crate::time::Instant;

const COUNT_CHUNK_BITS: u32 = 12;
const COUNT_CHUNK: usize = 1 << COUNT_CHUNK_BITS;
const COUNT_CHUNKS: usize = 1 << (BackendId::SLOT_BITS - COUNT_CHUNK_BITS);
const COUNT_BITS: u32 = 26;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// Active and inactive connection counts per backend, as IPVS keeps them in
/// `ip_vs_dest` (active = TCP ESTABLISHED, inactive = every other state).
///
/// One atomic word per backend slot holds the backend's generation and its
/// two counts, in chunks allocated as slots are used (the table never
/// moves), so the connection tracker updates a count with one atomic
/// operation and least-connection schedulers read it without a lock. A
/// count change for a stale [`BackendId`] (a slot since reused) is ignored.
/// Counts survive every rebuild of a service, and a removed backend's
/// counts stay readable while it drains.
#[derive(Debug)]
pub struct ConnectionCounts {
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl Default for ConnectionCounts {
    fn default() -> Self {
        ConnectionCounts {
            chunks: (0..COUNT_CHUNKS).map(|_| OnceLock::new()).collect(),
        }
    }
}

impl ConnectionCounts {
    fn word(&self, id: BackendId) -> &AtomicU64 {
        let chunk = self.chunks[id.slot() >> COUNT_CHUNK_BITS]
            .get_or_init(|| (0..COUNT_CHUNK).map(|_| AtomicU64::new(0)).collect());
        &chunk[id.slot() & (COUNT_CHUNK - 1)]
    }

    /// `(active, inactive)` of `id`; `(0, 0)` for a stale id.
    #[inline]
    pub fn get(&self, id: BackendId) -> (u32, u32) {
        let Some(chunk) = self
            .chunks
            .get(id.slot() >> COUNT_CHUNK_BITS)
            .and_then(|c| c.get())
        else {
            return (0, 0);
        };
        let w = chunk[id.slot() & (COUNT_CHUNK - 1)].load(Ordering::Relaxed);
        if (w >> (2 * COUNT_BITS)) as u32 != id.generation() {
            return (0, 0);
        }
        (
            ((w >> COUNT_BITS) & COUNT_MASK) as u32,
            (w & COUNT_MASK) as u32,
        )
    }

    /// Bytes allocated for the counters.
    pub fn memory_bytes(&self) -> usize {
        self.chunks
            .iter()
            .filter_map(OnceLock::get)
            .map(|c| c.len() * size_of::<AtomicU64>())
            .sum::<usize>()
            + self.chunks.len() * size_of::<OnceLock<Box<[AtomicU64]>>>()
    }

    /// Active plus inactive connections of `id`.
    pub fn total(&self, id: BackendId) -> u32 {
        let (a, i) = self.get(id);
        a + i
    }

    /// IPVS's overhead of `id`: `(active << 8) + inactive`.
    #[inline]
    pub fn overhead(&self, id: BackendId) -> u64 {
        let (a, i) = self.get(id);
        (u64::from(a) << 8) + u64::from(i)
    }

    /// Adds `da` to the active and `di` to the inactive count of `id`
    /// (neither goes below zero). A change that only adds, for a newer
    /// generation of the slot, resets it to that generation (a new
    /// backend's first connection); a change that takes away, for another
    /// generation, is a stale connection's end and is ignored.
    pub(crate) fn add(&self, id: BackendId, da: i32, di: i32) {
        let generation = u64::from(id.generation());
        let _ = self
            .word(id)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                let (mut a, mut i) = if w >> (2 * COUNT_BITS) == generation {
                    ((w >> COUNT_BITS) & COUNT_MASK, w & COUNT_MASK)
                } else if da < 0 || di < 0 {
                    return None;
                } else {
                    (0, 0)
                };
                a = (a as i64 + i64::from(da)).clamp(0, COUNT_MASK as i64) as u64;
                i = (i as i64 + i64::from(di)).clamp(0, COUNT_MASK as i64) as u64;
                Some((generation << (2 * COUNT_BITS)) | (a << COUNT_BITS) | i)
            });
    }
}

/// One real server of a virtual service: its backend id, address and
/// weight, and (for schedulers that read them) the dataplane's connection
/// counts.
#[derive(Debug, Clone)]
pub struct Destination {
    id: BackendId,
    addr: SocketAddr,
    weight: u32,
    counts: Option<Arc<ConnectionCounts>>,
}

impl Destination {
    /// A standalone destination with no id and no counts (for tests and
    /// simulators; its overhead reads 0).
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        Destination {
            id: BackendId(u32::MAX),
            addr,
            weight,
            counts: None,
        }
    }
    /// A destination of backend `id` whose counts are read from `counts`.
    pub fn counted(
        id: BackendId,
        addr: SocketAddr,
        weight: u32,
        counts: Arc<ConnectionCounts>,
    ) -> Self {
        Destination {
            id,
            addr,
            weight,
            counts: Some(counts),
        }
    }
    /// A destination of backend `id` without counts.
    pub fn with_id(id: BackendId, addr: SocketAddr, weight: u32) -> Self {
        Destination {
            id,
            addr,
            weight,
            counts: None,
        }
    }
    /// The backend id.
    pub fn id(&self) -> BackendId {
        self.id
    }
    /// The backend address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The weight (0 = no new connections).
    pub fn weight(&self) -> u32 {
        self.weight
    }
    /// Established connections (0 without counts).
    pub fn active(&self) -> u32 {
        self.counts.as_ref().map_or(0, |c| c.get(self.id).0)
    }
    /// Connections in other states (0 without counts).
    pub fn inactive(&self) -> u32 {
        self.counts.as_ref().map_or(0, |c| c.get(self.id).1)
    }
    /// IPVS's overhead, `(active << 8) + inactive` (0 without counts).
    #[inline]
    pub fn overhead(&self) -> u64 {
        self.counts.as_ref().map_or(0, |c| c.overhead(self.id))
    }
}

/// What a scheduler may look at when it picks.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// The flow being scheduled.
    pub flow: &'a Flow,
    /// The caller's clock.
    pub now: Instant,
    /// The dataplane's seeded random source.
    pub rng: &'a SeededRng,
    /// The calling packet thread's own rotation at this frontend, when it
    /// picks through a per-thread reader ([`IpvsReader`]): `rr` and `wrr`
    /// then advance it instead of the scheduler's shared position, so that
    /// packet threads write no shared counter. `None`: the scheduler's one
    /// rotation, strictly global across threads.
    ///
    /// [`IpvsReader`]: crate::IpvsReader
    pub rotation: Option<&'a Rotation>,
}

impl<'a> PickContext<'a> {
    /// A context with the shared rotation.
    pub fn new(flow: &'a Flow, now: Instant, rng: &'a SeededRng) -> Self {
        PickContext {
            flow,
            now,
            rng,
            rotation: None,
        }
    }
}

/// One packet thread's position in one frontend's `rr` or `wrr` rotation
/// ([`PickContext::rotation`]). It remembers the destination picked last
/// (by address), so that it continues across endpoint changes as the
/// shared rotation does; a fresh one starts where the shared rotation is.
/// Not `Sync`: it belongs to one thread.
#[derive(Debug, Default)]
pub struct Rotation(core::cell::Cell<RotationState>);

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RotationState {
    /// The destination picked last (`None`: none yet).
    pub(crate) last: Option<core::net::SocketAddr>,
    /// Its index (rr: in the rotation; wrr: among the destinations).
    pub(crate) pos: u32,
    /// wrr's current weight.
    pub(crate) cw: u32,
}

impl Rotation {
    #[inline]
    pub(crate) fn get(&self) -> RotationState {
        self.0.get()
    }

    #[inline]
    pub(crate) fn set(&self, s: RotationState) {
        self.0.set(s);
    }
}

/// A built selector for one virtual service: picks the index of the
/// destination that takes a new connection.
pub trait Scheduler: Send + Sync + fmt::Debug {
    /// Picks among `dests` (the same slice the scheduler was built for).
    /// `None` means no destination is available (the flow is rejected).
    fn pick(&self, dests: &[Destination], ctx: &PickContext<'_>) -> Option<usize>;

    /// Whether the dataplane should count connections per destination for
    /// this scheduler (least-connection needs it).
    fn uses_connection_counts(&self) -> bool {
        false
    }
}

/// Builds a [`Scheduler`] from a service's destinations, at update time.
pub trait SchedulerFactory: Send + Sync + fmt::Debug {
    /// The scheduler's short name (as `ipvsadm` prints it).
    fn name(&self) -> &str;
    /// Builds a scheduler for these destinations.
    fn build(&self, dests: &[Destination]) -> Box<dyn Scheduler>;

    /// Builds the scheduler for a changed destination set from the
    /// previous one (`previous`, built for `old_dests`), so that its state
    /// survives the change, as IPVS's `update_service` hooks keep it. The
    /// default ignores the previous instance.
    fn rebuild(
        &self,
        dests: &[Destination],
        previous: &dyn Scheduler,
        old_dests: &[Destination],
    ) -> Box<dyn Scheduler> {
        let _ = (previous, old_dests);
        self.build(dests)
    }
}

/// The built-in schedulers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SchedulerKind {
    /// `random`: kube-proxy's iptables cascade, probabilities 1/n, 1/(n-1), ..., 1.
    Random,
    /// `rr`: round-robin (the IPVS and kube-proxy default).
    #[default]
    RoundRobin,
    /// `wrr`: IPVS weighted round-robin.
    WeightedRoundRobin,
    /// `lc`: least connection.
    LeastConnection,
    /// `wlc`: weighted least connection.
    WeightedLeastConnection,
    /// `sh`: source hashing on the client address.
    SourceHash,
    /// `sh` with the `sh-port` flag: source address and port.
    SourceHashPort,
    /// `mh`: Maglev consistent hashing on the client address (table size 4093).
    Maglev,
    /// `mh` with the `mh-port` flag: source address and port.
    MaglevPort,
}

impl SchedulerKind {
    /// Every built-in, for tests and listings (a slice: the list grows
    /// without changing the type).
    pub const ALL: &'static [SchedulerKind] = &[
        SchedulerKind::Random,
        SchedulerKind::RoundRobin,
        SchedulerKind::WeightedRoundRobin,
        SchedulerKind::LeastConnection,
        SchedulerKind::WeightedLeastConnection,
        SchedulerKind::SourceHash,
        SchedulerKind::SourceHashPort,
        SchedulerKind::Maglev,
        SchedulerKind::MaglevPort,
    ];

    /// The name as `ipvsadm` and the CLI spell it.
    pub const fn name(self) -> &'static str {
        match self {
            SchedulerKind::Random => "random",
            SchedulerKind::RoundRobin => "rr",
            SchedulerKind::WeightedRoundRobin => "wrr",
            SchedulerKind::LeastConnection => "lc",
            SchedulerKind::WeightedLeastConnection => "wlc",
            SchedulerKind::SourceHash => "sh",
            SchedulerKind::SourceHashPort => "sh-port",
            SchedulerKind::Maglev => "mh",
            SchedulerKind::MaglevPort => "mh-port",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SchedulerKind::ALL
            .iter()
            .copied()
            .find(|k| k.name() == s)
            .ok_or_else(|| ValidationError::Invalid {
                field: "scheduler".into(),
                value: s.into(),
                reason: "must be one of random, rr, wrr, lc, wlc, sh, sh-port, mh, mh-port",
            })
    }
}

/// Which scheduler a dataplane builds for its virtual services.
#[derive(Debug, Clone)]
pub enum SchedulerConfig {
    /// A built-in.
    Kind(SchedulerKind),
    /// Your own.
    Custom(Arc<dyn SchedulerFactory>),
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig::Kind(SchedulerKind::RoundRobin)
    }
}

impl From<SchedulerKind> for SchedulerConfig {
    fn from(kind: SchedulerKind) -> Self {
        SchedulerConfig::Kind(kind)
    }
}

impl SchedulerConfig {
    /// Whether the schedulers this builds may read connection counts:
    /// `lc` and `wlc`, and any custom scheduler (whose needs are known only
    /// once it is built).
    pub fn may_use_connection_counts(&self) -> bool {
        match self {
            SchedulerConfig::Kind(k) => matches!(
                k,
                SchedulerKind::LeastConnection | SchedulerKind::WeightedLeastConnection
            ),
            SchedulerConfig::Custom(_) => true,
        }
    }

    /// The scheduler's name.
    pub fn name(&self) -> &str {
        match self {
            SchedulerConfig::Kind(k) => k.name(),
            SchedulerConfig::Custom(f) => f.name(),
        }
    }

    /// Builds the selector for a changed set of destinations from the
    /// previous selector and its destinations: `rr` continues its rotation
    /// after the destination it picked last (`ip_vs_rr`), `wrr` keeps its
    /// current weight (`ip_vs_wrr_dest_changed`), a custom scheduler gets
    /// [`SchedulerFactory::rebuild`]. Stateless schedulers are built anew.
    pub fn rebuild(
        &self,
        dests: &[Destination],
        previous: Option<(&Selector, &[Destination])>,
    ) -> Selector {
        match (self, previous) {
            (
                SchedulerConfig::Kind(SchedulerKind::RoundRobin),
                Some((Selector::RoundRobin(old), od)),
            ) => Selector::RoundRobin(RoundRobin::continue_from(dests, old, od)),
            (
                SchedulerConfig::Kind(SchedulerKind::WeightedRoundRobin),
                Some((Selector::WeightedRoundRobin(old), od)),
            ) => Selector::WeightedRoundRobin(WeightedRoundRobin::continue_from(dests, old, od)),
            (SchedulerConfig::Custom(f), Some((Selector::Custom(old), od))) => {
                Selector::Custom(f.rebuild(dests, &**old, od))
            }
            _ => self.build(dests),
        }
    }

    /// Builds the selector for a set of destinations.
    pub fn build(&self, dests: &[Destination]) -> Selector {
        match self {
            SchedulerConfig::Kind(kind) => match kind {
                SchedulerKind::Random => Selector::Random(RandomCascade::new(dests)),
                SchedulerKind::RoundRobin => Selector::RoundRobin(RoundRobin::new(dests)),
                SchedulerKind::WeightedRoundRobin => {
                    Selector::WeightedRoundRobin(WeightedRoundRobin::new(dests))
                }
                SchedulerKind::LeastConnection => Selector::LeastConnection(LeastConnection),
                SchedulerKind::WeightedLeastConnection => {
                    Selector::WeightedLeastConnection(WeightedLeastConnection)
                }
                SchedulerKind::SourceHash => Selector::SourceHash(SourceHash::new(dests, false)),
                SchedulerKind::SourceHashPort => Selector::SourceHash(SourceHash::new(dests, true)),
                SchedulerKind::Maglev => {
                    Selector::Maglev(Maglev::new(dests, DEFAULT_MAGLEV_TABLE_SIZE, false))
                }
                SchedulerKind::MaglevPort => {
                    Selector::Maglev(Maglev::new(dests, DEFAULT_MAGLEV_TABLE_SIZE, true))
                }
            },
            SchedulerConfig::Custom(f) => Selector::Custom(f.build(dests)),
        }
    }
}

/// A built scheduler: the built-ins dispatched without a virtual call, or a
/// custom one.
#[derive(Debug)]
pub enum Selector {
    /// `random`.
    Random(RandomCascade),
    /// `rr`.
    RoundRobin(RoundRobin),
    /// `wrr`.
    WeightedRoundRobin(WeightedRoundRobin),
    /// `lc`.
    LeastConnection(LeastConnection),
    /// `wlc`.
    WeightedLeastConnection(WeightedLeastConnection),
    /// `sh` / `sh-port`.
    SourceHash(SourceHash),
    /// `mh` / `mh-port`.
    Maglev(Maglev),
    /// A caller's scheduler.
    Custom(Box<dyn Scheduler>),
}

impl Selector {
    /// Picks a destination index.
    #[inline]
    pub fn pick(&self, dests: &[Destination], ctx: &PickContext<'_>) -> Option<usize> {
        match self {
            Selector::Random(s) => s.pick(dests, ctx),
            Selector::RoundRobin(s) => s.pick(dests, ctx),
            Selector::WeightedRoundRobin(s) => s.pick(dests, ctx),
            Selector::LeastConnection(s) => s.pick(dests, ctx),
            Selector::WeightedLeastConnection(s) => s.pick(dests, ctx),
            Selector::SourceHash(s) => s.pick(dests, ctx),
            Selector::Maglev(s) => s.pick(dests, ctx),
            // A custom scheduler's out-of-range index rejects the flow
            // instead of indexing out of bounds.
            Selector::Custom(s) => s.pick(dests, ctx).filter(|&i| i < dests.len()),
        }
    }

    /// Picks a destination index that is not one of `exclude`'s backends
    /// (a retry after a failed connect to them). Without exclusions, or
    /// when [`pick`](Self::pick)'s choice is not excluded, that choice.
    /// Otherwise among the remaining destinations of weight > 0: `lc` and
    /// `wlc` the least loaded; `rr`, `wrr`, `sh` and `mh` the next one
    /// after the excluded pick, in destination order (IPVS's `sh-fallback`
    /// and `mh-fallback` walk on from the hashed slot; a rotation skips an
    /// unavailable server); `random` and custom schedulers one at random.
    /// `None` when every destination of weight > 0 is excluded. Allocates
    /// nothing.
    #[inline]
    pub(crate) fn pick_excluding(
        &self,
        dests: &[Destination],
        ctx: &PickContext<'_>,
        exclude: &[BackendId],
    ) -> Option<usize> {
        let first = self.pick(dests, ctx)?;
        if exclude.is_empty() || !exclude.contains(&dests[first].id()) {
            return Some(first);
        }
        let usable = |i: usize| dests[i].weight() > 0 && !exclude.contains(&dests[i].id());
        match self {
            Selector::LeastConnection(_) | Selector::WeightedLeastConnection(_) => {
                let mut best: Option<(usize, u64, u64)> = None;
                for i in (0..dests.len()).filter(|&i| usable(i)) {
                    let (oh, w) = (dests[i].overhead(), u64::from(dests[i].weight()));
                    let w = if matches!(self, Selector::LeastConnection(_)) {
                        1
                    } else {
                        w
                    };
                    if best.is_none_or(|(_, boh, bw)| {
                        u128::from(boh) * u128::from(w) > u128::from(oh) * u128::from(bw)
                    }) {
                        best = Some((i, oh, w));
                    }
                }
                best.map(|(i, _, _)| i)
            }
            Selector::Random(_) | Selector::Custom(_) => {
                nth_usable(dests.len(), usable, ctx.rng.next_u64())
            }
            _ => (1..dests.len())
                .map(|k| (first + k) % dests.len())
                .find(|&i| usable(i)),
        }
    }

    /// Whether connections must be counted for this selector.
    pub fn uses_connection_counts(&self) -> bool {
        match self {
            Selector::LeastConnection(_) | Selector::WeightedLeastConnection(_) => true,
            Selector::Custom(s) => s.uses_connection_counts(),
            _ => false,
        }
    }
}

/// The `draw % m`-th of the `m` indices below `n` that are `usable`, or
/// `None` if none is: a uniform pick among the remaining, allocation-free.
#[inline]
pub(crate) fn nth_usable(n: usize, usable: impl Fn(usize) -> bool, draw: u64) -> Option<usize> {
    let m = (0..n).filter(|&i| usable(i)).count();
    if m == 0 {
        return None;
    }
    let k = (draw % m as u64) as usize;
    (0..n).filter(|&i| usable(i)).nth(k)
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use crate::model::flow::Protocol;

    /// Destinations with ids 0.. sharing one count table.
    pub(crate) fn dests(weights: &[u32]) -> Vec<Destination> {
        let counts = Arc::new(ConnectionCounts::default());
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Destination::counted(
                    BackendId(i as u32),
                    SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                    *w,
                    Arc::clone(&counts),
                )
            })
            .collect()
    }

    /// Changes a test destination's counts.
    pub(crate) fn add(d: &Destination, active: i32, inactive: i32) {
        d.counts
            .as_ref()
            .expect("counted")
            .add(d.id, active, inactive);
    }

    pub(crate) fn flow(src: [u8; 4], port: u16) -> Flow {
        Flow::new(
            Protocol::Tcp,
            SocketAddr::from((src, port)),
            SocketAddr::from(([10, 96, 0, 1], 80)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_names() {
        for k in SchedulerKind::ALL.iter().copied() {
            assert_eq!(k.name().parse::<SchedulerKind>().unwrap(), k);
        }
        let err = "nq".parse::<SchedulerKind>().unwrap_err();
        assert!(err.to_string().contains("nq"));
    }

    #[test]
    fn pick_excluding_keeps_each_schedulers_choice_among_the_rest() {
        use test_util::{add, dests, flow};
        let d = dests(&[1, 1, 0, 1]);
        let rng = SeededRng::new(1);
        let f = flow([10, 1, 0, 9], 4000);
        let ctx = PickContext::new(&f, Instant::ZERO, &rng);
        for kind in SchedulerKind::ALL.iter().copied() {
            let s = SchedulerConfig::from(kind).build(&d);
            for _ in 0..20 {
                let first = s.pick(&d, &ctx).unwrap();
                let other = s.pick_excluding(&d, &ctx, &[d[first].id()]).unwrap();
                assert_ne!(other, first, "{kind:?}");
                assert_ne!(other, 2, "{kind:?}: weight 0 takes no connection");
                let ids = [d[0].id(), d[1].id(), d[3].id()];
                assert_eq!(s.pick_excluding(&d, &ctx, &ids), None, "{kind:?}");
            }
        }
        // lc: the least loaded of the others.
        add(&d[0], 5, 0);
        add(&d[1], 1, 0);
        add(&d[3], 2, 0);
        let lc = SchedulerConfig::from(SchedulerKind::LeastConnection).build(&d);
        assert_eq!(lc.pick(&d, &ctx), Some(1));
        assert_eq!(lc.pick_excluding(&d, &ctx, &[d[1].id()]), Some(3));
        // sh: the next one after the hashed pick, the same every time.
        let sh = SchedulerConfig::from(SchedulerKind::SourceHash).build(&d);
        let first = sh.pick(&d, &ctx).unwrap();
        let next = sh.pick_excluding(&d, &ctx, &[d[first].id()]);
        assert_eq!(sh.pick_excluding(&d, &ctx, &[d[first].id()]), next);
        assert_eq!(
            nth_usable(4, |i| i != 1, 4),
            Some(2),
            "the draw-th of the usable, modulo their count"
        );
    }

    #[test]
    fn counts_never_go_negative_and_ignore_stale_ids() {
        let c = ConnectionCounts::default();
        let id = BackendId(5);
        c.add(id, -1, 0);
        assert_eq!(c.get(id), (0, 0));
        c.add(id, 2, 0);
        c.add(id, -1, 3);
        assert_eq!(c.get(id), (1, 3));
        assert_eq!(c.overhead(id), 256 + 3);
        // The slot reused by a newer generation starts from zero, and the
        // old id no longer reads or changes it.
        let newer = BackendId(5 | (1 << BackendId::SLOT_BITS));
        assert_eq!(c.get(newer), (0, 0));
        c.add(newer, 1, 0);
        c.add(id, -1, 0);
        assert_eq!(
            c.get(newer),
            (1, 0),
            "a stale connection's end changes nothing"
        );
        assert_eq!(c.get(id), (0, 0));
    }
}
