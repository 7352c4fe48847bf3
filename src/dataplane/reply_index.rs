//! The reply index: backend (protocol, address) -> the frontends that list
//! it, so that a reply (backend to client) finds its tracked connection
//! by probing the original direction (client to each frontend).
//!
//! A fixed array of buckets, each an [`ArcSwapOption`] of a small immutable
//! list, indexed by a keyed hash (ahash with a random state: nobody outside
//! should predict where a key lands). The writer changes a key by storing a
//! new copy of its one bucket, in place, so a change costs one bucket copy
//! whatever the number of keys: no path of shared nodes to copy and no
//! reference counts of cold siblings to touch, which is what the persistent
//! trie this replaces spent at 500,000 keys (issue 11: with the tracker on,
//! adding a service at 100,000 services cost about 3× its cost at 10,
//! against 2× with the tracker off).
//!
//! A reader loads one bucket (no lock, no allocation, no shared write) and
//! compares its few keys. Because changes land in place rather than with
//! the snapshot, the writer orders them around the snapshot's publication
//! (see [`super::conn::ConnLayer::publish`]): what a batch adds is in the
//! index before the batch's table is visible, and what it takes away goes
//! only after, so any reader, on the old table or the new, finds the
//! frontends of every connection that table can make.
//!
//! The array does not grow in place: when the keys would outnumber the
//! buckets, the writer builds a new index of twice the size from the plan
//! and publishes it with the snapshot (amortised O(1) per key, as any hash
//! table's growth), and a full sync builds one sized to fit, so a shrunk
//! cluster gives its memory back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwapOption;
use smallvec::SmallVec;

use crate::plan::FrontendKey;

use std::net::SocketAddr;

/// The frontends (their addresses) that list one backend: where a reply
/// from that backend may belong.
pub(crate) type ReplyFrontends = SmallVec<[SocketAddr; 2]>;

/// One bucket's keys and their frontends; never changed once published.
type Bucket = SmallVec<[(FrontendKey, ReplyFrontends); 1]>;

/// Fewest buckets an index with keys has.
const MIN_BUCKETS: usize = 64;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct ReplyIndex {
    hasher: ahash::RandomState,
    buckets: Box<[ArcSwapOption<Bucket>]>,
    /// Keys held; read and written only by the writer (under the
    /// planner's lock), so readers never touch it.
    len: AtomicUsize,
}

impl Default for ReplyIndex {
    /// An empty index with no buckets (what a dataplane without a tracker
    /// keeps: nothing reads it).
    fn default() -> Self {
        ReplyIndex::with_capacity(0)
    }
}

impl ReplyIndex {
    /// An empty index with room for `keys` keys before it must grow (two
    /// buckets per key, a power of two, at least [`MIN_BUCKETS`]; none for
    /// no keys).
    pub(crate) fn with_capacity(keys: usize) -> Self {
        let n = if keys == 0 {
            0
        } else {
            keys.saturating_mul(2).next_power_of_two().max(MIN_BUCKETS)
        };
        ReplyIndex {
            hasher: ahash::RandomState::new(),
            buckets: (0..n).map(|_| ArcSwapOption::empty()).collect(),
            len: AtomicUsize::new(0),
        }
    }

    /// The number of keys.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether `keys` keys fit without the buckets being outnumbered, and
    /// without the index being more than 8× too big for them (past that, a
    /// rebuild gives memory back).
    pub(crate) fn fits(&self, keys: usize) -> bool {
        let n = self.buckets.len();
        keys <= n && (n <= MIN_BUCKETS || keys.saturating_mul(8) >= n)
    }

    #[inline]
    fn slot(&self, key: &FrontendKey) -> Option<&ArcSwapOption<Bucket>> {
        if self.buckets.is_empty() {
            return None;
        }
        let h = self.hasher.hash_one(key) as usize;
        self.buckets.get(h & (self.buckets.len() - 1))
    }

    /// Calls `f` on each frontend listing `key` until it returns `Some`.
    /// No lock, no allocation.
    #[inline]
    pub(crate) fn find_map<R>(
        &self,
        key: &FrontendKey,
        mut f: impl FnMut(SocketAddr) -> Option<R>,
    ) -> Option<R> {
        let bucket = self.slot(key)?.load();
        let (_, fronts) = bucket.as_ref()?.iter().find(|e| e.0 == *key)?;
        fronts.iter().find_map(|fe| f(*fe))
    }

    /// The frontends listing `key` (a copy; for the writer and tests).
    pub(crate) fn get(&self, key: &FrontendKey) -> ReplyFrontends {
        self.slot(key)
            .and_then(|s| {
                let b = s.load();
                b.as_ref()?
                    .iter()
                    .find(|e| e.0 == *key)
                    .map(|e| e.1.clone())
            })
            .unwrap_or_default()
    }

    /// Sets the frontends of `key` (none removes it) by storing a new copy
    /// of its bucket. Writer only. Does nothing if the index has no
    /// buckets; the writer sizes it first ([`ReplyIndex::fits`]).
    pub(crate) fn set(&self, key: FrontendKey, fronts: ReplyFrontends) {
        let Some(slot) = self.slot(&key) else {
            return;
        };
        let old = slot.load();
        let mut bucket: Bucket = old.as_deref().cloned().unwrap_or_default();
        drop(old);
        match bucket.iter().position(|e| e.0 == key) {
            Some(i) if fronts.is_empty() => {
                bucket.swap_remove(i);
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            Some(i) => bucket[i].1 = fronts,
            None if fronts.is_empty() => return,
            None => {
                bucket.push((key, fronts));
                self.len.fetch_add(1, Ordering::Relaxed);
            }
        }
        slot.store((!bucket.is_empty()).then(|| Arc::new(bucket)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flow::Protocol;

    fn key(i: u32) -> FrontendKey {
        FrontendKey::new(
            Protocol::Tcp,
            SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 8080)),
        )
    }

    fn fe(i: u16) -> SocketAddr {
        SocketAddr::from(([10, 96, 0, 1], i))
    }

    /// Against a std map: sets, replaces and removes (with collisions: 64
    /// buckets for 200 keys).
    #[test]
    fn matches_a_map() {
        let index = ReplyIndex::with_capacity(1);
        assert_eq!(index.buckets.len(), MIN_BUCKETS);
        let mut model = std::collections::HashMap::new();
        for i in 0..2000u32 {
            let k = key(i % 200);
            let fronts: ReplyFrontends = if i % 5 == 2 {
                SmallVec::new()
            } else {
                (0..(i % 4) as u16).map(fe).collect()
            };
            if fronts.is_empty() {
                model.remove(&k);
            } else {
                model.insert(k, fronts.clone());
            }
            index.set(k, fronts);
            assert_eq!(index.len(), model.len());
        }
        for i in 0..200 {
            let k = key(i);
            let want = model.get(&k).cloned().unwrap_or_default();
            assert_eq!(index.get(&k), want);
            let seen: Vec<SocketAddr> = {
                let mut v = Vec::new();
                index.find_map(&k, |a| {
                    v.push(a);
                    None::<()>
                });
                v
            };
            assert_eq!(seen.as_slice(), want.as_slice());
        }
    }

    #[test]
    fn an_index_without_buckets_holds_nothing() {
        let index = ReplyIndex::default();
        index.set(key(1), [fe(80)].into_iter().collect());
        assert_eq!(index.len(), 0);
        assert!(index.get(&key(1)).is_empty());
        assert!(!index.fits(1));
        assert!(index.fits(0));
    }

    #[test]
    fn it_fits_until_outnumbered_and_not_when_far_too_big() {
        let index = ReplyIndex::with_capacity(1000);
        assert_eq!(index.buckets.len(), 2048);
        assert!(index.fits(2048));
        assert!(!index.fits(2049));
        assert!(index.fits(256));
        assert!(!index.fits(255), "8x too big: rebuild smaller");
    }
}
