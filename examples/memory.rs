//! Memory per service and per endpoint: the control-plane table and each
//! dataplane at 10,000 services with 50,000 endpoints, counted by a global
//! allocator that records every allocation and deallocation.
//!
//! ```sh
//! cargo run --release --example memory            # a markdown table
//! cargo run --release --example memory -- --json  # JSON lines too
//! ```
//!
//! Each structure is built twice, with 5 and with 10 endpoints per service;
//! the difference gives the bytes per endpoint, the rest the bytes per
//! service. Bytes are the sizes requested from the allocator (its own
//! rounding and headers are not included).

#[path = "../benches/common/mod.rs"]
mod common;

use std::alloc::System;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use svclb::*;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const SERVICES: usize = 10_000;

/// Net bytes still allocated after `f` returns its value (which is kept
/// alive until the count is taken).
fn net_bytes<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let region = Region::new(GLOBAL);
    let value = f();
    let c = region.change();
    let net = c.bytes_allocated as isize + c.bytes_reallocated - c.bytes_deallocated as isize;
    (net.max(0) as usize, value)
}

/// (table, iptables, ipvs) bytes for `SERVICES` services with `eps`
/// endpoints each.
fn measure(eps: usize) -> [usize; 3] {
    let (table_bytes, table) = net_bytes(|| common::cluster(SERVICES, eps));
    let all = table.full_change_set();
    let (ipt_bytes, ipt) = net_bytes(|| {
        let dp = IptablesDataplane::new(DataplaneConfig::with_seed(1));
        dp.sync(&table, &all, Instant::ZERO);
        dp
    });
    let (ipvs_bytes, ipvs) = net_bytes(|| {
        let dp = IpvsDataplane::new(DataplaneConfig::with_seed(1));
        dp.sync(&table, &all, Instant::ZERO);
        dp
    });
    drop((ipt, ipvs, table));
    [table_bytes, ipt_bytes, ipvs_bytes]
}

fn main() {
    let json = std::env::args().skip(1).any(|a| a == "--json");
    let five = measure(5);
    let ten = measure(10);
    println!(
        "### Memory at {SERVICES} services, {} endpoints\n",
        SERVICES * 5
    );
    println!("| structure | total | bytes per service | bytes per endpoint |");
    println!("| --- | ---: | ---: | ---: |");
    let mut lines = Vec::new();
    for (k, name) in ["table", "iptables", "ipvs"].iter().enumerate() {
        let per_endpoint = (ten[k] as f64 - five[k] as f64) / (SERVICES * 5) as f64;
        let per_service = (five[k] as f64 - per_endpoint * (SERVICES * 5) as f64) / SERVICES as f64;
        let label = match *name {
            "table" => "`ServiceTable` (services, slices, merged endpoints)",
            "iptables" => "`IptablesDataplane` (compiled rules)",
            _ => "`IpvsDataplane` (virtual services, rr)",
        };
        println!(
            "| {label} | {:.1} MiB | {per_service:.0} | {per_endpoint:.0} |",
            five[k] as f64 / (1 << 20) as f64
        );
        lines.push(format!(
            r#"{{"mode":"{name}","services":{SERVICES},"endpoints":{},"bytes_total":{},"bytes_per_service":{per_service:.0},"bytes_per_endpoint":{per_endpoint:.0}}}"#,
            SERVICES * 5,
            five[k]
        ));
    }
    if json {
        for l in lines {
            println!("{l}");
        }
    }
}
