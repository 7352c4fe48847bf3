//! kube-proxy's iptables mode as a data structure.
//!
//! The table compiles into one flat, ordered rule list, as
//! `pkg/proxy/iptables/proxier.go` writes it:
//!
//! - `nat KUBE-SERVICES`: one rule per (cluster IP, protocol, port) with
//!   usable endpoints, jumping to the service chain;
//! - the service chain (`KUBE-SVC-…`/`KUBE-SVL-…`): one rule per endpoint in
//!   merged order (endpoints of weight 0 take no new connections and get no
//!   rule; a port whose usable endpoints all have weight 0 rejects), rule i of n matching with probability 1/(n-i) (one 31-bit
//!   random draw per rule walked, as `xt_statistic` does), the last always;
//! - `filter KUBE-SERVICES`: `REJECT` for service ports without endpoints,
//!   `DROP` for Local policies without local endpoints.
//!
//! A lookup walks the nat list, then the filter list, in order, matching each
//! rule's destination, protocol and port the way the kernel does: its cost
//! grows with the number of services. As in the kernel, only a connection's
//! first packet walks the rules: later packets follow the connection
//! tracker (netfilter's timeouts by default).
//!
//! The lists are persistent (`rule_list`: chunks of 32 rules, plain data,
//! under 16-way branches, with the service chains in a parallel list; all
//! shared between versions), so a sync changes only the rules of
//! the frontends its [`PlanDiff`] names: a new frontend's rule is appended,
//! a changed one is replaced where it stands, a removed one is replaced by
//! the list's last rule. Adding or deleting a service thus copies a few
//! chunks, whatever the number of services; the first sync (and a resync
//! after a generation gap) compiles the whole plan in kube-proxy's service
//! order. Since every (destination, protocol, port) has at most one rule,
//! the order decides only how far a lookup walks, never what it finds:
//! kube-proxy itself writes `KUBE-SERVICES` in the iteration order of a Go
//! map, which changes from sync to sync. Each sync publishes the new
//! version with one pointer store, together with the connection layer's
//! surface and reply index: readers see a batch whole or not at all.
//!
//! `ClientIP` session affinity follows kube-proxy's rules: before the
//! probability rules, one `-m recent --name <SEP> --rcheck --seconds T
//! --reap -j <SEP>` rule per endpoint, walked in order; the endpoint chain's
//! `-m recent --set` restarts the client's stamp. A client is in at most one
//! endpoint's list (an endpoint's list goes with its rules), so the lists are
//! kept as one [`AffinityTable`] entry per client, and the `--rcheck` walk
//! is a walk of the chain's endpoints comparing with that entry's endpoint.

use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use ahash::AHashMap;
use arc_swap::ArcSwap;
use arc_swap::cache::Cache;
use parking_lot::Mutex;

use super::conn::{ConnLayer, Scheduled, Snapshot};
use super::ipvs::first_packet;
use super::rule_list::RuleList;
use super::{Candidates, Dataplane, DataplaneConfig, Mode};
use crate::affinity::{AffinityEntry, AffinityPort, AffinityReport, AffinityTable, ScopeRegistry};
use crate::conntrack::{TcpFlags, Tracked};
use crate::model::flow::{Flow, FragmentKey, Protocol, Verdict};
use crate::model::service::{ServiceKey, SessionAffinity};
use crate::plan::{BackendId, BackendStates, Frontend, FrontendId, Outcome, PlanDiff, Planner};
use crate::rng::SeededRng;
use crate::scheduler::random::cascade_rules;
use crate::table::{ChangeSet, ServiceTable};
use crate::time::Instant;

/// One `KUBE-SERVICES` rule: `-d VIP/32 -p PROTO --dport PORT -j TARGET`.
/// Plain data (28 bytes), so that copying a chunk of rules is a `memcpy`
/// and a walk reads them back to back.
#[derive(Debug, Clone, Copy)]
struct ServiceRule {
    dst: IpAddr,
    protocol: Protocol,
    dport: u16,
    outcome: Outcome,
    /// The frontend the rule stands for (the writer's bookkeeping).
    frontend: FrontendId,
}

impl ServiceRule {
    /// The kernel's match: address under the /32 (/128) mask, protocol, then
    /// the `tcp`/`udp`/`sctp` match's destination port.
    #[inline]
    fn matches(&self, dst: IpAddr, protocol: Protocol, dport: u16) -> bool {
        self.dst == dst && self.protocol == protocol && self.dport == dport
    }
}

/// A service chain: `(endpoint index, 31-bit threshold)`, the last rule's
/// threshold `u32::MAX` (no `-m statistic`), and the `-m recent` rules of a
/// `ClientIP` service.
#[derive(Debug)]
struct ServiceChain {
    frontend: FrontendId,
    rules: Box<[(u32, u32)]>,
    endpoints: Box<[(BackendId, SocketAddr)]>,
    affinity: Option<AffinityPort>,
}

/// Rules per chunk of the `KUBE-SERVICES` lists: 32, so that a
/// chunk (28-byte rules) stays under glibc's 1 KiB large-request line. A
/// request above it makes malloc first consolidate every small chunk freed
/// since, which at 100,000 services is cold memory: with chunks of 256 a
/// service delete cost 2.3-2.5 times as much at 100,000 services as at 10,
/// with chunks of 32 1.3-1.5 times.
const RULE_CHUNK: usize = 32;

/// The two `KUBE-SERVICES` lists, persistent: a version shares every chunk
/// of rules a sync did not change. `chains[i]` is the service chain of
/// `nat[i]`: the two lists change in step.
#[derive(Debug, Default, Clone)]
struct Ruleset {
    nat: RuleList<ServiceRule, RULE_CHUNK>,
    chains: RuleList<Arc<ServiceChain>>,
    filter: RuleList<ServiceRule, RULE_CHUNK>,
}

/// Where a frontend's rule sits: in the nat list (or the filter list), at
/// this index.
type Position = (bool, usize);

impl Ruleset {
    /// The rule of one frontend, with its affinity scope bound (or
    /// removed, for a service without `ClientIP` affinity).
    fn rule(
        fe: &Frontend,
        affinity: &AffinityTable,
        scopes: &mut ScopeRegistry,
    ) -> (ServiceRule, Option<Arc<ServiceChain>>) {
        let key = fe.key();
        let vs = (key.protocol, key.socket_addr());
        let svc = fe.service();
        let outcome = fe.rule_outcome();
        let rule = ServiceRule {
            dst: key.addr,
            protocol: key.protocol,
            dport: key.port,
            outcome,
            frontend: fe.id(),
        };
        let mut chain = None;
        if outcome == Outcome::Forward {
            // Weight-0 endpoints get no rule.
            let endpoints: Box<[(BackendId, SocketAddr)]> =
                fe.rule_backends().map(|b| (b.id(), b.addr())).collect();
            let rules = cascade_rules(0..endpoints.len() as u32);
            let port_affinity = match svc.session_affinity() {
                SessionAffinity::ClientIp { .. } => {
                    let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.1).collect();
                    scopes.bind(affinity, svc, vs, &addrs, |_| true)
                }
                SessionAffinity::None => None,
            };
            if port_affinity.is_none() {
                scopes.remove_vs(affinity, vs);
            }
            chain = Some(Arc::new(ServiceChain {
                frontend: fe.id(),
                rules,
                endpoints,
                affinity: port_affinity,
            }));
        } else if scopes.bind(affinity, svc, vs, &[], |_| true).is_none() {
            // No endpoint rules: every client's entry goes (the scope stays
            // bound, empty, for a ClientIP service).
            scopes.remove_vs(affinity, vs);
        }
        (rule, chain)
    }

    /// The rule list of the whole plan, in kube-proxy's order, and where
    /// each frontend's rule sits.
    fn compile(
        planner: &Planner,
        affinity: &AffinityTable,
        scopes: &mut ScopeRegistry,
        positions: &mut AHashMap<FrontendId, Position>,
    ) -> Ruleset {
        let mut rs = Ruleset::default();
        positions.clear();
        for fe in planner.frontends() {
            let (rule, chain) = Self::rule(fe, affinity, scopes);
            rs.place(rule, chain, positions);
        }
        scopes.retain_vs(affinity, |vs| {
            planner
                .frontend_by_key(&vs.1, vs.0)
                .is_some_and(|fe| positions.contains_key(&fe.id()))
        });
        rs
    }

    /// Applies a plan diff: a removed frontend's rule leaves its list (the
    /// last rule of the list takes its place), a changed one is replaced
    /// where it is (or moves between nat and filter), a new one is
    /// appended. Each costs a few copied chunks, whatever the number of
    /// rules.
    fn apply(
        &mut self,
        planner: &Planner,
        diff: &PlanDiff,
        affinity: &AffinityTable,
        scopes: &mut ScopeRegistry,
        positions: &mut AHashMap<FrontendId, Position>,
    ) {
        for (id, key) in &diff.removed {
            self.remove(*id, positions);
            scopes.remove_vs(affinity, (key.protocol, key.socket_addr()));
        }
        for id in diff.added.iter().chain(&diff.changed) {
            let Some(fe) = planner.frontend(*id) else {
                continue;
            };
            let (rule, chain) = Self::rule(fe, affinity, scopes);
            self.place(rule, chain, positions);
        }
    }

    fn list(&mut self, nat: bool) -> &mut RuleList<ServiceRule, RULE_CHUNK> {
        if nat { &mut self.nat } else { &mut self.filter }
    }

    /// Puts a frontend's rule (and, for a nat rule, its chain) in: in place
    /// of its old rule if it stays in the same list, else at the end of its
    /// list.
    fn place(
        &mut self,
        rule: ServiceRule,
        chain: Option<Arc<ServiceChain>>,
        positions: &mut AHashMap<FrontendId, Position>,
    ) {
        let id = rule.frontend;
        let nat = chain.is_some();
        match positions.get(&id).copied() {
            Some((was_nat, i)) if was_nat == nat => {
                self.list(nat).set(i, rule);
                if let Some(c) = chain {
                    self.chains.set(i, c);
                }
            }
            old => {
                if old.is_some() {
                    self.remove(id, positions);
                }
                let i = self.list(nat).push(rule);
                if let Some(c) = chain {
                    self.chains.push(c);
                }
                positions.insert(id, (nat, i));
            }
        }
    }

    /// Takes a frontend's rule out; the list's last rule fills the gap.
    fn remove(&mut self, id: FrontendId, positions: &mut AHashMap<FrontendId, Position>) {
        let Some((nat, i)) = positions.remove(&id) else {
            return;
        };
        let moved = self.list(nat).swap_remove(i).1.map(|m| m.frontend);
        if nat {
            self.chains.swap_remove(i);
        }
        if let Some(m) = moved {
            positions.insert(m, (nat, i));
        }
    }

    /// The number of rules a lookup may walk.
    fn len(&self) -> usize {
        self.nat.len() + self.filter.len()
    }

    /// The nat list, then the filter list, walked in order: the matching
    /// rule, with its chain for a nat rule.
    #[inline]
    fn find(&self, flow: &Flow) -> Option<(&ServiceRule, Option<&ServiceChain>)> {
        // What every rule compares, read once.
        let (dst, protocol, dport) = (flow.dst.ip(), flow.protocol, flow.dst.port());
        let matches = |r: &ServiceRule| r.matches(dst, protocol, dport);
        if let Some((i, r)) = self.nat.find(matches) {
            return Some((r, self.chains.get(i).map(|c| &**c)));
        }
        self.filter.find(matches).map(|(_, r)| (r, None))
    }

    /// Walks the rules for a new connection.
    #[inline]
    fn decide(
        &self,
        flow: &Flow,
        key: Option<u64>,
        now: Instant,
        rng: &SeededRng,
        affinity: &AffinityTable,
        exclude: &[BackendId],
    ) -> Scheduled {
        let Some((rule, chain)) = self.find(flow) else {
            return Scheduled::NotAService;
        };
        match rule.outcome {
            Outcome::Forward => {}
            Outcome::Drop => return Scheduled::Drop,
            _ => return Scheduled::Reject,
        }
        let Some(chain) = chain else {
            return Scheduled::Reject;
        };
        let excluded = |i: usize| {
            chain
                .endpoints
                .get(i)
                .is_some_and(|e| exclude.contains(&e.0))
        };
        // A retry without the failed endpoints: the cascade's pick, or
        // else one of the others at random.
        let cascade = || {
            let i = crate::scheduler::random::walk_cascade(&chain.rules, || rng.next_u64() as u32)?;
            if exclude.is_empty() || !excluded(i) {
                return Some(i);
            }
            crate::scheduler::nth_usable(chain.endpoints.len(), |j| !excluded(j), rng.next_u64())
        };
        let picked = match &chain.affinity {
            None => cascade(),
            Some(aff) => affinity
                .route(
                    &aff.scope,
                    aff.key(flow, key),
                    now,
                    // The `--rcheck` rules, one per endpoint, in order.
                    |ep| {
                        chain
                            .endpoints
                            .iter()
                            .position(|e| e.1 == ep)
                            .filter(|&i| !excluded(i))
                    },
                    || cascade().map(|i| (i, chain.endpoints[i].1)),
                )
                .map(|p| {
                    aff.count(p.index);
                    p.index
                }),
        };
        match picked.and_then(|i| chain.endpoints.get(i)) {
            Some(&(backend, addr)) => Scheduled::Forward {
                frontend: chain.frontend,
                backend,
                addr,
                control: Default::default(),
            },
            None => Scheduled::Reject,
        }
    }
}

/// The published rule lists with the surface and the reply index.
type Published = Snapshot<Ruleset>;

#[derive(Debug)]
struct Shared {
    config: DataplaneConfig,
    rng: SeededRng,
    readers: AtomicU64,
    /// One store per batch.
    rules: Arc<ArcSwap<Published>>,
    affinity: AffinityTable,
    /// Affinity scopes by virtual service; locked by sync and inspection.
    scopes: Mutex<ScopeRegistry>,
    planner: Mutex<Planner>,
    /// Writer side: where each frontend's rule sits (taken under the
    /// planner's lock).
    positions: Mutex<AHashMap<FrontendId, Position>>,
    states: Arc<BackendStates>,
    conn: ConnLayer,
}

impl Shared {
    /// Publishes the plan after `diff` as one new version of the rule
    /// lists, surface and reply index: a full recompile for a full diff,
    /// otherwise only the diff's rules.
    fn publish(&self, planner: &Planner, diff: &PlanDiff) {
        let current = self.rules.load_full();
        let rs = {
            let mut scopes = self.scopes.lock();
            let mut positions = self.positions.lock();
            if diff.full {
                Ruleset::compile(planner, &self.affinity, &mut scopes, &mut positions)
            } else {
                let mut rs = current.table.clone();
                rs.apply(planner, diff, &self.affinity, &mut scopes, &mut positions);
                rs
            }
        };
        self.conn.publish(&self.rules, planner, diff, &current, rs);
    }

    /// One packet: a tracked connection's without a snapshot, a new one's
    /// under the snapshot `snap` loads (once).
    #[inline]
    fn packet<G: Deref<Target = Arc<Published>>>(
        &self,
        snap: impl FnOnce() -> G,
        rng: &SeededRng,
        flow: &Flow,
        key: Option<u64>,
        flags: TcpFlags,
        now: Instant,
    ) -> Verdict {
        if let Some(v) = self.conn.established(&self.states, flow, flags, now) {
            return v;
        }
        let snap = snap();
        self.conn
            .new_connection(&snap.surface, &self.states, flow, flags, now, rng, |flow| {
                snap.table.decide(flow, key, now, rng, &self.affinity, &[])
            })
    }

    /// A retry without the backends in `exclude`.
    fn route_excluding(
        &self,
        snap: &Published,
        rng: &SeededRng,
        flow: &Flow,
        key: Option<u64>,
        exclude: &[BackendId],
        now: Instant,
    ) -> Verdict {
        self.conn.route_excluding(
            &snap.surface,
            &self.states,
            flow,
            exclude,
            now,
            rng,
            |flow, exclude| {
                snap.table
                    .decide(flow, key, now, rng, &self.affinity, exclude)
            },
        )
    }
}

/// The iptables-mode dataplane. See the module docs.
#[derive(Debug)]
pub struct IptablesDataplane {
    shared: Arc<Shared>,
}

/// A per-thread reader of an [`IptablesDataplane`]: see
/// [`IptablesDataplane::reader`]. Owned, `'static` and `Send`.
#[derive(Debug)]
pub struct IptablesReader {
    shared: Arc<Shared>,
    rules: Cache<Arc<ArcSwap<Published>>, Arc<Published>>,
    rng: SeededRng,
}

impl IptablesReader {
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

    /// [`route`](Self::route) with a caller-supplied affinity key.
    #[inline]
    pub fn route_with_key(&mut self, flow: &Flow, key: Option<u64>, now: Instant) -> Verdict {
        // The cache's check is one atomic load.
        let rules = &mut self.rules;
        self.shared.packet(
            move || rules.load(),
            &self.rng,
            flow,
            key,
            first_packet(flow),
            now,
        )
    }

    /// Any packet of a flow, as [`Dataplane::packet`].
    #[inline]
    pub fn packet(&mut self, flow: &Flow, flags: TcpFlags, now: Instant) -> Verdict {
        let rules = &mut self.rules;
        self.shared
            .packet(move || rules.load(), &self.rng, flow, None, flags, now)
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
        let snap: &Arc<Published> = self.rules.load();
        self.shared
            .route_excluding(snap, &self.rng, flow, key, exclude, now)
    }
}

impl IptablesDataplane {
    /// An empty dataplane (every flow is not-a-service until a sync).
    pub fn new(mut config: DataplaneConfig) -> Self {
        let (planner, conn) = super::connection_setup(&mut config, Mode::Iptables);
        IptablesDataplane {
            shared: Arc::new(Shared {
                rng: SeededRng::new(config.seed),
                readers: AtomicU64::new(0),
                affinity: AffinityTable::new(config.affinity.clone(), config.seed),
                rules: Arc::new(ArcSwap::from_pointee(conn.empty(Ruleset::default()))),
                scopes: Mutex::new(ScopeRegistry::default()),
                positions: Mutex::new(AHashMap::new()),
                states: Arc::clone(planner.states()),
                planner: Mutex::new(planner),
                conn,
                config,
            }),
        }
    }

    /// The session-affinity table (the `xt_recent` lists).
    pub fn affinity_table(&self) -> &AffinityTable {
        &self.shared.affinity
    }

    /// The number of rules a lookup may walk (nat `KUBE-SERVICES` plus
    /// filter `KUBE-SERVICES`).
    pub fn rule_count(&self) -> usize {
        self.shared.rules.load().table.len()
    }

    /// The config (with netfilter's conntrack timeouts filled in).
    pub fn config(&self) -> &DataplaneConfig {
        &self.shared.config
    }

    /// The connection tracker, when tracking is on.
    pub fn conntrack(&self) -> Option<&crate::conntrack::Conntrack> {
        self.shared.conn.tracker()
    }

    /// A reader for one packet thread, with its own random source; see
    /// [`IpvsDataplane::reader`](super::IpvsDataplane::reader).
    pub fn reader(&self) -> IptablesReader {
        IptablesReader {
            shared: Arc::clone(&self.shared),
            rules: Cache::new(Arc::clone(&self.shared.rules)),
            rng: super::reader_rng(self.shared.config.seed, &self.shared.readers),
        }
    }
}

impl Dataplane for IptablesDataplane {
    fn generation_gaps(&self) -> u64 {
        self.shared.planner.lock().generation_gaps()
    }

    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    fn sync(&self, table: &ServiceTable, changes: &ChangeSet, now: Instant) {
        let sh = &*self.shared;
        let mut planner = sh.planner.lock();
        let diff = planner.update(table, changes, now, |id| sh.conn.has_connections(id));
        sh.publish(&planner, &diff);
    }

    fn route_with_key(&self, flow: &Flow, key: Option<u64>, now: Instant) -> Verdict {
        let sh = &*self.shared;
        sh.packet(
            || sh.rules.load(),
            &sh.rng,
            flow,
            key,
            first_packet(flow),
            now,
        )
    }

    fn packet(&self, flow: &Flow, flags: TcpFlags, now: Instant) -> Verdict {
        let sh = &*self.shared;
        sh.packet(|| sh.rules.load(), &sh.rng, flow, None, flags, now)
    }

    fn route_excluding_with_key(
        &self,
        flow: &Flow,
        key: Option<u64>,
        exclude: &[BackendId],
        now: Instant,
    ) -> Verdict {
        let sh = &*self.shared;
        sh.route_excluding(&sh.rules.load(), &sh.rng, flow, key, exclude, now)
    }

    fn connection_closed(&self, flow: &Flow, _now: Instant) -> Option<Tracked> {
        self.shared.conn.close(flow)
    }

    fn reply(&self, reply: &Flow, flags: TcpFlags, now: Instant) -> Option<Tracked> {
        let snap = self.shared.rules.load();
        self.shared
            .conn
            .reply_of(&snap.replies, reply, Some(flags), now)
    }

    fn peek_reply(&self, reply: &Flow, now: Instant) -> Option<Tracked> {
        let snap = self.shared.rules.load();
        self.shared.conn.reply_of(&snap.replies, reply, None, now)
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
        let snap = self.shared.rules.load();
        let probe = Flow::new(protocol, SocketAddr::from(([0, 0, 0, 0], 0)), dst);
        match snap.table.find(&probe) {
            None => Candidates::NotAService,
            Some((r, chain)) => match (r.outcome, chain) {
                (Outcome::Forward, Some(chain)) => {
                    Candidates::Endpoints(chain.endpoints.iter().map(|e| e.1).collect())
                }
                (Outcome::Forward, None) => Candidates::Reject,
                (Outcome::Drop, _) => Candidates::Drop,
                _ => Candidates::Reject,
            },
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let sh = &*self.shared;
        super::earliest(sh.conn.poll_timeout(), sh.planner.lock().poll_timeout())
    }

    fn handle_timeout(&self, now: Instant) {
        let sh = &*self.shared;
        sh.conn.handle_timeout(now);
        let mut planner = sh.planner.lock();
        let diff = planner.handle_timeout(now, |id| sh.conn.has_connections(id));
        if !diff.is_empty() {
            sh.publish(&planner, &diff);
        }
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

    /// A chunk of 32 rules is 28 bytes a rule: 896 bytes a walk reads
    /// back to back, and a copy moves without touching reference counts.
    #[test]
    fn rules_are_small_plain_data() {
        assert_eq!(core::mem::size_of::<ServiceRule>(), 28);
    }
}
