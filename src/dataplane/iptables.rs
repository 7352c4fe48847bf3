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

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::{Candidates, Dataplane, DataplaneConfig};
use crate::model::flow::{Flow, Protocol, Verdict};
use crate::rng::SeededRng;
use crate::scheduler::{iptables_probability, probability_threshold};
use crate::table::{ChangeSet, ServiceTable};
use crate::time::Instant;
use crate::topology::{Selection, categorize};

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
/// threshold `u32::MAX` (no `-m statistic`).
#[derive(Debug, Clone)]
struct ServiceChain {
    rules: Box<[(u32, u32)]>,
    endpoints: Box<[SocketAddr]>,
}

#[derive(Debug, Default)]
struct Ruleset {
    nat: Vec<ServiceRule>,
    filter: Vec<ServiceRule>,
    chains: Vec<ServiceChain>,
}

impl Ruleset {
    fn compile(table: &ServiceTable, config: &DataplaneConfig) -> Ruleset {
        let mut rs = Ruleset::default();
        for key in table.keys_sorted() {
            let view = table.view(&key).expect("listed keys exist");
            let svc = view.service();
            for &ip in svc.cluster_ip().addrs() {
                for pv in view.ports() {
                    let port = pv.port();
                    let selection = categorize(
                        pv.endpoints(),
                        svc.internal_traffic_policy(),
                        &config.node,
                        Some(ip),
                    );
                    // Weight 0 takes no new connections (the svclb
                    // extension IPVS honours): such endpoints get no rule.
                    let selection = match selection {
                        Selection::Usable(mut eps) => {
                            eps.retain(|e| e.weight() > 0);
                            if eps.is_empty() {
                                Selection::NoEndpoints
                            } else {
                                Selection::Usable(eps)
                            }
                        }
                        other => other,
                    };
                    let (list, target) = match selection {
                        Selection::Usable(eps) => {
                            let n = eps.len();
                            let rules = (0..n)
                                .map(|i| {
                                    let t = if i + 1 == n {
                                        u32::MAX
                                    } else {
                                        probability_threshold(iptables_probability(i, n))
                                    };
                                    (i as u32, t)
                                })
                                .collect();
                            rs.chains.push(ServiceChain {
                                rules,
                                endpoints: eps.iter().map(|e| e.addr()).collect(),
                            });
                            (&mut rs.nat, Target::Chain(rs.chains.len() as u32 - 1))
                        }
                        Selection::NoEndpoints => (&mut rs.filter, Target::Reject),
                        Selection::NoLocalEndpoints => (&mut rs.filter, Target::Drop),
                    };
                    list.push(ServiceRule {
                        dst: ip,
                        protocol: port.protocol(),
                        dport: port.port(),
                        target,
                    });
                }
            }
        }
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
    writer: Mutex<()>,
}

impl IptablesDataplane {
    /// An empty dataplane (every flow is not-a-service until a sync).
    pub fn new(config: DataplaneConfig) -> Self {
        IptablesDataplane {
            rng: SeededRng::new(config.seed),
            config,
            rules: ArcSwap::from_pointee(Ruleset::default()),
            writer: Mutex::new(()),
        }
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
        let rs = Ruleset::compile(table, &self.config);
        self.rules.store(Arc::new(rs));
    }

    fn route(&self, flow: &Flow, _now: Instant) -> Verdict {
        let rs = self.rules.load();
        match rs.find(flow) {
            None => Verdict::NotAService,
            Some(Target::Reject) => Verdict::Reject,
            Some(Target::Drop) => Verdict::Drop,
            Some(Target::Chain(c)) => {
                let chain = &rs.chains[c as usize];
                match crate::scheduler::random::walk_cascade(&chain.rules, || {
                    self.rng.next_u64() as u32
                }) {
                    Some(i) => Verdict::Forward(chain.endpoints[i]),
                    None => Verdict::Reject,
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
}
