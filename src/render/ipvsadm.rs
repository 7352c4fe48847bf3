//! An [`IpvsDataplane`] listed like `ipvsadm -ln` (`ipvsadm.c`, `list_all`
//! and `print_service_entry`):
//!
//! ```text
//! IP Virtual Server version 1.2.1 (size=4096)
//! Prot LocalAddress:Port Scheduler Flags
//!   -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
//! TCP  10.96.0.10:80 rr persistent 10800
//!   -> 10.1.0.5:8080                Masq    1      0          0
//! ```
//!
//! A service line is the protocol, two spaces, `addr:port`, the scheduler,
//! its flags in parentheses and, for ClientIP affinity, ` persistent
//! SECONDS` (kube-proxy turns affinity into IPVS persistence with the
//! service's timeout and a full netmask, so no ` mask` follows). svclb's
//! `sh-port` and `mh-port` are the kernel's `sh` and `mh` schedulers with
//! the flag `IP_VS_SVC_F_SCHED2` (`ipvsadm -s mh -b mh-port`), which
//! `ipvsadm` 1.31 prints as `mh (mh-port)` (`print_service_entry`,
//! `print_sched_flags`). kube-proxy's `--ipvs-scheduler mh` is svclb's
//! `mh-port`: kube-proxy sets `FlagSourceHash` (0x10, `mh-port`) on every
//! virtual server when its scheduler is `mh` (kubernetes
//! `pkg/proxy/ipvs/proxier.go`, `syncProxyRules`), and no flag for any
//! other scheduler. A destination line is
//! `"  -> %-28s %-7s %-6d %-10u %-10u"`, trailing spaces included; the
//! forwarding method is always `Masq`, as kube-proxy configures it. Services
//! sort by family, protocol number, address and port; destinations by
//! address and port (`ipvsadm` sorts unless `--nosort`). IPv4 service names
//! are cut at 33 characters and destinations at 28, as `ipvsadm` does.
//!
//! Scheduler, weights and connection counters come from the dataplane; the
//! persistence timeout from the service in the table, which is where
//! kube-proxy takes it from.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::RenderOptions;
use crate::dataplane::{IpvsDataplane, VirtualServiceInfo};
use crate::model::flow::Protocol;
use crate::table::ServiceTable;

/// The IPVS version the kernel has reported since Linux 2.6.
const IPVS_VERSION: &str = "1.2.1";

fn addr_port(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// The scheduler column of a service line: the kernel scheduler's name and
/// the flags `ipvsadm` prints after it.
fn scheduler_column(name: &str) -> &str {
    match name {
        "sh-port" => "sh (sh-port)",
        "mh-port" => "mh (mh-port)",
        other => other,
    }
}

/// Formats a list of virtual services (from
/// [`IpvsDataplane::virtual_services`]) with the persistence timeout of each
/// given by `persistence`.
pub fn render_list(
    services: &[VirtualServiceInfo],
    persistence: impl Fn(&VirtualServiceInfo) -> Option<u32>,
    opts: &RenderOptions,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "IP Virtual Server version {IPVS_VERSION} (size={})",
        opts.ipvs_conn_table_size
    );
    out.push_str("Prot LocalAddress:Port Scheduler Flags\n");
    out.push_str("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n");
    for vs in services {
        let mut name = format!(
            "{}  {}",
            proto_name(vs.protocol),
            addr_port(vs.addr, vs.port)
        );
        if vs.addr.is_ipv4() {
            name.truncate(33);
        }
        let _ = write!(out, "{name} {}", scheduler_column(&vs.scheduler));
        if let Some(t) = persistence(vs) {
            let _ = write!(out, " persistent {t}");
        }
        out.push('\n');
        for d in &vs.destinations {
            let mut dest = addr_port(d.addr.ip(), d.addr.port());
            if d.addr.is_ipv4() {
                dest.truncate(28);
            }
            let _ = writeln!(
                out,
                "  -> {dest:<28} {:<7} {:<6} {:<10} {:<10}",
                "Masq", d.weight, d.active_conns, d.inactive_conns
            );
        }
    }
    out
}

/// Lists the dataplane's virtual services like `ipvsadm -ln`, taking each
/// service's persistence from `table`. See the module docs.
///
/// # Examples
/// ```
/// use svclb::*;
/// use svclb::render::{self, RenderOptions};
/// let mut table = ServiceTable::new();
/// let svc = Service::builder("default", "api")
///     .cluster_ip("10.96.0.20".parse().unwrap())
///     .port(ServicePortSpec::tcp(443).target_port(8443))
///     .client_ip_affinity(Some(3600))
///     .build().unwrap();
/// let slice = EndpointSlice::builder("default", "api-1", "api", AddressType::IPv4)
///     .port(SlicePortSpec::tcp(8443))
///     .endpoint(EndpointSpec::new("10.1.0.7"))
///     .build().unwrap();
/// let changes = table.apply_batch([Change::UpsertService(svc), Change::UpsertSlice(slice)]).unwrap();
/// let dp = IpvsDataplane::new(DataplaneConfig::with_seed(1));
/// dp.sync(&table, &changes, Instant::ZERO);
/// let text = render::ipvsadm::render(&table, &dp, &RenderOptions::default());
/// assert!(text.contains("TCP  10.96.0.20:443 rr persistent 3600\n"));
/// assert!(text.contains("  -> 10.1.0.7:8443                Masq    1      0          0         \n"));
/// ```
pub fn render(table: &ServiceTable, dp: &IpvsDataplane, opts: &RenderOptions) -> String {
    let services = dp.virtual_services();
    render_list(
        &services,
        |vs| {
            table
                .service(&vs.service)
                .and_then(|s| s.session_affinity().timeout())
                .map(|d| d.as_secs() as u32)
        },
        opts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::RealServerInfo;
    use crate::model::service::ServiceKey;

    fn vs(addr: &str, dests: &[(&str, u32, u32, u32)]) -> VirtualServiceInfo {
        VirtualServiceInfo {
            service: ServiceKey::new("default", "web"),
            addr: addr.parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
            scheduler: "wlc".into(),
            destinations: dests
                .iter()
                .map(|(a, w, act, inact)| RealServerInfo {
                    addr: a.parse().unwrap(),
                    weight: *w,
                    active_conns: *act,
                    inactive_conns: *inact,
                })
                .collect(),
        }
    }

    #[test]
    fn scheduler_flags_in_parentheses_before_persistence() {
        // ipvsadm 1.31 `print_service_entry`: `printf("%s %s", svc_name,
        // sched_name)`, then ` (flags)` when a scheduler flag is set, then
        // ` persistent T`.
        let mut v = vs("10.96.0.10", &[]);
        let line = |v: &VirtualServiceInfo, t: Option<u32>| {
            render_list(std::slice::from_ref(v), |_| t, &RenderOptions::default())
                .lines()
                .nth(3)
                .unwrap()
                .to_owned()
        };
        for (sched, want) in [
            ("mh-port", "UDP  10.96.0.10:53 mh (mh-port)"),
            ("sh-port", "UDP  10.96.0.10:53 sh (sh-port)"),
            ("mh", "UDP  10.96.0.10:53 mh"),
            ("sh", "UDP  10.96.0.10:53 sh"),
        ] {
            v.scheduler = sched.into();
            assert_eq!(line(&v, None), want);
        }
        v.scheduler = "mh-port".into();
        assert_eq!(
            line(&v, Some(10_800)),
            "UDP  10.96.0.10:53 mh (mh-port) persistent 10800"
        );
    }

    #[test]
    fn exact_columns() {
        let text = render_list(
            &[
                vs(
                    "10.96.0.10",
                    &[
                        ("10.244.1.5:53", 1, 12, 3),
                        ("10.244.2.7:53", 0, 1234567890, 0),
                    ],
                ),
                vs("fd00::a", &[("[fd00:10:244::5]:53", 1, 0, 0)]),
            ],
            |v| v.addr.is_ipv6().then_some(10800),
            &RenderOptions::default(),
        );
        let want = "IP Virtual Server version 1.2.1 (size=4096)\n\
Prot LocalAddress:Port Scheduler Flags\n\
\x20 -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n\
UDP  10.96.0.10:53 wlc\n\
\x20 -> 10.244.1.5:53                Masq    1      12         3         \n\
\x20 -> 10.244.2.7:53                Masq    0      1234567890 0         \n\
UDP  [fd00::a]:53 wlc persistent 10800\n\
\x20 -> [fd00:10:244::5]:53          Masq    1      0          0         \n";
        assert_eq!(text, want);
    }
}
