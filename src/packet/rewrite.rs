//! In-place rewrites with incremental checksum updates (RFC 1624): DNAT,
//! SNAT, and reverse NAT of replies and of ICMP errors about them.

use std::net::{IpAddr, SocketAddr};

use super::checksum::Delta;
use super::crc32c::sctp_checksum;
use super::error::RewriteError;
use super::parse::{InnerLayout, IpVersion, PacketKind, ParsedPacket, Transport, addr_range};
use crate::Flow;

/// Rewrites the destination address and port to `new` (DNAT; for a reply
/// under full NAT, back to the client).
///
/// Updates the IPv4 header checksum and the TCP/UDP checksum (with its
/// pseudo-header) incrementally, and recomputes SCTP's CRC32c. A UDP
/// checksum of 0 (none) stays 0; an updated one that comes to 0 is written
/// 0xFFFF.
///
/// - A later fragment gets its address only: its ports and L4 checksum
///   live in the first fragment, whose rewrite covers the pseudo-header.
/// - An ICMP error gets its outer destination address set to `new`'s
///   address and its embedded packet's *source* set to `new`, with the
///   embedded checksums and the outer ICMP checksum updated, as Linux's
///   `nf_nat_icmp_reply_translation` does.
///
/// `parsed` must come from [`parse`](super::parse) of this buffer; it
/// stays valid (offsets do not move), but its flow is the one parsed.
///
/// # Errors
/// [`RewriteError`]: a family mismatch, a buffer shorter than the parsed
/// packet, a packet with no flow, or an SCTP first fragment. The buffer is
/// untouched then.
///
/// # Examples
/// ```
/// use svclb::packet::{internet_checksum, parse, rewrite_dst, verify_checksums, LinkType};
/// let mut p = vec![0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 10, 1, 0, 5, 10, 96, 0, 10];
/// let c = internet_checksum(&p);
/// p[10..12].copy_from_slice(&c.to_be_bytes());
/// p.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]); // UDP, no checksum
/// let parsed = parse(&p, LinkType::Ip)?;
/// verify_checksums(&p, &parsed)?;
/// rewrite_dst(&mut p, &parsed, "10.1.2.3:5353".parse()?)?;
/// let after = parse(&p, LinkType::Ip)?;
/// assert_eq!(after.flow().unwrap().dst, "10.1.2.3:5353".parse()?);
/// verify_checksums(&p, &after)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn rewrite_dst(
    buf: &mut [u8],
    parsed: &ParsedPacket,
    new: SocketAddr,
) -> Result<(), RewriteError> {
    rewrite(buf, parsed, new, true)
}

/// Rewrites the source address and port to `new` (SNAT under full NAT;
/// reverse NAT of a reply, back to the frontend).
///
/// The checksum rules are [`rewrite_dst`]'s. An ICMP error gets its outer
/// *source* address set to `new`'s address and its embedded packet's
/// destination set to `new`: this is the reverse NAT of an error a backend
/// sent about a reply (its embedded packet is the client's packet as the
/// backend received it).
///
/// # Errors
/// As [`rewrite_dst`].
pub fn rewrite_src(
    buf: &mut [u8],
    parsed: &ParsedPacket,
    new: SocketAddr,
) -> Result<(), RewriteError> {
    rewrite(buf, parsed, new, false)
}

/// Reverse NAT of a packet going back to a client: a reply from the
/// backend, or an ICMP error about the client's flow.
///
/// `original` is the client's flow as it arrived (client -> frontend);
/// the reply's source becomes `original.dst` (the frontend) and, under
/// full NAT (`full_nat`), its destination becomes `original.src` (the
/// client). The connection layer finds `original` by the reply's
/// 5-tuple.
///
/// # Errors
/// As [`rewrite_dst`].
///
/// # Examples
/// ```
/// use svclb::Flow;
/// use svclb::packet::{parse, reverse_nat, LinkType};
/// let original = Flow::udp("10.2.0.9:40000".parse()?, "10.96.0.10:53".parse()?);
/// // The backend's reply, 10.1.0.5:5353 -> 10.2.0.9:40000 (DNAT only).
/// let mut p = vec![0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 10, 1, 0, 5, 10, 2, 0, 9];
/// p.extend_from_slice(&[0x14, 0xe9, 0x9c, 0x40, 0, 8, 0, 0]);
/// let parsed = parse(&p, LinkType::Ip)?;
/// reverse_nat(&mut p, &parsed, &original, false)?;
/// assert_eq!(parse(&p, LinkType::Ip)?.flow().unwrap().src, original.dst);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn reverse_nat(
    buf: &mut [u8],
    parsed: &ParsedPacket,
    original: &Flow,
    full_nat: bool,
) -> Result<(), RewriteError> {
    check(buf, parsed, original.dst)?;
    check(buf, parsed, original.src)?;
    rewrite_src(buf, parsed, original.dst)?;
    if full_nat {
        rewrite_dst(buf, parsed, original.src)?;
    }
    Ok(())
}

/// The checks every rewrite makes before it writes a byte.
fn check(buf: &[u8], p: &ParsedPacket, new: SocketAddr) -> Result<(), RewriteError> {
    let family = if new.is_ipv4() {
        IpVersion::V4
    } else {
        IpVersion::V6
    };
    if family != p.version() {
        return Err(RewriteError::FamilyMismatch {
            packet: p.version(),
            new,
        });
    }
    let (_, _, end) = p.span();
    if buf.len() < end {
        return Err(RewriteError::BufferTooShort {
            needed: end,
            got: buf.len(),
        });
    }
    match p.kind() {
        PacketKind::Unroutable(why) => Err(RewriteError::NotRewritable(*why)),
        PacketKind::Flow(f) if p.is_fragmented() && f.protocol == crate::Protocol::Sctp => {
            Err(RewriteError::FragmentedSctp)
        }
        _ => Ok(()),
    }
}

fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

/// Writes `new` at `at`, recording the change in `deltas`.
fn put(buf: &mut [u8], at: usize, new: &[u8], deltas: &mut [&mut Delta]) {
    let field = &mut buf[at..at + new.len()];
    for d in deltas.iter_mut() {
        d.change(field, new);
    }
    field.copy_from_slice(new);
}

/// Applies `delta` to the 16-bit checksum at `at`, recording the change of
/// the checksum field itself in `outer` (for a checksum that covers it).
fn fix(buf: &mut [u8], at: usize, delta: Delta, zero_means_none: bool, outer: Option<&mut Delta>) {
    let old = be16(buf, at);
    if zero_means_none && old == 0 {
        return;
    }
    let mut new = delta.apply(old);
    if zero_means_none && new == 0 {
        new = 0xFFFF;
    }
    let bytes = new.to_be_bytes();
    match outer {
        Some(o) => put(buf, at, &bytes, &mut [o]),
        None => buf[at..at + 2].copy_from_slice(&bytes),
    }
}

fn rewrite(
    buf: &mut [u8],
    p: &ParsedPacket,
    new: SocketAddr,
    dst: bool,
) -> Result<(), RewriteError> {
    check(buf, p, new)?;
    // The address as a fixed-size array: every copy and checksum word
    // below then has a length the compiler knows (no memcpy call, the
    // sums unrolled).
    match new.ip() {
        IpAddr::V4(a) => rewrite_with(buf, p, new, a.octets(), dst),
        IpAddr::V6(a) => rewrite_with(buf, p, new, a.octets(), dst),
    }
    Ok(())
}

#[inline(always)]
fn rewrite_with<const N: usize>(
    buf: &mut [u8],
    p: &ParsedPacket,
    new: SocketAddr,
    ip: [u8; N],
    dst: bool,
) {
    // Only an ICMP error needs the inner layout; a flow reads the three
    // outer offsets (building the whole layout read the parse result's
    // inner offsets with loads that stalled on the parse's stores).
    let (l3, l4, end) = p.span();
    let ip = &ip[..];
    let v4 = p.version() == IpVersion::V4;

    // The outer address, and the IPv4 header checksum over it.
    let (at, _) = addr_range(p.version(), l3, dst);
    let mut addr = Delta::default();
    put(buf, at, ip, &mut [&mut addr]);
    if v4 {
        fix(buf, l3 + 10, addr, false, None);
    }

    match p.kind() {
        PacketKind::Fragment(_) => {}
        PacketKind::Flow(_) => {
            let port_at = l4 + if dst { 2 } else { 0 };
            let mut seg = addr;
            match p.transport() {
                Some(Transport::Tcp) => {
                    put(buf, port_at, &new.port().to_be_bytes(), &mut [&mut seg]);
                    fix(buf, l4 + 16, seg, false, None);
                }
                Some(Transport::Udp) => {
                    put(buf, port_at, &new.port().to_be_bytes(), &mut [&mut seg]);
                    fix(buf, l4 + 6, seg, true, None);
                }
                Some(Transport::Sctp) => {
                    buf[port_at..port_at + 2].copy_from_slice(&new.port().to_be_bytes());
                    let crc = sctp_checksum(&buf[l4..end]);
                    buf[l4 + 8..l4 + 12].copy_from_slice(&crc.to_le_bytes());
                }
                Some(Transport::Icmp) | None => {}
            }
        }
        PacketKind::IcmpError { .. } => {
            let Some(inner) = p.layout().inner else {
                return;
            };
            // Everything written inside the ICMP message, for its checksum.
            let mut icmp = Delta::default();
            if !v4 {
                // ICMPv6's checksum covers the pseudo-header.
                icmp.add(addr);
            }
            rewrite_inner(buf, &inner, end, new, ip, !dst, &mut icmp);
            fix(buf, l4 + 2, icmp, false, None);
        }
        PacketKind::Unroutable(_) => {}
    }
}

/// Rewrites the embedded packet's source (`dst == false`) or destination
/// to `new`, recording every changed word in `icmp`.
fn rewrite_inner(
    buf: &mut [u8],
    inner: &InnerLayout,
    end: usize,
    new: SocketAddr,
    ip: &[u8],
    dst: bool,
    icmp: &mut Delta,
) {
    let (at, _) = addr_range(inner.version, inner.l3, dst);
    let mut addr = Delta::default();
    put(buf, at, ip, &mut [&mut addr, &mut *icmp]);
    if inner.version == IpVersion::V4 {
        fix(buf, inner.l3 + 10, addr, false, Some(&mut *icmp));
    }
    let port_at = inner.l4 + if dst { 2 } else { 0 };
    let mut l4 = addr;
    put(
        buf,
        port_at,
        &new.port().to_be_bytes(),
        &mut [&mut l4, &mut *icmp],
    );
    match inner.transport {
        // The embedded TCP checksum is only there if 18 bytes were carried
        // (Linux's tcp_manip_pkt skips it too when they were not).
        Transport::Tcp if inner.l4 + 18 <= end => fix(buf, inner.l4 + 16, l4, false, Some(icmp)),
        Transport::Udp => fix(buf, inner.l4 + 6, l4, true, Some(icmp)),
        // As Linux's sctp_manip_pkt: the CRC32c over what is embedded.
        Transport::Sctp if inner.l4 + 12 <= end => {
            let crc = sctp_checksum(&buf[inner.l4..end]).to_le_bytes();
            put(buf, inner.l4 + 8, &crc, &mut [icmp]);
        }
        _ => {}
    }
}
