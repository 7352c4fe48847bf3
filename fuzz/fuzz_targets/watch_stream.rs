//! `watch_stream`: arbitrary bytes read as a kubectl watch stream (JSON
//! events, YAML events, plain objects) and applied through
//! `k8s::loader::Loader` within small input limits.
//!
//! - Nothing panics, and nothing runs away: the limits bound every input.
//! - Every error names the input ("fuzz"); a stream refused for bad objects
//!   leaves the table untouched.
//! - Applying is deterministic: a second loader on a fresh table ends in
//!   the same table (cluster IPs assigned, stale versions dropped, the
//!   same way).
//! - The table's pending slices are exactly those whose service is absent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svclb::ServiceTable;
use svclb::k8s::input::InputLimits;
use svclb::k8s::loader::{LoadError, LoadOptions, Loader};

fn options(keep_going: bool) -> LoadOptions {
    LoadOptions {
        keep_going,
        limits: InputLimits {
            max_bytes: 64 << 10,
            max_depth: 32,
            max_documents: 256,
            max_objects: 512,
        },
        max_errors: 8,
        ..LoadOptions::default()
    }
}

fn run(text: &str, keep_going: bool) -> (ServiceTable, Result<usize, String>) {
    let mut table = ServiceTable::new();
    let before = table.snapshot();
    let mut loader = Loader::new(options(keep_going));
    let result = match loader.apply_watch_text(&mut table, text, "fuzz") {
        Ok(report) => {
            let _ = report.lines(false);
            Ok(report.change_sets.len())
        }
        Err(e) => {
            let msg = e.to_string();
            match &e {
                LoadError::Input(errors) => {
                    assert_eq!(
                        table.snapshot(),
                        before,
                        "a refused stream changed the table"
                    );
                    for err in &errors.errors {
                        assert!(err.to_string().starts_with("fuzz"), "{err}");
                    }
                }
                LoadError::Refused { .. } => assert!(msg.starts_with("fuzz"), "{msg}"),
                _ => {}
            }
            Err(msg)
        }
    };
    (table, result)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for keep_going in [false, true] {
        let (table, result) = run(text, keep_going);
        let (again, result2) = run(text, keep_going);
        assert_eq!(result, result2);
        assert_eq!(table.snapshot(), again.snapshot(), "not deterministic");
        for slice in table.pending_slices() {
            assert!(table.service(slice.service()).is_none());
        }
        for view in table.views() {
            for slice in table.slices_of(view.service().key()) {
                assert!(!table.is_pending(slice.key()));
            }
        }
    }
});
