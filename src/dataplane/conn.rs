//! The connection layer every dataplane shares: the tracker in front of the
//! mode's scheduling, graceful termination and `expire_nodest_conn`.
//!
//! A packet first meets the [`Conntrack`]. A live entry whose backend is
//! active or draining forwards to that backend (the flow keeps its backend
//! across any endpoint change); an entry whose backend is gone is expired:
//! a UDP or SCTP flow (whose conntrack entries kube-proxy clears) and a TCP
//! SYN are scheduled afresh, any other TCP packet is dropped
//! (`expire_nodest_conn`). A miss, or a SYN that reopens a connection in
//! TIME_WAIT or CLOSE, goes to the mode's scheduler, and a forward is
//! tracked.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use ahash::AHashMap;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use smallvec::SmallVec;

use super::fragments::Fragments;
use super::reply_index::{ReplyFrontends, ReplyIndex};

use crate::conntrack::control::{Controlled, Controls};
use crate::conntrack::{ConnState, Conntrack, ConntrackConfig, Peek, TcpFlags, TcpState, Tracked};
use crate::model::flow::{Flow, Forward, FragmentKey, Protocol, Verdict};
use crate::model::service::TrafficPolicy;
use crate::plan::{
    BackendId, BackendState, BackendStates, FrontendId, FrontendKey, FrontendKind, Outcome,
    PlanDiff, Planner,
};
use crate::render::Cidr;
use crate::rng::SeededRng;
use crate::scheduler::ConnectionCounts;
use crate::time::Instant;

/// What kube-proxy decides from a packet's *source*, beside the mode's
/// lookup: the masquerade decision, `loadBalancerSourceRanges`, and the
/// short-circuit of this node's own traffic to external destinations of
/// `externalTrafficPolicy: Local` services. Built from the plan at each
/// sync and published whole.
///
/// kube-proxy's IPVS mode has no short-circuit: its virtual servers of an
/// external Local destination list the local endpoints (or, with none,
/// the Cluster-policy ones: [`Frontend::ipvs_backends`]) for every source,
/// and it marks none of that traffic for masquerade
/// (`KUBE-NODE-PORT-LOCAL-*`, `KUBE-LOAD-BALANCER-LOCAL` RETURN before
/// `KUBE-MARK-MASQ`; `KUBE-EXTERNAL-IP-LOCAL` has no masquerade rule, in
/// kubernetes `pkg/proxy/ipvs/proxier.go`, `writeIptablesRules`).
///
/// [`Frontend::ipvs_backends`]: crate::plan::Frontend::ipvs_backends
#[derive(Debug, Default)]
pub(crate) struct Surface {
    /// `--cluster-cidr` (kube-proxy's local-traffic detector); empty: none.
    cluster_cidrs: Box<[Cidr]>,
    /// `--masquerade-all`.
    masquerade_all: bool,
    /// kube-proxy's IPVS mode (see above).
    ipvs: bool,
    /// This node's addresses (`--src-type LOCAL`).
    node_ips: Box<[IpAddr]>,
    /// The external frontends (a frontend not listed is a cluster IP).
    by_id: AHashMap<FrontendId, FrontendPolicy>,
    /// External frontends whose new connections depend on the source.
    special: AHashMap<FrontendKey, FrontendId>,
}

#[derive(Debug, Default)]
struct FrontendPolicy {
    kind: Option<FrontendKind>,
    external_local: bool,
    /// The service has usable endpoints somewhere (its outcome is not
    /// REJECT).
    has_endpoints: bool,
    /// Where short-circuited traffic goes when the service's cluster IP
    /// uses the Cluster policy: that cluster IP and port.
    cluster_target: Option<SocketAddr>,
    /// Otherwise, the Cluster-policy endpoints themselves.
    cluster_backends: Box<[(BackendId, SocketAddr)]>,
    /// `loadBalancerSourceRanges` (load-balancer frontends only).
    source_ranges: Box<[Cidr]>,
    /// Sources let through besides the ranges: the load-balancer IPs,
    /// when a range holds a node IP (kube-proxy's `allowFromNode`).
    source_extra: Box<[IpAddr]>,
}

/// A new connection's treatment before the mode's lookup.
enum Admit<'a> {
    /// The mode decides.
    Lookup,
    /// Dropped by `loadBalancerSourceRanges` (`KUBE-PROXY-FIREWALL`).
    Drop,
    /// Short-circuited to the Cluster policy through this cluster IP.
    Redirect(SocketAddr, FrontendId),
    /// Short-circuited to these Cluster-policy endpoints.
    Pick(&'a [(BackendId, SocketAddr)], FrontendId),
}

impl Surface {
    /// The surface of `planner`'s frontends under `config`'s addresses.
    pub(crate) fn build(
        planner: &Planner,
        cluster_cidrs: &[Cidr],
        masquerade_all: bool,
        ipvs: bool,
    ) -> Surface {
        let node_ips: Box<[IpAddr]> = planner.node_addresses().node_ips.clone().into();
        let mut by_id = AHashMap::new();
        let mut special = AHashMap::new();
        for fe in planner.frontends() {
            let kind = fe.kind();
            if !kind.is_external() {
                continue;
            }
            let svc = fe.service();
            let lb = kind == FrontendKind::LoadBalancer;
            let source_ranges: Box<[Cidr]> = if lb {
                svc.load_balancer_source_ranges().into()
            } else {
                Box::default()
            };
            let allow_node = source_ranges
                .iter()
                .any(|c| node_ips.iter().any(|ip| c.contains(*ip)));
            let source_extra: Box<[IpAddr]> = if allow_node {
                svc.load_balancer_vips().collect()
            } else {
                Box::default()
            };
            let external_local = fe.external_local();
            let cluster_target = (external_local
                && svc.internal_traffic_policy() == TrafficPolicy::Cluster)
                .then(|| {
                    svc.cluster_ip()
                        .addrs()
                        .iter()
                        .find(|ip| ip.is_ipv4() == fe.key().addr.is_ipv4())
                        .map(|ip| SocketAddr::new(*ip, fe.port().port()))
                })
                .flatten();
            let cluster_backends: Box<[(BackendId, SocketAddr)]> = if cluster_target.is_none() {
                fe.cluster_backends()
                    .iter()
                    .map(|b| (b.id(), b.addr()))
                    .collect()
            } else {
                Box::default()
            };
            if (external_local && !ipvs) || !source_ranges.is_empty() {
                special.insert(fe.key(), fe.id());
            }
            by_id.insert(
                fe.id(),
                FrontendPolicy {
                    kind: Some(kind),
                    external_local,
                    has_endpoints: fe.outcome() != Outcome::Reject,
                    cluster_target,
                    cluster_backends,
                    source_ranges,
                    source_extra,
                },
            );
        }
        Surface {
            cluster_cidrs: cluster_cidrs.into(),
            masquerade_all,
            ipvs,
            node_ips,
            by_id,
            special,
        }
    }

    #[inline]
    fn is_pod(&self, ip: IpAddr) -> bool {
        self.cluster_cidrs.iter().any(|c| c.contains(ip))
    }

    #[inline]
    fn is_node(&self, ip: IpAddr) -> bool {
        self.node_ips.contains(&ip)
    }

    /// kube-proxy's source-dependent rules for a new connection.
    #[inline]
    fn admit(&self, flow: &Flow) -> Admit<'_> {
        if self.special.is_empty() {
            return Admit::Lookup;
        }
        let Some(&id) = self.special.get(&FrontendKey::new(flow.protocol, flow.dst)) else {
            return Admit::Lookup;
        };
        let Some(p) = self.by_id.get(&id) else {
            return Admit::Lookup;
        };
        if !p.has_endpoints && !self.ipvs {
            // No endpoints at all: the filter table REJECTs, whatever the
            // source (kube-proxy writes no firewall chain then). The IPVS
            // mode's KUBE-PROXY-FIREWALL matches its ipsets whatever the
            // endpoints.
            return Admit::Lookup;
        }
        let src = flow.src.ip();
        if !p.source_ranges.is_empty()
            && !p.source_ranges.iter().any(|c| c.contains(src))
            && !p.source_extra.contains(&src)
        {
            return Admit::Drop;
        }
        if p.external_local && !self.ipvs && (self.is_pod(src) || self.is_node(src)) {
            if let Some(t) = p.cluster_target {
                return Admit::Redirect(t, id);
            }
            if !p.cluster_backends.is_empty() {
                return Admit::Pick(&p.cluster_backends, id);
            }
        }
        Admit::Lookup
    }

    /// Whether kube-proxy masquerades (SNATs) this flow to this backend:
    /// hairpin traffic (a pod reaching itself through its service); for a
    /// cluster IP, `--masquerade-all` or a source outside `--cluster-cidr`;
    /// for an external destination, always under the Cluster policy, and
    /// under the Local policy only traffic from the node itself (never, in
    /// the IPVS mode).
    #[inline]
    pub(crate) fn masquerade(
        &self,
        flow: &Flow,
        frontend: FrontendId,
        backend: SocketAddr,
    ) -> bool {
        let src = flow.src.ip();
        if backend.ip() == src {
            return true;
        }
        let p = if self.by_id.is_empty() {
            None
        } else {
            self.by_id.get(&frontend)
        };
        match p.and_then(|p| p.kind.map(|k| (k, p.external_local))) {
            Some((k, local)) if k.is_external() => !local || (!self.ipvs && self.is_node(src)),
            _ => self.masquerade_all || (!self.cluster_cidrs.is_empty() && !self.is_pod(src)),
        }
    }
}

/// Whether a packet with `flags` of a tracked TCP connection in state
/// `previous` starts a new connection on the same 5-tuple (a SYN after
/// TIME_WAIT or CLOSE, as IPVS reuses such a connection entry).
#[inline]
fn reopens(flow: &Flow, flags: TcpFlags, previous: ConnState) -> bool {
    flow.protocol == Protocol::Tcp
        && flags.contains(TcpFlags::SYN)
        && !flags.contains(TcpFlags::ACK)
        && matches!(
            previous,
            ConnState::Tcp(TcpState::TimeWait | TcpState::Close)
        )
}

/// Whether a backend in `state` still carries its tracked connections
/// (active, or draining at weight 0).
#[inline]
fn serves(state: BackendState) -> bool {
    matches!(state, BackendState::Active | BackendState::Draining)
}

/// The verdict for a packet of a tracked connection.
#[inline]
fn tracked_forward(
    backend: SocketAddr,
    backend_id: BackendId,
    frontend: FrontendId,
    masquerade: bool,
) -> Verdict {
    Verdict::Forward(Forward {
        backend,
        backend_id,
        frontend,
        tracked: true,
        masquerade,
    })
}

/// Per backend key, the frontends a sync takes from it and gives to it.
type ReplyDelta = AHashMap<FrontendKey, (ReplyFrontends, ReplyFrontends)>;

/// The largest [`ReplyDelta`] (in entries) kept between syncs.
const REPLY_DELTA_KEEP: usize = 4096;

/// What a mode's scheduling decided for a new connection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scheduled {
    Forward {
        frontend: FrontendId,
        backend: BackendId,
        addr: SocketAddr,
        /// The IPVS persistence template that chose the backend (code 0:
        /// none).
        control: Controlled,
    },
    Reject,
    Drop,
    NotAService,
}

/// The backend keys (protocol, backend address) one frontend put into the
/// reply index.
type IndexedKeys = SmallVec<[FrontendKey; 4]>;

/// `v` in order (for comparing frontend lists as sets).
fn sorted(mut v: ReplyFrontends) -> ReplyFrontends {
    v.sort_unstable();
    v
}

/// Everything a sync makes visible to readers, published with one pointer
/// store: the mode's table `T`, the [`Surface`] and the reply index. A
/// reader loads it once per packet, so it sees a batch whole: never the
/// new source ranges of a frontend beside its old endpoints, or the other
/// way round.
#[derive(Debug)]
pub(crate) struct Snapshot<T> {
    /// The mode's lookup structure.
    pub(crate) table: T,
    /// The source-dependent rules.
    pub(crate) surface: Arc<Surface>,
    /// Replies without the planner's lock (changed in place between
    /// snapshots, in an order that keeps it right for both; see
    /// [`ConnLayer::publish`]).
    pub(crate) replies: Arc<ReplyIndex>,
}

/// The tracker (if on) and the per-backend connection counts.
#[derive(Debug)]
pub(crate) struct ConnLayer {
    tracker: Option<Conntrack>,
    counts: Arc<ConnectionCounts>,
    /// The persistence templates' controlled-connection counts, kept by
    /// the tracker (so only while it is on).
    controls: Option<Arc<Controls>>,
    cluster_cidrs: Box<[Cidr]>,
    masquerade_all: bool,
    /// kube-proxy's IPVS mode ([`Surface`]).
    ipvs: bool,
    /// Writer side of the reply index (taken only by `publish`, under the
    /// planner's lock): the keys each frontend indexed.
    indexed: Mutex<AHashMap<FrontendId, IndexedKeys>>,
    /// An incremental sync's working map (per backend key, the frontends
    /// it loses and gains), kept between syncs so that a sync allocates
    /// none: a fresh map allocated a table of about 1.5 KB per service
    /// change, a request large enough that glibc first consolidates every
    /// small chunk freed since, which at 100,000 services is cold memory.
    reply_delta: Mutex<ReplyDelta>,
    /// Fragmented datagrams to their connections (while the tracker is
    /// on), allocated whole at the first one: a dataplane that never sees
    /// a fragment pays nothing for it.
    fragments: OnceLock<Fragments>,
}

impl ConnLayer {
    pub(crate) fn new(
        config: Option<&ConntrackConfig>,
        cluster_cidrs: &[Cidr],
        masquerade_all: bool,
        ipvs: bool,
    ) -> Self {
        let counts = Arc::new(ConnectionCounts::default());
        let controls = config.map(|_| Arc::new(Controls::default()));
        ConnLayer {
            tracker: config.map(|c| {
                Conntrack::with_controls(c.clone(), Arc::clone(&counts), controls.clone())
            }),
            counts,
            controls,
            cluster_cidrs: cluster_cidrs.into(),
            masquerade_all,
            ipvs,
            indexed: Mutex::new(AHashMap::new()),
            reply_delta: Mutex::new(AHashMap::new()),
            fragments: OnceLock::new(),
        }
    }

    /// The persistence templates' controlled-connection counts, if the
    /// tracker is on.
    pub(crate) fn controls(&self) -> Option<&Arc<Controls>> {
        self.controls.as_ref()
    }

    /// The snapshot of an empty plan around `table`.
    pub(crate) fn empty<T>(&self, table: T) -> Snapshot<T> {
        Snapshot {
            table,
            surface: Arc::new(Surface {
                cluster_cidrs: self.cluster_cidrs.clone(),
                masquerade_all: self.masquerade_all,
                ipvs: self.ipvs,
                ..Surface::default()
            }),
            replies: Arc::default(),
        }
    }

    /// The backend keys `planner`'s frontend `id` lists
    /// ([`Frontend::reply_backends`](crate::plan::Frontend::reply_backends)),
    /// each once.
    fn keys_of(planner: &Planner, id: FrontendId) -> Option<IndexedKeys> {
        let fe = planner.frontend(id)?;
        let mut keys = IndexedKeys::new();
        for b in fe.reply_backends() {
            let k = FrontendKey::new(fe.key().protocol, b.addr());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        Some(keys)
    }

    /// The frontends of `planner` listing backend `key`, found by walking
    /// them all: what the incremental path is checked against in debug
    /// builds.
    fn fronts_of(planner: &Planner, key: FrontendKey) -> ReplyFrontends {
        planner
            .frontends_with_backend(key.protocol, key.socket_addr())
            .map(|f| f.key().socket_addr())
            .collect()
    }

    /// Brings the reply index up to date with `planner` after `diff`: the
    /// keys of the frontends the diff names (what they indexed before and
    /// what they list now) change by what those frontends stopped and
    /// started listing, so a sync costs O(the diff), not O(the plan).
    ///
    /// Returns the index the next snapshot carries and the removals to
    /// make once it is published. In place, a key first gets the union of
    /// its old and new frontends (so readers of the old table and of the
    /// new both find theirs) and, after the publication, its new ones. An
    /// index the keys would outgrow (or a full diff) is rebuilt from the
    /// plan instead, and published whole with the snapshot.
    ///
    /// Without a tracker nothing reads the index (a reply belongs to no
    /// tracked connection, so [`ConnLayer::reply_of`] answers `None` before
    /// it looks), and the tracker is fixed when the layer is made: the
    /// index then stays empty and a sync spends nothing on it.
    fn publish_replies(
        &self,
        planner: &Planner,
        diff: &PlanDiff,
        current: &Arc<ReplyIndex>,
    ) -> (Arc<ReplyIndex>, Vec<(FrontendKey, ReplyFrontends)>) {
        if self.tracker.is_none() {
            return (Arc::clone(current), Vec::new());
        }
        let mut indexed = self.indexed.lock();
        if !diff.full {
            // Per backend key, the frontends (addresses) the diff takes
            // from it and gives to it: what each frontend indexed before
            // against what it lists now. Only the diff's frontends are
            // read, none of the plan's other indexes.
            let mut delta = self.reply_delta.lock();
            if delta.capacity() > REPLY_DELTA_KEEP {
                // A large batch's table is not kept.
                *delta = AHashMap::new();
            }
            delta.clear();
            for (id, key) in &diff.removed {
                for k in indexed.remove(id).into_iter().flatten() {
                    delta.entry(k).or_default().0.push(key.socket_addr());
                }
            }
            for id in diff.added.iter().chain(&diff.changed) {
                let old = indexed.remove(id).unwrap_or_default();
                let (Some(fe), Some(new)) = (planner.frontend(*id), Self::keys_of(planner, *id))
                else {
                    continue;
                };
                let addr = fe.key().socket_addr();
                for k in old.iter().filter(|k| !new.contains(k)) {
                    delta.entry(*k).or_default().0.push(addr);
                }
                for k in new.iter().filter(|k| !old.contains(k)) {
                    delta.entry(*k).or_default().1.push(addr);
                }
                indexed.insert(*id, new);
            }
            if delta.is_empty() {
                return (Arc::clone(current), Vec::new());
            }
            if current.fits(current.len() + delta.len()) {
                let mut later = Vec::new();
                for (key, (gone, came)) in delta.drain() {
                    let mut union = current.get(&key);
                    let before = union.len();
                    for fe in &came {
                        if !union.contains(fe) {
                            union.push(*fe);
                        }
                    }
                    let new: ReplyFrontends = union
                        .iter()
                        .filter(|fe| !gone.contains(fe) || came.contains(fe))
                        .copied()
                        .collect();
                    debug_assert_eq!(
                        sorted(new.clone()),
                        sorted(Self::fronts_of(planner, key)),
                        "the reply index of {key:?} follows the plan"
                    );
                    if new.len() != union.len() {
                        later.push((key, new));
                    }
                    if union.len() != before {
                        current.set(key, union);
                    }
                }
                return (Arc::clone(current), later);
            }
        }
        // Rebuilt from the plan: every key any frontend indexes.
        if diff.full {
            indexed.clear();
            for fe in planner.frontends() {
                if let Some(keys) = Self::keys_of(planner, fe.id()) {
                    indexed.insert(fe.id(), keys);
                }
            }
        }
        // One walk over what every frontend indexes (which is what the
        // plan's frontends list: `indexed` follows them), inverted.
        let mut fronts: AHashMap<FrontendKey, ReplyFrontends> = AHashMap::new();
        for (id, keys) in indexed.iter() {
            let Some(fe) = planner.frontend(*id) else {
                continue;
            };
            let addr = fe.key().socket_addr();
            for key in keys {
                let list = fronts.entry(*key).or_default();
                if !list.contains(&addr) {
                    list.push(addr);
                }
            }
        }
        let index = ReplyIndex::with_capacity(fronts.len());
        for (key, list) in fronts {
            index.set(key, list);
        }
        (Arc::new(index), Vec::new())
    }

    /// The tracked connection a reply from `reply.src` (a backend) to
    /// `reply.dst` belongs to: each frontend listing that backend is probed
    /// with the original direction (client to frontend). With `flags` the
    /// reply advances the connection's state; without, nothing changes.
    /// Takes no lock beside the tracker shard's; allocates nothing.
    pub(crate) fn reply_of(
        &self,
        replies: &ReplyIndex,
        reply: &Flow,
        flags: Option<TcpFlags>,
        now: Instant,
    ) -> Option<Tracked> {
        let ct = self.tracker.as_ref()?;
        replies.find_map(&FrontendKey::new(reply.protocol, reply.src), |fe| {
            let orig = Flow::new(reply.protocol, reply.dst, fe);
            let found = match flags {
                Some(flags) => self.reply(&orig, flags, now),
                None => ct.get(&orig, now),
            };
            found.filter(|t| t.backend_addr == reply.src)
        })
    }

    /// Publishes in `slot`, with one store, the snapshot that follows
    /// `current` after the change `diff`, around the mode's new `table`:
    /// the reply index updated for the frontends the diff names (its
    /// removals made after the store), and the source-dependent rules
    /// rebuilt (a walk of the plan) only when the change touches an
    /// external frontend, so cluster-IP churn costs a scan of the diff and
    /// nothing more. Returns the snapshot it replaced.
    pub(crate) fn publish<T>(
        &self,
        slot: &ArcSwap<Snapshot<T>>,
        planner: &Planner,
        diff: &PlanDiff,
        current: &Snapshot<T>,
        table: T,
    ) -> Arc<Snapshot<T>> {
        let (replies, later) = self.publish_replies(planner, diff, &current.replies);
        let index = Arc::clone(&replies);
        let now = &current.surface;
        let external = |id: &FrontendId| {
            now.by_id.contains_key(id)
                || planner
                    .frontend(*id)
                    .is_some_and(|f| f.kind().is_external())
        };
        let touched = diff.full
            || diff.added.iter().any(external)
            || diff.changed.iter().any(external)
            || diff
                .removed
                .iter()
                .any(|(id, _)| now.by_id.contains_key(id));
        let surface = if touched {
            Arc::new(Surface::build(
                planner,
                &self.cluster_cidrs,
                self.masquerade_all,
                self.ipvs,
            ))
        } else {
            Arc::clone(now)
        };
        let replaced = slot.swap(Arc::new(Snapshot {
            table,
            surface,
            replies,
        }));
        for (key, fronts) in later {
            index.set(key, fronts);
        }
        replaced
    }

    pub(crate) fn tracker(&self) -> Option<&Conntrack> {
        self.tracker.as_ref()
    }

    pub(crate) fn counts(&self) -> &Arc<ConnectionCounts> {
        &self.counts
    }

    /// Whether backend `id` still has tracked connections.
    pub(crate) fn has_connections(&self, id: BackendId) -> bool {
        self.counts.total(id) > 0
    }

    /// The tracked half of a packet of `flow` with `flags`: the verdict of
    /// a packet of an established connection (a tracked forward, or the
    /// drop of `expire_nodest_conn`), or `None` if the packet starts a new
    /// connection ([`new_connection`](Self::new_connection)). It reads no
    /// published snapshot: the tracked entry holds the backend and the
    /// masquerade decision of the connection's first packet (netfilter NATs
    /// a connection once, at its first packet), and the backends' states
    /// are not part of a snapshot.
    #[inline(always)]
    pub(crate) fn established(
        &self,
        states: &BackendStates,
        flow: &Flow,
        flags: TcpFlags,
        now: Instant,
    ) -> Option<Verdict> {
        // No packet has a source and destination of different families
        // (`Flow::try_new` refuses them; `Flow::new` does not check): no
        // frontend captures one, so no client meets a backend of the other
        // family.
        if !flow.is_single_family() {
            return Some(Verdict::NotAService);
        }
        let ct = self.tracker.as_ref()?;
        match ct.peek(flow, flags, now) {
            Peek::Untracked => return None,
            Peek::Hit(hit)
                if serves(states.state(hit.backend)) && !reopens(flow, flags, hit.state()) =>
            {
                return Some(tracked_forward(
                    SocketAddr::V4(hit.backend_addr),
                    hit.backend,
                    hit.frontend,
                    hit.masquerade,
                ));
            }
            // A backend gone, a reopen, a packet that writes: the slot
            // lock's path decides.
            Peek::Hit(_) | Peek::Slow => {}
        }
        let hit = ct.lookup(flow, flags, now)?;
        if serves(states.state(hit.backend)) {
            if !reopens(flow, flags, hit.previous) {
                return Some(tracked_forward(
                    hit.backend_addr,
                    hit.backend,
                    hit.frontend,
                    hit.masquerade,
                ));
            }
            ct.remove(flow);
            None
        } else {
            // expire_nodest_conn: the connection expires.
            ct.remove(flow);
            (flow.protocol == Protocol::Tcp && !flags.contains(TcpFlags::SYN))
                .then_some(Verdict::Drop)
        }
    }

    /// A packet of `flow` that [`established`](Self::established) left to
    /// start a new connection, under `surface` (from the same [`Snapshot`]
    /// as the table `schedule` reads); `schedule` decides a new connection
    /// to the destination of the flow it is given (the packet's own, or the
    /// cluster IP a short-circuit redirects to). `rng` draws a
    /// short-circuit's pick among the Cluster-policy endpoints when the
    /// cluster IP is itself Local: uniformly at random, as kube-proxy's
    /// `KUBE-SVC-` chain (`-m statistic --mode random`) and nftables
    /// `service-` chain (`numgen random`) do.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_connection(
        &self,
        surface: &Surface,
        states: &BackendStates,
        flow: &Flow,
        flags: TcpFlags,
        now: Instant,
        rng: &SeededRng,
        mut schedule: impl FnMut(&Flow) -> Scheduled,
    ) -> Verdict {
        self.schedule_new(surface, states, flow, flags, now, rng, &[], |f, _| {
            schedule(f)
        })
    }

    /// A retry of a new connection whose connect to the backends in
    /// `exclude` failed: the flow's tracked entry (the failed attempt, and
    /// its count on that backend) goes, and the connection is scheduled
    /// afresh among the frontend's backends other than `exclude`'s;
    /// `schedule` honours the exclusion it is given (a `ClientIP` pin to an
    /// excluded backend is replaced). A forward is tracked as a new
    /// connection.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn route_excluding(
        &self,
        surface: &Surface,
        states: &BackendStates,
        flow: &Flow,
        exclude: &[BackendId],
        now: Instant,
        rng: &SeededRng,
        schedule: impl FnMut(&Flow, &[BackendId]) -> Scheduled,
    ) -> Verdict {
        if !flow.is_single_family() {
            return Verdict::NotAService;
        }
        if let Some(ct) = &self.tracker {
            ct.remove(flow);
        }
        let flags = match flow.protocol {
            Protocol::Tcp => TcpFlags::SYN,
            _ => TcpFlags::NONE,
        };
        self.schedule_new(surface, states, flow, flags, now, rng, exclude, schedule)
    }

    /// A new connection: the source-dependent rules, then the mode's
    /// `schedule` (given `exclude`), and a forward tracked.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn schedule_new(
        &self,
        surface: &Surface,
        states: &BackendStates,
        flow: &Flow,
        flags: TcpFlags,
        now: Instant,
        rng: &SeededRng,
        exclude: &[BackendId],
        mut schedule: impl FnMut(&Flow, &[BackendId]) -> Scheduled,
    ) -> Verdict {
        // A backend chosen from a rule list that a concurrent sync has just
        // retired may be gone by the time the flow is tracked: check after
        // the insert (which the writer's connection count sees) and
        // schedule once more, so a new connection does not start on a
        // dead backend.
        let mut decide = || match surface.admit(flow) {
            Admit::Lookup => schedule(flow, exclude),
            Admit::Drop => Scheduled::Drop,
            Admit::Redirect(dst, id) => match schedule(&Flow { dst, ..*flow }, exclude) {
                Scheduled::Forward {
                    backend,
                    addr,
                    control,
                    ..
                } => Scheduled::Forward {
                    frontend: id,
                    backend,
                    addr,
                    control,
                },
                other => other,
            },
            Admit::Pick(backends, id) => {
                let mut i = rng.below(backends.len() as u64) as usize;
                if !exclude.is_empty() && exclude.contains(&backends[i].0) {
                    let usable = |j: usize| !exclude.contains(&backends[j].0);
                    let Some(j) =
                        crate::scheduler::nth_usable(backends.len(), usable, rng.next_u64())
                    else {
                        return Scheduled::Reject;
                    };
                    i = j;
                }
                let (backend, addr) = backends[i];
                Scheduled::Forward {
                    frontend: id,
                    backend,
                    addr,
                    control: Controlled::default(),
                }
            }
        };
        for attempt in 0..2 {
            match decide() {
                Scheduled::Forward {
                    frontend,
                    backend,
                    addr,
                    control,
                } => {
                    let masquerade = surface.masquerade(flow, frontend, addr);
                    if let Some(ct) = &self.tracker {
                        ct.insert_controlled(
                            flow, frontend, backend, addr, flags, now, control, masquerade,
                        );
                        if attempt == 0 && states.state(backend) == BackendState::Gone {
                            ct.remove(flow);
                            continue;
                        }
                    }
                    return Verdict::Forward(Forward {
                        backend: addr,
                        backend_id: backend,
                        frontend,
                        tracked: false,
                        masquerade,
                    });
                }
                Scheduled::Reject => return Verdict::Reject,
                Scheduled::Drop => return Verdict::Drop,
                Scheduled::NotAService => return Verdict::NotAService,
            }
        }
        Verdict::Drop
    }

    /// The live tracked connection of `flow` (original direction) whose
    /// backend still takes its packets (active or draining), with no side
    /// effect.
    pub(crate) fn peek(
        &self,
        states: &BackendStates,
        flow: &Flow,
        now: Instant,
    ) -> Option<Tracked> {
        let t = self.tracker.as_ref()?.get(flow, now)?;
        serves(states.state(t.backend)).then_some(t)
    }

    /// Ends the tracked connection of `flow`.
    pub(crate) fn close(&self, flow: &Flow) -> Option<Tracked> {
        self.tracker.as_ref()?.remove(flow)
    }

    /// A reply packet of the connection whose original direction is
    /// `orig`.
    pub(crate) fn reply(&self, orig: &Flow, flags: TcpFlags, now: Instant) -> Option<Tracked> {
        let ct = self.tracker.as_ref()?;
        ct.lookup_reply(orig, flags, now)?;
        ct.get(orig, now)
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.tracker.as_ref()?.poll_timeout()
    }

    pub(crate) fn handle_timeout(&self, now: Instant) -> usize {
        if let Some(f) = self.fragments.get() {
            f.expire(now);
        }
        self.tracker.as_ref().map_or(0, |t| t.handle_timeout(now))
    }

    /// Records the datagram `key` for the tracked connection `conn`
    /// (original direction); whether it was.
    pub(crate) fn first_fragment(&self, key: &FragmentKey, conn: &Flow, now: Instant) -> bool {
        let Some(ct) = &self.tracker else {
            return false;
        };
        if ct.get(conn, now).is_none() {
            return false;
        }
        self.fragments
            .get_or_init(Fragments::new)
            .insert(*key, *conn, now);
        true
    }

    /// The live connection (backend active or draining) the datagram `key`
    /// was recorded for.
    pub(crate) fn later_fragment(
        &self,
        states: &BackendStates,
        key: &FragmentKey,
        now: Instant,
    ) -> Option<Tracked> {
        let conn = self.fragments.get()?.get(key, now)?;
        self.peek(states, &conn, now)
    }

    pub(crate) fn entries(&self, now: Instant) -> Vec<Tracked> {
        self.tracker
            .as_ref()
            .map_or_else(Vec::new, |t| t.entries(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::endpoint_slice::{AddressType, EndpointSlice, EndpointSpec, SlicePortSpec};
    use crate::model::service::{Service, ServicePortSpec};
    use crate::table::{Change, ServiceTable};
    use crate::topology::NodeTopology;

    /// A plan of one service with two endpoints, and the diff that made it.
    fn one_service() -> (Planner, PlanDiff) {
        let mut table = ServiceTable::new();
        let svc = Service::builder("default", "web")
            .cluster_ip("10.96.0.10".parse().unwrap())
            .port(ServicePortSpec::tcp(80).name("http").target_port(8080))
            .build()
            .unwrap();
        let slice = EndpointSlice::builder("default", "web-0", "web", AddressType::IPv4)
            .port(SlicePortSpec::tcp(8080).name("http"))
            .endpoints(["10.1.0.1", "10.1.0.2"].map(EndpointSpec::new))
            .build()
            .unwrap();
        let cs = table
            .apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)])
            .unwrap();
        let mut planner = Planner::new(NodeTopology::new("node-a", "zone-a"));
        let diff = planner.update(&table, &cs, Instant::ZERO, |_| false);
        (planner, diff)
    }

    #[test]
    fn the_reply_index_is_kept_only_with_a_tracker() {
        let (planner, diff) = one_service();
        let with = ConnLayer::new(Some(&ConntrackConfig::default()), &[], false, false);
        let (replies, _) = with.publish_replies(&planner, &diff, &Arc::default());
        assert_eq!(replies.len(), 2, "one key per backend");
        let without = ConnLayer::new(None, &[], false, false);
        let (replies, _) = without.publish_replies(&planner, &diff, &Arc::default());
        assert_eq!(replies.len(), 0, "nothing reads it without a tracker");
        assert!(without.indexed.lock().is_empty());
    }

    fn service_at(i: u8, backends: &[&str]) -> [Change; 2] {
        let name = format!("s{i}");
        let svc = Service::builder("default", name.as_str())
            .cluster_ip(std::net::IpAddr::from([10, 96, 1, i]))
            .port(ServicePortSpec::tcp(80).target_port(8080))
            .build()
            .unwrap();
        let slice = EndpointSlice::builder(
            "default",
            format!("{name}-0"),
            name.as_str(),
            AddressType::IPv4,
        )
        .port(SlicePortSpec::tcp(8080))
        .endpoints(backends.iter().map(|ip| EndpointSpec::new(*ip)))
        .build()
        .unwrap();
        [Change::UpsertService(svc), Change::UpsertSlice(slice)]
    }

    fn key(ip: &str) -> FrontendKey {
        FrontendKey::new(Protocol::Tcp, SocketAddr::new(ip.parse().unwrap(), 8080))
    }

    fn vip(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 96, 1, i], 80))
    }

    /// Services added one sync at a time outgrow the index's buckets: it is
    /// rebuilt (a new index in the snapshot), and every key still lists
    /// exactly the frontends the plan gives it.
    #[test]
    fn the_reply_index_grows_by_rebuilding() {
        let layer = ConnLayer::new(Some(&ConntrackConfig::default()), &[], false, false);
        let mut table = ServiceTable::new();
        let mut planner = Planner::new(NodeTopology::new("node-a", "zone-a"));
        let mut current: Arc<ReplyIndex> = Arc::default();
        let mut rebuilt = 0;
        for i in 0..60u8 {
            // Two backends of its own and one shared by every service.
            let own = [format!("10.2.{i}.1"), format!("10.2.{i}.2")];
            let cs = table
                .apply_batch(service_at(i, &[&own[0], &own[1], "10.3.0.1"]))
                .unwrap();
            let diff = planner.update(&table, &cs, Instant::ZERO, |_| false);
            let (next, later) = layer.publish_replies(&planner, &diff, &current);
            assert!(later.is_empty(), "an add takes nothing away");
            if !Arc::ptr_eq(&next, &current) {
                rebuilt += 1;
            }
            current = next;
            assert_eq!(current.len(), 2 * (i as usize + 1) + 1);
            let shared = current.get(&key("10.3.0.1"));
            assert_eq!(shared.len(), i as usize + 1);
            for j in 0..=i {
                assert!(shared.contains(&vip(j)));
                assert_eq!(
                    current.get(&key(&format!("10.2.{j}.1"))).as_slice(),
                    [vip(j)]
                );
            }
        }
        // No buckets -> 64 at the first sync -> 256 (twice the 67 keys
        // then, rounded up) when the 65th key would land.
        assert_eq!(rebuilt, 2);
    }

    /// A backend moving from one service to another is listed by both
    /// frontends until the new snapshot is published (so a reader of the
    /// old table still finds its connection), and then by the new one only.
    #[test]
    fn a_moved_backend_leaves_its_old_frontend_only_after_the_publication() {
        let layer = ConnLayer::new(Some(&ConntrackConfig::default()), &[], false, false);
        let mut table = ServiceTable::new();
        let mut planner = Planner::new(NodeTopology::new("node-a", "zone-a"));
        let mut changes: Vec<Change> = service_at(1, &["10.1.0.1", "10.1.0.9"]).into();
        changes.extend(service_at(2, &["10.1.0.2"]));
        let cs = table.apply_batch(changes).unwrap();
        let diff = planner.update(&table, &cs, Instant::ZERO, |_| false);
        let (index, later) = layer.publish_replies(&planner, &diff, &Arc::default());
        assert!(later.is_empty());
        assert_eq!(index.get(&key("10.1.0.9")).as_slice(), [vip(1)]);

        // UDP would flush, TCP would drain: no draining without a count
        // here, so the backend simply moves.
        let mut changes: Vec<Change> = service_at(1, &["10.1.0.1"]).into();
        changes.extend(service_at(2, &["10.1.0.2", "10.1.0.9"]));
        let cs = table.apply_batch(changes).unwrap();
        let diff = planner.update(&table, &cs, Instant::ZERO, |_| false);
        let (same, later) = layer.publish_replies(&planner, &diff, &index);
        assert!(Arc::ptr_eq(&same, &index), "changed in place");
        let mut both = index.get(&key("10.1.0.9"));
        both.sort();
        assert_eq!(both.as_slice(), [vip(1), vip(2)], "before the publication");
        assert_eq!(
            later,
            vec![(key("10.1.0.9"), [vip(2)].into_iter().collect())]
        );
        for (k, fronts) in later {
            index.set(k, fronts);
        }
        assert_eq!(index.get(&key("10.1.0.9")).as_slice(), [vip(2)]);
        assert_eq!(index.get(&key("10.1.0.1")).as_slice(), [vip(1)]);
    }
}
