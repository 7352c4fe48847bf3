//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the populate
//! step, the table sizes, the pinned hashes, and `mh`, the IPVS scheduler
//! built on them.
//!
//! # The populate step
//! [`populate`] takes each backend's `(offset, skip, weight)` and a table
//! size `M`, and returns the table (slot -> backend index). Backend `i`'s
//! preference list is `(offset_i + j * skip_i) mod M`; backends take turns
//! (`weight / gcd` turns each per round, shifted down as IPVS does when one
//! round would exceed the table) claiming the next still-empty slot of
//! their own list until all `M` slots are filled. It keeps one cursor per
//! backend: memory is O(N + M), with no N x M permutation matrix. The
//! paper's worked example (N = 3, M = 7) is checked in `tests/maglev.rs`.
//!
//! # Two families of pinned hashes
//! - **Katran's** ([`katran_offset_skip`], used by [`build_table`] and the
//!   eBPF dataplane): offset = `MurmurHash3_x64_64(key, 42, 0) mod M`,
//!   skip = `MurmurHash3_x64_64(key, 2718281828, 2307) mod (M - 1) + 1`,
//!   exactly as Katran's `MaglevBase::genMaglevPermutation`, where `key` is
//!   [`backend_key`] of the backend's address. [`murmur3_x64_64`] is
//!   Katran's two-word MurmurHash3 (the first half of MurmurHash3_x64_128
//!   over the 16 little-endian bytes of `A` then `B`).
//! - **`mh`'s** ([`Maglev`], the IPVS-mode scheduler): FNV-1a 64 with a
//!   SplitMix64 finaliser over the address bytes, pinned since svclb 0.1.
//!   Changing it would move every deployed `mh` flow, so it stays.
//!
//! Both are plain integer arithmetic with no per-process key: every process,
//! and the kernel program, computes the same values.
//!
//! # Table sizes
//! Primes from IPVS's and Cilium's list ([`MAGLEV_TABLE_SIZES`]).
//! [`default_table_size`] is Cilium's default, 16381, raised to the
//! smallest listed prime of at least 100 slots per backend.

use std::net::{IpAddr, SocketAddr};

use super::{Destination, PickContext, Scheduler};
use crate::rng::mix64;

/// The table sizes IPVS offers (`CONFIG_IP_VS_MH_TAB_INDEX`).
pub const MAGLEV_TABLE_SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131_071,
];
/// The kernel's default table size (IPVS `mh`).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 4093;
/// Cilium's default table size (`--bpf-lb-maglev-table-size`).
pub const CILIUM_MAGLEV_TABLE_SIZE: u32 = 16381;
/// The paper's rule of thumb: at least this many slots per backend.
pub const MIN_SLOTS_PER_BACKEND: u32 = 100;

/// Katran's Maglev seeds (`katran/lib/MaglevBase.cpp`).
const KATRAN_SEED0: u32 = 0;
const KATRAN_SEED1: u32 = 2307;
const KATRAN_SEED2: u64 = 42;
const KATRAN_SEED3: u64 = 2_718_281_828;

const NONE: u32 = u32::MAX;
const SEED_OFFSET: u64 = 0x9E37_79B1;
const SEED_SKIP: u64 = 0x9E37_79D9;

/// FNV-1a over `bytes`, started from `seed`, then finalised: a stable hash.
fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

fn addr_bytes(addr: IpAddr, port: u16, out: &mut [u8; 18]) -> usize {
    match addr {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            out[4..6].copy_from_slice(&port.to_be_bytes());
            6
        }
        IpAddr::V6(v6) => {
            out[..16].copy_from_slice(&v6.octets());
            out[16..18].copy_from_slice(&port.to_be_bytes());
            18
        }
    }
}

/// The pinned hash of a flow's source that indexes the table.
fn source_hash(src: SocketAddr, with_port: bool) -> u64 {
    let mut buf = [0u8; 18];
    let port = if with_port { src.port() } else { 0 };
    let n = addr_bytes(src.ip(), port, &mut buf);
    stable_hash(&buf[..n], 0)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Whether `n` is prime (trial division; table sizes are small).
pub fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d: &u32| d * d <= n).all(|d| n % d != 0)
}

/// The default table size for `backends` backends: Cilium's 16381, raised
/// to the smallest size in [`MAGLEV_TABLE_SIZES`] with at least
/// [`MIN_SLOTS_PER_BACKEND`] slots per backend (the largest, 131071, past
/// 1310 backends).
///
/// # Examples
/// ```
/// use svclb::scheduler::maglev::default_table_size;
/// assert_eq!(default_table_size(3), 16381);
/// assert_eq!(default_table_size(200), 32749);
/// assert_eq!(default_table_size(5000), 131071);
/// ```
pub fn default_table_size(backends: usize) -> u32 {
    let want = (backends as u64 * u64::from(MIN_SLOTS_PER_BACKEND))
        .max(u64::from(CILIUM_MAGLEV_TABLE_SIZE));
    MAGLEV_TABLE_SIZES
        .into_iter()
        .find(|&p| u64::from(p) >= want)
        .unwrap_or(MAGLEV_TABLE_SIZES[MAGLEV_TABLE_SIZES.len() - 1])
}

#[inline]
const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Katran's `MurmurHash3_x64_64(A, B, seed)`: MurmurHash3_x64_128 over the
/// 16 bytes of `a` then `b` (little-endian), returning the first 64-bit
/// half. Pinned: the eBPF program computes the same function in C.
///
/// # Examples
/// ```
/// use svclb::scheduler::maglev::murmur3_x64_64;
/// assert_ne!(murmur3_x64_64(0, 0, 0), 0);
/// assert_ne!(murmur3_x64_64(1, 42, 0), murmur3_x64_64(2, 42, 0));
/// ```
#[inline]
pub const fn murmur3_x64_64(a: u64, b: u64, seed: u32) -> u64 {
    const C1: u64 = 0x87c3_7b91_1142_53d5;
    const C2: u64 = 0x4cf5_ad43_2745_937f;
    let mut h1 = seed as u64;
    let mut h2 = seed as u64;
    let k1 = a.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2);
    h1 ^= k1;
    h1 = h1
        .rotate_left(27)
        .wrapping_add(h2)
        .wrapping_mul(5)
        .wrapping_add(0x52dc_e729);
    let k2 = b.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1);
    h2 ^= k2;
    h2 = h2
        .rotate_left(31)
        .wrapping_add(h1)
        .wrapping_mul(5)
        .wrapping_add(0x3849_5ab5);
    h1 ^= 16;
    h2 ^= 16;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    h1 = fmix64(h1);
    h2 = fmix64(h2);
    h1.wrapping_add(h2)
}

/// The 64-bit key of a backend address that [`katran_offset_skip`] hashes:
/// IPv4 `ip << 16 | port` (the address as a big-endian integer); IPv6
/// `murmur3_x64_64(high 64 bits, low 64 bits ^ port, 0)`.
pub fn backend_key(addr: SocketAddr) -> u64 {
    match addr.ip() {
        IpAddr::V4(v4) => (u64::from(u32::from(v4)) << 16) | u64::from(addr.port()),
        IpAddr::V6(v6) => {
            let x = u128::from(v6);
            murmur3_x64_64((x >> 64) as u64, x as u64 ^ u64::from(addr.port()), 0)
        }
    }
}

/// Katran's offset and skip of a backend key for a table of `m` slots:
/// `(murmur3_x64_64(key, 42, 0) mod m, murmur3_x64_64(key, 2718281828, 2307) mod (m - 1) + 1)`.
///
/// # Panics
/// Panics if `m < 2`.
pub fn katran_offset_skip(key: u64, m: u32) -> (u32, u32) {
    assert!(m >= 2, "a Maglev table needs at least 2 slots");
    let offset = murmur3_x64_64(key, KATRAN_SEED2, KATRAN_SEED0) % u64::from(m);
    let skip = murmur3_x64_64(key, KATRAN_SEED3, KATRAN_SEED1) % u64::from(m - 1) + 1;
    (offset as u32, skip as u32)
}

/// Maglev's populate step: `(offset, skip, weight)` per backend and a table
/// size `m` in, the table (slot -> index into `offsets_skips`) out.
///
/// Backends take turns in input order; each turn claims the next still-empty
/// slot of the backend's preference list `(offset + j * skip) mod m`. A
/// backend takes `weight / g` turns per round (`g` the gcd of the non-zero
/// weights; all halved, at least 1, while one round exceeds `m`, as IPVS's
/// `ip_vs_mh.c` shifts them). Weight 0 claims nothing. Memory: one cursor
/// per backend plus the table. Returns an empty table when no backend has a
/// weight.
///
/// # Panics
/// Panics if an offset is not below `m`, or a skip is 0 or shares a factor
/// with `m` (any skip in `1..m` is fine when `m` is prime): such a list
/// would not visit every slot.
///
/// # Examples
/// The paper's worked example (table 1):
/// ```
/// use svclb::scheduler::maglev::populate;
/// let t = populate(&[(3, 4, 1), (0, 2, 1), (3, 1, 1)], 7);
/// assert_eq!(t, [1, 0, 1, 0, 2, 2, 0]);
/// ```
pub fn populate(offsets_skips: &[(u32, u32, u32)], m: usize) -> Vec<u32> {
    let m32 = u32::try_from(m).expect("table size fits in u32");
    for &(offset, skip, _) in offsets_skips {
        assert!(offset < m32, "offset {offset} not below the table size {m}");
        assert!(
            skip > 0 && gcd(skip, m32) == 1,
            "skip {skip} must be coprime with the table size {m}"
        );
    }
    let g = offsets_skips.iter().map(|e| e.2).fold(0, gcd);
    if g == 0 || m == 0 {
        return Vec::new();
    }
    let mut turns: Vec<u32> = offsets_skips.iter().map(|e| e.2 / g).collect();
    while turns.iter().map(|&t| u64::from(t)).sum::<u64>() > m as u64 {
        if turns.iter().all(|&t| t <= 1) {
            break;
        }
        for t in &mut turns {
            if *t > 0 {
                *t = (*t >> 1).max(1);
            }
        }
    }
    // One cursor per backend: the next candidate slot of its list.
    let mut cursor: Vec<u32> = offsets_skips.iter().map(|e| e.0).collect();
    let mut table = vec![NONE; m];
    let mut filled = 0usize;
    loop {
        for (k, &(_, skip, _)) in offsets_skips.iter().enumerate() {
            for _ in 0..turns[k] {
                let mut c = cursor[k];
                while table[c as usize] != NONE {
                    c += skip;
                    if c >= m32 {
                        c -= m32;
                    }
                }
                table[c as usize] = k as u32;
                c += skip;
                if c >= m32 {
                    c -= m32;
                }
                cursor[k] = c;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }
}

/// Builds a table with Katran's hashes: backend `i` of `backends`
/// (address, weight) gets [`katran_offset_skip`]`(`[`backend_key`]`(addr), m)`;
/// the result maps slot -> index into `backends`.
///
/// # Panics
/// Panics if `m` is not prime.
///
/// # Examples
/// ```
/// use svclb::scheduler::maglev::build_table;
/// let b = ["10.0.0.1:80".parse().unwrap(), "10.0.0.2:80".parse().unwrap()];
/// let t = build_table(&[(b[0], 1), (b[1], 1)], 251);
/// assert_eq!(t.len(), 251);
/// assert!(t.iter().filter(|&&i| i == 0).count().abs_diff(125) <= 1);
/// ```
pub fn build_table(backends: &[(SocketAddr, u32)], m: u32) -> Vec<u32> {
    assert!(is_prime(m), "Maglev table size {m} is not prime");
    let entries: Vec<(u32, u32, u32)> = backends
        .iter()
        .map(|&(addr, w)| {
            let (o, s) = katran_offset_skip(backend_key(addr), m);
            (o, s, w)
        })
        .collect();
    populate(&entries, m as usize)
}

/// A built Maglev lookup table.
#[derive(Debug, Clone)]
pub struct Maglev {
    table: Box<[u32]>,
    with_port: bool,
}

impl Maglev {
    /// Builds a table of `table_size` slots (a prime; a non-prime is raised
    /// to the next size in [`MAGLEV_TABLE_SIZES`]) for `dests`, hashing the
    /// source address, and the port too when `with_port`.
    pub fn new(dests: &[Destination], table_size: u32, with_port: bool) -> Self {
        let m = if is_prime(table_size) {
            table_size
        } else {
            MAGLEV_TABLE_SIZES
                .into_iter()
                .find(|&p| p >= table_size)
                .unwrap_or(MAGLEV_TABLE_SIZES[9])
        };
        let entries: Vec<(u32, u32, u32)> = dests
            .iter()
            .map(|d| {
                let mut buf = [0u8; 18];
                let a = d.addr();
                let n = addr_bytes(a.ip(), a.port(), &mut buf);
                let offset = stable_hash(&buf[..n], SEED_OFFSET) % u64::from(m);
                let skip = stable_hash(&buf[..n], SEED_SKIP) % u64::from(m - 1) + 1;
                (offset as u32, skip as u32, d.weight())
            })
            .collect();
        Maglev {
            table: populate(&entries, m as usize).into_boxed_slice(),
            with_port,
        }
    }

    /// The table: destination index per slot.
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// The destination for a source address.
    #[inline]
    pub fn lookup(&self, src: SocketAddr) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let h = source_hash(src, self.with_port);
        Some(self.table[(h % self.table.len() as u64) as usize] as usize)
    }
}

impl Scheduler for Maglev {
    #[inline]
    fn pick(&self, _dests: &[Destination], ctx: &PickContext<'_>) -> Option<usize> {
        self.lookup(ctx.flow.src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dests(n: usize) -> Vec<Destination> {
        (0..n)
            .map(|i| {
                Destination::new(
                    SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 8080)),
                    1,
                )
            })
            .collect()
    }

    #[test]
    fn table_is_full_and_balanced() {
        let d = dests(10);
        let m = Maglev::new(&d, DEFAULT_MAGLEV_TABLE_SIZE, false);
        assert_eq!(m.table().len(), 4093);
        let mut counts = [0u32; 10];
        for &s in m.table() {
            counts[s as usize] += 1;
        }
        // Round-robin claiming: shares differ by at most one slot.
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 1, "{counts:?}");
    }

    #[test]
    fn same_destinations_same_table_in_any_process() {
        let d = dests(7);
        let a = Maglev::new(&d, 251, false);
        let b = Maglev::new(&d, 251, false);
        assert_eq!(a.table(), b.table());
        // Pinned: the first slots never change across builds or releases.
        assert_eq!(&a.table()[..8], &PINNED_FIRST_SLOTS);
    }

    // Recorded from the first build of this implementation; a change here breaks
    // agreement with every deployed instance.
    const PINNED_FIRST_SLOTS: [u32; 8] = [0, 5, 1, 5, 5, 0, 4, 3];

    #[test]
    fn removing_a_destination_moves_mostly_its_own_flows() {
        let d = dests(20);
        let before = Maglev::new(&d, 4093, false);
        let mut fewer = d.clone();
        fewer.remove(5);
        let after = Maglev::new(&fewer, 4093, false);
        let addr = |dd: &[Destination], i: u32| dd[i as usize].addr();
        let mut moved_other = 0;
        for (s, (&x, &y)) in before.table().iter().zip(after.table()).enumerate() {
            let (ax, ay) = (addr(&d, x), addr(&fewer, y));
            if ax != d[5].addr() && ax != ay {
                moved_other += 1;
            }
            let _ = s;
        }
        // Everything on the removed backend moves (1/20 of the table); the
        // rest barely does.
        assert!(moved_other * 100 < 4093 * 5, "moved {moved_other} of 4093");
    }

    #[test]
    fn weights_give_more_slots_and_zero_weight_none() {
        let mut d = dests(3);
        d[0] = Destination::new(d[0].addr(), 3);
        d[2] = Destination::new(d[2].addr(), 0);
        let m = Maglev::new(&d, 1021, false);
        let count = |k| m.table().iter().filter(|&&s| s == k).count();
        assert_eq!(count(2), 0);
        assert!(count(0) > 2 * count(1), "{} vs {}", count(0), count(1));
        assert!(
            Maglev::new(&dests(0), 251, false)
                .lookup("10.0.0.1:1".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn non_prime_sizes_round_up() {
        assert_eq!(Maglev::new(&dests(2), 1000, false).table().len(), 1021);
    }
}
