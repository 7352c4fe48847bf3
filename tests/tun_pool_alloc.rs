//! The packet path of `examples/tun.rs` (`examples/shared/tun_nat.rs`)
//! allocates nothing once warm, measured with a counting global allocator:
//! per round, from a client address of its own, a whole TCP connection
//! (SYN, SYN ACK, ACK, data both ways, FIN both ways, last ACK), each
//! client packet translated (DNAT + SNAT to a pool address) and each reply
//! reverse-NATed through the tracker; a UDP exchange; a packet to a
//! service without endpoints answered with ICMP port unreachable; then,
//! off the packet path but in the same loop, the tracker's expiry and the
//! pool's release of the round's two addresses (`SnatPool::reclaim`).
//! IPv4 and IPv6, IPVS mode with the example's default tracker. A warm
//! pass runs every round once; the measured pass runs them again.
//!
//! Checked by hand (2026-12-01): a one-byte `Vec` made in `NatPath::handle`
//! on the DNAT path, or one made per released address in the release,
//! fails it (240 and 80 allocations).
//!
//! One test function only, without libtest's harness: the allocator
//! counts every thread.

use std::alloc::System;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::PacketBuilder;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use svclb::packet::ICMP_ERROR_MAX_V6;
use svclb::*;

// The example's packet path; `prefix`, used only to print the routes, is
// not called here.
#[allow(dead_code)]
#[path = "../examples/shared/tun_nat.rs"]
mod tun_nat;

use tun_nat::{NatPath, Out, PoolRange, SnatPool};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 11);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// Rounds, each from a client address of its own.
const ROUNDS: u16 = 40;

fn backend(n: u8, v6: bool) -> IpAddr {
    if v6 {
        Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, u16::from(n)).into()
    } else {
        Ipv4Addr::new(10, 77, 0, n).into()
    }
}

fn client(round: u16, v6: bool) -> IpAddr {
    if v6 {
        Ipv6Addr::new(0xfd00, 0x77, 1, 0, 0, 0, 0, round + 1).into()
    } else {
        Ipv4Addr::new(10, 77, 1 + (round >> 8) as u8, round as u8 + 1).into()
    }
}

fn table() -> ServiceTable {
    let mut t = ServiceTable::new();
    let mut changes = Vec::new();
    for (name, vip, v6) in [
        ("echo", IpAddr::from(VIP), false),
        ("echo6", VIP6.into(), true),
    ] {
        changes.push(Change::UpsertService(
            Service::builder("svtun", name)
                .cluster_ip(vip)
                .port(ServicePortSpec::tcp(80).name("tcp").target_port(8080))
                .port(ServicePortSpec::udp(53).name("udp").target_port(5353))
                .build()
                .unwrap(),
        ));
        let ty = if v6 {
            AddressType::IPv6
        } else {
            AddressType::IPv4
        };
        changes.push(Change::UpsertSlice(
            EndpointSlice::builder("svtun", format!("{name}-1"), name, ty)
                .port(SlicePortSpec::tcp(8080).name("tcp"))
                .port(SlicePortSpec::udp(5353).name("udp"))
                .endpoints((1..=3).map(|n| EndpointSpec::new(backend(n, v6).to_string())))
                .build()
                .unwrap(),
        ));
    }
    changes.push(Change::UpsertService(
        Service::builder("svtun", "empty")
            .cluster_ip(EMPTY_VIP.into())
            .port(ServicePortSpec::tcp(80))
            .build()
            .unwrap(),
    ));
    t.apply_batch(changes).unwrap();
    t
}

#[derive(Clone, Copy)]
enum L4 {
    Syn,
    SynAck,
    Ack,
    Data,
    Fin,
    Udp,
}

fn packet(src: SocketAddr, dst: SocketAddr, l4: L4) -> Vec<u8> {
    let b = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!(),
    };
    let (sp, dp) = (src.port(), dst.port());
    let mut out = Vec::new();
    let payload: &[u8] = match l4 {
        L4::Data | L4::Udp => b"hello, backend",
        _ => &[],
    };
    match l4 {
        L4::Syn => b.tcp(sp, dp, 1, 1000).syn().write(&mut out, payload),
        L4::SynAck => b.tcp(sp, dp, 1, 1000).syn().ack(2).write(&mut out, payload),
        L4::Ack => b.tcp(sp, dp, 2, 1000).ack(2).write(&mut out, payload),
        L4::Data => b.tcp(sp, dp, 2, 1000).ack(2).psh().write(&mut out, payload),
        L4::Fin => b
            .tcp(sp, dp, 16, 1000)
            .ack(17)
            .fin()
            .write(&mut out, payload),
        L4::Udp => b.udp(sp, dp).write(&mut out, payload),
    }
    .unwrap();
    out
}

/// A packet of one round: from the client (to the frontend) or from
/// backend `n` (to the pool address), built before the measured region.
struct Step {
    from_client: bool,
    l4: L4,
}

const TCP: [Step; 8] = [
    Step {
        from_client: true,
        l4: L4::Syn,
    },
    Step {
        from_client: false,
        l4: L4::SynAck,
    },
    Step {
        from_client: true,
        l4: L4::Ack,
    },
    Step {
        from_client: true,
        l4: L4::Data,
    },
    Step {
        from_client: false,
        l4: L4::Data,
    },
    Step {
        from_client: true,
        l4: L4::Fin,
    },
    Step {
        from_client: false,
        l4: L4::Fin,
    },
    Step {
        from_client: true,
        l4: L4::Ack,
    },
];

/// Every packet of one round, built up front: the client's, and each
/// backend's answer to each of the pool's first two addresses (the round's
/// TCP and UDP pairs take those two, in either order: the release gives
/// them back at the end of every round).
struct Round {
    /// Per TCP step: the client's packet (`[0][0]`), or the reply of
    /// backend `b` to pool address `a` (`[b][a]`).
    tcp: Vec<[[Vec<u8>; 2]; 3]>,
    udp: Vec<u8>,
    udp_replies: [[Vec<u8>; 2]; 3],
    reject: Vec<u8>,
}

fn round(r: u16, v6: bool, pool: [IpAddr; 2]) -> Round {
    let vip = if v6 {
        IpAddr::from(VIP6)
    } else {
        IpAddr::from(VIP)
    };
    let cport = 40_000 + r;
    let client_tcp = SocketAddr::new(client(r, v6), cport);
    let tcp = TCP
        .iter()
        .map(|s| {
            std::array::from_fn(|b| {
                std::array::from_fn(|a| {
                    let be = SocketAddr::new(backend(b as u8 + 1, v6), 8080);
                    if s.from_client {
                        packet(client_tcp, SocketAddr::new(vip, 80), s.l4)
                    } else {
                        packet(be, SocketAddr::new(pool[a], cport), s.l4)
                    }
                })
            })
        })
        .collect();
    Round {
        tcp,
        udp: packet(client_tcp, SocketAddr::new(vip, 53), L4::Udp),
        udp_replies: std::array::from_fn(|b| {
            std::array::from_fn(|a| {
                packet(
                    SocketAddr::new(backend(b as u8 + 1, v6), 5353),
                    SocketAddr::new(pool[a], cport),
                    L4::Udp,
                )
            })
        }),
        reject: packet(
            SocketAddr::new(client(r, false), cport),
            SocketAddr::new(EMPTY_VIP.into(), 80),
            L4::Syn,
        ),
    }
}

/// Where a translated packet in `buf` goes: (backend 0-2, pool address
/// 0-1 it comes from).
fn target_of(buf: &[u8], v6: bool, pool: [IpAddr; 2]) -> (usize, usize) {
    let (src, dst): (IpAddr, IpAddr) = if v6 {
        (
            Ipv6Addr::from(<[u8; 16]>::try_from(&buf[8..24]).unwrap()).into(),
            Ipv6Addr::from(<[u8; 16]>::try_from(&buf[24..40]).unwrap()).into(),
        )
    } else {
        (
            Ipv4Addr::from(<[u8; 4]>::try_from(&buf[12..16]).unwrap()).into(),
            Ipv4Addr::from(<[u8; 4]>::try_from(&buf[16..20]).unwrap()).into(),
        )
    };
    let b = (1..=3)
        .find(|n| backend(*n, v6) == dst)
        .expect("to a backend");
    let a = pool.iter().position(|p| *p == src).expect("from the pool");
    (usize::from(b - 1), a)
}

/// Counts of one measured stretch: packets sent back, answers, releases.
#[derive(Default, Debug)]
struct Done {
    sent: u32,
    answered: u32,
    released: u32,
}

/// The buffers a round works in (allocated before the measured region)
/// and what it counted.
struct Scratch {
    work: Vec<u8>,
    answer: Vec<u8>,
    done: Done,
}

/// One packet through the path, copied into the work buffer first.
fn through(nat: &mut NatPath, dp: &IpvsDataplane, now: Instant, p: &[u8], s: &mut Scratch) -> Out {
    let n = p.len();
    s.work[..n].copy_from_slice(p);
    let out = nat.handle(dp, dp.conntrack(), now, &mut s.work[..n], &mut s.answer);
    match out {
        Out::Send => s.done.sent += 1,
        Out::Answer(_) => s.done.answered += 1,
        Out::Drop => {}
    }
    out
}

/// One round through the path, as the example's loop runs it: every
/// packet, then (later) the timers and the pool's release. `t` is the
/// round's start in seconds.
fn run_round(
    nat: &mut NatPath,
    dp: &IpvsDataplane,
    rd: &Round,
    (v6, pool): (bool, [IpAddr; 2]),
    t: u64,
    s: &mut Scratch,
) {
    let now = Instant::from_secs(t);
    let mut to = (0, 0);
    for (i, step) in TCP.iter().enumerate() {
        let p = if step.from_client {
            &rd.tcp[i][0][0]
        } else {
            &rd.tcp[i][to.0][to.1]
        };
        assert_eq!(through(nat, dp, now, p, s), Out::Send, "TCP step {i}");
        if i == 0 {
            to = target_of(&s.work, v6, pool);
        }
    }
    assert_eq!(through(nat, dp, now, &rd.udp, s), Out::Send, "UDP");
    let (b, a) = target_of(&s.work, v6, pool);
    assert_eq!(
        through(nat, dp, now, &rd.udp_replies[b][a], s),
        Out::Send,
        "UDP reply"
    );
    assert!(
        matches!(through(nat, dp, now, &rd.reject, s), Out::Answer(_)),
        "REJECT"
    );
    // Much later (TIME_WAIT and IPVS's UDP timeout are over): the sweep,
    // in bounded steps, then the release.
    let later = Instant::from_secs(t + 400);
    let ct = dp.conntrack().expect("IPVS mode tracks connections");
    for _ in 0..1000 {
        if ct.is_empty() {
            break;
        }
        dp.handle_timeout(later);
    }
    assert!(ct.is_empty(), "every connection expired");
    let done = &mut s.done;
    nat.pool.reclaim(ct, later, |_, _, _| done.released += 1);
}

fn tun_packet_path_allocates_nothing() {
    // The counter works.
    let region = Region::new(GLOBAL);
    let v: Vec<u64> = std::hint::black_box(Vec::with_capacity(16));
    assert!(region.change().allocations >= 1);
    drop(v);

    for v6 in [false, true] {
        let t = table();
        // The example's configuration (the default tracker).
        let dp =
            IpvsDataplane::new(DataplaneConfig::with_seed(1).scheduler(SchedulerKind::RoundRobin));
        dp.sync(&t, &t.full_change_set(), Instant::ZERO);
        let pool = SnatPool {
            v4: PoolRange::parse("--snat-pool", "169.254.0.0/24", false).unwrap(),
            v6: PoolRange::parse("--snat-pool6", "fd00:5c1b::/112", true).unwrap(),
        };
        let mut nat = NatPath::new(pool);
        // Each round's TCP and UDP pairs take the pool's first two
        // addresses; both are given back at the round's end.
        let pool: [IpAddr; 2] = if v6 {
            [
                Ipv6Addr::new(0xfd00, 0x5c1b, 0, 0, 0, 0, 0, 1).into(),
                Ipv6Addr::new(0xfd00, 0x5c1b, 0, 0, 0, 0, 0, 2).into(),
            ]
        } else {
            [
                Ipv4Addr::new(169, 254, 0, 1).into(),
                Ipv4Addr::new(169, 254, 0, 2).into(),
            ]
        };
        let rounds: Vec<Round> = (0..ROUNDS).map(|r| round(r, v6, pool)).collect();
        let mut s = Scratch {
            work: vec![0u8; 2048],
            answer: vec![0u8; ICMP_ERROR_MAX_V6],
            done: Done::default(),
        };
        // Warm: every round once. The tracker allocates a shard's slot
        // array the first time a flow lands in that shard (once per shard
        // and size step, `src/conntrack/table.rs`; `tests/conn_alloc.rs`
        // covers the tracker warm); which shard a flow lands in depends on
        // the tracker's secret hash key, so the measured pass replays the
        // same traffic (each round's connections closed and expired, their
        // pool addresses given back, in between), at a later time.
        for (r, rd) in rounds.iter().enumerate() {
            run_round(&mut nat, &dp, rd, (v6, pool), 1000 * r as u64, &mut s);
        }
        s.done = Done::default();
        let region = Region::new(GLOBAL);
        for (r, rd) in rounds.iter().enumerate() {
            let t = 1000 * (u64::from(ROUNDS) + r as u64);
            run_round(&mut nat, &dp, rd, (v6, pool), t, &mut s);
        }
        let c = region.change();
        let measured = u32::from(ROUNDS);
        let done = &s.done;
        assert_eq!(done.sent, measured * 10, "{done:?}");
        assert_eq!(done.answered, measured, "{done:?}");
        assert_eq!(done.released, measured * 2, "{done:?}");
        assert_eq!(nat.stats.dropped, 0);
        assert_eq!(nat.stats.bad, 0);
        assert_eq!(
            c.allocations + c.reallocations + c.deallocations,
            0,
            "the TUN packet path (IPv{}) allocated over {} packets: {c:?}",
            if v6 { 6 } else { 4 },
            measured * 11
        );
        println!(
            "IPv{}: {} packets through the path, {} addresses released, 0 allocations",
            if v6 { 6 } else { 4 },
            measured * 11,
            done.released
        );
    }
}

/// Run without libtest's harness (`harness = false`): the counting
/// allocator counts every thread, and the harness's own threads allocate
/// at moments of their own.
fn main() {
    tun_packet_path_allocates_nothing();
    println!("test tun_packet_path_allocates_nothing ... ok");
}
