//! A userspace packet dataplane on a TUN device: every packet to a cluster
//! IP is routed by an svclb dataplane, DNATed to its backend and SNATed to
//! an address routed back into the device, and the backends' replies are
//! reverse-NATed through the dataplane's connection tracker.
//!
//! ```text
//! cargo run --example tun --features packet,serde -- \
//!     --manifests PATH... [--watch FILE|-] [--mode M] [--dev NAME]
//!     [--scheduler rr|wrr|lc|wlc|sh|mh|random] [--seed N] [--snat-pool CIDR]
//! ```
//!
//! As root, in the current network namespace, it
//! 1. opens the TUN device `--dev` (default `svtun0`), brings it up and
//!    prints `device NAME`;
//! 2. routes the SNAT pool (`--snat-pool`, default `169.254.0.0/17`) into
//!    it (`ip route replace POOL dev NAME`) and prints `snat POOL`;
//! 3. routes every IPv4 cluster IP of the manifests into it (`ip route
//!    replace VIP/32 dev NAME`), printing `route VIP/32 dev NAME` for each
//!    (and `unroute ...` when a reload removes one), then `ready`.
//!
//! Then, for every packet the kernel sends into the device:
//! - **to a cluster IP** (client -> frontend): [`Dataplane::packet`] with
//!   its TCP flags decides the backend (a tracked flow keeps its own); the
//!   packet is DNATed to the backend and SNATed to a pool address (one per
//!   client address and frontend, so that the translated 5-tuple is unique
//!   because the original one is) with the client's port, and written back
//!   into the device, where the kernel delivers it to the backend;
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
//! [`Dataplane::handle_timeout`]).
//!
//! Manifests are read with the loader every svclb program shares
//! ([`svclb::k8s::loader`]); `SIGHUP`, or a change of a manifest file's
//! size or modification time, re-applies them (objects are upserted; one
//! removed from the files stays until a watch event deletes it). `--watch
//! FILE|-` applies a watch stream (`kubectl get -w` output, YAML documents
//! or JSON objects) continuously, event by event, as it grows. `SIGINT` and
//! `SIGTERM` end the program with status 0 after printing one `stats` line;
//! the device and its routes go with it.
//!
//! Not handled: IPv6 services (their cluster IPs are not routed), SCTP
//! through the pool (it is NATed like TCP and UDP, untested), later IPv4
//! fragments (dropped unless their first fragment was seen), pool
//! addresses are never reclaimed while the program runs.

use std::collections::{BTreeSet, HashMap};
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, SystemTime};

use clap::{Parser, ValueEnum};
use svclb::conntrack::Conntrack;
use svclb::k8s::loader::{LoadOptions, Loader};
use svclb::packet::{
    FragmentTracker, ICMP_ERROR_MAX_V6, LinkType, PacketKind, TcpFlags, parse, port_unreachable,
    reverse_nat, rewrite_dst, rewrite_src,
};
use svclb::*;

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
}

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

/// The SNAT addresses: one per (client address, frontend), handed out in
/// order from the pool and kept for the life of the program. Because a
/// live original flow (protocol, client, client port, frontend) is unique,
/// so is its translation (protocol, pool address, client port, backend),
/// and the pool address alone gives the client and the frontend back.
struct SnatPool {
    base: u32,
    /// Usable addresses: the prefix without its first and last.
    size: u32,
    next: u32,
    by_key: HashMap<(IpAddr, SocketAddr), Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, (IpAddr, SocketAddr)>,
    prefix_len: u8,
}

impl SnatPool {
    fn parse(text: &str) -> Result<SnatPool> {
        let bad = || {
            Failure(format!(
                "--snat-pool: invalid value {text:?}: must be an IPv4 prefix such as 169.254.0.0/17, /8 to /30"
            ))
        };
        let (addr, len) = text.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&len) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - len);
        Ok(SnatPool {
            base: u32::from(addr) & mask,
            size: (1u32 << (32 - len)) - 2,
            next: 0,
            by_key: HashMap::new(),
            by_addr: HashMap::new(),
            prefix_len: len,
        })
    }

    fn prefix(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.base), self.prefix_len)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => (u32::from(a) ^ self.base) >> (32 - self.prefix_len) == 0,
            IpAddr::V6(_) => false,
        }
    }

    /// The pool address of (client, frontend), assigned on first use.
    fn address(&mut self, client: IpAddr, frontend: SocketAddr) -> Option<Ipv4Addr> {
        if let Some(a) = self.by_key.get(&(client, frontend)) {
            return Some(*a);
        }
        if self.next >= self.size {
            return None;
        }
        self.next += 1;
        let a = Ipv4Addr::from(self.base + self.next);
        self.by_key.insert((client, frontend), a);
        self.by_addr.insert(a, (client, frontend));
        Some(a)
    }

    fn owner(&self, ip: IpAddr) -> Option<(IpAddr, SocketAddr)> {
        match ip {
            IpAddr::V4(a) => self.by_addr.get(&a).copied(),
            IpAddr::V6(_) => None,
        }
    }
}

#[derive(Default)]
struct Stats {
    packets: u64,
    dnat: u64,
    reverse: u64,
    dropped: u64,
    bad: u64,
    rejected: u64,
}

/// What becomes of one packet read from the device.
enum Out {
    /// Nothing goes back.
    Drop,
    /// The packet, rewritten in place, goes back into the device.
    Send,
    /// An answer of this length (in the answer buffer) goes back instead:
    /// the ICMP port unreachable a rejected service gets.
    Answer(usize),
}

struct World {
    cli: Cli,
    table: ServiceTable,
    loader: Loader,
    plane: Plane,
    pool: SnatPool,
    routes: BTreeSet<Ipv4Addr>,
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

    /// Makes the routes into the device match the table's IPv4 cluster IPs.
    fn route_vips(&mut self) -> Result<()> {
        let want: BTreeSet<Ipv4Addr> = self
            .table
            .views()
            .flat_map(|v| v.service().cluster_ip().addrs().to_vec())
            .filter_map(|ip| match ip {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect();
        for vip in want.difference(&self.routes) {
            let dst = format!("{vip}/32");
            ip(&["route", "replace", &dst, "dev", &self.cli.dev])?;
            println!("route {dst} dev {}", self.cli.dev);
        }
        for vip in self.routes.difference(&want) {
            let dst = format!("{vip}/32");
            ip(&["route", "del", &dst, "dev", &self.cli.dev])?;
            println!("unroute {dst} dev {}", self.cli.dev);
        }
        self.routes = want;
        Ok(())
    }

    /// Re-applies every manifest path, each as one batch.
    fn reload(&mut self, why: &str) -> Result<()> {
        let mut sets = Vec::new();
        for path in self.cli.manifests.clone() {
            let report = self.loader.apply_manifest_path(&mut self.table, &path)?;
            for line in report.lines(false) {
                eprintln!("tun: note: {line}");
            }
            sets.extend(report.change_sets);
        }
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
/// a JSON object once its braces balance (counted naively, as kubectl's
/// output keeps them balanced), a YAML document at `---`, at the end of the
/// input, or (a file) when the file stops growing.
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
            depth: 0,
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
    depth: i64,
    tx: std::sync::mpsc::Sender<String>,
}

impl Events {
    /// Sends the document so far; `false` once the receiver is gone.
    fn send(&mut self) -> bool {
        self.depth = 0;
        let doc = std::mem::take(&mut self.doc);
        doc.trim().is_empty() || self.tx.send(doc).is_ok()
    }

    /// At a pause: a YAML document read so far is complete.
    fn flush_yaml(&mut self) -> bool {
        if self.depth > 0 {
            return true;
        }
        self.send()
    }

    fn line(&mut self, line: &str) -> bool {
        if line.trim_end() == "---" {
            return self.send();
        }
        let json =
            self.doc.trim().is_empty() && line.trim_start().starts_with('{') || self.depth > 0;
        self.doc.push_str(line);
        if json {
            self.depth += line.matches('{').count() as i64 - line.matches('}').count() as i64;
            if self.depth <= 0 {
                return self.send();
            }
        }
        true
    }
}

/// What to do with one packet read from the device.
fn handle(
    world: &mut World,
    buf: &mut [u8],
    answer: &mut [u8],
    fragments: &mut FragmentTracker,
    stats: &mut Stats,
) -> Out {
    stats.packets += 1;
    let now = world.now();
    let Ok(parsed) = parse(buf, LinkType::Ip) else {
        stats.bad += 1;
        return Out::Drop;
    };
    let Ok(flow) = fragments.resolve(&parsed, now) else {
        stats.dropped += 1;
        return Out::Drop;
    };
    let flags = parsed.tcp_flags().unwrap_or(TcpFlags::ACK);
    let icmp_error = matches!(parsed.kind(), PacketKind::IcmpError { .. });
    // An ICMP error carries the packet it is about: ours, translated
    // (pool address -> backend), so the pool address is its source.
    let (pool_side, peer) = if icmp_error {
        (flow.src, flow.dst)
    } else {
        (flow.dst, flow.src)
    };
    if world.pool.contains(pool_side.ip()) {
        // Back to the client: find the original flow, then its connection.
        let Some((client, frontend)) = world.pool.owner(pool_side.ip()) else {
            stats.dropped += 1;
            return Out::Drop;
        };
        let orig = Flow::new(
            flow.protocol,
            SocketAddr::new(client, pool_side.port()),
            frontend,
        );
        let Some(ct) = world.plane.conntrack() else {
            stats.dropped += 1;
            return Out::Drop;
        };
        let backend = if icmp_error {
            ct.get(&orig, now).map(|t| t.backend_addr)
        } else {
            ct.lookup_reply(&orig, flags, now).map(|h| h.backend_addr)
        };
        if backend != Some(peer) || reverse_nat(buf, &parsed, &orig, true).is_err() {
            stats.dropped += 1;
            return Out::Drop;
        }
        stats.reverse += 1;
        return Out::Send;
    }
    if icmp_error {
        stats.dropped += 1;
        return Out::Drop;
    }
    let dp = world.plane.dp();
    let fw = match dp.packet(&flow, flags, now) {
        Verdict::Forward(fw) => fw,
        // kube-proxy's REJECT: ICMP port unreachable, from the service.
        Verdict::Reject => {
            return match port_unreachable(buf, &parsed, answer) {
                Ok(n) => {
                    stats.rejected += 1;
                    Out::Answer(n)
                }
                Err(_) => {
                    stats.dropped += 1;
                    Out::Drop
                }
            };
        }
        _ => {
            stats.dropped += 1;
            return Out::Drop;
        }
    };
    let Some(snat) = world.pool.address(flow.src.ip(), flow.dst) else {
        dp.connection_closed(&flow, now);
        stats.dropped += 1;
        return Out::Drop;
    };
    let src = SocketAddr::new(IpAddr::V4(snat), flow.src.port());
    if fw.backend.is_ipv6()
        || rewrite_dst(buf, &parsed, fw.backend).is_err()
        || rewrite_src(buf, &parsed, src).is_err()
    {
        stats.dropped += 1;
        return Out::Drop;
    }
    stats.dnat += 1;
    Out::Send
}

fn run(cli: Cli) -> Result<()> {
    let scheduler: SchedulerKind = cli
        .scheduler
        .parse()
        .map_err(|e| Failure(format!("--scheduler: {e}")))?;
    let pool = SnatPool::parse(&cli.snat_pool)?;
    let config = DataplaneConfig::with_seed(cli.seed).scheduler(scheduler);
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

    let mut loader = Loader::new(LoadOptions::default());
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
    ip(&["route", "replace", &pool.prefix(), "dev", &cli.dev])?;
    println!("snat {}", pool.prefix());

    let stamps = file_stamps(&cli.manifests);
    let watch = cli.watch.clone().map(watch_thread);
    let mut world = World {
        cli,
        table,
        loader,
        plane,
        pool,
        routes: BTreeSet::new(),
        stamps,
        start: std::time::Instant::now(),
    };
    world
        .plane
        .dp()
        .sync(&world.table, &world.table.full_change_set(), Instant::ZERO);
    world.route_vips()?;
    println!("ready");

    let mut stats = Stats::default();
    let mut fragments = FragmentTracker::new(4096, Duration::from_secs(30));
    let mut buf = vec![0u8; 65536];
    let mut answer = vec![0u8; ICMP_ERROR_MAX_V6];
    let mut last_check = std::time::Instant::now();
    let mut watch_open = watch.is_some();
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
            fragments.handle_timeout(now);
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
                    Err(e) => return Err(Failure(format!("reading {}: {e}", world.cli.dev))),
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure(format!("reading {}: {e}", world.cli.dev))),
        };
        let out = match handle(
            &mut world,
            &mut buf[..n],
            &mut answer,
            &mut fragments,
            &mut stats,
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
