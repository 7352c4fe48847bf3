//! Service and EndpointSlice manifests, read exactly as the Kubernetes API
//! server and `kubectl get -o json|yaml` write them.
//!
//! - Kinds: `v1` `Service`, `discovery.k8s.io/v1` `EndpointSlice`, and the
//!   list kinds (`List`, `ServiceList`, `EndpointSliceList`), whose `items`
//!   are read in order. Other kinds (a `Deployment` in the same file) are
//!   skipped and reported in [`Manifests::skipped`].
//! - Formats: JSON (one object, or several concatenated) and YAML (one or
//!   several `---`-separated documents); [`Manifests::parse_str`] picks the
//!   format from the first character.
//! - Unknown fields are ignored: `metadata.uid`, `resourceVersion`,
//!   `managedFields`, `status`, `selector`, `ipFamilies`, ... A `null` list or
//!   map reads as empty.
//! - Defaults are the API server's (`pkg/apis/core/v1/defaults.go`,
//!   `pkg/apis/discovery/v1/defaults.go`), see
//!   [`ServiceManifest::apply_defaults`] and
//!   [`EndpointSliceManifest::apply_defaults`]. A namespace left out reads
//!   as `default`, as `kubectl apply` does.
//! - Conversion goes through [`Service::builder`] and
//!   [`EndpointSlice::builder`], so a manifest is validated exactly as
//!   builder calls are; a [`ManifestError`] names the file, the document,
//!   the object (`Service messaging/kafka-headless`) and the field path.
//! - `ExternalName` services are DNS aliases that no proxy programs: they
//!   enter the table (the DNS model answers a CNAME for them) and get no
//!   frontend. `NodePort` and `LoadBalancer` services are proxied on their
//!   cluster IP, on the node addresses at each `nodePort`, on their
//!   `externalIPs` and on their `status.loadBalancer.ingress` IPs (see
//!   [`plan`](crate::plan)). IP addresses are read as kube-proxy reads them
//!   (leading zeros are decimal: `172.30.0.041` is 172.30.0.41).
//! - Everything serializes back ([`From<&Service>`](ServiceManifest) and
//!   [`From<&EndpointSlice>`](EndpointSliceManifest) build a manifest from
//!   the model), so `model -> YAML -> model` is the identity (the svclb-only
//!   endpoint weight, which Kubernetes has no field for, is not carried).
//!
//! # Examples
//! ```
//! use svclb::k8s::manifest::Manifests;
//! use svclb::ServiceTable;
//!
//! let yaml = r#"
//! apiVersion: v1
//! kind: Service
//! metadata: {name: web, namespace: default, uid: 3f1b2c4d, resourceVersion: "123456"}
//! spec:
//!   clusterIP: 10.96.0.10
//!   ports: [{name: http, port: 80, targetPort: 8080}]
//! status: {loadBalancer: {}}
//! ---
//! apiVersion: discovery.k8s.io/v1
//! kind: EndpointSlice
//! metadata:
//!   name: web-x7k2p
//!   namespace: default
//!   labels: {kubernetes.io/service-name: web}
//! addressType: IPv4
//! ports: [{name: http, port: 8080, protocol: TCP}]
//! endpoints:
//! - addresses: [10.244.1.5]
//!   conditions: {ready: true}
//! "#;
//! let manifests = Manifests::parse_str(yaml, Some("web.yaml"))?;
//! let batch = manifests.changes()?;
//! let mut table = ServiceTable::new();
//! table.apply_batch(batch.changes)?;
//! assert_eq!(table.len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// A ManifestError carries its whole context (file, document, object, field):
// it is large, and returned only on the cold error path.
#![allow(clippy::result_large_err)]

use core::fmt;
use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::error::ValidationError;
use crate::k8s::input::{self, Format, InputLimits, Limit};
use crate::model::endpoint_slice::{
    AddressType, Conditions, EndpointSlice, EndpointSpec, SlicePortSpec,
};
use crate::model::flow::Protocol;
use crate::model::service::{
    ClusterIp, DEFAULT_AFFINITY_TIMEOUT_SECS, IpMode, Service, ServicePortSpec, ServiceType,
    SessionAffinity, TargetPort, TargetPortSpec, TrafficDistribution, TrafficPolicy,
};
use crate::table::Change;

/// The label that ties an EndpointSlice to its service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The label the EndpointSlice controller puts on the slices it manages.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// The topology-aware routing annotation (`Auto` enables hints).
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// Its deprecated predecessor; when both are set this one wins, as in the
/// EndpointSlice controller's `hintsEnabled`.
pub const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// svclb extension: which key `ClientIP` affinity pins (`client-ip`, the
/// default; `client-ip-port`; `caller`), see
/// [`AffinityKeyKind`](crate::AffinityKeyKind).
pub const ANNOTATION_AFFINITY_KEY: &str = "svclb.io/affinity-key";
/// The namespace of an object whose manifest names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Reads `null` as the type's default (Go writes empty lists as `null`).
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `metadata`, the parts svclb reads (the rest is ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `metadata.namespace` (absent reads as `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `metadata.labels`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    /// `metadata.resourceVersion` (watch streams: an event older than the
    /// last one seen for the object is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

impl ObjectMeta {
    fn namespace_or_default(&self) -> &str {
        self.namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE)
    }
}

/// A Kubernetes `IntOrString` (`targetPort`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    /// A number.
    Int(i64),
    /// A string (a named container port).
    String(String),
}

/// `spec.ports[]` of a Service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortManifest {
    /// `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `protocol` (`TCP` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// `port` (required).
    pub port: i64,
    /// `targetPort` (the same as `port` when absent, 0 or empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    /// `nodePort` (NodePort and LoadBalancer services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i64>,
    /// `appProtocol` (read and written back, not used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// `spec.sessionAffinityConfig.clientIP`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    /// `timeoutSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
}

/// `spec.sessionAffinityConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    /// `clientIP`.
    #[serde(default, rename = "clientIP", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpConfig>,
}

/// A Service's `spec`, the parts svclb reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `type`: `ClusterIP` (default), `NodePort`, `LoadBalancer`, `ExternalName`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// `clusterIP`: an address, or `None` for a headless service.
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    /// `clusterIPs`: one address per IP family (dual stack).
    #[serde(
        default,
        rename = "clusterIPs",
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cluster_ips: Vec<String>,
    /// `ports`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<ServicePortManifest>,
    /// `sessionAffinity`: `None` (default) or `ClientIP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    /// `sessionAffinityConfig`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    /// `internalTrafficPolicy`: `Cluster` (default) or `Local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    /// `externalTrafficPolicy`: `Cluster` or `Local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<String>,
    /// `trafficDistribution`: `PreferSameZone`, `PreferSameNode`, or the
    /// deprecated alias `PreferClose` (= `PreferSameZone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
    /// `publishNotReadyAddresses`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_not_ready_addresses: Option<bool>,
    /// `externalName` (ExternalName services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    /// `externalIPs`.
    #[serde(
        default,
        rename = "externalIPs",
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub external_ips: Vec<String>,
    /// `loadBalancerSourceRanges` (CIDRs).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub load_balancer_source_ranges: Vec<String>,
    /// `healthCheckNodePort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<i64>,
    /// `allocateLoadBalancerNodePorts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocate_load_balancer_node_ports: Option<bool>,
    /// `selector`: a service without one has its endpoints managed by
    /// hand, through v1 `Endpoints` (mirrored into EndpointSlices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// `ipFamilies` (`IPv4`, `IPv6`): which family a cluster IP assigned
    /// by the [loader](crate::k8s::loader) comes from.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_families: Vec<String>,
    /// `ipFamilyPolicy`: `SingleStack` (default), `PreferDualStack`,
    /// `RequireDualStack`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family_policy: Option<String>,
}

/// A `v1` Service manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceManifest {
    /// `apiVersion` (`v1`).
    #[serde(default = "api_v1")]
    pub api_version: String,
    /// `kind` (`Service`).
    #[serde(default = "kind_service")]
    pub kind: String,
    /// `metadata`.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`.
    #[serde(default)]
    pub spec: ServiceSpec,
    /// `status` (only `loadBalancer.ingress` is read).
    #[serde(default, skip_serializing_if = "ServiceStatus::is_empty")]
    pub status: ServiceStatus,
}

/// `status.loadBalancer.ingress[]` of a Service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIngressManifest {
    /// `ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// `hostname` (read and written back; kube-proxy ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `ipMode`: `VIP` (default) or `Proxy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_mode: Option<String>,
}

/// `status.loadBalancer` of a Service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerStatusManifest {
    /// `ingress`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ingress: Vec<LoadBalancerIngressManifest>,
}

/// A Service's `status`, the parts svclb reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// `loadBalancer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerStatusManifest>,
}

impl ServiceStatus {
    /// Whether it carries no ingress.
    pub fn is_empty(&self) -> bool {
        self.load_balancer
            .as_ref()
            .is_none_or(|lb| lb.ingress.is_empty())
    }
}

fn api_v1() -> String {
    "v1".into()
}
fn kind_service() -> String {
    "Service".into()
}
fn api_discovery_v1() -> String {
    "discovery.k8s.io/v1".into()
}
fn kind_endpoint_slice() -> String {
    "EndpointSlice".into()
}

/// `ports[]` of an EndpointSlice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPortManifest {
    /// `name` (`""` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `protocol` (`TCP` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// `port` (absent: "all ports", ignored by kube-proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// `appProtocol` (read and written back, not used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// `hints.forZones[]` / `hints.forNodes[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintName {
    /// `name`.
    #[serde(default)]
    pub name: String,
}

/// `endpoints[].hints`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointHints {
    /// `forZones`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub for_zones: Vec<HintName>,
    /// `forNodes`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub for_nodes: Vec<HintName>,
}

/// `endpoints[]` of an EndpointSlice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointManifest {
    /// `addresses` (kube-proxy uses the first; DNS answers with all).
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<String>,
    /// `conditions` (absent `ready`/`serving` mean true, absent
    /// `terminating` means false).
    #[serde(default, skip_serializing_if = "is_default_conditions")]
    pub conditions: Conditions,
    /// `hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `nodeName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// `zone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `hints`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hints: Option<EndpointHints>,
}

fn is_default_conditions(c: &Conditions) -> bool {
    *c == Conditions::default()
}

/// A `discovery.k8s.io/v1` EndpointSlice manifest (no `spec`: its fields
/// sit at the top level).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSliceManifest {
    /// `apiVersion` (`discovery.k8s.io/v1`).
    #[serde(default = "api_discovery_v1")]
    pub api_version: String,
    /// `kind` (`EndpointSlice`).
    #[serde(default = "kind_endpoint_slice")]
    pub kind: String,
    /// `metadata`; the label `kubernetes.io/service-name` names the service.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `addressType`: `IPv4`, `IPv6` or `FQDN` (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_type: Option<String>,
    /// `endpoints` (`null` reads as empty).
    #[serde(default, deserialize_with = "nullable")]
    pub endpoints: Vec<EndpointManifest>,
    /// `ports` (`null` reads as empty).
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<EndpointPortManifest>,
}

/// One object svclb reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
// Read once per document and kept in a Vec: boxing the Service would cost
// an allocation per object for no gain.
#[allow(clippy::large_enum_variant)]
pub enum Manifest {
    /// A Service.
    Service(ServiceManifest),
    /// An EndpointSlice.
    EndpointSlice(EndpointSliceManifest),
    /// A v1 Endpoints (legacy): mirrored into EndpointSlices for a
    /// selector-less service, as the EndpointSlice mirroring controller does.
    Endpoints(EndpointsManifest),
}

/// `subsets[].addresses[]` / `notReadyAddresses[]` of a v1 Endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointAddressManifest {
    /// `ip`.
    #[serde(default)]
    pub ip: String,
    /// `hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `nodeName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// `subsets[]` of a v1 Endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSubset {
    /// `addresses` (ready).
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<EndpointAddressManifest>,
    /// `notReadyAddresses`.
    #[serde(default, deserialize_with = "nullable")]
    pub not_ready_addresses: Vec<EndpointAddressManifest>,
    /// `ports` (the same shape as an EndpointSlice's).
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<EndpointPortManifest>,
}

/// A `v1` Endpoints manifest (the legacy API, still written by hand for
/// services without a selector).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointsManifest {
    /// `apiVersion` (`v1`).
    #[serde(default = "api_v1")]
    pub api_version: String,
    /// `kind` (`Endpoints`).
    #[serde(default = "kind_endpoints")]
    pub kind: String,
    /// `metadata`; the name is the service's.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `subsets`.
    #[serde(default, deserialize_with = "nullable")]
    pub subsets: Vec<EndpointSubset>,
}

fn kind_endpoints() -> String {
    "Endpoints".into()
}

/// The `endpointslice.kubernetes.io/managed-by` value of mirrored slices.
pub const MIRRORING_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";
/// The label that keeps an Endpoints from being mirrored (`"true"`).
pub const LABEL_SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
/// Addresses the mirroring controller copies per subset
/// (`--mirroring-max-endpoints-per-subset`, default 1000); the rest are
/// left out.
pub const MIRRORING_MAX_ENDPOINTS_PER_SUBSET: usize = 1000;

impl EndpointsManifest {
    /// `Endpoints namespace/name`.
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef {
            kind: "Endpoints".into(),
            namespace: self.metadata.namespace_or_default().into(),
            name: self.metadata.name.clone().unwrap_or_else(|| "?".into()),
        }
    }

    /// The service of the same name.
    pub fn service_key(&self) -> crate::model::service::ServiceKey {
        crate::model::service::ServiceKey::new(
            self.metadata.namespace_or_default(),
            self.metadata.name.clone().unwrap_or_default(),
        )
    }

    /// Whether the `endpointslice.kubernetes.io/skip-mirror: "true"` label
    /// is set.
    pub fn skips_mirroring(&self) -> bool {
        self.metadata
            .labels
            .get(LABEL_SKIP_MIRROR)
            .is_some_and(|v| v == "true")
    }

    /// The EndpointSlices the mirroring controller writes for it
    /// (`pkg/controller/endpointslicemirroring`): one per subset and
    /// address family, labelled with the service name and
    /// `managed-by: endpointslicemirroring-controller.k8s.io`; `addresses`
    /// are ready, `notReadyAddresses` not; at most
    /// [`MIRRORING_MAX_ENDPOINTS_PER_SUBSET`] addresses per subset; an
    /// address that is no IP is left out, as the controller drops it. The
    /// controller names slices `<endpoints>-<random>`; ours are
    /// `<endpoints>-mirror-<subset>-<ipv4|ipv6>` so that the same input
    /// gives the same names.
    pub fn mirror(&self) -> Vec<EndpointSliceManifest> {
        let name = self.metadata.name.clone().unwrap_or_default();
        let mut out = Vec::new();
        for (i, subset) in self.subsets.iter().enumerate() {
            for (family, v6) in [("IPv4", false), ("IPv6", true)] {
                let eps: Vec<EndpointManifest> = subset
                    .addresses
                    .iter()
                    .map(|a| (a, true))
                    .chain(subset.not_ready_addresses.iter().map(|a| (a, false)))
                    .filter(|(a, _)| a.ip.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6() == v6))
                    .take(MIRRORING_MAX_ENDPOINTS_PER_SUBSET)
                    .map(|(a, ready)| EndpointManifest {
                        addresses: vec![a.ip.clone()],
                        conditions: Conditions {
                            ready: Some(ready),
                            ..Conditions::default()
                        },
                        hostname: a.hostname.clone(),
                        node_name: a.node_name.clone(),
                        zone: None,
                        hints: None,
                    })
                    .collect();
                if eps.is_empty() {
                    continue;
                }
                let mut labels = BTreeMap::new();
                labels.insert(LABEL_SERVICE_NAME.to_owned(), name.clone());
                labels.insert(LABEL_MANAGED_BY.to_owned(), MIRRORING_CONTROLLER.to_owned());
                out.push(EndpointSliceManifest {
                    api_version: api_discovery_v1(),
                    kind: kind_endpoint_slice(),
                    metadata: ObjectMeta {
                        name: Some(format!("{name}-mirror-{i}-{}", family.to_lowercase())),
                        namespace: self.metadata.namespace.clone(),
                        labels,
                        annotations: BTreeMap::new(),
                        resource_version: None,
                    },
                    address_type: Some(family.to_owned()),
                    endpoints: eps,
                    ports: subset.ports.clone(),
                });
            }
        }
        out
    }
}

/// Where a document came from: a file (if known), the document's number in
/// it, and the position in a `List`'s `items`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The file name (or any label the caller gave).
    pub source: Option<String>,
    /// The document's number in the file, from 1 (YAML `---` documents,
    /// concatenated JSON values).
    pub document: usize,
    /// The index in a list kind's `items`.
    pub item: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.source.as_deref().unwrap_or("<input>"))?;
        // Document 0: the input as a whole (its size, its bytes).
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
        }
        if let Some(i) = self.item {
            write!(f, ", items[{i}]")?;
        }
        Ok(())
    }
}

/// An object's identity in messages: `Service messaging/kafka-headless`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    /// `kind` (`?` when absent).
    pub kind: String,
    /// `metadata.namespace` (`default` when absent).
    pub namespace: String,
    /// `metadata.name` (`?` when absent).
    pub name: String,
}

impl ObjectRef {
    /// Reads kind, namespace and name loosely from an undecoded object.
    fn of_value(v: &Value) -> Self {
        let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let meta = v.get("metadata");
        ObjectRef {
            kind: s(v.get("kind")).unwrap_or_else(|| "?".into()),
            namespace: s(meta.and_then(|m| m.get("namespace")))
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
            name: s(meta.and_then(|m| m.get("name"))).unwrap_or_else(|| "?".into()),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A manifest that could not be read or converted. Every variant names
/// where it came from; those about one object name it and the field path.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The text is not valid JSON or YAML (the message carries the
    /// parser's line and column).
    #[error("{origin}: invalid {format}: {message}")]
    Syntax {
        /// Where.
        origin: Origin,
        /// `JSON` or `YAML`.
        format: &'static str,
        /// The parser's message.
        message: String,
    },
    /// A field has the wrong shape (a string where a number belongs, a
    /// missing required field).
    #[error("{origin}: {object}: {field}: {message}")]
    Decode {
        /// Where.
        origin: Origin,
        /// Which object.
        object: ObjectRef,
        /// The field path, e.g. `spec.ports[0].port`.
        field: String,
        /// What was wrong.
        message: String,
    },
    /// A field failed validation (through the model's builders).
    #[error("{origin}: {object}: {source}")]
    Invalid {
        /// Where.
        origin: Origin,
        /// Which object.
        object: ObjectRef,
        /// The validation error, naming the field path and value.
        #[source]
        source: ValidationError,
    },
    /// The input passed one of the [`InputLimits`].
    #[error("{origin}: input over the {limit} limit of {max}")]
    Limit {
        /// Where (document 0: the input as a whole).
        origin: Origin,
        /// Which limit.
        limit: crate::k8s::input::Limit,
        /// Its value.
        max: u64,
    },
    /// An object has the same key twice (YAML and JSON parsers would
    /// silently keep the last; Kubernetes' strict decoding refuses it).
    #[error("{origin}: {field}: duplicate key {key:?} ({location})")]
    DuplicateKey {
        /// Where.
        origin: Origin,
        /// The path of the object holding the key (`metadata.labels`).
        field: String,
        /// The key.
        key: String,
        /// The parser's position of the second occurrence.
        location: String,
    },
    /// The input is not text: a NUL byte or invalid UTF-8 at `offset`.
    #[error("{origin}: not YAML or JSON text: {reason} at byte {offset}")]
    NotText {
        /// Where.
        origin: Origin,
        /// The byte offset.
        offset: u64,
        /// What was found.
        reason: &'static str,
    },
    /// The input could not be read.
    #[error("{origin}: {message}")]
    Read {
        /// Where.
        origin: Origin,
        /// The operating system's message.
        message: String,
    },
}

/// Several bad objects of one input, each with its error (up to a limit:
/// `more` counts those left out).
#[derive(Debug, Clone, Default, PartialEq, Eq, Error)]
pub struct ManifestErrors {
    /// The errors, in input order.
    pub errors: Vec<ManifestError>,
    /// How many more errors there were.
    pub more: usize,
}

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.errors.len() + self.more;
        if total != 1 {
            write!(f, "{total} bad objects:")?;
        }
        for (i, e) in self.errors.iter().enumerate() {
            if total == 1 {
                write!(f, "{e}")?;
            } else {
                write!(f, "\n  {}: {e}", i + 1)?;
            }
        }
        if self.more > 0 {
            write!(f, "\n  ... and {} more", self.more)?;
        }
        Ok(())
    }
}

impl ManifestErrors {
    /// The default number of errors kept.
    pub const DEFAULT_MAX: usize = 20;

    /// Adds an error, or counts it past `max`.
    pub fn push(&mut self, e: ManifestError, max: usize) {
        if self.errors.len() < max {
            self.errors.push(e);
        } else {
            self.more += 1;
        }
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty() && self.more == 0
    }
}

impl ManifestError {
    /// The field path the error names (empty for syntax errors).
    pub fn field(&self) -> &str {
        match self {
            ManifestError::Syntax { .. }
            | ManifestError::Limit { .. }
            | ManifestError::NotText { .. }
            | ManifestError::Read { .. } => "",
            ManifestError::Decode { field, .. } | ManifestError::DuplicateKey { field, .. } => {
                field
            }
            ManifestError::Invalid { source, .. } => source.field(),
        }
    }

    /// Where the bad document came from.
    pub fn origin(&self) -> &Origin {
        match self {
            ManifestError::Syntax { origin, .. }
            | ManifestError::Decode { origin, .. }
            | ManifestError::Invalid { origin, .. }
            | ManifestError::Limit { origin, .. }
            | ManifestError::DuplicateKey { origin, .. }
            | ManifestError::NotText { origin, .. }
            | ManifestError::Read { origin, .. } => origin,
        }
    }
}

/// A document's object, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Where it came from.
    pub origin: Origin,
    /// The object.
    pub manifest: Manifest,
    /// The watch event that carried it ([`EventType::Added`] for a plain
    /// object).
    pub event: EventType,
}

/// The `type` of a watch event (`kubectl get --watch
/// --output-watch-events`). BOOKMARK events are skipped and ERROR events
/// reported in [`Manifests::watch_errors`]; these are the ones kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum EventType {
    /// `ADDED` (and a plain object): an upsert.
    #[default]
    Added,
    /// `MODIFIED`: an upsert.
    Modified,
    /// `DELETED`: a delete.
    Deleted,
}

/// A watch stream's `ERROR` event (its object is a `Status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchError {
    /// Where it came from.
    pub origin: Origin,
    /// `code`, `reason` and `message` of the Status.
    pub message: String,
}

impl fmt::Display for WatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: watch ERROR event: {}", self.origin, self.message)
    }
}

/// An object that was read but not taken, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Where it came from.
    pub origin: Origin,
    /// Which object.
    pub object: ObjectRef,
    /// Why it was skipped.
    pub reason: &'static str,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: skipped: {}",
            self.origin, self.object, self.reason
        )
    }
}

/// The changes a set of manifests makes, and what it skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeBatch {
    /// The changes in document order (watch order: the table keeps a slice
    /// that comes before its service pending, so any order applies).
    pub changes: Vec<Change>,
    /// Where each change came from (`origins[i]` for `changes[i]`), to name
    /// the document when the table refuses a change
    /// ([`UpdateError::InBatch`](crate::UpdateError::InBatch) gives its index).
    pub origins: Vec<Origin>,
    /// Objects not turned into changes.
    pub skipped: Vec<Skipped>,
}

/// The objects read from one or more manifest texts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifests {
    /// Services, EndpointSlices and Endpoints, in document order.
    pub documents: Vec<Document>,
    /// Objects of other kinds, skipped.
    pub skipped: Vec<Skipped>,
    /// `ERROR` events of a watch stream.
    pub watch_errors: Vec<WatchError>,
}

impl Manifests {
    /// No objects.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads JSON if the text starts with `{` or `[` (after white space
    /// and a byte-order mark), YAML otherwise, and YAML flow style (`{kind:
    /// Service}`) when the JSON parser stops at a character that shows it.
    /// Within the default [`InputLimits`]. `source` names the file in
    /// errors. Watch events (`{"type": ..., "object": ...}`) are read too,
    /// see [`Document::event`].
    ///
    /// # Errors
    /// The first [`ManifestError`]; nothing is returned for the others (see
    /// [`Manifests::read`] for all of them).
    pub fn parse_str(text: &str, source: Option<&str>) -> Result<Self, ManifestError> {
        Self::parse_str_with(text, source, &InputLimits::default())
    }

    /// [`Manifests::parse_str`] within `limits`.
    ///
    /// # Errors
    /// See [`Manifests::parse_str`]; a limit passed is a
    /// [`ManifestError::Limit`] naming it.
    pub fn parse_str_with(
        text: &str,
        source: Option<&str>,
        limits: &InputLimits,
    ) -> Result<Self, ManifestError> {
        Self::first_error(Self::read(text, source, limits, None))
    }

    fn first_error((m, errors): (Self, Vec<ManifestError>)) -> Result<Self, ManifestError> {
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(m),
        }
    }

    /// Reads every object it can: an object that does not decode is
    /// returned with its error and the reading goes on; a syntax error or
    /// a limit ends the input (also returned). `format` forces JSON or
    /// YAML; `None` decides from the text as [`Manifests::parse_str`] does.
    pub fn read(
        text: &str,
        source: Option<&str>,
        limits: &InputLimits,
        format: Option<InputFormat>,
    ) -> (Self, Vec<ManifestError>) {
        let mut out = Manifests::new();
        let mut errors = Vec::new();
        let mut objects = 0usize;
        let format = format.map(|f| match f {
            InputFormat::Json => Format::Json,
            InputFormat::Yaml => Format::Yaml,
        });
        let end = input::for_each_document(text, source, limits, format, |value, origin| {
            out.add_value(value, origin, limits, &mut objects, &mut errors)
        });
        if let Err(e) = end {
            errors.push(e);
        }
        (out, errors)
    }

    /// Reads one or more concatenated JSON values (objects, or arrays of
    /// objects).
    ///
    /// # Errors
    /// See [`Manifests::parse_str`].
    pub fn parse_json(text: &str, source: Option<&str>) -> Result<Self, ManifestError> {
        Self::first_error(Self::read(
            text,
            source,
            &InputLimits::default(),
            Some(InputFormat::Json),
        ))
    }

    /// Reads one or more `---`-separated YAML documents. Empty documents
    /// are ignored.
    ///
    /// # Errors
    /// See [`Manifests::parse_str`].
    pub fn parse_yaml(text: &str, source: Option<&str>) -> Result<Self, ManifestError> {
        Self::first_error(Self::read(
            text,
            source,
            &InputLimits::default(),
            Some(InputFormat::Yaml),
        ))
    }

    /// Adds the objects of another set after these.
    pub fn extend(&mut self, other: Manifests) {
        self.documents.extend(other.documents);
        self.skipped.extend(other.skipped);
        self.watch_errors.extend(other.watch_errors);
    }

    fn add_value(
        &mut self,
        value: Value,
        origin: Origin,
        limits: &InputLimits,
        objects: &mut usize,
        errors: &mut Vec<ManifestError>,
    ) -> Result<(), ManifestError> {
        match value {
            Value::Null => Ok(()),
            Value::Array(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    let origin = Origin {
                        item: Some(i),
                        ..origin.clone()
                    };
                    self.add_counted(item, origin, EventType::Added, limits, objects, errors)?;
                }
                Ok(())
            }
            other => self.add_counted(other, origin, EventType::Added, limits, objects, errors),
        }
    }

    /// Counts the object against the limit (an error there ends the
    /// input), then adds it (an error there is kept, and reading goes on).
    fn add_counted(
        &mut self,
        value: Value,
        origin: Origin,
        event: EventType,
        limits: &InputLimits,
        objects: &mut usize,
        errors: &mut Vec<ManifestError>,
    ) -> Result<(), ManifestError> {
        *objects += 1;
        if *objects > limits.max_objects {
            return Err(ManifestError::Limit {
                origin,
                limit: Limit::Objects,
                max: limits.max_objects as u64,
            });
        }
        // A list's items are objects of their own.
        if let Value::Object(map) = &value {
            let kind = map.get("kind").and_then(Value::as_str).unwrap_or("");
            if kind.ends_with("List") {
                let object = ObjectRef::of_value(&value);
                let Value::Object(mut map) = value else {
                    unreachable!("matched above")
                };
                return match map.remove("items") {
                    None | Some(Value::Null) => Ok(()),
                    Some(Value::Array(items)) => {
                        for (i, item) in items.into_iter().enumerate() {
                            let origin = Origin {
                                item: Some(i),
                                ..origin.clone()
                            };
                            self.add_counted(item, origin, event, limits, objects, errors)?;
                        }
                        Ok(())
                    }
                    Some(other) => {
                        errors.push(ManifestError::Decode {
                            origin,
                            object,
                            field: "items".into(),
                            message: format!("expected a list, found {}", kind_of(&other)),
                        });
                        Ok(())
                    }
                };
            }
            if kind.is_empty() && map.contains_key("type") && map.contains_key("object") {
                return self.add_event(value, origin, limits, objects, errors);
            }
        }
        if let Err(e) = self.add_object(value, origin, event) {
            errors.push(e);
        }
        Ok(())
    }

    /// A watch event: `{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR", "object": {...}}`.
    fn add_event(
        &mut self,
        value: Value,
        origin: Origin,
        limits: &InputLimits,
        objects: &mut usize,
        errors: &mut Vec<ManifestError>,
    ) -> Result<(), ManifestError> {
        let Value::Object(mut map) = value else {
            unreachable!("an event is an object")
        };
        let object = map.remove("object").unwrap_or(Value::Null);
        let event = match map.get("type").and_then(Value::as_str) {
            Some("ADDED") => EventType::Added,
            Some("MODIFIED") => EventType::Modified,
            Some("DELETED") => EventType::Deleted,
            Some("BOOKMARK") => {
                self.skipped.push(Skipped {
                    origin,
                    object: ObjectRef::of_value(&object),
                    reason: "a watch BOOKMARK event (a resourceVersion checkpoint)",
                });
                return Ok(());
            }
            Some("ERROR") => {
                let s = |k: &str| {
                    object
                        .get(k)
                        .map(|v| v.to_string().trim_matches('"').to_owned())
                };
                let message = [s("code"), s("reason"), s("message")]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" ");
                self.watch_errors.push(WatchError { origin, message });
                return Ok(());
            }
            other => {
                errors.push(ManifestError::Invalid {
                    origin,
                    object: ObjectRef::of_value(&object),
                    source: ValidationError::Invalid {
                        field: "type".into(),
                        value: other.map_or_else(|| "(none)".to_owned(), str::to_owned),
                        reason: "a watch event's type must be ADDED, MODIFIED, DELETED, BOOKMARK or ERROR",
                    },
                });
                return Ok(());
            }
        };
        // The object is counted with the event.
        *objects -= 1;
        self.add_counted(object, origin, event, limits, objects, errors)
    }

    fn add_object(
        &mut self,
        value: Value,
        origin: Origin,
        event: EventType,
    ) -> Result<(), ManifestError> {
        let object = ObjectRef::of_value(&value);
        if !value.is_object() {
            return Err(ManifestError::Decode {
                origin,
                object,
                field: String::new(),
                message: format!("expected an object, found {}", kind_of(&value)),
            });
        }
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        let api = value.get("apiVersion").and_then(Value::as_str);
        let check_api = |want: &'static str| match api {
            Some(a) if a != want => Err(ManifestError::Invalid {
                origin: origin.clone(),
                object: object.clone(),
                source: ValidationError::Invalid {
                    field: "apiVersion".into(),
                    value: a.into(),
                    reason: match kind {
                        "Service" => "a Service must be apiVersion v1",
                        "Endpoints" => "an Endpoints must be apiVersion v1",
                        _ => "an EndpointSlice must be apiVersion discovery.k8s.io/v1",
                    },
                },
            }),
            _ => Ok(()),
        };
        let manifest = match kind {
            "" => {
                return Err(ManifestError::Invalid {
                    origin,
                    object,
                    source: ValidationError::Missing {
                        field: "kind".into(),
                    },
                });
            }
            "Service" => {
                check_api("v1")?;
                Manifest::Service(decode(value, &origin, &object)?)
            }
            "EndpointSlice" => {
                check_api("discovery.k8s.io/v1")?;
                Manifest::EndpointSlice(decode(value, &origin, &object)?)
            }
            "Endpoints" => {
                check_api("v1")?;
                Manifest::Endpoints(decode(value, &origin, &object)?)
            }
            _ => {
                self.skipped.push(Skipped {
                    origin,
                    object,
                    reason: "not a Service, EndpointSlice or Endpoints",
                });
                return Ok(());
            }
        };
        self.documents.push(Document {
            origin,
            manifest,
            event,
        });
        Ok(())
    }

    /// The Services, in document order.
    pub fn services(&self) -> impl Iterator<Item = (&Origin, &ServiceManifest)> {
        self.documents.iter().filter_map(|d| match &d.manifest {
            Manifest::Service(s) => Some((&d.origin, s)),
            _ => None,
        })
    }

    /// The EndpointSlices, in document order.
    pub fn endpoint_slices(&self) -> impl Iterator<Item = (&Origin, &EndpointSliceManifest)> {
        self.documents.iter().filter_map(|d| match &d.manifest {
            Manifest::EndpointSlice(s) => Some((&d.origin, s)),
            _ => None,
        })
    }

    /// Converts every object into a [`Change`], in document order: an
    /// upsert, or a delete for a `DELETED` watch event. Slices without the
    /// `kubernetes.io/service-name` label (kube-proxy ignores them) are
    /// skipped, and so are v1 Endpoints
    /// except those of a selector-less Service in the same input, which
    /// are mirrored into EndpointSlices ([`EndpointsManifest::mirror`]).
    ///
    /// # Errors
    /// [`ManifestError::Invalid`] for the first object that fails
    /// validation, naming its origin, the object and the field (see
    /// [`Manifests::changes_lenient`] for all of them).
    pub fn changes(&self) -> Result<ChangeBatch, ManifestError> {
        let (batch, errors) = self.changes_lenient(|_| None);
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(batch),
        }
    }

    /// [`Manifests::changes`], converting every object it can: the bad
    /// ones are returned with their errors, in document order.
    /// `has_selector` says, for services not in this input, whether one has
    /// a selector (`None`: unknown), so that their Endpoints mirror.
    pub fn changes_lenient(
        &self,
        has_selector: impl Fn(&crate::model::service::ServiceKey) -> Option<bool>,
    ) -> (ChangeBatch, Vec<ManifestError>) {
        self.changes_lenient_in(crate::model::service::DEFAULT_NODE_PORT_RANGE, has_selector)
    }

    /// [`Manifests::changes_lenient`] with `spec.ports[].nodePort` checked
    /// against `node_port_range` (the API server's
    /// `--service-node-port-range`) instead of the default 30000-32767
    /// ([`ServiceManifest::to_service_in`]).
    pub fn changes_lenient_in(
        &self,
        node_port_range: core::ops::RangeInclusive<u16>,
        has_selector: impl Fn(&crate::model::service::ServiceKey) -> Option<bool>,
    ) -> (ChangeBatch, Vec<ManifestError>) {
        use crate::model::endpoint_slice::SliceKey;
        let mut batch = ChangeBatch::default();
        let mut errors = Vec::new();
        let selectors: BTreeMap<crate::model::service::ServiceKey, bool> = self
            .services()
            .map(|(_, s)| (s.key(), s.spec.selector.is_some()))
            .collect();
        for d in &self.documents {
            let origin = &d.origin;
            let deleted = d.event == EventType::Deleted;
            match &d.manifest {
                Manifest::Service(svc) => {
                    if deleted {
                        batch.changes.push(Change::DeleteService(svc.key()));
                        batch.origins.push(origin.clone());
                        continue;
                    }
                    match svc.to_service_in(node_port_range.clone()) {
                        Ok(service) => {
                            batch.changes.push(Change::UpsertService(service));
                            batch.origins.push(origin.clone());
                        }
                        Err(source) => errors.push(ManifestError::Invalid {
                            origin: origin.clone(),
                            object: svc.object_ref(),
                            source,
                        }),
                    }
                }
                Manifest::EndpointSlice(slice) => {
                    if slice.service_name().is_none_or(str::is_empty) {
                        batch.skipped.push(Skipped {
                            origin: origin.clone(),
                            object: slice.object_ref(),
                            reason: "no kubernetes.io/service-name label (kube-proxy ignores such slices)",
                        });
                        continue;
                    }
                    if deleted {
                        batch.changes.push(Change::DeleteSlice(SliceKey::new(
                            slice.metadata.namespace_or_default(),
                            slice.metadata.name.clone().unwrap_or_default(),
                        )));
                        batch.origins.push(origin.clone());
                        continue;
                    }
                    match slice.to_endpoint_slice() {
                        Ok(s) => {
                            batch.changes.push(Change::UpsertSlice(s));
                            batch.origins.push(origin.clone());
                        }
                        Err(source) => errors.push(ManifestError::Invalid {
                            origin: origin.clone(),
                            object: slice.object_ref(),
                            source,
                        }),
                    }
                }
                Manifest::Endpoints(eps) => {
                    let key = eps.service_key();
                    let selector = selectors.get(&key).copied().or_else(|| has_selector(&key));
                    let reason = match selector {
                        _ if eps.skips_mirroring() => {
                            Some("labelled endpointslice.kubernetes.io/skip-mirror")
                        }
                        Some(true) => Some(
                            "its Service has a selector: the EndpointSlice controller writes its slices",
                        ),
                        None => Some("no Service of that name in the input: nothing to mirror for"),
                        Some(false) => None,
                    };
                    if let Some(reason) = reason {
                        batch.skipped.push(Skipped {
                            origin: origin.clone(),
                            object: eps.object_ref(),
                            reason,
                        });
                        continue;
                    }
                    for m in eps.mirror() {
                        let change = if deleted {
                            Ok(Change::DeleteSlice(SliceKey::new(
                                m.metadata.namespace_or_default(),
                                m.metadata.name.clone().unwrap_or_default(),
                            )))
                        } else {
                            m.to_endpoint_slice().map(Change::UpsertSlice)
                        };
                        match change {
                            Ok(c) => {
                                batch.changes.push(c);
                                batch.origins.push(origin.clone());
                            }
                            Err(source) => errors.push(ManifestError::Invalid {
                                origin: origin.clone(),
                                object: eps.object_ref(),
                                source,
                            }),
                        }
                    }
                }
            }
        }
        (batch, errors)
    }
}

/// The format of an input, when the caller knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// JSON (concatenated values).
    Json,
    /// YAML (`---`-separated documents).
    Yaml,
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn decode<T: for<'de> Deserialize<'de>>(
    value: Value,
    origin: &Origin,
    object: &ObjectRef,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        ManifestError::Decode {
            origin: origin.clone(),
            object: object.clone(),
            field: if field == "." { String::new() } else { field },
            message: input::kubernetes_terms(&e.into_inner().to_string()),
        }
    })
}

fn parse_protocol(field: String, value: Option<&str>) -> Result<Protocol, ValidationError> {
    match value {
        None | Some("") => Ok(Protocol::Tcp),
        Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(ValidationError::Invalid {
            field,
            value: other.into(),
            reason: "must be TCP, UDP or SCTP",
        }),
    }
}

fn parse_policy(field: &str, value: Option<&str>) -> Result<TrafficPolicy, ValidationError> {
    match value {
        None | Some("") | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(ValidationError::Invalid {
            field: field.into(),
            value: other.into(),
            reason: "must be Cluster or Local",
        }),
    }
}

/// An IP as kube-proxy reads it (leading zeros are decimal).
fn parse_ip(field: String, value: &str) -> Result<IpAddr, ValidationError> {
    crate::model::names::parse_ip_sloppy(value).ok_or_else(|| ValidationError::Invalid {
        field,
        value: value.into(),
        reason: "must be an IP address, or None for a headless service",
    })
}

/// An external or load-balancer IP, read leniently as kube-proxy does.
fn parse_plain_ip(field: String, value: &str) -> Result<IpAddr, ValidationError> {
    crate::model::names::parse_ip_sloppy(value).ok_or_else(|| ValidationError::Invalid {
        field,
        value: value.into(),
        reason: "must be a valid IP address",
    })
}

/// A CIDR, its address read leniently (kube-proxy's ParseCIDRSloppy).
fn parse_cidr_sloppy(field: &str, value: &str) -> Result<crate::render::Cidr, ValidationError> {
    let v = value.trim();
    match v.split_once('/') {
        Some((a, len)) => match crate::model::names::parse_ip_sloppy(a) {
            Some(ip) => {
                crate::render::Cidr::parse(field, &format!("{ip}/{len}")).map_err(|e| match e {
                    ValidationError::Invalid { field, reason, .. } => ValidationError::Invalid {
                        field,
                        value: value.into(),
                        reason,
                    },
                    e => e,
                })
            }
            None => crate::render::Cidr::parse(field, v),
        },
        None => crate::render::Cidr::parse(field, v),
    }
}

impl ServiceManifest {
    /// `Service namespace/name`.
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef {
            kind: "Service".into(),
            namespace: self.metadata.namespace_or_default().into(),
            name: self.metadata.name.clone().unwrap_or_else(|| "?".into()),
        }
    }

    /// The service's key (`namespace/name`, the namespace defaulted).
    pub fn key(&self) -> crate::model::service::ServiceKey {
        crate::model::service::ServiceKey::new(
            self.metadata.namespace_or_default(),
            self.metadata.name.clone().unwrap_or_default(),
        )
    }

    /// Whether `spec.type` is `ExternalName`.
    pub fn is_external_name(&self) -> bool {
        self.spec.type_.as_deref() == Some("ExternalName")
    }

    /// Fills in what the API server defaults (`SetDefaults_Service`):
    /// `type: ClusterIP`; `sessionAffinity: None` (which clears
    /// `sessionAffinityConfig`); a `ClientIP` affinity without a timeout gets
    /// 10800 s; each port's `protocol: TCP` and `targetPort` = `port` when
    /// absent, 0 or empty; `internalTrafficPolicy: Cluster` for ClusterIP,
    /// NodePort and LoadBalancer services; `externalTrafficPolicy: Cluster`
    /// for externally accessible services (NodePort, LoadBalancer, ClusterIP
    /// with `externalIPs`); `clusterIPs` = \[`clusterIP`\]
    /// when only `clusterIP` is given (and the reverse).
    pub fn apply_defaults(&mut self) {
        let spec = &mut self.spec;
        if spec.type_.as_deref().is_none_or(str::is_empty) {
            spec.type_ = Some("ClusterIP".into());
        }
        if spec.session_affinity.as_deref().is_none_or(str::is_empty) {
            spec.session_affinity = Some("None".into());
        }
        match spec.session_affinity.as_deref() {
            Some("None") => spec.session_affinity_config = None,
            Some("ClientIP") => {
                let cfg = spec
                    .session_affinity_config
                    .get_or_insert_with(Default::default);
                let ip = cfg.client_ip.get_or_insert_with(Default::default);
                ip.timeout_seconds
                    .get_or_insert(i64::from(DEFAULT_AFFINITY_TIMEOUT_SECS));
            }
            _ => {}
        }
        for p in &mut spec.ports {
            if p.protocol.as_deref().is_none_or(str::is_empty) {
                p.protocol = Some("TCP".into());
            }
            match &p.target_port {
                None | Some(IntOrString::Int(0)) => p.target_port = Some(IntOrString::Int(p.port)),
                Some(IntOrString::String(s)) if s.is_empty() => {
                    p.target_port = Some(IntOrString::Int(p.port))
                }
                _ => {}
            }
        }
        let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
        let external = matches!(ty, "NodePort" | "LoadBalancer");
        // `ExternallyAccessible`: a ClusterIP service with external IPs too.
        let accessible = external || (ty == "ClusterIP" && !spec.external_ips.is_empty());
        if accessible
            && spec
                .external_traffic_policy
                .as_deref()
                .is_none_or(str::is_empty)
        {
            spec.external_traffic_policy = Some("Cluster".into());
        }
        if (external || ty == "ClusterIP") && spec.internal_traffic_policy.is_none() {
            spec.internal_traffic_policy = Some("Cluster".into());
        }
        match (&spec.cluster_ip, spec.cluster_ips.first()) {
            (Some(ip), None) if !ip.is_empty() => spec.cluster_ips = vec![ip.clone()],
            (None, Some(first)) => spec.cluster_ip = Some(first.clone()),
            _ => {}
        }
    }

    /// Converts into a validated [`Service`] (after
    /// [`apply_defaults`](Self::apply_defaults), on a copy).
    ///
    /// `topology_mode` is taken from the annotation
    /// `service.kubernetes.io/topology-aware-hints` if set, else from
    /// `service.kubernetes.io/topology-mode`.
    ///
    /// # Errors
    /// A [`ValidationError`] naming the field: anything the builder refuses,
    /// an unknown `type`, `protocol`, `sessionAffinity`, traffic policy or
    /// `trafficDistribution`, a `clusterIP` that is no IP, a `clusterIPs[0]`
    /// that differs from `clusterIP`, an external or load-balancer IP that
    /// is no IP, a source range that is no CIDR, an unknown `ipMode`.
    pub fn to_service(&self) -> Result<Service, ValidationError> {
        self.to_service_in(crate::model::service::DEFAULT_NODE_PORT_RANGE)
    }

    /// [`ServiceManifest::to_service`] for a cluster whose API server has
    /// `--service-node-port-range` set to `node_port_range`: each
    /// `spec.ports[].nodePort` must fall in it.
    ///
    /// # Errors
    /// See [`ServiceManifest::to_service`].
    pub fn to_service_in(
        &self,
        node_port_range: core::ops::RangeInclusive<u16>,
    ) -> Result<Service, ValidationError> {
        let mut m = self.clone();
        m.apply_defaults();
        let spec = &m.spec;
        let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
        let service_type = match ty {
            "ClusterIP" => ServiceType::ClusterIP,
            "NodePort" => ServiceType::NodePort,
            "LoadBalancer" => ServiceType::LoadBalancer,
            "ExternalName" => ServiceType::ExternalName,
            other => {
                return Err(ValidationError::Invalid {
                    field: "spec.type".into(),
                    value: other.into(),
                    reason: "must be ClusterIP, NodePort, LoadBalancer or ExternalName",
                });
            }
        };
        let mut b = Service::builder(
            m.metadata.namespace_or_default(),
            m.metadata.name.clone().unwrap_or_default(),
        )
        .service_type(service_type)
        .node_port_range(node_port_range);
        if let Some(n) = &spec.external_name {
            b = b.external_name(n.clone());
        }
        for (i, ip) in spec.external_ips.iter().enumerate() {
            b = b.external_ip(parse_plain_ip(format!("spec.externalIPs[{i}]"), ip)?);
        }
        for (i, c) in spec.load_balancer_source_ranges.iter().enumerate() {
            b = b.load_balancer_source_range(parse_cidr_sloppy(
                &format!("spec.loadBalancerSourceRanges[{i}]"),
                c,
            )?);
        }
        if let Some(p) = spec.health_check_node_port {
            b = b.health_check_node_port(p);
        }
        if let Some(a) = spec.allocate_load_balancer_node_ports {
            b = b.allocate_load_balancer_node_ports(a);
        }
        let ingress = m
            .status
            .load_balancer
            .as_ref()
            .map(|lb| lb.ingress.as_slice())
            .unwrap_or_default();
        for (i, ing) in ingress.iter().enumerate() {
            let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
                continue;
            };
            let ip = parse_plain_ip(format!("status.loadBalancer.ingress[{i}].ip"), ip)?;
            let mode = match ing.ip_mode.as_deref() {
                None | Some("") | Some("VIP") => IpMode::VIP,
                Some("Proxy") => IpMode::Proxy,
                Some(other) => {
                    return Err(ValidationError::Invalid {
                        field: format!("status.loadBalancer.ingress[{i}].ipMode"),
                        value: other.into(),
                        reason: "must be VIP or Proxy",
                    });
                }
            };
            b = b.load_balancer_ingress(ip, mode);
        }
        let headless = spec.cluster_ip.as_deref() == Some("None")
            || spec.cluster_ips.first().map(String::as_str) == Some("None");
        if service_type == ServiceType::ExternalName && (headless || spec.cluster_ips.is_empty()) {
            // No cluster IP: the builder checks that none is given.
        } else if headless {
            b = b.headless();
            if let Some(ip) = spec.cluster_ips.get(1) {
                return Err(ValidationError::Invalid {
                    field: "spec.clusterIPs[1]".into(),
                    value: ip.clone(),
                    reason: "a headless service has clusterIPs [None]",
                });
            }
        } else {
            if let (Some(ip), Some(first)) = (&spec.cluster_ip, spec.cluster_ips.first()) {
                if ip != first {
                    return Err(ValidationError::Invalid {
                        field: "spec.clusterIPs[0]".into(),
                        value: first.clone(),
                        reason: "must equal spec.clusterIP",
                    });
                }
            }
            for (i, ip) in spec.cluster_ips.iter().enumerate() {
                if !ip.is_empty() {
                    b = b.cluster_ip(parse_ip(format!("spec.clusterIPs[{i}]"), ip)?);
                }
            }
        }
        for (i, p) in spec.ports.iter().enumerate() {
            let protocol =
                parse_protocol(format!("spec.ports[{i}].protocol"), p.protocol.as_deref())?;
            let mut ps = ServicePortSpec::new(protocol, p.port);
            ps.name = p.name.clone().filter(|n| !n.is_empty());
            ps.target_port = p.target_port.as_ref().map(|t| match t {
                IntOrString::Int(n) => TargetPortSpec::Number(*n),
                IntOrString::String(s) => TargetPortSpec::Name(s.clone()),
            });
            ps.node_port = p.node_port;
            b = b.port(ps);
        }
        match spec.session_affinity.as_deref() {
            Some("None") | None => {}
            Some("ClientIP") => {
                let t = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                b = b.client_ip_affinity(t);
            }
            Some(other) => {
                return Err(ValidationError::Invalid {
                    field: "spec.sessionAffinity".into(),
                    value: other.into(),
                    reason: "must be None or ClientIP",
                });
            }
        }
        b = b.internal_traffic_policy(parse_policy(
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        )?);
        // Only when set: the builder refuses it, as the API server does, on
        // a service that is not externally accessible.
        if spec
            .external_traffic_policy
            .as_deref()
            .is_some_and(|p| !p.is_empty())
        {
            b = b.external_traffic_policy(parse_policy(
                "spec.externalTrafficPolicy",
                spec.external_traffic_policy.as_deref(),
            )?);
        }
        match spec.traffic_distribution.as_deref() {
            None | Some("") => {}
            Some("PreferClose") | Some("PreferSameZone") => {
                b = b.traffic_distribution(TrafficDistribution::PreferSameZone)
            }
            Some("PreferSameNode") => {
                b = b.traffic_distribution(TrafficDistribution::PreferSameNode)
            }
            Some(other) => {
                return Err(ValidationError::Invalid {
                    field: "spec.trafficDistribution".into(),
                    value: other.into(),
                    reason: "must be PreferSameZone, PreferSameNode or PreferClose",
                });
            }
        }
        let ann = &m.metadata.annotations;
        if let Some(mode) = ann
            .get(ANNOTATION_TOPOLOGY_AWARE_HINTS)
            .or_else(|| ann.get(ANNOTATION_TOPOLOGY_MODE))
        {
            b = b.topology_mode(mode.clone());
        }
        if let Some(kind) = ann.get(ANNOTATION_AFFINITY_KEY) {
            let kind =
                kind.parse::<crate::AffinityKeyKind>()
                    .map_err(|_| ValidationError::Invalid {
                        field: format!("metadata.annotations[{ANNOTATION_AFFINITY_KEY}]"),
                        value: kind.clone(),
                        reason: "must be one of client-ip, client-ip-port, caller",
                    })?;
            b = b.affinity_key(kind);
        }
        b = b.publish_not_ready_addresses(spec.publish_not_ready_addresses.unwrap_or(false));
        b.build()
    }
}

impl From<&Service> for ServiceManifest {
    /// The manifest of a model service, with the API defaults filled in
    /// (as `kubectl get -o yaml` would show it, less the server's fields).
    fn from(svc: &Service) -> Self {
        let key = svc.key();
        let mut annotations = BTreeMap::new();
        if let Some(mode) = svc.topology_mode() {
            annotations.insert(ANNOTATION_TOPOLOGY_MODE.to_owned(), mode.to_owned());
        }
        if svc.affinity_key() != crate::AffinityKeyKind::ClientIp {
            annotations.insert(
                ANNOTATION_AFFINITY_KEY.to_owned(),
                svc.affinity_key().name().to_owned(),
            );
        }
        let (cluster_ip, cluster_ips) = match svc.cluster_ip() {
            ClusterIp::Headless => (Some("None".to_owned()), vec!["None".to_owned()]),
            ClusterIp::Ips(ips) => {
                let all: Vec<String> = ips.iter().map(ToString::to_string).collect();
                (all.first().cloned(), all)
            }
        };
        let ports = svc
            .ports()
            .iter()
            .map(|p| ServicePortManifest {
                name: p.name().map(str::to_owned),
                protocol: Some(p.protocol().as_api_str().to_owned()),
                port: i64::from(p.port()),
                target_port: Some(match p.target_port() {
                    TargetPort::Number(n) => IntOrString::Int(i64::from(*n)),
                    TargetPort::Name(s) => IntOrString::String(s.clone()),
                }),
                node_port: p.node_port().map(i64::from),
                app_protocol: None,
            })
            .collect();
        let (session_affinity, session_affinity_config) = match svc.session_affinity() {
            SessionAffinity::None => ("None", None),
            SessionAffinity::ClientIp { timeout_secs } => (
                "ClientIP",
                Some(SessionAffinityConfig {
                    client_ip: Some(ClientIpConfig {
                        timeout_seconds: Some(i64::from(timeout_secs)),
                    }),
                }),
            ),
        };
        let policy = |p: TrafficPolicy| match p {
            TrafficPolicy::Cluster => "Cluster".to_owned(),
            TrafficPolicy::Local => "Local".to_owned(),
        };
        ServiceManifest {
            api_version: api_v1(),
            kind: kind_service(),
            metadata: ObjectMeta {
                name: Some(key.name.clone()),
                namespace: Some(key.namespace.clone()),
                labels: BTreeMap::new(),
                annotations,
                resource_version: None,
            },
            status: ServiceStatus {
                load_balancer: (!svc.load_balancer_ingress().is_empty()).then(|| {
                    LoadBalancerStatusManifest {
                        ingress: svc
                            .load_balancer_ingress()
                            .iter()
                            .map(|i| LoadBalancerIngressManifest {
                                ip: Some(i.ip.to_string()),
                                hostname: None,
                                ip_mode: Some(
                                    match i.ip_mode {
                                        IpMode::VIP => "VIP",
                                        IpMode::Proxy => "Proxy",
                                    }
                                    .into(),
                                ),
                            })
                            .collect(),
                    }
                }),
            },
            spec: ServiceSpec {
                type_: Some(svc.service_type().as_api_str().into()),
                cluster_ip,
                cluster_ips,
                ports,
                session_affinity: Some(session_affinity.into()),
                session_affinity_config,
                internal_traffic_policy: Some(policy(svc.internal_traffic_policy())),
                external_traffic_policy: match svc.external_traffic_policy() {
                    TrafficPolicy::Cluster => None,
                    TrafficPolicy::Local => Some(policy(TrafficPolicy::Local)),
                },
                traffic_distribution: svc.traffic_distribution().map(|d| {
                    match d {
                        TrafficDistribution::PreferSameZone => "PreferSameZone",
                        TrafficDistribution::PreferSameNode => "PreferSameNode",
                    }
                    .to_owned()
                }),
                publish_not_ready_addresses: svc.publish_not_ready_addresses().then_some(true),
                external_name: svc.external_name().map(str::to_owned),
                external_ips: svc.external_ips().iter().map(ToString::to_string).collect(),
                load_balancer_source_ranges: svc
                    .load_balancer_source_ranges()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                health_check_node_port: svc.health_check_node_port().map(i64::from),
                allocate_load_balancer_node_ports: (svc.service_type()
                    == crate::model::service::ServiceType::LoadBalancer
                    && !svc.allocate_load_balancer_node_ports())
                .then_some(false),
                selector: None,
                ip_families: Vec::new(),
                ip_family_policy: None,
            },
        }
    }
}

impl EndpointSliceManifest {
    /// `EndpointSlice namespace/name`.
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef {
            kind: "EndpointSlice".into(),
            namespace: self.metadata.namespace_or_default().into(),
            name: self.metadata.name.clone().unwrap_or_else(|| "?".into()),
        }
    }

    /// The service the slice belongs to (label `kubernetes.io/service-name`).
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(LABEL_SERVICE_NAME)
            .map(String::as_str)
    }

    /// Fills in what the API server defaults (`SetDefaults_EndpointPort`):
    /// each port's `name: ""` and `protocol: TCP` when absent. Conditions are
    /// not defaulted (absent stays absent, read as kube-proxy reads it).
    pub fn apply_defaults(&mut self) {
        for p in &mut self.ports {
            p.name.get_or_insert_with(String::new);
            if p.protocol.as_deref().is_none_or(str::is_empty) {
                p.protocol = Some("TCP".into());
            }
        }
    }

    /// Converts into a validated [`EndpointSlice`].
    ///
    /// # Errors
    /// A [`ValidationError`] naming the field: anything the builder refuses
    /// (a missing `kubernetes.io/service-name` label, addresses not matching
    /// `addressType`, ...), a missing or unknown `addressType`, an unknown
    /// `protocol`.
    pub fn to_endpoint_slice(&self) -> Result<EndpointSlice, ValidationError> {
        let mut m = self.clone();
        m.apply_defaults();
        let address_type = match m.address_type.as_deref() {
            Some("IPv4") => AddressType::IPv4,
            Some("IPv6") => AddressType::IPv6,
            Some("FQDN") => AddressType::Fqdn,
            None | Some("") => {
                return Err(ValidationError::Missing {
                    field: "addressType".into(),
                });
            }
            Some(other) => {
                return Err(ValidationError::Invalid {
                    field: "addressType".into(),
                    value: other.into(),
                    reason: "must be IPv4, IPv6 or FQDN",
                });
            }
        };
        let mut b = EndpointSlice::builder(
            m.metadata.namespace_or_default(),
            m.metadata.name.clone().unwrap_or_default(),
            m.service_name().unwrap_or_default(),
            address_type,
        );
        for (i, p) in m.ports.iter().enumerate() {
            b = b.port(SlicePortSpec {
                name: p.name.clone(),
                port: p.port,
                protocol: parse_protocol(format!("ports[{i}].protocol"), p.protocol.as_deref())?,
            });
        }
        for e in &m.endpoints {
            let hints = e.hints.clone().unwrap_or_default();
            b = b.endpoint(EndpointSpec {
                addresses: e.addresses.clone(),
                conditions: e.conditions,
                hostname: e.hostname.clone(),
                node_name: e.node_name.clone(),
                zone: e.zone.clone(),
                hint_zones: hints.for_zones.into_iter().map(|h| h.name).collect(),
                hint_nodes: hints.for_nodes.into_iter().map(|h| h.name).collect(),
                weight: None,
            });
        }
        b.build()
    }
}

impl From<&EndpointSlice> for EndpointSliceManifest {
    /// The manifest of a model slice (the svclb-only weight is not carried).
    fn from(slice: &EndpointSlice) -> Self {
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_SERVICE_NAME.to_owned(), slice.service().name.clone());
        let endpoints = slice
            .endpoints()
            .iter()
            .map(|e| {
                let hints = EndpointHints {
                    for_zones: e
                        .hint_zones()
                        .iter()
                        .map(|z| HintName { name: z.clone() })
                        .collect(),
                    for_nodes: e
                        .hint_nodes()
                        .iter()
                        .map(|n| HintName { name: n.clone() })
                        .collect(),
                };
                EndpointManifest {
                    addresses: e.addresses().iter().map(ToString::to_string).collect(),
                    conditions: e.conditions(),
                    hostname: e.hostname().map(str::to_owned),
                    node_name: e.node_name().map(str::to_owned),
                    zone: e.zone().map(str::to_owned),
                    hints: (hints != EndpointHints::default()).then_some(hints),
                }
            })
            .collect();
        let ports = slice
            .ports()
            .iter()
            .map(|p| EndpointPortManifest {
                name: Some(p.name().to_owned()),
                protocol: Some(p.protocol().as_api_str().to_owned()),
                port: p.port().map(i64::from),
                app_protocol: None,
            })
            .collect();
        EndpointSliceManifest {
            api_version: api_discovery_v1(),
            kind: kind_endpoint_slice(),
            metadata: ObjectMeta {
                name: Some(slice.key().name.clone()),
                namespace: Some(slice.key().namespace.clone()),
                labels,
                annotations: BTreeMap::new(),
                resource_version: None,
            },
            address_type: Some(slice.address_type().as_api_str().to_owned()),
            endpoints,
            ports,
        }
    }
}

impl Manifest {
    /// The object's identity.
    pub fn object_ref(&self) -> ObjectRef {
        match self {
            Manifest::Service(s) => s.object_ref(),
            Manifest::EndpointSlice(s) => s.object_ref(),
            Manifest::Endpoints(e) => e.object_ref(),
        }
    }

    /// The object as a YAML document (without the `---` separator).
    ///
    /// # Errors
    /// Never for these types in practice; the serializer's error is passed on.
    pub fn to_yaml(&self) -> Result<String, serde_yaml_ng::Error> {
        serde_yaml_ng::to_string(self)
    }

    /// The object as pretty JSON (4-space indent, like kubectl).
    ///
    /// # Errors
    /// Never for these types in practice; the serializer's error is passed on.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        self.serialize(&mut ser)?;
        Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Manifest {
        let m = Manifests::parse_str(text, Some("t")).unwrap();
        assert_eq!(m.documents.len(), 1, "{m:?}");
        m.documents.into_iter().next().unwrap().manifest
    }

    fn svc(text: &str) -> Result<Service, ValidationError> {
        match one(text) {
            Manifest::Service(s) => s.to_service(),
            other => panic!("not a service: {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_the_api_server() {
        let s = svc(
            "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
        )
        .unwrap();
        assert_eq!(s.key().namespace, "default");
        let p = &s.ports()[0];
        assert_eq!(p.protocol(), Protocol::Tcp);
        assert_eq!(p.target_port(), &TargetPort::Number(80));
        assert_eq!(s.session_affinity(), SessionAffinity::None);
        assert_eq!(s.internal_traffic_policy(), TrafficPolicy::Cluster);
        let s = svc("kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, sessionAffinity: ClientIP, ports: [{port: 80, targetPort: 0}]}")
            .unwrap();
        assert_eq!(
            s.session_affinity(),
            SessionAffinity::ClientIp {
                timeout_secs: 10_800
            }
        );
        assert_eq!(s.ports()[0].target_port(), &TargetPort::Number(80));
        // A config given with affinity None is cleared, as the defaulter does.
        let s = svc("kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, sessionAffinity: None, sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}, ports: [{port: 80}]}")
            .unwrap();
        assert_eq!(s.session_affinity(), SessionAffinity::None);
    }

    #[test]
    fn apply_defaults_fills_the_manifest() {
        let Manifest::Service(mut m) = one(
            "kind: Service\nmetadata: {name: a}\nspec: {type: NodePort, clusterIP: 10.96.0.1, sessionAffinity: ClientIP, ports: [{port: 80, targetPort: ''}]}",
        ) else {
            panic!()
        };
        m.apply_defaults();
        assert_eq!(m.spec.ports[0].protocol.as_deref(), Some("TCP"));
        assert_eq!(m.spec.ports[0].target_port, Some(IntOrString::Int(80)));
        assert_eq!(m.spec.external_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(m.spec.internal_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(m.spec.cluster_ips, vec!["10.96.0.1".to_string()]);
        assert_eq!(
            m.spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
            Some(10_800)
        );
        let Manifest::EndpointSlice(mut s) = one(
            "kind: EndpointSlice\nmetadata: {name: a-1}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: null",
        ) else {
            panic!()
        };
        s.apply_defaults();
        assert_eq!(s.ports[0].name.as_deref(), Some(""));
        assert_eq!(s.ports[0].protocol.as_deref(), Some("TCP"));
        assert!(s.endpoints.is_empty());
    }

    #[test]
    fn headless_dual_stack_and_policies() {
        let s = svc("kind: Service\nmetadata: {name: k, namespace: m}\nspec: {clusterIP: None, clusterIPs: [None], publishNotReadyAddresses: true, ports: [{name: kafka, port: 9092}]}").unwrap();
        assert!(s.is_headless());
        assert!(s.publish_not_ready_addresses());
        let s = svc("kind: Service\nmetadata: {name: d}\nspec: {clusterIP: 10.96.0.5, clusterIPs: [10.96.0.5, 'fd00::5'], ipFamilies: [IPv4, IPv6], internalTrafficPolicy: Local, trafficDistribution: PreferClose, ports: [{port: 80}]}").unwrap();
        assert_eq!(s.cluster_ip().addrs().len(), 2);
        assert_eq!(s.internal_traffic_policy(), TrafficPolicy::Local);
        assert_eq!(
            s.traffic_distribution(),
            Some(TrafficDistribution::PreferSameZone)
        );
        let err = svc("kind: Service\nmetadata: {name: d}\nspec: {clusterIP: 10.96.0.5, clusterIPs: [10.96.0.6], ports: [{port: 80}]}").unwrap_err();
        assert_eq!(err.field(), "spec.clusterIPs[0]");
        let err = svc(
            "kind: Service\nmetadata: {name: d}\nspec: {clusterIP: 10.96.0.x, ports: [{port: 80}]}",
        )
        .unwrap_err();
        assert_eq!(err.field(), "spec.clusterIPs[0]");
        assert!(err.to_string().contains("10.96.0.x"));
    }

    #[test]
    fn topology_annotations_deprecated_one_wins() {
        let s = svc("kind: Service\nmetadata: {name: a, annotations: {service.kubernetes.io/topology-mode: Auto}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}").unwrap();
        assert_eq!(s.topology_mode(), Some("Auto"));
        let s = svc("kind: Service\nmetadata: {name: a, annotations: {service.kubernetes.io/topology-mode: Auto, service.kubernetes.io/topology-aware-hints: Disabled}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}").unwrap();
        assert_eq!(s.topology_mode(), Some("Disabled"));
    }

    #[test]
    fn affinity_key_annotation() {
        use crate::AffinityKeyKind;
        let s = svc("kind: Service\nmetadata: {name: a, annotations: {svclb.io/affinity-key: client-ip-port}}\nspec: {clusterIP: 10.96.0.1, sessionAffinity: ClientIP, ports: [{port: 80}]}").unwrap();
        assert_eq!(s.affinity_key(), AffinityKeyKind::ClientIpPort);
        let s = svc("kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, sessionAffinity: ClientIP, ports: [{port: 80}]}").unwrap();
        assert_eq!(s.affinity_key(), AffinityKeyKind::ClientIp);
        let err = svc("kind: Service\nmetadata: {name: a, annotations: {svclb.io/affinity-key: cookie}}\nspec: {clusterIP: 10.96.0.1, sessionAffinity: ClientIP, ports: [{port: 80}]}").unwrap_err();
        assert_eq!(err.field(), "metadata.annotations[svclb.io/affinity-key]");
        assert!(err.to_string().contains("cookie"));
        // A key without ClientIP affinity is refused, as the builder does.
        let err = svc("kind: Service\nmetadata: {name: a, annotations: {svclb.io/affinity-key: caller}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}").unwrap_err();
        assert_eq!(err.field(), "svclb.affinityKey");
    }

    #[test]
    fn errors_name_origin_object_and_field() {
        let text = "kind: Service\nmetadata: {name: ok}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}, {name: b, port: 'eighty'}]}\n";
        let err = Manifests::parse_str(text, Some("shop.yaml")).unwrap_err();
        assert_eq!(err.field(), "spec.ports[1].port");
        let msg = err.to_string();
        assert!(
            msg.starts_with("shop.yaml: document 2: Service shop/web: spec.ports[1].port:"),
            "{msg}"
        );
        let m = Manifests::parse_str(
            "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80, protocol: ICMP}]}",
            Some("f.yaml"),
        )
        .unwrap();
        let err = m.changes().unwrap_err();
        assert_eq!(err.field(), "spec.ports[0].protocol");
        assert!(err.to_string().contains("Service default/web"));
        assert!(err.to_string().contains("ICMP"));
        let err = Manifests::parse_str(
            "kind: Service\nmetadata: {name: x}\nspec: [",
            Some("bad.yaml"),
        )
        .unwrap_err();
        assert!(
            matches!(err, ManifestError::Syntax { format: "YAML", .. }),
            "{err}"
        );
        let err = Manifests::parse_str("{\"kind\": \"Service\",", Some("bad.json")).unwrap_err();
        assert!(
            matches!(err, ManifestError::Syntax { format: "JSON", .. }),
            "{err}"
        );
        let err = Manifests::parse_str("apiVersion: v2\nkind: Service\nmetadata: {name: x}", None)
            .unwrap_err();
        assert_eq!(err.field(), "apiVersion");
        let err = Manifests::parse_str("metadata: {name: x}", None).unwrap_err();
        assert_eq!(err.field(), "kind");
    }

    #[test]
    fn lists_and_other_kinds() {
        let text = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}},
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 80, "targetPort": "http"}]}}
        ], "metadata": {"resourceVersion": ""}}"#;
        let m = Manifests::parse_str(text, Some("list.json")).unwrap();
        assert_eq!(m.documents.len(), 2);
        assert_eq!(m.documents[1].origin.item, Some(2));
        assert_eq!(m.skipped.len(), 1);
        assert_eq!(m.skipped[0].object.kind, "Deployment");
        let err = Manifests::parse_str(
            r#"{"kind": "ServiceList", "items": [{"kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": "x"}}]}"#,
            Some("l.json"),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "l.json: document 1, items[0]: Service default/a: spec.ports: invalid type: string \"x\", expected a list"
        );
    }

    #[test]
    fn flow_style_yaml_comment_only_and_empty_documents() {
        let m = Manifests::parse_str(
            "{kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}}",
            None,
        )
        .unwrap();
        assert_eq!(m.documents.len(), 1);
        let m = Manifests::parse_str("# nothing here\n---\n---\n", None).unwrap();
        assert!(m.documents.is_empty() && m.skipped.is_empty());
        let err = Manifests::parse_str("{\"kind\": \"Service\"", Some("x.json")).unwrap_err();
        assert!(
            matches!(err, ManifestError::Syntax { format: "JSON", .. }),
            "{err}"
        );
    }

    #[test]
    fn external_name_is_refused_and_skipped() {
        let m = Manifests::parse_str(
            "kind: Service\nmetadata: {name: db}\nspec: {type: ExternalName, externalName: db.example.com}",
            None,
        )
        .unwrap();
        let Manifest::Service(s) = &m.documents[0].manifest else {
            panic!()
        };
        let svc = s.to_service().unwrap();
        assert_eq!(svc.external_name(), Some("db.example.com"));
        assert!(!svc.is_proxied() && !svc.is_headless());
        // It enters the table (DNS answers a CNAME), and no proxy programs it.
        let batch = m.changes().unwrap();
        assert_eq!(batch.changes.len(), 1);
        assert!(batch.skipped.is_empty());
        let err = svc_text("{type: ExternalName, externalName: 'Not A Name'}").unwrap_err();
        assert_eq!(err.field(), "spec.externalName");
        let err =
            svc_text("{type: ExternalName, externalName: db.example.com, clusterIP: 10.96.0.9}")
                .unwrap_err();
        assert_eq!(err.field(), "spec.clusterIP");
    }

    #[test]
    fn external_traffic_policy_only_on_externally_accessible_services() {
        // validateServiceExternalTrafficPolicy: set on a ClusterIP service
        // without externalIPs (or a headless or ExternalName one), any
        // value is refused.
        for spec in [
            "{clusterIP: 10.96.0.9, externalTrafficPolicy: Cluster, ports: [{port: 80}]}",
            "{clusterIP: None, externalTrafficPolicy: Local, ports: [{port: 80}]}",
            "{type: ExternalName, externalName: db.example.com, externalTrafficPolicy: Cluster}",
        ] {
            let err = svc_text(spec).unwrap_err();
            assert_eq!(err.field(), "spec.externalTrafficPolicy", "{spec}");
            assert!(
                err.to_string()
                    .contains("may only be set for externally-accessible services"),
                "{err}"
            );
        }
        // A ClusterIP service with externalIPs is externally accessible:
        // defaulted to Cluster when unset (SetDefaults_Service), Local kept.
        let s =
            svc_text("{clusterIP: 10.96.0.9, externalIPs: [192.168.99.11], ports: [{port: 80}]}")
                .unwrap();
        assert_eq!(s.external_traffic_policy(), TrafficPolicy::Cluster);
        let s = svc_text(
            "{clusterIP: 10.96.0.9, externalIPs: [192.168.99.11], externalTrafficPolicy: Local, ports: [{port: 80}]}",
        )
        .unwrap();
        assert_eq!(s.external_traffic_policy(), TrafficPolicy::Local);
        // Unset on a plain ClusterIP service: fine.
        assert!(svc_text("{clusterIP: 10.96.0.9, ports: [{port: 80}]}").is_ok());
    }

    fn svc_text(spec: &str) -> Result<Service, ValidationError> {
        svc(&format!(
            "kind: Service\nmetadata: {{name: x}}\nspec: {spec}"
        ))
    }

    #[test]
    fn the_external_surface_reads_and_round_trips() {
        let text = "kind: Service
metadata: {name: lb, namespace: ns1}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.041
  externalIPs: [192.168.99.11, 192.168.099.11, 192.168.99.12]
  externalTrafficPolicy: Local
  healthCheckNodePort: 30000
  loadBalancerSourceRanges: [203.0.113.0/25]
  ports: [{name: p80, port: 80, nodePort: 30001}]
status:
  loadBalancer:
    ingress: [{ip: 1.2.3.004}, {ip: 5.6.7.8, ipMode: Proxy}]
";
        let s = svc(text).unwrap();
        assert_eq!(s.service_type(), ServiceType::LoadBalancer);
        assert_eq!(
            s.cluster_ip().addrs(),
            ["172.30.0.41".parse::<IpAddr>().unwrap()]
        );
        // A repeated address (192.168.099.11 is 192.168.99.11) is kept once.
        assert_eq!(s.external_ips().len(), 2);
        assert_eq!(s.ports()[0].node_port(), Some(30001));
        assert_eq!(s.health_check_node_port(), Some(30000));
        assert_eq!(
            s.load_balancer_source_ranges()[0].to_string(),
            "203.0.113.0/25"
        );
        let vips: Vec<IpAddr> = s.load_balancer_vips().collect();
        assert_eq!(vips, ["1.2.3.4".parse::<IpAddr>().unwrap()]);
        let back = ServiceManifest::from(&s);
        let yaml = serde_yaml_ng::to_string(&back).unwrap();
        assert_eq!(svc(&yaml).unwrap(), s, "{yaml}");
        // What the API refuses, named in its terms.
        let err =
            svc_text("{clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30001}]}").unwrap_err();
        assert_eq!(err.field(), "spec.ports[0].nodePort");
        let err =
            svc_text("{type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 80}]}")
                .unwrap_err();
        assert_eq!(err.field(), "spec.ports[0].nodePort");
        assert!(err.to_string().contains("80"), "{err}");
        let err = svc_text("{type: NodePort, clusterIP: 10.96.0.1, healthCheckNodePort: 30000, ports: [{port: 80}]}")
            .unwrap_err();
        assert_eq!(err.field(), "spec.healthCheckNodePort");
        let err = svc_text("{clusterIP: 10.96.0.1, externalIPs: [127.0.0.1], ports: [{port: 80}]}")
            .unwrap_err();
        assert_eq!(err.field(), "spec.externalIPs[0]");
        let err = svc_text(
            "{clusterIP: 10.96.0.1, loadBalancerSourceRanges: [10.0.0.0/8], ports: [{port: 80}]}",
        )
        .unwrap_err();
        assert_eq!(err.field(), "spec.loadBalancerSourceRanges");
        let err = svc_text("{type: LoadBalancer, clusterIP: 10.96.0.1, loadBalancerSourceRanges: [10.0.0.0/33], ports: [{port: 80}]}")
            .unwrap_err();
        assert_eq!(err.field(), "spec.loadBalancerSourceRanges[0]");
        let err = svc("kind: Service\nmetadata: {name: x}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.1, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 1.2.3.4, ipMode: Direct}]}}")
            .unwrap_err();
        assert_eq!(err.field(), "status.loadBalancer.ingress[0].ipMode");
    }

    #[test]
    fn model_round_trips_through_yaml_and_json() {
        let svc = Service::builder("shop", "api")
            .cluster_ip("10.96.0.7".parse().unwrap())
            .cluster_ip("fd00::7".parse().unwrap())
            .port(
                ServicePortSpec::tcp(80)
                    .name("http")
                    .target_port_name("web"),
            )
            .port(ServicePortSpec::udp(53).name("dns"))
            .client_ip_affinity(Some(3600))
            .affinity_key(crate::AffinityKeyKind::Caller)
            .internal_traffic_policy(TrafficPolicy::Local)
            .traffic_distribution(TrafficDistribution::PreferSameNode)
            .topology_mode("Auto")
            .publish_not_ready_addresses(true)
            .build()
            .unwrap();
        let slice = EndpointSlice::builder("shop", "api-1", "api", AddressType::IPv4)
            .port(SlicePortSpec::tcp(8080).name("http"))
            .port(SlicePortSpec::udp(5353).name("dns"))
            .endpoint(
                EndpointSpec::new("10.0.0.1")
                    .ready(false)
                    .serving(true)
                    .terminating(true)
                    .hostname("api-0")
                    .node("node-a")
                    .zone("z1")
                    .hint_zone("z1")
                    .hint_node("node-a"),
            )
            .endpoint(EndpointSpec::new("10.0.0.2"))
            .build()
            .unwrap();
        for m in [
            Manifest::Service(ServiceManifest::from(&svc)),
            Manifest::EndpointSlice(EndpointSliceManifest::from(&slice)),
        ] {
            for text in [m.to_yaml().unwrap(), m.to_json().unwrap()] {
                let back = one(&text);
                assert_eq!(back, m, "{text}");
                match back {
                    Manifest::Service(s) => assert_eq!(s.to_service().unwrap(), svc),
                    Manifest::EndpointSlice(s) => {
                        assert_eq!(s.to_endpoint_slice().unwrap(), slice)
                    }
                    Manifest::Endpoints(e) => panic!("{e:?}"),
                }
            }
        }
    }

    /// Decode messages speak Kubernetes: no Rust type, no "JSON" about
    /// YAML, no serde words.
    #[test]
    fn messages_are_in_kubernetes_terms() {
        let bad = [
            "kind: EndpointSlice\nmetadata: {name: a}\naddressType: IPv4\nports: [x]",
            "kind: EndpointSlice\nmetadata: {name: a}\naddressType: IPv4\nendpoints: [{addresses: [1.2.3.4], conditions: 7}]",
            "kind: EndpointSlice\nmetadata: {name: a}\naddressType: IPv4\nendpoints: [{hints: {forZones: [3]}}]",
            "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 1.5}]}",
            "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80, targetPort: [1]}]}",
            "kind: Service\nmetadata: {name: a}\nspec: {ports: [{name: x}]}",
            "kind: Service\nmetadata: {name: a}\nspec: {ports: {a: 1}}",
            "kind: Service\nmetadata: 5\n",
            "kind: Service\nmetadata: {name: a, labels: [1]}\n",
            "kind: Service\nmetadata: {name: a}\nspec: {sessionAffinityConfig: {clientIP: 3}}",
            "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 99999999999999999999999}]}",
            "kind: Endpoints\nmetadata: {name: a}\nsubsets: [{addresses: [3]}]",
        ];
        for text in bad {
            let err = Manifests::parse_str(text, Some("m.yaml")).unwrap_err();
            let msg = err.to_string();
            for word in [
                "struct", "enum", "i64", "u64", "sequence", "map", "JSON", "Manifest", "floating",
                "untagged",
            ] {
                assert!(!msg.contains(word), "{word:?} in {msg}");
            }
        }
        let err = Manifests::parse_str(
            "kind: Service\nmetadata: {name: a}\nspec: {ports: [{name: x}]}",
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("missing required field \"port\""),
            "{err}"
        );
    }

    #[test]
    fn every_bad_object_is_reported_and_the_rest_read() {
        let text = "kind: Service\nmetadata: {name: a}\nspec: {ports: x}\n---\nkind: Service\nmetadata: {name: ok}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nports: 3\n";
        let (m, errors) = Manifests::read(text, Some("f"), &InputLimits::default(), None);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].origin().document, 1);
        assert_eq!(errors[1].origin().document, 3);
        assert_eq!(m.documents.len(), 1);
    }

    #[test]
    fn watch_events_and_unlabelled_slices() {
        let text = r#"{"type": "ADDED", "object": {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "a", "resourceVersion": "5"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}}
{"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "9"}}}
{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}}
{"type": "DELETED", "object": {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "a", "resourceVersion": "7"}, "spec": {}}}
{"type": "ADDED", "object": {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "metadata": {"name": "orphan"}, "addressType": "IPv4"}}"#;
        let m = Manifests::parse_str(text, Some("w")).unwrap();
        assert_eq!(m.documents.len(), 3);
        assert_eq!(m.documents[1].event, EventType::Deleted);
        assert_eq!(m.skipped.len(), 1);
        assert_eq!(
            m.watch_errors[0].to_string(),
            "w: document 3: watch ERROR event: 410 Expired too old resource version"
        );
        let batch = m.changes().unwrap();
        assert_eq!(batch.changes.len(), 2);
        assert!(matches!(batch.changes[1], Change::DeleteService(_)));
        assert_eq!(batch.skipped.len(), 1);
        assert!(batch.skipped[0].to_string().contains("service-name"));
    }

    #[test]
    fn endpoints_of_selectorless_services_are_mirrored() {
        let text = "kind: Service\nmetadata: {name: db, namespace: data}\nspec: {clusterIP: 10.96.0.9, ports: [{name: pg, port: 5432}]}\n---\nkind: Endpoints\napiVersion: v1\nmetadata: {name: db, namespace: data}\nsubsets:\n- addresses: [{ip: 192.168.1.10, nodeName: n1}, {ip: 'fd00::10'}]\n  notReadyAddresses: [{ip: 192.168.1.11}]\n  ports: [{name: pg, port: 5432}]\n---\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.8, selector: {app: web}, ports: [{port: 80}]}\n---\nkind: Endpoints\nmetadata: {name: web}\nsubsets: [{addresses: [{ip: 10.0.0.1}], ports: [{port: 80}]}]\n";
        let m = Manifests::parse_str(text, None).unwrap();
        let batch = m.changes().unwrap();
        let slices: Vec<&EndpointSlice> = batch
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::UpsertSlice(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(slices.len(), 2);
        assert_eq!(slices[0].key().name, "db-mirror-0-ipv4");
        assert_eq!(slices[0].endpoints().len(), 2);
        assert!(!slices[0].endpoints()[1].conditions().is_ready());
        assert_eq!(slices[1].address_type(), AddressType::IPv6);
        assert_eq!(batch.skipped.len(), 1);
        assert!(batch.skipped[0].to_string().contains("selector"));
        let mut t = crate::ServiceTable::new();
        t.apply_batch(batch.changes).unwrap();
        let v = t.view(&crate::ServiceKey::new("data", "db")).unwrap();
        assert_eq!(v.ports()[0].endpoints().len(), 3);
    }

    #[test]
    fn slice_errors_name_fields() {
        let err = one("kind: EndpointSlice\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\nports: [{port: 80}]")
            .clone();
        let Manifest::EndpointSlice(s) = err else {
            panic!()
        };
        assert_eq!(s.to_endpoint_slice().unwrap_err().field(), "addressType");
        let Manifest::EndpointSlice(s) = one(
            "kind: EndpointSlice\nmetadata: {name: a-1}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]",
        ) else {
            panic!()
        };
        assert_eq!(
            s.to_endpoint_slice().unwrap_err().field(),
            "metadata.labels[kubernetes.io/service-name]"
        );
        let Manifest::EndpointSlice(s) = one(
            "kind: EndpointSlice\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\naddressType: IPv6\nendpoints: [{addresses: [10.0.0.1]}]",
        ) else {
            panic!()
        };
        assert_eq!(
            s.to_endpoint_slice().unwrap_err().field(),
            "endpoints[0].addresses[0]"
        );
    }
}
