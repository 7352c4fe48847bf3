//! Kubernetes interop: what a cluster really holds, read into the model, and
//! the answers its DNS gives.
//!
//! - [`manifest`] (feature `serde`): Service and EndpointSlice manifests as
//!   the API server and `kubectl get -o json|yaml` write them, with the API
//!   defaults, turned into [`Change`](crate::Change)s for the
//!   [`ServiceTable`](crate::ServiceTable).
//! - [`input`] (feature `serde`): the bounded, linear-time reader under
//!   both, with its [`InputLimits`](input::InputLimits).
//! - [`watch`] (feature `serde`): `kubectl get --watch
//!   --output-watch-events` streams, and the resourceVersion check.
//! - [`loader`] (feature `serde`): the loader every svclb program shares:
//!   manifests then watch streams into a table, cluster IPs assigned from
//!   `--service-cidr`, `--keep-going`, `--verbose`, the limits.
//! - [`openapi`] (feature `k8s-openapi`): conversions from k8s-openapi's
//!   `Service` and `EndpointSlice`, so a kube-rs watcher can feed the table.
//! - [`dns`]: the cluster DNS answers for services (headless ones included)
//!   over a [`ServiceTable`](crate::ServiceTable), as the Kubernetes DNS
//!   specification defines them.
//! - [`health`]: kube-proxy's health checks (a service's
//!   `healthCheckNodePort`, the node's `/healthz`) as status, headers and
//!   body.

pub mod dns;
pub mod health;
#[cfg(feature = "serde")]
pub mod input;
#[cfg(feature = "serde")]
pub mod loader;
#[cfg(feature = "serde")]
pub mod manifest;
#[cfg(feature = "k8s-openapi")]
pub mod openapi;
#[cfg(feature = "serde")]
pub mod watch;
