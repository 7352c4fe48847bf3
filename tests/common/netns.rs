//! Helpers for the tests that run real traffic in network namespaces
//! (`tests/ebpf_netns.rs`, `tests/tun_netns.rs`): entering a namespace,
//! and a TCP client of the echo backends, which greet with `B<n>\n` and
//! then echo every byte.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

/// Moves the calling thread into network namespace `ns` (`ip netns add`'s
/// `/run/netns/NS`).
pub fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).expect("netns file");
    setns(f, CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Runs `f` on a thread inside namespace `ns`.
pub fn in_ns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

/// A connection to an echo backend, after its banner.
pub struct Conn {
    pub stream: TcpStream,
    pub reader: BufReader<TcpStream>,
    /// The backend's number, from its `B<n>` banner.
    pub backend: u32,
    /// The client's own address.
    pub local: SocketAddr,
}

/// Connects to `target` and reads the backend's banner; `timeout` bounds
/// the connect and every read and write.
pub fn connect(target: SocketAddr, timeout: Duration) -> std::io::Result<Conn> {
    greeted(TcpStream::connect_timeout(&target, timeout)?, timeout)
}

/// [`connect`] from source address `src` (the kernel picks the port).
pub fn connect_from(
    src: std::net::IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<Conn> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect_timeout(&target.into(), timeout)?;
    greeted(sock.into(), timeout)
}

/// Reads the banner of a fresh connection.
fn greeted(stream: TcpStream, timeout: Duration) -> std::io::Result<Conn> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let local = stream.local_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let backend = line
        .trim()
        .strip_prefix('B')
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad banner {line:?}")))?;
    Ok(Conn {
        stream,
        reader,
        backend,
        local,
    })
}

/// Sends 1,400 bytes (more than one segment's worth with the banner) and
/// checks that every byte comes back.
pub fn echo(c: &mut Conn, seed: u32) -> std::io::Result<()> {
    let msg: Vec<u8> = (0..1400u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect();
    c.stream.write_all(&msg)?;
    let mut back = vec![0u8; msg.len()];
    c.reader.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}
