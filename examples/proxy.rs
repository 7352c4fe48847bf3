//! `proxy`: a userspace L4 proxy (kube-proxy's old userspace mode, done on
//! svclb's connection layer). It loads Service and EndpointSlice manifests
//! with the same loader and flags as `examples/svclb.rs`, listens on every
//! TCP and UDP frontend of the plan (each cluster IP:port, external IP:port
//! and load-balancer IP:port, and each node IP:nodePort of `--node-ip`
//! inside `--nodeport-addresses`; without either flag, node ports on
//! 0.0.0.0 and [::], every local address, as kube-proxy accepts them), and carries
//! real connections to the backends the dataplane chooses.
//!
//! ```sh
//! cargo run --release --example proxy -- --manifests PATH... [--watch FILE|-] \
//!     [--mode iptables|nftables|ipvs] [--scheduler NAME] [--metrics ADDR] [--log info|debug] \
//!     [--node-ip IP]... [--nodeport-addresses CIDR[,CIDR]] [--healthz-addr ADDR]
//! ```
//!
//! - Health checks: each `externalTrafficPolicy: Local` service with a
//!   `healthCheckNodePort` is answered over HTTP on every node-port IP at
//!   that port with `svclb::k8s::health::service_health` (200 with this
//!   node's ready endpoints, else 503), kept current across reloads;
//!   `--healthz-addr` serves the node's `/healthz` (and `/livez`) with
//!   `svclb::k8s::health::healthz` (kube-proxy's port 10256).
//! - `--listen-map FROM_CIDR=TO_CIDR` binds frontends of FROM at the same
//!   offset in TO (the API refuses loopback external IPs, so local tests
//!   listen for them on 127.0.0.0/8 stand-ins); flows keep the frontend's
//!   own address.
//! - The dataplane's connection tracker is the flow table: every accepted
//!   connection is routed (`Dataplane::route`, source = the client's
//!   IP:port, destination = the frontend), its handshake, half-closes and
//!   end are reported (`Dataplane::packet` / `reply` with TCP flags,
//!   `Dataplane::connection_closed`), and timers run from
//!   `poll_timeout`/`handle_timeout`. The proxy keeps one task per
//!   connection or UDP session and no map of its own from flows to
//!   backends.
//! - A failed connect to a backend is counted and the flow routed again
//!   with `Dataplane::route_excluding`, without the backends that failed
//!   (at most [`MAX_CONNECT_ATTEMPTS`] tries): the failed attempt leaves no
//!   tracked connection, every scheduler (sh and mh too) and a ClientIP pin
//!   move on to another backend, and the dataplane never offers a draining
//!   or removed backend to a new connection.
//! - Reject (no endpoints): the accepted connection is reset (SO_LINGER 0).
//!   Drop: it is closed without a byte read or written (a userspace proxy
//!   has already completed the handshake; it cannot stay silent to a SYN).
//! - Each TCP connection looks itself up once a second: traffic since the
//!   last look is reported (`Dataplane::packet` / `reply` with ACK, which
//!   restarts the tracker's timer as a packet does), otherwise the entry is
//!   only looked at (`Dataplane::peek`). A connection whose backend was
//!   removed keeps working while it drains, and is closed (reset) once the
//!   dataplane drops it (the drain grace passed: `expire_nodest_conn`);
//!   an idle or half-closed one is closed once its state's timeout passes
//!   (`--tcp-timeout`, `--tcp-fin-timeout`).
//! - TCP bytes move with `splice(2)` (socket to pipe to socket, no copy
//!   through userspace; `--copy splice`, the default on Linux) or through
//!   a buffer (`--copy userspace`); README "The userspace proxy" has the
//!   measured comparison.
//! - UDP: one session per client address, with a socket connected to the
//!   backend; replies go out of the socket bound to the service address.
//!   A session ends when the tracker has expired its flow (the mode's UDP
//!   timeout, `--udp-timeout` to change it).
//! - Reload: SIGHUP, a change of a manifest file (mtimes and sizes polled
//!   every 500 ms), and `--watch` input as it arrives (a file is followed
//!   as it grows, `-` reads standard input; continuous input must be JSON
//!   watch events as `kubectl ... --watch --output-watch-events -o json`
//!   prints them). A reload loads the manifests again (objects gone from
//!   the files are deleted, `examples/shared/owned.rs`; an object only a
//!   watch event brought is left alone), applies the difference to the table and
//!   `Dataplane::sync`s it; open connections survive, new listeners open,
//!   removed ones close.
//! - Log lines (standard output, one per line, `key=value` fields) are
//!   documented in the README ("The userspace proxy").

#[path = "shared/load.rs"]
mod load;
#[path = "shared/owned.rs"]
mod owned;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant as WallClock, SystemTime};

use clap::{Parser, ValueEnum};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use svclb::k8s::health::{HealthResponse, healthz, service_health};
use svclb::k8s::loader::{LoadOptions, LoadReport, Loader};
use svclb::plan::NodeAddresses;
use svclb::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Routes tried for one connection before it is refused.
const MAX_CONNECT_ATTEMPTS: usize = 4;
/// How long a connect to a backend may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an open connection asks the tracker whether it may go on.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often manifest files and followed watch files are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// The copy buffer per direction of a TCP connection.
const BUF: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// kube-proxy's iptables mode (random cascade).
    Iptables,
    /// kube-proxy's nftables mode (`numgen random mod N`).
    Nftables,
    /// kube-proxy's IPVS mode (the --scheduler flag applies).
    Ipvs,
}

/// `--copy`: how the bytes of a TCP connection move between its sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CopyMode {
    /// `splice(2)`: socket to pipe to socket inside the kernel, no copy
    /// through userspace (Linux).
    Splice,
    /// `read` into a buffer, `write` it out.
    Userspace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum LogLevel {
    /// One line per connection, reload and listener.
    Info,
    /// Also every routing decision and connect failure.
    Debug,
}

#[derive(Debug, Parser)]
#[command(
    name = "proxy",
    about = "A userspace L4 proxy for Kubernetes Services on svclb's dataplanes"
)]
struct Cli {
    /// Manifest files or directories (`--manifests A B C`, or the flag
    /// repeated); reloaded on SIGHUP and when a file changes.
    #[arg(long, required_unless_present = "watch", num_args = 1.., action = clap::ArgAction::Append, value_name = "PATH...")]
    manifests: Vec<PathBuf>,
    /// A watch stream (`kubectl get services,endpointslices -A --watch
    /// --output-watch-events -o json`), `-` for standard input; followed
    /// as it grows. Repeatable.
    #[arg(long, action = clap::ArgAction::Append, value_name = "FILE|-")]
    watch: Vec<PathBuf>,
    /// Dataplane mode.
    #[arg(long, value_enum, default_value = "iptables")]
    mode: ModeArg,
    /// IPVS scheduler: rr, wrr, lc, wlc, sh, sh-port, mh, mh-port, random.
    #[arg(long, default_value = "rr")]
    scheduler: String,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Log level.
    #[arg(long, value_enum, default_value = "info")]
    log: LogLevel,
    /// Seed of the dataplane's random source.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// On SIGINT/SIGTERM, how long open connections may drain (seconds).
    #[arg(long, default_value_t = 5.0)]
    drain_timeout: f64,
    /// How long a removed backend's connections may drain (seconds).
    #[arg(long, default_value_t = 900.0)]
    drain_grace: f64,
    /// The UDP session timeout (seconds); the mode's own by default.
    #[arg(long)]
    udp_timeout: Option<f64>,
    /// The timeout of an idle established TCP connection (seconds;
    /// kube-proxy's --ipvs-tcp-timeout, --conntrack-tcp-timeout-established);
    /// the mode's own by default.
    #[arg(long)]
    tcp_timeout: Option<f64>,
    /// The timeout of a half-closed TCP connection, FIN_WAIT, CLOSE_WAIT
    /// and LAST_ACK (seconds; kube-proxy's --ipvs-tcpfin-timeout,
    /// --conntrack-tcp-timeout-close-wait); the mode's own by default.
    #[arg(long)]
    tcp_fin_timeout: Option<f64>,
    /// How TCP bytes move: splice (zero copy, the default on Linux) or
    /// userspace (read and write through a buffer).
    #[arg(long, value_enum, default_value = "splice")]
    copy: CopyMode,
    /// Dial endpoints of FROM_CIDR at the same offset in TO_CIDR instead
    /// (`10.244.0.0/24=127.0.1.0/24`): the API forbids loopback endpoint
    /// addresses, so local stand-ins for a cluster's pods go through this.
    /// Repeatable; IPv4 and IPv6 (same family on both sides). Metrics and
    /// logs name the endpoint address.
    #[arg(long, value_name = "FROM_CIDR=TO_CIDR", action = clap::ArgAction::Append)]
    connect_map: Vec<String>,
    /// Listen on frontends of FROM_CIDR at the same offset in TO_CIDR
    /// instead (`203.0.113.0/24=127.79.0.0/24`): the API forbids loopback
    /// external IPs, so local stand-ins for them go through this. The
    /// dataplane still sees the frontend's own address. Repeatable.
    #[arg(long, value_name = "FROM_CIDR=TO_CIDR", action = clap::ArgAction::Append)]
    listen_map: Vec<String>,
    /// Worker threads of the runtime (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Serve the node's health check (`/healthz`, `/livez`: kube-proxy's
    /// `--healthz-bind-address`, port 10256) at http://ADDR.
    #[arg(long, value_name = "ADDR")]
    healthz_addr: Option<SocketAddr>,
    #[command(flatten)]
    load: load::LoadArgs,
    #[command(flatten)]
    node_addrs: load::NodeAddrArgs,
}

/// The proxy's metrics.
struct Metrics {
    registry: Registry,
    connections: Family<Vec<(String, String)>, Counter>,
    active: Family<Vec<(String, String)>, Gauge>,
    bytes: Family<Vec<(String, String)>, Counter>,
    connect_errors: Family<Vec<(String, String)>, Counter>,
    reloads: Counter,
    tracked: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            connections: Family::default(),
            active: Family::default(),
            bytes: Family::default(),
            connect_errors: Family::default(),
            reloads: Counter::default(),
            tracked: Gauge::default(),
        };
        registry.register(
            "svclb_proxy_connections",
            "Connections (TCP) and sessions (UDP) forwarded, per service and backend",
            m.connections.clone(),
        );
        registry.register(
            "svclb_proxy_active_connections",
            "Open connections and sessions per service",
            m.active.clone(),
        );
        registry.register(
            "svclb_proxy_bytes",
            "Bytes carried per service; direction is in (client to backend) or out",
            m.bytes.clone(),
        );
        registry.register(
            "svclb_proxy_connect_errors",
            "Failed connects to a backend, per service and backend",
            m.connect_errors.clone(),
        );
        registry.register(
            "svclb_proxy_reloads",
            "Reloads applied (SIGHUP, file changes, watch input)",
            m.reloads.clone(),
        );
        registry.register(
            "svclb_proxy_tracked_connections",
            "Connections the dataplane's tracker holds",
            m.tracked.clone(),
        );
        Metrics { registry, ..m }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// What every task shares.
struct Shared {
    dp: Box<dyn Dataplane>,
    start: WallClock,
    metrics: Metrics,
    log: LogLevel,
    /// Open TCP connections (for the shutdown drain).
    open: AtomicUsize,
    /// `--connect-map`.
    connect_map: Vec<(svclb::render::Cidr, svclb::render::Cidr)>,
    /// When the dataplane was last synced (time since the Unix epoch), for
    /// `/healthz`.
    last_sync: parking_lot::Mutex<Duration>,
    /// `--copy`.
    copy: CopyMode,
}

/// Time since the Unix epoch.
fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

impl Shared {
    /// The dataplane's clock: time since start.
    fn now(&self) -> Instant {
        Instant::from_nanos(self.start.elapsed().as_nanos() as u64)
    }

    /// The address to dial for endpoint `addr` (`--connect-map`).
    fn dial(&self, addr: SocketAddr) -> SocketAddr {
        map_addr(&self.connect_map, addr)
    }

    fn debug(&self, line: std::fmt::Arguments<'_>) {
        if self.log >= LogLevel::Debug {
            println!("{line}");
        }
    }
}

/// `addr` moved by the first of `map`'s `FROM_CIDR=TO_CIDR` pairs that
/// holds it, to the same offset in `TO_CIDR`.
fn map_addr(map: &[(svclb::render::Cidr, svclb::render::Cidr)], addr: SocketAddr) -> SocketAddr {
    for (from, to) in map {
        if !from.contains(addr.ip()) {
            continue;
        }
        let ip = match (addr.ip(), to.addr()) {
            (IpAddr::V4(a), IpAddr::V4(t)) => {
                let host = u32::MAX
                    .checked_shr(u32::from(from.prefix_len()))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(
                    (u32::from(t) & !host) | (u32::from(a) & host),
                ))
            }
            (IpAddr::V6(a), IpAddr::V6(t)) => {
                let host = u128::MAX
                    .checked_shr(u32::from(from.prefix_len()))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(
                    (u128::from(t) & !host) | (u128::from(a) & host),
                ))
            }
            _ => continue,
        };
        return SocketAddr::new(ip, addr.port());
    }
    addr
}

/// One listener's frontend.
struct FrontendInfo {
    key: FrontendKey,
    /// `namespace/name[:port-name]`, the metrics' `service` label.
    service: String,
    /// This frontend's number, unique over the process's life: the key of
    /// its series in [`count_connection`]'s per-thread cache.
    id: u64,
    /// ` service=S frontend=F` of its connections' log lines, formatted
    /// once.
    log_tail: String,
    /// Its series of the per-service metrics, looked up once.
    active: Gauge,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl FrontendInfo {
    fn new(metrics: &Metrics, key: FrontendKey, service: String) -> Self {
        let active = metrics
            .active
            .get_or_create(&labels(&[("service", &service)]))
            .clone();
        let bytes = |d: &str| {
            metrics
                .bytes
                .get_or_create(&labels(&[("service", &service), ("direction", d)]))
                .clone()
        };
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        FrontendInfo {
            key,
            active,
            bytes_in: bytes("in"),
            bytes_out: bytes("out"),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            log_tail: format!(" service={service} frontend={}", key.socket_addr()),
            service,
        }
    }
}

/// One connection's record, logged and counted at its end.
struct ConnEnd<'a> {
    fe: &'a FrontendInfo,
    client: SocketAddr,
    backend: Option<SocketAddr>,
    bytes_in: u64,
    bytes_out: u64,
    started: WallClock,
    end: &'a str,
}

/// Connection log lines not yet written: one write per flush
/// ([`LOG_FLUSH`]) instead of a `write(2)` per connection.
static CONN_LOG: parking_lot::Mutex<String> = parking_lot::Mutex::new(String::new());
/// How often the connection log is written out.
const LOG_FLUSH: Duration = Duration::from_millis(100);

/// Writes the buffered connection log lines to standard output. `spare`
/// is an empty buffer swapped in for them (and given back empty, its
/// capacity kept), so that the log does not grow a new buffer after each
/// flush.
fn flush_conn_log(spare: &mut String) {
    std::mem::swap(&mut *CONN_LOG.lock(), spare);
    if !spare.is_empty() {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(spare.as_bytes());
        let _ = out.flush();
    }
    spare.clear();
}

/// Appends `v` in decimal.
fn push_u64(out: &mut String, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[i..]).unwrap_or("?"));
}

/// Appends `addr` as `Display` writes it (IPv4 by hand: the formatter's
/// generic path was a tenth of the proxy's own CPU per connection).
fn push_addr(out: &mut String, addr: SocketAddr) {
    use std::fmt::Write as _;
    match addr {
        SocketAddr::V4(a) => {
            for (i, o) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, u64::from(o));
            }
            out.push(':');
            push_u64(out, u64::from(a.port()));
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

thread_local! {
    /// One log line being formatted (outside the log's lock).
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn log_conn(c: &ConnEnd<'_>) {
    c.fe.bytes_in.inc_by(c.bytes_in);
    c.fe.bytes_out.inc_by(c.bytes_out);
    LINE.with(|line| {
        let mut l = line.borrow_mut();
        l.clear();
        l.push_str("conn proto=");
        l.push_str(c.fe.key.protocol.as_lower_str());
        l.push_str(" client=");
        push_addr(&mut l, c.client);
        l.push_str(&c.fe.log_tail);
        l.push_str(" backend=");
        match c.backend {
            Some(b) => push_addr(&mut l, b),
            None => l.push('-'),
        }
        l.push_str(" bytes_in=");
        push_u64(&mut l, c.bytes_in);
        l.push_str(" bytes_out=");
        push_u64(&mut l, c.bytes_out);
        l.push_str(" duration_ms=");
        push_u64(&mut l, c.started.elapsed().as_millis() as u64);
        l.push_str(" end=");
        l.push_str(c.end);
        l.push('\n');
        CONN_LOG.lock().push_str(&l);
    });
}

/// Counts a connection (or UDP session) of `fe` to `backend` in
/// `svclb_proxy_connections_total`. The series is looked up in the
/// metrics family once per worker thread, frontend and backend, then kept
/// in a per-thread cache: a connection then costs one counter increment,
/// not the label strings, their hash and the family's lock.
fn count_connection(sh: &Shared, fe: &FrontendInfo, backend: SocketAddr) {
    thread_local! {
        static SERIES: std::cell::RefCell<HashMap<(u64, SocketAddr), Counter>> =
            std::cell::RefCell::new(HashMap::new());
    }
    /// Cached series per thread before the cache starts over.
    const MAX_SERIES: usize = 4096;
    SERIES.with(|series| {
        let mut series = series.borrow_mut();
        if let Some(c) = series.get(&(fe.id, backend)) {
            c.inc();
            return;
        }
        if series.len() >= MAX_SERIES {
            series.clear();
        }
        let c = sh
            .metrics
            .connections
            .get_or_create(&labels(&[
                ("service", &fe.service),
                ("backend", &backend.to_string()),
            ]))
            .clone();
        c.inc();
        series.insert((fe.id, backend), c);
    });
}

/// Resets a TCP connection: SO_LINGER 0, then close.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Counts a connection open for as long as it lives.
/// TCP connections count toward the shutdown drain; UDP sessions, which
/// never close, do not.
struct OpenGuard<'a> {
    sh: &'a Shared,
    fe: &'a FrontendInfo,
    drains: bool,
}

impl<'a> OpenGuard<'a> {
    fn new(sh: &'a Shared, fe: &'a FrontendInfo, drains: bool) -> Self {
        if drains {
            sh.open.fetch_add(1, Ordering::Relaxed);
        }
        fe.active.inc();
        OpenGuard { sh, fe, drains }
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if self.drains {
            self.sh.open.fetch_sub(1, Ordering::Relaxed);
        }
        self.fe.active.dec();
    }
}

/// A frontend's TCP listener. `TCP_NODELAY` is set here once: Linux
/// copies it into every accepted socket. An IPv6 listener takes IPv6 only
/// (`IPV6_V6ONLY`), so `[::]:nodePort` and `0.0.0.0:nodePort` are two
/// listeners side by side whatever `net.ipv6.bindv6only` says.
fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SockProtocol::TCP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_tcp_nodelay(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// A frontend's UDP socket (IPv6 only on an IPv6 address, as
/// [`tcp_listener`]).
fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
    let s = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(SockProtocol::UDP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

async fn accept_tcp(sh: Arc<Shared>, fe: Arc<FrontendInfo>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(serve_tcp(Arc::clone(&sh), Arc::clone(&fe), stream, peer));
            }
            Err(e) => {
                eprintln!("proxy: accept on {}: {e}", fe.key);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connects `flow` to a backend: routes, connects, and on failure asks
/// the dataplane for another backend without the failed ones
/// (`Dataplane::route_excluding`: the failed attempt leaves no tracked
/// connection, and a ClientIP pin moves to the new backend).
async fn connect_backend(
    sh: &Shared,
    fe: &FrontendInfo,
    flow: &Flow,
) -> Result<(TcpStream, Forward), &'static str> {
    let mut failed = [BackendId(0); MAX_CONNECT_ATTEMPTS];
    let mut tried = 0;
    while tried < MAX_CONNECT_ATTEMPTS {
        let v = if tried == 0 {
            sh.dp.route(flow, sh.now())
        } else {
            sh.dp.route_excluding(flow, &failed[..tried], sh.now())
        };
        sh.debug(format_args!("route {flow} {v}"));
        let fw = match v {
            Verdict::Forward(fw) => fw,
            Verdict::Reject if tried > 0 => break,
            Verdict::Reject => return Err("reject"),
            Verdict::Drop => return Err("drop"),
            _ => return Err("not-a-service"),
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(sh.dial(fw.backend))).await {
            Ok(Ok(s)) => return Ok((s, fw)),
            Ok(Err(e)) => sh.debug(format_args!("connect {} for {flow}: {e}", fw.backend)),
            Err(_) => sh.debug(format_args!("connect {} for {flow}: timed out", fw.backend)),
        }
        sh.metrics
            .connect_errors
            .get_or_create(&labels(&[
                ("service", &fe.service),
                ("backend", &fw.backend.to_string()),
            ]))
            .inc();
        failed[tried] = fw.backend_id;
        tried += 1;
    }
    // Every backend failed (or the attempts ran out): the last attempt's
    // entry goes too.
    sh.dp.connection_closed(flow, sh.now());
    Err("connect-failed")
}

async fn serve_tcp(
    sh: Arc<Shared>,
    fe: Arc<FrontendInfo>,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let started = WallClock::now();
    let flow = Flow::tcp(peer, fe.key.socket_addr());
    let open = OpenGuard::new(&sh, &fe, true);
    let (mut backend, fw) = match connect_backend(&sh, &fe, &flow).await {
        Ok(x) => x,
        Err(end) => {
            if end == "drop" {
                drop(client);
            } else {
                reset(client);
            }
            drop(open);
            log_conn(&ConnEnd {
                fe: &fe,
                client: peer,
                backend: None,
                bytes_in: 0,
                bytes_out: 0,
                started,
                end,
            });
            return;
        }
    };
    // The client's TCP_NODELAY comes from the listener (Linux copies it
    // into every accepted socket): one setsockopt per connection, not two.
    let _ = backend.set_nodelay(true);
    count_connection(&sh, &fe, fw.backend);
    // The handshake as the tracker sees it: SYN (route), then the ACK:
    // ESTABLISHED (lc counts it active).
    sh.dp.packet(&flow, TcpFlags::ACK, sh.now());
    let reply = Flow::tcp(fw.backend, peer);

    let bytes_in = AtomicU64::new(0);
    let bytes_out = AtomicU64::new(0);
    // The directions' ends of file ([`forward_eof`]): only a first one
    // that stays alone shuts its peer down for writing (the half-close),
    // and only that one is reported as a FIN (FIN_WAIT, CLOSE_WAIT: the
    // tracker times a half-open connection). Otherwise both sockets
    // close, the closes send the FINs, and `connection_closed` tells the
    // connection layer: two lookups per connection fewer.
    let eofs = AtomicU8::new(0);
    // Once a second the connection looks itself up. Traffic since the last
    // look is reported as the packets it was (their ACKs), which restarts
    // the tracker's timer as any packet does in the kernel; an idle or
    // half-closed connection is only looked at (`Dataplane::peek`), so its
    // state's timer (ESTABLISHED, FIN_WAIT, CLOSE_WAIT) runs on, and once
    // it passes the connection ends. A backend removed past its drain
    // grace is no longer found either (`expire_nodest_conn`).
    let check = async {
        // The first tick a second from now, not now: an `interval`'s
        // immediate first tick registers a timer that is already due,
        // which wakes the runtime's driver (an eventfd write per
        // connection).
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + CHECK_INTERVAL, CHECK_INTERVAL);
        let (mut seen_in, mut seen_out) = (0, 0);
        loop {
            tick.tick().await;
            let now = sh.now();
            let (b_in, b_out) = (
                bytes_in.load(Ordering::Relaxed),
                bytes_out.load(Ordering::Relaxed),
            );
            if b_in != seen_in {
                seen_in = b_in;
                match sh.dp.packet(&flow, TcpFlags::ACK, now) {
                    Verdict::Forward(f) if f.tracked && f.backend_id == fw.backend_id => {}
                    _ => return,
                }
            }
            if b_out != seen_out {
                seen_out = b_out;
                sh.dp.reply(&reply, TcpFlags::ACK, now);
            }
            match sh.dp.peek(&flow, now) {
                Some(t) if t.backend == fw.backend_id => {}
                _ => return,
            }
        }
    };
    let end = match sh.copy {
        CopyMode::Userspace => {
            let (mut cr, mut cw) = client.split();
            let (mut br, mut bw) = backend.split();
            let c2s = pump(&mut cr, &mut bw, &bytes_in, async || {
                let half = forward_eof(&eofs).await;
                if half {
                    sh.dp.packet(&flow, TcpFlags::FIN | TcpFlags::ACK, sh.now());
                }
                half
            });
            let s2c = pump(&mut br, &mut cw, &bytes_out, async || {
                let half = forward_eof(&eofs).await;
                if half {
                    sh.dp.reply(&reply, TcpFlags::FIN | TcpFlags::ACK, sh.now());
                }
                half
            });
            relay(c2s, s2c, check).await
        }
        CopyMode::Splice => {
            let c2s = splice_pump(&client, &backend, &bytes_in, async || {
                let half = forward_eof(&eofs).await;
                if half {
                    sh.dp.packet(&flow, TcpFlags::FIN | TcpFlags::ACK, sh.now());
                }
                half
            });
            let s2c = splice_pump(&backend, &client, &bytes_out, async || {
                let half = forward_eof(&eofs).await;
                if half {
                    sh.dp.reply(&reply, TcpFlags::FIN | TcpFlags::ACK, sh.now());
                }
                half
            });
            relay(c2s, s2c, check).await
        }
    };
    if end != "closed" {
        reset(client);
        reset(backend);
    }
    sh.dp.connection_closed(&flow, sh.now());
    drop(open);
    log_conn(&ConnEnd {
        fe: &fe,
        client: peer,
        backend: Some(fw.backend),
        bytes_in: bytes_in.load(Ordering::Relaxed),
        bytes_out: bytes_out.load(Ordering::Relaxed),
        started,
        end,
    });
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A UDP session's state shared between the listener and its task.
struct UdpSession {
    socket: UdpSocket,
    backend: parking_lot::Mutex<SocketAddr>,
    /// On a wildcard (0.0.0.0 or [::]) listener: the local address the
    /// client last sent to, which replies leave from (`IP_PKTINFO`,
    /// `IPV6_PKTINFO`); None otherwise.
    local: parking_lot::Mutex<Option<IpAddr>>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

type Sessions = Arc<parking_lot::Mutex<HashMap<SocketAddr, Arc<UdpSession>>>>;

async fn serve_udp(sh: Arc<Shared>, fe: Arc<FrontendInfo>, socket: UdpSocket, udp_check: Duration) {
    let socket = Arc::new(socket);
    let sessions: Sessions = Arc::default();
    // Set when this task ends (the listener is closed on a reload):
    // its sessions then end too and let go of the socket.
    let closed = Arc::new(AtomicBool::new(false));
    let _closing = SetOnDrop(Arc::clone(&closed));
    let mut buf = vec![0u8; 65536];
    // A wildcard listener (node ports without --node-ip) learns each
    // datagram's local destination address to reply from it.
    let wildcard = fe.key.addr.is_unspecified() && pktinfo::enable(&socket).is_ok();
    let mut cmsg = pktinfo::buffer();
    loop {
        let received = if wildcard {
            pktinfo::recv(&socket, &mut buf, &mut cmsg).await
        } else {
            socket.recv_from(&mut buf).await.map(|(n, p)| (n, p, None))
        };
        let (n, peer, local) = match received {
            Ok(x) => x,
            Err(e) => {
                sh.debug(format_args!("udp recv on {}: {e}", fe.key));
                continue;
            }
        };
        let flow = Flow::udp(peer, fe.key.socket_addr());
        let v = sh.dp.packet(&flow, TcpFlags::NONE, sh.now());
        let Verdict::Forward(fw) = v else {
            sh.debug(format_args!("udp {flow} {v}"));
            continue;
        };
        let existing = sessions.lock().get(&peer).cloned();
        let session = match existing {
            Some(s) => {
                *s.local.lock() = local;
                let moved = *s.backend.lock() != fw.backend;
                if moved {
                    // The tracker flushed the flow of a removed backend and
                    // balanced it afresh.
                    if s.socket.connect(sh.dial(fw.backend)).await.is_err() {
                        continue;
                    }
                    *s.backend.lock() = fw.backend;
                }
                s
            }
            None => {
                let bind: SocketAddr = if fw.backend.is_ipv4() {
                    "0.0.0.0:0".parse().expect("addr")
                } else {
                    "[::]:0".parse().expect("addr")
                };
                let Ok(us) = UdpSocket::bind(bind).await else {
                    continue;
                };
                if us.connect(sh.dial(fw.backend)).await.is_err() {
                    continue;
                }
                let s = Arc::new(UdpSession {
                    socket: us,
                    backend: parking_lot::Mutex::new(fw.backend),
                    local: parking_lot::Mutex::new(local),
                    bytes_in: AtomicU64::new(0),
                    bytes_out: AtomicU64::new(0),
                });
                sessions.lock().insert(peer, Arc::clone(&s));
                count_connection(&sh, &fe, fw.backend);
                tokio::spawn(udp_session(
                    Arc::clone(&sh),
                    Arc::clone(&fe),
                    Arc::clone(&socket),
                    Arc::clone(&sessions),
                    Arc::clone(&s),
                    peer,
                    (udp_check, Arc::clone(&closed)),
                ));
                s
            }
        };
        if session.socket.send(&buf[..n]).await.is_ok() {
            session.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

async fn udp_session(
    sh: Arc<Shared>,
    fe: Arc<FrontendInfo>,
    listener: Arc<UdpSocket>,
    sessions: Sessions,
    s: Arc<UdpSession>,
    peer: SocketAddr,
    (check, closed): (Duration, Arc<AtomicBool>),
) {
    let started = WallClock::now();
    let open = OpenGuard::new(&sh, &fe, false);
    let flow = Flow::udp(peer, fe.key.socket_addr());
    let mut buf = vec![0u8; 65536];
    let mut tick = tokio::time::interval(check);
    tick.tick().await;
    let mut end = "timeout";
    loop {
        tokio::select! {
            r = s.socket.recv(&mut buf) => {
                let Ok(n) = r else { continue };
                let backend = *s.backend.lock();
                sh.dp.reply(&Flow::udp(backend, peer), TcpFlags::NONE, sh.now());
                let local = *s.local.lock();
                let sent = if let Some(local) = local {
                    pktinfo::send(&listener, &buf[..n], peer, local).await
                } else {
                    listener.send_to(&buf[..n], peer).await
                };
                if sent.is_ok() {
                    s.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            _ = tick.tick() => {
                // The tracker's UDP timeout ends the session: once
                // handle_timeout expired the flow, it is gone.
                if closed.load(Ordering::Relaxed) {
                    end = "listener-closed";
                    break;
                }
                // One lookup of this session's own flow (`peek`: no
                // allocation, no timer restarted).
                if sh.dp.peek(&flow, sh.now()).is_none() {
                    break;
                }
            }
        }
    }
    sessions.lock().remove(&peer);
    if end != "timeout" {
        sh.dp.connection_closed(&flow, sh.now());
    }
    let backend = *s.backend.lock();
    drop(open);
    log_conn(&ConnEnd {
        fe: &fe,
        client: peer,
        backend: Some(backend),
        bytes_in: s.bytes_in.load(Ordering::Relaxed),
        bytes_out: s.bytes_out.load(Ordering::Relaxed),
        started,
        end,
    });
}

/// Runs the dataplane's timers from the wall clock.
async fn timers(sh: Arc<Shared>) {
    loop {
        let now = sh.now();
        let wait = sh.dp.poll_timeout().map_or(Duration::from_secs(1), |t| {
            t.saturating_duration_since(now)
                .clamp(Duration::from_millis(10), Duration::from_secs(1))
        });
        tokio::time::sleep(wait).await;
        sh.dp.handle_timeout(sh.now());
    }
}

/// `GET /metrics` over HTTP/1.1, one request per connection.
async fn serve_metrics(sh: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let sh = Arc::clone(&sh);
        tokio::spawn(async move {
            let Some(req) = read_request(&mut stream).await else {
                return;
            };
            let (status, body) = if req.starts_with(b"GET /metrics ") {
                sh.metrics
                    .tracked
                    .set(sh.dp.connections(sh.now()).len() as i64);
                let mut body = String::new();
                let _ = encode(&mut body, &sh.metrics.registry);
                ("200 OK", body)
            } else {
                ("404 Not Found", "not found\n".to_owned())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Reads an HTTP request head (bounded in size and time); `None` if the
/// client went away first.
async fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    (read == Ok(true)).then_some(req)
}

/// Writes `answer` as an HTTP/1.1 response and closes.
async fn write_health(stream: &mut TcpStream, answer: &HealthResponse) {
    use std::fmt::Write as _;
    let mut head = format!("HTTP/1.1 {}\r\n", answer.status_line());
    for (name, value) in &answer.headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    let _ = write!(
        head,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        answer.body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(answer.body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A service's health-check node port: any request gets the service's
/// current answer (kube-proxy's health server answers every path).
async fn serve_service_health(
    listener: TcpListener,
    answer: Arc<parking_lot::Mutex<HealthResponse>>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let answer = Arc::clone(&answer);
        tokio::spawn(async move {
            if read_request(&mut stream).await.is_some() {
                let a = answer.lock().clone();
                write_health(&mut stream, &a).await;
            }
        });
    }
}

/// `--healthz-addr`: `GET /healthz` and `/livez` (kube-proxy's node health
/// server). The proxy syncs the dataplane as each change arrives, so it is
/// healthy whenever it answers; `lastUpdated` is the last sync.
async fn serve_healthz(sh: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let sh = Arc::clone(&sh);
        tokio::spawn(async move {
            let Some(req) = read_request(&mut stream).await else {
                return;
            };
            let path = req.split(|&b| b == b' ').nth(1).unwrap_or_default();
            let path = path.split(|&b| b == b'?').next().unwrap_or_default();
            if path == b"/healthz" || path == b"/livez" {
                let last = *sh.last_sync.lock();
                write_health(&mut stream, &healthz(last, unix_now(), true, true)).await;
            } else {
                let head = "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n";
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        });
    }
}

/// An open health-check node port.
struct HealthListener {
    service: ServiceKey,
    answer: Arc<parking_lot::Mutex<HealthResponse>>,
    handle: JoinHandle<()>,
}

/// A followed watch input.
struct WatchInput {
    path: PathBuf,
    /// Bytes of the file already read.
    offset: u64,
    /// Text read but not yet a whole JSON value.
    pending: String,
}

/// The control plane: the table, the loader, the listeners.
struct Control {
    sh: Arc<Shared>,
    table: ServiceTable,
    loader: Loader,
    options: LoadOptions,
    node: NodeTopology,
    paths: Vec<PathBuf>,
    /// What the manifest files held at the last load.
    owned: BTreeSet<owned::Owned>,
    stamps: Vec<(PathBuf, Option<SystemTime>, u64)>,
    watches: Vec<WatchInput>,
    stdin_pending: String,
    listeners: BTreeMap<FrontendKey, JoinHandle<()>>,
    udp_check: Duration,
    /// `--node-ip` and `--nodeport-addresses`: where node ports answer.
    addresses: NodeAddresses,
    /// The health-check node ports, by address.
    health: BTreeMap<SocketAddr, HealthListener>,
    /// `--listen-map`.
    listen_map: Vec<(svclb::render::Cidr, svclb::render::Cidr)>,
}

/// The length of the longest prefix of `text` made of whole top-level JSON
/// values (objects or arrays), with what follows the last one.
fn json_prefix(text: &str) -> usize {
    let (mut depth, mut in_str, mut esc, mut end) = (0usize, false, false, 0usize);
    for (i, c) in text.char_indices() {
        if in_str {
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    end = i + 1;
                }
            }
            _ => {}
        }
    }
    end
}

impl Control {
    fn stamps(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        let mut out = Vec::new();
        for p in &self.paths {
            for f in Loader::manifest_files(p).unwrap_or_default() {
                let meta = std::fs::metadata(&f).ok();
                let mtime = meta.as_ref().and_then(|m| m.modified().ok());
                out.push((f, mtime, meta.map_or(0, |m| m.len())));
            }
        }
        out
    }

    fn notes(&self, report: &LoadReport) {
        for line in report.lines(self.options.verbose) {
            eprintln!("proxy: note: {line}");
        }
    }

    /// Loads the manifests again and applies the difference.
    fn reload_manifests(&mut self, source: &str) {
        self.stamps = self.stamps();
        // Read into a scratch table first: a bad file changes nothing.
        let mut scratch = ServiceTable::new();
        let mut scratch_loader = Loader::new(self.options.clone());
        if let Err(e) = scratch_loader.load(&mut scratch, &self.paths, &[]) {
            println!("reload error source={source} error={e:?}");
            eprintln!("proxy: reload ({source}) refused: {e}");
            return;
        }
        let owned = owned::owned_keys(&scratch);
        let mut sets = Vec::new();
        match self.loader.load(&mut self.table, &self.paths, &[]) {
            Ok(r) => {
                self.notes(&r);
                sets.extend(r.change_sets);
            }
            Err(e) => {
                println!("reload error source={source} error={e:?}");
                eprintln!("proxy: reload ({source}) refused: {e}");
                return;
            }
        }
        // What the previous load's files held and these do not (and a
        // watch event has not deleted already).
        let deletes = owned::deletions(&self.owned, &owned, &self.table);
        if !deletes.is_empty() {
            match self.table.apply_batch(deletes) {
                Ok(cs) => sets.push(cs),
                Err(e) => eprintln!("proxy: reload ({source}): delete refused: {e}"),
            }
        }
        self.owned = owned;
        self.apply(sets, source);
    }

    /// Applies the watch text that has arrived whole.
    fn apply_watch(&mut self, text: &str, source: &str) {
        if text.trim().is_empty() {
            return;
        }
        match self.loader.apply_watch_text(&mut self.table, text, source) {
            Ok(r) => {
                self.notes(&r);
                self.apply(r.change_sets, "watch");
            }
            Err(e) => {
                println!("reload error source=watch error={e:?}");
                eprintln!("proxy: watch input {source}: {e}");
            }
        }
    }

    /// Reads what a followed watch file has gained.
    fn poll_watches(&mut self) {
        for i in 0..self.watches.len() {
            let w = &mut self.watches[i];
            let Ok(mut f) = std::fs::File::open(&w.path) else {
                continue;
            };
            let len = f.metadata().map_or(0, |m| m.len());
            if len < w.offset {
                // Truncated: start over.
                w.offset = 0;
                w.pending.clear();
            }
            if len == w.offset {
                continue;
            }
            use std::io::Seek as _;
            if f.seek(std::io::SeekFrom::Start(w.offset)).is_err() {
                continue;
            }
            let mut bytes = Vec::new();
            if f.take(len - w.offset).read_to_end(&mut bytes).is_err() {
                continue;
            }
            w.offset += bytes.len() as u64;
            w.pending.push_str(&String::from_utf8_lossy(&bytes));
            let cut = json_prefix(&w.pending);
            let text: String = w.pending.drain(..cut).collect();
            let source = w.path.display().to_string();
            self.apply_watch(&text, &source);
        }
    }

    fn stdin_chunk(&mut self, chunk: &str) {
        self.stdin_pending.push_str(chunk);
        let cut = json_prefix(&self.stdin_pending);
        let text: String = self.stdin_pending.drain(..cut).collect();
        self.apply_watch(&text, "<stdin>");
    }

    /// Syncs the dataplane with what changed and reconciles the
    /// listeners.
    fn apply(&mut self, sets: Vec<ChangeSet>, source: &str) {
        let now = self.sh.now();
        for cs in &sets {
            if !cs.is_empty() {
                self.sh.dp.sync(&self.table, cs, now);
            }
        }
        *self.sh.last_sync.lock() = unix_now();
        self.sh.metrics.reloads.inc();
        let (opened, closed) = self.reconcile();
        println!(
            "reload ok source={source} services={} listeners={} opened={opened} closed={closed}",
            self.table.len(),
            self.listeners.len()
        );
    }

    /// Opens a listener per new TCP/UDP frontend, closes the removed ones;
    /// then the same for the health-check node ports.
    fn reconcile(&mut self) -> (usize, usize) {
        // The dataplane's frontends: the same node addresses as its config.
        let mut planner = Planner::new(self.node.clone());
        planner.set_node_addresses(self.addresses.clone());
        planner.update(
            &self.table,
            &self.table.full_change_set(),
            Instant::ZERO,
            |_| false,
        );
        let mut want: BTreeMap<FrontendKey, String> = BTreeMap::new();
        for fe in planner.frontends() {
            let key = fe.key();
            if matches!(key.protocol, Protocol::Tcp | Protocol::Udp) {
                want.insert(key, fe.name().to_owned());
            }
        }
        let mut closed = 0;
        self.listeners.retain(|key, handle| {
            let keep = want.contains_key(key);
            if !keep {
                handle.abort();
                println!("listener closed {key}");
                closed += 1;
            }
            keep
        });
        let mut opened = 0;
        for (key, service) in want {
            if self.listeners.contains_key(&key) {
                continue;
            }

            let fe = Arc::new(FrontendInfo::new(&self.sh.metrics, key, service));
            let addr = map_addr(&self.listen_map, key.socket_addr());
            let sh = Arc::clone(&self.sh);
            let handle = match key.protocol {
                Protocol::Tcp => match tcp_listener(addr) {
                    Ok(l) => tokio::spawn(accept_tcp(sh, Arc::clone(&fe), l)),
                    Err(e) => {
                        eprintln!("proxy: cannot listen on {key}: {e}");
                        continue;
                    }
                },
                _ => match udp_socket(addr) {
                    Ok(s) => tokio::spawn(serve_udp(sh, Arc::clone(&fe), s, self.udp_check)),
                    Err(e) => {
                        eprintln!("proxy: cannot listen on {key}: {e}");
                        continue;
                    }
                },
            };
            if addr == key.socket_addr() {
                println!("listener opened {key} service={}", fe.service);
            } else {
                println!("listener opened {key} service={} listen={addr}", fe.service);
            }
            self.listeners.insert(key, handle);
            opened += 1;
        }
        self.reconcile_health();
        (opened, closed)
    }

    /// Serves each `externalTrafficPolicy: Local` service's
    /// `healthCheckNodePort` on every node-port IP, with its current
    /// answer; closes those of services gone or changed.
    fn reconcile_health(&mut self) {
        let mut want: BTreeMap<SocketAddr, (ServiceKey, HealthResponse)> = BTreeMap::new();
        for v in self.table.views() {
            let svc = v.service();
            if svc.external_traffic_policy() != TrafficPolicy::Local {
                continue;
            }
            let Some(port) = svc.health_check_node_port() else {
                continue;
            };
            let Some(answer) = service_health(&self.table, &self.node, svc.key(), true) else {
                continue;
            };
            // On the node IPs of the service's families, as each family's
            // proxier of kube-proxy serves its own services' health checks.
            let families = svc.cluster_ip().addrs();
            for ip in self.addresses.node_port_ips() {
                if !families.iter().any(|c| c.is_ipv4() == ip.is_ipv4()) {
                    continue;
                }
                want.entry(SocketAddr::new(ip, port))
                    .or_insert_with(|| (svc.key().clone(), answer.clone()));
            }
        }
        self.health.retain(|addr, h| {
            let keep = want.get(addr).is_some_and(|(k, _)| *k == h.service);
            if !keep {
                h.handle.abort();
                println!("health listener closed {addr} service={}", h.service);
            }
            keep
        });
        for (addr, (service, answer)) in want {
            if let Some(h) = self.health.get(&addr) {
                *h.answer.lock() = answer;
                continue;
            }
            let listener = match tcp_listener(addr) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("proxy: cannot listen on {addr} (health check of {service}): {e}");
                    continue;
                }
            };
            let answer = Arc::new(parking_lot::Mutex::new(answer));
            let handle = tokio::spawn(serve_service_health(listener, Arc::clone(&answer)));
            println!("health listener opened {addr} service={service}");
            self.health.insert(
                addr,
                HealthListener {
                    service,
                    answer,
                    handle,
                },
            );
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread: a current-thread runtime, which wakes no other thread
    // (no eventfd write per spawned task); otherwise work stealing over N.
    let mut rt = match cli.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all();
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxy: error: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("proxy: error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// `FROM_CIDR=TO_CIDR` values of `flag`.
fn parse_map(
    flag: &str,
    values: &[String],
) -> Result<Vec<(svclb::render::Cidr, svclb::render::Cidr)>, String> {
    let mut out = Vec::new();
    for m in values {
        let bad =
            || format!("{flag}: invalid value {m:?}: must be FROM_CIDR=TO_CIDR of one family");
        let (a, b) = m.split_once('=').ok_or_else(bad)?;
        let from = svclb::render::Cidr::parse(flag, a.trim()).map_err(|e| e.to_string())?;
        let to = svclb::render::Cidr::parse(flag, b.trim()).map_err(|e| e.to_string())?;
        if from.addr().is_ipv4() != to.addr().is_ipv4() {
            return Err(bad());
        }
        out.push((from, to));
    }
    Ok(out)
}

async fn run(cli: Cli) -> Result<(), String> {
    let scheduler: SchedulerKind = cli
        .scheduler
        .parse()
        .map_err(|e| format!("--scheduler: {e}"))?;
    let options = cli.load.options().map_err(|e| e.to_string())?;
    let node = cli.load.node();
    let mode = match cli.mode {
        ModeArg::Iptables => svclb::Mode::Iptables,
        ModeArg::Nftables => svclb::Mode::Nftables,
        ModeArg::Ipvs => svclb::Mode::Ipvs,
    };
    let secs = |flag: &str, v: f64| {
        if (0.0..1e9).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(format!(
                "{flag}: invalid value {v}: must be seconds, 0 or more"
            ))
        }
    };
    let drain_timeout = secs("--drain-timeout", cli.drain_timeout)?;
    let mut config = DataplaneConfig::with_seed(cli.seed)
        .node(node.clone())
        .scheduler(scheduler);
    config.count_connections = true;
    // The proxy listens on the node IPs itself, so node ports work on
    // loopback node IPs in every mode.
    config.loopback_node_ports = Some(true);
    cli.node_addrs
        .apply(&mut config)
        .map_err(|e| e.to_string())?;
    if config.node_ips.is_empty() && config.nodeport_addresses.is_empty() {
        // kube-proxy without --nodeport-addresses accepts node ports on
        // every local address: the wildcards stand for them, one per
        // family (frontends 0.0.0.0:nodePort for IPv4 services and
        // [::]:nodePort for IPv6 ones, both for dual-stack ones, each
        // listened on as such: the [::] listeners take IPv6 only, so the
        // two families' listeners coexist on one port).
        config.node_ips.push(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        config.node_ips.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }
    let addresses = NodeAddresses::new(config.node_ips.clone(), config.nodeport_addresses.clone());
    config.drain_grace = secs("--drain-grace", cli.drain_grace)?;
    let mut timeouts = mode.default_timeouts();
    if let Some(t) = cli.udp_timeout {
        let t = secs("--udp-timeout", t)?;
        timeouts.udp = t;
        timeouts.udp_replied = t;
    }
    if let Some(t) = cli.tcp_timeout {
        timeouts.tcp_established = secs("--tcp-timeout", t)?;
    }
    if let Some(t) = cli.tcp_fin_timeout {
        let t = secs("--tcp-fin-timeout", t)?;
        timeouts.tcp_fin_wait = t;
        timeouts.tcp_close_wait = t;
        timeouts.tcp_last_ack = t;
    }
    let udp_check = (timeouts.udp_replied.min(timeouts.udp) / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
    config.conntrack_timeouts = Some(timeouts);
    let dp: Box<dyn Dataplane> = match mode {
        svclb::Mode::Ipvs => Box::new(IpvsDataplane::new(config)),
        svclb::Mode::Nftables => Box::new(NftablesDataplane::new(config)),
        _ => Box::new(IptablesDataplane::new(config)),
    };
    let connect_map = parse_map("--connect-map", &cli.connect_map)?;
    let listen_map = parse_map("--listen-map", &cli.listen_map)?;
    let sh = Arc::new(Shared {
        connect_map,
        dp,
        start: WallClock::now(),
        metrics: Metrics::new(),
        log: cli.log,
        open: AtomicUsize::new(0),
        last_sync: parking_lot::Mutex::new(unix_now()),
        copy: if cfg!(target_os = "linux") {
            cli.copy
        } else {
            CopyMode::Userspace
        },
    });

    // Signals first, so that a SIGHUP right after start is not fatal.
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;

    let mut ctl = Control {
        sh: Arc::clone(&sh),
        table: ServiceTable::new(),
        loader: Loader::new(options.clone()),
        options,
        node,
        paths: cli.manifests.clone(),
        owned: BTreeSet::new(),
        stamps: Vec::new(),
        watches: Vec::new(),
        stdin_pending: String::new(),
        listeners: BTreeMap::new(),
        udp_check,
        addresses,
        health: BTreeMap::new(),
        listen_map,
    };
    // The first load: any error is fatal.
    ctl.stamps = ctl.stamps();
    let report = ctl
        .loader
        .load(&mut ctl.table, &cli.manifests, &[])
        .map_err(|e| e.to_string())?;
    ctl.notes(&report);
    ctl.owned = owned::owned_keys(&ctl.table);
    let mut stdin = false;
    for w in &cli.watch {
        if w.as_os_str() == "-" {
            stdin = true;
        } else {
            ctl.watches.push(WatchInput {
                path: w.clone(),
                offset: 0,
                pending: String::new(),
            });
        }
    }
    // Whole watch files now (any format the loader reads), then followed.
    for i in 0..ctl.watches.len() {
        let path = ctl.watches[i].path.clone();
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        ctl.watches[i].offset = text.len() as u64;
        let report = ctl
            .loader
            .apply_watch_text(&mut ctl.table, &text, &path.display().to_string())
            .map_err(|e| e.to_string())?;
        ctl.notes(&report);
    }
    sh.dp
        .sync(&ctl.table, &ctl.table.full_change_set(), sh.now());
    *sh.last_sync.lock() = unix_now();
    let (opened, _) = ctl.reconcile();

    let (stdin_tx, mut stdin_rx) = mpsc::channel::<String>(16);
    if stdin {
        std::thread::spawn(move || {
            let mut input = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let chunk = String::from_utf8_lossy(&buf[..n]).into_owned();
                        if stdin_tx.blocking_send(chunk).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    } else {
        drop(stdin_tx);
    }

    tokio::spawn(timers(Arc::clone(&sh)));
    tokio::spawn(async {
        let mut tick = tokio::time::interval(LOG_FLUSH);
        let mut spare = String::new();
        loop {
            tick.tick().await;
            flush_conn_log(&mut spare);
        }
    });
    if let Some(addr) = cli.metrics {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--metrics {addr}: {e}"))?;
        println!(
            "metrics listening on {}",
            l.local_addr().map_err(|e| e.to_string())?
        );
        tokio::spawn(serve_metrics(Arc::clone(&sh), l));
    }
    if let Some(addr) = cli.healthz_addr {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--healthz-addr {addr}: {e}"))?;
        println!(
            "healthz listening on {}",
            l.local_addr().map_err(|e| e.to_string())?
        );
        tokio::spawn(serve_healthz(Arc::clone(&sh), l));
    }
    println!(
        "ready mode={} services={} listeners={opened}",
        mode,
        ctl.table.len()
    );

    let mut poll = tokio::time::interval(POLL_INTERVAL);
    let mut stdin_open = stdin;
    loop {
        tokio::select! {
            _ = hup.recv() => ctl.reload_manifests("sighup"),
            _ = int.recv() => break,
            _ = term.recv() => break,
            chunk = stdin_rx.recv(), if stdin_open => match chunk {
                Some(c) => ctl.stdin_chunk(&c),
                None => stdin_open = false,
            },
            _ = poll.tick() => {
                if ctl.stamps() != ctl.stamps {
                    ctl.reload_manifests("files");
                }
                ctl.poll_watches();
            }
        }
    }

    // Shutdown: stop accepting, drain for a bounded time.
    for (_, h) in std::mem::take(&mut ctl.health) {
        h.handle.abort();
    }
    for (_, h) in std::mem::take(&mut ctl.listeners) {
        h.abort();
        // Cancelled: the listening socket is closed once this returns.
        let _ = h.await;
    }
    let deadline = WallClock::now() + drain_timeout;
    let open = sh.open.load(Ordering::Relaxed);
    println!("shutdown draining={open}");
    while sh.open.load(Ordering::Relaxed) > 0 && WallClock::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flush_conn_log(&mut String::new());
    println!(
        "shutdown done remaining={}",
        sh.open.load(Ordering::Relaxed)
    );
    Ok(())
}

/// One direction of a TCP connection: copies `from` to `to` until a clean
/// end of file, which runs `on_eof` (the connection layer hears of the FIN)
/// and, if it returns true (the other direction is still open), shuts `to`
/// down for writing (half-close), or until either side fails. Counts the
/// bytes copied; true on a clean end of file.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    bytes: &AtomicU64,
    on_eof: impl AsyncFnOnce() -> bool,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Not zeroed: read_buf fills the spare capacity.
    let mut buf = Vec::with_capacity(BUF);
    loop {
        buf.clear();
        match from.read_buf(&mut buf).await {
            Ok(0) => {
                if on_eof().await {
                    let _ = to.shutdown().await;
                }
                return true;
            }
            Ok(n) => {
                if to.write_all(&buf).await.is_err() {
                    return false;
                }
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => return false,
        }
    }
}

/// Runs both directions of a connection and its check: a direction that
/// fails ends the connection (`reset`); a clean EOF waits for the other
/// direction (half-close), and both done is `closed`; the check ending
/// first is `expired`.
async fn relay(
    c2s: impl std::future::Future<Output = bool>,
    s2c: impl std::future::Future<Output = bool>,
    check: impl std::future::Future<Output = ()>,
) -> &'static str {
    tokio::pin!(c2s, s2c, check);
    let (mut c_done, mut s_done) = (false, false);
    loop {
        tokio::select! {
            // In order: no random number per poll.
            biased;
            ok = &mut c2s, if !c_done => {
                if !ok {
                    return "reset";
                }
                c_done = true;
                if s_done {
                    return "closed";
                }
            }
            ok = &mut s2c, if !s_done => {
                if !ok {
                    return "reset";
                }
                s_done = true;
                if c_done {
                    return "closed";
                }
            }
            () = &mut check => return "expired",
        }
    }
}

/// A pipe for the splice pump: its read and write ends.
#[cfg(target_os = "linux")]
struct Pipe {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
}

#[cfg(target_os = "linux")]
thread_local! {
    /// Empty pipes kept for the next connections of this worker thread: a
    /// new connection then costs no `pipe2` and no two `close`s.
    static PIPES: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The splice pump's pipe size and the most one splice moves.
#[cfg(target_os = "linux")]
const SPLICE_PIPE: usize = 256 * 1024;

/// The bytes a direction moves through a buffer before the splice pump
/// switches it to splice.
#[cfg(target_os = "linux")]
const SPLICE_AFTER: u64 = 256 * 1024;

/// Empty pipes kept per worker thread (two descriptors each: bounded so
/// that an idle pool does not eat into the connections' descriptors).
#[cfg(target_os = "linux")]
const PIPE_POOL: usize = 128;

#[cfg(target_os = "linux")]
fn take_pipe() -> Option<Pipe> {
    use nix::fcntl::OFlag;
    PIPES.with(|p| p.borrow_mut().pop()).or_else(|| {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).ok()?;
        // A larger pipe moves more per splice (a page per slot); where the
        // kernel refuses the size, the default (64 KiB) stays.
        let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(SPLICE_PIPE as i32));
        Some(Pipe { r, w })
    })
}

/// Keeps an empty pipe for reuse (a pipe that may hold bytes is dropped).
#[cfg(target_os = "linux")]
fn give_pipe(pipe: Pipe) {
    PIPES.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < PIPE_POOL {
            p.push(pipe);
        }
    });
}

/// One direction of a TCP connection with `splice(2)`: `from` into a pipe,
/// the pipe into `to`, the bytes never copied to userspace; readiness from
/// tokio (each `splice` is non-blocking, and `try_io` clears a readiness
/// that turned out stale). The same contract as [`pump`]: a clean end of
/// file runs `on_eof` and, if it returns true, shuts `to` down for
/// writing; counts the bytes;
/// true on a clean end of file. The first [`SPLICE_AFTER`] bytes of a
/// direction go through a buffer (a short exchange costs less that way);
/// after that, a pipe is taken and given back empty to a per-thread pool. Without a pipe (out
/// of descriptors) or where the kernel refuses to splice these sockets, it
/// copies through a buffer instead ([`copy_pump`]).
#[cfg(target_os = "linux")]
async fn splice_pump(
    from: &TcpStream,
    to: &TcpStream,
    bytes: &AtomicU64,
    on_eof: impl AsyncFnOnce() -> bool,
) -> bool {
    use nix::fcntl::{SpliceFFlags, splice};
    use tokio::io::Interest;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    // A short exchange (a request, a small answer) is cheaper through a
    // buffer than through a pipe: splice only once a direction carries
    // bulk data.
    match copy_until(from, to, bytes, SPLICE_AFTER).await {
        CopyEnd::Eof => {
            half_close(to, on_eof).await;
            return true;
        }
        CopyEnd::Failed => return false,
        CopyEnd::Limit => {}
    }
    let mut pipe: Option<Pipe> = None;
    let mut first = true;
    loop {
        if from.readable().await.is_err() {
            return false;
        }
        if pipe.is_none() {
            pipe = take_pipe();
        }
        let Some(p) = &pipe else {
            return copy_pump(from, to, bytes, on_eof).await;
        };
        let n = match from.try_io(Interest::READABLE, || {
            splice(from, None, &p.w, None, SPLICE_PIPE, flags).map_err(std::io::Error::from)
        }) {
            Ok(0) => {
                half_close(to, on_eof).await;
                if let Some(p) = pipe.take() {
                    give_pipe(p);
                }
                return true;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if first && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                return copy_pump(from, to, bytes, on_eof).await;
            }
            Err(_) => return false,
        };
        first = false;
        let mut left = n;
        while left > 0 {
            if to.writable().await.is_err() {
                return false;
            }
            match to.try_io(Interest::WRITABLE, || {
                splice(&p.r, None, to, None, left, flags).map_err(std::io::Error::from)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(not(target_os = "linux"))]
async fn splice_pump(
    from: &TcpStream,
    to: &TcpStream,
    bytes: &AtomicU64,
    on_eof: impl AsyncFnOnce() -> bool,
) -> bool {
    copy_pump(from, to, bytes, on_eof).await
}

/// Whether a direction's end of file is to be forwarded as a half-close
/// (`shutdown(SHUT_WR)` of the other socket); `eofs` counts the
/// connection's ends of file. The second never is: both directions are
/// done and the closes send the FINs. The first yields once before it
/// answers (tokio runs the task again after its next poll of the I/O
/// driver), so that when the other side closes at once, as a client does
/// on a `Connection: close` reply, both ends are seen and the connection
/// closes without a `shutdown`: the proxy then does not become the active
/// closer of the client's connection (no TIME_WAIT socket on its side),
/// as HAProxy's event loop does not. A first end of file the other side
/// does not answer at once is forwarded one scheduling round later.
async fn forward_eof(eofs: &AtomicU8) -> bool {
    if eofs.fetch_add(1, Ordering::Relaxed) != 0 {
        return false;
    }
    tokio::task::yield_now().await;
    eofs.load(Ordering::Relaxed) == 1
}

/// A direction's clean end of file: runs `on_eof` and, if it says the
/// other direction is still open, shuts `to` down for writing.
async fn half_close(to: &TcpStream, on_eof: impl AsyncFnOnce() -> bool) {
    if on_eof().await {
        let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
    }
}

/// How a buffer copy of one direction stopped.
enum CopyEnd {
    /// A clean end of file from `from`.
    Eof,
    /// `from` or `to` failed.
    Failed,
    /// The byte limit was reached.
    Limit,
}

thread_local! {
    /// The copy buffer of this worker thread's connections: a read goes
    /// here and is written on at once, so a connection owns no buffer of
    /// its own unless its peer cannot take the bytes yet.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What one read of [`copy_until`] did.
enum Step {
    /// `n` bytes read (and written or kept in the pending buffer).
    Read(usize),
    /// Nothing to read after all.
    WouldBlock,
    /// The copy ended.
    End(CopyEnd),
}

/// Copies `from` to `to` through a buffer until an end of file, a
/// failure, or `limit` bytes moved; counts the bytes.
///
/// Each read goes into the worker thread's scratch buffer ([`SCRATCH`])
/// and is written on straight away; only the bytes `to` does not take at
/// once are kept, in a buffer of the connection's own, until it is
/// writable. A read shorter than the buffer has emptied the socket's
/// receive queue: its readiness is cleared then (as tokio's own
/// `poll_read` does), so the next read waits for the next event instead
/// of failing with `EAGAIN` first.
async fn copy_until(from: &TcpStream, to: &TcpStream, bytes: &AtomicU64, limit: u64) -> CopyEnd {
    use tokio::io::Interest;
    let mut pending: Vec<u8> = Vec::new();
    let mut moved = 0u64;
    while moved < limit {
        if from.readable().await.is_err() {
            return CopyEnd::Failed;
        }
        let step = SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            if buf.len() < BUF {
                buf.resize(BUF, 0);
            }
            // A short read answers WouldBlock to `try_io`, which clears the
            // readiness it saw before the read (a later event stays).
            let cap = buf.len();
            let mut got = 0;
            let n = match from.try_io(Interest::READABLE, || {
                got = (&*socket2::SockRef::from(from)).read(&mut buf[..])?;
                if got > 0 && got < cap {
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(got)
                }
            }) {
                Ok(0) => return Step::End(CopyEnd::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && got > 0 => got,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Step::WouldBlock,
                Err(_) => return Step::End(CopyEnd::Failed),
            };
            let mut off = 0;
            while off < n {
                match to.try_write(&buf[off..n]) {
                    Ok(m) => off += m,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return Step::End(CopyEnd::Failed),
                }
            }
            pending.extend_from_slice(&buf[off..n]);
            Step::Read(n)
        });
        let n = match step {
            Step::Read(n) => n,
            Step::WouldBlock => continue,
            Step::End(end) => return end,
        };
        let mut off = 0;
        while off < pending.len() {
            if to.writable().await.is_err() {
                return CopyEnd::Failed;
            }
            match to.try_write(&pending[off..]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return CopyEnd::Failed,
            }
        }
        pending.clear();
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        moved += n as u64;
    }
    CopyEnd::Limit
}

/// [`pump`] on shared references: the splice pump's fallback.
async fn copy_pump(
    from: &TcpStream,
    to: &TcpStream,
    bytes: &AtomicU64,
    on_eof: impl AsyncFnOnce() -> bool,
) -> bool {
    match copy_until(from, to, bytes, u64::MAX).await {
        CopyEnd::Eof => {
            half_close(to, on_eof).await;
            true
        }
        _ => false,
    }
}

/// UDP on a wildcard listener (0.0.0.0 or [::]): `IP_PKTINFO` /
/// `IPV6_RECVPKTINFO` tells each datagram's local destination address, and
/// replies name it as their source (`IPV6_PKTINFO`), so a client hears
/// back from the address it sent to (nix keeps `recvmsg`'s unsafe and
/// socket2 `sendmsg`'s).
#[cfg(target_os = "linux")]
mod pktinfo {
    use std::io;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::os::fd::AsRawFd;

    use nix::libc;
    use nix::sys::socket::{
        ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
    };
    use tokio::io::Interest;
    use tokio::net::UdpSocket;

    pub(super) fn enable(socket: &UdpSocket) -> io::Result<()> {
        if socket.local_addr()?.is_ipv6() {
            setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &true).map_err(io::Error::from)
        } else {
            setsockopt(socket, sockopt::Ipv4PacketInfo, &true).map_err(io::Error::from)
        }
    }

    /// Room for one `in_pktinfo` or `in6_pktinfo` control message.
    pub(super) fn buffer() -> Vec<u8> {
        nix::cmsg_space!(libc::in6_pktinfo)
    }

    /// A datagram: its length, sender and local destination address (None
    /// if the kernel gave none).
    pub(super) async fn recv(
        socket: &UdpSocket,
        buf: &mut [u8],
        cmsg: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        loop {
            socket.readable().await?;
            let got = socket.try_io(Interest::READABLE, || {
                let mut iov = [io::IoSliceMut::new(buf)];
                let m = recvmsg::<SockaddrStorage>(
                    socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut *cmsg),
                    MsgFlags::empty(),
                )
                .map_err(io::Error::from)?;
                let peer = m
                    .address
                    .and_then(|a| {
                        if let Some(v4) = a.as_sockaddr_in() {
                            Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                        } else {
                            a.as_sockaddr_in6()
                                .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                        }
                    })
                    .ok_or_else(|| io::Error::other("datagram without a sender"))?;
                let mut local = None;
                if let Ok(cmsgs) = m.cmsgs() {
                    for c in cmsgs {
                        match c {
                            ControlMessageOwned::Ipv4PacketInfo(info) => {
                                local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                                    info.ipi_addr.s_addr,
                                ))));
                            }
                            ControlMessageOwned::Ipv6PacketInfo(info) => {
                                local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                            }
                            _ => {}
                        }
                    }
                }
                Ok((m.bytes, peer, local))
            });
            match got {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// The room one control message with `data` bytes takes (`CMSG_SPACE`)
    /// and its `cmsg_len` (`CMSG_LEN`): a `cmsghdr` (`size_t` length, two
    /// `int`s) and the data, each rounded up to a `size_t`.
    const fn cmsg_sizes(data: usize) -> (usize, usize) {
        const fn align(n: usize) -> usize {
            n.div_ceil(size_of::<usize>()) * size_of::<usize>()
        }
        let header = align(size_of::<usize>() + 2 * size_of::<libc::c_int>());
        (header + align(data), header + data)
    }

    /// Writes one control message (`level`, `kind`, `data`) into `buf`;
    /// its length.
    fn pack_cmsg(buf: &mut [u8], level: libc::c_int, kind: libc::c_int, data: &[u8]) -> usize {
        let (space, len) = cmsg_sizes(data.len());
        let header = len - data.len();
        let n = size_of::<usize>();
        let i = size_of::<libc::c_int>();
        buf[..space].fill(0);
        buf[..n].copy_from_slice(&len.to_ne_bytes());
        buf[n..n + i].copy_from_slice(&level.to_ne_bytes());
        buf[n + i..n + 2 * i].copy_from_slice(&kind.to_ne_bytes());
        buf[header..len].copy_from_slice(data);
        space
    }

    /// Sends `data` to `peer` from the local address `local`.
    ///
    /// The control message (`IP_PKTINFO` with `ipi_spec_dst`, or
    /// `IPV6_PKTINFO` with `ipi6_addr`) is packed into a buffer on the
    /// stack and sent with socket2's `sendmsg`: nix's `sendmsg` allocates
    /// its control buffer on every call, and this runs once per reply
    /// datagram.
    pub(super) async fn send(
        socket: &UdpSocket,
        data: &[u8],
        peer: SocketAddr,
        local: IpAddr,
    ) -> io::Result<usize> {
        // Room for the larger of the two: in6_pktinfo (16 + 4 bytes).
        let mut control = [0u8; cmsg_sizes(20).0];
        let used = match local {
            IpAddr::V4(a) => {
                // in_pktinfo: ipi_ifindex, ipi_spec_dst, ipi_addr.
                let mut info = [0u8; 12];
                info[4..8].copy_from_slice(&a.octets());
                pack_cmsg(&mut control, libc::IPPROTO_IP, libc::IP_PKTINFO, &info)
            }
            IpAddr::V6(a) => {
                // in6_pktinfo: ipi6_addr, ipi6_ifindex.
                let mut info = [0u8; 20];
                info[..16].copy_from_slice(&a.octets());
                pack_cmsg(&mut control, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &info)
            }
        };
        let to = socket2::SockAddr::from(peer);
        let bufs = [io::IoSlice::new(data)];
        loop {
            socket.writable().await?;
            let sent = socket.try_io(Interest::WRITABLE, || {
                let msg = socket2::MsgHdr::new()
                    .with_addr(&to)
                    .with_buffers(&bufs)
                    .with_control(&control[..used]);
                socket2::SockRef::from(socket).sendmsg(&msg, 0)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod pktinfo {
    use std::io;
    use std::net::{IpAddr, SocketAddr};

    use tokio::net::UdpSocket;

    pub(super) fn enable(_: &UdpSocket) -> io::Result<()> {
        Err(io::Error::other("IP_PKTINFO is Linux-only here"))
    }

    pub(super) fn buffer() -> Vec<u8> {
        Vec::new()
    }

    pub(super) async fn recv(
        socket: &UdpSocket,
        buf: &mut [u8],
        _: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        socket.recv_from(buf).await.map(|(n, p)| (n, p, None))
    }

    pub(super) async fn send(
        socket: &UdpSocket,
        data: &[u8],
        peer: SocketAddr,
        _: IpAddr,
    ) -> io::Result<usize> {
        socket.send_to(data, peer).await
    }
}
