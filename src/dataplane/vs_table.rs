//! The virtual-service table of the hash-table modes (IPVS, nftables, the
//! eBPF model): a persistent hash trie keyed by [`FrontendKey`].
//!
//! The trie has a fixed depth of three branch levels (the root and two
//! more, of 64, 64 and 8 children: 32,768 leaves, so that even 100,000
//! virtual services leave a handful per leaf), above leaves of a few entries, indexed by a keyed hash
//! of the frontend key (ahash with a random state: the trie only speeds up
//! lookups, so nobody outside should predict where a key lands).
//!
//! Nodes are reference-counted and copied on write ([`Arc::make_mut`]'s
//! rule): a change mutates a node in place when its version owns it
//! alone, and copies it when another version shares it. The IPVS and
//! nftables modes keep two versions, left-right (see
//! [`super::ipvs`]): the writer changes the one readers have let go of,
//! so its nodes are its own and a change touches only its key's path,
//! copying nothing. When a reader still holds that version, the writer
//! clones the published one instead (only the root: the versions share
//! every other node), and each insert or remove then copies just the
//! nodes on its key's path (a node already copied in this batch is
//! changed in place): 136 child pointers and one small leaf, whatever the
//! number of services. Either way a whole batch is published with one
//! pointer store: readers see all of it or none of it.
//!
//! A lookup hashes the key once and follows three pointers to a leaf,
//! then compares the hash and key of its few entries: no lock, no
//! allocation, no atomic operation.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::plan::FrontendKey;

/// One entry: the key's hash, the key, the value.
type Entry<V> = (u64, FrontendKey, Arc<V>);

/// A level of the trie: a branch of children, or a leaf.
pub(crate) trait Level<V>: Sized {
    fn empty() -> Self;
    fn copy(&self) -> Self;
    /// `shift`: the hash bits the levels above used.
    fn get(&self, h: u64, key: &FrontendKey, shift: u32) -> Option<&Arc<V>>;
    fn insert(&mut self, h: u64, key: FrontendKey, value: Arc<V>, shift: u32) -> Option<Arc<V>>;
    fn remove(&mut self, h: u64, key: &FrontendKey, shift: u32) -> Option<Arc<V>>;
    fn is_empty(&self) -> bool;
    #[cfg(test)]
    fn for_each<'a>(&'a self, f: &mut dyn FnMut(&'a Entry<V>));
}

/// A branch of `N` children (a power of two), inline: one pointer to
/// follow per level.
#[derive(Debug)]
pub(crate) struct Branch<C, const N: usize> {
    children: [Option<Arc<C>>; N],
}

impl<C, const N: usize> Branch<C, N> {
    const BITS: u32 = N.trailing_zeros();

    /// The child slot of hash `h` below `shift` used bits.
    #[inline]
    fn index(h: u64, shift: u32) -> usize {
        ((h << shift) >> (64 - Self::BITS)) as usize
    }
}

/// A leaf: its few entries inline.
#[derive(Debug)]
pub(crate) struct Leaf<V> {
    entries: SmallVec<[Entry<V>; 2]>,
}

/// A node shared by versions, copied on write (like [`Arc::make_mut`],
/// without asking `Clone` of the values).
fn make_mut<C: Level<V>, V>(node: &mut Arc<C>) -> &mut C {
    if Arc::get_mut(node).is_none() {
        *node = Arc::new(node.copy());
    }
    Arc::get_mut(node).expect("unique after the copy")
}

impl<C: Level<V>, V, const N: usize> Level<V> for Branch<C, N> {
    fn empty() -> Self {
        Branch {
            children: core::array::from_fn(|_| None),
        }
    }

    fn copy(&self) -> Self {
        Branch {
            children: self.children.clone(),
        }
    }

    #[inline]
    fn get(&self, h: u64, key: &FrontendKey, shift: u32) -> Option<&Arc<V>> {
        self.children[Self::index(h, shift)]
            .as_deref()?
            .get(h, key, shift + Self::BITS)
    }

    fn insert(&mut self, h: u64, key: FrontendKey, value: Arc<V>, shift: u32) -> Option<Arc<V>> {
        let child =
            self.children[Self::index(h, shift)].get_or_insert_with(|| Arc::new(C::empty()));
        make_mut(child).insert(h, key, value, shift + Self::BITS)
    }

    fn remove(&mut self, h: u64, key: &FrontendKey, shift: u32) -> Option<Arc<V>> {
        let slot = &mut self.children[Self::index(h, shift)];
        let child = make_mut(slot.as_mut()?);
        let removed = child.remove(h, key, shift + Self::BITS);
        if child.is_empty() {
            *slot = None;
        }
        removed
    }

    fn is_empty(&self) -> bool {
        self.children.iter().all(Option::is_none)
    }

    #[cfg(test)]
    fn for_each<'a>(&'a self, f: &mut dyn FnMut(&'a Entry<V>)) {
        for c in self.children.iter().flatten() {
            c.for_each(f);
        }
    }
}

impl<V> Level<V> for Leaf<V> {
    fn empty() -> Self {
        Leaf {
            entries: SmallVec::new(),
        }
    }

    fn copy(&self) -> Self {
        Leaf {
            entries: self.entries.clone(),
        }
    }

    #[inline]
    fn get(&self, h: u64, key: &FrontendKey, _shift: u32) -> Option<&Arc<V>> {
        self.entries
            .iter()
            .find(|e| e.0 == h && e.1 == *key)
            .map(|e| &e.2)
    }

    fn insert(&mut self, h: u64, key: FrontendKey, value: Arc<V>, _shift: u32) -> Option<Arc<V>> {
        if let Some(e) = self.entries.iter_mut().find(|e| e.0 == h && e.1 == key) {
            return Some(core::mem::replace(&mut e.2, value));
        }
        self.entries.push((h, key, value));
        None
    }

    fn remove(&mut self, h: u64, key: &FrontendKey, _shift: u32) -> Option<Arc<V>> {
        let i = self.entries.iter().position(|e| e.0 == h && e.1 == *key)?;
        Some(self.entries.swap_remove(i).2)
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    #[cfg(test)]
    fn for_each<'a>(&'a self, f: &mut dyn FnMut(&'a Entry<V>)) {
        self.entries.iter().for_each(f);
    }
}

/// The root: three branch levels above the leaves, of 64, 64 and 8
/// children (32,768 leaves). A change copies one node per level; the
/// lowest level is the narrowest because its children (the leaves) are
/// the ones least likely to be in cache when their counts are touched.
pub(crate) type Root<V> = Branch<Branch<Branch<Leaf<V>, 8>, 64>, 64>;

/// Children of the root.
#[cfg(test)]
const FANOUT: usize = 64;

/// A persistent map from frontend keys to shared values; see the module
/// docs.
#[derive(Debug)]
pub(crate) struct VsTable<V, R: Level<V> = Root<V>> {
    hasher: ahash::RandomState,
    root: R,
    len: usize,
    _values: core::marker::PhantomData<fn() -> V>,
}

impl<V, R: Level<V>> Default for VsTable<V, R> {
    fn default() -> Self {
        VsTable {
            hasher: ahash::RandomState::new(),
            root: R::empty(),
            len: 0,
            _values: core::marker::PhantomData,
        }
    }
}

impl<V, R: Level<V>> Clone for VsTable<V, R> {
    /// A new version sharing every node: copies the root's child pointers.
    fn clone(&self) -> Self {
        VsTable {
            hasher: self.hasher.clone(),
            root: self.root.copy(),
            len: self.len,
            _values: core::marker::PhantomData,
        }
    }
}

impl<V, R: Level<V>> VsTable<V, R> {
    /// An empty table hashing like `self` (so that a rebuilt table keeps
    /// the same layout).
    pub(crate) fn empty_like(&self) -> Self {
        VsTable {
            hasher: self.hasher.clone(),
            root: R::empty(),
            len: 0,
            _values: core::marker::PhantomData,
        }
    }

    #[inline]
    fn hash(&self, key: &FrontendKey) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The number of entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The value of `key`.
    #[inline]
    pub(crate) fn get(&self, key: &FrontendKey) -> Option<&Arc<V>> {
        self.root.get(self.hash(key), key, 0)
    }

    /// Whether `key` has a value.
    pub(crate) fn contains_key(&self, key: &FrontendKey) -> bool {
        self.get(key).is_some()
    }

    /// Sets the value of `key`, copying the nodes on its path that other
    /// versions share. Returns the previous value.
    pub(crate) fn insert(&mut self, key: FrontendKey, value: Arc<V>) -> Option<Arc<V>> {
        let h = self.hash(&key);
        let old = self.root.insert(h, key, value, 0);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`, copying the nodes on its path that other versions
    /// share; a node left empty is unlinked. Returns the value it had.
    pub(crate) fn remove(&mut self, key: &FrontendKey) -> Option<Arc<V>> {
        if !self.contains_key(key) {
            // Copy nothing for an absent key.
            return None;
        }
        let removed = self.root.remove(self.hash(key), key, 0);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// Every entry, in no particular order.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> Vec<(FrontendKey, &Arc<V>)> {
        let mut out = Vec::new();
        self.root.for_each(&mut |e| out.push((e.1, &e.2)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flow::Protocol;

    fn key(i: u32) -> FrontendKey {
        FrontendKey::new(
            Protocol::Tcp,
            std::net::SocketAddr::from(([10, 96, (i >> 8) as u8, i as u8], 80 + (i >> 16) as u16)),
        )
    }

    /// Against a std map: inserts, replaces and removes, with the old
    /// versions unchanged by later changes.
    #[test]
    fn matches_a_map_and_keeps_old_versions_intact() {
        let mut t: VsTable<u32> = VsTable::default();
        let mut model = std::collections::HashMap::new();
        let mut versions = Vec::new();
        for i in 0..3000u32 {
            let k = key(i % 1500);
            if i % 7 == 3 {
                assert_eq!(t.remove(&k).map(|v| *v), model.remove(&k));
            } else {
                assert_eq!(t.insert(k, Arc::new(i)).map(|v| *v), model.insert(k, i));
            }
            if i % 500 == 0 {
                versions.push((t.clone(), model.clone()));
            }
        }
        assert_eq!(t.len(), model.len());
        assert_eq!(t.entries().len(), model.len());
        for (k, v) in &model {
            assert_eq!(t.get(k).map(|x| **x), Some(*v));
        }
        for (old, m) in &versions {
            assert_eq!(old.len(), m.len());
            for i in 0..1500 {
                assert_eq!(old.get(&key(i)).map(|x| **x), m.get(&key(i)).copied());
            }
        }
        for i in 0..1500 {
            t.remove(&key(i));
        }
        assert_eq!(t.len(), 0);
        assert!(t.root.is_empty());
    }

    /// A change to a new version copies only the path: every other child
    /// of the root is shared with the old version.
    #[test]
    fn an_insert_shares_all_but_its_path() {
        let mut t: VsTable<u32> = VsTable::default();
        for i in 0..10_000 {
            t.insert(key(i), Arc::new(i));
        }
        let mut next = t.clone();
        next.insert(key(20_000), Arc::new(0));
        let shared = t
            .root
            .children
            .iter()
            .zip(next.root.children.iter())
            .filter(|(x, y)| match (x, y) {
                (Some(x), Some(y)) => Arc::ptr_eq(x, y),
                _ => false,
            })
            .count();
        assert_eq!(shared, FANOUT - 1);
    }
}
