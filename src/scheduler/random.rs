//! `random`: kube-proxy's iptables probability cascade.
//!
//! Rule i of n (from 0) matches with probability 1/(n-i), printed with ten
//! decimals; the last rule always matches. iptables (`libxt_statistic`) turns
//! the printed probability into `lround(0x80000000 * p)` and the kernel
//! (`xt_statistic.c`) matches when `(get_random_u32() & 0x7FFFFFFF)` is below
//! it: one random draw per rule walked. This module does exactly that.

use super::{Destination, PickContext, Scheduler};
use crate::stack_text::StackText;

/// The probability kube-proxy writes for rule `i` of `n`, as the value
/// iptables parses back from the ten-decimal text.
///
/// # Examples
/// ```
/// assert_eq!(svclb::scheduler::iptables_probability(0, 3), 0.3333333333);
/// assert_eq!(svclb::scheduler::iptables_probability(1, 3), 0.5);
/// ```
pub fn iptables_probability(i: usize, n: usize) -> f64 {
    // Formatted on the stack: a rule list is rebuilt on every endpoint
    // change, and this runs once per rule.
    let mut buf = StackText::<32>::new();
    core::fmt::Write::write_fmt(&mut buf, format_args!("{:.10}", 1.0 / (n - i) as f64))
        .expect("a probability fits in 32 bytes");
    buf.as_str().parse().expect("a formatted float parses")
}

/// The kernel's 31-bit threshold for a probability: `lround(0x80000000 * p)`.
pub fn probability_threshold(p: f64) -> u32 {
    (p * 2_147_483_648.0).round() as u32
}

/// The cascade over the destinations with a weight above zero.
#[derive(Debug, Clone)]
pub struct RandomCascade {
    /// (destination index, threshold); the last entry always matches.
    rules: Box<[(u32, u32)]>,
}

impl RandomCascade {
    /// Builds the rules for `dests`.
    pub fn new(dests: &[Destination]) -> Self {
        let eligible: Vec<u32> = (0..dests.len() as u32)
            .filter(|&i| dests[i as usize].weight() > 0)
            .collect();
        RandomCascade {
            rules: cascade_rules(eligible.into_iter()),
        }
    }

    /// Walks the cascade with one 31-bit draw per rule.
    #[inline]
    pub fn walk(&self, draw: impl FnMut() -> u32) -> Option<usize> {
        walk_cascade(&self.rules, draw)
    }
}

/// kube-proxy's chain over `targets` (in order): `(target, threshold)` per
/// rule, rule i of n matching with probability 1/(n-i) and the last one,
/// marked `u32::MAX`, always.
pub(crate) fn cascade_rules(targets: impl ExactSizeIterator<Item = u32>) -> Box<[(u32, u32)]> {
    let n = targets.len();
    targets
        .enumerate()
        .map(|(i, target)| {
            let t = if i + 1 == n {
                u32::MAX
            } else {
                probability_threshold(iptables_probability(i, n))
            };
            (target, t)
        })
        .collect()
}

/// Walks `(target, threshold)` rules; `u32::MAX` marks the rule without a
/// probability.
#[inline]
pub(crate) fn walk_cascade(rules: &[(u32, u32)], mut draw: impl FnMut() -> u32) -> Option<usize> {
    for &(target, threshold) in rules {
        if threshold == u32::MAX || (draw() & 0x7FFF_FFFF) < threshold {
            return Some(target as usize);
        }
    }
    None
}

impl Scheduler for RandomCascade {
    fn pick(&self, _dests: &[Destination], ctx: &PickContext<'_>) -> Option<usize> {
        self.walk(|| ctx.rng.next_u64() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{dests, flow};
    use super::*;
    use crate::{Instant, SeededRng};

    #[test]
    fn thresholds_match_iptables() {
        assert_eq!(probability_threshold(0.5), 0x4000_0000);
        assert_eq!(iptables_probability(0, 4), 0.25);
        assert_eq!(iptables_probability(0, 3), 0.333_333_333_3);
        assert_eq!(iptables_probability(2, 3), 1.0);
    }

    /// 100,000 draws with a fixed seed over 5 destinations: a chi-square test
    /// at 4 degrees of freedom (critical value 18.47 for p = 0.001).
    #[test]
    fn uniform_within_statistical_bounds() {
        let d = dests(&[1, 1, 1, 1, 1]);
        let s = RandomCascade::new(&d);
        let rng = SeededRng::new(0x5eed);
        let f = flow([10, 1, 0, 1], 1000);
        let ctx = PickContext {
            flow: &f,
            now: Instant::ZERO,
            rng: &rng,
            rotation: None,
        };
        let mut counts = [0u32; 5];
        let draws = 100_000;
        for _ in 0..draws {
            counts[s.pick(&d, &ctx).unwrap()] += 1;
        }
        let expected = f64::from(draws) / 5.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 18.47, "chi2 = {chi2}, counts = {counts:?}");
        for c in counts {
            assert!(
                (f64::from(c) - expected).abs() < expected * 0.03,
                "{counts:?}"
            );
        }
    }

    #[test]
    fn skips_weight_zero_and_handles_empty() {
        let d = dests(&[0, 1]);
        let s = RandomCascade::new(&d);
        let rng = SeededRng::new(1);
        let f = flow([10, 1, 0, 1], 1);
        let ctx = PickContext {
            flow: &f,
            now: Instant::ZERO,
            rng: &rng,
            rotation: None,
        };
        for _ in 0..100 {
            assert_eq!(s.pick(&d, &ctx), Some(1));
        }
        let d = dests(&[0]);
        assert_eq!(RandomCascade::new(&d).pick(&d, &ctx), None);
    }
}
