//! Partial syncs (issue 12 part 4): kube-proxy 1.27+ writes only the
//! chains of the services that changed.
//!
//! - `sync_proxy_rules_repeated`: kube-proxy's TestSyncProxyRulesRepeated
//!   (`pkg/proxy/iptables/proxier_test.go`), the same objects and changes
//!   in the same order, each sync's restore input compared line for line
//!   with kube-proxy's expected text (tests/golden/kube-proxy-sync-repeated/).
//! - `partial_syncs_add_up_to_a_full_render`: a long sequence of changes,
//!   each sync's restore input applied to a small `iptables-restore
//!   --noflush` model of the kernel's tables, ends where the full render of
//!   the final table (restored into empty tables) ends.

use std::collections::BTreeMap;
use std::path::Path;

use svclb::render::iptables::Syncer;
use svclb::render::{self, RenderOptions};
use svclb::*;

/// kube-proxy's test configuration (as in tests/render_golden.rs). The
/// TestSyncProxyRulesRepeated copy is from before kube-proxy's nfacct
/// counters (1.31), so without them.
fn kube_proxy_test_options() -> RenderOptions {
    RenderOptions::default()
        .cluster_cidr("10.0.0.0/8".parse().unwrap())
        .masquerade_mark("0x4000")
        .random_fully(false)
        .nfacct(false)
}

fn expected(step: usize) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/kube-proxy-sync-repeated")
        .join(format!("{step}.iptables"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn service(ns: &str, name: &str, ip: &str, port_name: &str, port: i64) -> Change {
    Change::UpsertService(
        Service::builder(ns, name)
            .cluster_ip(ip.parse().unwrap())
            .port(ServicePortSpec::tcp(port).name(port_name))
            .build()
            .unwrap(),
    )
}

fn slice(ns: &str, svc: &str, port_name: &str, port: i64, ips: &[&str]) -> Change {
    Change::UpsertSlice(
        EndpointSlice::builder(ns, format!("{svc}-1"), svc, AddressType::IPv4)
            .port(SlicePortSpec::tcp(port).name(port_name))
            .endpoints(ips.iter().map(|ip| EndpointSpec::new(*ip)))
            .build()
            .unwrap(),
    )
}

#[track_caller]
fn assert_sync(syncer: &mut Syncer, table: &ServiceTable, at: u64, step: usize, full: bool) {
    let sync = syncer.sync(table, Instant::from_secs(at));
    let want = expected(step);
    if sync.text != want {
        let diff: Vec<String> = diff_lines(&want, &sync.text);
        panic!(
            "sync {step} differs from kube-proxy's:\n{}\n--- got:\n{}",
            diff.join("\n"),
            sync.text
        );
    }
    assert_eq!(sync.full, full, "sync {step}: full");
}

fn diff_lines(want: &str, got: &str) -> Vec<String> {
    let w: Vec<&str> = want.lines().collect();
    let g: Vec<&str> = got.lines().collect();
    let mut out = Vec::new();
    for l in &w {
        if !g.contains(l) {
            out.push(format!("- {l}"));
        }
    }
    for l in &g {
        if !w.contains(l) {
            out.push(format!("+ {l}"));
        }
    }
    out
}

#[test]
fn sync_proxy_rules_repeated() {
    let mut table = ServiceTable::new();
    let mut syncer = Syncer::new(kube_proxy_test_options());

    // Create initial state.
    table
        .apply_batch([
            service("ns1", "svc1", "172.30.0.41", "p80", 80),
            service("ns2", "svc2", "172.30.0.42", "p8080", 8080),
            slice("ns1", "svc1", "p80", 80, &["10.0.1.1"]),
            slice("ns2", "svc2", "p8080", 8080, &["10.0.2.1"]),
        ])
        .unwrap();
    assert_sync(&mut syncer, &table, 0, 1, true);

    // Add a new service and its endpoints. (This will only sync the SVC and
    // SEP rules for the new service, not the existing ones.)
    table
        .apply_batch([
            service("ns3", "svc3", "172.30.0.43", "p80", 80),
            slice("ns3", "svc3", "p80", 80, &["10.0.3.1"]),
        ])
        .unwrap();
    assert_sync(&mut syncer, &table, 1, 2, false);

    // Delete a service. (Won't update the other services.)
    table
        .apply(Change::DeleteService(ServiceKey::new("ns2", "svc2")))
        .unwrap();
    assert_sync(&mut syncer, &table, 2, 3, false);

    // Add a service, sync, then add its endpoints. (The first sync will be
    // a no-op other than adding the REJECT rule. The second sync will
    // create the new service.)
    table
        .apply(service("ns4", "svc4", "172.30.0.44", "p80", 80))
        .unwrap();
    assert_sync(&mut syncer, &table, 3, 4, false);
    table
        .apply(slice("ns4", "svc4", "p80", 80, &["10.0.4.1"]))
        .unwrap();
    assert_sync(&mut syncer, &table, 4, 5, false);

    // Change an endpoint of an existing service. This will cause its SVC
    // and SEP chains to be rewritten.
    table
        .apply(slice("ns3", "svc3", "p80", 80, &["10.0.3.2"]))
        .unwrap();
    assert_sync(&mut syncer, &table, 5, 6, false);

    // Add an endpoint to a service. This will cause its SVC and SEP chains
    // to be rewritten.
    table
        .apply(slice("ns3", "svc3", "p80", 80, &["10.0.3.2", "10.0.3.3"]))
        .unwrap();
    assert_sync(&mut syncer, &table, 6, 7, false);

    // Sync with no new changes... This will not rewrite any SVC or SEP
    // chains.
    assert_sync(&mut syncer, &table, 7, 8, false);

    // kube-proxy then makes a partial restore fail (a rule of its own
    // jumping from svc3's chain to svc4's endpoint keeps svc4's chains
    // from being deleted): the restore that deletes svc4 fails, and the
    // next sync is full and deletes svc4's chains.
    table
        .apply(Change::DeleteService(ServiceKey::new("ns4", "svc4")))
        .unwrap();
    let failed = syncer.sync(&table, Instant::from_secs(8));
    assert!(!failed.full);
    assert!(failed.text.contains("-X KUBE-SEP-AYCN5HPXMIRJNJXU\n"));
    assert!(failed.text.contains("-X KUBE-SVC-4SW47YFZTEDKD3PK\n"));
    syncer.restore_failed();
    // On retry we should do a full resync, which should succeed (and
    // delete svc4).
    assert_sync(&mut syncer, &table, 9, 9, true);
}

#[test]
fn periodic_and_forced_full_syncs() {
    let mut table = ServiceTable::new();
    table
        .apply_batch([
            service("ns1", "svc1", "172.30.0.41", "p80", 80),
            slice("ns1", "svc1", "p80", 80, &["10.0.1.1"]),
        ])
        .unwrap();
    let mut syncer = Syncer::new(kube_proxy_test_options());
    assert!(syncer.sync(&table, Instant::ZERO).full);
    let partial = syncer.sync(&table, Instant::from_secs(3600));
    assert!(!partial.full, "not more than FullSyncPeriod after the last");
    assert_eq!(partial.services_written, 0);
    let periodic = syncer.sync(&table, Instant::from_secs(3601));
    assert!(periodic.full, "more than an hour after the last full sync");
    assert_eq!(periodic.services_written, 1);
    assert_eq!(
        periodic.text,
        render::iptables::render(&table, &kube_proxy_test_options())
    );
    syncer.force_full_sync();
    assert!(syncer.sync(&table, Instant::from_secs(3602)).full);
    assert!(!syncer.sync(&table, Instant::from_secs(3603)).full);
}

/// The kernel's nat and filter tables as `iptables-restore --noflush`
/// leaves them: a chain line creates or flushes a chain, `-A` appends,
/// `-X` deletes an empty chain nothing jumps to. Errors as
/// iptables-restore reports them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Kernel {
    tables: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

impl Kernel {
    fn restore(&mut self, text: &str) -> Result<(), String> {
        // A restore is one transaction per table: work on a copy.
        let mut tables = self.tables.clone();
        let mut current: Option<String> = None;
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                current = Some(t.to_owned());
                tables.entry(t.to_owned()).or_default();
                continue;
            }
            let t = current.as_ref().ok_or("a line outside a table")?;
            let chains = tables.get_mut(t).unwrap();
            if line == "COMMIT" {
                // Every jump must land on a chain of the table.
                for rules in chains.values() {
                    for r in rules {
                        if let Some((_, target)) = r.split_once(" -j ") {
                            let target = target.split(' ').next().unwrap();
                            if target.starts_with("KUBE-") && !chains.contains_key(target) {
                                return Err(format!("{r}: no chain {target}"));
                            }
                        }
                    }
                }
                current = None;
            } else if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split(' ').next().unwrap();
                chains.insert(name.to_owned(), Vec::new());
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let name = rest.split(' ').next().unwrap();
                chains
                    .entry(name.to_owned())
                    .or_default()
                    .push(line.to_owned());
            } else if let Some(name) = line.strip_prefix("-X ") {
                if chains.get(name).is_none_or(|r| !r.is_empty()) {
                    return Err(format!("-X {name}: no such empty chain"));
                }
                let referenced = chains.values().flatten().any(|r| {
                    r.ends_with(&format!("-j {name}")) || r.contains(&format!("-j {name} "))
                });
                if referenced {
                    return Err(format!("-X {name}: chain is referenced"));
                }
                chains.remove(name);
            } else {
                return Err(format!("unexpected line {line:?}"));
            }
        }
        if current.is_some() {
            return Err("no COMMIT".into());
        }
        self.tables = tables;
        Ok(())
    }
}

/// A small deterministic generator (xorshift), so the sequence is the same
/// on every run.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn partial_syncs_add_up_to_a_full_render() {
    let opts = kube_proxy_test_options();
    let mut table = ServiceTable::new();
    let mut syncer = Syncer::new(opts.clone());
    let mut kernel = Kernel::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut partial_bytes = 0;
    let mut full_bytes = 0;
    let mut deleted = 0;
    for step in 0..200u64 {
        // One to three changes a sync: add or replace a service, change its
        // endpoints, delete its slice or the service.
        for _ in 0..=rng.below(3) {
            let i = rng.below(24);
            let (ns, name) = (format!("ns{i}"), format!("svc{i}"));
            let ip = format!("172.30.1.{}", i + 1);
            let change = match rng.below(6) {
                0 => Change::DeleteService(ServiceKey::new(&ns, &name)),
                1 => Change::DeleteSlice(SliceKey::new(&ns, format!("{name}-1"))),
                2 => service(&ns, &name, &ip, "p80", 80),
                _ => {
                    let n = rng.below(4) as usize;
                    let ips: Vec<String> = (0..n)
                        .map(|k| format!("10.1.{i}.{}", 1 + rng.below(6) + k as u64 * 10))
                        .collect();
                    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                    slice(&ns, &name, "p80", 80, &ips)
                }
            };
            let _ = table.apply(change);
        }
        let sync = syncer.sync(&table, Instant::from_secs(step));
        assert_eq!(sync.full, step == 0);
        deleted += sync.chains_deleted;
        kernel
            .restore(&sync.text)
            .unwrap_or_else(|e| panic!("sync {step}: {e}\n{}", sync.text));
        let full = render::iptables::render(&table, &opts);
        let mut fresh = Kernel::default();
        fresh.restore(&full).unwrap();
        assert_eq!(kernel, fresh, "after sync {step}");
        if step > 0 {
            partial_bytes += sync.text.len();
            full_bytes += full.len();
        }
    }
    assert!(deleted > 0, "the sequence deletes chains");
    assert!(
        partial_bytes < full_bytes,
        "partial syncs wrote {partial_bytes} bytes, full renders {full_bytes}"
    );
}

/// The `kube-proxy` nftables table as `nft -f` leaves it: chains with
/// rules, sets and maps with elements. Errors as nft reports them: a rule
/// or element that jumps to a missing chain, deleting a chain that is not
/// empty or is referenced, adding an element whose key is there with
/// another value, deleting a missing element.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct NftTable {
    chains: BTreeMap<String, Vec<String>>,
    /// set or map -> key -> what follows the key.
    elements: BTreeMap<String, BTreeMap<String, String>>,
}

impl NftTable {
    fn targets(text: &str) -> impl Iterator<Item = &str> {
        text.split(' ')
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "goto" || w[0] == "jump")
            .map(|w| w[1])
            .collect::<Vec<_>>()
            .into_iter()
    }

    fn referenced(&self, chain: &str) -> bool {
        self.chains
            .values()
            .flatten()
            .chain(self.elements.values().flat_map(|m| m.values()))
            .any(|r| Self::targets(r).any(|t| t == chain))
    }

    fn apply(&mut self, text: &str) -> Result<(), String> {
        let mut next = self.clone();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let (verb, rest) = line
                .split_once(" ip kube-proxy")
                .ok_or_else(|| format!("not the ip kube-proxy table: {line}"))?;
            let rest = rest.trim_start();
            let name = rest.split(' ').next().unwrap_or("").to_owned();
            match verb {
                "add table" => {}
                "add chain" => {
                    next.chains.entry(name).or_default();
                }
                "flush chain" => next
                    .chains
                    .get_mut(&name)
                    .ok_or(format!("{line}: no chain"))?
                    .clear(),
                "delete chain" => {
                    if next.chains.get(&name).is_none_or(|r| !r.is_empty()) {
                        return Err(format!("{line}: not an empty chain"));
                    }
                    next.chains.remove(&name);
                    if next.referenced(&name) {
                        return Err(format!("{line}: chain is referenced"));
                    }
                }
                "add rule" => {
                    let body = rest[name.len()..].trim_start().to_owned();
                    next.chains
                        .get_mut(&name)
                        .ok_or(format!("{line}: no chain"))?
                        .push(body);
                }
                "add set" | "add map" => {
                    next.elements.entry(name).or_default();
                }
                "flush set" | "flush map" => next
                    .elements
                    .get_mut(&name)
                    .ok_or(format!("{line}: no set"))?
                    .clear(),
                "delete set" => {
                    next.elements
                        .remove(&name)
                        .ok_or(format!("{line}: no set"))?;
                }
                "add element" | "delete element" => {
                    let inner = rest[name.len()..]
                        .trim()
                        .strip_prefix("{ ")
                        .and_then(|r| r.strip_suffix(" }"))
                        .ok_or(format!("{line}: not {{ ... }}"))?;
                    let (key, value) = match inner.find(" comment ").or(inner.find(" : ")) {
                        Some(i) => (&inner[..i], &inner[i..]),
                        None => (inner, ""),
                    };
                    let set = next
                        .elements
                        .get_mut(&name)
                        .ok_or(format!("{line}: no set"))?;
                    if verb == "add element" {
                        match set.get(key) {
                            Some(v) if v != value => {
                                return Err(format!("{line}: key exists with {v:?}"));
                            }
                            _ => {}
                        }
                        set.insert(key.to_owned(), value.to_owned());
                    } else {
                        set.remove(key).ok_or(format!("{line}: no such element"))?;
                    }
                }
                _ => return Err(format!("unexpected line {line:?}")),
            }
        }
        // Every jump and goto lands on a chain.
        for (chain, rules) in &next.chains {
            for r in rules {
                for target in Self::targets(r) {
                    if !next.chains.contains_key(target) {
                        return Err(format!("{chain}: {r}: no chain {target}"));
                    }
                }
            }
        }
        for (set, elements) in &next.elements {
            for (k, v) in elements {
                for target in Self::targets(v) {
                    if !next.chains.contains_key(target) {
                        return Err(format!("{set} {k}{v}: no chain {target}"));
                    }
                }
            }
        }
        *self = next;
        Ok(())
    }

    /// Without the chains that are empty and unreferenced (stale chains
    /// waiting for deletion), which hold no rules and route nothing.
    fn live(&self) -> NftTable {
        let mut t = self.clone();
        let dead: Vec<String> = t
            .chains
            .iter()
            .filter(|(c, r)| r.is_empty() && c.contains('/') && !self.referenced(c))
            .map(|(c, _)| c.clone())
            .collect();
        for c in dead {
            t.chains.remove(&c);
        }
        t
    }
}

#[test]
fn nft_partial_syncs_add_up_to_a_full_render() {
    let opts = kube_proxy_test_options();
    let mut table = ServiceTable::new();
    let mut syncer = render::nft::Syncer::new(opts.clone());
    let mut kernel = NftTable::default();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut partial_bytes, mut full_bytes, mut deleted) = (0, 0, 0);
    let mut now = Instant::ZERO;
    for step in 0..200u64 {
        for _ in 0..=rng.below(3) {
            let i = rng.below(24);
            let (ns, name) = (format!("ns{i}"), format!("svc{i}"));
            let ip = format!("172.30.1.{}", i + 1);
            let change = match rng.below(8) {
                0 => Change::DeleteService(ServiceKey::new(&ns, &name)),
                1 => Change::DeleteSlice(SliceKey::new(&ns, format!("{name}-1"))),
                2 => service(&ns, &name, &ip, "p80", 80),
                3 => Change::UpsertService(
                    Service::builder(&ns, &name)
                        .cluster_ip(ip.parse().unwrap())
                        .port(ServicePortSpec::tcp(80).name("p80"))
                        .client_ip_affinity(Some(10800))
                        .build()
                        .unwrap(),
                ),
                // A LoadBalancer: node port, external IP, ingress IP with a
                // source range, and either traffic policy.
                4 => Change::UpsertService(
                    Service::builder(&ns, &name)
                        .cluster_ip(ip.parse().unwrap())
                        .service_type(ServiceType::LoadBalancer)
                        .port(
                            ServicePortSpec::tcp(80)
                                .name("p80")
                                .node_port(30000 + i as i64),
                        )
                        .external_ip(format!("192.168.99.{}", i + 1).parse().unwrap())
                        .load_balancer_ingress(
                            format!("5.6.7.{}", i + 1).parse().unwrap(),
                            IpMode::VIP,
                        )
                        .load_balancer_source_range("203.0.113.0/25".parse().unwrap())
                        .external_traffic_policy(if rng.below(2) == 0 {
                            TrafficPolicy::Local
                        } else {
                            TrafficPolicy::Cluster
                        })
                        .build()
                        .unwrap(),
                ),
                _ => {
                    let n = rng.below(4) as usize;
                    let ips: Vec<String> = (0..n)
                        .map(|k| format!("10.1.{i}.{}", 1 + rng.below(6) + k as u64 * 10))
                        .collect();
                    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                    slice(&ns, &name, "p80", 80, &ips)
                }
            };
            let _ = table.apply(change);
        }
        // 0.2 to 2 s apart: stale chains wait a sync or more.
        now = now + std::time::Duration::from_millis(200 + rng.below(1800));
        let sync = syncer.sync(&table, now);
        assert_eq!(sync.full, step == 0);
        deleted += sync.chains_deleted;
        kernel
            .apply(&sync.text)
            .unwrap_or_else(|e| panic!("sync {step}: {e}\n{}", sync.text));
        let full = render::nft::render(&table, &opts);
        let mut fresh = NftTable::default();
        fresh.apply(&full).unwrap();
        assert_eq!(kernel.live(), fresh, "after sync {step}");
        if step > 0 {
            partial_bytes += sync.text.len();
            full_bytes += full.len();
        }
    }
    // A forced full resync over the existing table ends in the same place.
    syncer.force_full_sync();
    let resync = syncer.sync(&table, Instant::from_secs(1000));
    assert!(resync.full);
    kernel.apply(&resync.text).unwrap();
    let mut fresh = NftTable::default();
    fresh.apply(&render::nft::render(&table, &opts)).unwrap();
    assert_eq!(kernel.live(), fresh);
    assert!(deleted > 0, "the sequence deletes chains");
    assert!(
        partial_bytes < full_bytes,
        "partial syncs wrote {partial_bytes} bytes, full renders {full_bytes}"
    );
}
