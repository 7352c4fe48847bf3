//! IPVS persistence templates' `n_control`: how many tracked connections
//! each template controls, so that a template does not expire while it
//! still controls live connections (`ip_vs_conn_expire` puts the expiry of
//! a template with `n_control > 0` off by 60 s at a time).
//!
//! The tracker counts here: a connection scheduled through a template is
//! inserted with the template's control code (its key kind and a 6-bit
//! generation, stored in the entry's control word), and every removal of
//! the entry (close, flush, eviction, expiry) releases it. The affinity
//! table reads the count of a template by (frontend, key, generation).
//!
//! A count remembers the latest expiry its connections gave the template
//! (each new connection restarts the template's timer). A count that falls
//! to 0 before that expiry is forgotten at once: the template expires on
//! its own timer. One that falls to 0 after it (the template's timer fired
//! while it controlled a connection) keeps its release time for 60 s, the
//! longest the kernel's template can outlive its last controlled
//! connection (its timer fires at most 60 s later), and is forgotten
//! after. So the counts held are those of live connections, plus the
//! recent releases of templates that outlived their own timeout.

use std::collections::VecDeque;

use ahash::AHashMap;
use parking_lot::Mutex;

use crate::affinity::AffinityKey;
use crate::{Flow, Instant};

/// How long a kernel template's expiry is put off while it controls
/// connections (`cp->timeout = 60*HZ` in `ip_vs_conn_expire`).
pub(crate) const DELAY_NANOS: u64 = 60_000_000_000;

/// The control code's kind bit: the template is keyed by the client's
/// address and port (`ClientIpPort`), not its address.
const PORT_KIND: u8 = 0x40;
const GEN_MASK: u8 = 0x3F;

/// A template's control code (0: the connection is controlled by none):
/// the key kind and a generation in `1..=63`.
#[inline]
pub(crate) fn code(key: &AffinityKey, generation: u8) -> u8 {
    let g = generation & GEN_MASK;
    match key {
        _ if g == 0 => 0,
        AffinityKey::ClientIp(_) => g,
        AffinityKey::ClientIpPort(_) => g | PORT_KIND,
        AffinityKey::Caller(_) => 0,
    }
}

/// The template key a controlled connection of `flow` counts towards.
#[inline]
fn key_of(flow: &Flow, code: u8) -> AffinityKey {
    if code & PORT_KIND != 0 {
        AffinityKey::ClientIpPort(flow.src)
    } else {
        AffinityKey::ClientIp(flow.src.ip())
    }
}

type Key = (u32, AffinityKey, u8);

/// What the tracker keeps of a connection's template: its control code
/// (0: none) and the timeout its timer was restarted with when it
/// scheduled the connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Controlled {
    /// The control code ([`code`]).
    pub(crate) code: u8,
    /// The template's timeout then, in nanoseconds.
    pub(crate) timeout: u64,
}

#[derive(Debug, Clone, Copy)]
struct Count {
    live: u32,
    /// The latest expiry a connection's scheduling gave the template, in
    /// nanoseconds.
    expires: u64,
    /// When the count last fell to 0, in nanoseconds.
    released: u64,
}

#[derive(Debug, Default)]
struct Shard {
    counts: AHashMap<Key, Count>,
    /// Counts that fell to 0, in release order, to be forgotten 60 s on.
    zeroed: VecDeque<(Key, u64)>,
}

impl Shard {
    /// Forgets up to 2 counts that fell to 0 more than 60 s before `now`
    /// (two per call keeps up with one release per call).
    fn prune(&mut self, now: u64) {
        for _ in 0..2 {
            let Some(&(key, at)) = self.zeroed.front() else {
                return;
            };
            if at.saturating_add(DELAY_NANOS) > now {
                return;
            }
            self.zeroed.pop_front();
            if let Some(c) = self.counts.get(&key) {
                if c.live == 0 && c.released == at {
                    self.counts.remove(&key);
                }
            }
        }
    }
}

/// What a template's controlled connections say about its expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// It controls this many live connections (at least one).
    Live(u32),
    /// Its last controlled connection went at this time.
    Released(Instant),
    /// It controls none, and none went in the last 60 s.
    None,
}

/// The counts, sharded by a hash of the key.
#[derive(Debug)]
pub(crate) struct Controls {
    shards: Box<[Mutex<Shard>]>,
    hasher: ahash::RandomState,
}

impl Default for Controls {
    fn default() -> Self {
        Controls {
            shards: (0..64).map(|_| Mutex::default()).collect(),
            hasher: ahash::RandomState::new(),
        }
    }
}

impl Controls {
    #[inline]
    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        let h = self.hasher.hash_one(key) as usize;
        &self.shards[h % self.shards.len()]
    }

    /// A connection of `flow` through `frontend` is tracked at `now` under
    /// the template `control` (whose code is non-zero).
    pub(crate) fn add(&self, frontend: u32, flow: &Flow, control: Controlled, now: u64) {
        let code = control.code;
        let key = (frontend, key_of(flow, code), code);
        let mut sh = self.shard(&key).lock();
        sh.prune(now);
        let c = sh.counts.entry(key).or_insert(Count {
            live: 0,
            expires: 0,
            released: 0,
        });
        c.live = c.live.saturating_add(1);
        c.expires = c.expires.max(now.saturating_add(control.timeout));
    }

    /// That connection went at `at`.
    pub(crate) fn sub(&self, frontend: u32, flow: &Flow, code: u8, at: u64) {
        let key = (frontend, key_of(flow, code), code);
        let mut sh = self.shard(&key).lock();
        sh.prune(at);
        let Some(c) = sh.counts.get_mut(&key) else {
            return;
        };
        c.live = c.live.saturating_sub(1);
        if c.live == 0 {
            if at <= c.expires {
                // Before the template's own timer: nothing to remember.
                sh.counts.remove(&key);
            } else {
                c.released = at;
                sh.zeroed.push_back((key, at));
            }
        }
    }

    /// The template of `key` (generation `generation`) in `frontend`.
    pub(crate) fn get(&self, frontend: u32, key: &AffinityKey, generation: u8) -> Control {
        let code = code(key, generation);
        if code == 0 {
            return Control::None;
        }
        let key = (frontend, *key, code);
        let sh = self.shard(&key).lock();
        match sh.counts.get(&key) {
            Some(c) if c.live > 0 => Control::Live(c.live),
            Some(c) => Control::Released(Instant::from_nanos(c.released)),
            None => Control::None,
        }
    }

    /// Counts held (live or recently released), for tests.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().counts.len()).sum()
    }
}

/// When the kernel's template, whose own timer fires at `expires`
/// (nanoseconds), expires as seen at `now` given `control`: `Some(at)`
/// while it is live, `None` once it has expired; and whether its timer has
/// fired while it controlled connections (from then on its timeout is
/// 60 s).
///
/// The timer fires at `expires`, then every 60 s while the template
/// controls a connection; the template expires at the first firing at
/// which it controls none.
pub(crate) fn template_expiry(expires: u64, now: u64, control: Control) -> (Option<u64>, bool) {
    if now < expires {
        return (Some(expires), false);
    }
    match control {
        Control::Live(_) => {
            // Re-armed at expires + 60 k; the next firing after now.
            let k = (now - expires) / DELAY_NANOS + 1;
            (
                Some(expires.saturating_add(k.saturating_mul(DELAY_NANOS))),
                true,
            )
        }
        Control::Released(at) => {
            let at = at.as_nanos();
            if at <= expires {
                return (None, false);
            }
            // The first firing at or after the release.
            let k = (at - expires).div_ceil(DELAY_NANOS);
            let last = expires.saturating_add(k.saturating_mul(DELAY_NANOS));
            ((now < last).then_some(last), true)
        }
        Control::None => (None, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_template_waits_for_its_controlled_connections() {
        let live = Control::Live(1);
        // Controlled at its own expiry (100 s): re-armed to 160, then 220.
        assert_eq!(
            template_expiry(100 * S, 150 * S, live),
            (Some(160 * S), true)
        );
        assert_eq!(
            template_expiry(100 * S, 160 * S, live),
            (Some(220 * S), true)
        );
        // Released at 130 s: the timer fired at 100 and fires at 160.
        let rel = Control::Released(Instant::from_secs(130));
        assert_eq!(
            template_expiry(100 * S, 159 * S, rel),
            (Some(160 * S), true)
        );
        assert_eq!(template_expiry(100 * S, 160 * S, rel), (None, true));
        // Released before its own expiry: it expires on time.
        let early = Control::Released(Instant::from_secs(90));
        assert_eq!(
            template_expiry(100 * S, 99 * S, early),
            (Some(100 * S), false)
        );
        assert_eq!(template_expiry(100 * S, 100 * S, early), (None, false));
        assert_eq!(
            template_expiry(100 * S, 100 * S, Control::None),
            (None, false)
        );
    }

    #[test]
    fn counts_follow_adds_and_releases_and_are_forgotten() {
        let c = Controls::default();
        let flow = Flow::tcp(
            "10.0.0.1:1000".parse().unwrap(),
            "10.96.0.1:80".parse().unwrap(),
        );
        let key = AffinityKey::ClientIp(flow.src.ip());
        let code = code(&key, 5);
        assert_eq!(code, 5);
        let ctl = Controlled { code, timeout: S };
        c.add(7, &flow, ctl, S);
        c.add(7, &flow, ctl, S);
        assert_eq!(c.get(7, &key, 5), Control::Live(2));
        assert_eq!(c.get(7, &key, 6), Control::None);
        assert_eq!(c.get(8, &key, 5), Control::None);
        // Released after the template's timer (2 s): remembered.
        c.sub(7, &flow, code, 2 * S);
        c.sub(7, &flow, code, 3 * S);
        assert_eq!(c.get(7, &key, 5), Control::Released(Instant::from_secs(3)));
        // Released before it: forgotten at once.
        let g = AffinityKey::ClientIp("10.0.0.2".parse().unwrap());
        let gf = Flow::tcp("10.0.0.2:1".parse().unwrap(), flow.dst);
        c.add(
            7,
            &gf,
            Controlled {
                code,
                timeout: 10 * S,
            },
            3 * S,
        );
        assert_eq!(c.get(7, &g, 5), Control::Live(1));
        c.sub(7, &gf, code, 4 * S);
        assert_eq!(c.get(7, &g, 5), Control::None);
        // A stray release never underflows.
        c.sub(7, &flow, code, 3 * S);
        assert_eq!(c.len(), 1);
        // 60 s later an operation on the shard forgets it.
        let other = Flow::tcp(
            "10.0.0.1:1001".parse().unwrap(),
            "10.96.0.1:80".parse().unwrap(),
        );
        for _ in 0..2 {
            c.sub(7, &other, code, 64 * S);
        }
        // (Only the same shard prunes; drive every shard.)
        for f in 0..512u32 {
            c.add(f, &flow, ctl, 64 * S);
            c.sub(f, &flow, code, 64 * S);
        }
        // The release at 3 s is forgotten; the new counts went before
        // their templates' timers.
        assert_eq!(c.get(7, &key, 5), Control::None);
        assert_eq!(c.len(), 0);
        let port = AffinityKey::ClientIpPort(flow.src);
        assert_eq!(super::code(&port, 5), 5 | PORT_KIND);
        assert_eq!(super::code(&AffinityKey::Caller(1), 5), 0);
        assert_eq!(super::code(&key, 0), 0);
    }
}
#[cfg(test)]
mod bound_tests {
    use super::*;
    #[test]
    fn zeroed_counts_are_forgotten_after_60s() {
        let c = Controls::default();
        for i in 0..200_000u32 {
            let now = u64::from(i) * 1_000_000; // 1 ms apart
            let src = std::net::SocketAddr::from((std::net::Ipv4Addr::from(0x0B00_0000 + i), 1000));
            let flow = Flow::tcp(src, "10.96.0.1:80".parse().unwrap());
            let code = (i % 63 + 1) as u8;
            // Connections that outlive their template's timeout (1 ms).
            c.add(
                1,
                &flow,
                Controlled {
                    code,
                    timeout: 1_000_000,
                },
                now,
            );
            c.sub(1, &flow, code, now + 2_000_000);
        }
        let n = c.len();
        assert!((50_000..=61_000).contains(&n), "{n}");
    }
}
