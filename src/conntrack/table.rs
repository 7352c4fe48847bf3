//! One shard's open-addressing tables: entries stored inline as runs of
//! atomic words, so that packet threads read and update them without the
//! shard's lock (see the [parent module](super)'s "Concurrency").
//!
//! Linear probing, backward-shift deletion (no tombstones), geometric
//! growth up to a fixed maximum, after which a table never allocates
//! again.
//!
//! # A slot
//! Word 0 is the control word: the state code in bits 0–6 (0: empty), the
//! masquerade bit in bit 7, the slot lock in bit 8, the persistence template's control code in bits
//! 9–15 (0: none; see `control`), 16 bits of layout data in bits 16–31 and the
//! entry's 32-bit slot hash in bits 32–63. Word 1 is the expiry in
//! nanoseconds, word 2 the frontend id (high half) and backend id (low
//! half); the rest is the layout's ([`V4`]: 5 words, 40 bytes; [`Wide`]:
//! 13 words, 104 bytes).
//!
//! Whoever changes a slot's words holds its lock: a packet thread for the
//! state and expiry of its own connection, the shard's writer (holding the
//! shard mutex) to fill, move or clear it. The lock lives in the slot's own
//! words, so two threads touch the same cache line only for the same
//! connection (or a neighbour in the same line).

use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::state::ConnState;
use super::{BackendId, FrontendId, Tracked};
use crate::{Flow, Instant, Protocol};

/// The slot lock bit of a control word.
pub(crate) const LOCK: u64 = 1 << 8;
/// The masquerade bit of a control word: the dataplane source-NATs the
/// connection (decided at its first packet, as netfilter's NAT binding is).
const MASQ: u64 = 1 << 7;
const CODE_MASK: u64 = 0x7F;

/// Whether control word `ctl` has the masquerade bit.
#[inline]
pub(crate) const fn masq_of(ctl: u64) -> bool {
    ctl & MASQ != 0
}

/// Entry words `e` with the masquerade bit set to `on`.
#[inline]
pub(crate) fn with_masq<const N: usize>(mut e: [u64; N], on: bool) -> [u64; N] {
    if on {
        e[0] |= MASQ;
    }
    e
}

/// The state code of a control word (0: empty).
#[inline]
pub(crate) const fn code_of(ctl: u64) -> u8 {
    (ctl & CODE_MASK) as u8
}

#[inline]
const fn hash_of(ctl: u64) -> u32 {
    (ctl >> 32) as u32
}

#[inline]
const fn aux_of(ctl: u64) -> u16 {
    (ctl >> 16) as u16
}

/// The persistence-template control code of a control word (0: none).
#[inline]
pub(crate) const fn control_of(ctl: u64) -> u8 {
    ((ctl >> 9) & 0x7F) as u8
}

/// Entry words `e` with control code `control` set in the control word.
#[inline]
pub(crate) fn with_control<const N: usize>(mut e: [u64; N], control: u8) -> [u64; N] {
    e[0] |= u64::from(control & 0x7F) << 9;
    e
}

/// A control word (unlocked).
#[inline]
const fn make_ctl(code: u8, aux: u16, hash: u32) -> u64 {
    code as u64 | (aux as u64) << 16 | (hash as u64) << 32
}

/// `ctl` with its state code replaced.
#[inline]
pub(crate) const fn with_code(ctl: u64, code: u8) -> u64 {
    (ctl & !CODE_MASK) | code as u64
}

const fn protocol_of(code: u8) -> Protocol {
    match code {
        0..=11 => Protocol::Tcp,
        12 | 13 => Protocol::Udp,
        _ => Protocol::Sctp,
    }
}

/// How an entry's words are laid out.
pub(crate) trait Layout: Send + Sync + 'static {
    /// Words per slot.
    const W: usize;
    /// The probe key.
    type Key;
    /// Whether slot words `w` (control word `ctl`) hold `key`.
    fn matches(w: &[AtomicU64], ctl: u64, key: &Self::Key) -> bool;
    /// The flow of the entry in `w`.
    fn flow(w: &[AtomicU64], ctl: u64) -> Flow;
    /// The backend address of the entry in `w`.
    fn backend_addr(w: &[AtomicU64], ctl: u64) -> SocketAddr;
}

#[inline]
fn load(w: &AtomicU64) -> u64 {
    w.load(Ordering::Relaxed)
}

/// The entry in `w` as a [`Tracked`] (the caller holds the slot lock or
/// the shard mutex, or accepts a torn read).
pub(crate) fn tracked<L: Layout>(w: &[AtomicU64], ctl: u64) -> Tracked {
    let (frontend, backend) = ids(w);
    Tracked {
        flow: L::flow(w, ctl),
        frontend,
        backend,
        backend_addr: L::backend_addr(w, ctl),
        state: ConnState::from_code(code_of(ctl)),
        expires: Instant::from_nanos(load(&w[1])),
    }
}

/// The frontend and backend ids in `w`.
#[inline]
pub(crate) fn ids(w: &[AtomicU64]) -> (FrontendId, BackendId) {
    let fb = load(&w[2]);
    (FrontendId((fb >> 32) as u32), BackendId(fb as u32))
}

/// The backend address of [`V4`] slot words `w` (control word `ctl`).
#[inline]
pub(crate) fn v4_backend(w: &[AtomicU64], ctl: u64) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(load(&w[4]) as u32), aux_of(ctl))
}

/// The expiry in `w`, in nanoseconds.
#[inline]
pub(crate) fn expires(w: &[AtomicU64]) -> u64 {
    load(&w[1])
}

/// Sets the expiry in `w` (the caller holds the slot lock).
#[inline]
pub(crate) fn set_expires(w: &[AtomicU64], nanos: u64) {
    w[1].store(nanos, Ordering::Relaxed);
}

/// All-IPv4 connections: 5 words. Word 3 is the source and destination
/// address, word 4 the source and destination port and the backend
/// address; the backend port is the control word's layout data.
pub(crate) struct V4;

/// The key of an all-IPv4 flow.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct V4Key {
    pub(crate) src: u32,
    pub(crate) dst: u32,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) proto: Protocol,
}

impl V4Key {
    pub(crate) fn of(flow: &Flow) -> Option<V4Key> {
        match (flow.src, flow.dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => Some(V4Key {
                src: u32::from(*s.ip()),
                dst: u32::from(*d.ip()),
                sport: s.port(),
                dport: d.port(),
                proto: flow.protocol,
            }),
            _ => None,
        }
    }

    /// The two words the keyed hash reads.
    pub(crate) fn words(&self) -> (u64, u64) {
        (
            (u64::from(self.src) << 32) | u64::from(self.dst),
            (u64::from(self.sport) << 32) | (u64::from(self.dport) << 8) | self.proto as u64,
        )
    }

    #[inline]
    fn ports(&self) -> u64 {
        (u64::from(self.sport) << 16) | u64::from(self.dport)
    }

    /// The words of a new entry.
    pub(crate) fn entry(
        &self,
        hash: u32,
        frontend: FrontendId,
        backend: BackendId,
        backend_addr: SocketAddrV4,
        state: ConnState,
        expires: u64,
    ) -> [u64; 5] {
        [
            make_ctl(state.code(), backend_addr.port(), hash),
            expires,
            ids_word(frontend, backend),
            (u64::from(self.src) << 32) | u64::from(self.dst),
            (self.ports() << 32) | u64::from(u32::from(*backend_addr.ip())),
        ]
    }
}

fn ids_word(frontend: FrontendId, backend: BackendId) -> u64 {
    (u64::from(frontend.0) << 32) | u64::from(backend.0)
}

impl Layout for V4 {
    const W: usize = 5;
    type Key = V4Key;

    #[inline]
    fn matches(w: &[AtomicU64], ctl: u64, k: &V4Key) -> bool {
        load(&w[3]) == ((u64::from(k.src) << 32) | u64::from(k.dst))
            && load(&w[4]) >> 32 == k.ports()
            && protocol_of(code_of(ctl)) == k.proto
    }

    fn flow(w: &[AtomicU64], ctl: u64) -> Flow {
        let (a, p) = (load(&w[3]), load(&w[4]) >> 32);
        Flow::new(
            protocol_of(code_of(ctl)),
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from((a >> 32) as u32),
                (p >> 16) as u16,
            )),
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(a as u32), p as u16)),
        )
    }

    #[inline]
    fn backend_addr(w: &[AtomicU64], ctl: u64) -> SocketAddr {
        SocketAddr::V4(v4_backend(w, ctl))
    }
}

/// Any other connection (IPv6, mixed families): 13 words. Words 3–6 are the
/// source and destination addresses (128 bits each, an IPv4 address in the
/// low 32), word 7 the source, destination and backend ports, words 8–9
/// the source's and destination's flow info and scope id, words 10–11 the
/// backend address and word 12 its flow info and scope id. The layout data
/// says which addresses are IPv6 (bit 0 source, 1 destination, 2 backend).
pub(crate) struct Wide;

/// The key of any flow, as [`Wide`] stores it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct WideKey {
    /// Words 3–6, 8 and 9.
    words: [u64; 6],
    /// Source and destination ports.
    ports: u64,
    /// Families (bits 0 and 1).
    families: u16,
    proto: Protocol,
}

fn addr_words(a: &SocketAddr) -> (u64, u64, u64, bool) {
    match a {
        SocketAddr::V4(a) => (0, u64::from(u32::from(*a.ip())), 0, false),
        SocketAddr::V6(a) => {
            let bits = u128::from(*a.ip());
            (
                (bits >> 64) as u64,
                bits as u64,
                (u64::from(a.flowinfo()) << 32) | u64::from(a.scope_id()),
                true,
            )
        }
    }
}

fn addr_from(hi: u64, lo: u64, extra: u64, port: u16, v6: bool) -> SocketAddr {
    if v6 {
        let ip = Ipv6Addr::from((u128::from(hi) << 64) | u128::from(lo));
        SocketAddr::V6(SocketAddrV6::new(
            ip,
            port,
            (extra >> 32) as u32,
            extra as u32,
        ))
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(lo as u32)), port)
    }
}

impl WideKey {
    pub(crate) fn of(flow: &Flow) -> WideKey {
        let (sh, sl, sx, s6) = addr_words(&flow.src);
        let (dh, dl, dx, d6) = addr_words(&flow.dst);
        WideKey {
            words: [sh, sl, dh, dl, sx, dx],
            ports: (u64::from(flow.src.port()) << 16) | u64::from(flow.dst.port()),
            families: u16::from(s6) | (u16::from(d6) << 1),
            proto: flow.protocol,
        }
    }

    /// The words of a new entry.
    pub(crate) fn entry(
        &self,
        hash: u32,
        frontend: FrontendId,
        backend: BackendId,
        backend_addr: SocketAddr,
        state: ConnState,
        expires: u64,
    ) -> [u64; 13] {
        let (bh, bl, bx, b6) = addr_words(&backend_addr);
        let [sh, sl, dh, dl, sx, dx] = self.words;
        [
            make_ctl(state.code(), self.families | (u16::from(b6) << 2), hash),
            expires,
            ids_word(frontend, backend),
            sh,
            sl,
            dh,
            dl,
            (self.ports << 32) | (u64::from(backend_addr.port()) << 16),
            sx,
            dx,
            bh,
            bl,
            bx,
        ]
    }
}

impl Layout for Wide {
    const W: usize = 13;
    type Key = WideKey;

    #[inline]
    fn matches(w: &[AtomicU64], ctl: u64, k: &WideKey) -> bool {
        let [sh, sl, dh, dl, sx, dx] = k.words;
        load(&w[3]) == sh
            && load(&w[4]) == sl
            && load(&w[5]) == dh
            && load(&w[6]) == dl
            && load(&w[8]) == sx
            && load(&w[9]) == dx
            && load(&w[7]) >> 32 == k.ports
            && aux_of(ctl) & 3 == k.families
            && protocol_of(code_of(ctl)) == k.proto
    }

    fn flow(w: &[AtomicU64], ctl: u64) -> Flow {
        let ports = load(&w[7]) >> 32;
        let fam = aux_of(ctl);
        Flow::new(
            protocol_of(code_of(ctl)),
            addr_from(
                load(&w[3]),
                load(&w[4]),
                load(&w[8]),
                (ports >> 16) as u16,
                fam & 1 != 0,
            ),
            addr_from(
                load(&w[5]),
                load(&w[6]),
                load(&w[9]),
                ports as u16,
                fam & 2 != 0,
            ),
        )
    }

    fn backend_addr(w: &[AtomicU64], ctl: u64) -> SocketAddr {
        addr_from(
            load(&w[10]),
            load(&w[11]),
            load(&w[12]),
            (load(&w[7]) >> 16) as u16,
            aux_of(ctl) & 4 != 0,
        )
    }
}

/// Spins before a packet thread gives up on a locked slot and takes the
/// shard's lock instead (a slot stays locked for good in a table that has
/// been replaced by a larger one).
const FAST_SPINS: u32 = 64;

#[inline]
fn backoff(tries: u32) {
    if tries < 64 {
        core::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// A table's slot array, shared between the shard's writer and the
/// packet threads (an `Arc` published through the shard's `ArcSwap`).
pub(crate) struct Slots<L> {
    words: Box<[AtomicU64]>,
    n: usize,
    _layout: PhantomData<L>,
}

impl<L: Layout> Slots<L> {
    pub(crate) fn new(n: usize) -> Self {
        Slots {
            words: (0..n * L::W).map(|_| AtomicU64::new(0)).collect(),
            n,
            _layout: PhantomData,
        }
    }

    /// Slots in the array.
    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.n
    }

    /// The words of slot `i`.
    #[inline]
    pub(crate) fn slot(&self, i: usize) -> &[AtomicU64] {
        &self.words[i * L::W..(i + 1) * L::W]
    }

    /// The control word of slot `i`.
    #[inline]
    pub(crate) fn ctl(&self, i: usize) -> u64 {
        self.words[i * L::W].load(Ordering::Acquire)
    }

    #[inline]
    fn home(&self, hash: u32) -> usize {
        ((u64::from(hash) * self.n as u64) >> 32) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.n { 0 } else { i + 1 }
    }

    /// `Ok(index)` of the slot whose words hold `key`, or `Err(index)` of
    /// the empty slot the probe ended on (`Err(usize::MAX)` if there are
    /// no slots, or if concurrent moves kept the probe from ending). Stable
    /// under the shard mutex; without it, a hint to confirm under the slot
    /// lock ([`lock_if`](Self::lock_if)).
    #[inline]
    pub(crate) fn find(&self, key: &L::Key, hash: u32) -> Result<usize, usize> {
        self.find_ctl(key, hash).map(|(i, _)| i)
    }

    /// [`find`](Self::find) with the control word the match was made
    /// against (a packet thread's read-only hit validates the slot against
    /// it afterwards).
    #[inline]
    pub(crate) fn find_ctl(&self, key: &L::Key, hash: u32) -> Result<(usize, u64), usize> {
        if self.n == 0 {
            return Err(usize::MAX);
        }
        let mut i = self.home(hash);
        for _ in 0..self.n {
            let ctl = self.ctl(i);
            if code_of(ctl) == 0 {
                return Err(i);
            }
            if hash_of(ctl) == hash && L::matches(self.slot(i), ctl, key) {
                return Ok((i, ctl));
            }
            i = self.next(i);
        }
        Err(usize::MAX)
    }

    /// A packet thread's lock on slot `i` if it holds `key`: the control
    /// word (unlocked value), with the lock held. `None` if the slot no
    /// longer holds the key, or stays locked (`spins` tries; unbounded
    /// with `None`).
    #[inline]
    pub(crate) fn lock_if(
        &self,
        i: usize,
        key: &L::Key,
        hash: u32,
        spins: Option<u32>,
    ) -> Option<u64> {
        let w = self.slot(i);
        let mut tries = 0;
        loop {
            let c = w[0].load(Ordering::Relaxed);
            if c & LOCK == 0 {
                if code_of(c) == 0 || hash_of(c) != hash {
                    return None;
                }
                if w[0]
                    .compare_exchange_weak(c, c | LOCK, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    if L::matches(w, c, key) {
                        return Some(c);
                    }
                    w[0].store(c, Ordering::Release);
                    return None;
                }
            }
            tries += 1;
            if spins.is_some_and(|s| tries >= s) {
                return None;
            }
            backoff(tries);
        }
    }

    /// [`lock_if`](Self::lock_if) with the packet path's bounded spin.
    #[inline]
    pub(crate) fn lock_fast(&self, i: usize, key: &L::Key, hash: u32) -> Option<u64> {
        self.lock_if(i, key, hash, Some(FAST_SPINS))
    }

    /// The writer's lock on slot `i`, whatever it holds: waits for a packet
    /// thread to let go. Returns the control word (unlocked value).
    pub(crate) fn lock(&self, i: usize) -> u64 {
        let w = &self.words[i * L::W];
        let mut tries = 0;
        loop {
            let c = w.load(Ordering::Relaxed);
            if c & LOCK == 0
                && w.compare_exchange_weak(c, c | LOCK, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return c;
            }
            tries += 1;
            backoff(tries);
        }
    }

    /// Releases slot `i`'s lock, with control word `ctl`.
    #[inline]
    pub(crate) fn unlock(&self, i: usize, ctl: u64) {
        self.words[i * L::W].store(ctl & !LOCK, Ordering::Release);
    }

    /// Fills locked or empty slot `i` with `words` (the control word
    /// last, which also releases the lock).
    fn fill(&self, i: usize, words: &[u64]) {
        let w = self.slot(i);
        for k in 1..L::W {
            w[k].store(words[k], Ordering::Relaxed);
        }
        w[0].store(words[0] & !LOCK, Ordering::Release);
    }

    /// Copies the words of locked slot `from` into locked slot `to`, and
    /// releases `to` with `ctl` (`from`'s control word).
    fn copy(&self, from: usize, to: usize, ctl: u64) {
        let (src, dst) = (self.slot(from), self.slot(to));
        for k in 1..L::W {
            dst[k].store(load(&src[k]), Ordering::Relaxed);
        }
        dst[0].store(ctl & !LOCK, Ordering::Release);
    }
}

/// Fewest slots of a table that holds anything.
const MIN_SLOTS: usize = 16;

/// The slots a shard bounded to `bound` entries ends with: load 0.75 at
/// the bound, and always at least one empty slot.
pub(crate) fn max_slots(bound: usize) -> usize {
    (bound * 4).div_ceil(3).max(bound + 1)
}

/// The seqlock word of a shard: odd while its writer moves or removes
/// entries, so that a packet thread's lock-free miss can tell it may have
/// probed past an entry in motion.
pub(crate) struct WriteSeq<'a> {
    seq: &'a AtomicU64,
    open: bool,
}

impl<'a> WriteSeq<'a> {
    /// A write section on `seq` (the caller holds the shard mutex).
    pub(crate) fn new(seq: &'a AtomicU64) -> Self {
        WriteSeq { seq, open: false }
    }

    /// Marks the section as moving entries (once).
    #[inline]
    pub(crate) fn moving(&mut self) {
        if !self.open {
            self.open = true;
            self.seq.fetch_add(1, Ordering::Relaxed);
            std::sync::atomic::fence(Ordering::Release);
        }
    }
}

impl Drop for WriteSeq<'_> {
    fn drop(&mut self) {
        if self.open {
            self.seq.fetch_add(1, Ordering::Release);
        }
    }
}

/// A table's slot arrays, shared between the shard's writer and the packet
/// threads: one array per size step (16 slots, ×8 while a step is at most
/// 1/64 of the maximum, then the maximum), each allocated when the table
/// first grows to it and kept for the tracker's life, so that a packet
/// thread reads the current one with one atomic load and no reference
/// count. The arrays below the last add at most 1/56 of its size.
pub(crate) struct Levels<L> {
    empty: Slots<L>,
    /// The size steps, inline (not behind a pointer: one dependent load
    /// less on every packet); the first `count` are used.
    levels: [(usize, OnceLock<Slots<L>>); MAX_LEVELS],
    count: usize,
    /// The current array: 0 for `empty`, `k + 1` for `levels[k]`.
    current: AtomicUsize,
}

/// Most size steps a table can have: 16 slots ×8 while a step is at most
/// 1/64 of the maximum, then the maximum (9 steps for the largest
/// capacity, 2^32 entries in one shard).
const MAX_LEVELS: usize = 12;

impl<L: Layout> Levels<L> {
    /// The size steps up to `max_slots`.
    pub(crate) fn new(max_slots: usize) -> Self {
        let mut sizes = Vec::new();
        let mut n = MIN_SLOTS;
        while n.saturating_mul(64) <= max_slots {
            sizes.push(n);
            n *= 8;
        }
        sizes.push(max_slots);
        assert!(sizes.len() <= MAX_LEVELS, "{} size steps", sizes.len());
        Levels {
            empty: Slots::new(0),
            levels: std::array::from_fn(|i| (sizes.get(i).copied().unwrap_or(0), OnceLock::new())),
            count: sizes.len(),
            current: AtomicUsize::new(0),
        }
    }

    /// The size steps in use.
    fn steps(&self) -> &[(usize, OnceLock<Slots<L>>)] {
        &self.levels[..self.count]
    }

    /// The array at step `k` (0: the empty one).
    #[inline]
    fn at(&self, k: usize) -> &Slots<L> {
        match k.checked_sub(1).and_then(|i| self.levels.get(i)) {
            Some((_, a)) => a.get().unwrap_or(&self.empty),
            None => &self.empty,
        }
    }

    /// The current array, for a packet thread.
    #[inline]
    pub(crate) fn current(&self) -> &Slots<L> {
        self.at(self.current.load(Ordering::Acquire))
    }

    fn bytes(&self) -> usize {
        self.steps()
            .iter()
            .filter_map(|(_, a)| a.get())
            .map(|a| a.words.len() * size_of::<AtomicU64>())
            .sum()
    }
}

/// The writer's side of one table (held under the shard mutex): the
/// current slot array and its bookkeeping.
pub(crate) struct Table<L> {
    levels: Arc<Levels<L>>,
    /// The current step of `levels`.
    level: usize,
    len: usize,
    max_slots: usize,
    /// Bumped on every resize (entries move).
    generation: u64,
    /// Bumped on every removal (later entries of its run shift back by one).
    removals: u64,
}

impl<L: Layout> Table<L> {
    /// An empty table over `levels` (which the packet threads read).
    pub(crate) fn new(max_slots: usize, levels: &Arc<Levels<L>>) -> Self {
        Table {
            levels: Arc::clone(levels),
            level: 0,
            len: 0,
            max_slots,
            generation: 0,
            removals: 0,
        }
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(crate) fn slots(&self) -> &Slots<L> {
        self.levels.at(self.level)
    }

    #[inline]
    pub(crate) fn slot_count(&self) -> usize {
        self.slots().n
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn removals(&self) -> u64 {
        self.removals
    }

    /// Bytes of every slot array allocated so far.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.levels.bytes()
    }

    /// The home slot of `hash` (the table must have slots).
    #[inline]
    pub(crate) fn home_of(&self, hash: u32) -> usize {
        self.slots().home(hash)
    }

    /// As [`Slots::find`], stable under the shard mutex.
    #[inline]
    pub(crate) fn find(&self, key: &L::Key, hash: u32) -> Result<usize, usize> {
        self.slots().find(key, hash)
    }

    /// Whether inserting one more entry would grow the table.
    #[inline]
    fn needs_growth(&self) -> bool {
        let n = self.slot_count();
        n < self.max_slots && self.level < self.levels.steps().len() && (self.len + 1) * 4 > n * 3
    }

    /// Grows to the next size step and publishes it. Every slot of the old
    /// array is left locked (frozen), so that no packet thread updates an
    /// entry after it was copied; one that meets a frozen slot takes the
    /// shard lock and finds the new array.
    fn grow(&mut self, seq: &mut WriteSeq<'_>) {
        seq.moving();
        let levels = &*self.levels;
        let (n, cell) = &levels.levels[self.level];
        let new = cell.get_or_init(|| Slots::new(*n));
        let old = levels.at(self.level);
        for i in 0..old.n {
            let ctl = old.lock(i);
            if code_of(ctl) != 0 {
                let mut j = new.home(hash_of(ctl));
                while code_of(new.ctl(j)) != 0 {
                    j = new.next(j);
                }
                let (src, dst) = (old.slot(i), new.slot(j));
                for k in 1..L::W {
                    dst[k].store(load(&src[k]), Ordering::Relaxed);
                }
                dst[0].store(ctl, Ordering::Relaxed);
            }
        }
        self.level += 1;
        levels.current.store(self.level, Ordering::Release);
        self.generation += 1;
    }

    /// Inserts an entry whose key is absent, from its words; `hint` is the
    /// slot a `find` returned as `Err` since the last change, or
    /// `usize::MAX`.
    pub(crate) fn insert_absent(&mut self, words: &[u64], mut hint: usize, seq: &mut WriteSeq<'_>) {
        if self.needs_growth() {
            self.grow(seq);
            hint = usize::MAX;
        }
        let t = self.slots();
        let mut i = if hint == usize::MAX {
            t.home(hash_of(words[0]))
        } else {
            hint
        };
        while code_of(t.ctl(i)) != 0 {
            i = t.next(i);
        }
        t.fill(i, words);
        self.len += 1;
    }

    /// Removes the entry at `i` (backward-shift deletion) and returns it,
    /// with its control code.
    pub(crate) fn remove_at(&mut self, i: usize, seq: &mut WriteSeq<'_>) -> (Tracked, u8) {
        let ctl = self.slots().lock(i);
        self.remove_locked(i, ctl, seq)
    }

    /// [`remove_at`](Self::remove_at) of a slot the caller has locked
    /// (`ctl`: its control word).
    pub(crate) fn remove_locked(
        &mut self,
        i: usize,
        ctl: u64,
        seq: &mut WriteSeq<'_>,
    ) -> (Tracked, u8) {
        seq.moving();
        let t = self.levels.at(self.level);
        let n = t.n;
        let removed = tracked::<L>(t.slot(i), ctl);
        let mut hole = i;
        let mut j = t.next(i);
        loop {
            let c = t.ctl(j);
            if code_of(c) == 0 {
                break;
            }
            let home = t.home(hash_of(c));
            // Move the entry back into the hole if the hole lies in [home, j).
            if (j + n - home) % n >= (j + n - hole) % n {
                let c = t.lock(j);
                t.copy(j, hole, c);
                hole = j;
            }
            j = t.next(j);
        }
        let w = t.slot(hole);
        for word in &w[1..] {
            word.store(0, Ordering::Relaxed);
        }
        w[0].store(0, Ordering::Release);
        self.len -= 1;
        self.removals = self.removals.wrapping_add(1);
        (removed, control_of(ctl))
    }

    /// `i` moved back by up to `by` slots, not past an empty slot nor past
    /// 0: where an entry seen at `i` can be after `by` removals (each shifts
    /// an entry back by at most one slot, within its run).
    pub(crate) fn back_up(&self, mut i: usize, by: u64) -> usize {
        let mut left = by;
        let t = self.slots();
        while left > 0 && i > 0 && i <= t.n && code_of(t.ctl(i - 1)) != 0 {
            i -= 1;
            left -= 1;
        }
        i
    }

    /// The entry at `i`, read under its slot lock; `None` if empty.
    pub(crate) fn read(&self, i: usize) -> Option<Tracked> {
        let s = self.slots();
        if code_of(s.ctl(i)) == 0 {
            return None;
        }
        let ctl = s.lock(i);
        let t = tracked::<L>(s.slot(i), ctl);
        s.unlock(i, ctl);
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::TcpState;

    fn key(i: u32) -> V4Key {
        V4Key {
            src: i,
            dst: 7,
            sport: 1,
            dport: 80,
            proto: Protocol::Tcp,
        }
    }

    fn entry(i: u32, hash: u32) -> [u64; 5] {
        key(i).entry(
            hash,
            FrontendId(0),
            BackendId(i),
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
            ConnState::Tcp(TcpState::Established),
            1,
        )
    }

    #[test]
    fn layout() {
        assert_eq!(V4::W * 8, 40);
        assert_eq!(Wide::W * 8, 104);
        assert_eq!(max_slots(1024), 1366);
        assert_eq!(max_slots(1), 2);
    }

    #[test]
    fn words_round_trip() {
        let flows = [
            Flow::tcp(
                "10.0.0.1:40000".parse().unwrap(),
                "10.96.0.1:80".parse().unwrap(),
            ),
            Flow::udp(
                "[fd00::1]:5353".parse().unwrap(),
                "[fd00::a]:53".parse().unwrap(),
            ),
            Flow::new(
                Protocol::Sctp,
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 9, 7, 3)),
                "[::ffff:10.0.0.1]:36412".parse().unwrap(),
            ),
        ];
        let backends: [SocketAddr; 2] = [
            "10.1.0.5:8080".parse().unwrap(),
            SocketAddr::V6(SocketAddrV6::new("fd00::99".parse().unwrap(), 53, 1, 2)),
        ];
        for flow in flows {
            for b in backends {
                let state = ConnState::initial(flow.protocol, crate::conntrack::TcpFlags::SYN);
                let k = WideKey::of(&flow);
                let words = k.entry(0xABCD, FrontendId(3), BackendId(9), b, state, 77);
                let s = Slots::<Wide>::new(1);
                s.fill(0, &words);
                let ctl = s.ctl(0);
                assert!(Wide::matches(s.slot(0), ctl, &k));
                let t = tracked::<Wide>(s.slot(0), ctl);
                assert_eq!(
                    (t.flow, t.backend_addr, t.frontend, t.backend, t.state),
                    (flow, b, FrontendId(3), BackendId(9), state)
                );
                assert_eq!(t.expires, Instant::from_nanos(77));
                if let (Some(k4), SocketAddr::V4(b4)) = (V4Key::of(&flow), b) {
                    let words = k4.entry(1, FrontendId(3), BackendId(9), b4, state, 77);
                    let s = Slots::<V4>::new(1);
                    s.fill(0, &words);
                    let ctl = s.ctl(0);
                    assert!(V4::matches(s.slot(0), ctl, &k4));
                    assert_eq!(tracked::<V4>(s.slot(0), ctl), t);
                }
            }
        }
    }

    #[test]
    fn colliding_inserts_and_removes_keep_every_key_findable() {
        let seq = AtomicU64::new(0);
        let levels = Arc::new(Levels::<V4>::new(max_slots(40)));
        let mut t = Table::<V4>::new(max_slots(40), &levels);
        // Few distinct hashes, so that runs form and wrap.
        let hash = |i: u32| (i % 5).wrapping_mul(0x3333_3333) | 0xF000_0000;
        for i in 0..40 {
            let h = hash(i);
            let hint = t.find(&key(i), h).unwrap_err();
            t.insert_absent(&entry(i, h), hint, &mut WriteSeq::new(&seq));
        }
        assert_eq!(t.len(), 40);
        assert_eq!(t.slot_count(), 54);
        assert_eq!(levels.current().count(), 54);
        for i in (0..40).step_by(3) {
            let at = t.find(&key(i), hash(i)).unwrap();
            let (gone, control) = t.remove_at(at, &mut WriteSeq::new(&seq));
            assert_eq!(gone.backend, BackendId(i));
            assert_eq!(control, 0);
        }
        assert_eq!(seq.load(Ordering::Relaxed) % 2, 0);
        for i in 0..40 {
            let found = t.find(&key(i), hash(i));
            assert_eq!(found.is_ok(), i % 3 != 0, "{i}");
            if let Ok(at) = found {
                assert_eq!(t.read(at).unwrap().backend, BackendId(i));
                // Unlocked after the read.
                assert_eq!(t.slots().ctl(at) & LOCK, 0);
            }
        }
        let live = (0..t.slot_count()).filter_map(|i| t.read(i)).count();
        assert_eq!(live, t.len());
    }

    #[test]
    fn a_grown_table_freezes_the_old_slots() {
        let seq = AtomicU64::new(0);
        let levels = Arc::new(Levels::<V4>::new(max_slots(1000)));
        // Steps of 16, then the maximum.
        let steps: Vec<usize> = levels.steps().iter().map(|(n, _)| *n).collect();
        assert_eq!(steps, [16, 1334]);
        let big = Levels::<V4>::new(max_slots(1 << 20));
        let steps: Vec<usize> = big.steps().iter().map(|(n, _)| *n).collect();
        assert_eq!(steps, [16, 128, 1024, 8192, max_slots(1 << 20)]);
        let small = Levels::<V4>::new(max_slots(100));
        assert_eq!(small.steps().len(), 1);
        let mut t = Table::<V4>::new(max_slots(1000), &levels);
        t.insert_absent(&entry(1, 5), usize::MAX, &mut WriteSeq::new(&seq));
        let old = levels.current();
        assert_eq!(old.count(), 16);
        let at = old.find(&key(1), 5).unwrap();
        assert!(old.lock_fast(at, &key(1), 5).is_some_and(|c| {
            old.unlock(at, c);
            true
        }));
        for i in 2..20 {
            t.insert_absent(&entry(i, i * 977), usize::MAX, &mut WriteSeq::new(&seq));
        }
        assert_eq!(t.slot_count(), 1334);
        // The old array still holds the entry, frozen: a packet thread gives
        // up on it and goes to the shard lock.
        assert_eq!(old.find(&key(1), 5), Ok(at));
        assert_eq!(old.lock_fast(at, &key(1), 5), None);
        let new = levels.current();
        assert_eq!(new.count(), 1334);
        let at = new.find(&key(1), 5).unwrap();
        let c = new.lock_fast(at, &key(1), 5).unwrap();
        new.unlock(at, c);
        assert_eq!(seq.load(Ordering::Relaxed) % 2, 0);
        // Both arrays stay allocated.
        assert_eq!(t.memory_bytes(), (16 + 1334) * 40);
    }
}
