//! Which endpoints take new connections: kube-proxy's `CategorizeEndpoints`
//! (`pkg/proxy/topology.go`, Kubernetes 1.33 behaviour).
//!
//! - Cluster traffic policy: the ready endpoints, narrowed by topology hints;
//!   if none is ready anywhere, the serving-and-terminating ones (topology
//!   ignored). None at all: the service rejects.
//! - Local traffic policy: the ready endpoints on this node, else this node's
//!   serving-and-terminating ones. None, while the cluster has usable
//!   endpoints elsewhere: drop. None anywhere: reject.
//! - Hints: if every ready endpoint has node hints and one names this node,
//!   use the endpoints hinted for this node (PreferSameNode); else if every
//!   ready endpoint has zone hints and one names this node's zone, use those
//!   (PreferSameZone); else use all.

use std::net::IpAddr;
use std::sync::Arc;

use crate::model::service::TrafficPolicy;
use crate::table::EndpointInfo;

/// Where the dataplane runs: its node name and zone, for Local policies and
/// topology hints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeTopology {
    /// This node's name (`nodeName` of local endpoints).
    pub node_name: Option<String>,
    /// This node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

impl NodeTopology {
    /// A node with a name and a zone.
    pub fn new(node_name: impl Into<String>, zone: impl Into<String>) -> Self {
        NodeTopology {
            node_name: Some(node_name.into()),
            zone: Some(zone.into()),
        }
    }
}

/// The topology mode chosen from the hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyMode {
    /// No topology: all ready endpoints.
    None,
    /// Only endpoints hinted for this zone.
    PreferSameZone,
    /// Only endpoints hinted for this node.
    PreferSameNode,
}

/// The outcome for one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These endpoints take new connections (in merged order).
    Usable(Vec<Arc<EndpointInfo>>),
    /// No usable endpoint anywhere: reject.
    NoEndpoints,
    /// Usable endpoints exist, but none local under a Local policy: drop.
    NoLocalEndpoints,
}

/// Chooses the topology mode from the ready endpoints' hints.
pub fn topology_mode(endpoints: &[Arc<EndpointInfo>], node: &NodeTopology) -> TopologyMode {
    let mut any_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for ep in endpoints.iter().filter(|e| e.is_ready()) {
        any_ready = true;
        if ep.hint_nodes().is_empty() {
            all_node_hints = false;
        } else if node
            .node_name
            .as_deref()
            .is_some_and(|n| ep.hint_nodes().iter().any(|h| h == n))
        {
            for_node = true;
        }
        if ep.hint_zones().is_empty() {
            all_zone_hints = false;
        } else if node
            .zone
            .as_deref()
            .is_some_and(|z| ep.hint_zones().iter().any(|h| h == z))
        {
            for_zone = true;
        }
    }
    if !any_ready {
        TopologyMode::None
    } else if all_node_hints && for_node {
        TopologyMode::PreferSameNode
    } else if all_zone_hints && for_zone {
        TopologyMode::PreferSameZone
    } else {
        TopologyMode::None
    }
}

fn available(ep: &EndpointInfo, mode: TopologyMode, node: &NodeTopology) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => node
            .node_name
            .as_deref()
            .is_some_and(|n| ep.hint_nodes().iter().any(|h| h == n)),
        TopologyMode::PreferSameZone => node
            .zone
            .as_deref()
            .is_some_and(|z| ep.hint_zones().iter().any(|h| h == z)),
    }
}

/// Picks the endpoints of one service port (of one IP family, if `family`
/// is given: `Some(true)` for IPv4) that take new connections under
/// `policy` on `node`.
pub fn categorize(
    endpoints: &[Arc<EndpointInfo>],
    policy: TrafficPolicy,
    node: &NodeTopology,
    family: Option<IpAddr>,
) -> Selection {
    let same_family: Vec<Arc<EndpointInfo>>;
    let endpoints = match family {
        Some(ip) if endpoints.iter().any(|e| e.addr().is_ipv4() != ip.is_ipv4()) => {
            same_family = endpoints
                .iter()
                .filter(|e| e.addr().is_ipv4() == ip.is_ipv4())
                .cloned()
                .collect();
            &same_family[..]
        }
        _ => endpoints,
    };
    let serving_terminating = |e: &&Arc<EndpointInfo>| e.is_serving() && e.is_terminating();
    match policy {
        TrafficPolicy::Cluster => {
            let mode = topology_mode(endpoints, node);
            let mut usable: Vec<_> = endpoints
                .iter()
                .filter(|e| e.is_ready() && available(e, mode, node))
                .cloned()
                .collect();
            if usable.is_empty() {
                usable = endpoints
                    .iter()
                    .filter(serving_terminating)
                    .cloned()
                    .collect();
            }
            if usable.is_empty() {
                Selection::NoEndpoints
            } else {
                Selection::Usable(usable)
            }
        }
        TrafficPolicy::Local => {
            let local = |e: &&Arc<EndpointInfo>| e.is_on_node(node.node_name.as_deref());
            let any_usable = endpoints
                .iter()
                .any(|e| e.is_ready() || (e.is_serving() && e.is_terminating()));
            let mut usable: Vec<_> = endpoints
                .iter()
                .filter(local)
                .filter(|e| e.is_ready())
                .cloned()
                .collect();
            if usable.is_empty() {
                usable = endpoints
                    .iter()
                    .filter(local)
                    .filter(serving_terminating)
                    .cloned()
                    .collect();
            }
            if !usable.is_empty() {
                Selection::Usable(usable)
            } else if any_usable {
                Selection::NoLocalEndpoints
            } else {
                Selection::NoEndpoints
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServiceKey;
    use crate::model::endpoint_slice::{AddressType, EndpointSlice, EndpointSpec, SlicePortSpec};
    use crate::model::service::{Service, ServicePortSpec};
    use crate::table::{Change, ServiceTable};

    fn eps(specs: Vec<EndpointSpec>) -> Vec<Arc<EndpointInfo>> {
        let mut t = ServiceTable::new();
        let svc = Service::builder("default", "web")
            .cluster_ip("10.96.0.1".parse().unwrap())
            .port(ServicePortSpec::tcp(80))
            .build()
            .unwrap();
        let slice = EndpointSlice::builder("default", "s", "web", AddressType::IPv4)
            .port(SlicePortSpec::tcp(80))
            .endpoints(specs)
            .build()
            .unwrap();
        t.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)])
            .unwrap();
        t.view(&ServiceKey::new("default", "web")).unwrap().ports()[0]
            .endpoints()
            .to_vec()
    }

    fn addrs(s: &Selection) -> Vec<String> {
        match s {
            Selection::Usable(v) => v.iter().map(|e| e.addr().ip().to_string()).collect(),
            other => vec![format!("{other:?}")],
        }
    }

    #[test]
    fn ready_first_then_serving_terminating() {
        let node = NodeTopology::new("n1", "a");
        let e = eps(vec![
            EndpointSpec::new("10.0.0.1")
                .ready(false)
                .serving(true)
                .terminating(true),
            EndpointSpec::new("10.0.0.2"),
        ]);
        assert_eq!(
            addrs(&categorize(&e, TrafficPolicy::Cluster, &node, None)),
            ["10.0.0.2"]
        );
        let e = eps(vec![
            EndpointSpec::new("10.0.0.1")
                .ready(false)
                .serving(true)
                .terminating(true),
            EndpointSpec::new("10.0.0.2")
                .ready(false)
                .serving(false)
                .terminating(true),
        ]);
        assert_eq!(
            addrs(&categorize(&e, TrafficPolicy::Cluster, &node, None)),
            ["10.0.0.1"]
        );
        let e = eps(vec![EndpointSpec::new("10.0.0.1").ready(false)]);
        assert_eq!(
            categorize(&e, TrafficPolicy::Cluster, &node, None),
            Selection::NoEndpoints
        );
    }

    #[test]
    fn local_policy_drops_or_rejects() {
        let node = NodeTopology::new("n1", "a");
        let e = eps(vec![
            EndpointSpec::new("10.0.0.1").node("n1"),
            EndpointSpec::new("10.0.0.2").node("n2"),
        ]);
        assert_eq!(
            addrs(&categorize(&e, TrafficPolicy::Local, &node, None)),
            ["10.0.0.1"]
        );
        let other = NodeTopology::new("n3", "a");
        assert_eq!(
            categorize(&e, TrafficPolicy::Local, &other, None),
            Selection::NoLocalEndpoints
        );
        let none = eps(vec![EndpointSpec::new("10.0.0.1").node("n1").ready(false)]);
        assert_eq!(
            categorize(&none, TrafficPolicy::Local, &other, None),
            Selection::NoEndpoints
        );
        // A local serving-terminating endpoint is the Local fallback.
        let e = eps(vec![
            EndpointSpec::new("10.0.0.1")
                .node("n1")
                .ready(false)
                .terminating(true),
            EndpointSpec::new("10.0.0.2").node("n2"),
        ]);
        assert_eq!(
            addrs(&categorize(&e, TrafficPolicy::Local, &node, None)),
            ["10.0.0.1"]
        );
    }

    #[test]
    fn zone_and_node_hints_with_fallbacks() {
        let a = NodeTopology::new("n1", "a");
        let e = eps(vec![
            EndpointSpec::new("10.0.0.1").hint_zone("a"),
            EndpointSpec::new("10.0.0.2").hint_zone("b"),
        ]);
        assert_eq!(topology_mode(&e, &a), TopologyMode::PreferSameZone);
        assert_eq!(
            addrs(&categorize(&e, TrafficPolicy::Cluster, &a, None)),
            ["10.0.0.1"]
        );
        // No endpoint hinted for this zone: all of them.
        let c = NodeTopology::new("n9", "c");
        assert_eq!(categorize(&e, TrafficPolicy::Cluster, &c, None).clone(), {
            Selection::Usable(e.clone())
        });
        // One ready endpoint without a hint disables topology.
        let e2 = eps(vec![
            EndpointSpec::new("10.0.0.1").hint_zone("a"),
            EndpointSpec::new("10.0.0.2"),
        ]);
        assert_eq!(topology_mode(&e2, &a), TopologyMode::None);
        // Node hints win over zone hints when every endpoint has one.
        let e3 = eps(vec![
            EndpointSpec::new("10.0.0.1").hint_zone("a").hint_node("n2"),
            EndpointSpec::new("10.0.0.2").hint_zone("a").hint_node("n1"),
        ]);
        assert_eq!(
            addrs(&categorize(&e3, TrafficPolicy::Cluster, &a, None)),
            ["10.0.0.2"]
        );
    }

    #[test]
    fn family_filter() {
        let node = NodeTopology::default();
        let e = eps(vec![EndpointSpec::new("10.0.0.1")]);
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(
            categorize(&e, TrafficPolicy::Cluster, &node, Some(v6)),
            Selection::NoEndpoints
        );
    }
}
