//! TLS termination (rustls): pglb answers `S` to an SSLRequest, or takes a TLS handshake
//! directly (PostgreSQL 17's `sslnegotiation=direct`, ALPN `postgresql`), and then sees
//! the session in plaintext like any other.

use std::path::Path;
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

/// Builds an acceptor from PEM files; errors name the file and what is wrong with it.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read certificate file {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid certificate in {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not fit together: {e}"))?;
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
