//! A persistent, ordered list: iptables mode's `KUBE-SERVICES` chain as a
//! structure a sync changes in O(1).
//!
//! The rules sit in chunks (leaves) under a tree of 16-way branches (a
//! persistent vector, as Clojure's and `im`'s are), every chunk full but
//! the last; the chunk size is a parameter (iptables mode keeps its
//! 28-byte rules in chunks of 32 and their chains, reference-counted, in
//! chunks of 16). Versions share every node they have in common: cloning
//! a list clones its root pointer, and a push, a pop or a replacement
//! copies only the nodes on the path to its index ([`Arc::make_mut`]-style:
//! a node already copied in this batch is changed in place). The depth
//! grows by one level per factor of 16, so at 100,000 rules a change
//! copies a chunk and three or four branches of 16. Copying a node touches
//! the reference count of each child (and of each entry, for entries that
//! hold an `Arc`), and at scale those are cold: that is why branches are
//! narrow and chunks of `Arc`s small. Removal is a swap-remove (the last
//! rule fills the gap), so the list stays dense and a walk visits exactly
//! the rules the list holds.
//!
//! A walk ([`RuleList::find`]) visits the rules in order, as the kernel
//! walks a chain: its cost grows with the number of rules, and it
//! allocates nothing.

use std::sync::Arc;

use smallvec::SmallVec;

/// Index bits per branch level: 16 children.
const BITS: u32 = 4;
const WIDTH: usize = 1 << BITS;
const MASK: usize = WIDTH - 1;

/// A node: a leaf holds its `W` rules inline (in the node's own allocation,
/// so a walk reads one allocation per leaf, not a node and then its
/// buffer).
#[derive(Debug)]
enum Node<T, const W: usize> {
    Leaf(SmallVec<[T; W]>),
    Branch(Vec<Arc<Node<T, W>>>),
}

impl<T: Clone, const W: usize> Node<T, W> {
    /// A copy with room for a full node, so a push after a copy does not
    /// reallocate.
    fn copy(&self) -> Self {
        match self {
            Node::Leaf(v) => Node::Leaf(v.iter().cloned().collect()),
            Node::Branch(v) => {
                let mut c = Vec::with_capacity(WIDTH);
                c.extend_from_slice(v);
                Node::Branch(c)
            }
        }
    }
}

/// Copy-on-write access to a shared node.
fn make_mut<T: Clone, const W: usize>(node: &mut Arc<Node<T, W>>) -> &mut Node<T, W> {
    if Arc::get_mut(node).is_none() {
        *node = Arc::new(node.copy());
    }
    Arc::get_mut(node).expect("unique after the copy")
}

/// A persistent list of rules; see the module docs. Leaves hold
/// `LEAF_WIDTH` rules (a power of two), branches 16 children.
#[derive(Debug)]
pub(crate) struct RuleList<T, const LEAF_WIDTH: usize = WIDTH> {
    root: Arc<Node<T, LEAF_WIDTH>>,
    len: usize,
    /// The index bits the levels below the root use: 0 for a leaf root,
    /// `LEAF_BITS` for a branch of leaves, `BITS` more per level above.
    shift: u32,
}

impl<T, const W: usize> Clone for RuleList<T, W> {
    /// Another version sharing every node (one pointer copy).
    fn clone(&self) -> Self {
        RuleList {
            root: Arc::clone(&self.root),
            len: self.len,
            shift: self.shift,
        }
    }
}

impl<T: Clone, const W: usize> Default for RuleList<T, W> {
    fn default() -> Self {
        RuleList {
            root: Arc::new(Node::Leaf(SmallVec::new())),
            len: 0,
            shift: 0,
        }
    }
}

impl<T: Clone, const W: usize> RuleList<T, W> {
    /// Index bits of a leaf (the width must be a power of two).
    const L: u32 = {
        assert!(W.is_power_of_two(), "a leaf's width is a power of two");
        W.trailing_zeros()
    };
    const LEAF_MASK: usize = W - 1;

    /// The shift of the children of a branch at `shift`.
    #[inline]
    const fn child_shift(shift: u32) -> u32 {
        if shift == Self::L { 0 } else { shift - BITS }
    }

    /// How many rules a root at `shift` holds.
    const fn capacity(shift: u32) -> usize {
        if shift == 0 { W } else { 1 << (shift + BITS) }
    }

    fn empty_node(shift: u32) -> Node<T, W> {
        if shift == 0 {
            Node::Leaf(SmallVec::new())
        } else {
            Node::Branch(Vec::with_capacity(WIDTH))
        }
    }

    /// The number of rules.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the list holds no rule.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The rule at `index`.
    pub(crate) fn get(&self, index: usize) -> Option<&T> {
        if index >= self.len {
            return None;
        }
        let mut node = &*self.root;
        let mut shift = self.shift;
        loop {
            match node {
                Node::Leaf(v) => return v.get(index & Self::LEAF_MASK),
                Node::Branch(c) => {
                    node = c.get((index >> shift) & MASK)?;
                    shift = Self::child_shift(shift);
                }
            }
        }
    }

    /// The first rule, in order, that `pred` accepts, with its index: a
    /// walk of the list.
    #[inline]
    pub(crate) fn find(&self, mut pred: impl FnMut(&T) -> bool) -> Option<(usize, &T)> {
        /// One leaf's rules, in order (kept out of `walk` so that the
        /// predicate is inlined into this loop whatever `walk` becomes).
        #[inline(always)]
        fn scan<T>(rules: &[T], pred: &mut impl FnMut(&T) -> bool) -> Option<usize> {
            for (i, r) in rules.iter().enumerate() {
                if pred(r) {
                    return Some(i);
                }
            }
            None
        }
        fn walk<'a, T, const W: usize>(
            node: &'a Node<T, W>,
            base: &mut usize,
            pred: &mut impl FnMut(&T) -> bool,
        ) -> Option<(usize, &'a T)> {
            match node {
                Node::Leaf(v) => {
                    let rules = v.as_slice();
                    match scan(rules, pred) {
                        Some(i) => Some((*base + i, &rules[i])),
                        None => {
                            *base += rules.len();
                            None
                        }
                    }
                }
                Node::Branch(c) => c.iter().find_map(|n| walk(n, base, pred)),
            }
        }
        walk(&self.root, &mut 0, &mut pred)
    }

    /// Appends a rule at the end; returns its index.
    pub(crate) fn push(&mut self, value: T) -> usize {
        let index = self.len;
        if index == Self::capacity(self.shift) {
            // Full: one more level above the old root.
            let old = core::mem::replace(&mut self.root, Arc::new(Node::Branch(Vec::new())));
            let mut children = Vec::with_capacity(WIDTH);
            children.push(old);
            self.root = Arc::new(Node::Branch(children));
            self.shift = if self.shift == 0 {
                Self::L
            } else {
                self.shift + BITS
            };
        }
        let mut node = make_mut(&mut self.root);
        let mut shift = self.shift;
        loop {
            match node {
                Node::Leaf(v) => {
                    v.push(value);
                    break;
                }
                Node::Branch(c) => {
                    let i = (index >> shift) & MASK;
                    let cs = Self::child_shift(shift);
                    if i == c.len() {
                        c.push(Arc::new(Self::empty_node(cs)));
                    }
                    node = make_mut(&mut c[i]);
                    shift = cs;
                }
            }
        }
        self.len += 1;
        index
    }

    /// Removes the last rule.
    pub(crate) fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let index = self.len - 1;
        fn pop_at<T: Clone, const W: usize>(
            node: &mut Arc<Node<T, W>>,
            index: usize,
            shift: u32,
        ) -> Option<T> {
            match make_mut(node) {
                Node::Leaf(v) => v.pop(),
                Node::Branch(c) => {
                    let i = (index >> shift) & MASK;
                    let child = c.get_mut(i)?;
                    let out = pop_at::<T, W>(child, index, RuleList::<T, W>::child_shift(shift));
                    let empty = match &**child {
                        Node::Leaf(v) => v.is_empty(),
                        Node::Branch(b) => b.is_empty(),
                    };
                    if empty {
                        c.pop();
                    }
                    out
                }
            }
        }
        let out = pop_at::<T, W>(&mut self.root, index, self.shift);
        self.len -= 1;
        // Drop a level whose root is left with one child.
        while self.shift > 0 {
            let only = match &*self.root {
                Node::Branch(c) if c.len() == 1 => Arc::clone(&c[0]),
                _ => break,
            };
            self.root = only;
            self.shift = Self::child_shift(self.shift);
        }
        out
    }

    /// Replaces the rule at `index`; returns the old one.
    ///
    /// # Panics
    /// If `index` is out of bounds.
    pub(crate) fn set(&mut self, index: usize, value: T) -> T {
        assert!(index < self.len, "rule {index} of {}", self.len);
        let mut node = make_mut(&mut self.root);
        let mut shift = self.shift;
        loop {
            match node {
                Node::Leaf(v) => return core::mem::replace(&mut v[index & Self::LEAF_MASK], value),
                Node::Branch(c) => {
                    node = make_mut(&mut c[(index >> shift) & MASK]);
                    shift = Self::child_shift(shift);
                }
            }
        }
    }

    /// Removes the rule at `index`, moving the last rule into its place;
    /// returns the removed rule and, if one moved, the moved rule.
    ///
    /// # Panics
    /// If `index` is out of bounds.
    pub(crate) fn swap_remove(&mut self, index: usize) -> (T, Option<&T>) {
        assert!(index < self.len, "rule {index} of {}", self.len);
        let last = self.pop().expect("not empty");
        if index == self.len {
            return (last, None);
        }
        let removed = self.set(index, last);
        (removed, self.get(index))
    }

    /// Every rule, in order.
    #[cfg(test)]
    pub(crate) fn for_each<'a>(&'a self, mut f: impl FnMut(&'a T)) {
        fn walk<'a, T, const W: usize>(node: &'a Node<T, W>, f: &mut impl FnMut(&'a T)) {
            match node {
                Node::Leaf(v) => v.iter().for_each(f),
                Node::Branch(c) => c.iter().for_each(|n| walk(n, f)),
            }
        }
        walk(&self.root, &mut f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    fn contents<const L: usize>(l: &RuleList<u32, L>) -> Vec<u32> {
        let mut v = Vec::new();
        l.for_each(|x| v.push(*x));
        v
    }

    /// Random pushes, swap-removes and replacements against a `Vec`,
    /// across the sizes where the tree gains and loses levels, with old
    /// versions kept and checked unchanged.
    #[test]
    fn matches_a_vec_and_old_versions_stay_intact() {
        check_against_a_vec::<16>();
        check_against_a_vec::<64>();
    }

    fn check_against_a_vec<const L: usize>() {
        let rng = SeededRng::new(11);
        let mut list = RuleList::<u32, L>::default();
        let mut model: Vec<u32> = Vec::new();
        let mut kept: Vec<(RuleList<u32, L>, Vec<u32>)> = Vec::new();
        for step in 0..26_000u32 {
            let r = rng.next_u64();
            // Grow to about 6,000 rules (past 16 x 16: three levels), then
            // shrink back to zero.
            let grow = step < 12_000;
            match r % 8 {
                0..=4 if grow => {
                    assert_eq!(list.push(step), model.len());
                    model.push(step);
                }
                0..=5 if !model.is_empty() => {
                    let i = (r >> 8) as usize % model.len();
                    let (gone, moved) = list.swap_remove(i);
                    let moved = moved.copied();
                    assert_eq!(gone, model.swap_remove(i));
                    assert_eq!(moved, model.get(i).copied());
                }
                6 if !model.is_empty() => {
                    let i = (r >> 8) as usize % model.len();
                    assert_eq!(list.set(i, step), model[i]);
                    model[i] = step;
                }
                _ => {}
            }
            assert_eq!(list.len(), model.len());
            if step % 997 == 0 {
                kept.push((list.clone(), model.clone()));
            }
        }
        assert!(list.is_empty(), "{} left", list.len());
        assert!(
            kept.iter()
                .any(|(l, _)| l.shift >= L.trailing_zeros() + BITS)
        );
        for (l, m) in &kept {
            assert_eq!(&contents(l), m);
            for (i, x) in m.iter().enumerate() {
                assert_eq!(l.get(i), Some(x));
            }
            assert_eq!(l.get(m.len()), None);
        }
        assert_eq!(contents(&list), model);
    }

    #[test]
    fn find_walks_in_order() {
        let mut list = RuleList::<u32, 64>::default();
        for i in 0..5000u32 {
            list.push(i % 100);
        }
        let mut walked = 0;
        let hit = list.find(|x| {
            walked += 1;
            *x == 42
        });
        assert_eq!(hit, Some((42, &42)));
        // An index past the first leaf.
        assert_eq!(list.find(|x| *x == 99).map(|h| h.0), Some(99));
        let mut list2 = RuleList::<u32, 16>::default();
        for i in 0..300u32 {
            list2.push(i);
        }
        assert_eq!(list2.find(|x| *x == 277), Some((277, &277)));
        assert_eq!(walked, 43);
        let mut walked = 0;
        assert_eq!(
            list.find(|_| {
                walked += 1;
                false
            }),
            None
        );
        assert_eq!(walked, 5000);
    }

    #[test]
    fn shrinking_to_empty_and_growing_again() {
        let mut list = RuleList::<u32, 64>::default();
        for i in 0..=(64 * WIDTH) as u32 {
            list.push(i);
        }
        assert_eq!(list.shift, 6 + BITS);
        while list.pop().is_some() {}
        assert_eq!((list.len(), list.shift), (0, 0));
        list.push(7);
        assert_eq!(contents(&list), [7]);
    }
}
