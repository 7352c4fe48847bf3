//! The control-plane table: services and their EndpointSlices, changed whole
//! or not at all, merged the way kube-proxy merges them.
//!
//! A [`ServiceTable`] takes [`Change`]s, alone or in a batch. It validates a
//! batch against the state it would meet (an overlay, nothing is touched),
//! then applies it with steps that cannot fail, so a refused batch leaves the
//! table exactly as it was.
//!
//! Merging follows kube-proxy's `endpointslicecache.go`: per service port
//! (matched by port name and protocol), endpoints are keyed by `"IP:port"`;
//! when two slices carry the same key a non-terminating copy wins (then the
//! copy from the slice whose name sorts first, so the result does not depend
//! on arrival order); the merged list is sorted as strings of `"IP:port"`.
//!
//! Watch order does not matter. Services and EndpointSlices are watched
//! independently, so a slice can arrive before its service and outlive it:
//! such a slice is kept *pending* (it never forwards traffic) and is merged
//! when its service arrives; a slice whose service is deleted goes back to
//! pending until it is deleted itself (the garbage collector deletes it
//! after the service) or the service returns. Deleting an object that is
//! not there is a no-op, reported in [`ChangeSet::notes`]. These are
//! kube-proxy's rules (`pkg/proxy/endpointslicecache.go` keeps slices by
//! service name whether or not the service is known). Only real conflicts
//! (two services on one cluster IP, protocol and port) refuse a batch.
//!
//! Replacing one slice costs work in proportion to that slice: the old and
//! new versions are compared endpoint by endpoint and only the endpoints that
//! changed are removed from or added to the merged map. The other slices of
//! the service are not read. [`TableStats`] counts this work so that tests
//! can observe it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ahash::{AHashMap, AHashSet};
use smallvec::SmallVec;

use crate::error::UpdateError;
use crate::model::endpoint_slice::{Endpoint, EndpointAddress, EndpointSlice, SliceKey};
use crate::model::flow::Protocol;
use crate::model::service::{Service, ServiceKey, ServicePort};
use crate::stack_text::StackText;

/// One change to the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Add a service, or replace it (its slices stay).
    UpsertService(Service),
    /// Delete a service. Its slices go back to pending (they stay until
    /// deleted, and are merged again if the service returns), as in
    /// kube-proxy; deleting a service that is not there is a no-op noted in
    /// [`ChangeSet::notes`].
    DeleteService(ServiceKey),
    /// Add a slice, or replace it. A slice whose service is not in the
    /// table is kept pending until the service arrives.
    UpsertSlice(EndpointSlice),
    /// Delete a slice (attached or pending); deleting a slice that is not
    /// there is a no-op noted in [`ChangeSet::notes`].
    DeleteSlice(SliceKey),
}

/// Something a successful apply did that a caller may want to report but
/// that is not an error: watch streams deliver these in normal operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ChangeNote {
    /// A delete named an object the table does not hold; nothing changed
    /// (the garbage collector's delete of a slice that went with its
    /// service, a replayed event).
    AbsentDelete {
        /// `Service` or `EndpointSlice`.
        kind: &'static str,
        /// `namespace/name` of the object.
        key: String,
    },
    /// A slice is pending at the end of the batch: its service is not in
    /// the table (not seen yet, or deleted). It forwards nothing until the
    /// service arrives.
    Pending {
        /// The slice.
        slice: SliceKey,
        /// The service it names (label `kubernetes.io/service-name`).
        service: ServiceKey,
    },
}

impl std::fmt::Display for ChangeNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeNote::AbsentDelete { kind, key } => {
                write!(f, "{kind} {key}: delete of an object not present (no-op)")
            }
            ChangeNote::Pending { slice, service } => write!(
                f,
                "EndpointSlice {slice}: pending until Service {service} arrives (forwards nothing)"
            ),
        }
    }
}

/// What a successful apply changed: the services whose dataplane state must
/// be rebuilt, and those that are gone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// The table's generation after the change.
    pub generation: u64,
    /// Services added or changed (definition or endpoints).
    pub updated: Vec<ServiceKey>,
    /// Services deleted.
    pub removed: Vec<ServiceKey>,
    /// A full resync: the dataplane should rebuild from the whole table.
    pub full: bool,
    /// What the apply did that is worth reporting but is no error: deletes
    /// of absent objects, slices left pending. Dataplanes can ignore it.
    pub notes: Vec<ChangeNote>,
}

impl ChangeSet {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        !self.full && self.updated.is_empty() && self.removed.is_empty()
    }
}

/// Counters of the work the table has done, to observe incrementality.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Slices whose contents were (re)merged, one per slice upsert or delete.
    pub slices_merged: u64,
    /// Endpoint copies added to or removed from a merged map.
    pub endpoint_merges: u64,
    /// Merged per-port endpoint lists rebuilt from their merge maps.
    pub port_lists_built: u64,
    /// Endpoints replaced, inserted or removed in place in a merged list
    /// (a small change to a large list patches it instead of rebuilding).
    pub port_list_patches: u64,
}

/// A merged endpoint of one service port, as the dataplanes see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    addr: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    hostname: Option<String>,
    node_name: Option<String>,
    zone: Option<String>,
    hint_zones: SmallVec<[String; 1]>,
    hint_nodes: SmallVec<[String; 1]>,
    weight: u16,
}

impl EndpointInfo {
    fn new(ip: IpAddr, port: u16, ep: &Endpoint) -> Self {
        let c = ep.conditions();
        EndpointInfo {
            addr: SocketAddr::new(ip, port),
            ready: c.is_ready(),
            serving: c.is_serving(),
            terminating: c.is_terminating(),
            hostname: ep.hostname().map(str::to_owned),
            node_name: ep.node_name().map(str::to_owned),
            zone: ep.zone().map(str::to_owned),
            hint_zones: ep.hint_zones().iter().cloned().collect(),
            hint_nodes: ep.hint_nodes().iter().cloned().collect(),
            weight: ep.weight(),
        }
    }

    /// A standalone endpoint (for tests, simulators and custom schedulers).
    pub fn from_addr(addr: SocketAddr) -> Self {
        EndpointInfo {
            addr,
            ready: true,
            serving: true,
            terminating: false,
            hostname: None,
            node_name: None,
            zone: None,
            hint_zones: SmallVec::new(),
            hint_nodes: SmallVec::new(),
            weight: 1,
        }
    }

    /// The backend `IP:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `conditions.ready` (absent = true).
    pub fn is_ready(&self) -> bool {
        self.ready
    }
    /// `conditions.serving` (absent = true).
    pub fn is_serving(&self) -> bool {
        self.serving
    }
    /// `conditions.terminating` (absent = false).
    pub fn is_terminating(&self) -> bool {
        self.terminating
    }
    /// `hostname`.
    pub fn hostname(&self) -> Option<&str> {
        self.hostname.as_deref()
    }
    /// `nodeName`.
    pub fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }
    /// `zone`.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }
    /// Zone hints.
    pub fn hint_zones(&self) -> &[String] {
        &self.hint_zones
    }
    /// Node hints.
    pub fn hint_nodes(&self) -> &[String] {
        &self.hint_nodes
    }
    /// The weight (1 unless set; 0 takes no new connections).
    pub fn weight(&self) -> u16 {
        self.weight
    }
    /// Whether the endpoint runs on `node`.
    pub fn is_on_node(&self, node: Option<&str>) -> bool {
        matches!((self.node_name.as_deref(), node), (Some(a), Some(b)) if a == b)
    }
    /// `IP:port` with IPv6 in brackets, kube-proxy's endpoint string.
    pub fn addr_string(&self) -> String {
        endpoint_key(self.addr.ip(), self.addr.port()).into()
    }
}

/// A service port with its merged endpoints, in kube-proxy's order.
#[derive(Debug, Clone)]
pub struct PortView {
    port: ServicePort,
    endpoints: Arc<Vec<Arc<EndpointInfo>>>,
    summary: ListSummary,
}

impl PortView {
    /// The service port.
    pub fn port(&self) -> &ServicePort {
        &self.port
    }
    /// The merged endpoints, sorted as strings of `"IP:port"`.
    pub fn endpoints(&self) -> &[Arc<EndpointInfo>] {
        &self.endpoints
    }
    /// Counts over [`endpoints`](Self::endpoints), kept as the list is
    /// patched, so that a dataplane can tell without a scan that every
    /// endpoint takes connections.
    pub(crate) fn summary(&self) -> ListSummary {
        self.summary
    }
}

/// Counts over a merged endpoint list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ListSummary {
    /// Endpoints that are not ready.
    pub(crate) not_ready: u32,
    /// Endpoints with zone or node hints.
    pub(crate) hinted: u32,
    /// IPv6 endpoints.
    pub(crate) v6: u32,
}

impl ListSummary {
    fn flags(e: &EndpointInfo) -> [u32; 3] {
        [
            u32::from(!e.is_ready()),
            u32::from(!e.hint_zones().is_empty() || !e.hint_nodes().is_empty()),
            u32::from(e.addr().is_ipv6()),
        ]
    }

    fn add(&mut self, e: &EndpointInfo) {
        let [a, b, c] = Self::flags(e);
        self.not_ready += a;
        self.hinted += b;
        self.v6 += c;
    }

    fn remove(&mut self, e: &EndpointInfo) {
        let [a, b, c] = Self::flags(e);
        self.not_ready -= a;
        self.hinted -= b;
        self.v6 -= c;
    }

    /// The summary of `list`, counted.
    pub(crate) fn of(list: &[Arc<EndpointInfo>]) -> Self {
        let mut s = ListSummary::default();
        for e in list {
            s.add(e);
        }
        s
    }
}

/// A service with its merged endpoints per port: what a dataplane compiles.
#[derive(Debug, Clone)]
pub struct ServiceView {
    service: Arc<Service>,
    ports: SmallVec<[PortView; 2]>,
}

impl ServiceView {
    /// The service.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }
    /// Its ports, in the service's order.
    pub fn ports(&self) -> &[PortView] {
        &self.ports
    }
}

/// Merging key: a service port is matched to slice ports by name and protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PortKey {
    name: String,
    protocol: Protocol,
}

impl PortKey {
    fn of_service_port(p: &ServicePort) -> Self {
        PortKey {
            name: p.name_or_empty().to_owned(),
            protocol: p.protocol(),
        }
    }
}

#[derive(Debug, Clone)]
struct EndpointCopy {
    slice: Arc<str>,
    info: Arc<EndpointInfo>,
}

#[derive(Debug, Clone, Default)]
struct MergedPort {
    /// `"IP:port"` -> the copies of that endpoint, one per slice carrying it.
    map: BTreeMap<Box<str>, SmallVec<[EndpointCopy; 1]>>,
    /// The winners of `map`, in its order: patched in place while a batch
    /// changes few of them, else dropped and rebuilt from `map`.
    list: Option<Arc<Vec<Arc<EndpointInfo>>>>,
    /// The summary of `list` (meaningful while `list` is kept).
    summary: ListSummary,
    /// Patches since the list was last handed out.
    patches: usize,
}

impl MergedPort {
    fn winner(copies: &[EndpointCopy]) -> &Arc<EndpointInfo> {
        // A non-terminating copy wins; then the slice whose name sorts first.
        let best = copies
            .iter()
            .min_by(|a, b| (a.info.terminating, &*a.slice).cmp(&(b.info.terminating, &*b.slice)))
            .expect("a merged key always has a copy");
        &best.info
    }

    /// Records that the winner at `addr` went from `before` to `after`: patches
    /// the list in place (one binary search, and a move of the tail for an
    /// insert or removal) while the patches since the list was last handed
    /// out stay few, else drops it to be rebuilt.
    fn patch(
        &mut self,
        addr: SocketAddr,
        before: Option<Arc<EndpointInfo>>,
        after: Option<&Arc<EndpointInfo>>,
        stats: &mut TableStats,
    ) {
        if let (Some(b), Some(a)) = (&before, after) {
            if Arc::ptr_eq(b, a) {
                return;
            }
        }
        let Some(list) = &mut self.list else {
            return;
        };
        self.patches += 1;
        // Each insert or removal moves up to the whole list: past a few, a
        // rebuild from the map costs less.
        if self.patches > Self::MAX_PATCHES.max(list.len() / 64) {
            self.list = None;
            return;
        }
        // A list still shared (a view someone holds) is copied once.
        let list = Arc::make_mut(list);
        let key = key_buf(addr);
        let found = list.binary_search_by(|e| key_buf(e.addr()).as_bytes().cmp(key.as_bytes()));
        match (before, after, found) {
            (Some(b), Some(a), Ok(i)) => {
                self.summary.remove(&b);
                self.summary.add(a);
                list[i] = a.clone();
            }
            (Some(b), None, Ok(i)) => {
                self.summary.remove(&b);
                list.remove(i);
            }
            (None, Some(a), Err(i)) => {
                self.summary.add(a);
                list.insert(i, a.clone());
            }
            // Not what the map says (cannot happen): rebuild.
            _ => {
                debug_assert!(false, "merged list out of step with its map at {addr}");
                self.list = None;
                return;
            }
        }
        stats.port_list_patches += 1;
    }

    /// Patches to a list before it is rebuilt instead (at least).
    const MAX_PATCHES: usize = 8;

    fn list(&mut self, stats: &mut TableStats) -> (Arc<Vec<Arc<EndpointInfo>>>, ListSummary) {
        self.patches = 0;
        if let Some(list) = &self.list {
            debug_assert_eq!(self.summary, ListSummary::of(list));
            return (list.clone(), self.summary);
        }
        stats.port_lists_built += 1;
        let list: Vec<Arc<EndpointInfo>> = self
            .map
            .values()
            .map(|copies| Self::winner(copies).clone())
            .collect();
        self.summary = ListSummary::of(&list);
        let list = Arc::new(list);
        self.list = Some(list.clone());
        (list, self.summary)
    }
}

#[derive(Debug, Clone)]
struct ServiceEntry {
    service: Arc<Service>,
    slices: BTreeMap<String, Arc<EndpointSlice>>,
    merged: AHashMap<PortKey, MergedPort>,
    /// `None` only inside a batch, between a change to the service and the
    /// rebuild of its view (dropped early so the merged lists are not
    /// shared while they are patched).
    view: Option<Arc<ServiceView>>,
}

type VipKey = (IpAddr, Protocol, u16);

fn vip_keys(svc: &Service) -> SmallVec<[VipKey; 4]> {
    let mut out = SmallVec::new();
    for ip in svc.cluster_ip().addrs() {
        for p in svc.ports() {
            out.push((*ip, p.protocol(), p.port()));
        }
    }
    out
}

/// `IP:port`, IPv6 in brackets: kube-proxy's endpoint key.
pub(crate) fn endpoint_key(ip: IpAddr, port: u16) -> Box<str> {
    let mut s = String::with_capacity(24);
    match ip {
        IpAddr::V4(v4) => write!(s, "{v4}:{port}"),
        IpAddr::V6(v6) => write!(s, "[{v6}]:{port}"),
    }
    .expect("writing to a String cannot fail");
    s.into_boxed_str()
}

/// An endpoint key written on the stack: the longest, an IPv4-mapped IPv6
/// address with a port, is 53 bytes.
type KeyBuf = StackText<56>;

/// `addr`'s [`endpoint_key`], on the stack.
fn key_buf(addr: SocketAddr) -> KeyBuf {
    let mut k = KeyBuf::new();
    match addr.ip() {
        IpAddr::V4(v4) => write!(k, "{v4}:{}", addr.port()),
        IpAddr::V6(v6) => write!(k, "[{v6}]:{}", addr.port()),
    }
    .expect("an endpoint key fits in 56 bytes");
    k
}

/// The order of merged endpoints: kube-proxy's, by the strings of their
/// [`endpoint_key`]s (`"10.0.0.10:80"` before `"10.0.0.2:80"`), compared
/// without allocating.
pub(crate) fn endpoint_order(a: SocketAddr, b: SocketAddr) -> std::cmp::Ordering {
    key_buf(a).as_bytes().cmp(key_buf(b).as_bytes())
}

/// One service in a [`TableSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSnapshot {
    /// The service.
    pub service: Service,
    /// Its slices, in name order.
    pub slices: Vec<EndpointSlice>,
    /// Per service port, the merged endpoints.
    pub ports: Vec<Vec<EndpointInfo>>,
}

/// A full, comparable copy of the table's contents, for tests and fuzzing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSnapshot {
    /// Every service, by key.
    pub services: BTreeMap<ServiceKey, ServiceSnapshot>,
    /// The pending slices (their service is not in the table), by key.
    pub pending: BTreeMap<SliceKey, EndpointSlice>,
}

/// The control-plane table of services and endpoint slices.
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
///     .endpoint(EndpointSpec::new("10.0.0.10"))
///     .build().unwrap();
/// let changes = table.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)]).unwrap();
/// assert_eq!(changes.updated.len(), 1);
/// let view = table.view(&ServiceKey::new("default", "web")).unwrap();
/// // Sorted as strings: "10.0.0.10:8080" < "10.0.0.2:8080".
/// let addrs: Vec<String> = view.ports()[0].endpoints().iter().map(|e| e.addr().to_string()).collect();
/// assert_eq!(addrs, ["10.0.0.10:8080", "10.0.0.2:8080"]);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    services: AHashMap<ServiceKey, ServiceEntry>,
    /// The service of every slice, attached or pending.
    slice_owner: AHashMap<SliceKey, ServiceKey>,
    /// Slices whose service is not in the table, by that service.
    pending: AHashMap<ServiceKey, BTreeMap<String, Arc<EndpointSlice>>>,
    vips: AHashMap<VipKey, ServiceKey>,
    generation: u64,
    stats: TableStats,
}

/// The state a batch would meet, for validation without touching the table.
/// Only cluster IP, protocol and port claims can refuse a change: slices
/// for unknown services wait pending, and deletes of absent objects are
/// no-ops.
struct Overlay<'a> {
    table: &'a ServiceTable,
    services: AHashMap<ServiceKey, Option<SmallVec<[VipKey; 4]>>>,
    vips: AHashMap<VipKey, Option<ServiceKey>>,
}

impl<'a> Overlay<'a> {
    fn new(table: &'a ServiceTable) -> Self {
        Overlay {
            table,
            services: AHashMap::new(),
            vips: AHashMap::new(),
        }
    }

    fn service_vips(&self, key: &ServiceKey) -> Option<SmallVec<[VipKey; 4]>> {
        match self.services.get(key) {
            Some(v) => v.clone(),
            None => self.table.services.get(key).map(|e| vip_keys(&e.service)),
        }
    }

    fn vip_owner(&self, key: &VipKey) -> Option<ServiceKey> {
        match self.vips.get(key) {
            Some(v) => v.clone(),
            None => self.table.vips.get(key).cloned(),
        }
    }

    fn check(&mut self, change: &Change) -> Result<(), UpdateError> {
        match change {
            Change::UpsertService(svc) => {
                let key = svc.key();
                let new_vips = vip_keys(svc);
                for (i, vip) in new_vips.iter().enumerate() {
                    if let Some(other) = self.vip_owner(vip) {
                        if &other != key {
                            let port_idx = i % svc.ports().len().max(1);
                            return Err(UpdateError::ConflictingPort {
                                service: key.to_string(),
                                field: format!("spec.ports[{port_idx}]"),
                                value: format!("{}/{}", endpoint_key(vip.0, vip.2), vip.1),
                                other: other.to_string(),
                            });
                        }
                    }
                }
                if let Some(old) = self.service_vips(key) {
                    for vip in old {
                        self.vips.insert(vip, None);
                    }
                }
                for vip in &new_vips {
                    self.vips.insert(*vip, Some(key.clone()));
                }
                self.services.insert(key.clone(), Some(new_vips));
            }
            Change::DeleteService(key) => {
                if let Some(old) = self.service_vips(key) {
                    for vip in old {
                        self.vips.insert(vip, None);
                    }
                    self.services.insert(key.clone(), None);
                }
            }
            Change::UpsertSlice(_) | Change::DeleteSlice(_) => {}
        }
        Ok(())
    }
}

impl ServiceTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of services.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether the table holds no service.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Bumped by every successful apply.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Counters of merge work done so far.
    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// A service.
    pub fn service(&self, key: &ServiceKey) -> Option<&Arc<Service>> {
        self.services.get(key).map(|e| &e.service)
    }

    /// A slice, as last applied (attached to its service, or pending).
    pub fn slice(&self, key: &SliceKey) -> Option<&Arc<EndpointSlice>> {
        let owner = self.slice_owner.get(key)?;
        match self.services.get(owner) {
            Some(entry) => entry.slices.get(&key.name),
            None => self.pending.get(owner)?.get(&key.name),
        }
    }

    /// Whether a slice is pending: held, but its service is not in the
    /// table, so it forwards nothing.
    pub fn is_pending(&self, key: &SliceKey) -> bool {
        self.slice_owner
            .get(key)
            .is_some_and(|owner| !self.services.contains_key(owner))
    }

    /// The pending slices (their service is not in the table), in no
    /// particular order.
    pub fn pending_slices(&self) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.pending.values().flat_map(BTreeMap::values)
    }

    /// The slices of a service, in name order.
    pub fn slices_of(&self, key: &ServiceKey) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.services
            .get(key)
            .into_iter()
            .flat_map(|e| e.slices.values())
    }

    /// A service's merged view.
    pub fn view(&self, key: &ServiceKey) -> Option<&Arc<ServiceView>> {
        self.services.get(key).and_then(|e| e.view.as_ref())
    }

    /// Every service's view, in no particular order.
    pub fn views(&self) -> impl Iterator<Item = &Arc<ServiceView>> {
        self.services.values().filter_map(|e| e.view.as_ref())
    }

    /// Every service key, sorted.
    pub fn keys_sorted(&self) -> Vec<ServiceKey> {
        let mut keys: Vec<ServiceKey> = self.services.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// A change set that names every service: what a fresh dataplane needs.
    pub fn full_change_set(&self) -> ChangeSet {
        ChangeSet {
            generation: self.generation,
            updated: self.keys_sorted(),
            removed: Vec::new(),
            full: true,
            notes: Vec::new(),
        }
    }

    /// A comparable copy of everything the table holds.
    pub fn snapshot(&self) -> TableSnapshot {
        let services = self
            .services
            .iter()
            .map(|(k, e)| {
                let slices = e.slices.values().map(|s| (**s).clone()).collect();
                let ports = e
                    .view
                    .as_ref()
                    .expect("views are rebuilt before a batch returns")
                    .ports
                    .iter()
                    .map(|p| p.endpoints.iter().map(|ep| (**ep).clone()).collect())
                    .collect();
                (
                    k.clone(),
                    ServiceSnapshot {
                        service: (*e.service).clone(),
                        slices,
                        ports,
                    },
                )
            })
            .collect();
        let pending = self
            .pending_slices()
            .map(|s| (s.key().clone(), (**s).clone()))
            .collect();
        TableSnapshot { services, pending }
    }

    /// Applies one change.
    ///
    /// # Errors
    /// See [`ServiceTable::apply_batch`]; the error is not wrapped.
    pub fn apply(&mut self, change: Change) -> Result<ChangeSet, UpdateError> {
        self.apply_batch([change]).map_err(|e| match e {
            UpdateError::InBatch { source, .. } => *source,
            other => other,
        })
    }

    /// Applies a batch of changes whole, or none of it.
    ///
    /// A slice for a service not in the table is kept pending, and a delete
    /// of an absent object is a no-op; both are reported in
    /// [`ChangeSet::notes`], never refused.
    ///
    /// # Errors
    /// [`UpdateError::InBatch`] wrapping the first failing change: a
    /// service whose cluster IP, protocol and port another service already
    /// holds. The table is unchanged.
    pub fn apply_batch(
        &mut self,
        changes: impl IntoIterator<Item = Change>,
    ) -> Result<ChangeSet, UpdateError> {
        let changes: Vec<Change> = changes.into_iter().collect();
        let mut overlay = Overlay::new(self);
        for (index, change) in changes.iter().enumerate() {
            overlay.check(change).map_err(|e| UpdateError::InBatch {
                index,
                source: Box::new(e),
            })?;
        }
        drop(overlay);

        let mut touched: BTreeSet<ServiceKey> = BTreeSet::new();
        let mut notes = Vec::new();
        // Slices that may be pending when the batch ends.
        let mut maybe_pending: BTreeSet<SliceKey> = BTreeSet::new();
        for change in changes {
            match change {
                Change::UpsertService(svc) => {
                    touched.insert(svc.key().clone());
                    self.upsert_service(svc);
                }
                Change::DeleteService(key) => {
                    if let Some(entry) = self.services.get(&key) {
                        maybe_pending.extend(entry.slices.values().map(|s| s.key().clone()));
                        self.delete_service(&key);
                        touched.insert(key);
                    } else {
                        notes.push(ChangeNote::AbsentDelete {
                            kind: "Service",
                            key: key.to_string(),
                        });
                    }
                }
                Change::UpsertSlice(slice) => {
                    if let Some(old_owner) = self.slice_owner.get(slice.key()).cloned() {
                        if &old_owner != slice.service() {
                            self.delete_slice(slice.key());
                            touched.insert(old_owner);
                        }
                    }
                    if self.services.contains_key(slice.service()) {
                        touched.insert(slice.service().clone());
                    } else {
                        maybe_pending.insert(slice.key().clone());
                    }
                    self.upsert_slice(slice);
                }
                Change::DeleteSlice(key) => match self.delete_slice(&key) {
                    Some(owner) => {
                        if self.services.contains_key(&owner) {
                            touched.insert(owner);
                        }
                    }
                    None => notes.push(ChangeNote::AbsentDelete {
                        kind: "EndpointSlice",
                        key: key.to_string(),
                    }),
                },
            }
        }
        for key in maybe_pending {
            if let Some(owner) = self.slice_owner.get(&key) {
                if !self.services.contains_key(owner) {
                    notes.push(ChangeNote::Pending {
                        service: owner.clone(),
                        slice: key,
                    });
                }
            }
        }
        self.generation += 1;
        let mut set = ChangeSet {
            generation: self.generation,
            notes,
            ..ChangeSet::default()
        };
        for key in touched {
            if let Some(entry) = self.services.get_mut(&key) {
                entry.view = Some(Arc::new(build_view(
                    &entry.service,
                    &mut entry.merged,
                    &mut self.stats,
                )));
                set.updated.push(key);
            } else {
                set.removed.push(key);
            }
        }
        Ok(set)
    }

    fn upsert_service(&mut self, svc: Service) {
        let key = svc.key().clone();
        if let Some(entry) = self.services.get(&key) {
            for vip in vip_keys(&entry.service) {
                self.vips.remove(&vip);
            }
        }
        for vip in vip_keys(&svc) {
            self.vips.insert(vip, key.clone());
        }
        let svc = Arc::new(svc);
        match self.services.get_mut(&key) {
            Some(entry) => entry.service = svc,
            None => {
                let mut entry = ServiceEntry {
                    service: svc,
                    slices: BTreeMap::new(),
                    merged: AHashMap::new(),
                    view: None,
                };
                // The slices that waited for this service are merged now.
                for (name, slice) in self.pending.remove(&key).unwrap_or_default() {
                    self.stats.slices_merged += 1;
                    let name_arc: Arc<str> = Arc::from(name.as_str());
                    for ep in slice.endpoints() {
                        add_contribution(&mut entry.merged, &slice, ep, &name_arc, &mut self.stats);
                    }
                    entry.slices.insert(name, slice);
                }
                self.services.insert(key, entry);
            }
        }
    }

    /// Removes a service; its slices go back to pending.
    fn delete_service(&mut self, key: &ServiceKey) {
        if let Some(entry) = self.services.remove(key) {
            for vip in vip_keys(&entry.service) {
                self.vips.remove(&vip);
            }
            if !entry.slices.is_empty() {
                self.pending.insert(key.clone(), entry.slices);
            }
        }
    }

    /// Removes a slice (and, if attached, its contributions); returns its
    /// owner, or `None` if the table did not hold it.
    fn delete_slice(&mut self, key: &SliceKey) -> Option<ServiceKey> {
        let owner = self.slice_owner.remove(key)?;
        let Some(entry) = self.services.get_mut(&owner) else {
            if let Some(slices) = self.pending.get_mut(&owner) {
                slices.remove(&key.name);
                if slices.is_empty() {
                    self.pending.remove(&owner);
                }
            }
            return Some(owner);
        };
        if let Some(old) = entry.slices.remove(&key.name) {
            entry.view = None;
            self.stats.slices_merged += 1;
            let name: Arc<str> = Arc::from(key.name.as_str());
            for ep in old.endpoints() {
                remove_contribution(&mut entry.merged, &old, ep, &name, &mut self.stats);
            }
        }
        Some(owner)
    }

    fn upsert_slice(&mut self, slice: EndpointSlice) {
        let owner = slice.service().clone();
        let Some(entry) = self.services.get_mut(&owner) else {
            // No service yet: the slice waits, merged into nothing.
            self.slice_owner.insert(slice.key().clone(), owner.clone());
            self.pending
                .entry(owner)
                .or_default()
                .insert(slice.key().name.clone(), Arc::new(slice));
            return;
        };
        self.stats.slices_merged += 1;
        entry.view = None;
        let name: Arc<str> = Arc::from(slice.key().name.as_str());
        let new = Arc::new(slice);
        let old = entry.slices.insert(name.to_string(), new.clone());
        self.slice_owner.insert(new.key().clone(), owner);
        match old {
            Some(old) if old.ports() == new.ports() && old.address_type() == new.address_type() => {
                // Diff endpoint by endpoint: only what changed is re-merged.
                let (removed, added) = slice_diff(old.endpoints(), new.endpoints());
                for ep in removed {
                    remove_contribution(&mut entry.merged, &old, ep, &name, &mut self.stats);
                }
                for ep in added {
                    add_contribution(&mut entry.merged, &new, ep, &name, &mut self.stats);
                }
            }
            old => {
                if let Some(old) = old {
                    for ep in old.endpoints() {
                        remove_contribution(&mut entry.merged, &old, ep, &name, &mut self.stats);
                    }
                }
                for ep in new.endpoints() {
                    add_contribution(&mut entry.merged, &new, ep, &name, &mut self.stats);
                }
            }
        }
    }
}

/// Endpoints of one version of a slice.
type EndpointRefs<'a> = SmallVec<[&'a Endpoint; LOCKSTEP_MAX]>;

/// What to re-merge when a slice goes from `old` to `new`: the endpoints to
/// remove (of `old`) and to add (of `new`). An endpoint equal in both is
/// left alone; removing and re-adding any other leaves the same merge.
///
/// The usual update keeps the endpoints' order: the two versions are then
/// compared position by position, with no hashing (an endpoint added or
/// removed at the end is one difference). Past [`LOCKSTEP_MAX`] differences
/// (endpoints reordered, or many changed) they are diffed by address.
fn slice_diff<'a>(
    old: &'a [Endpoint],
    new: &'a [Endpoint],
) -> (EndpointRefs<'a>, EndpointRefs<'a>) {
    let mut changed: SmallVec<[usize; LOCKSTEP_MAX]> = SmallVec::new();
    let lockstep = (0..old.len().max(new.len())).all(|i| {
        if old.get(i) == new.get(i) {
            return true;
        }
        changed.push(i);
        changed.len() <= LOCKSTEP_MAX
    });
    if lockstep {
        return (
            changed.iter().filter_map(|&i| old.get(i)).collect(),
            changed.iter().filter_map(|&i| new.get(i)).collect(),
        );
    }
    let old_by_addr: AHashMap<&EndpointAddress, &Endpoint> =
        old.iter().map(|e| (e.address(), e)).collect();
    let unchanged: AHashSet<&EndpointAddress> = new
        .iter()
        .filter(|ep| old_by_addr.get(ep.address()) == Some(ep))
        .map(Endpoint::address)
        .collect();
    (
        old.iter()
            .filter(|e| !unchanged.contains(e.address()))
            .collect(),
        new.iter()
            .filter(|e| !unchanged.contains(e.address()))
            .collect(),
    )
}

/// Differences past which [`slice_diff`] diffs by address.
const LOCKSTEP_MAX: usize = 8;

/// The (port key, port number) pairs a slice contributes to.
fn slice_port_keys(slice: &EndpointSlice) -> impl Iterator<Item = (PortKey, u16)> + '_ {
    slice.ports().iter().filter_map(|p| {
        p.port().map(|num| {
            (
                PortKey {
                    name: p.name().to_owned(),
                    protocol: p.protocol(),
                },
                num,
            )
        })
    })
}

fn add_contribution(
    merged: &mut AHashMap<PortKey, MergedPort>,
    slice: &EndpointSlice,
    ep: &Endpoint,
    slice_name: &Arc<str>,
    stats: &mut TableStats,
) {
    let EndpointAddress::Ip(ip) = ep.address() else {
        return;
    };
    for (pk, num) in slice_port_keys(slice) {
        stats.endpoint_merges += 1;
        let port = merged.entry(pk).or_default();
        // A list kept from the last view is patched with the key's new
        // winner; without one there is nothing to patch.
        let patching = port.list.is_some();
        let copies = port.map.entry(endpoint_key(*ip, num)).or_default();
        let before = (patching && !copies.is_empty()).then(|| MergedPort::winner(copies).clone());
        copies.push(EndpointCopy {
            slice: slice_name.clone(),
            info: Arc::new(EndpointInfo::new(*ip, num, ep)),
        });
        if patching {
            let after = MergedPort::winner(copies).clone();
            port.patch(SocketAddr::new(*ip, num), before, Some(&after), stats);
        }
    }
}

fn remove_contribution(
    merged: &mut AHashMap<PortKey, MergedPort>,
    slice: &EndpointSlice,
    ep: &Endpoint,
    slice_name: &Arc<str>,
    stats: &mut TableStats,
) {
    let EndpointAddress::Ip(ip) = ep.address() else {
        return;
    };
    for (pk, num) in slice_port_keys(slice) {
        stats.endpoint_merges += 1;
        let Some(port) = merged.get_mut(&pk) else {
            continue;
        };
        let key = endpoint_key(*ip, num);
        let patching = port.list.is_some();
        if let Some(copies) = port.map.get_mut(&key) {
            let before = patching.then(|| MergedPort::winner(copies).clone());
            copies.retain(|c| c.slice != *slice_name);
            let after =
                (patching && !copies.is_empty()).then(|| MergedPort::winner(copies).clone());
            if copies.is_empty() {
                port.map.remove(&key);
            }
            if patching {
                port.patch(SocketAddr::new(*ip, num), before, after.as_ref(), stats);
            }
        }
        if port.map.is_empty() {
            merged.remove(&pk);
        }
    }
}

fn build_view(
    service: &Arc<Service>,
    merged: &mut AHashMap<PortKey, MergedPort>,
    stats: &mut TableStats,
) -> ServiceView {
    let ports = service
        .ports()
        .iter()
        .map(|p| {
            let (endpoints, summary) = merged
                .get_mut(&PortKey::of_service_port(p))
                .map_or_else(Default::default, |m| m.list(stats));
            PortView {
                port: p.clone(),
                endpoints,
                summary,
            }
        })
        .collect();
    ServiceView {
        service: service.clone(),
        ports,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::endpoint_slice::{AddressType, EndpointSpec, SlicePortSpec};
    use crate::model::service::ServicePortSpec;

    fn svc(name: &str, ip: &str) -> Service {
        Service::builder("default", name)
            .cluster_ip(ip.parse().unwrap())
            .port(
                ServicePortSpec::tcp(80)
                    .name("http")
                    .target_port_name("web"),
            )
            .build()
            .unwrap()
    }

    fn slice(name: &str, svc: &str, ips: &[&str]) -> EndpointSlice {
        EndpointSlice::builder("default", name, svc, AddressType::IPv4)
            .port(SlicePortSpec::tcp(8080).name("http"))
            .endpoints(ips.iter().map(|ip| EndpointSpec::new(*ip)))
            .build()
            .unwrap()
    }

    /// One slice of the patching property: which of 24 hosts it carries
    /// (bit k = host k), which of those are terminating or not ready, and a
    /// zone hint on some.
    fn gen_slice(name: &str, hosts: u32, term: u32, unready: u32, hinted: u32) -> EndpointSlice {
        let eps = (0..24).filter(|k| hosts >> k & 1 == 1).map(|k| {
            // 10.0.0.2 .. 10.0.0.25: keys that sort as strings, not numbers.
            let mut e = EndpointSpec::new(format!("10.0.0.{}", k + 2));
            if term >> k & 1 == 1 {
                e = e.terminating(true).ready(false);
            } else if unready >> k & 1 == 1 {
                e = e.ready(false);
            }
            if hinted >> k & 1 == 1 {
                e = e.hint_zone("a");
            }
            e
        });
        EndpointSlice::builder("default", name, "web", AddressType::IPv4)
            .port(SlicePortSpec::tcp(8080).name("http"))
            .endpoints(eps)
            .build()
            .unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// After any sequence of slice upserts and deletes, small (patched
        /// in place) or large (rebuilt), each merged list and its summary
        /// equal those of a table built from scratch with the same slices.
        #[test]
        fn patched_lists_equal_rebuilt_ones(
            ops in proptest::collection::vec(
                (0..3usize, proptest::bits::u32::between(0, 24), 0u32..(1 << 24), 0u32..(1 << 24), 0u32..(1 << 24), 0..8u8),
                1..40,
            ),
            flips in proptest::collection::vec(0..24u32, 40),
        ) {
            let mut t = ServiceTable::new();
            t.apply(Change::UpsertService(svc("web", "10.96.0.1"))).unwrap();
            // Per slice: its hosts and their conditions (terminating, not
            // ready, hinted), or None while it does not exist.
            let mut current: [Option<[u32; 4]>; 3] = [None; 3];
            // Hold a view now and then: a shared list must be copied, not
            // patched under its holder.
            let mut held = None;
            for (n, (s, hosts, term, unready, hinted, kind)) in ops.into_iter().enumerate() {
                let name = format!("web-{s}");
                let (f1, f2) = (1u32 << flips[n], 1u32 << flips[(n + 7) % 40]);
                let next = match (kind, current[s]) {
                    (7, Some(_)) => None,
                    // Small edits, which the table patches in place: a host
                    // added or removed, one changing its conditions, or both.
                    (0..=1, Some([h, t, u, z])) => Some([h ^ f1, t, u, z]),
                    (2..=3, Some([h, t, u, z])) => Some([h, t ^ f1, u ^ f2, z]),
                    (4..=5, Some([h, t, u, z])) => Some([h ^ f1, t, u, z ^ f2]),
                    // A wholesale change (rebuilt).
                    _ => Some([hosts, term, unready, hinted]),
                };
                match next {
                    None => {
                        t.apply(Change::DeleteSlice(SliceKey::new("default", name.as_str()))).unwrap();
                    }
                    Some([h, te, u, z]) => {
                        t.apply(Change::UpsertSlice(gen_slice(&name, h, te, u, z))).unwrap();
                    }
                }
                current[s] = next;
                if n % 5 == 0 {
                    held = t.view(&ServiceKey::new("default", "web")).cloned();
                }
                let mut fresh = ServiceTable::new();
                let mut batch = vec![Change::UpsertService(svc("web", "10.96.0.1"))];
                batch.extend(t.slices_of(&ServiceKey::new("default", "web")).map(|s| Change::UpsertSlice((**s).clone())));
                fresh.apply_batch(batch).unwrap();
                let key = ServiceKey::new("default", "web");
                let (a, b) = (t.view(&key).unwrap(), fresh.view(&key).unwrap());
                proptest::prop_assert_eq!(a.ports().len(), b.ports().len());
                for (pa, pb) in a.ports().iter().zip(b.ports()) {
                    let ea: Vec<&EndpointInfo> = pa.endpoints().iter().map(|e| &**e).collect();
                    let eb: Vec<&EndpointInfo> = pb.endpoints().iter().map(|e| &**e).collect();
                    proptest::prop_assert_eq!(ea, eb);
                    proptest::prop_assert_eq!(pa.summary(), ListSummary::of(pa.endpoints()));
                }
            }
            drop(held);
        }
    }

    /// The lockstep diff sees a reordered slice as changed positions and
    /// re-merges them; an update that moves an endpoint and changes another
    /// merges to what a fresh table holds.
    #[test]
    fn reordered_and_shifted_slices_merge_like_fresh_ones() {
        let versions: [&[&str]; 4] = [
            &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"],
            &["10.0.0.2", "10.0.0.1", "10.0.0.3", "10.0.0.5"],
            &["10.0.0.9", "10.0.0.2", "10.0.0.1", "10.0.0.3", "10.0.0.5"],
            &["10.0.0.1"],
        ];
        let mut t = ServiceTable::new();
        t.apply(Change::UpsertService(svc("web", "10.96.0.1")))
            .unwrap();
        t.apply(Change::UpsertSlice(slice("web-b", "web", &["10.0.0.2"])))
            .unwrap();
        for ips in versions {
            t.apply(Change::UpsertSlice(slice("web-a", "web", ips)))
                .unwrap();
            let mut fresh = ServiceTable::new();
            fresh
                .apply_batch([
                    Change::UpsertService(svc("web", "10.96.0.1")),
                    Change::UpsertSlice(slice("web-b", "web", &["10.0.0.2"])),
                    Change::UpsertSlice(slice("web-a", "web", ips)),
                ])
                .unwrap();
            assert_eq!(addrs(&t, "web"), addrs(&fresh, "web"), "{ips:?}");
            assert_eq!(t.snapshot(), fresh.snapshot());
        }
    }

    fn addrs(t: &ServiceTable, name: &str) -> Vec<String> {
        t.view(&ServiceKey::new("default", name)).unwrap().ports()[0]
            .endpoints()
            .iter()
            .map(|e| e.addr().to_string())
            .collect()
    }

    #[test]
    fn merges_in_string_order_and_dedups() {
        let mut t = ServiceTable::new();
        t.apply_batch([
            Change::UpsertService(svc("web", "10.96.0.1")),
            Change::UpsertSlice(slice("web-b", "web", &["10.0.0.2", "10.0.0.10"])),
            Change::UpsertSlice(slice("web-a", "web", &["10.0.0.10", "10.0.0.3"])),
        ])
        .unwrap();
        assert_eq!(
            addrs(&t, "web"),
            ["10.0.0.10:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
        );
        // Removing one slice keeps the shared endpoint alive through the other.
        t.apply(Change::DeleteSlice(SliceKey::new("default", "web-a")))
            .unwrap();
        assert_eq!(addrs(&t, "web"), ["10.0.0.10:8080", "10.0.0.2:8080"]);
    }

    #[test]
    fn endpoint_order_is_the_order_of_the_key_strings() {
        let addrs: Vec<SocketAddr> = [
            "10.0.0.10:80",
            "10.0.0.2:80",
            "10.0.0.2:8080",
            "10.0.0.2:9",
            "9.255.255.255:65535",
            "[::1]:80",
            "[2001:db8::10]:443",
            "[2001:db8::9]:443",
            "[::ffff:255.255.255.255]:65535",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        for &a in &addrs {
            for &b in &addrs {
                let by_string = endpoint_key(a.ip(), a.port()).cmp(&endpoint_key(b.ip(), b.port()));
                assert_eq!(endpoint_order(a, b), by_string, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn non_terminating_copy_wins() {
        let mut t = ServiceTable::new();
        let term = EndpointSlice::builder("default", "a", "web", AddressType::IPv4)
            .port(SlicePortSpec::tcp(8080).name("http"))
            .endpoint(EndpointSpec::new("10.0.0.1").ready(false).terminating(true))
            .build()
            .unwrap();
        t.apply_batch([
            Change::UpsertService(svc("web", "10.96.0.1")),
            Change::UpsertSlice(term),
            Change::UpsertSlice(slice("b", "web", &["10.0.0.1"])),
        ])
        .unwrap();
        let view = t.view(&ServiceKey::new("default", "web")).unwrap();
        let ep = &view.ports()[0].endpoints()[0];
        assert!(ep.is_ready() && !ep.is_terminating());
    }

    #[test]
    fn named_target_port_resolves_through_slice_port() {
        let mut t = ServiceTable::new();
        t.apply_batch([
            Change::UpsertService(svc("web", "10.96.0.1")),
            Change::UpsertSlice(slice("s", "web", &["10.0.0.1"])),
        ])
        .unwrap();
        // Service port 80 ("http", targetPort "web") -> slice port "http" = 8080.
        assert_eq!(addrs(&t, "web"), ["10.0.0.1:8080"]);
        // A slice whose port name matches no service port gives no endpoints.
        let other = EndpointSlice::builder("default", "s", "web", AddressType::IPv4)
            .port(SlicePortSpec::tcp(9090).name("metrics"))
            .endpoint(EndpointSpec::new("10.0.0.1"))
            .build()
            .unwrap();
        t.apply(Change::UpsertSlice(other)).unwrap();
        assert!(addrs(&t, "web").is_empty());
    }

    #[test]
    fn rejected_batch_leaves_table_unchanged() {
        let mut t = ServiceTable::new();
        t.apply_batch([
            Change::UpsertService(svc("web", "10.96.0.1")),
            Change::UpsertSlice(slice("s", "web", &["10.0.0.1"])),
        ])
        .unwrap();
        let before = t.snapshot();
        let generation = t.generation();
        // Good changes (a pending slice, an absent delete among them) beside
        // one real conflict: nothing is applied.
        let err = t
            .apply_batch([
                Change::UpsertSlice(slice("s", "web", &["10.0.0.9"])),
                Change::UpsertSlice(slice("s2", "api", &["10.0.0.7"])),
                Change::DeleteSlice(SliceKey::new("default", "gone")),
                Change::UpsertService(svc("api", "10.96.0.1")),
            ])
            .unwrap_err();
        assert_eq!(
            err,
            UpdateError::InBatch {
                index: 3,
                source: Box::new(UpdateError::ConflictingPort {
                    service: "default/api".into(),
                    field: "spec.ports[0]".into(),
                    value: "10.96.0.1:80/TCP".into(),
                    other: "default/web".into(),
                })
            }
        );
        assert_eq!(t.snapshot(), before);
        assert_eq!(t.generation(), generation);
    }

    #[test]
    fn absent_deletes_are_noted_no_ops_beside_good_changes() {
        let mut t = ServiceTable::new();
        t.apply(Change::UpsertService(svc("web", "10.96.0.1")))
            .unwrap();
        let cs = t
            .apply_batch([
                Change::DeleteSlice(SliceKey::new("default", "gone")),
                Change::UpsertSlice(slice("s", "web", &["10.0.0.1"])),
                Change::DeleteService(ServiceKey::new("default", "nope")),
            ])
            .unwrap();
        assert_eq!(cs.updated, vec![ServiceKey::new("default", "web")]);
        assert_eq!(
            cs.notes,
            vec![
                ChangeNote::AbsentDelete {
                    kind: "EndpointSlice",
                    key: "default/gone".into()
                },
                ChangeNote::AbsentDelete {
                    kind: "Service",
                    key: "default/nope".into()
                },
            ]
        );
        assert_eq!(addrs(&t, "web"), ["10.0.0.1:8080"]);
        assert!(
            cs.notes[0]
                .to_string()
                .contains("EndpointSlice default/gone")
        );
    }

    #[test]
    fn a_slice_before_its_service_waits_pending() {
        let mut t = ServiceTable::new();
        let cs = t
            .apply(Change::UpsertSlice(slice("s", "web", &["10.0.0.1"])))
            .unwrap();
        assert!(cs.updated.is_empty() && cs.removed.is_empty());
        assert_eq!(
            cs.notes,
            vec![ChangeNote::Pending {
                slice: SliceKey::new("default", "s"),
                service: ServiceKey::new("default", "web"),
            }]
        );
        let key = SliceKey::new("default", "s");
        assert!(t.is_pending(&key));
        assert!(t.view(&ServiceKey::new("default", "web")).is_none());
        let cs = t
            .apply(Change::UpsertService(svc("web", "10.96.0.1")))
            .unwrap();
        assert!(cs.notes.is_empty());
        assert!(!t.is_pending(&key));
        assert_eq!(addrs(&t, "web"), ["10.0.0.1:8080"]);
        // The service goes: the slice is pending again, then returns with it.
        let cs = t
            .apply(Change::DeleteService(ServiceKey::new("default", "web")))
            .unwrap();
        assert_eq!(cs.removed, vec![ServiceKey::new("default", "web")]);
        assert!(t.is_pending(&key));
        assert_eq!(t.pending_slices().count(), 1);
        t.apply(Change::UpsertService(svc("web", "10.96.0.1")))
            .unwrap();
        assert_eq!(addrs(&t, "web"), ["10.0.0.1:8080"]);
    }

    /// Every order of a service, its two slices and an update of one slice
    /// gives the same table; every order of their deletes empties it.
    #[test]
    fn every_watch_order_gives_the_same_table() {
        fn permutations(n: usize) -> Vec<Vec<usize>> {
            if n == 0 {
                return vec![vec![]];
            }
            let mut out = Vec::new();
            for p in permutations(n - 1) {
                for i in 0..=p.len() {
                    let mut q = p.clone();
                    q.insert(i, n - 1);
                    out.push(q);
                }
            }
            out
        }
        let adds = [
            Change::UpsertService(svc("web", "10.96.0.1")),
            Change::UpsertSlice(slice("web-a", "web", &["10.0.0.1", "10.0.0.2"])),
            Change::UpsertSlice(slice("web-b", "web", &["10.0.0.2", "10.0.0.3"])),
        ];
        let deletes = [
            Change::DeleteService(ServiceKey::new("default", "web")),
            Change::DeleteSlice(SliceKey::new("default", "web-a")),
            Change::DeleteSlice(SliceKey::new("default", "web-b")),
        ];
        let mut want = ServiceTable::new();
        want.apply_batch(adds.clone()).unwrap();
        let want = want.snapshot();
        for order in permutations(3) {
            // One change at a time, and the whole order as one batch.
            let mut one = ServiceTable::new();
            for &i in &order {
                one.apply(adds[i].clone()).unwrap();
            }
            assert_eq!(one.snapshot(), want, "{order:?}");
            let mut batch = ServiceTable::new();
            batch
                .apply_batch(order.iter().map(|&i| adds[i].clone()))
                .unwrap();
            assert_eq!(batch.snapshot(), want, "{order:?} as a batch");
            for del in permutations(3) {
                let mut t = one.clone();
                for &i in &del {
                    t.apply(deletes[i].clone()).unwrap();
                }
                assert!(t.is_empty(), "{order:?} then {del:?}");
                assert_eq!(t.pending_slices().count(), 0, "{order:?} then {del:?}");
                assert_eq!(t.snapshot(), ServiceTable::new().snapshot());
                // Deleting again is a no-op, noted.
                let cs = t.apply(deletes[del[0]].clone()).unwrap();
                assert_eq!(cs.notes.len(), 1);
            }
        }
    }

    #[test]
    fn vip_conflicts() {
        let mut t = ServiceTable::new();
        t.apply(Change::UpsertService(svc("web", "10.96.0.1")))
            .unwrap();
        let err = t
            .apply(Change::UpsertService(svc("api", "10.96.0.1")))
            .unwrap_err();
        assert_eq!(
            err,
            UpdateError::ConflictingPort {
                service: "default/api".into(),
                field: "spec.ports[0]".into(),
                value: "10.96.0.1:80/TCP".into(),
                other: "default/web".into()
            }
        );
        // Moving the VIP within one batch is fine.
        t.apply_batch([
            Change::DeleteService(ServiceKey::new("default", "web")),
            Change::UpsertService(svc("api", "10.96.0.1")),
        ])
        .unwrap();
    }

    #[test]
    fn deleting_a_service_leaves_its_slices_pending() {
        let mut t = ServiceTable::new();
        t.apply_batch([
            Change::UpsertService(svc("web", "10.96.0.1")),
            Change::UpsertSlice(slice("s", "web", &["10.0.0.1"])),
        ])
        .unwrap();
        let cs = t
            .apply(Change::DeleteService(ServiceKey::new("default", "web")))
            .unwrap();
        assert_eq!(cs.removed, vec![ServiceKey::new("default", "web")]);
        assert_eq!(
            cs.notes,
            vec![ChangeNote::Pending {
                slice: SliceKey::new("default", "s"),
                service: ServiceKey::new("default", "web"),
            }]
        );
        assert!(t.is_pending(&SliceKey::new("default", "s")));
        // The garbage collector's delete of the slice then succeeds.
        let cs = t
            .apply(Change::DeleteSlice(SliceKey::new("default", "s")))
            .unwrap();
        assert!(cs.notes.is_empty() && cs.removed.is_empty());
        assert!(t.slice(&SliceKey::new("default", "s")).is_none());
    }
}
