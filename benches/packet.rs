//! The packet path per packet: `parse` alone, `parse` + `rewrite_dst`, for
//! IPv4/TCP and IPv6/UDP; and, against IPVS `route` alone on the same flow,
//! `parse` + `route` + `rewrite_dst` (issue 14: ≤ 2× route alone).
//! Thread CPU time, small samples: the whole file runs in about 30 s.

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
    let table = common::cluster(100, 5);
    let ipvs = IpvsDataplane::new(DataplaneConfig::with_seed(1));
    ipvs.sync(&table, &table.full_change_set(), Instant::ZERO);
    let pkt = ipv4_tcp();
    let flow = parse(&pkt, LinkType::Ip).unwrap().flow().unwrap();
    let now = Instant::ZERO;
    assert!(matches!(ipvs.route(&flow, now), Verdict::Forward(_)));
    let mut reader = ipvs.reader();
    assert!(reader.packet(&flow, TcpFlags::ACK, now).is_tracked());
    group.bench_function("ipv4_tcp/route", |b| {
        b.iter(|| black_box(reader.packet(black_box(&flow), TcpFlags::ACK, now)))
    });
    let mut buf = pkt.clone();
    group.bench_function("ipv4_tcp/parse_route_rewrite", |b| {
        b.iter(|| {
            let p = parse(black_box(&buf), LinkType::Ip).unwrap();
            // After the first rewrite the buffer holds the backend: route
            // the flow as it arrived, as a fresh packet would be.
            let f = black_box(p.flow().map(|_| flow).unwrap());
            if let Verdict::Forward(svclb::Forward { backend: to, .. }) =
                reader.packet(&f, TcpFlags::ACK, now)
            {
                rewrite_dst(&mut buf, &p, to).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Thread CPU time, not wall-clock time: see benches/common/cpu_time.rs.
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = bench_packet
}
criterion_main!(benches);
