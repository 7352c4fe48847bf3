//! The packet path per packet: `parse` alone, `parse` + `rewrite_dst`, for
//! IPv4/TCP and IPv6/UDP; and, against IPVS routing alone on the same flow,
//! `parse` + routing + `rewrite_dst`: on a tracked flow (the reader's
//! `packet`, an established connection; issue 14: ≤ 2× routing alone),
//! IPv4/TCP and IPv6/UDP, and on a new flow (`route` with connection
//! tracking off, so every call schedules), IPv4/TCP and IPv6/UDP.
//! Thread CPU time, small samples: the whole file runs in about a minute.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use common::cpu_time::ThreadCpu;
use criterion::{Criterion, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use svclb::packet::{LinkType, parse, rewrite_dst};
use svclb::*;

fn ipv4_tcp() -> Vec<u8> {
    let mut out = Vec::new();
    // Service 0 of the synthetic cluster: 10.96.0.1:80.
    PacketBuilder::ipv4([10, 2, 0, 9], [10, 96, 0, 1], 64)
        .tcp(40000, 80, 1, 65535)
        .ack(1)
        .write(&mut out, &[0x5a; 64])
        .unwrap();
    out
}

fn ipv6_udp() -> Vec<u8> {
    let mut src = [0u8; 16];
    src[0] = 0xfd;
    src[15] = 9;
    let mut dst = src;
    dst[15] = 10;
    let mut out = Vec::new();
    PacketBuilder::ipv6(src, dst, 64)
        .udp(40000, 53)
        .write(&mut out, &[0x5a; 64])
        .unwrap();
    out
}

fn bench_packet(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("packet");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(2));

    let cases: [(&str, Vec<u8>, SocketAddr); 2] = [
        ("ipv4_tcp", ipv4_tcp(), "10.128.0.1:8080".parse().unwrap()),
        ("ipv6_udp", ipv6_udp(), "[fd00::77]:5353".parse().unwrap()),
    ];
    for (name, pkt, backend) in cases {
        group.bench_function(format!("{name}/parse"), |b| {
            b.iter(|| black_box(parse(black_box(&pkt), LinkType::Ip)))
        });
        let mut buf = pkt.clone();
        group.bench_function(format!("{name}/parse_rewrite_dst"), |b| {
            b.iter(|| {
                let p = parse(black_box(&buf), LinkType::Ip).unwrap();
                rewrite_dst(black_box(&mut buf), &p, backend).unwrap();
            })
        });
    }

    // The whole per-packet path against route alone, on one tracked flow
    // (an established connection: the tracker answers).
    let mut table = common::cluster(100, 5);
    // The IPv6/UDP packet's service: fd00::a:53 -> [fd00::77]:5353.
    table
        .apply_batch(vec![
            Change::UpsertService(
                Service::builder("bench", "dns6")
                    .cluster_ip("fd00::a".parse().unwrap())
                    .port(ServicePortSpec::udp(53).target_port(5353))
                    .build()
                    .unwrap(),
            ),
            Change::UpsertSlice(
                EndpointSlice::builder("bench", "dns6-1", "dns6", AddressType::IPv6)
                    .port(SlicePortSpec::udp(5353))
                    .endpoints(["fd00::77", "fd00::78"].map(EndpointSpec::new))
                    .build()
                    .unwrap(),
            ),
        ])
        .unwrap();
    let ipvs = IpvsDataplane::new(DataplaneConfig::with_seed(1));
    ipvs.sync(&table, &table.full_change_set(), Instant::ZERO);
    let now = Instant::ZERO;
    let mut reader = ipvs.reader();
    for (name, pkt) in [("ipv4_tcp", ipv4_tcp()), ("ipv6_udp", ipv6_udp())] {
        let flow = parse(&pkt, LinkType::Ip).unwrap().flow().unwrap();
        assert!(matches!(ipvs.route(&flow, now), Verdict::Forward(_)));
        assert!(reader.packet(&flow, TcpFlags::ACK, now).is_tracked());
        group.bench_function(format!("{name}/route"), |b| {
            b.iter(|| black_box(reader.packet(black_box(&flow), TcpFlags::ACK, now)))
        });
        let mut buf = pkt.clone();
        group.bench_function(format!("{name}/parse_route_rewrite"), |b| {
            b.iter(|| {
                let p = parse(black_box(&buf), LinkType::Ip).unwrap();
                // After the first rewrite the buffer holds the backend:
                // route the flow as it arrived, as a fresh packet would be.
                let f = black_box(p.flow().map(|_| flow).unwrap());
                if let Verdict::Forward(svclb::Forward { backend: to, .. }) =
                    reader.packet(&f, TcpFlags::ACK, now)
                {
                    rewrite_dst(&mut buf, &p, to).unwrap();
                }
            })
        });
    }

    // A new flow each time: IPVS with connection tracking off, so every
    // `route` schedules (rr), as the lookup benches measure it.
    let (_, fresh) = common::dataplanes(&table);
    for (name, pkt) in [("ipv4_tcp", ipv4_tcp()), ("ipv6_udp", ipv6_udp())] {
        let flow = parse(&pkt, LinkType::Ip).unwrap().flow().unwrap();
        assert!(matches!(fresh.route(&flow, now), Verdict::Forward(f) if !f.tracked));
        group.bench_function(format!("{name}/new/route"), |b| {
            b.iter(|| black_box(fresh.route(black_box(&flow), now)))
        });
        let mut buf = pkt.clone();
        group.bench_function(format!("{name}/new/parse_route_rewrite"), |b| {
            b.iter(|| {
                let p = parse(black_box(&buf), LinkType::Ip).unwrap();
                let f = black_box(p.flow().map(|_| flow).unwrap());
                if let Verdict::Forward(svclb::Forward { backend: to, .. }) = fresh.route(&f, now) {
                    rewrite_dst(&mut buf, &p, to).unwrap();
                }
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Thread CPU time, not wall-clock time: see benches/common/cpu_time.rs.
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = bench_packet
}
criterion_main!(benches);
