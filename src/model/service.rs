//! Services: keys, cluster IPs, ports, session affinity and traffic policies.

use core::fmt;
use core::ops::RangeInclusive;
use core::time::Duration;
use std::net::IpAddr;

use smallvec::SmallVec;

use crate::error::ValidationError;
use crate::model::flow::Protocol;
use crate::model::names::{
    validate_dns_label, validate_dns_subdomain, validate_port, validate_port_name,
};
use crate::render::Cidr;

/// The API server's default `--service-node-port-range`: 30000-32767.
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30_000..=32_767;

/// The default `sessionAffinityConfig.clientIP.timeoutSeconds`: 3 hours.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// The largest affinity timeout the Kubernetes API accepts: one day.
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;

/// A service's identity: `namespace/name`.
///
/// # Examples
/// ```
/// let key = svclb::ServiceKey::new("default", "web");
/// assert_eq!(key.to_string(), "default/web");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ServiceKey {
    /// The namespace.
    pub namespace: String,
    /// The service name.
    pub name: String,
}

impl ServiceKey {
    /// A key from its two parts (not validated; builders validate).
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A service's cluster IP(s), or none for a headless service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClusterIp {
    /// `clusterIP: None`: nothing is proxied; DNS hands out the Pod IPs.
    Headless,
    /// One address, or two for a dual-stack service (`clusterIPs`).
    Ips(SmallVec<[IpAddr; 2]>),
}

impl ClusterIp {
    /// A single-stack cluster IP.
    pub fn ip(ip: IpAddr) -> Self {
        ClusterIp::Ips(smallvec::smallvec![ip])
    }

    /// The addresses (empty for a headless service).
    pub fn addrs(&self) -> &[IpAddr] {
        match self {
            ClusterIp::Headless => &[],
            ClusterIp::Ips(ips) => ips,
        }
    }

    /// Whether this is a headless service.
    pub fn is_headless(&self) -> bool {
        matches!(self, ClusterIp::Headless)
    }
}

/// A service port's target: a number, or the name of a container port that
/// the EndpointSlice controller resolved into the slice ports.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(untagged))]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A named container port.
    Name(String),
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetPort::Number(n) => write!(f, "{n}"),
            TargetPort::Name(s) => f.write_str(s),
        }
    }
}

/// An unvalidated target port, as a builder takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPortSpec {
    /// A number (validated to 1..=65535).
    Number(i64),
    /// A name (validated as an IANA service name).
    Name(String),
}

/// An unvalidated service port, as [`ServiceBuilder::port`] takes it.
///
/// # Examples
/// ```
/// use svclb::ServicePortSpec;
/// let p = ServicePortSpec::tcp(80).name("http").target_port(8080);
/// assert_eq!(p.port, 80);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortSpec {
    /// The port name (required when a service has more than one port).
    pub name: Option<String>,
    /// The port number on the cluster IP.
    pub port: i64,
    /// The target port; `None` means the same number as `port`.
    pub target_port: Option<TargetPortSpec>,
    /// The protocol.
    pub protocol: Protocol,
    /// `nodePort` (NodePort and LoadBalancer services); `None` or 0: none.
    pub node_port: Option<i64>,
}

impl ServicePortSpec {
    /// A port with the given protocol.
    pub fn new(protocol: Protocol, port: i64) -> Self {
        ServicePortSpec {
            name: None,
            port,
            target_port: None,
            protocol,
            node_port: None,
        }
    }
    /// Sets `nodePort`.
    pub fn node_port(mut self, port: i64) -> Self {
        self.node_port = Some(port);
        self
    }
    /// A TCP port.
    pub fn tcp(port: i64) -> Self {
        Self::new(Protocol::Tcp, port)
    }
    /// A UDP port.
    pub fn udp(port: i64) -> Self {
        Self::new(Protocol::Udp, port)
    }
    /// An SCTP port.
    pub fn sctp(port: i64) -> Self {
        Self::new(Protocol::Sctp, port)
    }
    /// Sets the port name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// Sets a numeric target port.
    pub fn target_port(mut self, port: i64) -> Self {
        self.target_port = Some(TargetPortSpec::Number(port));
        self
    }
    /// Sets a named target port.
    pub fn target_port_name(mut self, name: impl Into<String>) -> Self {
        self.target_port = Some(TargetPortSpec::Name(name.into()));
        self
    }
}

/// A validated service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePort {
    name: Option<String>,
    port: u16,
    target_port: TargetPort,
    protocol: Protocol,
    node_port: Option<u16>,
}

impl ServicePort {
    /// `nodePort`, if the port has one.
    pub fn node_port(&self) -> Option<u16> {
        self.node_port
    }
    /// The port name, if any. Endpoint ports are matched to service ports by
    /// this name, as kube-proxy does.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    /// The port name, or `""`.
    pub fn name_or_empty(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
    /// The port on the cluster IP.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The target port.
    pub fn target_port(&self) -> &TargetPort {
        &self.target_port
    }
    /// The protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }
}

/// `spec.sessionAffinity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SessionAffinity {
    /// No affinity (the default).
    #[default]
    None,
    /// Pin a client IP to one endpoint for `timeout_secs` after its last new
    /// connection.
    ClientIp {
        /// The idle timeout in seconds, 1..=86400.
        timeout_secs: u32,
    },
}

impl SessionAffinity {
    /// The timeout, for `ClientIp`.
    pub fn timeout(&self) -> Option<Duration> {
        match self {
            SessionAffinity::None => None,
            SessionAffinity::ClientIp { timeout_secs } => {
                Some(Duration::from_secs(u64::from(*timeout_secs)))
            }
        }
    }
}

/// Which affinity key a `ClientIP`-affinity service pins (a svclb extension;
/// Kubernetes always uses the client IP).
///
/// Clients behind one shared NAT share one address, so with the Kubernetes
/// key they all land on one endpoint. A proxy that can see more than the
/// address pins each session instead: the client address and port, or a key
/// it computes itself (a hash of a cookie or a header) and passes to
/// [`Dataplane::route_with_key`](crate::Dataplane::route_with_key).
///
/// # Examples
/// ```
/// use svclb::{AffinityKeyKind, Service, ServicePortSpec};
/// let svc = Service::builder("default", "shop")
///     .cluster_ip("10.96.0.30".parse().unwrap())
///     .port(ServicePortSpec::tcp(443))
///     .client_ip_affinity(Some(1800))
///     .affinity_key(AffinityKeyKind::Caller)
///     .build()
///     .unwrap();
/// assert_eq!(svc.affinity_key(), AffinityKeyKind::Caller);
/// assert_eq!("client-ip-port".parse::<AffinityKeyKind>().unwrap(), AffinityKeyKind::ClientIpPort);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum AffinityKeyKind {
    /// The full client address, /32 or /128 (the Kubernetes behaviour).
    #[default]
    ClientIp,
    /// The client address and source port: one entry per client socket.
    ClientIpPort,
    /// A key the caller supplies per connection (a cookie or header hash);
    /// when the caller gives none, the client address.
    Caller,
}

impl AffinityKeyKind {
    /// `client-ip`, `client-ip-port` or `caller`.
    pub const fn name(self) -> &'static str {
        match self {
            AffinityKeyKind::ClientIp => "client-ip",
            AffinityKeyKind::ClientIpPort => "client-ip-port",
            AffinityKeyKind::Caller => "caller",
        }
    }
}

impl fmt::Display for AffinityKeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for AffinityKeyKind {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            AffinityKeyKind::ClientIp,
            AffinityKeyKind::ClientIpPort,
            AffinityKeyKind::Caller,
        ]
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| ValidationError::Invalid {
            field: AFFINITY_KEY_FIELD.into(),
            value: s.into(),
            reason: "must be one of client-ip, client-ip-port, caller",
        })
    }
}

/// The field path errors use for [`AffinityKeyKind`] (a svclb extension).
const AFFINITY_KEY_FIELD: &str = "svclb.affinityKey";

/// `spec.internalTrafficPolicy` / `spec.externalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum TrafficPolicy {
    /// Any usable endpoint in the cluster (the default).
    #[default]
    Cluster,
    /// Only endpoints on this node.
    Local,
}

/// `spec.trafficDistribution`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum TrafficDistribution {
    /// Prefer endpoints in the client's zone (`PreferClose` is its deprecated alias).
    PreferSameZone,
    /// Prefer endpoints on the client's node.
    PreferSameNode,
}

/// `spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ServiceType {
    /// Reachable on its cluster IP (the default).
    #[default]
    ClusterIP,
    /// Also on every node's addresses at `spec.ports[].nodePort`.
    NodePort,
    /// Also on the load balancer's ingress IPs (`status.loadBalancer`).
    LoadBalancer,
    /// A DNS alias (CNAME) of `spec.externalName`; no proxy programs it.
    ExternalName,
}

impl ServiceType {
    /// `ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalName`.
    pub const fn as_api_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        }
    }
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_api_str())
    }
}

/// `status.loadBalancer.ingress[].ipMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum IpMode {
    /// Traffic arrives with the load-balancer IP as destination; kube-proxy
    /// captures it (the default).
    #[default]
    VIP,
    /// The load balancer proxies to the node; kube-proxy does not capture
    /// the IP.
    Proxy,
}

/// One `status.loadBalancer.ingress[]` entry with an `ip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LoadBalancerIngress {
    /// `ip`.
    pub ip: IpAddr,
    /// `ipMode`.
    pub ip_mode: IpMode,
}

/// Why an IP cannot be an external IP (`ValidateNonSpecialIP`).
fn special_ip_reason(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("may not be unspecified (0.0.0.0 or ::)");
    }
    if ip.is_loopback() {
        return Some("may not be in the loopback range (127.0.0.0/8, ::1/128)");
    }
    let link_local = match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    };
    if link_local {
        return Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)");
    }
    if ip.is_multicast() {
        return Some("may not be in the multicast range (224.0.0.0/4, ff00::/8)");
    }
    None
}

/// A validated Kubernetes Service, as far as the dataplane cares.
///
/// Build one with [`Service::builder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    key: ServiceKey,
    cluster_ip: ClusterIp,
    ports: SmallVec<[ServicePort; 2]>,
    session_affinity: SessionAffinity,
    affinity_key: AffinityKeyKind,
    internal_traffic_policy: TrafficPolicy,
    external_traffic_policy: TrafficPolicy,
    traffic_distribution: Option<TrafficDistribution>,
    topology_mode: Option<String>,
    publish_not_ready_addresses: bool,
    service_type: ServiceType,
    external_ips: SmallVec<[IpAddr; 1]>,
    load_balancer_ingress: SmallVec<[LoadBalancerIngress; 1]>,
    load_balancer_source_ranges: Vec<Cidr>,
    health_check_node_port: Option<u16>,
    allocate_load_balancer_node_ports: bool,
    external_name: Option<String>,
}

impl Service {
    /// Starts building a service `namespace/name`.
    ///
    /// # Examples
    /// ```
    /// use svclb::{Service, ServicePortSpec};
    /// let svc = Service::builder("default", "web")
    ///     .cluster_ip("10.96.0.10".parse().unwrap())
    ///     .port(ServicePortSpec::tcp(80).name("http").target_port(8080))
    ///     .client_ip_affinity(Some(3600))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(svc.ports()[0].port(), 80);
    /// ```
    pub fn builder(namespace: impl Into<String>, name: impl Into<String>) -> ServiceBuilder {
        ServiceBuilder {
            key: ServiceKey::new(namespace, name),
            cluster_ips: SmallVec::new(),
            headless: false,
            ports: Vec::new(),
            affinity: None,
            affinity_key: AffinityKeyKind::ClientIp,
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_traffic_policy: None,
            traffic_distribution: None,
            topology_mode: None,
            publish_not_ready_addresses: false,
            service_type: ServiceType::ClusterIP,
            external_ips: Vec::new(),
            load_balancer_ingress: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            health_check_node_port: None,
            allocate_load_balancer_node_ports: None,
            external_name: None,
            node_port_range: DEFAULT_NODE_PORT_RANGE,
        }
    }

    /// `spec.type`.
    pub fn service_type(&self) -> ServiceType {
        self.service_type
    }
    /// `spec.externalIPs`, duplicates removed.
    pub fn external_ips(&self) -> &[IpAddr] {
        &self.external_ips
    }
    /// `status.loadBalancer.ingress[]` entries with an IP.
    pub fn load_balancer_ingress(&self) -> &[LoadBalancerIngress] {
        &self.load_balancer_ingress
    }
    /// The load-balancer IPs kube-proxy captures: ingress IPs whose
    /// `ipMode` is `VIP` (kube-proxy's `LoadBalancerVIPs`).
    pub fn load_balancer_vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.load_balancer_ingress
            .iter()
            .filter(|i| i.ip_mode == IpMode::VIP)
            .map(|i| i.ip)
    }
    /// `spec.loadBalancerSourceRanges` (empty: any source).
    pub fn load_balancer_source_ranges(&self) -> &[Cidr] {
        &self.load_balancer_source_ranges
    }
    /// `spec.healthCheckNodePort`.
    pub fn health_check_node_port(&self) -> Option<u16> {
        self.health_check_node_port
    }
    /// `spec.allocateLoadBalancerNodePorts` (true unless set false; only
    /// meaningful for LoadBalancer services).
    pub fn allocate_load_balancer_node_ports(&self) -> bool {
        self.allocate_load_balancer_node_ports
    }
    /// `spec.externalName` (ExternalName services), without a trailing dot.
    pub fn external_name(&self) -> Option<&str> {
        self.external_name.as_deref()
    }
    /// Whether kube-proxy programs the service: not headless, not
    /// ExternalName.
    pub fn is_proxied(&self) -> bool {
        !self.cluster_ip.is_headless() && self.service_type != ServiceType::ExternalName
    }
    /// Whether traffic reaches it from outside the cluster network: node
    /// ports, external IPs or load-balancer IPs (kube-proxy's
    /// `ExternallyAccessible`).
    pub fn externally_accessible(&self) -> bool {
        self.ports.iter().any(|p| p.node_port.is_some())
            || !self.external_ips.is_empty()
            || self.load_balancer_vips().next().is_some()
    }

    /// `namespace/name`.
    pub fn key(&self) -> &ServiceKey {
        &self.key
    }
    /// The cluster IP(s), or headless.
    pub fn cluster_ip(&self) -> &ClusterIp {
        &self.cluster_ip
    }
    /// Whether the service is headless (`clusterIP: None`; not an
    /// ExternalName service, which has no cluster IP either).
    pub fn is_headless(&self) -> bool {
        self.cluster_ip.is_headless() && self.service_type != ServiceType::ExternalName
    }
    /// The ports.
    pub fn ports(&self) -> &[ServicePort] {
        &self.ports
    }
    /// The session affinity.
    pub fn session_affinity(&self) -> SessionAffinity {
        self.session_affinity
    }
    /// Which key `ClientIP` affinity pins (svclb extension; the client IP
    /// unless set).
    pub fn affinity_key(&self) -> AffinityKeyKind {
        self.affinity_key
    }
    /// `spec.internalTrafficPolicy`.
    pub fn internal_traffic_policy(&self) -> TrafficPolicy {
        self.internal_traffic_policy
    }
    /// `spec.externalTrafficPolicy`.
    pub fn external_traffic_policy(&self) -> TrafficPolicy {
        self.external_traffic_policy
    }
    /// `spec.trafficDistribution`.
    pub fn traffic_distribution(&self) -> Option<TrafficDistribution> {
        self.traffic_distribution
    }
    /// The `service.kubernetes.io/topology-mode` annotation (or the older
    /// `topology-aware-hints`), if set.
    pub fn topology_mode(&self) -> Option<&str> {
        self.topology_mode.as_deref()
    }
    /// `spec.publishNotReadyAddresses`.
    pub fn publish_not_ready_addresses(&self) -> bool {
        self.publish_not_ready_addresses
    }
    /// `ns/name:port` (or `ns/name` for an unnamed port), kube-proxy's
    /// `ServicePortName` string.
    pub fn port_name_string(&self, port: &ServicePort) -> String {
        match port.name() {
            Some(n) if !n.is_empty() => format!("{}:{}", self.key, n),
            _ => self.key.to_string(),
        }
    }
}

/// Builds a [`Service`], validating every field on [`ServiceBuilder::build`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ServiceBuilder {
    key: ServiceKey,
    cluster_ips: SmallVec<[IpAddr; 2]>,
    headless: bool,
    ports: Vec<ServicePortSpec>,
    affinity: Option<Option<i64>>,
    affinity_key: AffinityKeyKind,
    internal_traffic_policy: TrafficPolicy,
    /// `None`: not set (the API server's default, `Cluster`, for the
    /// kinds that take it).
    external_traffic_policy: Option<TrafficPolicy>,
    traffic_distribution: Option<TrafficDistribution>,
    topology_mode: Option<String>,
    publish_not_ready_addresses: bool,
    service_type: ServiceType,
    external_ips: Vec<IpAddr>,
    load_balancer_ingress: Vec<LoadBalancerIngress>,
    load_balancer_source_ranges: Vec<Cidr>,
    health_check_node_port: Option<i64>,
    allocate_load_balancer_node_ports: Option<bool>,
    external_name: Option<String>,
    node_port_range: RangeInclusive<u16>,
}

impl ServiceBuilder {
    /// `spec.type` (default `ClusterIP`).
    pub fn service_type(mut self, t: ServiceType) -> Self {
        self.service_type = t;
        self
    }
    /// Adds an `spec.externalIPs` entry (a repeated one is kept once).
    pub fn external_ip(mut self, ip: IpAddr) -> Self {
        self.external_ips.push(ip);
        self
    }
    /// Adds a `status.loadBalancer.ingress[]` entry.
    pub fn load_balancer_ingress(mut self, ip: IpAddr, ip_mode: IpMode) -> Self {
        self.load_balancer_ingress
            .push(LoadBalancerIngress { ip, ip_mode });
        self
    }
    /// Adds a `spec.loadBalancerSourceRanges` entry.
    pub fn load_balancer_source_range(mut self, cidr: Cidr) -> Self {
        self.load_balancer_source_ranges.push(cidr);
        self
    }
    /// `spec.healthCheckNodePort`.
    pub fn health_check_node_port(mut self, port: i64) -> Self {
        self.health_check_node_port = Some(port);
        self
    }
    /// `spec.allocateLoadBalancerNodePorts`.
    pub fn allocate_load_balancer_node_ports(mut self, allocate: bool) -> Self {
        self.allocate_load_balancer_node_ports = Some(allocate);
        self
    }
    /// `spec.externalName` (ExternalName services).
    pub fn external_name(mut self, name: impl Into<String>) -> Self {
        self.external_name = Some(name.into());
        self
    }
    /// The node-port range `nodePort`s must fall in (the API server's
    /// `--service-node-port-range`, default [`DEFAULT_NODE_PORT_RANGE`]).
    pub fn node_port_range(mut self, range: RangeInclusive<u16>) -> Self {
        self.node_port_range = range;
        self
    }
    /// Adds a cluster IP (call twice for dual stack).
    pub fn cluster_ip(mut self, ip: IpAddr) -> Self {
        self.cluster_ips.push(ip);
        self
    }
    /// Makes the service headless (`clusterIP: None`).
    pub fn headless(mut self) -> Self {
        self.headless = true;
        self
    }
    /// Adds a port.
    pub fn port(mut self, port: ServicePortSpec) -> Self {
        self.ports.push(port);
        self
    }
    /// `sessionAffinity: ClientIP` with the given timeout (`None` = 10800 s).
    pub fn client_ip_affinity(mut self, timeout_secs: Option<i64>) -> Self {
        self.affinity = Some(timeout_secs);
        self
    }
    /// Which key `ClientIP` affinity pins (svclb extension, see
    /// [`AffinityKeyKind`]). Anything but the client IP needs
    /// [`client_ip_affinity`](Self::client_ip_affinity).
    pub fn affinity_key(mut self, kind: AffinityKeyKind) -> Self {
        self.affinity_key = kind;
        self
    }
    /// `spec.internalTrafficPolicy`.
    pub fn internal_traffic_policy(mut self, policy: TrafficPolicy) -> Self {
        self.internal_traffic_policy = policy;
        self
    }
    /// `spec.externalTrafficPolicy`. Only for externally accessible
    /// services (`NodePort`, `LoadBalancer`, or `ClusterIP` with
    /// `externalIPs`); [`build`](Self::build) refuses it, `Cluster`
    /// included, on any other, as the API server does.
    pub fn external_traffic_policy(mut self, policy: TrafficPolicy) -> Self {
        self.external_traffic_policy = Some(policy);
        self
    }
    /// `spec.trafficDistribution`.
    pub fn traffic_distribution(mut self, d: TrafficDistribution) -> Self {
        self.traffic_distribution = Some(d);
        self
    }
    /// The topology-mode annotation's value (`Auto`, ...).
    pub fn topology_mode(mut self, mode: impl Into<String>) -> Self {
        self.topology_mode = Some(mode.into());
        self
    }
    /// `spec.publishNotReadyAddresses`.
    pub fn publish_not_ready_addresses(mut self, publish: bool) -> Self {
        self.publish_not_ready_addresses = publish;
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    /// A [`ValidationError`] naming the first bad field: names that are not
    /// DNS labels, ports outside 1..=65535, duplicate or unnamed ports in a
    /// multi-port service, an affinity timeout outside 1..=86400, an affinity
    /// key other than the client IP without `ClientIP` affinity, a cluster IP
    /// on a headless service, a non-headless service without a cluster IP
    /// or ports, or `spec.externalTrafficPolicy` set on a service that is
    /// not externally accessible.
    pub fn build(self) -> Result<Service, ValidationError> {
        validate_dns_label("metadata.namespace", &self.key.namespace)?;
        validate_dns_label("metadata.name", &self.key.name)?;
        let ty = self.service_type;
        let external_name = if ty == ServiceType::ExternalName {
            let name = self.external_name.clone().unwrap_or_default();
            let name = name.strip_suffix('.').unwrap_or(&name).to_owned();
            validate_dns_subdomain("spec.externalName", &name)?;
            if let Some(ip) = self.cluster_ips.first() {
                return Err(ValidationError::Invalid {
                    field: "spec.clusterIP".into(),
                    value: ip.to_string(),
                    reason: "must be empty for ExternalName services",
                });
            }
            Some(name)
        } else {
            None
        };
        let cluster_ip = if ty == ServiceType::ExternalName {
            ClusterIp::Headless
        } else if self.headless {
            if let Some(ip) = self.cluster_ips.first() {
                return Err(ValidationError::Invalid {
                    field: "spec.clusterIP".into(),
                    value: ip.to_string(),
                    reason: "a headless service has clusterIP None",
                });
            }
            ClusterIp::Headless
        } else {
            if self.cluster_ips.is_empty() {
                return Err(ValidationError::Missing {
                    field: "spec.clusterIP".into(),
                });
            }
            if self.cluster_ips.len() > 2
                || (self.cluster_ips.len() == 2
                    && self.cluster_ips[0].is_ipv4() == self.cluster_ips[1].is_ipv4())
            {
                return Err(ValidationError::Invalid {
                    field: "spec.clusterIPs".into(),
                    value: format!("{:?}", self.cluster_ips),
                    reason: "at most one address per IP family",
                });
            }
            if self.ports.is_empty() {
                return Err(ValidationError::Missing {
                    field: "spec.ports".into(),
                });
            }
            ClusterIp::Ips(self.cluster_ips)
        };
        let mut ports: SmallVec<[ServicePort; 2]> = SmallVec::with_capacity(self.ports.len());
        let multi = self.ports.len() > 1;
        for (i, spec) in self.ports.into_iter().enumerate() {
            let name = match spec.name.filter(|n| !n.is_empty()) {
                Some(n) => {
                    validate_dns_label(&format!("spec.ports[{i}].name"), &n)?;
                    Some(n)
                }
                None if multi => {
                    return Err(ValidationError::Missing {
                        field: format!("spec.ports[{i}].name"),
                    });
                }
                None => None,
            };
            let port = validate_port(&format!("spec.ports[{i}].port"), spec.port)?;
            let target_port = match spec.target_port {
                None => TargetPort::Number(port),
                Some(TargetPortSpec::Number(0)) => TargetPort::Number(port),
                Some(TargetPortSpec::Number(n)) => {
                    TargetPort::Number(validate_port(&format!("spec.ports[{i}].targetPort"), n)?)
                }
                Some(TargetPortSpec::Name(n)) => {
                    validate_port_name(&format!("spec.ports[{i}].targetPort"), &n)?;
                    TargetPort::Name(n)
                }
            };
            if let Some(prev) = ports.iter().find(|p| p.name.is_some() && p.name == name) {
                return Err(ValidationError::Duplicate {
                    field: format!("spec.ports[{i}].name"),
                    value: prev.name_or_empty().to_owned(),
                });
            }
            if ports
                .iter()
                .any(|p| p.port == port && p.protocol == spec.protocol)
            {
                return Err(ValidationError::Duplicate {
                    field: format!("spec.ports[{i}]"),
                    value: format!("{port}/{}", spec.protocol),
                });
            }
            let node_port = match spec.node_port {
                None | Some(0) => None,
                Some(n) => {
                    let field = format!("spec.ports[{i}].nodePort");
                    if !matches!(ty, ServiceType::NodePort | ServiceType::LoadBalancer) {
                        return Err(ValidationError::Invalid {
                            field,
                            value: n.to_string(),
                            reason: "may not be used when `type` is not 'NodePort' or 'LoadBalancer'",
                        });
                    }
                    let n16 = validate_port(&field, n)?;
                    if !self.node_port_range.contains(&n16) {
                        return Err(ValidationError::Invalid {
                            field,
                            value: n.to_string(),
                            reason: "provided port is not in the valid range (the service node-port range, by default 30000-32767)",
                        });
                    }
                    if ports
                        .iter()
                        .any(|p| p.node_port == Some(n16) && p.protocol == spec.protocol)
                    {
                        return Err(ValidationError::Duplicate {
                            field,
                            value: format!("{n16}/{}", spec.protocol),
                        });
                    }
                    Some(n16)
                }
            };
            ports.push(ServicePort {
                name,
                port,
                target_port,
                protocol: spec.protocol,
                node_port,
            });
        }
        let session_affinity = match self.affinity {
            None => SessionAffinity::None,
            Some(timeout) => {
                let t = timeout.unwrap_or(i64::from(DEFAULT_AFFINITY_TIMEOUT_SECS));
                if !(1..=i64::from(MAX_AFFINITY_TIMEOUT_SECS)).contains(&t) {
                    return Err(ValidationError::TimeoutOutOfRange {
                        field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        value: t,
                    });
                }
                SessionAffinity::ClientIp {
                    timeout_secs: t as u32,
                }
            }
        };
        if session_affinity == SessionAffinity::None
            && self.affinity_key != AffinityKeyKind::ClientIp
        {
            return Err(ValidationError::Invalid {
                field: AFFINITY_KEY_FIELD.into(),
                value: self.affinity_key.name().into(),
                reason: "an affinity key needs sessionAffinity ClientIP",
            });
        }
        let is_lb = ty == ServiceType::LoadBalancer;
        let mut external_ips: SmallVec<[IpAddr; 1]> = SmallVec::new();
        for (i, ip) in self.external_ips.iter().enumerate() {
            if let Some(reason) = special_ip_reason(*ip) {
                return Err(ValidationError::Invalid {
                    field: format!("spec.externalIPs[{i}]"),
                    value: ip.to_string(),
                    reason,
                });
            }
            if !external_ips.contains(ip) {
                external_ips.push(*ip);
            }
        }
        let mut load_balancer_ingress: SmallVec<[LoadBalancerIngress; 1]> = SmallVec::new();
        for ing in &self.load_balancer_ingress {
            if !load_balancer_ingress.iter().any(|x| x.ip == ing.ip) {
                load_balancer_ingress.push(*ing);
            }
        }
        if !is_lb {
            if let Some(c) = self.load_balancer_source_ranges.first() {
                return Err(ValidationError::Invalid {
                    field: "spec.loadBalancerSourceRanges".into(),
                    value: c.to_string(),
                    reason: "may only be used when `type` is 'LoadBalancer'",
                });
            }
            if let Some(a) = self.allocate_load_balancer_node_ports {
                return Err(ValidationError::Invalid {
                    field: "spec.allocateLoadBalancerNodePorts".into(),
                    value: a.to_string(),
                    reason: "may only be used when `type` is 'LoadBalancer'",
                });
            }
        }
        let externally_accessible = matches!(ty, ServiceType::NodePort | ServiceType::LoadBalancer)
            || (ty == ServiceType::ClusterIP && !external_ips.is_empty());
        // validateServiceExternalTrafficPolicy: any value, `Cluster`
        // included, on a service that is not externally accessible
        // (`ExternallyAccessible`: NodePort, LoadBalancer, or ClusterIP with
        // externalIPs; a headless or ExternalName service is not).
        let external_traffic_policy = match self.external_traffic_policy {
            Some(p) if !externally_accessible => {
                return Err(ValidationError::Invalid {
                    field: "spec.externalTrafficPolicy".into(),
                    value: match p {
                        TrafficPolicy::Cluster => "Cluster",
                        TrafficPolicy::Local => "Local",
                    }
                    .into(),
                    reason: "may only be set for externally-accessible services",
                });
            }
            p => p.unwrap_or(TrafficPolicy::Cluster),
        };
        let health_check_node_port = match self.health_check_node_port {
            None | Some(0) => None,
            Some(n) => {
                let field = "spec.healthCheckNodePort";
                if !is_lb || external_traffic_policy != TrafficPolicy::Local {
                    return Err(ValidationError::Invalid {
                        field: field.into(),
                        value: n.to_string(),
                        reason: "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
                    });
                }
                Some(validate_port(field, n)?)
            }
        };
        Ok(Service {
            service_type: ty,
            external_ips,
            load_balancer_ingress,
            load_balancer_source_ranges: self.load_balancer_source_ranges,
            health_check_node_port,
            allocate_load_balancer_node_ports: self
                .allocate_load_balancer_node_ports
                .unwrap_or(true),
            external_name,
            key: self.key,
            cluster_ip,
            ports,
            session_affinity,
            affinity_key: self.affinity_key,
            internal_traffic_policy: self.internal_traffic_policy,
            external_traffic_policy,
            traffic_distribution: self.traffic_distribution,
            topology_mode: self.topology_mode,
            publish_not_ready_addresses: self.publish_not_ready_addresses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ServiceBuilder {
        Service::builder("default", "web").cluster_ip("10.96.0.1".parse().unwrap())
    }

    #[test]
    fn builds_with_defaults() {
        let s = base().port(ServicePortSpec::tcp(80)).build().unwrap();
        assert_eq!(s.ports()[0].target_port(), &TargetPort::Number(80));
        assert_eq!(s.session_affinity(), SessionAffinity::None);
        let s = base()
            .port(ServicePortSpec::tcp(80))
            .client_ip_affinity(None)
            .build()
            .unwrap();
        assert_eq!(
            s.session_affinity(),
            SessionAffinity::ClientIp {
                timeout_secs: 10_800
            }
        );
    }

    #[test]
    fn rejects_port_out_of_range_naming_field_and_value() {
        for bad in [0i64, -1, 65_536, 1 << 40] {
            let err = base().port(ServicePortSpec::tcp(bad)).build().unwrap_err();
            assert_eq!(
                err,
                ValidationError::PortOutOfRange {
                    field: "spec.ports[0].port".into(),
                    value: bad
                }
            );
        }
        let err = base()
            .port(ServicePortSpec::tcp(80).target_port(70_000))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "spec.ports[0].targetPort");
        assert!(err.to_string().contains("70000"));
    }

    #[test]
    fn affinity_timeout_bounds() {
        for ok in [1i64, 86_400] {
            assert!(
                base()
                    .port(ServicePortSpec::tcp(80))
                    .client_ip_affinity(Some(ok))
                    .build()
                    .is_ok()
            );
        }
        for bad in [0i64, -5, 86_401] {
            let err = base()
                .port(ServicePortSpec::tcp(80))
                .client_ip_affinity(Some(bad))
                .build()
                .unwrap_err();
            assert_eq!(
                err,
                ValidationError::TimeoutOutOfRange {
                    field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                    value: bad
                }
            );
        }
    }

    #[test]
    fn affinity_key_needs_client_ip_affinity() {
        let err = base()
            .port(ServicePortSpec::tcp(80))
            .affinity_key(AffinityKeyKind::Caller)
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            ValidationError::Invalid {
                field: "svclb.affinityKey".into(),
                value: "caller".into(),
                reason: "an affinity key needs sessionAffinity ClientIP",
            }
        );
        let s = base()
            .port(ServicePortSpec::tcp(80))
            .client_ip_affinity(Some(60))
            .affinity_key(AffinityKeyKind::ClientIpPort)
            .build()
            .unwrap();
        assert_eq!(s.affinity_key(), AffinityKeyKind::ClientIpPort);
        assert_eq!(
            base()
                .port(ServicePortSpec::tcp(80))
                .build()
                .unwrap()
                .affinity_key(),
            AffinityKeyKind::ClientIp
        );
        let err = "cookie".parse::<AffinityKeyKind>().unwrap_err();
        assert_eq!(err.field(), "svclb.affinityKey");
        assert!(err.to_string().contains("cookie"));
    }

    #[test]
    fn multi_port_services_need_unique_names_and_ports() {
        let err = base()
            .port(ServicePortSpec::tcp(80).name("http"))
            .port(ServicePortSpec::tcp(81))
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            ValidationError::Missing {
                field: "spec.ports[1].name".into()
            }
        );
        let err = base()
            .port(ServicePortSpec::tcp(80).name("a"))
            .port(ServicePortSpec::tcp(81).name("a"))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "spec.ports[1].name");
        let err = base()
            .port(ServicePortSpec::tcp(80).name("a"))
            .port(ServicePortSpec::tcp(80).name("b"))
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            ValidationError::Duplicate {
                field: "spec.ports[1]".into(),
                value: "80/TCP".into()
            }
        );
        // Same number on another protocol is fine (DNS on 53/TCP and 53/UDP).
        assert!(
            base()
                .port(ServicePortSpec::tcp(53).name("dns-tcp"))
                .port(ServicePortSpec::udp(53).name("dns"))
                .build()
                .is_ok()
        );
    }

    #[test]
    fn headless_and_cluster_ip_rules() {
        let err = Service::builder("default", "web")
            .port(ServicePortSpec::tcp(80))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "spec.clusterIP");
        let s = Service::builder("default", "kafka")
            .headless()
            .build()
            .unwrap();
        assert!(s.is_headless());
        let err = base().headless().build().unwrap_err();
        assert_eq!(err.field(), "spec.clusterIP");
        let err = Service::builder("Default", "web")
            .headless()
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "metadata.namespace");
    }

    #[test]
    fn external_surface_validation() {
        let err = base()
            .port(ServicePortSpec::tcp(80))
            .external_traffic_policy(TrafficPolicy::Local)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "spec.externalTrafficPolicy");
        // Any value, Cluster included, as the API server's
        // validateServiceExternalTrafficPolicy: on a ClusterIP service
        // without external IPs, a headless one, an ExternalName one.
        for b in [
            base().port(ServicePortSpec::tcp(80)),
            Service::builder("default", "x")
                .headless()
                .port(ServicePortSpec::tcp(80)),
            Service::builder("default", "x")
                .service_type(ServiceType::ExternalName)
                .external_name("db.example.com"),
        ] {
            for policy in [TrafficPolicy::Cluster, TrafficPolicy::Local] {
                let err = b
                    .clone()
                    .external_traffic_policy(policy)
                    .build()
                    .unwrap_err();
                let value = format!("{policy:?}");
                assert_eq!(
                    err,
                    ValidationError::Invalid {
                        field: "spec.externalTrafficPolicy".into(),
                        value,
                        reason: "may only be set for externally-accessible services",
                    }
                );
            }
            // Unset, the same service is fine.
            assert!(b.build().is_ok());
        }
        // NodePort and LoadBalancer take either value.
        for ty in [ServiceType::NodePort, ServiceType::LoadBalancer] {
            for policy in [TrafficPolicy::Cluster, TrafficPolicy::Local] {
                assert!(
                    base()
                        .service_type(ty)
                        .port(ServicePortSpec::tcp(80))
                        .external_traffic_policy(policy)
                        .build()
                        .is_ok()
                );
            }
        }
        // With an external IP, a ClusterIP service is externally accessible.
        let s = base()
            .port(ServicePortSpec::tcp(80))
            .external_ip("192.168.99.11".parse().unwrap())
            .external_ip("192.168.99.11".parse().unwrap())
            .external_traffic_policy(TrafficPolicy::Local)
            .build()
            .unwrap();
        assert_eq!(s.external_ips().len(), 1);
        assert!(s.externally_accessible());
        let err = base()
            .service_type(ServiceType::NodePort)
            .port(ServicePortSpec::tcp(80).name("a").node_port(30_001))
            .port(ServicePortSpec::tcp(81).name("b").node_port(30_001))
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            ValidationError::Duplicate {
                field: "spec.ports[1].nodePort".into(),
                value: "30001/TCP".into()
            }
        );
        // A configured range (kube-proxy's tests use 3001).
        assert!(
            base()
                .service_type(ServiceType::NodePort)
                .node_port_range(1..=65_535)
                .port(ServicePortSpec::tcp(80).node_port(3001))
                .build()
                .is_ok()
        );
        let err = base()
            .service_type(ServiceType::NodePort)
            .port(ServicePortSpec::tcp(80).node_port(3001))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "spec.ports[0].nodePort");
        let err = Service::builder("default", "x")
            .service_type(ServiceType::ExternalName)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "spec.externalName");
    }

    #[test]
    fn bad_target_port_name() {
        let err = base()
            .port(ServicePortSpec::tcp(80).target_port_name("Not_A_Name"))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "spec.ports[0].targetPort");
    }
}
