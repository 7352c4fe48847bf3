//! Thread CPU time (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`, through the
//! `cpu-time` crate; the wall clock where it is missing), and a criterion
//! measurement built on it.
//!
//! The benches run on a shared 2-core machine where other processes come and
//! go: wall-clock time would count the time this thread waits for a core.
//! The time the thread actually ran does not (cache pollution from the
//! others still shows, as it would in production).

use std::sync::OnceLock;
use std::time::Instant;

use criterion::Throughput;
use criterion::measurement::{Measurement, ValueFormatter};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds this thread has run, or wall-clock nanoseconds since the
/// first call where the system does not say.
pub fn thread_cpu_ns() -> u64 {
    match cpu_time::ThreadTime::try_now() {
        Ok(t) => t.as_duration().as_nanos() as u64,
        Err(_) => epoch().elapsed().as_nanos() as u64,
    }
}

/// Whether [`thread_cpu_ns`] reads the thread's CPU time here.
pub fn is_cpu_time() -> bool {
    cpu_time::ThreadTime::try_now().is_ok()
}

/// Criterion's measurement of thread CPU time, in nanoseconds.
pub struct ThreadCpu;

impl Measurement for ThreadCpu {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &NanosFormatter
    }
}

struct NanosFormatter;

impl ValueFormatter for NanosFormatter {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical < 1e3 {
            (1.0, "ns")
        } else if typical < 1e6 {
            (1e-3, "µs")
        } else if typical < 1e9 {
            (1e-6, "ms")
        } else {
            (1e-9, "s")
        };
        for v in values {
            *v *= factor;
        }
        unit
    }

    fn scale_throughputs(
        &self,
        _typical: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let per = match throughput {
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) | Throughput::Elements(n) => {
                *n as f64
            }
        };
        for v in values {
            *v = per * 1e9 / *v;
        }
        "/s"
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}
