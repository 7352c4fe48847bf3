//! Per-backend (active, inactive) connection counts, O(1) by backend id.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Ids covered by the first chunk; chunk `k` covers `BASE << k` ids.
const BASE_BITS: u32 = 10;
const BASE: u64 = 1 << BASE_BITS;
/// Chunks needed to cover every `u32` id: ids + BASE < BASE << CHUNKS.
const CHUNKS: usize = 23;

/// One counter per backend: active in the high 32 bits, inactive in the low
/// 32, so that a class change is one atomic add and a read is consistent.
///
/// Chunks double in size (1024, 2048, … ids) and are allocated on first
/// use, never moved: memory is about twice the largest id used.
pub(crate) struct BackendCounts {
    chunks: [OnceLock<Box<[AtomicU64]>>; CHUNKS],
}

const ACTIVE: u64 = 1 << 32;
const INACTIVE: u64 = 1;

fn locate(id: u32) -> (usize, usize) {
    let v = u64::from(id) + BASE;
    let k = (63 - v.leading_zeros() - BASE_BITS) as usize;
    (k, (v - (BASE << k)) as usize)
}

impl BackendCounts {
    pub(crate) fn new() -> Self {
        BackendCounts {
            chunks: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn slot(&self, id: u32) -> &AtomicU64 {
        let (k, i) = locate(id);
        let chunk = self.chunks[k].get_or_init(|| {
            (0..(BASE << k) as usize)
                .map(|_| AtomicU64::new(0))
                .collect()
        });
        &chunk[i]
    }

    fn peek(&self, id: u32) -> u64 {
        let (k, i) = locate(id);
        self.chunks[k]
            .get()
            .map_or(0, |c| c[i].load(Ordering::Relaxed))
    }

    /// A connection of `id` appears, active or not.
    pub(crate) fn add(&self, id: u32, active: bool) {
        let d = if active { ACTIVE } else { INACTIVE };
        self.slot(id).fetch_add(d, Ordering::Relaxed);
    }

    /// A connection of `id` goes away.
    pub(crate) fn sub(&self, id: u32, active: bool) {
        let d = if active { ACTIVE } else { INACTIVE };
        self.slot(id).fetch_sub(d, Ordering::Relaxed);
    }

    /// A connection of `id` changes class.
    pub(crate) fn change(&self, id: u32, now_active: bool) {
        let d = if now_active {
            ACTIVE.wrapping_sub(INACTIVE)
        } else {
            INACTIVE.wrapping_sub(ACTIVE)
        };
        self.slot(id).fetch_add(d, Ordering::Relaxed);
    }

    /// (active, inactive).
    pub(crate) fn get(&self, id: u32) -> (u32, u32) {
        let v = self.peek(id);
        ((v >> 32) as u32, v as u32)
    }

    /// Bytes allocated for the counters.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.chunks
            .iter()
            .filter_map(OnceLock::get)
            .map(|c| c.len() * size_of::<AtomicU64>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_id() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(1023), (0, 1023));
        assert_eq!(locate(1024), (1, 0));
        assert_eq!(locate(3071), (1, 2047));
        assert_eq!(locate(3072), (2, 0));
        let (k, i) = locate(u32::MAX);
        assert!(k < CHUNKS);
        assert!(i < (BASE << k) as usize);
    }

    #[test]
    fn counts_move_between_classes() {
        let c = BackendCounts::new();
        assert_eq!(c.get(7), (0, 0));
        c.add(7, false);
        c.add(7, false);
        c.change(7, true);
        assert_eq!(c.get(7), (1, 1));
        c.change(7, false);
        c.sub(7, false);
        assert_eq!(c.get(7), (0, 1));
        c.add(100_000, true);
        assert_eq!(c.get(100_000), (1, 0));
        assert_eq!(c.get(u32::MAX), (0, 0));
        // Chunk 0 (ids 0..1024) and chunk 6 (65,536 ids from 64,512).
        assert_eq!(locate(100_000).0, 6);
        assert_eq!(c.memory_bytes(), (1024 + (1024 << 6)) * 8);
    }
}
