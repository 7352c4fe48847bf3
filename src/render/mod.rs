//! Renderings users know: the [`ServiceTable`] written out as the text that
//! kube-proxy and IPVS tools produce.
//!
//! - [`iptables`]: `iptables-restore` input, the rules kube-proxy's iptables
//!   mode writes for cluster IPs, node ports, external and load-balancer
//!   IPs (chain names, comments and argument order exactly as
//!   kube-proxy's; see that module for the version).
//! - [`nft`]: `nft -f` input, kube-proxy's nftables-mode table.
//! - [`ipvsadm`]: an `ipvsadm -ln` listing of an [`IpvsDataplane`](crate::IpvsDataplane),
//!   with its live connection counters.
//! - [`ipset`]: the rest of kube-proxy's IPVS mode: its ipsets as `ipset
//!   restore` input, the iptables rules that match them, and the addresses
//!   it binds to `kube-ipvs0`.
//! - [`conntrack`]: tracked connections as `conntrack -L` and
//!   `ipvsadm -lnc` list them.
//! - [`iptables::Syncer`] and [`nft::Syncer`]: kube-proxy's partial syncs,
//!   each sync's restore input written from what the last one left.
//!
//! Renderers read the table (and, for `ipvsadm`, the dataplane); they run at
//! control-plane speed, allocate freely and never touch a packet path. Which
//! endpoints appear follows [`topology::categorize`](crate::topology::categorize)
//! for the node in [`RenderOptions::node`], as the dataplanes do.
//!
//! # Examples
//! ```
//! use svclb::*;
//! use svclb::render::{self, RenderOptions};
//!
//! let mut table = ServiceTable::new();
//! let svc = Service::builder("ns1", "svc1")
//!     .cluster_ip("172.30.0.41".parse().unwrap())
//!     .port(ServicePortSpec::tcp(80).name("p80"))
//!     .build()?;
//! let slice = EndpointSlice::builder("ns1", "svc1-abc", "svc1", AddressType::IPv4)
//!     .port(SlicePortSpec::tcp(80).name("p80"))
//!     .endpoint(EndpointSpec::new("10.180.0.1"))
//!     .build()?;
//! table.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)])?;
//!
//! let rules = render::iptables::render(&table, &RenderOptions::default());
//! assert!(rules.contains(
//!     "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp \
//!      -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O\n"
//! ));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod conntrack;
mod hash;
pub mod ipset;
pub mod iptables;
pub mod ipvsadm;
pub mod nft;

use core::fmt;
use core::str::FromStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::error::ValidationError;
use crate::model::service::{Service, ServicePort, TrafficPolicy};
use crate::plan::{Outcome, Planner};
use crate::table::{EndpointInfo, ServiceTable};
use crate::topology::NodeTopology;

/// An IP family: which half of a dual-stack table a rendering covers
/// (kube-proxy runs one proxier per family: `iptables`/`ip6tables`,
/// `ip`/`ip6` nftables tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IpFamily {
    /// IPv4 (the default).
    #[default]
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// Whether `ip` belongs to this family.
    pub fn contains(self, ip: IpAddr) -> bool {
        matches!(
            (self, ip),
            (IpFamily::V4, IpAddr::V4(_)) | (IpFamily::V6, IpAddr::V6(_))
        )
    }
}

/// An IP prefix such as `10.0.0.0/8` (`--cluster-cidr`, service CIDRs).
///
/// Host bits are cleared, as Go's `net.ParseCIDR` does for the network it
/// returns, so `10.1.2.3/8` reads as `10.0.0.0/8`.
///
/// # Examples
/// ```
/// use svclb::render::Cidr;
/// let c: Cidr = "10.1.2.3/8".parse().unwrap();
/// assert_eq!(c.to_string(), "10.0.0.0/8");
/// assert!(c.contains("10.200.0.1".parse().unwrap()));
/// assert!("10.0.0.0/33".parse::<Cidr>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// Parses `ADDR/LEN`, naming `field` in the error.
    ///
    /// # Errors
    /// [`ValidationError::Invalid`] when the text is not an address, a `/`
    /// and a prefix length valid for the address family.
    pub fn parse(field: &str, text: &str) -> Result<Cidr, ValidationError> {
        let invalid = |reason| ValidationError::Invalid {
            field: field.into(),
            value: text.into(),
            reason,
        };
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| invalid("must be ADDRESS/PREFIX-LENGTH, e.g. 10.0.0.0/8"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| invalid("the address is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 =
            len.parse().ok().filter(|l| *l <= max).ok_or_else(|| {
                invalid("the prefix length must be 0..=32 (IPv4) or 0..=128 (IPv6)")
            })?;
        Ok(Cidr::new_masked(addr, prefix_len))
    }

    fn new_masked(addr: IpAddr, prefix_len: u8) -> Cidr {
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Cidr { addr, prefix_len }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` lies inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Cidr::new_masked(ip, self.prefix_len).addr == self.addr
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cidr::parse("cidr", s)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// What a rendering should look like: the kube-proxy flags and node facts
/// that change its text.
///
/// The default is what kube-proxy writes with its default flags on a
/// current IPv4 node without a local-traffic detector: no per-service
/// masquerade rule, mark `0x00004000` (bit 14), localhost NodePorts on,
/// `MASQUERADE --random-fully`. kube-proxy's own unit tests use a fake with
/// mark `0x4000` and no `--random-fully`; set those two to compare with them.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// This node's name and zone (Local policies, topology hints).
    pub node: NodeTopology,
    /// Which family to render (one kube-proxy proxier per family).
    pub family: IpFamily,
    /// `--cluster-cidr` (one per family on a dual-stack cluster): traffic
    /// to a cluster IP from outside the rendered family's CIDR is marked for
    /// masquerade (`! -s CIDR -j KUBE-MARK-MASQ`). With no CIDR of that
    /// family the rule is left out, as kube-proxy does without a
    /// local-traffic detector.
    pub cluster_cidrs: Vec<Cidr>,
    /// `--masquerade-all`: mark all cluster-IP traffic (wins over
    /// `cluster_cidr`).
    pub masquerade_all: bool,
    /// The masquerade mark as kube-proxy prints it. Real kube-proxy formats
    /// `1 << --iptables-masquerade-bit` with Go's `%#08x`, which gives
    /// `0x00004000` for the default bit 14 (the default here, and what
    /// kube-proxy's logged restore input shows:
    /// `-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000`); kube-proxy's unit
    /// tests use a fake that prints `0x4000`.
    pub masquerade_mark: String,
    /// Append `--random-fully` to the `MASQUERADE` rule. kube-proxy does
    /// whenever the host's iptables supports it (1.6.2 and later, so on by
    /// default); its unit-test fake does not.
    pub random_fully: bool,
    /// `--iptables-localhost-nodeports` (default on): the IPv4 `KUBE-FIREWALL`
    /// chain, and no `! -d 127.0.0.0/8` on the NodePorts jump.
    pub localhost_nodeports: bool,
    /// Also write the jumps from the built-in chains (`PREROUTING`, `OUTPUT`,
    /// `POSTROUTING`, `INPUT`, `FORWARD`) into the restore input. kube-proxy
    /// installs those separately with `iptables -I`; with this on, the
    /// output is self-contained and works when restored into an empty
    /// network namespace. Off by default (kube-proxy's exact restore input).
    pub builtin_jumps: bool,
    /// Service CIDRs: the nftables rendering drops traffic to unallocated
    /// cluster IPs in these ranges (`cluster-ips-check`).
    pub service_cidrs: Vec<Cidr>,
    /// The connection-table size `ipvsadm` prints in its header.
    pub ipvs_conn_table_size: u32,
    /// Write the `nfacct` counters kube-proxy 1.31+ adds to its iptables
    /// rules (`-m nfacct --nfacct-name ct_state_invalid_dropped_pkts` on
    /// the conntrack-INVALID drop, `localhost_nps_accepted_pkts` on
    /// localhost node ports). On by default, as kube-proxy has them where
    /// the kernel supports `xt_nfacct`.
    pub nfacct: bool,
    /// The node's IPs: the nftables rendering's `nodeport-ips` elements
    /// (those inside [`nodeport_addresses`](Self::nodeport_addresses) when
    /// that is set), and the address kube-proxy's `allowFromNode` rule
    /// checks against load-balancer source ranges. Empty by default.
    pub node_ips: Vec<IpAddr>,
    /// kube-proxy's `--nodeport-addresses`. Empty (the default) or a prefix
    /// covering the whole family: the iptables rendering matches node ports
    /// with `-m addrtype --dst-type LOCAL`; otherwise it writes one
    /// `-d NODE-IP -j KUBE-NODEPORTS` rule per node IP inside the prefixes,
    /// as kube-proxy does. The nftables rendering likewise matches node
    /// ports with `fib daddr type local` in the first case and on the
    /// `nodeport-ips` set in the second.
    pub nodeport_addresses: Vec<Cidr>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            node: NodeTopology::default(),
            family: IpFamily::V4,
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            masquerade_mark: "0x00004000".into(),
            random_fully: true,
            localhost_nodeports: true,
            builtin_jumps: false,
            service_cidrs: Vec::new(),
            ipvs_conn_table_size: 4096,
            nfacct: true,
            node_ips: Vec::new(),
            nodeport_addresses: Vec::new(),
        }
    }
}

/// One sync's rules, as a partial-sync [`iptables::Syncer`] or
/// [`nft::Syncer`] writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesSync {
    /// The restore input (`iptables-restore --noflush`, `nft -f`).
    pub text: String,
    /// Whether this was a full sync (everything written).
    pub full: bool,
    /// How many services had their chains written.
    pub services_written: usize,
    /// How many stale chains this sync deletes.
    pub chains_deleted: usize,
}

/// kube-proxy's default `--iptables-masquerade-bit`.
pub const DEFAULT_MASQUERADE_BIT: u8 = 14;

/// The mark for a masquerade bit, as kube-proxy prints it (Go `%#08x`, whose
/// width counts digits only: bit 14 gives `0x00004000`).
///
/// # Examples
/// ```
/// assert_eq!(svclb::render::masquerade_mark(14).unwrap(), "0x00004000");
/// assert!(svclb::render::masquerade_mark(32).is_err());
/// ```
///
/// # Errors
/// [`ValidationError::Invalid`] on
/// `masqueradeBit` if `bit` is above 31 (a packet mark has 32 bits;
/// kube-proxy's `--iptables-masquerade-bit` accepts 0..=31).
pub fn masquerade_mark(bit: u8) -> Result<String, ValidationError> {
    if bit > 31 {
        return Err(ValidationError::Invalid {
            field: "masqueradeBit".into(),
            value: bit.to_string(),
            reason: "must be in 0..=31",
        });
    }
    Ok(format!("0x{:08x}", 1u32 << bit))
}

impl RenderOptions {
    /// Sets the node.
    pub fn node(mut self, node: NodeTopology) -> Self {
        self.node = node;
        self
    }
    /// Sets the family.
    pub fn family(mut self, family: IpFamily) -> Self {
        self.family = family;
        self
    }
    /// Adds a `--cluster-cidr` (call once per family on a dual-stack cluster).
    pub fn cluster_cidr(mut self, cidr: Cidr) -> Self {
        self.cluster_cidrs.push(cidr);
        self
    }

    /// The cluster CIDR of the rendered family, if one was given.
    pub(crate) fn family_cluster_cidr(&self) -> Option<Cidr> {
        self.cluster_cidrs
            .iter()
            .copied()
            .find(|c| self.family.contains(c.addr()))
    }
    /// Sets the mark text.
    pub fn masquerade_mark(mut self, mark: impl Into<String>) -> Self {
        self.masquerade_mark = mark.into();
        self
    }
    /// Turns `MASQUERADE --random-fully` on or off.
    pub fn random_fully(mut self, on: bool) -> Self {
        self.random_fully = on;
        self
    }
    /// Adds a node IP that accepts node-port traffic
    /// ([`node_ips`](Self::node_ips)).
    pub fn node_ip(mut self, ip: IpAddr) -> Self {
        self.node_ips.push(ip);
        self
    }
    /// Adds a `--nodeport-addresses` prefix
    /// ([`nodeport_addresses`](Self::nodeport_addresses)).
    pub fn nodeport_address(mut self, cidr: Cidr) -> Self {
        self.nodeport_addresses.push(cidr);
        self
    }
    /// Whether node ports answer on every local address of the family
    /// (`--nodeport-addresses` unset, or a prefix of length 0).
    pub(crate) fn nodeports_match_all(&self) -> bool {
        let mut fam = self
            .nodeport_addresses
            .iter()
            .filter(|c| self.family.contains(c.addr()))
            .peekable();
        fam.peek().is_none() || fam.any(|c| c.prefix_len() == 0)
    }
    /// The node IPs of the family that accept node ports: inside
    /// [`nodeport_addresses`](Self::nodeport_addresses) when it is set.
    pub(crate) fn nodeport_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.node_ips.iter().copied().filter(move |ip| {
            self.family.contains(*ip)
                && (self.nodeports_match_all()
                    || self.nodeport_addresses.iter().any(|c| c.contains(*ip)))
        })
    }
    /// Sets [`nfacct`](Self::nfacct).
    pub fn nfacct(mut self, on: bool) -> Self {
        self.nfacct = on;
        self
    }
    /// Turns the built-in chain jumps on or off.
    pub fn builtin_jumps(mut self, on: bool) -> Self {
        self.builtin_jumps = on;
        self
    }
    /// Adds a service CIDR.
    pub fn service_cidr(mut self, cidr: Cidr) -> Self {
        self.service_cidrs.push(cidr);
        self
    }
}

/// One frontend of the plan in a rendered family, with kube-proxy's names.
#[derive(Debug)]
pub(crate) struct PortPlan<'a> {
    pub(crate) service: &'a Service,
    pub(crate) port: &'a ServicePort,
    pub(crate) vip: IpAddr,
    /// `ServicePortName.String()`: `ns/name:port`, or `ns/name` when the port
    /// has no name.
    pub(crate) name: &'a str,
    /// What the rules do: forward (to `endpoints`), reject or drop.
    pub(crate) outcome: Outcome,
    /// The endpoints that get rules (weight above 0), in merged order.
    pub(crate) endpoints: Vec<&'a Arc<EndpointInfo>>,
}

impl PortPlan<'_> {
    /// `tcp`, `udp`, `sctp`.
    pub(crate) fn proto(&self) -> &'static str {
        self.port.protocol().as_lower_str()
    }
    /// Whether the internal traffic policy is Local.
    pub(crate) fn local_policy(&self) -> bool {
        self.service.internal_traffic_policy() == TrafficPolicy::Local
    }
}

/// The services with cluster IPs but none of `family`: left out of a
/// rendering of that family (kube-proxy runs one proxier per family), so a
/// caller can say so. Headless and ExternalName services, which no
/// family's rendering has, are not among them.
///
/// # Examples
/// ```
/// use svclb::render::{IpFamily, services_outside_family};
/// use svclb::*;
/// let mut table = ServiceTable::new();
/// let v6 = Service::builder("default", "v6")
///     .cluster_ip("fd00::10".parse().unwrap())
///     .port(ServicePortSpec::tcp(80))
///     .build()
///     .unwrap();
/// table.apply(Change::UpsertService(v6)).unwrap();
/// let alias = Service::builder("default", "alias")
///     .service_type(ServiceType::ExternalName)
///     .external_name("db.example.com")
///     .build()
///     .unwrap();
/// table.apply(Change::UpsertService(alias)).unwrap();
/// assert_eq!(services_outside_family(&table, IpFamily::V4), [ServiceKey::new("default", "v6")]);
/// assert!(services_outside_family(&table, IpFamily::V6).is_empty());
/// ```
pub fn services_outside_family(
    table: &ServiceTable,
    family: IpFamily,
) -> Vec<crate::model::service::ServiceKey> {
    let mut out: Vec<_> = table
        .views()
        .map(|v| v.service())
        .filter(|s| {
            let ips = s.cluster_ip().addrs();
            !s.is_headless() && !ips.is_empty() && !ips.iter().any(|ip| family.contains(*ip))
        })
        .map(|s| s.key().clone())
        .collect();
    out.sort();
    out
}

/// The frontends of `plan` in `family`, in service key order then port
/// order, and the number of endpoints of that family (kube-proxy's "large
/// cluster" count).
pub(crate) fn port_plans<'a>(
    table: &ServiceTable,
    plan: &'a Planner,
    opts: &RenderOptions,
) -> (Vec<PortPlan<'a>>, usize) {
    let mut plans = Vec::new();
    for fe in plan.frontends() {
        // One plan per cluster-IP frontend: the renderers write a service
        // port's node port, external and load-balancer IPs from the
        // service itself, next to its cluster IP, as kube-proxy does.
        if !opts.family.contains(fe.key().addr) || fe.kind() != crate::plan::FrontendKind::ClusterIp
        {
            continue;
        }
        plans.push(PortPlan {
            service: fe.service(),
            port: fe.port(),
            vip: fe.key().addr,
            name: fe.name(),
            outcome: fe.rule_outcome(),
            endpoints: fe.rule_backends().map(|b| b.endpoint()).collect(),
        });
    }
    let total_endpoints = table
        .views()
        .filter(|v| {
            v.service()
                .cluster_ip()
                .addrs()
                .iter()
                .any(|a| opts.family.contains(*a))
        })
        .flat_map(|v| v.ports().iter())
        .map(|pv| {
            pv.endpoints()
                .iter()
                .filter(|e| opts.family.contains(e.addr().ip()))
                .count()
        })
        .sum::<usize>();
    (plans, total_endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_and_errors() {
        let c = Cidr::parse("cluster-cidr", "fd00::1/64").unwrap();
        assert_eq!(c.to_string(), "fd00::/64");
        assert!(c.contains("fd00::ffff".parse().unwrap()));
        assert!(!c.contains("10.0.0.1".parse().unwrap()));
        assert_eq!(
            Cidr::parse("x", "0.0.0.0/0").unwrap().to_string(),
            "0.0.0.0/0"
        );
        let err = Cidr::parse("cluster-cidr", "10.0.0.0").unwrap_err();
        assert_eq!(err.field(), "cluster-cidr");
        assert!(err.to_string().contains("\"10.0.0.0\""), "{err}");
        for bad in ["10.0.0.0/33", "10.0.0/8", "/8", "::/129", "10.0.0.0/-1"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn weight_zero_endpoints_get_no_rule() {
        use crate::model::endpoint_slice::{
            AddressType, EndpointSlice, EndpointSpec, SlicePortSpec,
        };
        use crate::model::service::ServicePortSpec;
        use crate::table::Change;
        let mut table = ServiceTable::new();
        let svc = Service::builder("ns1", "svc1")
            .cluster_ip("172.30.0.41".parse().unwrap())
            .port(ServicePortSpec::tcp(80))
            .build()
            .unwrap();
        let slice = |weights: [i64; 2]| {
            EndpointSlice::builder("ns1", "s", "svc1", AddressType::IPv4)
                .port(SlicePortSpec::tcp(80))
                .endpoint(EndpointSpec::new("10.0.0.1").weight(weights[0]))
                .endpoint(EndpointSpec::new("10.0.0.2").weight(weights[1]))
                .build()
                .unwrap()
        };
        table
            .apply_batch([
                Change::UpsertService(svc),
                Change::UpsertSlice(slice([0, 1])),
            ])
            .unwrap();
        let opts = RenderOptions::default();
        let plan = Planner::compile(&table, &opts.node);
        let (plans, _) = port_plans(&table, &plan, &opts);
        assert_eq!(plans[0].outcome, Outcome::Forward);
        let addrs: Vec<String> = plans[0].endpoints.iter().map(|e| e.addr_string()).collect();
        assert_eq!(addrs, ["10.0.0.2:80"]);
        table.apply(Change::UpsertSlice(slice([0, 0]))).unwrap();
        let plan = Planner::compile(&table, &opts.node);
        let (plans, _) = port_plans(&table, &plan, &opts);
        assert_eq!(plans[0].outcome, Outcome::Reject);
    }

    #[test]
    fn default_mark_is_go_formatted() {
        assert_eq!(RenderOptions::default().masquerade_mark, "0x00004000");
        assert!(RenderOptions::default().random_fully);
        assert_eq!(masquerade_mark(0).unwrap(), "0x00000001");
        assert_eq!(masquerade_mark(31).unwrap(), "0x80000000");
        assert_eq!(
            masquerade_mark(DEFAULT_MASQUERADE_BIT).unwrap(),
            RenderOptions::default().masquerade_mark
        );
    }

    #[test]
    fn a_masquerade_bit_above_31_is_an_error_naming_it() {
        for bit in [32u8, 33, 200, u8::MAX] {
            let e = masquerade_mark(bit).unwrap_err();
            assert_eq!(e.field(), "masqueradeBit");
            assert_eq!(
                e.to_string(),
                format!("masqueradeBit: invalid value \"{bit}\": must be in 0..=31")
            );
        }
    }
}
