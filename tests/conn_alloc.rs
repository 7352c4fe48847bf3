//! The connection layer's packet paths allocate nothing once warm, in every
//! mode: an established-flow hit (tracked), and a miss (schedule + insert)
//! followed by its close, through `Dataplane` and the per-thread readers.
//! Only real hits are counted as hits: a verdict must say `tracked`.
//!
//! One test function only: the allocator counts every thread.

use std::alloc::System;
use std::net::SocketAddr;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use svclb::*;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn table() -> ServiceTable {
    let mut t = ServiceTable::new();
    let mut changes = Vec::new();
    for i in 0..20u8 {
        changes.push(Change::UpsertService(
            Service::builder("default", format!("s{i}"))
                .cluster_ip(format!("10.96.0.{}", i + 1).parse().unwrap())
                .port(ServicePortSpec::tcp(80).target_port(8080))
                .build()
                .unwrap(),
        ));
        changes.push(Change::UpsertSlice(
            EndpointSlice::builder(
                "default",
                format!("s{i}-1"),
                format!("s{i}"),
                AddressType::IPv4,
            )
            .port(SlicePortSpec::tcp(8080))
            .endpoints((1..=4).map(|j| EndpointSpec::new(format!("10.1.{i}.{j}"))))
            .build()
            .unwrap(),
        ));
    }
    t.apply_batch(changes).unwrap();
    t
}

fn flows(n: u32, base: u8) -> Vec<Flow> {
    (0..n)
        .map(|k| {
            Flow::tcp(
                SocketAddr::from((
                    [10, base, (k >> 8) as u8, k as u8],
                    20_000 + (k % 30_000) as u16,
                )),
                SocketAddr::from(([10, 96, 0, (k % 20) as u8 + 1], 80)),
            )
        })
        .collect()
}

fn counted(f: impl FnOnce() -> usize) -> (usize, usize) {
    let region = Region::new(GLOBAL);
    let n = f();
    let c = region.change();
    (n, c.allocations + c.reallocations + c.deallocations)
}

fn connection_paths_allocate_nothing_when_warm() {
    let region = Region::new(GLOBAL);
    let v: Vec<u64> = std::hint::black_box(Vec::with_capacity(16));
    assert!(region.change().allocations >= 1, "the counter works");
    drop(v);

    let t = table();
    let all = t.full_change_set();
    let est = flows(4000, 2);
    let fresh = flows(4000, 3);
    let config = DataplaneConfig::with_seed(1)
        .conntrack(Some(ConntrackConfig::new(65_536).unwrap()))
        .scheduler(SchedulerKind::LeastConnection);
    let dps: Vec<Box<dyn Dataplane>> = vec![
        Box::new(IptablesDataplane::new(config.clone())),
        Box::new(IpvsDataplane::new(config.clone())),
        Box::new(NftablesDataplane::new(config)),
    ];
    for dp in &dps {
        let dp = &**dp;
        dp.sync(&t, &all, Instant::ZERO);
        // Warm: open the established flows, and run the fresh ones once
        // (the table grows to its size), closing them again.
        for f in &est {
            dp.route(f, Instant::ZERO);
            dp.packet(f, TcpFlags::ACK, Instant::ZERO);
        }
        for f in &fresh {
            dp.route(f, Instant::ZERO);
            dp.connection_closed(f, Instant::ZERO);
        }
        let (hits, allocs) = counted(|| {
            est.iter()
                .filter(|f| {
                    dp.packet(f, TcpFlags::ACK, Instant::from_secs(1))
                        .is_tracked()
                })
                .count()
        });
        assert_eq!(hits, est.len(), "{}: established hits", dp.mode());
        assert_eq!(allocs, 0, "{}: an established hit allocated", dp.mode());
        // Replies, through the reply index (backend -> frontends).
        let replies: Vec<Flow> = dp
            .connections(Instant::from_secs(1))
            .iter()
            .map(|t| Flow::new(t.flow.protocol, t.backend_addr, t.flow.src))
            .collect();
        let (found, allocs) = counted(|| {
            replies
                .iter()
                .filter(|r| dp.reply(r, TcpFlags::ACK, Instant::from_secs(1)).is_some())
                .count()
        });
        assert_eq!(found, est.len(), "{}: replies found", dp.mode());
        assert_eq!(allocs, 0, "{}: a reply lookup allocated", dp.mode());
        let (misses, allocs) = counted(|| {
            fresh
                .iter()
                .filter(|f| {
                    let v = dp.route(f, Instant::from_secs(2));
                    dp.connection_closed(f, Instant::from_secs(2));
                    matches!(v, Verdict::Forward(fw) if !fw.tracked)
                })
                .count()
        });
        assert_eq!(misses, fresh.len(), "{}: warm misses", dp.mode());
        assert_eq!(allocs, 0, "{}: a warm miss allocated", dp.mode());
        // A retry without the failed backend (route_excluding).
        let (retried, allocs) = counted(|| {
            fresh
                .iter()
                .filter(|f| {
                    let Verdict::Forward(a) = dp.route(f, Instant::from_secs(3)) else {
                        return false;
                    };
                    let v = dp.route_excluding(f, &[a.backend_id], Instant::from_secs(3));
                    dp.connection_closed(f, Instant::from_secs(3));
                    matches!(v, Verdict::Forward(b) if b.backend_id != a.backend_id)
                })
                .count()
        });
        assert_eq!(retried, fresh.len(), "{}: retries", dp.mode());
        assert_eq!(allocs, 0, "{}: a retry allocated", dp.mode());
    }
    // The per-thread readers.
    let ipt = IptablesDataplane::new(DataplaneConfig::with_seed(2));
    let ipvs = IpvsDataplane::new(DataplaneConfig::with_seed(2));
    let nft = NftablesDataplane::new(DataplaneConfig::with_seed(2));
    ipt.sync(&t, &all, Instant::ZERO);
    ipvs.sync(&t, &all, Instant::ZERO);
    nft.sync(&t, &all, Instant::ZERO);
    let mut r1 = ipt.reader();
    let mut r2 = ipvs.reader();
    let mut r3 = nft.reader();
    for f in &est {
        r1.route(f, Instant::ZERO);
        r2.route(f, Instant::ZERO);
        r3.route(f, Instant::ZERO);
    }
    let (hits, allocs) = counted(|| {
        est.iter()
            .filter(|f| {
                r1.packet(f, TcpFlags::ACK, Instant::ZERO).is_tracked()
                    && r2.packet(f, TcpFlags::ACK, Instant::ZERO).is_tracked()
                    && r3.packet(f, TcpFlags::ACK, Instant::ZERO).is_tracked()
            })
            .count()
    });
    assert_eq!(hits, est.len(), "reader hits");
    assert_eq!(allocs, 0, "a reader's established hit allocated");
}

/// Run without libtest's harness (`harness = false`): the counting
/// allocator counts every thread, and the harness's own threads allocate
/// at moments of their own (the main thread's first wait on the result
/// channel), which landed inside a measured region under load.
fn main() {
    connection_paths_allocate_nothing_when_warm();
    println!("test connection_paths_allocate_nothing_when_warm ... ok");
}
