//! `table_ops`: arbitrary sequences of service and slice changes
//! interleaved with flows, run against iptables mode and IPVS mode (with a
//! scheduler chosen by the input).
//!
//! After every step it checks, against the naive model that the property
//! tests use (`tests/reference/mod.rs`):
//! - the table accepts exactly the batches the model accepts, and a refused
//!   batch leaves `ServiceTable::snapshot()` and the generation unchanged;
//! - the incrementally merged endpoints equal a merge recomputed from all
//!   slices;
//! - every dataplane's candidates (forward set, reject, drop,
//!   not-a-service) equal the model's for every VIP, port and protocol of
//!   the universe;
//! - a forwarded backend is a current endpoint of that service that may
//!   take new connections.
//!
//! Any violation panics, which libFuzzer reports as a crash.
#![no_main]

#[path = "../../tests/reference/mod.rs"]
mod reference;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use reference::*;
use svclb::{Dataplane, Flow, Instant, SchedulerKind, ServiceTable};

fn small(u: &mut Unstructured<'_>, n: u8) -> Result<u8> {
    Ok(u.arbitrary::<u8>()? % n)
}

fn opt_bool(u: &mut Unstructured<'_>) -> Result<Option<bool>> {
    Ok(match small(u, 3)? {
        0 => None,
        1 => Some(false),
        _ => Some(true),
    })
}

fn svc(u: &mut Unstructured<'_>) -> Result<SvcGen> {
    let n_ports = 1 + small(u, 3)?;
    let mut ports = Vec::new();
    for _ in 0..n_ports {
        ports.push(PortGen {
            port: small(u, 4)?,
            protocol: small(u, 3)?,
            target: small(u, 7)?,
        });
    }
    Ok(SvcGen {
        id: small(u, SERVICES)?,
        // Mostly the service's own VIP; sometimes another service's.
        vip: if small(u, 7)? == 0 {
            1 + small(u, VIPS - 1)?
        } else {
            0
        },
        family: small(u, 4)?,
        ports,
        local: u.arbitrary()?,
        affinity: if u.arbitrary()? {
            Some(u.int_in_range(0..=86_401)?)
        } else {
            None
        },
    })
}

fn slice(u: &mut Unstructured<'_>) -> Result<SliceGen> {
    let mut ports = Vec::new();
    for _ in 0..small(u, 3)? {
        ports.push(SlicePortGen {
            name: small(u, 4)?,
            port: small(u, 5)?,
            protocol: small(u, 3)?,
        });
    }
    let mut endpoints = Vec::new();
    for _ in 0..small(u, 7)? {
        endpoints.push(EpGen {
            host: small(u, HOSTS)?,
            ready: opt_bool(u)?,
            serving: opt_bool(u)?,
            terminating: opt_bool(u)?,
            node: small(u, 3)?,
            zone_hint: if u.arbitrary()? {
                Some(small(u, 2)?)
            } else {
                None
            },
            node_hint: if u.arbitrary()? {
                Some(small(u, 3)?)
            } else {
                None
            },
            weight: if small(u, 6)? == 0 {
                Some(small(u, 4)?)
            } else {
                None
            },
        });
    }
    Ok(SliceGen {
        name: small(u, SLICES)?,
        svc: small(u, SERVICES)?,
        v6: small(u, 4)? == 0,
        ports,
        endpoints,
    })
}

fn change(u: &mut Unstructured<'_>) -> Result<ChangeGen> {
    Ok(match small(u, 12)? {
        0..=2 => ChangeGen::UpsertService(svc(u)?),
        3 => ChangeGen::DeleteService(small(u, SERVICES)?),
        4..=9 => ChangeGen::UpsertSlice(slice(u)?),
        _ => ChangeGen::DeleteSlice(small(u, SLICES)?),
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let kind = SchedulerKind::ALL[usize::from(small(u, SchedulerKind::ALL.len() as u8)?)];
    let sh = matches!(
        kind,
        SchedulerKind::SourceHash | SchedulerKind::SourceHashPort
    );
    let dps: Vec<Box<dyn Dataplane>> = dataplanes(u.arbitrary()?, kind);
    let mut table = ServiceTable::new();
    let mut model = RefModel::default();
    let mut t = 0u64;
    while !u.is_empty() && t < 48 {
        t += 1;
        if small(u, 5)? < 2 {
            let mut batch = Vec::new();
            for _ in 0..1 + small(u, 3)? {
                batch.push(change(u)?);
            }
            if let Err(e) = step_batch(&mut table, &mut model, &dps, &batch) {
                panic!("step {t}: {e}");
            }
        } else {
            let (protocol, dst) = aim_flow(usize::from(u.arbitrary::<u8>()?), &model);
            let src = u.arbitrary::<u8>()?;
            let src = if dst.is_ipv6() {
                std::net::SocketAddr::new(format!("fd02::{src}").parse().unwrap(), 40_000)
            } else {
                std::net::SocketAddr::from(([10, 2, 0, src], 40_000))
            };
            let flow = Flow::new(protocol, src, dst);
            let close = u.arbitrary()?;
            if let Err(e) = step_flow(&model, &dps, sh, &flow, Instant::from_secs(t), close) {
                panic!("step {t}: {e}");
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
