//! `packet`: arbitrary bytes as a frame and as a bare IP packet, parsed
//! and put through every rewrite (`svclb::packet`).
//!
//! - Nothing panics, whatever the bytes.
//! - A parse that succeeds gives offsets inside the buffer.
//! - A rewrite that succeeds leaves a packet that parses again, with the
//!   same layout, and whose flow carries the new address.
//! - A refused rewrite leaves the buffer untouched.
//! - A reject answer (ICMP port unreachable) parses as an ICMP error about
//!   the packet's flow; its checksums verify when the packet's do (the
//!   answer quotes the packet as it came).
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use svclb::packet::*;

fuzz_target!(|data: &[u8]| {
    for link in [LinkType::Ethernet, LinkType::Ip] {
        let Ok(p) = parse(data, link) else {
            continue;
        };
        let lay = p.layout();
        assert!(lay.l3 <= lay.l4 && lay.l4 <= lay.end && lay.end <= data.len());
        let sound = verify_checksums(data, &p).is_ok();
        let (a, b): (SocketAddr, SocketAddr) = match p.version() {
            IpVersion::V4 => (
                "10.1.2.3:8080".parse().unwrap(),
                "10.0.0.1:40000".parse().unwrap(),
            ),
            IpVersion::V6 => (
                "[fd00::5]:8080".parse().unwrap(),
                "[fd00::1]:40000".parse().unwrap(),
            ),
        };
        let wrong: SocketAddr = match p.version() {
            IpVersion::V4 => "[fd00::5]:1".parse().unwrap(),
            IpVersion::V6 => "10.1.2.3:1".parse().unwrap(),
        };
        let mut answer = [0u8; ICMP_ERROR_MAX_V6];
        if let Ok(n) = port_unreachable(data, &p, &mut answer) {
            let q = parse(&answer[..n], LinkType::Ip).expect("a reject answer parses");
            if sound {
                verify_checksums(&answer[..n], &q).expect("a reject answer's checksums");
            }
            match (*q.kind(), p.flow()) {
                (PacketKind::IcmpError { inner, .. }, Some(f)) => assert_eq!(inner, f),
                other => panic!("a reject answer is an ICMP error: {other:?}"),
            }
        }
        let mut buf = data.to_vec();
        assert!(rewrite_dst(&mut buf, &p, wrong).is_err());
        assert_eq!(buf, data);
        let dst = rewrite_dst(&mut buf, &p, a);
        if dst.is_err() {
            assert_eq!(buf, data);
        }
        let _ = rewrite_src(&mut buf, &p, b);
        if dst.is_ok() {
            let q = parse(&buf, link).expect("a rewritten packet parses");
            assert_eq!(q.layout(), lay);
            if let Some(f) = q.flow() {
                assert_eq!(f.dst.ip(), a.ip());
                if !q.is_fragmented() {
                    assert_eq!(f.dst, a);
                }
            }
        }
        if let Some(f) = p.flow() {
            let _ = reverse_nat(&mut buf, &p, &f, true);
        }
        // A shorter buffer than the parsed one is refused, never indexed.
        if !buf.is_empty() {
            let n = buf.len() - 1;
            let short = &mut buf[..n];
            if n < lay.end {
                assert!(rewrite_dst(short, &p, a).is_err());
            }
        }
    }
});
