//! kube-proxy's IPVS mode beside its virtual servers: the ipsets its
//! iptables rules match and the addresses it binds to the dummy interface
//! `kube-ipvs0`, from the same plan as the IPVS dataplane.
//!
//! [`render`] writes the sets as `ipset restore` input: for each set of
//! kube-proxy's `ipsetInfo` (kubernetes `pkg/proxy/ipvs/proxier.go`), in
//! that order, the `create` line kube-proxy's `CreateSet` runs
//! (`pkg/proxy/ipvs/ipset/ipset.go`: `family`, `hashsize 1024` and `maxelem
//! 65536` for the hash types, `range 0-65535` for `bitmap:port`), then one
//! `add` line per entry, sorted as strings (kube-proxy adds the difference
//! of two string sets with `List()`, which sorts). kube-proxy runs each as
//! `ipset create|add ... -exist`; `ipset -exist restore` takes the whole
//! text at once.
//!
//! | set | type | entries (from `syncProxyRules`) |
//! | --- | --- | --- |
//! | `KUBE-LOOP-BACK` | `hash:ip,port,ip` | `EP,proto:port,EP` per local endpoint (hairpin masquerade) |
//! | `KUBE-CLUSTER-IP` | `hash:ip,port` | `clusterIP,proto:port` |
//! | `KUBE-EXTERNAL-IP` | `hash:ip,port` | external IPs of Cluster-policy services |
//! | `KUBE-EXTERNAL-IP-LOCAL` | `hash:ip,port` | external IPs of Local-policy services |
//! | `KUBE-LOAD-BALANCER` | `hash:ip,port` | load-balancer IPs (`ipMode: VIP`) |
//! | `KUBE-LOAD-BALANCER-FW` | `hash:ip,port` | those with `loadBalancerSourceRanges` |
//! | `KUBE-LOAD-BALANCER-LOCAL` | `hash:ip,port` | those of Local-policy services |
//! | `KUBE-LOAD-BALANCER-SOURCE-IP` | `hash:ip,port,ip` | `LB,proto:port,LB` when a range holds the node IP |
//! | `KUBE-LOAD-BALANCER-SOURCE-CIDR` | `hash:ip,port,net` | `LB,proto:port,CIDR` per source range |
//! | `KUBE-NODE-PORT-TCP`, `-UDP` | `bitmap:port` | node ports (when the node has node-port IPs) |
//! | `KUBE-NODE-PORT-LOCAL-TCP`, `-UDP` | `bitmap:port` | those of Local-policy services |
//! | `KUBE-NODE-PORT-SCTP-HASH` | `hash:ip,port` | `nodeIP,sctp:nodePort` per node-port IP |
//! | `KUBE-NODE-PORT-LOCAL-SCTP-HASH` | `hash:ip,port` | those of Local-policy services |
//! | `KUBE-HEALTH-CHECK-NODE-PORT` | `bitmap:port` | `healthCheckNodePort`s |
//! | `KUBE-IPVS-IPS` | `hash:ip` | the addresses bound to `kube-ipvs0` |
//!
//! The IPv6 proxier's sets are named `KUBE-6-...` (cut at 31 characters,
//! as `NewIPSet` does) with `family inet6`. One family is rendered at a
//! time ([`RenderOptions::family`]).
//!
//! [`kube_ipvs0_addresses`] lists what kube-proxy binds to `kube-ipvs0`
//! (`activeBindAddrs`): every cluster IP, and every external and
//! load-balancer IP that is not one of the node's own addresses;
//! [`render_kube_ipvs0`] writes them as `ip -batch` input (`address add
//! IP/32 dev kube-ipvs0`, `/128` for IPv6, the host prefix
//! `EnsureAddressBind` uses).
//!
//! [`render_iptables`] writes the iptables rules the IPVS mode keeps
//! around those sets (`writeIptablesRules`), as `iptables-restore` input.
//!
//! The node's addresses come from [`RenderOptions::node_ips`] and
//! [`RenderOptions::nodeport_addresses`], with the IPVS mode's filter
//! (loopback left out, and IPv6 link-local when node ports answer on every
//! node IP). kube-proxy's `proxier.nodeIP` (the `allowFromNode` check) is
//! the first node IP of the family.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::{IpFamily, RenderOptions};
use crate::model::flow::Protocol;
use crate::model::service::TrafficPolicy;
use crate::plan::{FrontendKind, NodeAddresses, Planner};
use crate::table::ServiceTable;
use crate::time::Instant;

/// An ipset type as `ipset` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetType {
    HashIp,
    HashIpPort,
    HashIpPortIp,
    HashIpPortNet,
    BitmapPort,
}

impl SetType {
    fn as_str(self) -> &'static str {
        match self {
            SetType::HashIp => "hash:ip",
            SetType::HashIpPort => "hash:ip,port",
            SetType::HashIpPortIp => "hash:ip,port,ip",
            SetType::HashIpPortNet => "hash:ip,port,net",
            SetType::BitmapPort => "bitmap:port",
        }
    }
}

/// kube-proxy's `ipsetInfo`, in its order.
const SETS: [(&str, SetType); 17] = [
    (KUBE_LOOP_BACK, SetType::HashIpPortIp),
    (KUBE_CLUSTER_IP, SetType::HashIpPort),
    (KUBE_EXTERNAL_IP, SetType::HashIpPort),
    (KUBE_EXTERNAL_IP_LOCAL, SetType::HashIpPort),
    (KUBE_LOAD_BALANCER, SetType::HashIpPort),
    (KUBE_LOAD_BALANCER_FW, SetType::HashIpPort),
    (KUBE_LOAD_BALANCER_LOCAL, SetType::HashIpPort),
    (KUBE_LOAD_BALANCER_SOURCE_IP, SetType::HashIpPortIp),
    (KUBE_LOAD_BALANCER_SOURCE_CIDR, SetType::HashIpPortNet),
    (KUBE_NODE_PORT_TCP, SetType::BitmapPort),
    (KUBE_NODE_PORT_LOCAL_TCP, SetType::BitmapPort),
    (KUBE_NODE_PORT_UDP, SetType::BitmapPort),
    (KUBE_NODE_PORT_LOCAL_UDP, SetType::BitmapPort),
    (KUBE_NODE_PORT_SCTP, SetType::HashIpPort),
    (KUBE_NODE_PORT_LOCAL_SCTP, SetType::HashIpPort),
    (KUBE_HEALTH_CHECK_NODE_PORT, SetType::BitmapPort),
    (KUBE_IPVS_IPS, SetType::HashIp),
];

/// `KUBE-LOOP-BACK`: local endpoints, for hairpin masquerade.
pub const KUBE_LOOP_BACK: &str = "KUBE-LOOP-BACK";
/// `KUBE-CLUSTER-IP`: cluster IP and port.
pub const KUBE_CLUSTER_IP: &str = "KUBE-CLUSTER-IP";
/// `KUBE-EXTERNAL-IP`: external IP and port (Cluster policy).
pub const KUBE_EXTERNAL_IP: &str = "KUBE-EXTERNAL-IP";
/// `KUBE-EXTERNAL-IP-LOCAL`: external IP and port (Local policy).
pub const KUBE_EXTERNAL_IP_LOCAL: &str = "KUBE-EXTERNAL-IP-LOCAL";
/// `KUBE-LOAD-BALANCER`: load-balancer IP and port.
pub const KUBE_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
/// `KUBE-LOAD-BALANCER-FW`: load-balancer IP and port with source ranges.
pub const KUBE_LOAD_BALANCER_FW: &str = "KUBE-LOAD-BALANCER-FW";
/// `KUBE-LOAD-BALANCER-LOCAL`: load-balancer IP and port (Local policy).
pub const KUBE_LOAD_BALANCER_LOCAL: &str = "KUBE-LOAD-BALANCER-LOCAL";
/// `KUBE-LOAD-BALANCER-SOURCE-IP`: load-balancer IP, port and allowed source IP.
pub const KUBE_LOAD_BALANCER_SOURCE_IP: &str = "KUBE-LOAD-BALANCER-SOURCE-IP";
/// `KUBE-LOAD-BALANCER-SOURCE-CIDR`: load-balancer IP, port and allowed source range.
pub const KUBE_LOAD_BALANCER_SOURCE_CIDR: &str = "KUBE-LOAD-BALANCER-SOURCE-CIDR";
/// `KUBE-NODE-PORT-TCP`: TCP node ports.
pub const KUBE_NODE_PORT_TCP: &str = "KUBE-NODE-PORT-TCP";
/// `KUBE-NODE-PORT-LOCAL-TCP`: TCP node ports (Local policy).
pub const KUBE_NODE_PORT_LOCAL_TCP: &str = "KUBE-NODE-PORT-LOCAL-TCP";
/// `KUBE-NODE-PORT-UDP`: UDP node ports.
pub const KUBE_NODE_PORT_UDP: &str = "KUBE-NODE-PORT-UDP";
/// `KUBE-NODE-PORT-LOCAL-UDP`: UDP node ports (Local policy).
pub const KUBE_NODE_PORT_LOCAL_UDP: &str = "KUBE-NODE-PORT-LOCAL-UDP";
/// `KUBE-NODE-PORT-SCTP-HASH`: node IP and SCTP node port.
pub const KUBE_NODE_PORT_SCTP: &str = "KUBE-NODE-PORT-SCTP-HASH";
/// `KUBE-NODE-PORT-LOCAL-SCTP-HASH`: node IP and SCTP node port (Local policy).
pub const KUBE_NODE_PORT_LOCAL_SCTP: &str = "KUBE-NODE-PORT-LOCAL-SCTP-HASH";
/// `KUBE-HEALTH-CHECK-NODE-PORT`: health-check node ports.
pub const KUBE_HEALTH_CHECK_NODE_PORT: &str = "KUBE-HEALTH-CHECK-NODE-PORT";
/// `KUBE-IPVS-IPS`: the addresses bound to `kube-ipvs0`.
pub const KUBE_IPVS_IPS: &str = "KUBE-IPVS-IPS";

/// The dummy interface kube-proxy's IPVS mode binds service addresses to.
pub const KUBE_IPVS0: &str = "kube-ipvs0";

/// A set's name in `family`'s proxier: `KUBE-` becomes `KUBE-6-` for IPv6,
/// cut at 31 characters (`NewIPSet`).
///
/// # Examples
/// ```
/// use svclb::render::{ipset, IpFamily};
/// assert_eq!(ipset::set_name("KUBE-CLUSTER-IP", IpFamily::V6), "KUBE-6-CLUSTER-IP");
/// assert_eq!(
///     ipset::set_name("KUBE-LOAD-BALANCER-SOURCE-CIDR", IpFamily::V6),
///     "KUBE-6-LOAD-BALANCER-SOURCE-CID"
/// );
/// ```
pub fn set_name(name: &str, family: IpFamily) -> String {
    match (family, name.strip_prefix("KUBE-")) {
        (IpFamily::V6, Some(rest)) => {
            let mut n = format!("KUBE-6-{rest}");
            n.truncate(31);
            n
        }
        _ => name.to_owned(),
    }
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// The plan as kube-proxy's IPVS proxier of `opts.family` sees the node.
fn plan(table: &ServiceTable, opts: &RenderOptions) -> Planner {
    let mut addresses = NodeAddresses::new(opts.node_ips.clone(), opts.nodeport_addresses.clone());
    addresses.exclude_loopback = true;
    addresses.exclude_link_local = true;
    let mut p = Planner::new(opts.node.clone());
    p.set_node_addresses(addresses);
    p.update(table, &table.full_change_set(), Instant::ZERO, |_| false);
    p
}

/// Every set's entries, in [`SETS`] order, for one family.
fn entries(table: &ServiceTable, opts: &RenderOptions) -> Vec<BTreeSet<String>> {
    entries_and_no_node_access(table, opts).0
}

/// [`entries`], and the load-balancer `(IP, proto, port)`s whose source
/// ranges leave the node IP out (`lbNoNodeAccessIPPortProtocolEntries`).
#[allow(clippy::type_complexity)]
fn entries_and_no_node_access(
    table: &ServiceTable,
    opts: &RenderOptions,
) -> (Vec<BTreeSet<String>>, Vec<(IpAddr, &'static str, u16)>) {
    let mut no_node_access = Vec::new();
    let plan = plan(table, opts);
    let family = opts.family;
    let mut sets: Vec<BTreeSet<String>> = vec![BTreeSet::new(); SETS.len()];
    let idx = |name: &str| SETS.iter().position(|(n, _)| *n == name).expect("a set");
    let node_ip = opts
        .node_ips
        .iter()
        .copied()
        .find(|ip| family.contains(*ip));
    let node_port_ips: Vec<IpAddr> = plan
        .node_addresses()
        .node_port_ips()
        .filter(|ip| family.contains(*ip))
        .collect();
    let bound = kube_ipvs0_addresses(table, opts);
    for fe in plan.frontends() {
        let key = fe.key();
        if !family.contains(key.addr) {
            continue;
        }
        let svc = fe.service();
        let port = fe.port();
        let p = proto(key.protocol);
        let ip_port = format!("{},{p}:{}", key.addr, key.port);
        let local = svc.external_traffic_policy() == TrafficPolicy::Local;
        match fe.kind() {
            FrontendKind::ClusterIp => {
                // Per service port: the local endpoints (hairpin), the
                // cluster IP, the node port and the health-check port.
                if let Some(view) = table.view(svc.key()) {
                    let pv = &view.ports()[fe.port_index()];
                    for ep in pv.endpoints() {
                        let a = ep.addr();
                        if family.contains(a.ip()) && ep.is_on_node(opts.node.node_name.as_deref())
                        {
                            sets[idx(KUBE_LOOP_BACK)].insert(format!(
                                "{},{p}:{},{}",
                                a.ip(),
                                a.port(),
                                a.ip()
                            ));
                        }
                    }
                }
                sets[idx(KUBE_CLUSTER_IP)].insert(ip_port);
                if let Some(np) = port.node_port() {
                    // No node-port IP: kube-proxy skips the rest of this
                    // service port (`continue`), health check included.
                    if node_port_ips.is_empty() {
                        continue;
                    }
                    let (all, loc) = match key.protocol {
                        Protocol::Tcp => (KUBE_NODE_PORT_TCP, KUBE_NODE_PORT_LOCAL_TCP),
                        Protocol::Udp => (KUBE_NODE_PORT_UDP, KUBE_NODE_PORT_LOCAL_UDP),
                        Protocol::Sctp => (KUBE_NODE_PORT_SCTP, KUBE_NODE_PORT_LOCAL_SCTP),
                    };
                    let items: Vec<String> = if key.protocol == Protocol::Sctp {
                        node_port_ips
                            .iter()
                            .map(|ip| format!("{ip},sctp:{np}"))
                            .collect()
                    } else {
                        vec![np.to_string()]
                    };
                    for e in &items {
                        sets[idx(all)].insert(e.clone());
                        if local {
                            sets[idx(loc)].insert(e.clone());
                        }
                    }
                }
                if let Some(hc) = svc.health_check_node_port() {
                    sets[idx(KUBE_HEALTH_CHECK_NODE_PORT)].insert(hc.to_string());
                }
            }
            FrontendKind::ExternalIp => {
                let set = if local {
                    KUBE_EXTERNAL_IP_LOCAL
                } else {
                    KUBE_EXTERNAL_IP
                };
                sets[idx(set)].insert(ip_port);
            }
            FrontendKind::LoadBalancer => {
                sets[idx(KUBE_LOAD_BALANCER)].insert(ip_port.clone());
                if local {
                    sets[idx(KUBE_LOAD_BALANCER_LOCAL)].insert(ip_port.clone());
                }
                let ranges = svc.load_balancer_source_ranges();
                if !ranges.is_empty() {
                    sets[idx(KUBE_LOAD_BALANCER_FW)].insert(ip_port.clone());
                    for c in ranges {
                        sets[idx(KUBE_LOAD_BALANCER_SOURCE_CIDR)].insert(format!("{ip_port},{c}"));
                    }
                    if node_ip.is_some_and(|n| ranges.iter().any(|c| c.contains(n))) {
                        sets[idx(KUBE_LOAD_BALANCER_SOURCE_IP)]
                            .insert(format!("{ip_port},{}", key.addr));
                    } else {
                        no_node_access.push((key.addr, p, key.port));
                    }
                }
            }
            FrontendKind::NodePort => {}
        }
    }
    sets[idx(KUBE_IPVS_IPS)] = bound.iter().map(IpAddr::to_string).collect();
    (sets, no_node_access)
}

/// kube-proxy's IPVS-mode ipsets for `table`, as `ipset restore` input.
/// See the module docs.
///
/// # Examples
/// ```
/// use svclb::*;
/// use svclb::render::{self, RenderOptions};
/// let mut table = ServiceTable::new();
/// let svc = Service::builder("default", "web")
///     .cluster_ip("10.96.0.10".parse().unwrap())
///     .service_type(ServiceType::NodePort)
///     .port(ServicePortSpec::tcp(80).target_port(8080).node_port(30080))
///     .build().unwrap();
/// table.apply(Change::UpsertService(svc)).unwrap();
/// let opts = RenderOptions { node_ips: vec!["192.168.0.2".parse().unwrap()], ..RenderOptions::default() };
/// let text = render::ipset::render(&table, &opts);
/// assert!(text.contains("create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536\n"));
/// assert!(text.contains("add KUBE-CLUSTER-IP 10.96.0.10,tcp:80\n"));
/// assert!(text.contains("create KUBE-NODE-PORT-TCP bitmap:port range 0-65535\nadd KUBE-NODE-PORT-TCP 30080\n"));
/// assert!(text.contains("add KUBE-IPVS-IPS 10.96.0.10\n"));
/// ```
pub fn render(table: &ServiceTable, opts: &RenderOptions) -> String {
    let sets = entries(table, opts);
    let inet = match opts.family {
        IpFamily::V4 => "inet",
        IpFamily::V6 => "inet6",
    };
    let mut out = String::new();
    for ((name, ty), items) in SETS.iter().zip(&sets) {
        let name = set_name(name, opts.family);
        let _ = write!(out, "create {name} {}", ty.as_str());
        match ty {
            SetType::BitmapPort => out.push_str(" range 0-65535"),
            _ => {
                let _ = write!(out, " family {inet} hashsize 1024 maxelem 65536");
            }
        }
        out.push('\n');
        for e in items {
            let _ = writeln!(out, "add {name} {e}");
        }
    }
    out
}

/// The entries of one set (by its IPv4 name, e.g. [`KUBE_CLUSTER_IP`]) for
/// `opts.family`, sorted as kube-proxy adds them. Empty for an unknown
/// name.
///
/// # Examples
/// ```
/// use svclb::*;
/// use svclb::render::{ipset, RenderOptions};
/// let mut table = ServiceTable::new();
/// let svc = Service::builder("default", "web")
///     .cluster_ip("10.96.0.10".parse().unwrap())
///     .port(ServicePortSpec::udp(53))
///     .build().unwrap();
/// table.apply(Change::UpsertService(svc)).unwrap();
/// let got = ipset::set_entries(&table, &RenderOptions::default(), ipset::KUBE_CLUSTER_IP);
/// assert_eq!(got, ["10.96.0.10,udp:53"]);
/// ```
pub fn set_entries(table: &ServiceTable, opts: &RenderOptions, set: &str) -> Vec<String> {
    let Some(i) = SETS.iter().position(|(n, _)| *n == set) else {
        return Vec::new();
    };
    entries(table, opts).swap_remove(i).into_iter().collect()
}

/// The addresses kube-proxy's IPVS proxier of `opts.family` binds to
/// `kube-ipvs0`: every cluster IP, and every external and load-balancer IP
/// (`ipMode: VIP`) that is not one of the node's addresses
/// ([`RenderOptions::node_ips`]; kube-proxy: "We must not add the address
/// to the dummy device if it exist on another interface"), sorted.
pub fn kube_ipvs0_addresses(table: &ServiceTable, opts: &RenderOptions) -> Vec<IpAddr> {
    let plan = plan(table, opts);
    let mut out = BTreeSet::new();
    for fe in plan.frontends() {
        let addr = fe.key().addr;
        if !opts.family.contains(addr) {
            continue;
        }
        match fe.kind() {
            FrontendKind::ClusterIp => {
                out.insert(addr);
            }
            FrontendKind::ExternalIp | FrontendKind::LoadBalancer => {
                if !opts.node_ips.contains(&addr) {
                    out.insert(addr);
                }
            }
            FrontendKind::NodePort => {}
        }
    }
    out.into_iter().collect()
}

/// [`kube_ipvs0_addresses`] as `ip -batch` input: `address add IP/32 dev
/// kube-ipvs0` (`/128` for IPv6), one line per address.
///
/// # Examples
/// ```
/// use svclb::*;
/// use svclb::render::{ipset, RenderOptions};
/// let mut table = ServiceTable::new();
/// let svc = Service::builder("default", "web")
///     .cluster_ip("10.96.0.10".parse().unwrap())
///     .external_ip("192.168.0.2".parse().unwrap())
///     .external_ip("203.0.113.7".parse().unwrap())
///     .port(ServicePortSpec::tcp(80))
///     .build().unwrap();
/// table.apply(Change::UpsertService(svc)).unwrap();
/// // 192.168.0.2 is the node's own: not bound.
/// let opts = RenderOptions { node_ips: vec!["192.168.0.2".parse().unwrap()], ..RenderOptions::default() };
/// assert_eq!(
///     ipset::render_kube_ipvs0(&table, &opts),
///     "address add 10.96.0.10/32 dev kube-ipvs0\naddress add 203.0.113.7/32 dev kube-ipvs0\n"
/// );
/// ```
pub fn render_kube_ipvs0(table: &ServiceTable, opts: &RenderOptions) -> String {
    let mut out = String::new();
    for a in kube_ipvs0_addresses(table, opts) {
        let len = if a.is_ipv4() { 32 } else { 128 };
        let _ = writeln!(out, "address add {a}/{len} dev {KUBE_IPVS0}");
    }
    out
}

/// Each set's comment (kube-proxy's `*SetComment` constants), as its
/// iptables rules quote it.
fn comment(set: &str) -> &'static str {
    match set {
        KUBE_LOOP_BACK => "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
        KUBE_CLUSTER_IP => "Kubernetes service cluster ip + port for masquerade purpose",
        KUBE_EXTERNAL_IP => {
            "Kubernetes service external ip + port for masquerade and filter purpose"
        }
        KUBE_EXTERNAL_IP_LOCAL => {
            "Kubernetes service external ip + port with externalTrafficPolicy=local"
        }
        KUBE_LOAD_BALANCER => "Kubernetes service lb portal",
        KUBE_LOAD_BALANCER_LOCAL => {
            "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"
        }
        KUBE_LOAD_BALANCER_FW => {
            "Kubernetes service load balancer ip + port for load balancer with sourceRange"
        }
        KUBE_LOAD_BALANCER_SOURCE_IP => {
            "Kubernetes service load balancer ip + port + source IP for packet filter purpose"
        }
        KUBE_LOAD_BALANCER_SOURCE_CIDR => {
            "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"
        }
        KUBE_NODE_PORT_TCP => "Kubernetes nodeport TCP port for masquerade purpose",
        KUBE_NODE_PORT_LOCAL_TCP => "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
        KUBE_NODE_PORT_UDP => "Kubernetes nodeport UDP port for masquerade purpose",
        KUBE_NODE_PORT_LOCAL_UDP => "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
        KUBE_NODE_PORT_SCTP => {
            "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"
        }
        KUBE_NODE_PORT_LOCAL_SCTP => {
            "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"
        }
        KUBE_HEALTH_CHECK_NODE_PORT => "Kubernetes health check node port",
        _ => "Addresses on the ipvs interface",
    }
}

/// kube-proxy's `ipsetWithIptablesChain`: (set, nat table, from chain, to,
/// match type, protocol).
const SET_RULES: [(&str, bool, &str, &str, &str, &str); 12] = [
    (
        KUBE_LOOP_BACK,
        true,
        "KUBE-POSTROUTING",
        "MASQUERADE",
        "dst,dst,src",
        "",
    ),
    (
        KUBE_LOAD_BALANCER,
        true,
        "KUBE-SERVICES",
        "KUBE-LOAD-BALANCER",
        "dst,dst",
        "",
    ),
    (
        KUBE_LOAD_BALANCER_LOCAL,
        true,
        "KUBE-LOAD-BALANCER",
        "RETURN",
        "dst,dst",
        "",
    ),
    (
        KUBE_NODE_PORT_LOCAL_TCP,
        true,
        "KUBE-NODE-PORT",
        "RETURN",
        "dst",
        "tcp",
    ),
    (
        KUBE_NODE_PORT_TCP,
        true,
        "KUBE-NODE-PORT",
        "KUBE-MARK-MASQ",
        "dst",
        "tcp",
    ),
    (
        KUBE_NODE_PORT_LOCAL_UDP,
        true,
        "KUBE-NODE-PORT",
        "RETURN",
        "dst",
        "udp",
    ),
    (
        KUBE_NODE_PORT_UDP,
        true,
        "KUBE-NODE-PORT",
        "KUBE-MARK-MASQ",
        "dst",
        "udp",
    ),
    (
        KUBE_NODE_PORT_LOCAL_SCTP,
        true,
        "KUBE-NODE-PORT",
        "RETURN",
        "dst,dst",
        "sctp",
    ),
    (
        KUBE_NODE_PORT_SCTP,
        true,
        "KUBE-NODE-PORT",
        "KUBE-MARK-MASQ",
        "dst,dst",
        "sctp",
    ),
    (
        KUBE_LOAD_BALANCER_FW,
        false,
        "KUBE-PROXY-FIREWALL",
        "KUBE-SOURCE-RANGES-FIREWALL",
        "dst,dst",
        "",
    ),
    (
        KUBE_LOAD_BALANCER_SOURCE_CIDR,
        false,
        "KUBE-SOURCE-RANGES-FIREWALL",
        "RETURN",
        "dst,dst,src",
        "",
    ),
    (
        KUBE_LOAD_BALANCER_SOURCE_IP,
        false,
        "KUBE-SOURCE-RANGES-FIREWALL",
        "RETURN",
        "dst,dst,src",
        "",
    ),
];

/// The iptables rules kube-proxy's IPVS mode writes around its ipsets
/// (`writeIptablesRules` in kubernetes `pkg/proxy/ipvs/proxier.go`), as
/// the `iptables-restore` input it restores: the nat table (`KUBE-SERVICES`,
/// `KUBE-POSTROUTING`, `KUBE-NODE-PORT`, `KUBE-LOAD-BALANCER`,
/// `KUBE-MARK-MASQ`), then the filter table (`KUBE-FORWARD`,
/// `KUBE-NODE-PORT`, `KUBE-PROXY-FIREWALL`, `KUBE-SOURCE-RANGES-FIREWALL`,
/// `KUBE-IPVS-FILTER`, `KUBE-IPVS-OUT-FILTER`). A set's rule is written
/// only when the set has entries, as kube-proxy does. The cluster-IP
/// masquerade rule follows `--masquerade-all`, else the family's
/// `--cluster-cidr` (`! -s CIDR`), else kube-proxy's `src,dst` fallback.
/// The jumps from the built-in chains are kube-proxy's `EnsureRule`s, not
/// part of this input.
///
/// # Examples
/// ```
/// use svclb::*;
/// use svclb::render::{ipset, RenderOptions};
/// let mut table = ServiceTable::new();
/// let svc = Service::builder("default", "web")
///     .cluster_ip("10.96.0.10".parse().unwrap())
///     .port(ServicePortSpec::tcp(80))
///     .build().unwrap();
/// table.apply(Change::UpsertService(svc)).unwrap();
/// let opts = RenderOptions::default().cluster_cidr("10.244.0.0/16".parse().unwrap());
/// let text = ipset::render_iptables(&table, &opts);
/// assert!(text.contains("-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ\n"));
/// assert!(text.contains("-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\n"));
/// ```
pub fn render_iptables(table: &ServiceTable, opts: &RenderOptions) -> String {
    let (sets, no_node_access) = entries_and_no_node_access(table, opts);
    let empty = |set: &str| {
        SETS.iter()
            .position(|(n, _)| *n == set)
            .is_none_or(|i| sets[i].is_empty())
    };
    let fam = opts.family;
    let name = |set: &str| set_name(set, fam);
    let mark = opts.masquerade_mark.as_str();
    let mut nat: Vec<String> = Vec::new();
    let mut filter: Vec<String> = Vec::new();
    let lo = match fam {
        IpFamily::V4 => "127.0.0.0/8",
        IpFamily::V6 => "::1/128",
    };
    nat.push(format!("-A KUBE-SERVICES -s {lo} -j RETURN"));
    for (set, is_nat, from, to, match_type, protocol) in SET_RULES {
        if empty(set) {
            continue;
        }
        let mut r = format!("-A {from}");
        if !protocol.is_empty() {
            let _ = write!(r, " -p {protocol}");
        }
        let _ = write!(
            r,
            " -m comment --comment \"{}\" -m set --match-set {} {match_type} -j {to}",
            comment(set),
            name(set)
        );
        if is_nat { nat.push(r) } else { filter.push(r) }
    }
    let set_match = |set: &str, m: &str| {
        format!(
            "-A KUBE-SERVICES -m comment --comment \"{}\" -m set --match-set {} {m}",
            comment(set),
            name(set)
        )
    };
    if !empty(KUBE_CLUSTER_IP) {
        if opts.masquerade_all {
            nat.push(format!(
                "{} -j KUBE-MARK-MASQ",
                set_match(KUBE_CLUSTER_IP, "dst,dst")
            ));
        } else if let Some(c) = opts.family_cluster_cidr() {
            nat.push(format!(
                "{} ! -s {c} -j KUBE-MARK-MASQ",
                set_match(KUBE_CLUSTER_IP, "dst,dst")
            ));
        } else {
            nat.push(format!(
                "{} -j KUBE-MARK-MASQ",
                set_match(KUBE_CLUSTER_IP, "src,dst")
            ));
        }
    }
    let external = |nat: &mut Vec<String>, base: String| {
        nat.push(format!(
            "{base} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT"
        ));
        nat.push(format!("{base} -m addrtype --dst-type LOCAL -j ACCEPT"));
    };
    if !empty(KUBE_EXTERNAL_IP) {
        let base = set_match(KUBE_EXTERNAL_IP, "dst,dst");
        nat.push(format!("{base} -j KUBE-MARK-MASQ"));
        external(&mut nat, base);
    }
    if !empty(KUBE_EXTERNAL_IP_LOCAL) {
        external(&mut nat, set_match(KUBE_EXTERNAL_IP_LOCAL, "dst,dst"));
    }
    nat.push("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT".into());
    nat.push("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ".into());
    filter.push("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP".into());
    for (ip, p, port) in &no_node_access {
        filter.push(format!(
            "-A KUBE-IPVS-OUT-FILTER -s {ip} -m ipvs --vaddr {ip} --vproto {p} --vport {port} -j DROP"
        ));
    }
    for set in [KUBE_CLUSTER_IP, KUBE_LOAD_BALANCER] {
        if !empty(set) {
            nat.push(format!(
                "-A KUBE-SERVICES -m set --match-set {} dst,dst -j ACCEPT",
                name(set)
            ));
        }
    }
    filter.push(format!(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    ));
    filter.push("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into());
    filter.push(format!(
        "-A KUBE-NODE-PORT -m comment --comment \"{}\" -m set --match-set {} dst -j ACCEPT",
        comment(KUBE_HEALTH_CHECK_NODE_PORT),
        name(KUBE_HEALTH_CHECK_NODE_PORT)
    ));
    for (set, m) in [
        (KUBE_LOAD_BALANCER, "dst,dst"),
        (KUBE_CLUSTER_IP, "dst,dst"),
        (KUBE_EXTERNAL_IP, "dst,dst"),
        (KUBE_EXTERNAL_IP_LOCAL, "dst,dst"),
        (KUBE_HEALTH_CHECK_NODE_PORT, "dst"),
    ] {
        filter.push(format!(
            "-A KUBE-IPVS-FILTER -m set --match-set {} {m} -j RETURN",
            name(set)
        ));
    }
    filter.push(format!(
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set {} dst -j REJECT",
        name(KUBE_IPVS_IPS)
    ));
    nat.push(format!(
        "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN"
    ));
    nat.push(format!("-A KUBE-POSTROUTING -j MARK --xor-mark {mark}"));
    nat.push(format!(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{}",
        if opts.random_fully { " --random-fully" } else { "" }
    ));
    nat.push(format!("-A KUBE-MARK-MASQ -j MARK --or-mark {mark}"));
    let mut out = String::from("*nat\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-NODE-PORT",
        "KUBE-LOAD-BALANCER",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for r in &nat {
        out.push_str(r);
        out.push('\n');
    }
    out.push_str("COMMIT\n*filter\n");
    for c in [
        "KUBE-FORWARD",
        "KUBE-NODE-PORT",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SOURCE-RANGES-FIREWALL",
        "KUBE-IPVS-FILTER",
        "KUBE-IPVS-OUT-FILTER",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for r in &filter {
        out.push_str(r);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_names_of_the_ipv6_proxier() {
        // NewIPSet: KUBE- becomes KUBE-6-, cut at 31 characters.
        assert_eq!(set_name(KUBE_IPVS_IPS, IpFamily::V4), "KUBE-IPVS-IPS");
        assert_eq!(set_name(KUBE_IPVS_IPS, IpFamily::V6), "KUBE-6-IPVS-IPS");
        assert_eq!(
            set_name(KUBE_NODE_PORT_LOCAL_SCTP, IpFamily::V6),
            "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS"
        );
        for (n, _) in SETS {
            assert!(set_name(n, IpFamily::V6).len() <= 31, "{n}");
        }
    }

    #[test]
    fn an_empty_table_creates_every_set_and_adds_nothing() {
        let text = render(&ServiceTable::new(), &RenderOptions::default());
        assert_eq!(text.lines().count(), SETS.len());
        assert!(text.lines().all(|l| l.starts_with("create ")));
        assert!(text.starts_with(
            "create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536\n"
        ));
        assert!(
            text.ends_with(
                "create KUBE-IPVS-IPS hash:ip family inet hashsize 1024 maxelem 65536\n"
            )
        );
    }
}
