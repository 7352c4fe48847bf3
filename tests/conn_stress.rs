//! Two packet threads and a churning writer: a tracked flow's packets never
//! go to another backend while its backend lives or drains. Bounded in
//! count and time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant as WallClock};

use svclb::*;

fn slice(ids: &[u8]) -> EndpointSlice {
    EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080))
        .endpoints(ids.iter().map(|i| EndpointSpec::new(format!("10.1.0.{i}"))))
        .build()
        .unwrap()
}

/// One packet thread's way into a dataplane.
type Reader = Box<dyn FnMut(&Flow, TcpFlags) -> Verdict + Send>;

fn run(dp: Arc<dyn Dataplane>, readers: Vec<Reader>) {
    let mut table = ServiceTable::new();
    let cs = table
        .apply_batch([
            Change::UpsertService(
                Service::builder("default", "web")
                    .cluster_ip("10.96.0.10".parse().unwrap())
                    .port(ServicePortSpec::tcp(80).target_port(8080))
                    .build()
                    .unwrap(),
            ),
            Change::UpsertSlice(slice(&[1, 2, 3, 4])),
        ])
        .unwrap();
    dp.sync(&table, &cs, Instant::ZERO);
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = WallClock::now() + Duration::from_millis(1500);
    let handles: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(t, mut route)| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut bad = Vec::new();
                let mut packets = 0u64;
                for round in 0..200u32 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // 64 connections per round, each opened, then 20 packets.
                    let flows: Vec<Flow> = (0..64u16)
                        .map(|k| {
                            Flow::tcp(
                                SocketAddr::from((
                                    [10, 2 + t as u8, round as u8, k as u8],
                                    30_000 + (round % 1000) as u16,
                                )),
                                "10.96.0.10:80".parse().unwrap(),
                            )
                        })
                        .collect();
                    let opened: Vec<Option<SocketAddr>> = flows
                        .iter()
                        .map(|f| route(f, TcpFlags::SYN).backend())
                        .collect();
                    // A flow whose backend went away for good (a Drop:
                    // expire_nodest_conn) may be balanced afresh after it.
                    let mut gone = vec![false; flows.len()];
                    for _ in 0..20 {
                        for (k, (f, b)) in flows.iter().zip(&opened).enumerate() {
                            let Some(b) = b else { continue };
                            let v = route(f, TcpFlags::ACK);
                            packets += 1;
                            if v == Verdict::Drop {
                                gone[k] = true;
                            }
                            if gone[k] {
                                continue;
                            }
                            // A backend that went before the flow was
                            // inserted is gone: its packet is dropped
                            // (expire_nodest_conn). Never another backend.
                            if v.backend().is_some_and(|nb| nb != *b) && bad.len() < 10 {
                                bad.push(format!("{f}: opened on {b}, then {v}"));
                            }
                        }
                    }
                }
                (bad, packets)
            })
        })
        .collect();
    // The writer: a new endpoint set every step, never empty.
    let mut step = 0u64;
    let sets: [&[u8]; 6] = [&[1, 2], &[2, 3, 4], &[4], &[1, 3], &[5, 6, 1], &[2, 5]];
    while WallClock::now() < deadline && step < 100_000 {
        let cs = table
            .apply(Change::UpsertSlice(slice(sets[(step % 6) as usize])))
            .unwrap();
        dp.sync(&table, &cs, Instant::ZERO);
        step += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for h in handles {
        let (bad, packets) = h.join().unwrap();
        assert!(bad.is_empty(), "{}: {bad:?}", dp.mode());
        total += packets;
    }
    assert!(step > 10, "the writer churned ({step} steps)");
    assert!(total > 1000, "the readers sent packets ({total})");
}

#[test]
fn tracked_flows_never_change_backend_under_churn() {
    // Grace long enough that no draining backend goes before its flows.
    let config = DataplaneConfig {
        drain_grace: Duration::from_secs(3600),
        ..DataplaneConfig::with_seed(9)
    };
    let ipvs = Arc::new(IpvsDataplane::new(config.clone()));
    let readers: Vec<Reader> = (0..2)
        .map(|_| {
            let mut r = ipvs.reader();
            Box::new(move |f: &Flow, fl: TcpFlags| r.packet(f, fl, Instant::ZERO)) as Box<_>
        })
        .collect();
    run(ipvs, readers);
    let ipt = Arc::new(IptablesDataplane::new(config.clone()));
    let readers: Vec<Reader> = (0..2)
        .map(|_| {
            let mut r = ipt.reader();
            Box::new(move |f: &Flow, fl: TcpFlags| r.packet(f, fl, Instant::ZERO)) as Box<_>
        })
        .collect();
    run(ipt, readers);
    let nft = Arc::new(NftablesDataplane::new(config));
    let readers: Vec<Reader> = (0..2)
        .map(|_| {
            let d = Arc::clone(&nft);
            Box::new(move |f: &Flow, fl: TcpFlags| d.packet(f, fl, Instant::ZERO)) as Box<_>
        })
        .collect();
    run(nft, readers);
}
