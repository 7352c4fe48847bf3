//! Session affinity across the table and both dataplanes, with a fake clock.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use common::*;
use proptest::prelude::*;
use svclb::*;

const VIP: &str = "10.96.0.10:80";
const IPS: [&str; 3] = ["10.1.0.1", "10.1.0.2", "10.1.0.3"];

fn sticky_service(timeout: i64, kind: AffinityKeyKind) -> Service {
    Service::builder("default", "web")
        .cluster_ip("10.96.0.10".parse().unwrap())
        .port(ServicePortSpec::tcp(80).name("http").target_port(8080))
        .client_ip_affinity(Some(timeout))
        .affinity_key(kind)
        .build()
        .unwrap()
}

fn slice_with(eps: impl IntoIterator<Item = EndpointSpec>) -> EndpointSlice {
    EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080).name("http"))
        .endpoints(eps)
        .build()
        .unwrap()
}

fn sticky_table(timeout: i64, kind: AffinityKeyKind) -> ServiceTable {
    let mut t = ServiceTable::new();
    t.apply_batch([
        Change::UpsertService(sticky_service(timeout, kind)),
        Change::UpsertSlice(slice_with(IPS.iter().map(|ip| EndpointSpec::new(*ip)))),
    ])
    .unwrap();
    t
}

fn key() -> ServiceKey {
    ServiceKey::new("default", "web")
}

/// All three dataplanes, IPVS with round-robin (so an unpinned client would
/// move), nftables with its uniform `numgen`.
fn dataplanes(t: &ServiceTable, config: DataplaneConfig) -> [Box<dyn Dataplane>; 3] {
    let nft = NftablesDataplane::new(config.clone());
    nft.sync(t, &t.full_change_set(), Instant::ZERO);
    let (ipt, ipvs) = both(t, config);
    [Box::new(ipt), Box::new(ipvs), Box::new(nft)]
}

fn secs(s: u64) -> Instant {
    Instant::from_secs(s)
}

fn client(i: u32) -> Flow {
    let ip = std::net::Ipv4Addr::from(0x0A02_0000 + i);
    Flow::tcp(SocketAddr::from((ip, 40_000)), sa(VIP))
}

fn backend(dp: &dyn Dataplane, f: &Flow, now: Instant) -> SocketAddr {
    dp.route(f, now).backend().expect("forward")
}

#[test]
fn both_modes_stick_within_the_window_and_expire_after_idle_timeout() {
    let t = sticky_table(100, AffinityKeyKind::ClientIp);
    for dp in dataplanes(&t, DataplaneConfig::with_seed(3).conntrack(None)) {
        let dp = &*dp;
        let c = client(1);
        let first = backend(dp, &c, secs(0));
        // New connections from other source ports of the same address.
        for (i, t) in [0u64, 10, 60, 99].into_iter().enumerate() {
            let f = Flow::tcp(SocketAddr::new(c.src.ip(), 50_000 + i as u16), c.dst);
            assert_eq!(backend(dp, &f, secs(t)), first, "{} at {t}", dp.mode());
        }
        // Last new connection at 99: the entry is listed until 199.
        let entries = dp.affinity_entries(&key(), secs(150));
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].endpoint, first);
        assert_eq!(entries[0].key, AffinityKey::ClientIp(c.src.ip()));
        assert_eq!(entries[0].time_left.as_secs(), 49);
        assert!(
            dp.affinity_entries(&key(), Instant::from_nanos(198_999_999_999))
                .len()
                == 1
        );
        assert!(dp.affinity_entries(&key(), secs(199)).is_empty());
        // After T idle seconds the client is balanced afresh: over many
        // expiries it reaches every endpoint.
        let mut seen = BTreeSet::new();
        let mut now = 199;
        for _ in 0..60 {
            seen.insert(backend(dp, &c, secs(now)));
            now += 100;
        }
        assert_eq!(seen.len(), 3, "{}: {seen:?}", dp.mode());
    }
}

#[test]
fn both_modes_refresh_on_each_new_connection_and_stay_pinned_indefinitely() {
    let t = sticky_table(30, AffinityKeyKind::ClientIp);
    for dp in dataplanes(&t, DataplaneConfig::with_seed(5).conntrack(None)) {
        let dp = &*dp;
        let first = backend(dp, &client(1), secs(0));
        // One connection every T-1 seconds for 2000 rounds (about 16 hours),
        // with other clients in between.
        for n in 1..=2000u64 {
            let now = secs(n * 29);
            dp.route(&client(1000 + n as u32), now);
            assert_eq!(
                backend(dp, &client(1), now),
                first,
                "{} round {n}",
                dp.mode()
            );
        }
        // Other clients are spread: affinity is per client, not global.
        let spread: BTreeSet<_> = (0..50)
            .map(|i| backend(dp, &client(10_000 + i), secs(100_000)))
            .collect();
        assert_eq!(spread.len(), 3);
    }
}

#[test]
fn both_modes_rebalance_at_once_when_the_endpoint_goes_away_or_stops_being_ready() {
    for kind in ["removed", "not-ready", "weight-0"] {
        let mut t = sticky_table(10_800, AffinityKeyKind::ClientIp);
        let [ipt, ipvs, nft] = dataplanes(&t, DataplaneConfig::with_seed(11).conntrack(None));
        let clients: Vec<Flow> = (0..30).map(client).collect();
        let pinned: Vec<[SocketAddr; 3]> = clients
            .iter()
            .map(|c| {
                [
                    backend(&*ipt, c, secs(0)),
                    backend(&*ipvs, c, secs(0)),
                    backend(&*nft, c, secs(0)),
                ]
            })
            .collect();
        // Take 10.1.0.2 out of rotation.
        let gone = sa("10.1.0.2:8080");
        let eps: Vec<EndpointSpec> = IPS
            .iter()
            .filter(|ip| !(kind == "removed" && **ip == "10.1.0.2"))
            .map(|ip| {
                let e = EndpointSpec::new(*ip);
                match (*ip == "10.1.0.2", kind) {
                    (true, "not-ready") => e.ready(false),
                    (true, "weight-0") => e.weight(0),
                    _ => e,
                }
            })
            .collect();
        let cs = t.apply(Change::UpsertSlice(slice_with(eps))).unwrap();
        ipt.sync(&t, &cs, Instant::ZERO);
        ipvs.sync(&t, &cs, Instant::ZERO);
        nft.sync(&t, &cs, Instant::ZERO);
        for (m, dp) in [&ipt, &ipvs, &nft].into_iter().enumerate() {
            // The sync purged the gone endpoint's entries eagerly.
            let entries = dp.affinity_entries(&key(), secs(1));
            assert!(
                entries.iter().all(|e| e.endpoint != gone),
                "{kind} {}",
                dp.mode()
            );
            for (c, p) in clients.iter().zip(&pinned) {
                let now = backend(&**dp, c, secs(1));
                if p[m] == gone {
                    assert_ne!(now, gone, "{kind} {}", dp.mode());
                    // And the new choice sticks.
                    assert_eq!(backend(&**dp, c, secs(2)), now);
                } else {
                    assert_eq!(now, p[m], "{kind} {}: others stay", dp.mode());
                }
            }
        }
    }
}

#[test]
fn a_returning_endpoint_does_not_get_its_old_clients_back() {
    // kube-proxy deletes an endpoint's chain and its `recent` list with it;
    // IPVS drops the templates. When it returns, its old clients stay put.
    let mut t = sticky_table(10_800, AffinityKeyKind::ClientIp);
    let [ipt, ipvs, _nft] = dataplanes(&t, DataplaneConfig::with_seed(2).conntrack(None));
    let c = client(1);
    let a = [backend(&*ipt, &c, secs(0)), backend(&*ipvs, &c, secs(0))];
    let without = |x: SocketAddr| {
        slice_with(
            IPS.iter()
                .filter(|ip| format!("{ip}:8080") != x.to_string())
                .map(|ip| EndpointSpec::new(*ip)),
        )
    };
    for (m, dp) in [&ipt, &ipvs].into_iter().enumerate() {
        let cs = t.apply(Change::UpsertSlice(without(a[m]))).unwrap();
        dp.sync(&t, &cs, Instant::ZERO);
        let b = backend(&**dp, &c, secs(1));
        assert_ne!(b, a[m]);
        let cs = t
            .apply(Change::UpsertSlice(slice_with(
                IPS.iter().map(|ip| EndpointSpec::new(*ip)),
            )))
            .unwrap();
        dp.sync(&t, &cs, Instant::ZERO);
        assert_eq!(backend(&**dp, &c, secs(2)), b, "{}", dp.mode());
    }
}

#[test]
fn both_modes_agree_on_affinity_over_a_random_day() {
    // The same connection schedule through both modes: the same hits and
    // misses, the same entry counts, and each keeps its own choice.
    let t = sticky_table(600, AffinityKeyKind::ClientIp);
    let [ipt, ipvs, nft] = dataplanes(&t, DataplaneConfig::with_seed(8).conntrack(None));
    let rng = SeededRng::new(99);
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    let mut pinned: [BTreeMap<u32, SocketAddr>; 3] = Default::default();
    let mut now = 0;
    for _ in 0..20_000 {
        now += rng.below(10);
        let c = rng.below(200) as u32;
        let live = last.get(&c).is_some_and(|&l| now - l < 600);
        for (m, dp) in [&ipt, &ipvs, &nft].into_iter().enumerate() {
            let b = backend(&**dp, &client(c), secs(now));
            if live {
                assert_eq!(
                    Some(&b),
                    pinned[m].get(&c),
                    "{} client {c} at {now}",
                    dp.mode()
                );
            }
            pinned[m].insert(c, b);
        }
        last.insert(c, now);
        if rng.below(1000) == 0 {
            let a = ipt.affinity_entries(&key(), secs(now));
            let b = ipvs.affinity_entries(&key(), secs(now));
            let keys = |v: &[AffinityEntry]| -> Vec<(AffinityKey, u64)> {
                v.iter().map(|e| (e.key, e.time_left.as_secs())).collect()
            };
            assert_eq!(keys(&a), keys(&b));
            assert_eq!(keys(&a), keys(&nft.affinity_entries(&key(), secs(now))));
            let expected = last.values().filter(|&&l| now - l < 600).count();
            assert_eq!(a.len(), expected);
        }
    }
}

#[test]
fn caller_keys_pin_sessions_behind_one_nat_separately() {
    let t = sticky_table(3600, AffinityKeyKind::Caller);
    for dp in dataplanes(&t, DataplaneConfig::with_seed(4).conntrack(None)) {
        let dp = &*dp;
        let nat = client(1);
        // 300 sessions (cookies) behind one address spread over all endpoints...
        let per_session: Vec<SocketAddr> = (0..300u64)
            .map(|cookie| {
                dp.route_with_key(&nat, Some(cookie), secs(0))
                    .backend()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            per_session.iter().collect::<BTreeSet<_>>().len(),
            3,
            "{}",
            dp.mode()
        );
        // ... and each stays pinned.
        for (cookie, b) in per_session.iter().enumerate() {
            assert_eq!(
                dp.route_with_key(&nat, Some(cookie as u64), secs(100))
                    .backend(),
                Some(*b)
            );
        }
        // No key: the client address is the key.
        let a = dp.route_with_key(&nat, None, secs(100)).backend().unwrap();
        for _ in 0..5 {
            assert_eq!(dp.route(&nat, secs(101)).backend(), Some(a));
        }
        let entries = dp.affinity_entries(&key(), secs(101));
        assert_eq!(entries.len(), 301);
        assert!(entries.contains(&AffinityEntry {
            protocol: Protocol::Tcp,
            vip: sa(VIP),
            key: AffinityKey::ClientIp(nat.src.ip()),
            endpoint: a,
            time_left: core::time::Duration::from_secs(3600),
        }));
    }
    // A ClientIP-keyed service ignores the caller's key.
    let t = sticky_table(3600, AffinityKeyKind::ClientIp);
    for dp in dataplanes(&t, DataplaneConfig::with_seed(4).conntrack(None)) {
        let nat = client(1);
        let a = dp.route_with_key(&nat, Some(1), secs(0));
        for k in 2..50 {
            assert_eq!(dp.route_with_key(&nat, Some(k), secs(0)), a);
        }
    }
}

#[test]
fn client_ip_port_keys_pin_each_socket() {
    let t = sticky_table(3600, AffinityKeyKind::ClientIpPort);
    for dp in dataplanes(&t, DataplaneConfig::with_seed(4).conntrack(None)) {
        let dp = &*dp;
        let ip = client(1).src.ip();
        let flows: Vec<Flow> = (0..60)
            .map(|p| Flow::tcp(SocketAddr::new(ip, 30_000 + p), sa(VIP)))
            .collect();
        let first: Vec<_> = flows.iter().map(|f| backend(dp, f, secs(0))).collect();
        assert_eq!(first.iter().collect::<BTreeSet<_>>().len(), 3);
        for (f, b) in flows.iter().zip(&first) {
            assert_eq!(backend(dp, f, secs(10)), *b);
        }
    }
}

#[test]
fn services_without_affinity_are_not_pinned_and_turning_it_off_forgets() {
    let mut t = sticky_table(3600, AffinityKeyKind::ClientIp);
    let (ipt, ipvs) = both(&t, DataplaneConfig::with_seed(6).conntrack(None));
    let (ipt, ipvs): (&dyn Dataplane, &dyn Dataplane) = (&ipt, &ipvs);
    for dp in [ipt, ipvs] {
        for i in 0..10 {
            dp.route(&client(i), secs(0));
        }
        assert_eq!(dp.affinity_entries(&key(), secs(0)).len(), 10);
    }
    let plain = Service::builder("default", "web")
        .cluster_ip("10.96.0.10".parse().unwrap())
        .port(ServicePortSpec::tcp(80).name("http").target_port(8080))
        .build()
        .unwrap();
    let cs = t.apply(Change::UpsertService(plain)).unwrap();
    for dp in [ipt, ipvs] {
        dp.sync(&t, &cs, Instant::ZERO);
        assert!(dp.affinity_entries(&key(), secs(1)).is_empty());
        assert!(dp.affinity_report(&key(), secs(1)).is_none());
        let seen: BTreeSet<_> = (0..30).map(|_| backend(dp, &client(1), secs(1))).collect();
        assert!(seen.len() > 1, "{}: not pinned any more", dp.mode());
    }
    // Deleting the service deletes its entries.
    let cs = t
        .apply(Change::UpsertService(sticky_service(
            60,
            AffinityKeyKind::ClientIp,
        )))
        .unwrap();
    for dp in [ipt, ipvs] {
        dp.sync(&t, &cs, Instant::ZERO);
        dp.route(&client(1), secs(2));
        assert_eq!(dp.affinity_entries(&key(), secs(2)).len(), 1);
    }
}

#[test]
fn deleting_a_service_frees_its_entries() {
    let mut t = sticky_table(3600, AffinityKeyKind::ClientIp);
    let (ipt, ipvs) = both(&t, DataplaneConfig::with_seed(6).conntrack(None));
    for i in 0..100 {
        ipt.route(&client(i), secs(0));
        ipvs.route(&client(i), secs(0));
    }
    assert_eq!(ipt.affinity_table().len(), 100);
    assert_eq!(ipvs.affinity_table().len(), 100);
    let cs = t.apply(Change::DeleteService(key())).unwrap();
    ipt.sync(&t, &cs, Instant::ZERO);
    ipvs.sync(&t, &cs, Instant::ZERO);
    assert_eq!(ipt.affinity_table().len(), 0);
    assert_eq!(ipvs.affinity_table().len(), 0);
    assert!(ipt.affinity_entries(&key(), secs(0)).is_empty());
}

#[test]
fn a_new_timeout_applies_to_existing_entries() {
    let mut t = sticky_table(1000, AffinityKeyKind::ClientIp);
    let [ipt, ipvs, _nft] = dataplanes(&t, DataplaneConfig::with_seed(6).conntrack(None));
    for dp in [&ipt, &ipvs] {
        dp.route(&client(1), secs(0));
    }
    let cs = t
        .apply(Change::UpsertService(sticky_service(
            10,
            AffinityKeyKind::ClientIp,
        )))
        .unwrap();
    for dp in [&ipt, &ipvs] {
        dp.sync(&t, &cs, Instant::ZERO);
        assert_eq!(dp.affinity_entries(&key(), secs(5)).len(), 1);
        assert_eq!(
            dp.affinity_entries(&key(), secs(5))[0].time_left.as_secs(),
            5
        );
        assert!(
            dp.affinity_entries(&key(), secs(10)).is_empty(),
            "{}",
            dp.mode()
        );
    }
}

#[test]
fn the_bound_holds_through_a_dataplane_under_a_million_distinct_clients() {
    let t = sticky_table(10_800, AffinityKeyKind::ClientIp);
    let config = DataplaneConfig::with_seed(1).conntrack(None).affinity(
        AffinityConfig::new(50_000)
            .unwrap()
            .per_service_capacity(20_000)
            .unwrap(),
    );
    let ipvs = IpvsDataplane::new(config);
    ipvs.sync(&t, &t.full_change_set(), Instant::ZERO);
    for i in 0..1_000_000u32 {
        let v = ipvs.route(&client(i), Instant::from_millis(u64::from(i)));
        assert!(v.backend().is_some());
        if i % 100_000 == 99_999 {
            assert!(ipvs.affinity_table().len() <= 20_000);
        }
    }
    let n = ipvs.affinity_table().len();
    assert!((19_000..=20_000).contains(&n), "{n}");
    // The latest clients are pinned.
    let now = Instant::from_millis(1_000_000);
    let b = backend(&ipvs, &client(999_999), now);
    for _ in 0..3 {
        assert_eq!(backend(&ipvs, &client(999_999), now), b);
    }
}

#[test]
fn the_hotspot_report_flags_a_nat_in_ten_thousand_clients() {
    let t = sticky_table(10_800, AffinityKeyKind::ClientIp);
    let nat = Flow::tcp(sa("203.0.113.9:1024"), sa(VIP));
    for dp in dataplanes(&t, DataplaneConfig::with_seed(12).conntrack(None)) {
        let dp = &*dp;
        let rng = SeededRng::new(5);
        let mut now = 0;
        let mut nat_conns = 0u64;
        // 10,000 ordinary clients make 1-3 connections each; the NAT address
        // (hundreds of users) makes one in six of all connections.
        for round in 0..3 {
            for c in 0..10_000u32 {
                if round == 0 || rng.below(2) == 0 {
                    dp.route(&client(c), Instant::from_millis(now));
                }
                if rng.below(6) == 0 {
                    dp.route(&nat, Instant::from_millis(now));
                    nat_conns += 1;
                }
                now += 1;
            }
        }
        let report = dp
            .affinity_report(&key(), Instant::from_millis(now))
            .expect("affinity service");
        assert!(report.has_hotspots());
        let port = &report.ports[0];
        assert_eq!(port.vip, sa(VIP));
        assert_eq!(port.live_entries, 10_001);
        assert_eq!(port.hotspots.len(), 1, "{report}");
        let h = &port.hotspots[0];
        assert_eq!(h.key, AffinityKey::ClientIp(nat.src.ip()));
        assert!(h.connections <= nat_conns && h.connections >= nat_conns * 9 / 10);
        let share = nat_conns as f64 / port.new_connections as f64;
        assert!(
            (h.observed_share - share).abs() < 0.02,
            "{} vs {share}",
            h.observed_share
        );
        assert!((h.fair_share - 1.0 / 10_001.0).abs() < 1e-9);
        assert_eq!(
            h.endpoint,
            dp.route(&nat, Instant::from_millis(now)).backend()
        );
        // Per endpoint: new connections add up, live entries add up.
        let conns: u64 = port.endpoints.iter().map(|e| e.new_connections).sum();
        assert_eq!(conns, port.new_connections);
        let live: usize = port.endpoints.iter().map(|e| e.live_entries).sum();
        assert_eq!(live, 10_001);
        let text = report.to_string();
        assert!(text.contains("HOTSPOT key 203.0.113.9"), "{text}");
        assert!(text.contains("fair share 0.0100%"), "{text}");
    }
    // Without the NAT, nobody is flagged.
    let t = sticky_table(10_800, AffinityKeyKind::ClientIp);
    for dp in dataplanes(&t, DataplaneConfig::with_seed(12).conntrack(None)) {
        for round in 0..3u64 {
            for c in 0..10_000u32 {
                dp.route(&client(c), secs(round * 10_000 + u64::from(c)));
            }
        }
        let report = dp.affinity_report(&key(), secs(30_000)).unwrap();
        assert!(!report.has_hotspots(), "{report}");
    }
}

#[test]
fn many_threads_route_one_sticky_service() {
    let t = sticky_table(10_800, AffinityKeyKind::ClientIp);
    for dp in dataplanes(&t, DataplaneConfig::with_seed(1).conntrack(None)) {
        let dp = &*dp;
        std::thread::scope(|s| {
            for th in 0..4u32 {
                s.spawn(move || {
                    for i in 0..5_000u32 {
                        let c = client(i % 500);
                        let a = backend(dp, &c, secs(u64::from(th)));
                        assert_eq!(backend(dp, &c, secs(u64::from(th))), a);
                    }
                });
            }
        });
        assert_eq!(dp.affinity_entries(&key(), secs(4)).len(), 500);
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A new connection from client `c` after `dt` seconds.
    Connect { c: u8, dt: u16 },
    /// Endpoint `i` leaves (or comes back if absent).
    Toggle { i: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (0u8..16, 0u16..40).prop_map(|(c, dt)| Op::Connect { c, dt }),
        1 => (0u8..3).prop_map(|i| Op::Toggle { i }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// No affinity entry outlives its timeout, in either mode: every listed
    /// entry's time left equals T minus the idle time since that client's
    /// last new connection, a client idle for T is balanced afresh, and a
    /// client within T stays on its endpoint unless that endpoint left.
    #[test]
    fn no_affinity_entry_outlives_its_timeout(ops in proptest::collection::vec(op(), 1..200), timeout in 1i64..60, seed in any::<u64>()) {
        let mut t = sticky_table(timeout, AffinityKeyKind::ClientIp);
        let [ipt, ipvs, nft] = dataplanes(&t, DataplaneConfig::with_seed(seed).conntrack(None));
        let timeout = timeout as u64;
        let mut present = [true; 3];
        let mut now = 0u64;
        // The model: per mode, client -> (endpoint, last connection); an
        // endpoint that leaves takes its clients' entries with it.
        let mut model: [BTreeMap<u8, (SocketAddr, u64)>; 3] = Default::default();
        for op in ops {
            match op {
                Op::Toggle { i } => {
                    present[i as usize] = !present[i as usize];
                    if !present[i as usize] {
                        let gone = sa(&format!("{}:8080", IPS[i as usize]));
                        for m in &mut model {
                            m.retain(|_, (ep, _)| *ep != gone);
                        }
                    }
                    let eps = IPS.iter().enumerate().filter(|(j, _)| present[*j]).map(|(_, ip)| EndpointSpec::new(*ip));
                    let cs = t.apply(Change::UpsertSlice(slice_with(eps))).unwrap();
                    ipt.sync(&t, &cs, Instant::ZERO);
                    ipvs.sync(&t, &cs, Instant::ZERO);
                    nft.sync(&t, &cs, Instant::ZERO);
                }
                Op::Connect { c, dt } => {
                    now += u64::from(dt);
                    let f = client(u32::from(c));
                    for (m, dp) in [&ipt, &ipvs, &nft].into_iter().enumerate() {
                        match dp.route(&f, secs(now)) {
                            Verdict::Forward(svclb::Forward { backend: b, .. }) => {
                                if let Some((ep, last)) = model[m].get(&c) {
                                    if now - last < timeout {
                                        prop_assert_eq!(b, *ep, "{} client {}", dp.mode(), c);
                                    }
                                }
                                model[m].insert(c, (b, now));
                            }
                            Verdict::Reject => prop_assert!(present.iter().all(|p| !p)),
                            v => prop_assert!(false, "unexpected {:?}", v),
                        }
                    }
                }
            }
            for (m, dp) in [&ipt, &ipvs, &nft].into_iter().enumerate() {
                let listed = dp.affinity_entries(&key(), secs(now));
                for e in &listed {
                    let AffinityKey::ClientIp(std::net::IpAddr::V4(ip)) = e.key else { unreachable!() };
                    let c = (u32::from(ip) - 0x0A02_0000) as u8;
                    let (ep, last) = model[m][&c];
                    prop_assert_eq!(e.endpoint, ep);
                    prop_assert!(now - last < timeout, "entry of client {} idle {}s listed", c, now - last);
                    prop_assert_eq!(e.time_left, core::time::Duration::from_secs(timeout - (now - last)));
                }
                let live = model[m].values().filter(|(_, l)| now - l < timeout).count();
                prop_assert_eq!(listed.len(), live, "{}", dp.mode());
            }
        }
    }
}
