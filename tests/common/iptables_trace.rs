//! A packet tracer over `render::iptables` output, after kube-proxy's
//! `iptablesTracer` (kubernetes `pkg/proxy/iptables/proxier_test.go`,
//! `tracePacket`): the nat table from `PREROUTING` (or `KUBE-SERVICES`
//! when the built-in jumps are not rendered), then, against the DNATed
//! destination, the filter chains `KUBE-SERVICES`, `KUBE-EXTERNAL-SERVICES`,
//! `KUBE-NODEPORTS` and `KUBE-PROXY-FIREWALL`, then nat `KUBE-POSTROUTING`
//! for whether the masquerade mark turns into `MASQUERADE`.
//!
//! As upstream's tracer, a rule with `-m statistic --mode random` is both
//! taken and not taken: the trace collects every endpoint a new connection
//! may reach. A `-m recent --rcheck` rule is both taken and not taken too
//! (upstream's tracer skips it, "checks for past state"; for a new client
//! both reach the same endpoint set, the affinity rule's endpoint being one
//! of the statistic rules' too). Unlike upstream, `-m mark` is evaluated
//! against the mark `MARK` targets set (upstream skips mark checks and
//! sets one `markMasq` flag on `-j KUBE-MARK-MASQ`); the mark is one value
//! for the whole trace, as upstream's flag is one. `-m conntrack
//! --ctstate` matches the state `NEW`. A jump to an undeclared chain
//! panics, as `iptables-restore` refuses it.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

/// What the rules do with a new connection.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Trace {
    /// Every `DNAT --to-destination` reached.
    pub(crate) endpoints: BTreeSet<SocketAddr>,
    /// Every `ACCEPT` / `DROP` / `REJECT` reached.
    pub(crate) verdicts: BTreeSet<String>,
    /// Whether nat `KUBE-POSTROUTING` reaches `MASQUERADE`.
    pub(crate) masquerade: bool,
}

/// The packet: a new connection.
#[derive(Debug, Clone)]
pub(crate) struct Packet {
    pub(crate) src: IpAddr,
    pub(crate) dst: SocketAddr,
    /// `tcp`, `udp`, `sctp`.
    pub(crate) proto: &'static str,
}

/// `table -> chain -> rules (tokens after "-A CHAIN")`.
pub(crate) struct Rules {
    tables: HashMap<String, HashMap<String, Vec<Vec<String>>>>,
}

/// Splits a rule line as a shell would (double quotes only, as rendered).
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quotes in {line:?}");
    if any {
        out.push(cur);
    }
    out
}

/// Whether `ip` is inside `spec` (`a.b.c.d`, `a.b.c.d/n`, IPv6 alike).
pub(crate) fn cidr_contains(spec: &str, ip: IpAddr) -> bool {
    let (addr, len) = match spec.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u32>().expect("prefix length"))),
        None => (spec, None),
    };
    let net: IpAddr = addr
        .parse()
        .unwrap_or_else(|_| panic!("bad address {spec:?}"));
    let (n, i, bits) = match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (u32::from(n) as u128, u32::from(i) as u128, 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
        _ => return false,
    };
    let len = len.unwrap_or(bits);
    assert!(len <= bits, "prefix length in {spec:?}");
    if len == 0 {
        return true;
    }
    let shift = bits - len;
    (n >> shift) == (i >> shift)
}

fn parse_u32(s: &str) -> u32 {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).expect("hex mark"),
        None => s.parse().expect("mark"),
    }
}

/// `ip:port` or `[ip6]:port`.
pub(crate) fn parse_dest(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("DNAT destination {s:?} is not IP:port"))
}

impl Rules {
    /// Parses `iptables-restore` input as `render::iptables` writes it.
    pub(crate) fn parse(text: &str) -> Rules {
        let mut r = Rules {
            tables: HashMap::new(),
        };
        r.apply(text);
        r
    }

    /// Applies `iptables-restore --noflush` input on top: a `:CHAIN` line
    /// creates or flushes the chain, `-X` deletes it, chains the input
    /// does not name stay as they were.
    pub(crate) fn apply(&mut self, text: &str) {
        let tables = &mut self.tables;
        let mut table: Option<String> = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(t) = line.strip_prefix('*') {
                table = Some(t.to_string());
                tables.entry(t.to_string()).or_default();
            } else if line == "COMMIT" {
                table = None;
            } else if let Some(c) = line.strip_prefix(':') {
                let t = table.as_ref().expect("chain outside a table");
                let name = c.split(' ').next().unwrap().to_string();
                tables.get_mut(t).unwrap().insert(name, Vec::new());
            } else if line.starts_with("-A ") {
                let t = table.as_ref().expect("rule outside a table");
                let mut toks = tokens(line);
                let chain = toks[1].clone();
                toks.drain(..2);
                tables
                    .get_mut(t)
                    .unwrap()
                    .entry(chain)
                    .or_default()
                    .push(toks);
            } else if let Some(c) = line.strip_prefix("-X ") {
                let t = table.as_ref().expect("-X outside a table");
                let gone = tables.get_mut(t).unwrap().remove(c.trim());
                assert!(gone.is_some(), "-X of a missing chain {c}");
            } else {
                panic!("unexpected iptables-restore line {line:?}");
            }
        }
    }

    /// The rule lines of `chain` in `table` (tokens after `-A CHAIN`).
    pub(crate) fn chain(&self, table: &str, chain: &str) -> Option<&Vec<Vec<String>>> {
        self.tables.get(table)?.get(chain)
    }

    /// Traces `p` through the rules; `local` are the node's addresses for
    /// `-m addrtype --dst-type LOCAL` (loopback is always local).
    pub(crate) fn trace(&self, p: &Packet, local: &[IpAddr]) -> Trace {
        let mut local: Vec<IpAddr> = local.to_vec();
        local.push("127.0.0.1".parse().unwrap());
        local.push("::1".parse().unwrap());
        let mut t = Tracer {
            rules: self,
            local,
            mark: 0,
            trace: Trace::default(),
            depth: 0,
        };
        let mut pkt = p.clone();
        let entry = if self.chain("nat", "PREROUTING").is_some() {
            "PREROUTING"
        } else {
            "KUBE-SERVICES"
        };
        t.run("nat", entry, &pkt);
        // Later rules match the DNATed destination (upstream: the first
        // output's IP).
        if let Some(first) = t.trace.endpoints.iter().next() {
            pkt.dst = *first;
        }
        for chain in [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
        ] {
            t.run("filter", chain, &pkt);
        }
        t.run("nat", "KUBE-POSTROUTING", &pkt);
        t.trace
    }
}

struct Tracer<'a> {
    rules: &'a Rules,
    local: Vec<IpAddr>,
    mark: u32,
    trace: Trace,
    depth: usize,
}

/// One rule's matches and target, parsed.
struct Rule<'r> {
    matches: bool,
    /// `-m statistic --mode random` or `-m recent --rcheck`: both branches.
    branches: bool,
    target: Option<&'r str>,
    goto: bool,
    opts: Vec<(&'r str, &'r str)>,
}

impl Tracer<'_> {
    fn is_local(&self, ip: IpAddr) -> bool {
        self.local.contains(&ip)
    }

    fn parse<'r>(&self, toks: &'r [String], p: &Packet) -> Rule<'r> {
        let mut r = Rule {
            matches: true,
            branches: false,
            target: None,
            goto: false,
            opts: Vec::new(),
        };
        let mut neg = false;
        let mut i = 0;
        let arg = |i: usize| -> &'r str {
            toks.get(i + 1)
                .unwrap_or_else(|| panic!("{} needs a value in {toks:?}", toks[i]))
                .as_str()
        };
        while i < toks.len() {
            let tok = toks[i].as_str();
            if r.target.is_some() {
                // target options
                match tok {
                    "--to-destination" | "--or-mark" | "--xor-mark" | "--set-xmark"
                    | "--reject-with" => {
                        r.opts.push((tok, arg(i)));
                        i += 2;
                    }
                    "--random-fully" | "--random" | "--persistent" => i += 1,
                    _ => panic!("unknown target option {tok:?} in {toks:?}"),
                }
                continue;
            }
            let mut cond: Option<bool> = None;
            let mut step = 2;
            match tok {
                "!" => {
                    neg = true;
                    i += 1;
                    continue;
                }
                "-m" => {
                    // the module's options follow; the module itself does not match
                }
                "--comment" | "--nfacct-name" | "--name" | "--seconds" | "--mode" => {}
                "--reap" | "--set" | "--rsource" => step = 1,
                "--rcheck" => {
                    r.branches = true;
                    step = 1;
                }
                "--probability" => r.branches = true,
                "-p" => cond = Some(arg(i) == p.proto),
                "-s" => cond = Some(cidr_contains(arg(i), p.src)),
                "-d" => cond = Some(cidr_contains(arg(i), p.dst.ip())),
                "--dport" => cond = Some(port_matches(arg(i), p.dst.port())),
                "--dst-type" => {
                    assert_eq!(arg(i), "LOCAL", "addrtype in {toks:?}");
                    cond = Some(self.is_local(p.dst.ip()));
                }
                "--src-type" => {
                    assert_eq!(arg(i), "LOCAL", "addrtype in {toks:?}");
                    cond = Some(self.is_local(p.src));
                }
                "--mark" => {
                    let (v, m) = arg(i).split_once('/').unwrap_or((arg(i), "0xffffffff"));
                    cond = Some(self.mark & parse_u32(m) == parse_u32(v));
                }
                "--ctstate" => cond = Some(arg(i).split(',').any(|s| s == "NEW")),
                "-j" | "-g" => {
                    r.target = Some(arg(i));
                    r.goto = tok == "-g";
                }
                _ => panic!("unknown iptables match {tok:?} in {toks:?}"),
            }
            if let Some(c) = cond {
                if c == neg {
                    r.matches = false;
                }
            }
            neg = false;
            i += step;
        }
        r
    }

    /// Runs `chain`; true if the packet's fate was decided (DNAT, ACCEPT,
    /// DROP, REJECT, MASQUERADE).
    fn run(&mut self, table: &str, chain: &str, p: &Packet) -> bool {
        let Some(rules) = self.rules.chain(table, chain) else {
            return false;
        };
        self.depth += 1;
        assert!(self.depth < 64, "jump loop at {table} {chain}");
        let mut decided = false;
        for toks in rules {
            let r = self.parse(toks, p);
            if !r.matches {
                continue;
            }
            let opt = |name: &str| r.opts.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
            match r.target {
                None => {}
                Some("RETURN") => break,
                Some("MARK") => {
                    if let Some(v) = opt("--or-mark") {
                        self.mark |= parse_u32(v);
                    } else if let Some(v) = opt("--xor-mark") {
                        self.mark ^= parse_u32(v);
                    } else if let Some(v) = opt("--set-xmark") {
                        let (v, m) = v.split_once('/').unwrap_or((v, "0xffffffff"));
                        self.mark = (self.mark & !parse_u32(m)) ^ parse_u32(v);
                    } else {
                        panic!("MARK without a mark in {toks:?}");
                    }
                }
                Some("DNAT") => {
                    let d = opt("--to-destination").expect("DNAT --to-destination");
                    self.trace.endpoints.insert(parse_dest(d));
                    decided = true;
                    break;
                }
                Some("MASQUERADE") => {
                    self.trace.masquerade = true;
                    decided = true;
                    break;
                }
                Some(v @ ("ACCEPT" | "DROP" | "REJECT")) => {
                    self.trace.verdicts.insert(v.to_string());
                    decided = true;
                    break;
                }
                Some(sub) => {
                    // iptables-restore refuses a jump to an undeclared chain.
                    assert!(
                        self.rules.chain(table, sub).is_some(),
                        "{table} {chain}: jump to undeclared chain {sub}: {toks:?}"
                    );
                    let d = self.run(table, sub, p);
                    if r.branches {
                        // the branch not taken goes on
                        continue;
                    }
                    if d || r.goto {
                        decided = d;
                        break;
                    }
                }
            }
        }
        self.depth -= 1;
        decided
    }
}

fn port_matches(spec: &str, port: u16) -> bool {
    match spec.split_once(':') {
        Some((a, b)) => (a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap()).contains(&port),
        None => spec.parse::<u16>().expect("port") == port,
    }
}
