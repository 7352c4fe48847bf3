//! Synthetic clusters shared by the benches and `examples/scale.rs`.
//!
//! Service `i` is `default/svc-i` with cluster IP `10.96.0.0 + i + 1`, port
//! 80/TCP (named `http`, target port 8080), and `eps` endpoints in slices of
//! at most `per_slice`. Endpoint addresses are unique across the cluster.
#![allow(dead_code, unreachable_pub)]

pub mod cpu_time;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ahash::AHashMap;

use svclb::*;

/// The cluster IP of service `i`.
pub fn vip(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0A60_0001 + i as u32)), 80)
}

/// Service `i`.
pub fn service(i: usize) -> Service {
    Service::builder("default", format!("svc-{i}"))
        .cluster_ip(vip(i).ip())
        .port(ServicePortSpec::tcp(80).name("http").target_port(8080))
        .build()
        .expect("a valid synthetic service")
}

/// The IP of endpoint number `global` (unique across the cluster).
pub fn endpoint_ip(global: usize) -> String {
    Ipv4Addr::from(0x0A80_0000 + global as u32).to_string()
}

/// Slice `s` of service `i`, holding the given endpoint addresses.
pub fn slice_with(i: usize, s: usize, ips: &[String]) -> EndpointSlice {
    EndpointSlice::builder(
        "default",
        format!("svc-{i}-{s}"),
        format!("svc-{i}"),
        AddressType::IPv4,
    )
    .port(SlicePortSpec::tcp(8080).name("http"))
    .endpoints(ips.iter().map(|ip| EndpointSpec::new(ip.as_str())))
    .build()
    .expect("a valid synthetic slice")
}

/// The endpoint IPs of slice `s` of service `i`, when every service has
/// `eps` endpoints in slices of `per_slice`; `first` is service `i`'s first
/// global endpoint number.
pub fn slice_ips(first: usize, s: usize, eps: usize, per_slice: usize) -> Vec<String> {
    let lo = s * per_slice;
    let hi = (lo + per_slice).min(eps);
    (lo..hi).map(|j| endpoint_ip(first + j)).collect()
}

/// The changes that create service `i` with `eps` endpoints in slices of
/// `per_slice`, its endpoints numbered from `first`.
pub fn service_changes(i: usize, first: usize, eps: usize, per_slice: usize) -> Vec<Change> {
    let mut out = vec![Change::UpsertService(service(i))];
    for s in 0..eps.div_ceil(per_slice) {
        out.push(Change::UpsertSlice(slice_with(
            i,
            s,
            &slice_ips(first, s, eps, per_slice),
        )));
    }
    out
}

/// Every change of a cluster of `services` services with `eps` endpoints
/// each (one slice of up to 100 per service).
pub fn cluster_changes(services: usize, eps: usize) -> Vec<Change> {
    (0..services)
        .flat_map(|i| service_changes(i, i * eps, eps, 100))
        .collect()
}

/// A table of `services` services with `eps` endpoints each.
pub fn cluster(services: usize, eps: usize) -> ServiceTable {
    let mut t = ServiceTable::new();
    t.apply_batch(cluster_changes(services, eps))
        .expect("a valid synthetic cluster");
    t
}

/// Two versions of service `i`'s first slice that differ in one endpoint:
/// the original and one with its first endpoint replaced.
pub fn toggled_slice(i: usize, first: usize, eps: usize, per_slice: usize) -> [EndpointSlice; 2] {
    let ips = slice_ips(first, 0, eps, per_slice);
    let mut changed = ips.clone();
    changed[0] = Ipv4Addr::from(0x0AC8_0000 + i as u32).to_string();
    [slice_with(i, 0, &ips), slice_with(i, 0, &changed)]
}

/// `n` TCP flows to a pseudo-random mix of the first `services` services,
/// from distinct client sources (a fixed seed: every run the same mix).
pub fn flow_mix(services: usize, n: usize, seed: u64) -> Vec<Flow> {
    let rng = SeededRng::new(seed);
    (0..n)
        .map(|k| {
            let i = rng.below(services as u64) as usize;
            let src = SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(0x0A02_0000 + k as u32)),
                40_000 + (k % 20_000) as u16,
            );
            Flow::tcp(src, vip(i))
        })
        .collect()
}

/// Both dataplanes (rr for IPVS), synced with the whole table, with
/// connection tracking off: every `route` schedules a new connection, which
/// is what the lookup benches measure (the conntrack benches measure
/// tracked flows).
pub fn dataplanes(table: &ServiceTable) -> (IptablesDataplane, IpvsDataplane) {
    let ipt = IptablesDataplane::new(DataplaneConfig::with_seed(1).conntrack(None));
    let ipvs = IpvsDataplane::new(
        DataplaneConfig::with_seed(1)
            .conntrack(None)
            .scheduler(SchedulerKind::RoundRobin),
    );
    let all = table.full_change_set();
    ipt.sync(table, &all, Instant::ZERO);
    ipvs.sync(table, &all, Instant::ZERO);
    (ipt, ipvs)
}

/// The floor the lookup benches compare with: a bare ahash map from each
/// of `services` services' `(cluster IP, port, protocol)` to its first
/// endpoint, the least a lookup can do.
pub fn floor_map(services: usize) -> AHashMap<(IpAddr, u16, Protocol), SocketAddr> {
    (0..services)
        .map(|i| {
            let v = vip(i);
            let backend = SocketAddr::new(endpoint_ip(i * 5).parse().unwrap(), 8080);
            ((v.ip(), v.port(), Protocol::Tcp), backend)
        })
        .collect()
}
