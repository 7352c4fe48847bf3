//! The connection tracker's hot paths against a bare hash-map probe over
//! the same keys, in one group, read as ratios:
//!
//! - `hit/{10k,1M}`: `lookup` of an established flow (state machine, timer
//!   refresh, one shard lock) vs `probe/{10k,1M}`: `AHashMap<Flow, u32>::get`.
//! - `insert_miss/64k`: `insert` of a flow never seen into a tracker at its
//!   bound of 65,536 (every insert evicts) vs `probe/64k`.
//!
//! - `dataplane/packet_hit/10k` (an established flow's packet through the
//!   IPVS dataplane) vs `dataplane/reply/10k` (the backend's reply to it,
//!   found through the reply index, no writer lock).
//!
//! Keys are visited in a shuffled order, the same for both sides. Times are
//! thread CPU time (benches/common/cpu_time.rs): the machine is shared.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use ahash::AHashMap;
use common::cpu_time::ThreadCpu;
use criterion::{Criterion, criterion_group, criterion_main};
use svclb::conntrack::*;
use svclb::{
    AddressType, Change, Dataplane, DataplaneConfig, EndpointSlice, EndpointSpec, Flow, Instant,
    IpvsDataplane, Service, ServicePortSpec, ServiceTable, SlicePortSpec, Verdict,
};

const BACKEND: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 5), 8080));

fn flow(i: u32) -> Flow {
    Flow::tcp(
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(0x0A00_0000 + (i >> 4)),
            30_000 + (i & 15) as u16,
        )),
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80)),
    )
}

/// `n` flows in a shuffled order (a fixed xorshift, so runs agree).
fn shuffled(n: u32) -> Vec<Flow> {
    let mut v: Vec<Flow> = (0..n).map(flow).collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn tracker(capacity: usize, flows: &[Flow], now: Instant) -> Conntrack {
    let ct = Conntrack::new(
        ConntrackConfig::new(capacity)
            .unwrap()
            .hash_key([1, 2, 3, 4]),
    );
    for (i, f) in flows.iter().enumerate() {
        ct.insert(
            f,
            FrontendId(0),
            BackendId(i as u32 % 64),
            BACKEND,
            TcpFlags::ACK,
            now,
        );
    }
    ct
}

fn probe_map(flows: &[Flow]) -> AHashMap<Flow, u32> {
    flows
        .iter()
        .enumerate()
        .map(|(i, f)| (*f, i as u32))
        .collect()
}

fn bench_conntrack(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("conntrack");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(2));
    let now = Instant::from_secs(1);

    for (label, n, capacity) in [
        ("10k", 10_000u32, 16_384usize),
        ("1M", 1_000_000, 1_100_000),
    ] {
        let flows = shuffled(n);
        let ct = tracker(capacity, &flows, now);
        assert_eq!(ct.len(), n as usize, "no eviction while filling");
        let map = probe_map(&flows);
        group.bench_function(format!("hit/{label}"), |b| {
            let mut k = 0;
            b.iter(|| {
                k = if k + 1 == flows.len() { 0 } else { k + 1 };
                black_box(ct.lookup(black_box(&flows[k]), TcpFlags::ACK, now))
            })
        });
        group.bench_function(format!("probe/{label}"), |b| {
            let mut k = 0;
            b.iter(|| {
                k = if k + 1 == flows.len() { 0 } else { k + 1 };
                black_box(map.get(black_box(&flows[k])))
            })
        });
        eprintln!(
            "conntrack {label}: {} entries, {} bytes per entry",
            ct.len(),
            ct.memory_bytes()
        );
    }

    // At the bound: every insert of a new flow evicts one.
    let bound = 1usize << 16;
    let warm = shuffled(1 << 18);
    let ct = tracker(bound, &warm, now);
    let map = probe_map(&warm[..bound]);
    let keys = &warm[..bound];
    eprintln!(
        "conntrack 64k bound: {} entries, {} bytes per entry",
        ct.len(),
        ct.memory_bytes()
    );
    group.bench_function("insert_miss/64k", |b| {
        // Flows never seen before, made on the fly (16M before a repeat).
        let mut k = 1u32 << 20;
        b.iter(|| {
            k = if k == (1 << 24) { 1 << 20 } else { k + 1 };
            black_box(ct.insert(
                black_box(&flow(k)),
                FrontendId(0),
                BackendId(k % 64),
                BACKEND,
                TcpFlags::SYN,
                now,
            ))
        })
    });
    group.bench_function("probe/64k", |b| {
        let mut k = 0;
        b.iter(|| {
            k = if k + 1 == keys.len() { 0 } else { k + 1 };
            black_box(map.get(black_box(&keys[k])))
        })
    });
    group.finish();
}

fn bench_dataplane_reply(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("dataplane");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(2));
    let mut table = ServiceTable::new();
    let changes = table
        .apply_batch([
            Change::UpsertService(
                Service::builder("default", "web")
                    .cluster_ip("10.96.0.10".parse().unwrap())
                    .port(ServicePortSpec::tcp(80).target_port(8080))
                    .build()
                    .unwrap(),
            ),
            Change::UpsertSlice(
                EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
                    .port(SlicePortSpec::tcp(8080))
                    .endpoints(["10.1.0.5", "10.1.0.6", "10.1.0.7"].map(EndpointSpec::new))
                    .build()
                    .unwrap(),
            ),
        ])
        .unwrap();
    let dp = IpvsDataplane::new(DataplaneConfig::with_seed(1));
    let now = Instant::from_secs(1);
    dp.sync(&table, &changes, now);
    let flows = shuffled(10_000);
    let replies: Vec<Flow> = flows
        .iter()
        .map(|f| match dp.route(f, now) {
            Verdict::Forward(fw) => Flow::tcp(fw.backend, f.src),
            other => panic!("{other:?}"),
        })
        .collect();
    group.bench_function("packet_hit/10k", |b| {
        let mut k = 0;
        b.iter(|| {
            k = if k + 1 == flows.len() { 0 } else { k + 1 };
            black_box(dp.packet(black_box(&flows[k]), TcpFlags::ACK, now))
        })
    });
    group.bench_function("reply/10k", |b| {
        let mut k = 0;
        b.iter(|| {
            k = if k + 1 == replies.len() { 0 } else { k + 1 };
            black_box(dp.reply(black_box(&replies[k]), TcpFlags::ACK, now))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Thread CPU time, not wall-clock time: see benches/common/cpu_time.rs.
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = bench_conntrack, bench_dataplane_reply
}
criterion_main!(benches);
