//! `trace_parse`: arbitrary bytes read as a replay trace
//! (`svclb::trace::parse_trace`).
//!
//! - Nothing panics.
//! - A failure is a typed `TraceError` naming a line that exists and a
//!   field.
//! - Times never decrease in an accepted trace, and every line number is
//!   in the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svclb::trace::parse_trace;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count();
    match parse_trace(text) {
        Ok(trace) => {
            let mut last = svclb::Instant::ZERO;
            let mut last_line = 0;
            for l in &trace {
                assert!(l.at >= last, "time went back at line {}", l.line);
                assert!(l.line > last_line && l.line <= lines);
                last = l.at;
                last_line = l.line;
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(e.field()), "{msg}");
            assert!(msg.starts_with("line "), "{msg}");
            assert!(e.line() >= 1 && e.line() <= lines, "{msg}");
        }
    }
});
