//! What kube-proxy's partial syncs save: the bytes a sync writes after one
//! change against a full rewrite, at a cluster's size (issue 12 part 4).
//!
//! Builds N services (one TCP port, K endpoints each), does the first
//! (full) sync with `render::iptables::Syncer` and `render::nft::Syncer`,
//! then one sync after each change below, and prints per sync the bytes
//! written, the bytes of a full rewrite of the same table and the time the
//! sync took (one run, wall clock):
//!
//! ```text
//! cargo run --release --example partial_syncs -- --services 10000 --endpoints 3
//! ```
//!
//! `--load-balancer-every M` makes every Mth service (0, M, 2M, ...) a
//! LoadBalancer service with a node port and an ingress IP; every other
//! one of those has `externalTrafficPolicy: Local` and a source range
//! (default 0: cluster IPs only):
//!
//! ```text
//! cargo run --release --example partial_syncs -- --services 10000 --endpoints 3 --load-balancer-every 10
//! ```
//!
//! The syncs are one simulated second apart, so in large cluster mode
//! (more than 1000 endpoints) the iptables syncer does not delete stale
//! chains until a sync period (30 s) has passed, as kube-proxy does.

use std::time::Instant as Clock;

use svclb::render::{RenderOptions, iptables, nft};
use svclb::*;

fn service(i: usize, lb_every: usize) -> Change {
    let mut b = Service::builder(format!("ns{}", i % 100), format!("svc{i}")).cluster_ip(
        format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256)
            .parse()
            .unwrap(),
    );
    let mut port = ServicePortSpec::tcp(80).name("http");
    if lb_every > 0 && i % lb_every == 0 {
        let j = i / lb_every;
        let node_port = 30_000 + i64::try_from(j).unwrap();
        port = port.node_port(node_port);
        b = b
            .service_type(ServiceType::LoadBalancer)
            .load_balancer_ingress(
                format!("172.16.{}.{}", (j / 256) % 256, j % 256)
                    .parse()
                    .unwrap(),
                IpMode::VIP,
            );
        if j % 2 == 1 {
            b = b
                .external_traffic_policy(TrafficPolicy::Local)
                .load_balancer_source_range("203.0.113.0/24".parse().unwrap());
        }
    }
    Change::UpsertService(b.port(port).build().unwrap())
}

fn slice(i: usize, k: usize, generation: usize) -> Change {
    Change::UpsertSlice(
        EndpointSlice::builder(
            format!("ns{}", i % 100),
            format!("svc{i}-1"),
            format!("svc{i}"),
            AddressType::IPv4,
        )
        .port(SlicePortSpec::tcp(8080).name("http"))
        .endpoints((0..k).map(|e| {
            let n = i * k + e + generation * 7919;
            EndpointSpec::new(format!(
                "10.{}.{}.{}",
                128 + (n / 65536) % 64,
                (n / 256) % 256,
                n % 256
            ))
        }))
        .build()
        .unwrap(),
    )
}

struct Syncs {
    ipt: iptables::Syncer,
    nft: nft::Syncer,
    opts: RenderOptions,
    at: u64,
}

impl Syncs {
    fn sync(&mut self, table: &ServiceTable, what: &str) {
        self.at += 1;
        let now = Instant::from_secs(self.at);
        let t = Clock::now();
        let ipt = self.ipt.sync(table, now);
        let ipt_time = t.elapsed();
        let t = Clock::now();
        let nft = self.nft.sync(table, now);
        let nft_time = t.elapsed();
        let ipt_full = iptables::render(table, &self.opts).len();
        let nft_full = nft::render(table, &self.opts).len();
        let pct = |a: usize, b: usize| 100.0 * a as f64 / b as f64;
        println!(
            "{what}: iptables {} bytes ({:.3}% of a full {ipt_full}, {} services, {:.1} ms), nft {} bytes ({:.3}% of a full {nft_full}, {} services, {:.1} ms)",
            ipt.text.len(),
            pct(ipt.text.len(), ipt_full),
            ipt.services_written,
            ipt_time.as_secs_f64() * 1e3,
            nft.text.len(),
            pct(nft.text.len(), nft_full),
            nft.services_written,
            nft_time.as_secs_f64() * 1e3,
        );
    }
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {v}"))
        })
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n = arg(&args, "--services", 10_000);
    let k = arg(&args, "--endpoints", 3);
    let lb = arg(&args, "--load-balancer-every", 0);
    assert!(n >= 200, "--services: at least 200");
    assert!(
        lb == 0 || n / lb < 2_767,
        "--load-balancer-every: more node ports than 30000-32767 holds"
    );
    let mut table = ServiceTable::new();
    table
        .apply_batch((0..n).flat_map(|i| [service(i, lb), slice(i, k, 0)]))
        .unwrap();
    let opts = RenderOptions::default();
    let mut s = Syncs {
        ipt: iptables::Syncer::new(opts.clone()),
        nft: nft::Syncer::new(opts.clone()),
        opts,
        at: 0,
    };
    if lb > 0 {
        println!(
            "partial syncs at {n} services ({} LoadBalancer), {k} endpoints each",
            n.div_ceil(lb)
        );
    } else {
        println!("partial syncs at {n} services, {k} endpoints each");
    }
    s.sync(&table, "first sync (full)");
    s.sync(&table, "no change");
    table.apply(slice(7, k, 1)).unwrap();
    s.sync(&table, "one service's endpoints change");
    if lb > 0 {
        table.apply(slice(lb, k, 1)).unwrap();
        s.sync(&table, "one LoadBalancer service's endpoints change");
    }
    table.apply(service(n, 0)).unwrap();
    table.apply(slice(n, k, 0)).unwrap();
    s.sync(&table, "one service added");
    table
        .apply(Change::DeleteService(ServiceKey::new("ns13", "svc13")))
        .unwrap();
    s.sync(&table, "one service deleted");
    table
        .apply_batch((100..200).map(|i| slice(i, k, 2)))
        .unwrap();
    s.sync(&table, "100 services' endpoints change");
    s.ipt.force_full_sync();
    s.nft.force_full_sync();
    s.sync(&table, "forced full resync");
}
