//! Kubernetes interop: what a cluster really holds, read into the model, and
//! the answers its DNS gives.
//!
//! - [`manifest`] (feature `serde`): Service and EndpointSlice manifests as
//!   the API server and `kubectl get -o json|yaml` write them, with the API
//!   defaults, turned into [`Change`](crate::Change)s for the
//!   [`ServiceTable`](crate::ServiceTable).
//! - [`openapi`] (feature `k8s-openapi`): conversions from k8s-openapi's
//!   `Service` and `EndpointSlice`, so a kube-rs watcher can feed the table.
//! - [`dns`]: the cluster DNS answers for services (headless ones included)
//!   over a [`ServiceTable`](crate::ServiceTable), as the Kubernetes DNS
//!   specification defines them.

pub mod dns;
#[cfg(feature = "serde")]
pub mod input;
#[cfg(feature = "serde")]
pub mod manifest;
#[cfg(feature = "k8s-openapi")]
pub mod openapi;
