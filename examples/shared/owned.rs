//! The objects a program's manifest files own, so that a reload deletes
//! the ones that have left the files (a watch event would otherwise be the
//! only way to remove them): read the files into a scratch table, take its
//! keys ([`owned_keys`]), apply the files to the real table, then delete
//! what the previous load owned and this one does not ([`deletions`]).

use std::collections::BTreeSet;

use svclb::{Change, ServiceKey, ServiceTable, SliceKey};

/// An object the manifests own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Owned {
    /// A Service.
    Service(ServiceKey),
    /// An EndpointSlice (with or without its Service).
    Slice(SliceKey),
}

/// Every Service and EndpointSlice in `table`.
pub(crate) fn owned_keys(table: &ServiceTable) -> BTreeSet<Owned> {
    let mut out = BTreeSet::new();
    for v in table.views() {
        let key = v.service().key().clone();
        for s in table.slices_of(&key) {
            out.insert(Owned::Slice(s.key().clone()));
        }
        out.insert(Owned::Service(key));
    }
    for s in table.pending_slices() {
        out.insert(Owned::Slice(s.key().clone()));
    }
    out
}

/// The deletes that remove what `before` owned and `after` does not, of
/// the objects still in `table` (a watch event may have deleted some
/// already: deleting those would fail the whole batch).
pub(crate) fn deletions(
    before: &BTreeSet<Owned>,
    after: &BTreeSet<Owned>,
    table: &ServiceTable,
) -> Vec<Change> {
    let present = owned_keys(table);
    before
        .difference(after)
        .filter(|o| present.contains(o))
        .map(|o| match o {
            Owned::Service(k) => Change::DeleteService(k.clone()),
            Owned::Slice(k) => Change::DeleteSlice(k.clone()),
        })
        .collect()
}
