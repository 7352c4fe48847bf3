//! The [`Dataplane`] trait, the one interface a caller's packet I/O talks
//! to, and its implementations.
//!
//! - [`IptablesDataplane`]: kube-proxy's iptables mode, a flat, ordered rule
//!   list walked in order; every change recompiles it.
//! - [`IpvsDataplane`]: kube-proxy's IPVS mode, a hash table of virtual
//!   services with a scheduler each; a change touches only its service.
//! - [`NftablesDataplane`]: kube-proxy's nftables mode, a verdict map found
//!   in O(1) and a uniform `numgen random mod N` pick.
//!
//! A dataplane is shared by reference among packet threads (`&self`,
//! `Send + Sync`). The control plane calls [`Dataplane::sync`] with the
//! [`ServiceTable`] and the [`ChangeSet`] an apply returned; readers never
//! wait for it longer than a pointer swap.

mod iptables;
mod ipvs;
mod nftables;

use std::net::SocketAddr;

pub use iptables::IptablesDataplane;
pub use ipvs::{IpvsDataplane, IpvsReader, RealServerInfo, VirtualServiceInfo};
pub use nftables::NftablesDataplane;

use crate::affinity::{AffinityConfig, AffinityEntry, AffinityReport};
use crate::model::flow::{Flow, Protocol, Verdict};
use crate::model::service::ServiceKey;
use crate::scheduler::SchedulerConfig;
use crate::table::{ChangeSet, ServiceTable};
use crate::time::Instant;
use crate::topology::NodeTopology;

/// What a dataplane would do with new connections to one destination: the
/// inspection behind [`Dataplane::candidates`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Candidates {
    /// Not a service VIP.
    NotAService,
    /// The service rejects (no usable endpoints).
    Reject,
    /// The service drops (Local policy, no local endpoint).
    Drop,
    /// New connections go to one of these backends, in rule order.
    Endpoints(Vec<SocketAddr>),
}

/// Settings every dataplane takes.
#[derive(Debug, Clone, Default)]
pub struct DataplaneConfig {
    /// This node's name and zone, for Local policies and topology hints.
    pub node: NodeTopology,
    /// The seed of the dataplane's random source; a fixed seed replays a
    /// single-threaded run exactly.
    pub seed: u64,
    /// The scheduler (IPVS mode; iptables mode always uses its cascade).
    pub scheduler: SchedulerConfig,
    /// Count active connections per backend even when the scheduler does not
    /// need them (for `ipvsadm`-style listings). Least-connection schedulers
    /// always count.
    pub count_connections: bool,
    /// Sizing of the session-affinity table and hotspot thresholds.
    pub affinity: AffinityConfig,
}

impl DataplaneConfig {
    /// A config with this seed and the defaults otherwise.
    pub fn with_seed(seed: u64) -> Self {
        DataplaneConfig {
            seed,
            ..Default::default()
        }
    }

    /// Sets the node topology.
    pub fn node(mut self, node: NodeTopology) -> Self {
        self.node = node;
        self
    }

    /// Sets the scheduler.
    pub fn scheduler(mut self, scheduler: impl Into<SchedulerConfig>) -> Self {
        self.scheduler = scheduler.into();
        self
    }

    /// Sets the session-affinity table's capacity and hotspot thresholds.
    pub fn affinity(mut self, affinity: AffinityConfig) -> Self {
        self.affinity = affinity;
        self
    }
}

/// A Service dataplane: given a flow and the time, a verdict.
///
/// # Examples
/// ```
/// use svclb::*;
/// let mut table = ServiceTable::new();
/// let svc = Service::builder("default", "web")
///     .cluster_ip("10.96.0.10".parse().unwrap())
///     .port(ServicePortSpec::tcp(80).target_port(8080))
///     .build().unwrap();
/// let slice = EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
///     .port(SlicePortSpec::tcp(8080))
///     .endpoint(EndpointSpec::new("10.0.0.2"))
///     .build().unwrap();
/// let changes = table.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)]).unwrap();
/// let dp = IpvsDataplane::new(DataplaneConfig::with_seed(1));
/// dp.sync(&table, &changes);
/// let flow = Flow::tcp("10.1.0.9:40000".parse().unwrap(), "10.96.0.10:80".parse().unwrap());
/// assert_eq!(dp.route(&flow, Instant::ZERO), Verdict::Forward("10.0.0.2:8080".parse().unwrap()));
/// ```
pub trait Dataplane: Send + Sync {
    /// `iptables`, `ipvs`, ...
    fn mode(&self) -> &'static str;

    /// Brings the dataplane up to date with `table`, given what changed.
    /// Pass [`ServiceTable::full_change_set`] for a full resync.
    fn sync(&self, table: &ServiceTable, changes: &ChangeSet);

    /// Decides a new flow (or a packet of one): forward, reject, drop, or
    /// pass through.
    ///
    /// For a service with `ClientIP` session affinity every call counts as
    /// a new connection: it restarts the client's affinity timer (only a
    /// connection's first packet reaches kube-proxy's nat rules; map later
    /// packets with your own connection tracking). Equivalent to
    /// [`route_with_key`](Self::route_with_key) without a key.
    fn route(&self, flow: &Flow, now: Instant) -> Verdict;

    /// [`route`](Self::route) with a caller-supplied affinity key, such as a
    /// hash of a session cookie or header. Services whose
    /// [`AffinityKeyKind`](crate::AffinityKeyKind) is `Caller` pin this key
    /// instead of the client address (and fall back to the client address
    /// when `key` is `None`); other services ignore it.
    ///
    /// The default ignores the key; the built-in dataplanes honour it.
    fn route_with_key(&self, flow: &Flow, key: Option<u64>, now: Instant) -> Verdict {
        let _ = key;
        self.route(flow, now)
    }

    /// Reports that a connection `route` forwarded to `backend` has ended.
    fn connection_closed(&self, flow: &Flow, backend: SocketAddr, now: Instant);

    /// The backends that may take a new connection to `dst`, or the verdict
    /// for all of them. For inspection and tests; it allocates.
    fn candidates(&self, protocol: Protocol, dst: SocketAddr) -> Candidates;

    /// The live session-affinity entries of `service` (key, endpoint, time
    /// left), per service port, as `ipvsadm -ln --persistent-conn` lists
    /// them. Empty for services without `ClientIP` affinity, and by default
    /// for dataplanes that keep no affinity state. Allocates; for
    /// inspection.
    fn affinity_entries(&self, service: &ServiceKey, now: Instant) -> Vec<AffinityEntry> {
        let _ = (service, now);
        Vec::new()
    }

    /// New connections and live affinity entries per endpoint of `service`,
    /// and the affinity keys with a disproportionate share of its new
    /// connections (see [`AffinityReport`]). `None` for services without
    /// `ClientIP` affinity, and by default. Allocates; for inspection.
    fn affinity_report(&self, service: &ServiceKey, now: Instant) -> Option<AffinityReport> {
        let _ = (service, now);
        None
    }
}
