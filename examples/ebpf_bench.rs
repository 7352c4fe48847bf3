//! `ebpf_bench`: the eBPF dataplane's benchmarks in the real kernel, in
//! network namespaces it makes and deletes (prefix `svbpfb<pid>-`). Root,
//! clang at build time, iproute2, ethtool and iptables; not run by CI.
//!
//! ```sh
//! cargo build --release --features ebpf --example ebpf_bench
//! sudo target/release/examples/ebpf_bench --seconds 3 > ebpf-bench.jsonl
//! ```
//!
//! One JSON object per line (figures measured in this run, never defaults):
//! - `machine`: date, kernel, CPUs, load average at the start;
//! - `test_run`: `BPF_PROG_TEST_RUN` ns per packet (mean of 2,000 single
//!   runs) for a new flow, a tracked flow and a reply;
//! - `pps`: UDP packets/s from the client namespace through `lb` to a
//!   backend, with the program (to a VIP, DNAT and reverse NAT) and without
//!   it (to the backend's address, plain forwarding), and their ratio;
//! - `conn_rate`: new TCP connections/s (connect, one byte, close) to
//!   cluster IPs through kube-proxy's iptables rules (svclb's rendering,
//!   loaded with `iptables-restore` in `lb`) and through the eBPF program,
//!   at 10 and at `--services` services, in one run;
//! - `summary`: the ratios against the issue's targets.
//!
//! The machine is shared: compare the ratios of one run, not figures of
//! different runs.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sched::{CloneFlags, setns};
use svclb::ebpf::{EbpfBackendSpec, EbpfDataplane, EbpfFrontendSpec};
use svclb::render::{self, RenderOptions};
use svclb::{
    AddressType, Change, EndpointSlice, EndpointSpec, Protocol, Service, ServicePortSpec,
    ServiceTable, SlicePortSpec,
};

#[derive(Debug, Parser)]
#[command(
    name = "ebpf_bench",
    about = "eBPF dataplane benchmarks in network namespaces"
)]
struct Cli {
    /// Seconds per measured case.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// The large service count (the small one is 10).
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Client threads (connections or UDP senders).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Rounds: the cases alternate within each round (the machine is
    /// shared), and each figure is the median over the rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Maglev table size of every frontend (two 1008-slot chunks each at
    /// the default).
    #[arg(long, default_value_t = 1021)]
    table_size: u32,
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// client (10.200.0.2) -- lb (forwarding) -- b1..b3 (10.200.N.2); deleted
/// on drop.
struct Topology {
    prefix: String,
}

impl Topology {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// `tag` tells apart topologies alive at the same time.
    fn build(tag: &str) -> Result<Topology, String> {
        let topo = Topology {
            prefix: format!("svbpfb{}{tag}-", std::process::id()),
        };
        let (c, lb) = (topo.ns("client"), topo.ns("lb"));
        let backends: Vec<String> = (1..=3).map(|i| topo.ns(&format!("b{i}"))).collect();
        for ns in [&c, &lb].into_iter().chain(&backends) {
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let veth = |a_ns: &str, a: &str, b_ns: &str, b: &str| {
            run(&[
                "ip", "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns",
                b_ns,
            ])
        };
        veth(&c, "c0", &lb, "l0")?;
        for (i, b) in backends.iter().enumerate() {
            veth(b, "b0", &lb, &format!("l{}", i + 1))?;
        }
        let addr = |ns: &str, dev: &str, a: &str| -> Result<(), String> {
            run(&["ip", "-n", ns, "addr", "add", a, "dev", dev])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            // The program rewrites checksums; with offload off the
            // receivers verify them (and both paths pay the same).
            run(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "rx", "off",
            ])
            .map(|_| ())
        };
        addr(&c, "c0", "10.200.0.2/24")?;
        addr(&lb, "l0", "10.200.0.1/24")?;
        run(&[
            "ip",
            "-n",
            &c,
            "route",
            "add",
            "default",
            "via",
            "10.200.0.1",
        ])?;
        for (i, b) in backends.iter().enumerate() {
            let n = i + 1;
            addr(b, "b0", &format!("10.200.{n}.2/24"))?;
            addr(&lb, &format!("l{n}"), &format!("10.200.{n}.1/24"))?;
            run(&[
                "ip",
                "-n",
                b,
                "route",
                "add",
                "default",
                "via",
                &format!("10.200.{n}.1"),
            ])?;
        }
        let sysctl = |ns: &str, kv: &str| run(&["ip", "netns", "exec", ns, "sysctl", "-qw", kv]);
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            sysctl(&lb, kv)?;
        }
        for dev in ["l0", "l1", "l2", "l3"] {
            sysctl(&lb, &format!("net.ipv4.conf.{dev}.rp_filter=0"))?;
        }
        // Many short connections: a wide port range, TIME_WAIT reuse.
        sysctl(&c, "net.ipv4.ip_local_port_range=1024 65000")?;
        sysctl(&c, "net.ipv4.tcp_tw_reuse=1")?;
        Ok(topo)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in ["client", "lb", "b1", "b2", "b3"] {
            let _ = run(&["ip", "netns", "del", &self.ns(n)]);
        }
    }
}

fn enter(ns: &str) -> Result<(), String> {
    let f = File::open(format!("/run/netns/{ns}")).map_err(|e| format!("{ns}: {e}"))?;
    setns(f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns {ns}: {e}"))
}

fn in_ns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> Result<R, String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| "namespace thread panicked".to_owned())?
    })
}

/// Backend `n`: TCP 8080 answers one byte and closes; UDP 5353 counts
/// datagrams into `udp`. Threads live until the process exits.
fn spawn_backend(ns: String, udp: Arc<AtomicU64>) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Err(e) = enter(&ns) {
            let _ = tx.send(Err(e));
            return;
        }
        let (l, u) = match (
            TcpListener::bind("0.0.0.0:8080"),
            UdpSocket::bind("0.0.0.0:5353"),
        ) {
            (Ok(l), Ok(u)) => (l, u),
            (Err(e), _) | (_, Err(e)) => {
                let _ = tx.send(Err(format!("bind in {ns}: {e}")));
                return;
            }
        };
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while u.recv(&mut buf).is_ok() {
                udp.fetch_add(1, Ordering::Relaxed);
            }
        });
        let _ = tx.send(Ok(()));
        // Two acceptors. Each writes its byte and closes after the client
        // has: the client's side takes the TIME_WAIT, so a client port is
        // never reused onto a backend's TIME_WAIT (a SYN that would meet
        // a challenge ACK and a 1 s retransmit).
        let serve = |l: TcpListener| {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"x");
                let mut b = [0u8; 8];
                let _ = s.read(&mut b);
            }
        };
        if let Ok(l2) = l.try_clone() {
            std::thread::spawn(move || serve(l2));
        }
        serve(l);
    });
    rx.recv_timeout(Duration::from_secs(5))
        .map_err(|_| "backend did not start".to_owned())?
}

/// Services each measurement connects to.
const TARGETS: usize = 10;

/// The cluster IP of service `i`: 10.96.0.0/16 from 10.96.0.10 on.
fn vip(i: usize) -> Ipv4Addr {
    let n = u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32;
    Ipv4Addr::from(n)
}

/// `n` services `svc-i` (VIP `vip(i)`:80 -> the three backends' 8080).
fn cluster(n: usize) -> ServiceTable {
    let mut table = ServiceTable::new();
    let mut changes = Vec::with_capacity(2 * n);
    for i in 0..n {
        let name = format!("svc-{i}");
        changes.push(Change::UpsertService(
            Service::builder("default", &name)
                .cluster_ip(IpAddr::V4(vip(i)))
                .port(ServicePortSpec::tcp(80).name("http").target_port(8080))
                .build()
                .expect("a valid service"),
        ));
        changes.push(Change::UpsertSlice(
            EndpointSlice::builder("default", format!("{name}-1"), &name, AddressType::IPv4)
                .port(SlicePortSpec::tcp(8080).name("http"))
                .endpoints((1..=3).map(|b| EndpointSpec::new(format!("10.200.{b}.2"))))
                .build()
                .expect("a valid slice"),
        ));
    }
    table.apply_batch(changes).expect("the cluster applies");
    table
}

fn specs(n: usize) -> Vec<EbpfFrontendSpec> {
    (0..n)
        .map(|i| EbpfFrontendSpec {
            vip: IpAddr::V4(vip(i)),
            port: 80,
            protocol: Protocol::Tcp,
            backends: (1..=3u32)
                .map(|b| {
                    EbpfBackendSpec::active(b, SocketAddr::from(([10, 200, b as u8, 2], 8080)))
                })
                .collect(),
            reject_when_empty: true,
        })
        .collect()
}

/// New TCP connections per second from `threads` client threads over
/// `seconds`, and the failures. Each connection goes to one of 10 target
/// services spread evenly over the `n` (`k * n / 10`, picked by a pinned
/// LCG): every case talks to the same number of destinations, so the
/// client's own costs are the same at 10 and at 10,000 services, and the
/// iptables walk meets its targets across the whole rule list.
fn conn_rate(client: &str, n: usize, threads: usize, seconds: f64) -> Result<(f64, u64), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, ok, failed, client) = (
                Arc::clone(&stop),
                Arc::clone(&ok),
                Arc::clone(&failed),
                client.to_owned(),
            );
            std::thread::spawn(move || -> Result<(), String> {
                enter(&client)?;
                let mut x: u64 = 0x9e37_79b9 + t as u64;
                // Bounded: the stop flag after `seconds`, and a count cap.
                for _ in 0..10_000_000u32 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let k = ((x >> 33) % TARGETS as u64) as usize;
                    let i = k * n / TARGETS;
                    let dst = SocketAddr::from((vip(i), 80));
                    let done = TcpStream::connect_timeout(&dst, Duration::from_secs(1)).and_then(
                        |mut s| {
                            s.set_read_timeout(Some(Duration::from_secs(1)))?;
                            let mut b = [0u8; 8];
                            let k = s.read(&mut b)?;
                            if k == 1 {
                                Ok(())
                            } else {
                                Err(std::io::Error::other("no byte"))
                            }
                        },
                    );
                    match done {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let counted = ok.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().map_err(|_| "client thread panicked")??;
    }
    Ok((counted as f64 / elapsed, failed.load(Ordering::Relaxed)))
}

/// One packets/s measurement.
struct Pps {
    /// Datagrams/s that reached the backend.
    received_per_s: f64,
    /// Datagrams sent.
    sent: u64,
    /// The senders' thread CPU time per datagram sent, in ns: the send
    /// path, and the veth, TC and forwarding work the kernel does inline in
    /// the sender's context. Less sensitive to a loaded machine than rates.
    cpu_ns_per_sent: f64,
}

/// UDP packets/s received by backend 1 while `threads` client threads send
/// 64-byte datagrams to `dst` for `seconds` (one socket, so one flow, each).
fn pps(
    client: &str,
    dst: SocketAddr,
    received: &AtomicU64,
    threads: usize,
    seconds: f64,
) -> Result<Pps, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let cpu_ns = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, sent, cpu_ns, client) = (
                Arc::clone(&stop),
                Arc::clone(&sent),
                Arc::clone(&cpu_ns),
                client.to_owned(),
            );
            std::thread::spawn(move || -> Result<(), String> {
                enter(&client)?;
                let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
                s.connect(dst).map_err(|e| e.to_string())?;
                let payload = [0x5au8; 64];
                let cpu = cpu_time::ThreadTime::now();
                let mut n = 0u64;
                for _ in 0..1_000_000_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if s.send(&payload).is_ok() {
                        n += 1;
                    }
                }
                sent.fetch_add(n, Ordering::Relaxed);
                cpu_ns.fetch_add(cpu.elapsed().as_nanos() as u64, Ordering::Relaxed);
                Ok(())
            })
        })
        .collect();
    // Warm up (ARP, the first packet's new-flow path), then count.
    std::thread::sleep(Duration::from_millis(100));
    let r0 = received.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let r1 = received.load(Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().map_err(|_| "sender thread panicked")??;
    }
    let sent = sent.load(Ordering::Relaxed);
    Ok(Pps {
        received_per_s: (r1 - r0) as f64 / elapsed,
        sent,
        cpu_ns_per_sent: cpu_ns.load(Ordering::Relaxed) as f64 / sent.max(1) as f64,
    })
}

/// An Ethernet + IPv4 + TCP frame with correct checksums.
fn frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&40u16.to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&src);
    f[30..34].copy_from_slice(&dst);
    let c = csum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[38..42].copy_from_slice(&1u32.to_be_bytes());
    f[46] = 5 << 4;
    f[47] = flags;
    f[48..50].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = 6 + 20;
    for w in [&src[..], &dst[..]] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    let c = csum(&f[34..54], pseudo);
    f[50..52].copy_from_slice(&c.to_be_bytes());
    f
}

fn csum(b: &[u8], init: u32) -> u16 {
    let mut s = init;
    for w in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Mean `BPF_PROG_TEST_RUN` ns per packet over single runs (a run rewrites
/// its packet, so `repeat` would measure the rewritten copy).
fn mean_ns(dp: &EbpfDataplane, pkts: impl Iterator<Item = Vec<u8>>) -> Result<f64, String> {
    let (mut total, mut n) = (Duration::ZERO, 0u32);
    for p in pkts {
        let r = dp.test_run(&p, 1).map_err(|e| e.to_string())?;
        total += r.duration;
        n += 1;
    }
    Ok(total.as_nanos() as f64 / f64::from(n.max(1)))
}

/// A pause after a case: namespaces and maps are freed by kernel work in
/// the background, which must not run into the next measurement.
fn settle() {
    std::thread::sleep(Duration::from_secs(1));
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn push<'a>(samples: &mut Vec<(&'a str, usize, Vec<f64>)>, dp: &'a str, n: usize, rate: f64) {
    match samples.iter_mut().find(|s| s.0 == dp && s.1 == n) {
        Some(s) => s.2.push(rate),
        None => samples.push((dp, n, vec![rate])),
    }
}

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let date = run(&["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_owned();
    format!(
        "{{\"bench\":\"machine\",\"date\":\"{}\",\"kernel\":\"{}\",\"cpus\":{},\"cpu\":\"{}\",\"loadavg\":\"{}\",\"iptables\":\"{}\"}}",
        date.trim(),
        read("/proc/sys/kernel/osrelease").trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu.replace('"', "'"),
        read("/proc/loadavg").trim(),
        run(&["iptables-restore", "--version"])
            .unwrap_or_default()
            .trim()
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("ebpf_bench: needs root (network namespaces, BPF)");
        return ExitCode::from(1);
    }
    if !EbpfDataplane::object_built() {
        eprintln!("ebpf_bench: the eBPF object was not built (no clang at build time)");
        return ExitCode::from(1);
    }
    match bench(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebpf_bench: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn bench(cli: &Cli) -> Result<(), String> {
    println!("{}", machine());
    // A fresh topology for every measured case: no conntrack entries,
    // TIME_WAIT sockets or netfilter hooks carry over between cases.
    let fresh_tagged = |tag: &str| -> Result<(Topology, Arc<AtomicU64>), String> {
        let topo = Topology::build(tag)?;
        let udp_seen = Arc::new(AtomicU64::new(0));
        for n in 1..=3 {
            spawn_backend(topo.ns(&format!("b{n}")), Arc::clone(&udp_seen))?;
        }
        // New interfaces start background work (udev, IPv6 DAD, router
        // solicitations) that must not fall into the measurement.
        settle();
        Ok((topo, udp_seen))
    };
    let fresh = || fresh_tagged("");
    let ifaces = ["l0", "l1", "l2", "l3"];
    let load = |topo: &Topology| {
        in_ns(&topo.ns("lb"), || {
            EbpfDataplane::load(&ifaces, Some(cli.table_size))
        })?
        .map_err(|e| e.to_string())
    };

    // 1. Per-packet cost in the kernel.
    {
        let (topo, _) = fresh()?;
        let mut dp = load(&topo)?;
        dp.apply(&specs(1)).map_err(|e| e.to_string())?;
        let new = mean_ns(
            &dp,
            (0..2000u16).map(|i| {
                frame(
                    [10, 201, (i >> 8) as u8, i as u8],
                    [10, 96, 0, 10],
                    30000 + i,
                    80,
                    0x02,
                )
            }),
        )?;
        let syn = frame([10, 200, 0, 9], [10, 96, 0, 10], 40000, 80, 0x02);
        dp.test_run(&syn, 1).map_err(|e| e.to_string())?;
        let ack = frame([10, 200, 0, 9], [10, 96, 0, 10], 40000, 80, 0x10);
        let tracked = mean_ns(&dp, (0..2000).map(|_| ack.clone()))?;
        let c = dp.tracked().map_err(|e| e.to_string())?;
        let backend = c
            .iter()
            .find(|t| t.client.port() == 40000)
            .and_then(|t| {
                dp.compiled(vip(0), 80, Protocol::Tcp)?
                    .backend(t.backend_id)
            })
            .map(|b| b.addr)
            .ok_or("the tracked flow's backend")?;
        let IpAddr::V4(b4) = backend.ip() else {
            return Err("an IPv4 backend".into());
        };
        let reply = frame(b4.octets(), [10, 200, 0, 9], backend.port(), 40000, 0x10);
        let replies = mean_ns(&dp, (0..2000).map(|_| reply.clone()))?;
        for (case, ns) in [("new_flow", new), ("tracked", tracked), ("reply", replies)] {
            println!(
                "{{\"bench\":\"test_run\",\"case\":\"{case}\",\"ns_per_packet\":{ns:.0},\"runs\":2000}}"
            );
        }
    }

    // 2. Packets/s with the program (VIP, DNAT) and without (plain routing),
    //    alternating within each round.
    let direct = SocketAddr::from(([10, 200, 1, 2], 5353));
    let udp = EbpfFrontendSpec {
        vip: IpAddr::V4(vip(0)),
        port: 53,
        protocol: Protocol::Udp,
        backends: vec![EbpfBackendSpec::active(1, direct)],
        reject_when_empty: true,
    };
    let (mut pps_without, mut pps_with) = (Vec::new(), Vec::new());
    let (mut cpu_without, mut cpu_with) = (Vec::new(), Vec::new());
    // Both paths stay up side by side, in two topologies, and the senders
    // alternate between them in short slices: a change of load on the
    // shared machine hits both halves of a pair alike.
    let (plain, plain_seen) = fresh_tagged("a")?;
    let (through, through_seen) = fresh_tagged("p")?;
    let mut dp = load(&through)?;
    dp.apply(std::slice::from_ref(&udp))
        .map_err(|e| e.to_string())?;
    let slice = cli.seconds / 2.0;
    for round in 0..cli.rounds * 4 {
        let without = pps(&plain.ns("client"), direct, &plain_seen, cli.threads, slice)?;
        let with = pps(
            &through.ns("client"),
            SocketAddr::from((vip(0), 53)),
            &through_seen,
            cli.threads,
            slice,
        )?;
        println!(
            "{{\"bench\":\"pps\",\"round\":{round},\"without_program\":{:.0},\"with_program\":{:.0},\"sent_without\":{},\"sent_with\":{},\"sender_cpu_ns_without\":{:.0},\"sender_cpu_ns_with\":{:.0},\"seconds\":{}}}",
            without.received_per_s,
            with.received_per_s,
            without.sent,
            with.sent,
            without.cpu_ns_per_sent,
            with.cpu_ns_per_sent,
            slice
        );
        pps_without.push(without.received_per_s);
        pps_with.push(with.received_per_s);
        cpu_without.push(without.cpu_ns_per_sent);
        cpu_with.push(with.cpu_ns_per_sent);
    }
    let c = dp.counters().map_err(|e| e.to_string())?;
    if c.tracked == 0 {
        return Err("the program saw no tracked packet: the VIP path was not taken".into());
    }
    drop(dp);
    drop(plain);
    drop(through);
    settle();
    let (pps_without_rounds, pps_with_rounds) = (pps_without.clone(), pps_with.clone());
    let (cpu_without_rounds, cpu_with_rounds) = (cpu_without.clone(), cpu_with.clone());
    let (without, with) = (median(&mut pps_without), median(&mut pps_with));
    let (cw, cv) = (median(&mut cpu_without), median(&mut cpu_with));
    println!(
        "{{\"bench\":\"pps\",\"median_without_program\":{without:.0},\"median_with_program\":{with:.0},\"ratio_of_medians\":{:.3},\"median_sender_cpu_ns_without\":{cw:.0},\"median_sender_cpu_ns_with\":{cv:.0},\"cpu_ratio_of_medians\":{:.3},\"pairs\":{}}}",
        with / without,
        cw / cv,
        cli.rounds * 4
    );

    // 3. New connections/s through the eBPF program (iptables rules
    //    flushed) and through kube-proxy's rules (the program detached), at
    //    10 and at --services services; the four cases alternate in each
    //    round.
    let sizes = [10, cli.services];
    let tables: Vec<(usize, String)> = sizes
        .iter()
        .map(|&n| {
            // No nfacct counters: the namespace has no nfacct objects
            // (kube-proxy creates them over netlink), and `-m nfacct`
            // needs them.
            let opts = RenderOptions::default().builtin_jumps(true).nfacct(false);
            (n, render::iptables::render(&cluster(n), &opts))
        })
        .collect();
    let mut samples: Vec<(&str, usize, Vec<f64>)> = Vec::new();
    for round in 0..cli.rounds {
        for &n in &sizes {
            let (topo, _) = fresh()?;
            let client = topo.ns("client");
            // One load, no retry: table elements are one page each now
            // (src/ebpf/svclb.bpf.c, svclb_tables), so a write no longer
            // needs an order-3 block without reclaim; a failure is reported
            // with its errno.
            let mut dp = load(&topo)?;
            let t = Instant::now();
            let stats = dp
                .apply(&specs(n))
                .map_err(|e| format!("{n} frontends: {e}"))?;
            let apply_ms = t.elapsed().as_secs_f64() * 1e3;
            let (rate, failed) = conn_rate(&client, n, cli.threads, cli.seconds)?;
            println!(
                "{{\"bench\":\"conn_rate\",\"round\":{round},\"dataplane\":\"ebpf\",\"services\":{n},\"conns_per_s\":{rate:.0},\"failed\":{failed},\"setup_ms\":{apply_ms:.0},\"map_writes\":{},\"seconds\":{}}}",
                stats.frontend_writes + stats.backend_writes + stats.chunk_writes,
                cli.seconds
            );
            push(&mut samples, "ebpf", n, rate);
            drop(dp);
            drop(topo);
            settle();
        }
        for (n, rules) in &tables {
            let (topo, _) = fresh()?;
            let (lb, client) = (topo.ns("lb"), topo.ns("client"));
            let t = Instant::now();
            let mut child = Command::new("ip")
                .args(["netns", "exec", &lb, "iptables-restore"])
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| format!("iptables-restore: {e}"))?;
            child
                .stdin
                .take()
                .ok_or("stdin")?
                .write_all(rules.as_bytes())
                .map_err(|e| e.to_string())?;
            let status = child.wait().map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("iptables-restore failed ({status})"));
            }
            let restore_ms = t.elapsed().as_secs_f64() * 1e3;
            let (rate, failed) = conn_rate(&client, *n, cli.threads, cli.seconds)?;
            println!(
                "{{\"bench\":\"conn_rate\",\"round\":{round},\"dataplane\":\"iptables\",\"services\":{n},\"conns_per_s\":{rate:.0},\"failed\":{failed},\"setup_ms\":{restore_ms:.0},\"rules\":{},\"seconds\":{}}}",
                rules.lines().filter(|l| l.starts_with("-A ")).count(),
                cli.seconds
            );
            push(&mut samples, "iptables", *n, rate);
            // Flush in the foreground: the kernel tears a deleted namespace
            // down in the background, and 100,000 rules would still be
            // going away during the next case.
            for args in [["-t", "nat", "-F"], ["-t", "nat", "-X"]] {
                run(&[
                    "ip", "netns", "exec", &lb, "iptables", args[0], args[1], args[2],
                ])?;
            }
            drop(topo);
            settle();
        }
    }
    // Per-round samples, in round order, before the medians sort them.
    let per_round = |dp: &str, n: usize| -> Vec<f64> {
        samples
            .iter()
            .find(|s| s.0 == dp && s.1 == n)
            .map_or_else(Vec::new, |s| s.2.clone())
    };
    let big = cli.services;
    // Ratios within each round (cases minutes apart at most), then their
    // median: the load on the machine changes between rounds.
    let paired = |a: Vec<f64>, b: Vec<f64>| -> f64 {
        let mut r: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x / y).collect();
        median(&mut r)
    };
    let ebpf_scale = paired(per_round("ebpf", big), per_round("ebpf", 10));
    let vs_iptables = paired(per_round("ebpf", big), per_round("iptables", big));
    let mut pps_ratios: Vec<f64> = pps_with_rounds
        .iter()
        .zip(&pps_without_rounds)
        .map(|(w, o)| w / o)
        .collect();
    let pps_ratio = median(&mut pps_ratios);
    let mut cpu_ratios: Vec<f64> = cpu_without_rounds
        .iter()
        .zip(&cpu_with_rounds)
        .map(|(o, w)| o / w)
        .collect();
    let cpu_ratio = median(&mut cpu_ratios);
    for (dp, n, v) in samples.iter_mut() {
        println!(
            "{{\"bench\":\"conn_rate\",\"dataplane\":\"{dp}\",\"services\":{n},\"median_conns_per_s\":{:.0},\"rounds\":{}}}",
            median(v),
            cli.rounds
        );
    }
    println!(
        "{{\"bench\":\"summary\",\"ratios\":\"median over rounds of the ratio within a round\",\"ebpf_{big}_over_ebpf_10\":{ebpf_scale:.3},\"target_ebpf_scale\":0.9,\"ebpf_over_iptables_at_{big}\":{vs_iptables:.3},\"target_vs_iptables\":2.0,\"pps_with_over_without\":{pps_ratio:.3},\"sender_cpu_without_over_with\":{cpu_ratio:.3},\"target_pps\":0.8,\"met\":{}}}",
        ebpf_scale >= 0.9 && vs_iptables >= 2.0 && pps_ratio >= 0.8
    );
    Ok(())
}
