//! TLS for agents dialing in over TCP: the server's certificate (generated into the data
//! dir on first start, or the operator's), its SHA-256 fingerprint that agents pin, and
//! the acceptor that tells a TLS client from a plaintext agent or garbage by its first
//! byte.
//!
//! Only TLS 1.3 is offered. The agent authenticates the server by the pin (no CA, no
//! name), the server authenticates the agent by its one-time job token, sent inside the
//! session.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("agent tls: reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent tls: writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent tls: {path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("agent tls: generating a certificate: {0}")]
    Generate(String),
    #[error("agent tls: the certificate and key do not make a server config: {0}")]
    Config(String),
}

/// The server side of the agent channel's TLS.
#[derive(Clone)]
pub struct AgentTls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// `sha256:` and the hex digest of the certificate's DER bytes.
    pub fingerprint: String,
    /// Where the certificate is (for the log line at start).
    pub cert_path: PathBuf,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls")
            .field("fingerprint", &self.fingerprint)
            .field("cert_path", &self.cert_path)
            .finish()
    }
}

/// `sha256:<hex>` of a DER certificate, the form agents get in `SLATE_AGENT_FINGERPRINT`.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

impl AgentTls {
    /// Uses `cert`/`key` when configured; otherwise `<data_dir>/tls/agent.{crt,key}`,
    /// generated on first start (key readable by root only) and kept, so the fingerprint
    /// hooks and images were given stays valid across restarts.
    pub fn load_or_generate(
        data_dir: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<AgentTls, TlsError> {
        let (cert_path, key_path) = match (cert, key) {
            (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf()),
            _ => {
                let dir = data_dir.join("tls");
                let (c, k) = (dir.join("agent.crt"), dir.join("agent.key"));
                if !c.exists() || !k.exists() {
                    generate(&dir, &c, &k)?;
                }
                (c, k)
            }
        };
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem {
                path: cert_path.clone(),
                detail: e.to_string(),
            })?;
        let Some(leaf) = certs.first() else {
            return Err(TlsError::Pem {
                path: cert_path,
                detail: "no certificate in the file".into(),
            });
        };
        let fingerprint = fingerprint(leaf.as_ref());
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            path: key_path.clone(),
            detail: e.to_string(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(AgentTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            fingerprint,
            cert_path,
        })
    }
}

fn generate(dir: &Path, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(werr(dir))?;
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut names = vec!["slate-server".to_string()];
    if !host.is_empty() {
        names.push(host);
    }
    let made =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    // The key first, created 0600; then the certificate. A crash between the two leaves
    // no certificate, so the next start generates both again.
    let tmp = key.with_extension("key.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(werr(&tmp))?;
    f.write_all(made.key_pair.serialize_pem().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(werr(&tmp))?;
    std::fs::rename(&tmp, key).map_err(werr(key))?;
    let tmp = cert.with_extension("crt.tmp");
    std::fs::write(&tmp, made.cert.pem()).map_err(werr(&tmp))?;
    std::fs::rename(&tmp, cert).map_err(werr(cert))?;
    tracing::info!(cert = %cert.display(), "generated the agent tls certificate");
    Ok(())
}

/// What a new TCP connection turned out to be.
pub enum Accepted {
    /// A TLS session (the agent's hello comes next, encrypted).
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A plaintext agent frame starts here (allowed only for pools that opted in).
    Plaintext(TcpStream),
}

/// Why a connection was dropped before any hello.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("client sent nothing within {0:?}")]
    Silent(Duration),
    #[error("client closed the connection before speaking")]
    Closed,
    #[error("not tls and not an agent frame (first byte 0x{0:02x})")]
    Garbage(u8),
    #[error("tls handshake failed: {0}")]
    Handshake(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

impl AgentTls {
    /// Looks at the first byte without consuming it: a TLS handshake record is taken
    /// through the handshake (bounded by `within`); a frame length's first byte (frames
    /// are < 16 MiB, so it is 0) is a plaintext agent; anything else is refused.
    pub async fn accept(&self, tcp: TcpStream, within: Duration) -> Result<Accepted, AcceptError> {
        let mut first = [0u8; 1];
        let n = match tokio::time::timeout(within, tcp.peek(&mut first)).await {
            Err(_) => return Err(AcceptError::Silent(within)),
            Ok(r) => r?,
        };
        if n == 0 {
            return Err(AcceptError::Closed);
        }
        match first[0] {
            TLS_HANDSHAKE => match tokio::time::timeout(within, self.acceptor.accept(tcp)).await {
                Err(_) => Err(AcceptError::Handshake(format!(
                    "not finished within {within:?}"
                ))),
                Ok(Err(e)) => Err(AcceptError::Handshake(e.to_string())),
                Ok(Ok(s)) => Ok(Accepted::Tls(Box::new(s))),
            },
            0 => Ok(Accepted::Plaintext(tcp)),
            b => Err(AcceptError::Garbage(b)),
        }
    }
}

/// Splits a stream into the boxed halves an agent link is made of.
pub fn split<S>(s: S) -> (crate::agents::BoxRead, crate::agents::BoxWrite)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_is_kept_and_its_fingerprint_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = AgentTls::load_or_generate(dir.path(), None, None).unwrap();
        assert!(a.fingerprint.starts_with("sha256:") && a.fingerprint.len() == 7 + 64);
        let b = AgentTls::load_or_generate(dir.path(), None, None).unwrap();
        assert_eq!(
            a.fingerprint, b.fingerprint,
            "regenerated on the second start"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls/agent.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is readable by others: {mode:o}");
        // Configured files are used as they are.
        let c = AgentTls::load_or_generate(
            Path::new("/nonexistent"),
            Some(&dir.path().join("tls/agent.crt")),
            Some(&dir.path().join("tls/agent.key")),
        )
        .unwrap();
        assert_eq!(c.fingerprint, a.fingerprint);
    }

    #[test]
    fn broken_files_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, "not a pem").unwrap();
        std::fs::write(&k, "not a pem").unwrap();
        let e = AgentTls::load_or_generate(dir.path(), Some(&c), Some(&k)).unwrap_err();
        assert!(e.to_string().contains("c.pem"), "{e}");
        let e = AgentTls::load_or_generate(dir.path(), Some(&dir.path().join("nope")), Some(&k))
            .unwrap_err();
        assert!(e.to_string().contains("reading"), "{e}");
    }
}
