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
use crate::table::{EndpointInfo, ListSummary, PortView};

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
    mode_of(endpoints.iter().map(|e| &**e), node)
}

fn mode_of<'a>(
    endpoints: impl Iterator<Item = &'a EndpointInfo>,
    node: &NodeTopology,
) -> TopologyMode {
    let mut any_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for ep in endpoints.filter(|e| e.is_ready()) {
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
    match categorize_ref(endpoints, policy, node, family) {
        SelectionRef::Usable(u) => Selection::Usable(u.iter().cloned().collect()),
        SelectionRef::NoEndpoints => Selection::NoEndpoints,
        SelectionRef::NoLocalEndpoints => Selection::NoLocalEndpoints,
    }
}

/// The usable endpoints of a [`SelectionRef`], borrowed from the merged
/// list: the whole list when every endpoint qualifies (the common case,
/// which then costs no copy), else the qualifying ones.
#[derive(Debug)]
pub(crate) enum Usable<'a> {
    All(&'a [Arc<EndpointInfo>]),
    Some(Vec<&'a Arc<EndpointInfo>>),
}

impl<'a> Usable<'a> {
    /// The usable endpoints, in merged order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &'a Arc<EndpointInfo>> + '_ {
        let (all, some): (&'a [Arc<EndpointInfo>], &[&'a Arc<EndpointInfo>]) = match self {
            Usable::All(all) => (all, &[]),
            Usable::Some(v) => (&[], v),
        };
        // One of the two is empty.
        all.iter().chain(some.iter().copied())
    }
}

/// [`Selection`] without copying: what [`categorize`] decides, borrowing
/// the endpoints.
#[derive(Debug)]
pub(crate) enum SelectionRef<'a> {
    Usable(Usable<'a>),
    NoEndpoints,
    NoLocalEndpoints,
}

/// The endpoints that pass `keep`, or `None` if none does.
fn select<'a>(
    endpoints: &'a [Arc<EndpointInfo>],
    keep: impl Fn(&EndpointInfo) -> bool,
) -> Option<Usable<'a>> {
    let n = endpoints.iter().filter(|e| keep(e)).count();
    if n == 0 {
        None
    } else if n == endpoints.len() {
        Some(Usable::All(endpoints))
    } else {
        let mut v = Vec::with_capacity(n);
        v.extend(endpoints.iter().filter(|e| keep(e)));
        Some(Usable::Some(v))
    }
}

/// [`categorize_ref`] for a port of a table view: when its summary shows
/// that every endpoint is ready, unhinted and of `family` under a Cluster
/// policy (the common case), the answer is the whole list, with no scan.
pub(crate) fn categorize_port<'a>(
    port: &'a PortView,
    policy: TrafficPolicy,
    node: &NodeTopology,
    family: Option<IpAddr>,
) -> SelectionRef<'a> {
    let eps = port.endpoints();
    let s = port.summary();
    debug_assert_eq!(s, ListSummary::of(eps));
    let one_family = match family {
        None => true,
        Some(IpAddr::V4(_)) => s.v6 == 0,
        Some(IpAddr::V6(_)) => s.v6 as usize == eps.len(),
    };
    if policy == TrafficPolicy::Cluster
        && !eps.is_empty()
        && s.not_ready == 0
        && s.hinted == 0
        && one_family
    {
        return SelectionRef::Usable(Usable::All(eps));
    }
    categorize_ref(eps, policy, node, family)
}

/// [`categorize`], borrowing: no endpoint is copied, and no list at all is
/// built when every endpoint qualifies.
pub(crate) fn categorize_ref<'a>(
    endpoints: &'a [Arc<EndpointInfo>],
    policy: TrafficPolicy,
    node: &NodeTopology,
    family: Option<IpAddr>,
) -> SelectionRef<'a> {
    let in_family = |e: &EndpointInfo| family.is_none_or(|ip| e.addr().is_ipv4() == ip.is_ipv4());
    let serving_terminating = |e: &EndpointInfo| e.is_serving() && e.is_terminating();
    match policy {
        TrafficPolicy::Cluster => {
            let mode = mode_of(
                endpoints.iter().map(|e| &**e).filter(|e| in_family(e)),
                node,
            );
            let usable = select(endpoints, |e| {
                in_family(e) && e.is_ready() && available(e, mode, node)
            })
            .or_else(|| select(endpoints, |e| in_family(e) && serving_terminating(e)));
            match usable {
                Some(u) => SelectionRef::Usable(u),
                None => SelectionRef::NoEndpoints,
            }
        }
        TrafficPolicy::Local => {
            let local = |e: &EndpointInfo| e.is_on_node(node.node_name.as_deref());
            let any_usable = endpoints
                .iter()
                .any(|e| in_family(e) && (e.is_ready() || serving_terminating(e)));
            let usable =
                select(endpoints, |e| in_family(e) && local(e) && e.is_ready()).or_else(|| {
                    select(endpoints, |e| {
                        in_family(e) && local(e) && serving_terminating(e)
                    })
                });
            match usable {
                Some(u) => SelectionRef::Usable(u),
                None if any_usable => SelectionRef::NoLocalEndpoints,
                None => SelectionRef::NoEndpoints,
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

    /// When every endpoint qualifies, the borrowed selection is the merged
    /// list itself (no copy); otherwise the qualifying ones, in order.
    #[test]
    fn borrowed_selection_is_the_list_when_all_qualify() {
        let node = NodeTopology::new("n1", "a");
        let e = eps(vec![
            EndpointSpec::new("10.0.0.1"),
            EndpointSpec::new("10.0.0.2"),
        ]);
        match categorize_ref(&e, TrafficPolicy::Cluster, &node, None) {
            SelectionRef::Usable(Usable::All(all)) => assert!(std::ptr::eq(all, &e[..])),
            other => panic!("{other:?}"),
        }
        let e = eps(vec![
            EndpointSpec::new("10.0.0.1").ready(false),
            EndpointSpec::new("10.0.0.2"),
            EndpointSpec::new("10.0.0.3"),
        ]);
        match categorize_ref(&e, TrafficPolicy::Cluster, &node, None) {
            SelectionRef::Usable(u @ Usable::Some(_)) => {
                let got: Vec<_> = u.iter().map(|e| e.addr().ip().to_string()).collect();
                assert_eq!(got, ["10.0.0.2", "10.0.0.3"]);
                assert_eq!(u.iter().count(), 2);
            }
            other => panic!("{other:?}"),
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
