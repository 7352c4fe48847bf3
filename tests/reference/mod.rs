//! A naive reference model of svclb, shared by `tests/proptest_invariants.rs`
//! and the `table_ops` fuzz target (`fuzz/fuzz_targets/table_ops.rs` includes
//! this file with `#[path]`).
//!
//! Everything here is written the slow, obvious way, straight from
//! `/work/shared/REFERENCE.md`, and without looking at how the library does
//! it: services and slices in plain `BTreeMap`s, every merge recomputed from
//! all slices, every service found by a linear scan, topology re-derived
//! from the rules in kube-proxy's `topology.go`. The library's incremental
//! merge, hash-table lookups and compiled rule lists are checked against it.
//!
//! The generators (`*Gen`) are small-integer descriptions of inputs drawn
//! from a tiny universe (4 services, 8 slices, 12 hosts, 4 VIPs per family),
//! so that random sequences collide often: VIP conflicts, shared endpoints
//! across slices, slices moving between services, deletes of unknown keys.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use svclb::*;

/// The node every dataplane under test runs on.
pub const NODE: &str = "node-0";
/// The zone of [`NODE`].
pub const ZONE: &str = "zone-0";

/// Number of distinct services, slices and endpoint hosts in the universe.
pub const SERVICES: u8 = 4;
pub const SLICES: u8 = 8;
pub const HOSTS: u8 = 12;
pub const VIPS: u8 = 4;

/// Port names a generated port may carry (index 0 = unnamed).
pub const PORT_NAMES: [&str; 4] = ["", "http", "dns", "metrics"];
/// Port numbers, shared by services and slices so that they collide.
pub const PORT_NUMBERS: [u16; 4] = [80, 53, 443, 8080];
pub const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

pub fn node_topology() -> NodeTopology {
    NodeTopology::new(NODE, ZONE)
}

pub fn vip(v6: bool, i: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            0,
            u16::from(i % VIPS) + 1,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 96, 0, i % VIPS + 1))
    }
}

pub fn host(v6: bool, i: u8) -> String {
    if v6 {
        format!("fd01::{}", i % HOSTS + 1)
    } else {
        format!("10.1.0.{}", i % HOSTS + 1)
    }
}

pub fn service_name(i: u8) -> String {
    format!("svc-{}", i % SERVICES)
}

pub fn slice_name(i: u8) -> String {
    format!("s-{}", i % SLICES)
}

/// Every destination a flow may be sent to: each VIP of both families on
/// each port and protocol of the universe, plus one address that is never a
/// VIP.
pub fn probe_destinations() -> Vec<(Protocol, SocketAddr)> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        for i in 0..=VIPS {
            let ip = if i == VIPS {
                if v6 {
                    "fd00::99".parse().unwrap()
                } else {
                    "10.96.9.9".parse().unwrap()
                }
            } else {
                vip(v6, i)
            };
            for &port in &PORT_NUMBERS {
                for &p in &PROTOCOLS {
                    out.push((p, SocketAddr::new(ip, port)));
                }
            }
        }
    }
    out
}

/// A generated service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGen {
    pub port: u8,
    pub protocol: u8,
    /// 0: no target port; 1..=4: a number from [`PORT_NUMBERS`]; 5..: a name.
    pub target: u8,
}

/// A generated service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcGen {
    pub id: u8,
    /// 0: the service's own VIP (`vip(id)`); other values: another one.
    pub vip: u8,
    /// 0: IPv4, 1: IPv6, 2: dual stack (IPv4 first), 3: headless.
    pub family: u8,
    pub ports: Vec<PortGen>,
    pub local: bool,
    pub affinity: Option<u32>,
}

impl SvcGen {
    pub fn build(&self) -> Result<Service, ValidationError> {
        let mut b = Service::builder("default", service_name(self.id));
        // Each service has its own VIP unless `vip` moves it onto another's.
        let v = (self.id % SERVICES).wrapping_add(self.vip);
        match self.family % 4 {
            0 => b = b.cluster_ip(vip(false, v)),
            1 => b = b.cluster_ip(vip(true, v)),
            2 => b = b.cluster_ip(vip(false, v)).cluster_ip(vip(true, v)),
            _ => b = b.headless(),
        }
        let multi = self.ports.len() > 1;
        for (i, p) in self.ports.iter().enumerate() {
            let mut spec = ServicePortSpec::new(
                PROTOCOLS[usize::from(p.protocol) % 3],
                i64::from(PORT_NUMBERS[usize::from(p.port) % 4]),
            );
            // Single-port services use the unnamed port half of the time.
            if multi || p.port % 2 == 0 {
                spec = spec.name(PORT_NAMES[1 + (i % 3)]);
            }
            spec = match p.target {
                0 => spec,
                t @ 1..=4 => spec.target_port(i64::from(PORT_NUMBERS[usize::from(t - 1)])),
                _ => spec.target_port_name("web"),
            };
            b = b.port(spec);
        }
        if let Some(t) = self.affinity {
            b = b.client_ip_affinity(Some(i64::from(t)));
        }
        if self.local {
            b = b.internal_traffic_policy(TrafficPolicy::Local);
        }
        b.build()
    }
}

/// A generated endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpGen {
    pub host: u8,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node: u8,
    pub zone_hint: Option<u8>,
    pub node_hint: Option<u8>,
    pub weight: Option<u8>,
}

/// A generated slice port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePortGen {
    /// 0, 1: the name a service port in this position gets; 2: unnamed;
    /// 3: another service port's name.
    pub name: u8,
    /// Index into [`PORT_NUMBERS`]; 4 and above: no port number (ignored).
    pub port: u8,
    pub protocol: u8,
}

/// A generated EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceGen {
    pub name: u8,
    pub svc: u8,
    pub v6: bool,
    pub ports: Vec<SlicePortGen>,
    pub endpoints: Vec<EpGen>,
}

impl SliceGen {
    /// Builds the slice; duplicate hosts and duplicate port names are
    /// skipped so that most generated slices are valid.
    pub fn build(&self) -> Result<EndpointSlice, ValidationError> {
        let at = if self.v6 {
            AddressType::IPv6
        } else {
            AddressType::IPv4
        };
        let mut b =
            EndpointSlice::builder("default", slice_name(self.name), service_name(self.svc), at);
        let mut names = Vec::new();
        let multi = self.ports.len() > 1;
        for (j, p) in self.ports.iter().enumerate() {
            // Mostly the names a service's ports get (`SvcGen::build`), so
            // that slice ports usually match a service port.
            let name = match p.name % 4 {
                0 | 1 if multi => PORT_NAMES[1 + j % 3],
                0 | 1 => PORT_NAMES[1],
                2 => PORT_NAMES[0],
                _ => PORT_NAMES[1 + (j + 1) % 3],
            };
            if names.contains(&name) {
                continue;
            }
            names.push(name);
            let number = PORT_NUMBERS
                .get(usize::from(p.port))
                .map_or(0, |n| i64::from(*n));
            let mut spec = SlicePortSpec::new(PROTOCOLS[usize::from(p.protocol) % 3], number);
            if !name.is_empty() {
                spec = spec.name(name);
            }
            b = b.port(spec);
        }
        let mut hosts = Vec::new();
        for e in &self.endpoints {
            let h = e.host % HOSTS;
            if hosts.contains(&h) {
                continue;
            }
            hosts.push(h);
            let mut spec = EndpointSpec::new(host(self.v6, h))
                .node(format!("node-{}", e.node % 3))
                .zone(format!("zone-{}", e.node % 2));
            spec.conditions = Conditions {
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
            };
            if let Some(z) = e.zone_hint {
                spec = spec.hint_zone(format!("zone-{}", z % 2));
            }
            if let Some(n) = e.node_hint {
                spec = spec.hint_node(format!("node-{}", n % 3));
            }
            if let Some(w) = e.weight {
                spec = spec.weight(i64::from(w % 4));
            }
            b = b.endpoint(spec);
        }
        b.build()
    }
}

/// A generated change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeGen {
    UpsertService(SvcGen),
    DeleteService(u8),
    UpsertSlice(SliceGen),
    DeleteSlice(u8),
}

impl ChangeGen {
    /// The change, or `None` when the builder refused the generated object
    /// (a typed [`ValidationError`], which is all the caller checks).
    pub fn build(&self) -> Option<Change> {
        Some(match self {
            ChangeGen::UpsertService(s) => Change::UpsertService(s.build().ok()?),
            ChangeGen::DeleteService(i) => {
                Change::DeleteService(ServiceKey::new("default", service_name(*i)))
            }
            ChangeGen::UpsertSlice(s) => Change::UpsertSlice(s.build().ok()?),
            ChangeGen::DeleteSlice(i) => {
                Change::DeleteSlice(SliceKey::new("default", slice_name(*i)))
            }
        })
    }
}

/// Points three in four generated slice changes at a service (or slice)
/// the model holds, so that most batches apply and most slices land (most
/// of those with the service's own port names, protocols and family); the fourth
/// keeps its random target, which exercises the refusals.
pub fn aim_batch(batch: &[ChangeGen], model: &RefModel) -> Vec<ChangeGen> {
    let services: Vec<u8> = model
        .services
        .keys()
        .filter_map(|k| k.name.strip_prefix("svc-")?.parse().ok())
        .collect();
    let slices: Vec<u8> = model
        .slices
        .keys()
        .filter_map(|k| k.name.strip_prefix("s-")?.parse().ok())
        .collect();
    batch
        .iter()
        .map(|c| match c {
            ChangeGen::UpsertSlice(g) if g.svc % 4 != 3 && !services.is_empty() => {
                let target = services[usize::from(g.svc) % services.len()];
                let mut g = SliceGen {
                    svc: target,
                    ..g.clone()
                };
                // Most of these carry exactly the service's port names and
                // protocols, and its address family (as the EndpointSlice
                // controller writes them).
                let key = ServiceKey::new("default", service_name(target));
                let mirror = g.name % 4 != 3 && g.ports.first().is_none_or(|p| p.name != 3);
                if let (true, Some(svc)) = (mirror, model.services.get(&key)) {
                    if let [ip] = svc.cluster_ip().addrs() {
                        g.v6 = ip.is_ipv6();
                    }
                    let n = svc.ports().len();
                    g.ports = svc
                        .ports()
                        .iter()
                        .enumerate()
                        .map(|(j, sp)| SlicePortGen {
                            name: if n == 1 && sp.name().is_none() { 2 } else { 0 },
                            port: g.ports.get(j).map_or(j as u8 % 4, |p| p.port),
                            protocol: PROTOCOLS
                                .iter()
                                .position(|p| *p == sp.protocol())
                                .unwrap_or(0) as u8,
                        })
                        .collect();
                }
                ChangeGen::UpsertSlice(g)
            }
            ChangeGen::DeleteSlice(i) if i % 4 != 3 && !slices.is_empty() => {
                ChangeGen::DeleteSlice(slices[usize::from(*i) % slices.len()])
            }
            ChangeGen::DeleteService(i) if i % 4 != 3 && !services.is_empty() => {
                ChangeGen::DeleteService(services[usize::from(*i) % services.len()])
            }
            other => other.clone(),
        })
        .collect()
}

/// A flow destination: three in four times one of the service ports the
/// model holds (so that flows meet services with endpoints), else any probe
/// destination (mostly not a service).
pub fn aim_flow(pick: usize, model: &RefModel) -> (Protocol, SocketAddr) {
    let mut live = Vec::new();
    for svc in model.services.values() {
        for ip in svc.cluster_ip().addrs() {
            for p in svc.ports() {
                live.push((p.protocol(), SocketAddr::new(*ip, p.port())));
            }
        }
    }
    if pick % 4 != 3 && !live.is_empty() {
        live[(pick / 4) % live.len()]
    } else {
        let probes = probe_destinations();
        probes[(pick / 4) % probes.len()]
    }
}

/// Every field of an [`EndpointInfo`], comparable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EpFacts {
    pub key: String,
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub hostname: Option<String>,
    pub node: Option<String>,
    pub zone: Option<String>,
    pub hint_zones: Vec<String>,
    pub hint_nodes: Vec<String>,
    pub weight: u16,
}

impl EpFacts {
    pub fn of_info(e: &EndpointInfo) -> Self {
        EpFacts {
            key: e.addr_string(),
            addr: e.addr(),
            ready: e.is_ready(),
            serving: e.is_serving(),
            terminating: e.is_terminating(),
            hostname: e.hostname().map(str::to_owned),
            node: e.node_name().map(str::to_owned),
            zone: e.zone().map(str::to_owned),
            hint_zones: e.hint_zones().to_vec(),
            hint_nodes: e.hint_nodes().to_vec(),
            weight: e.weight(),
        }
    }

    fn of_endpoint(ip: IpAddr, port: u16, e: &Endpoint) -> Self {
        let c = e.conditions();
        let addr = SocketAddr::new(ip, port);
        EpFacts {
            // Written out by hand rather than through the library.
            key: match ip {
                IpAddr::V4(v4) => format!("{v4}:{port}"),
                IpAddr::V6(v6) => format!("[{v6}]:{port}"),
            },
            addr,
            ready: c.ready != Some(false),
            serving: c.serving != Some(false),
            terminating: c.terminating == Some(true),
            hostname: e.hostname().map(str::to_owned),
            node: e.node_name().map(str::to_owned),
            zone: e.zone().map(str::to_owned),
            hint_zones: e.hint_zones().to_vec(),
            hint_nodes: e.hint_nodes().to_vec(),
            weight: e.weight(),
        }
    }
}

/// The naive model: plain maps, everything recomputed on demand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefModel {
    pub services: BTreeMap<ServiceKey, Service>,
    pub slices: BTreeMap<SliceKey, EndpointSlice>,
}

/// Why the reference model refused a change (the kinds of
/// [`UpdateError`] it predicts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefError {
    ConflictingPort,
}

impl RefError {
    pub fn matches(self, e: &UpdateError) -> bool {
        matches!(
            (self, e.root()),
            (
                RefError::ConflictingPort,
                UpdateError::ConflictingPort { .. }
            )
        )
    }
}

fn vips_of(svc: &Service) -> Vec<(IpAddr, Protocol, u16)> {
    let mut out = Vec::new();
    for ip in svc.cluster_ip().addrs() {
        for p in svc.ports() {
            out.push((*ip, p.protocol(), p.port()));
        }
    }
    out
}

impl RefModel {
    /// Applies one change to the model, or says why it is refused.
    fn apply_one(&mut self, change: &Change) -> Result<(), RefError> {
        match change {
            Change::UpsertService(svc) => {
                for vip in vips_of(svc) {
                    let taken = self
                        .services
                        .values()
                        .any(|other| other.key() != svc.key() && vips_of(other).contains(&vip));
                    if taken {
                        return Err(RefError::ConflictingPort);
                    }
                }
                self.services.insert(svc.key().clone(), svc.clone());
            }
            // A delete of an absent object is a no-op; a deleted service's
            // slices stay (pending) until deleted; a slice for an unknown
            // service waits pending. Pending slices merge into nothing
            // because `merged` only reads the slices of present services.
            Change::DeleteService(key) => {
                self.services.remove(key);
            }
            Change::UpsertSlice(slice) => {
                self.slices.insert(slice.key().clone(), slice.clone());
            }
            Change::DeleteSlice(key) => {
                self.slices.remove(key);
            }
        }
        Ok(())
    }

    /// Applies a batch whole or not at all; on refusal, the index of the
    /// first failing change.
    pub fn apply_batch(&mut self, changes: &[Change]) -> Result<(), (usize, RefError)> {
        let mut next = self.clone();
        for (i, c) in changes.iter().enumerate() {
            next.apply_one(c).map_err(|e| (i, e))?;
        }
        *self = next;
        Ok(())
    }

    /// kube-proxy's merge, recomputed from every slice of the service: per
    /// service port, endpoints keyed by `"IP:port"`, a non-terminating copy
    /// winning (then the slice whose name sorts first), sorted as strings.
    pub fn merged(&self, key: &ServiceKey) -> Vec<Vec<EpFacts>> {
        let svc = &self.services[key];
        svc.ports()
            .iter()
            .map(|sp| {
                let mut copies: Vec<(bool, String, EpFacts)> = Vec::new();
                for slice in self.slices.values().filter(|s| s.service() == key) {
                    for p in slice.ports() {
                        let (Some(num), true, true) = (
                            p.port(),
                            p.name() == sp.name().unwrap_or(""),
                            p.protocol() == sp.protocol(),
                        ) else {
                            continue;
                        };
                        for ep in slice.endpoints() {
                            if let EndpointAddress::Ip(ip) = ep.address() {
                                let f = EpFacts::of_endpoint(*ip, num, ep);
                                copies.push((f.terminating, slice.key().name.clone(), f));
                            }
                        }
                    }
                }
                copies.sort_by(|a, b| (&a.2.key, a.0, &a.1).cmp(&(&b.2.key, b.0, &b.1)));
                let mut out: Vec<EpFacts> = Vec::new();
                for (_, _, f) in copies {
                    if out.last().is_none_or(|l| l.key != f.key) {
                        out.push(f);
                    }
                }
                out
            })
            .collect()
    }

    /// The endpoints that take new connections for one VIP and service
    /// port, as `pkg/proxy/topology.go` describes it, then the weight-0
    /// endpoints removed.
    pub fn candidates(&self, protocol: Protocol, dst: SocketAddr) -> Candidates {
        // A linear scan: the naive counterpart of the IPVS hash table and
        // the iptables rule walk.
        for svc in self.services.values() {
            for (pi, sp) in svc.ports().iter().enumerate() {
                for ip in svc.cluster_ip().addrs() {
                    if *ip == dst.ip() && sp.port() == dst.port() && sp.protocol() == protocol {
                        let merged = &self.merged(svc.key())[pi];
                        return select(merged, svc.internal_traffic_policy(), *ip);
                    }
                }
            }
        }
        Candidates::NotAService
    }
}

fn select(merged: &[EpFacts], policy: TrafficPolicy, vip: IpAddr) -> Candidates {
    let eps: Vec<&EpFacts> = merged
        .iter()
        .filter(|e| e.addr.is_ipv4() == vip.is_ipv4())
        .collect();
    let serving_terminating = |e: &&&EpFacts| e.serving && e.terminating;
    let usable: Vec<&EpFacts> = match policy {
        TrafficPolicy::Cluster => {
            let ready: Vec<&EpFacts> = eps.iter().copied().filter(|e| e.ready).collect();
            let node_mode = !ready.is_empty()
                && ready.iter().all(|e| !e.hint_nodes.is_empty())
                && ready.iter().any(|e| e.hint_nodes.iter().any(|h| h == NODE));
            let zone_mode = !ready.is_empty()
                && ready.iter().all(|e| !e.hint_zones.is_empty())
                && ready.iter().any(|e| e.hint_zones.iter().any(|h| h == ZONE));
            let narrowed: Vec<&EpFacts> = if node_mode {
                ready
                    .into_iter()
                    .filter(|e| e.hint_nodes.iter().any(|h| h == NODE))
                    .collect()
            } else if zone_mode {
                ready
                    .into_iter()
                    .filter(|e| e.hint_zones.iter().any(|h| h == ZONE))
                    .collect()
            } else {
                ready
            };
            if narrowed.is_empty() {
                eps.iter().filter(serving_terminating).copied().collect()
            } else {
                narrowed
            }
        }
        TrafficPolicy::Local => {
            let local: Vec<&EpFacts> = eps
                .iter()
                .copied()
                .filter(|e| e.node.as_deref() == Some(NODE))
                .collect();
            let ready: Vec<&EpFacts> = local.iter().copied().filter(|e| e.ready).collect();
            let usable = if ready.is_empty() {
                local.iter().filter(serving_terminating).copied().collect()
            } else {
                ready
            };
            if usable.is_empty() {
                return if eps.iter().any(|e| e.ready || (e.serving && e.terminating)) {
                    Candidates::Drop
                } else {
                    Candidates::Reject
                };
            }
            usable
        }
    };
    let addrs: Vec<SocketAddr> = usable
        .iter()
        .filter(|e| e.weight > 0)
        .map(|e| e.addr)
        .collect();
    if addrs.is_empty() {
        Candidates::Reject
    } else {
        Candidates::Endpoints(addrs)
    }
}

/// The snapshot's merged endpoints of every service, as comparable facts.
pub fn table_merged(table: &ServiceTable) -> BTreeMap<ServiceKey, Vec<Vec<EpFacts>>> {
    table
        .snapshot()
        .services
        .into_iter()
        .map(|(k, s)| {
            let ports = s
                .ports
                .iter()
                .map(|p| p.iter().map(EpFacts::of_info).collect())
                .collect();
            (k, ports)
        })
        .collect()
}

/// The model's merged endpoints of every service.
pub fn model_merged(model: &RefModel) -> BTreeMap<ServiceKey, Vec<Vec<EpFacts>>> {
    model
        .services
        .keys()
        .map(|k| (k.clone(), model.merged(k)))
        .collect()
}

/// Whether the routes of one dataplane are consistent with the candidates
/// the reference model computed. `sh` without a fallback may reject a
/// source whose bucket holds a weight-0 destination, as IPVS does.
pub fn verdict_ok(expected: &Candidates, v: Verdict, sh_may_reject: bool) -> bool {
    match (expected, v) {
        (Candidates::Endpoints(eps), Verdict::Forward(svclb::Forward { backend: b, .. })) => {
            eps.contains(&b)
        }
        (Candidates::Endpoints(_), Verdict::Reject) => sh_may_reject,
        (Candidates::Reject, Verdict::Reject)
        | (Candidates::Drop, Verdict::Drop)
        | (Candidates::NotAService, Verdict::NotAService) => true,
        _ => false,
    }
}

/// The dataplanes every check runs: iptables mode, nftables mode, and IPVS
/// mode with the given scheduler.
pub fn dataplanes(seed: u64, scheduler: SchedulerKind) -> Vec<Box<dyn Dataplane>> {
    let config = DataplaneConfig::with_seed(seed)
        .conntrack(None)
        .node(node_topology());
    vec![
        Box::new(IptablesDataplane::new(config.clone())),
        Box::new(NftablesDataplane::new(config.clone())),
        Box::new(IpvsDataplane::new(config.scheduler(scheduler))),
    ]
}

/// A check failure, described.
pub type Failure = String;

/// Applies one generated batch to the table, the model and the dataplanes,
/// then checks every invariant. Returns a description of the first
/// violation.
pub fn step_batch(
    table: &mut ServiceTable,
    model: &mut RefModel,
    dps: &[Box<dyn Dataplane>],
    batch: &[ChangeGen],
) -> Result<(), Failure> {
    let changes: Vec<Change> = aim_batch(batch, model)
        .iter()
        .filter_map(ChangeGen::build)
        .collect();
    let before = table.snapshot();
    let generation = table.generation();
    let expected = model.apply_batch(&changes);
    match (table.apply_batch(changes.clone()), expected) {
        (Ok(cs), Ok(())) => {
            if cs.generation != table.generation() || generation + 1 != cs.generation {
                return Err(format!("generation {generation} -> {}", cs.generation));
            }
            for dp in dps {
                dp.sync(table, &cs, Instant::ZERO);
            }
        }
        (Err(e), Err((index, kind))) => {
            let got_index = match &e {
                UpdateError::InBatch { index, .. } => *index,
                _ => 0,
            };
            if got_index != index || !kind.matches(&e) {
                return Err(format!(
                    "table refused with {e:?}, model expected {kind:?} at {index}"
                ));
            }
            if table.snapshot() != before || table.generation() != generation {
                return Err(format!("refused batch changed the table: {e}"));
            }
        }
        (got, want) => {
            return Err(format!(
                "table gave {got:?}, model expected {want:?} for {changes:#?}"
            ));
        }
    }
    let got = table_merged(table);
    let want = model_merged(model);
    if got != want {
        return Err(format!(
            "merged endpoints differ:\n table {got:#?}\n model {want:#?}"
        ));
    }
    // Slices whose service is absent wait pending, in the table as in the
    // model.
    let pending: Vec<&EndpointSlice> = model
        .slices
        .values()
        .filter(|s| !model.services.contains_key(s.service()))
        .collect();
    let snapshot = table.snapshot();
    let got: Vec<&EndpointSlice> = snapshot.pending.values().collect();
    if got != pending {
        return Err(format!(
            "pending slices differ:\n table {got:#?}\n model {pending:#?}"
        ));
    }
    check_dataplanes(model, dps)
}

/// Every dataplane agrees with the model on every probe destination.
pub fn check_dataplanes(model: &RefModel, dps: &[Box<dyn Dataplane>]) -> Result<(), Failure> {
    for (protocol, dst) in probe_destinations() {
        let want = model.candidates(protocol, dst);
        for dp in dps {
            let got = dp.candidates(protocol, dst);
            if got != want {
                return Err(format!(
                    "{} candidates for {protocol} {dst}: {got:?}, model {want:?}",
                    dp.mode()
                ));
            }
        }
    }
    Ok(())
}

/// Routes one flow through every dataplane and checks the verdict against
/// the model. Forwarded connections are closed again when `close` is set.
pub fn step_flow(
    model: &RefModel,
    dps: &[Box<dyn Dataplane>],
    sh: bool,
    flow: &Flow,
    now: Instant,
    close: bool,
) -> Result<(), Failure> {
    let want = model.candidates(flow.protocol, flow.dst);
    for dp in dps {
        let v = dp.route(flow, now);
        let sh_may_reject = sh && dp.mode() == svclb::Mode::Ipvs && has_weight_zero(model, flow);
        if !verdict_ok(&want, v, sh_may_reject) {
            return Err(format!(
                "{} routed {flow} to {v}, model candidates {want:?}",
                dp.mode()
            ));
        }
        if let (true, Verdict::Forward(_)) = (close, v) {
            dp.connection_closed(flow, now);
        }
    }
    Ok(())
}

fn has_weight_zero(model: &RefModel, flow: &Flow) -> bool {
    model.services.values().any(|s| {
        s.cluster_ip().addrs().contains(&flow.dst.ip())
            && model
                .merged(s.key())
                .iter()
                .flatten()
                .any(|e| e.weight == 0)
    })
}
