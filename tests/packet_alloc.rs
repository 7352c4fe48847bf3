//! The packet path allocates nothing: parse, every rewrite, reverse NAT,
//! ICMP error translation, checksum verification, the connection layer's
//! fragment record once created (recording a first fragment, matching a
//! later one, and a full table under churn), and the source-port
//! allocator once its pool exists, measured with a counting global
//! allocator.
//!
//! One test function only: the allocator counts every thread, so no other
//! test may run while a region is measured.

use std::alloc::System;
use std::net::SocketAddr;

use etherparse::PacketBuilder;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use svclb::packet::*;
use svclb::{
    AddressType, Change, Dataplane, DataplaneConfig, EndpointSlice, EndpointSpec, Flow, Instant,
    IptablesDataplane, Protocol, Service, ServicePortSpec, ServiceTable, SlicePortSpec, TcpFlags,
};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn packets() -> Vec<(Vec<u8>, LinkType)> {
    let mut out = Vec::new();
    let mut p = Vec::new();
    PacketBuilder::ipv4([10, 2, 0, 9], [10, 96, 0, 10], 64)
        .tcp(40000, 80, 1, 1000)
        .syn()
        .write(&mut p, &[1; 20])
        .unwrap();
    out.push((p.clone(), LinkType::Ip));
    let mut icmp = Vec::new();
    PacketBuilder::ipv4([10, 1, 0, 5], [10, 2, 0, 9], 64)
        .icmpv4_raw(3, 3, [0; 4])
        .write(&mut icmp, &p)
        .unwrap();
    out.push((icmp, LinkType::Ip));
    let mut v6 = Vec::new();
    let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
    a[0] = 0xfd;
    b[0] = 0xfd;
    a[15] = 1;
    b[15] = 2;
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .single_vlan(10.try_into().unwrap())
        .ipv6(a, b, 64)
        .udp(40000, 53)
        .write(&mut v6, &[2; 30])
        .unwrap();
    out.push((v6, LinkType::Ethernet));
    out
}

fn packet_path_allocates_nothing() {
    // The counter works.
    let region = Region::new(GLOBAL);
    let v: Vec<u64> = std::hint::black_box(Vec::with_capacity(16));
    assert!(region.change().allocations >= 1);
    drop(v);

    let mut pkts = packets();
    let v4: SocketAddr = "10.1.0.5:8080".parse().unwrap();
    let v6: SocketAddr = "[fd00::5]:8080".parse().unwrap();
    let snat_v4: SocketAddr = "10.0.0.1:40001".parse().unwrap();
    let snat_v6: SocketAddr = "[fd00::1]:40001".parse().unwrap();
    let dp = dataplane();
    let mut ports = SourcePortAllocator::default();
    let snat_ip = snat_v4.ip();
    let flow = Flow::tcp(
        "10.2.0.9:40000".parse().unwrap(),
        "10.96.0.10:80".parse().unwrap(),
    );
    let key = FragmentKey {
        src: flow.src.ip(),
        dst: flow.dst.ip(),
        id: 1,
        protocol: Protocol::Tcp,
    };
    // Warm: the pool and the tracker's tables exist.
    let port = ports.allocate(Protocol::Tcp, v4, snat_ip).unwrap();
    ports.release(Protocol::Tcp, v4, snat_ip, port);
    dp.route(&flow, Instant::ZERO);
    assert!(dp.first_fragment(&key, &flow, Instant::ZERO));
    assert!(dp.later_fragment(&key, Instant::ZERO).is_some());

    let region = Region::new(GLOBAL);
    let mut done = 0;
    for round in 0..100u64 {
        for (buf, link) in pkts.iter_mut() {
            let p = parse(buf, *link).unwrap();
            let (new, snat) = match p.version() {
                IpVersion::V4 => (v4, snat_v4),
                IpVersion::V6 => (v6, snat_v6),
            };
            match *p.kind() {
                PacketKind::Flow(f) => {
                    rewrite_dst(buf, &p, new).unwrap();
                    rewrite_src(buf, &p, snat).unwrap();
                    let q = parse(buf, *link).unwrap();
                    verify_checksums(buf, &q).unwrap();
                    reverse_nat(buf, &q, &Flow::new(f.protocol, f.dst, f.src), true).unwrap();
                }
                PacketKind::IcmpError { .. } => {
                    rewrite_src(buf, &p, new).unwrap();
                    verify_checksums(buf, &p).unwrap();
                }
                _ => unreachable!(),
            }
            done += 1;
        }
        let now = Instant::from_secs(round / 10);
        // The connection's next segment, fragmented: its first fragment
        // recorded, a later one matched to the connection.
        assert!(dp.packet(&flow, TcpFlags::ACK, now).is_tracked());
        let datagram = FragmentKey {
            id: round as u32,
            ..key
        };
        assert!(dp.first_fragment(&datagram, &flow, now));
        let t = dp.later_fragment(&datagram, now).unwrap();
        assert_eq!(t.flow, flow);
        let port = ports.allocate(Protocol::Tcp, v4, snat_ip).unwrap();
        assert!(ports.release(Protocol::Tcp, v4, snat_ip, port));
    }
    let c = region.change();
    assert_eq!(done, 300);
    assert_eq!(
        c.allocations + c.reallocations + c.deallocations,
        0,
        "the packet path allocated: {c:?}"
    );

    // A full fragment record under churn: every record evicts its
    // shard's oldest. Removals leave tombstones in the hash tables; once
    // they use up the free slots a table rehashes, and that must happen in
    // place, never by growing (which allocates). Fresh dataplanes each get
    // new hash states.
    for t in 0..8u32 {
        let dp = dataplane();
        dp.route(&flow, Instant::ZERO);
        for id in 0..2048u32 {
            dp.first_fragment(&FragmentKey { id, ..key }, &flow, Instant::ZERO);
        }
        let region = Region::new(GLOBAL);
        for id in 2048..40_000u32 {
            let datagram = FragmentKey {
                id: id ^ (t << 24),
                ..key
            };
            assert!(dp.first_fragment(&datagram, &flow, Instant::ZERO));
            assert!(dp.later_fragment(&datagram, Instant::ZERO).is_some());
        }
        let c = region.change();
        assert_eq!(
            dp.later_fragment(&FragmentKey { id: 0, ..key }, Instant::ZERO),
            None
        );
        assert_eq!(
            c.allocations + c.reallocations + c.deallocations,
            0,
            "a full fragment record allocated under churn (dataplane {t}): {c:?}"
        );
    }
}

/// A dataplane with one TCP service (`10.96.0.10:80`) and two backends.
fn dataplane() -> IptablesDataplane {
    let mut table = ServiceTable::new();
    let svc = Service::builder("default", "web")
        .cluster_ip("10.96.0.10".parse().unwrap())
        .port(ServicePortSpec::tcp(80).target_port(8080))
        .build()
        .unwrap();
    let slice = EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080))
        .endpoints(["10.1.0.5", "10.1.0.6"].map(EndpointSpec::new))
        .build()
        .unwrap();
    let cs = table
        .apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)])
        .unwrap();
    let dp = IptablesDataplane::new(DataplaneConfig::with_seed(1));
    dp.sync(&table, &cs, Instant::ZERO);
    dp
}

/// Run without libtest's harness (`harness = false`): the counting
/// allocator counts every thread, and the harness's own threads allocate
/// at moments of their own (the main thread's first wait on the result
/// channel), which landed inside a measured region under load.
fn main() {
    packet_path_allocates_nothing();
    println!("test packet_path_allocates_nothing ... ok");
}
