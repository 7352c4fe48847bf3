//! One test per entry of the bad-input catalogue, `docs/errors.md`.
//!
//! Each test builds the bad input, checks the exact typed error (variant,
//! field path, offending value) and, for table changes, that the table is
//! exactly as it was before (`ServiceTable::snapshot()` and generation).

use std::net::SocketAddr;

use svclb::*;

fn svc() -> ServiceBuilder {
    Service::builder("default", "web").cluster_ip("10.96.0.10".parse().unwrap())
}

fn slice() -> EndpointSliceBuilder {
    EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(8080).name("http"))
}

fn invalid(field: &str, value: &str) -> impl Fn(&ValidationError) -> bool {
    let (field, value) = (field.to_owned(), value.to_owned());
    move |e| matches!(e, ValidationError::Invalid { field: f, value: v, .. } if *f == field && *v == value)
}

#[track_caller]
fn assert_err<T: std::fmt::Debug>(
    r: Result<T, ValidationError>,
    check: impl Fn(&ValidationError) -> bool,
) {
    let e = r.unwrap_err();
    assert!(check(&e), "unexpected error {e:?}");
    // Every message names the field.
    assert!(e.to_string().contains(e.field()), "{e}");
}

// ---- Services -------------------------------------------------------------

#[test]
fn s1_names_must_be_dns_labels() {
    assert_err(Service::builder("", "web").headless().build(), |e| {
        *e == ValidationError::Missing {
            field: "metadata.namespace".into(),
        }
    });
    assert_err(
        Service::builder("default", "Web_1").headless().build(),
        invalid("metadata.name", "Web_1"),
    );
    let long = "a".repeat(64);
    assert_err(
        Service::builder("default", &long).headless().build(),
        invalid("metadata.name", &long),
    );
}

#[test]
fn s2_cluster_ip_required_unless_headless() {
    assert_err(
        Service::builder("default", "web")
            .port(ServicePortSpec::tcp(80))
            .build(),
        |e| {
            *e == ValidationError::Missing {
                field: "spec.clusterIP".into(),
            }
        },
    );
}

#[test]
fn s3_headless_service_has_no_cluster_ip() {
    assert_err(
        svc().headless().build(),
        invalid("spec.clusterIP", "10.96.0.10"),
    );
}

#[test]
fn s4_cluster_ips_one_per_family() {
    let r = svc()
        .cluster_ip("10.96.0.11".parse().unwrap())
        .port(ServicePortSpec::tcp(80))
        .build();
    assert_err(
        r,
        |e| matches!(e, ValidationError::Invalid { field, .. } if field == "spec.clusterIPs"),
    );
    let r = svc()
        .cluster_ip("fd00::1".parse().unwrap())
        .cluster_ip("fd00::2".parse().unwrap())
        .port(ServicePortSpec::tcp(80))
        .build();
    assert_err(
        r,
        |e| matches!(e, ValidationError::Invalid { field, .. } if field == "spec.clusterIPs"),
    );
}

#[test]
fn s5_ports_required_unless_headless() {
    assert_err(svc().build(), |e| {
        *e == ValidationError::Missing {
            field: "spec.ports".into(),
        }
    });
}

#[test]
fn s6_service_port_out_of_range() {
    for bad in [0i64, -1, 65_536, i64::MAX] {
        assert_err(svc().port(ServicePortSpec::tcp(bad)).build(), |e| {
            *e == ValidationError::PortOutOfRange {
                field: "spec.ports[0].port".into(),
                value: bad,
            }
        });
    }
}

#[test]
fn s7_target_port_out_of_range() {
    for bad in [-1i64, 65_536] {
        assert_err(
            svc()
                .port(ServicePortSpec::tcp(80).target_port(bad))
                .build(),
            |e| {
                *e == ValidationError::PortOutOfRange {
                    field: "spec.ports[0].targetPort".into(),
                    value: bad,
                }
            },
        );
    }
    // 0 is "unset" in the API: the target is the port itself.
    let s = svc()
        .port(ServicePortSpec::tcp(80).target_port(0))
        .build()
        .unwrap();
    assert_eq!(s.ports()[0].target_port(), &TargetPort::Number(80));
}

#[test]
fn s8_named_target_port_must_be_an_iana_service_name() {
    for bad in ["", "8080", "Http", "a--b", "way-too-long-name"] {
        assert_err(
            svc()
                .port(ServicePortSpec::tcp(80).target_port_name(bad))
                .build(),
            invalid("spec.ports[0].targetPort", bad),
        );
    }
}

#[test]
fn s9_port_names_required_and_valid_in_multi_port_services() {
    let r = svc()
        .port(ServicePortSpec::tcp(80).name("http"))
        .port(ServicePortSpec::tcp(443))
        .build();
    assert_err(r, |e| {
        *e == ValidationError::Missing {
            field: "spec.ports[1].name".into(),
        }
    });
    let r = svc().port(ServicePortSpec::tcp(80).name("HTTP")).build();
    assert_err(r, invalid("spec.ports[0].name", "HTTP"));
}

#[test]
fn s10_duplicate_service_ports() {
    let r = svc()
        .port(ServicePortSpec::tcp(80).name("http"))
        .port(ServicePortSpec::tcp(81).name("http"))
        .build();
    assert_err(r, |e| {
        *e == ValidationError::Duplicate {
            field: "spec.ports[1].name".into(),
            value: "http".into(),
        }
    });
    let r = svc()
        .port(ServicePortSpec::tcp(80).name("a"))
        .port(ServicePortSpec::tcp(80).name("b"))
        .build();
    assert_err(r, |e| {
        *e == ValidationError::Duplicate {
            field: "spec.ports[1]".into(),
            value: "80/TCP".into(),
        }
    });
}

#[test]
fn s11_affinity_timeout_out_of_range() {
    for bad in [0i64, -5, 86_401, i64::MIN] {
        let r = svc()
            .port(ServicePortSpec::tcp(80))
            .client_ip_affinity(Some(bad))
            .build();
        assert_err(r, |e| {
            *e == ValidationError::TimeoutOutOfRange {
                field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                value: bad,
            }
        });
    }
    // The bounds themselves are valid (86400 despite the API's wording).
    for ok in [1i64, 86_400] {
        svc()
            .port(ServicePortSpec::tcp(80))
            .client_ip_affinity(Some(ok))
            .build()
            .unwrap();
    }
}

// ---- EndpointSlices -------------------------------------------------------

#[test]
fn s12_node_port_type_range_and_duplicates() {
    let np = |ty: ServiceType, port: i64| {
        svc()
            .service_type(ty)
            .port(ServicePortSpec::tcp(80).node_port(port))
            .build()
    };
    assert_err(
        np(ServiceType::ClusterIP, 30_080),
        invalid("spec.ports[0].nodePort", "30080"),
    );
    assert_err(
        np(ServiceType::NodePort, 80),
        invalid("spec.ports[0].nodePort", "80"),
    );
    assert_err(np(ServiceType::NodePort, 70_000), |e| {
        *e == ValidationError::PortOutOfRange {
            field: "spec.ports[0].nodePort".into(),
            value: 70_000,
        }
    });
    let r = svc()
        .service_type(ServiceType::NodePort)
        .port(ServicePortSpec::tcp(80).name("a").node_port(30_080))
        .port(ServicePortSpec::tcp(81).name("b").node_port(30_080))
        .build();
    assert_err(r, |e| {
        *e == ValidationError::Duplicate {
            field: "spec.ports[1].nodePort".into(),
            value: "30080/TCP".into(),
        }
    });
    np(ServiceType::LoadBalancer, 32_767).unwrap();
}

#[test]
fn s13_external_ips_not_special() {
    for bad in [
        "0.0.0.0",
        "127.0.0.1",
        "169.254.1.1",
        "224.0.0.1",
        "::1",
        "fe80::1",
    ] {
        let r = svc()
            .port(ServicePortSpec::tcp(80))
            .external_ip(bad.parse().unwrap())
            .build();
        assert_err(r, invalid("spec.externalIPs[0]", bad));
    }
}

#[test]
fn s14_load_balancer_only_fields() {
    let r = svc()
        .port(ServicePortSpec::tcp(80))
        .load_balancer_source_range("10.0.0.0/8".parse().unwrap())
        .build();
    assert_err(r, invalid("spec.loadBalancerSourceRanges", "10.0.0.0/8"));
    let r = svc()
        .service_type(ServiceType::NodePort)
        .port(ServicePortSpec::tcp(80))
        .allocate_load_balancer_node_ports(false)
        .build();
    assert_err(r, invalid("spec.allocateLoadBalancerNodePorts", "false"));
}

#[test]
fn s15_health_check_node_port_needs_local_load_balancer() {
    let r = svc()
        .service_type(ServiceType::LoadBalancer)
        .port(ServicePortSpec::tcp(80))
        .health_check_node_port(30_000)
        .build();
    assert_err(r, invalid("spec.healthCheckNodePort", "30000"));
    svc()
        .service_type(ServiceType::LoadBalancer)
        .external_traffic_policy(TrafficPolicy::Local)
        .port(ServicePortSpec::tcp(80))
        .health_check_node_port(30_000)
        .build()
        .unwrap();
}

#[test]
fn s16_external_traffic_policy_local_needs_external_access() {
    let r = svc()
        .port(ServicePortSpec::tcp(80))
        .external_traffic_policy(TrafficPolicy::Local)
        .build();
    assert_err(r, invalid("spec.externalTrafficPolicy", "Local"));
}

#[test]
fn s17_external_name() {
    let r = Service::builder("default", "db")
        .service_type(ServiceType::ExternalName)
        .external_name("Not A Name")
        .build();
    assert_err(r, invalid("spec.externalName", "Not A Name"));
    let r = svc()
        .service_type(ServiceType::ExternalName)
        .external_name("db.example.com")
        .build();
    assert_err(r, invalid("spec.clusterIP", "10.96.0.10"));
}

#[test]
fn e1_slice_names() {
    let r = EndpointSlice::builder("default", "web..1", "web", AddressType::IPv4).build();
    assert_err(r, invalid("metadata.name", "web..1"));
    let r = EndpointSlice::builder("default", "web-1", "Web", AddressType::IPv4).build();
    assert_err(
        r,
        invalid("metadata.labels[kubernetes.io/service-name]", "Web"),
    );
    let r = EndpointSlice::builder("", "web-1", "web", AddressType::IPv4).build();
    assert_err(r, |e| {
        *e == ValidationError::Missing {
            field: "metadata.namespace".into(),
        }
    });
}

#[test]
fn e2_slice_over_the_limits() {
    let eps = (0..1001).map(|i| EndpointSpec::new(format!("10.0.{}.{}", i / 250, i % 250 + 1)));
    assert_err(slice().endpoints(eps).build(), |e| {
        *e == ValidationError::TooMany {
            field: "endpoints".into(),
            count: 1001,
            limit: 1000,
        }
    });
    let mut b = EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4);
    for i in 0..101 {
        b = b.port(SlicePortSpec::tcp(1000 + i).name(format!("p{i}")));
    }
    assert_err(b.build(), |e| {
        *e == ValidationError::TooMany {
            field: "ports".into(),
            count: 101,
            limit: 100,
        }
    });
    let mut spec = EndpointSpec::new("10.0.0.1");
    spec.addresses = (0..101).map(|i| format!("10.0.1.{}", i + 1)).collect();
    assert_err(slice().endpoint(spec).build(), |e| {
        *e == ValidationError::TooMany {
            field: "endpoints[0].addresses".into(),
            count: 101,
            limit: 100,
        }
    });
    let mut spec = EndpointSpec::new("10.0.0.1");
    spec.hint_zones = (0..9).map(|i| format!("zone-{i}")).collect();
    assert_err(slice().endpoint(spec).build(), |e| {
        *e == ValidationError::TooMany {
            field: "endpoints[0].hints.forZones".into(),
            count: 9,
            limit: 8,
        }
    });
    // Exactly at the limit is fine.
    let eps = (0..1000).map(|i| EndpointSpec::new(format!("10.0.{}.{}", i / 250, i % 250 + 1)));
    assert_eq!(
        slice().endpoints(eps).build().unwrap().endpoints().len(),
        1000
    );
}

#[test]
fn e3_slice_port_out_of_range() {
    for bad in [-1i64, 65_536] {
        let r = EndpointSlice::builder("default", "w", "web", AddressType::IPv4)
            .port(SlicePortSpec::tcp(bad))
            .build();
        assert_err(r, |e| {
            *e == ValidationError::PortOutOfRange {
                field: "ports[0].port".into(),
                value: bad,
            }
        });
    }
    // A port with no number (0) is ignored, as kube-proxy does.
    let s = EndpointSlice::builder("default", "w", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(0))
        .build()
        .unwrap();
    assert_eq!(s.ports()[0].port(), None);
}

#[test]
fn e4_slice_port_names() {
    assert_err(
        slice().port(SlicePortSpec::tcp(9090).name("http")).build(),
        |e| {
            *e == ValidationError::Duplicate {
                field: "ports[1].name".into(),
                value: "http".into(),
            }
        },
    );
    assert_err(
        slice()
            .port(SlicePortSpec::tcp(9090).name("Metrics"))
            .build(),
        invalid("ports[1].name", "Metrics"),
    );
}

#[test]
fn e5_endpoint_without_addresses() {
    let mut spec = EndpointSpec::new("10.0.0.1");
    spec.addresses.clear();
    assert_err(slice().endpoint(spec).build(), |e| {
        *e == ValidationError::Missing {
            field: "endpoints[0].addresses".into(),
        }
    });
}

#[test]
fn e6_address_of_the_wrong_family() {
    let wrong = |at: AddressType, addr: &str, expected: &'static str| {
        let r = EndpointSlice::builder("default", "w", "web", at)
            .endpoint(EndpointSpec::new(addr))
            .build();
        assert_err(r, |e| {
            *e == ValidationError::AddressType {
                field: "endpoints[0].addresses[0]".into(),
                value: addr.into(),
                expected,
            }
        });
    };
    wrong(AddressType::IPv4, "fd00::1", "IPv4");
    wrong(AddressType::IPv6, "10.0.0.1", "IPv6");
    wrong(AddressType::Fqdn, "10.0.0.1", "FQDN");
    wrong(AddressType::IPv4, "10.0.0.256", "IPv4");
    wrong(AddressType::IPv4, "not-an-ip", "IPv4");
    // Leading zeros are read as decimal, as kube-proxy's ParseIPSloppy
    // does (its TestBadIPs), not refused.
    let s = EndpointSlice::builder("default", "w", "web", AddressType::IPv4)
        .endpoint(EndpointSpec::new("010.0.0.1"))
        .build()
        .unwrap();
    assert_eq!(s.endpoints()[0].addresses()[0].to_string(), "10.0.0.1");
}

#[test]
fn e7_special_addresses_are_never_backends() {
    for (at, bad) in [
        (AddressType::IPv4, "0.0.0.0"),
        (AddressType::IPv4, "127.0.0.1"),
        (AddressType::IPv4, "127.255.0.9"),
        (AddressType::IPv4, "169.254.169.254"),
        (AddressType::IPv4, "224.0.0.251"),
        (AddressType::IPv6, "::"),
        (AddressType::IPv6, "::1"),
        (AddressType::IPv6, "fe80::1"),
        (AddressType::IPv6, "ff02::1"),
        (AddressType::IPv6, "::ffff:127.0.0.1"),
    ] {
        let r = EndpointSlice::builder("default", "w", "web", at)
            .endpoint(EndpointSpec::new(bad))
            .build();
        assert_err(r, invalid("endpoints[0].addresses[0]", bad));
    }
    // Ordinary private, public and multicast-adjacent addresses are fine.
    for (at, ok) in [
        (AddressType::IPv4, "10.0.0.1"),
        (AddressType::IPv4, "169.255.0.1"),
        (AddressType::IPv4, "224.0.1.1"),
        (AddressType::IPv6, "fd00::1"),
        (AddressType::IPv6, "2001:db8::1"),
    ] {
        EndpointSlice::builder("default", "w", "web", at)
            .endpoint(EndpointSpec::new(ok))
            .build()
            .unwrap();
    }
}

#[test]
fn e8_fqdn_must_be_a_dns_subdomain() {
    let r = EndpointSlice::builder("default", "w", "web", AddressType::Fqdn)
        .endpoint(EndpointSpec::new("db_1.example.com"))
        .build();
    assert_err(r, invalid("endpoints[0].addresses[0]", "db_1.example.com"));
}

#[test]
fn e9_duplicate_endpoints() {
    // kube-proxy keeps the rest of a slice that names an address twice,
    // and one copy of the address: so does the builder.
    let s = slice()
        .endpoint(EndpointSpec::new("10.0.0.1"))
        .endpoint(EndpointSpec::new("10.0.0.2"))
        .endpoint(EndpointSpec::new("10.0.0.1"))
        .build()
        .unwrap();
    let addrs: Vec<String> = s
        .endpoints()
        .iter()
        .map(|e| e.addresses()[0].to_string())
        .collect();
    assert_eq!(addrs, ["10.0.0.1", "10.0.0.2"]);
    // The same address written differently is the same endpoint.
    let s = EndpointSlice::builder("default", "w", "web", AddressType::IPv6)
        .endpoint(EndpointSpec::new("fd00::1"))
        .endpoint(EndpointSpec::new("fd00:0::0:1"))
        .build()
        .unwrap();
    assert_eq!(s.endpoints().len(), 1);
}

#[test]
fn e10_endpoint_topology_fields() {
    assert_err(
        slice()
            .endpoint(EndpointSpec::new("10.0.0.1").hostname("Pod_0"))
            .build(),
        invalid("endpoints[0].hostname", "Pod_0"),
    );
    assert_err(
        slice()
            .endpoint(EndpointSpec::new("10.0.0.1").node("Node A"))
            .build(),
        invalid("endpoints[0].nodeName", "Node A"),
    );
    assert_err(
        slice()
            .endpoint(EndpointSpec::new("10.0.0.1").hint_zone(""))
            .build(),
        |e| {
            *e == ValidationError::Missing {
                field: "endpoints[0].hints.forZones[0].name".into(),
            }
        },
    );
}

#[test]
fn e11_weight_out_of_range() {
    for bad in [-1i64, 65_536] {
        assert_err(
            slice()
                .endpoint(EndpointSpec::new("10.0.0.1").weight(bad))
                .build(),
            |e| {
                *e == ValidationError::WeightOutOfRange {
                    field: "endpoints[0].weight".into(),
                    value: bad,
                }
            },
        );
    }
}

// ---- The table ------------------------------------------------------------

fn table() -> ServiceTable {
    let mut t = ServiceTable::new();
    t.apply_batch([
        Change::UpsertService(
            svc()
                .port(ServicePortSpec::tcp(80).name("http"))
                .build()
                .unwrap(),
        ),
        Change::UpsertSlice(
            slice()
                .endpoint(EndpointSpec::new("10.0.0.1"))
                .build()
                .unwrap(),
        ),
    ])
    .unwrap();
    t
}

#[track_caller]
fn refused(t: &mut ServiceTable, batch: Vec<Change>, want: UpdateError) {
    let before = t.snapshot();
    let generation = t.generation();
    assert_eq!(t.apply_batch(batch).unwrap_err(), want);
    assert_eq!(t.snapshot(), before, "a refused batch changed the table");
    assert_eq!(t.generation(), generation);
}

#[test]
fn t1_slice_for_an_unknown_service_waits_pending() {
    // Watch order: a slice may come before its service. It is kept, noted,
    // and forwards nothing until the service arrives.
    let mut t = table();
    let stray = EndpointSlice::builder("default", "api-1", "api", AddressType::IPv4)
        .endpoint(EndpointSpec::new("10.0.0.9"))
        .build()
        .unwrap();
    let cs = t.apply(Change::UpsertSlice(stray)).unwrap();
    assert_eq!(
        cs.notes,
        vec![ChangeNote::Pending {
            slice: SliceKey::new("default", "api-1"),
            service: ServiceKey::new("default", "api"),
        }]
    );
    assert!(t.is_pending(&SliceKey::new("default", "api-1")));
    assert!(t.view(&ServiceKey::new("default", "api")).is_none());
}

#[test]
fn t2_delete_of_an_unknown_object_is_a_noted_no_op() {
    let mut t = table();
    let before = t.snapshot();
    let cs = t
        .apply(Change::DeleteService(ServiceKey::new("default", "nope")))
        .unwrap();
    assert_eq!(
        cs.notes,
        vec![ChangeNote::AbsentDelete {
            kind: "Service",
            key: "default/nope".into()
        }]
    );
    assert!(cs.is_empty());
    let cs = t
        .apply(Change::DeleteSlice(SliceKey::new("default", "nope")))
        .unwrap();
    assert_eq!(
        cs.notes[0].to_string(),
        "EndpointSlice default/nope: delete of an object not present (no-op)"
    );
    assert_eq!(t.snapshot(), before);
}

#[test]
fn t3_two_services_on_one_vip_port_and_protocol() {
    let mut t = table();
    let other = Service::builder("default", "api")
        .cluster_ip("10.96.0.10".parse().unwrap())
        .port(ServicePortSpec::tcp(80))
        .build()
        .unwrap();
    refused(
        &mut t,
        vec![Change::UpsertService(other)],
        UpdateError::InBatch {
            index: 0,
            source: Box::new(UpdateError::ConflictingPort {
                service: "default/api".into(),
                field: "spec.ports[0]".into(),
                value: "10.96.0.10:80/TCP".into(),
                other: "default/web".into(),
            }),
        },
    );
    // Another protocol on the same VIP and port is a different service port.
    let udp = Service::builder("default", "api")
        .cluster_ip("10.96.0.10".parse().unwrap())
        .port(ServicePortSpec::udp(80))
        .build()
        .unwrap();
    t.apply(Change::UpsertService(udp)).unwrap();
}

#[test]
fn t4_a_batch_is_refused_whole() {
    let mut t = table();
    let good = slice()
        .endpoint(EndpointSpec::new("10.0.0.5"))
        .build()
        .unwrap();
    let conflict = Service::builder("default", "api")
        .cluster_ip("10.96.0.10".parse().unwrap())
        .port(ServicePortSpec::tcp(80))
        .build()
        .unwrap();
    // A good slice and a stale delete (both fine alone) beside a real
    // conflict: none of it applies.
    let batch = vec![
        Change::UpsertSlice(good),
        Change::DeleteSlice(SliceKey::new("default", "nope")),
        Change::UpsertService(conflict),
    ];
    let e = t.clone().apply_batch(batch.clone()).unwrap_err();
    assert!(matches!(
        e,
        UpdateError::InBatch {
            index: 2,
            ref source
        } if matches!(**source, UpdateError::ConflictingPort { .. })
    ));
    refused(&mut t, batch, e);
}

// ---- Text values ----------------------------------------------------------

#[test]
fn x1_unknown_protocol() {
    for bad in ["ICMP", "", "tcp6", "HTTP"] {
        assert_err(bad.parse::<Protocol>(), invalid("protocol", bad));
    }
    assert_eq!("sctp".parse::<Protocol>().unwrap(), Protocol::Sctp);
}

#[test]
fn x2_unknown_scheduler() {
    for bad in ["roundrobin", "", "RR", "dh"] {
        assert_err(bad.parse::<SchedulerKind>(), invalid("scheduler", bad));
    }
}

#[test]
fn x3_bad_cidr() {
    for bad in [
        "10.0.0.0",
        "10.0.0.0/33",
        "fd00::/129",
        "x/8",
        "10.0.0.0/-1",
    ] {
        assert_err(
            svclb::render::Cidr::parse("clusterCIDR", bad),
            invalid("clusterCIDR", bad),
        );
    }
}

// ---- Accepted, with a defined outcome -------------------------------------

#[test]
fn n1_named_target_port_that_resolves_nowhere_rejects_flows() {
    // targetPort "web" exists on no slice port named "http": the
    // EndpointSlice controller would write no port for it, so the service
    // port has no endpoints. Not an input error: every flow is rejected.
    let mut t = ServiceTable::new();
    let web = svc()
        .port(
            ServicePortSpec::tcp(80)
                .name("http")
                .target_port_name("web"),
        )
        .build()
        .unwrap();
    let metrics_only = EndpointSlice::builder("default", "web-1", "web", AddressType::IPv4)
        .port(SlicePortSpec::tcp(9090).name("metrics"))
        .endpoint(EndpointSpec::new("10.0.0.1"))
        .build()
        .unwrap();
    let cs = t
        .apply_batch([
            Change::UpsertService(web),
            Change::UpsertSlice(metrics_only),
        ])
        .unwrap();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let flow = Flow::tcp("10.2.0.1:4000".parse().unwrap(), vip);
    let config = DataplaneConfig::with_seed(1);
    let dps: [Box<dyn Dataplane>; 2] = [
        Box::new(IptablesDataplane::new(config.clone())),
        Box::new(IpvsDataplane::new(config)),
    ];
    for dp in dps {
        dp.sync(&t, &cs, Instant::ZERO);
        assert_eq!(
            dp.candidates(Protocol::Tcp, vip),
            Candidates::Reject,
            "{}",
            dp.mode()
        );
        assert_eq!(
            dp.route(&flow, Instant::ZERO),
            Verdict::Reject,
            "{}",
            dp.mode()
        );
    }
}

// ---- Manifests (feature `serde`) -------------------------------------------

#[cfg(feature = "serde")]
#[allow(clippy::result_large_err)] // ManifestError, as the library returns it
mod manifests {
    use svclb::ValidationError;
    use svclb::k8s::manifest::{ManifestError, Manifests};

    fn read(text: &str) -> Result<usize, ManifestError> {
        Manifests::parse_str(text, Some("bad.yaml"))
            .and_then(|m| m.changes())
            .map(|b| b.changes.len())
    }

    fn service(spec_extra: &str, port_extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{{port: 80{port_extra}}}]\n{spec_extra}"
        )
    }

    fn slice(address_type: &str, address: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\naddressType: {address_type}\nports: [{{port: 8080}}]\nendpoints: [{{addresses: ['{address}']}}]\n"
        )
    }

    /// The error is `Invalid`, names the file and object, and wraps this
    /// validation error.
    #[track_caller]
    fn invalid(text: &str, object: &str, want: ValidationError) {
        let e = read(text).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("bad.yaml: document 1: "), "{msg}");
        assert!(msg.contains(object), "{msg}");
        match e {
            ManifestError::Invalid { source, .. } => assert_eq!(source, want),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn m1_malformed_json_and_yaml() {
        for (text, format) in [
            ("{\"kind\": \"Service\",", "JSON"),
            ("[{\"kind\": \"Service\"}", "JSON"),
            ("kind: Service\nmetadata: [\n", "YAML"),
            ("kind: Service\n  spec: {\n", "YAML"),
            ("kind: Service\nmetadata:\n\t- x\n", "YAML"),
        ] {
            match read(text).unwrap_err() {
                ManifestError::Syntax {
                    format: f,
                    origin,
                    message,
                } => {
                    assert_eq!(f, format, "{text}");
                    assert_eq!(origin.source.as_deref(), Some("bad.yaml"));
                    assert!(message.contains("line"), "{message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn m2_wrong_shapes() {
        let e = read("kind: Service\nspec: {ports: [{port: eighty}]}\n").unwrap_err();
        assert!(
            matches!(&e, ManifestError::Decode { field, .. } if field == "spec.ports[0].port"),
            "{e:?}"
        );
        let e = read("42\n").unwrap_err();
        assert!(
            matches!(&e, ManifestError::Decode { message, .. } if message.contains("expected an object")),
            "{e:?}"
        );
    }

    #[test]
    fn m3_unknown_enum_values() {
        let bad = |field: &str, value: &str, reason: &'static str| ValidationError::Invalid {
            field: field.into(),
            value: value.into(),
            reason,
        };
        invalid(
            &service("", ", protocol: ICMP"),
            "Service default/web",
            bad("spec.ports[0].protocol", "ICMP", "must be TCP, UDP or SCTP"),
        );
        invalid(
            &service("  sessionAffinity: Sticky\n", ""),
            "Service default/web",
            bad("spec.sessionAffinity", "Sticky", "must be None or ClientIP"),
        );
        invalid(
            &service("  internalTrafficPolicy: Nearby\n", ""),
            "Service default/web",
            bad(
                "spec.internalTrafficPolicy",
                "Nearby",
                "must be Cluster or Local",
            ),
        );
        invalid(
            &service("  type: Magic\n", ""),
            "Service default/web",
            bad(
                "spec.type",
                "Magic",
                "must be ClusterIP, NodePort, LoadBalancer or ExternalName",
            ),
        );
        invalid(
            &slice("IPv5", "10.0.0.1"),
            "EndpointSlice default/web-1",
            bad("addressType", "IPv5", "must be IPv4, IPv6 or FQDN"),
        );
    }

    #[test]
    fn m4_kind_and_api_version() {
        invalid(
            "apiVersion: v2\nkind: Service\nmetadata: {name: web}\n",
            "Service default/web",
            ValidationError::Invalid {
                field: "apiVersion".into(),
                value: "v2".into(),
                reason: "a Service must be apiVersion v1",
            },
        );
        invalid(
            "metadata: {name: web}\n",
            "default/web",
            ValidationError::Missing {
                field: "kind".into(),
            },
        );
    }

    #[test]
    fn m7_limits_are_named() {
        use svclb::k8s::input::{InputLimits, Limit};
        let small = InputLimits {
            max_bytes: 100,
            max_depth: 4,
            max_documents: 2,
            max_objects: 3,
        };
        let cases = [
            ("a: 1\n".repeat(30), Limit::Bytes, 100),
            ("[[[[[[1]]]]]]".to_owned(), Limit::Depth, 4),
            (
                "kind: ConfigMap\n---\nkind: ConfigMap\n---\nkind: ConfigMap\n".to_owned(),
                Limit::Documents,
                2,
            ),
            (
                "[{kind: A}, {kind: B}, {kind: C}, {kind: D}]".to_owned(),
                Limit::Objects,
                3,
            ),
        ];
        for (text, want, max) in cases {
            let e = Manifests::parse_str_with(&text, Some("bad.yaml"), &small).unwrap_err();
            match &e {
                ManifestError::Limit { limit, max: m, .. } => {
                    assert_eq!((*limit, *m), (want, max), "{e}");
                }
                other => panic!("{text}: {other:?}"),
            }
            assert!(e.to_string().contains(want.name()), "{e}");
        }
    }

    #[test]
    fn m8_duplicate_keys() {
        let e = read("kind: Service\nmetadata: {name: a, labels: {app: x, app: y}}\n").unwrap_err();
        match &e {
            ManifestError::DuplicateKey { field, key, .. } => {
                assert_eq!((field.as_str(), key.as_str()), ("metadata.labels", "app"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn m9_m10_not_text_and_unreadable() {
        use svclb::k8s::input::{InputLimits, read_capped};
        let e =
            read_capped(&b"kind: \0"[..], Some("bad.yaml"), &InputLimits::default()).unwrap_err();
        assert!(
            matches!(e, ManifestError::NotText { offset: 6, .. }),
            "{e:?}"
        );
        let mut t = svclb::ServiceTable::new();
        let e = svclb::k8s::loader::Loader::default()
            .apply_manifest_path(&mut t, std::path::Path::new("/nonexistent/x.yaml"))
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.yaml"), "{e}");
    }

    #[test]
    fn m5_builder_errors_carry_the_manifest_context() {
        invalid(
            // (`port` given once: a second `port` key is now a duplicate-key
            // error, m8.)
            &service("", "").replace("port: 80", "port: 70000"),
            "Service default/web",
            ValidationError::PortOutOfRange {
                field: "spec.ports[0].port".into(),
                value: 70_000,
            },
        );
        invalid(
            &service(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}\n",
                "",
            ),
            "Service default/web",
            ValidationError::TimeoutOutOfRange {
                field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                value: 86_401,
            },
        );
        invalid(
            &slice("IPv4", "fd00::1"),
            "EndpointSlice default/web-1",
            ValidationError::AddressType {
                field: "endpoints[0].addresses[0]".into(),
                value: "fd00::1".into(),
                expected: "IPv4",
            },
        );
        invalid(
            &slice("IPv4", "169.254.169.254"),
            "EndpointSlice default/web-1",
            ValidationError::Invalid {
                field: "endpoints[0].addresses[0]".into(),
                value: "169.254.169.254".into(),
                reason: "may not be in the link-local range (169.254.0.0/16, fe80::/10)",
            },
        );
    }

    #[test]
    fn m6_affinity_config_with_affinity_none_is_cleared() {
        // The API server's defaulting drops sessionAffinityConfig when
        // sessionAffinity is None before validating; so does svclb.
        let text = service(
            "  sessionAffinity: None\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
            "",
        );
        let batch = Manifests::parse_str(&text, None)
            .unwrap()
            .changes()
            .unwrap();
        match &batch.changes[0] {
            svclb::Change::UpsertService(s) => {
                assert_eq!(s.session_affinity(), svclb::SessionAffinity::None)
            }
            other => panic!("{other:?}"),
        }
    }
}

// ---- Replay traces --------------------------------------------------------

#[test]
fn r1_bad_trace_lines() {
    use svclb::trace::{TraceError, parse_trace};
    let bad =
        |text: &str, line: usize, field: &str, value: &str| match parse_trace(text).unwrap_err() {
            TraceError::Invalid {
                line: l,
                field: f,
                value: v,
                ..
            } => {
                assert_eq!((l, f, v.as_str()), (line, field, value), "{text}");
            }
            other => panic!("{text}: {other:?}"),
        };
    bad(
        "0 connect icmp 10.0.0.1:1 10.0.0.2:2\n",
        1,
        "protocol",
        "icmp",
    );
    bad(
        "# c\n-1 connect tcp 10.0.0.1:1 10.0.0.2:2\n",
        2,
        "time",
        "-1",
    );
    bad("NaN connect tcp 10.0.0.1:1 10.0.0.2:2\n", 1, "time", "NaN");
    bad("2 apply a\n1 apply b\n", 2, "time", "1");
    bad(
        "0 connect tcp 10.0.0.1 10.0.0.2:2\n",
        1,
        "source",
        "10.0.0.1",
    );
    bad("0 delete Pod default/x\n", 1, "kind", "Pod");
    assert!(matches!(
        parse_trace("0 connect tcp 10.0.0.1:1\n").unwrap_err(),
        TraceError::Missing {
            line: 1,
            field: "destination"
        }
    ));
}
