//! A small, seedable, lock-free random source.
//!
//! svclb uses no global RNG: a dataplane owns one [`SeededRng`], seeded by the
//! caller, so that a fixed seed replays a single-threaded run exactly.

use core::sync::atomic::{AtomicU64, Ordering};

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 over an atomic counter: each draw is one `fetch_add` and a
/// finaliser, so it is shared by many threads without a lock.
///
/// From one thread the sequence is a pure function of the seed.
///
/// # Examples
/// ```
/// use svclb::SeededRng;
/// let a = SeededRng::new(7);
/// let b = SeededRng::new(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// ```
#[derive(Debug)]
pub struct SeededRng {
    state: AtomicU64,
}

impl SeededRng {
    /// A generator that starts from `seed`.
    pub const fn new(seed: u64) -> Self {
        SeededRng {
            state: AtomicU64::new(seed),
        }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&self) -> u64 {
        let z = self
            .state
            .fetch_add(GOLDEN_GAMMA, Ordering::Relaxed)
            .wrapping_add(GOLDEN_GAMMA);
        mix64(z)
    }

    /// A uniform value in `0..n` (Lemire's multiply-shift).
    ///
    /// `n = 0` is clamped to 1: the empty range gives 0 (and still draws,
    /// so the sequence does not depend on it). It never panics; a caller
    /// indexing an empty slice with the result must check the length, as
    /// with any index.
    ///
    /// # Examples
    /// ```
    /// use svclb::SeededRng;
    /// let r = SeededRng::new(1);
    /// assert!(r.below(6) < 6);
    /// assert_eq!(r.below(0), 0);
    /// assert_eq!(r.below(1), 0);
    /// ```
    #[inline]
    pub fn below(&self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }

    /// A uniform float in `[0, 1)` with 53 bits of precision.
    #[inline]
    pub fn next_f64(&self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The SplitMix64 / Murmur3 64-bit finaliser: a stable, well-mixed hash of a
/// `u64` that every build of svclb computes the same way.
#[inline]
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let a = SeededRng::new(42);
        let b = SeededRng::new(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let c = SeededRng::new(43);
        assert_ne!(SeededRng::new(42).next_u64(), c.next_u64());
    }

    #[test]
    fn below_zero_is_clamped_to_one_and_still_draws() {
        let a = SeededRng::new(9);
        let b = SeededRng::new(9);
        for _ in 0..100 {
            assert_eq!(a.below(0), 0);
            b.next_u64();
        }
        assert_eq!(a.next_u64(), b.next_u64());
        assert!(SeededRng::new(3).below(u64::MAX) < u64::MAX);
    }

    #[test]
    fn below_stays_in_range_and_floats_in_unit_interval() {
        let r = SeededRng::new(1);
        for n in [1u64, 2, 3, 7, 1000] {
            for _ in 0..1000 {
                assert!(r.below(n) < n);
            }
        }
        for _ in 0..1000 {
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
        }
    }
}
