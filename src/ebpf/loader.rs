//! `EbpfDataplane`: loads `svclb.bpf.c` (compiled by `build.rs`) with aya,
//! attaches it to TC ingress through TCX links, and keeps its maps in step
//! with a list of [`EbpfFrontendSpec`]s.
//!
//! # Maps (Cilium's layout, see the C file)
//! - `svclb_frontends`: (VIP, port, protocol) -> frontend id, backend count,
//!   flags, table size, live table version;
//! - `svclb_backends`: backend id -> address, port, state (active/draining);
//! - `svclb_tables`: (frontend id, version, chunk) -> 1008 backend ids
//!   (one page per element; the C file says why): two
//!   copies per frontend, the live one named by the frontend entry, so a
//!   table rewrite fills the other copy and one frontend write swaps it;
//! - `svclb_ct` (LRU): client tuple -> backend id, TCP state, expiry;
//! - `svclb_rnat` (LRU): backend's reply tuple -> VIP and port;
//! - `svclb_frag4`, `svclb_frag6` (LRU): a fragmented datagram's (source,
//!   destination, IP id, protocol) -> the ports its first fragment carried,
//!   so that its later fragments follow it (Cilium's
//!   `IPV4_FRAG_DATAGRAMS_MAP`); the program alone writes them;
//! - `svclb_counters` (per-CPU array): see [`EbpfCounters`].
//!
//! IPv6 frontends and backends go into maps of their own, with 16-byte
//! addresses (Cilium's `lb6_*` maps): `svclb_frontend6`, `svclb_backend6`,
//! `svclb_ct6` and `svclb_rnat6`; the tables and counters are shared, and
//! frontend and backend ids are one space across both families, so one
//! plan of a dual-stack service writes both.
//!
//! # Diffs
//! [`EbpfDataplane::apply`] compares each frontend with what it wrote last:
//! an unchanged frontend costs nothing; a changed one costs its backend
//! writes, one table rewrite (`ceil(M / 1008)` chunk writes into the idle
//! copy) and one frontend write. Other frontends are never rewritten.
//! Draining backends leave the table but stay in the backends map, so
//! tracked connections keep them; backends no frontend names are deleted.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use aya::maps::{HashMap, MapData, MapError, PerCpuArray};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfError as AyaError};

use super::model::{BackendState, CompiledFrontend, EbpfFrontendSpec, TABLE_CHUNK};
use crate::error::ValidationError;
use crate::model::flow::Protocol;

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/svclb.bpf.o"));
const PROGRAM: &str = "svclb_tc";

/// What can go wrong loading, attaching or writing maps.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EbpfError {
    /// Loading the object failed.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] AyaError),
    /// Loading (verifier) or attaching the program failed.
    #[error("eBPF program: {0}")]
    Program(#[from] ProgramError),
    /// A map operation failed (the message names the syscall's errno).
    #[error("eBPF map {map}: {}", describe(source))]
    Map {
        /// The map's name.
        map: &'static str,
        /// The error.
        source: MapError,
    },
    /// A spec the kernel program cannot take.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The crate was built without clang: there is no object to load.
    #[error("the eBPF object was not built (no clang at build time)")]
    NotBuilt,
    /// The object lacks a map or program this loader expects.
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
}

/// aya's message, with the OS error of a failed syscall (ENOMEM, E2BIG, ...)
/// that its `Display` leaves to `source()`.
fn describe(e: &MapError) -> String {
    match e {
        MapError::SyscallError(s) => format!("{e}: {}", s.io_error),
        other => other.to_string(),
    }
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map { map, source }
}

/// The program's per-CPU counters, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EbpfCounters {
    /// IPv4 and IPv6 TCP/UDP packets seen.
    pub packets: u64,
    /// New connections scheduled through a Maglev table.
    pub new_connections: u64,
    /// Packets of tracked connections (client to backend).
    pub tracked: u64,
    /// Reverse-NATed replies.
    pub replies: u64,
    /// TCP RSTs sent for frontends without backends (REJECT).
    pub reject_rst: u64,
    /// ICMP (ICMPv6) port unreachable sent for UDP to frontends without
    /// backends (REJECT).
    pub reject_icmp: u64,
    /// Dropped: Local policy without local backends.
    pub drop_local: u64,
    /// Dropped: the table named a backend missing from the backends map.
    pub drop_no_backend: u64,
    /// Dropped: truncated headers, or a rewrite failed.
    pub drop_malformed: u64,
    /// Tracked flows scheduled anew (backend gone, or a SYN to a draining
    /// backend or a closed flow).
    pub rescheduled: u64,
    /// Non-first IPv4 or IPv6 fragments passed untouched: their first
    /// fragment was not seen (or scheduled nothing), so their ports are
    /// unknown.
    pub pass_fragment: u64,
    /// ICMP and ICMPv6 errors from a backend about a DNATed flow,
    /// reverse-NATed (outer source and quoted destination back to the VIP).
    pub icmp_errors: u64,
    /// Non-first fragments NATed with the ports their first fragment
    /// recorded (`svclb_frag4`, `svclb_frag6`).
    pub fragments: u64,
    /// IPv6 packets passed untouched because their extension headers were
    /// more than 4 or longer than 256 bytes.
    pub pass_exthdr: u64,
}

const COUNTERS: u32 = 14;

/// A connection in the kernel's conntrack map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackedConnection {
    /// Protocol.
    pub protocol: Protocol,
    /// The client.
    pub client: SocketAddr,
    /// The frontend (VIP and port) it addressed.
    pub frontend: SocketAddr,
    /// The backend id it is bound to.
    pub backend_id: u32,
    /// The frontend id.
    pub frontend_id: u32,
    /// `SYN`, `ESTABLISHED`, `FIN`, `CLOSED` or `UDP`.
    pub state: &'static str,
    /// Expiry deadline, `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`).
    pub expires_ns: u64,
}

/// One [`EbpfDataplane::test_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The program's return code (`TC_ACT_OK` = 0, `TC_ACT_SHOT` = 2,
    /// `TC_ACT_REDIRECT` = 7).
    pub return_value: u32,
    /// The kernel's mean time per run.
    pub duration: Duration,
    /// The packet after the run.
    pub packet: Vec<u8>,
}

/// Map writes done by one [`EbpfDataplane::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyStats {
    /// Frontend entries written or deleted.
    pub frontend_writes: usize,
    /// Backend entries written or deleted.
    pub backend_writes: usize,
    /// Lookup tables rewritten (one per changed frontend at most).
    pub table_rewrites: usize,
    /// Table chunks written or deleted.
    pub chunk_writes: usize,
}

#[derive(Debug)]
struct Written {
    compiled: CompiledFrontend,
    version: u16,
    chunks: u16,
}

/// A frontend map key: `svclb_frontends` (IPv4) or `svclb_frontend6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FeKey {
    V4([u8; 8]),
    V6([u8; 20]),
}

/// A backend map value: `svclb_backends` (IPv4) or `svclb_backend6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BeVal {
    V4([u8; 8]),
    V6([u8; 20]),
}

/// How many written frontends name a backend id, and its address.
#[derive(Debug, Clone, Copy, Default)]
struct BackendUsers {
    addr: Option<SocketAddr>,
    active: u32,
    draining: u32,
}

impl BackendUsers {
    fn count(&self) -> u32 {
        self.active + self.draining
    }

    fn add(&mut self, state: BackendState) {
        match state {
            BackendState::Active => self.active += 1,
            BackendState::Draining => self.draining += 1,
        }
    }

    fn sub(&mut self, state: BackendState) {
        match state {
            BackendState::Active => self.active -= 1,
            BackendState::Draining => self.draining -= 1,
        }
    }

    /// The backends-map value: active anywhere wins over draining.
    fn value(&self) -> Option<BeVal> {
        let state = if self.active == 0 {
            BackendState::Draining
        } else {
            BackendState::Active
        };
        Some(be_val(self.addr?, state))
    }
}

/// The loaded, attached eBPF dataplane. Dropping it detaches the program
/// and frees its maps.
pub struct EbpfDataplane {
    ebpf: Ebpf,
    frontends: HashMap<MapData, [u8; 8], [u32; 6]>,
    backends: HashMap<MapData, u32, [u8; 8]>,
    frontends6: HashMap<MapData, [u8; 20], [u32; 6]>,
    backends6: HashMap<MapData, u32, [u8; 20]>,
    tables: HashMap<MapData, [u8; 8], [u32; TABLE_CHUNK as usize]>,
    ct: HashMap<MapData, [u8; 16], [u8; 24]>,
    ct6: HashMap<MapData, [u8; 40], [u8; 24]>,
    counters: PerCpuArray<MapData, u64>,
    written: StdHashMap<FeKey, Written>,
    written_backends: StdHashMap<u32, BeVal>,
    users: StdHashMap<u32, BackendUsers>,
    next_id: u32,
    free_ids: Vec<u32>,
    table_size: Option<u32>,
    interfaces: Vec<String>,
}

impl std::fmt::Debug for EbpfDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfDataplane")
            .field("interfaces", &self.interfaces)
            .field("frontends", &self.written.len())
            .field("backends", &self.written_backends.len())
            .finish()
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn key_of(vip: IpAddr, port: u16, protocol: Protocol) -> FeKey {
    match vip {
        IpAddr::V4(v4) => {
            let mut k = [0u8; 8];
            k[..4].copy_from_slice(&v4.octets());
            k[4..6].copy_from_slice(&port.to_be_bytes());
            k[6] = proto_number(protocol);
            FeKey::V4(k)
        }
        IpAddr::V6(v6) => {
            let mut k = [0u8; 20];
            k[..16].copy_from_slice(&v6.octets());
            k[16..18].copy_from_slice(&port.to_be_bytes());
            k[18] = proto_number(protocol);
            FeKey::V6(k)
        }
    }
}

fn fe_key(spec: &EbpfFrontendSpec) -> FeKey {
    key_of(spec.vip, spec.port, spec.protocol)
}

fn table_key(fe_id: u32, version: u16, chunk: u16) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&fe_id.to_ne_bytes());
    k[4..6].copy_from_slice(&version.to_ne_bytes());
    k[6..].copy_from_slice(&chunk.to_ne_bytes());
    k
}

fn be_val(addr: SocketAddr, state: BackendState) -> BeVal {
    let state = match state {
        BackendState::Active => 0,
        BackendState::Draining => 1,
    };
    match addr.ip() {
        IpAddr::V4(v4) => {
            let mut v = [0u8; 8];
            v[..4].copy_from_slice(&v4.octets());
            v[4..6].copy_from_slice(&addr.port().to_be_bytes());
            v[6] = state;
            BeVal::V4(v)
        }
        IpAddr::V6(v6) => {
            let mut v = [0u8; 20];
            v[..16].copy_from_slice(&v6.octets());
            v[16..18].copy_from_slice(&addr.port().to_be_bytes());
            v[18] = state;
            BeVal::V6(v)
        }
    }
}

impl EbpfDataplane {
    /// Loads the program (the verifier runs here) and attaches it to TC
    /// ingress of each interface (TCX links on kernels >= 6.6, else a
    /// netlink filter on an existing `clsact` qdisc). `table_size` fixes
    /// every frontend's Maglev table size; `None` uses
    /// [`default_table_size`](crate::scheduler::maglev::default_table_size).
    ///
    /// # Errors
    /// [`EbpfError`] when loading, verification or attaching fails.
    pub fn load(interfaces: &[&str], table_size: Option<u32>) -> Result<Self, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let mut ebpf = Ebpf::load(OBJECT)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or(EbpfError::Missing(PROGRAM))?
            .try_into()?;
        prog.load()?;
        for iface in interfaces {
            prog.attach(iface, TcAttachType::Ingress)?;
        }
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(EbpfError::Missing(name));
        let frontends =
            HashMap::try_from(take("svclb_frontends")?).map_err(map_err("svclb_frontends"))?;
        let backends =
            HashMap::try_from(take("svclb_backends")?).map_err(map_err("svclb_backends"))?;
        let tables = HashMap::try_from(take("svclb_tables")?).map_err(map_err("svclb_tables"))?;
        let ct = HashMap::try_from(take("svclb_ct")?).map_err(map_err("svclb_ct"))?;
        let frontends6 =
            HashMap::try_from(take("svclb_frontend6")?).map_err(map_err("svclb_frontend6"))?;
        let backends6 =
            HashMap::try_from(take("svclb_backend6")?).map_err(map_err("svclb_backend6"))?;
        let ct6 = HashMap::try_from(take("svclb_ct6")?).map_err(map_err("svclb_ct6"))?;
        let counters =
            PerCpuArray::try_from(take("svclb_counters")?).map_err(map_err("svclb_counters"))?;
        Ok(EbpfDataplane {
            ebpf,
            frontends,
            backends,
            frontends6,
            backends6,
            tables,
            ct,
            ct6,
            counters,
            written: StdHashMap::new(),
            written_backends: StdHashMap::new(),
            users: StdHashMap::new(),
            next_id: 1,
            free_ids: Vec::new(),
            table_size,
            interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn program(&self) -> Result<&SchedClassifier, EbpfError> {
        Ok(self
            .ebpf
            .program(PROGRAM)
            .ok_or(EbpfError::Missing(PROGRAM))?
            .try_into()?)
    }

    /// Whether the object was built (clang was there at build time).
    pub fn object_built() -> bool {
        !OBJECT.is_empty()
    }

    /// The compiled object (empty when not built), e.g. for `bpftool`.
    pub fn object() -> &'static [u8] {
        OBJECT
    }

    /// The number of instructions the verifier processed (kernel >= 5.16).
    ///
    /// # Errors
    /// When the program's info cannot be read.
    pub fn verified_instruction_count(&self) -> Result<Option<u32>, EbpfError> {
        Ok(self.program()?.info()?.verified_instruction_count())
    }

    /// The kernel's id of the loaded program (as `bpftool prog show` lists it).
    ///
    /// # Errors
    /// When the program's info cannot be read.
    pub fn program_id(&self) -> Result<u32, EbpfError> {
        Ok(self.program()?.info()?.id())
    }

    /// Runs the program on `packet` (an Ethernet frame) `repeat` times with
    /// `BPF_PROG_TEST_RUN`: its return code, the kernel's mean time per run,
    /// and the packet as the (last) run left it.
    ///
    /// # Errors
    /// When the kernel refuses the test run.
    pub fn test_run(&self, packet: &[u8], repeat: u32) -> Result<TestRunOutcome, EbpfError> {
        let mut out = vec![0u8; packet.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat.max(1);
        let r = self.program()?.test_run(opts)?;
        out.truncate(r.data_size_out as usize);
        Ok(TestRunOutcome {
            return_value: r.return_value,
            duration: r.duration,
            packet: out,
        })
    }

    /// Writes the maps so that the kernel serves exactly `specs`, touching
    /// only what changed since the last call (see the module docs).
    ///
    /// # Errors
    /// [`EbpfError::Invalid`] for a spec the program cannot take (nothing
    /// is written then), [`EbpfError::Map`] when the kernel refuses a write
    /// (the maps may then be partly written; apply again).
    pub fn apply(&mut self, specs: &[EbpfFrontendSpec]) -> Result<ApplyStats, EbpfError> {
        let keep: HashSet<FeKey> = specs.iter().map(fe_key).collect();
        let removed: Vec<FeKey> = self
            .written
            .keys()
            .filter(|k| !keep.contains(*k))
            .copied()
            .collect();
        self.apply_keys(specs, &removed)
    }

    /// Applies a diff: writes (or rewrites) the frontends in `upserts` and
    /// deletes the frontends `removed` names (VIP, port, protocol), leaving
    /// every other frontend as it is. This is what a plan diff becomes:
    /// its added and changed frontends as specs, its removed ones as keys.
    /// Costs what [`apply`](Self::apply) costs for the same frontends, and
    /// nothing for the others. A backend stays in the backends map while
    /// any frontend names it (active anywhere wins over draining).
    ///
    /// # Errors
    /// As [`apply`](Self::apply); a frontend named in both lists is
    /// upserted.
    pub fn apply_diff(
        &mut self,
        upserts: &[EbpfFrontendSpec],
        removed: &[(IpAddr, u16, Protocol)],
    ) -> Result<ApplyStats, EbpfError> {
        let keys: Vec<FeKey> = removed
            .iter()
            .map(|&(vip, port, protocol)| key_of(vip, port, protocol))
            .collect();
        self.apply_keys(upserts, &keys)
    }

    fn apply_keys(
        &mut self,
        specs: &[EbpfFrontendSpec],
        removed: &[FeKey],
    ) -> Result<ApplyStats, EbpfError> {
        let mut stats = ApplyStats::default();
        // Validate and compile first: a bad spec writes nothing.
        let mut plan: Vec<(FeKey, &EbpfFrontendSpec)> = Vec::with_capacity(specs.len());
        let mut upserted: HashSet<FeKey> = HashSet::with_capacity(specs.len());
        for spec in specs {
            let key = fe_key(spec);
            if upserted.insert(key) {
                plan.push((key, spec));
            }
        }
        let removed: Vec<FeKey> = removed
            .iter()
            .filter(|k| !upserted.contains(*k) && self.written.contains_key(*k))
            .copied()
            .collect();
        let mut compiled = Vec::new();
        for &(key, spec) in &plan {
            match self.written.get(&key) {
                Some(w) if w.compiled.spec() == spec => {}
                Some(w) => compiled.push((
                    key,
                    CompiledFrontend::compile(spec, w.compiled.id(), self.table_size)?,
                )),
                None => compiled.push((key, CompiledFrontend::compile(spec, 0, self.table_size)?)),
            }
        }
        // The backends' users after this apply: the touched entries only.
        let mut users: StdHashMap<u32, BackendUsers> = StdHashMap::new();
        let touch = |users: &mut StdHashMap<u32, BackendUsers>, id: u32| {
            users
                .entry(id)
                .or_insert_with(|| self.users.get(&id).copied().unwrap_or_default());
        };
        for (key, _) in &compiled {
            if let Some(w) = self.written.get(key) {
                for b in &w.compiled.spec().backends {
                    touch(&mut users, b.id);
                    users.get_mut(&b.id).expect("touched").sub(b.state);
                }
            }
        }
        for key in &removed {
            let w = self.written.get(key).expect("filtered");
            for b in &w.compiled.spec().backends {
                touch(&mut users, b.id);
                users.get_mut(&b.id).expect("touched").sub(b.state);
            }
        }
        for (_, fe) in &compiled {
            for b in &fe.spec().backends {
                touch(&mut users, b.id);
                let u = users.get_mut(&b.id).expect("touched");
                if u.count() > 0 && u.addr != Some(b.addr) {
                    return Err(ValidationError::Invalid {
                        field: "backends.id".into(),
                        value: b.id.to_string(),
                        reason: "one backend id with two addresses",
                    }
                    .into());
                }
                u.addr = Some(b.addr);
                u.add(b.state);
            }
        }
        // 1. Backends first, so no table names a backend the map lacks.
        for (&id, u) in &users {
            let Some(v) = u.value().filter(|_| u.count() > 0) else {
                continue;
            };
            let old = self.written_backends.get(&id).copied();
            if old != Some(v) {
                // An id reused for the other family leaves its old map.
                if let Some(old) = old.filter(|o| !same_family(*o, v)) {
                    self.remove_backend(id, old)?;
                }
                match v {
                    BeVal::V4(v4) => self
                        .backends
                        .insert(id, v4, 0)
                        .map_err(map_err("svclb_backends"))?,
                    BeVal::V6(v6) => self
                        .backends6
                        .insert(id, v6, 0)
                        .map_err(map_err("svclb_backend6"))?,
                }
                self.written_backends.insert(id, v);
                stats.backend_writes += 1;
            }
        }
        // 2. Changed and new frontends: idle table copy, then the entry.
        for (key, fe) in compiled {
            let old = self.written.remove(&key);
            let id = match &old {
                Some(w) => w.compiled.id(),
                None => self.free_ids.pop().unwrap_or_else(|| {
                    self.next_id += 1;
                    self.next_id - 1
                }),
            };
            let fe = fe.with_id(id);
            let same_table = old.as_ref().is_some_and(|w| {
                w.compiled.table() == fe.table() && w.compiled.table_size() == fe.table_size()
            });
            let (version, chunks) = match (&old, same_table) {
                (Some(w), true) => (w.version, w.chunks),
                _ => {
                    let version = old.as_ref().map_or(0, |w| 1 - w.version);
                    let chunks = self.write_table(&fe, version, &mut stats)?;
                    // Chunks of the idle copy past the new size are stale.
                    if let Some(w) = &old {
                        for c in chunks..w.chunks {
                            let _ = self.tables.remove(&table_key(id, version, c));
                            stats.chunk_writes += 1;
                        }
                    }
                    (version, chunks)
                }
            };
            let flags = u32::from(fe.spec().reject_when_empty);
            let val = [
                id,
                fe.backend_count(),
                flags,
                fe.table_size(),
                u32::from(version),
                0,
            ];
            match key {
                FeKey::V4(k) => self
                    .frontends
                    .insert(k, val, 0)
                    .map_err(map_err("svclb_frontends"))?,
                FeKey::V6(k) => self
                    .frontends6
                    .insert(k, val, 0)
                    .map_err(map_err("svclb_frontend6"))?,
            }
            stats.frontend_writes += 1;
            self.written.insert(
                key,
                Written {
                    compiled: fe,
                    version,
                    chunks: chunks.max(old.map_or(0, |w| w.chunks)),
                },
            );
        }
        // 3. Frontends no longer wanted: entry first, then both table copies.
        for key in removed {
            let w = self.written.remove(&key).expect("filtered");
            match key {
                FeKey::V4(k) => self
                    .frontends
                    .remove(&k)
                    .map_err(map_err("svclb_frontends"))?,
                FeKey::V6(k) => self
                    .frontends6
                    .remove(&k)
                    .map_err(map_err("svclb_frontend6"))?,
            }
            stats.frontend_writes += 1;
            for version in 0..2 {
                for c in 0..w.chunks {
                    let _ = self.tables.remove(&table_key(w.compiled.id(), version, c));
                    stats.chunk_writes += 1;
                }
            }
            self.free_ids.push(w.compiled.id());
        }
        // 4. Backends no frontend names any more.
        for (id, u) in users {
            if u.count() > 0 {
                self.users.insert(id, u);
                continue;
            }
            self.users.remove(&id);
            if let Some(old) = self.written_backends.remove(&id) {
                self.remove_backend(id, old)?;
                stats.backend_writes += 1;
            }
        }
        Ok(stats)
    }

    fn remove_backend(&mut self, id: u32, old: BeVal) -> Result<(), EbpfError> {
        match old {
            BeVal::V4(_) => self.backends.remove(&id).map_err(map_err("svclb_backends")),
            BeVal::V6(_) => self
                .backends6
                .remove(&id)
                .map_err(map_err("svclb_backend6")),
        }
    }

    fn write_table(
        &mut self,
        fe: &CompiledFrontend,
        version: u16,
        stats: &mut ApplyStats,
    ) -> Result<u16, EbpfError> {
        let table = fe.table();
        let mut chunks = 0u16;
        for (c, part) in table.chunks(TABLE_CHUNK as usize).enumerate() {
            let mut v = [0u32; TABLE_CHUNK as usize];
            v[..part.len()].copy_from_slice(part);
            self.tables
                .insert(table_key(fe.id(), version, c as u16), v, 0)
                .map_err(map_err("svclb_tables"))?;
            chunks += 1;
            stats.chunk_writes += 1;
        }
        stats.table_rewrites += 1;
        Ok(chunks)
    }

    /// The compiled frontend for (VIP, port, protocol), as last written: what
    /// [`choose`](super::model::choose) needs to predict the kernel.
    pub fn compiled(
        &self,
        vip: impl Into<IpAddr>,
        port: u16,
        protocol: Protocol,
    ) -> Option<&CompiledFrontend> {
        self.written
            .get(&key_of(vip.into(), port, protocol))
            .map(|w| &w.compiled)
    }

    /// The counters, summed over CPUs.
    ///
    /// # Errors
    /// When the counters map cannot be read.
    pub fn counters(&self) -> Result<EbpfCounters, EbpfError> {
        let mut v = [0u64; COUNTERS as usize];
        for (i, slot) in v.iter_mut().enumerate() {
            *slot = self
                .counters
                .get(&(i as u32), 0)
                .map_err(map_err("svclb_counters"))?
                .iter()
                .sum();
        }
        Ok(EbpfCounters {
            packets: v[0],
            new_connections: v[1],
            tracked: v[2],
            replies: v[3],
            reject_rst: v[4],
            reject_icmp: v[5],
            drop_local: v[6],
            drop_no_backend: v[7],
            drop_malformed: v[8],
            rescheduled: v[9],
            pass_fragment: v[10],
            icmp_errors: v[11],
            fragments: v[12],
            pass_exthdr: v[13],
        })
    }

    /// The connections in the kernel's conntrack maps, IPv4 then IPv6
    /// (expired ones too: compare [`TrackedConnection::expires_ns`] with
    /// `CLOCK_MONOTONIC`).
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn tracked(&self) -> Result<Vec<TrackedConnection>, EbpfError> {
        let mut out = Vec::new();
        let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        for item in self.ct.iter() {
            let (k, v) = item.map_err(map_err("svclb_ct"))?;
            let ip = |b: &[u8]| IpAddr::from(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            out.push(tracked_connection(
                k[12],
                SocketAddr::new(ip(&k[0..4]), port(&k[8..10])),
                SocketAddr::new(ip(&k[4..8]), port(&k[10..12])),
                &v,
            ));
        }
        for item in self.ct6.iter() {
            let (k, v) = item.map_err(map_err("svclb_ct6"))?;
            let ip =
                |b: &[u8]| IpAddr::from(Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes")));
            out.push(tracked_connection(
                k[36],
                SocketAddr::new(ip(&k[0..16]), port(&k[32..34])),
                SocketAddr::new(ip(&k[16..32]), port(&k[34..36])),
                &v,
            ));
        }
        Ok(out)
    }
}

fn same_family(a: BeVal, b: BeVal) -> bool {
    matches!(
        (a, b),
        (BeVal::V4(_), BeVal::V4(_)) | (BeVal::V6(_), BeVal::V6(_))
    )
}

/// A conntrack entry (`struct ct_val`, the same for both families).
fn tracked_connection(
    proto: u8,
    client: SocketAddr,
    frontend: SocketAddr,
    v: &[u8; 24],
) -> TrackedConnection {
    let u32_at = |i: usize| u32::from_ne_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
    TrackedConnection {
        protocol: if proto == 17 {
            Protocol::Udp
        } else {
            Protocol::Tcp
        },
        client,
        frontend,
        expires_ns: u64::from_ne_bytes(v[0..8].try_into().expect("8 bytes")),
        backend_id: u32_at(8),
        frontend_id: u32_at(12),
        state: match v[16] {
            1 => "SYN",
            2 => "ESTABLISHED",
            3 => "FIN",
            4 => "CLOSED",
            _ => "UDP",
        },
    }
}
