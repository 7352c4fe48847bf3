//! Connection states and the state machines that move them: IPVS's TCP
//! table, a UDP "replied" bit and a simplified SCTP handshake.

use core::fmt;
use core::ops::{BitAnd, BitOr, BitOrAssign};
use core::str::FromStr;

use thiserror::Error;

/// The TCP flags a state machine looks at (a subset of the TCP header's).
///
/// Parsed from and printed as comma-joined lower-case names (`"syn,ack"`);
/// parsing accepts any case. The empty set prints as `none`.
///
/// # Examples
/// ```
/// use svclb::conntrack::TcpFlags;
/// let f: TcpFlags = "SYN,ack".parse()?;
/// assert_eq!(f, TcpFlags::SYN | TcpFlags::ACK);
/// assert_eq!(f.to_string(), "syn,ack");
/// assert!(f.contains(TcpFlags::SYN));
/// assert_eq!(TcpFlags::default(), TcpFlags::ACK);
/// assert!("syn,psh".parse::<TcpFlags>().is_err());
/// # Ok::<(), svclb::conntrack::ParseTcpFlagsError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpFlags(u8);

impl TcpFlags {
    /// No flags (IPVS moves such a packet's connection to CLOSE).
    pub const NONE: TcpFlags = TcpFlags(0);
    /// FIN.
    pub const FIN: TcpFlags = TcpFlags(0x01);
    /// SYN.
    pub const SYN: TcpFlags = TcpFlags(0x02);
    /// RST.
    pub const RST: TcpFlags = TcpFlags(0x04);
    /// ACK.
    pub const ACK: TcpFlags = TcpFlags(0x10);

    /// The flags from the TCP header's flag byte (other bits are dropped).
    pub const fn from_bits(bits: u8) -> TcpFlags {
        TcpFlags(bits & 0x17)
    }

    /// The flags as TCP header bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// IPVS's `tcp_state_idx`: the table row, by priority RST > SYN > FIN >
    /// ACK; `None` when no flag is set.
    #[inline]
    pub(crate) const fn row(self) -> Option<usize> {
        if self.0 & Self::RST.0 != 0 {
            Some(3)
        } else if self.0 & Self::SYN.0 != 0 {
            Some(0)
        } else if self.0 & Self::FIN.0 != 0 {
            Some(1)
        } else if self.0 & Self::ACK.0 != 0 {
            Some(2)
        } else {
            None
        }
    }
}

impl Default for TcpFlags {
    /// [`TcpFlags::ACK`]: a packet of an established stream.
    fn default() -> Self {
        TcpFlags::ACK
    }
}

impl BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for TcpFlags {
    fn bitor_assign(&mut self, rhs: TcpFlags) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for TcpFlags {
    type Output = TcpFlags;
    fn bitand(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 & rhs.0)
    }
}

const FLAG_NAMES: [(TcpFlags, &str); 4] = [
    (TcpFlags::SYN, "syn"),
    (TcpFlags::ACK, "ack"),
    (TcpFlags::FIN, "fin"),
    (TcpFlags::RST, "rst"),
];

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        for (flag, name) in FLAG_NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TcpFlags({self})")
    }
}

/// A TCP flag list that does not parse.
///
/// # Examples
/// ```
/// use svclb::conntrack::{ParseTcpFlagsError, TcpFlags};
/// let err = "syn,urg".parse::<TcpFlags>().unwrap_err();
/// assert_eq!(err, ParseTcpFlagsError::UnknownFlag { flag: "urg".into() });
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ParseTcpFlagsError {
    /// A name that is not one of `syn`, `ack`, `fin`, `rst` (or `none` alone).
    #[error("unknown TCP flag {flag:?} (expected syn, ack, fin, rst or none)")]
    UnknownFlag {
        /// The offending name, as given.
        flag: String,
    },
}

impl FromStr for TcpFlags {
    type Err = ParseTcpFlagsError;

    /// Comma-joined flag names in any case (`"SYN,ACK"`); `"none"` or the
    /// empty string is the empty set. Spaces around names are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            return Ok(TcpFlags::NONE);
        }
        let mut flags = TcpFlags::NONE;
        for part in s.split(',') {
            let name = part.trim();
            match FLAG_NAMES
                .iter()
                .find(|(_, n)| name.eq_ignore_ascii_case(n))
            {
                Some((flag, _)) => flags |= *flag,
                None => {
                    return Err(ParseTcpFlagsError::UnknownFlag { flag: name.into() });
                }
            }
        }
        Ok(flags)
    }
}

/// Which way a packet travels relative to the connection's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to frontend (IPVS's input direction).
    Original,
    /// Backend to client (IPVS's output direction).
    Reply,
}

/// An IPVS TCP connection state (`IP_VS_TCP_S_*`, in the kernel's order).
///
/// `Display` prints the name as `ipvsadm -lnc` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TcpState {
    /// `NONE`: no packet seen yet.
    None,
    /// `ESTABLISHED`: the only state IPVS counts as active.
    Established,
    /// `SYN_SENT`.
    SynSent,
    /// `SYN_RECV`: a client's SYN seen (the state of a new connection).
    SynRecv,
    /// `FIN_WAIT`.
    FinWait,
    /// `TIME_WAIT`.
    TimeWait,
    /// `CLOSE`.
    Close,
    /// `CLOSE_WAIT`.
    CloseWait,
    /// `LAST_ACK`.
    LastAck,
    /// `LISTEN`.
    Listen,
    /// `SYNACK`.
    SynAck,
}

impl TcpState {
    /// Every state, in the kernel's order (the table's column order).
    pub const ALL: [TcpState; 11] = [
        TcpState::None,
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::SynAck,
    ];

    /// The name `ipvsadm -lnc` prints.
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::SynAck => "SYNACK",
        }
    }

    /// The state after a packet with `flags` travelling in `direction`,
    /// by IPVS's `tcp_states` table (the NAT table: input rows for
    /// [`Direction::Original`], output rows for [`Direction::Reply`]).
    /// A packet without SYN, FIN, ACK or RST moves to CLOSE, as
    /// `set_tcp_state` does.
    ///
    /// # Examples
    /// ```
    /// use svclb::conntrack::{Direction, TcpFlags, TcpState};
    /// let s = TcpState::None.next(Direction::Original, TcpFlags::SYN);
    /// assert_eq!(s, TcpState::SynRecv);
    /// assert_eq!(s.next(Direction::Original, TcpFlags::ACK), TcpState::Established);
    /// ```
    pub fn next(self, direction: Direction, flags: TcpFlags) -> TcpState {
        let Some(row) = flags.row() else {
            return TcpState::Close;
        };
        let table = match direction {
            Direction::Original => &TCP_INPUT,
            Direction::Reply => &TCP_OUTPUT,
        };
        table[row][self as usize]
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

use TcpState::{
    Close as CL, CloseWait as CW, Established as ES, FinWait as FW, LastAck as LA, Listen as LI,
    SynRecv as SR, SynSent as SS, TimeWait as TW,
};

/// `tcp_states` INPUT rows (torvalds/linux `net/netfilter/ipvs/ip_vs_proto_tcp.c`,
/// the current table, where an ACK in NONE gives ESTABLISHED for
/// `sloppy_tcp`). Columns: NO, ES, SS, SR, FW, TW, CL, CW, LA, LI, SA.
const TCP_INPUT: [[TcpState; 11]; 4] = [
    /* syn */ [SR, ES, ES, SR, SR, SR, SR, SR, SR, SR, SR],
    /* fin */ [CL, CW, SS, TW, TW, TW, CL, CW, LA, LI, TW],
    /* ack */ [ES, ES, SS, ES, FW, TW, CL, CW, CL, LI, ES],
    /* rst */ [CL, CL, CL, SR, CL, CL, CL, CL, LA, LI, SR],
];

/// `tcp_states` OUTPUT rows.
const TCP_OUTPUT: [[TcpState; 11]; 4] = [
    /* syn */ [SS, ES, SS, SR, SS, SS, SS, SS, SS, LI, SR],
    /* fin */ [TW, FW, SS, TW, FW, TW, CL, TW, LA, LI, TW],
    /* ack */ [ES, ES, SS, ES, FW, TW, CL, CW, LA, ES, ES],
    /* rst */ [CL, CL, SS, CL, CL, TW, CL, CL, CL, CL, CL],
];

/// An IPVS SCTP association state (`IP_VS_SCTP_S_*`, in the kernel's
/// order). `Display` prints the kernel's names (`C-SENT`, `S-ACK-SENT`, …),
/// as `ipvsadm -lnc` shows them.
///
/// The tracker sees no SCTP chunk types, so it drives only part of this
/// machine: see [`ConnState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SctpState {
    /// `NONE`.
    None,
    /// `INIT1`: the client's first INIT seen (the state of a new association).
    Init1,
    /// `INIT`: a retransmitted INIT seen.
    Init,
    /// `C-SENT`: the server's INIT-ACK seen.
    CookieSent,
    /// `C-REPLIED`: the client's COOKIE-ECHO seen.
    CookieReplied,
    /// `C-WAIT`: the server's INIT seen.
    CookieWait,
    /// `COOKIE`: the client's INIT-ACK seen.
    Cookie,
    /// `C-ECHOED`: the server's COOKIE-ECHO seen.
    CookieEchoed,
    /// `ESTABLISHED`: the only state IPVS counts as active.
    Established,
    /// `S-SENT`.
    ShutdownSent,
    /// `S-RECEIVED`.
    ShutdownReceived,
    /// `S-ACK-SENT`.
    ShutdownAckSent,
    /// `REJECTED`: INIT answered with ABORT.
    Rejected,
    /// `CLOSED`.
    Closed,
}

impl SctpState {
    /// Every state, in the kernel's order.
    pub const ALL: [SctpState; 14] = [
        SctpState::None,
        SctpState::Init1,
        SctpState::Init,
        SctpState::CookieSent,
        SctpState::CookieReplied,
        SctpState::CookieWait,
        SctpState::Cookie,
        SctpState::CookieEchoed,
        SctpState::Established,
        SctpState::ShutdownSent,
        SctpState::ShutdownReceived,
        SctpState::ShutdownAckSent,
        SctpState::Rejected,
        SctpState::Closed,
    ];

    /// The kernel's name (`sctp_state_name_table`).
    pub const fn name(self) -> &'static str {
        match self {
            SctpState::None => "NONE",
            SctpState::Init1 => "INIT1",
            SctpState::Init => "INIT",
            SctpState::CookieSent => "C-SENT",
            SctpState::CookieReplied => "C-REPLIED",
            SctpState::CookieWait => "C-WAIT",
            SctpState::Cookie => "COOKIE",
            SctpState::CookieEchoed => "C-ECHOED",
            SctpState::Established => "ESTABLISHED",
            SctpState::ShutdownSent => "S-SENT",
            SctpState::ShutdownReceived => "S-RECEIVED",
            SctpState::ShutdownAckSent => "S-ACK-SENT",
            SctpState::Rejected => "REJECTED",
            SctpState::Closed => "CLOSED",
        }
    }
}

impl fmt::Display for SctpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The state of one tracked connection.
///
/// - TCP follows IPVS's table exactly ([`TcpState::next`]).
/// - UDP has no states in IPVS (one timeout); the tracker keeps whether a
///   reply was seen, as netfilter does, so that [`Timeouts`](super::Timeouts)
///   can tell 30 s unreplied from 120 s replied.
/// - SCTP is simplified, since a [`Flow`](crate::Flow) carries no chunk
///   types: a new association starts in `INIT1` (IPVS's state after the
///   client's INIT), the first reply makes it `ESTABLISHED` (the INIT-ACK /
///   COOKIE-ECHO / COOKIE-ACK exchange collapsed into one step), and later
///   packets keep the state. Shutdown and abort are not seen; the
///   connection ends by timeout or [`remove`](super::Conntrack::remove).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnState {
    /// A TCP connection.
    Tcp(TcpState),
    /// A UDP flow.
    Udp {
        /// Whether a reply packet was seen.
        replied: bool,
    },
    /// An SCTP association.
    Sctp(SctpState),
}

impl ConnState {
    /// Whether IPVS counts the connection as active (`ActiveConn`): TCP or
    /// SCTP in ESTABLISHED. Every other connection, and every UDP flow,
    /// counts as inactive (`InActConn`): `__ip_vs_update_dest` gives new
    /// connections `IP_VS_CONN_F_INACTIVE`, and only the TCP and SCTP
    /// state machines clear it on entering ESTABLISHED.
    ///
    /// # Examples
    /// ```
    /// use svclb::conntrack::{ConnState, TcpState};
    /// assert!(ConnState::Tcp(TcpState::Established).is_active());
    /// assert!(!ConnState::Tcp(TcpState::SynRecv).is_active());
    /// assert!(!ConnState::Udp { replied: true }.is_active());
    /// ```
    pub const fn is_active(&self) -> bool {
        matches!(
            self,
            ConnState::Tcp(TcpState::Established) | ConnState::Sctp(SctpState::Established)
        )
    }

    /// The protocol this state belongs to.
    pub const fn protocol(&self) -> crate::Protocol {
        match self {
            ConnState::Tcp(_) => crate::Protocol::Tcp,
            ConnState::Udp { .. } => crate::Protocol::Udp,
            ConnState::Sctp(_) => crate::Protocol::Sctp,
        }
    }

    /// The state of a new connection whose first packet carries `flags`
    /// (TCP only): IPVS's input transition from NONE. A SYN gives
    /// SYN_RECV, a bare ACK ESTABLISHED (IPVS's `sloppy_tcp` pick-up of a
    /// connection it did not see open), FIN, RST or no flag CLOSE.
    pub fn initial(protocol: crate::Protocol, flags: TcpFlags) -> ConnState {
        match protocol {
            crate::Protocol::Tcp => ConnState::Tcp(TcpState::None.next(Direction::Original, flags)),
            crate::Protocol::Udp => ConnState::Udp { replied: false },
            crate::Protocol::Sctp => ConnState::Sctp(SctpState::Init1),
        }
    }

    /// The state after a packet in `direction` (`flags` are read for TCP
    /// only).
    ///
    /// # Examples
    /// ```
    /// use svclb::conntrack::{ConnState, Direction, SctpState, TcpFlags};
    /// let udp = ConnState::Udp { replied: false };
    /// assert_eq!(udp.next(Direction::Reply, TcpFlags::NONE), ConnState::Udp { replied: true });
    /// let sctp = ConnState::Sctp(SctpState::Init1);
    /// assert_eq!(
    ///     sctp.next(Direction::Reply, TcpFlags::NONE),
    ///     ConnState::Sctp(SctpState::Established)
    /// );
    /// ```
    pub fn next(self, direction: Direction, flags: TcpFlags) -> ConnState {
        match (self, direction) {
            (ConnState::Tcp(s), d) => ConnState::Tcp(s.next(d, flags)),
            (ConnState::Udp { .. }, Direction::Reply) => ConnState::Udp { replied: true },
            (ConnState::Udp { replied }, Direction::Original) => ConnState::Udp { replied },
            (ConnState::Sctp(s), Direction::Reply) if s < SctpState::Established => {
                ConnState::Sctp(SctpState::Established)
            }
            (s @ ConnState::Sctp(_), _) => s,
        }
    }

    /// A dense code, 1..=STATE_CODES-1 (0 marks an empty slot).
    pub(crate) const fn code(self) -> u8 {
        match self {
            ConnState::Tcp(s) => 1 + s as u8,
            ConnState::Udp { replied: false } => 12,
            ConnState::Udp { replied: true } => 13,
            ConnState::Sctp(s) => 14 + s as u8,
        }
    }

    /// The inverse of [`Self::code`]; `code` must not be 0.
    pub(crate) const fn from_code(code: u8) -> ConnState {
        match code {
            1..=11 => ConnState::Tcp(TcpState::ALL[(code - 1) as usize]),
            12 => ConnState::Udp { replied: false },
            13 => ConnState::Udp { replied: true },
            _ => ConnState::Sctp(SctpState::ALL[(code - 14) as usize]),
        }
    }
}

impl fmt::Display for ConnState {
    /// TCP and SCTP as their IPVS names; UDP as `UDP` (ipvsadm's name for
    /// its one state) or `UDP_REPLIED`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnState::Tcp(s) => s.fmt(f),
            ConnState::Udp { replied: false } => f.write_str("UDP"),
            ConnState::Udp { replied: true } => f.write_str("UDP_REPLIED"),
            ConnState::Sctp(s) => s.fmt(f),
        }
    }
}

/// How many state codes exist, the empty code 0 included.
pub(crate) const STATE_CODES: usize = 28;

/// The code of TCP ESTABLISHED and of SCTP ESTABLISHED: the active ones.
const ACTIVE_CODES: u32 =
    (1 << (1 + TcpState::Established as u32)) | (1 << (14 + SctpState::Established as u32));

/// Whether the state of `code` counts as active ([`ConnState::is_active`]).
#[inline]
pub(crate) const fn is_active_code(code: u8) -> bool {
    (ACTIVE_CODES >> code) & 1 != 0
}

/// [`ConnState::next`] as a table over state codes, for the hot path:
/// `[direction][flag row][code]`, flag row 4 meaning no flag.
pub(crate) struct Transitions([[[u8; STATE_CODES]; 5]; 2]);

impl Transitions {
    pub(crate) fn new() -> Self {
        let rows = [
            TcpFlags::SYN,
            TcpFlags::FIN,
            TcpFlags::ACK,
            TcpFlags::RST,
            TcpFlags::NONE,
        ];
        let mut t = [[[0u8; STATE_CODES]; 5]; 2];
        for (d, dir) in [Direction::Original, Direction::Reply]
            .into_iter()
            .enumerate()
        {
            for (r, flags) in rows.into_iter().enumerate() {
                debug_assert_eq!(flags.row().unwrap_or(4), r);
                for s in all_states() {
                    t[d][r][s.code() as usize] = s.next(dir, flags).code();
                }
            }
        }
        Transitions(t)
    }

    /// The code after a packet; `code` must not be 0.
    #[inline(always)]
    pub(crate) fn next(&self, direction: Direction, flags: TcpFlags, code: u8) -> u8 {
        let row = flags.row().unwrap_or(4);
        self.0[direction as usize][row][code as usize]
    }
}

/// Every state, in code order (index = code - 1).
pub(crate) fn all_states() -> impl Iterator<Item = ConnState> {
    (1..STATE_CODES as u8).map(ConnState::from_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table_matches_the_state_machines() {
        let t = Transitions::new();
        for s in all_states() {
            assert_eq!(is_active_code(s.code()), s.is_active(), "{s}");
            for dir in [Direction::Original, Direction::Reply] {
                for bits in 0..=0x17u8 {
                    let f = TcpFlags::from_bits(bits);
                    assert_eq!(t.next(dir, f, s.code()), s.next(dir, f).code());
                }
            }
        }
    }

    #[test]
    fn codes_round_trip() {
        for code in 1..STATE_CODES as u8 {
            assert_eq!(ConnState::from_code(code).code(), code);
        }
        assert_eq!(all_states().count(), STATE_CODES - 1);
    }

    #[test]
    fn flag_priority_is_rst_syn_fin_ack() {
        let all = TcpFlags::SYN | TcpFlags::ACK | TcpFlags::FIN | TcpFlags::RST;
        assert_eq!(all.row(), Some(3));
        assert_eq!((TcpFlags::SYN | TcpFlags::FIN).row(), Some(0));
        assert_eq!((TcpFlags::FIN | TcpFlags::ACK).row(), Some(1));
        assert_eq!(TcpFlags::ACK.row(), Some(2));
        assert_eq!(TcpFlags::NONE.row(), None);
    }

    #[test]
    fn tcp_handshake_and_close() {
        use Direction::*;
        let mut s = TcpState::None.next(Original, TcpFlags::SYN);
        assert_eq!(s, TcpState::SynRecv);
        s = s.next(Reply, TcpFlags::SYN | TcpFlags::ACK);
        assert_eq!(s, TcpState::SynRecv);
        s = s.next(Original, TcpFlags::ACK);
        assert_eq!(s, TcpState::Established);
        s = s.next(Original, TcpFlags::FIN | TcpFlags::ACK);
        assert_eq!(s, TcpState::CloseWait);
        s = s.next(Reply, TcpFlags::FIN | TcpFlags::ACK);
        assert_eq!(s, TcpState::TimeWait);
        assert_eq!(
            TcpState::Established.next(Reply, TcpFlags::FIN),
            TcpState::FinWait
        );
        assert_eq!(
            TcpState::Established.next(Original, TcpFlags::RST),
            TcpState::Close
        );
        assert_eq!(
            TcpState::Established.next(Original, TcpFlags::NONE),
            TcpState::Close
        );
    }

    #[test]
    fn flags_parse_and_print() {
        let f: TcpFlags = " Fin , RST ".parse().unwrap();
        assert_eq!(f, TcpFlags::FIN | TcpFlags::RST);
        assert_eq!(f.to_string(), "fin,rst");
        assert_eq!("".parse::<TcpFlags>().unwrap(), TcpFlags::NONE);
        assert_eq!(TcpFlags::NONE.to_string(), "none");
        assert_eq!("none".parse::<TcpFlags>().unwrap(), TcpFlags::NONE);
        let err = "syn,,ack".parse::<TcpFlags>().unwrap_err();
        assert_eq!(err, ParseTcpFlagsError::UnknownFlag { flag: "".into() });
        assert!(err.to_string().contains("unknown TCP flag"));
        for bits in 0..=0x17u8 {
            let f = TcpFlags::from_bits(bits);
            assert_eq!(f.to_string().parse::<TcpFlags>().unwrap(), f);
        }
    }

    #[test]
    fn names_match_ipvsadm() {
        let names: Vec<_> = TcpState::ALL.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            names,
            [
                "NONE",
                "ESTABLISHED",
                "SYN_SENT",
                "SYN_RECV",
                "FIN_WAIT",
                "TIME_WAIT",
                "CLOSE",
                "CLOSE_WAIT",
                "LAST_ACK",
                "LISTEN",
                "SYNACK"
            ]
        );
        assert_eq!(SctpState::CookieSent.to_string(), "C-SENT");
    }
}
