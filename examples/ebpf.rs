//! `ebpf`: the eBPF dataplane as a running load balancer. It loads the TC
//! program (`src/ebpf/svclb.bpf.c`), attaches it to TC ingress of the given
//! interfaces, writes its maps from Kubernetes Service and EndpointSlice
//! manifests, and keeps them in sync until SIGINT or SIGTERM.
//!
//! ```sh
//! cargo build --release --features ebpf --example ebpf
//! sudo target/release/examples/ebpf --manifests examples/manifests --iface eth0,eth1
//! kubectl get services,endpointslices -A --watch --output-watch-events -o json \
//!     | sudo target/release/examples/ebpf --manifests base/ --watch - --iface eth0
//! ```
//!
//! - It prints `ready` (on standard output) once the program is attached
//!   and the maps are written.
//! - **Reload**: SIGHUP, or a change to a manifest file (size or
//!   modification time, polled every 200 ms), reads the manifests again
//!   (and the watch events seen so far) into a new table. Only the
//!   Services and EndpointSlices that differ from the live table are
//!   applied to it (one batch), the planner recompiles only their services,
//!   and only its diff becomes map writes: one endpoint change costs O(1)
//!   backend writes and one table rewrite for its frontend, and no other
//!   frontend is touched. A bad reload is reported and the maps stay as
//!   they were (whole or nothing).
//! - **`--watch FILE|-`** applies a watch stream event by event as it
//!   arrives: a file is followed as it grows (`tail -f`), `-` is standard
//!   input.
//! - **Draining**: a backend removed while the kernel still tracks open TCP
//!   connections to it drains: it leaves the Maglev table (new connections
//!   avoid it) but stays in the backends map until its connections end
//!   (polled every second from the conntrack map) or the drain grace
//!   period (`--drain-grace`, 900 s) passes.
//! - SIGINT or SIGTERM detaches the program (the maps go with it), prints
//!   `detached` and exits 0.
//!
//! After each sync it prints one line, `synced WHY: +A ~C -R frontends;
//! map writes: F frontend, B backend, T tables (K chunks)`. Frontends the
//! kernel program does not serve (SCTP) are left out, with a note; IPv4 and
//! IPv6 frontends (dual-stack services too) are both written.
//!
//! Exit status: 0 after SIGINT/SIGTERM, 1 when the first load, the program
//! load (verifier) or the attach fails, 2 for bad usage.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant as WallClock, SystemTime};

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nix::time::{ClockId, clock_gettime};
use svclb::ebpf::model::frontend_spec;
use svclb::ebpf::{ApplyStats, EbpfDataplane, EbpfFrontendSpec};
use svclb::k8s::input::InputLimits;
use svclb::k8s::loader::{self, LoadOptions, Loader};
use svclb::plan::{Frontend, PlanDiff, Planner};
use svclb::{
    BackendId, Change, EndpointSlice, Instant, NodeTopology, Protocol, Service, ServiceTable,
    SliceKey,
};

#[derive(Debug, Parser)]
#[command(
    name = "ebpf",
    about = "Kubernetes Service load balancing in the kernel: the svclb TC program, kept in sync with manifests",
    after_help = "PATH is a file or a directory of YAML/JSON manifests (Service, EndpointSlice, List kinds)."
)]
struct Cli {
    /// Manifest files or directories, read again on SIGHUP or when a file
    /// changes.
    #[arg(long, num_args = 1.., required_unless_present = "watch", action = clap::ArgAction::Append, value_name = "PATH...")]
    manifests: Vec<PathBuf>,
    /// A watch stream (`kubectl get services,endpointslices -A --watch
    /// --output-watch-events -o json|yaml`) applied event by event as it
    /// arrives: a file is followed as it grows, `-` is standard input.
    #[arg(long, action = clap::ArgAction::Append, value_name = "FILE|-")]
    watch: Vec<PathBuf>,
    /// The interfaces whose TC ingress gets the program.
    #[arg(
        long,
        required = true,
        value_delimiter = ',',
        value_name = "IFACE[,IFACE...]"
    )]
    iface: Vec<String>,
    /// Service CIDRs (one per family) that Services without spec.clusterIP
    /// get an address from.
    #[arg(long, default_value = loader::DEFAULT_SERVICE_CIDRS)]
    service_cidr: String,
    /// This node's name (Local traffic policies, node hints).
    #[arg(long)]
    node: Option<String>,
    /// This node's zone (topology hints).
    #[arg(long)]
    zone: Option<String>,
    /// A node IP: node ports answer on it (as the CLI's `--node-ip`).
    /// Repeatable. Replies to it leave the program with the node's own
    /// source address before routing, so the interfaces towards the
    /// backends need `net.ipv4.conf.IFACE.accept_local=1`.
    #[arg(long = "node-ip", action = clap::ArgAction::Append, value_name = "IP")]
    node_ip: Vec<IpAddr>,
    /// Maglev table size of every frontend (a prime, 251..=131071); the
    /// default is at least 100 slots per backend, 16381 at least.
    #[arg(long)]
    table_size: Option<u32>,
    /// How long a removed backend with open connections drains, in seconds.
    #[arg(long, default_value_t = 900)]
    drain_grace: u64,
    /// Skip bad objects (each reported) and load the rest.
    #[arg(long)]
    keep_going: bool,
    /// One note per skipped object instead of a summary per kind.
    #[arg(long)]
    verbose: bool,
}

/// What the control loop reacts to.
enum Event {
    Signal(Signal),
    /// A complete piece of a watch stream: (source, text).
    Watch(String, String),
    /// A watch stream ended or failed (the message says which).
    WatchEnded(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Block the signals before any thread starts, so every thread inherits
    // the mask and only `sigwait` in the signal thread sees them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGTERM] {
        signals.add(s);
    }
    if let Err(e) = signals.thread_block() {
        eprintln!("ebpf: error: blocking signals: {e}");
        return ExitCode::from(1);
    }
    let (tx, rx) = mpsc::channel();
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            while let Ok(sig) = signals.wait() {
                if tx.send(Event::Signal(sig)).is_err() {
                    break;
                }
            }
        });
    }
    match run(&cli, tx, rx) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("ebpf: error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// The table, its loader and the watch text applied so far: what a reload
/// rebuilds from.
struct Input {
    options: LoadOptions,
    manifests: Vec<PathBuf>,
    loader: Loader,
    table: ServiceTable,
    /// Every watch piece applied, in order (bounded by the input limits).
    watched: Vec<(String, String)>,
    verbose: bool,
}

impl Input {
    fn note(&self, report: &loader::LoadReport) {
        for line in report.lines(self.verbose) {
            eprintln!("ebpf: note: {line}");
        }
    }

    /// A fresh table from the manifests and the watch text seen so far.
    fn rebuild(&self) -> Result<(Loader, ServiceTable), String> {
        let mut loader = Loader::new(self.options.clone());
        let mut table = ServiceTable::new();
        let report = loader
            .load(&mut table, &self.manifests, &[])
            .map_err(|e| e.to_string())?;
        self.note(&report);
        for (source, text) in &self.watched {
            let r = loader
                .apply_watch_text(&mut table, text, source)
                .map_err(|e| e.to_string())?;
            self.note(&r);
        }
        Ok((loader, table))
    }
}

/// The planner and the kernel maps, kept in step.
struct Sync {
    planner: Planner,
    dp: EbpfDataplane,
    start: WallClock,
    skipped: HashSet<(IpAddr, u16, Protocol)>,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the kernel program's `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Kernel backend ids with a live, not closed, tracked connection.
fn connected(dp: &EbpfDataplane) -> HashSet<u32> {
    let now = monotonic_ns();
    match dp.tracked() {
        Ok(conns) => conns
            .into_iter()
            .filter(|c| c.state != "CLOSED" && c.expires_ns > now)
            .map(|c| c.backend_id)
            .collect(),
        Err(e) => {
            // Unknown: keep every removed backend draining (the safe side).
            eprintln!("ebpf: note: reading the conntrack map: {e}");
            HashSet::from([u32::MAX])
        }
    }
}

fn kernel_serves(fe: &Frontend) -> bool {
    let key = fe.key();
    matches!(key.protocol, Protocol::Tcp | Protocol::Udp)
}

impl Sync {
    fn now(&self) -> Instant {
        Instant::from_millis(self.start.elapsed().as_millis() as u64)
    }

    /// `has_connections` for the planner: the conntrack map, read once and
    /// only when the planner asks.
    fn update(&mut self, table: &ServiceTable, changes: &svclb::ChangeSet) -> PlanDiff {
        let now = self.now();
        let dp = &self.dp;
        let mut live: Option<HashSet<u32>> = None;
        self.planner.update(table, changes, now, |id: BackendId| {
            let live = live.get_or_insert_with(|| connected(dp));
            live.contains(&u32::MAX) || id.0.checked_add(1).is_some_and(|k| live.contains(&k))
        })
    }

    fn timers(&mut self, why: &str) -> Result<(), String> {
        if self.planner.retired().next().is_none() {
            return Ok(());
        }
        let now = self.now();
        let live = connected(&self.dp);
        let diff = self.planner.handle_timeout(now, |id: BackendId| {
            live.contains(&u32::MAX) || id.0.checked_add(1).is_some_and(|k| live.contains(&k))
        });
        self.write(&diff, why)
    }

    /// The diff as map writes: added and changed frontends as specs, removed
    /// ones as keys.
    fn write(&mut self, diff: &PlanDiff, why: &str) -> Result<(), String> {
        if diff.is_empty() {
            return Ok(());
        }
        let mut upserts: Vec<EbpfFrontendSpec> = Vec::new();
        for &id in diff.added.iter().chain(&diff.changed) {
            let Some(fe) = self.planner.frontend(id) else {
                continue;
            };
            if kernel_serves(fe) {
                upserts.push(frontend_spec(fe));
            } else {
                let k = fe.key();
                if self.skipped.insert((k.addr, k.port, k.protocol)) {
                    eprintln!(
                        "ebpf: note: {} {}/{} left out: the kernel program serves TCP and UDP only",
                        fe.name(),
                        k.socket_addr(),
                        k.protocol
                    );
                }
            }
        }
        let removed: Vec<(IpAddr, u16, Protocol)> = diff
            .removed
            .iter()
            .map(|(_, k)| (k.addr, k.port, k.protocol))
            .collect();
        let stats: ApplyStats = match self.dp.apply_diff(&upserts, &removed) {
            Ok(stats) => stats,
            Err(e) => {
                // The planner has moved on, so the next diff would not name
                // these frontends again: write the whole plan (unchanged
                // frontends cost nothing), then report.
                let all: Vec<EbpfFrontendSpec> = self
                    .planner
                    .frontends()
                    .filter(|fe| kernel_serves(fe))
                    .map(|fe| frontend_spec(fe))
                    .collect();
                return match self.dp.apply(&all) {
                    Ok(_) => Err(format!(
                        "writing the maps ({why}): {e}; rewrote the whole plan instead"
                    )),
                    Err(e2) => Err(format!(
                        "writing the maps ({why}): {e}; the whole plan failed too: {e2}"
                    )),
                };
            }
        };
        println!(
            "synced {why}: +{} ~{} -{} frontends; map writes: {} frontend, {} backend, {} tables ({} chunks)",
            diff.added.len(),
            diff.changed.len(),
            diff.removed.len(),
            stats.frontend_writes,
            stats.backend_writes,
            stats.table_rewrites,
            stats.chunk_writes
        );
        let _ = std::io::stdout().flush();
        Ok(())
    }
}

/// (path, size, modification time) of every manifest file: a reload is due
/// when it changes.
fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    for p in paths {
        match Loader::manifest_files(p) {
            Ok(files) => {
                for f in files {
                    let meta = std::fs::metadata(&f).ok();
                    out.push((
                        f,
                        meta.as_ref().map_or(0, |m| m.len()),
                        meta.and_then(|m| m.modified().ok()),
                    ));
                }
            }
            Err(_) => out.push((p.clone(), 0, None)),
        }
    }
    out
}

fn run(cli: &Cli, tx: Sender<Event>, rx: Receiver<Event>) -> Result<(), String> {
    let options = LoadOptions {
        service_cidrs: loader::parse_service_cidrs(&cli.service_cidr)
            .map_err(|e| format!("--service-cidr: {e}"))?,
        keep_going: cli.keep_going,
        verbose: cli.verbose,
        limits: InputLimits::default(),
        max_errors: 20,
        ..LoadOptions::default()
    };
    let mut input = Input {
        options: options.clone(),
        manifests: cli.manifests.clone(),
        loader: Loader::new(options),
        table: ServiceTable::new(),
        watched: Vec::new(),
        verbose: cli.verbose,
    };
    let report = input
        .loader
        .load(&mut input.table, &cli.manifests, &[])
        .map_err(|e| e.to_string())?;
    input.note(&report);
    let mut node = NodeTopology::default();
    node.node_name = cli.node.clone();
    node.zone = cli.zone.clone();
    let mut planner = Planner::new(node);
    planner.set_node_addresses(svclb::plan::NodeAddresses::new(
        cli.node_ip.clone(),
        Vec::new(),
    ));
    planner.set_drain_grace(Duration::from_secs(cli.drain_grace));
    let ifaces: Vec<&str> = cli.iface.iter().map(String::as_str).collect();
    let dp = EbpfDataplane::load(&ifaces, cli.table_size)
        .map_err(|e| format!("loading and attaching to {}: {e}", cli.iface.join(",")))?;
    let mut sync = Sync {
        planner,
        dp,
        start: WallClock::now(),
        skipped: HashSet::new(),
    };
    let diff = sync.update(&input.table, &input.table.full_change_set());
    sync.write(&diff, "manifests")?;
    if let Ok(Some(n)) = sync.dp.verified_instruction_count() {
        eprintln!(
            "ebpf: attached to {} (verifier: {n} instructions processed)",
            cli.iface.join(",")
        );
    }
    println!("ready");
    let _ = std::io::stdout().flush();

    for w in &cli.watch {
        follow(w.clone(), tx.clone(), options_limit(&input.options));
    }
    drop(tx);
    let mut files = fingerprint(&cli.manifests);
    let mut last_drain_check = WallClock::now();
    loop {
        let event = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Err("signal thread ended".into()),
        };
        match event {
            Some(Event::Signal(Signal::SIGHUP)) => {
                files = fingerprint(&cli.manifests);
                reload(&mut input, &mut sync, "SIGHUP");
            }
            Some(Event::Signal(sig)) => {
                eprintln!("ebpf: {sig}: detaching");
                drop(sync);
                println!("detached");
                let _ = std::io::stdout().flush();
                return Ok(());
            }
            Some(Event::Watch(source, text)) => {
                match input
                    .loader
                    .apply_watch_text(&mut input.table, &text, &source)
                {
                    Ok(report) => {
                        input.note(&report);
                        for cs in &report.change_sets {
                            let diff = sync.update(&input.table, cs);
                            if let Err(e) = sync.write(&diff, &source) {
                                eprintln!("ebpf: error: {e}");
                            }
                        }
                        input.watched.push((source, text));
                    }
                    Err(e) => eprintln!("ebpf: error: {source}: {e}"),
                }
            }
            Some(Event::WatchEnded(msg)) => eprintln!("ebpf: note: {msg}"),
            None => {
                let now = fingerprint(&cli.manifests);
                if now != files {
                    files = now;
                    reload(&mut input, &mut sync, "manifests changed");
                }
            }
        }
        if last_drain_check.elapsed() >= Duration::from_secs(1) {
            last_drain_check = WallClock::now();
            if let Err(e) = sync.timers("drain") {
                eprintln!("ebpf: error: {e}");
            }
        }
    }
}

fn options_limit(options: &LoadOptions) -> u64 {
    options.limits.max_bytes
}

/// Every slice of a table (attached or pending), by key.
fn slices(table: &ServiceTable) -> BTreeMap<SliceKey, Arc<EndpointSlice>> {
    let mut out = BTreeMap::new();
    for key in table.keys_sorted() {
        for s in table.slices_of(&key) {
            out.insert(s.key().clone(), Arc::clone(s));
        }
    }
    for s in table.pending_slices() {
        out.insert(s.key().clone(), Arc::clone(s));
    }
    out
}

/// The changes that turn `old` into `new`: upserts of the services and
/// slices that differ, deletes of those gone.
fn table_changes(old: &ServiceTable, new: &ServiceTable) -> Vec<Change> {
    let mut out = Vec::new();
    for key in new.keys_sorted() {
        let svc = new.service(&key).expect("listed");
        if old.service(&key).is_none_or(|o| o != svc) {
            out.push(Change::UpsertService(Service::clone(svc)));
        }
    }
    let (old_slices, new_slices) = (slices(old), slices(new));
    for (key, slice) in &new_slices {
        if old_slices.get(key) != Some(slice) {
            out.push(Change::UpsertSlice(EndpointSlice::clone(slice)));
        }
    }
    for key in old_slices.keys() {
        if !new_slices.contains_key(key) {
            out.push(Change::DeleteSlice(key.clone()));
        }
    }
    for key in old.keys_sorted() {
        if new.service(&key).is_none() {
            out.push(Change::DeleteService(key));
        }
    }
    out
}

/// Reads the input again into a new table, applies to the live table only
/// the objects that differ (one batch, whole or not at all), and writes
/// only the plan's diff; on error the table and maps stay as they were.
fn reload(input: &mut Input, sync: &mut Sync, why: &str) {
    let result = input.rebuild().and_then(|(loader, table)| {
        let changes = table_changes(&input.table, &table);
        if changes.is_empty() {
            input.loader = loader;
            return Ok(None);
        }
        let cs = input
            .table
            .apply_batch(changes)
            .map_err(|e| e.to_string())?;
        input.loader = loader;
        Ok(Some(cs))
    });
    match result {
        Ok(Some(cs)) => {
            let diff = sync.update(&input.table, &cs);
            if let Err(e) = sync.write(&diff, why) {
                eprintln!("ebpf: error: {e}");
            } else if diff.is_empty() {
                println!("synced {why}: no change");
                let _ = std::io::stdout().flush();
            }
        }
        Ok(None) => {
            println!("synced {why}: no change");
            let _ = std::io::stdout().flush();
        }
        Err(e) => eprintln!("ebpf: error: reload ({why}): {e}; the maps stay as they were"),
    }
}

/// Follows a watch stream on a thread: `-` is standard input, a file is
/// read as it grows. Sends each complete piece (whole JSON values, or YAML
/// documents up to the last `---`) as it arrives; at most `max_bytes` in
/// all.
fn follow(path: PathBuf, tx: Sender<Event>, max_bytes: u64) {
    std::thread::spawn(move || {
        let source = if path.as_os_str() == "-" {
            "<stdin>".to_owned()
        } else {
            path.display().to_string()
        };
        let mut pending = String::new();
        let mut total = 0u64;
        let send = |pending: &mut String, at_end: bool| -> bool {
            let cut = complete_prefix(pending, at_end);
            if cut == 0 {
                return true;
            }
            let piece: String = pending.drain(..cut).collect();
            piece.trim().is_empty() || tx.send(Event::Watch(source.clone(), piece)).is_ok()
        };
        let ended = |tx: &Sender<Event>, msg: String| {
            let _ = tx.send(Event::WatchEnded(msg));
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut bytes: Vec<u8> = Vec::new();
        if path.as_os_str() == "-" {
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => {
                        push_utf8(&mut bytes, &mut pending);
                        send(&mut pending, true);
                        ended(&tx, format!("{source}: end of stream"));
                        return;
                    }
                    Ok(n) => {
                        total += n as u64;
                        if total > max_bytes {
                            ended(
                                &tx,
                                format!("{source}: over {max_bytes} bytes, not read on"),
                            );
                            return;
                        }
                        bytes.extend_from_slice(&buf[..n]);
                        push_utf8(&mut bytes, &mut pending);
                        if !send(&mut pending, false) {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        ended(&tx, format!("{source}: {e}"));
                        return;
                    }
                }
            }
        }
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                ended(&tx, format!("{source}: {e}"));
                return;
            }
        };
        let mut idle = 0u32;
        loop {
            match file.read(&mut buf) {
                Ok(0) => {
                    idle += 1;
                    // The writer paused: a trailing YAML document is whole.
                    if idle == 2 && !send(&mut pending, true) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(n) => {
                    idle = 0;
                    total += n as u64;
                    if total > max_bytes {
                        ended(
                            &tx,
                            format!("{source}: over {max_bytes} bytes, not read on"),
                        );
                        return;
                    }
                    bytes.extend_from_slice(&buf[..n]);
                    push_utf8(&mut bytes, &mut pending);
                    if !send(&mut pending, false) {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    ended(&tx, format!("{source}: {e}"));
                    return;
                }
            }
        }
    });
}

/// Moves the valid UTF-8 prefix of `bytes` to `text` (a character split
/// between two reads waits for its rest).
fn push_utf8(bytes: &mut Vec<u8>, text: &mut String) {
    let valid = match std::str::from_utf8(bytes) {
        Ok(s) => s.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        // Invalid UTF-8: hand it on, the reader reports it.
        Err(_) => bytes.len(),
    };
    text.push_str(&String::from_utf8_lossy(&bytes[..valid]));
    bytes.drain(..valid);
}

/// The length of the longest prefix of `text` made of whole watch events:
/// for JSON (the text starts with `{` or `[`), whole top-level values; for
/// YAML, the documents before the last `---` line, or all of it `at_end`.
fn complete_prefix(text: &str, at_end: bool) -> usize {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let (mut depth, mut in_str, mut escaped, mut end) = (0usize, false, false, 0);
        for (i, c) in text.char_indices() {
            if in_str {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => in_str = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => in_str = true,
                '{' | '[' => depth += 1,
                '}' | ']' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = i + 1;
                    }
                }
                _ => {}
            }
        }
        return if at_end { text.len() } else { end };
    }
    if at_end {
        return text.len();
    }
    let mut end = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" && pos > 0 {
            end = pos;
        }
        pos += line.len();
    }
    end
}

#[cfg(test)]
mod tests {
    use super::complete_prefix;

    #[test]
    fn watch_pieces() {
        let json = "{\"a\": \"}\\\"{\"}\n{\"b\": [1, {\"c\": 2}]}\n{\"d\": ";
        let n = complete_prefix(json, false);
        assert_eq!(&json[..n], "{\"a\": \"}\\\"{\"}\n{\"b\": [1, {\"c\": 2}]}");
        let yaml = "---\na: 1\n---\nb: 2\n";
        assert_eq!(&yaml[..complete_prefix(yaml, false)], "---\na: 1\n");
        assert_eq!(complete_prefix(yaml, true), yaml.len());
    }
}
