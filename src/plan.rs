//! The one compile step: the [`ServiceTable`] turned into frontends and
//! backends with stable identities, and the diff of every change.
//!
//! A *frontend* is one (VIP, protocol, port) a dataplane answers, of one
//! [`FrontendKind`]: a cluster IP of a service port (under the internal
//! traffic policy), or an external destination under the external traffic
//! policy: a node IP at the port's `nodePort` (the node's addresses are
//! [`NodeAddresses`], kube-proxy's `--nodeport-addresses` applied), an
//! `externalIPs` address, or a load-balancer ingress IP of `ipMode: VIP`
//! (`Proxy` ones are not captured, as in kube-proxy). Its [`Outcome`] is
//! what it does with a new connection (forward to its backends, reject, or
//! drop), decided by [`topology`](crate::topology) for this node: a service
//! with no usable endpoint rejects everywhere; an external Local frontend
//! with no local endpoint drops. What depends on the packet's source
//! (source ranges, the short-circuit of this node's pods and of the node
//! itself to the Cluster-policy endpoints, masquerading) is the
//! dataplanes' shared connection layer's, from
//! [`Frontend::external_local`], [`Frontend::cluster_backends`] and the
//! service. A *backend* is one
//! `IP:port` of a service for one protocol.
//!
//! Identities are stable: a frontend keeps its [`FrontendId`] while the same
//! key belongs to the same service, and a backend keeps its [`BackendId`]
//! while the same `IP:port` (and protocol) stays in the service, across any
//! number of changes. A backend carries its [`BackendState`]:
//!
//! - **active**: it takes new connections on at least one frontend;
//! - **draining**: it takes none, but its tracked connections go on: a
//!   serving-and-terminating endpoint that is not selected, or (TCP only) a
//!   backend removed from the service while it still has connections, kept
//!   until its last connection ends or its grace period passes (IPVS's
//!   weight 0, kube-proxy's graceful termination);
//! - **gone**: its id is free. A packet of a connection whose backend is
//!   gone expires that connection (`expire_nodest_conn`).
//!
//! The [`Planner`] keeps the plan up to date from each
//! [`ChangeSet`], recompiling only the services that
//! changed, and reports a [`PlanDiff`]. Every dataplane, every renderer and
//! the eBPF map writer read the plan and its diffs; none re-derives them
//! from the table.
//!
//! Readers on the packet path check a backend's state without a lock
//! through [`BackendStates`], a table of atomic words indexed by id that
//! the planner writes as states change.
//!
//! # Examples
//! ```
//! use svclb::*;
//! use svclb::plan::{Outcome, Planner};
//!
//! let mut table = ServiceTable::new();
//! let web = Service::builder("default", "web")
//!     .cluster_ip("10.96.0.10".parse().unwrap())
//!     .port(ServicePortSpec::tcp(80).target_port(8080))
//!     .build()?;
//! let slice = |ips: &[&str]| EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
//!     .port(SlicePortSpec::tcp(8080))
//!     .endpoints(ips.iter().map(|ip| EndpointSpec::new(*ip)))
//!     .build();
//! let cs = table.apply_batch([Change::UpsertService(web), Change::UpsertSlice(slice(&["10.1.0.1", "10.1.0.2"])?)])?;
//! let mut planner = Planner::new(NodeTopology::default());
//! planner.update(&table, &cs, Instant::ZERO, |_| false);
//! let fe = planner.frontend_by_key(&"10.96.0.10:80".parse()?, Protocol::Tcp).unwrap();
//! assert_eq!(fe.outcome(), Outcome::Forward);
//! let first = fe.backends()[0].id();
//!
//! // Another endpoint arrives: the first keeps its id.
//! let cs = table.apply(Change::UpsertSlice(slice(&["10.1.0.0", "10.1.0.1", "10.1.0.2"])?))?;
//! let diff = planner.update(&table, &cs, Instant::ZERO, |_| false);
//! assert_eq!(diff.changed.len(), 1);
//! let fe = planner.frontend_by_key(&"10.96.0.10:80".parse()?, Protocol::Tcp).unwrap();
//! assert_eq!(fe.backends()[1].id(), first);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt;
use core::hash::{Hash, Hasher};
use core::sync::atomic::{AtomicU32, Ordering};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ahash::AHashMap;
use smallvec::SmallVec;

use crate::model::flow::Protocol;
use crate::model::service::{Service, ServiceKey, ServicePort, TrafficPolicy};
use crate::table::{ChangeSet, EndpointInfo, ServiceTable, ServiceView};
use crate::time::Instant;
use crate::topology::{NodeTopology, SelectionRef, categorize_port};

/// The identity of a frontend (one VIP, protocol and port of a service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendId(pub u32);

/// The identity of a backend (one `IP:port` and protocol of a service).
///
/// The low [`BackendId::SLOT_BITS`] bits index the backend's slot; the
/// high bits are a generation, bumped each time the slot is reused, so a
/// stale id never names a newer backend (until the generation wraps, after
/// 4096 reuses of one slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendId(pub u32);

impl BackendId {
    /// Bits of the slot index: at most 2^20 live backends per dataplane.
    pub const SLOT_BITS: u32 = 20;
    const SLOT_MASK: u32 = (1 << Self::SLOT_BITS) - 1;

    /// The slot index (dense, reused once the backend is gone).
    pub const fn slot(self) -> usize {
        (self.0 & Self::SLOT_MASK) as usize
    }

    /// The slot's generation.
    pub const fn generation(self) -> u32 {
        self.0 >> Self::SLOT_BITS
    }

    const fn new(slot: u32, generation: u32) -> Self {
        BackendId((generation << Self::SLOT_BITS) | (slot & Self::SLOT_MASK))
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for FrontendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A frontend's key: the virtual address, port and protocol a packet is
/// matched on. The one key type for a virtual service everywhere in svclb
/// (IPVS's virtual-service key, nftables' `daddr . l4proto . dport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FrontendKey {
    /// The virtual IP.
    pub addr: IpAddr,
    /// The virtual port.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

impl FrontendKey {
    /// The key of a destination address and protocol.
    pub const fn new(protocol: Protocol, dst: SocketAddr) -> Self {
        FrontendKey {
            addr: dst.ip(),
            port: dst.port(),
            protocol,
        }
    }

    /// The virtual `IP:port`.
    pub const fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

impl Hash for FrontendKey {
    /// One word for an IPv4 key (address, port and protocol packed), so the
    /// hasher runs one round instead of one per field and enum tag. Equal
    /// keys hash equally; an IPv4 and an IPv6 key never compare equal.
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        let tail = (u64::from(self.port) << 8) | self.protocol as u64;
        match self.addr {
            IpAddr::V4(v4) => state.write_u64((u64::from(u32::from(v4)) << 24) | tail),
            IpAddr::V6(v6) => {
                state.write_u128(u128::from(v6));
                state.write_u64(tail);
            }
        }
    }
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.protocol.as_lower_str(), self.socket_addr())
    }
}

/// What a frontend does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// Forward to one of its backends.
    Forward,
    /// No usable endpoint anywhere: reject (iptables `REJECT`, "has no
    /// endpoints").
    Reject,
    /// A Local policy with no local endpoint: drop (iptables `DROP`, "has no
    /// local endpoints").
    Drop,
}

/// How traffic reaches a frontend: kube-proxy's kinds of service
/// destination. The cluster IP follows the internal traffic policy; the
/// others are *external* destinations and follow the external one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum FrontendKind {
    /// A cluster IP (`spec.clusterIPs`) and service port.
    ClusterIp,
    /// A node address and `nodePort`.
    NodePort,
    /// An `spec.externalIPs` address and service port.
    ExternalIp,
    /// A load-balancer ingress IP (`ipMode: VIP`) and service port.
    LoadBalancer,
}

impl FrontendKind {
    /// `cluster-ip`, `node-port`, `external-ip`, `load-balancer`.
    pub const fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "cluster-ip",
            FrontendKind::NodePort => "node-port",
            FrontendKind::ExternalIp => "external-ip",
            FrontendKind::LoadBalancer => "load-balancer",
        }
    }

    /// Whether it is an external destination (everything but the cluster
    /// IP).
    pub const fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The node addresses node ports answer on: kube-proxy's `--nodeport-addresses`
/// applied to the node's IPs.
///
/// # Examples
/// ```
/// use svclb::plan::NodeAddresses;
/// let n = NodeAddresses::new(
///     vec!["192.168.0.2".parse().unwrap(), "10.1.0.2".parse().unwrap()],
///     vec!["192.168.0.0/16".parse().unwrap()],
/// );
/// assert_eq!(n.node_port_ips().collect::<Vec<_>>(), ["192.168.0.2".parse::<std::net::IpAddr>().unwrap()]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    /// The node's IPs (`--node-ip`).
    pub node_ips: Vec<IpAddr>,
    /// `--nodeport-addresses`: node ports answer on the node IPs inside
    /// these prefixes; empty means on every node IP. Applied per family,
    /// as kube-proxy's `NewNodePortAddresses` does: a family with no prefix
    /// here answers on every node IP of that family.
    pub nodeport_addresses: Vec<crate::render::Cidr>,
    /// Node ports never answer on loopback addresses: kube-proxy's IPVS
    /// mode (`isValidForSet` leaves loopback out of the node addresses) and
    /// nftables mode ("localhost NodePorts are not supported"). Off (the
    /// iptables mode, where `--iptables-localhost-nodeports` and
    /// `route_localnet` open them): a loopback node IP answers like any
    /// other.
    pub exclude_loopback: bool,
    /// Node ports never answer on IPv6 link-local addresses (`fe80::/10`)
    /// when the IPv6 node ports answer on every node IP (no IPv6 prefix in
    /// [`nodeport_addresses`](Self::nodeport_addresses), or `::/0`):
    /// kube-proxy's IPVS mode, whose node addresses are then
    /// `GetAllLocalAddressesExcept("kube-ipvs0")` filtered by
    /// `isValidForSet`, which leaves IPv6 link-local out (kubernetes
    /// `pkg/proxy/ipvs/netlink_linux.go`). With IPv6 prefixes given,
    /// kube-proxy takes the node IPs inside them (`GetNodeIPs`), link-local
    /// ones included. Off (the iptables and nftables modes, which match
    /// `--dst-type LOCAL` / `fib daddr type local`): they answer like any
    /// other.
    pub exclude_link_local: bool,
}

impl NodeAddresses {
    /// From the node's IPs and `--nodeport-addresses`.
    pub fn new(node_ips: Vec<IpAddr>, nodeport_addresses: Vec<crate::render::Cidr>) -> Self {
        NodeAddresses {
            node_ips,
            nodeport_addresses,
            exclude_loopback: false,
            exclude_link_local: false,
        }
    }

    /// The node IPs node ports answer on, in the order given, each once.
    pub fn node_port_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.node_ips.iter().enumerate().filter_map(|(i, ip)| {
            let first = !self.node_ips[..i].contains(ip);
            // kube-proxy's NewNodePortAddresses, per family: no prefix of
            // the family, or a zero-length one, matches every node IP.
            let (mut any, mut zero, mut inside) = (false, false, false);
            for c in self
                .nodeport_addresses
                .iter()
                .filter(|c| c.addr().is_ipv4() == ip.is_ipv4())
            {
                any = true;
                zero |= c.prefix_len() == 0;
                inside |= c.contains(*ip);
            }
            let wanted = !any || inside;
            let loopback = self.exclude_loopback && ip.is_loopback();
            let link_local = self.exclude_link_local
                && (!any || zero)
                && matches!(ip, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
            (first && wanted && !loopback && !link_local).then_some(*ip)
        })
    }

    /// Whether `ip` is one of the node's own addresses (iptables'
    /// `--src-type LOCAL`).
    pub fn is_local(&self, ip: IpAddr) -> bool {
        self.node_ips.contains(&ip)
    }
}

/// A backend's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendState {
    /// Takes new connections.
    Active,
    /// Takes no new connections; its tracked connections go on.
    Draining,
    /// Removed: its id is free, its connections expire on their next
    /// packet.
    Gone,
}

impl BackendState {
    const fn code(self) -> u32 {
        match self {
            BackendState::Gone => 0,
            BackendState::Active => 1,
            BackendState::Draining => 2,
        }
    }

    const fn from_code(c: u32) -> Self {
        match c {
            1 => BackendState::Active,
            2 => BackendState::Draining,
            _ => BackendState::Gone,
        }
    }

    /// `active`, `draining`, `gone`.
    pub const fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Gone => "gone",
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------
// Published backend states.

const CHUNK_BITS: u32 = 12;
const CHUNK: usize = 1 << CHUNK_BITS;
const CHUNKS: usize = 1 << (BackendId::SLOT_BITS - CHUNK_BITS);

/// Backend states by id, readable without a lock from any thread: one
/// atomic word per slot (generation and state), in chunks allocated as the
/// slot count grows, so that it never moves. Only the planner writes it.
#[derive(Debug)]
pub struct BackendStates {
    chunks: Box<[OnceLock<Box<[AtomicU32]>>]>,
}

impl Default for BackendStates {
    fn default() -> Self {
        BackendStates {
            chunks: (0..CHUNKS).map(|_| OnceLock::new()).collect(),
        }
    }
}

impl BackendStates {
    #[inline]
    fn word(&self, slot: usize) -> Option<&AtomicU32> {
        self.chunks
            .get(slot >> CHUNK_BITS)?
            .get()
            .map(|c| &c[slot & (CHUNK - 1)])
    }

    fn set(&self, id: BackendId, state: BackendState) {
        let chunk = self.chunks[id.slot() >> CHUNK_BITS]
            .get_or_init(|| (0..CHUNK).map(|_| AtomicU32::new(0)).collect());
        chunk[id.slot() & (CHUNK - 1)]
            .store((id.generation() << 2) | state.code(), Ordering::Release);
    }

    /// The state of `id`: [`BackendState::Gone`] if its slot holds another
    /// generation or nothing.
    #[inline]
    pub fn state(&self, id: BackendId) -> BackendState {
        match self.word(id.slot()) {
            None => BackendState::Gone,
            Some(w) => {
                let w = w.load(Ordering::Acquire);
                if w >> 2 == id.generation() {
                    BackendState::from_code(w & 3)
                } else {
                    BackendState::Gone
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The plan.

/// One backend of a frontend, as the plan lists it.
#[derive(Debug, Clone)]
pub struct PlanBackend {
    id: BackendId,
    endpoint: Arc<EndpointInfo>,
}

impl PlanBackend {
    /// Its id.
    pub fn id(&self) -> BackendId {
        self.id
    }
    /// Its `IP:port`.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr()
    }
    /// Its weight (0: no new connections; an svclb extension that IPVS
    /// honours).
    pub fn weight(&self) -> u32 {
        u32::from(self.endpoint.weight())
    }
    /// The merged endpoint it comes from.
    pub fn endpoint(&self) -> &Arc<EndpointInfo> {
        &self.endpoint
    }
}

/// One frontend: a (VIP, protocol, port) of a service and what it does.
#[derive(Debug, Clone)]
pub struct Frontend {
    id: FrontendId,
    key: FrontendKey,
    kind: FrontendKind,
    service: Arc<Service>,
    port_index: usize,
    name: String,
    outcome: Outcome,
    backends: Vec<PlanBackend>,
    draining: Vec<PlanBackend>,
    cluster_backends: Vec<PlanBackend>,
}

impl Frontend {
    /// Its id.
    pub fn id(&self) -> FrontendId {
        self.id
    }
    /// Its key.
    pub fn key(&self) -> FrontendKey {
        self.key
    }
    /// How traffic reaches it.
    pub fn kind(&self) -> FrontendKind {
        self.kind
    }
    /// The traffic policy that chose its backends: the internal one for a
    /// cluster IP, the external one for the other kinds.
    pub fn policy(&self) -> TrafficPolicy {
        if self.kind.is_external() {
            self.service.external_traffic_policy()
        } else {
            self.service.internal_traffic_policy()
        }
    }
    /// Whether it is an external destination under
    /// `externalTrafficPolicy: Local` (kube-proxy's `ExternalPolicyLocal`):
    /// traffic from outside keeps its source and goes to local endpoints
    /// only, while traffic from this node's pods and from the node itself
    /// is short-circuited to the Cluster-policy endpoints.
    pub fn external_local(&self) -> bool {
        self.kind.is_external() && self.service.external_traffic_policy() == TrafficPolicy::Local
    }
    /// For an [`external_local`](Self::external_local) frontend: the
    /// endpoints of the Cluster policy (kube-proxy's `KUBE-SVC-` chain),
    /// where short-circuited traffic goes. The same for the cluster IP of
    /// a service that accepts external traffic under
    /// `internalTrafficPolicy: Local` (kube-proxy's `UsesClusterEndpoints`;
    /// only [`ipvs_backends`](Self::ipvs_backends) reads them there).
    /// Empty otherwise.
    pub fn cluster_backends(&self) -> &[PlanBackend] {
        &self.cluster_backends
    }

    /// Every backend a connection of this frontend can be with, so every
    /// one a reply can come from: its backends, the draining ones and the
    /// Cluster-policy ones (a connection short-circuited, or in the IPVS
    /// mode sent by a Local frontend without a local endpoint, to one of
    /// them is this frontend's). An address can appear more than once.
    /// The dataplanes' reply index is built from this.
    pub(crate) fn reply_backends(&self) -> impl Iterator<Item = &PlanBackend> {
        self.backends
            .iter()
            .chain(&self.draining)
            .chain(&self.cluster_backends)
    }
    /// The outcome and real servers kube-proxy's IPVS mode gives this
    /// frontend's virtual server (`syncEndpoint` in kubernetes
    /// `pkg/proxy/ipvs/proxier.go`): its own [`outcome`](Self::outcome)
    /// and [`backends`](Self::backends), except that a frontend under a
    /// Local policy with no local endpoint lists the Cluster-policy
    /// endpoints instead ("Allow access from local PODs even if no local
    /// endpoints exist", kubernetes PR 97081), when kube-proxy computes
    /// them (`CategorizeEndpoints` under `UsesClusterEndpoints`: the
    /// service accepts external traffic, see
    /// [`cluster_backends`](Self::cluster_backends)) and there are any.
    pub fn ipvs_backends(&self) -> (Outcome, &[PlanBackend]) {
        if self.outcome == Outcome::Drop && self.local_policy() && !self.cluster_backends.is_empty()
        {
            return (Outcome::Forward, &self.cluster_backends);
        }
        (self.outcome, &self.backends)
    }
    /// The service it belongs to.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }
    /// The service port.
    pub fn port(&self) -> &ServicePort {
        &self.service.ports()[self.port_index]
    }
    /// The index of the port in the service's ports.
    pub fn port_index(&self) -> usize {
        self.port_index
    }
    /// kube-proxy's `ServicePortName`: `ns/name:port`, or `ns/name` when
    /// the port has no name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// What it does with a new connection.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }
    /// The backends that may take new connections, in merged endpoint
    /// order, weight-0 ones included (IPVS lists them at weight 0). Empty
    /// unless the outcome is [`Outcome::Forward`].
    pub fn backends(&self) -> &[PlanBackend] {
        &self.backends
    }
    /// The backends that take no new connections but keep their tracked
    /// ones (state [`BackendState::Draining`]).
    pub fn draining(&self) -> &[PlanBackend] {
        &self.draining
    }
    /// The backends the rule-based modes (iptables, nftables) write rules
    /// for: those of weight above 0. Empty means reject.
    pub fn rule_backends(&self) -> impl Iterator<Item = &PlanBackend> {
        self.backends.iter().filter(|b| b.weight() > 0)
    }
    /// The outcome in the rule-based modes: a frontend whose backends all
    /// have weight 0 rejects there.
    pub fn rule_outcome(&self) -> Outcome {
        match self.outcome {
            Outcome::Forward if self.rule_backends().next().is_none() => Outcome::Reject,
            o => o,
        }
    }
    /// Whether the policy that applies to it ([`policy`](Self::policy)) is
    /// Local.
    pub fn local_policy(&self) -> bool {
        self.policy() == TrafficPolicy::Local
    }
    /// The backend with this id among the active and draining ones.
    pub fn backend(&self, id: BackendId) -> Option<&PlanBackend> {
        self.backends
            .iter()
            .chain(&self.draining)
            .find(|b| b.id == id)
    }
}

/// What one [`Planner::update`] (or [`Planner::handle_timeout`]) changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanDiff {
    /// Whether this was a full recompile (the first sync, or a resync).
    pub full: bool,
    /// Whether the change set's generation did not follow the previous
    /// one's, so that the plan resynced in full (`full` is set too).
    pub gap: bool,
    /// New frontends.
    pub added: Vec<FrontendId>,
    /// Frontends whose outcome or backends changed.
    pub changed: Vec<FrontendId>,
    /// Frontends gone, with the key they had.
    pub removed: Vec<(FrontendId, FrontendKey)>,
    /// Backend state changes, in order.
    pub backends: Vec<(BackendId, BackendState)>,
}

impl PlanDiff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && self.backends.is_empty()
    }
}

/// Per-backend bookkeeping in the planner.
#[derive(Debug, Clone)]
struct BackendSlot {
    generation: u32,
    live: Option<LiveBackend>,
}

#[derive(Debug, Clone)]
struct LiveBackend {
    /// Its service (shared with the service's [`ServiceBackends`]: a new
    /// backend allocates no copy of the key).
    service: Arc<ServiceKey>,
    protocol: Protocol,
    addr: SocketAddr,
    state: BackendState,
    /// For a removed backend kept while it drains: when it goes anyway.
    deadline: Option<Instant>,
    endpoint: Arc<EndpointInfo>,
}

/// The backends of one service: id by (protocol, `IP:port`).
#[derive(Debug, Clone)]
struct ServiceBackends {
    /// The service.
    key: Arc<ServiceKey>,
    ids: AHashMap<(Protocol, SocketAddr), BackendId>,
}

/// Default grace period of a removed TCP backend that still has
/// connections: IPVS's ESTABLISHED timeout, after which an idle connection
/// would have expired anyway.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(900);

/// Keeps the plan up to date; see the module docs.
#[derive(Debug)]
pub struct Planner {
    node: NodeTopology,
    grace: Duration,
    frontends: Vec<Option<Arc<Frontend>>>,
    free_frontends: Vec<u32>,
    by_key: AHashMap<FrontendKey, FrontendId>,
    by_service: BTreeMap<ServiceKey, SmallVec<[FrontendId; 2]>>,
    slots: Vec<BackendSlot>,
    free_slots: Vec<u32>,
    service_backends: AHashMap<ServiceKey, ServiceBackends>,
    /// Removed backends kept while they drain.
    retired: Vec<BackendId>,
    states: Arc<BackendStates>,
    synced: bool,
    addresses: NodeAddresses,
    /// The generation of the last change set applied.
    generation: Option<u64>,
    /// Change sets whose generation did not follow the previous one's.
    generation_gaps: u64,
}

/// One frontend a service view asks for: key, kind, port index.
type FrontendSpec = (FrontendKey, FrontendKind, usize);

impl Planner {
    /// An empty plan for a dataplane on `node`.
    pub fn new(node: NodeTopology) -> Self {
        Planner {
            node,
            grace: DEFAULT_DRAIN_GRACE,
            frontends: Vec::new(),
            free_frontends: Vec::new(),
            by_key: AHashMap::new(),
            by_service: BTreeMap::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            service_backends: AHashMap::new(),
            retired: Vec::new(),
            states: Arc::default(),
            synced: false,
            addresses: NodeAddresses::default(),
            generation: None,
            generation_gaps: 0,
        }
    }

    /// Sets the node addresses node ports answer on. Takes effect for the
    /// services the next update compiles: set it before the first.
    pub fn set_node_addresses(&mut self, addresses: NodeAddresses) {
        self.addresses = addresses;
    }

    /// The node addresses.
    pub fn node_addresses(&self) -> &NodeAddresses {
        &self.addresses
    }

    /// The frontends of a service view, in kube-proxy's order: cluster IPs,
    /// external IPs, load-balancer IPs, node ports (each by address, then
    /// port), each key once; a key another service holds stays with it.
    fn frontend_specs(&self, view: &ServiceView) -> SmallVec<[FrontendSpec; 4]> {
        let svc = view.service();
        let mut out: SmallVec<[FrontendSpec; 4]> = SmallVec::new();
        let mut push = |key: FrontendKey, kind: FrontendKind, i: usize| {
            if out.iter().any(|(k, _, _)| *k == key) {
                return;
            }
            if let Some(fe) = self.by_key.get(&key).and_then(|id| self.frontend(*id)) {
                if fe.service.key() != svc.key() {
                    return;
                }
            }
            out.push((key, kind, i));
        };
        let ports = view.ports();
        let each = |addr: IpAddr,
                    kind: FrontendKind,
                    push: &mut dyn FnMut(FrontendKey, FrontendKind, usize)| {
            for (i, pv) in ports.iter().enumerate() {
                let p = pv.port();
                push(
                    FrontendKey {
                        addr,
                        port: p.port(),
                        protocol: p.protocol(),
                    },
                    kind,
                    i,
                );
            }
        };
        for &addr in svc.cluster_ip().addrs() {
            each(addr, FrontendKind::ClusterIp, &mut push);
        }
        // External IPs and load-balancer IPs of a family the service has
        // no cluster IP of are ignored, as kube-proxy's per-family proxiers
        // ignore them (IPVS's TestExternalIPs: "ipvs filters out by
        // ipfamily").
        let has_family = |addr: IpAddr| {
            svc.cluster_ip()
                .addrs()
                .iter()
                .any(|c| c.is_ipv4() == addr.is_ipv4())
        };
        for &addr in svc.external_ips() {
            if has_family(addr) {
                each(addr, FrontendKind::ExternalIp, &mut push);
            }
        }
        for addr in svc.load_balancer_vips() {
            if has_family(addr) {
                each(addr, FrontendKind::LoadBalancer, &mut push);
            }
        }
        for addr in self.addresses.node_port_ips() {
            // A node IP of a family the service has no cluster IP of takes
            // none of its node ports (kube-proxy's proxier of that family
            // does not know the service).
            if !has_family(addr) {
                continue;
            }
            for (i, pv) in ports.iter().enumerate() {
                let p = pv.port();
                if let Some(np) = p.node_port() {
                    push(
                        FrontendKey {
                            addr,
                            port: np,
                            protocol: p.protocol(),
                        },
                        FrontendKind::NodePort,
                        i,
                    );
                }
            }
        }
        out
    }

    /// The plan of `table` compiled from scratch, for one-off readers such
    /// as the renderers.
    pub fn compile(table: &ServiceTable, node: &NodeTopology) -> Self {
        let mut p = Planner::new(node.clone());
        p.update(table, &table.full_change_set(), Instant::ZERO, |_| false);
        p
    }

    /// Sets the grace period of a removed TCP backend that still has
    /// connections (default [`DEFAULT_DRAIN_GRACE`]).
    pub fn set_drain_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// The node the plan is compiled for.
    pub fn node(&self) -> &NodeTopology {
        &self.node
    }

    /// The published backend states (share with packet threads).
    pub fn states(&self) -> &Arc<BackendStates> {
        &self.states
    }

    /// The frontend with this id.
    pub fn frontend(&self, id: FrontendId) -> Option<&Arc<Frontend>> {
        self.frontends.get(id.0 as usize)?.as_ref()
    }

    /// The frontend answering `dst` for `protocol`.
    pub fn frontend_by_key(&self, dst: &SocketAddr, protocol: Protocol) -> Option<&Arc<Frontend>> {
        let id = self.by_key.get(&FrontendKey::new(protocol, *dst))?;
        self.frontend(*id)
    }

    /// The frontends of `service`, in cluster-IP then port order.
    pub fn frontends_of(&self, service: &ServiceKey) -> impl Iterator<Item = &Arc<Frontend>> {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.frontend(*id))
    }

    /// Every frontend in kube-proxy's order: services sorted by key, then
    /// cluster IP, then port.
    pub fn frontends(&self) -> impl Iterator<Item = &Arc<Frontend>> {
        self.by_service
            .values()
            .flatten()
            .filter_map(|id| self.frontend(*id))
    }

    /// The frontends that list a backend at `addr` for `protocol` (among
    /// their [`backends`](Frontend::backends), their
    /// [`draining`](Frontend::draining) ones or their
    /// [`cluster_backends`](Frontend::cluster_backends)): where a reply
    /// from `addr` may belong.
    ///
    /// This walks every frontend: the plan keeps no index by backend (a
    /// change would write one cold entry per backend into it, and only a
    /// full rebuild of a reply index would read it). To answer many such
    /// questions, walk [`frontends`](Self::frontends) once instead; the
    /// dataplanes' reply index is built that way.
    pub fn frontends_with_backend(
        &self,
        protocol: Protocol,
        addr: SocketAddr,
    ) -> impl Iterator<Item = &Arc<Frontend>> {
        self.frontends.iter().flatten().filter(move |f| {
            f.key.protocol == protocol && f.reply_backends().any(|b| b.addr() == addr)
        })
    }

    /// The number of frontends.
    pub fn frontend_count(&self) -> usize {
        self.by_key.len()
    }

    /// The services with frontends, sorted.
    pub fn services(&self) -> impl Iterator<Item = &ServiceKey> {
        self.by_service.keys()
    }

    /// The state of a backend.
    pub fn backend_state(&self, id: BackendId) -> BackendState {
        self.states.state(id)
    }

    /// The address of a live (active or draining) backend.
    pub fn backend_addr(&self, id: BackendId) -> Option<SocketAddr> {
        let slot = self.slots.get(id.slot())?;
        if slot.generation != id.generation() {
            return None;
        }
        slot.live.as_ref().map(|b| b.addr)
    }

    /// The protocol of a live backend.
    pub fn backend_protocol(&self, id: BackendId) -> Option<Protocol> {
        let slot = self.slots.get(id.slot())?;
        if slot.generation != id.generation() {
            return None;
        }
        slot.live.as_ref().map(|b| b.protocol)
    }

    /// Removed backends still draining, with their deadlines.
    pub fn retired(&self) -> impl Iterator<Item = (BackendId, Option<Instant>)> + '_ {
        self.retired.iter().map(|id| {
            let d = self.slots[id.slot()].live.as_ref().and_then(|b| b.deadline);
            (*id, d)
        })
    }

    /// The earliest deadline of a draining backend, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.retired().filter_map(|(_, d)| d).min()
    }

    fn alloc_backend(&mut self, live: LiveBackend) -> BackendId {
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                assert!(
                    self.slots.len() < (1 << BackendId::SLOT_BITS),
                    "more than 2^20 live backends"
                );
                self.slots.push(BackendSlot {
                    generation: 0,
                    live: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[slot as usize];
        s.live = Some(live);
        BackendId::new(slot, s.generation)
    }

    fn free_backend(&mut self, id: BackendId, diff: &mut PlanDiff) {
        let s = &mut self.slots[id.slot()];
        if s.generation != id.generation() {
            return;
        }
        if let Some(b) = s.live.take() {
            if let Some(sb) = self.service_backends.get_mut(&*b.service) {
                sb.ids.remove(&(b.protocol, b.addr));
                if sb.ids.is_empty() && !self.by_service.contains_key(&*b.service) {
                    self.service_backends.remove(&*b.service);
                }
            }
        }
        self.states.set(id, BackendState::Gone);
        s.generation = (s.generation + 1) & ((1 << (32 - BackendId::SLOT_BITS)) - 1);
        self.free_slots.push(id.slot() as u32);
        diff.backends.push((id, BackendState::Gone));
    }

    fn set_state(&mut self, id: BackendId, state: BackendState, diff: &mut PlanDiff) {
        let b = self.slots[id.slot()].live.as_mut().expect("live backend");
        if b.state != state {
            b.state = state;
            self.states.set(id, state);
            diff.backends.push((id, state));
        }
    }

    /// The id of (service, protocol, addr), allocated if new.
    fn backend_id(
        &mut self,
        service: &ServiceKey,
        protocol: Protocol,
        ep: &Arc<EndpointInfo>,
    ) -> BackendId {
        let addr = ep.addr();
        // The backend's id if it is known, else its service's shared key.
        let known = self
            .service_backends
            .get(service)
            .map(|sb| sb.ids.get(&(protocol, addr)).copied().ok_or(&sb.key));
        let key = match known {
            Some(Ok(id)) => {
                let b = self.slots[id.slot()].live.as_mut().expect("live");
                b.endpoint = Arc::clone(ep);
                return id;
            }
            Some(Err(key)) => Arc::clone(key),
            None => {
                let key = Arc::new(service.clone());
                self.service_backends.insert(
                    service.clone(),
                    ServiceBackends {
                        key: Arc::clone(&key),
                        ids: AHashMap::new(),
                    },
                );
                key
            }
        };
        let id = self.alloc_backend(LiveBackend {
            service: key,
            protocol,
            addr,
            state: BackendState::Gone,
            deadline: None,
            endpoint: Arc::clone(ep),
        });
        if let Some(sb) = self.service_backends.get_mut(service) {
            sb.ids.insert((protocol, addr), id);
        }
        id
    }

    /// How many change sets [`update`](Self::update) received whose
    /// generation was not the previous one's plus one (a sync skipped, or
    /// one replayed), each answered with a full resync.
    pub fn generation_gaps(&self) -> u64 {
        self.generation_gaps
    }

    /// Brings the plan up to date with `table` after `changes`, and says
    /// what changed. `has_connections(id)` tells whether a backend still
    /// has tracked connections: a removed TCP backend that has drains,
    /// every other removed backend is gone at once. `now` starts drain
    /// grace periods.
    ///
    /// A change set whose [`generation`](ChangeSet::generation) does not
    /// follow the last one's (a sync was skipped, or an old change set is
    /// replayed) would leave stale state: the plan resyncs in full from
    /// `table` instead, marks the diff [`gap`](PlanDiff::gap) and counts it
    /// ([`generation_gaps`](Self::generation_gaps)).
    pub fn update(
        &mut self,
        table: &ServiceTable,
        changes: &ChangeSet,
        now: Instant,
        mut has_connections: impl FnMut(BackendId) -> bool,
    ) -> PlanDiff {
        let mut diff = PlanDiff::default();
        let gap = !changes.full
            && self
                .generation
                .is_some_and(|g| changes.generation != g.wrapping_add(1));
        if gap {
            self.generation_gaps += 1;
        }
        self.generation = Some(changes.generation);
        let full = changes.full || !self.synced || gap;
        self.synced = true;
        diff.full = full;
        diff.gap = gap;
        let mut touched: Vec<ServiceKey> = if full {
            let mut keys: Vec<ServiceKey> = self.by_service.keys().cloned().collect();
            keys.extend(table.views().map(|v| v.service().key().clone()));
            keys.sort();
            keys.dedup();
            keys
        } else {
            changes
                .removed
                .iter()
                .chain(&changes.updated)
                .cloned()
                .collect()
        };
        // Take down first the frontends that leave their service, so that
        // a key moving between services in one change set is re-added by
        // its new owner whatever the order.
        let mut wanted: Vec<(ServiceKey, Option<Arc<ServiceView>>)> = Vec::new();
        touched.sort();
        touched.dedup();
        for key in touched {
            let view = table
                .view(&key)
                .filter(|v| v.service().is_proxied())
                .cloned();
            let keep: SmallVec<[FrontendKey; 4]> = view
                .as_deref()
                .map(|v| self.frontend_specs(v).into_iter().map(|s| s.0).collect())
                .unwrap_or_default();
            if let Some(ids) = self.by_service.get(&key).cloned() {
                let mut left: SmallVec<[FrontendId; 2]> = SmallVec::new();
                for id in ids {
                    let fe = self.frontend(id).expect("listed").clone();
                    if keep.contains(&fe.key) {
                        left.push(id);
                    } else {
                        self.by_key.remove(&fe.key);
                        self.frontends[id.0 as usize] = None;
                        self.free_frontends.push(id.0);
                        diff.removed.push((id, fe.key));
                    }
                }
                if left.is_empty() {
                    self.by_service.remove(&key);
                } else {
                    self.by_service.insert(key.clone(), left);
                }
            }
            wanted.push((key, view));
        }
        for (key, view) in wanted {
            self.compile_service(&key, view.as_deref(), now, &mut has_connections, &mut diff);
        }
        diff
    }

    /// Recompiles one service's frontends (none if `view` is `None`), and
    /// settles the states of its backends.
    fn compile_service(
        &mut self,
        key: &ServiceKey,
        view: Option<&ServiceView>,
        now: Instant,
        has_connections: &mut impl FnMut(BackendId) -> bool,
        diff: &mut PlanDiff,
    ) {
        // Backends of this service before the change.
        let before: SmallVec<[BackendId; 8]> = self
            .service_backends
            .get(key)
            .map(|sb| sb.ids.values().copied().collect())
            .unwrap_or_default();
        let mut active: ahash::AHashSet<BackendId> = ahash::AHashSet::new();
        let mut serving: ahash::AHashSet<BackendId> = ahash::AHashSet::new();
        let mut new_frontends: SmallVec<[Frontend; 4]> = SmallVec::new();
        if let Some(view) = view {
            let svc = view.service();
            for (fkey, kind, port_index) in self.frontend_specs(view) {
                let vip = fkey.addr;
                let pv = &view.ports()[port_index];
                let port = pv.port();
                let protocol = port.protocol();
                let policy = if kind.is_external() {
                    svc.external_traffic_policy()
                } else {
                    svc.internal_traffic_policy()
                };
                let selection = categorize_port(pv, policy, &self.node, Some(vip));
                let (outcome, usable): (Outcome, Vec<&Arc<EndpointInfo>>) = match selection {
                    SelectionRef::Usable(u) => (Outcome::Forward, u.iter().collect()),
                    SelectionRef::NoEndpoints => (Outcome::Reject, Vec::new()),
                    SelectionRef::NoLocalEndpoints => (Outcome::Drop, Vec::new()),
                };
                let mut backends = Vec::with_capacity(usable.len());
                for ep in usable {
                    let id = self.backend_id(key, protocol, ep);
                    active.insert(id);
                    backends.push(PlanBackend {
                        id,
                        endpoint: Arc::clone(ep),
                    });
                }
                // An external Local frontend short-circuits traffic from
                // this node's pods and from the node to the Cluster-policy
                // endpoints (kube-proxy's KUBE-EXT chain). kube-proxy
                // computes those endpoints for every port of a service that
                // accepts external traffic (`UsesClusterEndpoints`), and
                // its IPVS mode lists them on a Local virtual server that
                // has no local endpoint, the cluster IP's included
                // (`ipvs_backends`).
                let externally_accessible = port.node_port().is_some()
                    || svc
                        .external_ips()
                        .iter()
                        .any(|a| a.is_ipv4() == vip.is_ipv4())
                    || svc
                        .load_balancer_vips()
                        .any(|a| a.is_ipv4() == vip.is_ipv4());
                let mut cluster_backends = Vec::new();
                if policy == TrafficPolicy::Local && (kind.is_external() || externally_accessible) {
                    if let SelectionRef::Usable(u) =
                        categorize_port(pv, TrafficPolicy::Cluster, &self.node, Some(vip))
                    {
                        for ep in u.iter() {
                            let id = self.backend_id(key, protocol, ep);
                            active.insert(id);
                            cluster_backends.push(PlanBackend {
                                id,
                                endpoint: Arc::clone(ep),
                            });
                        }
                    }
                }
                // Serving-and-terminating endpoints of this family that
                // take no new connections drain.
                let mut draining = Vec::new();
                for ep in pv.endpoints() {
                    if ep.addr().is_ipv4() != vip.is_ipv4() {
                        continue;
                    }
                    if ep.is_serving() && ep.is_terminating() {
                        let id = self.backend_id(key, protocol, ep);
                        serving.insert(id);
                        if !backends.iter().any(|b| b.id == id)
                            && !cluster_backends.iter().any(|b| b.id == id)
                        {
                            draining.push(PlanBackend {
                                id,
                                endpoint: Arc::clone(ep),
                            });
                        }
                    }
                }
                let id = self.by_key.get(&fkey).copied();
                new_frontends.push(Frontend {
                    id: id.unwrap_or(FrontendId(u32::MAX)),
                    key: fkey,
                    kind,
                    service: Arc::clone(svc),
                    port_index,
                    name: svc.port_name_string(port),
                    outcome,
                    backends,
                    draining,
                    cluster_backends,
                });
            }
        }
        // Settle backend states.
        let mut all: SmallVec<[BackendId; 8]> = before;
        for id in active.iter().chain(&serving) {
            if !all.contains(id) {
                all.push(*id);
            }
        }
        let mut retired_now: SmallVec<[BackendId; 4]> = SmallVec::new();
        for id in all {
            if active.contains(&id) {
                self.set_state(id, BackendState::Active, diff);
                self.clear_retired(id);
            } else if serving.contains(&id) {
                self.set_state(id, BackendState::Draining, diff);
                self.clear_retired(id);
            } else {
                let b = self.slots[id.slot()].live.as_ref().expect("live");
                let was_live = b.state != BackendState::Gone;
                let tcp = b.protocol == Protocol::Tcp;
                if was_live && tcp && has_connections(id) {
                    if !self.retired.contains(&id) {
                        self.slots[id.slot()].live.as_mut().expect("live").deadline =
                            Some(now + self.grace);
                        self.retired.push(id);
                    }
                    self.set_state(id, BackendState::Draining, diff);
                    retired_now.push(id);
                } else {
                    self.clear_retired(id);
                    self.free_backend(id, diff);
                }
            }
        }
        // Removed backends still draining stay listed on the frontends that
        // had them.
        for fe in &mut new_frontends {
            if let Some(old) = self
                .by_key
                .get(&fe.key)
                .and_then(|id| self.frontends[id.0 as usize].as_ref())
            {
                for b in old.backends.iter().chain(&old.draining) {
                    if retired_now.contains(&b.id) && !fe.draining.iter().any(|d| d.id == b.id) {
                        fe.draining.push(b.clone());
                    }
                }
            }
        }
        self.store_frontends(key, new_frontends, diff);
    }

    fn clear_retired(&mut self, id: BackendId) {
        if let Some(i) = self.retired.iter().position(|r| *r == id) {
            self.retired.swap_remove(i);
            if let Some(b) = self.slots[id.slot()].live.as_mut() {
                b.deadline = None;
            }
        }
    }

    fn store_frontends(
        &mut self,
        key: &ServiceKey,
        new_frontends: SmallVec<[Frontend; 4]>,
        diff: &mut PlanDiff,
    ) {
        let mut ids: SmallVec<[FrontendId; 2]> = SmallVec::new();
        for mut fe in new_frontends {
            let existing = self.by_key.get(&fe.key).copied();
            match existing {
                Some(id) => {
                    fe.id = id;
                    let old = self.frontends[id.0 as usize].as_ref().expect("indexed");
                    if !same_frontend(old, &fe) {
                        diff.changed.push(id);
                    }
                    self.frontends[id.0 as usize] = Some(Arc::new(fe));
                    ids.push(id);
                }
                None => {
                    let id = match self.free_frontends.pop() {
                        Some(i) => FrontendId(i),
                        None => {
                            self.frontends.push(None);
                            FrontendId((self.frontends.len() - 1) as u32)
                        }
                    };
                    fe.id = id;
                    self.by_key.insert(fe.key, id);
                    self.frontends[id.0 as usize] = Some(Arc::new(fe));
                    diff.added.push(id);
                    ids.push(id);
                }
            }
        }
        if ids.is_empty() {
            self.by_service.remove(key);
        } else {
            self.by_service.insert(key.clone(), ids);
        }
    }

    /// Settles the removed backends that drain: one whose connections have
    /// all ended, or whose grace period has passed, is gone. Frontends that
    /// listed it change. Call from the dataplane's timers.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        mut has_connections: impl FnMut(BackendId) -> bool,
    ) -> PlanDiff {
        let mut diff = PlanDiff::default();
        let done: SmallVec<[BackendId; 4]> = self
            .retired()
            .filter(|(id, deadline)| !has_connections(*id) || deadline.is_some_and(|d| now >= d))
            .map(|(id, _)| id)
            .collect();
        for id in done {
            self.clear_retired(id);
            let service = self.slots[id.slot()]
                .live
                .as_ref()
                .map(|b| Arc::clone(&b.service));
            self.free_backend(id, &mut diff);
            if let Some(service) = service {
                let ids: SmallVec<[FrontendId; 2]> =
                    self.by_service.get(&service).cloned().unwrap_or_default();
                for fid in ids {
                    let slot = &mut self.frontends[fid.0 as usize];
                    if let Some(fe) = slot {
                        if fe.draining.iter().any(|b| b.id == id) {
                            let mut f = (**fe).clone();
                            f.draining.retain(|b| b.id != id);
                            *slot = Some(Arc::new(f));
                            diff.changed.push(fid);
                        }
                    }
                }
            }
        }
        diff
    }
}

fn same_frontend(a: &Frontend, b: &Frontend) -> bool {
    let same_list = |x: &[PlanBackend], y: &[PlanBackend]| {
        x.len() == y.len()
            && x.iter()
                .zip(y)
                .all(|(p, q)| p.id == q.id && p.endpoint == q.endpoint)
    };
    a.outcome == b.outcome
        && a.kind == b.kind
        && a.port_index == b.port_index
        && same_list(&a.cluster_backends, &b.cluster_backends)
        && Arc::ptr_eq(&a.service, &b.service)
        && same_list(&a.backends, &b.backends)
        && same_list(&a.draining, &b.draining)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::endpoint_slice::{AddressType, EndpointSlice, EndpointSpec, SlicePortSpec};
    use crate::model::service::ServicePortSpec;
    use crate::table::Change;

    fn svc(name: &str, vip: &str) -> Service {
        Service::builder("default", name)
            .cluster_ip(vip.parse().unwrap())
            .port(ServicePortSpec::tcp(80).target_port(8080))
            .build()
            .unwrap()
    }

    fn slice(svc: &str, eps: &[(&str, bool, bool)]) -> EndpointSlice {
        EndpointSlice::builder("default", format!("{svc}-1"), svc, AddressType::IPv4)
            .port(SlicePortSpec::tcp(8080))
            .endpoints(eps.iter().map(|(ip, ready, terminating)| {
                EndpointSpec::new(*ip)
                    .ready(*ready)
                    .serving(true)
                    .terminating(*terminating)
            }))
            .build()
            .unwrap()
    }

    fn ids(fe: &Frontend) -> Vec<(SocketAddr, BackendId)> {
        fe.backends().iter().map(|b| (b.addr(), b.id())).collect()
    }

    /// A table holding `batch`, and a planner synced to it (with its first
    /// diff).
    fn planned(batch: impl IntoIterator<Item = Change>) -> (ServiceTable, Planner, PlanDiff) {
        let mut t = ServiceTable::new();
        let cs = t.apply_batch(batch).unwrap();
        let mut p = Planner::new(NodeTopology::default());
        let d = p.update(&t, &cs, Instant::ZERO, |_| false);
        (t, p, d)
    }

    #[test]
    fn ids_are_stable_across_changes() {
        let (mut t, mut p, d) = planned([
            Change::UpsertService(svc("web", "10.96.0.1")),
            Change::UpsertSlice(slice(
                "web",
                &[("10.1.0.1", true, false), ("10.1.0.2", true, false)],
            )),
        ]);
        assert!(d.full);
        assert_eq!(d.added.len(), 1);
        let dst = "10.96.0.1:80".parse().unwrap();
        let before = ids(p.frontend_by_key(&dst, Protocol::Tcp).unwrap());
        let fid = p.frontend_by_key(&dst, Protocol::Tcp).unwrap().id();
        for round in 0..50 {
            let extra = format!("10.1.0.{}", 10 + round);
            let cs = t
                .apply(Change::UpsertSlice(slice(
                    "web",
                    &[
                        ("10.1.0.1", true, false),
                        ("10.1.0.2", true, false),
                        (&extra, true, false),
                    ],
                )))
                .unwrap();
            let d = p.update(&t, &cs, Instant::ZERO, |_| false);
            assert_eq!(d.changed, [fid]);
            let now = ids(p.frontend_by_key(&dst, Protocol::Tcp).unwrap());
            for b in &before {
                assert!(now.contains(b), "{b:?} kept its id");
            }
        }
        // Slots are reused, so ids stay small.
        assert!(p.slots.len() <= 4, "{}", p.slots.len());
    }

    #[test]
    fn terminating_drains_and_removed_tcp_with_connections_drains() {
        let (mut t, mut p, _) = planned([
            Change::UpsertService(svc("web", "10.96.0.1")),
            Change::UpsertSlice(slice(
                "web",
                &[("10.1.0.1", true, false), ("10.1.0.2", true, false)],
            )),
        ]);
        let dst = "10.96.0.1:80".parse().unwrap();
        let two = p.frontend_by_key(&dst, Protocol::Tcp).unwrap().backends()[1].id();
        let one = p.frontend_by_key(&dst, Protocol::Tcp).unwrap().backends()[0].id();
        // .2 terminates (still serving): draining, not a backend.
        let cs = t
            .apply(Change::UpsertSlice(slice(
                "web",
                &[("10.1.0.1", true, false), ("10.1.0.2", false, true)],
            )))
            .unwrap();
        let d = p.update(&t, &cs, Instant::ZERO, |_| false);
        assert!(d.backends.contains(&(two, BackendState::Draining)));
        let fe = p.frontend_by_key(&dst, Protocol::Tcp).unwrap();
        assert_eq!(fe.backends().len(), 1);
        assert_eq!(fe.draining()[0].id(), two);
        assert_eq!(p.backend_state(two), BackendState::Draining);
        // .1 removed while it has connections: drains until they end.
        let cs = t
            .apply(Change::UpsertSlice(slice(
                "web",
                &[("10.1.0.2", true, false)],
            )))
            .unwrap();
        p.update(&t, &cs, Instant::from_secs(1), |id| id == one);
        assert_eq!(p.backend_state(one), BackendState::Draining);
        assert_eq!(p.backend_state(two), BackendState::Active);
        assert_eq!(
            p.poll_timeout(),
            Some(Instant::from_secs(1) + DEFAULT_DRAIN_GRACE)
        );
        let fe = p.frontend_by_key(&dst, Protocol::Tcp).unwrap();
        assert_eq!(fe.draining()[0].id(), one);
        let d = p.handle_timeout(Instant::from_secs(2), |id| id == one);
        assert!(d.is_empty());
        let d = p.handle_timeout(Instant::from_secs(3), |_| false);
        assert_eq!(d.backends, [(one, BackendState::Gone)]);
        assert_eq!(p.backend_state(one), BackendState::Gone);
        assert!(
            p.frontend_by_key(&dst, Protocol::Tcp)
                .unwrap()
                .draining()
                .is_empty()
        );
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn removed_service_frees_everything() {
        let (mut t, mut p, _) = planned([
            Change::UpsertService(svc("web", "10.96.0.1")),
            Change::UpsertSlice(slice("web", &[("10.1.0.1", true, false)])),
        ]);
        let cs = t
            .apply(Change::DeleteService(ServiceKey::new("default", "web")))
            .unwrap();
        let d = p.update(&t, &cs, Instant::ZERO, |_| false);
        assert_eq!(d.removed.len(), 1);
        assert_eq!(p.frontend_count(), 0);
        assert!(p.service_backends.is_empty());
        let ep = "10.1.0.1:8080".parse().unwrap();
        assert_eq!(p.frontends_with_backend(Protocol::Tcp, ep).count(), 0);
        assert_eq!(d.backends.len(), 1);
    }

    /// A reply from a backend belongs to every frontend listing it, active
    /// or draining, of its protocol only; a backend gone is nobody's.
    #[test]
    fn frontends_with_backend_names_those_listing_it_active_or_draining() {
        let (mut t, mut p, _) = planned([
            Change::UpsertService(svc("web", "10.96.0.1")),
            Change::UpsertSlice(slice(
                "web",
                &[("10.1.0.1", true, false), ("10.1.0.2", true, false)],
            )),
            Change::UpsertService(svc("api", "10.96.0.2")),
            Change::UpsertSlice(slice("api", &[("10.1.0.1", true, false)])),
        ]);
        let names = |p: &Planner, ep: &str| {
            let mut v: Vec<String> = p
                .frontends_with_backend(Protocol::Tcp, ep.parse().unwrap())
                .map(|f| f.key().socket_addr().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&p, "10.1.0.1:8080"), ["10.96.0.1:80", "10.96.0.2:80"]);
        assert_eq!(names(&p, "10.1.0.2:8080"), ["10.96.0.1:80"]);
        assert!(
            p.frontends_with_backend(Protocol::Udp, "10.1.0.1:8080".parse().unwrap())
                .next()
                .is_none()
        );
        // .2 removed while it has connections: draining, still web's.
        let cs = t
            .apply(Change::UpsertSlice(slice(
                "web",
                &[("10.1.0.1", true, false)],
            )))
            .unwrap();
        p.update(&t, &cs, Instant::ZERO, |_| true);
        assert_eq!(names(&p, "10.1.0.2:8080"), ["10.96.0.1:80"]);
        // Its connections ended: gone, nobody's.
        p.handle_timeout(Instant::from_secs(1), |_| false);
        assert!(names(&p, "10.1.0.2:8080").is_empty());
        assert_eq!(names(&p, "10.1.0.1:8080"), ["10.96.0.1:80", "10.96.0.2:80"]);
    }
}
