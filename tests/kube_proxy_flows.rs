//! kube-proxy's table-driven packet-flow tests (`pkg/proxy/iptables/
//! proxier_test.go`, `pkg/proxy/nftables/proxier_test.go`: `runPacketFlowTests`)
//! ported: the same services, endpoints and flows, and the same expected
//! outcome for each flow (the set of endpoints a new connection may reach,
//! whether it is masqueraded, or DROP / REJECT / not captured), run through
//! the `route` of every dataplane (iptables, IPVS, nftables and the eBPF
//! model).
//!
//! The fixtures follow kube-proxy's test constants: the node is
//! `test-hostname` with IPs 192.168.0.2, 192.168.1.2 and 192.168.99.11 (the
//! last is also an external IP in some tests, as kube-proxy's fake node
//! has it as a local address), pods are in 10.0.0.0/8 (the local-traffic
//! detector), the external client is 203.0.113.2 and the client outside
//! the source ranges 203.0.113.130. kube-proxy's tests use node ports such
//! as 3001, outside the API's default range, so the services here are built
//! with the range 1-65535 (kube-proxy does not check the range).
//!
//! Every flow also runs through the rendered rules: `render::iptables`
//! output through a small iptables tracer (`tests/common/iptables_trace.rs`)
//! and `render::nft` output through an nftables tracer
//! (`tests/common/nft_trace.rs`), as kube-proxy's tests trace theirs
//! (`tracePacket`); each is held to the iptables / nftables expectation.
//! `TRACE_DUMP="<test name>"` (as printed, e.g. `NoEndpointsReject`)
//! prints the rules a test's flows are traced through.
//!
//! Each test prints its pass count per dataplane and tracer (`--nocapture` shows
//! them) and fails if any flow fails.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use svclb::render::{Cidr, IpFamily, RenderOptions};
use svclb::*;

#[path = "common/iptables_trace.rs"]
mod iptables_trace;
#[path = "common/nft_trace.rs"]
mod nft_trace;

use iptables_trace::{Packet, Trace};

const HOST: &str = "test-hostname";
const NODE_IP: &str = "192.168.0.2";
const NODE_IP_ALT: &str = "192.168.1.2";
const EXTERNAL_IP: &str = "192.168.99.11";
const EXTERNAL_CLIENT: &str = "203.0.113.2";
const EXTERNAL_CLIENT_BLOCKED: &str = "203.0.113.130";
const POD: &str = "10.0.0.2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

/// What one flow must do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// New connections reach exactly these `IP:port`s, masqueraded or not.
    To(BTreeSet<SocketAddr>, bool),
    Drop,
    Reject,
    /// Not captured by any service rule.
    Ignored,
}

fn to(eps: &str, masq: bool) -> Expect {
    Expect::To(eps.split(", ").map(|e| e.parse().unwrap()).collect(), masq)
}

struct FlowTest {
    name: String,
    src: IpAddr,
    dst: SocketAddr,
    expect: Expect,
    /// Dataplanes that must do something else (by mode name).
    except: Vec<(&'static str, Expect)>,
}

fn flow(name: &str, src: &str, dst: &str, port: u16, expect: Expect) -> FlowTest {
    FlowTest {
        name: name.into(),
        src: ip(src),
        dst: SocketAddr::new(ip(dst), port),
        expect,
        except: Vec::new(),
    }
}

/// A flow to a loopback node port: kube-proxy's IPVS mode leaves loopback
/// out of its node addresses (`isValidForSet`) and its nftables mode does
/// not support localhost node ports (`ip daddr != 127.0.0.0/8`), so only
/// the iptables mode (and the eBPF model) captures it.
fn iptables_only(mut t: FlowTest) -> FlowTest {
    t.except = vec![("ipvs", Expect::Ignored), ("nftables", Expect::Ignored)];
    t
}

/// A flow kube-proxy's IPVS mode treats otherwise than the iptables and
/// nftables modes whose tests these are (kubernetes
/// `pkg/proxy/ipvs/proxier.go`): it has no short-circuit of this node's
/// pods and of the node to an `externalTrafficPolicy: Local` service's
/// external destinations (their virtual servers list the local endpoints
/// for every source), marks none of that traffic for masquerade
/// (`KUBE-NODE-PORT-LOCAL-*` and `KUBE-LOAD-BALANCER-LOCAL` RETURN,
/// `KUBE-EXTERNAL-IP-LOCAL` has no masquerade rule), lists the cluster
/// endpoints on a Local virtual server with no local endpoint
/// (`syncEndpoint`, kubernetes PR 97081), and its source-range firewall
/// (`KUBE-PROXY-FIREWALL` on `KUBE-LOAD-BALANCER-FW`) drops whatever the
/// endpoints. `tests/ipvs_surface.rs` shows each on its own.
fn in_ipvs(mut t: FlowTest, expect: Expect) -> FlowTest {
    t.except.push(("ipvs", expect));
    t
}

/// The node and its addresses as kube-proxy's fake proxier has them.
#[derive(Clone)]
struct Node {
    node_ips: Vec<IpAddr>,
    nodeport_addresses: Vec<Cidr>,
    cluster_cidrs: Vec<Cidr>,
    masquerade_all: bool,
}

impl Node {
    fn v4() -> Node {
        Node {
            node_ips: vec![
                ip(NODE_IP),
                ip(NODE_IP_ALT),
                ip(EXTERNAL_IP),
                ip("127.0.0.1"),
            ],
            nodeport_addresses: Vec::new(),
            cluster_cidrs: vec![cidr("10.0.0.0/8")],
            masquerade_all: false,
        }
    }

    fn config(&self, seed: u64) -> DataplaneConfig {
        let mut c = DataplaneConfig::with_seed(seed).node(NodeTopology::new(HOST, "zone-a"));
        c.node_ips = self.node_ips.clone();
        c.nodeport_addresses = self.nodeport_addresses.clone();
        c.cluster_cidrs = self.cluster_cidrs.clone();
        c.masquerade_all = self.masquerade_all;
        c
    }
}

fn dataplanes(node: &Node) -> Vec<(&'static str, Box<dyn Dataplane>)> {
    vec![
        (
            "iptables",
            Box::new(IptablesDataplane::new(node.config(1))) as Box<dyn Dataplane>,
        ),
        ("ipvs", Box::new(IpvsDataplane::new(node.config(2)))),
        ("nftables", Box::new(NftablesDataplane::new(node.config(3)))),
        (
            "ebpf-model",
            Box::new(IpvsDataplane::ebpf_model(node.config(4))),
        ),
    ]
}

/// The expectation of `t` for the mode `mode`.
fn expect_for<'a>(t: &'a FlowTest, mode: &str) -> &'a Expect {
    t.except
        .iter()
        .find(|(m, _)| *m == mode)
        .map_or(&t.expect, |(_, e)| e)
}

/// What `dp` does with new connections of `t` (64 source ports).
fn observe(dp: &dyn Dataplane, t: &FlowTest) -> Result<Expect, String> {
    let mut reached = BTreeSet::new();
    let mut masq = BTreeSet::new();
    let mut other = BTreeSet::new();
    for sport in 40_000..40_064u16 {
        let f = Flow::tcp(SocketAddr::new(t.src, sport), t.dst);
        match dp.route(&f, Instant::ZERO) {
            Verdict::Forward(fw) => {
                reached.insert(fw.backend);
                masq.insert(fw.masquerade);
            }
            v => {
                other.insert(v.kind_str());
            }
        }
    }
    match (reached.is_empty(), other.len(), masq.len()) {
        (false, 0, 1) => Ok(Expect::To(reached, masq.into_iter().next().unwrap())),
        (true, 1, _) => Ok(match other.into_iter().next().unwrap() {
            "DROP" => Expect::Drop,
            "REJECT" => Expect::Reject,
            _ => Expect::Ignored,
        }),
        _ => Err(format!(
            "mixed outcomes: reached {reached:?} masquerade {masq:?} others {other:?}"
        )),
    }
}

/// Runs every flow through every dataplane; panics listing the failures.
fn run(test: &str, node: &Node, table: &ServiceTable, flows: &[FlowTest]) {
    let mut failures = Vec::new();
    let mut counts = Vec::new();
    for (mode, dp) in dataplanes(node) {
        dp.sync(table, &table.full_change_set(), Instant::ZERO);
        let mut pass = 0;
        for t in flows {
            let expect = expect_for(t, mode);
            match observe(&*dp, t) {
                Ok(got) if got == *expect => pass += 1,
                Ok(got) => failures.push(format!(
                    "{test} [{mode}] {}: {} -> {}: expected {:?}, got {got:?}",
                    t.name, t.src, t.dst, expect
                )),
                Err(e) => failures.push(format!("{test} [{mode}] {}: {e}", t.name)),
            }
        }
        counts.push(format!("{mode} {pass}/{}", flows.len()));
    }
    trace_rules(test, node, table, flows, &mut failures, &mut counts);
    println!("{test}: {}", counts.join(", "));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The render options of `node`'s kube-proxy for `family`, built-in
/// chain jumps included (the tracers start at `PREROUTING` /
/// `nat-prerouting`).
fn render_options(node: &Node, family: IpFamily) -> RenderOptions {
    let mut o = RenderOptions::default()
        .node(NodeTopology::new(HOST, "zone-a"))
        .family(family)
        .builtin_jumps(true);
    o.cluster_cidrs = node.cluster_cidrs.clone();
    o.masquerade_all = node.masquerade_all;
    o.node_ips = node.node_ips.clone();
    o.nodeport_addresses = node.nodeport_addresses.clone();
    // The node's loopback IP stands for --iptables-localhost-nodeports.
    o.localhost_nodeports = node.node_ips.iter().any(|i| i.is_ipv4() && i.is_loopback());
    o
}

/// A trace as an outcome: endpoints (with the masquerade), a lone DROP or
/// REJECT, or nothing (a filter ACCEPT alone, as for a health-check node
/// port, is not a service's capture either).
fn traced(t: &Trace) -> Result<Expect, String> {
    let verdicts: Vec<&str> = t
        .verdicts
        .iter()
        .map(String::as_str)
        .filter(|v| *v != "ACCEPT")
        .collect();
    match (t.endpoints.is_empty(), verdicts.as_slice()) {
        (false, []) => Ok(Expect::To(t.endpoints.clone(), t.masquerade)),
        (true, []) => Ok(Expect::Ignored),
        (true, ["DROP"]) => Ok(Expect::Drop),
        (true, ["REJECT"]) => Ok(Expect::Reject),
        _ => Err(format!("mixed outcomes: {t:?}")),
    }
}

/// Runs every flow through the iptables rendering (iptables tracer) and
/// the nftables rendering (nft tracer), each held to its mode's
/// expectation.
fn trace_rules(
    test: &str,
    node: &Node,
    table: &ServiceTable,
    flows: &[FlowTest],
    failures: &mut Vec<String>,
    counts: &mut Vec<String>,
) {
    let family = if flows[0].dst.is_ipv6() {
        IpFamily::V6
    } else {
        IpFamily::V4
    };
    let opts = render_options(node, family);
    if std::env::var("TRACE_DUMP").as_deref() == Ok(test) {
        println!("{}", render::iptables::render(table, &opts));
        println!("{}", render::nft::render(table, &opts));
    }
    let ipt = iptables_trace::Rules::parse(&render::iptables::render(table, &opts));
    let nft = nft_trace::Table::parse(&render::nft::render(table, &opts));
    for (tracer, mode) in [("iptables-trace", "iptables"), ("nft-trace", "nftables")] {
        let mut pass = 0;
        for t in flows {
            let expect = expect_for(t, mode);
            let p = Packet {
                src: t.src,
                dst: t.dst,
                proto: "tcp",
            };
            let trace = if mode == "iptables" {
                ipt.trace(&p, &node.node_ips)
            } else {
                nft.trace(&p, &node.node_ips)
            };
            match traced(&trace) {
                Ok(got) if got == *expect => pass += 1,
                Ok(got) => failures.push(format!(
                    "{test} [{tracer}] {}: {} -> {}: expected {:?}, got {got:?}",
                    t.name, t.src, t.dst, expect
                )),
                Err(e) => failures.push(format!("{test} [{tracer}] {}: {e}", t.name)),
            }
        }
        counts.push(format!("{tracer} {pass}/{}", flows.len()));
    }
}

fn table(changes: Vec<Change>) -> ServiceTable {
    let mut t = ServiceTable::new();
    t.apply_batch(changes).unwrap();
    t
}

/// kube-proxy's `makeTestService` with one TCP port `p80` (80).
fn lb_service(ns: &str, name: &str, cluster_ip: &str, node_port: Option<i64>) -> ServiceBuilder {
    let mut port = ServicePortSpec::tcp(80).name("p80");
    if let Some(np) = node_port {
        port = port.node_port(np);
    }
    Service::builder(ns, name)
        .cluster_ip(ip(cluster_ip))
        .service_type(ServiceType::LoadBalancer)
        .node_port_range(1..=65_535)
        .port(port)
}

/// An endpoint on `node` (`None`: no nodeName).
fn ep(addr: &str, node: Option<&str>) -> EndpointSpec {
    let e = EndpointSpec::new(addr);
    match node {
        Some(n) => e.node(n),
        None => e,
    }
}

fn slice(ns: &str, svc: &str, eps: Vec<EndpointSpec>) -> Change {
    let family = if eps.first().is_some_and(|e| e.addresses[0].contains(':')) {
        AddressType::IPv6
    } else {
        AddressType::IPv4
    };
    Change::UpsertSlice(
        EndpointSlice::builder(ns, format!("{svc}-1"), svc, family)
            .port(SlicePortSpec::tcp(80).name("p80"))
            .endpoints(eps)
            .build()
            .unwrap(),
    )
}

/// TestLoadBalancer's service: source ranges on the LB IPs, one endpoint.
fn load_balancer_table() -> ServiceTable {
    let svc = lb_service("ns1", "svc1", "172.30.0.41", Some(3001))
        .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
        .load_balancer_ingress(ip("5.6.7.8"), IpMode::VIP)
        .load_balancer_source_range(cidr("192.168.0.0/24"))
        .load_balancer_source_range(cidr("203.0.113.0/25"))
        .build()
        .unwrap();
    table(vec![
        Change::UpsertService(svc),
        slice("ns1", "svc1", vec![ep("10.180.0.1", None)]),
    ])
}

#[test]
fn load_balancer() {
    // TestLoadBalancer: source ranges on the LB IPs, not on the node port.
    let t = load_balancer_table();
    let e = "10.180.0.1:80";
    let flows = [
        flow("pod to cluster IP", POD, "172.30.0.41", 80, to(e, false)),
        flow(
            "external to nodePort",
            EXTERNAL_CLIENT,
            NODE_IP,
            3001,
            to(e, true),
        ),
        flow(
            "nodePort bypasses LoadBalancerSourceRanges",
            EXTERNAL_CLIENT_BLOCKED,
            NODE_IP,
            3001,
            to(e, true),
        ),
        flow(
            "accepted external to LB1",
            EXTERNAL_CLIENT,
            "1.2.3.4",
            80,
            to(e, true),
        ),
        flow(
            "accepted external to LB2",
            EXTERNAL_CLIENT,
            "5.6.7.8",
            80,
            to(e, true),
        ),
        flow(
            "blocked external to LB1",
            EXTERNAL_CLIENT_BLOCKED,
            "1.2.3.4",
            80,
            Expect::Drop,
        ),
        flow(
            "blocked external to LB2",
            EXTERNAL_CLIENT_BLOCKED,
            "5.6.7.8",
            80,
            Expect::Drop,
        ),
        flow(
            "pod to LB1 (blocked by LoadBalancerSourceRanges)",
            POD,
            "1.2.3.4",
            80,
            Expect::Drop,
        ),
        flow(
            "pod to LB2 (blocked by LoadBalancerSourceRanges)",
            POD,
            "5.6.7.8",
            80,
            Expect::Drop,
        ),
        flow(
            "node to LB1 (allowed by LoadBalancerSourceRanges)",
            NODE_IP,
            "1.2.3.4",
            80,
            to(e, true),
        ),
        flow(
            "node to LB2 (allowed by LoadBalancerSourceRanges)",
            NODE_IP,
            "5.6.7.8",
            80,
            to(e, true),
        ),
        flow(
            "same node to LB1, SNATted to LB1 (implicitly allowed)",
            "1.2.3.4",
            "1.2.3.4",
            80,
            to(e, true),
        ),
        flow(
            "same node to LB2, SNATted to LB2 (implicitly allowed)",
            "5.6.7.8",
            "5.6.7.8",
            80,
            to(e, true),
        ),
    ];
    run("LoadBalancer", &Node::v4(), &t, &flows);
}

/// `text` without the lines `drop` picks.
fn without(text: &str, drop: impl Fn(&str) -> bool) -> String {
    let out: String = text
        .lines()
        .filter(|l| !drop(l))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(out.lines().count(), text.lines().count(), "nothing dropped");
    out
}

/// The tracers can fail: TestLoadBalancer's rules, each broken in one
/// place in a copy of the text, trace differently.
#[test]
fn tracers_see_a_broken_rule() {
    let t = load_balancer_table();
    let node = Node::v4();
    let opts = render_options(&node, IpFamily::V4);
    let e = "10.180.0.1:80";
    let external = Packet {
        src: ip(EXTERNAL_CLIENT),
        dst: SocketAddr::new(ip(NODE_IP), 3001),
        proto: "tcp",
    };
    let blocked = Packet {
        src: ip(EXTERNAL_CLIENT_BLOCKED),
        dst: SocketAddr::new(ip("1.2.3.4"), 80),
        proto: "tcp",
    };
    let ipt = |text: &str, p: &Packet| {
        traced(&iptables_trace::Rules::parse(text).trace(p, &node.node_ips))
    };
    let nft =
        |text: &str, p: &Packet| traced(&nft_trace::Table::parse(text).trace(p, &node.node_ips));

    let text = render::iptables::render(&t, &opts);
    assert_eq!(ipt(&text, &external), Ok(to(e, true)));
    assert_eq!(ipt(&text, &blocked), Ok(Expect::Drop));
    // KUBE-MARK-MASQ dropped from the KUBE-EXT- chain: not masqueraded.
    let ext = render::iptables::external_chain_name("ns1/svc1:p80", Protocol::Tcp);
    let no_masq = without(&text, |l| {
        l.starts_with(&format!("-A {ext} ")) && l.ends_with("-j KUBE-MARK-MASQ")
    });
    assert_eq!(ipt(&no_masq, &external), Ok(to(e, false)));
    // Another DNAT destination: another endpoint.
    let moved = text.replace(
        "--to-destination 10.180.0.1:80",
        "--to-destination 10.180.0.1:81",
    );
    assert_eq!(ipt(&moved, &external), Ok(to("10.180.0.1:81", true)));
    // KUBE-PROXY-FIREWALL's DROP gone: the blocked client is not captured.
    let open = without(&text, |l| {
        l.starts_with("-A KUBE-PROXY-FIREWALL ") && l.ends_with("-j DROP")
    });
    assert_eq!(ipt(&open, &blocked), Ok(Expect::Ignored));

    let text = render::nft::render(&t, &opts);
    assert_eq!(nft(&text, &external), Ok(to(e, true)));
    assert_eq!(nft(&text, &blocked), Ok(Expect::Drop));
    let no_masq = without(&text, |l| {
        l.starts_with("add rule ip kube-proxy external-")
            && l.ends_with(" jump mark-for-masquerade")
    });
    assert_eq!(nft(&no_masq, &external), Ok(to(e, false)));
    let moved = text.replace("dnat to 10.180.0.1:80", "dnat to 10.180.0.1:81");
    assert_eq!(nft(&moved, &external), Ok(to("10.180.0.1:81", true)));
    let open = without(&text, |l| {
        l.starts_with("add rule ip kube-proxy firewall-") && l.ends_with(" drop")
    });
    assert_eq!(nft(&open, &blocked), Ok(to(e, true)));
}

#[test]
fn node_ports() {
    // TestNodePorts: localhost node ports, --nodeport-addresses, IPv6.
    struct Case {
        name: &'static str,
        v6: bool,
        localhost: bool,
        nodeport_addresses: &'static [&'static str],
        allow_alt: bool,
    }
    let cases = [
        Case {
            name: "ipv4, localhost-nodeports enabled",
            v6: false,
            localhost: true,
            nodeport_addresses: &[],
            allow_alt: true,
        },
        Case {
            name: "ipv4, localhost-nodeports disabled",
            v6: false,
            localhost: false,
            nodeport_addresses: &[],
            allow_alt: true,
        },
        Case {
            name: "ipv4, localhost-nodeports disabled, localhost in nodeport-addresses",
            v6: false,
            localhost: false,
            nodeport_addresses: &["192.168.0.0/24", "127.0.0.1/32"],
            allow_alt: false,
        },
        Case {
            name: "ipv4, localhost-nodeports enabled, multiple nodeport-addresses",
            v6: false,
            localhost: true,
            nodeport_addresses: &["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"],
            allow_alt: true,
        },
        Case {
            name: "ipv6, localhost-nodeports enabled",
            v6: true,
            localhost: true,
            nodeport_addresses: &[],
            allow_alt: true,
        },
        Case {
            name: "ipv6, localhost-nodeports disabled",
            v6: true,
            localhost: false,
            nodeport_addresses: &[],
            allow_alt: true,
        },
        Case {
            name: "ipv6, localhost-nodeports disabled, multiple nodeport-addresses",
            v6: true,
            localhost: false,
            nodeport_addresses: &["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"],
            allow_alt: false,
        },
    ];
    for c in cases {
        let (svc_ip, ep1, ep2, pod, node_ip, alt, client, lo, pods) = if c.v6 {
            (
                "fd00:172:30::41",
                "fd00:10:180::1",
                "fd00:10:180::2",
                "fd00:10::2",
                "2001:db8::1",
                "2001:db8:1::2",
                "2600:5200::1",
                "::1",
                "fd00:10::/64",
            )
        } else {
            (
                "172.30.0.41",
                "10.180.0.1",
                "10.180.2.1",
                POD,
                NODE_IP,
                NODE_IP_ALT,
                EXTERNAL_CLIENT,
                "127.0.0.1",
                "10.0.0.0/8",
            )
        };
        let svc = Service::builder("ns1", "svc1")
            .cluster_ip(ip(svc_ip))
            .service_type(ServiceType::NodePort)
            .node_port_range(1..=65_535)
            .port(ServicePortSpec::tcp(80).name("p80").node_port(3001))
            .build()
            .unwrap();
        let t = table(vec![
            Change::UpsertService(svc),
            slice("ns1", "svc1", vec![ep(ep1, None), ep(ep2, Some(HOST))]),
        ]);
        let mut node_ips = vec![ip(node_ip), ip(alt)];
        // localhost node ports exist in IPv4 only (route_localnet).
        if c.localhost && !c.v6 {
            node_ips.push(ip(lo));
        }
        let node = Node {
            node_ips,
            nodeport_addresses: c.nodeport_addresses.iter().map(|s| cidr(s)).collect(),
            cluster_cidrs: vec![cidr(pods)],
            masquerade_all: false,
        };
        let both = if c.v6 {
            format!("[{ep1}]:80, [{ep2}]:80")
        } else {
            format!("{ep1}:80, {ep2}:80")
        };
        let mut flows = vec![
            flow("pod to cluster IP", pod, svc_ip, 80, to(&both, false)),
            flow(
                "external to nodePort",
                client,
                node_ip,
                3001,
                to(&both, true),
            ),
            flow("node to nodePort", node_ip, node_ip, 3001, to(&both, true)),
        ];
        // kube-proxy accepts localhost node ports when they are enabled and
        // --nodeport-addresses holds 127.0.0.1 (or is empty):
        // `ContainsIPv4Loopback`.
        let loopback_allowed = node.nodeport_addresses.is_empty()
            || node
                .nodeport_addresses
                .iter()
                .any(|c| c.contains(ip("127.0.0.1")));
        if c.localhost && !c.v6 && loopback_allowed {
            flows.push(iptables_only(flow(
                "localhost to nodePort gets masqueraded",
                lo,
                lo,
                3001,
                to(&both, true),
            )));
        } else {
            flows.push(flow(
                "localhost to nodePort is ignored",
                lo,
                lo,
                3001,
                Expect::Ignored,
            ));
        }
        if c.allow_alt {
            flows.push(flow(
                "external to nodePort on secondary IP",
                client,
                alt,
                3001,
                to(&both, true),
            ));
        } else {
            flows.push(flow(
                "secondary nodeIP ignores NodePorts",
                client,
                alt,
                3001,
                Expect::Ignored,
            ));
        }
        run(&format!("NodePorts ({})", c.name), &node, &t, &flows);
    }
}

/// The service of TestExternalTrafficPolicyLocal / Cluster: a cluster IP,
/// an external IP, an LB IP and a node port, a remote and a local endpoint.
fn etp_table(policy: TrafficPolicy) -> ServiceTable {
    let mut b = lb_service("ns1", "svc1", "172.30.0.41", Some(3001))
        .external_ip(ip(EXTERNAL_IP))
        .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
        .external_traffic_policy(policy);
    if policy == TrafficPolicy::Local {
        b = b.health_check_node_port(30000);
    }
    table(vec![
        Change::UpsertService(b.build().unwrap()),
        slice(
            "ns1",
            "svc1",
            vec![ep("10.180.0.1", None), ep("10.180.2.1", Some(HOST))],
        ),
    ])
}

#[test]
fn external_traffic_policy_local() {
    let t = etp_table(TrafficPolicy::Local);
    let both = "10.180.0.1:80, 10.180.2.1:80";
    let local = "10.180.2.1:80";
    let flows = [
        flow(
            "pod to cluster IP hits both endpoints, unmasqueraded",
            POD,
            "172.30.0.41",
            80,
            to(both, false),
        ),
        in_ipvs(
            flow(
                "pod to external IP hits both endpoints, unmasqueraded",
                POD,
                EXTERNAL_IP,
                80,
                to(both, false),
            ),
            to(local, false),
        ),
        flow(
            "external to external IP hits only local endpoint, unmasqueraded",
            EXTERNAL_CLIENT,
            EXTERNAL_IP,
            80,
            to(local, false),
        ),
        in_ipvs(
            flow(
                "pod to LB IP hits only both endpoints, unmasqueraded",
                POD,
                "1.2.3.4",
                80,
                to(both, false),
            ),
            to(local, false),
        ),
        flow(
            "external to LB IP hits only local endpoint, unmasqueraded",
            EXTERNAL_CLIENT,
            "1.2.3.4",
            80,
            to(local, false),
        ),
        in_ipvs(
            flow(
                "pod to NodePort hits both endpoints, unmasqueraded",
                POD,
                NODE_IP,
                3001,
                to(both, false),
            ),
            to(local, false),
        ),
        flow(
            "external to NodePort hits only local endpoint, unmasqueraded",
            EXTERNAL_CLIENT,
            NODE_IP,
            3001,
            to(local, false),
        ),
    ];
    run("ExternalTrafficPolicy Local", &Node::v4(), &t, &flows);
}

#[test]
fn external_traffic_policy_cluster() {
    let t = etp_table(TrafficPolicy::Cluster);
    let both = "10.180.0.1:80, 10.180.2.1:80";
    let flows = [
        flow(
            "pod to cluster IP hits both endpoints, unmasqueraded",
            POD,
            "172.30.0.41",
            80,
            to(both, false),
        ),
        flow(
            "pod to external IP hits both endpoints, masqueraded",
            POD,
            EXTERNAL_IP,
            80,
            to(both, true),
        ),
        flow(
            "external to external IP hits both endpoints, masqueraded",
            EXTERNAL_CLIENT,
            EXTERNAL_IP,
            80,
            to(both, true),
        ),
        flow(
            "pod to LB IP hits both endpoints, masqueraded",
            POD,
            "1.2.3.4",
            80,
            to(both, true),
        ),
        flow(
            "external to LB IP hits both endpoints, masqueraded",
            EXTERNAL_CLIENT,
            "1.2.3.4",
            80,
            to(both, true),
        ),
        flow(
            "pod to NodePort hits both endpoints, masqueraded",
            POD,
            NODE_IP,
            3001,
            to(both, true),
        ),
        flow(
            "external to NodePort hits both endpoints, masqueraded",
            EXTERNAL_CLIENT,
            NODE_IP,
            3001,
            to(both, true),
        ),
    ];
    run("ExternalTrafficPolicy Cluster", &Node::v4(), &t, &flows);
}

#[test]
fn no_endpoints_reject() {
    // A service with no endpoints rejects on every destination, and the
    // source ranges (whose firewall chain kube-proxy writes only with
    // endpoints) do not turn that into a drop.
    let svc = lb_service("ns1", "svc1", "172.30.0.41", Some(3001))
        .external_ip(ip(EXTERNAL_IP))
        .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
        .load_balancer_source_range(cidr("203.0.113.0/25"))
        .external_traffic_policy(TrafficPolicy::Local)
        .build()
        .unwrap();
    let t = table(vec![Change::UpsertService(svc)]);
    let flows = [
        flow("pod to cluster IP", POD, "172.30.0.41", 80, Expect::Reject),
        flow(
            "external to external IP",
            EXTERNAL_CLIENT,
            EXTERNAL_IP,
            80,
            Expect::Reject,
        ),
        flow(
            "external to LB IP",
            EXTERNAL_CLIENT,
            "1.2.3.4",
            80,
            Expect::Reject,
        ),
        in_ipvs(
            flow(
                "blocked external to LB IP",
                EXTERNAL_CLIENT_BLOCKED,
                "1.2.3.4",
                80,
                Expect::Reject,
            ),
            Expect::Drop,
        ),
        flow(
            "external to NodePort",
            EXTERNAL_CLIENT,
            NODE_IP,
            3001,
            Expect::Reject,
        ),
        flow("pod to NodePort", POD, NODE_IP, 3001, Expect::Reject),
    ];
    run("NoEndpointsReject", &Node::v4(), &t, &flows);
}

#[test]
fn bad_ips() {
    // TestBadIPs: addresses with leading zeros read as decimal, and a
    // repeated address kept once, as kube-proxy's ParseIPSloppy does.
    let text = "kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.041
  externalIPs: [192.168.099.011, 192.168.99.11]
  ports: [{name: p80, port: 80}]
status: {loadBalancer: {ingress: [{ip: 1.2.3.004}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc1-1, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
ports: [{name: p80, port: 80}]
endpoints:
- addresses: [10.180.00.001]
- addresses: [10.180.0.1]
";
    let batch = svclb::k8s::manifest::Manifests::parse_str(text, None)
        .unwrap()
        .changes()
        .unwrap();
    let t = table(batch.changes);
    let e = "10.180.0.1:80";
    let flows = [
        flow("pod to cluster IP", POD, "172.30.0.41", 80, to(e, false)),
        flow(
            "external to external IP",
            EXTERNAL_CLIENT,
            "192.168.99.11",
            80,
            to(e, true),
        ),
        flow(
            "external to LB IP",
            EXTERNAL_CLIENT,
            "1.2.3.4",
            80,
            to(e, true),
        ),
    ];
    run("BadIPs", &Node::v4(), &t, &flows);
}

#[test]
fn ip_mode_proxy_is_not_captured() {
    let svc = lb_service("ns1", "svc1", "172.30.0.41", None)
        .load_balancer_ingress(ip("1.2.3.4"), IpMode::Proxy)
        .load_balancer_ingress(ip("5.6.7.8"), IpMode::VIP)
        .build()
        .unwrap();
    let t = table(vec![
        Change::UpsertService(svc),
        slice("ns1", "svc1", vec![ep("10.180.0.1", None)]),
    ]);
    let flows = [
        flow(
            "external to ipMode Proxy LB IP",
            EXTERNAL_CLIENT,
            "1.2.3.4",
            80,
            Expect::Ignored,
        ),
        flow(
            "external to ipMode VIP LB IP",
            EXTERNAL_CLIENT,
            "5.6.7.8",
            80,
            to("10.180.0.1:80", true),
        ),
    ];
    run("ipMode", &Node::v4(), &t, &flows);
}

#[test]
fn hairpin_is_masqueraded() {
    let svc = Service::builder("ns1", "svc1")
        .cluster_ip(ip("172.30.0.41"))
        .port(ServicePortSpec::tcp(80).name("p80"))
        .build()
        .unwrap();
    let t = table(vec![
        Change::UpsertService(svc),
        slice("ns1", "svc1", vec![ep("10.180.0.1", Some(HOST))]),
    ]);
    let flows = [
        flow(
            "pod to its own service",
            "10.180.0.1",
            "172.30.0.41",
            80,
            to("10.180.0.1:80", true),
        ),
        flow(
            "another pod",
            POD,
            "172.30.0.41",
            80,
            to("10.180.0.1:80", false),
        ),
    ];
    run("hairpin", &Node::v4(), &t, &flows);
}

/// TestInternalExternalMasquerade's three services: svc1 (both policies
/// Cluster), svc2 (eTP Local), svc3 (eTP and iTP Local), each with a local
/// and a remote endpoint.
fn masquerade_table() -> ServiceTable {
    let mut changes = Vec::new();
    for (i, (etp, itp)) in [
        (TrafficPolicy::Cluster, TrafficPolicy::Cluster),
        (TrafficPolicy::Local, TrafficPolicy::Cluster),
        (TrafficPolicy::Local, TrafficPolicy::Local),
    ]
    .into_iter()
    .enumerate()
    {
        let n = i + 1;
        let lb = ["1.2.3.4", "5.6.7.8", "9.10.11.12"][i];
        let mut b = lb_service(
            &format!("ns{n}"),
            &format!("svc{n}"),
            &format!("172.30.0.4{n}"),
            Some(3000 + n as i64),
        )
        .load_balancer_ingress(ip(lb), IpMode::VIP)
        .external_traffic_policy(etp)
        .internal_traffic_policy(itp);
        if etp == TrafficPolicy::Local {
            b = b.health_check_node_port(30000);
        }
        changes.push(Change::UpsertService(b.build().unwrap()));
        changes.push(slice(
            &format!("ns{n}"),
            &format!("svc{n}"),
            vec![
                ep(&format!("10.180.0.{n}"), Some(HOST)),
                ep(&format!("10.180.1.{n}"), Some("remote")),
            ],
        ));
    }
    table(changes)
}

/// The 30 flows of TestInternalExternalMasquerade for one variant.
fn masquerade_flows(masquerade_all: bool, detector: bool) -> Vec<FlowTest> {
    let mut flows = Vec::new();
    for n in 1..=3u16 {
        let both = format!("10.180.0.{n}:80, 10.180.1.{n}:80");
        let local = format!("10.180.0.{n}:80");
        let cip = format!("172.30.0.4{n}");
        let lb = ["1.2.3.4", "5.6.7.8", "9.10.11.12"][usize::from(n - 1)];
        let np = 3000 + n;
        let etp_local = n >= 2;
        let itp_local = n == 3;
        let suffix = match n {
            1 => "",
            2 => " with eTP:Local",
            _ => " with iTP:Local",
        };
        // Cluster IP: iTP decides the endpoints; the masquerade rule
        // (`! -s clusterCIDR`, or all with --masquerade-all) needs a
        // detector or --masquerade-all.
        let cluster_eps = if itp_local { &local } else { &both };
        let cip_masq = |from_pod: bool| masquerade_all || (detector && !from_pod);
        // External destinations: pods short-circuit to the Cluster policy
        // (only with a detector); the node too; others follow eTP.
        let pod_ext = if etp_local && !detector {
            &local
        } else {
            &both
        };
        let ext_masq_pod = !etp_local;
        let ext_eps = if etp_local { &local } else { &both };
        let name = |s: &str| format!("{s}{suffix}");
        // The IPVS mode: pods and the node reach an external Local
        // destination's local endpoint, unmasqueraded, like anyone else.
        let ipvs_ext = |t: FlowTest| {
            if etp_local {
                in_ipvs(t, to(&local, false))
            } else {
                t
            }
        };
        flows.push(flow(
            &name("pod to ClusterIP"),
            POD,
            &cip,
            80,
            to(cluster_eps, cip_masq(true)),
        ));
        flows.push(ipvs_ext(flow(
            &name("pod to NodePort"),
            POD,
            NODE_IP,
            np,
            to(pod_ext, ext_masq_pod),
        )));
        flows.push(ipvs_ext(flow(
            &name("pod to LB"),
            POD,
            lb,
            80,
            to(pod_ext, ext_masq_pod),
        )));
        flows.push(flow(
            &name("node to ClusterIP"),
            NODE_IP,
            &cip,
            80,
            to(cluster_eps, cip_masq(false)),
        ));
        flows.push(ipvs_ext(flow(
            &name("node to NodePort"),
            NODE_IP,
            NODE_IP,
            np,
            to(&both, true),
        )));
        flows.push(iptables_only(flow(
            &name("localhost to NodePort"),
            "127.0.0.1",
            "127.0.0.1",
            np,
            to(&both, true),
        )));
        flows.push(ipvs_ext(flow(
            &name("node to LB"),
            NODE_IP,
            lb,
            80,
            to(&both, true),
        )));
        flows.push(flow(
            &name("external to ClusterIP"),
            EXTERNAL_CLIENT,
            &cip,
            80,
            to(cluster_eps, cip_masq(false)),
        ));
        flows.push(flow(
            &name("external to NodePort"),
            EXTERNAL_CLIENT,
            NODE_IP,
            np,
            to(ext_eps, !etp_local),
        ));
        flows.push(flow(
            &name("external to LB"),
            EXTERNAL_CLIENT,
            lb,
            80,
            to(ext_eps, !etp_local),
        ));
    }
    flows
}

#[test]
fn internal_external_masquerade() {
    let t = masquerade_table();
    for (variant, masquerade_all, detector) in [
        ("base", false, true),
        ("masqueradeAll", true, true),
        ("no LocalTrafficDetector", false, false),
        ("masqueradeAll, no LocalTrafficDetector", true, false),
    ] {
        let mut node = Node::v4();
        node.masquerade_all = masquerade_all;
        if !detector {
            node.cluster_cidrs.clear();
        }
        let flows = masquerade_flows(masquerade_all, detector);
        assert_eq!(flows.len(), 30);
        run(
            &format!("InternalExternalMasquerade ({variant})"),
            &node,
            &t,
            &flows,
        );
    }
}

/// TestEndpointSliceWithTerminatingEndpoints (eTP Local and Cluster): which
/// endpoints a cluster-IP flow and an external LB flow reach as endpoints
/// become not ready, serving and terminating, on this node and elsewhere.
#[test]
fn terminating_endpoints() {
    // (name, endpoints (address, ready, serving, terminating, local),
    //  expected for the cluster IP, for the LB under eTP Local and Cluster)
    type Ep = (&'static str, bool, bool, bool, bool);
    let cases: [(&str, Vec<Ep>, &str, &str, &str); 8] = [
        (
            "ready endpoints exist",
            vec![
                ("10.0.1.1", true, true, false, true),
                ("10.0.1.2", true, true, false, true),
                ("10.0.1.3", false, true, true, true),
                ("10.0.1.4", false, false, true, true),
                ("10.0.1.5", true, true, false, false),
            ],
            "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
            "10.0.1.1:80, 10.0.1.2:80",
            "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
        ),
        (
            "only terminating endpoints exist",
            vec![
                ("10.0.1.1", false, true, true, true),
                ("10.0.1.2", false, true, true, true),
                ("10.0.1.3", false, false, true, true),
                ("10.0.1.4", false, true, true, false),
            ],
            "10.0.1.1:80, 10.0.1.2:80, 10.0.1.4:80",
            "10.0.1.1:80, 10.0.1.2:80",
            "10.0.1.1:80, 10.0.1.2:80, 10.0.1.4:80",
        ),
        (
            "terminating endpoints on remote node",
            vec![("10.0.1.5", false, true, true, false)],
            "10.0.1.5:80",
            "DROP",
            "10.0.1.5:80",
        ),
        (
            "no usable endpoints on any node",
            vec![
                ("10.0.1.1", false, false, true, true),
                ("10.0.1.5", false, false, true, false),
            ],
            "REJECT",
            "REJECT",
            "REJECT",
        ),
        (
            "ready endpoints on remote node only",
            vec![
                ("10.0.1.1", false, false, true, true),
                ("10.0.1.5", true, true, false, false),
            ],
            "10.0.1.5:80",
            "DROP",
            "10.0.1.5:80",
        ),
        (
            "a local endpoint serving and terminating, a remote one ready",
            vec![
                ("10.0.1.1", false, true, true, true),
                ("10.0.1.5", true, true, false, false),
            ],
            "10.0.1.5:80",
            "10.0.1.1:80",
            "10.0.1.5:80",
        ),
        (
            "a local endpoint ready, a remote one serving and terminating",
            vec![
                ("10.0.1.1", true, true, false, true),
                ("10.0.1.5", false, true, true, false),
            ],
            "10.0.1.1:80",
            "10.0.1.1:80",
            "10.0.1.1:80",
        ),
        (
            "not ready, not terminating endpoints only",
            vec![
                ("10.0.1.1", false, false, false, true),
                ("10.0.1.5", false, false, false, false),
            ],
            "REJECT",
            "REJECT",
            "REJECT",
        ),
    ];
    for policy in [TrafficPolicy::Local, TrafficPolicy::Cluster] {
        let mut flows = Vec::new();
        let mut changes = Vec::new();
        for (i, (name, eps, cluster, lb_local, lb_cluster)) in cases.iter().enumerate() {
            let svc_name = format!("svc{i}");
            let cip = format!("172.30.1.{}", i + 1);
            let lb = format!("1.2.3.{}", i + 1);
            changes.push(Change::UpsertService(
                lb_service("ns1", &svc_name, &cip, None)
                    .load_balancer_ingress(ip(&lb), IpMode::VIP)
                    .external_traffic_policy(policy)
                    .build()
                    .unwrap(),
            ));
            changes.push(slice(
                "ns1",
                &svc_name,
                eps.iter()
                    .map(|(a, ready, serving, terminating, local)| {
                        ep(a, Some(if *local { HOST } else { "host-1" }))
                            .ready(*ready)
                            .serving(*serving)
                            .terminating(*terminating)
                    })
                    .collect(),
            ));
            let expect = |s: &str, masq: bool| match s {
                "DROP" => Expect::Drop,
                "REJECT" => Expect::Reject,
                eps => to(eps, masq),
            };
            flows.push(flow(
                &format!("{name}: pod to clusterIP"),
                POD,
                &cip,
                80,
                expect(cluster, false),
            ));
            let (lb_eps, masq) = match policy {
                TrafficPolicy::Local => (*lb_local, false),
                _ => (*lb_cluster, true),
            };
            let mut f = flow(
                &format!("{name}: external to LB"),
                EXTERNAL_CLIENT,
                &lb,
                80,
                expect(lb_eps, masq),
            );
            if policy == TrafficPolicy::Local && *lb_local == "DROP" {
                // IPVS: no local endpoint, so the cluster endpoints.
                f = in_ipvs(f, expect(lb_cluster, false));
            }
            flows.push(f);
        }
        let t = table(changes);
        assert_eq!(flows.len(), 16);
        run(
            &format!("TerminatingEndpoints (eTP {policy:?})"),
            &Node::v4(),
            &t,
            &flows,
        );
    }
}

/// The source-dependent rules follow incremental syncs: an external Local
/// destination loses its local endpoint (external traffic drops, pods are
/// still short-circuited to the remote one), an unrelated cluster-IP change
/// leaves them be, and the service's deletion removes them.
#[test]
fn surface_follows_incremental_syncs() {
    let node = Node::v4();
    for (mode, dp) in dataplanes(&node) {
        let mut t = ServiceTable::new();
        for (secs, (changes, flows)) in (0u64..).zip(incremental_stages()) {
            let cs = t.apply_batch(changes).unwrap();
            dp.sync(&t, &cs, Instant::from_secs(secs));
            for f in &flows {
                assert_eq!(
                    observe(&*dp, f).as_ref(),
                    Ok(expect_for(f, mode)),
                    "{mode}: {}",
                    f.name
                );
            }
        }
    }
    // The same stages through the rules a partial-sync `Syncer` writes,
    // each sync's text applied on top of the last (as `iptables-restore
    // --noflush` and `nft -f` apply them), through the tracers.
    let opts = render_options(&node, IpFamily::V4);
    let mut ipt_sync = render::iptables::Syncer::new(opts.clone());
    let mut nft_sync = render::nft::Syncer::new(opts);
    let mut ipt: Option<iptables_trace::Rules> = None;
    let mut nft: Option<nft_trace::Table> = None;
    let mut t = ServiceTable::new();
    let mut partial = 0;
    let mut traced_flows = 0;
    for (secs, (changes, flows)) in (0u64..).zip(incremental_stages()) {
        t.apply_batch(changes).unwrap();
        let now = Instant::from_secs(secs);
        let (a, b) = (ipt_sync.sync(&t, now), nft_sync.sync(&t, now));
        partial += usize::from(!a.full) + usize::from(!b.full);
        match &mut ipt {
            Some(r) => r.apply(&a.text),
            None => ipt = Some(iptables_trace::Rules::parse(&a.text)),
        }
        match &mut nft {
            Some(r) => r.apply(&b.text),
            None => nft = Some(nft_trace::Table::parse(&b.text)),
        }
        for f in &flows {
            let p = Packet {
                src: f.src,
                dst: f.dst,
                proto: "tcp",
            };
            let got = traced(&ipt.as_ref().unwrap().trace(&p, &node.node_ips));
            assert_eq!(
                got.as_ref(),
                Ok(expect_for(f, "iptables")),
                "iptables-trace: {}",
                f.name
            );
            let got = traced(&nft.as_ref().unwrap().trace(&p, &node.node_ips));
            assert_eq!(
                got.as_ref(),
                Ok(expect_for(f, "nftables")),
                "nft-trace: {}",
                f.name
            );
            traced_flows += 1;
        }
    }
    // The first sync is full; the three after it are partial.
    assert_eq!(partial, 6);
    println!("incremental syncs: iptables-trace {traced_flows}, nft-trace {traced_flows}");
}

/// The stages of `surface_follows_incremental_syncs`: the changes, and
/// the flows that must hold after them.
fn incremental_stages() -> Vec<(Vec<Change>, Vec<FlowTest>)> {
    let svc = lb_service("ns1", "svc1", "172.30.0.41", Some(3001))
        .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
        .load_balancer_source_range(cidr("203.0.113.0/25"))
        .external_traffic_policy(TrafficPolicy::Local)
        .build()
        .unwrap();
    let other = Service::builder("ns1", "other")
        .cluster_ip(ip("172.30.0.99"))
        .port(ServicePortSpec::tcp(80).name("p80"))
        .build()
        .unwrap();
    vec![
        (
            vec![
                Change::UpsertService(svc),
                slice(
                    "ns1",
                    "svc1",
                    vec![
                        ep("10.180.0.1", Some(HOST)),
                        ep("10.180.1.1", Some("remote")),
                    ],
                ),
            ],
            vec![
                flow(
                    "external to LB",
                    EXTERNAL_CLIENT,
                    "1.2.3.4",
                    80,
                    to("10.180.0.1:80", false),
                ),
                flow(
                    "blocked",
                    EXTERNAL_CLIENT_BLOCKED,
                    "1.2.3.4",
                    80,
                    Expect::Drop,
                ),
            ],
        ),
        (
            vec![slice("ns1", "svc1", vec![ep("10.180.1.1", Some("remote"))])],
            vec![
                in_ipvs(
                    flow(
                        "external, no local endpoint",
                        EXTERNAL_CLIENT,
                        NODE_IP,
                        3001,
                        Expect::Drop,
                    ),
                    to("10.180.1.1:80", false),
                ),
                flow(
                    "pod short-circuits",
                    POD,
                    NODE_IP,
                    3001,
                    to("10.180.1.1:80", false),
                ),
                // The node itself: outside the source ranges, so the LB IP
                // drops it (KUBE-FW- before KUBE-EXT-), while the node port
                // short-circuits it.
                flow(
                    "node to LB, outside the ranges",
                    NODE_IP,
                    "1.2.3.4",
                    80,
                    Expect::Drop,
                ),
                in_ipvs(
                    flow(
                        "node short-circuits",
                        NODE_IP,
                        NODE_IP,
                        3001,
                        to("10.180.1.1:80", true),
                    ),
                    to("10.180.1.1:80", false),
                ),
            ],
        ),
        (
            vec![Change::UpsertService(other)],
            vec![
                flow(
                    "blocked, still",
                    EXTERNAL_CLIENT_BLOCKED,
                    "1.2.3.4",
                    80,
                    Expect::Drop,
                ),
                flow("pod, still", POD, NODE_IP, 3001, to("10.180.1.1:80", false)),
            ],
        ),
        (
            vec![Change::DeleteService(ServiceKey::new("ns1", "svc1"))],
            vec![
                flow(
                    "gone",
                    EXTERNAL_CLIENT_BLOCKED,
                    "1.2.3.4",
                    80,
                    Expect::Ignored,
                ),
                flow(
                    "gone node port (a new client: tracked flows keep their draining backend)",
                    "10.0.0.3",
                    NODE_IP,
                    3001,
                    Expect::Ignored,
                ),
            ],
        ),
    ]
}

/// TestHealthCheckNodePort: the health-check node port is the node's own
/// (kube-proxy only ACCEPTs it in the filter table): no dataplane captures
/// it, and the answer there is `k8s::health`'s.
#[test]
fn health_check_node_port() {
    let t = etp_table(TrafficPolicy::Local);
    let flows = [
        flow(
            "external to HealthCheckNodePort",
            "1.2.3.4",
            NODE_IP,
            30000,
            Expect::Ignored,
        ),
        flow(
            "external to HealthCheckNodePort on another node IP",
            "1.2.3.4",
            NODE_IP_ALT,
            30000,
            Expect::Ignored,
        ),
    ];
    run("HealthCheckNodePort", &Node::v4(), &t, &flows);
    let key = ServiceKey::new("ns1", "svc1");
    let here =
        svclb::k8s::health::service_health(&t, &NodeTopology::new(HOST, "z"), &key, true).unwrap();
    assert_eq!((here.status, here.headers[2].1.as_str()), (200, "1"));
    let there =
        svclb::k8s::health::service_health(&t, &NodeTopology::new("host-2", "z"), &key, true)
            .unwrap();
    assert_eq!(there.status, 503);
    let unhealthy =
        svclb::k8s::health::service_health(&t, &NodeTopology::new(HOST, "z"), &key, false).unwrap();
    assert_eq!(unhealthy.status, 503);
    assert!(unhealthy.body.contains("\"serviceProxyHealthy\": false"));
}

#[test]
fn short_circuit_through_a_local_cluster_ip_picks_at_random() {
    // svc3 of TestInternalExternalMasquerade: externalTrafficPolicy Local
    // and internalTrafficPolicy Local. Pod traffic to its LB IP is
    // short-circuited to KUBE-SVC- (nftables: service-), the Cluster-policy
    // endpoints, which pick with `-m statistic --mode random` (`numgen
    // random`): the same 5-tuple, decided afresh (no tracking), reaches
    // both the local and the remote endpoint, about evenly.
    let t = masquerade_table();
    let node = Node::v4();
    let f = Flow::tcp(
        SocketAddr::new(ip(POD), 40_000),
        SocketAddr::new(ip("9.10.11.12"), 80),
    );
    for (mode, _) in dataplanes(&node) {
        if mode == "ipvs" {
            // No short-circuit in the IPVS mode (`in_ipvs`): the LB IP's
            // virtual server lists the local endpoint alone.
            continue;
        }
        let mut config = node.config(11);
        config.conntrack = None;
        let dp: Box<dyn Dataplane> = match mode {
            "iptables" => Box::new(IptablesDataplane::new(config)),
            "ipvs" => Box::new(IpvsDataplane::new(config)),
            "nftables" => Box::new(NftablesDataplane::new(config)),
            _ => Box::new(IpvsDataplane::ebpf_model(config)),
        };
        dp.sync(&t, &t.full_change_set(), Instant::ZERO);
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..64 {
            match dp.route(&f, Instant::ZERO) {
                Verdict::Forward(fw) => *counts.entry(fw.backend.to_string()).or_insert(0u32) += 1,
                v => panic!("{mode}: {v}"),
            }
        }
        assert_eq!(
            counts.keys().map(String::as_str).collect::<Vec<_>>(),
            ["10.180.0.3:80", "10.180.1.3:80"],
            "{mode}: {counts:?}"
        );
        assert!(counts.values().all(|&n| n >= 16), "{mode}: {counts:?}");
    }
    // The rendered rules: the short-circuit reaches the random pick over
    // both Cluster endpoints, unmasqueraded.
    let opts = render_options(&node, IpFamily::V4);
    let p = Packet {
        src: ip(POD),
        dst: SocketAddr::new(ip("9.10.11.12"), 80),
        proto: "tcp",
    };
    let both = to("10.180.0.3:80, 10.180.1.3:80", false);
    let ipt = iptables_trace::Rules::parse(&render::iptables::render(&t, &opts));
    assert_eq!(traced(&ipt.trace(&p, &node.node_ips)), Ok(both.clone()));
    let nft = nft_trace::Table::parse(&render::nft::render(&t, &opts));
    assert_eq!(traced(&nft.trace(&p, &node.node_ips)), Ok(both));
}

/// The tracers' own semantics on hand-written rules: a random pick is
/// both taken and not, a plain jump that decides ends its chain (a rule
/// after it is never reached), the mark turns into masquerading only
/// through the postrouting chain, and a protocol mismatch is not captured.
#[test]
fn tracers_follow_branches_and_stop_after_a_decision() {
    let ipt = iptables_trace::Rules::parse(
        "*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-A - [0:0]
:KUBE-SEP-1 - [0:0]
:KUBE-SEP-2 - [0:0]
:KUBE-SEP-3 - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
-A KUBE-SERVICES -m tcp -p tcp -d 172.30.0.1 --dport 80 -j KUBE-SVC-A
-A KUBE-SVC-A ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-A -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-1
-A KUBE-SVC-A -j KUBE-SEP-2
-A KUBE-SVC-A -j KUBE-SEP-3
-A KUBE-SEP-1 -m tcp -p tcp -j DNAT --to-destination 10.1.0.1:80
-A KUBE-SEP-2 -m tcp -p tcp -j DNAT --to-destination 10.1.0.2:80
-A KUBE-SEP-3 -m tcp -p tcp -j DNAT --to-destination 10.1.0.3:80
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -j MASQUERADE
COMMIT
",
    );
    let nft = nft_trace::Table::parse(
        "add table ip kube-proxy
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy services
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy service-a
add chain ip kube-proxy endpoint-1
add chain ip kube-proxy endpoint-2
add chain ip kube-proxy endpoint-3
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy service-a ip daddr 172.30.0.1 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-a numgen random mod 2 vmap { 0 : goto endpoint-1 , 1 : goto endpoint-2 }
add rule ip kube-proxy service-a goto endpoint-3
add rule ip kube-proxy endpoint-1 meta l4proto tcp dnat to 10.1.0.1:80
add rule ip kube-proxy endpoint-2 meta l4proto tcp dnat to 10.1.0.2:80
add rule ip kube-proxy endpoint-3 meta l4proto tcp dnat to 10.1.0.3:80
add element ip kube-proxy service-ips { 172.30.0.1 . tcp . 80 : goto service-a }
",
    );
    let local = [ip(NODE_IP)];
    let packet = |src: &str, proto: &'static str| Packet {
        src: ip(src),
        dst: SocketAddr::new(ip("172.30.0.1"), 80),
        proto,
    };
    let two = "10.1.0.1:80, 10.1.0.2:80";
    for (src, proto, want) in [
        (POD, "tcp", to(two, false)),
        (NODE_IP, "tcp", to(two, true)),
        (POD, "udp", Expect::Ignored),
    ] {
        let p = packet(src, proto);
        assert_eq!(
            traced(&ipt.trace(&p, &local)),
            Ok(want.clone()),
            "iptables {src} {proto}"
        );
        assert_eq!(
            traced(&nft.trace(&p, &local)),
            Ok(want),
            "nft {src} {proto}"
        );
    }
}

/// A jump to an undeclared chain fails the trace, as `iptables-restore`
/// refuses the input.
#[test]
#[should_panic(expected = "jump to undeclared chain KUBE-SEP-GONE")]
fn iptables_tracer_refuses_a_jump_to_an_undeclared_chain() {
    let ipt = iptables_trace::Rules::parse(
        "*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -m tcp -p tcp -d 172.30.0.1 --dport 80 -j KUBE-SEP-GONE
COMMIT
",
    );
    let p = Packet {
        src: ip(POD),
        dst: SocketAddr::new(ip("172.30.0.1"), 80),
        proto: "tcp",
    };
    let _ = ipt.trace(&p, &[]);
}

/// The same for `nft -f`.
#[test]
#[should_panic(expected = "jump to a missing chain endpoint-gone")]
fn nft_tracer_refuses_a_jump_to_a_missing_chain() {
    let nft = nft_trace::Table::parse(
        "add table ip kube-proxy
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add rule ip kube-proxy nat-prerouting ip daddr 172.30.0.1 goto endpoint-gone
",
    );
    let p = Packet {
        src: ip(POD),
        dst: SocketAddr::new(ip("172.30.0.1"), 80),
        proto: "tcp",
    };
    let _ = nft.trace(&p, &[]);
}
