//! The TCP flags the connection layer reads: SYN, ACK, FIN, RST.

use core::fmt;
use core::ops::BitOr;

/// The TCP control bits a connection tracker needs (SYN, ACK, FIN, RST),
/// in their wire positions (FIN = 0x01, SYN = 0x02, RST = 0x04,
/// ACK = 0x10), so that [`TcpFlags::bits`] converts to any other type that
/// uses the same bits.
///
/// # Examples
/// ```
/// use svclb::packet::TcpFlags;
/// let f = TcpFlags::SYN | TcpFlags::ACK;
/// assert!(f.contains(TcpFlags::SYN) && !f.contains(TcpFlags::FIN));
/// assert_eq!(f.bits(), 0x12);
/// // PSH (0x08) is not kept.
/// assert_eq!(TcpFlags::from_bits_truncate(0x18), TcpFlags::ACK);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(u8);

impl TcpFlags {
    /// FIN: the sender has finished sending.
    pub const FIN: TcpFlags = TcpFlags(0x01);
    /// SYN: opens a connection.
    pub const SYN: TcpFlags = TcpFlags(0x02);
    /// RST: aborts a connection.
    pub const RST: TcpFlags = TcpFlags(0x04);
    /// ACK: the acknowledgment number is valid.
    pub const ACK: TcpFlags = TcpFlags(0x10);
    /// The four bits this type keeps.
    const KNOWN: u8 = 0x17;

    /// No flag set.
    pub const fn empty() -> Self {
        TcpFlags(0)
    }

    /// The flags among `bits` (the TCP header's 13th byte) that this type
    /// keeps; the others (PSH, URG, ECE, CWR) are dropped.
    pub const fn from_bits_truncate(bits: u8) -> Self {
        TcpFlags(bits & Self::KNOWN)
    }

    /// The flags as their wire bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every flag of `other` is set in `self`.
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TcpFlags(")?;
        let mut first = true;
        for (flag, name) in [
            (TcpFlags::SYN, "SYN"),
            (TcpFlags::ACK, "ACK"),
            (TcpFlags::FIN, "FIN"),
            (TcpFlags::RST, "RST"),
        ] {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        f.write_str(")")
    }
}
