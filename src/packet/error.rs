//! The packet module's errors: what is wrong with a packet, why a rewrite
//! cannot be done, which checksum is off, and an exhausted port range.

use std::net::{IpAddr, SocketAddr};

use super::parse::{IpVersion, Unroutable};
use crate::Protocol;

/// Why a packet could not be parsed. Each variant names the layer and the
/// offending value.
///
/// # Examples
/// ```
/// use svclb::packet::{parse, LinkType, ParseError};
/// let err = parse(&[0x45, 0, 0], LinkType::Ip).unwrap_err();
/// assert_eq!(err, ParseError::TruncatedHeader { layer: "ipv4", needed: 20, got: 3 });
/// assert_eq!(err.to_string(), "truncated ipv4 header: needed 20 bytes, got 3");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// A header is cut short.
    #[error("truncated {layer} header: needed {needed} bytes, got {got}")]
    TruncatedHeader {
        /// The header: `ethernet`, `vlan`, `ipv4`, `ipv6`, `ipv6 extension`,
        /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`, or `icmp inner ...`.
        layer: &'static str,
        /// Bytes the header needs.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// The IP header's length field claims more bytes than the buffer holds.
    #[error("truncated {layer} datagram: its header says {needed} bytes, the buffer has {got}")]
    TruncatedDatagram {
        /// `ipv4` or `ipv6`.
        layer: &'static str,
        /// The datagram length from the header.
        needed: usize,
        /// Bytes present from the IP header on.
        got: usize,
    },
    /// An IPv4 header length (IHL) below 5 words.
    #[error("bad {layer} header length (IHL) {ihl}: must be at least 5")]
    BadIhl {
        /// `ipv4` or `icmp inner ipv4`.
        layer: &'static str,
        /// The IHL found.
        ihl: u8,
    },
    /// An IPv4 total length shorter than its own header.
    #[error("bad ipv4 total length {total_len}: shorter than its {header_len}-byte header")]
    BadTotalLength {
        /// The total length found.
        total_len: u16,
        /// The header length from the IHL.
        header_len: usize,
    },
    /// An IP version that is not the one expected (4 or 6, or the outer
    /// family inside an ICMP error).
    #[error("bad IP version {version} in the {layer} header")]
    BadVersion {
        /// `ip`, `ipv4`, `ipv6`, `icmp inner ipv4` or `icmp inner ipv6`.
        layer: &'static str,
        /// The version nibble found.
        version: u8,
    },
    /// A TCP data offset below 5 words.
    #[error("bad tcp data offset {data_offset}: must be at least 5")]
    BadTcpDataOffset {
        /// The data offset found.
        data_offset: u8,
    },
    /// A UDP length below 8 or beyond the IP payload.
    #[error("bad udp length {length}: the ip payload is {payload} bytes")]
    BadUdpLength {
        /// The UDP length field.
        length: u16,
        /// The IP payload length.
        payload: usize,
    },
    /// A malformed IPv6 extension header chain.
    #[error("bad {layer} extension header chain: {reason}")]
    BadExtensionHeader {
        /// `ipv6` or `icmp inner ipv6`.
        layer: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// An EtherType that carries neither IPv4 nor IPv6 (nor a VLAN tag).
    #[error("unsupported ethertype {ethertype:#06x}")]
    UnsupportedEtherType {
        /// The EtherType found.
        ethertype: u16,
    },
    /// More than two VLAN tags (802.1Q inside 802.1ad is the most handled).
    #[error("more than 2 VLAN tags")]
    TooManyVlanTags,
    /// An IP protocol that is none of TCP, UDP, SCTP, ICMP, ICMPv6.
    #[error("unsupported IP protocol {protocol} in the {layer} header")]
    UnsupportedProtocol {
        /// `ipv4`, `ipv6`, or `icmp inner ipv4|ipv6`.
        layer: &'static str,
        /// The protocol number.
        protocol: u8,
    },
}

/// Why a rewrite was refused. The buffer is left untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RewriteError {
    /// The new address is of the other IP family than the packet.
    #[error("cannot write {new} into an {packet} packet")]
    FamilyMismatch {
        /// The packet's family.
        packet: IpVersion,
        /// The address asked for.
        new: SocketAddr,
    },
    /// The buffer is shorter than the packet that was parsed.
    #[error("buffer too short: the parsed packet needs {needed} bytes, the buffer has {got}")]
    BufferTooShort {
        /// The parsed packet's end.
        needed: usize,
        /// The buffer's length.
        got: usize,
    },
    /// The packet carries no flow to rewrite.
    #[error("packet not rewritable: {0}")]
    NotRewritable(Unroutable),
    /// The first fragment of an SCTP packet: its CRC32c covers the whole
    /// datagram, which this fragment does not hold.
    #[error("cannot rewrite an sctp first fragment: its crc32c covers bytes not in this fragment")]
    FragmentedSctp,
}

/// A checksum found wrong by [`verify_checksums`](super::verify_checksums).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChecksumError {
    /// A stored checksum differs from the one computed from scratch.
    #[error("{layer} checksum {found:#x} should be {expected:#x}")]
    Mismatch {
        /// `ipv4`, `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`, `icmp inner ...`.
        layer: &'static str,
        /// The stored value.
        found: u32,
        /// The value computed from scratch.
        expected: u32,
    },
    /// The buffer is shorter than the packet that was parsed.
    #[error("buffer too short: the parsed packet needs {needed} bytes, the buffer has {got}")]
    BufferTooShort {
        /// The parsed packet's end.
        needed: usize,
        /// The buffer's length.
        got: usize,
    },
}

/// Every source port of the range is in use for this backend and SNAT
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no free {protocol} source port in {first}..={last} from {snat_ip} to {backend}")]
pub struct Exhausted {
    /// The protocol.
    pub protocol: Protocol,
    /// The backend the connections go to.
    pub backend: SocketAddr,
    /// The source address the ports belong to.
    pub snat_ip: IpAddr,
    /// The range's first port.
    pub first: u16,
    /// The range's last port.
    pub last: u16,
}

/// Why [`port_unreachable`](super::port_unreachable) wrote no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RejectError {
    /// The kernel sends no ICMP error about this packet.
    #[error("no ICMP error answers {0}")]
    NotAnswered(&'static str),
    /// The buffer is shorter than the packet that was parsed.
    #[error("buffer too short: the parsed packet needs {needed} bytes, the buffer has {got}")]
    BufferTooShort {
        /// The parsed packet's end.
        needed: usize,
        /// The buffer's length.
        got: usize,
    },
    /// The output buffer cannot hold the answer.
    #[error("output too short: the answer needs {needed} bytes, the buffer has {got}")]
    OutputTooShort {
        /// The answer's length.
        needed: usize,
        /// The output buffer's length.
        got: usize,
    },
}
