//! The [`Dataplane`] trait, the one interface a caller's packet I/O talks
//! to, and its implementations.
//!
//! - [`IptablesDataplane`]: kube-proxy's iptables mode, a flat, ordered rule
//!   list walked in order; the list is persistent, so a change replaces
//!   only its service's rules.
//! - [`IpvsDataplane`]: kube-proxy's IPVS mode, a hash table of virtual
//!   services with a scheduler each; a change touches only its service.
//! - [`NftablesDataplane`]: kube-proxy's nftables mode, a verdict map found
//!   in O(1) and a uniform `numgen random mod N` pick.
//!
//! Every dataplane reads the [`plan`](crate::plan) (frontends and backends
//! with stable ids) and carries connections through the same connection
//! layer: a bounded [`Conntrack`](crate::conntrack::Conntrack) in front of
//! the mode's scheduling (on by default, [`DataplaneConfig::conntrack`]),
//! graceful termination of removed backends, and timers driven by the
//! caller's clock ([`Dataplane::poll_timeout`],
//! [`Dataplane::handle_timeout`]): nothing happens in the background.
//!
//! A dataplane is shared by reference among packet threads (`&self`,
//! `Send + Sync`). The control plane calls [`Dataplane::sync`] with the
//! [`ServiceTable`] and the [`ChangeSet`] an apply returned; readers never
//! wait for it longer than a pointer swap.

mod conn;
mod fragments;
mod iptables;
mod ipvs;
mod nftables;
mod reply_index;
mod rule_list;
mod vs_table;

use core::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use iptables::{IptablesDataplane, IptablesReader};
pub use ipvs::{IpvsDataplane, IpvsReader, RealServerInfo, VirtualServiceInfo};
pub use nftables::{NftablesDataplane, NftablesReader};

use crate::conntrack::{ConntrackConfig, TcpFlags, Timeouts, Tracked};
use crate::plan::{BackendId, DEFAULT_DRAIN_GRACE};
use crate::render::Cidr;

use crate::affinity::{AffinityConfig, AffinityEntry, AffinityReport};
use crate::model::flow::{Flow, FragmentKey, Protocol, Verdict};
use crate::model::service::ServiceKey;
use crate::scheduler::SchedulerConfig;
use crate::table::{ChangeSet, ServiceTable};
use crate::time::Instant;
use crate::topology::NodeTopology;

/// What every dataplane sets up alike: the config with the mode's tracker
/// timeouts filled in, the planner (with the drain grace) and the
/// connection layer.
pub(crate) fn connection_setup(
    config: &mut DataplaneConfig,
    mode: Mode,
) -> (crate::plan::Planner, conn::ConnLayer) {
    let tracker = config.tracker_for(mode);
    config.conntrack = tracker.clone();
    let mut planner = crate::plan::Planner::new(config.node.clone());
    planner.set_drain_grace(config.drain_grace);
    let mut addresses =
        crate::plan::NodeAddresses::new(config.node_ips.clone(), config.nodeport_addresses.clone());
    // kube-proxy's IPVS and nftables modes never answer node ports on
    // loopback addresses; the iptables mode does (route_localnet).
    addresses.exclude_loopback = !config
        .loopback_node_ports
        .unwrap_or(!matches!(mode, Mode::Ipvs | Mode::Nftables));
    // Only the IPVS mode leaves IPv6 link-local node IPs out.
    addresses.exclude_link_local = mode == Mode::Ipvs;
    planner.set_node_addresses(addresses);
    let conn = conn::ConnLayer::new(
        tracker.as_ref(),
        &config.cluster_cidrs,
        config.masquerade_all,
        mode == Mode::Ipvs,
    );
    (planner, conn)
}

/// The random source of a dataplane's next reader: a stream of its own,
/// derived from the seed and the reader's number.
pub(crate) fn reader_rng(seed: u64, readers: &core::sync::atomic::AtomicU64) -> crate::SeededRng {
    let n = readers.fetch_add(1, core::sync::atomic::Ordering::Relaxed) + 1;
    crate::SeededRng::new(crate::rng::mix64(
        seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ))
}

/// The earlier of two optional deadlines.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

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

/// Which kube-proxy mode a dataplane models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// iptables mode.
    Iptables,
    /// IPVS mode.
    Ipvs,
    /// nftables mode.
    Nftables,
    /// The userspace model of the eBPF dataplane
    /// ([`IpvsDataplane::ebpf_model`]).
    Ebpf,
}

impl Mode {
    /// `iptables`, `ipvs`, `nftables`: the CLI's `--mode` values.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Ipvs => "ipvs",
            Mode::Nftables => "nftables",
            Mode::Ebpf => "ebpf",
        }
    }

    /// The connection-tracking timeouts the mode's kernel uses: netfilter's
    /// for iptables and nftables, IPVS's for IPVS.
    /// The eBPF mode uses the TC program's (Cilium's agent defaults:
    /// TCP 8000 s, SYN 60 s, FIN and close 10 s, non-TCP 60 s).
    pub fn default_timeouts(self) -> Timeouts {
        match self {
            Mode::Ipvs => Timeouts::ipvs(),
            Mode::Ebpf => {
                let mut t = Timeouts::ipvs();
                t.tcp_established = Duration::from_secs(8000);
                t.tcp_syn_recv = Duration::from_secs(60);
                t.tcp_fin_wait = Duration::from_secs(10);
                t.tcp_time_wait = Duration::from_secs(10);
                t.tcp_close = Duration::from_secs(10);
                t.udp = Duration::from_secs(60);
                t.udp_replied = Duration::from_secs(60);
                t
            }
            _ => Timeouts::netfilter(),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings every dataplane takes.
#[derive(Debug, Clone)]
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
    /// Connection tracking: `Some` (the default) tracks every forwarded
    /// flow, so an established flow keeps its backend across endpoint
    /// changes; `None` decides every packet afresh.
    pub conntrack: Option<ConntrackConfig>,
    /// The tracker's timeouts; `None` (the default) takes the mode's own
    /// ([`Mode::default_timeouts`]).
    pub conntrack_timeouts: Option<Timeouts>,
    /// How long a removed TCP backend with connections drains at most.
    pub drain_grace: Duration,
    /// This node's IPs (kube-proxy's node addresses; the CLI's `--node-ip`):
    /// node ports answer on them, and traffic from them is the node's own
    /// (`--src-type LOCAL`). Empty (the default): no node-port frontends.
    pub node_ips: Vec<IpAddr>,
    /// `--nodeport-addresses`: node ports answer only on the node IPs
    /// inside these prefixes; empty (the default) means all of them.
    pub nodeport_addresses: Vec<Cidr>,
    /// Whether node ports answer on loopback node IPs. `None` (the
    /// default): as the mode's kube-proxy does, yes in the iptables mode
    /// (`--iptables-localhost-nodeports`, `route_localnet`) and the eBPF
    /// model, no in the IPVS and nftables modes. `Some(on)` overrides it,
    /// e.g. for a userspace proxy that listens on loopback node IPs itself.
    pub loopback_node_ports: Option<bool>,
    /// `--cluster-cidr`, kube-proxy's local-traffic detector: sources in
    /// it are this cluster's pods. Traffic to a cluster IP from outside it
    /// is masqueraded, and pod traffic to an external destination of an
    /// `externalTrafficPolicy: Local` service is short-circuited to the
    /// Cluster-policy endpoints. Empty (the default): no detector.
    pub cluster_cidrs: Vec<Cidr>,
    /// `--masquerade-all`: masquerade all traffic to cluster IPs.
    pub masquerade_all: bool,
    /// IPVS mode, `rr` and `wrr`: whether per-thread readers
    /// ([`IpvsDataplane::reader`]) share the scheduler's one rotation,
    /// strictly global as the kernel's single `ip_vs_rr` pointer, at the
    /// cost of a counter every packet thread writes. `false` (the default):
    /// each reader keeps its own position per frontend, so that new
    /// connections from N threads are each spread within 1 of even per
    /// thread (within N of even in all) and threads write no shared cache
    /// line. [`Dataplane::route`] always uses the shared rotation.
    pub global_rotation: bool,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            node: NodeTopology::default(),
            seed: 0,
            scheduler: SchedulerConfig::default(),
            count_connections: false,
            affinity: AffinityConfig::default(),
            conntrack: Some(ConntrackConfig::default()),
            conntrack_timeouts: None,
            drain_grace: DEFAULT_DRAIN_GRACE,
            node_ips: Vec::new(),
            nodeport_addresses: Vec::new(),
            loopback_node_ports: None,
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            global_rotation: false,
        }
    }
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

    /// Adds a node IP ([`node_ips`](Self::node_ips)).
    pub fn node_ip(mut self, ip: IpAddr) -> Self {
        self.node_ips.push(ip);
        self
    }

    /// Sets `--nodeport-addresses` ([`nodeport_addresses`](Self::nodeport_addresses)).
    pub fn nodeport_addresses(mut self, cidrs: Vec<Cidr>) -> Self {
        self.nodeport_addresses = cidrs;
        self
    }

    /// Adds a `--cluster-cidr` prefix ([`cluster_cidrs`](Self::cluster_cidrs)).
    pub fn cluster_cidr(mut self, cidr: Cidr) -> Self {
        self.cluster_cidrs.push(cidr);
        self
    }

    /// Sets `--masquerade-all`.
    pub fn masquerade_all(mut self, on: bool) -> Self {
        self.masquerade_all = on;
        self
    }

    /// Sets the connection tracker (`None` turns tracking off).
    pub fn conntrack(mut self, conntrack: Option<ConntrackConfig>) -> Self {
        self.conntrack = conntrack;
        self
    }

    /// The tracker config with the mode's timeouts applied, if tracking is
    /// on.
    pub(crate) fn tracker_for(&self, mode: Mode) -> Option<ConntrackConfig> {
        let c = self.conntrack.clone()?;
        Some(
            c.timeouts(
                self.conntrack_timeouts
                    .clone()
                    .unwrap_or_else(|| mode.default_timeouts()),
            ),
        )
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
/// dp.sync(&table, &changes, Instant::ZERO);
/// let flow = Flow::tcp("10.1.0.9:40000".parse().unwrap(), "10.96.0.10:80".parse().unwrap());
/// let v = dp.route(&flow, Instant::ZERO);
/// assert_eq!(v.backend(), Some("10.0.0.2:8080".parse().unwrap()));
/// // The next packet of the connection is tracked.
/// assert!(dp.packet(&flow, TcpFlags::ACK, Instant::ZERO).is_tracked());
/// ```
pub trait Dataplane: Send + Sync {
    /// The mode it models.
    fn mode(&self) -> Mode;

    /// Brings the dataplane up to date with `table`, given what changed.
    /// Pass [`ServiceTable::full_change_set`] for a full resync. `now`
    /// starts the grace period of backends that begin to drain.
    ///
    /// A change set whose generation does not follow the last one synced
    /// (a sync skipped or replayed) is a gap: the dataplane resyncs in full
    /// from `table` instead of running on stale state, and counts it in
    /// [`generation_gaps`](Self::generation_gaps).
    fn sync(&self, table: &ServiceTable, changes: &ChangeSet, now: Instant);

    /// How many syncs met a generation gap and resynced in full. `0` by
    /// default, for dataplanes that do not track generations.
    fn generation_gaps(&self) -> u64 {
        0
    }

    /// A new connection's first packet (a SYN for TCP): forward, reject,
    /// drop, or pass through. With tracking on, a flow the tracker knows
    /// keeps its backend. Equivalent to
    /// [`route_with_key`](Self::route_with_key) without a key.
    fn route(&self, flow: &Flow, now: Instant) -> Verdict {
        self.route_with_key(flow, None, now)
    }

    /// [`route`](Self::route) with a caller-supplied affinity key, such as a
    /// hash of a session cookie or header. Services whose
    /// [`AffinityKeyKind`](crate::AffinityKeyKind) is `Caller` pin this key
    /// instead of the client address (and fall back to the client address
    /// when `key` is `None`); other services ignore it.
    fn route_with_key(&self, flow: &Flow, key: Option<u64>, now: Instant) -> Verdict;

    /// A retry of a new connection after the connect to the backends in
    /// `exclude` failed, as a real proxy retries: the flow's tracked entry
    /// (the failed attempt, and its count on that backend) goes, and the
    /// flow is scheduled afresh among the frontend's backends that take
    /// new connections, less `exclude`'s. Each mode keeps its own choice
    /// where it can: `lc`/`wlc` take the least loaded of the others; `rr`,
    /// `wrr`, `sh` and `mh` the next after the excluded pick (IPVS's
    /// `sh-fallback` and `mh-fallback`); iptables, nftables and `random` one
    /// of the others at random. A `ClientIP` pin to an excluded backend is
    /// replaced by the new pick. [`Verdict::Reject`] when every backend is
    /// excluded. Allocates nothing. Equivalent to
    /// [`route_excluding_with_key`](Self::route_excluding_with_key) without
    /// a key.
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
    ///     .endpoints(["10.0.0.2", "10.0.0.3"].map(EndpointSpec::new))
    ///     .build().unwrap();
    /// let changes = table.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)]).unwrap();
    /// let dp = IpvsDataplane::new(DataplaneConfig::with_seed(1).scheduler(SchedulerKind::SourceHash));
    /// dp.sync(&table, &changes, Instant::ZERO);
    /// let flow = Flow::tcp("10.1.0.9:40000".parse().unwrap(), "10.96.0.10:80".parse().unwrap());
    /// let Verdict::Forward(first) = dp.route(&flow, Instant::ZERO) else { panic!() };
    /// // The connect to `first` failed: sh would pick it again; this does not.
    /// let Verdict::Forward(retry) = dp.route_excluding(&flow, &[first.backend_id], Instant::ZERO) else { panic!() };
    /// assert_ne!(retry.backend, first.backend);
    /// assert_eq!(dp.connections(Instant::ZERO).len(), 1);
    /// assert_eq!(dp.route_excluding(&flow, &[first.backend_id, retry.backend_id], Instant::ZERO), Verdict::Reject);
    /// ```
    fn route_excluding(&self, flow: &Flow, exclude: &[BackendId], now: Instant) -> Verdict {
        self.route_excluding_with_key(flow, None, exclude, now)
    }

    /// [`route_excluding`](Self::route_excluding) with a caller-supplied
    /// affinity key, as [`route_with_key`](Self::route_with_key) takes it.
    fn route_excluding_with_key(
        &self,
        flow: &Flow,
        key: Option<u64>,
        exclude: &[BackendId],
        now: Instant,
    ) -> Verdict;

    /// Any packet of a flow in the original direction (client to
    /// frontend), with its TCP flags (ignored for UDP and SCTP): a tracked
    /// flow advances its state and keeps its backend; an untracked one is
    /// scheduled as a new connection.
    fn packet(&self, flow: &Flow, flags: TcpFlags, now: Instant) -> Verdict;

    /// Ends the tracked connection of `flow` (both directions closed, or
    /// the caller's end of a UDP session); the same 5-tuple is balanced
    /// afresh afterwards. Returns the entry, if one was tracked.
    fn connection_closed(&self, flow: &Flow, now: Instant) -> Option<Tracked>;

    /// A reply packet (backend to client) of a tracked connection: advances
    /// its state and returns the connection, whose `flow` is the original
    /// direction (for reverse NAT: the frontend address to restore).
    /// `None` if no tracked connection matches. The frontends of the
    /// backend come from a reply index published with each sync, so a
    /// reply takes no lock the writer holds (only the tracker's shard) and
    /// allocates nothing.
    fn reply(&self, reply: &Flow, flags: TcpFlags, now: Instant) -> Option<Tracked>;

    /// The tracked connection a packet from `reply.src` (a backend) to
    /// `reply.dst` (a client) belongs to, as [`reply`](Self::reply) finds
    /// it, with no side effect: no state change, no timer restarted. For
    /// what is about a connection without being one of its packets, such
    /// as an ICMP error a backend sends about a client's packet (the
    /// error's embedded flow, reversed), and for checks. `None` if no
    /// tracked connection matches, and by default, for dataplanes that
    /// track nothing. Lock-free towards the writer, as `reply` is.
    ///
    /// # Examples
    /// ```
    /// use svclb::*;
    /// let mut table = ServiceTable::new();
    /// let svc = Service::builder("default", "dns")
    ///     .cluster_ip("10.96.0.10".parse().unwrap())
    ///     .port(ServicePortSpec::udp(53).target_port(5353))
    ///     .build().unwrap();
    /// let slice = EndpointSlice::builder("default", "dns-1", "dns", AddressType::IPv4)
    ///     .port(SlicePortSpec::udp(5353))
    ///     .endpoint(EndpointSpec::new("10.0.0.2"))
    ///     .build().unwrap();
    /// let changes = table.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)]).unwrap();
    /// let dp = IpvsDataplane::new(DataplaneConfig::with_seed(1));
    /// dp.sync(&table, &changes, Instant::ZERO);
    /// let query = Flow::udp("10.1.0.9:40000".parse().unwrap(), "10.96.0.10:53".parse().unwrap());
    /// dp.route(&query, Instant::ZERO);
    /// // The answer, as the backend sends it (DNAT only: back to the client).
    /// let answer = Flow::udp("10.0.0.2:5353".parse().unwrap(), "10.1.0.9:40000".parse().unwrap());
    /// let before = dp.peek_reply(&answer, Instant::ZERO).unwrap();
    /// assert_eq!(before.flow, query);
    /// // Peeking changed nothing; a real reply marks the flow replied.
    /// assert_eq!(dp.peek_reply(&answer, Instant::ZERO), Some(before));
    /// let after = dp.reply(&answer, TcpFlags::NONE, Instant::ZERO).unwrap();
    /// assert_ne!(after.state, before.state);
    /// ```
    fn peek_reply(&self, reply: &Flow, now: Instant) -> Option<Tracked> {
        let _ = (reply, now);
        None
    }

    /// The live tracked connection of `flow` (original direction: client
    /// to frontend), with no side effect: no state change, no timer
    /// restarted, nothing scheduled. For a caller that watches its own
    /// connections' expiry (a proxy's idle sessions) without a flow table
    /// of its own, and for checks. `None` if the flow is not tracked, its
    /// entry's timeout has passed, or its backend is gone (past its drain
    /// grace: the next [`packet`](Self::packet) would expire it,
    /// `expire_nodest_conn`), and by default, for dataplanes that track
    /// nothing. Allocates nothing.
    ///
    /// # Examples
    /// ```
    /// use svclb::*;
    /// let mut table = ServiceTable::new();
    /// let svc = Service::builder("default", "dns")
    ///     .cluster_ip("10.96.0.10".parse().unwrap())
    ///     .port(ServicePortSpec::udp(53).target_port(5353))
    ///     .build().unwrap();
    /// let slice = EndpointSlice::builder("default", "dns-1", "dns", AddressType::IPv4)
    ///     .port(SlicePortSpec::udp(5353))
    ///     .endpoint(EndpointSpec::new("10.0.0.2"))
    ///     .build().unwrap();
    /// let changes = table.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)]).unwrap();
    /// let dp = IptablesDataplane::new(DataplaneConfig::with_seed(1));
    /// dp.sync(&table, &changes, Instant::ZERO);
    /// let query = Flow::udp("10.1.0.9:40000".parse().unwrap(), "10.96.0.10:53".parse().unwrap());
    /// assert_eq!(dp.peek(&query, Instant::ZERO), None);
    /// dp.route(&query, Instant::ZERO);
    /// let t = dp.peek(&query, Instant::ZERO).unwrap();
    /// assert_eq!(t.backend_addr, "10.0.0.2:5353".parse().unwrap());
    /// // Peeking restarts no timer: past the UDP timeout the entry is gone.
    /// assert_eq!(dp.peek(&query, t.expires), None);
    /// ```
    fn peek(&self, flow: &Flow, now: Instant) -> Option<Tracked> {
        let _ = (flow, now);
        None
    }

    /// Records that the fragmented datagram `datagram` (its first fragment
    /// just routed or reverse-NATed) belongs to the tracked connection
    /// whose original direction (client to frontend) is `connection`, so
    /// that [`later_fragment`](Self::later_fragment) finds it. The record
    /// lasts as long as IPv4 reassembly waits (30 s), or until the
    /// connection ends; a bounded table (1,024 datagrams, the oldest
    /// dropped first), allocated whole at the first datagram recorded and
    /// allocation-free from then on. Returns whether it was
    /// recorded: `false` when `connection` is not tracked, and by default,
    /// for dataplanes that track nothing.
    ///
    /// # Examples
    /// ```
    /// use svclb::*;
    /// let mut table = ServiceTable::new();
    /// let svc = Service::builder("default", "dns")
    ///     .cluster_ip("10.96.0.10".parse().unwrap())
    ///     .port(ServicePortSpec::udp(53).target_port(5353))
    ///     .build().unwrap();
    /// let slice = EndpointSlice::builder("default", "dns-1", "dns", AddressType::IPv4)
    ///     .port(SlicePortSpec::udp(5353))
    ///     .endpoint(EndpointSpec::new("10.0.0.2"))
    ///     .build().unwrap();
    /// let changes = table.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)]).unwrap();
    /// let dp = IptablesDataplane::new(DataplaneConfig::with_seed(1));
    /// dp.sync(&table, &changes, Instant::ZERO);
    /// let query = Flow::udp("10.1.0.9:40000".parse().unwrap(), "10.96.0.10:53".parse().unwrap());
    /// let datagram = FragmentKey { src: query.src.ip(), dst: query.dst.ip(), id: 7, protocol: Protocol::Udp };
    /// // The first fragment carries the ports: it is routed, then recorded.
    /// dp.route(&query, Instant::ZERO);
    /// assert!(dp.first_fragment(&datagram, &query, Instant::ZERO));
    /// // A later one (no ports) follows its connection.
    /// let t = dp.later_fragment(&datagram, Instant::ZERO).unwrap();
    /// assert_eq!((t.flow, t.backend_addr), (query, "10.0.0.2:5353".parse().unwrap()));
    /// // One whose first fragment was not seen is unroutable.
    /// assert_eq!(dp.later_fragment(&FragmentKey { id: 8, ..datagram }, Instant::ZERO), None);
    /// ```
    fn first_fragment(&self, datagram: &FragmentKey, connection: &Flow, now: Instant) -> bool {
        let _ = (datagram, connection, now);
        false
    }

    /// The tracked connection a later fragment (one with no transport
    /// header) of `datagram` belongs to, recorded by
    /// [`first_fragment`](Self::first_fragment): its original flow and its
    /// backend, which the fragment follows across endpoint changes while
    /// the backend is active or draining. With no side effect (the datagram
    /// is one packet, its first fragment's). `None`, the fragment is
    /// unroutable: its first fragment was not seen (or is over 30 s old),
    /// or the connection ended or lost its backend, and by default.
    /// Allocates nothing.
    fn later_fragment(&self, datagram: &FragmentKey, now: Instant) -> Option<Tracked> {
        let _ = (datagram, now);
        None
    }

    /// The backends that may take a new connection to `dst`, or the verdict
    /// for all of them. For inspection and tests; it allocates.
    fn candidates(&self, protocol: Protocol, dst: SocketAddr) -> Candidates;

    /// When the dataplane next needs the clock: the tracker's next sweep,
    /// or a draining backend's deadline. `None`: nothing is pending.
    fn poll_timeout(&self) -> Option<Instant>;

    /// Runs due timer work in bounded steps: expires tracked connections,
    /// and settles draining backends whose connections ended or whose
    /// grace period passed.
    fn handle_timeout(&self, now: Instant);

    /// The live tracked connections (original flow, frontend, backend,
    /// state, expiry), as `conntrack -L` or `ipvsadm -lnc` list them.
    /// Allocates; for inspection.
    fn connections(&self, now: Instant) -> Vec<Tracked>;

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
