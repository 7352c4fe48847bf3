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
use core::sync::atomic::{AtomicU32, Ordering};
use std::net::SocketAddr;
use std::sync::Arc;

pub use least_conn::{LeastConnection, WeightedLeastConnection};
pub use maglev::{DEFAULT_MAGLEV_TABLE_SIZE, MAGLEV_TABLE_SIZES, Maglev};
pub use numgen::{Numgen, NumgenFactory};
pub use random::{RandomCascade, iptables_probability, probability_threshold};
pub use round_robin::{RoundRobin, WeightedRoundRobin};
pub use source_hash::SourceHash;

use crate::error::ValidationError;
use crate::model::flow::Flow;
use crate::rng::SeededRng;
use crate::time::Instant;

/// Live connection counters of one destination, shared across rebuilds of
/// its service (like IPVS's `ip_vs_dest`).
#[derive(Debug, Default)]
pub struct ConnCounters {
    active: AtomicU32,
    inactive: AtomicU32,
}

impl ConnCounters {
    /// Established connections.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
    /// Connections in other states (IPVS counts TIME_WAIT, FIN_WAIT, ...).
    pub fn inactive(&self) -> u32 {
        self.inactive.load(Ordering::Relaxed)
    }
    /// IPVS's overhead: `(active << 8) + inactive`.
    pub fn overhead(&self) -> u64 {
        (u64::from(self.active()) << 8) + u64::from(self.inactive())
    }
    /// Counts a new connection.
    pub fn connect(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }
    /// Counts a connection's end (never below zero).
    pub fn close(&self) {
        let _ = self
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }
    /// Sets the inactive count (a caller that tracks TCP states reports it).
    pub fn set_inactive(&self, n: u32) {
        self.inactive.store(n, Ordering::Relaxed);
    }
}

/// One real server of a virtual service.
///
/// Its connection counters are shared across rebuilds of the service (IPVS
/// keeps an `ip_vs_dest` while the real server stays). A destination made
/// with [`uncounted`](Self::uncounted) has none: the IPVS dataplane builds
/// such destinations when nothing reads the counts (a scheduler other than
/// `lc`/`wlc` and [`count_connections`](crate::DataplaneConfig::count_connections)
/// off), which makes a rebuild cheaper by one shared allocation per
/// destination.
#[derive(Debug, Clone)]
pub struct Destination {
    addr: SocketAddr,
    weight: u32,
    conns: Option<Arc<ConnCounters>>,
}

impl Destination {
    /// A destination with fresh counters.
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        Self::with_counters(addr, weight, Arc::default())
    }
    /// A destination that shares existing counters.
    pub fn with_counters(addr: SocketAddr, weight: u32, conns: Arc<ConnCounters>) -> Self {
        Destination {
            addr,
            weight,
            conns: Some(conns),
        }
    }
    /// A destination with no connection counters: [`active`](Self::active),
    /// [`inactive`](Self::inactive) and [`overhead`](Self::overhead) read 0.
    pub fn uncounted(addr: SocketAddr, weight: u32) -> Self {
        Destination {
            addr,
            weight,
            conns: None,
        }
    }
    /// The backend address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The weight (0 = no new connections).
    pub fn weight(&self) -> u32 {
        self.weight
    }
    /// The connection counters, unless the destination is
    /// [`uncounted`](Self::uncounted).
    pub fn conns(&self) -> Option<&Arc<ConnCounters>> {
        self.conns.as_ref()
    }
    /// Established connections (0 when uncounted).
    pub fn active(&self) -> u32 {
        self.conns.as_ref().map_or(0, |c| c.active())
    }
    /// Connections in other states (0 when uncounted).
    pub fn inactive(&self) -> u32 {
        self.conns.as_ref().map_or(0, |c| c.inactive())
    }
    /// IPVS's overhead, `(active << 8) + inactive` (0 when uncounted).
    pub fn overhead(&self) -> u64 {
        self.conns.as_ref().map_or(0, |c| c.overhead())
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
    /// Every built-in, for tests and listings.
    pub const ALL: [SchedulerKind; 9] = [
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
            .into_iter()
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
            Selector::Custom(s) => s.pick(dests, ctx),
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

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use crate::model::flow::Protocol;

    pub(crate) fn dests(weights: &[u32]) -> Vec<Destination> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Destination::new(SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)), *w))
            .collect()
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
        for k in SchedulerKind::ALL {
            assert_eq!(k.name().parse::<SchedulerKind>().unwrap(), k);
        }
        let err = "nq".parse::<SchedulerKind>().unwrap_err();
        assert!(err.to_string().contains("nq"));
    }

    #[test]
    fn counters_never_go_negative() {
        let c = ConnCounters::default();
        c.close();
        assert_eq!(c.active(), 0);
        c.connect();
        c.connect();
        c.close();
        assert_eq!(c.active(), 1);
        c.set_inactive(3);
        assert_eq!(c.overhead(), 256 + 3);
    }
}
