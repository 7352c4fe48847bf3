//! Rendering cost: `render::iptables` against `render::nft` for the same
//! table at 1,000 and 10,000 services (5 endpoints each), in one run.
//!
//! Target (issue 11, part 5), read as a ratio within one run: iptables at
//! 10,000 services ≤ 2× nft. Before the chain index, iptables found each
//! chain by scanning all of them, which made it quadratic.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::cpu_time::ThreadCpu;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use svclb::render::{self, RenderOptions};

fn render_bench(c: &mut Criterion<ThreadCpu>) {
    let mut g = c.benchmark_group("render");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    let opts = RenderOptions::default();
    for n in [1_000usize, 10_000] {
        let table = common::cluster(n, 5);
        g.bench_with_input(BenchmarkId::new("iptables", n), &table, |b, t| {
            b.iter(|| black_box(render::iptables::render(t, &opts)))
        });
        g.bench_with_input(BenchmarkId::new("nft", n), &table, |b, t| {
            b.iter(|| black_box(render::nft::render(t, &opts)))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = render_bench
}
criterion_main!(benches);
