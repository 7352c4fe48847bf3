//! Hash flooding of the affinity table: an outsider who can compute the
//! shard of a key can aim about capacity/shards keys at one shard and evict
//! everyone else's entries there (capacity is split per shard).
//!
//! The attacker here builds keys that collide in one shard under what they
//! know (the replay seed with the old, seed-only shard hash; or the hash key,
//! if the operator fixed it to a value the attacker learnt). The test shows
//! both halves:
//!
//! - with the secret key on (the default: drawn from the OS per table),
//!   the attack keys spread over the shards within a chi-square bound and
//!   no victim entry is evicted;
//! - with the key fixed as the attacker assumes, the same construction
//!   puts every attack key in one shard (the chi-square statistic explodes)
//!   and the victims in that shard lose their entries. This half proves the
//!   checks above can fail.

use core::time::Duration;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use svclb::affinity::AffinityScope;
use svclb::rng::mix64;
use svclb::{AffinityConfig, AffinityKey, AffinityTable, Instant};

const CAPACITY: usize = 4096;
const SHARDS: usize = 32;
/// Eight times a shard's capacity: more than enough to flush one shard.
const ATTACK_KEYS: usize = 8 * CAPACITY / SHARDS;
const VICTIMS: u32 = 1024;
/// The replay seed, which the attacker knows (it is in every trace).
const SEED: u64 = 42;
/// The hash key the attacker assumes the operator fixed.
const ASSUMED_KEY: [u64; 4] = [1, 2, 3, 4];

/// The chi-square critical value at 31 degrees of freedom for p = 1e-6
/// (Wilson-Hilferty: 31 * (1 - 2/279 + 4.753 * sqrt(2/279))^3 = 84.2). A
/// table with an OS-drawn key fails it by chance about once in a million
/// runs; an attack that concentrates even a fifth of its keys in one shard
/// scores in the thousands.
const CHI2_31_P1E6: f64 = 84.2;

fn config() -> AffinityConfig {
    AffinityConfig::new(CAPACITY)
        .unwrap()
        .shards(SHARDS)
        .unwrap()
}

fn backend() -> SocketAddr {
    "10.1.0.1:8080".parse().unwrap()
}

/// Clients from one IPv6 /64, which one host can hold.
fn v6_client(i: u64) -> AffinityKey {
    let prefix: u128 = 0x2001_0db8_0001_0002 << 64;
    AffinityKey::ClientIp(IpAddr::V6(Ipv6Addr::from(prefix | u128::from(i))))
}

fn victim(i: u32) -> AffinityKey {
    AffinityKey::ClientIp(IpAddr::V4(Ipv4Addr::from(0x0a02_0000 + i)))
}

/// The shard main's table chose before keyed hashing: a public, invertible
/// hash of the key and the replay seed (scope slot 0).
fn seed_only_shard(key: AffinityKey, seed: u64) -> usize {
    (mix64(key.stable_hash() ^ mix64(seed ^ 0xA5F1_7AB1_E000_0001)) as usize) & (SHARDS - 1)
}

/// The first `ATTACK_KEYS` clients of the /64 that `shard_of` puts in
/// shard 0.
fn collide(mut shard_of: impl FnMut(AffinityKey) -> usize) -> Vec<AffinityKey> {
    (0..)
        .map(v6_client)
        .filter(|&k| shard_of(k) == 0)
        .take(ATTACK_KEYS)
        .collect()
}

/// The keys the attacker computes offline with the key they assume (a
/// table built with it is exactly their oracle).
fn collide_under_assumed_key() -> Vec<AffinityKey> {
    let oracle = AffinityTable::new(config().hash_key(ASSUMED_KEY), SEED);
    let scope = oracle.new_scope(Duration::from_secs(3600));
    collide(|k| oracle.shard_index(&scope, k))
}

fn chi2(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let expected = total as f64 / counts.len() as f64;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

fn spread(table: &AffinityTable, scope: &AffinityScope, keys: &[AffinityKey]) -> Vec<u64> {
    let mut counts = vec![0u64; table.shards()];
    for &k in keys {
        counts[table.shard_index(scope, k)] += 1;
    }
    counts
}

fn route(table: &AffinityTable, scope: &Arc<AffinityScope>, key: AffinityKey, now: Instant) {
    let b = backend();
    table
        .route(scope, key, now, |e| (e == b).then_some(0), || Some((0, b)))
        .expect("the scheduler always picks");
}

/// Pins the victims, floods, and returns how many victims lost their entry.
fn victims_evicted(table: &AffinityTable, keys: &[AffinityKey]) -> (u32, Arc<AffinityScope>) {
    let scope = table.new_scope(Duration::from_secs(3600));
    for i in 0..VICTIMS {
        route(table, &scope, victim(i), Instant::from_secs(1));
    }
    for &k in keys {
        route(table, &scope, k, Instant::from_secs(2));
    }
    let lost = (0..VICTIMS)
        .filter(|&i| {
            table
                .get(&scope, victim(i), Instant::from_secs(3))
                .is_none()
        })
        .count() as u32;
    (lost, scope)
}

#[test]
fn the_secret_key_spreads_keys_built_to_collide() {
    for (name, keys) in [
        (
            "built with the replay seed",
            collide(|k| seed_only_shard(k, SEED)),
        ),
        ("built with the assumed key", collide_under_assumed_key()),
    ] {
        assert_eq!(keys.len(), ATTACK_KEYS);
        // The default config: a key drawn from the OS for this table.
        let table = AffinityTable::new(config(), SEED);
        assert_eq!(table.config().fixed_hash_key(), None);
        let (lost, scope) = victims_evicted(&table, &keys);
        let counts = spread(&table, &scope, &keys);
        let x2 = chi2(&counts);
        assert!(
            x2 < CHI2_31_P1E6,
            "{name}: chi2 = {x2:.1} over {SHARDS} shards: {counts:?}"
        );
        assert_eq!(lost, 0, "{name}: victims evicted with the secret key on");
        assert_eq!(table.len(), ATTACK_KEYS + VICTIMS as usize);
    }
}

#[test]
fn with_the_key_the_attacker_assumes_the_keys_concentrate_and_evict() {
    let keys = collide_under_assumed_key();
    let table = AffinityTable::new(config().hash_key(ASSUMED_KEY), SEED);
    let (lost, scope) = victims_evicted(&table, &keys);
    let counts = spread(&table, &scope, &keys);
    // Every attack key in shard 0: the check above would fail.
    assert_eq!(counts[0], ATTACK_KEYS as u64, "{counts:?}");
    let x2 = chi2(&counts);
    assert!(x2 > 100.0 * CHI2_31_P1E6, "chi2 = {x2:.1}");
    // And it hurts: every victim that shares shard 0 is gone (the shard
    // holds CAPACITY / SHARDS entries, the flood is eight times that).
    let in_target = (0..VICTIMS)
        .filter(|&i| table.shard_index(&scope, victim(i)) == 0)
        .count() as u32;
    assert!(in_target > 0);
    assert_eq!(lost, in_target, "victims evicted by the flood");
}

#[test]
fn a_fixed_key_replays_and_different_keys_shard_differently() {
    let a = AffinityTable::new(config().hash_key(ASSUMED_KEY), 1);
    let b = AffinityTable::new(config().hash_key(ASSUMED_KEY), 2);
    let c = AffinityTable::new(config().hash_key([5, 6, 7, 8]), 1);
    let (sa, sb, sc) = (
        a.new_scope(Duration::from_secs(1)),
        b.new_scope(Duration::from_secs(1)),
        c.new_scope(Duration::from_secs(1)),
    );
    let keys: Vec<AffinityKey> = (0..1000).map(v6_client).collect();
    // The same key gives the same shards whatever the seed.
    let on_a: Vec<usize> = keys.iter().map(|&k| a.shard_index(&sa, k)).collect();
    let on_b: Vec<usize> = keys.iter().map(|&k| b.shard_index(&sb, k)).collect();
    let on_c: Vec<usize> = keys.iter().map(|&k| c.shard_index(&sc, k)).collect();
    assert_eq!(on_a, on_b);
    let same = on_a.iter().zip(&on_c).filter(|(x, y)| x == y).count();
    // Independent keys agree on about 1/32 of the shards.
    assert!(same < 100, "{same} of 1000 keys share a shard");
}
