//! Each built-in scheduler's pick at 5, 100 and 1,000 destinations, and a
//! session-affinity lookup that hits (a known client: its timer restarts)
//! or misses (a new client: rr schedules it and the choice is remembered).
//!
//! A pick is index arithmetic on state built at update time; `lc` and `wlc`
//! scan the destinations' counters, as the kernel's do.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::cpu_time::ThreadCpu;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use svclb::scheduler::{Destination, PickContext};
use svclb::*;

fn flows(n: usize) -> Vec<Flow> {
    (0..n)
        .map(|k| {
            Flow::tcp(
                SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(0x0A02_0000 + k as u32)),
                    40_000 + k as u16,
                ),
                SocketAddr::from(([10, 96, 0, 1], 80)),
            )
        })
        .collect()
}

fn bench_schedulers(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("pick");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    let flows = flows(1024);
    let rng = SeededRng::new(7);
    for n in [5usize, 100, 1000] {
        // Weights 1..=3 so that wrr and wlc have work to do.
        let dests: Vec<Destination> = (0..n)
            .map(|i| {
                Destination::new(
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0A80_0000 + i as u32)), 8080),
                    1 + (i % 3) as u32,
                )
            })
            .collect();
        for kind in SchedulerKind::ALL.iter().copied() {
            let sel = SchedulerConfig::from(kind).build(&dests);
            group.bench_function(BenchmarkId::new(kind.name(), n), |b| {
                let mut k = 0usize;
                b.iter(|| {
                    k = (k + 1) & 1023;
                    let ctx = PickContext {
                        flow: black_box(&flows[k]),
                        now: Instant::ZERO,
                        rng: &rng,
                        rotation: None,
                    };
                    black_box(sel.pick(&dests, &ctx))
                })
            });
        }
    }
    group.finish();
}

fn bench_affinity(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("affinity");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    let dests: Vec<Destination> = (0..100)
        .map(|i| {
            Destination::new(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0A80_0000 + i as u32)), 8080),
                1,
            )
        })
        .collect();
    let rr = SchedulerConfig::from(SchedulerKind::RoundRobin).build(&dests);
    let rng = SeededRng::new(7);
    let table = AffinityTable::new(AffinityConfig::default(), 7);
    let scope = table.new_scope(Duration::from_secs(10_800));
    let now = Instant::from_secs(1);
    let route = |flow: &Flow| {
        let ctx = PickContext {
            flow,
            now,
            rng: &rng,
            rotation: None,
        };
        table.route(
            &scope,
            AffinityKey::for_flow(AffinityKeyKind::ClientIp, flow, None),
            now,
            // Destination i is 10.128.0.i: its index from its address.
            |ep| match ep.ip() {
                IpAddr::V4(v4) => Some((u32::from(v4) - 0x0A80_0000) as usize),
                IpAddr::V6(_) => None,
            },
            || rr.pick(&dests, &ctx).map(|i| (i, dests[i].addr())),
        )
    };
    // 1,024 known clients.
    let known = flows(1024);
    for f in &known {
        route(f);
    }
    group.bench_function("hit", |b| {
        let mut k = 0usize;
        b.iter(|| {
            k = (k + 1) & 1023;
            black_box(route(black_box(&known[k])))
        })
    });
    // Clients never seen before, one per call (the table evicts the least
    // recently used once full, as in a long run).
    group.bench_function("miss", |b| {
        let mut k = 0u32;
        b.iter(|| {
            k = k.wrapping_add(1);
            let f = Flow::tcp(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0B00_0000 + k)), 40_000),
                SocketAddr::from(([10, 96, 0, 1], 80)),
            );
            black_box(route(&f))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Thread CPU time, not wall-clock time: see benches/common/cpu_time.rs.
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = bench_schedulers, bench_affinity
}
criterion_main!(benches);
