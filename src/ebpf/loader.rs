//! `EbpfDataplane`: loads `svclb.bpf.c` (compiled by `build.rs`) with aya,
//! attaches it to TC ingress through TCX links, and keeps its maps in step
//! with a list of [`EbpfFrontendSpec`]s.
//!
//! # Maps (Cilium's layout, see the C file)
//! - `svclb_frontends`: (VIP, port, protocol) -> frontend id, backend count,
//!   flags, table size, live table version;
//! - `svclb_backends`: backend id -> address, port, state (active/draining);
//! - `svclb_tables`: (frontend id, version, chunk) -> 4096 backend ids: two
//!   copies per frontend, the live one named by the frontend entry, so a
//!   table rewrite fills the other copy and one frontend write swaps it;
//! - `svclb_ct` (LRU): client tuple -> backend id, TCP state, expiry;
//! - `svclb_rnat` (LRU): backend's reply tuple -> VIP and port;
//! - `svclb_counters` (per-CPU array): see [`EbpfCounters`].
//!
//! # Diffs
//! [`EbpfDataplane::apply`] compares each frontend with what it wrote last:
//! an unchanged frontend costs nothing; a changed one costs its backend
//! writes, one table rewrite (`ceil(M / 4096)` chunk writes into the idle
//! copy) and one frontend write. Other frontends are never rewritten.
//! Draining backends leave the table but stay in the backends map, so
//! tracked connections keep them; backends no frontend names are deleted.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
    /// A map operation failed.
    #[error("eBPF map {map}: {source}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// The error.
        source: MapError,
    },
    /// A spec the kernel program cannot take.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The kernel program handles IPv4 only.
    #[error("IPv6 frontend {0} not supported by the kernel program")]
    Ipv6(IpAddr),
    /// The crate was built without clang: there is no object to load.
    #[error("the eBPF object was not built (no clang at build time)")]
    NotBuilt,
    /// The object lacks a map or program this loader expects.
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map { map, source }
}

/// The program's per-CPU counters, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EbpfCounters {
    /// IPv4 TCP/UDP packets seen.
    pub packets: u64,
    /// New connections scheduled through a Maglev table.
    pub new_connections: u64,
    /// Packets of tracked connections (client to backend).
    pub tracked: u64,
    /// Reverse-NATed replies.
    pub replies: u64,
    /// TCP RSTs sent for frontends without backends (REJECT).
    pub reject_rst: u64,
    /// ICMP port unreachable sent for UDP to frontends without backends
    /// (REJECT).
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
    /// IPv4 fragments passed untouched.
    pub pass_fragment: u64,
}

const COUNTERS: u32 = 11;

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

type FeKey = [u8; 8];

/// How many written frontends name a backend id, and its address.
#[derive(Debug, Clone, Copy, Default)]
struct BackendUsers {
    addr: [u8; 6],
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
    fn value(&self) -> [u8; 8] {
        let mut v = [0u8; 8];
        v[..6].copy_from_slice(&self.addr);
        v[6] = u8::from(self.active == 0);
        v
    }
}

/// The loaded, attached eBPF dataplane. Dropping it detaches the program
/// and frees its maps.
pub struct EbpfDataplane {
    ebpf: Ebpf,
    frontends: HashMap<MapData, FeKey, [u32; 6]>,
    backends: HashMap<MapData, u32, [u8; 8]>,
    tables: HashMap<MapData, [u8; 8], [u32; TABLE_CHUNK as usize]>,
    ct: HashMap<MapData, [u8; 16], [u8; 24]>,
    counters: PerCpuArray<MapData, u64>,
    written: StdHashMap<FeKey, Written>,
    written_backends: StdHashMap<u32, [u8; 8]>,
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

fn key_of(vip: Ipv4Addr, port: u16, protocol: Protocol) -> FeKey {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&vip.octets());
    k[4..6].copy_from_slice(&port.to_be_bytes());
    k[6] = proto_number(protocol);
    k
}

fn fe_key(spec: &EbpfFrontendSpec) -> Result<FeKey, EbpfError> {
    let IpAddr::V4(v4) = spec.vip else {
        return Err(EbpfError::Ipv6(spec.vip));
    };
    Ok(key_of(v4, spec.port, spec.protocol))
}

fn table_key(fe_id: u32, version: u16, chunk: u16) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&fe_id.to_ne_bytes());
    k[4..6].copy_from_slice(&version.to_ne_bytes());
    k[6..].copy_from_slice(&chunk.to_ne_bytes());
    k
}

fn be_val(addr: SocketAddr, state: BackendState) -> Result<[u8; 8], EbpfError> {
    let IpAddr::V4(v4) = addr.ip() else {
        return Err(EbpfError::Ipv6(addr.ip()));
    };
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&v4.octets());
    v[4..6].copy_from_slice(&addr.port().to_be_bytes());
    v[6] = match state {
        BackendState::Active => 0,
        BackendState::Draining => 1,
    };
    Ok(v)
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
        let counters =
            PerCpuArray::try_from(take("svclb_counters")?).map_err(map_err("svclb_counters"))?;
        Ok(EbpfDataplane {
            ebpf,
            frontends,
            backends,
            tables,
            ct,
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
    /// [`EbpfError::Invalid`] / [`EbpfError::Ipv6`] for a spec the program
    /// cannot take (nothing is written then), [`EbpfError::Map`] when the
    /// kernel refuses a write (the maps may then be partly written; apply
    /// again).
    pub fn apply(&mut self, specs: &[EbpfFrontendSpec]) -> Result<ApplyStats, EbpfError> {
        let mut keep: HashSet<FeKey> = HashSet::with_capacity(specs.len());
        for spec in specs {
            keep.insert(fe_key(spec)?);
        }
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
        let mut keys = Vec::with_capacity(removed.len());
        for &(vip, port, protocol) in removed {
            let IpAddr::V4(v4) = vip else {
                // Never written: nothing to delete.
                continue;
            };
            keys.push(key_of(v4, port, protocol));
        }
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
            let key = fe_key(spec)?;
            for b in &spec.backends {
                be_val(b.addr, b.state)?;
            }
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
                let v = be_val(b.addr, b.state)?;
                let u = users.get_mut(&b.id).expect("touched");
                if u.count() > 0 && u.addr != v[..6] {
                    return Err(ValidationError::Invalid {
                        field: "backends.id".into(),
                        value: b.id.to_string(),
                        reason: "one backend id with two addresses",
                    }
                    .into());
                }
                u.addr.copy_from_slice(&v[..6]);
                u.add(b.state);
            }
        }
        // 1. Backends first, so no table names a backend the map lacks.
        for (&id, u) in &users {
            if u.count() == 0 {
                continue;
            }
            let v = u.value();
            if self.written_backends.get(&id) != Some(&v) {
                self.backends
                    .insert(id, v, 0)
                    .map_err(map_err("svclb_backends"))?;
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
            self.frontends
                .insert(key, val, 0)
                .map_err(map_err("svclb_frontends"))?;
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
            self.frontends
                .remove(&key)
                .map_err(map_err("svclb_frontends"))?;
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
            if self.written_backends.remove(&id).is_some() {
                self.backends
                    .remove(&id)
                    .map_err(map_err("svclb_backends"))?;
                stats.backend_writes += 1;
            }
        }
        Ok(stats)
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
        vip: Ipv4Addr,
        port: u16,
        protocol: Protocol,
    ) -> Option<&CompiledFrontend> {
        self.written
            .get(&key_of(vip, port, protocol))
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
        })
    }

    /// The connections in the kernel's conntrack map (expired ones too:
    /// compare [`TrackedConnection::expires_ns`] with `CLOCK_MONOTONIC`).
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn tracked(&self) -> Result<Vec<TrackedConnection>, EbpfError> {
        let mut out = Vec::new();
        for item in self.ct.iter() {
            let (k, v) = item.map_err(map_err("svclb_ct"))?;
            let ip = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            let u32_at = |i: usize| u32::from_ne_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
            out.push(TrackedConnection {
                protocol: if k[12] == 17 {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
                client: SocketAddr::from((ip(&k[0..4]), port(&k[8..10]))),
                frontend: SocketAddr::from((ip(&k[4..8]), port(&k[10..12]))),
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
            });
        }
        Ok(out)
    }
}
