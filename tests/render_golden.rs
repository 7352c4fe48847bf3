//! Golden tests of the renderings: svclb renders the same Service and
//! EndpointSlice objects as kube-proxy's own unit tests, and the output is
//! compared line by line with kube-proxy's expected text (tests/golden/).

use std::path::Path;

use svclb::render::{self, Cidr, IpFamily, RenderOptions};
use svclb::*;

/// Compares `text` with a pinned golden file of svclb's own output; with
/// `SVCLB_BLESS=1` in the environment, rewrites the file instead.
fn pinned(name: &str, text: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("SVCLB_BLESS").is_some() {
        std::fs::write(&path, text).unwrap();
    }
    assert_eq!(
        text,
        golden(name),
        "{} changed (SVCLB_BLESS=1 to accept)",
        path.display()
    );
}

fn golden(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// kube-proxy's test configuration: local detector 10.0.0.0/8, and the
/// fake iptables' mark text and lack of `--random-fully`.
fn kube_proxy_test_options() -> RenderOptions {
    RenderOptions::default()
        .cluster_cidr("10.0.0.0/8".parse().unwrap())
        .masquerade_mark("0x4000")
        .random_fully(false)
}

#[test]
fn defaults_are_a_real_nodes_flags() {
    // As a real kube-proxy logs its restore input (mark bit 14, Go's %#08x,
    // iptables with --random-fully support).
    let text = render::iptables::render(&overall_table(), &RenderOptions::default());
    for want in [
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
    ] {
        assert!(text.lines().any(|l| l == want), "missing {want}\n{text}");
    }
}

struct Svc<'a> {
    ns: &'a str,
    name: &'a str,
    ip: &'a str,
    port_name: Option<&'a str>,
    affinity: bool,
    itp_local: bool,
    /// (IP, node, ready)
    endpoints: &'a [(&'a str, &'a str, bool)],
}

fn table_of(services: &[Svc<'_>]) -> ServiceTable {
    let mut table = ServiceTable::new();
    let mut changes = Vec::new();
    for s in services {
        let mut port = ServicePortSpec::tcp(80);
        let mut slice_port = SlicePortSpec::tcp(80);
        if let Some(n) = s.port_name {
            port = port.name(n);
            slice_port = slice_port.name(n);
        }
        let mut b = Service::builder(s.ns, s.name)
            .cluster_ip(s.ip.parse().unwrap())
            .port(port);
        if s.affinity {
            b = b.client_ip_affinity(Some(10800));
        }
        if s.itp_local {
            b = b.internal_traffic_policy(TrafficPolicy::Local);
        }
        changes.push(Change::UpsertService(b.build().unwrap()));
        if !s.endpoints.is_empty() {
            let slice =
                EndpointSlice::builder(s.ns, format!("{}-abc", s.name), s.name, AddressType::IPv4)
                    .port(slice_port)
                    .endpoints(s.endpoints.iter().map(|(ip, node, ready)| {
                        let e = EndpointSpec::new(*ip).node(*node);
                        if *ready {
                            e
                        } else {
                            e.ready(false).serving(true).terminating(true)
                        }
                    }))
                    .build()
                    .unwrap();
            changes.push(Change::UpsertSlice(slice));
        }
    }
    table.apply_batch(changes).unwrap();
    table
}

/// The ClusterIP parts of kube-proxy's TestOverallIPTablesRules objects
/// (svc1..svc6, the same names, IPs, ports, endpoints and affinity).
fn overall_table() -> ServiceTable {
    let p80 = Some("p80");
    table_of(&[
        Svc {
            ns: "ns1",
            name: "svc1",
            ip: "172.30.0.41",
            port_name: p80,
            affinity: false,
            itp_local: false,
            endpoints: &[("10.180.0.1", "host1", true)],
        },
        Svc {
            ns: "ns2",
            name: "svc2",
            ip: "172.30.0.42",
            port_name: p80,
            affinity: false,
            itp_local: false,
            endpoints: &[("10.180.0.2", "host2", true)],
        },
        Svc {
            ns: "ns3",
            name: "svc3",
            ip: "172.30.0.43",
            port_name: p80,
            affinity: false,
            itp_local: false,
            endpoints: &[("10.180.0.3", "host2", true)],
        },
        Svc {
            ns: "ns4",
            name: "svc4",
            ip: "172.30.0.44",
            port_name: p80,
            affinity: false,
            itp_local: false,
            endpoints: &[
                ("10.180.0.4", "host2", true),
                ("10.180.0.5", "test-node", true),
            ],
        },
        Svc {
            ns: "ns5",
            name: "svc5",
            ip: "172.30.0.45",
            port_name: p80,
            affinity: true,
            itp_local: false,
            endpoints: &[("10.180.0.3", "host2", true)],
        },
        Svc {
            ns: "ns6",
            name: "svc6",
            ip: "172.30.0.46",
            port_name: p80,
            affinity: false,
            itp_local: false,
            endpoints: &[],
        },
    ])
}

/// The rule kinds svclb renders (kube-proxy's fixture also has NodePort,
/// LoadBalancer and external-IP rules, and nfacct counters in KUBE-FORWARD).
fn clusterip_kinds(line: &str) -> bool {
    if matches!(line, "*filter" | "*nat" | "COMMIT") {
        return true;
    }
    if let Some(chain) = line.strip_prefix(':') {
        return !chain.starts_with("KUBE-EXT-") && !chain.starts_with("KUBE-FW-");
    }
    if line.starts_with("-A KUBE-SERVICES ") {
        return [
            " cluster IP\"",
            " has no endpoints\"",
            " has no local endpoints\"",
            "must be the last rule",
        ]
        .iter()
        .any(|k| line.contains(k));
    }
    [
        "-A KUBE-SVC-",
        "-A KUBE-SVL-",
        "-A KUBE-SEP-",
        "-A KUBE-MARK-MASQ ",
        "-A KUBE-POSTROUTING ",
        "-A KUBE-FIREWALL ",
    ]
    .iter()
    .any(|p| line.starts_with(p))
}

fn assert_lines_eq(ours: &[&str], theirs: &[&str], what: &str) {
    if ours != theirs {
        let mut msg = format!("{what}: svclb and kube-proxy differ\n");
        for l in theirs.iter().filter(|l| !ours.contains(l)) {
            msg.push_str(&format!("  kube-proxy only: {l}\n"));
        }
        for l in ours.iter().filter(|l| !theirs.contains(l)) {
            msg.push_str(&format!("  svclb only:      {l}\n"));
        }
        msg.push_str(&format!(
            "--- svclb ---\n{}\n--- kube-proxy ---\n{}\n",
            ours.join("\n"),
            theirs.join("\n")
        ));
        panic!("{msg}");
    }
}

#[test]
fn overall_iptables_matches_kube_proxy_line_by_line() {
    let text = render::iptables::render(&overall_table(), &kube_proxy_test_options());
    let fixture = golden("kube-proxy-overall.iptables");
    let theirs: Vec<&str> = fixture.lines().filter(|l| clusterip_kinds(l)).collect();
    let ours: Vec<&str> = text.lines().filter(|l| clusterip_kinds(l)).collect();
    // The comparison covers every rule kind: jumps, REJECT, probabilities,
    // affinity, SEP chains, masquerade.
    assert!(
        theirs.len() >= 45,
        "fixture filter kept only {} lines",
        theirs.len()
    );
    for needle in [
        "--probability 0.5000000000",
        "--rcheck --seconds 10800 --reap",
        "--set -m tcp",
        "-j REJECT",
        "! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
    ] {
        assert!(theirs.iter().any(|l| l.contains(needle)), "{needle}");
    }
    assert_lines_eq(&ours, &theirs, "TestOverallIPTablesRules");
    // Nothing svclb writes is outside the compared kinds except KUBE-FORWARD
    // (kube-proxy's flavour without nfacct, checked in full below).
    for l in text.lines().filter(|l| !clusterip_kinds(l)) {
        assert!(l.starts_with("-A KUBE-FORWARD "), "unexpected line {l}");
    }
    // And our own full rendering is pinned.
    pinned("svclb-overall.iptables", &text);
}

fn internal_policy_table(itp_local: bool) -> ServiceTable {
    table_of(&[Svc {
        ns: "ns1",
        name: "svc1",
        ip: "172.30.1.1",
        port_name: None,
        affinity: false,
        itp_local,
        endpoints: &[
            ("10.0.1.1", "test-node", true),
            ("10.0.1.2", "host1", true),
            ("10.0.1.3", "host2", true),
        ],
    }])
}

#[test]
fn itp_cluster_three_endpoints_is_byte_identical() {
    // The fixture is from before kube-proxy's nfacct counters (1.31).
    let opts = kube_proxy_test_options()
        .node(NodeTopology::new("test-node", "zone-a"))
        .nfacct(false);
    let text = render::iptables::render(&internal_policy_table(false), &opts);
    let fixture = golden("kube-proxy-itp-cluster.iptables");
    assert_lines_eq(
        &text.lines().collect::<Vec<_>>(),
        &fixture.lines().collect::<Vec<_>>(),
        "ITP Cluster",
    );
    assert_eq!(text, fixture);
}

#[test]
fn itp_local_without_local_endpoints_drops_byte_identical() {
    // The fixture is from before kube-proxy's nfacct counters (1.31).
    let opts = kube_proxy_test_options()
        .node(NodeTopology::new("other-node", "zone-a"))
        .nfacct(false);
    let text = render::iptables::render(&internal_policy_table(true), &opts);
    assert_eq!(text, golden("kube-proxy-itp-local-no-local.iptables"));
}

#[test]
fn itp_local_with_a_local_endpoint_uses_svl_chain() {
    let opts = kube_proxy_test_options().node(NodeTopology::new("test-node", "zone-a"));
    let text = render::iptables::render(&internal_policy_table(true), &opts);
    // Quoted from kube-proxy's TestInternalTrafficPolicyE2E "local endpoints exist".
    for want in [
        ":KUBE-SEP-3JOIVZTXZZRGORX4 - [0:0]",
        ":KUBE-SVL-AQI2S6QIMU7PVVRP - [0:0]",
        "-A KUBE-SERVICES -m comment --comment \"ns1/svc1 cluster IP\" -m tcp -p tcp -d 172.30.1.1 --dport 80 -j KUBE-SVL-AQI2S6QIMU7PVVRP",
        "-A KUBE-SVL-AQI2S6QIMU7PVVRP -m comment --comment \"ns1/svc1 cluster IP\" -m tcp -p tcp -d 172.30.1.1 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
        "-A KUBE-SVL-AQI2S6QIMU7PVVRP -m comment --comment \"ns1/svc1 -> 10.0.1.1:80\" -j KUBE-SEP-3JOIVZTXZZRGORX4",
    ] {
        assert!(text.lines().any(|l| l == want), "missing {want}\n{text}");
    }
    assert!(
        !text.contains("KUBE-SVC-"),
        "no cluster chain under a Local policy\n{text}"
    );
    assert!(
        !text.contains("10.0.1.2"),
        "remote endpoints get no SEP chain\n{text}"
    );
}

#[test]
fn client_ip_affinity_rules_match_kube_proxy() {
    let table = table_of(&[Svc {
        ns: "ns1",
        name: "svc1",
        ip: "172.30.1.1",
        port_name: None,
        affinity: true,
        itp_local: false,
        endpoints: &[
            ("10.0.1.1", "test-node", true),
            ("10.0.1.2", "test-node", true),
            ("10.0.1.3", "test-node", false),
            ("10.0.1.4", "host1", false),
            ("10.0.1.5", "host1", true),
        ],
    }]);
    let text = render::iptables::render(&table, &kube_proxy_test_options());
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SEP-") || l.starts_with("-A KUBE-SVC-"))
        .collect();
    let fixture = golden("kube-proxy-affinity.iptables");
    assert_lines_eq(
        &ours,
        &fixture.lines().collect::<Vec<_>>(),
        "ClientIP affinity",
    );
}

#[test]
fn masquerade_rules_only_with_cluster_cidr() {
    let opts = RenderOptions::default().masquerade_mark("0x4000");
    let text = render::iptables::render(&overall_table(), &opts);
    assert!(!text.contains("-j KUBE-MARK-MASQ\n-A KUBE-SVC"), "{text}");
    assert!(!text.contains("! -s 10.0.0.0/8"), "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("-A KUBE-SVC-") && l.contains("cluster IP"))
    );
    // The hairpin rule in each endpoint chain stays (kube-proxy always writes it).
    assert!(text.contains("-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ\n"));
    let all = RenderOptions {
        masquerade_all: true,
        ..opts
    };
    let text = render::iptables::render(&overall_table(), &all);
    assert!(text.contains("-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-MARK-MASQ\n"), "{text}");
}

#[test]
fn builtin_jumps_make_the_restore_self_contained() {
    let opts = kube_proxy_test_options().builtin_jumps(true);
    let text = render::iptables::render(&overall_table(), &opts);
    for want in [
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A INPUT -j KUBE-FIREWALL",
    ] {
        assert!(text.lines().any(|l| l == want), "missing {want}\n{text}");
    }
    // Built-in chains come after the KUBE-* chains, and are not declared.
    let nat = &text[text.find("*nat").unwrap()..];
    assert!(nat.find("-A OUTPUT").unwrap() > nat.find("-A KUBE-SVC-").unwrap());
    assert!(!text.contains(":OUTPUT"));
}

#[test]
fn large_clusters_drop_endpoint_comments() {
    // 1001 endpoints (two slices: one slice holds at most 1000).
    let mut table = ServiceTable::new();
    let svc = Service::builder("ns1", "big")
        .cluster_ip("172.30.0.9".parse().unwrap())
        .port(ServicePortSpec::tcp(80))
        .build()
        .unwrap();
    let mut changes = vec![Change::UpsertService(svc)];
    for (s, range) in [(0, 0..500), (1, 500..1001)] {
        let slice = EndpointSlice::builder("ns1", format!("big-{s}"), "big", AddressType::IPv4)
            .port(SlicePortSpec::tcp(80))
            .endpoints(
                range.map(|i| EndpointSpec::new(format!("10.1.{}.{}", i / 250, i % 250 + 1))),
            )
            .build()
            .unwrap();
        changes.push(Change::UpsertSlice(slice));
    }
    table.apply_batch(changes).unwrap();
    let text = render::iptables::render(&table, &RenderOptions::default());
    let sep = text
        .lines()
        .find(|l| l.starts_with("-A KUBE-SEP-"))
        .unwrap();
    assert!(!sep.contains("--comment"), "{sep}");
    let svc = text
        .lines()
        .find(|l| l.starts_with("-A KUBE-SVC-"))
        .unwrap();
    assert!(
        svc.starts_with("-A KUBE-SVC-")
            && svc.contains("-m statistic --mode random --probability 0.0009990010 -j KUBE-SEP-"),
        "{svc}"
    );
    assert!(text.contains("\"ns1/big cluster IP\""));
}

#[test]
fn ipv6_family_renders_only_ipv6_services() {
    let mut table = overall_table();
    let v6 = Service::builder("ns7", "svc7")
        .cluster_ip("fd00:30::7".parse().unwrap())
        .port(ServicePortSpec::tcp(80).name("p80"))
        .build()
        .unwrap();
    let slice = EndpointSlice::builder("ns7", "svc7-abc", "svc7", AddressType::IPv6)
        .port(SlicePortSpec::tcp(80).name("p80"))
        .endpoint(EndpointSpec::new("fd00:10::1"))
        .build()
        .unwrap();
    table
        .apply_batch([Change::UpsertService(v6), Change::UpsertSlice(slice)])
        .unwrap();
    // A dual-stack cluster: one --cluster-cidr per family.
    let opts = RenderOptions::default()
        .family(IpFamily::V6)
        .cluster_cidr("10.0.0.0/8".parse().unwrap())
        .cluster_cidr(Cidr::parse("cluster-cidr", "fd00:10::/64").unwrap());
    let text = render::iptables::render(&table, &opts);
    assert!(!text.contains("172.30."), "{text}");
    assert!(
        !text.contains("KUBE-FIREWALL"),
        "IPv6 has no localnet firewall chain"
    );
    assert!(
        text.contains("-j DNAT --to-destination [fd00:10::1]:80\n"),
        "{text}"
    );
    assert!(
        text.contains("-d fd00:30::7 --dport 80 ! -s fd00:10::/64 -j KUBE-MARK-MASQ\n"),
        "{text}"
    );
    assert!(text.contains("-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS\n"));
    assert!(!text.contains("10.0.0.0/8"), "{text}");
    // The IPv4 rendering leaves the IPv6 service out and uses the IPv4 CIDR.
    let v4 = render::iptables::render(&table, &opts.clone().family(IpFamily::V4));
    assert!(!v4.contains("fd00"), "{v4}");
    assert!(
        v4.contains("--dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n"),
        "{v4}"
    );
    // nftables: an ip6 table with ip6 matches and bracketed DNAT targets.
    let nft6 = render::nft::render(&table, &opts);
    for want in [
        "add table ip6 kube-proxy { comment \"rules for kube-proxy\" ; }",
        "add set ip6 kube-proxy cluster-ips { type ipv6_addr ; comment \"Active ClusterIPs\" ; }",
        "add rule ip6 kube-proxy services ip6 daddr . meta l4proto . th dport vmap @service-ips",
        "add element ip6 kube-proxy service-ips { fd00:30::7 . tcp . 80 : goto service-",
        "ip6 daddr fd00:30::7 ip6 saddr != fd00:10::/64 jump mark-for-masquerade",
        "__fd00.10..1/80 meta l4proto tcp dnat to [fd00:10::1]:80",
    ] {
        assert!(nft6.contains(want), "missing {want}\n{nft6}");
    }
    assert!(!nft6.contains("172.30."), "{nft6}");
}

/// kube-proxy's nftables fixture lines for what svclb renders (ClusterIPs).
fn nft_clusterip_kinds(line: &str) -> bool {
    let external_ips = ["192.168.99.", "1.2.3.4", "5.6.7.8"];
    !(line.trim().is_empty()
        || line.starts_with('#')
        || line.contains("external-")
        || line.contains("firewall-HVFWP5L3")
        || line.starts_with("add element ip kube-proxy service-nodeports ")
        || line.starts_with("add element ip kube-proxy no-endpoint-nodeports ")
        || line.starts_with("add element ip kube-proxy nodeport-ips ")
        || line.starts_with("add element ip kube-proxy firewall-ips ")
        || external_ips.iter().any(|ip| line.contains(ip)))
}

#[test]
fn overall_nft_matches_kube_proxy() {
    // kube-proxy's nftables fake proxier has `--nodeport-addresses
    // 192.168.0.2/32` (`NewFakeProxier`), so the `nodeport-ips` set stays.
    let opts = kube_proxy_test_options()
        .service_cidr("172.30.0.0/16".parse().unwrap())
        .nodeport_address("192.168.0.2/32".parse().unwrap());
    let text = render::nft::render(&overall_table(), &opts);
    let fixture = golden("kube-proxy-overall.nft");
    // kube-proxy compares nftables dumps regardless of order; so do we.
    let mut theirs: Vec<&str> = fixture.lines().filter(|l| nft_clusterip_kinds(l)).collect();
    let mut ours: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    theirs.sort_unstable();
    ours.sort_unstable();
    assert!(
        theirs.len() >= 70,
        "fixture filter kept only {} lines",
        theirs.len()
    );
    assert_lines_eq(&ours, &theirs, "TestOverallNFTablesRules");
    pinned("svclb-overall.nft", &text);
}

#[test]
fn nft_local_policy_and_drop() {
    let opts = kube_proxy_test_options().node(NodeTopology::new("test-node", "zone-a"));
    let text = render::nft::render(&internal_policy_table(true), &opts);
    assert!(
        text.contains(
            "add element ip kube-proxy service-ips { 172.30.1.1 . tcp . 80 : goto local-"
        ),
        "{text}"
    );
    assert_eq!(
        text.matches("dnat to").count(),
        1,
        "only the local endpoint\n{text}"
    );
    let opts = kube_proxy_test_options().node(NodeTopology::new("elsewhere", "zone-a"));
    let text = render::nft::render(&internal_policy_table(true), &opts);
    assert!(
        text.contains("add element ip kube-proxy no-endpoint-services { 172.30.1.1 . tcp . 80 comment \"ns1/svc1\" : drop }"),
        "{text}"
    );
    assert!(!text.contains("dnat to"));
}

#[test]
fn ipvsadm_lists_live_counters_and_persistence() {
    let table = overall_table();
    let config = DataplaneConfig {
        count_connections: true,
        ..DataplaneConfig::with_seed(7)
    };
    let dp = IpvsDataplane::new(config);
    dp.sync(&table, &table.full_change_set(), Instant::ZERO);
    // Five tracked connections to svc4 (rr over 10.180.0.4 and .5), one
    // closed.
    let vip: std::net::SocketAddr = "172.30.0.44:80".parse().unwrap();
    let mut first = None;
    for port in 0..5u16 {
        let f = Flow::tcp(
            std::net::SocketAddr::from(([10, 9, 0, 1], 40000 + port)),
            vip,
        );
        if let Verdict::Forward(svclb::Forward { backend: b, .. }) = dp.route(&f, Instant::ZERO) {
            first.get_or_insert((f, b));
        }
        // The handshake completes: ESTABLISHED counts as active.
        dp.packet(&f, TcpFlags::ACK, Instant::ZERO);
    }
    let (f, _) = first.unwrap();
    dp.connection_closed(&f, Instant::ZERO);
    let text = render::ipvsadm::render(&table, &dp, &RenderOptions::default());
    let want = "IP Virtual Server version 1.2.1 (size=4096)\n\
Prot LocalAddress:Port Scheduler Flags\n\
\x20 -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n\
TCP  172.30.0.41:80 rr\n\
\x20 -> 10.180.0.1:80                Masq    1      0          0         \n\
TCP  172.30.0.42:80 rr\n\
\x20 -> 10.180.0.2:80                Masq    1      0          0         \n\
TCP  172.30.0.43:80 rr\n\
\x20 -> 10.180.0.3:80                Masq    1      0          0         \n\
TCP  172.30.0.44:80 rr\n\
\x20 -> 10.180.0.4:80                Masq    1      2          0         \n\
\x20 -> 10.180.0.5:80                Masq    1      2          0         \n\
TCP  172.30.0.45:80 rr persistent 10800\n\
\x20 -> 10.180.0.3:80                Masq    1      0          0         \n\
TCP  172.30.0.46:80 rr\n";
    assert_eq!(text, want);
}

/// (namespace, service, [(endpoint IP, node)]).
type Slice<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

/// All of kube-proxy's TestOverallIPTablesRules objects: svc1..svc6 with
/// their node ports, external IPs, load-balancer ingress, source range,
/// health-check node port and traffic policies.
fn overall_table_full() -> ServiceTable {
    let p80 = |np: Option<i64>| {
        let p = ServicePortSpec::tcp(80).name("p80");
        match np {
            Some(n) => p.node_port(n),
            None => p,
        }
    };
    let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
    let svc = |ns: &str, name: &str, cip: &str| {
        Service::builder(ns, name)
            .cluster_ip(ip(cip))
            .node_port_range(1..=32767)
    };
    let services = [
        svc("ns1", "svc1", "172.30.0.41").port(p80(None)),
        // A LoadBalancer with a node port, an external IP, an ingress IP,
        // externalTrafficPolicy Local and a health-check node port.
        svc("ns2", "svc2", "172.30.0.42")
            .service_type(ServiceType::LoadBalancer)
            .port(p80(Some(3001)))
            .external_ip(ip("192.168.99.22"))
            .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
            .external_traffic_policy(TrafficPolicy::Local)
            .health_check_node_port(30000),
        // A NodePort.
        svc("ns3", "svc3", "172.30.0.43")
            .service_type(ServiceType::NodePort)
            .port(p80(Some(3003))),
        // An external IP.
        svc("ns4", "svc4", "172.30.0.44")
            .port(p80(None))
            .external_ip(ip("192.168.99.33")),
        // A LoadBalancer with a source range and ClientIP affinity.
        svc("ns5", "svc5", "172.30.0.45")
            .service_type(ServiceType::LoadBalancer)
            .port(p80(Some(3002)))
            .load_balancer_ingress(ip("5.6.7.8"), IpMode::VIP)
            .load_balancer_source_range("203.0.113.0/25".parse().unwrap())
            .client_ip_affinity(Some(10800)),
        // No endpoints.
        svc("ns6", "svc6", "172.30.0.46").port(p80(None)),
    ];
    let slices: [Slice<'_>; 5] = [
        ("ns1", "svc1", &[("10.180.0.1", "host1")]),
        ("ns2", "svc2", &[("10.180.0.2", "host2")]),
        ("ns3", "svc3", &[("10.180.0.3", "host2")]),
        (
            "ns4",
            "svc4",
            &[("10.180.0.4", "host2"), ("10.180.0.5", "test-node")],
        ),
        ("ns5", "svc5", &[("10.180.0.3", "host2")]),
    ];
    let mut changes: Vec<Change> = services
        .into_iter()
        .map(|b| Change::UpsertService(b.build().unwrap()))
        .collect();
    for (ns, name, eps) in slices {
        changes.push(Change::UpsertSlice(
            EndpointSlice::builder(ns, format!("{name}-abc"), name, AddressType::IPv4)
                .port(SlicePortSpec::tcp(80).name("p80"))
                .endpoints(
                    eps.iter()
                        .map(|(ip, node)| EndpointSpec::new(*ip).node(*node)),
                )
                .build()
                .unwrap(),
        ));
    }
    let mut table = ServiceTable::new();
    table.apply_batch(changes).unwrap();
    table
}

#[test]
fn overall_iptables_rules_are_kube_proxys_line_for_line() {
    // TestOverallIPTablesRules in full: node ports, external IPs,
    // load-balancer IPs and their firewall, externalTrafficPolicy Local,
    // the health-check node port, the filter table and the nfacct counters.
    let opts = kube_proxy_test_options().node(NodeTopology::new("test-node", "zone-a"));
    let text = render::iptables::render(&overall_table_full(), &opts);
    let fixture = golden("kube-proxy-overall.iptables");
    let ours: Vec<&str> = text.lines().collect();
    let theirs: Vec<&str> = fixture.lines().collect();
    assert_lines_eq(&ours, &theirs, "TestOverallIPTablesRules (all of it)");
    assert_eq!(text, fixture, "byte for byte");
}

#[test]
fn overall_nftables_rules_are_kube_proxys() {
    // TestOverallNFTablesRules with all of its objects: node ports, external
    // and load-balancer IPs, the firewall, externalTrafficPolicy Local.
    // Compared regardless of order, as kube-proxy's test does, every line
    // (the test's node IP, 192.168.0.2, inside the fake proxier's
    // `--nodeport-addresses 192.168.0.2/32`, gives the `nodeport-ips`
    // element).
    let opts = kube_proxy_test_options()
        .service_cidr("172.30.0.0/16".parse().unwrap())
        .node_ip("192.168.0.2".parse().unwrap())
        .nodeport_address("192.168.0.2/32".parse().unwrap());
    let text = render::nft::render(&overall_table_full(), &opts);
    let fixture = golden("kube-proxy-overall.nft");
    let mut theirs: Vec<&str> = fixture
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    let mut ours: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    theirs.sort_unstable();
    ours.sort_unstable();
    assert!(
        theirs
            .iter()
            .any(|l| l.contains("service-nodeports { tcp . 3001"))
    );
    assert_lines_eq(&ours, &theirs, "TestOverallNFTablesRules (all of it)");
}

#[test]
fn allow_from_node_admits_the_load_balancer_ips_as_sources() {
    // kube-proxy's allowFromNode: svc5's source range 203.0.113.0/25 holds
    // the node IP here, so the firewall also admits its LB IP 5.6.7.8 as a
    // source; with the node outside the range it does not.
    let inside = kube_proxy_test_options().node_ip("203.0.113.7".parse().unwrap());
    let outside = kube_proxy_test_options().node_ip("192.168.0.2".parse().unwrap());
    let table = overall_table_full();
    let rule = "-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment \"ns5/svc5:p80 loadbalancer IP\" -s 5.6.7.8 -j KUBE-EXT-NUKIZ6OKUXPJNT4C";
    let with = render::iptables::render(&table, &inside);
    let without = render::iptables::render(&table, &outside);
    let at = with.lines().position(|l| l == rule).expect(rule);
    // After the range's own rule, before the comment-only fall-through.
    assert!(
        with.lines()
            .nth(at - 1)
            .unwrap()
            .contains("-s 203.0.113.0/25")
    );
    assert!(!without.contains("-s 5.6.7.8"), "{without}");

    let nft_rule = "saddr != { 203.0.113.0/25 , 5.6.7.8 } drop";
    let with = render::nft::render(&table, &inside);
    let without = render::nft::render(&table, &outside);
    assert!(with.contains(nft_rule), "{with}");
    assert!(
        without.contains("saddr != { 203.0.113.0/25 } drop"),
        "{without}"
    );
}

#[test]
fn nodeport_addresses_write_one_jump_per_node_ip() {
    // kube-proxy with --nodeport-addresses: one `-d NODE-IP` jump to
    // KUBE-NODEPORTS per node IP inside the prefixes (the addrtype rule
    // goes), loopback kept for IPv4 with localhost node ports; the nft
    // nodeport-ips set holds the same addresses.
    let table = overall_table_full();
    let opts = kube_proxy_test_options()
        .node_ip("192.168.0.2".parse().unwrap())
        .node_ip("10.0.0.9".parse().unwrap())
        .node_ip("127.0.0.1".parse().unwrap())
        .nodeport_address("192.168.0.0/24".parse().unwrap())
        .nodeport_address("127.0.0.0/8".parse().unwrap());
    let text = render::iptables::render(&table, &opts);
    let jumps: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.ends_with("-j KUBE-NODEPORTS"))
        .collect();
    assert_eq!(
        jumps,
        [
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d 192.168.0.2 -j KUBE-NODEPORTS",
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d 127.0.0.1 -j KUBE-NODEPORTS",
        ]
    );
    let mut no_localhost_opts = opts.clone();
    no_localhost_opts.localhost_nodeports = false;
    let no_localhost = render::iptables::render(&table, &no_localhost_opts);
    assert!(!no_localhost.contains("-d 127.0.0.1 -j KUBE-NODEPORTS"));
    // A prefix of length 0 matches every local address: the addrtype rule.
    let all = render::iptables::render(
        &table,
        &kube_proxy_test_options().nodeport_address("0.0.0.0/0".parse().unwrap()),
    );
    assert!(all.contains("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"));

    // The nft set holds the same addresses but loopback: kube-proxy's
    // nftables mode logs "--nodeport-addresses includes localhost but
    // localhost NodePorts are not supported" and leaves it out.
    let nft = render::nft::render(&table, &opts);
    let elements: Vec<&str> = nft
        .lines()
        .filter(|l| l.starts_with("add element ip kube-proxy nodeport-ips "))
        .collect();
    assert_eq!(
        elements,
        ["add element ip kube-proxy nodeport-ips { 192.168.0.2 }"]
    );
}

/// The base-ruleset lines of an nft rendering that concern node ports.
fn nft_nodeport_base_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| {
            l.contains("nodeport-ips")
                || l.starts_with("add rule ip kube-proxy services ")
                || l.starts_with("add rule ip6 kube-proxy services ")
                || l.contains(" nodeport-endpoints-check ")
        })
        .filter(|l| !l.starts_with("add chain"))
        .collect()
}

#[test]
fn nft_match_all_nodeport_addresses_use_fib() {
    // kube-proxy's setupNFTables with `--nodeport-addresses` unset or a
    // prefix of length 0 (`nodePortAddresses.MatchAll()`): the
    // `nodeport-ips` set is added and deleted, node ports are matched with
    // `fib daddr type local` minus localhost, and the no-endpoints check
    // (in filter-input, local destinations only) with the localhost
    // exclusion alone. Lines as knftables writes kube-proxy's transaction.
    let table = overall_table_full();
    let want_v4 = [
        "add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }",
        "delete set ip kube-proxy nodeport-ips",
        "add rule ip kube-proxy nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports",
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
    ];
    for opts in [
        kube_proxy_test_options().node_ip("192.168.0.2".parse().unwrap()),
        kube_proxy_test_options()
            .node_ip("192.168.0.2".parse().unwrap())
            .nodeport_address("0.0.0.0/0".parse().unwrap()),
        // A prefix of the other family only: this family matches all.
        kube_proxy_test_options()
            .node_ip("192.168.0.2".parse().unwrap())
            .nodeport_address("2001:db8::/64".parse().unwrap()),
    ] {
        let text = render::nft::render(&table, &opts);
        assert_eq!(nft_nodeport_base_lines(&text), want_v4, "{text}");
        assert!(!text.contains("add element ip kube-proxy nodeport-ips"));
        assert!(!text.contains("@nodeport-ips"));
        // The node ports themselves are still in the map.
        assert!(
            text.contains(
                "add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-"
            )
        );
    }
    let v6 = render::nft::render(
        &ServiceTable::new(),
        &kube_proxy_test_options().family(IpFamily::V6),
    );
    assert_eq!(
        nft_nodeport_base_lines(&v6),
        [
            "add set ip6 kube-proxy nodeport-ips { type ipv6_addr ; comment \"IPs that accept NodePort traffic\" ; }",
            "delete set ip6 kube-proxy nodeport-ips",
            "add rule ip6 kube-proxy nodeport-endpoints-check ip6 daddr != ::1 meta l4proto . th dport vmap @no-endpoint-nodeports",
            "add rule ip6 kube-proxy services ip6 daddr . meta l4proto . th dport vmap @service-ips",
            "add rule ip6 kube-proxy services fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports",
        ],
        "{v6}"
    );
    // With a prefix, the set and its rules stay (TestOverallNFTablesRules).
    let text = render::nft::render(
        &table,
        &kube_proxy_test_options()
            .node_ip("192.168.0.2".parse().unwrap())
            .nodeport_address("192.168.0.2/32".parse().unwrap()),
    );
    assert_eq!(
        nft_nodeport_base_lines(&text),
        [
            "add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }",
            "add element ip kube-proxy nodeport-ips { 192.168.0.2 }",
            "add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        ]
    );
}

/// Two LoadBalancer services with `internalTrafficPolicy: Local`, a node
/// port, an LB IP and a local and a remote endpoint; svc1 with
/// `externalTrafficPolicy: Cluster`, svc2 with `Local`.
fn itp_local_external_table() -> ServiceTable {
    let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
    let mut changes = Vec::new();
    for (n, etp) in [(1, TrafficPolicy::Cluster), (2, TrafficPolicy::Local)] {
        let svc = Service::builder(format!("ns{n}"), format!("svc{n}"))
            .cluster_ip(ip(&format!("172.30.0.4{n}")))
            .service_type(ServiceType::LoadBalancer)
            .node_port_range(1..=32767)
            .port(ServicePortSpec::tcp(80).name("p80").node_port(3000 + n))
            .load_balancer_ingress(ip(&format!("1.2.3.{n}")), IpMode::VIP)
            .external_traffic_policy(etp)
            .internal_traffic_policy(TrafficPolicy::Local);
        changes.push(Change::UpsertService(svc.build().unwrap()));
        changes.push(Change::UpsertSlice(
            EndpointSlice::builder(
                format!("ns{n}"),
                format!("svc{n}-1"),
                format!("svc{n}"),
                AddressType::IPv4,
            )
            .port(SlicePortSpec::tcp(80).name("p80"))
            .endpoint(EndpointSpec::new(format!("10.180.0.{n}")).node("test-node"))
            .endpoint(EndpointSpec::new(format!("10.180.1.{n}")).node("remote"))
            .build()
            .unwrap(),
        ));
    }
    let mut table = ServiceTable::new();
    table.apply_batch(changes).unwrap();
    table
}

#[test]
fn itp_local_external_destinations_follow_the_external_policy() {
    // kube-proxy's syncProxyRules: internalTrafficPolicy affects the
    // cluster IP only (internalTrafficChain = KUBE-SVL-, or a DROP without
    // local endpoints); an externally accessible service always uses the
    // Cluster-policy chain (UsesClusterEndpoints), which its KUBE-EXT-
    // chain jumps to under externalTrafficPolicy Cluster and short-circuits
    // pod and LOCAL traffic to under Local, falling through to KUBE-SVL-.
    let table = itp_local_external_table();
    let opts = kube_proxy_test_options().node(NodeTopology::new("test-node", "zone-a"));
    let text = render::iptables::render(&table, &opts);
    let svc1 = "XPGD46QRK7WJZT7O";
    let svc2 = "GNZBNJ2PO5MGZ6GT";
    for want in [
        format!("-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVL-{svc1}"),
        format!("-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 loadbalancer IP\" -m tcp -p tcp -d 1.2.3.1 --dport 80 -j KUBE-EXT-{svc1}"),
        format!("-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-{svc1}"),
        format!("-A KUBE-EXT-{svc1} -m comment --comment \"masquerade traffic for ns1/svc1:p80 external destinations\" -j KUBE-MARK-MASQ"),
        format!("-A KUBE-EXT-{svc1} -j KUBE-SVC-{svc1}"),
        format!("-A KUBE-SVC-{svc1} -m comment --comment \"ns1/svc1:p80 -> 10.180.1.1:80\" -j KUBE-SEP-TOIS5JUHRKSSXDL7"),
        format!("-A KUBE-EXT-{svc2} -m comment --comment \"pod traffic for ns2/svc2:p80 external destinations\" -s 10.0.0.0/8 -j KUBE-SVC-{svc2}"),
        format!("-A KUBE-EXT-{svc2} -m comment --comment \"route LOCAL traffic for ns2/svc2:p80 external destinations\" -m addrtype --src-type LOCAL -j KUBE-SVC-{svc2}"),
        format!("-A KUBE-EXT-{svc2} -j KUBE-SVL-{svc2}"),
        "-A KUBE-SEP-TOIS5JUHRKSSXDL7 -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.1.1:80".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == want), "missing {want}\n{text}");
    }
    // One set of endpoint jumps in KUBE-SVL- (shared by both policies).
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with(&format!("-A KUBE-SVL-{svc2} ")) && l.contains("-> "))
            .count(),
        1
    );
    pinned("svclb-itp-local-external.iptables", &text);

    // Without a local endpoint: the cluster IP drops, svc1's external
    // destinations still reach both endpoints, svc2's drop from outside.
    let elsewhere = kube_proxy_test_options().node(NodeTopology::new("elsewhere", "zone-a"));
    let text = render::iptables::render(&table, &elsewhere);
    for want in [
        "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 has no local endpoints\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j DROP".to_owned(),
        "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"ns2/svc2:p80 has no local endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3002 -j DROP".to_owned(),
        format!("-A KUBE-EXT-{svc1} -j KUBE-SVC-{svc1}"),
    ] {
        assert!(text.lines().any(|l| l == want), "missing {want}\n{text}");
    }
    assert!(!text.contains(&format!(":KUBE-SVL-{svc1}")), "{text}");
    assert!(!text.contains(&format!("-A KUBE-EXT-{svc2} -j ")), "{text}");

    // nftables: the cluster IP goes to local-, the external destinations to
    // external-, which goes to the Cluster-policy service- chain.
    let nft = render::nft::render(&table, &opts);
    for want in [
        "add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto local-ULMVA6XW-ns1/svc1/tcp/p80 }",
        "add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }",
        "add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 goto service-ULMVA6XW-ns1/svc1/tcp/p80",
        "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 , 1 : goto endpoint-B7I4G2ZB-ns1/svc1/tcp/p80__10.180.1.1/80 }",
        "add rule ip kube-proxy endpoint-B7I4G2ZB-ns1/svc1/tcp/p80__10.180.1.1/80 meta l4proto tcp dnat to 10.180.1.1:80",
        "add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 ip saddr 10.0.0.0/8 goto service-42NFTM6N-ns2/svc2/tcp/p80 comment \"short-circuit pod traffic\"",
        "add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 goto local-42NFTM6N-ns2/svc2/tcp/p80",
    ] {
        assert!(nft.lines().any(|l| l == want), "missing {want}\n{nft}");
    }
    // Each chain declared once.
    let mut decls: Vec<&str> = nft.lines().filter(|l| l.starts_with("add chain")).collect();
    let n = decls.len();
    decls.sort_unstable();
    decls.dedup();
    assert_eq!(decls.len(), n, "a chain declared twice\n{nft}");
    pinned("svclb-itp-local-external.nft", &nft);
}
