//! CRC32c (Castagnoli), the SCTP checksum (RFC 9260 appendix A).
//!
//! A 256-entry table built at compile time and a byte-at-a-time loop: a
//! dozen lines with no dependency and no `unsafe`. SCTP is rare on a
//! Service path and its packets are small, so a hardware-accelerated crate
//! would buy little; the table loop runs at about 1 byte per cycle.

const POLY: u32 = 0x82F6_3B78; // 0x1EDC6F41 reflected

const TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// The register after feeding `data` into `crc` (no initial or final
/// inversion).
fn update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC32c of `data` (initial value and final XOR `0xFFFF_FFFF`).
///
/// # Examples
/// ```
/// assert_eq!(svclb::packet::crc32c(b"123456789"), 0xE306_9283);
/// ```
pub fn crc32c(data: &[u8]) -> u32 {
    !update(!0, data)
}

/// The SCTP checksum of a whole SCTP packet (common header and chunks),
/// computed as if its checksum field (bytes 8..12) were zero. SCTP stores
/// it little-endian: write `sctp_checksum(p).to_le_bytes()` at offset 8.
/// Packets shorter than the 12-byte common header are summed as they are.
pub fn sctp_checksum(sctp: &[u8]) -> u32 {
    if sctp.len() < 12 {
        return crc32c(sctp);
    }
    let crc = update(!0, &sctp[..8]);
    let crc = update(crc, &[0; 4]);
    !update(crc, &sctp[12..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_values() {
        // The standard check value and RFC 3720 B.4's 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }
}
