//! Compiles the eBPF program with clang when the `ebpf` feature is on; the
//! default build runs nothing and needs no clang.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/ebpf/svclb.bpf.c");
    println!("cargo::rerun-if-env-changed=CLANG");
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("svclb.bpf.o");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    // Debian keeps <asm/types.h> under the multiarch directory.
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let result = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .args(["-c", "src/ebpf/svclb.bpf.c", "-o"])
        .arg(&out)
        .status();
    match result {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang failed on src/ebpf/svclb.bpf.c ({s})"),
        Err(e) => {
            // No clang: the crate still builds, and EbpfDataplane::load
            // reports why (so the netns test can print SKIPPED).
            println!(
                "cargo::warning=feature `ebpf` without clang ({clang}: {e}): \
                 apt-get install clang libbpf-dev; the loader will refuse to load"
            );
            std::fs::write(&out, b"").unwrap();
            // Build again once clang is installed (a missing path reruns).
            println!("cargo::rerun-if-changed=/usr/bin/{clang}");
        }
    }
}
