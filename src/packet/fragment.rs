//! Matching later fragments to the flow of their datagram's first fragment.

use core::time::Duration;
use std::collections::{HashMap, VecDeque};

use super::parse::{FragmentKey, PacketKind, ParsedPacket, Unroutable};
use crate::{Flow, Instant};

/// A bounded table from a datagram's [`FragmentKey`] to the flow its
/// first fragment carried, so that later fragments (which hold no ports)
/// follow the first to the same backend, or are reported unroutable;
/// never guessed.
///
/// Entries live `timeout` from their first fragment (Linux's `ipfrag_time`
/// is 30 s). When full, the oldest entry is dropped. Time is the
/// caller's; [`FragmentTracker::handle_timeout`] drops expired entries.
/// Once it has held `capacity` entries, nothing allocates.
///
/// A later fragment that arrives before its first fragment is
/// unroutable here (the kernel would hold it for reassembly).
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use svclb::{Flow, Instant, Protocol};
/// use svclb::packet::{FragmentKey, FragmentTracker};
/// let mut t = FragmentTracker::new(1024, Duration::from_secs(30));
/// let flow = Flow::udp("10.2.0.9:40000".parse()?, "10.96.0.10:53".parse()?);
/// let key = FragmentKey { src: flow.src.ip(), dst: flow.dst.ip(), id: 7, protocol: Protocol::Udp };
/// t.insert(key, flow, Instant::ZERO);
/// assert_eq!(t.lookup(&key, Instant::from_secs(1)), Some(flow));
/// assert_eq!(t.lookup(&key, Instant::from_secs(31)), None);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct FragmentTracker {
    capacity: usize,
    timeout: Duration,
    entries: HashMap<FragmentKey, (Flow, Instant), ahash::RandomState>,
    /// Keys in insertion order with their deadlines: the oldest first.
    order: VecDeque<(FragmentKey, Instant)>,
}

impl FragmentTracker {
    /// A tracker holding at most `capacity` datagrams (at least 1), each
    /// for `timeout`.
    pub fn new(capacity: usize, timeout: Duration) -> Self {
        let capacity = capacity.max(1);
        FragmentTracker {
            capacity,
            timeout,
            // Twice the capacity: at most half full, so when removals'
            // tombstones use up the free slots the table rehashes in place
            // instead of growing (hashbrown grows only past half full),
            // and a full tracker under churn never allocates.
            entries: HashMap::with_capacity_and_hasher(
                capacity.saturating_mul(2),
                ahash::RandomState::new(),
            ),
            order: VecDeque::with_capacity(capacity),
        }
    }

    /// Records the flow of a first fragment. A key already present keeps
    /// its deadline and takes the new flow.
    pub fn insert(&mut self, key: FragmentKey, flow: Flow, now: Instant) {
        if let Some(e) = self.entries.get_mut(&key) {
            e.0 = flow;
            return;
        }
        self.handle_timeout(now);
        if self.entries.len() >= self.capacity {
            if let Some((old, _)) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
        let deadline = now + self.timeout;
        self.entries.insert(key, (flow, deadline));
        self.order.push_back((key, deadline));
    }

    /// The flow of the datagram `key` names, if its first fragment was seen
    /// less than `timeout` ago.
    pub fn lookup(&self, key: &FragmentKey, now: Instant) -> Option<Flow> {
        match self.entries.get(key) {
            Some(&(flow, deadline)) if now < deadline => Some(flow),
            _ => None,
        }
    }

    /// The flow of any parsed packet: a flow's own, a first fragment's
    /// (recorded for its later fragments), or a later fragment's first
    /// fragment's; else why there is none.
    ///
    /// # Errors
    /// [`Unroutable`]: the packet carries no flow, or it is a later
    /// fragment whose first fragment is unknown
    /// ([`Unroutable::UnmatchedFragment`]).
    pub fn resolve(&mut self, parsed: &ParsedPacket, now: Instant) -> Result<Flow, Unroutable> {
        match *parsed.kind() {
            PacketKind::Flow(flow) => {
                if let Some(key) = parsed.first_fragment() {
                    self.insert(key, flow, now);
                }
                Ok(flow)
            }
            PacketKind::Fragment(f) => self
                .lookup(&f.key(), now)
                .ok_or(Unroutable::UnmatchedFragment),
            PacketKind::IcmpError { inner, .. } => Ok(inner),
            PacketKind::Unroutable(why) => Err(why),
        }
    }

    /// Drops the entries whose time is up; returns how many.
    pub fn handle_timeout(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        while let Some(&(key, deadline)) = self.order.front() {
            if deadline > now {
                break;
            }
            self.order.pop_front();
            if self.entries.get(&key).is_some_and(|e| e.1 == deadline) {
                self.entries.remove(&key);
                dropped += 1;
            }
        }
        dropped
    }

    /// The earliest deadline, for the caller's timer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.order.front().map(|e| e.1)
    }

    /// How many datagrams are tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
