//! The Internet checksum (RFC 1071), its incremental update (RFC 1624), and
//! a from-scratch check of every checksum in a parsed packet.

use super::crc32c::sctp_checksum;
use super::error::ChecksumError;
use super::parse::{IpVersion, ParsedPacket, Transport};

/// The one's-complement sum of `data` as 16-bit big-endian words (an odd
/// last byte is padded with zero), not yet folded.
pub(crate) fn sum(data: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a sum to 16 bits with end-around carry.
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data`: the complement of its folded
/// one's-complement sum. Summing a region whose checksum field holds this
/// value gives `0xFFFF`.
///
/// # Examples
/// ```
/// // RFC 1071's example words.
/// let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
/// assert_eq!(svclb::packet::internet_checksum(&data), !0xddf2);
/// ```
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// The changes to a checksummed region, as RFC 1624 eqn. 3 adds them:
/// `HC' = ~(~HC + ~m + m')` for every 16-bit word `m` that became `m'`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Delta(u64);

impl Delta {
    /// Records that the even-length, word-aligned bytes `old` became `new`.
    pub(crate) fn change(&mut self, old: &[u8], new: &[u8]) {
        for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
            self.0 += u64::from(!u16::from_be_bytes([o[0], o[1]]));
            self.0 += u64::from(u16::from_be_bytes([n[0], n[1]]));
        }
    }

    /// Adds the changes another delta recorded.
    pub(crate) fn add(&mut self, other: Delta) {
        self.0 += other.0;
    }

    /// The checksum `old` updated by these changes.
    pub(crate) fn apply(self, old: u16) -> u16 {
        !fold(u64::from(!old) + self.0)
    }
}

/// The pseudo-header sum for TCP/UDP/ICMPv6 (RFC 793, RFC 8200 8.1).
fn pseudo_sum(buf: &[u8], p: &ParsedPacket, l4_len: usize) -> u64 {
    let l3 = p.layout().l3;
    let addrs = match p.version() {
        IpVersion::V4 => &buf[l3 + 12..l3 + 20],
        IpVersion::V6 => &buf[l3 + 8..l3 + 40],
    };
    sum(addrs) + u64::from(p.ip_protocol()) + l4_len as u64
}

fn stored(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn l4_expected(buf: &[u8], p: &ParsedPacket, csum_at: usize, pseudo: bool) -> u16 {
    let (l4, end) = (p.layout().l4, p.layout().end);
    let seg = &buf[l4..end];
    let mut acc = sum(seg) - u64::from(stored(buf, csum_at));
    if pseudo {
        acc += pseudo_sum(buf, p, seg.len());
    }
    !fold(acc)
}

/// Recomputes every checksum of a parsed, unfragmented packet from scratch
/// and compares it with the stored one: the IPv4 header checksum, the
/// TCP/UDP checksum with its pseudo-header, SCTP's CRC32c, and an ICMP
/// error's outer checksum. An ICMP error's embedded headers are checked
/// too: the inner IPv4 header checksum always, and the inner UDP or SCTP
/// checksum when the embedded datagram is complete. Later fragments check
/// only the IPv4 header; first fragments skip the L4 checksum (it covers
/// the whole datagram).
///
/// # Errors
/// [`ChecksumError`] names the first wrong checksum, what it holds and what
/// it should hold. A buffer shorter than the parsed layout reports
/// [`ChecksumError::BufferTooShort`].
pub fn verify_checksums(buf: &[u8], p: &ParsedPacket) -> Result<(), ChecksumError> {
    let lay = p.layout();
    if buf.len() < lay.end {
        return Err(ChecksumError::BufferTooShort {
            needed: lay.end,
            got: buf.len(),
        });
    }
    let check = |layer: &'static str, at: usize, expected: u16| {
        let found = stored(buf, at);
        if found == expected {
            Ok(())
        } else {
            Err(ChecksumError::Mismatch {
                layer,
                found: u32::from(found),
                expected: u32::from(expected),
            })
        }
    };
    if p.version() == IpVersion::V4 {
        let hdr = &buf[lay.l3..lay.l4];
        check(
            "ipv4",
            lay.l3 + 10,
            !fold(sum(hdr) - u64::from(stored(buf, lay.l3 + 10))),
        )?;
    }
    if p.is_fragmented() {
        return Ok(());
    }
    match p.transport() {
        Some(Transport::Tcp) => check("tcp", lay.l4 + 16, l4_expected(buf, p, lay.l4 + 16, true))?,
        Some(Transport::Udp) => {
            let found = stored(buf, lay.l4 + 6);
            if !(found == 0 && p.version() == IpVersion::V4) {
                let mut e = l4_expected(buf, p, lay.l4 + 6, true);
                if e == 0 {
                    e = 0xFFFF;
                }
                check("udp", lay.l4 + 6, e)?;
            }
        }
        Some(Transport::Sctp) => check_sctp(buf, "sctp", lay.l4, lay.end)?,
        Some(Transport::Icmp) => {
            let v6 = p.version() == IpVersion::V6;
            check(
                if v6 { "icmpv6" } else { "icmp" },
                lay.l4 + 2,
                l4_expected(buf, p, lay.l4 + 2, v6),
            )?;
            if let Some(inner) = lay.inner {
                if inner.version == IpVersion::V4 {
                    let hdr = &buf[inner.l3..inner.l4];
                    check(
                        "icmp inner ipv4",
                        inner.l3 + 10,
                        !fold(sum(hdr) - u64::from(stored(buf, inner.l3 + 10))),
                    )?;
                }
                if inner.complete {
                    match inner.transport {
                        Transport::Sctp => check_sctp(buf, "icmp inner sctp", inner.l4, lay.end)?,
                        Transport::Udp => {
                            let at = inner.l4 + 6;
                            let found = stored(buf, at);
                            if !(found == 0 && inner.version == IpVersion::V4) {
                                let (a, b) = match inner.version {
                                    IpVersion::V4 => (inner.l3 + 12, inner.l3 + 20),
                                    IpVersion::V6 => (inner.l3 + 8, inner.l3 + 40),
                                };
                                let seg = &buf[inner.l4..lay.end];
                                let acc = sum(seg) - u64::from(found)
                                    + sum(&buf[a..b])
                                    + 17
                                    + seg.len() as u64;
                                let mut e = !fold(acc);
                                if e == 0 {
                                    e = 0xFFFF;
                                }
                                check("icmp inner udp", at, e)?;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        None => {}
    }
    Ok(())
}

fn check_sctp(buf: &[u8], layer: &'static str, l4: usize, end: usize) -> Result<(), ChecksumError> {
    let seg = &buf[l4..end];
    let expected = sctp_checksum(seg);
    let found = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
    if found == expected {
        Ok(())
    } else {
        Err(ChecksumError::Mismatch {
            layer,
            found,
            expected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1624_example() {
        // RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285.
        let mut d = Delta::default();
        d.change(&[0x55, 0x55], &[0x32, 0x85]);
        assert_eq!(d.apply(0xDD2F), 0x0000);
    }

    #[test]
    fn incremental_equals_full() {
        let mut data = [
            0x45u8, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 172, 16, 10, 99, 172, 16, 10, 12,
        ];
        let c = internet_checksum(&data);
        data[10..12].copy_from_slice(&c.to_be_bytes());
        let mut d = Delta::default();
        d.change(&data[16..20], &[10, 1, 2, 3]);
        data[16..20].copy_from_slice(&[10, 1, 2, 3]);
        let inc = d.apply(c);
        data[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(inc, internet_checksum(&data));
    }
}
