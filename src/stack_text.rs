//! Short text formatted on the stack, for the paths that must not allocate
//! (an endpoint key compared while merging slices, a rule's probability
//! rounded as kube-proxy writes it).

use core::fmt;

/// Up to `N` bytes of text written with `write!`; a write past `N` bytes
/// fails with [`fmt::Error`].
pub(crate) struct StackText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackText<N> {
    /// Empty.
    pub(crate) const fn new() -> Self {
        StackText {
            buf: [0; N],
            len: 0,
        }
    }

    /// The bytes written.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The text written (only whole `&str`s are written, so it is UTF-8).
    pub(crate) fn as_str(&self) -> &str {
        core::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

impl<const N: usize> fmt::Write for StackText<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write as _;

    #[test]
    fn writes_up_to_its_size_and_refuses_more() {
        let mut t = StackText::<8>::new();
        write!(t, "{}:{}", 10, 80).unwrap();
        assert_eq!(t.as_str(), "10:80");
        assert!(t.write_str("xyzw").is_err());
        assert_eq!(t.as_bytes(), b"10:80");
    }
}
