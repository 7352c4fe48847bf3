//! The renderings agree with the model: for random tables (conditions,
//! nodes, zone and node hints, Local policies, weights, several ports and
//! slices), the iptables and nftables texts, read back, send each cluster IP
//! and port to exactly the endpoints, in the same order, that the
//! [`IptablesDataplane`] lists as candidates, and reject or drop exactly
//! where it does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;
use svclb::render::{self, RenderOptions};
use svclb::*;

#[derive(Debug, Clone)]
struct EpGen {
    host: u8,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    node: u8,
    zone_hint: Option<u8>,
    node_hint: Option<u8>,
    weight: u8,
}

#[derive(Debug, Clone)]
struct SvcGen {
    local: bool,
    affinity: bool,
    udp_port: bool,
    slices: Vec<Vec<EpGen>>,
}

fn ep_gen() -> impl Strategy<Value = EpGen> {
    (
        (1u8..30, proptest::option::of(any::<bool>())),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<bool>()),
        0u8..3,
        proptest::option::of(0u8..2),
        proptest::option::of(0u8..3),
        prop_oneof![4 => Just(1u8), 1 => Just(0u8), 1 => Just(3u8)],
    )
        .prop_map(
            |((host, ready), serving, terminating, node, zone_hint, node_hint, weight)| EpGen {
                host,
                ready,
                serving,
                terminating,
                node,
                zone_hint,
                node_hint,
                weight,
            },
        )
}

fn svc_gen() -> impl Strategy<Value = SvcGen> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(proptest::collection::vec(ep_gen(), 0..6), 0..3),
    )
        .prop_map(|(local, affinity, udp_port, slices)| SvcGen {
            local,
            affinity,
            udp_port,
            slices,
        })
}

fn build_table(svcs: &[SvcGen]) -> ServiceTable {
    let mut batch = Vec::new();
    for (i, g) in svcs.iter().enumerate() {
        let name = format!("svc-{i}");
        let mut b = Service::builder("default", &name)
            .cluster_ip(IpAddr::from([172, 30, 0, i as u8 + 1]))
            .port(ServicePortSpec::tcp(80).name("http").target_port(8080))
            .internal_traffic_policy(if g.local {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            });
        if g.udp_port {
            b = b.port(ServicePortSpec::udp(53).name("dns"));
        }
        if g.affinity {
            b = b.client_ip_affinity(Some(300));
        }
        batch.push(Change::UpsertService(b.build().unwrap()));
        for (s, eps) in g.slices.iter().enumerate() {
            let mut seen = BTreeSet::new();
            let mut b =
                EndpointSlice::builder("default", format!("{name}-{s}"), &name, AddressType::IPv4)
                    .port(SlicePortSpec::tcp(8080).name("http"))
                    .port(SlicePortSpec::udp(53).name("dns"));
            for e in eps {
                if !seen.insert(e.host) {
                    continue;
                }
                let mut spec = EndpointSpec::new(format!("10.1.{i}.{}", e.host))
                    .node(format!("node-{}", e.node))
                    .zone(format!("zone-{}", e.node % 2))
                    .weight(i64::from(e.weight));
                spec.conditions = Conditions {
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                };
                if let Some(z) = e.zone_hint {
                    spec = spec.hint_zone(format!("zone-{z}"));
                }
                if let Some(n) = e.node_hint {
                    spec = spec.hint_node(format!("node-{n}"));
                }
                b = b.endpoint(spec);
            }
            batch.push(Change::UpsertSlice(b.build().unwrap()));
        }
    }
    let mut t = ServiceTable::new();
    t.apply_batch(batch).unwrap();
    t
}

/// `(protocol, VIP:port)` -> what the text does with a new connection.
type Behaviour = BTreeMap<(Protocol, SocketAddr), Candidates>;

fn arg<'a>(words: &[&'a str], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| *w == flag)
        .and_then(|i| words.get(i + 1).copied())
}

fn protocol(name: &str) -> Protocol {
    name.parse().unwrap()
}

/// Reads an iptables-restore text back: KUBE-SERVICES jumps, the service
/// chains' dispatch rules in order (affinity `--rcheck` rules only recall a
/// choice, so they are skipped), each endpoint chain's DNAT target.
fn read_iptables(text: &str) -> Behaviour {
    let mut table = "";
    let mut chains: BTreeMap<&str, Vec<Vec<&str>>> = BTreeMap::new();
    let mut services: Vec<(&str, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t;
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"-A") {
            continue;
        }
        if words[1] == "KUBE-SERVICES" && arg(&words, "--dport").is_some() {
            services.push((table, words.clone()));
        } else if table == "nat" {
            chains.entry(words[1]).or_default().push(words.clone());
        }
    }
    let mut out = Behaviour::new();
    for (table, words) in services {
        let key = (
            protocol(arg(&words, "-p").unwrap()),
            SocketAddr::new(
                arg(&words, "-d").unwrap().parse().unwrap(),
                arg(&words, "--dport").unwrap().parse().unwrap(),
            ),
        );
        let target = arg(&words, "-j").unwrap();
        let verdict = match (table, target) {
            ("filter", "REJECT") => Candidates::Reject,
            ("filter", "DROP") => Candidates::Drop,
            ("nat", chain) => {
                let eps = chains[chain]
                    .iter()
                    .filter(|r| !r.contains(&"--rcheck"))
                    .filter_map(|r| arg(r, "-j").filter(|t| t.starts_with("KUBE-SEP-")))
                    .map(|sep| {
                        let dnat = chains[sep]
                            .iter()
                            .find_map(|r| arg(r, "--to-destination"))
                            .unwrap();
                        dnat.parse().unwrap()
                    })
                    .collect();
                Candidates::Endpoints(eps)
            }
            other => panic!("unexpected KUBE-SERVICES rule {other:?}"),
        };
        assert!(out.insert(key, verdict).is_none(), "two rules for {key:?}");
    }
    out
}

/// Reads an `nft -f` text back: `service-ips` and `no-endpoint-services`
/// elements, the `numgen` vmap of each service chain (index order), each
/// endpoint chain's `dnat to`.
fn read_nft(text: &str) -> Behaviour {
    let mut vmaps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut dnat: BTreeMap<&str, SocketAddr> = BTreeMap::new();
    let mut elements = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["add", "rule", _, "kube-proxy", chain, rest @ ..] => {
                if rest.starts_with(&["numgen"]) {
                    let gotos: Vec<&str> = rest
                        .windows(2)
                        .filter(|w| w[0] == "goto")
                        .map(|w| w[1])
                        .collect();
                    assert_eq!(rest[3], gotos.len().to_string(), "{line}");
                    vmaps.insert(chain, gotos);
                } else if let Some(i) = rest.iter().position(|w| *w == "dnat") {
                    dnat.insert(chain, rest[i + 2].parse().unwrap());
                }
            }
            [
                "add",
                "element",
                _,
                "kube-proxy",
                map @ ("service-ips" | "no-endpoint-services"),
                "{",
                ip,
                ".",
                proto,
                ".",
                port,
                rest @ ..,
            ] => {
                elements.push((*map, *ip, *proto, *port, rest.to_vec()));
            }
            _ => {}
        }
    }
    let mut out = Behaviour::new();
    for (map, ip, proto, port, rest) in elements {
        let key = (
            protocol(proto),
            SocketAddr::new(ip.parse().unwrap(), port.parse().unwrap()),
        );
        let verdict = if map == "service-ips" {
            let chain = rest[rest.iter().position(|w| *w == "goto").unwrap() + 1];
            Candidates::Endpoints(vmaps[chain].iter().map(|ep| dnat[ep]).collect())
        } else if rest.contains(&"reject-chain") {
            Candidates::Reject
        } else {
            assert!(rest.contains(&"drop"), "{rest:?}");
            Candidates::Drop
        };
        assert!(
            out.insert(key, verdict).is_none(),
            "two elements for {key:?}"
        );
    }
    out
}

/// What the model does for every service port of the table.
fn model(table: &ServiceTable, node: &NodeTopology) -> Behaviour {
    let dp = IptablesDataplane::new(DataplaneConfig::with_seed(1).node(node.clone()));
    dp.sync(table, &table.full_change_set(), Instant::ZERO);
    let mut out = Behaviour::new();
    for view in table.views() {
        for &ip in view.service().cluster_ip().addrs() {
            for pv in view.ports() {
                let key = (pv.port().protocol(), SocketAddr::new(ip, pv.port().port()));
                out.insert(key, dp.candidates(key.0, key.1));
            }
        }
    }
    out
}

fn cases(n: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = n;
    }
    config
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn renderings_send_traffic_where_the_model_does(
        svcs in proptest::collection::vec(svc_gen(), 1..8),
        node in 0u8..3,
        cidr in any::<bool>(),
    ) {
        let table = build_table(&svcs);
        let node = NodeTopology::new(format!("node-{node}"), format!("zone-{}", node % 2));
        let mut opts = RenderOptions::default().node(node.clone());
        if cidr {
            opts = opts.cluster_cidr("10.0.0.0/8".parse().unwrap());
        }
        let want = model(&table, &node);
        prop_assert_eq!(&read_iptables(&render::iptables::render(&table, &opts)), &want);
        prop_assert_eq!(&read_nft(&render::nft::render(&table, &opts)), &want);
    }
}

#[test]
fn reader_sees_a_known_rendering() {
    // The readers themselves, on a rendering whose meaning is known.
    let table = build_table(&[SvcGen {
        local: false,
        affinity: true,
        udp_port: false,
        slices: vec![vec![
            EpGen {
                host: 2,
                ready: None,
                serving: None,
                terminating: None,
                node: 0,
                zone_hint: None,
                node_hint: None,
                weight: 1,
            },
            EpGen {
                host: 10,
                ready: None,
                serving: None,
                terminating: None,
                node: 1,
                zone_hint: None,
                node_hint: None,
                weight: 1,
            },
        ]],
    }]);
    let opts = RenderOptions::default();
    let want: Behaviour = [(
        (Protocol::Tcp, "172.30.0.1:80".parse().unwrap()),
        // Merged order sorts "10.1.0.10:8080" before "10.1.0.2:8080".
        Candidates::Endpoints(vec![
            "10.1.0.10:8080".parse().unwrap(),
            "10.1.0.2:8080".parse().unwrap(),
        ]),
    )]
    .into();
    assert_eq!(
        read_iptables(&render::iptables::render(&table, &opts)),
        want
    );
    assert_eq!(read_nft(&render::nft::render(&table, &opts)), want);
}
