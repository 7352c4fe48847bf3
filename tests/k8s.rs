//! The bundled kubectl-style manifests (examples/manifests/), read through
//! the manifest parser into a table, then routed and resolved.
#![cfg(feature = "serde")]

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
        dp.sync(&t, &t.full_change_set());
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
    dp.sync(&t, &t.full_change_set());
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
    dp.sync(&t, &t.full_change_set());
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
