//! Watch streams: what `kubectl get services,endpointslices -A --watch
//! --output-watch-events -o json` (or `-o yaml`) writes, one event after
//! another:
//!
//! ```text
//! {"type": "ADDED", "object": {"kind": "Service", ...}}
//! {"type": "MODIFIED", "object": {...}}
//! {"type": "DELETED", "object": {...}}
//! {"type": "BOOKMARK", "object": {"kind": "Service", "metadata": {"resourceVersion": "12345"}}}
//! {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", ...}}
//! ```
//!
//! - ADDED and MODIFIED upsert, DELETED deletes (a delete of an object not
//!   held is a no-op, noted by the table);
//! - BOOKMARK is skipped; ERROR is reported ([`Manifests::watch_errors`]);
//! - an event whose `metadata.resourceVersion` is older than the last one
//!   seen for the same object is ignored with a note ([`ResourceVersions`]).
//!   Resource versions are opaque strings to clients; the API server's
//!   (etcd's) are integers, and only those are compared.
//!
//! The reading itself is [`Manifests::read`] (one reader for manifests and
//! watch streams, within the same [`InputLimits`](super::input::InputLimits));
//! applying, with cluster IP assignment and the CLI's options, is the
//! [`Loader`](super::loader::Loader)'s.
//!
//! # Examples
//! ```
//! use svclb::k8s::manifest::Manifests;
//! use svclb::k8s::watch::ResourceVersions;
//! use svclb::ServiceTable;
//!
//! let stream = r#"
//! {"type": "ADDED", "object": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "resourceVersion": "10"}, "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}}
//! {"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "11"}}}
//! {"type": "DELETED", "object": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "resourceVersion": "12"}, "spec": {}}}
//! {"type": "MODIFIED", "object": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "resourceVersion": "11"}, "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}}
//! "#;
//! let mut events = Manifests::parse_str(stream, Some("watch.json"))?;
//! let stale = ResourceVersions::default().retain_fresh(&mut events);
//! assert_eq!(stale.len(), 1); // the MODIFIED at 11 came after the DELETED at 12
//! let mut table = ServiceTable::new();
//! for change in events.changes()?.changes {
//!     table.apply(change)?;
//! }
//! assert!(table.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt;
use std::collections::HashMap;

use super::manifest::{Manifest, Manifests, ObjectRef, Origin};

/// The last `metadata.resourceVersion` seen per object (kind, namespace,
/// name), across inputs.
#[derive(Debug, Clone, Default)]
pub struct ResourceVersions {
    last: HashMap<ObjectRef, u64>,
}

/// An event ignored because its object's resourceVersion went backwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleEvent {
    /// Where it came from.
    pub origin: Origin,
    /// The object.
    pub object: ObjectRef,
    /// Its resourceVersion.
    pub resource_version: u64,
    /// The newest one seen before it.
    pub last: u64,
}

impl fmt::Display for StaleEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: ignored: metadata.resourceVersion {} is older than {} seen before",
            self.origin, self.object, self.resource_version, self.last
        )
    }
}

fn resource_version(m: &Manifest) -> Option<u64> {
    let meta = match m {
        Manifest::Service(s) => &s.metadata,
        Manifest::EndpointSlice(s) => &s.metadata,
        Manifest::Endpoints(e) => &e.metadata,
    };
    meta.resource_version.as_deref()?.parse().ok()
}

impl ResourceVersions {
    /// Drops the documents whose resourceVersion is older than the last
    /// one seen for the same object, records the others, and returns what
    /// was dropped, in order.
    pub fn retain_fresh(&mut self, manifests: &mut Manifests) -> Vec<StaleEvent> {
        let mut stale = Vec::new();
        manifests.documents.retain(|d| {
            let Some(rv) = resource_version(&d.manifest) else {
                return true;
            };
            let object = d.manifest.object_ref();
            match self.last.get(&object) {
                Some(&last) if rv < last => {
                    stale.push(StaleEvent {
                        origin: d.origin.clone(),
                        object,
                        resource_version: rv,
                        last,
                    });
                    false
                }
                _ => {
                    self.last.insert(object, rv);
                    true
                }
            }
        });
        stale
    }
}
