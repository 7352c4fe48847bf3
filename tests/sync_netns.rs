//! Partial syncs through the real tools (issue 12 part 4): a sequence of
//! `render::iptables::Syncer` / `render::nft::Syncer` outputs, loaded one
//! after another with `iptables-restore --noflush` and `nft -f` into a
//! throwaway network namespace, must leave the same rules as the full
//! rendering of the final table loaded into a fresh namespace (compared as
//! `iptables-save` and `nft list table` print them).
//!
//! As root with `ip` and the tools (`.ci/run` installs them); otherwise the
//! test prints `SKIPPED: <reason>`. Nothing is sent on any network: the
//! namespaces only hold rules.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use svclb::render::{self, RenderOptions};
use svclb::*;

fn run(cmd: &str, args: &[&str], input: Option<&str>) -> std::io::Result<Output> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(text) = input {
        child.stdin.take().unwrap().write_all(text.as_bytes())?;
    }
    child.wait_with_output()
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn have(cmd: &str, flag: &str) -> bool {
    run(cmd, &[flag], None).is_ok_and(|o| o.status.success())
}

/// A network namespace that is deleted when dropped.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Result<Netns, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("svclb-sync-{tag}-{}-{nanos}", std::process::id());
        let out = run("ip", &["netns", "add", &name], None).map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Netns(name))
    }

    /// Runs `cmd args` inside; panics with its stderr when it fails.
    fn exec(&self, cmd: &str, args: &[&str], input: Option<&str>) -> String {
        let mut all = vec!["netns", "exec", &self.0, cmd];
        all.extend(args);
        let out = run("ip", &all, input).unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?} failed: {}\ninput:\n{}",
            String::from_utf8_lossy(&out.stderr),
            input.unwrap_or("")
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0], None);
    }
}

/// kube-proxy's chains as `iptables-save` prints them: chain -> rules.
fn iptables_state(ns: &Netns) -> BTreeMap<String, Vec<String>> {
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for table in ["filter", "nat"] {
        let text = ns.exec("iptables-save", &["-t", table], None);
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split(' ').next().unwrap();
                if name.starts_with("KUBE-") {
                    chains.entry(format!("{table} {name}")).or_default();
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let name = rest.split(' ').next().unwrap();
                chains
                    .entry(format!("{table} {name}"))
                    .or_default()
                    .push(line.to_owned());
            }
        }
    }
    chains
}

/// The `kube-proxy` table as `nft list table` prints it: each chain's
/// rules in order, each set's and map's elements sorted (nft lists them in
/// its own order).
fn nft_state(ns: &Netns) -> BTreeMap<String, Vec<String>> {
    let text = ns.exec("nft", &["list", "table", "ip", "kube-proxy"], None);
    let mut blocks: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with("chain ") || line.starts_with("set ") || line.starts_with("map ") {
            current = Some(line.trim_end_matches(" {").to_owned());
            blocks.entry(current.clone().unwrap()).or_default();
        } else if line == "}" {
            current = None;
        } else if let Some(block) = &current {
            blocks.get_mut(block).unwrap().push(line.to_owned());
        }
    }
    for (name, lines) in blocks.iter_mut() {
        if name.starts_with("chain ") {
            continue;
        }
        // `elements = { a, b,` ... `c }` over one or more lines.
        let joined = lines.join(" ");
        let mut kept: Vec<String> = Vec::new();
        if let Some((head, elems)) = joined.split_once("elements = {") {
            kept.push(head.trim().to_owned());
            let elems = elems.trim().trim_end_matches('}');
            let mut sorted: Vec<String> = elems
                .split(',')
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect();
            sorted.sort();
            kept.extend(sorted);
        } else {
            kept.push(joined.trim().to_owned());
        }
        *lines = kept;
    }
    blocks
}

/// Service `i`: every third a NodePort (externalTrafficPolicy Local for
/// every sixth), every fourth with an external IP, every fifth a
/// LoadBalancer with a source range (and a node port).
fn service(i: u64, affinity: bool) -> Change {
    let mut port = ServicePortSpec::tcp(80).name("p80");
    let mut b = Service::builder(format!("ns{i}"), format!("svc{i}"))
        .cluster_ip(format!("172.30.1.{}", i + 1).parse().unwrap())
        .client_ip_affinity(affinity.then_some(10800));
    if i % 3 == 0 || i % 5 == 0 {
        port = port.node_port(30000 + i as i64);
        b = b.service_type(ServiceType::NodePort);
        if i % 6 == 0 {
            b = b.external_traffic_policy(TrafficPolicy::Local);
        }
    }
    if i % 4 == 0 {
        b = b.external_ip(format!("192.168.99.{}", i + 1).parse().unwrap());
    }
    if i % 5 == 0 {
        b = b
            .service_type(ServiceType::LoadBalancer)
            .load_balancer_ingress(format!("5.6.7.{}", i + 1).parse().unwrap(), IpMode::VIP)
            .load_balancer_source_range("203.0.113.0/25".parse().unwrap());
    }
    Change::UpsertService(b.port(port).build().unwrap())
}

fn slice(i: u64, ips: &[String]) -> Change {
    Change::UpsertSlice(
        EndpointSlice::builder(
            format!("ns{i}"),
            format!("svc{i}-1"),
            format!("svc{i}"),
            AddressType::IPv4,
        )
        .port(SlicePortSpec::tcp(80).name("p80"))
        .endpoints(ips.iter().map(EndpointSpec::new))
        .build()
        .unwrap(),
    )
}

/// A small deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The sequence of tables the test syncs: 40 steps of one or two changes
/// among 12 services.
fn tables() -> Vec<ServiceTable> {
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    let mut table = ServiceTable::new();
    let mut out = Vec::new();
    for _ in 0..40 {
        for _ in 0..=rng.below(2) {
            let i = rng.below(12);
            let change = match rng.below(6) {
                0 => Change::DeleteService(ServiceKey::new(format!("ns{i}"), format!("svc{i}"))),
                1 => service(i, false),
                2 => service(i, true),
                _ => {
                    let n = rng.below(4);
                    let ips: Vec<String> = (0..n)
                        .map(|k| format!("10.1.{i}.{}", 1 + rng.below(5) + k * 10))
                        .collect();
                    slice(i, &ips)
                }
            };
            let _ = table.apply(change);
        }
        out.push(table.clone());
    }
    out
}

#[test]
fn partial_syncs_through_the_real_tools_equal_a_full_load() {
    if effective_uid() != Some(0) {
        println!("SKIPPED: not running as root (needs CAP_NET_ADMIN and ip netns)");
        return;
    }
    if !have("ip", "-V") {
        println!("SKIPPED: the `ip` command (iproute2) is not installed");
        return;
    }
    // No nfacct counters: the namespace has no nfacct objects (kube-proxy
    // creates them over netlink), and `-m nfacct` needs them.
    let opts = RenderOptions::default()
        .cluster_cidr("10.0.0.0/8".parse().unwrap())
        .nfacct(false);
    let tables = tables();
    let last = tables.last().unwrap();
    let mut ran = Vec::new();

    if have("iptables-restore", "--version") && have("iptables-save", "--version") {
        let ns = Netns::create("ipt").unwrap_or_else(|e| panic!("ip netns add: {e}"));
        let mut syncer = render::iptables::Syncer::new(opts.clone());
        for (step, table) in tables.iter().enumerate() {
            let sync = syncer.sync(table, Instant::from_secs(step as u64));
            ns.exec("iptables-restore", &["--noflush"], Some(&sync.text));
        }
        let fresh = Netns::create("ipt-full").unwrap();
        fresh.exec(
            "iptables-restore",
            &["--noflush"],
            Some(&render::iptables::render(last, &opts)),
        );
        let state = iptables_state(&ns);
        assert!(
            state.keys().any(|c| c.starts_with("nat KUBE-SEP-"))
                && state.keys().any(|c| c.starts_with("nat KUBE-EXT-")),
            "the final table has endpoints: {state:?}"
        );
        assert_eq!(state, iptables_state(&fresh));
        ran.push("iptables-restore");
    }

    if have("nft", "--version") {
        let ns = Netns::create("nft").unwrap_or_else(|e| panic!("ip netns add: {e}"));
        let mut syncer = render::nft::Syncer::new(opts.clone());
        let mut now = Instant::ZERO;
        let mut deleted = 0;
        for table in &tables {
            now = now + std::time::Duration::from_millis(1500);
            let sync = syncer.sync(table, now);
            deleted += sync.chains_deleted;
            ns.exec("nft", &["-f", "/dev/stdin"], Some(&sync.text));
        }
        // One more sync, later: the chains the last ones left stale are
        // deleted.
        let sync = syncer.sync(last, now + std::time::Duration::from_secs(2));
        deleted += sync.chains_deleted;
        ns.exec("nft", &["-f", "/dev/stdin"], Some(&sync.text));
        assert!(deleted > 0, "the sequence deletes chains");
        let fresh = Netns::create("nft-full").unwrap();
        fresh.exec(
            "nft",
            &["-f", "/dev/stdin"],
            Some(&render::nft::render(last, &opts)),
        );
        let state = nft_state(&ns);
        assert!(
            state.keys().any(|c| c.starts_with("chain endpoint-")),
            "the final table has endpoints: {state:?}"
        );
        assert_eq!(state, nft_state(&fresh));
        ran.push("nft");
    }
    if ran.is_empty() {
        println!("SKIPPED: neither iptables-restore nor nft is installed");
    } else {
        println!("checked with {}", ran.join(", "));
    }
}
