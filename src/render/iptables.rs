//! The table as `iptables-restore` input, written the way kube-proxy's
//! iptables mode writes it (`pkg/proxy/iptables/proxier.go`, Kubernetes
//! 1.31–1.33 generation):
//!
//! - `*filter`: the fixed chains, `REJECT` rules for service ports without
//!   endpoints (`"ns/svc:port has no endpoints"`), `DROP` rules for Local
//!   policies without local endpoints, the same for external destinations
//!   in `KUBE-EXTERNAL-SERVICES`, health-check node ports accepted in
//!   `KUBE-NODEPORTS`, `KUBE-PROXY-FIREWALL` drops for load-balancer IPs
//!   with source ranges, `KUBE-FIREWALL` and `KUBE-FORWARD` (with the
//!   `nfacct` counter unless [`RenderOptions::nfacct`] is off);
//! - `*nat`: `KUBE-SERVICES` jumps per (cluster IP, external IP,
//!   load-balancer IP; protocol, port), `KUBE-NODEPORTS` jumps per node
//!   port (and for `127.0.0.0/8`, counted by `nfacct`), `KUBE-SVC-…`/`KUBE-SVL-…`
//!   chains with the `-m statistic` cascade and the `-m recent --rcheck`
//!   ClientIP-affinity rules, `KUBE-EXT-…` chains (masquerade, or for
//!   `externalTrafficPolicy: Local` the pod and LOCAL short-circuits),
//!   `KUBE-FW-…` chains for `loadBalancerSourceRanges`, `KUBE-SEP-…` chains
//!   with the hairpin masquerade, `-m recent --set` and the DNAT, and the
//!   fixed `KUBE-MARK-MASQ`/`KUBE-POSTROUTING` chains.
//!
//! Chain names are kube-proxy's: `KUBE-SVC-` + the first 16 characters of
//! base32(sha256(`"ns/name:port" + "tcp"`)), `KUBE-SEP-` over the same plus
//! the endpoint `IP:port`. Every rule's arguments come in kube-proxy's order
//! and its comments are quoted the way kube-proxy quotes them, so the lines
//! diff clean against kube-proxy's output for the same objects.
//!
//! kube-proxy writes services in Go map order; its tests sort the output
//! (`sortIPTablesRules`). This renderer writes that sorted form directly:
//! chains `KUBE-NODEPORTS`, `KUBE-SERVICES`, then the other `KUBE-*` chains
//! alphabetically, then built-in chains; rules grouped by chain;
//! `KUBE-SERVICES` rules ordered by service name (stably), the NodePorts
//! jump last. Like kube-proxy, more than 1000 endpoints in total switch to
//! "large cluster mode", which leaves the comments off the endpoint rules.
//!
//! [`Syncer`] writes kube-proxy's partial syncs: after the first (full)
//! sync, only the chains of services whose rules changed, and `-X` for
//! chains no longer used.
//!
//! External destinations follow the external traffic policy alone: a
//! service with `internalTrafficPolicy: Local` sends its cluster IP to
//! `KUBE-SVL-…` (or drops it) and still gets the Cluster-policy
//! `KUBE-SVC-…` chain for its node port, external and load-balancer IPs,
//! as kube-proxy writes it (`UsesClusterEndpoints`).

use std::fmt::Write as _;

use core::time::Duration;

use super::{PortPlan, RenderOptions, RulesSync, hash, port_plans};
use crate::model::flow::Protocol;
use crate::model::service::TrafficPolicy;
use crate::plan::{Outcome, Planner};
use crate::table::{EndpointInfo, ServiceTable};
use crate::time::Instant;
use crate::topology::{Selection, categorize};
use std::sync::Arc;

const KUBE_SERVICES: &str = "KUBE-SERVICES";
const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
const KUBE_FORWARD: &str = "KUBE-FORWARD";
const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
const KUBE_FIREWALL: &str = "KUBE-FIREWALL";
const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
const NODEPORTS_COMMENT: &str =
    "\"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";

/// kube-proxy's nfacct counter of packets dropped as conntrack-INVALID.
const NFACCT_INVALID: &str = "ct_state_invalid_dropped_pkts";
/// kube-proxy's nfacct counter of packets accepted on localhost node ports.
const NFACCT_LOCALHOST_NODEPORTS: &str = "localhost_nps_accepted_pkts";

/// Rules of kube-proxy's top-level chains, collected per service and
/// sorted by service name when written.
#[derive(Debug, Default)]
struct Collected {
    filter_services: Vec<String>,
    nat_services: Vec<String>,
    filter_external: Vec<String>,
    filter_nodeports: Vec<String>,
    filter_firewall: Vec<String>,
    nat_nodeports: Vec<String>,
}

/// The `KUBE-EXT-…` chain of a service port (external destinations).
///
/// # Examples
/// ```
/// use svclb::{Protocol, render::iptables::external_chain_name};
/// assert_eq!(external_chain_name("ns2/svc2:p80", Protocol::Tcp), "KUBE-EXT-GNZBNJ2PO5MGZ6GT");
/// ```
pub fn external_chain_name(service_port_name: &str, protocol: Protocol) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(service_port_name, protocol))
}

/// The `KUBE-FW-…` chain of a service port (load-balancer source ranges).
///
/// # Examples
/// ```
/// use svclb::{Protocol, render::iptables::firewall_chain_name};
/// assert_eq!(firewall_chain_name("ns5/svc5:p80", Protocol::Tcp), "KUBE-FW-NUKIZ6OKUXPJNT4C");
/// ```
pub fn firewall_chain_name(service_port_name: &str, protocol: Protocol) -> String {
    format!("KUBE-FW-{}", port_proto_hash(service_port_name, protocol))
}

/// More endpoints than this and kube-proxy drops the per-endpoint comments.
pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// kube-proxy's 16-character chain hash of a service port name and protocol.
fn port_proto_hash(service_port_name: &str, protocol: Protocol) -> String {
    hash::hash16(&format!("{service_port_name}{}", protocol.as_lower_str()))
}

/// The `KUBE-SVC-…` chain of a service port (Cluster policy).
///
/// `service_port_name` is `ns/name:port`, or `ns/name` when the port has no
/// name.
///
/// # Examples
/// ```
/// use svclb::{Protocol, render::iptables::service_chain_name};
/// assert_eq!(service_chain_name("ns1/svc1:p80", Protocol::Tcp), "KUBE-SVC-XPGD46QRK7WJZT7O");
/// ```
pub fn service_chain_name(service_port_name: &str, protocol: Protocol) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(service_port_name, protocol))
}

/// The `KUBE-SVL-…` chain of a service port (Local policy).
///
/// # Examples
/// ```
/// use svclb::{Protocol, render::iptables::local_chain_name};
/// assert_eq!(local_chain_name("ns2/svc2:p80", Protocol::Tcp), "KUBE-SVL-GNZBNJ2PO5MGZ6GT");
/// ```
pub fn local_chain_name(service_port_name: &str, protocol: Protocol) -> String {
    format!("KUBE-SVL-{}", port_proto_hash(service_port_name, protocol))
}

/// The `KUBE-SEP-…` chain of one endpoint (`IP:port`, IPv6 in brackets) of
/// a service port.
///
/// # Examples
/// ```
/// use svclb::{Protocol, render::iptables::endpoint_chain_name};
/// assert_eq!(
///     endpoint_chain_name("ns1/svc1:p80", Protocol::Tcp, "10.180.0.1:80"),
///     "KUBE-SEP-SXIVWICOYRO3J4NJ"
/// );
/// ```
pub fn endpoint_chain_name(service_port_name: &str, protocol: Protocol, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash::hash16(&format!(
            "{service_port_name}{}{endpoint}",
            protocol.as_lower_str()
        ))
    )
}

/// kube-proxy's probability text for rule `i` of `n`: `1/(n-i)` with ten
/// decimals (`0.3333333333`).
fn probability(i: usize, n: usize) -> String {
    format!("{:.10}", 1.0 / (n - i) as f64)
}

/// One chain being assembled.
#[derive(Debug)]
struct Chain {
    name: String,
    /// Declared with a `:CHAIN - [0:0]` line.
    declared: bool,
    rules: Vec<String>,
    /// The service (index into [`Built::services`]) whose chain this is;
    /// `None` for kube-proxy's fixed chains.
    owner: Option<u32>,
    /// A stale chain a sync flushes and deletes (`-X`).
    delete: bool,
}

/// One table being assembled: declared chains and rules grouped by chain.
#[derive(Debug, Default)]
struct TableText {
    chains: Vec<Chain>,
    /// Chain name -> index in `chains`: finding a chain was a scan of
    /// every chain, which made a rendering quadratic in the services.
    index: ahash::AHashMap<String, usize>,
    /// The service whose chains are being written now.
    owner: Option<u32>,
}

impl TableText {
    fn chain(&mut self, name: &str, declare: bool) -> &mut Vec<String> {
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                self.chains.push(Chain {
                    name: name.to_owned(),
                    declared: declare,
                    rules: Vec::new(),
                    owner: self.owner,
                    delete: false,
                });
                self.index.insert(name.to_owned(), self.chains.len() - 1);
                self.chains.len() - 1
            }
        };
        &mut self.chains[i].rules
    }

    fn declare(&mut self, name: &str) {
        self.chain(name, true);
    }

    fn rule(&mut self, chain: &str, args: &[&str]) {
        let len = 4 + chain.len() + args.iter().map(|a| a.len() + 1).sum::<usize>();
        let mut line = String::with_capacity(len);
        line.push_str("-A ");
        line.push_str(chain);
        line.push(' ');
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                line.push(' ');
            }
            line.push_str(a);
        }
        self.chain(chain, false).push(line);
    }

    /// The sorted form: `KUBE-NODEPORTS`, `KUBE-SERVICES`, other `KUBE-*`,
    /// then the rest, each group alphabetical. Chains for which `keep`
    /// says no are left out; chains marked `delete` are declared (which
    /// flushes them) and deleted with `-X` after the rules.
    fn write(mut self, out: &mut String, name: &str, keep: impl Fn(&Chain) -> bool) {
        fn rank(chain: &str) -> u8 {
            match chain {
                KUBE_NODEPORTS => 0,
                KUBE_SERVICES => 1,
                c if c.starts_with("KUBE-") => 2,
                _ => 3,
            }
        }
        self.chains.retain(|c| c.delete || keep(c));
        self.chains.sort_by(|a, b| {
            (rank(&a.name), a.name.as_str()).cmp(&(rank(&b.name), b.name.as_str()))
        });
        let _ = writeln!(out, "*{name}");
        for c in &self.chains {
            if c.declared {
                let _ = writeln!(out, ":{} - [0:0]", c.name);
            }
        }
        for c in &self.chains {
            for rule in &c.rules {
                out.push_str(rule);
                out.push('\n');
            }
        }
        for c in self.chains.iter().filter(|c| c.delete) {
            let _ = writeln!(out, "-X {}", c.name);
        }
        out.push_str("COMMIT\n");
    }
}

/// The service name a `KUBE-SERVICES` rule sorts by: its comment up to the
/// first space or colon, as kube-proxy's test sorter reads it.
fn comment_service_name(rule: &str) -> &str {
    let Some((_, rest)) = rule.split_once("--comment ") else {
        return "";
    };
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    let end = rest.find([' ', ':', '"']).unwrap_or(rest.len());
    &rest[..end]
}

/// Renders the table as `iptables-restore` input (`ip6tables-restore` with
/// [`IpFamily::V6`](super::IpFamily::V6)). See the module docs.
///
/// # Examples
/// See the [`render`](crate::render) module.
pub fn render(table: &ServiceTable, opts: &RenderOptions) -> String {
    let built = build(table, opts);
    let mut out = String::new();
    built.filter.write(&mut out, "filter", |_| true);
    built.nat.write(&mut out, "nat", |_| true);
    out
}

/// A rendering before it is written out: both tables, with each
/// service's chains marked as that service's.
#[derive(Debug)]
struct Built {
    filter: TableText,
    nat: TableText,
    /// `ns/name` of each service that owns chains, by owner index.
    services: Vec<String>,
    large_cluster: bool,
}

fn build(table: &ServiceTable, opts: &RenderOptions) -> Built {
    let plan = Planner::compile(table, &opts.node);
    let (plans, total_endpoints) = port_plans(table, &plan, opts);
    let large_cluster = total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
    let ipv6 = opts.family == super::IpFamily::V6;
    let mark = opts.masquerade_mark.as_str();
    let mark_mask = format!("{mark}/{mark}");

    let mut filter = TableText::default();
    let mut nat = TableText::default();
    for chain in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
    ] {
        filter.declare(chain);
    }
    for chain in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
    ] {
        nat.declare(chain);
    }
    nat.rule(
        KUBE_POSTROUTING,
        &["-m", "mark", "!", "--mark", &mark_mask, "-j", "RETURN"],
    );
    nat.rule(KUBE_POSTROUTING, &["-j", "MARK", "--xor-mark", mark]);
    let mut masq = vec![
        "-m",
        "comment",
        "--comment",
        "\"kubernetes service traffic requiring SNAT\"",
        "-j",
        "MASQUERADE",
    ];
    if opts.random_fully {
        masq.push("--random-fully");
    }
    nat.rule(KUBE_POSTROUTING, &masq);
    nat.rule(KUBE_MARK_MASQ, &["-j", "MARK", "--or-mark", mark]);
    let kubelet_firewall = !ipv6 && opts.localhost_nodeports;
    if kubelet_firewall {
        filter.declare(KUBE_FIREWALL);
        filter.rule(
            KUBE_FIREWALL,
            &[
                "-m",
                "comment",
                "--comment",
                "\"block incoming localnet connections\"",
                "-d",
                "127.0.0.0/8",
                "!",
                "-s",
                "127.0.0.0/8",
                "-m",
                "conntrack",
                "!",
                "--ctstate",
                "RELATED,ESTABLISHED,DNAT",
                "-j",
                "DROP",
            ],
        );
    }

    // KUBE-SERVICES (and the other per-service top-level chains') rules
    // are collected apart and sorted by service name.
    let mut c = Collected::default();
    let mut services: Vec<String> = Vec::new();
    let mut owners: ahash::AHashMap<&crate::model::service::ServiceKey, u32> =
        ahash::AHashMap::new();
    for p in &plans {
        let key = p.service.key();
        let owner = *owners.entry(key).or_insert_with(|| {
            services.push(format!("{}/{}", key.namespace, key.name));
            (services.len() - 1) as u32
        });
        nat.owner = Some(owner);
        write_service_port(p, table, opts, large_cluster, &mut nat, &mut c);
        nat.owner = None;
    }
    let by_service = |v: &mut Vec<String>| {
        v.sort_by(|a, b| comment_service_name(a).cmp(comment_service_name(b)));
    };
    let Collected {
        mut filter_services,
        mut nat_services,
        mut filter_external,
        mut filter_nodeports,
        mut filter_firewall,
        mut nat_nodeports,
    } = c;
    for v in [
        &mut filter_services,
        &mut nat_services,
        &mut filter_external,
        &mut filter_nodeports,
        &mut filter_firewall,
        &mut nat_nodeports,
    ] {
        by_service(v);
    }
    *filter.chain(KUBE_SERVICES, true) = filter_services;
    *filter.chain(KUBE_EXTERNAL_SERVICES, true) = filter_external;
    *filter.chain(KUBE_NODEPORTS, true) = filter_nodeports;
    *filter.chain(KUBE_PROXY_FIREWALL, true) = filter_firewall;
    *nat.chain(KUBE_NODEPORTS, true) = nat_nodeports;
    if opts.nodeports_match_all() {
        let mut nodeports = vec!["-m", "comment", "--comment", NODEPORTS_COMMENT];
        nodeports.extend(["-m", "addrtype", "--dst-type", "LOCAL"]);
        if ipv6 {
            nodeports.extend(["!", "-d", "::1/128"]);
        } else if !opts.localhost_nodeports {
            nodeports.extend(["!", "-d", "127.0.0.0/8"]);
        }
        nodeports.extend(["-j", KUBE_NODEPORTS]);
        nat_services.push(format!("-A {KUBE_SERVICES} {}", nodeports.join(" ")));
    } else {
        // `--nodeport-addresses`: one rule per node IP inside it; loopback
        // only for IPv4 with localhost node ports (kube-proxy's rule).
        for ip in opts.nodeport_ips() {
            if ip.is_loopback() && (ipv6 || !opts.localhost_nodeports) {
                continue;
            }
            nat_services.push(format!(
                "-A {KUBE_SERVICES} -m comment --comment {NODEPORTS_COMMENT} -d {ip} -j {KUBE_NODEPORTS}"
            ));
        }
    }
    *nat.chain(KUBE_SERVICES, true) = nat_services;

    let mut invalid = vec!["-m", "conntrack", "--ctstate", "INVALID"];
    if opts.nfacct {
        invalid.extend(["-m", "nfacct", "--nfacct-name", NFACCT_INVALID]);
    }
    invalid.extend(["-j", "DROP"]);
    filter.rule(KUBE_FORWARD, &invalid);
    filter.rule(
        KUBE_FORWARD,
        &[
            "-m",
            "comment",
            "--comment",
            "\"kubernetes forwarding rules\"",
            "-m",
            "mark",
            "--mark",
            &mark_mask,
            "-j",
            "ACCEPT",
        ],
    );
    filter.rule(
        KUBE_FORWARD,
        &[
            "-m",
            "comment",
            "--comment",
            "\"kubernetes forwarding conntrack rule\"",
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ],
    );

    if opts.builtin_jumps {
        write_builtin_jumps(&mut filter, &mut nat, kubelet_firewall);
    }

    Built {
        filter,
        nat,
        services,
        large_cluster,
    }
}

/// The rules of one service port on one cluster IP.
fn write_service_port(
    p: &PortPlan<'_>,
    table: &ServiceTable,
    opts: &RenderOptions,
    large_cluster: bool,
    nat: &mut TableText,
    c: &mut Collected,
) {
    let proto = p.proto();
    let protocol = p.port.protocol();
    let vip = p.vip.to_string();
    let dport = p.port.port().to_string();
    let name = p.name;
    let (what, verdict) = match p.outcome {
        Outcome::Drop => ("has no local endpoints", "DROP"),
        _ => ("has no endpoints", "REJECT"),
    };
    let eps = &p.endpoints;
    if p.outcome != Outcome::Forward {
        // No nat chains for the cluster IP: only its filter rule.
        c.filter_services.push(format!(
            "-A {KUBE_SERVICES} -m comment --comment \"{name} {what}\" -m {proto} -p {proto} -d {vip} --dport {dport} -j {verdict}"
        ));
        write_external(p, table, opts, large_cluster, nat, c);
        return;
    }
    let chain = if p.local_policy() {
        local_chain_name(name, protocol)
    } else {
        service_chain_name(name, protocol)
    };
    let cluster_ip_comment = format!("\"{name} cluster IP\"");
    c.nat_services.push(format!(
        "-A {KUBE_SERVICES} -m comment --comment {cluster_ip_comment} -m {proto} -p {proto} -d {vip} --dport {dport} -j {chain}"
    ));
    write_external(p, table, opts, large_cluster, nat, c);

    nat.declare(&chain);
    let capture = [
        "-m",
        "comment",
        "--comment",
        &cluster_ip_comment,
        "-m",
        proto,
        "-p",
        proto,
        "-d",
        &vip,
        "--dport",
        &dport,
    ];
    if opts.masquerade_all {
        let mut args = capture.to_vec();
        args.extend(["-j", KUBE_MARK_MASQ]);
        nat.rule(&chain, &args);
    } else if let Some(cidr) = opts.family_cluster_cidr() {
        let cidr = cidr.to_string();
        let mut args = capture.to_vec();
        args.extend(["!", "-s", &cidr, "-j", KUBE_MARK_MASQ]);
        nat.rule(&chain, &args);
    }

    let (sep, affinity) = write_endpoint_jumps(nat, &chain, p, eps, large_cluster);
    write_endpoint_chains(nat, p, &sep, eps, affinity, large_cluster);
}

/// The `KUBE-SEP-` chains of `eps` (with their chain names and addresses
/// in `sep`): the hairpin masquerade and the DNAT.
fn write_endpoint_chains(
    nat: &mut TableText,
    p: &PortPlan<'_>,
    sep: &[(String, String)],
    eps: &[&Arc<EndpointInfo>],
    affinity: bool,
    large_cluster: bool,
) {
    let proto = p.proto();
    let name = p.name;
    for ((sep_chain, addr), ep) in sep.iter().zip(eps) {
        nat.declare(sep_chain);
        let ip = ep.addr().ip().to_string();
        let mut args: Vec<&str> = Vec::with_capacity(16);
        if !large_cluster {
            args.extend(["-m", "comment", "--comment", name]);
        }
        let base = args.len();
        args.extend(["-s", &ip, "-j", KUBE_MARK_MASQ]);
        nat.rule(sep_chain, &args);
        args.truncate(base);
        if affinity {
            args.extend(["-m", "recent", "--name", sep_chain, "--set"]);
        }
        args.extend([
            "-m",
            proto,
            "-p",
            proto,
            "-j",
            "DNAT",
            "--to-destination",
            addr,
        ]);
        nat.rule(sep_chain, &args);
    }
}

/// The rules of a service port's external destinations (its node port,
/// external IPs and load-balancer IPs), as kube-proxy's `syncProxyRules`
/// writes them: the `KUBE-SERVICES` and `KUBE-NODEPORTS` jumps, the
/// `KUBE-EXTERNAL-SERVICES` and `KUBE-PROXY-FIREWALL` filter rules, the
/// health-check node port, and the `KUBE-EXT-`, `KUBE-FW-` and (for
/// `externalTrafficPolicy: Local`) `KUBE-SVL-` chains.
///
/// External traffic follows the external policy only. For a service with
/// `internalTrafficPolicy: Local` the cluster IP goes to `KUBE-SVL-` (or is
/// dropped), so the Cluster-policy chain `KUBE-SVC-` that external traffic
/// (and its short-circuit) needs is written here, with the `KUBE-SEP-`
/// chains of its endpoints (kube-proxy's `UsesClusterEndpoints`: an
/// externally accessible service always has it).
fn write_external(
    p: &PortPlan<'_>,
    table: &ServiceTable,
    opts: &RenderOptions,
    large_cluster: bool,
    nat: &mut TableText,
    c: &mut Collected,
) {
    let svc = p.service;
    if !svc.externally_accessible() {
        return;
    }
    let fam = opts.family;
    let name = p.name;
    let proto = p.proto();
    let protocol = p.port.protocol();
    let dport = p.port.port().to_string();
    let has_endpoints = p.outcome != Outcome::Reject;
    let etp_local = svc.external_traffic_policy() == TrafficPolicy::Local;
    let itp_local = p.local_policy();
    let selected = |policy: TrafficPolicy| -> Vec<Arc<EndpointInfo>> {
        table
            .view(svc.key())
            .and_then(|v| {
                v.ports().iter().find(|pv| {
                    pv.port().port() == p.port.port() && pv.port().protocol() == protocol
                })
            })
            .map(
                |pv| match categorize(pv.endpoints(), policy, &opts.node, Some(p.vip)) {
                    Selection::Usable(v) => v,
                    _ => Vec::new(),
                },
            )
            .unwrap_or_default()
    };
    let local: Vec<Arc<EndpointInfo>> = if etp_local {
        selected(TrafficPolicy::Local)
    } else {
        Vec::new()
    };
    let has_external = has_endpoints && (!etp_local || !local.is_empty());
    let ext = external_chain_name(name, protocol);
    let fw = firewall_chain_name(name, protocol);
    let svc_chain = service_chain_name(name, protocol);
    let ext_ips: Vec<String> = svc
        .external_ips()
        .iter()
        .filter(|ip| fam.contains(**ip))
        .map(ToString::to_string)
        .collect();
    let lb_ips: Vec<String> = svc
        .load_balancer_vips()
        .filter(|ip| fam.contains(*ip))
        .map(|ip| ip.to_string())
        .collect();
    let ranges: Vec<String> = svc
        .load_balancer_source_ranges()
        .iter()
        .filter(|r| fam.contains(r.addr()))
        .map(ToString::to_string)
        .collect();
    // kube-proxy's `usesFWChain := hasEndpoints && len(LoadBalancerVIPs) > 0
    // && len(LoadBalancerSourceRanges) > 0`: with no endpoints the
    // service's REJECT answers every source (TestNoEndpointsReject).
    let uses_fw = has_endpoints && !lb_ips.is_empty() && !ranges.is_empty();
    let (what, verdict) = if has_endpoints {
        ("has no local endpoints", "DROP")
    } else {
        ("has no endpoints", "REJECT")
    };
    for ip in &ext_ips {
        if has_endpoints {
            c.nat_services.push(format!(
                "-A {KUBE_SERVICES} -m comment --comment \"{name} external IP\" -m {proto} -p {proto} -d {ip} --dport {dport} -j {ext}"
            ));
        }
        if !has_external {
            c.filter_external.push(format!(
                "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment \"{name} {what}\" -m {proto} -p {proto} -d {ip} --dport {dport} -j {verdict}"
            ));
        }
    }
    for ip in &lb_ips {
        if has_endpoints {
            let target = if uses_fw { &fw } else { &ext };
            c.nat_services.push(format!(
                "-A {KUBE_SERVICES} -m comment --comment \"{name} loadbalancer IP\" -m {proto} -p {proto} -d {ip} --dport {dport} -j {target}"
            ));
        }
        if uses_fw {
            c.filter_firewall.push(format!(
                "-A {KUBE_PROXY_FIREWALL} -m comment --comment \"{name} traffic not accepted by {fw}\" -m {proto} -p {proto} -d {ip} --dport {dport} -j DROP"
            ));
        }
    }
    if !has_external {
        for ip in &lb_ips {
            c.filter_external.push(format!(
                "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment \"{name} {what}\" -m {proto} -p {proto} -d {ip} --dport {dport} -j {verdict}"
            ));
        }
    }
    if let Some(np) = p.port.node_port() {
        if has_endpoints {
            if fam == super::IpFamily::V4 && opts.localhost_nodeports {
                let nfacct = if opts.nfacct {
                    format!(" -m nfacct --nfacct-name {NFACCT_LOCALHOST_NODEPORTS}")
                } else {
                    String::new()
                };
                c.nat_nodeports.push(format!(
                    "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {proto} -p {proto} -d 127.0.0.0/8 --dport {np}{nfacct} -j {ext}"
                ));
            }
            c.nat_nodeports.push(format!(
                "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {proto} -p {proto} --dport {np} -j {ext}"
            ));
        }
        if !has_external {
            c.filter_external.push(format!(
                "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment \"{name} {what}\" -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j {verdict}"
            ));
        }
    }
    if let Some(hc) = svc.health_check_node_port() {
        c.filter_nodeports.push(format!(
            "-A {KUBE_NODEPORTS} -m comment --comment \"{name} health check node port\" -m tcp -p tcp --dport {hc} -j ACCEPT"
        ));
    }
    if !has_endpoints {
        return;
    }
    if itp_local {
        // The Cluster-policy chain, which the cluster IP does not write.
        let cluster = selected(TrafficPolicy::Cluster);
        let refs: Vec<&Arc<EndpointInfo>> = cluster.iter().collect();
        nat.declare(&svc_chain);
        let (sep, affinity) = write_endpoint_jumps(nat, &svc_chain, p, &refs, large_cluster);
        // The cluster IP's (local) endpoints have their chains already.
        let written = |e: &Arc<EndpointInfo>| {
            p.outcome == Outcome::Forward && p.endpoints.iter().any(|w| w.addr() == e.addr())
        };
        let (sep, refs): (Vec<(String, String)>, Vec<&Arc<EndpointInfo>>) = sep
            .into_iter()
            .zip(refs)
            .filter(|(_, e)| !written(e))
            .unzip();
        write_endpoint_chains(nat, p, &sep, &refs, affinity, large_cluster);
    }
    nat.declare(&ext);
    let dest = "external destinations\"";
    if etp_local {
        if let Some(cidr) = opts.family_cluster_cidr() {
            let cidr = cidr.to_string();
            let comment = format!("\"pod traffic for {name} {dest}");
            nat.rule(
                &ext,
                &[
                    "-m",
                    "comment",
                    "--comment",
                    &comment,
                    "-s",
                    &cidr,
                    "-j",
                    &svc_chain,
                ],
            );
        }
        let comment = format!("\"masquerade LOCAL traffic for {name} {dest}");
        nat.rule(
            &ext,
            &[
                "-m",
                "comment",
                "--comment",
                &comment,
                "-m",
                "addrtype",
                "--src-type",
                "LOCAL",
                "-j",
                KUBE_MARK_MASQ,
            ],
        );
        let comment = format!("\"route LOCAL traffic for {name} {dest}");
        nat.rule(
            &ext,
            &[
                "-m",
                "comment",
                "--comment",
                &comment,
                "-m",
                "addrtype",
                "--src-type",
                "LOCAL",
                "-j",
                &svc_chain,
            ],
        );
    } else {
        let comment = format!("\"masquerade traffic for {name} {dest}");
        nat.rule(
            &ext,
            &["-m", "comment", "--comment", &comment, "-j", KUBE_MARK_MASQ],
        );
    }
    if has_external {
        if etp_local {
            let svl = local_chain_name(name, protocol);
            nat.rule(&ext, &["-j", &svl]);
            // With `internalTrafficPolicy: Local` too, the cluster IP has
            // written the same chain already.
            if !(itp_local && p.outcome == Outcome::Forward) {
                nat.declare(&svl);
                let refs: Vec<&Arc<EndpointInfo>> = local.iter().collect();
                let (sep, affinity) = write_endpoint_jumps(nat, &svl, p, &refs, large_cluster);
                // A local endpoint outside the chains written already (serving
                // and terminating while the ready ones are elsewhere) gets its
                // KUBE-SEP- here: kube-proxy writes one per
                // `allLocallyReachableEndpoints`
                // (TestEndpointSliceWithTerminatingEndpoints).
                let cluster_written = if itp_local {
                    selected(TrafficPolicy::Cluster)
                } else {
                    Vec::new()
                };
                let written = |e: &Arc<EndpointInfo>| {
                    (p.outcome == Outcome::Forward
                        && p.endpoints.iter().any(|w| w.addr() == e.addr()))
                        || cluster_written.iter().any(|w| w.addr() == e.addr())
                };
                let (sep, refs): (Vec<(String, String)>, Vec<&Arc<EndpointInfo>>) = sep
                    .into_iter()
                    .zip(refs)
                    .filter(|(_, e)| !written(e))
                    .unzip();
                write_endpoint_chains(nat, p, &sep, &refs, affinity, large_cluster);
            }
        } else {
            nat.rule(&ext, &["-j", &svc_chain]);
        }
    }
    if uses_fw {
        nat.declare(&fw);
        let comment = format!("\"{name} loadbalancer IP\"");
        for r in &ranges {
            nat.rule(
                &fw,
                &["-m", "comment", "--comment", &comment, "-s", r, "-j", &ext],
            );
        }
        // kube-proxy's allowFromNode: a range holding the node IP also
        // admits the load-balancer IPs as sources (a node's request to a
        // VIP-like LB loops back with the VIP as its source).
        let allow_from_node = svc.load_balancer_source_ranges().iter().any(|r| {
            opts.node_ips
                .iter()
                .any(|ip| fam.contains(*ip) && r.contains(*ip))
        });
        if allow_from_node {
            for lb_ip in &lb_ips {
                nat.rule(
                    &fw,
                    &[
                        "-m",
                        "comment",
                        "--comment",
                        &comment,
                        "-s",
                        lb_ip,
                        "-j",
                        &ext,
                    ],
                );
            }
        }
        let comment =
            format!("\"other traffic to {name} will be dropped by {KUBE_PROXY_FIREWALL}\"");
        nat.rule(&fw, &["-m", "comment", "--comment", &comment]);
    }
}

/// The affinity checks and the `-m statistic` cascade from `chain` to the
/// endpoints' `KUBE-SEP-` chains. Returns each endpoint's `KUBE-SEP-`
/// chain with its address, and whether the service has ClientIP affinity.
fn write_endpoint_jumps(
    nat: &mut TableText,
    chain: &str,
    p: &PortPlan<'_>,
    eps: &[&Arc<EndpointInfo>],
    large_cluster: bool,
) -> (Vec<(String, String)>, bool) {
    let name = p.name;
    let protocol = p.port.protocol();
    let affinity = p
        .service
        .session_affinity()
        .timeout()
        .map(|t| t.as_secs().to_string());
    let sep: Vec<(String, String)> = eps
        .iter()
        .map(|e| {
            let addr = e.addr_string();
            (endpoint_chain_name(name, protocol, &addr), addr)
        })
        .collect();
    if let Some(seconds) = &affinity {
        for (sep_chain, addr) in &sep {
            let text = format!("\"{name} -> {addr}\"");
            let mut args: Vec<&str> = Vec::with_capacity(16);
            if !large_cluster {
                args.extend(["-m", "comment", "--comment", &text]);
            }
            args.extend([
                "-m",
                "recent",
                "--name",
                sep_chain,
                "--rcheck",
                "--seconds",
                seconds,
                "--reap",
                "-j",
                sep_chain,
            ]);
            nat.rule(chain, &args);
        }
    }
    let n = sep.len();
    for (i, (sep_chain, addr)) in sep.iter().enumerate() {
        let text = format!("\"{name} -> {addr}\"");
        let prob;
        let mut args: Vec<&str> = Vec::with_capacity(16);
        if !large_cluster {
            args.extend(["-m", "comment", "--comment", &text]);
        }
        if i + 1 < n {
            prob = probability(i, n);
            args.extend([
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &prob,
            ]);
        }
        args.extend(["-j", sep_chain]);
        nat.rule(chain, &args);
    }
    (sep, affinity.is_some())
}

/// The jumps kube-proxy (and kubelet, for `KUBE-FIREWALL`) install into the
/// built-in chains with `iptables -I`, in the order they end up in.
fn write_builtin_jumps(filter: &mut TableText, nat: &mut TableText, kubelet_firewall: bool) {
    const NEW: [&str; 4] = ["-m", "conntrack", "--ctstate", "NEW"];
    // kube-proxy's iptablesJumpChains (then kubelet's), each prepended.
    let mut jumps: Vec<(bool, &str, &str, &str, &[&str])> = vec![
        (
            false,
            KUBE_EXTERNAL_SERVICES,
            "INPUT",
            "\"kubernetes externally-visible service portals\"",
            &NEW,
        ),
        (
            false,
            KUBE_EXTERNAL_SERVICES,
            "FORWARD",
            "\"kubernetes externally-visible service portals\"",
            &NEW,
        ),
        (
            false,
            KUBE_NODEPORTS,
            "INPUT",
            "\"kubernetes health check service ports\"",
            &[],
        ),
        (
            false,
            KUBE_SERVICES,
            "FORWARD",
            "\"kubernetes service portals\"",
            &NEW,
        ),
        (
            false,
            KUBE_SERVICES,
            "OUTPUT",
            "\"kubernetes service portals\"",
            &NEW,
        ),
        (
            false,
            KUBE_FORWARD,
            "FORWARD",
            "\"kubernetes forwarding rules\"",
            &[],
        ),
        (
            false,
            KUBE_PROXY_FIREWALL,
            "INPUT",
            "\"kubernetes load balancer firewall\"",
            &NEW,
        ),
        (
            false,
            KUBE_PROXY_FIREWALL,
            "OUTPUT",
            "\"kubernetes load balancer firewall\"",
            &NEW,
        ),
        (
            false,
            KUBE_PROXY_FIREWALL,
            "FORWARD",
            "\"kubernetes load balancer firewall\"",
            &NEW,
        ),
        (
            true,
            KUBE_SERVICES,
            "OUTPUT",
            "\"kubernetes service portals\"",
            &[],
        ),
        (
            true,
            KUBE_SERVICES,
            "PREROUTING",
            "\"kubernetes service portals\"",
            &[],
        ),
        (
            true,
            KUBE_POSTROUTING,
            "POSTROUTING",
            "\"kubernetes postrouting rules\"",
            &[],
        ),
    ];
    if kubelet_firewall {
        jumps.push((false, KUBE_FIREWALL, "INPUT", "", &[]));
        jumps.push((false, KUBE_FIREWALL, "OUTPUT", "", &[]));
    }
    // Each was inserted at the head of its chain, so the last ends up first.
    for (is_nat, target, builtin, comment, extra) in jumps.into_iter().rev() {
        let mut args: Vec<&str> = extra.to_vec();
        if !comment.is_empty() {
            args.extend(["-m", "comment", "--comment", comment]);
        }
        args.extend(["-j", target]);
        let table = if is_nat { &mut *nat } else { &mut *filter };
        table.rule(builtin, &args);
    }
}

/// kube-proxy's `FullSyncPeriod` (`pkg/proxy/util`): a sync more than this
/// long after the last full one is full again (except in large cluster
/// mode).
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// kube-proxy's default `--iptables-sync-period`: in large cluster mode,
/// stale chains are deleted at most this often.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// kube-proxy's partial syncs (`syncProxyRules` with `tryPartialSync`,
/// Kubernetes 1.27+): keeps what it wrote last and returns each sync's
/// `iptables-restore --noflush` input.
///
/// - The first sync, a sync after [`force_full_sync`](Syncer::force_full_sync)
///   (kube-proxy's `needFullSync`, set after a failed restore) and a sync
///   more than [`FULL_SYNC_PERIOD`] after the last full one (not in large
///   cluster mode) are full: the whole [`render`] output.
/// - Otherwise the sync is partial: the `*filter` table and kube-proxy's
///   fixed `*nat` chains (`KUBE-SERVICES`, `KUBE-NODEPORTS`,
///   `KUBE-POSTROUTING`, `KUBE-MARK-MASQ`) are written whole, as kube-proxy
///   does; a service's own chains (`KUBE-SVC-`, `KUBE-SVL-`, `KUBE-SEP-`)
///   are declared and written only when they changed.
/// - On every sync, chains written before and no longer used are declared
///   (which flushes them) and deleted with `-X`; in large cluster mode
///   (more than [`LARGE_CLUSTER_ENDPOINTS_THRESHOLD`] endpoints) at most
///   once per sync period ([`DEFAULT_SYNC_PERIOD`]), as kube-proxy does to
///   avoid `iptables-save` runs.
///
/// kube-proxy learns which services changed from its change trackers; the
/// syncer compares each service's rendered chains with what it wrote
/// last, so a change that leaves a service's rules as they were (a label,
/// say) writes nothing for it, where kube-proxy would rewrite its chains.
/// The syncer assumes each restore it returned was applied; when one was
/// not, call [`force_full_sync`](Syncer::force_full_sync).
///
/// # Examples
/// ```
/// use svclb::*;
/// use svclb::render::{RenderOptions, iptables::Syncer};
///
/// let mut table = ServiceTable::new();
/// let mut syncer = Syncer::new(RenderOptions::default());
/// let svc = |ns: &str, ip: &str| {
///     Service::builder(ns, "svc")
///         .cluster_ip(ip.parse().unwrap())
///         .port(ServicePortSpec::tcp(80))
///         .build()
/// };
/// let slice = |ns: &str, ip: &str| {
///     EndpointSlice::builder(ns, "svc-1", "svc", AddressType::IPv4)
///         .port(SlicePortSpec::tcp(80))
///         .endpoint(EndpointSpec::new(ip))
///         .build()
/// };
/// table.apply_batch([Change::UpsertService(svc("a", "172.30.0.1")?), Change::UpsertSlice(slice("a", "10.0.0.1")?)])?;
/// let first = syncer.sync(&table, Instant::ZERO);
/// assert!(first.full);
/// table.apply_batch([Change::UpsertService(svc("b", "172.30.0.2")?), Change::UpsertSlice(slice("b", "10.0.0.2")?)])?;
/// let second = syncer.sync(&table, Instant::from_secs(1));
/// assert!(!second.full);
/// assert_eq!(second.services_written, 1);
/// assert!(!second.text.contains("--to-destination 10.0.0.1:80"));
/// assert!(second.text.contains("--to-destination 10.0.0.2:80"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Syncer {
    opts: RenderOptions,
    /// `ns/name` -> fingerprint of the service's nat chains as last written.
    written: ahash::AHashMap<String, u64>,
    /// Service chains in the kernel after the last sync.
    existing: ahash::AHashSet<String>,
    /// ... and before it (what stays after a failed restore).
    existing_before: ahash::AHashSet<String>,
    last_full: Option<Instant>,
    last_cleanup: Option<Instant>,
    need_full: bool,
    full_sync_period: Duration,
    sync_period: Duration,
}

impl Syncer {
    /// A syncer that has written nothing yet: its first sync is full.
    pub fn new(opts: RenderOptions) -> Syncer {
        Syncer {
            opts,
            written: ahash::AHashMap::new(),
            existing: ahash::AHashSet::new(),
            existing_before: ahash::AHashSet::new(),
            last_full: None,
            last_cleanup: None,
            need_full: true,
            full_sync_period: FULL_SYNC_PERIOD,
            sync_period: DEFAULT_SYNC_PERIOD,
        }
    }

    /// Sets the period after which a sync is full again
    /// ([`FULL_SYNC_PERIOD`] by default).
    pub fn full_sync_period(mut self, period: Duration) -> Syncer {
        self.full_sync_period = period;
        self
    }

    /// Sets `--iptables-sync-period` ([`DEFAULT_SYNC_PERIOD`] by default).
    pub fn sync_period(mut self, period: Duration) -> Syncer {
        self.sync_period = period;
        self
    }

    /// Makes the next sync full (kube-proxy's `needFullSync`, as after a
    /// failed restore).
    pub fn force_full_sync(&mut self) {
        self.need_full = true;
    }

    /// Tells the syncer that the last sync's restore failed (kube-proxy:
    /// `iptables-restore` returned an error): the next sync is full, and
    /// deletes the stale chains the failed restore left in place.
    pub fn restore_failed(&mut self) {
        let before = std::mem::take(&mut self.existing_before);
        self.existing.extend(before);
        self.need_full = true;
    }

    /// The rendering options.
    pub fn options(&self) -> &RenderOptions {
        &self.opts
    }

    /// The restore input that brings the rules written so far to `table`'s.
    pub fn sync(&mut self, table: &ServiceTable, now: Instant) -> RulesSync {
        use std::hash::{Hash as _, Hasher as _};
        let mut built = build(table, &self.opts);
        let full = self.need_full
            || self.last_full.is_none_or(|t| {
                now.saturating_duration_since(t) > self.full_sync_period && !built.large_cluster
            });
        let mut prints: Vec<std::hash::DefaultHasher> =
            vec![std::hash::DefaultHasher::new(); built.services.len()];
        let mut active = ahash::AHashSet::new();
        for c in &built.nat.chains {
            if let Some(o) = c.owner {
                let h = &mut prints[o as usize];
                c.name.hash(h);
                c.rules.hash(h);
                active.insert(c.name.clone());
            }
        }
        let prints: Vec<u64> = prints.iter().map(|h| h.finish()).collect();
        let changed: Vec<bool> = built
            .services
            .iter()
            .zip(&prints)
            .map(|(k, p)| full || self.written.get(k) != Some(p))
            .collect();
        let cleanup = !built.large_cluster
            || self
                .last_cleanup
                .is_none_or(|t| now.saturating_duration_since(t) > self.sync_period);
        let mut chains_deleted = 0;
        if cleanup {
            for name in self.existing.difference(&active) {
                built.nat.chains.push(Chain {
                    name: name.clone(),
                    declared: true,
                    rules: Vec::new(),
                    owner: None,
                    delete: true,
                });
                chains_deleted += 1;
            }
        }
        let mut text = String::new();
        built.filter.write(&mut text, "filter", |_| true);
        built.nat.write(&mut text, "nat", |c| {
            c.owner.is_none_or(|o| changed[o as usize])
        });
        let services_written = changed.iter().filter(|c| **c).count();
        self.written = built.services.into_iter().zip(prints).collect();
        self.existing_before = self.existing.clone();
        if cleanup {
            self.existing = active;
            self.last_cleanup = Some(now);
        } else {
            self.existing.extend(active);
        }
        if full {
            self.last_full = Some(now);
        }
        self.need_full = false;
        RulesSync {
            text,
            full,
            services_written,
            chains_deleted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_match_kube_proxy() {
        assert_eq!(
            service_chain_name("ns1/svc1:p80", Protocol::Tcp),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            service_chain_name("ns1/svc1", Protocol::Tcp),
            "KUBE-SVC-AQI2S6QIMU7PVVRP"
        );
        assert_eq!(
            local_chain_name("ns1/svc1", Protocol::Tcp),
            "KUBE-SVL-AQI2S6QIMU7PVVRP"
        );
        assert_eq!(
            service_chain_name("ns5/svc5:p80", Protocol::Tcp),
            "KUBE-SVC-NUKIZ6OKUXPJNT4C"
        );
        for (name, ep, want) in [
            ("ns1/svc1:p80", "10.180.0.1:80", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
            ("ns1/svc1:p80", "10.180.0.2:80", "KUBE-SEP-LXVODXWDISEETFEF"),
            ("ns5/svc5:p80", "10.180.0.3:80", "KUBE-SEP-I77PXRDZVX7PMWMN"),
            ("ns4/svc4:p80", "10.180.0.4:80", "KUBE-SEP-UKSFD7AGPMPPLUHC"),
            ("ns4/svc4:p80", "10.180.0.5:80", "KUBE-SEP-C6EBXVWJJZMIWKLZ"),
            ("ns1/svc1", "10.0.1.1:80", "KUBE-SEP-3JOIVZTXZZRGORX4"),
        ] {
            assert_eq!(endpoint_chain_name(name, Protocol::Tcp, ep), want);
        }
        // Protocol is part of the hash.
        assert_ne!(
            service_chain_name("ns1/svc1:p80", Protocol::Udp),
            service_chain_name("ns1/svc1:p80", Protocol::Tcp)
        );
    }

    #[test]
    fn probabilities_have_ten_decimals() {
        assert_eq!(probability(0, 3), "0.3333333333");
        assert_eq!(probability(1, 3), "0.5000000000");
        assert_eq!(probability(0, 4), "0.2500000000");
        assert_eq!(probability(0, 7), "0.1428571429");
    }

    #[test]
    fn comment_sort_key() {
        assert_eq!(
            comment_service_name(
                "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -j X"
            ),
            "ns1/svc1"
        );
        assert_eq!(
            comment_service_name(
                "-A KUBE-SERVICES -m comment --comment \"ns1/svc1 has no endpoints\""
            ),
            "ns1/svc1"
        );
    }
}
