//! Parsing: a raw frame or IP packet into a [`Flow`], its TCP flags, and
//! the offsets a rewrite needs.
//!
//! Headers are validated by etherparse's zero-copy header slices
//! (Ethernet II, 802.1Q/802.1ad tags, IPv6 and its extension-header chain,
//! an ICMP error's embedded IPv4 header); the outer IPv4 header and the
//! TCP header, on every packet's path, are checked in place with
//! etherparse's rules, in its order and with the same errors (the slices
//! cost a fifth of a parse); UDP's, SCTP's common header and the ICMP
//! headers are read here. Every offset that [`Layout`] reports lies inside the parsed
//! datagram, so that a rewrite indexes nothing it has not checked.

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use etherparse::{
    Ethernet2HeaderSlice, Ipv4HeaderSlice, Ipv6ExtensionSlice, Ipv6ExtensionsSlice,
    Ipv6HeaderSlice, SingleVlanHeaderSlice, err,
};

use super::error::ParseError;
use crate::conntrack::TcpFlags;
use crate::{Flow, FragmentKey, Protocol};

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86DD;
const ETH_VLAN: [u16; 3] = [0x8100, 0x88A8, 0x9100];
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const PROTO_SCTP: u8 = 132;

/// What the buffer starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkType {
    /// An Ethernet II frame, optionally with one or two VLAN tags (802.1Q,
    /// 802.1ad QinQ, or the old 0x9100).
    Ethernet,
    /// A bare IPv4 or IPv6 packet (a TUN device, pcap `LINKTYPE_RAW`).
    Ip,
}

/// The IP family of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpVersion {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl fmt::Display for IpVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpVersion::V4 => "IPv4",
            IpVersion::V6 => "IPv6",
        })
    }
}

/// The transport header found after the IP headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
    /// ICMP (over IPv4) or ICMPv6 (over IPv6).
    Icmp,
}

impl Transport {
    /// The Service protocol, for TCP, UDP and SCTP.
    pub const fn protocol(self) -> Option<Protocol> {
        match self {
            Transport::Tcp => Some(Protocol::Tcp),
            Transport::Udp => Some(Protocol::Udp),
            Transport::Sctp => Some(Protocol::Sctp),
            Transport::Icmp => None,
        }
    }
}

/// The ICMP errors whose embedded header names a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IcmpErrorKind {
    /// Destination unreachable (ICMP type 3 except code 4; ICMPv6 type 1).
    DestinationUnreachable,
    /// Packet too big (ICMPv6 type 2; ICMP type 3 code 4, "fragmentation
    /// needed").
    PacketTooBig,
    /// Time exceeded (ICMP type 11; ICMPv6 type 3).
    TimeExceeded,
    /// Parameter problem (ICMP type 12; ICMPv6 type 4).
    ParameterProblem,
}

/// An ICMP error message's type, code and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IcmpError {
    /// What the error says.
    pub kind: IcmpErrorKind,
    /// The ICMP or ICMPv6 type.
    pub icmp_type: u8,
    /// The code.
    pub code: u8,
}

/// A later fragment (non-zero offset): it holds no transport header, so no
/// ports. Match it to its first fragment through the connection layer:
/// [`Dataplane::later_fragment`](crate::Dataplane::later_fragment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fragment {
    /// The identification.
    pub id: u32,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The upper-layer protocol.
    pub protocol: Protocol,
    /// The fragment's offset in bytes.
    pub offset: u16,
    /// Whether more fragments follow (IPv4 MF, IPv6 M).
    pub more: bool,
}

impl Fragment {
    /// The key its datagram's fragments share.
    pub const fn key(&self) -> FragmentKey {
        FragmentKey {
            src: self.src,
            dst: self.dst,
            id: self.id,
            protocol: self.protocol,
        }
    }
}

/// Why a well-formed packet yields no flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unroutable {
    /// An ICMP message that is not an error (echo and the like): Services
    /// do not carry ICMP.
    IcmpInformational {
        /// The ICMP or ICMPv6 type.
        icmp_type: u8,
        /// The code.
        code: u8,
    },
    /// A later fragment of an ICMP message.
    IcmpFragment,
    /// A first fragment too short to hold its transport header.
    FirstFragmentTooShort {
        /// The protocol.
        protocol: Protocol,
        /// Bytes of transport header present.
        got: usize,
    },
    /// An ICMP error about a later fragment (no ports embedded).
    IcmpErrorAboutFragment,
    /// An ICMP error about a packet of a protocol with no ports.
    IcmpErrorNotAboutAFlow {
        /// The embedded packet's protocol number.
        protocol: u8,
    },
}

impl fmt::Display for Unroutable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unroutable::IcmpInformational { icmp_type, code } => {
                write!(
                    f,
                    "icmp type {icmp_type} code {code} is no error and carries no flow"
                )
            }
            Unroutable::IcmpFragment => f.write_str("a later fragment of an icmp message"),
            Unroutable::FirstFragmentTooShort { protocol, got } => write!(
                f,
                "a first fragment with only {got} bytes of its {} header",
                protocol.as_lower_str()
            ),
            Unroutable::IcmpErrorAboutFragment => {
                f.write_str("an icmp error about a later fragment")
            }
            Unroutable::IcmpErrorNotAboutAFlow { protocol } => {
                write!(
                    f,
                    "an icmp error about ip protocol {protocol}, which has no ports"
                )
            }
        }
    }
}

/// What a packet is, for the dataplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketKind {
    /// A TCP, UDP or SCTP packet (unfragmented, or a first fragment).
    Flow(Flow),
    /// An ICMP error about a flow. `inner` is the embedded packet's flow as
    /// its sender sent it (so, for an error about a reply, the reply's
    /// direction).
    IcmpError {
        /// The error.
        error: IcmpError,
        /// The embedded header's flow.
        inner: Flow,
    },
    /// A later fragment: no ports; see [`Fragment`].
    Fragment(Fragment),
    /// Well formed, but no flow can be taken from it.
    Unroutable(Unroutable),
}

/// Offsets of an ICMP error's embedded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InnerLayout {
    /// The embedded packet's family (always the outer one's).
    pub version: IpVersion,
    /// The embedded transport.
    pub transport: Transport,
    /// Where the embedded IP header starts.
    pub l3: usize,
    /// Where the embedded transport header starts (at least 8 bytes of it
    /// are present).
    pub l4: usize,
    /// Whether the whole embedded datagram is present (its IP length
    /// matches the bytes carried, and it is not a first fragment), so that
    /// its L4 checksum can be checked.
    pub complete: bool,
}

/// Where each layer starts, in the buffer that was parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    /// The IP header.
    pub l3: usize,
    /// The IP payload (after IPv6 extension headers): the transport header,
    /// or a later fragment's data.
    pub l4: usize,
    /// The end of the IP datagram (Ethernet padding after it is ignored).
    pub end: usize,
    /// An ICMP error's embedded packet.
    pub inner: Option<InnerLayout>,
}

/// A parsed packet: what it is, its TCP flags, and its layout, so that a
/// rewrite needs no second parse.
///
/// # Examples
/// ```
/// use svclb::packet::{parse, LinkType, PacketKind, TcpFlags};
/// // IPv4 + TCP SYN, 10.1.0.5:40000 -> 10.96.0.10:80.
/// let mut p = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 1, 0, 5, 10, 96, 0, 10];
/// p.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
/// let parsed = parse(&p, LinkType::Ip)?;
/// let flow = parsed.flow().unwrap();
/// assert_eq!(flow.dst, "10.96.0.10:80".parse()?);
/// assert_eq!(parsed.tcp_flags(), Some(TcpFlags::SYN));
/// assert_eq!(parsed.layout().l4, 20);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParsedPacket {
    kind: PacketKind,
    version: IpVersion,
    ip_protocol: u8,
    transport: Option<Transport>,
    tcp_flags: Option<TcpFlags>,
    fragmented: bool,
    /// A first fragment of several: `frag_id` is its identification.
    first: bool,
    vlan_tags: u8,
    frag_id: u32,
    offsets: Offsets,
}

/// [`Layout`] in 32-bit offsets, so that the parse result, which travels
/// by value, stays within two cache lines (112 bytes rather than 168).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Offsets {
    l3: u32,
    l4: u32,
    end: u32,
    inner_l3: u32,
    inner_l4: u32,
    /// 0: no inner packet; 1: present; 2: present and complete.
    inner: u8,
    inner_transport: Transport,
}

impl Offsets {
    fn new(l3: usize, l4: usize, end: usize) -> Self {
        Offsets {
            l3: l3 as u32,
            l4: l4 as u32,
            end: end as u32,
            inner_l3: 0,
            inner_l4: 0,
            inner: 0,
            inner_transport: Transport::Tcp,
        }
    }
}

impl ParsedPacket {
    /// What the packet is.
    pub const fn kind(&self) -> &PacketKind {
        &self.kind
    }

    /// The flow of a TCP, UDP or SCTP packet (or first fragment), as
    /// parsed (a rewrite does not update it).
    pub const fn flow(&self) -> Option<Flow> {
        match self.kind {
            PacketKind::Flow(f) => Some(f),
            _ => None,
        }
    }

    /// The IP family.
    pub const fn version(&self) -> IpVersion {
        self.version
    }

    /// The upper-layer protocol number after any IPv6 extension headers.
    pub const fn ip_protocol(&self) -> u8 {
        self.ip_protocol
    }

    /// The transport header present (`None` for a later fragment).
    pub const fn transport(&self) -> Option<Transport> {
        self.transport
    }

    /// A TCP packet's flags.
    pub const fn tcp_flags(&self) -> Option<TcpFlags> {
        self.tcp_flags
    }

    /// Whether the packet is a fragment (first or later).
    pub const fn is_fragmented(&self) -> bool {
        self.fragmented
    }

    /// For the first fragment of a fragmented TCP/UDP/SCTP datagram: the
    /// key its later fragments will carry. Record it with
    /// [`Dataplane::first_fragment`](crate::Dataplane::first_fragment).
    pub fn first_fragment(&self) -> Option<FragmentKey> {
        match self.kind {
            PacketKind::Flow(f) if self.first => Some(FragmentKey {
                src: f.src.ip(),
                dst: f.dst.ip(),
                id: self.frag_id,
                protocol: f.protocol,
            }),
            _ => None,
        }
    }

    /// How many VLAN tags the Ethernet frame carried.
    pub const fn vlan_tags(&self) -> u8 {
        self.vlan_tags
    }

    /// The outer offsets alone (IP header, transport header, end): what a
    /// rewrite of a flow reads, without building the inner layout.
    #[inline]
    pub(crate) const fn span(&self) -> (usize, usize, usize) {
        let o = &self.offsets;
        (o.l3 as usize, o.l4 as usize, o.end as usize)
    }

    /// The layer offsets.
    pub fn layout(&self) -> Layout {
        let o = &self.offsets;
        Layout {
            l3: o.l3 as usize,
            l4: o.l4 as usize,
            end: o.end as usize,
            inner: (o.inner != 0).then_some(InnerLayout {
                version: self.version,
                transport: o.inner_transport,
                l3: o.inner_l3 as usize,
                l4: o.inner_l4 as usize,
                complete: o.inner == 2,
            }),
        }
    }
}

fn truncated(layer: &'static str, e: &err::LenError) -> ParseError {
    ParseError::TruncatedHeader {
        layer,
        needed: e.required_len,
        got: e.len,
    }
}

fn need(layer: &'static str, seg: &[u8], needed: usize) -> Result<(), ParseError> {
    if seg.len() < needed {
        Err(ParseError::TruncatedHeader {
            layer,
            needed,
            got: seg.len(),
        })
    } else {
        Ok(())
    }
}

fn be16(s: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([s[at], s[at + 1]])
}

/// Parses a frame or packet.
///
/// # Errors
/// A [`ParseError`] naming the layer and what is wrong. No input panics.
#[inline]
pub fn parse(buf: &[u8], link: LinkType) -> Result<ParsedPacket, ParseError> {
    let (l3, ethertype, vlan_tags) = match link {
        LinkType::Ip => {
            let version = buf.first().map(|b| b >> 4);
            let ethertype = match version {
                Some(4) => ETH_IPV4,
                Some(6) => ETH_IPV6,
                Some(v) => {
                    return Err(ParseError::BadVersion {
                        layer: "ip",
                        version: v,
                    });
                }
                None => {
                    return Err(ParseError::TruncatedHeader {
                        layer: "ip",
                        needed: 1,
                        got: 0,
                    });
                }
            };
            (0, ethertype, 0)
        }
        LinkType::Ethernet => {
            let eth =
                Ethernet2HeaderSlice::from_slice(buf).map_err(|e| truncated("ethernet", &e))?;
            let mut off = eth.slice().len();
            let mut ethertype = eth.ether_type().0;
            let mut tags = 0u8;
            while ETH_VLAN.contains(&ethertype) {
                if tags == 2 {
                    return Err(ParseError::TooManyVlanTags);
                }
                let rest = buf.get(off..).unwrap_or(&[]);
                let vlan =
                    SingleVlanHeaderSlice::from_slice(rest).map_err(|e| truncated("vlan", &e))?;
                ethertype = vlan.ether_type().0;
                off += vlan.slice().len();
                tags += 1;
            }
            (off, ethertype, tags)
        }
    };
    // The result is built once, in place: the tag count goes down rather
    // than being patched into a copy here (a 112-byte copy, and the store
    // forwarding stalls of its unaligned halves, cost a third of the parse).
    match ethertype {
        ETH_IPV4 => parse_ipv4(buf, l3, vlan_tags),
        ETH_IPV6 => parse_ipv6(buf, l3, vlan_tags),
        other => Err(ParseError::UnsupportedEtherType { ethertype: other }),
    }
}

/// The fragment fields common to both families.
struct FragInfo {
    id: u32,
    offset: u16,
    more: bool,
}

#[inline]
fn parse_ipv4(buf: &[u8], l3: usize, vlan_tags: u8) -> Result<ParsedPacket, ParseError> {
    let s = buf.get(l3..).unwrap_or(&[]);
    // etherparse's `Ipv4HeaderSlice::from_slice` checks, in its order and
    // with its errors, read in place: the outer header is on every
    // packet's path, and the slice's construction and accessors cost a
    // fifth of a parse (the embedded header of an ICMP error still goes
    // through etherparse).
    if s.len() < 20 {
        return Err(ParseError::TruncatedHeader {
            layer: "ipv4",
            needed: 20,
            got: s.len(),
        });
    }
    let (version, ihl) = (s[0] >> 4, s[0] & 0xf);
    if version != 4 {
        return Err(ParseError::BadVersion {
            layer: "ipv4",
            version,
        });
    }
    if ihl < 5 {
        return Err(ParseError::BadIhl { layer: "ipv4", ihl });
    }
    let header_len = usize::from(ihl) * 4;
    if s.len() < header_len {
        return Err(ParseError::TruncatedHeader {
            layer: "ipv4",
            needed: header_len,
            got: s.len(),
        });
    }
    let total_len = be16(s, 2);
    if usize::from(total_len) < header_len {
        return Err(ParseError::BadTotalLength {
            total_len,
            header_len,
        });
    }
    if usize::from(total_len) > s.len() {
        return Err(ParseError::TruncatedDatagram {
            layer: "ipv4",
            needed: usize::from(total_len),
            got: s.len(),
        });
    }
    let flags_offset = be16(s, 6);
    let frag = FragInfo {
        id: u32::from(be16(s, 4)),
        offset: (flags_offset & 0x1fff).wrapping_mul(8),
        more: flags_offset & 0x2000 != 0,
    };
    let addrs = Addrs::V4(
        u32::from_be_bytes([s[12], s[13], s[14], s[15]]),
        u32::from_be_bytes([s[16], s[17], s[18], s[19]]),
    );
    classify(
        buf,
        IpVersion::V4,
        addrs,
        s[9],
        frag,
        l3,
        l3 + header_len,
        l3 + usize::from(total_len),
        vlan_tags,
    )
}

fn v4_error(layer: &'static str, e: err::ipv4::HeaderSliceError) -> ParseError {
    use err::ipv4::{HeaderError, HeaderSliceError};
    match e {
        HeaderSliceError::Len(e) => truncated(layer, &e),
        HeaderSliceError::Content(HeaderError::UnexpectedVersion { version_number }) => {
            ParseError::BadVersion {
                layer,
                version: version_number,
            }
        }
        HeaderSliceError::Content(HeaderError::HeaderLengthSmallerThanHeader { ihl }) => {
            ParseError::BadIhl { layer, ihl }
        }
    }
}

fn v6_error(layer: &'static str, e: err::ipv6::HeaderSliceError) -> ParseError {
    use err::ipv6::{HeaderError, HeaderSliceError};
    match e {
        HeaderSliceError::Len(e) => truncated(layer, &e),
        HeaderSliceError::Content(HeaderError::UnexpectedVersion { version_number }) => {
            ParseError::BadVersion {
                layer,
                version: version_number,
            }
        }
    }
}

/// Walks an IPv6 extension chain over `s`: the upper-layer protocol, the
/// bytes the chain takes, and the fragment header's fields if any.
fn v6_exts(
    layer: &'static str,
    next: u8,
    s: &[u8],
) -> Result<(u8, usize, Option<FragInfo>), ParseError> {
    use err::ipv6_exts::{HeaderError, HeaderSliceError};
    let (exts, proto, rest) = Ipv6ExtensionsSlice::from_slice(etherparse::IpNumber(next), s)
        .map_err(|e| match e {
            HeaderSliceError::Len(e) => truncated(
                if layer == "ipv6" {
                    "ipv6 extension"
                } else {
                    "icmp inner ipv6 extension"
                },
                &e,
            ),
            HeaderSliceError::Content(HeaderError::HopByHopNotAtStart) => {
                ParseError::BadExtensionHeader {
                    layer,
                    reason: "hop-by-hop options not directly after the ipv6 header",
                }
            }
            HeaderSliceError::Content(HeaderError::IpAuth(_)) => ParseError::BadExtensionHeader {
                layer,
                reason: "malformed authentication header",
            },
        })?;
    let used = s.len() - rest.len();
    let mut frag = None;
    for ext in exts {
        if let Ipv6ExtensionSlice::Fragment(f) = ext {
            let offset = f.fragment_offset().value().wrapping_mul(8);
            if offset != 0 || f.more_fragments() {
                frag = Some(FragInfo {
                    id: f.identification(),
                    offset,
                    more: f.more_fragments(),
                });
            }
        }
    }
    Ok((proto.0, used, frag))
}

#[inline]
fn parse_ipv6(buf: &[u8], l3: usize, vlan_tags: u8) -> Result<ParsedPacket, ParseError> {
    let s = buf.get(l3..).unwrap_or(&[]);
    let h = Ipv6HeaderSlice::from_slice(s).map_err(|e| v6_error("ipv6", e))?;
    let total = 40 + usize::from(h.payload_length());
    if total > s.len() {
        return Err(ParseError::TruncatedDatagram {
            layer: "ipv6",
            needed: total,
            got: s.len(),
        });
    }
    let (proto, used, frag) = v6_exts("ipv6", h.next_header().0, &s[40..total])?;
    let frag = frag.unwrap_or(FragInfo {
        id: 0,
        offset: 0,
        more: false,
    });
    classify(
        buf,
        IpVersion::V6,
        Addrs::V6(h.source_addr(), h.destination_addr()),
        proto,
        frag,
        l3,
        l3 + 40 + used,
        l3 + total,
        vlan_tags,
    )
}

fn service_protocol(proto: u8) -> Option<Protocol> {
    match proto {
        PROTO_TCP => Some(Protocol::Tcp),
        PROTO_UDP => Some(Protocol::Udp),
        PROTO_SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

fn icmp_number(version: IpVersion) -> u8 {
    match version {
        IpVersion::V4 => PROTO_ICMP,
        IpVersion::V6 => PROTO_ICMPV6,
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn classify(
    buf: &[u8],
    version: IpVersion,
    addrs: Addrs,
    proto: u8,
    frag: FragInfo,
    l3: usize,
    l4: usize,
    end: usize,
    vlan_tags: u8,
) -> Result<ParsedPacket, ParseError> {
    let layer = match version {
        IpVersion::V4 => "ipv4",
        IpVersion::V6 => "ipv6",
    };
    let fragmented = frag.offset != 0 || frag.more;
    let mut p = ParsedPacket {
        kind: PacketKind::Unroutable(Unroutable::IcmpFragment),
        version,
        ip_protocol: proto,
        transport: None,
        tcp_flags: None,
        fragmented,
        first: false,
        vlan_tags,
        frag_id: frag.id,
        offsets: Offsets::new(l3, l4, end),
    };
    let service = service_protocol(proto);
    let is_icmp = proto == icmp_number(version);
    if service.is_none() && !is_icmp {
        return Err(ParseError::UnsupportedProtocol {
            layer,
            protocol: proto,
        });
    }
    if frag.offset != 0 {
        p.kind = match service {
            Some(protocol) => PacketKind::Fragment(Fragment {
                id: frag.id,
                src: addrs.ip(false),
                dst: addrs.ip(true),
                protocol,
                offset: frag.offset,
                more: frag.more,
            }),
            None => PacketKind::Unroutable(Unroutable::IcmpFragment),
        };
        return Ok(p);
    }
    let seg = &buf[l4..end];
    let first = frag.more;
    let short = |protocol, needed| short_segment(seg.len(), first, protocol, needed);
    let ports = |seg: &[u8]| addrs.ports(seg);
    match service {
        Some(Protocol::Tcp) => {
            let needed = if seg.len() >= 13 {
                usize::from(seg[12] >> 4).max(5) * 4
            } else {
                20
            };
            if let Some(k) = short(Protocol::Tcp, needed)? {
                p.kind = k;
                return Ok(p);
            }
            // `TcpHeaderSlice::from_slice`'s one check left once the
            // length is known to cover the header (its others passed).
            let data_offset = seg[12] >> 4;
            if data_offset < 5 {
                return Err(ParseError::BadTcpDataOffset { data_offset });
            }
            let (s, d) = ports(seg);
            p.transport = Some(Transport::Tcp);
            p.tcp_flags = Some(TcpFlags::from_bits(seg[13]));
            p.kind = PacketKind::Flow(Flow::new(Protocol::Tcp, s, d));
        }
        Some(Protocol::Udp) => {
            if let Some(k) = short(Protocol::Udp, 8)? {
                p.kind = k;
                return Ok(p);
            }
            let length = be16(seg, 4);
            if length < 8 || (!fragmented && usize::from(length) > seg.len()) {
                return Err(ParseError::BadUdpLength {
                    length,
                    payload: seg.len(),
                });
            }
            let (s, d) = ports(seg);
            p.transport = Some(Transport::Udp);
            p.kind = PacketKind::Flow(Flow::new(Protocol::Udp, s, d));
        }
        Some(Protocol::Sctp) => {
            if let Some(k) = short(Protocol::Sctp, 12)? {
                p.kind = k;
                return Ok(p);
            }
            let (s, d) = ports(seg);
            p.transport = Some(Transport::Sctp);
            p.kind = PacketKind::Flow(Flow::new(Protocol::Sctp, s, d));
        }
        None => {
            let icmp_layer = match version {
                IpVersion::V4 => "icmp",
                IpVersion::V6 => "icmpv6",
            };
            need(icmp_layer, seg, 8)?;
            p.transport = Some(Transport::Icmp);
            let (icmp_type, code) = (seg[0], seg[1]);
            let kind = match (version, icmp_type) {
                (IpVersion::V4, 3) if code == 4 => Some(IcmpErrorKind::PacketTooBig),
                (IpVersion::V4, 3) | (IpVersion::V6, 1) => {
                    Some(IcmpErrorKind::DestinationUnreachable)
                }
                (IpVersion::V6, 2) => Some(IcmpErrorKind::PacketTooBig),
                (IpVersion::V4, 11) | (IpVersion::V6, 3) => Some(IcmpErrorKind::TimeExceeded),
                (IpVersion::V4, 12) | (IpVersion::V6, 4) => Some(IcmpErrorKind::ParameterProblem),
                _ => None,
            };
            p.kind = match kind {
                None => PacketKind::Unroutable(Unroutable::IcmpInformational { icmp_type, code }),
                Some(kind) => match parse_inner(buf, l4 + 8, end, version)? {
                    Ok((inner, lay)) => {
                        p.offsets.inner_l3 = lay.l3 as u32;
                        p.offsets.inner_l4 = lay.l4 as u32;
                        p.offsets.inner = 1 + u8::from(lay.complete);
                        p.offsets.inner_transport = lay.transport;
                        PacketKind::IcmpError {
                            error: IcmpError {
                                kind,
                                icmp_type,
                                code,
                            },
                            inner,
                        }
                    }
                    Err(why) => PacketKind::Unroutable(why),
                },
            };
            return Ok(p);
        }
    }
    p.first = first;
    Ok(p)
}

/// A transport segment shorter than its header: unroutable in a first
/// fragment (the rest is in later ones), an error otherwise. Functions
/// rather than closures in `classify`, so that they inline (a call that
/// returns a `PacketKind` through memory cost 7% of a parse).
#[inline(always)]
fn short_segment(
    got: usize,
    first: bool,
    protocol: Protocol,
    needed: usize,
) -> Result<Option<PacketKind>, ParseError> {
    if got >= needed {
        Ok(None)
    } else if first {
        Ok(Some(PacketKind::Unroutable(
            Unroutable::FirstFragmentTooShort { protocol, got },
        )))
    } else {
        Err(ParseError::TruncatedHeader {
            layer: protocol.as_lower_str(),
            needed,
            got,
        })
    }
}

/// A packet's source and destination addresses as read. Not `IpAddr`:
/// its IPv4 address sits at an odd offset behind a one-byte tag, and
/// building one and then a `SocketAddr` from it went through the stack
/// with loads that straddled two stores (store-forwarding stalls: 60% of
/// an IPv4/TCP parse in perf). A `SocketAddrV4` is built in registers.
#[derive(Clone, Copy)]
enum Addrs {
    V4(u32, u32),
    V6(Ipv6Addr, Ipv6Addr),
}

impl Addrs {
    fn ip(self, dst: bool) -> IpAddr {
        match (self, dst) {
            (Addrs::V4(s, _), false) => IpAddr::V4(Ipv4Addr::from_bits(s)),
            (Addrs::V4(_, d), true) => IpAddr::V4(Ipv4Addr::from_bits(d)),
            (Addrs::V6(s, _), false) => IpAddr::V6(s),
            (Addrs::V6(_, d), true) => IpAddr::V6(d),
        }
    }

    /// The source and destination of a segment whose ports lead it.
    #[inline(always)]
    fn ports(self, seg: &[u8]) -> (SocketAddr, SocketAddr) {
        let (sp, dp) = (be16(seg, 0), be16(seg, 2));
        match self {
            Addrs::V4(s, d) => (
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from_bits(s), sp)),
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from_bits(d), dp)),
            ),
            Addrs::V6(s, d) => (
                SocketAddr::V6(SocketAddrV6::new(s, sp, 0, 0)),
                SocketAddr::V6(SocketAddrV6::new(d, dp, 0, 0)),
            ),
        }
    }
}

type Inner = Result<(Flow, InnerLayout), Unroutable>;

/// Parses an ICMP error's embedded packet, which may be cut short after
/// its first 8 transport bytes.
fn parse_inner(buf: &[u8], l3: usize, end: usize, outer: IpVersion) -> Result<Inner, ParseError> {
    let s = &buf[l3.min(end)..end];
    let (src, dst, proto, frag_offset, l4, complete) = match outer {
        IpVersion::V4 => {
            let layer = "icmp inner ipv4";
            let h = Ipv4HeaderSlice::from_slice(s).map_err(|e| v4_error(layer, e))?;
            let hl = h.slice().len();
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                h.protocol().0,
                h.fragments_offset().value(),
                l3 + hl,
                // A first fragment's L4 checksum covers bytes it lacks.
                usize::from(h.total_len()) == s.len() && !h.more_fragments(),
            )
        }
        IpVersion::V6 => {
            let layer = "icmp inner ipv6";
            let h = Ipv6HeaderSlice::from_slice(s).map_err(|e| v6_error(layer, e))?;
            let (proto, used, frag) = v6_exts(layer, h.next_header().0, &s[40..])?;
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                proto,
                frag.as_ref().map_or(0, |f| f.offset),
                l3 + 40 + used,
                40 + usize::from(h.payload_length()) == s.len() && !frag.is_some_and(|f| f.more),
            )
        }
    };
    if frag_offset != 0 {
        return Ok(Err(Unroutable::IcmpErrorAboutFragment));
    }
    let Some(protocol) = service_protocol(proto) else {
        return Ok(Err(Unroutable::IcmpErrorNotAboutAFlow { protocol: proto }));
    };
    let seg = &buf[l4..end];
    need(
        match protocol {
            Protocol::Tcp => "icmp inner tcp",
            Protocol::Udp => "icmp inner udp",
            Protocol::Sctp => "icmp inner sctp",
        },
        seg,
        8,
    )?;
    let transport = match protocol {
        Protocol::Tcp => Transport::Tcp,
        Protocol::Udp => Transport::Udp,
        Protocol::Sctp => Transport::Sctp,
    };
    let flow = Flow::new(
        protocol,
        SocketAddr::new(src, be16(seg, 0)),
        SocketAddr::new(dst, be16(seg, 2)),
    );
    Ok(Ok((
        flow,
        InnerLayout {
            version: outer,
            transport,
            l3,
            l4,
            complete,
        },
    )))
}

/// The byte range of the source or destination address in an IP header
/// at `l3`.
pub(crate) const fn addr_range(version: IpVersion, l3: usize, dst: bool) -> (usize, usize) {
    match (version, dst) {
        (IpVersion::V4, false) => (l3 + 12, 4),
        (IpVersion::V4, true) => (l3 + 16, 4),
        (IpVersion::V6, false) => (l3 + 8, 16),
        (IpVersion::V6, true) => (l3 + 24, 16),
    }
}
