//! # svclb — Kubernetes Service load balancing as data structures
//!
//! svclb models what kube-proxy, IPVS and eBPF dataplanes do with Kubernetes
//! Services, with no packet I/O of its own (sans-IO, like smoltcp or
//! quinn-proto). A caller extracts a [`Flow`] from its own packets or
//! sockets, asks a [`Dataplane`] for a [`Verdict`], and rewrites or forwards.
//!
//! ## The map
//! Data flows one way:
//!
//! 1. **Model** ([`model`]): [`Service`]s and [`EndpointSlice`]s, built with
//!    validating builders (typed [`ValidationError`]s that name the field).
//! 2. **Table** ([`ServiceTable`]): takes [`Change`]s whole or not at all,
//!    merges slices as kube-proxy does, and reports a [`ChangeSet`].
//! 3. **Plan** ([`plan`]): the one compile step. The table becomes
//!    frontends (VIP, protocol, port) of every [`FrontendKind`] kube-proxy
//!    captures (cluster IPs, node IPs at node ports, external IPs,
//!    load-balancer IPs) with an outcome (forward, reject,
//!    drop) and backends with stable [`FrontendId`]s and [`BackendId`]s and
//!    a [`BackendState`] (active, draining, gone); every change yields a
//!    [`PlanDiff`](plan::PlanDiff) that dataplanes and renderers read.
//! 4. **Dataplanes** ([`dataplane`]): [`IptablesDataplane`] (a flat rule
//!    list walked in order), [`IpvsDataplane`] (a hash trie of virtual
//!    services in two versions, left-right: a change touches one path in
//!    each, a batch is published whole) and [`NftablesDataplane`] (a
//!    verdict map and a uniform `numgen` pick), all behind the
//!    [`Dataplane`] trait, each with an owned per-thread reader. Their
//!    shared connection layer applies what
//!    depends on the source (`loadBalancerSourceRanges`, the short-circuit
//!    of pod and node traffic to external Local destinations) and says in
//!    the verdict whether kube-proxy masquerades the flow
//!    ([`Forward::masquerade`]).
//! 5. **Connections** ([`conntrack`]): a bounded, sharded connection
//!    tracker in front of every dataplane (on by default). A tracked flow
//!    keeps its backend across endpoint changes; TCP states and timeouts
//!    follow IPVS (or netfilter, in the iptables and nftables modes);
//!    removed TCP backends drain; timers run from the caller's clock
//!    ([`Dataplane::poll_timeout`], [`Dataplane::handle_timeout`]). A
//!    proxy whose connect failed retries without that backend
//!    ([`Dataplane::route_excluding`]).
//! 6. **Schedulers** ([`scheduler`]): random (the iptables cascade), rr,
//!    wrr, lc, wlc, sh, mh (Maglev) — or your own [`Scheduler`].
//! 7. **Topology** ([`topology`]): which endpoints take new connections
//!    (ready, serving-terminating fallback, Local policies, hints).
//! 8. **Session affinity** ([`affinity`]): `ClientIP` services pin a client
//!    (or a socket, or a key the caller passes to
//!    [`Dataplane::route_with_key`]) to an endpoint in a sharded, bounded
//!    [`AffinityTable`], with kube-proxy's timer semantics, inspection
//!    ([`Dataplane::affinity_entries`]) and NAT-hotspot reports
//!    ([`Dataplane::affinity_report`]).
//! 9. **Renderings** ([`render`]): the plan as `iptables-restore` and
//!    `nft -f` input in kube-proxy's exact terms, an `ipvsadm -ln` listing
//!    of the IPVS dataplane, the IPVS mode's ipsets and `kube-ipvs0`
//!    addresses ([`render::ipset`]), and tracked connections as `conntrack -L` and
//!    `ipvsadm -lnc` list them; kube-proxy's partial syncs
//!    ([`render::iptables::Syncer`], [`render::nft::Syncer`]).
//!
//! Time comes from the caller ([`Instant`]) and randomness from a seeded
//! generator ([`SeededRng`]): a fixed seed replays a run exactly.
//!
//! ## Quick start
//! ```
//! use svclb::*;
//!
//! let mut table = ServiceTable::new();
//! let web = Service::builder("default", "web")
//!     .cluster_ip("10.96.0.10".parse().unwrap())
//!     .port(ServicePortSpec::tcp(80).name("http").target_port(8080))
//!     .build()?;
//! let slice = EndpointSlice::builder("default", "web-abc12", "web", AddressType::IPv4)
//!     .port(SlicePortSpec::tcp(8080).name("http"))
//!     .endpoint(EndpointSpec::new("10.1.0.5"))
//!     .endpoint(EndpointSpec::new("10.1.0.6"))
//!     .build()?;
//! let changes = table.apply_batch([Change::UpsertService(web), Change::UpsertSlice(slice)])?;
//!
//! let dp = IpvsDataplane::new(DataplaneConfig::with_seed(42));
//! dp.sync(&table, &changes, Instant::ZERO);
//! let flow = Flow::tcp("10.2.0.9:40000".parse()?, "10.96.0.10:80".parse()?);
//! // The connection's first packet is scheduled...
//! let Verdict::Forward(first) = dp.route(&flow, Instant::ZERO) else { panic!() };
//! assert!(!first.tracked);
//! // ...and its later packets follow the tracker, whatever the endpoints do.
//! let next = dp.packet(&flow, TcpFlags::ACK, Instant::from_secs(1));
//! assert_eq!(next.backend(), Some(first.backend));
//! assert!(next.is_tracked());
//! dp.connection_closed(&flow, Instant::from_secs(2));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Around them:
//!
//! - **Kubernetes** ([`k8s`]): Service and EndpointSlice manifests as
//!   `kubectl get -o yaml|json` prints them and as people apply them, watch
//!   streams, bounded input, and the [`k8s::loader`] every program shares
//!   (feature `serde`), conversions
//!   from k8s-openapi (feature `k8s-openapi`), the cluster DNS answers
//!   for headless, ClusterIP and ExternalName services ([`k8s::dns`]), and
//!   kube-proxy's health-check answers ([`k8s::health`]).
//! - **Traces** ([`trace`]): timed connect/packet/close/tick/apply/delete
//!   events, one per line, for replays and simulators.
//! - **eBPF** ([`ebpf`]): the userspace model of the TC program
//!   ([`ebpf::model`], and the `ebpf` mode
//!   [`IpvsDataplane::ebpf_model`]) and, with the `ebpf` feature, its
//!   loader.
//! - **Packets** (`packet`, feature `packet`): raw packets into flows, and
//!   DNAT, SNAT and reverse NAT in place with incremental checksums
//!   (`examples/pcap_replay.rs` replays a capture through it,
//!   `examples/tun.rs` carries real connections through a TUN device).
//!
//! ## Features
//! - `serde` (default): `Serialize`/`Deserialize` on the plain model types,
//!   and the manifest reader [`k8s::manifest`] (serde_json, serde_yaml_ng).
//! - `k8s-openapi`: `TryFrom` k8s-openapi's `Service` and `EndpointSlice`
//!   ([`k8s::openapi`]), so a kube-rs watcher can feed the table.
//! - `ebpf`: [`ebpf::EbpfDataplane`], which loads the TC program
//!   `src/ebpf/svclb.bpf.c` (compiled by `build.rs` with clang) with aya
//!   0.14 and writes its maps. The model of that program,
//!   [`ebpf::model`], needs no feature.
//! - `packet`: `svclb::packet` (etherparse): parsing, NAT rewrites with
//!   incremental checksums, fragments, source ports.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod affinity;
pub mod conntrack;
pub mod dataplane;
pub mod ebpf;
pub mod error;
pub mod k8s;
pub mod model;
#[cfg(feature = "packet")]
pub mod packet;
pub mod plan;
pub mod render;
pub mod rng;
pub mod scheduler;
mod stack_text;
pub mod table;
mod time;
pub mod topology;
pub mod trace;

pub use affinity::{
    AffinityConfig, AffinityEntry, AffinityKey, AffinityReport, AffinityTable,
    EndpointAffinityStats, Hotspot, PortAffinityReport,
};
pub use conntrack::{ConnState, ConntrackConfig, TcpFlags, TcpState, Timeouts, Tracked};
pub use dataplane::{
    Candidates, Dataplane, DataplaneConfig, IptablesDataplane, IptablesReader, IpvsDataplane,
    IpvsReader, Mode, NftablesDataplane, NftablesReader,
};
pub use error::{UpdateError, ValidationError};
pub use model::endpoint_slice::{
    AddressType, Conditions, Endpoint, EndpointAddress, EndpointSlice, EndpointSliceBuilder,
    EndpointSpec, SliceKey, SlicePort, SlicePortSpec,
};
pub use model::flow::{Flow, Forward, FragmentKey, Protocol, Verdict};
pub use model::service::{
    AffinityKeyKind, ClusterIp, IpMode, LoadBalancerIngress, Service, ServiceBuilder, ServiceKey,
    ServicePort, ServicePortSpec, ServiceType, SessionAffinity, TargetPort, TargetPortSpec,
    TrafficDistribution, TrafficPolicy,
};
pub use plan::{BackendId, BackendState, FrontendId, FrontendKey, FrontendKind, Planner};
pub use rng::SeededRng;
pub use scheduler::{Scheduler, SchedulerConfig, SchedulerFactory, SchedulerKind};
pub use table::{
    Change, ChangeNote, ChangeSet, EndpointInfo, ServiceSnapshot, ServiceTable, ServiceView,
    TableSnapshot, TableStats,
};
pub use time::Instant;
pub use topology::NodeTopology;
