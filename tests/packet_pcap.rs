//! Replays a pcap of mixed traffic through `examples/pcap_replay.rs` and
//! has the real `tshark` check the output: every IP, TCP, UDP and ICMP
//! checksum it can verify is good, and every packet that went to a
//! frontend now goes to a backend of the model (replies come back from
//! the frontend). A deliberately corrupted capture proves tshark's check
//! is on. Without tshark the test prints `SKIPPED: <reason>` and passes.
//!
//! The capture: IPv4 and IPv6; TCP handshakes and data, UDP queries and
//! replies (one IPv4 query with no checksum), a backend's ICMP port
//! unreachable about a client's packet, an echo request (passed), a
//! fragmented IPv4 UDP datagram, a later fragment with no first (dropped),
//! truncated packets (dropped), and traffic to no service (passed).
#![cfg(all(feature = "packet", feature = "serde"))]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use etherparse::PacketBuilder;
use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: ["10.1.0.5"]
- addresses: ["10.1.0.6"]
- addresses: ["10.1.0.7"]
---
apiVersion: v1
kind: Service
metadata: {name: web6, namespace: default}
spec:
  clusterIP: fd00:10:96::10
  ipFamilies: [IPv6]
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web6-1
  namespace: default
  labels: {kubernetes.io/service-name: web6}
addressType: IPv6
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: ["fd00:10:1::5"]
- addresses: ["fd00:10:1::6"]
"#;

const BACKENDS: [&str; 5] = [
    "10.1.0.5",
    "10.1.0.6",
    "10.1.0.7",
    "fd00:10:1::5",
    "fd00:10:1::6",
];
const FRONTENDS: [&str; 2] = ["10.96.0.10", "fd00:10:96::10"];

fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--quiet",
        "--example",
        "pcap_replay",
        "--features",
        "packet,serde",
    ])
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().unwrap().success(),
        "building pcap_replay failed"
    );
    dir.join("examples").join("pcap_replay")
}

fn ip4(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>().unwrap().octets()
}
fn ip6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// Builds the frames of the mixed capture (Ethernet II).
fn frames() -> Vec<Vec<u8>> {
    let mac = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let mut out = Vec::new();
    let mut push = |f: Vec<u8>| out.push(f);
    // IPv4 TCP: three clients, handshake, data, the backend's replies.
    for c in 1..=6u8 {
        let client = format!("10.2.0.{c}");
        let port = 40000 + u16::from(c);
        let mut f = Vec::new();
        PacketBuilder::ethernet2(mac.0, mac.1)
            .ipv4(ip4(&client), ip4("10.96.0.10"), 64)
            .tcp(port, 80, 100, 64000)
            .syn()
            .write(&mut f, &[])
            .unwrap();
        push(f);
        let mut f = Vec::new();
        PacketBuilder::ethernet2(mac.0, mac.1)
            .single_vlan(10.try_into().unwrap())
            .ipv4(ip4(&client), ip4("10.96.0.10"), 64)
            .tcp(port, 80, 101, 64000)
            .ack(1)
            .psh()
            .write(&mut f, b"GET / HTTP/1.1\r\n\r\n")
            .unwrap();
        push(f);
        // IPv4 UDP query; odd clients send no UDP checksum.
        let mut f = Vec::new();
        PacketBuilder::ethernet2(mac.0, mac.1)
            .ipv4(ip4(&client), ip4("10.96.0.10"), 64)
            .udp(port, 53)
            .write(&mut f, b"query")
            .unwrap();
        if c % 2 == 1 {
            let l4 = 14 + 20;
            f[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
        }
        push(f);
        // IPv6 TCP and UDP.
        let client6 = format!("fd00:2::{c}");
        let mut f = Vec::new();
        PacketBuilder::ethernet2(mac.0, mac.1)
            .ipv6(ip6(&client6), ip6("fd00:10:96::10"), 64)
            .tcp(port, 80, 7, 64000)
            .syn()
            .write(&mut f, &[])
            .unwrap();
        push(f);
        let mut f = Vec::new();
        PacketBuilder::ethernet2(mac.0, mac.1)
            .ipv6(ip6(&client6), ip6("fd00:10:96::10"), 64)
            .udp(port, 53)
            .write(&mut f, b"query6")
            .unwrap();
        push(f);
    }
    out
}

/// Replies and errors need to know which backend the replayer chose, so
/// they are built in a second pass over the first output (see the test).
fn replies(chosen: &[(String, u16, String, u16, bool)]) -> Vec<Vec<u8>> {
    let mac = ([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]);
    let mut out = Vec::new();
    for (client, cport, backend, bport, tcp) in chosen {
        let v6 = client.contains(':');
        let b = if v6 {
            PacketBuilder::ethernet2(mac.0, mac.1).ipv6(ip6(backend), ip6(client), 64)
        } else {
            PacketBuilder::ethernet2(mac.0, mac.1).ipv4(ip4(backend), ip4(client), 64)
        };
        let mut f = Vec::new();
        if *tcp {
            b.tcp(*bport, *cport, 1, 64000)
                .syn()
                .ack(101)
                .write(&mut f, &[])
                .unwrap();
        } else {
            b.udp(*bport, *cport).write(&mut f, b"answer").unwrap();
        }
        out.push(f);
    }
    out
}

fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let header = PcapHeader {
        datalink: DataLink::ETHERNET,
        ..Default::default()
    };
    let mut w = PcapWriter::with_header(std::fs::File::create(path).unwrap(), header).unwrap();
    for (i, f) in frames.iter().enumerate() {
        let ts = Duration::from_millis(i as u64);
        w.write_packet(&PcapPacket::new(ts, f.len() as u32, f))
            .unwrap();
    }
}

/// The extra, awkward packets: fragments, ICMP, truncation, no service.
fn extras(backend_of_first_udp: Option<(String, u16)>) -> Vec<Vec<u8>> {
    let mac = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let mut out = Vec::new();
    // A fragmented UDP datagram 10.2.0.50:5000 -> 10.96.0.10:53.
    let mut whole = Vec::new();
    PacketBuilder::ipv4(ip4("10.2.0.50"), ip4("10.96.0.10"), 64)
        .udp(5000, 53)
        .write(&mut whole, &[0x61; 40])
        .unwrap();
    let udp = &whole[20..];
    for (off, more, part) in [(0u16, true, &udp[..24]), (3, false, &udp[24..])] {
        let mut h = whole[..20].to_vec();
        h[2..4].copy_from_slice(&((20 + part.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&4242u16.to_be_bytes());
        h[6..8].copy_from_slice(&(off | if more { 0x2000 } else { 0 }).to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let c = svclb::packet::internet_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0];
        f.extend_from_slice(&h);
        f.extend_from_slice(part);
        out.push(f);
    }
    // A later fragment with no first: dropped.
    let mut stray = out[1].clone();
    stray[14 + 4..14 + 6].copy_from_slice(&999u16.to_be_bytes());
    stray[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = svclb::packet::internet_checksum(&stray[14..34]);
    stray[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    out.push(stray);
    // Truncated: cut inside the TCP header and inside the IP header.
    let mut syn = Vec::new();
    PacketBuilder::ethernet2(mac.0, mac.1)
        .ipv4(ip4("10.2.0.60"), ip4("10.96.0.10"), 64)
        .tcp(1234, 80, 1, 100)
        .syn()
        .write(&mut syn, &[])
        .unwrap();
    out.push(syn[..14 + 20 + 10].to_vec());
    out.push(syn[..14 + 12].to_vec());
    // Echo request to the frontend: passed untouched.
    let mut f = Vec::new();
    PacketBuilder::ethernet2(mac.0, mac.1)
        .ipv4(ip4("10.2.0.1"), ip4("10.96.0.10"), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut f, b"ping")
        .unwrap();
    out.push(f);
    // To no service: passed untouched.
    let mut f = Vec::new();
    PacketBuilder::ethernet2(mac.0, mac.1)
        .ipv4(ip4("10.2.0.1"), ip4("192.0.2.1"), 64)
        .udp(1000, 2000)
        .write(&mut f, b"x")
        .unwrap();
    out.push(f);
    // The backend of client 10.2.0.2's UDP flow says port unreachable
    // about the packet it received (client -> backend).
    if let Some((backend, bport)) = backend_of_first_udp {
        let mut inner = Vec::new();
        PacketBuilder::ipv4(ip4("10.2.0.2"), ip4(&backend), 63)
            .udp(40002, bport)
            .write(&mut inner, b"query")
            .unwrap();
        let mut f = Vec::new();
        PacketBuilder::ethernet2(mac.1, mac.0)
            .ipv4(ip4(&backend), ip4("10.2.0.2"), 64)
            .icmpv4_raw(3, 3, [0; 4])
            .write(&mut f, &inner)
            .unwrap();
        out.push(f);
    }
    out
}

#[derive(Debug)]
struct Row {
    src: String,
    dst: String,
    sport: String,
    dport: String,
    statuses: Vec<String>,
}

fn tshark(path: &Path) -> Vec<Row> {
    let out = Command::new("tshark")
        .args(["-n", "-r"])
        .arg(path)
        .args([
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-T",
            "fields",
            "-E",
            "separator=\t",
            "-E",
            "aggregator=;",
            "-E",
            "occurrence=a",
            "-e",
            "ip.src",
            "-e",
            "ipv6.src",
            "-e",
            "ip.dst",
            "-e",
            "ipv6.dst",
            "-e",
            "tcp.srcport",
            "-e",
            "udp.srcport",
            "-e",
            "tcp.dstport",
            "-e",
            "udp.dstport",
            "-e",
            "ip.checksum.status",
            "-e",
            "tcp.checksum.status",
            "-e",
            "udp.checksum.status",
            "-e",
            "icmp.checksum.status",
        ])
        .output()
        .expect("run tshark");
    assert!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            let first = |a: &str, b: &str| {
                let v = if a.is_empty() { b } else { a };
                v.split(';').next().unwrap_or("").to_owned()
            };
            Row {
                src: first(c[0], c[1]),
                dst: first(c[2], c[3]),
                sport: first(c[4], c[5]),
                dport: first(c[6], c[7]),
                statuses: c[8..]
                    .iter()
                    .flat_map(|s| s.split(';'))
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            }
        })
        .collect()
}

fn replay(bin: &Path, dir: &Path, input: &Path, output: &Path) -> String {
    let out = Command::new(bin)
        .arg("--manifests")
        .arg(dir.join("web.yaml"))
        .arg("--in")
        .arg(input)
        .arg("--out")
        .arg(output)
        .args(["--mode", "ipvs"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn replayed_pcap_passes_tshark() {
    if Command::new("tshark").arg("--version").output().is_err() {
        println!("SKIPPED: tshark is not installed (apt-get install -y tshark)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("svclb-pcap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web.yaml"), MANIFESTS).unwrap();
    let bin = binary();

    // Pass 1: the clients' packets, to learn which backend each flow got.
    let first = frames();
    write_pcap(&dir.join("in1.pcap"), &first);
    replay(&bin, &dir, &dir.join("in1.pcap"), &dir.join("out1.pcap"));
    let rows = tshark(&dir.join("out1.pcap"));
    let mut chosen = Vec::new();
    let mut udp_backend = None;
    for r in &rows {
        let is_tcp = r.dport == "8080";
        if !chosen.iter().any(|c: &(String, u16, String, u16, bool)| {
            c.0 == r.src && c.1.to_string() == r.sport && c.4 == is_tcp
        }) {
            chosen.push((
                r.src.clone(),
                r.sport.parse().unwrap(),
                r.dst.clone(),
                r.dport.parse().unwrap(),
                is_tcp,
            ));
        }
        if r.src == "10.2.0.2" && r.dport == "5353" {
            udp_backend = Some((r.dst.clone(), 5353));
        }
    }

    // Pass 2: the whole mixed capture, replies included.
    let mut all = first.clone();
    all.extend(replies(&chosen));
    all.extend(extras(udp_backend));
    write_pcap(&dir.join("in.pcap"), &all);
    let summary = replay(&bin, &dir, &dir.join("in.pcap"), &dir.join("out.pcap"));
    println!("{summary}");
    let rows = tshark(&dir.join("out.pcap"));
    // Dropped: the stray fragment and the two truncated packets.
    assert_eq!(rows.len(), all.len() - 3, "{summary}");
    assert!(summary.contains("unroutable 1"), "{summary}");
    let backends: Vec<IpAddr> = BACKENDS.iter().map(|b| b.parse().unwrap()).collect();
    let frontends: Vec<IpAddr> = FRONTENDS.iter().map(|b| b.parse().unwrap()).collect();
    let mut good = 0;
    let (mut to_backend, mut from_frontend) = (0, 0);
    for r in &rows {
        assert!(
            !r.statuses.iter().any(|s| s == "0" || s == "Bad"),
            "bad checksum: {} -> {} {:?}",
            r.src,
            r.dst,
            r.statuses
        );
        good += r
            .statuses
            .iter()
            .filter(|s| *s == "1" || *s == "Good")
            .count();
        let (src, dst): (IpAddr, IpAddr) = (r.src.parse().unwrap(), r.dst.parse().unwrap());
        assert!(
            !frontends.contains(&dst) || r.dport.is_empty() && r.sport.is_empty(),
            "still to a frontend: {} -> {}:{}",
            r.src,
            r.dst,
            r.dport
        );
        if backends.contains(&dst) {
            to_backend += 1;
            if !r.dport.is_empty() {
                assert!(
                    r.dport == "8080" || r.dport == "5353",
                    "{}:{}",
                    r.dst,
                    r.dport
                );
            }
        }
        if frontends.contains(&src) {
            from_frontend += 1;
            assert!(!backends.contains(&dst));
        }
        assert!(
            !backends.contains(&src),
            "a reply escaped reverse NAT: {} -> {}",
            r.src,
            r.dst
        );
    }
    // 30 client packets and 2 fragments DNATed; 24 replies and the ICMP
    // error reverse-NATed.
    assert_eq!(to_backend, 32, "{summary}");
    assert_eq!(from_frontend, chosen.len() + 1, "{summary}");
    assert!(
        good >= rows.len(),
        "tshark verified too little: {good} good statuses"
    );

    // Negative control: a corrupted TCP checksum is caught by tshark.
    let mut bad = first[0].clone();
    let n = bad.len();
    bad[n - 4] ^= 0xff; // the urgent pointer: covered by the TCP checksum
    write_pcap(&dir.join("bad.pcap"), &[bad]);
    let rows = tshark(&dir.join("bad.pcap"));
    assert!(
        rows[0].statuses.iter().any(|s| s == "0" || s == "Bad"),
        "{:?}",
        rows[0].statuses
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--watch FILE`: a watch stream applied before the first packet. A
/// MODIFIED event leaves the IPv4 slice one endpoint (10.1.0.6) and a
/// DELETED event removes the IPv6 service: every IPv4 packet is DNATed to
/// 10.1.0.6, and the IPv6 packets pass untouched (no service any more).
/// Needs no tshark: the summary says where every packet went.
#[test]
fn watch_stream_applies_before_the_replay() {
    let dir = std::env::temp_dir().join(format!("svclb-pcap-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web.yaml"), MANIFESTS).unwrap();
    std::fs::write(
        dir.join("watch.yaml"),
        "type: MODIFIED\nobject:\n  apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  \
         metadata:\n    name: web-1\n    namespace: default\n    \
         labels: {kubernetes.io/service-name: web}\n  addressType: IPv4\n  ports:\n  \
         - {name: http, port: 8080, protocol: TCP}\n  - {name: dns, port: 5353, protocol: UDP}\n  \
         endpoints:\n  - addresses: [\"10.1.0.6\"]\n---\n\
         type: DELETED\nobject:\n  apiVersion: v1\n  kind: Service\n  \
         metadata: {name: web6, namespace: default}\n",
    )
    .unwrap();
    let bin = binary();
    let frames = frames();
    write_pcap(&dir.join("in.pcap"), &frames);
    let out = Command::new(&bin)
        .arg("--manifests")
        .arg(dir.join("web.yaml"))
        .arg("--in")
        .arg(dir.join("in.pcap"))
        .arg("--out")
        .arg(dir.join("out.pcap"))
        .arg("--watch")
        .arg(dir.join("watch.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("watch applied 2 change(s)"), "{text}");
    // 6 clients x (SYN, data, UDP) to the IPv4 service, all to 10.1.0.6;
    // 6 x (TCP, UDP) IPv6 packets passed.
    assert!(text.contains("dnat 18 "), "{text}");
    assert!(text.contains("passed 12 "), "{text}");
    // The summary per service, its frontends under it.
    assert!(
        text.contains("service default/web: 18 packets, 1062 bytes\n  frontend 10.96.0.10:53/UDP: 6 packets, 282 bytes"),
        "{text}"
    );
    assert!(!text.contains("default/web6"), "{text}");
    let backends: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("backend "))
        .collect();
    assert_eq!(
        backends,
        [
            "10.1.0.6:5353: 6 packets, 282 bytes",
            "10.1.0.6:8080: 12 packets, 780 bytes"
        ],
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Full NAT where the verdict says to masquerade (`--masquerade-all`):
/// every client packet leaves with the SNAT address of its family and a
/// port of `--snat-ports`, one per flow, distinct per backend; the
/// backends' replies to those addresses, and a backend's ICMP port
/// unreachable about one, come back from the frontend to the client.
/// tshark checks every checksum of both outputs.
#[test]
fn masquerade_rewrites_the_source_and_back() {
    if Command::new("tshark").arg("--version").output().is_err() {
        println!("SKIPPED: tshark is not installed (apt-get install -y tshark)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("svclb-pcap-masq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web.yaml"), MANIFESTS).unwrap();
    let bin = binary();
    let run = |input: &Path, output: &Path| {
        let out = Command::new(&bin)
            .arg("--manifests")
            .arg(dir.join("web.yaml"))
            .arg("--in")
            .arg(input)
            .arg("--out")
            .arg(output)
            .args(["--masquerade-all", "--snat-ip", "10.0.0.1"])
            .args(["--snat-ip6", "fd00::1", "--snat-ports", "50000-50009"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let ok = |rows: &[Row]| {
        for r in rows {
            assert!(
                !r.statuses.iter().any(|s| s == "0" || s == "Bad"),
                "bad checksum: {} -> {} {:?}",
                r.src,
                r.dst,
                r.statuses
            );
            assert!(r.statuses.iter().any(|s| s == "1" || s == "Good"), "{r:?}");
        }
    };
    let first = frames();
    write_pcap(&dir.join("in1.pcap"), &first);
    let summary = run(&dir.join("in1.pcap"), &dir.join("out1.pcap"));
    assert!(
        summary.contains("masqueraded 30 unmasqueraded 0"),
        "{summary}"
    );
    let rows = tshark(&dir.join("out1.pcap"));
    assert_eq!(rows.len(), 30, "{summary}");
    ok(&rows);
    // (SNAT address, port, backend, backend port, TCP) per flow.
    let mut flows: Vec<(String, u16, String, u16, bool)> = Vec::new();
    for r in &rows {
        assert!(BACKENDS.contains(&r.dst.as_str()), "{r:?}");
        let want = if r.dst.contains(':') {
            "fd00::1"
        } else {
            "10.0.0.1"
        };
        assert_eq!(r.src, want, "{r:?}");
        let port: u16 = r.sport.parse().unwrap();
        assert!((50000..=50009).contains(&port), "{r:?}");
        let f = (
            r.src.clone(),
            port,
            r.dst.clone(),
            r.dport.parse().unwrap(),
            r.dport == "8080",
        );
        if !flows.contains(&f) {
            flows.push(f);
        }
    }
    // 6 clients: TCP and UDP, IPv4 and IPv6 (the TCP data packet is the
    // SYN's flow, so the same port).
    assert_eq!(flows.len(), 24, "{flows:?}");
    for (i, a) in flows.iter().enumerate() {
        for b in &flows[i + 1..] {
            assert!(
                (a.0 != b.0 || a.1 != b.1 || a.2 != b.2 || a.4 != b.4),
                "two flows share {a:?}"
            );
        }
    }
    // The backends' replies to the SNAT addresses: back to the clients,
    // from the frontend; and one backend's port unreachable about the
    // first IPv4 UDP flow's translated packet (SNAT address -> backend).
    let mut back = replies(&flows);
    let udp = flows
        .iter()
        .find(|f| !f.4 && !f.0.contains(':'))
        .unwrap()
        .clone();
    let mut inner = Vec::new();
    PacketBuilder::ipv4(ip4(&udp.0), ip4(&udp.2), 63)
        .udp(udp.1, udp.3)
        .write(&mut inner, b"query")
        .unwrap();
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4(ip4(&udp.2), ip4(&udp.0), 64)
        .icmpv4_raw(3, 3, [0; 4])
        .write(&mut f, &inner)
        .unwrap();
    back.push(f);
    write_pcap(&dir.join("in2.pcap"), &[first.clone(), back].concat());
    let summary = run(&dir.join("in2.pcap"), &dir.join("out2.pcap"));
    assert!(summary.contains("reverse-nat 25 "), "{summary}");
    let rows = tshark(&dir.join("out2.pcap"));
    ok(&rows);
    let replies: Vec<&Row> = rows[30..].iter().collect();
    assert_eq!(replies.len(), 25);
    // The ICMP error (last): from the cluster IP to the client, about the
    // client's packet to the cluster IP (tshark's first address is the
    // outer one; its ICMP checksum status was checked above).
    let icmp = replies[24];
    assert_eq!(icmp.src, "10.96.0.10", "{icmp:?}");
    assert!(icmp.dst.starts_with("10.2.0."), "{icmp:?}");
    // The embedded UDP header (tshark's only ports): client -> frontend.
    assert!(icmp.sport.parse::<u16>().unwrap() > 40000, "{icmp:?}");
    assert_eq!(icmp.dport, "53", "{icmp:?}");
    for r in &replies[..24] {
        assert!(FRONTENDS.contains(&r.src.as_str()), "{r:?}");
        assert!(
            r.dst.starts_with("10.2.0.") || r.dst.starts_with("fd00:2::"),
            "{r:?}"
        );
        assert!(r.dport.parse::<u16>().unwrap() > 40000, "{r:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Masquerade ports are released when their connections end: a replay
/// with more flows over time than `--snat-ports` has ports (2, to one
/// backend), in rounds 100 s apart (past netfilter's 30 s UDP timeout),
/// all NATed;
/// within a round, a third flow while two live connections hold both
/// ports is refused, and the two never share one. tshark checks every
/// checksum of the output.
#[test]
fn masquerade_ports_are_released_when_their_connections_end() {
    if Command::new("tshark").arg("--version").output().is_err() {
        println!("SKIPPED: tshark is not installed (apt-get install -y tshark)");
        return;
    }
    const ONE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: one, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: one-1
  namespace: default
  labels: {kubernetes.io/service-name: one}
addressType: IPv4
ports:
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: ["10.1.0.9"]
"#;
    let dir = std::env::temp_dir().join(format!("svclb-pcap-release-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("one.yaml"), ONE).unwrap();
    // Round 0: three clients at once; rounds 1-6: two at a time, 100 s
    // apart.
    let mut frames: Vec<(Duration, Vec<u8>)> = Vec::new();
    let query = |client: u8| {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 2, 1, client], ip4("10.96.0.20"), 64)
            .udp(40000, 53)
            .write(&mut f, b"query")
            .unwrap();
        f
    };
    for c in 1..=3u8 {
        frames.push((Duration::from_millis(u64::from(c)), query(c)));
    }
    for round in 1..=6u8 {
        for c in 0..2u8 {
            let at = Duration::from_secs(100 * u64::from(round)) + Duration::from_millis(c.into());
            frames.push((at, query(10 + 2 * round + c)));
        }
    }
    let header = PcapHeader {
        datalink: DataLink::ETHERNET,
        ..Default::default()
    };
    let input = dir.join("in.pcap");
    let mut w = PcapWriter::with_header(std::fs::File::create(&input).unwrap(), header).unwrap();
    for (ts, f) in &frames {
        w.write_packet(&PcapPacket::new(*ts, f.len() as u32, f))
            .unwrap();
    }
    drop(w);
    let output = dir.join("out.pcap");
    let out = Command::new(binary())
        .arg("--manifests")
        .arg(dir.join("one.yaml"))
        .arg("--in")
        .arg(&input)
        .arg("--out")
        .arg(&output)
        .args(["--masquerade-all", "--snat-ip", "10.0.0.1"])
        .args(["--snat-ports", "50000-50001"])
        // Netfilter's 30 s UDP timeout (IPVS, the default mode, keeps a
        // UDP connection 300 s).
        .args(["--mode", "iptables"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    // 14 flows through 2 ports: round 0's third refused, every later
    // flow NATed with a port an ended connection gave back.
    assert!(text.contains(" dnat 14 "), "{text}");
    assert!(text.contains(" refused 1"), "{text}");
    assert!(
        text.contains("masqueraded 14 unmasqueraded 0 released 12"),
        "{text}"
    );
    let rows = tshark(&output);
    assert_eq!(rows.len(), 14, "{text}");
    for r in &rows {
        assert!(!r.statuses.iter().any(|s| s == "0" || s == "Bad"), "{r:?}");
        assert!(r.statuses.iter().any(|s| s == "1" || s == "Good"), "{r:?}");
        assert_eq!((r.src.as_str(), r.dst.as_str()), ("10.0.0.1", "10.1.0.9"));
        assert!(r.sport == "50000" || r.sport == "50001", "{r:?}");
    }
    // Each round's two live connections hold different ports.
    for pair in rows.chunks(2) {
        assert_ne!(pair[0].sport, pair[1].sport, "{pair:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
