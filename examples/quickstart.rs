//! The smallest embedding of svclb: two services built in code, a few flows
//! routed through both dataplanes, and the verdicts printed.
//!
//! Run with `cargo run --release --example quickstart`.

use svclb::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The control plane: services and endpoint slices, applied as a batch.
    let mut table = ServiceTable::new();
    let web = Service::builder("default", "web")
        .cluster_ip("10.96.0.10".parse()?)
        .port(
            ServicePortSpec::tcp(80)
                .name("http")
                .target_port_name("http"),
        )
        .build()?;
    let web_slice = EndpointSlice::builder("default", "web-x7k2p", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080).name("http"))
        .endpoint(EndpointSpec::new("10.244.1.5").node("node-a"))
        .endpoint(EndpointSpec::new("10.244.2.7").node("node-b"))
        .endpoint(EndpointSpec::new("10.244.3.9").node("node-c"))
        .build()?;
    let db = Service::builder("default", "db")
        .cluster_ip("10.96.0.20".parse()?)
        .port(ServicePortSpec::tcp(5432))
        .build()?;
    let changes = table.apply_batch([
        Change::UpsertService(web),
        Change::UpsertSlice(web_slice),
        Change::UpsertService(db), // no endpoints yet: rejects
    ])?;

    // 2. Two dataplanes behind one trait, with a fixed seed.
    let config = DataplaneConfig::with_seed(42).node(NodeTopology::new("node-a", "zone-1"));
    let dataplanes: [Box<dyn Dataplane>; 2] = [
        Box::new(IptablesDataplane::new(config.clone())),
        Box::new(IpvsDataplane::new(
            config.scheduler(SchedulerKind::RoundRobin),
        )),
    ];
    for dp in &dataplanes {
        dp.sync(&table, &changes, Instant::ZERO);
    }

    // 3. Flows, as the caller's packet path would extract them.
    let flows = [
        Flow::tcp("10.0.0.1:40001".parse()?, "10.96.0.10:80".parse()?),
        Flow::tcp("10.0.0.1:40002".parse()?, "10.96.0.10:80".parse()?),
        Flow::tcp("10.0.0.2:40003".parse()?, "10.96.0.10:80".parse()?),
        Flow::tcp("10.0.0.3:40004".parse()?, "10.96.0.10:80".parse()?),
        Flow::tcp("10.0.0.1:40005".parse()?, "10.96.0.20:5432".parse()?),
        Flow::tcp("10.0.0.1:40006".parse()?, "1.1.1.1:443".parse()?),
    ];
    let now = Instant::from_secs(0);
    for dp in &dataplanes {
        println!("== {} mode", dp.mode());
        for f in &flows {
            println!("{:<44} {}", f.to_string(), dp.route(f, now));
        }
    }

    // 4. An endpoint goes away: one slice update, both dataplanes follow.
    let shrunk = EndpointSlice::builder("default", "web-x7k2p", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080).name("http"))
        .endpoint(EndpointSpec::new("10.244.1.5").node("node-a"))
        .endpoint(
            EndpointSpec::new("10.244.2.7")
                .node("node-b")
                .ready(false)
                .terminating(true),
        )
        .build()?;
    let changes = table.apply(Change::UpsertSlice(shrunk))?;
    println!("== after 10.244.2.7 starts terminating and 10.244.3.9 is removed");
    for dp in &dataplanes {
        dp.sync(&table, &changes, Instant::ZERO);
        let c = dp.candidates(Protocol::Tcp, "10.96.0.10:80".parse()?);
        println!("{:<8} candidates for 10.96.0.10:80: {c:?}", dp.mode());
    }
    Ok(())
}
