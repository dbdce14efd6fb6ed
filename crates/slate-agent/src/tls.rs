//! TLS to the server over TCP, the server pinned by the SHA-256 fingerprint of its
//! certificate (handed to the agent with its token), so no CA and no name check is
//! involved and a machine in the middle cannot read the token or forge results.
//!
//! One `TlsStream` is shared by the reader and the writer thread. The session state sits
//! behind a mutex that is never held across a blocking socket read: the reader waits for
//! ciphertext without the lock, then takes it to decrypt, so a writer is never blocked by
//! a reader waiting for the server.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};

/// A server certificate fingerprint, `sha256:` and 64 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn parse(s: &str) -> Result<Fingerprint, String> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("fingerprint {s:?} must start with sha256:"))?;
        let hex: String = hex.chars().filter(|c| *c != ':').collect();
        if hex.len() != 64 {
            return Err(format!("fingerprint {s:?} must have 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("fingerprint {s:?} is not hex"))?;
        }
        Ok(Fingerprint(out))
    }

    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Accepts exactly the pinned certificate (and checks the handshake signature was made
/// with its key, which is what proves the server holds it).
#[derive(Debug)]
struct Pinned {
    want: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity.as_ref());
        if got == self.want {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate {got} does not match the pinned {}",
                self.want
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered; a 1.2 handshake never gets here.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn client_config(pin: &Fingerprint) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider: CryptoProvider = ring::default_provider();
    let algorithms = provider.signature_verification_algorithms;
    let config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            want: pin.clone(),
            algorithms,
        }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

struct Shared {
    conn: Mutex<ClientConnection>,
    /// The socket, for writes (and shutdown); reads use their own clone.
    tcp: TcpStream,
}

/// An established TLS session; clones share it (one reader, one writer at a time).
pub struct TlsStream {
    shared: Arc<Shared>,
    rd: TcpStream,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.tcp().peer_addr().ok())
            .finish()
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Runs the handshake on a connected socket; fails unless the server presents the
    /// pinned certificate over TLS 1.3. Nothing of the caller's is sent before that.
    pub fn handshake(mut tcp: TcpStream, host: &str, pin: &Fingerprint) -> io::Result<TlsStream> {
        let config = client_config(pin).map_err(tls_err)?;
        // The name only goes into SNI; the pin is what authenticates the server.
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
            .unwrap_or_else(|_| ServerName::try_from("slate-server").expect("valid name"));
        let mut conn = ClientConnection::new(config, name).map_err(tls_err)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        let rd = tcp.try_clone()?;
        Ok(TlsStream {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                tcp,
            }),
            rd,
        })
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.shared.tcp
    }

    pub fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            shared: self.shared.clone(),
            rd: self.rd.try_clone()?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, ClientConnection> {
        self.shared.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes whatever the session has queued (records, alerts, key updates).
    fn flush_tls(&self, conn: &mut ClientConnection) -> io::Result<()> {
        let mut tcp = &self.shared.tcp;
        while conn.wants_write() {
            conn.write_tls(&mut tcp)?;
        }
        Ok(())
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut cipher = [0u8; 16 << 10];
        loop {
            {
                let mut conn = self.lock();
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // Without the lock: the writer keeps going while we wait for the server.
            let n = self.rd.read(&mut cipher)?;
            let mut conn = self.lock();
            if n == 0 {
                // The server closed the socket: a clean close_notify was handled above
                // (read returned 0); anything else is a truncated stream.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls connection closed without close_notify",
                ));
            }
            let mut rest = &cipher[..n];
            while !rest.is_empty() {
                conn.read_tls(&mut rest)?;
                conn.process_new_packets().map_err(tls_err)?;
            }
            self.flush_tls(&mut conn)?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut conn = self.lock();
        let n = conn.writer().write(buf)?;
        self.flush_tls(&mut conn)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut conn = self.lock();
        conn.writer().flush()?;
        self.flush_tls(&mut conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_and_print() {
        let f = Fingerprint::of(b"cert");
        let s = f.to_string();
        assert!(s.starts_with("sha256:") && s.len() == 7 + 64, "{s}");
        assert_eq!(Fingerprint::parse(&s), Ok(f.clone()));
        // The colon-separated form openssl prints is accepted too.
        let colons = format!(
            "sha256:{}",
            s.as_bytes()[7..]
                .chunks(2)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(":")
        );
        assert_eq!(Fingerprint::parse(&colons), Ok(f));
        assert!(Fingerprint::parse("md5:00").is_err());
        assert!(Fingerprint::parse("sha256:abcd").is_err());
        assert!(Fingerprint::parse(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }
}
