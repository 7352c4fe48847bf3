//! `manifest_parse`: arbitrary bytes read as JSON and as YAML manifests,
//! and within input limits chosen by the first byte.
//!
//! - A limit passed is a `ManifestError::Limit` naming it; an input longer
//!   than `max_bytes` is always refused with `Limit::Bytes`.
//! - Nothing panics: parsing, conversion into table changes, applying them.
//! - Every failure is a typed `ManifestError` (or, from the table, an
//!   `UpdateError`) whose message names where it came from.
//! - A service that converts serializes back (`ServiceManifest::from`) and
//!   reads again as the same service: `model -> JSON -> model` is the
//!   identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svclb::k8s::input::{InputLimits, Limit};
use svclb::k8s::manifest::{ManifestError, Manifests, ServiceManifest};
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
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    check(Manifests::parse_json(text, Some("fuzz")));
    check(Manifests::parse_yaml(text, Some("fuzz")));
    // Small limits, so that the fuzzer reaches each of them.
    let limits = InputLimits {
        max_bytes: 64 + u64::from(knob & 0x3f) * 64,
        max_depth: 1 + usize::from(knob >> 6) * 4,
        max_documents: 1 + usize::from(knob & 7),
        max_objects: 1 + usize::from(knob >> 3 & 7),
    };
    let parsed = Manifests::parse_str_with(text, Some("fuzz"), &limits);
    if text.trim_start_matches('\u{feff}').len() as u64 > limits.max_bytes {
        assert!(
            matches!(
                parsed,
                Err(ManifestError::Limit {
                    limit: Limit::Bytes,
                    ..
                })
            ),
            "{parsed:?}"
        );
    }
    if let Err(ManifestError::Limit { limit, max, .. }) = &parsed {
        let msg = parsed.as_ref().unwrap_err().to_string();
        assert!(
            msg.contains(limit.name()) && msg.contains(&max.to_string()),
            "{msg}"
        );
    }
    check(parsed);
});
