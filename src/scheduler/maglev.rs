//! `mh`: Maglev consistent hashing (Eisenbud et al., NSDI 2016), as IPVS's
//! `ip_vs_mh.c` uses it for source hashing.
//!
//! Each eligible destination (weight > 0) gets a preference list over a
//! prime-sized table, `(offset + j * skip) mod M`, from two pinned hashes of
//! its address. Destinations take turns (weight / gcd turns each per round)
//! claiming the next still-empty slot of their own list until the table is
//! full. A lookup is `table[hash(source) mod M]`.
//!
//! The hashes are pinned (FNV-1a 64 with a SplitMix64 finaliser), so every
//! process that builds the table from the same destinations gets the same
//! table: independent load balancers agree with no shared state. Removing a
//! destination moves mostly the flows that were on it.

use std::net::{IpAddr, SocketAddr};

use super::{Destination, PickContext, Scheduler};
use crate::rng::mix64;

/// The table sizes IPVS offers (`CONFIG_IP_VS_MH_TAB_INDEX`).
pub const MAGLEV_TABLE_SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131_071,
];
/// The kernel's default table size.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 4093;

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

fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d: &u32| d * d <= n).all(|d| n % d != 0)
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
        let eligible: Vec<usize> = (0..dests.len())
            .filter(|&i| dests[i].weight() > 0)
            .collect();
        if eligible.is_empty() {
            return Maglev {
                table: Box::new([]),
                with_port,
            };
        }
        let g = eligible
            .iter()
            .map(|&i| dests[i].weight())
            .fold(0, gcd)
            .max(1);
        // Turns per round: weight / gcd, shifted down (as the kernel does)
        // so one round cannot exceed the table.
        let mut turns: Vec<u32> = eligible.iter().map(|&i| dests[i].weight() / g).collect();
        while turns.iter().map(|&t| u64::from(t)).sum::<u64>() > u64::from(m) {
            for t in &mut turns {
                *t = (*t >> 1).max(1);
            }
            if turns.iter().all(|&t| t == 1) {
                break;
            }
        }
        let mut perm: Vec<(u64, u64, u64)> = eligible
            .iter()
            .map(|&i| {
                let mut buf = [0u8; 18];
                let a = dests[i].addr();
                let n = addr_bytes(a.ip(), a.port(), &mut buf);
                let offset = stable_hash(&buf[..n], SEED_OFFSET) % u64::from(m);
                let skip = stable_hash(&buf[..n], SEED_SKIP) % u64::from(m - 1) + 1;
                (offset, skip, 0)
            })
            .collect();
        let mut table = vec![NONE; m as usize].into_boxed_slice();
        let mut filled = 0u32;
        'fill: loop {
            for (k, &i) in eligible.iter().enumerate() {
                for _ in 0..turns[k] {
                    let (offset, skip, next) = &mut perm[k];
                    let mut c = ((*offset + *next * *skip) % u64::from(m)) as usize;
                    while table[c] != NONE {
                        *next += 1;
                        c = ((*offset + *next * *skip) % u64::from(m)) as usize;
                    }
                    table[c] = i as u32;
                    *next += 1;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Maglev { table, with_port }
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
