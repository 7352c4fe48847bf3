//! Runs the `svclb` example binary on the bundled manifests.
//!
//! `cargo test` builds the examples next to the test binaries
//! (`target/<profile>/examples/`); the test still runs `cargo build
//! --example svclb` once (a no-op then) so that a filtered
//! `cargo test --test cli` never runs a stale binary.
#![cfg(feature = "serde")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/cli-<hash> -> target/<profile>/examples/svclb
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let bin = profile_dir
            .join("examples")
            .join(format!("svclb{}", std::env::consts::EXE_SUFFIX));
        // Always ask cargo: a no-op when `cargo test` just built the
        // examples, and a rebuild when a filtered run left a stale binary.
        // Same features and profile as this test, so nothing else rebuilds.
        let mut features = String::from("serde");
        if cfg!(feature = "k8s-openapi") {
            features.push_str(",k8s-openapi");
        }
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "--quiet",
            "--example",
            "svclb",
            "--features",
            &features,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the svclb example failed");
        assert!(bin.exists(), "{} not found", bin.display());
        bin
    })
}

fn svclb(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run svclb")
}

fn ok(args: &[&str]) -> String {
    let out = svclb(args);
    assert!(
        out.status.success(),
        "svclb {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn err(args: &[&str]) -> String {
    let out = svclb(args);
    assert_eq!(out.status.code(), Some(1), "svclb {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

const M: [&str; 2] = ["--manifests", "examples/manifests"];

fn with<'a>(pre: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    pre.iter().chain(M.iter()).chain(rest).copied().collect()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("svclb-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn demo_shows_listing_trace_dns_and_cost() {
    let out = ok(&with(&[], &["demo", "--max-services", "100"]));
    assert!(
        out.contains("TCP  10.96.40.12:8000 rr persistent 3600\n"),
        "{out}"
    );
    assert!(
        out.contains("kafka-0.kafka-headless.messaging.svc.cluster.local. 5 IN A 10.244.1.8\n")
    );
    assert!(out.contains("10.244.9.41:44001 -> 10.244.1.8:9092 NO-SERVICE\n"));
    assert!(out.contains("10.244.9.11:40004 -> 10.96.0.10:80 REJECT\n"));
    assert!(out.contains("iptables ns"));
    // ClientIP affinity: 10.244.9.21's three calls land on one backend.
    let backends: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" 10.244.9.21:"))
        .map(|l| l.rsplit_once(' ').unwrap().1)
        .collect();
    assert_eq!(backends.len(), 3, "{out}");
    assert!(backends.iter().all(|b| *b == backends[0]), "{backends:?}");
}

/// `route` appends ` masquerade` where kube-proxy would SNAT the forward:
/// with `--cluster-cidr`, cluster-IP traffic from outside the pod network;
/// pod traffic is not. The histogram keeps the token per backend line.
#[test]
fn route_prints_the_masquerade_decision() {
    let pre = [
        "--mode",
        "ipvs",
        "--scheduler",
        "rr",
        "--cluster-cidr",
        "10.244.0.0/16",
    ];
    let outside = ok(&with(
        &pre,
        &["route", "--src", "10.0.0.1", "--dst", "10.96.0.10:80"],
    ));
    assert!(
        outside.starts_with("FORWARD 10.244.") && outside.ends_with(":8080 masquerade\n"),
        "{outside}"
    );
    let pod = ok(&with(
        &pre,
        &["route", "--src", "10.244.7.7", "--dst", "10.96.0.10:80"],
    ));
    assert!(
        pod.starts_with("FORWARD 10.244.") && pod.ends_with(":8080\n"),
        "{pod}"
    );
    let hist = ok(&with(
        &pre,
        &[
            "route",
            "--src",
            "10.0.0.1",
            "--dst",
            "10.96.0.10:80",
            "--count",
            "300",
        ],
    ));
    assert_eq!(
        hist,
        "10.244.1.5:8080 100 masquerade\n10.244.2.7:8080 100 masquerade\n10.244.3.9:8080 100 masquerade\n"
    );
    // Without --cluster-cidr (no local-traffic detector), no token.
    let plain = ok(&with(
        &["--mode", "ipvs"],
        &["route", "--src", "10.0.0.1", "--dst", "10.96.0.10:80"],
    ));
    assert!(!plain.contains("masquerade"), "{plain}");
}

#[test]
fn route_prints_verdicts_and_histograms() {
    let rr = ["--mode", "ipvs", "--scheduler", "rr"];
    let one = ok(&with(
        &rr,
        &["route", "--src", "10.0.0.1", "--dst", "10.96.0.10:80"],
    ));
    assert!(
        ["10.244.1.5:8080", "10.244.2.7:8080", "10.244.3.9:8080"]
            .iter()
            .any(|b| one == format!("FORWARD {b}\n")),
        "{one}"
    );
    let hist = ok(&with(
        &rr,
        &[
            "route",
            "--src",
            "10.0.0.1",
            "--dst",
            "10.96.0.10:80",
            "--count",
            "300",
        ],
    ));
    assert_eq!(
        hist,
        "10.244.1.5:8080 100\n10.244.2.7:8080 100\n10.244.3.9:8080 100\n"
    );
    let headless = ok(&with(
        &[],
        &["route", "--src", "10.0.0.1", "--dst", "10.244.1.8:9092"],
    ));
    assert_eq!(headless, "NO-SERVICE\n");
    let drop = ok(&with(
        &["--node", "node-c", "--zone", "zone-b"],
        &[
            "route",
            "--src",
            "10.0.0.1:5000",
            "--dst",
            "10.96.50.5:9100",
            "--proto",
            "tcp",
        ],
    ));
    assert_eq!(drop, "DROP\n");
    // Same seed, same run.
    let seeded = with(
        &["--seed", "9"],
        &[
            "route",
            "--src",
            "10.0.0.1",
            "--dst",
            "10.96.0.10:80",
            "--count",
            "50",
        ],
    );
    let (a, b) = (ok(&seeded), ok(&seeded));
    assert_eq!(a, b);
    let total: u64 = a
        .lines()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 50);
    // nftables mode: the same backends, picked uniformly by numgen.
    let nft = ok(&with(
        &["--mode", "nftables", "--seed", "3"],
        &[
            "route",
            "--src",
            "10.0.0.1",
            "--dst",
            "10.96.0.10:80",
            "--count",
            "3000",
        ],
    ));
    let counts: Vec<(String, u64)> = nft
        .lines()
        .map(|l| {
            let (b, c) = l.rsplit_once(' ').unwrap();
            (b.to_owned(), c.parse().unwrap())
        })
        .collect();
    assert_eq!(
        counts.iter().map(|(b, _)| b.as_str()).collect::<Vec<_>>(),
        ["10.244.1.5:8080", "10.244.2.7:8080", "10.244.3.9:8080"],
        "{nft}"
    );
    // Each within 10% of the fair 1000 (about 5 standard deviations).
    assert!(
        counts.iter().all(|(_, c)| (900..=1100).contains(c)),
        "{nft}"
    );
}

#[test]
fn replay_follows_applies_and_deletes() {
    let out = ok(&with(
        &["--mode", "ipvs"],
        &["replay", "examples/traces/web.trace"],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 10, "{out}");
    assert!(lines[0].starts_with("0.000 10.244.9.11:40001 -> 10.96.0.10:80 FORWARD 10.244."));
    // ClientIP affinity (3600 s) keeps 10.244.9.21 on one inference backend.
    let inference: Vec<&str> = lines[3..6]
        .iter()
        .map(|l| l.rsplit_once(' ').unwrap().1)
        .collect();
    assert!(
        inference.iter().all(|b| *b == inference[0]),
        "{inference:?}"
    );
    // After the rollout, the terminating 10.244.1.5 takes no new connection.
    for l in &lines[6..9] {
        assert!(l.contains("FORWARD") && !l.contains("10.244.1.5:"), "{l}");
    }
    assert_eq!(
        lines[9],
        "9.500 10.244.9.17:40007 -> 10.96.0.10:80 NO-SERVICE"
    );
}

#[test]
fn resolve_and_dump() {
    let srv = ok(&with(
        &[],
        &[
            "resolve",
            "_kafka._tcp.kafka-headless.messaging.svc.cluster.local",
            "--type",
            "SRV",
        ],
    ));
    assert_eq!(srv.lines().count(), 3);
    assert!(
        srv.contains(" IN SRV 0 33 9092 kafka-1.kafka-headless.messaging.svc.cluster.local.\n")
    );
    assert_eq!(
        ok(&with(
            &[],
            &[
                "resolve",
                "kafka-9.kafka-headless.messaging.svc.cluster.local"
            ]
        )),
        "NXDOMAIN\n"
    );
    assert_eq!(
        ok(&with(
            &[],
            &[
                "resolve",
                "web.default.svc.example.org",
                "--cluster-domain",
                "example.org"
            ]
        )),
        "web.default.svc.example.org. 5 IN A 10.96.0.10\n"
    );
    let ipt = ok(&with(&[], &["dump", "--format", "iptables"]));
    assert!(ipt.contains("*nat\n") && ipt.ends_with("COMMIT\n"), "{ipt}");
    assert!(ipt.contains("-j KUBE-SVC-"));
    let nft = ok(&with(&[], &["dump", "--format", "nft"]));
    assert!(nft.contains("table ip kube-proxy"), "{nft}");
    let ipvs = ok(&with(&[], &["dump", "--format", "ipvsadm"]));
    assert!(ipvs.contains("TCP  10.96.0.10:80 rr\n"), "{ipvs}");
}

#[test]
fn bad_input_exits_non_zero_naming_where_and_what() {
    let bad = temp_file(
        "bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  clusterIP: 10.96.7.7\n  ports: [{port: 80, protocol: ICMP}]\n",
    );
    let bad_s = bad.to_str().unwrap();
    let msg = err(&[
        "--manifests",
        "examples/manifests",
        bad_s,
        "dump",
        "--format",
        "iptables",
    ]);
    assert!(
        msg.contains(&format!(
            "{bad_s}: document 1: Service shop/api: spec.ports[0].protocol: invalid value \"ICMP\""
        )),
        "{msg}"
    );
    let trace = temp_file(
        "bad.trace",
        "0 connect tcp 10.0.0.1:1 10.96.0.10:80\n1 connect tcp 10.0.0.1 10.96.0.10:80\n",
    );
    let trace_s = trace.to_str().unwrap();
    let msg = err(&with(&[], &["replay", trace_s]));
    assert!(
        msg.contains(&format!(
            "{trace_s}: line 2: source: invalid value \"10.0.0.1\""
        )),
        "{msg}"
    );
    let msg = err(&with(&["--scheduler", "fastest"], &["demo"]));
    assert!(
        msg.contains("--scheduler") && msg.contains("fastest"),
        "{msg}"
    );
    let _ = std::fs::remove_file(&bad);
    let _ = std::fs::remove_file(&trace);
}

// ---- input as it really arrives (issue 11) ---------------------------------

#[test]
fn slices_before_services_work() {
    let out = ok(&[
        "--manifests",
        "tests/fixtures/order/slices.yaml",
        "tests/fixtures/order/services.yaml",
        "route",
        "--src",
        "10.0.0.1",
        "--dst",
        "10.96.7.10:80",
        "--count",
        "10",
    ]);
    assert_eq!(out, "10.244.1.20:8080 4\n10.244.2.20:8080 6\n");
}

/// `--watch -` from a pipe that delivers the stream in small writes reads
/// to end of file: the last events (the ERROR, the delete of an absent
/// slice) are applied or noted, and the command runs once, after them.
#[test]
fn watch_from_a_pipe_reads_to_end_of_file() {
    use std::io::Write as _;
    let events = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/watch/events.json"),
    )
    .unwrap();
    let mut child = Command::new(binary())
        .args([
            "--mode",
            "ipvs",
            "--manifests",
            "tests/fixtures/order/services.yaml",
            "--watch",
            "-",
            "route",
            "--src",
            "10.0.0.1",
            "--dst",
            "10.96.7.10:80",
            "--count",
            "4",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        // 13-byte writes, each flushed: every read sees part of an event.
        for chunk in events.chunks(13) {
            stdin.write_all(chunk).unwrap();
            stdin.flush().unwrap();
        }
        // Dropping the pipe's end is the end of file.
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "10.244.1.20:8080 2\n10.244.1.21:8080 2\n"
    );
    assert!(stderr.contains("410 Expired"), "{stderr}");
    assert!(
        stderr.contains("EndpointSlice shop/web-old12: delete of an object not present"),
        "{stderr}"
    );
}

#[test]
fn watch_from_stdin_after_manifests() {
    let events = std::fs::File::open(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/watch/events.yaml"),
    )
    .unwrap();
    let out = Command::new(binary())
        .args([
            "--mode",
            "ipvs",
            "--manifests",
            "tests/fixtures/order/services.yaml",
            "--watch",
            "-",
            "route",
            "--src",
            "10.0.0.1",
            "--dst",
            "10.96.7.10:80",
            "--count",
            "4",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(events)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "10.244.1.20:8080 2\n10.244.1.21:8080 2\n"
    );
    assert!(
        stderr.contains("resourceVersion 109 is older than 110"),
        "{stderr}"
    );
    assert!(
        stderr.contains("watch ERROR event: 410 Expired"),
        "{stderr}"
    );
    // The watch deleted shop/cart, which the manifests had.
    let cart = ok(&[
        "--manifests",
        "tests/fixtures/order/services.yaml",
        "--watch",
        "tests/fixtures/watch/events.json",
        "route",
        "--src",
        "10.0.0.1",
        "--dst",
        "10.96.7.11:8080",
    ]);
    assert_eq!(cart, "NO-SERVICE\n");
}

#[test]
fn manifests_as_applied_with_service_cidr_and_summaries() {
    let out = svclb(&[
        "--manifests",
        "tests/fixtures/applied",
        "--service-cidr",
        "10.100.0.0/16",
        "dump",
        "--format",
        "nft",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("assigned 10.100."), "{stderr}");
    assert!(
        stderr.contains("skipped 2 Deployment objects: not a Service"),
        "{stderr}"
    );
    // The dual-stack service has no IPv6 range here: left out, with a note.
    assert!(!stderr.contains("fd00"), "{stderr}");
    let verbose = svclb(&[
        "--manifests",
        "tests/fixtures/applied",
        "--verbose",
        "dump",
        "--format",
        "nft",
    ]);
    let stderr = String::from_utf8_lossy(&verbose.stderr);
    assert!(
        stderr.contains("Deployment default/nginx-deployment: skipped"),
        "{stderr}"
    );
}

#[test]
fn dump_family_notes_what_it_leaves_out() {
    let out = svclb(&[
        "--manifests",
        "tests/fixtures/applied",
        "dump",
        "--format",
        "iptables",
        "--family",
        "ipv6",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("services have no ipv6 cluster IP and are left out"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("fd00:10:96::dfee"), "{stdout}");
    let both = ok(&[
        "--manifests",
        "tests/fixtures/applied",
        "dump",
        "--format",
        "nft",
        "--family",
        "both",
    ]);
    assert!(both.contains("table ip kube-proxy") && both.contains("table ip6 kube-proxy"));
    err(&[
        "--manifests",
        "tests/fixtures/applied",
        "dump",
        "--format",
        "iptables",
        "--family",
        "both",
    ]);
}

#[test]
fn hostile_input_fails_fast_with_a_named_limit() {
    let start = std::time::Instant::now();
    let e = err(&["--manifests", "/dev/zero", "dump", "--format", "nft"]);
    assert!(
        e.contains("/dev/zero: not YAML or JSON text: a NUL byte"),
        "{e}"
    );
    let deep = temp_file("deep.json", &"[".repeat(200_000));
    let e = err(&[
        "--manifests",
        deep.to_str().unwrap(),
        "dump",
        "--format",
        "nft",
    ]);
    assert!(e.contains("max-depth limit of 100"), "{e}");
    let big = temp_file("big.yaml", &"# comment\n".repeat(1000));
    let e = err(&[
        "--max-input-bytes",
        "1000",
        "--manifests",
        big.to_str().unwrap(),
        "dump",
        "--format",
        "nft",
    ]);
    assert!(e.contains("max-input-bytes limit of 1000"), "{e}");
    assert!(start.elapsed().as_secs() < 20);
}

#[test]
fn keep_going_loads_the_good_objects() {
    let text = "kind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.9.1, ports: [{port: 0}]}\n---\nkind: Service\nmetadata: {name: worse}\nspec: {clusterIP: 10.96.9.2, ports: [{port: 99999}]}\n---\nkind: Service\nmetadata: {name: ok}\nspec: {clusterIP: 10.96.9.3, ports: [{port: 80}]}\n";
    let f = temp_file("keep.yaml", text);
    let e = err(&[
        "--manifests",
        f.to_str().unwrap(),
        "dump",
        "--format",
        "nft",
    ]);
    assert!(e.contains("2 bad objects"), "{e}");
    assert!(
        e.contains("default/bad") && e.contains("default/worse"),
        "{e}"
    );
    let out = ok(&[
        "--keep-going",
        "--manifests",
        f.to_str().unwrap(),
        "route",
        "--src",
        "10.0.0.1",
        "--dst",
        "10.96.9.3:80",
    ]);
    assert_eq!(out, "REJECT\n");
}

/// The connection layer from the command line: `packet` lines follow the
/// tracker (and print like `connect`), `tick` runs the timers, `replay
/// --dump conntrack` lists what is tracked (`ipvsadm -lnc` in IPVS mode,
/// `conntrack -L` in iptables mode), and `--no-conntrack` schedules every
/// packet afresh.
#[test]
fn replay_tracks_connections_and_dumps_them() {
    let trace = temp_file(
        "conntrack.trace",
        "0.000 connect tcp 10.244.9.11:40001 10.96.0.10:80\n\
         0.001 packet tcp 10.244.9.11:40001 10.96.0.10:80 ack\n\
         0.002 connect udp 10.244.9.12:5353 10.96.0.10:80\n\
         1.000 tick\n\
         2.000 packet tcp 10.244.9.11:40001 10.96.0.10:80\n\
         3.000 connect tcp 10.244.9.13:40003 10.96.0.10:80\n\
         3.500 close tcp 10.244.9.13:40003 10.96.0.10:80\n",
    );
    let t = trace.to_str().unwrap();
    let out = ok(&with(
        &["--mode", "ipvs"],
        &["replay", t, "--dump", "conntrack"],
    ));
    let lines: Vec<&str> = out.lines().collect();
    // The connect and both packets of the TCP flow go to one backend.
    let backend = |l: &str| l.rsplit_once(' ').unwrap().1.to_owned();
    assert!(
        lines[0].starts_with("0.000 10.244.9.11:40001 -> 10.96.0.10:80 FORWARD "),
        "{out}"
    );
    assert!(
        lines[1].starts_with("0.001 10.244.9.11:40001 -> 10.96.0.10:80 FORWARD "),
        "{out}"
    );
    assert!(
        lines[3].starts_with("2.000 10.244.9.11:40001 -> 10.96.0.10:80 FORWARD "),
        "{out}"
    );
    assert_eq!(backend(lines[0]), backend(lines[1]));
    assert_eq!(backend(lines[0]), backend(lines[3]));
    // The web service is TCP only: the UDP flow is not a service.
    assert_eq!(
        lines[2],
        "0.002 10.244.9.12:5353 -> 10.96.0.10:80 NO-SERVICE"
    );
    let dump = &lines[5..];
    assert_eq!(dump[0], "IPVS connection entries", "{out}");
    assert!(dump[1].starts_with("pro expire state"), "{out}");
    // One established connection left (the other was closed), 900 s from
    // its last packet at 2 s, listed at the replay's end (3.5 s).
    assert_eq!(dump.len(), 3, "{out}");
    assert!(
        dump[2].starts_with("TCP 14:58  ESTABLISHED 10.244.9.11:40001  10.96.0.10:80      "),
        "{out}"
    );
    assert!(dump[2].ends_with(&backend(lines[0])), "{out}");

    let out = ok(&with(&[], &["replay", t, "--dump", "conntrack"]));
    assert!(
        out.lines().any(|l| l.starts_with("tcp      6  431998 ESTABLISHED src=10.244.9.11 dst=10.96.0.10 sport=40001 dport=80 src=")),
        "netfilter's 5-day timeout in iptables mode:\n{out}"
    );
    assert!(out.contains("1 flow entries have been shown."), "{out}");

    let out = ok(&with(
        &["--no-conntrack"],
        &["replay", t, "--dump", "conntrack"],
    ));
    assert!(out.contains("0 flow entries have been shown."), "{out}");
    let out = err(&with(
        &[],
        &[
            "replay",
            &temp_file(
                "bad-flags.trace",
                "0 packet tcp 10.0.0.1:1 10.96.0.10:80 syn,psh\n",
            )
            .to_string_lossy(),
            "--dump",
            "conntrack",
        ],
    ));
    assert!(out.contains("flags") && out.contains("syn,psh"), "{out}");
}

const LB: [&str; 2] = ["--manifests", "tests/fixtures/surface/lb.yaml"];

fn lb<'a>(pre: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    pre.iter().chain(LB.iter()).chain(rest).copied().collect()
}

/// Node ports (`--node-ip`, `--nodeport-addresses`), external and
/// load-balancer IPs route as kube-proxy does; `health` answers the
/// health-check node port.
#[test]
fn node_ports_external_ips_and_health() {
    let node = [
        "--node",
        "node-a",
        "--node-ip",
        "192.168.0.2",
        "--node-ip",
        "10.1.0.2",
        "--nodeport-addresses",
        "192.168.0.0/24",
        "--cluster-cidr",
        "10.244.0.0/16",
    ];
    for mode in ["iptables", "ipvs", "nftables", "ebpf"] {
        let mut pre = vec!["--mode", mode];
        pre.extend(node);
        let route = |src: &'static str, dst: &'static str| {
            ok(&lb(&pre, &["route", "--src", src, "--dst", dst]))
        };
        // External clients reach only the local endpoint (eTP Local).
        let local = "FORWARD 10.244.1.5:8080";
        assert!(
            route("198.51.100.7", "192.168.0.2:30080").contains(local),
            "{mode}"
        );
        assert!(
            route("203.0.113.9", "192.168.99.11:80").contains(local),
            "{mode}"
        );
        assert!(route("203.0.113.9", "1.2.3.4:80").contains(local), "{mode}");
        // The source range blocks the LB IP, not the node port.
        assert!(
            route("198.51.100.7", "1.2.3.4:80").contains("DROP"),
            "{mode}"
        );
        // --nodeport-addresses leaves 10.1.0.2 out.
        assert!(
            route("198.51.100.7", "10.1.0.2:30080").contains("NO-SERVICE"),
            "{mode}"
        );
        // The masquerade decision: an external client keeps its source
        // under eTP Local (no token); the node itself is masqueraded.
        assert_eq!(
            route("198.51.100.7", "192.168.0.2:30080"),
            format!("{local}\n"),
            "{mode}"
        );
        let from_node = route("192.168.0.2", "192.168.0.2:30080");
        if mode == "ipvs" {
            // kube-proxy's IPVS mode neither short-circuits nor
            // masquerades the node's own traffic to a Local node port
            // (tests/ipvs_surface.rs).
            assert_eq!(from_node, format!("{local}\n"), "{mode}");
        } else {
            assert!(
                from_node.starts_with("FORWARD ") && from_node.ends_with(" masquerade\n"),
                "{mode}: {from_node}"
            );
        }
    }
    let out = ok(&lb(&node, &["health", "prod/shop"]));
    assert_eq!(
        out,
        "200 OK\n{\n\t\"service\": {\n\t\t\"namespace\": \"prod\",\n\t\t\"name\": \"shop\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}\n"
    );
    let out = ok(&lb(&["--node", "node-c"], &["health", "prod/shop"]));
    assert!(out.starts_with("503 Service Unavailable\n"), "{out}");
    assert!(out.contains("\"localEndpoints\": 0"), "{out}");
    let e = err(&lb(&[], &["health", "prod/nope"]));
    assert!(e.contains("no service prod/nope"), "{e}");
}

#[test]
fn replay_writes_each_sync_as_kube_proxy_partial_syncs() {
    let dir = std::env::temp_dir().join(format!("svclb-cli-{}-syncs", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let out = ok(&with(
        &[],
        &["replay", "examples/traces/web.trace", "--syncs", d],
    ));
    let syncs: Vec<&str> = out.lines().filter(|l| l.starts_with("sync ")).collect();
    // The manifests' rules, then web.trace's apply and delete.
    assert_eq!(syncs.len(), 3, "{out}");
    let bytes = |line: &str, what: &str| -> (usize, usize) {
        // "... iptables N bytes (full M) ..."
        let rest = line.split_once(&format!("{what} ")).unwrap().1;
        let n = rest.split(' ').next().unwrap().parse().unwrap();
        let full = rest.split_once("(full ").unwrap().1;
        let m = full.split(')').next().unwrap().parse().unwrap();
        (n, m)
    };
    for (i, line) in syncs.iter().enumerate() {
        assert!(
            line.starts_with(&format!("sync {:04}: iptables ", i + 1)),
            "{line}"
        );
        for (what, ext) in [("iptables", "iptables"), ("nft", "nft")] {
            let (n, full) = bytes(line, what);
            let file = dir.join(format!("{:04}.{ext}", i + 1));
            let text = std::fs::read_to_string(&file).unwrap();
            assert_eq!(text.len(), n, "{line}: {}", file.display());
            if i == 0 {
                assert_eq!(n, full, "the first sync is full: {line}");
            } else {
                assert!(n < full, "a partial sync writes less: {line}");
            }
        }
    }
    // The first sync is what `dump` prints.
    let dump = ok(&with(&[], &["dump", "--format", "iptables"]));
    assert_eq!(
        std::fs::read_to_string(dir.join("0001.iptables")).unwrap(),
        dump
    );
    // The rollout rewrites web's chains and deletes the terminated
    // endpoint's; the delete of web flushes and deletes all of web's.
    let second = std::fs::read_to_string(dir.join("0002.iptables")).unwrap();
    assert!(
        second.contains("--to-destination 10.244.1.6:8080"),
        "{second}"
    );
    assert!(!second.contains("ml/inference-api:http ->"), "{second}");
    assert!(second.contains("\n-X KUBE-SEP-"), "{second}");
    let third = std::fs::read_to_string(dir.join("0003.nft")).unwrap();
    assert!(
        third.contains("flush chain ip kube-proxy service-"),
        "{third}"
    );
    assert!(
        third.contains("delete element ip kube-proxy service-ips { 10.96.0.10 . tcp . 80 }"),
        "{third}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--service-node-port-range` is the API server's flag: a node port
/// outside the default 30000-32767 is refused, naming the field, unless
/// the range holds it; then the node port routes.
#[test]
fn service_node_port_range_is_configurable() {
    let p = temp_file(
        "np-range.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: prod}\n\
         spec: {type: NodePort, clusterIP: 10.96.8.8, ports: [{port: 80, targetPort: 8080, nodePort: 8080}]}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: np-1, namespace: prod, labels: {kubernetes.io/service-name: np}}\n\
         addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.244.1.9]}]\n",
    );
    let path = p.to_str().unwrap();
    let route = [
        "route",
        "--src",
        "198.51.100.7",
        "--dst",
        "192.168.0.2:8080",
    ];
    let base = ["--node-ip", "192.168.0.2", "--manifests", path];
    let e = err(&base.iter().chain(&route).copied().collect::<Vec<_>>());
    assert!(e.contains("spec.ports[0].nodePort"), "{e}");
    assert!(e.contains("\"8080\""), "{e}");
    for range in ["8000-9000", "8000+1000"] {
        let args: Vec<&str> = ["--service-node-port-range", range]
            .iter()
            .chain(&base)
            .chain(&route)
            .copied()
            .collect();
        assert_eq!(ok(&args), "FORWARD 10.244.1.9:8080 masquerade\n", "{range}");
    }
    let args: Vec<&str> = ["--service-node-port-range", "9000-8000"]
        .iter()
        .chain(&base)
        .chain(&route)
        .copied()
        .collect();
    let e = err(&args);
    assert!(e.contains("--service-node-port-range"), "{e}");
    let _ = std::fs::remove_file(&p);
}

/// A trace that applies a LoadBalancer service (node port, external IP,
/// LB IP with source ranges, eTP Local) routes each frontend kind, and its
/// syncs write and then delete the node-port and firewall rules.
#[test]
fn replay_applies_the_external_surface() {
    let dir = std::env::temp_dir().join(format!("svclb-cli-{}-lb-syncs", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let trace = temp_file(
        "lb.trace",
        "0.0 apply tests/fixtures/surface/lb.yaml\n\
         1.0 connect tcp 198.51.100.7:40001 192.168.0.2:30080\n\
         1.1 connect tcp 198.51.100.7:40002 1.2.3.4:80\n\
         1.2 connect tcp 203.0.113.9:40003 1.2.3.4:80\n\
         1.3 connect tcp 203.0.113.9:40004 192.168.99.11:80\n\
         2.0 delete Service prod/shop\n\
         2.1 connect tcp 198.51.100.7:40005 192.168.0.2:30080\n",
    );
    let out = ok(&with(
        &["--node", "node-a", "--node-ip", "192.168.0.2"],
        &[
            "replay",
            trace.to_str().unwrap(),
            "--syncs",
            dir.to_str().unwrap(),
        ],
    ));
    for want in [
        "1.000 198.51.100.7:40001 -> 192.168.0.2:30080 FORWARD 10.244.1.5:8080\n",
        "1.100 198.51.100.7:40002 -> 1.2.3.4:80 DROP\n",
        "1.200 203.0.113.9:40003 -> 1.2.3.4:80 FORWARD 10.244.1.5:8080\n",
        "1.300 203.0.113.9:40004 -> 192.168.99.11:80 FORWARD 10.244.1.5:8080\n",
        "2.100 198.51.100.7:40005 -> 192.168.0.2:30080 NO-SERVICE\n",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let (ipt, nft) = (read("0002.iptables"), read("0002.nft"));
    for want in [
        "-A KUBE-NODEPORTS -m comment --comment prod/shop:http -m tcp -p tcp --dport 30080 -j KUBE-EXT-",
        "-s 203.0.113.0/25 -j KUBE-EXT-",
        "health check node port\" -m tcp -p tcp --dport 32000 -j ACCEPT",
    ] {
        assert!(ipt.contains(want), "missing {want:?} in\n{ipt}");
    }
    assert!(nft.contains("service-nodeports"), "{nft}");
    assert!(nft.contains("firewall-ips"), "{nft}");
    let (ipt, nft) = (read("0003.iptables"), read("0003.nft"));
    assert!(ipt.contains("\n-X KUBE-EXT-"), "{ipt}");
    assert!(ipt.contains("\n-X KUBE-FW-"), "{ipt}");
    assert!(
        nft.contains("delete element ip kube-proxy service-nodeports { tcp . 30080 }"),
        "{nft}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&trace);
}
