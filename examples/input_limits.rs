//! Input that cannot stall us: rejection time against bytes read, for
//! nested brackets (JSON and YAML flow style), oversized input and
//! `/dev/zero`-like input, at four sizes. Linear means the ns/byte column
//! stays flat (or falls: a limit stops reading early) as the size doubles.
//!
//! ```sh
//! cargo run --release --example input_limits
//! ```

use std::io::Read;
use std::time::Instant;

use svclb::k8s::input::{InputLimits, read_capped};
use svclb::k8s::manifest::Manifests;

/// The median of 5 runs of `f`, in seconds.
fn time(mut f: impl FnMut()) -> f64 {
    let mut s: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    s.sort_by(f64::total_cmp);
    s[2]
}

fn row(case: &str, bytes: usize, secs: f64) {
    println!(
        "{case:<28} {bytes:>10} {:>12.1} {:>9.2}",
        secs * 1e6,
        secs * 1e9 / bytes as f64
    );
}

fn main() {
    println!(
        "{:<28} {:>10} {:>12} {:>9}",
        "case", "bytes", "reject µs", "ns/byte"
    );
    let limits = InputLimits::default();
    for n in [25_000usize, 50_000, 100_000, 200_000] {
        let json = "[".repeat(n);
        let t = time(|| {
            assert!(Manifests::parse_str_with(&json, Some("nested.json"), &limits).is_err())
        });
        row("nested [ (JSON)", n, t);
        let yaml = format!("a: {}", "[".repeat(n));
        let t = time(|| {
            assert!(Manifests::parse_str_with(&yaml, Some("nested.yaml"), &limits).is_err())
        });
        row("nested [ (YAML flow)", yaml.len(), t);
        let braces = format!("{}{}", "{a: ".repeat(n / 4), "}".repeat(n / 4));
        let t = time(|| {
            assert!(Manifests::parse_str_with(&braces, Some("nested.yaml"), &limits).is_err())
        });
        row("nested {a: (YAML flow)", braces.len(), t);
        // Block nesting needs no brackets: `- - - ... x`, n/2 levels.
        let block = format!("{}x\n", "- ".repeat(n / 2));
        let t = time(|| {
            assert!(Manifests::parse_str_with(&block, Some("block.yaml"), &limits).is_err())
        });
        row("nested - - (YAML block)", block.len(), t);
        // Oversized: a limit of n/2 bytes over an endless stream of text.
        let small = InputLimits {
            max_bytes: (n / 2) as u64,
            ..limits
        };
        let t = time(|| {
            let text = std::io::repeat(b'a').take(u64::MAX);
            assert!(read_capped(text, Some("big.yaml"), &small).is_err())
        });
        row("oversized (limit n/2)", n / 2, t);
    }
    // /dev/zero: an endless stream of NUL bytes, default limits.
    let t = time(|| {
        let zeros = std::io::repeat(0).take(u64::MAX);
        assert!(read_capped(zeros, Some("/dev/zero"), &limits).is_err())
    });
    row("/dev/zero (first chunk)", 64 << 10, t);
}
