//! The bundled kubectl-style manifests (examples/manifests/), read through
//! the manifest parser into a table, then routed and resolved.
#![cfg(feature = "serde")]

use std::net::IpAddr;
use std::path::Path;

use svclb::k8s::dns::{Answer, ClusterDns, RecordType};
use svclb::k8s::manifest::{Manifest, Manifests};
use svclb::*;

fn load(file: &str) -> Manifests {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/manifests")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    Manifests::parse_str(&text, Some(file)).unwrap()
}

fn table() -> ServiceTable {
    let mut all = Manifests::new();
    for f in [
        "kafka.yaml",
        "web.yaml",
        "node-metrics.yaml",
        "checkout.yaml",
        "inference.json",
    ] {
        all.extend(load(f));
    }
    let batch = all.changes().unwrap();
    assert!(batch.skipped.is_empty());
    let mut t = ServiceTable::new();
    t.apply_batch(batch.changes).unwrap();
    t
}

#[test]
fn kubectl_yaml_with_server_fields_parses() {
    let m = load("kafka.yaml");
    assert_eq!(m.documents.len(), 2);
    assert_eq!(m.documents[1].origin.document, 2);
    let Manifest::Service(svc) = &m.documents[0].manifest else {
        panic!("first document is the service")
    };
    let svc = svc.to_service().unwrap();
    assert!(svc.is_headless());
    assert!(svc.publish_not_ready_addresses());
    let Manifest::EndpointSlice(slice) = &m.documents[1].manifest else {
        panic!("second document is the slice")
    };
    let slice = slice.to_endpoint_slice().unwrap();
    let hosts: Vec<_> = slice
        .endpoints()
        .iter()
        .map(|e| e.hostname().unwrap())
        .collect();
    assert_eq!(hosts, ["kafka-0", "kafka-1", "kafka-2"]);
    assert_eq!(
        slice.service(),
        &ServiceKey::new("messaging", "kafka-headless")
    );
}

#[test]
fn kubectl_json_list_with_managed_fields_parses() {
    let m = load("inference.json");
    assert_eq!(m.documents.len(), 2);
    assert_eq!(m.documents[1].origin.item, Some(1));
    let batch = m.changes().unwrap();
    assert_eq!(batch.origins.len(), 2);
    assert_eq!(batch.origins[1].item, Some(1));
    let Change::UpsertService(svc) = &batch.changes[0] else {
        panic!("services come first")
    };
    assert_eq!(
        svc.session_affinity(),
        SessionAffinity::ClientIp { timeout_secs: 3600 }
    );
}

#[test]
fn kafka_dns_answers() {
    let t = table();
    let dns = ClusterDns::default();
    let answer = dns
        .resolve(
            &t,
            "kafka-0.kafka-headless.messaging.svc.cluster.local",
            RecordType::A,
        )
        .unwrap();
    assert_eq!(
        answer.to_string(),
        "kafka-0.kafka-headless.messaging.svc.cluster.local. 5 IN A 10.244.1.8"
    );
    let all = dns
        .resolve(
            &t,
            "kafka-headless.messaging.svc.cluster.local",
            RecordType::A,
        )
        .unwrap();
    let ips: Vec<String> = all.records().iter().map(|r| r.data.to_string()).collect();
    assert_eq!(ips, ["10.244.1.8", "10.244.2.8", "10.244.3.8"]);
    let srv = dns
        .resolve(
            &t,
            "_kafka._tcp.kafka-headless.messaging.svc.cluster.local",
            RecordType::Srv,
        )
        .unwrap();
    assert_eq!(srv.records().len(), 3);
    assert!(
        srv.to_string()
            .contains("IN SRV 0 33 9092 kafka-2.kafka-headless.messaging.svc.cluster.local.")
    );
    assert_eq!(
        dns.resolve(
            &t,
            "kafka-3.kafka-headless.messaging.svc.cluster.local",
            RecordType::A
        ),
        Ok(Answer::NxDomain)
    );
    // A ClusterIP service resolves to its VIP.
    assert_eq!(
        dns.resolve(&t, "web.default.svc.cluster.local", RecordType::A)
            .unwrap()
            .to_string(),
        "web.default.svc.cluster.local. 5 IN A 10.96.0.10"
    );
}

#[test]
fn headless_services_are_not_proxied_and_policies_apply() {
    let t = table();
    let node = |n: &str, z: &str| DataplaneConfig::with_seed(7).node(NodeTopology::new(n, z));
    for dp in [
        Box::new(IptablesDataplane::new(node("node-a", "zone-a"))) as Box<dyn Dataplane>,
        Box::new(IpvsDataplane::new(node("node-a", "zone-a"))),
    ] {
        dp.sync(&t, &t.full_change_set(), Instant::ZERO);
        // The headless Kafka service has no VIP: its pod IPs are no service.
        assert_eq!(
            dp.candidates(Protocol::Tcp, "10.244.1.8:9092".parse().unwrap()),
            Candidates::NotAService
        );
        // Topology hints: a node in zone-a uses only zone-a's endpoints.
        assert_eq!(
            dp.candidates(Protocol::Tcp, "10.96.60.20:80".parse().unwrap()),
            Candidates::Endpoints(vec![
                "10.244.1.40:8080".parse().unwrap(),
                "10.244.1.41:8080".parse().unwrap()
            ])
        );
        // Local policy: only this node's exporter.
        assert_eq!(
            dp.candidates(Protocol::Tcp, "10.96.50.5:9100".parse().unwrap()),
            Candidates::Endpoints(vec!["10.244.1.30:9100".parse().unwrap()])
        );
    }
    // node-c runs no exporter: drop; it is in zone-b: two hinted endpoints.
    let dp = IptablesDataplane::new(node("node-c", "zone-b"));
    dp.sync(&t, &t.full_change_set(), Instant::ZERO);
    assert_eq!(
        dp.candidates(Protocol::Tcp, "10.96.50.5:9100".parse().unwrap()),
        Candidates::Drop
    );
    assert_eq!(
        dp.candidates(Protocol::Tcp, "10.96.60.20:80".parse().unwrap()),
        Candidates::Endpoints(vec![
            "10.244.2.40:8080".parse().unwrap(),
            "10.244.3.40:8080".parse().unwrap()
        ])
    );
    // A node whose zone has no hinted endpoint falls back to all of them.
    let dp = IptablesDataplane::new(node("node-z", "zone-z"));
    dp.sync(&t, &t.full_change_set(), Instant::ZERO);
    let Candidates::Endpoints(all) =
        dp.candidates(Protocol::Tcp, "10.96.60.20:80".parse().unwrap())
    else {
        panic!("endpoints expected")
    };
    assert_eq!(all.len(), 4);
}

#[test]
fn bad_manifest_names_file_document_object_and_field() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/manifests/web.yaml"),
    )
    .unwrap()
    .replace("port: 80\n", "port: 80000\n");
    let m = Manifests::parse_str(&text, Some("web.yaml")).unwrap();
    let err = m.changes().unwrap_err();
    assert_eq!(
        err.to_string(),
        "web.yaml: document 1: Service default/web: spec.ports[0].port: port 80000 is out of range (must be 1..=65535)"
    );
}

mod round_trip {
    use super::*;
    use proptest::prelude::*;
    use svclb::k8s::manifest::{EndpointSliceManifest, ServiceManifest};

    fn protocol() -> impl Strategy<Value = Protocol> {
        prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Sctp)
        ]
    }

    prop_compose! {
        fn service()(
            ports in prop::collection::vec((1i64..=65_535, protocol(), prop::option::of(1i64..=65_535), any::<bool>()), 1..4),
            ip in any::<[u8; 4]>(),
            v6 in prop::option::of(any::<u128>()),
            headless in any::<bool>(),
            affinity in prop::option::of(1i64..=86_400),
            local in any::<bool>(),
            dist in 0u8..3,
            topology in any::<bool>(),
            publish in any::<bool>(),
            // The external surface: type (ClusterIP, NodePort,
            // LoadBalancer), node ports, externalIPs, ingress IPs (ipMode
            // Proxy or VIP), a source range, eTP Local,
            // healthCheckNodePort, allocateLoadBalancerNodePorts: false.
            ext in (
                0u8..3,
                30_000i64..=31_000,
                prop::collection::vec(any::<u8>(), 0..3),
                prop::collection::vec((any::<u8>(), any::<bool>()), 0..3),
                prop::option::of(8u8..=32),
                any::<bool>(),
                prop::option::of(32_000i64..=32_767),
                any::<bool>(),
            ),
        ) -> Option<Service> {
            let (ty, node_port, external_ips, ingress, range, etp_local, hcnp, no_alloc) = ext;
            let ty = [ServiceType::ClusterIP, ServiceType::NodePort, ServiceType::LoadBalancer][usize::from(ty)];
            let external = ty != ServiceType::ClusterIP;
            let lb = ty == ServiceType::LoadBalancer;
            let mut b = Service::builder("ns-1", "svc-a").service_type(ty);
            for x in external_ips {
                b = b.external_ip(IpAddr::from([192, 168, 99, x]));
            }
            if lb {
                for (x, proxy) in ingress {
                    let mode = if proxy { IpMode::Proxy } else { IpMode::VIP };
                    b = b.load_balancer_ingress(IpAddr::from([198, 51, 100, x]), mode);
                }
                if let Some(len) = range {
                    b = b.load_balancer_source_range(format!("203.0.113.0/{}", len.max(24)).parse().unwrap());
                }
                if no_alloc {
                    b = b.allocate_load_balancer_node_ports(false);
                }
            }
            if external && etp_local {
                b = b.external_traffic_policy(TrafficPolicy::Local);
                if let (true, Some(h)) = (lb, hcnp) {
                    b = b.health_check_node_port(h);
                }
            }
            if headless {
                b = b.headless();
            } else {
                b = b.cluster_ip(IpAddr::from(ip));
                if let Some(v6) = v6 {
                    b = b.cluster_ip(IpAddr::from(std::net::Ipv6Addr::from(v6)));
                }
            }
            for (i, (port, proto, target, named_target)) in ports.into_iter().enumerate() {
                let mut p = ServicePortSpec::new(proto, port).name(format!("p{i}"));
                if external {
                    p = p.node_port(node_port + i64::try_from(i).unwrap());
                }
                p = match (target, named_target) {
                    (_, true) => p.target_port_name(format!("t{i}")),
                    (Some(t), false) => p.target_port(t),
                    (None, false) => p,
                };
                b = b.port(p);
            }
            if let Some(t) = affinity {
                b = b.client_ip_affinity(Some(t));
            }
            if local {
                b = b.internal_traffic_policy(TrafficPolicy::Local);
            }
            match dist {
                1 => b = b.traffic_distribution(TrafficDistribution::PreferSameZone),
                2 => b = b.traffic_distribution(TrafficDistribution::PreferSameNode),
                _ => {}
            }
            if topology {
                b = b.topology_mode("Auto");
            }
            // Builds that the model refuses (duplicate port/protocol) are skipped.
            b.publish_not_ready_addresses(publish).build().ok()
        }
    }

    prop_compose! {
        fn slice()(
            ports in prop::collection::vec((0i64..=65_535, protocol()), 0..3),
            // Any address the API accepts as an endpoint (not unspecified,
            // loopback, link-local or link-local multicast).
            eps in prop::collection::btree_set(any::<u32>().prop_filter("a non-special IP", |ip| {
                let a = std::net::Ipv4Addr::from(*ip);
                !(a.is_unspecified() || a.is_loopback() || a.is_link_local() || a.octets()[..3] == [224, 0, 0])
            }), 0..6),
            flags in prop::collection::vec((prop::option::of(any::<bool>()), prop::option::of(any::<bool>()), prop::option::of(any::<bool>()), any::<bool>(), 0u8..3), 6),
        ) -> EndpointSlice {
            let mut b = EndpointSlice::builder("ns-1", "svc-a-x1", "svc-a", AddressType::IPv4);
            for (i, (port, proto)) in ports.into_iter().enumerate() {
                b = b.port(SlicePortSpec::new(proto, port).name(format!("p{i}")));
            }
            for (ip, (ready, serving, terminating, host, zone)) in eps.into_iter().zip(flags) {
                let mut e = EndpointSpec::new(std::net::Ipv4Addr::from(ip).to_string());
                e.conditions = Conditions { ready, serving, terminating };
                if host {
                    e = e.hostname(format!("h-{ip}"));
                }
                if zone > 0 {
                    e = e.zone(format!("zone-{zone}")).hint_zone(format!("zone-{zone}")).node(format!("node-{zone}"));
                }
                if zone > 1 {
                    e = e.hint_node(format!("node-{zone}"));
                }
                b = b.endpoint(e);
            }
            b.build().unwrap()
        }
    }

    proptest! {
        /// model -> manifest -> YAML/JSON -> manifest -> model is the identity.
        #[test]
        fn services_round_trip(svc in service()) {
            let Some(svc) = svc else { return Ok(()) };
            let m = Manifest::Service(ServiceManifest::from(&svc));
            for text in [m.to_yaml().unwrap(), m.to_json().unwrap()] {
                let back = Manifests::parse_str(&text, None).unwrap().changes().unwrap();
                prop_assert_eq!(&back.changes, &vec![Change::UpsertService(svc.clone())], "{}", text);
            }
        }

        #[test]
        fn slices_round_trip(slice in slice()) {
            let m = Manifest::EndpointSlice(EndpointSliceManifest::from(&slice));
            for text in [m.to_yaml().unwrap(), m.to_json().unwrap()] {
                let back = Manifests::parse_str(&text, None).unwrap().changes().unwrap();
                prop_assert_eq!(&back.changes, &vec![Change::UpsertSlice(slice.clone())], "{}", text);
            }
        }
    }
}
