//! The table as `nft -f` input, written the way kube-proxy's nftables mode
//! (`pkg/proxy/nftables/proxier.go`, Kubernetes 1.33 generation) builds its
//! `kube-proxy` table:
//!
//! - the base ruleset: the `cluster-ips` set, the `service-ips` verdict map
//!   keyed by `daddr . l4proto . dport` (one O(1) lookup finds the service),
//!   the `no-endpoint-services` map, the hooked `nat-*` and `filter-*`
//!   chains, `mark-for-masquerade`, `masquerading`, `reject-chain`;
//! - per service port: a `service-HASH-ns/name/proto/port` chain (`local-…`
//!   for a Local internal traffic policy) that picks an endpoint with
//!   `numgen random mod N vmap { 0 : goto …, 1 : goto … }`, uniform and
//!   without a cascade; with ClientIP affinity, one dynamic
//!   `affinity-…` set per endpoint with the service's timeout, checked first
//!   (`ip saddr @affinity-… goto endpoint-…`) and refreshed by the endpoint
//!   chain (`update @affinity-… { ip saddr }`);
//! - per endpoint: an `endpoint-HASH-ns/name/proto/port__IP/PORT` chain with
//!   the hairpin masquerade and the DNAT;
//! - elements: each cluster IP in `cluster-ips`; `service-ips` entries for
//!   ports with endpoints; `no-endpoint-services` entries (`goto
//!   reject-chain`, or `drop` for a Local policy without local endpoints).
//!
//! Chain names hash `ns/name/proto/port` (and `__IP/PORT`) with sha256 and
//! keep the first 8 base32 characters as a prefix, as kube-proxy does.
//! [`Syncer`] writes kube-proxy's partial syncs: changed services' chains,
//! changed elements, stale chains flushed and later deleted.
//!
//! External destinations: `service-ips` entries for external and
//! load-balancer IPs, `service-nodeports`, `firewall-ips`,
//! `no-endpoint-nodeports` and the `external-`, `firewall-` and `local-`
//! chains, as kube-proxy writes them. Node ports are matched on the
//! `nodeport-ips` set, the [`RenderOptions::node_ips`] inside
//! `--nodeport-addresses` (loopback left out: kube-proxy's nftables mode
//! has no localhost node ports); with `--nodeport-addresses` unset or a
//! prefix of length 0, on `fib daddr type local` minus localhost, the set
//! deleted, as kube-proxy's `MatchAll` case does. External destinations
//! follow the external traffic policy alone: a service with
//! `internalTrafficPolicy: Local` sends its cluster IP to `local-…` and
//! its external destinations to the Cluster-policy `service-…` chain (or,
//! for `externalTrafficPolicy: Local`, to `local-…` with the
//! short-circuits to `service-…`).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use core::time::Duration;

use super::{IpFamily, PortPlan, RenderOptions, RulesSync, hash, port_plans};
use crate::model::flow::Protocol;
use crate::model::service::TrafficPolicy;
use crate::plan::{Outcome, Planner};
use crate::table::{EndpointInfo, ServiceTable};
use crate::time::Instant;
use crate::topology::{Selection, categorize};
use std::sync::Arc;

/// kube-proxy's limit on the part of a chain name after its prefix.
const CHAIN_NAME_BASE_LENGTH_MAX: usize = 256 - 16;

fn hash_and_truncate(name: &str) -> String {
    let mut out = format!("{}-{name}", hash::hash8(name));
    if out.len() > CHAIN_NAME_BASE_LENGTH_MAX {
        let mut cut = CHAIN_NAME_BASE_LENGTH_MAX - 3;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

/// The base of a service port's chain names: `HASH-ns/name/proto/port`.
///
/// # Examples
/// ```
/// use svclb::{Protocol, render::nft::service_chain_base};
/// assert_eq!(service_chain_base("ns1", "svc1", Protocol::Tcp, "p80"), "ULMVA6XW-ns1/svc1/tcp/p80");
/// ```
pub fn service_chain_base(namespace: &str, name: &str, protocol: Protocol, port: &str) -> String {
    hash_and_truncate(&format!(
        "{namespace}/{name}/{}/{port}",
        protocol.as_lower_str()
    ))
}

/// The base of an endpoint's chain and affinity-set names:
/// `HASH-ns/name/proto/port__IP/PORT` (an IPv6 address with `.` for `:`).
///
/// # Examples
/// ```
/// use svclb::{Protocol, render::nft::endpoint_chain_base};
/// let ep = "10.180.0.1:80".parse().unwrap();
/// assert_eq!(
///     endpoint_chain_base("ns1", "svc1", Protocol::Tcp, "p80", ep),
///     "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
/// );
/// ```
pub fn endpoint_chain_base(
    namespace: &str,
    name: &str,
    protocol: Protocol,
    port: &str,
    endpoint: std::net::SocketAddr,
) -> String {
    let ip = endpoint.ip().to_string().replace(':', ".");
    hash_and_truncate(&format!(
        "{namespace}/{name}/{}/{port}__{ip}/{}",
        protocol.as_lower_str(),
        endpoint.port()
    ))
}

/// The base ruleset (kube-proxy's `setupNFTables`), for one family.
/// The table, its sets and maps, base chains and their rules. With
/// `flush`, as a full resync writes it over an existing table: every base
/// chain and kube-proxy's element sets and maps are flushed after they are
/// added (the affinity sets are not touched).
fn write_base(
    out: &mut String,
    opts: &RenderOptions,
    fam: &str,
    ip_x: &str,
    addr_type: &str,
    flush: bool,
) {
    let t = format!("{fam} kube-proxy");
    let mark = &opts.masquerade_mark;
    let _ = writeln!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    out.push('\n');
    let _ = writeln!(
        out,
        "add set {t} cluster-ips {{ type {addr_type} ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        out,
        "add set {t} nodeport-ips {{ type {addr_type} ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    // With `--nodeport-addresses` unset or a prefix of length 0
    // (`MatchAll`), kube-proxy matches node ports with `fib daddr type
    // local` and deletes the set (added first, so the delete cannot fail);
    // otherwise the set holds the node's addresses of this family inside
    // the prefixes, loopback left out ("localhost NodePorts are not
    // supported").
    let match_all = opts.nodeports_match_all();
    if flush {
        let _ = writeln!(out, "flush set {t} cluster-ips");
        if !match_all {
            let _ = writeln!(out, "flush set {t} nodeport-ips");
        }
    }
    if !match_all {
        for ip in opts.nodeport_ips().filter(|ip| !ip.is_loopback()) {
            let _ = writeln!(out, "add element {t} nodeport-ips {{ {ip} }}");
        }
    }
    out.push('\n');
    for (map, key, comment) in [
        (
            "firewall-ips",
            "ADDR . inet_proto . inet_service",
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
        (
            "no-endpoint-nodeports",
            "inet_proto . inet_service",
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        (
            "no-endpoint-services",
            "ADDR . inet_proto . inet_service",
            "vmap to drop or reject packets to services with no endpoints",
        ),
        (
            "service-ips",
            "ADDR . inet_proto . inet_service",
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        (
            "service-nodeports",
            "inet_proto . inet_service",
            "NodePort traffic",
        ),
    ] {
        let key = key.replace("ADDR", addr_type);
        let _ = writeln!(
            out,
            "add map {t} {map} {{ type {key} : verdict ; comment \"{comment}\" ; }}"
        );
        if flush {
            let _ = writeln!(out, "flush map {t} {map}");
        }
    }
    out.push('\n');
    for chain in [
        "cluster-ips-check",
        "filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }",
        "filter-output-pre-dnat { type filter hook output priority -110 ; }",
        "filter-forward { type filter hook forward priority 0 ; }",
        "filter-input { type filter hook input priority 0 ; }",
        "filter-output { type filter hook output priority 0 ; }",
        "firewall-check",
        "mark-for-masquerade",
        "masquerading",
        "nat-output { type nat hook output priority -100 ; }",
        "nat-postrouting { type nat hook postrouting priority 100 ; }",
        "nat-prerouting { type nat hook prerouting priority -100 ; }",
        "nodeport-endpoints-check",
        "reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }",
        "services",
        "service-endpoints-check",
    ] {
        let _ = writeln!(out, "add chain {t} {chain}");
        if flush {
            let name = chain.split(' ').next().unwrap_or(chain);
            let _ = writeln!(out, "flush chain {t} {name}");
        }
    }
    if match_all {
        // After the chains are flushed: no rule refers to the set any more.
        let _ = writeln!(out, "delete set {t} nodeport-ips");
    }
    out.push('\n');
    let no_localhost = if opts.family == IpFamily::V6 {
        "ip6 daddr != ::1"
    } else {
        "ip daddr != 127.0.0.0/8"
    };
    let mut rules = vec![format!(
        "cluster-ips-check {ip_x} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    )];
    if !opts.service_cidrs.is_empty() {
        let cidrs: Vec<String> = opts
            .service_cidrs
            .iter()
            .filter(|c| opts.family.contains(c.addr()))
            .map(ToString::to_string)
            .collect();
        if !cidrs.is_empty() {
            rules.push(format!(
                "cluster-ips-check {ip_x} daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
                cidrs.join(", ")
            ));
        }
    }
    rules.extend(
        [
            "filter-prerouting-pre-dnat ct state new jump firewall-check",
            "filter-forward ct state new jump service-endpoints-check",
            "filter-forward ct state new jump cluster-ips-check",
            "filter-input ct state new jump nodeport-endpoints-check",
            "filter-input ct state new jump service-endpoints-check",
            "filter-output ct state new jump service-endpoints-check",
            "filter-output-pre-dnat ct state new jump firewall-check",
            "filter-output ct state new jump cluster-ips-check",
        ]
        .map(String::from),
    );
    rules.push(format!(
        "firewall-check {ip_x} daddr . meta l4proto . th dport vmap @firewall-ips"
    ));
    rules.push(format!("mark-for-masquerade mark set mark or {mark}"));
    rules.push(format!("masquerading mark and {mark} == 0 return"));
    rules.push(format!("masquerading mark set mark xor {mark}"));
    rules.push("masquerading masquerade fully-random".into());
    rules.push("nat-output jump services".into());
    rules.push("nat-postrouting jump masquerading".into());
    rules.push("nat-prerouting jump services".into());
    rules.push(if match_all {
        format!("nodeport-endpoints-check {no_localhost} meta l4proto . th dport vmap @no-endpoint-nodeports")
    } else {
        format!(
            "nodeport-endpoints-check {ip_x} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
        )
    });
    rules.push("reject-chain reject".into());
    rules.push(format!(
        "services {ip_x} daddr . meta l4proto . th dport vmap @service-ips"
    ));
    rules.push(if match_all {
        format!(
            "services fib daddr type local {no_localhost} meta l4proto . th dport vmap @service-nodeports"
        )
    } else {
        format!("services {ip_x} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports")
    });
    rules.push(format!(
        "service-endpoints-check {ip_x} daddr . meta l4proto . th dport vmap @no-endpoint-services"
    ));
    for r in rules {
        let _ = writeln!(out, "add rule {t} {r}");
    }
}

/// Renders the table as `nft -f` input for the `ip` (or, with
/// [`IpFamily::V6`], `ip6`) `kube-proxy` table. See the module docs.
///
/// # Examples
/// ```
/// use svclb::*;
/// use svclb::render::{self, RenderOptions};
/// let mut table = ServiceTable::new();
/// let svc = Service::builder("ns1", "svc1")
///     .cluster_ip("172.30.0.41".parse().unwrap())
///     .port(ServicePortSpec::tcp(80).name("p80"))
///     .build().unwrap();
/// table.apply(Change::UpsertService(svc)).unwrap();
/// let text = render::nft::render(&table, &RenderOptions::default());
/// assert!(text.contains(
///     "add element ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 comment \"ns1/svc1:p80\" : goto reject-chain }"
/// ));
/// ```
pub fn render(table: &ServiceTable, opts: &RenderOptions) -> String {
    let built = build(table, opts);
    let mut out = String::new();
    write_base(
        &mut out,
        opts,
        built.fam,
        built.ip_x,
        built.addr_type,
        false,
    );
    for p in &built.ports {
        out.push('\n');
        for line in p.decls.iter().chain(&p.rules) {
            out.push_str(line);
            out.push('\n');
        }
        if !p.decls.is_empty() {
            out.push('\n');
        }
        for e in &p.elements {
            e.write_add(&mut out, &built.t);
        }
    }
    out
}

/// One element of a kube-proxy set or map: `add element T MAP { KEY REST }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Element {
    map: &'static str,
    key: String,
    /// What follows the key: a comment and/or ` : VERDICT`.
    rest: String,
}

impl Element {
    fn write_add(&self, out: &mut String, t: &str) {
        let _ = writeln!(
            out,
            "add element {t} {} {{ {}{} }}",
            self.map, self.key, self.rest
        );
    }
}

/// One service port's part of the table.
#[derive(Debug, Default)]
struct PortText {
    /// Index into [`Built::services`].
    owner: u32,
    /// `add chain` / `add set` lines, in the order they are written.
    decls: Vec<String>,
    /// The service and endpoint chains it declares.
    chains: Vec<String>,
    /// The affinity sets it declares.
    sets: Vec<String>,
    /// `add rule` lines.
    rules: Vec<String>,
    elements: Vec<Element>,
}

/// A rendering before it is written out.
#[derive(Debug)]
struct Built {
    fam: &'static str,
    ip_x: &'static str,
    addr_type: &'static str,
    /// `FAMILY kube-proxy`.
    t: String,
    ports: Vec<PortText>,
    /// `ns/name` by owner index.
    services: Vec<String>,
}

fn build(table: &ServiceTable, opts: &RenderOptions) -> Built {
    let plan = Planner::compile(table, &opts.node);
    let (plans, _) = port_plans(table, &plan, opts);
    let (fam, ip_x, addr_type) = match opts.family {
        IpFamily::V4 => ("ip", "ip", "ipv4_addr"),
        IpFamily::V6 => ("ip6", "ip6", "ipv6_addr"),
    };
    let t = format!("{fam} kube-proxy");
    let mut cluster_ips: HashSet<IpAddr> = HashSet::new();
    let mut services: Vec<String> = Vec::new();
    let mut owners: ahash::AHashMap<&crate::model::service::ServiceKey, u32> =
        ahash::AHashMap::new();
    let mut ports = Vec::with_capacity(plans.len());
    for p in &plans {
        let key = p.service.key();
        let owner = *owners.entry(key).or_insert_with(|| {
            services.push(format!("{}/{}", key.namespace, key.name));
            (services.len() - 1) as u32
        });
        let mut text = write_service_port(p, table, opts, &t, ip_x, addr_type, &mut cluster_ips);
        text.owner = owner;
        ports.push(text);
    }
    Built {
        fam,
        ip_x,
        addr_type,
        t,
        ports,
        services,
    }
}

fn write_service_port(
    p: &PortPlan<'_>,
    table: &ServiceTable,
    opts: &RenderOptions,
    t: &str,
    ip_x: &str,
    addr_type: &str,
    cluster_ips: &mut HashSet<IpAddr>,
) -> PortText {
    let mut text = PortText::default();
    let key = p.service.key();
    let protocol = p.port.protocol();
    let proto = p.proto();
    let port_name = p.port.name_or_empty();
    let vip = p.vip;
    let dport = p.port.port();
    let element_key = format!("{vip} . {proto} . {dport}");
    if cluster_ips.insert(vip) {
        text.elements.push(Element {
            map: "cluster-ips",
            key: vip.to_string(),
            rest: String::new(),
        });
    }
    match p.outcome {
        Outcome::Reject | Outcome::Drop => {
            let verdict = if p.outcome == Outcome::Drop {
                "drop"
            } else {
                "goto reject-chain"
            };
            text.elements.push(Element {
                map: "no-endpoint-services",
                key: element_key,
                rest: format!(" comment \"{}\" : {verdict}", p.name),
            });
        }
        _ => {
            let eps = &p.endpoints;
            let base = service_chain_base(&key.namespace, &key.name, protocol, port_name);
            let chain = if p.local_policy() {
                format!("local-{base}")
            } else {
                format!("service-{base}")
            };
            let eps: Vec<(String, String, &crate::table::EndpointInfo)> = eps
                .iter()
                .map(|e| {
                    let b = endpoint_chain_base(
                        &key.namespace,
                        &key.name,
                        protocol,
                        port_name,
                        e.addr(),
                    );
                    (format!("endpoint-{b}"), format!("affinity-{b}"), &***e)
                })
                .collect();
            // Declared before anything refers to them: `nft -f` resolves
            // a `goto` when it reads the rule (kube-proxy's transaction also
            // adds the endpoint chains first).
            let mut sorted: Vec<&(String, String, &crate::table::EndpointInfo)> =
                eps.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            for (ep_chain, ..) in &sorted {
                text.decls.push(format!("add chain {t} {ep_chain}"));
                text.chains.push(ep_chain.clone());
            }
            let affinity = p.service.session_affinity().timeout().map(|d| d.as_secs());
            if let Some(secs) = affinity {
                let mut sets: Vec<&String> = eps.iter().map(|(_, s, _)| s).collect();
                sets.sort();
                for set in sets {
                    text.decls.push(format!(
                        "add set {t} {set} {{ type {addr_type} ; flags dynamic,timeout ; timeout {secs}s ; }}"
                    ));
                    text.sets.push(set.clone());
                }
            }
            text.decls.push(format!("add chain {t} {chain}"));
            text.chains.push(chain.clone());
            let rules = &mut text.rules;
            if opts.masquerade_all {
                rules.push(format!(
                    "add rule {t} {chain} {ip_x} daddr {vip} jump mark-for-masquerade"
                ));
            } else if let Some(cidr) = opts.family_cluster_cidr() {
                rules.push(format!(
                    "add rule {t} {chain} {ip_x} daddr {vip} {ip_x} saddr != {cidr} jump mark-for-masquerade"
                ));
            }
            if affinity.is_some() {
                for (ep_chain, set, _) in &eps {
                    rules.push(format!(
                        "add rule {t} {chain} {ip_x} saddr @{set} goto {ep_chain}"
                    ));
                }
            }
            let vmap: Vec<String> = eps
                .iter()
                .enumerate()
                .map(|(i, (ep_chain, ..))| format!("{i} : goto {ep_chain}"))
                .collect();
            rules.push(format!(
                "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
                eps.len(),
                vmap.join(" , ")
            ));
            for (ep_chain, set, ep) in sorted {
                rules.push(format!(
                    "add rule {t} {ep_chain} {ip_x} saddr {} jump mark-for-masquerade",
                    ep.addr().ip()
                ));
                if affinity.is_some() {
                    rules.push(format!(
                        "add rule {t} {ep_chain} update @{set} {{ {ip_x} saddr }}"
                    ));
                }
                rules.push(format!(
                    "add rule {t} {ep_chain} meta l4proto {proto} dnat to {}",
                    ep.addr_string()
                ));
            }
            text.elements.push(Element {
                map: "service-ips",
                key: element_key,
                rest: format!(" : goto {chain}"),
            });
        }
    }
    write_external(&mut text, p, table, opts, t, ip_x);
    text
}

/// The Cluster-policy `service-` chain of a service with
/// `internalTrafficPolicy: Local` (its cluster IP goes to `local-`), for
/// its external destinations: the affinity checks and the `numgen` vmap
/// over `cluster`, and the `endpoint-` chains (and affinity sets) of the
/// endpoints the cluster IP has not written.
fn write_cluster_chain(
    text: &mut PortText,
    p: &PortPlan<'_>,
    cluster: &[Arc<EndpointInfo>],
    t: &str,
    ip_x: &str,
    opts: &RenderOptions,
) {
    if cluster.is_empty() {
        return;
    }
    let key = p.service.key();
    let protocol = p.port.protocol();
    let proto = p.proto();
    let port_name = p.port.name_or_empty();
    let addr_type = if opts.family == IpFamily::V6 {
        "ipv6_addr"
    } else {
        "ipv4_addr"
    };
    let base = service_chain_base(&key.namespace, &key.name, protocol, port_name);
    let chain = format!("service-{base}");
    let affinity = p.service.session_affinity().timeout().map(|d| d.as_secs());
    let eps: Vec<(String, String, &EndpointInfo)> = cluster
        .iter()
        .map(|e| {
            let b = endpoint_chain_base(&key.namespace, &key.name, protocol, port_name, e.addr());
            (format!("endpoint-{b}"), format!("affinity-{b}"), &**e)
        })
        .collect();
    let written = |e: &EndpointInfo| {
        p.outcome == Outcome::Forward && p.endpoints.iter().any(|w| w.addr() == e.addr())
    };
    let mut new: Vec<&(String, String, &EndpointInfo)> =
        eps.iter().filter(|(_, _, e)| !written(e)).collect();
    new.sort_by(|a, b| a.0.cmp(&b.0));
    declare_endpoint_chains(text, &new, t, addr_type, affinity);
    text.decls.push(format!("add chain {t} {chain}"));
    text.chains.push(chain.clone());
    if affinity.is_some() {
        for (ep_chain, set, _) in &eps {
            text.rules.push(format!(
                "add rule {t} {chain} {ip_x} saddr @{set} goto {ep_chain}"
            ));
        }
    }
    let vmap: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(i, (ep_chain, ..))| format!("{i} : goto {ep_chain}"))
        .collect();
    text.rules.push(format!(
        "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
        eps.len(),
        vmap.join(" , ")
    ));
    write_endpoint_rules(text, &new, t, ip_x, proto, affinity.is_some());
}

/// Declares the `endpoint-` chains (and affinity sets) of `new`
/// (chain, affinity set, endpoint).
fn declare_endpoint_chains(
    text: &mut PortText,
    new: &[&(String, String, &EndpointInfo)],
    t: &str,
    addr_type: &str,
    affinity: Option<u64>,
) {
    for (ep_chain, ..) in new {
        text.decls.push(format!("add chain {t} {ep_chain}"));
        text.chains.push(ep_chain.clone());
    }
    if let Some(secs) = affinity {
        let mut sets: Vec<&String> = new.iter().map(|(_, s, _)| s).collect();
        sets.sort();
        for set in sets {
            text.decls.push(format!(
                "add set {t} {set} {{ type {addr_type} ; flags dynamic,timeout ; timeout {secs}s ; }}"
            ));
            text.sets.push(set.clone());
        }
    }
}

/// The rules of the `endpoint-` chains of `new`: mark hairpin traffic,
/// refresh the affinity set, DNAT.
fn write_endpoint_rules(
    text: &mut PortText,
    new: &[&(String, String, &EndpointInfo)],
    t: &str,
    ip_x: &str,
    proto: &str,
    affinity: bool,
) {
    for (ep_chain, set, ep) in new {
        text.rules.push(format!(
            "add rule {t} {ep_chain} {ip_x} saddr {} jump mark-for-masquerade",
            ep.addr().ip()
        ));
        if affinity {
            text.rules.push(format!(
                "add rule {t} {ep_chain} update @{set} {{ {ip_x} saddr }}"
            ));
        }
        text.rules.push(format!(
            "add rule {t} {ep_chain} meta l4proto {proto} dnat to {}",
            ep.addr_string()
        ));
    }
}

/// A service port's external destinations (node port, external IPs,
/// load-balancer IPs), as kube-proxy's nftables proxier writes them: the
/// `service-ips`, `service-nodeports`, `firewall-ips`,
/// `no-endpoint-services` and `no-endpoint-nodeports` elements and the
/// `external-`, `firewall-` and (for `externalTrafficPolicy: Local`)
/// `local-` chains. External traffic follows the external policy alone: a
/// service with `internalTrafficPolicy: Local` gets here the Cluster-policy
/// `service-` chain its cluster IP does not use, with its endpoints'
/// chains (kube-proxy's `UsesClusterEndpoints`). The `nodeport-ips`
/// elements are the base ruleset's ([`RenderOptions::node_ips`]).
fn write_external(
    text: &mut PortText,
    p: &PortPlan<'_>,
    table: &ServiceTable,
    opts: &RenderOptions,
    t: &str,
    ip_x: &str,
) {
    let svc = p.service;
    if !svc.externally_accessible() {
        return;
    }
    let itp_local = p.local_policy();
    let key = svc.key();
    let fam = opts.family;
    let protocol = p.port.protocol();
    let proto = p.proto();
    let port_name = p.port.name_or_empty();
    let dport = p.port.port();
    let has_endpoints = p.outcome != Outcome::Reject;
    let etp_local = svc.external_traffic_policy() == TrafficPolicy::Local;
    let selected = |policy: TrafficPolicy| -> Vec<Arc<EndpointInfo>> {
        table
            .view(key)
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
    let base = service_chain_base(&key.namespace, &key.name, protocol, port_name);
    let ext = format!("external-{base}");
    let fw = format!("firewall-{base}");
    let cluster_chain = format!("service-{base}");
    let ext_ips: Vec<IpAddr> = svc
        .external_ips()
        .iter()
        .copied()
        .filter(|ip| fam.contains(*ip))
        .collect();
    let lb_ips: Vec<IpAddr> = svc
        .load_balancer_vips()
        .filter(|ip| fam.contains(*ip))
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
    let verdict = if has_endpoints {
        "drop"
    } else {
        "goto reject-chain"
    };
    let name = p.name;
    let mut elements = Vec::new();
    for ip in &ext_ips {
        if has_endpoints {
            elements.push((
                "service-ips",
                format!("{ip} . {proto} . {dport}"),
                format!(" : goto {ext}"),
            ));
        }
        if !has_external {
            elements.push((
                "no-endpoint-services",
                format!("{ip} . {proto} . {dport}"),
                format!(" comment \"{name}\" : {verdict}"),
            ));
        }
    }
    for ip in &lb_ips {
        if has_endpoints {
            elements.push((
                "service-ips",
                format!("{ip} . {proto} . {dport}"),
                format!(" : goto {ext}"),
            ));
        }
        if uses_fw {
            elements.push((
                "firewall-ips",
                format!("{ip} . {proto} . {dport}"),
                format!(" : goto {fw}"),
            ));
        }
    }
    if !has_external {
        for ip in &lb_ips {
            elements.push((
                "no-endpoint-services",
                format!("{ip} . {proto} . {dport}"),
                format!(" comment \"{name}\" : {verdict}"),
            ));
        }
    }
    if let Some(np) = p.port.node_port() {
        if has_endpoints {
            elements.push((
                "service-nodeports",
                format!("{proto} . {np}"),
                format!(" : goto {ext}"),
            ));
        }
        if !has_external {
            elements.push((
                "no-endpoint-nodeports",
                format!("{proto} . {np}"),
                format!(" comment \"{name}\" : {verdict}"),
            ));
        }
    }
    if has_endpoints && itp_local {
        write_cluster_chain(text, p, &selected(TrafficPolicy::Cluster), t, ip_x, opts);
    }
    // With `internalTrafficPolicy: Local` and a local endpoint, the cluster
    // IP has written the `local-` chain already.
    let local_written = itp_local && p.outcome == Outcome::Forward;
    if has_endpoints {
        if etp_local && !local.is_empty() && !local_written {
            // The Local-policy chain. Its endpoint chains are mostly the
            // cluster chain's, declared already; a local endpoint outside
            // that set (serving and terminating while the ready ones are
            // elsewhere) gets its own here, as kube-proxy writes one per
            // `allLocallyReachableEndpoints` (TestEndpointSliceWithTerminatingEndpoints).
            let local_chain = format!("local-{base}");
            let affinity_secs = svc.session_affinity().timeout().map(|d| d.as_secs());
            let affinity = affinity_secs.is_some();
            let eps: Vec<(String, String, &EndpointInfo)> = local
                .iter()
                .map(|e| {
                    let b = endpoint_chain_base(
                        &key.namespace,
                        &key.name,
                        protocol,
                        port_name,
                        e.addr(),
                    );
                    (format!("endpoint-{b}"), format!("affinity-{b}"), &**e)
                })
                .collect();
            let cluster_written = if itp_local {
                selected(TrafficPolicy::Cluster)
            } else {
                Vec::new()
            };
            let written = |e: &EndpointInfo| {
                (p.outcome == Outcome::Forward && p.endpoints.iter().any(|w| w.addr() == e.addr()))
                    || cluster_written.iter().any(|w| w.addr() == e.addr())
            };
            let mut new: Vec<&(String, String, &EndpointInfo)> =
                eps.iter().filter(|(_, _, e)| !written(e)).collect();
            new.sort_by(|a, b| a.0.cmp(&b.0));
            let addr_type = if fam == IpFamily::V6 {
                "ipv6_addr"
            } else {
                "ipv4_addr"
            };
            declare_endpoint_chains(text, &new, t, addr_type, affinity_secs);
            write_endpoint_rules(text, &new, t, ip_x, proto, affinity);
            text.decls.push(format!("add chain {t} {local_chain}"));
            text.chains.push(local_chain.clone());
            if affinity {
                for (ep_chain, set, _) in &eps {
                    text.rules.push(format!(
                        "add rule {t} {local_chain} {ip_x} saddr @{set} goto {ep_chain}"
                    ));
                }
            }
            let vmap: Vec<String> = eps
                .iter()
                .enumerate()
                .map(|(i, (ep_chain, ..))| format!("{i} : goto {ep_chain}"))
                .collect();
            text.rules.push(format!(
                "add rule {t} {local_chain} numgen random mod {} vmap {{ {} }}",
                eps.len(),
                vmap.join(" , ")
            ));
        }
        text.decls.push(format!("add chain {t} {ext}"));
        text.chains.push(ext.clone());
        if etp_local {
            if let Some(cidr) = opts.family_cluster_cidr() {
                text.rules.push(format!(
                    "add rule {t} {ext} {ip_x} saddr {cidr} goto {cluster_chain} comment \"short-circuit pod traffic\""
                ));
            }
            text.rules.push(format!(
                "add rule {t} {ext} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
            ));
            text.rules.push(format!(
                "add rule {t} {ext} fib saddr type local goto {cluster_chain} comment \"short-circuit local traffic\""
            ));
            if has_external {
                text.rules
                    .push(format!("add rule {t} {ext} goto local-{base}"));
            }
        } else {
            text.rules
                .push(format!("add rule {t} {ext} jump mark-for-masquerade"));
            text.rules
                .push(format!("add rule {t} {ext} goto {cluster_chain}"));
        }
    }
    // The firewall chain is there with or without endpoints, as
    // `firewall-ips` points at it either way.
    if uses_fw {
        text.decls.push(format!("add chain {t} {fw}"));
        text.chains.push(fw.clone());
        // kube-proxy's allowFromNode: a range holding the node IP also
        // admits the load-balancer IPs as sources.
        let allow_from_node = svc.load_balancer_source_ranges().iter().any(|r| {
            opts.node_ips
                .iter()
                .any(|ip| fam.contains(*ip) && r.contains(*ip))
        });
        let mut sources = ranges.clone();
        if allow_from_node {
            sources.extend(lb_ips.iter().map(ToString::to_string));
        }
        text.rules.push(format!(
            "add rule {t} {fw} {ip_x} saddr != {{ {} }} drop",
            sources.join(" , ")
        ));
    }
    text.elements.extend(
        elements
            .into_iter()
            .map(|(map, key, rest)| Element { map, key, rest }),
    );
}

/// How long a stale chain stays flushed before kube-proxy deletes it (a
/// map element that pointed at it may be released late on kernels before
/// 6.2).
pub const STALE_CHAIN_DELAY: Duration = Duration::from_secs(1);

/// kube-proxy's nftables partial syncs (`pkg/proxy/nftables/proxier.go`,
/// Kubernetes 1.31+): keeps what it wrote last and returns each sync's
/// `nft -f` transaction.
///
/// - The first sync is the whole [`render`] output. A forced sync
///   ([`force_full_sync`](Syncer::force_full_sync), kube-proxy's
///   `needFullSync`) and a sync more than
///   [`FULL_SYNC_PERIOD`](super::iptables::FULL_SYNC_PERIOD) after the last
///   full one rewrite everything over the existing table: base chains and
///   kube-proxy's element sets and maps flushed and refilled, every
///   service chain flushed and rewritten (affinity sets keep their
///   entries).
/// - A partial sync writes a changed service's chains (`add chain`,
///   `flush chain`, its rules, its affinity sets) and only the elements of
///   `cluster-ips`, `service-ips` and `no-endpoint-services` that are new
///   or changed (`delete element` + `add element`) or gone
///   (`delete element`), as kube-proxy's `nftElementStorage` does.
/// - Chains no longer used are flushed, and deleted (`delete chain`) at the
///   start of the first sync more than [`STALE_CHAIN_DELAY`] later; stale
///   affinity sets are deleted at once. As in kube-proxy, a sync that finds
///   a stale chain still there flushes it again and restarts its delay, so
///   syncs less than a second apart keep deleting nothing (kube-proxy's
///   `--min-sync-period` of 1 s keeps that from mattering).
///
/// As [`iptables::Syncer`](super::iptables::Syncer), a service counts as
/// changed when its rendered chains differ from what was last written.
///
/// # Examples
/// ```
/// use svclb::*;
/// use svclb::render::{RenderOptions, nft::Syncer};
///
/// let mut table = ServiceTable::new();
/// let mut syncer = Syncer::new(RenderOptions::default());
/// let svc = Service::builder("a", "svc")
///     .cluster_ip("172.30.0.1".parse().unwrap())
///     .port(ServicePortSpec::tcp(80))
///     .build()?;
/// table.apply(Change::UpsertService(svc))?;
/// assert!(syncer.sync(&table, Instant::ZERO).full);
/// table.apply(Change::DeleteService(ServiceKey::new("a", "svc")))?;
/// let sync = syncer.sync(&table, Instant::from_secs(1));
/// assert_eq!(
///     sync.text,
///     "delete element ip kube-proxy cluster-ips { 172.30.0.1 }\n\
///      delete element ip kube-proxy no-endpoint-services { 172.30.0.1 . tcp . 80 }\n"
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Syncer {
    opts: RenderOptions,
    /// `ns/name` -> fingerprint of the service's chains as last written.
    written: ahash::AHashMap<String, u64>,
    /// (set or map, key) -> what follows the key, as in the kernel.
    elements: ahash::AHashMap<(&'static str, String), String>,
    /// Service and endpoint chains in the kernel.
    chains: ahash::AHashSet<String>,
    /// Affinity sets in the kernel.
    sets: ahash::AHashSet<String>,
    /// Chains flushed as stale, and when.
    stale: ahash::AHashMap<String, Instant>,
    last_full: Option<Instant>,
    need_full: bool,
    full_sync_period: Duration,
}

impl Syncer {
    /// A syncer that has written nothing yet: its first sync is full.
    pub fn new(opts: RenderOptions) -> Syncer {
        Syncer {
            opts,
            written: ahash::AHashMap::new(),
            elements: ahash::AHashMap::new(),
            chains: ahash::AHashSet::new(),
            sets: ahash::AHashSet::new(),
            stale: ahash::AHashMap::new(),
            last_full: None,
            need_full: true,
            full_sync_period: super::iptables::FULL_SYNC_PERIOD,
        }
    }

    /// Sets the period after which a sync is full again.
    pub fn full_sync_period(mut self, period: Duration) -> Syncer {
        self.full_sync_period = period;
        self
    }

    /// Makes the next sync full (kube-proxy's `needFullSync`, as after a
    /// failed transaction).
    pub fn force_full_sync(&mut self) {
        self.need_full = true;
    }

    /// The rendering options.
    pub fn options(&self) -> &RenderOptions {
        &self.opts
    }

    /// The transaction that brings the table written so far to `table`'s.
    pub fn sync(&mut self, table: &ServiceTable, now: Instant) -> RulesSync {
        use std::hash::{Hash as _, Hasher as _};
        let built = build(table, &self.opts);
        let t = &built.t;
        let first = self.last_full.is_none();
        let full = self.need_full
            || self
                .last_full
                .is_none_or(|l| now.saturating_duration_since(l) > self.full_sync_period);
        let mut out = String::new();
        let mut chains_deleted = 0;

        // kube-proxy deletes sufficiently stale chains first.
        let mut gone: Vec<String> = self
            .stale
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) > STALE_CHAIN_DELAY)
            .map(|(c, _)| c.clone())
            .collect();
        gone.sort();
        for chain in gone {
            let _ = writeln!(out, "delete chain {t} {chain}");
            self.stale.remove(&chain);
            self.chains.remove(&chain);
            chains_deleted += 1;
        }

        let mut prints: Vec<std::hash::DefaultHasher> =
            vec![std::hash::DefaultHasher::new(); built.services.len()];
        let mut active_chains = ahash::AHashSet::new();
        let mut active_sets = ahash::AHashSet::new();
        for p in &built.ports {
            let h = &mut prints[p.owner as usize];
            p.decls.hash(h);
            p.rules.hash(h);
            active_chains.extend(p.chains.iter().cloned());
            active_sets.extend(p.sets.iter().cloned());
        }
        let prints: Vec<u64> = prints.iter().map(|h| h.finish()).collect();
        let changed: Vec<bool> = built
            .services
            .iter()
            .zip(&prints)
            .map(|(k, p)| full || self.written.get(k) != Some(p))
            .collect();

        if first {
            // Into an empty table: exactly the full rendering.
            write_base(
                &mut out,
                &self.opts,
                built.fam,
                built.ip_x,
                built.addr_type,
                false,
            );
        } else if full {
            write_base(
                &mut out,
                &self.opts,
                built.fam,
                built.ip_x,
                built.addr_type,
                true,
            );
            self.elements.clear();
        }
        let mut current: ahash::AHashSet<(&'static str, &str)> = ahash::AHashSet::new();
        for p in &built.ports {
            let write_chains = changed[p.owner as usize];
            if first {
                out.push('\n');
            }
            if write_chains {
                for line in &p.decls {
                    out.push_str(line);
                    out.push('\n');
                    if !first {
                        if let Some(chain) = line.strip_prefix("add chain ") {
                            let _ = writeln!(out, "flush chain {chain}");
                        }
                    }
                }
                for line in &p.rules {
                    out.push_str(line);
                    out.push('\n');
                }
                if first && !p.decls.is_empty() {
                    out.push('\n');
                }
            }
            for e in &p.elements {
                current.insert((e.map, e.key.as_str()));
                match self.elements.get(&(e.map, e.key.clone())) {
                    Some(rest) if *rest == e.rest => {}
                    Some(_) => {
                        let _ = writeln!(out, "delete element {t} {} {{ {} }}", e.map, e.key);
                        e.write_add(&mut out, t);
                    }
                    None => e.write_add(&mut out, t),
                }
            }
        }
        // Chains no longer used are flushed now and deleted later.
        let mut stale: Vec<&String> = self.chains.difference(&active_chains).collect();
        stale.sort();
        for chain in stale {
            let _ = writeln!(out, "flush chain {t} {chain}");
            self.stale.insert(chain.clone(), now);
        }
        for chain in &active_chains {
            self.stale.remove(chain);
        }
        let mut stale_sets: Vec<&String> = self.sets.difference(&active_sets).collect();
        stale_sets.sort();
        for set in stale_sets {
            let _ = writeln!(out, "delete set {t} {set}");
        }
        // Elements left over.
        let mut leftover: Vec<&(&'static str, String)> = self
            .elements
            .keys()
            .filter(|(m, k)| !current.contains(&(*m, k.as_str())))
            .collect();
        leftover.sort();
        for (map, key) in leftover {
            let _ = writeln!(out, "delete element {t} {map} {{ {key} }}");
        }

        self.elements = built
            .ports
            .iter()
            .flat_map(|p| &p.elements)
            .map(|e| ((e.map, e.key.clone()), e.rest.clone()))
            .collect();
        self.chains.extend(active_chains);
        self.sets = active_sets;
        let services_written = changed.iter().filter(|c| **c).count();
        self.written = built.services.into_iter().zip(prints).collect();
        if full {
            self.last_full = Some(now);
        }
        self.need_full = false;
        RulesSync {
            text: out,
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
    fn chain_bases_match_kube_proxy() {
        assert_eq!(
            service_chain_base("ns1", "svc1", Protocol::Tcp, "p80"),
            "ULMVA6XW-ns1/svc1/tcp/p80"
        );
        for (ns, svc, ep, want) in [
            (
                "ns5",
                "svc5",
                "10.180.0.3:80",
                "GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80",
            ),
            (
                "ns4",
                "svc4",
                "10.180.0.4:80",
                "UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80",
            ),
        ] {
            assert_eq!(
                endpoint_chain_base(ns, svc, Protocol::Tcp, "p80", ep.parse().unwrap()),
                want
            );
        }
        // IPv6 addresses use '.' for ':' and the port after '/'.
        let b = endpoint_chain_base("a", "b", Protocol::Udp, "", "[fd00::1]:53".parse().unwrap());
        assert!(b.ends_with("-a/b/udp/__fd00..1/53"), "{b}");
    }

    #[test]
    fn long_names_are_truncated_like_kube_proxy() {
        let long = "x".repeat(300);
        let b = hash_and_truncate(&long);
        assert_eq!(b.len(), CHAIN_NAME_BASE_LENGTH_MAX);
        assert!(b.ends_with("..."));
    }
}
