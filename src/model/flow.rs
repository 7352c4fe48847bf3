//! Flows, protocols and verdicts: what a caller's packet path hands in and
//! gets back.

use core::fmt;
use core::str::FromStr;
use std::net::{IpAddr, SocketAddr};

use crate::error::ValidationError;
use crate::plan::{BackendId, FrontendId};

/// An L4 protocol a Service port can carry.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "UPPERCASE"))]
pub enum Protocol {
    /// TCP (the Kubernetes default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The name as the Kubernetes API spells it: `TCP`, `UDP`, `SCTP`.
    pub const fn as_api_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// The lower-case name iptables and kube-proxy's chain hashes use.
    pub const fn as_lower_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_api_str())
    }
}

impl FromStr for Protocol {
    type Err = ValidationError;

    /// Parses `TCP`/`UDP`/`SCTP` in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("tcp") {
            Ok(Protocol::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Ok(Protocol::Udp)
        } else if s.eq_ignore_ascii_case("sctp") {
            Ok(Protocol::Sctp)
        } else {
            Err(ValidationError::Invalid {
                field: "protocol".into(),
                value: s.into(),
                reason: "must be TCP, UDP or SCTP",
            })
        }
    }
}

/// One flow as the caller's packet path sees it: protocol, source and
/// destination. Small and `Copy`; build one per packet or per connection.
///
/// # Examples
/// ```
/// use svclb::{Flow, Protocol};
/// let f = Flow::new(Protocol::Tcp, "10.1.0.5:40000".parse().unwrap(), "10.96.0.10:80".parse().unwrap());
/// assert_eq!(f.dst.port(), 80);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    /// The L4 protocol.
    pub protocol: Protocol,
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port (a service VIP for proxied traffic).
    pub dst: SocketAddr,
}

impl Flow {
    /// A flow from its three parts (unchecked: see [`Flow::try_new`]; the
    /// dataplanes answer a flow of mixed families
    /// [`Verdict::NotAService`]).
    pub const fn new(protocol: Protocol, src: SocketAddr, dst: SocketAddr) -> Self {
        Flow { protocol, src, dst }
    }

    /// A flow from its three parts, refusing a source and destination of
    /// different address families (no packet carries both: an IPv4-mapped
    /// IPv6 address is IPv6 here).
    ///
    /// # Errors
    /// [`ValidationError::Invalid`] naming `flow` and the two addresses.
    ///
    /// # Examples
    /// ```
    /// use svclb::{Flow, Protocol};
    /// assert!(Flow::try_new(Protocol::Tcp, "10.0.0.1:1".parse().unwrap(), "10.96.0.1:80".parse().unwrap()).is_ok());
    /// let err = Flow::try_new(Protocol::Tcp, "10.0.0.1:1".parse().unwrap(), "[fd00::1]:80".parse().unwrap()).unwrap_err();
    /// assert_eq!(err.field(), "flow");
    /// ```
    pub fn try_new(
        protocol: Protocol,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Self, ValidationError> {
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(ValidationError::Invalid {
                field: "flow".into(),
                value: format!("{src} -> {dst}"),
                reason: "source and destination must be of one address family",
            });
        }
        Ok(Flow { protocol, src, dst })
    }

    /// Whether source and destination are of one address family.
    pub const fn is_single_family(&self) -> bool {
        self.src.is_ipv4() == self.dst.is_ipv4()
    }

    /// A TCP flow.
    pub const fn tcp(src: SocketAddr, dst: SocketAddr) -> Self {
        Flow::new(Protocol::Tcp, src, dst)
    }

    /// A UDP flow.
    pub const fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        Flow::new(Protocol::Udp, src, dst)
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {}",
            self.protocol.as_lower_str(),
            self.src,
            self.dst
        )
    }
}

/// Where a forwarded flow goes: what a caller needs to DNAT it and, later,
/// to reverse-NAT its replies without another lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Forward {
    /// The backend `IP:port` to DNAT to.
    pub backend: SocketAddr,
    /// The backend's stable id in the plan.
    pub backend_id: BackendId,
    /// The frontend (VIP, protocol, port) the flow was addressed to.
    pub frontend: FrontendId,
    /// Whether the connection tracker already knew the flow (`true`) or it
    /// was scheduled now (`false`).
    pub tracked: bool,
    /// Whether kube-proxy would masquerade (SNAT to the node) the flow:
    /// the caller's packet I/O rewrites the source too. Hairpin traffic,
    /// off-cluster traffic to a cluster IP (with `--cluster-cidr`, or
    /// `--masquerade-all`), and external traffic under
    /// `externalTrafficPolicy: Cluster` (or from the node itself under
    /// `Local`). See [`DataplaneConfig::cluster_cidrs`](crate::DataplaneConfig::cluster_cidrs).
    pub masquerade: bool,
}

/// What a dataplane decided for a flow.
///
/// The `Display` form is the one the `svclb` CLI prints:
/// `FORWARD 10.0.1.8:9092`, `REJECT`, `DROP`, `NO-SERVICE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Verdict {
    /// DNAT to this backend.
    Forward(Forward),
    /// The service has no usable endpoint: answer with ICMP unreachable / RST
    /// (iptables `REJECT`, "has no endpoints").
    Reject,
    /// A Local traffic policy with no local endpoint: drop silently
    /// (iptables `DROP`, "has no local endpoints"); also a packet of a
    /// tracked TCP connection whose backend is gone (`expire_nodest_conn`).
    Drop,
    /// The destination is no service VIP: pass the packet through untouched.
    NotAService,
}

impl Verdict {
    /// The backend, for a forward verdict.
    pub const fn backend(&self) -> Option<SocketAddr> {
        match self {
            Verdict::Forward(f) => Some(f.backend),
            _ => None,
        }
    }

    /// The forward, for a forward verdict.
    pub const fn forward(&self) -> Option<&Forward> {
        match self {
            Verdict::Forward(f) => Some(f),
            _ => None,
        }
    }

    /// Whether this forwards a connection the tracker already knew.
    pub const fn is_tracked(&self) -> bool {
        matches!(self, Verdict::Forward(Forward { tracked: true, .. }))
    }

    /// `FORWARD`, `REJECT`, `DROP` or `NO-SERVICE`.
    pub const fn kind_str(&self) -> &'static str {
        match self {
            Verdict::Forward(_) => "FORWARD",
            Verdict::Reject => "REJECT",
            Verdict::Drop => "DROP",
            Verdict::NotAService => "NO-SERVICE",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Forward(fw) => write!(f, "FORWARD {}", fw.backend),
            other => f.write_str(other.kind_str()),
        }
    }
}

/// The identity of an IP datagram's fragments (RFC 791: source,
/// destination, protocol and identification), for matching later fragments
/// to the connection of the first
/// ([`Dataplane::first_fragment`](crate::Dataplane::first_fragment)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The identification (16 bits in IPv4, 32 in IPv6's fragment header).
    pub id: u32,
    /// The upper-layer protocol.
    pub protocol: Protocol,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_display_matches_cli_format() {
        let v = Verdict::Forward(Forward {
            backend: "10.0.1.8:9092".parse().unwrap(),
            backend_id: BackendId(0),
            frontend: FrontendId(0),
            tracked: false,
            masquerade: false,
        });
        assert_eq!(v.to_string(), "FORWARD 10.0.1.8:9092");
        assert_eq!(Verdict::Reject.to_string(), "REJECT");
        assert_eq!(Verdict::Drop.to_string(), "DROP");
        assert_eq!(Verdict::NotAService.to_string(), "NO-SERVICE");
    }

    #[test]
    fn protocol_parses_any_case_and_rejects_others() {
        assert_eq!("tcp".parse::<Protocol>().unwrap(), Protocol::Tcp);
        assert_eq!("SCTP".parse::<Protocol>().unwrap(), Protocol::Sctp);
        let err = "icmp".parse::<Protocol>().unwrap_err();
        assert!(err.to_string().contains("icmp"));
    }

    #[test]
    fn flow_is_small_and_copy() {
        fn assert_copy<T: Copy>() {}
        assert_copy::<Flow>();
        assert!(core::mem::size_of::<Flow>() <= 72);
    }
}
