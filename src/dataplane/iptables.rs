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
//! grows with the number of services. Every sync recompiles the whole list
//! from the [`plan`](crate::plan), as an `iptables-restore` of the full
//! rule set does. As in the kernel, only a connection's first packet walks
//! the rules: later packets follow the connection tracker (netfilter's
//! timeouts by default).
//!
//! `ClientIP` session affinity follows kube-proxy's rules: before the
//! probability rules, one `-m recent --name <SEP> --rcheck --seconds T
//! --reap -j <SEP>` rule per endpoint, walked in order; the endpoint chain's
//! `-m recent --set` restarts the client's stamp. A client is in at most one
//! endpoint's list (an endpoint's list goes with its rules), so the lists are
//! kept as one [`AffinityTable`] entry per client, and the `--rcheck` walk
//! is a walk of the chain's endpoints comparing with that entry's endpoint.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwap;
use arc_swap::cache::Cache;
use parking_lot::Mutex;

use super::conn::{ConnLayer, Scheduled};
use super::ipvs::first_packet;
use super::{Candidates, Dataplane, DataplaneConfig, Mode};
use crate::affinity::{AffinityEntry, AffinityPort, AffinityReport, AffinityTable, ScopeRegistry};
use crate::conntrack::{TcpFlags, Tracked};
use crate::model::flow::{Flow, Protocol, Verdict};
use crate::model::service::ServiceKey;
use crate::plan::{BackendId, BackendStates, FrontendId, Outcome, Planner};
use crate::rng::SeededRng;
use crate::scheduler::random::cascade_rules;
use crate::table::{ChangeSet, ServiceTable};
use crate::time::Instant;

/// One `KUBE-SERVICES` rule: `-d VIP/32 -p PROTO --dport PORT -j TARGET`.
#[derive(Debug, Clone, Copy)]
struct ServiceRule {
    dst: IpAddr,
    protocol: Protocol,
    dport: u16,
    /// The service chain, for a nat rule; the outcome of a filter rule.
    chain: u32,
    outcome: Outcome,
}

impl ServiceRule {
    /// The kernel's match: address under the /32 (/128) mask, protocol, then
    /// the `tcp`/`udp`/`sctp` match's destination port.
    #[inline]
    fn matches(&self, flow: &Flow) -> bool {
        self.dst == flow.dst.ip() && self.protocol == flow.protocol && self.dport == flow.dst.port()
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

#[derive(Debug, Default)]
struct Ruleset {
    nat: Vec<ServiceRule>,
    filter: Vec<ServiceRule>,
    chains: Vec<ServiceChain>,
}

impl Ruleset {
    /// The rule list of the whole plan, in kube-proxy's order.
    fn compile(planner: &Planner, affinity: &AffinityTable, scopes: &mut ScopeRegistry) -> Ruleset {
        let mut rs = Ruleset::default();
        let mut bound: Vec<crate::affinity::VsId> = Vec::new();
        for fe in planner.frontends() {
            let key = fe.key();
            let vs = (key.protocol, key.socket_addr());
            let svc = fe.service();
            let outcome = fe.rule_outcome();
            let mut rule = ServiceRule {
                dst: key.addr,
                protocol: key.protocol,
                dport: key.port,
                chain: 0,
                outcome,
            };
            if outcome == Outcome::Forward {
                // Weight-0 endpoints get no rule.
                let endpoints: Box<[(BackendId, SocketAddr)]> =
                    fe.rule_backends().map(|b| (b.id(), b.addr())).collect();
                let rules = cascade_rules(0..endpoints.len() as u32);
                let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.1).collect();
                let port_affinity = scopes.bind(affinity, svc, vs, &addrs, |_| true);
                if port_affinity.is_some() {
                    bound.push(vs);
                }
                rs.chains.push(ServiceChain {
                    frontend: fe.id(),
                    rules,
                    endpoints,
                    affinity: port_affinity,
                });
                rule.chain = rs.chains.len() as u32 - 1;
                rs.nat.push(rule);
            } else {
                // No endpoint rules: every client's entry goes.
                if scopes.bind(affinity, svc, vs, &[], |_| true).is_some() {
                    bound.push(vs);
                }
                rs.filter.push(rule);
            }
        }
        scopes.retain_vs(affinity, |vs| bound.contains(vs));
        rs
    }

    #[inline]
    fn find(&self, flow: &Flow) -> Option<&ServiceRule> {
        self.nat
            .iter()
            .chain(self.filter.iter())
            .find(|r| r.matches(flow))
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
        let Some(rule) = self.find(flow) else {
            return Scheduled::NotAService;
        };
        match rule.outcome {
            Outcome::Forward => {}
            Outcome::Drop => return Scheduled::Drop,
            _ => return Scheduled::Reject,
        }
        let chain = &self.chains[rule.chain as usize];
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
            },
            None => Scheduled::Reject,
        }
    }
}

#[derive(Debug)]
struct Shared {
    config: DataplaneConfig,
    rng: SeededRng,
    readers: AtomicU64,
    rules: Arc<ArcSwap<Ruleset>>,
    affinity: AffinityTable,
    /// Affinity scopes by virtual service; locked by sync and inspection.
    scopes: Mutex<ScopeRegistry>,
    planner: Mutex<Planner>,
    states: Arc<BackendStates>,
    conn: ConnLayer,
}

impl Shared {
    fn recompile(&self, planner: &Planner) {
        // The whole rule set is rewritten on every change.
        let rs = {
            let mut scopes = self.scopes.lock();
            Ruleset::compile(planner, &self.affinity, &mut scopes)
        };
        self.rules.store(Arc::new(rs));
    }

    #[inline]
    /// One packet; `rules` loads the rule list, only for a new connection
    /// (a tracked hit never reads it).
    fn packet<R>(
        &self,
        mut rules: impl FnMut() -> R,
        rng: &SeededRng,
        flow: &Flow,
        key: Option<u64>,
        flags: TcpFlags,
        now: Instant,
    ) -> Verdict
    where
        R: core::ops::Deref,
        R::Target: core::borrow::Borrow<Ruleset>,
    {
        self.conn
            .packet(&self.states, flow, flags, now, rng, |flow| {
                let held = rules();
                let rs: &Ruleset = core::borrow::Borrow::borrow(&*held);
                rs.decide(flow, key, now, rng, &self.affinity, &[])
            })
    }

    /// A retry without the backends in `exclude`.
    fn route_excluding(
        &self,
        rules: &Ruleset,
        rng: &SeededRng,
        flow: &Flow,
        key: Option<u64>,
        exclude: &[BackendId],
        now: Instant,
    ) -> Verdict {
        self.conn
            .route_excluding(&self.states, flow, exclude, now, rng, |flow, exclude| {
                rules.decide(flow, key, now, rng, &self.affinity, exclude)
            })
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
    rules: Cache<Arc<ArcSwap<Ruleset>>, Arc<Ruleset>>,
    rng: SeededRng,
}

impl IptablesReader {
    /// A new connection's first packet, as [`Dataplane::route`].
    #[inline]
    pub fn route(&mut self, flow: &Flow, now: Instant) -> Verdict {
        self.route_with_key(flow, None, now)
    }

    /// [`route`](Self::route) with a caller-supplied affinity key.
    #[inline]
    pub fn route_with_key(&mut self, flow: &Flow, key: Option<u64>, now: Instant) -> Verdict {
        // The cache's check is one atomic load: cheap enough to do up front.
        let rules: &Arc<Ruleset> = self.rules.load();
        self.shared
            .packet(move || rules, &self.rng, flow, key, first_packet(flow), now)
    }

    /// Any packet of a flow, as [`Dataplane::packet`].
    #[inline]
    pub fn packet(&mut self, flow: &Flow, flags: TcpFlags, now: Instant) -> Verdict {
        let rules: &Arc<Ruleset> = self.rules.load();
        self.shared
            .packet(move || rules, &self.rng, flow, None, flags, now)
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
        let rules: &Arc<Ruleset> = self.rules.load();
        self.shared
            .route_excluding(rules, &self.rng, flow, key, exclude, now)
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
                rules: Arc::new(ArcSwap::from_pointee(Ruleset::default())),
                scopes: Mutex::new(ScopeRegistry::default()),
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
        let rs = self.shared.rules.load();
        rs.nat.len() + rs.filter.len()
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
        sh.recompile(&planner);
        sh.conn.publish(&planner, &diff);
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
        self.shared.conn.reply_of(reply, Some(flags), now)
    }

    fn peek_reply(&self, reply: &Flow, now: Instant) -> Option<Tracked> {
        self.shared.conn.reply_of(reply, None, now)
    }

    fn peek(&self, flow: &Flow, now: Instant) -> Option<Tracked> {
        self.shared.conn.peek(&self.shared.states, flow, now)
    }

    fn candidates(&self, protocol: Protocol, dst: SocketAddr) -> Candidates {
        let rs = self.shared.rules.load();
        let probe = Flow::new(protocol, SocketAddr::from(([0, 0, 0, 0], 0)), dst);
        match rs.find(&probe) {
            None => Candidates::NotAService,
            Some(r) => match r.outcome {
                Outcome::Forward => Candidates::Endpoints(
                    rs.chains[r.chain as usize]
                        .endpoints
                        .iter()
                        .map(|e| e.1)
                        .collect(),
                ),
                Outcome::Drop => Candidates::Drop,
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
            sh.recompile(&planner);
            sh.conn.publish(&planner, &diff);
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
