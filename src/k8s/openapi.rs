//! Conversions from k8s-openapi's `Service` and `EndpointSlice` (feature
//! `k8s-openapi`), so that a kube-rs watcher can feed the
//! [`ServiceTable`](crate::ServiceTable).
//!
//! The feature enables no k8s-openapi API version: as k8s-openapi asks of
//! libraries, the application picks one (`k8s-openapi = { version =
//! "0.29", features = ["v1_34"] }` in its own Cargo.toml). Every version
//! from 1.33 on works; CI checks 1.34 and tests with `latest` (1.37).
//!
//!
//! ```text
//! watcher event Apply(svc)   -> Change::UpsertService(Service::try_from(&svc)?)
//! watcher event Apply(slice) -> Change::UpsertSlice(EndpointSlice::try_from(&slice)?)
//! watcher event Delete(...)  -> Change::DeleteService(key) / Change::DeleteSlice(key)
//! ```
//!
//! The conversions go through the manifest types
//! ([`ServiceManifest`], [`EndpointSliceManifest`]), so the API defaults and
//! the validation are the same as for YAML and JSON manifests.
//!
//! # Examples
//! ```
//! use k8s_openapi::api::core::v1 as core;
//! use svclb::Service;
//!
//! let svc = core::Service {
//!     metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
//!         name: Some("web".into()),
//!         namespace: Some("default".into()),
//!         ..Default::default()
//!     },
//!     spec: Some(core::ServiceSpec {
//!         cluster_ip: Some("10.96.0.10".into()),
//!         ports: Some(vec![core::ServicePort { port: 80, ..Default::default() }]),
//!         ..Default::default()
//!     }),
//!     ..Default::default()
//! };
//! let svc = Service::try_from(&svc)?;
//! assert_eq!(svc.ports()[0].port(), 80);
//! # Ok::<(), svclb::ValidationError>(())
//! ```

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta as K8sMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString as K8sIntOrString;

use crate::error::ValidationError;
use crate::k8s::manifest::{
    ClientIpConfig, EndpointHints, EndpointManifest, EndpointPortManifest, EndpointSliceManifest,
    HintName, IntOrString, LoadBalancerIngressManifest, LoadBalancerStatusManifest, ObjectMeta,
    ServiceManifest, ServicePortManifest, ServiceSpec, ServiceStatus, SessionAffinityConfig,
};
use crate::model::endpoint_slice::{Conditions, EndpointSlice};
use crate::model::service::Service;

fn meta(m: &K8sMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        labels: m.labels.clone().unwrap_or_default(),
        annotations: m.annotations.clone().unwrap_or_default(),
        resource_version: m.resource_version.clone(),
    }
}

impl From<&core::Service> for ServiceManifest {
    fn from(svc: &core::Service) -> Self {
        let spec = svc.spec.clone().unwrap_or_default();
        ServiceManifest {
            api_version: "v1".into(),
            kind: "Service".into(),
            metadata: meta(&svc.metadata),
            spec: ServiceSpec {
                type_: spec.type_,
                cluster_ip: spec.cluster_ip,
                cluster_ips: spec.cluster_ips.unwrap_or_default(),
                ports: spec
                    .ports
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| ServicePortManifest {
                        name: p.name,
                        protocol: p.protocol,
                        port: i64::from(p.port),
                        target_port: p.target_port.map(|t| match t {
                            K8sIntOrString::Int(n) => IntOrString::Int(i64::from(n)),
                            K8sIntOrString::String(s) => IntOrString::String(s),
                        }),
                        node_port: p.node_port.map(i64::from),
                        app_protocol: p.app_protocol,
                    })
                    .collect(),
                session_affinity: spec.session_affinity,
                session_affinity_config: spec.session_affinity_config.map(|c| {
                    SessionAffinityConfig {
                        client_ip: c.client_ip.map(|ip| ClientIpConfig {
                            timeout_seconds: ip.timeout_seconds.map(i64::from),
                        }),
                    }
                }),
                internal_traffic_policy: spec.internal_traffic_policy,
                external_traffic_policy: spec.external_traffic_policy,
                traffic_distribution: spec.traffic_distribution,
                publish_not_ready_addresses: spec.publish_not_ready_addresses,
                external_name: spec.external_name,
                external_ips: spec.external_ips.unwrap_or_default(),
                load_balancer_source_ranges: spec.load_balancer_source_ranges.unwrap_or_default(),
                health_check_node_port: spec.health_check_node_port.map(i64::from),
                allocate_load_balancer_node_ports: spec.allocate_load_balancer_node_ports,
                selector: spec.selector,
                ip_families: spec.ip_families.unwrap_or_default(),
                ip_family_policy: spec.ip_family_policy,
            },
            status: ServiceStatus {
                load_balancer: svc
                    .status
                    .as_ref()
                    .and_then(|st| st.load_balancer.as_ref())
                    .map(|lb| LoadBalancerStatusManifest {
                        ingress: lb
                            .ingress
                            .iter()
                            .flatten()
                            .map(|i| LoadBalancerIngressManifest {
                                ip: i.ip.clone(),
                                hostname: i.hostname.clone(),
                                ip_mode: i.ip_mode.clone(),
                            })
                            .collect(),
                    }),
            },
        }
    }
}

impl TryFrom<&core::Service> for Service {
    type Error = ValidationError;

    /// Applies the API defaults and validates, as
    /// [`ServiceManifest::to_service`] does.
    fn try_from(svc: &core::Service) -> Result<Self, Self::Error> {
        ServiceManifest::from(svc).to_service()
    }
}

/// `EndpointSlice.endpoints` is a list up to Kubernetes 1.36 and an
/// optional list from 1.37 on: both read as a slice, whichever API version
/// the application picked.
trait AsEndpoints {
    fn as_endpoints(&self) -> &[discovery::Endpoint];
}

impl AsEndpoints for Vec<discovery::Endpoint> {
    fn as_endpoints(&self) -> &[discovery::Endpoint] {
        self
    }
}

impl AsEndpoints for Option<Vec<discovery::Endpoint>> {
    fn as_endpoints(&self) -> &[discovery::Endpoint] {
        self.as_deref().unwrap_or_default()
    }
}

impl From<&discovery::EndpointSlice> for EndpointSliceManifest {
    fn from(slice: &discovery::EndpointSlice) -> Self {
        EndpointSliceManifest {
            api_version: "discovery.k8s.io/v1".into(),
            kind: "EndpointSlice".into(),
            metadata: meta(&slice.metadata),
            address_type: Some(slice.address_type.clone()),
            endpoints: slice
                .endpoints
                .as_endpoints()
                .iter()
                .map(|e| {
                    let c = e.conditions.clone().unwrap_or_default();
                    EndpointManifest {
                        addresses: e.addresses.clone(),
                        conditions: Conditions {
                            ready: c.ready,
                            serving: c.serving,
                            terminating: c.terminating,
                        },
                        hostname: e.hostname.clone(),
                        node_name: e.node_name.clone(),
                        zone: e.zone.clone(),
                        hints: e.hints.as_ref().map(|h| EndpointHints {
                            for_zones: h
                                .for_zones
                                .iter()
                                .flatten()
                                .map(|z| HintName {
                                    name: z.name.clone(),
                                })
                                .collect(),
                            for_nodes: h
                                .for_nodes
                                .iter()
                                .flatten()
                                .map(|n| HintName {
                                    name: n.name.clone(),
                                })
                                .collect(),
                        }),
                    }
                })
                .collect(),
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|p| EndpointPortManifest {
                    name: p.name.clone(),
                    protocol: p.protocol.clone(),
                    port: p.port.map(i64::from),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
        }
    }
}

impl TryFrom<&discovery::EndpointSlice> for EndpointSlice {
    type Error = ValidationError;

    /// Applies the API defaults and validates, as
    /// [`EndpointSliceManifest::to_endpoint_slice`] does.
    fn try_from(slice: &discovery::EndpointSlice) -> Result<Self, Self::Error> {
        EndpointSliceManifest::from(slice).to_endpoint_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::manifest::{Manifest, Manifests};
    use crate::model::service::{SessionAffinity, TargetPort};

    /// The same object read by k8s-openapi (through its serde impls) and by
    /// our manifest parser converts to the same model value.
    #[test]
    fn agrees_with_the_manifest_parser() {
        let svc_json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"api","namespace":"ml","uid":"u","resourceVersion":"7"},
            "spec":{"clusterIP":"10.96.40.12","clusterIPs":["10.96.40.12"],"ports":[{"name":"http","port":8000,"targetPort":"http"}],
            "sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":3600}},"type":"LoadBalancer"},
            "status":{"loadBalancer":{}}}"#;
        let k: core::Service = serde_json::from_str(svc_json).unwrap();
        let ours = Service::try_from(&k).unwrap();
        assert_eq!(
            ours.session_affinity(),
            SessionAffinity::ClientIp { timeout_secs: 3600 }
        );
        assert_eq!(
            ours.ports()[0].target_port(),
            &TargetPort::Name("http".into())
        );
        let Manifest::Service(m) =
            &Manifests::parse_str(svc_json, None).unwrap().documents[0].manifest
        else {
            panic!()
        };
        assert_eq!(m.to_service().unwrap(), ours);

        // The external surface, the same through both readers.
        let lb_json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"edge","namespace":"ml"},
            "spec":{"type":"LoadBalancer","clusterIP":"10.96.40.13","externalIPs":["192.168.99.11"],
                    "externalTrafficPolicy":"Local","healthCheckNodePort":30000,
                    "loadBalancerSourceRanges":["203.0.113.0/25"],"allocateLoadBalancerNodePorts":false,
                    "ports":[{"name":"http","port":80,"nodePort":30080}]},
            "status":{"loadBalancer":{"ingress":[{"ip":"1.2.3.4"},{"ip":"5.6.7.8","ipMode":"Proxy"}]}}}"#;
        let k: core::Service = serde_json::from_str(lb_json).unwrap();
        let ours = Service::try_from(&k).unwrap();
        assert_eq!(ours.ports()[0].node_port(), Some(30080));
        assert_eq!(ours.health_check_node_port(), Some(30000));
        assert!(!ours.allocate_load_balancer_node_ports());
        assert_eq!(ours.external_ips().len(), 1);
        assert_eq!(ours.load_balancer_ingress().len(), 2);
        assert_eq!(ours.load_balancer_vips().count(), 1);
        assert_eq!(ours.load_balancer_source_ranges().len(), 1);
        let Manifest::Service(m) =
            &Manifests::parse_str(lb_json, None).unwrap().documents[0].manifest
        else {
            panic!()
        };
        assert_eq!(m.to_service().unwrap(), ours);

        let slice_json = r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","addressType":"IPv4",
            "metadata":{"name":"api-x","namespace":"ml","labels":{"kubernetes.io/service-name":"api"}},
            "ports":[{"name":"http","port":8080,"protocol":"TCP"}],
            "endpoints":[{"addresses":["10.244.1.21"],"conditions":{"ready":true},"nodeName":"node-a","zone":"zone-a",
                          "hints":{"forZones":[{"name":"zone-a"}]}},
                         {"addresses":["10.244.2.21"],"conditions":{"ready":false,"serving":true,"terminating":true}}]}"#;
        let k: discovery::EndpointSlice = serde_json::from_str(slice_json).unwrap();
        let ours = EndpointSlice::try_from(&k).unwrap();
        assert_eq!(ours.endpoints()[0].hint_zones(), ["zone-a".to_string()]);
        assert!(ours.endpoints()[1].conditions().is_terminating());
        let Manifest::EndpointSlice(m) =
            &Manifests::parse_str(slice_json, None).unwrap().documents[0].manifest
        else {
            panic!()
        };
        assert_eq!(m.to_endpoint_slice().unwrap(), ours);
    }

    #[test]
    fn errors_name_the_field() {
        let k = core::Service {
            metadata: K8sMeta {
                name: Some("db".into()),
                ..Default::default()
            },
            spec: Some(core::ServiceSpec {
                type_: Some("ExternalName".into()),
                external_name: Some("db.example.com".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            Service::try_from(&k).unwrap().external_name(),
            Some("db.example.com")
        );
        let mut k = k;
        k.spec.as_mut().unwrap().external_name = Some("Not_A_Name".into());
        assert_eq!(
            Service::try_from(&k).unwrap_err().field(),
            "spec.externalName"
        );
        let k = discovery::EndpointSlice {
            address_type: "IPv4".into(),
            metadata: K8sMeta {
                name: Some("a-1".into()),
                labels: Some([("kubernetes.io/service-name".to_string(), "a".to_string())].into()),
                ..Default::default()
            },
            endpoints: Some(vec![discovery::Endpoint {
                addresses: vec!["fd00::1".into()],
                ..Default::default()
            }]),
            ports: None,
        };
        assert_eq!(
            EndpointSlice::try_from(&k).unwrap_err().field(),
            "endpoints[0].addresses[0]"
        );
    }
}
