//! `lc` and `wlc`, after `ip_vs_lc.c` and `ip_vs_wlc.c`.
//!
//! Overhead is `(active << 8) + inactive`. `lc` takes the least overhead and
//! keeps the earliest destination on a tie; `wlc` takes the least
//! overhead / weight, compared by cross-multiplication. Weight-0
//! destinations take no new connections.

use super::{Destination, PickContext, Scheduler};

/// Least connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct LeastConnection;

impl Scheduler for LeastConnection {
    fn pick(&self, dests: &[Destination], _ctx: &PickContext<'_>) -> Option<usize> {
        let mut best: Option<(usize, u64)> = None;
        for (i, d) in dests.iter().enumerate() {
            if d.weight() == 0 {
                continue;
            }
            let oh = d.overhead();
            if best.is_none_or(|(_, b)| oh < b) {
                best = Some((i, oh));
            }
        }
        best.map(|(i, _)| i)
    }

    fn uses_connection_counts(&self) -> bool {
        true
    }
}

/// Weighted least connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct WeightedLeastConnection;

impl Scheduler for WeightedLeastConnection {
    fn pick(&self, dests: &[Destination], _ctx: &PickContext<'_>) -> Option<usize> {
        let mut best: Option<(usize, u64, u64)> = None;
        for (i, d) in dests.iter().enumerate() {
            let w = u64::from(d.weight());
            if w == 0 {
                continue;
            }
            let oh = d.overhead();
            match best {
                None => best = Some((i, oh, w)),
                // loh * w > doh * lw  <=>  doh / w < loh / lw
                Some((_, loh, lw))
                    if u128::from(loh) * u128::from(w) > u128::from(oh) * u128::from(lw) =>
                {
                    best = Some((i, oh, w));
                }
                Some(_) => {}
            }
        }
        best.map(|(i, _, _)| i)
    }

    fn uses_connection_counts(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{add, dests, flow};
    use super::*;
    use crate::{Instant, SeededRng};

    fn ctx_pick(s: &dyn Scheduler, d: &[Destination]) -> Option<usize> {
        let rng = SeededRng::new(0);
        let f = flow([10, 1, 0, 1], 1);
        s.pick(
            d,
            &PickContext {
                flow: &f,
                now: Instant::ZERO,
                rng: &rng,
                rotation: None,
            },
        )
    }

    #[test]
    fn lc_picks_least_overhead_and_honours_closes() {
        let d = dests(&[1, 1, 1]);
        // Ties keep the earliest.
        assert_eq!(ctx_pick(&LeastConnection, &d), Some(0));
        add(&d[0], 1, 0);
        assert_eq!(ctx_pick(&LeastConnection, &d), Some(1));
        add(&d[1], 1, 0);
        add(&d[2], 1, 0);
        add(&d[2], 1, 0);
        // 1, 1, 2 active: earliest of the least.
        assert_eq!(ctx_pick(&LeastConnection, &d), Some(0));
        // Inactive connections weigh 1/256 of an active one.
        add(&d[0], 0, 1);
        assert_eq!(ctx_pick(&LeastConnection, &d), Some(1));
        // A reported close frees destination 2.
        add(&d[2], -1, 0);
        add(&d[2], -1, 0);
        assert_eq!(ctx_pick(&LeastConnection, &d), Some(2));
    }

    #[test]
    fn lc_spreads_when_connections_stay_open() {
        let d = dests(&[1, 1, 1, 1]);
        let mut counts = [0; 4];
        for _ in 0..40 {
            let i = ctx_pick(&LeastConnection, &d).unwrap();
            add(&d[i], 1, 0);
            counts[i] += 1;
        }
        assert_eq!(counts, [10, 10, 10, 10]);
    }

    #[test]
    fn wlc_divides_by_weight_and_skips_zero() {
        let d = dests(&[0, 1, 3]);
        let mut counts = [0; 3];
        for _ in 0..40 {
            let i = ctx_pick(&WeightedLeastConnection, &d).unwrap();
            add(&d[i], 1, 0);
            counts[i] += 1;
        }
        assert_eq!(counts, [0, 10, 30]);
        assert_eq!(ctx_pick(&WeightedLeastConnection, &dests(&[0])), None);
        assert_eq!(ctx_pick(&LeastConnection, &dests(&[0, 0])), None);
    }
}
