//! The tracker's side of the per-backend (active, inactive) counts: it
//! writes the dataplane's [`ConnectionCounts`], keyed by backend id, as
//! connections appear, change class and go away.

use std::sync::Arc;

use super::Tracked;
use super::control::{Controlled, Controls};
use crate::Flow;
use crate::plan::BackendId;
use crate::scheduler::ConnectionCounts;

/// The counts the tracker keeps up to date (shared with the dataplane's
/// schedulers and listings).
#[derive(Debug, Clone, Default)]
pub(crate) struct BackendCounts {
    inner: Arc<ConnectionCounts>,
    /// The persistence templates' controlled-connection counts (IPVS mode).
    controls: Option<Arc<Controls>>,
}

impl BackendCounts {
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn shared(inner: Arc<ConnectionCounts>, controls: Option<Arc<Controls>>) -> Self {
        BackendCounts { inner, controls }
    }

    /// A connection appears (`control`: its template, if its code is not 0).
    pub(crate) fn inserted(
        &self,
        flow: &Flow,
        frontend: u32,
        backend: BackendId,
        active: bool,
        control: Controlled,
        now: u64,
    ) {
        self.add(backend.0, active);
        if control.code != 0 {
            if let Some(c) = &self.controls {
                c.add(frontend, flow, control, now);
            }
        }
    }

    /// The entry `t` (control code `control`) goes, at `at` nanoseconds.
    pub(crate) fn released(&self, t: &Tracked, control: u8, at: u64) {
        self.sub(t.backend.0, t.state.is_active());
        if control != 0 {
            if let Some(c) = &self.controls {
                c.sub(t.frontend.0, &t.flow, control, at);
            }
        }
    }

    /// A connection of `id` appears, active or not.
    pub(crate) fn add(&self, id: u32, active: bool) {
        let (a, i) = if active { (1, 0) } else { (0, 1) };
        self.inner.add(BackendId(id), a, i);
    }

    /// A connection of `id` goes away.
    pub(crate) fn sub(&self, id: u32, active: bool) {
        let (a, i) = if active { (-1, 0) } else { (0, -1) };
        self.inner.add(BackendId(id), a, i);
    }

    /// A connection of `id` changes class.
    pub(crate) fn change(&self, id: u32, now_active: bool) {
        let (a, i) = if now_active { (1, -1) } else { (-1, 1) };
        self.inner.add(BackendId(id), a, i);
    }

    /// (active, inactive).
    pub(crate) fn get(&self, id: u32) -> (u32, u32) {
        self.inner.get(BackendId(id))
    }

    /// Bytes allocated for the counters.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_move_between_classes() {
        let c = BackendCounts::new();
        assert_eq!(c.get(7), (0, 0));
        c.add(7, false);
        c.add(7, false);
        c.change(7, true);
        assert_eq!(c.get(7), (1, 1));
        c.change(7, false);
        c.sub(7, false);
        assert_eq!(c.get(7), (0, 1));
        c.add(100_000, true);
        assert_eq!(c.get(100_000), (1, 0));
    }
}
