//! Behaviour across the table, topology and both dataplanes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use svclb::*;

fn web_table() -> ServiceTable {
    let mut t = ServiceTable::new();
    t.apply_batch([
        Change::UpsertService(service("web", "10.96.0.10", 80)),
        Change::UpsertSlice(slice(
            "web-1",
            "web",
            &["10.1.0.1", "10.1.0.2", "10.1.0.3"],
            8080,
        )),
    ])
    .unwrap();
    t
}

#[test]
fn both_modes_forward_reject_drop_and_pass_through() {
    let mut t = web_table();
    let headless = Service::builder("default", "kafka")
        .headless()
        .build()
        .unwrap();
    let [local, local_slice] = local_elsewhere("10.96.0.20", "10.1.1.1", "other-node");
    t.apply_batch([
        Change::UpsertService(service("empty", "10.96.0.30", 80)),
        local,
        local_slice,
        Change::UpsertService(headless),
    ])
    .unwrap();
    let config = DataplaneConfig::with_seed(7)
        .conntrack(None)
        .node(NodeTopology::new("this-node", "zone-a"));
    let (ipt, ipvs) = both(&t, config);
    for dp in [&ipt as &dyn Dataplane, &ipvs] {
        let v = dp.route(&flow("10.2.0.1:5000", "10.96.0.10:80"), Instant::ZERO);
        let b = v.backend().expect("forward");
        assert!(
            ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"].contains(&b.to_string().as_str())
        );
        assert_eq!(
            dp.route(&flow("10.2.0.1:5000", "10.96.0.30:80"), Instant::ZERO),
            Verdict::Reject,
            "{}",
            dp.mode()
        );
        assert_eq!(
            dp.route(&flow("10.2.0.1:5000", "10.96.0.20:80"), Instant::ZERO),
            Verdict::Drop
        );
        assert_eq!(
            dp.route(&flow("10.2.0.1:5000", "10.96.0.99:80"), Instant::ZERO),
            Verdict::NotAService
        );
        // Wrong port or protocol on a VIP: not a service.
        assert_eq!(
            dp.route(&flow("10.2.0.1:5000", "10.96.0.10:81"), Instant::ZERO),
            Verdict::NotAService
        );
        let udp = Flow::udp(sa("10.2.0.1:5000"), sa("10.96.0.10:80"));
        assert_eq!(dp.route(&udp, Instant::ZERO), Verdict::NotAService);
    }
}

#[test]
fn ipvs_rr_cycles_in_merged_order() {
    let t = web_table();
    let (_, ipvs) = both(&t, DataplaneConfig::with_seed(1).conntrack(None));
    let got: Vec<String> = (0..6)
        .map(|i| {
            ipvs.route(
                &flow(&format!("10.2.0.1:{}", 1000 + i), "10.96.0.10:80"),
                Instant::ZERO,
            )
            .to_string()
        })
        .collect();
    assert_eq!(
        got,
        [
            "FORWARD 10.1.0.1:8080",
            "FORWARD 10.1.0.2:8080",
            "FORWARD 10.1.0.3:8080",
            "FORWARD 10.1.0.1:8080",
            "FORWARD 10.1.0.2:8080",
            "FORWARD 10.1.0.3:8080"
        ]
    );
}

#[test]
fn ipvs_lc_counts_connections_and_keeps_counters_across_updates() {
    let mut t = web_table();
    // The counts come from the connection tracker.
    let config = DataplaneConfig::with_seed(1).scheduler(SchedulerKind::LeastConnection);
    let (_, ipvs) = both(&t, config);
    let conn = |port: u16| {
        let f = flow(&format!("10.2.0.1:{port}"), "10.96.0.10:80");
        let b = ipvs.route(&f, Instant::ZERO).backend().unwrap();
        // The handshake completes: the connection is active.
        assert!(ipvs.packet(&f, TcpFlags::ACK, Instant::ZERO).is_tracked());
        (f, b)
    };
    let (_, a) = conn(1000);
    let (fb, b) = conn(1001);
    let (_, c) = conn(1002);
    assert_eq!(BTreeSet::from([a, b, c]).len(), 3);
    // Close the connection on b: the next new connection goes there.
    ipvs.connection_closed(&fb, Instant::ZERO);
    assert_eq!(conn(1003).1, b);
    // An endpoint change elsewhere in the service keeps the counters.
    let cs = t
        .apply(Change::UpsertSlice(slice(
            "web-1",
            "web",
            &["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"],
            8080,
        )))
        .unwrap();
    ipvs.sync(&t, &cs, Instant::ZERO);
    // The new endpoint has no connections: it wins; then the counts tie at 1.
    assert_eq!(conn(1004).1, sa("10.1.0.4:8080"));
    assert_eq!(conn(1005).1, sa("10.1.0.1:8080"));
}

#[test]
fn fixed_seed_replays_exactly() {
    let t = web_table();
    let run = |seed| {
        let (ipt, _) = both(&t, DataplaneConfig::with_seed(seed).conntrack(None));
        (0..50)
            .map(|_| ipt.route(&flow("10.2.0.1:1", "10.96.0.10:80"), Instant::ZERO))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(99), run(99));
    assert_ne!(run(99), run(100));
}

#[test]
fn iptables_cascade_distribution_is_uniform() {
    let t = web_table();
    let (ipt, _) = both(&t, DataplaneConfig::with_seed(2024).conntrack(None));
    let mut counts: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    let n = 60_000;
    for _ in 0..n {
        let b = ipt
            .route(&flow("10.2.0.1:1", "10.96.0.10:80"), Instant::ZERO)
            .backend()
            .unwrap();
        *counts.entry(b).or_default() += 1;
    }
    let expected = f64::from(n) / 3.0;
    let chi2: f64 = counts
        .values()
        .map(|&c| (f64::from(c) - expected).powi(2) / expected)
        .sum();
    // 2 degrees of freedom, p = 0.001.
    assert!(chi2 < 13.82, "chi2 {chi2}: {counts:?}");
}

#[test]
fn dual_stack_vips_forward_to_their_own_family() {
    let mut t = ServiceTable::new();
    let svc = Service::builder("default", "ds")
        .cluster_ip("10.96.0.50".parse().unwrap())
        .cluster_ip("fd00::50".parse().unwrap())
        .port(ServicePortSpec::tcp(80))
        .build()
        .unwrap();
    let v4 = EndpointSlice::builder("default", "ds-v4", "ds", AddressType::IPv4)
        .port(SlicePortSpec::tcp(80))
        .endpoint(EndpointSpec::new("10.1.0.9"))
        .build()
        .unwrap();
    let v6 = EndpointSlice::builder("default", "ds-v6", "ds", AddressType::IPv6)
        .port(SlicePortSpec::tcp(80))
        .endpoint(EndpointSpec::new("fd00:1::9"))
        .build()
        .unwrap();
    t.apply_batch([
        Change::UpsertService(svc),
        Change::UpsertSlice(v4),
        Change::UpsertSlice(v6),
    ])
    .unwrap();
    let (ipt, ipvs) = both(&t, DataplaneConfig::default().conntrack(None));
    for dp in [&ipt as &dyn Dataplane, &ipvs] {
        assert_eq!(
            dp.route(&flow("10.2.0.1:1", "10.96.0.50:80"), Instant::ZERO)
                .backend(),
            Some(sa("10.1.0.9:80"))
        );
        assert_eq!(
            dp.route(&flow("[fd00:2::1]:1", "[fd00::50]:80"), Instant::ZERO)
                .backend(),
            Some(sa("[fd00:1::9]:80"))
        );
    }
}

/// A flow whose source and destination are of different families (which
/// `Flow::try_new` refuses and no packet carries; `Flow::new` does not
/// check) is no service's, in every mode: an IPv6 client is never sent to
/// an IPv4 backend, nor the other way round.
#[test]
fn mixed_family_flows_are_no_service() {
    let mut t = ServiceTable::new();
    let svc = Service::builder("default", "ds")
        .cluster_ip("10.96.0.50".parse().unwrap())
        .cluster_ip("fd00::50".parse().unwrap())
        .port(ServicePortSpec::tcp(80))
        .build()
        .unwrap();
    let v4 = EndpointSlice::builder("default", "ds-v4", "ds", AddressType::IPv4)
        .port(SlicePortSpec::tcp(80))
        .endpoint(EndpointSpec::new("10.1.0.9"))
        .build()
        .unwrap();
    let v6 = EndpointSlice::builder("default", "ds-v6", "ds", AddressType::IPv6)
        .port(SlicePortSpec::tcp(80))
        .endpoint(EndpointSpec::new("fd00:1::9"))
        .build()
        .unwrap();
    let changes = t
        .apply_batch([
            Change::UpsertService(svc),
            Change::UpsertSlice(v4),
            Change::UpsertSlice(v6),
        ])
        .unwrap();
    let config = DataplaneConfig::with_seed(1);
    let nft = NftablesDataplane::new(config.clone());
    nft.sync(&t, &changes, Instant::ZERO);
    let (ipt, ipvs) = both(&t, config);
    for dp in [&ipt as &dyn Dataplane, &ipvs, &nft] {
        for (src, dst) in [
            ("[fd00:2::1]:1", "10.96.0.50:80"),
            ("10.2.0.1:1", "[fd00::50]:80"),
        ] {
            let f = flow(src, dst);
            assert!(Flow::try_new(f.protocol, f.src, f.dst).is_err());
            assert_eq!(
                dp.route(&f, Instant::ZERO),
                Verdict::NotAService,
                "{src} -> {dst}"
            );
            assert_eq!(
                dp.route_excluding(&f, &[], Instant::ZERO),
                Verdict::NotAService,
                "{src} -> {dst}"
            );
        }
        // Single-family flows still forward.
        assert!(matches!(
            dp.route(&flow("10.2.0.1:1", "10.96.0.50:80"), Instant::ZERO),
            Verdict::Forward(_)
        ));
    }
}

#[test]
fn ipvs_endpoint_change_swaps_only_its_service_and_service_changes_rebuild_map() {
    let mut t = web_table();
    t.apply(Change::UpsertService(service("api", "10.96.0.11", 80)))
        .unwrap();
    let (_, ipvs) = both(&t, DataplaneConfig::default().conntrack(None));
    assert_eq!(ipvs.virtual_service_count(), 2);
    let cs = t
        .apply(Change::UpsertSlice(slice(
            "api-1",
            "api",
            &["10.1.2.1"],
            8080,
        )))
        .unwrap();
    ipvs.sync(&t, &cs, Instant::ZERO);
    assert_eq!(
        ipvs.candidates(Protocol::Tcp, sa("10.96.0.11:80")),
        Candidates::Endpoints(vec![sa("10.1.2.1:8080")])
    );
    // Changing the port moves the virtual service.
    let cs = t
        .apply(Change::UpsertService(service("api", "10.96.0.11", 8000)))
        .unwrap();
    ipvs.sync(&t, &cs, Instant::ZERO);
    assert_eq!(
        ipvs.candidates(Protocol::Tcp, sa("10.96.0.11:80")),
        Candidates::NotAService
    );
    assert_eq!(
        ipvs.candidates(Protocol::Tcp, sa("10.96.0.11:8000")),
        Candidates::Endpoints(vec![sa("10.1.2.1:8080")])
    );
    let cs = t
        .apply(Change::DeleteService(ServiceKey::new("default", "api")))
        .unwrap();
    ipvs.sync(&t, &cs, Instant::ZERO);
    assert_eq!(ipvs.virtual_service_count(), 1);
}

/// One slice update on a service of 10 slices re-merges that slice only: the
/// other 9 slices' stored objects and merged endpoints are the very same
/// allocations, and the merge counters moved by the changed endpoint alone.
#[test]
fn one_slice_update_does_not_rebuild_the_other_nine() {
    let mut t = ServiceTable::new();
    let mut batch = vec![Change::UpsertService(service("big", "10.96.1.1", 80))];
    let ips = |s: usize| -> Vec<String> {
        (0..100)
            .map(|e| format!("10.{}.{}.{}", 10 + s, e / 250, e % 250 + 1))
            .collect()
    };
    for s in 0..10 {
        let v = ips(s);
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        batch.push(Change::UpsertSlice(slice(
            &format!("big-{s}"),
            "big",
            &refs,
            8080,
        )));
    }
    t.apply_batch(batch).unwrap();
    let key = ServiceKey::new("default", "big");
    let before_slices: Vec<Arc<EndpointSlice>> = t.slices_of(&key).cloned().collect();
    let before_eps: Vec<Arc<EndpointInfo>> = t.view(&key).unwrap().ports()[0].endpoints().to_vec();
    assert_eq!(before_eps.len(), 1000);
    let stats = t.stats();

    // Slice 3: one endpoint becomes not ready.
    let mut specs: Vec<EndpointSpec> = ips(3).into_iter().map(EndpointSpec::new).collect();
    specs[17] = specs[17].clone().ready(false);
    let changed = EndpointSlice::builder("default", "big-3", "big", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080).name("http"))
        .endpoints(specs)
        .build()
        .unwrap();
    let cs = t.apply(Change::UpsertSlice(changed)).unwrap();
    assert_eq!(cs.updated, vec![key.clone()]);

    let after = t.stats();
    assert_eq!(after.slices_merged - stats.slices_merged, 1);
    // One copy removed and one added: not 1000, not even 100.
    assert_eq!(after.endpoint_merges - stats.endpoint_merges, 2);
    // The merged list is patched in place (the endpoint's copy removed,
    // then the changed copy inserted), not rebuilt from the merge map.
    assert_eq!(after.port_lists_built - stats.port_lists_built, 0);
    assert_eq!(after.port_list_patches - stats.port_list_patches, 2);

    let after_slices: Vec<Arc<EndpointSlice>> = t.slices_of(&key).cloned().collect();
    for (i, (a, b)) in before_slices.iter().zip(&after_slices).enumerate() {
        assert_eq!(Arc::ptr_eq(a, b), i != 3, "slice {i}");
    }
    let after_eps = t.view(&key).unwrap().ports()[0].endpoints().to_vec();
    let rebuilt = before_eps
        .iter()
        .zip(&after_eps)
        .filter(|(a, b)| !Arc::ptr_eq(a, b))
        .count();
    assert_eq!(rebuilt, 1, "only the changed endpoint is a new object");
}

// ---- both modes agree on every service of a randomly built table ----

#[derive(Debug, Clone)]
struct EpGen {
    host: u8,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    node: u8,
    zone_hint: Option<u8>,
    node_hint: Option<u8>,
}

#[derive(Debug, Clone)]
struct SvcGen {
    local: bool,
    slices: Vec<Vec<EpGen>>,
}

fn ep_gen() -> impl Strategy<Value = EpGen> {
    (
        1u8..40,
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<bool>()),
        0u8..3,
        proptest::option::of(0u8..2),
        proptest::option::of(0u8..3),
    )
        .prop_map(
            |(host, ready, serving, terminating, node, zone_hint, node_hint)| EpGen {
                host,
                ready,
                serving,
                terminating,
                node,
                zone_hint,
                node_hint,
            },
        )
}

fn svc_gen() -> impl Strategy<Value = SvcGen> {
    (
        any::<bool>(),
        proptest::collection::vec(proptest::collection::vec(ep_gen(), 0..6), 0..4),
    )
        .prop_map(|(local, slices)| SvcGen { local, slices })
}

fn build_table(svcs: &[SvcGen]) -> ServiceTable {
    let mut t = ServiceTable::new();
    let mut batch = Vec::new();
    for (i, g) in svcs.iter().enumerate() {
        let name = format!("svc-{i}");
        batch.push(Change::UpsertService(
            Service::builder("default", &name)
                .cluster_ip(IpAddr::from([10, 96, (i / 200) as u8, (i % 200) as u8 + 1]))
                .port(ServicePortSpec::tcp(80))
                .internal_traffic_policy(if g.local {
                    TrafficPolicy::Local
                } else {
                    TrafficPolicy::Cluster
                })
                .build()
                .unwrap(),
        ));
        for (s, eps) in g.slices.iter().enumerate() {
            let mut seen = BTreeSet::new();
            let mut b =
                EndpointSlice::builder("default", format!("{name}-{s}"), &name, AddressType::IPv4)
                    .port(SlicePortSpec::tcp(8080));
            for e in eps {
                if !seen.insert(e.host) {
                    continue;
                }
                let mut spec = EndpointSpec::new(format!("10.1.{i}.{}", e.host))
                    .node(format!("node-{}", e.node));
                spec.conditions = Conditions {
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                };
                spec = spec.zone(format!("zone-{}", e.node % 2));
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
    t.apply_batch(batch).unwrap();
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn both_modes_agree_on_candidates_and_verdicts(svcs in proptest::collection::vec(svc_gen(), 1..12), seed in any::<u64>()) {
        let t = build_table(&svcs);
        let config = DataplaneConfig::with_seed(seed).conntrack(None).node(NodeTopology::new("node-0", "zone-0"));
        let (ipt, ipvs) = both(&t, config.clone());
        let nft = NftablesDataplane::new(config);
        nft.sync(&t, &t.full_change_set(), Instant::ZERO);
        for i in 0..svcs.len() {
            let vip = SocketAddr::from(([10, 96, (i / 200) as u8, (i % 200) as u8 + 1], 80));
            let sort = |c: Candidates| match c {
                Candidates::Endpoints(mut v) => { v.sort(); Candidates::Endpoints(v) }
                other => other,
            };
            let a = sort(ipt.candidates(Protocol::Tcp, vip));
            let b = sort(ipvs.candidates(Protocol::Tcp, vip));
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&a, &sort(nft.candidates(Protocol::Tcp, vip)));
            let f = Flow::tcp(SocketAddr::from(([10, 2, 0, 1], 4000)), vip);
            for dp in [&ipt as &dyn Dataplane, &ipvs, &nft] {
                let v = dp.route(&f, Instant::ZERO);
                match (&a, v) {
                    (Candidates::Endpoints(eps), Verdict::Forward(svclb::Forward { backend: be, .. })) => prop_assert!(eps.contains(&be)),
                    (Candidates::Reject, Verdict::Reject) | (Candidates::Drop, Verdict::Drop) => {}
                    (c, v) => prop_assert!(false, "{} gave {:?} for {:?}", dp.mode(), v, c),
                }
            }
        }
        let stray = Flow::tcp(SocketAddr::from(([10, 2, 0, 1], 4000)), SocketAddr::from(([10, 97, 0, 1], 80)));
        prop_assert_eq!(ipt.route(&stray, Instant::ZERO), Verdict::NotAService);
        prop_assert_eq!(ipvs.route(&stray, Instant::ZERO), Verdict::NotAService);
    }
}

/// Two independent load balancers built from the same endpoints agree on
/// every client with Maglev (`mh`) and source hashing (`sh`), with no shared
/// state and different random seeds.
#[test]
fn independent_dataplanes_agree_with_consistent_hashing() {
    let t = web_table();
    for kind in [SchedulerKind::Maglev, SchedulerKind::SourceHash] {
        let a = IpvsDataplane::new(
            DataplaneConfig::with_seed(1)
                .conntrack(None)
                .scheduler(kind),
        );
        let b = IpvsDataplane::new(
            DataplaneConfig::with_seed(2)
                .conntrack(None)
                .scheduler(kind),
        );
        a.sync(&t, &t.full_change_set(), Instant::ZERO);
        b.sync(&t, &t.full_change_set(), Instant::ZERO);
        let mut seen = BTreeSet::new();
        for host in 0..=255u8 {
            let f = flow(
                &format!("10.9.{host}.7:{}", 1000 + u16::from(host)),
                "10.96.0.10:80",
            );
            let (va, vb) = (a.route(&f, Instant::ZERO), b.route(&f, Instant::ZERO));
            assert_eq!(va, vb, "{kind}");
            // The source port does not matter without the -port flag.
            let f2 = flow(&format!("10.9.{host}.7:9"), "10.96.0.10:80");
            assert_eq!(a.route(&f2, Instant::ZERO), va);
            seen.insert(va.backend().unwrap());
        }
        assert_eq!(seen.len(), 3, "{kind} spreads over all endpoints");
    }
}

#[test]
fn nftables_mode_is_uniform_and_follows_updates() {
    let mut t = web_table();
    let nft = NftablesDataplane::new(
        DataplaneConfig::with_seed(5)
            .conntrack(None)
            .scheduler(SchedulerKind::LeastConnection),
    );
    assert_eq!(nft.config().scheduler.name(), "numgen");
    nft.sync(&t, &t.full_change_set(), Instant::ZERO);
    let mut counts: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    for _ in 0..60_000 {
        let b = nft
            .route(&flow("10.2.0.1:1", "10.96.0.10:80"), Instant::ZERO)
            .backend()
            .unwrap();
        *counts.entry(b).or_default() += 1;
    }
    assert_eq!(counts.len(), 3);
    let chi2: f64 = counts
        .values()
        .map(|&c| (f64::from(c) - 20_000.0).powi(2) / 20_000.0)
        .sum();
    assert!(chi2 < 13.82, "chi2 {chi2}: {counts:?}");
    assert_eq!(
        nft.route(&flow("10.2.0.1:1", "10.96.0.99:80"), Instant::ZERO),
        Verdict::NotAService
    );
    let cs = t
        .apply(Change::UpsertSlice(slice(
            "web-1",
            "web",
            &["10.1.0.2"],
            8080,
        )))
        .unwrap();
    nft.sync(&t, &cs, Instant::ZERO);
    assert_eq!(
        nft.route(&flow("10.2.0.1:1", "10.96.0.10:80"), Instant::ZERO)
            .backend(),
        Some(sa("10.1.0.2:8080"))
    );
    assert_eq!(nft.map_element_count(), 1);
}
