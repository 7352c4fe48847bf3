//! `sh`, after `ip_vs_sh.c`: a 256-bucket table filled by cycling the
//! destinations `weight` times each, looked up by a pinned hash of the
//! source address (and port, for `sh-port`).
//!
//! The hash is the kernel's: `hash_32(ntohs(port) + ntohl(addr_fold), 8)`
//! with `hash_32(v, bits) = (v * 0x61C88647) >> (32 - bits)`, where an IPv6
//! address folds as the XOR of its four 32-bit words. Every process, machine
//! and Rust release computes the same bucket for the same source.

use std::net::{IpAddr, SocketAddr};

use super::{Destination, PickContext, Scheduler};

const TAB_BITS: u32 = 8;
const TAB_SIZE: usize = 1 << TAB_BITS;
const GOLDEN_RATIO_32: u32 = 0x61C8_8647;
const NONE: u16 = u16::MAX;

/// The kernel's `ip_vs_sh_hashkey`.
pub(crate) fn sh_hashkey(addr: IpAddr, port: u16, offset: u32) -> usize {
    let fold = match addr {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            (0..4)
                .map(|k| u32::from_be_bytes([o[4 * k], o[4 * k + 1], o[4 * k + 2], o[4 * k + 3]]))
                .fold(0, |a, b| a ^ b)
        }
    };
    let v = u32::from(port).wrapping_add(fold);
    let h = v.wrapping_mul(GOLDEN_RATIO_32) >> (32 - TAB_BITS);
    (offset.wrapping_add(h) as usize) & (TAB_SIZE - 1)
}

/// Source hashing.
#[derive(Debug, Clone)]
pub struct SourceHash {
    buckets: Box<[u16; TAB_SIZE]>,
    with_port: bool,
}

impl SourceHash {
    /// Fills the 256 buckets from `dests` (at most 65535 destinations).
    pub fn new(dests: &[Destination], with_port: bool) -> Self {
        let mut buckets = Box::new([NONE; TAB_SIZE]);
        if !dests.is_empty() {
            let n = dests.len().min(usize::from(NONE) - 1);
            let (mut p, mut count) = (0usize, 0u32);
            for b in buckets.iter_mut() {
                *b = p as u16;
                count += 1;
                if count >= dests[p].weight() {
                    p = (p + 1) % n;
                    count = 0;
                }
            }
        }
        SourceHash { buckets, with_port }
    }

    /// The bucket table: destination index per bucket.
    pub fn buckets(&self) -> &[u16; TAB_SIZE] {
        &self.buckets
    }

    /// The destination for a source, if its bucket's destination can take
    /// new connections (IPVS without the fallback flag).
    pub fn lookup(&self, dests: &[Destination], src: SocketAddr) -> Option<usize> {
        let port = if self.with_port { src.port() } else { 0 };
        let b = self.buckets[sh_hashkey(src.ip(), port, 0)];
        if b == NONE {
            return None;
        }
        let i = usize::from(b);
        (dests.get(i)?.weight() > 0).then_some(i)
    }
}

impl Scheduler for SourceHash {
    #[inline]
    fn pick(&self, dests: &[Destination], ctx: &PickContext<'_>) -> Option<usize> {
        self.lookup(dests, ctx.flow.src)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{dests, flow};
    use super::*;
    use crate::{Instant, SeededRng};

    fn pick(s: &SourceHash, d: &[Destination], src: [u8; 4], port: u16) -> usize {
        let rng = SeededRng::new(0);
        let f = flow(src, port);
        s.pick(
            d,
            &PickContext {
                flow: &f,
                now: Instant::ZERO,
                rng: &rng,
                rotation: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn pinned_hash_values() {
        // hash_32(0x0a000001, 8) = (0x0a000001 * 0x61C88647) >> 24.
        let v = 0x0a00_0001u32.wrapping_mul(0x61C8_8647) >> 24;
        assert_eq!(sh_hashkey("10.0.0.1".parse().unwrap(), 0, 0), v as usize);
        assert_eq!(sh_hashkey("10.0.0.1".parse().unwrap(), 0, 0), 0x27);
    }

    #[test]
    fn stable_for_a_source_and_spread_across_sources() {
        let d = dests(&[1, 1, 1, 1]);
        let s = SourceHash::new(&d, false);
        let first = pick(&s, &d, [192, 168, 1, 7], 1000);
        for port in 0..100 {
            assert_eq!(pick(&s, &d, [192, 168, 1, 7], port), first);
        }
        // A rebuild from the same destinations gives the same answers.
        let s2 = SourceHash::new(&d, false);
        assert_eq!(s.buckets(), s2.buckets());
        let mut counts = [0; 4];
        for a in 0..=255u8 {
            for b in 0..8u8 {
                counts[pick(&s, &d, [10, b, a, 1], 5)] += 1;
            }
        }
        for c in counts {
            assert!((400..=624).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn sh_port_varies_with_port() {
        let d = dests(&[1, 1, 1, 1]);
        let s = SourceHash::new(&d, true);
        let picks: std::collections::BTreeSet<usize> = (1000..1100)
            .map(|p| pick(&s, &d, [192, 168, 1, 7], p))
            .collect();
        assert!(picks.len() > 1);
    }

    #[test]
    fn buckets_filled_by_weight() {
        let d = dests(&[2, 1]);
        let s = SourceHash::new(&d, false);
        assert_eq!(&s.buckets()[..6], &[0, 0, 1, 0, 0, 1]);
    }
}
