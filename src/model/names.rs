//! Shared validators for names and numbers, as the Kubernetes API checks them.

use crate::error::ValidationError;

/// Checks an RFC 1123 DNS label: 1..=63 characters of `[a-z0-9-]`, starting
/// and ending with an alphanumeric.
pub(crate) fn validate_dns_label(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::Missing {
            field: field.into(),
        });
    }
    let bytes = value.as_bytes();
    let ok_char = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    if value.len() > 63
        || !bytes.iter().all(ok_char)
        || bytes[0] == b'-'
        || bytes[bytes.len() - 1] == b'-'
    {
        return Err(ValidationError::Invalid {
            field: field.into(),
            value: value.into(),
            reason: "must be a DNS label: at most 63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit",
        });
    }
    Ok(())
}

/// Checks an RFC 1123 DNS subdomain (dot-separated labels, at most 253
/// characters), as object names such as EndpointSlice names must be.
pub(crate) fn validate_dns_subdomain(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::Missing {
            field: field.into(),
        });
    }
    if value.len() > 253
        || value
            .split('.')
            .any(|l| validate_dns_label(field, l).is_err())
    {
        return Err(ValidationError::Invalid {
            field: field.into(),
            value: value.into(),
            reason: "must be a DNS subdomain: dot-separated DNS labels, at most 253 characters",
        });
    }
    Ok(())
}

/// Checks an IANA service name (a named port): 1..=15 characters of
/// `[a-z0-9-]`, at least one letter, no leading, trailing or double `-`.
pub(crate) fn validate_port_name(field: &str, value: &str) -> Result<(), ValidationError> {
    let b = value.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !value.contains("--");
    if ok {
        Ok(())
    } else {
        Err(ValidationError::Invalid {
            field: field.into(),
            value: value.into(),
            reason: "must be an IANA service name: at most 15 characters of a-z, 0-9 and '-', with at least one letter",
        })
    }
}

/// Checks a port number in 1..=65535.
pub(crate) fn validate_port(field: &str, value: i64) -> Result<u16, ValidationError> {
    if (1..=65_535).contains(&value) {
        Ok(value as u16)
    } else {
        Err(ValidationError::PortOutOfRange {
            field: field.into(),
            value,
        })
    }
}

/// Parses an IP address as kube-proxy does (`netutils.ParseIPSloppy`, Go's
/// pre-1.17 `net.ParseIP`): an IPv4 octet may carry leading zeros and is
/// read as decimal, so `172.30.0.041` is 172.30.0.41 (not octal 33).
/// Everything else must be a plain IPv4 or IPv6 address. `None` if it is
/// none.
///
/// # Examples
/// ```
/// use svclb::model::names::parse_ip_sloppy;
/// assert_eq!(parse_ip_sloppy("172.30.0.041"), Some("172.30.0.41".parse().unwrap()));
/// assert_eq!(parse_ip_sloppy("fd00::1"), Some("fd00::1".parse().unwrap()));
/// assert_eq!(parse_ip_sloppy("172.30.0.256"), None);
/// assert_eq!(parse_ip_sloppy("www.example.com"), None);
/// ```
pub fn parse_ip_sloppy(text: &str) -> Option<std::net::IpAddr> {
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Some(ip);
    }
    if text.contains(':') {
        return None;
    }
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for o in &mut octets {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = p.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(std::net::IpAddr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(validate_dns_label("f", "web-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", &"x".repeat(64)] {
            assert!(validate_dns_label("f", bad).is_err(), "{bad}");
        }
        assert!(validate_dns_subdomain("f", "web-abc12.x").is_ok());
        assert!(validate_dns_subdomain("f", "web..x").is_err());
    }

    #[test]
    fn port_names() {
        assert!(validate_port_name("f", "http").is_ok());
        assert!(validate_port_name("f", "h2c-8080").is_ok());
        for bad in ["", "8080", "a--b", "-a", "way-too-long-port-name", "Http"] {
            assert!(validate_port_name("f", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(validate_port("f", 1).unwrap(), 1);
        assert_eq!(validate_port("f", 65_535).unwrap(), 65_535);
        assert!(validate_port("f", 0).is_err());
        assert!(validate_port("f", 65_536).is_err());
    }
}
