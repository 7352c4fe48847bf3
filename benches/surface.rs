//! What the external destinations cost on the packet path: `route()` of a
//! new connection in IPVS mode (tracking off, so every call schedules) at
//! 1,000 services, to a cluster IP of a table without external frontends,
//! to a cluster IP of the same table plus one `externalTrafficPolicy:
//! Local` LoadBalancer service (whose source-dependent rules are then
//! consulted), to that service's node port from outside (local endpoints),
//! from a pod (`node_port_pod_short_circuit`: the IPVS mode has no
//! short-circuit, so the pod reaches the node port's virtual server as an
//! outside client does; the iptables and nftables modes short-circuit it),
//! and to its LB IP from a
//! source outside `loadBalancerSourceRanges` (dropped). Read as ratios
//! within one run.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use common::cpu_time::ThreadCpu;
use criterion::{Criterion, criterion_group, criterion_main};
use svclb::*;

const FLOWS: usize = 4096;

fn ipvs(table: &ServiceTable) -> IpvsDataplane {
    let dp = IpvsDataplane::new(
        DataplaneConfig::with_seed(1)
            .conntrack(None)
            .scheduler(SchedulerKind::RoundRobin)
            .node(NodeTopology::new("this-node", "zone-a"))
            .node_ip("192.168.0.2".parse().unwrap())
            .cluster_cidr("10.0.0.0/8".parse().unwrap()),
    );
    dp.sync(table, &table.full_change_set(), Instant::ZERO);
    dp
}

fn flows_to(src_base: [u8; 2], dst: SocketAddr) -> Vec<Flow> {
    (0..FLOWS)
        .map(|k| {
            let src = SocketAddr::from((
                [src_base[0], src_base[1], (k >> 8) as u8, k as u8],
                40_000 + k as u16,
            ));
            Flow::tcp(src, dst)
        })
        .collect()
}

fn bench_surface(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("surface");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let plain = common::cluster(1_000, 5);
    let mut with_lb = common::cluster(1_000, 5);
    let edge = Service::builder("default", "edge")
        .cluster_ip("10.96.200.1".parse().unwrap())
        .service_type(ServiceType::LoadBalancer)
        .external_traffic_policy(TrafficPolicy::Local)
        .load_balancer_ingress("1.2.3.4".parse().unwrap(), IpMode::VIP)
        .load_balancer_source_range("203.0.113.0/25".parse().unwrap())
        .port(ServicePortSpec::tcp(80).target_port(8080).node_port(30080))
        .build()
        .unwrap();
    let slice = EndpointSlice::builder("default", "edge-1", "edge", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080))
        .endpoint(EndpointSpec::new("10.1.201.1").node("this-node"))
        .endpoint(EndpointSpec::new("10.1.201.2").node("elsewhere"))
        .build()
        .unwrap();
    with_lb
        .apply_batch([Change::UpsertService(edge), Change::UpsertSlice(slice)])
        .unwrap();
    let plain_dp = ipvs(&plain);
    let lb_dp = ipvs(&with_lb);
    let cluster_flows = common::flow_mix(1_000, FLOWS, 0xC0FFEE);
    let cases: [(&str, &IpvsDataplane, Vec<Flow>); 5] = [
        ("cluster_ip_no_externals", &plain_dp, cluster_flows.clone()),
        ("cluster_ip", &lb_dp, cluster_flows),
        (
            "node_port_external_local",
            &lb_dp,
            flows_to([198, 51], "192.168.0.2:30080".parse().unwrap()),
        ),
        (
            "node_port_pod_short_circuit",
            &lb_dp,
            flows_to([10, 2], "192.168.0.2:30080".parse().unwrap()),
        ),
        (
            "lb_ip_source_range_drop",
            &lb_dp,
            flows_to([203, 0], "1.2.3.4:80".parse().unwrap())
                .into_iter()
                .map(|f| {
                    Flow::tcp(
                        SocketAddr::new([203, 0, 113, 200].into(), f.src.port()),
                        f.dst,
                    )
                })
                .collect(),
        ),
    ];
    let now = Instant::ZERO;
    for (name, dp, flows) in &cases {
        group.bench_function(*name, |b| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) & (FLOWS - 1);
                black_box(dp.route(black_box(&flows[k]), now))
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Thread CPU time, not wall-clock time: see benches/common/cpu_time.rs.
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = bench_surface
}
criterion_main!(benches);
