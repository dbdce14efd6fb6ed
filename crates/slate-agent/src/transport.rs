//! The byte stream to the server: a Unix socket, TLS over TCP (the server pinned by its
//! certificate's fingerprint), plain TCP (only where the operator allowed it), or a
//! character device such as a virtio-serial port. The protocol on top does not care which.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::tls::{Fingerprint, TlsStream};

/// Where to connect, from `--connect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// `unix:PATH`
    Unix(PathBuf),
    /// `tcp:HOST:PORT` (an IP literal is safest: a static glibc cannot always resolve names)
    Tcp(String),
    /// `tls:HOST:PORT`: TCP with TLS 1.3, the server's certificate pinned by `pin`
    /// (`$SLATE_AGENT_FINGERPRINT`); `None` until [`Addr::pin`] sets it.
    Tls {
        hostport: String,
        pin: Option<Fingerprint>,
    },
    /// An absolute path to a character device opened read/write, e.g. `/dev/vport0p1`.
    Device(PathBuf),
}

impl Addr {
    pub fn parse(s: &str) -> Result<Addr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            Ok(Addr::Unix(path.into()))
        } else if let Some(hostport) = s.strip_prefix("tcp:") {
            host_port(hostport, "tcp")?;
            Ok(Addr::Tcp(hostport.to_string()))
        } else if let Some(hostport) = s.strip_prefix("tls:") {
            host_port(hostport, "tls")?;
            Ok(Addr::Tls {
                hostport: hostport.to_string(),
                pin: None,
            })
        } else if s.starts_with('/') {
            Ok(Addr::Device(s.into()))
        } else {
            Err(format!(
                "unknown address {s:?}: use unix:PATH, tls:HOST:PORT, tcp:HOST:PORT or /dev/PATH"
            ))
        }
    }

    /// Whether a lost connection is worth re-establishing (the job keeps running meanwhile).
    /// A Unix socket or a device going away means the server or the worker is gone.
    pub fn reconnects(&self) -> bool {
        matches!(self, Addr::Tcp(_) | Addr::Tls { .. })
    }

    /// Sets the fingerprint a `tls:` address pins; other addresses ignore it.
    pub fn pin(&mut self, fingerprint: Fingerprint) {
        if let Addr::Tls { pin, .. } = self {
            *pin = Some(fingerprint);
        }
    }

    /// Whether the address can be dialled as it is (a `tls:` one needs its pin).
    pub fn check(&self) -> Result<(), String> {
        match self {
            Addr::Tls { pin: None, .. } => Err(
                "tls: needs the server's certificate fingerprint ($SLATE_AGENT_FINGERPRINT or --fingerprint)"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

/// Checks `HOST:PORT` and returns the host.
fn host_port<'a>(hostport: &'a str, scheme: &str) -> Result<&'a str, String> {
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(host),
        _ => Err(format!("{scheme}: needs HOST:PORT, got {hostport:?}")),
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(hp) => write!(f, "tcp:{hp}"),
            Addr::Tls { hostport, .. } => write!(f, "tls:{hostport}"),
            Addr::Device(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One connected stream. Clone it (a dup of the descriptor) to read and write from
/// different threads.
#[derive(Debug)]
pub enum Transport {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(TlsStream),
    Device(File),
}

impl Transport {
    pub fn connect(addr: &Addr) -> io::Result<Transport> {
        Ok(match addr {
            Addr::Unix(p) => Transport::Unix(UnixStream::connect(p)?),
            Addr::Tcp(hp) => {
                let s = TcpStream::connect(hp.as_str())?;
                s.set_nodelay(true)?;
                Transport::Tcp(s)
            }
            Addr::Tls { hostport, pin } => {
                let pin = pin.as_ref().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "tls address without a pin")
                })?;
                let s = TcpStream::connect(hostport.as_str())?;
                s.set_nodelay(true)?;
                // A handshake that stalls (a peer that is not a TLS server) must not hang
                // the agent: the handshake's own timeout comes later.
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let host = host_port(hostport, "tls").map_err(io::Error::other)?;
                let t = TlsStream::handshake(s, host, pin)?;
                t.tcp().set_read_timeout(None)?;
                Transport::Tls(t)
            }
            Addr::Device(p) => Transport::Device(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOCTTY)
                    .open(p)?,
            ),
        })
    }

    /// Connects, retrying while the other end is not there yet (the server creates the
    /// socket, or the VM's port appears, a little after the agent starts).
    pub fn connect_retry(addr: &Addr, within: Duration) -> io::Result<Transport> {
        let deadline = Instant::now() + within;
        let mut pause = Duration::from_millis(20);
        loop {
            match Transport::connect(addr) {
                Ok(t) => return Ok(t),
                // A server that fails the TLS handshake (the wrong certificate, not TLS)
                // will not get better by asking again.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(e),
                Err(e) if Instant::now() + pause > deadline => return Err(e),
                Err(_) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    pub fn try_clone(&self) -> io::Result<Transport> {
        Ok(match self {
            Transport::Unix(s) => Transport::Unix(s.try_clone()?),
            Transport::Tcp(s) => Transport::Tcp(s.try_clone()?),
            Transport::Tls(s) => Transport::Tls(s.try_clone()?),
            Transport::Device(f) => Transport::Device(f.try_clone()?),
        })
    }

    /// Ends the stream in both directions, waking a thread blocked reading it (sockets
    /// only; a device has no such thing).
    pub fn shutdown(&self) {
        let _ = match self {
            Transport::Unix(s) => s.shutdown(Shutdown::Both),
            Transport::Tcp(s) => s.shutdown(Shutdown::Both),
            Transport::Tls(s) => s.tcp().shutdown(Shutdown::Both),
            Transport::Device(_) => Ok(()),
        };
    }

    /// A limit for blocking reads (sockets only); `None` waits forever.
    pub fn set_read_timeout(&self, d: Option<Duration>) {
        let _ = match self {
            Transport::Unix(s) => s.set_read_timeout(d),
            Transport::Tcp(s) => s.set_read_timeout(d),
            Transport::Tls(s) => s.tcp().set_read_timeout(d),
            Transport::Device(_) => Ok(()),
        };
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Unix(s) => s.read(buf),
            Transport::Tcp(s) => s.read(buf),
            Transport::Tls(s) => s.read(buf),
            Transport::Device(f) => f.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Unix(s) => s.write(buf),
            Transport::Tcp(s) => s.write(buf),
            Transport::Tls(s) => s.write(buf),
            Transport::Device(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Unix(s) => s.flush(),
            Transport::Tcp(s) => s.flush(),
            Transport::Tls(s) => s.flush(),
            Transport::Device(f) => f.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(
            Addr::parse("unix:/run/slate/agent.sock"),
            Ok(Addr::Unix("/run/slate/agent.sock".into()))
        );
        assert_eq!(
            Addr::parse("tcp:10.0.2.2:7000"),
            Ok(Addr::Tcp("10.0.2.2:7000".into()))
        );
        assert_eq!(
            Addr::parse("tcp:[::1]:7000"),
            Ok(Addr::Tcp("[::1]:7000".into()))
        );
        assert_eq!(
            Addr::parse("/dev/vport0p1"),
            Ok(Addr::Device("/dev/vport0p1".into()))
        );
        let mut tls = Addr::parse("tls:10.0.2.2:7443").unwrap();
        assert!(tls.check().is_err(), "a tls address needs its pin");
        tls.pin(Fingerprint::of(b"x"));
        assert_eq!(tls.check(), Ok(()));
        assert!(tls.reconnects());
        assert_eq!(tls.to_string(), "tls:10.0.2.2:7443");
        assert!(Addr::parse("tls:host").is_err());
        assert!(Addr::parse("tcp:host").is_err());
        assert!(Addr::parse("tcp:host:99999").is_err());
        assert!(Addr::parse("unix:").is_err());
        assert!(Addr::parse("agent.sock").is_err());
        assert!(Addr::Tcp("h:1".into()).reconnects());
        assert!(!Addr::Unix("/x".into()).reconnects());
    }
}
