//! The packet path allocates nothing: `route` in every mode (iptables,
//! nftables, and IPVS with every built-in scheduler), an affinity hit, `connection_closed`, and the IPVS
//! per-thread reader, measured with a counting global allocator. The flows
//! include node-port and load-balancer flows of an `externalTrafficPolicy:
//! Local` service: a local endpoint, a pod short-circuited to the Cluster
//! endpoints, a source range letting one client in and dropping another.
//!
//! One test function only: the allocator counts every thread, so no other
//! test may run while a region is measured.

mod common;

use std::alloc::System;
use std::net::SocketAddr;

use common::*;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use svclb::*;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// 50 services with 5 endpoints, one with `ClientIP` affinity, one without
/// endpoints (reject) and one Local service whose only endpoint is elsewhere
/// (drop).
fn table() -> ServiceTable {
    let mut t = ServiceTable::new();
    let mut changes = Vec::new();
    for i in 0..50 {
        let ips: Vec<String> = (0..5).map(|j| format!("10.1.{i}.{}", j + 1)).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        changes.push(Change::UpsertService(service(
            &format!("s{i}"),
            &format!("10.96.0.{}", i + 1),
            80,
        )));
        changes.push(Change::UpsertSlice(slice(
            &format!("s{i}-1"),
            &format!("s{i}"),
            &ips,
            8080,
        )));
    }
    changes.push(Change::UpsertService(service("empty", "10.96.1.1", 80)));
    changes.extend(local_elsewhere("10.96.1.2", "10.1.200.1", "elsewhere"));
    let sticky = Service::builder("default", "sticky")
        .cluster_ip("10.96.1.3".parse().unwrap())
        .port(ServicePortSpec::tcp(80).name("http").target_port(8080))
        .client_ip_affinity(Some(600))
        .build()
        .unwrap();
    changes.extend([
        Change::UpsertService(sticky),
        Change::UpsertSlice(slice(
            "sticky-1",
            "sticky",
            &["10.1.100.1", "10.1.100.2", "10.1.100.3"],
            8080,
        )),
    ]);
    let edge = Service::builder("default", "edge")
        .cluster_ip("10.96.1.4".parse().unwrap())
        .service_type(ServiceType::LoadBalancer)
        .external_traffic_policy(TrafficPolicy::Local)
        .internal_traffic_policy(TrafficPolicy::Local)
        .load_balancer_ingress("1.2.3.4".parse().unwrap(), IpMode::VIP)
        .load_balancer_source_range("203.0.113.0/25".parse().unwrap())
        .port(ServicePortSpec::tcp(80).target_port(8080).node_port(30080))
        .build()
        .unwrap();
    changes.extend([
        Change::UpsertService(edge),
        Change::UpsertSlice(
            EndpointSlice::builder("default", "edge-1", "edge", AddressType::IPv4)
                .port(SlicePortSpec::tcp(8080))
                .endpoint(EndpointSpec::new("10.1.201.1").node("this-node"))
                .endpoint(EndpointSpec::new("10.1.201.2").node("elsewhere"))
                .build()
                .unwrap(),
        ),
    ]);
    t.apply_batch(changes).unwrap();
    t
}

/// A dataplane config on this node, its address 192.168.0.2, pods in
/// 10.0.0.0/8.
fn config() -> DataplaneConfig {
    DataplaneConfig::with_seed(1)
        .conntrack(None)
        .node(NodeTopology::new("this-node", "zone-a"))
        .node_ip("192.168.0.2".parse().unwrap())
        .cluster_cidr("10.0.0.0/8".parse().unwrap())
}

fn flows() -> Vec<Flow> {
    let mut out: Vec<Flow> = (0..2000u32)
        .map(|k| {
            let src = SocketAddr::from(([10, 2, (k >> 8) as u8, k as u8], 30_000 + k as u16));
            let dst = SocketAddr::from(([10, 96, 0, (k % 50) as u8 + 1], 80));
            Flow::tcp(src, dst)
        })
        .collect();
    // Affinity: 200 clients, each already pinned by the warm-up pass, so
    // every measured route is a hit.
    out.extend((0..200u32).map(|k| {
        let src = SocketAddr::from(([10, 3, (k >> 8) as u8, k as u8], 50_000));
        Flow::tcp(src, sa("10.96.1.3:80"))
    }));
    out.push(flow("10.2.0.1:1000", "10.96.1.1:80")); // reject
    out.push(flow("10.2.0.1:1000", "10.96.1.2:80")); // drop
    out.push(flow("10.2.0.1:1000", "10.96.9.9:80")); // not a service
    out.push(flow("203.0.113.2:1000", "192.168.0.2:30080")); // local endpoint
    out.push(flow("10.2.0.1:1000", "192.168.0.2:30080")); // pod: short-circuit
    out.push(flow("203.0.113.2:1001", "1.2.3.4:80")); // in the source range
    out.push(flow("203.0.113.200:1000", "1.2.3.4:80")); // outside: drop
    out
}

/// Routes every flow (and closes each forwarded connection) inside a
/// counted region; returns the allocations seen and the verdict counts.
fn route_all(dp: &dyn Dataplane, flows: &[Flow]) -> (usize, [usize; 4]) {
    // Warm up: the first load on a thread registers it with arc-swap, and
    // the affinity clients get their entries (a miss may allocate).
    for f in flows {
        dp.route(f, Instant::ZERO);
    }
    let mut kinds = [0usize; 4];
    let region = Region::new(GLOBAL);
    for (k, f) in flows.iter().enumerate() {
        let now = Instant::from_millis(k as u64);
        let v = dp.route(f, now);
        match v {
            Verdict::Forward(_) => {
                kinds[0] += 1;
                dp.connection_closed(f, now);
            }
            Verdict::Reject => kinds[1] += 1,
            Verdict::Drop => kinds[2] += 1,
            _ => kinds[3] += 1,
        }
    }
    let change = region.change();
    (
        change.allocations + change.reallocations + change.deallocations,
        kinds,
    )
}

fn packet_path_allocates_nothing() {
    // The counter works: an allocation inside a region is seen.
    let region = Region::new(GLOBAL);
    let v: Vec<u64> = std::hint::black_box(Vec::with_capacity(16));
    assert!(region.change().allocations >= 1);
    drop(v);

    let t = table();
    let flows = flows();
    let mut dataplanes: Vec<(String, Box<dyn Dataplane>)> = vec![
        (
            "iptables".into(),
            Box::new(IptablesDataplane::new(config())),
        ),
        (
            "nftables".into(),
            Box::new(NftablesDataplane::new(config())),
        ),
    ];
    for kind in SchedulerKind::ALL.iter().copied() {
        let mut config = config().scheduler(kind);
        config.count_connections = true;
        dataplanes.push((format!("ipvs/{kind}"), Box::new(IpvsDataplane::new(config))));
    }
    let all = t.full_change_set();
    // The per-thread IPVS reader, warm, then counted.
    let rr = IpvsDataplane::new(config());
    rr.sync(&t, &all, Instant::ZERO);
    let mut reader = rr.reader();
    for f in &flows {
        reader.route(f, Instant::ZERO);
    }
    let region = Region::new(GLOBAL);
    let forwarded = flows
        .iter()
        .filter(|f| matches!(reader.route(f, Instant::from_secs(1)), Verdict::Forward(_)))
        .count();
    let c = region.change();
    assert_eq!(forwarded, 2203, "ipvs reader: verdicts");
    assert_eq!(
        c.allocations + c.reallocations + c.deallocations,
        0,
        "ipvs reader: the packet path allocated"
    );

    let sticky = ServiceKey::new("default", "sticky");
    for (name, dp) in &dataplanes {
        dp.sync(&t, &all, Instant::ZERO);
        let (allocs, kinds) = route_all(dp.as_ref(), &flows);
        // The affinity routes were hits: 200 live entries, one per client.
        assert_eq!(
            dp.affinity_entries(&sticky, Instant::from_secs(1)).len(),
            200,
            "{name}: affinity entries"
        );
        // And they were hits, as the table counts them: the warm-up pass
        // missed 200 times, the measured pass hit 200 times.
        let report = dp
            .affinity_report(&sticky, Instant::from_secs(1))
            .expect("sticky has ClientIP affinity");
        let hits: u64 = report.ports.iter().map(|p| p.affinity_hits).sum();
        let new: u64 = report.ports.iter().map(|p| p.new_connections).sum();
        assert_eq!(
            (hits, new),
            (200, 400),
            "{name}: affinity hits, new connections"
        );
        assert_eq!(kinds, [2203, 1, 2, 1], "{name}: verdicts");
        assert_eq!(allocs, 0, "{name}: the packet path allocated");
    }
}

/// Run without libtest's harness (`harness = false`): the counting
/// allocator counts every thread, and the harness's own threads allocate
/// at moments of their own (the main thread's first wait on the result
/// channel), which landed inside a measured region under load.
fn main() {
    packet_path_allocates_nothing();
    println!("test packet_path_allocates_nothing ... ok");
}
