//! Property tests: svclb's invariants, each checked against a naive
//! reference model (`tests/reference/mod.rs`).
//!
//! Cases per property (the `cases` of each `proptest_config` below; the
//! README's "Reliability" section repeats these numbers):
//!
//! | property | cases |
//! | --- | --- |
//! | `ops_match_the_reference_model` (iptables, nftables and IPVS with a random scheduler: forwarded backend is a current usable endpoint; every dataplane agrees with the model on candidates, reject, drop, not-a-service; a refused batch leaves the snapshot unchanged; incremental merge = naive merge; IPVS hash lookup = naive linear lookup) | 512 |
//! | `slice_arrival_order_does_not_change_the_merge` | 512 |
//! | `round_robin_counts_differ_by_at_most_one_per_cycle` | 256 |
//! | `weighted_round_robin_matches_the_kernel_cycle` | 256 |
//! | `source_hash_is_stable_across_rebuilds` (`sh`, `sh-port`, `mh`, `mh-port`) | 256 |
//! | `source_hash_buckets_match_a_naive_fill` | 512 |
//! | `random_cascade_is_uniform` (a plain test: the real walk, n = 1..=20, 20,000·n draws each, chi-square at p = 1e-6) | 1 |
//!
//! `PROPTEST_CASES=n` in the environment runs every property `n` times
//! instead, for a longer run.

mod reference;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use proptest::prelude::*;
use reference::*;
use svclb::scheduler::{Destination, SourceHash};
use svclb::*;

/// The config of a property with `n` cases, unless `PROPTEST_CASES` is set
/// (then that many, for a longer run).
fn cases(n: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = n;
    }
    config
}

/// Mostly TCP, so that slice ports often match service ports.
fn protocol_gen() -> impl Strategy<Value = u8> {
    prop_oneof![12 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)]
}

fn port_gen() -> impl Strategy<Value = PortGen> {
    (0u8..4, protocol_gen(), 0u8..7).prop_map(|(port, protocol, target)| PortGen {
        port,
        protocol,
        target,
    })
}

fn svc_gen() -> impl Strategy<Value = SvcGen> {
    (
        0..SERVICES,
        prop_oneof![6 => Just(0u8), 1 => 1..VIPS],
        prop_oneof![3 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)],
        prop_oneof![
            3 => proptest::collection::vec(port_gen(), 1..2),
            1 => proptest::collection::vec(port_gen(), 2..4),
        ],
        prop_oneof![4 => Just(false), 1 => Just(true)],
        prop_oneof![
            6 => Just(None),
            3 => (1u32..=86_400).prop_map(Some),
            1 => prop_oneof![Just(0u32), Just(86_401u32)].prop_map(Some),
        ],
    )
        .prop_map(|(id, vip, family, ports, local, affinity)| SvcGen {
            id,
            vip,
            family,
            ports,
            local,
            affinity,
        })
}

fn ep_gen() -> impl Strategy<Value = EpGen> {
    (
        0..HOSTS,
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<bool>()),
        0u8..3,
        proptest::option::of(0u8..2),
        proptest::option::of(0u8..3),
        prop_oneof![6 => Just(None), 1 => (0u8..4).prop_map(Some)],
    )
        .prop_map(
            |(host, ready, serving, terminating, node, zone_hint, node_hint, weight)| EpGen {
                host,
                ready,
                serving,
                terminating,
                node,
                zone_hint,
                node_hint,
                weight,
            },
        )
}

fn slice_port_gen() -> impl Strategy<Value = SlicePortGen> {
    (
        prop_oneof![5 => Just(0u8), 3 => Just(2u8), 1 => Just(3u8)],
        prop_oneof![8 => 0u8..4, 1 => Just(4u8)],
        protocol_gen(),
    )
        .prop_map(|(name, port, protocol)| SlicePortGen {
            name,
            port,
            protocol,
        })
}

fn slice_gen() -> impl Strategy<Value = SliceGen> {
    (
        0..SLICES,
        0..SERVICES,
        prop_oneof![4 => Just(false), 1 => Just(true)],
        proptest::collection::vec(slice_port_gen(), 1..3),
        proptest::collection::vec(ep_gen(), 0..7),
    )
        .prop_map(|(name, svc, v6, ports, endpoints)| SliceGen {
            name,
            svc,
            v6,
            ports,
            endpoints,
        })
}

fn change_gen() -> impl Strategy<Value = ChangeGen> {
    prop_oneof![
        4 => svc_gen().prop_map(ChangeGen::UpsertService),
        1 => (0..SERVICES).prop_map(ChangeGen::DeleteService),
        10 => slice_gen().prop_map(ChangeGen::UpsertSlice),
        2 => (0..SLICES).prop_map(ChangeGen::DeleteSlice),
    ]
}

#[derive(Debug, Clone)]
enum OpGen {
    Batch(Vec<ChangeGen>),
    Flow { src: u8, dst: usize, close: bool },
}

fn op_gen() -> impl Strategy<Value = OpGen> {
    prop_oneof![
        2 => proptest::collection::vec(change_gen(), 1..4).prop_map(OpGen::Batch),
        3 => (any::<u8>(), any::<usize>(), any::<bool>())
            .prop_map(|(src, dst, close)| OpGen::Flow { src, dst, close }),
    ]
}

fn client(i: u8, v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(format!("fd02::{i}").parse().unwrap(), 40_000 + u16::from(i))
    } else {
        SocketAddr::from(([10, 2, 0, i], 40_000 + u16::from(i)))
    }
}

proptest! {
    #![proptest_config(cases(512))]

    /// Random sequences of batches interleaved with flows, on iptables mode
    /// and IPVS mode with a random scheduler, against the reference model.
    #[test]
    fn ops_match_the_reference_model(
        initial in proptest::collection::vec(svc_gen(), 4),
        ops in proptest::collection::vec(op_gen(), 1..60),
        kind in proptest::sample::select(SchedulerKind::ALL.to_vec()),
        seed in any::<u64>(),
    ) {
        let mut table = ServiceTable::new();
        let mut model = RefModel::default();
        let dps = dataplanes(seed, kind);
        let sh = matches!(kind, SchedulerKind::SourceHash | SchedulerKind::SourceHashPort);
        // Start from the four services (those that build).
        let initial: Vec<ChangeGen> = initial
            .into_iter()
            .enumerate()
            .map(|(i, g)| ChangeGen::UpsertService(SvcGen { id: i as u8, ..g }))
            .collect();
        if let Err(e) = step_batch(&mut table, &mut model, &dps, &initial) {
            prop_assert!(false, "initial services: {e}");
        }
        for (t, op) in ops.iter().enumerate() {
            match op {
                OpGen::Batch(batch) => {
                    if let Err(e) = step_batch(&mut table, &mut model, &dps, batch) {
                        prop_assert!(false, "step {t}: {e}");
                    }
                }
                OpGen::Flow { src, dst, close } => {
                    let (protocol, dst) = aim_flow(*dst, &model);
                    let flow = Flow::new(protocol, client(*src, dst.is_ipv6()), dst);
                    let now = Instant::from_secs(t as u64);
                    if let Err(e) = step_flow(&model, &dps, sh, &flow, now, *close) {
                        prop_assert!(false, "step {t}: {e}");
                    }
                }
            }
        }
        // A dataplane synced once from scratch agrees with the ones that
        // followed every incremental change.
        let fresh = dataplanes(seed, kind);
        let all = table.full_change_set();
        for dp in &fresh {
            dp.sync(&table, &all, Instant::ZERO);
        }
        if let Err(e) = check_dataplanes(&model, &fresh) {
            prop_assert!(false, "fresh: {e}");
        }
    }
}

fn service_with_port(name: &str, vip: &str) -> Service {
    Service::builder("default", name)
        .cluster_ip(vip.parse().unwrap())
        .port(ServicePortSpec::tcp(80).name("http"))
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(cases(512))]

    /// The same set of slices gives the same merged table whatever order
    /// they arrive in, one by one or in one batch, and whatever stale
    /// versions came before them.
    #[test]
    fn slice_arrival_order_does_not_change_the_merge(
        slices in proptest::collection::vec(slice_gen(), 1..8),
        stale in proptest::collection::vec(slice_gen(), 0..4),
        order in any::<proptest::sample::Index>(),
    ) {
        // Every slice targets svc-0 and has a distinct name; the last
        // version of a name wins.
        let mut latest: BTreeMap<u8, EndpointSlice> = BTreeMap::new();
        for g in &slices {
            let g = SliceGen { svc: 0, ..g.clone() };
            if let Ok(s) = g.build() {
                latest.insert(g.name % SLICES, s);
            }
        }
        let final_slices: Vec<EndpointSlice> = latest.into_values().collect();
        let svc = Change::UpsertService(service_with_port("svc-0", "10.96.0.1"));

        let mut one_batch = ServiceTable::new();
        one_batch
            .apply_batch(std::iter::once(svc.clone()).chain(final_slices.iter().cloned().map(Change::UpsertSlice)))
            .unwrap();

        // Another order: rotate and reverse, stale versions first.
        let mut shuffled = final_slices.clone();
        let len = shuffled.len().max(1);
        shuffled.rotate_left(order.index(len) % len);
        shuffled.reverse();
        let mut one_by_one = ServiceTable::new();
        one_by_one.apply(svc).unwrap();
        for g in &stale {
            let g = SliceGen { svc: 0, ..g.clone() };
            if let Ok(s) = g.build() {
                one_by_one.apply(Change::UpsertSlice(s)).unwrap();
            }
        }
        for s in &shuffled {
            one_by_one.apply(Change::UpsertSlice(s.clone())).unwrap();
        }
        // Stale slices whose name has no final version are deleted.
        let final_names: BTreeSet<SliceKey> = final_slices.iter().map(|s| s.key().clone()).collect();
        let extra: Vec<SliceKey> = one_by_one
            .slices_of(&ServiceKey::new("default", "svc-0"))
            .map(|s| s.key().clone())
            .filter(|k| !final_names.contains(k))
            .collect();
        for key in extra {
            one_by_one.apply(Change::DeleteSlice(key)).unwrap();
        }
        prop_assert_eq!(one_batch.snapshot(), one_by_one.snapshot());

        // And both equal the naive merge.
        let mut model = RefModel::default();
        model
            .apply_batch(&[Change::UpsertService(service_with_port("svc-0", "10.96.0.1"))])
            .unwrap();
        let changes: Vec<Change> = final_slices.into_iter().map(Change::UpsertSlice).collect();
        model.apply_batch(&changes).unwrap();
        prop_assert_eq!(table_merged(&one_by_one), model_merged(&model));
    }
}

/// The single slice of `svc-0`: `weights.len()` ready endpoints with these
/// weights, at `weighted_addr(i)`.
fn weighted_slice(weights: &[u8]) -> EndpointSlice {
    let mut b = EndpointSlice::builder("default", "s-0", "svc-0", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080).name("http"));
    for (i, w) in weights.iter().enumerate() {
        b = b.endpoint(
            EndpointSpec::new(format!("10.1.{}.{}", i / 200, i % 200 + 1)).weight(i64::from(*w)),
        );
    }
    b.build().unwrap()
}

/// The backend address of endpoint `i` of [`weighted_slice`].
fn weighted_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 1, (i / 200) as u8, (i % 200 + 1) as u8], 8080))
}

/// A table of one service on `10.96.0.1:80` whose single slice holds
/// `weights.len()` ready endpoints with these weights.
fn weighted_table(weights: &[u8]) -> (ServiceTable, ChangeSet) {
    let mut t = ServiceTable::new();
    let cs = t
        .apply_batch([
            Change::UpsertService(service_with_port("svc-0", "10.96.0.1")),
            Change::UpsertSlice(weighted_slice(weights)),
        ])
        .unwrap();
    (t, cs)
}

fn vip_flow(src: u16) -> Flow {
    Flow::tcp(
        SocketAddr::from(([10, 2, (src >> 8) as u8, src as u8], 40_000)),
        "10.96.0.1:80".parse().unwrap(),
    )
}

proptest! {
    #![proptest_config(cases(256))]

    /// `rr`: after every pick, the per-backend counts since the last rebuild
    /// differ by at most 1, and each full cycle gives every backend exactly
    /// one more connection. A rebuild (an endpoint change) starts a new
    /// cycle.
    #[test]
    fn round_robin_counts_differ_by_at_most_one_per_cycle(
        rounds in proptest::collection::vec((proptest::collection::vec(0u8..3, 1..40), 0usize..200), 1..4),
    ) {
        let dp = IpvsDataplane::new(DataplaneConfig::with_seed(1).conntrack(None).scheduler(SchedulerKind::RoundRobin));
        let mut table = ServiceTable::new();
        for (round, (weights, picks)) in rounds.into_iter().enumerate() {
            // Sync as an update of the previous table: the first round adds
            // the service and its slice, later rounds replace the slice, and
            // each sync gets only that change set.
            let slice = Change::UpsertSlice(weighted_slice(&weights));
            let cs = if round == 0 {
                table.apply_batch([
                    Change::UpsertService(service_with_port("svc-0", "10.96.0.1")),
                    slice,
                ])
            } else {
                table.apply(slice)
            }
            .unwrap();
            dp.sync(&table, &cs, Instant::ZERO);
            // The update took: the candidates are exactly this round's
            // endpoints of weight above zero.
            let expected: BTreeSet<SocketAddr> = weights
                .iter()
                .enumerate()
                .filter(|(_, w)| **w > 0)
                .map(|(i, _)| weighted_addr(i))
                .collect();
            let eligible: Vec<SocketAddr> = match dp.candidates(Protocol::Tcp, "10.96.0.1:80".parse().unwrap()) {
                Candidates::Endpoints(v) => v,
                Candidates::Reject => {
                    prop_assert!(expected.is_empty(), "rejects with candidates {expected:?}");
                    continue;
                }
                other => { prop_assert!(false, "{other:?}"); unreachable!() }
            };
            prop_assert_eq!(eligible.iter().copied().collect::<BTreeSet<_>>(), expected);
            let n = eligible.len();
            let mut counts: BTreeMap<SocketAddr, usize> = eligible.iter().map(|a| (*a, 0)).collect();
            for i in 0..picks {
                let b = dp.route(&vip_flow(i as u16), Instant::ZERO).backend().unwrap();
                *counts.get_mut(&b).expect("a candidate") += 1;
                let max = *counts.values().max().unwrap();
                let min = *counts.values().min().unwrap();
                prop_assert!(max - min <= 1, "after {} picks: {counts:?}", i + 1);
                if (i + 1) % n == 0 {
                    prop_assert!(counts.values().all(|c| *c == (i + 1) / n));
                }
            }
        }
    }

    /// `wrr`: over one cycle of `sum(w) / gcd(w)` picks, each backend gets
    /// exactly `w / gcd(w)` (the kernel's schedule), and weight 0 none.
    #[test]
    fn weighted_round_robin_matches_the_kernel_cycle(
        weights in proptest::collection::vec(0u8..6, 1..12),
        cycles in 1usize..4,
    ) {
        prop_assume!(weights.iter().any(|w| *w > 0));
        let (t, cs) = weighted_table(&weights);
        let dp = IpvsDataplane::new(DataplaneConfig::with_seed(1).conntrack(None).scheduler(SchedulerKind::WeightedRoundRobin));
        dp.sync(&t, &cs, Instant::ZERO);
        fn gcd(a: u32, b: u32) -> u32 { if b == 0 { a } else { gcd(b, a % b) } }
        let g = weights.iter().map(|w| u32::from(*w)).filter(|w| *w > 0).fold(0, gcd);
        let cycle: u32 = weights.iter().map(|w| u32::from(*w) / g).sum();
        let mut counts: BTreeMap<SocketAddr, u32> = BTreeMap::new();
        for i in 0..cycle as usize * cycles {
            let b = dp.route(&vip_flow(i as u16), Instant::ZERO).backend().unwrap();
            *counts.entry(b).or_default() += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            let addr: SocketAddr = format!("10.1.{}.{}:8080", i / 200, i % 200 + 1).parse().unwrap();
            let want = u32::from(*w) / g * cycles as u32;
            prop_assert_eq!(counts.get(&addr).copied().unwrap_or(0), want, "weights {:?}", weights);
        }
    }

    /// `sh`, `sh-port`, `mh` and `mh-port` give every source the same backend after any
    /// rebuild with the same endpoints: a resync, a new dataplane with
    /// another seed, unrelated churn, the endpoints split over other slices.
    #[test]
    fn source_hash_is_stable_across_rebuilds(
        hosts in proptest::collection::btree_set(1u8..250, 1..30),
        split in 1usize..5,
        seeds in (any::<u64>(), any::<u64>()),
        kind in proptest::sample::select(vec![
            SchedulerKind::SourceHash,
            SchedulerKind::SourceHashPort,
            SchedulerKind::Maglev,
            SchedulerKind::MaglevPort,
        ]),
    ) {
        let hosts: Vec<u8> = hosts.into_iter().collect();
        let slices = |parts: usize| -> Vec<Change> {
            hosts
                .chunks(hosts.len().div_ceil(parts))
                .enumerate()
                .map(|(i, chunk)| {
                    let s = EndpointSlice::builder("default", format!("s-{i}"), "svc-0", AddressType::IPv4)
                        .port(SlicePortSpec::tcp(8080).name("http"))
                        .endpoints(chunk.iter().map(|h| EndpointSpec::new(format!("10.1.0.{h}"))))
                        .build()
                        .unwrap();
                    Change::UpsertSlice(s)
                })
                .collect()
        };
        let svc = || Change::UpsertService(service_with_port("svc-0", "10.96.0.1"));

        let mut t1 = ServiceTable::new();
        let cs = t1.apply_batch(std::iter::once(svc()).chain(slices(1))).unwrap();
        let a = IpvsDataplane::new(DataplaneConfig::with_seed(seeds.0).conntrack(None).scheduler(kind));
        a.sync(&t1, &cs, Instant::ZERO);

        let mut t2 = ServiceTable::new();
        let cs = t2.apply_batch(std::iter::once(svc()).chain(slices(split))).unwrap();
        let b = IpvsDataplane::new(DataplaneConfig::with_seed(seeds.1).conntrack(None).scheduler(kind));
        b.sync(&t2, &cs, Instant::ZERO);
        // Unrelated churn, then a full resync.
        let cs = t2.apply(Change::UpsertService(service_with_port("svc-1", "10.96.0.2"))).unwrap();
        b.sync(&t2, &cs, Instant::ZERO);
        b.sync(&t2, &t2.full_change_set(), Instant::ZERO);

        for src in 0..512u16 {
            let f = Flow::tcp(
                SocketAddr::from(([10, 2, (src >> 4) as u8, src as u8], 30_000 + src)),
                "10.96.0.1:80".parse().unwrap(),
            );
            prop_assert_eq!(a.route(&f, Instant::ZERO), b.route(&f, Instant::from_secs(1)));
        }
    }

    /// `sh`'s 256 buckets against the kernel's fill written naively: every
    /// destination repeated `max(weight, 1)` times, the sequence cycled.
    #[test]
    fn source_hash_buckets_match_a_naive_fill(weights in proptest::collection::vec(0u32..5, 1..300)) {
        let dests: Vec<Destination> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Destination::new(SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 80)), *w))
            .collect();
        let sh = SourceHash::new(&dests, false);
        let expanded: Vec<u16> = weights
            .iter()
            .enumerate()
            .flat_map(|(i, w)| std::iter::repeat_n(i as u16, (*w).max(1) as usize))
            .collect();
        for (b, got) in sh.buckets().iter().enumerate() {
            prop_assert_eq!(*got, expanded[b % expanded.len()], "bucket {}", b);
        }
    }

    // (`random_cascade_is_uniform` is a plain test below: it runs the walk.)
}

/// The chi-square critical value for `df` degrees of freedom at p = 1e-6
/// (Wilson-Hilferty; within 1% of the exact value for df >= 1), so a
/// correct cascade fails about once in a million runs per n.
fn chi2_critical_p1e6(df: usize) -> f64 {
    let df = df as f64;
    let z = 4.753_424; // the standard normal's upper 1e-6 quantile
    let h = 2.0 / (9.0 * df);
    df * (1.0 - h + z * h.sqrt()).powi(3)
}

/// The iptables cascade, walked for real: for each n in 1..=20, a
/// `RandomCascade` over n equal destinations picks 20,000 * n times with
/// the dataplane's random source (`SeededRng`, one 31-bit draw per rule,
/// as the iptables dataplane draws), and the counts pass a chi-square test
/// against 1/n each. A seed per n from the OS-free `SeededRng` keeps it
/// reproducible; the test would catch an off-by-one rule, a missing last
/// rule or a threshold in the wrong unit.
#[test]
fn random_cascade_is_uniform() {
    use svclb::scheduler::{PickContext, RandomCascade, Scheduler};
    let flow = vip_flow(1);
    for n in 1..=20usize {
        let dests: Vec<Destination> = (0..n)
            .map(|i| Destination::new(weighted_addr(i), 1))
            .collect();
        let cascade = RandomCascade::new(&dests);
        let rng = SeededRng::new(0xCA5C_ADE0 + n as u64);
        let ctx = PickContext {
            flow: &flow,
            now: Instant::ZERO,
            rng: &rng,
            rotation: None,
        };
        let draws = 20_000 * n;
        let mut counts = vec![0u64; n];
        for _ in 0..draws {
            let i = cascade.pick(&dests, &ctx).expect("n > 0 destinations");
            counts[i] += 1;
        }
        if n == 1 {
            assert_eq!(counts, [draws as u64]);
            continue;
        }
        let expected = draws as f64 / n as f64;
        let x2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        let bound = chi2_critical_p1e6(n - 1);
        assert!(
            x2 < bound,
            "n = {n}: chi2 = {x2:.1} >= {bound:.1}, counts {counts:?}"
        );
    }
    // The test can fail: a cascade whose first rule matches twice as often
    // (threshold 2/n) is far outside the bound.
    let n = 5;
    let draws = 100_000;
    let rng = SeededRng::new(1);
    let first = (0..draws)
        .filter(|_| u64::from(rng.next_u64() as u32 & 0x7FFF_FFFF) < (2u64 << 31) / n as u64)
        .count();
    let expected = f64::from(draws) / n as f64;
    // The first cell alone contributes (first - expected)^2 / expected.
    assert!((first as f64 - expected).powi(2) / expected > chi2_critical_p1e6(n - 1));
}

// Regressions found by the properties above, kept as plain tests.

/// Found by `ops_match_the_reference_model`: iptables mode wrote a rule for
/// a weight-0 endpoint and forwarded new connections to it, while IPVS mode
/// (and `EndpointInfo::weight`'s contract) gives it none.
#[test]
fn regression_iptables_sends_no_new_connection_to_weight_zero() {
    let (t, cs) = weighted_table(&[0, 1]);
    let dp = IptablesDataplane::new(DataplaneConfig::with_seed(3).conntrack(None));
    dp.sync(&t, &cs, Instant::ZERO);
    let live: SocketAddr = "10.1.0.2:8080".parse().unwrap();
    assert_eq!(
        dp.candidates(Protocol::Tcp, "10.96.0.1:80".parse().unwrap()),
        Candidates::Endpoints(vec![live])
    );
    for src in 0..200 {
        assert_eq!(
            dp.route(&vip_flow(src), Instant::ZERO).backend(),
            Some(live)
        );
    }
}

/// Found by `round_robin_counts_differ_by_at_most_one_per_cycle`: when every
/// endpoint had weight 0, IPVS mode rejected each flow but `candidates`
/// reported an empty endpoint list instead of `Reject`, and iptables mode
/// forwarded anyway.
#[test]
fn regression_only_weight_zero_endpoints_reject_in_every_mode() {
    let (t, cs) = weighted_table(&[0, 0]);
    let vip: SocketAddr = "10.96.0.1:80".parse().unwrap();
    for dp in dataplanes(5, SchedulerKind::RoundRobin) {
        dp.sync(&t, &cs, Instant::ZERO);
        assert_eq!(
            dp.candidates(Protocol::Tcp, vip),
            Candidates::Reject,
            "{}",
            dp.mode()
        );
        assert_eq!(
            dp.route(&vip_flow(1), Instant::ZERO),
            Verdict::Reject,
            "{}",
            dp.mode()
        );
    }
}

/// Found by the `table_ops` fuzz target: when one batch moved a VIP:port
/// from one service to another whose key sorts first, IPVS mode's
/// incremental sync added the new owner's virtual service, then deleted it
/// again while taking down the old owner's: the VIP became not-a-service.
#[test]
fn regression_ipvs_vip_moving_between_services_in_one_batch() {
    let mut t = ServiceTable::new();
    let old_owner = service_with_port("svc-b", "10.96.0.1");
    let slice = |svc: &str, name: &str, ip: &str| {
        Change::UpsertSlice(
            EndpointSlice::builder("default", name, svc, AddressType::IPv4)
                .port(SlicePortSpec::tcp(8080).name("http"))
                .endpoint(EndpointSpec::new(ip))
                .build()
                .unwrap(),
        )
    };
    let cs = t
        .apply_batch([
            Change::UpsertService(old_owner),
            slice("svc-b", "b-1", "10.1.0.2"),
        ])
        .unwrap();
    let dps = dataplanes(9, SchedulerKind::RoundRobin);
    for dp in &dps {
        dp.sync(&t, &cs, Instant::ZERO);
    }
    // svc-b moves to another VIP; svc-a takes 10.96.0.1:80 over.
    let cs = t
        .apply_batch([
            Change::UpsertService(service_with_port("svc-b", "10.96.0.2")),
            Change::UpsertService(service_with_port("svc-a", "10.96.0.1")),
            slice("svc-a", "a-1", "10.1.0.1"),
        ])
        .unwrap();
    for dp in &dps {
        dp.sync(&t, &cs, Instant::ZERO);
        for (vip, backend) in [
            ("10.96.0.1:80", "10.1.0.1:8080"),
            ("10.96.0.2:80", "10.1.0.2:8080"),
        ] {
            assert_eq!(
                dp.candidates(Protocol::Tcp, vip.parse().unwrap()),
                Candidates::Endpoints(vec![backend.parse().unwrap()]),
                "{} {vip}",
                dp.mode()
            );
        }
    }
}
