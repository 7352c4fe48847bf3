//! Kubernetes input as it really arrives: watch streams in kubectl's
//! recorded formats, manifests as people apply them (no clusterIP, other
//! kinds mixed in, legacy Endpoints), and random interleavings of watch
//! events, through `k8s::loader`.
#![cfg(feature = "serde")]

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use svclb::k8s::loader::{LoadOptions, Loader, Note};
use svclb::*;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn addrs(t: &ServiceTable, ns: &str, name: &str) -> Vec<String> {
    t.view(&ServiceKey::new(ns, name)).unwrap().ports()[0]
        .endpoints()
        .iter()
        .map(|e| e.addr().to_string())
        .collect()
}

/// The recorded stream: a slice before its service, a BOOKMARK, a
/// MODIFIED, a stale MODIFIED (resourceVersion 109 after 110), a service
/// DELETED before the garbage collector's slice delete, an ERROR, and a
/// delete of a slice never seen. JSON and YAML give the same table.
#[test]
fn recorded_watch_stream_json_and_yaml() {
    let mut tables = Vec::new();
    for file in ["watch/events.json", "watch/events.yaml"] {
        let mut t = ServiceTable::new();
        let mut loader = Loader::default();
        let f = std::fs::File::open(fixture(file)).unwrap();
        let report = loader.apply_watch_reader(&mut t, f, file).unwrap();
        assert_eq!(t.len(), 1, "{file}");
        assert_eq!(
            addrs(&t, "shop", "web"),
            ["10.244.1.20:8080", "10.244.1.21:8080"]
        );
        assert_eq!(t.pending_slices().count(), 0);
        let stale: Vec<&Note> = report
            .notes
            .iter()
            .filter(|n| matches!(n, Note::Stale(_)))
            .collect();
        assert_eq!(stale.len(), 1, "{:#?}", report.notes);
        assert!(
            stale[0]
                .to_string()
                .contains("resourceVersion 109 is older than 110")
        );
        assert!(
            report
                .notes
                .iter()
                .any(|n| matches!(n, Note::WatchError(e) if e.message.contains("410 Expired")))
        );
        assert!(report.notes.iter().any(|n| matches!(
            n,
            Note::Table(ChangeNote::AbsentDelete { kind: "EndpointSlice", key }) if key == "shop/web-old12"
        )));
        let lines = report.lines(false);
        assert!(lines.iter().any(|l| l.contains("BOOKMARK")), "{lines:#?}");
        tables.push(t.snapshot());
    }
    assert_eq!(tables[0], tables[1]);
}

fn load_applied() -> (ServiceTable, Vec<Note>) {
    let mut t = ServiceTable::new();
    let report = Loader::default()
        .load(&mut t, &[fixture("applied")], &[])
        .unwrap();
    (t, report.notes)
}

/// Manifests in the shapes of ingress-nginx's deploy.yaml, kube-prometheus's
/// manifests/ and the kubernetes/website examples load: Services without
/// clusterIP get addresses (the same ones run after run), other kinds are
/// skipped, Endpoints of a selector-less service are mirrored.
#[test]
fn manifests_as_applied_load_with_stable_ips() {
    let (t, notes) = load_applied();
    let (again, _) = load_applied();
    assert_eq!(t.snapshot(), again.snapshot());
    let keys: Vec<String> = t.keys_sorted().iter().map(ToString::to_string).collect();
    assert_eq!(
        keys,
        [
            "default/my-dual-service",
            "default/my-manual-service",
            "default/my-nginx-svc",
            "default/my-service",
            "ingress-nginx/ingress-nginx-controller",
            "ingress-nginx/ingress-nginx-controller-admission",
            "monitoring/alertmanager-main",
            "monitoring/grafana",
            "monitoring/node-exporter",
            "monitoring/prometheus-k8s",
            // An ExternalName service (the website's my-database) enters
            // the table for DNS; it has no cluster IP and no frontend.
            "prod/my-database",
        ]
    );
    assert_eq!(
        t.service(&ServiceKey::new("prod", "my-database"))
            .unwrap()
            .external_name(),
        Some("my.database.example.com")
    );
    // Pinned: the hash and the probing are part of the contract.
    let ip = |ns: &str, n: &str| {
        t.service(&ServiceKey::new(ns, n))
            .unwrap()
            .cluster_ip()
            .addrs()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(ip("default", "my-service"), ["10.110.84.71"]);
    assert_eq!(
        ip("default", "my-dual-service"),
        ["10.109.184.202", "fd00:10:96::dfee"]
    );
    let mut all: Vec<String> = t
        .keys_sorted()
        .iter()
        .flat_map(|k| ip(&k.namespace, &k.name))
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "assigned IPs are distinct");
    let assigned = notes
        .iter()
        .filter(|n| matches!(n, Note::Assigned { .. }))
        .count();
    assert_eq!(assigned, 9, "all but the headless node-exporter");
    assert_eq!(
        addrs(&t, "default", "my-service"),
        ["10.4.5.6:9376", "10.4.5.7:9376"]
    );
    assert_eq!(addrs(&t, "default", "my-manual-service"), ["10.4.5.8:9376"]);
    let svc = t
        .service(&ServiceKey::new("monitoring", "prometheus-k8s"))
        .unwrap();
    assert_eq!(
        svc.session_affinity(),
        SessionAffinity::ClientIp {
            timeout_secs: 10_800
        }
    );
    let ipvs = IpvsDataplane::new(DataplaneConfig::with_seed(1));
    ipvs.sync(&t, &t.full_change_set(), Instant::ZERO);
    let dst = format!("{}:80", ip("default", "my-service")[0]);
    let flow = Flow::tcp("10.2.0.9:40000".parse().unwrap(), dst.parse().unwrap());
    assert!(matches!(
        ipvs.route(&flow, Instant::ZERO),
        Verdict::Forward(_)
    ));
}

/// `--manifests slices.yaml services.yaml`: the slices wait for their
/// services; the label-less slice is ignored with a note.
#[test]
fn slices_before_services_load() {
    let mut t = ServiceTable::new();
    let report = Loader::default()
        .load(
            &mut t,
            &[fixture("order/slices.yaml"), fixture("order/services.yaml")],
            &[],
        )
        .unwrap();
    assert_eq!(
        addrs(&t, "shop", "web"),
        ["10.244.1.20:8080", "10.244.2.20:8080"]
    );
    assert_eq!(addrs(&t, "shop", "cart"), ["10.244.3.30:8080"]);
    assert!(
        report
            .lines(false)
            .iter()
            .any(|l| l.contains("no kubernetes.io/service-name label"))
    );
}

// ---- random interleavings -------------------------------------------------

/// One object's events, in its own order (a watch keeps each object's
/// order; kinds are separate watches, so objects interleave freely).
#[derive(Debug, Clone)]
struct History {
    /// Service (index < 2) or slice (its service is `index % 2`).
    index: usize,
    /// Endpoint sets of the successive versions (hosts as bits).
    versions: Vec<u8>,
    deleted: bool,
}

fn service_json(i: usize, rv: u64) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc{i}"), "namespace": "ns", "resourceVersion": rv.to_string()},
        "spec": {"clusterIP": format!("10.96.0.{}", 10 + i), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

fn slice_json(i: usize, hosts: u8, rv: u64) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = (0..8)
        .filter(|h| hosts >> h & 1 == 1)
        .map(|h| serde_json::json!({"addresses": [format!("10.244.{i}.{h}")], "conditions": {"ready": h % 3 != 0}}))
        .collect();
    serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("slice{i}"), "namespace": "ns", "resourceVersion": rv.to_string(),
            "labels": {"kubernetes.io/service-name": format!("svc{}", i % 2)}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": eps})
}

fn object(index: usize, version: u8, rv: u64) -> serde_json::Value {
    if index < 2 {
        service_json(index, rv)
    } else {
        slice_json(index, version, rv)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    /// Random interleavings of the events of 2 services and 4 slices
    /// (versions, deletes, and stale replays of old events) give the table
    /// of the final state: the last version of each object not deleted.
    #[test]
    fn interleaved_watch_events_give_the_final_state(
        histories in proptest::collection::vec((1..4usize, any::<bool>(), any::<[u8; 3]>()), 6),
        picks in proptest::collection::vec(0..64usize, 64),
        replays in proptest::collection::vec((0..6usize, 0..64usize), 0..4),
    ) {
        let histories: Vec<History> = histories
            .into_iter()
            .enumerate()
            .map(|(index, (n, deleted, v))| History { index, versions: v[..n].to_vec(), deleted })
            .collect();
        // Per object, its events with resource versions that grow along
        // the object's own history.
        let mut queues: Vec<Vec<(String, serde_json::Value)>> = histories
            .iter()
            .map(|h| {
                let mut q = Vec::new();
                for (k, &v) in h.versions.iter().enumerate() {
                    let ty = if k == 0 { "ADDED" } else { "MODIFIED" };
                    q.push((ty.to_owned(), object(h.index, v, 10 * (k as u64 + 1) + h.index as u64)));
                }
                if h.deleted {
                    let last = *h.versions.last().unwrap();
                    q.push(("DELETED".to_owned(), object(h.index, last, 1000 + h.index as u64)));
                }
                q.reverse();
                q
            })
            .collect();
        let mut events: Vec<(String, serde_json::Value)> = Vec::new();
        let mut first_events: Vec<(String, serde_json::Value)> = queues
            .iter()
            .map(|q| q.last().unwrap().clone())
            .collect();
        let mut p = 0;
        while queues.iter().any(|q| !q.is_empty()) {
            let live: Vec<usize> = (0..queues.len()).filter(|&i| !queues[i].is_empty()).collect();
            let i = live[picks[p % picks.len()] % live.len()];
            p += 1;
            events.push(queues[i].pop().unwrap());
        }
        // Stale replays: an object's first event again, later on.
        for (obj, at) in replays {
            let (_, o) = first_events[obj].clone();
            let pos = at % (events.len() + 1);
            if pos > 0 {
                events.insert(pos, ("MODIFIED".to_owned(), o));
            }
        }
        first_events.clear();
        let text: String = events
            .iter()
            .map(|(ty, o)| serde_json::json!({"type": ty, "object": o}).to_string() + "\n")
            .collect();
        let mut t = ServiceTable::new();
        Loader::new(LoadOptions::default())
            .apply_watch_text(&mut t, &text, "watch")
            .unwrap();

        // The final state, applied at once.
        let mut want = ServiceTable::new();
        let mut changes = Vec::new();
        for h in histories.iter().filter(|h| !h.deleted) {
            let o = object(h.index, *h.versions.last().unwrap(), 0);
            let m = svclb::k8s::manifest::Manifests::parse_str(&o.to_string(), None).unwrap();
            changes.extend(m.changes().unwrap().changes);
        }
        want.apply_batch(changes).unwrap();
        prop_assert_eq!(t.snapshot(), want.snapshot(), "{}", text);
    }
}
