//! kube-proxy's health checks, sans-IO: the answer of a service's
//! `healthCheckNodePort` and of the node-level `/healthz` (port 10256), as
//! `pkg/proxy/healthcheck` writes them, computed from the table and the
//! caller's clock. The caller serves the HTTP.
//!
//! - A service health check (`externalTrafficPolicy: Local` LoadBalancer
//!   services): `200` when this node has a ready endpoint of the service
//!   and the proxy is healthy, else `503`; headers `Content-Type:
//!   application/json`, `X-Content-Type-Options: nosniff` and
//!   `X-Load-Balancing-Endpoint-Weight: N`; the body, indented with tabs
//!   as kube-proxy's dedented template leaves it:
//!   `{\n\t"service": {\n\t\t"namespace": "ns1",\n\t\t"name": "svc1"\n\t},\n\t"localEndpoints": 1,\n\t"serviceProxyHealthy": true\n}`.
//!
//!   `localEndpoints` counts this node's ready endpoints of the service,
//!   each `IP:port` once across the service's ports (kube-proxy's
//!   `LocalReadyEndpoints`).
//! - `/healthz`: `200` when healthy (and then `lastUpdated` is the current
//!   time, as kube-proxy reports it for compatibility), else `503`; the
//!   body `{"lastUpdated": "…","currentTime": "…", "nodeEligible": true}`
//!   with times in Go's `time.Time` format (`2026-12-01 13:46:35.5 +0000
//!   UTC`, without the monotonic-clock suffix a live process prints).
//!
//! # Examples
//! ```
//! use std::time::Duration;
//! use svclb::k8s::health::{healthz, service_health};
//! use svclb::*;
//!
//! let mut table = ServiceTable::new();
//! let svc = Service::builder("ns1", "svc1")
//!     .cluster_ip("172.30.0.41".parse()?)
//!     .service_type(ServiceType::LoadBalancer)
//!     .external_traffic_policy(TrafficPolicy::Local)
//!     .health_check_node_port(30000)
//!     .port(ServicePortSpec::tcp(80))
//!     .build()?;
//! let slice = EndpointSlice::builder("ns1", "svc1-1", "svc1", AddressType::IPv4)
//!     .port(SlicePortSpec::tcp(80))
//!     .endpoint(EndpointSpec::new("10.180.0.1").node("node-a"))
//!     .build()?;
//! table.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)])?;
//! let key = ServiceKey::new("ns1", "svc1");
//! let here = service_health(&table, &NodeTopology::new("node-a", "z"), &key, true).unwrap();
//! assert_eq!(here.status, 200);
//! assert!(here.body.contains("\"localEndpoints\": 1"));
//! let elsewhere = service_health(&table, &NodeTopology::new("node-b", "z"), &key, true).unwrap();
//! assert_eq!(elsewhere.status, 503);
//!
//! let t = Duration::from_secs(1_764_596_795);
//! let h = healthz(t, t, true, true);
//! assert_eq!(h.body, r#"{"lastUpdated": "2025-12-01 13:46:35 +0000 UTC","currentTime": "2025-12-01 13:46:35 +0000 UTC", "nodeEligible": true}"#);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt::Write as _;
use std::collections::BTreeSet;
use std::time::Duration;

use crate::model::service::ServiceKey;
use crate::table::ServiceTable;
use crate::topology::NodeTopology;

/// kube-proxy's node health port (`--healthz-bind-address`, default
/// `0.0.0.0:10256`).
pub const HEALTHZ_PORT: u16 = 10_256;

/// An HTTP answer: status, headers in the order kube-proxy sets them, and
/// the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthResponse {
    /// `200` or `503`.
    pub status: u16,
    /// The headers.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: String,
}

impl HealthResponse {
    /// `200 OK` or `503 Service Unavailable`.
    pub fn status_line(&self) -> &'static str {
        if self.status == 200 {
            "200 OK"
        } else {
            "503 Service Unavailable"
        }
    }
}

fn json_headers() -> Vec<(&'static str, String)> {
    vec![
        ("Content-Type", "application/json".into()),
        ("X-Content-Type-Options", "nosniff".into()),
    ]
}

/// The number of this node's ready endpoints of `key`, each `IP:port` once
/// (kube-proxy's `LocalReadyEndpoints`).
pub fn local_ready_endpoints(table: &ServiceTable, node: &NodeTopology, key: &ServiceKey) -> usize {
    let Some(view) = table.view(key) else {
        return 0;
    };
    let mut seen = BTreeSet::new();
    for pv in view.ports() {
        for ep in pv.endpoints() {
            if ep.is_ready() && ep.is_on_node(node.node_name.as_deref()) {
                seen.insert(ep.addr());
            }
        }
    }
    seen.len()
}

/// The answer of `key`'s health-check node port on `node`, or `None` when
/// the service does not exist or has no `healthCheckNodePort` (kube-proxy
/// then serves nothing). `proxy_healthy` is the node-level health (see
/// [`healthz`]).
pub fn service_health(
    table: &ServiceTable,
    node: &NodeTopology,
    key: &ServiceKey,
    proxy_healthy: bool,
) -> Option<HealthResponse> {
    let svc = table.service(key)?;
    svc.health_check_node_port()?;
    let count = local_ready_endpoints(table, node, key);
    let mut headers = json_headers();
    headers.push(("X-Load-Balancing-Endpoint-Weight", count.to_string()));
    let status = if count != 0 && proxy_healthy {
        200
    } else {
        503
    };
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        go_quote(&key.namespace),
        go_quote(&key.name),
    );
    Some(HealthResponse {
        status,
        headers,
        body,
    })
}

/// The node-level `/healthz` answer at `now` (time since the Unix epoch):
/// `healthy` is the caller's judgement (kube-proxy: the last sync is
/// recent, or nothing is pending), `last_updated` the time of the last
/// sync, `node_eligible` whether the node may take load-balancer traffic
/// (kube-proxy: not being deleted, not tainted for removal).
pub fn healthz(
    last_updated: Duration,
    now: Duration,
    healthy: bool,
    node_eligible: bool,
) -> HealthResponse {
    let healthy = healthy && node_eligible;
    let last = if healthy { now } else { last_updated };
    HealthResponse {
        status: if healthy { 200 } else { 503 },
        headers: json_headers(),
        body: format!(
            "{{\"lastUpdated\": {},\"currentTime\": {}, \"nodeEligible\": {node_eligible}}}",
            go_quote(&go_time(last)),
            go_quote(&go_time(now)),
        ),
    }
}

/// Go's `%q` of a string (the names here are DNS labels; quotes and
/// backslashes are escaped all the same).
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `time.Time.String()` of a UTC time: `2006-01-02 15:04:05.999999999
/// +0000 UTC` (trailing zeros of the fraction dropped).
fn go_time(t: Duration) -> String {
    let secs = t.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
    let nanos = t.subsec_nanos();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push_str(" +0000 UTC");
    s
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_time_format() {
        assert_eq!(go_time(Duration::ZERO), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(
            go_time(Duration::new(951_782_400, 500_000_000)),
            "2000-02-29 00:00:00.5 +0000 UTC"
        );
        assert_eq!(
            go_time(Duration::new(1_764_596_795, 123_456_789)),
            "2025-12-01 13:46:35.123456789 +0000 UTC"
        );
    }

    #[test]
    fn unhealthy_healthz_reports_the_last_update() {
        let h = healthz(
            Duration::from_secs(10),
            Duration::from_secs(100),
            false,
            true,
        );
        assert_eq!(h.status, 503);
        assert_eq!(
            h.body,
            r#"{"lastUpdated": "1970-01-01 00:00:10 +0000 UTC","currentTime": "1970-01-01 00:01:40 +0000 UTC", "nodeEligible": true}"#
        );
        let h = healthz(
            Duration::from_secs(10),
            Duration::from_secs(100),
            true,
            false,
        );
        assert_eq!(h.status, 503);
        assert!(h.body.ends_with("\"nodeEligible\": false}"));
    }
}
