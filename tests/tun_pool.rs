//! SCTP through the SNAT pool of `examples/tun.rs`, at packet level: the
//! example's own packet path (`examples/shared/tun_nat.rs`) driven with
//! SCTP packets built here, in every mode, IPv4 and IPv6.
//!
//! Not through a device: this machine's kernel has no SCTP sockets
//! (`CONFIG_IP_SCTP` unset; `socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)`
//! fails with `EPROTONOSUPPORT`), so `tests/tun_netns.rs` cannot carry an
//! SCTP association. Instead every packet the path writes is checked here
//! from scratch: the IPv4 header checksum, the ICMP checksum and SCTP's
//! CRC32c, each recomputed by a bit-at-a-time reference written in this
//! file (not the library's table), and every address and port.
//!
//! - an INIT from a client to the cluster IP goes out DNATed to a backend
//!   and SNATed to the pool's first address with the client's port; the
//!   backend's INIT ACK comes back from the cluster IP to the client; a
//!   DATA chunk of the same association reaches the same backend;
//! - a reply from another backend to the same pool address is dropped;
//! - an ICMP port unreachable from the backend about the translated INIT
//!   has its outer destination and its embedded SCTP header translated
//!   back, with the embedded CRC32c and the ICMP checksum correct;
//! - three associations from three client ports reach backends, in IPVS
//!   mode one each (`rr`).

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use svclb::conntrack::Conntrack;
use svclb::packet::ICMP_ERROR_MAX_V6;
use svclb::*;

// The example's packet path; `prefix`, used only to print the routes, is
// not called here.
#[allow(dead_code)]
#[path = "../examples/shared/tun_nat.rs"]
mod tun_nat;

use tun_nat::{NatPath, Out, PoolRange, SnatPool};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 12);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x12);
const PORT: u16 = 9999;
const TARGET: u16 = 9000;
const POOL4: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);
const POOL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5c1b, 0, 0, 0, 0, 0, 1);
const SCTP: u8 = 132;

fn backend(n: u8, v6: bool) -> IpAddr {
    if v6 {
        Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, u16::from(n)).into()
    } else {
        Ipv4Addr::new(10, 77, 0, n).into()
    }
}

fn table() -> ServiceTable {
    let mut t = ServiceTable::new();
    let mut changes = Vec::new();
    for (name, vip, v6) in [("s4", IpAddr::from(VIP), false), ("s6", VIP6.into(), true)] {
        let svc = Service::builder("svtun", name)
            .cluster_ip(vip)
            .port(ServicePortSpec::sctp(i64::from(PORT)).target_port(i64::from(TARGET)))
            .build()
            .unwrap();
        changes.push(Change::UpsertService(svc));
        let ty = if v6 {
            AddressType::IPv6
        } else {
            AddressType::IPv4
        };
        changes.push(Change::UpsertSlice(
            EndpointSlice::builder("svtun", format!("{name}-1"), name, ty)
                .port(SlicePortSpec::new(Protocol::Sctp, i64::from(TARGET)))
                .endpoints((1..=3).map(|n| EndpointSpec::new(backend(n, v6).to_string())))
                .build()
                .unwrap(),
        ));
    }
    t.apply_batch(changes).unwrap();
    t
}

/// CRC32c, one bit at a time (RFC 9260 appendix A's polynomial,
/// reflected), with no table: the reference the path's CRCs are checked
/// against.
fn crc32c_ref(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The Internet checksum (RFC 1071) of `data`, zero-padded.
fn inet_sum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// An SCTP packet with one chunk, its CRC32c (little-endian, as Linux
/// writes it) from the reference.
fn sctp(sport: u16, dport: u16, vtag: u32, chunk_type: u8, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    let len = 4 + body.len();
    p.extend_from_slice(&[chunk_type, 0]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(body);
    while p.len() % 4 != 0 {
        p.push(0);
    }
    let crc = crc32c_ref(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// An IP packet from `src` to `dst` carrying `payload` of protocol
/// `proto`, its IPv4 header checksum from the reference.
fn ip(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&(20 + payload.len() as u16).to_be_bytes());
            p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            let sum = inet_sum(&p);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            p.extend_from_slice(&[proto, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    p.extend_from_slice(payload);
    p
}

/// An ICMP (or ICMPv6) destination unreachable, port unreachable, from
/// `src` to `dst`, quoting `about`; its checksum from the reference.
fn icmp_port_unreachable(src: IpAddr, dst: IpAddr, about: &[u8]) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let (ty, code) = if v6 { (1, 4) } else { (3, 3) };
    let mut m = vec![ty, code, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(about);
    let proto = if v6 { 58 } else { 1 };
    let sum = icmp_sum(src, dst, &m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    ip(src, dst, proto, &m)
}

/// The ICMP checksum of message `m` (with its checksum field as it is):
/// over the message alone for ICMPv4, with the pseudo-header for ICMPv6.
fn icmp_sum(src: IpAddr, dst: IpAddr, m: &[u8]) -> u16 {
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut all = Vec::new();
            all.extend_from_slice(&s.octets());
            all.extend_from_slice(&d.octets());
            all.extend_from_slice(&(m.len() as u32).to_be_bytes());
            all.extend_from_slice(&[0, 0, 0, 58]);
            all.extend_from_slice(m);
            inet_sum(&all)
        }
        _ => inet_sum(m),
    }
}

/// What a packet the path wrote says, every checksum checked from
/// scratch: (source, destination, SCTP payload from the verification tag
/// on).
fn read_sctp(p: &[u8]) -> (SocketAddr, SocketAddr, Vec<u8>) {
    let (src, dst, l4) = read_ip(p, SCTP);
    let seg = &p[l4..];
    let mut zeroed = seg.to_vec();
    zeroed[8..12].fill(0);
    assert_eq!(
        u32::from_le_bytes(seg[8..12].try_into().unwrap()),
        crc32c_ref(&zeroed),
        "the SCTP CRC32c of {p:02x?}"
    );
    let sport = u16::from_be_bytes([seg[0], seg[1]]);
    let dport = u16::from_be_bytes([seg[2], seg[3]]);
    (
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
        [&seg[4..8], &seg[12..]].concat(),
    )
}

/// The addresses of an IP packet of protocol `proto` and where its
/// payload starts; the IPv4 header checksum checked from scratch.
fn read_ip(p: &[u8], proto: u8) -> (IpAddr, IpAddr, usize) {
    if p[0] >> 4 == 4 {
        let ihl = usize::from(p[0] & 0xF) * 4;
        assert_eq!(
            inet_sum(&p[..ihl]),
            0,
            "the IPv4 header checksum of {p:02x?}"
        );
        assert_eq!(p[9], proto);
        let src = Ipv4Addr::from(<[u8; 4]>::try_from(&p[12..16]).unwrap());
        let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&p[16..20]).unwrap());
        (src.into(), dst.into(), ihl)
    } else {
        assert_eq!(p[6], proto);
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).unwrap());
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&p[24..40]).unwrap());
        (src.into(), dst.into(), 40)
    }
}

/// One packet through the example's path: what it decided and the bytes
/// it wrote.
fn through(
    nat: &mut NatPath,
    dp: &dyn Dataplane,
    ct: Option<&Conntrack>,
    packet: &[u8],
) -> (Out, Vec<u8>) {
    let mut buf = packet.to_vec();
    let mut answer = vec![0u8; ICMP_ERROR_MAX_V6];
    let out = nat.handle(dp, ct, Instant::from_secs(1), &mut buf, &mut answer);
    (out, buf)
}

fn pool() -> SnatPool {
    SnatPool {
        v4: PoolRange::parse("--snat-pool", "169.254.0.0/24", false).unwrap(),
        v6: PoolRange::parse("--snat-pool6", "fd00:5c1b::/112", true).unwrap(),
    }
}

/// One mode's dataplane, synced to `table()`, and its tracker.
fn with_mode(mode: Mode, f: impl FnOnce(&dyn Dataplane, Option<&Conntrack>)) {
    let t = table();
    let config = DataplaneConfig::with_seed(1).scheduler(SchedulerKind::RoundRobin);
    match mode {
        Mode::Iptables => {
            let dp = IptablesDataplane::new(config);
            dp.sync(&t, &t.full_change_set(), Instant::ZERO);
            f(&dp, dp.conntrack());
        }
        Mode::Nftables => {
            let dp = NftablesDataplane::new(config);
            dp.sync(&t, &t.full_change_set(), Instant::ZERO);
            f(&dp, dp.conntrack());
        }
        _ => {
            let dp = IpvsDataplane::new(config);
            dp.sync(&t, &t.full_change_set(), Instant::ZERO);
            f(&dp, dp.conntrack());
        }
    }
}

#[test]
fn reference_crc32c_and_checksum_are_right() {
    // RFC 3720 B.4 / the usual check value.
    assert_eq!(crc32c_ref(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c_ref(&[0u8; 32]), 0x8A91_36AA);
    // RFC 1071's example bytes sum to 0xddf2; the checksum is its
    // complement.
    assert_eq!(
        inet_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
        !0xddf2
    );
}

fn sctp_association(mode: Mode, v6: bool) {
    with_mode(mode, |dp, ct| {
        assert!(ct.is_some(), "{mode:?} tracks connections");
        let mut nat = NatPath::new(pool());
        let (vip, client, pool_ip): (IpAddr, IpAddr, IpAddr) = if v6 {
            (
                VIP6.into(),
                Ipv6Addr::new(0xfd00, 0x77, 1, 0, 0, 0, 0, 1).into(),
                POOL6.into(),
            )
        } else {
            (VIP.into(), Ipv4Addr::new(10, 77, 1, 1).into(), POOL4.into())
        };
        let frontend = SocketAddr::new(vip, PORT);
        let what = format!("{mode:?}, IPv{}", if v6 { 6 } else { 4 });

        // INIT (chunk type 1): DNAT to a backend, SNAT to the pool.
        let init_body = [0xAAu8; 16];
        let init = ip(client, vip, SCTP, &sctp(40000, PORT, 0, 1, &init_body));
        let (out, sent) = through(&mut nat, dp, ct, &init);
        assert_eq!(out, Out::Send, "{what}: INIT");
        let (src, dst, rest) = read_sctp(&sent);
        assert_eq!(src, SocketAddr::new(pool_ip, 40000), "{what}: INIT source");
        assert_eq!(dst.port(), TARGET, "{what}: INIT destination");
        let chosen = (1..=3)
            .find(|n| backend(*n, v6) == dst.ip())
            .unwrap_or_else(|| panic!("{what}: INIT to {dst}, not a backend"));
        assert_eq!(
            &rest[4..],
            &sctp(0, 0, 0, 1, &init_body)[12..],
            "{what}: chunks"
        );

        // The backend's INIT ACK (type 2) to the pool address: back to the
        // client, from the cluster IP.
        let ack = ip(
            dst.ip(),
            pool_ip,
            SCTP,
            &sctp(TARGET, 40000, 0x0102_0304, 2, &[0x55; 20]),
        );
        let (out, back) = through(&mut nat, dp, ct, &ack);
        assert_eq!(out, Out::Send, "{what}: INIT ACK");
        let (src, dst2, _) = read_sctp(&back);
        assert_eq!(src, frontend, "{what}: INIT ACK source");
        assert_eq!(
            dst2,
            SocketAddr::new(client, 40000),
            "{what}: INIT ACK dest"
        );

        // DATA (type 0) of the same association: the same backend.
        let data = ip(
            client,
            vip,
            SCTP,
            &sctp(40000, PORT, 0x0A0B_0C0D, 0, &[7; 28]),
        );
        let (out, sent) = through(&mut nat, dp, ct, &data);
        assert_eq!(out, Out::Send, "{what}: DATA");
        let (src, dst3, _) = read_sctp(&sent);
        assert_eq!(src, SocketAddr::new(pool_ip, 40000));
        assert_eq!(dst3, dst, "{what}: DATA went elsewhere");

        // Another backend answering to the same pool address and port is
        // not this association's: dropped.
        let other = backend(chosen % 3 + 1, v6);
        let stray = ip(
            other,
            pool_ip,
            SCTP,
            &sctp(TARGET, 40000, 0x0102_0304, 2, &[0x55; 20]),
        );
        let dropped = nat.stats.dropped;
        let (out, _) = through(&mut nat, dp, ct, &stray);
        assert_eq!(out, Out::Drop, "{what}: a stray reply");
        assert_eq!(nat.stats.dropped, dropped + 1);

        // The backend's port unreachable about the translated INIT: the
        // outer destination and the embedded header go back to the
        // client's view (client -> cluster IP), every checksum right.
        let translated = {
            let (_, sent) = through(&mut nat, dp, ct, &init);
            sent
        };
        let err = icmp_port_unreachable(dst.ip(), pool_ip, &translated);
        let (out, back) = through(&mut nat, dp, ct, &err);
        assert_eq!(out, Out::Send, "{what}: ICMP error");
        let proto = if v6 { 58 } else { 1 };
        let (osrc, odst, l4) = read_ip(&back, proto);
        assert_eq!(osrc, vip, "{what}: ICMP error source");
        assert_eq!(odst, client, "{what}: ICMP error destination");
        let mut m = back[l4..].to_vec();
        let found = u16::from_be_bytes([m[2], m[3]]);
        m[2..4].fill(0);
        assert_eq!(icmp_sum(osrc, odst, &m), found, "{what}: ICMP checksum");
        let (isrc, idst, _) = read_sctp(&back[l4 + 8..]);
        assert_eq!(
            isrc,
            SocketAddr::new(client, 40000),
            "{what}: embedded source"
        );
        assert_eq!(idst, frontend, "{what}: embedded destination");

        // Two more associations (client ports): each to a backend; IPVS's
        // rr gives each backend one (the netfilter modes pick at random).
        let mut seen = vec![chosen];
        for port in [40001u16, 40002] {
            let p = ip(client, vip, SCTP, &sctp(port, PORT, 0, 1, &init_body));
            let (out, sent) = through(&mut nat, dp, ct, &p);
            assert_eq!(out, Out::Send);
            let (src, dst, _) = read_sctp(&sent);
            assert_eq!(src, SocketAddr::new(pool_ip, port));
            seen.push((1..=3).find(|n| backend(*n, v6) == dst.ip()).unwrap());
        }
        if mode == Mode::Ipvs {
            seen.sort_unstable();
            assert_eq!(seen, [1, 2, 3], "{what}: rr over three associations");
        }
        assert_eq!(nat.stats.bad, 0);
    });
}

#[test]
fn sctp_through_the_pool_ipv4() {
    for mode in [Mode::Iptables, Mode::Nftables, Mode::Ipvs] {
        sctp_association(mode, false);
    }
}

#[test]
fn sctp_through_the_pool_ipv6() {
    for mode in [Mode::Iptables, Mode::Nftables, Mode::Ipvs] {
        sctp_association(mode, true);
    }
}
