//! The virtual services kube-proxy's IPVS mode creates, listed like
//! `ipvsadm -ln` and compared line by line: one per cluster IP, per node IP
//! of the service's family and node port, per external IP and per
//! load-balancer ingress IP (`ipMode: VIP`), each with the service's
//! scheduler and persistence; external ones under `externalTrafficPolicy:
//! Local` list only this node's endpoints.
//!
//! The cases are kube-proxy's own (`pkg/proxy/ipvs/proxier_test.go`; each
//! names its test and case): the same services, endpoint slices, node IPs
//! and `--nodeport-addresses`, and the virtual servers and real servers
//! the test expects, written as the listing `ipvsadm -ln` prints for them.
//! kube-proxy's fake proxier has one family; svclb's dataplane is dual
//! stack, so the node IPs of the other family are given too and must not
//! show up.
//!
//! Each case also checks that the dataplane's `route` agrees with its
//! listing: a new connection from outside the cluster to a listed virtual
//! service reaches exactly its real servers (or is refused when it has
//! none), and one to an address:port that is not listed is not a service.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use svclb::render::{self, Cidr, RenderOptions};
use svclb::*;

const HOST: &str = "test-hostname";

const HEADER: &str = "IP Virtual Server version 1.2.1 (size=4096)\n\
Prot LocalAddress:Port Scheduler Flags\n\
\x20 -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// One real-server line (`Masq`, weight 1, no connections).
fn rs(addr: &str) -> String {
    format!("  -> {addr:<28} Masq    1      0          0         \n")
}

/// A listing: the header, then each `(service line, real servers)`.
fn listing(services: &[(&str, &[&str])]) -> String {
    let mut out = HEADER.to_owned();
    for (vs, dests) in services {
        out.push_str(vs);
        out.push('\n');
        for d in *dests {
            out.push_str(&rs(d));
        }
    }
    out
}

struct Case {
    /// kube-proxy's test and case name.
    name: &'static str,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    node_ips: &'static [&'static str],
    nodeport_addresses: &'static [&'static str],
    want: String,
    /// `IP:port`s (with the protocol of the case) that must not be
    /// services: node ports of the other family, loopback, ...
    not_services: &'static [&'static str],
    protocol: Protocol,
}

fn node_port_service(ty: ServiceType, cluster_ip: &str, port: ServicePortSpec) -> ServiceBuilder {
    Service::builder("ns1", "svc1")
        .cluster_ip(ip(cluster_ip))
        .service_type(ty)
        .node_port_range(1..=65_535)
        .port(port)
}

/// kube-proxy's `makeTestEndpointSlice(ns1, svc1, n, ...)`: one port `p80`
/// (80) of `protocol`, endpoints `(IP, nodeName)`.
fn slice(n: u32, protocol: Protocol, eps: &[(&str, Option<&str>)]) -> EndpointSlice {
    let family = if eps[0].0.contains(':') {
        AddressType::IPv6
    } else {
        AddressType::IPv4
    };
    EndpointSlice::builder("ns1", format!("svc1-{n}"), "svc1", family)
        .port(SlicePortSpec::new(protocol, 80).name("p80"))
        .endpoints(eps.iter().map(|(a, node)| {
            let e = EndpointSpec::new(*a);
            match node {
                Some(n) => e.node(*n),
                None => e,
            }
        }))
        .build()
        .unwrap()
}

fn p80(protocol: Protocol) -> ServicePortSpec {
    ServicePortSpec::new(protocol, 80).name("p80")
}

fn cases() -> Vec<Case> {
    use Protocol::{Sctp, Tcp, Udp};
    let np = |protocol| p80(protocol).node_port(3001);
    vec![
        Case {
            name: "TestNodePortIPv4: 1 service with node port, has 2 endpoints",
            services: vec![
                node_port_service(ServiceType::NodePort, "10.20.30.41", np(Tcp))
                    .build()
                    .unwrap(),
            ],
            // The IPv6 slice belongs to no IPv6 cluster IP: ignored.
            slices: vec![
                slice(1, Tcp, &[("10.180.0.1", None)]),
                slice(2, Tcp, &[("1002:ab8::2:10", None)]),
            ],
            node_ips: &["100.101.102.103", "2001:db8::1:1"],
            nodeport_addresses: &[],
            want: listing(&[
                ("TCP  10.20.30.41:80 rr", &["10.180.0.1:80"]),
                ("TCP  100.101.102.103:3001 rr", &["10.180.0.1:80"]),
            ]),
            not_services: &["[2001:db8::1:1]:3001"],
            protocol: Tcp,
        },
        Case {
            name: "TestNodePortIPv4: 1 UDP service with node port, has endpoints",
            services: vec![
                node_port_service(ServiceType::NodePort, "10.20.30.41", np(Udp))
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Udp, &[("10.180.0.1", None)])],
            node_ips: &["100.101.102.103"],
            nodeport_addresses: &["0.0.0.0/0"],
            want: listing(&[
                ("UDP  10.20.30.41:80 rr", &["10.180.0.1:80"]),
                ("UDP  100.101.102.103:3001 rr", &["10.180.0.1:80"]),
            ]),
            not_services: &[],
            protocol: Udp,
        },
        Case {
            name: "TestNodePortIPv4: service has node port but no endpoints",
            services: vec![
                node_port_service(ServiceType::NodePort, "10.20.30.41", np(Tcp))
                    .build()
                    .unwrap(),
            ],
            slices: vec![],
            node_ips: &["100.101.102.103"],
            nodeport_addresses: &[],
            // No real servers corresponding to no endpoints.
            want: listing(&[
                ("TCP  10.20.30.41:80 rr", &[]),
                ("TCP  100.101.102.103:3001 rr", &[]),
            ]),
            not_services: &[],
            protocol: Tcp,
        },
        Case {
            name: "TestNodePortIPv4: node port service with protocol sctp on a node with multiple nodeIPs",
            services: vec![
                node_port_service(ServiceType::NodePort, "10.20.30.41", np(Sctp))
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Sctp, &[("10.180.0.1", None)])],
            node_ips: &[
                "100.101.102.103",
                "100.101.102.104",
                "100.101.102.105",
                "2001:db8::1:1",
                "2001:db8::1:2",
                "2001:db8::1:3",
            ],
            nodeport_addresses: &[],
            want: listing(&[
                ("SCTP  10.20.30.41:80 rr", &["10.180.0.1:80"]),
                ("SCTP  100.101.102.103:3001 rr", &["10.180.0.1:80"]),
                ("SCTP  100.101.102.104:3001 rr", &["10.180.0.1:80"]),
                ("SCTP  100.101.102.105:3001 rr", &["10.180.0.1:80"]),
            ]),
            not_services: &["[2001:db8::1:1]:3001", "[2001:db8::1:3]:3001"],
            protocol: Sctp,
        },
        Case {
            name: "TestNodePortIPv4: node port service with protocol sctp and externalTrafficPolicy local",
            services: vec![
                node_port_service(ServiceType::NodePort, "10.20.30.41", np(Sctp))
                    .external_traffic_policy(TrafficPolicy::Local)
                    .build()
                    .unwrap(),
            ],
            // kube-proxy's "otherHost" is no valid nodeName (a DNS
            // subdomain, as the API server validates it): "other-host".
            slices: vec![slice(
                1,
                Sctp,
                &[
                    ("10.180.0.1", Some(HOST)),
                    ("10.180.1.1", Some("other-host")),
                ],
            )],
            node_ips: &["100.101.102.103"],
            nodeport_addresses: &[],
            // The node port lists only this node's endpoint.
            want: listing(&[
                (
                    "SCTP  10.20.30.41:80 rr",
                    &["10.180.0.1:80", "10.180.1.1:80"],
                ),
                ("SCTP  100.101.102.103:3001 rr", &["10.180.0.1:80"]),
            ]),
            not_services: &[],
            protocol: Sctp,
        },
        Case {
            name: "TestNodePortIPv6: 1 service with node port, has 2 endpoints",
            services: vec![
                node_port_service(ServiceType::NodePort, "2020::1", np(Tcp))
                    .build()
                    .unwrap(),
            ],
            slices: vec![
                slice(1, Tcp, &[("10.180.0.1", None)]),
                slice(2, Tcp, &[("1002:ab8::2:10", None)]),
            ],
            node_ips: &["100.101.102.103", "2001:db8::1:1"],
            nodeport_addresses: &[],
            want: listing(&[
                ("TCP  [2001:db8::1:1]:3001 rr", &["[1002:ab8::2:10]:80"]),
                ("TCP  [2020::1]:80 rr", &["[1002:ab8::2:10]:80"]),
            ]),
            not_services: &["100.101.102.103:3001"],
            protocol: Tcp,
        },
        Case {
            name: "TestNodePortIPv6: service has node port but no endpoints",
            services: vec![
                node_port_service(ServiceType::NodePort, "2020::1", np(Tcp))
                    .build()
                    .unwrap(),
            ],
            slices: vec![],
            node_ips: &["100.101.102.103", "2001:db8::1:1"],
            nodeport_addresses: &[],
            want: listing(&[
                ("TCP  [2001:db8::1:1]:3001 rr", &[]),
                ("TCP  [2020::1]:80 rr", &[]),
            ]),
            not_services: &["100.101.102.103:3001"],
            protocol: Tcp,
        },
        Case {
            name: "TestNodePortIPv6: node port service with protocol sctp on a node with multiple nodeIPs",
            services: vec![
                node_port_service(ServiceType::NodePort, "2020::1", np(Sctp))
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Sctp, &[("2001::1", None)])],
            node_ips: &["2001:db8::1:1", "2001:db8::1:2"],
            nodeport_addresses: &[],
            want: listing(&[
                ("SCTP  [2001:db8::1:1]:3001 rr", &["[2001::1]:80"]),
                ("SCTP  [2001:db8::1:2]:3001 rr", &["[2001::1]:80"]),
                ("SCTP  [2020::1]:80 rr", &["[2001::1]:80"]),
            ]),
            not_services: &[],
            protocol: Sctp,
        },
        Case {
            // kube-proxy's test gives the slice port protocol UDP against
            // a TCP service port and only checks the real servers it finds;
            // here the slice port is TCP, so the real servers are checked.
            // Its third external IP, 127.0.0.1, is left out: the API server
            // refuses loopback external IPs (ValidateNonSpecialIP), and so
            // does svclb's validation.
            name: "TestExternalIPs",
            services: vec![
                Service::builder("ns1", "svc1")
                    .cluster_ip(ip("10.20.30.41"))
                    .external_ip(ip("50.60.70.81"))
                    .external_ip(ip("2012::51"))
                    .port(p80(Tcp).target_port(80))
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Tcp, &[("10.180.0.1", None)])],
            node_ips: &[],
            nodeport_addresses: &[],
            // "ipvs filters out by ipfamily": 2012::51 is not a service.
            want: listing(&[
                ("TCP  10.20.30.41:80 rr", &["10.180.0.1:80"]),
                ("TCP  50.60.70.81:80 rr", &["10.180.0.1:80"]),
            ]),
            not_services: &["[2012::51]:80"],
            protocol: Tcp,
        },
        Case {
            name: "TestExternalIPsNoEndpoint",
            services: vec![
                Service::builder("ns1", "svc1")
                    .cluster_ip(ip("10.20.30.41"))
                    .external_ip(ip("50.60.70.81"))
                    .port(p80(Tcp).target_port(80))
                    .build()
                    .unwrap(),
            ],
            slices: vec![],
            node_ips: &[],
            nodeport_addresses: &[],
            want: listing(&[
                ("TCP  10.20.30.41:80 rr", &[]),
                ("TCP  50.60.70.81:80 rr", &[]),
            ]),
            not_services: &[],
            protocol: Tcp,
        },
        Case {
            // A NodePort service without a nodePort (the test leaves it 0)
            // and no node IPs: only the cluster IP and the external IPs
            // (127.0.0.1 left out, as in TestExternalIPs).
            name: "TestOnlyLocalExternalIPs",
            services: vec![
                Service::builder("ns1", "svc1")
                    .cluster_ip(ip("10.20.30.41"))
                    .service_type(ServiceType::NodePort)
                    .external_ip(ip("50.60.70.81"))
                    .external_ip(ip("2012::51"))
                    .port(p80(Tcp).target_port(80))
                    .external_traffic_policy(TrafficPolicy::Local)
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(
                1,
                Tcp,
                &[
                    ("10.180.0.1", Some(HOST)),
                    ("10.180.1.1", Some("other-hostname")),
                ],
            )],
            node_ips: &[],
            nodeport_addresses: &[],
            // "Expect only 1 local endpoint" on each external IP.
            want: listing(&[
                (
                    "TCP  10.20.30.41:80 rr",
                    &["10.180.0.1:80", "10.180.1.1:80"],
                ),
                ("TCP  50.60.70.81:80 rr", &["10.180.0.1:80"]),
            ]),
            not_services: &["[2012::51]:80"],
            protocol: Tcp,
        },
        Case {
            // The fake proxier has no node addresses: no node-port virtual
            // service ("Expect 2 services and 1 destination"). kube-proxy's
            // test gives the slice port protocol UDP; TCP here.
            name: "TestLoadBalancer",
            services: vec![
                node_port_service(ServiceType::LoadBalancer, "10.20.30.41", np(Tcp))
                    .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Tcp, &[("10.180.0.1", None)])],
            node_ips: &[],
            nodeport_addresses: &[],
            want: listing(&[
                ("TCP  1.2.3.4:80 rr", &["10.180.0.1:80"]),
                ("TCP  10.20.30.41:80 rr", &["10.180.0.1:80"]),
            ]),
            not_services: &["1.2.3.4:3001"],
            protocol: Tcp,
        },
        Case {
            name: "TestOnlyLocalLoadBalancing",
            services: vec![
                node_port_service(ServiceType::LoadBalancer, "10.20.30.41", np(Tcp))
                    .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
                    .external_traffic_policy(TrafficPolicy::Local)
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(
                1,
                Tcp,
                &[
                    ("10.180.0.1", Some(HOST)),
                    ("10.180.1.1", Some("other-hostname")),
                ],
            )],
            node_ips: &[],
            nodeport_addresses: &[],
            // The local endpoint is a real server of the LB IP, the remote
            // one is not.
            want: listing(&[
                ("TCP  1.2.3.4:80 rr", &["10.180.0.1:80"]),
                (
                    "TCP  10.20.30.41:80 rr",
                    &["10.180.0.1:80", "10.180.1.1:80"],
                ),
            ]),
            not_services: &[],
            protocol: Tcp,
        },
        Case {
            name: "TestOnlyLocalNodePorts",
            services: vec![
                node_port_service(ServiceType::NodePort, "10.20.30.41", np(Tcp))
                    .external_traffic_policy(TrafficPolicy::Local)
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(
                1,
                Tcp,
                &[
                    ("10.180.0.1", Some(HOST)),
                    ("10.180.1.1", Some("other-hostname")),
                ],
            )],
            node_ips: &["100.101.102.103", "2001:db8::"],
            nodeport_addresses: &["100.101.102.0/24", "2001:db8::/64"],
            // "Expect 2 (matching ipvs IPFamily field) services and 1
            // destination".
            want: listing(&[
                (
                    "TCP  10.20.30.41:80 rr",
                    &["10.180.0.1:80", "10.180.1.1:80"],
                ),
                ("TCP  100.101.102.103:3001 rr", &["10.180.0.1:80"]),
            ]),
            not_services: &["[2001:db8::]:3001"],
            protocol: Tcp,
        },
        Case {
            // proxier.go (syncProxyRules): every virtual server of a
            // ClientIP service, cluster IP, external IP, load-balancer IP
            // and node port alike, gets FlagPersistent and the service's
            // timeout. The loopback node IP gets no node port (the node
            // addresses leave loopback out: isValidForSet); an `ipMode:
            // Proxy` ingress IP is not captured (LoadBalancerVIPs).
            name: "proxier.go: persistence on every virtual server, no loopback node port",
            services: vec![
                node_port_service(ServiceType::LoadBalancer, "10.20.30.41", np(Tcp))
                    .external_ip(ip("50.60.70.81"))
                    .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
                    .load_balancer_ingress(ip("1.2.3.5"), IpMode::Proxy)
                    .client_ip_affinity(Some(10_800))
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Tcp, &[("10.180.0.1", None), ("10.180.0.2", None)])],
            node_ips: &["100.101.102.103", "127.0.0.1"],
            nodeport_addresses: &[],
            want: listing(&[
                (
                    "TCP  1.2.3.4:80 rr persistent 10800",
                    &["10.180.0.1:80", "10.180.0.2:80"],
                ),
                (
                    "TCP  10.20.30.41:80 rr persistent 10800",
                    &["10.180.0.1:80", "10.180.0.2:80"],
                ),
                (
                    "TCP  50.60.70.81:80 rr persistent 10800",
                    &["10.180.0.1:80", "10.180.0.2:80"],
                ),
                (
                    "TCP  100.101.102.103:3001 rr persistent 10800",
                    &["10.180.0.1:80", "10.180.0.2:80"],
                ),
            ]),
            not_services: &["127.0.0.1:3001", "1.2.3.5:80"],
            protocol: Tcp,
        },
        Case {
            // proxier.go (syncEndpoint): an external virtual server of an
            // externalTrafficPolicy: Local service with no local endpoint
            // gets the Cluster-policy endpoints ("Allow access from local
            // PODs even if no local endpoints exist", kubernetes PR 97081),
            // where the iptables and nftables modes drop.
            name: "proxier.go syncEndpoint: external Local without a local endpoint lists the cluster endpoints",
            services: vec![
                node_port_service(ServiceType::LoadBalancer, "10.20.30.41", np(Tcp))
                    .external_ip(ip("50.60.70.81"))
                    .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
                    .external_traffic_policy(TrafficPolicy::Local)
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(
                1,
                Tcp,
                &[
                    ("10.180.1.1", Some("other-hostname")),
                    ("10.180.2.1", Some("other-hostname")),
                ],
            )],
            node_ips: &["100.101.102.103"],
            nodeport_addresses: &[],
            want: listing(&[
                ("TCP  1.2.3.4:80 rr", &["10.180.1.1:80", "10.180.2.1:80"]),
                (
                    "TCP  10.20.30.41:80 rr",
                    &["10.180.1.1:80", "10.180.2.1:80"],
                ),
                (
                    "TCP  50.60.70.81:80 rr",
                    &["10.180.1.1:80", "10.180.2.1:80"],
                ),
                (
                    "TCP  100.101.102.103:3001 rr",
                    &["10.180.1.1:80", "10.180.2.1:80"],
                ),
            ]),
            not_services: &[],
            protocol: Tcp,
        },
        Case {
            // The same with internalTrafficPolicy: Local too. kube-proxy's
            // UsesClusterEndpoints holds for every port of a service that
            // accepts external traffic ("we need Cluster endpoints to
            // implement short circuiting", pkg/proxy/serviceport.go), so
            // CategorizeEndpoints computes them, and syncEndpoint lists them
            // on every Local virtual server without a local endpoint: the
            // cluster IP's (internalNodeLocal) as well as the node port's.
            name: "proxier.go syncEndpoint: external and internal Local without a local endpoint list the cluster endpoints",
            services: vec![
                node_port_service(ServiceType::NodePort, "10.20.30.41", np(Tcp))
                    .external_traffic_policy(TrafficPolicy::Local)
                    .internal_traffic_policy(TrafficPolicy::Local)
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Tcp, &[("10.180.1.1", Some("other-hostname"))])],
            node_ips: &["100.101.102.103"],
            nodeport_addresses: &[],
            want: listing(&[
                ("TCP  10.20.30.41:80 rr", &["10.180.1.1:80"]),
                ("TCP  100.101.102.103:3001 rr", &["10.180.1.1:80"]),
            ]),
            not_services: &[],
            protocol: Tcp,
        },
        Case {
            // A ClusterIP service under internalTrafficPolicy: Local accepts
            // no external traffic: no cluster endpoints (UsesClusterEndpoints
            // is false), so its virtual server stays empty.
            name: "proxier.go syncEndpoint: internal Local ClusterIP service without a local endpoint lists nothing",
            services: vec![
                Service::builder("ns1", "svc1")
                    .cluster_ip(ip("10.20.30.41"))
                    .port(p80(Tcp))
                    .internal_traffic_policy(TrafficPolicy::Local)
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Tcp, &[("10.180.1.1", Some("other-hostname"))])],
            node_ips: &["100.101.102.103"],
            nodeport_addresses: &[],
            want: listing(&[("TCP  10.20.30.41:80 rr", &[])]),
            not_services: &[],
            protocol: Tcp,
        },
        Case {
            // netlink_linux.go (isValidForSet): with every node IP taking
            // node ports (no --nodeport-addresses), the IPVS mode's node
            // addresses leave out IPv6 link-local (and loopback) ones.
            name: "netlink_linux.go isValidForSet: no node port on an IPv6 link-local node IP",
            services: vec![
                node_port_service(ServiceType::NodePort, "2020::1", np(Tcp))
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Tcp, &[("1002:ab8::2:10", None)])],
            node_ips: &["fe80::1", "2001:db8::1:1", "::1", "fe80::2"],
            nodeport_addresses: &["::/0"],
            want: listing(&[
                ("TCP  [2001:db8::1:1]:3001 rr", &["[1002:ab8::2:10]:80"]),
                ("TCP  [2020::1]:80 rr", &["[1002:ab8::2:10]:80"]),
            ]),
            not_services: &["[fe80::1]:3001", "[fe80::2]:3001", "[::1]:3001"],
            protocol: Tcp,
        },
        Case {
            // proxyutil NodePortAddresses.GetNodeIPs: an explicit prefix
            // takes the node IPs inside it, link-local ones included.
            name: "nodeport_addresses.go GetNodeIPs: a link-local node IP inside --nodeport-addresses takes node ports",
            services: vec![
                node_port_service(ServiceType::NodePort, "2020::1", np(Tcp))
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Tcp, &[("1002:ab8::2:10", None)])],
            node_ips: &["fe80::1", "2001:db8::1:1"],
            nodeport_addresses: &["fe80::/10"],
            want: listing(&[
                ("TCP  [2020::1]:80 rr", &["[1002:ab8::2:10]:80"]),
                ("TCP  [fe80::1]:3001 rr", &["[1002:ab8::2:10]:80"]),
            ]),
            not_services: &["[2001:db8::1:1]:3001"],
            protocol: Tcp,
        },
    ]
}

fn dataplane(case: &Case) -> (ServiceTable, IpvsDataplane) {
    let mut table = ServiceTable::new();
    let changes: Vec<Change> = case
        .services
        .iter()
        .cloned()
        .map(Change::UpsertService)
        .chain(case.slices.iter().cloned().map(Change::UpsertSlice))
        .collect();
    table.apply_batch(changes).unwrap();
    let mut config = DataplaneConfig::with_seed(5)
        .node(NodeTopology::new(HOST, "zone-a"))
        .nodeport_addresses(
            case.nodeport_addresses
                .iter()
                .map(|c| c.parse::<Cidr>().unwrap())
                .collect(),
        );
    for a in case.node_ips {
        config = config.node_ip(ip(a));
    }
    config.conntrack = None;
    let dp = IpvsDataplane::new(config);
    dp.sync(&table, &table.full_change_set(), Instant::ZERO);
    (table, dp)
}

/// What new connections from outside the cluster to `dst` get (32 clients,
/// so persistence pins each to one real server but not all to the same):
/// the backends reached, or the one other verdict.
fn routed(
    dp: &IpvsDataplane,
    protocol: Protocol,
    dst: SocketAddr,
) -> Result<BTreeSet<SocketAddr>, &'static str> {
    let mut reached = BTreeSet::new();
    let mut other = BTreeSet::new();
    for i in 0..32u8 {
        let client = if dst.is_ipv4() {
            format!("203.0.113.{}", 10 + i)
        } else {
            format!("2001:db8:ffff::{:x}", 10 + i)
        };
        let f = Flow::new(protocol, SocketAddr::new(ip(&client), 40_000), dst);
        match dp.route(&f, Instant::ZERO) {
            Verdict::Forward(fw) => {
                reached.insert(fw.backend);
            }
            v => {
                other.insert(v.kind_str());
            }
        }
    }
    match (reached.is_empty(), other.len()) {
        (false, 0) => Ok(reached),
        (true, 1) => Err(other.into_iter().next().unwrap()),
        _ => panic!("{dst}: mixed outcomes {reached:?} {other:?}"),
    }
}

#[test]
fn ipvs_virtual_services_are_kube_proxys() {
    let mut failures = Vec::new();
    for case in cases() {
        let (table, dp) = dataplane(&case);
        let text = render::ipvsadm::render(&table, &dp, &RenderOptions::default());
        let ours: Vec<&str> = text.lines().collect();
        let theirs: Vec<&str> = case.want.lines().collect();
        if ours != theirs {
            failures.push(format!(
                "{}:\n--- kube-proxy\n{}\n--- svclb\n{}",
                case.name, case.want, text
            ));
            continue;
        }
        // route agrees with the listing.
        for vs in dp.virtual_services() {
            let dst = SocketAddr::new(vs.addr, vs.port);
            let listed: BTreeSet<SocketAddr> = vs.destinations.iter().map(|d| d.addr).collect();
            let got = routed(&dp, vs.protocol, dst);
            let ok = if listed.is_empty() {
                matches!(got, Err("REJECT" | "DROP"))
            } else {
                got.as_ref() == Ok(&listed)
            };
            if !ok {
                failures.push(format!(
                    "{}: {dst} lists {listed:?} but route gives {got:?}",
                    case.name
                ));
            }
        }
        for s in case.not_services {
            let dst: SocketAddr = s.parse().unwrap();
            let got = routed(&dp, case.protocol, dst);
            if got != Err("NO-SERVICE") {
                failures.push(format!(
                    "{}: {dst} is not listed but route gives {got:?}",
                    case.name
                ));
            }
        }
        println!("ok: {}", case.name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn loopback_node_ports_follow_the_mode_unless_overridden() {
    // kube-proxy's IPVS and nftables modes answer no node port on loopback;
    // its iptables mode does (localhost node ports). A caller that serves
    // loopback node IPs itself (a userspace proxy) can turn them on.
    let mut table = ServiceTable::new();
    table
        .apply_batch([
            Change::UpsertService(
                node_port_service(
                    ServiceType::NodePort,
                    "10.20.30.41",
                    p80(Protocol::Tcp).node_port(3001),
                )
                .build()
                .unwrap(),
            ),
            Change::UpsertSlice(slice(1, Protocol::Tcp, &[("10.180.0.1", None)])),
        ])
        .unwrap();
    let lo: SocketAddr = "127.0.0.1:3001".parse().unwrap();
    let config = |over: Option<bool>| {
        let mut c = DataplaneConfig::with_seed(1).node_ip(ip("127.0.0.1"));
        c.loopback_node_ports = over;
        c.conntrack = None;
        c
    };
    let verdict = |dp: &dyn Dataplane| {
        dp.sync(&table, &table.full_change_set(), Instant::ZERO);
        dp.route(
            &Flow::tcp("127.0.0.1:40000".parse().unwrap(), lo),
            Instant::ZERO,
        )
        .kind_str()
    };
    assert_eq!(verdict(&IpvsDataplane::new(config(None))), "NO-SERVICE");
    assert_eq!(verdict(&NftablesDataplane::new(config(None))), "NO-SERVICE");
    assert_eq!(verdict(&IptablesDataplane::new(config(None))), "FORWARD");
    assert_eq!(verdict(&IpvsDataplane::new(config(Some(true)))), "FORWARD");
    assert_eq!(
        verdict(&IptablesDataplane::new(config(Some(false)))),
        "NO-SERVICE"
    );
}

/// One ETP=Local service on this node: a local endpoint and a remote one,
/// with its node port, external IP and load-balancer IP.
fn local_service_table() -> ServiceTable {
    let mut table = ServiceTable::new();
    table
        .apply_batch([
            Change::UpsertService(
                node_port_service(
                    ServiceType::LoadBalancer,
                    "10.20.30.41",
                    p80(Protocol::Tcp).node_port(3001),
                )
                .external_ip(ip("50.60.70.81"))
                .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
                .external_traffic_policy(TrafficPolicy::Local)
                .build()
                .unwrap(),
            ),
            Change::UpsertSlice(slice(
                1,
                Protocol::Tcp,
                &[
                    ("10.180.0.1", Some(HOST)),
                    ("10.180.1.1", Some("other-hostname")),
                ],
            )),
        ])
        .unwrap();
    table
}

fn local_config(seed: u64) -> DataplaneConfig {
    let mut c = DataplaneConfig::with_seed(seed)
        .node(NodeTopology::new(HOST, "zone-a"))
        .node_ip(ip("100.101.102.103"))
        .cluster_cidr("10.0.0.0/8".parse().unwrap());
    c.conntrack = None;
    c
}

/// The backends and masquerade decisions new connections from `src` to
/// `dst` get (64 source ports).
fn reached(dp: &dyn Dataplane, src: &str, dst: &str) -> (BTreeSet<SocketAddr>, BTreeSet<bool>) {
    let (mut backends, mut masq) = (BTreeSet::new(), BTreeSet::new());
    for sport in 40_000..40_064u16 {
        let f = Flow::tcp(SocketAddr::new(ip(src), sport), dst.parse().unwrap());
        match dp.route(&f, Instant::ZERO) {
            Verdict::Forward(fw) => {
                backends.insert(fw.backend);
                masq.insert(fw.masquerade);
            }
            v => panic!("{src} -> {dst}: {}", v.kind_str()),
        }
    }
    (backends, masq)
}

#[test]
fn ipvs_mode_has_no_short_circuit_for_external_local_destinations() {
    // kube-proxy's IPVS mode (proxier.go, syncProxyRules and syncEndpoint)
    // gives every external virtual server of an ETP=Local service the
    // local endpoints only, whoever connects: there is no "pod traffic for
    // external destinations" rule as in the iptables (KUBE-EXT-) and
    // nftables (external-) chains, which send this node's pods and the node
    // itself to the Cluster-policy endpoints. Nor does it mark any of that
    // traffic for masquerade (KUBE-NODE-PORT-LOCAL-TCP and
    // KUBE-LOAD-BALANCER-LOCAL RETURN before KUBE-MARK-MASQ,
    // KUBE-EXTERNAL-IP-LOCAL has no masquerade rule), where the iptables
    // mode masquerades the node's own traffic.
    let table = local_service_table();
    let ipvs = IpvsDataplane::new(local_config(1));
    let iptables = IptablesDataplane::new(local_config(2));
    for dp in [&ipvs as &dyn Dataplane, &iptables] {
        dp.sync(&table, &table.full_change_set(), Instant::ZERO);
    }
    let local: BTreeSet<SocketAddr> = ["10.180.0.1:80".parse().unwrap()].into();
    let both: BTreeSet<SocketAddr> = ["10.180.0.1:80", "10.180.1.1:80"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let pod = "10.244.3.7";
    let node = "100.101.102.103";
    let outside = "203.0.113.9";
    for dst in ["100.101.102.103:3001", "50.60.70.81:80", "1.2.3.4:80"] {
        for src in [pod, node, outside] {
            assert_eq!(
                reached(&ipvs, src, dst),
                (local.clone(), [false].into()),
                "ipvs: {src} -> {dst}"
            );
        }
        // The iptables mode short-circuits this node's pods and the node
        // to both endpoints, and masquerades the node's own traffic.
        assert_eq!(
            reached(&iptables, pod, dst),
            (both.clone(), [false].into()),
            "iptables: pod -> {dst}"
        );
        assert_eq!(
            reached(&iptables, node, dst).0,
            both,
            "iptables: node -> {dst}"
        );
        assert!(
            reached(&iptables, node, dst).1.contains(&true),
            "iptables: node -> {dst}"
        );
        assert_eq!(
            reached(&iptables, outside, dst),
            (local.clone(), [false].into()),
            "iptables: outside -> {dst}"
        );
    }
    // The IPVS listing agrees: the local real server alone on each
    // external virtual server.
    for vs in ipvs.virtual_services() {
        let dests: BTreeSet<SocketAddr> = vs.destinations.iter().map(|d| d.addr).collect();
        let want = if vs.addr == ip("10.20.30.41") {
            &both
        } else {
            &local
        };
        assert_eq!(&dests, want, "{}:{}", vs.addr, vs.port);
    }
}

#[test]
fn ipvs_mode_external_local_without_local_endpoint_reaches_the_cluster_endpoints_unmasqueraded() {
    // syncEndpoint (PR 97081): no local endpoint, so the external virtual
    // servers list the cluster endpoints, for every source, and the
    // traffic keeps its source (the Local sets RETURN before the masquerade
    // mark). The iptables mode drops traffic from outside instead.
    let mut table = local_service_table();
    table
        .apply(Change::UpsertSlice(slice(
            1,
            Protocol::Tcp,
            &[
                ("10.180.1.1", Some("other-hostname")),
                ("10.180.2.1", Some("other-hostname")),
            ],
        )))
        .unwrap();
    let ipvs = IpvsDataplane::new(local_config(1));
    let iptables = IptablesDataplane::new(local_config(2));
    for dp in [&ipvs as &dyn Dataplane, &iptables] {
        dp.sync(&table, &table.full_change_set(), Instant::ZERO);
    }
    let cluster: BTreeSet<SocketAddr> = ["10.180.1.1:80", "10.180.2.1:80"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    for dst in ["100.101.102.103:3001", "50.60.70.81:80", "1.2.3.4:80"] {
        for src in ["10.244.3.7", "100.101.102.103", "203.0.113.9"] {
            assert_eq!(
                reached(&ipvs, src, dst),
                (cluster.clone(), [false].into()),
                "ipvs: {src} -> {dst}"
            );
        }
        let f = Flow::tcp("203.0.113.9:40000".parse().unwrap(), dst.parse().unwrap());
        assert_eq!(
            iptables.route(&f, Instant::ZERO).kind_str(),
            "DROP",
            "iptables: {dst}"
        );
        assert_eq!(
            ipvs.candidates(Protocol::Tcp, dst.parse().unwrap()),
            Candidates::Endpoints(cluster.iter().copied().collect()),
            "ipvs candidates: {dst}"
        );
    }
}

#[test]
fn ipvs_listing_prints_kube_proxys_mh_flags() {
    // kube-proxy's `--ipvs-scheduler mh` sets FlagSourceHash (0x10, the
    // kernel's IP_VS_SVC_F_SCHED_MH_PORT) on every virtual server
    // (proxier.go, syncProxyRules: `if proxier.ipvsScheduler == "mh"`):
    // svclb's `mh-port`. ipvsadm 1.31 prints the flags in parentheses
    // after the scheduler, before the persistence.
    let mut table = ServiceTable::new();
    table
        .apply_batch([
            Change::UpsertService(
                node_port_service(
                    ServiceType::NodePort,
                    "10.20.30.41",
                    p80(Protocol::Tcp).node_port(3001),
                )
                .client_ip_affinity(Some(10_800))
                .build()
                .unwrap(),
            ),
            Change::UpsertSlice(slice(1, Protocol::Tcp, &[("10.180.0.1", None)])),
        ])
        .unwrap();
    let mut config = DataplaneConfig::with_seed(3)
        .node_ip(ip("100.101.102.103"))
        .scheduler(SchedulerKind::MaglevPort);
    config.conntrack = None;
    let dp = IpvsDataplane::new(config);
    dp.sync(&table, &table.full_change_set(), Instant::ZERO);
    let text = render::ipvsadm::render(&table, &dp, &RenderOptions::default());
    assert_eq!(
        text,
        listing(&[
            (
                "TCP  10.20.30.41:80 mh (mh-port) persistent 10800",
                &["10.180.0.1:80"]
            ),
            (
                "TCP  100.101.102.103:3001 mh (mh-port) persistent 10800",
                &["10.180.0.1:80"]
            ),
        ])
    );
}

/// One of kube-proxy's IPVS tests that checks ipset entries
/// (`checkIPSet`: only the sets it names, each exactly).
struct IpsetCase {
    name: &'static str,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    node_ips: &'static [&'static str],
    want: &'static [(&'static str, &'static [&'static str])],
}

fn ipset_cases() -> Vec<IpsetCase> {
    use Protocol::{Sctp, Tcp, Udp};
    use render::ipset::*;
    let np = |protocol| p80(protocol).node_port(3001);
    vec![
        IpsetCase {
            name: "TestNodePortIPv4: 1 UDP service with node port, has endpoints",
            services: vec![
                node_port_service(ServiceType::NodePort, "10.20.30.41", np(Udp))
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Udp, &[("10.180.0.1", None)])],
            node_ips: &["100.101.102.103"],
            want: &[(KUBE_NODE_PORT_UDP, &["3001"])],
        },
        IpsetCase {
            name: "TestNodePortIPv4: node port service with protocol sctp on a node with multiple nodeIPs",
            services: vec![
                node_port_service(ServiceType::NodePort, "10.20.30.41", np(Sctp))
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Sctp, &[("10.180.0.1", None)])],
            node_ips: &["100.101.102.103", "100.101.102.104", "100.101.102.105"],
            want: &[(
                KUBE_NODE_PORT_SCTP,
                &[
                    "100.101.102.103,sctp:3001",
                    "100.101.102.104,sctp:3001",
                    "100.101.102.105,sctp:3001",
                ],
            )],
        },
        IpsetCase {
            name: "TestNodePortIPv4: node port service with protocol sctp and externalTrafficPolicy local",
            services: vec![
                node_port_service(ServiceType::NodePort, "10.20.30.41", np(Sctp))
                    .external_traffic_policy(TrafficPolicy::Local)
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(
                1,
                Sctp,
                &[
                    ("10.180.0.1", Some(HOST)),
                    ("10.180.1.1", Some("other-host")),
                ],
            )],
            node_ips: &["100.101.102.103"],
            want: &[
                (KUBE_NODE_PORT_SCTP, &["100.101.102.103,sctp:3001"]),
                (KUBE_NODE_PORT_LOCAL_SCTP, &["100.101.102.103,sctp:3001"]),
            ],
        },
        IpsetCase {
            name: "TestLoadBalancerSourceRanges",
            services: vec![
                Service::builder("ns1", "svc1")
                    .cluster_ip(ip("10.20.30.41"))
                    .service_type(ServiceType::LoadBalancer)
                    .allocate_load_balancer_node_ports(false)
                    .port(p80(Tcp))
                    .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
                    .load_balancer_source_range("10.0.0.0/8".parse().unwrap())
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(1, Tcp, &[("10.180.0.1", None)])],
            node_ips: &[],
            want: &[
                (KUBE_LOAD_BALANCER, &["1.2.3.4,tcp:80"]),
                (KUBE_LOAD_BALANCER_FW, &["1.2.3.4,tcp:80"]),
                (
                    KUBE_LOAD_BALANCER_SOURCE_CIDR,
                    &["1.2.3.4,tcp:80,10.0.0.0/8"],
                ),
            ],
        },
        IpsetCase {
            name: "TestOnlyLocalLoadBalancing",
            services: vec![
                node_port_service(ServiceType::LoadBalancer, "10.20.30.41", np(Tcp))
                    .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
                    .external_traffic_policy(TrafficPolicy::Local)
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(
                1,
                Tcp,
                &[
                    ("10.180.0.1", Some(HOST)),
                    ("10.180.1.1", Some("other-node")),
                ],
            )],
            node_ips: &[],
            want: &[
                (KUBE_LOAD_BALANCER, &["1.2.3.4,tcp:80"]),
                (KUBE_LOAD_BALANCER_LOCAL, &["1.2.3.4,tcp:80"]),
            ],
        },
        IpsetCase {
            // proxier.go (syncProxyRules), beyond what the upstream tests
            // check: the cluster IP of every service port, the hairpin
            // entry of each local endpoint, external IPs by policy, the
            // allowFromNode entry when a source range holds the node IP,
            // the health-check node port, and the addresses bound to
            // kube-ipvs0 (not the external IP that is a node address).
            name: "proxier.go syncProxyRules: every set",
            services: vec![
                node_port_service(ServiceType::LoadBalancer, "10.20.30.41", np(Tcp))
                    .external_ip(ip("50.60.70.81"))
                    .external_ip(ip("100.101.102.103"))
                    .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
                    .load_balancer_source_range("100.101.0.0/16".parse().unwrap())
                    .external_traffic_policy(TrafficPolicy::Local)
                    .health_check_node_port(30_000)
                    .build()
                    .unwrap(),
                Service::builder("ns2", "svc2")
                    .cluster_ip(ip("10.20.30.42"))
                    .external_ip(ip("50.60.70.82"))
                    .port(ServicePortSpec::udp(53).name("dns"))
                    .build()
                    .unwrap(),
            ],
            slices: vec![slice(
                1,
                Tcp,
                &[
                    ("10.180.0.1", Some(HOST)),
                    ("10.180.1.1", Some("other-node")),
                ],
            )],
            node_ips: &["100.101.102.103"],
            want: &[
                (KUBE_LOOP_BACK, &["10.180.0.1,tcp:80,10.180.0.1"]),
                (
                    KUBE_CLUSTER_IP,
                    &["10.20.30.41,tcp:80", "10.20.30.42,udp:53"],
                ),
                (KUBE_EXTERNAL_IP, &["50.60.70.82,udp:53"]),
                (
                    KUBE_EXTERNAL_IP_LOCAL,
                    &["100.101.102.103,tcp:80", "50.60.70.81,tcp:80"],
                ),
                (KUBE_LOAD_BALANCER, &["1.2.3.4,tcp:80"]),
                (KUBE_LOAD_BALANCER_FW, &["1.2.3.4,tcp:80"]),
                (KUBE_LOAD_BALANCER_LOCAL, &["1.2.3.4,tcp:80"]),
                (KUBE_LOAD_BALANCER_SOURCE_IP, &["1.2.3.4,tcp:80,1.2.3.4"]),
                (
                    KUBE_LOAD_BALANCER_SOURCE_CIDR,
                    &["1.2.3.4,tcp:80,100.101.0.0/16"],
                ),
                (KUBE_NODE_PORT_TCP, &["3001"]),
                (KUBE_NODE_PORT_LOCAL_TCP, &["3001"]),
                (KUBE_NODE_PORT_UDP, &[]),
                (KUBE_HEALTH_CHECK_NODE_PORT, &["30000"]),
                (
                    KUBE_IPVS_IPS,
                    &[
                        "1.2.3.4",
                        "10.20.30.41",
                        "10.20.30.42",
                        "50.60.70.81",
                        "50.60.70.82",
                    ],
                ),
            ],
        },
    ]
}

fn ipset_table(case: &IpsetCase) -> (ServiceTable, RenderOptions) {
    let mut table = ServiceTable::new();
    let changes: Vec<Change> = case
        .services
        .iter()
        .cloned()
        .map(Change::UpsertService)
        .chain(case.slices.iter().cloned().map(Change::UpsertSlice))
        .collect();
    table.apply_batch(changes).unwrap();
    let mut opts = RenderOptions::default().node(NodeTopology::new(HOST, "zone-a"));
    opts.node_ips = case.node_ips.iter().map(|a| ip(a)).collect();
    (table, opts)
}

#[test]
fn ipsets_are_kube_proxys() {
    let mut failures = Vec::new();
    for case in ipset_cases() {
        let (table, opts) = ipset_table(&case);
        for (set, want) in case.want {
            let got = render::ipset::set_entries(&table, &opts, set);
            if got != *want {
                failures.push(format!("{}: {set}: want {want:?}, got {got:?}", case.name));
            }
            // The restore input adds exactly these.
            let text = render::ipset::render(&table, &opts);
            let added: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("add {set} ")))
                .collect();
            if added != *want {
                failures.push(format!("{}: render: {set}: {added:?}", case.name));
            }
        }
        println!("ok: {}", case.name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ipv6_ipsets_and_kube_ipvs0_addresses() {
    // The IPv6 proxier: KUBE-6- names, family inet6, /128 binds; its IPv6
    // link-local node IP takes no node port (isValidForSet), so the
    // SCTP set holds only the global one.
    let mut table = ServiceTable::new();
    table
        .apply_batch([
            Change::UpsertService(
                node_port_service(
                    ServiceType::NodePort,
                    "2020::1",
                    p80(Protocol::Sctp).node_port(3001),
                )
                .external_ip(ip("2012::51"))
                .build()
                .unwrap(),
            ),
            Change::UpsertSlice(slice(1, Protocol::Sctp, &[("2001::1", None)])),
        ])
        .unwrap();
    let mut opts = RenderOptions::default().family(render::IpFamily::V6);
    opts.node_ips = vec![ip("fe80::1"), ip("2001:db8::1:1")];
    let text = render::ipset::render(&table, &opts);
    assert!(text.contains(
        "create KUBE-6-NODE-PORT-SCTP-HASH hash:ip,port family inet6 hashsize 1024 maxelem 65536\nadd KUBE-6-NODE-PORT-SCTP-HASH 2001:db8::1:1,sctp:3001\ncreate "
    ), "{text}");
    assert!(
        text.contains("add KUBE-6-CLUSTER-IP 2020::1,sctp:80\n"),
        "{text}"
    );
    assert!(
        text.contains("add KUBE-6-EXTERNAL-IP 2012::51,sctp:80\n"),
        "{text}"
    );
    assert!(!text.contains(" family inet "), "{text}");
    assert_eq!(
        render::ipset::render_kube_ipvs0(&table, &opts),
        "address add 2012::51/128 dev kube-ipvs0\naddress add 2020::1/128 dev kube-ipvs0\n"
    );
    // The IPv4 proxier knows no IPv6 service.
    let v4 = render::ipset::render(&table, &RenderOptions::default());
    assert!(v4.lines().all(|l| l.starts_with("create ")), "{v4}");
}

/// Runs `cmd` with `input` on stdin; its stdout, or the reason it failed.
fn run_with_input(cmd: &mut std::process::Command, input: &str) -> Result<String, String> {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn in_netns(ns: &str, args: &[&str], input: &str) -> Result<String, String> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    run_with_input(&mut cmd, input)
}

/// Removes the namespace on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn the_real_ipset_and_ip_tools_take_the_renderings() {
    // In a network namespace of its own (ipsets and addresses are per
    // namespace): `ipset restore` takes both families' sets, `ipset save`
    // lists exactly the entries rendered, and `ip -batch` binds the
    // kube-ipvs0 addresses.
    if !is_root() {
        println!("SKIPPED: not root (needs network namespaces)");
        return;
    }
    for (tool, flag) in [("ip", "-V"), ("ipset", "--version")] {
        let found = std::process::Command::new(tool)
            .arg(flag)
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            println!("SKIPPED: {tool} not installed (.ci/run installs it)");
            return;
        }
    }
    let ns = Netns(format!("svclb-ipset-{}", std::process::id()));
    let added = std::process::Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .unwrap();
    assert!(added.success(), "ip netns add");
    let case = ipset_cases().pop().unwrap();
    let (mut table, opts) = ipset_table(&case);
    // An IPv6 service too, for the KUBE-6- sets.
    table
        .apply(Change::UpsertService(
            Service::builder("ns3", "svc3")
                .cluster_ip(ip("2020::1"))
                .service_type(ServiceType::NodePort)
                .node_port_range(1..=65_535)
                .port(p80(Protocol::Sctp).node_port(3002))
                .external_ip(ip("2012::51"))
                .build()
                .unwrap(),
        ))
        .unwrap();
    let mut v6 = opts.clone().family(render::IpFamily::V6);
    v6.node_ips.push(ip("2001:db8::1:1"));
    let text = render::ipset::render(&table, &opts) + &render::ipset::render(&table, &v6);
    in_netns(&ns.0, &["ipset", "restore"], &text).expect("ipset restore");
    let saved = in_netns(&ns.0, &["ipset", "save"], "").expect("ipset save");
    let adds = |t: &str| -> BTreeSet<String> {
        t.lines()
            .filter(|l| l.starts_with("add "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(adds(&saved), adds(&text));
    assert!(adds(&text).len() > 20, "{text}");
    let creates = saved.lines().filter(|l| l.starts_with("create ")).count();
    assert_eq!(creates, 2 * 17, "{saved}");
    // The IPVS mode's iptables rules, which match those sets: the kernel
    // takes them (xt_set, addrtype, physdev, conntrack, mark).
    for (tool, o) in [("iptables-restore", &opts), ("ip6tables-restore", &v6)] {
        let rules = render::ipset::render_iptables(&table, o);
        assert!(rules.contains("--match-set"), "{rules}");
        in_netns(&ns.0, &[tool], &rules).unwrap_or_else(|e| panic!("{tool}: {e}\n{rules}"));
        let listed = in_netns(&ns.0, &[&tool.replace("-restore", "-save")], "").unwrap();
        let want = rules.lines().filter(|l| l.starts_with("-A ")).count();
        let got = listed.lines().filter(|l| l.starts_with("-A ")).count();
        assert_eq!(got, want, "{tool}: {listed}");
    }
    // kube-ipvs0: kube-proxy makes it a dummy device; where the kernel has
    // no dummy driver, a bridge without ports holds the addresses alike.
    let made = in_netns(
        &ns.0,
        &["ip", "link", "add", "kube-ipvs0", "type", "dummy"],
        "",
    )
    .or_else(|_| {
        in_netns(
            &ns.0,
            &["ip", "link", "add", "kube-ipvs0", "type", "bridge"],
            "",
        )
    });
    made.expect("ip link add kube-ipvs0");
    let batch = render::ipset::render_kube_ipvs0(&table, &opts)
        + &render::ipset::render_kube_ipvs0(&table, &v6);
    in_netns(&ns.0, &["ip", "-batch", "-"], &batch).expect("ip -batch");
    let shown = in_netns(
        &ns.0,
        &["ip", "-o", "addr", "show", "dev", "kube-ipvs0"],
        "",
    )
    .expect("ip addr show");
    let bound: BTreeSet<String> = shown
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet" || *x == "inet6")?;
            w.next().map(str::to_owned)
        })
        .collect();
    let want: BTreeSet<String> = batch
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap().to_owned())
        .collect();
    assert_eq!(bound, want, "{shown}");
    assert!(want.contains("10.20.30.41/32") && want.contains("2020::1/128"));
}

/// Whether the test runs as root (effective uid 0), read from
/// `/proc/self/status`.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

#[test]
fn replies_from_a_local_frontends_cluster_endpoints_find_their_connection() {
    // A connection sent to a Cluster-policy endpoint through an external
    // Local destination: in the IPVS mode, traffic from outside to a node
    // port without a local endpoint (syncEndpoint's cluster endpoints); in
    // the iptables mode, a pod short-circuited through the cluster IP. The
    // backend's reply finds the tracked connection (the reply index lists
    // the frontend's cluster endpoints too).
    let mut table = local_service_table();
    table
        .apply(Change::UpsertSlice(slice(
            1,
            Protocol::Tcp,
            &[("10.180.1.1", Some("other-hostname"))],
        )))
        .unwrap();
    let tracked = |seed| {
        let mut c = local_config(seed);
        c.conntrack = DataplaneConfig::with_seed(seed).conntrack;
        assert!(c.conntrack.is_some());
        c
    };
    let ipvs = IpvsDataplane::new(tracked(1));
    let iptables = IptablesDataplane::new(tracked(2));
    let now = Instant::from_secs(1);
    for (dp, src) in [
        (&ipvs as &dyn Dataplane, "203.0.113.9:40000"),
        (&iptables, "10.244.3.7:40000"),
    ] {
        dp.sync(&table, &table.full_change_set(), Instant::ZERO);
        let f = Flow::tcp(
            src.parse().unwrap(),
            "100.101.102.103:3001".parse().unwrap(),
        );
        let Verdict::Forward(fw) = dp.route(&f, now) else {
            panic!("{}: {src}", dp.mode());
        };
        assert_eq!(
            fw.backend,
            "10.180.1.1:80".parse().unwrap(),
            "{}",
            dp.mode()
        );
        let reply = Flow::tcp(fw.backend, f.src);
        let t = dp
            .reply(&reply, TcpFlags::SYN | TcpFlags::ACK, now)
            .unwrap_or_else(|| panic!("{}: the reply's connection", dp.mode()));
        assert_eq!((t.flow, t.backend_addr), (f, fw.backend), "{}", dp.mode());
    }
}

/// The `-A CHAIN` rules of an `iptables-restore` input, both tables in
/// order (kube-proxy's fake `GetRules`): (chain, jump, match set, source).
fn rules_of(text: &str, chain: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("-A {chain} ")))
        .map(|r| {
            let w: Vec<&str> = r.split_whitespace().collect();
            // A negated match (`! -s CIDR`) is not the rule's source.
            let after = |flag: &str| {
                w.iter()
                    .enumerate()
                    .position(|(i, x)| *x == flag && (i == 0 || w[i - 1] != "!"))
                    .map_or(String::new(), |i| w[i + 1].to_owned())
            };
            (after("-j"), after("--match-set"), after("-s"))
        })
        .collect()
}

#[test]
fn ipvs_mode_iptables_rules_are_kube_proxys() {
    // kube-proxy's IPVS tests check each chain's rules as (jump, match
    // set, source) in order (checkIptables over the restore input).
    use render::ipset::render_iptables;
    let r = |j: &str, set: &str| (j.to_owned(), set.to_owned(), String::new());
    let lo = ("RETURN".to_owned(), String::new(), "127.0.0.0/8".to_owned());
    let cases = ipset_cases();
    let by_name = |n: &str| cases.iter().find(|c| c.name == n).unwrap();
    let mut failures = Vec::new();
    let mut check = |name: &str, text: &str, chain: &str, want: Vec<(String, String, String)>| {
        let got = rules_of(text, chain);
        if got != want {
            failures.push(format!(
                "{name}: {chain}:\n want {want:?}\n got  {got:?}\n{text}"
            ));
        }
    };
    let opts_of = |c: &IpsetCase| {
        let (t, o) = ipset_table(c);
        (t, o.cluster_cidr("10.0.0.0/8".parse().unwrap()))
    };
    let name = "TestLoadBalancerSourceRanges";
    let (t, o) = opts_of(by_name(name));
    let text = render_iptables(&t, &o);
    check(
        name,
        &text,
        "KUBE-SERVICES",
        vec![
            lo.clone(),
            r("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
            r("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
            r("KUBE-NODE-PORT", ""),
            r("ACCEPT", "KUBE-CLUSTER-IP"),
            r("ACCEPT", "KUBE-LOAD-BALANCER"),
        ],
    );
    check(
        name,
        &text,
        "KUBE-PROXY-FIREWALL",
        vec![r("KUBE-SOURCE-RANGES-FIREWALL", "KUBE-LOAD-BALANCER-FW")],
    );
    check(
        name,
        &text,
        "KUBE-SOURCE-RANGES-FIREWALL",
        vec![r("RETURN", "KUBE-LOAD-BALANCER-SOURCE-CIDR"), r("DROP", "")],
    );
    let name = "TestOnlyLocalLoadBalancing";
    let (t, o) = opts_of(by_name(name));
    let text = render_iptables(&t, &o);
    check(
        name,
        &text,
        "KUBE-SERVICES",
        vec![
            lo.clone(),
            r("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
            r("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
            r("KUBE-NODE-PORT", ""),
            r("ACCEPT", "KUBE-CLUSTER-IP"),
            r("ACCEPT", "KUBE-LOAD-BALANCER"),
        ],
    );
    check(
        name,
        &text,
        "KUBE-LOAD-BALANCER",
        vec![
            r("RETURN", "KUBE-LOAD-BALANCER-LOCAL"),
            r("KUBE-MARK-MASQ", ""),
        ],
    );
    let name = "TestNodePortIPv4: 1 UDP service with node port, has endpoints";
    let (t, o) = opts_of(by_name(name));
    let text = render_iptables(&t, &o);
    check(
        name,
        &text,
        "KUBE-NODE-PORT",
        vec![
            r("KUBE-MARK-MASQ", "KUBE-NODE-PORT-UDP"),
            r("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT"),
        ],
    );
    check(
        name,
        &text,
        "KUBE-SERVICES",
        vec![
            lo.clone(),
            r("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
            r("KUBE-NODE-PORT", ""),
            r("ACCEPT", "KUBE-CLUSTER-IP"),
        ],
    );
    let name =
        "TestNodePortIPv4: node port service with protocol sctp and externalTrafficPolicy local";
    let (t, o) = opts_of(by_name(name));
    let text = render_iptables(&t, &o);
    check(
        name,
        &text,
        "KUBE-NODE-PORT",
        vec![
            r("RETURN", "KUBE-NODE-PORT-LOCAL-SCTP-HASH"),
            r("KUBE-MARK-MASQ", "KUBE-NODE-PORT-SCTP-HASH"),
            r("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT"),
        ],
    );
    // TestAcceptIPVSTraffic: a ClusterIP service with an external IP, a
    // LoadBalancer and a NodePort service.
    let mut t = ServiceTable::new();
    t.apply_batch([
        Change::UpsertService(
            Service::builder("ns1", "svc1")
                .cluster_ip(ip("10.20.30.40"))
                .external_ip(ip("5.6.7.8"))
                .port(p80(Protocol::Tcp))
                .build()
                .unwrap(),
        ),
        Change::UpsertService(
            Service::builder("ns1", "svc2")
                .cluster_ip(ip("10.20.30.41"))
                .service_type(ServiceType::LoadBalancer)
                .node_port_range(1..=65_535)
                .port(p80(Protocol::Tcp).node_port(80))
                .load_balancer_ingress(ip("1.2.3.4"), IpMode::VIP)
                .build()
                .unwrap(),
        ),
        Change::UpsertService(
            Service::builder("ns1", "svc3")
                .cluster_ip(ip("10.20.30.42"))
                .service_type(ServiceType::NodePort)
                .node_port_range(1..=65_535)
                .port(p80(Protocol::Tcp).node_port(80))
                .build()
                .unwrap(),
        ),
    ])
    .unwrap();
    let o = RenderOptions::default().cluster_cidr("10.0.0.0/8".parse().unwrap());
    let text = render_iptables(&t, &o);
    check(
        "TestAcceptIPVSTraffic",
        &text,
        "KUBE-SERVICES",
        vec![
            lo,
            r("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
            r("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
            r("KUBE-MARK-MASQ", "KUBE-EXTERNAL-IP"),
            r("ACCEPT", "KUBE-EXTERNAL-IP"),
            r("ACCEPT", "KUBE-EXTERNAL-IP"),
            r("KUBE-NODE-PORT", ""),
            r("ACCEPT", "KUBE-CLUSTER-IP"),
            r("ACCEPT", "KUBE-LOAD-BALANCER"),
        ],
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
