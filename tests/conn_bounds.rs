//! A flood of distinct flows never grows the tracker past its bound, in any
//! mode, and the live heap stops growing once the table is warm.

use std::alloc::System;
use std::net::SocketAddr;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use svclb::*;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const BOUND: usize = 65_536;
const FLOWS: u32 = 1_000_000;

#[test]
fn a_million_flows_stay_within_the_bound() {
    let mut t = ServiceTable::new();
    t.apply_batch([
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
                .endpoints((1..=8).map(|j| EndpointSpec::new(format!("10.1.0.{j}"))))
                .build()
                .unwrap(),
        ),
    ])
    .unwrap();
    let config =
        DataplaneConfig::with_seed(1).conntrack(Some(ConntrackConfig::new(BOUND).unwrap()));
    let dps: Vec<(Box<dyn Dataplane>, &str)> = vec![
        (Box::new(IptablesDataplane::new(config.clone())), "iptables"),
        (Box::new(IpvsDataplane::new(config.clone())), "ipvs"),
        (Box::new(NftablesDataplane::new(config)), "nftables"),
    ];
    for (dp, name) in &dps {
        dp.sync(&t, &t.full_change_set(), Instant::ZERO);
        let tracker_len = |dp: &dyn Dataplane| dp.connections(Instant::ZERO).len();
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let flow = |i: u32| {
            Flow::tcp(
                SocketAddr::from((
                    (0x0B00_0000 + (i >> 4)).to_be_bytes(),
                    1024 + (i & 0xF) as u16,
                )),
                vip,
            )
        };
        // Warm-up: fill the table past its bound once.
        let warm = 4 * BOUND as u32;
        for i in 0..warm {
            let v = dp.route(&flow(i), Instant::ZERO);
            assert!(v.backend().is_some());
        }
        assert!(
            tracker_len(&**dp) <= BOUND,
            "{name}: {}",
            tracker_len(&**dp)
        );
        // The rest of the million: the live heap does not grow.
        let region = Region::new(GLOBAL);
        for i in warm..FLOWS {
            dp.route(&flow(i), Instant::ZERO);
        }
        let c = region.change();
        let grown = c.bytes_allocated as i64 - c.bytes_deallocated as i64;
        assert!(grown <= 0, "{name}: the heap grew by {grown} bytes");
        let len = tracker_len(&**dp);
        assert!(len <= BOUND && len > BOUND / 2, "{name}: {len} tracked");
    }
}
