//! Property tests: after every rewrite of every kind of packet, each
//! checksum equals the one recomputed from scratch, and a fresh parse
//! sees the new addresses.
//!
//! Packets are built by etherparse's `PacketBuilder` (which computes
//! correct checksums); SCTP and ICMP errors are assembled here. The
//! from-scratch reference below builds each pseudo-header as bytes and sums
//! it in the plainest way, apart from the library's incremental code.
#![cfg(feature = "packet")]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::{IpNumber, PacketBuilder};
use proptest::prelude::*;
use svclb::Protocol;
use svclb::packet::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum L4 {
    Tcp,
    Udp,
    UdpNoChecksum,
    Sctp,
}

#[derive(Debug, Clone)]
struct Spec {
    v6: bool,
    l4: L4,
    src: SocketAddr,
    dst: SocketAddr,
    tcp_flags: u8,
    payload: Vec<u8>,
    /// Some((type index, kept bytes of the embedded packet)): wrap the
    /// packet in an ICMP error sent by `icmp_from` to the packet's source.
    icmp: Option<(u8, usize)>,
    icmp_from: IpAddr,
    vlans: u8,
    ethernet: bool,
}

fn ip(v6: bool) -> impl Strategy<Value = IpAddr> {
    if v6 {
        any::<[u8; 16]>()
            .prop_map(|b| IpAddr::V6(Ipv6Addr::from(b)))
            .boxed()
    } else {
        any::<[u8; 4]>()
            .prop_map(|b| IpAddr::V4(Ipv4Addr::from(b)))
            .boxed()
    }
}

fn spec() -> impl Strategy<Value = Spec> {
    any::<bool>().prop_flat_map(|v6| {
        let l4 = if v6 {
            prop_oneof![Just(L4::Tcp), Just(L4::Udp), Just(L4::Sctp)].boxed()
        } else {
            prop_oneof![
                Just(L4::Tcp),
                Just(L4::Udp),
                Just(L4::UdpNoChecksum),
                Just(L4::Sctp)
            ]
            .boxed()
        };
        (
            l4,
            (ip(v6), any::<u16>(), ip(v6), any::<u16>()),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..80),
            proptest::option::of((0u8..4, 8usize..400)),
            ip(v6),
            0u8..3,
            any::<bool>(),
        )
            .prop_map(
                move |(
                    l4,
                    (sa, sp, da, dp),
                    tcp_flags,
                    payload,
                    icmp,
                    icmp_from,
                    vlans,
                    ethernet,
                )| {
                    Spec {
                        v6,
                        l4,
                        src: SocketAddr::new(sa, sp),
                        dst: SocketAddr::new(da, dp),
                        tcp_flags,
                        payload,
                        icmp,
                        icmp_from,
                        vlans,
                        ethernet,
                    }
                },
            )
    })
}

fn v4(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => unreachable!(),
    }
}
fn v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => unreachable!(),
    }
}

/// A bare IP packet of `s`'s flow (no ICMP wrapping).
fn ip_packet(s: &Spec) -> Vec<u8> {
    let mut out = Vec::new();
    let b = if s.v6 {
        PacketBuilder::ipv6(v6(s.src.ip()), v6(s.dst.ip()), 64)
    } else {
        PacketBuilder::ipv4(v4(s.src.ip()), v4(s.dst.ip()), 64)
    };
    match s.l4 {
        L4::Tcp => {
            let mut t = b.tcp(s.src.port(), s.dst.port(), 1000, 65535);
            if s.tcp_flags & 2 != 0 {
                t = t.syn();
            }
            if s.tcp_flags & 1 != 0 {
                t = t.fin();
            }
            if s.tcp_flags & 4 != 0 {
                t = t.rst();
            }
            if s.tcp_flags & 0x10 != 0 {
                t = t.ack(7);
            }
            t.write(&mut out, &s.payload).unwrap();
        }
        L4::Udp | L4::UdpNoChecksum => {
            b.udp(s.src.port(), s.dst.port())
                .write(&mut out, &s.payload)
                .unwrap();
            if s.l4 == L4::UdpNoChecksum {
                let l4 = if s.v6 { 40 } else { 20 };
                out[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
            }
        }
        L4::Sctp => {
            let mut sctp = Vec::new();
            sctp.extend_from_slice(&s.src.port().to_be_bytes());
            sctp.extend_from_slice(&s.dst.port().to_be_bytes());
            sctp.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
            // A DATA-like chunk so the CRC covers more than the header.
            sctp.extend_from_slice(&[0, 3, 0, (4 + s.payload.len()) as u8]);
            sctp.extend_from_slice(&s.payload);
            let crc = sctp_checksum(&sctp);
            sctp[8..12].copy_from_slice(&crc.to_le_bytes());
            b.write(&mut out, IpNumber(132), &sctp).unwrap();
        }
    }
    out
}

/// The packet as the test sends it: the flow, or an ICMP error about it
/// sent by `icmp_from` to the flow's source; with Ethernet and VLANs.
fn build(s: &Spec) -> (Vec<u8>, LinkType) {
    let inner = ip_packet(s);
    let ipb = |eth: bool| -> Vec<u8> {
        let Some((kind, keep)) = s.icmp else {
            return inner.clone();
        };
        // At least the embedded IP header and 8 transport bytes (RFC 792).
        let keep = keep.max(if s.v6 { 48 } else { 28 });
        let embedded = &inner[..keep.min(inner.len())];
        let mut out = Vec::new();
        let (ty, code) = if s.v6 {
            [(1, 4), (2, 0), (3, 0), (4, 0)][kind as usize]
        } else {
            [(3, 3), (3, 4), (11, 0), (12, 0)][kind as usize]
        };
        let _ = eth;
        if s.v6 {
            PacketBuilder::ipv6(v6(s.icmp_from), v6(s.src.ip()), 64)
                .icmpv6_raw(ty, code, [0, 0, 5, 0x78])
                .write(&mut out, embedded)
                .unwrap();
        } else {
            PacketBuilder::ipv4(v4(s.icmp_from), v4(s.src.ip()), 64)
                .icmpv4_raw(ty, code, [0, 0, 5, 0x78])
                .write(&mut out, embedded)
                .unwrap();
        }
        out
    };
    let ip = ipb(s.ethernet);
    if !s.ethernet {
        return (ip, LinkType::Ip);
    }
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    for i in 0..s.vlans {
        frame.extend_from_slice(if i == 0 && s.vlans == 2 {
            &[0x88, 0xa8]
        } else {
            &[0x81, 0x00]
        });
        frame.extend_from_slice(&[0, 10 + i]);
    }
    frame.extend_from_slice(if s.v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    frame.extend_from_slice(&ip);
    // Ethernet padding after the datagram must be left alone.
    frame.extend_from_slice(&[0xEE; 3]);
    (frame, LinkType::Ethernet)
}

// ---- the from-scratch reference ----

fn ones(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for (i, b) in data.iter().enumerate() {
        sum += if i % 2 == 0 {
            u32::from(*b) << 8
        } else {
            u32::from(*b)
        };
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn zeroed(data: &[u8], at: usize, n: usize) -> Vec<u8> {
    let mut d = data.to_vec();
    d[at..at + n].fill(0);
    d
}

/// The checksum of an L4 segment `seg` with its field at `at`, over an IP
/// header at `iph` (for the pseudo-header's addresses).
fn l4_ref(iph: &[u8], proto: u8, seg: &[u8], at: usize) -> u16 {
    let mut pseudo = Vec::new();
    if iph[0] >> 4 == 4 {
        pseudo.extend_from_slice(&iph[12..20]);
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    } else {
        pseudo.extend_from_slice(&iph[8..40]);
        pseudo.extend_from_slice(&(seg.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, proto]);
    }
    pseudo.extend_from_slice(&zeroed(seg, at, 2));
    ones(&pseudo)
}

/// A UDP checksum from scratch as it is sent: a sum of zero goes out as
/// 0xffff (RFC 768; zero means "no checksum").
fn udp_ref(iph: &[u8], seg: &[u8]) -> u16 {
    match l4_ref(iph, 17, seg, 6) {
        0 => 0xffff,
        r => r,
    }
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Checks every checksum of the packet from scratch.
fn check_all(buf: &[u8], p: &ParsedPacket, s: &Spec) -> Result<(), TestCaseError> {
    verify_checksums(buf, p).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let lay = p.layout();
    let iph = &buf[lay.l3..lay.end];
    if !s.v6 {
        prop_assert_eq!(
            get16(iph, 10),
            ones(&zeroed(&iph[..lay.l4 - lay.l3], 10, 2)),
            "ipv4"
        );
    }
    let seg = &buf[lay.l4..lay.end];
    match s.icmp {
        None => match s.l4 {
            L4::Tcp => prop_assert_eq!(get16(seg, 16), l4_ref(iph, 6, seg, 16), "tcp"),
            L4::Udp => prop_assert_eq!(get16(seg, 6), udp_ref(iph, seg), "udp"),
            L4::UdpNoChecksum => prop_assert_eq!(get16(seg, 6), 0, "udp zero stays zero"),
            L4::Sctp => prop_assert_eq!(
                u32::from_le_bytes(seg[8..12].try_into().unwrap()),
                crc32c(&zeroed(seg, 8, 4)),
                "sctp"
            ),
        },
        Some(_) => {
            let r = if s.v6 {
                l4_ref(iph, 58, seg, 2)
            } else {
                ones(&zeroed(seg, 2, 2))
            };
            prop_assert_eq!(get16(seg, 2), r, "icmp outer");
            if let Some(inner) = lay.inner {
                let ih = &buf[inner.l3..lay.end];
                if !s.v6 {
                    prop_assert_eq!(
                        get16(ih, 10),
                        ones(&zeroed(&ih[..inner.l4 - inner.l3], 10, 2)),
                        "inner ipv4"
                    );
                }
                let iseg = &buf[inner.l4..lay.end];
                if inner.complete {
                    match s.l4 {
                        L4::Tcp => prop_assert_eq!(get16(iseg, 16), l4_ref(ih, 6, iseg, 16)),
                        L4::Udp => prop_assert_eq!(get16(iseg, 6), udp_ref(ih, iseg)),
                        L4::UdpNoChecksum => prop_assert_eq!(get16(iseg, 6), 0),
                        L4::Sctp => prop_assert_eq!(
                            u32::from_le_bytes(iseg[8..12].try_into().unwrap()),
                            crc32c(&zeroed(iseg, 8, 4))
                        ),
                    }
                }
            }
        }
    }
    Ok(())
}

fn addr(v6: bool, seed: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, seed, 1)),
            seed ^ 0x5a5a,
        )
    } else {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 96, (seed >> 8) as u8, seed as u8)),
            seed ^ 0x5a5a,
        )
    }
}

fn protocol(l4: L4) -> Protocol {
    match l4 {
        L4::Tcp => Protocol::Tcp,
        L4::Udp | L4::UdpNoChecksum => Protocol::Udp,
        L4::Sctp => Protocol::Sctp,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn rewrites_keep_every_checksum_right(s in spec(), a in any::<u16>(), b in any::<u16>()) {
        let (mut buf, link) = build(&s);
        let padding = buf[buf.len() - 3..].to_vec();
        let p = parse(&buf, link).map_err(|e| TestCaseError::fail(format!("{e}: {s:?}")))?;
        check_all(&buf, &p, &s)?;
        let (new_dst, new_src) = (addr(s.v6, a), addr(s.v6, b));
        match *p.kind() {
            PacketKind::Flow(f) => {
                prop_assert!(s.icmp.is_none());
                prop_assert_eq!(f, svclb::Flow::new(protocol(s.l4), s.src, s.dst));
                if s.l4 == L4::Tcp {
                    prop_assert_eq!(p.tcp_flags().unwrap().bits(), s.tcp_flags & 0x17);
                }
                // DNAT, then SNAT (full NAT), each checked.
                rewrite_dst(&mut buf, &p, new_dst).unwrap();
                let q = parse(&buf, link).unwrap();
                prop_assert_eq!(q.flow().unwrap().dst, new_dst);
                prop_assert_eq!(q.flow().unwrap().src, s.src);
                check_all(&buf, &q, &s)?;
                rewrite_src(&mut buf, &p, new_src).unwrap();
                let q = parse(&buf, link).unwrap();
                prop_assert_eq!(q.flow().unwrap(), svclb::Flow::new(protocol(s.l4), new_src, new_dst));
                check_all(&buf, &q, &s)?;
                // Reverse NAT of the "reply" restores the original.
                let original = svclb::Flow::new(protocol(s.l4), s.src, s.dst);
                let reply_of = svclb::Flow::new(protocol(s.l4), s.dst, s.src);
                reverse_nat(&mut buf, &q, &reply_of, true).unwrap();
                let r = parse(&buf, link).unwrap();
                prop_assert_eq!(r.flow().unwrap(), original);
                check_all(&buf, &r, &s)?;
            }
            PacketKind::IcmpError { inner, error } => {
                prop_assert_eq!(inner, svclb::Flow::new(protocol(s.l4), s.src, s.dst));
                let (_, keep) = s.icmp.unwrap();
                prop_assert_eq!(error.kind == IcmpErrorKind::PacketTooBig, s.icmp.unwrap().0 == 1);
                let _ = keep;
                // Reverse NAT as for a backend's error about the client's
                // packet: the outer source and the inner destination.
                rewrite_src(&mut buf, &p, new_src).unwrap();
                let q = parse(&buf, link).unwrap();
                let PacketKind::IcmpError { inner, .. } = *q.kind() else { panic!() };
                prop_assert_eq!(inner.dst, new_src);
                prop_assert_eq!(inner.src, s.src);
                check_all(&buf, &q, &s)?;
                // The outer destination and the inner source (full NAT).
                rewrite_dst(&mut buf, &p, new_dst).unwrap();
                let q = parse(&buf, link).unwrap();
                let PacketKind::IcmpError { inner, .. } = *q.kind() else { panic!() };
                prop_assert_eq!(inner, svclb::Flow::new(protocol(s.l4), new_dst, new_src));
                let lay = q.layout();
                let (sa, da) = if s.v6 { (8, 24) } else { (12, 16) };
                let len = if s.v6 { 16 } else { 4 };
                let outer_src = &buf[lay.l3 + sa..lay.l3 + sa + len];
                let outer_dst = &buf[lay.l3 + da..lay.l3 + da + len];
                prop_assert_eq!(outer_src, &ipbytes(new_src.ip())[..]);
                prop_assert_eq!(outer_dst, &ipbytes(new_dst.ip())[..]);
                check_all(&buf, &q, &s)?;
            }
            PacketKind::Unroutable(_) | PacketKind::Fragment(_) => {
                prop_assert!(false, "unexpected {:?} for {:?}", p.kind(), s);
            }
        }
        if link == LinkType::Ethernet {
            prop_assert_eq!(&buf[buf.len() - 3..], &padding[..]);
        }
        // A family mismatch is refused and leaves the buffer alone.
        let before = buf.clone();
        let other = addr(!s.v6, 1);
        let refused = matches!(rewrite_dst(&mut buf, &p, other), Err(RewriteError::FamilyMismatch { .. }));
        prop_assert!(refused);
        prop_assert_eq!(before, buf);
    }
}

fn ipbytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}
