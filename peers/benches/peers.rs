//! svclb's schedulers next to pingora-load-balancing and the `maglev` crate,
//! picking among the same backends in one criterion run, like with like:
//!
//! - `bare/...`: the selector alone. svclb's `Selector::pick` (an index into
//!   the destinations, read back as an address) against pingora's built
//!   selector (`BackendSelection::build`, then `iter(key).next()`, a
//!   `&Backend`), and the `maglev` crate's `get`.
//! - `full/...`: what a caller calls per connection. svclb's
//!   `Dataplane::route` (IPVS mode: the virtual-service lookup by VIP, the
//!   load of the published selector, the pick, the verdict) against
//!   pingora's `LoadBalancer::select(key, 256)` (the load of the published
//!   selector, its unique-backend iterator, the health check, a cloned
//!   `Backend`).
//!
//! Run from this directory: `cargo bench` (pingora needs `cmake`). Times
//! are thread CPU time, as in the repository's own benches.

#[path = "../../benches/common/cpu_time.rs"]
#[allow(dead_code)]
mod cpu_time;

use std::hint::black_box;
use std::net::SocketAddr;

use cpu_time::ThreadCpu;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use maglev::{ConsistentHasher, Maglev};
use pingora_load_balancing::selection::{
    BackendIter, BackendSelection, Consistent, Random, RoundRobin,
};
use pingora_load_balancing::{Backend, LoadBalancer};
use std::collections::BTreeSet;
use std::sync::Arc;
use svclb::scheduler::{Destination, PickContext};
use svclb::{
    AddressType, Change, Dataplane, DataplaneConfig, EndpointSlice, EndpointSpec, Flow, Instant,
    IpvsDataplane, SchedulerConfig, SchedulerKind, SeededRng, Service, ServicePortSpec,
    ServiceTable, SlicePortSpec,
};

fn backends(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 8080)))
        .collect()
}

/// Client flows with distinct sources, so hash-based pickers see a spread.
fn flows(n: usize) -> Vec<Flow> {
    (0..n)
        .map(|i| {
            Flow::tcp(
                SocketAddr::from(([10, 2, (i >> 8) as u8, i as u8], 40_000 + (i % 1000) as u16)),
                SocketAddr::from(([10, 96, 0, 1], 80)),
            )
        })
        .collect()
}

/// One service on 10.96.0.1:80 whose endpoints are `addrs` (in slices of
/// at most 500), synced into an IPVS-mode dataplane with `kind`.
fn dataplane(addrs: &[SocketAddr], kind: SchedulerKind) -> IpvsDataplane {
    let svc = Service::builder("default", "web")
        .cluster_ip("10.96.0.1".parse().unwrap())
        .port(ServicePortSpec::tcp(80).target_port(8080))
        .build()
        .unwrap();
    let mut changes = vec![Change::UpsertService(svc)];
    for (i, chunk) in addrs.chunks(500).enumerate() {
        let slice = EndpointSlice::builder("default", format!("web-{i}"), "web", AddressType::IPv4)
            .port(SlicePortSpec::tcp(8080))
            .endpoints(chunk.iter().map(|a| EndpointSpec::new(a.ip().to_string())))
            .build()
            .unwrap();
        changes.push(Change::UpsertSlice(slice));
    }
    let mut table = ServiceTable::new();
    let cs = table.apply_batch(changes).unwrap();
    let dp = IpvsDataplane::new(DataplaneConfig::with_seed(7).scheduler(kind));
    dp.sync(&table, &cs);
    dp
}

/// pingora's selector built alone, as `LoadBalancer` builds and publishes
/// it on `update`.
fn bare_selector<S: BackendSelection>(addrs: &[SocketAddr]) -> Arc<S> {
    let set: BTreeSet<Backend> = addrs
        .iter()
        .map(|a| Backend::new(&a.to_string()).unwrap())
        .collect();
    Arc::new(S::build(&set))
}

fn bench_pick(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("pick");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(200));
    group.measurement_time(std::time::Duration::from_millis(700));
    let flows = flows(1024);
    let keys: Vec<[u8; 6]> = flows
        .iter()
        .map(|f| {
            let SocketAddr::V4(v4) = f.src else {
                unreachable!()
            };
            let mut k = [0u8; 6];
            k[..4].copy_from_slice(&v4.ip().octets());
            k[4..].copy_from_slice(&v4.port().to_be_bytes());
            k
        })
        .collect();
    for n in [5usize, 100, 1000] {
        let addrs = backends(n);
        let dests: Vec<Destination> = addrs.iter().map(|&a| Destination::new(a, 1)).collect();
        let rng = SeededRng::new(7);
        for kind in [
            SchedulerKind::RoundRobin,
            SchedulerKind::Random,
            SchedulerKind::SourceHash,
            SchedulerKind::Maglev,
        ] {
            let sel = SchedulerConfig::from(kind).build(&dests);
            group.bench_function(BenchmarkId::new(format!("bare/svclb/{kind}"), n), |b| {
                let mut i = 0usize;
                b.iter(|| {
                    i = (i + 1) & 1023;
                    let ctx = PickContext {
                        flow: &flows[i],
                        now: Instant::ZERO,
                        rng: &rng, rotation: None, };
                    black_box(sel.pick(&dests, &ctx).map(|j| dests[j].addr()))
                })
            });
        }
        for kind in [
            SchedulerKind::RoundRobin,
            SchedulerKind::Random,
            SchedulerKind::SourceHash,
            SchedulerKind::Maglev,
        ] {
            let dp = dataplane(&addrs, kind);
            assert!(dp.route(&flows[0], Instant::ZERO).backend().is_some());
            group.bench_function(BenchmarkId::new(format!("full/svclb/{kind}"), n), |b| {
                let mut i = 0usize;
                b.iter(|| {
                    i = (i + 1) & 1023;
                    black_box(dp.route(black_box(&flows[i]), Instant::ZERO))
                })
            });
        }
        macro_rules! bare_pingora {
            ($name:literal, $ty:ty) => {
                let sel = bare_selector::<$ty>(&addrs);
                group.bench_function(BenchmarkId::new(concat!("bare/pingora/", $name), n), |b| {
                    let mut i = 0usize;
                    b.iter(|| {
                        i = (i + 1) & 1023;
                        let mut it = sel.iter(black_box(&keys[i]));
                        black_box(it.next().map(std::ptr::from_ref))
                    })
                });
            };
        }
        bare_pingora!("RoundRobin", RoundRobin);
        bare_pingora!("Random", Random);
        bare_pingora!("Consistent", Consistent);
        let rr = LoadBalancer::<RoundRobin>::try_from_iter(addrs.iter().copied()).unwrap();
        group.bench_function(BenchmarkId::new("full/pingora/RoundRobin", n), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(rr.select(&keys[i], 256))
            })
        });
        let random = LoadBalancer::<Random>::try_from_iter(addrs.iter().copied()).unwrap();
        group.bench_function(BenchmarkId::new("full/pingora/Random", n), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(random.select(&keys[i], 256))
            })
        });
        let ketama = LoadBalancer::<Consistent>::try_from_iter(addrs.iter().copied()).unwrap();
        group.bench_function(BenchmarkId::new("full/pingora/Consistent", n), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(ketama.select(&keys[i], 256))
            })
        });
        let mg = Maglev::new(addrs.iter().copied());
        group.bench_function(BenchmarkId::new("bare/maglev/get", n), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(mg.get(&keys[i]).copied())
            })
        });
    }
    group.finish();
}

/// Table build time at N = 1000, M = 65537: svclb's populate (with Katran's
/// hashes) against the `maglev` crate, which builds its own table of size
/// 65537 (its default prime) from the same addresses.
fn bench_build(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("maglev_build");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(3));
    let addrs = backends(1000);
    let weighted: Vec<(SocketAddr, u32)> = addrs.iter().map(|&a| (a, 1)).collect();
    group.bench_function(BenchmarkId::new("svclb/build_table", 1000), |b| {
        b.iter(|| black_box(svclb::scheduler::maglev::build_table(&weighted, 65537)))
    });
    group.bench_function(BenchmarkId::new("maglev/with_capacity", 1000), |b| {
        b.iter(|| black_box(Maglev::with_capacity(addrs.iter().copied(), 65537)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Thread CPU time, as in the repository's benches.
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = bench_pick, bench_build
}
criterion_main!(benches);
