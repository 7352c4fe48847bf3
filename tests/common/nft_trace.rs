//! A packet tracer over `render::nft` output, after kube-proxy's
//! `nftablesTracer` (kubernetes `pkg/proxy/nftables/helpers_test.go`,
//! `tracePacket`): `filter-prerouting-pre-dnat` (a verdict there ends the
//! trace), `nat-prerouting`, then, against the DNATed destination,
//! `filter-forward` (a verdict ends the trace) and `filter-input`, and
//! last `nat-postrouting` for whether the masquerade mark turns into
//! `masquerade`.
//!
//! As upstream's tracer, `numgen random mod N vmap { … }` runs every
//! element and an affinity check (`ip saddr @affinity-… goto …`) is both
//! taken and not taken: the trace collects every endpoint a new
//! connection may reach. The mark is one value for the whole trace.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use super::iptables_trace::{Packet, Trace, cidr_contains, parse_dest};

/// A verdict: `jump X`, `goto X`, `drop`, `reject`, `accept`, `return`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Jump(String),
    Goto(String),
    Drop,
    Reject,
    Accept,
    Return,
}

/// The table: chains (rules as tokens), sets (element keys) and verdict
/// maps (key -> verdict). Keys are the element text, `a . tcp . 80`.
pub(crate) struct Table {
    chains: HashMap<String, Vec<Vec<String>>>,
    sets: HashMap<String, BTreeSet<String>>,
    maps: HashMap<String, HashMap<String, Verdict>>,
}

/// Splits on spaces, keeping double-quoted strings whole; `,` between
/// set items is a token of its own.
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            ',' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(",".into());
            }
            c => cur.push(c),
        }
    }
    assert!(!quoted, "unbalanced quotes in {line:?}");
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The tokens inside `{ … }` starting at `toks[i] == "{"`, and the index
/// after the closing brace.
fn braced(toks: &[String], i: usize) -> (&[String], usize) {
    assert_eq!(toks[i], "{", "expected {{ in {toks:?}");
    let end = toks[i..]
        .iter()
        .position(|t| t == "}")
        .unwrap_or_else(|| panic!("no }} in {toks:?}"))
        + i;
    (&toks[i + 1..end], end + 1)
}

/// Splits a brace body on `,` tokens.
fn items(body: &[String]) -> Vec<&[String]> {
    body.split(|t| t == ",").filter(|s| !s.is_empty()).collect()
}

/// A verdict at `toks[i..]`, and how many tokens it takes.
fn verdict(toks: &[String], i: usize) -> Option<(Verdict, usize)> {
    Some(match toks.get(i)?.as_str() {
        "jump" => (Verdict::Jump(toks[i + 1].clone()), 2),
        "goto" => (Verdict::Goto(toks[i + 1].clone()), 2),
        "drop" => (Verdict::Drop, 1),
        "reject" => (Verdict::Reject, 1),
        "accept" => (Verdict::Accept, 1),
        "return" => (Verdict::Return, 1),
        _ => return None,
    })
}

/// An element body: the key tokens (up to `comment` or `:`), and the
/// verdict after `:` if any.
fn element(item: &[String]) -> (String, Option<Verdict>) {
    let mut key = Vec::new();
    let mut i = 0;
    while i < item.len() {
        match item[i].as_str() {
            "comment" => i += 2,
            ":" => {
                let (v, _) = verdict(item, i + 1).unwrap_or_else(|| panic!("verdict in {item:?}"));
                return (key.join(" "), Some(v));
            }
            t => {
                key.push(t.to_string());
                i += 1;
            }
        }
    }
    (key.join(" "), None)
}

impl Table {
    /// Parses `nft -f` input as `render::nft` writes it (one table).
    pub(crate) fn parse(text: &str) -> Table {
        let mut t = Table {
            chains: HashMap::new(),
            sets: HashMap::new(),
            maps: HashMap::new(),
        };
        t.apply(text);
        t
    }

    /// Applies further `nft -f` input (a partial sync) on top.
    pub(crate) fn apply(&mut self, text: &str) {
        let t = self;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let toks = tokens(line);
            // `VERB KIND FAMILY TABLE NAME …`
            let (verb, kind) = (toks[0].as_str(), toks[1].as_str());
            if kind == "table" {
                continue;
            }
            let name = toks[4].clone();
            match (verb, kind) {
                ("add", "chain") => {
                    t.chains.entry(name).or_default();
                }
                ("add", "set") => {
                    t.sets.entry(name).or_default();
                }
                ("add", "map") => {
                    t.maps.entry(name).or_default();
                }
                ("add", "rule") => t.chains.entry(name).or_default().push(toks[5..].to_vec()),
                ("add", "element") | ("delete", "element") => {
                    let (body, _) = braced(&toks, 5);
                    for item in items(body) {
                        let (key, v) = element(item);
                        if verb == "delete" {
                            // nft -f refuses to delete a missing element.
                            let gone = match t.sets.get_mut(&name) {
                                Some(s) => s.remove(&key),
                                None => t
                                    .maps
                                    .get_mut(&name)
                                    .is_some_and(|m| m.remove(&key).is_some()),
                            };
                            assert!(gone, "delete of a missing element {key} of {name}");
                        } else if let Some(v) = v {
                            t.maps
                                .get_mut(&name)
                                .unwrap_or_else(|| panic!("no map {name}"))
                                .insert(key, v);
                        } else {
                            t.sets
                                .get_mut(&name)
                                .unwrap_or_else(|| panic!("no set {name}"))
                                .insert(key);
                        }
                    }
                }
                ("flush", "chain") => {
                    t.chains.entry(name).or_default().clear();
                }
                ("flush", "set") => {
                    t.sets.entry(name).or_default().clear();
                }
                ("flush", "map") => {
                    t.maps.entry(name).or_default().clear();
                }
                ("delete", "chain") => {
                    let gone = t.chains.remove(&name);
                    assert!(
                        gone.is_some_and(|r| r.is_empty()),
                        "delete of a missing or non-empty chain {name}"
                    );
                }
                ("delete", "set") => {
                    assert!(
                        t.sets.remove(&name).is_some(),
                        "delete of a missing set {name}"
                    );
                }
                _ => panic!("unexpected nft line {line:?}"),
            }
        }
    }

    /// The rules of `chain`, as tokens after `add rule FAMILY TABLE CHAIN`.
    pub(crate) fn chain(&self, chain: &str) -> Option<&Vec<Vec<String>>> {
        self.chains.get(chain)
    }

    /// Traces `p`; `local` are the node's addresses for `fib … type
    /// local` (loopback is always local).
    pub(crate) fn trace(&self, p: &Packet, local: &[IpAddr]) -> Trace {
        let mut local: Vec<IpAddr> = local.to_vec();
        local.push("127.0.0.1".parse().unwrap());
        local.push("::1".parse().unwrap());
        let mut t = Tracer {
            table: self,
            local,
            mark: 0,
            trace: Trace::default(),
            depth: 0,
        };
        let mut pkt = p.clone();
        if t.run("filter-prerouting-pre-dnat", &pkt) {
            return t.trace;
        }
        t.run("nat-prerouting", &pkt);
        if let Some(first) = t.trace.endpoints.iter().next() {
            pkt.dst = *first;
        }
        if !t.run("filter-forward", &pkt) {
            t.run("filter-input", &pkt);
        }
        t.run("nat-postrouting", &pkt);
        t.trace
    }
}

struct Tracer<'a> {
    table: &'a Table,
    local: Vec<IpAddr>,
    mark: u32,
    trace: Trace,
    depth: usize,
}

fn parse_u32(s: &str) -> u32 {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).expect("hex"),
        None => s.parse().expect("number"),
    }
}

/// What one rule does.
enum Step {
    /// A condition failed (or a vmap had no element): next rule.
    NoMatch,
    /// The rule ran to its end without a verdict.
    Continue,
    /// A verdict, and whether the rule is a both-branches check (an
    /// affinity set lookup) whose not-taken branch goes on.
    Verdict(Verdict, bool),
    /// `numgen random … vmap { … }`: every element is a branch.
    Branches(Vec<Verdict>),
    /// `dnat to` / `masquerade`: the packet's fate is decided.
    Decided,
}

impl Tracer<'_> {
    fn addr_field(&self, field: &str, p: &Packet) -> IpAddr {
        match field {
            "saddr" => p.src,
            "daddr" => p.dst.ip(),
            f => panic!("address field {f}"),
        }
    }

    /// Whether `value` (an address, a prefix, `@set` or `{ … }` at
    /// `toks[i]`) holds `ip`; and the index after it.
    fn holds(&self, toks: &[String], i: usize, ip: IpAddr) -> (bool, usize) {
        let tok = toks[i].as_str();
        if let Some(set) = tok.strip_prefix('@') {
            let s = self
                .table
                .sets
                .get(set)
                .unwrap_or_else(|| panic!("rule uses a missing set {set}: {toks:?}"));
            if set.starts_with("affinity-") {
                // A recent-connection set: both branches (see Step::Verdict).
                return (true, i + 1);
            }
            (s.iter().any(|e| cidr_contains(e, ip)), i + 1)
        } else if tok == "{" {
            let (body, next) = braced(toks, i);
            let any = items(body)
                .iter()
                .any(|it| cidr_contains(&it.join(" "), ip));
            (any, next)
        } else {
            (cidr_contains(tok, ip), i + 1)
        }
    }

    fn step(&mut self, toks: &[String], p: &Packet) -> Step {
        let mut i = 0;
        let mut affinity = false;
        while i < toks.len() {
            let tok = toks[i].as_str();
            match tok {
                "ip" | "ip6" => {
                    let field = toks[i + 1].as_str();
                    if toks.get(i + 2).map(String::as_str) == Some(".") {
                        // `ip daddr . meta l4proto . th dport vmap @map`
                        assert_eq!(
                            toks[i + 2..i + 9].join(" "),
                            ". meta l4proto . th dport vmap",
                            "{toks:?}"
                        );
                        let key = format!(
                            "{} . {} . {}",
                            self.addr_field(field, p),
                            p.proto,
                            p.dst.port()
                        );
                        return self.vmap(&toks[i + 9], &key);
                    }
                    let ip = self.addr_field(field, p);
                    let (neg, at) = if toks[i + 2] == "!=" {
                        (true, i + 3)
                    } else {
                        (false, i + 2)
                    };
                    if toks[at].starts_with("@affinity-") {
                        affinity = true;
                    }
                    let (hit, next) = self.holds(toks, at, ip);
                    if hit == neg {
                        return Step::NoMatch;
                    }
                    i = next;
                }
                "meta" => {
                    assert_eq!(toks[i + 1], "l4proto", "{toks:?}");
                    if toks.get(i + 2).map(String::as_str) == Some(".") {
                        // `meta l4proto . th dport vmap @map`
                        assert_eq!(toks[i + 2..i + 6].join(" "), ". th dport vmap", "{toks:?}");
                        let key = format!("{} . {}", p.proto, p.dst.port());
                        return self.vmap(&toks[i + 6], &key);
                    }
                    if toks[i + 2] != p.proto {
                        return Step::NoMatch;
                    }
                    i += 3;
                }
                "th" | "tcp" | "udp" | "sctp" => {
                    assert_eq!(toks[i + 1], "dport", "{toks:?}");
                    if tok != "th" && tok != p.proto {
                        return Step::NoMatch;
                    }
                    if toks[i + 2].parse::<u16>().expect("port") != p.dst.port() {
                        return Step::NoMatch;
                    }
                    i += 3;
                }
                "fib" => {
                    // `fib daddr|saddr type local`
                    assert_eq!(toks[i + 2..i + 4].join(" "), "type local", "{toks:?}");
                    let ip = self.addr_field(&toks[i + 1], p);
                    if !self.local.contains(&ip) {
                        return Step::NoMatch;
                    }
                    i += 4;
                }
                "ct" => {
                    // `ct state new`: the trace is a new connection
                    assert_eq!(toks[i + 1], "state", "{toks:?}");
                    if !toks[i + 2].split(',').any(|s| s == "new") {
                        return Step::NoMatch;
                    }
                    i += 3;
                }
                "mark" => {
                    if toks[i + 1] == "set" {
                        // `mark set mark or|xor V`
                        assert_eq!(toks[i + 2], "mark", "{toks:?}");
                        let v = parse_u32(&toks[i + 4]);
                        match toks[i + 3].as_str() {
                            "or" => self.mark |= v,
                            "xor" => self.mark ^= v,
                            o => panic!("mark op {o} in {toks:?}"),
                        }
                        i += 5;
                    } else {
                        // `mark and M == V` / `!= V`
                        assert_eq!(toks[i + 1], "and", "{toks:?}");
                        let m = parse_u32(&toks[i + 2]);
                        let v = parse_u32(&toks[i + 4]);
                        let eq = self.mark & m == v;
                        let hit = match toks[i + 3].as_str() {
                            "==" => eq,
                            "!=" => !eq,
                            o => panic!("mark comparison {o} in {toks:?}"),
                        };
                        if !hit {
                            return Step::NoMatch;
                        }
                        i += 5;
                    }
                }
                "numgen" => {
                    // `numgen random mod N vmap { i : goto X , … }`
                    assert_eq!(toks[i + 1..i + 3].join(" "), "random mod", "{toks:?}");
                    let n: usize = toks[i + 3].parse().expect("mod");
                    assert_eq!(toks[i + 4], "vmap", "{toks:?}");
                    let (body, _) = braced(toks, i + 5);
                    let els = items(body);
                    assert_eq!(els.len(), n, "numgen mod {n} with {} elements", els.len());
                    let vs = els
                        .iter()
                        .map(|it| element(it).1.expect("numgen element verdict"))
                        .collect();
                    return Step::Branches(vs);
                }
                "update" => {
                    // `update @affinity-… { ip saddr }`: no match
                    let (_, next) = braced(toks, i + 2);
                    i = next;
                }
                "dnat" => {
                    assert_eq!(toks[i + 1], "to", "{toks:?}");
                    self.trace.endpoints.insert(parse_dest(&toks[i + 2]));
                    return Step::Decided;
                }
                "masquerade" => {
                    self.trace.masquerade = true;
                    return Step::Decided;
                }
                "comment" => i += 2,
                "counter" | "fully-random" => i += 1,
                _ => match verdict(toks, i) {
                    Some((v, _)) => return Step::Verdict(v, affinity),
                    None => panic!("unknown nft expression {tok:?} in {toks:?}"),
                },
            }
        }
        Step::Continue
    }

    fn vmap(&self, map: &str, key: &str) -> Step {
        let name = map.strip_prefix('@').expect("vmap @map");
        let m = self
            .table
            .maps
            .get(name)
            .unwrap_or_else(|| panic!("rule uses a missing map {name}"));
        match m.get(key) {
            Some(v) => Step::Verdict(v.clone(), false),
            None => Step::NoMatch,
        }
    }

    /// Applies a verdict; `Some(decided)` when the chain stops here.
    fn apply(&mut self, v: &Verdict, p: &Packet) -> Option<bool> {
        if let Verdict::Jump(c) | Verdict::Goto(c) = v {
            // nft -f refuses a jump to a missing chain.
            assert!(self.table.chain(c).is_some(), "jump to a missing chain {c}");
        }
        match v {
            Verdict::Jump(c) => {
                let d = self.run(c, p);
                d.then_some(true)
            }
            Verdict::Goto(c) => Some(self.run(c, p)),
            Verdict::Return => Some(false),
            Verdict::Drop | Verdict::Reject | Verdict::Accept => {
                let s = match v {
                    Verdict::Drop => "DROP",
                    Verdict::Reject => "REJECT",
                    _ => "ACCEPT",
                };
                self.trace.verdicts.insert(s.into());
                Some(true)
            }
        }
    }

    /// Runs `chain`; true if the packet's fate was decided.
    fn run(&mut self, chain: &str, p: &Packet) -> bool {
        let Some(rules) = self.table.chain(chain) else {
            return false;
        };
        self.depth += 1;
        assert!(self.depth < 64, "jump loop at {chain}");
        let mut decided = false;
        for toks in rules {
            match self.step(toks, p) {
                Step::NoMatch | Step::Continue => {}
                Step::Decided => {
                    decided = true;
                    break;
                }
                Step::Verdict(v, both) => {
                    let stop = self.apply(&v, p);
                    if both {
                        continue;
                    }
                    if let Some(d) = stop {
                        decided = d;
                        break;
                    }
                }
                Step::Branches(vs) => {
                    let mut any = false;
                    for v in &vs {
                        any |= self.apply(v, p).unwrap_or(false);
                    }
                    decided = any;
                    break;
                }
            }
        }
        self.depth -= 1;
        decided
    }
}
