//! EndpointSlices: endpoints, their conditions and topology hints.

use core::fmt;
use std::net::IpAddr;

use smallvec::SmallVec;

use crate::error::ValidationError;
use crate::model::flow::Protocol;
use crate::model::names::{validate_dns_label, validate_dns_subdomain, validate_port};
use crate::model::service::ServiceKey;

/// The most endpoints the API accepts in one slice.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;
/// The most ports the API accepts in one slice.
pub const MAX_PORTS_PER_SLICE: usize = 100;
/// The most addresses the API accepts on one endpoint.
pub const MAX_ADDRESSES_PER_ENDPOINT: usize = 100;
/// The most zone or node hints the API accepts on one endpoint.
pub const MAX_HINTS_PER_ENDPOINT: usize = 8;

/// An EndpointSlice's identity: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceKey {
    /// The namespace (the same as the owning service's).
    pub namespace: String,
    /// The slice name.
    pub name: String,
}

impl SliceKey {
    /// A key from its two parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        SliceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for SliceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `addressType` of a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum AddressType {
    /// IPv4 addresses.
    IPv4,
    /// IPv6 addresses.
    IPv6,
    /// Fully qualified domain names (kube-proxy ignores these slices).
    #[cfg_attr(feature = "serde", serde(rename = "FQDN"))]
    Fqdn,
}

impl AddressType {
    /// The API spelling: `IPv4`, `IPv6`, `FQDN`.
    pub const fn as_api_str(self) -> &'static str {
        match self {
            AddressType::IPv4 => "IPv4",
            AddressType::IPv6 => "IPv6",
            AddressType::Fqdn => "FQDN",
        }
    }
}

/// An endpoint address: an IP, or a name in an FQDN slice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddress {
    /// An IP address.
    Ip(IpAddr),
    /// A domain name.
    Fqdn(String),
}

impl EndpointAddress {
    /// The IP, if this is one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            EndpointAddress::Ip(ip) => Some(*ip),
            EndpointAddress::Fqdn(_) => None,
        }
    }
}

impl fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointAddress::Ip(ip) => write!(f, "{ip}"),
            EndpointAddress::Fqdn(s) => f.write_str(s),
        }
    }
}

/// `endpoints[].conditions`, as given (absent values stay `None`).
///
/// The accessors apply kube-proxy's reading: absent `ready` or `serving`
/// means true, absent `terminating` means false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Conditions {
    /// `ready`.
    #[cfg_attr(
        feature = "serde",
        serde(skip_serializing_if = "Option::is_none", default)
    )]
    pub ready: Option<bool>,
    /// `serving`.
    #[cfg_attr(
        feature = "serde",
        serde(skip_serializing_if = "Option::is_none", default)
    )]
    pub serving: Option<bool>,
    /// `terminating`.
    #[cfg_attr(
        feature = "serde",
        serde(skip_serializing_if = "Option::is_none", default)
    )]
    pub terminating: Option<bool>,
}

impl Conditions {
    /// Ready (absent = true).
    pub fn is_ready(&self) -> bool {
        self.ready.unwrap_or(true)
    }
    /// Serving (absent = true).
    pub fn is_serving(&self) -> bool {
        self.serving.unwrap_or(true)
    }
    /// Terminating (absent = false).
    pub fn is_terminating(&self) -> bool {
        self.terminating.unwrap_or(false)
    }
}

/// An unvalidated slice port, as [`EndpointSliceBuilder::port`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePortSpec {
    /// The name, matching a service port's name (empty for an unnamed port).
    pub name: Option<String>,
    /// The port number; `None` or 0 means "no port" and is ignored.
    pub port: Option<i64>,
    /// The protocol.
    pub protocol: Protocol,
}

impl SlicePortSpec {
    /// A port with the given protocol and number.
    pub fn new(protocol: Protocol, port: i64) -> Self {
        SlicePortSpec {
            name: None,
            port: Some(port),
            protocol,
        }
    }
    /// A TCP port.
    pub fn tcp(port: i64) -> Self {
        Self::new(Protocol::Tcp, port)
    }
    /// A UDP port.
    pub fn udp(port: i64) -> Self {
        Self::new(Protocol::Udp, port)
    }
    /// Sets the name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// A validated slice port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlicePort {
    name: String,
    port: Option<u16>,
    protocol: Protocol,
}

impl SlicePort {
    /// The name (`""` for an unnamed port).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The port number, if one was given.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
    /// The protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }
}

/// An unvalidated endpoint, as [`EndpointSliceBuilder::endpoint`] takes it.
///
/// # Examples
/// ```
/// use svclb::EndpointSpec;
/// let e = EndpointSpec::new("10.0.0.5").ready(true).node("node-a").zone("zone-a").hint_zone("zone-a");
/// assert_eq!(e.addresses, vec!["10.0.0.5".to_string()]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointSpec {
    /// The addresses (kube-proxy uses the first).
    pub addresses: Vec<String>,
    /// The conditions.
    pub conditions: Conditions,
    /// `hostname` (StatefulSet pods).
    pub hostname: Option<String>,
    /// `nodeName`.
    pub node_name: Option<String>,
    /// `zone`.
    pub zone: Option<String>,
    /// `hints.forZones[].name`.
    pub hint_zones: Vec<String>,
    /// `hints.forNodes[].name`.
    pub hint_nodes: Vec<String>,
    /// An IPVS-style weight (a svclb extension; Kubernetes has none). `None` = 1.
    pub weight: Option<i64>,
}

impl EndpointSpec {
    /// An endpoint with one address and no conditions set (so: ready).
    pub fn new(address: impl Into<String>) -> Self {
        EndpointSpec {
            addresses: vec![address.into()],
            ..Default::default()
        }
    }
    /// Sets `conditions.ready`.
    pub fn ready(mut self, ready: bool) -> Self {
        self.conditions.ready = Some(ready);
        self
    }
    /// Sets `conditions.serving`.
    pub fn serving(mut self, serving: bool) -> Self {
        self.conditions.serving = Some(serving);
        self
    }
    /// Sets `conditions.terminating`.
    pub fn terminating(mut self, terminating: bool) -> Self {
        self.conditions.terminating = Some(terminating);
        self
    }
    /// Sets `hostname`.
    pub fn hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = Some(hostname.into());
        self
    }
    /// Sets `nodeName`.
    pub fn node(mut self, node: impl Into<String>) -> Self {
        self.node_name = Some(node.into());
        self
    }
    /// Sets `zone`.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }
    /// Adds a zone hint.
    pub fn hint_zone(mut self, zone: impl Into<String>) -> Self {
        self.hint_zones.push(zone.into());
        self
    }
    /// Adds a node hint.
    pub fn hint_node(mut self, node: impl Into<String>) -> Self {
        self.hint_nodes.push(node.into());
        self
    }
    /// Sets the weight (0 = takes no new connections).
    pub fn weight(mut self, weight: i64) -> Self {
        self.weight = Some(weight);
        self
    }
}

/// A validated endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    addresses: SmallVec<[EndpointAddress; 1]>,
    conditions: Conditions,
    hostname: Option<String>,
    node_name: Option<String>,
    zone: Option<String>,
    hint_zones: SmallVec<[String; 1]>,
    hint_nodes: SmallVec<[String; 1]>,
    weight: u16,
}

impl Endpoint {
    /// All addresses.
    pub fn addresses(&self) -> &[EndpointAddress] {
        &self.addresses
    }
    /// The first address, the one kube-proxy uses.
    pub fn address(&self) -> &EndpointAddress {
        &self.addresses[0]
    }
    /// The conditions as given.
    pub fn conditions(&self) -> Conditions {
        self.conditions
    }
    /// `hostname`.
    pub fn hostname(&self) -> Option<&str> {
        self.hostname.as_deref()
    }
    /// `nodeName`.
    pub fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }
    /// `zone`.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }
    /// Zone hints.
    pub fn hint_zones(&self) -> &[String] {
        &self.hint_zones
    }
    /// Node hints.
    pub fn hint_nodes(&self) -> &[String] {
        &self.hint_nodes
    }
    /// The weight (1 unless set).
    pub fn weight(&self) -> u16 {
        self.weight
    }
}

/// A validated `discovery.k8s.io/v1` EndpointSlice.
///
/// # Examples
/// ```
/// use svclb::{AddressType, EndpointSlice, EndpointSpec, SlicePortSpec};
/// let slice = EndpointSlice::builder("default", "web-abc12", "web", AddressType::IPv4)
///     .port(SlicePortSpec::tcp(8080).name("http"))
///     .endpoint(EndpointSpec::new("10.0.0.5").node("node-a"))
///     .build()
///     .unwrap();
/// assert_eq!(slice.endpoints().len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    key: SliceKey,
    service: ServiceKey,
    address_type: AddressType,
    ports: SmallVec<[SlicePort; 2]>,
    endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    /// Starts building slice `namespace/name` for service `namespace/service`.
    pub fn builder(
        namespace: impl Into<String>,
        name: impl Into<String>,
        service: impl Into<String>,
        address_type: AddressType,
    ) -> EndpointSliceBuilder {
        EndpointSliceBuilder {
            namespace: namespace.into(),
            name: name.into(),
            service: service.into(),
            address_type,
            ports: Vec::new(),
            endpoints: Vec::new(),
        }
    }
    /// `namespace/name` of the slice.
    pub fn key(&self) -> &SliceKey {
        &self.key
    }
    /// The owning service (label `kubernetes.io/service-name`).
    pub fn service(&self) -> &ServiceKey {
        &self.service
    }
    /// `addressType`.
    pub fn address_type(&self) -> AddressType {
        self.address_type
    }
    /// `ports`.
    pub fn ports(&self) -> &[SlicePort] {
        &self.ports
    }
    /// `endpoints`.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }
}

/// Builds an [`EndpointSlice`], validating on [`EndpointSliceBuilder::build`].
#[derive(Debug, Clone)]
#[must_use]
pub struct EndpointSliceBuilder {
    namespace: String,
    name: String,
    service: String,
    address_type: AddressType,
    ports: Vec<SlicePortSpec>,
    endpoints: Vec<EndpointSpec>,
}

impl EndpointSliceBuilder {
    /// Adds a port.
    pub fn port(mut self, port: SlicePortSpec) -> Self {
        self.ports.push(port);
        self
    }
    /// Adds an endpoint.
    pub fn endpoint(mut self, endpoint: EndpointSpec) -> Self {
        self.endpoints.push(endpoint);
        self
    }
    /// Adds many endpoints.
    pub fn endpoints(mut self, endpoints: impl IntoIterator<Item = EndpointSpec>) -> Self {
        self.endpoints.extend(endpoints);
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    /// A [`ValidationError`] naming the first bad field: bad names, more than
    /// 1000 endpoints or 100 ports, ports outside 1..=65535, duplicate port
    /// names, an endpoint without addresses, an address that does not match
    /// `addressType`, an unspecified, loopback, link-local or link-local
    /// multicast IP (as the API refuses them), or two endpoints with the same
    /// (first) address.
    pub fn build(self) -> Result<EndpointSlice, ValidationError> {
        validate_dns_label("metadata.namespace", &self.namespace)?;
        validate_dns_subdomain("metadata.name", &self.name)?;
        validate_dns_label("metadata.labels[kubernetes.io/service-name]", &self.service)?;
        if self.endpoints.len() > MAX_ENDPOINTS_PER_SLICE {
            return Err(ValidationError::TooMany {
                field: "endpoints".into(),
                count: self.endpoints.len(),
                limit: MAX_ENDPOINTS_PER_SLICE,
            });
        }
        if self.ports.len() > MAX_PORTS_PER_SLICE {
            return Err(ValidationError::TooMany {
                field: "ports".into(),
                count: self.ports.len(),
                limit: MAX_PORTS_PER_SLICE,
            });
        }
        let mut ports: SmallVec<[SlicePort; 2]> = SmallVec::with_capacity(self.ports.len());
        for (i, spec) in self.ports.into_iter().enumerate() {
            let name = spec.name.unwrap_or_default();
            if !name.is_empty() {
                validate_dns_label(&format!("ports[{i}].name"), &name)?;
            }
            let port = match spec.port {
                None | Some(0) => None,
                Some(p) => Some(validate_port(&format!("ports[{i}].port"), p)?),
            };
            if ports.iter().any(|p| p.name == name) {
                return Err(ValidationError::Duplicate {
                    field: format!("ports[{i}].name"),
                    value: name,
                });
            }
            ports.push(SlicePort {
                name,
                port,
                protocol: spec.protocol,
            });
        }
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        let mut seen: ahash::AHashSet<EndpointAddress> =
            ahash::AHashSet::with_capacity(self.endpoints.len());
        for (i, spec) in self.endpoints.into_iter().enumerate() {
            let ep = build_endpoint(i, spec, self.address_type)?;
            if !seen.insert(ep.addresses[0].clone()) {
                // The same address twice: kube-proxy keeps the rest of the
                // slice and one copy of the address, a non-terminating copy
                // over a terminating one (endpointslicecache.go).
                if let Some(prev) = endpoints
                    .iter_mut()
                    .find(|p: &&mut Endpoint| p.addresses[0] == ep.addresses[0])
                {
                    if prev.conditions.is_terminating() && !ep.conditions.is_terminating() {
                        *prev = ep;
                    }
                }
                continue;
            }
            endpoints.push(ep);
        }
        Ok(EndpointSlice {
            key: SliceKey::new(self.namespace.clone(), self.name),
            service: ServiceKey::new(self.namespace, self.service),
            address_type: self.address_type,
            ports,
            endpoints,
        })
    }
}

/// Why the Kubernetes API refuses `ip` as an endpoint address
/// (`ValidateNonSpecialIP` in `pkg/apis/core/validation`), if it does:
/// unspecified, loopback, link-local unicast and link-local multicast
/// addresses are node-centric and must never be a backend. An IPv4-mapped
/// IPv6 address is judged as the IPv4 address it carries, as Go's `net.IP`
/// does.
fn special_ip(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (unspecified, loopback, link_local, link_local_multicast) = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (
                v4.is_unspecified(),
                v4.is_loopback(),
                v4.is_link_local(),
                o[0] == 224 && o[1] == 0 && o[2] == 0,
            )
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (
                v6.is_unspecified(),
                v6.is_loopback(),
                s[0] & 0xffc0 == 0xfe80,
                s[0] & 0xff0f == 0xff02,
            )
        }
    };
    if unspecified {
        Some("may not be unspecified (0.0.0.0, ::)")
    } else if loopback {
        Some("may not be in the loopback range (127.0.0.0/8, ::1/128)")
    } else if link_local {
        Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)")
    } else if link_local_multicast {
        Some("may not be in the link-local multicast range (224.0.0.0/24, ff02::/16)")
    } else {
        None
    }
}

fn build_endpoint(
    i: usize,
    spec: EndpointSpec,
    address_type: AddressType,
) -> Result<Endpoint, ValidationError> {
    if spec.addresses.is_empty() {
        return Err(ValidationError::Missing {
            field: format!("endpoints[{i}].addresses"),
        });
    }
    if spec.addresses.len() > MAX_ADDRESSES_PER_ENDPOINT {
        return Err(ValidationError::TooMany {
            field: format!("endpoints[{i}].addresses"),
            count: spec.addresses.len(),
            limit: MAX_ADDRESSES_PER_ENDPOINT,
        });
    }
    let mut addresses = SmallVec::with_capacity(spec.addresses.len());
    for (j, raw) in spec.addresses.iter().enumerate() {
        let field = || format!("endpoints[{i}].addresses[{j}]");
        let wrong = || ValidationError::AddressType {
            field: field(),
            value: raw.clone(),
            expected: address_type.as_api_str(),
        };
        let special = |ip: IpAddr| match special_ip(ip) {
            Some(reason) => Err(ValidationError::Invalid {
                field: field(),
                value: raw.clone(),
                reason,
            }),
            None => Ok(EndpointAddress::Ip(ip)),
        };
        let addr = match address_type {
            // Leading zeros read as decimal, as kube-proxy's ParseIPSloppy.
            AddressType::IPv4 => match crate::model::names::parse_ip_sloppy(raw) {
                Some(ip @ IpAddr::V4(_)) => special(ip)?,
                _ => return Err(wrong()),
            },
            AddressType::IPv6 => match raw.parse::<IpAddr>() {
                Ok(ip @ IpAddr::V6(_)) => special(ip)?,
                _ => return Err(wrong()),
            },
            AddressType::Fqdn => {
                if raw.parse::<IpAddr>().is_ok() {
                    return Err(wrong());
                }
                validate_dns_subdomain(&field(), raw.trim_end_matches('.'))?;
                EndpointAddress::Fqdn(raw.clone())
            }
        };
        addresses.push(addr);
    }
    if let Some(h) = &spec.hostname {
        validate_dns_label(&format!("endpoints[{i}].hostname"), h)?;
    }
    if let Some(n) = &spec.node_name {
        validate_dns_subdomain(&format!("endpoints[{i}].nodeName"), n)?;
    }
    for (field, hints) in [
        ("forZones", &spec.hint_zones),
        ("forNodes", &spec.hint_nodes),
    ] {
        if hints.len() > MAX_HINTS_PER_ENDPOINT {
            return Err(ValidationError::TooMany {
                field: format!("endpoints[{i}].hints.{field}"),
                count: hints.len(),
                limit: MAX_HINTS_PER_ENDPOINT,
            });
        }
        for (j, h) in hints.iter().enumerate() {
            if h.is_empty() {
                return Err(ValidationError::Missing {
                    field: format!("endpoints[{i}].hints.{field}[{j}].name"),
                });
            }
        }
    }
    let weight = match spec.weight {
        None => 1,
        Some(w) if (0..=65_535).contains(&w) => w as u16,
        Some(w) => {
            return Err(ValidationError::WeightOutOfRange {
                field: format!("endpoints[{i}].weight"),
                value: w,
            });
        }
    };
    Ok(Endpoint {
        addresses,
        conditions: spec.conditions,
        hostname: spec.hostname,
        node_name: spec.node_name,
        zone: spec.zone,
        hint_zones: spec.hint_zones.into_iter().collect(),
        hint_nodes: spec.hint_nodes.into_iter().collect(),
        weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> EndpointSliceBuilder {
        EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
            .port(SlicePortSpec::tcp(8080).name("http"))
    }

    #[test]
    fn conditions_defaults_follow_kube_proxy() {
        let c = Conditions::default();
        assert!(c.is_ready() && c.is_serving() && !c.is_terminating());
    }

    #[test]
    fn rejects_wrong_family_naming_the_address() {
        let err = b()
            .endpoint(EndpointSpec::new("10.0.0.1"))
            .endpoint(EndpointSpec::new("fd00::1"))
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            ValidationError::AddressType {
                field: "endpoints[1].addresses[0]".into(),
                value: "fd00::1".into(),
                expected: "IPv4"
            }
        );
        let err = EndpointSlice::builder("default", "w", "web", AddressType::IPv6)
            .endpoint(EndpointSpec::new("10.0.0.1"))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "endpoints[0].addresses[0]");
        let err = b()
            .endpoint(EndpointSpec::new("not-an-ip"))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("not-an-ip"));
    }

    #[test]
    fn rejects_duplicate_endpoint_and_port_names() {
        // The same address twice keeps the rest of the slice and one copy
        // (a non-terminating one wins), as kube-proxy does.
        let s = b()
            .endpoint(EndpointSpec::new("10.0.0.1").ready(false).terminating(true))
            .endpoint(EndpointSpec::new("10.0.0.2"))
            .endpoint(EndpointSpec::new("10.0.0.1"))
            .build()
            .unwrap();
        assert_eq!(s.endpoints().len(), 2);
        assert!(!s.endpoints()[0].conditions().is_terminating());
        // Leading zeros read as decimal (kube-proxy's ParseIPSloppy).
        let s = b()
            .endpoint(EndpointSpec::new("10.0.0.041"))
            .build()
            .unwrap();
        assert_eq!(s.endpoints()[0].addresses()[0].to_string(), "10.0.0.41");
        let err = b()
            .port(SlicePortSpec::tcp(9090).name("http"))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "ports[1].name");
    }

    #[test]
    fn rejects_over_limits() {
        let eps = (0..1001).map(|i| EndpointSpec::new(format!("10.0.{}.{}", i / 250, i % 250)));
        let err = b().endpoints(eps).build().unwrap_err();
        assert_eq!(
            err,
            ValidationError::TooMany {
                field: "endpoints".into(),
                count: 1001,
                limit: 1000
            }
        );
        let mut bb = EndpointSlice::builder("default", "w", "web", AddressType::IPv4);
        for i in 0..101 {
            bb = bb.port(SlicePortSpec::tcp(1000 + i).name(format!("p{i}")));
        }
        assert_eq!(bb.build().unwrap_err().field(), "ports");
    }

    #[test]
    fn port_zero_is_ignored_and_out_of_range_rejected() {
        let s = EndpointSlice::builder("default", "w", "web", AddressType::IPv4)
            .port(SlicePortSpec::tcp(0))
            .build()
            .unwrap();
        assert_eq!(s.ports()[0].port(), None);
        let err = EndpointSlice::builder("default", "w", "web", AddressType::IPv4)
            .port(SlicePortSpec::tcp(70_000))
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            ValidationError::PortOutOfRange {
                field: "ports[0].port".into(),
                value: 70_000
            }
        );
    }

    #[test]
    fn weight_bounds() {
        let err = b()
            .endpoint(EndpointSpec::new("10.0.0.1").weight(-1))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "endpoints[0].weight");
        let s = b()
            .endpoint(EndpointSpec::new("10.0.0.1").weight(0))
            .build()
            .unwrap();
        assert_eq!(s.endpoints()[0].weight(), 0);
    }

    #[test]
    fn fqdn_slices() {
        let s = EndpointSlice::builder("default", "w", "web", AddressType::Fqdn)
            .endpoint(EndpointSpec::new("db.example.com"))
            .build()
            .unwrap();
        assert_eq!(s.endpoints()[0].address().ip(), None);
        assert!(
            EndpointSlice::builder("default", "w", "web", AddressType::Fqdn)
                .endpoint(EndpointSpec::new("10.0.0.1"))
                .build()
                .is_err()
        );
    }
}
