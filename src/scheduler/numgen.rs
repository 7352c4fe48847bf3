//! nftables' `numgen random mod N`: kube-proxy's nftables mode picks an
//! endpoint uniformly with one 32-bit draw, scaled as the kernel's
//! `nft_ng_random_eval` does (`reciprocal_scale(get_random_u32(), N)`, that
//! is `(r * N) >> 32`), then jumps through a verdict map.

use std::sync::Arc;

use super::{Destination, PickContext, Scheduler, SchedulerFactory};

/// Uniform pick among the destinations with a weight above zero.
#[derive(Debug, Clone)]
pub struct Numgen {
    eligible: Box<[u32]>,
}

impl Numgen {
    /// Builds the verdict-map order for `dests`.
    pub fn new(dests: &[Destination]) -> Self {
        Numgen {
            eligible: (0..dests.len() as u32)
                .filter(|&i| dests[i as usize].weight() > 0)
                .collect(),
        }
    }

    /// The kernel's `reciprocal_scale(r, n)`.
    #[inline]
    pub fn scale(r: u32, n: u32) -> u32 {
        ((u64::from(r) * u64::from(n)) >> 32) as u32
    }
}

impl Scheduler for Numgen {
    #[inline]
    fn pick(&self, _dests: &[Destination], ctx: &PickContext<'_>) -> Option<usize> {
        let n = self.eligible.len() as u32;
        if n == 0 {
            return None;
        }
        let r = ctx.rng.next_u64() as u32;
        Some(self.eligible[Self::scale(r, n) as usize] as usize)
    }
}

/// Builds [`Numgen`] selectors: the scheduler of the nftables dataplane.
#[derive(Debug, Clone, Copy, Default)]
pub struct NumgenFactory;

impl SchedulerFactory for NumgenFactory {
    fn name(&self) -> &str {
        "numgen"
    }
    fn build(&self, dests: &[Destination]) -> Box<dyn Scheduler> {
        Box::new(Numgen::new(dests))
    }
}

impl NumgenFactory {
    /// The factory as a shareable trait object.
    pub fn shared() -> Arc<dyn SchedulerFactory> {
        Arc::new(NumgenFactory)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{dests, flow};
    use super::*;
    use crate::{Instant, SeededRng};

    #[test]
    fn reciprocal_scale_matches_the_kernel() {
        assert_eq!(Numgen::scale(0, 3), 0);
        assert_eq!(Numgen::scale(u32::MAX, 3), 2);
        assert_eq!(Numgen::scale(0x8000_0000, 2), 1);
        assert_eq!(Numgen::scale(0x7FFF_FFFF, 2), 0);
    }

    /// 100,000 draws over 4 destinations: chi-square at 3 degrees of freedom
    /// (critical value 16.27 for p = 0.001); weight 0 never picked.
    #[test]
    fn uniform_and_skips_weight_zero() {
        let d = dests(&[1, 1, 0, 1, 1]);
        let s = Numgen::new(&d);
        let rng = SeededRng::new(77);
        let f = flow([10, 1, 0, 1], 1);
        let ctx = PickContext {
            flow: &f,
            now: Instant::ZERO,
            rng: &rng,
            rotation: None,
        };
        let mut counts = [0u32; 5];
        for _ in 0..100_000 {
            counts[s.pick(&d, &ctx).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0);
        let expected = 25_000.0;
        let chi2: f64 = [0, 1, 3, 4]
            .iter()
            .map(|&i| (f64::from(counts[i]) - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 16.27, "chi2 {chi2}: {counts:?}");
        assert_eq!(Numgen::new(&dests(&[0])).pick(&d, &ctx), None);
    }
}
