//! Replies find their connection through the connection layer's reply
//! index (backend -> the frontends listing it), published per sync without
//! the planner's lock. Proptest against a naive model: scan every tracked
//! connection for the one whose client and backend the reply names.

use std::net::SocketAddr;

use proptest::prelude::*;
use svclb::*;

/// Backend IPs shared by the services, each listening on 8080.
const BACKENDS: [&str; 4] = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"];
const SERVICES: usize = 3;

fn vip(s: usize) -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 10 + s as u8], 80))
}

fn service(s: usize) -> Service {
    Service::builder("default", format!("svc{s}"))
        .cluster_ip(vip(s).ip())
        .port(ServicePortSpec::tcp(80).target_port(8080))
        .build()
        .unwrap()
}

fn slice(s: usize, members: u8) -> EndpointSlice {
    EndpointSlice::builder(
        "default",
        format!("svc{s}-1"),
        format!("svc{s}"),
        AddressType::IPv4,
    )
    .port(SlicePortSpec::tcp(8080))
    .endpoints(
        BACKENDS
            .iter()
            .enumerate()
            .filter(|(i, _)| members & (1 << i) != 0)
            .map(|(_, ip)| EndpointSpec::new(*ip)),
    )
    .build()
    .unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    /// Service `s` now has the backends in the bit mask.
    Endpoints(usize, u8),
    /// A new connection from client `c` to service `s`.
    Connect(u8, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..SERVICES, 0u8..16).prop_map(|(s, m)| Op::Endpoints(s, m)),
        (0u8..4, 0..SERVICES).prop_map(|(c, s)| Op::Connect(c, s)),
    ]
}

fn check(dp: &dyn Dataplane, now: Instant) -> Result<(), TestCaseError> {
    let tracked = dp.connections(now);
    // Every tracked connection is found from its reply, and nothing else is.
    for t in &tracked {
        let reply = Flow::tcp(t.backend_addr, t.flow.src);
        let found = dp.peek_reply(&reply, now);
        prop_assert_eq!(found.map(|f| f.flow), Some(t.flow), "{:?}", dp.mode());
    }
    for b in BACKENDS {
        let backend = SocketAddr::new(b.parse().unwrap(), 8080);
        let stranger = Flow::tcp(backend, "10.2.9.9:1".parse().unwrap());
        prop_assert_eq!(dp.peek_reply(&stranger, now), None);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn replies_find_exactly_the_tracked_connections(ops in proptest::collection::vec(op(), 1..40)) {
        let config = DataplaneConfig::with_seed(7);
        let dps: Vec<Box<dyn Dataplane>> = vec![
            Box::new(IptablesDataplane::new(config.clone())),
            Box::new(IpvsDataplane::new(config.clone())),
            Box::new(NftablesDataplane::new(config)),
        ];
        let mut table = ServiceTable::new();
        let mut batch = Vec::new();
        for s in 0..SERVICES {
            batch.push(Change::UpsertService(service(s)));
            batch.push(Change::UpsertSlice(slice(s, 0b0011)));
        }
        let changes = table.apply_batch(batch).unwrap();
        let now = Instant::ZERO;
        for dp in &dps {
            dp.sync(&table, &changes, now);
        }
        let mut port = 10_000u16;
        for op in ops {
            match op {
                Op::Endpoints(s, m) => {
                    let changes = table.apply_batch([Change::UpsertSlice(slice(s, m))]).unwrap();
                    for dp in &dps {
                        dp.sync(&table, &changes, now);
                    }
                }
                Op::Connect(c, s) => {
                    port += 1;
                    let client = SocketAddr::from(([10, 2, 0, c + 1], port));
                    for dp in &dps {
                        let _ = dp.packet(&Flow::tcp(client, vip(s)), TcpFlags::SYN, now);
                    }
                }
            }
            for dp in &dps {
                check(dp.as_ref(), now)?;
            }
        }
    }
}
