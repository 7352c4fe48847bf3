//! Runs `examples/proxy.rs` against echo backends on loopback: every byte
//! echoed, the distribution over backends for rr, random and lc, ClientIP
//! affinity, reloads (file change and SIGHUP) that remove a backend while a
//! connection to it stays open, a service without endpoints, UDP sessions,
//! metrics, a clean shutdown; node ports, external and load-balancer IPs,
//! source ranges and health-check node ports.
//!
//! Every server and client uses addresses in 127.0.0.0/8 only: backends on
//! 127.77.K.1-3 (standing in for endpoints 10.244.K.1-3 through the proxy's
//! `--connect-map`, as the API refuses loopback endpoints), the services on
//! 127.78.0.K, node IPs and the stand-ins for external and load-balancer
//! IPs on 127.79.K.x, clients bound to 127.0.0.2 and up. K is a test's own number,
//! so the tests run in parallel. Every wait is bounded. The one exception
//! to 127.0.0.0/8 is `node_ports_without_node_ip_answer_on_ipv6_too`,
//! which needs IPv6 and uses the IPv6 loopback address ::1 (its own
//! ports there).
#![cfg(all(feature = "serde", target_os = "linux"))]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

const BACKEND_PORT: u16 = 9000;
const SERVICE_PORT: u16 = 8000;
/// The longest any wait in these tests may take.
const WAIT: Duration = Duration::from_secs(10);

fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let bin = profile_dir
            .join("examples")
            .join(format!("proxy{}", std::env::consts::EXE_SUFFIX));
        // As tests/cli.rs: always ask cargo (a no-op after `cargo test`).
        let mut features = String::from("serde");
        if cfg!(feature = "k8s-openapi") {
            features.push_str(",k8s-openapi");
        }
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "--quiet",
            "--example",
            "proxy",
            "--features",
            &features,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the proxy example failed");
        assert!(bin.exists(), "{} not found", bin.display());
        bin
    })
}

/// Three echo backends: TCP and UDP on 127.77.K.1-3:9000. Each TCP
/// connection first gets the backend's number as one byte (`1`..`3`), then
/// the echo of everything it sends; each UDP datagram comes back prefixed
/// with that byte.
struct Backends {
    accepted: Vec<Arc<AtomicUsize>>,
}

fn backend_ip(k: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 77, k, i)
}

fn start_backends(k: u8) -> Backends {
    let mut accepted = Vec::new();
    for i in 1..=3u8 {
        let addr = SocketAddr::new(IpAddr::V4(backend_ip(k, i)), BACKEND_PORT);
        let listener = TcpListener::bind(addr).expect("bind backend");
        let count = Arc::new(AtomicUsize::new(0));
        accepted.push(Arc::clone(&count));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let id = b'0' + i;
                    if c.write_all(&[id]).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if c.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = c.shutdown(Shutdown::Write);
                });
            }
        });
        let udp = UdpSocket::bind(addr).expect("bind udp backend");
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf[1..]) else {
                    return;
                };
                buf[0] = b'0' + i;
                let _ = udp.send_to(&buf[..=n], peer);
            }
        });
    }
    Backends { accepted }
}

impl Backends {
    fn counts(&self) -> Vec<usize> {
        self.accepted
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect()
    }
}

fn vip(k: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 78, 0, k)), SERVICE_PORT)
}

/// A Service `echo` on 127.78.0.K with TCP and UDP port 8000, and a slice
/// with the endpoints 10.244.K.I for I in `endpoints`.
fn manifest(k: u8, endpoints: &[u8], affinity: bool) -> String {
    let mut m = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default}}\nspec:\n  clusterIP: 127.78.0.{k}\n"
    );
    if affinity {
        m.push_str("  sessionAffinity: ClientIP\n");
    }
    m.push_str(
        "  ports:\n  - {name: tcp, port: 8000, targetPort: 9000, protocol: TCP}\n  - {name: udp, port: 8000, targetPort: 9000, protocol: UDP}\n",
    );
    m.push_str(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: default\n  labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports:\n- {name: tcp, port: 9000, protocol: TCP}\n- {name: udp, port: 9000, protocol: UDP}\n",
    );
    m.push_str(if endpoints.is_empty() {
        "endpoints: []\n"
    } else {
        "endpoints:\n"
    });
    for i in endpoints {
        m.push_str(&format!("- addresses: [\"10.244.{k}.{i}\"]\n"));
    }
    m
}

/// A temporary directory for one test's manifests, removed when dropped.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(k: u8) -> TempDir {
    let dir = std::env::temp_dir().join(format!("svclb-proxy-test-{}-{k}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

/// Replaces `path` with `text` in one step (a rename), with mtime `mtime`
/// if given, so that the proxy's poll never sees a half-written file.
fn write_file(path: &Path, text: &str, mtime: Option<std::time::SystemTime>) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write manifest");
    if let Some(t) = mtime {
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .and_then(|f| f.set_modified(t))
            .expect("set mtime");
    }
    std::fs::rename(&tmp, path).expect("rename manifest");
}

/// A running proxy with its standard output collected line by line.
struct Proxy {
    child: Child,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
    metrics: SocketAddr,
}

impl Proxy {
    fn start(k: u8, manifests: &Path, extra: &[&str]) -> Proxy {
        Self::start_with(k, manifests, extra, Stdio::null())
    }

    fn start_with(k: u8, manifests: &Path, extra: &[&str], stdin: Stdio) -> Proxy {
        Self::spawn(k, manifests, "127.78.0.0/16", extra, stdin)
    }

    /// With `--service-cidr CIDRS` (one or two families).
    fn start_with_cidr(k: u8, manifests: &Path, cidrs: &str, extra: &[&str]) -> Proxy {
        Self::spawn(k, manifests, cidrs, extra, Stdio::null())
    }

    fn spawn(k: u8, manifests: &Path, cidrs: &str, extra: &[&str], stdin: Stdio) -> Proxy {
        let metrics = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 78, 1, k)), 9100);
        let mut child = Command::new(binary())
            .arg("--manifests")
            .arg(manifests)
            .args([
                "--service-cidr",
                cidrs,
                "--connect-map",
                &format!("10.244.{k}.0/24=127.77.{k}.0/24"),
                "--metrics",
                &metrics.to_string(),
            ])
            .args(extra)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn proxy");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let l2 = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let (m, cv) = &*l2;
                m.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
        let p = Proxy {
            child,
            lines,
            metrics,
        };
        p.wait_line(|l| l.starts_with("ready "));
        p
    }

    /// Waits (at most [`WAIT`]) for `n` lines matching `pred`; returns
    /// them.
    fn wait_lines(&self, n: usize, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let (m, cv) = &*self.lines;
        let deadline = Instant::now() + WAIT;
        let mut g = m.lock().unwrap();
        loop {
            let found: Vec<String> = g.iter().filter(|l| pred(l)).cloned().collect();
            if found.len() >= n {
                return found;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "waited for {n} lines, got {}; output:\n{}",
                found.len(),
                g.join("\n")
            );
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    fn wait_line(&self, pred: impl Fn(&str) -> bool) -> String {
        self.wait_lines(1, pred).pop().expect("a line")
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success());
    }

    fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).expect("connect metrics");
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read metrics");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        out
    }

    /// The value of the metric line that starts with `name`.
    fn metric(&self, name: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "proxy did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection to the service from `src`, after the backend's greeting:
/// returns the stream and the backend's number.
fn open(k: u8, src: Ipv4Addr) -> (TcpStream, u8) {
    let sock = socket_from(src);
    sock.connect(&vip(k).into())
        .expect("connect to the service");
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut id = [0u8; 1];
    s.read_exact(&mut id).expect("backend greeting");
    (s, id[0] - b'0')
}

fn socket_from(src: Ipv4Addr) -> socket2::Socket {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())
        .expect("bind client");
    sock
}

/// Sends `payload`, checks every byte comes back.
fn echo(s: &mut TcpStream, payload: &[u8]) {
    s.write_all(payload).expect("send");
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).expect("echo");
    assert_eq!(back, payload, "echoed bytes differ");
}

/// One whole connection: greeting, echo, half-close, EOF. Returns the
/// backend.
fn one_connection(k: u8, src: Ipv4Addr, payload: &[u8]) -> u8 {
    let (mut s, id) = open(k, src);
    s.write_all(payload).expect("send");
    s.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("read to EOF");
    assert_eq!(back, payload, "echoed bytes differ");
    id
}

fn client(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % 50) as u8)
}

fn payload(i: usize) -> Vec<u8> {
    (0..1000 + i % 100).map(|j| (i * 31 + j) as u8).collect()
}

fn histogram(ids: &[u8]) -> [usize; 3] {
    let mut h = [0; 3];
    for &id in ids {
        h[usize::from(id - 1)] += 1;
    }
    h
}

#[test]
fn rr_echoes_every_byte_and_metrics_count_it() {
    let k = 1;
    let backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[1, 2, 3], false), None);
    // One thread: the current-thread runtime.
    let proxy = Proxy::start(
        k,
        &file,
        &["--mode", "ipvs", "--scheduler", "rr", "--threads", "1"],
    );
    let mut ids = Vec::new();
    let mut sent = 0;
    for i in 0..300 {
        let p = payload(i);
        sent += p.len();
        ids.push(one_connection(k, client(i), &p));
    }
    // rr with one connection at a time: exactly even.
    assert_eq!(histogram(&ids), [100, 100, 100]);
    assert_eq!(backends.counts(), vec![100, 100, 100]);
    let done = proxy.wait_lines(300, |l| {
        l.starts_with("conn proto=tcp") && l.contains("end=closed")
    });
    assert!(done[0].contains("service=default/echo:tcp"), "{}", done[0]);
    for i in 1..=3 {
        let m = proxy.metric(&format!(
            "svclb_proxy_connections_total{{service=\"default/echo:tcp\",backend=\"10.244.{k}.{i}:9000\"}}"
        ));
        assert_eq!(m, 100.0);
    }
    let bytes_in =
        proxy.metric("svclb_proxy_bytes_total{service=\"default/echo:tcp\",direction=\"in\"}");
    let bytes_out =
        proxy.metric("svclb_proxy_bytes_total{service=\"default/echo:tcp\",direction=\"out\"}");
    assert_eq!(bytes_in, sent as f64);
    // Out: the echo plus each backend's greeting byte.
    assert_eq!(bytes_out, (sent + 300) as f64);
    assert_eq!(
        proxy.metric("svclb_proxy_active_connections{service=\"default/echo:tcp\"}"),
        0.0
    );
    assert_eq!(proxy.metric("svclb_proxy_tracked_connections"), 0.0);
    assert_eq!(proxy.metric("svclb_proxy_reloads_total"), 0.0);
    assert!(proxy.stop().success());
}

#[test]
fn random_spreads_connections() {
    random_spreads_connections_in(2, "iptables");
}

#[test]
fn nftables_numgen_spreads_connections() {
    random_spreads_connections_in(14, "nftables");
}

fn random_spreads_connections_in(k: u8, mode: &str) {
    let backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[1, 2, 3], false), None);
    let proxy = Proxy::start(k, &file, &["--mode", mode]);
    let ids: Vec<u8> = (0..300)
        .map(|i| one_connection(k, client(i), &payload(i)))
        .collect();
    // iptables' random cascade, nftables' numgen: each backend a third in
    // expectation; 60..140
    // is about 5 standard deviations either side.
    for n in histogram(&ids) {
        assert!((60..=140).contains(&n), "{:?}", histogram(&ids));
    }
    assert_eq!(backends.counts().iter().sum::<usize>(), 300);
    assert!(proxy.stop().success());
}

#[test]
fn least_connection_balances_open_connections() {
    let k = 3;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[1, 2, 3], false), None);
    let proxy = Proxy::start(k, &file, &["--mode", "ipvs", "--scheduler", "lc"]);
    // 300 connections held open: each goes to the backend with the fewest
    // (the tracker's ESTABLISHED counts), so exactly 100 each.
    let mut open_conns = Vec::new();
    let mut ids = Vec::new();
    for i in 0..300 {
        let (mut s, id) = open(k, client(i));
        echo(&mut s, &payload(i));
        ids.push(id);
        open_conns.push(s);
    }
    assert_eq!(histogram(&ids), [100, 100, 100]);
    assert_eq!(proxy.metric("svclb_proxy_tracked_connections"), 300.0);
    drop(open_conns);
    proxy.wait_lines(300, |l| l.starts_with("conn proto=tcp"));
    assert!(proxy.stop().success());
}

#[test]
fn client_ip_affinity_pins_each_client() {
    let k = 4;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[1, 2, 3], true), None);
    let proxy = Proxy::start(k, &file, &["--mode", "iptables"]);
    let mut seen: std::collections::BTreeMap<Ipv4Addr, std::collections::BTreeSet<u8>> =
        Default::default();
    for i in 0..300 {
        let src = Ipv4Addr::new(127, 0, 0, 2 + (i % 30) as u8);
        let id = one_connection(k, src, &payload(i));
        seen.entry(src).or_default().insert(id);
    }
    assert_eq!(seen.len(), 30);
    for (src, ids) in &seen {
        assert_eq!(ids.len(), 1, "{src} went to {ids:?}");
    }
    // 30 clients over 3 backends: more than one backend is used.
    let used: std::collections::BTreeSet<u8> = seen.values().flatten().copied().collect();
    assert!(used.len() > 1, "{used:?}");
    assert!(proxy.stop().success());
}

#[test]
fn reloads_by_file_change_and_sighup_drain_open_connections() {
    let k = 5;
    let backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[1, 2, 3], false), None);
    let proxy = Proxy::start(k, &file, &["--mode", "ipvs", "--scheduler", "rr"]);
    // Open connections until one is on backend 3, and keep it.
    let mut on3 = None;
    for i in 0..3 {
        let (s, id) = open(k, client(i));
        if id == 3 {
            on3 = Some(s);
        }
    }
    let mut on3 = on3.expect("rr reached backend 3");
    let on3_client = on3.local_addr().unwrap();

    // File change: backend 3 leaves the slice.
    write_file(&file, &manifest(k, &[1, 2], false), None);
    proxy.wait_line(|l| l.starts_with("reload ok source=files"));
    let before = backends.counts();
    let ids: Vec<u8> = (0..30)
        .map(|i| one_connection(k, client(i), &payload(i)))
        .collect();
    assert!(!ids.contains(&3), "{ids:?}");
    assert_eq!(backends.counts()[2], before[2]);
    // The open connection to the removed backend keeps working.
    echo(&mut on3, b"still here after the reload");

    // SIGHUP: a change the file poll cannot see (same size, same mtime):
    // endpoint 2 becomes endpoint 3.
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let text = manifest(k, &[1, 3], false);
    assert_eq!(text.len(), manifest(k, &[1, 2], false).len());
    write_file(&file, &text, Some(mtime));
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        proxy.wait_lines(1, |l| l.starts_with("reload ok")).len() == 1,
        "the poll must not see a change of neither size nor mtime"
    );
    proxy.signal("-HUP");
    proxy.wait_line(|l| l.starts_with("reload ok source=sighup"));
    let ids: Vec<u8> = (0..30)
        .map(|i| one_connection(k, client(i), &payload(i)))
        .collect();
    assert!(!ids.contains(&2), "{ids:?}");
    assert!(ids.contains(&3), "{ids:?}");
    echo(&mut on3, b"and after the second");
    assert_eq!(proxy.metric("svclb_proxy_reloads_total"), 2.0);
    on3.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    on3.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let line = proxy.wait_line(|l| l.contains(&format!("client={on3_client} ")));
    assert!(
        line.contains(&format!("backend=10.244.{k}.3:9000")),
        "{line}"
    );
    assert!(line.contains("end=closed"), "{line}");
    assert!(proxy.stop().success());
}

#[test]
fn service_without_endpoints_refuses() {
    let k = 6;
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[], false), None);
    let proxy = Proxy::start(k, &file, &[]);
    for i in 0..3 {
        let sock = socket_from(client(i));
        sock.connect(&vip(k).into()).expect("the listener accepts");
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 16];
        let r = s.read(&mut buf);
        match r {
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
            Ok(n) => panic!("read {n} bytes from a service without endpoints"),
        }
    }
    proxy.wait_lines(3, |l| {
        l.starts_with("conn proto=tcp") && l.contains("end=reject")
    });
    assert!(proxy.stop().success());
}

#[test]
fn udp_sessions_reply_from_the_service_and_time_out() {
    let k = 7;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[1, 2, 3], false), None);
    let proxy = Proxy::start(
        k,
        &file,
        &["--mode", "ipvs", "--scheduler", "rr", "--udp-timeout", "1"],
    );
    let mut backends_seen = Vec::new();
    let mut sent = 0;
    for c in 0..3u8 {
        let sock = UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 2 + c), 0)).expect("bind client");
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let mut session_backend = None;
        for n in 0..5u8 {
            let msg = [b'u', c, n];
            sent += msg.len();
            sock.send_to(&msg, vip(k)).expect("send");
            let mut buf = [0u8; 64];
            let (len, from) = sock.recv_from(&mut buf).expect("reply");
            assert_eq!(from, vip(k), "the reply comes from the service address");
            assert_eq!(&buf[1..len], &msg);
            let id = buf[0];
            assert_eq!(
                *session_backend.get_or_insert(id),
                id,
                "one backend per session"
            );
        }
        backends_seen.push(session_backend.unwrap());
    }
    backends_seen.sort_unstable();
    assert_eq!(backends_seen, vec![b'1', b'2', b'3']);
    // The tracker's UDP timeout (1 s here) ends the sessions.
    let ended = proxy.wait_lines(3, |l| {
        l.starts_with("conn proto=udp") && l.contains("end=timeout")
    });
    let total_in: usize = ended
        .iter()
        .map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("bytes_in="))
                .and_then(|v| v.parse::<usize>().ok())
                .expect("bytes_in")
        })
        .sum();
    assert_eq!(total_in, sent);
    assert_eq!(
        proxy.metric("svclb_proxy_bytes_total{service=\"default/echo:udp\",direction=\"in\"}"),
        sent as f64
    );
    assert!(proxy.stop().success());
}

#[test]
fn shutdown_stops_accepting_and_drains() {
    let k = 8;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[1, 2, 3], false), None);
    let mut proxy = Proxy::start(k, &file, &["--drain-timeout", "8"]);
    let (mut s, _) = open(k, client(0));
    proxy.signal("-TERM");
    proxy.wait_line(|l| l == "shutdown draining=1");
    // No longer accepting.
    let refused = socket_from(client(1)).connect(&vip(k).into());
    assert!(refused.is_err(), "the listener must be closed");
    // The open connection still works, and its end lets the proxy exit.
    echo(&mut s, b"draining");
    drop(s);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = proxy.child.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "proxy did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    proxy.wait_line(|l| l == "shutdown done remaining=0");
}

#[test]
fn drain_grace_ends_connections_to_a_removed_backend() {
    let k = 9;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[1, 2, 3], false), None);
    let proxy = Proxy::start(
        k,
        &file,
        &["--mode", "ipvs", "--scheduler", "rr", "--drain-grace", "1"],
    );
    let mut kept = Vec::new();
    for i in 0..3 {
        kept.push(open(k, client(i)));
    }
    let (mut on3, _) = kept.remove(kept.iter().position(|(_, id)| *id == 3).expect("on 3"));
    let on3_client = on3.local_addr().unwrap();
    write_file(&file, &manifest(k, &[1, 2], false), None);
    proxy.wait_line(|l| l.starts_with("reload ok source=files"));
    echo(&mut on3, b"draining");
    // Once the grace has passed the dataplane drops the connection's
    // packets (expire_nodest_conn), and the proxy closes it.
    let line = proxy.wait_line(|l| l.contains(&format!("client={on3_client} ")));
    assert!(line.contains("end=expired"), "{line}");
    let mut buf = [0u8; 8];
    match on3.read(&mut buf) {
        Ok(0) => {}
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
        Ok(n) => panic!("read {n} bytes after the drain ended"),
    }
    // The connections to the remaining backends are untouched.
    for (s, _) in &mut kept {
        echo(s, b"still open");
    }
    assert!(proxy.stop().success());
}

#[test]
fn watch_input_is_applied_as_it_arrives() {
    let k = 10;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let svc = dir.join("service.yaml");
    // The service from a manifest, its endpoints from a watch stream.
    let text = manifest(k, &[], false);
    let service_only = text.split("---").next().unwrap();
    write_file(&svc, service_only, None);
    let slice = |eps: &[u8], rv: u32| slice_event(k, eps, rv);
    let events = dir.join("events.json");
    std::fs::write(&events, slice(&[1, 2, 3], 10)).unwrap();
    let proxy = Proxy::start(
        k,
        &svc,
        &[
            "--watch",
            events.to_str().unwrap(),
            "--mode",
            "ipvs",
            "--scheduler",
            "rr",
        ],
    );
    let ids: Vec<u8> = (0..30)
        .map(|i| one_connection(k, client(i), &payload(i)))
        .collect();
    assert_eq!(histogram(&ids), [10, 10, 10]);
    // A MODIFIED event appended to the stream, written in two parts: the
    // proxy applies it once it is whole.
    let ev = slice(&[1], 11).replace("ADDED", "MODIFIED");
    let (a, b) = ev.split_at(ev.len() / 2);
    let mut f = std::fs::File::options().append(true).open(&events).unwrap();
    f.write_all(a.as_bytes()).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    f.write_all(b.as_bytes()).unwrap();
    proxy.wait_line(|l| l.starts_with("reload ok source=watch"));
    let ids: Vec<u8> = (0..30)
        .map(|i| one_connection(k, client(i), &payload(i)))
        .collect();
    assert_eq!(histogram(&ids), [30, 0, 0]);
    assert!(proxy.stop().success());
}

#[test]
fn a_failed_connect_retries_another_backend() {
    let k = 11;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    // Endpoint 4 has no server: its connects are refused.
    write_file(&file, &manifest(k, &[1, 2, 3, 4], false), None);
    let proxy = Proxy::start(
        k,
        &file,
        &["--mode", "ipvs", "--scheduler", "rr", "--log", "debug"],
    );
    let ids: Vec<u8> = (0..40)
        .map(|i| one_connection(k, client(i), &payload(i)))
        .collect();
    let h = histogram(&ids);
    assert_eq!(h.iter().sum::<usize>(), 40);
    assert!(h.iter().all(|&n| n > 0), "{h:?}");
    let errors = proxy.metric(&format!(
        "svclb_proxy_connect_errors_total{{service=\"default/echo:tcp\",backend=\"10.244.{k}.4:9000\"}}"
    ));
    // rr offers endpoint 4 every fourth route: about 10 of the 40
    // connections hit it first, and each went on to another backend.
    assert!(errors >= 5.0, "{errors}");
    let done = proxy.wait_lines(40, |l| l.starts_with("conn proto=tcp"));
    assert!(done.iter().all(|l| l.contains("end=closed")), "{done:?}");
    assert!(proxy.stop().success());
}

/// Source hashing always offers a client the same backend: when that one
/// refuses connections, the retry (`Dataplane::route_excluding`) must go
/// elsewhere, or every connection of those clients would fail.
#[test]
fn a_failed_connect_under_source_hashing_retries_another_backend() {
    let k = 18;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    // Endpoint 4 has no server: its connects are refused.
    write_file(&file, &manifest(k, &[1, 2, 3, 4], false), None);
    let proxy = Proxy::start(
        k,
        &file,
        &["--mode", "ipvs", "--scheduler", "sh", "--log", "debug"],
    );
    // 50 client addresses, twice each: sh sends about a quarter of them to
    // endpoint 4 first, each time.
    let ids: Vec<u8> = (0..100)
        .map(|i| one_connection(k, client(i), &payload(i)))
        .collect();
    assert_eq!(histogram(&ids).iter().sum::<usize>(), 100);
    // The same client retries to the same other backend (sh's fallback).
    for i in 0..50 {
        assert_eq!(ids[i], ids[i + 50], "client {}", client(i));
    }
    let errors = proxy.metric(&format!(
        "svclb_proxy_connect_errors_total{{service=\"default/echo:tcp\",backend=\"10.244.{k}.4:9000\"}}"
    ));
    assert!(errors >= 2.0 && errors % 2.0 == 0.0, "{errors}");
    let done = proxy.wait_lines(100, |l| l.starts_with("conn proto=tcp"));
    assert!(done.iter().all(|l| l.contains("end=closed")), "{done:?}");
    // No failed attempt is left tracked.
    assert_eq!(proxy.metric("svclb_proxy_tracked_connections"), 0.0);
    assert!(proxy.stop().success());
}

/// 8 MiB each way through each pump (`--copy splice`, the default, and
/// `--copy userspace`), written while it is read back: every byte comes
/// back in order, half-close included, and the byte metrics count it.
#[test]
fn big_transfers_echo_through_both_pumps() {
    let k = 19;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[1, 2, 3], false), None);
    const SIZE: usize = 8 << 20;
    for copy in ["splice", "userspace"] {
        let proxy = Proxy::start(k, &file, &["--mode", "ipvs", "--copy", copy]);
        let data: Arc<Vec<u8>> = Arc::new(
            (0..SIZE)
                .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
                .collect(),
        );
        let (s, _) = open(k, client(1));
        let mut w = s.try_clone().unwrap();
        let d2 = Arc::clone(&data);
        let writer = std::thread::spawn(move || {
            for chunk in d2.chunks(100_000) {
                w.write_all(chunk).expect("send");
            }
            w.shutdown(Shutdown::Write).expect("half-close");
        });
        let mut back = Vec::with_capacity(SIZE);
        let mut r = s;
        r.read_to_end(&mut back).expect("read to EOF");
        writer.join().unwrap();
        assert_eq!(back.len(), SIZE, "{copy}: bytes echoed");
        assert!(back == *data, "{copy}: echoed bytes differ");
        let line = proxy.wait_line(|l| l.starts_with("conn proto=tcp"));
        assert!(
            line.contains(&format!("bytes_in={SIZE} bytes_out={}", SIZE + 1))
                && line.contains("end=closed"),
            "{copy}: {line}"
        );
        assert!(proxy.stop().success());
    }
}

/// A half-closed connection whose other side stays open and idle ends
/// when the tracker's timeout for its state passes (here
/// `--tcp-fin-timeout 2`): the proxy's once-a-second check only looks the
/// entry up, it does not restart its timer. An idle established
/// connection with the same check stays (its timeout is the default).
#[test]
fn an_idle_half_closed_connection_times_out() {
    let k = 20;
    // A backend that reads to EOF and then keeps its side open, silent.
    let addr = SocketAddr::new(IpAddr::V4(backend_ip(k, 1)), BACKEND_PORT);
    let listener = TcpListener::bind(addr).expect("bind backend");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(4) {
            let Ok(mut c) = conn else { continue };
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
            held.push(c);
        }
        std::thread::sleep(WAIT * 3);
    });
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[1], false), None);
    let proxy = Proxy::start(k, &file, &["--mode", "iptables", "--tcp-fin-timeout", "2"]);
    let connect = || {
        let sock = socket_from(client(3));
        sock.connect(&vip(k).into()).expect("connect");
        let s: TcpStream = sock.into();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    };
    let idle = connect();
    let mut half = connect();
    half.write_all(b"bye").unwrap();
    half.shutdown(Shutdown::Write).unwrap();
    // The half-closed one ends (the proxy resets it): EOF or an error, not
    // a read timeout.
    let mut buf = [0u8; 16];
    match half.read(&mut buf) {
        Ok(0) => {}
        Err(e) => assert_ne!(e.kind(), ErrorKind::WouldBlock, "{e}"),
        Ok(n) => panic!("unexpected {n} bytes"),
    }
    let line = proxy.wait_line(|l| l.starts_with("conn proto=tcp"));
    assert!(
        line.contains("end=expired") && line.contains("bytes_in=3"),
        "{line}"
    );
    // The idle established connection is still open and tracked.
    assert_eq!(proxy.metric("svclb_proxy_tracked_connections"), 1.0);
    drop(idle);
    assert!(proxy.stop().success());
}

/// A watch event (one JSON line) for slice `echo-1` of service K.
fn slice_event(k: u8, eps: &[u8], rv: u32) -> String {
    let endpoints: Vec<String> = eps
        .iter()
        .map(|i| format!("{{\"addresses\": [\"10.244.{k}.{i}\"]}}"))
        .collect();
    format!(
        "{{\"type\": \"ADDED\", \"object\": {{\"apiVersion\": \"discovery.k8s.io/v1\", \"kind\": \"EndpointSlice\", \"metadata\": {{\"name\": \"echo-1\", \"namespace\": \"default\", \"resourceVersion\": \"{rv}\", \"labels\": {{\"kubernetes.io/service-name\": \"echo\"}}}}, \"addressType\": \"IPv4\", \"ports\": [{{\"name\": \"tcp\", \"port\": 9000, \"protocol\": \"TCP\"}}], \"endpoints\": [{}]}}}}\n",
        endpoints.join(", ")
    )
}

#[test]
fn watch_from_standard_input() {
    let k = 12;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let svc = dir.join("service.yaml");
    let text = manifest(k, &[], false);
    write_file(&svc, text.split("---").next().unwrap(), None);
    let mut proxy = Proxy::start_with(
        k,
        &svc,
        &["--watch", "-", "--mode", "ipvs", "--scheduler", "rr"],
        Stdio::piped(),
    );
    let mut stdin = proxy.child.stdin.take().expect("stdin");
    stdin
        .write_all(slice_event(k, &[2, 3], 5).as_bytes())
        .unwrap();
    stdin.flush().unwrap();
    proxy.wait_line(|l| l.starts_with("reload ok source=watch"));
    let ids: Vec<u8> = (0..20)
        .map(|i| one_connection(k, client(i), &payload(i)))
        .collect();
    assert_eq!(histogram(&ids), [0, 10, 10]);
    drop(stdin);
    assert!(proxy.stop().success());
}

#[test]
fn a_client_reset_ends_the_connection() {
    let k = 13;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("echo.yaml");
    write_file(&file, &manifest(k, &[1, 2, 3], false), None);
    let proxy = Proxy::start(k, &file, &[]);
    let (mut s, _) = open(k, client(0));
    echo(&mut s, b"before the reset");
    let addr = s.local_addr().unwrap();
    // SO_LINGER 0: close sends a RST.
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    // The backend never closes on its own: only the reset ends it.
    let line = proxy.wait_line(|l| l.contains(&format!("client={addr} ")));
    assert!(line.contains("end=reset"), "{line}");
    assert_eq!(
        proxy.metric("svclb_proxy_active_connections{service=\"default/echo:tcp\"}"),
        0.0
    );
    assert_eq!(proxy.metric("svclb_proxy_tracked_connections"), 0.0);
    assert!(proxy.stop().success());
}

/// Node ports, external IPs and load-balancer IPs: the services of these
/// tests are on 127.78.0.K, their node IPs 127.79.K.1-2; the external and
/// load-balancer IP 203.0.113.9 (the API refuses loopback external IPs) is
/// listened on at 127.79.K.9 through the proxy's `--listen-map`.
fn node_ip(k: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 79, k, i)
}

/// A connection to `dst` from `src`, after the backend's greeting.
fn open_to(dst: SocketAddr, src: Ipv4Addr) -> (TcpStream, u8) {
    let sock = socket_from(src);
    sock.connect(&dst.into()).expect("connect to the frontend");
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut id = [0u8; 1];
    s.read_exact(&mut id).expect("backend greeting");
    (s, id[0] - b'0')
}

/// `GET /path` at `addr`: the status code, the headers (lower-cased
/// names) and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect health check");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    let (head, body) = out.split_once("\r\n\r\n").expect("a whole answer");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn node_ports_and_external_ips_echo() {
    let k = 15;
    let backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("np.yaml");
    let mut m = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 127.78.0.{k}\n  externalIPs: [\"203.0.113.9\"]\n  ports:\n  - {{name: tcp, port: 8000, targetPort: 9000, protocol: TCP, nodePort: 300{k}}}\n  - {{name: udp, port: 8000, targetPort: 9000, protocol: UDP, nodePort: 300{k}}}\n"
    );
    m.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: np}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 9000, protocol: TCP}}\n- {{name: udp, port: 9000, protocol: UDP}}\nendpoints:\n- addresses: [\"10.244.{k}.1\"]\n- addresses: [\"10.244.{k}.2\"]\n- addresses: [\"10.244.{k}.3\"]\n"
    ));
    write_file(&file, &m, None);
    // Two node IPs; --nodeport-addresses keeps node ports off the second.
    let (ip1, ip2) = (node_ip(k, 1).to_string(), node_ip(k, 2).to_string());
    let proxy = Proxy::start(
        k,
        &file,
        &[
            "--mode",
            "ipvs",
            "--node-ip",
            &ip1,
            "--node-ip",
            &ip2,
            "--nodeport-addresses",
            &format!("{ip1}/32"),
            "--listen-map",
            &format!("203.0.113.0/24=127.79.{k}.0/24"),
        ],
    );
    let node_port = SocketAddr::new(IpAddr::V4(node_ip(k, 1)), 30015);
    let external = SocketAddr::new(IpAddr::V4(node_ip(k, 9)), SERVICE_PORT);
    let mut ids = Vec::new();
    for i in 0..6 {
        let dst = if i % 2 == 0 { node_port } else { external };
        let (mut s, id) = open_to(dst, client(i));
        echo(&mut s, &payload(i));
        ids.push(id);
    }
    // IPVS rr per frontend: each of the two visits the three backends.
    assert_eq!(histogram(&ids), [2, 2, 2], "{ids:?}");
    assert_eq!(backends.counts().iter().sum::<usize>(), 6);
    // No node port on the node IP --nodeport-addresses leaves out.
    let off = SocketAddr::new(IpAddr::V4(node_ip(k, 2)), 30015);
    let e = TcpStream::connect_timeout(&off, WAIT).expect_err("no listener on 127.79.15.2");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
    // UDP through the node port: the reply comes from the node port.
    let u = UdpSocket::bind(SocketAddr::new(IpAddr::V4(client(40)), 0)).unwrap();
    u.set_read_timeout(Some(WAIT)).unwrap();
    u.send_to(b"over the node port", node_port).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = u.recv_from(&mut buf).expect("udp reply");
    assert_eq!(from, node_port);
    assert_eq!(&buf[1..n], b"over the node port");
    proxy.wait_line(|l| l.starts_with("listener opened udp 127.79.15.1:30015 service="));
    proxy.wait_line(|l| {
        l.starts_with("listener opened tcp 203.0.113.9:8000 service=")
            && l.ends_with(" listen=127.79.15.9:8000")
    });
    assert!(proxy.stop().success());
}

/// Without `--node-ip` (and `--nodeport-addresses`), node ports answer on
/// every local address, as kube-proxy's do: the proxy listens on
/// 0.0.0.0:nodePort, and any 127.0.0.0/8 address reaches the service, over
/// TCP and UDP (each UDP reply from the address the client sent to).
#[test]
fn node_ports_without_node_ip_answer_on_every_local_address() {
    let k = 21;
    let backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("np.yaml");
    let mut m = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 127.78.0.{k}\n  ports:\n  - {{name: tcp, port: 8000, targetPort: 9000, protocol: TCP, nodePort: 300{k}}}\n  - {{name: udp, port: 8000, targetPort: 9000, protocol: UDP, nodePort: 300{k}}}\n"
    );
    m.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: np}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 9000, protocol: TCP}}\n- {{name: udp, port: 9000, protocol: UDP}}\nendpoints:\n- addresses: [\"10.244.{k}.1\"]\n- addresses: [\"10.244.{k}.2\"]\n- addresses: [\"10.244.{k}.3\"]\n"
    ));
    write_file(&file, &m, None);
    let proxy = Proxy::start(k, &file, &["--mode", "ipvs"]);
    proxy.wait_line(|l| l.starts_with("listener opened tcp 0.0.0.0:30021 service=default/np:tcp"));
    let mut ids = Vec::new();
    for (i, last) in [5u8, 6, 7, 80, 81, 200].into_iter().enumerate() {
        let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, last, 9)), 30021);
        let (mut s, id) = open_to(dst, client(i));
        echo(&mut s, &payload(i));
        ids.push(id);
    }
    // One frontend (0.0.0.0:30021), rr over its three backends.
    assert_eq!(histogram(&ids), [2, 2, 2], "{ids:?}");
    assert_eq!(backends.counts().iter().sum::<usize>(), 6);
    let done = proxy.wait_lines(6, |l| l.starts_with("conn proto=tcp"));
    assert!(
        done.iter().all(|l| l.contains("frontend=0.0.0.0:30021")),
        "{done:?}"
    );
    proxy.wait_line(|l| l.starts_with("listener opened udp 0.0.0.0:30021 service=default/np:udp"));
    let u = UdpSocket::bind(SocketAddr::new(IpAddr::V4(client(40)), 0)).unwrap();
    u.set_read_timeout(Some(WAIT)).unwrap();
    for last in [5u8, 6, 5] {
        let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, last, 9)), 30021);
        u.send_to(b"to a wildcard node port", dst).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = u.recv_from(&mut buf).expect("udp reply");
        assert_eq!(from, dst, "the reply comes from the address sent to");
        assert_eq!(&buf[1..n], b"to a wildcard node port");
    }
    assert!(proxy.stop().success());
}

/// An IPv6 echo backend on [::1]:`port`, TCP and UDP, as
/// [`start_backends`]'s but greeting (and prefixing datagrams) with `6`;
/// None where the host has IPv6 disabled.
fn start_ipv6_backend(port: u16) -> Option<Arc<AtomicUsize>> {
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
    let listener = TcpListener::bind(addr).ok()?;
    let udp = UdpSocket::bind(addr).ok()?;
    let count = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&count);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            c2.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                if c.write_all(b"6").is_err() {
                    return;
                }
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    if c.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = udp.recv_from(&mut buf[1..]) {
            buf[0] = b'6';
            let _ = udp.send_to(&buf[..=n], peer);
        }
    });
    Some(count)
}

/// Without `--node-ip`, node ports of an IPv6 (here dual-stack) service
/// answer on every local IPv6 address too: the proxy listens on
/// [::]:nodePort (IPv6 only) beside 0.0.0.0:nodePort, over TCP and UDP. A
/// connection to [::1]:nodePort reaches the IPv6 endpoint through the
/// [::]:nodePort frontend, one to a 127.0.0.0/8 address an IPv4 endpoint
/// through 0.0.0.0:nodePort, and a UDP reply to ::1 comes from
/// [::1]:nodePort (`IPV6_PKTINFO`). An IPv4-only service gets no [::]
/// listener. Skipped where the host has IPv6 disabled.
#[test]
fn node_ports_without_node_ip_answer_on_ipv6_too() {
    let k = 22;
    let v6_port = 9122;
    let Some(v6_accepted) = start_ipv6_backend(v6_port) else {
        println!("SKIPPED: IPv6 is disabled on this host (cannot bind [::1])");
        return;
    };
    let backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("np.yaml");
    let mut m = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: default}}\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 127.78.0.{k}\n  clusterIPs: [127.78.0.{k}, \"fd00:78::{k}\"]\n  ports:\n  - {{name: tcp, port: 8000, targetPort: 9000, protocol: TCP, nodePort: 300{k}}}\n  - {{name: udp, port: 8000, targetPort: 9000, protocol: UDP, nodePort: 300{k}}}\n"
    );
    m.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np-4\n  namespace: default\n  labels: {{kubernetes.io/service-name: np}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 9000, protocol: TCP}}\n- {{name: udp, port: 9000, protocol: UDP}}\nendpoints:\n- addresses: [\"10.244.{k}.1\"]\n- addresses: [\"10.244.{k}.2\"]\n- addresses: [\"10.244.{k}.3\"]\n"
    ));
    m.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: np-6\n  namespace: default\n  labels: {{kubernetes.io/service-name: np}}\naddressType: IPv6\nports:\n- {{name: tcp, port: {v6_port}, protocol: TCP}}\n- {{name: udp, port: {v6_port}, protocol: UDP}}\nendpoints:\n- addresses: [\"fd00:244:{k}::1\"]\n"
    ));
    m.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: v4only, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 127.78.1.{k}\n  ports:\n  - {{name: tcp, port: 8000, targetPort: 9000, protocol: TCP, nodePort: 301{k}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: v4only-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: v4only}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 9000, protocol: TCP}}\nendpoints:\n- addresses: [\"10.244.{k}.1\"]\n"
    ));
    write_file(&file, &m, None);
    // The IPv6 cluster IP is listened on at ::1 (its own port: nothing
    // else here uses [::1]:80K); the IPv6 endpoint is dialled on ::1.
    let proxy = Proxy::start_with_cidr(
        k,
        &file,
        "127.78.0.0/16,fd00:78::/112",
        &[
            "--mode",
            "ipvs",
            "--connect-map",
            &format!("fd00:244:{k}::/120=::1/128"),
            "--listen-map",
            &format!("fd00:78::{k}/128=::1/128"),
        ],
    );
    proxy.wait_line(|l| l.starts_with("listener opened tcp 0.0.0.0:30022 service=default/np:tcp"));
    proxy.wait_line(|l| l.starts_with("listener opened tcp [::]:30022 service=default/np:tcp"));
    proxy.wait_line(|l| l.starts_with("listener opened udp [::]:30022 service=default/np:udp"));
    proxy.wait_line(|l| {
        l.starts_with("listener opened tcp 0.0.0.0:30122 service=default/v4only:tcp")
    });

    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 30022);
    for i in 0..3 {
        let mut s = TcpStream::connect_timeout(&v6, WAIT).expect("connect to [::1]:nodePort");
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut id = [0u8; 1];
        s.read_exact(&mut id).expect("backend greeting");
        assert_eq!(id[0], b'6', "an IPv6 client reaches the IPv6 endpoint");
        echo(&mut s, &payload(i));
    }
    assert_eq!(v6_accepted.load(Ordering::SeqCst), 3);
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 5, 9)), 30022);
    let (mut s, id) = open_to(v4, client(0));
    assert!(
        (1..=3).contains(&id),
        "an IPv4 client reaches an IPv4 endpoint: {id}"
    );
    echo(&mut s, b"over IPv4");
    drop(s);
    assert_eq!(backends.counts().iter().sum::<usize>(), 1);
    let done = proxy.wait_lines(4, |l| l.starts_with("conn proto=tcp"));
    assert_eq!(
        done.iter()
            .filter(|l| l.contains("frontend=[::]:30022")
                && l.contains("backend=[fd00:244:22::1]:9122"))
            .count(),
        3,
        "{done:?}"
    );
    assert_eq!(
        done.iter()
            .filter(|l| l.contains("frontend=0.0.0.0:30022"))
            .count(),
        1,
        "{done:?}"
    );

    // The IPv6 cluster IP (listened on at ::1 through --listen-map).
    let cluster6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 8000);
    let mut s =
        TcpStream::connect_timeout(&cluster6, WAIT).expect("connect to the IPv6 cluster IP");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut id = [0u8; 1];
    s.read_exact(&mut id).expect("backend greeting");
    assert_eq!(id[0], b'6');
    echo(&mut s, b"over the IPv6 cluster IP");
    drop(s);

    // UDP through [::]:nodePort: the reply comes from the address sent to.
    let u = UdpSocket::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0)).unwrap();
    u.set_read_timeout(Some(WAIT)).unwrap();
    for _ in 0..2 {
        u.send_to(b"to an IPv6 wildcard node port", v6).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = u.recv_from(&mut buf).expect("udp reply");
        assert_eq!(from, v6, "the reply comes from the address sent to");
        assert_eq!(&buf[..n], b"6to an IPv6 wildcard node port");
    }

    // The IPv4-only service has no IPv6 listener: nothing answers on
    // [::1]:301K.
    let lines = proxy.lines.0.lock().unwrap().clone();
    assert!(!lines.iter().any(|l| l.contains("[::]:30122")), "{lines:?}");
    assert!(
        TcpStream::connect_timeout(
            &SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 30122),
            WAIT
        )
        .is_err()
    );
    assert!(proxy.stop().success());
}

/// A LoadBalancer service `lb` with externalTrafficPolicy Local, node port
/// 310K, health-check node port 320K, load-balancer IP 203.0.113.9, and
/// endpoint 10.244.K.1 on `ep_node`.
fn local_manifest(k: u8, ep_node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 127.78.0.{k}\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 320{k}\n  ports:\n  - {{name: tcp, port: 8000, targetPort: 9000, protocol: TCP, nodePort: 310{k}}}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 203.0.113.9}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: lb-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: lb}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 9000, protocol: TCP}}\nendpoints:\n- addresses: [\"10.244.{k}.1\"]\n  nodeName: {ep_node}\n"
    )
}

#[test]
fn local_service_health_check_follows_reloads_and_its_node_port_drops() {
    let k = 16;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("lb.yaml");
    write_file(&file, &local_manifest(k, "node-a"), None);
    let ip1 = node_ip(k, 1).to_string();
    let healthz_addr = SocketAddr::new(IpAddr::V4(node_ip(k, 2)), 10256);
    let proxy = Proxy::start(
        k,
        &file,
        &[
            "--node",
            "node-a",
            "--node-ip",
            &ip1,
            "--healthz-addr",
            &healthz_addr.to_string(),
            "--listen-map",
            &format!("203.0.113.0/24=127.79.{k}.0/24"),
        ],
    );
    let health = SocketAddr::new(IpAddr::V4(node_ip(k, 1)), 32016);
    let node_port = SocketAddr::new(IpAddr::V4(node_ip(k, 1)), 31016);
    let lb = SocketAddr::new(IpAddr::V4(node_ip(k, 9)), SERVICE_PORT);

    // The endpoint is on this node: 200, one local endpoint.
    let (status, headers, body) = http_get(health, "/");
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
    assert_eq!(
        header(&headers, "x-load-balancing-endpoint-weight"),
        Some("1")
    );
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"lb\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
    );
    // The node port and the load-balancer IP reach it.
    for (i, dst) in [node_port, lb].into_iter().enumerate() {
        let (mut s, id) = open_to(dst, client(i));
        assert_eq!(id, 1);
        echo(&mut s, &payload(i));
    }
    // The node's /healthz.
    let (status, headers, body) = http_get(healthz_addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert!(body.ends_with(", \"nodeEligible\": true}"), "{body}");
    assert!(body.starts_with("{\"lastUpdated\": \""), "{body}");
    assert_eq!(http_get(healthz_addr, "/other").0, 404);

    // Reload: the endpoint moves to another node.
    write_file(&file, &local_manifest(k, "node-b"), None);
    proxy.signal("-HUP");
    proxy.wait_line(|l| l.starts_with("reload ok "));
    let (status, headers, body) = http_get(health, "/");
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        header(&headers, "x-load-balancing-endpoint-weight"),
        Some("0")
    );
    assert!(body.contains("\"localEndpoints\": 0,"), "{body}");
    // No local endpoint: the node port drops the connection, which the
    // client sees closed without a byte (the proxy has accepted it: it
    // cannot stay silent to the SYN).
    for i in 0..3 {
        let sock = socket_from(client(10 + i));
        sock.connect(&node_port.into())
            .expect("the listener accepts");
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).expect("a clean close, not a reset"), 0);
    }
    proxy.wait_lines(3, |l| {
        l.starts_with("conn proto=tcp")
            && l.contains("frontend=127.79.16.1:31016")
            && l.ends_with("end=drop")
    });

    // The service goes: its health-check node port closes.
    write_file(
        &file,
        &manifest(k, &[1], false).replace("127.78.0.16", "127.78.0.116"),
        None,
    );
    proxy.signal("-HUP");
    proxy.wait_line(|l| {
        l.starts_with("health listener closed 127.79.16.1:32016 service=default/lb")
    });
    // The listener's task is cancelled after the line: wait (bounded)
    // for the port to refuse.
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpStream::connect_timeout(&health, WAIT) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
            r => assert!(Instant::now() < deadline, "health check still open: {r:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proxy.stop().success());
}

#[test]
fn load_balancer_source_ranges_drop_other_clients() {
    let k = 17;
    let _backends = start_backends(k);
    let dir = temp_dir(k);
    let file = dir.join("lb.yaml");
    let m = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: fw, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 127.78.0.{k}\n  loadBalancerSourceRanges: [\"127.0.0.2/32\"]\n  ports:\n  - {{name: tcp, port: 8000, targetPort: 9000, protocol: TCP, nodePort: 310{k}}}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 203.0.113.9}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: fw-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: fw}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 9000, protocol: TCP}}\nendpoints:\n- addresses: [\"10.244.{k}.1\"]\n"
    );
    write_file(&file, &m, None);
    let proxy = Proxy::start(
        k,
        &file,
        &["--listen-map", &format!("203.0.113.0/24=127.79.{k}.0/24")],
    );
    let lb = SocketAddr::new(IpAddr::V4(node_ip(k, 9)), SERVICE_PORT);
    // Inside the ranges: served.
    let (mut s, id) = open_to(lb, Ipv4Addr::new(127, 0, 0, 2));
    assert_eq!(id, 1);
    echo(&mut s, b"allowed");
    // Outside: dropped, closed without a byte.
    let sock = socket_from(Ipv4Addr::new(127, 0, 0, 3));
    sock.connect(&lb.into()).expect("the listener accepts");
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).expect("a clean close, not a reset"), 0);
    proxy.wait_line(|l| {
        l.starts_with("conn proto=tcp client=127.0.0.3:")
            && l.contains("frontend=203.0.113.9:8000")
            && l.ends_with("end=drop")
    });
    assert!(proxy.stop().success());
}
