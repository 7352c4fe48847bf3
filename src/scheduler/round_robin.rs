//! `rr` and `wrr`, after `ip_vs_rr.c` and `ip_vs_wrr.c`.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::{Destination, PickContext, Rotation, RotationState, Scheduler};

/// Round-robin over the destinations with a weight above zero, in order.
///
/// The position is one atomic counter that wraps at the number of eligible
/// destinations (a compare-and-swap, no division), so many threads pick
/// without a lock; from one thread the picks cycle strictly in order. When
/// every destination is eligible, the position is the destination index
/// itself and no rotation table is read.
#[derive(Debug)]
pub struct RoundRobin {
    /// The rotation, when some destination has weight 0; `None` means every
    /// destination, in order.
    eligible: Option<Box<[u32]>>,
    len: usize,
    next: AtomicUsize,
}

impl RoundRobin {
    /// Builds the rotation for `dests`.
    pub fn new(dests: &[Destination]) -> Self {
        if dests.iter().all(|d| d.weight() > 0) {
            return RoundRobin {
                eligible: None,
                len: dests.len(),
                next: AtomicUsize::new(0),
            };
        }
        let eligible: Box<[u32]> = (0..dests.len() as u32)
            .filter(|&i| dests[i as usize].weight() > 0)
            .collect();
        RoundRobin {
            len: eligible.len(),
            eligible: Some(eligible),
            next: AtomicUsize::new(0),
        }
    }
}

impl RoundRobin {
    /// The rotation for `dests` that continues `old` (built for
    /// `old_dests`) as `ip_vs_rr` does across a change: the next pick is
    /// the destination after the one `old` picked last. Adding a
    /// destination does not move the position; removing the last-picked
    /// one moves it to the destination that followed it. Destinations are
    /// matched by backend id, and the lists are in merged endpoint order.
    pub fn continue_from(
        dests: &[Destination],
        old: &RoundRobin,
        old_dests: &[Destination],
    ) -> Self {
        let new = RoundRobin::new(dests);
        if new.len == 0 || old.len == 0 {
            return new;
        }
        let next = old.next.load(Ordering::Relaxed) % old.len;
        let last_pos = (next + old.len - 1) % old.len;
        let last_index = match &old.eligible {
            None => last_pos,
            Some(r) => r[last_pos] as usize,
        };
        let Some(last) = old_dests.get(last_index) else {
            return new;
        };
        // The eligible destinations of the new list, in rotation order.
        let eligible = |k: usize| match &new.eligible {
            None => k,
            Some(r) => r[k] as usize,
        };
        let mut start = 0;
        for k in 0..new.len {
            let d = &dests[eligible(k)];
            if d.id() == last.id() {
                start = k + 1;
                break;
            }
            if crate::table::endpoint_order(d.addr(), last.addr()) == core::cmp::Ordering::Greater {
                // `last` is gone: continue with the one that followed it.
                start = k;
                break;
            }
            start = k + 1;
        }
        new.next.store(start % new.len, Ordering::Relaxed);
        new
    }
}

impl RoundRobin {
    /// A pick that advances one thread's own rotation (see
    /// [`PickContext::rotation`]): the next eligible destination after the
    /// one this thread picked last; after a change, after that destination
    /// (matched by address) or, if it is gone, the one that followed it in
    /// merged order, as [`continue_from`](Self::continue_from) does for the
    /// shared rotation.
    #[inline]
    fn pick_local(&self, dests: &[Destination], r: &Rotation) -> Option<usize> {
        let n = self.len;
        if n == 0 {
            return None;
        }
        let index = |k: usize| match &self.eligible {
            None => k,
            Some(rotation) => rotation[k] as usize,
        };
        let addr_at = |k: usize| dests.get(index(k)).map(Destination::addr);
        let st = r.get();
        let pos = st.pos as usize;
        let next = match st.last {
            // First pick here: start where the shared rotation is.
            None => self.next.load(Ordering::Relaxed) % n,
            Some(last) if pos < n && addr_at(pos) == Some(last) => {
                if pos + 1 == n {
                    0
                } else {
                    pos + 1
                }
            }
            Some(last) => (0..n)
                .find_map(|k| {
                    let a = addr_at(k)?;
                    if a == last {
                        Some((k + 1) % n)
                    } else if crate::table::endpoint_order(a, last) == core::cmp::Ordering::Greater
                    {
                        Some(k)
                    } else {
                        None
                    }
                })
                .unwrap_or(0),
        };
        let picked = index(next);
        r.set(RotationState {
            last: dests.get(picked).map(Destination::addr),
            pos: next as u32,
            cw: 0,
        });
        Some(picked)
    }
}

impl Scheduler for RoundRobin {
    #[inline]
    fn pick(&self, dests: &[Destination], ctx: &PickContext<'_>) -> Option<usize> {
        if let Some(r) = ctx.rotation {
            return self.pick_local(dests, r);
        }
        let n = self.len;
        if n == 0 {
            return None;
        }
        let step = |i: usize| Some(if i + 1 >= n { 0 } else { i + 1 });
        let i = match self
            .next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, step)
        {
            Ok(i) | Err(i) => i,
        };
        Some(match &self.eligible {
            None => i,
            Some(rotation) => rotation[i] as usize,
        })
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// IPVS weighted round-robin: walk the destinations repeatedly, lowering the
/// current weight by the gcd of all weights on every wrap, and take each
/// destination whose weight is at least the current weight.
///
/// The state (position, current weight) is one `AtomicU64`, advanced with a
/// compare-and-swap, so picks need no lock.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    weights: Box<[u32]>,
    max_weight: u32,
    gcd: u32,
    /// High 32 bits: last position; low 32 bits: current weight.
    state: AtomicU64,
}

impl WeightedRoundRobin {
    /// Builds the schedule state for `dests`.
    pub fn new(dests: &[Destination]) -> Self {
        let weights: Box<[u32]> = dests.iter().map(Destination::weight).collect();
        let max_weight = weights.iter().copied().max().unwrap_or(0);
        let g = weights
            .iter()
            .copied()
            .filter(|&w| w > 0)
            .fold(0, gcd)
            .max(1);
        let last = (weights.len() as u64).saturating_sub(1);
        WeightedRoundRobin {
            weights,
            max_weight,
            gcd: g,
            state: AtomicU64::new(last << 32),
        }
    }

    /// The schedule for `dests` that continues `old` (built for
    /// `old_dests`): it keeps the current weight as `ip_vs_wrr_dest_changed`
    /// does (kept when within the new maximum, rounded to the new gcd, else
    /// reset), and, unlike the kernel, which restarts the walk at the head
    /// of the list, it also keeps its position: the walk goes on after the
    /// destination picked last (matched by backend id; if it is gone, after
    /// the one that preceded it in merged order). With the kernel's restart,
    /// a change between every two connections sends every connection to the
    /// first destination whose weight reaches the current weight.
    pub fn continue_from(
        dests: &[Destination],
        old: &WeightedRoundRobin,
        old_dests: &[Destination],
    ) -> Self {
        let new = WeightedRoundRobin::new(dests);
        let n = new.weights.len();
        let state = old.state.load(Ordering::Relaxed);
        let cw = new.kept_weight(state as u32);
        let last = old_dests.get((state >> 32) as usize);
        let pos = match last {
            None => n.saturating_sub(1),
            Some(last) => match dests.iter().position(|d| d.id() == last.id()) {
                Some(i) => i,
                None => {
                    let after = dests
                        .iter()
                        .position(|d| {
                            crate::table::endpoint_order(d.addr(), last.addr())
                                == core::cmp::Ordering::Greater
                        })
                        .unwrap_or(n);
                    (after + n.max(1) - 1) % n.max(1)
                }
            },
        };
        new.state
            .store(((pos as u64) << 32) | u64::from(cw), Ordering::Relaxed);
        new
    }

    /// A current weight carried over from another schedule, as
    /// `ip_vs_wrr_dest_changed` keeps it: kept when within this schedule's
    /// maximum, rounded to its gcd, else reset.
    fn kept_weight(&self, cw: u32) -> u32 {
        if cw > self.max_weight || cw == 0 {
            0
        } else if self.gcd > 1 {
            (cw / self.gcd).max(1) * self.gcd
        } else {
            cw
        }
    }

    /// A pick that advances one thread's own schedule state (see
    /// [`PickContext::rotation`]), carried across changes as
    /// [`continue_from`](Self::continue_from) carries the shared one: the
    /// current weight kept, the walk going on after the destination picked
    /// last (by address; if it is gone, after the one before it in merged
    /// order).
    fn pick_local(&self, dests: &[Destination], r: &Rotation) -> Option<usize> {
        if self.max_weight == 0 {
            return None;
        }
        let n = self.weights.len();
        let st = r.get();
        let pos = st.pos as usize;
        let addr_at = |i: usize| dests.get(i).map(Destination::addr);
        let state = match st.last {
            None => self.state.load(Ordering::Relaxed),
            Some(last) => {
                let pos = if pos < n && addr_at(pos) == Some(last) {
                    pos
                } else {
                    match (0..n).find(|&i| addr_at(i) == Some(last)) {
                        Some(i) => i,
                        None => {
                            let after = (0..n)
                                .find(|&i| {
                                    addr_at(i).is_some_and(|a| {
                                        crate::table::endpoint_order(a, last)
                                            == core::cmp::Ordering::Greater
                                    })
                                })
                                .unwrap_or(n);
                            (after + n - 1) % n
                        }
                    }
                };
                ((pos as u64) << 32) | u64::from(self.kept_weight(st.cw))
            }
        };
        let (pick, next) = self.step(state);
        r.set(RotationState {
            last: addr_at(pick),
            pos: pick as u32,
            cw: next as u32,
        });
        Some(pick)
    }

    fn step(&self, state: u64) -> (usize, u64) {
        let n = self.weights.len();
        let mut i = (state >> 32) as usize;
        let mut cw = state as u32 as i64;
        loop {
            i = (i + 1) % n;
            if i == 0 {
                cw -= i64::from(self.gcd);
                if cw <= 0 {
                    cw = i64::from(self.max_weight);
                }
            }
            if i64::from(self.weights[i]) >= cw && self.weights[i] > 0 {
                return (i, ((i as u64) << 32) | cw as u64);
            }
        }
    }
}

impl Scheduler for WeightedRoundRobin {
    fn pick(&self, dests: &[Destination], ctx: &PickContext<'_>) -> Option<usize> {
        if let Some(r) = ctx.rotation {
            return self.pick_local(dests, r);
        }
        if self.max_weight == 0 {
            return None;
        }
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (pick, next) = self.step(cur);
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(pick),
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{dests, flow};
    use super::*;
    use crate::{Instant, SeededRng};

    fn picks(s: &dyn Scheduler, d: &[Destination], n: usize) -> Vec<usize> {
        let rng = SeededRng::new(0);
        let f = flow([10, 1, 0, 1], 1);
        let ctx = PickContext {
            flow: &f,
            now: Instant::ZERO,
            rng: &rng,
            rotation: None,
        };
        (0..n).map(|_| s.pick(d, &ctx).unwrap()).collect()
    }

    #[test]
    fn rr_cycles_in_order_skipping_weight_zero() {
        let d = dests(&[1, 1, 1]);
        assert_eq!(picks(&RoundRobin::new(&d), &d, 7), [0, 1, 2, 0, 1, 2, 0]);
        let d = dests(&[1, 0, 1]);
        assert_eq!(picks(&RoundRobin::new(&d), &d, 4), [0, 2, 0, 2]);
    }

    #[test]
    fn rr_shares_one_rotation_between_threads() {
        // Two threads picking at once take distinct turns: over 2 x 3,000
        // picks among 3 destinations each is picked exactly 2,000 times.
        let d = dests(&[1, 1, 1]);
        let rr = RoundRobin::new(&d);
        let counts: Vec<[usize; 3]> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut c = [0usize; 3];
                        for i in picks(&rr, &d, 3000) {
                            c[i] += 1;
                        }
                        c
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let total: Vec<usize> = (0..3).map(|k| counts[0][k] + counts[1][k]).collect();
        assert_eq!(total, [2000, 2000, 2000]);
        // After 6,000 picks the rotation is back at the start.
        assert_eq!(picks(&rr, &d, 2), [0, 1]);
    }

    #[test]
    fn wrr_follows_ipvs_sequence() {
        // Weights 4, 3, 2 (gcd 1): the classic LVS example sequence.
        let d = dests(&[4, 3, 2]);
        let seq = picks(&WeightedRoundRobin::new(&d), &d, 9);
        assert_eq!(seq, [0, 0, 1, 0, 1, 2, 0, 1, 2]);
        // Over many cycles the shares equal the weights.
        let seq = picks(&WeightedRoundRobin::new(&d), &d, 900);
        let count = |k| seq.iter().filter(|&&x| x == k).count();
        assert_eq!((count(0), count(1), count(2)), (400, 300, 200));
    }

    fn with_ids(weights: &[u32], ids: &[u32]) -> Vec<Destination> {
        weights
            .iter()
            .zip(ids)
            .map(|(w, id)| {
                Destination::with_id(
                    crate::plan::BackendId(*id),
                    std::net::SocketAddr::from(([10, 0, 0, *id as u8], 80)),
                    *w,
                )
            })
            .collect()
    }

    /// rr keeps its position across changes: adding a destination does not
    /// move it, removing the last-picked one moves to its successor.
    #[test]
    fn rr_continues_across_changes() {
        let d = with_ids(&[1, 1, 1], &[1, 2, 3]);
        let rr = RoundRobin::new(&d);
        assert_eq!(picks(&rr, &d, 2), [0, 1]); // picked ids 1, 2
        let d2 = with_ids(&[1, 1, 1, 1], &[1, 2, 3, 4]);
        let rr2 = RoundRobin::continue_from(&d2, &rr, &d);
        assert_eq!(picks(&rr2, &d2, 3), [2, 3, 0]); // ids 3, 4, 1
        // Remove id 1 (the last picked): continue with id 2.
        let d3 = with_ids(&[1, 1, 1], &[2, 3, 4]);
        let rr3 = RoundRobin::continue_from(&d3, &rr2, &d2);
        assert_eq!(picks(&rr3, &d3, 2), [0, 1]);
    }

    #[test]
    fn wrr_keeps_its_current_weight_and_position() {
        let d = dests(&[4, 3, 2]);
        let w = WeightedRoundRobin::new(&d);
        assert_eq!(picks(&w, &d, 3), [0, 0, 1]); // current weight now 3
        let w2 = WeightedRoundRobin::continue_from(&d, &w, &d);
        // The sequence goes on as if nothing changed: 0 1 2 0 1 2 ...
        assert_eq!(picks(&w2, &d, 6), [0, 1, 2, 0, 1, 2]);
        let fresh = WeightedRoundRobin::new(&d);
        assert_eq!(picks(&fresh, &d, 3), [0, 0, 1]);
        // A rebuild after every pick follows the same sequence.
        let mut cur = WeightedRoundRobin::new(&d);
        let mut seq = Vec::new();
        for _ in 0..9 {
            seq.extend(picks(&cur, &d, 1));
            cur = WeightedRoundRobin::continue_from(&d, &cur, &d);
        }
        assert_eq!(seq, [0, 0, 1, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn wrr_with_gcd_and_zero_weights() {
        let d = dests(&[2, 0, 4]);
        let seq = picks(&WeightedRoundRobin::new(&d), &d, 6);
        assert_eq!(seq, [2, 0, 2, 2, 0, 2]);
        let d = dests(&[0, 0]);
        let rng = SeededRng::new(0);
        let f = flow([1, 1, 1, 1], 1);
        let ctx = PickContext {
            flow: &f,
            now: Instant::ZERO,
            rng: &rng,
            rotation: None,
        };
        assert_eq!(WeightedRoundRobin::new(&d).pick(&d, &ctx), None);
        assert_eq!(RoundRobin::new(&d).pick(&d, &ctx), None);
    }

    fn local_picks(s: &dyn Scheduler, d: &[Destination], r: &Rotation, n: usize) -> Vec<usize> {
        let rng = SeededRng::new(0);
        let f = flow([10, 1, 0, 1], 1);
        let ctx = PickContext {
            rotation: Some(r),
            ..PickContext::new(&f, Instant::ZERO, &rng)
        };
        (0..n).map(|_| s.pick(d, &ctx).unwrap()).collect()
    }

    /// A thread's own rotation cycles on its own, leaves the shared one
    /// alone, and continues across changes as the shared one does.
    #[test]
    fn rr_local_rotations_are_independent_and_continue_across_changes() {
        let d = with_ids(&[1, 1, 1], &[1, 2, 3]);
        let rr = RoundRobin::new(&d);
        let (a, b) = (Rotation::default(), Rotation::default());
        assert_eq!(local_picks(&rr, &d, &a, 2), [0, 1]);
        assert_eq!(local_picks(&rr, &d, &b, 4), [0, 1, 2, 0]);
        assert_eq!(local_picks(&rr, &d, &a, 1), [2]);
        // The shared rotation did not move.
        assert_eq!(picks(&rr, &d, 1), [0]);
        // A fresh rotation starts where the shared one is.
        assert_eq!(local_picks(&rr, &d, &Rotation::default(), 1), [1]);
        // Adding a destination does not move `a` (last picked: id 3).
        let d2 = with_ids(&[1, 1, 1, 1], &[1, 2, 3, 4]);
        let rr2 = RoundRobin::new(&d2);
        assert_eq!(local_picks(&rr2, &d2, &a, 3), [3, 0, 1]); // ids 4, 1, 2
        // Removing the last picked (id 2) continues with the one after it.
        let d3 = with_ids(&[1, 1, 1], &[1, 3, 4]);
        let rr3 = RoundRobin::new(&d3);
        assert_eq!(local_picks(&rr3, &d3, &a, 2), [1, 2]); // ids 3, 4
        // Weight 0 is skipped.
        let d4 = with_ids(&[1, 0, 1], &[1, 3, 4]);
        assert_eq!(local_picks(&RoundRobin::new(&d4), &d4, &a, 3), [0, 2, 0]);
    }

    #[test]
    fn wrr_local_schedule_follows_ipvs_and_survives_rebuilds() {
        let d = dests(&[4, 3, 2]);
        let r = Rotation::default();
        let mut seq = Vec::new();
        for _ in 0..9 {
            // A rebuild before every pick: the thread's state carries on.
            seq.extend(local_picks(&WeightedRoundRobin::new(&d), &d, &r, 1));
        }
        assert_eq!(seq, [0, 0, 1, 0, 1, 2, 0, 1, 2]);
        let w = WeightedRoundRobin::new(&d);
        assert_eq!(picks(&w, &d, 3), [0, 0, 1]);
        // A fresh rotation starts from the shared state.
        assert_eq!(local_picks(&w, &d, &Rotation::default(), 3), [0, 1, 2]);
        // Removing the last picked goes on after the one before it.
        let d = with_ids(&[1, 1, 1], &[1, 2, 3]);
        let r = Rotation::default();
        assert_eq!(local_picks(&WeightedRoundRobin::new(&d), &d, &r, 2), [0, 1]);
        let d2 = with_ids(&[1, 1], &[1, 3]);
        assert_eq!(
            local_picks(&WeightedRoundRobin::new(&d2), &d2, &r, 2),
            [1, 0]
        );
    }
}
