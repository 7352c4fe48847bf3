//! `Dataplane::route_excluding`: a retry after a failed connect never gets
//! an excluded backend, in every mode and under every IPVS scheduler; the
//! failed attempt leaves no tracked connection and no connection count on
//! the failed backend; a ClientIP pin moves to the new backend; a pod's
//! flow short-circuited to the Cluster-policy endpoints (external Local
//! policy) is retried among them; the per-thread readers do the same.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::flow;
use svclb::*;

const VIP: &str = "10.96.0.10:80";
const IPS: [&str; 4] = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"];

fn table(affinity: bool) -> ServiceTable {
    let mut svc = Service::builder("default", "web")
        .cluster_ip("10.96.0.10".parse().unwrap())
        .port(ServicePortSpec::tcp(80).target_port(8080));
    if affinity {
        svc = svc.client_ip_affinity(Some(600));
    }
    let slice = EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080))
        .endpoints(IPS.iter().map(|ip| EndpointSpec::new(*ip)))
        .build()
        .unwrap();
    let mut t = ServiceTable::new();
    t.apply_batch([
        Change::UpsertService(svc.build().unwrap()),
        Change::UpsertSlice(slice),
    ])
    .unwrap();
    t
}

/// Every mode, and IPVS under each scheduler.
fn dataplanes(t: &ServiceTable) -> Vec<(String, Box<dyn Dataplane>)> {
    let mut out: Vec<(String, Box<dyn Dataplane>)> = vec![
        (
            "iptables".into(),
            Box::new(IptablesDataplane::new(DataplaneConfig::with_seed(7))),
        ),
        (
            "nftables".into(),
            Box::new(NftablesDataplane::new(DataplaneConfig::with_seed(7))),
        ),
    ];
    for s in [
        "rr", "wrr", "lc", "wlc", "sh", "sh-port", "mh", "mh-port", "random",
    ] {
        let kind: SchedulerKind = s.parse().unwrap();
        let mut config = DataplaneConfig::with_seed(7).scheduler(kind);
        config.count_connections = true;
        out.push((format!("ipvs/{s}"), Box::new(IpvsDataplane::new(config))));
    }
    for (_, dp) in &out {
        dp.sync(t, &t.full_change_set(), Instant::ZERO);
    }
    out
}

fn forward(v: Verdict, what: &str) -> Forward {
    match v {
        Verdict::Forward(f) => f,
        other => panic!("{what}: {other:?}"),
    }
}

fn client(i: u16) -> Flow {
    flow(
        &format!("10.1.{}.{}:{}", i / 200, i % 200 + 1, 30_000 + i),
        VIP,
    )
}

#[test]
fn a_retry_never_gets_an_excluded_backend_in_any_mode() {
    let t = table(false);
    let now = Instant::from_secs(1);
    for (name, dp) in dataplanes(&t) {
        let mut seen = BTreeSet::new();
        for i in 0..200 {
            let f = client(i);
            let first = forward(dp.route(&f, now), &name);
            let retry = forward(dp.route_excluding(&f, &[first.backend_id], now), &name);
            assert_ne!(retry.backend, first.backend, "{name}: flow {i}");
            assert!(!retry.tracked, "{name}: a retry is a new connection");
            seen.insert(retry.backend);
            // Two excluded: still another one.
            let third = forward(
                dp.route_excluding(&f, &[first.backend_id, retry.backend_id], now),
                &name,
            );
            assert!(
                third.backend != first.backend && third.backend != retry.backend,
                "{name}: flow {i}"
            );
            // The flow is tracked once, on its last backend.
            let tracked = dp.connections(now);
            let mine: Vec<_> = tracked.iter().filter(|c| c.flow == f).collect();
            assert_eq!(mine.len(), 1, "{name}");
            assert_eq!(mine[0].backend_addr, third.backend, "{name}");
            let next = forward(dp.packet(&f, TcpFlags::ACK, now), &name);
            assert!(next.tracked && next.backend == third.backend, "{name}");
            dp.connection_closed(&f, now);
        }
        // (lc and wlc: every flow closed, so the same least loaded pair.)
        if !name.ends_with("lc") {
            assert!(seen.len() >= 2, "{name}: retries spread: {seen:?}");
        }
        assert!(dp.connections(now).is_empty(), "{name}");
    }
}

#[test]
fn every_backend_excluded_rejects_and_leaves_nothing_tracked() {
    let t = table(false);
    let now = Instant::from_secs(1);
    for (name, dp) in dataplanes(&t) {
        let f = client(1);
        let mut ids = Vec::new();
        for _ in 0..IPS.len() {
            let v = if ids.is_empty() {
                dp.route(&f, now)
            } else {
                dp.route_excluding(&f, &ids, now)
            };
            ids.push(forward(v, &name).backend_id);
        }
        let distinct: BTreeSet<_> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            IPS.len(),
            "{name}: each retry a new backend"
        );
        assert_eq!(dp.route_excluding(&f, &ids, now), Verdict::Reject, "{name}");
        assert!(dp.connections(now).is_empty(), "{name}");
    }
}

/// The failed attempt's count goes: under lc a backend that refused
/// connections is not left looking busy, and IPVS lists no connection on
/// it.
#[test]
fn the_failed_attempt_leaves_no_connection_count() {
    let t = table(false);
    let mut config = DataplaneConfig::with_seed(3).scheduler(SchedulerKind::LeastConnection);
    config.count_connections = true;
    let dp = IpvsDataplane::new(config);
    dp.sync(&t, &t.full_change_set(), Instant::ZERO);
    let now = Instant::from_secs(1);
    let f = client(9);
    let first = forward(dp.route(&f, now), "lc");
    let retry = forward(dp.route_excluding(&f, &[first.backend_id], now), "lc");
    dp.packet(&f, TcpFlags::ACK, now);
    let vs = dp.virtual_services();
    let count = |addr: SocketAddr| {
        let d = vs[0].destinations.iter().find(|d| d.addr == addr).unwrap();
        (d.active_conns, d.inactive_conns)
    };
    assert_eq!(count(first.backend), (0, 0), "the failed backend");
    assert_eq!(count(retry.backend), (1, 0), "the backend that took it");
    // lc: the next new connection goes to an idle backend, the failed one
    // first (the earliest of the least loaded).
    let g = forward(dp.route(&client(10), now), "lc");
    assert_eq!(g.backend, first.backend);
}

/// ClientIP affinity: the pin moves to the backend the retry chose, so
/// the client's next connections go there, in every mode.
#[test]
fn a_client_ip_pin_moves_to_the_retry_backend() {
    let t = table(true);
    let now = Instant::from_secs(1);
    for (name, dp) in dataplanes(&t) {
        let f = flow("10.1.0.7:40000", VIP);
        let first = forward(dp.route(&f, now), &name);
        // Pinned: another connection of the client goes to the same one.
        let again = flow("10.1.0.7:40001", VIP);
        assert_eq!(
            forward(dp.route(&again, now), &name).backend,
            first.backend,
            "{name}"
        );
        dp.connection_closed(&again, now);
        let retry = forward(dp.route_excluding(&f, &[first.backend_id], now), &name);
        assert_ne!(retry.backend, first.backend, "{name}");
        for port in 40_002..40_010 {
            let g = flow(&format!("10.1.0.7:{port}"), VIP);
            assert_eq!(
                forward(dp.route(&g, now), &name).backend,
                retry.backend,
                "{name}: the client is pinned to the new backend"
            );
        }
        let entries = dp.affinity_entries(&ServiceKey::new("default", "web"), now);
        assert_eq!(entries.len(), 1, "{name}: {entries:?}");
    }
}

/// The per-thread readers retry the same way.
#[test]
fn readers_retry_without_the_excluded_backend() {
    let t = table(false);
    let all = t.full_change_set();
    let now = Instant::from_secs(1);
    let ipt = IptablesDataplane::new(DataplaneConfig::with_seed(5));
    let ipvs =
        IpvsDataplane::new(DataplaneConfig::with_seed(5).scheduler(SchedulerKind::SourceHash));
    let nft = NftablesDataplane::new(DataplaneConfig::with_seed(5));
    ipt.sync(&t, &all, Instant::ZERO);
    ipvs.sync(&t, &all, Instant::ZERO);
    nft.sync(&t, &all, Instant::ZERO);
    let mut r1 = ipt.reader();
    let mut r2 = ipvs.reader();
    let mut r3 = nft.reader();
    for i in 0..50 {
        let f = client(i);
        let a = forward(r1.route(&f, now), "iptables");
        let b = forward(
            r1.route_excluding_with_key(&f, None, &[a.backend_id], now),
            "iptables",
        );
        assert_ne!(a.backend, b.backend);
        let a = forward(r2.route(&f, now), "ipvs/sh");
        let b = forward(
            r2.route_excluding_with_key(&f, None, &[a.backend_id], now),
            "ipvs/sh",
        );
        assert_ne!(a.backend, b.backend);
        // sh's fallback is stable: the same flow retries to the same one.
        let c = forward(
            r2.route_excluding_with_key(&f, None, &[a.backend_id], now),
            "ipvs/sh",
        );
        assert_eq!(b.backend, c.backend);
        let a = forward(r3.route(&f, now), "nftables");
        let b = forward(
            r3.route_excluding_with_key(&f, None, &[a.backend_id], now),
            "nftables",
        );
        assert_ne!(a.backend, b.backend);
    }
    assert_eq!(ipt.connections(now).len(), 50);
    assert_eq!(ipvs.connections(now).len(), 50);
    assert_eq!(nft.connections(now).len(), 50);
}

/// kube-proxy's short-circuit of pod traffic to an external destination of
/// an `externalTrafficPolicy: Local` service (internal policy Local too,
/// so the pick is among the Cluster-policy endpoints themselves): the retry
/// honours the exclusion there as well, in every mode.
#[test]
fn a_short_circuited_pod_flow_retries_without_the_failed_backend() {
    let edge = Service::builder("default", "edge")
        .cluster_ip("10.96.1.4".parse().unwrap())
        .service_type(ServiceType::NodePort)
        .external_traffic_policy(TrafficPolicy::Local)
        .internal_traffic_policy(TrafficPolicy::Local)
        .port(ServicePortSpec::tcp(80).target_port(8080).node_port(30080))
        .build()
        .unwrap();
    let slice = EndpointSlice::builder("default", "edge-1", "edge", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080))
        .endpoint(EndpointSpec::new("10.1.201.1").node("this-node"))
        .endpoint(EndpointSpec::new("10.1.201.2").node("elsewhere"))
        .endpoint(EndpointSpec::new("10.1.201.3").node("elsewhere"))
        .build()
        .unwrap();
    let mut t = ServiceTable::new();
    t.apply_batch([Change::UpsertService(edge), Change::UpsertSlice(slice)])
        .unwrap();
    let config = DataplaneConfig::with_seed(1)
        .node(NodeTopology::new("this-node", "zone-a"))
        .node_ip("192.168.0.2".parse().unwrap())
        .cluster_cidr("10.0.0.0/8".parse().unwrap());
    // kube-proxy's IPVS mode has no short-circuit (its node-port virtual
    // server lists the local endpoint for every source:
    // tests/ipvs_surface.rs), so only the rule-based modes retry here.
    let dps: Vec<Box<dyn Dataplane>> = vec![
        Box::new(IptablesDataplane::new(config.clone())),
        Box::new(NftablesDataplane::new(config)),
    ];
    let now = Instant::from_secs(1);
    for dp in &dps {
        dp.sync(&t, &t.full_change_set(), Instant::ZERO);
        let mut seen = BTreeSet::new();
        for i in 0..30u16 {
            // A pod reaching the node port: short-circuited to all three.
            let f = flow(
                &format!("10.2.0.{}:{}", i + 1, 40_000 + i),
                "192.168.0.2:30080",
            );
            let first = forward(dp.route(&f, now), "pod");
            let retry = forward(dp.route_excluding(&f, &[first.backend_id], now), "retry");
            assert_ne!(retry.backend, first.backend, "{}", dp.mode());
            seen.insert(first.backend);
            seen.insert(retry.backend);
            let all: Vec<BackendId> = {
                let third = forward(
                    dp.route_excluding(&f, &[first.backend_id, retry.backend_id], now),
                    "third",
                );
                vec![first.backend_id, retry.backend_id, third.backend_id]
            };
            assert_eq!(
                dp.route_excluding(&f, &all, now),
                Verdict::Reject,
                "{}",
                dp.mode()
            );
        }
        assert_eq!(seen.len(), 3, "{}: the remote endpoints too", dp.mode());
    }
}
