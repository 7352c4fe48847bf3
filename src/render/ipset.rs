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
                    }
                }
            }
            FrontendKind::NodePort => {}
        }
    }
    sets[idx(KUBE_IPVS_IPS)] = bound.iter().map(IpAddr::to_string).collect();
    sets
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
