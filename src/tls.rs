//! TLS termination (rustls): pglb answers `S` to an SSLRequest, or takes a TLS handshake
//! directly (PostgreSQL 17's `sslnegotiation=direct`, ALPN `postgresql`), and then sees
//! the session in plaintext like any other.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;

/// The ALPN protocol name PostgreSQL uses.
pub const ALPN: &[u8] = b"postgresql";

/// First byte of a TLS handshake record: what a direct-TLS client sends first.
pub const HANDSHAKE: u8 = 0x16;

/// Why certificate and key cannot serve TLS; each names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {}: {source}", .file.display())]
    ReadCert {
        file: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("no certificate in {}", .0.display())]
    NoCert(PathBuf),
    #[error("cannot read a private key from {}: {source}", .file.display())]
    ReadKey {
        file: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate and key do not fit together: {0}")]
    Mismatch(rustls::Error),
}

/// Builds an acceptor from PEM files.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let read_cert = |source| TlsError::ReadCert {
        file: cert.to_owned(),
        source,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(read_cert)?
        .collect::<Result<_, _>>()
        .map_err(read_cert)?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::ReadKey {
        file: key.to_owned(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Mismatch)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Mismatch)?;
    // Clients that offer ALPN must offer "postgresql"; libpq before 17 offers none.
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Runs the handshake. With `direct`, the client must have negotiated ALPN
/// `postgresql` (PostgreSQL refuses direct TLS without it, so does pglb).
pub async fn accept(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    direct: bool,
) -> std::io::Result<TlsStream<TcpStream>> {
    let stream = acceptor.accept(tcp).await?;
    if direct && stream.get_ref().1.alpn_protocol() != Some(ALPN) {
        return Err(std::io::Error::other(
            "direct TLS without ALPN \"postgresql\"",
        ));
    }
    Ok(stream)
}
