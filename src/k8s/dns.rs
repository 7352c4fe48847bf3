//! The cluster DNS answers for services, as the Kubernetes DNS
//! specification (kubernetes/dns `docs/specification.md`, schema 1.0.1)
//! defines them, over a [`ServiceTable`].
//!
//! - `<svc>.<ns>.svc.<zone>`: a ClusterIP service answers with its cluster
//!   IP(s) (A for IPv4, AAAA for IPv6); a headless service with one record
//!   per *ready* endpoint address, and `NXDOMAIN` when it has none.
//! - `<hostname>.<svc>.<ns>.svc.<zone>` (headless services): the addresses
//!   of the ready endpoints with that `hostname` (StatefulSet pods). An
//!   endpoint without a hostname gets a system-assigned one, its first
//!   address with `.`/`:` replaced by `-` (`10-244-1-8`), the form CoreDNS
//!   uses; the spec leaves the form open.
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV, for each *named* port:
//!   a ClusterIP service gives one record targeting `<svc>.<ns>.svc.<zone>`
//!   with the service port; a headless service one per ready endpoint,
//!   targeting `<hostname>.<svc>.<ns>.svc.<zone>` with the endpoint's port.
//!   The spec leaves priority and weight open: every record has priority 0
//!   and an equal share of weight 100.
//! - `publishNotReadyAddresses: true` makes not-ready endpoints count as
//!   ready.
//! - Names compare case-insensitively; a trailing dot is optional. A name
//!   that exists but has no record of the asked type answers `NODATA`.
//!
//! # Examples
//! ```
//! use svclb::*;
//! use svclb::k8s::dns::{Answer, ClusterDns, RecordType};
//!
//! let mut table = ServiceTable::new();
//! let kafka = Service::builder("messaging", "kafka-headless")
//!     .headless()
//!     .port(ServicePortSpec::tcp(9092).name("kafka"))
//!     .build()?;
//! let slice = EndpointSlice::builder("messaging", "kafka-headless-abcde", "kafka-headless", AddressType::IPv4)
//!     .port(SlicePortSpec::tcp(9092).name("kafka"))
//!     .endpoint(EndpointSpec::new("10.244.1.8").hostname("kafka-0"))
//!     .build()?;
//! table.apply_batch([Change::UpsertService(kafka), Change::UpsertSlice(slice)])?;
//!
//! let dns = ClusterDns::default();
//! let answer = dns.resolve(&table, "kafka-0.kafka-headless.messaging.svc.cluster.local", RecordType::A)?;
//! assert_eq!(
//!     answer.to_string(),
//!     "kafka-0.kafka-headless.messaging.svc.cluster.local. 5 IN A 10.244.1.8"
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt;
use core::str::FromStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::model::endpoint_slice::{AddressType, Endpoint, EndpointAddress};
use crate::model::names::validate_dns_subdomain;
use crate::model::service::{Service, ServiceKey};
use crate::table::ServiceTable;
use crate::{EndpointInfo, ValidationError};

/// The default cluster domain.
pub const DEFAULT_ZONE: &str = "cluster.local";
/// The default TTL of the answers, in seconds (CoreDNS's `kubernetes`
/// plugin default).
pub const DEFAULT_TTL: u32 = 5;

/// A query type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordType {
    /// An IPv4 address.
    A,
    /// An IPv6 address.
    Aaaa,
    /// A service location (RFC 2782).
    Srv,
    /// An alias (the answer of an ExternalName service).
    Cname,
}

impl RecordType {
    /// `A`, `AAAA`, `SRV` or `CNAME`.
    pub const fn as_str(self) -> &'static str {
        match self {
            RecordType::A => "A",
            RecordType::Aaaa => "AAAA",
            RecordType::Srv => "SRV",
            RecordType::Cname => "CNAME",
        }
    }
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RecordType {
    type Err = ValidationError;

    /// `A`, `AAAA`, `SRV` or `CNAME`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            RecordType::A,
            RecordType::Aaaa,
            RecordType::Srv,
            RecordType::Cname,
        ]
        .into_iter()
        .find(|t| t.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| ValidationError::Invalid {
            field: "type".into(),
            value: s.into(),
            reason: "must be A, AAAA, SRV or CNAME",
        })
    }
}

/// The data of one record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RecordData {
    /// An A record.
    A(Ipv4Addr),
    /// An AAAA record.
    Aaaa(Ipv6Addr),
    /// An SRV record.
    Srv {
        /// Priority (lower is preferred).
        priority: u16,
        /// Relative weight among records of the same priority.
        weight: u16,
        /// The port.
        port: u16,
        /// The target host, fully qualified with a trailing dot.
        target: String,
    },
    /// A CNAME record: the canonical name, fully qualified with a trailing
    /// dot.
    Cname(String),
}

impl RecordData {
    /// The record's type.
    pub fn record_type(&self) -> RecordType {
        match self {
            RecordData::A(_) => RecordType::A,
            RecordData::Aaaa(_) => RecordType::Aaaa,
            RecordData::Srv { .. } => RecordType::Srv,
            RecordData::Cname(_) => RecordType::Cname,
        }
    }

    fn of_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => RecordData::A(v4),
            IpAddr::V6(v6) => RecordData::Aaaa(v6),
        }
    }
}

impl fmt::Display for RecordData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordData::A(ip) => write!(f, "{ip}"),
            RecordData::Aaaa(ip) => write!(f, "{ip}"),
            RecordData::Srv {
                priority,
                weight,
                port,
                target,
            } => write!(f, "{priority} {weight} {port} {target}"),
            RecordData::Cname(target) => f.write_str(target),
        }
    }
}

/// One resource record.
///
/// `Display` gives the zone-file line:
/// `kafka-0.kafka-headless.messaging.svc.cluster.local. 5 IN A 10.244.1.8`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    /// The owner name, fully qualified with a trailing dot.
    pub name: String,
    /// Time to live, in seconds.
    pub ttl: u32,
    /// The data.
    pub data: RecordData,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} IN {} {}",
            self.name,
            self.ttl,
            self.data.record_type(),
            self.data
        )
    }
}

/// The answer to one question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Answer {
    /// The records (never empty).
    Records(Vec<Record>),
    /// The name exists but has no record of the asked type.
    NoData,
    /// The name does not exist.
    NxDomain,
}

impl Answer {
    /// The records (empty for `NoData` and `NxDomain`).
    pub fn records(&self) -> &[Record] {
        match self {
            Answer::Records(r) => r,
            Answer::NoData | Answer::NxDomain => &[],
        }
    }
}

impl fmt::Display for Answer {
    /// One record per line, or `NODATA` / `NXDOMAIN`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Records(records) => {
                for (i, r) in records.iter().enumerate() {
                    if i > 0 {
                        f.write_str("\n")?;
                    }
                    write!(f, "{r}")?;
                }
                Ok(())
            }
            Answer::NoData => f.write_str("NODATA"),
            Answer::NxDomain => f.write_str("NXDOMAIN"),
        }
    }
}

/// A question the resolver does not answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The name is not under `svc.<zone>`.
    #[error("name {name:?} is not in the cluster zone svc.{zone}")]
    OutOfZone {
        /// The name asked.
        name: String,
        /// The configured zone.
        zone: String,
    },
    /// The name is malformed (an empty label).
    #[error("name {name:?} is malformed: {reason}")]
    InvalidName {
        /// The name asked.
        name: String,
        /// Why.
        reason: &'static str,
    },
}

/// The cluster DNS: a zone and a TTL; answers questions over a
/// [`ServiceTable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDns {
    zone: String,
    ttl: u32,
}

impl Default for ClusterDns {
    /// Zone `cluster.local`, TTL 5 s.
    fn default() -> Self {
        ClusterDns {
            zone: DEFAULT_ZONE.into(),
            ttl: DEFAULT_TTL,
        }
    }
}

/// The shape of a name under `svc.<zone>`.
enum Query<'a> {
    Service(ServiceKey),
    Host(&'a str, ServiceKey),
    Srv(&'a str, &'a str, ServiceKey),
    Unknown,
}

fn dashed(addr: &EndpointAddress) -> String {
    addr.to_string().replace(['.', ':'], "-")
}

fn counts(ep_ready: bool, svc: &Service) -> bool {
    ep_ready || svc.publish_not_ready_addresses()
}

impl ClusterDns {
    /// A resolver for `zone` (e.g. `cluster.local`; a trailing dot is
    /// dropped, case is ignored).
    ///
    /// # Errors
    /// [`ValidationError`] naming `zone` if it is not a DNS subdomain.
    pub fn new(zone: &str) -> Result<Self, ValidationError> {
        let zone = zone.trim_end_matches('.').to_ascii_lowercase();
        validate_dns_subdomain("zone", &zone)?;
        Ok(ClusterDns {
            zone,
            ttl: DEFAULT_TTL,
        })
    }

    /// Sets the TTL of the answers.
    #[must_use]
    pub fn with_ttl(mut self, ttl: u32) -> Self {
        self.ttl = ttl;
        self
    }

    /// The zone.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// `<svc>.<ns>.svc.<zone>.`: a service's fully qualified name.
    pub fn service_fqdn(&self, key: &ServiceKey) -> String {
        format!("{}.{}.svc.{}.", key.name, key.namespace, self.zone)
    }

    /// Answers `name` `qtype` from `table`.
    ///
    /// # Errors
    /// [`DnsError::OutOfZone`] for names not under `svc.<zone>`,
    /// [`DnsError::InvalidName`] for names with an empty label.
    pub fn resolve(
        &self,
        table: &ServiceTable,
        name: &str,
        qtype: RecordType,
    ) -> Result<Answer, DnsError> {
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        let suffix = format!(".svc.{}", self.zone);
        let Some(prefix) = lower.strip_suffix(&suffix) else {
            return Err(DnsError::OutOfZone {
                name: name.into(),
                zone: self.zone.clone(),
            });
        };
        let labels: Vec<&str> = prefix.split('.').collect();
        if labels.iter().any(|l| l.is_empty()) {
            return Err(DnsError::InvalidName {
                name: name.into(),
                reason: "empty label",
            });
        }
        let key = |svc: &str, ns: &str| ServiceKey::new(ns, svc);
        let query = match labels[..] {
            [svc, ns] => Query::Service(key(svc, ns)),
            [host, svc, ns] => Query::Host(host, key(svc, ns)),
            [port, proto, svc, ns] => match (port.strip_prefix('_'), proto.strip_prefix('_')) {
                (Some(port), Some(proto)) => Query::Srv(port, proto, key(svc, ns)),
                _ => Query::Unknown,
            },
            _ => Query::Unknown,
        };
        let owner = format!("{lower}.");
        Ok(self.answer(table, query, owner, qtype))
    }

    fn answer(
        &self,
        table: &ServiceTable,
        query: Query<'_>,
        owner: String,
        qtype: RecordType,
    ) -> Answer {
        let address_records = |ips: Vec<IpAddr>, owner: String| -> Answer {
            if ips.is_empty() {
                return Answer::NxDomain;
            }
            let records: Vec<Record> = ips
                .into_iter()
                .map(RecordData::of_ip)
                .filter(|d| d.record_type() == qtype)
                .map(|data| Record {
                    name: owner.clone(),
                    ttl: self.ttl,
                    data,
                })
                .collect();
            if records.is_empty() {
                Answer::NoData
            } else {
                Answer::Records(records)
            }
        };
        match query {
            Query::Unknown => Answer::NxDomain,
            Query::Service(key) => {
                let Some(svc) = table.service(&key) else {
                    return Answer::NxDomain;
                };
                // An ExternalName service is a CNAME to its externalName,
                // whatever the type asked (DNS specification 2.4; the
                // resolver follows the alias).
                if let Some(target) = svc.external_name() {
                    return Answer::Records(vec![Record {
                        name: owner,
                        ttl: self.ttl,
                        data: RecordData::Cname(format!("{target}.")),
                    }]);
                }
                let ips = if svc.is_headless() {
                    endpoint_ips(table, svc, |_| true)
                } else {
                    svc.cluster_ip().addrs().to_vec()
                };
                address_records(ips, owner)
            }
            Query::Host(host, key) => {
                let Some(svc) = table.service(&key).filter(|s| s.is_headless()) else {
                    return Answer::NxDomain;
                };
                let ips = endpoint_ips(table, svc, |ep| match ep.hostname() {
                    Some(h) => h == host,
                    None => dashed(ep.address()) == host,
                });
                address_records(ips, owner)
            }
            Query::Srv(port_name, proto, key) => {
                let Some(svc) = table.service(&key).filter(|s| s.external_name().is_none()) else {
                    return Answer::NxDomain;
                };
                let Some(port) = svc
                    .ports()
                    .iter()
                    .find(|p| p.name() == Some(port_name) && p.protocol().as_lower_str() == proto)
                else {
                    return Answer::NxDomain;
                };
                let mut targets: Vec<(String, u16)> = if svc.is_headless() {
                    let endpoints = table.view(&key).and_then(|v| {
                        v.ports()
                            .iter()
                            .find(|pv| pv.port() == port)
                            .map(|pv| pv.endpoints().to_vec())
                    });
                    let mut t: Vec<(String, u16)> = endpoints
                        .iter()
                        .flat_map(|eps| eps.iter())
                        .filter(|ep| counts(ep.is_ready(), svc))
                        .map(|ep| (self.endpoint_fqdn(ep, &key), ep.addr().port()))
                        .collect();
                    t.sort();
                    t.dedup();
                    t
                } else {
                    vec![(self.service_fqdn(&key), port.port())]
                };
                if targets.is_empty() {
                    return Answer::NxDomain;
                }
                if qtype != RecordType::Srv {
                    return Answer::NoData;
                }
                let weight = (100 / targets.len()).max(1) as u16;
                Answer::Records(
                    targets
                        .drain(..)
                        .map(|(target, port)| Record {
                            name: owner.clone(),
                            ttl: self.ttl,
                            data: RecordData::Srv {
                                priority: 0,
                                weight,
                                port,
                                target,
                            },
                        })
                        .collect(),
                )
            }
        }
    }

    fn endpoint_fqdn(&self, ep: &EndpointInfo, key: &ServiceKey) -> String {
        let host = match ep.hostname() {
            Some(h) => h.to_owned(),
            None => dashed(&EndpointAddress::Ip(ep.addr().ip())),
        };
        format!("{host}.{}", self.service_fqdn(key))
    }
}

/// The addresses of the service's endpoints that count as ready and pass
/// `select`, sorted and without duplicates (an endpoint may sit in two
/// slices).
fn endpoint_ips(
    table: &ServiceTable,
    svc: &Service,
    select: impl Fn(&Endpoint) -> bool,
) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = table
        .slices_of(svc.key())
        .filter(|s| s.address_type() != AddressType::Fqdn)
        .flat_map(|s| s.endpoints().iter())
        .filter(|ep| counts(ep.conditions().is_ready(), svc) && select(ep))
        .flat_map(|ep| ep.addresses().iter().filter_map(EndpointAddress::ip))
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    fn kafka_table(publish: bool) -> ServiceTable {
        let mut t = ServiceTable::new();
        let svc = Service::builder("messaging", "kafka-headless")
            .headless()
            .port(ServicePortSpec::tcp(9092).name("kafka"))
            .port(ServicePortSpec::tcp(9093).name("controller"))
            .publish_not_ready_addresses(publish)
            .build()
            .unwrap();
        let slice = EndpointSlice::builder(
            "messaging",
            "kafka-headless-7xk2p",
            "kafka-headless",
            AddressType::IPv4,
        )
        .port(SlicePortSpec::tcp(9092).name("kafka"))
        .port(SlicePortSpec::tcp(9093).name("controller"))
        .endpoint(EndpointSpec::new("10.244.1.8").hostname("kafka-0"))
        .endpoint(EndpointSpec::new("10.244.2.9").hostname("kafka-1"))
        .endpoint(
            EndpointSpec::new("10.244.3.10")
                .hostname("kafka-2")
                .ready(false),
        )
        .build()
        .unwrap();
        let web = Service::builder("default", "web")
            .cluster_ip("10.96.0.10".parse().unwrap())
            .cluster_ip("fd00::10".parse().unwrap())
            .port(ServicePortSpec::tcp(80).name("http"))
            .port(ServicePortSpec::udp(81).name("metrics"))
            .build()
            .unwrap();
        t.apply_batch([
            Change::UpsertService(svc),
            Change::UpsertSlice(slice),
            Change::UpsertService(web),
        ])
        .unwrap();
        t
    }

    fn lines(t: &ServiceTable, name: &str, ty: RecordType) -> Vec<String> {
        ClusterDns::default()
            .resolve(t, name, ty)
            .unwrap()
            .records()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn external_name_answers_cname_and_other_families_no_data() {
        let mut t = ServiceTable::new();
        let db = crate::Service::builder("prod", "db")
            .service_type(crate::ServiceType::ExternalName)
            .external_name("db.example.com.")
            .build()
            .unwrap();
        let v4 = crate::Service::builder("prod", "web")
            .cluster_ip("10.96.0.5".parse().unwrap())
            .port(crate::ServicePortSpec::tcp(80))
            .build()
            .unwrap();
        t.apply_batch([
            crate::Change::UpsertService(db),
            crate::Change::UpsertService(v4),
        ])
        .unwrap();
        let dns = ClusterDns::new("cluster.local").unwrap();
        for q in [RecordType::A, RecordType::Aaaa, RecordType::Cname] {
            let a = dns.resolve(&t, "db.prod.svc.cluster.local", q).unwrap();
            assert_eq!(
                a.to_string(),
                "db.prod.svc.cluster.local. 5 IN CNAME db.example.com."
            );
        }
        // An IPv4-only service: AAAA is an empty answer, not a wrong one.
        assert_eq!(
            dns.resolve(&t, "web.prod.svc.cluster.local", RecordType::Aaaa),
            Ok(Answer::NoData)
        );
        assert_eq!(
            dns.resolve(&t, "_http._tcp.db.prod.svc.cluster.local", RecordType::Srv),
            Ok(Answer::NxDomain)
        );
    }

    #[test]
    fn headless_service_answers_ready_endpoints() {
        let t = kafka_table(false);
        assert_eq!(
            lines(
                &t,
                "kafka-headless.messaging.svc.cluster.local",
                RecordType::A
            ),
            [
                "kafka-headless.messaging.svc.cluster.local. 5 IN A 10.244.1.8",
                "kafka-headless.messaging.svc.cluster.local. 5 IN A 10.244.2.9",
            ]
        );
        assert_eq!(
            lines(
                &t,
                "KAFKA-0.kafka-headless.messaging.svc.cluster.local.",
                RecordType::A
            ),
            ["kafka-0.kafka-headless.messaging.svc.cluster.local. 5 IN A 10.244.1.8"]
        );
        let dns = ClusterDns::default();
        // kafka-2 is not ready.
        assert_eq!(
            dns.resolve(
                &t,
                "kafka-2.kafka-headless.messaging.svc.cluster.local",
                RecordType::A
            ),
            Ok(Answer::NxDomain)
        );
        assert_eq!(
            dns.resolve(
                &t,
                "kafka-headless.messaging.svc.cluster.local",
                RecordType::Aaaa
            ),
            Ok(Answer::NoData)
        );
        assert_eq!(
            lines(
                &t,
                "_kafka._tcp.kafka-headless.messaging.svc.cluster.local",
                RecordType::Srv
            ),
            [
                "_kafka._tcp.kafka-headless.messaging.svc.cluster.local. 5 IN SRV 0 50 9092 kafka-0.kafka-headless.messaging.svc.cluster.local.",
                "_kafka._tcp.kafka-headless.messaging.svc.cluster.local. 5 IN SRV 0 50 9092 kafka-1.kafka-headless.messaging.svc.cluster.local.",
            ]
        );
        assert_eq!(
            dns.resolve(
                &t,
                "_kafka._udp.kafka-headless.messaging.svc.cluster.local",
                RecordType::Srv
            ),
            Ok(Answer::NxDomain)
        );
    }

    #[test]
    fn publish_not_ready_addresses_counts_every_endpoint() {
        let t = kafka_table(true);
        assert_eq!(
            lines(
                &t,
                "kafka-2.kafka-headless.messaging.svc.cluster.local",
                RecordType::A
            ),
            ["kafka-2.kafka-headless.messaging.svc.cluster.local. 5 IN A 10.244.3.10"]
        );
        assert_eq!(
            lines(
                &t,
                "kafka-headless.messaging.svc.cluster.local",
                RecordType::A
            )
            .len(),
            3
        );
        assert_eq!(
            lines(
                &t,
                "_controller._tcp.kafka-headless.messaging.svc.cluster.local",
                RecordType::Srv
            )
            .len(),
            3
        );
    }

    #[test]
    fn headless_without_ready_endpoints_is_nxdomain() {
        let mut t = ServiceTable::new();
        let svc = Service::builder("db", "pg").headless().build().unwrap();
        t.apply(Change::UpsertService(svc)).unwrap();
        let dns = ClusterDns::new("example.org.").unwrap();
        assert_eq!(
            dns.resolve(&t, "pg.db.svc.example.org", RecordType::A),
            Ok(Answer::NxDomain)
        );
        let slice = EndpointSlice::builder("db", "pg-1", "pg", AddressType::IPv4)
            .endpoint(EndpointSpec::new("10.0.0.1").ready(false))
            .endpoint(EndpointSpec::new("10.0.0.2"))
            .build()
            .unwrap();
        t.apply(Change::UpsertSlice(slice)).unwrap();
        // Endpoints without hostnames get a dashed-address name.
        assert_eq!(
            dns.resolve(&t, "10-0-0-2.pg.db.svc.example.org", RecordType::A)
                .unwrap()
                .to_string(),
            "10-0-0-2.pg.db.svc.example.org. 5 IN A 10.0.0.2"
        );
        assert_eq!(
            dns.resolve(&t, "10-0-0-1.pg.db.svc.example.org", RecordType::A),
            Ok(Answer::NxDomain)
        );
    }

    #[test]
    fn dual_stack_headless_answers_each_family_from_its_slice() {
        let mut t = ServiceTable::new();
        let svc = Service::builder("db", "pg").headless().build().unwrap();
        let v4 = EndpointSlice::builder("db", "pg-v4", "pg", AddressType::IPv4)
            .endpoint(EndpointSpec::new("10.0.0.1").hostname("pg-0"))
            .build()
            .unwrap();
        let v6 = EndpointSlice::builder("db", "pg-v6", "pg", AddressType::IPv6)
            .endpoint(EndpointSpec::new("fd00::1").hostname("pg-0"))
            .build()
            .unwrap();
        t.apply_batch([
            Change::UpsertService(svc),
            Change::UpsertSlice(v4),
            Change::UpsertSlice(v6),
        ])
        .unwrap();
        assert_eq!(
            lines(&t, "pg-0.pg.db.svc.cluster.local", RecordType::A),
            ["pg-0.pg.db.svc.cluster.local. 5 IN A 10.0.0.1"]
        );
        assert_eq!(
            lines(&t, "pg.db.svc.cluster.local", RecordType::Aaaa),
            ["pg.db.svc.cluster.local. 5 IN AAAA fd00::1"]
        );
    }

    #[test]
    fn cluster_ip_service_answers_its_vip() {
        let t = kafka_table(false);
        assert_eq!(
            lines(&t, "web.default.svc.cluster.local", RecordType::A),
            ["web.default.svc.cluster.local. 5 IN A 10.96.0.10"]
        );
        assert_eq!(
            lines(&t, "web.default.svc.cluster.local", RecordType::Aaaa),
            ["web.default.svc.cluster.local. 5 IN AAAA fd00::10"]
        );
        assert_eq!(
            lines(
                &t,
                "_http._tcp.web.default.svc.cluster.local",
                RecordType::Srv
            ),
            [
                "_http._tcp.web.default.svc.cluster.local. 5 IN SRV 0 100 80 web.default.svc.cluster.local."
            ]
        );
        let dns = ClusterDns::default();
        // No hostname records for a ClusterIP service; unknown names.
        for name in [
            "x.web.default.svc.cluster.local",
            "nope.default.svc.cluster.local",
            "a.b.c.d.e.svc.cluster.local",
        ] {
            assert_eq!(
                dns.resolve(&t, name, RecordType::A),
                Ok(Answer::NxDomain),
                "{name}"
            );
        }
        assert_eq!(
            dns.resolve(&t, "web.default.svc.cluster.local", RecordType::Srv),
            Ok(Answer::NoData)
        );
        assert!(matches!(
            dns.resolve(&t, "web.default.svc.example.com", RecordType::A),
            Err(DnsError::OutOfZone { .. })
        ));
        assert!(matches!(
            dns.resolve(&t, "web..svc.cluster.local", RecordType::A),
            Err(DnsError::InvalidName { .. })
        ));
        assert!(ClusterDns::new("bad zone").is_err());
        assert_eq!("aaaa".parse::<RecordType>(), Ok(RecordType::Aaaa));
        assert_eq!("MX".parse::<RecordType>().unwrap_err().field(), "type");
    }
}
