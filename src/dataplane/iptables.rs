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
//! grows with the number of services. Every sync recompiles the whole list,
//! as an `iptables-restore` of the full rule set does.
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

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use smallvec::SmallVec;

use super::{Candidates, Dataplane, DataplaneConfig};
use crate::affinity::{
    AffinityEntry, AffinityPort, AffinityReport, AffinityTable, ScopeRegistry, VsId,
};
use crate::model::flow::{Flow, Protocol, Verdict};
use crate::model::service::ServiceKey;
use crate::rng::SeededRng;
use crate::scheduler::random::cascade_rules;
use crate::table::{ChangeSet, ServiceTable};
use crate::time::Instant;
use crate::topology::{Selection, categorize_weighted};

/// One `KUBE-SERVICES` rule: `-d VIP/32 -p PROTO --dport PORT -j TARGET`.
#[derive(Debug, Clone, Copy)]
struct ServiceRule {
    dst: IpAddr,
    protocol: Protocol,
    dport: u16,
    target: Target,
}

#[derive(Debug, Clone, Copy)]
enum Target {
    /// Jump to the service chain with this index.
    Chain(u32),
    Reject,
    Drop,
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
    rules: Box<[(u32, u32)]>,
    endpoints: Box<[SocketAddr]>,
    affinity: Option<AffinityPort>,
}

#[derive(Debug, Default)]
struct Ruleset {
    nat: Vec<ServiceRule>,
    filter: Vec<ServiceRule>,
    chains: Vec<ServiceChain>,
}

impl Ruleset {
    fn compile(
        table: &ServiceTable,
        config: &DataplaneConfig,
        affinity: &AffinityTable,
        scopes: &mut ScopeRegistry,
    ) -> Ruleset {
        let mut rs = Ruleset::default();
        for key in table.keys_sorted() {
            let view = table.view(&key).expect("listed keys exist");
            let svc = view.service();
            let mut bound: SmallVec<[VsId; 4]> = SmallVec::new();
            for &ip in svc.cluster_ip().addrs() {
                for pv in view.ports() {
                    let port = pv.port();
                    let vs: VsId = (port.protocol(), SocketAddr::new(ip, port.port()));
                    // Weight-0 endpoints get no rule.
                    let selection = categorize_weighted(
                        pv.endpoints(),
                        svc.internal_traffic_policy(),
                        &config.node,
                        Some(ip),
                    );
                    let (list, target) = match selection {
                        Selection::Usable(eps) => {
                            let rules = cascade_rules(0..eps.len() as u32);
                            let endpoints: Box<[SocketAddr]> =
                                eps.iter().map(|e| e.addr()).collect();
                            let port_affinity =
                                scopes.bind(affinity, svc, vs, &endpoints, |_| true);
                            if port_affinity.is_some() {
                                bound.push(vs);
                            }
                            rs.chains.push(ServiceChain {
                                rules,
                                endpoints,
                                affinity: port_affinity,
                            });
                            (&mut rs.nat, Target::Chain(rs.chains.len() as u32 - 1))
                        }
                        sel => {
                            // No endpoint rules: every client's entry goes.
                            if scopes.bind(affinity, svc, vs, &[], |_| true).is_some() {
                                bound.push(vs);
                            }
                            match sel {
                                Selection::NoLocalEndpoints => (&mut rs.filter, Target::Drop),
                                _ => (&mut rs.filter, Target::Reject),
                            }
                        }
                    };
                    list.push(ServiceRule {
                        dst: ip,
                        protocol: port.protocol(),
                        dport: port.port(),
                        target,
                    });
                }
            }
            scopes.finish_service(affinity, &key, &bound);
        }
        scopes.retain_services(affinity, |k| table.service(k).is_some());
        rs
    }

    #[inline]
    fn find(&self, flow: &Flow) -> Option<Target> {
        self.nat
            .iter()
            .chain(self.filter.iter())
            .find(|r| r.matches(flow))
            .map(|r| r.target)
    }
}

/// The iptables-mode dataplane. See the module docs.
#[derive(Debug)]
pub struct IptablesDataplane {
    config: DataplaneConfig,
    rng: SeededRng,
    rules: ArcSwap<Ruleset>,
    affinity: AffinityTable,
    /// Affinity scopes by virtual service; locked by sync and inspection.
    scopes: Mutex<ScopeRegistry>,
    writer: Mutex<()>,
}

impl IptablesDataplane {
    /// An empty dataplane (every flow is not-a-service until a sync).
    pub fn new(config: DataplaneConfig) -> Self {
        IptablesDataplane {
            rng: SeededRng::new(config.seed),
            affinity: AffinityTable::new(config.affinity.clone(), config.seed),
            config,
            rules: ArcSwap::from_pointee(Ruleset::default()),
            scopes: Mutex::new(ScopeRegistry::default()),
            writer: Mutex::new(()),
        }
    }

    /// The session-affinity table (the `xt_recent` lists).
    pub fn affinity_table(&self) -> &AffinityTable {
        &self.affinity
    }

    /// The number of rules a lookup may walk (nat `KUBE-SERVICES` plus
    /// filter `KUBE-SERVICES`).
    pub fn rule_count(&self) -> usize {
        let rs = self.rules.load();
        rs.nat.len() + rs.filter.len()
    }

    /// The config.
    pub fn config(&self) -> &DataplaneConfig {
        &self.config
    }
}

impl Dataplane for IptablesDataplane {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn sync(&self, table: &ServiceTable, _changes: &ChangeSet) {
        let _w = self.writer.lock();
        // The whole rule set is rewritten on every change.
        let rs = {
            let mut scopes = self.scopes.lock();
            Ruleset::compile(table, &self.config, &self.affinity, &mut scopes)
        };
        self.rules.store(Arc::new(rs));
    }

    fn route(&self, flow: &Flow, now: Instant) -> Verdict {
        self.route_with_key(flow, None, now)
    }

    fn route_with_key(&self, flow: &Flow, key: Option<u64>, now: Instant) -> Verdict {
        let rs = self.rules.load();
        match rs.find(flow) {
            None => Verdict::NotAService,
            Some(Target::Reject) => Verdict::Reject,
            Some(Target::Drop) => Verdict::Drop,
            Some(Target::Chain(c)) => {
                let chain = &rs.chains[c as usize];
                let cascade = || {
                    crate::scheduler::random::walk_cascade(&chain.rules, || {
                        self.rng.next_u64() as u32
                    })
                };
                match &chain.affinity {
                    None => match cascade() {
                        Some(i) => Verdict::Forward(chain.endpoints[i]),
                        None => Verdict::Reject,
                    },
                    Some(aff) => {
                        let pinned = self.affinity.route(
                            &aff.scope,
                            aff.key(flow, key),
                            now,
                            // The `--rcheck` rules, one per endpoint, in order.
                            |ep| chain.endpoints.iter().position(|e| *e == ep),
                            || cascade().map(|i| (i, chain.endpoints[i])),
                        );
                        match pinned {
                            Some(p) => {
                                aff.count(p.index);
                                Verdict::Forward(p.endpoint)
                            }
                            None => Verdict::Reject,
                        }
                    }
                }
            }
        }
    }

    fn connection_closed(&self, _flow: &Flow, _backend: SocketAddr, _now: Instant) {
        // iptables keeps no per-backend state: conntrack does, in the kernel.
    }

    fn candidates(&self, protocol: Protocol, dst: SocketAddr) -> Candidates {
        let rs = self.rules.load();
        let probe = Flow::new(protocol, SocketAddr::from(([0, 0, 0, 0], 0)), dst);
        match rs.find(&probe) {
            None => Candidates::NotAService,
            Some(Target::Reject) => Candidates::Reject,
            Some(Target::Drop) => Candidates::Drop,
            Some(Target::Chain(c)) => {
                Candidates::Endpoints(rs.chains[c as usize].endpoints.to_vec())
            }
        }
    }

    fn affinity_entries(&self, service: &ServiceKey, now: Instant) -> Vec<AffinityEntry> {
        self.scopes.lock().entries(&self.affinity, service, now)
    }

    fn affinity_report(&self, service: &ServiceKey, now: Instant) -> Option<AffinityReport> {
        self.scopes.lock().report(&self.affinity, service, now)
    }
}
