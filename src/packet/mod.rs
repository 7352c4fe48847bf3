//! The packet path (feature `packet`): raw packets into [`Flow`](crate::Flow)s,
//! and DNAT, SNAT and reverse NAT in place with incremental checksums.
//!
//! 1. [`parse`] a frame ([`LinkType::Ethernet`], with up to two VLAN
//!    tags) or a bare IP packet ([`LinkType::Ip`]): IPv4 or IPv6 (hop-by-hop,
//!    routing, destination-options, fragment and authentication headers
//!    skipped), then TCP, UDP, SCTP or ICMP/ICMPv6. The [`ParsedPacket`]
//!    says what it is ([`PacketKind`]: a flow, an ICMP error with its
//!    embedded flow, a later fragment, or why it is unroutable), its
//!    [`TcpFlags`], and its [`Layout`]. Malformed input gets a typed
//!    [`ParseError`]; no input panics.
//! 2. Route the flow (a [`Dataplane`](crate::Dataplane)), then
//!    [`rewrite_dst`] (DNAT) and, for full NAT, [`rewrite_src`] with a
//!    port from a [`SourcePortAllocator`]. Replies go back through
//!    [`reverse_nat`]. Checksums are updated incrementally (RFC 1624):
//!    the IPv4 header, TCP and UDP with their pseudo-headers (UDP's "no
//!    checksum" 0 kept), SCTP's CRC32c recomputed; ICMP errors get their
//!    embedded headers translated as Linux's NAT does.
//! 3. Later IPv4/IPv6 fragments carry no ports: they are matched to
//!    their datagram through the connection layer. Record a first
//!    fragment's [`ParsedPacket::first_fragment`] key with
//!    [`Dataplane::first_fragment`](crate::Dataplane::first_fragment) once
//!    its connection is tracked; a later fragment's
//!    [`Fragment::key`] finds that connection (and its backend) with
//!    [`Dataplane::later_fragment`](crate::Dataplane::later_fragment), or
//!    it is unroutable.
//!
//! A packet to a rejected service gets [`port_unreachable`]: the ICMP
//! answer kube-proxy's REJECT sends.
//!
//! [`verify_checksums`] recomputes every checksum from scratch, for tests
//! and for callers that must check what they receive.
//!
//! Header validation is etherparse's (zero-copy header slices); the
//! checksums, the CRC32c and the NAT logic are this module's.
//!
//! # Examples
//! ```
//! use svclb::packet::{internet_checksum, parse, rewrite_dst, verify_checksums, LinkType};
//! // IPv4 + TCP SYN, 10.1.0.5:40000 -> 10.96.0.10:80.
//! let mut p = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 1, 0, 5, 10, 96, 0, 10];
//! p.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
//! let ip = internet_checksum(&p[..20]);
//! p[10..12].copy_from_slice(&ip.to_be_bytes());
//! let mut pseudo = p[12..20].to_vec(); // addresses, protocol, TCP length, segment
//! pseudo.extend_from_slice(&[0, 6, 0, 20]);
//! pseudo.extend_from_slice(&p[20..]);
//! let tcp = internet_checksum(&pseudo);
//! p[36..38].copy_from_slice(&tcp.to_be_bytes());
//! let parsed = parse(&p, LinkType::Ip)?;
//! verify_checksums(&p, &parsed)?;
//! rewrite_dst(&mut p, &parsed, "10.1.7.7:8080".parse()?)?;
//! let after = parse(&p, LinkType::Ip)?;
//! assert_eq!(after.flow().unwrap().dst, "10.1.7.7:8080".parse()?);
//! verify_checksums(&p, &after)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod checksum;
mod crc32c;
mod error;
mod parse;
mod ports;
mod reject;
mod rewrite;

/// The TCP flags of a parsed packet: the connection tracker's own type, so
/// a parsed packet's flags go straight to [`Dataplane::packet`](crate::Dataplane::packet).
pub use crate::conntrack::TcpFlags;
/// The identity of a fragmented datagram (also at the crate root).
pub use crate::model::flow::FragmentKey;
pub use checksum::{internet_checksum, verify_checksums};
pub use crc32c::{crc32c, sctp_checksum};
pub use error::{ChecksumError, Exhausted, ParseError, RejectError, RewriteError};
pub use parse::{
    Fragment, IcmpError, IcmpErrorKind, InnerLayout, IpVersion, Layout, LinkType, PacketKind,
    ParsedPacket, Transport, Unroutable, parse,
};
pub use ports::{DEFAULT_PORT_RANGE, SourcePortAllocator};
pub use reject::{ICMP_ERROR_MAX_V4, ICMP_ERROR_MAX_V6, port_unreachable};
pub use rewrite::{reverse_nat, rewrite_dst, rewrite_src};
