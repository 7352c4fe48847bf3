//! The `ebpf` mode predicts the kernel program: for every new connection,
//! the dataplane's backend equals what `ebpf::model` computes over the
//! frontend spec the map writer writes from the plan.

use std::net::SocketAddr;

use svclb::ebpf::model::{CompiledFrontend, EbpfVerdict, frontend_spec, outcome};
use svclb::*;

#[test]
fn the_ebpf_mode_picks_what_the_kernel_model_picks() {
    let mut t = ServiceTable::new();
    t.apply_batch([
        Change::UpsertService(
            Service::builder("default", "web")
                .cluster_ip("10.96.0.10".parse().unwrap())
                .port(ServicePortSpec::tcp(80).name("http").target_port(8080))
                .port(ServicePortSpec::udp(53).name("dns"))
                .build()
                .unwrap(),
        ),
        Change::UpsertSlice(
            EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
                .port(SlicePortSpec::tcp(8080).name("http"))
                .port(SlicePortSpec::udp(53).name("dns"))
                .endpoints((1..=7).map(|j| EndpointSpec::new(format!("10.1.0.{j}"))))
                .endpoint(
                    EndpointSpec::new("10.1.0.9")
                        .ready(false)
                        .serving(true)
                        .terminating(true),
                )
                .build()
                .unwrap(),
        ),
    ])
    .unwrap();
    let dp = IpvsDataplane::ebpf_model(DataplaneConfig::with_seed(1));
    assert_eq!(dp.mode(), Mode::Ebpf);
    dp.sync(&t, &t.full_change_set(), Instant::ZERO);
    let plan = Planner::compile(&t, &NodeTopology::default());
    let mut spread = std::collections::BTreeMap::new();
    for (proto, vip) in [
        (Protocol::Tcp, "10.96.0.10:80"),
        (Protocol::Udp, "10.96.0.10:53"),
    ] {
        let vip: SocketAddr = vip.parse().unwrap();
        let fe = plan.frontend_by_key(&vip, proto).unwrap();
        let spec = frontend_spec(fe);
        assert_eq!(spec.backends.len(), 8, "7 active and 1 draining");
        let compiled = CompiledFrontend::compile(&spec, fe.id().0 + 1, None).unwrap();
        for k in 0..3000u32 {
            let f = Flow::new(
                proto,
                SocketAddr::from(([10, 2, (k >> 8) as u8, k as u8], 20_000 + k as u16)),
                vip,
            );
            let want = match outcome(&compiled, &f) {
                EbpfVerdict::Forward { addr, .. } => Some(addr),
                _ => None,
            };
            let got = dp.route(&f, Instant::ZERO).backend();
            assert_eq!(got, want, "{f}");
            assert_ne!(
                got,
                Some("10.1.0.9:8080".parse().unwrap()),
                "draining takes none"
            );
            *spread.entry(got).or_insert(0) += 1;
        }
    }
    assert!(spread.len() >= 7, "{spread:?}");
}
