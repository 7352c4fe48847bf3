//! How long a connection lives in each state without a packet.

use core::time::Duration;

use super::state::{ConnState, STATE_CODES, SctpState, TcpState, all_states};

/// The idle timeout of each connection state: a packet that moves a
/// connection to state `s` makes it expire `timeout(s)` later.
///
/// Two presets: [`Timeouts::ipvs`] (IPVS mode) and [`Timeouts::netfilter`]
/// (iptables and nftables modes). Change single fields of a preset:
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use svclb::conntrack::{ConnState, TcpState, Timeouts};
/// let mut t = Timeouts::ipvs();
/// t.tcp_established = Duration::from_secs(3600);
/// assert_eq!(t.timeout(ConnState::Tcp(TcpState::Established)), Duration::from_secs(3600));
/// assert_eq!(t.timeout(ConnState::Udp { replied: false }), Duration::from_secs(300));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// TCP ESTABLISHED.
    pub tcp_established: Duration,
    /// TCP SYN_SENT.
    pub tcp_syn_sent: Duration,
    /// TCP SYN_RECV.
    pub tcp_syn_recv: Duration,
    /// TCP FIN_WAIT.
    pub tcp_fin_wait: Duration,
    /// TCP TIME_WAIT.
    pub tcp_time_wait: Duration,
    /// TCP CLOSE.
    pub tcp_close: Duration,
    /// TCP CLOSE_WAIT.
    pub tcp_close_wait: Duration,
    /// TCP LAST_ACK.
    pub tcp_last_ack: Duration,
    /// TCP LISTEN.
    pub tcp_listen: Duration,
    /// TCP SYNACK.
    pub tcp_synack: Duration,
    /// TCP NONE.
    pub tcp_none: Duration,
    /// UDP before any reply.
    pub udp: Duration,
    /// UDP once a reply was seen.
    pub udp_replied: Duration,
    /// SCTP NONE.
    pub sctp_none: Duration,
    /// SCTP INIT1.
    pub sctp_init1: Duration,
    /// SCTP INIT.
    pub sctp_init: Duration,
    /// SCTP C-SENT.
    pub sctp_cookie_sent: Duration,
    /// SCTP C-REPLIED.
    pub sctp_cookie_replied: Duration,
    /// SCTP C-WAIT.
    pub sctp_cookie_wait: Duration,
    /// SCTP COOKIE.
    pub sctp_cookie: Duration,
    /// SCTP C-ECHOED.
    pub sctp_cookie_echoed: Duration,
    /// SCTP ESTABLISHED.
    pub sctp_established: Duration,
    /// SCTP S-SENT.
    pub sctp_shutdown_sent: Duration,
    /// SCTP S-RECEIVED.
    pub sctp_shutdown_received: Duration,
    /// SCTP S-ACK-SENT.
    pub sctp_shutdown_ack_sent: Duration,
    /// SCTP REJECTED.
    pub sctp_rejected: Duration,
    /// SCTP CLOSED.
    pub sctp_closed: Duration,
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

impl Default for Timeouts {
    /// [`Timeouts::ipvs`].
    fn default() -> Self {
        Timeouts::ipvs()
    }
}

impl Timeouts {
    /// IPVS's defaults (torvalds/linux `net/netfilter/ipvs/`):
    /// `tcp_timeouts` of `ip_vs_proto_tcp.c` (ESTABLISHED 900 s, SYN_SENT
    /// 120, SYN_RECV 60, FIN_WAIT 120, TIME_WAIT 120, CLOSE 10, CLOSE_WAIT
    /// 60, LAST_ACK 30, LISTEN 120, SYNACK 120, NONE 2), UDP 300 s replied
    /// or not (`ip_vs_proto_udp.c`), and `sctp_timeouts` of
    /// `ip_vs_proto_sctp.c` (ESTABLISHED 900 s, INIT1 and REJECTED 4 s,
    /// NONE 2 s, every other state `IP_VS_SCTP_MAX_RTO` = 61 s).
    pub const fn ipvs() -> Self {
        const RTO: Duration = secs(61);
        Timeouts {
            tcp_established: secs(15 * 60),
            tcp_syn_sent: secs(120),
            tcp_syn_recv: secs(60),
            tcp_fin_wait: secs(120),
            tcp_time_wait: secs(120),
            tcp_close: secs(10),
            tcp_close_wait: secs(60),
            tcp_last_ack: secs(30),
            tcp_listen: secs(120),
            tcp_synack: secs(120),
            tcp_none: secs(2),
            udp: secs(300),
            udp_replied: secs(300),
            sctp_none: secs(2),
            sctp_init1: secs(4),
            sctp_init: RTO,
            sctp_cookie_sent: RTO,
            sctp_cookie_replied: RTO,
            sctp_cookie_wait: RTO,
            sctp_cookie: RTO,
            sctp_cookie_echoed: RTO,
            sctp_established: secs(15 * 60),
            sctp_shutdown_sent: RTO,
            sctp_shutdown_received: RTO,
            sctp_shutdown_ack_sent: RTO,
            sctp_rejected: secs(4),
            sctp_closed: RTO,
        }
    }

    /// netfilter conntrack's defaults (`nf_conntrack_proto_tcp.c`,
    /// `_udp.c`, `_sctp.c`), mapped onto IPVS's states: TCP SYN_SENT 120 s,
    /// SYN_RECV 60, ESTABLISHED 5 days, FIN_WAIT 120, CLOSE_WAIT 60,
    /// LAST_ACK 30, TIME_WAIT 120, CLOSE 10; SYNACK takes SYN_SENT2's
    /// 120 s; LISTEN (120 s) and NONE (2 s), which netfilter does not time,
    /// keep IPVS's values. UDP 30 s unreplied, 120 s replied. SCTP
    /// ESTABLISHED 210 s, the handshake and shutdown states 3 s, CLOSED
    /// and REJECTED 10 s; NONE 2 s.
    pub const fn netfilter() -> Self {
        Timeouts {
            tcp_established: secs(5 * 24 * 3600),
            tcp_syn_sent: secs(120),
            tcp_syn_recv: secs(60),
            tcp_fin_wait: secs(120),
            tcp_time_wait: secs(120),
            tcp_close: secs(10),
            tcp_close_wait: secs(60),
            tcp_last_ack: secs(30),
            tcp_listen: secs(120),
            tcp_synack: secs(120),
            tcp_none: secs(2),
            udp: secs(30),
            udp_replied: secs(120),
            sctp_none: secs(2),
            sctp_init1: secs(3),
            sctp_init: secs(3),
            sctp_cookie_sent: secs(3),
            sctp_cookie_replied: secs(3),
            sctp_cookie_wait: secs(3),
            sctp_cookie: secs(3),
            sctp_cookie_echoed: secs(3),
            sctp_established: secs(210),
            sctp_shutdown_sent: secs(3),
            sctp_shutdown_received: secs(3),
            sctp_shutdown_ack_sent: secs(3),
            sctp_rejected: secs(10),
            sctp_closed: secs(10),
        }
    }

    /// The timeout of `state`.
    pub fn timeout(&self, state: ConnState) -> Duration {
        match state {
            ConnState::Tcp(s) => match s {
                TcpState::None => self.tcp_none,
                TcpState::Established => self.tcp_established,
                TcpState::SynSent => self.tcp_syn_sent,
                TcpState::SynRecv => self.tcp_syn_recv,
                TcpState::FinWait => self.tcp_fin_wait,
                TcpState::TimeWait => self.tcp_time_wait,
                TcpState::Close => self.tcp_close,
                TcpState::CloseWait => self.tcp_close_wait,
                TcpState::LastAck => self.tcp_last_ack,
                TcpState::Listen => self.tcp_listen,
                TcpState::SynAck => self.tcp_synack,
            },
            ConnState::Udp { replied: false } => self.udp,
            ConnState::Udp { replied: true } => self.udp_replied,
            ConnState::Sctp(s) => match s {
                SctpState::None => self.sctp_none,
                SctpState::Init1 => self.sctp_init1,
                SctpState::Init => self.sctp_init,
                SctpState::CookieSent => self.sctp_cookie_sent,
                SctpState::CookieReplied => self.sctp_cookie_replied,
                SctpState::CookieWait => self.sctp_cookie_wait,
                SctpState::Cookie => self.sctp_cookie,
                SctpState::CookieEchoed => self.sctp_cookie_echoed,
                SctpState::Established => self.sctp_established,
                SctpState::ShutdownSent => self.sctp_shutdown_sent,
                SctpState::ShutdownReceived => self.sctp_shutdown_received,
                SctpState::ShutdownAckSent => self.sctp_shutdown_ack_sent,
                SctpState::Rejected => self.sctp_rejected,
                SctpState::Closed => self.sctp_closed,
            },
        }
    }

    /// The timeouts in nanoseconds, indexed by state code (for the hot path).
    pub(crate) fn nanos_table(&self) -> [u64; STATE_CODES] {
        let mut t = [0u64; STATE_CODES];
        for s in all_states() {
            t[s.code() as usize] = u64::try_from(self.timeout(s).as_nanos()).unwrap_or(u64::MAX);
        }
        t
    }
}
