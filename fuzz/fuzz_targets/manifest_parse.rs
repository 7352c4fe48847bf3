//! `manifest_parse`: arbitrary bytes read as JSON and as YAML manifests.
//!
//! - Nothing panics: parsing, conversion into table changes, applying them.
//! - Every failure is a typed `ManifestError` (or, from the table, an
//!   `UpdateError`) whose message names where it came from.
//! - A service that converts serializes back (`ServiceManifest::from`) and
//!   reads again as the same service: `model -> JSON -> model` is the
//!   identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svclb::k8s::manifest::{Manifests, ServiceManifest};
use svclb::{Change, ServiceTable};

fn check(parsed: Result<Manifests, svclb::k8s::manifest::ManifestError>) {
    let manifests = match parsed {
        Ok(m) => m,
        Err(e) => {
            assert!(e.to_string().starts_with("fuzz"), "{e}");
            let _ = e.field();
            return;
        }
    };
    let batch = match manifests.changes() {
        Ok(b) => b,
        Err(e) => {
            assert!(e.to_string().starts_with("fuzz"), "{e}");
            return;
        }
    };
    for change in &batch.changes {
        if let Change::UpsertService(svc) = change {
            let text = serde_json::to_string(&ServiceManifest::from(svc)).expect("serializes");
            let again = Manifests::parse_json(&text, Some("again"))
                .and_then(|m| m.changes())
                .unwrap_or_else(|e| panic!("{svc:?} -> {text} -> {e}"));
            assert_eq!(again.changes, vec![change.clone()], "{text}");
        }
    }
    let mut table = ServiceTable::new();
    let before = table.snapshot();
    if table.apply_batch(batch.changes).is_err() {
        assert_eq!(table.snapshot(), before);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check(Manifests::parse_json(text, Some("fuzz")));
    check(Manifests::parse_yaml(text, Some("fuzz")));
});
