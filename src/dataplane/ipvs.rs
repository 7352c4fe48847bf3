//! kube-proxy's IPVS mode as a data structure.
//!
//! Virtual services live in a hash table keyed by (VIP, protocol, port), as
//! the kernel's `ip_vs_svc_table` does: a lookup costs the same at 10 or
//! 100,000 services. Each virtual service holds its destinations and a
//! scheduler built for them.
//!
//! Publication is whole-batch. The table is a hash trie (`vs_table`) kept
//! in two versions, left-right: the published one, and the one it
//! replaced, which the writer takes back once no reader holds it, brings
//! up to date by replaying the last batch's changes in place, changes by
//! the new batch, and publishes with one pointer store. Neither version
//! is copied, so a change touches only its key's path, in each version.
//! If a reader still holds the older version (a per-thread reader that
//! has not been called since), the writer instead clones the published
//! version, sharing its nodes, and copies each changed key's path
//! ([`Arc::make_mut`]); the two versions part again as they are changed.
//! Either way, adding or deleting a service, or changing its endpoints,
//! costs the same at 10 or 100,000 services, and readers see a batch
//! whole or not at all. Readers load the pointer without a lock; a writer
//! holds a mutex that readers never take.
//!
//! Each virtual service is a frontend of the [`plan`](crate::plan); its
//! destinations are the frontend's backends, by id. Connection counts live
//! in the connection layer, keyed by backend id, so they survive every
//! rebuild and a removed backend's counts stay while it drains (IPVS keeps
//! the `ip_vs_dest` at weight 0 until its connections end). Schedulers are
//! rebuilt from the previous ones: `rr` continues its rotation, `wrr` keeps
//! its current weight.
//!
//! `ClientIP` session affinity is IPVS persistence as kube-proxy sets it up
//! (the service's timeout, a full netmask, `expire_quiescent_template=1`):
//! a template per client in the [`AffinityTable`], whose timer restarts with
//! every new connection scheduled through it, dropped as soon as its
//! destination is gone or has weight 0. With the tracker on, a template
//! does not expire while it controls a tracked connection (`n_control`):
//! its timer is put off 60 s at a time, as `ip_vs_conn_expire` does (see
//! the [`affinity`](crate::affinity) module).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwap;
use arc_swap::cache::Cache;
use parking_lot::Mutex;

use super::conn::{ConnLayer, Scheduled, Snapshot};
use super::{Candidates, Dataplane, DataplaneConfig, Mode};
use crate::affinity::{AffinityEntry, AffinityPort, AffinityReport, AffinityTable, ScopeRegistry};
use crate::conntrack::{TcpFlags, Tracked};
use crate::model::flow::{Flow, FragmentKey, Protocol, Verdict};
use crate::model::service::{ServiceKey, SessionAffinity};
use crate::plan::{
    BackendId, BackendStates, Frontend, FrontendId, FrontendKey, Outcome, PlanDiff, Planner,
};
use crate::rng::SeededRng;
use crate::scheduler::Rotation;
use crate::scheduler::{Destination, PickContext, Selector};
use crate::table::{ChangeSet, ServiceTable};
use crate::time::Instant;

/// What a virtual service does with a new connection: its frontend
/// compiled for IPVS.
#[derive(Debug)]
struct FrontendState {
    frontend: FrontendId,
    outcome: Outcome,
    /// The real servers that may take new connections (weight 0 included).
    dests: Box<[Destination]>,
    /// Real servers kept at weight 0 while they drain (listing only).
    draining: Box<[Destination]>,
    selector: Option<Selector>,
    /// Persistence, for `ClientIP` services (boxed: it is large, and a
    /// lookup without affinity should touch as few cache lines as
    /// possible).
    affinity: Option<Box<AffinityPort>>,
}

/// The virtual services: a persistent trie of frontend states (see
/// [`super::vs_table`]). A sync publishes a new version whole.
type VsTable = super::vs_table::VsTable<FrontendState>;

/// The writer's second version of the table (left-right; see the module
/// docs): the snapshot the published one replaced, and the changes of
/// the batch it lacks.
#[derive(Debug, Default)]
struct Spare {
    /// The replaced snapshot (`None` before the first incremental batch
    /// and after a full one, which no log can replay).
    snapshot: Option<Arc<Snapshot<VsTable>>>,
    /// The published batch's changes, in order: a new state, or `None`
    /// for a removal.
    log: Vec<(FrontendKey, Option<Arc<FrontendState>>)>,
}

/// Most changes a kept [`Spare::log`] holds on to between syncs: a larger
/// batch's log is freed once replayed.
const SPARE_LOG_KEEP: usize = 1024;

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
    /// Its weight (0 = no new connections; a draining backend lists 0).
    pub weight: u32,
    /// Active (ESTABLISHED) tracked connections.
    pub active_conns: u32,
    /// Inactive tracked connections (every other state).
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

/// Everything readers and the writer share.
#[derive(Debug)]
struct Shared {
    config: DataplaneConfig,
    mode: Mode,
    rng: SeededRng,
    readers: AtomicU64,
    /// The table with the surface and reply index: one store per batch.
    table: Arc<ArcSwap<Snapshot<VsTable>>>,
    /// The table's other version; locked by sync only.
    spare: Mutex<Spare>,
    affinity: AffinityTable,
    /// Affinity scopes by virtual service; locked by sync and inspection.
    scopes: Mutex<ScopeRegistry>,
    /// The plan; locked by sync, timers and inspection, never by `route`.
    planner: Mutex<Planner>,
    states: Arc<BackendStates>,
    conn: ConnLayer,
}

/// The IPVS-mode dataplane. See the module docs.
#[derive(Debug)]
pub struct IpvsDataplane {
    shared: Arc<Shared>,
}

/// A per-thread reader of an [`IpvsDataplane`] (or an
/// [`NftablesDataplane`](super::NftablesDataplane)): see
/// [`IpvsDataplane::reader`]. Owned, `'static` and `Send`.
#[derive(Debug)]
pub struct IpvsReader {
    shared: Arc<Shared>,
    table: Cache<Arc<ArcSwap<Snapshot<VsTable>>>, Arc<Snapshot<VsTable>>>,
    rng: SeededRng,
    /// This reader's own `rr`/`wrr` positions, by frontend id (unless
    /// [`DataplaneConfig::global_rotation`]).
    rotations: Vec<Rotation>,
}

/// `rotations[id]`, grown (in powers of two) the first time a frontend id
/// beyond the end is seen.
#[inline]
fn rotation_of(rotations: &mut Vec<Rotation>, id: FrontendId) -> &Rotation {
    let i = id.0 as usize;
    if i >= rotations.len() {
        rotations.resize_with((i + 1).next_power_of_two(), Rotation::default);
    }
    &rotations[i]
}

impl IpvsReader {
    /// Records a fragmented datagram's connection, as
    /// [`Dataplane::first_fragment`].
    pub fn first_fragment(&self, datagram: &FragmentKey, connection: &Flow, now: Instant) -> bool {
        self.shared.conn.first_fragment(datagram, connection, now)
    }

    /// A later fragment's connection, as [`Dataplane::later_fragment`].
    pub fn later_fragment(&self, datagram: &FragmentKey, now: Instant) -> Option<Tracked> {
        self.shared
            .conn
            .later_fragment(&self.shared.states, datagram, now)
    }

    /// A new connection's first packet, as [`Dataplane::route`].
    #[inline]
    pub fn route(&mut self, flow: &Flow, now: Instant) -> Verdict {
        self.route_with_key(flow, None, now)
    }

    /// [`route`](Self::route) with a caller-supplied affinity key, as
    /// [`Dataplane::route_with_key`] does.
    #[inline]
    pub fn route_with_key(&mut self, flow: &Flow, key: Option<u64>, now: Instant) -> Verdict {
        self.packet_with_key(flow, key, first_packet(flow), now)
    }

    /// Any packet of a flow, as [`Dataplane::packet`].
    #[inline]
    pub fn packet(&mut self, flow: &Flow, flags: TcpFlags, now: Instant) -> Verdict {
        self.packet_with_key(flow, None, flags, now)
    }

    #[inline]
    fn packet_with_key(
        &mut self,
        flow: &Flow,
        key: Option<u64>,
        flags: TcpFlags,
        now: Instant,
    ) -> Verdict {
        let shared = &*self.shared;
        if let Some(v) = shared.conn.established(&shared.states, flow, flags, now) {
            return v;
        }
        let snap = self.table.load();
        let (table, surface) = (&snap.table, &*snap.surface);
        let rng = &self.rng;
        let rotations = &mut self.rotations;
        let local = !shared.config.global_rotation;
        shared
            .conn
            .new_connection(surface, &shared.states, flow, flags, now, rng, |flow| {
                let rotations = local.then_some(&mut *rotations);
                shared.schedule(table, rotations, flow, key, now, rng, &[])
            })
    }

    /// A retry without the backends whose connect failed, as
    /// [`Dataplane::route_excluding_with_key`].
    pub fn route_excluding_with_key(
        &mut self,
        flow: &Flow,
        key: Option<u64>,
        exclude: &[BackendId],
        now: Instant,
    ) -> Verdict {
        let shared = &*self.shared;
        let snap = self.table.load();
        let (table, surface) = (&snap.table, &*snap.surface);
        let rng = &self.rng;
        let rotations = &mut self.rotations;
        let local = !shared.config.global_rotation;
        shared.conn.route_excluding(
            surface,
            &shared.states,
            flow,
            exclude,
            now,
            rng,
            |flow, exclude| {
                let rotations = local.then_some(&mut *rotations);
                shared.schedule(table, rotations, flow, key, now, rng, exclude)
            },
        )
    }
}

/// The flags of a connection's first packet: a SYN for TCP.
#[inline]
pub(crate) fn first_packet(flow: &Flow) -> TcpFlags {
    match flow.protocol {
        Protocol::Tcp => TcpFlags::SYN,
        _ => TcpFlags::default(),
    }
}

impl Shared {
    fn new(mut config: DataplaneConfig, mode: Mode) -> Self {
        let (planner, conn) = super::connection_setup(&mut config, mode);
        Shared {
            rng: SeededRng::new(config.seed),
            readers: AtomicU64::new(0),
            // Persistence templates live while they control tracked
            // connections (the kernel's n_control); nftables' affinity sets
            // keep their own timers.
            affinity: AffinityTable::new(config.affinity.clone(), config.seed)
                .with_controls(conn.controls().filter(|_| mode == Mode::Ipvs).cloned()),
            table: Arc::new(ArcSwap::from_pointee(conn.empty(VsTable::default()))),
            spare: Mutex::new(Spare::default()),
            scopes: Mutex::new(ScopeRegistry::default()),
            states: Arc::clone(planner.states()),
            planner: Mutex::new(planner),
            conn,
            config,
            mode,
        }
    }

    /// Whether destinations must carry the connection counts.
    fn counted(&self) -> bool {
        self.config.count_connections || self.config.scheduler.may_use_connection_counts()
    }

    /// Compiles one frontend, from the previous state of its slot.
    fn build_state(
        &self,
        fe: &Frontend,
        old: Option<&FrontendState>,
        scopes: &mut ScopeRegistry,
    ) -> FrontendState {
        let svc = fe.service();
        let key = fe.key();
        let vs = (key.protocol, key.socket_addr());
        let counts = self.conn.counts();
        let dest = |b: &crate::plan::PlanBackend, w: u32| {
            if self.counted() {
                Destination::counted(b.id(), b.addr(), w, Arc::clone(counts))
            } else {
                Destination::with_id(b.id(), b.addr(), w)
            }
        };
        let draining: Box<[Destination]> = fe.draining().iter().map(|b| dest(b, 0)).collect();
        // The IPVS mode lists what kube-proxy's `syncEndpoint` gives the
        // virtual server; the modes that share this table (nftables, the
        // eBPF model) take the plan's outcome.
        let (outcome, backends) = if self.mode == Mode::Ipvs {
            fe.ipvs_backends()
        } else {
            (fe.outcome(), fe.backends())
        };
        match outcome {
            Outcome::Forward => {
                let dests: Box<[Destination]> =
                    backends.iter().map(|b| dest(b, b.weight())).collect();
                let previous = old.and_then(|o| o.selector.as_ref().map(|s| (s, &*o.dests)));
                let selector = self.config.scheduler.rebuild(&dests, previous);
                // Only a ClientIP service needs the addresses (a service
                // without affinity binds no scope).
                let addrs: Vec<SocketAddr> = match svc.session_affinity() {
                    SessionAffinity::ClientIp { .. } => {
                        dests.iter().map(Destination::addr).collect()
                    }
                    SessionAffinity::None => Vec::new(),
                };
                // A weight-0 destination takes no new connections: its
                // templates expire (expire_quiescent_template).
                let affinity =
                    scopes.bind(&self.affinity, svc, vs, &addrs, |i| dests[i].weight() > 0);
                if let Some(a) = &affinity {
                    a.scope.set_frontend(fe.id().0);
                }
                if affinity.is_none() {
                    scopes.remove_vs(&self.affinity, vs);
                }
                FrontendState {
                    frontend: fe.id(),
                    outcome: Outcome::Forward,
                    dests,
                    draining,
                    selector: Some(selector),
                    affinity: affinity.map(Box::new),
                }
            }
            outcome => {
                // No destinations: every template goes.
                if scopes
                    .bind(&self.affinity, svc, vs, &[], |_| true)
                    .is_none()
                {
                    scopes.remove_vs(&self.affinity, vs);
                }
                FrontendState {
                    frontend: fe.id(),
                    outcome,
                    dests: Box::default(),
                    draining,
                    selector: None,
                    affinity: None,
                }
            }
        }
    }

    /// Publishes a plan diff as one new version of the table: removed
    /// virtual services leave it, added and changed ones get new states,
    /// and one pointer store makes the whole batch visible at once, with
    /// the surface and the reply index of the same plan. An incremental
    /// diff is applied to the spare version when no reader holds it (see
    /// the module docs), else to a clone of the published one; either way
    /// each change touches only its key's path in the trie, so its cost
    /// does not depend on the number of services.
    fn apply(&self, planner: &Planner, diff: &PlanDiff) {
        let mut scopes = self.scopes.lock();
        let scopes = &mut *scopes;
        let mut spare = self.spare.lock();
        let spare = &mut *spare;
        let current = self.table.load_full();
        let next = if diff.full {
            let mut fresh = current.table.empty_like();
            for fe in planner.frontends() {
                let old = current.table.get(&fe.key());
                let st = self.build_state(fe, old.map(|o| &**o), scopes);
                fresh.insert(fe.key(), Arc::new(st));
            }
            for (_, key) in &diff.removed {
                scopes.remove_vs(&self.affinity, (key.protocol, key.socket_addr()));
            }
            scopes.retain_vs(&self.affinity, |vs| {
                fresh.contains_key(&FrontendKey::new(vs.0, vs.1))
            });
            // No log replays a full rebuild: the next batch starts from a
            // clone of this version.
            spare.snapshot = None;
            spare.log.clear();
            fresh
        } else {
            let mut next = Self::take_spare(spare, &current);
            for (_, key) in &diff.removed {
                scopes.remove_vs(&self.affinity, (key.protocol, key.socket_addr()));
                if next.remove(key).is_some() {
                    spare.log.push((*key, None));
                }
            }
            for id in diff.added.iter().chain(&diff.changed) {
                let Some(fe) = planner.frontend(*id) else {
                    continue;
                };
                let old = next.get(&fe.key()).cloned();
                let st = Arc::new(self.build_state(fe, old.as_deref(), scopes));
                next.insert(fe.key(), Arc::clone(&st));
                spare.log.push((fe.key(), Some(st)));
            }
            next
        };
        let mut replaced = self
            .conn
            .publish(&self.table, planner, diff, &current, next);
        drop(current);
        if !diff.full {
            if let Some(old) = Arc::get_mut(&mut replaced) {
                // Only its table is taken back: the surface and reply
                // index it held (which this batch may have rebuilt) go
                // now, not at the next sync.
                let now = self.table.load();
                old.surface = Arc::clone(&now.surface);
                old.replies = Arc::clone(&now.replies);
            }
            spare.snapshot = Some(replaced);
        }
    }

    /// The version to change for the next batch, equal to `current`'s
    /// table: the spare snapshot taken back and brought up to date by its
    /// log when no reader holds it, else a clone of `current`'s (sharing
    /// every node). Leaves the log empty.
    fn take_spare(spare: &mut Spare, current: &Snapshot<VsTable>) -> VsTable {
        let log = &mut spare.log;
        let table = match spare.snapshot.take().map(Arc::try_unwrap) {
            Some(Ok(old)) => {
                let mut table = old.table;
                for (key, state) in log.drain(..) {
                    match state {
                        Some(state) => table.insert(key, state),
                        None => table.remove(&key),
                    };
                }
                debug_assert_eq!(table.len(), current.table.len());
                table
            }
            // Held by a reader (or none yet): the published version,
            // copied on write.
            _ => {
                log.clear();
                current.table.clone()
            }
        };
        if log.capacity() > SPARE_LOG_KEEP {
            *log = Vec::new();
        }
        table
    }

    /// What a new connection gets at its virtual service in `table`,
    /// with the calling reader's own rotations (`None`: the shared one).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn schedule(
        &self,
        table: &VsTable,
        rotations: Option<&mut Vec<Rotation>>,
        flow: &Flow,
        key: Option<u64>,
        now: Instant,
        rng: &SeededRng,
        exclude: &[BackendId],
    ) -> Scheduled {
        match table.get(&FrontendKey::new(flow.protocol, flow.dst)) {
            None => Scheduled::NotAService,
            Some(state) => {
                let rotation = rotations.map(|r| rotation_of(r, state.frontend));
                self.decide(state, flow, key, now, rng, rotation, exclude)
            }
        }
    }

    /// What a new connection to the virtual service `state` gets.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        state: &FrontendState,
        flow: &Flow,
        key: Option<u64>,
        now: Instant,
        rng: &SeededRng,
        rotation: Option<&Rotation>,
        exclude: &[BackendId],
    ) -> Scheduled {
        let Some(selector) = &state.selector else {
            return match state.outcome {
                Outcome::Drop => Scheduled::Drop,
                _ => Scheduled::Reject,
            };
        };
        let dests = &state.dests;
        let ctx = PickContext {
            flow,
            now,
            rng,
            rotation,
        };
        let picked = match &state.affinity {
            None => selector
                .pick_excluding(dests, &ctx, exclude)
                .map(|i| (i, Default::default())),
            Some(aff) => {
                // A pin to an excluded backend is replaced.
                let pinned = self.affinity.route(
                    &aff.scope,
                    aff.key(flow, key),
                    now,
                    |ep| {
                        aff.position(ep).filter(|&i| {
                            exclude.is_empty()
                                || dests.get(i).is_some_and(|d| !exclude.contains(&d.id()))
                        })
                    },
                    || {
                        selector
                            .pick_excluding(dests, &ctx, exclude)
                            .map(|i| (i, dests[i].addr()))
                    },
                );
                pinned.map(|p| {
                    aff.count(p.index);
                    (p.index, p.control)
                })
            }
        };
        match picked.and_then(|(i, control)| dests.get(i).map(|d| (d, control))) {
            Some((d, control)) => Scheduled::Forward {
                frontend: state.frontend,
                backend: d.id(),
                addr: d.addr(),
                control,
            },
            None => Scheduled::Reject,
        }
    }

    #[inline]
    fn packet(&self, flow: &Flow, key: Option<u64>, flags: TcpFlags, now: Instant) -> Verdict {
        if let Some(v) = self.conn.established(&self.states, flow, flags, now) {
            return v;
        }
        let snap = self.table.load();
        let table = &snap.table;
        self.conn.new_connection(
            &snap.surface,
            &self.states,
            flow,
            flags,
            now,
            &self.rng,
            |flow| self.schedule(table, None, flow, key, now, &self.rng, &[]),
        )
    }

    fn route_excluding(
        &self,
        flow: &Flow,
        key: Option<u64>,
        exclude: &[BackendId],
        now: Instant,
    ) -> Verdict {
        let snap = self.table.load();
        let table = &snap.table;
        self.conn.route_excluding(
            &snap.surface,
            &self.states,
            flow,
            exclude,
            now,
            &self.rng,
            |flow, exclude| self.schedule(table, None, flow, key, now, &self.rng, exclude),
        )
    }

    fn sync(&self, table: &ServiceTable, changes: &ChangeSet, now: Instant) {
        let mut planner = self.planner.lock();
        let diff = planner.update(table, changes, now, |id| self.conn.has_connections(id));
        self.apply(&planner, &diff);
    }

    fn reply(&self, reply: &Flow, flags: Option<TcpFlags>, now: Instant) -> Option<Tracked> {
        self.conn
            .reply_of(&self.table.load().replies, reply, flags, now)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        super::earliest(self.conn.poll_timeout(), self.planner.lock().poll_timeout())
    }

    fn handle_timeout(&self, now: Instant) {
        self.conn.handle_timeout(now);
        let mut planner = self.planner.lock();
        let diff = planner.handle_timeout(now, |id| self.conn.has_connections(id));
        if !diff.is_empty() {
            self.apply(&planner, &diff);
        }
    }

    fn candidates(&self, protocol: Protocol, dst: SocketAddr) -> Candidates {
        let snap = self.table.load();
        let Some(state) = snap.table.get(&FrontendKey::new(protocol, dst)) else {
            return Candidates::NotAService;
        };
        match state.outcome {
            Outcome::Drop => Candidates::Drop,
            Outcome::Forward => {
                let eligible: Vec<SocketAddr> = state
                    .dests
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
            _ => Candidates::Reject,
        }
    }
}

impl IpvsDataplane {
    /// An empty dataplane (every flow is not-a-service until a sync).
    pub fn new(config: DataplaneConfig) -> Self {
        Self::with_mode(config, Mode::Ipvs)
    }

    /// The userspace model of the eBPF dataplane (`--mode ebpf`): the IPVS
    /// frontend table and the connection layer, with the TC program's pick
    /// ([`KernelMaglevFactory`](crate::ebpf::model::KernelMaglevFactory):
    /// its flow hash and Maglev table) as the only scheduler, and the
    /// program's timeouts. For a new connection it decides exactly what the
    /// kernel program decides for the frontends
    /// [`frontend_spec`](crate::ebpf::model::frontend_spec) writes.
    pub fn ebpf_model(mut config: DataplaneConfig) -> Self {
        config.scheduler = crate::scheduler::SchedulerConfig::Custom(
            crate::ebpf::model::KernelMaglevFactory::shared(),
        );
        Self::with_mode(config, Mode::Ebpf)
    }

    pub(crate) fn with_mode(config: DataplaneConfig, mode: Mode) -> Self {
        IpvsDataplane {
            shared: Arc::new(Shared::new(config, mode)),
        }
    }

    /// The session-affinity table (the persistence templates).
    pub fn affinity_table(&self) -> &AffinityTable {
        &self.shared.affinity
    }

    /// The config (with the mode's conntrack timeouts filled in).
    pub fn config(&self) -> &DataplaneConfig {
        &self.shared.config
    }

    /// The number of virtual services.
    pub fn virtual_service_count(&self) -> usize {
        self.shared.table.load().table.len()
    }

    /// The connection tracker, when tracking is on.
    pub fn conntrack(&self) -> Option<&crate::conntrack::Conntrack> {
        self.shared.conn.tracker()
    }

    /// Every virtual service with its destinations and live counters, as
    /// `ipvsadm -ln` lists them: sorted by address family, protocol number,
    /// address and port; destinations by address and port. Draining
    /// backends are listed at weight 0. A read-only snapshot for
    /// inspection; it allocates.
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
    /// dp.sync(&table, &changes, Instant::ZERO);
    /// let flow = Flow::tcp("10.1.0.9:40000".parse().unwrap(), "10.96.0.10:80".parse().unwrap());
    /// dp.route(&flow, Instant::ZERO);
    /// let vs = dp.virtual_services();
    /// assert_eq!(vs[0].scheduler, "rr");
    /// assert_eq!(vs[0].destinations[0].addr, "10.0.0.2:8080".parse().unwrap());
    /// assert_eq!(vs[0].destinations[0].inactive_conns, 1, "a SYN_RECV connection");
    /// ```
    pub fn virtual_services(&self) -> Vec<VirtualServiceInfo> {
        let planner = self.shared.planner.lock();
        let snap = self.shared.table.load();
        let table = &snap.table;
        let counts = self.shared.conn.counts();
        let mut out = Vec::with_capacity(table.len());
        for fe in planner.frontends() {
            let Some(state) = table.get(&fe.key()) else {
                continue;
            };
            let mut destinations: Vec<RealServerInfo> = state
                .dests
                .iter()
                .chain(state.draining.iter())
                .map(|d| {
                    let (active, inactive) = counts.get(d.id());
                    RealServerInfo {
                        addr: d.addr(),
                        weight: d.weight(),
                        active_conns: active,
                        inactive_conns: inactive,
                    }
                })
                .collect();
            destinations.sort_by_key(|d| (d.addr.ip(), d.addr.port()));
            destinations.dedup_by_key(|d| d.addr);
            let key = fe.key();
            out.push(VirtualServiceInfo {
                service: fe.service().key().clone(),
                addr: key.addr,
                protocol: key.protocol,
                port: key.port,
                scheduler: self.shared.config.scheduler.name().to_owned(),
                destinations,
            });
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

    /// A reader for one packet thread: routes like [`Dataplane::route`],
    /// with its own random source (seeded from the dataplane's seed and the
    /// reader's number), and keeps the virtual-service table it last saw,
    /// checking with one atomic load that it is still the current one (an
    /// [`arc_swap::cache::Cache`]). The state of a virtual service is still
    /// loaded afresh, so endpoint changes show at once.
    ///
    /// The reader is owned (`'static`, `Send`): move it into its thread.
    /// It keeps the table it last saw alive until its next `route` or its
    /// drop: keep one per packet thread, not one per idle connection.
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
    /// let mut reader = dp.reader();
    /// let flow = Flow::tcp("10.1.0.9:40000".parse().unwrap(), "10.96.0.10:80".parse().unwrap());
    /// let t = std::thread::spawn(move || reader.route(&flow, Instant::ZERO).backend());
    /// assert_eq!(t.join().unwrap(), Some("10.0.0.2:8080".parse().unwrap()));
    /// ```
    pub fn reader(&self) -> IpvsReader {
        IpvsReader {
            shared: Arc::clone(&self.shared),
            table: Cache::new(Arc::clone(&self.shared.table)),
            rng: super::reader_rng(self.shared.config.seed, &self.shared.readers),
            rotations: if self.shared.config.global_rotation {
                Vec::new()
            } else {
                // Room for every frontend id in use, so that a warm reader
                // does not grow it.
                let n = self.shared.planner.lock().frontend_count();
                (0..n.next_power_of_two())
                    .map(|_| Rotation::default())
                    .collect()
            },
        }
    }
}

impl Dataplane for IpvsDataplane {
    fn generation_gaps(&self) -> u64 {
        self.shared.planner.lock().generation_gaps()
    }

    fn mode(&self) -> Mode {
        self.shared.mode
    }

    fn sync(&self, table: &ServiceTable, changes: &ChangeSet, now: Instant) {
        self.shared.sync(table, changes, now);
    }

    #[inline]
    fn route_with_key(&self, flow: &Flow, key: Option<u64>, now: Instant) -> Verdict {
        self.shared.packet(flow, key, first_packet(flow), now)
    }

    #[inline]
    fn packet(&self, flow: &Flow, flags: TcpFlags, now: Instant) -> Verdict {
        self.shared.packet(flow, None, flags, now)
    }

    fn route_excluding_with_key(
        &self,
        flow: &Flow,
        key: Option<u64>,
        exclude: &[BackendId],
        now: Instant,
    ) -> Verdict {
        self.shared.route_excluding(flow, key, exclude, now)
    }

    fn connection_closed(&self, flow: &Flow, _now: Instant) -> Option<Tracked> {
        self.shared.conn.close(flow)
    }

    fn reply(&self, reply: &Flow, flags: TcpFlags, now: Instant) -> Option<Tracked> {
        self.shared.reply(reply, Some(flags), now)
    }

    fn peek_reply(&self, reply: &Flow, now: Instant) -> Option<Tracked> {
        self.shared.reply(reply, None, now)
    }

    fn peek(&self, flow: &Flow, now: Instant) -> Option<Tracked> {
        self.shared.conn.peek(&self.shared.states, flow, now)
    }

    fn first_fragment(&self, datagram: &FragmentKey, connection: &Flow, now: Instant) -> bool {
        self.shared.conn.first_fragment(datagram, connection, now)
    }

    fn later_fragment(&self, datagram: &FragmentKey, now: Instant) -> Option<Tracked> {
        self.shared
            .conn
            .later_fragment(&self.shared.states, datagram, now)
    }

    fn candidates(&self, protocol: Protocol, dst: SocketAddr) -> Candidates {
        self.shared.candidates(protocol, dst)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.shared.poll_timeout()
    }

    fn handle_timeout(&self, now: Instant) {
        self.shared.handle_timeout(now);
    }

    fn connections(&self, now: Instant) -> Vec<Tracked> {
        self.shared.conn.entries(now)
    }

    fn affinity_entries(&self, service: &ServiceKey, now: Instant) -> Vec<AffinityEntry> {
        self.shared
            .scopes
            .lock()
            .entries(&self.shared.affinity, service, now)
    }

    fn affinity_report(&self, service: &ServiceKey, now: Instant) -> Option<AffinityReport> {
        self.shared
            .scopes
            .lock()
            .report(&self.shared.affinity, service, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::endpoint_slice::{AddressType, EndpointSlice, EndpointSpec, SlicePortSpec};
    use crate::model::service::{Service, ServicePortSpec};
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

    /// A reader made before any sync sees every later change: new services
    /// (a new table), endpoint changes (a new version) and deletions.
    #[test]
    fn reader_follows_every_kind_of_change() {
        let mut config = DataplaneConfig::with_seed(3);
        config.conntrack = None;
        let dp = IpvsDataplane::new(config);
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
        dp.sync(&t, &cs, Instant::ZERO);
        let one: SocketAddr = "10.1.0.1:8080".parse().unwrap();
        assert_eq!(reader.route(&web, Instant::ZERO).backend(), Some(one));
        let cs = t
            .apply(Change::UpsertSlice(slice("web", &["10.1.0.9"])))
            .unwrap();
        dp.sync(&t, &cs, Instant::ZERO);
        let nine: SocketAddr = "10.1.0.9:8080".parse().unwrap();
        assert_eq!(reader.route(&web, Instant::ZERO).backend(), Some(nine));
        let cs = t
            .apply(Change::UpsertService(service("api", "10.96.0.2")))
            .unwrap();
        dp.sync(&t, &cs, Instant::ZERO);
        assert_eq!(reader.route(&api, Instant::ZERO), Verdict::Reject);
        assert_eq!(reader.route(&web, Instant::ZERO).backend(), Some(nine));
        let cs = t
            .apply(Change::DeleteService(ServiceKey::new("default", "web")))
            .unwrap();
        dp.sync(&t, &cs, Instant::ZERO);
        assert_eq!(reader.route(&web, Instant::ZERO), Verdict::NotAService);
        assert_eq!(dp.route(&web, Instant::ZERO), Verdict::NotAService);
    }

    /// What a version of the table holds: each key with its state's
    /// outcome and destinations (by address), in key order.
    fn contents(table: &VsTable) -> Vec<(FrontendKey, String, Vec<SocketAddr>)> {
        let mut out: Vec<_> = table
            .entries()
            .into_iter()
            .map(|(k, st)| {
                let dests = st.dests.iter().map(|d| d.addr()).collect();
                (k, format!("{:?}", st.outcome), dests)
            })
            .collect();
        out.sort_by_key(|e| e.0);
        out
    }

    /// The left-right versions: whether the spare is taken back and
    /// replayed in place (nothing holds it) or the published version is
    /// cloned (something does), the published table equals a fresh full
    /// sync's after every batch, and a version something still holds
    /// never changes under it.
    #[test]
    fn both_versions_follow_every_batch_and_a_held_one_never_changes() {
        let config = || DataplaneConfig::with_seed(5);
        let dp = IpvsDataplane::new(config());
        let mut t = ServiceTable::new();
        let mut held: Vec<(Arc<Snapshot<VsTable>>, Vec<_>)> = Vec::new();
        let (mut in_place, mut cloned) = (0, 0);
        for step in 0..120u32 {
            let i = step * 7 % 13;
            let name = format!("s{i}");
            let ip = format!("10.1.{i}.{}", step % 200 + 1);
            let batch = match step % 5 {
                0 | 1 => vec![
                    Change::UpsertService(service(&name, &format!("10.96.0.{}", i + 1))),
                    Change::UpsertSlice(slice(&name, &[ip.as_str()])),
                ],
                2 => vec![Change::UpsertSlice(slice(
                    &name,
                    &[ip.as_str(), "10.1.99.1"],
                ))],
                3 => vec![Change::DeleteService(ServiceKey::new("default", &name))],
                _ => vec![
                    Change::DeleteService(ServiceKey::new("default", &name)),
                    Change::UpsertService(service(&format!("t{i}"), &format!("10.96.1.{}", i + 1))),
                ],
            };
            let cs = t.apply_batch(batch).unwrap();
            let reusable = dp
                .shared
                .spare
                .lock()
                .snapshot
                .as_ref()
                .is_some_and(|s| Arc::strong_count(s) == 1);
            if step % 9 == 0 {
                // A full sync now and then: it leaves no spare.
                dp.sync(&t, &t.full_change_set(), Instant::ZERO);
            } else {
                dp.sync(&t, &cs, Instant::ZERO);
                if reusable { in_place += 1 } else { cloned += 1 }
            }
            let fresh = IpvsDataplane::new(config());
            fresh.sync(&t, &t.full_change_set(), Instant::ZERO);
            assert_eq!(
                contents(&dp.shared.table.load().table),
                contents(&fresh.shared.table.load().table),
                "step {step}"
            );
            for (snap, before) in &held {
                assert_eq!(
                    &contents(&snap.table),
                    before,
                    "a held version, step {step}"
                );
            }
            match step % 6 {
                0 => {
                    let snap = dp.shared.table.load_full();
                    let before = contents(&snap.table);
                    held.push((snap, before));
                }
                3 => held.clear(),
                _ => {}
            }
        }
        assert!(
            in_place > 30 && cloned > 10,
            "in place {in_place}, cloned {cloned}"
        );
    }

    /// The spare keeps only its table: a batch that rebuilds the
    /// surface (here, an external IP) does not leave the old one alive in
    /// the spare until the next sync.
    #[test]
    fn the_spare_holds_no_replaced_surface_or_reply_index() {
        let dp = IpvsDataplane::new(DataplaneConfig::with_seed(6));
        let mut t = ServiceTable::new();
        let cs = t
            .apply_batch([
                Change::UpsertService(service("web", "10.96.0.1")),
                Change::UpsertSlice(slice("web", &["10.1.0.1"])),
            ])
            .unwrap();
        dp.sync(&t, &cs, Instant::ZERO);
        let before = Arc::clone(&dp.shared.table.load().surface);
        let np = Service::builder("default", "np")
            .cluster_ip("10.96.0.2".parse().unwrap())
            .external_ip("192.0.2.10".parse().unwrap())
            .port(ServicePortSpec::tcp(80).target_port(8080))
            .build()
            .unwrap();
        let cs = t.apply(Change::UpsertService(np)).unwrap();
        dp.sync(&t, &cs, Instant::ZERO);
        let now = dp.shared.table.load();
        assert!(
            !Arc::ptr_eq(&before, &now.surface),
            "the external IP rebuilt the surface"
        );
        let spare = dp.shared.spare.lock();
        let kept = spare
            .snapshot
            .as_ref()
            .expect("a spare after an incremental sync");
        assert!(Arc::ptr_eq(&kept.surface, &now.surface));
        assert!(Arc::ptr_eq(&kept.replies, &now.replies));
    }

    fn assert_send_static<T: Send + 'static>() {}

    #[test]
    fn readers_are_owned_and_send() {
        assert_send_static::<IpvsReader>();
    }
}
