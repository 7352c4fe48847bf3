//! The userspace model of the TC program: what it decides for a new
//! connection, computed without a kernel.
//!
//! The program, for a packet to a frontend (VIP, port, protocol) that no
//! tracked connection covers:
//! 1. hashes the 5-tuple with [`flow_hash`];
//! 2. if the frontend's table holds no backend, answers REJECT (TCP RST,
//!    ICMP port unreachable for UDP) when [`EbpfFrontendSpec::reject_when_empty`] is set, else DROP;
//! 3. else takes `table[hash % M]`, a backend id.
//!
//! The table is Maglev ([`crate::scheduler::maglev::build_table`], Katran's
//! hashes) over the **active** backends with a non-zero weight, in the
//! order the spec lists them; draining backends are left out of the table
//! but stay valid for tracked connections. [`choose`] is step 1 to 3.
//!
//! # Examples
//! ```
//! use svclb::ebpf::model::*;
//! use svclb::{Flow, Protocol};
//!
//! let spec = EbpfFrontendSpec {
//!     vip: "10.96.0.10".parse()?,
//!     port: 80,
//!     protocol: Protocol::Tcp,
//!     backends: vec![
//!         EbpfBackendSpec::active(1, "10.200.1.2:8080".parse()?),
//!         EbpfBackendSpec::active(2, "10.200.2.2:8080".parse()?),
//!     ],
//!     reject_when_empty: true,
//! };
//! let fe = CompiledFrontend::compile(&spec, 7, None)?;
//! let flow = Flow::tcp("10.200.0.2:40000".parse()?, "10.96.0.10:80".parse()?);
//! let id = choose(&fe, &flow).unwrap();
//! assert!(id == 1 || id == 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::net::{IpAddr, SocketAddr};

use crate::error::ValidationError;
use crate::model::flow::{Flow, Protocol};
use crate::scheduler::maglev::{
    MAGLEV_TABLE_SIZES, build_table, default_table_size, is_prime, murmur3_x64_64,
};

/// The seed of the flow hash (the C program's `FLOW_HASH_SEED`).
pub const FLOW_HASH_SEED: u32 = 0x9747_b28c;

/// The largest table the kernel program accepts (its table map holds
/// `MAX_TABLE_SIZE / TABLE_CHUNK` chunks per frontend and version).
pub const MAX_TABLE_SIZE: u32 = 131_071;

/// Slots per chunk of the kernel's lookup-table map (the C `TABLE_CHUNK`):
/// 1008 ids, so that a map element is exactly one page (the C file says why).
pub const TABLE_CHUNK: u32 = 1008;

/// A backend's state, as the kernel's backends map stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BackendState {
    /// Takes new connections: in the Maglev table.
    #[default]
    Active,
    /// Terminating: out of the table, still serves its tracked connections.
    Draining,
}

/// One backend of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EbpfBackendSpec {
    /// Stable backend id (the key of the kernel's backends map; not 0).
    pub id: u32,
    /// The backend's address (of the VIP's family).
    pub addr: SocketAddr,
    /// Maglev weight (0: no new connections).
    pub weight: u16,
    /// Active or draining.
    pub state: BackendState,
}

impl EbpfBackendSpec {
    /// An active backend of weight 1.
    pub fn active(id: u32, addr: SocketAddr) -> Self {
        EbpfBackendSpec {
            id,
            addr,
            weight: 1,
            state: BackendState::Active,
        }
    }

    /// A draining backend.
    pub fn draining(id: u32, addr: SocketAddr) -> Self {
        EbpfBackendSpec {
            state: BackendState::Draining,
            ..Self::active(id, addr)
        }
    }
}

/// One frontend (VIP, port, protocol) and its backends: what the loader
/// writes into the maps.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EbpfFrontendSpec {
    /// The virtual IP.
    pub vip: IpAddr,
    /// The virtual port.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The backends, in plan order (the Maglev turn order).
    pub backends: Vec<EbpfBackendSpec>,
    /// With no backend in the table: `true` rejects (kube-proxy's REJECT),
    /// `false` drops (a Local policy without local endpoints).
    pub reject_when_empty: bool,
}

/// A frontend compiled for the kernel: its id, table size and Maglev table
/// of backend ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledFrontend {
    id: u32,
    spec: EbpfFrontendSpec,
    table_size: u32,
    table: Vec<u32>,
}

impl CompiledFrontend {
    /// Compiles `spec` under frontend id `id`. The table size is
    /// `table_size` when given (a prime, 251..=131071), else
    /// [`default_table_size`] of the active backend count.
    ///
    /// # Errors
    /// [`ValidationError::Invalid`] for a non-prime or out-of-range table
    /// size, a backend id 0, two backends with one id, or a backend whose
    /// address family differs from the VIP's.
    pub fn compile(
        spec: &EbpfFrontendSpec,
        id: u32,
        table_size: Option<u32>,
    ) -> Result<Self, ValidationError> {
        let invalid = |field: &str, value: String, reason| ValidationError::Invalid {
            field: field.into(),
            value,
            reason,
        };
        let mut ids: Vec<u32> = spec.backends.iter().map(|b| b.id).collect();
        ids.sort_unstable();
        if ids.first() == Some(&0) {
            return Err(invalid(
                "backends.id",
                "0".into(),
                "backend id 0 is reserved",
            ));
        }
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(
                "backends.id",
                w[0].to_string(),
                "duplicate backend id",
            ));
        }
        if let Some(b) = spec
            .backends
            .iter()
            .find(|b| b.addr.is_ipv4() != spec.vip.is_ipv4())
        {
            return Err(invalid(
                "backends.addr",
                b.addr.to_string(),
                "address family differs from the VIP's",
            ));
        }
        let eligible: Vec<&EbpfBackendSpec> = spec
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Active && b.weight > 0)
            .collect();
        let m = match table_size {
            Some(m) => {
                if !is_prime(m) || !(MAGLEV_TABLE_SIZES[0]..=MAX_TABLE_SIZE).contains(&m) {
                    return Err(invalid(
                        "table_size",
                        m.to_string(),
                        "must be a prime in 251..=131071",
                    ));
                }
                m
            }
            None => default_table_size(eligible.len()),
        };
        let weighted: Vec<(SocketAddr, u32)> = eligible
            .iter()
            .map(|b| (b.addr, u32::from(b.weight)))
            .collect();
        let table = build_table(&weighted, m)
            .into_iter()
            .map(|i| eligible[i as usize].id)
            .collect();
        Ok(CompiledFrontend {
            id,
            spec: spec.clone(),
            table_size: m,
            table,
        })
    }

    /// The same frontend under another id (the table does not depend on it).
    pub fn with_id(mut self, id: u32) -> Self {
        self.id = id;
        self
    }

    /// The frontend id (the kernel's key for this frontend's table).
    pub fn id(&self) -> u32 {
        self.id
    }
    /// The spec it was compiled from.
    pub fn spec(&self) -> &EbpfFrontendSpec {
        &self.spec
    }
    /// The table size M (also when the table is empty).
    pub fn table_size(&self) -> u32 {
        self.table_size
    }
    /// The table: backend id per slot; empty when no backend is active.
    pub fn table(&self) -> &[u32] {
        &self.table
    }
    /// The number of distinct backends in the table (the kernel's
    /// `backend_count`).
    pub fn backend_count(&self) -> u32 {
        let mut ids: Vec<u32> = self.table.clone();
        ids.sort_unstable();
        ids.dedup();
        ids.len() as u32
    }
    /// A backend by id (active or draining).
    pub fn backend(&self, id: u32) -> Option<&EbpfBackendSpec> {
        self.spec.backends.iter().find(|b| b.id == id)
    }
}

fn proto_number(p: Protocol) -> u64 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn addr_word(ip: IpAddr, salt: u32) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let x = u128::from(v6);
            murmur3_x64_64((x >> 64) as u64, x as u64, salt)
        }
    }
}

/// The kernel program's 5-tuple hash:
/// `murmur3_x64_64(A, B, FLOW_HASH_SEED)` with, for IPv4,
/// `A = saddr << 32 | daddr` and `B = sport << 48 | dport << 32 | protocol`
/// (addresses and ports as host-order integers, protocol as its IP number).
/// IPv6 folds each address to 32 bits first: `murmur3_x64_64(hi, lo, 0)`
/// for the source and `(.., 1)` for the destination, truncated (`hi` and
/// `lo` the address's two big-endian halves), as the C program's
/// `flow_hash6` does.
pub fn flow_hash(flow: &Flow) -> u64 {
    let s = addr_word(flow.src.ip(), 0) & 0xffff_ffff;
    let d = addr_word(flow.dst.ip(), 1) & 0xffff_ffff;
    let a = (s << 32) | d;
    let b = (u64::from(flow.src.port()) << 48)
        | (u64::from(flow.dst.port()) << 32)
        | proto_number(flow.protocol);
    murmur3_x64_64(a, b, FLOW_HASH_SEED)
}

/// The backend id the kernel program picks for a new connection of `flow`
/// to `frontend`, or `None` when it rejects or drops (see
/// [`outcome`]). The caller has matched the frontend (VIP, port,
/// protocol) already.
#[inline]
pub fn choose(frontend: &CompiledFrontend, flow: &Flow) -> Option<u32> {
    if frontend.table.is_empty() {
        return None;
    }
    let slot = flow_hash(flow) % u64::from(frontend.table_size);
    Some(frontend.table[slot as usize])
}

/// What the kernel program does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EbpfVerdict {
    /// DNAT to this backend.
    Forward {
        /// The backend id.
        id: u32,
        /// Its address.
        addr: SocketAddr,
    },
    /// No backend, `reject_when_empty`: a TCP RST, or ICMP port
    /// unreachable for UDP.
    Reject,
    /// No backend, Local policy: dropped.
    Drop,
}

/// [`choose`], with the empty case told apart and the address resolved.
pub fn outcome(frontend: &CompiledFrontend, flow: &Flow) -> EbpfVerdict {
    match choose(frontend, flow) {
        Some(id) => EbpfVerdict::Forward {
            id,
            addr: frontend.backend(id).map_or(flow.dst, |b| b.addr),
        },
        None if frontend.spec.reject_when_empty => EbpfVerdict::Reject,
        None => EbpfVerdict::Drop,
    }
}

/// The spec of a plan frontend, as the map writer writes it: backend id
/// = the plan's [`BackendId`](crate::plan::BackendId) + 1 (the kernel
/// reserves 0; an id that would overflow is left out), active backends in
/// plan order with their weights (clamped to `u16`), then the draining ones;
/// a frontend that drops (a Local policy without local endpoints) drops
/// when empty, every other one rejects.
pub fn frontend_spec(fe: &crate::plan::Frontend) -> EbpfFrontendSpec {
    let key = fe.key();
    let id = |b: &crate::plan::PlanBackend| b.id().0.checked_add(1);
    let mut backends: Vec<EbpfBackendSpec> = Vec::new();
    for b in fe.backends() {
        if let Some(id) = id(b) {
            backends.push(EbpfBackendSpec {
                id,
                addr: b.addr(),
                weight: u16::try_from(b.weight()).unwrap_or(u16::MAX),
                state: BackendState::Active,
            });
        }
    }
    for b in fe.draining() {
        if let (Some(id), false) = (id(b), backends.iter().any(|x| x.addr == b.addr())) {
            backends.push(EbpfBackendSpec::draining(id, b.addr()));
        }
    }
    EbpfFrontendSpec {
        vip: key.addr,
        port: key.port,
        protocol: key.protocol,
        backends,
        reject_when_empty: fe.outcome() != crate::plan::Outcome::Drop,
    }
}

/// The kernel program's choice as a [`Scheduler`](crate::Scheduler): the
/// `ebpf` mode's userspace dataplane
/// ([`IpvsDataplane`](crate::IpvsDataplane)'s frontend table and the
/// connection layer, with this pick) decides every new connection as the
/// TC program does, so `svclb --mode ebpf route` prints the backend the
/// kernel will choose. Destinations become backends with id = backend id + 1,
/// as [`frontend_spec`] numbers them.
#[derive(Debug)]
pub struct KernelMaglev {
    frontend: Option<CompiledFrontend>,
}

impl crate::scheduler::Scheduler for KernelMaglev {
    fn pick(
        &self,
        dests: &[crate::scheduler::Destination],
        ctx: &crate::scheduler::PickContext<'_>,
    ) -> Option<usize> {
        let id = choose(self.frontend.as_ref()?, ctx.flow)?;
        dests
            .iter()
            .position(|d| d.id().0.checked_add(1) == Some(id))
    }
}

/// Builds [`KernelMaglev`] schedulers: `SchedulerConfig::Custom(KernelMaglevFactory::shared())`.
#[derive(Debug, Default)]
pub struct KernelMaglevFactory;

impl KernelMaglevFactory {
    /// The factory, shared.
    pub fn shared() -> std::sync::Arc<dyn crate::scheduler::SchedulerFactory> {
        std::sync::Arc::new(KernelMaglevFactory)
    }
}

impl crate::scheduler::SchedulerFactory for KernelMaglevFactory {
    fn name(&self) -> &str {
        "maglev-ebpf"
    }

    fn build(
        &self,
        dests: &[crate::scheduler::Destination],
    ) -> Box<dyn crate::scheduler::Scheduler> {
        // The table depends on the backends only; the VIP is a placeholder
        // of their family (the flow's own VIP goes into the hash).
        let frontend = dests.first().and_then(|first| {
            let vip = if first.addr().is_ipv4() {
                IpAddr::from([0, 0, 0, 0])
            } else {
                IpAddr::from([0u16; 8])
            };
            let spec = EbpfFrontendSpec {
                vip,
                port: 0,
                protocol: Protocol::Tcp,
                backends: dests
                    .iter()
                    .filter(|d| d.addr().is_ipv4() == vip.is_ipv4())
                    .filter_map(|d| {
                        Some(EbpfBackendSpec {
                            id: d.id().0.checked_add(1)?,
                            addr: d.addr(),
                            weight: u16::try_from(d.weight()).unwrap_or(u16::MAX),
                            state: BackendState::Active,
                        })
                    })
                    .collect(),
                reject_when_empty: true,
            };
            CompiledFrontend::compile(&spec, 0, None).ok()
        });
        Box::new(KernelMaglev { frontend })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: u32) -> EbpfFrontendSpec {
        EbpfFrontendSpec {
            vip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            backends: (1..=n)
                .map(|i| {
                    EbpfBackendSpec::active(i, SocketAddr::from(([10, 200, i as u8, 2], 8080)))
                })
                .collect(),
            reject_when_empty: true,
        }
    }

    fn flow(i: u16) -> Flow {
        Flow::tcp(
            SocketAddr::from(([10, 200, 0, 2], 30000 + i)),
            "10.96.0.10:80".parse().unwrap(),
        )
    }

    #[test]
    fn flow_hash_is_pinned() {
        // The C program computes the same; a change here breaks agreement.
        assert_eq!(flow_hash(&flow(0)), PINNED_HASH);
    }
    // From Python's mmh3.hash64 over the same 16 bytes, an independent implementation.
    const PINNED_HASH: u64 = 13_672_698_661_317_744_289;

    #[test]
    fn table_chunk_elements_are_one_page() {
        // A svclb_tables element: struct htab_elem (48 bytes on 64-bit), the
        // 8-byte key, the value, and the BPF allocator's 8-byte link; one
        // page, so kmalloc-4k serves it (see svclb_tables in the C file).
        assert_eq!(48 + 8 + TABLE_CHUNK as usize * 4 + 8, 4096);
        assert!(
            MAX_TABLE_SIZE.div_ceil(TABLE_CHUNK) <= 131,
            "the C MAX_CHUNKS"
        );
    }

    #[test]
    fn draining_backends_leave_the_table_only() {
        let mut s = spec(3);
        s.backends[1].state = BackendState::Draining;
        let fe = CompiledFrontend::compile(&s, 1, Some(251)).unwrap();
        assert!(fe.table().iter().all(|&id| id != 2));
        assert_eq!(fe.backend_count(), 2);
        assert!(fe.backend(2).is_some());
        let picks: Vec<_> = (0..200).map(|i| choose(&fe, &flow(i)).unwrap()).collect();
        assert!(picks.contains(&1) && picks.contains(&3));
    }

    #[test]
    fn empty_rejects_or_drops() {
        let mut s = spec(1);
        s.backends[0].state = BackendState::Draining;
        let fe = CompiledFrontend::compile(&s, 1, None).unwrap();
        assert_eq!(outcome(&fe, &flow(1)), EbpfVerdict::Reject);
        s.reject_when_empty = false;
        let fe = CompiledFrontend::compile(&s, 1, None).unwrap();
        assert_eq!(outcome(&fe, &flow(1)), EbpfVerdict::Drop);
        assert_eq!(fe.table_size(), 16381);
    }

    #[test]
    fn invalid_specs_are_refused() {
        let mut s = spec(2);
        assert!(CompiledFrontend::compile(&s, 1, Some(1000)).is_err());
        assert!(CompiledFrontend::compile(&s, 1, Some(262_139)).is_err());
        s.backends[1].id = 1;
        assert!(CompiledFrontend::compile(&s, 1, None).is_err());
        s.backends[1].id = 0;
        assert!(CompiledFrontend::compile(&s, 1, None).is_err());
        s.backends[1] = EbpfBackendSpec::active(5, "[fd00::1]:80".parse().unwrap());
        assert!(CompiledFrontend::compile(&s, 1, None).is_err());
    }

    #[test]
    fn table_is_the_maglev_table_of_the_active_backends() {
        let fe = CompiledFrontend::compile(&spec(3), 1, Some(251)).unwrap();
        let addrs: Vec<(SocketAddr, u32)> = spec(3).backends.iter().map(|b| (b.addr, 1)).collect();
        let idx = build_table(&addrs, 251);
        assert_eq!(
            fe.table(),
            idx.iter().map(|&i| i + 1).collect::<Vec<_>>().as_slice()
        );
    }
}
