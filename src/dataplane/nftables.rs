//! kube-proxy's nftables mode (Kubernetes 1.29+) as a data structure.
//!
//! `pkg/proxy/nftables/proxier.go` finds the service with one verdict map
//! keyed by `daddr . l4proto . dport` (a hash lookup, O(1) at any number of
//! services), then the service chain picks an endpoint with
//! `numgen random mod N vmap { 0 : goto ep0, ... }`: uniform, one 32-bit
//! draw, no 1/n cascade. ClientIP affinity is a dynamic set per endpoint
//! with a timeout that the endpoint chain's `update` refreshes; the service
//! chain checks the sets before `numgen`, which is the timer semantics of
//! svclb's affinity table. Connection tracking defaults to netfilter's
//! timeouts.
//!
//! The lookup structure is the same hash-of-virtual-services as
//! [`IpvsDataplane`] (a verdict map and an IPVS service table are both hash
//! tables of `VIP . proto . port`), with [`Numgen`](crate::scheduler::Numgen)
//! as the only scheduler: nftables mode has no scheduler choice.

use std::net::SocketAddr;

use super::{Candidates, Dataplane, DataplaneConfig, IpvsDataplane, IpvsReader, Mode};
use crate::affinity::{AffinityEntry, AffinityReport, AffinityTable};
use crate::conntrack::{TcpFlags, Tracked};
use crate::model::flow::{Flow, FragmentKey, Protocol, Verdict};
use crate::model::service::ServiceKey;
use crate::scheduler::{NumgenFactory, SchedulerConfig};
use crate::table::{ChangeSet, ServiceTable};
use crate::time::Instant;

/// The nftables-mode dataplane. See the module docs.
///
/// # Examples
/// ```
/// use svclb::*;
/// let dp = NftablesDataplane::new(DataplaneConfig::with_seed(3));
/// assert_eq!(dp.mode(), Mode::Nftables);
/// assert_eq!(dp.config().scheduler.name(), "numgen");
/// ```
#[derive(Debug)]
pub struct NftablesDataplane {
    inner: IpvsDataplane,
}

/// A per-thread reader of an [`NftablesDataplane`]: see
/// [`NftablesDataplane::reader`].
pub type NftablesReader = IpvsReader;

impl NftablesDataplane {
    /// An empty dataplane. The config's scheduler is replaced by `numgen`
    /// (nftables mode has no other).
    pub fn new(mut config: DataplaneConfig) -> Self {
        config.scheduler = SchedulerConfig::Custom(NumgenFactory::shared());
        NftablesDataplane {
            inner: IpvsDataplane::with_mode(config, Mode::Nftables),
        }
    }

    /// The config (its scheduler is always `numgen`).
    pub fn config(&self) -> &DataplaneConfig {
        self.inner.config()
    }

    /// The affinity table (the per-endpoint affinity sets, merged).
    pub fn affinity_table(&self) -> &AffinityTable {
        self.inner.affinity_table()
    }

    /// The number of `service-ips` verdict-map elements.
    pub fn map_element_count(&self) -> usize {
        self.inner.virtual_service_count()
    }

    /// A reader for one packet thread, as [`IpvsDataplane::reader`].
    pub fn reader(&self) -> NftablesReader {
        self.inner.reader()
    }

    /// The connection tracker, when tracking is on.
    pub fn conntrack(&self) -> Option<&crate::conntrack::Conntrack> {
        self.inner.conntrack()
    }
}

impl Dataplane for NftablesDataplane {
    fn mode(&self) -> Mode {
        Mode::Nftables
    }

    fn generation_gaps(&self) -> u64 {
        self.inner.generation_gaps()
    }

    fn sync(&self, table: &ServiceTable, changes: &ChangeSet, now: Instant) {
        self.inner.sync(table, changes, now);
    }

    #[inline]
    fn route_with_key(&self, flow: &Flow, key: Option<u64>, now: Instant) -> Verdict {
        self.inner.route_with_key(flow, key, now)
    }

    #[inline]
    fn packet(&self, flow: &Flow, flags: TcpFlags, now: Instant) -> Verdict {
        self.inner.packet(flow, flags, now)
    }

    fn route_excluding_with_key(
        &self,
        flow: &Flow,
        key: Option<u64>,
        exclude: &[crate::plan::BackendId],
        now: Instant,
    ) -> Verdict {
        self.inner.route_excluding_with_key(flow, key, exclude, now)
    }

    fn connection_closed(&self, flow: &Flow, now: Instant) -> Option<Tracked> {
        self.inner.connection_closed(flow, now)
    }

    fn reply(&self, reply: &Flow, flags: TcpFlags, now: Instant) -> Option<Tracked> {
        self.inner.reply(reply, flags, now)
    }

    fn peek_reply(&self, reply: &Flow, now: Instant) -> Option<Tracked> {
        self.inner.peek_reply(reply, now)
    }

    fn peek(&self, flow: &Flow, now: Instant) -> Option<Tracked> {
        self.inner.peek(flow, now)
    }

    fn first_fragment(&self, datagram: &FragmentKey, connection: &Flow, now: Instant) -> bool {
        self.inner.first_fragment(datagram, connection, now)
    }

    fn later_fragment(&self, datagram: &FragmentKey, now: Instant) -> Option<Tracked> {
        self.inner.later_fragment(datagram, now)
    }

    fn candidates(&self, protocol: Protocol, dst: SocketAddr) -> Candidates {
        self.inner.candidates(protocol, dst)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }

    fn handle_timeout(&self, now: Instant) {
        self.inner.handle_timeout(now);
    }

    fn connections(&self, now: Instant) -> Vec<Tracked> {
        self.inner.connections(now)
    }

    fn affinity_entries(&self, service: &ServiceKey, now: Instant) -> Vec<AffinityEntry> {
        self.inner.affinity_entries(service, now)
    }

    fn affinity_report(&self, service: &ServiceKey, now: Instant) -> Option<AffinityReport> {
        self.inner.affinity_report(service, now)
    }
}
