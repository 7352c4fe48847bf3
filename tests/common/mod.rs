//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

#[cfg(target_os = "linux")]
pub mod netns;

use svclb::*;

pub fn service(name: &str, vip: &str, port: i64) -> Service {
    Service::builder("default", name)
        .cluster_ip(vip.parse().unwrap())
        .port(
            ServicePortSpec::tcp(port)
                .name("http")
                .target_port_name("web"),
        )
        .build()
        .unwrap()
}

pub fn slice(name: &str, svc: &str, ips: &[&str], port: i64) -> EndpointSlice {
    EndpointSlice::builder("default", name, svc, AddressType::IPv4)
        .port(SlicePortSpec::tcp(port).name("http"))
        .endpoints(ips.iter().map(|ip| EndpointSpec::new(*ip)))
        .build()
        .unwrap()
}

/// A `Local` service named `local` whose one endpoint, `ip`, runs on
/// another node than the dataplane's: its traffic is dropped.
pub fn local_elsewhere(vip: &str, ip: &str, node: &str) -> [Change; 2] {
    let svc = Service::builder("default", "local")
        .cluster_ip(vip.parse().unwrap())
        .port(ServicePortSpec::tcp(80))
        .internal_traffic_policy(TrafficPolicy::Local)
        .build()
        .unwrap();
    let slice = EndpointSlice::builder("default", "local-1", "local", AddressType::IPv4)
        .port(SlicePortSpec::tcp(80))
        .endpoint(EndpointSpec::new(ip).node(node))
        .build()
        .unwrap();
    [Change::UpsertService(svc), Change::UpsertSlice(slice)]
}

pub fn flow(src: &str, dst: &str) -> Flow {
    Flow::tcp(src.parse().unwrap(), dst.parse().unwrap())
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Both dataplanes, synced with the whole table.
pub fn both(table: &ServiceTable, config: DataplaneConfig) -> (IptablesDataplane, IpvsDataplane) {
    let ipt = IptablesDataplane::new(config.clone());
    let ipvs = IpvsDataplane::new(config);
    let all = table.full_change_set();
    ipt.sync(table, &all, Instant::ZERO);
    ipvs.sync(table, &all, Instant::ZERO);
    (ipt, ipvs)
}
