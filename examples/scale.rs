//! The scale argument in numbers: synthetic clusters from 10 to 10,000
//! services (5 endpoints each; `--max-services` raises the top), the cost of
//! one lookup in iptables and IPVS mode, the cost of updates, and lookup
//! throughput from two threads while a writer applies slice updates (with,
//! for the tracked lookups, the same two threads probing a bare `AHashMap`
//! of the same flows under the same writer: `"mode": "ahash-probe"` lines,
//! the machine's own two-thread ratio to read svclb's against).
//!
//! ```sh
//! cargo run --release --example scale                       # markdown tables
//! cargo run --release --example scale -- --max-services 100000
//! cargo run --release --example scale -- --json out.jsonl --svg docs/scaling.svg
//! cargo run --release --example scale -- --only service-changes,render --json -
//! ```
//!
//! `--only` runs some of the sections: `lookups`, `updates`,
//! `service-changes` (adding and deleting one service at 10, 1,000, 10,000
//! and 100,000 services, in every mode, with the tracker off and on), `render` (`render::iptables`
//! against `render::nft` at 1,000 and 10,000 services), `conntrack` and
//! `threads`. `--json -` is `--json` to standard output.
//!
//! Every cost is the median of repeated runs in this process, in thread CPU
//! time (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`; the wall clock elsewhere),
//! so that other processes sharing the cores do not inflate it; the
//! throughput test is wall-clock time by nature. `--json`
//! without a file name writes the JSON lines to standard output (the tables
//! then go to standard error). Memory per service and per endpoint is
//! measured by `examples/memory.rs`, which needs a counting allocator that
//! would slow these timings down.

#[path = "../benches/common/mod.rs"]
mod common;

use common::cpu_time::thread_cpu_ns;
use std::fmt::Write as _;
use std::hint::black_box;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant as WallClock};

use svclb::conntrack::Conntrack;
use svclb::*;

const FLOWS: usize = 4096;

struct Args {
    max_services: usize,
    json: Option<Option<String>>,
    svg: Option<String>,
    seconds: f64,
    only: Option<Vec<String>>,
}

const SECTIONS: [&str; 6] = [
    "lookups",
    "updates",
    "service-changes",
    "render",
    "conntrack",
    "threads",
];

impl Args {
    /// Whether section `name` runs (every one without `--only`).
    fn runs(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|v| v.iter().any(|s| s == name))
    }
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        max_services: 10_000,
        json: None,
        svg: None,
        seconds: 1.0,
        only: None,
    };
    let mut it = std::env::args().skip(1).peekable();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--max-services" => {
                let v = it.next().ok_or("--max-services needs a number")?;
                args.max_services = v
                    .parse()
                    .ok()
                    .filter(|&n| n >= 10)
                    .ok_or_else(|| format!("--max-services: {v:?} is not a number >= 10"))?;
            }
            "--json" => {
                let file = it.next_if(|v| !v.starts_with("--")).filter(|f| f != "-");
                args.json = Some(file);
            }
            "--only" => {
                let v = it.next().ok_or("--only needs a list of sections")?;
                let list: Vec<String> = v.split(',').map(str::to_owned).collect();
                if let Some(bad) = list.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    return Err(format!(
                        "--only: {bad:?} is not a section (one of {})",
                        SECTIONS.join(", ")
                    ));
                }
                args.only = Some(list);
            }
            "--svg" => args.svg = Some(it.next().ok_or("--svg needs a file name")?),
            "--thread-seconds" => {
                let v = it.next().ok_or("--thread-seconds needs a number")?;
                args.seconds =
                    v.parse().ok().filter(|s: &f64| *s > 0.0).ok_or_else(|| {
                        format!("--thread-seconds: {v:?} is not a positive number")
                    })?;
            }
            "-h" | "--help" => {
                println!(
                    "usage: scale [--max-services N] [--json [FILE|-]] [--svg FILE] [--thread-seconds S] [--only SECTION,...]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Thread-CPU ns per call of `f` over `passes` passes of the flows, after
/// one untimed pass: the measurements take turns, and the one before may
/// have evicted this one's structures from the caches (criterion warms up
/// the same way).
#[inline(never)]
fn run_passes<F: FnMut(&Flow)>(flows: &[Flow], passes: usize, f: &mut F) -> f64 {
    for fl in flows {
        f(black_box(fl));
    }
    let t = thread_cpu_ns();
    for _ in 0..passes {
        for fl in flows {
            f(black_box(fl));
        }
    }
    thread_cpu_ns().saturating_sub(t).max(1) as f64 / (passes * flows.len()) as f64
}

/// How many passes make a run of at least ~5 ms, after one warm-up pass.
fn passes_for<F: FnMut(&Flow)>(flows: &[Flow], f: &mut F) -> usize {
    let first = run_passes(flows, 1, f) * flows.len() as f64;
    (5e6 / first).ceil().max(1.0) as usize
}

/// Median thread-CPU ns of `op`, over batches of `batch` ops (so that the
/// clock's own cost vanishes), repeated until `budget` is spent (at least 5
/// and at most `max_batches` batches). `prepare` makes each op's input
/// before its batch starts; what the ops return is dropped after the batch.
fn time_op<T, R>(
    budget: Duration,
    batch: usize,
    max_batches: usize,
    mut prepare: impl FnMut(usize) -> T,
    mut op: impl FnMut(T) -> R,
) -> f64 {
    let start = WallClock::now();
    let mut samples = Vec::new();
    for b in 0..max_batches {
        if samples.len() >= 5 && start.elapsed() > budget {
            break;
        }
        let inputs: Vec<T> = (0..batch).map(|k| prepare(b * batch + k)).collect();
        let mut outputs = Vec::with_capacity(batch);
        let t = thread_cpu_ns();
        for input in inputs {
            outputs.push(op(input));
        }
        samples.push((thread_cpu_ns() - t) as f64 / batch as f64);
        drop(outputs);
    }
    median(samples)
}

struct LookupRow {
    services: usize,
    iptables: f64,
    ipvs: f64,
    reader: f64,
    floor: f64,
}

struct UpdateRow {
    services: usize,
    ipvs_change: f64,
    iptables_change: f64,
    table_full: f64,
    ipvs_full: f64,
    iptables_full: f64,
}

#[derive(Clone)]
struct ThreadRow {
    single: f64,
    per_thread: [f64; 2],
    writer_rate: f64,
}

impl ThreadRow {
    /// The two threads' total lookups per second.
    fn total(&self) -> f64 {
        self.per_thread[0] + self.per_thread[1]
    }

    /// Two threads (with the writer) ÷ one thread (without).
    fn ratio(&self) -> f64 {
        self.total() / self.single
    }
}

fn sizes(max: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut n = 10;
    while n <= max {
        v.push(n);
        n *= 10;
    }
    if *v.last().expect("max >= 10") != max {
        v.push(max);
    }
    v
}

fn measure_lookups(table: &ServiceTable, n: usize) -> LookupRow {
    let (ipt, ipvs) = common::dataplanes(table);
    let flows = common::flow_mix(n, FLOWS, 0xC0FFEE);
    let floor_map = common::floor_map(n);
    let now = svclb::Instant::ZERO;
    let mut reader = ipvs.reader();
    let mut f_ipvs = |f: &Flow| {
        black_box(ipvs.route(f, now));
    };
    let mut f_reader = |f: &Flow| {
        black_box(reader.route(f, now));
    };
    let mut f_ipt = |f: &Flow| {
        black_box(ipt.route(f, now));
    };
    let mut f_floor = |f: &Flow| {
        black_box(floor_map.get(&(f.dst.ip(), f.dst.port(), f.protocol)));
    };
    let p = [
        passes_for(&flows, &mut f_ipvs),
        passes_for(&flows, &mut f_reader),
        passes_for(&flows, &mut f_ipt),
        passes_for(&flows, &mut f_floor),
    ];
    // The four take turns, run after run, so that a burst of other work on
    // the machine touches all of them alike; each keeps its median. The
    // order rotates, so that each follows the iptables walk (which flushes
    // the caches) equally often.
    let runs = if n >= 50_000 { 8 } else { 16 };
    let mut samples: [Vec<f64>; 4] = Default::default();
    for run in 0..runs {
        for k in 0..4 {
            let m = (run + k) % 4;
            let ns = match m {
                0 => run_passes(&flows, p[0], &mut f_ipvs),
                1 => run_passes(&flows, p[1], &mut f_reader),
                2 => run_passes(&flows, p[2], &mut f_ipt),
                _ => run_passes(&flows, p[3], &mut f_floor),
            };
            samples[m].push(ns);
        }
    }
    let [ipvs_ns, reader_ns, iptables_ns, floor_ns] = samples.map(median);
    LookupRow {
        services: n,
        iptables: iptables_ns,
        ipvs: ipvs_ns,
        reader: reader_ns,
        floor: floor_ns,
    }
}

/// One-endpoint changes to services spread over the cluster: the table's
/// apply plus the dataplane's sync, each op timed alone.
fn one_change(
    table: &mut ServiceTable,
    dp: &dyn Dataplane,
    n: usize,
    budget: Duration,
    batch: usize,
) -> f64 {
    let mut flipped = vec![false; n];
    time_op(
        budget,
        batch,
        41,
        |k| {
            let i = (k * 7919) % n;
            let versions = common::toggled_slice(i, i * 5, 5, 100);
            flipped[i] = !flipped[i];
            versions[usize::from(flipped[i])].clone()
        },
        |slice| {
            let cs = table.apply(Change::UpsertSlice(slice)).unwrap();
            dp.sync(table, &cs, Instant::ZERO);
            cs
        },
    )
}

fn measure_updates(n: usize) -> UpdateRow {
    let mut table = common::cluster(n, 5);
    let (ipt, ipvs) = common::dataplanes(&table);
    let ipvs_change = one_change(&mut table, &ipvs, n, Duration::from_millis(500), 50);
    let batch = if n >= 1000 { 1 } else { 20 };
    let iptables_change = one_change(&mut table, &ipt, n, Duration::from_secs(2), batch);
    let changes = common::cluster_changes(n, 5);
    let full_budget = Duration::from_secs(2);
    let table_full = time_op(
        full_budget,
        1,
        9,
        |_| changes.clone(),
        |c| {
            let mut t = ServiceTable::new();
            t.apply_batch(c).unwrap();
            t
        },
    );
    let all = table.full_change_set();
    let ipvs_full = time_op(
        full_budget,
        1,
        9,
        |_| IpvsDataplane::new(DataplaneConfig::with_seed(1)),
        |dp| {
            dp.sync(&table, &all, Instant::ZERO);
            dp
        },
    );
    let iptables_full = time_op(
        full_budget,
        1,
        9,
        |_| IptablesDataplane::new(DataplaneConfig::with_seed(1)),
        |dp| {
            dp.sync(&table, &all, Instant::ZERO);
            dp
        },
    );
    UpdateRow {
        services: n,
        ipvs_change,
        iptables_change,
        table_full,
        ipvs_full,
        iptables_full,
    }
}

/// The sizes of the service add/delete measurement (issue 11, part 4).
const CHURN_SIZES: [usize; 4] = [10, 1_000, 10_000, 100_000];

/// Thread-CPU ns of adding one service (with its slice of 5 endpoints) to a
/// cluster of `n`, and of deleting it again (service and slice), each the
/// table's apply plus the dataplane's sync, timed alone. Round `k` adds and
/// deletes service `n + 1 + k % 128`, so that the cluster stays at `n`.
fn churn_round(table: &mut ServiceTable, dp: &dyn Dataplane, n: usize, k: usize) -> (f64, f64) {
    let i = n + 1 + k % 128;
    let add = common::service_changes(i, 5 * i, 5, 100);
    let key = ServiceKey::new("default", format!("svc-{i}"));
    let delete = vec![
        Change::DeleteService(key),
        Change::DeleteSlice(SliceKey::new("default", format!("svc-{i}-0"))),
    ];
    let t = thread_cpu_ns();
    let cs = table.apply_batch(add).unwrap();
    dp.sync(table, &cs, Instant::ZERO);
    let added = (thread_cpu_ns() - t) as f64;
    drop(cs);
    let t = thread_cpu_ns();
    let cs = table.apply_batch(delete).unwrap();
    dp.sync(table, &cs, Instant::ZERO);
    let deleted = (thread_cpu_ns() - t) as f64;
    drop(cs);
    (added, deleted)
}

/// Service add and delete costs in every mode at every size of `sizes`,
/// with the connection tracker on (the dataplanes' default, which also
/// keeps the reply index) or off: (mode, tracked, services, add, delete).
/// Per mode, the clusters of all sizes are
/// built first, and the rounds then take turns over the sizes, so that a
/// burst of other work on the machine touches every size alike (the
/// ratios between sizes are what the issue asks for). Medians of at least
/// 5 rounds, more until the mode's budget is spent (at most 2,001).
fn measure_service_churn(
    sizes: &[usize],
    tracked: bool,
) -> Vec<(&'static str, bool, usize, f64, f64)> {
    let config = || {
        let c = DataplaneConfig::with_seed(1);
        if tracked { c } else { c.conntrack(None) }
    };
    let mut rows = Vec::new();
    for mode in ["iptables", "ipvs", "nftables"] {
        let mut setups: Vec<(usize, ServiceTable, Box<dyn Dataplane>)> = sizes
            .iter()
            .map(|&n| {
                let table = common::cluster(n, 5);
                let dp: Box<dyn Dataplane> = match mode {
                    "iptables" => Box::new(IptablesDataplane::new(config())),
                    "ipvs" => Box::new(IpvsDataplane::new(config())),
                    _ => Box::new(NftablesDataplane::new(config())),
                };
                dp.sync(&table, &table.full_change_set(), Instant::ZERO);
                (n, table, dp)
            })
            .collect();
        let budget = Duration::from_millis(if mode == "iptables" { 6000 } else { 2000 });
        let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); sizes.len()];
        let start = WallClock::now();
        for k in 0..2001usize {
            if k >= 5 && start.elapsed() > budget {
                break;
            }
            for (s, (n, table, dp)) in setups.iter_mut().enumerate() {
                // One untimed round first (another service): it absorbs what
                // the previous size left to the allocator (the frees of a
                // 100,000-rule list are consolidated at the next mallocs).
                churn_round(table, dp.as_ref(), *n, k + 64);
                let (a, d) = churn_round(table, dp.as_ref(), *n, k);
                samples[s].0.push(a);
                samples[s].1.push(d);
            }
        }
        for (s, (adds, deletes)) in samples.into_iter().enumerate() {
            rows.push((mode, tracked, sizes[s], median(adds), median(deletes)));
        }
        let ct = if tracked { "on" } else { "off" };
        eprintln!("service changes in {mode} mode, conntrack {ct}, done");
    }
    rows
}

/// Thread-CPU ns of `render::iptables` and `render::nft` of a cluster of
/// `n` services, measured turn about.
fn measure_render(n: usize) -> (f64, f64) {
    use svclb::render::{self, RenderOptions};
    let table = common::cluster(n, 5);
    let opts = RenderOptions::default();
    let (mut ipt, mut nft) = (Vec::new(), Vec::new());
    let start = WallClock::now();
    for _ in 0..15 {
        if ipt.len() >= 5 && start.elapsed() > Duration::from_secs(4) {
            break;
        }
        let t = thread_cpu_ns();
        let out = black_box(render::iptables::render(&table, &opts));
        ipt.push((thread_cpu_ns() - t) as f64);
        drop(out);
        let t = thread_cpu_ns();
        let out = black_box(render::nft::render(&table, &opts));
        nft.push((thread_cpu_ns() - t) as f64);
        drop(out);
    }
    (median(ipt), median(nft))
}

/// What the reader threads of [`throughput`] do.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// `IpvsReader::route` of flows (tracking off).
    Route,
    /// `IpvsReader::packet` of established flows (tracking on).
    Tracked,
    /// A bare `AHashMap::get` of the same flows as [`Load::Tracked`], in a
    /// map shared by the threads: what this machine gives two threads of
    /// this access pattern with nothing of svclb's on the path.
    Probe,
}

/// The flows reader `r` of [`throughput`] looks up: the tracked (and
/// probed) ones have their own source ports per reader, so that each
/// thread has its own connections.
fn reader_flows(n: usize, r: usize, load: Load) -> Vec<Flow> {
    let flows = common::flow_mix(n, FLOWS, 0xBEEF + r as u64);
    if load == Load::Route {
        return flows;
    }
    flows
        .iter()
        .map(|f| {
            Flow::tcp(
                SocketAddr::new(f.src.ip(), f.src.port() ^ (r as u16 + 1) << 12),
                f.dst,
            )
        })
        .collect()
}

/// Lookups per second of `op` over `flows`, in whole passes, until
/// `duration` has passed or `stop` is set.
fn passes_per_sec(
    flows: &[Flow],
    duration: Duration,
    stop: &AtomicBool,
    mut op: impl FnMut(&Flow),
) -> f64 {
    let start = WallClock::now();
    let mut count = 0u64;
    loop {
        for f in flows {
            op(black_box(f));
        }
        count += flows.len() as u64;
        if start.elapsed() >= duration || stop.load(Ordering::Relaxed) {
            break;
        }
    }
    count as f64 / start.elapsed().as_secs_f64()
}

/// Lookups per second from `readers` threads for `secs`, while (if
/// `writer`) another thread applies 1,000 slice updates per second.
fn throughput(n: usize, readers: usize, writer: bool, secs: f64, load: Load) -> (Vec<f64>, f64) {
    let tracked = load != Load::Route;
    let mut table = common::cluster(n, 5);
    let (_, untracked) = common::dataplanes(&table);
    let probe_map: ahash::AHashMap<Flow, u32> = if load == Load::Probe {
        (0..readers)
            .flat_map(|r| reader_flows(n, r, load))
            .enumerate()
            .map(|(i, f)| (f, i as u32))
            .collect()
    } else {
        ahash::AHashMap::default()
    };
    let ipvs = if tracked {
        let dp = IpvsDataplane::new(
            DataplaneConfig::with_seed(1)
                .conntrack(Some(ConntrackConfig::new(1 << 16).expect("capacity"))),
        );
        dp.sync(&table, &table.full_change_set(), Instant::ZERO);
        dp
    } else {
        untracked
    };
    let stop = AtomicBool::new(false);
    let updates = AtomicU64::new(0);
    let duration = Duration::from_secs_f64(secs);
    let mut rates = Vec::new();
    let mut writer_rate = 0.0;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..readers)
            .map(|r| {
                let (ipvs, stop, probe_map) = (&ipvs, &stop, &probe_map);
                let flows = reader_flows(n, r, load);
                s.spawn(move || {
                    let now = svclb::Instant::ZERO;
                    let mut reader = ipvs.reader();
                    match load {
                        Load::Probe => passes_per_sec(&flows, duration, stop, |f| {
                            black_box(probe_map.get(f));
                        }),
                        Load::Tracked => {
                            // Open every flow: the passes are then
                            // established-flow lookups.
                            for f in &flows {
                                reader.route(f, now);
                            }
                            passes_per_sec(&flows, duration, stop, |f| {
                                black_box(reader.packet(f, TcpFlags::ACK, now));
                            })
                        }
                        Load::Route => passes_per_sec(&flows, duration, stop, |f| {
                            black_box(reader.route(f, now));
                        }),
                    }
                })
            })
            .collect();
        let w = writer.then(|| {
            let (ipvs, stop, updates, table) = (&ipvs, &stop, &updates, &mut table);
            s.spawn(move || {
                let start = WallClock::now();
                let mut flipped = vec![false; n];
                let mut k = 0usize;
                while start.elapsed() < duration && !stop.load(Ordering::Relaxed) {
                    let i = (k * 7919) % n;
                    let versions = common::toggled_slice(i, i * 5, 5, 100);
                    flipped[i] = !flipped[i];
                    let slice = versions[usize::from(flipped[i])].clone();
                    let cs = table.apply(Change::UpsertSlice(slice)).unwrap();
                    ipvs.sync(table, &cs, Instant::ZERO);
                    k += 1;
                    updates.fetch_add(1, Ordering::Relaxed);
                    // 1,000 per second: the k-th update is due at k ms.
                    let due = Duration::from_millis(k as u64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                updates.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
            })
        });
        for h in handles {
            rates.push(h.join().expect("reader thread"));
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(w) = w {
            writer_rate = w.join().expect("writer thread");
        }
    });
    (rates, writer_rate)
}

fn measure_threads(n: usize, secs: f64, load: Load) -> ThreadRow {
    // Alternate the two set-ups three times; keep the medians.
    let mut single = Vec::new();
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut w = Vec::new();
    for _ in 0..3 {
        single.push(throughput(n, 1, false, secs, load).0[0]);
        let (rates, wr) = throughput(n, 2, true, secs, load);
        a.push(rates[0]);
        b.push(rates[1]);
        w.push(wr);
    }
    ThreadRow {
        single: median(single),
        per_thread: [median(a), median(b)],
        writer_rate: median(w),
    }
}

struct ConntrackRow {
    mode: &'static str,
    flows: usize,
    hit: f64,
    miss: f64,
    probe: f64,
    bytes_per_flow: f64,
    /// Of the `flows` inserted, those the tracker held (the hits go to
    /// these).
    tracked: usize,
}

/// `n` distinct client flows to 100 services (5 endpoints each).
fn tracked_flows(n: usize, salt: u32) -> Vec<Flow> {
    (0..n as u32)
        .map(|k| {
            let src = SocketAddr::from((
                (0x0B00_0000u32 ^ salt).wrapping_add(k >> 4).to_be_bytes(),
                1024 + (k & 0xF) as u16,
            ));
            Flow::tcp(src, common::vip((k as usize * 7919) % 100))
        })
        .collect()
}

/// Established-flow lookups (`packet`, tracked) and new connections (miss,
/// schedule, insert into a table at its bound) at `n` tracked flows, in
/// one mode, and a bare ahash probe over the same keys.
fn measure_conntrack(mode: &'static str, n: usize) -> ConntrackRow {
    let config =
        DataplaneConfig::with_seed(1).conntrack(Some(ConntrackConfig::new(n).expect("capacity")));
    match mode {
        "iptables" => conntrack_row(mode, n, IptablesDataplane::new(config), |d| d.conntrack()),
        "nftables" => conntrack_row(mode, n, NftablesDataplane::new(config), |d| d.conntrack()),
        _ => conntrack_row(mode, n, IpvsDataplane::new(config), |d| d.conntrack()),
    }
}

fn conntrack_row<D: Dataplane>(
    mode: &'static str,
    n: usize,
    dp: D,
    tracker: impl Fn(&D) -> Option<&Conntrack>,
) -> ConntrackRow {
    let table = common::cluster(100, 5);
    dp.sync(&table, &table.full_change_set(), Instant::ZERO);
    let now = Instant::ZERO;
    let mut flows = tracked_flows(n, 0);
    for f in &flows {
        dp.route(f, now);
    }
    // Look up in an order unrelated to insertion.
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..flows.len()).rev() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        flows.swap(i, (rng % (i as u64 + 1)) as usize);
    }
    // Only the flows the tracker holds: a shard at its share of the bound
    // evicts before the whole table is full (the hash spreads flows over
    // the shards unevenly), and a packet of an evicted flow would be a
    // new connection (and evict another), not an established hit.
    let ct = tracker(&dp).expect("tracking on");
    flows.retain(|f| ct.get(f, now).is_some());
    let sample: Vec<Flow> = flows.iter().copied().take(65_536.min(n)).collect();
    let mut hit = |f: &Flow| {
        black_box(dp.packet(f, TcpFlags::ACK, now));
    };
    let passes = passes_for(&sample, &mut hit);
    let hit_ns = median(
        (0..5)
            .map(|_| run_passes(&sample, passes, &mut hit))
            .collect(),
    );
    let map: ahash::AHashMap<Flow, u32> = flows
        .iter()
        .enumerate()
        .map(|(i, f)| (*f, i as u32))
        .collect();
    let mut probe = |f: &Flow| {
        black_box(map.get(f));
    };
    let passes = passes_for(&sample, &mut probe);
    let probe_ns = median(
        (0..5)
            .map(|_| run_passes(&sample, passes, &mut probe))
            .collect(),
    );
    drop(map);
    let bytes = tracker(&dp).map_or(0, Conntrack::memory_total_bytes);
    let len = tracker(&dp).map_or(1, |c| c.len().max(1));
    // New connections into the full table: each evicts one.
    let fresh = tracked_flows(65_536, 0x00F0_0000);
    let mut k = 0usize;
    let miss_ns = time_op(
        Duration::from_millis(300),
        4096,
        16,
        |_| {
            k += 1;
            fresh[k % fresh.len()]
        },
        |f| dp.route(&f, now),
    );
    ConntrackRow {
        mode,
        flows: n,
        hit: hit_ns,
        miss: miss_ns,
        probe: probe_ns,
        bytes_per_flow: bytes as f64 / len as f64,
        tracked: flows.len(),
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// A plotted line: its label, its colour, and how to read it from a row.
type Series = (&'static str, &'static str, fn(&LookupRow) -> f64);

fn svg_plot(rows: &[LookupRow]) -> String {
    let (w, h) = (640.0, 420.0);
    let (left, right, top, bottom) = (70.0, 170.0, 30.0, 50.0);
    let xs: Vec<f64> = rows.iter().map(|r| (r.services as f64).log10()).collect();
    let all_y = rows
        .iter()
        .flat_map(|r| [r.iptables, r.ipvs, r.reader, r.floor]);
    let ymin = all_y.clone().fold(f64::MAX, f64::min).log10().floor();
    let ymax = all_y.fold(0.0, f64::max).log10().ceil();
    let (xmin, xmax) = (xs[0].floor(), xs[xs.len() - 1].ceil());
    let px = |x: f64| left + (x - xmin) / (xmax - xmin).max(1e-9) * (w - left - right);
    let py = |y: f64| top + (ymax - y) / (ymax - ymin).max(1e-9) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="14">svclb: cost of one lookup vs number of services (log-log)</text>"#,
        (left + w - right) / 2.0
    );
    // Grid and decade labels.
    let mut d = xmin;
    while d <= xmax + 1e-9 {
        let x = px(d);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            h - bottom,
            h - bottom + 16.0,
            fmt_count(10f64.powf(d))
        );
        d += 1.0;
    }
    let mut d = ymin;
    while d <= ymax + 1e-9 {
        let y = py(d);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            y + 4.0,
            fmt_decade(10f64.powf(d))
        );
        d += 1.0;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        w - left - right,
        h - top - bottom
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">services (5 endpoints each)</text>"#,
        (left + w - right) / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">time per lookup</text>"#,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    );
    let series: [Series; 4] = [
        ("iptables mode", "#d62728", |r| r.iptables),
        ("IPVS mode (rr)", "#1f77b4", |r| r.ipvs),
        ("IPVS, thread reader", "#2ca02c", |r| r.reader),
        ("bare ahash probe", "#7f7f7f", |r| r.floor),
    ];
    for (k, (name, color, get)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .zip(&xs)
            .map(|(r, &x)| (px(x), py(get(r).log10())))
            .collect();
        let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let dash = if k == 3 {
            r#" stroke-dasharray="5,4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            path.join(" ")
        );
        for (x, y) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/>"#
            );
        }
        let ly = top + 20.0 + 22.0 * k as f64;
        let lx = w - right + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{name}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// An axis label for a power of ten nanoseconds: `10 ns`, `1 µs`, ...
fn fmt_decade(ns: f64) -> String {
    let (v, unit) = if ns >= 1e6 {
        (ns / 1e6, "ms")
    } else if ns >= 1e3 {
        (ns / 1e3, "µs")
    } else {
        (ns, "ns")
    };
    format!("{v:.0} {unit}")
}

fn fmt_count(v: f64) -> String {
    let n = v.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "missed" }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("scale: {e}");
            std::process::exit(2);
        }
    };
    let sizes = sizes(args.max_services);
    let mut json = Vec::new();
    let mut md = String::new();

    let _ = writeln!(
        md,
        "_Costs are medians of repeated runs, in {}; 5 endpoints per service._\n",
        if common::cpu_time::is_cpu_time() {
            "thread CPU time"
        } else {
            "wall-clock time"
        }
    );
    let mut lookups = Vec::new();
    for &n in sizes.iter().filter(|_| args.runs("lookups")) {
        let table = common::cluster(n, 5);
        let row = measure_lookups(&table, n);
        for (mode, ns) in [
            ("iptables", row.iptables),
            ("ipvs", row.ipvs),
            ("ipvs-reader", row.reader),
            ("ahash-probe", row.floor),
        ] {
            json.push(format!(
                r#"{{"mode":"{mode}","services":{n},"endpoints":{},"ns_per_lookup":{ns:.2}}}"#,
                n * 5
            ));
        }
        eprintln!("lookups at {n} services done");
        lookups.push(row);
    }
    if !lookups.is_empty() {
        let _ = writeln!(
            md,
            "### Lookup: one `route()` over a random mix of services\n\n| services | endpoints | iptables mode | IPVS mode (rr) | IPVS, per-thread reader | bare ahash probe | iptables ÷ IPVS | IPVS ÷ probe | reader ÷ probe |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for r in &lookups {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} |",
                fmt_count(r.services as f64),
                fmt_count((r.services * 5) as f64),
                fmt_ns(r.iptables),
                fmt_ns(r.ipvs),
                fmt_ns(r.reader),
                fmt_ns(r.floor),
                r.iptables / r.ipvs,
                r.ipvs / r.floor,
                r.reader / r.floor
            );
        }
    }

    let mut updates = Vec::new();
    for &n in sizes.iter().filter(|_| args.runs("updates")) {
        let row = measure_updates(n);
        for (mode, op, ns) in [
            ("ipvs", "one_endpoint_change", row.ipvs_change),
            ("iptables", "one_endpoint_change", row.iptables_change),
            ("table", "full_sync", row.table_full),
            ("ipvs", "full_sync", row.ipvs_full),
            ("iptables", "full_sync", row.iptables_full),
        ] {
            json.push(format!(
                r#"{{"mode":"{mode}","services":{n},"endpoints":{},"op":"{op}","ns_per_op":{ns:.0}}}"#,
                n * 5
            ));
        }
        eprintln!("updates at {n} services done");
        updates.push(row);
    }
    if !updates.is_empty() {
        let _ = writeln!(
            md,
            "\n### Updates: table apply + dataplane sync\n\n| services | one endpoint change, IPVS (incremental) | one endpoint change, iptables (recompile) | full sync: table | full sync: IPVS | full sync: iptables |\n| ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for r in &updates {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                fmt_count(r.services as f64),
                fmt_ns(r.ipvs_change),
                fmt_ns(r.iptables_change),
                fmt_ns(r.table_full),
                fmt_ns(r.ipvs_full),
                fmt_ns(r.iptables_full)
            );
        }
    }

    let mut churn = Vec::new();
    if args.runs("service-changes") {
        for tracked in [false, true] {
            for (mode, ct, n, add, delete) in measure_service_churn(&CHURN_SIZES, tracked) {
                for (op, ns) in [("add_service", add), ("delete_service", delete)] {
                    json.push(format!(
                        r#"{{"mode":"{mode}","services":{n},"op":"{op}","ns_per_op":{ns:.0},"conntrack":{ct}}}"#
                    ));
                }
                churn.push((mode, ct, n, add, delete));
            }
        }
    }
    if !churn.is_empty() {
        let _ = writeln!(
            md,
            "\n### Adding and deleting one service: table apply + dataplane sync\n\n| mode | conntrack | services | add | delete |\n| --- | --- | ---: | ---: | ---: |"
        );
        for (mode, ct, n, add, delete) in &churn {
            let _ = writeln!(
                md,
                "| {mode} | {} | {} | {} | {} |",
                if *ct { "on" } else { "off" },
                fmt_count(*n as f64),
                fmt_ns(*add),
                fmt_ns(*delete)
            );
        }
    }

    let mut renders = Vec::new();
    for n in [1_000usize, 10_000]
        .into_iter()
        .filter(|_| args.runs("render"))
    {
        let (ipt, nft) = measure_render(n);
        for (mode, ns) in [("render-iptables", ipt), ("render-nft", nft)] {
            json.push(format!(
                r#"{{"mode":"{mode}","services":{n},"op":"render","ns_per_op":{ns:.0}}}"#
            ));
        }
        renders.push((n, ipt, nft));
        eprintln!("render at {n} services done");
    }
    if !renders.is_empty() {
        let _ = writeln!(
            md,
            "\n### Rendering the whole table\n\n| services | `render::iptables` | `render::nft` | iptables ÷ nft |\n| ---: | ---: | ---: | ---: |"
        );
        for (n, ipt, nft) in &renders {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} |",
                fmt_count(*n as f64),
                fmt_ns(*ipt),
                fmt_ns(*nft),
                ipt / nft
            );
        }
    }

    let mut ct_rows = Vec::new();
    for n in [10_000usize, 1_000_000]
        .into_iter()
        .filter(|_| args.runs("conntrack"))
    {
        for mode in ["iptables", "ipvs", "nftables"] {
            let r = measure_conntrack(mode, n);
            json.push(format!(
                r#"{{"mode":"{mode}","flows":{n},"op":"conntrack_hit","ns_per_op":{:.2}}}"#,
                r.hit
            ));
            json.push(format!(
                r#"{{"mode":"{mode}","flows":{n},"op":"conntrack_miss","ns_per_op":{:.2}}}"#,
                r.miss
            ));
            json.push(format!(
                r#"{{"mode":"{mode}","flows":{n},"bytes_per_flow":{:.1}}}"#,
                r.bytes_per_flow
            ));
            if mode == "ipvs" {
                json.push(format!(
                    r#"{{"mode":"ahash-probe","flows":{n},"op":"conntrack_hit","ns_per_op":{:.2}}}"#,
                    r.probe
                ));
            }
            ct_rows.push(r);
        }
        eprintln!("conntrack at {n} flows done");
    }
    if !ct_rows.is_empty() {
        let _ = writeln!(
            md,
            "\n### Connection tracking: per packet, at 10,000 and 1,000,000 tracked flows (100 services)\n\n| mode | flows (tracker capacity) | tracked (hits go to these) | established hit | new connection (miss, schedule, insert) | bare ahash probe, same keys | hit ÷ probe | miss ÷ probe | bytes per tracked flow |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for r in &ct_rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.1} |",
                r.mode,
                fmt_count(r.flows as f64),
                fmt_count(r.tracked as f64),
                fmt_ns(r.hit),
                fmt_ns(r.miss),
                fmt_ns(r.probe),
                r.hit / r.probe,
                r.miss / r.probe,
                r.bytes_per_flow
            );
        }
    }

    let mut thread_ratios = None;
    if args.runs("threads") {
        let tn = 10_000.min(args.max_services);
        let th = measure_threads(tn, args.seconds, Load::Route);
        let tt = measure_threads(tn, args.seconds, Load::Tracked);
        let tp = measure_threads(tn, args.seconds, Load::Probe);
        for (mode, row) in [("ipvs", &tt), ("ahash-probe", &tp)] {
            for (threads, writer, per) in [
                (1, 0.0, row.single),
                (2, row.writer_rate, row.per_thread[0]),
                (2, row.writer_rate, row.per_thread[1]),
            ] {
                json.push(format!(
                    r#"{{"mode":"{mode}","services":{tn},"threads":{threads},"writer_updates_per_sec":{writer:.0},"op":"conntrack_hit","lookups_per_sec_per_thread":{per:.0}}}"#
                ));
            }
        }
        thread_ratios = Some((th.ratio(), tt.clone(), tp.clone()));
        for (threads, writer, per) in [
            (1, 0.0, th.single),
            (2, th.writer_rate, th.per_thread[0]),
            (2, th.writer_rate, th.per_thread[1]),
        ] {
            json.push(format!(
            r#"{{"mode":"ipvs","services":{tn},"threads":{threads},"writer_updates_per_sec":{writer:.0},"lookups_per_sec_per_thread":{per:.0}}}"#
        ));
        }
        let _ = writeln!(
            md,
            "\n### Throughput: IPVS-mode lookups (`IpvsReader::route`) at {} services\n\n| set-up | lookups/s per thread | total |\n| --- | ---: | ---: |\n| 1 thread, no writer | {:.2} M | {:.2} M |\n| 2 threads, writer at {:.0} slice updates/s | {:.2} M, {:.2} M | {:.2} M ({:.2}×) |",
            fmt_count(tn as f64),
            th.single / 1e6,
            th.single / 1e6,
            th.writer_rate,
            th.per_thread[0] / 1e6,
            th.per_thread[1] / 1e6,
            th.total() / 1e6,
            th.ratio()
        );
    }
    // Targets, as ratios within this run.
    let at = |n: usize| lookups.iter().find(|r| r.services == n);
    let up = |n: usize| updates.iter().find(|r| r.services == n);
    let _ = writeln!(md, "\n### Targets (issue 6), measured in this run\n");
    if let (Some(l10), Some(l1k), Some(l10k)) = (at(10), at(1_000), at(10_000)) {
        let r = l10k.ipvs / l10.ipvs;
        let _ = writeln!(
            md,
            "- IPVS route at 10,000 services ÷ at 10: {r:.2} (target ≤ 1.5: {})",
            verdict(r <= 1.5)
        );
        let r = l10k.iptables / l1k.iptables;
        let _ = writeln!(
            md,
            "- iptables route at 10,000 ÷ at 1,000 services: {r:.1} (target ≥ 5: {})",
            verdict(r >= 5.0)
        );
        let r = l10k.iptables / l10k.ipvs;
        let _ = writeln!(
            md,
            "- iptables ÷ IPVS at 10,000 services: {r:.0} (target ≥ 50: {})",
            verdict(r >= 50.0)
        );
        let r = l10k.ipvs / l10k.floor;
        let _ = writeln!(
            md,
            "- IPVS route ÷ bare ahash probe at 10,000 services: {r:.2} (target ≤ 3: {})",
            verdict(r <= 3.0)
        );
        let r = l10.ipvs / l10.floor;
        let _ = writeln!(
            md,
            "- IPVS route ÷ bare ahash probe at 10 services: {r:.2} (target ≤ 3: {})",
            verdict(r <= 3.0)
        );
        let (a, b) = (l10k.reader / l10k.floor, l10.reader / l10.floor);
        let _ = writeln!(
            md,
            "- the same through a per-thread `IpvsReader`: {a:.2} at 10,000 services, {b:.2} at 10 (target ≤ 3: {}, {})",
            verdict(a <= 3.0),
            verdict(b <= 3.0)
        );
        let r = l10k.reader / l10.reader;
        let _ = writeln!(
            md,
            "- `IpvsReader` route at 10,000 services ÷ at 10: {r:.2} (target ≤ 1.5: {})",
            verdict(r <= 1.5)
        );
    } else {
        let _ = writeln!(md, "- (needs --max-services >= 10000)");
    }
    if let (Some(u10), Some(u10k)) = (up(10), up(10_000)) {
        let r = u10k.ipvs_change / u10.ipvs_change;
        let _ = writeln!(
            md,
            "- incremental one-endpoint change at 10,000 services ÷ at 10: {r:.2} (target ≤ 1.5: {})",
            verdict(r <= 1.5)
        );
    }
    if let Some((r, _, _)) = &thread_ratios {
        let r = *r;
        let _ = writeln!(
            md,
            "- 2 reader threads with a writer ÷ 1 thread without: {r:.2} (target ≥ 1.6: {})",
            verdict(r >= 1.6)
        );
    }
    let _ = writeln!(
        md,
        "\n### Targets (issue 10, the connection layer), measured in this run\n"
    );
    let ct = |mode: &str, n: usize| ct_rows.iter().find(|r| r.mode == mode && r.flows == n);
    for mode in ["iptables", "ipvs", "nftables"] {
        if let (Some(a), Some(b)) = (ct(mode, 1_000_000), ct(mode, 10_000)) {
            let (h1m, h10k) = (a.hit / a.probe, b.hit / b.probe);
            let m = b.miss / b.probe;
            let _ = writeln!(
                md,
                "- {mode}: established hit ÷ probe {h1m:.2} at 1,000,000 flows (target ≤ 1.5: {}), {h10k:.2} at 10,000 (target ≤ 2: {}); new connection ÷ probe {m:.2} (target ≤ 4: {}); {:.1} bytes per flow (target ≤ 64: {})",
                verdict(h1m <= 1.5),
                verdict(h10k <= 2.0),
                verdict(m <= 4.0),
                a.bytes_per_flow,
                verdict(a.bytes_per_flow <= 64.0)
            );
        }
    }
    if let Some((_, tt, tp)) = &thread_ratios {
        let r = tt.ratio();
        let _ = writeln!(
            md,
            "- 2 threads of established-flow lookups with a writer ÷ 1 thread: {r:.2} ({:.2} M + {:.2} M vs {:.2} M; writer {:.0} updates/s; target ≥ 1.8: {})",
            tt.per_thread[0] / 1e6,
            tt.per_thread[1] / 1e6,
            tt.single / 1e6,
            tt.writer_rate,
            verdict(r >= 1.8)
        );
        let p = tp.ratio();
        let _ = writeln!(
            md,
            "  - the same threads, flows and writer over a bare ahash map of those flows (the machine's own two-thread ratio for this access pattern): {p:.2} ({:.2} M + {:.2} M vs {:.2} M); svclb's ratio ÷ the map's: {:.2}",
            tp.per_thread[0] / 1e6,
            tp.per_thread[1] / 1e6,
            tp.single / 1e6,
            r / p
        );
    }
    let churn_at = |mode: &str, ct: bool, n: usize| {
        churn.iter().find(|c| c.0 == mode && c.1 == ct && c.2 == n)
    };
    if !churn.is_empty() || !renders.is_empty() {
        let _ = writeln!(md, "\n### Targets (issue 11), measured in this run\n");
    }
    for (mode, ct) in ["iptables", "ipvs", "nftables"]
        .into_iter()
        .flat_map(|m| [(m, false), (m, true)])
    {
        if let (Some(lo), Some(hi)) = (churn_at(mode, ct, 10), churn_at(mode, ct, 100_000)) {
            let (a, d) = (hi.3 / lo.3, hi.4 / lo.4);
            let ct = if ct { "on" } else { "off" };
            let _ = writeln!(
                md,
                "- {mode}, conntrack {ct}: add a service at 100,000 services ÷ at 10: {a:.2}, delete: {d:.2} (target ≤ 2: {}, {})",
                verdict(a <= 2.0),
                verdict(d <= 2.0)
            );
        }
    }
    if let Some((_, ipt, nft)) = renders.iter().find(|r| r.0 == 10_000) {
        let r = ipt / nft;
        let _ = writeln!(
            md,
            "- render iptables ÷ nft at 10,000 services: {r:.2} (target ≤ 2: {})",
            verdict(r <= 2.0)
        );
    }

    let json_to_stdout = matches!(args.json, Some(None));
    if json_to_stdout {
        eprint!("{md}");
    } else {
        print!("{md}");
    }
    match &args.json {
        Some(Some(file)) => {
            let mut f = std::fs::File::create(file).unwrap_or_else(|e| {
                eprintln!("scale: cannot write {file}: {e}");
                std::process::exit(1)
            });
            for line in &json {
                writeln!(f, "{line}").expect("write json");
            }
        }
        Some(None) => {
            for line in &json {
                println!("{line}");
            }
        }
        None => {}
    }
    if let Some(file) = &args.svg {
        std::fs::write(file, svg_plot(&lookups)).unwrap_or_else(|e| {
            eprintln!("scale: cannot write {file}: {e}");
            std::process::exit(1)
        });
    }
}
