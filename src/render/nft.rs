//! The table as `nft -f` input, written the way kube-proxy's nftables mode
//! (`pkg/proxy/nftables/proxier.go`, Kubernetes 1.33 generation) builds its
//! `kube-proxy` table for ClusterIP services:
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
//! Not rendered: NodePort, LoadBalancer, external-IP and firewall entries.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::{IpFamily, PortPlan, RenderOptions, hash, port_plans};
use crate::model::flow::Protocol;
use crate::plan::{Outcome, Planner};
use crate::table::ServiceTable;

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
fn write_base(out: &mut String, opts: &RenderOptions, fam: &str, ip_x: &str, addr_type: &str) {
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
    }
    out.push('\n');
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
    rules.push(format!(
        "nodeport-endpoints-check {ip_x} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
    ));
    rules.push("reject-chain reject".into());
    rules.push(format!(
        "services {ip_x} daddr . meta l4proto . th dport vmap @service-ips"
    ));
    rules.push(format!(
        "services {ip_x} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    ));
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
    let plan = Planner::compile(table, &opts.node);
    let (plans, _) = port_plans(table, &plan, opts);
    let (fam, ip_x, addr_type) = match opts.family {
        IpFamily::V4 => ("ip", "ip", "ipv4_addr"),
        IpFamily::V6 => ("ip6", "ip6", "ipv6_addr"),
    };
    let mut out = String::new();
    write_base(&mut out, opts, fam, ip_x, addr_type);
    let t = format!("{fam} kube-proxy");
    let mut cluster_ips: HashSet<IpAddr> = HashSet::new();
    for p in &plans {
        out.push('\n');
        write_service_port(&mut out, p, opts, &t, ip_x, addr_type, &mut cluster_ips);
    }
    out
}

fn write_service_port(
    out: &mut String,
    p: &PortPlan<'_>,
    opts: &RenderOptions,
    t: &str,
    ip_x: &str,
    addr_type: &str,
    cluster_ips: &mut HashSet<IpAddr>,
) {
    let key = p.service.key();
    let protocol = p.port.protocol();
    let proto = p.proto();
    let port_name = p.port.name_or_empty();
    let vip = p.vip;
    let dport = p.port.port();
    let element_key = format!("{vip} . {proto} . {dport}");
    let mut elements = Vec::new();
    if cluster_ips.insert(vip) {
        elements.push(format!("add element {t} cluster-ips {{ {vip} }}"));
    }
    match p.outcome {
        Outcome::Reject | Outcome::Drop => {
            let verdict = if p.outcome == Outcome::Drop {
                "drop"
            } else {
                "goto reject-chain"
            };
            elements.push(format!(
                "add element {t} no-endpoint-services {{ {element_key} comment \"{}\" : {verdict} }}",
                p.name
            ));
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
                let _ = writeln!(out, "add chain {t} {ep_chain}");
            }
            let affinity = p.service.session_affinity().timeout().map(|d| d.as_secs());
            if let Some(secs) = affinity {
                let mut sets: Vec<&String> = eps.iter().map(|(_, s, _)| s).collect();
                sets.sort();
                for set in sets {
                    let _ = writeln!(
                        out,
                        "add set {t} {set} {{ type {addr_type} ; flags dynamic,timeout ; timeout {secs}s ; }}"
                    );
                }
            }
            let _ = writeln!(out, "add chain {t} {chain}");
            if opts.masquerade_all {
                let _ = writeln!(
                    out,
                    "add rule {t} {chain} {ip_x} daddr {vip} jump mark-for-masquerade"
                );
            } else if let Some(cidr) = opts.family_cluster_cidr() {
                let _ = writeln!(
                    out,
                    "add rule {t} {chain} {ip_x} daddr {vip} {ip_x} saddr != {cidr} jump mark-for-masquerade"
                );
            }
            if affinity.is_some() {
                for (ep_chain, set, _) in &eps {
                    let _ = writeln!(
                        out,
                        "add rule {t} {chain} {ip_x} saddr @{set} goto {ep_chain}"
                    );
                }
            }
            let vmap: Vec<String> = eps
                .iter()
                .enumerate()
                .map(|(i, (ep_chain, ..))| format!("{i} : goto {ep_chain}"))
                .collect();
            let _ = writeln!(
                out,
                "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
                eps.len(),
                vmap.join(" , ")
            );
            for (ep_chain, set, ep) in sorted {
                let _ = writeln!(
                    out,
                    "add rule {t} {ep_chain} {ip_x} saddr {} jump mark-for-masquerade",
                    ep.addr().ip()
                );
                if affinity.is_some() {
                    let _ = writeln!(
                        out,
                        "add rule {t} {ep_chain} update @{set} {{ {ip_x} saddr }}"
                    );
                }
                let _ = writeln!(
                    out,
                    "add rule {t} {ep_chain} meta l4proto {proto} dnat to {}",
                    ep.addr_string()
                );
            }
            out.push('\n');
            elements.push(format!(
                "add element {t} service-ips {{ {element_key} : goto {chain} }}"
            ));
        }
    }
    for e in elements {
        out.push_str(&e);
        out.push('\n');
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
