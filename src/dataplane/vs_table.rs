//! The virtual-service table of the hash-table modes (IPVS, nftables, the
//! eBPF model): a persistent hash trie keyed by [`FrontendKey`].
//!
//! The trie has a fixed depth of [`LEVELS`] branch levels of [`FANOUT`]
//! children each, above leaves of a few entries, indexed by a keyed hash
//! of the frontend key (ahash with a random state: the trie only speeds up
//! lookups, so nobody outside should predict where a key lands). Tables
//! share every node they have in common: the writer clones the published
//! table (only its root), then each insert or remove copies just the nodes
//! on its key's path ([`Arc::make_mut`]: a node already copied in this
//! batch is changed in place). Adding or deleting one virtual service thus
//! copies `LEVELS × FANOUT` child pointers and one small leaf, whatever the
//! number of services, and a whole batch is published with one pointer
//! store: readers see all of it or none of it.
//!
//! A lookup hashes the key once and follows `LEVELS` pointers to a leaf,
//! then compares the hash and key of its few entries: no lock, no
//! allocation, no atomic operation.

use std::sync::Arc;

use crate::plan::FrontendKey;

/// log2 of the children per branch.
const BITS: u32 = 5;
/// Children per branch node.
pub(crate) const FANOUT: usize = 1 << BITS;
/// Branch levels above the leaves: 32,768 leaves, so that even 100,000
/// virtual services leave a handful of entries per leaf.
pub(crate) const LEVELS: u32 = 3;

#[derive(Debug)]
enum Node<V> {
    Branch(Box<[Option<Arc<Node<V>>>; FANOUT]>),
    Leaf(Vec<(u64, FrontendKey, Arc<V>)>),
}

impl<V> Clone for Node<V> {
    /// A copy of this node only: children and values are shared.
    fn clone(&self) -> Self {
        match self {
            Node::Branch(c) => Node::Branch(c.clone()),
            Node::Leaf(e) => Node::Leaf(e.clone()),
        }
    }
}

fn empty_branch<V>() -> Node<V> {
    Node::Branch(Box::new(core::array::from_fn(|_| None)))
}

#[inline]
fn index(hash: u64, level: u32) -> usize {
    ((hash >> (64 - BITS * (level + 1))) as usize) & (FANOUT - 1)
}

/// A persistent map from frontend keys to shared values; see the module
/// docs.
#[derive(Debug)]
pub(crate) struct VsTable<V> {
    hasher: ahash::RandomState,
    root: Node<V>,
    len: usize,
}

impl<V> Default for VsTable<V> {
    fn default() -> Self {
        VsTable {
            hasher: ahash::RandomState::new(),
            root: empty_branch(),
            len: 0,
        }
    }
}

impl<V> Clone for VsTable<V> {
    /// A new version sharing every node: copies the root's child pointers.
    fn clone(&self) -> Self {
        VsTable {
            hasher: self.hasher.clone(),
            root: self.root.clone(),
            len: self.len,
        }
    }
}

impl<V> VsTable<V> {
    /// An empty table hashing like `self` (so that a rebuilt table keeps
    /// the same layout).
    pub(crate) fn empty_like(&self) -> Self {
        VsTable {
            hasher: self.hasher.clone(),
            root: empty_branch(),
            len: 0,
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
        let h = self.hash(key);
        let mut node = &self.root;
        let mut level = 0;
        loop {
            match node {
                Node::Branch(children) => {
                    node = children[index(h, level)].as_deref()?;
                    level += 1;
                }
                Node::Leaf(entries) => {
                    return entries
                        .iter()
                        .find(|e| e.0 == h && e.1 == *key)
                        .map(|e| &e.2);
                }
            }
        }
    }

    /// Whether `key` has a value.
    pub(crate) fn contains_key(&self, key: &FrontendKey) -> bool {
        self.get(key).is_some()
    }

    /// Sets the value of `key`, copying the nodes on its path that other
    /// versions share. Returns the previous value.
    pub(crate) fn insert(&mut self, key: FrontendKey, value: Arc<V>) -> Option<Arc<V>> {
        let h = self.hash(&key);
        let mut node = &mut self.root;
        let mut level = 0;
        loop {
            match node {
                Node::Branch(children) => {
                    let child = children[index(h, level)].get_or_insert_with(|| {
                        Arc::new(if level + 1 < LEVELS {
                            empty_branch()
                        } else {
                            Node::Leaf(Vec::new())
                        })
                    });
                    node = Arc::make_mut(child);
                    level += 1;
                }
                Node::Leaf(entries) => {
                    if let Some(e) = entries.iter_mut().find(|e| e.0 == h && e.1 == key) {
                        return Some(core::mem::replace(&mut e.2, value));
                    }
                    entries.push((h, key, value));
                    self.len += 1;
                    return None;
                }
            }
        }
    }

    /// Removes `key`, copying the nodes on its path that other versions
    /// share; a leaf left empty is unlinked. Returns the value it had.
    pub(crate) fn remove(&mut self, key: &FrontendKey) -> Option<Arc<V>> {
        if !self.contains_key(key) {
            // Copy nothing for an absent key.
            return None;
        }
        let h = self.hash(key);
        let removed = remove_in(&mut self.root, h, key, 0);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// Every entry, in no particular order. For the writer's full passes
    /// and inspection.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&FrontendKey, &Arc<V>)> {
        let mut stack: Vec<&Node<V>> = vec![&self.root];
        let mut leaf: core::slice::Iter<'_, (u64, FrontendKey, Arc<V>)> = [].iter();
        core::iter::from_fn(move || {
            loop {
                if let Some(e) = leaf.next() {
                    return Some((&e.1, &e.2));
                }
                match stack.pop()? {
                    Node::Branch(children) => stack.extend(children.iter().flatten().map(|c| &**c)),
                    Node::Leaf(entries) => leaf = entries.iter(),
                }
            }
        })
    }
}

/// Removes `key` under `node` (which holds it); returns the value and
/// unlinks a child left empty.
fn remove_in<V>(node: &mut Node<V>, h: u64, key: &FrontendKey, level: u32) -> Option<Arc<V>> {
    match node {
        Node::Branch(children) => {
            let slot = &mut children[index(h, level)];
            let child = Arc::make_mut(slot.as_mut()?);
            let removed = remove_in(child, h, key, level + 1);
            let empty = match child {
                Node::Leaf(e) => e.is_empty(),
                Node::Branch(c) => c.iter().all(Option::is_none),
            };
            if empty {
                *slot = None;
            }
            removed
        }
        Node::Leaf(entries) => {
            let i = entries.iter().position(|e| e.0 == h && e.1 == *key)?;
            Some(entries.swap_remove(i).2)
        }
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
        assert_eq!(t.iter().count(), model.len());
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
        assert!(matches!(&t.root, Node::Branch(c) if c.iter().all(Option::is_none)));
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
        let (Node::Branch(a), Node::Branch(b)) = (&t.root, &next.root) else {
            panic!("roots are branches");
        };
        let shared = a
            .iter()
            .zip(b.iter())
            .filter(|(x, y)| match (x, y) {
                (Some(x), Some(y)) => Arc::ptr_eq(x, y),
                _ => false,
            })
            .count();
        assert_eq!(shared, FANOUT - 1);
    }
}
