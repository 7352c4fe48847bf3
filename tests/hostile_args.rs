//! Hostile arguments to the public entry points: out-of-range numbers,
//! extremes, empty and huge inputs, malformed text. Each call either
//! succeeds or returns a typed error naming its field; none panics (a panic
//! fails the test).
//!
//! Custom schedulers returning out-of-range indices are the dataplanes'
//! concern and are tested with them.

use core::time::Duration;
use std::net::{IpAddr, SocketAddr};

use svclb::render::{Cidr, IpFamily, RenderOptions, masquerade_mark};
use svclb::scheduler::{
    Destination, Maglev, PickContext, iptables_probability, probability_threshold,
};
use svclb::trace::{parse_line, parse_trace};
use svclb::*;

const HOSTILE_INTS: [i64; 10] = [
    i64::MIN,
    -65_536,
    -1,
    0,
    1,
    65_535,
    65_536,
    86_401,
    u32::MAX as i64 + 1,
    i64::MAX,
];

const HOSTILE_TEXT: [&str; 10] = [
    "",
    " ",
    "-",
    "a/b",
    "\0",
    "ünïcödé",
    "10.0.0.1/33",
    "::/129",
    "999.1.1.1",
    "x\ny\tz",
];

fn long_text() -> String {
    "a".repeat(100_000)
}

#[test]
fn service_builder_rejects_or_builds() {
    for &v in &HOSTILE_INTS {
        let r = Service::builder("default", "web")
            .cluster_ip("10.96.0.1".parse().unwrap())
            .port(ServicePortSpec::tcp(v).target_port(v))
            .build();
        if let Err(e) = &r {
            assert!(!e.field().is_empty(), "{e}");
        }
        assert_eq!(r.is_ok(), (1..=65_535).contains(&v), "port {v}: {r:?}");
        let r = Service::builder("default", "web")
            .cluster_ip("10.96.0.1".parse().unwrap())
            .port(ServicePortSpec::tcp(80))
            .client_ip_affinity(Some(v))
            .build();
        assert_eq!(r.is_ok(), (1..=86_400).contains(&v), "timeout {v}: {r:?}");
    }
    let long = long_text();
    for name in HOSTILE_TEXT.iter().copied().chain([long.as_str()]) {
        let r = Service::builder(name, name)
            .cluster_ip("10.96.0.1".parse().unwrap())
            .port(ServicePortSpec::udp(53).name(name).target_port_name(name))
            .topology_mode(name)
            .build();
        if let Err(e) = r {
            assert!(!e.to_string().is_empty());
        }
    }
    // Many ports, duplicates, no ports.
    let mut b = Service::builder("default", "many").cluster_ip("10.96.0.2".parse().unwrap());
    for p in 0..300 {
        b = b.port(ServicePortSpec::tcp(1 + p % 5));
    }
    assert!(b.build().is_err());
    let _ = Service::builder("default", "none").build();
    let _ = Service::builder("default", "headless").headless().build();
}

#[test]
fn endpoint_slice_builder_rejects_or_builds() {
    let long = long_text();
    for address in HOSTILE_TEXT.iter().copied().chain([long.as_str(), "::1"]) {
        for &w in &HOSTILE_INTS {
            let r = EndpointSlice::builder("default", "s-1", "s", AddressType::IPv4)
                .port(SlicePortSpec::tcp(w).name(address))
                .endpoint(
                    EndpointSpec::new(address)
                        .weight(w)
                        .hostname(address)
                        .node(address)
                        .zone(address)
                        .hint_zone(address)
                        .hint_node(address),
                )
                .build();
            if let Err(e) = r {
                assert!(!e.field().is_empty(), "{e}");
            }
        }
    }
    for t in [AddressType::IPv4, AddressType::IPv6, AddressType::Fqdn] {
        let _ = EndpointSlice::builder("", "", "", t)
            .endpoints(
                (0..1200).map(|i| EndpointSpec::new(format!("10.0.{}.{}", i / 250, i % 250))),
            )
            .build();
    }
}

#[test]
fn affinity_config_and_table_take_extremes() {
    for cap in [0usize, 1, 2, 15, 16, 17, usize::MAX / 2, usize::MAX] {
        let Ok(c) = AffinityConfig::new(cap) else {
            assert_eq!(cap, 0);
            continue;
        };
        for s in [0usize, 1, 3, 1024, 2048, usize::MAX] {
            let _ = c.clone().shards(s);
        }
        for r in [0usize, 1, 64, 65, usize::MAX] {
            let _ = c.clone().reap_batch(r);
        }
        for p in [0usize, 1, usize::MAX] {
            let _ = c.clone().per_service_capacity(p);
        }
        for f in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            0.0,
            0.999,
            1.0,
            f64::MAX,
        ] {
            let r = c.clone().hotspot_thresholds(f, u64::MAX);
            assert_eq!(r.is_ok(), f.is_finite() && f >= 1.0, "factor {f}");
        }
        let c = c.hash_key([u64::MAX; 4]);
        // A table of any valid capacity is cheap to build: nothing is
        // allocated up front.
        let table = AffinityTable::new(c, u64::MAX);
        for timeout in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
            let scope = table.new_scope(timeout);
            let b: SocketAddr = "10.1.0.1:80".parse().unwrap();
            for now in [
                Instant::ZERO,
                Instant::from_secs(u64::MAX),
                Instant::from_nanos(u64::MAX),
            ] {
                let key = AffinityKey::Caller(u64::MAX);
                let _ = table.route(&scope, key, now, |e| (e == b).then_some(0), || Some((0, b)));
                let _ = table.route(&scope, key, now, |_| None, || None);
                let _ = table.get(&scope, key, now);
                let _ = table.entries(&scope, now);
                let _ = table.retain(&scope, now, |_| false);
                assert!(table.shard_index(&scope, key) < table.shards());
            }
            table.remove_scope(&scope);
            table.remove_scope(&scope);
            let _ = table.route(
                &scope,
                AffinityKey::Caller(0),
                Instant::ZERO,
                |_| None,
                || None,
            );
        }
    }
}

#[test]
fn seeded_rng_takes_every_bound() {
    let r = SeededRng::new(u64::MAX);
    for n in [0u64, 1, 2, u64::MAX - 1, u64::MAX] {
        for _ in 0..100 {
            let v = r.below(n);
            assert!(v < n.max(1), "below({n}) = {v}");
        }
    }
    let _ = Instant::from_secs_f64(f64::NAN);
    let _ = Instant::from_secs_f64(f64::INFINITY);
    let _ = Instant::from_secs_f64(-1.0);
    let _ = Instant::from_secs_f64(f64::MAX);
}

#[test]
fn render_options_and_cidrs_take_hostile_values() {
    for bit in 0..=u8::MAX {
        let r = masquerade_mark(bit);
        assert_eq!(r.is_ok(), bit <= 31, "bit {bit}");
    }
    let long = long_text();
    for text in HOSTILE_TEXT.iter().copied().chain([
        long.as_str(),
        "10.0.0.0/",
        "/8",
        "10.0.0.0/-1",
        "10.0.0.0/256",
        "::/128",
    ]) {
        if let Err(e) = Cidr::parse("clusterCIDR", text) {
            assert_eq!(e.field(), "clusterCIDR");
        }
    }
    let mut table = ServiceTable::new();
    let svc = Service::builder("default", "web")
        .cluster_ip("10.96.0.1".parse().unwrap())
        .port(ServicePortSpec::tcp(80).target_port(8080))
        .build()
        .unwrap();
    table.apply(Change::UpsertService(svc)).unwrap();
    for family in [IpFamily::V4, IpFamily::V6] {
        let opts = RenderOptions::default()
            .family(family)
            .masquerade_mark(long.as_str())
            .cluster_cidr(Cidr::parse("c", "0.0.0.0/0").unwrap())
            .cluster_cidr(Cidr::parse("c", "::/0").unwrap())
            .service_cidr(Cidr::parse("c", "255.255.255.255/32").unwrap())
            .node(NodeTopology::new(long.as_str(), ""));
        let _ = svclb::render::iptables::render(&table, &opts);
        let _ = svclb::render::nft::render(&table, &opts);
    }
}

#[test]
fn trace_parsing_rejects_malformed_lines() {
    let long = long_text();
    for text in HOSTILE_TEXT.iter().copied().chain([
        long.as_str(),
        "18446744073709551616 connect 10.0.0.1:1 10.96.0.1:80",
        "NaN connect 10.0.0.1:1 10.96.0.1:80",
        "-1 connect 10.0.0.1:1 10.96.0.1:80",
        "1e308 connect 10.0.0.1:1 10.96.0.1:80",
        "1 connect",
        "1 connect 10.0.0.1:99999 10.96.0.1:80",
        "1 apply",
        "1 delete Service",
        "1 delete Service a/b/c",
        "1 close 10.0.0.1:1 10.96.0.1:80 not-an-address",
    ]) {
        if let Err(e) = parse_line(usize::MAX, text) {
            assert!(!e.field().is_empty());
        }
        let _ = parse_trace(text);
    }
    let _ = parse_trace("2 connect 10.0.0.1:1 10.96.0.1:80\n1 connect 10.0.0.1:1 10.96.0.1:80");
}

#[test]
fn schedulers_build_and_pick_with_no_or_huge_destinations() {
    let rng = SeededRng::new(1);
    let flow = Flow::tcp(
        "10.2.0.1:40000".parse().unwrap(),
        "10.96.0.1:80".parse().unwrap(),
    );
    let ctx = PickContext {
        flow: &flow,
        now: Instant::from_nanos(u64::MAX),
        rng: &rng,
        rotation: None,
    };
    let addr = |i: u32| SocketAddr::new(IpAddr::from([10, 1, (i >> 8) as u8, i as u8]), 80);
    let sets: Vec<Vec<Destination>> = vec![
        vec![],
        vec![Destination::new(addr(0), 0)],
        vec![Destination::new(addr(0), u32::MAX)],
        (0..3)
            .map(|i| Destination::new(addr(i), u32::MAX))
            .collect(),
        (0..3)
            .map(|i| Destination::new(addr(i), [0, u32::MAX, 1][i as usize]))
            .collect(),
        (0..300)
            .map(|i| Destination::new(addr(i), u32::MAX - i))
            .collect(),
    ];
    for kind in SchedulerKind::ALL.iter().copied() {
        let config = SchedulerConfig::from(kind);
        for dests in &sets {
            let selector = config.build(dests);
            for _ in 0..50 {
                if let Some(i) = selector.pick(dests, &ctx) {
                    assert!(i < dests.len(), "{kind}: index {i} of {}", dests.len());
                    assert!(
                        dests[i].weight() > 0,
                        "{kind}: picked a weight-0 destination"
                    );
                }
            }
            if dests.iter().all(|d| d.weight() == 0) {
                assert_eq!(selector.pick(dests, &ctx), None, "{kind}");
            }
        }
    }
    for dests in &sets {
        for size in [0u32, 1, 2, 4, 65_537, u32::MAX] {
            let m = Maglev::new(dests, size, true);
            let _ = m.lookup(flow.src);
        }
    }
    for n in 1..50 {
        for i in 0..n {
            let p = iptables_probability(i, n);
            assert!((0.0..=1.0).contains(&p));
            let _ = probability_threshold(p);
        }
    }
    for p in [f64::NAN, f64::INFINITY, -1.0, 2.0] {
        let _ = probability_threshold(p);
    }
    assert!("".parse::<SchedulerKind>().is_err());
    assert!("RR".parse::<SchedulerKind>().is_err());
}

#[test]
fn dataplanes_take_hostile_flows_and_times() {
    let mut table = ServiceTable::new();
    let svc = Service::builder("default", "web")
        .cluster_ip("10.96.0.1".parse().unwrap())
        .port(ServicePortSpec::tcp(80).target_port(8080))
        .client_ip_affinity(Some(1))
        .build()
        .unwrap();
    let slice = EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080))
        .endpoint(EndpointSpec::new("10.1.0.1").weight(65_535))
        .endpoint(EndpointSpec::new("10.1.0.2").weight(0))
        .build()
        .unwrap();
    let changes = table
        .apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)])
        .unwrap();
    let config = DataplaneConfig::with_seed(u64::MAX)
        .affinity(AffinityConfig::new(1).unwrap())
        .node(NodeTopology::new("", ""));
    let dps: Vec<Box<dyn Dataplane>> = SchedulerKind::ALL
        .iter()
        .copied()
        .map(|k| Box::new(IpvsDataplane::new(config.clone().scheduler(k))) as Box<dyn Dataplane>)
        .chain([
            Box::new(IptablesDataplane::new(config.clone())) as Box<dyn Dataplane>,
            Box::new(NftablesDataplane::new(config.clone())),
        ])
        .collect();
    let flows = [
        Flow::tcp(
            "0.0.0.0:0".parse().unwrap(),
            "10.96.0.1:80".parse().unwrap(),
        ),
        Flow::tcp("[::]:0".parse().unwrap(), "10.96.0.1:80".parse().unwrap()),
        Flow::udp(
            "255.255.255.255:65535".parse().unwrap(),
            "10.96.0.1:80".parse().unwrap(),
        ),
        Flow::tcp("10.2.0.1:1".parse().unwrap(), "[::1]:0".parse().unwrap()),
    ];
    for dp in &dps {
        dp.sync(&table, &changes, Instant::from_nanos(u64::MAX));
        for f in &flows {
            for now in [Instant::ZERO, Instant::from_nanos(u64::MAX), Instant::ZERO] {
                for key in [None, Some(0), Some(u64::MAX)] {
                    if let Verdict::Forward(_) = dp.route_with_key(f, key, now) {
                        for flags in [
                            TcpFlags::ACK,
                            TcpFlags::SYN | TcpFlags::FIN | TcpFlags::RST,
                            TcpFlags::default(),
                        ] {
                            let _ = dp.packet(f, flags, now);
                            let r = Flow::new(f.protocol, f.dst, f.src);
                            let _ = dp.reply(&r, flags, now);
                        }
                        dp.connection_closed(f, now);
                        dp.connection_closed(f, now);
                    }
                }
                // Closing what was never opened.
                dp.connection_closed(&Flow::tcp("10.9.9.9:1".parse().unwrap(), f.dst), now);
                let _ = dp.poll_timeout();
                dp.handle_timeout(now);
                let _ = dp.connections(now);
            }
        }
        let _ = dp.affinity_entries(&ServiceKey::new("", ""), Instant::ZERO);
        let _ = dp.affinity_report(&ServiceKey::new("default", "web"), Instant::ZERO);
        // A sync with an empty table and a stale change set.
        dp.sync(&ServiceTable::new(), &changes, Instant::ZERO);
        let _ = dp.route(&flows[0], Instant::ZERO);
    }
}
