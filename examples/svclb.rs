//! `svclb`: a command-line front end over the library. It reads Kubernetes
//! Service and EndpointSlice manifests (YAML or JSON, as kubectl prints
//! them), builds a dataplane, and routes, replays, resolves or dumps.
//!
//! ```sh
//! cargo run --release --example svclb -- --manifests examples/manifests demo
//! cargo run --release --example svclb -- --mode ipvs --scheduler rr --manifests examples/manifests \
//!     route --src 10.0.0.1 --dst 10.96.0.10:80 --count 300
//! cargo run --release --example svclb -- --manifests examples/manifests replay examples/traces/web.trace
//! cargo run --release --example svclb -- --manifests examples/manifests \
//!     resolve _kafka._tcp.kafka-headless.messaging.svc.cluster.local --type SRV
//! cargo run --release --example svclb -- --manifests examples/manifests dump --format iptables
//! timeout 30 kubectl get services,endpointslices -A --watch --output-watch-events -o json > events.json
//! cargo run --release --example svclb -- --watch events.json dump --format nft --family both
//! ```
//!
//! Input goes through `svclb::k8s::loader` (the flags `--watch`,
//! `--service-cidr`, `--service-node-port-range`, `--keep-going`,
//! `--verbose` and the `--max-*` limits are its `LoadOptions`, parsed in `examples/shared/load.rs`, which the
//! proxy shares). `--watch -` reads standard input to its end.
//!
//! Exit status: 0 on success, 1 for bad input (a manifest, a trace line, a
//! refused change: the message names the file, the line or object, and the
//! field), 2 for bad usage (clap's).

#[path = "../benches/common/mod.rs"]
mod common;
#[path = "shared/load.rs"]
mod load;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant as WallClock;

use clap::{Parser, Subcommand, ValueEnum};
use svclb::k8s::dns::{ClusterDns, RecordType};
use svclb::k8s::loader::Loader;
use svclb::render::{self, Cidr, IpFamily, RenderOptions};
use svclb::trace::{TraceEvent, TraceLine, parse_trace};
use svclb::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// kube-proxy's iptables mode: an ordered rule list, O(n) lookup.
    Iptables,
    /// kube-proxy's nftables mode: a verdict map, O(1) lookup, a uniform
    /// `numgen random mod N` pick (the --scheduler flag does not apply).
    Nftables,
    /// kube-proxy's IPVS mode: a hash table of virtual services, O(1) lookup.
    Ipvs,
    /// The userspace model of the eBPF dataplane: the TC program's Maglev
    /// choice, so `route` prints the backend the kernel program picks.
    Ebpf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DumpFormat {
    /// `iptables-restore` input (kube-proxy's nat rules).
    Iptables,
    /// `nft -f` input (kube-proxy's nftables table).
    Nft,
    /// An `ipvsadm -ln` listing.
    Ipvsadm,
    /// kube-proxy's IPVS-mode ipsets (KUBE-CLUSTER-IP, KUBE-NODE-PORT-TCP,
    /// KUBE-LOAD-BALANCER, KUBE-EXTERNAL-IP, KUBE-LOOP-BACK, ...) as
    /// `ipset restore` input.
    Ipset,
    /// The addresses kube-proxy's IPVS mode binds to the dummy interface
    /// kube-ipvs0, as `ip -batch` input (`address add IP/32 dev kube-ipvs0`).
    #[value(name = "kube-ipvs0")]
    KubeIpvs0,
    /// The iptables rules kube-proxy's IPVS mode writes around those ipsets
    /// (KUBE-SERVICES, KUBE-NODE-PORT, KUBE-LOAD-BALANCER,
    /// KUBE-PROXY-FIREWALL, KUBE-IPVS-FILTER, ...), as `iptables-restore`
    /// input.
    #[value(name = "ipvs-iptables")]
    IpvsIptables,
    /// The tracked connections: `conntrack -L` in iptables and nftables
    /// mode, `ipvsadm -lnc` in IPVS mode.
    Conntrack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FamilyArg {
    /// IPv4 (kube-proxy's iptables / `ip` nftables table).
    Ipv4,
    /// IPv6 (ip6tables / `ip6` nftables table).
    Ipv6,
    /// Both, one after the other (nft only).
    Both,
}

#[derive(Debug, Parser)]
#[command(
    name = "svclb",
    about = "Kubernetes Service load balancing, from manifests to verdicts",
    after_help = "PATH is a file or a directory of YAML/JSON manifests (Service, EndpointSlice, List kinds)."
)]
struct Cli {
    /// Dataplane mode.
    #[arg(long, value_enum, default_value = "iptables")]
    mode: Mode,
    /// IPVS scheduler: rr, wrr, lc, wlc, sh, sh-port, mh, mh-port, random
    /// (iptables mode always uses its random cascade).
    #[arg(long, default_value = "rr")]
    scheduler: String,
    /// Seed of the dataplane's random source (same seed, same run).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The cluster's pod CIDR: adds kube-proxy's masquerade rules to dumps,
    /// and is the dataplane's local-traffic detector (masquerade decision,
    /// short-circuit of pod traffic to external Local destinations).
    #[arg(long)]
    cluster_cidr: Option<String>,
    #[command(flatten)]
    node_addrs: load::NodeAddrArgs,
    /// kube-proxy's --masquerade-all: masquerade all cluster-IP traffic.
    #[arg(long)]
    masquerade_all: bool,
    /// Turn connection tracking off: every packet is scheduled afresh.
    #[arg(long)]
    no_conntrack: bool,
    /// Manifest files or directories (`--manifests A B C`, or the flag
    /// repeated); each path is one batch, in order.
    #[arg(long, required_unless_present = "watch", action = clap::ArgAction::Append, value_name = "PATH...")]
    manifests: Vec<PathBuf>,
    /// A watch stream (`kubectl get services,endpointslices -A --watch
    /// --output-watch-events -o json|yaml`), `-` for standard input (read to
    /// its end); applied event by event after --manifests. Repeatable.
    #[arg(long, action = clap::ArgAction::Append, value_name = "FILE|-")]
    watch: Vec<PathBuf>,
    /// The loader's flags (`--node`, `--zone`, `--service-cidr`,
    /// `--service-node-port-range`, `--keep-going`, `--verbose`,
    /// `--max-*`), shared with the proxy.
    #[command(flatten)]
    load: load::LoadArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Route one flow (or --count flows) and print the verdict(s):
    /// `FORWARD BACKEND`, `REJECT`, `DROP` or `NO-SERVICE`, with a trailing
    /// ` masquerade` where kube-proxy would masquerade (SNAT) the forward.
    Route {
        /// Source IP[:PORT].
        #[arg(long)]
        src: String,
        /// Destination IP:PORT.
        #[arg(long)]
        dst: SocketAddr,
        /// Protocol: tcp, udp or sctp.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// Send N flows (varying the source port unless one is given) and
        /// print a histogram, one `BACKEND COUNT` per line (`BACKEND COUNT
        /// masquerade` for masqueraded forwards), then `VERDICT COUNT`.
        #[arg(long)]
        count: Option<u32>,
    },
    /// Replay a trace of timed connect/close/apply/delete events.
    Replay {
        /// The trace file.
        trace: PathBuf,
        /// After the replay, print the dataplane in this format (e.g.
        /// `conntrack`).
        #[arg(long, value_enum)]
        dump: Option<DumpFormat>,
        /// Write each sync's rules as kube-proxy's partial syncs write them:
        /// `DIR/0001.iptables` and `DIR/0001.nft` for the rules the
        /// manifests give (a full sync), then `0002.*`, ... for each
        /// `apply` and `delete` (partial syncs). Prints a `sync NNNN:` line
        /// per sync with its bytes and those of a full rewrite.
        #[arg(long, value_name = "DIR")]
        syncs: Option<PathBuf>,
    },
    /// Answer a cluster DNS question.
    Resolve {
        /// The name, e.g. kafka-0.kafka-headless.messaging.svc.cluster.local.
        name: String,
        /// The record type: A, AAAA, SRV or CNAME.
        #[arg(long = "type", default_value = "A")]
        qtype: String,
        /// The cluster domain (DNS zone).
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
    },
    /// Print the dataplane as the real tools would.
    Dump {
        /// iptables, nft, ipvsadm, ipset, kube-ipvs0, ipvs-iptables or
        /// conntrack.
        #[arg(long, value_enum)]
        format: DumpFormat,
        /// The family rendered (iptables, nft, ipset, kube-ipvs0,
        /// ipvs-iptables): ipv4, ipv6, or for nft, ipset and kube-ipvs0
        /// both.
        #[arg(long, value_enum, default_value = "ipv4")]
        family: FamilyArg,
    },
    /// Answer a service's health-check node port as kube-proxy does on this
    /// node (--node): prints the status and the body.
    Health {
        /// The service, NAMESPACE/NAME.
        service: String,
    },
    /// The demonstration: listing, a routed trace, headless DNS, lookup cost.
    Demo {
        /// The largest synthetic cluster of the lookup-cost table.
        #[arg(long, default_value_t = 5000)]
        max_services: usize,
    },
}

/// A failure, already worded for the user.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

type Result<T, E = Failure> = std::result::Result<T, E>;

fn fail<T>(msg: impl Into<String>) -> Result<T> {
    Err(Failure(msg.into()))
}

/// The dataplanes the CLI can build.
enum Plane {
    Iptables(IptablesDataplane),
    Ipvs(IpvsDataplane),
    Nftables(NftablesDataplane),
}

impl Plane {
    fn dp(&self) -> &dyn Dataplane {
        match self {
            Plane::Iptables(d) => d,
            Plane::Ipvs(d) => d,
            Plane::Nftables(d) => d,
        }
    }
}

/// Everything a command works on.
struct World {
    table: ServiceTable,
    loader: Loader,
    verbose: bool,
    plane: Plane,
    config: DataplaneConfig,
    render: RenderOptions,
}

const COMMANDS: [&str; 7] = [
    "route", "replay", "resolve", "dump", "health", "demo", "help",
];

/// `--manifests A B demo` -> `--manifests A --manifests B demo`: the paths
/// run until the next flag or command name (clap alone would take `demo` as
/// a path).
fn split_manifest_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_paths = false;
    for arg in args {
        if arg == "--manifests" {
            in_paths = true;
            continue;
        }
        if in_paths && !arg.starts_with('-') && !COMMANDS.contains(&arg.as_str()) {
            out.push("--manifests".to_owned());
            out.push(arg);
            continue;
        }
        in_paths = false;
        out.push(arg);
    }
    out
}

fn main() -> ExitCode {
    let mut cli = Cli::parse_from(split_manifest_args(std::env::args()));
    if matches!(cli.command, Command::Demo { .. })
        && cli.load.node.is_none()
        && cli.load.zone.is_none()
    {
        // The demo runs on node-a in zone-a of the bundled manifests.
        cli.load.node = Some("node-a".into());
        cli.load.zone = Some("zone-a".into());
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("svclb: error: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let world = setup(&cli)?;
    match cli.command {
        Command::Route {
            src,
            dst,
            proto,
            count,
        } => route(&world, &src, dst, &proto, count),
        Command::Replay { trace, dump, syncs } => replay(world, &trace, dump, syncs.as_deref()),
        Command::Resolve {
            name,
            qtype,
            cluster_domain,
        } => resolve(&world, &name, &qtype, &cluster_domain),
        Command::Dump { format, family } => {
            print!("{}", dump_family(&world, format, family)?);
            Ok(())
        }
        Command::Health { service } => health(&world, &service),
        Command::Demo { max_services } => demo(world, max_services),
    }
}

fn health(world: &World, service: &str) -> Result<()> {
    let Some((ns, name)) = service.split_once('/') else {
        return fail(format!(
            "health: invalid value {service:?}: must be NAMESPACE/NAME"
        ));
    };
    let key = ServiceKey::new(ns, name);
    if world.table.service(&key).is_none() {
        return fail(format!("health: no service {key}"));
    }
    let Some(r) = svclb::k8s::health::service_health(&world.table, &world.config.node, &key, true)
    else {
        return fail(format!(
            "health: {key} has no healthCheckNodePort (only LoadBalancer services with externalTrafficPolicy Local have one)"
        ));
    };
    println!("{}", r.status_line());
    println!("{}", r.body);
    Ok(())
}

fn setup(cli: &Cli) -> Result<World> {
    let scheduler: SchedulerKind = cli
        .scheduler
        .parse()
        .map_err(|e| Failure(format!("--scheduler: {e}")))?;
    let node = cli.load.node();
    let mut config = DataplaneConfig::with_seed(cli.seed)
        .node(node.clone())
        .scheduler(scheduler);
    config.count_connections = true;
    if cli.no_conntrack {
        config.conntrack = None;
    }
    cli.node_addrs.apply(&mut config)?;
    config.masquerade_all = cli.masquerade_all;
    let mut render = RenderOptions::default().node(node);
    // The node's IPs and --nodeport-addresses: the nft `nodeport-ips`
    // elements, the iptables per-IP node-port jumps, allowFromNode.
    for ip in &config.node_ips {
        render = render.node_ip(*ip);
    }
    for cidr in &config.nodeport_addresses {
        render = render.nodeport_address(*cidr);
    }
    if let Some(cidr) = &cli.cluster_cidr {
        let cidr = Cidr::parse("--cluster-cidr", cidr).map_err(|e| Failure(e.to_string()))?;
        render = render.cluster_cidr(cidr);
        config.cluster_cidrs.push(cidr);
    }
    let options = cli.load.options()?;
    let mut loader = Loader::new(options);
    let mut table = ServiceTable::new();
    let report = loader.load(&mut table, &cli.manifests, &cli.watch)?;
    for line in report.lines(cli.load.verbose) {
        eprintln!("svclb: note: {line}");
    }
    let plane = match cli.mode {
        Mode::Iptables => Plane::Iptables(IptablesDataplane::new(config.clone())),
        Mode::Ipvs => Plane::Ipvs(IpvsDataplane::new(config.clone())),
        Mode::Nftables => Plane::Nftables(NftablesDataplane::new(config.clone())),
        Mode::Ebpf => Plane::Ipvs(IpvsDataplane::ebpf_model(config.clone())),
    };
    plane
        .dp()
        .sync(&table, &table.full_change_set(), Instant::ZERO);
    Ok(World {
        table,
        loader,
        verbose: cli.load.verbose,
        plane,
        config,
        render,
    })
}

/// Reads every manifest under `path` and applies it as one batch; returns
/// what changed.
fn apply_path(world: &mut World, path: &Path) -> Result<ChangeSet> {
    let report = world.loader.apply_manifest_path(&mut world.table, path)?;
    for line in report.lines(world.verbose) {
        eprintln!("svclb: note: {line}");
    }
    Ok(report.change_sets.into_iter().last().unwrap_or_default())
}

fn parse_proto(s: &str) -> Result<Protocol> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "sctp" => Ok(Protocol::Sctp),
        _ => fail(format!(
            "--proto: invalid value {s:?}: must be tcp, udp or sctp"
        )),
    }
}

/// `IP` or `IP:PORT` (`[v6]:PORT`).
fn parse_src(s: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    match s.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
        Ok(ip) => Ok((ip, None)),
        Err(_) => fail(format!("--src: invalid value {s:?}: must be IP or IP:PORT")),
    }
}

const FIRST_EPHEMERAL_PORT: u16 = 40_000;

fn route(world: &World, src: &str, dst: SocketAddr, proto: &str, count: Option<u32>) -> Result<()> {
    let protocol = parse_proto(proto)?;
    let (ip, port) = parse_src(src)?;
    if ip.is_ipv4() != dst.is_ipv4() {
        return fail(format!(
            "--src {src} and --dst {dst}: source and destination must be of one address family"
        ));
    }
    let dp = world.plane.dp();
    let Some(n) = count else {
        let flow = Flow::new(
            protocol,
            SocketAddr::new(ip, port.unwrap_or(FIRST_EPHEMERAL_PORT)),
            dst,
        );
        let verdict = dp.route(&flow, Instant::ZERO);
        println!("{verdict}{}", masquerade_token(&verdict));
        return Ok(());
    };
    let mut histogram: BTreeMap<String, u64> = BTreeMap::new();
    // Keyed by (backend, masquerade): the decision is per flow.
    let mut backends: BTreeMap<(SocketAddr, bool), u64> = BTreeMap::new();
    for i in 0..n {
        let sport = port.unwrap_or_else(|| {
            let span = u32::from(u16::MAX - FIRST_EPHEMERAL_PORT) + 1;
            FIRST_EPHEMERAL_PORT + (i % span) as u16
        });
        let flow = Flow::new(protocol, SocketAddr::new(ip, sport), dst);
        match dp.route(&flow, Instant::from_millis(u64::from(i))) {
            Verdict::Forward(svclb::Forward {
                backend: b,
                masquerade,
                ..
            }) => *backends.entry((b, masquerade)).or_default() += 1,
            other => *histogram.entry(other.kind_str().to_owned()).or_default() += 1,
        }
    }
    for ((b, masquerade), c) in backends {
        let token = if masquerade { " masquerade" } else { "" };
        println!("{b} {c}{token}");
    }
    for (v, c) in histogram {
        println!("{v} {c}");
    }
    Ok(())
}

/// ` masquerade` after a forward kube-proxy would masquerade (SNAT), else
/// nothing: `route`'s trailing token.
fn masquerade_token(v: &Verdict) -> &'static str {
    match v {
        Verdict::Forward(fw) if fw.masquerade => " masquerade",
        _ => "",
    }
}

/// Runs the dataplane's timers up to `at`, in bounded steps.
fn run_timers(dp: &dyn Dataplane, at: Instant) {
    for _ in 0..1024 {
        match dp.poll_timeout() {
            Some(t) if t <= at => dp.handle_timeout(at),
            _ => break,
        }
    }
}

/// Runs a parsed trace against the world, printing a line per connect and
/// per packet: `T SRC -> DST VERDICT [BACKEND]`. Timers run from the
/// trace's clock before each event. Returns the text and the last time.
/// `base` resolves relative `apply` paths that do not exist from the
/// working directory.
fn run_trace(
    world: &mut World,
    lines: &[TraceLine],
    source: &str,
    base: &Path,
    mut syncs: Option<&mut Syncs>,
) -> Result<(String, Instant)> {
    let mut out = String::new();
    let mut last = Instant::ZERO;
    for line in lines {
        let at = line.at;
        last = last.max(at);
        let here = |msg: String| Failure(format!("{source}: line {}: {msg}", line.line));
        run_timers(world.plane.dp(), at);
        match &line.event {
            TraceEvent::Connect(flow) | TraceEvent::Packet(flow, _) => {
                let dp = world.plane.dp();
                let v = match &line.event {
                    TraceEvent::Packet(_, flags) => dp.packet(flow, *flags, at),
                    _ => dp.route(flow, at),
                };
                let _ = writeln!(
                    out,
                    "{:.3} {} -> {} {v}",
                    at.as_secs_f64(),
                    flow.src,
                    flow.dst
                );
            }
            TraceEvent::Close(flow) => {
                world.plane.dp().connection_closed(flow, at);
            }
            TraceEvent::Tick => {}
            TraceEvent::Apply(path) => {
                let p = Path::new(path);
                let p = if p.exists() || p.is_absolute() {
                    p.to_owned()
                } else {
                    base.join(p)
                };
                let changes = apply_path(world, &p).map_err(|Failure(m)| here(m))?;
                world.plane.dp().sync(&world.table, &changes, at);
                if let Some(s) = syncs.as_deref_mut() {
                    out.push_str(&s.sync(&world.table, at)?);
                }
            }
            TraceEvent::Delete { .. } => {
                let change = line
                    .event
                    .delete_change()
                    .expect("a delete event makes a change");
                let changes = world.table.apply(change).map_err(|e| here(e.to_string()))?;
                world.plane.dp().sync(&world.table, &changes, at);
                if let Some(s) = syncs.as_deref_mut() {
                    out.push_str(&s.sync(&world.table, at)?);
                }
            }
            other => return Err(here(format!("unsupported event {other:?}"))),
        }
    }
    Ok((out, last))
}

/// `replay --syncs DIR`: kube-proxy's syncs, one pair of files per sync.
struct Syncs {
    dir: PathBuf,
    iptables: render::iptables::Syncer,
    nft: render::nft::Syncer,
    count: usize,
}

impl Syncs {
    fn new(dir: &Path, opts: &RenderOptions) -> Result<Syncs> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure(format!("--syncs {}: {e}", dir.display())))?;
        Ok(Syncs {
            dir: dir.to_owned(),
            iptables: render::iptables::Syncer::new(opts.clone()),
            nft: render::nft::Syncer::new(opts.clone()),
            count: 0,
        })
    }

    /// Writes this sync's files; returns its `sync NNNN: ...` line.
    fn sync(&mut self, table: &ServiceTable, at: Instant) -> Result<String> {
        self.count += 1;
        let n = self.count;
        let ipt = self.iptables.sync(table, at);
        let nft = self.nft.sync(table, at);
        let ipt_full = render::iptables::render(table, self.iptables.options()).len();
        let nft_full = render::nft::render(table, self.nft.options()).len();
        for (ext, text) in [("iptables", &ipt.text), ("nft", &nft.text)] {
            let path = self.dir.join(format!("{n:04}.{ext}"));
            std::fs::write(&path, text).map_err(|e| Failure(format!("{}: {e}", path.display())))?;
        }
        Ok(format!(
            "sync {n:04}: iptables {} bytes (full {ipt_full}), nft {} bytes (full {nft_full})\n",
            ipt.text.len(),
            nft.text.len(),
        ))
    }
}

fn replay(
    mut world: World,
    trace: &Path,
    then: Option<DumpFormat>,
    syncs: Option<&Path>,
) -> Result<()> {
    let text =
        std::fs::read_to_string(trace).map_err(|e| Failure(format!("{}: {e}", trace.display())))?;
    let source = trace.display().to_string();
    let lines = parse_trace(&text).map_err(|e| Failure(format!("{source}: {e}")))?;
    let base = trace.parent().unwrap_or(Path::new("."));
    let mut syncs = syncs.map(|d| Syncs::new(d, &world.render)).transpose()?;
    if let Some(s) = syncs.as_mut() {
        // The rules the manifests give, before the trace's first event.
        print!("{}", s.sync(&world.table, Instant::ZERO)?);
    }
    let (out, last) = run_trace(&mut world, &lines, &source, base, syncs.as_mut())?;
    print!("{out}");
    if let Some(format) = then {
        print!("{}", dump(&world, format, last));
    }
    Ok(())
}

fn resolve(world: &World, name: &str, qtype: &str, zone: &str) -> Result<()> {
    let qtype: RecordType = qtype.parse().map_err(|e| Failure(format!("--type: {e}")))?;
    let dns = ClusterDns::new(zone).map_err(|e| Failure(format!("--cluster-domain: {e}")))?;
    let answer = dns.resolve(&world.table, name, qtype)?;
    println!("{answer}");
    Ok(())
}

/// `dump --format F --family X`, with a note for each service left out
/// because it has no cluster IP of the rendered family.
fn dump_family(world: &World, format: DumpFormat, family: FamilyArg) -> Result<String> {
    let families: &[IpFamily] = match (format, family) {
        (_, FamilyArg::Ipv4) => &[IpFamily::V4],
        (_, FamilyArg::Ipv6) => &[IpFamily::V6],
        (DumpFormat::Nft | DumpFormat::Ipset | DumpFormat::KubeIpvs0, FamilyArg::Both) => {
            &[IpFamily::V4, IpFamily::V6]
        }
        (DumpFormat::Iptables | DumpFormat::IpvsIptables, FamilyArg::Both) => {
            return fail(
                "--family both: iptables-restore and ip6tables-restore take separate inputs; use --family ipv4 or ipv6",
            );
        }
        (DumpFormat::Ipvsadm | DumpFormat::Conntrack, FamilyArg::Both) => &[IpFamily::V4],
    };
    if matches!(format, DumpFormat::Ipvsadm | DumpFormat::Conntrack) {
        return Ok(dump(world, format, Instant::ZERO));
    }
    let mut out = String::new();
    for &f in families {
        let left_out = render::services_outside_family(&world.table, f);
        let other = match f {
            IpFamily::V4 => "ipv6",
            IpFamily::V6 => "ipv4",
        };
        let name = match f {
            IpFamily::V4 => "ipv4",
            IpFamily::V6 => "ipv6",
        };
        if families.len() == 1 && !left_out.is_empty() {
            if world.verbose || left_out.len() <= 3 {
                for key in &left_out {
                    eprintln!(
                        "svclb: note: Service {key} has no {name} cluster IP: left out of this rendering (--family {other} renders it)"
                    );
                }
            } else {
                let first: Vec<String> = left_out.iter().take(3).map(ToString::to_string).collect();
                eprintln!(
                    "svclb: note: {} services have no {name} cluster IP and are left out of this rendering ({}, ...; --family {other} renders them, --verbose lists them)",
                    left_out.len(),
                    first.join(", ")
                );
            }
        }
        let render = world.render.clone().family(f);
        out.push_str(&match format {
            DumpFormat::Iptables => render::iptables::render(&world.table, &render),
            DumpFormat::Ipset => render::ipset::render(&world.table, &render),
            DumpFormat::KubeIpvs0 => render::ipset::render_kube_ipvs0(&world.table, &render),
            DumpFormat::IpvsIptables => render::ipset::render_iptables(&world.table, &render),
            _ => render::nft::render(&world.table, &render),
        });
    }
    Ok(out)
}

fn dump(world: &World, format: DumpFormat, now: Instant) -> String {
    match format {
        DumpFormat::Conntrack => {
            let dp = world.plane.dp();
            let entries = dp.connections(now);
            match &world.plane {
                Plane::Ipvs(_) => render::conntrack::ipvsadm_lnc(&entries, now),
                _ => render::conntrack::conntrack_l(&entries, now),
            }
        }
        DumpFormat::Iptables => render::iptables::render(&world.table, &world.render),
        DumpFormat::Nft => render::nft::render(&world.table, &world.render),
        DumpFormat::Ipset => render::ipset::render(&world.table, &world.render),
        DumpFormat::KubeIpvs0 => render::ipset::render_kube_ipvs0(&world.table, &world.render),
        DumpFormat::IpvsIptables => render::ipset::render_iptables(&world.table, &world.render),
        DumpFormat::Ipvsadm => match &world.plane {
            Plane::Ipvs(dp) => render::ipvsadm::render(&world.table, dp, &world.render),
            Plane::Iptables(_) | Plane::Nftables(_) => {
                // A listing of what IPVS mode would program for this table.
                let dp = IpvsDataplane::new(world.config.clone());
                dp.sync(&world.table, &world.table.full_change_set(), Instant::ZERO);
                render::ipvsadm::render(&world.table, &dp, &world.render)
            }
        },
    }
}

/// The demo's trace: web traffic from three clients, one client's repeated
/// calls to the inference API (ClientIP affinity: always the same backend),
/// the Local-policy exporter, a headless pod IP, and web losing its
/// endpoints.
const DEMO_TRACE: &str = "\
0.000 connect tcp 10.244.9.11:40001 10.96.0.10:80
0.010 connect tcp 10.244.9.12:40002 10.96.0.10:80
0.020 connect tcp 10.244.9.13:40003 10.96.0.10:80
1.000 connect tcp 10.244.9.21:41001 10.96.40.12:8000
1.500 close tcp 10.244.9.21:41001 10.96.40.12:8000
2.000 connect tcp 10.244.9.21:41002 10.96.40.12:8000
2.500 close tcp 10.244.9.21:41002 10.96.40.12:8000
3.000 connect tcp 10.244.9.21:41003 10.96.40.12:8000
3.100 connect tcp 10.244.9.22:42001 10.96.40.12:8000
4.000 connect tcp 10.244.9.31:43001 10.96.50.5:9100
5.000 connect tcp 10.244.9.41:44001 10.244.1.8:9092
6.000 delete EndpointSlice default/web-x7k2p
6.100 connect tcp 10.244.9.11:40004 10.96.0.10:80
";

fn demo(mut world: World, max_services: usize) -> Result<()> {
    println!(
        "svclb demo: {} services from the manifests, {} mode, node {} in zone {}\n",
        world.table.len(),
        world.plane.dp().mode(),
        world.config.node.node_name.as_deref().unwrap_or("(none)"),
        world.config.node.zone.as_deref().unwrap_or("(none)"),
    );
    println!("== The dataplane, as `ipvsadm -ln` would list it");
    print!("{}", dump(&world, DumpFormat::Ipvsadm, Instant::ZERO));

    println!("\n== A routed trace (T SRC -> DST VERDICT [BACKEND])");
    println!("   inference-api has ClientIP affinity (3600 s): 10.244.9.21 keeps its backend;");
    println!(
        "   node-metrics is Local; 10.244.1.8 is a headless Kafka pod; web then loses its slice."
    );
    let lines = parse_trace(DEMO_TRACE).map_err(|e| Failure(format!("demo trace: {e}")))?;
    let keep = world.table.clone();
    print!(
        "{}",
        run_trace(&mut world, &lines, "demo trace", Path::new("."), None)?.0
    );
    world.table = keep;
    world
        .plane
        .dp()
        .sync(&world.table, &world.table.full_change_set(), Instant::ZERO);

    println!("\n== Headless DNS: kafka-headless.messaging (no VIP; DNS hands out the pods)");
    let dns = ClusterDns::default();
    for (name, ty) in [
        ("kafka-headless.messaging.svc.cluster.local", RecordType::A),
        (
            "kafka-0.kafka-headless.messaging.svc.cluster.local",
            RecordType::A,
        ),
        (
            "_kafka._tcp.kafka-headless.messaging.svc.cluster.local",
            RecordType::Srv,
        ),
        ("web.default.svc.cluster.local", RecordType::A),
    ] {
        println!("; {name} {ty}");
        println!("{}", dns.resolve(&world.table, name, ty)?);
    }

    println!("\n== Lookup cost: iptables walks a rule list (O(n)), IPVS hashes (O(1))");
    println!(
        "   ns per lookup in this process (median of 7 passes of 2048 flows to random services, 5 endpoints each)"
    );
    println!(
        "{:>9} {:>14} {:>14} {:>8}",
        "services", "iptables ns", "ipvs ns", "ratio"
    );
    let mut n = 10;
    while n <= max_services.max(10) {
        let table = common::cluster(n, 5);
        let (ipt, ipvs) = common::dataplanes(&table);
        let flows = common::flow_mix(n, 2048, 7);
        // A warm-up pass, then the median of 7 timed passes over the flows.
        let per = |dp: &dyn Dataplane| {
            let mut samples: Vec<f64> = (0..8u64)
                .map(|pass| {
                    let start = WallClock::now();
                    for f in &flows {
                        black_box(dp.route(black_box(f), Instant::from_secs(pass)));
                    }
                    start.elapsed().as_nanos() as f64 / flows.len() as f64
                })
                .skip(1)
                .collect();
            samples.sort_by(f64::total_cmp);
            samples[samples.len() / 2]
        };
        let (a, b) = (per(&ipt), per(&ipvs));
        println!("{n:>9} {a:>14.0} {b:>14.0} {:>7.1}x", a / b);
        n *= 10;
        if n > max_services && n / 10 < max_services {
            n = max_services;
        }
    }
    Ok(())
}
