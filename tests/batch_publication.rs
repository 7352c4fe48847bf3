//! What readers see of a sync, in every dataplane: a batch whole or not at
//! all, and never the state of a skipped sync.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use common::{flow, service, slice};
use svclb::*;

fn untracked() -> DataplaneConfig {
    DataplaneConfig::with_seed(7).conntrack(None)
}

fn dataplanes() -> Vec<Box<dyn Dataplane>> {
    vec![
        Box::new(IptablesDataplane::new(untracked())),
        Box::new(IpvsDataplane::new(untracked())),
        Box::new(NftablesDataplane::new(untracked())),
    ]
}

/// The one endpoint of batch `k`: 10.1.(k / 256).(k % 256).
fn endpoint(k: u32) -> String {
    format!("10.1.{}.{}", k >> 8, k & 255)
}

/// The batch number a backend address encodes.
fn step(addr: SocketAddr) -> u32 {
    let IpAddr::V4(ip) = addr.ip() else {
        panic!("an IPv4 backend: {addr}");
    };
    let [_, _, hi, lo] = ip.octets();
    (u32::from(hi) << 8) | u32::from(lo)
}

/// Batch `k` moves both services `a` and `b` to endpoint `k`.
fn batch(k: u32) -> Vec<Change> {
    let ep = endpoint(k);
    vec![
        Change::UpsertSlice(slice("a-1", "a", &[ep.as_str()], 8080)),
        Change::UpsertSlice(slice("b-1", "b", &[ep.as_str()], 8080)),
    ]
}

const BATCHES: u32 = 1500;

/// A writer applies batches that move two services together from endpoint
/// k to k + 1, while a reader thread routes to both, in both orders. A
/// reader that saw one service at step k must see the other at step k or
/// later when it looks next: if a batch were published part by part, the
/// second lookup could see the older state of the service not yet stored.
#[test]
fn readers_never_see_half_a_batch() {
    for dp in dataplanes() {
        let mut table = ServiceTable::new();
        let mut first = vec![
            Change::UpsertService(service("a", "10.96.0.1", 80)),
            Change::UpsertService(service("b", "10.96.0.2", 80)),
        ];
        // Other services around them, so that the two share no structure
        // by accident.
        for i in 0..200u32 {
            let name = format!("other-{i}");
            let vip = format!("10.97.{}.{}", i >> 8, i & 255);
            let ep = format!("10.2.{}.{}", i >> 8, i & 255);
            first.push(Change::UpsertService(service(&name, &vip, 80)));
            first.push(Change::UpsertSlice(slice(
                &format!("{name}-1"),
                &name,
                &[ep.as_str()],
                8080,
            )));
        }
        first.extend(batch(0));
        let cs = table.apply_batch(first).unwrap();
        dp.sync(&table, &cs, Instant::ZERO);
        let to_a = flow("10.3.0.1:40000", "10.96.0.1:80");
        let to_b = flow("10.3.0.1:40000", "10.96.0.2:80");
        let done = AtomicBool::new(false);
        let dp = &*dp;
        let checked = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut checked = 0u64;
                let at = |f: &Flow| {
                    let b = dp.route(f, Instant::ZERO).backend().expect("forwarded");
                    step(b)
                };
                // Bounded: the writer's batches end the loop, and so does
                // the count.
                for round in 0..20_000_000u64 {
                    if done.load(Ordering::Acquire) {
                        break;
                    }
                    let (x, y, first, second) = if round % 2 == 0 {
                        let x = at(&to_a);
                        (x, at(&to_b), "a", "b")
                    } else {
                        let x = at(&to_b);
                        (x, at(&to_a), "b", "a")
                    };
                    assert!(
                        y >= x,
                        "{}: {first} at step {x}, then {second} at step {y}: half a batch",
                        dp.mode()
                    );
                    checked += 1;
                }
                checked
            });
            for k in 1..=BATCHES {
                let cs = table.apply_batch(batch(k)).unwrap();
                dp.sync(&table, &cs, Instant::ZERO);
            }
            done.store(true, Ordering::Release);
            reader.join().unwrap()
        });
        assert!(checked > 0, "{}: the reader ran", dp.mode());
        let a = dp.route(&to_a, Instant::ZERO).backend().unwrap();
        assert_eq!(step(a), BATCHES, "{}", dp.mode());
        assert_eq!(dp.generation_gaps(), 0, "{}", dp.mode());
    }
}

/// A sync skipped (its change set never reaches the dataplane) or replayed
/// is a generation gap: the dataplane resyncs in full from the table, so
/// it runs on the table's state, and it counts the gap.
#[test]
fn a_generation_gap_resyncs_in_full_and_is_counted() {
    let ip = |s: &str| SocketAddr::new(IpAddr::V4(s.parse::<Ipv4Addr>().unwrap()), 8080);
    for dp in dataplanes() {
        let mut table = ServiceTable::new();
        let cs = table
            .apply_batch([
                Change::UpsertService(service("web", "10.96.0.1", 80)),
                Change::UpsertSlice(slice("web-1", "web", &["10.1.0.1"], 8080)),
            ])
            .unwrap();
        dp.sync(&table, &cs, Instant::ZERO);
        // This change set is lost on its way to the dataplane.
        let _skipped = table
            .apply_batch([
                Change::UpsertService(service("api", "10.96.0.2", 80)),
                Change::UpsertSlice(slice("api-1", "api", &["10.1.0.2"], 8080)),
                Change::DeleteService(ServiceKey::new("default", "web")),
            ])
            .unwrap();
        let web = flow("10.3.0.1:40000", "10.96.0.1:80");
        let api = flow("10.3.0.1:40000", "10.96.0.2:80");
        let next = table
            .apply(Change::UpsertSlice(slice(
                "api-1",
                "api",
                &["10.1.0.3"],
                8080,
            )))
            .unwrap();
        assert!(!next.full && next.updated.len() == 1);
        dp.sync(&table, &next, Instant::ZERO);
        let m = dp.mode();
        assert_eq!(dp.generation_gaps(), 1, "{m}");
        assert_eq!(dp.route(&web, Instant::ZERO), Verdict::NotAService, "{m}");
        assert_eq!(
            dp.route(&api, Instant::ZERO).backend(),
            Some(ip("10.1.0.3")),
            "{m}"
        );
        // The same change set again: a gap too (its generation is not the
        // next one), and the state stays the table's.
        dp.sync(&table, &next, Instant::ZERO);
        assert_eq!(dp.generation_gaps(), 2, "{m}");
        assert_eq!(
            dp.route(&api, Instant::ZERO).backend(),
            Some(ip("10.1.0.3")),
            "{m}"
        );
        // In order again: no gap.
        let cs = table
            .apply(Change::UpsertSlice(slice(
                "api-1",
                "api",
                &["10.1.0.4"],
                8080,
            )))
            .unwrap();
        dp.sync(&table, &cs, Instant::ZERO);
        assert_eq!(dp.generation_gaps(), 2, "{m}");
        assert_eq!(
            dp.route(&api, Instant::ZERO).backend(),
            Some(ip("10.1.0.4")),
            "{m}"
        );
    }
}

/// Batches of the source-range test (each rebuilds the surface, a walk of
/// the plan).
const EDGE_BATCHES: u32 = 500;

/// The client batch `k` of the source-range test lets in: 10.4.(k / 256).(k % 256).
fn client(k: u32) -> String {
    format!("10.4.{}.{}", k >> 8, k & 255)
}

/// Batch `k` of the source-range test: the load balancer `edge` lets in
/// only `client(k)` (`loadBalancerSourceRanges`) and sends it to
/// endpoint `k`. The ranges live in the connection layer's surface, the
/// endpoints in the mode's table: one batch changes both.
fn edge_batch(k: u32) -> Vec<Change> {
    let ep = endpoint(k);
    let edge = Service::builder("default", "edge")
        .cluster_ip("10.96.5.1".parse().unwrap())
        .service_type(ServiceType::LoadBalancer)
        .load_balancer_ingress("10.200.0.10".parse().unwrap(), IpMode::VIP)
        .load_balancer_source_range(format!("{}/32", client(k)).parse().unwrap())
        .port(ServicePortSpec::tcp(80).name("http").target_port(8080))
        .build()
        .unwrap();
    vec![
        Change::UpsertService(edge),
        Change::UpsertSlice(slice("edge-1", "edge", &[ep.as_str()], 8080)),
    ]
}

/// A batch that changes a load balancer's source ranges and its endpoints
/// together is seen whole: a reader that a range let in (so it saw the
/// surface of batch c) must be sent to the endpoint of batch c. Publishing
/// the surface and the table with two stores lets a reader see the new
/// endpoint through the old ranges (or the other way round).
#[test]
fn source_ranges_and_endpoints_of_one_batch_are_seen_together() {
    for dp in dataplanes() {
        let m = dp.mode();
        let mut table = ServiceTable::new();
        let mut first = Vec::new();
        for i in 0..200u32 {
            let name = format!("other-{i}");
            let vip = format!("10.97.{}.{}", i >> 8, i & 255);
            let ep = format!("10.2.{}.{}", i >> 8, i & 255);
            first.push(Change::UpsertService(service(&name, &vip, 80)));
            first.push(Change::UpsertSlice(slice(
                &format!("{name}-1"),
                &name,
                &[ep.as_str()],
                8080,
            )));
        }
        first.extend(edge_batch(0));
        let cs = table.apply_batch(first).unwrap();
        dp.sync(&table, &cs, Instant::ZERO);
        let cluster = flow("10.3.0.1:40000", "10.96.5.1:80");
        let from = |c: u32| flow(&format!("{}:40000", client(c)), "10.200.0.10:80");
        let done = AtomicBool::new(false);
        let dp = &*dp;
        let checked = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut checked = 0u64;
                // Bounded: the writer's batches end the loop, and so does
                // the count.
                for _ in 0..20_000_000u64 {
                    if done.load(Ordering::Acquire) {
                        break;
                    }
                    // The table's step, through the cluster IP (no ranges).
                    let b = dp.route(&cluster, Instant::ZERO).backend();
                    let j = step(b.expect("the cluster IP forwards"));
                    for c in [j.saturating_sub(1), j, j + 1] {
                        match dp.route(&from(c), Instant::ZERO) {
                            Verdict::Drop => {}
                            v => {
                                let x = step(v.backend().expect("forward or drop"));
                                assert_eq!(
                                    x, c,
                                    "{m}: client {c} was let in but sent to the endpoint of \
                                     step {x}: half a batch"
                                );
                                checked += 1;
                            }
                        }
                    }
                }
                checked
            });
            for k in 1..=EDGE_BATCHES {
                let cs = table.apply_batch(edge_batch(k)).unwrap();
                dp.sync(&table, &cs, Instant::ZERO);
            }
            done.store(true, Ordering::Release);
            reader.join().unwrap()
        });
        assert!(checked > 0, "{m}: the reader was let in at least once");
        let last = dp
            .route(&from(EDGE_BATCHES), Instant::ZERO)
            .backend()
            .unwrap();
        assert_eq!(step(last), EDGE_BATCHES, "{m}");
        assert_eq!(
            dp.route(&from(EDGE_BATCHES - 1), Instant::ZERO),
            Verdict::Drop,
            "{m}"
        );
    }
}
