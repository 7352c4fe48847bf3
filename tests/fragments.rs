//! Later fragments through the connection layer: a datagram's first
//! fragment is recorded for its tracked connection
//! (`Dataplane::first_fragment`), and its later fragments (no ports)
//! follow that connection's backend (`Dataplane::later_fragment`), even
//! after the backend left the slice and drains; a later fragment whose
//! first was not seen, whose connection ended, or whose 30 s are up is
//! unroutable. In every mode, and through each mode's reader.

use std::net::SocketAddr;

use svclb::*;

const IPS: [&str; 3] = ["10.1.0.1", "10.1.0.2", "10.1.0.3"];

fn web() -> Service {
    Service::builder("default", "web")
        .cluster_ip("10.96.0.10".parse().unwrap())
        .port(ServicePortSpec::tcp(80).target_port(8080))
        .build()
        .unwrap()
}

fn slice(ips: &[&str]) -> EndpointSlice {
    EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080))
        .endpoints(ips.iter().map(|ip| EndpointSpec::new(*ip)))
        .build()
        .unwrap()
}

fn datagram(flow: &Flow, id: u32) -> FragmentKey {
    FragmentKey {
        src: flow.src.ip(),
        dst: flow.dst.ip(),
        id,
        protocol: flow.protocol,
    }
}

fn secs(s: u64) -> Instant {
    Instant::from_secs(s)
}

/// The fragment calls of a dataplane or of one of its readers.
trait Fragments {
    fn first(&self, key: &FragmentKey, conn: &Flow, now: Instant) -> bool;
    fn later(&self, key: &FragmentKey, now: Instant) -> Option<Tracked>;
}

struct Plane<'a>(&'a dyn Dataplane);
impl Fragments for Plane<'_> {
    fn first(&self, key: &FragmentKey, conn: &Flow, now: Instant) -> bool {
        self.0.first_fragment(key, conn, now)
    }
    fn later(&self, key: &FragmentKey, now: Instant) -> Option<Tracked> {
        self.0.later_fragment(key, now)
    }
}
impl Fragments for IptablesReader {
    fn first(&self, key: &FragmentKey, conn: &Flow, now: Instant) -> bool {
        self.first_fragment(key, conn, now)
    }
    fn later(&self, key: &FragmentKey, now: Instant) -> Option<Tracked> {
        self.later_fragment(key, now)
    }
}
impl Fragments for IpvsReader {
    fn first(&self, key: &FragmentKey, conn: &Flow, now: Instant) -> bool {
        self.first_fragment(key, conn, now)
    }
    fn later(&self, key: &FragmentKey, now: Instant) -> Option<Tracked> {
        self.later_fragment(key, now)
    }
}

/// One mode, driven through `via` (the dataplane itself or a reader).
fn check(dp: &dyn Dataplane, via: &dyn Fragments, table: &mut ServiceTable, name: &str) {
    dp.sync(table, &table.full_change_set(), Instant::ZERO);
    let flow = Flow::tcp(
        "10.2.0.9:40000".parse().unwrap(),
        "10.96.0.10:80".parse().unwrap(),
    );
    let first = datagram(&flow, 7);

    // A later fragment whose first was never seen: unroutable.
    assert_eq!(via.later(&first, secs(0)), None, "{name}");
    // Not tracked yet: nothing to record.
    assert!(!via.first(&first, &flow, secs(0)), "{name}");

    // The connection opens; a fragmented segment's first fragment is
    // routed (it carries the ports) and recorded.
    let b = dp.route(&flow, secs(0)).backend().unwrap();
    assert!(dp.packet(&flow, TcpFlags::ACK, secs(1)).is_tracked());
    assert!(via.first(&first, &flow, secs(1)), "{name}");
    let t = via.later(&first, secs(1)).unwrap();
    assert_eq!((t.flow, t.backend_addr), (flow, b), "{name}");

    // The backend leaves the slice: it drains, and the later fragments of
    // the datagram still follow it, while new connections avoid it.
    let keep: Vec<&str> = IPS
        .iter()
        .copied()
        .filter(|ip| b.ip().to_string() != *ip)
        .collect();
    let cs = table.apply(Change::UpsertSlice(slice(&keep))).unwrap();
    dp.sync(table, &cs, secs(2));
    let t = via.later(&first, secs(3)).unwrap();
    assert_eq!(
        t.backend_addr, b,
        "{name}: a later fragment left its backend"
    );
    for p in 0..30u16 {
        let g = Flow::tcp(SocketAddr::from(([10, 2, 0, 10], 41000 + p)), flow.dst);
        assert_ne!(dp.route(&g, secs(3)).backend(), Some(b), "{name}");
        dp.connection_closed(&g, secs(3));
    }
    // A second datagram of the same connection, recorded while draining.
    let second = datagram(&flow, 8);
    assert!(via.first(&second, &flow, secs(4)), "{name}");
    assert_eq!(via.later(&second, secs(4)).map(|t| t.backend_addr), Some(b));
    // Another datagram id, or another source: unroutable.
    assert_eq!(via.later(&datagram(&flow, 9), secs(4)), None, "{name}");
    let stranger = FragmentKey {
        src: "10.2.0.99".parse().unwrap(),
        ..first
    };
    assert_eq!(via.later(&stranger, secs(4)), None, "{name}");

    // IPv4 reassembly's 30 s: the first datagram's record is gone, the
    // second's is not yet.
    assert_eq!(via.later(&first, secs(31)), None, "{name}");
    assert!(via.later(&second, secs(31)).is_some(), "{name}");
    // The connection ends: its datagrams' fragments are unroutable.
    assert!(dp.connection_closed(&flow, secs(32)).is_some());
    assert_eq!(via.later(&second, secs(32)), None, "{name}");

    let cs = table.apply(Change::UpsertSlice(slice(&IPS))).unwrap();
    dp.sync(table, &cs, secs(40));
}

fn table() -> ServiceTable {
    let mut table = ServiceTable::new();
    table
        .apply_batch([
            Change::UpsertService(web()),
            Change::UpsertSlice(slice(&IPS)),
        ])
        .unwrap();
    table
}

#[test]
fn later_fragments_follow_their_connection_through_every_mode() {
    let c = DataplaneConfig::with_seed(3);
    let ipt = IptablesDataplane::new(c.clone());
    check(&ipt, &Plane(&ipt), &mut table(), "iptables");
    let nft = NftablesDataplane::new(c.clone());
    check(&nft, &Plane(&nft), &mut table(), "nftables");
    let ipvs = IpvsDataplane::new(c.clone());
    check(&ipvs, &Plane(&ipvs), &mut table(), "ipvs");

    let ipt = IptablesDataplane::new(c.clone());
    let r = ipt.reader();
    check(&ipt, &r, &mut table(), "iptables reader");
    let nft = NftablesDataplane::new(c.clone());
    let r = nft.reader();
    check(&nft, &r, &mut table(), "nftables reader");
    let ipvs = IpvsDataplane::new(c);
    let r = ipvs.reader();
    check(&ipvs, &r, &mut table(), "ipvs reader");
}

#[test]
fn without_tracking_nothing_is_recorded() {
    let dp = IptablesDataplane::new(DataplaneConfig::with_seed(3).conntrack(None));
    let table = table();
    dp.sync(&table, &table.full_change_set(), Instant::ZERO);
    let flow = Flow::tcp(
        "10.2.0.9:40000".parse().unwrap(),
        "10.96.0.10:80".parse().unwrap(),
    );
    assert!(dp.route(&flow, secs(0)).backend().is_some());
    assert!(!dp.first_fragment(&datagram(&flow, 1), &flow, secs(0)));
    assert_eq!(dp.later_fragment(&datagram(&flow, 1), secs(0)), None);
}
