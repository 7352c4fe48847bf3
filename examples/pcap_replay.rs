//! Replays a pcap through a dataplane: every packet is parsed, routed,
//! NATed in place with incremental checksums, and written to a new pcap;
//! then a summary per service and, under it, per frontend (packets,
//! bytes, per backend) is printed.
//!
//! ```text
//! cargo run --example pcap_replay --features packet,serde -- \
//!     --manifests examples/manifests --in IN.pcap --out OUT.pcap [--mode ipvs]
//!     [--watch FILE] [--masquerade-all] [--snat-ip IP] [--snat-ip6 IP]
//!     [--snat-ports LO-HI]
//! ```
//!
//! `--watch FILE` is a watch stream (`kubectl get -w` output: YAML
//! documents, or JSON objects such as `kubectl get -w
//! --output-watch-events -o json` prints) applied after the manifests and
//! before the first packet, event by event, each synced into the
//! dataplane: the capture is replayed against the state the stream leads
//! to (a watch event carries no time to place it among the packets).
//!
//! - Original-direction packets to a frontend go through the dataplane's
//!   connection layer (`Dataplane::packet` with their TCP flags: a new
//!   flow is scheduled and tracked, a tracked one keeps its backend) and
//!   are DNATed to the backend.
//! - Replies from a backend to a client are found in the same tracker by
//!   their 5-tuple (`Dataplane::reply`, which advances the connection's
//!   state) and get reverse NAT back to the frontend ([`reverse`]); so do
//!   ICMP errors a backend sends about a client's packet, found with
//!   `Dataplane::peek_reply` (no state change). The example keeps no flow
//!   table of its own.
//! - Where the verdict says to masquerade (`Forward::masquerade`: with
//!   `--masquerade-all`, or external traffic kube-proxy masquerades) and
//!   `--snat-ip` (`--snat-ip6`) gives the node address of the packet's
//!   family, the source is rewritten too (full NAT) to that address and a
//!   port from `--snat-ports LO-HI` (default 32768-60999) that no other
//!   flow to the same backend holds (`SourcePortAllocator`); the
//!   backend's replies to it, and its ICMP errors about it, get both
//!   addresses back. A port is held while the connection layer tracks
//!   its connection (`Dataplane::peek`); once it ended (closed and
//!   expired, or its backend gone) the port is released, on the replay's
//!   clock (the capture's timestamps), so a long capture reuses ports
//!   and never hands out one a live connection holds. When a backend's
//!   range is used up by live connections, further flows to it are
//!   refused. Without an address of the family the packet is DNATed only
//!   and counted as `unmasqueraded`.
//! - Later IPv4/IPv6 fragments are matched to their datagram through the
//!   connection layer: a first fragment's datagram is recorded for its
//!   connection once routed (`Dataplane::first_fragment`), and a later
//!   one follows that connection's backend (`Dataplane::later_fragment`),
//!   in either direction; the unmatched ones are dropped, never guessed.
//! - Packets that do not parse, and rejected or dropped flows, are not
//!   written; anything else passes untouched.
//!
//! Link types: Ethernet (1) and raw IP (101, 228, 229).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use pcap_file::DataLink;
use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};
use svclb::k8s::loader::{LoadOptions, Loader};
use svclb::k8s::manifest::Manifests;
use svclb::packet::{
    LinkType, PacketKind, ParsedPacket, RewriteError, SourcePortAllocator, TcpFlags, parse,
    reverse_nat, rewrite_dst, rewrite_src,
};
use svclb::*;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// kube-proxy's iptables mode.
    Iptables,
    /// kube-proxy's nftables mode.
    Nftables,
    /// kube-proxy's IPVS mode.
    Ipvs,
}

#[derive(Debug, Parser)]
#[command(about = "Replay a pcap through an svclb dataplane, NATing every packet")]
struct Cli {
    /// Manifest files or directories (YAML/JSON Services and EndpointSlices).
    #[arg(long, num_args = 1.., required = true)]
    manifests: Vec<PathBuf>,
    /// The capture to replay.
    #[arg(long = "in")]
    input: PathBuf,
    /// Where to write the rewritten capture.
    #[arg(long = "out")]
    output: PathBuf,
    /// Dataplane mode.
    #[arg(long, value_enum, default_value = "ipvs")]
    mode: Mode,
    /// Seed of the dataplane's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A watch stream applied after the manifests, before the first packet.
    #[arg(long)]
    watch: Option<PathBuf>,
    /// kube-proxy's --masquerade-all: masquerade all cluster-IP traffic.
    #[arg(long)]
    masquerade_all: bool,
    /// The IPv4 address masqueraded flows take (full NAT).
    #[arg(long, value_name = "IP")]
    snat_ip: Option<std::net::Ipv4Addr>,
    /// The IPv6 address masqueraded flows take (full NAT).
    #[arg(long, value_name = "IP")]
    snat_ip6: Option<std::net::Ipv6Addr>,
    /// The source ports masqueraded flows take, per backend.
    #[arg(long, value_name = "LO-HI", default_value = "32768-60999", value_parser = port_range)]
    snat_ports: (u16, u16),
}

/// `LO-HI`, 1 <= LO <= HI <= 65535.
fn port_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("invalid value {text:?}: must be LO-HI with 1 <= LO <= HI <= 65535");
    let (lo, hi) = text.split_once('-').ok_or_else(bad)?;
    let (lo, hi): (u16, u16) = (
        lo.parse().map_err(|_| bad())?,
        hi.parse().map_err(|_| bad())?,
    );
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// The masqueraded flows: each original flow's SNAT address and port, and
/// the way back from (protocol, backend, SNAT address) to the original.
struct Masquerade {
    ip4: Option<IpAddr>,
    ip6: Option<IpAddr>,
    ports: SourcePortAllocator,
    /// Each masqueraded flow's SNAT address and backend.
    by_flow: HashMap<Flow, (SocketAddr, SocketAddr)>,
    back: HashMap<(Protocol, SocketAddr, SocketAddr), Flow>,
}

impl Masquerade {
    fn ip_for(&self, client: IpAddr) -> Option<IpAddr> {
        if client.is_ipv6() { self.ip6 } else { self.ip4 }
    }

    /// Whether `ip` is a SNAT address.
    fn is_snat(&self, ip: IpAddr) -> bool {
        Some(ip) == self.ip4 || Some(ip) == self.ip6
    }

    /// The SNAT address of `flow` going to `backend`; a new port the first
    /// time.
    /// A port is unique per backend: a flow rescheduled to another backend
    /// (its first one gone) gives its old port back and takes a new one.
    fn source(&mut self, flow: &Flow, backend: SocketAddr) -> Option<SocketAddr> {
        match self.by_flow.get(flow) {
            Some(&(snat, b)) if b == backend => return Some(snat),
            Some(_) => self.release(flow),
            None => {}
        }
        let ip = self.ip_for(flow.src.ip())?;
        let port = self.ports.allocate(flow.protocol, backend, ip).ok()?;
        let snat = SocketAddr::new(ip, port);
        self.by_flow.insert(*flow, (snat, backend));
        self.back.insert((flow.protocol, backend, snat), *flow);
        Some(snat)
    }

    /// Gives back the port of `flow`, if it holds one.
    fn release(&mut self, flow: &Flow) {
        if let Some((snat, backend)) = self.by_flow.remove(flow) {
            self.ports
                .release(flow.protocol, backend, snat.ip(), snat.port());
            self.back.remove(&(flow.protocol, backend, snat));
        }
    }

    /// Releases the ports of the flows whose connection the connection
    /// layer no longer tracks (closed and expired, or its backend gone);
    /// returns how many.
    fn reclaim(&mut self, dp: &dyn Dataplane, now: Instant) -> usize {
        let ended: Vec<Flow> = self
            .by_flow
            .keys()
            .filter(|f| dp.peek(f, now).is_none())
            .copied()
            .collect();
        for f in &ended {
            self.release(f);
        }
        ended.len()
    }

    /// The original flow of a reply from `backend` to `snat`.
    fn original(&self, protocol: Protocol, backend: SocketAddr, snat: SocketAddr) -> Option<Flow> {
        self.back.get(&(protocol, backend, snat)).copied()
    }
}

/// Reverse NAT of a packet going back to a client, given the client's
/// original flow (client -> frontend), which the connection layer found by
/// the reply's 5-tuple. With `full_nat` the destination is restored to the
/// client too.
///
/// An ICMP error from the backend about the client's packet is handled by
/// the same call: its outer source and embedded destination become the
/// frontend.
fn reverse(
    buf: &mut [u8],
    parsed: &ParsedPacket,
    original: &Flow,
    full_nat: bool,
) -> Result<(), RewriteError> {
    match parsed.kind() {
        PacketKind::IcmpError { .. } => rewrite_src(buf, parsed, original.dst),
        _ => reverse_nat(buf, parsed, original, full_nat),
    }
}

/// A frontend as the summary names it: address and protocol.
type FrontendAddr = (SocketAddr, Protocol);

#[derive(Default)]
struct Counts {
    packets: u64,
    bytes: u64,
    per_backend: BTreeMap<SocketAddr, (u64, u64)>,
}

#[derive(Default)]
struct Stats {
    read: u64,
    written: u64,
    dnat: u64,
    reverse: u64,
    passed: u64,
    bad: BTreeMap<String, u64>,
    unroutable: u64,
    refused: u64,
    masqueraded: u64,
    unmasqueraded: u64,
    /// The service (`namespace/name`) of each frontend in `per_frontend`.
    services: BTreeMap<(SocketAddr, Protocol), String>,
    per_frontend: BTreeMap<(SocketAddr, Protocol), Counts>,
    /// Masquerade ports given back by ended connections.
    released: u64,
}

impl Stats {
    /// One DNATed packet of `flow` (`len` bytes) to `backend`.
    fn count(&mut self, flow: Flow, backend: SocketAddr, len: u64) {
        let c = self
            .per_frontend
            .entry((flow.dst, flow.protocol))
            .or_default();
        c.packets += 1;
        c.bytes += len;
        let b = c.per_backend.entry(backend).or_default();
        b.0 += 1;
        b.1 += len;
    }
}

fn load(paths: &[PathBuf]) -> Result<ServiceTable, String> {
    fn files(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
        let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for e in entries {
                if e.is_dir()
                    || matches!(
                        e.extension().and_then(|x| x.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
                {
                    files(&e, out)?;
                }
            }
        } else {
            out.push(p.to_owned());
        }
        Ok(())
    }
    let mut all = Manifests::new();
    for p in paths {
        let mut list = Vec::new();
        files(p, &mut list)?;
        for f in list {
            let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
            all.extend(
                Manifests::parse_str(&text, Some(&f.display().to_string()))
                    .map_err(|e| e.to_string())?,
            );
        }
    }
    let batch = all.changes().map_err(|e| e.to_string())?;
    let mut table = ServiceTable::new();
    table
        .apply_batch(batch.changes)
        .map_err(|e| e.to_string())?;
    Ok(table)
}

fn run(cli: &Cli) -> Result<Stats, String> {
    let mut table = load(&cli.manifests)?;
    let mut config = DataplaneConfig::with_seed(cli.seed);
    config.masquerade_all = cli.masquerade_all;
    let mut masq = Masquerade {
        ip4: cli.snat_ip.map(IpAddr::V4),
        ip6: cli.snat_ip6.map(IpAddr::V6),
        ports: SourcePortAllocator::new(cli.snat_ports.0..=cli.snat_ports.1),
        by_flow: HashMap::new(),
        back: HashMap::new(),
    };
    let dp: Box<dyn Dataplane> = match cli.mode {
        Mode::Iptables => Box::new(IptablesDataplane::new(config)),
        Mode::Nftables => Box::new(NftablesDataplane::new(config)),
        Mode::Ipvs => Box::new(IpvsDataplane::new(config)),
    };
    dp.sync(&table, &table.full_change_set(), Instant::ZERO);
    if let Some(path) = &cli.watch {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let report = Loader::new(LoadOptions::default())
            .apply_watch_text(&mut table, &text, &path.display().to_string())
            .map_err(|e| format!("--watch {}: {e}", path.display()))?;
        for line in report.lines(false) {
            eprintln!("pcap_replay: note: {line}");
        }
        for cs in &report.change_sets {
            dp.sync(&table, cs, Instant::ZERO);
        }
        println!("watch applied {} change(s)", report.change_sets.len());
    }

    let input = File::open(&cli.input).map_err(|e| format!("{}: {e}", cli.input.display()))?;
    let mut reader = PcapReader::new(BufReader::new(input)).map_err(|e| e.to_string())?;
    let header = reader.header();
    let link = match header.datalink {
        DataLink::ETHERNET => LinkType::Ethernet,
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => LinkType::Ip,
        other => return Err(format!("unsupported pcap link type {other:?}")),
    };
    let out = File::create(&cli.output).map_err(|e| format!("{}: {e}", cli.output.display()))?;
    let mut writer =
        PcapWriter::with_header(BufWriter::new(out), header).map_err(|e| e.to_string())?;

    let mut stats = Stats::default();
    // When the masquerade ports were last reclaimed (on the capture's
    // clock): at most once a second of capture, and before refusing a flow.
    let mut reclaimed = Instant::ZERO;
    while let Some(pkt) = reader.next_packet() {
        let pkt = pkt.map_err(|e| e.to_string())?;
        stats.read += 1;
        let now = Instant::from_nanos(pkt.timestamp.as_nanos() as u64);
        let mut buf = pkt.data.to_vec();
        let parsed = match parse(&buf, link) {
            Ok(p) => p,
            Err(e) => {
                let kind = format!("{e:?}");
                let kind = kind.split([' ', '{', '(']).next().unwrap_or("").to_owned();
                *stats.bad.entry(kind).or_default() += 1;
                continue;
            }
        };
        if dp.poll_timeout().is_some_and(|t| t <= now) {
            dp.handle_timeout(now);
        }
        if now >= reclaimed + Duration::from_secs(1) {
            stats.released += masq.reclaim(&*dp, now) as u64;
            reclaimed = now;
        }
        let len = buf.len() as u64;
        let flow = match *parsed.kind() {
            PacketKind::Flow(f) | PacketKind::IcmpError { inner: f, .. } => f,
            PacketKind::Fragment(frag) => {
                // A later fragment: its datagram's connection, or nothing.
                let key = frag.key();
                let Some(t) = dp.later_fragment(&key, now) else {
                    stats.unroutable += 1;
                    continue;
                };
                let forward = key.src == t.flow.src.ip() && key.dst == t.flow.dst.ip();
                let done = if forward {
                    let snat = masq.by_flow.get(&t.flow).map(|e| e.0);
                    rewrite_dst(&mut buf, &parsed, t.backend_addr)
                        .and_then(|()| snat.map_or(Ok(()), |a| rewrite_src(&mut buf, &parsed, a)))
                } else {
                    reverse_nat(&mut buf, &parsed, &t.flow, masq.is_snat(key.dst))
                };
                if done.is_err() {
                    stats.refused += 1;
                    continue;
                }
                if forward {
                    stats.dnat += 1;
                    stats.count(t.flow, t.backend_addr, len);
                } else {
                    stats.reverse += 1;
                }
                write(&mut writer, &pkt, &buf, &mut stats)?;
                continue;
            }
            PacketKind::Unroutable(svclb::packet::Unroutable::IcmpInformational { .. }) => {
                stats.passed += 1;
                write(&mut writer, &pkt, &buf, &mut stats)?;
                continue;
            }
            PacketKind::Unroutable(_) => {
                stats.unroutable += 1;
                continue;
            }
        };
        let icmp_error = matches!(parsed.kind(), PacketKind::IcmpError { .. });
        let flags = parsed.tcp_flags().unwrap_or(TcpFlags::ACK);
        // A reply from a backend, or a backend's ICMP error about the
        // client's packet (whose embedded flow is client -> backend: the
        // reply direction is its reverse).
        // To a SNAT address (or, an ICMP error, about a packet from one):
        // the original flow gives the client back, and the reply is looked
        // up as the backend's reply to the client.
        let (snat_side, peer) = if icmp_error {
            (flow.src, flow.dst)
        } else {
            (flow.dst, flow.src)
        };
        let masqueraded = masq
            .is_snat(snat_side.ip())
            .then(|| masq.original(flow.protocol, peer, snat_side))
            .flatten();
        let tracked = match (masqueraded, icmp_error) {
            (Some(orig), true) => dp.peek_reply(&Flow::new(flow.protocol, peer, orig.src), now),
            (Some(orig), false) => dp.reply(&Flow::new(flow.protocol, peer, orig.src), flags, now),
            (None, true) => dp.peek_reply(&Flow::new(flow.protocol, flow.dst, flow.src), now),
            (None, false) => dp.reply(&flow, flags, now),
        };
        if let Some(t) = tracked {
            if let Some(key) = parsed.first_fragment() {
                dp.first_fragment(&key, &t.flow, now);
            }
            let done = if masqueraded.is_some() {
                reverse_nat(&mut buf, &parsed, &t.flow, true)
            } else {
                reverse(&mut buf, &parsed, &t.flow, false)
            };
            match done {
                Ok(()) => stats.reverse += 1,
                Err(_) => {
                    stats.refused += 1;
                    continue;
                }
            }
            write(&mut writer, &pkt, &buf, &mut stats)?;
            continue;
        }
        if icmp_error {
            stats.passed += 1;
            write(&mut writer, &pkt, &buf, &mut stats)?;
            continue;
        }
        let (backend, masquerade) = match dp.packet(&flow, flags, now) {
            Verdict::Forward(fw) => (fw.backend, fw.masquerade),
            Verdict::NotAService => {
                stats.passed += 1;
                write(&mut writer, &pkt, &buf, &mut stats)?;
                continue;
            }
            _ => continue,
        };
        if let Some(key) = parsed.first_fragment() {
            dp.first_fragment(&key, &flow, now);
        }
        let snat = if masquerade && masq.ip_for(flow.src.ip()).is_some() {
            let mut snat = masq.source(&flow, backend);
            if snat.is_none() {
                // Every port to this backend is held: give back those of
                // ended connections, then try once more.
                stats.released += masq.reclaim(&*dp, now) as u64;
                reclaimed = now;
                snat = masq.source(&flow, backend);
            }
            let Some(snat) = snat else {
                // Every port to this backend is held.
                stats.refused += 1;
                continue;
            };
            Some(snat)
        } else {
            if masquerade {
                stats.unmasqueraded += 1;
            }
            None
        };
        if rewrite_dst(&mut buf, &parsed, backend).is_err()
            || snat.is_some_and(|a| rewrite_src(&mut buf, &parsed, a).is_err())
        {
            stats.refused += 1;
            continue;
        }
        if snat.is_some() {
            stats.masqueraded += 1;
        }
        stats.dnat += 1;
        stats.count(flow, backend, len);
        write(&mut writer, &pkt, &buf, &mut stats)?;
    }
    for (addr, proto) in stats.per_frontend.keys() {
        if let Some(name) = service_of(&table, *addr, *proto) {
            stats.services.insert((*addr, *proto), name);
        }
    }
    Ok(stats)
}

/// The service (`namespace/name`) whose cluster, external or
/// load-balancer IP and port, or node port, `addr` is (node ports by port
/// alone: the replay knows no node IPs).
fn service_of(table: &ServiceTable, addr: SocketAddr, proto: Protocol) -> Option<String> {
    table.views().find_map(|v| {
        let svc = v.service();
        let ips = svc.cluster_ip().addrs().iter().copied();
        let fronts = ips
            .chain(svc.external_ips().iter().copied())
            .chain(svc.load_balancer_vips())
            .any(|ip| ip == addr.ip());
        let hit = svc.ports().iter().any(|p| {
            p.protocol() == proto
                && ((fronts && p.port() == addr.port()) || p.node_port() == Some(addr.port()))
        });
        hit.then(|| svc.key().to_string())
    })
}

fn write(
    w: &mut PcapWriter<BufWriter<File>>,
    pkt: &PcapPacket<'_>,
    buf: &[u8],
    stats: &mut Stats,
) -> Result<(), String> {
    let out = PcapPacket::new(pkt.timestamp, pkt.orig_len, buf);
    w.write_packet(&out).map_err(|e| e.to_string())?;
    stats.written += 1;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(s) => {
            println!(
                "read {} written {} dnat {} reverse-nat {} passed {} unroutable {} refused {}",
                s.read, s.written, s.dnat, s.reverse, s.passed, s.unroutable, s.refused
            );
            if s.masqueraded + s.unmasqueraded > 0 {
                println!(
                    "masqueraded {} unmasqueraded {} released {}",
                    s.masqueraded, s.unmasqueraded, s.released
                );
            }
            for (kind, n) in &s.bad {
                println!("bad {kind} {n}");
            }
            // Per service, then its frontends.
            let mut by_service: BTreeMap<&str, Vec<(&FrontendAddr, &Counts)>> = BTreeMap::new();
            for (key, c) in &s.per_frontend {
                let name = s.services.get(key).map_or("(unknown)", String::as_str);
                by_service.entry(name).or_default().push((key, c));
            }
            for (service, fronts) in &by_service {
                let packets: u64 = fronts.iter().map(|(_, c)| c.packets).sum();
                let bytes: u64 = fronts.iter().map(|(_, c)| c.bytes).sum();
                println!("service {service}: {packets} packets, {bytes} bytes");
                for ((frontend, proto), c) in fronts {
                    println!(
                        "  frontend {frontend}/{proto}: {} packets, {} bytes",
                        c.packets, c.bytes
                    );
                    for (b, (p, bytes)) in &c.per_backend {
                        println!("    backend {b}: {p} packets, {bytes} bytes");
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pcap_replay: {e}");
            ExitCode::FAILURE
        }
    }
}
