//! The eBPF dataplane in the real kernel, in network namespaces:
//!
//! ```text
//! client (10.200.0.2) -- lb (program on l0..l3, forwarding) -- b1 (10.200.1.2)
//!                                                           -- b2 (10.200.2.2)
//!                                                           -- b3 (10.200.3.2)
//! ```
//! The client routes 10.96.0.0/16 via lb, backends route replies via lb, and
//! checksum offload is off on every interface (veths verify nothing
//! otherwise). Needs root and an object built with clang; prints
//! `SKIPPED: <reason>` and passes otherwise. The namespaces are deleted at
//! the end, also on failure (a Drop guard).
//!
//! One test drives the loader directly over IPv4; one over IPv6, in the same
//! topology made dual-stack (fd00:200:N::/64 on the veths, the client
//! routing fd00:96::/64 via lb), with the maps written from the plan of a
//! dual-stack service; one with node ports (on lb's own address) and
//! external IPs, Cluster and Local policies, from the plan; one with ICMP
//! errors from backends, fragmented datagrams and IPv6 extension headers;
//! two (feature `serde` too) run
//! `examples/ebpf.rs` in the same topology made dual-stack: ready, 300
//! predicted connections, 60 over IPv6 to an IPv6 service, a reload that
//! removes a backend under open connections,
//! the drain's end, a followed watch file, SIGHUP, SIGTERM; and its exit 1
//! on bad input. Each test's namespaces are `svbpf<pid><tag>-*`.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::netns::{Conn, connect, echo, enter, in_ns};
use svclb::ebpf::model::{CompiledFrontend, choose};
use svclb::ebpf::{EbpfBackendSpec, EbpfDataplane, EbpfFrontendSpec};
use svclb::{Flow, Protocol};

const T: Duration = Duration::from_secs(3);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const VIP_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Deletes the namespaces on drop.
struct Topology {
    prefix: String,
}

impl Topology {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// `tag` tells apart the topologies of the tests in this binary (they
    /// run in parallel); the prefix `svbpf` those of other tests.
    fn build(tag: &str) -> Result<Topology, String> {
        Self::build_with(tag, false)
    }

    /// With `ipv6`, the same topology is dual-stack: fd00:200::2/64 on the
    /// client, fd00:200:N::2/64 on backend N, `::1` on lb's side of each,
    /// the client routing fd00:96::/64 via lb, the backends' default
    /// routes via lb, IPv6 forwarding on in lb and no duplicate address
    /// detection (addresses usable at once).
    fn build_with(tag: &str, ipv6: bool) -> Result<Topology, String> {
        let topo = Topology {
            prefix: format!("svbpf{}{tag}-", std::process::id()),
        };
        let (c, lb) = (topo.ns("client"), topo.ns("lb"));
        let backends: Vec<String> = (1..=3).map(|i| topo.ns(&format!("b{i}"))).collect();
        for ns in [&c, &lb].into_iter().chain(&backends) {
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            if ipv6 {
                // Before the veths exist, so that they inherit it.
                let dad = "net.ipv6.conf.default.accept_dad=0";
                run(&["ip", "netns", "exec", ns, "sysctl", "-qw", dad])?;
            }
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
            run(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "rx", "off",
            ])
        };
        addr(&c, "c0", "10.200.0.2/24")?;
        addr(&lb, "l0", "10.200.0.1/24")?;
        run(&[
            "ip",
            "-n",
            &c,
            "route",
            "add",
            "10.96.0.0/16",
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
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            run(&[
                "ip",
                "netns",
                "exec",
                &lb,
                "sysctl",
                "-qw",
                &format!("{k}={v}"),
            ])?;
        }
        for dev in ["l0", "l1", "l2", "l3"] {
            let key = format!("net.ipv4.conf.{dev}.rp_filter=0");
            run(&["ip", "netns", "exec", &lb, "sysctl", "-qw", &key])?;
        }
        if ipv6 {
            let addr6 = |ns: &str, dev: &str, a: &str| {
                run(&["ip", "-n", ns, "-6", "addr", "add", a, "dev", dev, "nodad"])
            };
            addr6(&c, "c0", "fd00:200::2/64")?;
            addr6(&lb, "l0", "fd00:200::1/64")?;
            run(&[
                "ip",
                "-n",
                &c,
                "-6",
                "route",
                "add",
                "fd00:96::/64",
                "via",
                "fd00:200::1",
            ])?;
            for (i, b) in backends.iter().enumerate() {
                let n = i + 1;
                addr6(b, "b0", &format!("fd00:200:{n}::2/64"))?;
                addr6(&lb, &format!("l{n}"), &format!("fd00:200:{n}::1/64"))?;
                run(&[
                    "ip",
                    "-n",
                    b,
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("fd00:200:{n}::1"),
                ])?;
            }
            let fwd = "net.ipv6.conf.all.forwarding=1";
            run(&["ip", "netns", "exec", &lb, "sysctl", "-qw", fwd])?;
        }
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

/// Echo servers in backend `n`'s namespace: TCP 8080 sends "B<n>\n" and then
/// echoes; UDP 5353 answers "B<n>:" + the datagram; both on `[::]`, so IPv4
/// and IPv6 alike. Threads live until the process exits (their namespace is
/// deleted under them).
fn spawn_backend(ns: String, n: u8) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter(&ns);
        let l = TcpListener::bind("[::]:8080").unwrap();
        let u = UdpSocket::bind("[::]:5353").unwrap();
        std::thread::spawn(move || {
            // Room for datagrams bigger than the MTU (fragmented).
            let mut buf = vec![0u8; 65536];
            while let Ok((len, from)) = u.recv_from(&mut buf) {
                let mut reply = format!("B{n}:").into_bytes();
                reply.extend_from_slice(&buf[..len]);
                let _ = u.send_to(&reply, from);
            }
        });
        tx.send(()).unwrap();
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                let _ = s.write_all(format!("B{n}\n").as_bytes());
                let mut buf = [0u8; 4096];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 || s.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    rx.recv_timeout(T).expect("backend listening");
}

fn tcp_spec(vip: Ipv4Addr, ids: &[u32], reject: bool) -> EbpfFrontendSpec {
    EbpfFrontendSpec {
        vip: IpAddr::V4(vip),
        port: 80,
        protocol: Protocol::Tcp,
        backends: ids
            .iter()
            .map(|&i| EbpfBackendSpec::active(i, SocketAddr::from(([10, 200, i as u8, 2], 8080))))
            .collect(),
        reject_when_empty: reject,
    }
}

fn udp_spec() -> EbpfFrontendSpec {
    EbpfFrontendSpec {
        vip: IpAddr::V4(VIP),
        port: 53,
        protocol: Protocol::Udp,
        backends: (1..=3u32)
            .map(|i| {
                EbpfBackendSpec::active(10 + i, SocketAddr::from(([10, 200, i as u8, 2], 5353)))
            })
            .collect(),
        reject_when_empty: true,
    }
}

fn predicted(fe: &CompiledFrontend, local: SocketAddr, vip: impl Into<IpAddr>, port: u16) -> u32 {
    let flow = Flow::new(fe.spec().protocol, local, SocketAddr::new(vip.into(), port));
    choose(fe, &flow).expect("a backend")
}

fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root".into());
    }
    if !EbpfDataplane::object_built() {
        return Some("the eBPF object was not built (no clang at build time)".into());
    }
    for tool in ["ip", "ethtool", "sysctl"] {
        if Command::new(tool).arg("-V").output().is_err()
            && Command::new(tool).arg("--version").output().is_err()
        {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

#[test]
fn ebpf_dataplane_in_network_namespaces() {
    if let Some(reason) = skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    let started = Instant::now();
    let topo = Topology::build("d").expect("topology");
    for n in 1..=3u8 {
        spawn_backend(topo.ns(&format!("b{n}")), n);
    }
    let lb = topo.ns("lb");
    let client = topo.ns("client");
    let mut specs = vec![
        tcp_spec(VIP, &[1, 2, 3], true),
        udp_spec(),
        tcp_spec(VIP_EMPTY, &[], true),
        tcp_spec(VIP_LOCAL, &[], false),
        EbpfFrontendSpec {
            vip: IpAddr::V4(VIP_EMPTY),
            port: 53,
            protocol: Protocol::Udp,
            backends: vec![],
            reject_when_empty: true,
        },
    ];
    let mut dp = in_ns(&lb, || EbpfDataplane::load(&["l0", "l1", "l2", "l3"], None))
        .expect("load and attach");
    let insns = dp.verified_instruction_count().unwrap();
    println!(
        "verifier: {insns:?} instructions processed; object {} bytes",
        EbpfDataplane::object().len()
    );
    verifier_log_size();
    let first = dp.apply(&specs).unwrap();
    println!("first apply: {first:?}");

    // 1. 300 TCP connections, every byte echoed, each on the model's backend.
    let fe = dp.compiled(VIP, 80, Protocol::Tcp).unwrap().clone();
    let t = Instant::now();
    let results: Vec<(SocketAddr, u32)> = in_ns(&client, || {
        (0..300u32)
            .map(|i| {
                let mut c = connect(SocketAddr::from((VIP, 80)), T).expect("connect");
                echo(&mut c, i).expect("echo");
                (c.local, c.backend)
            })
            .collect()
    });
    println!("300 connections in {:?}", t.elapsed());
    let agree = results
        .iter()
        .filter(|(local, b)| predicted(&fe, *local, VIP, 80) == *b)
        .count();
    let mut per = [0usize; 4];
    for (_, b) in &results {
        per[*b as usize] += 1;
    }
    println!("model agrees on {agree}/300; per backend {:?}", &per[1..]);
    assert_eq!(agree, 300);
    assert!(per[1..].iter().all(|&k| k > 50), "{per:?}");

    // 2. Backend 2 drains mid-connection: open connections keep working,
    //    new ones avoid it.
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<usize, String>>();
    let (open_tx, open_rx) = std::sync::mpsc::channel::<Vec<u32>>();
    let client2 = client.clone();
    let holder = std::thread::spawn(move || {
        enter(&client2);
        let mut conns: Vec<Conn> = (0..30)
            .map(|_| connect(SocketAddr::from((VIP, 80)), T).expect("connect"))
            .collect();
        open_tx
            .send(conns.iter().map(|c| c.backend).collect())
            .unwrap();
        let _ = rx.recv_timeout(Duration::from_secs(20));
        let mut ok = 0;
        for (i, c) in conns.iter_mut().enumerate() {
            match echo(c, 1000 + i as u32) {
                Ok(()) => ok += 1,
                Err(e) => {
                    let _ = done_tx.send(Err(format!("conn {i} to B{}: {e}", c.backend)));
                    return;
                }
            }
        }
        let _ = done_tx.send(Ok(ok));
    });
    let open = open_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    let on_b2 = open.iter().filter(|&&b| b == 2).count();
    assert!(on_b2 > 0, "no open connection on backend 2: {open:?}");
    specs[0].backends[1].state = svclb::ebpf::BackendState::Draining;
    let diff = dp.apply(&specs).unwrap();
    println!("drain apply: {diff:?}");
    assert_eq!(diff.frontend_writes, 1);
    assert_eq!(diff.backend_writes, 1);
    assert_eq!(diff.table_rewrites, 1);
    tx.send(true).unwrap();
    let kept = done_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap();
    holder.join().unwrap();
    println!("{kept}/30 open connections echoed after the drain ({on_b2} on backend 2)");
    let fe = dp.compiled(VIP, 80, Protocol::Tcp).unwrap().clone();
    let after: Vec<(SocketAddr, u32)> = in_ns(&client, || {
        (0..60u32)
            .map(|i| {
                let mut c = connect(SocketAddr::from((VIP, 80)), T).expect("connect");
                echo(&mut c, 5000 + i).expect("echo");
                (c.local, c.backend)
            })
            .collect()
    });
    assert!(after.iter().all(|(_, b)| *b != 2), "{after:?}");
    let agree = after
        .iter()
        .filter(|(local, b)| predicted(&fe, *local, VIP, 80) == *b)
        .count();
    assert_eq!(agree, 60, "model after the drain");

    // 3. No endpoints: refused (RST); Local without local endpoints: dropped.
    let refused = in_ns(&client, || {
        TcpStream::connect_timeout(&SocketAddr::from((VIP_EMPTY, 80)), T).map(|_| ())
    });
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::ConnectionRefused);
    let dropped = in_ns(&client, || {
        TcpStream::connect_timeout(
            &SocketAddr::from((VIP_LOCAL, 80)),
            Duration::from_millis(500),
        )
        .map(|_| ())
    });
    assert_eq!(dropped.unwrap_err().kind(), ErrorKind::TimedOut);

    // 4. UDP: the reply comes from the VIP (a connected socket takes nothing
    //    else), from the model's backend.
    let ufe = dp.compiled(VIP, 53, Protocol::Udp).unwrap().clone();
    let (local, reply) = in_ns(&client, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.connect(SocketAddr::from((VIP, 53))).unwrap();
        s.send(b"ping").unwrap();
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).expect("UDP reply");
        (
            s.local_addr().unwrap(),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        )
    });
    let want = predicted(&ufe, local, VIP, 53) - 10;
    assert_eq!(reply, format!("B{want}:ping"));
    // UDP to a service without endpoints: ICMP port unreachable, which a
    // connected socket reports as ECONNREFUSED.
    let refused = in_ns(&client, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.connect(SocketAddr::from((VIP_EMPTY, 53))).unwrap();
        s.send(b"ping").unwrap();
        let mut buf = [0u8; 64];
        s.recv(&mut buf).map(|_| ())
    });
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::ConnectionRefused);

    let counters = dp.counters().unwrap();
    let tracked = dp.tracked().unwrap();
    println!("counters: {counters:?}");
    println!("tracked connections: {}", tracked.len());
    assert!(counters.reject_rst >= 1 && counters.reject_icmp >= 1 && counters.drop_local >= 1);
    assert_eq!(counters.drop_malformed + counters.drop_no_backend, 0);
    // Timeouts: closed TCP flows expire 10 s after their last packet, UDP
    // 60 s after, so the UDP entry (made last) outlives every closed flow
    // by 50 s plus the few seconds between them.
    let udp = tracked
        .iter()
        .find(|c| c.protocol == Protocol::Udp && c.frontend.port() == 53 && c.backend_id > 10)
        .expect("the UDP flow is tracked");
    let closed: Vec<_> = tracked.iter().filter(|c| c.state == "CLOSED").collect();
    assert!(
        closed.len() >= 300,
        "{} closed of {}",
        closed.len(),
        tracked.len()
    );
    for c in &closed {
        let gap = Duration::from_nanos(udp.expires_ns.saturating_sub(c.expires_ns));
        assert!(
            (Duration::from_secs(45)..=Duration::from_secs(61)).contains(&gap),
            "{c:?}: {gap:?}"
        );
    }

    // 5. Per-packet cost in the kernel (BPF_PROG_TEST_RUN).
    let syn = frame([10, 200, 0, 9], [10, 96, 0, 10], 40000, 80, 0x02);
    let reply = frame([10, 200, 1, 2], [10, 200, 0, 9], 8080, 40000, 0x12);
    let other = frame([10, 200, 0, 9], [10, 200, 7, 7], 40000, 80, 0x02);
    // Kernel and model agree on 20,000 more new flows: the DNAT target of
    // each SYN run through BPF_PROG_TEST_RUN is the model's backend.
    let mut agree = 0;
    for i in 0..20_000u32 {
        let src = [10, 202, (i >> 8) as u8, i as u8];
        let sport = 1024 + (i.wrapping_mul(7919) % 60000) as u16;
        let r = dp
            .test_run(&frame(src, VIP.octets(), sport, 80, 0x02), 1)
            .unwrap();
        let dst = SocketAddr::from((
            [r.packet[30], r.packet[31], r.packet[32], r.packet[33]],
            u16::from_be_bytes([r.packet[36], r.packet[37]]),
        ));
        let want = fe.backend(predicted(&fe, SocketAddr::from((src, sport)), VIP, 80));
        if want.map(|b| b.addr) == Some(dst) {
            agree += 1;
        }
    }
    println!("BPF_PROG_TEST_RUN: model agrees on {agree}/20000 new flows");
    assert_eq!(agree, 20_000);

    // A run rewrites its packet in place, so `repeat` would run the rest on
    // the rewritten copy: every figure is the mean of 2000 single runs.
    let mean = |pkts: &mut dyn Iterator<Item = Vec<u8>>| {
        let (mut total, mut n) = (Duration::ZERO, 0u32);
        for pkt in pkts {
            let r = dp.test_run(&pkt, 1).unwrap();
            assert_eq!(r.return_value, 0, "TC_ACT_OK");
            total += r.duration;
            n += 1;
        }
        total.as_nanos() / u128::from(n)
    };
    let c0 = dp.counters().unwrap();
    let new = mean(&mut (0..2000u16).map(|i| {
        frame(
            [10, 201, (i >> 8) as u8, i as u8],
            [10, 96, 0, 10],
            30000 + i,
            80,
            0x02,
        )
    }));
    let c1 = dp.counters().unwrap();
    let tracked = mean(&mut (0..2000).map(|_| syn.clone()));
    let c2 = dp.counters().unwrap();
    let replies = mean(&mut (0..2000).map(|_| reply.clone()));
    let c3 = dp.counters().unwrap();
    let pass = mean(&mut (0..2000).map(|_| other.clone()));
    let pass_repeat = dp.test_run(&other, 100_000).unwrap().duration;
    println!(
        "BPF_PROG_TEST_RUN ns/packet: new flow {new}, tracked {tracked}, reply {replies}, \
         pass {pass} (pass with repeat=100000: {})",
        pass_repeat.as_nanos()
    );
    assert_eq!(c1.new_connections - c0.new_connections, 2000);
    assert!(c2.tracked - c1.tracked >= 1999, "{c2:?}");
    assert_eq!(c3.replies - c2.replies, 2000);
    // No namespace saw a bad TCP or UDP checksum (offload is off, so the
    // receivers verified every one the program rewrote).
    for n in ["client", "b1", "b2", "b3"] {
        let errors = checksum_errors(&topo.ns(n));
        assert_eq!(errors, (0, 0), "{n}: TCP/UDP InCsumErrors");
    }
    // Dropping the dataplane detaches its TCX links and unloads the program
    // (the kernel frees a program once no link holds it).
    let id = dp.program_id().unwrap();
    let loaded = || {
        Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .map(|o| o.status.success())
    };
    let before = loaded();
    drop(dp);
    if let Ok(true) = before {
        let deadline = Instant::now() + T;
        while loaded().unwrap_or(false) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !loaded().unwrap_or(false),
            "program {id} still loaded after drop"
        );
        println!("program {id} unloaded after drop");
    }
    println!("netns test took {:?}", started.elapsed());
}

const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const VIP6_EMPTY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);

/// Backend number (1..=3) of a backend address 10.200.N.2 or fd00:200:N::2.
fn number_of(addr: SocketAddr) -> u32 {
    match addr.ip() {
        IpAddr::V4(v4) => u32::from(v4.octets()[2]),
        IpAddr::V6(v6) => u32::from(v6.segments()[2]),
    }
}

/// A dual-stack cluster: `web` (10.96.0.10 and fd00:96::10, TCP 80 -> 8080,
/// UDP 53 -> 5353) on the backends `v6` names (1..=3) over IPv6 and all
/// three over IPv4; `empty` (fd00:96::11, TCP 80 and UDP 53) without
/// endpoints.
fn dual_stack(v6: &[u16]) -> Vec<svclb::Change> {
    dual_stack_terminating(v6, &[])
}

/// [`dual_stack`] with the IPv6 endpoints `terminating` (a subset of `v6`)
/// terminating: not ready, still serving (a pod being deleted).
fn dual_stack_terminating(v6: &[u16], terminating: &[u16]) -> Vec<svclb::Change> {
    use svclb::{
        AddressType, Change, EndpointSlice, EndpointSpec, Service, ServicePortSpec, SlicePortSpec,
    };
    let ports = |b: svclb::ServiceBuilder| {
        b.port(ServicePortSpec::tcp(80).name("http").target_port(8080))
            .port(ServicePortSpec::udp(53).name("dns").target_port(5353))
            .build()
            .expect("a valid service")
    };
    let slice = |name: &str, family, addrs: Vec<(String, bool)>| {
        EndpointSlice::builder("default", name, "web", family)
            .port(SlicePortSpec::tcp(8080).name("http"))
            .port(SlicePortSpec::udp(5353).name("dns"))
            .endpoints(addrs.into_iter().map(|(a, term)| {
                EndpointSpec::new(a)
                    .ready(!term)
                    .serving(true)
                    .terminating(term)
            }))
            .build()
            .expect("a valid slice")
    };
    vec![
        Change::UpsertService(ports(
            Service::builder("default", "web")
                .cluster_ip(IpAddr::V4(VIP))
                .cluster_ip(IpAddr::V6(VIP6)),
        )),
        Change::UpsertService(ports(
            Service::builder("default", "empty").cluster_ip(IpAddr::V6(VIP6_EMPTY)),
        )),
        Change::UpsertSlice(slice(
            "web-v4",
            AddressType::IPv4,
            (1..=3).map(|n| (format!("10.200.{n}.2"), false)).collect(),
        )),
        Change::UpsertSlice(slice(
            "web-v6",
            AddressType::IPv6,
            v6.iter()
                .map(|n| (format!("fd00:200:{n}::2"), terminating.contains(n)))
                .collect(),
        )),
    ]
}

/// IPv6 in the kernel program, written from the plan of a dual-stack
/// service: 300 IPv6 connections (and 30 IPv4 ones of the same service)
/// echoed on the model's backend, a removed backend and then a terminating
/// endpoint each keeping their open connections while new ones avoid them
/// (the planner drains both), REJECT as a TCP RST and ICMPv6 port
/// unreachable, a UDP exchange, and the rewritten checksums verified by
/// the receivers (offload off) and, for `BPF_PROG_TEST_RUN` frames, here.
#[test]
fn ebpf_dataplane_ipv6_dual_stack_in_network_namespaces() {
    if let Some(reason) = skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    let started = Instant::now();
    let topo = Topology::build_with("6", true).expect("dual-stack topology");
    for n in 1..=3u8 {
        spawn_backend(topo.ns(&format!("b{n}")), n);
    }
    let (lb, client) = (topo.ns("lb"), topo.ns("client"));
    let mut table = svclb::ServiceTable::new();
    table.apply_batch(dual_stack(&[1, 2, 3])).unwrap();
    let mut planner = svclb::Planner::new(svclb::NodeTopology::default());
    planner.update(
        &table,
        &table.full_change_set(),
        svclb::Instant::ZERO,
        |_| false,
    );
    let specs = |planner: &svclb::Planner| -> Vec<EbpfFrontendSpec> {
        planner
            .frontends()
            .map(|fe| svclb::ebpf::model::frontend_spec(fe))
            .collect()
    };
    let mut dp = in_ns(&lb, || EbpfDataplane::load(&["l0", "l1", "l2", "l3"], None))
        .expect("load and attach");
    println!(
        "verifier: {:?} instructions processed",
        dp.verified_instruction_count().unwrap()
    );
    let all = specs(&planner);
    assert_eq!(all.iter().filter(|s| s.vip.is_ipv6()).count(), 4, "{all:?}");
    let first = dp.apply(&all).unwrap();
    println!("first apply: {first:?} ({} frontends)", all.len());

    // 1. 300 IPv6 connections, every byte echoed, each on the model's
    //    backend; 30 IPv4 connections to the same service too.
    let fe = dp.compiled(VIP6, 80, Protocol::Tcp).unwrap().clone();
    let fe4 = dp.compiled(VIP, 80, Protocol::Tcp).unwrap().clone();
    let number = |fe: &CompiledFrontend, id: u32| number_of(fe.backend(id).expect("backend").addr);
    let conns = |vip: IpAddr, n: u32, seed: u32| -> Vec<(SocketAddr, u32)> {
        in_ns(&client, || {
            (0..n)
                .map(|i| {
                    let mut c = connect(SocketAddr::new(vip, 80), T).expect("connect");
                    echo(&mut c, seed + i).expect("echo");
                    (c.local, c.backend)
                })
                .collect()
        })
    };
    let t = Instant::now();
    let results = conns(IpAddr::V6(VIP6), 300, 0);
    println!("300 IPv6 connections in {:?}", t.elapsed());
    let agree = |fe: &CompiledFrontend, vip: IpAddr, r: &[(SocketAddr, u32)]| {
        r.iter()
            .filter(|(local, b)| number(fe, predicted(fe, *local, vip, 80)) == *b)
            .count()
    };
    let mut per = [0usize; 4];
    for (local, b) in &results {
        assert!(local.is_ipv6());
        per[*b as usize] += 1;
    }
    let ok = agree(&fe, IpAddr::V6(VIP6), &results);
    println!(
        "IPv6: model agrees on {ok}/300; per backend {:?}",
        &per[1..]
    );
    assert_eq!(ok, 300);
    assert!(per[1..].iter().all(|&k| k > 50), "{per:?}");
    let v4 = conns(IpAddr::V4(VIP), 30, 400);
    assert_eq!(agree(&fe4, IpAddr::V4(VIP), &v4), 30, "IPv4 beside IPv6");

    // 2. Backend 2 leaves the IPv6 slice while 30 connections are open:
    //    the planner drains it (it has connections), the loader keeps it
    //    in svclb_backend6, the open connections keep echoing, new ones
    //    avoid it.
    let mut open: Vec<Conn> = in_ns(&client, || {
        (0..30)
            .map(|_| connect(SocketAddr::from((VIP6, 80)), T).expect("connect"))
            .collect()
    });
    let on_b2 = open.iter().filter(|c| c.backend == 2).count();
    assert!(on_b2 > 0, "no open connection on backend 2");
    let changes = table.apply_batch(dual_stack(&[1, 3])).unwrap();
    let diff = planner.update(&table, &changes, svclb::Instant::from_millis(1000), |_| {
        true
    });
    assert!(
        diff.backends
            .iter()
            .any(|(_, s)| *s == svclb::BackendState::Draining),
        "backend 2 drains: {diff:?}"
    );
    let stats = dp.apply(&specs(&planner)).unwrap();
    println!("removal apply: {stats:?}");
    // Only the IPv6 TCP and UDP frontends changed: their entries, their
    // tables, and backend 2's two entries (now draining) in svclb_backend6.
    assert_eq!(stats.frontend_writes, 2);
    assert_eq!(stats.table_rewrites, 2);
    assert_eq!(stats.backend_writes, 2);
    let echoed = in_ns(&client, || {
        open.iter_mut()
            .enumerate()
            .map(|(i, c)| echo(c, 1000 + i as u32).map(|()| c.backend))
            .collect::<Result<Vec<u32>, _>>()
    })
    .expect("open connections echo after the removal");
    println!(
        "{}/30 open IPv6 connections echoed after the removal ({on_b2} on backend 2)",
        echoed.len()
    );
    let fe = dp.compiled(VIP6, 80, Protocol::Tcp).unwrap().clone();
    assert!(fe.table().iter().all(|&id| number(&fe, id) != 2));
    let after = conns(IpAddr::V6(VIP6), 60, 5000);
    assert!(after.iter().all(|(_, b)| *b != 2), "{after:?}");
    assert_eq!(
        agree(&fe, IpAddr::V6(VIP6), &after),
        60,
        "model after the removal"
    );
    drop(open);

    // 2b. Backend 3's endpoint turns terminating (not ready, serving)
    //     while 30 connections are open: the planner drains it, its open
    //     connections keep echoing, new ones go to backend 1 alone.
    let mut open: Vec<Conn> = in_ns(&client, || {
        (0..30)
            .map(|_| connect(SocketAddr::from((VIP6, 80)), T).expect("connect"))
            .collect()
    });
    let on_b3 = open.iter().filter(|c| c.backend == 3).count();
    assert!(on_b3 > 0, "no open connection on backend 3");
    let changes = table
        .apply_batch(dual_stack_terminating(&[1, 3], &[3]))
        .unwrap();
    let diff = planner.update(&table, &changes, svclb::Instant::from_millis(2000), |_| {
        true
    });
    assert!(
        diff.backends
            .iter()
            .any(|(_, s)| *s == svclb::BackendState::Draining),
        "the terminating backend drains: {diff:?}"
    );
    let stats = dp.apply(&specs(&planner)).unwrap();
    println!("terminating apply: {stats:?}");
    let echoed = in_ns(&client, || {
        open.iter_mut()
            .enumerate()
            .map(|(i, c)| echo(c, 2000 + i as u32).map(|()| c.backend))
            .collect::<Result<Vec<u32>, _>>()
    })
    .expect("open connections echo while their endpoint terminates");
    println!(
        "{}/30 open IPv6 connections echoed with backend 3 terminating ({on_b3} on it)",
        echoed.len()
    );
    let fe = dp.compiled(VIP6, 80, Protocol::Tcp).unwrap().clone();
    assert!(fe.table().iter().all(|&id| number(&fe, id) == 1));
    let after = conns(IpAddr::V6(VIP6), 30, 6000);
    assert!(after.iter().all(|(_, b)| *b == 1), "{after:?}");
    drop(open);

    // 3. No endpoints: a TCP RST (ECONNREFUSED) and, for UDP, ICMPv6 port
    //    unreachable (ECONNREFUSED on a connected socket).
    let refused = in_ns(&client, || {
        TcpStream::connect_timeout(&SocketAddr::from((VIP6_EMPTY, 80)), T).map(|_| ())
    });
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::ConnectionRefused);
    let udp = |vip: Ipv6Addr| {
        in_ns(&client, || -> std::io::Result<(SocketAddr, String)> {
            let s = UdpSocket::bind("[::]:0")?;
            s.set_read_timeout(Some(T))?;
            s.connect(SocketAddr::from((vip, 53)))?;
            s.send(b"ping")?;
            let mut buf = [0u8; 64];
            let n = s.recv(&mut buf)?;
            Ok((
                s.local_addr()?,
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            ))
        })
    };
    let refused = udp(VIP6_EMPTY);
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::ConnectionRefused);

    // 4. UDP over IPv6: the reply comes from the VIP, from the model's
    //    backend.
    let ufe = dp.compiled(VIP6, 53, Protocol::Udp).unwrap().clone();
    let (local, reply) = udp(VIP6).expect("a UDP reply");
    let flow = Flow::udp(local, SocketAddr::from((VIP6, 53)));
    let want = number(&ufe, choose(&ufe, &flow).expect("a backend"));
    assert_eq!(reply, format!("B{want}:ping"));

    // 5. BPF_PROG_TEST_RUN: 2,000 IPv6 SYNs DNATed to the model's backend
    //    with a TCP checksum that verifies, and a reply reverse-NATed to
    //    the VIP with one that verifies too.
    let mut agree_runs = 0;
    for i in 0..2000u32 {
        let src = Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, (i >> 8) as u16, i as u16);
        let sport = 1024 + (i.wrapping_mul(7919) % 60000) as u16;
        let r = dp.test_run(&frame6(src, VIP6, sport, 80, 0x02), 1).unwrap();
        assert_eq!(r.return_value, 0, "TC_ACT_OK");
        assert!(tcp6_checksum_ok(&r.packet), "DNAT checksum, flow {i}");
        let dst = SocketAddr::from((
            <[u8; 16]>::try_from(&r.packet[38..54]).unwrap(),
            u16::from_be_bytes([r.packet[56], r.packet[57]]),
        ));
        let flow = Flow::tcp(SocketAddr::from((src, sport)), SocketAddr::from((VIP6, 80)));
        let want = choose(&fe, &flow)
            .and_then(|id| fe.backend(id))
            .map(|b| b.addr);
        if want == Some(dst) {
            agree_runs += 1;
        }
        if i == 0 {
            let IpAddr::V6(b6) = dst.ip() else {
                unreachable!("IPv6 backend")
            };
            let r = dp
                .test_run(&frame6(b6, src, dst.port(), sport, 0x12), 1)
                .unwrap();
            assert!(tcp6_checksum_ok(&r.packet), "reverse NAT checksum");
            assert_eq!(&r.packet[22..38], &VIP6.octets(), "reply from the VIP");
            assert_eq!(u16::from_be_bytes([r.packet[54], r.packet[55]]), 80);
        }
    }
    println!("BPF_PROG_TEST_RUN: model agrees on {agree_runs}/2000 new IPv6 flows");
    assert_eq!(agree_runs, 2000);

    let counters = dp.counters().unwrap();
    println!("counters: {counters:?}");
    assert!(counters.reject_rst >= 1 && counters.reject_icmp >= 1);
    assert_eq!(counters.drop_malformed + counters.drop_no_backend, 0);
    let tracked = dp.tracked().unwrap();
    let v6_tracked = tracked
        .iter()
        .filter(|c| c.frontend.ip() == IpAddr::V6(VIP6))
        .count();
    println!(
        "tracked connections: {} ({v6_tracked} to {VIP6})",
        tracked.len()
    );
    assert!(v6_tracked >= 390, "{v6_tracked}");
    // The receivers verified every rewritten checksum (offload is off).
    for n in ["client", "b1", "b2", "b3"] {
        let ns = topo.ns(n);
        assert_eq!(checksum_errors(&ns), (0, 0), "{n}: TCP/UDP InCsumErrors");
        assert_eq!(udp6_checksum_errors(&ns), 0, "{n}: Udp6InCsumErrors");
    }
    println!("IPv6 netns test took {:?}", started.elapsed());
}

/// External frontend kinds in the kernel program, written from the plan:
/// a node port on lb's own address (10.200.0.1, the client's gateway), an
/// external IP (10.97.0.5, routed via lb), and `externalTrafficPolicy:
/// Local` node ports (only the endpoints on node `lb`; none there: DROP),
/// each matched by (address, port, protocol) as cluster IPs are, each
/// connection on the backend the model predicts.
#[test]
fn ebpf_node_ports_and_external_ips_in_network_namespaces() {
    use svclb::plan::{FrontendKind, NodeAddresses};
    use svclb::{
        AddressType, Change, EndpointSlice, EndpointSpec, Service, ServicePortSpec, ServiceType,
        SlicePortSpec, TrafficPolicy,
    };
    if let Some(reason) = skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    let topo = Topology::build("n").expect("topology");
    for n in 1..=3u8 {
        spawn_backend(topo.ns(&format!("b{n}")), n);
    }
    let (lb, client) = (topo.ns("lb"), topo.ns("client"));
    run(&[
        "ip",
        "-n",
        &client,
        "route",
        "add",
        "10.97.0.0/16",
        "via",
        "10.200.0.1",
    ])
    .unwrap();
    // Replies to a node port on lb's own address are reverse-NATed at TC
    // ingress, before routing, so they arrive with a local source address,
    // which the kernel drops as martian unless accept_local is on.
    for dev in ["all", "l1", "l2", "l3"] {
        let key = format!("net.ipv4.conf.{dev}.accept_local=1");
        run(&["ip", "netns", "exec", &lb, "sysctl", "-qw", &key]).unwrap();
    }
    let node_ip = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1));
    let external = IpAddr::V4(Ipv4Addr::new(10, 97, 0, 5));
    let service = |name: &str, vip: [u8; 4], node_port: i64, local: bool| {
        let mut b = Service::builder("default", name)
            .service_type(ServiceType::NodePort)
            .cluster_ip(IpAddr::from(vip))
            .port(
                ServicePortSpec::tcp(80)
                    .name("http")
                    .target_port(8080)
                    .node_port(node_port),
            );
        if local {
            b = b.external_traffic_policy(TrafficPolicy::Local);
        } else {
            b = b.external_ip(external);
        }
        Change::UpsertService(b.build().expect("a valid service"))
    };
    let slice = |svc: &str, endpoints: &[(u8, &str)]| {
        Change::UpsertSlice(
            EndpointSlice::builder("default", format!("{svc}-1"), svc, AddressType::IPv4)
                .port(SlicePortSpec::tcp(8080).name("http"))
                .endpoints(
                    endpoints
                        .iter()
                        .map(|(n, node)| EndpointSpec::new(format!("10.200.{n}.2")).node(*node)),
                )
                .build()
                .expect("a valid slice"),
        )
    };
    let mut table = svclb::ServiceTable::new();
    table
        .apply_batch([
            service("web", [10, 96, 0, 30], 30080, false),
            slice("web", &[(1, "n1"), (2, "n2"), (3, "n3")]),
            service("local", [10, 96, 0, 31], 30081, true),
            slice("local", &[(1, "n1"), (3, "lb")]),
            service("nolocal", [10, 96, 0, 32], 30082, true),
            slice("nolocal", &[(2, "n2")]),
        ])
        .unwrap();
    let mut planner = svclb::Planner::new(svclb::NodeTopology {
        node_name: Some("lb".into()),
        zone: None,
    });
    planner.set_node_addresses(NodeAddresses::new(vec![node_ip], vec![]));
    planner.update(
        &table,
        &table.full_change_set(),
        svclb::Instant::ZERO,
        |_| false,
    );
    let kinds: Vec<FrontendKind> = planner.frontends().map(|fe| fe.kind()).collect();
    println!("plan frontends: {kinds:?}");
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == FrontendKind::NodePort)
            .count(),
        3
    );
    assert!(kinds.contains(&FrontendKind::ExternalIp));
    let specs: Vec<EbpfFrontendSpec> = planner
        .frontends()
        .map(|fe| svclb::ebpf::model::frontend_spec(fe))
        .collect();
    let mut dp = in_ns(&lb, || EbpfDataplane::load(&["l0", "l1", "l2", "l3"], None))
        .expect("load and attach");
    dp.apply(&specs).unwrap();

    // `n` connections to `dst`, each echoed: (client address, backend).
    let conns = |dst: SocketAddr, n: u32| -> Vec<(SocketAddr, u32)> {
        in_ns(&client, || {
            (0..n)
                .map(|i| {
                    let mut c = connect(dst, T).expect("connect");
                    echo(&mut c, i).expect("echo");
                    (c.local, c.backend)
                })
                .collect()
        })
    };
    let check = |dst: SocketAddr, n: u32| -> Vec<u32> {
        let fe = dp
            .compiled(dst.ip(), dst.port(), Protocol::Tcp)
            .expect("a written frontend")
            .clone();
        let got = conns(dst, n);
        let agree = got
            .iter()
            .filter(|(local, b)| {
                let id = predicted(&fe, *local, dst.ip(), dst.port());
                number_of(fe.backend(id).expect("backend").addr) == *b
            })
            .count();
        println!("{dst}: model agrees on {agree}/{n}");
        assert_eq!(agree, n as usize, "{dst}");
        got.into_iter().map(|(_, b)| b).collect()
    };
    let used = |dst: SocketAddr, n: u32| {
        let mut b = check(dst, n);
        b.sort_unstable();
        b.dedup();
        b
    };
    // Cluster policy: the node port and the external IP spread over all
    // three backends.
    assert_eq!(used(SocketAddr::new(node_ip, 30080), 60), [1, 2, 3]);
    assert_eq!(used(SocketAddr::new(external, 80), 60), [1, 2, 3]);
    // Local policy: the node port only reaches the endpoint on node `lb`;
    // the service's cluster IP is not external, so it reaches both.
    assert_eq!(used(SocketAddr::new(node_ip, 30081), 30), [3]);
    assert_eq!(used(SocketAddr::from(([10, 96, 0, 31], 80)), 60), [1, 3]);
    // Local policy without a local endpoint: dropped (no RST).
    let dropped = in_ns(&client, || {
        TcpStream::connect_timeout(&SocketAddr::new(node_ip, 30082), Duration::from_millis(500))
            .map(|_| ())
    });
    assert_eq!(dropped.unwrap_err().kind(), ErrorKind::TimedOut);
    let c = dp.counters().unwrap();
    println!("counters: {c:?}");
    assert!(c.drop_local >= 1);
    assert_eq!(c.drop_malformed + c.drop_no_backend, 0);
    for n in ["client", "b1", "b2", "b3"] {
        assert_eq!(checksum_errors(&topo.ns(n)), (0, 0), "{n}");
    }
}

/// `Udp6InCsumErrors` in namespace `ns` (`/proc/net/snmp6`; TCP's counter
/// in `/proc/net/snmp` covers IPv6 too).
fn udp6_checksum_errors(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp6"])
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Udp6InCsumErrors in /proc/net/snmp6")
}

/// An Ethernet + IPv6 + TCP frame with a correct checksum.
fn frame6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 40 + 20];
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let ip = &mut f[14..54];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&20u16.to_be_bytes());
    ip[6] = 6;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    let tcp = &mut f[54..74];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let c = csum(&f[54..74], pseudo6(&f));
    f[70..72].copy_from_slice(&c.to_be_bytes());
    f
}

/// The IPv6 pseudo-header's sum: addresses, upper-layer length, next header.
fn pseudo6(f: &[u8]) -> u32 {
    let mut s: u32 = f[22..54]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    s += u32::from(u16::from_be_bytes([f[18], f[19]])) + u32::from(f[20]);
    s
}

/// Whether the TCP checksum of an Ethernet + IPv6 + TCP frame verifies.
fn tcp6_checksum_ok(f: &[u8]) -> bool {
    f.len() >= 74 && f[12..14] == [0x86, 0xdd] && csum(&f[54..], pseudo6(f)) == 0
}

/// `InCsumErrors` of TCP and UDP in namespace `ns` (`/proc/net/snmp`).
fn checksum_errors(ns: &str) -> (u64, u64) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .output()
        .expect("ip netns exec");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |proto: &str| -> u64 {
        let mut rows = text
            .lines()
            .filter(|l| l.starts_with(&format!("{proto}: ")));
        let (names, values) = (rows.next().unwrap_or(""), rows.next().unwrap_or(""));
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "InCsumErrors")
            .and_then(|(_, v)| v.parse().ok())
            .expect("InCsumErrors in /proc/net/snmp")
    };
    (field("Tcp"), field("Udp"))
}

/// The verifier log's size, from `bpftool -d prog load` (aya 0.14 keeps the
/// log only when loading fails).
fn verifier_log_size() {
    let dir = std::env::temp_dir().join(format!("svclb-obj-{}", std::process::id()));
    let obj = dir.with_extension("o");
    std::fs::write(&obj, EbpfDataplane::object()).unwrap();
    let pin = format!("/sys/fs/bpf/svclb_verify_{}", std::process::id());
    let out = Command::new("timeout")
        .args(["60", "bpftool", "-d", "prog", "load"])
        .arg(&obj)
        .args([&pin, "type", "classifier"])
        .output();
    let _ = std::fs::remove_file(&pin);
    let _ = std::fs::remove_file(&obj);
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stderr);
            let log: Vec<&str> = text
                .lines()
                .skip_while(|l| !l.contains("BEGIN PROG LOAD LOG"))
                .skip(1)
                .take_while(|l| !l.contains("END PROG LOAD LOG"))
                .collect();
            let bytes: usize = log.iter().map(|l| l.len() + 1).sum();
            let last = log
                .iter()
                .rev()
                .find(|l| l.starts_with("processed"))
                .unwrap_or(&"");
            println!(
                "verifier log (log_level 1): {bytes} bytes, {} lines; {last}",
                log.len()
            );
        }
        _ => println!("verifier log size not measured: bpftool not installed or failed"),
    }
}

/// An Ethernet + IPv4 + TCP frame with correct checksums.
fn frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = csum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = 0u32;
    for w in [&src[..], &dst[..]] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += 6 + 20;
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

/// An Ethernet + IPv4 + UDP frame with correct checksums.
fn udp4_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let ulen = 8 + payload.len();
    let mut f = vec![0u8; 14 + 20 + ulen];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((20 + ulen) as u16).to_be_bytes());
    f[18..20].copy_from_slice(&0x1234u16.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&src.octets());
    f[30..34].copy_from_slice(&dst.octets());
    let c = csum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[38..40].copy_from_slice(&(ulen as u16).to_be_bytes());
    f[42..].copy_from_slice(payload);
    let c = csum(&f[34..], pseudo4(&f[14..34], 17, ulen));
    f[40..42].copy_from_slice(&c.to_be_bytes());
    f
}

/// The IPv4 pseudo-header's sum for an IP header `ip`.
fn pseudo4(ip: &[u8], proto: u8, len: usize) -> u32 {
    ip[12..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>()
        + u32::from(proto)
        + len as u32
}

/// An Ethernet + IPv6 frame: `exthdrs` (each `(next header of the one
/// before, bytes)`, the first byte of each overwritten with the next
/// header) and then UDP, with a correct UDP checksum.
fn udp6_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    exthdrs: &[(u8, Vec<u8>)],
    payload: &[u8],
) -> Vec<u8> {
    let ulen = 8 + payload.len();
    let ext: usize = exthdrs.iter().map(|(_, h)| h.len()).sum();
    let mut f = vec![0u8; 14 + 40 + ext + ulen];
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    f[14] = 0x60;
    f[18..20].copy_from_slice(&((ext + ulen) as u16).to_be_bytes());
    f[20] = exthdrs.first().map_or(17, |(n, _)| *n);
    f[21] = 64;
    f[22..38].copy_from_slice(&src.octets());
    f[38..54].copy_from_slice(&dst.octets());
    let mut at = 54;
    for (i, (_, h)) in exthdrs.iter().enumerate() {
        f[at..at + h.len()].copy_from_slice(h);
        f[at] = exthdrs.get(i + 1).map_or(17, |(n, _)| *n);
        at += h.len();
    }
    f[at..at + 2].copy_from_slice(&sport.to_be_bytes());
    f[at + 2..at + 4].copy_from_slice(&dport.to_be_bytes());
    f[at + 4..at + 6].copy_from_slice(&(ulen as u16).to_be_bytes());
    f[at + 8..].copy_from_slice(payload);
    let c = csum(&f[at..], pseudo6_for(&f[22..54], 17, ulen));
    f[at + 6..at + 8].copy_from_slice(&c.to_be_bytes());
    f
}

/// The IPv6 pseudo-header's sum for the addresses `addrs` (32 bytes).
fn pseudo6_for(addrs: &[u8], next: u8, len: usize) -> u32 {
    addrs
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>()
        + u32::from(next)
        + len as u32
}

/// An Ethernet + IPv4 ICMP error (`kind`: type and code) from `src` to
/// `dst` quoting the IP packet `quote`, with correct checksums.
fn icmp4_error(kind: (u8, u8), src: Ipv4Addr, dst: Ipv4Addr, quote: &[u8]) -> Vec<u8> {
    let len = 20 + 8 + quote.len();
    let mut f = vec![0u8; 14 + len];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&(len as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 1;
    f[26..30].copy_from_slice(&src.octets());
    f[30..34].copy_from_slice(&dst.octets());
    let c = csum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    (f[34], f[35]) = kind;
    if kind == (3, 4) {
        // fragmentation needed: the next hop's MTU
        f[40..42].copy_from_slice(&1400u16.to_be_bytes());
    }
    f[42..].copy_from_slice(quote);
    let c = csum(&f[34..], 0);
    f[36..38].copy_from_slice(&c.to_be_bytes());
    f
}

/// An Ethernet + IPv6 ICMPv6 error (`kind`: type and code; packet too big
/// carries an MTU of 1,400) from `src` to `dst` quoting the IPv6 packet
/// `quote`, with a correct checksum.
fn icmp6_error(kind: (u8, u8), src: Ipv6Addr, dst: Ipv6Addr, quote: &[u8]) -> Vec<u8> {
    let len = 8 + quote.len();
    let mut f = vec![0u8; 14 + 40 + len];
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    f[14] = 0x60;
    f[18..20].copy_from_slice(&(len as u16).to_be_bytes());
    f[20] = 58;
    f[21] = 64;
    f[22..38].copy_from_slice(&src.octets());
    f[38..54].copy_from_slice(&dst.octets());
    (f[54], f[55]) = kind;
    if kind.0 == 2 {
        f[58..62].copy_from_slice(&1400u32.to_be_bytes());
    }
    f[62..].copy_from_slice(quote);
    let c = csum(&f[54..], pseudo6_for(&f[22..54], 58, len));
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f
}

/// Sends `payload` from a connected UDP socket in the current namespace
/// to `to` and waits (T) for one reply: (local address, reply).
fn udp_exchange(to: SocketAddr, payload: &[u8]) -> std::io::Result<(SocketAddr, Vec<u8>)> {
    let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    s.set_read_timeout(Some(T))?;
    s.connect(to)?;
    s.send(payload)?;
    let mut buf = vec![0u8; 65536];
    let n = s.recv(&mut buf)?;
    buf.truncate(n);
    Ok((s.local_addr()?, buf))
}

/// ICMP errors from backends, fragments and IPv6 extension headers, in the
/// dual-stack topology with the loader driven directly:
/// - a UDP datagram to a VIP whose backend port is closed: the backend's
///   ICMP (ICMPv6) port unreachable is reverse-NATed, quote included, so
///   the client's connected socket gets ECONNREFUSED (its kernel delivers
///   the error only when the quote matches the socket: client -> VIP:port);
///   and through `BPF_PROG_TEST_RUN`, the quote after the reverse NAT is
///   byte for byte the datagram the client sent (IP and UDP checksums
///   included), with valid outer IP and ICMP(v6) checksums, and so is the
///   quoted SYN of a fragmentation needed (IPv4) or packet too big (IPv6);
/// - the other direction: a backend that answers after the client's socket
///   has closed gets ECONNREFUSED from the client's port unreachable, its
///   quote restored to the backend's own reply (byte for byte, checked
///   through `BPF_PROG_TEST_RUN` too);
/// - 3,000-byte UDP datagrams (fragmented by the client's kernel at MTU
///   1,500, and the echo by the backend's) reach the model's backend and
///   come back whole, over IPv4 and IPv6;
/// - IPv6 UDP with destination-options and hop-by-hop headers is DNATed to
///   the model's backend with a checksum that verifies, a later fragment
///   whose first was not seen passes untouched.
#[test]
fn ebpf_icmp_errors_fragments_and_extension_headers_in_network_namespaces() {
    if let Some(reason) = skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    let started = Instant::now();
    let topo = Topology::build_with("i", true).expect("dual-stack topology");
    for n in 1..=3u8 {
        spawn_backend(topo.ns(&format!("b{n}")), n);
    }
    let (lb, client) = (topo.ns("lb"), topo.ns("client"));
    let b6 = |n: u16| Ipv6Addr::new(0xfd00, 0x200, n, 0, 0, 0, 0, 2);
    let udp = |vip: IpAddr, port: u16, backends: Vec<EbpfBackendSpec>| EbpfFrontendSpec {
        vip,
        port,
        protocol: Protocol::Udp,
        backends,
        reject_when_empty: true,
    };
    let specs = vec![
        tcp_spec(VIP, &[1, 2, 3], true),
        EbpfFrontendSpec {
            vip: IpAddr::V6(VIP6),
            port: 80,
            protocol: Protocol::Tcp,
            backends: (1..=3u16)
                .map(|n| {
                    EbpfBackendSpec::active(40 + u32::from(n), SocketAddr::from((b6(n), 8080)))
                })
                .collect(),
            reject_when_empty: true,
        },
        udp_spec(),
        udp(
            IpAddr::V6(VIP6),
            53,
            (1..=3u16)
                .map(|n| {
                    EbpfBackendSpec::active(20 + u32::from(n), SocketAddr::from((b6(n), 5353)))
                })
                .collect(),
        ),
        // Nothing listens on 5999: the backend answers port unreachable.
        udp(
            IpAddr::V4(VIP),
            54,
            vec![EbpfBackendSpec::active(
                31,
                SocketAddr::from(([10, 200, 1, 2], 5999)),
            )],
        ),
        udp(
            IpAddr::V6(VIP6),
            54,
            vec![EbpfBackendSpec::active(32, SocketAddr::from((b6(1), 5999)))],
        ),
        // A backend that answers late (after the client has gone).
        udp(
            IpAddr::V4(VIP),
            55,
            vec![EbpfBackendSpec::active(
                33,
                SocketAddr::from(([10, 200, 1, 2], 6000)),
            )],
        ),
        udp(
            IpAddr::V6(VIP6),
            55,
            vec![EbpfBackendSpec::active(34, SocketAddr::from((b6(1), 6001)))],
        ),
    ];
    let mut dp = in_ns(&lb, || EbpfDataplane::load(&["l0", "l1", "l2", "l3"], None))
        .expect("load and attach");
    println!(
        "verifier: {:?} instructions processed",
        dp.verified_instruction_count().unwrap()
    );
    dp.apply(&specs).unwrap();

    // 1. ICMP errors from a backend: ECONNREFUSED on the client's socket.
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let r = in_ns(&client, || {
            udp_exchange(SocketAddr::new(vip, 54), b"closed")
        });
        let err = r.expect_err("no reply from a closed port");
        println!("UDP to {vip}:54 (backend port closed): {err}");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{vip}: {err}");
    }
    let after_real = dp.counters().unwrap().icmp_errors;
    assert!(after_real >= 2, "icmp_errors {after_real}");

    // The same through BPF_PROG_TEST_RUN, checked byte for byte.
    let client4 = Ipv4Addr::new(10, 200, 0, 9);
    let sent = udp4_frame(client4, VIP, 40000, 54, b"quoted datagram");
    let r = dp.test_run(&sent, 1).unwrap();
    assert_eq!(r.return_value, 0);
    assert_eq!(&r.packet[30..34], &[10, 200, 1, 2], "DNAT to the backend");
    let error = icmp4_error(
        (3, 3),
        Ipv4Addr::new(10, 200, 1, 2),
        client4,
        &r.packet[14..],
    );
    let r = dp.test_run(&error, 1).unwrap();
    assert_eq!(r.return_value, 0);
    let out = &r.packet;
    assert_eq!(&out[26..30], &VIP.octets(), "outer source: the VIP");
    assert_eq!(csum(&out[14..34], 0), 0, "outer IP checksum");
    assert_eq!(csum(&out[34..], 0), 0, "ICMP checksum");
    assert_eq!(
        &out[42..],
        &sent[14..],
        "the quote is the client's datagram"
    );
    let client6 = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 9);
    let sent6 = udp6_frame(client6, VIP6, 40000, 54, &[], b"quoted datagram");
    let r = dp.test_run(&sent6, 1).unwrap();
    assert_eq!(&r.packet[38..54], &b6(1).octets(), "DNAT to the backend");
    let error6 = icmp6_error((1, 4), b6(1), client6, &r.packet[14..]);
    let r = dp.test_run(&error6, 1).unwrap();
    let out = &r.packet;
    assert_eq!(&out[22..38], &VIP6.octets(), "outer source: the VIP");
    let len = out.len() - 54;
    assert_eq!(
        csum(&out[54..], pseudo6_for(&out[22..54], 58, len)),
        0,
        "ICMPv6 checksum"
    );
    assert_eq!(
        &out[62..],
        &sent6[14..],
        "the quote is the client's datagram"
    );
    // TCP: fragmentation needed (IPv4) and packet too big (IPv6) about a
    // SYN to web (VIP:80) quote the whole segment, its checksum restored.
    let tfe = dp.compiled(VIP, 80, Protocol::Tcp).unwrap().clone();
    let syn = frame(client4.octets(), VIP.octets(), 40001, 80, 0x02);
    let r = dp.test_run(&syn, 1).unwrap();
    let flow = Flow::tcp(
        SocketAddr::from((client4, 40001)),
        SocketAddr::from((VIP, 80)),
    );
    let backend = tfe.backend(choose(&tfe, &flow).unwrap()).unwrap().addr;
    let IpAddr::V4(b4) = backend.ip() else {
        unreachable!("an IPv4 backend")
    };
    assert_eq!(&r.packet[30..34], &b4.octets(), "SYN DNATed");
    let r = dp
        .test_run(&icmp4_error((3, 4), b4, client4, &r.packet[14..]), 1)
        .unwrap();
    let out = &r.packet;
    assert_eq!(&out[26..30], &VIP.octets(), "outer source: the VIP");
    assert_eq!(csum(&out[14..34], 0), 0, "outer IP checksum");
    assert_eq!(csum(&out[34..], 0), 0, "ICMP checksum");
    assert_eq!(&out[42..], &syn[14..], "the quote is the client's SYN");
    let tfe6 = dp.compiled(VIP6, 80, Protocol::Tcp).unwrap().clone();
    let syn6 = frame6(client6, VIP6, 40001, 80, 0x02);
    let r = dp.test_run(&syn6, 1).unwrap();
    let flow = Flow::tcp(
        SocketAddr::from((client6, 40001)),
        SocketAddr::from((VIP6, 80)),
    );
    let backend = tfe6.backend(choose(&tfe6, &flow).unwrap()).unwrap().addr;
    let IpAddr::V6(bk6) = backend.ip() else {
        unreachable!("an IPv6 backend")
    };
    assert_eq!(&r.packet[38..54], &bk6.octets(), "SYN DNATed");
    let r = dp
        .test_run(&icmp6_error((2, 0), bk6, client6, &r.packet[14..]), 1)
        .unwrap();
    let out = &r.packet;
    assert_eq!(&out[22..38], &VIP6.octets(), "outer source: the VIP");
    let len = out.len() - 54;
    assert_eq!(
        csum(&out[54..], pseudo6_for(&out[22..54], 58, len)),
        0,
        "ICMPv6 checksum"
    );
    assert_eq!(&out[62..], &syn6[14..], "the quote is the client's SYN");
    assert_eq!(dp.counters().unwrap().icmp_errors, after_real + 4);

    // The other direction: the client's port unreachable about a reply
    // from the VIP goes to the backend, the quote's source restored to
    // the backend's, so the backend's connected socket gets ECONNREFUSED.
    let b1 = topo.ns("b1");
    for (vip, bind) in [
        (IpAddr::V4(VIP), "0.0.0.0:6000"),
        (IpAddr::V6(VIP6), "[::]:6001"),
    ] {
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let ns = b1.clone();
        std::thread::spawn(move || {
            enter(&ns);
            let s = UdpSocket::bind(bind).expect("bind the late backend");
            s.set_read_timeout(Some(T)).unwrap();
            ready_tx.send(()).unwrap();
            let r = (|| {
                let mut buf = [0u8; 64];
                let (_, from) = s.recv_from(&mut buf)?;
                s.connect(from)?;
                let _ = go_rx.recv_timeout(T);
                s.send(b"late")?;
                s.recv(&mut buf)
            })();
            let _ = done_tx.send(r);
        });
        ready.recv_timeout(T).expect("late backend bound");
        in_ns(&client, || {
            let any = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let s = UdpSocket::bind(any).unwrap();
            s.send_to(b"and gone", SocketAddr::new(vip, 55)).unwrap();
        });
        // The client's socket is closed: the reply meets a closed port.
        go.send(()).unwrap();
        let r = done.recv_timeout(T * 3).expect("the late backend finished");
        let err = r.expect_err("the client's port unreachable");
        println!("{vip}: the backend's socket got {err}");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{vip}: {err}");
    }
    let to_backends = dp.counters().unwrap().icmp_errors - (after_real + 4);
    assert!(to_backends >= 2, "{to_backends}");
    // And byte for byte through BPF_PROG_TEST_RUN: a UDP reply from backend
    // to client, reverse-NATed, then the client's port unreachable about it.
    let ufe = dp.compiled(VIP, 53, Protocol::Udp).unwrap().clone();
    let sent = udp4_frame(client4, VIP, 40003, 53, b"ask");
    let r = dp.test_run(&sent, 1).unwrap();
    let flow = Flow::udp(
        SocketAddr::from((client4, 40003)),
        SocketAddr::from((VIP, 53)),
    );
    let backend = ufe.backend(choose(&ufe, &flow).unwrap()).unwrap().addr;
    let IpAddr::V4(b4) = backend.ip() else {
        unreachable!("an IPv4 backend")
    };
    assert_eq!(&r.packet[30..34], &b4.octets());
    let reply = udp4_frame(b4, client4, backend.port(), 40003, b"answer");
    let r = dp.test_run(&reply, 1).unwrap();
    assert_eq!(&r.packet[26..30], &VIP.octets(), "reply from the VIP");
    let r = dp
        .test_run(&icmp4_error((3, 3), client4, VIP, &r.packet[14..]), 1)
        .unwrap();
    let out = &r.packet;
    assert_eq!(&out[30..34], &b4.octets(), "outer destination: the backend");
    assert_eq!(csum(&out[14..34], 0), 0, "outer IP checksum");
    assert_eq!(csum(&out[34..], 0), 0, "ICMP checksum");
    assert_eq!(&out[42..], &reply[14..], "the quote is the backend's reply");
    let ufe6 = dp.compiled(VIP6, 53, Protocol::Udp).unwrap().clone();
    let sent6 = udp6_frame(client6, VIP6, 40003, 53, &[], b"ask");
    let r = dp.test_run(&sent6, 1).unwrap();
    let flow = Flow::udp(
        SocketAddr::from((client6, 40003)),
        SocketAddr::from((VIP6, 53)),
    );
    let backend = ufe6.backend(choose(&ufe6, &flow).unwrap()).unwrap().addr;
    let IpAddr::V6(bk6) = backend.ip() else {
        unreachable!("an IPv6 backend")
    };
    assert_eq!(&r.packet[38..54], &bk6.octets());
    let reply6 = udp6_frame(bk6, client6, backend.port(), 40003, &[], b"answer");
    let r = dp.test_run(&reply6, 1).unwrap();
    assert_eq!(&r.packet[22..38], &VIP6.octets(), "reply from the VIP");
    let r = dp
        .test_run(&icmp6_error((1, 4), client6, VIP6, &r.packet[14..]), 1)
        .unwrap();
    let out = &r.packet;
    assert_eq!(
        &out[38..54],
        &bk6.octets(),
        "outer destination: the backend"
    );
    let len = out.len() - 54;
    assert_eq!(
        csum(&out[54..], pseudo6_for(&out[22..54], 58, len)),
        0,
        "ICMPv6 checksum"
    );
    assert_eq!(
        &out[62..],
        &reply6[14..],
        "the quote is the backend's reply"
    );

    // 2. Fragments: 3,000 bytes each way, on the model's backend.
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let fe = dp.compiled(vip, 53, Protocol::Udp).unwrap().clone();
        let (local, reply) = in_ns(&client, || udp_exchange(SocketAddr::new(vip, 53), &payload))
            .unwrap_or_else(|e| panic!("a 3,000-byte exchange with {vip}:53: {e}"));
        let want = number_of(fe.backend(predicted(&fe, local, vip, 53)).unwrap().addr);
        let mut expect = format!("B{want}:").into_bytes();
        expect.extend_from_slice(&payload);
        assert_eq!(reply.len(), expect.len(), "{vip}: the whole echo");
        assert!(reply == expect, "{vip}: the echo differs");
        println!("{vip}: 3,000 bytes fragmented each way, echoed by backend {want}");
    }
    let c = dp.counters().unwrap();
    println!("counters after the fragments: {c:?}");
    // At least 2 later fragments each way per family.
    assert!(c.fragments >= 8, "{c:?}");

    // 3. IPv6 extension headers (BPF_PROG_TEST_RUN): destination options,
    //    then hop-by-hop + destination options, before UDP.
    let ufe6 = dp.compiled(VIP6, 53, Protocol::Udp).unwrap().clone();
    let pad = |len: usize| {
        let mut h = vec![0u8; len];
        h[1] = (len / 8 - 1) as u8;
        h[2] = 1; // PadN
        h[3] = (len - 4) as u8;
        h
    };
    for (i, ext) in [vec![(60u8, pad(8))], vec![(0u8, pad(8)), (60u8, pad(16))]]
        .into_iter()
        .enumerate()
    {
        let src = Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 1, i as u16);
        let f = udp6_frame(src, VIP6, 41000 + i as u16, 53, &ext, b"options");
        let r = dp.test_run(&f, 1).unwrap();
        let out = &r.packet;
        let at = 54 + ext.iter().map(|(_, h)| h.len()).sum::<usize>();
        let dst = SocketAddr::from((
            <[u8; 16]>::try_from(&out[38..54]).unwrap(),
            u16::from_be_bytes([out[at + 2], out[at + 3]]),
        ));
        let flow = Flow::udp(
            SocketAddr::from((src, 41000 + i as u16)),
            SocketAddr::from((VIP6, 53)),
        );
        let want = ufe6.backend(choose(&ufe6, &flow).unwrap()).unwrap().addr;
        assert_eq!(
            dst,
            want,
            "{} extension header(s): the model's backend",
            ext.len()
        );
        let ulen = out.len() - at;
        assert_eq!(
            csum(&out[at..], pseudo6_for(&out[22..54], 17, ulen)),
            0,
            "UDP checksum"
        );
    }
    // A later fragment (offset 8) whose first fragment was not seen passes
    // untouched: it is not sent to some backend without its ports.
    let mut later = udp6_frame(
        client6,
        VIP6,
        42000,
        53,
        &[(44u8, vec![0u8; 8])],
        b"payload!",
    );
    later[56..58].copy_from_slice(&(1u16 << 3).to_be_bytes());
    later[58..62].copy_from_slice(&0x5eed_u32.to_be_bytes());
    let before = dp.counters().unwrap().pass_fragment;
    let r = dp.test_run(&later, 1).unwrap();
    assert_eq!(r.return_value, 0);
    assert_eq!(r.packet, later, "passed untouched");
    assert_eq!(dp.counters().unwrap().pass_fragment, before + 1);

    // 4. A real IPv6 datagram with a destination-options header (python3's
    //    IPV6_DSTOPTS), from the client through lb.
    let py = "import socket\n\
              s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
              s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))\n\
              s.settimeout(3)\n\
              s.connect(('fd00:96::10', 53))\n\
              s.send(b'dstopts')\n\
              r = s.recv(100)\n\
              print(s.getsockname()[1], r.decode())\n";
    if Command::new("python3").arg("-V").output().is_err() {
        println!("SKIPPED (part 4): python3 not installed");
    } else {
        let o = Command::new("ip")
            .args(["netns", "exec", &client, "python3", "-c", py])
            .output()
            .expect("ip netns exec python3");
        assert!(
            o.status.success(),
            "the dstopts exchange failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        let (port, reply) = text.split_once(' ').expect("port and reply");
        let local = SocketAddr::from((
            Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2),
            port.parse().unwrap(),
        ));
        let want = number_of(
            ufe6.backend(predicted(&ufe6, local, VIP6, 53))
                .unwrap()
                .addr,
        );
        println!("IPv6 with a destination-options header: {reply}");
        assert_eq!(reply, format!("B{want}:dstopts"));
    }

    let c = dp.counters().unwrap();
    println!("counters: {c:?}");
    assert_eq!(c.drop_malformed + c.drop_no_backend, 0, "{c:?}");
    for n in ["client", "b1", "b2", "b3"] {
        let ns = topo.ns(n);
        assert_eq!(checksum_errors(&ns), (0, 0), "{n}: TCP/UDP InCsumErrors");
        assert_eq!(udp6_checksum_errors(&ns), 0, "{n}: Udp6InCsumErrors");
    }
    println!(
        "ICMP/fragment/extension-header test took {:?}",
        started.elapsed()
    );
}

/// `examples/ebpf.rs`, built with this test's features (a no-op after
/// `cargo test`, which builds the examples; a rebuild after a filtered run).
#[cfg(feature = "serde")]
fn example_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("examples").join("ebpf");
    let mut features = vec!["ebpf", "serde"];
    for (on, name) in [
        (cfg!(feature = "k8s-openapi"), "k8s-openapi"),
        (cfg!(feature = "packet"), "packet"),
    ] {
        if on {
            features.push(name);
        }
    }
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "--example", "ebpf", "--features"])
        .arg(features.join(","))
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    assert!(cmd.status().expect("cargo build").success());
    bin
}

/// The manifests the example serves: `web` (10.96.0.10:80 -> the backends'
/// 8080) with the endpoints `backends` (1..=3), and `web6` (fd00:96::10:80,
/// IPv6 only) on all three backends' fd00:200:N::2.
#[cfg(feature = "serde")]
fn web_manifest(backends: &[u8]) -> String {
    let mut s = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  \
         - {name: http, port: 80, protocol: TCP, targetPort: 8080}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web-1\n  namespace: default\n  \
         labels: {kubernetes.io/service-name: web}\naddressType: IPv4\n\
         ports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n",
    );
    for b in backends {
        s.push_str(&format!(
            "- addresses: [\"10.200.{b}.2\"]\n  conditions: {{ready: true}}\n"
        ));
    }
    s.push_str(
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web6, namespace: default}\n\
         spec:\n  clusterIP: fd00:96::10\n  ipFamilies: [IPv6]\n  selector: {app: web6}\n  \
         ports:\n  - {name: http, port: 80, protocol: TCP, targetPort: 8080}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web6-1\n  namespace: default\n  \
         labels: {kubernetes.io/service-name: web6}\naddressType: IPv6\n\
         ports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n",
    );
    for b in 1..=3 {
        s.push_str(&format!(
            "- addresses: [\"fd00:200:{b}::2\"]\n  conditions: {{ready: true}}\n"
        ));
    }
    s
}

/// The model's Maglev table for `web` (or, with `vip`, `web6`) as the
/// example compiles it: the same loader and planner over the same
/// manifests, one frontend spec.
#[cfg(feature = "serde")]
fn web_model(dir: &std::path::Path, has_connections: bool, vip: IpAddr) -> CompiledFrontend {
    use svclb::k8s::loader::{LoadOptions, Loader};
    let mut loader = Loader::new(LoadOptions::default());
    let mut table = svclb::ServiceTable::new();
    loader
        .load(&mut table, &[dir.to_owned()], &[])
        .expect("manifests load");
    let mut planner = svclb::Planner::new(svclb::NodeTopology::default());
    planner.update(
        &table,
        &table.full_change_set(),
        svclb::Instant::ZERO,
        |_| has_connections,
    );
    let fe = planner
        .frontend_by_key(&SocketAddr::new(vip, 80), Protocol::Tcp)
        .expect("web's frontend");
    CompiledFrontend::compile(&svclb::ebpf::model::frontend_spec(fe), 1, None).unwrap()
}

/// Kills the example on drop (a failing test leaves no process behind).
#[cfg(feature = "serde")]
struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

#[cfg(feature = "serde")]
impl Running {
    /// Waits (at most 30 s) for a stdout line starting with `prefix`.
    fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    println!("example: {line}");
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no line {prefix:?} from the example; saw {:?}", self.seen);
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("kill");
    }
}

#[cfg(feature = "serde")]
impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Backend number (1..=3) of a backend address 10.200.N.2.
#[cfg(feature = "serde")]
fn backend_number(fe: &CompiledFrontend, id: u32) -> u32 {
    let addr = fe.backend(id).expect("a backend").addr;
    match addr.ip() {
        IpAddr::V4(v4) => u32::from(v4.octets()[2]),
        IpAddr::V6(_) => unreachable!("IPv4 backends"),
    }
}

#[cfg(feature = "serde")]
#[test]
fn ebpf_example_attaches_syncs_reloads_and_exits() {
    use nix::sys::signal::Signal;
    if let Some(reason) = skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    let bin = example_binary();
    let topo = Topology::build_with("x", true).expect("dual-stack topology");
    for n in 1..=3u8 {
        spawn_backend(topo.ns(&format!("b{n}")), n);
    }
    let (lb, client) = (topo.ns("lb"), topo.ns("client"));
    let dir = std::env::temp_dir().join(format!("svbpf-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct RmDir(std::path::PathBuf);
    impl Drop for RmDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = RmDir(dir.clone());
    let manifest = dir.join("web.yaml");
    std::fs::write(&manifest, web_manifest(&[1, 2, 3])).unwrap();

    // The example runs in lb's namespace: a child forked from a thread that
    // entered it inherits it.
    // A watch stream the example follows as it grows (outside the
    // manifest directory).
    let events = dir.with_extension("events.json");
    std::fs::write(&events, "").unwrap();
    struct RmFile(std::path::PathBuf);
    impl Drop for RmFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm_events = RmFile(events.clone());
    let child = in_ns(&lb, || {
        Command::new(&bin)
            .arg("--manifests")
            .arg(&dir)
            .arg("--watch")
            .arg(&events)
            .args(["--iface", "l0,l1,l2,l3"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the example")
    });
    let mut child = child;
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut ex = Running {
        child,
        lines,
        seen: Vec::new(),
    };
    ex.wait_for("ready");

    // 300 connections, every byte echoed, each on the model's backend.
    let fe = web_model(&dir, false, IpAddr::V4(VIP));
    let results: Vec<(SocketAddr, u32)> = in_ns(&client, || {
        (0..300u32)
            .map(|i| {
                let mut c = connect(SocketAddr::from((VIP, 80)), T).expect("connect");
                echo(&mut c, i).expect("echo");
                (c.local, c.backend)
            })
            .collect()
    });
    let agree = results
        .iter()
        .filter(|(local, b)| backend_number(&fe, predicted(&fe, *local, VIP, 80)) == *b)
        .count();
    let mut per = [0usize; 4];
    for (_, b) in &results {
        per[*b as usize] += 1;
    }
    println!(
        "example: model agrees on {agree}/300; per backend {:?}",
        &per[1..]
    );
    assert_eq!(agree, 300);
    assert!(per[1..].iter().all(|&k| k > 50), "{per:?}");

    // IPv6 through the example: `web6` (fd00:96::10), 60 connections, every
    // byte echoed, each on the backend the model predicts.
    let fe6 = web_model(&dir, false, IpAddr::V6(VIP6));
    let results6: Vec<(SocketAddr, u32)> = in_ns(&client, || {
        (0..60u32)
            .map(|i| {
                let mut c = connect(SocketAddr::from((VIP6, 80)), T).expect("connect over IPv6");
                echo(&mut c, 3000 + i).expect("echo over IPv6");
                (c.local, c.backend)
            })
            .collect()
    });
    let agree6 = results6
        .iter()
        .filter(|(local, b)| {
            let id = predicted(&fe6, *local, VIP6, 80);
            local.is_ipv6() && number_of(fe6.backend(id).expect("a backend").addr) == *b
        })
        .count();
    let mut per6 = [0usize; 4];
    for (_, b) in &results6 {
        per6[*b as usize] += 1;
    }
    println!(
        "example: IPv6 model agrees on {agree6}/60; per backend {:?}",
        &per6[1..]
    );
    assert_eq!(agree6, 60);
    assert!(per6[1..].iter().all(|&k| k > 0), "{per6:?}");

    // A reload (the manifest file changes) removes backend 2 while 30
    // connections are open: they keep working, new ones avoid it.
    let mut open: Vec<Conn> = in_ns(&client, || {
        (0..30)
            .map(|_| connect(SocketAddr::from((VIP, 80)), T).expect("connect"))
            .collect()
    });
    let on_b2 = open.iter().filter(|c| c.backend == 2).count();
    assert!(on_b2 > 0, "no open connection on backend 2");
    std::fs::write(&manifest, web_manifest(&[1, 3])).unwrap();
    let synced = ex.wait_for("synced manifests changed");
    assert!(synced.contains("~1 "), "{synced}");
    let echoed = in_ns(&client, || {
        open.iter_mut()
            .enumerate()
            .map(|(i, c)| echo(c, 1000 + i as u32).map(|()| c.backend))
            .collect::<Result<Vec<u32>, _>>()
    })
    .expect("open connections echo after the reload");
    println!(
        "example: {}/30 open connections echoed after the reload ({on_b2} on backend 2)",
        echoed.len()
    );
    let fe = web_model(&dir, true, IpAddr::V4(VIP));
    let after: Vec<(SocketAddr, u32)> = in_ns(&client, || {
        (0..60u32)
            .map(|i| {
                let mut c = connect(SocketAddr::from((VIP, 80)), T).expect("connect");
                echo(&mut c, 5000 + i).expect("echo");
                (c.local, c.backend)
            })
            .collect()
    });
    assert!(after.iter().all(|(_, b)| *b != 2), "{after:?}");
    let agree = after
        .iter()
        .filter(|(local, b)| backend_number(&fe, predicted(&fe, *local, VIP, 80)) == *b)
        .count();
    assert_eq!(agree, 60, "model after the reload");

    // The drain ends once backend 2's connections have closed.
    drop(open);
    ex.wait_for("synced drain");
    // Watch events appended to the stream apply as they arrive: a new
    // service `api` (10.96.0.20) on backend 3 only.
    let api = r#"{"type":"ADDED","object":{"apiVersion":"v1","kind":"Service","metadata":{"name":"api","namespace":"default","resourceVersion":"10"},"spec":{"clusterIP":"10.96.0.20","selector":{"app":"api"},"ports":[{"name":"http","port":80,"protocol":"TCP","targetPort":8080}]}}}
{"type":"ADDED","object":{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"api-1","namespace":"default","resourceVersion":"11","labels":{"kubernetes.io/service-name":"api"}},"addressType":"IPv4","ports":[{"name":"http","port":8080,"protocol":"TCP"}],"endpoints":[{"addresses":["10.200.3.2"],"conditions":{"ready":true}}]}}
"#;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&events)
        .unwrap()
        .write_all(api.as_bytes())
        .unwrap();
    ex.wait_for(&format!("synced {}: +1", events.display()));
    let on = in_ns(&client, || {
        (0..10)
            .map(|_| {
                connect(SocketAddr::from((Ipv4Addr::new(10, 96, 0, 20), 80)), T).map(|c| c.backend)
            })
            .collect::<std::io::Result<Vec<u32>>>()
    })
    .expect("connections to the watched service");
    assert!(on.iter().all(|&b| b == 3), "{on:?}");
    // SIGHUP with nothing changed (manifests and the watched events read
    // again) changes nothing.
    ex.signal(Signal::SIGHUP);
    let hup = ex.wait_for("synced SIGHUP:");
    assert_eq!(hup, "synced SIGHUP: no change");

    // SIGTERM: detached, exit 0, and the VIP no longer answers.
    ex.signal(Signal::SIGTERM);
    ex.wait_for("detached");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = ex.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the example did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    let gone = in_ns(&client, || {
        TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_millis(500))
            .map(|_| ())
    });
    assert!(gone.is_err(), "the VIP still answers after detach");
}

/// Bad input and a missing interface: exit status 1 with a message naming
/// what was wrong, and nothing left attached.
#[cfg(feature = "serde")]
#[test]
fn ebpf_example_refuses_bad_input() {
    if let Some(reason) = skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    let bin = example_binary();
    let missing = std::env::temp_dir().join(format!("svbpf-missing-{}", std::process::id()));
    let out = Command::new(&bin)
        .arg("--manifests")
        .arg(&missing)
        .args(["--iface", "lo"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"));

    let dir = std::env::temp_dir().join(format!("svbpf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web.yaml"), web_manifest(&[1])).unwrap();
    let out = Command::new(&bin)
        .arg("--manifests")
        .arg(&dir)
        .args(["--iface", "svbpfnone0"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("svbpfnone0"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"));
}
