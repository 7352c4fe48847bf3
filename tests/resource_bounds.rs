//! Resource bounds under a flood: 1,000,000 distinct clients through every
//! dataplane (iptables mode; nftables mode; IPVS mode with `lc`, which also counts
//! connections per destination; IPVS's affinity path does not depend on the
//! scheduler), to a
//! service with `ClientIP` affinity and to one without.
//!
//! Checked for each dataplane:
//! - the affinity table never holds more than its per-service capacity
//!   (checked every 100,000 clients) and ends full: the newest clients are
//!   pinned, the oldest evicted;
//! - after a warm-up of 100,000 clients that fills the table (its index
//!   and slabs reach their steady size within the first clients past the
//!   bound; measured per 100,000-client chunk: one step, then no growth), the next 1,000,000 clients
//!   leave the process's live heap where it was (within 64 KiB): nothing on the
//!   packet path (affinity entries, hotspot counters, IPVS connection
//!   counters, round-robin positions) grows with the number of clients.
//!
//! `tests/affinity.rs` (the affinity helper's) checks the same bound for
//! IPVS mode alone; this file extends it to every dataplane and to the live
//! heap. One test function only: the counting allocator sees every thread.

mod common;

use std::alloc::System;
use std::net::{Ipv4Addr, SocketAddr};

use common::*;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use svclb::*;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const CLIENTS: u32 = 1_000_000;
const WARM_UP: u32 = 100_000;
const CAPACITY: usize = 20_000;
const PER_SERVICE: usize = 10_000;
/// Live-heap growth allowed over the flood.
const SLACK_BYTES: isize = 64 * 1024;

fn table() -> ServiceTable {
    let ips: Vec<String> = (1..=8).map(|i| format!("10.1.0.{i}")).collect();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let sticky = Service::builder("default", "sticky")
        .cluster_ip("10.96.0.10".parse().unwrap())
        .port(ServicePortSpec::tcp(80).name("http"))
        .client_ip_affinity(Some(86_400))
        .build()
        .unwrap();
    let mut t = ServiceTable::new();
    t.apply_batch([
        Change::UpsertService(sticky),
        Change::UpsertSlice(slice("sticky-1", "sticky", &ips, 8080)),
        Change::UpsertService(service("plain", "10.96.0.11", 80)),
        Change::UpsertSlice(slice("plain-1", "plain", &ips, 8080)),
    ])
    .unwrap();
    t
}

fn client(i: u32, vip: &str) -> Flow {
    let src = SocketAddr::from((Ipv4Addr::from(0x0B00_0000 + i), (i % 50_000) as u16 + 1024));
    Flow::tcp(src, vip.parse().unwrap())
}

/// Routes clients `from..to` to the sticky service (and every 8th to the
/// plain one), closing each connection again; returns the last sticky
/// backend.
fn flood(dp: &dyn Dataplane, from: u32, to: u32, check: &dyn Fn(u32)) -> SocketAddr {
    let mut last = None;
    for i in from..to {
        let now = Instant::from_millis(u64::from(i));
        let f = client(i, "10.96.0.10:80");
        let b = dp.route(&f, now).backend().expect("forward");
        dp.connection_closed(&f, now);
        last = Some(b);
        if i % 8 == 0 {
            let g = client(i, "10.96.0.11:80");
            dp.route(&g, now).backend().expect("forward");
            dp.connection_closed(&g, now);
        }
        if i % 100_000 == 99_999 {
            check(i);
        }
    }
    last.expect("at least one client")
}

fn live_growth(region: &Region<'_, System>) -> isize {
    let s = region.change();
    s.bytes_allocated as isize - s.bytes_deallocated as isize + s.bytes_reallocated
}

#[test]
fn a_million_clients_stay_within_the_bounds_in_every_dataplane() {
    let t = table();
    let affinity = AffinityConfig::new(CAPACITY)
        .unwrap()
        .per_service_capacity(PER_SERVICE)
        .unwrap();
    let config = |kind: SchedulerKind| {
        DataplaneConfig::with_seed(1)
            .scheduler(kind)
            .affinity(affinity.clone())
    };
    let ipt = IptablesDataplane::new(config(SchedulerKind::RoundRobin));
    let nft = NftablesDataplane::new(config(SchedulerKind::RoundRobin));
    let lc = IpvsDataplane::new(config(SchedulerKind::LeastConnection));
    let cases: [(&str, &dyn Dataplane, &AffinityTable); 3] = [
        ("iptables", &ipt, ipt.affinity_table()),
        ("nftables", &nft, nft.affinity_table()),
        ("ipvs/lc", &lc, lc.affinity_table()),
    ];
    for (name, dp, affinity) in cases {
        dp.sync(&t, &t.full_change_set(), Instant::ZERO);
        let check = |i: u32| {
            let n = affinity.len();
            assert!(
                n <= PER_SERVICE,
                "{name}: {n} entries after {} clients",
                i + 1
            );
        };
        flood(dp, 0, WARM_UP, &check);
        let region = Region::new(GLOBAL);
        let last = flood(dp, WARM_UP, WARM_UP + CLIENTS, &check);
        let growth = live_growth(&region);
        let n = affinity.len();
        println!(
            "{name}: {CLIENTS} clients after a {WARM_UP}-client warm-up: {n} affinity entries (bound {PER_SERVICE}), live heap {growth:+} bytes"
        );
        assert!(
            growth <= SLACK_BYTES,
            "{name}: the live heap grew by {growth} bytes over {CLIENTS} clients"
        );
        assert!(
            (PER_SERVICE * 9 / 10..=PER_SERVICE).contains(&n),
            "{name}: {n}"
        );
        // The newest client is pinned.
        let f = client(WARM_UP + CLIENTS - 1, "10.96.0.10:80");
        let now = Instant::from_millis(u64::from(WARM_UP + CLIENTS));
        for _ in 0..3 {
            assert_eq!(dp.route(&f, now).backend(), Some(last), "{name}");
        }
    }
}
