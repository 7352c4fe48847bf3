//! kube-proxy's IPVS mode as a data structure.
//!
//! Virtual services live in a hash table keyed by (VIP, protocol, port), as
//! the kernel's `ip_vs_svc_table` does: a lookup costs the same at 10 or
//! 100,000 services. Each virtual service holds its destinations and a
//! scheduler built for them.
//!
//! Publication is two-level. The table itself is an immutable map swapped
//! whole only when a service's set of virtual services changes (a service
//! added or deleted, a port or cluster IP changed). An endpoint change swaps
//! only the changed virtual service's state, in its own slot: its cost does
//! not depend on how many other services exist. Readers load both pointers
//! without a lock; a writer holds a mutex that readers never take.
//!
//! Destinations keep their connection counters across rebuilds (matched by
//! address), as IPVS keeps `ip_vs_dest` when a real server stays.
//!
//! `ClientIP` session affinity is IPVS persistence as kube-proxy sets it up
//! (the service's timeout, a full netmask, `expire_quiescent_template=1`):
//! a template per client in the [`AffinityTable`], whose timer restarts with
//! every new connection scheduled through it, dropped as soon as its
//! destination is gone or has weight 0.

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ahash::AHashMap;
use arc_swap::ArcSwap;
use arc_swap::cache::Cache;
use parking_lot::Mutex;
use smallvec::SmallVec;

use super::{Candidates, Dataplane, DataplaneConfig};
use crate::affinity::{AffinityEntry, AffinityPort, AffinityReport, AffinityTable, ScopeRegistry};
use crate::model::flow::{Flow, Protocol, Verdict};
use crate::model::service::{ServiceKey, SessionAffinity};
use crate::rng::SeededRng;
use crate::scheduler::{Destination, PickContext, Selector};
use crate::table::{ChangeSet, ServiceTable, ServiceView, endpoint_order};
use crate::time::Instant;
use crate::topology::{SelectionRef, categorize_port};

/// The kernel's virtual-service key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VsKey {
    addr: IpAddr,
    port: u16,
    protocol: Protocol,
}

impl Hash for VsKey {
    /// One word for an IPv4 key (address, port and protocol packed), so the
    /// hasher runs one round instead of one per field and enum tag. Equal
    /// keys hash equally; an IPv4 and an IPv6 key never compare equal.
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        let tail = u64::from(self.port) << 8 | self.protocol as u64;
        match self.addr {
            IpAddr::V4(v4) => state.write_u64(u64::from(u32::from(v4)) << 24 | tail),
            IpAddr::V6(v6) => {
                state.write_u128(u128::from(v6));
                state.write_u64(tail);
            }
        }
    }
}

/// What a virtual service does with a new connection.
#[derive(Debug)]
enum VsState {
    Forward {
        dests: Box<[Destination]>,
        selector: Selector,
        count: bool,
        /// Persistence, for `ClientIP` services (boxed: it is large, and a
        /// lookup without affinity should touch as few cache lines as
        /// possible).
        affinity: Option<Box<AffinityPort>>,
    },
    Reject,
    Drop,
}

/// The virtual services. Each map value is the slot of one virtual
/// service, held in the map itself (no further pointer to follow): an
/// endpoint change swaps the state in its slot.
#[derive(Debug, Default)]
struct VsTable {
    by_key: AHashMap<VsKey, ArcSwap<VsState>>,
    by_service: AHashMap<ServiceKey, SmallVec<[VsKey; 2]>>,
}

impl Clone for VsTable {
    /// A copy with its own slots, pointing at the same states. Only the
    /// writer clones (to add or remove virtual services) and then publishes
    /// the copy; later swaps go to the copy's slots.
    fn clone(&self) -> Self {
        VsTable {
            by_key: self
                .by_key
                .iter()
                .map(|(k, slot)| (*k, ArcSwap::new(slot.load_full())))
                .collect(),
            by_service: self.by_service.clone(),
        }
    }
}

/// One virtual service as [`IpvsDataplane::virtual_services`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServiceInfo {
    /// The service it belongs to.
    pub service: ServiceKey,
    /// The virtual address (a cluster IP).
    pub addr: IpAddr,
    /// The protocol.
    pub protocol: Protocol,
    /// The virtual port.
    pub port: u16,
    /// The scheduler's name (`rr`, `wlc`, ...).
    pub scheduler: String,
    /// The real servers, by address and port.
    pub destinations: Vec<RealServerInfo>,
}

/// One real server of a [`VirtualServiceInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealServerInfo {
    /// The backend `IP:port`.
    pub addr: SocketAddr,
    /// Its weight (0 = no new connections).
    pub weight: u32,
    /// Active connections (counted when the scheduler needs them or
    /// [`DataplaneConfig::count_connections`] is set).
    pub active_conns: u32,
    /// Inactive connections, as the caller reported them.
    pub inactive_conns: u32,
}

/// The IP protocol number (TCP 6, UDP 17, SCTP 132), `ipvsadm`'s sort key.
fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// The IPVS-mode dataplane. See the module docs.
#[derive(Debug)]
pub struct IpvsDataplane {
    config: DataplaneConfig,
    rng: SeededRng,
    table: ArcSwap<VsTable>,
    affinity: AffinityTable,
    /// Affinity scopes by virtual service; locked by sync and inspection.
    scopes: Mutex<ScopeRegistry>,
    writer: Mutex<()>,
}

/// Finds, for each new destination, the old destination with the same
/// address (to keep its connection counters). Both lists are in merged
/// endpoint order ([`endpoint_order`]): a merge walk finds every match with
/// no hashing, comparing keys only where the lists differ. Past
/// [`Self::MAX_MISMATCHES`] differences (a wholesale change) it switches to
/// a hash map of the old destinations.
struct CounterReuse<'a> {
    old: &'a [Destination],
    next: usize,
    mismatches: usize,
    index: Option<AHashMap<SocketAddr, &'a Destination>>,
}

impl<'a> CounterReuse<'a> {
    const MAX_MISMATCHES: usize = 16;

    fn new(old: &'a [Destination]) -> Self {
        CounterReuse {
            old,
            next: 0,
            mismatches: 0,
            index: None,
        }
    }

    fn find(&mut self, addr: SocketAddr) -> Option<&'a Destination> {
        if let Some(index) = &self.index {
            return index.get(&addr).copied();
        }
        while let Some(d) = self.old.get(self.next) {
            if d.addr() == addr {
                self.next += 1;
                return Some(d);
            }
            self.mismatches += 1;
            if self.mismatches > Self::MAX_MISMATCHES {
                let index: AHashMap<SocketAddr, &'a Destination> =
                    self.old.iter().map(|d| (d.addr(), d)).collect();
                let found = index.get(&addr).copied();
                self.index = Some(index);
                return found;
            }
            match endpoint_order(d.addr(), addr) {
                // `d` is gone from the new list: step over it.
                Ordering::Less => self.next += 1,
                // `addr` is new: it sorts before every remaining old one.
                _ => return None,
            }
        }
        None
    }
}

/// A per-thread reader of an [`IpvsDataplane`]: see
/// [`IpvsDataplane::reader`].
#[derive(Debug)]
pub struct IpvsReader<'a> {
    dataplane: &'a IpvsDataplane,
    table: Cache<&'a ArcSwap<VsTable>, Arc<VsTable>>,
}

impl IpvsReader<'_> {
    /// Decides a new flow, as [`Dataplane::route`] does.
    #[inline]
    pub fn route(&mut self, flow: &Flow, now: Instant) -> Verdict {
        self.route_with_key(flow, None, now)
    }

    /// [`route`](Self::route) with a caller-supplied affinity key, as
    /// [`Dataplane::route_with_key`] does.
    #[inline]
    pub fn route_with_key(&mut self, flow: &Flow, key: Option<u64>, now: Instant) -> Verdict {
        let table = self.table.load();
        let vk = VsKey {
            addr: flow.dst.ip(),
            port: flow.dst.port(),
            protocol: flow.protocol,
        };
        match table.by_key.get(&vk) {
            None => self.dataplane.decide(None, flow, key, now),
            Some(slot) => self.dataplane.decide(Some(&slot.load()), flow, key, now),
        }
    }
}

fn vs_keys(view: &ServiceView) -> SmallVec<[VsKey; 2]> {
    let svc = view.service();
    let mut keys = SmallVec::new();
    for &addr in svc.cluster_ip().addrs() {
        for p in view.ports() {
            keys.push(VsKey {
                addr,
                port: p.port().port(),
                protocol: p.port().protocol(),
            });
        }
    }
    keys
}

impl IpvsDataplane {
    /// An empty dataplane (every flow is not-a-service until a sync).
    pub fn new(config: DataplaneConfig) -> Self {
        IpvsDataplane {
            rng: SeededRng::new(config.seed),
            affinity: AffinityTable::new(config.affinity.clone(), config.seed),
            config,
            table: ArcSwap::from_pointee(VsTable::default()),
            scopes: Mutex::new(ScopeRegistry::default()),
            writer: Mutex::new(()),
        }
    }

    /// The session-affinity table (the persistence templates).
    pub fn affinity_table(&self) -> &AffinityTable {
        &self.affinity
    }

    /// The config.
    pub fn config(&self) -> &DataplaneConfig {
        &self.config
    }

    /// The number of virtual services.
    pub fn virtual_service_count(&self) -> usize {
        self.table.load().by_key.len()
    }

    /// Every virtual service with its destinations and live counters, as
    /// `ipvsadm -ln` lists them: sorted by address family, protocol number,
    /// address and port; destinations by address and port. A read-only
    /// snapshot for inspection; it allocates.
    ///
    /// A service port that rejects or drops (no usable endpoint) is listed
    /// with no real servers, as kube-proxy's IPVS mode leaves it.
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
    /// dp.route(&flow, Instant::ZERO);
    /// let vs = dp.virtual_services();
    /// assert_eq!(vs[0].scheduler, "rr");
    /// assert_eq!(vs[0].destinations[0].addr, "10.0.0.2:8080".parse().unwrap());
    /// ```
    pub fn virtual_services(&self) -> Vec<VirtualServiceInfo> {
        let table = self.table.load();
        let mut out = Vec::with_capacity(table.by_key.len());
        for (service, keys) in &table.by_service {
            for key in keys {
                let Some(slot) = table.by_key.get(key) else {
                    continue;
                };
                let state = slot.load();
                let mut destinations: Vec<RealServerInfo> = match &**state {
                    VsState::Forward { dests, .. } => dests
                        .iter()
                        .map(|d| RealServerInfo {
                            addr: d.addr(),
                            weight: d.weight(),
                            active_conns: d.active(),
                            inactive_conns: d.inactive(),
                        })
                        .collect(),
                    VsState::Reject | VsState::Drop => Vec::new(),
                };
                destinations.sort_by_key(|d| (d.addr.ip(), d.addr.port()));
                out.push(VirtualServiceInfo {
                    service: service.clone(),
                    addr: key.addr,
                    protocol: key.protocol,
                    port: key.port,
                    scheduler: self.config.scheduler.name().to_owned(),
                    destinations,
                });
            }
        }
        out.sort_by_key(|v| {
            (
                v.addr.is_ipv6(),
                protocol_number(v.protocol),
                v.addr,
                v.port,
            )
        });
        out
    }

    /// Builds the state of each virtual service of `view`, in `vs_keys`
    /// order, reusing connection counters from `old` states, and binds the
    /// service's affinity scopes.
    fn build_states(
        &self,
        view: &ServiceView,
        old: &[Option<Arc<VsState>>],
        scopes: &mut ScopeRegistry,
    ) -> Vec<VsState> {
        let svc = view.service();
        let counted =
            self.config.count_connections || self.config.scheduler.may_use_connection_counts();
        let mut out = Vec::new();
        let mut bound: SmallVec<[crate::affinity::VsId; 4]> = SmallVec::new();
        let mut k = 0;
        for &addr in svc.cluster_ip().addrs() {
            for pv in view.ports() {
                let vs = (
                    pv.port().protocol(),
                    SocketAddr::new(addr, pv.port().port()),
                );
                let previous = old.get(k).and_then(Option::as_ref);
                k += 1;
                let selection = categorize_port(
                    pv,
                    svc.internal_traffic_policy(),
                    &self.config.node,
                    Some(addr),
                );
                out.push(match selection {
                    SelectionRef::Usable(eps) => {
                        let dests: Box<[Destination]> = if counted {
                            let old_dests: &[Destination] = match previous.map(|a| &**a) {
                                Some(VsState::Forward { dests, .. }) => dests,
                                _ => &[],
                            };
                            let mut counters = CounterReuse::new(old_dests);
                            eps.iter()
                                .map(|e| {
                                    let w = u32::from(e.weight());
                                    match counters.find(e.addr()).and_then(Destination::conns) {
                                        Some(c) => {
                                            Destination::with_counters(e.addr(), w, c.clone())
                                        }
                                        None => Destination::new(e.addr(), w),
                                    }
                                })
                                .collect()
                        } else {
                            // Nothing reads the counts: no counters to keep
                            // or allocate.
                            eps.iter()
                                .map(|e| Destination::uncounted(e.addr(), u32::from(e.weight())))
                                .collect()
                        };
                        let selector = self.config.scheduler.build(&dests);
                        let count =
                            self.config.count_connections || selector.uses_connection_counts();
                        // Only a ClientIP service needs the addresses (a
                        // service without affinity binds no scope).
                        let addrs: Vec<SocketAddr> = match svc.session_affinity() {
                            SessionAffinity::ClientIp { .. } => {
                                dests.iter().map(Destination::addr).collect()
                            }
                            SessionAffinity::None => Vec::new(),
                        };
                        // A weight-0 destination takes no new connections:
                        // its templates expire (expire_quiescent_template).
                        let affinity =
                            scopes.bind(&self.affinity, svc, vs, &addrs, |i| dests[i].weight() > 0);
                        if affinity.is_some() {
                            bound.push(vs);
                        }
                        VsState::Forward {
                            dests,
                            selector,
                            count,
                            affinity: affinity.map(Box::new),
                        }
                    }
                    sel => {
                        // No destinations: every template goes.
                        if scopes
                            .bind(&self.affinity, svc, vs, &[], |_| true)
                            .is_some()
                        {
                            bound.push(vs);
                        }
                        match sel {
                            SelectionRef::NoLocalEndpoints => VsState::Drop,
                            _ => VsState::Reject,
                        }
                    }
                });
            }
        }
        scopes.finish_service(&self.affinity, svc.key(), &bound);
        out
    }

    #[inline]
    fn lookup<R>(
        &self,
        protocol: Protocol,
        dst: SocketAddr,
        f: impl FnOnce(Option<&VsState>) -> R,
    ) -> R {
        let table = self.table.load();
        let key = VsKey {
            addr: dst.ip(),
            port: dst.port(),
            protocol,
        };
        match table.by_key.get(&key) {
            None => f(None),
            Some(slot) => {
                let state = slot.load();
                f(Some(&state))
            }
        }
    }

    /// What `route` decides for a flow whose virtual service is `state`.
    #[inline]
    fn decide(
        &self,
        state: Option<&VsState>,
        flow: &Flow,
        key: Option<u64>,
        now: Instant,
    ) -> Verdict {
        match state {
            None => Verdict::NotAService,
            Some(VsState::Reject) => Verdict::Reject,
            Some(VsState::Drop) => Verdict::Drop,
            Some(VsState::Forward {
                dests,
                selector,
                count,
                affinity,
            }) => {
                let ctx = PickContext {
                    flow,
                    now,
                    rng: &self.rng,
                };
                let picked = match affinity {
                    None => selector.pick(dests, &ctx),
                    Some(aff) => {
                        let pinned = self.affinity.route(
                            &aff.scope,
                            aff.key(flow, key),
                            now,
                            |ep| aff.position(ep),
                            || selector.pick(dests, &ctx).map(|i| (i, dests[i].addr())),
                        );
                        pinned.map(|p| {
                            aff.count(p.index);
                            p.index
                        })
                    }
                };
                match picked {
                    Some(i) => {
                        let d = &dests[i];
                        if *count {
                            if let Some(c) = d.conns() {
                                c.connect();
                            }
                        }
                        Verdict::Forward(d.addr())
                    }
                    None => Verdict::Reject,
                }
            }
        }
    }

    /// A reader for one thread: routes like [`Dataplane::route`], but keeps
    /// the virtual-service table it last saw and only checks, with one
    /// atomic load, that it is still the current one (an
    /// [`arc_swap::cache::Cache`]). That saves the table's guarded load on
    /// every packet; the state of the virtual service is still loaded
    /// afresh, so endpoint changes show at once.
    ///
    /// A reader keeps the table it last saw alive until its next `route`
    /// or its drop: keep one per packet thread, not one per idle
    /// connection.
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
    /// let mut reader = dp.reader();
    /// let flow = Flow::tcp("10.1.0.9:40000".parse().unwrap(), "10.96.0.10:80".parse().unwrap());
    /// assert_eq!(reader.route(&flow, Instant::ZERO), Verdict::Forward("10.0.0.2:8080".parse().unwrap()));
    /// ```
    pub fn reader(&self) -> IpvsReader<'_> {
        IpvsReader {
            dataplane: self,
            table: Cache::new(&self.table),
        }
    }
}

impl Dataplane for IpvsDataplane {
    fn mode(&self) -> &'static str {
        "ipvs"
    }

    fn sync(&self, table: &ServiceTable, changes: &ChangeSet) {
        let _w = self.writer.lock();
        let mut scopes = self.scopes.lock();
        let scopes = &mut *scopes;
        let current = self.table.load_full();
        let mut next: Option<VsTable> = None;
        if changes.full {
            let mut fresh = VsTable::default();
            // Keep counters of services that survive a full resync.
            let mut keys = table.keys_sorted();
            keys.retain(|k| table.view(k).is_some_and(|v| !v.service().is_headless()));
            for key in keys {
                let view = table.view(&key).expect("listed");
                let vks = vs_keys(view);
                let old: Vec<_> = vks
                    .iter()
                    .map(|k| current.by_key.get(k).map(|slot| slot.load_full()))
                    .collect();
                for (vk, st) in vks.iter().zip(self.build_states(view, &old, scopes)) {
                    fresh.by_key.insert(*vk, ArcSwap::from_pointee(st));
                }
                fresh.by_service.insert(key, vks);
            }
            scopes.retain_services(&self.affinity, |k| fresh.by_service.contains_key(k));
            self.table.store(Arc::new(fresh));
            return;
        }
        // First take down every virtual service whose owner lost it, then
        // add: within one change set a VIP:port:protocol can move from one
        // service to another, and the order of `updated` must not decide
        // which of the two ends up deleting it. The states taken down are
        // kept so that a service that keeps some of its virtual services
        // keeps their connection counters.
        for key in &changes.removed {
            scopes.remove_service(&self.affinity, key);
        }
        let mut taken_down: AHashMap<VsKey, (&ServiceKey, Arc<VsState>)> = AHashMap::new();
        for key in changes.removed.iter().chain(&changes.updated) {
            let Some(existing) = current.by_service.get(key) else {
                continue;
            };
            let wanted = table
                .view(key)
                .filter(|v| !v.service().is_headless())
                .map(|v| vs_keys(v));
            if wanted.as_ref() == Some(existing) {
                continue;
            }
            let t = next.get_or_insert_with(|| (*current).clone());
            if let Some(vks) = t.by_service.remove(key) {
                for vk in vks {
                    if let Some(slot) = t.by_key.remove(&vk) {
                        taken_down.insert(vk, (key, slot.into_inner()));
                    }
                }
            }
        }
        for key in &changes.updated {
            let Some(view) = table.view(key).filter(|v| !v.service().is_headless()) else {
                // Gone or headless now: so are its affinity scopes.
                scopes.remove_service(&self.affinity, key);
                continue;
            };
            let vks = vs_keys(view);
            let existing = next
                .as_ref()
                .map_or(&current.by_service, |t| &t.by_service)
                .get(key)
                .cloned();
            let by_key = next.as_ref().map_or(&current.by_key, |t| &t.by_key);
            let old: Vec<_> = vks
                .iter()
                .map(|k| match by_key.get(k) {
                    Some(slot) => Some(slot.load_full()),
                    None => taken_down
                        .get(k)
                        .filter(|(owner, _)| *owner == key)
                        .map(|(_, st)| st.clone()),
                })
                .collect();
            let states = self.build_states(view, &old, scopes);
            if existing.as_ref() == Some(&vks) {
                // Same virtual services: swap each one's state in place.
                for (vk, st) in vks.iter().zip(states) {
                    by_key[vk].store(Arc::new(st));
                }
            } else {
                let t = next.get_or_insert_with(|| (*current).clone());
                if let Some(old_vks) = t.by_service.remove(key) {
                    for vk in old_vks {
                        t.by_key.remove(&vk);
                    }
                }
                for (vk, st) in vks.iter().zip(states) {
                    t.by_key.insert(*vk, ArcSwap::from_pointee(st));
                }
                t.by_service.insert(key.clone(), vks);
            }
        }
        if let Some(t) = next {
            self.table.store(Arc::new(t));
        }
    }

    #[inline]
    fn route(&self, flow: &Flow, now: Instant) -> Verdict {
        self.route_with_key(flow, None, now)
    }

    #[inline]
    fn route_with_key(&self, flow: &Flow, key: Option<u64>, now: Instant) -> Verdict {
        self.lookup(flow.protocol, flow.dst, |state| {
            self.decide(state, flow, key, now)
        })
    }

    fn connection_closed(&self, flow: &Flow, backend: SocketAddr, _now: Instant) {
        self.lookup(flow.protocol, flow.dst, |state| {
            if let Some(VsState::Forward {
                dests, count: true, ..
            }) = state
            {
                if let Some(c) = dests
                    .iter()
                    .find(|d| d.addr() == backend)
                    .and_then(Destination::conns)
                {
                    c.close();
                }
            }
        });
    }

    fn candidates(&self, protocol: Protocol, dst: SocketAddr) -> Candidates {
        self.lookup(protocol, dst, |state| match state {
            None => Candidates::NotAService,
            Some(VsState::Reject) => Candidates::Reject,
            Some(VsState::Drop) => Candidates::Drop,
            Some(VsState::Forward { dests, .. }) => {
                let eligible: Vec<SocketAddr> = dests
                    .iter()
                    .filter(|d| d.weight() > 0)
                    .map(Destination::addr)
                    .collect();
                // Only weight-0 destinations: every new connection is
                // rejected, as `route` does.
                if eligible.is_empty() {
                    Candidates::Reject
                } else {
                    Candidates::Endpoints(eligible)
                }
            }
        })
    }

    fn affinity_entries(&self, service: &ServiceKey, now: Instant) -> Vec<AffinityEntry> {
        self.scopes.lock().entries(&self.affinity, service, now)
    }

    fn affinity_report(&self, service: &ServiceKey, now: Instant) -> Option<AffinityReport> {
        self.scopes.lock().report(&self.affinity, service, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::endpoint_slice::{AddressType, EndpointSlice, EndpointSpec, SlicePortSpec};
    use crate::model::service::{Service, ServicePortSpec};
    use crate::scheduler::SchedulerKind;
    use crate::table::Change;

    fn service(name: &str, vip: &str) -> Service {
        Service::builder("default", name)
            .cluster_ip(vip.parse().unwrap())
            .port(ServicePortSpec::tcp(80).target_port(8080))
            .build()
            .unwrap()
    }

    fn slice(svc: &str, ips: &[&str]) -> EndpointSlice {
        EndpointSlice::builder("default", format!("{svc}-1"), svc, AddressType::IPv4)
            .port(SlicePortSpec::tcp(8080))
            .endpoints(ips.iter().map(|ip| EndpointSpec::new(*ip)))
            .build()
            .unwrap()
    }

    fn counters_of(dp: &IpvsDataplane) -> Vec<bool> {
        let table = dp.table.load();
        let slot = table.by_key.values().next().unwrap().load();
        match &**slot {
            VsState::Forward { dests, .. } => dests.iter().map(|d| d.conns().is_some()).collect(),
            _ => panic!("a forwarding service"),
        }
    }

    /// Destinations carry counters only when something reads them: lc/wlc,
    /// a custom scheduler, or `count_connections`. With them, `rr` counts
    /// and keeps the counts across an endpoint change.
    #[test]
    fn counters_only_where_read() {
        let mut t = ServiceTable::new();
        let cs = t
            .apply_batch([
                Change::UpsertService(service("web", "10.96.0.1")),
                Change::UpsertSlice(slice("web", &["10.1.0.1", "10.1.0.2"])),
            ])
            .unwrap();
        let flow = Flow::tcp(
            "10.2.0.1:4000".parse().unwrap(),
            "10.96.0.1:80".parse().unwrap(),
        );

        let rr = IpvsDataplane::new(DataplaneConfig::with_seed(3));
        rr.sync(&t, &cs);
        assert_eq!(counters_of(&rr), [false, false]);
        rr.route(&flow, Instant::ZERO);
        assert!(
            rr.virtual_services()[0]
                .destinations
                .iter()
                .all(|d| d.active_conns == 0)
        );

        let mut config = DataplaneConfig::with_seed(3);
        config.count_connections = true;
        let counting = IpvsDataplane::new(config);
        counting.sync(&t, &cs);
        assert_eq!(counters_of(&counting), [true, true]);
        let Verdict::Forward(first) = counting.route(&flow, Instant::ZERO) else {
            panic!("forwards")
        };
        let cs = t
            .apply(Change::UpsertSlice(slice(
                "web",
                &["10.1.0.1", "10.1.0.2", "10.1.0.3"],
            )))
            .unwrap();
        counting.sync(&t, &cs);
        let vs = counting.virtual_services();
        let active = |a: SocketAddr| {
            vs[0]
                .destinations
                .iter()
                .find(|d| d.addr == a)
                .unwrap()
                .active_conns
        };
        assert_eq!(active(first), 1, "the count survives the rebuild");
        assert_eq!(active("10.1.0.3:8080".parse().unwrap()), 0);

        let mut config = DataplaneConfig::with_seed(3);
        config.scheduler = SchedulerKind::LeastConnection.into();
        let lc = IpvsDataplane::new(config);
        lc.sync(&t, &cs);
        assert_eq!(counters_of(&lc), [true, true, true]);
    }

    /// A reader made before any sync sees every later change: new services
    /// (a new table), endpoint changes (a swapped slot) and deletions.
    #[test]
    fn reader_follows_every_kind_of_change() {
        let dp = IpvsDataplane::new(DataplaneConfig::with_seed(3));
        let mut reader = dp.reader();
        let web = Flow::tcp(
            "10.2.0.1:4000".parse().unwrap(),
            "10.96.0.1:80".parse().unwrap(),
        );
        let api = Flow::tcp(
            "10.2.0.1:4000".parse().unwrap(),
            "10.96.0.2:80".parse().unwrap(),
        );
        assert_eq!(reader.route(&web, Instant::ZERO), Verdict::NotAService);
        let mut t = ServiceTable::new();
        let cs = t
            .apply_batch([
                Change::UpsertService(service("web", "10.96.0.1")),
                Change::UpsertSlice(slice("web", &["10.1.0.1"])),
            ])
            .unwrap();
        dp.sync(&t, &cs);
        let one: SocketAddr = "10.1.0.1:8080".parse().unwrap();
        assert_eq!(reader.route(&web, Instant::ZERO), Verdict::Forward(one));
        let cs = t
            .apply(Change::UpsertSlice(slice("web", &["10.1.0.9"])))
            .unwrap();
        dp.sync(&t, &cs);
        let nine: SocketAddr = "10.1.0.9:8080".parse().unwrap();
        assert_eq!(reader.route(&web, Instant::ZERO), Verdict::Forward(nine));
        let cs = t
            .apply(Change::UpsertService(service("api", "10.96.0.2")))
            .unwrap();
        dp.sync(&t, &cs);
        assert_eq!(reader.route(&api, Instant::ZERO), Verdict::Reject);
        assert_eq!(reader.route(&web, Instant::ZERO), Verdict::Forward(nine));
        let cs = t
            .apply(Change::DeleteService(ServiceKey::new("default", "web")))
            .unwrap();
        dp.sync(&t, &cs);
        assert_eq!(reader.route(&web, Instant::ZERO), Verdict::NotAService);
        assert_eq!(dp.route(&web, Instant::ZERO), Verdict::NotAService);
    }

    /// The merge walk finds exactly what a hash map of the old destinations
    /// finds, for small and wholesale differences between the two lists.
    #[test]
    fn counter_reuse_matches_a_map_lookup() {
        let rng = SeededRng::new(99);
        for round in 0..300 {
            let universe = 1 + rng.below(120) as usize;
            let mut all: Vec<SocketAddr> = (0..universe)
                .map(|i| {
                    let ip = if i % 7 == 3 {
                        IpAddr::V6(std::net::Ipv6Addr::new(
                            0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16,
                        ))
                    } else {
                        IpAddr::V4(std::net::Ipv4Addr::new(10, 0, (i / 50) as u8, i as u8))
                    };
                    SocketAddr::new(ip, 8000 + (i % 3) as u16)
                })
                .collect();
            all.sort_by(|a, b| endpoint_order(*a, *b));
            // Old and new: subsets of the universe in merged order; later
            // rounds differ more.
            let keep_old = rng.below(100);
            let churn = if round % 3 == 0 { 2 } else { 40 };
            let old: Vec<Destination> = all
                .iter()
                .filter(|_| rng.below(100) < keep_old.max(1))
                .map(|a| Destination::new(*a, 1))
                .collect();
            let new: Vec<SocketAddr> = all
                .iter()
                .filter(|a| {
                    let was = old.iter().any(|d| d.addr() == **a);
                    let flip = rng.below(100) < churn;
                    was != flip
                })
                .copied()
                .collect();
            let map: AHashMap<SocketAddr, &Destination> =
                old.iter().map(|d| (d.addr(), d)).collect();
            let mut walk = CounterReuse::new(&old);
            for a in &new {
                let got = walk.find(*a).map(|d| d as *const Destination);
                let want = map.get(a).map(|d| *d as *const Destination);
                assert_eq!(got, want, "round {round}, {a}");
            }
        }
    }
}
