//! The tracker's configuration.

use core::fmt;
use core::time::Duration;

use super::Timeouts;
use crate::ValidationError;

/// The default bound: 262,144 entries, Cilium's default size of its
/// non-TCP conntrack map (`CT_MAP_SIZE_ANY`; its TCP map holds 524,288).
pub const DEFAULT_CONNTRACK_CAPACITY: usize = 262_144;

/// The largest accepted capacity (2^32 entries).
pub const MAX_CONNTRACK_CAPACITY: usize = 1 << 32;

/// How a [`Conntrack`](super::Conntrack) is sized, timed and keyed.
///
/// Every setter checks its value, so a `ConntrackConfig` is always valid.
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use svclb::conntrack::{ConntrackConfig, Timeouts};
/// let config = ConntrackConfig::new(65_536)?
///     .shards(16)?
///     .timeouts(Timeouts::netfilter())
///     .hash_key([1, 2, 3, 4])
///     .reap_batch(256)?
///     .sweep_interval(Duration::from_millis(500));
/// assert_eq!(config.capacity(), 65_536);
/// assert_eq!(config.shard_count(), 16);
/// assert!(ConntrackConfig::new(0).is_err());
/// # Ok::<(), svclb::ValidationError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ConntrackConfig {
    capacity: usize,
    shards: usize,
    timeouts: Timeouts,
    key: [u64; 4],
    reap_batch: usize,
    sweep_interval: Duration,
}

fn invalid(field: &str, value: impl fmt::Display, reason: &'static str) -> ValidationError {
    ValidationError::Invalid {
        field: field.into(),
        value: value.to_string(),
        reason,
    }
}

/// A fresh secret hash key from ahash's OS-seeded [`ahash::RandomState`].
fn os_key() -> [u64; 4] {
    let state = ahash::RandomState::new();
    [
        state.hash_one(0x5eed_0000_u64),
        state.hash_one(0x5eed_0001_u64),
        state.hash_one(0x5eed_0002_u64),
        state.hash_one(0x5eed_0003_u64),
    ]
}

impl Default for ConntrackConfig {
    /// [`DEFAULT_CONNTRACK_CAPACITY`] entries in 64 shards,
    /// [`Timeouts::ipvs`], a secret hash key drawn from the OS (through
    /// ahash's `RandomState::new()`), 1024 slots swept per shard per
    /// step, one sweep step a second.
    fn default() -> Self {
        ConntrackConfig {
            capacity: DEFAULT_CONNTRACK_CAPACITY,
            shards: 64,
            timeouts: Timeouts::ipvs(),
            key: os_key(),
            reap_batch: 1024,
            sweep_interval: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for ConntrackConfig {
    /// Everything but the hash key, which stays secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConntrackConfig")
            .field("capacity", &self.capacity)
            .field("shards", &self.shards)
            .field("timeouts", &self.timeouts)
            .field("key", &"<secret>")
            .field("reap_batch", &self.reap_batch)
            .field("sweep_interval", &self.sweep_interval)
            .finish()
    }
}

impl ConntrackConfig {
    /// The defaults with a bound of `capacity` entries.
    ///
    /// # Errors
    /// [`ValidationError::Invalid`] on `conntrack.capacity` unless it is in
    /// `1..=2^32`.
    pub fn new(capacity: usize) -> Result<Self, ValidationError> {
        if capacity == 0 || capacity > MAX_CONNTRACK_CAPACITY {
            return Err(invalid(
                "conntrack.capacity",
                capacity,
                "must be in 1..=4294967296",
            ));
        }
        Ok(ConntrackConfig {
            capacity,
            ..Default::default()
        })
    }

    /// Sets the number of shards, each with its own lock and an equal part
    /// of the bound (a power of two, 1..=1024). A small capacity uses
    /// fewer, so that each shard holds at least 16 entries
    /// ([`Self::effective_shards`]).
    ///
    /// # Errors
    /// [`ValidationError::Invalid`] on `conntrack.shards` otherwise.
    pub fn shards(mut self, shards: usize) -> Result<Self, ValidationError> {
        if !(1..=1024).contains(&shards) || !shards.is_power_of_two() {
            return Err(invalid(
                "conntrack.shards",
                shards,
                "must be a power of two in 1..=1024",
            ));
        }
        self.shards = shards;
        Ok(self)
    }

    /// Sets the per-state timeouts.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Fixes the secret key of the keyed hash that places flows in shards
    /// and buckets, for exact replays. The hash is keyed so that clients,
    /// who choose their addresses and ports, cannot aim many flows at one
    /// bucket (hash flooding); keep the key secret in production.
    pub fn hash_key(mut self, key: [u64; 4]) -> Self {
        self.key = key;
        self
    }

    /// Sets how many slots of each shard one timer step sweeps
    /// (1..=1,048,576); a shard lock is never held across more.
    ///
    /// # Errors
    /// [`ValidationError::Invalid`] on `conntrack.reapBatch` otherwise.
    pub fn reap_batch(mut self, slots: usize) -> Result<Self, ValidationError> {
        if !(1..=1 << 20).contains(&slots) {
            return Err(invalid(
                "conntrack.reapBatch",
                slots,
                "must be in 1..=1048576",
            ));
        }
        self.reap_batch = slots;
        Ok(self)
    }

    /// Sets the time between two sweep steps (what
    /// [`poll_timeout`](super::Conntrack::poll_timeout) asks for).
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// The bound on tracked connections.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The configured shard count (an upper bound; see
    /// [`Self::effective_shards`]).
    pub fn shard_count(&self) -> usize {
        self.shards
    }

    /// The shards actually used: the configured count, halved while a
    /// shard would hold fewer than 16 entries.
    pub fn effective_shards(&self) -> usize {
        let mut n = self.shards;
        while n > 1 && self.capacity / n < 16 {
            n /= 2;
        }
        n
    }

    /// The per-state timeouts.
    pub fn timeout_values(&self) -> &Timeouts {
        &self.timeouts
    }

    /// The hash key (keep it secret).
    pub fn key(&self) -> [u64; 4] {
        self.key
    }

    /// Slots swept per shard per timer step.
    pub fn reap_batch_size(&self) -> usize {
        self.reap_batch
    }

    /// Time between two sweep steps.
    pub fn sweep_period(&self) -> Duration {
        self.sweep_interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates() {
        assert!(ConntrackConfig::new(0).is_err());
        assert!(ConntrackConfig::new(MAX_CONNTRACK_CAPACITY + 1).is_err());
        let c = ConntrackConfig::new(10).unwrap();
        assert!(c.clone().shards(3).is_err());
        assert!(c.clone().shards(2048).is_err());
        assert!(c.clone().reap_batch(0).is_err());
        let err = c.clone().shards(0).unwrap_err();
        assert_eq!(err.field(), "conntrack.shards");
        assert_eq!(c.effective_shards(), 1);
        let big = ConntrackConfig::new(1 << 16).unwrap();
        assert_eq!(big.effective_shards(), 64);
    }

    #[test]
    fn default_keys_differ_and_debug_hides_them() {
        let a = ConntrackConfig::default();
        let b = ConntrackConfig::default();
        assert_ne!(a.key(), b.key());
        assert!(format!("{a:?}").contains("<secret>"));
        assert!(!format!("{a:?}").contains(&a.key()[0].to_string()));
    }
}
