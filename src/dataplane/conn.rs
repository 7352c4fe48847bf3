//! The connection layer every dataplane shares: the tracker in front of the
//! mode's scheduling, graceful termination and `expire_nodest_conn`.
//!
//! A packet first meets the [`Conntrack`]. A live entry whose backend is
//! active or draining forwards to that backend (the flow keeps its backend
//! across any endpoint change); an entry whose backend is gone is expired:
//! a UDP or SCTP flow (whose conntrack entries kube-proxy clears) and a TCP
//! SYN are scheduled afresh, any other TCP packet is dropped
//! (`expire_nodest_conn`). A miss, or a SYN that reopens a connection in
//! TIME_WAIT or CLOSE, goes to the mode's scheduler, and a forward is
//! tracked.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::conntrack::{ConnState, Conntrack, ConntrackConfig, TcpFlags, TcpState, Tracked};
use crate::model::flow::{Flow, Forward, Protocol, Verdict};
use crate::plan::{BackendId, BackendState, BackendStates, FrontendId};
use crate::scheduler::ConnectionCounts;
use crate::time::Instant;

/// What a mode's scheduling decided for a new connection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scheduled {
    Forward {
        frontend: FrontendId,
        backend: BackendId,
        addr: SocketAddr,
    },
    Reject,
    Drop,
    NotAService,
}

/// The tracker (if on) and the per-backend connection counts.
#[derive(Debug)]
pub(crate) struct ConnLayer {
    tracker: Option<Conntrack>,
    counts: Arc<ConnectionCounts>,
}

impl ConnLayer {
    pub(crate) fn new(config: Option<&ConntrackConfig>) -> Self {
        let counts = Arc::new(ConnectionCounts::default());
        ConnLayer {
            tracker: config.map(|c| Conntrack::with_counts(c.clone(), Arc::clone(&counts))),
            counts,
        }
    }

    pub(crate) fn tracker(&self) -> Option<&Conntrack> {
        self.tracker.as_ref()
    }

    pub(crate) fn counts(&self) -> &Arc<ConnectionCounts> {
        &self.counts
    }

    /// Whether backend `id` still has tracked connections.
    pub(crate) fn has_connections(&self, id: BackendId) -> bool {
        self.counts.total(id) > 0
    }

    /// One packet of `flow` with `flags`; `schedule` decides a new
    /// connection.
    #[inline]
    pub(crate) fn packet(
        &self,
        states: &BackendStates,
        flow: &Flow,
        flags: TcpFlags,
        now: Instant,
        mut schedule: impl FnMut() -> Scheduled,
    ) -> Verdict {
        if let Some(ct) = &self.tracker {
            if let Some(hit) = ct.lookup(flow, flags, now) {
                match states.state(hit.backend) {
                    BackendState::Active | BackendState::Draining => {
                        let reopen = flow.protocol == Protocol::Tcp
                            && flags.contains(TcpFlags::SYN)
                            && !flags.contains(TcpFlags::ACK)
                            && matches!(
                                hit.previous,
                                ConnState::Tcp(TcpState::TimeWait | TcpState::Close)
                            );
                        if !reopen {
                            return Verdict::Forward(Forward {
                                backend: hit.backend_addr,
                                backend_id: hit.backend,
                                frontend: hit.frontend,
                                tracked: true,
                            });
                        }
                        ct.remove(flow);
                    }
                    _ => {
                        // expire_nodest_conn: the connection expires.
                        ct.remove(flow);
                        if flow.protocol == Protocol::Tcp && !flags.contains(TcpFlags::SYN) {
                            return Verdict::Drop;
                        }
                    }
                }
            }
        }
        // A backend chosen from a rule list that a concurrent sync has just
        // retired may be gone by the time the flow is tracked: check after
        // the insert (which the writer's connection count sees) and
        // schedule once more, so a new connection does not start on a
        // dead backend.
        for attempt in 0..2 {
            match schedule() {
                Scheduled::Forward {
                    frontend,
                    backend,
                    addr,
                } => {
                    if let Some(ct) = &self.tracker {
                        ct.insert(flow, frontend, backend, addr, flags, now);
                        if attempt == 0 && states.state(backend) == BackendState::Gone {
                            ct.remove(flow);
                            continue;
                        }
                    }
                    return Verdict::Forward(Forward {
                        backend: addr,
                        backend_id: backend,
                        frontend,
                        tracked: false,
                    });
                }
                Scheduled::Reject => return Verdict::Reject,
                Scheduled::Drop => return Verdict::Drop,
                Scheduled::NotAService => return Verdict::NotAService,
            }
        }
        Verdict::Drop
    }

    /// Ends the tracked connection of `flow`.
    pub(crate) fn close(&self, flow: &Flow) -> Option<Tracked> {
        self.tracker.as_ref()?.remove(flow)
    }

    /// A reply packet of the connection whose original direction is
    /// `orig`.
    pub(crate) fn reply(&self, orig: &Flow, flags: TcpFlags, now: Instant) -> Option<Tracked> {
        let ct = self.tracker.as_ref()?;
        ct.lookup_reply(orig, flags, now)?;
        ct.get(orig, now)
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.tracker.as_ref()?.poll_timeout()
    }

    pub(crate) fn handle_timeout(&self, now: Instant) -> usize {
        self.tracker.as_ref().map_or(0, |t| t.handle_timeout(now))
    }

    pub(crate) fn entries(&self, now: Instant) -> Vec<Tracked> {
        self.tracker
            .as_ref()
            .map_or_else(Vec::new, |t| t.entries(now))
    }
}
