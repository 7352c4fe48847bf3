//! The packet module's behaviour: flows, TCP flags, VLANs, IPv6 extension
//! headers, fragments matched through the connection layer, ICMP errors, typed errors for bad
//! packets, and the source-port allocator.
#![cfg(feature = "packet")]

use core::time::Duration;
use std::net::SocketAddr;

use etherparse::PacketBuilder;
use svclb::packet::*;
use svclb::{
    AddressType, Change, Dataplane, DataplaneConfig, EndpointSlice, EndpointSpec, Flow, Instant,
    IpvsDataplane, Protocol, Service, ServicePortSpec, ServiceTable, SlicePortSpec,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v4_udp(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4([10, 2, 0, 9], [10, 96, 0, 10], 64)
        .udp(40000, 53)
        .write(&mut out, payload)
        .unwrap();
    out
}

fn v4_tcp_syn() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4([10, 2, 0, 9], [10, 96, 0, 10], 64)
        .tcp(40000, 80, 1, 1000)
        .syn()
        .write(&mut out, &[])
        .unwrap();
    out
}

fn v6_addr(last: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[15] = last;
    a
}

#[test]
fn tcp_flow_and_flags() {
    let p = parse(&v4_tcp_syn(), LinkType::Ip).unwrap();
    assert_eq!(
        p.flow(),
        Some(Flow::tcp(sa("10.2.0.9:40000"), sa("10.96.0.10:80")))
    );
    assert_eq!(p.tcp_flags(), Some(TcpFlags::SYN));
    assert!(!p.tcp_flags().unwrap().contains(TcpFlags::ACK));
    assert_eq!(p.transport(), Some(Transport::Tcp));
    assert_eq!(p.layout().l4, 20);
}

#[test]
fn ethernet_with_qinq_tags() {
    let ip = v4_udp(b"hi");
    let mut f = vec![
        2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x88, 0xa8, 0, 100, 0x81, 0x00, 0, 10, 8, 0,
    ];
    f.extend_from_slice(&ip);
    let p = parse(&f, LinkType::Ethernet).unwrap();
    assert_eq!(p.vlan_tags(), 2);
    assert_eq!(p.layout().l3, 22);
    assert_eq!(p.flow().unwrap().dst, sa("10.96.0.10:53"));
    // A third tag is refused.
    let mut f3 = f[..12].to_vec();
    f3.extend_from_slice(&[0x88, 0xa8, 0, 1, 0x81, 0, 0, 2, 0x81, 0, 0, 3, 8, 0]);
    f3.extend_from_slice(&ip);
    assert_eq!(
        parse(&f3, LinkType::Ethernet),
        Err(ParseError::TooManyVlanTags)
    );
    // ARP is no IP.
    let mut arp = f[..12].to_vec();
    arp.extend_from_slice(&[0x08, 0x06, 0, 0]);
    assert_eq!(
        parse(&arp, LinkType::Ethernet),
        Err(ParseError::UnsupportedEtherType { ethertype: 0x0806 })
    );
}

/// An IPv6 UDP packet behind hop-by-hop, routing and destination options
/// headers; `frag` adds a fragment header (offset in 8-byte units, M).
fn v6_with_exts(frag: Option<(u16, bool, u32)>, payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut exts = Vec::new();
    // hop-by-hop (next: routing 43), routing (next: dest opts 60),
    // dest opts (next: fragment 44 or udp 17): 8 bytes each.
    exts.extend_from_slice(&[43, 0, 1, 4, 0, 0, 0, 0]);
    exts.extend_from_slice(&[60, 0, 0, 0, 0, 0, 0, 0]);
    let after_dest = if frag.is_some() { 44 } else { 17 };
    exts.extend_from_slice(&[after_dest, 0, 1, 4, 0, 0, 0, 0]);
    if let Some((off, more, id)) = frag {
        let fo = (off << 3) | u16::from(more);
        exts.extend_from_slice(&[17, 0]);
        exts.extend_from_slice(&fo.to_be_bytes());
        exts.extend_from_slice(&id.to_be_bytes());
    }
    let body: Vec<u8> = if matches!(frag, Some((o, _, _)) if o != 0) {
        payload.to_vec()
    } else {
        udp
    };
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&((exts.len() + body.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 64]);
    p.extend_from_slice(&v6_addr(1));
    p.extend_from_slice(&v6_addr(2));
    p.extend_from_slice(&exts);
    p.extend_from_slice(&body);
    p
}

#[test]
fn ipv6_extension_headers_are_skipped() {
    let p = parse(&v6_with_exts(None, b"abc"), LinkType::Ip).unwrap();
    assert_eq!(p.layout().l4, 40 + 24);
    assert_eq!(p.ip_protocol(), 17);
    let f = p.flow().unwrap();
    assert_eq!(f.src, sa("[fd00::1]:40000"));
    assert_eq!(f.dst, sa("[fd00::2]:53"));
    assert!(!p.is_fragmented());
}

#[test]
fn ipv6_fragments() {
    let first = parse(
        &v6_with_exts(Some((0, true, 0xdead_beef)), b"abcdefgh"),
        LinkType::Ip,
    )
    .unwrap();
    let key = first.first_fragment().expect("a first fragment");
    assert_eq!(key.id, 0xdead_beef);
    assert_eq!(key.protocol, Protocol::Udp);
    let later = parse(
        &v6_with_exts(Some((2, false, 0xdead_beef)), b"12345678"),
        LinkType::Ip,
    )
    .unwrap();
    let PacketKind::Fragment(frag) = *later.kind() else {
        panic!("{:?}", later.kind())
    };
    assert_eq!(frag.offset, 16);
    assert!(!frag.more);
    assert_eq!(frag.key(), key);
    assert_eq!(later.flow(), None);
}

fn v4_fragment(id: u16, offset_units: u16, more: bool, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let fo = offset_units | if more { 0x2000 } else { 0 };
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&fo.to_be_bytes());
    h.extend_from_slice(&[64, 17, 0, 0, 10, 2, 0, 9, 10, 96, 0, 10]);
    let c = internet_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

#[test]
fn ipv4_fragments_follow_their_first_through_the_connection_layer() {
    let udp = &v4_udp(&[7; 32])[20..];
    let first = v4_fragment(77, 0, true, &udp[..24]);
    let second = v4_fragment(77, 3, true, &udp[24..32]);
    let last = v4_fragment(77, 4, false, &udp[32..]);
    let stranger = v4_fragment(78, 3, false, &udp[24..]);
    let mut table = ServiceTable::new();
    let svc = Service::builder("default", "dns")
        .cluster_ip("10.96.0.10".parse().unwrap())
        .port(ServicePortSpec::udp(53).target_port(5353))
        .build()
        .unwrap();
    let slice = EndpointSlice::builder("default", "dns-1", "dns", AddressType::IPv4)
        .port(SlicePortSpec::udp(5353))
        .endpoints(["10.1.0.5", "10.1.0.6"].map(EndpointSpec::new))
        .build()
        .unwrap();
    let cs = table
        .apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)])
        .unwrap();
    let dp = IpvsDataplane::new(DataplaneConfig::with_seed(5));
    dp.sync(&table, &cs, Instant::ZERO);
    let now = Instant::from_secs(100);
    let key_of = |buf: &[u8]| match *parse(buf, LinkType::Ip).unwrap().kind() {
        PacketKind::Fragment(f) => f.key(),
        other => panic!("{other:?}"),
    };

    // A later fragment before its first: unroutable, never guessed.
    let sp = parse(&second, LinkType::Ip).unwrap();
    assert_eq!(dp.later_fragment(&key_of(&second), now), None);

    let fp = parse(&first, LinkType::Ip).unwrap();
    let flow = fp.flow().unwrap();
    assert_eq!(flow.dst, sa("10.96.0.10:53"));
    assert!(fp.is_fragmented());
    let backend = dp.route(&flow, now).backend().unwrap();
    assert!(dp.first_fragment(&fp.first_fragment().unwrap(), &flow, now));
    assert_eq!(fp.first_fragment(), Some(key_of(&second)));
    let t = dp.later_fragment(&key_of(&second), now).unwrap();
    assert_eq!((t.flow, t.backend_addr), (flow, backend));
    let t = dp.later_fragment(&key_of(&last), now + Duration::from_secs(29));
    assert_eq!(t.map(|t| t.backend_addr), Some(backend));
    assert_eq!(dp.later_fragment(&key_of(&stranger), now), None);
    // IPv4 reassembly's timeout.
    assert_eq!(
        dp.later_fragment(&key_of(&last), now + Duration::from_secs(30)),
        None
    );

    // DNAT of a later fragment rewrites its address and IPv4 checksum.
    let mut buf = second.clone();
    rewrite_dst(&mut buf, &sp, sa("10.1.0.5:5353")).unwrap();
    let q = parse(&buf, LinkType::Ip).unwrap();
    let PacketKind::Fragment(f) = *q.kind() else {
        panic!()
    };
    assert_eq!(f.dst, "10.1.0.5".parse::<std::net::IpAddr>().unwrap());
    verify_checksums(&buf, &q).unwrap();
}

#[test]
fn tiny_first_fragment_is_unroutable() {
    let first = v4_fragment(5, 0, true, &[0x9c, 0x40, 0, 53]);
    let p = parse(&first, LinkType::Ip).unwrap();
    assert_eq!(
        *p.kind(),
        PacketKind::Unroutable(Unroutable::FirstFragmentTooShort {
            protocol: Protocol::Udp,
            got: 4
        })
    );
}

#[test]
fn icmp_errors_expose_the_embedded_flow() {
    // The backend 10.1.0.5 says port unreachable about the client's packet.
    let inner = v4_udp(b"query");
    let mut out = Vec::new();
    PacketBuilder::ipv4([10, 1, 0, 5], [10, 2, 0, 9], 64)
        .icmpv4_raw(3, 3, [0; 4])
        .write(&mut out, &inner)
        .unwrap();
    let p = parse(&out, LinkType::Ip).unwrap();
    let PacketKind::IcmpError { error, inner: flow } = *p.kind() else {
        panic!("{:?}", p.kind())
    };
    assert_eq!(error.kind, IcmpErrorKind::DestinationUnreachable);
    assert_eq!(flow, Flow::udp(sa("10.2.0.9:40000"), sa("10.96.0.10:53")));
    assert!(p.layout().inner.unwrap().complete);
    // Fragmentation needed is "packet too big".
    let mut out = Vec::new();
    PacketBuilder::ipv4([10, 1, 0, 5], [10, 2, 0, 9], 64)
        .icmpv4_raw(3, 4, [0, 0, 5, 0xdc])
        .write(&mut out, &inner[..28])
        .unwrap();
    let p = parse(&out, LinkType::Ip).unwrap();
    assert!(matches!(
        p.kind(),
        PacketKind::IcmpError {
            error: IcmpError {
                kind: IcmpErrorKind::PacketTooBig,
                ..
            },
            ..
        }
    ));
    // An echo request carries no flow and is not rewritten.
    let mut echo = Vec::new();
    PacketBuilder::ipv4([10, 2, 0, 9], [10, 96, 0, 10], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut echo, b"ping")
        .unwrap();
    let p = parse(&echo, LinkType::Ip).unwrap();
    assert_eq!(
        *p.kind(),
        PacketKind::Unroutable(Unroutable::IcmpInformational {
            icmp_type: 8,
            code: 0
        })
    );
    let before = echo.clone();
    assert!(matches!(
        rewrite_dst(&mut echo, &p, sa("10.1.0.5:1")),
        Err(RewriteError::NotRewritable(_))
    ));
    assert_eq!(echo, before);
    // ICMPv6 packet too big about a TCP packet.
    let mut inner6 = Vec::new();
    PacketBuilder::ipv6(v6_addr(1), v6_addr(2), 64)
        .tcp(40000, 443, 9, 100)
        .ack(1)
        .write(&mut inner6, &[1; 100])
        .unwrap();
    let mut out = Vec::new();
    PacketBuilder::ipv6(v6_addr(9), v6_addr(1), 64)
        .icmpv6_raw(2, 0, [0, 0, 5, 0])
        .write(&mut out, &inner6[..60])
        .unwrap();
    let p = parse(&out, LinkType::Ip).unwrap();
    let PacketKind::IcmpError { error, inner } = *p.kind() else {
        panic!()
    };
    assert_eq!(error.kind, IcmpErrorKind::PacketTooBig);
    assert_eq!(inner.dst, sa("[fd00::2]:443"));
    assert!(!p.layout().inner.unwrap().complete);
}

#[test]
fn bad_packets_get_typed_errors() {
    let syn = v4_tcp_syn();
    // Truncated TCP header.
    let mut t = syn[..30].to_vec();
    t[2..4].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(
        parse(&t, LinkType::Ip),
        Err(ParseError::TruncatedHeader {
            layer: "tcp",
            needed: 20,
            got: 10
        })
    );
    // The datagram claims more than the buffer holds.
    assert_eq!(
        parse(&syn[..39], LinkType::Ip),
        Err(ParseError::TruncatedDatagram {
            layer: "ipv4",
            needed: 40,
            got: 39
        })
    );
    // Bad IHL.
    let mut b = syn.clone();
    b[0] = 0x44;
    assert_eq!(
        parse(&b, LinkType::Ip),
        Err(ParseError::BadIhl {
            layer: "ipv4",
            ihl: 4
        })
    );
    // Bad version.
    b[0] = 0x55;
    assert_eq!(
        parse(&b, LinkType::Ip),
        Err(ParseError::BadVersion {
            layer: "ip",
            version: 5
        })
    );
    // Total length shorter than the header.
    let mut b = syn.clone();
    b[2..4].copy_from_slice(&12u16.to_be_bytes());
    assert_eq!(
        parse(&b, LinkType::Ip),
        Err(ParseError::BadTotalLength {
            total_len: 12,
            header_len: 20
        })
    );
    // TCP data offset below 5.
    let mut b = syn.clone();
    b[32] = 0x40;
    assert_eq!(
        parse(&b, LinkType::Ip),
        Err(ParseError::BadTcpDataOffset { data_offset: 4 })
    );
    // GRE is no Service protocol.
    let mut b = syn.clone();
    b[9] = 47;
    assert_eq!(
        parse(&b, LinkType::Ip),
        Err(ParseError::UnsupportedProtocol {
            layer: "ipv4",
            protocol: 47
        })
    );
    // UDP length beyond the payload.
    let mut u = v4_udp(b"abcd");
    u[24..26].copy_from_slice(&100u16.to_be_bytes());
    assert_eq!(
        parse(&u, LinkType::Ip),
        Err(ParseError::BadUdpLength {
            length: 100,
            payload: 12
        })
    );
    // Hop-by-hop anywhere but first.
    let mut v6 = v6_with_exts(None, b"x");
    v6[40 + 8] = 0; // routing's next header -> hop-by-hop
    assert_eq!(
        parse(&v6, LinkType::Ip),
        Err(ParseError::BadExtensionHeader {
            layer: "ipv6",
            reason: "hop-by-hop options not directly after the ipv6 header"
        })
    );
    assert!(matches!(
        parse(&[], LinkType::Ip),
        Err(ParseError::TruncatedHeader { layer: "ip", .. })
    ));
    assert!(matches!(
        parse(&[0; 5], LinkType::Ethernet),
        Err(ParseError::TruncatedHeader {
            layer: "ethernet",
            needed: 14,
            got: 5
        })
    ));
    // Every prefix of a valid packet fails cleanly or parses.
    for n in 0..syn.len() {
        assert!(parse(&syn[..n], LinkType::Ip).is_err());
    }
}

#[test]
fn rewrite_refuses_short_buffers_and_fragmented_sctp() {
    let syn = v4_tcp_syn();
    let p = parse(&syn, LinkType::Ip).unwrap();
    let mut short = syn[..30].to_vec();
    assert_eq!(
        rewrite_dst(&mut short, &p, sa("10.1.0.5:8080")),
        Err(RewriteError::BufferTooShort {
            needed: 40,
            got: 30
        })
    );
    // An SCTP first fragment.
    let mut sctp = vec![0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 4];
    sctp.resize(24, 0);
    let mut f = v4_fragment(9, 0, true, &sctp);
    f[9] = 132;
    f[10..12].copy_from_slice(&[0, 0]);
    let c = internet_checksum(&f[..20]);
    f[10..12].copy_from_slice(&c.to_be_bytes());
    let p = parse(&f, LinkType::Ip).unwrap();
    assert_eq!(p.flow().unwrap().protocol, Protocol::Sctp);
    assert_eq!(
        rewrite_dst(&mut f, &p, sa("10.1.0.5:80")),
        Err(RewriteError::FragmentedSctp)
    );
}

#[test]
fn udp_zero_checksum_rules() {
    // A zero checksum stays zero.
    let mut u = v4_udp(b"abcd");
    u[26..28].copy_from_slice(&[0, 0]);
    let p = parse(&u, LinkType::Ip).unwrap();
    rewrite_dst(&mut u, &p, sa("10.1.0.5:5353")).unwrap();
    assert_eq!(&u[26..28], &[0, 0]);
    // Find a rewrite whose updated checksum comes to 0: it is sent 0xFFFF.
    let base = v4_udp(b"abcd");
    let p = parse(&base, LinkType::Ip).unwrap();
    let mut seen = false;
    for port in 0..=u16::MAX {
        let mut b = base.clone();
        rewrite_dst(
            &mut b,
            &p,
            SocketAddr::new("10.1.0.5".parse().unwrap(), port),
        )
        .unwrap();
        let c = u16::from_be_bytes([b[26], b[27]]);
        assert_ne!(c, 0, "port {port}");
        if c == 0xFFFF {
            seen = true;
            verify_checksums(&b, &parse(&b, LinkType::Ip).unwrap()).unwrap();
        }
    }
    assert!(seen, "some port gives the all-ones checksum");
}

#[test]
fn source_ports_never_collide() {
    let mut ports = SourcePortAllocator::default();
    assert_eq!(ports.range(), 32768..=60999);
    let backend = sa("10.1.0.5:8080");
    let snat = "10.0.0.1".parse().unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..(60999 - 32768 + 1) {
        let p = ports.allocate(Protocol::Tcp, backend, snat).unwrap();
        assert!((32768..=60999).contains(&p));
        assert!(seen.insert(p), "port {p} handed out twice");
    }
    let err = ports.allocate(Protocol::Tcp, backend, snat).unwrap_err();
    assert_eq!(err.first, 32768);
    assert!(err.to_string().contains("10.1.0.5:8080"));
    // Another protocol or backend has its own ports.
    assert_eq!(ports.allocate(Protocol::Udp, backend, snat), Ok(32768));
    assert_eq!(
        ports.allocate(Protocol::Tcp, sa("10.1.0.6:8080"), snat),
        Ok(32768)
    );
    // Release: the port comes back, and only once.
    assert!(ports.release(Protocol::Tcp, backend, snat, 40000));
    assert!(!ports.release(Protocol::Tcp, backend, snat, 40000));
    assert!(!ports.is_in_use(Protocol::Tcp, backend, snat, 40000));
    assert_eq!(ports.allocate(Protocol::Tcp, backend, snat), Ok(40000));
    assert_eq!(ports.forget_backend(backend), 60999 - 32768 + 1 + 1);
    assert_eq!(ports.in_use(Protocol::Tcp, backend, snat), 0);
    // Rotation: a released port is not handed out again at once.
    let mut small = SourcePortAllocator::new(100..=103);
    let a = small.allocate(Protocol::Tcp, backend, snat).unwrap();
    assert!(small.release(Protocol::Tcp, backend, snat, a));
    assert_ne!(small.allocate(Protocol::Tcp, backend, snat).unwrap(), a);
}

#[test]
fn tcp_flags_bits_convert() {
    // The parser's flags are the connection tracker's type.
    let f = TcpFlags::from_bits(0xff);
    assert_eq!(f.bits(), 0x17);
    assert_eq!(f.to_string(), "syn,ack,fin,rst");
    assert_eq!(TcpFlags::from_bits(f.bits()), f);
    assert!(TcpFlags::NONE.is_empty());
    let _: svclb::conntrack::TcpFlags = f;
}

#[test]
fn parsed_packet_is_small_enough_to_copy() {
    // The parse result travels by value: keep it within a few cache lines.
    let size = core::mem::size_of::<ParsedPacket>();
    println!("ParsedPacket: {size} bytes");
    assert!(size <= 128, "{size}");
}

// The outer IPv4 and TCP headers are checked in place with etherparse's
// rules: on any input, the header errors are exactly the slices'.
proptest::proptest! {
    #[test]
    fn in_place_ipv4_and_tcp_checks_agree_with_etherparse(
        mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..80),
        ihl in 0u8..16,
        doff in 0u8..16,
    ) {
        use etherparse::{Ipv4HeaderSlice, TcpHeaderSlice};
        if let Some(b) = bytes.first_mut() {
            *b = 0x40 | ihl;
        }
        if bytes.len() >= 10 {
            let len = bytes.len() as u16;
            bytes[2..4].copy_from_slice(&len.to_be_bytes());
            bytes[9] = 6; // TCP
            bytes[6] &= 0x40; // not a fragment
            bytes[7] = 0;
        }
        let hl = usize::from(ihl) * 4;
        if bytes.len() > hl + 12 {
            bytes[hl + 12] = doff << 4;
        }
        let ours = parse(&bytes, LinkType::Ip);
        match Ipv4HeaderSlice::from_slice(&bytes) {
            Err(etherparse::err::ipv4::HeaderSliceError::Len(e)) => proptest::prop_assert_eq!(
                ours.unwrap_err(),
                ParseError::TruncatedHeader { layer: "ipv4", needed: e.required_len, got: e.len }
            ),
            Err(etherparse::err::ipv4::HeaderSliceError::Content(_)) => {
                proptest::prop_assert_eq!(ours.unwrap_err(), ParseError::BadIhl { layer: "ipv4", ihl })
            }
            Ok(h) => {
                let total = usize::from(h.total_len());
                if total < hl || total > bytes.len() {
                    proptest::prop_assert!(ours.is_err());
                } else if let Ok(p) = &ours {
                    // A complete TCP header, valid by etherparse too.
                    let seg = &bytes[hl..total];
                    let tcp = TcpHeaderSlice::from_slice(seg).unwrap();
                    proptest::prop_assert_eq!(p.tcp_flags(), Some(TcpFlags::from_bits(tcp.slice()[13])));
                    proptest::prop_assert_eq!(p.flow().unwrap().src.port(), tcp.source_port());
                } else if let Err(ParseError::BadTcpDataOffset { data_offset }) = ours {
                    let seg = &bytes[hl..total];
                    proptest::prop_assert!(matches!(
                        TcpHeaderSlice::from_slice(seg),
                        Err(etherparse::err::tcp::HeaderSliceError::Content(_))
                    ));
                    proptest::prop_assert_eq!(data_offset, doff);
                }
            }
        }
    }
}
