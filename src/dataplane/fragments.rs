//! The connection layer's record of fragmented datagrams: a first
//! fragment's [`FragmentKey`] to the tracked connection it belongs to, so
//! that later fragments (which hold no ports) follow that connection.

use core::time::Duration;
use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;

use crate::model::flow::{Flow, FragmentKey};
use crate::time::Instant;

/// How long a datagram's record lives: Linux's IPv4 reassembly timeout
/// (`net.ipv4.ipfrag_time`, 30 s; IPv6's `ip6frag_time` is the same).
pub(crate) const FRAGMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many datagrams are recorded at once; past it the oldest goes.
pub(crate) const FRAGMENT_DATAGRAMS: usize = 1024;

/// Shards, so that packet threads handling fragments of different
/// datagrams take different locks.
const SHARDS: usize = 16;

/// The datagrams whose first fragment was routed, each to the original
/// direction of its connection, for [`FRAGMENT_TIMEOUT`]. Bounded
/// ([`FRAGMENT_DATAGRAMS`]); allocated whole when created (at a
/// dataplane's first fragmented datagram), so recording and looking up
/// allocate nothing.
#[derive(Debug)]
pub(crate) struct Fragments {
    hasher: ahash::RandomState,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Debug)]
struct Shard {
    capacity: usize,
    entries: HashMap<FragmentKey, (Flow, Instant), ahash::RandomState>,
    /// Keys in insertion order with their deadlines: the oldest first.
    order: VecDeque<(FragmentKey, Instant)>,
}

impl Fragments {
    pub(crate) fn new() -> Fragments {
        let capacity = FRAGMENT_DATAGRAMS / SHARDS;
        Fragments {
            hasher: ahash::RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        capacity,
                        // Twice the capacity: at most half full, so when
                        // removals' tombstones use up the free slots the
                        // table rehashes in place instead of growing
                        // (hashbrown grows only past half full).
                        entries: HashMap::with_capacity_and_hasher(
                            capacity * 2,
                            ahash::RandomState::new(),
                        ),
                        order: VecDeque::with_capacity(capacity),
                    })
                })
                .collect(),
        }
    }

    #[inline]
    fn shard(&self, key: &FragmentKey) -> &Mutex<Shard> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        &self.shards[i]
    }

    /// Records that the datagram `key` belongs to the connection whose
    /// original direction is `conn`. A key already recorded keeps its
    /// deadline and takes the new connection.
    pub(crate) fn insert(&self, key: FragmentKey, conn: Flow, now: Instant) {
        let mut s = self.shard(&key).lock();
        if let Some(e) = s.entries.get_mut(&key) {
            e.0 = conn;
            return;
        }
        s.expire(now);
        if s.entries.len() >= s.capacity {
            if let Some((old, _)) = s.order.pop_front() {
                s.entries.remove(&old);
            }
        }
        let deadline = now + FRAGMENT_TIMEOUT;
        s.entries.insert(key, (conn, deadline));
        s.order.push_back((key, deadline));
    }

    /// The connection the datagram `key` was recorded for, if its time is
    /// not up.
    pub(crate) fn get(&self, key: &FragmentKey, now: Instant) -> Option<Flow> {
        match self.shard(key).lock().entries.get(key) {
            Some(&(conn, deadline)) if now < deadline => Some(conn),
            _ => None,
        }
    }

    /// Drops the records whose time is up.
    pub(crate) fn expire(&self, now: Instant) {
        for s in self.shards.iter() {
            s.lock().expire(now);
        }
    }
}

impl Shard {
    fn expire(&mut self, now: Instant) {
        while let Some(&(key, deadline)) = self.order.front() {
            if deadline > now {
                break;
            }
            self.order.pop_front();
            if self.entries.get(&key).is_some_and(|e| e.1 == deadline) {
                self.entries.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Protocol;

    fn key(id: u32) -> FragmentKey {
        FragmentKey {
            src: "10.2.0.9".parse().unwrap(),
            dst: "10.96.0.10".parse().unwrap(),
            id,
            protocol: Protocol::Udp,
        }
    }

    #[test]
    fn records_expire_after_the_reassembly_timeout() {
        let f = Fragments::new();
        let conn = Flow::udp(
            "10.2.0.9:40000".parse().unwrap(),
            "10.96.0.10:53".parse().unwrap(),
        );
        f.insert(key(7), conn, Instant::ZERO);
        assert_eq!(f.get(&key(7), Instant::from_secs(29)), Some(conn));
        assert_eq!(f.get(&key(8), Instant::from_secs(1)), None);
        assert_eq!(f.get(&key(7), Instant::from_secs(30)), None);
        f.expire(Instant::from_secs(30));
        assert!(f.shards.iter().all(|s| s.lock().entries.is_empty()));
    }

    #[test]
    fn the_table_is_bounded_and_the_oldest_goes() {
        let f = Fragments::new();
        let conn = Flow::udp(
            "10.2.0.9:40000".parse().unwrap(),
            "10.96.0.10:53".parse().unwrap(),
        );
        let n = (FRAGMENT_DATAGRAMS * 4) as u32;
        for id in 0..n {
            f.insert(key(id), conn, Instant::ZERO);
        }
        let held: usize = f.shards.iter().map(|s| s.lock().entries.len()).sum();
        assert!(held <= FRAGMENT_DATAGRAMS, "{held}");
        assert_eq!(f.get(&key(n - 1), Instant::ZERO), Some(conn));
        assert_eq!(f.get(&key(0), Instant::ZERO), None);
    }
}
