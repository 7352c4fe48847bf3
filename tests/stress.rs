//! Concurrency stress: readers route flows on every core while one writer
//! churns EndpointSlices, for a bounded time per dataplane.
//!
//! What it checks:
//! - **no stale backend**: every endpoint address is used once and never
//!   again. After each sync the writer records, for every address it just
//!   removed, the epoch of that sync, then publishes the epoch. A reader
//!   reads the published epoch *before* it routes; if the backend it gets
//!   had been removed at or before that epoch, the dataplane served a
//!   backend whose removal was already published when the read began;
//! - every read of the service forwards (the service always has endpoints)
//!   to an address the writer created;
//! - nothing panics and nothing deadlocks: every thread reports back through
//!   a channel and the test fails if one has not finished 60 s after the
//!   stop signal (a liveness bound, not a performance assertion).
//!
//! Dataplanes: iptables mode, nftables mode, IPVS mode (`rr`, `wlc`), and IPVS mode read
//! through per-thread [`IpvsReader`]s (which cache the table pointer).
//!
//! It prints reads/s and writes/s per dataplane; run it with
//! `cargo test --release --test stress -- --nocapture` to see them.
//!
//! Why not loom: the publication primitive is `arc_swap::ArcSwap`, which is
//! not built on loom's instrumented atomics, so loom cannot explore its
//! interleavings; a loom model would test a re-implementation, not the code
//! that runs. This test exercises the real primitive instead, with the
//! epoch check making any stale read observable.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant as WallClock};

use svclb::*;

/// How long each dataplane is stressed.
const RUN_FOR: Duration = Duration::from_millis(1500);
/// Slices of the churned service, and endpoints per slice.
const SLICES: usize = 4;
const PER_SLICE: usize = 16;
/// Addresses the writer may create (each used once).
const ADDRESSES: usize = 1 << 20;
const NEVER: u64 = u64::MAX;

fn addr_of(id: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0A80_0000u32 + id as u32))
}

fn id_of(addr: SocketAddr) -> Option<usize> {
    match addr.ip() {
        IpAddr::V4(v4) => (u32::from(v4) as usize).checked_sub(0x0A80_0000),
        IpAddr::V6(_) => None,
    }
}

fn slice(i: usize, ids: &[usize]) -> EndpointSlice {
    EndpointSlice::builder("default", format!("web-{i}"), "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080).name("http"))
        .endpoints(
            ids.iter()
                .map(|id| EndpointSpec::new(addr_of(*id).to_string())),
        )
        .build()
        .unwrap()
}

fn service(name: &str, vip: [u8; 4]) -> Service {
    Service::builder("default", name)
        .cluster_ip(IpAddr::from(vip))
        .port(ServicePortSpec::tcp(80).name("http"))
        .build()
        .unwrap()
}

struct Shared {
    /// The last epoch whose sync has completed.
    published: AtomicU64,
    /// Per address id: the epoch that removed it, or [`NEVER`].
    removed_at: Vec<AtomicU64>,
    /// Addresses created so far.
    created: AtomicU64,
    stop: AtomicBool,
}

#[derive(Debug, Default)]
struct ReaderReport {
    reads: u64,
    stale: Vec<String>,
}

/// Stresses `dp`; with `reader`, the readers route through per-thread
/// [`IpvsReader`]s of that IPVS dataplane (the same object as `dp`).
fn stress(name: &str, dp: Arc<dyn Dataplane>, reader: Option<Arc<IpvsDataplane>>) {
    let shared = Arc::new(Shared {
        published: AtomicU64::new(0),
        removed_at: (0..ADDRESSES).map(|_| AtomicU64::new(NEVER)).collect(),
        created: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

    // Initial state: the service with SLICES x PER_SLICE endpoints.
    let mut table = ServiceTable::new();
    let mut slices: Vec<Vec<usize>> = Vec::new();
    let mut next_id = 0usize;
    let mut batch = vec![Change::UpsertService(service("web", [10, 96, 0, 1]))];
    for i in 0..SLICES {
        let ids: Vec<usize> = (next_id..next_id + PER_SLICE).collect();
        next_id += PER_SLICE;
        batch.push(Change::UpsertSlice(slice(i, &ids)));
        slices.push(ids);
    }
    shared.created.store(next_id as u64, Ordering::Release);
    let cs = table.apply_batch(batch).unwrap();
    dp.sync(&table, &cs, Instant::ZERO);
    shared.published.store(cs.generation, Ordering::Release);

    let readers = thread::available_parallelism().map_or(2, |n| n.get());
    let (tx, rx) = mpsc::channel::<Result<ReaderReport, String>>();
    let started = WallClock::now();
    for r in 0..readers {
        let dp = dp.clone();
        let shared = shared.clone();
        let tx = tx.clone();
        let ipvs = reader.clone();
        thread::spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut reader = ipvs.as_deref().map(IpvsDataplane::reader);
                let mut report = ReaderReport::default();
                let vip: SocketAddr = "10.96.0.1:80".parse().unwrap();
                let mut i = 0u32;
                while !shared.stop.load(Ordering::Relaxed) {
                    i = i.wrapping_add(1);
                    let src = SocketAddr::from((
                        [10, 2, r as u8, (i % 251) as u8],
                        (i % 60_000) as u16 + 1024,
                    ));
                    let flow = Flow::tcp(src, vip);
                    let began = shared.published.load(Ordering::Acquire);
                    let now = svclb::Instant::from_nanos(u64::from(i));
                    let v = match reader.as_mut() {
                        Some(r) => r.route(&flow, now),
                        None => dp.route(&flow, now),
                    };
                    report.reads += 1;
                    let Verdict::Forward(svclb::Forward { backend: b, .. }) = v else {
                        report.stale.push(format!(
                            "epoch {began}: {v} for a service that always has endpoints"
                        ));
                        continue;
                    };
                    let created = shared.created.load(Ordering::Acquire) as usize;
                    match id_of(b) {
                        Some(id) if id < created => {
                            let removed = shared.removed_at[id].load(Ordering::Acquire);
                            if removed <= began {
                                report.stale.push(format!(
                                    "read began at epoch {began} but got {b}, removed at epoch {removed}"
                                ));
                            }
                        }
                        _ => report.stale.push(format!("{b} was never created")),
                    }
                    dp.connection_closed(&flow, svclb::Instant::from_nanos(u64::from(i)));
                    if report.stale.len() > 10 {
                        break;
                    }
                }
                report
            }));
            let _ = tx.send(outcome.map_err(|_| format!("reader {r} panicked")));
        });
    }

    // The writer: replace two endpoints of one slice per write, with fresh
    // addresses; every 16th write adds or deletes an unrelated service (a
    // map-level swap in IPVS mode).
    let (wtx, wrx) = mpsc::channel::<Result<u64, String>>();
    {
        let dp = dp.clone();
        let shared = shared.clone();
        thread::spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let mut writes = 0u64;
                let mut other = false;
                while started.elapsed() < RUN_FOR && next_id + 2 < ADDRESSES {
                    writes += 1;
                    let change = if writes % 16 == 0 {
                        other = !other;
                        if other {
                            Change::UpsertService(service("other", [10, 96, 0, 2]))
                        } else {
                            Change::DeleteService(ServiceKey::new("default", "other"))
                        }
                    } else {
                        let s = (writes as usize) % SLICES;
                        let ids = &mut slices[s];
                        let gone = [ids.remove(writes as usize % ids.len()), ids.remove(0)];
                        ids.extend([next_id, next_id + 1]);
                        next_id += 2;
                        shared.created.store(next_id as u64, Ordering::Release);
                        let change = Change::UpsertSlice(slice(s, ids));
                        let cs = table.apply(change).expect("valid change");
                        dp.sync(&table, &cs, Instant::ZERO);
                        for id in gone {
                            shared.removed_at[id].store(cs.generation, Ordering::Release);
                        }
                        shared.published.store(cs.generation, Ordering::Release);
                        continue;
                    };
                    let cs = table.apply(change).expect("valid change");
                    dp.sync(&table, &cs, Instant::ZERO);
                    shared.published.store(cs.generation, Ordering::Release);
                }
                writes
            }));
            let _ = wtx.send(outcome.map_err(|_| "writer panicked".to_string()));
        });
    }

    let bound = RUN_FOR + Duration::from_secs(60);
    let writes = wrx
        .recv_timeout(bound)
        .expect("the writer finished (no deadlock)")
        .unwrap();
    shared.stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut reads = 0;
    for _ in 0..readers {
        let report = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("every reader finished (no deadlock)")
            .unwrap();
        assert!(report.stale.is_empty(), "{name}: {:#?}", report.stale);
        reads += report.reads;
    }
    assert!(reads > 0 && writes > 0);
    println!(
        "stress {name}: {readers} readers, 1 writer, {elapsed:.2} s: {reads} reads ({:.0} reads/s), {writes} writes ({:.0} writes/s), 0 stale reads",
        reads as f64 / elapsed,
        writes as f64 / elapsed,
    );
}

/// One test, so that the three runs do not compete for the cores.
#[test]
fn readers_never_see_a_removed_backend() {
    stress(
        "iptables",
        Arc::new(IptablesDataplane::new(DataplaneConfig::with_seed(1))),
        None,
    );
    stress(
        "nftables",
        Arc::new(NftablesDataplane::new(DataplaneConfig::with_seed(5))),
        None,
    );
    stress(
        "ipvs/rr",
        Arc::new(IpvsDataplane::new(
            DataplaneConfig::with_seed(2).scheduler(SchedulerKind::RoundRobin),
        )),
        None,
    );
    stress(
        "ipvs/wlc",
        Arc::new(IpvsDataplane::new(
            DataplaneConfig::with_seed(3).scheduler(SchedulerKind::WeightedLeastConnection),
        )),
        None,
    );
    // Per-thread readers cache the table pointer: they must still never
    // serve a backend whose removal was published.
    let ipvs = Arc::new(IpvsDataplane::new(
        DataplaneConfig::with_seed(4).scheduler(SchedulerKind::RoundRobin),
    ));
    stress("ipvs/rr via IpvsReader", ipvs.clone(), Some(ipvs));
}
