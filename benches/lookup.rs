//! `route()` in iptables mode (a linear walk of KUBE-SERVICES) and in IPVS
//! mode (a hash lookup plus an rr pick) at 10 to 10,000 services with 5
//! endpoints each, over a random mix of services; the same through an
//! `IpvsReader` (the per-thread handle that caches the table); a bare
//! `ahash` map probe over the same keys is the floor.
//!
//! Targets (issue 6), read as ratios within one run: IPVS at 10,000 ≤ 1.5×
//! IPVS at 10; iptables 10,000 ÷ 1,000 ≥ 5; iptables ÷ IPVS at 10,000 ≥ 50;
//! IPVS ≤ 3× the ahash probe.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::cpu_time::ThreadCpu;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use svclb::*;

const FLOWS: usize = 4096;

fn bench_lookup(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("lookup");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for n in [10usize, 100, 1_000, 10_000] {
        let table = common::cluster(n, 5);
        let (ipt, ipvs) = common::dataplanes(&table);
        let flows = common::flow_mix(n, FLOWS, 0xC0FFEE);
        let floor = common::floor_map(n);
        let now = Instant::ZERO;
        group.bench_function(BenchmarkId::new("iptables", n), |b| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) & (FLOWS - 1);
                black_box(ipt.route(black_box(&flows[k]), now))
            })
        });
        group.bench_function(BenchmarkId::new("ipvs", n), |b| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) & (FLOWS - 1);
                black_box(ipvs.route(black_box(&flows[k]), now))
            })
        });
        let mut reader = ipvs.reader();
        group.bench_function(BenchmarkId::new("ipvs_reader", n), |b| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) & (FLOWS - 1);
                black_box(reader.route(black_box(&flows[k]), now))
            })
        });
        group.bench_function(BenchmarkId::new("ahash_probe", n), |b| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) & (FLOWS - 1);
                let f = black_box(&flows[k]);
                black_box(floor.get(&(f.dst.ip(), f.dst.port(), f.protocol)).copied())
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Thread CPU time, not wall-clock time: see benches/common/cpu_time.rs.
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = bench_lookup
}
criterion_main!(benches);
