//! `examples/tun.rs` carrying real connections, in a fresh network
//! namespace (`svtun-<pid>`): three echo backends listen on 10.77.0.1-3 (on
//! the namespace's loopback), the service 10.96.77.10 (TCP 80 -> 8080, UDP
//! 53 -> 5353) is routed into the TUN device, and every packet between a
//! client and a backend crosses the device twice, NATed by the example.
//!
//! Checksum offload is turned off on every interface that can turn it off
//! (the TUN device; the loopback's is fixed on, and the test checks that the
//! connections do not cross it), so the kernel verifies every IP, TCP and
//! UDP checksum the example writes: a wrong one drops the packet, and
//! `InCsumErrors` must not move.
//!
//! - 300 TCP connections, every byte echoed, spread by `rr` in exact thirds;
//! - a backend removed (manifest rewritten, `SIGHUP`) while 100 connections
//!   to it are open: they keep working, and 30 new ones avoid it;
//! - a UDP exchange, each answer coming back from the cluster IP;
//! - a watch event (`--watch FILE`, appended to while it runs) that brings
//!   the backend back: 30 new connections, 10 to each;
//! - a service without endpoints is refused as kube-proxy's REJECT does
//!   (ICMP port unreachable from the example): TCP connect and UDP both
//!   see `ECONNREFUSED`;
//! - IPv6: 30 connections to fd00:96::10 (backends fd00:77::1-3 on the
//!   loopback) through the IPv6 SNAT pool, in exact thirds;
//! - the node port 10.77.9.1:30080 (`--node-ip`, a local address steered
//!   into the device by policy rules): 30 connections in exact thirds;
//! - a pretty-printed JSON watch event whose annotation holds braces;
//! - 12 distinct clients through a 6-address SNAT pool, four at a time,
//!   each round waiting for the example to give the addresses back;
//! - a service removed from the manifest file is deleted on `SIGHUP`;
//! - the external IP 10.96.78.1 and the load-balancer IP 10.96.79.1
//!   (routed like the cluster IP): 30 connections each in exact thirds
//!   and a UDP answer from each; the `ipMode: Proxy` IP 10.96.79.2 is not
//!   routed;
//! - `SIGTERM` ends the example with status 0 and a stats line; so does
//!   `SIGINT`, in a short second run that carries one connection.
//!
//! Needs root, `ip`, `ethtool` and `/dev/net/tun`; prints `SKIPPED:
//! <reason>` and passes otherwise. The namespace, the example and the
//! manifests are removed on every path (a guard's `Drop`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

mod common;

use common::netns::{connect, connect_from, echo, enter, in_ns};

const T: Duration = Duration::from_secs(5);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 10);
/// The echo service's external IP and load-balancer IPs (`ipMode` VIP, and
/// Proxy, which is not captured): private addresses on no interface.
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 78, 1);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 79, 1);
const LB_PROXY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 79, 2);
/// A service without endpoints (REJECT).
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 11);
const DEV: &str = "svtun0";
/// The node IP (`--node-ip`, on the namespace's loopback) and the echo
/// service's TCP node port.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 1);
const NODE_PORT: u16 = 30080;
/// The IPv4 SNAT pool: six usable addresses.
const POOL: &str = "169.254.0.0/29";
/// Distinct IPv4 client addresses (10.77.1.1-12), in rounds of four.
const CLIENTS: u8 = 12;
/// The IPv6 service (TCP 80 -> 8080), backends fd00:77::1-3.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

fn backend6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, u16::from(n))
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root (network namespaces and TUN devices need it)".into());
    }
    for tool in ["ip", "ethtool"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    None
}

fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--quiet",
        "--example",
        "tun",
        "--features",
        "packet,serde",
    ])
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    assert!(cmd.status().unwrap().success(), "building tun failed");
    dir.join("examples").join("tun")
}

fn slice(backends: &[u8]) -> String {
    let mut s = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: echo-1\n  namespace: svtun\n  \
         labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports:\n\
         - {name: tcp, port: 8080, protocol: TCP}\n- {name: udp, port: 5353, protocol: UDP}\n\
         endpoints:\n",
    );
    for b in backends {
        s.push_str(&format!("- addresses: [\"10.77.0.{b}\"]\n"));
    }
    s
}

fn manifest(backends: &[u8]) -> String {
    manifest_with(backends, true)
}

/// The manifests, with or without the service without endpoints.
fn manifest_with(backends: &[u8], empty: bool) -> String {
    let empty = if empty { EMPTY_SERVICE } else { "" };
    "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: svtun}\n\
     spec:\n  type: LoadBalancer\n  clusterIP: 10.96.77.10\n  externalIPs: [10.96.78.1]\n  \
     ports:\n  \
     - {name: tcp, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}\n  \
     - {name: udp, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}\n\
     status:\n  loadBalancer:\n    ingress:\n    - {ip: 10.96.79.1}\n    \
     - {ip: 10.96.79.2, ipMode: Proxy}\n---\n"
        .to_owned()
        + empty
        + &slice(backends)
        + "---\n"
        + SERVICE6
}

/// A service without endpoints.
const EMPTY_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: svtun}\n\
     spec:\n  clusterIP: 10.96.77.11\n  ports:\n  \
     - {name: tcp, port: 80, protocol: TCP}\n  - {name: udp, port: 53, protocol: UDP}\n---\n";

/// An IPv6 service with its three backends, fd00:77::1-3.
const SERVICE6: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo6, namespace: svtun}\n\
     spec:\n  clusterIP: fd00:96::10\n  ipFamilies: [IPv6]\n  ports:\n  \
     - {name: tcp, port: 80, protocol: TCP, targetPort: 8080}\n---\n\
     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
     metadata:\n  name: echo6-1\n  namespace: svtun\n  \
     labels: {kubernetes.io/service-name: echo6}\naddressType: IPv6\nports:\n\
     - {name: tcp, port: 8080, protocol: TCP}\nendpoints:\n\
     - addresses: [\"fd00:77::1\"]\n- addresses: [\"fd00:77::2\"]\n\
     - addresses: [\"fd00:77::3\"]\n";

/// A watch event (as `kubectl get -w -o yaml` writes one) that sets the
/// slice's endpoints, ended by `---`.
fn watch_event(backends: &[u8]) -> String {
    let mut s = String::from("type: MODIFIED\nobject:\n");
    for line in slice(backends).lines() {
        s.push_str("  ");
        s.push_str(line);
        s.push('\n');
    }
    s + "---\n"
}

/// A watch event as `kubectl get -w -o json` writes one (pretty-printed,
/// over many lines) that sets the slice's endpoints, with an annotation
/// whose value holds unbalanced braces: a reader that counts braces never
/// finds its end.
fn json_watch_event(backends: &[u8]) -> String {
    let endpoints: Vec<String> = backends
        .iter()
        .map(|b| format!("        {{\n          \"addresses\": [\"10.77.0.{b}\"]\n        }}"))
        .collect();
    format!(
        r#"{{
  "type": "MODIFIED",
  "object": {{
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {{
      "name": "echo-1",
      "namespace": "svtun",
      "labels": {{
        "kubernetes.io/service-name": "echo"
      }},
      "annotations": {{
        "svclb.test/note": "}} and {{{{ in a string"
      }}
    }},
    "addressType": "IPv4",
    "ports": [
      {{"name": "tcp", "port": 8080, "protocol": "TCP"}},
      {{"name": "udp", "port": 5353, "protocol": "UDP"}}
    ],
    "endpoints": [
{}
    ]
  }}
}}
"#,
        endpoints.join(",\n")
    )
}

/// The namespace, the example and the manifests, removed on drop.
struct Guard {
    ns: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = run(&["ip", "netns", "del", &self.ns]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Echo servers on 10.77.0.`n` and fd00:77::`n`: TCP 8080 sends
/// "B<n>\n", then echoes; UDP 5353 (IPv4) answers "B<n>:" + the datagram. The threads end with the process
/// (their sockets go with the namespace).
fn spawn_backend(ns: &str, n: u8) {
    let ns = ns.to_owned();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        enter(&ns);
        let addr = Ipv4Addr::new(10, 77, 0, n);
        let l = TcpListener::bind((addr, 8080)).unwrap();
        let l6 = TcpListener::bind((backend6(n), 8080)).unwrap();
        let u = UdpSocket::bind((addr, 5353)).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((len, from)) = u.recv_from(&mut buf) {
                let mut reply = format!("B{n}:").into_bytes();
                reply.extend_from_slice(&buf[..len]);
                let _ = u.send_to(&reply, from);
            }
        });
        tx.send(()).unwrap();
        std::thread::spawn(move || serve(l6, n));
        serve(l, n);
    });
    rx.recv_timeout(T).expect("backend listening");
}

/// Greets and echoes on every connection `l` accepts.
fn serve(l: TcpListener, n: u8) {
    {
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
    }
}

/// Lines of the example's standard output, as they come.
fn lines(child: &mut Child) -> Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (bounded) for a line starting with `prefix`; returns the lines
/// seen up to it.
fn wait_for(rx: &Receiver<String>, prefix: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..100 {
        match rx.recv_timeout(T) {
            Ok(l) => {
                let done = l.starts_with(prefix);
                seen.push(l);
                if done {
                    return seen;
                }
            }
            Err(e) => panic!("no {prefix:?} line from the example ({e}); saw {seen:?}"),
        }
    }
    panic!("no {prefix:?} line in 100 lines: {seen:?}");
}

/// The namespace's `InCsumErrors` for TCP and UDP (/proc/net/snmp).
fn csum_errors(ns: &str) -> (u64, u64) {
    let snmp = run(&["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"]).unwrap();
    let field = |proto: &str| -> u64 {
        let rows: Vec<&str> = snmp
            .lines()
            .filter(|l| l.starts_with(&format!("{proto}:")))
            .collect();
        let names: Vec<&str> = rows[0].split_whitespace().collect();
        let values: Vec<&str> = rows[1].split_whitespace().collect();
        let i = names.iter().position(|n| *n == "InCsumErrors").unwrap();
        values[i].parse().unwrap()
    };
    (field("Tcp"), field("Udp"))
}

/// Packets the namespace's loopback has received.
fn lo_rx_packets(ns: &str) -> u64 {
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "cat",
        "/sys/class/net/lo/statistics/rx_packets",
    ])
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}

/// Turns checksum offload off on every interface of `ns` and returns, per
/// interface, whether TX checksumming is now off (`ethtool -k`).
fn offload_off(ns: &str) -> Vec<(String, bool)> {
    let links = run(&["ip", "-n", ns, "-o", "link", "show"]).unwrap();
    let mut out = Vec::new();
    for l in links.lines() {
        let Some(name) = l.split(':').nth(1).map(|n| n.trim().to_owned()) else {
            continue;
        };
        // A fixed feature makes ethtool report, not fail.
        let _ = run(&[
            "ip", "netns", "exec", ns, "ethtool", "-K", &name, "tx", "off", "rx", "off",
        ]);
        let k = run(&["ip", "netns", "exec", ns, "ethtool", "-k", &name]).unwrap();
        out.push((name, k.contains("tx-checksumming: off")));
    }
    out
}

#[test]
fn tun_dataplane_carries_real_connections() {
    if let Some(reason) = skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    let bin = binary();
    let ns = format!("svtun-{}", std::process::id());
    let dir = std::env::temp_dir().join(&ns);
    let mut guard = Guard {
        ns: ns.clone(),
        dir: dir.clone(),
        child: None,
    };
    let _ = run(&["ip", "netns", "del", &ns]);
    run(&["ip", "netns", "add", &ns]).unwrap();
    run(&["ip", "-n", &ns, "link", "set", "lo", "up"]).unwrap();
    for a in ["10.77.0.1/32", "10.77.0.2/32", "10.77.0.3/32"] {
        run(&["ip", "-n", &ns, "addr", "add", a, "dev", "lo"]).unwrap();
    }
    run(&["ip", "-n", &ns, "addr", "add", "10.77.9.1/32", "dev", "lo"]).unwrap();
    for c in 1..=CLIENTS {
        let a = format!("10.77.1.{c}/32");
        run(&["ip", "-n", &ns, "addr", "add", &a, "dev", "lo"]).unwrap();
    }
    for n in 1..=3 {
        let a = format!("{}/128", backend6(n));
        run(&["ip", "-n", &ns, "addr", "add", &a, "dev", "lo", "nodad"]).unwrap();
    }
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let file = manifests.join("echo.yaml");
    std::fs::write(&file, manifest(&[1, 2, 3])).unwrap();
    let watch = dir.join("watch.yaml");
    std::fs::write(&watch, "").unwrap();

    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(&bin)
        .args(["--manifests"])
        .arg(&manifests)
        .arg("--watch")
        .arg(&watch)
        .args(["--mode", "ipvs", "--scheduler", "rr", "--dev", DEV])
        // Six pool addresses, given back one second after a connection
        // closes: the clients below outnumber them.
        .args(["--snat-pool", POOL, "--tcp-closing-timeout", "1"])
        .args(["--node-ip", "10.77.9.1"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // `ip netns exec` execs the example: this pid is the example's.
    let pid = child.id().to_string();
    let out = lines(&mut child);
    guard.child = Some(child);
    let setup = wait_for(&out, "ready");
    assert!(setup.contains(&format!("device {DEV}")), "{setup:?}");
    assert!(setup.contains(&format!("snat {POOL}")), "{setup:?}");
    assert!(
        setup.contains(&format!("route {VIP}/32 dev {DEV}")),
        "{setup:?}"
    );
    assert!(
        setup.contains(&"snat fd00:5c1b::/112".to_owned()),
        "{setup:?}"
    );
    assert!(
        setup.contains(&format!("route {VIP6}/128 dev {DEV}")),
        "{setup:?}"
    );
    assert!(
        setup.contains(&format!("nodeport {NODE_IP}:{NODE_PORT} tcp dev {DEV}")),
        "{setup:?}"
    );
    for ip in [EXTERNAL_IP, LB_IP] {
        assert!(
            setup.contains(&format!("route {ip}/32 dev {DEV}")),
            "{setup:?}"
        );
    }
    assert!(
        !setup.iter().any(|l| l.contains(&LB_PROXY_IP.to_string())),
        "an ipMode Proxy load-balancer IP was routed: {setup:?}"
    );

    let offload = offload_off(&ns);
    assert!(
        offload.iter().any(|(n, off)| n == DEV && *off),
        "TX checksum offload still on for {DEV}: {offload:?}"
    );
    for b in 1..=3 {
        spawn_backend(&ns, b);
    }
    let csum_before = csum_errors(&ns);
    let lo_before = lo_rx_packets(&ns);

    // 300 connections, kept open: rr in exact thirds, every byte echoed.
    let mut conns = in_ns(&ns, || {
        (0..300u32)
            .map(|i| {
                let mut c = connect(SocketAddr::from((VIP, 80)), T)
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                echo(&mut c, i).unwrap_or_else(|e| panic!("echo on connection {i}: {e}"));
                c
            })
            .collect::<Vec<_>>()
    });
    let mut per = [0u32; 4];
    for c in &conns {
        per[c.backend as usize] += 1;
    }
    assert_eq!(&per[1..], &[100, 100, 100], "rr spread");

    // IPv6: 30 connections to the IPv6 service, rr in exact thirds, every
    // byte echoed, each from an IPv6 client address.
    let mut conns6 = in_ns(&ns, || {
        (0..30u32)
            .map(|i| {
                let mut c = connect(SocketAddr::from((VIP6, 80)), T)
                    .unwrap_or_else(|e| panic!("IPv6 connection {i}: {e}"));
                echo(&mut c, 20_000 + i)
                    .unwrap_or_else(|e| panic!("echo on IPv6 connection {i}: {e}"));
                c
            })
            .collect::<Vec<_>>()
    });
    let mut per6 = [0u32; 4];
    for c in &conns6 {
        assert!(c.local.is_ipv6(), "{}", c.local);
        per6[c.backend as usize] += 1;
    }
    assert_eq!(&per6[1..], &[10, 10, 10], "IPv6 rr spread");
    for (i, c) in conns6.iter_mut().enumerate() {
        echo(c, 30_000 + i as u32).unwrap_or_else(|e| panic!("IPv6 connection {i} again: {e}"));
    }
    drop(conns6);

    // The node port on the node IP, a local address, steered into the
    // device by the example's rules: its own rr, in exact thirds.
    let nodeport = in_ns(&ns, || {
        (0..30u32)
            .map(|i| {
                let mut c = connect(SocketAddr::from((NODE_IP, NODE_PORT)), T)
                    .unwrap_or_else(|e| panic!("node-port connection {i}: {e}"));
                echo(&mut c, 50_000 + i)
                    .unwrap_or_else(|e| panic!("echo on node-port connection {i}: {e}"));
                c.backend
            })
            .collect::<Vec<_>>()
    });
    for b in 1..=3 {
        assert_eq!(
            nodeport.iter().filter(|x| **x == b).count(),
            10,
            "node port, B{b}: {nodeport:?}"
        );
    }

    // Backend 3 goes while 100 connections to it are open.
    std::fs::write(&file, manifest(&[1, 2])).unwrap();
    run(&["kill", "-HUP", &pid]).unwrap();
    wait_for(&out, "reloaded");
    for (i, c) in conns.iter_mut().enumerate() {
        echo(c, 1000 + i as u32)
            .unwrap_or_else(|e| panic!("open connection {i} to B{}: {e}", c.backend));
    }
    let fresh = in_ns(&ns, || {
        (0..30u32)
            .map(|i| {
                let mut c = connect(SocketAddr::from((VIP, 80)), T)
                    .unwrap_or_else(|e| panic!("new connection {i}: {e}"));
                echo(&mut c, 5000 + i).unwrap();
                c.backend
            })
            .collect::<Vec<_>>()
    });
    assert!(
        !fresh.contains(&3),
        "a new connection reached B3: {fresh:?}"
    );
    assert_eq!(fresh.iter().filter(|b| **b == 1).count(), 15, "{fresh:?}");
    drop(conns);

    // No endpoints: REJECT, answered with ICMP port unreachable. A dropped
    // SYN would time out instead.
    let (tcp, udp) = in_ns(&ns, || {
        let empty = SocketAddr::from((EMPTY_VIP, 80));
        let tcp = TcpStream::connect_timeout(&empty, T).map(|_| ());
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(T)).unwrap();
        u.connect((EMPTY_VIP, 53)).unwrap();
        u.send(b"anyone?").unwrap();
        let mut buf = [0u8; 64];
        let udp = u.recv(&mut buf).map(|_| ());
        (tcp.map_err(|e| e.kind()), udp.map_err(|e| e.kind()))
    });
    assert_eq!(
        tcp,
        Err(std::io::ErrorKind::ConnectionRefused),
        "TCP to a service without endpoints"
    );
    assert_eq!(
        udp,
        Err(std::io::ErrorKind::ConnectionRefused),
        "UDP to a service without endpoints"
    );

    // UDP: each answer comes from a remaining backend and, reverse-NATed,
    // from the cluster IP.
    let answers = in_ns(&ns, || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(T)).unwrap();
        (0..6)
            .map(|i| {
                let msg = format!("ping {i}");
                u.send_to(msg.as_bytes(), (VIP, 53)).unwrap();
                let mut buf = [0u8; 512];
                let (n, from) = u.recv_from(&mut buf).expect("UDP answer");
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                (from, text, msg)
            })
            .collect::<Vec<_>>()
    });
    for (from, text, msg) in &answers {
        assert_eq!(*from, SocketAddr::from((VIP, 53)), "{text}");
        let (b, body) = text.split_once(':').unwrap();
        assert!(b == "B1" || b == "B2", "{text}");
        assert_eq!(body, msg);
    }

    // A watch event brings backend 3 back: new connections reach it again.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&watch)
        .unwrap()
        .write_all(watch_event(&[1, 2, 3]).as_bytes())
        .unwrap();
    wait_for(&out, "watch applied");
    let back = in_ns(&ns, || {
        (0..30u32)
            .map(|i| {
                let mut c = connect(SocketAddr::from((VIP, 80)), T)
                    .unwrap_or_else(|e| panic!("connection {i} after the watch: {e}"));
                echo(&mut c, 9000 + i).unwrap();
                c.backend
            })
            .collect::<Vec<_>>()
    });
    for b in 1..=3 {
        assert_eq!(
            back.iter().filter(|x| **x == b).count(),
            10,
            "B{b}: {back:?}"
        );
    }

    // A JSON watch event whose annotation holds braces removes backend 2:
    // new connections alternate between 1 and 3.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&watch)
        .unwrap()
        .write_all(json_watch_event(&[1, 3]).as_bytes())
        .unwrap();
    wait_for(&out, "watch applied");
    let json = in_ns(&ns, || {
        (0..20u32)
            .map(|i| {
                let mut c = connect(SocketAddr::from((VIP, 80)), T)
                    .unwrap_or_else(|e| panic!("connection {i} after the JSON event: {e}"));
                echo(&mut c, 60_000 + i).unwrap();
                c.backend
            })
            .collect::<Vec<_>>()
    });
    for b in [1, 3] {
        assert_eq!(
            json.iter().filter(|x| **x == b).count(),
            10,
            "B{b} after the JSON event: {json:?}"
        );
    }

    // Pool addresses are given back: 12 distinct clients, four at a time,
    // through a pool of six (one of which a UDP flow above still holds);
    // each round waits until the example has released the round's
    // addresses, which it does once their connections have closed and
    // expired.
    for round in 0..CLIENTS / 4 {
        let clients: Vec<IpAddr> = (1..=4)
            .map(|k| IpAddr::from(Ipv4Addr::new(10, 77, 1, round * 4 + k)))
            .collect();
        let backends = in_ns(&ns, || {
            clients
                .iter()
                .map(|src| {
                    let mut c = connect_from(*src, SocketAddr::from((VIP, 80)), T)
                        .unwrap_or_else(|e| panic!("client {src}, round {round}: {e}"));
                    assert_eq!(c.local.ip(), *src);
                    echo(&mut c, 40_000 + u32::from(round)).unwrap();
                    c.backend
                })
                .collect::<Vec<_>>()
        });
        assert!(backends.iter().all(|b| (1..=3).contains(b)), "{backends:?}");
        let mut waiting: Vec<String> = clients
            .iter()
            .map(|c| format!("client {c} frontend {VIP}:80"))
            .collect();
        for _ in 0..100 {
            if waiting.is_empty() {
                break;
            }
            let line = out
                .recv_timeout(T)
                .unwrap_or_else(|e| panic!("no release of {waiting:?} ({e})"));
            if line.starts_with("snat release 169.254.0.") {
                waiting.retain(|w| !line.ends_with(w.as_str()));
            }
        }
        assert!(waiting.is_empty(), "never released: {waiting:?}");
    }

    // The service without endpoints leaves the manifest file: the reload
    // deletes it (no watch event does), so its cluster IP is no longer
    // routed into the device and a connect finds no route at all.
    std::fs::write(&file, manifest_with(&[1, 2, 3], false)).unwrap();
    run(&["kill", "-HUP", &pid]).unwrap();
    let reload = wait_for(&out, "reloaded");
    assert!(
        reload.contains(&format!("unroute {EMPTY_VIP}/32 dev {DEV}")),
        "{reload:?}"
    );
    let gone = in_ns(&ns, || {
        TcpStream::connect_timeout(&SocketAddr::from((EMPTY_VIP, 80)), T).map_err(|e| e.kind())
    });
    assert_eq!(
        gone.map(|_| ()),
        Err(std::io::ErrorKind::NetworkUnreachable),
        "a connect to the deleted service's cluster IP"
    );

    // The external IP and the load-balancer IP, routed into the device
    // like the cluster IP: each frontend its own rr, in exact thirds, every
    // byte echoed; a UDP answer comes back from each. The ipMode Proxy IP
    // is not routed: the namespace has no route to it. (Last, after the
    // pool rounds: their four pairs and the UDP flows' 300 s hold need
    // pool addresses the six-address pool has free only now.)
    for (what, ip, seq) in [
        ("external IP", EXTERNAL_IP, 70_000),
        ("LB IP", LB_IP, 80_000),
    ] {
        let got = in_ns(&ns, || {
            (0..30u32)
                .map(|i| {
                    let mut c = connect(SocketAddr::from((ip, 80)), T)
                        .unwrap_or_else(|e| panic!("{what} connection {i}: {e}"));
                    echo(&mut c, seq + i)
                        .unwrap_or_else(|e| panic!("echo on {what} connection {i}: {e}"));
                    c.backend
                })
                .collect::<Vec<_>>()
        });
        for b in 1..=3 {
            assert_eq!(
                got.iter().filter(|x| **x == b).count(),
                10,
                "{what}, B{b}: {got:?}"
            );
        }
        let (from, text) = in_ns(&ns, || {
            let u = UdpSocket::bind("0.0.0.0:0").unwrap();
            u.set_read_timeout(Some(T)).unwrap();
            u.send_to(b"ping", (ip, 53)).unwrap();
            let mut buf = [0u8; 512];
            let (n, from) = u
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("UDP answer via the {what}: {e}"));
            (from, String::from_utf8_lossy(&buf[..n]).into_owned())
        });
        assert_eq!(from, SocketAddr::from((ip, 53)), "{what}: {text}");
        assert!(text.ends_with(":ping"), "{what}: {text}");
    }
    let proxy_mode = in_ns(&ns, || {
        TcpStream::connect_timeout(&SocketAddr::from((LB_PROXY_IP, 80)), T).map_err(|e| e.kind())
    });
    assert_eq!(
        proxy_mode.map(|_| ()),
        Err(std::io::ErrorKind::NetworkUnreachable),
        "a connect to the ipMode Proxy load-balancer IP"
    );

    assert_eq!(
        csum_errors(&ns),
        csum_before,
        "InCsumErrors (TCP, UDP) moved"
    );
    let lo_after = lo_rx_packets(&ns);
    assert!(
        lo_after - lo_before < 300,
        "the connections crossed lo ({} packets), not the TUN device",
        lo_after - lo_before
    );

    run(&["kill", "-TERM", &pid]).unwrap();
    let stats = wait_for(&out, "stats");
    let mut child = guard.child.take().unwrap();
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(status) = status else {
        guard.child = Some(child);
        panic!("the example did not exit on SIGTERM");
    };
    assert!(status.success(), "exit status {status}: {stats:?}");
    println!("{}", stats.last().unwrap());

    // A short second run ends on SIGINT (Ctrl-C) just as cleanly: status
    // 0 and one stats line, after carrying a connection.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(&bin)
        .args(["--manifests"])
        .arg(&manifests)
        .args(["--mode", "ipvs", "--scheduler", "rr", "--dev", DEV])
        .args(["--snat-pool", POOL, "--node-ip", "10.77.9.1"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let out = lines(&mut child);
    guard.child = Some(child);
    wait_for(&out, "ready");
    in_ns(&ns, || {
        let mut c = connect(SocketAddr::from((VIP, 80)), T)
            .unwrap_or_else(|e| panic!("connection after the restart: {e}"));
        echo(&mut c, 60_000).unwrap_or_else(|e| panic!("echo after the restart: {e}"));
    });
    run(&["kill", "-INT", &pid]).unwrap();
    let stats = wait_for(&out, "stats");
    let mut child = guard.child.take().unwrap();
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(status) = status else {
        guard.child = Some(child);
        panic!("the example did not exit on SIGINT");
    };
    assert!(
        status.success(),
        "exit status {status} on SIGINT: {stats:?}"
    );
    let line = stats.last().unwrap();
    assert!(line.starts_with("stats packets "), "{line}");
    assert!(
        !line.contains(" dnat 0 "),
        "the restart carried nothing: {line}"
    );
    println!("after SIGINT: {line}");
}
