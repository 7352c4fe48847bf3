//! One shard's open-addressing table: inline entries, linear probing,
//! backward-shift deletion (no tombstones), geometric growth up to a fixed
//! maximum, after which it never allocates again.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use super::state::ConnState;
use super::{BackendId, FrontendId, Tracked};
use crate::{Flow, Instant, Protocol};

/// What a table stores per slot.
pub(crate) trait Entry: Copy {
    /// The probe key.
    type Key;
    /// An empty slot (state code 0).
    const EMPTY: Self;
    fn code(&self) -> u8;
    fn set_code(&mut self, code: u8);
    fn hash(&self) -> u32;
    fn expires(&self) -> u64;
    fn set_expires(&mut self, nanos: u64);
    fn backend(&self) -> u32;
    fn frontend(&self) -> u32;
    fn backend_addr(&self) -> SocketAddr;
    fn flow(&self) -> Flow;
    fn key_eq(&self, key: &Self::Key) -> bool;

    fn state(&self) -> ConnState {
        ConnState::from_code(self.code())
    }

    fn tracked(&self) -> Tracked {
        Tracked {
            flow: self.flow(),
            frontend: FrontendId(self.frontend()),
            backend: BackendId(self.backend()),
            backend_addr: self.backend_addr(),
            state: self.state(),
            expires: Instant::from_nanos(self.expires()),
        }
    }
}

const fn protocol_of(code: u8) -> Protocol {
    match code {
        0..=11 => Protocol::Tcp,
        12 | 13 => Protocol::Udp,
        _ => Protocol::Sctp,
    }
}

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
}

/// A connection whose flow and backend are all IPv4: 40 bytes. The
/// protocol is implied by the state code.
#[derive(Clone, Copy, Debug)]
pub(crate) struct V4Entry {
    expires: u64,
    src: u32,
    dst: u32,
    baddr: u32,
    hash: u32,
    frontend: u32,
    backend: u32,
    sport: u16,
    dport: u16,
    bport: u16,
    code: u8,
}

impl V4Entry {
    pub(crate) fn new(
        key: &V4Key,
        hash: u32,
        frontend: u32,
        backend: u32,
        backend_addr: SocketAddrV4,
        state: ConnState,
        expires: u64,
    ) -> Self {
        V4Entry {
            expires,
            src: key.src,
            dst: key.dst,
            baddr: u32::from(*backend_addr.ip()),
            hash,
            frontend,
            backend,
            sport: key.sport,
            dport: key.dport,
            bport: backend_addr.port(),
            code: state.code(),
        }
    }
}

impl Entry for V4Entry {
    type Key = V4Key;
    const EMPTY: Self = V4Entry {
        expires: 0,
        src: 0,
        dst: 0,
        baddr: 0,
        hash: 0,
        frontend: 0,
        backend: 0,
        sport: 0,
        dport: 0,
        bport: 0,
        code: 0,
    };
    #[inline]
    fn code(&self) -> u8 {
        self.code
    }
    #[inline]
    fn set_code(&mut self, code: u8) {
        self.code = code;
    }
    #[inline]
    fn hash(&self) -> u32 {
        self.hash
    }
    #[inline]
    fn expires(&self) -> u64 {
        self.expires
    }
    #[inline]
    fn set_expires(&mut self, nanos: u64) {
        self.expires = nanos;
    }
    #[inline]
    fn backend(&self) -> u32 {
        self.backend
    }
    #[inline]
    fn frontend(&self) -> u32 {
        self.frontend
    }
    fn backend_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(self.baddr), self.bport))
    }
    fn flow(&self) -> Flow {
        Flow::new(
            protocol_of(self.code),
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(self.src), self.sport)),
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(self.dst), self.dport)),
        )
    }
    #[inline]
    fn key_eq(&self, k: &V4Key) -> bool {
        self.src == k.src
            && self.dst == k.dst
            && self.sport == k.sport
            && self.dport == k.dport
            && protocol_of(self.code) == k.proto
    }
}

/// Any other connection (IPv6, mixed families): the flow and backend
/// address stored whole.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WideEntry {
    expires: u64,
    flow: Flow,
    backend_addr: SocketAddr,
    hash: u32,
    frontend: u32,
    backend: u32,
    code: u8,
}

impl WideEntry {
    pub(crate) fn new(
        flow: &Flow,
        hash: u32,
        frontend: u32,
        backend: u32,
        backend_addr: SocketAddr,
        state: ConnState,
        expires: u64,
    ) -> Self {
        WideEntry {
            expires,
            flow: *flow,
            backend_addr,
            hash,
            frontend,
            backend,
            code: state.code(),
        }
    }
}

const UNSPECIFIED: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

impl Entry for WideEntry {
    type Key = Flow;
    const EMPTY: Self = WideEntry {
        expires: 0,
        flow: Flow::new(Protocol::Tcp, UNSPECIFIED, UNSPECIFIED),
        backend_addr: UNSPECIFIED,
        hash: 0,
        frontend: 0,
        backend: 0,
        code: 0,
    };
    fn code(&self) -> u8 {
        self.code
    }
    fn set_code(&mut self, code: u8) {
        self.code = code;
    }
    fn hash(&self) -> u32 {
        self.hash
    }
    fn expires(&self) -> u64 {
        self.expires
    }
    fn set_expires(&mut self, nanos: u64) {
        self.expires = nanos;
    }
    fn backend(&self) -> u32 {
        self.backend
    }
    fn frontend(&self) -> u32 {
        self.frontend
    }
    fn backend_addr(&self) -> SocketAddr {
        self.backend_addr
    }
    fn flow(&self) -> Flow {
        self.flow
    }
    fn key_eq(&self, k: &Flow) -> bool {
        self.flow == *k
    }
}

/// Fewest slots of a table that holds anything.
const MIN_SLOTS: usize = 16;

/// The slots a shard bounded to `bound` entries ends with: load 0.75 at
/// the bound, and always at least one empty slot.
pub(crate) fn max_slots(bound: usize) -> usize {
    (bound * 4).div_ceil(3).max(bound + 1)
}

/// An open-addressing table of inline entries.
pub(crate) struct Table<E> {
    slots: Vec<E>,
    len: usize,
    max_slots: usize,
    /// Bumped on every resize (entries move).
    generation: u64,
    /// Bumped on every removal (later entries of its run shift back by one).
    removals: u64,
}

impl<E: Entry> Table<E> {
    pub(crate) fn new(max_slots: usize) -> Self {
        Table {
            slots: Vec::new(),
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
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn removals(&self) -> u64 {
        self.removals
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<E>()
    }

    /// The home slot of `hash` (the table must have slots).
    #[inline]
    pub(crate) fn home_of(&self, hash: u32) -> usize {
        Self::home(hash, self.slots.len())
    }

    #[inline]
    fn home(hash: u32, n: usize) -> usize {
        ((u64::from(hash) * n as u64) >> 32) as usize
    }

    #[inline]
    fn next(i: usize, n: usize) -> usize {
        if i + 1 == n { 0 } else { i + 1 }
    }

    /// `Ok(index)` of the entry for `key`, or `Err(index)` of the empty
    /// slot where it would go (`Err(usize::MAX)` if there are no slots).
    #[inline]
    pub(crate) fn find(&self, key: &E::Key, hash: u32) -> Result<usize, usize> {
        let n = self.slots.len();
        if n == 0 {
            return Err(usize::MAX);
        }
        let mut i = Self::home(hash, n);
        loop {
            let e = &self.slots[i];
            if e.code() == 0 {
                return Err(i);
            }
            if e.hash() == hash && e.key_eq(key) {
                return Ok(i);
            }
            i = Self::next(i, n);
        }
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> &E {
        &self.slots[i]
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, i: usize) -> &mut E {
        &mut self.slots[i]
    }

    /// Whether inserting one more entry would grow the table.
    #[inline]
    pub(crate) fn needs_growth(&self) -> bool {
        let n = self.slots.len();
        n < self.max_slots && (self.len + 1) * 4 > n * 3
    }

    /// Grows geometrically (doubling, the last step to `max_slots`).
    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(MIN_SLOTS).min(self.max_slots);
        let old = std::mem::replace(&mut self.slots, vec![E::EMPTY; n]);
        self.generation += 1;
        for e in old {
            if e.code() != 0 {
                let mut i = Self::home(e.hash(), n);
                while self.slots[i].code() != 0 {
                    i = Self::next(i, n);
                }
                self.slots[i] = e;
            }
        }
    }

    /// Inserts `entry`, whose key is absent; `hint` is the slot a `find`
    /// returned as `Err` since the last change, or `usize::MAX`.
    pub(crate) fn insert_absent(&mut self, entry: E, mut hint: usize) {
        if self.needs_growth() {
            self.grow();
            hint = usize::MAX;
        }
        let n = self.slots.len();
        let mut i = if hint == usize::MAX {
            Self::home(entry.hash(), n)
        } else {
            hint
        };
        while self.slots[i].code() != 0 {
            i = Self::next(i, n);
        }
        self.slots[i] = entry;
        self.len += 1;
    }

    /// Removes the entry at `i` (backward-shift deletion) and returns it.
    pub(crate) fn remove_at(&mut self, i: usize) -> E {
        let n = self.slots.len();
        let removed = self.slots[i];
        let mut hole = i;
        let mut j = Self::next(i, n);
        loop {
            let e = self.slots[j];
            if e.code() == 0 {
                break;
            }
            let home = Self::home(e.hash(), n);
            // Move e back into the hole if the hole lies in [home, j).
            if (j + n - home) % n >= (j + n - hole) % n {
                self.slots[hole] = e;
                hole = j;
            }
            j = Self::next(j, n);
        }
        self.slots[hole] = E::EMPTY;
        self.len -= 1;
        self.removals = self.removals.wrapping_add(1);
        removed
    }

    /// `i` moved back by up to `by` slots, not past an empty slot nor past
    /// 0: where an entry seen at `i` can be after `by` removals (each shifts
    /// an entry back by at most one slot, within its run).
    pub(crate) fn back_up(&self, mut i: usize, by: u64) -> usize {
        let mut left = by;
        while left > 0 && i > 0 && i <= self.slots.len() && self.slots[i - 1].code() != 0 {
            i -= 1;
            left -= 1;
        }
        i
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &E> {
        self.slots.iter().filter(|e| e.code() != 0)
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

    fn entry(i: u32, hash: u32) -> V4Entry {
        V4Entry::new(
            &key(i),
            hash,
            0,
            0,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
            ConnState::Tcp(TcpState::Established),
            1,
        )
    }

    #[test]
    fn layout() {
        assert_eq!(size_of::<V4Entry>(), 40);
        assert!(size_of::<WideEntry>() <= 128);
        assert_eq!(max_slots(1024), 1366);
        assert_eq!(max_slots(1), 2);
    }

    #[test]
    fn colliding_inserts_and_removes_keep_every_key_findable() {
        // Few distinct hashes, so that runs form and wrap.
        let mut t = Table::<V4Entry>::new(max_slots(40));
        let hash = |i: u32| (i % 5).wrapping_mul(0x3333_3333) | 0xF000_0000;
        for i in 0..40 {
            let h = hash(i);
            let hint = t.find(&key(i), h).unwrap_err();
            t.insert_absent(entry(i, h), hint);
        }
        assert_eq!(t.len(), 40);
        assert_eq!(t.slot_count(), 54);
        for i in (0..40).step_by(3) {
            let at = t.find(&key(i), hash(i)).unwrap();
            t.remove_at(at);
        }
        for i in 0..40 {
            assert_eq!(t.find(&key(i), hash(i)).is_ok(), i % 3 != 0, "{i}");
        }
        assert_eq!(t.iter().count(), t.len());
    }
}
