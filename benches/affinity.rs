//! `route()` of one service with `ClientIP` affinity, in both modes: an
//! affinity hit (the client has a live entry), an affinity miss (a client
//! never seen, at capacity: schedule, insert, evict), and a plain route of
//! the same service without affinity, in one group, read as ratios.
//!
//! A second group, `shard_hash`, times the shard choice alone: main's
//! seed-only hash (the public `stable_hash` mixed with the replay seed,
//! reproduced here) against the secret-keyed ahash the table uses now, for
//! each key kind, in the same run.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use svclb::rng::mix64;
use svclb::*;

/// Distinct clients of the hit benchmark.
const CLIENTS: u32 = 4096;

fn table(affinity: bool) -> ServiceTable {
    let mut b = Service::builder("default", "web")
        .cluster_ip("10.96.0.10".parse().unwrap())
        .port(ServicePortSpec::tcp(80).name("http").target_port(8080));
    if affinity {
        b = b.client_ip_affinity(None);
    }
    let slice = EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080).name("http"))
        .endpoints((1..=5).map(|i| EndpointSpec::new(format!("10.1.0.{i}"))))
        .build()
        .unwrap();
    let mut t = ServiceTable::new();
    t.apply_batch([
        Change::UpsertService(b.build().unwrap()),
        Change::UpsertSlice(slice),
    ])
    .unwrap();
    t
}

fn client(k: u32) -> Flow {
    let ip = std::net::Ipv4Addr::from(0x0A00_0000 | (k & 0x00FF_FFFF));
    Flow::tcp(
        SocketAddr::from((ip, 40_000)),
        SocketAddr::from(([10, 96, 0, 10], 80)),
    )
}

fn dataplanes(affinity: bool) -> [(&'static str, Box<dyn Dataplane>); 2] {
    let t = table(affinity);
    // 65,536 entries: the miss benchmark runs at capacity (evicting).
    let config = DataplaneConfig::with_seed(1).affinity(AffinityConfig::new(1 << 16).unwrap());
    let ipt = IptablesDataplane::new(config.clone());
    let ipvs = IpvsDataplane::new(config);
    let all = t.full_change_set();
    ipt.sync(&t, &all, Instant::ZERO);
    ipvs.sync(&t, &all, Instant::ZERO);
    [("iptables", Box::new(ipt)), ("ipvs", Box::new(ipvs))]
}

fn bench_affinity(c: &mut Criterion) {
    let mut group = c.benchmark_group("affinity");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let now = Instant::from_secs(1);
    for (mode, dp) in dataplanes(false) {
        group.bench_function(format!("{mode}/plain"), |b| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) % CLIENTS;
                black_box(dp.route(black_box(&client(k)), now))
            })
        });
    }
    for (mode, dp) in dataplanes(true) {
        for k in 0..CLIENTS {
            dp.route(&client(k), now);
        }
        group.bench_function(format!("{mode}/hit"), |b| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) % CLIENTS;
                black_box(dp.route(black_box(&client(k)), now))
            })
        });
        // Fill the table so that every miss evicts.
        for k in CLIENTS..CLIENTS + (1 << 16) {
            dp.route(&client(k), now);
        }
        group.bench_function(format!("{mode}/miss"), |b| {
            let mut k = CLIENTS + (1 << 16);
            b.iter(|| {
                // A client never seen before (16M addresses before a repeat).
                k = k.wrapping_add(1);
                black_box(dp.route(black_box(&client(k)), now))
            })
        });
    }
    group.finish();
}

/// The shard main's table chose: public and invertible, so anyone who
/// knows the seed can aim keys at one shard.
#[inline]
fn seed_only_shard(key: &AffinityKey, slot_term: u64, seed: u64, mask: usize) -> usize {
    (mix64(key.stable_hash() ^ slot_term ^ seed) as usize) & mask
}

fn bench_shard_hash(c: &mut Criterion) {
    let mut group = c.benchmark_group("shard_hash");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    let table = AffinityTable::new(AffinityConfig::default(), 7);
    let scope = table.new_scope(Duration::from_secs(10));
    let seed = mix64(7 ^ 0xA5F1_7AB1_E000_0001);
    let mask = table.shards() - 1;
    type MakeKey = fn(u32) -> AffinityKey;
    let kinds: [(&str, MakeKey); 3] = [
        ("ipv4", |k| {
            AffinityKey::ClientIp(std::net::Ipv4Addr::from(0x0A00_0000 | k).into())
        }),
        ("ipv6", |k| {
            AffinityKey::ClientIp(
                std::net::Ipv6Addr::from(0x2001_0db8u128 << 96 | u128::from(k)).into(),
            )
        }),
        ("ipv4_port", |k| {
            AffinityKey::ClientIpPort(SocketAddr::from((
                std::net::Ipv4Addr::from(0x0A00_0000 | k),
                40_000 + (k % 1000) as u16,
            )))
        }),
    ];
    for (name, make) in kinds {
        let keys: Vec<AffinityKey> = (0..1024).map(make).collect();
        group.bench_function(format!("{name}/seed_only_main"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(seed_only_shard(black_box(&keys[i]), 0, seed, mask))
            })
        });
        group.bench_function(format!("{name}/keyed_ahash"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(table.shard_index(&scope, black_box(keys[i])))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_affinity, bench_shard_hash);
criterion_main!(benches);
