//! The connection tracker from outside: IPVS's TCP timeouts with a fake
//! clock, expiry to the nanosecond, UDP, the bound, counts, the sweep, a
//! proptest against a naive reference tracker, and zero allocations on the
//! hot paths.
//!
//! The zero-allocation test counts every thread's allocations, so every
//! test here holds `SERIAL` while it runs.

use std::alloc::System;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Mutex;
use std::time::Duration;

use proptest::prelude::*;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use svclb::conntrack::*;
use svclb::{Flow, Instant, Protocol};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn v4(ip: u32, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))
}

fn tcp(i: u32) -> Flow {
    Flow::tcp(
        v4(0x0A00_0000 + i, 40_000 + (i % 1000) as u16),
        v4(0x0A60_0001, 80),
    )
}

const BACKEND: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 5), 8080));

fn tracker(capacity: usize) -> Conntrack {
    Conntrack::new(
        ConntrackConfig::new(capacity)
            .unwrap()
            .hash_key([11, 22, 33, 44]),
    )
}

const SYN: TcpFlags = TcpFlags::SYN;
const ACK: TcpFlags = TcpFlags::ACK;
const FIN: TcpFlags = TcpFlags::FIN;
const RST: TcpFlags = TcpFlags::RST;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Sends one packet and checks the new state and its expiry.
#[track_caller]
fn step(
    ct: &Conntrack,
    f: &Flow,
    dir: Direction,
    flags: TcpFlags,
    now: Instant,
    want: TcpState,
    timeout: Duration,
) {
    let hit = match dir {
        Direction::Original => ct.lookup(f, flags, now),
        Direction::Reply => ct.lookup_reply(f, flags, now),
    }
    .expect("live entry");
    assert_eq!(hit.state, ConnState::Tcp(want), "{flags} {dir:?}");
    let got = ct.get(f, now).unwrap();
    assert_eq!(got.expires, now + timeout, "{want}");
}

#[test]
fn tcp_states_follow_ipvs_tables_and_timeouts() {
    let _g = serial();
    let ct = tracker(1024);
    let t = Timeouts::ipvs();
    let f = tcp(1);
    let mut now = Instant::from_secs(100);
    use Direction::*;

    // SYN -> SYN_RECV (60 s), SYN+ACK back keeps SYN_RECV, ACK -> ESTABLISHED (900 s).
    let s = ct.insert(&f, FrontendId(1), BackendId(1), BACKEND, SYN, now);
    assert_eq!(s, ConnState::Tcp(TcpState::SynRecv));
    assert_eq!(ct.get(&f, now).unwrap().expires, now + secs(60));
    now = now + secs(1);
    step(
        &ct,
        &f,
        Reply,
        SYN | ACK,
        now,
        TcpState::SynRecv,
        t.tcp_syn_recv,
    );
    step(
        &ct,
        &f,
        Original,
        ACK,
        now,
        TcpState::Established,
        secs(900),
    );
    assert_eq!(ct.counts(BackendId(1)), (1, 0));
    // Client closes first: FIN -> CLOSE_WAIT (60), server FIN -> TIME_WAIT (120).
    now = now + secs(899);
    step(
        &ct,
        &f,
        Original,
        FIN | ACK,
        now,
        TcpState::CloseWait,
        secs(60),
    );
    assert_eq!(ct.counts(BackendId(1)), (0, 1));
    step(
        &ct,
        &f,
        Reply,
        FIN | ACK,
        now,
        TcpState::TimeWait,
        secs(120),
    );
    step(&ct, &f, Original, ACK, now, TcpState::TimeWait, secs(120));

    // Server closes first: output FIN from ESTABLISHED -> FIN_WAIT (120).
    let g = tcp(2);
    ct.insert(&g, FrontendId(1), BackendId(2), BACKEND, SYN, now);
    step(
        &ct,
        &g,
        Original,
        ACK,
        now,
        TcpState::Established,
        secs(900),
    );
    step(&ct, &g, Reply, FIN | ACK, now, TcpState::FinWait, secs(120));
    step(
        &ct,
        &g,
        Original,
        FIN | ACK,
        now,
        TcpState::TimeWait,
        secs(120),
    );

    // RST -> CLOSE (10 s); a SYN after it reopens as SYN_RECV.
    let h = tcp(3);
    ct.insert(&h, FrontendId(1), BackendId(3), BACKEND, SYN, now);
    step(
        &ct,
        &h,
        Original,
        ACK,
        now,
        TcpState::Established,
        secs(900),
    );
    step(&ct, &h, Original, RST | ACK, now, TcpState::Close, secs(10));
    step(&ct, &h, Original, SYN, now, TcpState::SynRecv, secs(60));
    step(&ct, &h, Reply, RST, now, TcpState::Close, secs(10));

    // Output SYN on NONE-like paths: a bare ACK first packet is ESTABLISHED;
    // LAST_ACK through input FIN in LAST_ACK stays, output ACK stays.
    let k = tcp(4);
    let s = ct.insert(&k, FrontendId(1), BackendId(4), BACKEND, ACK, now);
    assert_eq!(s, ConnState::Tcp(TcpState::Established));
    assert_eq!(ct.counts(BackendId(4)), (1, 0));
    let s = ct.insert(&k, FrontendId(1), BackendId(4), BACKEND, FIN, now);
    assert_eq!(s, ConnState::Tcp(TcpState::Close));
    assert_eq!(ct.counts(BackendId(4)), (0, 1));

    // Every row of both tables: the state after each flag from each
    // reachable starting state, checked against the timeout table.
    for flags in [SYN, FIN, ACK, RST, TcpFlags::NONE] {
        for dir in [Original, Reply] {
            let f = tcp(10);
            ct.insert(&f, FrontendId(0), BackendId(9), BACKEND, SYN, now);
            let hit = match dir {
                Original => ct.lookup(&f, flags, now),
                Reply => ct.lookup_reply(&f, flags, now),
            }
            .unwrap();
            let want = TcpState::SynRecv.next(dir, flags);
            assert_eq!(hit.state, ConnState::Tcp(want));
            assert_eq!(
                ct.get(&f, now).unwrap().expires,
                now + t.timeout(ConnState::Tcp(want))
            );
        }
    }
}

#[test]
fn netfilter_timeouts() {
    let _g = serial();
    let ct = Conntrack::new(
        ConntrackConfig::new(64)
            .unwrap()
            .timeouts(Timeouts::netfilter()),
    );
    let now = Instant::from_secs(5);
    let f = tcp(1);
    ct.insert(&f, FrontendId(0), BackendId(0), BACKEND, SYN, now);
    ct.lookup(&f, ACK, now).unwrap();
    assert_eq!(ct.get(&f, now).unwrap().expires, now + secs(5 * 24 * 3600));
    let u = Flow::udp(v4(0x0A00_0001, 5353), v4(0x0A60_0001, 53));
    ct.insert(
        &u,
        FrontendId(0),
        BackendId(0),
        BACKEND,
        TcpFlags::NONE,
        now,
    );
    assert_eq!(ct.get(&u, now).unwrap().expires, now + secs(30));
    ct.lookup_reply(&u, TcpFlags::NONE, now).unwrap();
    assert_eq!(ct.get(&u, now).unwrap().expires, now + secs(120));
}

#[test]
fn expiry_is_exact_at_insert_and_rounded_to_the_grain_on_refresh() {
    let _g = serial();
    let ct = tracker(64);
    let t0 = Instant::from_nanos(123_456_789);
    let f = tcp(1);
    ct.insert(&f, FrontendId(0), BackendId(0), BACKEND, SYN, t0);
    let deadline = t0 + secs(60);
    let just_before = Instant::from_nanos(deadline.as_nanos() - 1);
    assert!(ct.get(&f, just_before).is_some());
    assert!(ct.get(&f, deadline).is_none());
    assert!(ct.lookup(&f, ACK, deadline).is_none());
    assert!(ct.entries(deadline).is_empty());
    // Still counted until swept.
    assert_eq!(ct.len(), 1);
    assert_eq!(ct.handle_timeout(just_before), 0);
    assert_eq!(ct.handle_timeout(deadline), 1);
    assert_eq!(ct.counts(BackendId(0)), (0, 0));

    // A refresh one ns before expiry restarts the full timeout, rounded
    // up to the grain (1/16 s).
    ct.insert(&f, FrontendId(0), BackendId(0), BACKEND, SYN, t0);
    ct.lookup(&f, SYN, just_before).unwrap();
    let refreshed = ct.get(&f, just_before).unwrap().expires;
    assert_eq!(refreshed, Instant::from_nanos(120_125_000_000));
    assert!(refreshed >= just_before + secs(60));
    assert!(refreshed.as_nanos() - (just_before + secs(60)).as_nanos() < EXPIRY_GRAIN_NS);
    // A packet in the same grain writes nothing and changes nothing; the
    // entry lives to the rounded expiry and not a nanosecond longer.
    let later = Instant::from_nanos(just_before.as_nanos() + 1_000_000);
    let hit = ct.lookup(&f, SYN, later).unwrap();
    assert_eq!((hit.state, hit.previous), (hit.previous, hit.previous));
    assert_eq!(ct.get(&f, later).unwrap().expires, refreshed);
    assert!(
        ct.get(&f, Instant::from_nanos(refreshed.as_nanos() - 1))
            .is_some()
    );
    assert!(ct.get(&f, refreshed).is_none());
    // On a whole multiple of the grain (every whole second), exact.
    let on_grain = Instant::from_secs(70);
    ct.lookup(&f, SYN, on_grain).unwrap();
    assert_eq!(ct.get(&f, on_grain).unwrap().expires, on_grain + secs(60));
}

#[test]
fn udp_lives_300_seconds_in_ipvs() {
    let _g = serial();
    let ct = tracker(64);
    let u = Flow::udp(v4(0x0A00_0001, 5353), v4(0x0A60_0001, 53));
    let t0 = Instant::from_secs(1);
    let s = ct.insert(&u, FrontendId(0), BackendId(3), BACKEND, TcpFlags::NONE, t0);
    assert_eq!(s, ConnState::Udp { replied: false });
    assert_eq!(ct.counts(BackendId(3)), (0, 1));
    let hit = ct.lookup_reply(&u, SYN, t0 + secs(299)).unwrap();
    assert_eq!(hit.state, ConnState::Udp { replied: true });
    assert_eq!(ct.counts(BackendId(3)), (0, 1), "UDP is never active");
    let t1 = t0 + secs(299) + secs(300);
    assert!(ct.get(&u, Instant::from_nanos(t1.as_nanos() - 1)).is_some());
    assert!(ct.get(&u, t1).is_none());

    // SCTP: INIT1 (4 s) until the first reply, then ESTABLISHED (900 s).
    let s = Flow::new(Protocol::Sctp, v4(0x0A00_0002, 3868), v4(0x0A60_0001, 3868));
    assert_eq!(
        ct.insert(&s, FrontendId(0), BackendId(4), BACKEND, TcpFlags::NONE, t0),
        ConnState::Sctp(SctpState::Init1)
    );
    assert_eq!(ct.get(&s, t0).unwrap().expires, t0 + secs(4));
    let hit = ct.lookup_reply(&s, TcpFlags::NONE, t0).unwrap();
    assert_eq!(hit.state, ConnState::Sctp(SctpState::Established));
    assert_eq!(ct.counts(BackendId(4)), (1, 0));
    assert_eq!(ct.get(&s, t0).unwrap().expires, t0 + secs(900));
}

#[test]
fn a_million_flows_stay_within_the_bound() {
    let _g = serial();
    let ct = tracker(65_536);
    let mut warm = None;
    for i in 0..1_000_000u32 {
        let now = micros(u64::from(i));
        ct.insert(&tcp(i), FrontendId(0), BackendId(i % 16), BACKEND, SYN, now);
        if i % 997 == 0 {
            assert!(ct.len() <= 65_536, "{i}: {}", ct.len());
        }
        if i == 300_000 {
            warm = Some(ct.memory_total_bytes());
        }
    }
    assert!(ct.len() <= 65_536);
    assert!(ct.len() > 60_000, "{}", ct.len());
    assert_eq!(
        Some(ct.memory_total_bytes()),
        warm,
        "memory grew after warm-up"
    );
    let per = ct.memory_bytes();
    assert!(per <= 64, "{per} bytes per connection");
    let total: u32 = (0..16).map(|b| ct.connections(BackendId(b))).sum();
    assert_eq!(total as usize, ct.len());
}

/// An instant `us` microseconds after the epoch.
fn micros(us: u64) -> Instant {
    Instant::from_nanos(us * 1000)
}

fn recount(ct: &Conntrack, now: Instant) -> HashMap<BackendId, (u32, u32)> {
    let mut m: HashMap<BackendId, (u32, u32)> = HashMap::new();
    for t in ct.entries(now) {
        let c = m.entry(t.backend).or_default();
        if t.state.is_active() {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
    m
}

#[test]
fn counts_equal_a_recount_and_the_sweep_is_bounded() {
    let _g = serial();
    let ct = Conntrack::new(
        ConntrackConfig::new(50_000)
            .unwrap()
            .hash_key([5, 5, 5, 5])
            .reap_batch(128)
            .unwrap(),
    );
    let t0 = Instant::from_secs(10);
    for i in 0..20_000u32 {
        let f = tcp(i);
        ct.insert(&f, FrontendId(0), BackendId(i % 7), BACKEND, SYN, t0);
        match i % 4 {
            0 => drop(ct.lookup(&f, ACK, t0)),
            1 => drop(ct.lookup(&f, RST, t0)),
            2 => drop(ct.lookup_reply(&f, FIN, t0)),
            _ => {}
        }
    }
    for i in (0..20_000).step_by(11) {
        ct.remove(&tcp(i));
    }
    let want = recount(&ct, t0);
    for b in 0..7 {
        assert_eq!(ct.counts(BackendId(b)), want[&BackendId(b)], "backend {b}");
    }
    assert!(ct.poll_timeout().is_some());

    // Jump past every timeout: a bounded number of steps reaps all.
    let late = t0 + secs(901);
    let slots_per_shard = (50_000usize / 64 * 4).div_ceil(3) + 1;
    let bound = slots_per_shard.div_ceil(128) + 1;
    let mut calls = 0;
    let mut removed = 0;
    let before = ct.len();
    while !ct.is_empty() {
        let next = ct.poll_timeout().unwrap();
        removed += ct.handle_timeout(late.max(next));
        calls += 1;
        assert!(calls <= bound, "{calls} calls > {bound}");
    }
    assert_eq!(removed, before);
    for b in 0..7 {
        assert_eq!(ct.counts(BackendId(b)), (0, 0));
    }
    assert_eq!(ct.poll_timeout(), None);
}

// ---- proptest against a naive reference tracker ----

#[derive(Clone, Copy, Debug, PartialEq)]
struct RefEntry {
    frontend: FrontendId,
    backend: BackendId,
    backend_addr: SocketAddr,
    state: ConnState,
    expires: Instant,
}

/// A plain map with explicit timers: expired entries are dropped when the
/// clock passes them.
#[derive(Default)]
struct Reference {
    map: HashMap<Flow, RefEntry>,
    timeouts: Option<Timeouts>,
}

impl Reference {
    fn t(&self) -> &Timeouts {
        self.timeouts.as_ref().unwrap()
    }
    fn expire(&mut self, now: Instant) {
        self.map.retain(|_, e| now < e.expires);
    }
    fn packet(&mut self, f: &Flow, dir: Direction, flags: TcpFlags, now: Instant) -> Option<Hit> {
        self.expire(now);
        let t = self.t().clone();
        let e = self.map.get_mut(f)?;
        let previous = e.state;
        e.state = previous.next(dir, flags);
        // A packet's expiry: the timeout from now, rounded up to the grain.
        let exact = (now + t.timeout(e.state)).as_nanos();
        e.expires = Instant::from_nanos(exact.div_ceil(EXPIRY_GRAIN_NS) * EXPIRY_GRAIN_NS);
        Some(Hit {
            frontend: e.frontend,
            backend: e.backend,
            backend_addr: e.backend_addr,
            state: e.state,
            previous,
            masquerade: false,
        })
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert(usize, u32, u8),
    Packet(usize, u8),
    Reply(usize, u8),
    Get(usize),
    Remove(usize),
    RetainNot(u32),
    Advance(u64),
    Sweep,
}

fn flows() -> Vec<Flow> {
    let mut v = Vec::new();
    for i in 0..12u32 {
        let src = v4(0x0A00_0000 + i, 40_000);
        let dst = v4(0x0A60_0001, 80);
        v.push(Flow::new(Protocol::Tcp, src, dst));
        v.push(Flow::new(Protocol::Udp, src, dst));
        if i < 3 {
            v.push(Flow::new(Protocol::Sctp, src, dst));
            let s6: SocketAddr = format!("[fd00::{}]:40000", i + 1).parse().unwrap();
            let d6: SocketAddr = "[fd00::a]:80".parse().unwrap();
            v.push(Flow::new(Protocol::Tcp, s6, d6));
            v.push(Flow::new(Protocol::Udp, s6, d6));
        }
    }
    v
}

fn backend_addr(b: u32) -> SocketAddr {
    if b == 4 {
        "[fd00::99]:8080".parse().unwrap()
    } else {
        v4(0x0A01_0000 + b, 8080)
    }
}

fn flags_of(bits: u8) -> TcpFlags {
    let all = [
        TcpFlags::NONE,
        SYN,
        ACK,
        FIN,
        RST,
        SYN | ACK,
        FIN | ACK,
        RST | ACK,
    ];
    all[bits as usize % all.len()]
}

fn op() -> impl Strategy<Value = Op> {
    let n = flows().len();
    prop_oneof![
        3 => (0..n, 0..5u32, any::<u8>()).prop_map(|(f, b, x)| Op::Insert(f, b, x)),
        4 => (0..n, any::<u8>()).prop_map(|(f, x)| Op::Packet(f, x)),
        3 => (0..n, any::<u8>()).prop_map(|(f, x)| Op::Reply(f, x)),
        1 => (0..n).prop_map(Op::Get),
        1 => (0..n).prop_map(Op::Remove),
        1 => (0..5u32).prop_map(Op::RetainNot),
        2 => prop_oneof![
            Just(0u64),
            Just(1),
            Just(1_000_000_000),
            Just(2_000_000_000),
            Just(9_999_999_999),
            Just(10_000_000_000),
            Just(60_000_000_000),
            Just(120_000_000_000),
            Just(300_000_000_000),
            Just(900_000_000_000),
            0..1_000_000_000_000u64,
        ]
        .prop_map(Op::Advance),
        1 => Just(Op::Sweep),
    ]
}

/// Sweeps until every expired entry is gone, then compares everything.
fn drain_and_compare(ct: &Conntrack, r: &mut Reference, now: Instant) {
    for _ in 0..8 {
        ct.handle_timeout(now);
    }
    r.expire(now);
    assert_eq!(ct.len(), r.map.len());
    let mut got: Vec<_> = ct.entries(now);
    got.sort_by_key(|t| format!("{}", t.flow));
    let mut want: Vec<_> = r
        .map
        .iter()
        .map(|(f, e)| Tracked {
            flow: *f,
            frontend: e.frontend,
            backend: e.backend,
            backend_addr: e.backend_addr,
            state: e.state,
            expires: e.expires,
        })
        .collect();
    want.sort_by_key(|t| format!("{}", t.flow));
    assert_eq!(got, want);
    for b in 0..5 {
        let (mut a, mut i) = (0, 0);
        for e in r.map.values().filter(|e| e.backend == BackendId(b)) {
            if e.state.is_active() { a += 1 } else { i += 1 }
        }
        assert_eq!(ct.counts(BackendId(b)), (a, i), "backend {b}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn matches_a_naive_reference(ops in proptest::collection::vec(op(), 1..120)) {
        let _g = serial();
        // Large enough that nothing is evicted; few shards, so that one
        // sweep step covers a shard (8 steps drain everything).
        let ct = Conntrack::new(
            ConntrackConfig::new(4096).unwrap().shards(4).unwrap().hash_key([3, 1, 4, 1]),
        );
        let mut r = Reference { timeouts: Some(Timeouts::ipvs()), ..Default::default() };
        let fs = flows();
        let mut now = Instant::from_secs(1);
        for op in ops {
            match op {
                Op::Insert(f, b, x) => {
                    let flags = flags_of(x);
                    let fl = &fs[f];
                    let got = ct.insert(fl, FrontendId(b * 10), BackendId(b), backend_addr(b), flags, now);
                    let state = ConnState::initial(fl.protocol, flags);
                    prop_assert_eq!(got, state);
                    r.map.insert(*fl, RefEntry {
                        frontend: FrontendId(b * 10),
                        backend: BackendId(b),
                        backend_addr: backend_addr(b),
                        state,
                        expires: now + r.t().timeout(state),
                    });
                }
                Op::Packet(f, x) => {
                    let got = ct.lookup(&fs[f], flags_of(x), now);
                    prop_assert_eq!(got, r.packet(&fs[f], Direction::Original, flags_of(x), now));
                }
                Op::Reply(f, x) => {
                    let got = ct.lookup_reply(&fs[f], flags_of(x), now);
                    prop_assert_eq!(got, r.packet(&fs[f], Direction::Reply, flags_of(x), now));
                }
                Op::Get(f) => {
                    r.expire(now);
                    let got = ct.get(&fs[f], now).map(|t| (t.backend, t.state, t.expires));
                    let want = r.map.get(&fs[f]).map(|e| (e.backend, e.state, e.expires));
                    prop_assert_eq!(got, want);
                }
                Op::Remove(f) => {
                    r.expire(now);
                    let got = ct.remove_live(&fs[f], now).map(|t| (t.backend, t.state));
                    let want = r.map.remove(&fs[f]).map(|e| (e.backend, e.state));
                    prop_assert_eq!(got, want);
                }
                Op::RetainNot(b) => {
                    ct.retain(|t| t.backend != BackendId(b));
                    r.map.retain(|_, e| e.backend != BackendId(b));
                }
                Op::Advance(dt) => now = Instant::from_nanos(now.as_nanos() + dt),
                Op::Sweep => drain_and_compare(&ct, &mut r, now),
            }
        }
        drain_and_compare(&ct, &mut r, now);
    }
}

// ---- zero allocations on the hot paths ----

#[test]
fn hit_and_warm_insert_allocate_nothing() {
    let _g = serial();
    let ct = tracker(65_536);
    // Warm: fill past the bound so every table has its final size; the
    // newest flows are the ones LRU eviction keeps.
    for i in 0..200_000u32 {
        let at = micros(u64::from(i));
        ct.insert(&tcp(i), FrontendId(0), BackendId(i % 8), BACKEND, SYN, at);
    }
    let now = Instant::from_secs(1);
    let live: Vec<Flow> = (199_900..200_000).map(tcp).collect();
    let v6 = Flow::tcp(
        "[fd00::1]:1000".parse().unwrap(),
        "[fd00::a]:80".parse().unwrap(),
    );
    ct.insert(&v6, FrontendId(0), BackendId(1), BACKEND, SYN, now);

    let region = Region::new(GLOBAL);
    let mut hits = 0;
    for f in &live {
        hits += usize::from(ct.lookup(f, ACK, now).is_some());
        hits += usize::from(ct.lookup_reply(f, ACK, now).is_some());
        hits += usize::from(ct.get(f, now).is_some());
    }
    hits += usize::from(ct.lookup(&v6, ACK, now).is_some());
    let stats = region.change();
    assert!(hits > 250, "{hits}");
    assert_eq!(stats.allocations, 0, "hits allocated: {stats:?}");

    let region = Region::new(GLOBAL);
    for i in 300_000..310_000u32 {
        ct.insert(&tcp(i), FrontendId(0), BackendId(i % 8), BACKEND, SYN, now);
    }
    ct.handle_timeout(now);
    let stats = region.change();
    assert_eq!(stats.allocations, 0, "warm inserts allocated: {stats:?}");
    assert!(ct.len() <= 65_536);
}

// ---- threads ----

#[test]
fn threads_share_one_tracker_and_counts_stay_exact() {
    let _g = serial();
    let ct = Conntrack::new(
        ConntrackConfig::new(8192)
            .unwrap()
            .hash_key([7, 7, 7, 7])
            .reap_batch(32)
            .unwrap(),
    );
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let ct = &ct;
            s.spawn(move || {
                for i in 0..20_000u32 {
                    let f = tcp(t * 100_000 + i % 5000);
                    let now = micros(u64::from(i) * 10_000);
                    match i % 5 {
                        0 | 1 => {
                            ct.insert(&f, FrontendId(t), BackendId(i % 6), BACKEND, SYN, now);
                        }
                        2 => drop(ct.lookup(&f, ACK, now)),
                        3 => drop(ct.lookup_reply(&f, FIN, now)),
                        _ => drop(ct.remove(&f)),
                    }
                }
            });
        }
        s.spawn(|| {
            for i in 0..200u64 {
                ct.handle_timeout(micros(i * 1_000_000));
                ct.retain(|t| t.backend != BackendId(5) || t.state.is_active());
            }
        });
    });
    // Sweep nothing more: every entry, dead or alive, is still counted.
    let far = Instant::ZERO;
    let want = recount(&ct, far);
    for b in 0..6 {
        assert_eq!(
            ct.counts(BackendId(b)),
            want.get(&BackendId(b)).copied().unwrap_or_default(),
            "backend {b}"
        );
    }
    assert!(ct.len() <= 8192);
    assert_eq!(ct.entries(far).len(), ct.len());
}
