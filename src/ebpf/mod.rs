//! The eBPF dataplane: a TC program in C (`svclb.bpf.c`), its map layout,
//! the userspace [`model`] of what it decides, and (feature `ebpf`) the aya
//! [`loader`].
//!
//! [`model`] needs no kernel and no feature: [`model::choose`] computes, for
//! a new connection, exactly the backend the kernel program picks (the
//! same 5-tuple hash, the same Maglev table, the same fallback), so a caller
//! can predict the kernel flow by flow.
//!
//! The kernel program handles IPv4 and IPv6 TCP and UDP (IPv6 in maps of
//! its own, with the model's IPv6 flow hash), ICMP and ICMPv6 errors about
//! its flows (NATed with their quotes, both directions), IP fragments (a
//! later fragment follows the ports its first fragment recorded) and up to
//! 4 IPv6 extension headers; other protocols pass untouched.

pub mod model;

#[cfg(feature = "ebpf")]
pub mod loader;

pub use model::{
    BackendState, CompiledFrontend, EbpfBackendSpec, EbpfFrontendSpec, EbpfVerdict, choose,
    flow_hash,
};

#[cfg(feature = "ebpf")]
pub use loader::{
    ApplyStats, EbpfCounters, EbpfDataplane, EbpfError, TestRunOutcome, TrackedConnection,
};
