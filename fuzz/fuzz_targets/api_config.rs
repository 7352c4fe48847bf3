//! `api_config`: the public API's configuration paths with arbitrary
//! values, and a custom scheduler.
//!
//! From the input it builds an `AffinityConfig` (every setter, any value,
//! a fixed or OS hash key), `RenderOptions` (masquerade bit, CIDRs parsed
//! from arbitrary text), a `DataplaneConfig` with any seed and a built-in
//! or custom scheduler, and a service and slice from arbitrary ports,
//! timeouts and weights. Then it syncs iptables, IPVS and nftables mode,
//! routes and closes flows at arbitrary times, renders, and reads the
//! affinity report.
//!
//! It checks that nothing panics, that every setter refuses exactly the
//! values its docs say it refuses, and that a forwarded backend is an
//! endpoint of the slice. The custom scheduler returns in-range indices or
//! `None`; out-of-range indices are the dataplane rewrite's to handle.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use svclb::render::{Cidr, IpFamily, RenderOptions, masquerade_mark};
use svclb::scheduler::{Destination, PickContext, Scheduler, SchedulerFactory};
use svclb::*;

/// A scheduler whose choice comes from the input (bounded to the
/// destinations), to drive the custom-scheduler path of every dataplane.
#[derive(Debug)]
struct Scripted {
    choices: Vec<u8>,
}

impl Scheduler for Scripted {
    fn pick(&self, dests: &[Destination], ctx: &PickContext<'_>) -> Option<usize> {
        if dests.is_empty() || self.choices.is_empty() {
            return None;
        }
        let c = self.choices[ctx.rng.below(self.choices.len() as u64) as usize];
        (c != u8::MAX).then_some(usize::from(c) % dests.len())
    }
}

#[derive(Debug)]
struct ScriptedFactory {
    choices: Vec<u8>,
}

impl SchedulerFactory for ScriptedFactory {
    fn name(&self) -> &str {
        "scripted"
    }
    fn build(&self, _dests: &[Destination]) -> Box<dyn Scheduler> {
        Box::new(Scripted {
            choices: self.choices.clone(),
        })
    }
}

fn affinity(u: &mut Unstructured<'_>) -> Result<AffinityConfig> {
    let cap: usize = u.int_in_range(0..=1 << 12)?;
    let Ok(mut c) = AffinityConfig::new(cap) else {
        assert_eq!(cap, 0, "AffinityConfig::new refused {cap}");
        return Ok(AffinityConfig::default());
    };
    let shards: usize = u.arbitrary()?;
    match c.clone().shards(shards) {
        Ok(x) => c = x,
        Err(_) => assert!(!(shards.is_power_of_two() && shards <= 1024)),
    }
    let reap: usize = u.arbitrary()?;
    match c.clone().reap_batch(reap) {
        Ok(x) => c = x,
        Err(_) => assert!(!(1..=64).contains(&reap)),
    }
    let per: usize = u.int_in_range(0..=1 << 12)?;
    match c.clone().per_service_capacity(per) {
        Ok(x) => c = x,
        Err(_) => assert_eq!(per, 0),
    }
    let factor = f64::from_bits(u.arbitrary()?);
    let min: u64 = u.arbitrary()?;
    match c.clone().hotspot_thresholds(factor, min) {
        Ok(x) => c = x,
        Err(_) => assert!(!(factor.is_finite() && factor >= 1.0)),
    }
    if u.arbitrary()? {
        c = c.hash_key(u.arbitrary()?);
    }
    Ok(c)
}

fn render_options(u: &mut Unstructured<'_>) -> Result<RenderOptions> {
    let bit: u8 = u.arbitrary()?;
    let mark = masquerade_mark(bit);
    assert_eq!(mark.is_ok(), bit <= 31);
    let mut opts = RenderOptions::default()
        .family(if u.arbitrary()? {
            IpFamily::V4
        } else {
            IpFamily::V6
        })
        .random_fully(u.arbitrary()?)
        .builtin_jumps(u.arbitrary()?);
    if let Ok(m) = mark {
        opts = opts.masquerade_mark(m);
    }
    for _ in 0..u.int_in_range(0..=2)? {
        let text: &str = u.arbitrary()?;
        if let Ok(c) = Cidr::parse("clusterCIDR", text) {
            assert!(c.contains(c.addr()));
            opts = opts.cluster_cidr(c);
        }
    }
    Ok(opts)
}

fn table(u: &mut Unstructured<'_>) -> Result<ServiceTable> {
    let mut b = Service::builder("default", "web")
        .cluster_ip(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)))
        .port(ServicePortSpec::tcp(u.int_in_range(-2..=65_537)?).target_port(8080));
    if u.arbitrary()? {
        b = b.client_ip_affinity(Some(u.int_in_range(-1..=86_401)?));
        b = b.affinity_key(match u.int_in_range(0..=2)? {
            0 => AffinityKeyKind::ClientIp,
            1 => AffinityKeyKind::ClientIpPort,
            _ => AffinityKeyKind::Caller,
        });
    }
    let mut slice = EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080));
    for i in 0..u.int_in_range(0..=6)? {
        slice = slice.endpoint(
            EndpointSpec::new(format!("10.1.0.{}", i + 1))
                .weight(u.int_in_range(-1..=65_536)?)
                .ready(u.arbitrary()?),
        );
    }
    let mut t = ServiceTable::new();
    if let (Ok(svc), Ok(slice)) = (b.build(), slice.build()) {
        t.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)])
            .expect("a valid service and its slice are accepted");
    }
    Ok(t)
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let affinity = affinity(u)?;
    let opts = render_options(u)?;
    let t = table(u)?;
    let scheduler: SchedulerConfig = if u.arbitrary()? {
        SchedulerConfig::Custom(Arc::new(ScriptedFactory {
            choices: u.arbitrary()?,
        }))
    } else {
        let all = SchedulerKind::ALL;
        all[u.choose_index(all.len())?].into()
    };
    let config = DataplaneConfig::with_seed(u.arbitrary()?)
        .affinity(affinity.clone())
        .scheduler(scheduler);
    let dps: [Box<dyn Dataplane>; 3] = [
        Box::new(IptablesDataplane::new(config.clone())),
        Box::new(IpvsDataplane::new(config.clone())),
        Box::new(NftablesDataplane::new(config)),
    ];
    let all = t.full_change_set();
    let flows: Vec<(Flow, Option<u64>, Instant)> = (0..u.int_in_range(0..=32)?)
        .map(|_| {
            let src = SocketAddr::from((Ipv4Addr::from(u.arbitrary::<u32>()?), u.arbitrary()?));
            let dst = SocketAddr::from(([10, 96, 0, 1], u.arbitrary()?));
            Ok((
                Flow::tcp(src, dst),
                u.arbitrary()?,
                Instant::from_nanos(u.arbitrary()?),
            ))
        })
        .collect::<Result<_>>()?;
    let key = ServiceKey::new("default", "web");
    for dp in &dps {
        dp.sync(&t, &all, Instant::ZERO);
        for (f, k, now) in &flows {
            if let Some(b) = dp.route_with_key(f, *k, *now).backend() {
                assert!(
                    b.ip().to_string().starts_with("10.1.0.") && b.port() == 8080,
                    "{}: forwarded to {b}",
                    dp.mode()
                );
                let _ = dp.packet(f, TcpFlags::from_bits(k.unwrap_or(0x10) as u8 & 0x17), *now);
                dp.handle_timeout(*now);
                dp.connection_closed(f, *now);
            }
        }
        let _ = dp.affinity_report(&key, Instant::ZERO);
        let _ = dp.affinity_entries(&key, Instant::ZERO);
    }
    let _ = svclb::render::iptables::render(&t, &opts);
    let _ = svclb::render::nft::render(&t, &opts);

    // The affinity table alone, with its scope timeout from the input.
    let table = AffinityTable::new(affinity, u.arbitrary()?);
    let scope = table.new_scope(Duration::from_nanos(u.arbitrary()?));
    let backend: SocketAddr = "10.1.0.1:8080".parse().unwrap();
    while !u.is_empty() {
        let k = AffinityKey::Caller(u.arbitrary()?);
        let now = Instant::from_nanos(u.arbitrary()?);
        assert!(table.shard_index(&scope, k) < table.shards());
        let _ = table.route(
            &scope,
            k,
            now,
            |e| (e == backend).then_some(0),
            || Some((0, backend)),
        );
        assert!(table.len() <= table.capacity());
    }
    let rng = SeededRng::new(0);
    let n: u64 = u.arbitrary().unwrap_or(0);
    assert!(rng.below(n) < n.max(1));
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
