//! The packet path of `examples/tun.rs`: the SNAT pool and what becomes of
//! one packet read from the device (DNAT + SNAT on the way in, reverse NAT
//! of a backend's reply or of an ICMP error about a packet we sent), with
//! the pool's release off the packet path. A module of its own so that
//! `tests/tun_pool.rs` and `tests/tun_pool_alloc.rs` drive the very code
//! the example runs, without a device.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use svclb::conntrack::Conntrack;
use svclb::packet::{
    FragmentKey, LinkType, PacketKind, ParsedPacket, TcpFlags, parse, port_unreachable,
    reverse_nat, rewrite_dst, rewrite_src,
};
use svclb::{Dataplane, Flow, Instant, Verdict};

/// One family's SNAT addresses: one per (client address, frontend), taken
/// from a free list and given back once the tracker holds no live
/// connection of that pair ([`SnatPool::reclaim`]). Because a live
/// original flow (protocol, client, client port, frontend) is unique, so
/// is its translation (protocol, pool address, client port, backend), and
/// the pool address alone gives the client and the frontend back.
///
/// Every table is allocated up front (`size` entries), so assigning and
/// looking up an address allocates nothing on the packet path.
pub(crate) struct PoolRange {
    /// The prefix's first address (as a number) and length.
    base: u128,
    prefix_len: u8,
    v6: bool,
    /// The owner of address `base + 1 + i`.
    owners: Vec<Option<(IpAddr, SocketAddr)>>,
    /// Free indices, the next one last.
    free: Vec<u32>,
    by_key: HashMap<(IpAddr, SocketAddr), u32>,
    /// Scratch of `reclaim`: which indices a live connection uses.
    seen: Vec<bool>,
}

/// Addresses used of one prefix at most: the tables are preallocated.
pub(crate) const POOL_MAX: u32 = 65534;

impl PoolRange {
    /// The pool of the prefix `text` (flag `flag`): IPv4 /8 to /30, IPv6
    /// /64 to /126; the error names the flag and the value.
    pub(crate) fn parse(flag: &str, text: &str, v6: bool) -> Result<PoolRange, String> {
        let (example, min, max) = if v6 {
            ("fd00:5c1b::/112", 64, 126)
        } else {
            ("169.254.0.0/17", 8, 30)
        };
        let bad = || {
            format!(
                "{flag}: invalid value {text:?}: must be an IPv{} prefix such as {example}, /{min} to /{max}",
                if v6 { 6 } else { 4 }
            )
        };
        let (addr, len) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if addr.is_ipv6() != v6 || !(min..=max).contains(&len) {
            return Err(bad());
        }
        let (value, bits) = match addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32u32),
            IpAddr::V6(a) => (u128::from(a), 128u32),
        };
        let host = bits - u32::from(len);
        let base = value & !((1u128 << host) - 1);
        // The prefix without its first and last address.
        let size = ((1u128 << host) - 2).min(u128::from(POOL_MAX)) as u32;
        Ok(PoolRange {
            base,
            prefix_len: len,
            v6,
            owners: vec![None; size as usize],
            free: (0..size).rev().collect(),
            // Twice the entries: a table at most half full rehashes its
            // tombstones in place, never growing (allocating) on insert.
            by_key: HashMap::with_capacity(2 * size as usize),
            seen: vec![false; size as usize],
        })
    }

    fn ip(&self, value: u128) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(value))
        } else {
            IpAddr::V4(Ipv4Addr::from(value as u32))
        }
    }

    /// `ADDR/LEN`, as routed into the device.
    pub(crate) fn prefix(&self) -> String {
        format!("{}/{}", self.ip(self.base), self.prefix_len)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let (value, bits) = match ip {
            IpAddr::V4(a) if !self.v6 => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) if self.v6 => (u128::from(a), 128),
            _ => return false,
        };
        (value ^ self.base) >> (bits - u32::from(self.prefix_len)) == 0
    }

    fn index(&self, ip: IpAddr) -> Option<usize> {
        if !self.contains(ip) {
            return None;
        }
        let value = match ip {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let i = value.checked_sub(self.base + 1)?;
        (i < self.owners.len() as u128).then_some(i as usize)
    }

    /// The pool address of (client, frontend), assigned on first use;
    /// `None` when every address is taken.
    fn address(&mut self, client: IpAddr, frontend: SocketAddr) -> Option<IpAddr> {
        let i = match self.by_key.get(&(client, frontend)) {
            Some(i) => *i,
            None => {
                let i = self.free.pop()?;
                self.owners[i as usize] = Some((client, frontend));
                self.by_key.insert((client, frontend), i);
                i
            }
        };
        Some(self.ip(self.base + 1 + u128::from(i)))
    }

    fn owner(&self, ip: IpAddr) -> Option<(IpAddr, SocketAddr)> {
        self.owners[self.index(ip)?]
    }

    /// Gives back every address no live tracked connection uses, calling
    /// `released(addr, client, frontend)` for each.
    fn release_unused(&mut self, released: &mut impl FnMut(IpAddr, IpAddr, SocketAddr)) {
        for i in 0..self.owners.len() {
            if self.seen[i] {
                continue;
            }
            if let Some(key) = self.owners[i].take() {
                self.by_key.remove(&key);
                self.free.push(i as u32);
                released(self.ip(self.base + 1 + i as u128), key.0, key.1);
            }
        }
        self.seen.fill(false);
    }
}

/// The SNAT addresses of both families: a client's packet takes one of its
/// own family.
pub(crate) struct SnatPool {
    /// `--snat-pool`.
    pub(crate) v4: PoolRange,
    /// `--snat-pool6`.
    pub(crate) v6: PoolRange,
}

impl SnatPool {
    fn range(&self, ip: IpAddr) -> &PoolRange {
        if ip.is_ipv6() { &self.v6 } else { &self.v4 }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.range(ip).contains(ip)
    }

    fn address(&mut self, client: IpAddr, frontend: SocketAddr) -> Option<IpAddr> {
        if client.is_ipv6() {
            self.v6.address(client, frontend)
        } else {
            self.v4.address(client, frontend)
        }
    }

    fn owner(&self, ip: IpAddr) -> Option<(IpAddr, SocketAddr)> {
        self.range(ip).owner(ip)
    }

    /// Releases the addresses of every (client, frontend) that has no live
    /// connection in the tracker any more (closed and expired, or
    /// flushed), calling `released(addr, client, frontend)` for each. Off
    /// the packet path: one walk of the tracker; it allocates nothing.
    pub(crate) fn reclaim(
        &mut self,
        ct: &Conntrack,
        now: Instant,
        mut released: impl FnMut(IpAddr, IpAddr, SocketAddr),
    ) {
        ct.retain(|t| {
            if t.expires > now {
                let key = (t.flow.src.ip(), t.flow.dst);
                let range = if key.0.is_ipv6() {
                    &mut self.v6
                } else {
                    &mut self.v4
                };
                if let Some(i) = range.by_key.get(&key) {
                    range.seen[*i as usize] = true;
                }
            }
            true
        });
        self.v4.release_unused(&mut released);
        self.v6.release_unused(&mut released);
    }
}

/// What the packet path counted (the example's `stats` line).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Packets read.
    pub(crate) packets: u64,
    /// Client packets DNATed (and SNATed).
    pub(crate) dnat: u64,
    /// Replies (and ICMP errors) reverse-NATed.
    pub(crate) reverse: u64,
    /// Packets dropped.
    pub(crate) dropped: u64,
    /// Packets that did not parse.
    pub(crate) bad: u64,
    /// Packets answered with ICMP port unreachable (REJECT).
    pub(crate) rejected: u64,
}

/// What becomes of one packet read from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Out {
    /// Nothing goes back.
    Drop,
    /// The packet, rewritten in place, goes back into the device.
    Send,
    /// An answer of this length (in the answer buffer) goes back instead:
    /// the ICMP port unreachable a rejected service gets.
    Answer(usize),
}

/// The per-packet state of the example: the SNAT pool and the counters.
/// Later fragments are matched to their datagram through the dataplane's
/// connection layer (`Dataplane::first_fragment`, `later_fragment`).
pub(crate) struct NatPath {
    /// The SNAT addresses.
    pub(crate) pool: SnatPool,
    /// The counters.
    pub(crate) stats: Stats,
}

impl NatPath {
    /// A packet path over `pool`.
    pub(crate) fn new(pool: SnatPool) -> NatPath {
        NatPath {
            pool,
            stats: Stats::default(),
        }
    }

    /// What to do with one packet read from the device (`buf`, rewritten
    /// in place): the dataplane `dp` decides a client's packet, its
    /// tracker `ct` finds a reply's connection. An ICMP answer is written
    /// to `answer` (at least `ICMP_ERROR_MAX_V6` bytes).
    pub(crate) fn handle(
        &mut self,
        dp: &dyn Dataplane,
        ct: Option<&Conntrack>,
        now: Instant,
        buf: &mut [u8],
        answer: &mut [u8],
    ) -> Out {
        let stats = &mut self.stats;
        stats.packets += 1;
        let Ok(parsed) = parse(buf, LinkType::Ip) else {
            stats.bad += 1;
            return Out::Drop;
        };
        let flow = match *parsed.kind() {
            PacketKind::Flow(f) | PacketKind::IcmpError { inner: f, .. } => f,
            PacketKind::Fragment(frag) => {
                return self.later_fragment(dp, frag.key(), now, buf, &parsed);
            }
            PacketKind::Unroutable(_) => {
                stats.dropped += 1;
                return Out::Drop;
            }
        };
        let flags = parsed.tcp_flags().unwrap_or(TcpFlags::ACK);
        let icmp_error = matches!(parsed.kind(), PacketKind::IcmpError { .. });
        // An ICMP error carries the packet it is about: ours, translated
        // (pool address -> backend), so the pool address is its source.
        let (pool_side, peer) = if icmp_error {
            (flow.src, flow.dst)
        } else {
            (flow.dst, flow.src)
        };
        if self.pool.contains(pool_side.ip()) {
            // Back to the client: find the original flow, then its
            // connection.
            let Some((client, frontend)) = self.pool.owner(pool_side.ip()) else {
                stats.dropped += 1;
                return Out::Drop;
            };
            let orig = Flow::new(
                flow.protocol,
                SocketAddr::new(client, pool_side.port()),
                frontend,
            );
            let Some(ct) = ct else {
                stats.dropped += 1;
                return Out::Drop;
            };
            let backend = if icmp_error {
                ct.get(&orig, now).map(|t| t.backend_addr)
            } else {
                ct.lookup_reply(&orig, flags, now).map(|h| h.backend_addr)
            };
            if backend != Some(peer) || reverse_nat(buf, &parsed, &orig, true).is_err() {
                stats.dropped += 1;
                return Out::Drop;
            }
            if let Some(key) = parsed.first_fragment() {
                dp.first_fragment(&key, &orig, now);
            }
            stats.reverse += 1;
            return Out::Send;
        }
        if icmp_error {
            stats.dropped += 1;
            return Out::Drop;
        }
        let fw = match dp.packet(&flow, flags, now) {
            Verdict::Forward(fw) => fw,
            // kube-proxy's REJECT: ICMP port unreachable, from the service.
            Verdict::Reject => {
                return match port_unreachable(buf, &parsed, answer) {
                    Ok(n) => {
                        stats.rejected += 1;
                        Out::Answer(n)
                    }
                    Err(_) => {
                        stats.dropped += 1;
                        Out::Drop
                    }
                };
            }
            _ => {
                stats.dropped += 1;
                return Out::Drop;
            }
        };
        let Some(snat) = self.pool.address(flow.src.ip(), flow.dst) else {
            dp.connection_closed(&flow, now);
            stats.dropped += 1;
            return Out::Drop;
        };
        let src = SocketAddr::new(snat, flow.src.port());
        if fw.backend.is_ipv6() != flow.src.is_ipv6()
            || rewrite_dst(buf, &parsed, fw.backend).is_err()
            || rewrite_src(buf, &parsed, src).is_err()
        {
            stats.dropped += 1;
            return Out::Drop;
        }
        if let Some(key) = parsed.first_fragment() {
            dp.first_fragment(&key, &flow, now);
        }
        stats.dnat += 1;
        Out::Send
    }

    /// A later fragment (no ports) of the datagram `key`: it follows the
    /// connection its first fragment was recorded for, DNAT and SNAT on
    /// the way in, reverse NAT on the way out; with none it is dropped.
    fn later_fragment(
        &mut self,
        dp: &dyn Dataplane,
        key: FragmentKey,
        now: Instant,
        buf: &mut [u8],
        parsed: &ParsedPacket,
    ) -> Out {
        let stats = &mut self.stats;
        let Some(t) = dp.later_fragment(&key, now) else {
            stats.dropped += 1;
            return Out::Drop;
        };
        if key.src == t.flow.src.ip() && key.dst == t.flow.dst.ip() {
            let Some(snat) = self.pool.address(t.flow.src.ip(), t.flow.dst) else {
                stats.dropped += 1;
                return Out::Drop;
            };
            // A later fragment has no ports: only the addresses change.
            if rewrite_dst(buf, parsed, t.backend_addr).is_err()
                || rewrite_src(buf, parsed, SocketAddr::new(snat, 0)).is_err()
            {
                stats.dropped += 1;
                return Out::Drop;
            }
            stats.dnat += 1;
        } else {
            if !self.pool.contains(key.dst) || reverse_nat(buf, parsed, &t.flow, true).is_err() {
                stats.dropped += 1;
                return Out::Drop;
            }
            stats.reverse += 1;
        }
        Out::Send
    }
}
