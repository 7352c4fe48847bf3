//! Tracked connections listed as the kernel's tools list them:
//! `conntrack -L` (iptables and nftables modes, netfilter conntrack) and
//! `ipvsadm -lnc` (IPVS mode, the IPVS connection table).
//!
//! # Examples
//! ```
//! use svclb::*;
//! use svclb::render::conntrack;
//! let mut table = ServiceTable::new();
//! let svc = Service::builder("default", "web")
//!     .cluster_ip("10.96.0.10".parse().unwrap())
//!     .port(ServicePortSpec::tcp(80).target_port(8080))
//!     .build().unwrap();
//! let slice = EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
//!     .port(SlicePortSpec::tcp(8080))
//!     .endpoint(EndpointSpec::new("10.0.0.2"))
//!     .build().unwrap();
//! let cs = table.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)]).unwrap();
//! let dp = IpvsDataplane::new(DataplaneConfig::with_seed(1));
//! dp.sync(&table, &cs, Instant::ZERO);
//! let flow = Flow::tcp("10.1.0.9:40000".parse().unwrap(), "10.96.0.10:80".parse().unwrap());
//! dp.route(&flow, Instant::ZERO);
//! dp.packet(&flow, TcpFlags::ACK, Instant::ZERO);
//! let text = conntrack::ipvsadm_lnc(&dp.connections(Instant::ZERO), Instant::ZERO);
//! assert!(text.contains("TCP 15:00  ESTABLISHED 10.1.0.9:40000     10.96.0.10:80      10.0.0.2:8080"), "{text}");
//! ```

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::conntrack::{ConnState, Tracked};
use crate::model::flow::Protocol;
use crate::time::Instant;

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn secs_left(t: &Tracked, now: Instant) -> u64 {
    t.expires.saturating_duration_since(now).as_secs()
}

fn sorted(entries: &[Tracked]) -> Vec<&Tracked> {
    let mut v: Vec<&Tracked> = entries.iter().collect();
    v.sort_by_key(|t| (t.flow.dst, t.flow.src, proto_number(t.flow.protocol)));
    v
}

fn ip_port(a: SocketAddr) -> (String, u16) {
    (a.ip().to_string(), a.port())
}

/// The entries as `conntrack -L` prints them: protocol name and number,
/// seconds left, the state (TCP and SCTP), the original tuple, `[UNREPLIED]`
/// for a UDP flow with no reply yet, and the reply tuple (from the backend
/// to the client). Sorted by destination, then source.
pub fn conntrack_l(entries: &[Tracked], now: Instant) -> String {
    let mut out = String::new();
    for t in sorted(entries) {
        let p = t.flow.protocol;
        let (src, sport) = ip_port(t.flow.src);
        let (dst, dport) = ip_port(t.flow.dst);
        let (bsrc, bport) = ip_port(t.backend_addr);
        let _ = write!(
            out,
            "{:<8} {:<2} {} ",
            p.as_lower_str(),
            proto_number(p),
            secs_left(t, now)
        );
        match t.state {
            ConnState::Udp { .. } => {}
            s => {
                let _ = write!(out, "{s} ");
            }
        }
        let _ = write!(out, "src={src} dst={dst} sport={sport} dport={dport} ");
        if matches!(t.state, ConnState::Udp { replied: false }) {
            out.push_str("[UNREPLIED] ");
        }
        let _ = writeln!(
            out,
            "src={bsrc} dst={src} sport={bport} dport={sport} mark=0 use=1"
        );
    }
    let _ = writeln!(
        out,
        "conntrack v1.4.7 (conntrack-tools): {} flow entries have been shown.",
        entries.len()
    );
    out
}

/// The entries as `ipvsadm -lnc` prints them (`ipvsadm.c`,
/// `print_conn`): protocol, time left as mm:ss, state, source, virtual
/// and destination addresses. Sorted by virtual address, then source.
pub fn ipvsadm_lnc(entries: &[Tracked], now: Instant) -> String {
    let mut out = String::from(
        "IPVS connection entries\npro expire state       source             virtual            destination\n",
    );
    for t in sorted(entries) {
        let left = secs_left(t, now);
        let _ = writeln!(
            out,
            "{:<3} {:02}:{:02}  {:<11} {:<18} {:<18} {}",
            t.flow.protocol.as_api_str(),
            left / 60,
            left % 60,
            t.state.to_string(),
            t.flow.src.to_string(),
            t.flow.dst.to_string(),
            t.backend_addr
        );
    }
    out
}
