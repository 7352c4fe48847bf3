//! The data model: services, endpoint slices, flows and verdicts.

pub mod endpoint_slice;
pub mod flow;
pub mod names;
pub mod service;
