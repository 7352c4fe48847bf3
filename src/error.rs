//! Typed errors, one enum per area.
//!
//! Every variant names the field (as a Kubernetes-style path such as
//! `spec.ports[1].port`) and the offending value, so an operator can find the
//! bad line in a manifest without guessing.

use thiserror::Error;

/// A value that failed validation in a constructor or builder.
///
/// The `field` is a path in the style of the Kubernetes API
/// (`spec.ports[0].port`, `endpoints[3].addresses[0]`), the value is shown as
/// given.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A port number outside `1..=65535`.
    #[error("{field}: port {value} is out of range (must be 1..=65535)")]
    PortOutOfRange {
        /// The field path.
        field: String,
        /// The value given.
        value: i64,
    },
    /// A session-affinity timeout outside `1..=86400` seconds.
    #[error("{field}: timeoutSeconds {value} is out of range (must be 1..=86400)")]
    TimeoutOutOfRange {
        /// The field path.
        field: String,
        /// The value given.
        value: i64,
    },
    /// A weight outside the accepted range.
    #[error("{field}: weight {value} is out of range (must be 0..=65535)")]
    WeightOutOfRange {
        /// The field path.
        field: String,
        /// The value given.
        value: i64,
    },
    /// The same key given twice where keys must be unique.
    #[error("{field}: duplicate value {value:?}")]
    Duplicate {
        /// The field path of the second occurrence.
        field: String,
        /// The duplicated value.
        value: String,
    },
    /// An address whose family does not match the slice's `addressType`.
    #[error("{field}: address {value:?} does not match addressType {expected}")]
    AddressType {
        /// The field path.
        field: String,
        /// The address given.
        value: String,
        /// The slice's address type.
        expected: &'static str,
    },
    /// More items than the API allows.
    #[error("{field}: {count} items exceed the limit of {limit}")]
    TooMany {
        /// The field path.
        field: String,
        /// How many were given.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A required field is missing or empty.
    #[error("{field}: required value is missing")]
    Missing {
        /// The field path.
        field: String,
    },
    /// A value that is malformed for another reason.
    #[error("{field}: invalid value {value:?}: {reason}")]
    Invalid {
        /// The field path.
        field: String,
        /// The value given.
        value: String,
        /// Why it is invalid.
        reason: &'static str,
    },
}

impl ValidationError {
    /// The field path this error names.
    pub fn field(&self) -> &str {
        match self {
            Self::PortOutOfRange { field, .. }
            | Self::TimeoutOutOfRange { field, .. }
            | Self::WeightOutOfRange { field, .. }
            | Self::Duplicate { field, .. }
            | Self::AddressType { field, .. }
            | Self::TooMany { field, .. }
            | Self::Missing { field }
            | Self::Invalid { field, .. } => field,
        }
    }
}

/// A change that the [`ServiceTable`](crate::ServiceTable) refused.
///
/// A refused change, or a refused batch, leaves the table exactly as it was.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// An EndpointSlice names a service the table does not hold.
    ///
    /// [`ServiceTable`](crate::ServiceTable) no longer returns it: such a
    /// slice waits pending (see [`ChangeNote::Pending`](crate::ChangeNote)).
    /// Kept so that callers matching on it still compile.
    #[error("EndpointSlice {slice}: service {service} is unknown")]
    UnknownService {
        /// `namespace/name` of the slice.
        slice: String,
        /// `namespace/name` of the missing service.
        service: String,
    },
    /// A delete named an object the table does not hold.
    ///
    /// [`ServiceTable`](crate::ServiceTable) no longer returns it: such a
    /// delete is a no-op (see [`ChangeNote::AbsentDelete`](crate::ChangeNote)).
    /// Kept so that callers matching on it still compile.
    #[error("{kind} {key} not found")]
    NotFound {
        /// `Service` or `EndpointSlice`.
        kind: &'static str,
        /// `namespace/name` of the object.
        key: String,
    },
    /// Two services claim the same cluster IP, protocol and port.
    #[error("Service {service}: {field}: {value} is already used by Service {other}")]
    ConflictingPort {
        /// `namespace/name` of the service being applied.
        service: String,
        /// The field path.
        field: String,
        /// `IP:port/protocol`.
        value: String,
        /// `namespace/name` of the service that holds it.
        other: String,
    },
    /// A slice keeps its name but moves to another service; delete it first.
    #[error(
        "EndpointSlice {slice}: metadata.labels[kubernetes.io/service-name]: cannot move from {from} to {to}"
    )]
    SliceMoved {
        /// `namespace/name` of the slice.
        slice: String,
        /// The service it belongs to now.
        from: String,
        /// The service it names.
        to: String,
    },
    /// The change at `index` of a batch failed; the whole batch was refused.
    #[error("change #{index} of the batch: {source}")]
    InBatch {
        /// Position of the failing change in the batch, from 0.
        index: usize,
        /// What was wrong with it.
        #[source]
        source: Box<UpdateError>,
    },
}

impl UpdateError {
    /// The error itself, unwrapping [`UpdateError::InBatch`].
    pub fn root(&self) -> &UpdateError {
        match self {
            Self::InBatch { source, .. } => source.root(),
            other => other,
        }
    }
}
