//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

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
    ipt.sync(table, &all);
    ipvs.sync(table, &all);
    (ipt, ipvs)
}
