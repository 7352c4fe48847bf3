//! Session affinity in a few steps: a `ClientIP` service, clients that stay
//! on their endpoint, a NAT that funnels hundreds of users through one
//! address, the hotspot report that finds it, and the fix (a cookie key).
//!
//! Run with `cargo run --release --example affinity`.

use svclb::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut table = ServiceTable::new();
    let shop = Service::builder("default", "shop")
        .cluster_ip("10.96.0.30".parse()?)
        .port(ServicePortSpec::tcp(443).name("https").target_port(8443))
        .client_ip_affinity(Some(1800))
        .build()?;
    let slice = EndpointSlice::builder("default", "shop-1", "shop", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8443).name("https"))
        .endpoints((1..=4).map(|i| EndpointSpec::new(format!("10.244.0.{i}"))))
        .build()?;
    let changes = table.apply_batch([Change::UpsertService(shop), Change::UpsertSlice(slice)])?;
    let dp = IpvsDataplane::new(DataplaneConfig::with_seed(7));
    dp.sync(&table, &changes, Instant::ZERO);
    let key = ServiceKey::new("default", "shop");
    let vip: std::net::SocketAddr = "10.96.0.30:443".parse()?;

    // 2,000 clients connect one to three times over ten minutes; one NAT
    // address carries a sixth of all connections.
    let rng = SeededRng::new(1);
    let nat = Flow::tcp("203.0.113.9:1024".parse()?, vip);
    let mut ms = 0u64;
    for round in 0..3 {
        for c in 0..2_000u32 {
            let src =
                std::net::SocketAddr::from((std::net::Ipv4Addr::from(0x0A02_0000 + c), 40_000));
            if round == 0 || rng.below(2) == 0 {
                dp.route(&Flow::tcp(src, vip), Instant::from_millis(ms));
            }
            if rng.below(6) == 0 {
                dp.route(&nat, Instant::from_millis(ms));
            }
            ms += 100;
        }
    }
    let now = Instant::from_millis(ms);

    println!("== the first live entries (ipvsadm -ln --persistent-conn)");
    for e in dp.affinity_entries(&key, now).iter().take(3) {
        println!("{e}");
    }

    println!("\n== the hotspot report");
    print!(
        "{}",
        dp.affinity_report(&key, now).expect("a ClientIP service")
    );

    // The fix: pin a session cookie instead of the address.
    let shop = Service::builder("default", "shop")
        .cluster_ip("10.96.0.30".parse()?)
        .port(ServicePortSpec::tcp(443).name("https").target_port(8443))
        .client_ip_affinity(Some(1800))
        .affinity_key(AffinityKeyKind::Caller)
        .build()?;
    let changes = table.apply(Change::UpsertService(shop))?;
    dp.sync(&table, &changes, Instant::ZERO);
    println!("\n== with affinity key `caller` (a cookie hash per session)");
    for cookie in [0xA11CE_u64, 0xB0B, 0xCAFE, 0xD00D] {
        let first = dp.route_with_key(&nat, Some(cookie), now);
        let again = dp.route_with_key(&nat, Some(cookie), now);
        println!("session {cookie:#07x} behind 203.0.113.9: {first}, then {again}");
    }
    Ok(())
}
