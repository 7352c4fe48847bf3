//! Source ports for full NAT (SNAT): per backend and SNAT address, a
//! bounded range in which no port is handed out twice.

use core::ops::RangeInclusive;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use super::error::Exhausted;
use crate::Protocol;

/// Linux's default `net.ipv4.ip_local_port_range`.
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 32768..=60999;

/// One (protocol, backend, SNAT address)'s ports: a bitmap of the range.
#[derive(Debug, Clone)]
struct Pool {
    used: Vec<u64>,
    in_use: u32,
    /// Where the next search starts (ports are handed out in rotation, so
    /// a released port is not reused at once).
    cursor: u32,
}

/// Hands out SNAT source ports so that no two live connections to one
/// backend from one SNAT address share a 5-tuple.
///
/// A port is unique per (protocol, backend address and port, SNAT
/// address): that is what makes the translated 5-tuple unique. Ports rotate
/// through the range (the next search starts after the last port given),
/// so a released port is reused as late as possible. Once a key's pool
/// exists, [`allocate`](Self::allocate) and [`release`](Self::release)
/// allocate nothing; a pool costs the range's bits (3.6 KiB for the
/// default range) until [`forget_backend`](Self::forget_backend).
///
/// # Examples
/// ```
/// use svclb::Protocol;
/// use svclb::packet::SourcePortAllocator;
/// let mut ports = SourcePortAllocator::new(40000..=40001);
/// let backend = "10.1.0.5:8080".parse()?;
/// let snat = "10.0.0.1".parse()?;
/// let a = ports.allocate(Protocol::Tcp, backend, snat)?;
/// let b = ports.allocate(Protocol::Tcp, backend, snat)?;
/// assert_ne!(a, b);
/// assert!(ports.allocate(Protocol::Tcp, backend, snat).is_err());
/// assert!(ports.release(Protocol::Tcp, backend, snat, a));
/// assert_eq!(ports.allocate(Protocol::Tcp, backend, snat)?, a);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct SourcePortAllocator {
    first: u16,
    last: u16,
    pools: HashMap<(Protocol, SocketAddr, IpAddr), Pool, ahash::RandomState>,
}

impl Default for SourcePortAllocator {
    fn default() -> Self {
        SourcePortAllocator::new(DEFAULT_PORT_RANGE)
    }
}

impl SourcePortAllocator {
    /// An allocator over `range` (an empty range is taken as its start
    /// alone; port 0 is never handed out).
    pub fn new(range: RangeInclusive<u16>) -> Self {
        let first = (*range.start()).max(1);
        let last = (*range.end()).max(first);
        SourcePortAllocator {
            first,
            last,
            pools: HashMap::default(),
        }
    }

    /// The range ports come from.
    pub fn range(&self) -> RangeInclusive<u16> {
        self.first..=self.last
    }

    fn size(&self) -> u32 {
        u32::from(self.last - self.first) + 1
    }

    /// A free source port for a new connection to `backend` from
    /// `snat_ip`, now marked in use.
    ///
    /// # Errors
    /// [`Exhausted`] when every port of the range is in use for that key.
    pub fn allocate(
        &mut self,
        protocol: Protocol,
        backend: SocketAddr,
        snat_ip: IpAddr,
    ) -> Result<u16, Exhausted> {
        let size = self.size();
        let pool = self
            .pools
            .entry((protocol, backend, snat_ip))
            .or_insert_with(|| Pool {
                used: vec![0; size.div_ceil(64) as usize],
                in_use: 0,
                cursor: 0,
            });
        let exhausted = Exhausted {
            protocol,
            backend,
            snat_ip,
            first: self.first,
            last: self.last,
        };
        if pool.in_use >= size {
            return Err(exhausted);
        }
        // Scan from the cursor to the end, then from the start: a word at a
        // time, skipping full words.
        let find = |used: &[u64], from: u32, to: u32| -> Option<u32> {
            let mut i = from;
            while i < to {
                let word = used[(i / 64) as usize] | ((1u64 << (i % 64)) - 1);
                let free = (!word).trailing_zeros();
                if free < 64 {
                    let idx = (i / 64) * 64 + free;
                    return (idx < to).then_some(idx);
                }
                i = (i / 64 + 1) * 64;
            }
            None
        };
        let idx = find(&pool.used, pool.cursor, size)
            .or_else(|| find(&pool.used, 0, pool.cursor))
            .ok_or(exhausted)?;
        pool.used[(idx / 64) as usize] |= 1 << (idx % 64);
        pool.in_use += 1;
        pool.cursor = if idx + 1 == size { 0 } else { idx + 1 };
        Ok(self.first + idx as u16)
    }

    /// Marks `port` free again; `false` if it was not in use.
    pub fn release(
        &mut self,
        protocol: Protocol,
        backend: SocketAddr,
        snat_ip: IpAddr,
        port: u16,
    ) -> bool {
        let Some(idx) = self.index(port) else {
            return false;
        };
        let Some(pool) = self.pools.get_mut(&(protocol, backend, snat_ip)) else {
            return false;
        };
        let (w, bit) = ((idx / 64) as usize, 1u64 << (idx % 64));
        if pool.used[w] & bit == 0 {
            return false;
        }
        pool.used[w] &= !bit;
        pool.in_use -= 1;
        true
    }

    /// Whether `port` is in use for that key.
    pub fn is_in_use(
        &self,
        protocol: Protocol,
        backend: SocketAddr,
        snat_ip: IpAddr,
        port: u16,
    ) -> bool {
        let (Some(idx), Some(pool)) = (
            self.index(port),
            self.pools.get(&(protocol, backend, snat_ip)),
        ) else {
            return false;
        };
        pool.used[(idx / 64) as usize] & (1 << (idx % 64)) != 0
    }

    /// How many ports are in use for that key.
    pub fn in_use(&self, protocol: Protocol, backend: SocketAddr, snat_ip: IpAddr) -> u32 {
        self.pools
            .get(&(protocol, backend, snat_ip))
            .map_or(0, |p| p.in_use)
    }

    /// Drops every pool of `backend` (once it is gone and its connections
    /// closed); returns how many ports were still marked in use.
    pub fn forget_backend(&mut self, backend: SocketAddr) -> u32 {
        let mut live = 0;
        self.pools.retain(|k, p| {
            if k.1 == backend {
                live += p.in_use;
                false
            } else {
                true
            }
        });
        live
    }

    fn index(&self, port: u16) -> Option<u32> {
        (self.first..=self.last)
            .contains(&port)
            .then(|| u32::from(port - self.first))
    }
}
