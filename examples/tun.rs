//! A userspace packet dataplane on a TUN device: every packet to a cluster
//! IP is routed by an svclb dataplane, DNATed to its backend and SNATed to
//! an address routed back into the device, and the backends' replies are
//! reverse-NATed through the dataplane's connection tracker.
//!
//! ```text
//! cargo run --example tun --features packet,serde -- \
//!     --manifests PATH... [--watch FILE|-] [--mode M] [--dev NAME]
//!     [--scheduler rr|wrr|lc|wlc|sh|mh|random] [--seed N] [--snat-pool CIDR]
//!     [--snat-pool6 CIDR] [--tcp-closing-timeout SECS]
//!     [--node-ip IP]... [--nodeport-addresses CIDR[,CIDR]]
//!     [the loader's flags: --service-cidr, --node, --zone, --keep-going, --max-*]
//! ```
//!
//! As root, in the current network namespace, it
//! 1. opens the TUN device `--dev` (default `svtun0`), brings it up and
//!    prints `device NAME`;
//! 2. routes the SNAT pools (`--snat-pool`, default `169.254.0.0/17`, and
//!    `--snat-pool6`, default the ULA `fd00:5c1b::/112`) into it (`ip
//!    route replace POOL dev NAME`) and prints `snat POOL` for each;
//! 3. routes every cluster IP, external IP (`spec.externalIPs`) and
//!    load-balancer IP (`status.loadBalancer.ingress[].ip` with `ipMode`
//!    `VIP`; a `Proxy` one is not captured, as kube-proxy does not) of the
//!    manifests, IPv4 and IPv6, into it (`ip route replace VIP/32|VIP/128
//!    dev NAME`), printing `route VIP/32 dev NAME` (or `/128`) for each
//!    (and `unroute ...` when a reload removes one);
//! 4. with `--node-ip`, steers every node port on each node IP into it:
//!    node IPs are local addresses, which the `local` table (rule 0)
//!    delivers before any route, so it adds `ip rule pref 100 to
//!    NODE_IP/32 ipproto P dport NODE_PORT lookup 23579` per node IP and
//!    node port (table 23579 holds `default dev NAME`, both families),
//!    moves the `local` rule to pref 200, and sets the device's
//!    `accept_local` (a reply from a node IP comes out of the device, a
//!    martian otherwise); it prints `nodeport IP:PORT PROTO dev NAME` for
//!    each (`unnodeport ...` when a reload removes one), then `ready`. On
//!    exit it removes the rules and puts `local` back at pref 0 (a killed
//!    process leaves them: `ip rule` outlives the device).
//!
//! Then, for every packet the kernel sends into the device:
//! - **to a cluster, external or load-balancer IP** (client -> frontend):
//!   [`Dataplane::packet`] with
//!   its TCP flags decides the backend (a tracked flow keeps its own); the
//!   packet is DNATed to the backend and SNATed to a pool address of its
//!   family (one per client address and frontend, so that the translated
//!   5-tuple is unique because the original one is) with the client's
//!   port, and written back into the device, where the kernel delivers it
//!   to the backend;
//! - **to a pool address** (a backend's reply, or an ICMP error about a
//!   packet we sent): the pool address gives the client and the frontend
//!   back, and so the original flow; the dataplane's tracker finds the
//!   connection by it (`Conntrack::lookup_reply`, which also advances the
//!   connection's state with the reply's flags; `Conntrack::get`, which
//!   changes nothing, for an ICMP error) and checks that the reply comes
//!   from that connection's backend; the packet is reverse-NATed (source
//!   the frontend, destination the client) and written back.
//!
//! Nothing else is tracked here: the flows live in the dataplane's tracker,
//! whose timers this loop drives ([`Dataplane::poll_timeout`] /
//! [`Dataplane::handle_timeout`]). Once a second, off the packet path, one
//! walk of the tracker ([`Conntrack::retain`], keeping everything) marks
//! the pool addresses a live connection still uses; every other assigned
//! address is given back to its pool and printed as `snat release ADDR
//! client IP frontend IP:PORT`. The pool tables (owners, free list, index)
//! are allocated up front, at most 65,534 addresses per family, so the
//! packet path allocates nothing. A closing TCP connection stays tracked
//! for the mode's kernel timeouts (IPVS: TIME_WAIT 120 s), and its address
//! with it; `--tcp-closing-timeout SECS` shortens them.
//!
//! Manifests are read with the loader every svclb program shares
//! ([`svclb::k8s::loader`]); `SIGHUP`, or a change of a manifest file's
//! size or modification time, re-applies them: objects are upserted, and
//! those the previous load's files held and these no longer do are
//! deleted (`examples/shared/owned.rs`; an object only a watch event
//! brought is left alone). `--watch
//! FILE|-` applies a watch stream (`kubectl get -w` output, YAML documents
//! or JSON objects, the latter read with serde_json's streaming reader)
//! continuously, event by event, as it grows. `SIGINT` and
//! `SIGTERM` end the program with status 0 after printing one `stats` line;
//! the device and its routes go with it.
//!
//! The loader's flags (`--service-cidr`, `--node`, `--zone`,
//! `--keep-going`, `--verbose`, the `--max-*` limits) and the node's
//! addresses are the ones every example shares (`examples/shared/load.rs`).
//!
//! The per-packet part (the pool, `NatPath::handle`, the release) is
//! `examples/shared/tun_nat.rs`, which `tests/tun_pool.rs` (SCTP through
//! the pool, CRC32c checked from scratch) and `tests/tun_pool_alloc.rs`
//! (no allocation per packet) drive without a device.
//!
//! Later fragments follow their datagram's connection through the
//! dataplane's connection layer (`Dataplane::first_fragment` when the
//! first fragment is NATed, `Dataplane::later_fragment` for the rest).
//!
//! Not handled: later fragments whose first fragment was not seen, or
//! whose connection ended (dropped, never guessed), a family's pool exhausted by more live (client, frontend)
//! pairs than it has addresses (their new connections are dropped), an
//! external or load-balancer IP that is a local address of the host (the
//! `local` table delivers it before the route; only node IPs are steered
//! by rules).

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, SystemTime};

use clap::{Parser, ValueEnum};
use svclb::conntrack::Conntrack;
use svclb::k8s::loader::{LoadOptions, Loader};
use svclb::packet::ICMP_ERROR_MAX_V6;
use svclb::plan::NodeAddresses;
use svclb::*;

#[path = "shared/load.rs"]
mod load;
#[path = "shared/owned.rs"]
mod owned;
#[path = "shared/tun_nat.rs"]
mod tun_nat;

use tun_nat::{NatPath, Out, PoolRange, SnatPool};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    /// kube-proxy's iptables mode.
    Iptables,
    /// kube-proxy's nftables mode.
    Nftables,
    /// kube-proxy's IPVS mode.
    Ipvs,
    /// The userspace model of the eBPF dataplane.
    Ebpf,
}

#[derive(Debug, Parser)]
#[command(about = "A TUN dataplane: NAT every packet to a cluster IP through svclb")]
struct Cli {
    /// Manifest files or directories (YAML/JSON Services and EndpointSlices).
    #[arg(long, num_args = 1.., required = true)]
    manifests: Vec<PathBuf>,
    /// A watch stream applied continuously as it grows (`-`: standard input).
    #[arg(long)]
    watch: Option<PathBuf>,
    /// Dataplane mode.
    #[arg(long, value_enum, default_value = "ipvs")]
    mode: ModeArg,
    /// The TUN device's name.
    #[arg(long, default_value = "svtun0")]
    dev: String,
    /// The scheduler (IPVS and eBPF modes).
    #[arg(long, default_value = "rr")]
    scheduler: String,
    /// Seed of the dataplane's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// IPv4 prefix of the SNAT addresses, routed into the device. The
    /// default is the lower half of the link-local range: the upper half
    /// holds 169.254.169.254, which clouds use for instance metadata.
    #[arg(long, default_value = "169.254.0.0/17")]
    snat_pool: String,
    /// IPv6 prefix of the SNAT addresses, routed into the device: a ULA
    /// (RFC 4193) /112 by default.
    #[arg(long, default_value = "fd00:5c1b::/112")]
    snat_pool6: String,
    /// Seconds a closing TCP connection stays tracked (FIN_WAIT,
    /// CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE); by default the mode's
    /// kernel timeouts. Its pool address is released once none is left.
    #[arg(long, value_name = "SECS")]
    tcp_closing_timeout: Option<u64>,
    #[command(flatten)]
    load: load::LoadArgs,
    #[command(flatten)]
    node_addrs: load::NodeAddrArgs,
}

/// The routing table node-port traffic is steered into the device by.
const NODEPORT_TABLE: &str = "23579";
/// The priority of the steering rules; the `local` table's rule moves
/// after them.
const NODEPORT_PREF: &str = "100";
const LOCAL_PREF: &str = "200";

struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

type Result<T> = std::result::Result<T, Failure>;

enum Plane {
    Iptables(IptablesDataplane),
    Nftables(NftablesDataplane),
    Ipvs(IpvsDataplane),
}

impl Plane {
    fn dp(&self) -> &dyn Dataplane {
        match self {
            Plane::Iptables(d) => d,
            Plane::Nftables(d) => d,
            Plane::Ipvs(d) => d,
        }
    }

    fn conntrack(&self) -> Option<&Conntrack> {
        match self {
            Plane::Iptables(d) => d.conntrack(),
            Plane::Nftables(d) => d.conntrack(),
            Plane::Ipvs(d) => d.conntrack(),
        }
    }
}

struct World {
    cli: Cli,
    table: ServiceTable,
    loader: Loader,
    options: LoadOptions,
    /// What the manifest files held at the last load.
    owned: BTreeSet<owned::Owned>,
    plane: Plane,
    /// The SNAT pool, the fragment tracker, the counters.
    nat: NatPath,
    routes: BTreeSet<IpAddr>,
    /// IPv6 is routed into the device (the host has it).
    ipv6: bool,
    /// The node IPs node ports answer on.
    node_ips: Vec<IpAddr>,
    /// The (node IP, protocol, node port) steered into the device.
    node_ports: BTreeSet<(IpAddr, &'static str, u16)>,
    stamps: Vec<(PathBuf, Option<(u64, SystemTime)>)>,
    start: std::time::Instant,
}

impl World {
    fn now(&self) -> Instant {
        Instant::from_nanos(self.start.elapsed().as_nanos() as u64)
    }

    fn sync(&mut self, change_sets: &[ChangeSet]) -> Result<()> {
        let now = self.now();
        for cs in change_sets {
            self.plane.dp().sync(&self.table, cs, now);
        }
        self.route_vips()
    }

    /// Makes the routes into the device match the table's cluster IPs,
    /// external IPs and load-balancer IPs, IPv4 (`/32`) and IPv6 (`/128`).
    fn route_vips(&mut self) -> Result<()> {
        let want: BTreeSet<IpAddr> = self
            .table
            .views()
            .flat_map(|v| routed_ips(v.service()))
            .filter(|ip| self.ipv6 || ip.is_ipv4())
            .collect();
        for vip in want.difference(&self.routes) {
            let dst = host_route(*vip);
            ip(&["route", "replace", &dst, "dev", &self.cli.dev])?;
            println!("route {dst} dev {}", self.cli.dev);
        }
        for vip in self.routes.difference(&want) {
            let dst = host_route(*vip);
            ip(&["route", "del", &dst, "dev", &self.cli.dev])?;
            println!("unroute {dst} dev {}", self.cli.dev);
        }
        self.routes = want;
        self.steer_node_ports()
    }

    /// Makes the policy-routing rules that steer node-port traffic into
    /// the device match the table: one rule `to NODE_IP ipproto P dport
    /// NODE_PORT lookup NODEPORT_TABLE` per node IP and node port.
    fn steer_node_ports(&mut self) -> Result<()> {
        let mut want = BTreeSet::new();
        for v in self.table.views() {
            for port in v.service().ports() {
                let Some(np) = port.node_port() else {
                    continue;
                };
                let proto = ip_proto(port.protocol());
                for ip in &self.node_ips {
                    want.insert((*ip, proto, np));
                }
            }
        }
        for (node_ip, proto, np) in want.difference(&self.node_ports) {
            rule("add", *node_ip, proto, *np)?;
            println!(
                "nodeport {} {proto} dev {}",
                SocketAddr::new(*node_ip, *np),
                self.cli.dev
            );
        }
        for (node_ip, proto, np) in self.node_ports.difference(&want) {
            rule("del", *node_ip, proto, *np)?;
            println!("unnodeport {} {proto}", SocketAddr::new(*node_ip, *np));
        }
        self.node_ports = want;
        Ok(())
    }

    /// Removes the steering rules and puts the `local` rule back first.
    fn unsteer(&mut self) {
        for (node_ip, proto, np) in std::mem::take(&mut self.node_ports) {
            let _ = rule("del", node_ip, proto, np);
        }
        if !self.node_ips.is_empty() {
            for family in families(&self.node_ips) {
                let _ = ip(&[family, "rule", "add", "pref", "0", "lookup", "local"]);
                let _ = ip(&[family, "rule", "del", "pref", LOCAL_PREF, "lookup", "local"]);
            }
        }
    }

    /// Re-applies every manifest path, each as one batch, then deletes, in
    /// one more batch, what the files no longer hold. The files are read
    /// into a scratch table first: one that does not load changes nothing.
    fn reload(&mut self, why: &str) -> Result<()> {
        let mut scratch = ServiceTable::new();
        Loader::new(self.options.clone()).load(&mut scratch, &self.cli.manifests, &[])?;
        let now_owned = owned::owned_keys(&scratch);
        let mut sets = Vec::new();
        for path in self.cli.manifests.clone() {
            let report = self.loader.apply_manifest_path(&mut self.table, &path)?;
            for line in report.lines(false) {
                eprintln!("tun: note: {line}");
            }
            sets.extend(report.change_sets);
        }
        let deletes = owned::deletions(&self.owned, &now_owned, &self.table);
        if !deletes.is_empty() {
            sets.push(self.table.apply_batch(deletes)?);
        }
        self.owned = now_owned;
        self.sync(&sets)?;
        self.stamps = file_stamps(&self.cli.manifests);
        println!("reloaded ({why})");
        Ok(())
    }

    fn apply_watch(&mut self, text: &str) -> Result<()> {
        let report = self
            .loader
            .apply_watch_text(&mut self.table, text, "watch")?;
        for line in report.lines(false) {
            eprintln!("tun: note: {line}");
        }
        self.sync(&report.change_sets)?;
        println!("watch applied {} change(s)", report.change_sets.len());
        Ok(())
    }
}

/// The addresses of `svc` routed into the device: its cluster IPs, its
/// `spec.externalIPs` and its `status.loadBalancer.ingress` IPs whose
/// `ipMode` is `VIP` (with `Proxy` the load balancer delivers to the node
/// itself, and kube-proxy does not capture the IP). An external or
/// load-balancer IP of a family the service has no cluster IP of is left
/// alone, as the plan ignores it (kube-proxy's per-family proxiers).
fn routed_ips(svc: &Service) -> Vec<IpAddr> {
    let cluster = svc.cluster_ip().addrs();
    let has_family = |ip: &IpAddr| cluster.iter().any(|c| c.is_ipv4() == ip.is_ipv4());
    let mut out = cluster.to_vec();
    out.extend(svc.external_ips().iter().copied().filter(has_family));
    out.extend(svc.load_balancer_vips().filter(has_family));
    out
}

/// `ip`'s family flags (`-4`, `-6`) of the families among `ips`.
fn families(ips: &[IpAddr]) -> Vec<&'static str> {
    let mut out = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        out.push("-4");
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        out.push("-6");
    }
    out
}

/// `ip rule`'s name of a protocol node ports are steered for: `tcp`,
/// `udp`, `sctp`.
fn ip_proto(p: Protocol) -> &'static str {
    match p.as_api_str() {
        "UDP" => "udp",
        "SCTP" => "sctp",
        _ => "tcp",
    }
}

/// `ip rule add|del` of one node port's steering rule.
fn rule(op: &str, node_ip: IpAddr, proto: &str, port: u16) -> Result<()> {
    let family = if node_ip.is_ipv6() { "-6" } else { "-4" };
    let to = host_route(node_ip);
    let port = port.to_string();
    ip(&[
        family,
        "rule",
        op,
        "pref",
        NODEPORT_PREF,
        "to",
        &to,
        "ipproto",
        proto,
        "dport",
        &port,
        "lookup",
        NODEPORT_TABLE,
    ])
}

/// `VIP/32` or `VIP/128`.
fn host_route(vip: IpAddr) -> String {
    format!("{vip}/{}", if vip.is_ipv6() { 128 } else { 32 })
}

/// Size and modification time of every manifest file, to notice changes.
fn file_stamps(paths: &[PathBuf]) -> Vec<(PathBuf, Option<(u64, SystemTime)>)> {
    let mut out = Vec::new();
    for p in paths {
        for f in Loader::manifest_files(p).unwrap_or_else(|_| vec![p.clone()]) {
            let st = std::fs::metadata(&f)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)));
            out.push((f, st));
        }
    }
    out
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Failure(format!("ip {}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(Failure(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Reads a watch stream as it grows and sends each complete event's text:
/// a JSON object once serde_json's streaming reader has read a whole value
/// (so braces inside strings are just characters), a YAML document at
/// `---`, at the end of the input, or (a file) when the file stops growing.
fn watch_thread(path: PathBuf) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let follow = path.as_os_str() != "-";
        let mut src: Box<dyn Read + Send> = if follow {
            match std::fs::File::open(&path) {
                Ok(f) => Box::new(f),
                Err(e) => {
                    eprintln!("tun: error: --watch {}: {e}", path.display());
                    return;
                }
            }
        } else {
            Box::new(std::io::stdin())
        };
        let mut events = Events {
            doc: String::new(),
            json: false,
            tx,
        };
        let mut pending = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = match src.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            if n == 0 {
                if !events.flush_yaml() || !follow {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            pending.extend_from_slice(&chunk[..n]);
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                if !events.line(&String::from_utf8_lossy(&line)) {
                    return;
                }
            }
        }
    });
    rx
}

/// The event being read from a watch stream.
struct Events {
    doc: String,
    /// The event is a JSON object (it began with `{`), not YAML.
    json: bool,
    tx: std::sync::mpsc::Sender<String>,
}

impl Events {
    /// Sends the document so far; `false` once the receiver is gone.
    fn send(&mut self) -> bool {
        self.json = false;
        let doc = std::mem::take(&mut self.doc);
        doc.trim().is_empty() || self.tx.send(doc).is_ok()
    }

    /// At a pause: a YAML document read so far is complete.
    fn flush_yaml(&mut self) -> bool {
        if self.json {
            return true;
        }
        self.send()
    }

    fn line(&mut self, line: &str) -> bool {
        if !self.json && line.trim_end() == "---" {
            return self.send();
        }
        if self.doc.trim().is_empty() && line.trim_start().starts_with('{') {
            self.json = true;
        }
        self.doc.push_str(line);
        if self.json {
            return self.split_json();
        }
        true
    }

    /// Sends every whole JSON value at the front of the document; keeps an
    /// incomplete one for more input. A syntax error sends the text as it
    /// is, for the loader to report.
    fn split_json(&mut self) -> bool {
        loop {
            let mut values =
                serde_json::Deserializer::from_str(&self.doc).into_iter::<serde::de::IgnoredAny>();
            match values.next() {
                Some(Ok(_)) => {
                    let end = values.byte_offset();
                    let rest = self.doc.split_off(end);
                    if !self.send() {
                        return false;
                    }
                    if !rest.trim_start().starts_with('{') {
                        // Whitespace, or the start of a YAML document.
                        if !rest.trim().is_empty() {
                            self.doc = rest;
                        }
                        return true;
                    }
                    self.doc = rest;
                    self.json = true;
                }
                Some(Err(e)) if e.is_eof() => return true,
                Some(Err(_)) => return self.send(),
                None => {
                    self.doc.clear();
                    self.json = false;
                    return true;
                }
            }
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let scheduler: SchedulerKind = cli
        .scheduler
        .parse()
        .map_err(|e| Failure(format!("--scheduler: {e}")))?;
    let pool = SnatPool {
        v4: PoolRange::parse("--snat-pool", &cli.snat_pool, false)?,
        v6: PoolRange::parse("--snat-pool6", &cli.snat_pool6, true)?,
    };
    let options = cli.load.options()?;
    let mut config = DataplaneConfig::with_seed(cli.seed)
        .node(cli.load.node())
        .scheduler(scheduler);
    cli.node_addrs.apply(&mut config)?;
    let node_ips: Vec<IpAddr> =
        NodeAddresses::new(config.node_ips.clone(), config.nodeport_addresses.clone())
            .node_port_ips()
            .collect();
    if let Some(secs) = cli.tcp_closing_timeout {
        let mode = match cli.mode {
            ModeArg::Iptables => Mode::Iptables,
            ModeArg::Nftables => Mode::Nftables,
            ModeArg::Ipvs => Mode::Ipvs,
            ModeArg::Ebpf => Mode::Ebpf,
        };
        let mut t = mode.default_timeouts();
        let d = Duration::from_secs(secs);
        t.tcp_fin_wait = d;
        t.tcp_close_wait = d;
        t.tcp_last_ack = d;
        t.tcp_time_wait = d;
        t.tcp_close = d;
        config.conntrack_timeouts = Some(t);
    }
    let plane = match cli.mode {
        ModeArg::Iptables => Plane::Iptables(IptablesDataplane::new(config)),
        ModeArg::Nftables => Plane::Nftables(NftablesDataplane::new(config)),
        ModeArg::Ipvs => Plane::Ipvs(IpvsDataplane::new(config)),
        ModeArg::Ebpf => Plane::Ipvs(IpvsDataplane::ebpf_model(config)),
    };

    // Signals first: a SIGTERM during setup still ends the program cleanly.
    let term = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&term))?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))?;

    let mut loader = Loader::new(options.clone());
    let mut table = ServiceTable::new();
    let report = loader.load(&mut table, &cli.manifests, &[])?;
    for line in report.lines(false) {
        eprintln!("tun: note: {line}");
    }

    let mut config = tun::Configuration::default();
    config.tun_name(&cli.dev).mtu(1500).up();
    let dev = tun::Device::new(&config).map_err(|e| Failure(format!("--dev {}: {e}", cli.dev)))?;
    dev.set_nonblock()?;
    println!("device {}", cli.dev);
    ip(&["route", "replace", &pool.v4.prefix(), "dev", &cli.dev])?;
    println!("snat {}", pool.v4.prefix());
    // A host without IPv6 (disable_ipv6) refuses the route: it gets no
    // IPv6 service routes either, and says so.
    let ipv6 = match ip(&["route", "replace", &pool.v6.prefix(), "dev", &cli.dev]) {
        Ok(()) => {
            println!("snat {}", pool.v6.prefix());
            true
        }
        Err(Failure(e)) => {
            eprintln!("tun: note: IPv6 not routed into {}: {e}", cli.dev);
            false
        }
    };
    let node_ips: Vec<IpAddr> = node_ips
        .into_iter()
        .filter(|ip| ipv6 || ip.is_ipv4())
        .collect();
    if !node_ips.is_empty() {
        // Node IPs are local: the `local` table (rule 0) would deliver
        // their node ports before any route into the device. The steering
        // rules go first, the `local` lookup after them; and a reply whose
        // source is now a node IP comes out of the device, which the
        // kernel drops as a martian unless the device accepts local
        // sources.
        for family in families(&node_ips) {
            ip(&[
                family,
                "route",
                "replace",
                "default",
                "dev",
                &cli.dev,
                "table",
                NODEPORT_TABLE,
            ])?;
            ip(&[family, "rule", "add", "pref", LOCAL_PREF, "lookup", "local"])?;
            ip(&[family, "rule", "del", "pref", "0", "lookup", "local"])?;
        }
        std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{}/accept_local", cli.dev),
            "1",
        )
        .map_err(|e| Failure(format!("accept_local on {}: {e}", cli.dev)))?;
    }

    let stamps = file_stamps(&cli.manifests);
    let owned = owned::owned_keys(&table);
    let watch = cli.watch.clone().map(watch_thread);
    let mut world = World {
        cli,
        table,
        loader,
        options,
        owned,
        plane,
        nat: NatPath::new(pool),
        routes: BTreeSet::new(),
        ipv6,
        node_ips,
        node_ports: BTreeSet::new(),
        stamps,
        start: std::time::Instant::now(),
    };
    world
        .plane
        .dp()
        .sync(&world.table, &world.table.full_change_set(), Instant::ZERO);
    if let Err(e) = world.route_vips() {
        world.unsteer();
        return Err(e);
    }
    println!("ready");

    let mut buf = vec![0u8; 65536];
    let mut answer = vec![0u8; ICMP_ERROR_MAX_V6];
    let mut last_check = std::time::Instant::now();
    let mut last_reclaim = last_check;
    let mut watch_open = watch.is_some();
    let mut failure = None;
    while !term.load(Ordering::Relaxed) {
        if hup.swap(false, Ordering::Relaxed) {
            if let Err(Failure(e)) = world.reload("SIGHUP") {
                eprintln!("tun: error: reload: {e}");
            }
        }
        if last_check.elapsed() >= Duration::from_millis(200) {
            last_check = std::time::Instant::now();
            if file_stamps(&world.cli.manifests) != world.stamps {
                if let Err(Failure(e)) = world.reload("manifests changed") {
                    eprintln!("tun: error: reload: {e}");
                    world.stamps = file_stamps(&world.cli.manifests);
                }
            }
            let now = world.now();
            if world.plane.dp().poll_timeout().is_some_and(|t| t <= now) {
                world.plane.dp().handle_timeout(now);
            }
            if last_reclaim.elapsed() >= Duration::from_secs(1) {
                last_reclaim = std::time::Instant::now();
                if let Some(ct) = world.plane.conntrack() {
                    world.nat.pool.reclaim(ct, now, |addr, client, frontend| {
                        println!("snat release {addr} client {client} frontend {frontend}");
                    });
                }
            }
        }
        if let (true, Some(rx)) = (watch_open, watch.as_ref()) {
            loop {
                match rx.try_recv() {
                    Ok(text) => {
                        if let Err(Failure(e)) = world.apply_watch(&text) {
                            eprintln!("tun: error: watch: {e}");
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        watch_open = false;
                        break;
                    }
                }
            }
        }
        // Non-blocking first (one syscall a packet under load), then a
        // bounded wait, so that signals, timers and the watch are seen.
        let n = match dev.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                match dev.recv_timeout(&mut buf, Duration::from_millis(50)) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::TimedOut | ErrorKind::Interrupted | ErrorKind::WouldBlock
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => {
                        failure = Some(Failure(format!("reading {}: {e}", world.cli.dev)));
                        break;
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                failure = Some(Failure(format!("reading {}: {e}", world.cli.dev)));
                break;
            }
        };
        let now = world.now();
        let out = match world.nat.handle(
            world.plane.dp(),
            world.plane.conntrack(),
            now,
            &mut buf[..n],
            &mut answer,
        ) {
            Out::Drop => None,
            Out::Send => Some(&buf[..n]),
            Out::Answer(len) => Some(&answer[..len]),
        };
        if let Some(packet) = out {
            if let Err(e) = dev.send(packet) {
                eprintln!("tun: error: writing {}: {e}", world.cli.dev);
            }
        }
    }
    world.unsteer();
    if let Some(f) = failure {
        return Err(f);
    }
    let stats = world.nat.stats;
    println!(
        "stats packets {} dnat {} reverse-nat {} dropped {} bad {} rejected {}",
        stats.packets, stats.dnat, stats.reverse, stats.dropped, stats.bad, stats.rejected
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("tun: error: {msg}");
            ExitCode::from(1)
        }
    }
}
