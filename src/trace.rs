//! Replay traces: timed events, one per line, for simulators and the
//! `svclb replay` command.
//!
//! ```text
//! # T is in seconds since the start, fractional allowed, never decreasing.
//! 0      apply   examples/manifests
//! 0.5    connect tcp 10.0.0.1:40000 10.96.0.10:80
//! 12.25  close   tcp 10.0.0.1:40000 10.96.0.10:80
//! 30     delete  EndpointSlice default/web-x7k2p
//! ```
//!
//! - `T connect PROTO SRC DST` / `T close PROTO SRC DST`: PROTO is `tcp`,
//!   `udp` or `sctp` (any case); SRC and DST are `IP:PORT` (`[v6]:PORT`).
//!   `connect` is a connection's first packet (a SYN for TCP); `close`
//!   ends it (both directions closed, or the caller's end for UDP).
//! - `T packet PROTO SRC DST [FLAGS]`: a packet of a flow; FLAGS are TCP
//!   flags joined by commas (`syn`, `ack`, `fin`, `rst`), `ack` by default.
//! - `T tick`: only advances the clock and runs the timers.
//! - `T apply PATH`: apply the manifests in PATH (a file or a directory).
//! - `T delete KIND NAMESPACE/NAME`: KIND is `Service` or `EndpointSlice`
//!   (any case; `svc`, `services`, `endpointslices` too).
//! - Blank lines and lines starting with `#` are ignored.
//!
//! A bad line gives a [`TraceError`] naming the line number (from 1), the
//! field and the value. Parsing allocates only for paths and names.
//!
//! # Examples
//! ```
//! use svclb::trace::{parse_trace, TraceEvent};
//! let trace = parse_trace("0.5 connect tcp 10.0.0.1:40000 10.96.0.10:80\n")?;
//! assert!(matches!(trace[0].event, TraceEvent::Connect(_)));
//! assert_eq!(trace[0].at, svclb::Instant::from_millis(500));
//!
//! let err = parse_trace("0 apply a.yaml\n1 connect icmp 10.0.0.1:1 10.0.0.2:2\n").unwrap_err();
//! assert_eq!(err.to_string(), "line 2: protocol: invalid value \"icmp\": must be tcp, udp or sctp");
//! # Ok::<(), svclb::trace::TraceError>(())
//! ```

use core::fmt;
use std::net::SocketAddr;

use thiserror::Error;

use crate::conntrack::TcpFlags;
use crate::model::endpoint_slice::SliceKey;
use crate::model::flow::{Flow, Protocol};
use crate::model::service::ServiceKey;
use crate::table::Change;
use crate::time::Instant;

/// The largest time a trace may name, in seconds (about 31 years).
pub const MAX_TRACE_SECS: f64 = 1e9;

/// The kind of object a `delete` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// A Service (its slices go with it).
    Service,
    /// An EndpointSlice.
    EndpointSlice,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
        })
    }
}

/// One event of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceEvent {
    /// A new connection's first packet.
    Connect(Flow),
    /// A packet of a flow, with its TCP flags.
    Packet(Flow, TcpFlags),
    /// The clock advances; timers run.
    Tick,
    /// A connection ends.
    Close(Flow),
    /// Apply the manifests at this path (add or replace).
    Apply(String),
    /// Delete an object.
    Delete {
        /// Service or EndpointSlice.
        kind: ObjectKind,
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
    },
}

impl TraceEvent {
    /// The table change a `delete` makes (`None` for other events).
    pub fn delete_change(&self) -> Option<Change> {
        match self {
            TraceEvent::Delete {
                kind: ObjectKind::Service,
                namespace,
                name,
            } => Some(Change::DeleteService(ServiceKey::new(namespace, name))),
            TraceEvent::Delete {
                kind: ObjectKind::EndpointSlice,
                namespace,
                name,
            } => Some(Change::DeleteSlice(SliceKey::new(namespace, name))),
            _ => None,
        }
    }
}

/// One line of a trace: when, what, and where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceLine {
    /// The line number, from 1.
    pub line: usize,
    /// The time.
    pub at: Instant,
    /// The event.
    pub event: TraceEvent,
}

/// A trace line that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TraceError {
    /// A field is missing.
    #[error("line {line}: {field}: required value is missing")]
    Missing {
        /// The line number, from 1.
        line: usize,
        /// The field (`time`, `event`, `protocol`, `source`, ...).
        field: &'static str,
    },
    /// A field has a bad value.
    #[error("line {line}: {field}: invalid value {value:?}: {reason}")]
    Invalid {
        /// The line number, from 1.
        line: usize,
        /// The field.
        field: &'static str,
        /// The value given.
        value: String,
        /// Why it is invalid.
        reason: &'static str,
    },
}

impl TraceError {
    /// The line number, from 1.
    pub fn line(&self) -> usize {
        match self {
            TraceError::Missing { line, .. } | TraceError::Invalid { line, .. } => *line,
        }
    }

    /// The field the error names.
    pub fn field(&self) -> &'static str {
        match self {
            TraceError::Missing { field, .. } | TraceError::Invalid { field, .. } => field,
        }
    }
}

/// Parses a whole trace.
///
/// # Errors
/// The first bad line's [`TraceError`]; also a time earlier than the
/// previous line's.
pub fn parse_trace(text: &str) -> Result<Vec<TraceLine>, TraceError> {
    let mut out = Vec::new();
    let mut last = Instant::ZERO;
    for (i, raw) in text.lines().enumerate() {
        let Some(line) = parse_line(i + 1, raw)? else {
            continue;
        };
        if line.at < last {
            return Err(TraceError::Invalid {
                line: line.line,
                field: "time",
                value: raw.split_whitespace().next().unwrap_or("").into(),
                reason: "must not be earlier than the previous line's time",
            });
        }
        last = line.at;
        out.push(line);
    }
    Ok(out)
}

/// Parses one line (`line_no` from 1, for errors); `None` for a blank or
/// comment line.
///
/// # Errors
/// A [`TraceError`] naming the field.
pub fn parse_line(line_no: usize, text: &str) -> Result<Option<TraceLine>, TraceError> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    let mut fields = trimmed.split_whitespace();
    let mut next = |field: &'static str| {
        fields.next().ok_or(TraceError::Missing {
            line: line_no,
            field,
        })
    };
    let invalid = |field: &'static str, value: &str, reason: &'static str| TraceError::Invalid {
        line: line_no,
        field,
        value: value.into(),
        reason,
    };
    let t = next("time")?;
    let secs: f64 = t
        .parse()
        .map_err(|_| invalid("time", t, "must be a number of seconds"))?;
    if !(secs.is_finite() && (0.0..=MAX_TRACE_SECS).contains(&secs)) {
        return Err(invalid("time", t, "must be between 0 and 1e9 seconds"));
    }
    let at = Instant::from_secs_f64(secs);
    let verb = next("event")?;
    let event = match verb {
        "tick" => TraceEvent::Tick,
        "connect" | "close" | "packet" => {
            let p = next("protocol")?;
            let protocol = match p.to_ascii_lowercase().as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "sctp" => Protocol::Sctp,
                _ => return Err(invalid("protocol", p, "must be tcp, udp or sctp")),
            };
            let addr = |field: &'static str, s: &str| {
                s.parse::<SocketAddr>()
                    .map_err(|_| invalid(field, s, "must be IP:PORT ([IPv6]:PORT)"))
            };
            let src = addr("source", next("source")?)?;
            let dst = addr("destination", next("destination")?)?;
            let flow = Flow::new(protocol, src, dst);
            match verb {
                "connect" => TraceEvent::Connect(flow),
                "close" => TraceEvent::Close(flow),
                _ => {
                    let flags = match fields.next() {
                        None => TcpFlags::default(),
                        Some(f) => f.parse().map_err(|_| {
                            invalid(
                                "flags",
                                f,
                                "must be TCP flags joined by commas: syn, ack, fin, rst",
                            )
                        })?,
                    };
                    TraceEvent::Packet(flow, flags)
                }
            }
        }
        "apply" => TraceEvent::Apply(next("path")?.to_owned()),
        "delete" => {
            let k = next("kind")?;
            let kind = match k.to_ascii_lowercase().as_str() {
                "service" | "services" | "svc" => ObjectKind::Service,
                "endpointslice" | "endpointslices" => ObjectKind::EndpointSlice,
                _ => return Err(invalid("kind", k, "must be Service or EndpointSlice")),
            };
            let n = next("name")?;
            let Some((namespace, name)) = n
                .split_once('/')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            else {
                return Err(invalid("name", n, "must be NAMESPACE/NAME"));
            };
            TraceEvent::Delete {
                kind,
                namespace: namespace.into(),
                name: name.into(),
            }
        }
        other => {
            return Err(invalid(
                "event",
                other,
                "must be connect, packet, close, tick, apply or delete",
            ));
        }
    };
    if let Some(extra) = fields.next() {
        return Err(invalid("line", extra, "unexpected extra field"));
    }
    Ok(Some(TraceLine {
        line: line_no,
        at,
        event,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_event() {
        let t = parse_trace(
            "# a trace\n\n0 apply examples/manifests\n0.25 connect TCP 10.0.0.1:40000 10.96.0.10:80\n\
             1.5 close udp [fd00::1]:53 [fd00::10]:53\n2 delete svc default/web\n2 delete EndpointSlice default/web-1\n",
        )
        .unwrap();
        assert_eq!(t.len(), 5);
        assert_eq!(t[0].line, 3);
        assert_eq!(t[0].event, TraceEvent::Apply("examples/manifests".into()));
        assert_eq!(t[1].at, Instant::from_millis(250));
        assert_eq!(
            t[1].event,
            TraceEvent::Connect(Flow::tcp(
                "10.0.0.1:40000".parse().unwrap(),
                "10.96.0.10:80".parse().unwrap()
            ))
        );
        assert!(matches!(&t[2].event, TraceEvent::Close(f) if f.protocol == Protocol::Udp));
        assert_eq!(
            t[3].event.delete_change(),
            Some(Change::DeleteService(ServiceKey::new("default", "web")))
        );
        assert_eq!(
            t[4].event.delete_change(),
            Some(Change::DeleteSlice(SliceKey::new("default", "web-1")))
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases: [(&str, &str); 11] = [
            ("x connect tcp 1.1.1.1:1 2.2.2.2:2", "time"),
            ("-1 connect tcp 1.1.1.1:1 2.2.2.2:2", "time"),
            ("NaN connect tcp 1.1.1.1:1 2.2.2.2:2", "time"),
            ("1 open tcp 1.1.1.1:1 2.2.2.2:2", "event"),
            ("1", "event"),
            ("1 connect tcp 1.1.1.1 2.2.2.2:2", "source"),
            ("1 connect tcp 1.1.1.1:1", "destination"),
            ("1 connect tcp 1.1.1.1:1 2.2.2.2:2 extra", "line"),
            ("1 delete Pod default/x", "kind"),
            ("1 delete svc default", "name"),
            ("1 apply", "path"),
        ];
        for (line, field) in cases {
            let err = parse_trace(&format!("0 apply x\n{line}\n")).unwrap_err();
            assert_eq!((err.line(), err.field()), (2, field), "{line}: {err}");
        }
        let err = parse_trace("2 apply x\n1 apply y\n").unwrap_err();
        assert_eq!((err.line(), err.field()), (2, "time"));
    }
}
