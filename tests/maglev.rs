//! Maglev, complete: the paper's worked example, uniformity, disruption on
//! removal, and agreement between two processes.

use std::net::SocketAddr;

use svclb::scheduler::maglev::{
    backend_key, build_table, default_table_size, katran_offset_skip, murmur3_x64_64, populate,
};

/// Eisenbud et al., NSDI 2016, table 1: N = 3, M = 7.
#[test]
fn papers_worked_example() {
    let (b0, b1, b2) = ((3, 4, 1), (0, 2, 1), (3, 1, 1));
    assert_eq!(populate(&[b0, b1, b2], 7), [1, 0, 1, 0, 2, 2, 0]);
    // After removing B1, indices are into [B0, B2]: B0 B0 B0 B0 B2 B2 B2.
    assert_eq!(populate(&[b0, b2], 7), [0, 0, 0, 0, 1, 1, 1]);
}

/// Values from an independent MurmurHash3_x64_128 (Python's `mmh3.hash64`,
/// first half, over the 16 little-endian bytes of A then B).
#[test]
fn murmur_matches_katran_reference() {
    assert_eq!(murmur3_x64_64(0, 0, 0), 5_457_549_051_747_178_710);
    assert_eq!(murmur3_x64_64(1, 42, 0), 830_322_281_416_518_563);
    assert_eq!(
        murmur3_x64_64(0xDEAD_BEEF_CAFE_BABE, 2_718_281_828, 2307),
        4_126_941_194_415_098_550
    );
}

fn backends(n: usize) -> Vec<(SocketAddr, u32)> {
    (0..n)
        .map(|i| {
            (
                SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 8080)),
                1,
            )
        })
        .collect()
}

fn counts(table: &[u32], n: usize) -> Vec<u32> {
    let mut c = vec![0u32; n];
    for &s in table {
        c[s as usize] += 1;
    }
    c
}

#[test]
fn uniform_at_100_backends_and_65537_slots() {
    let t = build_table(&backends(100), 65537);
    let c = counts(&t, 100);
    let (lo, hi) = (*c.iter().min().unwrap(), *c.iter().max().unwrap());
    assert!(f64::from(hi) / f64::from(lo) <= 1.05, "max {hi} min {lo}");
}

#[test]
fn weights_scale_slots() {
    let mut b = backends(4);
    b[0].1 = 3;
    b[3].1 = 0;
    let c = counts(&build_table(&b, 16381), 4);
    assert_eq!(c[3], 0);
    let ratio = f64::from(c[0]) / f64::from(c[1]);
    assert!((ratio - 3.0).abs() < 0.05, "{c:?}");
}

/// A flow spread over slots, as the eBPF program hashes it.
fn slot_of(i: u64, m: u32) -> usize {
    (murmur3_x64_64(0x0a02_0000_0a60_0001 + (i << 32), i, 0x9747_b28c) % u64::from(m)) as usize
}

#[test]
fn removing_one_of_100_moves_at_most_1_percent_of_survivors_flows() {
    let m = 65537;
    let all = backends(100);
    let before = build_table(&all, m);
    let mut fewer = all.clone();
    let gone = fewer.remove(37).0;
    let after = build_table(&fewer, m);
    let (mut on_survivors, mut moved) = (0u32, 0u32);
    for i in 0..200_000u64 {
        let s = slot_of(i, m);
        let was = all[before[s] as usize].0;
        if was == gone {
            continue;
        }
        on_survivors += 1;
        if fewer[after[s] as usize].0 != was {
            moved += 1;
        }
    }
    let pct = 100.0 * f64::from(moved) / f64::from(on_survivors);
    eprintln!("moved {moved} of {on_survivors} survivors' flows ({pct:.3}%)");
    assert!(pct <= 1.0, "{pct}%");
}

#[test]
fn offsets_and_skips_are_in_range_and_addresses_differ() {
    for m in [7, 251, 65537] {
        for (a, _) in backends(50) {
            let (o, s) = katran_offset_skip(backend_key(a), m);
            assert!(o < m && (1..m).contains(&s));
        }
    }
    assert_ne!(
        backend_key("10.0.0.1:80".parse().unwrap()),
        backend_key("10.0.0.1:81".parse().unwrap())
    );
    assert_eq!(default_table_size(1), 16381);
    assert_eq!(default_table_size(164), 32749);
}

#[test]
#[should_panic(expected = "coprime")]
fn a_skip_that_cannot_visit_every_slot_is_refused() {
    populate(&[(0, 3, 1)], 9);
}

const CHILD_ENV: &str = "SVCLB_MAGLEV_CHILD_OUT";
const FLOWS: u64 = 1_000_000;

/// The backend index of each of 1,000,000 flows, as a byte each.
fn choices() -> Vec<u8> {
    let m = 65537;
    let t = build_table(&backends(100), m);
    (0..FLOWS).map(|i| t[slot_of(i, m)] as u8).collect()
}

/// Re-runs this test binary as a second process, which writes its choices
/// to a file; this process compares them flow by flow.
#[test]
fn two_processes_agree_on_a_million_flows() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        std::fs::write(path, choices()).unwrap();
        return;
    }
    let out = std::env::temp_dir().join(format!("svclb-maglev-{}.bin", std::process::id()));
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "two_processes_agree_on_a_million_flows",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &out)
        .status()
        .unwrap();
    assert!(status.success());
    let theirs = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    let ours = choices();
    assert_eq!(theirs.len(), FLOWS as usize);
    let differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of {FLOWS} flows differ");
    // And the spread is real, not a constant.
    let c = counts(&ours.iter().map(|&b| u32::from(b)).collect::<Vec<_>>(), 100);
    assert!(c.iter().all(|&k| k > 8000), "{c:?}");
}
